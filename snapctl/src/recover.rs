//! Finishing or undoing what an interrupted snapctl left in the journal.
//!
//! Every mutating operation writes its plan to the journal before its first
//! change and removes it when done. An entry whose process is gone means a run
//! died in between. The truth is then QEMU's graph: for `create`, when every
//! disk's device already writes the new overlay, the transaction happened and
//! the record is completed; otherwise the transaction did not happen and the
//! nodes and files it had prepared are removed. Other operations are left for
//! `check` to report with what is known, never guessed at.

use qmp_client::Client;
use serde_json::json;

use crate::error::Result;
use crate::graph::{self, LiveGraph};
use crate::plan::CreatePlan;
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
    for entry in entries {
        if alive(entry.pid) {
            lines.push(format!(
                "{} by pid {} is still running; left alone",
                entry.op, entry.pid
            ));
            continue;
        }
        let outcome = match (entry.op.as_str(), client) {
            ("create", Some(c)) => match serde_json::from_value::<CreatePlan>(entry.detail.clone())
            {
                Ok(plan) => Some(recover_create(c, record, &plan).await?),
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
        let _ = client
            .execute_raw("job-dismiss", json!({ "id": d.create_job }))
            .await;
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
