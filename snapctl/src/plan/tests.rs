//! Unit tests of the planners: records, live graphs and a fake host built in
//! memory, and the exact plans they give. No QEMU, no files.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use jiff::Timestamp;
use serde_json::{Value, json};

use super::create::CreateOptions;
use super::revert::RunAfter;
use super::{DirState, Facts, Host, ImageFacts, Plan, Step};
use crate::check::{self, Drift, RunningJob};
use crate::error::{Error, Result};
use crate::graph::{LiveDisk, LiveGraph, LiveLayer};
use crate::names::{self, node_name};
use crate::operation::{
    Boundary, Create, Delete, DiskDelete, DiskRevert, DiskSnapshot, LiveJob, Merge, MergeKind,
    OpenLayer, Operation, Revert,
};
use crate::record::{
    DeviceBinding, Disk, JournalEntry, Layer, Record, Snapshot, SnapshotDisk, SnapshotDisks,
    SnapshotKind,
};

const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------------------
// Fixtures
// ---------------------------------------------------------------------------

fn p(s: &str) -> PathBuf {
    PathBuf::from(s)
}

fn now() -> Timestamp {
    "2030-01-02T03:04:05Z".parse().unwrap()
}

/// Builds a record: layers (owned or foreign, any format, 1 GiB unless said),
/// disks, snapshots, the current snapshot. `build` checks it is valid.
struct Rec(Record);

impl Rec {
    fn new() -> Rec {
        Rec(Record::new("vm1"))
    }

    fn layer(mut self, path: &str, format: &str, backing: Option<&str>, owned: bool) -> Rec {
        self.0.layers.insert(
            p(path),
            Layer {
                format: format.into(),
                backing: backing.map(p),
                backing_string: backing.map(String::from),
                owned,
                virtual_size: Some(GIB),
            },
        );
        self
    }

    fn owned(self, path: &str, backing: Option<&str>) -> Rec {
        self.layer(path, "qcow2", backing, true)
    }

    fn foreign(self, path: &str, backing: Option<&str>) -> Rec {
        self.layer(path, "qcow2", backing, false)
    }

    fn size(mut self, path: &str, size: Option<u64>) -> Rec {
        self.0.layers.get_mut(Path::new(path)).unwrap().virtual_size = size;
        self
    }

    fn disk(mut self, id: &str, active: &str) -> Rec {
        self.0.disks.insert(
            id.into(),
            Disk {
                active: p(active),
                device: DeviceBinding {
                    driver: "virtio-blk-pci".into(),
                    extra: BTreeMap::new(),
                },
                node_options: BTreeMap::new(),
            },
        );
        self
    }

    fn snap(mut self, name: &str, parent: Option<&str>, disks: &[(&str, &str)]) -> Rec {
        self.0.snapshots.push(Snapshot {
            name: name.into(),
            parent: parent.map(String::from),
            created: "2030-01-01T00:00:00Z".parse().unwrap(),
            description: None,
            kind: SnapshotKind::DiskOnly,
            disks: disks
                .iter()
                .map(|(d, image)| ((*d).to_owned(), SnapshotDisk { image: p(image) }))
                .collect(),
            memory: None,
            internal: None,
            extra: BTreeMap::new(),
        });
        self
    }

    fn current(mut self, name: &str) -> Rec {
        self.0.current = Some(name.into());
        self
    }

    fn build(self) -> Record {
        self.0.validate().unwrap();
        self.0
    }
}

/// vda: base (foreign, frozen by s1) <- vda.s1 (frozen by s2) <- vda.s2
/// (frozen by s3) <- vda.s3 (active); current s3.
fn linear() -> Rec {
    Rec::new()
        .foreign("/img/base.qcow2", None)
        .owned("/img/vda.s1.qcow2", Some("/img/base.qcow2"))
        .owned("/img/vda.s2.qcow2", Some("/img/vda.s1.qcow2"))
        .owned("/img/vda.s3.qcow2", Some("/img/vda.s2.qcow2"))
        .disk("vda", "/img/vda.s3.qcow2")
        .snap("s1", None, &[("vda", "/img/base.qcow2")])
        .snap("s2", Some("s1"), &[("vda", "/img/vda.s1.qcow2")])
        .snap("s3", Some("s2"), &[("vda", "/img/vda.s2.qcow2")])
        .current("s3")
}

/// Two disks. vda: base (foreign) <- vda.s1 (frozen by s2) <- vda.s2
/// (active); vdb: vdb-base.raw (foreign, raw) <- vdb.s1 (frozen by s2) <-
/// vdb.s2 (active). s1 froze both bases; current s2.
fn two_disks() -> Rec {
    Rec::new()
        .foreign("/img/base.qcow2", None)
        .owned("/img/vda.s1.qcow2", Some("/img/base.qcow2"))
        .owned("/img/vda.s2.qcow2", Some("/img/vda.s1.qcow2"))
        .layer("/img/vdb-base.raw", "raw", None, false)
        .owned("/img/vdb.s1.qcow2", Some("/img/vdb-base.raw"))
        .owned("/img/vdb.s2.qcow2", Some("/img/vdb.s1.qcow2"))
        .disk("vda", "/img/vda.s2.qcow2")
        .disk("vdb", "/img/vdb.s2.qcow2")
        .snap(
            "s1",
            None,
            &[("vda", "/img/base.qcow2"), ("vdb", "/img/vdb-base.raw")],
        )
        .snap(
            "s2",
            Some("s1"),
            &[("vda", "/img/vda.s1.qcow2"), ("vdb", "/img/vdb.s1.qcow2")],
        )
        .current("s2")
}

/// The node name the fixtures give the layer at `path`: `n-<file stem>`.
fn node(path: &str) -> String {
    format!(
        "n-{}",
        Path::new(path).file_stem().unwrap().to_string_lossy()
    )
}

/// The protocol node under it: `f-<file stem>`.
fn file_node(path: &str) -> String {
    format!(
        "f-{}",
        Path::new(path).file_stem().unwrap().to_string_lossy()
    )
}

fn live_layer(path: &str, format: &str, size: u64) -> LiveLayer {
    LiveLayer {
        node: node(path),
        filename: p(path),
        format: format.into(),
        virtual_size: size,
        read_only: false,
        backing_string: None,
        file_node: Some(file_node(path)),
        bitmaps: Vec::new(),
    }
}

fn live_disk(id: &str, chain: Vec<LiveLayer>) -> LiveDisk {
    LiveDisk {
        id: id.into(),
        qom_path: format!("/machine/peripheral/{id}/virtio-backend"),
        backend: String::new(),
        removable: false,
        read_only: false,
        anonymous: false,
        chain,
    }
}

/// Builds a live graph: disks with chains, every node's name taken.
#[derive(Default)]
struct Live(LiveGraph);

impl Live {
    fn new() -> Live {
        Live::default()
    }

    /// QEMU as the record says: each disk's recorded chain, open.
    fn of(record: &Record) -> Live {
        let mut live = Live::new();
        for id in record.disks.keys() {
            let chain = record
                .chain(id)
                .iter()
                .map(|path| {
                    let layer = &record.layers[*path];
                    live_layer(
                        &path.to_string_lossy(),
                        &layer.format,
                        layer.virtual_size.unwrap_or(GIB),
                    )
                })
                .collect();
            live = live.disk(live_disk(id, chain));
        }
        live
    }

    fn disk(mut self, disk: LiveDisk) -> Live {
        for l in &disk.chain {
            self.0.node_names.insert(l.node.clone());
            self.0.node_names.extend(l.file_node.clone());
            self.0.nodes.insert(l.node.clone(), l.clone());
        }
        self.0.disks.insert(disk.id.clone(), disk);
        self
    }

    /// A disk with a chain of qcow2 layers (1 GiB).
    fn chain(self, id: &str, paths: &[&str]) -> Live {
        let chain = paths.iter().map(|p| live_layer(p, "qcow2", GIB)).collect();
        self.disk(live_disk(id, chain))
    }

    fn tweak(mut self, id: &str, f: impl FnOnce(&mut LiveDisk)) -> Live {
        f(self.0.disks.get_mut(id).unwrap());
        self
    }

    /// A node name QEMU already uses.
    fn taken(mut self, name: &str) -> Live {
        self.0.node_names.insert(name.into());
        self
    }

    fn build(self) -> LiveGraph {
        self.0
    }
}

/// Answers file questions from sets: paths that exist, directory states
/// (writable unless said), allocated bytes and virtual sizes per path.
#[derive(Default)]
struct FakeHost {
    existing: BTreeSet<PathBuf>,
    dirs: BTreeMap<PathBuf, DirState>,
    allocated: BTreeMap<PathBuf, u64>,
    sizes: BTreeMap<PathBuf, u64>,
    images: BTreeMap<PathBuf, ImageFacts>,
}

impl FakeHost {
    fn new() -> FakeHost {
        FakeHost::default()
    }

    fn file(mut self, path: &str) -> FakeHost {
        self.existing.insert(p(path));
        self
    }

    fn dir(mut self, path: &str, state: DirState) -> FakeHost {
        self.dirs.insert(p(path), state);
        self
    }

    fn alloc(mut self, path: &str, bytes: u64) -> FakeHost {
        self.allocated.insert(p(path), bytes);
        self
    }

    fn header_size(mut self, path: &str, bytes: u64) -> FakeHost {
        self.sizes.insert(p(path), bytes);
        self
    }

    /// An existing image at `path` with this header.
    fn image(mut self, path: &str, image: ImageFacts) -> FakeHost {
        self.existing.insert(p(path));
        self.images.insert(p(path), image);
        self
    }
}

impl Host for FakeHost {
    fn exists(&self, path: &Path) -> bool {
        self.existing.contains(path)
    }

    fn dir_state(&self, dir: &Path) -> DirState {
        self.dirs.get(dir).copied().unwrap_or(DirState::Writable)
    }

    fn allocated(&self, path: &Path) -> Option<u64> {
        self.allocated.get(path).copied()
    }

    fn virtual_size(&self, path: &Path) -> Option<u64> {
        self.sizes.get(path).copied()
    }

    fn image(&self, path: &Path) -> Option<ImageFacts> {
        self.images.get(path).cloned()
    }
}

fn facts<'a>(live: Option<&'a LiveGraph>, host: &'a FakeHost) -> Facts<'a> {
    Facts {
        live,
        running: live.map(|_| true),
        now: now(),
        host,
    }
}

fn create_of(plan: &Plan) -> &Create {
    match &plan.operation {
        Operation::Create(c) => c,
        other => panic!("not a create: {other:?}"),
    }
}

fn revert_of(plan: &Plan) -> &Revert {
    match &plan.operation {
        Operation::Revert(r) => r,
        other => panic!("not a revert: {other:?}"),
    }
}

fn delete_of(plan: &Plan) -> &Delete {
    match &plan.operation {
        Operation::Delete(d) => d,
        other => panic!("not a delete: {other:?}"),
    }
}

fn merge_of(plan: &Plan) -> &Merge {
    match &plan.operation {
        Operation::Commit(m) | Operation::Pull(m) => m,
        other => panic!("not a merge: {other:?}"),
    }
}

fn refused<T: std::fmt::Debug>(result: Result<T>) -> Error {
    result.expect_err("the planner should refuse")
}

// Expected steps, spelled out.

fn qmp(command: &str, arguments: Value) -> Step {
    Step::Qmp {
        command: command.into(),
        arguments,
    }
}

fn tool(argv: &[&str]) -> Step {
    Step::Tool {
        argv: argv.iter().map(|a| (*a).to_owned()).collect(),
    }
}

fn record_step(change: &str) -> Step {
    Step::Record {
        change: change.into(),
    }
}

fn remove(path: &str) -> Step {
    Step::RemoveFile { path: p(path) }
}

fn release(node: &str) -> Step {
    Step::ReleaseNode { node: node.into() }
}

fn wait(jobs: &[&str], status: &str) -> Step {
    Step::AwaitJobs {
        jobs: jobs.iter().map(|j| (*j).to_owned()).collect(),
        status: status.into(),
    }
}

fn job_cmd(command: &str, id: &str) -> Step {
    qmp(command, json!({ "id": id }))
}

fn create_overlay(path: &str, backing: &str, format: &str, size: u64) -> Step {
    Step::CreateOverlay {
        path: p(path),
        backing: backing.into(),
        backing_format: format.into(),
        size,
    }
}

/// One short line per step, to assert on order.
fn kinds(steps: &[Step]) -> Vec<String> {
    steps
        .iter()
        .map(|s| match s {
            Step::CreateOverlay { path, .. } => format!("create-overlay {}", path.display()),
            Step::CreateStateFile { path } => format!("create-state-file {}", path.display()),
            Step::CreateImage { path, .. } => format!("create-image {}", path.display()),
            Step::GuestAgent { command } => format!("agent {command}"),
            Step::Qmp { command, .. } => format!("qmp {command}"),
            Step::AwaitJobs { jobs, status } => format!("await {status} {}", jobs.join(",")),
            Step::ReleaseNode { node } => format!("release {node}"),
            Step::Tool { argv } => format!("tool {}", argv[..2].join(" ")),
            Step::Record { .. } => "record".into(),
            Step::RemoveFile { path } => format!("remove {}", path.display()),
        })
        .collect()
}

