//! `delete`: remove a snapshot and, when it is safe, merge its boundary away.
//!
//! Snapshot S froze image F on each disk; the layer directly on top of F (C)
//! holds what was written after S. Deleting S means F and C no longer need to
//! be separate. Two merges exist (QEMU-NOTES §4):
//!
//! - commit C down into F: F is written, so F must be owned by snapctl, held
//!   by no other snapshot, and C must be F's only dependent (another branch on
//!   F would be corrupted). C then disappears; whatever pointed at C points at F.
//! - stream F up into C: C is written, but what C shows does not change, so
//!   this is safe whoever depends on C; C must be owned (foreign images are
//!   never written). F then drops out of C's chain.
//!
//! Of the safe ones, the merge that copies fewer allocated bytes is chosen.
//! When none is safe (F is a branch point, or both are foreign), the name is
//! dropped, the layer kept, and the reason said. Live, the merges are QEMU
//! block jobs started with `auto-finalize: false` and finalized together, so
//! a multi-disk delete changes all disks' graphs or none; offline they are
//! `qemu-img commit` / `qemu-img rebase`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::{
    Facts, Plan, Step, commit_job, job_steps, qemu_img_commit, qemu_img_relink, qemu_img_stream,
    removals, stream_job,
};
use crate::error::{Error, Result};
use crate::graph::LiveGraph;
use crate::names;
use crate::operation::{Boundary, Delete, DiskDelete, LiveJob, Operation};
use crate::record::Record;

/// Plans deleting `name`. With `metadata_only` no merge is planned; merge
/// jobs run at `bandwidth` bytes/s (0: unlimited).
pub fn plan(
    record: &Record,
    facts: &Facts<'_>,
    name: &str,
    metadata_only: bool,
    bandwidth: u64,
) -> Result<Plan> {
    let snapshot = record.snapshot_named(name)?;
    let mut disks = Vec::new();
    for (disk, sd) in &snapshot.disks {
        let merge = if metadata_only {
            Boundary::Keep {
                reason: "--metadata-only".into(),
            }
        } else {
            choose(record, name, &sd.image, &|p| facts.host.allocated(p))
        };
        let job = match facts.live {
            Some(g) => live_job(record, g, disk, name, &merge, bandwidth)?,
            None => None,
        };
        disks.push(DiskDelete {
            disk: disk.clone(),
            frozen: sd.image.clone(),
            merge,
            job,
        });
    }
    let delete = Delete {
        snapshot: name.to_owned(),
        disks,
        keep_files: metadata_only,
        memory: snapshot.memory.as_ref().map(|m| m.path.clone()),
    };
    Ok(Plan {
        steps: steps(record, &delete),
        operation: Operation::Delete(delete),
    })
}

/// Plans merging a backup's temporary snapshot `name` back: on each disk the
/// overlay it added is committed into the image it froze (an active commit),
/// so that the chain is as it was before the backup, that image included,
/// even a foreign one (QEMU wrote it as the active image until the backup).
/// A disk where the layers are no longer exactly that falls back to an
/// ordinary delete's choice.
pub fn plan_merge_back(
    record: &Record,
    facts: &Facts<'_>,
    name: &str,
    bandwidth: u64,
) -> Result<Plan> {
    let snapshot = record.snapshot_named(name)?;
    let mut disks = Vec::new();
    for (disk, sd) in &snapshot.disks {
        let f = &sd.image;
        let active = record.disks.get(disk).map(|d| d.active.clone());
        let merge = match active {
            Some(c)
                if record.dependents(f) == [c.as_path()]
                    && record.snapshots_holding(f) == [name]
                    && record.pinned_by(f).is_empty()
                    && record.internal_snapshots_in(&c).is_empty() =>
            {
                Boundary::Commit {
                    top: c,
                    base: f.clone(),
                }
            }
            _ => choose(record, name, f, &|p| facts.host.allocated(p)),
        };
        let job = match facts.live {
            Some(g) => live_job(record, g, disk, name, &merge, bandwidth)?,
            None => None,
        };
        disks.push(DiskDelete {
            disk: disk.clone(),
            frozen: f.clone(),
            merge,
            job,
        });
    }
    let delete = Delete {
        snapshot: name.to_owned(),
        disks,
        keep_files: false,
        memory: None,
    };
    Ok(Plan {
        steps: steps(record, &delete),
        operation: Operation::Delete(delete),
    })
}

