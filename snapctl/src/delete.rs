//! `delete`: remove a snapshot and, when it is safe, merge its boundary away.
//!
//! Snapshot S froze image F on each disk; the layer directly on top of F (C)
//! holds what was written after S. Deleting S means F and C no longer need to
//! be separate. Two merges exist (QEMU-NOTES §4):
//!
//! - commit C down into F: F is written, so F must be owned by snapctl, held
//!   by no other snapshot, and C must be F's only dependent (another branch on
//!   F would be corrupted). C then disappears; whatever pointed at C points at F.
//! - stream F up into C: C is written, but what C shows does not change, so
//!   this is safe whoever depends on C; C must be owned (foreign images are
//!   never written). F then drops out of C's chain.
//!
//! Of the safe ones, the merge that copies fewer allocated bytes is chosen.
//! When none is safe (F is a branch point, or both are foreign), the name is
//! dropped, the layer kept, and the reason said. Live, the merges are QEMU
//! block jobs started with `auto-finalize: false` and finalized together, so
//! a multi-disk delete changes all disks' graphs or none; offline they are
//! `qemu-img commit` / `qemu-img rebase`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use qmp_client::{Client, Job, JobStatus};
use serde::Serialize;
use serde_json::{Value, json};

use crate::error::{Error, Result};
use crate::graph::LiveGraph;
use crate::images;
use crate::names;
use crate::plan::Step;
use crate::record::Record;
use crate::revert::{delete_unused_nodes, prune, refuse_running_jobs, remove_files};
use crate::store::VmLock;

/// How one disk's boundary is merged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(tag = "merge", rename_all = "kebab-case")]
pub enum Merge {
    /// Commit `top` (the layer above the frozen image) into `base` (the frozen image).
    Commit { top: PathBuf, base: PathBuf },
    /// Stream `from` (the frozen image) into `into` (the layer above it).
    Stream { from: PathBuf, into: PathBuf },
    /// Nothing to merge: the frozen image has no layer above it.
    Drop,
    /// No safe merge: the layer stays.
    Keep { reason: String },
}

/// The QEMU job that merges one disk's boundary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct LiveJob {
    pub id: String,
    /// `block-commit` or `block-stream`.
    pub command: String,
    pub arguments: Value,
    /// An active commit: goes `ready` and needs `job-complete` (the pivot).
    pub active: bool,
    /// The nodes that drop out of the chain, deleted afterwards (top first).
    pub stale_nodes: Vec<String>,
}

/// One disk's part of a delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DiskDelete {
    pub disk: String,
    pub frozen: PathBuf,
    pub merge: Merge,
    /// The QEMU job when the merge runs live (its layers are open there);
    /// `None` runs it offline with `qemu-img`.
    pub job: Option<LiveJob>,
}

impl DiskDelete {
    fn live(&self) -> bool {
        self.job.is_some()
    }
}

/// A planned delete of one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DeletePlan {
    pub snapshot: String,
    pub disks: Vec<DiskDelete>,
}

/// Allocated bytes of an image file: what a merge out of it copies, roughly.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(u64::MAX, |m| m.blocks() * 512)
}

/// Plans deleting `name`. With `metadata_only` no merge is planned.
pub fn plan(
    record: &Record,
    live: Option<&LiveGraph>,
    name: &str,
    metadata_only: bool,
) -> Result<DeletePlan> {
    let snapshot = record
        .snapshot(name)
        .ok_or_else(|| Error::UnknownSnapshot {
            vm: record.vm.clone(),
            name: name.to_owned(),
        })?;
    let mut disks = Vec::new();
    for (disk, sd) in &snapshot.disks {
        let f = &sd.image;
        let merge = if metadata_only {
            Merge::Keep {
                reason: "--metadata-only".into(),
            }
        } else {
            choose(record, name, f)
        };
        let job = match live {
            Some(g) => live_job(record, g, disk, name, &merge)?,
            None => None,
        };
        disks.push(DiskDelete {
            disk: disk.clone(),
            frozen: f.clone(),
            merge,
            job,
        });
    }
    Ok(DeletePlan {
        snapshot: name.to_owned(),
        disks,
    })
}

