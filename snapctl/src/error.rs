//! The one error type of the snapshot engine.
//!
//! Every message is one line that names the thing at fault (a VM, a record file, a
//! snapshot) and, where there is one, what to do about it. A variant that wraps an
//! underlying error keeps it as its `source` and does not repeat it in its own message, so
//! a caller printing the chain (`anyhow`'s `{:#}`) shows each fact once.

use std::borrow::Cow;
use std::io;
use std::path::PathBuf;
use std::time::Duration;

/// A `Result` whose error is [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

/// Everything that can go wrong in the snapshot engine.
///
/// New variants will be added (QMP failures, image tool failures); match with a wildcard
/// arm.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A snapshot name the user gave cannot be used.
    #[error("invalid snapshot name {}: {reason}", quoted(name))]
    InvalidSnapshotName {
        /// The name as given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },

    /// A VM name cannot be used; VM names become file names in the state directory.
    #[error("invalid vm name {}: {reason}", quoted(name))]
    InvalidVmName {
        /// The name as given.
        name: String,
        /// Which rule it breaks.
        reason: &'static str,
    },

    /// The state directory path exists but is something other than a directory.
    #[error("state directory {} exists and is not a directory", path.display())]
    StateDirNotDirectory {
        /// The state directory.
        path: PathBuf,
    },

    /// A file operation failed.
    #[error("cannot {action} {}", path.display())]
    Io {
        /// What was being done, as a verb phrase ("read record", "create state directory").
        action: &'static str,
        /// The file or directory it was done to.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// A record file was written by a newer snapctl whose format this one does not know.
    #[error(
        "record {} has version {found}; this snapctl reads up to {supported}: upgrade snapctl",
        path.display()
    )]
    RecordTooNew {
        /// The record file.
        path: PathBuf,
        /// The version written in the file.
        found: u64,
        /// The newest version this build reads ((`RECORD_VERSION` of the record module)).
        supported: u32,
    },

    /// A record file cannot be parsed: truncated, hand-edited into bad JSON, wrong types.
    ///
    /// snapctl never writes over such a file, so the user's data stays as it is.
    #[error(
        "record {} is corrupt ({problem}): fix or move it away; snapctl never overwrites it",
        path.display()
    )]
    RecordCorrupt {
        /// The record file.
        path: PathBuf,
        /// What is wrong, with the position in the file when known
        /// ("line 3, column 5: expected value").
        problem: String,
    },

    /// A record file holds the record of a different VM than its file name says.
    #[error("record {} is for vm {}, not {}", path.display(), quoted(found), quoted(expected))]
    RecordVmMismatch {
        /// The record file.
        path: PathBuf,
        /// The VM the file name (or the lock) is for.
        expected: String,
        /// The VM named inside the record.
        found: String,
    },

    /// A record breaks one of the model's invariants; see [`RecordProblem`].
    #[error("record {}: {problem}", quoted(vm))]
    InvalidRecord {
        /// The VM whose record it is.
        vm: String,
        /// The first problem found.
        problem: RecordProblem,
    },

    /// A record could not be encoded as JSON.
    #[error("cannot encode the record of vm {}", quoted(vm))]
    EncodeRecord {
        /// The VM whose record it is.
        vm: String,
        /// The encoder's error.
        #[source]
        source: serde_json::Error,
    },

    /// Another snapctl holds the VM's lock and did not release it in time.
    #[error(
        "vm {} is locked by another snapctl{}; gave up after {}",
        quoted(vm),
        match (holder, operation) {
            (Some(pid), Some(op)) => format!(" (pid {pid}, {op})"),
            (Some(pid), None) => format!(" (pid {pid})"),
            (None, _) => String::new(),
        },
        human_duration(*waited)
    )]
    Locked {
        /// The VM.
        vm: String,
        /// The process id the holder wrote into the lock file, when it could be read.
        holder: Option<u32>,
        /// The operation the holder has journaled (`commit`, …), when it has one.
        operation: Option<String>,
        /// How long this process waited.
        waited: Duration,
    },

    /// A journal entry to resolve is not in the record.
    #[error("vm {} has no journal entry {id}", quoted(vm))]
    UnknownJournalEntry {
        /// The VM.
        vm: String,
        /// The entry's id.
        id: u64,
    },

    /// QEMU's monitor is held by another client (QEMU serves one client per
    /// monitor) and no relay of a snapctl holding the VM answered. `detail`
    /// is qmp-client's account of the busy socket, shown when the holder is
    /// not known to be a snapctl.
    #[error("{}", match holder {
        Some(h) => format!(
            "QEMU's monitor {} is busy: {h} holds it and its relay does not answer; \
             try again when it is done",
            socket.display()
        ),
        None => detail.clone(),
    })]
    MonitorBusy {
        /// QEMU's monitor socket.
        socket: PathBuf,
        /// The snapctl holding the VM's lock, when one does.
        holder: Option<crate::store::Holder>,
        /// What the connection attempt found.
        detail: String,
    },

    /// Talking to QEMU failed; QEMU's own message is in the source.
    #[error(transparent)]
    Qmp(#[from] qmp_client::Error),

    /// The guest agent could not do what `--quiesce` needs.
    #[error("guest agent: {0}")]
    GuestAgent(String),

    /// An image tool (`qemu-img`) failed or is missing.
    #[error("{0}")]
    Tool(String),

    /// QEMU's graph could not be read as expected.
    #[error("{0}")]
    Graph(String),

    /// Record, QEMU and image headers disagree in a way that makes the operation unsafe;
    /// `snapctl check` names the difference.
    #[error("{0}")]
    Drift(String),

    /// The operation was refused before anything changed: what was asked is not safe or
    /// not possible on this chain (a foreign base to commit into, a branch point, nothing
    /// to merge, a job already running). The message says what to do instead.
    #[error("{0}")]
    Refused(String),

    /// A QEMU block job failed; QEMU's reason is in the message. The chain is as it was
    /// unless the message says otherwise.
    #[error("{0}")]
    JobFailed(String),

    /// A job did not finish within `--timeout` and was cancelled cleanly.
    #[error("{0}")]
    TimedOut(String),

    /// A commit was stopped (interrupted, timed out or failed) after it had begun writing
    /// into its base: the snapshots whose state lived there were removed from the record,
    /// the chain itself is unchanged. The message names them.
    #[error("{0}")]
    CutShort(String),

    /// A snapshot of that name exists already.
    #[error("vm {vm} already has a snapshot named {}", quoted(name))]
    SnapshotExists {
        /// The VM.
        vm: String,
        /// The name.
        name: String,
    },

    /// No snapshot of that name.
    #[error("vm {vm} has no snapshot named {}", quoted(name))]
    UnknownSnapshot {
        /// The VM.
        vm: String,
        /// The name.
        name: String,
    },

    /// A disk named on the command line is not one of the VM's.
    #[error("vm {vm} has no disk {}; its disks: {known}", quoted(disk))]
    UnknownDisk {
        /// The VM.
        vm: String,
        /// The disk as given.
        disk: String,
        /// The disks it has, comma-separated.
        known: String,
    },

    /// A disk was chosen that snapshots cannot cover.
    #[error("disk {disk} cannot be snapshotted: {reason}")]
    DiskNotSnapshottable {
        /// The disk.
        disk: String,
        /// Why not.
        reason: &'static str,
    },

    /// Nothing to snapshot.
    #[error("vm {vm} has no writable, non-removable disk to snapshot")]
    NoWritableDisk {
        /// The VM.
        vm: String,
    },

    /// An overlay cannot be created at that path.
    #[error("cannot create overlay {}: {reason}", path.display())]
    OverlayPath {
        /// The path.
        path: PathBuf,
        /// Why not.
        reason: &'static str,
    },

    /// The VM is not registered and the command needs it to be.
    #[error("vm {vm} is not registered: run snapctl init (or create) first")]
    UnknownVm {
        /// The VM.
        vm: String,
    },

    /// The user interrupted the operation (SIGINT/SIGTERM) at a safe point.
    #[error("interrupted; nothing was changed")]
    Interrupted,
}

