//! `snapctl commit`, `pull`, `jobs` and `job` against real QEMU (TCG, no
//! guest OS).
//!
//! Every test starts its own one-disk VM (`vda`, 64 MiB, on the foreign
//! `img/base.qcow2`) and builds a history of snapshots with patterns,
//! keeping a table of what each snapshot and the live disk must read
//! ([`History`]). After each operation the data is checked live through the
//! device (HMP `qemu-io`, whose results QEMU prints on its stdout, read once
//! QEMU has quit: [`LiveReads`]) and offline with `qemu-io` on every
//! remaining snapshot's frozen image as `show` reports it afterwards
//! ([`assert_images_read`]), and the bookkeeping against `list`, `show`,
//! `chain`, `check`, the image directory and QEMU's graph.
//!
//! The long jobs are made slow with `--bandwidth 1M` on 32 MiB of data, so
//! that an interruption or a timeout always lands while the job runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration::{QemuBuilder, WorkDir, image};
use serde_json::{Value, json};

use crate::util;
use crate::util::{K64, M1, Tmpfs, Vm, dir_listing};

/// The size of the test disk.
const DISK: u64 = 64 * M1;

/// Where the small writes go (64 KiB each). The last one is never written:
/// it must read zeroes everywhere.
const OFFSETS: [u64; 6] = [0, K64, 2 * K64, 3 * K64, 4 * K64, 5 * K64];

/// The bulk range that makes jobs long: 32 MiB from 16 MiB.
const BULK_OFFSET: u64 = 16 * M1;
const BULK_LEN: u64 = 32 * M1;

/// The pattern of the bulk range when it is written.
const BULK_BYTE: u8 = 0x5a;

/// The foreign base image's file name.
const BASE: &str = "base.qcow2";

/// How long an interrupted or timed-out merge may take to give up.
const GIVE_UP: Duration = Duration::from_secs(10);

/// What the disk reads at one moment: the byte at each of [`OFFSETS`]
/// (absent: zero), and whether the bulk range holds [`BULK_BYTE`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct State {
    small: BTreeMap<u64, u8>,
    bulk: bool,
}

impl State {
    /// Every (offset, length, byte) the disk must read.
    fn reads(&self) -> Vec<(u64, u64, u8)> {
        let mut reads: Vec<(u64, u64, u8)> = OFFSETS
            .iter()
            .map(|&o| (o, K64, self.small.get(&o).copied().unwrap_or(0)))
            .collect();
        let bulk = if self.bulk { BULK_BYTE } else { 0 };
        reads.push((BULK_OFFSET, BULK_LEN, bulk));
        reads
    }
}

/// What the live disk and every snapshot must read.
#[derive(Debug, Default, Clone)]
struct History {
    live: State,
    snapshots: BTreeMap<String, State>,
}

impl History {
    /// Writes `byte` at `offset` (64 KiB) through QEMU, as the guest would.
    fn write(&mut self, vm: &mut Vm, offset: u64, byte: u8) {
        vm.monitor.write("vda", byte, offset, K64);
        self.live.small.insert(offset, byte);
    }

    /// Fills the 32 MiB bulk range through QEMU.
    fn write_bulk(&mut self, vm: &mut Vm) {
        vm.monitor.write("vda", BULK_BYTE, BULK_OFFSET, BULK_LEN);
        self.live.bulk = true;
    }

    /// `snapctl create NAME`, with extra arguments.
    fn create_with(&mut self, vm: &mut Vm, name: &str, extra: &[&str]) {
        vm.snapctl.args(["create", name]).args(extra).ok();
        self.snapshots.insert(name.to_owned(), self.live.clone());
    }

    fn create(&mut self, vm: &mut Vm, name: &str) {
        self.create_with(vm, name, &[]);
    }

    /// After an operation removed `name` from the record.
    fn removed(&mut self, name: &str) {
        self.snapshots
            .remove(name)
            .unwrap_or_else(|| panic!("no snapshot {name} in the history"));
    }

    fn names(&self) -> Vec<String> {
        self.snapshots.keys().cloned().collect()
    }
}

/// A paused VM with one disk, `vda`: one `-blockdev` layer on the foreign
/// `img/base.qcow2` (64 MiB), which holds the bulk pattern when
/// `bulk_in_base`.
fn one_disk(bulk_in_base: bool) -> Vm {
    let dir = WorkDir::new();
    let img = dir.join("img");
    std::fs::create_dir(&img).unwrap();
    let base = img.join(BASE);
    image::create_qcow2(&base, DISK);
    if bulk_in_base {
        image::write_pattern(&base, BULK_BYTE, BULK_OFFSET, BULK_LEN);
    }
    Vm::start(
        dir,
        QemuBuilder::new().blockdev_chain("vda", &[("base", &base)]),
    )
}

