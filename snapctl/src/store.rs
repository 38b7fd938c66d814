//! The record store: one JSON file per VM in the state directory, written atomically,
//! one writer at a time.
//!
//! Layout of the state directory (mode 0700):
//!
//! | file | what |
//! |---|---|
//! | `<vm>.json` | the VM's [`Record`], mode 0600 |
//! | `<vm>.lock` | the sidecar lock file, mode 0600; holds the holder's pid while locked |
//! | `<vm>.relay` | while a holder is connected to QEMU: its monitor relay's socket, mode 0600 ([`crate::run::relay`]) |
//!
//! Writers take the VM's lock ([`Store::lock`]) and hold it for a whole operation; the
//! record can only be written through the [`VmLock`]. Readers that only display
//! ([`Store::peek`]) need no lock, because a record file is only ever replaced whole, by
//! `rename`, which readers see either before or after, never half-way.
//!
//! A record file that cannot be parsed is never overwritten: it may be the only copy of
//! what snapctl knew about a VM's images, and the user decides what to do with it.

use std::fs::{self, DirBuilder, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use jiff::Timestamp;

use crate::error::{Error, Result};
use crate::names::{validate_vm_name, vm_name_problem};
use crate::operation::Operation;
use crate::record::{JournalEntry, Record};

/// The state directory holding every VM's record.
#[derive(Debug, Clone)]
pub struct Store {
    dir: PathBuf,
    /// Opened with [`Store::open_read_only`]: nothing is locked or written.
    read_only: bool,
}

impl Store {
    /// Opens the store in `state_dir`, creating the directory (and missing parents) with
    /// mode 0700 when it does not exist: records name every image path of every VM, which
    /// is nobody else's business.
    ///
    /// Fails when `state_dir` exists and is not a directory (or a symlink to one).
    pub fn open(state_dir: &Path) -> Result<Store> {
        match fs::metadata(state_dir) {
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => {
                return Err(Error::StateDirNotDirectory {
                    path: state_dir.to_owned(),
                });
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                DirBuilder::new()
                    .recursive(true)
                    .mode(0o700)
                    .create(state_dir)
                    .map_err(|e| Error::io("create state directory", state_dir, e))?;
            }
            Err(e) => return Err(Error::io("inspect state directory", state_dir, e)),
        }
        Ok(Store {
            dir: state_dir.to_owned(),
            read_only: false,
        })
    }

    /// Opens the store in `state_dir` for reading only: nothing is created. A missing
    /// directory is an empty store (no VM is registered); [`Store::peek`] and
    /// [`Store::list_vms`] work, and nothing may be locked or written through it.
    ///
    /// Fails when `state_dir` exists and is not a directory (or a symlink to one).
    pub fn open_read_only(state_dir: &Path) -> Result<Store> {
        match fs::metadata(state_dir) {
            Ok(meta) if !meta.is_dir() => Err(Error::StateDirNotDirectory {
                path: state_dir.to_owned(),
            }),
            Ok(_) => Ok(Store {
                dir: state_dir.to_owned(),
                read_only: true,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Store {
                dir: state_dir.to_owned(),
                read_only: true,
            }),
            Err(e) => Err(Error::io("inspect state directory", state_dir, e)),
        }
    }

    /// The state directory to use when none is given: `/var/lib/snapctl` for root, else
    /// `$XDG_STATE_HOME/snapctl`, else `$HOME/.local/state/snapctl`.
    ///
    /// `$SNAPCTL_STATE_DIR` and `--state-dir` are the command line's business and are not
    /// consulted here. A relative `$XDG_STATE_HOME` is ignored, as the XDG base directory
    /// specification asks.
    pub fn default_dir() -> PathBuf {
        default_dir_for(
            nix::unistd::geteuid().is_root(),
            std::env::var_os("XDG_STATE_HOME").map(PathBuf::from),
            std::env::home_dir(),
        )
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The path of `vm`'s record file, `<dir>/<vm>.json`.
    pub fn record_path(&self, vm: &str) -> Result<PathBuf> {
        validate_vm_name(vm)?;
        Ok(self.dir.join(format!("{vm}.json")))
    }

    /// Takes the exclusive lock on `vm`, waiting up to `wait` for another snapctl to
    /// release it; a zero `wait` tries once.
    ///
    /// The lock is an advisory `flock` on `<dir>/<vm>.lock` (created with mode 0600),
    /// held until the returned [`VmLock`] is dropped. The operating system releases it
    /// when the holder exits, however it exits, so a crash never leaves a VM locked. The
    /// holder writes its pid into the file so that a waiter that gives up can name it in
    /// [`Error::Locked`]. Lock files are never removed: removing one while another process
    /// waits on it would let two processes hold "the" lock at once.
    ///
    /// On a store opened with [`Store::open_read_only`] the lock file must exist already
    /// (it is never created), and the record cannot be written through the lock.
    pub fn lock(&self, vm: &str, wait: Duration) -> Result<VmLock> {
        validate_vm_name(vm)?;
        let path = self.dir.join(format!("{vm}.lock"));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(!self.read_only)
            .truncate(false)
            .mode(0o600)
            // A symlink planted at the lock path is refused, never followed.
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| Error::io("open lock file", &path, e))?;

        let deadline = Instant::now() + wait;
        let mut pause = Duration::from_millis(5);
        loop {
            match file.try_lock() {
                Ok(()) => break,
                Err(TryLockError::WouldBlock) => {}
                Err(TryLockError::Error(e)) => return Err(Error::io("lock", &path, e)),
            }
            let now = Instant::now();
            if now >= deadline {
                let holder = read_holder(&file);
                return Err(Error::Locked {
                    vm: vm.to_owned(),
                    holder,
                    operation: holder.and_then(|pid| self.operation_of(vm, pid)),
                    waited: wait,
                });
            }
            thread::sleep(pause.min(deadline - now));
            pause = (pause * 2).min(Duration::from_millis(100));
        }

        // Best effort: the pid only improves a waiter's message.
        let pid = format!("{}\n", std::process::id());
        let _ = file
            .set_len(0)
            .and_then(|()| file.write_all_at(pid.as_bytes(), 0));

        Ok(VmLock {
            file,
            vm: vm.to_owned(),
            dir: self.dir.clone(),
            record_path: self.record_path(vm)?,
            read_only: self.read_only,
            known: std::sync::Mutex::new(None),
        })
    }

    /// The snapctl process holding `vm`'s lock, if another process holds it
    /// now; `None` when the lock is free (or `vm` has no lock file yet).
    ///
    /// Probes with a shared lock taken and released at once, so a holder is
    /// seen exactly as long as the operating system says it holds the lock;
    /// its pid comes from the lock file and its operation from the record's
    /// journal (an operation is journaled before its first change, so a
    /// holder still planning shows none).
    pub fn holder(&self, vm: &str) -> Result<Option<Holder>> {
        validate_vm_name(vm)?;
        let path = self.dir.join(format!("{vm}.lock"));
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(Error::io("open lock file", &path, e)),
        };
        match file.try_lock_shared() {
            Ok(()) => {
                let _ = file.unlock();
                Ok(None)
            }
            Err(TryLockError::WouldBlock) => {
                let pid = read_holder(&file);
                Ok(Some(Holder {
                    pid,
                    operation: pid.and_then(|pid| self.operation_of(vm, pid)),
                }))
            }
            Err(TryLockError::Error(e)) => Err(Error::io("lock", &path, e)),
        }
    }

    /// The operation process `pid` has journaled for `vm`, if any.
    fn operation_of(&self, vm: &str, pid: u32) -> Option<String> {
        let record = self.peek(vm).ok()??;
        let entry = record.journal.iter().rev().find(|e| e.pid == pid)?;
        Some(entry.operation.name().to_owned())
    }

    /// `<dir>/<vm>.relay`: where the holder of `vm`'s lock relays QEMU's
    /// monitor while it is connected to it ([`crate::run::relay`]).
    pub fn relay_path(&self, vm: &str) -> Result<PathBuf> {
        validate_vm_name(vm)?;
        Ok(self.dir.join(format!("{vm}.relay")))
    }

    /// Reads `vm`'s record without taking the lock, for commands that only display it.
    ///
    /// Returns `None` when the VM has no record. The record may be outdated by the time
    /// it is shown, but it is never a half-written one.
    pub fn peek(&self, vm: &str) -> Result<Option<Record>> {
        read_record(&self.record_path(vm)?, vm)
    }

    /// The VMs that have a record, sorted by name.
    pub fn list_vms(&self) -> Result<Vec<String>> {
        let entries = match fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            // A store opened read-only on a directory that does not exist (yet).
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(Error::io("list state directory", &self.dir, e)),
        };
        let mut vms = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| Error::io("list state directory", &self.dir, e))?;
            let name = entry.file_name();
            let vm = name.to_str().and_then(|n| n.strip_suffix(".json"));
            if let Some(vm) = vm.filter(|vm| vm_name_problem(vm).is_none()) {
                vms.push(vm.to_owned());
            }
        }
        vms.sort();
        Ok(vms)
    }
}

