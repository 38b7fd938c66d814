//! The test guest: the small Linux that `scripts/build-guest` makes, booted
//! under QEMU with one data disk, the guest agent and a console log.
//!
//! The guest (`guest/init`) formats its data disk as ext4 on first boot,
//! mounts it, starts `qemu-ga` and then appends checksummed records to
//! `records.log`, fsyncing each one. It reports on its serial console, which
//! QEMU writes to `console.log`: `SNAPGUEST READY` once the disk is mounted
//! and the agent serves, `SNAPGUEST RECORD n` when record `n` is durable,
//! `SNAPGUEST ERROR …` when it cannot go on. A record reported on the console
//! before a snapshot starts is in the snapshot's frozen image.
//!
//! * [`GuestImage`]: the kernel, initramfs and command line that
//!   `target/guest/guest.env` names.
//! * [`GuestBuilder`] → [`Guest`]: the VM, with one QMP monitor for the code
//!   under test (`snapctl.sock`) and one for the test (`admin.sock`).
//! * [`check_records`] and [`check_filesystem`]: what a disk image holds,
//!   verified offline (or with `-U` while QEMU runs) by
//!   `scripts/check-records`, `dumpe2fs` and `e2fsck`.
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use integration::guest::{GuestBuilder, GuestImage, check_records};
//! use integration::{WorkDir, image};
//!
//! let dir = WorkDir::new();
//! let disk = dir.join("base.qcow2");
//! image::create_qcow2(&disk, 64 << 20);
//! let mut guest = GuestBuilder::new(&GuestImage::locate(), dir.path(), &disk)
//!     .spawn()
//!     .expect("start QEMU");
//! guest.wait_ready(Duration::from_secs(60));
//! let seen = guest.wait_for_records(20, Duration::from_secs(60));
//! // ... snapshot through guest.snapctl_socket() ...
//! guest.quit_or_kill(Duration::from_secs(5));
//! assert!(check_records(&disk, seen).valid >= seen);
//! ```

use std::collections::BTreeMap;
use std::io;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::process::command_line;
use crate::qemu::escape_opt;
use crate::{Qemu, QemuBuilder, absolute, require_tool};

/// The node name of the data disk's qcow2 layer.
pub const DISK_NODE: &str = "vda0";

/// The `-device` id of the data disk.
pub const DISK_ID: &str = "vda";

/// What the guest prints when it is up: disk mounted, agent serving.
const READY: &str = "SNAPGUEST READY";

/// What the guest prints when it cannot go on.
const ERROR: &str = "SNAPGUEST ERROR";

/// What the guest prints before the number of each durable record it reports.
const RECORD: &str = "SNAPGUEST RECORD ";

/// What the guest prints, before `READY`, when its disk already held records
/// 1 to n (followed by n): numbering goes on at n + 1.
const RESUME: &str = "SNAPGUEST RESUME ";

/// How much of the console is printed when something fails.
const CONSOLE_TAIL_LINES: usize = 30;

/// How often the console log is read while waiting.
const POLL: Duration = Duration::from_millis(50);

/// The repository root (the workspace above this crate).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the integration crate lives inside the repository")
        .to_owned()
}

/// The built test guest, as `target/guest/guest.env` describes it.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// `SNAPGUEST_KERNEL`: the kernel for `-kernel`.
    pub kernel: PathBuf,
    /// `SNAPGUEST_INITRD`: the initramfs for `-initrd`.
    pub initrd: PathBuf,
    /// `SNAPGUEST_CMDLINE`: the base kernel command line.
    pub cmdline: String,
    /// `SNAPGUEST_AGENT_PORT`: the virtserialport name `qemu-ga` opens.
    pub agent_port: String,
    /// Every `KEY="value"` of the file.
    pub env: BTreeMap<String, String>,
}

impl GuestImage {
    /// Reads `<repo>/target/guest/guest.env`.
    ///
    /// Panics when the guest has not been built: tests that need it fail
    /// loudly, they never skip.
    #[track_caller]
    pub fn locate() -> GuestImage {
        GuestImage::load(&repo_root().join("target/guest/guest.env"))
    }