/// Registers the VM and takes s1 to s4, each after writes; every step also
/// overwrites offset 0, so each moment reads differently there.
///
/// | when | vda |
/// |---|---|
/// | before s1 | 0x11 at 0 |
/// | before s2 | 0x12 at 0, 0x22 at 64 KiB |
/// | before s3 | 0x13 at 0, 0x33 at 128 KiB |
/// | before s4 | 0x14 at 0, 0x44 at 192 KiB |
/// | after s4 | 0x15 at 0, 0x55 at 256 KiB |
///
/// The chain is then
/// `base (s1) <- vda.s1 (s2) <- vda.s2 (s3) <- vda.s3 (s4) <- vda.s4 (active)`.
fn four_snapshots(vm: &mut Vm) -> History {
    vm.snapctl.args(["init"]).ok();
    let mut history = History::default();
    history.write(vm, 0, 0x11);
    history.create(vm, "s1");
    for (i, name) in ["s2", "s3", "s4"].into_iter().enumerate() {
        let step = i as u8 + 2;
        history.write(vm, 0, 0x10 + step);
        history.write(vm, u64::from(step - 1) * K64, step * 0x11);
        history.create(vm, name);
    }
    history.write(vm, 0, 0x15);
    history.write(vm, 4 * K64, 0x55);
    history
}

/// Registers the VM and takes s1 and s2, with the bulk range written either
/// before s2 (so that it sits in s2's frozen image, below the active image:
/// what a pull copies) or after it (in the active image: what an active
/// commit copies).
///
/// | when | vda |
/// |---|---|
/// | before s1 | 0x11 at 0 |
/// | before s2 | 0x12 at 0, 0x22 at 64 KiB, the bulk range unless `bulk_on_top` |
/// | after s2 | 0x13 at 0, the bulk range if `bulk_on_top` |
///
/// The chain: `base (s1) <- vda.s1 (s2) <- vda.s2 (active)`.
fn bulk_history(vm: &mut Vm, bulk_on_top: bool) -> History {
    vm.snapctl.args(["init"]).ok();
    let mut history = History::default();
    history.write(vm, 0, 0x11);
    history.create(vm, "s1");
    history.write(vm, 0, 0x12);
    history.write(vm, K64, 0x22);
    if !bulk_on_top {
        history.write_bulk(vm);
    }
    history.create(vm, "s2");
    history.write(vm, 0, 0x13);
    if bulk_on_top {
        history.write_bulk(vm);
    }
    history
}

/// Reads through the live device with HMP `qemu-io`. QEMU prints the
/// results on its stdout, which is complete only once QEMU has exited, so
/// the verdict comes from [`LiveReads::assert_ok`] after the quit.
#[derive(Debug, Default)]
struct LiveReads {
    /// One label per read, in the order they were issued.
    reads: Vec<String>,
}

impl LiveReads {
    /// Reads everything `state` says the disk holds.
    fn expect(&mut self, vm: &mut Vm, when: &str, state: &State) {
        for (offset, len, byte) in state.reads() {
            vm.monitor
                .qemu_io("vda", &format!("read -P {byte:#04x} {offset} {len}"));
            self.reads.push(format!(
                "{when}: vda should read {byte:#04x} at {offset} ({len} bytes)"
            ));
        }
    }

    /// After [`Vm::quit`]: every read ran and none saw other bytes.
    fn assert_ok(&self, vm: &Vm) {
        let out = vm.qemu.stdout_text();
        // qemu-io prints "Pattern verification failed ..." before the
        // "read N/N bytes at offset O" line of the read it belongs to.
        let mut verdicts = Vec::new();
        let mut failed = false;
        for line in out.lines() {
            if line.contains("Pattern verification failed") {
                failed = true;
            } else if line.starts_with("read ") && line.contains(" bytes at offset ") {
                verdicts.push(failed);
                failed = false;
            }
        }
        assert_eq!(
            verdicts.len(),
            self.reads.len(),
            "QEMU did not report every live read:\n{out}"
        );
        let wrong: Vec<&str> = verdicts
            .iter()
            .zip(&self.reads)
            .filter(|(failed, _)| **failed)
            .map(|(_, read)| read.as_str())
            .collect();
        assert!(
            wrong.is_empty(),
            "the live device read other data:\n{}\n--- QEMU stdout\n{out}",
            wrong.join("\n")
        );
    }
}

/// A JSON string as a path.
fn path_of(value: &Value) -> PathBuf {
    PathBuf::from(
        value
            .as_str()
            .unwrap_or_else(|| panic!("expected a path, got {value}")),
    )
}

/// vda's chain as `chain --json` gives it, active image first, with where
/// it came from ("qemu" or "images").
fn chain_from(vm: &Vm) -> (Vec<PathBuf>, String) {
    let chain = vm.snapctl.args(["chain"]).json();
    let entries = chain["disks"]["vda"]
        .as_array()
        .unwrap_or_else(|| panic!("chain --json has no vda: {chain}"));
    assert_eq!(
        entries.first().map(|e| &e["active"]),
        Some(&json!(true)),
        "vda's chain does not start with the active image: {chain}"
    );
    let source = chain["source"].as_str().unwrap_or_default().to_owned();
    (
        entries.iter().map(|e| path_of(&e["image"])).collect(),
        source,
    )
}

