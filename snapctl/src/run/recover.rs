//! Finishing or undoing what an interrupted snapctl left in the journal.
//!
//! Every mutating operation writes its plan to the journal before its first
//! change and removes it when done. An entry whose process is gone means a run
//! died in between. The truth is then QEMU's graph: for `create`, when every
//! disk's device already writes the new overlay, the transaction happened and
//! the record is completed; otherwise the transaction did not happen and the
//! nodes and files it had prepared are removed. A revert whose switch had
//! begun is finished (and the guest reset); one that had not is undone. Merge
//! jobs left behind are cancelled unless finalized; merges that happened are
//! recorded, and a snapshot whose frozen image a cut-short commit may have
//! written is removed rather than trusted.

use std::path::Path;

use qmp_client::Client;
use serde_json::Value;

use super::RunOptions;
use super::exec::Executor;
use crate::error::Result;
use crate::graph::{self, LiveGraph};
use crate::images;
use crate::operation::{
    Boundary, Create, Delete, Internal, InternalAction, Merge, MergeKind, Operation, Revert,
};
use crate::plan::{self, Step, qom_set_drive, removals};
use crate::record::{JournalEntry, Record};
use crate::store::VmLock;

/// Whether the process that wrote a journal entry still runs.
fn alive(pid: u32) -> bool {
    if pid == std::process::id() {
        return true;
    }
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

/// Resolves the journal entries of dead processes that can be resolved;
/// returns one line per entry saying what was done (or why not).
pub async fn recover(
    client: Option<&Client>,
    lock: &VmLock,
    record: &mut Record,
) -> Result<Vec<String>> {
    let mut lines = Vec::new();
    let entries: Vec<JournalEntry> = record.journal.clone();
    if !entries.is_empty() {
        // What an interrupted operation did to QEMU's nodes is not in the map.
        record.node_map = None;
    }
    for entry in entries {
        let name = entry.operation.name().to_owned();
        if alive(entry.pid) {
            lines.push(format!(
                "{name} by pid {} is still running; left alone",
                entry.pid
            ));
            continue;
        }
        let outcome = match (&entry.operation, client) {
            (Operation::Create(op), Some(c)) if op.live => {
                Some(recover_create(c, record, op).await?)
            }
            (Operation::Create(op), _) if !op.live => {
                Some(recover_offline_create(client, record, op).await)
            }
            (Operation::Revert(op), _) => Some(recover_revert(client, record, op).await?),
            (Operation::Delete(op), _) => Some(recover_delete(client, record, op).await?),
            (Operation::Commit(op) | Operation::Pull(op), _) => {
                Some(recover_merge(client, record, op).await?)
            }
            (Operation::Internal(op), _) if op.live == client.is_some() => {
                Some(recover_internal(client, record, op).await?)
            }
            (Operation::Clone(op), _) => Some(recover_clone(client, lock, record, op).await?),
            (Operation::Export(op), _) => {
                run_steps(None, &removals(vec![op.output.clone()]).collect::<Vec<_>>()).await;
                Some(format!(
                    "removed the partial export {} of snapshot {}",
                    op.output.display(),
                    op.snapshot
                ))
            }
            _ => None,
        };
        match outcome {
            Some(line) => {
                lines.push(line);
                lock.resolve(record, entry.id)?;
            }
            None => lines.push(format!(
                "an interrupted {name} (pid {}, started {}) cannot be resolved automatically{}; inspect with snapctl chain and check",
                entry.pid,
                entry.started,
                if client.is_none() { " while QEMU is not running" } else { "" }
            )),
        }
    }
    Ok(lines)
}

/// Runs recovery's own steps (best effort: what cannot be done is left for
/// `check` to report); returns the warnings.
async fn run_steps(client: Option<&Client>, steps: &[Step]) -> Vec<String> {
    let options = RunOptions::default();
    let mut exec = Executor::new(client, None, &options, false, None);
    match exec.run(steps, &mut || Ok(())).await {
        Ok(()) => exec.warnings,
        Err(failure) => {
            let mut warnings = exec.warnings;
            warnings.push(failure.error.to_string());
            warnings
        }
    }
}

fn release(nodes: impl IntoIterator<Item = String>) -> Vec<Step> {
    nodes
        .into_iter()
        .map(|node| Step::ReleaseNode { node })
        .collect()
}

async fn recover_create(client: &Client, record: &mut Record, op: &Create) -> Result<String> {
    if let Some(memory) = &op.memory {
        settle_jobs(client, &[memory.job.as_str()]).await?;
    }
    let memory_node = op.memory.iter().map(|m| m.node.clone());
    if super::overlays_active(client, op).await {
        // A checkpoint's state is saved before its disks switch: it is whole.
        plan::create::apply(record, op);
        run_steps(Some(client), &release(memory_node)).await;
        return Ok(format!(
            "completed the interrupted create of {}: QEMU already writes its overlays{}",
            op.name,
            paused_note(client).await?
        ));
    }
    let nodes = op
        .disks
        .iter()
        .flat_map(|d| [d.overlay_node.clone(), d.file_node.clone()])
        .chain(memory_node);
    run_steps(Some(client), &release(nodes)).await;
    let after = graph::read(client).await?;
    let files = op
        .disks
        .iter()
        .filter(|d| after.node_for(&d.overlay).is_none() && !record.layers.contains_key(&d.overlay))
        .map(|d| d.overlay.clone())
        .chain(op.memory.iter().map(|m| m.path.clone()))
        .collect();
    run_steps(Some(client), &removals(files).collect::<Vec<_>>()).await;
    Ok(format!(
        "rolled back the interrupted create of {}: its transaction never happened{}",
        op.name,
        paused_note(client).await?
    ))
}

/// A note for a VM an interrupted operation left stopped.
async fn paused_note(client: &Client) -> Result<&'static str> {
    Ok(if super::vm_running(client).await? {
        ""
    } else {
        "; the VM is paused: `cont` it if it should run"
    })
}

