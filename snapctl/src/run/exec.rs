//! The executor: carries out a plan's steps, exactly the values `--dry-run`
//! prints, and nothing else that changes QEMU, the images or the record.
//!
//! What it keeps track of, so that a failure leaves things as they were:
//! the overlay files it created and the nodes it added (undone by
//! [`Executor::rollback`] while nothing has switched), a guest frozen by the
//! agent (always thawed), a VM it stopped (continued again on rollback), the
//! merge jobs it started ([`super::jobs`]: cancelled on rollback). Steps that
//! switch what QEMU writes (`transaction`, `qom-set`, `job-finalize`) are the
//! point of no return: after one of them succeeded nothing is undone, and the
//! journal entry stays open for recovery if a later step fails.
//!
//! Every step carried out is appended, as one JSON line, to the file named by
//! `SNAPCTL_STEP_LOG` when that is set: an audit trail of what snapctl did,
//! and how the tests check that what runs is what `--dry-run` printed.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;

use futures_util::future::join_all;
use qmp_client::{Client, GuestAgent};
use serde_json::{Value, json};

use super::jobs::Jobs;
use super::{Interrupt, RunOptions};
use crate::error::{Error, Result};
use crate::graph::{self, KnownNodes, LiveGraph};
use crate::images;
use crate::plan::Step;

/// QMP commands after which the devices write somewhere new.
const SWITCHES: [&str; 3] = ["transaction", "qom-set", "job-finalize"];

/// Why a run of steps stopped.
#[derive(Debug)]
pub(crate) struct Failure {
    pub error: Error,
    /// A switching step had succeeded before: nothing may be undone.
    pub switched: bool,
    /// The record step had run (the record holds the operation's result).
    pub recorded: bool,
}

/// Carries out steps against QEMU (when it runs), the guest agent, the image
/// tools and the files.
pub(crate) struct Executor<'a> {
    client: Option<&'a Client>,
    agent: Option<&'a mut GuestAgent>,
    options: &'a RunOptions,
    /// The guest's CPUs ran before the operation (a `stop` is undone by `cont`).
    was_running: bool,
    jobs: Jobs,
    created_files: Vec<PathBuf>,
    added_nodes: Vec<String>,
    stopped: bool,
    frozen: Option<u64>,
    switched: bool,
    recorded: bool,
    /// The nodes whose files are known: the graph the plan was made on and
    /// the nodes the plan adds (what makes the check before a file removal cheap).
    pub known: KnownNodes,
    /// The files QEMU has open, read once before the first file removal.
    open_files: Option<HashSet<PathBuf>>,
    /// QEMU's node names as read for that check; dropped by any later step
    /// that may change the graph (kept for the node map after the run).
    pub layout: Option<graph::Layout>,
    pub warnings: Vec<String>,
    pub removed: Vec<PathBuf>,
}

impl std::fmt::Debug for Executor<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Executor")
            .field("switched", &self.switched)
            .field("recorded", &self.recorded)
            .finish_non_exhaustive()
    }
}

