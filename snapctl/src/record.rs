//! The per-VM record: what snapctl knows about a VM's disks, layers, snapshots and
//! operations in flight.
//!
//! The record is metadata; the truth is QEMU's block graph and the images' headers. It is
//! stored as one JSON document per VM (see [`crate::store`]). Its shape is versioned by
//! [`RECORD_VERSION`]: fields may be added within a version (readers ignore fields they do
//! not know), and anything that would change the meaning of existing fields bumps the
//! version, which older builds then refuse to read instead of misreading.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::{Deserialize, Serialize};

pub use crate::error::RecordProblem;
use crate::error::{Error, Result, quoted};
use crate::graph::{DiskSettings, LiveDisk, NodeMap};
use crate::names;
use crate::operation::Operation;

/// The record format this build writes, and the newest it reads.
pub const RECORD_VERSION: u32 = 1;

/// The top-level fields of a record this build knows (as its derived
/// `Deserialize` names them); any other is kept in [`Record::extra`].
fn record_fields() -> &'static [&'static str] {
    /// A deserializer that only notes the field names a struct asks for.
    struct Fields(Option<&'static [&'static str]>);
    impl<'de> serde::Deserializer<'de> for &mut Fields {
        type Error = serde::de::value::Error;
        fn deserialize_any<V: serde::de::Visitor<'de>>(
            self,
            _: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            Err(serde::de::Error::custom(
                "only a struct's field names are read",
            ))
        }
        fn deserialize_struct<V: serde::de::Visitor<'de>>(
            self,
            _: &'static str,
            fields: &'static [&'static str],
            visitor: V,
        ) -> std::result::Result<V::Value, Self::Error> {
            self.0 = Some(fields);
            self.deserialize_any(visitor)
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map
            enum identifier ignored_any
        }
    }
    static FIELDS: std::sync::OnceLock<&'static [&'static str]> = std::sync::OnceLock::new();
    FIELDS.get_or_init(|| {
        let mut probe = Fields(None);
        let _ = Record::deserialize(&mut probe);
        probe.0.expect("Record deserializes as a struct")
    })
}

/// Everything snapctl records about one VM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    /// The record format version; [`RECORD_VERSION`] for records this build writes.
    pub version: u32,
    /// The VM's name; also the record's file name in the state directory.
    pub vm: String,
    /// The QMP socket snapctl talks to, remembered from `--socket`.
    #[serde(default)]
    pub qmp_socket: Option<PathBuf>,
    /// The guest agent socket, remembered from `--qga`.
    #[serde(default)]
    pub qga_socket: Option<PathBuf>,
    /// The VM's disks by qdev id (`vda`).
    #[serde(default)]
    pub disks: BTreeMap<String, Disk>,
    /// Every image of every disk's tree, by absolute path.
    #[serde(default, deserialize_with = "sorted_map")]
    pub layers: BTreeMap<PathBuf, Layer>,
    /// The snapshots, in creation order.
    #[serde(default)]
    pub snapshots: Vec<Snapshot>,
    /// The snapshot the running state descends from; `None` before the first snapshot.
    #[serde(default)]
    pub current: Option<String>,
    /// Images of this VM that other VMs' chains stand on (clones), by image:
    /// the VMs. A pinned image is never written, merged away or removed.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub pins: BTreeMap<PathBuf, BTreeSet<String>>,
    /// A backup in progress (`backup`): its temporary snapshot and the images it
    /// writes. Left over after an interruption, the next command rolls it back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupState>,
    /// This VM was cloned from another VM's snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<CloneOrigin>,
    /// A checkpoint reverted while QEMU was stopped: its disks are in place and
    /// its memory state is still to load into the next QEMU (`revert` again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_memory: Option<String>,
    /// Which file each node of the disks' chains has open in the running
    /// QEMU, as the last operation left them: lets a merge skip QEMU's
    /// description of every layer. Cleared when an operation begins, set
    /// again when one finishes with QEMU running; valid only in that QEMU
    /// process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_map: Option<NodeMap>,
    /// Operations in flight: written before an operation's first change to QEMU or to
    /// files, removed when it is done. An entry left over means a run was interrupted and
    /// the next run must finish or roll back its steps.
    #[serde(default)]
    pub journal: Vec<JournalEntry>,
    /// Fields this build does not know (written by a newer snapctl within the
    /// same version), kept so that a rewrite does not drop them. Filled by
    /// [`Record::parse`] from the top level it reads anyway: a flattened
    /// field would make serde buffer the whole record before decoding it.
    #[serde(flatten, skip_deserializing)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// One disk of the VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    /// The image QEMU writes: the leaf of the disk's chain.
    pub active: PathBuf,
    /// How the guest sees the disk, so that the VM can be restarted on the current chain
    /// with the same device (`qemu-args`).
    pub device: DeviceBinding,
    /// The options the disk's nodes were opened with, read from QEMU at
    /// registration, as dotted `-blockdev` keys: the format node's
    /// (`detect-zeroes`, `discard`, `cache.direct`, `cache.no-flush`) and, under
    /// `file.`, its protocol node's. `qemu-args` gives them to every layer,
    /// the overlays snapctl adds later included, as QEMU carries a node's
    /// options over to the overlays it opens on it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_options: BTreeMap<String, serde_json::Value>,
}

/// The `-device` the disk is attached through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceBinding {
    /// The device driver, e.g. `virtio-blk-pci`.
    pub driver: String,
    /// Other `-device` properties worth keeping (`serial`, `bootindex`, …), as
    /// `-device` values, read at registration (see
    /// [`crate::graph::DEVICE_PROPERTIES`]); may be empty.
    #[serde(default)]
    pub extra: BTreeMap<String, String>,
}

/// One image in a disk's tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer {
    /// The image format, e.g. `qcow2` or `raw`.
    pub format: String,
    /// The layer below this one (absolute path), `None` for a base image.
    #[serde(default)]
    pub backing: Option<PathBuf>,
    /// The backing file name exactly as the image header spells it, which may be
    /// relative or a `json:{…}` blob; kept so `check` can report header drift.
    #[serde(default)]
    pub backing_string: Option<String>,
    /// Whether snapctl created this image. Images it found (a base, a shared template)
    /// are foreign and are never written or removed.
    pub owned: bool,
    /// The guest-visible size in bytes, when known.
    #[serde(default)]
    pub virtual_size: Option<u64>,
}

/// One snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Snapshot {
    /// The snapshot's name, unique within the record.
    pub name: String,
    /// The snapshot the VM state descended from when this one was taken.
    #[serde(default)]
    pub parent: Option<String>,
    /// When the snapshot was taken.
    pub created: Timestamp,
    /// The user's description.
    #[serde(default)]
    pub description: Option<String>,
    /// What the snapshot captured.
    pub kind: SnapshotKind,
    /// Per disk (qdev id), the image that holds the disk as of this snapshot.
    #[serde(default)]
    pub disks: SnapshotDisks,
    /// A checkpoint's memory and device state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryFile>,
    /// An internal snapshot: the disk whose image holds the memory state (each
    /// disk's image, in `disks`, holds that disk's state under the name in
    /// `tag`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub internal: Option<InternalState>,
    /// Fields this build does not know, kept across rewrites.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

