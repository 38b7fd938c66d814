//! `commit` and `pull`: the raw block-commit and block-stream operations on one
//! disk's current chain, for users who think in layers rather than snapshots.
//!
//! The chain is active image first: `L0 (active) <- L1 <- … <- Ln (base)`.
//!
//! - `commit DISK --top A --base B` merges the layers from A's down to just
//!   above B's into B. B changes, so it must be snapctl's own and the base of
//!   nothing else; the merged layers must not be the base of another branch.
//!   Snapshots whose frozen image was B or one of the layers in between no
//!   longer exist afterwards (their state is gone) and are removed from the
//!   record; the snapshot whose frozen image was the top now points at B.
//! - `pull DISK --base B` streams every layer above B into the active image,
//!   which then sits directly on B (or on nothing). The skipped layers keep
//!   their content, so snapshots holding them stay; layers nothing needs any
//!   more are removed.
//!
//! `--top`/`--base` name snapshots; the layer meant is that snapshot's frozen
//! image on DISK. Default top: the active image (an active commit, with
//! pivot). Default commit base: the layer just below the top. Default pull
//! base: none (the active image becomes standalone).

use std::path::{Path, PathBuf};

use super::{
    Facts, Plan, Step, commit_job, job_steps, known_disk, live_nodes, qemu_img_commit,
    qemu_img_relink, qemu_img_stream, removals, stream_job,
};
use crate::error::{Error, Result};
use crate::names;
use crate::operation::{Merge, MergeKind, Operation};
use crate::record::Record;

fn layer_of(record: &Record, disk: &str, snapshot: &str) -> Result<PathBuf> {
    let s = record.snapshot_named(snapshot)?;
    s.disks
        .get(disk)
        .map(|d| d.image.clone())
        .ok_or_else(|| Error::Refused(format!("snapshot {snapshot} does not cover disk {disk}")))
}

fn position(chain: &[&Path], image: &Path, what: &str, disk: &str) -> Result<usize> {
    chain.iter().position(|p| *p == image).ok_or_else(|| {
        Error::Refused(format!(
            "{what} {} is not in {disk}'s current chain",
            image.display()
        ))
    })
}

/// Plans `commit DISK [--top T] [--base B]`; the job runs at `bandwidth`
/// bytes/s (0: unlimited).
pub fn plan_commit(
    record: &Record,
    facts: &Facts<'_>,
    disk: &str,
    top: Option<&str>,
    base: Option<&str>,
    bandwidth: u64,
) -> Result<Plan> {
    known_disk(record, disk)?;
    let chain = record.chain(disk);
    let top_path = match top {
        Some(t) => layer_of(record, disk, t)?,
        None => chain[0].to_path_buf(),
    };
    let t = position(&chain, &top_path, "top", disk)?;
    let b = match base {
        Some(name) => position(&chain, &layer_of(record, disk, name)?, "base", disk)?,
        None => t + 1,
    };
    if b <= t || b >= chain.len() {
        return Err(Error::Refused(format!(
            "nothing to commit on {disk}: the base must lie below the top in the chain"
        )));
    }
    let base_path = chain[b].to_path_buf();
    if !record.owns(&base_path) {
        return Err(Error::Refused(format!(
            "{} was not created by snapctl; commit never writes a foreign image (use pull)",
            base_path.display()
        )));
    }
    if t > 0 && record.dependents(chain[t]).len() > 1 {
        return Err(Error::Refused(format!(
            "{} is the base of another branch; committing it would change that branch",
            chain[t].display()
        )));
    }
    // Every layer from the top down to the base must have exactly one
    // dependent (the next one up): another branch on them would break.
    for (i, layer) in chain.iter().enumerate().take(b + 1).skip(t + 1) {
        let dependents = record.dependents(layer);
        if dependents.len() > 1 || dependents.first().is_some_and(|d| *d != chain[i - 1]) {
            return Err(Error::Refused(format!(
                "{} is the base of another branch; committing into or past it would change that branch",
                layer.display()
            )));
        }
    }
    // A clone stands on the base or on a layer merged away: neither may change.
    if let Some((layer, vms)) = chain[t..=b]
        .iter()
        .map(|l| (l, record.pinned_by(l)))
        .find(|(_, vms)| !vms.is_empty())
    {
        return Err(Error::Refused(format!(
            "clone {} stands on {}: commit never writes or merges away an image another VM uses",
            vms.join(", "),
            layer.display()
        )));
    }
    // The layers merged into the base leave every chain: none may hold an
    // internal snapshot.
    if let Some((layer, names)) = chain[t..b]
        .iter()
        .map(|l| (l, record.internal_snapshots_in(l)))
        .find(|(_, names)| !names.is_empty())
    {
        return Err(Error::Refused(format!(
            "{} holds internal snapshot {}: it is never merged away (delete that snapshot first)",
            layer.display(),
            names.join(", ")
        )));
    }
    let removed: Vec<String> = record
        .snapshots
        .iter()
        .filter(|s| {
            s.disks
                .get(disk)
                .is_some_and(|d| chain[t + 1..=b].contains(&d.image.as_path()))
        })
        .map(|s| s.name.clone())
        .collect();
    let job = match facts.live {
        Some(g) => {
            let nodes = live_nodes(g, disk, &chain)?;
            let id = names::node_name("sm", disk, "commit", 0);
            Some(commit_job(id, &nodes, t, b, &base_path, bandwidth))
        }
        None => None,
    };
    let merge = Merge {
        disk: disk.to_owned(),
        merge: MergeKind::Commit {
            top: top_path,
            base: base_path,
        },
        removed_snapshots: removed,
        job,
    };
    Ok(Plan {
        steps: steps(record, &merge),
        operation: Operation::Commit(merge),
    })
}

