//! `backup`: the live backup recipe in one command. A temporary snapshot
//! freezes every disk; each frozen image's chain is copied to a standalone
//! image (an export); the temporary overlays are then committed back into
//! the images they froze, so the chain is as it was before.
//!
//! The three steps are ordinary journaled operations (create, export, delete),
//! so a crash inside one is settled by its own recovery; the record also
//! notes the backup in progress, and the next command rolls a left-over one
//! back: the temporary snapshot merged back, the partial copies removed.

use std::path::PathBuf;

use super::{HostFiles, Outcome, RunOptions, Session};
use crate::error::{Error, Result};
use crate::graph::LiveLayer;
use crate::operation::Operation;
use crate::plan::create::CreateOptions;
use crate::plan::export::ExportOptions;
use crate::plan::{self, Plan, Step};
use crate::record::BackupState;

/// What the user asked `backup` for.
#[derive(Debug, Clone)]
pub struct BackupOptions {
    /// The temporary snapshot's name (also in the copies' file names).
    pub name: String,
    /// Where the standalone copies go.
    pub dir: PathBuf,
    pub quiesce: bool,
    /// Bytes per second for the merge back (0: unlimited).
    pub bandwidth: u64,
    /// `qcow2` or `raw`.
    pub format: String,
}

/// A planned backup: its three parts, in the order they run.
#[derive(Debug, Clone)]
pub struct BackupPlan {
    pub create: Plan,
    pub exports: Vec<Plan>,
    pub merge_back: Plan,
}

impl BackupPlan {
    /// Every step of the backup, for `--dry-run`.
    pub fn steps(&self) -> Vec<Step> {
        self.create
            .steps
            .iter()
            .chain(self.exports.iter().flat_map(|e| &e.steps))
            .chain(&self.merge_back.steps)
            .cloned()
            .collect()
    }

    /// The standalone copies it writes.
    pub fn outputs(&self) -> Vec<PathBuf> {
        self.exports
            .iter()
            .filter_map(|e| match &e.operation {
                Operation::Export(x) => Some(x.output.clone()),
                _ => None,
            })
            .collect()
    }
}

impl Session {
    /// Plans a backup: the temporary snapshot, the copies and the merge back,
    /// each planned against the state the one before leaves.
    pub async fn plan_backup(&mut self, opts: &BackupOptions) -> Result<BackupPlan> {
        self.running_client()?;
        if let Some(b) = &self.record.backup {
            return Err(Error::Refused(format!(
                "the backup {} is still in progress: run snapctl check --repair",
                b.snapshot
            )));
        }
        let dir = std::path::absolute(&opts.dir).map_err(|e| Error::io("resolve", &opts.dir, e))?;
        let create = self
            .plan_create(&CreateOptions {
                quiesce: opts.quiesce,
                ..CreateOptions::named(opts.name.clone())
            })
            .await?;
        let Operation::Create(op) = &create.operation else {
            unreachable!("a create plan holds a create")
        };
        // The record and QEMU's graph as the temporary snapshot leaves them.
        let mut after = self.record.clone();
        plan::create::apply(&mut after, op);
        let mut live = self
            .live()
            .await?
            .cloned()
            .ok_or_else(|| Error::Refused("a backup needs QEMU running".into()))?;
        for d in &op.disks {
            if let Some(disk) = live.disks.get_mut(&d.disk) {
                disk.chain.insert(
                    0,
                    LiveLayer {
                        node: d.overlay_node.clone(),
                        filename: d.overlay.clone(),
                        format: "qcow2".into(),
                        virtual_size: d.virtual_size,
                        read_only: false,
                        backing_string: Some(d.frozen.display().to_string()),
                        file_node: Some(d.file_node.clone()),
                        bitmaps: d.bitmaps.clone(),
                    },
                );
            }
            live.node_names.insert(d.overlay_node.clone());
            live.node_names.insert(d.file_node.clone());
        }
        let facts = plan::Facts {
            live: Some(&live),
            running: self.running,
            now: jiff::Timestamp::now(),
            host: &HostFiles,
        };
        let mut exports = Vec::new();
        for d in &op.disks {
            // `<disk>.<name>.qcow2` (`.img` for raw), as overlays are named.
            let mut file = crate::names::overlay_file_name(&d.disk, &opts.name);
            if opts.format == "raw" {
                file = format!("{}.img", file.trim_end_matches(".qcow2"));
            }
            exports.push(plan::export::plan(
                &after,
                &facts,
                &ExportOptions {
                    snapshot: opts.name.clone(),
                    disk: Some(d.disk.clone()),
                    output: dir.join(file),
                    format: opts.format.clone(),
                    compress: false,
                },
            )?);
        }
        let merge_back = plan::delete::plan_merge_back(&after, &facts, &opts.name, opts.bandwidth)?;
        Ok(BackupPlan {
            create,
            exports,
            merge_back,
        })
    }

