//! QEMU's live block graph, reduced to what snapshots need: per guest disk,
//! the chain of image layers from the active image down to the base.
//!
//! Sources: `query-block` describes each device's chain layer by layer and
//! `x-debug-query-block-graph` names every node and edge ([`read`]); when
//! that is not enough, `query-named-block-nodes` describes every node
//! (`read_full`).
//!
//! Disks opened with `-blockdev` per layer and with legacy `-drive` (automatic
//! `#blockNNN` node names) read the same way.

use std::collections::{BTreeMap, HashMap, HashSet};
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
    /// The disk of a `query-block` entry (`qdev`, `device`, `removable`)
    /// with its chain; `None` for a backend no device is attached to.
    fn of_block(
        qdev: Option<String>,
        device: String,
        removable: bool,
        chain: Vec<LiveLayer>,
    ) -> Option<LiveDisk> {
        let (id, anonymous) = qdev.as_deref().and_then(qdev_id)?;
        Some(LiveDisk::new(
            id,
            qdev.unwrap_or_default(),
            device,
            removable,
            anonymous,
            chain,
        ))
    }

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

/// A `query-block` entry with its root node's own description and, under
/// `image`, the whole chain below it (what [`read`] pairs with the debug
/// graph's node names).
#[derive(Debug, Deserialize)]
struct ChainBlockInfo {
    #[serde(default)]
    device: String,
    #[serde(default)]
    qdev: Option<String>,
    #[serde(default)]
    removable: bool,
    #[serde(default)]
    inserted: Option<ChainInserted>,
}

#[derive(Debug, Deserialize)]
struct ChainInserted {
    #[serde(rename = "node-name")]
    node_name: String,
    ro: bool,
    image: ImageInfo,
    #[serde(rename = "dirty-bitmaps", default)]
    dirty_bitmaps: Vec<BitmapInfo>,
}

/// One layer of a device's chain as `query-block` describes it, the next
/// one down (its backing or filtered child) nested.
#[derive(Debug, Deserialize)]
struct ImageInfo {
    filename: String,
    format: String,
    #[serde(rename = "virtual-size")]
    virtual_size: u64,
    #[serde(rename = "backing-filename", default)]
    backing_filename: Option<String>,
    #[serde(rename = "backing-image", default)]
    backing_image: Option<Box<ImageInfo>>,
    #[serde(rename = "format-specific", default)]
    format_specific: Option<FormatSpecific>,
}

/// The bitmaps a qcow2 header stores (all persistent).
#[derive(Debug, Deserialize)]
struct FormatSpecific {
    #[serde(default)]
    data: FormatData,
}

#[derive(Debug, Default, Deserialize)]
struct FormatData {
    #[serde(default)]
    bitmaps: Vec<Bitmap>,
}

#[derive(Debug, Deserialize)]
struct DebugEdge {
    parent: u64,
    child: u64,
    name: String,
    /// The permissions the parent holds on the child (`write` on a format
    /// node's `file` child: the node is writable).
    #[serde(default)]
    perm: Vec<String>,
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

/// Reads the live graph in two QMP calls, issued concurrently:
/// `query-block` describes each device's chain (file, format, size, header
/// backing string, layer by layer) and `x-debug-query-block-graph` names the
/// nodes of that chain and all others. Both walk a chain the same way, from
/// the device's root node through each layer's backing (or, for a filter,
/// filtered) child, so the two are paired layer by layer.
///
/// This leaves out `query-named-block-nodes`, which describes every node and
/// costs the most on a deep chain (QEMU refreshes every node's file name,
/// and each refresh walks the chain below it). It is read too, as
/// `read_full` does, when the pairing cannot be trusted or is not enough:
/// a block job runs (its implicit filters hide from `query-block`), a node
/// stands in no device's chain (an image left open that only the full read
/// names), or the two walks disagree.
pub async fn read(client: &Client) -> Result<LiveGraph> {
    let (blocks, graph) = tokio::join!(
        client.execute_raw("query-block", Value::Null),
        client.execute_raw("x-debug-query-block-graph", Value::Null),
    );
    let graph: DebugGraph = match graph {
        Ok(v) => decode("x-debug-query-block-graph", v)?,
        Err(e) if e.qmp_class() == Some("CommandNotFound") => return read_full(client).await,
        Err(e) => return Err(e.into()),
    };
    let blocks: Vec<ChainBlockInfo> = decode("query-block", blocks?)?;
    match pair_chains(blocks, graph) {
        Some(live) => Ok(live),
        None => read_full(client).await,
    }
}

/// The debug graph indexed for walking: each node's edges to its children
/// and from its parents, and the devices' root nodes.
struct DebugIndex<'a> {
    graph: &'a DebugGraph,
    children: HashMap<&'a str, Vec<&'a DebugEdge>>,
    parents: HashMap<&'a str, Vec<&'a DebugEdge>>,
    names: HashMap<u64, &'a str>,
}