    /// Reads a `guest.env` file; panics when it or a file it names is missing.
    #[track_caller]
    pub fn load(path: &Path) -> GuestImage {
        let not_built = |what: String| -> ! {
            panic!(
                "test guest not built: run scripts/build-guest (scripts/test does it; needs scripts/setup)\n({what})"
            )
        };
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) => not_built(format!("cannot read {}: {e}", path.display())),
        };
        let env = parse_env(&text).unwrap_or_else(|e| {
            panic!("{}: {e}; rebuild with scripts/build-guest", path.display())
        });
        let get = |key: &str| -> String {
            env.get(key).cloned().unwrap_or_else(|| {
                panic!(
                    "{} has no {key}; rebuild with scripts/build-guest --force",
                    path.display()
                )
            })
        };
        let image = GuestImage {
            kernel: PathBuf::from(get("SNAPGUEST_KERNEL")),
            initrd: PathBuf::from(get("SNAPGUEST_INITRD")),
            cmdline: get("SNAPGUEST_CMDLINE"),
            agent_port: get("SNAPGUEST_AGENT_PORT"),
            env,
        };
        for file in [&image.kernel, &image.initrd] {
            if !file.is_file() {
                not_built(format!(
                    "{} names {}, which is missing",
                    path.display(),
                    file.display()
                ));
            }
        }
        image
    }
}

/// Parses `KEY="value"` lines (`#` comments and blank lines skipped), the
/// format `scripts/build-guest` writes.
fn parse_env(text: &str) -> Result<BTreeMap<String, String>, String> {
    let mut env = BTreeMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .ok_or_else(|| format!("line {}: expected KEY=\"value\", got {line:?}", i + 1))?;
        let value = value
            .strip_prefix('"')
            .and_then(|v| v.strip_suffix('"'))
            .unwrap_or(value);
        env.insert(key.to_owned(), value.to_owned());
    }
    Ok(env)
}

/// Builds the QEMU command line of a test guest with one data disk.
///
/// In the directory given to [`GuestBuilder::new`] the VM gets:
///
/// | file | what |
/// |---|---|
/// | `console.log` | the serial console (`ttyS0`) |
/// | `qga.sock` | the guest agent's host side (virtserialport `org.qemu.guest_agent.0`) |
/// | `snapctl.sock` | a QMP monitor for the code under test |
/// | `admin.sock` | a QMP monitor for the test itself |
/// | `qemu-system-x86_64-N.stdout`/`.stderr` | QEMU's own output |
///
/// The disk is one qcow2 `-blockdev` named [`DISK_NODE`] under
/// `-device virtio-blk-pci,id=`[`DISK_ID`]. The kernel command line is the
/// image's plus `snapguest.mkfs=1` (format a disk without ext4 on first
/// boot) plus whatever [`GuestBuilder::kernel_arg`] adds. QEMU runs with
/// `-no-reboot`, so a guest that panics ends QEMU instead of rebooting.
#[derive(Debug, Clone)]
pub struct GuestBuilder {
    image: GuestImage,
    dir: PathBuf,
    disk: PathBuf,
    memory_mib: u32,
    kernel_args: Vec<String>,
}

impl GuestBuilder {
    /// A guest of `image` booting from `disk` (a qcow2 image), with its
    /// sockets and logs in `dir`.
    pub fn new(image: &GuestImage, dir: impl AsRef<Path>, disk: impl AsRef<Path>) -> GuestBuilder {
        GuestBuilder {
            image: image.clone(),
            dir: absolute(dir.as_ref()),
            disk: absolute(disk.as_ref()),
            memory_mib: 256,
            kernel_args: Vec::new(),
        }
    }

    /// Appends one argument to the kernel command line, e.g.
    /// `snapguest.report_every=1` (`guest/init` lists the options).
    pub fn kernel_arg(mut self, arg: impl Into<String>) -> GuestBuilder {
        self.kernel_args.push(arg.into());
        self
    }

    /// Guest memory in MiB (default 256).
    pub fn memory_mib(mut self, mib: u32) -> GuestBuilder {
        self.memory_mib = mib;
        self
    }

