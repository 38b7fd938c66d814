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

pub(crate) async fn run(ctx: Context<'_>, op: &Revert, steps: &[Step]) -> Result<Outcome> {
    let Context {
        client,
        lock,
        record,
        options,
        was_running,
    } = ctx;
    if op.live != client.is_some() {
        return Err(Error::Drift(
            "QEMU started or stopped since the revert was planned: plan it again".into(),
        ));
    }
    if !op.live {
        // Offline, nothing may hold the chain being left.
        for d in &op.disks {
            if let Some(disk) = record.disks.get(&d.disk) {
                images::ensure_unlocked(&disk.active)?;
            }
        }
    }
    options.interrupt.check()?;
    let journal = lock.begin(record, Operation::Revert(op.clone()))?;
    let mut exec = Executor::new(client, None, options, was_running);
    let mut apply_and_save = || {
        apply(record, op);
        lock.save(record)
    };
    let result = exec.run(steps, &mut apply_and_save).await;
    match result {
        Ok(()) => {}
        Err(failure) if !failure.switched => {
            exec.rollback().await;
            lock.resolve(record, journal)?;
            return Err(failure.error);
        }
        // QEMU started with -no-reboot exits instead of resetting.
        Err(failure)
            if failure.recorded
                && failure.error.qemu_gone()
                && matches!(&failure.step, Step::Qmp { command, .. } if command == "system_reset" || command == "cont") =>
        {
            lock.resolve(record, journal)?;
            let mut warnings = vec![
                "QEMU exited at the guest reset (was it started with -no-reboot?): the disks \
                 are reverted; start QEMU again with `snapctl qemu-args`"
                    .to_owned(),
            ];
            let mut after = Executor::new(None, None, options, false);
            let removals: Vec<Step> = steps
                .iter()
                .filter(|s| matches!(s, Step::RemoveFile { .. }))
                .cloned()
                .collect();
            if after.run(&removals, &mut || Ok(())).await.is_ok() {
                warnings.extend(after.warnings);
            }
            return Ok(Outcome {
                warnings,
                removed_files: after.removed,
            });
        }
        // Switched but not finished: the journal entry stays for recovery.
        Err(failure) => return Err(failure.error),
    }
    lock.resolve(record, journal)?;
    Ok(Outcome {
        warnings: exec.warnings,
        removed_files: exec.removed,
    })
}
