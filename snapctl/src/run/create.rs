//! Running a create: the steps of [`crate::plan::create`], and what a failure
//! means for it. Before the `transaction` everything is undone (the nodes
//! added, the files written), so nothing is left behind and the record is
//! unchanged. A `transaction` whose reply was lost may still have happened:
//! QEMU's graph decides.

use qmp_client::{Client, GuestAgent};

use super::exec::Executor;
use super::{Context, Outcome};
use crate::error::Result;
use crate::graph;
use crate::operation::{Create, Operation};
use crate::plan::Step;
use crate::plan::create::apply;

pub(crate) async fn run(
    ctx: Context<'_>,
    op: &Create,
    steps: &[Step],
    agent: Option<&mut GuestAgent>,
) -> Result<Outcome> {
    ctx.options.interrupt.check()?;
    let Context {
        client,
        lock,
        record,
        options,
        was_running,
    } = ctx;
    let journal = lock.begin(record, Operation::Create(op.clone()))?;
    let mut exec = Executor::new(client, agent, options, was_running);
    let result = exec
        .run(steps, &mut || {
            apply(record, op);
            Ok(())
        })
        .await;
    match result {
        Ok(()) => {
            lock.resolve(record, journal)?;
            Ok(Outcome {
                warnings: exec.warnings,
                removed_files: exec.removed,
            })
        }
        Err(failure) => {
            // The transaction may have happened even though we saw an error
            // (timeout after sending, connection lost): look before undoing.
            let unknown = failure.error.result_unknown();
            let happened = match client {
                Some(c) if unknown => switched(c, op).await,
                _ => false,
            };
            if failure.switched || happened {
                if !failure.recorded {
                    apply(record, op);
                }
                lock.resolve(record, journal)?;
                let mut warnings = exec.warnings;
                warnings.push(failure.error.to_string());
                return Ok(Outcome {
                    warnings,
                    removed_files: exec.removed,
                });
            }
            exec.rollback().await;
            lock.resolve(record, journal)?;
            Err(failure.error)
        }
    }
}

/// Whether every disk of the create now has its overlay as root.
pub(crate) async fn switched(client: &Client, op: &Create) -> bool {
    match graph::read(client).await {
        Ok(g) => op.disks.iter().all(|d| {
            g.disks
                .get(&d.disk)
                .and_then(|disk| disk.active())
                .is_some_and(|a| a.node == d.overlay_node)
        }),
        Err(_) => false,
    }
}
