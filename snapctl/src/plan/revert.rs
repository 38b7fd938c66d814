//! Planning `revert`: make a snapshot's state current again.
//!
//! A snapshot's frozen image is never written: reverting puts a fresh overlay
//! on it and makes that the active image. With QEMU running (QEMU-NOTES §3.3b):
//! `stop`, write the overlay's header, open it with the frozen image's node as
//! backing (opening that image's chain read-only first when it belongs to a
//! branch that is not open), switch the device with `qom-set … drive`, record
//! the switch, release the abandoned nodes, `system_reset` (the guest's caches
//! describe the old disk, so it must reboot), `cont` unless asked to stay
//! paused. With QEMU stopped: write the overlay and record it. Either way,
//! owned files that no snapshot and no chain needs any more are removed
//! afterwards; foreign files never are.

use std::path::Path;

use serde_json::Value;

use super::{
    Facts, NodeNames, Plan, Step, carry_bitmaps, image_size, layer_blockdev, memory_blockdev,
    memory_job_steps, overlay_blockdev, qom_set_drive, removals,
};
use crate::error::{Error, Result};
use crate::names;
use crate::operation::{DiskRevert, MemoryState, OpenLayer, Operation, Revert};
use crate::record::Record;

/// The steps of a planned revert; `record` is the record it starts from.
pub fn steps(record: &Record, revert: &Revert) -> Vec<Step> {
    let create = |d: &DiskRevert| Step::CreateOverlay {
        path: d.overlay.clone(),
        backing: d.frozen.display().to_string(),
        backing_format: d.frozen_format.clone(),
        size: d.virtual_size,
    };
    let load = |steps: &mut Vec<Step>| {
        if let Some(memory) = revert.memory.as_ref().filter(|_| revert.live) {
            steps.push(Step::qmp("blockdev-add", memory_blockdev(memory)));
            steps.extend(memory_job_steps("snapshot-load", memory));
        }
    };
    let mut steps = Vec::new();
    if revert.live && !revert.memory_only {
        steps.push(Step::qmp("stop", Value::Null));
        for d in &revert.disks {
            steps.push(create(d));
            for l in &d.open {
                steps.push(Step::qmp(
                    "blockdev-add",
                    layer_blockdev(&l.path, &l.format, &l.node, l.backing_node.as_deref()),
                ));
            }
            steps.push(Step::qmp(
                "blockdev-add",
                overlay_blockdev(
                    &d.overlay_node,
                    &d.file_node,
                    &d.overlay,
                    d.backing_node.as_deref(),
                ),
            ));
            steps.extend(carry_bitmaps(&d.bitmaps, &d.bitmaps_from, &d.overlay_node));
        }
        steps.extend(
            revert
                .disks
                .iter()
                .map(|d| qom_set_drive(&d.disk, &d.overlay_node)),
        );
    } else if !revert.live {
        steps.extend(revert.disks.iter().map(create));
    }
    load(&mut steps);
    steps.push(Step::Record {
        change: match (&revert.memory, revert.live) {
            (Some(_), false) => format!(
                "current snapshot is {}; its memory state is to load into the next QEMU (`snapctl revert {0}` there)",
                revert.snapshot
            ),
            _ => format!("current snapshot is {}", revert.snapshot),
        },
    });
    if revert.live {
        steps.extend(
            revert
                .disks
                .iter()
                .flat_map(|d| &d.old_nodes)
                .map(|node| Step::ReleaseNode { node: node.clone() }),
        );
        // A disk-only revert restarts the guest: its caches describe the old
        // disks. A checkpoint's guest resumes where it was.
        if revert.memory.is_none() {
            steps.push(Step::qmp("system_reset", Value::Null));
        }
        if !revert.paused {
            steps.push(Step::qmp("cont", Value::Null));
        }
    }
    let mut after = record.clone();
    steps.extend(removals(apply(&mut after, revert)));
    steps
}

/// The record after the revert. Returns the owned files nothing needs any
/// more (to delete once QEMU has let go of them); their layers are dropped.
pub fn apply(record: &mut Record, revert: &Revert) -> Vec<std::path::PathBuf> {
    for d in &revert.disks {
        record.add_overlay(&d.disk, &d.overlay, &d.frozen, d.virtual_size);
    }
    record.current = Some(revert.snapshot.clone());
    record.pending_memory = revert
        .memory
        .as_ref()
        .filter(|_| !revert.live)
        .map(|_| revert.snapshot.clone());
    record.prune()
}

/// What a live revert does with the guest afterwards.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RunAfter {
    /// Continue it if it ran before the revert; leave it paused otherwise
    /// (a guest paused by the user, or never started: `-S`).
    #[default]
    Keep,
    /// Continue it (`--running`).
    Running,
    /// Leave it paused (`--paused`).
    Paused,
}