impl<'a> DebugIndex<'a> {
    fn new(graph: &'a DebugGraph) -> DebugIndex<'a> {
        let names: HashMap<u64, &str> = graph
            .nodes
            .iter()
            .map(|n| (n.id, n.name.as_str()))
            .collect();
        let mut children: HashMap<&str, Vec<&DebugEdge>> = HashMap::new();
        let mut parents: HashMap<&str, Vec<&DebugEdge>> = HashMap::new();
        for e in &graph.edges {
            if let (Some(parent), Some(child)) = (names.get(&e.parent), names.get(&e.child)) {
                children.entry(parent).or_default().push(e);
                parents.entry(child).or_default().push(e);
            }
        }
        DebugIndex {
            graph,
            children,
            parents,
            names,
        }
    }

    /// Whether a block job runs (its nodes make any name-only walk unsure).
    fn has_jobs(&self) -> bool {
        self.graph.nodes.iter().any(|n| n.kind == "block-job")
    }

    /// The names of all format, protocol and filter nodes.
    fn block_drivers(&self) -> impl Iterator<Item = &'a str> + 'a {
        self.graph
            .nodes
            .iter()
            .filter(|n| n.kind == "block-driver")
            .map(|n| n.name.as_str())
    }

    /// `node`'s child by the edge named `edge`, with the permissions held on it.
    fn child(&self, node: &str, edge: &str) -> Option<(&'a str, &'a [String])> {
        let e = self.children.get(node)?.iter().find(|e| e.name == edge)?;
        Some((self.names.get(&e.child)?, &e.perm))
    }

    /// `node`'s parent by the edge named `edge`.
    fn parent(&self, node: &str, edge: &str) -> Option<&'a str> {
        let e = self.parents.get(node)?.iter().find(|e| e.name == edge)?;
        self.names.get(&e.parent).copied()
    }

    /// Each block backend's root node, with the backend's name (a device's
    /// QOM path, or a `-drive` id).
    fn device_roots(&self) -> HashMap<&'a str, &'a str> {
        let kind: HashMap<u64, &str> = self
            .graph
            .nodes
            .iter()
            .map(|n| (n.id, n.kind.as_str()))
            .collect();
        self.graph
            .edges
            .iter()
            .filter(|e| e.name == "root" && kind.get(&e.parent) == Some(&"block-backend"))
            .filter_map(|e| Some((*self.names.get(&e.child)?, *self.names.get(&e.parent)?)))
            .collect()
    }

    /// Whether some node stands below none of `roots`: only the full read
    /// says what file such a node (one left open, an export's) has open.
    fn has_strays<'r>(&self, roots: impl IntoIterator<Item = &'r str>) -> bool {
        let mut reached: HashSet<&str> = HashSet::new();
        let mut todo: Vec<&str> = roots.into_iter().collect();
        while let Some(node) = todo.pop() {
            if reached.insert(node) {
                todo.extend(
                    self.children
                        .get(node)
                        .into_iter()
                        .flatten()
                        .filter_map(|e| self.names.get(&e.child).copied()),
                );
            }
        }
        self.block_drivers().any(|n| !reached.contains(n))
    }
}