/// A create taken with QEMU stopped is recorded in one step at its end: an
/// interrupted one never was, so the overlays it wrote go.
async fn recover_offline_create(client: Option<&Client>, record: &Record, op: &Create) -> String {
    let files: Vec<_> = op
        .disks
        .iter()
        .filter(|d| !record.layers.contains_key(&d.overlay))
        .map(|d| d.overlay.clone())
        .collect();
    run_steps(client, &removals(files).collect::<Vec<_>>()).await;
    format!(
        "rolled back the interrupted create of {} (taken with QEMU stopped): its overlays are removed",
        op.name
    )
}

async fn recover_revert(
    client: Option<&Client>,
    record: &mut Record,
    op: &Revert,
) -> Result<String> {
    let recorded = op.disks.iter().all(|d| {
        record
            .disks
            .get(&d.disk)
            .is_some_and(|disk| disk.active == d.overlay)
    });
    if recorded && client.is_none() {
        return Ok(format!(
            "the interrupted revert to {} had switched the disks and is recorded; QEMU is not running: start it with `snapctl qemu-args`",
            op.snapshot
        ));
    }
    let live = graph::read_if_running(client).await?;
    let active_of = |disk: &str| {
        live.as_ref()
            .and_then(|g| g.disks.get(disk))
            .and_then(|d| d.active())
            .map(|a| a.node.clone())
    };
    let switched: Vec<bool> = op
        .disks
        .iter()
        .map(|d| op.live && active_of(&d.disk).as_deref() == Some(d.overlay_node.as_str()))
        .collect();
    if let (Some(c), true) = (client, switched.iter().any(|s| *s)) {
        // The switch had begun: finish it, then make sure the guest restarts
        // on the new disks (it only runs again after the reset).
        let mut steps: Vec<Step> = op
            .disks
            .iter()
            .zip(&switched)
            .filter(|(_, done)| !**done)
            .map(|(d, _)| qom_set_drive(&d.disk, &d.overlay_node))
            .collect();
        if !super::vm_running(c).await? {
            match &op.memory {
                // Load the checkpoint's state (again: loading is idempotent).
                Some(memory) => {
                    settle_jobs(c, &[memory.job.as_str()]).await?;
                    steps.push(Step::ReleaseNode {
                        node: memory.node.clone(),
                    });
                    steps.push(Step::qmp("blockdev-add", plan::memory_blockdev(memory)));
                    steps.extend(plan::memory_job_steps("snapshot-load", memory));
                }
                None => steps.push(Step::qmp("system_reset", Value::Null)),
            }
            if !op.paused {
                steps.push(Step::qmp("cont", Value::Null));
            }
        }
        steps.extend(release(op.disks.iter().flat_map(|d| d.old_nodes.clone())));
        let files = plan::revert::apply(record, op);
        steps.extend(removals(files));
        run_steps(client, &steps).await;
        return Ok(format!(
            "completed the interrupted revert to {}: QEMU already wrote to the new overlays",
            op.snapshot
        ));
    }
    // Not switched (or QEMU is gone and the record's chain is what it will
    // restart on): undo what was prepared. Files that might hold data are kept.
    if client.is_some() {
        // The overlay's file is its inline child and goes with it.
        if let (Some(c), Some(memory)) = (client, &op.memory) {
            settle_jobs(c, &[memory.job.as_str()]).await?;
        }
        let nodes = op
            .disks
            .iter()
            .flat_map(|d| {
                std::iter::once(d.overlay_node.clone())
                    .chain(d.open.iter().rev().map(|l| l.node.clone()))
            })
            .chain(op.memory.iter().map(|m| m.node.clone()));
        run_steps(client, &release(nodes)).await;
    }
    let after = graph::read_if_running(client).await?;
    let mut kept = Vec::new();
    let mut stale = Vec::new();
    for d in &op.disks {
        let in_use = after
            .as_ref()
            .is_some_and(|g| g.node_for(&d.overlay).is_some());
        if record.layers.contains_key(&d.overlay) || !d.overlay.exists() {
            continue;
        }
        if client.is_some() && !in_use {
            stale.push(d.overlay.clone());
        } else {
            kept.push(d.overlay.display().to_string());
        }
    }
    run_steps(client, &removals(stale).collect::<Vec<_>>()).await;
    let mut line = format!(
        "rolled back the interrupted revert to {}: the record keeps the state before it",
        op.snapshot
    );
    if !kept.is_empty() {
        line.push_str(&format!("; kept {} (not in the record)", kept.join(", ")));
    }
    if let Some(c) = client {
        line.push_str(paused_note(c).await?);
    }
    Ok(line)
}

