//! Rendering: text for people, one JSON document for programs (`--json`).
//!
//! The JSON shapes are the contract documented in the README ("JSON output");
//! fields may be added, never renamed.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::json;
use snapctl::check::Drift;
use snapctl::plan::{CreatePlan, Step};
use snapctl::record::{Record, Snapshot};
use snapctl::views::{self, ChainView, SnapshotView};

pub fn json<T: Serialize + ?Sized>(value: &T) -> io::Result<()> {
    let mut out = io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)
}

pub fn list(record: &Record, tree: bool, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(&views::list(record));
    }
    let mut out = io::stdout().lock();
    if record.snapshots.is_empty() {
        return writeln!(out, "no snapshots of {}", record.vm);
    }
    if tree {
        let roots: Vec<&Snapshot> = record
            .snapshots
            .iter()
            .filter(|s| s.parent.is_none())
            .collect();
        for (i, root) in roots.iter().enumerate() {
            draw(&mut out, record, root, "", i + 1 == roots.len(), true)?;
        }
        if record.current.is_none() {
            writeln!(out, "(no current snapshot)")?;
        }
        return Ok(());
    }
    writeln!(
        out,
        "{:<2}{:<20} {:<20} {:<12} {:<10} {:<12} DESCRIPTION",
        "", "NAME", "CREATED", "PARENT", "KIND", "DISKS"
    )?;
    for s in &record.snapshots {
        let v = SnapshotView::new(record, s);
        writeln!(
            out,
            "{:<2}{:<20} {:<20} {:<12} {:<10} {:<12} {}",
            if v.current { "*" } else { "" },
            v.name,
            s.created.strftime("%Y-%m-%d %H:%M:%S"),
            v.parent.unwrap_or("-"),
            kind(s),
            s.disks.keys().cloned().collect::<Vec<_>>().join(","),
            v.description.unwrap_or("")
        )?;
    }
    Ok(())
}

fn kind(s: &Snapshot) -> String {
    serde_json::to_value(s.kind)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn draw(
    out: &mut impl Write,
    record: &Record,
    s: &Snapshot,
    prefix: &str,
    last: bool,
    root: bool,
) -> io::Result<()> {
    let branch = if root {
        ""
    } else if last {
        "└── "
    } else {
        "├── "
    };
    let marker = if record.current.as_deref() == Some(s.name.as_str()) {
        "  <- current"
    } else {
        ""
    };
    writeln!(out, "{prefix}{branch}{}{marker}", s.name)?;
    let children = record.children(&s.name);
    let next = if root {
        prefix.to_owned()
    } else {
        format!("{prefix}{}", if last { "    " } else { "│   " })
    };
    for (i, c) in children.iter().enumerate() {
        draw(out, record, c, &next, i + 1 == children.len(), false)?;
    }
    Ok(())
}

pub fn show(record: &Record, s: &Snapshot, as_json: bool) -> io::Result<()> {
    let v = SnapshotView::new(record, s);
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
    if !v.children.is_empty() {
        writeln!(out, "children:    {}", v.children.join(", "))?;
    }
    for (disk, image) in &v.disks {
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
            let mut labels = Vec::new();
            if e.active {
                labels.push("active".to_owned());
            }
            if !e.snapshots.is_empty() {
                labels.push(format!("holds {}", e.snapshots.join(", ")));
            }
            if !e.owned {
                labels.push("foreign".to_owned());
            }
            writeln!(
                out,
                "  {} [{}] {}",
                e.image.display(),
                e.format,
                labels.join("; ")
            )?;
        }
    }
    Ok(())
}

pub fn plan(steps: &[Step], as_json: bool) -> io::Result<()> {
    if as_json {
        return json(&json!({ "dry_run": true, "steps": steps }));
    }
    let mut out = io::stdout().lock();
    for (i, step) in steps.iter().enumerate() {
        writeln!(out, "{:>2}. {step}", i + 1)?;
    }
    writeln!(out, "(dry run: nothing was changed)")
}

