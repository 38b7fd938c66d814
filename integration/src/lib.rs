//! Harness for end-to-end tests with real QEMU processes.
//!
//! Everything here is synchronous std code, so it works the same from plain
//! `#[test]`s and from async tests. It never talks QMP itself: tests bring
//! their own client. The pieces:
//!
//! * [`WorkDir`]: a per-test directory with a short path (Unix socket paths
//!   are limited to 108 bytes), removed on drop unless
//!   `SNAPCTL_KEEP_TEST_DIRS=1`.
//! * [`QemuBuilder`] → [`Qemu`] and [`StorageDaemonBuilder`] →
//!   [`StorageDaemon`]: command-line builders for `qemu-system-x86_64` and
//!   `qemu-storage-daemon`, and guards for the running processes. A guard
//!   kills the process group when dropped, also while a test unwinds from a
//!   panic, and then prints the tail of the process's stderr and stdout so
//!   the failure shows what QEMU said.
//! * [`image`]: `qemu-img` and `qemu-io` wrappers that check data
//!   byte-for-byte with patterns and panic with the command, its status and
//!   its output when a tool fails.
//! * [`wait_until`], [`require_tool`], and [`command_line`] and
//!   [`shell_quote`] for messages that show a command to copy and paste.
//!
//! # Example
//!
//! ```no_run
//! use integration::{QemuBuilder, WorkDir, image};
//!
//! let dir = WorkDir::new();
//! let base = dir.join("base.qcow2");
//! image::create_qcow2(&base, 64 << 20);
//! image::write_pattern(&base, 0xa1, 1 << 20, 64 << 10);
//! let mut qemu = QemuBuilder::new()
//!     .log_dir(dir.path())
//!     .blockdev_chain("vda", &[("base", &base)])
//!     .qmp(dir.join("qmp.sock"))
//!     .spawn()
//!     .expect("start QEMU");
//! // ... connect a QMP client to qmp.sock ...
//! qemu.quit_or_kill(std::time::Duration::from_secs(5));
//! assert!(image::read_pattern_ok(&base, 0xa1, 1 << 20, 64 << 10));
//! ```
//!
//! Tests never skip silently: a missing QEMU binary is a panic that says how
//! to install it.

pub mod guest;
mod snapctl_bin;
pub use snapctl_bin::{Snapctl, repo_root, snapctl_binary};
pub mod image;
mod process;
mod qemu;
mod storage_daemon;
mod workdir;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub use process::{Process, command_line, shell_quote};
pub use qemu::{Qemu, QemuBuilder, qcow2_layer};
pub use storage_daemon::{StorageDaemon, StorageDaemonBuilder};
pub use workdir::WorkDir;

/// Panics unless `name` is an executable on `PATH`; returns its full path.
///
/// The QEMU tests need `qemu-system-x86_64`, `qemu-img`, `qemu-io` and
/// `qemu-storage-daemon`. They never skip: a missing tool is a loud failure.
#[track_caller]
pub fn require_tool(name: &str) -> PathBuf {
    match find_on_path(name) {
        Some(path) => path,
        None => panic!("{name} not found: run scripts/setup (as root) to install QEMU"),
    }
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;

    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|candidate| {
            candidate
                .metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// Polls `condition` every 20 ms until it returns true (→ `true`) or
/// `timeout` has passed (→ `false`). The condition runs at least once.
pub fn wait_until(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `path` made absolute against the current directory (no symlink resolution).
fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path)
        .unwrap_or_else(|e| panic!("cannot make {} absolute: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_until_reports_success_and_timeout() {
        let mut n = 0;
        assert!(wait_until(Duration::from_secs(5), || {
            n += 1;
            n == 3
        }));
        assert!(!wait_until(Duration::from_millis(50), || false));
    }

    #[test]
    #[should_panic(expected = "no-such-tool-xyz not found: run scripts/setup (as root)")]
    fn missing_tool_panics_loudly() {
        require_tool("no-such-tool-xyz");
    }
}
