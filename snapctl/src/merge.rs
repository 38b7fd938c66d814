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

use qmp_client::Client;
use serde::Serialize;
use serde_json::json;

use crate::delete::{JobOptions, LiveJob, remove_snapshot, run_jobs};
use crate::error::{Error, Result};
use crate::graph::LiveGraph;
use crate::images;
use crate::names;
use crate::plan::Step;
use crate::record::Record;
use crate::revert::{delete_unused_nodes, prune, refuse_running_jobs, remove_files};
use crate::store::VmLock;

/// What a raw operation does to the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "operation", rename_all = "kebab-case")]
pub enum RawMerge {
    Commit {
        top: PathBuf,
        base: PathBuf,
    },
    Pull {
        active: PathBuf,
        base: Option<PathBuf>,
    },
}

/// A planned `commit` or `pull`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RawPlan {
    pub disk: String,
    pub merge: RawMerge,
    /// Snapshots whose state the operation destroys; removed from the record.
    pub removed_snapshots: Vec<String>,
    /// The QEMU job when QEMU runs.
    pub job: Option<LiveJob>,
}

fn layer_of(record: &Record, disk: &str, snapshot: &str) -> Result<PathBuf> {
    let s = record
        .snapshot(snapshot)
        .ok_or_else(|| Error::UnknownSnapshot {
            vm: record.vm.clone(),
            name: snapshot.to_owned(),
        })?;
    s.disks
        .get(disk)
        .map(|d| d.image.clone())
        .ok_or_else(|| Error::Drift(format!("snapshot {snapshot} does not cover disk {disk}")))
}

fn unknown_disk(record: &Record, disk: &str) -> Error {
    Error::UnknownDisk {
        vm: record.vm.clone(),
        disk: disk.to_owned(),
        known: record.disks.keys().cloned().collect::<Vec<_>>().join(", "),
    }
}

fn position(chain: &[&Path], image: &Path, what: &str, disk: &str) -> Result<usize> {
    chain.iter().position(|p| *p == image).ok_or_else(|| {
        Error::Drift(format!(
            "{what} {} is not in {disk}'s current chain",
            image.display()
        ))
    })
}

/// Plans `commit DISK [--top T] [--base B]`.
pub fn plan_commit(
    record: &Record,
    live: Option<&LiveGraph>,
    disk: &str,
    top: Option<&str>,
    base: Option<&str>,
) -> Result<RawPlan> {
    if !record.disks.contains_key(disk) {
        return Err(unknown_disk(record, disk));
    }
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
        return Err(Error::Drift(format!(
            "nothing to commit on {disk}: the base must lie below the top in the chain"
        )));
    }
    let base_path = chain[b].to_path_buf();
    let owned = |p: &Path| record.layers.get(p).is_some_and(|l| l.owned);
    if !owned(&base_path) {
        return Err(Error::Drift(format!(
            "{} was not created by snapctl; commit never writes a foreign image (use pull)",
            base_path.display()
        )));
    }
    if t > 0 && record.dependents(chain[t]).len() > 1 {
        return Err(Error::Drift(format!(
            "{} is the base of another branch; committing it would change that branch",
            chain[t].display()
        )));
    }
    // Every layer from the top down to the base must have exactly one
    // dependent (the next one up): another branch on them would break.
    for (i, layer) in chain.iter().enumerate().take(b + 1).skip(t + 1) {
        let dependents = record.dependents(layer);
        if dependents.len() > 1 || dependents.first().is_some_and(|d| *d != chain[i - 1]) {
            return Err(Error::Drift(format!(
                "{} is the base of another branch; committing into or past it would change that branch",
                layer.display()
            )));
        }
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
    let job = match live {
        Some(g) => {
            let nodes = live_nodes(g, disk, &chain)?;
            let id = names::node_name("sm", disk, "commit", 0);
            let active = t == 0;
            let mut arguments = json!({
                "job-id": id, "device": nodes[0], "top-node": nodes[t], "base-node": nodes[b],
            });
            if !active {
                arguments["backing-file"] = base_path.display().to_string().into();
            }
            Some(LiveJob {
                id,
                command: "block-commit".into(),
                arguments,
                active,
                // The top and every layer merged with it leave the chain.
                stale_nodes: nodes[t..b].to_vec(),
            })
        }
        None => None,
    };
    Ok(RawPlan {
        disk: disk.to_owned(),
        merge: RawMerge::Commit {
            top: top_path,
            base: base_path,
        },
        removed_snapshots: removed,
        job,
    })
}

