//! Planning: what an operation will do, step by step, decided before anything
//! is touched.
//!
//! A planner is a pure function: the record, the facts gathered up front
//! ([`Facts`]: QEMU's graph and run state, the clock, answers about files) and
//! the user's options in, a [`Plan`] out. The plan holds the typed operation
//! (what the journal stores and recovery reads) and its [`Step`]s in order.
//! The steps are the single source of truth twice over: `--dry-run` prints
//! them, and the executor ([`crate::run`]) carries out exactly these values,
//! logging each one as it runs it.
//!
//! The builders here (node specs, `qom-set`, merge jobs, `qemu-img` command
//! lines, node-name allocation) are shared by every planner, so that the same
//! QMP request is built in one place.

pub mod clone;
pub mod create;
pub mod delete;
pub mod export;
pub mod internal;
pub mod merge;
pub mod revert;
#[cfg(test)]
mod tests;

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde::Serialize;
use serde_json::{Value, json};

use crate::graph::{LiveDisk, LiveGraph};
use crate::names;
use crate::operation::{LiveJob, MemoryState, Operation};
use crate::record::Record;

/// One step of a plan, in the order it runs.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum Step {
    /// Create a new qcow2 overlay file (refusing an existing file or a
    /// symlink) with `backing` written into its header.
    CreateOverlay {
        path: PathBuf,
        backing: String,
        backing_format: String,
        size: u64,
    },
    /// Create a new, empty qcow2 container for a VM's memory and device state
    /// (refusing an existing file or a symlink).
    CreateStateFile { path: PathBuf },
    /// Create a new, empty standalone image (`qcow2` or `raw`, `size` bytes,
    /// no backing), refusing an existing file or a symlink, for a tool to fill.
    CreateImage {
        path: PathBuf,
        format: String,
        size: u64,
    },
    /// A guest-agent command (`guest-fsfreeze-freeze` / `-thaw`). A freeze is
    /// always followed by a thaw, which also runs when a step between fails.
    GuestAgent { command: String },
    /// A QMP command that must succeed. Job commands (`block-commit`,
    /// `block-stream`, `job-*`) go through the job they belong to.
    Qmp {
        command: String,
        #[serde(default, skip_serializing_if = "Value::is_null")]
        arguments: Value,
    },
    /// Wait until every one of `jobs` has reached `status` (`ready`,
    /// `pending`, `concluded`), reporting progress; a job that fails or a
    /// timeout or Ctrl-C cancels them all.
    AwaitJobs { jobs: Vec<String>, status: String },
    /// `blockdev-del` of a node the operation no longer uses. QEMU keeps a node
    /// something still holds (another chain, a parent that owns it), which is
    /// what must happen then, so a refusal is not an error.
    ReleaseNode { node: String },
    /// Run an image tool (offline), exactly this argument vector.
    Tool { argv: Vec<String> },
    /// Update the record (the typed operation says how; this says what).
    Record { change: String },
    /// Remove an owned file nothing needs any more (kept, with a warning, while
    /// QEMU still has it open).
    RemoveFile { path: PathBuf },
}

impl Step {
    pub fn qmp(command: &str, arguments: Value) -> Step {
        Step::Qmp {
            command: command.into(),
            arguments,
        }
    }