/// Read field by field, the fields this build does not know going to
/// `extra`: what `#[serde(flatten)]` would do, without buffering every
/// snapshot of a large record before decoding it.
impl<'de> Deserialize<'de> for Snapshot {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        struct Fields;
        impl<'de> serde::de::Visitor<'de> for Fields {
            type Value = Snapshot;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a snapshot")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<Snapshot, A::Error> {
                use serde::de::Error;
                fn once<T, E: Error>(
                    slot: &mut Option<T>,
                    value: T,
                    field: &'static str,
                ) -> std::result::Result<(), E> {
                    match slot.replace(value) {
                        Some(_) => Err(E::duplicate_field(field)),
                        None => Ok(()),
                    }
                }
                let (mut name, mut parent, mut created, mut description) = (None, None, None, None);
                let (mut kind, mut disks, mut memory, mut internal) = (None, None, None, None);
                let mut extra = BTreeMap::new();
                while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                    match &*key {
                        "name" => once(&mut name, map.next_value()?, "name")?,
                        "parent" => once(&mut parent, map.next_value()?, "parent")?,
                        "created" => once(&mut created, map.next_value()?, "created")?,
                        "description" => once(&mut description, map.next_value()?, "description")?,
                        "kind" => once(&mut kind, map.next_value()?, "kind")?,
                        "disks" => once(&mut disks, map.next_value()?, "disks")?,
                        "memory" => once(&mut memory, map.next_value()?, "memory")?,
                        "internal" => once(&mut internal, map.next_value()?, "internal")?,
                        _ => {
                            extra.insert(key.into_owned(), map.next_value()?);
                        }
                    }
                }
                Ok(Snapshot {
                    name: name.ok_or_else(|| A::Error::missing_field("name"))?,
                    parent: parent.flatten(),
                    created: created.ok_or_else(|| A::Error::missing_field("created"))?,
                    description: description.flatten(),
                    kind: kind.ok_or_else(|| A::Error::missing_field("kind"))?,
                    disks: disks.unwrap_or_default(),
                    memory: memory.flatten(),
                    internal: internal.flatten(),
                    extra,
                })
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

/// A backup in progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackupState {
    /// The temporary snapshot the copies are taken from.
    pub snapshot: String,
    /// The standalone images being written.
    pub outputs: Vec<PathBuf>,
}

/// Where a clone came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CloneOrigin {
    pub vm: String,
    pub snapshot: String,
}

/// Where a checkpoint's memory and device state is: a qcow2 container snapctl
/// created, holding the state as QEMU's `snapshot-save` wrote it under `tag`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryFile {
    pub path: PathBuf,
    /// The state's name inside the container: the snapshot's name when it
    /// was taken (a later rename leaves it).
    pub tag: String,
}

/// Where an internal snapshot lives inside its images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InternalState {
    /// Its name inside the images (the snapshot's name when it was taken).
    pub tag: String,
    /// The disk whose image holds the memory state too.
    pub vmstate_disk: String,
}

/// What a snapshot captured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SnapshotKind {
    /// Disk contents only; reverting boots (resets) the guest.
    DiskOnly,
    /// Disk contents plus the VM's memory and device state at the same instant,
    /// the state in a file of its own ([`Snapshot::memory`]): a revert resumes
    /// the guest where it was instead of rebooting it.
    #[serde(rename = "checkpoint", alias = "memory")]
    Checkpoint,
    /// A snapshot stored inside a qcow2 image (`savevm`).
    Internal,
}

/// One disk of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotDisk {
    /// The frozen image: read-only since the snapshot, it holds the disk as of it.
    pub image: PathBuf,
}

/// A snapshot's disks by qdev id, in id order: a map kept as a sorted
/// vector, because a snapshot has one or a few disks and a `BTreeMap` would
/// allocate a node of eleven entries for each snapshot (half the memory of a
/// record with thousands of snapshots).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotDisks(Vec<(String, SnapshotDisk)>);

impl SnapshotDisks {
    fn position(&self, disk: &str) -> std::result::Result<usize, usize> {
        self.0.binary_search_by(|(d, _)| d.as_str().cmp(disk))
    }

    /// The disk `disk`'s entry.
    pub fn get(&self, disk: &str) -> Option<&SnapshotDisk> {
        self.position(disk).ok().map(|i| &self.0[i].1)
    }

    pub fn get_mut(&mut self, disk: &str) -> Option<&mut SnapshotDisk> {
        self.position(disk).ok().map(|i| &mut self.0[i].1)
    }

    pub fn contains_key(&self, disk: &str) -> bool {
        self.position(disk).is_ok()
    }

    /// Sets `disk`'s entry; returns the one it replaces.
    pub fn insert(&mut self, disk: String, entry: SnapshotDisk) -> Option<SnapshotDisk> {
        match self.position(&disk) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, entry)),
            Err(i) => {
                self.0.insert(i, (disk, entry));
                None
            }
        }
    }

    pub fn remove(&mut self, disk: &str) -> Option<SnapshotDisk> {
        self.position(disk).ok().map(|i| self.0.remove(i).1)
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries in disk order.
    pub fn iter(
        &self,
    ) -> impl DoubleEndedIterator<Item = (&String, &SnapshotDisk)> + ExactSizeIterator {
        self.0.iter().map(|(d, e)| (d, e))
    }

    pub fn keys(&self) -> impl DoubleEndedIterator<Item = &String> + ExactSizeIterator {
        self.0.iter().map(|(d, _)| d)
    }

    pub fn values(&self) -> impl DoubleEndedIterator<Item = &SnapshotDisk> + ExactSizeIterator {
        self.0.iter().map(|(_, e)| e)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut SnapshotDisk> {
        self.0.iter_mut().map(|(_, e)| e)
    }
}

impl FromIterator<(String, SnapshotDisk)> for SnapshotDisks {
    fn from_iter<I: IntoIterator<Item = (String, SnapshotDisk)>>(entries: I) -> Self {
        let mut disks = SnapshotDisks::default();
        for (disk, entry) in entries {
            disks.insert(disk, entry);
        }
        disks
    }
}

impl<const N: usize> From<[(String, SnapshotDisk); N]> for SnapshotDisks {
    fn from(entries: [(String, SnapshotDisk); N]) -> Self {
        entries.into_iter().collect()
    }
}

impl std::ops::Index<&str> for SnapshotDisks {
    type Output = SnapshotDisk;
    /// The disk's entry; panics when the snapshot has no such disk.
    fn index(&self, disk: &str) -> &SnapshotDisk {
        self.get(disk)
            .unwrap_or_else(|| panic!("the snapshot has no disk {disk}"))
    }
}

impl<'a> IntoIterator for &'a SnapshotDisks {
    type Item = (&'a String, &'a SnapshotDisk);
    type IntoIter = std::iter::Map<
        std::slice::Iter<'a, (String, SnapshotDisk)>,
        fn(&'a (String, SnapshotDisk)) -> (&'a String, &'a SnapshotDisk),
    >;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter().map(|(d, e)| (d, e))
    }
}

impl Serialize for SnapshotDisks {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        serializer.collect_map(self.iter())
    }
}