fn removed_files(steps: &[Step]) -> Vec<PathBuf> {
    steps
        .iter()
        .filter_map(|s| match s {
            Step::RemoveFile { path } => Some(path.clone()),
            _ => None,
        })
        .collect()
}

// ---------------------------------------------------------------------------
// create
// ---------------------------------------------------------------------------

/// QEMU with the two recorded disks plus a CD-ROM (removable, with medium),
/// a read-only disk and an empty removable drive.
fn create_live(record: &Record) -> LiveGraph {
    Live::of(record)
        .disk(live_disk(
            "cd0",
            vec![live_layer("/iso/cd.iso", "raw", GIB)],
        ))
        .tweak("cd0", |d| d.removable = true)
        .chain("ro0", &["/img/ro.qcow2"])
        .tweak("ro0", |d| d.read_only = true)
        .disk(live_disk("empty", Vec::new()))
        .tweak("empty", |d| d.removable = true)
        .build()
}

fn plan_create(
    record: &Record,
    live: &LiveGraph,
    host: &FakeHost,
    opts: &CreateOptions,
) -> Result<Plan> {
    super::create::plan(record, &facts(Some(live), host), opts)
}

fn disk_snapshot(disk: &str, frozen: &str, format: &str, name: &str) -> DiskSnapshot {
    DiskSnapshot {
        disk: disk.into(),
        frozen: p(frozen),
        frozen_node: node(frozen),
        frozen_format: format.into(),
        overlay: p(&format!("/img/{disk}.{name}.qcow2")),
        overlay_node: node_name("sc", disk, name, 0),
        file_node: node_name("sf", disk, name, 0),
        virtual_size: GIB,
        reused: false,
        bitmaps: Vec::new(),
    }
}

#[test]
fn create_takes_every_writable_disk_by_default() {
    let record = two_disks().build();
    let live = create_live(&record);
    let plan = plan_create(
        &record,
        &live,
        &FakeHost::new(),
        &CreateOptions::named("s3"),
    )
    .unwrap();
    assert_eq!(
        plan.operation,
        Operation::Create(Create {
            memory: None,
            live: true,
            name: "s3".into(),
            description: None,
            parent: Some("s2".into()),
            created: now(),
            quiesce: false,
            disks: vec![
                disk_snapshot("vda", "/img/vda.s2.qcow2", "qcow2", "s3"),
                disk_snapshot("vdb", "/img/vdb.s2.qcow2", "qcow2", "s3"),
            ],
        })
    );
}

#[test]
fn create_steps_write_headers_add_nodes_then_switch_in_one_transaction() {
    let record = two_disks().build();
    let live = create_live(&record);
    let plan = plan_create(
        &record,
        &live,
        &FakeHost::new(),
        &CreateOptions::named("s3"),
    )
    .unwrap();
    let (sc_a, sf_a) = (
        node_name("sc", "vda", "s3", 0),
        node_name("sf", "vda", "s3", 0),
    );
    let (sc_b, sf_b) = (
        node_name("sc", "vdb", "s3", 0),
        node_name("sf", "vdb", "s3", 0),
    );
    let add = |node: &str, file: &str, path: &str| {
        qmp(
            "blockdev-add",
            json!({
                "driver": "qcow2",
                "node-name": node,
                "file": { "driver": "file", "node-name": file, "filename": path },
                "backing": null,
            }),
        )
    };
    assert_eq!(
        plan.steps,
        vec![
            create_overlay("/img/vda.s3.qcow2", "/img/vda.s2.qcow2", "qcow2", GIB),
            create_overlay("/img/vdb.s3.qcow2", "/img/vdb.s2.qcow2", "qcow2", GIB),
            add(&sc_a, &sf_a, "/img/vda.s3.qcow2"),
            add(&sc_b, &sf_b, "/img/vdb.s3.qcow2"),
            qmp(
                "transaction",
                json!({ "actions": [
                    { "type": "blockdev-snapshot", "data": { "node": "n-vda.s2", "overlay": sc_a } },
                    { "type": "blockdev-snapshot", "data": { "node": "n-vdb.s2", "overlay": sc_b } },
                ]})
            ),
            record_step("add snapshot s3 (2 disks), now current"),
        ]
    );
}

#[test]
fn create_with_quiesce_freezes_just_around_the_transaction() {
    let record = two_disks().build();
    let live = create_live(&record);
    let opts = CreateOptions {
        quiesce: true,
        disks: vec!["vda".into()],
        ..CreateOptions::named("s3")
    };
    let plan = plan_create(&record, &live, &FakeHost::new(), &opts).unwrap();
    assert!(create_of(&plan).quiesce);
    assert_eq!(
        kinds(&plan.steps),
        [
            "create-overlay /img/vda.s3.qcow2",
            "qmp blockdev-add",
            "agent guest-fsfreeze-freeze",
            "qmp transaction",
            "agent guest-fsfreeze-thaw",
            "record",
        ]
    );
    assert_eq!(
        plan.steps.last(),
        Some(&record_step("add snapshot s3 (1 disk), now current"))
    );
}

fn created_disks(plan: &Plan) -> Vec<&str> {
    create_of(plan)
        .disks
        .iter()
        .map(|d| d.disk.as_str())
        .collect()
}

#[test]
fn create_takes_only_the_chosen_disks_minus_the_excluded() {
    let record = two_disks().build();
    let live = create_live(&record);
    let host = FakeHost::new();
    let cases: [(&[&str], &[&str], &[&str]); 4] = [
        (&["vdb"], &[], &["vdb"]),
        (&[], &["vda"], &["vdb"]),
        (&["vdb", "vda", "vdb"], &[], &["vdb", "vda"]),
        (&["vda", "vdb"], &["vda"], &["vdb"]),
    ];
    for (disks, exclude, expected) in cases {
        let opts = CreateOptions {
            disks: disks.iter().map(|d| (*d).to_owned()).collect(),
            exclude: exclude.iter().map(|d| (*d).to_owned()).collect(),
            ..CreateOptions::named("s3")
        };
        let plan = plan_create(&record, &live, &host, &opts).unwrap();
        assert_eq!(
            created_disks(&plan),
            expected,
            "--disk {disks:?} --exclude {exclude:?}"
        );
    }
}

#[test]
fn create_refuses_when_every_disk_is_excluded() {
    let record = two_disks().build();
    let live = create_live(&record);
    let opts = CreateOptions {
        exclude: vec!["vda".into(), "vdb".into()],
        ..CreateOptions::named("s3")
    };
    let err = refused(plan_create(&record, &live, &FakeHost::new(), &opts));
    assert!(
        matches!(err, Error::NoWritableDisk { ref vm } if vm == "vm1"),
        "{err:?}"
    );
}

