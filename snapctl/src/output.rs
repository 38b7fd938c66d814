//! Rendering: text for people, one JSON document for programs (`--json`).
//!
//! The JSON shapes are the contract documented in the README ("JSON output");
//! fields may be added, never renamed.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;
use snapctl::Outcome;
use snapctl::check::Drift;
use snapctl::operation::{Boundary, Create, LiveJob, Merge, MergeKind, Operation, Revert};
use snapctl::plan::Step;
use snapctl::record::{Record, Snapshot};
use snapctl::run::{Progress, ProgressFn};
use snapctl::views::{self, ChainView, SnapshotView};

/// Standard output, buffered: a listing of thousands of lines is written in
/// a few large writes, not one per line. Callers flush.
fn stdout() -> io::BufWriter<io::StdoutLock<'static>> {
    io::BufWriter::with_capacity(64 << 10, io::stdout().lock())
}

pub fn json<T: Serialize + ?Sized>(value: &T) -> io::Result<()> {
    let mut out = stdout();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    out.flush()
}

pub fn list(record: &Record, tree: bool, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(&views::list(record));
    }
    let mut out = stdout();
    if let Some(origin) = &record.clone_of {
        writeln!(
            out,
            "{} is a clone of {} at snapshot {}",
            record.vm, origin.vm, origin.snapshot
        )?;
    }
    if record.snapshots.is_empty() {
        writeln!(out, "no snapshots of {}", record.vm)?;
        return out.flush();
    }
    if tree {
        draw_tree(&mut out, record)?;
        if record.current.is_none() {
            writeln!(out, "(no current snapshot)")?;
        }
        return out.flush();
    }
    // One row per snapshot: marker, then the columns below; each column as
    // wide as its widest cell, so long names never push the others out of line.
    const HEADER: [&str; 6] = [
        "NAME",
        "CREATED (UTC)",
        "PARENT",
        "KIND",
        "DISKS",
        "DESCRIPTION",
    ];
    let current = record.current.as_deref();
    let rows: Vec<(bool, [String; 6])> = record
        .snapshots
        .iter()
        .map(|s| {
            (
                current == Some(s.name.as_str()),
                [
                    s.name.clone(),
                    s.created.strftime("%Y-%m-%d %H:%M:%SZ").to_string(),
                    s.parent.clone().unwrap_or_else(|| "-".to_owned()),
                    kind(s),
                    s.disks.keys().cloned().collect::<Vec<_>>().join(","),
                    s.description.clone().unwrap_or_default(),
                ],
            )
        })
        .collect();
    let mut widths = HEADER.map(|h| h.chars().count());
    for (_, cells) in &rows {
        for (w, cell) in widths.iter_mut().zip(cells) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |marker: &str, cells: [&str; 6]| {
        let mut text = format!("{marker:<2}");
        for (i, cell) in cells.iter().enumerate() {
            if i + 1 == cells.len() {
                text.push_str(cell);
            } else {
                text.push_str(&format!("{cell:<width$}  ", width = widths[i]));
            }
        }
        text.trim_end().to_owned()
    };
    writeln!(out, "{}", line("", HEADER))?;
    for (current, cells) in &rows {
        let cells = [0, 1, 2, 3, 4, 5].map(|i| cells[i].as_str());
        writeln!(out, "{}", line(if *current { "*" } else { "" }, cells))?;
    }
    out.flush()
}