/// A way in which a record breaks the model's invariants; found by `Record::validate`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordProblem {
    /// The record's version is not the one this build writes.
    #[error("version {found} is not {supported}, the version this snapctl writes")]
    UnsupportedVersion {
        /// The version in the record.
        found: u32,
        /// The version this build writes.
        supported: u32,
    },
    /// The VM name cannot be used as a file name; see `names::validate_vm_name`.
    #[error("vm name is invalid: {reason}")]
    InvalidVmName {
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A snapshot name is invalid; see `names::validate_snapshot_name`.
    #[error("snapshot name {} is invalid: {reason}", quoted(name))]
    InvalidSnapshotName {
        /// The name.
        name: String,
        /// The rule it breaks.
        reason: &'static str,
    },
    /// A path is relative; every path in the record is absolute so that it means the same
    /// whatever the working directory.
    #[error("path {} ({what}) is not absolute", path.display())]
    RelativePath {
        /// What the path is, e.g. `active image of disk vda`.
        what: String,
        /// The path.
        path: PathBuf,
    },
    /// A path is not valid UTF-8 and cannot be written to JSON.
    #[error("path {} ({what}) is not valid UTF-8, which the record cannot store", path.display())]
    NonUtf8Path {
        /// What the path is.
        what: String,
        /// The path.
        path: PathBuf,
    },
    /// Two snapshots share a name.
    #[error("snapshot {} appears more than once", quoted(name))]
    DuplicateSnapshot {
        /// The name.
        name: String,
    },
    /// A snapshot's parent is not in the record.
    #[error(
        "snapshot {} names parent {}, which is not in the record",
        quoted(snapshot),
        quoted(parent)
    )]
    UnknownParent {
        /// The snapshot.
        snapshot: String,
        /// The missing parent.
        parent: String,
    },
    /// Following parents from a snapshot comes back to it.
    #[error("snapshot {} is its own ancestor", quoted(snapshot))]
    ParentCycle {
        /// A snapshot on the cycle.
        snapshot: String,
    },
    /// The current snapshot is not in the record.
    #[error("current snapshot {} is not in the record", quoted(name))]
    UnknownCurrent {
        /// The name.
        name: String,
    },
    /// A disk's active image is not a known layer.
    #[error(
        "active image {} of disk {} is not a known layer",
        image.display(),
        quoted(disk)
    )]
    UnknownActiveImage {
        /// The disk.
        disk: String,
        /// The image.
        image: PathBuf,
    },
    /// A snapshot's frozen image is not a known layer.
    #[error(
        "snapshot {} freezes disk {} as {}, which is not a known layer",
        quoted(snapshot),
        quoted(disk),
        image.display()
    )]
    UnknownFrozenImage {
        /// The snapshot.
        snapshot: String,
        /// The disk.
        disk: String,
        /// The image.
        image: PathBuf,
    },
    /// A layer's backing image is not a known layer.
    #[error(
        "layer {} is backed by {}, which is not a known layer",
        layer.display(),
        backing.display()
    )]
    UnknownBacking {
        /// The layer.
        layer: PathBuf,
        /// Its backing image.
        backing: PathBuf,
    },
    /// Following backing images from a layer comes back to it.
    #[error("layer {} is its own backing image (a loop in the chain)", layer.display())]
    BackingCycle {
        /// A layer on the cycle.
        layer: PathBuf,
    },
    /// Two journal entries share an id.
    #[error("journal entry {id} appears more than once")]
    DuplicateJournalId {
        /// The id.
        id: u64,
    },
}

