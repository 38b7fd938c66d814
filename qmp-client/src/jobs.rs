//! QEMU's job state machine, driven by `JOB_STATUS_CHANGE` events.
//!
//! Start a job through [`Client::start_job`] (or [`Client::start_job_raw`]):
//! it subscribes to events *before* sending the command, so no transition
//! can be missed, and matches events by job id. Jobs should be started with
//! `auto-dismiss: false` so that a failure's error text survives until read;
//! [`Job::wait_concluded`] then returns it, and [`Job::dismiss`] removes the job.
//!
//! States (QEMU `job.c`): created → running → (paused | ready ⇄ standby) →
//! waiting → pending → concluded → null, with aborting on cancel or failure.
//! A failed job still ends `concluded`, with `error` set in `query-jobs`.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::client::Client;
use crate::error::{Error, Result};
use crate::events::{EventItem, Events};

/// A job's state. Unknown states from a newer QEMU are kept as `Other`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum JobStatus {
    Undefined,
    Created,
    Running,
    Paused,
    Ready,
    Standby,
    Waiting,
    Pending,
    Aborting,
    Concluded,
    /// The job is gone (dismissed, or never existed).
    Null,
    Other(String),
}

impl JobStatus {
    /// The job has finished running: only dismissal remains.
    pub fn is_finished(&self) -> bool {
        matches!(self, JobStatus::Concluded | JobStatus::Null)
    }

    pub fn as_str(&self) -> &str {
        match self {
            JobStatus::Undefined => "undefined",
            JobStatus::Created => "created",
            JobStatus::Running => "running",
            JobStatus::Paused => "paused",
            JobStatus::Ready => "ready",
            JobStatus::Standby => "standby",
            JobStatus::Waiting => "waiting",
            JobStatus::Pending => "pending",
            JobStatus::Aborting => "aborting",
            JobStatus::Concluded => "concluded",
            JobStatus::Null => "null",
            JobStatus::Other(s) => s,
        }
    }
}

impl FromStr for JobStatus {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> std::result::Result<JobStatus, Self::Err> {
        Ok(match s {
            "undefined" => JobStatus::Undefined,
            "created" => JobStatus::Created,
            "running" => JobStatus::Running,
            "paused" => JobStatus::Paused,
            "ready" => JobStatus::Ready,
            "standby" => JobStatus::Standby,
            "waiting" => JobStatus::Waiting,
            "pending" => JobStatus::Pending,
            "aborting" => JobStatus::Aborting,
            "concluded" => JobStatus::Concluded,
            "null" => JobStatus::Null,
            other => JobStatus::Other(other.to_owned()),
        })
    }
}

impl fmt::Display for JobStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl<'de> Deserialize<'de> for JobStatus {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(s.parse().unwrap_or_else(|never| match never {}))
    }
}

/// One entry of `query-jobs`, read leniently (unknown job types and states
/// from a newer QEMU are fine).
#[derive(Debug, Clone, Deserialize)]
pub struct JobInfo {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub status: JobStatus,
    #[serde(rename = "current-progress")]
    pub current_progress: u64,
    #[serde(rename = "total-progress")]
    pub total_progress: u64,
    /// Set when the job failed.
    #[serde(default)]
    pub error: Option<String>,
}

impl Client {
    /// All of QEMU's jobs (`query-jobs`): block jobs, `create`, `snapshot-*`.
    pub async fn query_jobs(&self) -> Result<Vec<JobInfo>> {
        let reply = self.execute_raw("query-jobs", Value::Null).await?;
        crate::message::decode_reply("query-jobs", reply)
    }

    /// Starts a job with a typed command whose arguments carry `job-id: id`.
    /// Subscribes before sending, so the returned [`Job`] sees every transition.
    pub async fn start_job<C: qapi::Command>(&self, id: &str, command: C) -> Result<Job> {
        let events = self.subscribe();
        self.execute(command).await?;
        Ok(Job::new(self.clone(), id, events, JobStatus::Created))
    }

