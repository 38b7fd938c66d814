//! `revert`: make a snapshot's state current again.
//!
//! A snapshot's frozen image is never written: reverting puts a fresh overlay
//! on it and makes that the active image. With QEMU running (QEMU-NOTES §3.3b):
//! `stop`, create the overlay inside QEMU (`blockdev-create`) with the frozen
//! image's node as backing (opening that image's chain read-only first when it
//! belongs to a branch that is not open), switch the device with `qom-set …
//! drive`, delete the abandoned nodes, `system_reset` (the guest's caches
//! describe the old disk, so it must reboot), `cont` unless asked to stay
//! paused. With QEMU stopped: create the overlay and record it.
//! Either way, owned files that no snapshot and no chain needs any more are
//! removed afterwards; foreign files never are.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use qmp_client::Client;
use serde::Serialize;
use serde_json::{Value, json};

use crate::create::{Interrupt, Undo};
use crate::error::{Error, Result};
use crate::graph::LiveGraph;
use crate::images;
use crate::names;
use crate::plan::Step;
use crate::record::{Layer, Record};
use crate::store::VmLock;

/// A layer of the target's chain that QEMU does not have open (another branch).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct OpenLayer {
    pub path: PathBuf,
    pub format: String,
    pub node: String,
    /// The node below it (already open, or opened just before), `None` for a base.
    pub backing_node: Option<String>,
}

/// One disk's part of a revert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct DiskRevert {
    pub disk: String,
    /// The snapshot's frozen image for this disk: the new overlay's backing.
    pub frozen: PathBuf,
    pub frozen_format: String,
    pub virtual_size: u64,
    pub overlay: PathBuf,
    pub overlay_node: String,
    pub file_node: String,
    /// Live only: the node of the frozen image the overlay is linked to.
    pub backing_node: Option<String>,
    /// Live only: layers to open first (bottom-up) when the frozen image is on
    /// a branch QEMU does not have open.
    pub open: Vec<OpenLayer>,
    /// Live only: the device's current chain (format nodes, top first), to
    /// delete once the device no longer uses it.
    pub old_nodes: Vec<String>,
}

/// A planned revert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct RevertPlan {
    pub snapshot: String,
    /// QEMU runs: the live recipe; otherwise the offline one.
    pub live: bool,
    pub paused: bool,
    pub disks: Vec<DiskRevert>,
}

