//! Planning internal snapshots (`create --internal`, `savevm` style): every
//! disk's state is kept inside its own active qcow2 image, the memory and
//! device state inside the first one's, with QEMU's `snapshot-save`;
//! `snapshot-load` reverts to it inside the running QEMU, `snapshot-delete`
//! drops it (QEMU-NOTES §5.1). With QEMU stopped, `qemu-img snapshot -a / -d`
//! do the disks, and the memory state waits for the next QEMU (like a
//! checkpoint's).
//!
//! An internal snapshot lives in an image as it is: a later external snapshot
//! freezes that image, and merges must then never carry it away (the delete
//! and merge planners keep such images). A revert needs every image to still
//! be its disk's active image; otherwise it is refused, saying why.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Value, json};

use super::{Facts, NodeNames, Plan, Step};
use crate::error::{Error, Result};
use crate::graph::LiveGraph;
use crate::names;
use crate::operation::{Internal, InternalAction, InternalDisk, Operation};
use crate::plan::create::CreateOptions;
use crate::plan::revert::RunAfter;
use crate::record::{InternalState, Record, Snapshot, SnapshotDisk, SnapshotKind};

/// Plans `create NAME --internal`: QEMU must run; every chosen disk's active
/// image must be qcow2.
pub fn plan_save(record: &Record, facts: &Facts<'_>, opts: &CreateOptions) -> Result<Plan> {
    names::validate_snapshot_name(&opts.name)?;
    if opts.memory || opts.quiesce || !opts.overlays.is_empty() || opts.reuse_external {
        return Err(Error::Refused(
            "--internal keeps the snapshot inside the disks' images: it takes no --memory, --quiesce or --overlay".into(),
        ));
    }
    if record.snapshot(&opts.name).is_some() {
        return Err(Error::SnapshotExists {
            vm: record.vm.clone(),
            name: opts.name.clone(),
        });
    }
    let Some(graph) = facts.live else {
        return Err(Error::Refused(format!(
            "vm {} is not running: an internal snapshot is saved by QEMU",
            record.vm
        )));
    };
    let mut disks = Vec::new();
    for (id, disk) in &record.disks {
        let chosen = opts.disks.is_empty() || opts.disks.contains(id);
        if !chosen || opts.exclude.contains(id) {
            continue;
        }
        let live = live_active(graph, id, &disk.active)?;
        if live.1 != "qcow2" {
            return Err(Error::Refused(format!(
                "{id}'s active image {} is {}: only qcow2 images hold internal snapshots",
                disk.active.display(),
                live.1
            )));
        }
        disks.push(InternalDisk {
            disk: id.clone(),
            image: disk.active.clone(),
            node: live.0,
        });
    }
    for id in opts.disks.iter().chain(&opts.exclude) {
        if !record.disks.contains_key(id) {
            return Err(Error::UnknownDisk {
                vm: record.vm.clone(),
                disk: id.clone(),
                known: record.disks.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        }
    }
    let Some(first) = disks.first() else {
        return Err(Error::NoWritableDisk {
            vm: record.vm.clone(),
        });
    };
    let mut nodes = NodeNames::taken_in(Some(graph));
    let op = Internal {
        action: InternalAction::Save,
        snapshot: opts.name.clone(),
        tag: opts.name.clone(),
        live: true,
        job: nodes.fresh("si", "save", &opts.name),
        vmstate_disk: first.disk.clone(),
        parent: record.current.clone(),
        created: facts.now,
        description: opts.description.clone(),
        paused: false,
        keep_files: false,
        disks,
    };
    Ok(plan_of(op))
}

/// Plans a revert to internal snapshot `name`.
pub fn plan_load(record: &Record, facts: &Facts<'_>, name: &str, after: RunAfter) -> Result<Plan> {
    let (snapshot, state) = internal_snapshot(record, name)?;
    let disks = images_of(record, facts, snapshot, true, |image, id| {
        format!(
            "internal snapshot {name} lives in {}, which is no longer {id}'s active image \
             (a later snapshot froze it): revert to the snapshot that froze it first, then to {name}",
            image.display()
        )
    })?;
    let mut nodes = NodeNames::taken_in(facts.live);
    let op = Internal {
        action: InternalAction::Load,
        snapshot: name.to_owned(),
        tag: state.tag.clone(),
        live: facts.live.is_some(),
        job: nodes.fresh("si", "load", name),
        vmstate_disk: state.vmstate_disk.clone(),
        parent: None,
        created: snapshot.created,
        description: None,
        paused: facts.live.is_some() && after == RunAfter::Paused,
        keep_files: false,
        disks,
    };
    Ok(plan_of(op))
}

/// Plans deleting internal snapshot `name` (only the name with `metadata_only`).
pub fn plan_delete(
    record: &Record,
    facts: &Facts<'_>,
    name: &str,
    metadata_only: bool,
) -> Result<Plan> {
    let (snapshot, state) = internal_snapshot(record, name)?;
    let disks = images_of(record, facts, snapshot, !metadata_only, |image, _| {
        format!(
            "internal snapshot {name} lives in {}, which a later snapshot froze: snapctl never \
             writes a frozen image; `delete {name} --metadata-only` forgets it and leaves the image as it is",
            image.display()
        )
    })?;
    let mut nodes = NodeNames::taken_in(facts.live);
    let op = Internal {
        action: InternalAction::Delete,
        snapshot: name.to_owned(),
        tag: state.tag.clone(),
        live: facts.live.is_some(),
        job: nodes.fresh("si", "delete", name),
        vmstate_disk: state.vmstate_disk.clone(),
        parent: None,
        created: snapshot.created,
        description: None,
        paused: false,
        keep_files: metadata_only,
        disks,
    };
    Ok(plan_of(op))
}

/// The images an internal snapshot lives in, with their nodes when QEMU runs.
/// With `in_place` (the images are to be changed), each must still be its
/// disk's active image; `frozen` says why not.
fn images_of(
    record: &Record,
    facts: &Facts<'_>,
    snapshot: &Snapshot,
    in_place: bool,
    frozen: impl Fn(&Path, &str) -> String,
) -> Result<Vec<InternalDisk>> {
    let mut disks = Vec::new();
    for (id, sd) in &snapshot.disks {
        let active = record.disks.get(id).map(|d| d.active.as_path());
        if in_place && active != Some(sd.image.as_path()) {
            return Err(Error::Refused(frozen(&sd.image, id)));
        }
        let node = match facts.live.filter(|_| in_place) {
            Some(g) => live_active(g, id, &sd.image)?.0,
            None => String::new(),
        };
        disks.push(InternalDisk {
            disk: id.clone(),
            image: sd.image.clone(),
            node,
        });
    }
    Ok(disks)
}

fn internal_snapshot<'r>(
    record: &'r Record,
    name: &str,
) -> Result<(&'r Snapshot, &'r InternalState)> {
    let snapshot = record.snapshot_named(name)?;
    let state = snapshot
        .internal
        .as_ref()
        .ok_or_else(|| Error::Refused(format!("snapshot {name} is not an internal snapshot")))?;
    Ok((snapshot, state))
}

/// The node and format of `disk`'s active image in QEMU, which must be `image`.
fn live_active(graph: &LiveGraph, disk: &str, image: &Path) -> Result<(String, String)> {
    let active = graph
        .disks
        .get(disk)
        .and_then(|d| d.active())
        .ok_or_else(|| Error::Drift(format!("QEMU has no disk {disk}: run snapctl check")))?;
    if active.filename != image {
        return Err(Error::Drift(format!(
            "QEMU writes {} on {disk} but the record says {}: run snapctl check",
            active.filename.display(),
            image.display()
        )));
    }
    Ok((active.node.clone(), active.format.clone()))
}

fn plan_of(op: Internal) -> Plan {
    Plan {
        steps: steps(&op),
        operation: Operation::Internal(op),
    }
}

/// The steps of an internal-snapshot operation.
pub fn steps(op: &Internal) -> Vec<Step> {
    let mut steps = Vec::new();
    let vmstate = op
        .disks
        .iter()
        .find(|d| d.disk == op.vmstate_disk)
        .map_or_else(String::new, |d| d.node.clone());
    let devices: Vec<&str> = op.disks.iter().map(|d| d.node.as_str()).collect();
    let job = |command: &str, mut arguments: Value| {
        arguments["job-id"] = op.job.clone().into();
        arguments["tag"] = op.tag.clone().into();
        arguments["devices"] = json!(devices);
        vec![
            Step::qmp(command, arguments),
            Step::AwaitJobs {
                jobs: vec![op.job.clone()],
                status: "concluded".into(),
            },
            Step::qmp("job-dismiss", json!({ "id": op.job })),
        ]
    };
    let tool = |flag: &str, image: &PathBuf| Step::Tool {
        argv: vec![
            "qemu-img".into(),
            "snapshot".into(),
            "-q".into(),
            flag.into(),
            op.tag.clone(),
            image.to_string_lossy().into_owned(),
        ],
    };
    match (op.action, op.live) {
        (InternalAction::Save, _) => {
            steps.extend(job("snapshot-save", json!({ "vmstate": vmstate })));
        }
        (InternalAction::Load, true) => {
            if op.paused {
                steps.push(Step::qmp("stop", Value::Null));
            }
            steps.extend(job("snapshot-load", json!({ "vmstate": vmstate })));
        }
        (InternalAction::Load, false) => {
            steps.extend(op.disks.iter().map(|d| tool("-a", &d.image)));
        }
        (InternalAction::Delete, _) if op.keep_files => {}
        (InternalAction::Delete, true) => steps.extend(job("snapshot-delete", json!({}))),
        (InternalAction::Delete, false) => {
            steps.extend(op.disks.iter().map(|d| tool("-d", &d.image)));
        }
    }
    steps.push(Step::Record {
        change: match (op.action, op.live) {
            (InternalAction::Save, _) => format!("add internal snapshot {}, now current", op.snapshot),
            (InternalAction::Load, true) => format!("current snapshot is {}", op.snapshot),
            (InternalAction::Load, false) => format!(
                "current snapshot is {}; its memory state is to load into the next QEMU (`snapctl revert {0}` there)",
                op.snapshot
            ),
            (InternalAction::Delete, _) => format!("remove snapshot {}", op.snapshot),
        },
    });
    if op.action == InternalAction::Load && op.live && !op.paused {
        steps.push(Step::qmp("cont", Value::Null));
    }
    steps
}

/// The record after the operation.
pub fn apply(record: &mut Record, op: &Internal) {
    match op.action {
        InternalAction::Save => {
            record.snapshots.push(Snapshot {
                name: op.snapshot.clone(),
                parent: op.parent.clone(),
                created: op.created,
                description: op.description.clone(),
                kind: SnapshotKind::Internal,
                disks: op
                    .disks
                    .iter()
                    .map(|d| {
                        (
                            d.disk.clone(),
                            SnapshotDisk {
                                image: d.image.clone(),
                            },
                        )
                    })
                    .collect(),
                memory: None,
                internal: Some(InternalState {
                    tag: op.tag.clone(),
                    vmstate_disk: op.vmstate_disk.clone(),
                }),
                extra: BTreeMap::new(),
            });
            record.current = Some(op.snapshot.clone());
            record.pending_memory = None;
        }
        InternalAction::Load => {
            record.current = Some(op.snapshot.clone());
            record.pending_memory = (!op.live).then(|| op.snapshot.clone());
        }
        InternalAction::Delete => record.remove_snapshot(&op.snapshot),
    }
}