fn kind(s: &Snapshot) -> String {
    serde_json::to_value(s.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The snapshot tree, one snapshot per line. A snapshot with one child is
/// followed by it in the same column, so a long run of snapshots stays a
/// straight line; where a snapshot has several children each branch is drawn
/// with `├──`/`└──` and indented under it. Drawn with an explicit stack:
/// chains thousands of snapshots long do not recurse.
fn draw_tree(out: &mut impl Write, record: &Record) -> io::Result<()> {
    let children = record.children_by_parent();
    let roots: Vec<&Snapshot> = record
        .snapshots
        .iter()
        .filter(|s| s.parent.is_none())
        .collect();
    // (snapshot, prefix of its line, the branch mark before its name, prefix
    // for what follows it in its column)
    let mut stack: Vec<(&Snapshot, String, &str, String)> = roots
        .iter()
        .rev()
        .map(|s| (*s, String::new(), "", String::new()))
        .collect();
    while let Some((s, prefix, mark, column)) = stack.pop() {
        let current = if record.current.as_deref() == Some(s.name.as_str()) {
            "  <- current"
        } else {
            ""
        };
        writeln!(out, "{prefix}{mark}{}{current}", s.name)?;
        let kids = children.get(s.name.as_str()).map_or(&[][..], Vec::as_slice);
        match kids {
            [] => {}
            [only] => stack.push((*only, column.clone(), "", column)),
            many => {
                for (i, kid) in many.iter().enumerate().rev() {
                    let last = i + 1 == many.len();
                    let (mark, more) = if last {
                        ("└── ", "    ")
                    } else {
                        ("├── ", "│   ")
                    };
                    stack.push((*kid, column.clone(), mark, format!("{column}{more}")));
                }
            }
        }
    }
    Ok(())
}

/// `current --json`.
#[derive(Serialize)]
struct Current<'a> {
    vm: &'a str,
    /// The snapshot the VM's state descends from; null before the first one.
    current: Option<&'a str>,
}

pub fn current(record: &Record, as_json: bool) -> io::Result<()> {
    let current = record.current.as_deref();
    if as_json {
        return json(&Current {
            vm: &record.vm,
            current,
        });
    }
    let mut out = io::stdout().lock();
    match current {
        Some(name) => writeln!(out, "{name}"),
        None => writeln!(out, "{} has no current snapshot", record.vm),
    }
}

pub fn show(record: &Record, s: &Snapshot, as_json: bool) -> io::Result<()> {
    let v = SnapshotView::new(record, s, &record.children(&s.name));
    if as_json {
        return json(&v);
    }
    let mut out = io::stdout().lock();
    writeln!(
        out,
        "name:        {}{}",
        v.name,
        if v.current { " (current)" } else { "" }
    )?;
    writeln!(out, "created:     {}", v.created)?;
    writeln!(out, "parent:      {}", v.parent.unwrap_or("-"))?;
    writeln!(out, "kind:        {}", kind(s))?;
    writeln!(out, "description: {}", v.description.unwrap_or(""))?;
    if let Some(m) = &v.memory {
        let size = m
            .bytes
            .map_or_else(|| "missing".to_owned(), |b| format!("{b} bytes"));
        writeln!(out, "memory:      {} ({size})", m.file.display())?;
    }
    if !v.children.is_empty() {
        writeln!(out, "children:    {}", v.children.join(", "))?;
    }
    for (disk, image) in v.disks {
        writeln!(out, "disk {disk}:    {}", image.image.display())?;
    }
    Ok(())
}

pub fn chain(view: &ChainView, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(view);
    }
    let mut out = io::stdout().lock();
    for (disk, entries) in &view.disks {
        writeln!(out, "{disk} (from {}):", view.source)?;
        for e in entries {
            writeln!(out, "  {} [{}] {}", e.image.display(), e.format, e.label)?;
        }
    }
    Ok(())
}

/// `--dry-run`: the plan's steps, numbered; `{"dry_run": true, "steps": [...]}`
/// with `--json`.
pub fn plan(steps: &[Step], as_json: bool) -> io::Result<()> {
    if as_json {
        return json(&DryRun {
            dry_run: true,
            steps,
        });
    }
    let mut out = io::stdout().lock();
    for (i, step) in steps.iter().enumerate() {
        writeln!(out, "{:>2}. {step}", i + 1)?;
    }
    writeln!(out, "(dry run: nothing was changed)")
}

/// `--dry-run --json` of every mutating command.
#[derive(Serialize)]
struct DryRun<'a> {
    dry_run: bool,
    /// The steps, as `{"step": KIND, …}`: `create-overlay`, `guest-agent`,
    /// `qmp` (`command`, `arguments`), `await-jobs`, `release-node`, `tool`
    /// (`argv`), `record` (`change`), `remove-file` (`path`).
    steps: &'a [Step],
}

