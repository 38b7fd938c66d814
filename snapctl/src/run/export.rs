//! Running an export: the steps of [`crate::plan::export`]. Nothing of the
//! VM changes; a failure removes the partial output file.

use super::{Context, Outcome};
use crate::error::Result;
use crate::operation::{Export, Operation};
use crate::plan::Step;

pub(crate) async fn run(mut ctx: Context<'_>, op: &Export, steps: &[Step]) -> Result<Outcome> {
    let operation = Operation::Export(op.clone());
    let (mut begun, result) = ctx.begin(operation, steps, None, &|_| {}, false).await?;
    let Err(failure) = result else {
        return ctx.finish(begun).await;
    };
    begun.exec.rollback().await;
    ctx.abandon(&begun, failure.error)
}