    /// The kernel command line the guest boots with.
    pub fn cmdline(&self) -> String {
        let mut cmdline = format!("{} snapguest.mkfs=1", self.image.cmdline);
        for arg in &self.kernel_args {
            cmdline.push(' ');
            cmdline.push_str(arg);
        }
        cmdline
    }

    /// The QEMU command line as a [`QemuBuilder`], running (not paused).
    pub fn qemu(&self) -> QemuBuilder {
        let console = self.dir.join("console.log");
        let qga = self.dir.join("qga.sock");
        QemuBuilder::new()
            .paused(false)
            .log_dir(&self.dir)
            .args([
                "-m".to_owned(),
                self.memory_mib.to_string(),
                "-no-reboot".to_owned(),
            ])
            .arg("-kernel")
            .arg(&self.image.kernel)
            .arg("-initrd")
            .arg(&self.image.initrd)
            .arg("-append")
            .arg(self.cmdline())
            .arg("-chardev")
            .arg(format!("file,id=console0,path={}", escape_opt(&console)))
            .args(["-serial", "chardev:console0"])
            .blockdev(crate::qcow2_layer(DISK_NODE, &self.disk, None))
            .device(format!("virtio-blk-pci,id={DISK_ID},drive={DISK_NODE}"))
            .arg("-chardev")
            .arg(format!(
                "socket,id=qga0,path={},server=on,wait=off",
                escape_opt(&qga)
            ))
            .device("virtio-serial-pci")
            .device(format!(
                "virtserialport,chardev=qga0,name={}",
                self.image.agent_port
            ))
            .qmp(self.dir.join("snapctl.sock"))
            .qmp(self.dir.join("admin.sock"))
    }

    /// Starts QEMU and returns once it listens on its monitors and the agent
    /// socket. The guest then boots: wait for it with [`Guest::wait_ready`].
    pub fn spawn(&self) -> io::Result<Guest> {
        let console = self.dir.join("console.log");
        // A console from an earlier boot in the same directory would be read
        // as this boot's.
        std::fs::write(&console, b"")?;
        let mut qemu = self.qemu().spawn()?;
        let qga_socket = self.dir.join("qga.sock");
        qemu.wait_for_socket(&qga_socket, Duration::from_secs(20))?;
        Ok(Guest {
            qemu,
            console,
            qga_socket,
            snapctl_socket: self.dir.join("snapctl.sock"),
            admin_socket: self.dir.join("admin.sock"),
            disk: self.disk.clone(),
        })
    }
}

/// A running test guest: QEMU (this derefs to [`Qemu`]) and its console.
///
/// Dropping it stops QEMU; when that happens while a test panics, the tail
/// of the console is printed before QEMU's own output.
#[derive(Debug)]
pub struct Guest {
    qemu: Qemu,
    console: PathBuf,
    qga_socket: PathBuf,
    snapctl_socket: PathBuf,
    admin_socket: PathBuf,
    disk: PathBuf,
}

impl Guest {
    /// The guest agent's socket.
    pub fn qga_socket(&self) -> &Path {
        &self.qga_socket
    }

    /// The QMP monitor for the code under test.
    pub fn snapctl_socket(&self) -> &Path {
        &self.snapctl_socket
    }

    /// The QMP monitor for the test.
    pub fn admin_socket(&self) -> &Path {
        &self.admin_socket
    }

    /// The data disk's image the guest booted from (absolute).
    pub fn disk(&self) -> &Path {
        &self.disk
    }

    /// The console log file.
    pub fn console_path(&self) -> &Path {
        &self.console
    }

