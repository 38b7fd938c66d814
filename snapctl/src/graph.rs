//! QEMU's live block graph, reduced to what snapshots need: per guest disk,
//! the chain of image layers from the active image down to the base.
//!
//! Sources: `query-block` says which device has which root node;
//! `query-named-block-nodes {flat: true}` describes every node (file name,
//! format, size, read-only, header backing string); `x-debug-query-block-graph`
//! gives the exact `backing` edges. That last command is marked unstable, so
//! when it is missing the chain is followed by file name instead, which is
//! exact unless the same image is opened twice.
//!
//! Disks opened with `-blockdev` per layer and with legacy `-drive` (automatic
//! `#blockNNN` node names) read the same way.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use qmp_client::Client;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{Error, Result};

/// One image layer as QEMU has it open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveLayer {
    /// The format node's name (`#blockNNN` for nodes QEMU named itself).
    pub node: String,
    /// The image file.
    pub filename: PathBuf,
    /// The format driver, e.g. `qcow2` or `raw`.
    pub format: String,
    pub virtual_size: u64,
    pub read_only: bool,
    /// The backing string written in this image's header, if any.
    pub backing_string: Option<String>,
    /// The protocol node under it (its `file` child), when QEMU says which.
    pub file_node: Option<String>,
    /// Its persistent dirty bitmaps (incremental backup tools' change
    /// tracking): carried to each overlay a snapshot puts on it.
    pub bitmaps: Vec<Bitmap>,
}

/// A persistent dirty bitmap on a node.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
pub struct Bitmap {
    pub name: String,
    pub granularity: u64,
}

/// A dirty bitmap as QEMU reports it (`dirty-bitmaps` of a node).
#[derive(Debug, Deserialize)]
struct BitmapInfo {
    name: String,
    granularity: u64,
    #[serde(default)]
    persistent: bool,
}

fn persistent(bitmaps: Vec<BitmapInfo>) -> Vec<Bitmap> {
    bitmaps
        .into_iter()
        .filter(|b| b.persistent)
        .map(|b| Bitmap {
            name: b.name,
            granularity: b.granularity,
        })
        .collect()
}

/// A guest disk and its chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveDisk {
    /// The device's qdev id, e.g. `vda`.
    pub id: String,
    /// The device's QOM path, e.g. `/machine/peripheral/vda/virtio-backend`.
    pub qom_path: String,
    /// The legacy BlockBackend name (`-drive id=`), empty for `-blockdev`.
    pub backend: String,
    pub removable: bool,
    /// Whether the device itself is read-only (its root node is).
    pub read_only: bool,
    /// The device was given without `id=`: QEMU names it by a QOM path that a
    /// restart may change, so snapctl cannot follow it (`id` is that path).
    pub anonymous: bool,
    /// Active image first, base last. Empty when no medium is inserted.
    pub chain: Vec<LiveLayer>,
}

impl LiveDisk {
    /// A disk as `query-block` shows it, with its chain (active image first);
    /// it is read-only when its active image is.
    fn new(
        id: String,
        qom_path: String,
        backend: String,
        removable: bool,
        anonymous: bool,
        chain: Vec<LiveLayer>,
    ) -> LiveDisk {
        LiveDisk {
            id,
            qom_path,
            backend,
            removable,
            read_only: chain.first().is_some_and(|l| l.read_only),
            anonymous,
            chain,
        }
    }

    /// The active image (the one the guest writes).
    pub fn active(&self) -> Option<&LiveLayer> {
        self.chain.first()
    }

    /// Snapshots can be taken of writable, non-removable disks with a medium.
    pub fn snapshottable(&self) -> bool {
        !self.removable && !self.read_only && !self.chain.is_empty()
    }
}

/// Every guest disk QEMU has, by qdev id.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LiveGraph {
    pub disks: BTreeMap<String, LiveDisk>,
    /// Every format node by name (also those in no device's chain, e.g. nodes
    /// added by an interrupted operation).
    pub nodes: BTreeMap<String, LiveLayer>,
    /// The names of all nodes, protocol and filter nodes included: names a new
    /// node must not take.
    pub node_names: std::collections::BTreeSet<String>,
}

impl LiveGraph {
    /// The format node that has `path` open, preferring one in a device chain.
    pub fn node_for(&self, path: &std::path::Path) -> Option<&LiveLayer> {
        self.disks
            .values()
            .flat_map(|d| d.chain.iter())
            .chain(self.nodes.values())
            .find(|l| l.filename == path)
    }
}

#[derive(Debug, Deserialize)]
struct BlockInfo {
    #[serde(default)]
    device: String,
    #[serde(default)]
    qdev: Option<String>,
    #[serde(default)]
    removable: bool,
    #[serde(default)]
    inserted: Option<Inserted>,
}

#[derive(Debug, Deserialize)]
struct Inserted {
    #[serde(rename = "node-name")]
    node_name: String,
}

#[derive(Debug, Deserialize)]
struct NodeInfo {
    #[serde(rename = "node-name")]
    node_name: String,
    drv: String,
    file: String,
    ro: bool,
    #[serde(default)]
    backing_file: Option<String>,
    image: ImageSummary,
    #[serde(rename = "dirty-bitmaps", default)]
    dirty_bitmaps: Vec<BitmapInfo>,
}