/// Plans a revert to `name`. `live` is QEMU's graph when it runs.
pub fn plan(
    record: &Record,
    live: Option<&LiveGraph>,
    name: &str,
    paused: bool,
) -> Result<RevertPlan> {
    let snapshot = record
        .snapshot(name)
        .ok_or_else(|| Error::UnknownSnapshot {
            vm: record.vm.clone(),
            name: name.to_owned(),
        })?;
    let mut used: BTreeSet<String> = live.map(|g| g.node_names.clone()).unwrap_or_default();
    let mut disks = Vec::new();
    for (disk, sd) in &snapshot.disks {
        let layer = record.layers.get(&sd.image).ok_or_else(|| {
            Error::Drift(format!(
                "snapshot {name} names {} for {disk}, which the record does not know",
                sd.image.display()
            ))
        })?;
        let virtual_size = match layer.virtual_size {
            Some(size) => size,
            None => images::info(&sd.image)?.virtual_size,
        };
        let dir = sd.image.parent().unwrap_or(Path::new("/"));
        let overlay = (1u32..)
            .map(|n| dir.join(names::overlay_file_name(disk, &format!("{name}-r{n}"))))
            .find(|p| p.symlink_metadata().is_err())
            .expect("an unused file name exists");
        let mut fresh = |prefix: &str| {
            let n = (0u64..)
                .map(|salt| names::node_name(prefix, disk, name, salt))
                .find(|n| !used.contains(n))
                .expect("an unused node name exists");
            used.insert(n.clone());
            n
        };
        let (overlay_node, file_node) = (fresh("sr"), fresh("sf"));

        let (mut backing_node, mut open, mut old_nodes) = (None, Vec::new(), Vec::new());
        if let Some(graph) = live {
            let device = graph.disks.get(disk).ok_or_else(|| {
                Error::Drift(format!(
                    "QEMU has no disk {disk}, which snapshot {name} covers"
                ))
            })?;
            if let Some(active) = device.active()
                && active.virtual_size != virtual_size
            {
                return Err(Error::Drift(format!(
                    "{disk} is {} bytes in QEMU but {} in snapshot {name}: refusing to switch",
                    active.virtual_size, virtual_size
                )));
            }
            old_nodes = device.chain.iter().map(|l| l.node.clone()).collect();
            // Walk down from the frozen image to the first layer QEMU has open.
            let mut missing = Vec::new();
            let mut below = None;
            for path in record.chain_from(&sd.image) {
                if let Some(node) = graph.node_for(path) {
                    below = Some(node.node.clone());
                    break;
                }
                missing.push(path.to_owned());
            }
            for path in missing.iter().rev() {
                let node = names::node_name("so", disk, &path.to_string_lossy(), 0);
                let node = if used.contains(&node) {
                    (1u64..)
                        .map(|s| names::node_name("so", disk, &path.to_string_lossy(), s))
                        .find(|n| !used.contains(n))
                        .expect("an unused node name exists")
                } else {
                    node
                };
                used.insert(node.clone());
                let format = record
                    .layers
                    .get(path)
                    .map_or_else(|| "qcow2".to_owned(), |l| l.format.clone());
                open.push(OpenLayer {
                    path: path.clone(),
                    format,
                    node: node.clone(),
                    backing_node: below.clone(),
                });
                below = Some(node);
            }
            backing_node = below;
        }
        disks.push(DiskRevert {
            disk: disk.clone(),
            frozen: sd.image.clone(),
            frozen_format: layer.format.clone(),
            virtual_size,
            overlay,
            overlay_node,
            file_node,
            backing_node,
            open,
            old_nodes,
        });
    }
    Ok(RevertPlan {
        snapshot: name.to_owned(),
        live: live.is_some(),
        paused,
        disks,
    })
}

fn open_blockdev(l: &OpenLayer) -> Value {
    let mut spec = json!({
        "driver": l.format,
        "node-name": l.node,
        "read-only": true,
        "file": { "driver": "file", "filename": l.path, "read-only": true },
    });
    if l.format == "qcow2" {
        spec["backing"] = l.backing_node.clone().map_or(Value::Null, Value::from);
    }
    spec
}

fn overlay_blockdev(d: &DiskRevert) -> Value {
    json!({
        "driver": "qcow2",
        "node-name": d.overlay_node,
        "file": { "driver": "file", "node-name": d.file_node, "filename": d.overlay },
        "backing": d.backing_node,
    })
}

impl RevertPlan {
    /// The ordered steps, for `--dry-run`.
    pub fn steps(&self, record: &Record) -> Vec<Step> {
        let qmp = |command: &str, arguments: Value| Step::Qmp {
            command: command.into(),
            arguments,
        };
        let mut steps = Vec::new();
        if !self.live {
            steps.extend(self.disks.iter().map(DiskRevert::create_step));
        } else {
            steps.push(qmp("stop", Value::Null));
            for d in &self.disks {
                steps.push(d.create_step());
                for l in &d.open {
                    steps.push(qmp("blockdev-add", open_blockdev(l)));
                }
                steps.push(qmp("blockdev-add", overlay_blockdev(d)));
            }
            for d in &self.disks {
                steps.push(qmp(
                    "qom-set",
                    json!({"path": format!("/machine/peripheral/{}", d.disk), "property": "drive", "value": d.overlay_node}),
                ));
                for n in &d.old_nodes {
                    steps.push(qmp("blockdev-del", json!({"node-name": n})));
                }
            }
            steps.push(qmp("system_reset", Value::Null));
            if !self.paused {
                steps.push(qmp("cont", Value::Null));
            }
        }
        let mut after = record.clone();
        for path in self.apply(&mut after) {
            steps.push(Step::Record {
                change: format!("remove {} (nothing needs it)", path.display()),
            });
        }
        steps.push(Step::Record {
            change: format!("current snapshot is {}", self.snapshot),
        });
        steps
    }

