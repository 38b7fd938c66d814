//! Running a raw `commit` or `pull`: the steps of [`crate::plan::merge`], and
//! what a failure means. A stopped stream changes nothing. A stopped commit
//! has written part of the top into the base: the snapshots whose state lived
//! in the base (and the layers merged) are removed from the record, and the
//! chain is unchanged.

use super::{Context, Outcome};
use crate::error::{Error, Result};
use crate::images;
use crate::operation::{Merge, Operation};
use crate::plan::Step;
use crate::plan::merge::apply;

pub(crate) async fn run(
    mut ctx: Context<'_>,
    op: &Merge,
    operation: &Operation,
    steps: &[Step],
) -> Result<Outcome> {
    if op.job.is_none() {
        images::ensure_unlocked(op.written())?;
    }
    let (mut begun, result) = ctx
        .begin(
            operation.clone(),
            steps,
            None,
            &|r| drop(apply(r, op)),
            false,
        )
        .await?;
    let Err(failure) = result else {
        return ctx.finish(begun).await;
    };
    if !ctx.stop(&mut begun, &failure).await {
        return ctx.abandon(&begun, failure.error);
    }
    for name in &op.removed_snapshots {
        ctx.record.remove_snapshot(name);
    }
    let error = Error::CutShort(format!(
        "{}: the commit was cancelled after it had started writing into {}; {} removed from the record; the chain is unchanged",
        failure.error.stop_reason(),
        op.written().display(),
        if op.removed_snapshots.is_empty() {
            "no snapshot".to_owned()
        } else {
            op.removed_snapshots.join(", ")
        }
    ));
    ctx.abandon(&begun, error)
}