impl<'a> Executor<'a> {
    pub fn new(
        client: Option<&'a Client>,
        agent: Option<&'a mut GuestAgent>,
        options: &'a RunOptions,
        was_running: bool,
        planned_on: Option<&LiveGraph>,
    ) -> Executor<'a> {
        Executor {
            client,
            agent,
            options,
            was_running,
            jobs: Jobs::default(),
            created_files: Vec::new(),
            added_nodes: Vec::new(),
            stopped: false,
            frozen: None,
            switched: false,
            recorded: false,
            known: planned_on.map(KnownNodes::of).unwrap_or_default(),
            open_files: None,
            layout: None,
            warnings: Vec::new(),
            removed: Vec::new(),
        }
    }

    /// Whether a step that switches what QEMU writes had succeeded.
    pub fn switched(&self) -> bool {
        self.switched
    }

    fn interrupt(&self) -> &Interrupt {
        &self.options.interrupt
    }

    /// Runs `steps` in order. At the record step, `record` is called to apply
    /// the operation to the record and save it. A guest frozen by an earlier
    /// step is thawed whatever happens.
    pub async fn run(
        &mut self,
        steps: &[Step],
        record: &mut (dyn FnMut() -> Result<()> + Send),
    ) -> std::result::Result<(), Failure> {
        for step in steps {
            if let Step::Qmp { command, arguments } = step
                && command == "blockdev-add"
            {
                self.known.add(arguments);
            }
        }
        // An overlay that cannot be owned like the image it covers fails the
        // run before its first step.
        for step in steps {
            if let Step::CreateOverlay { path, backing, .. } = step
                && let Err(error) = crate::qcow2::overlay_ownership(
                    path,
                    &crate::qcow2::covered_image(path, backing),
                )
            {
                return Err(Failure {
                    error,
                    switched: false,
                    recorded: false,
                });
            }
        }
        let mut i = 0;
        while i < steps.len() {
            // Consecutive independent `blockdev-add`s go out together.
            let batch = node_batch(&steps[i..]);
            let result = if batch > 0 {
                self.add_nodes(&steps[i..i + batch]).await
            } else {
                self.step(&steps[i], record).await
            };
            if let Err(error) = result {
                self.thaw_if_frozen().await;
                return Err(Failure {
                    error,
                    switched: self.switched,
                    recorded: self.recorded,
                });
            }
            let done = batch.max(1);
            for s in &steps[i..i + done] {
                log_step(s);
            }
            i += done;
        }
        Ok(())
    }

    async fn add_nodes(&mut self, steps: &[Step]) -> Result<()> {
        self.interrupt().check()?;
        crate::fault::point("create:formatted");
        let client = self.qemu()?;
        let sent = steps.iter().map(|s| async move {
            let Step::Qmp { arguments, .. } = s else {
                unreachable!("a batch holds only blockdev-add steps")
            };
            client
                .execute_raw("blockdev-add", arguments.clone())
                .await
                .map(|_| {
                    arguments["node-name"]
                        .as_str()
                        .unwrap_or_default()
                        .to_owned()
                })
        });
        let mut first_error = None;
        for result in join_all(sent).await {
            match result {
                Ok(node) => self.added_nodes.push(node),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if let Some(e) = first_error {
            return Err(e.into());
        }
        crate::fault::point("create:added");
        Ok(())
    }

    fn qemu(&self) -> Result<&'a Client> {
        self.client
            .ok_or_else(|| Error::Refused("this step needs QEMU running, and it is not".into()))
    }

    async fn step(
        &mut self,
        step: &Step,
        record: &mut (dyn FnMut() -> Result<()> + Send),
    ) -> Result<()> {
        if !self.switched {
            self.interrupt().check()?;
        }
        if matches!(
            step,
            Step::Qmp { .. } | Step::AwaitJobs { .. } | Step::ReleaseNode { .. }
        ) {
            self.layout = None;
        }
        match step {
            Step::CreateOverlay {
                path,
                backing,
                backing_format,
                size,
            } => {
                crate::qcow2::new_overlay(path, *size, backing, backing_format)?;
                self.created_files.push(path.clone());
            }
            Step::CreateImage { path, format, size } => {
                crate::qcow2::new_image(path, format, *size)?;
                self.created_files.push(path.clone());
            }
            Step::CreateStateFile { path } => {
                crate::qcow2::new_state_file(path)?;
                self.created_files.push(path.clone());
            }
            Step::GuestAgent { command } => self.guest_agent(command).await?,
            Step::Qmp { command, arguments } => self.qmp(command, arguments).await?,
            Step::AwaitJobs { jobs, status } => {
                let client = self.qemu()?;
                let interruptible = !self.switched;
                self.jobs
                    .await_status(client, jobs, status, self.options, interruptible)
                    .await?;
            }
            Step::ReleaseNode { node } => {
                if let Err(e) = self
                    .qemu()?
                    .execute_raw("blockdev-del", json!({ "node-name": node }))
                    .await
                {
                    tracing::debug!(node, error = %e, "node kept");
                }
            }
            Step::Tool { argv } => images::run_tool(argv)?,
            Step::Record { .. } => {
                if !self.recorded {
                    record()?;
                    self.recorded = true;
                }
            }
            Step::RemoveFile { path } => self.remove_file(path).await?,
        }
        Ok(())
    }

    async fn qmp(&mut self, command: &str, arguments: &Value) -> Result<()> {
        let client = self.qemu()?;
        match command {
            "qom-set" if !self.switched => crate::fault::point("revert:prepared"),
            "job-finalize" if !self.switched => crate::fault::point("jobs:pending"),
            "job-dismiss" => crate::fault::point("jobs:finalized"),
            _ => {}
        }
        match command {
            "block-commit" | "block-stream" | "snapshot-save" | "snapshot-load"
            | "snapshot-delete" => {
                self.jobs.start(client, command, arguments).await?;
                crate::fault::point("jobs:started");
            }
            "job-complete" | "job-finalize" | "job-dismiss" => {
                let id = arguments["id"].as_str().unwrap_or_default();
                self.jobs.verb(command, id).await?;
            }
            _ => {
                client.execute_raw(command, arguments.clone()).await?;
            }
        }
        match command {
            "blockdev-add" => self
                .added_nodes
                .extend(arguments["node-name"].as_str().map(str::to_owned)),
            "stop" => self.stopped = self.was_running,
            _ => {}
        }
        if SWITCHES.contains(&command) {
            self.switched = true;
        }
        match command {
            "transaction" => crate::fault::point("create:switched"),
            "qom-set" => crate::fault::point("revert:switched"),
            _ => {}
        }
        Ok(())
    }

    async fn guest_agent(&mut self, command: &str) -> Result<()> {
        let agent = self.agent.as_deref_mut().ok_or_else(|| {
            Error::GuestAgent("--quiesce needs the guest agent socket (--qga)".into())
        })?;
        match command {
            "guest-fsfreeze-freeze" => {
                let n = agent
                    .fsfreeze_freeze()
                    .await
                    .map_err(|e| Error::GuestAgent(format!("guest-fsfreeze-freeze failed: {e}")))?;
                self.frozen = Some(n);
            }
            "guest-fsfreeze-thaw" => self.thaw_if_frozen().await,
            other => {
                return Err(Error::GuestAgent(format!(
                    "snapctl does not send {other} to the guest agent"
                )));
            }
        }
        Ok(())
    }

    /// Thaws a guest this run froze (retrying once); a problem is a warning:
    /// the snapshot itself is taken or undone either way.
    async fn thaw_if_frozen(&mut self) {
        let (Some(frozen), Some(agent)) = (self.frozen.take(), self.agent.as_deref_mut()) else {
            return;
        };
        let mut thawed = agent.fsfreeze_thaw().await;
        if thawed.is_err() {
            thawed = agent.fsfreeze_thaw().await;
        }
        match thawed {
            Ok(n) if n == frozen => {}
            Ok(n) => self.warnings.push(format!(
                "the guest agent froze {frozen} filesystems but thawed {n}: something else thawed in between, so consistency is suspect"
            )),
            Err(e) => self.warnings.push(format!(
                "guest-fsfreeze-thaw failed ({e}): the guest may still be frozen"
            )),
        }
    }

    async fn remove_file(&mut self, path: &PathBuf) -> Result<()> {
        if self.open_files.is_none()
            && let Some(client) = self.client
        {
            if self.layout.is_none() {
                self.layout = graph::read_layout(client).await?;
            }
            self.open_files =
                Some(graph::open_files(client, &self.known, self.layout.as_ref()).await?);
        }
        if self
            .open_files
            .as_ref()
            .is_some_and(|open| open.contains(path))
        {
            self.warnings
                .push(format!("kept {}: QEMU still has it open", path.display()));
            return Ok(());
        }
        match std::fs::remove_file(path) {
            Ok(()) => self.removed.push(path.clone()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => self
                .warnings
                .push(format!("could not remove {}: {e}", path.display())),
        }
        Ok(())
    }

    /// Undoes what the steps so far did, before any switch: cancels the jobs
    /// (returning whether one of them was a commit, which has then written
    /// into its base), deletes the added nodes, removes the created files,
    /// continues a VM this run stopped.
    pub async fn rollback(&mut self) -> bool {
        debug_assert!(!self.switched, "nothing is undone after a switch");
        let commit_started = self.jobs.cancel_all().await;
        if let Some(client) = self.client {
            for node in self.added_nodes.drain(..).rev() {
                if let Err(e) = client
                    .execute_raw("blockdev-del", json!({ "node-name": node }))
                    .await
                {
                    tracing::warn!(node, error = %e, "could not delete node while rolling back");
                }
            }
            if self.stopped {
                let _ = client.execute_raw("cont", Value::Null).await;
            }
        }
        for file in self.created_files.drain(..) {
            if let Err(e) = std::fs::remove_file(&file) {
                tracing::warn!(file = %file.display(), error = %e, "could not remove overlay while rolling back");
            }
        }
        commit_started
    }
}

/// How many steps from the start of `steps` are `blockdev-add`s that do not
/// stand on one another (and can go out together).
fn node_batch(steps: &[Step]) -> usize {
    let mut added: Vec<&str> = Vec::new();
    for (n, step) in steps.iter().enumerate() {
        let Step::Qmp { command, arguments } = step else {
            return n;
        };
        let refers = |key: &str| {
            arguments[key]
                .as_str()
                .is_some_and(|node| added.contains(&node))
        };
        if command != "blockdev-add" || refers("backing") || refers("file") {
            return n;
        }
        added.extend(arguments["node-name"].as_str());
    }
    steps.len()
}

/// Appends `step` to the step log (`SNAPCTL_STEP_LOG`), when one is asked for.
fn log_step(step: &Step) {
    let Some(path) = std::env::var_os("SNAPCTL_STEP_LOG") else {
        return;
    };
    let line = match serde_json::to_string(step) {
        Ok(line) => line,
        Err(e) => {
            tracing::warn!(error = %e, "cannot encode a step for the step log");
            return;
        }
    };
    let written = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = written {
        tracing::warn!(path = %PathBuf::from(&path).display(), error = %e, "cannot write the step log");
    }
}
