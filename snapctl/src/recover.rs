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

use qmp_client::Client;
use serde_json::json;

use crate::error::Result;
use crate::graph::{self, LiveGraph};
use std::path::Path;

use crate::delete::{DeletePlan, Merge};
use crate::images;
use crate::merge::{RawMerge, RawPlan};
use crate::plan::CreatePlan;
use crate::record::{JournalEntry, Record};
use crate::revert::RevertPlan;
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
    for entry in entries {
        if alive(entry.pid) {
            lines.push(format!(
                "{} by pid {} is still running; left alone",
                entry.op, entry.pid
            ));
            continue;
        }
        let detail = entry.detail.clone();
        let outcome = match (entry.op.as_str(), client) {
            ("create", Some(c)) => match serde_json::from_value::<CreatePlan>(detail) {
                Ok(plan) => Some(recover_create(c, record, &plan).await?),
                Err(_) => None,
            },
            ("revert", _) => match serde_json::from_value::<RevertPlan>(detail) {
                Ok(plan) => Some(recover_revert(client, record, &plan).await?),
                Err(_) => None,
            },
            ("delete", _) => match serde_json::from_value::<DeletePlan>(detail) {
                Ok(plan) => Some(recover_delete(client, record, &plan).await?),
                Err(_) => None,
            },
            ("commit" | "pull", _) => match serde_json::from_value::<RawPlan>(detail) {
                Ok(plan) => Some(recover_raw(client, record, &plan).await?),
                Err(_) => None,
            },
            _ => None,
        };
        match outcome {
            Some(line) => {
                lines.push(line);
                lock.resolve(record, entry.id)?;
            }
            None => lines.push(format!(
                "an interrupted {} (pid {}, started {}) cannot be resolved automatically{}; inspect with snapctl chain and check",
                entry.op,
                entry.pid,
                entry.started,
                if client.is_none() { " while QEMU is not running" } else { "" }
            )),
        }
    }
    Ok(lines)
}

async fn recover_create(client: &Client, record: &mut Record, plan: &CreatePlan) -> Result<String> {
    let live: LiveGraph = graph::read(client).await?;
    let switched = plan.disks.iter().all(|d| {
        live.disks
            .get(&d.disk)
            .and_then(|disk| disk.active())
            .is_some_and(|a| a.node == d.overlay_node)
    });
    if switched {
        plan.apply(record);
        return Ok(format!(
            "completed the interrupted create of {}: QEMU already writes its overlays",
            plan.name
        ));
    }
    for d in &plan.disks {
        for node in [&d.overlay_node, &d.file_node] {
            let _ = client
                .execute_raw("blockdev-del", json!({ "node-name": node }))
                .await;
        }
    }
    let after = graph::read(client).await?;
    for d in &plan.disks {
        if after.node_for(&d.overlay).is_none() && !record.layers.contains_key(&d.overlay) {
            let _ = std::fs::remove_file(&d.overlay);
        }
    }
    Ok(format!(
        "rolled back the interrupted create of {}: its transaction never happened",
        plan.name
    ))
}

/// Whether every disk of an interrupted revert already has its new overlay.
async fn recover_revert(
    client: Option<&Client>,
    record: &mut Record,
    plan: &RevertPlan,
) -> Result<String> {
    let recorded = plan.disks.iter().all(|d| {
        record
            .disks
            .get(&d.disk)
            .is_some_and(|disk| disk.active == d.overlay)
    });
    if recorded && client.is_none() {
        return Ok(format!(
            "the interrupted revert to {} had switched the disks and is recorded; QEMU is not running: start it with `snapctl qemu-args`",
            plan.snapshot
        ));
    }
    let live = crate::graph::read_if_running(client).await?;
    let active_of = |disk: &str| {
        live.as_ref()
            .and_then(|g| g.disks.get(disk))
            .and_then(|d| d.active())
            .map(|a| a.node.clone())
    };
    let switched: Vec<bool> = plan
        .disks
        .iter()
        .map(|d| plan.live && active_of(&d.disk).as_deref() == Some(d.overlay_node.as_str()))
        .collect();
    if let (Some(c), true) = (client, switched.iter().any(|s| *s)) {
        // The switch had begun: finish it, then make sure the guest restarts
        // on the new disks (it only runs again after the reset).
        for (d, done) in plan.disks.iter().zip(&switched) {
            if !done {
                c.execute_raw(
                    "qom-set",
                    json!({"path": format!("/machine/peripheral/{}", d.disk),
                           "property": "drive", "value": d.overlay_node}),
                )
                .await?;
            }
        }
        let status = c
            .execute_raw("query-status", serde_json::Value::Null)
            .await?;
        if status.get("running").and_then(serde_json::Value::as_bool) != Some(true) {
            c.execute_raw("system_reset", serde_json::Value::Null)
                .await?;
            if !plan.paused {
                c.execute_raw("cont", serde_json::Value::Null).await?;
            }
        }
        for d in &plan.disks {
            crate::revert::delete_unused_nodes(c, &d.old_nodes).await;
        }
        let files = plan.apply(record);
        let after = graph::read(c).await?;
        crate::revert::remove_files(&files, Some(&after));
        return Ok(format!(
            "completed the interrupted revert to {}: QEMU already wrote to the new overlays",
            plan.snapshot
        ));
    }
    // Not switched (or QEMU is gone and the record's chain is what it will
    // restart on): undo what was prepared. Files that might hold data are kept.
    let mut kept = Vec::new();
    if let Some(c) = client {
        for d in &plan.disks {
            // The overlay's file is its inline child and goes with it.
            let nodes =
                std::iter::once(&d.overlay_node).chain(d.open.iter().rev().map(|l| &l.node));
            for node in nodes {
                let _ = c
                    .execute_raw("blockdev-del", json!({ "node-name": node }))
                    .await;
            }
        }
    }
    let after = crate::graph::read_if_running(client).await?;
    for d in &plan.disks {
        let in_use = after
            .as_ref()
            .is_some_and(|g| g.node_for(&d.overlay).is_some());
        if record.layers.contains_key(&d.overlay) || !d.overlay.exists() {
            continue;
        }
        if client.is_some() && !in_use {
            let _ = std::fs::remove_file(&d.overlay);
        } else {
            kept.push(d.overlay.display().to_string());
        }
    }
    let mut line = format!(
        "rolled back the interrupted revert to {}: the record keeps the state before it",
        plan.snapshot
    );
    if !kept.is_empty() {
        line.push_str(&format!("; kept {} (not in the record)", kept.join(", ")));
    }
    if let Some(c) = client {
        let status = c
            .execute_raw("query-status", serde_json::Value::Null)
            .await?;
        if status.get("running").and_then(serde_json::Value::as_bool) != Some(true) {
            line.push_str("; the VM is paused: `cont` it if it should run");
        }
    }
    Ok(line)
}