#[derive(Debug, Deserialize)]
struct ImageSummary {
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename", default)]
    backing_filename: Option<String>,
}

#[derive(Debug, Deserialize)]
struct DebugGraph {
    nodes: Vec<DebugNode>,
    edges: Vec<DebugEdge>,
}

#[derive(Debug, Deserialize)]
struct DebugNode {
    id: u64,
    /// `block-driver` for a node, `block-backend` or `block-job` otherwise.
    #[serde(rename = "type", default)]
    kind: String,
    name: String,
}

/// A `query-block` entry with its root node's own description (what
/// [`read_actives`] needs; `read` takes it from `query-named-block-nodes`).
#[derive(Debug, Deserialize)]
struct ActiveBlockInfo {
    #[serde(default)]
    device: String,
    #[serde(default)]
    qdev: Option<String>,
    #[serde(default)]
    removable: bool,
    #[serde(default)]
    inserted: Option<ActiveInserted>,
}

#[derive(Debug, Deserialize)]
struct ActiveInserted {
    #[serde(rename = "node-name")]
    node_name: String,
    drv: String,
    file: String,
    ro: bool,
    image: ImageSummary,
    #[serde(rename = "dirty-bitmaps", default)]
    dirty_bitmaps: Vec<BitmapInfo>,
}

#[derive(Debug, Deserialize)]
struct DebugEdge {
    parent: u64,
    child: u64,
    name: String,
}

/// Filter drivers sit above a format node and pass I/O to their `file` child
/// (or, for the nodes block jobs insert while they run, `commit_top` above a
/// commit's top and `mirror_top` above an active commit's, their `backing`
/// child). They hold no data: a disk's chain skips them, and its active image
/// is the first format node below.
fn is_filter(driver: &str) -> bool {
    matches!(
        driver,
        "throttle"
            | "copy-on-read"
            | "preallocate"
            | "compress"
            | "copy-before-write"
            | "snapshot-access"
            | "commit_top"
            | "mirror_top"
    )
}

/// Protocol drivers sit under a format node (`file` child); they are not layers.
fn is_protocol(driver: &str) -> bool {
    matches!(
        driver,
        "file"
            | "host_device"
            | "host_cdrom"
            | "nbd"
            | "iscsi"
            | "rbd"
            | "ssh"
            | "http"
            | "https"
            | "nvme"
            | "gluster"
            | "null-co"
            | "null-aio"
            | "blkdebug"
            | "blkverify"
    )
}

/// How a disk is named from a `query-block` `qdev` path: the qdev id
/// (`/machine/peripheral/vda/virtio-backend` → `vda`), or, for a device given
/// without `id=` (`/machine/peripheral-anon/device[1]/virtio-backend`), the
/// device's QOM path, `/machine/peripheral-anon/device[1]`, marked anonymous.
fn qdev_id(qdev: &str) -> Option<(String, bool)> {
    if let Some(rest) = qdev.strip_prefix("/machine/peripheral/") {
        return rest.split('/').next().map(|id| (id.to_owned(), false));
    }
    if let Some(rest) = qdev.strip_prefix("/machine/peripheral-anon/") {
        let device = rest.split('/').next()?;
        return Some((format!("/machine/peripheral-anon/{device}"), true));
    }
    if qdev.starts_with('/') {
        return None;
    }
    Some((qdev.to_owned(), false))
}

/// Reads the live graph. Three QMP round trips, issued concurrently.
pub async fn read(client: &Client) -> Result<LiveGraph> {
    let (blocks, nodes, edges) = tokio::join!(
        client.execute_raw("query-block", Value::Null),
        client.execute_raw("query-named-block-nodes", json!({ "flat": true })),
        client.execute_raw("x-debug-query-block-graph", Value::Null),
    );
    let blocks: Vec<BlockInfo> = decode("query-block", blocks?)?;
    let nodes: Vec<NodeInfo> = decode("query-named-block-nodes", nodes?)?;
    let backing_edges = match edges {
        Ok(v) => Some(child_edges(decode("x-debug-query-block-graph", v)?)),
        Err(e) if e.qmp_class() == Some("CommandNotFound") => None,
        Err(e) => return Err(e.into()),
    };
    Ok(assemble(blocks, nodes, backing_edges))
}

/// The live graph as far as taking a snapshot needs it, read without
/// `query-named-block-nodes {flat}` (which describes every node and is the
/// slowest of the three reads on a deep chain): `query-block` gives each
/// device and its active image (node, file, format, size, read-only), and
/// `x-debug-query-block-graph` the names of all nodes (which a new node must
/// not take) and the active images' `file` children. Each disk's `chain` then
/// holds its active image alone and `nodes` is empty: for callers that look
/// at nothing below the active images. Falls back to [`read`] when a
/// device's root is a filter (its active image is below it) or the debug
/// graph is missing.
pub async fn read_actives(client: &Client) -> Result<LiveGraph> {
    let (blocks, graph) = tokio::join!(
        client.execute_raw("query-block", Value::Null),
        client.execute_raw("x-debug-query-block-graph", Value::Null),
    );
    let graph: DebugGraph = match graph {
        Ok(v) => decode("x-debug-query-block-graph", v)?,
        Err(e) if e.qmp_class() == Some("CommandNotFound") => return read(client).await,
        Err(e) => return Err(e.into()),
    };
    let blocks: Vec<ActiveBlockInfo> = decode("query-block", blocks?)?;
    if blocks
        .iter()
        .filter_map(|b| b.inserted.as_ref())
        .any(|i| is_filter(&i.drv))
    {
        return read(client).await;
    }
    Ok(assemble_actives(blocks, graph))
}