    fn tool<S: AsRef<str>>(argv: impl IntoIterator<Item = S>) -> Step {
        Step::Tool {
            argv: argv.into_iter().map(|a| a.as_ref().to_owned()).collect(),
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::CreateOverlay {
                path,
                backing,
                backing_format,
                size,
            } => write!(
                f,
                "create overlay {} (qcow2, {size} bytes, backing {backing} as {backing_format})",
                path.display()
            ),
            Step::CreateImage { path, format, size } => write!(
                f,
                "create image {} ({format}, {size} bytes, no backing)",
                path.display()
            ),
            Step::CreateStateFile { path } => {
                write!(f, "create memory state file {} (qcow2)", path.display())
            }
            Step::GuestAgent { command } => write!(f, "guest agent: {command}"),
            Step::Qmp { command, arguments } if arguments.is_null() => {
                write!(f, "qmp: {command}")
            }
            Step::Qmp { command, arguments } => write!(f, "qmp: {command} {arguments}"),
            Step::AwaitJobs { jobs, status } if jobs.len() == 1 => {
                write!(f, "wait until job {} reaches {status}", jobs[0])
            }
            Step::AwaitJobs { jobs, status } => {
                write!(f, "wait until jobs {} reach {status}", jobs.join(", "))
            }
            Step::ReleaseNode { node } => write!(
                f,
                "qmp: blockdev-del {} (unless QEMU still holds it)",
                json!({ "node-name": node })
            ),
            Step::Tool { argv } => {
                let line: Vec<String> = argv.iter().map(|a| names::shell_quote(a)).collect();
                write!(f, "run: {}", line.join(" "))
            }
            Step::Record { change } => write!(f, "record: {change}"),
            Step::RemoveFile { path } => write!(f, "remove file {}", path.display()),
        }
    }
}

/// A planned operation: the typed operation and the steps that carry it out.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub operation: Operation,
    pub steps: Vec<Step>,
}

/// What a planner may ask about files, answered by the host (or by a test).
/// Planners read nothing themselves; everything they need to know about the
/// world outside the record and QEMU's graph comes through here.
pub trait Host: Sync {
    /// Whether anything (a symlink included) is at `path`.
    fn exists(&self, path: &Path) -> bool;
    /// Whether `dir` is a directory snapctl can create files in.
    fn dir_state(&self, dir: &Path) -> DirState;
    /// Bytes allocated to the file at `path` (what a merge out of it copies,
    /// roughly); `None` when it cannot be read.
    fn allocated(&self, path: &Path) -> Option<u64>;
    /// The guest-visible size of the image at `path`, from its header.
    fn virtual_size(&self, path: &Path) -> Option<u64>;
    /// What the header of an existing image says, for reusing a prepared
    /// overlay (`--reuse-external`); `None` when it cannot be read.
    fn image(&self, path: &Path) -> Option<ImageFacts>;
}

/// An existing image's header, as far as reusing it as an overlay matters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFacts {
    pub format: String,
    pub virtual_size: u64,
    /// The backing file, resolved to a path.
    pub backing: Option<PathBuf>,
    /// Whether the image itself holds data (not counting its backing chain).
    pub has_data: bool,
}

/// What a directory is, for creating files in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirState {
    Writable,
    ReadOnly,
    NotADirectory,
    Missing,
}

/// Everything a planner knows besides the record.
#[derive(Clone, Copy)]
pub struct Facts<'a> {
    /// QEMU's graph when QEMU runs.
    pub live: Option<&'a LiveGraph>,
    /// Whether the guest's CPUs run (`None` when QEMU does not run).
    pub running: Option<bool>,
    pub now: Timestamp,
    pub host: &'a dyn Host,
}

impl fmt::Debug for Facts<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Facts")
            .field("live", &self.live.is_some())
            .field("running", &self.running)
            .field("now", &self.now)
            .finish_non_exhaustive()
    }
}

