//! A child process in its own process group, with its output in files.

use std::fs::File;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

use crate::wait_until;
use crate::workdir::WorkDir;

/// How much of each output stream is printed when a test panics.
const DUMP_TAIL_BYTES: usize = 8 * 1024;

/// How long `Drop` waits after SIGTERM before it sends SIGKILL.
const DROP_GRACE: Duration = Duration::from_secs(3);

/// Numbers the log files of processes started by this test binary.
static NEXT_LOG: AtomicU32 = AtomicU32::new(1);

/// A running child process: the guard behind [`crate::Qemu`] and
/// [`crate::StorageDaemon`].
///
/// The child leads its own process group (`process_group(0)`), so signals
/// reach everything it started and a Ctrl-C on the test does not hit it
/// twice. Its stdout and stderr go to files (`<name>-<n>.stdout`/`.stderr`)
/// in the log directory. On drop the group is stopped (SIGTERM, then SIGKILL
/// after a grace period); when the drop happens while the test panics, the
/// tail of both files is printed to stderr first.
#[derive(Debug)]
pub struct Process {
    name: String,
    command_line: String,
    child: Child,
    status: Option<ExitStatus>,
    stdout_path: PathBuf,
    stderr_path: PathBuf,
    /// Holds the log files when the caller gave no log directory.
    _private_logs: Option<WorkDir>,
}

impl Process {
    /// Starts `command` in a new process group with stdin closed and its output
    /// in files under `log_dir` (a private temporary directory when `None`).
    pub(crate) fn spawn(mut command: Command, log_dir: Option<&Path>) -> io::Result<Process> {
        let name = Path::new(command.get_program())
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "process".into());
        let command_line = command_line(&command);
        let private_logs = log_dir.is_none().then(WorkDir::new);
        let log_dir = log_dir.unwrap_or_else(|| private_logs.as_ref().unwrap().path());
        let n = NEXT_LOG.fetch_add(1, Ordering::Relaxed);
        let stdout_path = log_dir.join(format!("{name}-{n}.stdout"));
        let stderr_path = log_dir.join(format!("{name}-{n}.stderr"));
        let child = command
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path)?)
            .stderr(File::create(&stderr_path)?)
            .spawn()
            .map_err(|e| io::Error::new(e.kind(), format!("cannot start {command_line}: {e}")))?;
        Ok(Process {
            name,
            command_line,
            child,
            status: None,
            stdout_path,
            stderr_path,
            _private_logs: private_logs,
        })
    }

    /// The process id (also its process group id).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The command line it was started with, shell-quoted for copy and paste.
    pub fn command_line(&self) -> &str {
        &self.command_line
    }

    /// Everything the process has written to stdout so far. For QEMU this is
    /// where HMP `qemu-io` prints its results.
    pub fn stdout_text(&self) -> String {
        read_lossy(&self.stdout_path)
    }

    /// Everything the process has written to stderr so far.
    pub fn stderr_text(&self) -> String {
        read_lossy(&self.stderr_path)
    }

    /// The file that receives stdout.
    pub fn stdout_path(&self) -> &Path {
        &self.stdout_path
    }

    /// The file that receives stderr.
    pub fn stderr_path(&self) -> &Path {
        &self.stderr_path
    }

    /// The exit status if the process has exited (reaping it), without waiting.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        if self.status.is_none() {
            match self.child.try_wait() {
                Ok(status) => self.status = status,
                Err(e) => panic!("waiting for {} failed: {e}", self.name),
            }
        }
        self.status
    }

    /// Waits up to `timeout` for the process to exit by itself (after a QMP
    /// `quit`, say). `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_until(timeout, || self.try_status().is_some());
        self.status
    }

    /// Waits until the process listens on the Unix socket `path`.
    ///
    /// "Listening" is read from `/proc/net/unix`, so the check does not
    /// connect (a QMP monitor serves one client at a time, and a probe would
    /// take the slot). Fails, with the process's stderr in the message, when
    /// the process exits first or `timeout` passes.
    pub fn wait_for_socket(&mut self, path: impl AsRef<Path>, timeout: Duration) -> io::Result<()> {
        let path = path.as_ref();
        let mut listening = false;
        wait_until(timeout, || {
            listening = is_listening(path);
            listening || self.try_status().is_some()
        });
        if listening {
            return Ok(());
        }
        let what = match self.status {
            Some(status) => format!("exited ({status})"),
            None => format!("was still not listening after {timeout:?}"),
        };
        Err(io::Error::other(format!(
            "{} {what} waiting for socket {}\ncommand: {}\n--- stderr\n{}",
            self.name,
            path.display(),
            self.command_line,
            tail(&self.stderr_text(), DUMP_TAIL_BYTES),
        )))
    }

    /// Stops the process: SIGTERM to its group, up to `timeout` to exit, then
    /// SIGKILL. Returns the exit status (the one it already had, if it had
    /// exited).
    pub fn quit_or_kill(&mut self, timeout: Duration) -> ExitStatus {
        if let Some(status) = self.try_status() {
            return status;
        }
        self.signal_group(Signal::SIGTERM);
        if let Some(status) = self.wait_exit(timeout) {
            return status;
        }
        self.signal_group(Signal::SIGKILL);
        let status = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("waiting for {} failed: {e}", self.name));
        self.status = Some(status);
        status
    }

    fn signal_group(&self, signal: Signal) {
        let group = Pid::from_raw(self.child.id() as i32);
        // ESRCH: the group is already gone, which is what we wanted.
        let _ = killpg(group, signal);
    }

    /// Prints the command line and the tail of stderr and stdout to stderr.
    pub fn dump_output(&self) {
        eprintln!(
            "==== {} (pid {}) ====\ncommand: {}\n---- stderr (tail) ----\n{}\n---- stdout (tail) ----\n{}\n==== end of {} output ====",
            self.name,
            self.child.id(),
            self.command_line,
            tail(&self.stderr_text(), DUMP_TAIL_BYTES),
            tail(&self.stdout_text(), DUMP_TAIL_BYTES),
            self.name,
        );
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_output();
        }
        if self.status.is_none() {
            // Never panic in drop: a second panic during unwinding aborts.
            match self.child.try_wait() {
                Ok(Some(status)) => self.status = Some(status),
                _ => {
                    self.signal_group(Signal::SIGTERM);
                    if !wait_until(DROP_GRACE, || matches!(self.child.try_wait(), Ok(Some(_)))) {
                        self.signal_group(Signal::SIGKILL);
                        let _ = self.child.wait();
                    }
                }
            }
        }
    }
}

