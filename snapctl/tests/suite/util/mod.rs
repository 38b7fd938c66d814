//! Test support for the `snapctl` command: a runner that prints everything on
//! failure, a small synchronous QMP monitor for the test's own view of QEMU,
//! and the VMs the tests start.
//!
//! Every VM gets two QMP monitors: `sc.sock` for snapctl and `t.sock` for the
//! test (QEMU serves one client per monitor). Images live in `<workdir>/img`,
//! the record in `<workdir>/state/vm1.json`.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::{OsStr, OsString};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use integration::{Qemu, QemuBuilder, WorkDir, image};
use serde_json::{Value, json};

/// The VM name every test uses.
pub const VM: &str = "vm1";

/// 64 KiB, the size of every pattern write.
pub const K64: u64 = 64 << 10;

/// 1 MiB.
pub const M1: u64 = 1 << 20;

/// Size of every test disk.
pub const DISK_SIZE: u64 = 8 << 20;

/// How long one snapctl run may take before the test kills it.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the test's own QMP exchanges may take.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs the `snapctl` binary with `--state-dir`, `--vm` and `--socket` set.
#[derive(Debug, Clone)]
pub struct Snapctl {
    state_dir: PathBuf,
    vm: String,
    socket: PathBuf,
}

impl Snapctl {
    pub fn new(state_dir: impl Into<PathBuf>, vm: &str, socket: impl Into<PathBuf>) -> Snapctl {
        Snapctl {
            state_dir: state_dir.into(),
            vm: vm.to_owned(),
            socket: socket.into(),
        }
    }

    /// The same, talking to another QMP socket.
    pub fn with_socket(&self, socket: impl Into<PathBuf>) -> Snapctl {
        Snapctl {
            socket: socket.into(),
            ..self.clone()
        }
    }

    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// `<state>/<vm>.json`.
    pub fn record_path(&self) -> PathBuf {
        self.state_dir.join(format!("{}.json", self.vm))
    }

    /// `<state>/<vm>.lock`.
    pub fn lock_path(&self) -> PathBuf {
        self.state_dir.join(format!("{}.lock", self.vm))
    }

    /// The record file's bytes, `None` when there is none.
    pub fn record_bytes(&self) -> Option<Vec<u8>> {
        read_if_exists(&self.record_path())
    }

    /// The record, parsed.
    pub fn record(&self) -> Value {
        let bytes = self
            .record_bytes()
            .unwrap_or_else(|| panic!("no record at {}", self.record_path().display()));
        serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!(
                "record {} is not JSON: {e}\n{}",
                self.record_path().display(),
                String::from_utf8_lossy(&bytes)
            )
        })
    }

    /// A snapctl command with the global options set; add the subcommand with `args`.
    pub fn cmd(&self) -> TestCommand {
        let mut command = Command::new(env!("CARGO_BIN_EXE_snapctl"));
        for var in [
            "SNAPCTL_VM",
            "SNAPCTL_SOCKET",
            "SNAPCTL_QGA",
            "SNAPCTL_STATE_DIR",
            "SNAPCTL_LOG",
        ] {
            command.env_remove(var);
        }
        command
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--vm")
            .arg(&self.vm)
            .arg("--socket")
            .arg(&self.socket);
        TestCommand { command }
    }

    /// Shorthand for `cmd().args(args)`.
    pub fn args<I, S>(&self, args: I) -> TestCommand
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.cmd().args(args)
    }
}

/// One snapctl invocation. Every assertion failure prints the command line,
/// the exit status, stdout and stderr.
#[derive(Debug)]
pub struct TestCommand {
    command: Command,
}

impl TestCommand {
    pub fn args<I, S>(mut self, args: I) -> TestCommand
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.command.args(args);
        self
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> TestCommand {
        self.command.arg(arg);
        self
    }

    /// The command line, shell-quoted.
    pub fn command_line(&self) -> String {
        command_line(&self.command)
    }

