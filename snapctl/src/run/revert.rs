//! Running a revert: the steps of [`crate::plan::revert`], and what a failure
//! means for it. Before the first `qom-set` everything is undone (the nodes
//! added, the files written, the VM continued if it ran). Once a device has
//! switched, the record says so at once, with the journal entry still open
//! until the guest has been reset: a guest resumed on a swapped disk without
//! a reset would corrupt it, so recovery resets it. A QEMU started with
//! `-no-reboot` exits at the reset: the revert is then complete and QEMU is
//! restarted from `snapctl qemu-args`.

use super::exec::Executor;
use super::{Context, Outcome};
use crate::error::{Error, Result};
use crate::images;
use crate::operation::{Operation, Revert};
use crate::plan::Step;
use crate::plan::revert::apply;

/// A checkpoint's memory state failed to load after the switch: the revert
/// is finished as a disk-only one (reset onto the checkpoint's disks), and
/// the error says so.
async fn fall_back_to_reset(
    mut ctx: Context<'_>,
    begun: super::Begun<'_>,
    client: &qmp_client::Client,
    op: &Revert,
    error: Error,
) -> Result<Outcome> {
    let mut steps: Vec<Step> = op
        .memory
        .iter()
        .map(|m| Step::ReleaseNode {
            node: m.node.clone(),
        })
        .collect();
    steps.push(Step::qmp("system_reset", serde_json::Value::Null));
    if !op.paused {
        steps.push(Step::qmp("cont", serde_json::Value::Null));
    }
    let mut reset = Executor::new(Some(client), None, ctx.options, false, ctx.planned_on);
    let reset_result = reset.run(&steps, &mut || Ok(())).await;
    if !op.memory_only {
        drop(apply(ctx.record, op));
    }
    ctx.record.pending_memory = None;
    let outcome = ctx.finish(begun).await?;
    let what = match reset_result {
        Ok(()) => "the guest was reset onto the checkpoint's disks instead",
        Err(_) => "the guest could not be reset either: it is stopped; reset it before it runs",
    };
    drop(outcome);
    Err(Error::JobFailed(format!(
        "the memory state of {} did not load ({error}); {what}",
        op.snapshot
    )))
}

pub(crate) async fn run(mut ctx: Context<'_>, op: &Revert, steps: &[Step]) -> Result<Outcome> {
    if op.live != ctx.client.is_some() {
        return Err(Error::Drift(
            "QEMU started or stopped since the revert was planned: plan it again".into(),
        ));
    }
    if !op.live {
        // Offline, nothing may hold the chain being left.
        for d in &op.disks {
            if let Some(disk) = ctx.record.disks.get(&d.disk) {
                images::ensure_unlocked(&disk.active)?;
            }
        }
    }
    ctx.options.interrupt.check()?;
    let operation = Operation::Revert(op.clone());
    let (mut begun, result) = ctx
        .begin(operation, steps, None, &|r| drop(apply(r, op)), true)
        .await?;
    let Err(failure) = result else {
        return ctx.finish(begun).await;
    };
    if !failure.switched && !op.memory_only {
        begun.exec.rollback().await;
        return ctx.abandon(&begun, failure.error);
    }
    // The devices use the checkpoint's disks but its memory state did not
    // load: the guest's memory belongs to the old disks, so it must not run
    // on. It restarts on the checkpoint's disks instead.
    if let (Some(client), Some(_), false) = (ctx.client, &op.memory, failure.recorded)
        && !failure.error.qemu_gone()
    {
        return fall_back_to_reset(ctx, begun, client, op, failure.error).await;
    }
    if !(failure.recorded && failure.error.qemu_gone()) {
        // Switched but not finished: the journal entry stays for recovery.
        return Err(failure.error);
    }
    // QEMU went away after the switch was recorded: started with -no-reboot,
    // it exits at the reset instead of resetting. The revert is complete; what
    // is left is removing the files nothing needs.
    let removals: Vec<Step> = steps
        .iter()
        .filter(|s| matches!(s, Step::RemoveFile { .. }))
        .cloned()
        .collect();
    let options = ctx.options;
    let mut offline = Executor::new(None, None, options, false, None);
    if let Err(f) = offline.run(&removals, &mut || Ok(())).await {
        offline.warnings.push(f.error.to_string());
    }
    begun.exec.warnings.push(
        "QEMU exited at the guest reset (was it started with -no-reboot?): the disks \
         are reverted; start QEMU again with `snapctl qemu-args`"
            .to_owned(),
    );
    begun.exec.warnings.append(&mut offline.warnings);
    begun.exec.removed.append(&mut offline.removed);
    ctx.finish(begun).await
}