/// Another snapctl process holding a VM's lock, as [`Store::holder`] sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Holder {
    /// The pid it wrote into the lock file, when that could be read.
    pub pid: Option<u32>,
    /// The operation it has journaled (`commit`, `delete`, …), if any yet.
    pub operation: Option<String>,
}

impl std::fmt::Display for Holder {
    /// `snapctl (pid 123, commit)`, `snapctl (pid 123)`, or `another snapctl`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.pid, &self.operation) {
            (Some(pid), Some(op)) => write!(f, "snapctl (pid {pid}, {op})"),
            (Some(pid), None) => write!(f, "snapctl (pid {pid})"),
            (None, _) => write!(f, "another snapctl"),
        }
    }
}

/// The exclusive right to change one VM's record, from [`Store::lock`] until dropped.
///
/// Every write of the record goes through here, so nothing writes without the lock.
#[derive(Debug)]
pub struct VmLock {
    file: File,
    vm: String,
    dir: PathBuf,
    record_path: PathBuf,
    /// Taken on a read-only store: the record is never written.
    read_only: bool,
    /// The record file as this lock last read or wrote it. While the file is
    /// still that one, a save knows it may overwrite it without parsing it
    /// again (which costs as much as the save itself on a large record).
    known: std::sync::Mutex<Option<FileIdentity>>,
}