impl<'de> Deserialize<'de> for SnapshotDisks {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        struct Entries;
        impl<'de> serde::de::Visitor<'de> for Entries {
            type Value = SnapshotDisks;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of disks")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> std::result::Result<SnapshotDisks, A::Error> {
                let mut disks = SnapshotDisks(Vec::with_capacity(map.size_hint().unwrap_or(1)));
                while let Some((disk, entry)) = map.next_entry()? {
                    disks.insert(disk, entry);
                }
                Ok(disks)
            }
        }
        deserializer.deserialize_map(Entries)
    }
}

/// An operation in flight.
///
/// On disk: `{"id", "op", "started", "pid", "detail"}`, where `op` names the
/// operation (`create`, `revert`, …) and `detail` holds its typed plan. An
/// entry whose detail this build cannot read is kept as
/// [`Operation::Unreadable`]; an operation that cannot be encoded fails the
/// save instead of being written as `null`.
#[derive(Debug, Clone, PartialEq)]
pub struct JournalEntry {
    /// Identifies the entry among those in flight.
    pub id: u64,
    /// When the operation began.
    pub started: Timestamp,
    /// The process that ran it, to tell a crashed run from one still going.
    pub pid: u32,
    /// What the operation does (files to create, nodes to add, jobs to run), so the
    /// next run can finish or undo it.
    pub operation: Operation,
}

/// The journal entry as written in the record file.
#[derive(Serialize, Deserialize)]
struct JournalEntryOnDisk {
    id: u64,
    op: String,
    started: Timestamp,
    pid: u32,
    #[serde(default)]
    detail: serde_json::Value,
}