/// Plans `pull DISK [--base B]`.
pub fn plan_pull(
    record: &Record,
    live: Option<&LiveGraph>,
    disk: &str,
    base: Option<&str>,
) -> Result<RawPlan> {
    if !record.disks.contains_key(disk) {
        return Err(unknown_disk(record, disk));
    }
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
        return Err(Error::Drift(format!(
            "nothing to pull on {disk}: no layer lies between the active image and the base"
        )));
    }
    let active = chain[0].to_path_buf();
    if !record.layers.get(&active).is_some_and(|l| l.owned) {
        return Err(Error::Drift(format!(
            "{} was not created by snapctl; pull never writes a foreign image",
            active.display()
        )));
    }
    let job = match live {
        Some(g) => {
            let nodes = live_nodes(g, disk, &chain)?;
            let id = names::node_name("sm", disk, "pull", 0);
            let mut arguments = json!({ "job-id": id, "device": nodes[0] });
            if let Some(b) = b {
                arguments["base-node"] = nodes[b].clone().into();
                arguments["backing-file"] = chain[b].display().to_string().into();
            }
            Some(LiveJob {
                id,
                command: "block-stream".into(),
                arguments,
                active: false,
                // Every layer above the base leaves the active chain.
                stale_nodes: nodes[1..b.unwrap_or(nodes.len())].to_vec(),
            })
        }
        None => None,
    };
    Ok(RawPlan {
        disk: disk.to_owned(),
        merge: RawMerge::Pull {
            active,
            base: b.map(|b| chain[b].to_path_buf()),
        },
        removed_snapshots: Vec::new(),
        job,
    })
}

/// The node names of the recorded chain, which must be what QEMU has open.
fn live_nodes(graph: &LiveGraph, disk: &str, chain: &[&Path]) -> Result<Vec<String>> {
    let live = graph
        .disks
        .get(disk)
        .ok_or_else(|| Error::Drift(format!("QEMU has no disk {disk}")))?;
    let files: Vec<&Path> = live.chain.iter().map(|l| l.filename.as_path()).collect();
    if files != chain {
        return Err(Error::Drift(format!(
            "QEMU's chain of {disk} differs from the record: run snapctl check"
        )));
    }
    Ok(live.chain.iter().map(|l| l.node.clone()).collect())
}

impl RawPlan {
    /// The ordered steps, for `--dry-run`.
    pub fn steps(&self, record: &Record, options: &JobOptions) -> Vec<Step> {
        let mut steps = Vec::new();
        match &self.job {
            Some(job) => {
                let qmp = |command: &str, arguments| Step::Qmp {
                    command: command.into(),
                    arguments,
                };
                steps.push(qmp(
                    &job.command,
                    crate::delete::job_arguments(job, options),
                ));
                if job.active {
                    steps.push(qmp("job-complete", json!({ "id": job.id })));
                }
                steps.push(qmp("job-finalize", json!({ "id": job.id })));
                steps.push(qmp("job-dismiss", json!({ "id": job.id })));
            }
            None => steps.push(Step::Tool {
                command: match &self.merge {
                    RawMerge::Commit { top, base } => {
                        format!("qemu-img commit -d -b {} {}", base.display(), top.display())
                    }
                    RawMerge::Pull { active, base } => format!(
                        "qemu-img rebase -b {} {}",
                        base.as_ref()
                            .map_or_else(|| "''".to_owned(), |b| b.display().to_string()),
                        active.display()
                    ),
                },
            }),
        }
        for s in &self.removed_snapshots {
            steps.push(Step::Record {
                change: format!("remove snapshot {s} (its state no longer exists)"),
            });
        }
        let mut after = record.clone();
        for path in self.apply(&mut after) {
            steps.push(Step::RemoveFile { path });
        }
        steps
    }

