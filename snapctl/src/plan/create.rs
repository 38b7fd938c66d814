//! Planning `create`: which disks, which overlay files and node names, and the
//! steps (QEMU-NOTES §2.2, §6): write each overlay's header (its backing
//! string is the frozen image's path as QEMU names it), `blockdev-add` the
//! overlays with no backing, optionally freeze the guest's filesystems, one
//! `transaction` of `blockdev-snapshot` actions (all disks or none), thaw,
//! record.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{
    Facts, NodeNames, Plan, Step, image_size, memory_blockdev, memory_job_steps, new_file_problem,
    overlay_blockdev,
};
use crate::error::{Error, Result};
use crate::graph::{LiveDisk, LiveGraph};
use crate::names;
use crate::operation::{Create, DiskSnapshot, MemoryState, Operation};
use crate::record::{MemoryFile, Record, Snapshot, SnapshotDisk, SnapshotKind};

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
    /// The `overlays` exist already: empty qcow2 images on the disks' active
    /// images, prepared by the user, used as they are (libvirt's
    /// `--reuse-external`).
    pub reuse_external: bool,
    pub quiesce: bool,
    /// A checkpoint: the memory and device state too, at the same instant.
    pub memory: bool,
    /// Where the checkpoint's state goes (default: beside the first overlay).
    pub memory_file: Option<PathBuf>,
    /// Leave the guest paused after a checkpoint (it continues if it ran).
    pub paused: bool,
    /// An internal snapshot (`savevm` style), planned by [`super::internal`].
    pub internal: bool,
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

/// The `transaction` that switches every disk at once, and gives each new
/// overlay the frozen image's persistent dirty bitmaps with their bits, so a
/// backup tool's bitmap on the active image still covers every write.
pub fn transaction(create: &Create) -> Value {
    let mut actions: Vec<Value> = create
        .disks
        .iter()
        .map(|d| {
            json!({
                "type": "blockdev-snapshot",
                "data": { "node": d.frozen_node, "overlay": d.overlay_node },
            })
        })
        .collect();
    for d in &create.disks {
        for b in &d.bitmaps {
            actions.push(json!({
                "type": "block-dirty-bitmap-add",
                "data": { "node": d.overlay_node, "name": b.name,
                          "granularity": b.granularity, "persistent": true },
            }));
            actions.push(json!({
                "type": "block-dirty-bitmap-merge",
                "data": { "node": d.overlay_node, "target": b.name,
                          "bitmaps": [{ "node": d.frozen_node, "name": b.name }] },
            }));
        }
    }
    json!({ "actions": actions })
}