    /// Runs the command to completion (killed after a minute) and returns what it did.
    pub fn run(&mut self) -> Output {
        run_with_timeout(&mut self.command, RUN_TIMEOUT)
    }

    /// Runs the command and panics unless it exits 0.
    pub fn ok(&mut self) -> Output {
        let output = self.run();
        if !output.status.success() {
            fail(&self.command, &output, "expected success");
        }
        output
    }

    /// Runs the command and returns its stdout, panicking unless it exits 0.
    pub fn stdout(&mut self) -> String {
        String::from_utf8_lossy(&self.ok().stdout).into_owned()
    }

    /// Adds `--json`, runs, and parses stdout as one JSON document.
    pub fn json(mut self) -> Value {
        self.command.arg("--json");
        let output = self.ok();
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            fail(
                &self.command,
                &output,
                &format!("stdout is not one JSON document: {e}"),
            )
        })
    }

    /// Runs the command and panics unless it exits non-zero.
    pub fn fails(&mut self) -> Output {
        let output = self.run();
        if output.status.success() {
            fail(&self.command, &output, "expected failure");
        }
        output
    }

    /// Runs the command and checks that it failed the way the contract says:
    /// exit status 1, nothing on stdout, exactly one line on stderr, which
    /// contains every string of `expected` (case-insensitively). Returns that line.
    pub fn error_line(&mut self, expected: &[&str]) -> String {
        let output = self.run();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let problem = if output.status.code() != Some(1) {
            Some("expected exit status 1".to_owned())
        } else if !output.stdout.is_empty() {
            Some("expected nothing on stdout".to_owned())
        } else if stderr.lines().count() != 1 || !stderr.ends_with('\n') {
            Some("expected exactly one line on stderr".to_owned())
        } else {
            expected
                .iter()
                .find(|e| !stderr.to_lowercase().contains(&e.to_lowercase()))
                .map(|e| format!("expected stderr to mention {e:?}"))
        };
        if let Some(problem) = problem {
            fail(&self.command, &output, &problem);
        }
        stderr.trim_end().to_owned()
    }
}

impl TestCommand {
    /// Starts the command in the background with piped output (for signals,
    /// and for looking at QEMU while it runs).
    pub fn spawn(mut self) -> Background {
        let child = self
            .command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", command_line(&self.command)));
        Background::new(self.command, child)
    }
}

/// A snapctl run started with [`TestCommand::spawn`]; killed when dropped
/// before it was waited for.
#[derive(Debug)]
pub struct Background {
    command: Command,
    child: std::process::Child,
    stdout: Option<std::thread::JoinHandle<Vec<u8>>>,
    stderr: Option<std::thread::JoinHandle<Vec<u8>>>,
    started: Instant,
}

impl Background {
    fn new(command: Command, mut child: std::process::Child) -> Background {
        let drain = |mut pipe: Box<dyn Read + Send>| {
            std::thread::spawn(move || {
                let mut buf = Vec::new();
                let _ = pipe.read_to_end(&mut buf);
                buf
            })
        };
        let stdout = Some(drain(Box::new(child.stdout.take().unwrap())));
        let stderr = Some(drain(Box::new(child.stderr.take().unwrap())));
        Background {
            command,
            child,
            stdout,
            stderr,
            started: Instant::now(),
        }
    }

    /// The command, for failure messages.
    pub fn command(&self) -> &Command {
        &self.command
    }

