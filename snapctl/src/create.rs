//! Running a [`CreatePlan`]: the external snapshot of several disks at once.
//!
//! Order (QEMU-NOTES §2.2, §6): claim each overlay file (`O_EXCL`, never over
//! an existing file) and write its qcow2 header (the backing string is the
//! frozen image's path as QEMU names it), `blockdev-add` the overlays with no
//! backing, optionally
//! freeze the guest's filesystems, one `transaction` of `blockdev-snapshot`
//! actions (all disks or none), thaw in every path, then update the record.
//! The journal entry is written before the first change; on failure every
//! added node is deleted and every created file removed, so nothing is left
//! behind and the record is unchanged.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures_util::future::join_all;
use qmp_client::{Client, GuestAgent};
use serde_json::json;

use crate::error::{Error, Result};
use crate::graph;
use crate::images;
use crate::plan::CreatePlan;
use crate::record::Record;
use crate::store::VmLock;

/// Set when the user asked to stop (SIGINT/SIGTERM). Operations check it at
/// points where stopping leaves a consistent state.
#[derive(Debug, Clone, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    pub fn new() -> Interrupt {
        Interrupt::default()
    }

    /// Marks the operation as interrupted.
    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(Error::Interrupted)` once raised.
    pub fn check(&self) -> Result<()> {
        if self.is_raised() {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// What was changed so far, to undo on failure.
#[derive(Debug, Default)]
pub(crate) struct Undo {
    pub(crate) files: Vec<PathBuf>,
    pub(crate) nodes: Vec<String>,
    /// The transaction succeeded: the overlays are in use, nothing may be undone.
    pub(crate) committed: bool,
}

impl Undo {
    /// Records the nodes that were added, then fails with the first error.
    fn track(&mut self, added: Vec<qmp_client::Result<String>>) -> Result<()> {
        let mut first_error = None;
        for result in added {
            match result {
                Ok(node) => self.nodes.push(node),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), |e| Err(e.into()))
    }

    pub(crate) async fn run(self, client: &Client) {
        if self.committed {
            return;
        }
        for node in self.nodes.iter().rev() {
            if let Err(e) = client
                .execute_raw("blockdev-del", json!({ "node-name": node }))
                .await
            {
                tracing::warn!(node, error = %e, "could not delete node while rolling back");
            }
        }
        for file in &self.files {
            if let Err(e) = std::fs::remove_file(file) {
                tracing::warn!(file = %file.display(), error = %e, "could not remove overlay while rolling back");
            }
        }
    }
}

/// Takes the snapshot described by `plan` and records it. Returns warnings
/// (e.g. a thaw problem after a successful snapshot).
///
/// `agent` must be connected (and answering) when `plan.quiesce` is set; the
/// caller connects it before calling, so a missing agent fails before
/// anything is touched.
pub async fn run(
    client: &Client,
    lock: &VmLock,
    record: &mut Record,
    plan: &CreatePlan,
    agent: Option<&mut GuestAgent>,
    interrupt: &Interrupt,
) -> Result<Vec<String>> {
    if plan.quiesce && agent.is_none() {
        return Err(Error::GuestAgent(
            "--quiesce needs the guest agent socket (--qga)".into(),
        ));
    }
    interrupt.check()?;
    let journal = lock.begin(
        record,
        "create",
        serde_json::to_value(plan).unwrap_or_default(),
    )?;
    let mut undo = Undo::default();
    let outcome = apply(client, plan, agent, interrupt, &mut undo).await;
    match outcome {
        Ok(warnings) => {
            plan.apply(record);
            lock.resolve(record, journal)?;
            Ok(warnings)
        }
        Err(e) => {
            // The transaction may have happened even though we saw an error
            // (timeout after sending, connection lost): look before undoing.
            if undo.committed || (e.result_unknown() && switched(client, plan).await) {
                plan.apply(record);
                lock.resolve(record, journal)?;
                return Ok(vec![e.to_string()]);
            }
            undo.run(client).await;
            lock.resolve(record, journal)?;
            Err(e)
        }
    }
}

/// Whether every disk of the plan now has its overlay as root.
async fn switched(client: &Client, plan: &CreatePlan) -> bool {
    match graph::read(client).await {
        Ok(g) => plan.disks.iter().all(|d| {
            g.disks
                .get(&d.disk)
                .and_then(|disk| disk.active())
                .is_some_and(|a| a.node == d.overlay_node)
        }),
        Err(_) => false,
    }
}

async fn apply(
    client: &Client,
    plan: &CreatePlan,
    agent: Option<&mut GuestAgent>,
    interrupt: &Interrupt,
    undo: &mut Undo,
) -> Result<Vec<String>> {
    for d in &plan.disks {
        images::new_overlay(
            &d.overlay,
            d.virtual_size,
            &d.frozen.to_string_lossy(),
            &d.frozen_format,
        )?;
        undo.files.push(d.overlay.clone());
    }
    crate::fault::point("create:formatted");
    let overlays = plan.disks.iter().map(|d| async {
        client
            .execute_raw("blockdev-add", CreatePlan::overlay_blockdev(d))
            .await
            .map(|_| d.overlay_node.clone())
    });
    undo.track(join_all(overlays).await)?;
    interrupt.check()?;
    crate::fault::point("create:added");
    let Some(agent) = agent.filter(|_| plan.quiesce) else {
        client
            .execute_raw("transaction", plan.transaction())
            .await?;
        undo.committed = true;
        crate::fault::point("create:switched");
        return Ok(Vec::new());
    };
    let frozen = agent
        .fsfreeze_freeze()
        .await
        .map_err(|e| Error::GuestAgent(format!("guest-fsfreeze-freeze failed: {e}")))?;
    // Thaw whatever happens to the transaction; the transaction is the only
    // thing between freeze and thaw, so the guest stays frozen for milliseconds.
    let snapshot = client.execute_raw("transaction", plan.transaction()).await;
    undo.committed = snapshot.is_ok();
    let mut thawed = agent.fsfreeze_thaw().await;
    if thawed.is_err() {
        thawed = agent.fsfreeze_thaw().await;
    }
    snapshot?;
    Ok(match thawed {
        Ok(n) if n == frozen => Vec::new(),
        Ok(n) => vec![format!(
            "the guest agent froze {frozen} filesystems but thawed {n}: something else thawed in between, so consistency is suspect"
        )],
        Err(e) => vec![format!(
            "snapshot taken, but guest-fsfreeze-thaw failed ({e}): the guest may still be frozen"
        )],
    })
}
