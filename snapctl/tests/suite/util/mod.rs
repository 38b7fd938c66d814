//! Test support shared by every module of the suite:
//!
//! * [`run`]: the `snapctl` runner ([`Snapctl`], [`TestCommand`],
//!   [`Background`]), which prints the command line, exit status, stdout
//!   and stderr on every failure;
//! * [`monitor`]: the test's own QMP [`Monitor`] and [`BlockState`];
//! * [`vm`]: [`Vm`], the standard VM setups and their [`vm::Layout`]s, and
//!   [`Tmpfs`];
//! * [`history`]: the byte-pattern [`History`] tables and the assertions
//!   that compare data and bookkeeping with them, for any standard VM;
//! * here: sizes, and small file helpers.

pub mod history;
pub mod monitor;
pub mod run;
pub mod vm;

use std::collections::BTreeSet;
use std::path::Path;

pub use history::{Bulk, History, LiveReads, Pattern};
pub use monitor::{BlockState, Monitor};
pub use run::{Background, Snapctl, fail};
pub use vm::{Disk, Tmpfs, Vm};

/// The VM name every test uses.
pub const VM: &str = "vm1";

/// 64 KiB, the size of every pattern write.
pub const K64: u64 = 64 << 10;

/// 1 MiB.
pub const M1: u64 = 1 << 20;

/// Size of every disk of [`Vm::two_disks`].
pub const DISK_SIZE: u64 = 8 << 20;

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

/// The permission bits of a file or directory (`0o600`), not following a symlink.
pub fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}