/// One disk of a snapshot or a revert: the frozen image and the overlay now written.
#[derive(Serialize)]
struct Switched<'a> {
    image: &'a Path,
    overlay: &'a Path,
}

fn switched<'a>(
    disks: impl Iterator<Item = (&'a String, &'a PathBuf, &'a PathBuf)>,
) -> BTreeMap<&'a str, Switched<'a>> {
    disks
        .map(|(disk, image, overlay)| (disk.as_str(), Switched { image, overlay }))
        .collect()
}

/// `create --json`.
#[derive(Serialize)]
struct Created<'a> {
    snapshot: &'a str,
    parent: Option<&'a str>,
    quiesced: bool,
    disks: BTreeMap<&'a str, Switched<'a>>,
    warnings: &'a [String],
}

pub fn created(op: &Create, outcome: &Outcome, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(&Created {
            snapshot: &op.name,
            parent: op.parent.as_deref(),
            quiesced: op.quiesce,
            disks: switched(op.disks.iter().map(|d| (&d.disk, &d.frozen, &d.overlay))),
            warnings: &outcome.warnings,
        });
    }
    warnings(outcome);
    let mut out = io::stdout().lock();
    writeln!(out, "created snapshot {}", op.name)?;
    for d in &op.disks {
        writeln!(
            out,
            "  {}: froze {}, now writing {}",
            d.disk,
            d.frozen.display(),
            d.overlay.display()
        )?;
    }
    Ok(())
}

/// `init --json`.
#[derive(Serialize)]
struct Registered<'a> {
    vm: &'a str,
    disks: BTreeMap<&'a str, RegisteredDisk<'a>>,
}

#[derive(Serialize)]
struct RegisteredDisk<'a> {
    /// The recorded chain, active image first.
    chain: Vec<&'a Path>,
    /// Registered by this run (false: the record knew it already).
    added: bool,
}

pub fn init(record: &Record, added: &[String], as_json: bool) -> io::Result<()> {
    if as_json {
        return json(&Registered {
            vm: &record.vm,
            disks: record
                .disks
                .keys()
                .map(|id| {
                    (
                        id.as_str(),
                        RegisteredDisk {
                            chain: record.chain(id),
                            added: added.contains(id),
                        },
                    )
                })
                .collect(),
        });
    }
    let mut out = io::stdout().lock();
    if added.is_empty() {
        writeln!(out, "already registered {}", record.vm)?;
    } else {
        writeln!(out, "registered {}", record.vm)?;
    }
    for id in record.disks.keys() {
        let chain: Vec<String> = record
            .chain(id)
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        writeln!(
            out,
            "  {id}{}: {}",
            if added.contains(id) { "" } else { " (known)" },
            chain.join(" <- ")
        )?;
    }
    Ok(())
}

/// `check --json`.
#[derive(Serialize)]
struct Checked<'a> {
    /// Whether QEMU's graph took part in the comparison.
    qemu_running: bool,
    /// What `--repair` changed, one line each.
    repaired: &'a [String],
    /// Each drift: `{"kind", "disk", "message", "remedy"}`.
    drift: Vec<DriftView<'a>>,
}

#[derive(Serialize)]
struct DriftView<'a> {
    #[serde(flatten)]
    drift: &'a Drift,
    /// What to do about it, when snapctl knows.
    remedy: Option<&'static str>,
}

pub fn check(drifts: &[Drift], changes: &[String], live: bool, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(&Checked {
            qemu_running: live,
            repaired: changes,
            drift: drifts
                .iter()
                .map(|drift| DriftView {
                    drift,
                    remedy: drift.remedy(),
                })
                .collect(),
        });
    }
    let mut out = io::stdout().lock();
    for c in changes {
        writeln!(out, "repaired: {c}")?;
    }
    for d in drifts {
        writeln!(out, "drift: {}", d.message)?;
        if let Some(remedy) = d.remedy() {
            writeln!(out, "  what to do: {remedy}")?;
        }
    }
    if drifts.is_empty() {
        writeln!(
            out,
            "no drift: record, {}image headers agree",
            if live { "QEMU's graph and " } else { "" }
        )?;
    }
    Ok(())
}