    /// The record after the revert. Returns the owned files nothing needs any
    /// more (to delete once QEMU has let go of them); their layers are dropped.
    pub fn apply(&self, record: &mut Record) -> Vec<PathBuf> {
        for d in &self.disks {
            record.layers.insert(
                d.overlay.clone(),
                Layer {
                    format: "qcow2".into(),
                    backing: Some(d.frozen.clone()),
                    backing_string: Some(d.frozen.display().to_string()),
                    owned: true,
                    virtual_size: Some(d.virtual_size),
                },
            );
            if let Some(disk) = record.disks.get_mut(&d.disk) {
                disk.active = d.overlay.clone();
            }
        }
        record.current = Some(self.snapshot.clone());
        prune(record)
    }
}

/// Drops layers nothing needs from the record; returns the owned ones' files.
pub fn prune(record: &mut Record) -> Vec<PathBuf> {
    let needed: BTreeSet<PathBuf> = record
        .layers_needed()
        .into_iter()
        .map(Path::to_path_buf)
        .collect();
    let unneeded: Vec<PathBuf> = record
        .layers
        .keys()
        .filter(|p| !needed.contains(*p))
        .cloned()
        .collect();
    let mut files = Vec::new();
    for path in unneeded {
        if let Some(layer) = record.layers.remove(&path)
            && layer.owned
        {
            files.push(path);
        }
    }
    files
}

/// Deletes files nothing needs, unless QEMU still has them open.
pub(crate) fn remove_files(files: &[PathBuf], live: Option<&LiveGraph>) -> Vec<String> {
    let mut warnings = Vec::new();
    for f in files {
        if live.is_some_and(|g| g.node_for(f).is_some()) {
            warnings.push(format!("kept {}: QEMU still has it open", f.display()));
            continue;
        }
        match std::fs::remove_file(f) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warnings.push(format!("could not remove {}: {e}", f.display())),
        }
    }
    warnings
}

/// Refuses when QEMU runs a job: the chain may be changing under us.
pub(crate) async fn refuse_running_jobs(client: &Client) -> Result<()> {
    let jobs = client.query_jobs().await?;
    if let Some(job) = jobs.iter().find(|j| !j.status.is_finished()) {
        return Err(Error::Drift(format!(
            "QEMU runs job {} ({}, {}): wait for it or cancel it first",
            job.id, job.kind, job.status
        )));
    }
    Ok(())
}

/// Runs a revert with QEMU running. Returns warnings.
pub async fn run_live(
    client: &Client,
    lock: &VmLock,
    record: &mut Record,
    plan: &RevertPlan,
    interrupt: &Interrupt,
) -> Result<Vec<String>> {
    refuse_running_jobs(client).await?;
    interrupt.check()?;
    let status = client.execute_raw("query-status", Value::Null).await?;
    let was_running = status.get("running").and_then(Value::as_bool) == Some(true);
    let journal = lock.begin(
        record,
        "revert",
        serde_json::to_value(plan).unwrap_or_default(),
    )?;
    client.execute_raw("stop", Value::Null).await?;

    let mut undo = Undo::default();
    let prepared = prepare(client, plan, &mut undo).await;
    if let Err(e) = prepared {
        undo.run(client).await;
        if was_running {
            let _ = client.execute_raw("cont", Value::Null).await;
        }
        lock.resolve(record, journal)?;
        return Err(e);
    }

    crate::fault::point("revert:prepared");
    // The switch. From here on the new overlays are in use: nothing is undone.
    let mut warnings = Vec::new();
    for d in &plan.disks {
        client
            .execute_raw(
                "qom-set",
                json!({
                    "path": format!("/machine/peripheral/{}", d.disk),
                    "property": "drive",
                    "value": d.overlay_node,
                }),
            )
            .await?;
    }
    crate::fault::point("revert:switched");
    // The devices use the new overlays: record that now, with the journal
    // entry still open until the guest has been reset (a guest resumed on a
    // swapped disk without a reset would corrupt it; recovery resets it).
    let files = plan.apply(record);
    lock.save(record)?;
    for d in &plan.disks {
        delete_unused_nodes(client, &d.old_nodes).await;
    }
    let reset = async {
        client.execute_raw("system_reset", Value::Null).await?;
        if !plan.paused {
            client.execute_raw("cont", Value::Null).await?;
        }
        Ok::<(), qmp_client::Error>(())
    };
    match reset.await {
        Ok(()) => {}
        // QEMU started with -no-reboot exits instead of resetting.
        Err(e) if e.is_closed() => {
            lock.resolve(record, journal)?;
            warnings.push(
                "QEMU exited at the guest reset (was it started with -no-reboot?): the disks \
                 are reverted; start QEMU again with `snapctl qemu-args`"
                    .to_owned(),
            );
            warnings.extend(remove_files(&files, None));
            return Ok(warnings);
        }
        Err(e) => return Err(e.into()),
    }
    lock.resolve(record, journal)?;
    let graph = crate::graph::read(client).await?;
    warnings.extend(remove_files(&files, Some(&graph)));
    Ok(warnings)
}

