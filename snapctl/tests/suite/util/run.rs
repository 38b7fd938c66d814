//! Running the `snapctl` executable: [`Snapctl`] sets the global options,
//! [`TestCommand`] is one invocation and checks how it ended, [`Background`]
//! is one started in the background. Every failed expectation panics with
//! the command line, the exit status, stdout and stderr ([`fail`]).

use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use integration::command_line;
use serde_json::Value;

use super::read_if_exists;

/// How long one snapctl run may take before the test kills it.
const RUN_TIMEOUT: Duration = Duration::from_secs(60);

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

    /// A snapctl command with no global option set, on the command line or in
    /// the environment (set them with [`TestCommand::env`]).
    pub fn bare() -> TestCommand {
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
        TestCommand { command }
    }

    /// A snapctl command with the global options set; add the subcommand with `args`.
    pub fn cmd(&self) -> TestCommand {
        let mut command = Snapctl::bare().command;
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

    /// Sets an environment variable for the run (e.g. `SNAPCTL_FAULT`).
    pub fn env(mut self, key: &str, value: &str) -> TestCommand {
        self.command.env(key, value);
        self
    }

    /// Runs the command as another user (the test runs as root).
    pub fn run_as(mut self, uid: u32, gid: u32) -> TestCommand {
        use std::os::unix::process::CommandExt;
        self.command.uid(uid).gid(gid);
        self
    }

    /// Runs the command in `dir` instead of the test's working directory.
    pub fn current_dir(mut self, dir: impl AsRef<Path>) -> TestCommand {
        self.command.current_dir(dir);
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

    /// Like [`TestCommand::error_line`], for commands that run merge jobs:
    /// see [`error_line_after_progress`].
    pub fn error_line_after_progress(&mut self, expected: &[&str]) -> String {
        let output = self.run();
        error_line_after_progress(&self.command, &output, expected)
    }

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
    child: Child,
    stdout: Option<JoinHandle<Vec<u8>>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    started: Instant,
}

impl Background {
    fn new(command: Command, mut child: Child) -> Background {
        let (stdout, stderr) = drain_output(&mut child);
        Background {
            command,
            child,
            stdout: Some(stdout),
            stderr: Some(stderr),
            started: Instant::now(),
        }
    }

    /// The command, for failure messages.
    pub fn command(&self) -> &Command {
        &self.command
    }

    /// Its process id.
    pub fn id(&self) -> u32 {
        self.child.id()
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
        let (status, timed_out) = wait_or_kill(&mut self.child, timeout);
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

    /// Waits for it to exit (see [`Background::wait`]) and checks that it
    /// failed as [`error_line_after_progress`] says. Returns the error line.
    pub fn error_line_after_progress(mut self, timeout: Duration, expected: &[&str]) -> String {
        let output = self.wait(timeout);
        error_line_after_progress(&self.command, &output, expected)
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
    let (stdout, stderr) = drain_output(&mut child);
    let (status, timed_out) = wait_or_kill(&mut child, timeout);
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

/// Threads that read the child's piped stdout and stderr to the end.
fn drain_output(child: &mut Child) -> (JoinHandle<Vec<u8>>, JoinHandle<Vec<u8>>) {
    let drain = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = pipe.read_to_end(&mut buf);
            buf
        })
    };
    (
        drain(Box::new(child.stdout.take().unwrap())),
        drain(Box::new(child.stderr.take().unwrap())),
    )
}

/// Waits for the child to exit, killing it after `timeout`; says whether it
/// had to.
fn wait_or_kill(child: &mut Child, timeout: Duration) -> (ExitStatus, bool) {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait().expect("wait for snapctl") {
            return (status, false);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            return (child.wait().expect("wait for snapctl"), true);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