fn assemble_actives(blocks: Vec<ActiveBlockInfo>, graph: DebugGraph) -> LiveGraph {
    let node_names = graph
        .nodes
        .iter()
        .filter(|n| n.kind == "block-driver")
        .map(|n| n.name.clone())
        .collect();
    let edges = child_edges(graph);
    let mut disks = BTreeMap::new();
    for block in blocks {
        let Some((id, anonymous)) = block.qdev.as_deref().and_then(qdev_id) else {
            continue;
        };
        // As in `read`: a protocol node attached directly is no layer.
        let chain: Vec<LiveLayer> = block
            .inserted
            .into_iter()
            .filter(|i| !is_protocol(&i.drv))
            .map(|i| LiveLayer {
                file_node: edges
                    .get(&(i.node_name.clone(), "file".to_owned()))
                    .cloned(),
                bitmaps: persistent(i.dirty_bitmaps),
                node: i.node_name,
                filename: PathBuf::from(i.file),
                format: i.drv,
                virtual_size: i.image.virtual_size,
                read_only: i.ro,
                backing_string: i.image.backing_filename,
            })
            .collect();
        let disk = LiveDisk::new(
            id,
            block.qdev.clone().unwrap_or_default(),
            block.device,
            block.removable,
            anonymous,
            chain,
        );
        disks.insert(disk.id.clone(), disk);
    }
    LiveGraph {
        disks,
        nodes: BTreeMap::new(),
        node_names,
    }
}

/// The live graph when QEMU runs (`client` is `Some`), `None` otherwise.
pub async fn read_if_running(client: Option<&Client>) -> Result<Option<LiveGraph>> {
    match client {
        Some(c) => read(c).await.map(Some),
        None => Ok(None),
    }
}

fn decode<T: serde::de::DeserializeOwned>(command: &str, value: Value) -> Result<T> {
    serde_json::from_value(value)
        .map_err(|e| Error::Graph(format!("unexpected {command} reply: {e}")))
}

/// The children that make up a chain: (node, edge name) → child node, for
/// `backing` edges and `file` edges (the latter matter below filters).
type Edges = HashMap<(String, String), String>;

fn child_edges(graph: DebugGraph) -> Edges {
    let names: HashMap<u64, &str> = graph
        .nodes
        .iter()
        .map(|n| (n.id, n.name.as_str()))
        .collect();
    graph
        .edges
        .iter()
        .filter(|e| e.name == "backing" || e.name == "file")
        .filter_map(|e| {
            Some((
                (names.get(&e.parent)?.to_string(), e.name.clone()),
                names.get(&e.child)?.to_string(),
            ))
        })
        .collect()
}

fn assemble(blocks: Vec<BlockInfo>, nodes: Vec<NodeInfo>, edges: Option<Edges>) -> LiveGraph {
    let node_names = nodes.iter().map(|n| n.node_name.clone()).collect();
    let filters: HashMap<String, String> = nodes
        .iter()
        .filter(|n| is_filter(&n.drv))
        .map(|n| (n.node_name.clone(), n.drv.clone()))
        .collect();
    let layers: BTreeMap<String, (LiveLayer, Option<String>)> = nodes
        .into_iter()
        .filter(|n| !is_protocol(&n.drv) && !is_filter(&n.drv))
        .map(|n| {
            let layer = LiveLayer {
                node: n.node_name.clone(),
                filename: PathBuf::from(&n.file),
                format: n.drv,
                virtual_size: n.image.virtual_size,
                read_only: n.ro,
                backing_string: n.image.backing_filename,
                file_node: edges
                    .as_ref()
                    .and_then(|e| e.get(&(n.node_name.clone(), "file".to_owned())).cloned()),
                bitmaps: persistent(n.dirty_bitmaps),
            };
            (n.node_name, (layer, n.backing_file))
        })
        .collect();
    let backing_of = |node: &str| -> Option<String> {
        match &edges {
            Some(edges) => edges.get(&(node.to_owned(), "backing".to_owned())).cloned(),
            None => {
                // Follow by file name: the node whose file QEMU resolved as our backing.
                let (_, backing_file) = layers.get(node)?;
                let wanted = backing_file.as_deref()?;
                layers
                    .values()
                    .find(|(l, _)| l.filename.as_os_str() == wanted)
                    .map(|(l, _)| l.node.clone())
            }
        }
    };

    let mut disks = BTreeMap::new();
    for block in blocks {
        let Some((id, anonymous)) = block.qdev.as_deref().and_then(qdev_id) else {
            continue;
        };
        let mut chain = Vec::new();
        let mut next = block.inserted.as_ref().map(|i| i.node_name.clone());
        // Step down through filters above the active image (their `file` child);
        // without the edge list there is no way to name that child, and the disk
        // is then shown without a chain (not snapshottable).
        let below_filters = |mut next: Option<String>| {
            while let Some(node) = next.clone().filter(|n| filters.contains_key(n)) {
                next = edges.as_ref().and_then(|e| {
                    e.get(&(node.clone(), "file".to_owned()))
                        .or_else(|| e.get(&(node, "backing".to_owned())))
                        .cloned()
                });
            }
            next
        };
        next = below_filters(next);
        while let Some(node) = next {
            let Some((layer, _)) = layers.get(&node) else {
                break;
            };
            chain.push(layer.clone());
            // A running commit puts its filter between a layer and its backing.
            next = below_filters(backing_of(&node));
            if chain.len() > 100_000 {
                break;
            }
        }
        let disk = LiveDisk::new(
            id,
            block.qdev.clone().unwrap_or_default(),
            block.device,
            block.removable,
            anonymous,
            chain,
        );
        disks.insert(disk.id.clone(), disk);
    }
    LiveGraph {
        node_names,
        disks,
        nodes: layers.into_iter().map(|(k, (l, _))| (k, l)).collect(),
    }
}