/// Why a new file cannot be created at `path`, if it cannot: something is
/// there already, or its directory is missing or not writable.
pub fn new_file_problem(facts: &Facts<'_>, path: &Path) -> Option<&'static str> {
    if facts.host.exists(path) {
        return Some("it already exists");
    }
    match facts
        .host
        .dir_state(path.parent().unwrap_or(Path::new("/")))
    {
        DirState::Writable => None,
        DirState::ReadOnly => Some("its directory is not writable"),
        DirState::NotADirectory => Some("its directory is not a directory"),
        DirState::Missing => Some("its directory does not exist"),
    }
}

/// The guest-visible size of `image`: as recorded, or read from its header.
pub fn image_size(record: &Record, facts: &Facts<'_>, image: &Path) -> crate::error::Result<u64> {
    record
        .layers
        .get(image)
        .and_then(|l| l.virtual_size)
        .or_else(|| facts.host.virtual_size(image))
        .ok_or_else(|| {
            crate::error::Error::Drift(format!(
                "the size of {} cannot be read: run snapctl check",
                image.display()
            ))
        })
}

/// Hands out node names QEMU does not use yet.
#[derive(Debug, Clone, Default)]
pub struct NodeNames(BTreeSet<String>);

impl NodeNames {
    /// Names already taken: every node of `live`.
    pub fn taken_in(live: Option<&LiveGraph>) -> NodeNames {
        NodeNames(live.map(|g| g.node_names.clone()).unwrap_or_default())
    }

    /// A fresh name derived from `(prefix, disk, what)`.
    pub fn fresh(&mut self, prefix: &str, disk: &str, what: &str) -> String {
        let name = (0u64..)
            .map(|salt| names::node_name(prefix, disk, what, salt))
            .find(|n| !self.0.contains(n))
            .expect("an unused node name exists");
        self.0.insert(name.clone());
        name
    }
}

/// The `blockdev-add` arguments for a new overlay: a qcow2 node over its own
/// file node, linked to `backing` (`None`: opened with no backing, for
/// `blockdev-snapshot` to attach).
pub fn overlay_blockdev(node: &str, file_node: &str, path: &Path, backing: Option<&str>) -> Value {
    json!({
        "driver": "qcow2",
        "node-name": node,
        "file": { "driver": "file", "node-name": file_node, "filename": path },
        "backing": backing,
    })
}

/// The `blockdev-add` arguments that open an existing layer read-only on top
/// of `backing` (an open node, or nothing). The protocol node inherits
/// read-only, which lets QEMU reopen the layer read-write for a later merge
/// into it (an explicit `file.read-only` would refuse that).
pub fn layer_blockdev(path: &Path, format: &str, node: &str, backing: Option<&str>) -> Value {
    let mut spec = json!({
        "driver": format,
        "node-name": node,
        "read-only": true,
        "file": { "driver": "file", "filename": path },
    });
    if format == "qcow2" {
        spec["backing"] = backing.map_or(Value::Null, Value::from);
    }
    spec
}

/// The `blockdev-add` arguments that open a checkpoint's state container.
pub fn memory_blockdev(memory: &MemoryState) -> Value {
    json!({
        "driver": "qcow2",
        "node-name": memory.node,
        "file": { "driver": "file", "filename": memory.path },
    })
}

/// The steps that save (`snapshot-save`) or load (`snapshot-load`) a VM's
/// memory and device state through its container node, which must be open:
/// the job, its end, its dismissal (which reports its error), the node closed.
pub fn memory_job_steps(command: &str, memory: &MemoryState) -> Vec<Step> {
    vec![
        Step::qmp(
            command,
            json!({
                "job-id": memory.job, "tag": memory.tag,
                "vmstate": memory.node, "devices": [memory.node],
            }),
        ),
        Step::AwaitJobs {
            jobs: vec![memory.job.clone()],
            status: "concluded".into(),
        },
        Step::qmp("job-dismiss", json!({ "id": memory.job })),
        Step::ReleaseNode {
            node: memory.node.clone(),
        },
    ]
}

/// Creates `bitmaps` on node `to` with the bits they have on node `from`
/// (persistent dirty bitmaps follow the disk's active image).
pub fn carry_bitmaps(bitmaps: &[crate::graph::Bitmap], from: &str, to: &str) -> Vec<Step> {
    bitmaps
        .iter()
        .flat_map(|b| {
            [
                Step::qmp(
                    "block-dirty-bitmap-add",
                    json!({ "node": to, "name": b.name, "granularity": b.granularity, "persistent": true }),
                ),
                Step::qmp(
                    "block-dirty-bitmap-merge",
                    json!({ "node": to, "target": b.name, "bitmaps": [{ "node": from, "name": b.name }] }),
                ),
            ]
        })
        .collect()
}

/// Switches disk `disk`'s device to node `node` (QEMU-NOTES §3.3b step 7).
pub fn qom_set_drive(disk: &str, node: &str) -> Step {
    Step::qmp(
        "qom-set",
        json!({ "path": format!("/machine/peripheral/{disk}"), "property": "drive", "value": node }),
    )
}

/// A `block-commit` of `chain[top]` into `chain[base]` on a live chain (node
/// names, top first). `backing_file` is what the layer above `top` gets
/// written into its header (an active commit has none). The merged layers
/// leave the chain.
pub fn commit_job(
    id: String,
    nodes: &[String],
    top: usize,
    base: usize,
    backing_file: &Path,
    bandwidth: u64,
) -> LiveJob {
    let active = top == 0;
    let mut arguments = json!({
        "job-id": id, "device": nodes[0], "top-node": nodes[top], "base-node": nodes[base],
    });
    if !active {
        arguments["backing-file"] = backing_file.display().to_string().into();
    }
    LiveJob {
        id,
        command: "block-commit".into(),
        arguments: with_job_options(arguments, bandwidth),
        active,
        stale_nodes: releasable(&nodes[top..base]),
    }
}

/// A `block-stream` into `nodes[into]` of every layer down to (not including)
/// `base` (`None`: all of them), which is written into its header as
/// `base_file`. The streamed layers leave the chain.
pub fn stream_job(
    id: String,
    nodes: &[String],
    into: usize,
    base: Option<(usize, &Path)>,
    bandwidth: u64,
) -> LiveJob {
    let mut arguments = json!({ "job-id": id, "device": nodes[into] });
    if let Some((b, file)) = base {
        arguments["base-node"] = nodes[b].clone().into();
        arguments["backing-file"] = file.display().to_string().into();
    }
    LiveJob {
        id,
        command: "block-stream".into(),
        arguments: with_job_options(arguments, bandwidth),
        active: false,
        stale_nodes: releasable(&nodes[into + 1..base.map_or(nodes.len(), |(b, _)| b)]),
    }
}

/// The nodes of `nodes` that `blockdev-del` can remove once nothing uses them.
fn releasable(nodes: &[String]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| names::may_be_monitor_owned(n))
        .cloned()
        .collect()
}