/// `revert --json`.
#[derive(Serialize)]
struct Reverted<'a> {
    snapshot: &'a str,
    /// QEMU ran: the devices were switched and the guest reset.
    live: bool,
    paused: bool,
    disks: BTreeMap<&'a str, Switched<'a>>,
    /// QEMU was not running: the arguments that start it on the reverted disks.
    qemu_args: Option<&'a [String]>,
    removed_files: &'a [PathBuf],
    warnings: &'a [String],
}

pub fn reverted(
    op: &Revert,
    outcome: &Outcome,
    qemu_args: Option<&[String]>,
    as_json: bool,
) -> io::Result<()> {
    if as_json {
        return json(&Reverted {
            snapshot: &op.snapshot,
            live: op.live,
            paused: op.live && op.paused,
            disks: switched(op.disks.iter().map(|d| (&d.disk, &d.frozen, &d.overlay))),
            qemu_args,
            removed_files: &outcome.removed_files,
            warnings: &outcome.warnings,
        });
    }
    let mut out = io::stdout().lock();
    writeln!(out, "reverted to {}", op.snapshot)?;
    for d in &op.disks {
        writeln!(
            out,
            "  {}: now writing {} (on {})",
            d.disk,
            d.overlay.display(),
            d.frozen.display()
        )?;
    }
    removed_and_warnings(&mut out, outcome)?;
    if let Some(args) = qemu_args {
        let line: Vec<String> = args.iter().map(|a| views::shell_quote(a)).collect();
        writeln!(out, "QEMU is not running; start it with:")?;
        writeln!(out, "{}", line.join(" "))?;
        if op.memory.is_some() {
            writeln!(
                out,
                "then run `snapctl revert {}` on it to load the memory state and resume the guest",
                op.snapshot
            )?;
        }
    }
    Ok(())
}

/// The files an operation removed, on stdout; its warnings go to stderr.
fn removed_and_warnings(out: &mut impl Write, outcome: &Outcome) -> io::Result<()> {
    for f in &outcome.removed_files {
        writeln!(out, "  removed {}", f.display())?;
    }
    warnings(outcome);
    Ok(())
}

/// An operation's warnings, on stderr (in `--json` they are in the document).
pub fn warnings(outcome: &Outcome) {
    for w in &outcome.warnings {
        tracing::warn!("{w}");
    }
}

/// The QEMU job of a merge, as reports show it.
#[derive(Serialize)]
struct JobView<'a> {
    id: &'a str,
    /// `block-commit` or `block-stream`.
    command: &'a str,
    /// An active commit (the device pivots to the base).
    active: bool,
}

impl<'a> JobView<'a> {
    fn of(job: &'a LiveJob) -> JobView<'a> {
        JobView {
            id: &job.id,
            command: &job.command,
            active: job.active,
        }
    }
}

/// One disk of a `delete --json` report.
#[derive(Serialize)]
struct DiskDeleted<'a> {
    disk: &'a str,
    /// The snapshot's frozen image on this disk (for an internal snapshot:
    /// the image it lived in).
    frozen: &'a Path,
    /// `{"operation": "commit", "top", "base"}`, `{"operation": "stream",
    /// "from", "into"}`, `{"operation": "drop"}`, `{"operation": "keep",
    /// "reason"}`, or `{"operation": "internal"}` (deleted inside its image).
    merge: MergeView<'a>,
    /// The QEMU job when the merge ran live; `null` when it ran offline.
    job: Option<JobView<'a>>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum MergeView<'a> {
    Boundary(&'a Boundary),
    Internal { operation: &'static str },
}

/// One snapshot deleted.
#[derive(Serialize)]
pub struct Deleted<'a> {
    snapshot: &'a str,
    disks: Vec<DiskDeleted<'a>>,
    removed_files: &'a [PathBuf],
    warnings: &'a [String],
}

/// `delete --json`: `{"deleted": [...]}`, one element per snapshot, in order.
#[derive(Serialize)]
struct DeleteReport<'a> {
    deleted: &'a [Deleted<'a>],
}