/// Pairs each device's `query-block` chain with the debug graph's nodes;
/// `None` when that cannot be trusted (see [`read`]).
fn pair_chains(blocks: Vec<ChainBlockInfo>, graph: DebugGraph) -> Option<LiveGraph> {
    let index = DebugIndex::new(&graph);
    if index.has_jobs() {
        return None;
    }
    let mut disks = BTreeMap::new();
    let mut nodes = BTreeMap::new();
    let mut roots = Vec::new();
    for block in blocks {
        let mut chain = Vec::new();
        if let Some(inserted) = block.inserted {
            roots.push(inserted.node_name.clone());
            let mut node = inserted.node_name;
            let mut image = Some(Box::new(inserted.image));
            let mut active_bitmaps = Some(inserted.dirty_bitmaps);
            let root_ro = inserted.ro;
            while let Some(info) = image {
                let info = *info;
                let filter = is_filter(&info.format);
                let below = if filter {
                    index
                        .child(&node, "file")
                        .or_else(|| index.child(&node, "backing"))
                } else {
                    index.child(&node, "backing")
                };
                let below = below.map(|(child, _)| child.to_owned());
                if info.backing_image.is_some() != below.is_some() {
                    return None;
                }
                if !filter && !is_protocol(&info.format) {
                    let file = index.child(&node, "file");
                    let read_only = match chain.is_empty() {
                        true => root_ro,
                        false => !file.is_some_and(|(_, perm)| perm.iter().any(|p| p == "write")),
                    };
                    let bitmaps = match active_bitmaps.take().filter(|_| chain.is_empty()) {
                        Some(live) => persistent(live),
                        None => info
                            .format_specific
                            .map(|f| f.data.bitmaps)
                            .unwrap_or_default(),
                    };
                    let layer = LiveLayer {
                        node: node.clone(),
                        filename: PathBuf::from(info.filename),
                        format: info.format,
                        virtual_size: info.virtual_size,
                        read_only,
                        backing_string: info.backing_filename,
                        file_node: file.map(|(child, _)| child.to_owned()),
                        bitmaps,
                    };
                    nodes.insert(layer.node.clone(), layer.clone());
                    chain.push(layer);
                }
                active_bitmaps = None;
                image = info.backing_image;
                match below {
                    Some(next) => node = next,
                    None => break,
                }
            }
        }
        if let Some(disk) = LiveDisk::of_block(block.qdev, block.device, block.removable, chain) {
            disks.insert(disk.id.clone(), disk);
        }
    }
    if index.has_strays(roots.iter().map(String::as_str)) {
        return None;
    }
    Some(LiveGraph {
        disks,
        nodes,
        node_names: index.block_drivers().map(str::to_owned).collect(),
    })
}

