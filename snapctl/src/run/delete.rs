//! Running a delete: the steps of [`crate::plan::delete`], and what a failure
//! means for it. Jobs stopped before they switched anything are cancelled and
//! the record is unchanged, except when one of them was a commit: it had begun
//! writing into the snapshot's frozen image, which then no longer holds the
//! snapshot's state, so the snapshot goes (the chain is unchanged and every
//! other snapshot intact).

use super::{Context, Outcome};
use crate::error::{Error, Result};
use crate::images;
use crate::operation::{Boundary, Delete, Operation};
use crate::plan::Step;
use crate::plan::delete::apply;

pub(crate) async fn run(mut ctx: Context<'_>, op: &Delete, steps: &[Step]) -> Result<Outcome> {
    // Offline merges write images: make sure no process holds them.
    for d in op.disks.iter().filter(|d| d.job.is_none()) {
        match &d.merge {
            Boundary::Commit { base, .. } => images::ensure_unlocked(base)?,
            Boundary::Stream { into, .. } => images::ensure_unlocked(into)?,
            Boundary::Drop | Boundary::Keep { .. } => {}
        }
    }
    let operation = Operation::Delete(op.clone());
    let (mut begun, result) = ctx
        .begin(operation, steps, None, &|r| drop(apply(r, op)), false)
        .await?;
    let Err(failure) = result else {
        return ctx.finish(begun).await;
    };
    if !ctx.stop(&mut begun, &failure).await {
        return ctx.abandon(&begun, failure.error);
    }
    ctx.record.remove_snapshot(&op.snapshot);
    let error = Error::CutShort(format!(
        "{}: the merge was cancelled after it had started writing into the frozen image of {1}, so {1} is removed from the record (the chain is unchanged, every other snapshot is intact)",
        failure.error.stop_reason(),
        op.snapshot
    ));
    ctx.abandon(&begun, error)
}