/// A file as `stat` identifies it: the same device, inode, size and
/// modification and change times mean nobody has replaced or rewritten it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct FileIdentity {
    dev: u64,
    ino: u64,
    len: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
}

impl FileIdentity {
    fn of(path: &Path) -> Option<FileIdentity> {
        use std::os::unix::fs::MetadataExt;
        let m = fs::metadata(path).ok()?;
        Some(FileIdentity {
            dev: m.dev(),
            ino: m.ino(),
            len: m.len(),
            mtime: (m.mtime(), m.mtime_nsec()),
            ctime: (m.ctime(), m.ctime_nsec()),
        })
    }
}

impl VmLock {
    /// The VM this lock is for.
    pub fn vm(&self) -> &str {
        &self.vm
    }

    /// Reads another VM's record in the same state directory, without its lock
    /// (as [`Store::peek`]).
    pub fn peek_other(&self, vm: &str) -> Result<Option<Record>> {
        validate_vm_name(vm)?;
        read_record(&self.dir.join(format!("{vm}.json")), vm)
    }

    /// `<dir>/<vm>.relay`, the socket of this holder's monitor relay.
    pub fn relay_path(&self) -> PathBuf {
        self.dir.join(format!("{}.relay", self.vm))
    }

    /// Reads the VM's record; `None` when it has none yet.
    ///
    /// The record is checked as [`Record::validate`] does, and must be for this VM, so the
    /// operation that follows can rely on the model's invariants.
    pub fn load(&self) -> Result<Option<Record>> {
        let record = read_record(&self.record_path, &self.vm)?;
        self.remember(record.is_some());
        Ok(record)
    }

    /// Notes the record file as it is now (after reading or writing it under
    /// this lock; `exists` false: there is none).
    fn remember(&self, exists: bool) {
        let identity = exists
            .then(|| FileIdentity::of(&self.record_path))
            .flatten();
        *self.known.lock().unwrap_or_else(|e| e.into_inner()) = identity;
    }

