//! Running a delete: the steps of [`crate::plan::delete`], and what a failure
//! means for it. Jobs stopped before they switched anything are cancelled and
//! the record is unchanged, except when one of them was a commit: it had begun
//! writing into the snapshot's frozen image, which then no longer holds the
//! snapshot's state, so the snapshot goes (the chain is unchanged and every
//! other snapshot intact).

use super::exec::Executor;
use super::{Context, Outcome};
use crate::error::{Error, Result};
use crate::images;
use crate::operation::{Boundary, Delete, Operation};
use crate::plan::Step;
use crate::plan::delete::apply;

pub(crate) async fn run(ctx: Context<'_>, op: &Delete, steps: &[Step]) -> Result<Outcome> {
    let Context {
        client,
        lock,
        record,
        options,
        was_running,
    } = ctx;
    // Offline merges write images: make sure no process holds them.
    for d in op.disks.iter().filter(|d| d.job.is_none()) {
        match &d.merge {
            Boundary::Commit { base, .. } => images::ensure_unlocked(base)?,
            Boundary::Stream { into, .. } => images::ensure_unlocked(into)?,
            Boundary::Drop | Boundary::Keep { .. } => {}
        }
    }
    let journal = lock.begin(record, Operation::Delete(op.clone()))?;
    let mut exec = Executor::new(client, None, options, was_running);
    let mut removed = Vec::new();
    let result = exec
        .run(steps, &mut || {
            removed = apply(record, op);
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
        // Only file removals follow the record step; they do not fail.
        lock.resolve(record, journal)?;
        return Err(failure.error);
    }
    let commit_started = failure.switched || exec.rollback().await;
    if !commit_started {
        lock.resolve(record, journal)?;
        return Err(failure.error);
    }
    let metadata_only = Delete {
        snapshot: op.snapshot.clone(),
        disks: Vec::new(),
    };
    let files = apply(record, &metadata_only);
    debug_assert!(files.is_empty(), "an unchanged chain frees no file");
    lock.resolve(record, journal)?;
    Err(Error::CutShort(format!(
        "{}: the merge was cancelled after it had started writing into the frozen image of {1}, so {1} is removed from the record (the chain is unchanged, every other snapshot is intact)",
        failure.error.stop_reason(),
        op.snapshot
    )))
}
