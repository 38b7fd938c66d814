//! Running a clone: the overlays of [`crate::plan::clone`] are written, the
//! clone's record is created (under its own lock), and the images it stands
//! on are pinned in the source VM's record. A failure removes the overlays
//! and leaves both records as they were.

use super::{Context, Outcome};
use crate::error::{Error, Result};
use crate::operation::{Clone, Operation};
use crate::plan::Step;
use crate::plan::clone::{apply, new_record};
use crate::store::Store;

pub(crate) async fn run(
    mut ctx: Context<'_>,
    store: &Store,
    op: &Clone,
    steps: &[Step],
) -> Result<Outcome> {
    let target = store.lock(&op.to, std::time::Duration::ZERO)?;
    if target.load()?.is_some() {
        return Err(Error::Refused(format!(
            "vm {} already has a record: choose another name, or `snapctl --vm {0} forget` it",
            op.to
        )));
    }
    let clone_record = new_record(ctx.record, op);
    let operation = Operation::Clone(op.clone());
    let (mut begun, result) = ctx
        .begin(operation, steps, None, &|r| apply(r, op), false)
        .await?;
    let saved = result
        .map_err(|f| f.error)
        .and_then(|()| target.save(&clone_record));
    match saved {
        Ok(()) => ctx.finish(begun).await,
        Err(error) => {
            ctx.record.unpin(&op.to);
            begun.exec.rollback().await;
            ctx.abandon(&begun, error)
        }
    }
}
