//! The operations snapctl carries out, as data: which disk gets which overlay,
//! which boundary is merged how, which QEMU job does it.
//!
//! Planners ([`crate::plan`]) compute them from the record and QEMU's graph;
//! runners ([`crate::run`]) carry them out; the record's journal stores the
//! one in flight, so that the next run can finish or undo it after a crash.
//! This module only describes: it reads nothing and changes nothing, and it
//! depends on no other part of the engine, so the record can hold operations
//! without the record and the planners depending on each other.

use std::path::PathBuf;

use jiff::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// An operation in flight, as the journal stores it.
#[derive(Debug, Clone, PartialEq)]
pub enum Operation {
    Create(Create),
    Revert(Revert),
    Delete(Delete),
    Commit(Merge),
    Pull(Merge),
    Internal(Internal),
    Export(Export),
    Clone(Clone),
    /// An entry this build cannot read (written by another version): kept as it
    /// is, reported, never acted on.
    Unreadable {
        op: String,
        detail: Value,
    },
}

impl Operation {
    /// The operation's name as the journal and messages spell it.
    pub fn name(&self) -> &str {
        match self {
            Operation::Create(_) => "create",
            Operation::Revert(_) => "revert",
            Operation::Delete(_) => "delete",
            Operation::Commit(_) => "commit",
            Operation::Pull(_) => "pull",
            Operation::Internal(_) => "internal",
            Operation::Export(_) => "export",
            Operation::Clone(_) => "clone",
            Operation::Unreadable { op, .. } => op,
        }
    }

    /// The operation's own fields, for the journal's `detail`.
    pub fn detail(&self) -> serde_json::Result<Value> {
        match self {
            Operation::Create(c) => serde_json::to_value(c),
            Operation::Revert(r) => serde_json::to_value(r),
            Operation::Delete(d) => serde_json::to_value(d),
            Operation::Commit(m) | Operation::Pull(m) => serde_json::to_value(m),
            Operation::Internal(i) => serde_json::to_value(i),
            Operation::Export(e) => serde_json::to_value(e),
            Operation::Clone(c) => serde_json::to_value(c),
            Operation::Unreadable { detail, .. } => Ok(detail.clone()),
        }
    }

    /// Reads a journal entry's `op` and `detail`; what does not parse is kept
    /// as [`Operation::Unreadable`].
    pub fn from_parts(op: &str, detail: Value) -> Operation {
        fn parse<T: serde::de::DeserializeOwned>(detail: &Value) -> Option<T> {
            serde_json::from_value(detail.clone()).ok()
        }
        let parsed = match op {
            "create" => parse(&detail).map(Operation::Create),
            "revert" => parse(&detail).map(Operation::Revert),
            "delete" => parse(&detail).map(Operation::Delete),
            "commit" => parse(&detail).map(Operation::Commit),
            "pull" => parse(&detail).map(Operation::Pull),
            "internal" => parse(&detail).map(Operation::Internal),
            "export" => parse(&detail).map(Operation::Export),
            "clone" => parse(&detail).map(Operation::Clone),
            _ => None,
        };
        parsed.unwrap_or_else(|| Operation::Unreadable {
            op: op.to_owned(),
            detail,
        })
    }
}

fn yes() -> bool {
    true
}

/// One disk's part of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskSnapshot {
    pub disk: String,
    /// The current active image, frozen by the snapshot.
    pub frozen: PathBuf,
    /// Its node in QEMU (empty for a snapshot taken with QEMU stopped).
    pub frozen_node: String,
    pub frozen_format: String,
    /// The new active image.
    pub overlay: PathBuf,
    pub overlay_node: String,
    /// The protocol node under the overlay.
    pub file_node: String,
    pub virtual_size: u64,
    /// The overlay is an empty image the user prepared (`--reuse-external`),
    /// not one snapctl writes.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reused: bool,
    /// The frozen image's persistent dirty bitmaps: each is created on the
    /// overlay, with the frozen image's bits, in the same transaction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bitmaps: Vec<crate::graph::Bitmap>,
}