/// vda's chain, active image first.
fn chain(vm: &Vm) -> Vec<PathBuf> {
    chain_from(vm).0
}

/// `list --json`.
fn list(vm: &Vm) -> Value {
    vm.snapctl.args(["list"]).json()
}

/// The snapshot names `list` reports, sorted.
fn snapshot_names(vm: &Vm) -> Vec<String> {
    let mut names: Vec<String> = list(vm)["snapshots"]
        .as_array()
        .expect("list --json has a snapshots array")
        .iter()
        .map(|s| {
            s["name"]
                .as_str()
                .expect("a snapshot has a name")
                .to_owned()
        })
        .collect();
    names.sort();
    names
}

/// Every snapshot's frozen image of vda, as `list --json` reports them now.
fn frozen_images(vm: &Vm) -> BTreeMap<String, PathBuf> {
    list(vm)["snapshots"]
        .as_array()
        .expect("list --json has a snapshots array")
        .iter()
        .map(|s| {
            let name = s["name"].as_str().expect("a snapshot has a name");
            (name.to_owned(), path_of(&s["disks"]["vda"]["image"]))
        })
        .collect()
}

/// The snapshot's parent in `show --json`.
fn parent(vm: &Vm, name: &str) -> Value {
    vm.snapctl.args(["show", name]).json()["parent"].clone()
}

/// `sha256sum` of a file.
fn sha256(path: &Path) -> String {
    let output = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("run sha256sum");
    assert!(
        output.status.success(),
        "sha256sum {}: {}",
        path.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_owned()
}

/// Every file of the image directory with its digest.
fn directory_digests(vm: &Vm) -> BTreeMap<PathBuf, String> {
    dir_listing(&vm.images())
        .into_iter()
        .map(|name| {
            let path = vm.image(&name);
            let digest = sha256(&path);
            (path, digest)
        })
        .collect()
}

/// `check` exits 0 and reports no drift.
fn assert_check_clean(vm: &Vm, running: bool, after_what: &str) {
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(
        check["qemu_running"], running,
        "{after_what}: check: {check}"
    );
    assert_eq!(check["drift"], json!([]), "{after_what}: check: {check}");
}

/// Offline (`qemu-io -U` on the files): every snapshot of the history reads
/// its data in its frozen image as `show` reports it now, and the active
/// image reads the live data.
fn assert_images_read(vm: &Vm, history: &History) {
    let mut wrong = Vec::new();
    let mut check = |what: &str, image: &Path, state: &State| {
        for (offset, len, byte) in state.reads() {
            if !image::read_pattern_ok(image, byte, offset, len) {
                wrong.push(format!(
                    "{what}: {} should read {byte:#04x} at {offset} ({len} bytes)",
                    image.display()
                ));
            }
        }
    };
    for (name, state) in &history.snapshots {
        let show = vm.snapctl.args(["show", name]).json();
        let image = path_of(&show["disks"]["vda"]["image"]);
        check(&format!("snapshot {name}"), &image, state);
    }
    check("the active image", &chain(vm)[0], &history.live);
    assert!(wrong.is_empty(), "wrong data:\n{}", wrong.join("\n"));
}

/// The image directory holds exactly what the VM needs: the chain, each
/// snapshot's frozen image with its backing chain (from the headers), and
/// the foreign base (never deleted).
fn assert_no_stray_images(vm: &Vm, after_what: &str) {
    let mut needed: BTreeSet<PathBuf> = chain(vm).into_iter().collect();
    for frozen in frozen_images(vm).values() {
        needed.extend(image::backing_chain(frozen));
    }
    let missing: Vec<&PathBuf> = needed.iter().filter(|p| !p.exists()).collect();
    assert!(
        missing.is_empty(),
        "{after_what}: images the VM needs are gone: {missing:?}"
    );
    let base = vm.image(BASE);
    assert!(base.exists(), "{after_what}: the foreign base was deleted");
    let stray: Vec<PathBuf> = dir_listing(&vm.images())
        .into_iter()
        .map(|name| vm.image(&name))
        .filter(|p| !needed.contains(p) && *p != base)
        .collect();
    assert!(
        stray.is_empty(),
        "{after_what}: files nothing needs were left behind: {stray:?}\nneeded: {needed:#?}"
    );
}

/// With QEMU running: the device writes the active image that `chain`
/// reports (from QEMU), no job is left, every node QEMU has open is on a
/// file that still exists, the journal is empty and `check` is clean.
fn assert_live_consistent(vm: &mut Vm, after_what: &str) {
    let (images, source) = chain_from(vm);
    assert_eq!(
        source, "qemu",
        "{after_what}: chain --json is not from QEMU"
    );
    let state = vm.monitor.block_state();
    assert_eq!(
        state.root_file("vda"),
        images[0],
        "{after_what}: the device and chain --json disagree"
    );
    for node in &state.nodes {
        if node.file.starts_with('/') {
            assert!(
                Path::new(&node.file).exists(),
                "{after_what}: QEMU still has node {} open on a deleted file {}",
                node.name,
                node.file
            );
        }
    }
    assert_eq!(
        vm.monitor.jobs(),
        Vec::<Value>::new(),
        "{after_what}: QEMU still has jobs"
    );
    assert_eq!(
        vm.snapctl.record()["journal"],
        json!([]),
        "{after_what}: the journal is not resolved"
    );
    assert_check_clean(vm, true, after_what);
}

/// With QEMU stopped: the chain the headers describe is the one `chain`
/// reports.
fn assert_headers_match_chain(vm: &Vm) {
    let (images, source) = chain_from(vm);
    assert_eq!(source, "images");
    assert_eq!(
        image::backing_chain(&images[0]),
        images,
        "the headers describe another chain than chain --json"
    );
}

/// The names in a `removed_snapshots` JSON array.
fn name_set(value: &Value) -> BTreeSet<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("expected an array of names, got {value}"))
        .iter()
        .map(|v| v.as_str().expect("a name").to_owned())
        .collect()
}