    /// Everything the guest has printed on its console so far.
    pub fn console_text(&self) -> String {
        std::fs::read(&self.console)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// The highest `SNAPGUEST RECORD n` on the console so far (0 when none):
    /// records 1 to n are durable on the guest's disk.
    pub fn records_seen(&self) -> u64 {
        highest_record(&self.console_text())
    }

    /// Waits until the guest prints `SNAPGUEST READY`.
    ///
    /// Panics, with the console's last lines, when the guest prints
    /// `SNAPGUEST ERROR`, QEMU exits, or `timeout` passes first.
    #[track_caller]
    pub fn wait_ready(&mut self, timeout: Duration) {
        self.wait_console(timeout, "the guest to be ready", |console| {
            console.contains(READY)
        });
    }

    /// Waits until the guest has reported record `n` or a later one, and
    /// returns the highest record reported. Panics like [`Guest::wait_ready`].
    #[track_caller]
    pub fn wait_for_records(&mut self, n: u64, timeout: Duration) -> u64 {
        let mut seen = 0;
        self.wait_console(timeout, &format!("record {n}"), |console| {
            seen = highest_record(console);
            seen >= n
        });
        seen
    }

    /// A mark at the end of what the console holds now (its length in
    /// bytes), for [`Guest::console_since`] and the `*_since` waits: what the
    /// guest prints after an event, such as the boot that a reset starts.
    pub fn console_mark(&self) -> usize {
        std::fs::metadata(&self.console).map_or(0, |m| m.len() as usize)
    }

    /// What the guest has printed on its console after `mark`.
    pub fn console_since(&self, mark: usize) -> String {
        std::fs::read(&self.console)
            .map(|bytes| {
                String::from_utf8_lossy(bytes.get(mark..).unwrap_or_default()).into_owned()
            })
            .unwrap_or_default()
    }

    /// Waits until the guest prints `SNAPGUEST READY` after `mark` (a boot
    /// that began after it) and returns the n of the `SNAPGUEST RESUME n`
    /// that boot printed before it: `None` when its disk held no records.
    /// Panics like [`Guest::wait_ready`], on an error printed after `mark`.
    #[track_caller]
    pub fn wait_ready_since(&mut self, mark: usize, timeout: Duration) -> Option<u64> {
        let mut resumed = None;
        self.wait_console_since(mark, timeout, "the guest to boot again", |console| {
            let Some(ready) = console.find(READY) else {
                return false;
            };
            resumed = resume_point(&console[..ready]);
            true
        });
        resumed
    }

    /// Waits until the guest has reported, after `mark`, record `n` or a
    /// later one; returns the numbers of the records reported after `mark`
    /// (lowest first). Panics like [`Guest::wait_ready`].
    #[track_caller]
    pub fn wait_for_records_since(&mut self, mark: usize, n: u64, timeout: Duration) -> Vec<u64> {
        let mut seen = Vec::new();
        self.wait_console_since(mark, timeout, &format!("record {n}"), |console| {
            seen = record_numbers(console).collect();
            seen.iter().any(|&r| r >= n)
        });
        seen.sort_unstable();
        seen
    }

    /// Polls the console until `done` holds; fails fast on a guest error or
    /// QEMU's exit.
    #[track_caller]
    fn wait_console(&mut self, timeout: Duration, what: &str, done: impl FnMut(&str) -> bool) {
        self.wait_console_since(0, timeout, what, done);
    }

    /// Polls the console after `mark` until `done` holds for it; fails fast
    /// on a guest error printed after `mark` or QEMU's exit.
    #[track_caller]
    fn wait_console_since(
        &mut self,
        mark: usize,
        timeout: Duration,
        what: &str,
        mut done: impl FnMut(&str) -> bool,
    ) {
        let start = Instant::now();
        loop {
            let console = self.console_since(mark);
            if done(&console) {
                return;
            }
            let problem = if console.contains(ERROR) {
                "the guest reported an error".to_owned()
            } else if let Some(status) = self.qemu.try_status() {
                format!("QEMU exited ({status})")
            } else if start.elapsed() >= timeout {
                format!("timed out after {timeout:?}")
            } else {
                std::thread::sleep(POLL);
                continue;
            };
            panic!(
                "waiting for {what}: {problem} (last record seen: {})\n--- console ({}), last lines\n{}",
                highest_record(&console),
                self.console.display(),
                last_lines(&self.console_text(), CONSOLE_TAIL_LINES),
            );
        }
    }
}

impl Deref for Guest {
    type Target = Qemu;

    fn deref(&self) -> &Qemu {
        &self.qemu
    }
}

impl DerefMut for Guest {
    fn deref_mut(&mut self) -> &mut Qemu {
        &mut self.qemu
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "==== guest console {} (last lines) ====\n{}\n==== end of console ====",
                self.console.display(),
                last_lines(&self.console_text(), CONSOLE_TAIL_LINES),
            );
        }
    }
}