#[test]
fn create_unknown_disk_names_the_known_ones() {
    let record = two_disks().build();
    let live = create_live(&record);
    let host = FakeHost::new();
    let by_disk = CreateOptions {
        disks: vec!["vdz".into()],
        ..CreateOptions::named("s3")
    };
    let by_exclude = CreateOptions {
        exclude: vec!["vdz".into()],
        ..CreateOptions::named("s3")
    };
    let by_overlay = CreateOptions {
        overlays: BTreeMap::from([("vdz".to_owned(), p("/img/x.qcow2"))]),
        ..CreateOptions::named("s3")
    };
    for opts in [by_disk, by_exclude, by_overlay] {
        let err = refused(plan_create(&record, &live, &host, &opts));
        match err {
            Error::UnknownDisk { vm, disk, known } => {
                assert_eq!((vm.as_str(), disk.as_str()), ("vm1", "vdz"));
                assert_eq!(known, "cd0, empty, ro0, vda, vdb");
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn create_refuses_a_chosen_disk_that_cannot_be_snapshotted() {
    let record = two_disks().build();
    let live = create_live(&record);
    for (disk, why) in [
        ("cd0", "it is removable"),
        ("ro0", "it is read-only"),
        ("empty", "it has no medium"),
    ] {
        let opts = CreateOptions {
            disks: vec!["vda".into(), disk.into()],
            ..CreateOptions::named("s3")
        };
        match refused(plan_create(&record, &live, &FakeHost::new(), &opts)) {
            Error::DiskNotSnapshottable { disk: d, reason } => {
                assert_eq!((d.as_str(), reason), (disk, why));
            }
            other => panic!("{disk}: {other:?}"),
        }
    }
}

fn overlay_refusal(err: Error) -> (PathBuf, &'static str) {
    match err {
        Error::OverlayPath { path, reason } => (path, reason),
        other => panic!("not an overlay path refusal: {other:?}"),
    }
}

#[test]
fn create_refuses_an_overlay_path_that_cannot_be_created() {
    let record = two_disks().build();
    let live = create_live(&record);
    let opts = CreateOptions::named("s3");
    let hashed = format!("/img/{}", names::overlay_file_name_hashed("vdb", "s3"));
    let cases = [
        (
            FakeHost::new().file("/img/vdb.s3.qcow2").file(&hashed),
            hashed.as_str(),
            "it already exists",
        ),
        (
            FakeHost::new().dir("/img", DirState::Missing),
            "/img/vda.s3.qcow2",
            "its directory does not exist",
        ),
        (
            FakeHost::new().dir("/img", DirState::ReadOnly),
            "/img/vda.s3.qcow2",
            "its directory is not writable",
        ),
        (
            FakeHost::new().dir("/img", DirState::NotADirectory),
            "/img/vda.s3.qcow2",
            "its directory is not a directory",
        ),
    ];
    for (host, path, reason) in cases {
        let err = refused(plan_create(&record, &live, &host, &opts));
        assert_eq!(overlay_refusal(err), (p(path), reason));
    }
}

/// Overlay file names stay readable (`vda.a_b.qcow2` for "a b"); a name
/// whose readable file is taken (by "a_b", say) gets the hashed one.
#[test]
fn create_names_overlays_readably_and_hashes_only_on_a_clash() {
    let record = two_disks().build();
    let live = create_live(&record);
    let opts = CreateOptions::named("a b");
    let overlays = |host: &FakeHost| -> Vec<PathBuf> {
        let plan = plan_create(&record, &live, host, &opts).unwrap();
        create_of(&plan)
            .disks
            .iter()
            .map(|d| d.overlay.clone())
            .collect()
    };
    assert_eq!(
        overlays(&FakeHost::new()),
        [p("/img/vda.a_b.qcow2"), p("/img/vdb.a_b.qcow2")]
    );
    let hashed = format!("/img/{}", names::overlay_file_name_hashed("vdb", "a b"));
    assert!(hashed.starts_with("/img/vdb.a_b--"), "{hashed}");
    assert_eq!(
        overlays(&FakeHost::new().file("/img/vdb.a_b.qcow2")),
        [p("/img/vda.a_b.qcow2"), p(&hashed)]
    );
}

#[test]
fn create_puts_an_overlay_where_the_user_says_and_checks_that_directory() {
    let record = two_disks().build();
    let live = create_live(&record);
    let opts = CreateOptions {
        overlays: BTreeMap::from([("vdb".to_owned(), p("/fast/b.qcow2"))]),
        ..CreateOptions::named("s3")
    };
    let plan = plan_create(&record, &live, &FakeHost::new(), &opts).unwrap();
    let overlays: Vec<&Path> = create_of(&plan)
        .disks
        .iter()
        .map(|d| d.overlay.as_path())
        .collect();
    assert_eq!(
        overlays,
        [Path::new("/img/vda.s3.qcow2"), Path::new("/fast/b.qcow2")]
    );

    let host = FakeHost::new().dir("/fast", DirState::ReadOnly);
    let err = refused(plan_create(&record, &live, &host, &opts));
    assert_eq!(
        overlay_refusal(err),
        (p("/fast/b.qcow2"), "its directory is not writable")
    );
}

#[test]
fn create_refuses_two_disks_sharing_an_overlay_path() {
    let record = two_disks().build();
    let live = create_live(&record);
    let opts = CreateOptions {
        overlays: BTreeMap::from([
            ("vda".to_owned(), p("/img/same.qcow2")),
            ("vdb".to_owned(), p("/img/same.qcow2")),
        ]),
        ..CreateOptions::named("s3")
    };
    let err = refused(plan_create(&record, &live, &FakeHost::new(), &opts));
    assert_eq!(
        overlay_refusal(err),
        (p("/img/same.qcow2"), "two disks would share it")
    );
}

#[test]
fn create_refuses_a_name_already_taken() {
    let record = two_disks().build();
    let live = create_live(&record);
    let err = refused(plan_create(
        &record,
        &live,
        &FakeHost::new(),
        &CreateOptions::named("s1"),
    ));
    assert!(
        matches!(err, Error::SnapshotExists { ref vm, ref name } if vm == "vm1" && name == "s1"),
        "{err:?}"
    );
}

#[test]
fn create_refuses_an_invalid_name() {
    let record = two_disks().build();
    let live = create_live(&record);
    let err = refused(plan_create(
        &record,
        &live,
        &FakeHost::new(),
        &CreateOptions::named("a/b"),
    ));
    assert!(matches!(err, Error::InvalidSnapshotName { .. }), "{err:?}");
}

#[test]
fn create_with_qemu_stopped_writes_overlays_on_the_recorded_active_images() {
    let record = two_disks().build();
    let host = FakeHost::new();
    let plan =
        super::create::plan(&record, &facts(None, &host), &CreateOptions::named("s3")).unwrap();
    let offline = |disk: &str, frozen: &str| DiskSnapshot {
        frozen_node: String::new(),
        overlay_node: String::new(),
        file_node: String::new(),
        ..disk_snapshot(disk, frozen, "qcow2", "s3")
    };
    assert_eq!(
        plan.operation,
        Operation::Create(Create {
            memory: None,
            live: false,
            name: "s3".into(),
            description: None,
            parent: Some("s2".into()),
            created: now(),
            quiesce: false,
            disks: vec![
                offline("vda", "/img/vda.s2.qcow2"),
                offline("vdb", "/img/vdb.s2.qcow2"),
            ],
        })
    );
    assert_eq!(
        plan.steps,
        vec![
            create_overlay("/img/vda.s3.qcow2", "/img/vda.s2.qcow2", "qcow2", GIB),
            create_overlay("/img/vdb.s3.qcow2", "/img/vdb.s2.qcow2", "qcow2", GIB),
            record_step("add snapshot s3 (2 disks), now current"),
        ]
    );
}

/// `--reuse-external`: a prepared empty overlay on the disk's active image is
/// used as it is (no header written); anything else is refused, saying why.
#[test]
fn create_reuses_a_prepared_overlay_only_when_it_fits() {
    let record = two_disks().build();
    let live = Live::of(&record).build();
    let fits = ImageFacts {
        format: "qcow2".into(),
        virtual_size: GIB,
        backing: Some(p("/img/vda.s2.qcow2")),
        has_data: false,
    };
    let opts = CreateOptions {
        overlays: [("vda".to_owned(), p("/mine/vda.next.qcow2"))].into(),
        reuse_external: true,
        ..CreateOptions::named("s3")
    };
    let host = FakeHost::new().image("/mine/vda.next.qcow2", fits.clone());
    let plan = super::create::plan(&record, &facts(Some(&live), &host), &opts).unwrap();
    let vda = &create_of(&plan).disks[0];
    assert!(
        vda.reused && vda.overlay == p("/mine/vda.next.qcow2"),
        "{vda:?}"
    );
    assert!(!create_of(&plan).disks[1].reused);
    let written: Vec<&Path> = plan
        .steps
        .iter()
        .filter_map(|s| match s {
            Step::CreateOverlay { path, .. } => Some(path.as_path()),
            _ => None,
        })
        .collect();
    assert_eq!(written, [Path::new("/img/vdb.s3.qcow2")]);

    let cases = [
        (
            ImageFacts {
                has_data: true,
                ..fits.clone()
            },
            "it already holds data",
        ),
        (
            ImageFacts {
                backing: Some(p("/img/vda.s1.qcow2")),
                ..fits.clone()
            },
            "its backing file is /img/vda.s1.qcow2, not /img/vda.s2.qcow2",
        ),
        (
            ImageFacts {
                format: "raw".into(),
                ..fits.clone()
            },
            "it is raw, not qcow2",
        ),
        (
            ImageFacts {
                virtual_size: 1,
                ..fits.clone()
            },
            "it is 1 bytes, the disk 1073741824",
        ),
    ];
    for (image, why) in cases {
        let host = FakeHost::new().image("/mine/vda.next.qcow2", image);
        let err = refused(super::create::plan(
            &record,
            &facts(Some(&live), &host),
            &opts,
        ));
        assert_eq!(
            err.to_string(),
            format!("--reuse-external: cannot use /mine/vda.next.qcow2: {why}")
        );
    }
    let err = refused(super::create::plan(
        &record,
        &facts(Some(&live), &FakeHost::new()),
        &opts,
    ));
    assert_eq!(
        err.to_string(),
        "--reuse-external: cannot use /mine/vda.next.qcow2: it is not a readable image"
    );
}

#[test]
fn create_with_qemu_stopped_needs_a_registered_vm_and_no_quiesce() {
    let host = FakeHost::new();
    let err = refused(super::create::plan(
        &Record::new("vm1"),
        &facts(None, &host),
        &CreateOptions::named("s3"),
    ));
    assert_eq!(
        err.to_string(),
        "vm vm1 is not registered and not running: start QEMU and run snapctl init"
    );
    let quiesced = CreateOptions {
        quiesce: true,
        ..CreateOptions::named("s3")
    };
    let err = refused(super::create::plan(
        &two_disks().build(),
        &facts(None, &host),
        &quiesced,
    ));
    assert_eq!(
        err.to_string(),
        "vm vm1 is not running: --quiesce needs its guest agent"
    );
}

#[test]
fn create_refuses_when_qemu_writes_another_image_than_the_record_says() {
    let record = two_disks().build();
    let live = Live::of(&record)
        .chain("vdb", &["/img/hand.qcow2", "/img/vdb.s2.qcow2"])
        .build();
    let err = refused(plan_create(
        &record,
        &live,
        &FakeHost::new(),
        &CreateOptions::named("s3"),
    ));
    assert!(matches!(err, Error::Drift(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "QEMU writes /img/hand.qcow2 on vdb but the record says /img/vdb.s2.qcow2: run snapctl check"
    );
}

#[test]
fn create_node_names_never_clash_with_qemus() {
    let record = two_disks().build();
    let live = Live::of(&record)
        .taken(&node_name("sc", "vda", "s3", 0))
        .taken(&node_name("sf", "vda", "s3", 0))
        .taken(&node_name("sf", "vda", "s3", 1))
        .build();
    let plan = plan_create(
        &record,
        &live,
        &FakeHost::new(),
        &CreateOptions::named("s3"),
    )
    .unwrap();
    let vda = &create_of(&plan).disks[0];
    assert_eq!(vda.overlay_node, node_name("sc", "vda", "s3", 1));
    assert_eq!(vda.file_node, node_name("sf", "vda", "s3", 2));
    let mut all = BTreeSet::new();
    for d in &create_of(&plan).disks {
        for n in [&d.overlay_node, &d.file_node] {
            assert!(!live.node_names.contains(n), "{n} is taken");
            assert!(all.insert(n.clone()), "{n} given twice");
        }
    }
}

#[test]
fn create_parent_is_the_current_snapshot_and_none_on_a_fresh_record() {
    let record = two_disks().current("s1").build();
    let live = create_live(&record);
    let plan = plan_create(
        &record,
        &live,
        &FakeHost::new(),
        &CreateOptions::named("s3"),
    )
    .unwrap();
    assert_eq!(create_of(&plan).parent.as_deref(), Some("s1"));

    let fresh = Rec::new()
        .foreign("/img/base.qcow2", None)
        .disk("vda", "/img/base.qcow2")
        .build();
    let live = Live::of(&fresh).build();
    let plan = plan_create(
        &fresh,
        &live,
        &FakeHost::new(),
        &CreateOptions::named("first"),
    )
    .unwrap();
    assert_eq!(create_of(&plan).parent, None);
    assert_eq!(
        create_of(&plan).disks,
        [DiskSnapshot {
            disk: "vda".into(),
            frozen: p("/img/base.qcow2"),
            frozen_node: "n-base".into(),
            frozen_format: "qcow2".into(),
            overlay: p("/img/vda.first.qcow2"),
            overlay_node: node_name("sc", "vda", "first", 0),
            file_node: node_name("sf", "vda", "first", 0),
            virtual_size: GIB,
            reused: false,
            bitmaps: Vec::new(),
        }]
    );
}

#[test]
fn create_apply_adds_owned_overlays_and_the_snapshot_as_current() {
    let mut record = two_disks().build();
    let live = create_live(&record);
    let opts = CreateOptions {
        description: Some("before upgrade".into()),
        disks: vec!["vdb".into()],
        ..CreateOptions::named("s3")
    };
    let plan = plan_create(&record, &live, &FakeHost::new(), &opts).unwrap();
    super::create::apply(&mut record, create_of(&plan));
    record.validate().unwrap();
    assert_eq!(record.disks["vdb"].active, p("/img/vdb.s3.qcow2"));
    assert_eq!(record.disks["vda"].active, p("/img/vda.s2.qcow2"));
    assert_eq!(
        record.layers[Path::new("/img/vdb.s3.qcow2")],
        Layer {
            format: "qcow2".into(),
            backing: Some(p("/img/vdb.s2.qcow2")),
            backing_string: Some("/img/vdb.s2.qcow2".into()),
            owned: true,
            virtual_size: Some(GIB),
        }
    );
    let s3 = record.snapshot("s3").unwrap();
    assert_eq!(s3.parent.as_deref(), Some("s2"));
    assert_eq!(s3.description.as_deref(), Some("before upgrade"));
    assert_eq!(s3.created, now());
    assert_eq!(
        s3.disks,
        SnapshotDisks::from([(
            "vdb".to_owned(),
            SnapshotDisk {
                image: p("/img/vdb.s2.qcow2")
            }
        )])
    );
    assert_eq!(record.current.as_deref(), Some("s3"));
}

// ---------------------------------------------------------------------------
// revert
// ---------------------------------------------------------------------------

fn plan_revert(
    record: &Record,
    live: Option<&LiveGraph>,
    host: &FakeHost,
    name: &str,
    paused: bool,
) -> Result<Plan> {
    let after = if paused {
        RunAfter::Paused
    } else {
        RunAfter::Keep
    };
    super::revert::plan(record, &facts(live, host), name, after)
}

/// A live revert keeps the guest's run state unless told otherwise: a
/// paused (or never started, `-S`) guest stays paused; `--running` continues it.
#[test]
fn revert_keeps_a_paused_guest_paused_unless_asked_to_run() {
    let record = linear().build();
    let live = Live::of(&record).build();
    let host = FakeHost::new();
    let paused = Facts {
        running: Some(false),
        ..facts(Some(&live), &host)
    };
    let cont = |plan: &Plan| {
        plan.steps
            .iter()
            .any(|s| matches!(s, Step::Qmp { command, .. } if command == "cont"))
    };
    let kept = super::revert::plan(&record, &paused, "s1", RunAfter::Keep).unwrap();
    assert!(!cont(&kept), "{:#?}", kept.steps);
    let Operation::Revert(op) = &kept.operation else {
        panic!("{kept:?}")
    };
    assert!(op.paused);
    let forced = super::revert::plan(&record, &paused, "s1", RunAfter::Running).unwrap();
    assert!(cont(&forced), "{:#?}", forced.steps);
    let running = facts(Some(&live), &host);
    let stays = super::revert::plan(&record, &running, "s1", RunAfter::Keep).unwrap();
    assert!(cont(&stays), "{:#?}", stays.steps);
    let held = super::revert::plan(&record, &running, "s1", RunAfter::Paused).unwrap();
    assert!(!cont(&held), "{:#?}", held.steps);
}

fn overlay_add(node: &str, file: &str, path: &str, backing: &str) -> Step {
    qmp(
        "blockdev-add",
        json!({
            "driver": "qcow2",
            "node-name": node,
            "file": { "driver": "file", "node-name": file, "filename": path },
            "backing": backing,
        }),
    )
}

fn qom_set(disk: &str, node: &str) -> Step {
    qmp(
        "qom-set",
        json!({ "path": format!("/machine/peripheral/{disk}"), "property": "drive", "value": node }),
    )
}

#[test]
fn revert_live_to_an_image_qemu_has_open_links_the_overlay_to_its_node() {
    let record = linear().build();
    let live = Live::of(&record).build();
    let plan = plan_revert(&record, Some(&live), &FakeHost::new(), "s3", false).unwrap();
    let (sr, sf) = (
        node_name("sr", "vda", "s3", 0),
        node_name("sf", "vda", "s3", 0),
    );
    assert_eq!(
        plan.operation,
        Operation::Revert(Revert {
            memory: None,
            memory_only: false,
            snapshot: "s3".into(),
            live: true,
            paused: false,
            disks: vec![DiskRevert {
                bitmaps: Vec::new(),
                bitmaps_from: String::new(),
                disk: "vda".into(),
                frozen: p("/img/vda.s2.qcow2"),
                frozen_format: "qcow2".into(),
                virtual_size: GIB,
                overlay: p("/img/vda.s3-r1.qcow2"),
                overlay_node: sr.clone(),
                file_node: sf.clone(),
                backing_node: Some("n-vda.s2".into()),
                open: vec![],
                old_nodes: vec!["n-vda.s3".into(), "f-vda.s3".into()],
            }],
        })
    );
    assert_eq!(
        plan.steps,
        vec![
            qmp("stop", Value::Null),
            create_overlay("/img/vda.s3-r1.qcow2", "/img/vda.s2.qcow2", "qcow2", GIB),
            overlay_add(&sr, &sf, "/img/vda.s3-r1.qcow2", "n-vda.s2"),
            qom_set("vda", &sr),
            record_step("current snapshot is s3"),
            release("n-vda.s3"),
            release("f-vda.s3"),
            qmp("system_reset", Value::Null),
            qmp("cont", Value::Null),
            remove("/img/vda.s3.qcow2"),
        ]
    );
}

#[test]
fn revert_releases_only_nodes_the_new_chain_does_not_stand_on() {
    let record = linear().build();
    let live = Live::of(&record).build();
    let plan = plan_revert(&record, Some(&live), &FakeHost::new(), "s2", false).unwrap();
    let d = &revert_of(&plan).disks[0];
    assert_eq!(d.backing_node.as_deref(), Some("n-vda.s1"));
    assert_eq!(
        d.old_nodes,
        ["n-vda.s3", "f-vda.s3", "n-vda.s2", "f-vda.s2"]
    );
    // vda.s2 is still frozen by s3: only the old active image goes.
    assert_eq!(removed_files(&plan.steps), [p("/img/vda.s3.qcow2")]);
}

#[test]
fn revert_leaves_nodes_qemu_named_itself_to_their_parents() {
    let record = linear().build();
    let mut live = Live::of(&record).build();
    let chain = &mut live.disks.get_mut("vda").unwrap().chain;
    chain[0].node = "#block7".into();
    chain[0].file_node = Some("#block6".into());
    chain[1].file_node = Some("#block3".into());
    let plan = plan_revert(&record, Some(&live), &FakeHost::new(), "s2", false).unwrap();
    assert_eq!(revert_of(&plan).disks[0].old_nodes, ["n-vda.s2"]);
    assert_eq!(
        kinds(&plan.steps)
            .iter()
            .filter(|k| k.starts_with("release"))
            .collect::<Vec<_>>(),
        ["release n-vda.s2"]
    );
}

/// After a revert to s1: vda.s1-r1 (active) on base; vda.s1 (frozen by s2)
/// and vda.s2 (frozen by s3) form a branch QEMU does not have open.
fn branched() -> Rec {
    Rec::new()
        .foreign("/img/base.qcow2", None)
        .owned("/img/vda.s1.qcow2", Some("/img/base.qcow2"))
        .owned("/img/vda.s2.qcow2", Some("/img/vda.s1.qcow2"))
        .owned("/img/vda.s1-r1.qcow2", Some("/img/base.qcow2"))
        .disk("vda", "/img/vda.s1-r1.qcow2")
        .snap("s1", None, &[("vda", "/img/base.qcow2")])
        .snap("s2", Some("s1"), &[("vda", "/img/vda.s1.qcow2")])
        .snap("s3", Some("s2"), &[("vda", "/img/vda.s2.qcow2")])
        .current("s1")
}

#[test]
fn revert_to_another_branch_opens_its_layers_read_only_bottom_up() {
    let record = branched().build();
    let live = Live::of(&record).build();
    let plan = plan_revert(&record, Some(&live), &FakeHost::new(), "s3", false).unwrap();
    let (sr, sf) = (
        node_name("sr", "vda", "s3", 0),
        node_name("sf", "vda", "s3", 0),
    );
    let so1 = node_name("so", "vda", "/img/vda.s1.qcow2", 0);
    let so2 = node_name("so", "vda", "/img/vda.s2.qcow2", 0);
    let d = &revert_of(&plan).disks[0];
    assert_eq!(
        d.open,
        [
            OpenLayer {
                path: p("/img/vda.s1.qcow2"),
                format: "qcow2".into(),
                node: so1.clone(),
                backing_node: Some("n-base".into()),
            },
            OpenLayer {
                path: p("/img/vda.s2.qcow2"),
                format: "qcow2".into(),
                node: so2.clone(),
                backing_node: Some(so1.clone()),
            },
        ]
    );
    assert_eq!(d.backing_node.as_deref(), Some(so2.as_str()));
    assert_eq!(d.old_nodes, ["n-vda.s1-r1", "f-vda.s1-r1"]);
    let open = |path: &str, node: &str, backing: &str| {
        qmp(
            "blockdev-add",
            json!({
                "driver": "qcow2",
                "node-name": node,
                "read-only": true,
                "file": { "driver": "file", "filename": path },
                "backing": backing,
            }),
        )
    };
    assert_eq!(
        plan.steps,
        vec![
            qmp("stop", Value::Null),
            create_overlay("/img/vda.s3-r1.qcow2", "/img/vda.s2.qcow2", "qcow2", GIB),
            open("/img/vda.s1.qcow2", &so1, "n-base"),
            open("/img/vda.s2.qcow2", &so2, &so1),
            overlay_add(&sr, &sf, "/img/vda.s3-r1.qcow2", &so2),
            qom_set("vda", &sr),
            record_step("current snapshot is s3"),
            release("n-vda.s1-r1"),
            release("f-vda.s1-r1"),
            qmp("system_reset", Value::Null),
            qmp("cont", Value::Null),
            remove("/img/vda.s1-r1.qcow2"),
        ]
    );
}

#[test]
fn revert_opens_a_raw_layer_without_a_backing() {
    // The whole target chain is closed: QEMU runs vda on an unrelated image.
    let record = Rec::new()
        .layer("/img/base.raw", "raw", None, false)
        .owned("/img/vda.s1.qcow2", Some("/img/base.raw"))
        .foreign("/img/other.qcow2", None)
        .disk("vda", "/img/vda.s1.qcow2")
        .snap("s1", None, &[("vda", "/img/base.raw")])
        .build();
    let live = Live::new().chain("vda", &["/img/other.qcow2"]).build();
    let plan = plan_revert(&record, Some(&live), &FakeHost::new(), "s1", false).unwrap();
    let so = node_name("so", "vda", "/img/base.raw", 0);
    assert_eq!(
        revert_of(&plan).disks[0].open,
        [OpenLayer {
            path: p("/img/base.raw"),
            format: "raw".into(),
            node: so.clone(),
            backing_node: None,
        }]
    );
    assert_eq!(
        plan.steps[2],
        qmp(
            "blockdev-add",
            json!({
                "driver": "raw",
                "node-name": so,
                "read-only": true,
                "file": { "driver": "file", "filename": "/img/base.raw" },
            })
        )
    );
    assert_eq!(
        plan.steps[1],
        create_overlay("/img/vda.s1-r1.qcow2", "/img/base.raw", "raw", GIB)
    );
}

#[test]
fn revert_offline_writes_the_overlay_and_records_it() {
    let mut record = linear().build();
    let plan = plan_revert(&record, None, &FakeHost::new(), "s2", true).unwrap();
    assert_eq!(
        plan.operation,
        Operation::Revert(Revert {
            memory: None,
            memory_only: false,
            snapshot: "s2".into(),
            live: false,
            paused: false,
            disks: vec![DiskRevert {
                bitmaps: Vec::new(),
                bitmaps_from: String::new(),
                disk: "vda".into(),
                frozen: p("/img/vda.s1.qcow2"),
                frozen_format: "qcow2".into(),
                virtual_size: GIB,
                overlay: p("/img/vda.s2-r1.qcow2"),
                overlay_node: node_name("sr", "vda", "s2", 0),
                file_node: node_name("sf", "vda", "s2", 0),
                backing_node: None,
                open: vec![],
                old_nodes: vec![],
            }],
        })
    );
    assert_eq!(
        plan.steps,
        vec![
            create_overlay("/img/vda.s2-r1.qcow2", "/img/vda.s1.qcow2", "qcow2", GIB),
            record_step("current snapshot is s2"),
            remove("/img/vda.s3.qcow2"),
        ]
    );
    let files = super::revert::apply(&mut record, revert_of(&plan));
    assert_eq!(files, [p("/img/vda.s3.qcow2")]);
    assert_eq!(record.current.as_deref(), Some("s2"));
    assert_eq!(
        record.chain("vda"),
        [
            Path::new("/img/vda.s2-r1.qcow2"),
            Path::new("/img/vda.s1.qcow2"),
            Path::new("/img/base.qcow2")
        ]
    );
    record.validate().unwrap();
}

#[test]
fn revert_overlay_name_skips_files_that_exist() {
    let record = linear().build();
    let host = FakeHost::new()
        .file("/img/vda.s3-r1.qcow2")
        .file("/img/vda.s3-r2.qcow2");
    let plan = plan_revert(&record, None, &host, "s3", false).unwrap();
    assert_eq!(revert_of(&plan).disks[0].overlay, p("/img/vda.s3-r3.qcow2"));
    let host = FakeHost::new().file("/img/vda.s3-r1.qcow2");
    let plan = plan_revert(&record, None, &host, "s3", false).unwrap();
    assert_eq!(revert_of(&plan).disks[0].overlay, p("/img/vda.s3-r2.qcow2"));
}

#[test]
fn revert_paused_does_not_continue_the_guest() {
    let record = linear().build();
    let live = Live::of(&record).build();
    let plan = plan_revert(&record, Some(&live), &FakeHost::new(), "s3", true).unwrap();
    assert!(revert_of(&plan).paused);
    assert_eq!(
        kinds(&plan.steps),
        [
            "qmp stop",
            "create-overlay /img/vda.s3-r1.qcow2",
            "qmp blockdev-add",
            "qmp qom-set",
            "record",
            "release n-vda.s3",
            "release f-vda.s3",
            "qmp system_reset",
            "remove /img/vda.s3.qcow2",
        ]
    );
}

#[test]
fn revert_refuses_when_the_disk_size_changed_since_the_snapshot() {
    let record = linear().build();
    let mut live = Live::of(&record).build();
    live.disks.get_mut("vda").unwrap().chain[0].virtual_size = 2 * GIB;
    let err = refused(plan_revert(
        &record,
        Some(&live),
        &FakeHost::new(),
        "s3",
        false,
    ));
    assert!(matches!(err, Error::Drift(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "vda is 2147483648 bytes in QEMU but 1073741824 in snapshot s3: refusing to switch"
    );
}

#[test]
fn revert_reads_an_unrecorded_size_from_the_header_or_refuses() {
    let record = linear().size("/img/vda.s2.qcow2", None).build();
    let host = FakeHost::new().header_size("/img/vda.s2.qcow2", 5 * GIB);
    let plan = plan_revert(&record, None, &host, "s3", false).unwrap();
    assert_eq!(revert_of(&plan).disks[0].virtual_size, 5 * GIB);
    assert_eq!(
        plan.steps[0],
        create_overlay(
            "/img/vda.s3-r1.qcow2",
            "/img/vda.s2.qcow2",
            "qcow2",
            5 * GIB
        )
    );

    let err = refused(plan_revert(&record, None, &FakeHost::new(), "s3", false));
    assert!(matches!(err, Error::Drift(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "the size of /img/vda.s2.qcow2 cannot be read: run snapctl check"
    );
}

#[test]
fn revert_removes_owned_files_nothing_needs_and_never_a_foreign_one() {
    // Someone snapshotted by hand on top of vda.s3: hand.qcow2 is foreign.
    let mut record = linear()
        .foreign("/img/hand.qcow2", Some("/img/vda.s3.qcow2"))
        .disk("vda", "/img/hand.qcow2")
        .build();
    let plan = plan_revert(&record, None, &FakeHost::new(), "s3", false).unwrap();
    assert_eq!(removed_files(&plan.steps), [p("/img/vda.s3.qcow2")]);
    super::revert::apply(&mut record, revert_of(&plan));
    assert!(!record.layers.contains_key(Path::new("/img/hand.qcow2")));
    assert!(!record.layers.contains_key(Path::new("/img/vda.s3.qcow2")));
    assert!(record.layers.contains_key(Path::new("/img/base.qcow2")));
}

#[test]
fn revert_of_two_disks_switches_both_after_adding_both() {
    let record = two_disks().build();
    let live = Live::of(&record).build();
    let plan = plan_revert(&record, Some(&live), &FakeHost::new(), "s1", false).unwrap();
    assert_eq!(
        kinds(&plan.steps),
        [
            "qmp stop",
            "create-overlay /img/vda.s1-r1.qcow2",
            "qmp blockdev-add",
            "create-overlay /img/vdb.s1-r1.qcow2",
            "qmp blockdev-add",
            "qmp qom-set",
            "qmp qom-set",
            "record",
            "release n-vda.s2",
            "release f-vda.s2",
            "release n-vda.s1",
            "release f-vda.s1",
            "release n-vdb.s2",
            "release f-vdb.s2",
            "release n-vdb.s1",
            "release f-vdb.s1",
            "qmp system_reset",
            "qmp cont",
            "remove /img/vda.s2.qcow2",
            "remove /img/vdb.s2.qcow2",
        ]
    );
    assert_eq!(
        plan.steps[3],
        create_overlay("/img/vdb.s1-r1.qcow2", "/img/vdb-base.raw", "raw", GIB)
    );
    assert_eq!(
        revert_of(&plan).disks[1].backing_node.as_deref(),
        Some("n-vdb-base")
    );
}

#[test]
fn revert_node_names_never_clash_with_qemus() {
    let record = linear().build();
    let live = Live::of(&record)
        .taken(&node_name("sr", "vda", "s3", 0))
        .build();
    let plan = plan_revert(&record, Some(&live), &FakeHost::new(), "s3", false).unwrap();
    let d = &revert_of(&plan).disks[0];
    assert_eq!(d.overlay_node, node_name("sr", "vda", "s3", 1));
    assert_eq!(d.file_node, node_name("sf", "vda", "s3", 0));
}

#[test]
fn revert_refuses_an_unknown_snapshot_and_a_disk_qemu_lacks() {
    let record = linear().build();
    let err = refused(plan_revert(&record, None, &FakeHost::new(), "s9", false));
    assert!(
        matches!(err, Error::UnknownSnapshot { ref vm, ref name } if vm == "vm1" && name == "s9"),
        "{err:?}"
    );
    let live = Live::new().chain("vdb", &["/img/x.qcow2"]).build();
    let err = refused(plan_revert(
        &record,
        Some(&live),
        &FakeHost::new(),
        "s3",
        false,
    ));
    assert!(matches!(err, Error::Drift(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "QEMU has no disk vda, which snapshot s3 covers"
    );
}

// ---------------------------------------------------------------------------
// delete
// ---------------------------------------------------------------------------

const F: &str = "/img/f.qcow2";
const C: &str = "/img/c.qcow2";

/// s1 froze f; c stands on f and is vda's active image.
fn pair(f_owned: bool, c_owned: bool) -> Rec {
    Rec::new()
        .layer(F, "qcow2", None, f_owned)
        .layer(C, "qcow2", Some(F), c_owned)
        .disk("vda", C)
        .snap("s1", None, &[("vda", F)])
}

/// As [`pair`], but c is itself the base of two branches d1 (active) and d2.
fn pair_c_branches(f_owned: bool, c_owned: bool) -> Rec {
    pair(f_owned, c_owned)
        .owned("/img/d1.qcow2", Some(C))
        .owned("/img/d2.qcow2", Some(C))
        .disk("vda", "/img/d1.qcow2")
        .snap("s2", Some("s1"), &[("vda", C)])
}

fn choose_with(record: &Record, name: &str, f: &str, sizes: &[(&str, u64)]) -> Boundary {
    let host = sizes
        .iter()
        .fold(FakeHost::new(), |h, (path, n)| h.alloc(path, *n));
    super::delete::choose(record, name, Path::new(f), &|p| host.allocated(p))
}

fn commit_fc() -> Boundary {
    Boundary::Commit {
        top: p(C),
        base: p(F),
    }
}

fn stream_fc() -> Boundary {
    Boundary::Stream {
        from: p(F),
        into: p(C),
    }
}

fn keep(reason: &str) -> Boundary {
    Boundary::Keep {
        reason: reason.into(),
    }
}

/// A row of the `choose` table: what the case is, the record, the allocated
/// sizes, the boundary expected for s1's f.
type ChooseCase = (
    &'static str,
    Record,
    &'static [(&'static str, u64)],
    Boundary,
);

#[test]
fn delete_chooses_the_safe_and_cheaper_merge() {
    let not_ours = "/img/f.qcow2 and /img/c.qcow2 are not snapctl's to write";
    let cases: Vec<ChooseCase> = vec![
        (
            "both owned, c smaller: commit",
            pair(true, true).build(),
            &[(C, 10), (F, 100)],
            commit_fc(),
        ),
        (
            "both owned, f smaller: stream",
            pair(true, true).build(),
            &[(C, 100), (F, 10)],
            stream_fc(),
        ),
        (
            "both owned, a tie: commit",
            pair(true, true).build(),
            &[(C, 50), (F, 50)],
            commit_fc(),
        ),
        (
            "both owned, sizes unknown: commit",
            pair(true, true).build(),
            &[],
            commit_fc(),
        ),
        (
            "both owned, only f's size known: stream",
            pair(true, true).build(),
            &[(F, 10)],
            stream_fc(),
        ),
        (
            "f owned, c foreign: commit, however big c",
            pair(true, false).build(),
            &[(C, 100), (F, 10)],
            commit_fc(),
        ),
        (
            "f foreign, c owned: stream, however big f",
            pair(false, true).build(),
            &[(C, 10), (F, 100)],
            stream_fc(),
        ),
        (
            "both foreign: keep",
            pair(false, false).build(),
            &[],
            keep(not_ours),
        ),
        (
            "c is a branch point: commit unsafe, stream",
            pair_c_branches(true, true).build(),
            &[(C, 10), (F, 100)],
            stream_fc(),
        ),
        (
            "f held by other snapshots: keep",
            pair(true, true)
                .snap("s0", None, &[("vda", F)])
                .snap("sx", None, &[("vda", F)])
                .build(),
            &[],
            keep("s0, sx also holds /img/f.qcow2"),
        ),
        (
            "f is a branch point with 2 dependents: keep",
            pair(true, true).owned("/img/c2.qcow2", Some(F)).build(),
            &[],
            keep("/img/f.qcow2 is the base of 2 branches; merging would change them"),
        ),
        (
            "nothing stands on f: drop",
            Rec::new()
                .owned(F, None)
                .owned(C, None)
                .disk("vda", C)
                .snap("s1", None, &[("vda", F)])
                .build(),
            &[],
            Boundary::Drop,
        ),
    ];
    for (case, record, sizes, expected) in cases {
        assert_eq!(choose_with(&record, "s1", F, sizes), expected, "{case}");
    }
}

#[test]
fn delete_keep_reason_names_the_branch_point_when_f_is_owned() {
    let record = pair_c_branches(true, false).build();
    match choose_with(&record, "s1", F, &[]) {
        Boundary::Keep { reason } => {
            assert!(!reason.contains("/img/f.qcow2 and"), "{reason}");
            assert!(reason.contains("/img/c.qcow2"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
}

fn plan_delete(
    record: &Record,
    live: Option<&LiveGraph>,
    host: &FakeHost,
    name: &str,
    metadata_only: bool,
    bandwidth: u64,
) -> Result<Plan> {
    super::delete::plan(record, &facts(live, host), name, metadata_only, bandwidth)
}

fn job_of(plan: &Plan, disk: usize) -> &LiveJob {
    delete_of(plan).disks[disk]
        .job
        .as_ref()
        .expect("a live job")
}

#[test]
fn delete_live_active_commit_completes_the_job_then_finalizes() {
    let record = linear().build();
    let live = Live::of(&record).build();
    let host = FakeHost::new()
        .alloc("/img/vda.s3.qcow2", 10)
        .alloc("/img/vda.s2.qcow2", 100);
    let plan = plan_delete(&record, Some(&live), &host, "s3", false, 0).unwrap();
    let id = node_name("sd", "vda", "s3", 0);
    let job = LiveJob {
        id: id.clone(),
        command: "block-commit".into(),
        arguments: json!({
            "job-id": id, "device": "n-vda.s3", "top-node": "n-vda.s3", "base-node": "n-vda.s2",
            "auto-finalize": false, "auto-dismiss": false,
        }),
        active: true,
        stale_nodes: vec!["n-vda.s3".into()],
    };
    assert_eq!(
        plan.operation,
        Operation::Delete(Delete {
            memory: None,
            keep_files: false,
            snapshot: "s3".into(),
            disks: vec![DiskDelete {
                disk: "vda".into(),
                frozen: p("/img/vda.s2.qcow2"),
                merge: Boundary::Commit {
                    top: p("/img/vda.s3.qcow2"),
                    base: p("/img/vda.s2.qcow2"),
                },
                job: Some(job.clone()),
            }],
        })
    );
    assert_eq!(
        plan.steps,
        vec![
            qmp("block-commit", job.arguments.clone()),
            wait(&[&id], "ready"),
            job_cmd("job-complete", &id),
            wait(&[&id], "pending"),
            job_cmd("job-finalize", &id),
            wait(&[&id], "concluded"),
            job_cmd("job-dismiss", &id),
            release("n-vda.s3"),
            record_step("remove snapshot s3"),
            remove("/img/vda.s3.qcow2"),
        ]
    );
}

#[test]
fn delete_live_commit_below_the_active_image_rewrites_the_backing_file() {
    let record = linear().build();
    let live = Live::of(&record).build();
    let host = FakeHost::new()
        .alloc("/img/vda.s2.qcow2", 10)
        .alloc("/img/vda.s1.qcow2", 100);
    let plan = plan_delete(&record, Some(&live), &host, "s2", false, 1_000_000).unwrap();
    let id = node_name("sd", "vda", "s2", 0);
    assert_eq!(
        job_of(&plan, 0),
        &LiveJob {
            id: id.clone(),
            command: "block-commit".into(),
            arguments: json!({
                "job-id": id, "device": "n-vda.s3", "top-node": "n-vda.s2",
                "base-node": "n-vda.s1", "backing-file": "/img/vda.s1.qcow2",
                "auto-finalize": false, "auto-dismiss": false, "speed": 1_000_000,
            }),
            active: false,
            stale_nodes: vec!["n-vda.s2".into()],
        }
    );
    assert_eq!(
        kinds(&plan.steps),
        [
            "qmp block-commit".to_owned(),
            format!("await pending {id}"),
            "qmp job-finalize".into(),
            format!("await concluded {id}"),
            "qmp job-dismiss".into(),
            "release n-vda.s2".into(),
            "record".into(),
            "remove /img/vda.s2.qcow2".into(),
        ]
    );
}

#[test]
fn delete_live_stream_names_the_layer_below_as_base() {
    let record = linear().build();
    let live = Live::of(&record).build();
    let host = FakeHost::new()
        .alloc("/img/vda.s2.qcow2", 100)
        .alloc("/img/vda.s1.qcow2", 10);
    let plan = plan_delete(&record, Some(&live), &host, "s2", false, 0).unwrap();
    let id = node_name("sd", "vda", "s2", 0);
    assert_eq!(
        delete_of(&plan).disks[0].merge,
        Boundary::Stream {
            from: p("/img/vda.s1.qcow2"),
            into: p("/img/vda.s2.qcow2"),
        }
    );
    assert_eq!(
        job_of(&plan, 0),
        &LiveJob {
            id: id.clone(),
            command: "block-stream".into(),
            arguments: json!({
                "job-id": id, "device": "n-vda.s2", "base-node": "n-base",
                "backing-file": "/img/base.qcow2",
                "auto-finalize": false, "auto-dismiss": false,
            }),
            active: false,
            stale_nodes: vec!["n-vda.s1".into()],
        }
    );
    assert_eq!(
        plan.steps[5..],
        [
            release("n-vda.s1"),
            record_step("remove snapshot s2"),
            remove("/img/vda.s1.qcow2"),
        ]
    );
}

#[test]
fn delete_live_stream_of_a_base_image_has_no_base_node() {
    let record = Rec::new()
        .owned(F, None)
        .owned(C, Some(F))
        .disk("vda", C)
        .snap("s1", None, &[("vda", F)])
        .build();
    let live = Live::of(&record).build();
    let host = FakeHost::new().alloc(C, 100).alloc(F, 10);
    let plan = plan_delete(&record, Some(&live), &host, "s1", false, 0).unwrap();
    let id = node_name("sd", "vda", "s1", 0);
    let job = job_of(&plan, 0);
    assert_eq!(
        job.arguments,
        json!({ "job-id": id, "device": "n-c", "auto-finalize": false, "auto-dismiss": false })
    );
    assert_eq!(job.stale_nodes, ["n-f"]);

    let offline = plan_delete(&record, None, &host, "s1", false, 0).unwrap();
    assert_eq!(
        offline.steps,
        vec![
            tool(&["qemu-img", "rebase", "-q", "-b", "", C]),
            record_step("remove snapshot s1"),
            remove(F),
        ]
    );
}

#[test]
fn delete_live_stream_refuses_when_the_layer_below_is_not_open() {
    let record = linear().build();
    let live = Live::new()
        .chain(
            "vda",
            &[
                "/img/vda.s3.qcow2",
                "/img/vda.s2.qcow2",
                "/img/vda.s1.qcow2",
            ],
        )
        .build();
    let host = FakeHost::new()
        .alloc("/img/vda.s2.qcow2", 100)
        .alloc("/img/vda.s1.qcow2", 10);
    let err = refused(plan_delete(&record, Some(&live), &host, "s2", false, 0));
    assert!(matches!(err, Error::Drift(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "/img/base.qcow2 is not open below /img/vda.s1.qcow2 in QEMU: run snapctl check"
    );
}

#[test]
fn delete_live_stream_refuses_when_another_image_is_open_below() {
    let record = linear().foreign("/img/other.qcow2", None).build();
    let live = Live::new()
        .chain(
            "vda",
            &[
                "/img/vda.s3.qcow2",
                "/img/vda.s2.qcow2",
                "/img/vda.s1.qcow2",
                "/img/other.qcow2",
            ],
        )
        .build();
    let host = FakeHost::new()
        .alloc("/img/vda.s2.qcow2", 100)
        .alloc("/img/vda.s1.qcow2", 10);
    let err = refused(plan_delete(&record, Some(&live), &host, "s2", false, 0));
    assert!(matches!(err, Error::Drift(_)), "{err:?}");
}

/// [`branched`] with one more layer on the closed branch: vda.s3 on vda.s2,
/// frozen by s4.
fn branched_deep() -> Rec {
    branched()
        .owned("/img/vda.s3.qcow2", Some("/img/vda.s2.qcow2"))
        .snap("s4", Some("s3"), &[("vda", "/img/vda.s3.qcow2")])
}

#[test]
fn delete_off_the_live_chain_commits_offline_and_relinks_every_dependent() {
    let record = branched_deep().build();
    let live = Live::of(&record).build();
    let host = FakeHost::new()
        .alloc("/img/vda.s2.qcow2", 10)
        .alloc("/img/vda.s1.qcow2", 100);
    let plan = plan_delete(&record, Some(&live), &host, "s2", false, 0).unwrap();
    assert_eq!(delete_of(&plan).disks[0].job, None);
    assert_eq!(
        plan.steps,
        vec![
            tool(&[
                "qemu-img",
                "commit",
                "-q",
                "-d",
                "-b",
                "/img/vda.s1.qcow2",
                "/img/vda.s2.qcow2",
            ]),
            tool(&[
                "qemu-img",
                "rebase",
                "-q",
                "-u",
                "-b",
                "/img/vda.s1.qcow2",
                "-F",
                "qcow2",
                "/img/vda.s3.qcow2",
            ]),
            record_step("remove snapshot s2"),
            remove("/img/vda.s2.qcow2"),
        ]
    );
}

#[test]
fn delete_off_the_live_chain_streams_offline_onto_the_layer_below() {
    let record = branched_deep().build();
    let live = Live::of(&record).build();
    let host = FakeHost::new()
        .alloc("/img/vda.s2.qcow2", 100)
        .alloc("/img/vda.s1.qcow2", 10);
    let plan = plan_delete(&record, Some(&live), &host, "s2", false, 0).unwrap();
    assert_eq!(delete_of(&plan).disks[0].job, None);
    assert_eq!(
        plan.steps,
        vec![
            tool(&[
                "qemu-img",
                "rebase",
                "-q",
                "-b",
                "/img/base.qcow2",
                "-F",
                "qcow2",
                "/img/vda.s2.qcow2",
            ]),
            record_step("remove snapshot s2"),
            remove("/img/vda.s1.qcow2"),
        ]
    );
}

#[test]
fn delete_offline_names_raw_backings_as_raw() {
    // Commit into a raw f: the dependent is relinked with -F raw.
    let record = Rec::new()
        .layer("/img/f.raw", "raw", None, true)
        .owned(C, Some("/img/f.raw"))
        .owned("/img/d.qcow2", Some(C))
        .disk("vda", "/img/d.qcow2")
        .snap("s1", None, &[("vda", "/img/f.raw")])
        .build();
    let host = FakeHost::new().alloc(C, 1).alloc("/img/f.raw", 2);
    let plan = plan_delete(&record, None, &host, "s1", false, 0).unwrap();
    assert_eq!(
        plan.steps[..2],
        [
            tool(&["qemu-img", "commit", "-q", "-d", "-b", "/img/f.raw", C]),
            tool(&[
                "qemu-img",
                "rebase",
                "-q",
                "-u",
                "-b",
                "/img/f.raw",
                "-F",
                "raw",
                "/img/d.qcow2"
            ]),
        ]
    );

    // Stream onto a raw base.
    let record = two_disks().build();
    let host = FakeHost::new()
        .alloc("/img/vdb.s2.qcow2", 100)
        .alloc("/img/vdb.s1.qcow2", 10);
    let plan = plan_delete(&record, None, &host, "s2", false, 0).unwrap();
    assert!(
        plan.steps.contains(&tool(&[
            "qemu-img",
            "rebase",
            "-q",
            "-b",
            "/img/vdb-base.raw",
            "-F",
            "raw",
            "/img/vdb.s2.qcow2",
        ])),
        "{:#?}",
        plan.steps
    );
}

#[test]
fn delete_of_two_disks_starts_every_job_before_waiting_and_finalizes_them_together() {
    let record = two_disks().build();
    let live = Live::of(&record).build();
    let host = FakeHost::new()
        .alloc("/img/vda.s2.qcow2", 1)
        .alloc("/img/vda.s1.qcow2", 100)
        .alloc("/img/vdb.s2.qcow2", 100)
        .alloc("/img/vdb.s1.qcow2", 1);
    let plan = plan_delete(&record, Some(&live), &host, "s2", false, 0).unwrap();
    let a = node_name("sd", "vda", "s2", 0);
    let b = node_name("sd", "vdb", "s2", 0);
    assert_eq!(
        plan.steps,
        vec![
            qmp(
                "block-commit",
                json!({
                    "job-id": a, "device": "n-vda.s2", "top-node": "n-vda.s2",
                    "base-node": "n-vda.s1", "auto-finalize": false, "auto-dismiss": false,
                })
            ),
            qmp(
                "block-stream",
                json!({
                    "job-id": b, "device": "n-vdb.s2", "base-node": "n-vdb-base",
                    "backing-file": "/img/vdb-base.raw",
                    "auto-finalize": false, "auto-dismiss": false,
                })
            ),
            wait(&[&a], "ready"),
            job_cmd("job-complete", &a),
            wait(&[&a, &b], "pending"),
            job_cmd("job-finalize", &a),
            job_cmd("job-finalize", &b),
            wait(&[&a, &b], "concluded"),
            job_cmd("job-dismiss", &a),
            job_cmd("job-dismiss", &b),
            release("n-vda.s2"),
            release("n-vdb.s1"),
            record_step("remove snapshot s2"),
            remove("/img/vda.s2.qcow2"),
            remove("/img/vdb.s1.qcow2"),
        ]
    );
    assert_eq!(
        super::delete::summary(delete_of(&plan)),
        [
            "vda: commit /img/vda.s2.qcow2 into /img/vda.s1.qcow2 (QEMU job)",
            "vdb: stream /img/vdb.s1.qcow2 into /img/vdb.s2.qcow2 (QEMU job)",
        ]
    );
}

#[test]
fn delete_metadata_only_keeps_every_layer() {
    let mut record = linear().build();
    let before = record.layers.clone();
    let live = Live::of(&record).build();
    let plan = plan_delete(&record, Some(&live), &FakeHost::new(), "s2", true, 0).unwrap();
    assert_eq!(
        plan.operation,
        Operation::Delete(Delete {
            memory: None,
            keep_files: true,
            snapshot: "s2".into(),
            disks: vec![DiskDelete {
                disk: "vda".into(),
                frozen: p("/img/vda.s1.qcow2"),
                merge: keep("--metadata-only"),
                job: None,
            }],
        })
    );
    assert_eq!(plan.steps, vec![record_step("remove snapshot s2")]);
    assert_eq!(
        super::delete::apply(&mut record, delete_of(&plan)),
        Vec::<PathBuf>::new()
    );
    assert_eq!(record.layers, before);
    assert_eq!(record.snapshot("s3").unwrap().parent.as_deref(), Some("s1"));
}

/// [`linear`] after a `pull vda`: vda.s3 stands alone, nothing stands on vda.s2.
fn pulled() -> Rec {
    linear().owned("/img/vda.s3.qcow2", None)
}

#[test]
fn delete_drops_a_frozen_image_nothing_stands_on() {
    let record = pulled().build();
    let plan = plan_delete(&record, None, &FakeHost::new(), "s3", false, 0).unwrap();
    assert_eq!(delete_of(&plan).disks[0].merge, Boundary::Drop);
    assert_eq!(
        plan.steps,
        vec![
            record_step("remove snapshot s3"),
            remove("/img/vda.s2.qcow2"),
        ]
    );
    assert_eq!(
        super::delete::summary(delete_of(&plan)),
        ["vda: nothing to merge above /img/vda.s2.qcow2"]
    );
}

#[test]
fn delete_metadata_only_never_removes_a_file() {
    let record = pulled().build();
    let plan = plan_delete(&record, None, &FakeHost::new(), "s3", true, 0).unwrap();
    assert_eq!(plan.steps, vec![record_step("remove snapshot s3")]);
}

#[test]
fn delete_apply_reparents_both_children_and_keeps_a_branch_point() {
    // s1 froze a, on which two branches grew: b1 (frozen by s2) and b2
    // (frozen by s3, under the active image).
    let mut record = Rec::new()
        .foreign("/img/base.qcow2", None)
        .owned("/img/a.qcow2", Some("/img/base.qcow2"))
        .owned("/img/b1.qcow2", Some("/img/a.qcow2"))
        .owned("/img/b2.qcow2", Some("/img/a.qcow2"))
        .owned("/img/top.qcow2", Some("/img/b2.qcow2"))
        .disk("vda", "/img/top.qcow2")
        .snap("s0", None, &[("vda", "/img/base.qcow2")])
        .snap("s1", Some("s0"), &[("vda", "/img/a.qcow2")])
        .snap("s2", Some("s1"), &[("vda", "/img/b1.qcow2")])
        .snap("s3", Some("s1"), &[("vda", "/img/b2.qcow2")])
        .current("s3")
        .build();
    let before = record.layers.clone();
    let plan = plan_delete(&record, None, &FakeHost::new(), "s1", false, 0).unwrap();
    assert_eq!(
        delete_of(&plan).disks[0].merge,
        keep("/img/a.qcow2 is the base of 2 branches; merging would change them")
    );
    assert_eq!(plan.steps, vec![record_step("remove snapshot s1")]);
    assert_eq!(
        super::delete::apply(&mut record, delete_of(&plan)),
        Vec::<PathBuf>::new()
    );
    let parents: Vec<(&str, Option<&str>)> = record
        .snapshots
        .iter()
        .map(|s| (s.name.as_str(), s.parent.as_deref()))
        .collect();
    assert_eq!(
        parents,
        [("s0", None), ("s2", Some("s0")), ("s3", Some("s0"))]
    );
    assert_eq!(record.layers, before);
    record.validate().unwrap();
}

#[test]
fn delete_apply_commit_moves_the_snapshot_holding_the_top_onto_the_base() {
    let mut record = linear().build();
    let host = FakeHost::new()
        .alloc("/img/vda.s2.qcow2", 10)
        .alloc("/img/vda.s1.qcow2", 100);
    let plan = plan_delete(&record, None, &host, "s2", false, 0).unwrap();
    let files = super::delete::apply(&mut record, delete_of(&plan));
    assert_eq!(files, [p("/img/vda.s2.qcow2")]);
    let s3 = record.snapshot("s3").unwrap();
    assert_eq!(s3.disks["vda"].image, p("/img/vda.s1.qcow2"));
    assert_eq!(s3.parent.as_deref(), Some("s1"));
    let top = &record.layers[Path::new("/img/vda.s3.qcow2")];
    assert_eq!(top.backing, Some(p("/img/vda.s1.qcow2")));
    assert_eq!(top.backing_string.as_deref(), Some("/img/vda.s1.qcow2"));
    assert_eq!(
        record.chain("vda"),
        [
            Path::new("/img/vda.s3.qcow2"),
            Path::new("/img/vda.s1.qcow2"),
            Path::new("/img/base.qcow2")
        ]
    );
    assert_eq!(record.current.as_deref(), Some("s3"));
    record.validate().unwrap();
}

#[test]
fn delete_apply_active_commit_makes_the_base_active() {
    let mut record = linear().build();
    let host = FakeHost::new()
        .alloc("/img/vda.s3.qcow2", 10)
        .alloc("/img/vda.s2.qcow2", 100);
    let plan = plan_delete(&record, None, &host, "s3", false, 0).unwrap();
    assert_eq!(
        super::delete::apply(&mut record, delete_of(&plan)),
        [p("/img/vda.s3.qcow2")]
    );
    assert_eq!(record.disks["vda"].active, p("/img/vda.s2.qcow2"));
    assert_eq!(record.current.as_deref(), Some("s2"));
    record.validate().unwrap();
}

#[test]
fn delete_apply_stream_onto_a_foreign_raw_base_keeps_the_base() {
    let mut record = Rec::new()
        .layer("/img/base.raw", "raw", None, false)
        .owned(F, Some("/img/base.raw"))
        .owned(C, Some(F))
        .disk("vda", C)
        .snap("s1", None, &[("vda", "/img/base.raw")])
        .snap("s2", Some("s1"), &[("vda", F)])
        .current("s2")
        .build();
    let host = FakeHost::new().alloc(C, 100).alloc(F, 10);
    let plan = plan_delete(&record, None, &host, "s2", false, 0).unwrap();
    assert_eq!(
        plan.steps,
        vec![
            tool(&[
                "qemu-img",
                "rebase",
                "-q",
                "-b",
                "/img/base.raw",
                "-F",
                "raw",
                C
            ]),
            record_step("remove snapshot s2"),
            remove(F),
        ]
    );
    assert_eq!(super::delete::apply(&mut record, delete_of(&plan)), [p(F)]);
    assert_eq!(
        record.chain("vda"),
        [Path::new(C), Path::new("/img/base.raw")]
    );
    assert_eq!(
        record.layers[Path::new(C)].backing_string.as_deref(),
        Some("/img/base.raw")
    );
    assert!(!record.layers[Path::new("/img/base.raw")].owned);
    assert_eq!(record.current.as_deref(), Some("s1"));
    record.validate().unwrap();
}

#[test]
fn delete_with_descendants_lists_the_deepest_first_and_the_name_last() {
    let record = Rec::new()
        .foreign("/img/base.qcow2", None)
        .disk("vda", "/img/base.qcow2")
        .snap("s1", None, &[("vda", "/img/base.qcow2")])
        .snap("s2", Some("s1"), &[("vda", "/img/base.qcow2")])
        .snap("s3", Some("s1"), &[("vda", "/img/base.qcow2")])
        .snap("s4", Some("s2"), &[("vda", "/img/base.qcow2")])
        .snap("s5", None, &[("vda", "/img/base.qcow2")])
        .build();
    assert_eq!(
        super::delete::with_descendants(&record, "s1"),
        ["s4", "s2", "s3", "s1"]
    );
    assert_eq!(super::delete::with_descendants(&record, "s2"), ["s4", "s2"]);
    assert_eq!(super::delete::with_descendants(&record, "s5"), ["s5"]);
}

#[test]
fn delete_summary_says_how_each_disk_goes() {
    let delete = Delete {
        memory: None,
        keep_files: false,
        snapshot: "s1".into(),
        disks: vec![
            DiskDelete {
                disk: "vda".into(),
                frozen: p(F),
                merge: commit_fc(),
                job: None,
            },
            DiskDelete {
                disk: "vdb".into(),
                frozen: p("/img/x.qcow2"),
                merge: Boundary::Drop,
                job: None,
            },
            DiskDelete {
                disk: "vdc".into(),
                frozen: p("/img/y.qcow2"),
                merge: keep("s9 also holds /img/y.qcow2"),
                job: None,
            },
        ],
    };
    assert_eq!(
        super::delete::summary(&delete),
        [
            "vda: commit /img/c.qcow2 into /img/f.qcow2 (qemu-img)",
            "vdb: nothing to merge above /img/x.qcow2",
            "vdc: keep /img/y.qcow2 (s9 also holds /img/y.qcow2)",
        ]
    );
}

#[test]
fn delete_refuses_an_unknown_snapshot() {
    let record = linear().build();
    let err = refused(plan_delete(&record, None, &FakeHost::new(), "s9", false, 0));
    assert_eq!(err.to_string(), "vm vm1 has no snapshot named s9");
}

// ---------------------------------------------------------------------------
// commit and pull
// ---------------------------------------------------------------------------

fn plan_commit(
    record: &Record,
    live: Option<&LiveGraph>,
    top: Option<&str>,
    base: Option<&str>,
    bandwidth: u64,
) -> Result<Plan> {
    let host = FakeHost::new();
    super::merge::plan_commit(record, &facts(live, &host), "vda", top, base, bandwidth)
}

fn plan_pull(
    record: &Record,
    live: Option<&LiveGraph>,
    base: Option<&str>,
    bandwidth: u64,
) -> Result<Plan> {
    let host = FakeHost::new();
    super::merge::plan_pull(record, &facts(live, &host), "vda", base, bandwidth)
}

fn merge_job(plan: &Plan) -> &LiveJob {
    merge_of(plan).job.as_ref().expect("a live job")
}

#[test]
fn commit_by_default_merges_the_active_image_into_the_layer_below() {
    let record = linear().build();
    let plan = plan_commit(&record, None, None, None, 0).unwrap();
    assert_eq!(
        plan.operation,
        Operation::Commit(Merge {
            disk: "vda".into(),
            merge: MergeKind::Commit {
                top: p("/img/vda.s3.qcow2"),
                base: p("/img/vda.s2.qcow2"),
            },
            removed_snapshots: vec!["s3".into()],
            job: None,
        })
    );
    assert_eq!(
        plan.steps,
        vec![
            tool(&[
                "qemu-img",
                "commit",
                "-q",
                "-d",
                "-b",
                "/img/vda.s2.qcow2",
                "/img/vda.s3.qcow2"
            ]),
            record_step(
                "vda: /img/vda.s3.qcow2 merged into /img/vda.s2.qcow2; \
                 remove snapshot s3 (its state no longer exists)"
            ),
            remove("/img/vda.s3.qcow2"),
        ]
    );
}

#[test]
fn commit_live_by_default_is_an_active_commit_with_pivot() {
    let record = linear().build();
    let live = Live::of(&record).build();
    let plan = plan_commit(&record, Some(&live), None, None, 0).unwrap();
    let id = node_name("sm", "vda", "commit", 0);
    assert_eq!(
        merge_job(&plan),
        &LiveJob {
            id: id.clone(),
            command: "block-commit".into(),
            arguments: json!({
                "job-id": id, "device": "n-vda.s3", "top-node": "n-vda.s3",
                "base-node": "n-vda.s2", "auto-finalize": false, "auto-dismiss": false,
            }),
            active: true,
            stale_nodes: vec!["n-vda.s3".into()],
        }
    );
    assert_eq!(
        kinds(&plan.steps),
        [
            "qmp block-commit".to_owned(),
            format!("await ready {id}"),
            "qmp job-complete".into(),
            format!("await pending {id}"),
            "qmp job-finalize".into(),
            format!("await concluded {id}"),
            "qmp job-dismiss".into(),
            "release n-vda.s3".into(),
            "record".into(),
            "remove /img/vda.s3.qcow2".into(),
        ]
    );
}

#[test]
fn commit_with_top_and_base_relinks_the_layer_above_and_moves_the_top_snapshot() {
    let mut record = linear().build();
    let live = Live::of(&record).build();
    let plan = plan_commit(&record, Some(&live), Some("s3"), Some("s2"), 5_000).unwrap();
    let id = node_name("sm", "vda", "commit", 0);
    assert_eq!(merge_of(&plan).removed_snapshots, ["s2"]);
    assert_eq!(
        merge_job(&plan),
        &LiveJob {
            id: id.clone(),
            command: "block-commit".into(),
            arguments: json!({
                "job-id": id, "device": "n-vda.s3", "top-node": "n-vda.s2",
                "base-node": "n-vda.s1", "backing-file": "/img/vda.s1.qcow2",
                "auto-finalize": false, "auto-dismiss": false, "speed": 5_000,
            }),
            active: false,
            stale_nodes: vec!["n-vda.s2".into()],
        }
    );

    let offline = plan_commit(&record, None, Some("s3"), Some("s2"), 5_000).unwrap();
    assert_eq!(
        offline.steps,
        vec![
            tool(&[
                "qemu-img",
                "commit",
                "-q",
                "-d",
                "-b",
                "/img/vda.s1.qcow2",
                "/img/vda.s2.qcow2"
            ]),
            tool(&[
                "qemu-img",
                "rebase",
                "-q",
                "-u",
                "-b",
                "/img/vda.s1.qcow2",
                "-F",
                "qcow2",
                "/img/vda.s3.qcow2",
            ]),
            record_step(
                "vda: /img/vda.s2.qcow2 merged into /img/vda.s1.qcow2; \
                 remove snapshot s2 (its state no longer exists)"
            ),
            remove("/img/vda.s2.qcow2"),
        ]
    );

    let files = super::merge::apply(&mut record, merge_of(&plan));
    assert_eq!(files, [p("/img/vda.s2.qcow2")]);
    let names: Vec<&str> = record.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["s1", "s3"]);
    let s3 = record.snapshot("s3").unwrap();
    assert_eq!(s3.disks["vda"].image, p("/img/vda.s1.qcow2"));
    assert_eq!(s3.parent.as_deref(), Some("s1"));
    assert_eq!(
        record.chain("vda"),
        [
            Path::new("/img/vda.s3.qcow2"),
            Path::new("/img/vda.s1.qcow2"),
            Path::new("/img/base.qcow2")
        ]
    );
    assert_eq!(record.current.as_deref(), Some("s3"));
    record.validate().unwrap();
}

#[test]
fn commit_past_several_layers_removes_every_snapshot_whose_state_is_gone() {
    let mut record = linear().build();
    let live = Live::of(&record).build();
    let plan = plan_commit(&record, Some(&live), None, Some("s2"), 0).unwrap();
    let m = merge_of(&plan);
    assert_eq!(
        m.merge,
        MergeKind::Commit {
            top: p("/img/vda.s3.qcow2"),
            base: p("/img/vda.s1.qcow2"),
        }
    );
    assert_eq!(m.removed_snapshots, ["s2", "s3"]);
    let job = merge_job(&plan);
    assert!(job.active);
    assert_eq!(job.arguments["top-node"], "n-vda.s3");
    assert_eq!(job.arguments["base-node"], "n-vda.s1");
    assert_eq!(job.stale_nodes, ["n-vda.s3", "n-vda.s2"]);
    assert!(plan.steps.contains(&record_step(
        "vda: /img/vda.s3.qcow2 merged into /img/vda.s1.qcow2; \
         remove snapshot s2, s3 (its state no longer exists)"
    )));
    assert_eq!(
        removed_files(&plan.steps),
        [p("/img/vda.s2.qcow2"), p("/img/vda.s3.qcow2")]
    );

    super::merge::apply(&mut record, m);
    assert_eq!(record.disks["vda"].active, p("/img/vda.s1.qcow2"));
    let names: Vec<&str> = record.snapshots.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["s1"]);
    assert_eq!(record.current.as_deref(), Some("s1"));
    record.validate().unwrap();
}

#[test]
fn commit_never_writes_a_foreign_base() {
    let record = linear().build();
    let err = refused(plan_commit(&record, None, Some("s2"), Some("s1"), 0));
    assert!(matches!(err, Error::Refused(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "/img/base.qcow2 was not created by snapctl; commit never writes a foreign image (use pull)"
    );
}

#[test]
fn commit_refuses_to_change_another_branch() {
    // A branch on the base.
    let record = linear()
        .owned("/img/vda.s1-r1.qcow2", Some("/img/vda.s1.qcow2"))
        .build();
    let err = refused(plan_commit(&record, None, None, Some("s2"), 0));
    assert!(matches!(err, Error::Refused(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        "/img/vda.s1.qcow2 is the base of another branch; \
         committing into or past it would change that branch"
    );

    // A branch on a layer in between.
    let record = linear()
        .owned("/img/x.qcow2", Some("/img/vda.s2.qcow2"))
        .build();
    let err = refused(plan_commit(&record, None, None, Some("s2"), 0));
    assert_eq!(
        err.to_string(),
        "/img/vda.s2.qcow2 is the base of another branch; \
         committing into or past it would change that branch"
    );

    // A branch on the top itself.
    let err = refused(plan_commit(&record, None, Some("s3"), None, 0));
    assert_eq!(
        err.to_string(),
        "/img/vda.s2.qcow2 is the base of another branch; committing it would change that branch"
    );
}

#[test]
fn commit_refuses_a_base_not_below_the_top() {
    let record = linear().build();
    let nothing = "nothing to commit on vda: the base must lie below the top in the chain";
    let err = refused(plan_commit(&record, None, Some("s2"), Some("s3"), 0));
    assert_eq!(err.to_string(), nothing);
    let err = refused(plan_commit(&record, None, Some("s2"), Some("s2"), 0));
    assert_eq!(err.to_string(), nothing);
    let alone = Rec::new()
        .owned("/img/only.qcow2", None)
        .disk("vda", "/img/only.qcow2")
        .build();
    let err = refused(plan_commit(&alone, None, None, None, 0));
    assert_eq!(err.to_string(), nothing);
}

#[test]
fn commit_refuses_layers_off_the_current_chain_and_unknown_names() {
    let record = branched().build();
    let err = refused(plan_commit(&record, None, Some("s3"), None, 0));
    assert_eq!(
        err.to_string(),
        "top /img/vda.s2.qcow2 is not in vda's current chain"
    );
    let err = refused(plan_commit(&record, None, None, Some("s2"), 0));
    assert_eq!(
        err.to_string(),
        "base /img/vda.s1.qcow2 is not in vda's current chain"
    );
    let err = refused(plan_commit(&record, None, Some("s9"), None, 0));
    assert!(matches!(err, Error::UnknownSnapshot { .. }), "{err:?}");

    let record = two_disks()
        .snap("s3", Some("s2"), &[("vdb", "/img/vdb.s1.qcow2")])
        .build();
    let err = refused(plan_commit(&record, None, Some("s3"), None, 0));
    assert_eq!(err.to_string(), "snapshot s3 does not cover disk vda");
}

#[test]
fn commit_and_pull_refuse_an_unknown_disk_naming_the_known_ones() {
    let record = two_disks().build();
    let host = FakeHost::new();
    let facts = facts(None, &host);
    for err in [
        refused(super::merge::plan_commit(
            &record, &facts, "vdz", None, None, 0,
        )),
        refused(super::merge::plan_pull(&record, &facts, "vdz", None, 0)),
    ] {
        match err {
            Error::UnknownDisk { vm, disk, known } => {
                assert_eq!(
                    (vm.as_str(), disk.as_str(), known.as_str()),
                    ("vm1", "vdz", "vda, vdb")
                );
            }
            other => panic!("{other:?}"),
        }
    }
}

#[test]
fn commit_and_pull_refuse_when_qemus_chain_differs_from_the_record() {
    let record = linear().build();
    let live = Live::new()
        .chain("vda", &["/img/vda.s3.qcow2", "/img/vda.s2.qcow2"])
        .build();
    let expected = "QEMU's chain of vda differs from the record: run snapctl check";
    let err = refused(plan_commit(&record, Some(&live), None, None, 0));
    assert!(matches!(err, Error::Drift(_)), "{err:?}");
    assert_eq!(err.to_string(), expected);
    let err = refused(plan_pull(&record, Some(&live), None, 0));
    assert_eq!(err.to_string(), expected);
    let err = refused(plan_pull(&record, Some(&Live::new().build()), None, 0));
    assert_eq!(err.to_string(), "QEMU has no disk vda: run snapctl check");
}

#[test]
fn pull_by_default_makes_the_active_image_standalone() {
    let record = linear().build();
    let plan = plan_pull(&record, None, None, 0).unwrap();
    assert_eq!(
        plan.operation,
        Operation::Pull(Merge {
            disk: "vda".into(),
            merge: MergeKind::Pull {
                active: p("/img/vda.s3.qcow2"),
                base: None,
            },
            removed_snapshots: vec![],
            job: None,
        })
    );
    // Every skipped layer is still frozen by a snapshot: nothing is removed.
    assert_eq!(
        plan.steps,
        vec![
            tool(&["qemu-img", "rebase", "-q", "-b", "", "/img/vda.s3.qcow2"]),
            record_step("vda: /img/vda.s3.qcow2 stands on its new base"),
        ]
    );
}

#[test]
fn pull_live_without_base_streams_everything_and_releases_every_layer_below() {
    let record = linear().build();
    let live = Live::of(&record).build();
    let plan = plan_pull(&record, Some(&live), None, 0).unwrap();
    let id = node_name("sm", "vda", "pull", 0);
    assert_eq!(
        merge_job(&plan),
        &LiveJob {
            id: id.clone(),
            command: "block-stream".into(),
            arguments: json!({
                "job-id": id, "device": "n-vda.s3",
                "auto-finalize": false, "auto-dismiss": false,
            }),
            active: false,
            stale_nodes: vec!["n-vda.s2".into(), "n-vda.s1".into(), "n-base".into()],
        }
    );
    assert_eq!(
        plan.steps,
        vec![
            qmp("block-stream", merge_job(&plan).arguments.clone()),
            wait(&[&id], "pending"),
            job_cmd("job-finalize", &id),
            wait(&[&id], "concluded"),
            job_cmd("job-dismiss", &id),
            release("n-vda.s2"),
            release("n-vda.s1"),
            release("n-base"),
            record_step("vda: /img/vda.s3.qcow2 stands on its new base"),
        ]
    );
}

#[test]
fn pull_with_base_streams_the_layers_above_it() {
    let mut record = linear().build();
    let live = Live::of(&record).build();
    let plan = plan_pull(&record, Some(&live), Some("s2"), 1).unwrap();
    let id = node_name("sm", "vda", "pull", 0);
    assert_eq!(
        merge_of(&plan).merge,
        MergeKind::Pull {
            active: p("/img/vda.s3.qcow2"),
            base: Some(p("/img/vda.s1.qcow2")),
        }
    );
    assert_eq!(
        merge_job(&plan).arguments,
        json!({
            "job-id": id, "device": "n-vda.s3", "base-node": "n-vda.s1",
            "backing-file": "/img/vda.s1.qcow2",
            "auto-finalize": false, "auto-dismiss": false, "speed": 1,
        })
    );
    assert_eq!(merge_job(&plan).stale_nodes, ["n-vda.s2"]);

    let offline = plan_pull(&record, None, Some("s2"), 0).unwrap();
    assert_eq!(
        offline.steps[0],
        tool(&[
            "qemu-img",
            "rebase",
            "-q",
            "-b",
            "/img/vda.s1.qcow2",
            "-F",
            "qcow2",
            "/img/vda.s3.qcow2",
        ])
    );
    let snapshots_before = record.snapshots.clone();
    assert_eq!(
        super::merge::apply(&mut record, merge_of(&plan)),
        Vec::<PathBuf>::new()
    );
    assert_eq!(
        record.chain("vda"),
        [
            Path::new("/img/vda.s3.qcow2"),
            Path::new("/img/vda.s1.qcow2"),
            Path::new("/img/base.qcow2")
        ]
    );
    // vda.s2 keeps its content: s3 still holds it.
    assert!(record.layers.contains_key(Path::new("/img/vda.s2.qcow2")));
    assert_eq!(record.snapshots, snapshots_before);
    record.validate().unwrap();
}

#[test]
fn pull_removes_the_skipped_owned_layers_nothing_needs() {
    let mut record = Rec::new()
        .foreign("/img/base.qcow2", None)
        .owned("/img/vda.s1.qcow2", Some("/img/base.qcow2"))
        .owned("/img/mid.qcow2", Some("/img/vda.s1.qcow2"))
        .foreign("/img/hand.qcow2", Some("/img/mid.qcow2"))
        .owned("/img/top.qcow2", Some("/img/hand.qcow2"))
        .disk("vda", "/img/top.qcow2")
        .snap("s1", None, &[("vda", "/img/base.qcow2")])
        .snap("s2", Some("s1"), &[("vda", "/img/vda.s1.qcow2")])
        .current("s2")
        .build();
    let plan = plan_pull(&record, None, Some("s2"), 0).unwrap();
    assert_eq!(
        plan.steps,
        vec![
            tool(&[
                "qemu-img",
                "rebase",
                "-q",
                "-b",
                "/img/vda.s1.qcow2",
                "-F",
                "qcow2",
                "/img/top.qcow2",
            ]),
            record_step("vda: /img/top.qcow2 stands on its new base"),
            remove("/img/mid.qcow2"),
        ]
    );
    super::merge::apply(&mut record, merge_of(&plan));
    let layers: Vec<&Path> = record.layers.keys().map(PathBuf::as_path).collect();
    assert_eq!(
        layers,
        [
            Path::new("/img/base.qcow2"),
            Path::new("/img/top.qcow2"),
            Path::new("/img/vda.s1.qcow2")
        ]
    );
}

#[test]
fn pull_refuses_when_nothing_lies_between() {
    let record = linear().build();
    let nothing = "nothing to pull on vda: no layer lies between the active image and the base";
    let err = refused(plan_pull(&record, None, Some("s3"), 0));
    assert!(matches!(err, Error::Refused(_)), "{err:?}");
    assert_eq!(err.to_string(), nothing);
    let alone = Rec::new()
        .owned("/img/only.qcow2", None)
        .disk("vda", "/img/only.qcow2")
        .build();
    assert_eq!(
        refused(plan_pull(&alone, None, None, 0)).to_string(),
        nothing
    );
}

#[test]
fn pull_never_writes_a_foreign_active_image() {
    let record = Rec::new()
        .foreign("/img/base.qcow2", None)
        .foreign("/img/hand.qcow2", Some("/img/base.qcow2"))
        .disk("vda", "/img/hand.qcow2")
        .build();
    let err = refused(plan_pull(&record, None, None, 0));
    assert_eq!(
        err.to_string(),
        "/img/hand.qcow2 was not created by snapctl; pull never writes a foreign image"
    );
}

#[test]
fn pull_refuses_a_base_off_the_current_chain() {
    let record = branched().build();
    let err = refused(plan_pull(&record, None, Some("s2"), 0));
    assert_eq!(
        err.to_string(),
        "base /img/vda.s1.qcow2 is not in vda's current chain"
    );
}

// ---------------------------------------------------------------------------
// check: the record against the live graph (files that do not exist)
// ---------------------------------------------------------------------------

const GONE: &str = "/nonexistent-snapctl-plan-tests";

fn gone(name: &str) -> String {
    format!("{GONE}/{name}")
}

fn drift(kind: &'static str, disk: Option<&str>, message: &str) -> Drift {
    Drift {
        kind,
        disk: disk.map(String::from),
        message: message.into(),
    }
}

/// vda: base <- vda.s1 (active), s1 froze base; vdb: vdb.qcow2 alone. No file exists.
fn gone_record() -> Record {
    Rec::new()
        .foreign(&gone("base.qcow2"), None)
        .owned(&gone("vda.s1.qcow2"), Some(&gone("base.qcow2")))
        .foreign(&gone("vdb.qcow2"), None)
        .disk("vda", &gone("vda.s1.qcow2"))
        .disk("vdb", &gone("vdb.qcow2"))
        .snap("s1", None, &[("vda", &gone("base.qcow2"))])
        .build()
}

#[test]
fn check_reports_a_disk_qemu_lacks_and_every_missing_file() {
    let record = gone_record();
    let live = Live::new()
        .chain("vda", &[&gone("vda.s1.qcow2"), &gone("base.qcow2")])
        .build();
    assert_eq!(
        check::drifts(&record, Some(&live), &[]),
        [
            drift(
                "missing-file",
                Some("vda"),
                &format!("{GONE}/vda.s1.qcow2 is missing")
            ),
            drift(
                "missing-file",
                Some("vda"),
                &format!("{GONE}/base.qcow2 is missing")
            ),
            drift(
                "missing-disk",
                Some("vdb"),
                "QEMU has no disk vdb, which the record knows"
            ),
            drift(
                "missing-file",
                Some("vdb"),
                &format!("{GONE}/vdb.qcow2 is missing")
            ),
        ]
    );
    // Without QEMU only the files are compared.
    let offline = check::drifts(&record, None, &[]);
    let kinds: Vec<&str> = offline.iter().map(|d| d.kind).collect();
    assert_eq!(kinds, ["missing-file"; 3]);
}

#[test]
fn check_reports_qemu_writing_another_image_or_a_frozen_one() {
    let record = gone_record();
    let live = Live::new()
        .chain("vda", &[&gone("base.qcow2")])
        .chain("vdb", &[&gone("elsewhere.qcow2")])
        .build();
    let active: Vec<Drift> = check::drifts(&record, Some(&live), &[])
        .into_iter()
        .filter(|d| d.kind == "active-image")
        .collect();
    assert_eq!(
        active,
        [
            drift(
                "active-image",
                Some("vda"),
                "QEMU writes base.qcow2 on vda but the record says it is frozen by s1"
            ),
            drift(
                "active-image",
                Some("vdb"),
                &format!(
                    "QEMU writes {GONE}/elsewhere.qcow2 on vdb but the record says the active image is {GONE}/vdb.qcow2"
                )
            ),
        ]
    );
}

#[test]
fn check_reports_interrupted_operations_and_running_jobs_first() {
    let mut record = Rec::new().build();
    record.journal.push(JournalEntry {
        id: 1,
        started: now(),
        pid: 42,
        operation: Operation::from_parts("delete", Value::Null),
    });
    let jobs = [
        RunningJob {
            id: "j1".into(),
            kind: "commit".into(),
            status: "running".into(),
        },
        RunningJob {
            id: "j2".into(),
            kind: "stream".into(),
            status: "concluded".into(),
        },
    ];
    assert_eq!(
        check::drifts(&record, Some(&Live::new().build()), &jobs),
        [
            drift(
                "journal",
                None,
                "an interrupted delete (pid 42, started 2030-01-02T03:04:05Z) left unfinished work"
            ),
            drift("job-running", None, "QEMU runs job j1 (commit, running)"),
        ]
    );
}