/// Cancels and dismisses the jobs an interrupted run left (a job already
/// finalized has its graph change in place; it is only dismissed).
async fn settle_jobs(client: &Client, ids: &[&str]) -> Result<()> {
    for job in client.query_jobs().await? {
        if !ids.contains(&job.id.as_str()) {
            continue;
        }
        let mut handle = client.attach_job(&job.id).await?;
        if !handle.status().is_finished() {
            let _ = handle.cancel().await;
            let _ = handle
                .wait_concluded(std::time::Duration::from_secs(60))
                .await;
        }
        let _ = handle.dismiss().await;
    }
    Ok(())
}

/// Whether `gone` has left `disk`'s chain (a merge of it happened), judging
/// by QEMU's graph or the headers.
fn merged_away(live: Option<&LiveGraph>, disk: &str, gone: &Path, record: &Record) -> Result<bool> {
    match live.and_then(|g| g.disks.get(disk)) {
        Some(d) => Ok(!d.chain.iter().any(|l| l.filename == gone)),
        None => {
            let active = match record.disks.get(disk) {
                Some(d) => d.active.clone(),
                None => return Ok(false),
            };
            Ok(!images::backing_chain(&active)?
                .iter()
                .any(|i| i.filename == gone))
        }
    }
}

async fn recover_delete(
    client: Option<&Client>,
    record: &mut Record,
    op: &Delete,
) -> Result<String> {
    if let Some(c) = client {
        let ids: Vec<&str> = op
            .disks
            .iter()
            .filter_map(|d| d.job.as_ref())
            .map(|j| j.id.as_str())
            .collect();
        settle_jobs(c, &ids).await?;
    }
    let live = graph::read_if_running(client).await?;
    let mut done = Vec::new();
    for d in &op.disks {
        let gone = match &d.merge {
            Boundary::Commit { top, .. } => top,
            Boundary::Stream { from, .. } => from,
            Boundary::Drop | Boundary::Keep { .. } => continue,
        };
        if merged_away(live.as_ref(), &d.disk, gone, record)? {
            done.push(d.clone());
        }
    }
    let finished = Delete {
        snapshot: op.snapshot.clone(),
        disks: done,
        keep_files: op.keep_files,
        memory: op.memory.clone(),
    };
    let merged = finished.disks.len();
    let mut files = plan::delete::apply(record, &finished);
    files.extend(op.memory.iter().filter(|_| !op.keep_files).cloned());
    let stale = finished
        .disks
        .iter()
        .filter_map(|d| d.job.as_ref())
        .flat_map(|j| j.stale_nodes.clone());
    let mut steps = if client.is_some() {
        release(stale)
    } else {
        Vec::new()
    };
    steps.extend(removals(files));
    run_steps(client, &steps).await;
    Ok(format!(
        "finished the interrupted delete of {}: {merged} of its merges had happened and are recorded; the snapshot is removed (a merge cut short may have written into its frozen image)",
        op.snapshot
    ))
}

