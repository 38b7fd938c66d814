//! Plans: what an operation will do, step by step, computed without touching
//! anything. The planner is pure (record + live graph in, plan out), so it is
//! unit-tested without QEMU, and `--dry-run` is printing the plan.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::Serialize;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::graph::{LiveDisk, LiveGraph};
use crate::names;
use crate::record::{DeviceBinding, Disk, Layer, Record, Snapshot, SnapshotDisk, SnapshotKind};

/// One step of a plan, in the order it runs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// Create a new, empty file (refusing an existing file or a symlink).
    CreateFile { path: PathBuf },
    /// Create a new qcow2 overlay file (refusing an existing file or a
    /// symlink) with `backing` written into its header.
    CreateOverlay {
        path: PathBuf,
        backing: String,
        backing_format: String,
        size: u64,
    },
    /// A guest-agent command.
    GuestAgent { command: String },
    /// A QMP command.
    Qmp { command: String, arguments: Value },
    /// Run an image tool (offline).
    Tool { command: String },
    /// Remove a file nothing needs any more.
    RemoveFile { path: PathBuf },
    /// Update the record.
    Record { change: String },
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::CreateFile { path } => write!(f, "create empty file {}", path.display()),
            Step::CreateOverlay {
                path,
                backing,
                backing_format,
                size,
            } => write!(
                f,
                "create overlay {} (qcow2, {size} bytes, backing {backing} as {backing_format})",
                path.display()
            ),
            Step::GuestAgent { command } => write!(f, "guest agent: {command}"),
            Step::Qmp { command, arguments } => write!(f, "qmp: {command} {arguments}"),
            Step::Tool { command } => write!(f, "run: {command}"),
            Step::RemoveFile { path } => write!(f, "remove file {}", path.display()),
            Step::Record { change } => write!(f, "record: {change}"),
        }
    }
}

/// What the user asked `create` for.
#[derive(Debug, Clone, Default)]
pub struct CreateOptions {
    pub name: String,
    pub description: Option<String>,
    /// Only these disks (qdev ids); empty means every writable disk.
    pub disks: Vec<String>,
    pub exclude: Vec<String>,
    /// Overlay paths chosen by the user, per disk.
    pub overlays: BTreeMap<String, PathBuf>,
    pub quiesce: bool,
}

/// One disk's part of a snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DiskSnapshot {
    pub disk: String,
    /// The current active image, frozen by the snapshot.
    pub frozen: PathBuf,
    pub frozen_node: String,
    pub frozen_format: String,
    /// The new active image.
    pub overlay: PathBuf,
    pub overlay_node: String,
    /// The protocol node under the overlay.
    pub file_node: String,
    pub virtual_size: u64,
}

/// A planned `create`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CreatePlan {
    pub name: String,
    pub description: Option<String>,
    pub parent: Option<String>,
    pub created: Timestamp,
    pub quiesce: bool,
    pub disks: Vec<DiskSnapshot>,
}

impl CreatePlan {
    /// The `blockdev-add` arguments for one overlay: opened with no backing, so
    /// `blockdev-snapshot` can attach it on top of the frozen node.
    pub fn overlay_blockdev(d: &DiskSnapshot) -> Value {
        json!({
            "driver": "qcow2",
            "node-name": d.overlay_node,
            "file": { "driver": "file", "node-name": d.file_node, "filename": d.overlay },
            "backing": null,
        })
    }

    /// The one `transaction` that switches every disk at once.
    pub fn transaction(&self) -> Value {
        let actions: Vec<Value> = self
            .disks
            .iter()
            .map(|d| {
                json!({
                    "type": "blockdev-snapshot",
                    "data": { "node": d.frozen_node, "overlay": d.overlay_node },
                })
            })
            .collect();
        json!({ "actions": actions })
    }