    /// Puts the record file back as it was before an operation that failed:
    /// `before` is the record as loaded then, `None` when there was none (the
    /// file is removed, so a failed first `create` leaves no registration behind).
    pub fn restore(&self, before: Option<&Record>) -> Result<()> {
        self.check_writable()?;
        match before {
            Some(rec) => self.save(rec),
            None => {
                self.check_overwritable()?;
                match fs::remove_file(&self.record_path) {
                    Ok(()) => self.remember(false),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                    Err(e) => return Err(Error::io("remove record", &self.record_path, e)),
                }
                File::open(&self.dir)
                    .and_then(|dir| dir.sync_all())
                    .map_err(|e| Error::io("flush state directory", &self.dir, e))
            }
        }
    }

    /// Writes `rec` as the VM's record, atomically and durably.
    ///
    /// The record is validated first and must be for this VM. It is written to a fresh
    /// temporary file in the state directory (created exclusively, mode 0600), flushed to
    /// disk, and renamed over `<vm>.json`; then the directory itself is flushed, because
    /// the rename is a change to the directory and is not durable until the directory is.
    /// A crash at any point leaves either the old record or the new one, whole.
    ///
    /// Refuses, and leaves the file as it is, when the current `<vm>.json` cannot be
    /// parsed, is from a newer snapctl, or is for another VM.
    pub fn save(&self, rec: &Record) -> Result<()> {
        if rec.vm != self.vm {
            return Err(Error::RecordVmMismatch {
                path: self.record_path.clone(),
                expected: self.vm.clone(),
                found: rec.vm.clone(),
            });
        }
        self.check_writable()?;
        rec.validate()?;
        let json = rec.to_json()?;
        self.check_overwritable()?;

        let in_dir = |action| move |e| Error::io(action, &self.dir, e);
        let mut temp = tempfile::Builder::new()
            .prefix(&format!(".{}.json.", self.vm))
            .suffix(".tmp")
            .permissions(fs::Permissions::from_mode(0o600))
            .tempfile_in(&self.dir)
            .map_err(in_dir("create a temporary record file in"))?;
        temp.write_all(json.as_bytes())
            .and_then(|()| temp.as_file().sync_all())
            .map_err(|e| Error::io("write", temp.path(), e))?;
        temp.persist(&self.record_path)
            .map_err(|e| Error::io("replace record", &self.record_path, e.error))?;
        File::open(&self.dir)
            .and_then(|dir| dir.sync_all())
            .map_err(in_dir("flush state directory"))?;
        self.remember(true);
        Ok(())
    }

    /// Fails on a lock taken on a read-only store.
    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::Refused(format!(
                "the state directory {} was opened read-only: the record of vm {} cannot be written",
                self.dir.display(),
                self.vm
            )));
        }
        Ok(())
    }

    /// Fails unless the current record file is absent or a record of this VM that this
    /// build can read. A file this lock read or wrote itself, still the same
    /// (see [`FileIdentity`]), was such a record: it is not parsed again.
    fn check_overwritable(&self) -> Result<()> {
        let known = *self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.is_some() && known == FileIdentity::of(&self.record_path) {
            return Ok(());
        }
        let bytes = match fs::read(&self.record_path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(Error::io("read record", &self.record_path, e)),
        };
        let existing = Record::parse(&self.record_path, &bytes)?;
        check_vm(&self.record_path, &self.vm, &existing)
    }

    /// Records the intent to perform `operation` before its first change: appends a
    /// journal entry, saves, and returns the entry's id for [`VmLock::resolve`].
    ///
    /// Ids are unique among the entries in flight. If saving fails (an operation that
    /// cannot be encoded included), the entry is taken back out of `rec`, which then
    /// matches the file again.
    pub fn begin(&self, rec: &mut Record, operation: Operation) -> Result<u64> {
        let id = rec.journal.iter().map(|e| e.id).max().map_or(1, |m| m + 1);
        rec.journal.push(JournalEntry {
            id,
            started: Timestamp::now(),
            pid: std::process::id(),
            operation,
        });
        if let Err(e) = self.save(rec) {
            rec.journal.pop();
            return Err(e);
        }
        Ok(id)
    }

    /// Marks the operation begun as `id` as done: removes its journal entry and saves
    /// `rec`, which should by then hold the operation's results.
    ///
    /// If saving fails, the entry is put back into `rec`, which then matches the file
    /// again.
    pub fn resolve(&self, rec: &mut Record, id: u64) -> Result<()> {
        let Some(at) = rec.journal.iter().position(|e| e.id == id) else {
            return Err(Error::UnknownJournalEntry {
                vm: self.vm.clone(),
                id,
            });
        };
        let entry = rec.journal.remove(at);
        if let Err(e) = self.save(rec) {
            rec.journal.insert(at, entry);
            return Err(e);
        }
        Ok(())
    }
}

