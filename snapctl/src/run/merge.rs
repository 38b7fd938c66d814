//! Running a raw `commit` or `pull`: the steps of [`crate::plan::merge`], and
//! what a failure means. A stopped stream changes nothing. A stopped commit
//! has written part of the top into the base: the snapshots whose state lived
//! in the base (and the layers merged) are removed from the record, and the
//! chain is unchanged.

use super::exec::Executor;
use super::{Context, Outcome};
use crate::error::{Error, Result};
use crate::images;
use crate::operation::{Merge, Operation};
use crate::plan::Step;
use crate::plan::merge::apply;

pub(crate) async fn run(
    ctx: Context<'_>,
    op: &Merge,
    operation: &Operation,
    steps: &[Step],
) -> Result<Outcome> {
    let Context {
        client,
        lock,
        record,
        options,
        was_running,
    } = ctx;
    if op.job.is_none() {
        images::ensure_unlocked(op.written())?;
    }
    let journal = lock.begin(record, operation.clone())?;
    let mut exec = Executor::new(client, None, options, was_running);
    let result = exec
        .run(steps, &mut || {
            apply(record, op);
            Ok(())
        })
        .await;
    let Err(failure) = result else {
        lock.resolve(record, journal)?;
        return Ok(Outcome {
            warnings: exec.warnings,
            removed_files: exec.removed,
        });
    };
    if failure.recorded {
        lock.resolve(record, journal)?;
        return Err(failure.error);
    }
    let commit_started = failure.switched || exec.rollback().await;
    if !commit_started {
        lock.resolve(record, journal)?;
        return Err(failure.error);
    }
    for name in &op.removed_snapshots {
        record.remove_snapshot(name);
    }
    lock.resolve(record, journal)?;
    let cause = failure.error.stop_reason();
    Err(Error::CutShort(format!(
        "{cause}: the commit was cancelled after it had started writing into {}; {} removed from the record; the chain is unchanged",
        op.written().display(),
        if op.removed_snapshots.is_empty() {
            "no snapshot".to_owned()
        } else {
            op.removed_snapshots.join(", ")
        }
    )))
}