    /// Starts a job with a raw command; `arguments` must carry `job-id: id`.
    pub async fn start_job_raw(&self, id: &str, name: &str, arguments: Value) -> Result<Job> {
        let events = self.subscribe();
        self.execute_raw(name, arguments).await?;
        Ok(Job::new(self.clone(), id, events, JobStatus::Created))
    }

    /// A handle to a job that already exists (started by someone else or by an
    /// earlier run). Its current state is read from `query-jobs`.
    pub async fn attach_job(&self, id: &str) -> Result<Job> {
        let events = self.subscribe();
        let mut job = Job::new(self.clone(), id, events, JobStatus::Undefined);
        job.refresh().await?;
        Ok(job)
    }
}

/// A running QEMU job, followed through its events.
#[derive(Debug)]
pub struct Job {
    client: Client,
    id: String,
    events: Events,
    status: JobStatus,
    /// The error carried by `BLOCK_JOB_COMPLETED`, kept because a job started
    /// with QEMU's default `auto-dismiss: true` leaves `query-jobs` in the same
    /// main-loop turn as it concludes, taking its `error` with it.
    event_error: Option<String>,
    /// Its `BLOCK_JOB_COMPLETED` event was seen: QEMU sends it, with the
    /// error when the job failed, before the job concludes, so the outcome
    /// is known without asking `query-jobs`.
    completed_event: bool,
}

impl Job {
    fn new(client: Client, id: &str, events: Events, status: JobStatus) -> Job {
        Job {
            client,
            id: id.to_owned(),
            events,
            status,
            event_error: None,
            completed_event: false,
        }
    }

    /// The job id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The last state seen.
    pub fn status(&self) -> &JobStatus {
        &self.status
    }

    /// This job's `query-jobs` entry, `None` once it is gone.
    pub async fn info(&self) -> Result<Option<JobInfo>> {
        let jobs = self.client.query_jobs().await?;
        Ok(jobs.into_iter().find(|j| j.id == self.id))
    }

    /// Progress as `(current, total)` in the job's own units (bytes for block jobs).
    pub async fn progress(&self) -> Result<(u64, u64)> {
        Ok(self
            .info()
            .await?
            .map(|i| (i.current_progress, i.total_progress))
            .unwrap_or_default())
    }

    /// The job's error text, if it failed: from `query-jobs` while the job is
    /// listed, otherwise from the `BLOCK_JOB_COMPLETED` event seen while following it.
    pub async fn error(&self) -> Result<Option<String>> {
        Ok(match self.info().await? {
            Some(info) => info.error.or_else(|| self.event_error.clone()),
            None => self.event_error.clone(),
        })
    }

    /// Re-reads the state from `query-jobs` (after a lag, or to attach).
    async fn refresh(&mut self) -> Result<()> {
        self.status = match self.info().await? {
            Some(info) => info.status,
            None => JobStatus::Null,
        };
        Ok(())
    }

    /// Waits until the job is in one of `wanted`, for at most `timeout`.
    ///
    /// Fails with [`Error::Job`] when the job finishes without passing through
    /// a wanted state (carrying QEMU's error text when it failed), and with
    /// [`Error::WaitTimeout`] when time runs out.
    pub async fn wait_for(&mut self, wanted: &[JobStatus], timeout: Duration) -> Result<JobStatus> {
        let what = format!(
            "job {} to reach {}",
            self.id,
            wanted
                .iter()
                .map(JobStatus::as_str)
                .collect::<Vec<_>>()
                .join(" or ")
        );
        match tokio::time::timeout(timeout, self.follow(wanted)).await {
            Ok(result) => result,
            Err(_) => Err(Error::WaitTimeout {
                what: format!("{what} (last seen {})", self.status),
                after: timeout,
            }),
        }
    }