impl Serialize for JournalEntry {
    fn serialize<S: serde::Serializer>(
        &self,
        serializer: S,
    ) -> std::result::Result<S::Ok, S::Error> {
        let detail = self.operation.detail().map_err(serde::ser::Error::custom)?;
        JournalEntryOnDisk {
            id: self.id,
            op: self.operation.name().to_owned(),
            started: self.started,
            pid: self.pid,
            detail,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for JournalEntry {
    fn deserialize<D: serde::Deserializer<'de>>(
        deserializer: D,
    ) -> std::result::Result<Self, D::Error> {
        let raw = JournalEntryOnDisk::deserialize(deserializer)?;
        Ok(JournalEntry {
            id: raw.id,
            started: raw.started,
            pid: raw.pid,
            operation: Operation::from_parts(&raw.op, raw.detail),
        })
    }
}

impl Record {
    /// An empty record for `vm`: no disks, layers or snapshots yet.
    pub fn new(vm: impl Into<String>) -> Self {
        Record {
            version: RECORD_VERSION,
            vm: vm.into(),
            qmp_socket: None,
            qga_socket: None,
            disks: BTreeMap::new(),
            layers: BTreeMap::new(),
            snapshots: Vec::new(),
            current: None,
            pins: BTreeMap::new(),
            clone_of: None,
            backup: None,
            pending_memory: None,
            node_map: None,
            journal: Vec::new(),
            extra: BTreeMap::new(),
        }
    }

    /// Reads a record from the bytes of the file at `path` (named in errors).
    ///
    /// The `version` field is read first, on its own, so that a record written by a newer
    /// snapctl is refused with [`Error::RecordTooNew`] even when its shape has changed
    /// beyond what this build can parse. Fields this build does not know are ignored.
    /// Bad JSON or wrong types give [`Error::RecordCorrupt`] with the position. The
    /// result is not validated; see [`Record::validate`].
    pub fn parse(path: &Path, bytes: &[u8]) -> Result<Record> {
        let corrupt = |problem: String| Error::RecordCorrupt {
            path: path.to_owned(),
            problem,
        };
        // First the top level, each field's JSON text left unparsed (cheap at
        // any size): the version decides whether this build may read on.
        let top: BTreeMap<String, &serde_json::value::RawValue> = serde_json::from_slice(bytes)
            .map_err(|e| match e.classify() {
                serde_json::error::Category::Data => corrupt("it is not a JSON object".into()),
                _ => corrupt(describe_json_error(&e)),
            })?;
        let version = top
            .get("version")
            .map(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).ok());
        match version.map(|v| v.as_ref().and_then(serde_json::Value::as_u64)) {
            None => return Err(corrupt("it has no `version` field".into())),
            Some(None | Some(0)) => {
                return Err(corrupt("`version` is not a positive integer".into()));
            }
            Some(Some(found)) if found > u64::from(RECORD_VERSION) => {
                return Err(Error::RecordTooNew {
                    path: path.to_owned(),
                    found,
                    supported: RECORD_VERSION,
                });
            }
            Some(Some(_)) => {}
        }
        // Then the whole record from the bytes, so errors carry line and column.
        let mut record: Record =
            serde_json::from_slice(bytes).map_err(|e| corrupt(describe_json_error(&e)))?;
        for (key, raw) in top
            .into_iter()
            .filter(|(k, _)| !record_fields().contains(&k.as_str()))
        {
            let value = serde_json::from_str(raw.get()).map_err(|e| corrupt(e.to_string()))?;
            record.extra.insert(key, value);
        }
        Ok(record)
    }

    /// The record as the store writes it: pretty JSON with a trailing newline.
    pub fn to_json(&self) -> Result<String> {
        let mut json =
            serde_json::to_string_pretty(self).map_err(|source| Error::EncodeRecord {
                vm: self.vm.clone(),
                source,
            })?;
        json.push('\n');
        Ok(json)
    }

    /// Checks the model's invariants and names the first one broken.
    ///
    /// A valid record has: the current version and a usable VM name; only absolute, UTF-8
    /// paths; valid, unique snapshot names; every snapshot parent and the current snapshot
    /// in the record, with no loop among parents; every active and frozen image a known
    /// layer; every layer's backing a known layer, with no loop among backings; unique
    /// journal ids. The store refuses to save a record that is not valid, so later code
    /// can rely on these.
    pub fn validate(&self) -> Result<()> {
        self.first_problem()
            .map_or(Ok(()), |problem| Err(self.invalid(problem)))
    }

    fn invalid(&self, problem: RecordProblem) -> Error {
        Error::InvalidRecord {
            vm: self.vm.clone(),
            problem,
        }
    }

    fn first_problem(&self) -> Option<RecordProblem> {
        if self.version != RECORD_VERSION {
            return Some(RecordProblem::UnsupportedVersion {
                found: self.version,
                supported: RECORD_VERSION,
            });
        }
        if let Some(reason) = names::vm_name_problem(&self.vm) {
            return Some(RecordProblem::InvalidVmName { reason });
        }
        if let Some(problem) = self.path_problem() {
            return Some(problem);
        }
        self.snapshot_problem()
            .or_else(|| self.layer_problem())
            .or_else(|| {
                let mut ids = HashSet::new();
                self.journal
                    .iter()
                    .find(|entry| !ids.insert(entry.id))
                    .map(|entry| RecordProblem::DuplicateJournalId { id: entry.id })
            })
    }

    /// Every path in the record with what it is, in a fixed order.
    fn paths(&self) -> impl Iterator<Item = (String, &Path)> {
        let sockets = [
            ("QMP socket", &self.qmp_socket),
            ("guest agent socket", &self.qga_socket),
        ]
        .into_iter()
        .filter_map(|(what, path)| path.as_deref().map(|p| (what.to_owned(), p)));
        let actives = self.disks.iter().map(|(id, disk)| {
            (
                format!("active image of disk {}", quoted(id)),
                disk.active.as_path(),
            )
        });
        let layers = self.layers.iter().flat_map(|(path, layer)| {
            std::iter::once(("layer".to_owned(), path.as_path())).chain(
                layer
                    .backing
                    .as_deref()
                    .map(|b| (format!("backing of {}", path.display()), b)),
            )
        });
        let frozen = self.snapshots.iter().flat_map(|s| {
            s.disks.iter().map(move |(id, disk)| {
                (
                    format!(
                        "frozen image of disk {} in snapshot {}",
                        quoted(id),
                        quoted(&s.name)
                    ),
                    disk.image.as_path(),
                )
            })
        });
        let memory = self.snapshots.iter().filter_map(|s| {
            s.memory.as_ref().map(|m| {
                (
                    format!("memory state of snapshot {}", quoted(&s.name)),
                    &*m.path,
                )
            })
        });
        sockets
            .chain(actives)
            .chain(layers)
            .chain(frozen)
            .chain(memory)
    }

    fn path_problem(&self) -> Option<RecordProblem> {
        self.paths().find_map(|(what, path)| {
            if !path.is_absolute() {
                Some(RecordProblem::RelativePath {
                    what,
                    path: path.to_owned(),
                })
            } else if path.to_str().is_none() {
                Some(RecordProblem::NonUtf8Path {
                    what,
                    path: path.to_owned(),
                })
            } else {
                None
            }
        })
    }

    fn snapshot_problem(&self) -> Option<RecordProblem> {
        let mut parents: HashMap<&str, Option<&str>> = HashMap::new();
        for s in &self.snapshots {
            if let Some(reason) = names::snapshot_name_problem(&s.name) {
                return Some(RecordProblem::InvalidSnapshotName {
                    name: s.name.clone(),
                    reason,
                });
            }
            if parents.insert(&s.name, s.parent.as_deref()).is_some() {
                return Some(RecordProblem::DuplicateSnapshot {
                    name: s.name.clone(),
                });
            }
        }
        for s in &self.snapshots {
            if let Some(parent) = &s.parent
                && !parents.contains_key(parent.as_str())
            {
                return Some(RecordProblem::UnknownParent {
                    snapshot: s.name.clone(),
                    parent: parent.clone(),
                });
            }
        }
        let names = self.snapshots.iter().map(|s| s.name.as_str());
        if let Some(on_cycle) = first_cycle(names, |n| parents[n]) {
            return Some(RecordProblem::ParentCycle {
                snapshot: on_cycle.to_owned(),
            });
        }
        if let Some(current) = &self.current
            && !parents.contains_key(current.as_str())
        {
            return Some(RecordProblem::UnknownCurrent {
                name: current.clone(),
            });
        }
        None
    }

    fn layer_problem(&self) -> Option<RecordProblem> {
        // Looked up by the paths' bytes: comparing paths component by
        // component is what made validating a large record slow.
        let backing: HashMap<&[u8], Option<&[u8]>> = self
            .layers
            .iter()
            .map(|(path, l)| (bytes(path), l.backing.as_deref().map(bytes)))
            .collect();
        for (id, disk) in &self.disks {
            if !backing.contains_key(bytes(&disk.active)) {
                return Some(RecordProblem::UnknownActiveImage {
                    disk: id.clone(),
                    image: disk.active.clone(),
                });
            }
        }
        for s in &self.snapshots {
            for (id, disk) in &s.disks {
                if !backing.contains_key(bytes(&disk.image)) {
                    return Some(RecordProblem::UnknownFrozenImage {
                        snapshot: s.name.clone(),
                        disk: id.clone(),
                        image: disk.image.clone(),
                    });
                }
            }
        }
        for (path, layer) in &self.layers {
            if let Some(b) = &layer.backing
                && !backing.contains_key(bytes(b))
            {
                return Some(RecordProblem::UnknownBacking {
                    layer: path.clone(),
                    backing: b.clone(),
                });
            }
        }
        let paths = self.layers.keys().map(|p| bytes(p));
        if let Some(on_cycle) = first_cycle(paths, |p| backing.get(p).copied().flatten()) {
            return Some(RecordProblem::BackingCycle {
                layer: PathBuf::from(std::ffi::OsStr::from_bytes(on_cycle)),
            });
        }
        None
    }

    /// The snapshot named `name`.
    pub fn snapshot(&self, name: &str) -> Option<&Snapshot> {
        self.snapshots.iter().find(|s| s.name == name)
    }

    /// The snapshot named `name`, or [`Error::UnknownSnapshot`].
    pub fn snapshot_named(&self, name: &str) -> Result<&Snapshot> {
        self.snapshot(name).ok_or_else(|| Error::UnknownSnapshot {
            vm: self.vm.clone(),
            name: name.to_owned(),
        })
    }

    /// The snapshots whose parent is `name`, in creation order: the branches taken from
    /// it.
    pub fn children(&self, name: &str) -> Vec<&Snapshot> {
        self.snapshots
            .iter()
            .filter(|s| s.parent.as_deref() == Some(name))
            .collect()
    }

    /// Every snapshot's children, in creation order, by parent name: what
    /// [`Record::children`] gives for one snapshot, for all of them in one
    /// pass (a listing of many snapshots).
    pub fn children_by_parent(&self) -> HashMap<&str, Vec<&Snapshot>> {
        let mut children: HashMap<&str, Vec<&Snapshot>> = HashMap::new();
        for s in &self.snapshots {
            if let Some(parent) = &s.parent {
                children.entry(parent.as_str()).or_default().push(s);
            }
        }
        children
    }

    /// The recorded chain of disk `disk`: its active image first, then each backing
    /// image down to the base. Empty when the disk is unknown.
    pub fn chain(&self, disk: &str) -> Vec<&Path> {
        self.disks
            .get(disk)
            .map(|d| self.chain_from(&d.active))
            .unwrap_or_default()
    }

    /// The chain below `image`: `image` itself, then each backing image down to the base.
    ///
    /// Stops at an image that is not a known layer, and at a loop (which a valid record
    /// does not have), so it always ends.
    pub fn chain_from<'a>(&'a self, image: &'a Path) -> Vec<&'a Path> {
        let mut chain = vec![image];
        let mut seen = HashSet::from([image]);
        let mut at = image;
        while let Some(next) = self.backing_of(at) {
            if !seen.insert(next) {
                break;
            }
            chain.push(next);
            at = next;
        }
        chain
    }

    /// The layers something depends on: every image in a disk's current chain or below a
    /// snapshot's frozen image. A layer outside this set serves nothing and is removable
    /// (if snapctl owns it).
    pub fn layers_needed(&self) -> BTreeSet<&Path> {
        self.needed().into_values().collect()
    }

    /// [`Record::layers_needed`] by the paths' bytes. Each chain is walked down
    /// only to the first layer already reached: thousands of snapshots on
    /// one deep chain cost one walk of it, not one each.
    fn needed(&self) -> HashMap<&[u8], &Path> {
        let tops = self
            .disks
            .values()
            .map(|d| d.active.as_path())
            .chain(
                self.snapshots
                    .iter()
                    .flat_map(|s| s.disks.values().map(|d| d.image.as_path())),
            )
            .chain(self.pins.keys().map(PathBuf::as_path));
        let mut needed = HashMap::new();
        for top in tops {
            let mut at = Some(top);
            while let Some(layer) = at {
                if needed.insert(bytes(layer), layer).is_some() {
                    break;
                }
                at = self.backing_of(layer);
            }
        }
        needed
    }

    /// The snapshots whose frozen image (of any disk) is `image`, in creation order.
    pub fn snapshots_holding(&self, image: &Path) -> Vec<&str> {
        self.snapshots
            .iter()
            .filter(|s| s.disks.values().any(|d| d.image == image))
            .map(|s| s.name.as_str())
            .collect()
    }

    /// The VMs (clones) whose chains stand on `image`.
    pub fn pinned_by(&self, image: &Path) -> Vec<&str> {
        self.pins
            .get(image)
            .map(|vms| vms.iter().map(String::as_str).collect())
            .unwrap_or_default()
    }

    /// Marks `image` as one `vm`'s chain stands on.
    pub fn pin(&mut self, image: &Path, vm: &str) {
        self.pins
            .entry(image.to_owned())
            .or_default()
            .insert(vm.to_owned());
    }

    /// Drops every pin of `vm` (forgotten); returns whether any was there.
    pub fn unpin(&mut self, vm: &str) -> bool {
        let mut found = false;
        for vms in self.pins.values_mut() {
            found |= vms.remove(vm);
        }
        self.pins.retain(|_, vms| !vms.is_empty());
        found
    }

    /// The internal snapshots that live inside `image`: it is never merged
    /// away or removed while it holds one.
    pub fn internal_snapshots_in(&self, image: &Path) -> Vec<&str> {
        self.snapshots
            .iter()
            .filter(|s| s.internal.is_some() && s.disks.values().any(|d| d.image == image))
            .map(|s| s.name.as_str())
            .collect()
    }

    /// The layers directly backed by `image`. More than one means the image is shared by
    /// branches, and must not be written.
    pub fn dependents(&self, image: &Path) -> Vec<&Path> {
        self.layers
            .iter()
            .filter(|(_, layer)| layer.backing.as_deref() == Some(image))
            .map(|(path, _)| path.as_path())
            .collect()
    }

    /// The recorded backing of `image`, as the record's own path.
    fn backing_of(&self, image: &Path) -> Option<&Path> {
        self.layers.get(image)?.backing.as_deref()
    }

    /// Whether snapctl created `image` (and may write or remove it).
    pub fn owns(&self, image: &Path) -> bool {
        self.layers.get(image).is_some_and(|l| l.owned)
    }

    /// The recorded format of `image` (`qcow2` when it is not a known layer).
    pub fn format_of(&self, image: &Path) -> &str {
        self.layers
            .get(image)
            .map_or("qcow2", |l| l.format.as_str())
    }

    // Changes. Every change an operation makes to a record is one of these, so
    // that create, revert, delete, commit and pull (and their recovery) agree
    // on what a change means.

    /// Records a new owned qcow2 overlay on `frozen` and makes it `disk`'s
    /// active image.
    pub fn add_overlay(&mut self, disk: &str, overlay: &Path, frozen: &Path, virtual_size: u64) {
        self.layers.insert(
            overlay.to_owned(),
            Layer {
                format: "qcow2".into(),
                backing: Some(frozen.to_owned()),
                backing_string: Some(frozen.display().to_string()),
                owned: true,
                virtual_size: Some(virtual_size),
            },
        );
        if let Some(d) = self.disks.get_mut(disk) {
            d.active = overlay.to_owned();
        }
    }

    /// Renames snapshot `old` to `new` (its children and the current state
    /// follow; image files keep their names).
    pub fn rename_snapshot(&mut self, old: &str, new: &str) -> Result<()> {
        names::validate_snapshot_name(new)?;
        self.snapshot_named(old)?;
        if self.snapshot(new).is_some() {
            return Err(Error::SnapshotExists {
                vm: self.vm.clone(),
                name: new.to_owned(),
            });
        }
        for s in &mut self.snapshots {
            if s.name == old {
                s.name = new.to_owned();
            }
            if s.parent.as_deref() == Some(old) {
                s.parent = Some(new.to_owned());
            }
        }
        if self.current.as_deref() == Some(old) {
            self.current = Some(new.to_owned());
        }
        Ok(())
    }

    /// Sets snapshot `name`'s description (`None` removes it).
    pub fn describe_snapshot(&mut self, name: &str, description: Option<String>) -> Result<()> {
        self.snapshot_named(name)?;
        if let Some(s) = self.snapshots.iter_mut().find(|s| s.name == name) {
            s.description = description;
        }
        Ok(())
    }

    /// Drops snapshot `name`: its children now descend from its parent, and so
    /// does the current state if it descended from `name`.
    pub fn remove_snapshot(&mut self, name: &str) {
        let parent = self.snapshot(name).and_then(|s| s.parent.clone());
        for s in &mut self.snapshots {
            if s.parent.as_deref() == Some(name) {
                s.parent = parent.clone();
            }
        }
        if self.current.as_deref() == Some(name) {
            self.current = parent;
        }
        if self.pending_memory.as_deref() == Some(name) {
            self.pending_memory = None;
        }
        self.snapshots.retain(|s| s.name != name);
    }

    /// After `top` was committed into `base`: whatever stood on `top` (layers,
    /// snapshots, active images) now stands on `base`. `top` leaves every chain;
    /// [`Record::prune`] then drops it.
    pub fn relink_after_commit(&mut self, top: &Path, base: &Path) {
        for layer in self.layers.values_mut() {
            if layer.backing.as_deref() == Some(top) {
                layer.backing = Some(base.to_owned());
                layer.backing_string = Some(base.display().to_string());
            }
        }
        for s in &mut self.snapshots {
            for sd in s.disks.values_mut() {
                if sd.image == top {
                    sd.image = base.to_owned();
                }
            }
        }
        for disk in self.disks.values_mut() {
            if disk.active == top {
                disk.active = base.to_owned();
            }
        }
    }

    /// After a stream into `into`: it now stands directly on `below` (`None`:
    /// on nothing); the layers it skipped keep their content.
    pub fn relink_after_stream(&mut self, into: &Path, below: Option<&Path>) {
        if let Some(layer) = self.layers.get_mut(into) {
            layer.backing_string = below.map(|b| b.display().to_string());
            layer.backing = below.map(Path::to_owned);
        }
    }

    /// Drops the layers nothing needs any more; returns the owned ones' files
    /// (to delete once nothing has them open). Foreign files are never returned.
    pub fn prune(&mut self) -> Vec<PathBuf> {
        let needed = self.needed();
        let unneeded: Vec<PathBuf> = self
            .layers
            .keys()
            .filter(|p| !needed.contains_key(bytes(p)))
            .cloned()
            .collect();
        let mut files = Vec::new();
        for path in unneeded {
            if let Some(layer) = self.layers.remove(&path)
                && layer.owned
            {
                files.push(path);
            }
        }
        files
    }

    /// Records the layers of a live chain that the record does not know, as
    /// foreign. Layers the record knows are left as they are.
    pub fn adopt_chain(&mut self, disk: &LiveDisk) {
        for (i, layer) in disk.chain.iter().enumerate() {
            self.layers
                .entry(layer.filename.clone())
                .or_insert_with(|| Layer {
                    format: layer.format.clone(),
                    backing: disk.chain.get(i + 1).map(|b| b.filename.clone()),
                    backing_string: layer.backing_string.clone(),
                    owned: false,
                    virtual_size: Some(layer.virtual_size),
                });
        }
    }

    /// Adds a live disk the record does not know yet, with its chain as foreign
    /// layers, attached through `driver` (`init`, and the first `create`).
    pub fn register_disk(&mut self, disk: &LiveDisk, driver: &str) {
        self.register_disk_with(disk, driver, &DiskSettings::default());
    }

    /// [`Record::register_disk`] keeping the device properties and node
    /// options QEMU reported (`qemu-args` restarts the disk with them).
    pub fn register_disk_with(&mut self, disk: &LiveDisk, driver: &str, settings: &DiskSettings) {
        if self.disks.contains_key(&disk.id) || disk.chain.is_empty() || disk.anonymous {
            return;
        }
        self.adopt_chain(disk);
        self.disks.insert(
            disk.id.clone(),
            Disk {
                active: disk.chain[0].filename.clone(),
                device: DeviceBinding {
                    driver: driver.to_owned(),
                    extra: settings.device.clone(),
                },
                node_options: settings.node_options.clone(),
            },
        );
    }
}

/// Walks `next` from each start in turn and returns a node on the first loop
/// found. Nodes already walked without finding a loop are not walked again,
/// so the whole check is linear in the number of nodes, not quadratic (a
/// record with thousands of snapshots validates in milliseconds).
/// A JSON object read into a `BTreeMap` built from its entries at once
/// rather than one insertion at a time: the store writes maps in key order,
/// so the entries need a single pass of comparisons, not one search each
/// (paths compare component by component, which made reading a record with
/// thousands of layers slow). A key given twice keeps its last value, as
/// insertion would.
fn sorted_map<'de, D, K, V>(deserializer: D) -> std::result::Result<BTreeMap<K, V>, D::Error>
where
    D: serde::Deserializer<'de>,
    K: Deserialize<'de> + Ord,
    V: Deserialize<'de>,
{
    struct Entries<K, V>(std::marker::PhantomData<(K, V)>);
    impl<'de, K: Deserialize<'de> + Ord, V: Deserialize<'de>> serde::de::Visitor<'de>
        for Entries<K, V>
    {
        type Value = BTreeMap<K, V>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a map")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut map: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(0));
            while let Some(entry) = map.next_entry()? {
                entries.push(entry);
            }
            Ok(entries.into_iter().collect())
        }
    }
    deserializer.deserialize_map(Entries(std::marker::PhantomData))
}