/// The snapshots whose frozen image is one of `layers`.
fn holding(frozen: &BTreeMap<String, PathBuf>, layers: &[PathBuf]) -> BTreeSet<String> {
    frozen
        .iter()
        .filter(|(_, image)| layers.contains(image))
        .map(|(name, _)| name.clone())
        .collect()
}

/// Makes QEMU write out what it caches for the disk, so that the files'
/// bytes stay put while nothing changes.
fn flush(vm: &mut Vm) {
    vm.monitor.qemu_io("vda", "flush");
}

/// `commit vda --top s4 --base s2` on the four-snapshot history: s4's
/// frozen image (vda.s3) and the layer below it (vda.s2, s3's) are merged
/// into vda.s1 (s2's). Checks the report and the record; returns the new
/// history.
fn commit_s4_into_s2(vm: &mut Vm, mut history: History) -> History {
    let before = chain(vm);
    let frozen = frozen_images(vm);
    let top = &frozen["s4"];
    let base = &frozen["s2"];
    let t = before
        .iter()
        .position(|p| p == top)
        .expect("s4's image in the chain");
    let b = before
        .iter()
        .position(|p| p == base)
        .expect("s2's image in the chain");
    // The snapshots whose frozen image was the base or a merged layer below
    // the top: their state is gone.
    let gone = holding(&frozen, &before[t + 1..=b]);
    assert_eq!(gone, BTreeSet::from(["s2".to_owned(), "s3".to_owned()]));

    let report = vm
        .snapctl
        .args(["commit", "vda", "--top", "s4", "--base", "s2"])
        .json();
    assert_eq!(
        name_set(&report["removed_snapshots"]),
        gone,
        "commit --json: {report}"
    );
    for name in &gone {
        history.removed(name);
    }

    assert_eq!(snapshot_names(vm), history.names());
    let after = frozen_images(vm);
    assert_eq!(after["s4"], *base, "s4 now points at the base");
    assert_eq!(after["s1"], frozen["s1"], "s1 keeps its frozen image");
    assert_eq!(
        parent(vm, "s4"),
        "s1",
        "s4's parent was removed: it moves up"
    );
    assert_eq!(list(vm)["current"], "s4");
    let mut expected = before[..t].to_vec();
    expected.extend_from_slice(&before[b..]);
    assert_eq!(chain(vm), expected, "the merged layers left the chain");
    assert!(
        !before[t].exists(),
        "the top layer {} was merged away but kept",
        before[t].display()
    );
    history
}

/// The layers that left vda's chain are closed in QEMU: it has no node open
/// on an image file outside the chain.
fn assert_no_nodes_outside_chain(vm: &mut Vm, after_what: &str) {
    let images = chain(vm);
    let outside: Vec<String> = vm
        .monitor
        .block_state()
        .nodes
        .into_iter()
        .filter(|n| n.file.starts_with('/') && !images.contains(&PathBuf::from(&n.file)))
        .map(|n| format!("{} ({}) on {}", n.name, n.driver, n.file))
        .collect();
    assert!(
        outside.is_empty(),
        "{after_what}: QEMU still has nodes open on layers that left the chain:\n{}",
        outside.join("\n")
    );
}

#[test]
fn commit_with_base_live() {
    let mut vm = one_disk(false);
    let history = four_snapshots(&mut vm);
    let base_digest = sha256(&vm.image(BASE));

    let mut history = commit_s4_into_s2(&mut vm, history);

    // (The layers it merged are checked by
    // commit_with_base_live_closes_and_removes_the_merged_layers.)
    assert_live_consistent(&mut vm, "commit --top s4 --base s2");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after the commit", &history.live);
    // The device keeps working on its new chain.
    history.write(&mut vm, 5 * K64, 0x66);
    reads.expect(&mut vm, "after a write following the commit", &history.live);

    vm.quit();
    reads.assert_ok(&vm);
    assert_images_read(&vm, &history);
    assert_headers_match_chain(&vm);
    assert_check_clean(&vm, false, "after quit");
    assert_eq!(
        sha256(&vm.image(BASE)),
        base_digest,
        "the foreign base was written"
    );
}