/// `create`: an external snapshot of several disks at once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Create {
    /// QEMU runs: overlays are switched in by one `transaction`; otherwise
    /// they are only written and recorded, for QEMU's next start.
    #[serde(default = "yes")]
    pub live: bool,
    pub name: String,
    pub description: Option<String>,
    pub parent: Option<String>,
    pub created: Timestamp,
    pub quiesce: bool,
    pub disks: Vec<DiskSnapshot>,
    /// A checkpoint: where the memory and device state goes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryState>,
}

/// A checkpoint's memory and device state: a qcow2 container QEMU's
/// `snapshot-save` writes into (and `snapshot-load` reads), opened as its own
/// node for the duration, so that no disk is touched.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryState {
    pub path: PathBuf,
    pub node: String,
    /// The `snapshot-save` / `snapshot-load` job.
    pub job: String,
    /// The tag of the state inside the container (the snapshot's name when it
    /// was taken: a rename does not change it).
    pub tag: String,
}

/// A layer of a revert target's chain that QEMU does not have open (another branch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OpenLayer {
    pub path: PathBuf,
    pub format: String,
    pub node: String,
    /// The node below it (already open, or opened just before), `None` for a base.
    pub backing_node: Option<String>,
}

/// One disk's part of a revert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskRevert {
    pub disk: String,
    /// The snapshot's frozen image for this disk: the new overlay's backing.
    pub frozen: PathBuf,
    pub frozen_format: String,
    pub virtual_size: u64,
    pub overlay: PathBuf,
    pub overlay_node: String,
    pub file_node: String,
    /// Live only: the node of the frozen image the overlay is linked to.
    pub backing_node: Option<String>,
    /// Live only: layers to open first (bottom-up) when the frozen image is on
    /// a branch QEMU does not have open.
    pub open: Vec<OpenLayer>,
    /// Live only: the nodes of the device's current chain that the new chain
    /// does not use, top first, to release once the device has left them.
    pub old_nodes: Vec<String>,
    /// Live only: the current active node's persistent dirty bitmaps, created
    /// on the new overlay with their bits (what the revert changes was written
    /// since the bitmaps began, or is in them already).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bitmaps: Vec<crate::graph::Bitmap>,
    /// Live only: the node those bitmaps are read from.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bitmaps_from: String,
}

/// `revert`: a fresh overlay on a snapshot's frozen images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revert {
    pub snapshot: String,
    /// QEMU runs: the live recipe; otherwise the offline one.
    pub live: bool,
    /// Live only: the guest is left paused afterwards (it continues otherwise).
    pub paused: bool,
    pub disks: Vec<DiskRevert>,
    /// A checkpoint: the memory state loaded into the running QEMU (no reset),
    /// or, with QEMU stopped, left to load into the next one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryState>,
    /// The disks are in place already (an offline revert of this checkpoint
    /// prepared them): only the memory state is loaded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub memory_only: bool,
}

/// How one disk's boundary is merged when a snapshot is deleted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "operation", rename_all = "kebab-case")]
pub enum Boundary {
    /// Commit `top` (the layer above the frozen image) into `base` (the frozen image).
    Commit { top: PathBuf, base: PathBuf },
    /// Stream `from` (the frozen image) into `into` (the layer above it).
    Stream { from: PathBuf, into: PathBuf },
    /// Nothing to merge: the frozen image has no layer above it.
    Drop,
    /// No safe merge: the layer stays.
    Keep { reason: String },
}

/// The QEMU block job that carries out a merge.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LiveJob {
    pub id: String,
    /// `block-commit` or `block-stream`.
    pub command: String,
    /// The command's arguments, exactly as sent.
    pub arguments: Value,
    /// An active commit: goes `ready` and needs `job-complete` (the pivot).
    pub active: bool,
    /// The nodes that drop out of the chain, released afterwards (top first).
    pub stale_nodes: Vec<String>,
}