impl Error {
    /// QEMU may have carried out the last command even though we saw an error:
    /// re-read the graph before undoing anything.
    pub fn result_unknown(&self) -> bool {
        matches!(self, Error::Qmp(e) if e.result_unknown())
    }

    /// Why a job was stopped, as the start of a message saying what it left.
    pub(crate) fn stop_reason(&self) -> String {
        match self {
            Error::Interrupted => "interrupted".to_owned(),
            e => e.to_string(),
        }
    }

    /// Whether QEMU went away (its socket closed) during the operation.
    pub fn qemu_gone(&self) -> bool {
        matches!(self, Error::Qmp(e) if e.is_closed())
    }

    /// Whether QEMU's monitor was busy (held by another client).
    pub fn is_monitor_busy(&self) -> bool {
        matches!(self, Error::MonitorBusy { .. })
    }

    /// Whether the error is a lock held by another snapctl (worth retrying later).
    pub fn is_locked(&self) -> bool {
        matches!(self, Error::Locked { .. })
    }

    /// Shorthand for [`Error::Io`].
    pub(crate) fn io(action: &'static str, path: impl Into<PathBuf>, source: io::Error) -> Self {
        Error::Io {
            action,
            path: path.into(),
            source,
        }
    }
}

/// Shows a user-supplied name in a message: as is when it is plain, quoted and escaped
/// when it is empty or holds spaces, quotes or control characters that would make the
/// message ambiguous or span lines.
pub(crate) fn quoted(name: &str) -> Cow<'_, str> {
    let plain = !name.is_empty()
        && name
            .chars()
            .all(|c| !c.is_whitespace() && !c.is_control() && c != '"' && c != '\'');
    if plain {
        Cow::Borrowed(name)
    } else {
        Cow::Owned(format!("{name:?}"))
    }
}