/// An intermediate commit merges two layers (vda.s3 and vda.s2) into
/// vda.s1: both must be closed in QEMU and their files removed.
#[test]
fn commit_with_base_live_closes_and_removes_the_merged_layers() {
    let mut vm = one_disk(false);
    let history = four_snapshots(&mut vm);
    let before = chain(&vm);

    commit_s4_into_s2(&mut vm, history);

    assert_no_nodes_outside_chain(&mut vm, "commit --top s4 --base s2");
    for layer in &before[1..3] {
        assert!(
            !layer.exists(),
            "{} was merged away but kept",
            layer.display()
        );
    }
    assert_no_stray_images(&vm, "commit --top s4 --base s2");
}

#[test]
fn commit_offline() {
    let mut vm = one_disk(false);
    let history = four_snapshots(&mut vm);
    vm.quit();
    let base_digest = sha256(&vm.image(BASE));

    let history = commit_s4_into_s2(&mut vm, history);

    assert_headers_match_chain(&vm);
    assert_no_stray_images(&vm, "offline commit --top s4 --base s2");
    assert_eq!(vm.snapctl.record()["journal"], json!([]));
    assert_images_read(&vm, &history);
    assert_check_clean(&vm, false, "offline commit");
    assert_eq!(
        sha256(&vm.image(BASE)),
        base_digest,
        "the foreign base was written"
    );
}

#[test]
fn commit_into_the_foreign_base_is_refused() {
    let mut vm = one_disk(false);
    let history = four_snapshots(&mut vm);
    flush(&mut vm);
    let before = vm.untouched_state();
    let files = directory_digests(&vm);

    // s1 froze the foreign base: no commit may write it, whatever the top.
    let cases: [&[&str]; 3] = [
        &["commit", "vda", "--base", "s1"],
        &["commit", "vda", "--top", "s3", "--base", "s1"],
        &["commit", "vda", "--top", "s2"],
    ];
    for args in cases {
        let mut cmd = vm.snapctl.args(args);
        let what = cmd.command_line();
        cmd.error_line(&["foreign"]);
        vm.assert_untouched(&before, &what);
        assert_eq!(directory_digests(&vm), files, "{what} changed the images");
    }
    assert_eq!(vm.monitor.jobs(), Vec::<Value>::new());

    vm.quit();
    let record = vm.snapctl.record_bytes();
    let files = directory_digests(&vm);
    for args in cases {
        let mut cmd = vm.snapctl.args(args);
        let what = cmd.command_line();
        cmd.error_line(&["foreign"]);
        assert!(
            vm.snapctl.record_bytes() == record,
            "{what} changed the record"
        );
        assert_eq!(directory_digests(&vm), files, "{what} changed the images");
    }
    assert_images_read(&vm, &history);
}

#[test]
fn pull_with_base_live() {
    let mut vm = one_disk(false);
    let history = four_snapshots(&mut vm);
    flush(&mut vm);
    let before = chain(&vm);
    let frozen = frozen_images(&vm);
    let digests: BTreeMap<&PathBuf, String> = frozen.values().map(|p| (p, sha256(p))).collect();

    let report = vm.snapctl.args(["pull", "vda", "--base", "s1"]).json();
    assert_eq!(
        report["removed_snapshots"],
        json!([]),
        "pull --json: {report}"
    );

    // The active image now sits directly on s1's frozen image.
    assert_eq!(chain(&vm), [before[0].clone(), frozen["s1"].clone()]);
    assert_eq!(
        snapshot_names(&vm),
        history.names(),
        "pull removes no snapshot"
    );
    assert_eq!(frozen_images(&vm), frozen, "frozen images moved");
    let now: BTreeMap<&PathBuf, String> = frozen.values().map(|p| (p, sha256(p))).collect();
    assert_eq!(now, digests, "pull wrote a frozen image");
    assert_live_consistent(&mut vm, "pull --base s1");
    assert_no_stray_images(&vm, "pull --base s1");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after the pull", &history.live);

    vm.quit();
    reads.assert_ok(&vm);
    assert_images_read(&vm, &history);
    assert_headers_match_chain(&vm);
    assert_check_clean(&vm, false, "after quit");
}

/// After `pull vda --base s1` the layers between the active image and s1's
/// frozen image have left the chain: QEMU must close them, or their write
/// locks make later offline merges of them (deleting the snapshots that
/// hold them) fail.
#[test]
fn pull_with_base_live_closes_the_layers_it_leaves() {
    let mut vm = one_disk(false);
    let mut history = four_snapshots(&mut vm);

    vm.snapctl.args(["pull", "vda", "--base", "s1"]).ok();

    assert_no_nodes_outside_chain(&mut vm, "pull --base s1");
    for name in ["s3", "s2"] {
        vm.snapctl.args(["delete", name]).ok();
        history.removed(name);
    }
    assert_eq!(snapshot_names(&vm), history.names());
    assert_live_consistent(&mut vm, "pull --base s1, then delete s3 and s2");
    assert_no_stray_images(&vm, "pull --base s1, then delete s3 and s2");
    vm.quit();
    assert_images_read(&vm, &history);
}

