//! Running a create: the steps of [`crate::plan::create`], and what a failure
//! means for it. With QEMU stopped the overlays are only written and recorded,
//! after making sure no process holds the images they freeze. Before the `transaction` everything is undone (the nodes
//! added, the files written), so nothing is left behind and the record is
//! unchanged. A `transaction` whose reply was lost may still have happened:
//! QEMU's graph decides.

use qmp_client::GuestAgent;

use super::{Context, Outcome, overlays_active};
use crate::error::{Error, Result};
use crate::images;
use crate::operation::{Create, Operation};
use crate::plan::Step;
use crate::plan::create::apply;

pub(crate) async fn run<'a>(
    mut ctx: Context<'a>,
    op: &Create,
    steps: &[Step],
    agent: Option<&'a mut GuestAgent>,
) -> Result<Outcome> {
    if op.live != ctx.client.is_some() {
        return Err(Error::Drift(
            "QEMU started or stopped since the snapshot was planned: plan it again".into(),
        ));
    }
    if !op.live {
        // With QEMU stopped, nothing may be writing the images being frozen.
        for d in &op.disks {
            images::ensure_unlocked(&d.frozen)?;
        }
    }
    ctx.options.interrupt.check()?;
    let operation = Operation::Create(op.clone());
    let (mut begun, result) = ctx
        .begin(operation, steps, agent, &|r| apply(r, op), false)
        .await?;
    let Err(failure) = result else {
        return ctx.finish(begun).await;
    };
    // The transaction may have happened even though we saw an error
    // (timeout after sending, connection lost): look before undoing.
    let happened = match ctx.client {
        Some(c) if failure.error.result_unknown() => overlays_active(c, op).await,
        _ => false,
    };
    if failure.switched || happened {
        if !failure.recorded {
            apply(ctx.record, op);
        }
        begun.exec.warnings.push(failure.error.to_string());
        return ctx.finish(begun).await;
    }
    begun.exec.rollback().await;
    ctx.abandon(&begun, failure.error)
}