/// The device model and id properties needed to re-create a disk's `-device`,
/// read through QOM (`type`).
pub async fn device_driver(client: &Client, disk: &str) -> Result<String> {
    let v = client
        .execute_raw(
            "qom-get",
            json!({ "path": format!("/machine/peripheral/{disk}"), "property": "type" }),
        )
        .await?;
    v.as_str()
        .map(str::to_owned)
        .ok_or_else(|| Error::Graph(format!("qom-get type of {disk} returned {v}")))
}

/// What a disk was started with beyond its chain, read from QEMU at
/// registration so that `qemu-args` restarts it the same way.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiskSettings {
    /// The `-device` properties worth keeping, rendered as `-device` values
    /// (see [`DEVICE_PROPERTIES`]).
    pub device: BTreeMap<String, String>,
    /// The node options, as dotted `-blockdev` keys: those of the format node
    /// (`detect-zeroes`, `discard`, `cache.direct`, `cache.no-flush`) and, under
    /// `file.`, those its protocol node has beyond what it inherits.
    pub node_options: BTreeMap<String, Value>,
    /// The settings that could not be read, for the user (`aio`, say).
    pub unreadable: Vec<String>,
}

/// The `-device` properties snapctl keeps, when they differ from what a
/// device created without them has. Properties QEMU computes (PCI address,
/// bus, geometry, SCSI vendor/product strings, vectors) are left out: QEMU
/// computes them again from the rest of the command line.
///
/// | property | kept when |
/// |---|---|
/// | `serial`, `iothread` | not empty |
/// | `bootindex` | not -1 |
/// | `logical_block_size`, `physical_block_size` | neither 0 nor 512 |
/// | `discard_granularity` | not the default and not `physical_block_size` (what QEMU derives) |
/// | `num-queues` | not the default and not the number of vCPUs (what QEMU derives) |
/// | the others | not the type's default (`device-list-properties`) |
pub const DEVICE_PROPERTIES: &[&str] = &[
    "serial",
    "bootindex",
    "wwn",
    "port_wwn",
    "port_index",
    "logical_block_size",
    "physical_block_size",
    "min_io_size",
    "opt_io_size",
    "discard_granularity",
    "write-cache",
    "num-queues",
    "queue-size",
    "rerror",
    "werror",
    "share-rw",
    "discard",
    "write-zeroes",
    "max-discard-sectors",
    "max-write-zeroes-sectors",
    "iothread",
    "rotation_rate",
    "removable",
    "dpofua",
    "backend_defaults",
    "account-invalid",
    "account-failed",
];

/// What QEMU 10.0 does not report back about a node, said once at
/// registration.
const UNREPORTED: &str = "aio and driver-specific node options (qcow2 cache sizes, …)";

/// One node as `query-named-block-nodes` reports its options.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct NodeSettings {
    #[serde(rename = "node-name")]
    pub node_name: String,
    pub drv: String,
    pub file: String,
    #[serde(default = "detect_zeroes_off")]
    pub detect_zeroes: String,
    #[serde(default)]
    pub cache: NodeCache,
}

fn detect_zeroes_off() -> String {
    "off".to_owned()
}

/// `cache` of `query-named-block-nodes` (`writeback` is the BlockBackend's,
/// and reads `true` for a node without one).
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
pub struct NodeCache {
    #[serde(default)]
    pub direct: bool,
    #[serde(rename = "no-flush", default)]
    pub no_flush: bool,
    #[serde(default = "yes")]
    pub writeback: bool,
}

fn yes() -> bool {
    true
}