    /// The record afterwards; returns the owned files nothing needs any more.
    pub fn apply(&self, record: &mut Record) -> Vec<PathBuf> {
        match &self.merge {
            RawMerge::Commit { top, base } => {
                for name in &self.removed_snapshots {
                    remove_snapshot(record, name);
                }
                for layer in record.layers.values_mut() {
                    if layer.backing.as_deref() == Some(top) {
                        layer.backing = Some(base.clone());
                        layer.backing_string = Some(base.display().to_string());
                    }
                }
                for s in &mut record.snapshots {
                    for d in s.disks.values_mut() {
                        if d.image == *top {
                            d.image = base.clone();
                        }
                    }
                }
                if let Some(d) = record.disks.get_mut(&self.disk)
                    && d.active == *top
                {
                    d.active = base.clone();
                }
            }
            RawMerge::Pull { active, base } => {
                if let Some(layer) = record.layers.get_mut(active) {
                    layer.backing_string = base.as_ref().map(|b| b.display().to_string());
                    layer.backing = base.clone();
                }
            }
        }
        prune(record)
    }
}

/// Runs a `commit` or `pull`. Returns lines to report.
pub async fn run(
    client: Option<&Client>,
    lock: &VmLock,
    record: &mut Record,
    plan: &RawPlan,
    options: &JobOptions,
) -> Result<Vec<String>> {
    if let Some(c) = client {
        refuse_running_jobs(c).await?;
    }
    let written = match &plan.merge {
        RawMerge::Commit { base, .. } => base.clone(),
        RawMerge::Pull { active, .. } => active.clone(),
    };
    if plan.job.is_none() {
        images::ensure_unlocked(&written)?;
    }
    let op = match plan.merge {
        RawMerge::Commit { .. } => "commit",
        RawMerge::Pull { .. } => "pull",
    };
    let journal = lock.begin(record, op, serde_json::to_value(plan).unwrap_or_default())?;
    let outcome = match (&plan.job, client) {
        (Some(job), Some(c)) => match run_jobs(c, &[job], options).await {
            Ok(()) => {
                delete_unused_nodes(c, &job.stale_nodes).await;
                Ok(())
            }
            Err(stopped) if stopped.commit_started => {
                // The base has been written in part: its snapshot's state is gone.
                let gone = plan.removed_snapshots.clone();
                for name in &gone {
                    remove_snapshot(record, name);
                }
                lock.resolve(record, journal)?;
                let cause = match stopped.error {
                    Error::Interrupted => "interrupted".to_owned(),
                    e => e.to_string(),
                };
                return Err(Error::Drift(format!(
                    "{cause}: the commit was cancelled after it had started writing into {}; {} removed from the record; the chain is unchanged",
                    written.display(),
                    if gone.is_empty() {
                        "no snapshot".to_owned()
                    } else {
                        gone.join(", ")
                    }
                )));
            }
            Err(stopped) => Err(stopped.error),
        },
        _ => match &plan.merge {
            RawMerge::Commit { top, base } => images::commit(top, base).and_then(|()| {
                let format = record
                    .layers
                    .get(base)
                    .map_or("qcow2", |l| l.format.as_str());
                record
                    .dependents(top)
                    .into_iter()
                    .try_for_each(|d| images::rebase_unsafe(d, base, format))
            }),
            RawMerge::Pull { active, base } => {
                let format = base
                    .as_ref()
                    .and_then(|b| record.layers.get(b))
                    .map_or("qcow2", |l| l.format.as_str());
                images::rebase_safe(active, base.as_deref(), format)
            }
        },
    };
    if let Err(e) = outcome {
        lock.resolve(record, journal)?;
        return Err(e);
    }
    let files = plan.apply(record);
    lock.resolve(record, journal)?;
    let graph = crate::graph::read_if_running(client).await?;
    let mut lines: Vec<String> = plan
        .removed_snapshots
        .iter()
        .map(|s| format!("removed snapshot {s}: its state no longer exists"))
        .collect();
    lines.extend(remove_files(&files, graph.as_ref()));
    Ok(lines)
}