/// Reads the live graph from every node's own description: `query-block`
/// says which device has which root node, `query-named-block-nodes {flat:
/// true}` describes every node (file name, format, size, read-only, header
/// backing string) and `x-debug-query-block-graph` gives the exact `backing`
/// edges. That last command is marked unstable; without it the chain is
/// followed by file name, which is exact unless the same image is opened
/// twice. Three QMP calls, issued concurrently; the costliest read there is.
async fn read_full(client: &Client) -> Result<LiveGraph> {
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

/// The nodes whose files snapctl knows without asking QEMU: those of the
/// graph an operation was planned on and those it adds itself. After the
/// operation, [`open_files`] names QEMU's open files from the node names
/// alone while every node is one of these.
#[derive(Debug, Default)]
pub struct KnownNodes {
    /// Format nodes and their image files.
    images: HashMap<String, PathBuf>,
    /// Protocol nodes under them.
    protocols: HashSet<String>,
}

impl KnownNodes {
    /// The layers of `live` (a graph read by [`read`] or `read_full`).
    pub fn of(live: &LiveGraph) -> KnownNodes {
        let layers = live
            .disks
            .values()
            .flat_map(|d| &d.chain)
            .chain(live.nodes.values());
        let mut known = KnownNodes::default();
        for l in layers {
            known.images.insert(l.node.clone(), l.filename.clone());
            known.protocols.extend(l.file_node.clone());
        }
        known
    }

    /// Adds the nodes a `blockdev-add` with these arguments opens: the
    /// format node (its `file` child's file name) and the protocol node.
    pub fn add(&mut self, blockdev: &Value) {
        let (Some(node), Some(file)) = (blockdev["node-name"].as_str(), blockdev.get("file"))
        else {
            return;
        };
        if let Some(filename) = file["filename"].as_str() {
            self.images.insert(node.to_owned(), PathBuf::from(filename));
        }
        if let Some(protocol) = file["node-name"].as_str() {
            self.protocols.insert(protocol.to_owned());
        }
    }
}

/// QEMU's nodes and edges, names only (`x-debug-query-block-graph`): cheap
/// at any depth, read once after an operation for both the check before a
/// file removal and the [`NodeMap`].
#[derive(Debug)]
pub struct Layout(DebugGraph);

/// QEMU's [`Layout`]; `None` when this QEMU lacks the (unstable) command.
pub async fn read_layout(client: &Client) -> Result<Option<Layout>> {
    match client
        .execute_raw("x-debug-query-block-graph", Value::Null)
        .await
    {
        Ok(v) => Ok(Some(Layout(decode("x-debug-query-block-graph", v)?))),
        Err(e) if e.qmp_class() == Some("CommandNotFound") => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The image files QEMU has open: from `layout`'s node names alone when
/// every node in it is `known` or the `file` child of a known node;
/// otherwise from a [`read`].
pub async fn open_files(
    client: &Client,
    known: &KnownNodes,
    layout: Option<&Layout>,
) -> Result<HashSet<PathBuf>> {
    if let Some(files) = layout.and_then(|l| files_of_known(&l.0, known)) {
        return Ok(files);
    }
    let live = read(client).await?;
    Ok(KnownNodes::of(&live).images.into_values().collect())
}

/// The files of `graph`'s nodes, `None` when one of them is not known.
fn files_of_known(graph: &DebugGraph, known: &KnownNodes) -> Option<HashSet<PathBuf>> {
    let index = DebugIndex::new(graph);
    let mut files = HashSet::new();
    for node in index.block_drivers() {
        if let Some(file) = known.images.get(node) {
            files.insert(file.clone());
            continue;
        }
        let protocol = known.protocols.contains(node)
            || index
                .parent(node, "file")
                .is_some_and(|p| known.images.contains_key(p));
        if !protocol {
            return None;
        }
    }
    Some(files)
}

/// The QEMU process a [`NodeMap`] is valid in: node names name nodes of one
/// process only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct QemuProcess {
    pub pid: u32,
    /// Its start time (clock ticks after boot, `/proc/PID/stat`), which a
    /// later process given the same pid does not share.
    pub started: u64,
}

impl QemuProcess {
    /// The process at the other end of `client`'s socket; `None` when the
    /// kernel does not say (TCP, another PID namespace) or it is not a QEMU
    /// (another snapctl relaying the monitor).
    pub fn of(client: &Client) -> Option<QemuProcess> {
        let pid = client.peer_pid()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // "PID (COMM) STATE PPID ...": COMM may hold spaces and parentheses.
        let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
        if !comm.starts_with("qemu") {
            return None;
        }
        // Field 22 (starttime); `rest` starts at field 3.
        let started = rest.split_whitespace().nth(19)?.parse().ok()?;
        Some(QemuProcess { pid, started })
    }
}

/// Which file each node of the disks' chains has open in one QEMU process,
/// as snapctl left them after its last change there. With it, a merge finds
/// its nodes from the node names alone (one `x-debug-query-block-graph`,
/// cheap at any depth) instead of QEMU's description of every layer, which
/// costs QEMU time growing with the square of the chain's depth.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct NodeMap {
    pub qemu: QemuProcess,
    /// Format node name → image file.
    pub nodes: BTreeMap<String, PathBuf>,
}

/// What a layer's record entry says about it: format, size, header backing string.
pub type LayerFacts<'a> = &'a (dyn Fn(&Path) -> Option<(String, u64, Option<String>)> + Sync);

/// The graph of `disks` (disk id → its active image) from node names alone,
/// each node's file taken from `map`, format and size from `layer`. `None`
/// when that cannot be trusted: `map` is for another QEMU process, a node of
/// a chain is not in it, a node stands outside every device (an image left
/// open), or a block job runs. Layers carry no bitmaps: not for planners
/// that carry them (create, revert).
pub async fn read_mapped(
    client: &Client,
    map: &NodeMap,
    disks: &BTreeMap<String, PathBuf>,
    layer: LayerFacts<'_>,
) -> Result<Option<LiveGraph>> {
    if QemuProcess::of(client) != Some(map.qemu) {
        return Ok(None);
    }
    let graph = match client
        .execute_raw("x-debug-query-block-graph", Value::Null)
        .await
    {
        Ok(v) => decode::<DebugGraph>("x-debug-query-block-graph", v)?,
        Err(e) if e.qmp_class() == Some("CommandNotFound") => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    Ok(mapped_chains(&graph, map, disks, layer))
}

fn mapped_chains(
    graph: &DebugGraph,
    map: &NodeMap,
    disks: &BTreeMap<String, PathBuf>,
    layer: LayerFacts<'_>,
) -> Option<LiveGraph> {
    let index = DebugIndex::new(graph);
    if index.has_jobs() {
        return None;
    }
    let roots = index.device_roots();
    let mut live = LiveGraph::default();
    for (id, active) in disks {
        let (root, backend) = map
            .nodes
            .iter()
            .filter(|(_, file)| *file == active)
            .find_map(|(node, _)| roots.get_key_value(node.as_str()))?;
        let mut chain = Vec::new();
        let mut node = Some(root.to_string());
        while let Some(name) = node {
            let file = map.nodes.get(&name)?;
            let (format, virtual_size, backing_string) = layer(file)?;
            let file_edge = index.child(&name, "file");
            chain.push(LiveLayer {
                node: name.clone(),
                filename: file.clone(),
                format,
                virtual_size,
                read_only: !file_edge.is_some_and(|(_, perm)| perm.iter().any(|p| p == "write")),
                backing_string,
                file_node: file_edge.map(|(child, _)| child.to_owned()),
                bitmaps: Vec::new(),
            });
            node = index
                .child(&name, "backing")
                .map(|(child, _)| child.to_owned());
            if chain.len() > map.nodes.len() {
                return None;
            }
        }
        let qom_path = if backend.starts_with('/') {
            backend.to_string()
        } else {
            String::new()
        };
        let backend = if qom_path.is_empty() {
            backend.to_string()
        } else {
            String::new()
        };
        for l in &chain {
            live.nodes.insert(l.node.clone(), l.clone());
        }
        live.disks.insert(
            id.clone(),
            LiveDisk::new(id.clone(), qom_path, backend, false, false, chain),
        );
    }
    if index.has_strays(roots.keys().copied()) {
        return None;
    }
    live.node_names = index.block_drivers().map(str::to_owned).collect();
    Some(live)
}

/// The [`NodeMap`] after an operation: the nodes of every device's chain in
/// `layout` (QEMU's graph now), each with its file as `known` says. `None`
/// when QEMU's process is not known or a chain node is not.
pub fn map_nodes(
    qemu: Option<QemuProcess>,
    layout: &Layout,
    known: &KnownNodes,
) -> Option<NodeMap> {
    let qemu = qemu?;
    chain_files(&layout.0, known).map(|nodes| NodeMap { qemu, nodes })
}

/// Each device chain's node with its file; `None` when a node below a known
/// root is not known.
fn chain_files(graph: &DebugGraph, known: &KnownNodes) -> Option<BTreeMap<String, PathBuf>> {
    let index = DebugIndex::new(graph);
    let mut nodes = BTreeMap::new();
    // A device whose root nobody described (a CD drive the plan did not look
    // at) is left out; below a known root, every node must be known.
    let roots = index.device_roots().into_keys();
    for root in roots.filter(|r| known.images.contains_key(*r)) {
        let mut node = Some(root);
        while let Some(name) = node {
            let file = known.images.get(name)?;
            if nodes.insert(name.to_owned(), file.clone()).is_some() {
                break;
            }
            node = index.child(name, "backing").map(|(child, _)| child);
        }
    }
    Some(nodes)
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
        if let Some(disk) = LiveDisk::of_block(block.qdev, block.device, block.removable, chain) {
            disks.insert(disk.id.clone(), disk);
        }
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
    if disks.is_empty() {
        return Ok(BTreeMap::new());
    }
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

    /// `query-block` for a `top` → `base` chain on vda (with a persistent
    /// bitmap live on top and one stored in base's header), a CD drive
    /// with no medium and a raw disk without id=.
    fn chain_blocks() -> Vec<ChainBlockInfo> {
        serde_json::from_value(json!([
            {"device": "", "qdev": "/machine/peripheral/vda/virtio-backend", "removable": false,
             "inserted": {"node-name": "top", "drv": "qcow2", "file": "/i/top.qcow2", "ro": false,
                          "dirty-bitmaps": [
                              {"name": "b0", "granularity": 65536, "persistent": true},
                              {"name": "t", "granularity": 65536, "persistent": false}],
                          "image": {"filename": "/i/top.qcow2", "format": "qcow2",
                                    "virtual-size": 1048576, "backing-filename": "/i/base.qcow2",
                                    "backing-image": {"filename": "/i/base.qcow2", "format": "qcow2",
                                        "virtual-size": 1048576,
                                        "format-specific": {"type": "qcow2", "data": {
                                            "compat": "1.1",
                                            "bitmaps": [{"name": "old", "granularity": 65536,
                                                         "flags": ["auto"]}]}}}}}},
            {"device": "cd0", "qdev": "cd0dev", "removable": true},
            {"device": "", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
             "removable": false,
             "inserted": {"node-name": "x", "drv": "raw", "file": "/i/x.raw", "ro": false,
                          "image": {"filename": "/i/x.raw", "format": "raw",
                                    "virtual-size": 1048576}}},
        ]))
        .unwrap()
    }

    /// The debug graph of [`chain_blocks`], with `extra` nodes and edges.
    fn debug_graph(extra_nodes: Value, extra_edges: Value) -> DebugGraph {
        let rw = json!(["consistent-read", "write", "resize"]);
        let mut nodes = json!([
            {"id": 1, "type": "block-backend", "name": "/machine/peripheral/vda/virtio-backend"},
            {"id": 2, "type": "block-driver", "name": "top"},
            {"id": 3, "type": "block-driver", "name": "#block1"},
            {"id": 4, "type": "block-driver", "name": "base"},
            {"id": 5, "type": "block-driver", "name": "#block2"},
            {"id": 6, "type": "block-backend", "name": "/machine/peripheral-anon/device[0]/virtio-backend"},
            {"id": 7, "type": "block-driver", "name": "x"},
            {"id": 8, "type": "block-driver", "name": "#block3"},
        ]);
        let mut edges = json!([
            {"parent": 1, "child": 2, "name": "root", "perm": rw},
            {"parent": 2, "child": 3, "name": "file", "perm": rw},
            {"parent": 2, "child": 4, "name": "backing", "perm": ["consistent-read"]},
            {"parent": 4, "child": 5, "name": "file", "perm": ["consistent-read"]},
            {"parent": 6, "child": 7, "name": "root", "perm": rw},
            {"parent": 7, "child": 8, "name": "file", "perm": rw},
        ]);
        nodes
            .as_array_mut()
            .unwrap()
            .extend(extra_nodes.as_array().unwrap().clone());
        edges
            .as_array_mut()
            .unwrap()
            .extend(extra_edges.as_array().unwrap().clone());
        serde_json::from_value(json!({ "nodes": nodes, "edges": edges })).unwrap()
    }

    /// The two-call read gives each disk the chain the full read gives.
    #[test]
    fn paired_chains_agree_with_the_full_read() {
        let paired = pair_chains(chain_blocks(), debug_graph(json!([]), json!([]))).unwrap();
        let edges = HashMap::from([
            (("top".to_owned(), "backing".to_owned()), "base".to_owned()),
            (("top".to_owned(), "file".to_owned()), "#block1".to_owned()),
            (("base".to_owned(), "file".to_owned()), "#block2".to_owned()),
            (("x".to_owned(), "file".to_owned()), "#block3".to_owned()),
        ]);
        let mut nodes = nodes();
        nodes.retain(|n| n.node_name != "other");
        nodes.push(node("x", "raw", "/i/x.raw", None));
        nodes[0].dirty_bitmaps = vec![BitmapInfo {
            name: "b0".into(),
            granularity: 65536,
            persistent: true,
        }];
        let full = assemble(blocks(), nodes, Some(edges));
        assert_eq!(
            paired.disks.keys().collect::<Vec<_>>(),
            full.disks.keys().collect::<Vec<_>>()
        );
        for (id, disk) in &full.disks {
            let p = &paired.disks[id];
            assert_eq!(
                (p.snapshottable(), p.anonymous, p.removable, p.read_only),
                (
                    disk.snapshottable(),
                    disk.anonymous,
                    disk.removable,
                    disk.read_only
                ),
                "{id}"
            );
            let strip = |c: &[LiveLayer]| -> Vec<LiveLayer> {
                c.iter()
                    .cloned()
                    .map(|l| LiveLayer {
                        bitmaps: Vec::new(),
                        read_only: false,
                        ..l
                    })
                    .collect()
            };
            assert_eq!(strip(&p.chain), strip(&disk.chain), "{id}");
        }
        let vda = &paired.disks["vda"];
        let bitmaps = |l: &LiveLayer| l.bitmaps.iter().map(|b| b.name.clone()).collect::<Vec<_>>();
        // The active image's live persistent bitmaps; below, the header's.
        assert_eq!(bitmaps(&vda.chain[0]), ["b0"]);
        assert_eq!(bitmaps(&vda.chain[1]), ["old"]);
        assert!(!vda.chain[0].read_only && vda.chain[1].read_only);
        assert_eq!(paired.node_names.len(), 6);
        assert!(paired.nodes.contains_key("base") && !paired.nodes.contains_key("#block2"));
    }

    /// What the two-call read cannot vouch for sends [`read`] to the full one.
    #[test]
    fn pairing_gives_way_to_the_full_read() {
        // An image left open in no chain: only the full read says which file.
        let orphan = debug_graph(
            json!([{"id": 9, "type": "block-driver", "name": "left"},
                   {"id": 10, "type": "block-driver", "name": "#block9"}]),
            json!([{"parent": 9, "child": 10, "name": "file", "perm": []}]),
        );
        assert!(pair_chains(chain_blocks(), orphan).is_none());
        // A block job: its implicit filter hides from query-block.
        let job = debug_graph(
            json!([{"id": 9, "type": "block-job", "name": "commit0"}]),
            json!([]),
        );
        assert!(pair_chains(chain_blocks(), job).is_none());
        // The walks disagree: the debug graph has a layer query-block lacks.
        let deeper = debug_graph(
            json!([{"id": 9, "type": "block-driver", "name": "deeper"}]),
            json!([{"parent": 4, "child": 9, "name": "backing", "perm": []}]),
        );
        assert!(pair_chains(chain_blocks(), deeper).is_none());
    }

    /// After an operation, the files QEMU has open follow from the node
    /// names when each node is one the plan was made on or added.
    #[test]
    fn open_files_from_known_node_names() {
        let planned = pair_chains(chain_blocks(), debug_graph(json!([]), json!([]))).unwrap();
        let mut known = KnownNodes::of(&planned);
        known.add(&json!({"driver": "qcow2", "node-name": "new",
                          "file": {"driver": "file", "node-name": "new-file", "filename": "/i/new.qcow2"}}));
        // top was released; base stays under the new overlay, whose file
        // node is named; x's implicit file node is known as x's child.
        let after: DebugGraph = serde_json::from_value(json!({
            "nodes": [{"id": 1, "type": "block-driver", "name": "new"},
                      {"id": 2, "type": "block-driver", "name": "new-file"},
                      {"id": 3, "type": "block-driver", "name": "base"},
                      {"id": 4, "type": "block-driver", "name": "#block9"},
                      {"id": 5, "type": "block-driver", "name": "x"},
                      {"id": 6, "type": "block-driver", "name": "#block3"}],
            "edges": [{"parent": 1, "child": 2, "name": "file"},
                      {"parent": 1, "child": 3, "name": "backing"},
                      {"parent": 3, "child": 4, "name": "file"},
                      {"parent": 5, "child": 6, "name": "file"}],
        }))
        .unwrap();
        let files = files_of_known(&after, &known).unwrap();
        let mut files: Vec<_> = files.into_iter().collect();
        files.sort();
        assert_eq!(
            files,
            [
                Path::new("/i/base.qcow2"),
                Path::new("/i/new.qcow2"),
                Path::new("/i/x.raw")
            ]
        );
        // A node nobody named: its file is unknown, QEMU must be asked.
        let stranger: DebugGraph = serde_json::from_value(json!({
            "nodes": [{"id": 1, "type": "block-driver", "name": "stranger"}], "edges": [],
        }))
        .unwrap();
        assert!(files_of_known(&stranger, &known).is_none());
    }

    /// From node names and the map alone, each recorded disk's chain; any
    /// node the map does not know, or one outside every device, is refused.
    #[test]
    fn mapped_chains_trust_only_known_names() {
        let map = NodeMap {
            qemu: QemuProcess { pid: 1, started: 2 },
            nodes: BTreeMap::from([
                ("top".to_owned(), PathBuf::from("/i/top.qcow2")),
                ("base".to_owned(), PathBuf::from("/i/base.qcow2")),
                ("x".to_owned(), PathBuf::from("/i/x.raw")),
            ]),
        };
        let disks = BTreeMap::from([("vda".to_owned(), PathBuf::from("/i/top.qcow2"))]);
        let layer = |p: &Path| {
            Some((
                "qcow2".to_owned(),
                1 << 20,
                Some(format!("{}", p.display())),
            ))
        };
        let graph = debug_graph(json!([]), json!([]));
        let live = mapped_chains(&graph, &map, &disks, &layer).unwrap();
        let vda = &live.disks["vda"];
        let chain: Vec<_> = vda
            .chain
            .iter()
            .map(|l| (l.node.as_str(), l.filename.to_str().unwrap()))
            .collect();
        assert_eq!(chain, [("top", "/i/top.qcow2"), ("base", "/i/base.qcow2")]);
        assert_eq!(vda.chain[0].file_node.as_deref(), Some("#block1"));
        assert!(!vda.chain[0].read_only && vda.chain[1].read_only);
        assert_eq!(vda.qom_path, "/machine/peripheral/vda/virtio-backend");
        assert_eq!(live.node_names.len(), 6);

        // A layer the map does not know (someone else's overlay).
        let mut other = map.clone();
        other.nodes.remove("base");
        assert!(mapped_chains(&graph, &other, &disks, &layer).is_none());
        // A node outside every device.
        let orphan = debug_graph(
            json!([{"id": 9, "type": "block-driver", "name": "left"}]),
            json!([]),
        );
        assert!(mapped_chains(&orphan, &map, &disks, &layer).is_none());
        // A layer the record does not describe.
        let nothing = |_: &Path| None;
        assert!(mapped_chains(&graph, &map, &disks, &nothing).is_none());
    }

    /// After an operation, the map covers every device's chain, each node's
    /// file from what was known; a device whose root is not known is left out.
    #[test]
    fn the_map_after_an_operation_names_every_chain_node() {
        let planned = pair_chains(chain_blocks(), debug_graph(json!([]), json!([]))).unwrap();
        let known = KnownNodes::of(&planned);
        let files = chain_files(&debug_graph(json!([]), json!([])), &known).unwrap();
        assert_eq!(
            files.keys().map(String::as_str).collect::<Vec<_>>(),
            ["base", "top", "x"]
        );
        let mut partial = KnownNodes::of(&planned);
        partial.images.remove("base");
        assert!(chain_files(&debug_graph(json!([]), json!([])), &partial).is_none());
        let mut rootless = KnownNodes::of(&planned);
        rootless.images.remove("x");
        let files = chain_files(&debug_graph(json!([]), json!([])), &rootless).unwrap();
        assert!(!files.contains_key("x") && files.contains_key("top"));
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