/// The node options of a disk from its active format node and that node's
/// protocol (`file`) node, with what could not be read.
///
/// QEMU reports `detect_zeroes` and `cache` per node, but not `discard` nor
/// `aio`. `discard` is known when `detect-zeroes` is `unmap`: QEMU refuses
/// that without `discard=unmap` on the same node. Options a protocol node
/// inherits from its format node (`cache.*`, `discard`) are written once,
/// on the format node.
pub fn node_options(
    format: &NodeSettings,
    file: Option<&NodeSettings>,
) -> (BTreeMap<String, Value>, Vec<String>) {
    let mut out = BTreeMap::new();
    let mut unreadable = Vec::new();
    if format.detect_zeroes != "off" {
        out.insert("detect-zeroes".to_owned(), json!(format.detect_zeroes));
    }
    let discard_known = format.detect_zeroes == "unmap";
    if discard_known {
        out.insert("discard".to_owned(), json!("unmap"));
    }
    if format.cache.direct {
        out.insert("cache.direct".to_owned(), json!(true));
    }
    if format.cache.no_flush {
        out.insert("cache.no-flush".to_owned(), json!(true));
    }
    if let Some(file) = file {
        if file.detect_zeroes != "off" {
            out.insert("file.detect-zeroes".to_owned(), json!(file.detect_zeroes));
            if file.detect_zeroes == "unmap" && !discard_known {
                out.insert("file.discard".to_owned(), json!("unmap"));
            }
        }
        if file.cache.direct != format.cache.direct {
            out.insert("file.cache.direct".to_owned(), json!(file.cache.direct));
        }
        if file.cache.no_flush != format.cache.no_flush {
            out.insert("file.cache.no-flush".to_owned(), json!(file.cache.no_flush));
        }
    }
    if !discard_known {
        unreadable.push("discard".to_owned());
    }
    unreadable.push(UNREPORTED.to_owned());
    (out, unreadable)
}

/// The `-device` properties to keep from a device's `current` values (the
/// [`DEVICE_PROPERTIES`] it has), given its type's `defaults` and the
/// number of vCPUs, rendered as `-device` values.
pub fn device_properties(
    current: &BTreeMap<String, Value>,
    defaults: &BTreeMap<String, Value>,
    vcpus: Option<u64>,
) -> BTreeMap<String, String> {
    let differs = |name: &str, value: &Value| defaults.get(name).is_some_and(|d| d != value);
    let mut out = BTreeMap::new();
    for (name, value) in current {
        let keep = match name.as_str() {
            "serial" | "iothread" => value.as_str().is_some_and(|s| !s.is_empty()),
            "bootindex" => value.as_i64().is_some_and(|i| i != -1),
            "logical_block_size" | "physical_block_size" => {
                value.as_u64().is_some_and(|n| n != 0 && n != 512)
            }
            "discard_granularity" => {
                differs(name, value) && current.get("physical_block_size") != Some(value)
            }
            "num-queues" => differs(name, value) && value.as_u64() != vcpus,
            _ => differs(name, value),
        };
        if keep {
            out.insert(name.clone(), device_value(name, value));
        }
    }
    out
}

/// A QOM value as a `-device` property value.
fn device_value(name: &str, value: &Value) -> String {
    match value {
        Value::String(s) if name == "iothread" => {
            s.strip_prefix("/objects/").unwrap_or(s).to_owned()
        }
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "on" } else { "off" }.to_owned(),
        Value::Number(n) if name.ends_with("wwn") => n
            .as_u64()
            .map_or_else(|| n.to_string(), |n| format!("0x{n:x}")),
        other => other.to_string(),
    }
}

/// Reads what each of `disks` was started with beyond its chain: node
/// options (`query-named-block-nodes`, the device's write cache from
/// `query-block`) and device properties (`qom-list`, `qom-get`,
/// `device-list-properties` for the defaults, `query-cpus-fast`). What QEMU
/// rejects or does not report is listed in [`DiskSettings::unreadable`]
/// rather than failing the registration.
pub async fn read_settings(
    client: &Client,
    disks: &[&LiveDisk],
) -> Result<BTreeMap<String, DiskSettings>> {
    let (nodes, blocks, cpus) = tokio::join!(
        client.execute_raw("query-named-block-nodes", json!({ "flat": true })),
        client.execute_raw("query-block", Value::Null),
        client.execute_raw("query-cpus-fast", Value::Null),
    );
    let nodes: Vec<NodeSettings> = decode("query-named-block-nodes", nodes?)?;
    let blocks = blocks?;
    let vcpus = best_effort(cpus)?.and_then(|c| c.as_array().map(|a| a.len() as u64));
    let mut out = BTreeMap::new();
    for disk in disks {
        let mut settings = DiskSettings::default();
        if let Some(active) = disk.active() {
            let format = nodes.iter().find(|n| n.node_name == active.node);
            let file = match &active.file_node {
                Some(name) => nodes.iter().find(|n| &n.node_name == name),
                None => nodes
                    .iter()
                    .find(|n| is_protocol(&n.drv) && Path::new(&n.file) == active.filename),
            };
            match format {
                Some(format) => {
                    (settings.node_options, settings.unreadable) = node_options(format, file);
                }
                None => settings
                    .unreadable
                    .push(format!("the options of node {}", active.node)),
            }
        }
        let path = format!("/machine/peripheral/{}", disk.id);
        let (device, writeback) =
            read_device(client, &path, vcpus, &blocks, &disk.qom_path).await?;
        settings.device = device.0;
        settings.unreadable.extend(device.1);
        // A `-drive` given `cache.writeback=off` (or `cache=writethrough`)
        // disabled the BlockBackend's write cache, which `-blockdev` has no
        // option for: the device's `write-cache` carries it.
        if writeback == Some(false) && !settings.device.contains_key("write-cache") {
            settings
                .device
                .insert("write-cache".to_owned(), "off".to_owned());
        }
        out.insert(disk.id.clone(), settings);
    }
    Ok(out)
}

