//! The per-test directory.

use std::path::{Path, PathBuf};

use tempfile::TempDir;

/// Environment variable that keeps test directories for inspection.
const KEEP_VAR: &str = "SNAPCTL_KEEP_TEST_DIRS";

/// A fresh directory for one test, `/tmp/sc-XXXXXX`.
///
/// The path is short on purpose: QEMU's monitor sockets live in it, and a
/// Unix socket path may be at most 108 bytes. The directory and everything in
/// it are removed on drop, unless `SNAPCTL_KEEP_TEST_DIRS=1`, in which case it
/// stays and its path is printed to stderr.
///
/// Declare the `WorkDir` *before* the process guards that use it, so the
/// processes are stopped (dropped first) before their files are removed.
#[derive(Debug)]
pub struct WorkDir {
    dir: Option<TempDir>,
    path: PathBuf,
}

impl WorkDir {
    /// Creates the directory. Panics when `/tmp` is not writable.
    pub fn new() -> WorkDir {
        let dir = tempfile::Builder::new()
            .prefix("sc-")
            .rand_bytes(6)
            .tempdir_in("/tmp")
            .unwrap_or_else(|e| panic!("cannot create a test directory in /tmp: {e}"));
        let path = dir.path().to_owned();
        WorkDir {
            dir: Some(dir),
            path,
        }
    }

    /// The directory's absolute path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A path inside the directory.
    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Default for WorkDir {
    fn default() -> WorkDir {
        WorkDir::new()
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        if std::env::var_os(KEEP_VAR).is_some_and(|v| v == "1") {
            let kept = dir.keep();
            eprintln!("{KEEP_VAR}=1: kept test directory {}", kept.display());
        }
        // Otherwise dropping the TempDir removes it (errors are ignored).
    }
}