/// Plans a revert to `name`; live when `facts.live` is QEMU's graph, leaving
/// the guest running or paused as `after` says.
pub fn plan(record: &Record, facts: &Facts<'_>, name: &str, after: RunAfter) -> Result<Plan> {
    let snapshot = record.snapshot_named(name)?;
    // A checkpoint resumes its guest unless asked not to.
    let checkpoint = snapshot.memory.is_some();
    let paused = facts.live.is_some()
        && match after {
            RunAfter::Keep => !checkpoint && facts.running != Some(true),
            RunAfter::Running => false,
            RunAfter::Paused => true,
        };
    let mut nodes = NodeNames::taken_in(facts.live);
    let memory = snapshot.memory.as_ref().map(|m| MemoryState {
        path: m.path.clone(),
        node: nodes.fresh("sv", "memory", name),
        job: nodes.fresh("sl", "load", name),
        tag: m.tag.clone(),
    });
    // An offline revert of this checkpoint prepared the disks, and QEMU now
    // runs on them, its guest not started yet (`-S`) and the prepared overlays
    // still empty: only the memory state is left to load. A guest that ran
    // and wrote gets the whole revert again.
    let memory_only = memory.is_some()
        && record.pending_memory.as_deref() == Some(name)
        && facts.running == Some(false)
        && facts.live.is_some_and(|g| {
            record.disks.iter().all(|(id, d)| {
                let untouched = facts.host.image(&d.active).is_some_and(|i| !i.has_data);
                untouched
                    && g.disks
                        .get(id)
                        .and_then(|live| live.active())
                        .is_some_and(|a| a.filename == d.active)
            })
        });
    if memory_only {
        let revert = Revert {
            snapshot: name.to_owned(),
            live: true,
            paused,
            disks: Vec::new(),
            memory,
            memory_only: true,
        };
        return Ok(Plan {
            steps: steps(record, &revert),
            operation: Operation::Revert(revert),
        });
    }
    let mut disks = Vec::new();
    for (disk, sd) in &snapshot.disks {
        let layer = record.layers.get(&sd.image).ok_or_else(|| {
            Error::Drift(format!(
                "snapshot {name} names {} for {disk}, which the record does not know",
                sd.image.display()
            ))
        })?;
        let virtual_size = image_size(record, facts, &sd.image)?;
        let dir = sd.image.parent().unwrap_or(Path::new("/"));
        let overlay = (1u32..)
            .map(|n| dir.join(names::overlay_file_name(disk, &format!("{name}-r{n}"))))
            .find(|p| !facts.host.exists(p))
            .expect("an unused file name exists");
        let overlay_node = nodes.fresh("sr", disk, name);
        let file_node = nodes.fresh("sf", disk, name);

        let (mut backing_node, mut open, mut old_nodes) = (None, Vec::new(), Vec::new());
        let (mut bitmaps, mut bitmaps_from) = (Vec::new(), String::new());
        if let Some(graph) = facts.live {
            let device = graph.disks.get(disk).ok_or_else(|| {
                Error::Drift(format!(
                    "QEMU has no disk {disk}, which snapshot {name} covers"
                ))
            })?;
            if let Some(active) = device.active()
                && active.virtual_size != virtual_size
            {
                return Err(Error::Drift(format!(
                    "{disk} is {} bytes in QEMU but {} in snapshot {name}: refusing to switch",
                    active.virtual_size, virtual_size
                )));
            }
            // Walk down from the frozen image to the first layer QEMU has open;
            // the layers above it are opened read-only, bottom-up.
            let target_chain = record.chain_from(&sd.image);
            let mut missing = Vec::new();
            for path in &target_chain {
                if let Some(live) = graph.node_for(path) {
                    backing_node = Some(live.node.clone());
                    break;
                }
                missing.push(path.to_path_buf());
            }
            for path in missing.iter().rev() {
                let node = nodes.fresh("so", disk, &path.to_string_lossy());
                open.push(OpenLayer {
                    path: path.clone(),
                    format: record.format_of(path).to_owned(),
                    node: node.clone(),
                    backing_node: backing_node.clone(),
                });
                backing_node = Some(node);
            }
            // The old chain's nodes the new one does not stand on, those the
            // monitor may own; the others go with their parents.
            old_nodes = device
                .chain
                .iter()
                .filter(|l| !target_chain.contains(&l.filename.as_path()))
                .flat_map(|l| std::iter::once(&l.node).chain(l.file_node.as_ref()))
                .filter(|n| names::may_be_monitor_owned(n))
                .cloned()
                .collect();
            if let Some(active) = device.active().filter(|a| !a.bitmaps.is_empty()) {
                bitmaps = active.bitmaps.clone();
                bitmaps_from = active.node.clone();
            }
        }
        disks.push(DiskRevert {
            disk: disk.clone(),
            frozen: sd.image.clone(),
            frozen_format: layer.format.clone(),
            virtual_size,
            overlay,
            overlay_node,
            file_node,
            backing_node,
            open,
            old_nodes,
            bitmaps,
            bitmaps_from,
        });
    }
    let revert = Revert {
        snapshot: name.to_owned(),
        live: facts.live.is_some(),
        paused,
        disks,
        memory,
        memory_only: false,
    };
    Ok(Plan {
        steps: steps(record, &revert),
        operation: Operation::Revert(revert),
    })
}