pub fn created(plan: &CreatePlan, warnings: &[String], as_json: bool) -> io::Result<()> {
    if as_json {
        let disks: serde_json::Map<String, serde_json::Value> = plan
            .disks
            .iter()
            .map(|d| {
                (
                    d.disk.clone(),
                    json!({ "image": d.frozen, "overlay": d.overlay }),
                )
            })
            .collect();
        return json(&json!({
            "snapshot": plan.name,
            "parent": plan.parent,
            "quiesced": plan.quiesce,
            "disks": disks,
            "warnings": warnings,
        }));
    }
    let mut out = io::stdout().lock();
    writeln!(out, "created snapshot {}", plan.name)?;
    for d in &plan.disks {
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

pub fn init(record: &Record, added: &[String], as_json: bool) -> io::Result<()> {
    if as_json {
        let disks: serde_json::Map<String, serde_json::Value> = record
            .disks
            .keys()
            .map(|id| {
                (
                    id.clone(),
                    json!({ "chain": record.chain(id), "added": added.contains(id) }),
                )
            })
            .collect();
        return json(&json!({ "vm": record.vm, "disks": disks }));
    }
    let mut out = io::stdout().lock();
    writeln!(out, "registered {}", record.vm)?;
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

pub fn check(drifts: &[Drift], changes: &[String], live: bool, as_json: bool) -> io::Result<()> {
    if as_json {
        return json(&json!({ "qemu_running": live, "repaired": changes, "drift": drifts }));
    }
    let mut out = io::stdout().lock();
    for c in changes {
        writeln!(out, "repaired: {c}")?;
    }
    for d in drifts {
        writeln!(out, "drift: {}", d.message)?;
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

pub fn reverted(
    plan: &snapctl::revert::RevertPlan,
    qemu_args: Option<&[String]>,
    warnings: &[String],
    as_json: bool,
) -> io::Result<()> {
    if as_json {
        let disks: serde_json::Map<String, serde_json::Value> = plan
            .disks
            .iter()
            .map(|d| {
                (
                    d.disk.clone(),
                    json!({ "image": d.frozen, "overlay": d.overlay }),
                )
            })
            .collect();
        return json(&json!({
            "snapshot": plan.snapshot,
            "live": plan.live,
            "paused": plan.live && plan.paused,
            "disks": disks,
            "qemu_args": qemu_args,
            "warnings": warnings,
        }));
    }
    let mut out = io::stdout().lock();
    writeln!(out, "reverted to {}", plan.snapshot)?;
    for d in &plan.disks {
        writeln!(
            out,
            "  {}: now writing {} (on {})",
            d.disk,
            d.overlay.display(),
            d.frozen.display()
        )?;
    }
    if let Some(args) = qemu_args {
        let line: Vec<String> = args.iter().map(|a| views::shell_quote(a)).collect();
        writeln!(out, "QEMU is not running; start it with:")?;
        writeln!(out, "{}", line.join(" "))?;
    }
    Ok(())
}

pub fn jobs(jobs: &[qmp_client::JobInfo], as_json: bool) -> io::Result<()> {
    if as_json {
        let list: Vec<serde_json::Value> = jobs
            .iter()
            .map(|j| {
                json!({
                    "id": j.id, "type": j.kind, "status": j.status.to_string(),
                    "current": j.current_progress, "total": j.total_progress, "error": j.error,
                })
            })
            .collect();
        return json(&json!({ "jobs": list }));
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
pub fn progress_reporter(as_json: bool) -> snapctl::delete::ProgressFn {
    use std::io::IsTerminal;
    use std::sync::{Arc, Mutex};
    if !as_json && io::stderr().is_terminal() {
        let bars: Mutex<std::collections::HashMap<String, indicatif::ProgressBar>> =
            Mutex::default();
        return Arc::new(move |p: &snapctl::delete::Progress| {
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
    Arc::new(|p: &snapctl::delete::Progress| {
        let line = json!({ "progress": { "job": p.job, "current": p.current, "total": p.total } });
        let _ = writeln!(io::stderr().lock(), "{line}");
    })
}