/// True when some process listens on the Unix socket `path`
/// (`/proc/net/unix` flag `__SO_ACCEPTCON`).
fn is_listening(path: &Path) -> bool {
    const SO_ACCEPTCON: u32 = 0x0001_0000;
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let wanted = path.as_os_str().to_string_lossy();
    // Num RefCount Protocol Flags Type St Inode Path
    table.lines().skip(1).any(|line| {
        let fields: Vec<&str> = line.splitn(8, char::is_whitespace).collect();
        let flags = fields
            .get(3)
            .and_then(|f| u32::from_str_radix(f, 16).ok())
            .unwrap_or(0);
        flags & SO_ACCEPTCON != 0 && fields.get(7).is_some_and(|p| p.trim() == wanted)
    })
}

fn read_lossy(path: &Path) -> String {
    std::fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
        .unwrap_or_default()
}

/// The last `max` bytes of `text` (cut at a character boundary).
fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// A shell-quoted rendering of `command` for messages, for copy and paste.
pub fn command_line(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|arg| shell_quote(&arg.to_string_lossy()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Quotes one argument for a POSIX shell: as it is when it holds only
/// characters no shell treats specially, otherwise in single quotes.
pub fn shell_quote(arg: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_what_needs_quoting() {
        let mut c = Command::new("qemu-img");
        c.args([
            "create",
            "-f",
            "qcow2",
            "/tmp/a b.qcow2",
            r#"{"x":1}"#,
            "it's",
        ]);
        assert_eq!(
            command_line(&c),
            r#"qemu-img create -f qcow2 '/tmp/a b.qcow2' '{"x":1}' 'it'\''s'"#
        );
    }

    #[test]
    fn tail_cuts_at_a_char_boundary() {
        assert_eq!(tail("abc", 10), "abc");
        assert_eq!(tail("aé", 1), "");
        assert_eq!(tail("xyzé", 2), "é");
    }
}