/// A path's bytes: what record lookups that must be fast compare.
fn bytes(path: &Path) -> &[u8] {
    path.as_os_str().as_bytes()
}

fn first_cycle<'a, T>(
    starts: impl IntoIterator<Item = &'a T>,
    next: impl Fn(&'a T) -> Option<&'a T>,
) -> Option<&'a T>
where
    T: ?Sized + Eq + std::hash::Hash + 'a,
{
    let mut acyclic: HashSet<&'a T> = HashSet::new();
    for start in starts {
        let mut path = HashSet::new();
        let mut at = Some(start);
        while let Some(node) = at {
            if acyclic.contains(node) {
                break;
            }
            if !path.insert(node) {
                return Some(node);
            }
            at = next(node);
        }
        acyclic.extend(path);
    }
    None
}

/// Describes a JSON error as `line 3, column 5: <what>` without repeating the position
/// that serde_json appends to its message.
fn describe_json_error(e: &serde_json::Error) -> String {
    let message = e.to_string();
    if e.line() == 0 {
        return message;
    }
    let suffix = format!(" at line {} column {}", e.line(), e.column());
    let what = message.strip_suffix(&suffix).unwrap_or(&message);
    format!("line {}, column {}: {what}", e.line(), e.column())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(backing: Option<&str>, owned: bool) -> Layer {
        Layer {
            format: "qcow2".into(),
            backing: backing.map(PathBuf::from),
            backing_string: backing.map(String::from),
            owned,
            virtual_size: Some(1 << 30),
        }
    }

    fn snapshot(name: &str, parent: Option<&str>, image: &str) -> Snapshot {
        Snapshot {
            name: name.into(),
            parent: parent.map(String::from),
            created: "2026-11-23T12:00:00Z".parse().unwrap(),
            description: None,
            kind: SnapshotKind::DiskOnly,
            disks: SnapshotDisks::from([(
                "vda".to_owned(),
                SnapshotDisk {
                    image: image.into(),
                },
            )]),
            memory: None,
            internal: None,
            extra: BTreeMap::new(),
        }
    }

    /// The example of DESIGN.md: s1 froze base, s2 froze vda.s1, and after a revert to s1
    /// a second branch vda.r1 grows on base, now active.
    pub(crate) fn example() -> Record {
        let mut rec = Record::new("ci1");
        rec.qmp_socket = Some("/run/ci1/qmp.sock".into());
        rec.disks.insert(
            "vda".into(),
            Disk {
                active: "/img/vda.r1.qcow2".into(),
                device: DeviceBinding {
                    driver: "virtio-blk-pci".into(),
                    extra: BTreeMap::from([("serial".into(), "abc".into())]),
                },
                node_options: BTreeMap::new(),
            },
        );
        rec.layers
            .insert("/img/base.qcow2".into(), layer(None, false));
        rec.layers.insert(
            "/img/vda.s1.qcow2".into(),
            layer(Some("/img/base.qcow2"), true),
        );
        rec.layers.insert(
            "/img/vda.s2.qcow2".into(),
            layer(Some("/img/vda.s1.qcow2"), true),
        );
        rec.layers.insert(
            "/img/vda.r1.qcow2".into(),
            layer(Some("/img/base.qcow2"), true),
        );
        rec.snapshots = vec![
            snapshot("s1", None, "/img/base.qcow2"),
            snapshot("s2", Some("s1"), "/img/vda.s1.qcow2"),
        ];
        rec.current = Some("s1".into());
        rec
    }

    fn problem(rec: &Record) -> RecordProblem {
        match rec.validate() {
            Err(Error::InvalidRecord { problem, .. }) => problem,
            other => panic!("expected an invalid record, got {other:?}"),
        }
    }

    #[test]
    fn example_is_valid() {
        example().validate().unwrap();
        Record::new("ci1").validate().unwrap();
    }

    #[test]
    fn json_shape() {
        let rec = example();
        let json: serde_json::Value = serde_json::from_str(&rec.to_json().unwrap()).unwrap();
        assert_eq!(json["version"], 1);
        assert_eq!(json["vm"], "ci1");
        assert_eq!(json["qga_socket"], serde_json::Value::Null);
        assert_eq!(json["disks"]["vda"]["active"], "/img/vda.r1.qcow2");
        assert_eq!(json["disks"]["vda"]["device"]["driver"], "virtio-blk-pci");
        assert_eq!(json["disks"]["vda"]["device"]["extra"]["serial"], "abc");
        assert_eq!(
            json["layers"]["/img/vda.s1.qcow2"]["backing"],
            "/img/base.qcow2"
        );
        assert_eq!(json["layers"]["/img/base.qcow2"]["owned"], false);
        assert_eq!(json["snapshots"][1]["name"], "s2");
        assert_eq!(json["snapshots"][1]["parent"], "s1");
        assert_eq!(json["snapshots"][1]["kind"], "disk-only");
        assert_eq!(json["snapshots"][1]["created"], "2026-11-23T12:00:00Z");
        assert_eq!(
            json["snapshots"][1]["disks"]["vda"]["image"],
            "/img/vda.s1.qcow2"
        );
        assert_eq!(json["current"], "s1");
        assert_eq!(json["journal"], serde_json::json!([]));
        assert!(rec.to_json().unwrap().ends_with("}\n"));
    }

    #[test]
    fn kinds_are_kebab_case() {
        for (kind, text) in [
            (SnapshotKind::DiskOnly, "\"disk-only\""),
            (SnapshotKind::Checkpoint, "\"checkpoint\""),
            (SnapshotKind::Internal, "\"internal\""),
        ] {
            assert_eq!(serde_json::to_string(&kind).unwrap(), text);
            assert_eq!(serde_json::from_str::<SnapshotKind>(text).unwrap(), kind);
        }
        // Records written before checkpoints had their name read the same.
        assert_eq!(
            serde_json::from_str::<SnapshotKind>("\"memory\"").unwrap(),
            SnapshotKind::Checkpoint
        );
    }

    #[test]
    fn parse_round_trips_and_keeps_unknown_fields() {
        let rec = example();
        let path = Path::new("/state/ci1.json");
        assert_eq!(
            Record::parse(path, rec.to_json().unwrap().as_bytes()).unwrap(),
            rec
        );

        let mut json: serde_json::Value = serde_json::from_str(&rec.to_json().unwrap()).unwrap();
        json["added_later"] = serde_json::json!({"x": 1});
        json["layers"]["/img/base.qcow2"]["encrypted"] = true.into();
        json["snapshots"][0]["vmstate"] = "/img/s1.mem".into();
        let mut parsed = Record::parse(path, json.to_string().as_bytes()).unwrap();
        // Kept, so that rewriting the record does not drop them.
        let again: serde_json::Value = serde_json::from_str(&parsed.to_json().unwrap()).unwrap();
        assert_eq!(again["added_later"], serde_json::json!({"x": 1}));
        assert_eq!(again["snapshots"][0]["vmstate"], "/img/s1.mem");
        parsed.extra.clear();
        parsed.snapshots[0].extra.clear();
        assert_eq!(parsed, rec);
    }

    #[test]
    fn parse_refuses_newer_versions_whatever_their_shape() {
        let path = Path::new("/x/y.json");
        let err = Record::parse(path, br#"{"version": 2, "vm": ["a new shape"]}"#).unwrap_err();
        assert_eq!(
            err.to_string(),
            "record /x/y.json has version 2; this snapctl reads up to 1: upgrade snapctl"
        );
    }

    #[test]
    fn parse_names_corruption_with_position() {
        let path = Path::new("/x/ci1.json");
        let err = Record::parse(path, b"{\n  \"version\": 1,\n  \"vm\": ").unwrap_err();
        assert!(matches!(err, Error::RecordCorrupt { .. }));
        assert_eq!(
            err.to_string(),
            "record /x/ci1.json is corrupt (line 3, column 8: EOF while parsing a value): \
             fix or move it away; snapctl never overwrites it"
        );
        let err = Record::parse(path, b"{\"version\": 1, \"vm\": 5}").unwrap_err();
        assert!(
            err.to_string()
                .contains("(line 1, column 22: invalid type: integer `5`, expected a string)"),
            "{err}"
        );
        for (bytes, problem) in [
            (&b"[]"[..], "it is not a JSON object"),
            (b"{}", "it has no `version` field"),
            (
                b"{\"version\": \"1\"}",
                "`version` is not a positive integer",
            ),
            (b"{\"version\": 0}", "`version` is not a positive integer"),
            (b"", "EOF while parsing a value"),
        ] {
            let err = Record::parse(path, bytes).unwrap_err();
            assert!(err.to_string().contains(problem), "{err}");
        }
    }

    #[test]
    fn validate_names_the_first_problem() {
        type Breakage = Box<dyn Fn(&mut Record)>;
        let cases: Vec<(&str, Breakage, &str)> = vec![
            (
                "unknown parent",
                Box::new(|r| r.snapshots[1].parent = Some("s9".into())),
                "record ci1: snapshot s2 names parent s9, which is not in the record",
            ),
            (
                "parent cycle",
                Box::new(|r| r.snapshots[0].parent = Some("s2".into())),
                "record ci1: snapshot s1 is its own ancestor",
            ),
            (
                "self parent",
                Box::new(|r| r.snapshots[1].parent = Some("s2".into())),
                "record ci1: snapshot s2 is its own ancestor",
            ),
            (
                "duplicate",
                Box::new(|r| r.snapshots[1].name = "s1".into()),
                "record ci1: snapshot s1 appears more than once",
            ),
            (
                "bad snapshot name",
                Box::new(|r| r.snapshots[1].name = "a/b".into()),
                "record ci1: snapshot name a/b is invalid: it contains `/`",
            ),
            (
                "unknown current",
                Box::new(|r| r.current = Some("s9".into())),
                "record ci1: current snapshot s9 is not in the record",
            ),
            (
                "relative active",
                Box::new(|r| r.disks.get_mut("vda").unwrap().active = "vda.r1.qcow2".into()),
                "record ci1: path vda.r1.qcow2 (active image of disk vda) is not absolute",
            ),
            (
                "relative backing",
                Box::new(|r| {
                    r.layers
                        .get_mut(Path::new("/img/vda.r1.qcow2"))
                        .unwrap()
                        .backing = Some("base.qcow2".into())
                }),
                "record ci1: path base.qcow2 (backing of /img/vda.r1.qcow2) is not absolute",
            ),
            (
                "relative socket",
                Box::new(|r| r.qmp_socket = Some("qmp.sock".into())),
                "record ci1: path qmp.sock (QMP socket) is not absolute",
            ),
            (
                "relative frozen image",
                Box::new(|r| {
                    r.snapshots[0].disks.get_mut("vda").unwrap().image = "base.qcow2".into()
                }),
                "record ci1: path base.qcow2 (frozen image of disk vda in snapshot s1) \
                 is not absolute",
            ),
            (
                "unknown active",
                Box::new(|r| r.disks.get_mut("vda").unwrap().active = "/img/x.qcow2".into()),
                "record ci1: active image /img/x.qcow2 of disk vda is not a known layer",
            ),
            (
                "unknown frozen image",
                Box::new(|r| {
                    r.snapshots[1].disks.get_mut("vda").unwrap().image = "/img/x.qcow2".into()
                }),
                "record ci1: snapshot s2 freezes disk vda as /img/x.qcow2, \
                 which is not a known layer",
            ),
            (
                "unknown backing",
                Box::new(|r| {
                    r.layers
                        .get_mut(Path::new("/img/base.qcow2"))
                        .unwrap()
                        .backing = Some("/img/gone.qcow2".into())
                }),
                "record ci1: layer /img/base.qcow2 is backed by /img/gone.qcow2, \
                 which is not a known layer",
            ),
            (
                "backing cycle",
                Box::new(|r| {
                    r.layers
                        .get_mut(Path::new("/img/base.qcow2"))
                        .unwrap()
                        .backing = Some("/img/vda.s2.qcow2".into())
                }),
                "record ci1: layer /img/base.qcow2 is its own backing image (a loop in the chain)",
            ),
            (
                "duplicate journal id",
                Box::new(|r| {
                    let entry = JournalEntry {
                        id: 7,
                        started: Timestamp::UNIX_EPOCH,
                        pid: 1,
                        operation: Operation::from_parts("create", serde_json::Value::Null),
                    };
                    r.journal = vec![entry.clone(), entry];
                }),
                "record ci1: journal entry 7 appears more than once",
            ),
            (
                "newer version in memory",
                Box::new(|r| r.version = 2),
                "record ci1: version 2 is not 1, the version this snapctl writes",
            ),
            (
                "bad vm name",
                Box::new(|r| r.vm = "../etc".into()),
                "record ../etc: vm name is invalid: only ASCII letters, digits, `.`, `_` and \
                 `-` are allowed",
            ),
        ];
        for (case, break_it, message) in cases {
            let mut rec = example();
            break_it(&mut rec);
            let err = rec.validate().expect_err(case);
            assert_eq!(err.to_string(), message, "{case}");
        }
    }

    #[test]
    fn validate_refuses_non_utf8_paths() {
        use std::ffi::OsStr;
        use std::os::unix::ffi::OsStrExt;
        let mut rec = example();
        rec.qga_socket = Some(Path::new(OsStr::from_bytes(b"/run/\xff.sock")).to_owned());
        assert!(matches!(problem(&rec), RecordProblem::NonUtf8Path { .. }));
    }

    #[test]
    fn a_cycle_is_named_by_a_member_not_by_a_tail_leading_into_it() {
        // s1 -> s2 -> s3 -> s2: s1 is a tail, s2 and s3 form the loop.
        let mut rec = example();
        rec.snapshots
            .push(snapshot("s3", Some("s2"), "/img/vda.s2.qcow2"));
        rec.snapshots[0].parent = Some("s2".into());
        rec.snapshots[1].parent = Some("s3".into());
        assert_eq!(
            problem(&rec),
            RecordProblem::ParentCycle {
                snapshot: "s2".into()
            }
        );
    }

    #[test]
    fn queries() {
        let rec = example();
        assert_eq!(rec.snapshot("s2").unwrap().parent.as_deref(), Some("s1"));
        assert!(rec.snapshot("s9").is_none());
        let children: Vec<_> = rec.children("s1").iter().map(|s| &s.name).collect();
        assert_eq!(children, ["s2"]);
        assert!(rec.children("s2").is_empty());

        assert_eq!(
            rec.chain("vda"),
            [Path::new("/img/vda.r1.qcow2"), Path::new("/img/base.qcow2")]
        );
        assert!(rec.chain("vdb").is_empty());
        assert_eq!(
            rec.chain_from(Path::new("/img/vda.s2.qcow2")),
            [
                Path::new("/img/vda.s2.qcow2"),
                Path::new("/img/vda.s1.qcow2"),
                Path::new("/img/base.qcow2")
            ]
        );

        // vda.s2 is the abandoned branch's old active image: nothing needs it.
        let needed: Vec<_> = rec.layers_needed().into_iter().collect();
        assert_eq!(
            needed,
            [
                Path::new("/img/base.qcow2"),
                Path::new("/img/vda.r1.qcow2"),
                Path::new("/img/vda.s1.qcow2"),
            ]
        );

        assert_eq!(rec.snapshots_holding(Path::new("/img/base.qcow2")), ["s1"]);
        assert_eq!(
            rec.snapshots_holding(Path::new("/img/vda.s1.qcow2")),
            ["s2"]
        );
        assert!(
            rec.snapshots_holding(Path::new("/img/vda.r1.qcow2"))
                .is_empty()
        );

        assert_eq!(
            rec.dependents(Path::new("/img/base.qcow2")),
            [
                Path::new("/img/vda.r1.qcow2"),
                Path::new("/img/vda.s1.qcow2")
            ]
        );
        assert!(rec.dependents(Path::new("/img/vda.r1.qcow2")).is_empty());
    }

    #[test]
    fn chain_ends_even_on_a_loop() {
        let mut rec = example();
        rec.layers
            .get_mut(Path::new("/img/base.qcow2"))
            .unwrap()
            .backing = Some("/img/vda.r1.qcow2".into());
        assert_eq!(rec.chain("vda").len(), 2);
        assert_eq!(rec.layers_needed().len(), 3);
    }

    /// A snapshot's disks: a map in disk order, read and written as a JSON
    /// object like the `BTreeMap` it replaces.
    #[test]
    fn snapshot_disks_are_a_sorted_map() {
        let disk = |p: &str| SnapshotDisk { image: p.into() };
        let mut disks: SnapshotDisks = [
            ("vdb".to_owned(), disk("/b")),
            ("vda".to_owned(), disk("/a")),
        ]
        .into_iter()
        .collect();
        assert_eq!(disks.keys().collect::<Vec<_>>(), ["vda", "vdb"]);
        assert_eq!(disks["vdb"].image, Path::new("/b"));
        assert_eq!(disks.insert("vda".into(), disk("/a2")), Some(disk("/a")));
        assert!(disks.get("vdc").is_none() && disks.contains_key("vdb"));
        let json = serde_json::to_string(&disks).unwrap();
        assert_eq!(json, r#"{"vda":{"image":"/a2"},"vdb":{"image":"/b"}}"#);
        let back: SnapshotDisks =
            serde_json::from_str(r#"{"vdb":{"image":"/b"},"vda":{"image":"/a2"}}"#).unwrap();
        assert_eq!(back, disks);
        assert_eq!(disks.remove("vda"), Some(disk("/a2")));
        assert_eq!(disks.len(), 1);
    }
}
