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
        return ctx.finish(begun);
    };
    if !failure.switched {
        begun.exec.rollback().await;
        return ctx.abandon(&begun, failure.error);
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
    let mut offline = Executor::new(None, None, options, false);
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
    ctx.finish(begun)
}