/// Every merge job is finalized and dismissed by snapctl (so several disks
/// switch together and no error is lost), at `bandwidth` bytes/s (0: unlimited).
fn with_job_options(mut arguments: Value, bandwidth: u64) -> Value {
    arguments["auto-finalize"] = false.into();
    arguments["auto-dismiss"] = false.into();
    if bandwidth > 0 {
        arguments["speed"] = bandwidth.into();
    }
    arguments
}

/// The steps that run merge jobs to the end together: start each, wait for
/// the active commits to be ready and pivot them, wait for all to be pending,
/// finalize all (the point of no return, for every disk at once), wait for
/// them to conclude, dismiss them, release the nodes that left the chains.
pub fn job_steps(jobs: &[&LiveJob]) -> Vec<Step> {
    if jobs.is_empty() {
        return Vec::new();
    }
    let ids: Vec<String> = jobs.iter().map(|j| j.id.clone()).collect();
    let id_arg = |id: &str| json!({ "id": id });
    let mut steps: Vec<Step> = jobs
        .iter()
        .map(|j| Step::qmp(&j.command, j.arguments.clone()))
        .collect();
    let active: Vec<String> = jobs
        .iter()
        .filter(|j| j.active)
        .map(|j| j.id.clone())
        .collect();
    if !active.is_empty() {
        steps.push(Step::AwaitJobs {
            jobs: active.clone(),
            status: "ready".into(),
        });
        steps.extend(
            active
                .iter()
                .map(|id| Step::qmp("job-complete", id_arg(id))),
        );
    }
    steps.push(Step::AwaitJobs {
        jobs: ids.clone(),
        status: "pending".into(),
    });
    steps.extend(ids.iter().map(|id| Step::qmp("job-finalize", id_arg(id))));
    steps.push(Step::AwaitJobs {
        jobs: ids.clone(),
        status: "concluded".into(),
    });
    steps.extend(ids.iter().map(|id| Step::qmp("job-dismiss", id_arg(id))));
    steps.extend(
        jobs.iter()
            .flat_map(|j| j.stale_nodes.iter())
            .map(|node| Step::ReleaseNode { node: node.clone() }),
    );
    steps
}