/// One line naming, per group of disks, the settings QEMU did not report
/// (`None` when it reported all): what `qemu-args` cannot carry over.
pub fn unreadable_warning(settings: &BTreeMap<String, DiskSettings>) -> Option<String> {
    let mut groups: BTreeMap<&[String], Vec<&str>> = BTreeMap::new();
    for (id, s) in settings {
        if !s.unreadable.is_empty() {
            groups.entry(&s.unreadable).or_default().push(id);
        }
    }
    if groups.is_empty() {
        return None;
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|(what, disks)| format!("{}: {}", disks.join(", "), what.join(", ")))
        .collect();
    Some(format!(
        "QEMU does not report these settings, so qemu-args leaves them to QEMU's defaults; \
         add them by hand if QEMU was started with others: {}",
        parts.join("; ")
    ))
}

type DeviceRead = (BTreeMap<String, String>, Vec<String>);

async fn read_device(
    client: &Client,
    path: &str,
    vcpus: Option<u64>,
    blocks: &Value,
    qdev: &str,
) -> Result<(DeviceRead, Option<bool>)> {
    let mut unreadable = Vec::new();
    let writeback = blocks.as_array().and_then(|blocks| {
        blocks
            .iter()
            .find(|b| b["qdev"].as_str() == Some(qdev))
            .and_then(|b| b["inserted"]["cache"]["writeback"].as_bool())
    });
    let (list, driver) = tokio::join!(
        client.execute_raw("qom-list", json!({ "path": path })),
        client.execute_raw("qom-get", json!({ "path": path, "property": "type" })),
    );
    let Some(list) = best_effort(list)? else {
        unreadable.push(format!("the properties of {path} (qom-list failed)"));
        return Ok(((BTreeMap::new(), unreadable), writeback));
    };
    let present: Vec<&str> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| p["name"].as_str())
        .filter(|n| DEVICE_PROPERTIES.contains(n))
        .collect();
    let mut defaults = BTreeMap::new();
    match best_effort(driver)?.as_ref().and_then(Value::as_str) {
        Some(driver) => {
            let props = client
                .execute_raw("device-list-properties", json!({ "typename": driver }))
                .await;
            for p in best_effort(props)?
                .iter()
                .filter_map(Value::as_array)
                .flatten()
            {
                if let (Some(name), Some(d)) = (p["name"].as_str(), p.get("default-value")) {
                    defaults.insert(name.to_owned(), d.clone());
                }
            }
        }
        None => unreadable.push(format!("the type of {path}")),
    }
    let values = futures_util::future::join_all(
        present
            .iter()
            .map(|name| client.execute_raw("qom-get", json!({ "path": path, "property": name }))),
    )
    .await;
    let mut current = BTreeMap::new();
    for (name, value) in present.iter().zip(values) {
        match best_effort(value)? {
            Some(v) => {
                current.insert((*name).to_owned(), v);
            }
            None => unreadable.push(format!("device property {name}")),
        }
    }
    Ok((
        (device_properties(&current, &defaults, vcpus), unreadable),
        writeback,
    ))
}