    /// The ordered steps, for `--dry-run` and the journal.
    pub fn steps(&self) -> Vec<Step> {
        let qmp = |command: &str, arguments: Value| Step::Qmp {
            command: command.into(),
            arguments,
        };
        let mut steps: Vec<Step> = Vec::new();
        for d in &self.disks {
            steps.push(Step::CreateOverlay {
                path: d.overlay.clone(),
                backing: d.frozen.display().to_string(),
                backing_format: d.frozen_format.clone(),
                size: d.virtual_size,
            });
        }
        for d in &self.disks {
            steps.push(qmp("blockdev-add", Self::overlay_blockdev(d)));
        }
        if self.quiesce {
            steps.push(Step::GuestAgent {
                command: "guest-fsfreeze-freeze".into(),
            });
        }
        steps.push(Step::Qmp {
            command: "transaction".into(),
            arguments: self.transaction(),
        });
        if self.quiesce {
            steps.push(Step::GuestAgent {
                command: "guest-fsfreeze-thaw".into(),
            });
        }
        steps.push(Step::Record {
            change: format!(
                "add snapshot {} ({} disk{}), now current",
                self.name,
                self.disks.len(),
                if self.disks.len() == 1 { "" } else { "s" }
            ),
        });
        steps
    }

    /// The record after a successful `create`.
    pub fn apply(&self, record: &mut Record) {
        for d in &self.disks {
            record.layers.insert(
                d.overlay.clone(),
                Layer {
                    format: "qcow2".into(),
                    backing: Some(d.frozen.clone()),
                    backing_string: Some(d.frozen.display().to_string()),
                    owned: true,
                    virtual_size: Some(d.virtual_size),
                },
            );
            if let Some(disk) = record.disks.get_mut(&d.disk) {
                disk.active = d.overlay.clone();
            }
        }
        record.snapshots.push(Snapshot {
            name: self.name.clone(),
            parent: self.parent.clone(),
            created: self.created,
            description: self.description.clone(),
            kind: SnapshotKind::DiskOnly,
            disks: self
                .disks
                .iter()
                .map(|d| {
                    (
                        d.disk.clone(),
                        SnapshotDisk {
                            image: d.frozen.clone(),
                        },
                    )
                })
                .collect(),
            extra: BTreeMap::new(),
        });
        record.current = Some(self.name.clone());
    }
}

/// Adds to the record every snapshottable disk of the live graph it does not
/// know yet, with its chain as foreign layers (`init`, and implicitly on the
/// first `create`). Returns the disks added.
pub fn register(
    record: &mut Record,
    graph: &LiveGraph,
    drivers: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut added = Vec::new();
    for disk in graph.disks.values().filter(|d| d.snapshottable()) {
        if record.disks.contains_key(&disk.id) {
            continue;
        }
        adopt_chain(record, disk);
        record.disks.insert(
            disk.id.clone(),
            Disk {
                active: disk.chain[0].filename.clone(),
                device: DeviceBinding {
                    driver: drivers
                        .get(&disk.id)
                        .cloned()
                        .unwrap_or_else(|| "virtio-blk-pci".into()),
                    extra: BTreeMap::new(),
                },
            },
        );
        added.push(disk.id.clone());
    }
    added
}