    /// Runs a backup planned by [`Session::plan_backup`]. Returns the copies
    /// written. A failure after the temporary snapshot still merges it back
    /// and removes the copies.
    pub async fn run_backup(&mut self, plan: &BackupPlan, options: &RunOptions) -> Result<Outcome> {
        let Operation::Create(op) = &plan.create.operation else {
            unreachable!("a backup starts with a create")
        };
        self.record.backup = Some(BackupState {
            snapshot: op.name.clone(),
            outputs: plan.outputs(),
        });
        let mut outcome = match self.run(&plan.create, options).await {
            Ok(o) => o,
            Err(e) => {
                self.record.backup = None;
                return Err(e);
            }
        };
        let mut failed = None;
        for export in &plan.exports {
            if let Err(e) = self.run(export, options).await {
                failed = Some(e);
                break;
            }
        }
        if let Some(error) = failed {
            let lines = self.roll_back_backup().await?;
            return Err(Error::Refused(format!(
                "the backup failed ({error}); {}",
                lines.join("; ")
            )));
        }
        // The merge back is planned against the state as it is now.
        let merge_back = self
            .plan_merge_back(&op.name, plan_bandwidth(&plan.merge_back))
            .await?;
        let merged = self.run(&merge_back, options).await?;
        outcome.warnings.extend(merged.warnings);
        outcome.removed_files.extend(merged.removed_files);
        self.record.backup = None;
        self.save()?;
        Ok(outcome)
    }

    async fn plan_merge_back(&mut self, name: &str, bandwidth: u64) -> Result<Plan> {
        self.read_graph(true).await?;
        let facts = self.facts(&HostFiles, true);
        plan::delete::plan_merge_back(&self.record, &facts, name, bandwidth)
    }

    /// Rolls back a backup left in progress: the copies are removed and the
    /// temporary snapshot merged back. Returns what was done.
    pub(crate) async fn roll_back_backup(&mut self) -> Result<Vec<String>> {
        let Some(state) = self.record.backup.clone() else {
            return Ok(Vec::new());
        };
        let mut lines = Vec::new();
        for output in &state.outputs {
            if std::fs::remove_file(output).is_ok() {
                lines.push(format!("removed the partial copy {}", output.display()));
            }
        }
        if self.record.snapshot(&state.snapshot).is_some() {
            let merge_back = self.plan_merge_back(&state.snapshot, 0).await?;
            self.run(&merge_back, &RunOptions::default()).await?;
            lines.push(format!(
                "merged the temporary snapshot {} back",
                state.snapshot
            ));
        }
        self.record.backup = None;
        self.save()?;
        lines.push(format!("rolled back the backup {}", state.snapshot));
        Ok(lines)
    }
}

/// The bandwidth a planned merge runs at.
fn plan_bandwidth(plan: &Plan) -> u64 {
    match &plan.operation {
        Operation::Delete(d) => d
            .disks
            .iter()
            .filter_map(|x| x.job.as_ref())
            .find_map(|j| j.arguments["speed"].as_u64())
            .unwrap_or(0),
        _ => 0,
    }
}