/// The highest n of the `SNAPGUEST RECORD n` lines in `console`.
fn highest_record(console: &str) -> u64 {
    record_numbers(console).max().unwrap_or(0)
}

/// The n of every complete `SNAPGUEST RECORD n` line in `console`, in order.
fn record_numbers(console: &str) -> impl Iterator<Item = u64> + '_ {
    numbers_after(console, RECORD)
}

/// The n of the last complete `SNAPGUEST RESUME n` line in `console`.
fn resume_point(console: &str) -> Option<u64> {
    numbers_after(console, RESUME).last()
}

/// The numbers that follow `prefix` on complete lines of `console`.
fn numbers_after<'a>(console: &'a str, prefix: &'a str) -> impl Iterator<Item = u64> + 'a {
    console.match_indices(prefix).filter_map(move |(at, _)| {
        let rest = &console[at + prefix.len()..];
        let end = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        // A line still being written may end in the middle of the number.
        rest[end..]
            .starts_with(['\r', '\n'])
            .then(|| rest[..end].parse().ok())?
    })
}

/// The last `n` lines of `text`.
fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// What `scripts/check-records --image` found in a disk image.
#[derive(Debug, Clone)]
pub struct RecordsReport {
    /// Records 1 to `valid` are present with valid checksums.
    pub valid: u64,
    /// The filesystem had no `needs_recovery` flag: it was frozen or
    /// unmounted when the image was taken. False means crash-consistent
    /// (check-records replayed the journal on its copy first).
    pub quiesced: bool,
    /// check-records' note about a torn last record, if it made one.
    pub torn: Option<String>,
    /// Everything check-records printed, stdout then stderr.
    pub output: String,
}

/// Runs `scripts/check-records --min <min> --image <image>`: converts the
/// image (with its backing chain) to raw in a temporary directory, replays
/// the ext4 journal there when needed, and verifies `records.log`.
///
/// Panics, with the command and everything it printed, unless the records
/// are valid (only the last may be torn) and there are at least `min`. The
/// image is read with `-U`, so it may be in use by a running QEMU.
#[track_caller]
pub fn check_records(image: &Path, min: u64) -> RecordsReport {
    require_tool("qemu-img");
    let mut command = Command::new(repo_root().join("scripts/check-records"));
    command
        .arg("--min")
        .arg(min.to_string())
        .arg("--image")
        .arg(absolute(image));
    let output = output_of(&mut command);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let valid = stdout
        .lines()
        .find_map(|line| line.strip_suffix(" valid records")?.parse().ok());
    let (true, Some(valid)) = (output.status.success(), valid) else {
        fail_command(&command, &output);
    };
    let quiesced = if stderr.contains("filesystem: quiesced") {
        true
    } else if stderr.contains("filesystem: crash-consistent") {
        false
    } else {
        fail_command(&command, &output);
    };
    RecordsReport {
        valid,
        quiesced,
        torn: stderr
            .lines()
            .find_map(|line| line.strip_prefix("note: "))
            .map(str::to_owned),
        output: format!("{stdout}{stderr}"),
    }
}

/// The ext4 filesystem of a disk image, checked on a raw copy.
#[derive(Debug, Clone)]
pub struct FilesystemReport {
    /// The superblock had the `needs_recovery` flag (the filesystem was
    /// mounted and not frozen when the image was taken); the journal was
    /// replayed on the copy before the check.
    pub needs_recovery: bool,
    /// `e2fsck -fn` found nothing to fix (exit status 0).
    pub clean: bool,
    /// What `dumpe2fs -h` and `e2fsck` printed.
    pub output: String,
}