    /// How long ago it was started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whether it still runs.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().expect("wait for snapctl").is_none()
    }

    /// Sends SIGINT, as Ctrl-C in a terminal would (with `kill -INT`).
    pub fn interrupt(&self) {
        let pid = self.child.id().to_string();
        let status = Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -INT {pid} failed: {status}");
    }

    /// Waits for it to exit (killed, and the test failed, after `timeout`)
    /// and returns what it did.
    pub fn wait(&mut self, timeout: Duration) -> Output {
        let deadline = Instant::now() + timeout;
        let mut timed_out = false;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for snapctl") {
                break status;
            }
            if Instant::now() >= deadline {
                timed_out = true;
                let _ = self.child.kill();
                break self.child.wait().expect("wait for snapctl");
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let output = Output {
            status,
            stdout: self.stdout.take().unwrap().join().unwrap(),
            stderr: self.stderr.take().unwrap().join().unwrap(),
        };
        if timed_out {
            fail(
                &self.command,
                &output,
                &format!("still running after {timeout:?}"),
            );
        }
        output
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.stdout.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl TestCommand {
    /// Like [`TestCommand::error_line`], for commands that run merge jobs:
    /// see [`error_line_after_progress`].
    pub fn error_line_after_progress(&mut self, expected: &[&str]) -> String {
        let output = self.run();
        error_line_after_progress(&self.command, &output, expected)
    }
}

impl Background {
    /// Waits for it to exit (see [`Background::wait`]) and checks that it
    /// failed as [`error_line_after_progress`] says. Returns the error line.
    pub fn error_line_after_progress(mut self, timeout: Duration, expected: &[&str]) -> String {
        let output = self.wait(timeout);
        error_line_after_progress(&self.command, &output, expected)
    }
}

/// Checks that a run failed the way the contract says, allowing the JSON
/// progress lines (`{"progress": …}`) that merge jobs print on stderr when
/// it is not a terminal: exit status 1, nothing on stdout, and exactly one
/// other line on stderr, which contains every string of `expected`
/// (case-insensitively). Returns that line.
pub fn error_line_after_progress(command: &Command, output: &Output, expected: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let other: Vec<&str> = stderr
        .lines()
        .filter(|line| {
            serde_json::from_str::<Value>(line)
                .map_or(true, |v| !v.get("progress").is_some_and(Value::is_object))
        })
        .collect();
    let problem = if output.status.code() != Some(1) {
        Some("expected exit status 1".to_owned())
    } else if !output.stdout.is_empty() {
        Some("expected nothing on stdout".to_owned())
    } else if other.len() != 1 || !stderr.ends_with('\n') {
        Some("expected exactly one line besides progress lines on stderr".to_owned())
    } else {
        expected
            .iter()
            .find(|e| !other[0].to_lowercase().contains(&e.to_lowercase()))
            .map(|e| format!("expected the error line to mention {e:?}"))
    };
    if let Some(problem) = problem {
        fail(command, output, &problem);
    }
    other[0].to_owned()
}

/// Panics with the command line, status, stdout and stderr.
pub fn fail(command: &Command, output: &Output, what: &str) -> ! {
    panic!(
        "\n{what}\ncommand: {}\nstatus: {}\n--- stdout\n{}\n--- stderr\n{}\n---",
        command_line(command),
        describe_status(output.status),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    )
}

fn describe_status(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(signal)) => format!("killed by signal {signal}"),
        _ => status.to_string(),
    }
}

/// Runs `command` with piped output, killing it after `timeout`.
fn run_with_timeout(command: &mut Command, timeout: Duration) -> Output {
    let mut child = command
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", command_line(command)));
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    let stdout = drain(Box::new(child.stdout.take().unwrap()));
    let stderr = drain(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for snapctl") {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait for snapctl");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let output = Output {
        status,
        stdout: stdout.join().unwrap(),
        stderr: stderr.join().unwrap(),
    };
    if timed_out {
        fail(command, &output, &format!("timed out after {timeout:?}"));
    }
    output
}