impl Drop for VmLock {
    fn drop(&mut self) {
        // Clear the pid before releasing, so the file never names a process that no
        // longer holds the lock. Closing the file releases the lock anyway; unlocking
        // explicitly just does it first.
        let _ = self.file.set_len(0);
        let _ = self.file.unlock();
    }
}

/// Reads and checks the record at `path`, which must be `vm`'s; `None` when absent.
fn read_record(path: &Path, vm: &str) -> Result<Option<Record>> {
    let bytes = match fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io("read record", path, e)),
    };
    let rec = Record::parse(path, &bytes)?;
    check_vm(path, vm, &rec)?;
    rec.validate()?;
    Ok(Some(rec))
}

fn check_vm(path: &Path, vm: &str, rec: &Record) -> Result<()> {
    if rec.vm == vm {
        Ok(())
    } else {
        Err(Error::RecordVmMismatch {
            path: path.to_owned(),
            expected: vm.to_owned(),
            found: rec.vm.clone(),
        })
    }
}

/// The pid a lock holder wrote into the lock file, if it can be read.
fn read_holder(file: &File) -> Option<u32> {
    let mut buf = [0; 16];
    let n = file.read_at(&mut buf, 0).ok()?;
    std::str::from_utf8(&buf[..n]).ok()?.trim().parse().ok()
}

/// [`Store::default_dir`] with its inputs made explicit, for testing.
fn default_dir_for(
    is_root: bool,
    xdg_state_home: Option<PathBuf>,
    home: Option<PathBuf>,
) -> PathBuf {
    if is_root {
        return PathBuf::from("/var/lib/snapctl");
    }
    if let Some(xdg) = xdg_state_home.filter(|p| p.is_absolute()) {
        return xdg.join("snapctl");
    }
    match home {
        Some(home) => home.join(".local/state/snapctl"),
        // No home at all (a stripped-down service account): fall back to the system
        // location, where opening the store then fails with a clear permission error.
        None => PathBuf::from("/var/lib/snapctl"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holder_is_seen_while_the_lock_is_held() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.holder("ci1").unwrap(), None, "no lock file yet");
        let lock = store.lock("ci1", Duration::ZERO).unwrap();
        let holder = store.holder("ci1").unwrap().expect("a holder");
        assert_eq!(holder.pid, Some(std::process::id()));
        assert_eq!(holder.operation, None, "nothing journaled");
        assert_eq!(
            holder.to_string(),
            format!("snapctl (pid {})", std::process::id())
        );
        // The probe leaves the lock as it was: still held, and free once dropped.
        assert!(store.lock("ci1", Duration::ZERO).unwrap_err().is_locked());
        drop(lock);
        assert_eq!(store.holder("ci1").unwrap(), None);
        store.lock("ci1", Duration::ZERO).unwrap();
        assert_eq!(
            store.relay_path("ci1").unwrap(),
            dir.path().join("ci1.relay")
        );
    }

    #[test]
    fn default_dir() {
        let home = Some(PathBuf::from("/home/u"));
        assert_eq!(
            default_dir_for(true, Some("/x".into()), home.clone()),
            Path::new("/var/lib/snapctl")
        );
        assert_eq!(
            default_dir_for(false, Some("/x/state".into()), home.clone()),
            Path::new("/x/state/snapctl")
        );
        assert_eq!(
            default_dir_for(false, Some("relative".into()), home.clone()),
            Path::new("/home/u/.local/state/snapctl")
        );
        assert_eq!(
            default_dir_for(false, Some("".into()), home.clone()),
            Path::new("/home/u/.local/state/snapctl")
        );
        assert_eq!(
            default_dir_for(false, None, home),
            Path::new("/home/u/.local/state/snapctl")
        );
        assert!(Store::default_dir().is_absolute());
    }
}