async fn recover_merge(client: Option<&Client>, record: &mut Record, op: &Merge) -> Result<String> {
    if let (Some(c), Some(job)) = (client, &op.job) {
        settle_jobs(c, &[job.id.as_str()]).await?;
    }
    let live = graph::read_if_running(client).await?;
    let (gone, commit) = match &op.merge {
        MergeKind::Commit { top, .. } => (top.clone(), true),
        MergeKind::Pull { active, .. } => {
            // The layer right below the active image before the pull.
            let below = record.layers.get(active).and_then(|l| l.backing.clone());
            match below {
                Some(b) => (b, false),
                None => return Ok("the interrupted pull had nothing left to do".into()),
            }
        }
    };
    if merged_away(live.as_ref(), &op.disk, &gone, record)? {
        let files = plan::merge::apply(record, op);
        run_steps(client, &removals(files).collect::<Vec<_>>()).await;
        return Ok(format!(
            "completed the interrupted {} on {}",
            if commit { "commit" } else { "pull" },
            op.disk
        ));
    }
    if commit {
        for name in &op.removed_snapshots {
            record.remove_snapshot(name);
        }
        return Ok(format!(
            "the interrupted commit on {} did not finish: the chain is unchanged; {} removed (the commit may have written into their images)",
            op.disk,
            if op.removed_snapshots.is_empty() {
                "no snapshot".to_owned()
            } else {
                op.removed_snapshots.join(", ")
            }
        ));
    }
    Ok(format!(
        "the interrupted pull on {} did not finish: the chain is unchanged",
        op.disk
    ))
}

/// An interrupted internal-snapshot operation. QEMU's jobs change all the
/// images or none, and loading or deleting again is harmless: a save is
/// recorded when every image holds it; a load or a delete is carried out
/// again, then recorded.
async fn recover_internal(
    client: Option<&Client>,
    record: &mut Record,
    op: &Internal,
) -> Result<String> {
    if let Some(c) = client {
        settle_jobs(c, &[op.job.as_str()]).await?;
    }
    let holding: Vec<bool> = op
        .disks
        .iter()
        .map(|d| images::info(&d.image).is_ok_and(|i| i.holds(&op.tag)))
        .collect();
    let line = match op.action {
        InternalAction::Save if holding.iter().all(|h| *h) => {
            plan::internal::apply(record, op);
            format!(
                "completed the interrupted internal snapshot {}",
                op.snapshot
            )
        }
        InternalAction::Save => format!(
            "the interrupted internal snapshot {} was not taken",
            op.snapshot
        ),
        InternalAction::Load | InternalAction::Delete => {
            let again: Vec<Step> = plan::internal::steps(op)
                .into_iter()
                .filter(|s| !matches!(s, Step::Record { .. }))
                .filter(|s| {
                    // A delete leaves out the images it already cleared.
                    op.action == InternalAction::Load
                        || !matches!(s, Step::Tool { argv } if op.disks.iter().zip(&holding)
                            .any(|(d, h)| !h && argv.last().is_some_and(|a| *a == d.image.to_string_lossy())))
                })
                .collect();
            let warnings = run_steps(client, &again).await;
            if !warnings.is_empty() {
                return Ok(format!(
                    "the interrupted {} of internal snapshot {} could not be finished: {}",
                    if op.action == InternalAction::Load {
                        "revert"
                    } else {
                        "delete"
                    },
                    op.snapshot,
                    warnings.join("; ")
                ));
            }
            plan::internal::apply(record, op);
            format!(
                "finished the interrupted {} of internal snapshot {}",
                if op.action == InternalAction::Load {
                    "revert"
                } else {
                    "delete"
                },
                op.snapshot
            )
        }
    };
    Ok(line)
}

/// An interrupted clone is complete once the clone's record exists (it is
/// written last); otherwise its overlays go.
async fn recover_clone(
    client: Option<&Client>,
    lock: &VmLock,
    record: &mut Record,
    op: &crate::operation::Clone,
) -> Result<String> {
    if lock.peek_other(&op.to)?.is_some() {
        plan::clone::apply(record, op);
        return Ok(format!(
            "completed the interrupted clone {} of {}",
            op.to, op.snapshot
        ));
    }
    let files: Vec<_> = op.disks.iter().map(|d| d.overlay.clone()).collect();
    run_steps(client, &removals(files).collect::<Vec<_>>()).await;
    Ok(format!(
        "rolled back the interrupted clone {}: its overlays are removed",
        op.to
    ))
}