/// The QEMU job for a merge whose two layers sit next to each other in the
/// disk's live chain; `None` when they are not open there (another branch),
/// in which case the merge runs offline.
fn live_job(
    record: &Record,
    graph: &LiveGraph,
    disk: &str,
    snapshot: &str,
    merge: &Boundary,
    bandwidth: u64,
) -> Result<Option<LiveJob>> {
    let (top, base) = match merge {
        Boundary::Commit { top, base } => (top, base),
        Boundary::Stream { from, into } => (into, from),
        Boundary::Drop | Boundary::Keep { .. } => return Ok(None),
    };
    let Some(chain) = graph.disks.get(disk).map(|d| &d.chain) else {
        return Ok(None);
    };
    let Some(pos) = chain
        .windows(2)
        .position(|w| w[0].filename == *top && w[1].filename == *base)
    else {
        return Ok(None);
    };
    let nodes: Vec<String> = chain.iter().map(|l| l.node.clone()).collect();
    let id = names::node_name("sd", disk, snapshot, 0);
    let job = match merge {
        Boundary::Commit { .. } => commit_job(id, &nodes, pos, pos + 1, base, bandwidth),
        _ => {
            let below = match record.layers.get(base).and_then(|l| l.backing.as_deref()) {
                Some(below) => {
                    if chain.get(pos + 2).is_none_or(|l| l.filename != below) {
                        return Err(Error::Drift(format!(
                            "{} is not open below {} in QEMU: run snapctl check",
                            below.display(),
                            base.display()
                        )));
                    }
                    Some((pos + 2, below))
                }
                None => None,
            };
            stream_job(id, &nodes, pos, below, bandwidth)
        }
    };
    Ok(Some(job))
}

/// Chooses how to merge away the boundary at `f`, the image snapshot `name`
/// froze: commit the layer above down, stream `f` up, drop (nothing above),
/// or keep (no safe merge, with the reason). `allocated` says how many bytes
/// a merge out of an image copies; of two safe merges the smaller is chosen.
pub fn choose(
    record: &Record,
    name: &str,
    f: &Path,
    allocated: &dyn Fn(&Path) -> Option<u64>,
) -> Boundary {
    let others: Vec<&str> = record
        .snapshots_holding(f)
        .into_iter()
        .filter(|s| *s != name)
        .collect();
    if !others.is_empty() {
        return Boundary::Keep {
            reason: format!("{} also holds {}", others.join(", "), f.display()),
        };
    }
    let dependents = record.dependents(f);
    let c = match dependents.as_slice() {
        [] => return Boundary::Drop,
        [c] => c.to_path_buf(),
        many => {
            return Boundary::Keep {
                reason: format!(
                    "{} is the base of {} branches; merging would change them",
                    f.display(),
                    many.len()
                ),
            };
        }
    };
    // Commit writes f and removes c: f must be snapctl's, and c must carry
    // one chain only (the others would still name c). Stream writes c.
    let inside_c = record.internal_snapshots_in(&c);
    let clones = |p: &Path| record.pinned_by(p).join(", ");
    let commit_blocked = if !record.owns(f) {
        Some(format!("{} is not snapctl's to write", f.display()))
    } else if !record.pinned_by(f).is_empty() || !record.pinned_by(&c).is_empty() {
        let pinned = if record.pinned_by(f).is_empty() {
            &c
        } else {
            f
        };
        Some(format!(
            "clone {} stands on {}",
            clones(pinned),
            pinned.display()
        ))
    } else if !inside_c.is_empty() {
        Some(format!(
            "{} holds internal snapshot {}, so it is never merged away",
            c.display(),
            inside_c.join(", ")
        ))
    } else {
        let branches = record.dependents(&c).len();
        (branches > 1).then(|| {
            format!(
                "{} is the base of {branches} branches, so it cannot be committed away",
                c.display()
            )
        })
    };
    // Stream writes c and gives it a new backing: an internal snapshot in c
    // reads its unallocated clusters from that backing, so it would change.
    let stream_blocked = if !record.owns(&c) {
        Some(format!("{} is not snapctl's to write", c.display()))
    } else if !record.pinned_by(&c).is_empty() {
        Some(format!("clone {} stands on {}", clones(&c), c.display()))
    } else {
        (!inside_c.is_empty()).then(|| {
            format!(
                "{} holds internal snapshot {}, whose view would change with its backing",
                c.display(),
                inside_c.join(", ")
            )
        })
    };
    let commit = Boundary::Commit {
        top: c.clone(),
        base: f.to_path_buf(),
    };
    let stream = Boundary::Stream {
        from: f.to_path_buf(),
        into: c.clone(),
    };
    let size = |p: &Path| allocated(p).unwrap_or(u64::MAX);
    match (commit_blocked, stream_blocked) {
        (None, None) if size(&c) <= size(f) => commit,
        (None, None) => stream,
        (None, Some(_)) => commit,
        (Some(_), None) => stream,
        (Some(_), Some(_)) if !record.owns(f) && !record.owns(&c) => Boundary::Keep {
            reason: format!(
                "{} and {} are not snapctl's to write",
                f.display(),
                c.display()
            ),
        },
        (Some(no_commit), Some(no_stream)) => Boundary::Keep {
            reason: format!("{no_commit}, and {no_stream}"),
        },
    }
}