/// A shell-quoted rendering of `command`, for copy and paste.
pub fn command_line(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|arg| shell_quote(&arg.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn shell_quote(arg: &str) -> String {
    let plain = !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:,+@%".contains(&b));
    if plain {
        arg.to_owned()
    } else {
        format!("'{}'", arg.replace('\'', r"'\''"))
    }
}

/// A file's bytes, `None` when it does not exist.
pub fn read_if_exists(path: &Path) -> Option<Vec<u8>> {
    match std::fs::read(path) {
        Ok(bytes) => Some(bytes),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => panic!("cannot read {}: {e}", path.display()),
    }
}

/// The names in a directory.
pub fn dir_listing(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
        .map(|entry| {
            entry
                .unwrap_or_else(|e| panic!("cannot list {}: {e}", dir.display()))
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

/// A plain synchronous QMP client for the test's own monitor.
#[derive(Debug)]
pub struct Monitor {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Monitor {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(path: impl AsRef<Path>) -> Monitor {
        let path = path.as_ref().to_owned();
        let stream = UnixStream::connect(&path)
            .unwrap_or_else(|e| panic!("cannot connect to QMP monitor {}: {e}", path.display()));
        stream.set_read_timeout(Some(MONITOR_TIMEOUT)).unwrap();
        let writer = stream.try_clone().unwrap();
        let mut monitor = Monitor {
            path,
            reader: BufReader::new(stream),
            writer,
            next_id: 0,
        };
        let greeting = monitor.read_message();
        assert!(
            greeting.get("QMP").is_some(),
            "{}: expected a QMP greeting, got {greeting}",
            monitor.path.display()
        );
        monitor.ok("qmp_capabilities", Value::Null);
        monitor
    }

    fn read_message(&mut self) -> Value {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => panic!("QMP monitor {} closed the connection", self.path.display()),
            Ok(_) => serde_json::from_str(&line).unwrap_or_else(|e| {
                panic!(
                    "QMP monitor {}: bad JSON {line:?}: {e}",
                    self.path.display()
                )
            }),
            Err(e) => panic!("QMP monitor {}: {e}", self.path.display()),
        }
    }

    /// Runs one command; `Err` holds QEMU's error description.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = format!("t{}", self.next_id);
        let mut message = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            message["arguments"] = arguments;
        }
        let mut line = message.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .unwrap_or_else(|e| panic!("QMP monitor {}: {e}", self.path.display()));
        loop {
            let reply = self.read_message();
            if reply.get("event").is_some() || reply.get("id") != Some(&json!(id)) {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            let desc = reply["error"]["desc"]
                .as_str()
                .unwrap_or("(no description)");
            return Err(desc.to_owned());
        }
    }

    /// Runs one command and panics on a QMP error.
    pub fn ok(&mut self, command: &str, arguments: Value) -> Value {
        self.execute(command, arguments.clone())
            .unwrap_or_else(|e| panic!("QMP {command} {arguments} failed: {e}"))
    }

    /// An HMP command line; returns its text output.
    pub fn hmp(&mut self, command_line: &str) -> String {
        let out = self.ok(
            "human-monitor-command",
            json!({ "command-line": command_line }),
        );
        out.as_str().unwrap_or_default().to_owned()
    }

    /// HMP `qemu-io` on a virtio disk by qdev id. Its results go to QEMU's
    /// stdout; the HMP reply is empty unless the device is not found.
    pub fn qemu_io(&mut self, disk: &str, script: &str) {
        let out = self.hmp(&format!(
            "qemu-io -d /machine/peripheral/{disk}/virtio-backend \"{script}\""
        ));
        assert!(
            out.trim().is_empty(),
            "qemu-io on {disk} {script:?} said: {out}"
        );
    }

    /// Fills `[offset, offset + len)` of a disk with `pattern`, as the guest would.
    pub fn write(&mut self, disk: &str, pattern: u8, offset: u64, len: u64) {
        self.qemu_io(disk, &format!("write -P {pattern:#04x} {offset} {len}"));
    }

    /// The block graph as far as the tests compare it.
    pub fn block_state(&mut self) -> BlockState {
        let blocks = self.ok("query-block", Value::Null);
        let nodes = self.ok("query-named-block-nodes", json!({ "flat": true }));
        let mut roots = BTreeMap::new();
        for b in blocks.as_array().expect("query-block returns an array") {
            let Some(qdev) = b["qdev"].as_str() else {
                continue;
            };
            let id = qdev
                .strip_prefix("/machine/peripheral/")
                .and_then(|rest| rest.split('/').next())
                .unwrap_or(qdev)
                .to_owned();
            let root = match b.get("inserted") {
                Some(i) => Root {
                    node: i["node-name"].as_str().unwrap_or_default().to_owned(),
                    file: PathBuf::from(i["file"].as_str().unwrap_or_default()),
                },
                None => Root::default(),
            };
            roots.insert(id, root);
        }
        let nodes = nodes
            .as_array()
            .expect("query-named-block-nodes returns an array")
            .iter()
            .map(|n| Node {
                name: n["node-name"].as_str().unwrap_or_default().to_owned(),
                driver: n["drv"].as_str().unwrap_or_default().to_owned(),
                file: n["file"].as_str().unwrap_or_default().to_owned(),
                read_only: n["ro"].as_bool().unwrap_or_default(),
            })
            .collect();
        BlockState { roots, nodes }
    }

    /// `query-jobs`.
    pub fn jobs(&mut self) -> Vec<Value> {
        match self.ok("query-jobs", Value::Null) {
            Value::Array(jobs) => jobs,
            other => panic!("query-jobs returned {other}"),
        }
    }

    /// Sends `quit`; QEMU closes the connection as it exits.
    pub fn quit(&mut self) {
        // The reply may or may not arrive before the socket closes.
        let _ = self.writer.write_all(b"{\"execute\": \"quit\"}\n");
    }
}

/// What a device's root node is.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Root {
    pub node: String,
    pub file: PathBuf,
}

/// One node of `query-named-block-nodes`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Node {
    pub name: String,
    pub driver: String,
    pub file: String,
    pub read_only: bool,
}

/// QEMU's block graph: each device's root, and every named node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockState {
    /// By qdev id.
    pub roots: BTreeMap<String, Root>,
    pub nodes: BTreeSet<Node>,
}

impl BlockState {
    pub fn root_file(&self, disk: &str) -> &Path {
        &self
            .roots
            .get(disk)
            .unwrap_or_else(|| panic!("QEMU has no disk {disk}: {self:#?}"))
            .file
    }
}

/// A running QEMU with snapctl's monitor and the test's own, in a work
/// directory. Fields drop in order: QEMU stops before the directory goes.
#[derive(Debug)]
pub struct Vm {
    pub qemu: Qemu,
    pub monitor: Monitor,
    pub snapctl: Snapctl,
    /// QEMU generation, to give a restarted QEMU fresh socket names.
    generation: u32,
    pub dir: WorkDir,
}

impl Vm {
    /// Starts QEMU as `builder` describes, adding the two QMP monitors.
    pub fn start(dir: WorkDir, builder: QemuBuilder) -> Vm {
        let (qemu, monitor, socket) = spawn(&dir, builder, 0);
        let snapctl = Snapctl::new(dir.join("state"), VM, socket);
        Vm {
            qemu,
            monitor,
            snapctl,
            generation: 0,
            dir,
        }
    }

    /// The standard VM: two 8 MiB disks.
    ///
    /// * `vda`: one `-blockdev` layer, `img/base.qcow2` (node `base`).
    /// * `vdb`: legacy `-drive` (QEMU names the nodes) on `img/data.qcow2`,
    ///   an overlay of `img/data-base.qcow2`, which holds 0x07 at 2 MiB.
    pub fn two_disks() -> Vm {
        let dir = WorkDir::new();
        let img = dir.join("img");
        std::fs::create_dir(&img).unwrap();
        let base = img.join("base.qcow2");
        let data_base = img.join("data-base.qcow2");
        let data = img.join("data.qcow2");
        image::create_qcow2(&base, DISK_SIZE);
        image::create_qcow2(&data_base, DISK_SIZE);
        image::write_pattern(&data_base, 0x07, 2 * M1, K64);
        image::create_overlay(&data, &data_base, "qcow2");
        let builder = QemuBuilder::new()
            .blockdev_chain("vda", &[("base", &base)])
            .drive("drive-vdb", "vdb", &data);
        Vm::start(dir, builder)
    }

    /// `<workdir>/img`.
    pub fn images(&self) -> PathBuf {
        self.dir.join("img")
    }

    /// `<workdir>/img/<name>`.
    pub fn image(&self, name: &str) -> PathBuf {
        self.images().join(name)
    }

    /// Quits QEMU through the test's monitor and waits for it to exit.
    pub fn quit(&mut self) {
        self.monitor.quit();
        if self.qemu.wait_exit(Duration::from_secs(10)).is_none() {
            self.qemu.dump_output();
            self.qemu.quit_or_kill(Duration::from_secs(5));
            panic!("QEMU did not exit after quit");
        }
    }

    /// Starts a new QEMU (after [`Vm::quit`]) with the base machine and
    /// `args`, fresh monitors, and points snapctl at the new one.
    pub fn restart<I, S>(&mut self, args: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.generation += 1;
        let builder = QemuBuilder::new().args(args);
        let (qemu, monitor, socket) = spawn(&self.dir, builder, self.generation);
        self.qemu = qemu;
        self.monitor = monitor;
        self.snapctl = self.snapctl.with_socket(socket);
    }

    /// Everything a failed command must leave as it was.
    pub fn untouched_state(&mut self) -> Untouched {
        Untouched {
            record: self.snapctl.record_bytes(),
            images: dir_listing(&self.images()),
            graph: self.monitor.block_state(),
        }
    }

    /// Panics, saying what changed, unless the state is still `before`.
    pub fn assert_untouched(&mut self, before: &Untouched, after_what: &str) {
        let now = self.untouched_state();
        assert!(
            now.record == before.record,
            "{after_what}: the record changed\n--- before\n{}\n--- after\n{}",
            lossy(before.record.as_deref()),
            lossy(now.record.as_deref()),
        );
        assert_eq!(
            now.images, before.images,
            "{after_what}: the image directory changed"
        );
        assert_eq!(
            now.graph, before.graph,
            "{after_what}: QEMU's block graph changed"
        );
    }
}

fn lossy(bytes: Option<&[u8]>) -> String {
    match bytes {
        Some(b) => String::from_utf8_lossy(b).into_owned(),
        None => "(no record)".to_owned(),
    }
}

/// Record bytes, image directory and block graph, to compare after a failure.
#[derive(Debug, Clone)]
pub struct Untouched {
    record: Option<Vec<u8>>,
    images: BTreeSet<String>,
    graph: BlockState,
}

fn spawn(dir: &WorkDir, builder: QemuBuilder, generation: u32) -> (Qemu, Monitor, PathBuf) {
    let suffix = if generation == 0 {
        String::new()
    } else {
        format!("-{generation}")
    };
    let snapctl_socket = dir.join(format!("sc{suffix}.sock"));
    let test_socket = dir.join(format!("t{suffix}.sock"));
    let qemu = builder
        .log_dir(dir.path())
        .qmp(&snapctl_socket)
        .qmp(&test_socket)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start QEMU: {e}"));
    let monitor = Monitor::connect(&test_socket);
    (qemu, monitor, snapctl_socket)
}

impl TestCommand {
    /// Sets an environment variable for the run (e.g. `SNAPCTL_FAULT`).
    pub fn env(mut self, key: &str, value: &str) -> TestCommand {
        self.command.env(key, value);
        self
    }
}

impl TestCommand {
    /// Runs the command in `dir` instead of the test's working directory.
    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> TestCommand {
        self.command.current_dir(dir);
        self
    }
}

/// The permission bits of a file or directory (`0o600`), not following a symlink.
pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// A small tmpfs mounted for one test, unmounted on drop.
#[derive(Debug)]
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `1M`) at `path`, created if missing.
    /// Needs root, as the tests run in CI; without it the test fails saying so.
    pub fn mount(path: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&path).unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0700"))
            .arg("tmpfs")
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            output.status.success(),
            "this test fills a small tmpfs to make a write fail with ENOSPC, \
             and mounting one needs root (uid {}): mount said: {}",
            current_uid(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Tmpfs { path }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (QEMU being killed while a test unwinds): detach it.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

fn current_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}