/// The QEMU job for a merge whose two layers sit next to each other in the
/// disk's live chain; `None` when they are not open there (another branch),
/// in which case the merge runs offline.
fn live_job(
    record: &Record,
    graph: &LiveGraph,
    disk: &str,
    snapshot: &str,
    merge: &Merge,
) -> Result<Option<LiveJob>> {
    let (top, base) = match merge {
        Merge::Commit { top, base } => (top, base),
        Merge::Stream { from, into } => (into, from),
        Merge::Drop | Merge::Keep { .. } => return Ok(None),
    };
    let Some(chain) = graph.disks.get(disk).map(|d| &d.chain) else {
        return Ok(None);
    };
    let Some(pos) = chain
        .windows(2)
        .position(|w| w[0].filename == *top && w[1].filename == *base)
    else {
        return Ok(None);
    };
    let (device, top_node, base_node) = (&chain[0].node, &chain[pos].node, &chain[pos + 1].node);
    let id = names::node_name("sd", disk, snapshot, 0);
    let job = match merge {
        Merge::Commit { .. } => {
            let active = pos == 0;
            let mut arguments = json!({
                "job-id": id, "device": device, "top-node": top_node, "base-node": base_node,
            });
            if !active {
                arguments["backing-file"] = base.display().to_string().into();
            }
            LiveJob {
                id,
                command: "block-commit".into(),
                arguments,
                active,
                stale_nodes: vec![top_node.clone()],
            }
        }
        _ => {
            let mut arguments = json!({ "job-id": id, "device": top_node });
            if let Some(below) = record.layers.get(base).and_then(|l| l.backing.clone()) {
                let below_node = chain.get(pos + 2).map(|l| l.node.clone()).ok_or_else(|| {
                    Error::Drift(format!(
                        "{} is not open below {} in QEMU",
                        below.display(),
                        base.display()
                    ))
                })?;
                arguments["base-node"] = below_node.into();
                arguments["backing-file"] = below.display().to_string().into();
            }
            LiveJob {
                id,
                command: "block-stream".into(),
                arguments,
                active: false,
                stale_nodes: vec![base_node.clone()],
            }
        }
    };
    Ok(Some(job))
}

fn choose(record: &Record, name: &str, f: &Path) -> Merge {
    let others: Vec<&str> = record
        .snapshots_holding(f)
        .into_iter()
        .filter(|s| *s != name)
        .collect();
    if !others.is_empty() {
        return Merge::Keep {
            reason: format!("{} also holds {}", others.join(", "), f.display()),
        };
    }
    let dependents = record.dependents(f);
    let c = match dependents.as_slice() {
        [] => return Merge::Drop,
        [c] => c.to_path_buf(),
        many => {
            return Merge::Keep {
                reason: format!(
                    "{} is the base of {} branches; merging would change them",
                    f.display(),
                    many.len()
                ),
            };
        }
    };
    let owned = |p: &Path| record.layers.get(p).is_some_and(|l| l.owned);
    let commit_ok = owned(f) && record.dependents(&c).len() <= 1;
    let stream_ok = owned(&c);
    let commit = Merge::Commit {
        top: c.clone(),
        base: f.to_path_buf(),
    };
    let stream = Merge::Stream {
        from: f.to_path_buf(),
        into: c.clone(),
    };
    match (commit_ok, stream_ok) {
        (true, true) if allocated(&c) <= allocated(f) => commit,
        (true, true) => stream,
        (true, false) => commit,
        (false, true) => stream,
        (false, false) => Merge::Keep {
            reason: format!(
                "{} and {} are not snapctl's to write",
                f.display(),
                c.display()
            ),
        },
    }
}