/// Converts `image` (with its backing chain, `qemu-img convert -U`) to a raw
/// file in a temporary directory, reads its superblock with `dumpe2fs -h`,
/// replays the journal if `needs_recovery` is set (`e2fsck -E journal_only`,
/// as the kernel would on mount), then runs a forced read-only check
/// (`e2fsck -fn`). The image itself is never written.
///
/// Panics when a tool fails to run (or the replay fails); a filesystem with
/// errors is reported through [`FilesystemReport::clean`].
#[track_caller]
pub fn check_filesystem(image: &Path) -> FilesystemReport {
    let copy = RawCopy::recovered(image, "sc-fsck-");
    let mut output = copy.log;
    let mut fsck = Command::new("e2fsck");
    fsck.arg("-fn").arg(&copy.raw).env("LC_ALL", "C");
    let checked = output_of(&mut fsck);
    output.push_str(&String::from_utf8_lossy(&checked.stdout));
    output.push_str(&String::from_utf8_lossy(&checked.stderr));
    FilesystemReport {
        needs_recovery: copy.needs_recovery,
        clean: checked.status.success(),
        output,
    }
}

/// A raw copy of a disk image (with its backing chain) in a temporary
/// directory, its ext4 journal replayed when the superblock says
/// `needs_recovery`, as the kernel would on mount. The image itself is never
/// written.
struct RawCopy {
    tmp: tempfile::TempDir,
    raw: PathBuf,
    needs_recovery: bool,
    /// `dumpe2fs -h` and the replay's output.
    log: String,
}

impl RawCopy {
    #[track_caller]
    fn recovered(image: &Path, prefix: &str) -> RawCopy {
        require_tool("qemu-img");
        let tmp = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir()
            .unwrap_or_else(|e| panic!("cannot create a temporary directory: {e}"));
        let raw = tmp.path().join("disk.raw");
        let mut convert = Command::new("qemu-img");
        convert
            .args(["convert", "-U", "-O", "raw"])
            .arg(absolute(image))
            .arg(&raw);
        run(&mut convert);

        let mut dumpe2fs = Command::new("dumpe2fs");
        dumpe2fs.arg("-h").arg(&raw).env("LC_ALL", "C");
        let header = String::from_utf8_lossy(&run(&mut dumpe2fs).stdout).into_owned();
        let needs_recovery = header
            .lines()
            .find_map(|line| line.strip_prefix("Filesystem features:"))
            .unwrap_or_else(|| {
                panic!(
                    "dumpe2fs -h {}: no feature line:\n{header}",
                    image.display()
                )
            })
            .split_whitespace()
            .any(|feature| feature == "needs_recovery");
        let mut log = header;
        if needs_recovery {
            let mut replay = Command::new("e2fsck");
            replay.args(["-E", "journal_only", "-y"]).arg(&raw);
            let replayed = output_of(&mut replay);
            // 1: the filesystem was changed, which replaying the journal is.
            if !matches!(replayed.status.code(), Some(0 | 1)) {
                fail_command(&replay, &replayed);
            }
            log.push_str(&String::from_utf8_lossy(&replayed.stdout));
            log.push_str(&String::from_utf8_lossy(&replayed.stderr));
        }
        RawCopy {
            tmp,
            raw,
            needs_recovery,
            log,
        }
    }
}

/// The bytes of `records.log` in the ext4 filesystem of a disk image, to
/// compare records between images ([`check_records`] only counts them).
///
/// Converts `image` (with its backing chain, `qemu-img convert -U`) to a raw
/// file in a temporary directory, replays the journal there when the
/// superblock has `needs_recovery` (as the kernel would on mount), and
/// dumps the file with `debugfs`. The image itself is never written. Panics
/// when a tool fails or the filesystem has no `/records.log`.
#[track_caller]
pub fn records_log(image: &Path) -> Vec<u8> {
    let copy = RawCopy::recovered(image, "sc-records-");
    let dump = copy.tmp.path().join("records.log");
    let mut debugfs = Command::new("debugfs");
    debugfs
        .arg("-R")
        .arg(format!("dump /records.log {}", dump.display()))
        .arg(&copy.raw);
    let dumped = run(&mut debugfs);
    std::fs::read(&dump).unwrap_or_else(|e| {
        panic!(
            "{}: no /records.log in its filesystem ({e})\n{}",
            image.display(),
            String::from_utf8_lossy(&dumped.stderr)
        )
    })
}