/// Formats a wait for a message: `250ms`, `10s`, `2.5s`.
fn human_duration(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d.subsec_millis() == 0 {
        format!("{}s", d.as_secs())
    } else {
        format!("{:.1}s", d.as_secs_f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoted_leaves_plain_names_alone() {
        assert_eq!(quoted("ci1"), "ci1");
        assert_eq!(quoted("übung-2"), "übung-2");
        assert_eq!(quoted(""), "\"\"");
        assert_eq!(quoted("a b"), "\"a b\"");
        assert_eq!(quoted("a\nb"), "\"a\\nb\"");
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(human_duration(Duration::from_millis(250)), "250ms");
        assert_eq!(human_duration(Duration::from_secs(10)), "10s");
        assert_eq!(human_duration(Duration::from_millis(2500)), "2.5s");
    }

    #[test]
    fn busy_monitor_names_a_snapctl_holder_or_keeps_the_hint() {
        let foreign = Error::MonitorBusy {
            socket: "/run/vm1.sock".into(),
            holder: None,
            detail: "/run/vm1.sock accepted … (add a second -qmp)".into(),
        };
        assert_eq!(
            foreign.to_string(),
            "/run/vm1.sock accepted … (add a second -qmp)"
        );
        let ours = Error::MonitorBusy {
            socket: "/run/vm1.sock".into(),
            holder: Some(crate::store::Holder {
                pid: Some(123),
                operation: Some("commit".into()),
            }),
            detail: "/run/vm1.sock accepted … (add a second -qmp)".into(),
        };
        assert_eq!(
            ours.to_string(),
            "QEMU's monitor /run/vm1.sock is busy: snapctl (pid 123, commit) holds it and its \
             relay does not answer; try again when it is done"
        );
        assert!(ours.is_monitor_busy());
    }

    #[test]
    fn lock_message_names_the_holder() {
        let e = Error::Locked {
            vm: "ci1".into(),
            holder: Some(1234),
            operation: None,
            waited: Duration::from_secs(10),
        };
        assert_eq!(
            e.to_string(),
            "vm ci1 is locked by another snapctl (pid 1234); gave up after 10s"
        );
        let e = Error::Locked {
            vm: "ci1".into(),
            holder: Some(123),
            operation: Some("commit".into()),
            waited: Duration::from_secs(30),
        };
        assert_eq!(
            e.to_string(),
            "vm ci1 is locked by another snapctl (pid 123, commit); gave up after 30s"
        );
        let e = Error::Locked {
            vm: "ci1".into(),
            holder: None,
            operation: None,
            waited: Duration::from_millis(200),
        };
        assert_eq!(
            e.to_string(),
            "vm ci1 is locked by another snapctl; gave up after 200ms"
        );
    }
}