impl DeletePlan {
    /// The ordered steps, for `--dry-run`: QMP commands and `qemu-img` runs,
    /// then the record change and the files removed.
    pub fn steps(&self, record: &Record, options: &JobOptions) -> Vec<Step> {
        let qmp = |command: &str, arguments: Value| Step::Qmp {
            command: command.into(),
            arguments,
        };
        let mut steps = Vec::new();
        let jobs: Vec<&LiveJob> = self.disks.iter().filter_map(|d| d.job.as_ref()).collect();
        for job in &jobs {
            steps.push(qmp(&job.command, job_arguments(job, options)));
        }
        for job in jobs.iter().filter(|j| j.active) {
            steps.push(qmp("job-complete", json!({ "id": job.id })));
        }
        for verb in ["job-finalize", "job-dismiss"] {
            for job in &jobs {
                steps.push(qmp(verb, json!({ "id": job.id })));
            }
        }
        for job in &jobs {
            for node in &job.stale_nodes {
                steps.push(qmp("blockdev-del", json!({ "node-name": node })));
            }
        }
        for d in self.disks.iter().filter(|d| !d.live()) {
            match &d.merge {
                Merge::Commit { top, base } => {
                    steps.push(Step::Tool {
                        command: format!(
                            "qemu-img commit -d -b {} {}",
                            base.display(),
                            top.display()
                        ),
                    });
                    for dependent in record.dependents(top) {
                        steps.push(Step::Tool {
                            command: format!(
                                "qemu-img rebase -u -b {} {}",
                                base.display(),
                                dependent.display()
                            ),
                        });
                    }
                }
                Merge::Stream { from, into } => {
                    let below = record.layers.get(from).and_then(|l| l.backing.clone());
                    steps.push(Step::Tool {
                        command: format!(
                            "qemu-img rebase -b {} {}",
                            below.map_or_else(|| "''".to_owned(), |b| b.display().to_string()),
                            into.display()
                        ),
                    });
                }
                Merge::Drop | Merge::Keep { .. } => {}
            }
        }
        steps.extend(
            self.summary()
                .into_iter()
                .map(|change| Step::Record { change }),
        );
        let mut after = record.clone();
        for path in apply(&mut after, self) {
            steps.push(Step::RemoveFile { path });
        }
        steps
    }

    /// Lines for the user: what happens to each disk, and to the record.
    pub fn summary(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .disks
            .iter()
            .map(|d| {
                let how = if d.live() { "QEMU job" } else { "qemu-img" };
                match &d.merge {
                    Merge::Commit { top, base } => format!(
                        "{}: commit {} into {} ({how})",
                        d.disk,
                        top.display(),
                        base.display()
                    ),
                    Merge::Stream { from, into } => format!(
                        "{}: stream {} into {} ({how})",
                        d.disk,
                        from.display(),
                        into.display()
                    ),
                    Merge::Drop => {
                        format!("{}: nothing to merge above {}", d.disk, d.frozen.display())
                    }
                    Merge::Keep { reason } => {
                        format!("{}: keep {} ({reason})", d.disk, d.frozen.display())
                    }
                }
            })
            .collect();
        lines.push(format!("remove snapshot {}", self.snapshot));
        lines
    }
}

/// A job's arguments with the options that apply to every merge job.
pub(crate) fn job_arguments(job: &LiveJob, options: &JobOptions) -> Value {
    let mut args = job.arguments.clone();
    args["auto-finalize"] = false.into();
    args["auto-dismiss"] = false.into();
    if options.bandwidth > 0 {
        args["speed"] = options.bandwidth.into();
    }
    args
}