/// The report of one deleted snapshot (`None` for an operation that is not a delete).
pub fn deleted<'a>(op: &'a Operation, outcome: &'a Outcome) -> Option<Deleted<'a>> {
    let (snapshot, disks) = match op {
        Operation::Delete(op) => (
            &op.snapshot,
            op.disks
                .iter()
                .map(|d| DiskDeleted {
                    disk: &d.disk,
                    frozen: &d.frozen,
                    merge: MergeView::Boundary(&d.merge),
                    job: d.job.as_ref().map(JobView::of),
                })
                .collect(),
        ),
        Operation::Internal(op) => (
            &op.snapshot,
            op.disks
                .iter()
                .map(|d| DiskDeleted {
                    disk: &d.disk,
                    frozen: &d.image,
                    merge: MergeView::Internal {
                        operation: "internal",
                    },
                    job: (op.live && !op.keep_files).then_some(JobView {
                        id: &op.job,
                        command: "snapshot-delete",
                        active: false,
                    }),
                })
                .collect(),
        ),
        _ => return None,
    };
    Some(Deleted {
        snapshot,
        disks,
        removed_files: &outcome.removed_files,
        warnings: &outcome.warnings,
    })
}

/// Prints one deleted snapshot as text (`--json` collects them instead).
pub fn deleted_text(op: &Operation, outcome: &Outcome) -> io::Result<()> {
    let mut out = io::stdout().lock();
    match op {
        Operation::Delete(op) => {
            writeln!(out, "deleted snapshot {}", op.snapshot)?;
            for line in snapctl::plan::delete::summary(op) {
                writeln!(out, "  {line}")?;
            }
        }
        Operation::Internal(op) => {
            writeln!(out, "deleted internal snapshot {}", op.snapshot)?;
            for d in &op.disks {
                let how = if op.keep_files {
                    "kept inside"
                } else {
                    "removed from"
                };
                writeln!(out, "  {}: {how} {}", d.disk, d.image.display())?;
            }
        }
        _ => {}
    }
    removed_and_warnings(&mut out, outcome)
}

/// `create --internal --json` and `revert --json` of an internal snapshot.
#[derive(Serialize)]
struct InternalDone<'a> {
    snapshot: &'a str,
    kind: &'static str,
    /// Per disk, the image holding the snapshot.
    disks: BTreeMap<&'a str, FrozenView<'a>>,
    live: bool,
    qemu_args: Option<&'a [String]>,
    warnings: &'a [String],
}

#[derive(Serialize)]
struct FrozenView<'a> {
    image: &'a Path,
}

pub fn internal(
    op: &snapctl::operation::Internal,
    outcome: &Outcome,
    qemu_args: Option<&[String]>,
    as_json: bool,
) -> io::Result<()> {
    if as_json {
        return json(&InternalDone {
            snapshot: &op.snapshot,
            kind: "internal",
            disks: op
                .disks
                .iter()
                .map(|d| (d.disk.as_str(), FrozenView { image: &d.image }))
                .collect(),
            live: op.live,
            qemu_args,
            warnings: &outcome.warnings,
        });
    }
    warnings(outcome);
    let mut out = io::stdout().lock();
    let verb = match op.action {
        snapctl::operation::InternalAction::Save => "created internal snapshot",
        _ => "reverted to internal snapshot",
    };
    writeln!(out, "{verb} {}", op.snapshot)?;
    for d in &op.disks {
        writeln!(out, "  {}: inside {}", d.disk, d.image.display())?;
    }
    if let Some(args) = qemu_args {
        let line: Vec<String> = args.iter().map(|a| views::shell_quote(a)).collect();
        writeln!(out, "QEMU is not running; start it with:")?;
        writeln!(out, "{}", line.join(" "))?;
        writeln!(
            out,
            "then run `snapctl revert {}` on it to load the memory state and resume the guest",
            op.snapshot
        )?;
    }
    Ok(())
}

pub fn deleted_json(reports: &[Deleted<'_>]) -> io::Result<()> {
    json(&DeleteReport { deleted: reports })
}

/// `commit --json` and `pull --json`.
#[derive(Serialize)]
struct Merged<'a> {
    disk: &'a str,
    /// `{"operation": "commit", "top", "base"}` or `{"operation": "pull",
    /// "active", "base"}` (`base` null: the active image stands alone); null
    /// when there was nothing to do.
    merge: Option<&'a MergeKind>,
    job: Option<JobView<'a>>,
    /// Snapshots whose state the commit destroyed, removed from the record.
    removed_snapshots: &'a [String],
    removed_files: &'a [PathBuf],
    warnings: &'a [String],
    /// True when nothing had to be merged (a `pull` already done): nothing
    /// changed, `merge` is null.
    nothing_to_do: bool,
}