/// Records the layers of a live chain that the record does not know, as foreign.
/// Layers the record knows are left as they are.
pub(crate) fn adopt_chain(record: &mut Record, disk: &LiveDisk) {
    for (i, layer) in disk.chain.iter().enumerate() {
        record
            .layers
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

/// Plans `create`: which disks, which overlay files and node names, in what order.
pub fn plan_create(
    record: &Record,
    graph: &LiveGraph,
    opts: &CreateOptions,
    now: Timestamp,
) -> Result<CreatePlan> {
    names::validate_snapshot_name(&opts.name)?;
    if record.snapshot(&opts.name).is_some() {
        return Err(Error::SnapshotExists {
            vm: record.vm.clone(),
            name: opts.name.clone(),
        });
    }
    let known: Vec<String> = graph.disks.keys().cloned().collect();
    for id in opts
        .disks
        .iter()
        .chain(&opts.exclude)
        .chain(opts.overlays.keys())
    {
        if !graph.disks.contains_key(id) {
            return Err(Error::UnknownDisk {
                vm: record.vm.clone(),
                disk: id.clone(),
                known: known.join(", "),
            });
        }
    }
    let selected: Vec<&LiveDisk> = if opts.disks.is_empty() {
        graph
            .disks
            .values()
            .filter(|d| d.snapshottable() && !opts.exclude.contains(&d.id))
            .collect()
    } else {
        let mut chosen = Vec::new();
        for id in &opts.disks {
            let disk = &graph.disks[id];
            if !disk.snapshottable() {
                return Err(Error::DiskNotSnapshottable {
                    disk: id.clone(),
                    reason: if disk.chain.is_empty() {
                        "it has no medium"
                    } else if disk.removable {
                        "it is removable"
                    } else {
                        "it is read-only"
                    },
                });
            }
            if !opts.exclude.contains(id) && !chosen.iter().any(|d: &&LiveDisk| d.id == *id) {
                chosen.push(disk);
            }
        }
        chosen
    };
    if selected.is_empty() {
        return Err(Error::NoWritableDisk {
            vm: record.vm.clone(),
        });
    }

    let mut used_nodes: BTreeSet<String> = graph.node_names.clone();
    let mut overlay_paths = BTreeSet::new();
    let mut disks = Vec::new();
    for disk in selected {
        let active = &disk.chain[0];
        if let Some(recorded) = record.disks.get(&disk.id)
            && recorded.active != active.filename
        {
            return Err(Error::Drift(format!(
                "QEMU writes {} on {} but the record says {}: run snapctl check",
                active.filename.display(),
                disk.id,
                recorded.active.display()
            )));
        }
        let overlay = match opts.overlays.get(&disk.id) {
            Some(path) => absolute(path)?,
            None => active
                .filename
                .parent()
                .unwrap_or(Path::new("/"))
                .join(names::overlay_file_name(&disk.id, &opts.name)),
        };
        check_overlay_path(&overlay)?;
        if !overlay_paths.insert(overlay.clone()) {
            return Err(Error::OverlayPath {
                path: overlay,
                reason: "two disks would share it",
            });
        }
        let mut fresh = |prefix: &str| {
            let name = (0u64..)
                .map(|salt| names::node_name(prefix, &disk.id, &opts.name, salt))
                .find(|n| !used_nodes.contains(n))
                .expect("an unused node name exists");
            used_nodes.insert(name.clone());
            name
        };
        let node = fresh("sc");
        let file_node = fresh("sf");
        disks.push(DiskSnapshot {
            disk: disk.id.clone(),
            frozen: active.filename.clone(),
            frozen_node: active.node.clone(),
            frozen_format: active.format.clone(),
            overlay,
            overlay_node: node,
            file_node,
            virtual_size: active.virtual_size,
        });
    }
    Ok(CreatePlan {
        name: opts.name.clone(),
        description: opts.description.clone(),
        parent: record.current.clone(),
        created: now,
        quiesce: opts.quiesce,
        disks,
    })
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|source| Error::Io {
        action: "resolve",
        path: path.to_owned(),
        source,
    })
}

/// An overlay must be a new file in an existing, writable directory.
fn check_overlay_path(path: &Path) -> Result<()> {
    let refuse = |reason| {
        Err(Error::OverlayPath {
            path: path.to_owned(),
            reason,
        })
    };
    if path.symlink_metadata().is_ok() {
        return refuse("it already exists");
    }
    let dir = path.parent().unwrap_or(Path::new("/"));
    match dir.metadata() {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return refuse("its directory is not a directory"),
        Err(_) => return refuse("its directory does not exist"),
    }
    if nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_err() {
        return refuse("its directory is not writable");
    }
    Ok(())
}