/// The steps of a planned create. A checkpoint stops the guest, saves its
/// memory and device state into their own container, switches the disks in
/// the same stopped instant, and continues the guest if it ran (and the user
/// did not ask for it to stay paused).
pub fn steps(create: &Create, was_running: bool, paused: bool) -> Vec<Step> {
    let mut steps: Vec<Step> = create
        .disks
        .iter()
        .filter(|d| !d.reused)
        .map(|d| Step::CreateOverlay {
            path: d.overlay.clone(),
            backing: d.frozen.display().to_string(),
            backing_format: d.frozen_format.clone(),
            size: d.virtual_size,
        })
        .collect();
    if create.live {
        if let Some(memory) = &create.memory {
            steps.push(Step::CreateStateFile {
                path: memory.path.clone(),
            });
        }
        steps.extend(create.disks.iter().map(|d| {
            Step::qmp(
                "blockdev-add",
                overlay_blockdev(&d.overlay_node, &d.file_node, &d.overlay, None),
            )
        }));
        let agent = |command: &str| Step::GuestAgent {
            command: command.into(),
        };
        if let Some(memory) = &create.memory {
            steps.push(Step::qmp("blockdev-add", memory_blockdev(memory)));
            steps.push(Step::qmp("stop", Value::Null));
            steps.extend(memory_job_steps("snapshot-save", memory));
        }
        if create.quiesce {
            steps.push(agent("guest-fsfreeze-freeze"));
        }
        steps.push(Step::qmp("transaction", transaction(create)));
        if create.quiesce {
            steps.push(agent("guest-fsfreeze-thaw"));
        }
        if create.memory.is_some() && was_running && !paused {
            steps.push(Step::qmp("cont", Value::Null));
        }
    }
    steps.push(Step::Record {
        change: format!(
            "add {} {} ({} disk{}), now current",
            if create.memory.is_some() {
                "checkpoint"
            } else {
                "snapshot"
            },
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
        kind: if create.memory.is_some() {
            SnapshotKind::Checkpoint
        } else {
            SnapshotKind::DiskOnly
        },
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
        memory: create.memory.as_ref().map(|m| MemoryFile {
            path: m.path.clone(),
            tag: m.tag.clone(),
        }),
        internal: None,
        extra: BTreeMap::new(),
    });
    record.current = Some(create.name.clone());
    // A new state descends from here: no memory state waits any more.
    record.pending_memory = None;
}

/// Plans `create` on a record that already holds every disk to snapshot
/// (see [`Record::register_disk`]). With QEMU running the overlays are
/// switched in live; with QEMU stopped they are written on the recorded
/// active images, for QEMU's next start (`qemu-args`).
pub fn plan(record: &Record, facts: &Facts<'_>, opts: &CreateOptions) -> Result<Plan> {
    names::validate_snapshot_name(&opts.name)?;
    if opts.memory && opts.quiesce {
        return Err(Error::Refused(
            "--quiesce is for disk-only snapshots: a checkpoint keeps the guest's memory, so its filesystems need no freeze".into(),
        ));
    }
    if (opts.memory_file.is_some() || opts.paused) && !opts.memory {
        return Err(Error::Refused(
            "--memory-file and --paused belong to a checkpoint: add --memory".into(),
        ));
    }
    if record.snapshot(&opts.name).is_some() {
        return Err(Error::SnapshotExists {
            vm: record.vm.clone(),
            name: opts.name.clone(),
        });
    }
    let Some(graph) = facts.live else {
        return plan_offline(record, facts, opts);
    };
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
        let overlay = overlay_path(facts, opts, &disk.id, &active.filename)?;
        let reused = reuses(opts, &disk.id);
        if reused {
            check_reusable(facts, &overlay, &active.filename, active.virtual_size)?;
        } else {
            check_overlay_path(facts, &overlay)?;
        }
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
            reused,
            bitmaps: active.bitmaps.clone(),
        });
    }
    let memory = if opts.memory {
        let path =
            match &opts.memory_file {
                Some(p) => std::path::absolute(p).map_err(|source| Error::Io {
                    action: "resolve",
                    path: p.to_owned(),
                    source,
                })?,
                None => disks[0].overlay.parent().unwrap_or(Path::new("/")).join(
                    names::overlay_file_name(&format!("{}-memory", record.vm), &opts.name),
                ),
            };
        if let Some(reason) = new_file_problem(facts, &path) {
            return Err(Error::Refused(format!(
                "cannot create memory file {}: {reason}",
                path.display()
            )));
        }
        if disks.iter().any(|d| d.overlay == path) {
            return Err(Error::Refused(format!(
                "the memory file {} would be an overlay too",
                path.display()
            )));
        }
        Some(MemoryState {
            path,
            node: nodes.fresh("sv", "memory", &opts.name),
            job: nodes.fresh("ss", "save", &opts.name),
            tag: opts.name.clone(),
        })
    } else {
        None
    };
    let create = Create {
        live: true,
        name: opts.name.clone(),
        description: opts.description.clone(),
        parent: record.current.clone(),
        created: facts.now,
        quiesce: opts.quiesce,
        disks,
        memory,
    };
    Ok(Plan {
        steps: steps(&create, facts.running == Some(true), opts.paused),
        operation: Operation::Create(create),
    })
}