    async fn follow(&mut self, wanted: &[JobStatus]) -> Result<JobStatus> {
        loop {
            if wanted.contains(&self.status) {
                return Ok(self.status.clone());
            }
            if self.status.is_finished() {
                let error = self.error().await.ok().flatten();
                return Err(Error::Job {
                    id: self.id.clone(),
                    message: match error {
                        Some(e) => format!("failed: {e}"),
                        None => {
                            format!("ended ({}) before reaching the awaited state", self.status)
                        }
                    },
                });
            }
            match self.events.next().await {
                Some(EventItem::Event(event)) => match event.name.as_str() {
                    "JOB_STATUS_CHANGE" if event.str("id") == Some(&self.id) => {
                        if let Some(status) = event.str("status") {
                            self.status = status.parse().unwrap_or_else(|never| match never {});
                        }
                    }
                    "BLOCK_JOB_COMPLETED" if event.str("device") == Some(&self.id) => {
                        self.completed_event = true;
                        if let Some(error) = event.str("error") {
                            self.event_error = Some(error.to_owned());
                        }
                    }
                    _ => {}
                },
                // Events were dropped for us: the truth is in query-jobs.
                Some(EventItem::Lagged(_)) => self.refresh().await?,
                Some(EventItem::Disconnected(reason)) => return Err(Error::Closed { reason }),
                None => return Err(Error::Closed { reason: None }),
            }
        }
    }

    /// Waits for `concluded` and returns the job's error text (`None` on success).
    /// For a block job whose `BLOCK_JOB_COMPLETED` event was seen, that event
    /// says it; otherwise `query-jobs` does.
    ///
    /// When the connection closes right after the job concluded, before its
    /// `query-jobs` entry could be read (a relay whose owner finished with the
    /// job, say), the error is the one its `BLOCK_JOB_COMPLETED` event carried.
    pub async fn wait_concluded(&mut self, timeout: Duration) -> Result<Option<String>> {
        match self.wait_for(&[JobStatus::Concluded], timeout).await {
            Ok(_) if self.completed_event => Ok(self.event_error.clone()),
            Ok(_) => match self.error().await {
                Err(e) if e.is_closed() => Ok(self.event_error.clone()),
                other => other,
            },
            // Dismissed behind our back (auto-dismiss): the event told us the outcome.
            Err(Error::Job { .. }) if self.status == JobStatus::Null => {
                Ok(self.event_error.clone())
            }
            Err(e) => Err(e),
        }
    }

    /// Runs the job to its end: waits for `concluded`, dismisses it, and turns
    /// a failure into [`Error::Job`] with QEMU's error text.
    pub async fn finish(&mut self, timeout: Duration) -> Result<()> {
        let error = self.wait_concluded(timeout).await?;
        self.dismiss().await?;
        match error {
            Some(message) => Err(Error::Job {
                id: self.id.clone(),
                message: format!("failed: {message}"),
            }),
            None => Ok(()),
        }
    }

    async fn verb(&self, command: &str) -> Result<()> {
        self.client
            .execute_raw(command, json!({ "id": self.id }))
            .await
            .map(drop)
    }

    /// `job-complete`: pivot a ready mirror or active commit.
    pub async fn complete(&self) -> Result<()> {
        self.verb("job-complete").await
    }

    /// `job-finalize`: apply a pending job's graph changes (`auto-finalize: false`).
    pub async fn finalize(&self) -> Result<()> {
        self.verb("job-finalize").await
    }

    /// `job-cancel`. The job then goes through aborting to concluded.
    pub async fn cancel(&self) -> Result<()> {
        self.verb("job-cancel").await
    }

    /// `job-dismiss`: remove a concluded job (and release the nodes it held).
    /// A job QEMU already dismissed itself (`auto-dismiss: true`) counts as dismissed.
    pub async fn dismiss(&mut self) -> Result<()> {
        match self.verb("job-dismiss").await {
            Ok(()) => {}
            Err(e) if self.status.is_finished() && self.info().await?.is_none() => {
                tracing::debug!(job = %self.id, error = %e, "job was already dismissed");
            }
            Err(e) => return Err(e),
        }
        self.status = JobStatus::Null;
        Ok(())
    }

    /// `block-job-set-speed` (bytes per second, 0 for unlimited).
    pub async fn set_speed(&self, bytes_per_second: u64) -> Result<()> {
        self.client
            .execute_raw(
                "block-job-set-speed",
                json!({ "device": self.id, "speed": bytes_per_second }),
            )
            .await
            .map(drop)
    }
}
