//! Running an internal-snapshot operation: the steps of
//! [`crate::plan::internal`]. QEMU's `snapshot-*` jobs change all the images
//! or none, so a failure leaves nothing to undo; the error carries QEMU's
//! reason (a device that blocks migration, a full disk).

use super::{Context, Outcome};
use crate::error::Result;
use crate::images;
use crate::operation::{Internal, InternalAction, Operation};
use crate::plan::Step;
use crate::plan::internal::apply;

pub(crate) async fn run(mut ctx: Context<'_>, op: &Internal, steps: &[Step]) -> Result<Outcome> {
    if !op.live && !op.keep_files {
        // qemu-img writes the images: no process may hold them.
        for d in &op.disks {
            images::ensure_unlocked(&d.image)?;
        }
    }
    let operation = Operation::Internal(op.clone());
    let save = op.action == InternalAction::Load;
    let (mut begun, result) = ctx
        .begin(operation, steps, None, &|r| apply(r, op), save)
        .await?;
    let Err(failure) = result else {
        return ctx.finish(begun).await;
    };
    if failure.recorded {
        return ctx.abandon(&begun, failure.error);
    }
    begun.exec.rollback().await;
    ctx.abandon(&begun, failure.error)
}