#[test]
fn pull_all_offline() {
    let mut vm = one_disk(false);
    let history = four_snapshots(&mut vm);
    vm.quit();
    let active = chain(&vm)[0].clone();
    let frozen = frozen_images(&vm);
    let digests: BTreeMap<&PathBuf, String> = frozen.values().map(|p| (p, sha256(p))).collect();

    let report = vm.snapctl.args(["pull", "vda"]).json();
    assert_eq!(
        report["removed_snapshots"],
        json!([]),
        "pull --json: {report}"
    );

    // The active image stands alone.
    assert_eq!(chain(&vm), std::slice::from_ref(&active));
    assert_eq!(
        image::backing_file(&active),
        None,
        "the header still names a backing file"
    );
    assert_eq!(
        snapshot_names(&vm),
        history.names(),
        "pull removes no snapshot"
    );
    assert_eq!(frozen_images(&vm), frozen, "frozen images moved");
    let now: BTreeMap<&PathBuf, String> = frozen.values().map(|p| (p, sha256(p))).collect();
    assert_eq!(
        now, digests,
        "pull wrote a frozen image (or the foreign base)"
    );
    assert_headers_match_chain(&vm);
    assert_no_stray_images(&vm, "offline pull");
    assert_images_read(&vm, &history);
    assert_check_clean(&vm, false, "offline pull");
}

/// Starts `snapctl ARGS` in the background, waits until QEMU runs its job
/// and at least `after` has passed, and checks (through the test's own
/// monitor: snapctl's is busy) that the job is running and unfinished.
fn start_slow_job(vm: &mut Vm, args: &[&str], after: Duration) -> util::Background {
    let mut child = vm.snapctl.args(args).spawn();
    let started = integration::wait_until(Duration::from_secs(10), || {
        !vm.monitor.jobs().is_empty() || !child.is_running()
    });
    assert!(
        started,
        "no job appeared within 10 s of {}",
        util::command_line(child.command())
    );
    assert!(
        child.is_running(),
        "snapctl ended before its job could be watched"
    );
    if let Some(rest) = after.checked_sub(child.elapsed()) {
        std::thread::sleep(rest);
    }
    let jobs = vm.monitor.jobs();
    assert_eq!(jobs.len(), 1, "query-jobs: {jobs:?}");
    let job = &jobs[0];
    assert_eq!(job["status"], "running", "query-jobs: {job}");
    let (current, total) = (
        job["current-progress"].as_u64().unwrap_or_default(),
        job["total-progress"].as_u64().unwrap_or_default(),
    );
    assert!(
        total > 0 && current < total,
        "the job should be under way: {job}"
    );
    child
}

#[test]
fn cancel_mid_pull() {
    let mut vm = one_disk(false);
    // The bulk range sits in s2's frozen image: the pull has 32 MiB to copy.
    let history = bulk_history(&mut vm, false);
    flush(&mut vm);
    let record = vm.snapctl.record();
    let before = chain(&vm);
    let frozen = frozen_images(&vm);

    let child = start_slow_job(
        &mut vm,
        &["pull", "vda", "--bandwidth", "1M"],
        Duration::from_millis(1500),
    );
    let interrupted = Instant::now();
    child.interrupt();
    let line = child.error_line_after_progress(GIVE_UP, &["interrupted"]);
    assert!(
        interrupted.elapsed() < Duration::from_secs(5),
        "the interrupted pull took {:?} to stop",
        interrupted.elapsed()
    );

    // A stream writes only what the active image already shows: nothing
    // was lost, no snapshot removed, the chain is as it was.
    assert_eq!(vm.snapctl.record(), record, "the record changed: {line}");
    assert_eq!(chain(&vm), before);
    assert_eq!(frozen_images(&vm), frozen);
    assert_live_consistent(&mut vm, "an interrupted pull");
    assert_no_stray_images(&vm, "an interrupted pull");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after the interrupted pull", &history.live);

    vm.quit();
    reads.assert_ok(&vm);
    assert_images_read(&vm, &history);
    assert_headers_match_chain(&vm);
    assert_check_clean(&vm, false, "after quit");
}

