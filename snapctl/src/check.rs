//! `check`: the record against QEMU's live graph and the images' headers.
//!
//! The record is metadata; the truth is the graph and the headers. Each drift
//! found is one line a user can act on. `--repair` adopts only what is
//! unambiguous: a chain that grew on top of the recorded active image (a
//! snapshot taken by hand), and layers QEMU or the headers show that the
//! record lacks. Nothing is ever deleted by a repair.

use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::graph::LiveGraph;
use crate::images;
use crate::record::Record;

/// One disagreement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drift {
    /// A stable keyword: `active-image`, `missing-file`, `backing`, `format`,
    /// `missing-disk`, `unmanaged-disk`, `missing-memory`, `missing-internal`,
    /// `job-running`, `journal`.
    pub kind: &'static str,
    pub disk: Option<String>,
    pub message: String,
}

impl Drift {
    /// What the user can do about it, when snapctl knows.
    pub fn remedy(&self) -> Option<&'static str> {
        Some(match self.kind {
            "active-image" => {
                "`snapctl check --repair` adopts layers opened on top of the recorded chain; \
                 `snapctl check --repair --adopt` records QEMU's chain as it is"
            }
            "backing" | "format" => {
                "`snapctl check --repair --adopt` (QEMU running) records QEMU's chain as it is"
            }
            "missing-file" => "restore the file: snapctl cannot recreate an image's data",
            "missing-internal" => {
                "`snapctl delete NAME --metadata-only` forgets it; its image no longer has it"
            }
            "missing-memory" => {
                "restore the file, or `snapctl delete NAME --metadata-only` to forget the checkpoint"
            }
            "missing-disk" => "start QEMU on the recorded chains: `snapctl qemu-args`",
            "job-running" => {
                "wait for it (`snapctl job wait ID`) or cancel it (`snapctl job cancel ID`)"
            }
            "journal" => "`snapctl check --repair` finishes or undoes it",
            _ => return None,
        })
    }
}

/// A job that QEMU runs (`query-jobs`), as far as `check` cares.
#[derive(Debug, Clone)]
pub struct RunningJob {
    pub id: String,
    pub kind: String,
    pub status: String,
}

fn frozen_by<'a>(record: &'a Record, image: &Path) -> Vec<&'a str> {
    record.snapshots_holding(image)
}

/// Every drift between the record, the live graph (when QEMU runs) and the headers.
pub fn drifts(record: &Record, live: Option<&LiveGraph>, jobs: &[RunningJob]) -> Vec<Drift> {
    drifts_during(record, live, jobs, None)
}

/// [`drifts`] while the snapctl process `holder` (which holds the VM's lock)
/// may be running an operation: its journal entry is reported as in
/// progress, not as interrupted.
pub fn drifts_during(
    record: &Record,
    live: Option<&LiveGraph>,
    jobs: &[RunningJob],
    holder: Option<u32>,
) -> Vec<Drift> {
    let mut out = Vec::new();
    for entry in &record.journal {
        let message = if holder == Some(entry.pid) {
            format!(
                "a {} (pid {}, started {}) is in progress",
                entry.operation.name(),
                entry.pid,
                entry.started
            )
        } else {
            format!(
                "an interrupted {} (pid {}, started {}) left unfinished work",
                entry.operation.name(),
                entry.pid,
                entry.started
            )
        };
        out.push(Drift {
            kind: "journal",
            disk: None,
            message,
        });
    }
    for job in jobs {
        if job.status != "concluded" {
            out.push(Drift {
                kind: "job-running",
                disk: None,
                message: format!("QEMU runs job {} ({}, {})", job.id, job.kind, job.status),
            });
        }
    }
    for disk in live.iter().flat_map(|g| g.disks.values()) {
        if disk.snapshottable() && !record.disks.contains_key(&disk.id) {
            let why = if disk.anonymous {
                "it has no id= (give its -device one, then snapctl init)"
            } else {
                "run snapctl init to add it"
            };
            out.push(Drift {
                kind: "unmanaged-disk",
                disk: Some(disk.id.clone()),
                message: format!(
                    "QEMU has writable disk {} that snapshots do not cover: {why}",
                    disk.id
                ),
            });
        }
    }
    for s in &record.snapshots {
        if let Some(state) = &s.internal {
            for (disk, sd) in &s.disks {
                let held = images::backing_chain(&sd.image)
                    .ok()
                    .and_then(|chain| chain.into_iter().next())
                    .is_some_and(|info| info.holds(&state.tag));
                if !held {
                    out.push(Drift {
                        kind: "missing-internal",
                        disk: Some(disk.clone()),
                        message: format!(
                            "internal snapshot {} is missing from {}",
                            s.name,
                            sd.image.display()
                        ),
                    });
                }
            }
        }
        if let Some(memory) = s.memory.as_ref().filter(|m| !m.path.exists()) {
            out.push(Drift {
                kind: "missing-memory",
                disk: None,
                message: format!(
                    "the memory state of checkpoint {} ({}) is missing",
                    s.name,
                    memory.path.display()
                ),
            });
        }
    }
    for (id, disk) in &record.disks {
        if let Some(live) = live {
            match live.disks.get(id).and_then(|d| d.active()) {
                None => out.push(Drift {
                    kind: "missing-disk",
                    disk: Some(id.clone()),
                    message: format!("QEMU has no disk {id}, which the record knows"),
                }),
                Some(active) if active.filename != disk.active => {
                    let holders = frozen_by(record, &active.filename);
                    let message = if holders.is_empty() {
                        format!(
                            "QEMU writes {} on {id} but the record says the active image is {}",
                            active.filename.display(),
                            disk.active.display()
                        )
                    } else {
                        format!(
                            "QEMU writes {} on {id} but the record says it is frozen by {}",
                            file_name(&active.filename),
                            holders.join(", ")
                        )
                    };
                    out.push(Drift {
                        kind: "active-image",
                        disk: Some(id.clone()),
                        message,
                    });
                }
                Some(_) => {}
            }
        }
        for path in record.chain(id) {
            let Some(layer) = record.layers.get(path) else {
                continue;
            };
            match images::header(path) {
                Err(_) if !path.exists() => out.push(Drift {
                    kind: "missing-file",
                    disk: Some(id.clone()),
                    message: format!("{} is missing", path.display()),
                }),
                Err(e) => out.push(Drift {
                    kind: "missing-file",
                    disk: Some(id.clone()),
                    message: format!("{} cannot be read: {e}", path.display()),
                }),
                Ok(info) => {
                    if info.format != layer.format {
                        out.push(Drift {
                            kind: "format",
                            disk: Some(id.clone()),
                            message: format!(
                                "{} is {} but the record says {}",
                                path.display(),
                                info.format,
                                layer.format
                            ),
                        });
                    }
                    let header = info.backing_path.as_deref().map(normalize);
                    if header.as_deref() != layer.backing.as_deref() {
                        out.push(Drift {
                            kind: "backing",
                            disk: Some(id.clone()),
                            message: format!(
                                "{} is backed by {} in its header but by {} in the record",
                                path.display(),
                                describe(info.backing_string.as_deref()),
                                describe(
                                    layer
                                        .backing
                                        .as_deref()
                                        .map(|p| p.to_string_lossy())
                                        .as_deref()
                                )
                            ),
                        });
                    }
                }
            }
        }
    }
    out
}