async fn prepare(client: &Client, plan: &RevertPlan, undo: &mut Undo) -> Result<()> {
    for d in &plan.disks {
        d.create_overlay()?;
        undo.files.push(d.overlay.clone());
        for l in &d.open {
            client.execute_raw("blockdev-add", open_blockdev(l)).await?;
            undo.nodes.push(l.node.clone());
        }
        client
            .execute_raw("blockdev-add", overlay_blockdev(d))
            .await?;
        undo.nodes.push(d.overlay_node.clone());
    }
    Ok(())
}

impl DiskRevert {
    /// The fresh overlay file on the frozen image.
    fn create_overlay(&self) -> Result<()> {
        images::new_overlay(
            &self.overlay,
            self.virtual_size,
            &self.frozen.to_string_lossy(),
            &self.frozen_format,
        )
    }

    fn create_step(&self) -> Step {
        Step::CreateOverlay {
            path: self.overlay.clone(),
            backing: self.frozen.display().to_string(),
            backing_format: self.frozen_format.clone(),
            size: self.virtual_size,
        }
    }
}

/// Deletes the nodes of an abandoned chain, top first, with their file nodes.
/// QEMU refuses nodes still in use (another chain's backing, a device's
/// root), which is exactly what must stay; nodes it did not let the monitor
/// own were freed with their parent. Those refusals are expected, not errors.
pub(crate) async fn delete_unused_nodes(client: &Client, nodes: &[String]) {
    let files = file_children(client, nodes).await;
    for node in nodes.iter().chain(files.iter()) {
        if let Err(e) = client
            .execute_raw("blockdev-del", json!({ "node-name": node }))
            .await
        {
            tracing::debug!(node, error = %e, "node kept");
        }
    }
}

/// The `file` children of `nodes`, read from the debug graph (best effort).
async fn file_children(client: &Client, nodes: &[String]) -> Vec<String> {
    let Ok(graph) = client
        .execute_raw("x-debug-query-block-graph", Value::Null)
        .await
    else {
        return Vec::new();
    };
    let by_id: std::collections::HashMap<u64, &str> = graph["nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|n| Some((n["id"].as_u64()?, n["name"].as_str()?)))
        .collect();
    graph["edges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["name"] == "file")
        .filter_map(|e| {
            let parent = by_id.get(&e["parent"].as_u64()?)?;
            let child = by_id.get(&e["child"].as_u64()?)?;
            nodes
                .iter()
                .any(|n| n == parent)
                .then(|| (*child).to_owned())
        })
        .collect()
}

/// Runs a revert with QEMU stopped: `qemu-img` creates the overlays.
pub fn run_offline(lock: &VmLock, record: &mut Record, plan: &RevertPlan) -> Result<Vec<String>> {
    for id in plan.disks.iter().map(|d| &d.disk) {
        if let Some(disk) = record.disks.get(id) {
            images::ensure_unlocked(&disk.active)?;
        }
    }
    let journal = lock.begin(
        record,
        "revert",
        serde_json::to_value(plan).unwrap_or_default(),
    )?;
    let mut created = Vec::new();
    for d in &plan.disks {
        if let Err(e) = d.create_overlay() {
            for f in &created {
                let _ = std::fs::remove_file(f);
            }
            lock.resolve(record, journal)?;
            return Err(e);
        }
        created.push(d.overlay.clone());
    }
    let files = plan.apply(record);
    lock.resolve(record, journal)?;
    Ok(remove_files(&files, None))
}