/// Why `pull DISK [--base B]` has nothing to do, when it has nothing to do:
/// the active image stands alone already (no `--base`), or stands on B's
/// frozen image already. [`plan_pull`] refuses such a pull; the command line
/// makes it a no-op.
pub fn nothing_to_pull(record: &Record, disk: &str, base: Option<&str>) -> Result<Option<String>> {
    known_disk(record, disk)?;
    let chain = record.chain(disk);
    Ok(match base {
        None if chain.len() == 1 => Some(format!(
            "{disk}: nothing to pull: {} stands alone already",
            chain[0].display()
        )),
        None => None,
        Some(name) => {
            let b = position(&chain, &layer_of(record, disk, name)?, "base", disk)?;
            (b == 1).then(|| {
                format!(
                    "{disk}: nothing to pull: {} stands on {name}'s image {} already",
                    chain[0].display(),
                    chain[1].display()
                )
            })
        }
    })
}

/// Plans `pull DISK [--base B]`; the job runs at `bandwidth` bytes/s.
pub fn plan_pull(
    record: &Record,
    facts: &Facts<'_>,
    disk: &str,
    base: Option<&str>,
    bandwidth: u64,
) -> Result<Plan> {
    known_disk(record, disk)?;
    let chain = record.chain(disk);
    let b = match base {
        Some(name) => Some(position(
            &chain,
            &layer_of(record, disk, name)?,
            "base",
            disk,
        )?),
        None => None,
    };
    if b == Some(0) || (b.is_none() && chain.len() == 1) || b == Some(1) {
        return Err(Error::Refused(format!(
            "nothing to pull on {disk}: no layer lies between the active image and the base"
        )));
    }
    let active = chain[0].to_path_buf();
    let inside = record.internal_snapshots_in(&active);
    if !inside.is_empty() {
        return Err(Error::Refused(format!(
            "{} holds internal snapshot {}: a pull would change what it shows (its backing changes); delete it first",
            active.display(),
            inside.join(", ")
        )));
    }
    if !record.owns(&active) {
        return Err(Error::Refused(format!(
            "{} was not created by snapctl; pull never writes a foreign image",
            active.display()
        )));
    }
    let job = match facts.live {
        Some(g) => {
            let nodes = live_nodes(g, disk, &chain)?;
            let id = names::node_name("sm", disk, "pull", 0);
            Some(stream_job(
                id,
                &nodes,
                0,
                b.map(|b| (b, chain[b])),
                bandwidth,
            ))
        }
        None => None,
    };
    let merge = Merge {
        disk: disk.to_owned(),
        merge: MergeKind::Pull {
            active,
            base: b.map(|b| chain[b].to_path_buf()),
        },
        removed_snapshots: Vec::new(),
        job,
    };
    Ok(Plan {
        steps: steps(record, &merge),
        operation: Operation::Pull(merge),
    })
}

/// The steps of a planned commit or pull.
pub fn steps(record: &Record, merge: &Merge) -> Vec<Step> {
    let mut steps = match &merge.job {
        Some(job) => job_steps(&[job]),
        None => match &merge.merge {
            MergeKind::Commit { top, base } => {
                let format = record.format_of(base);
                std::iter::once(qemu_img_commit(top, base))
                    .chain(
                        record
                            .dependents(top)
                            .into_iter()
                            .map(|d| qemu_img_relink(d, base, format)),
                    )
                    .collect()
            }
            MergeKind::Pull { active, base } => vec![qemu_img_stream(
                active,
                base.as_deref().map(|b| (b, record.format_of(b))),
            )],
        },
    };
    let mut change = match &merge.merge {
        MergeKind::Commit { top, base } => {
            format!(
                "{}: {} merged into {}",
                merge.disk,
                top.display(),
                base.display()
            )
        }
        MergeKind::Pull { active, .. } => {
            format!(
                "{}: {} stands on its new base",
                merge.disk,
                active.display()
            )
        }
    };
    if !merge.removed_snapshots.is_empty() {
        change.push_str(&format!(
            "; remove snapshot {} (its state no longer exists)",
            merge.removed_snapshots.join(", ")
        ));
    }
    steps.push(Step::Record { change });
    let mut after = record.clone();
    steps.extend(removals(apply(&mut after, merge)));
    steps
}

/// The record afterwards; returns the owned files nothing needs any more.
pub fn apply(record: &mut Record, merge: &Merge) -> Vec<PathBuf> {
    match &merge.merge {
        MergeKind::Commit { top, base } => {
            for name in &merge.removed_snapshots {
                record.remove_snapshot(name);
            }
            record.relink_after_commit(top, base);
        }
        MergeKind::Pull { active, base } => record.relink_after_stream(active, base.as_deref()),
    }
    record.prune()
}