pub fn merged(op: &Merge, outcome: &Outcome, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(&Merged {
            disk: &op.disk,
            merge: Some(&op.merge),
            job: op.job.as_ref().map(JobView::of),
            removed_snapshots: &op.removed_snapshots,
            removed_files: &outcome.removed_files,
            warnings: &outcome.warnings,
            nothing_to_do: false,
        });
    }
    let mut out = io::stdout().lock();
    match &op.merge {
        MergeKind::Commit { top, base } => writeln!(
            out,
            "{}: committed {} into {}",
            op.disk,
            top.display(),
            base.display()
        )?,
        MergeKind::Pull { active, .. } => {
            writeln!(out, "{}: pulled into {}", op.disk, active.display())?
        }
    }
    for s in &op.removed_snapshots {
        writeln!(out, "  removed snapshot {s}: its state no longer exists")?;
    }
    removed_and_warnings(&mut out, outcome)
}

/// A merge with nothing to do (`reason` says why): one line on stdout, or the
/// `commit`/`pull` document with `"merge": null` and `"nothing_to_do": true`.
pub fn nothing_to_merge(disk: &str, reason: &str, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(&Merged {
            disk,
            merge: None,
            job: None,
            removed_snapshots: &[],
            removed_files: &[],
            warnings: &[],
            nothing_to_do: true,
        });
    }
    writeln!(io::stdout().lock(), "{reason}")
}

/// One of QEMU's jobs (`jobs --json`: `{"jobs": [...]}`).
#[derive(Serialize)]
struct JobRow<'a> {
    id: &'a str,
    #[serde(rename = "type")]
    kind: &'a str,
    status: &'a str,
    /// Progress in the job's units (bytes for block jobs).
    current: u64,
    total: u64,
    error: Option<&'a str>,
}

#[derive(Serialize)]
struct JobList<'a> {
    jobs: Vec<JobRow<'a>>,
}

pub fn jobs(jobs: &[qmp_client::JobInfo], as_json: bool) -> io::Result<()> {
    if as_json {
        return json(&JobList {
            jobs: jobs
                .iter()
                .map(|j| JobRow {
                    id: &j.id,
                    kind: &j.kind,
                    status: j.status.as_str(),
                    current: j.current_progress,
                    total: j.total_progress,
                    error: j.error.as_deref(),
                })
                .collect(),
        });
    }
    let mut out = io::stdout().lock();
    if jobs.is_empty() {
        return writeln!(out, "no jobs");
    }
    writeln!(
        out,
        "{:<24} {:<8} {:<10} {:>9}  ERROR",
        "ID", "TYPE", "STATUS", "PROGRESS"
    )?;
    for j in jobs {
        let pct = if j.total_progress > 0 {
            format!(
                "{:.1}%",
                100.0 * j.current_progress as f64 / j.total_progress as f64
            )
        } else {
            "-".to_owned()
        };
        writeln!(
            out,
            "{:<24} {:<8} {:<10} {:>9}  {}",
            j.id,
            j.kind,
            j.status,
            pct,
            j.error.as_deref().unwrap_or("")
        )?;
    }
    Ok(())
}