/// A command's answer, `None` when QEMU refused it (an error for the
/// connection's failures).
fn best_effort(answer: qmp_client::Result<Value>) -> Result<Option<Value>> {
    match answer {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.qmp_class().is_some() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, drv: &str, file: &str, backing: Option<&str>) -> NodeInfo {
        NodeInfo {
            node_name: name.into(),
            drv: drv.into(),
            file: file.into(),
            ro: false,
            backing_file: backing.map(Into::into),
            image: ImageSummary {
                virtual_size: 1 << 20,
                backing_filename: backing.map(Into::into),
            },
            dirty_bitmaps: Vec::new(),
        }
    }

    fn blocks() -> Vec<BlockInfo> {
        vec![
            BlockInfo {
                device: String::new(),
                qdev: Some("/machine/peripheral/vda/virtio-backend".into()),
                removable: false,
                inserted: Some(Inserted {
                    node_name: "top".into(),
                }),
            },
            BlockInfo {
                device: "cd0".into(),
                qdev: Some("cd0dev".into()),
                removable: true,
                inserted: None,
            },
            BlockInfo {
                device: String::new(),
                qdev: Some("/machine/peripheral-anon/device[0]/virtio-backend".into()),
                removable: false,
                inserted: Some(Inserted {
                    node_name: "x".into(),
                }),
            },
        ]
    }

    fn nodes() -> Vec<NodeInfo> {
        vec![
            node("top", "qcow2", "/i/top.qcow2", Some("/i/base.qcow2")),
            node("#block1", "file", "/i/top.qcow2", None),
            node("base", "qcow2", "/i/base.qcow2", None),
            // The same base opened a second time, read-only, elsewhere.
            node("other", "qcow2", "/i/base.qcow2", None),
        ]
    }

    #[test]
    fn chains_by_edges_and_names_devices_without_id_by_path() {
        let edges = HashMap::from([(
            ("top".to_string(), "backing".to_string()),
            "base".to_string(),
        )]);
        let g = assemble(blocks(), nodes(), Some(edges));
        let vda = &g.disks["vda"];
        let names: Vec<_> = vda.chain.iter().map(|l| l.node.as_str()).collect();
        assert_eq!(names, ["top", "base"]);
        assert!(vda.snapshottable());
        assert!(!g.disks["cd0dev"].snapshottable());
        assert_eq!(g.disks.len(), 3);
        let anon = &g.disks["/machine/peripheral-anon/device[0]"];
        assert!(anon.anonymous && !vda.anonymous);
        assert!(
            !g.nodes.contains_key("#block1"),
            "protocol nodes are not layers"
        );
    }

    #[test]
    fn running_commits_filter_nodes_are_not_layers() {
        // An active commit's mirror_top above the device's image, and an
        // intermediate commit's commit_top between a layer and its backing.
        let mut blocks = blocks();
        blocks[0].inserted = Some(Inserted {
            node_name: "mt".into(),
        });
        let mut nodes = nodes();
        nodes.push(node(
            "mt",
            "mirror_top",
            "/i/top.qcow2",
            Some("/i/base.qcow2"),
        ));
        nodes.push(node("ct", "commit_top", "/i/base.qcow2", None));
        let edge = |p: &str, c: &str| (((p.to_string()), "backing".to_string()), c.to_string());
        let edges = HashMap::from([edge("mt", "top"), edge("top", "ct"), edge("ct", "base")]);
        let g = assemble(blocks, nodes, Some(edges));
        let names: Vec<_> = g.disks["vda"]
            .chain
            .iter()
            .map(|l| l.node.as_str())
            .collect();
        assert_eq!(names, ["top", "base"]);
        assert!(!g.nodes.contains_key("mt") && !g.nodes.contains_key("ct"));
    }

    #[test]
    fn falls_back_to_file_names_without_the_debug_graph() {
        let g = assemble(blocks(), nodes(), None);
        let chain: Vec<_> = g.disks["vda"]
            .chain
            .iter()
            .map(|l| l.filename.clone())
            .collect();
        assert_eq!(
            chain,
            [
                PathBuf::from("/i/top.qcow2"),
                PathBuf::from("/i/base.qcow2")
            ]
        );
    }

    fn settings(name: &str, drv: &str, detect_zeroes: &str, direct: bool) -> NodeSettings {
        NodeSettings {
            node_name: name.into(),
            drv: drv.into(),
            file: "/i/top.qcow2".into(),
            detect_zeroes: detect_zeroes.into(),
            cache: NodeCache {
                direct,
                no_flush: false,
                writeback: true,
            },
        }
    }

    #[test]
    fn node_options_keep_what_qemu_reports_and_name_what_it_does_not() {
        // discard=unmap,detect-zeroes=unmap,cache.direct=on: the file node
        // inherits the cache mode, so it is written once.
        let (options, unreadable) = node_options(
            &settings("top", "qcow2", "unmap", true),
            Some(&settings("#b1", "file", "off", true)),
        );
        assert_eq!(
            options,
            BTreeMap::from([
                ("cache.direct".to_owned(), json!(true)),
                ("detect-zeroes".to_owned(), json!("unmap")),
                ("discard".to_owned(), json!("unmap")),
            ])
        );
        assert!(!unreadable.iter().any(|u| u == "discard"), "{unreadable:?}");
        assert!(
            unreadable.iter().any(|u| u.contains("aio")),
            "{unreadable:?}"
        );

        // Defaults: nothing kept, discard unknown.
        let (options, unreadable) = node_options(
            &settings("top", "qcow2", "off", false),
            Some(&settings("#b1", "file", "off", false)),
        );
        assert!(options.is_empty(), "{options:?}");
        assert_eq!(unreadable[0], "discard");

        // Options given on the file child only.
        let (options, _) = node_options(
            &settings("top", "qcow2", "off", false),
            Some(&settings("#b1", "file", "unmap", true)),
        );
        assert_eq!(
            options,
            BTreeMap::from([
                ("file.cache.direct".to_owned(), json!(true)),
                ("file.detect-zeroes".to_owned(), json!("unmap")),
                ("file.discard".to_owned(), json!("unmap")),
            ])
        );
    }

    #[test]
    fn device_properties_keep_what_differs_from_a_device_created_without_them() {
        let current: BTreeMap<String, Value> = [
            ("serial", json!("SNAP123")),
            ("bootindex", json!(2)),
            ("logical_block_size", json!(512)),
            ("physical_block_size", json!(4096)),
            ("discard_granularity", json!(4096)),
            ("num-queues", json!(2)),
            ("queue-size", json!(256)),
            ("write-cache", json!("off")),
            ("share-rw", json!(false)),
            ("wwn", json!(0x5000c50015ea71ac_u64)),
            ("iothread", json!("/objects/io0")),
            ("werror", json!("enospc")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let defaults: BTreeMap<String, Value> = [
            ("discard_granularity", json!(4294967295_u64)),
            ("num-queues", json!(65535)),
            ("queue-size", json!(256)),
            ("write-cache", json!("auto")),
            ("share-rw", json!(false)),
            ("wwn", json!(0)),
            ("werror", json!("enospc")),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let kept = device_properties(&current, &defaults, Some(2));
        let expected: BTreeMap<String, String> = [
            ("bootindex", "2"),
            ("iothread", "io0"),
            ("physical_block_size", "4096"),
            ("serial", "SNAP123"),
            ("write-cache", "off"),
            ("wwn", "0x5000c50015ea71ac"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(kept, expected);
        // With one vCPU, two queues were asked for.
        assert_eq!(
            device_properties(&current, &defaults, Some(1)).get("num-queues"),
            Some(&"2".to_owned())
        );
        // A device with nothing set keeps nothing.
        let plain: BTreeMap<String, Value> = [
            ("serial", json!("")),
            ("bootindex", json!(-1)),
            ("logical_block_size", json!(512)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        assert!(device_properties(&plain, &defaults, Some(1)).is_empty());
    }

    #[test]
    fn one_warning_line_groups_disks() {
        let s = |u: &[&str]| DiskSettings {
            unreadable: u.iter().map(|s| s.to_string()).collect(),
            ..DiskSettings::default()
        };
        let all = BTreeMap::from([
            ("vda".to_owned(), s(&["discard", "aio"])),
            ("vdb".to_owned(), s(&["discard", "aio"])),
            ("vdc".to_owned(), s(&["aio"])),
        ]);
        let line = unreadable_warning(&all).unwrap();
        assert!(!line.contains('\n'));
        assert!(line.ends_with("vdc: aio; vda, vdb: discard, aio"), "{line}");
        assert_eq!(unreadable_warning(&BTreeMap::new()), None);
    }

    /// The active images and node names `read_actives` assembles from
    /// `query-block` and the debug graph are those `read` assembles.
    #[test]
    fn actives_agree_with_the_full_read() {
        let active_blocks: Vec<ActiveBlockInfo> = serde_json::from_value(json!([
            {"device": "", "qdev": "/machine/peripheral/vda/virtio-backend", "removable": false,
             "inserted": {"node-name": "top", "drv": "qcow2", "file": "/i/top.qcow2", "ro": false,
                          "image": {"virtual-size": 1048576, "backing-filename": "/i/base.qcow2",
                                    "backing-image": {"virtual-size": 1048576}}}},
            {"device": "cd0", "qdev": "cd0dev", "removable": true},
            {"device": "", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
             "removable": false,
             "inserted": {"node-name": "x", "drv": "file", "file": "/i/x.raw", "ro": false,
                          "image": {"virtual-size": 1048576}}},
        ]))
        .unwrap();
        let debug: DebugGraph = serde_json::from_value(json!({
            "nodes": [
                {"id": 1, "type": "block-backend", "name": "vda"},
                {"id": 2, "type": "block-driver", "name": "top"},
                {"id": 3, "type": "block-driver", "name": "#block1"},
                {"id": 4, "type": "block-driver", "name": "base"},
                {"id": 5, "type": "block-driver", "name": "other"},
            ],
            "edges": [
                {"parent": 1, "child": 2, "name": "root", "perm": [], "shared-perm": []},
                {"parent": 2, "child": 3, "name": "file", "perm": [], "shared-perm": []},
                {"parent": 2, "child": 4, "name": "backing", "perm": [], "shared-perm": []},
            ],
        }))
        .unwrap();
        let edges = child_edges(serde_json::from_value(json!({
            "nodes": [{"id": 2, "name": "top"}, {"id": 3, "name": "#block1"}, {"id": 4, "name": "base"}],
            "edges": [{"parent": 2, "child": 3, "name": "file"}, {"parent": 2, "child": 4, "name": "backing"}],
        }))
        .unwrap());
        let mut nodes = nodes();
        nodes.push(node("x", "file", "/i/x.raw", None));
        let full = assemble(blocks(), nodes, Some(edges));
        let actives = assemble_actives(active_blocks, debug);
        let mut names = full.node_names.clone();
        names.remove("x");
        assert_eq!(actives.node_names, names);
        assert_eq!(actives.disks.len(), full.disks.len());
        for (id, disk) in &full.disks {
            let a = &actives.disks[id];
            assert_eq!(a.active(), disk.active(), "{id}");
            assert_eq!(
                (
                    a.snapshottable(),
                    a.anonymous,
                    a.removable,
                    a.read_only,
                    &a.qom_path,
                    &a.backend
                ),
                (
                    disk.snapshottable(),
                    disk.anonymous,
                    disk.removable,
                    disk.read_only,
                    &disk.qom_path,
                    &disk.backend
                ),
                "{id}"
            );
        }
        assert_eq!(
            actives.disks["vda"].active().unwrap().file_node.as_deref(),
            Some("#block1")
        );
    }

    #[test]
    fn qdev_ids() {
        assert_eq!(
            qdev_id("/machine/peripheral/vda/virtio-backend"),
            Some(("vda".into(), false))
        );
        assert_eq!(qdev_id("cd0dev"), Some(("cd0dev".into(), false)));
        assert_eq!(
            qdev_id("/machine/peripheral-anon/device[1]/virtio-backend"),
            Some(("/machine/peripheral-anon/device[1]".into(), true))
        );
        assert_eq!(qdev_id("/machine/unattached/device[3]"), None);
    }
}