/// The record after the merges and the removal of the snapshot (in memory;
/// the caller saves it). Returns the
/// owned files nothing needs any more.
pub fn apply(record: &mut Record, plan: &DeletePlan) -> Vec<PathBuf> {
    for d in &plan.disks {
        match &d.merge {
            Merge::Commit { top, base } => {
                for layer in record.layers.values_mut() {
                    if layer.backing.as_deref() == Some(top) {
                        layer.backing = Some(base.clone());
                        layer.backing_string = Some(base.display().to_string());
                    }
                }
                for s in &mut record.snapshots {
                    for sd in s.disks.values_mut() {
                        if sd.image == *top {
                            sd.image = base.clone();
                        }
                    }
                }
                for disk in record.disks.values_mut() {
                    if disk.active == *top {
                        disk.active = base.clone();
                    }
                }
                // `top` is no longer in any chain; prune drops it (and its file).
            }
            Merge::Stream { from, into } => {
                let below = record.layers.get(from).and_then(|l| l.backing.clone());
                if let Some(layer) = record.layers.get_mut(into) {
                    layer.backing_string = below.as_ref().map(|b| b.display().to_string());
                    layer.backing = below;
                }
            }
            Merge::Drop | Merge::Keep { .. } => {}
        }
    }
    remove_snapshot(record, &plan.snapshot);
    prune(record)
}

/// Drops snapshot `name` from the record: its children now descend from its
/// parent, and so does the current state if it descended from `name`.
pub(crate) fn remove_snapshot(record: &mut Record, name: &str) {
    let parent = record.snapshot(name).and_then(|s| s.parent.clone());
    for s in &mut record.snapshots {
        if s.parent.as_deref() == Some(name) {
            s.parent = parent.clone();
        }
    }
    if record.current.as_deref() == Some(name) {
        record.current = parent;
    }
    record.snapshots.retain(|s| s.name != name);
}

const JOB_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// A merge job's progress, in bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Progress {
    pub job: String,
    pub current: u64,
    pub total: u64,
}

/// Receives progress updates (the binary draws a bar or prints JSON lines).
pub type ProgressFn = std::sync::Arc<dyn Fn(&Progress) + Send + Sync>;