/// The steps of a planned delete: the live merge jobs (all disks together),
/// the offline `qemu-img` runs, the record change, the files removed.
pub fn steps(record: &Record, delete: &Delete) -> Vec<Step> {
    let jobs: Vec<&LiveJob> = delete.disks.iter().filter_map(|d| d.job.as_ref()).collect();
    let mut steps = job_steps(&jobs);
    for d in delete.disks.iter().filter(|d| d.job.is_none()) {
        match &d.merge {
            Boundary::Commit { top, base } => {
                steps.push(qemu_img_commit(top, base));
                let format = record.format_of(base);
                for dependent in record.dependents(top) {
                    steps.push(qemu_img_relink(dependent, base, format));
                }
            }
            Boundary::Stream { from, into } => {
                let below = record.layers.get(from).and_then(|l| l.backing.as_deref());
                steps.push(qemu_img_stream(
                    into,
                    below.map(|b| (b, record.format_of(b))),
                ));
            }
            Boundary::Drop | Boundary::Keep { .. } => {}
        }
    }
    steps.push(Step::Record {
        change: format!("remove snapshot {}", delete.snapshot),
    });
    let mut after = record.clone();
    steps.extend(removals(apply(&mut after, delete)));
    if let Some(memory) = delete.memory.as_ref().filter(|_| !delete.keep_files) {
        steps.push(Step::RemoveFile {
            path: memory.clone(),
        });
    }
    steps
}

/// The record after the merges and the removal of the snapshot. Returns the
/// owned files nothing needs any more, to remove (none with `keep_files`).
pub fn apply(record: &mut Record, delete: &Delete) -> Vec<PathBuf> {
    for d in &delete.disks {
        match &d.merge {
            Boundary::Commit { top, base } => record.relink_after_commit(top, base),
            Boundary::Stream { from, into } => {
                let below = record.layers.get(from).and_then(|l| l.backing.clone());
                record.relink_after_stream(into, below.as_deref());
            }
            Boundary::Drop | Boundary::Keep { .. } => {}
        }
    }
    record.remove_snapshot(&delete.snapshot);
    let files = record.prune();
    if delete.keep_files { Vec::new() } else { files }
}

/// What `delete` of `delete.snapshot` did, one line per disk, for people.
pub fn summary(delete: &Delete) -> Vec<String> {
    let kept = delete
        .memory
        .iter()
        .filter(|_| delete.keep_files)
        .map(|m| format!("kept the memory state file {}", m.display()));
    delete
        .disks
        .iter()
        .map(|d| {
            let how = if d.job.is_some() {
                "QEMU job"
            } else {
                "qemu-img"
            };
            match &d.merge {
                Boundary::Commit { top, base } => format!(
                    "{}: commit {} into {} ({how})",
                    d.disk,
                    top.display(),
                    base.display()
                ),
                Boundary::Stream { from, into } => format!(
                    "{}: stream {} into {} ({how})",
                    d.disk,
                    from.display(),
                    into.display()
                ),
                Boundary::Drop => {
                    format!("{}: nothing to merge above {}", d.disk, d.frozen.display())
                }
                Boundary::Keep { reason } => {
                    format!("{}: keep {} ({reason})", d.disk, d.frozen.display())
                }
            }
        })
        .chain(kept)
        .collect()
}

/// The snapshots `--children` removes with `name`, deepest first, `name` last.
pub fn with_descendants(record: &Record, name: &str) -> Vec<String> {
    fn visit(record: &Record, name: &str, order: &mut Vec<String>, seen: &mut BTreeSet<String>) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        for child in record.children(name) {
            visit(record, &child.name, order, seen);
        }
        order.push(name.to_owned());
    }
    let mut order = Vec::new();
    visit(record, name, &mut order, &mut BTreeSet::new());
    order
}
