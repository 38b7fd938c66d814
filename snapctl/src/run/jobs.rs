//! The merge jobs a plan starts, followed to their end: the one place that
//! drives QEMU block jobs for delete, commit, pull and their recovery.
//!
//! Jobs are started with `auto-finalize: false` and `auto-dismiss: false`
//! (see [`crate::plan::job_steps`]), so several disks' jobs switch their
//! graphs together at `job-finalize` and no job's error is lost. While waiting
//! the runner reports progress, and watches for Ctrl-C and `--timeout`; any
//! of those, or a failing job, cancels every job cleanly.

use std::time::{Duration, Instant};

use qmp_client::{Client, Job, JobStatus};
use serde_json::Value;

use super::RunOptions;
use crate::error::{Error, Result};

/// A merge job's progress, in bytes.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub job: String,
    pub current: u64,
    pub total: u64,
}

/// Receives progress updates (the binary draws a bar or prints JSON lines).
pub type ProgressFn = std::sync::Arc<dyn Fn(&Progress) + Send + Sync>;

/// How long a merge may take when no `--timeout` is given.
const NO_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// How often progress is read and interruption checked while jobs run.
const TICK: Duration = Duration::from_millis(250);

/// A started job and whether it is a commit (which writes into its base even
/// when cancelled).
#[derive(Debug)]
struct Tracked {
    job: Job,
    commit: bool,
    /// The job's error, read when it concluded.
    error: Option<String>,
}

/// The jobs an executor has started.
#[derive(Debug, Default)]
pub(crate) struct Jobs {
    started: Vec<Tracked>,
    deadline: Option<Instant>,
}

impl Jobs {
    /// Starts `command` (a `block-commit` or `block-stream` with a `job-id`).
    pub async fn start(&mut self, client: &Client, command: &str, arguments: &Value) -> Result<()> {
        let id = arguments["job-id"].as_str().unwrap_or_default();
        let job = client.start_job_raw(id, command, arguments.clone()).await?;
        self.started.push(Tracked {
            job,
            commit: command == "block-commit",
            error: None,
        });
        Ok(())
    }

    fn find(&mut self, id: &str) -> Result<&mut Tracked> {
        self.started
            .iter_mut()
            .find(|t| t.job.id() == id)
            .ok_or_else(|| Error::Graph(format!("job {id} was not started by this run")))
    }

    /// Waits until every job of `ids` reaches `status`, job by job, reporting
    /// progress every tick and giving up on Ctrl-C or when the timeout passes.
    pub async fn await_status(
        &mut self,
        client: &Client,
        ids: &[String],
        status: &str,
        options: &RunOptions,
        interruptible: bool,
    ) -> Result<()> {
        let wanted: JobStatus = status.parse().unwrap_or_else(|never| match never {});
        let limit = options.timeout.unwrap_or(NO_TIMEOUT);
        let deadline = *self.deadline.get_or_insert_with(|| Instant::now() + limit);
        for id in ids {
            loop {
                let tracked = self.find(id)?;
                match tracked
                    .job
                    .wait_for(std::slice::from_ref(&wanted), TICK)
                    .await
                {
                    Ok(_) if wanted == JobStatus::Concluded => {
                        // Its error (if it failed) is reported when it is dismissed.
                        tracked.error = tracked.job.error().await?;
                        break;
                    }
                    Ok(_) => break,
                    Err(qmp_client::Error::WaitTimeout { .. }) => {}
                    Err(qmp_client::Error::Job { id, message }) => {
                        return Err(Error::JobFailed(format!("job {id}: {message}")));
                    }
                    Err(e) => return Err(e.into()),
                }
                // Past the point of no return a job is waited out: stopping
                // then would leave the graph half switched.
                if interruptible {
                    options.interrupt.check()?;
                    if Instant::now() >= deadline {
                        return Err(Error::TimedOut(format!(
                            "job {id} did not finish within {limit:?} and was cancelled"
                        )));
                    }
                }
                self.report(client, options).await;
            }
        }
        Ok(())
    }

    async fn report(&self, client: &Client, options: &RunOptions) {
        let Some(report) = &options.progress else {
            return;
        };
        let Ok(all) = client.query_jobs().await else {
            return;
        };
        for info in all
            .iter()
            .filter(|j| self.started.iter().any(|t| t.job.id() == j.id))
        {
            report(&Progress {
                job: info.id.clone(),
                current: info.current_progress,
                total: info.total_progress,
            });
        }
    }

    /// `job-complete`, `job-finalize` or `job-dismiss` on a job this run
    /// started. Dismissing the last one fails when any of them failed.
    pub async fn verb(&mut self, command: &str, id: &str) -> Result<()> {
        let tracked = self.find(id)?;
        match command {
            "job-complete" => tracked.job.complete().await?,
            "job-finalize" => tracked.job.finalize().await?,
            "job-dismiss" => {
                tracked.job.dismiss().await?;
                let all_dismissed = self
                    .started
                    .iter()
                    .all(|t| *t.job.status() == JobStatus::Null);
                let errors: Vec<String> = self
                    .started
                    .iter()
                    .filter_map(|t| {
                        t.error
                            .as_ref()
                            .map(|e| format!("job {} failed: {e}", t.job.id()))
                    })
                    .collect();
                if all_dismissed && !errors.is_empty() {
                    return Err(Error::JobFailed(errors.join("; ")));
                }
            }
            other => {
                return Err(Error::Graph(format!(
                    "{other} is not a job verb snapctl uses"
                )));
            }
        }
        Ok(())
    }

    /// Cancels every job not yet finished, waits for each to conclude and
    /// dismisses it. Returns whether any of them was a commit (which has then
    /// written into its base).
    pub async fn cancel_all(&mut self) -> bool {
        for t in &self.started {
            let _ = t.job.cancel().await;
        }
        for t in &mut self.started {
            if *t.job.status() != JobStatus::Null {
                let _ = t.job.wait_concluded(Duration::from_secs(60)).await;
                let _ = t.job.dismiss().await;
            }
        }
        self.started.iter().any(|t| t.commit)
    }
}