/// `qemu-img commit`: `top`'s data into `base` (lower in its chain), offline;
/// `top` is left as it was (`-d`): it is about to be removed anyway.
pub fn qemu_img_commit(top: &Path, base: &Path) -> Step {
    Step::tool([
        "qemu-img",
        "commit",
        "-q",
        "-d",
        "-b",
        &base.to_string_lossy(),
        &top.to_string_lossy(),
    ])
}

/// `qemu-img rebase -u`: rewrites `image`'s backing string only, for an image
/// whose backing now holds the same data under another name.
pub fn qemu_img_relink(image: &Path, backing: &Path, backing_format: &str) -> Step {
    Step::tool([
        "qemu-img",
        "rebase",
        "-q",
        "-u",
        "-b",
        &backing.to_string_lossy(),
        "-F",
        backing_format,
        &image.to_string_lossy(),
    ])
}

/// `qemu-img rebase` (safe): moves `image` onto `backing` (`None`: onto
/// nothing), copying into it whatever differs, so what it shows is unchanged:
/// the offline `block-stream`.
pub fn qemu_img_stream(image: &Path, backing: Option<(&Path, &str)>) -> Step {
    let mut argv = vec!["qemu-img".to_owned(), "rebase".into(), "-q".into()];
    match backing {
        Some((b, format)) => argv.extend([
            "-b".into(),
            b.to_string_lossy().into_owned(),
            "-F".into(),
            format.to_owned(),
        ]),
        None => argv.extend(["-b".into(), String::new()]),
    }
    argv.push(image.to_string_lossy().into_owned());
    Step::Tool { argv }
}

/// Refuses a disk the record does not know, naming the ones it knows: every
/// command that takes a disk (`chain`, `qemu-args`, `commit`, `pull`) checks
/// it here.
pub fn known_disk(record: &crate::record::Record, disk: &str) -> crate::error::Result<()> {
    if record.disks.contains_key(disk) {
        return Ok(());
    }
    Err(crate::error::Error::UnknownDisk {
        vm: record.vm.clone(),
        disk: disk.to_owned(),
        known: record.disks.keys().cloned().collect::<Vec<_>>().join(", "),
    })
}

/// The live chain of `disk`'s device, which must be the recorded chain
/// (`chain`, top first): its node names.
pub fn live_nodes(
    live: &LiveGraph,
    disk: &str,
    chain: &[&Path],
) -> crate::error::Result<Vec<String>> {
    let device: &LiveDisk = live.disks.get(disk).ok_or_else(|| {
        crate::error::Error::Drift(format!("QEMU has no disk {disk}: run snapctl check"))
    })?;
    let files: Vec<&Path> = device.chain.iter().map(|l| l.filename.as_path()).collect();
    if files != chain {
        return Err(crate::error::Error::Drift(format!(
            "QEMU's chain of {disk} differs from the record: run snapctl check"
        )));
    }
    Ok(device.chain.iter().map(|l| l.node.clone()).collect())
}

/// The owned files a record change frees, as removal steps.
pub fn removals(files: Vec<PathBuf>) -> impl Iterator<Item = Step> {
    files.into_iter().map(|path| Step::RemoveFile { path })
}