fn describe(s: Option<&str>) -> String {
    s.map_or_else(|| "nothing".to_owned(), str::to_owned)
}

fn file_name(p: &Path) -> String {
    p.file_name().map_or_else(
        || p.display().to_string(),
        |n| n.to_string_lossy().into_owned(),
    )
}

fn normalize(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_owned())
}

/// Records QEMU's chain of every disk as it is (`check --repair --adopt`):
/// layers the record lacks are added as foreign, every layer's backing follows
/// QEMU, the active image too. Layers nothing needs any more leave the record;
/// their files stay where they are (named in the lines). Returns one line per
/// change.
pub fn adopt(record: &mut Record, live: &LiveGraph) -> Vec<String> {
    let mut changes = Vec::new();
    let ids: Vec<String> = record.disks.keys().cloned().collect();
    for id in ids {
        let Some(disk) = live.disks.get(&id).filter(|d| !d.chain.is_empty()) else {
            continue;
        };
        let live_chain: Vec<&Path> = disk.chain.iter().map(|l| l.filename.as_path()).collect();
        if record.chain(&id) == live_chain {
            continue;
        }
        record.adopt_chain(disk);
        for (i, layer) in disk.chain.iter().enumerate() {
            let below = disk.chain.get(i + 1).map(|b| b.filename.as_path());
            if let Some(l) = record.layers.get_mut(&layer.filename) {
                l.backing = below.map(Path::to_path_buf);
                l.backing_string = layer.backing_string.clone();
                l.format = layer.format.clone();
            }
        }
        if let Some(d) = record.disks.get_mut(&id) {
            d.active = disk.chain[0].filename.clone();
        }
        let shown: Vec<String> = live_chain.iter().map(|p| p.display().to_string()).collect();
        changes.push(format!(
            "{id}: recorded QEMU's chain as it is: {}",
            shown.join(" <- ")
        ));
    }
    for file in record.prune() {
        changes.push(format!(
            "{} is no longer recorded (nothing needs it); the file is kept",
            file.display()
        ));
    }
    changes
}

/// Adopts what is unambiguous; returns one line per change.
///
/// A live chain whose lower part is the recorded chain (someone took a
/// snapshot by hand): the new layers are recorded as foreign and the active
/// image follows QEMU.
pub fn repair(record: &mut Record, live: Option<&LiveGraph>) -> Vec<String> {
    let mut changes = Vec::new();
    let Some(live) = live else {
        return changes;
    };
    let ids: Vec<String> = record.disks.keys().cloned().collect();
    for id in ids {
        let Some(disk) = live.disks.get(&id) else {
            continue;
        };
        let recorded_active = record.disks[&id].active.clone();
        let Some(pos) = disk
            .chain
            .iter()
            .position(|l| l.filename == recorded_active)
        else {
            continue;
        };
        if pos == 0 {
            continue;
        }
        record.adopt_chain(disk);
        let new_active = disk.chain[0].filename.clone();
        changes.push(format!(
            "{id}: adopted {} layer(s) QEMU opened on top of {}; active image is now {}",
            pos,
            recorded_active.display(),
            new_active.display()
        ));
        if let Some(d) = record.disks.get_mut(&id) {
            d.active = new_active;
        }
    }
    changes
}