/// Cancels and dismisses the jobs an interrupted run left; returns whether
/// any of them had been finalized (its graph change is then in place).
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

/// Whether `top` has left the chain and `base` is still in it (a commit of
/// `top` into `base` happened), judging by QEMU's graph or the headers.
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
    plan: &DeletePlan,
) -> Result<String> {
    if let Some(c) = client {
        let ids: Vec<&str> = plan
            .disks
            .iter()
            .filter_map(|d| d.job.as_ref())
            .map(|j| j.id.as_str())
            .collect();
        settle_jobs(c, &ids).await?;
    }
    let live = crate::graph::read_if_running(client).await?;
    let mut done = Vec::new();
    for d in &plan.disks {
        let gone = match &d.merge {
            Merge::Commit { top, .. } => top,
            Merge::Stream { from, .. } => from,
            Merge::Drop | Merge::Keep { .. } => continue,
        };
        if merged_away(live.as_ref(), &d.disk, gone, record)? {
            done.push(d.clone());
        }
    }
    let finished = DeletePlan {
        snapshot: plan.snapshot.clone(),
        disks: done,
    };
    let merged = finished.disks.len();
    let files = crate::delete::apply(record, &finished);
    if let Some(c) = client {
        let stale: Vec<String> = finished
            .disks
            .iter()
            .filter_map(|d| d.job.as_ref())
            .flat_map(|j| j.stale_nodes.clone())
            .collect();
        crate::revert::delete_unused_nodes(c, &stale).await;
    }
    let after = crate::graph::read_if_running(client).await?;
    crate::revert::remove_files(&files, after.as_ref());
    Ok(format!(
        "finished the interrupted delete of {}: {merged} of its merges had happened and are recorded; the snapshot is removed (a merge cut short may have written into its frozen image)",
        plan.snapshot
    ))
}

async fn recover_raw(
    client: Option<&Client>,
    record: &mut Record,
    plan: &RawPlan,
) -> Result<String> {
    if let (Some(c), Some(job)) = (client, &plan.job) {
        settle_jobs(c, &[job.id.as_str()]).await?;
    }
    let live = crate::graph::read_if_running(client).await?;
    let (gone, commit) = match &plan.merge {
        RawMerge::Commit { top, .. } => (top.clone(), true),
        RawMerge::Pull { active, .. } => {
            // The layer right below the active image before the pull.
            let below = record.layers.get(active).and_then(|l| l.backing.clone());
            match below {
                Some(b) => (b, false),
                None => return Ok("the interrupted pull had nothing left to do".into()),
            }
        }
    };
    if merged_away(live.as_ref(), &plan.disk, &gone, record)? {
        let files = plan.apply(record);
        crate::revert::remove_files(&files, live.as_ref());
        return Ok(format!(
            "completed the interrupted {} on {}",
            if commit { "commit" } else { "pull" },
            plan.disk
        ));
    }
    if commit {
        for name in &plan.removed_snapshots {
            crate::delete::remove_snapshot(record, name);
        }
        return Ok(format!(
            "the interrupted commit on {} did not finish: the chain is unchanged; {} removed (the commit may have written into their images)",
            plan.disk,
            if plan.removed_snapshots.is_empty() {
                "no snapshot".to_owned()
            } else {
                plan.removed_snapshots.join(", ")
            }
        ));
    }
    Ok(format!(
        "the interrupted pull on {} did not finish: the chain is unchanged",
        plan.disk
    ))
}