/// Plans `create` with QEMU stopped: an overlay on each recorded disk's
/// active image, written and recorded; QEMU starts on them next time.
fn plan_offline(record: &Record, facts: &Facts<'_>, opts: &CreateOptions) -> Result<Plan> {
    if opts.memory {
        return Err(Error::Refused(format!(
            "vm {} is not running: a checkpoint saves a running QEMU's memory",
            record.vm
        )));
    }
    if opts.quiesce {
        return Err(Error::Refused(format!(
            "vm {} is not running: --quiesce needs its guest agent",
            record.vm
        )));
    }
    if record.disks.is_empty() {
        return Err(Error::Refused(format!(
            "vm {} is not registered and not running: start QEMU and run snapctl init",
            record.vm
        )));
    }
    let known = || record.disks.keys().cloned().collect::<Vec<_>>().join(", ");
    for id in opts
        .disks
        .iter()
        .chain(&opts.exclude)
        .chain(opts.overlays.keys())
    {
        if !record.disks.contains_key(id) {
            return Err(Error::UnknownDisk {
                vm: record.vm.clone(),
                disk: id.clone(),
                known: known(),
            });
        }
    }
    let mut disks = Vec::new();
    for (id, disk) in &record.disks {
        let chosen = opts.disks.is_empty() || opts.disks.contains(id);
        if !chosen || opts.exclude.contains(id) {
            continue;
        }
        let frozen = &disk.active;
        let virtual_size = image_size(record, facts, frozen)?;
        let overlay = overlay_path(facts, opts, id, frozen)?;
        let reused = reuses(opts, id);
        if reused {
            check_reusable(facts, &overlay, frozen, virtual_size)?;
        } else {
            check_overlay_path(facts, &overlay)?;
        }
        if disks.iter().any(|d: &DiskSnapshot| d.overlay == overlay) {
            return Err(Error::OverlayPath {
                path: overlay,
                reason: "two disks would share it",
            });
        }
        disks.push(DiskSnapshot {
            disk: id.clone(),
            frozen: frozen.clone(),
            frozen_node: String::new(),
            frozen_format: record.format_of(frozen).to_owned(),
            overlay,
            overlay_node: String::new(),
            file_node: String::new(),
            virtual_size,
            reused,
            bitmaps: Vec::new(),
        });
    }
    if disks.is_empty() {
        return Err(Error::NoWritableDisk {
            vm: record.vm.clone(),
        });
    }
    if let Some(id) = opts
        .overlays
        .keys()
        .find(|id| !disks.iter().any(|d| d.disk == **id))
    {
        return Err(Error::Refused(format!(
            "--overlay names {id}, which this snapshot does not cover"
        )));
    }
    let create = Create {
        live: false,
        name: opts.name.clone(),
        description: opts.description.clone(),
        parent: record.current.clone(),
        created: facts.now,
        quiesce: false,
        disks,
        memory: None,
    };
    Ok(Plan {
        steps: steps(&create, false, false),
        operation: Operation::Create(create),
    })
}

/// Where disk `id`'s overlay goes: the user's path, or
/// `<dir of the active image>/<disk>.<snapshot>.qcow2` (the readable name; the
/// hashed one when that is taken).
fn overlay_path(
    facts: &Facts<'_>,
    opts: &CreateOptions,
    id: &str,
    active: &Path,
) -> Result<PathBuf> {
    match opts.overlays.get(id) {
        Some(path) => std::path::absolute(path).map_err(|source| Error::Io {
            action: "resolve",
            path: path.to_owned(),
            source,
        }),
        None => {
            let dir = active.parent().unwrap_or(Path::new("/"));
            let [readable, hashed] =
                names::overlay_file_names(id, &opts.name).map(|name| dir.join(name));
            Ok(if facts.host.exists(&readable) {
                hashed
            } else {
                readable
            })
        }
    }
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
    if let Some(anon) = selected.iter().find(|d| d.anonymous) {
        let node = anon.active().map_or("?", |l| l.node.as_str());
        return Err(Error::Refused(format!(
            "disk {0} (node {node}) has no id=, so snapctl cannot follow it across a restart: \
             give its -device an id= (e.g. id=vdc), or leave it out with --exclude '{0}'",
            anon.id
        )));
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

fn reuses(opts: &CreateOptions, disk: &str) -> bool {
    opts.reuse_external && opts.overlays.contains_key(disk)
}

/// A prepared overlay is reused only when it is what snapctl would have
/// written: an empty qcow2 image of the disk's size on the image it freezes.
fn check_reusable(facts: &Facts<'_>, path: &Path, frozen: &Path, size: u64) -> Result<()> {
    let refuse = |why: String| {
        Err(Error::Refused(format!(
            "--reuse-external: cannot use {}: {why}",
            path.display()
        )))
    };
    let Some(image) = facts.host.image(path) else {
        return refuse("it is not a readable image".into());
    };
    if image.format != "qcow2" {
        return refuse(format!("it is {}, not qcow2", image.format));
    }
    if image.backing.as_deref() != Some(frozen) {
        return refuse(format!(
            "its backing file is {}, not {}",
            image
                .backing
                .as_deref()
                .map_or_else(|| "none".to_owned(), |b| b.display().to_string()),
            frozen.display()
        ));
    }
    if image.virtual_size != size {
        return refuse(format!(
            "it is {} bytes, the disk {size}",
            image.virtual_size
        ));
    }
    if image.has_data {
        return refuse("it already holds data".into());
    }
    Ok(())
}

/// An overlay must be a new file in an existing, writable directory.
fn check_overlay_path(facts: &Facts<'_>, path: &Path) -> Result<()> {
    match new_file_problem(facts, path) {
        None => Ok(()),
        Some(reason) => Err(Error::OverlayPath {
            path: path.to_owned(),
            reason,
        }),
    }
}