impl LiveJob {
    /// A commit writes into its base even when it is cancelled.
    pub fn is_commit(&self) -> bool {
        self.command == "block-commit"
    }
}

/// One disk's part of a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDelete {
    pub disk: String,
    pub frozen: PathBuf,
    pub merge: Boundary,
    /// The QEMU job when the merge runs live (its layers are open there);
    /// `None` runs it offline with `qemu-img`.
    pub job: Option<LiveJob>,
}

/// `delete`: a snapshot removed, its boundaries merged where that is safe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delete {
    pub snapshot: String,
    pub disks: Vec<DiskDelete>,
    /// `--metadata-only`: the files stay where they are, even those the record
    /// no longer needs (they are then no longer recorded).
    #[serde(default)]
    pub keep_files: bool,
    /// A checkpoint's memory state file, removed with the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<PathBuf>,
}

/// What a raw `commit` or `pull` does to the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "operation", rename_all = "kebab-case")]
pub enum MergeKind {
    Commit {
        top: PathBuf,
        base: PathBuf,
    },
    Pull {
        active: PathBuf,
        base: Option<PathBuf>,
    },
}

/// `commit` or `pull` on one disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Merge {
    pub disk: String,
    pub merge: MergeKind,
    /// Snapshots whose state the operation destroys; removed from the record.
    pub removed_snapshots: Vec<String>,
    /// The QEMU job when QEMU runs.
    pub job: Option<LiveJob>,
}

impl Merge {
    /// The image the merge writes into.
    pub fn written(&self) -> &PathBuf {
        match &self.merge {
            MergeKind::Commit { base, .. } => base,
            MergeKind::Pull { active, .. } => active,
        }
    }
}

/// What an internal-snapshot operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum InternalAction {
    /// `create --internal`: `snapshot-save` into the disks' active images.
    Save,
    /// `revert`: `snapshot-load` (or `qemu-img snapshot -a` with QEMU stopped).
    Load,
    /// `delete`: `snapshot-delete` (or `qemu-img snapshot -d`).
    Delete,
}

/// One disk of an internal snapshot: the qcow2 image that holds it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InternalDisk {
    pub disk: String,
    pub image: PathBuf,
    /// Its node in QEMU (empty with QEMU stopped).
    pub node: String,
}

/// An internal snapshot (`savevm` style) saved, loaded or deleted: every
/// disk's state inside its own qcow2 image, the memory in one of them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Internal {
    pub action: InternalAction,
    /// The snapshot's name in the record.
    pub snapshot: String,
    /// Its name inside the images.
    pub tag: String,
    pub live: bool,
    /// The `snapshot-*` job.
    pub job: String,
    /// The disk whose image holds the memory state.
    pub vmstate_disk: String,
    pub disks: Vec<InternalDisk>,
    /// Save: the new snapshot's parent, time and description.
    pub parent: Option<String>,
    pub created: Timestamp,
    pub description: Option<String>,
    /// Load, live: the guest is left paused.
    pub paused: bool,
    /// Delete: `--metadata-only` (the images keep the snapshot).
    pub keep_files: bool,
}

/// `export`: one disk as of a snapshot, copied into a standalone image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Export {
    pub snapshot: String,
    pub disk: String,
    /// The snapshot's image of the disk (its chain is read).
    pub source: PathBuf,
    pub source_format: String,
    /// An internal snapshot's name inside `source`.
    pub internal_tag: Option<String>,
    pub output: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
    pub compress: bool,
    pub size: u64,
}

/// One disk of a clone: a fresh overlay on the snapshot's frozen image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskClone {
    pub disk: String,
    pub frozen: PathBuf,
    pub frozen_format: String,
    pub overlay: PathBuf,
    pub size: u64,
}

/// `clone`: a new VM standing on a snapshot's frozen images.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Clone {
    pub snapshot: String,
    /// The new VM's name.
    pub to: String,
    pub disks: Vec<DiskClone>,
}