/// Runs `command`; panics with everything it printed unless it exits 0.
#[track_caller]
fn run(command: &mut Command) -> Output {
    let output = output_of(command);
    if !output.status.success() {
        fail_command(command, &output);
    }
    output
}

#[track_caller]
fn output_of(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", command_line(command)))
}

#[track_caller]
fn fail_command(command: &Command, output: &Output) -> ! {
    panic!(
        "command failed: {}\nstatus: {}\n--- stdout\n{}\n--- stderr\n{}",
        command_line(command),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_guest_env_lines() {
        let env = parse_env(
            "# Written by scripts/build-guest\n\nSNAPGUEST_KERNEL=\"/g/vmlinux\"\nSNAPGUEST_CMDLINE=\"console=ttyS0 panic=-1 quiet\"\n",
        )
        .unwrap();
        assert_eq!(env["SNAPGUEST_KERNEL"], "/g/vmlinux");
        assert_eq!(env["SNAPGUEST_CMDLINE"], "console=ttyS0 panic=-1 quiet");
        assert!(parse_env("no equals sign\n").is_err());
    }

    #[test]
    #[should_panic(expected = "test guest not built: run scripts/build-guest")]
    fn a_missing_guest_is_a_loud_failure() {
        GuestImage::load(Path::new("/nonexistent/target/guest/guest.env"));
    }

    #[test]
    fn highest_record_ignores_a_number_still_being_written() {
        let console = "[    1.0] virtio_blk\r\nSNAPGUEST READY\r\nSNAPGUEST RECORD 1\r\n\
                       SNAPGUEST RECORD 10\r\nSNAPGUEST RECORD 20\nSNAPGUEST RECORD 3";
        assert_eq!(highest_record(console), 20);
        assert_eq!(highest_record("SNAPGUEST READY\n"), 0);
    }

    #[test]
    fn record_numbers_and_the_resume_point_of_a_second_boot() {
        let console = "SNAPGUEST RECORD 1\r\nSNAPGUEST RECORD 40\r\n[    0.0] Linux\r\n\
                       SNAPGUEST RESUME 23\r\nSNAPGUEST READY\r\nSNAPGUEST RECORD 24\r\n\
                       SNAPGUEST RECORD 25\r\nSNAPGUEST RECORD 2";
        assert_eq!(record_numbers(console).collect::<Vec<_>>(), [1, 40, 24, 25]);
        assert_eq!(resume_point(console), Some(23));
        assert_eq!(resume_point("SNAPGUEST RESUME 7"), None);
        assert_eq!(resume_point("SNAPGUEST READY\n"), None);
    }

    #[test]
    fn the_command_line_has_the_disk_the_console_and_both_monitors() {
        let image = GuestImage {
            kernel: "/g/vmlinux".into(),
            initrd: "/g/initramfs.cpio".into(),
            cmdline: "console=ttyS0 panic=-1 quiet".into(),
            agent_port: "org.qemu.guest_agent.0".into(),
            env: BTreeMap::new(),
        };
        let builder =
            GuestBuilder::new(&image, "/t", "/t/base.qcow2").kernel_arg("snapguest.report_every=1");
        let args: Vec<String> = builder
            .qemu()
            .command()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let line = args.join(" ");
        assert!(!args.contains(&"-S".to_owned()), "{line}");
        assert!(line.contains("-m 256 -no-reboot -kernel /g/vmlinux -initrd /g/initramfs.cpio"));
        assert!(line.contains(
            "-append console=ttyS0 panic=-1 quiet snapguest.mkfs=1 snapguest.report_every=1 "
        ));
        assert!(
            line.contains("-chardev file,id=console0,path=/t/console.log -serial chardev:console0")
        );
        assert!(line.contains(r#""node-name":"vda0""#), "{line}");
        assert!(line.contains("-device virtio-blk-pci,id=vda,drive=vda0"));
        assert!(line.contains("-chardev socket,id=qga0,path=/t/qga.sock,server=on,wait=off"));
        assert!(line.contains("-device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0"));
        assert!(line.ends_with(
            "-qmp unix:/t/snapctl.sock,server=on,wait=off -qmp unix:/t/admin.sock,server=on,wait=off"
        ));
    }
}