/// An active commit interrupted mid-way has written part of the active
/// layer into s2's frozen image: s2 (the current snapshot) must leave the
/// record, its place taken by its parent, and the record stay valid.
#[test]
fn cancel_mid_active_commit() {
    let mut vm = one_disk(false);
    // The bulk range sits in the active image: the active commit into s2's
    // frozen image has 32 MiB to copy.
    let mut history = bulk_history(&mut vm, true);
    let before = chain(&vm);
    let frozen = frozen_images(&vm);
    assert_eq!(before[1], frozen["s2"]);

    let child = start_slow_job(
        &mut vm,
        &["commit", "vda", "--bandwidth", "1M"],
        Duration::from_millis(1500),
    );
    child.interrupt();
    // The commit has written part of the active layer into s2's frozen
    // image, so s2's state is gone and the record says so.
    let line = child.error_line_after_progress(GIVE_UP, &["s2", "removed"]);
    assert!(
        !line.contains("nothing was changed"),
        "the error line says nothing was changed, yet s2 was removed: {line}"
    );
    history.removed("s2");

    assert_eq!(snapshot_names(&vm), history.names(), "after: {line}");
    assert_eq!(
        chain(&vm),
        before,
        "a cancelled commit leaves the chain as it was"
    );
    assert_eq!(
        list(&vm)["current"],
        "s1",
        "s2 was current; its parent takes over"
    );
    assert_live_consistent(&mut vm, "an interrupted active commit");
    assert_no_stray_images(&vm, "an interrupted active commit");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after the interrupted commit", &history.live);

    vm.quit();
    reads.assert_ok(&vm);
    assert_images_read(&vm, &history);
    assert_headers_match_chain(&vm);
    assert_check_clean(&vm, false, "after quit");
}

/// The same interruption where the commit's base is a layer no snapshot
/// holds any more (`delete s2 --metadata-only` kept s2's frozen image): the
/// job is cancelled cleanly, no snapshot is removed, the chain and the
/// record stay as they were and the device still reads the latest data.
#[test]
fn cancel_mid_active_commit_into_a_layer_no_snapshot_holds() {
    let mut vm = one_disk(false);
    let mut history = bulk_history(&mut vm, true);
    vm.snapctl.args(["delete", "s2", "--metadata-only"]).ok();
    history.removed("s2");
    let before = chain(&vm);
    let record = vm.snapctl.record();
    assert_eq!(record["current"], "s1");

    let child = start_slow_job(
        &mut vm,
        &["commit", "vda", "--bandwidth", "1M"],
        Duration::from_millis(1500),
    );
    let interrupted = Instant::now();
    child.interrupt();
    let line = child.error_line_after_progress(GIVE_UP, &["cancelled", "no snapshot"]);
    assert!(
        interrupted.elapsed() < Duration::from_secs(5),
        "the interrupted commit took {:?} to stop",
        interrupted.elapsed()
    );

    assert_eq!(vm.snapctl.record(), record, "the record changed: {line}");
    assert_eq!(
        chain(&vm),
        before,
        "a cancelled commit leaves the chain as it was"
    );
    assert_live_consistent(&mut vm, "an interrupted active commit");
    assert_no_stray_images(&vm, "an interrupted active commit");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after the interrupted commit", &history.live);

    vm.quit();
    reads.assert_ok(&vm);
    assert_images_read(&vm, &history);
    assert_headers_match_chain(&vm);
    assert_check_clean(&vm, false, "after quit");
}

#[test]
fn timeout_cancels_cleanly() {
    let mut vm = one_disk(false);
    let history = bulk_history(&mut vm, false);
    flush(&mut vm);
    let record = vm.snapctl.record();
    let before = chain(&vm);

    let started = Instant::now();
    let mut cmd = vm
        .snapctl
        .args(["pull", "vda", "--bandwidth", "1M", "--timeout", "1"]);
    let line = cmd.error_line_after_progress(&["did not finish"]);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(6),
        "pull --timeout 1 took {took:?} to give up: {line}"
    );

    assert_eq!(vm.snapctl.record(), record, "the record changed: {line}");
    assert_eq!(chain(&vm), before);
    assert_live_consistent(&mut vm, "a timed-out pull");
    assert_no_stray_images(&vm, "a timed-out pull");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after the timed-out pull", &history.live);

    vm.quit();
    reads.assert_ok(&vm);
    assert_images_read(&vm, &history);
    assert_check_clean(&vm, false, "after quit");
}

/// A stream into an active image on a full filesystem fails inside QEMU
/// with ENOSPC. snapctl must pass QEMU's error on as its one error line and
/// leave the record as it was: a failed stream has only written, into the
/// active image, data that image already showed.
///
/// The failure is real, not simulated: s1's overlay (the active image) is
/// put on a 1 MiB tmpfs, and the pull has 32 MiB of the foreign base to
/// copy into it. (Injecting errors with `blkdebug` would make QEMU report
/// the image's name as a `json:{…}` pseudo-filename, which snapctl rightly
/// does not recognise as a recorded layer.)
#[test]
fn failing_job_reports_qemu_error_and_changes_no_record() {
    let small = WorkDir::new();
    let tmpfs = Tmpfs::mount(small.join("full"), "1M");
    let mut vm = one_disk(true);
    vm.snapctl.args(["init"]).ok();
    let mut history = History::default();
    history.live.bulk = true;
    let overlay = tmpfs.path.join("vda.s1.qcow2");
    history.create_with(
        &mut vm,
        "s1",
        &["--overlay", &format!("vda={}", overlay.display())],
    );
    history.write(&mut vm, 0, 0x13);
    flush(&mut vm);
    assert_eq!(chain(&vm), [overlay.clone(), vm.image(BASE)]);
    let record = vm.snapctl.record();
    let base_digest = sha256(&vm.image(BASE));

    let line = vm
        .snapctl
        .args(["pull", "vda"])
        .error_line_after_progress(&["No space left on device"]);

    assert_eq!(vm.snapctl.record(), record, "the record changed: {line}");
    assert_eq!(chain(&vm), [overlay.clone(), vm.image(BASE)]);
    assert_eq!(
        vm.monitor.jobs(),
        Vec::<Value>::new(),
        "a failed job was left"
    );
    assert_live_consistent(&mut vm, "a failed pull");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after the failed pull", &history.live);

    vm.quit();
    reads.assert_ok(&vm);
    assert_images_read(&vm, &history);
    assert_headers_match_chain(&vm);
    assert_check_clean(&vm, false, "after quit");
    assert_eq!(
        sha256(&vm.image(BASE)),
        base_digest,
        "the foreign base was written"
    );
    drop(vm);
    drop(tmpfs);
}