/// Options for the merge jobs.
#[derive(Clone, Default)]
pub struct JobOptions {
    /// Bytes per second, 0 for unlimited.
    pub bandwidth: u64,
    /// Give up on a merge (an active commit that cannot converge under heavy
    /// guest writes, say) after this long: it is cancelled cleanly.
    pub timeout: Option<Duration>,
    /// Raised on SIGINT/SIGTERM: the jobs are cancelled cleanly.
    pub interrupt: crate::create::Interrupt,
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for JobOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobOptions")
            .field("bandwidth", &self.bandwidth)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// How often progress is read and interruption checked while jobs run.
const TICK: Duration = Duration::from_millis(250);

/// Why the jobs stopped before finishing, and whether a commit had started
/// (committing changes the lower image even when cancelled).
pub(crate) struct Stopped {
    pub(crate) error: Error,
    pub(crate) commit_started: bool,
}

/// Runs a delete. `client` is QEMU's when it runs. Returns lines to report.
pub async fn run(
    client: Option<&Client>,
    lock: &VmLock,
    record: &mut Record,
    plan: &DeletePlan,
    options: &JobOptions,
) -> Result<Vec<String>> {
    if let Some(c) = client {
        refuse_running_jobs(c).await?;
    }
    // Offline merges write images: make sure no process holds them.
    for d in plan.disks.iter().filter(|d| !d.live()) {
        match &d.merge {
            Merge::Commit { base, .. } => images::ensure_unlocked(base)?,
            Merge::Stream { into, .. } => images::ensure_unlocked(into)?,
            Merge::Drop | Merge::Keep { .. } => {}
        }
    }
    let journal = lock.begin(
        record,
        "delete",
        serde_json::to_value(plan).unwrap_or_default(),
    )?;
    let live: Vec<&DiskDelete> = plan.disks.iter().filter(|d| d.live()).collect();
    if !live.is_empty() {
        let client = client.expect("live merges need QEMU");
        let jobs: Vec<&LiveJob> = live.iter().filter_map(|d| d.job.as_ref()).collect();
        if let Err(stopped) = run_jobs(client, &jobs, options).await {
            if !stopped.commit_started {
                lock.resolve(record, journal)?;
                return Err(stopped.error);
            }
            // A commit wrote part of the newer delta into the snapshot's
            // frozen image before it stopped: that image no longer holds the
            // snapshot's state, so the snapshot goes; the chain is unchanged
            // and every other snapshot intact.
            let metadata = DeletePlan {
                snapshot: plan.snapshot.clone(),
                disks: Vec::new(),
            };
            let files = apply(record, &metadata);
            lock.resolve(record, journal)?;
            debug_assert!(files.is_empty(), "an unchanged chain frees no file");
            let cause = match stopped.error {
                Error::Interrupted => "interrupted".to_owned(),
                e => e.to_string(),
            };
            return Err(Error::Drift(format!(
                "{cause}: the merge was cancelled after it had started writing into the frozen image of {0}, so {0} is removed from the record (the chain is unchanged, every other snapshot is intact)",
                plan.snapshot
            )));
        }
    }
    for d in plan.disks.iter().filter(|d| !d.live()) {
        if let Err(e) = merge_offline(record, d) {
            lock.resolve(record, journal)?;
            return Err(e);
        }
        crate::fault::point("delete:merged-offline");
    }
    let files = apply(record, plan);
    lock.resolve(record, journal)?;
    let graph = crate::graph::read_if_running(client).await?;
    let mut lines = plan.summary();
    lines.extend(remove_files(&files, graph.as_ref()));
    Ok(lines)
}

pub(crate) async fn run_jobs(
    client: &Client,
    live_jobs: &[&LiveJob],
    options: &JobOptions,
) -> std::result::Result<(), Stopped> {
    // (job, is a commit), and whether each is an active commit.
    let mut jobs: Vec<(Job, bool)> = Vec::new();
    let mut actives: Vec<bool> = Vec::new();
    let mut stale_nodes = Vec::new();
    for job in live_jobs {
        let args = job_arguments(job, options);
        match client.start_job_raw(&job.id, &job.command, args).await {
            Ok(started) => jobs.push((started, job.command == "block-commit")),
            Err(e) => {
                let commit_started = cancel_all(&mut jobs).await;
                return Err(Stopped {
                    error: e.into(),
                    commit_started,
                });
            }
        }
        actives.push(job.active);
        stale_nodes.extend(job.stale_nodes.iter().cloned());
    }
    crate::fault::point("jobs:started");
    // Drive every job to `pending`; active commits pass through `ready`.
    let deadline = std::time::Instant::now() + options.timeout.unwrap_or(JOB_TIMEOUT);
    let mut failure = None;
    for (i, active) in actives.iter().enumerate() {
        let mut stages = vec![JobStatus::Pending];
        if *active {
            stages.insert(0, JobStatus::Ready);
        }
        for stage in stages {
            if let Err(e) = drive(client, &mut jobs, i, &stage, deadline, options).await {
                failure = Some(e);
                break;
            }
            if stage == JobStatus::Ready
                && let Err(e) = jobs[i].0.complete().await
            {
                failure = Some(e.into());
                break;
            }
        }
        if failure.is_some() {
            break;
        }
    }
    if let Some(error) = failure {
        let commit_started = cancel_all(&mut jobs).await;
        return Err(Stopped {
            error,
            commit_started,
        });
    }
    crate::fault::point("jobs:pending");
    // The point of no return, for all disks together.
    let late = |error: Error| Stopped {
        error,
        commit_started: true,
    };
    for (job, _) in &jobs {
        job.finalize().await.map_err(|e| late(e.into()))?;
    }
    for (job, _) in &mut jobs {
        // Errors surface again, with the job's text, from `finish` below.
        let _ = job.wait_concluded(JOB_TIMEOUT).await;
    }
    crate::fault::point("jobs:finalized");
    let mut errors = Vec::new();
    for (job, _) in &mut jobs {
        if let Err(e) = job.finish(JOB_TIMEOUT).await {
            errors.push(e.to_string());
        }
    }
    if !errors.is_empty() {
        return Err(late(Error::Drift(errors.join("; "))));
    }
    delete_unused_nodes(client, &stale_nodes).await;
    Ok(())
}

/// Waits until job `i` reaches `stage`, reporting progress and watching for
/// an interruption and the deadline every tick.
async fn drive(
    client: &Client,
    jobs: &mut [(Job, bool)],
    i: usize,
    stage: &JobStatus,
    deadline: std::time::Instant,
    options: &JobOptions,
) -> Result<()> {
    loop {
        match jobs[i].0.wait_for(std::slice::from_ref(stage), TICK).await {
            Ok(_) => return Ok(()),
            Err(qmp_client::Error::WaitTimeout { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        if options.interrupt.is_raised() {
            return Err(Error::Interrupted);
        }
        if std::time::Instant::now() >= deadline {
            return Err(Error::Drift(format!(
                "job {} did not finish within {:?} and was cancelled",
                jobs[i].0.id(),
                options.timeout.unwrap_or(JOB_TIMEOUT)
            )));
        }
        if let Some(report) = &options.progress
            && let Ok(all) = client.query_jobs().await
        {
            for info in all
                .iter()
                .filter(|j| jobs.iter().any(|(job, _)| job.id() == j.id))
            {
                report(&Progress {
                    job: info.id.clone(),
                    current: info.current_progress,
                    total: info.total_progress,
                });
            }
        }
    }
}

/// Cancels every job, waits for each to conclude and dismisses it. Returns
/// whether any of them was a commit (which has then written into its base).
async fn cancel_all(jobs: &mut [(Job, bool)]) -> bool {
    for (job, _) in jobs.iter() {
        let _ = job.cancel().await;
    }
    for (job, _) in jobs.iter_mut() {
        let _ = job.wait_concluded(Duration::from_secs(60)).await;
        let _ = job.dismiss().await;
    }
    jobs.iter().any(|(_, commit)| *commit)
}

fn merge_offline(record: &Record, d: &DiskDelete) -> Result<()> {
    match &d.merge {
        Merge::Commit { top, base } => {
            images::commit(top, base)?;
            let format = record
                .layers
                .get(base)
                .map_or("qcow2", |l| l.format.as_str());
            for dependent in record.dependents(top) {
                images::rebase_unsafe(dependent, base, format)?;
            }
            Ok(())
        }
        Merge::Stream { from, into } => {
            let below = record.layers.get(from).and_then(|l| l.backing.clone());
            let format = below
                .as_ref()
                .and_then(|b| record.layers.get(b))
                .map_or("qcow2", |l| l.format.as_str());
            images::rebase_safe(into, below.as_deref(), format)
        }
        Merge::Drop | Merge::Keep { .. } => Ok(()),
    }
}

/// The snapshots `--children` removes with `name`, deepest first, `name` last.
pub fn with_descendants(record: &Record, name: &str) -> Vec<String> {
    let mut order = Vec::new();
    let mut seen = BTreeSet::new();
    fn visit(record: &Record, name: &str, order: &mut Vec<String>, seen: &mut BTreeSet<String>) {
        if !seen.insert(name.to_owned()) {
            return;
        }
        for child in record.children(name) {
            visit(record, &child.name, order, seen);
        }
        order.push(name.to_owned());
    }
    visit(record, name, &mut order, &mut seen);
    order
}

/// For `--json`.
pub fn to_json(plan: &DeletePlan) -> Value {
    serde_json::to_value(plan).unwrap_or_default()
}