/// Progress of merge jobs: a bar with bytes, rate and ETA on a terminal, one
/// JSON line per update on stderr otherwise (stdout stays one document).
pub fn progress_reporter(as_json: bool) -> ProgressFn {
    use std::io::IsTerminal;
    use std::sync::{Arc, Mutex};
    if !as_json && io::stderr().is_terminal() {
        let bars: Mutex<std::collections::HashMap<String, indicatif::ProgressBar>> =
            Mutex::default();
        return Arc::new(move |p: &Progress| {
            let mut bars = bars.lock().unwrap_or_else(|e| e.into_inner());
            let bar = bars.entry(p.job.clone()).or_insert_with(|| {
                let bar = indicatif::ProgressBar::new(p.total);
                bar.set_style(
                    indicatif::ProgressStyle::with_template(
                        "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
                    )
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_message(p.job.clone());
                bar
            });
            bar.set_length(p.total);
            bar.set_position(p.current);
        });
    }
    Arc::new(|p: &Progress| {
        if let Ok(line) = serde_json::to_string(&ProgressLine { progress: p }) {
            let _ = writeln!(io::stderr().lock(), "{line}");
        }
    })
}

/// A progress line on stderr: `{"progress": {"job", "current", "total"}}`.
#[derive(Serialize)]
struct ProgressLine<'a> {
    progress: &'a Progress,
}

/// `job cancel|wait ID --json`.
#[derive(Serialize)]
pub struct JobEnd<'a> {
    pub id: &'a str,
    pub status: &'a str,
    /// QEMU's error text when the job failed.
    pub error: Option<&'a str>,
}

/// `export --json`.
#[derive(Serialize)]
struct Exported<'a> {
    snapshot: &'a str,
    disk: &'a str,
    output: &'a Path,
    format: &'a str,
    /// The image's size on disk.
    bytes: Option<u64>,
    warnings: &'a [String],
}

pub fn exported(
    op: &snapctl::operation::Export,
    outcome: &Outcome,
    as_json: bool,
) -> io::Result<()> {
    let bytes = std::fs::metadata(&op.output).ok().map(|m| m.len());
    if as_json {
        return json(&Exported {
            snapshot: &op.snapshot,
            disk: &op.disk,
            output: &op.output,
            format: &op.format,
            bytes,
            warnings: &outcome.warnings,
        });
    }
    warnings(outcome);
    writeln!(
        io::stdout().lock(),
        "exported {} as of {} to {} ({})",
        op.disk,
        op.snapshot,
        op.output.display(),
        op.format
    )
}

/// `clone --json`.
#[derive(Serialize)]
struct Cloned<'a> {
    vm: &'a str,
    snapshot: &'a str,
    /// Per disk, the clone's overlay and the frozen image it stands on.
    disks: BTreeMap<&'a str, Switched<'a>>,
    warnings: &'a [String],
}

pub fn cloned(op: &snapctl::operation::Clone, outcome: &Outcome, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(&Cloned {
            vm: &op.to,
            snapshot: &op.snapshot,
            disks: switched(op.disks.iter().map(|d| (&d.disk, &d.frozen, &d.overlay))),
            warnings: &outcome.warnings,
        });
    }
    warnings(outcome);
    let mut out = io::stdout().lock();
    writeln!(out, "cloned {} as vm {}", op.snapshot, op.to)?;
    for d in &op.disks {
        writeln!(
            out,
            "  {}: {} on {}",
            d.disk,
            d.overlay.display(),
            d.frozen.display()
        )?;
    }
    writeln!(out, "start it with: snapctl --vm {} qemu-args", op.to)
}

/// What a command did, one line each (`--json`: `{"done": [...]}`).
pub fn lines(lines: &[String], as_json: bool) -> io::Result<()> {
    #[derive(Serialize)]
    struct Done<'a> {
        done: &'a [String],
    }
    if as_json {
        return json(&Done { done: lines });
    }
    let mut out = io::stdout().lock();
    for line in lines {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// `backup --json`.
#[derive(Serialize)]
struct BackedUp<'a> {
    /// The temporary snapshot (merged back: no longer in the record).
    snapshot: &'a str,
    /// The standalone copies, one per disk.
    images: &'a [PathBuf],
    warnings: &'a [String],
}

pub fn backed_up(
    name: &str,
    images: &[PathBuf],
    outcome: &Outcome,
    as_json: bool,
) -> io::Result<()> {
    if as_json {
        return json(&BackedUp {
            snapshot: name,
            images,
            warnings: &outcome.warnings,
        });
    }
    warnings(outcome);
    let mut out = io::stdout().lock();
    writeln!(out, "backed up as of {name}; the chain is as it was")?;
    for image in images {
        writeln!(out, "  {}", image.display())?;
    }
    Ok(())
}