#[test]
fn jobs_lists_and_job_wait() {
    let mut vm = one_disk(false);
    vm.snapctl.args(["init"]).ok();
    // 8 MiB below the active image: a stream of it at 1 MiB/s takes 8 s.
    vm.monitor.write("vda", BULK_BYTE, BULK_OFFSET, 8 * M1);
    vm.snapctl.args(["create", "s1"]).ok();
    vm.monitor.write("vda", 0x13, 0, K64);
    let before = chain(&vm);
    let record = vm.snapctl.record();

    let none = vm.snapctl.args(["jobs"]).json();
    assert_eq!(none, json!({ "jobs": [] }));

    let active = vm.monitor.block_state().roots["vda"].node.clone();
    vm.monitor.ok(
        "block-stream",
        json!({ "job-id": "slow", "device": active, "speed": M1 }),
    );

    let listed = vm.snapctl.args(["jobs"]).json();
    let jobs = listed["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("jobs --json: {listed}"));
    assert_eq!(jobs.len(), 1, "jobs --json: {listed}");
    assert_eq!(jobs[0]["id"], "slow", "jobs --json: {listed}");
    assert_eq!(jobs[0]["type"], "stream", "jobs --json: {listed}");
    assert_eq!(jobs[0]["status"], "running", "jobs --json: {listed}");
    assert!(
        jobs[0]["total"].as_u64().is_some_and(|t| t > 0),
        "jobs --json: {listed}"
    );
    let text = vm.snapctl.args(["jobs"]).stdout();
    assert!(
        text.contains("slow") && text.contains("stream"),
        "jobs:\n{text}"
    );

    // check sees it; a pull refuses to start beside it.
    let check = vm.snapctl.args(["check", "--json"]).run();
    assert_eq!(
        check.status.code(),
        Some(3),
        "check with a job running: {check:?}"
    );
    assert!(
        String::from_utf8_lossy(&check.stdout).contains("slow"),
        "check does not name the job: {check:?}"
    );
    vm.snapctl.args(["pull", "vda"]).error_line(&["slow"]);

    let started = Instant::now();
    let line = vm
        .snapctl
        .args(["job", "wait", "slow", "--timeout", "1"])
        .error_line(&["slow"]);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "job wait --timeout 1 took {:?}: {line}",
        started.elapsed()
    );
    let jobs = vm.monitor.jobs();
    assert_eq!(
        jobs.len(),
        1,
        "job wait must leave the job running: {jobs:?}"
    );
    assert_eq!(jobs[0]["status"], "running", "{jobs:?}");

    vm.snapctl.args(["job", "cancel", "slow"]).ok();
    assert_eq!(vm.monitor.jobs(), Vec::<Value>::new());
    assert_eq!(vm.snapctl.args(["jobs"]).json(), json!({ "jobs": [] }));
    assert!(vm.snapctl.args(["jobs"]).stdout().contains("no jobs"));
    vm.snapctl
        .args(["job", "cancel", "slow"])
        .error_line(&["slow"]);
    vm.snapctl
        .args(["job", "wait", "slow"])
        .error_line(&["slow"]);

    // A cancelled stream leaves the chain as it was.
    assert_eq!(chain(&vm), before);
    assert_eq!(vm.snapctl.record(), record);
    assert_live_consistent(&mut vm, "a cancelled job");
    vm.quit();
    // The active image reads the 8 MiB written before s1 and 0x13 at 0;
    // s1's frozen image the 8 MiB and zeroes at 0.
    for image in [&before[0], &before[1]] {
        assert!(image::read_pattern_ok(
            image,
            BULK_BYTE,
            BULK_OFFSET,
            8 * M1
        ));
        assert!(image::read_pattern_ok(
            image,
            0,
            BULK_OFFSET + 8 * M1,
            8 * M1
        ));
    }
    assert!(image::read_pattern_ok(&before[0], 0x13, 0, K64));
    assert!(image::read_pattern_ok(&before[1], 0, 0, K64));
    assert_check_clean(&vm, false, "after quit");
}
