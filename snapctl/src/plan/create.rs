//! Planning `create`: which disks, which overlay files and node names, and the
//! steps (QEMU-NOTES §2.2, §6): write each overlay's header (its backing
//! string is the frozen image's path as QEMU names it), `blockdev-add` the
//! overlays with no backing, optionally freeze the guest's filesystems, one
//! `transaction` of `blockdev-snapshot` actions (all disks or none), thaw,
//! record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{DirState, Facts, NodeNames, Plan, Step, overlay_blockdev};
use crate::error::{Error, Result};
use crate::graph::{LiveDisk, LiveGraph};
use crate::names;
use crate::operation::{Create, DiskSnapshot, Operation};
use crate::record::{Record, Snapshot, SnapshotDisk, SnapshotKind};

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

impl CreateOptions {
    /// A snapshot of every writable disk, named `name`.
    pub fn named(name: impl Into<String>) -> CreateOptions {
        CreateOptions {
            name: name.into(),
            ..CreateOptions::default()
        }
    }
}

/// The `transaction` that switches every disk at once.
pub fn transaction(create: &Create) -> Value {
    let actions: Vec<Value> = create
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

/// The steps of a planned create.
pub fn steps(create: &Create) -> Vec<Step> {
    let mut steps: Vec<Step> = create
        .disks
        .iter()
        .map(|d| Step::CreateOverlay {
            path: d.overlay.clone(),
            backing: d.frozen.display().to_string(),
            backing_format: d.frozen_format.clone(),
            size: d.virtual_size,
        })
        .collect();
    steps.extend(create.disks.iter().map(|d| {
        Step::qmp(
            "blockdev-add",
            overlay_blockdev(&d.overlay_node, &d.file_node, &d.overlay, None),
        )
    }));
    let agent = |command: &str| Step::GuestAgent {
        command: command.into(),
    };
    if create.quiesce {
        steps.push(agent("guest-fsfreeze-freeze"));
    }
    steps.push(Step::qmp("transaction", transaction(create)));
    if create.quiesce {
        steps.push(agent("guest-fsfreeze-thaw"));
    }
    steps.push(Step::Record {
        change: format!(
            "add snapshot {} ({} disk{}), now current",
            create.name,
            create.disks.len(),
            if create.disks.len() == 1 { "" } else { "s" }
        ),
    });
    steps
}

/// The record after a successful create.
pub fn apply(record: &mut Record, create: &Create) {
    for d in &create.disks {
        record.add_overlay(&d.disk, &d.overlay, &d.frozen, d.virtual_size);
    }
    record.snapshots.push(Snapshot {
        name: create.name.clone(),
        parent: create.parent.clone(),
        created: create.created,
        description: create.description.clone(),
        kind: SnapshotKind::DiskOnly,
        disks: create
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
    record.current = Some(create.name.clone());
}

/// Plans `create` on a record that already holds every disk to snapshot
/// (see [`Record::register_disk`]). Needs QEMU's graph.
pub fn plan(record: &Record, facts: &Facts<'_>, opts: &CreateOptions) -> Result<Plan> {
    names::validate_snapshot_name(&opts.name)?;
    let graph = facts.live.ok_or_else(|| {
        Error::Refused(format!(
            "vm {} is not running: create needs QEMU (start it with `snapctl qemu-args`)",
            record.vm
        ))
    })?;
    if record.snapshot(&opts.name).is_some() {
        return Err(Error::SnapshotExists {
            vm: record.vm.clone(),
            name: opts.name.clone(),
        });
    }
    let selected = select(record, graph, opts)?;
    let mut nodes = NodeNames::taken_in(Some(graph));
    let mut overlay_paths = Vec::new();
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
            Some(path) => std::path::absolute(path).map_err(|source| Error::Io {
                action: "resolve",
                path: path.to_owned(),
                source,
            })?,
            None => {
                // The readable name; the hashed one when that is taken.
                let dir = active.filename.parent().unwrap_or(Path::new("/"));
                let [readable, hashed] =
                    names::overlay_file_names(&disk.id, &opts.name).map(|name| dir.join(name));
                if facts.host.exists(&readable) {
                    hashed
                } else {
                    readable
                }
            }
        };
        check_overlay_path(facts, &overlay)?;
        if overlay_paths.contains(&overlay) {
            return Err(Error::OverlayPath {
                path: overlay,
                reason: "two disks would share it",
            });
        }
        overlay_paths.push(overlay.clone());
        disks.push(DiskSnapshot {
            disk: disk.id.clone(),
            frozen: active.filename.clone(),
            frozen_node: active.node.clone(),
            frozen_format: active.format.clone(),
            overlay,
            overlay_node: nodes.fresh("sc", &disk.id, &opts.name),
            file_node: nodes.fresh("sf", &disk.id, &opts.name),
            virtual_size: active.virtual_size,
        });
    }
    let create = Create {
        name: opts.name.clone(),
        description: opts.description.clone(),
        parent: record.current.clone(),
        created: facts.now,
        quiesce: opts.quiesce,
        disks,
    };
    Ok(Plan {
        steps: steps(&create),
        operation: Operation::Create(create),
    })
}

/// The disks to snapshot: the chosen ones, or every snapshottable one.
fn select<'g>(
    record: &Record,
    graph: &'g LiveGraph,
    opts: &CreateOptions,
) -> Result<Vec<&'g LiveDisk>> {
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
                known: graph.disks.keys().cloned().collect::<Vec<_>>().join(", "),
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
        let mut chosen: Vec<&LiveDisk> = Vec::new();
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
            if !opts.exclude.contains(id) && !chosen.iter().any(|d| d.id == *id) {
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
    if let Some(id) = opts
        .overlays
        .keys()
        .find(|id| !selected.iter().any(|d| d.id == **id))
    {
        return Err(Error::Refused(format!(
            "--overlay names {id}, which this snapshot does not cover"
        )));
    }
    Ok(selected)
}

/// An overlay must be a new file in an existing, writable directory.
fn check_overlay_path(facts: &Facts<'_>, path: &Path) -> Result<()> {
    let refuse = |reason| {
        Err(Error::OverlayPath {
            path: path.to_owned(),
            reason,
        })
    };
    if facts.host.exists(path) {
        return refuse("it already exists");
    }
    match facts
        .host
        .dir_state(path.parent().unwrap_or(Path::new("/")))
    {
        DirState::Writable => Ok(()),
        DirState::ReadOnly => refuse("its directory is not writable"),
        DirState::NotADirectory => refuse("its directory is not a directory"),
        DirState::Missing => refuse("its directory does not exist"),
    }
}
