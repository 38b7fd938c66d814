//! `snapctl revert` and `snapctl delete` against real QEMU (TCG, no guest OS).
//!
//! Every test starts its own two-disk VM and builds the same history with
//! [`three_snapshots`], keeping a table of what each snapshot and the live
//! disks must read ([`History`]). After each operation the tests check the
//! data three ways: live through the device (HMP `qemu-io`, whose results
//! QEMU prints on its stdout, read once QEMU has quit: [`LiveReads`]), and
//! offline with `qemu-io` on every remaining snapshot's frozen images as
//! `show` reports them after the operation ([`assert_images_read`]), and
//! against the bookkeeping: `list`, `show`, `chain`, `check`, the image
//! directory and QEMU's graph.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use integration::{QemuBuilder, WorkDir, image};
use serde_json::{Value, json};

use crate::util::{DISK_SIZE, K64, M1, Vm, dir_listing};

/// The disks of the test VM.
const DISKS: [&str; 2] = ["vda", "vdb"];

/// Where the tests write (each a 64 KiB range) and read back. The last one
/// is never written: it must read zeroes everywhere.
const OFFSETS: [u64; 5] = [0, K64, 2 * K64, 3 * K64, 4 * K64];

/// The foreign images of the test VM: found by snapctl, never written by it.
const FOREIGN: [&str; 3] = ["base.qcow2", "data.qcow2", "data-base.qcow2"];

/// What the guest reads at [`OFFSETS`] at one moment, as vda's byte per
/// offset (absent: zero). vdb holds the same with the high bit set, see
/// [`disk_byte`].
type State = BTreeMap<u64, u8>;

/// The byte a write of `byte` puts on `disk`: vdb's differ from vda's so
/// that data landing on the wrong disk shows.
fn disk_byte(disk: &str, byte: u8) -> u8 {
    if disk == "vdb" && byte != 0 {
        byte | 0x80
    } else {
        byte
    }
}

/// Every (offset, byte) that `disk` must read in `state`, including the
/// 0x07 at 2 MiB that vdb's foreign base holds.
fn expected(disk: &str, state: &State) -> Vec<(u64, u8)> {
    let mut reads: Vec<(u64, u8)> = OFFSETS
        .iter()
        .map(|&offset| {
            let byte = state.get(&offset).copied().unwrap_or(0);
            (offset, disk_byte(disk, byte))
        })
        .collect();
    if disk == "vdb" {
        reads.push((2 * M1, 0x07));
    }
    reads
}

/// What the live disks and every snapshot must read.
#[derive(Debug, Default, Clone)]
struct History {
    live: State,
    snapshots: BTreeMap<String, State>,
}

impl History {
    /// Writes `byte` at `offset` on both disks through QEMU, as the guest would.
    fn write(&mut self, vm: &mut Vm, offset: u64, byte: u8) {
        for disk in DISKS {
            vm.monitor.write(disk, disk_byte(disk, byte), offset, K64);
        }
        self.live.insert(offset, byte);
    }

    /// `snapctl create NAME`.
    fn create(&mut self, vm: &mut Vm, name: &str) {
        vm.snapctl.args(["create", name]).ok();
        self.snapshots.insert(name.to_owned(), self.live.clone());
    }

    /// After a revert to `name`: the disks read that snapshot's data again.
    fn reverted(&mut self, name: &str) {
        self.live = self.snapshots[name].clone();
    }

    /// After a delete of `name`.
    fn deleted(&mut self, name: &str) {
        self.snapshots
            .remove(name)
            .unwrap_or_else(|| panic!("no snapshot {name} in the history"));
    }

    fn names(&self) -> Vec<String> {
        self.snapshots.keys().cloned().collect()
    }
}

/// Registers the VM and takes s1, s2, s3, each after writes; every step also
/// overwrites offset 0, so each moment reads differently there.
///
/// | when | vda (vdb: the same bytes with the high bit set) |
/// |---|---|
/// | before s1 | 0x11 at 0 |
/// | before s2 | 0x12 at 0, 0x22 at 64 KiB |
/// | before s3 | 0x13 at 0, 0x33 at 128 KiB |
/// | after s3 | 0x14 at 0, 0x44 at 192 KiB |
///
/// The chains are then, per disk (vdb: `data.qcow2` over `data-base.qcow2`
/// where vda has `base.qcow2`):
/// `base (s1) <- vda.s1 (s2) <- vda.s2 (s3) <- vda.s3 (active)`.
fn three_snapshots(vm: &mut Vm) -> History {
    vm.snapctl.args(["init"]).ok();
    let mut history = History::default();
    history.write(vm, 0, 0x11);
    history.create(vm, "s1");
    history.write(vm, 0, 0x12);
    history.write(vm, K64, 0x22);
    history.create(vm, "s2");
    history.write(vm, 0, 0x13);
    history.write(vm, 2 * K64, 0x33);
    history.create(vm, "s3");
    history.write(vm, 0, 0x14);
    history.write(vm, 3 * K64, 0x44);
    history
}

/// The standard two-disk VM (see [`Vm::two_disks`]) with its CPUs running
/// from the start instead of paused (`-S`).
fn two_disks_running() -> Vm {
    let dir = WorkDir::new();
    let img = dir.join("img");
    std::fs::create_dir(&img).unwrap();
    let base = img.join("base.qcow2");
    let data_base = img.join("data-base.qcow2");
    let data = img.join("data.qcow2");
    image::create_qcow2(&base, DISK_SIZE);
    image::create_qcow2(&data_base, DISK_SIZE);
    image::write_pattern(&data_base, 0x07, 2 * M1, K64);
    image::create_overlay(&data, &data_base, "qcow2");
    let builder = QemuBuilder::new()
        .paused(false)
        .blockdev_chain("vda", &[("base", &base)])
        .drive("drive-vdb", "vdb", &data);
    Vm::start(dir, builder)
}

/// Reads through the live devices with HMP `qemu-io`. QEMU prints the
/// results on its stdout, which is complete only once QEMU has exited, so
/// the verdict comes from [`LiveReads::assert_ok`] after the quit.
#[derive(Debug, Default)]
struct LiveReads {
    /// One label per read, in the order they were issued.
    reads: Vec<String>,
}

impl LiveReads {
    /// Reads every offset of `state` on both disks, expecting its bytes.
    fn expect(&mut self, vm: &mut Vm, when: &str, state: &State) {
        for disk in DISKS {
            for (offset, byte) in expected(disk, state) {
                vm.monitor
                    .qemu_io(disk, &format!("read -P {byte:#04x} {offset} {K64}"));
                self.reads.push(format!(
                    "{when}: {disk} should read {byte:#04x} at {offset}"
                ));
            }
        }
    }

    /// After [`Vm::quit`]: every read ran and none saw other bytes.
    fn assert_ok(&self, vm: &Vm) {
        let out = vm.qemu.stdout_text();
        let report = format!("read {K64}/{K64} bytes at offset ");
        // The text before the n-th report belongs to the n-th read: a
        // pattern mismatch is printed just before its report.
        let segments: Vec<&str> = out.split(&report).collect();
        assert_eq!(
            segments.len() - 1,
            self.reads.len(),
            "QEMU did not report every live read:\n{out}"
        );
        let wrong: Vec<&String> = segments
            .iter()
            .zip(&self.reads)
            .filter(|(text, _)| text.contains("Pattern verification failed"))
            .map(|(_, read)| read)
            .collect();
        assert!(
            wrong.is_empty(),
            "the live device read other data:\n{}\n--- QEMU stdout\n{out}",
            wrong
                .iter()
                .map(|r| r.as_str())
                .collect::<Vec<_>>()
                .join("\n")
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

/// Each disk's chain as `chain --json` gives it, active image first.
fn chains(vm: &Vm) -> BTreeMap<String, Vec<PathBuf>> {
    let chain = vm.snapctl.args(["chain"]).json();
    chain_paths(&chain)
}

fn chain_paths(chain: &Value) -> BTreeMap<String, Vec<PathBuf>> {
    let disks = chain["disks"]
        .as_object()
        .unwrap_or_else(|| panic!("chain --json has no disks: {chain}"));
    disks
        .iter()
        .map(|(disk, entries)| {
            let entries = entries
                .as_array()
                .unwrap_or_else(|| panic!("{disk}'s chain is not an array: {chain}"));
            assert_eq!(
                entries.first().map(|e| &e["active"]),
                Some(&json!(true)),
                "{disk}'s chain does not start with the active image: {chain}"
            );
            let images = entries.iter().map(|e| path_of(&e["image"])).collect();
            (disk.clone(), images)
        })
        .collect()
}

/// Each disk's active image, from `chain --json`.
fn actives(vm: &Vm) -> BTreeMap<String, PathBuf> {
    chains(vm)
        .into_iter()
        .map(|(disk, chain)| (disk, chain[0].clone()))
        .collect()
}

/// `list --json`.
fn list(vm: &Vm) -> Value {
    vm.snapctl.args(["list"]).json()
}

/// The snapshot names `list` reports, in its order.
fn snapshot_names(vm: &Vm) -> Vec<String> {
    list(vm)["snapshots"]
        .as_array()
        .expect("list --json has a snapshots array")
        .iter()
        .map(|s| {
            s["name"]
                .as_str()
                .expect("a snapshot has a name")
                .to_owned()
        })
        .collect()
}

/// Every snapshot's frozen image per disk, as `list --json` reports them now.
fn frozen_images(vm: &Vm) -> BTreeMap<(String, String), PathBuf> {
    let list = list(vm);
    let mut frozen = BTreeMap::new();
    for s in list["snapshots"].as_array().expect("snapshots array") {
        let name = s["name"].as_str().expect("a snapshot has a name");
        let disks = s["disks"]
            .as_object()
            .unwrap_or_else(|| panic!("snapshot {name} has no disks: {s}"));
        for (disk, d) in disks {
            frozen.insert((name.to_owned(), disk.clone()), path_of(&d["image"]));
        }
    }
    frozen
}

/// `sha256sum` of each file.
fn digests<'a>(paths: impl IntoIterator<Item = &'a PathBuf>) -> BTreeMap<PathBuf, String> {
    paths
        .into_iter()
        .map(|path| {
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
            let digest = String::from_utf8_lossy(&output.stdout)
                .split_whitespace()
                .next()
                .unwrap_or_default()
                .to_owned();
            (path.clone(), digest)
        })
        .collect()
}

/// The foreign images' digests.
fn foreign_digests(vm: &Vm) -> BTreeMap<PathBuf, String> {
    digests(&FOREIGN.map(|f| vm.image(f)))
}

/// Every file of the image directory with its digest.
fn directory_digests(vm: &Vm) -> BTreeMap<PathBuf, String> {
    let files: Vec<PathBuf> = dir_listing(&vm.images())
        .into_iter()
        .map(|name| vm.image(&name))
        .collect();
    digests(&files)
}

/// Makes QEMU write out everything it caches for the disks, so that the
/// files' bytes stay put while nothing changes.
fn flush(vm: &mut Vm) {
    for disk in DISKS {
        vm.monitor.qemu_io(disk, "flush");
    }
}

/// QEMU's run state (`query-status`).
fn run_state(vm: &mut Vm) -> String {
    vm.monitor.ok("query-status", Value::Null)["status"]
        .as_str()
        .expect("query-status has a status")
        .to_owned()
}

/// `check` exits 0 and reports no drift.
fn assert_check_clean(vm: &Vm, running: bool) {
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["qemu_running"], running, "check: {check}");
    assert_eq!(check["drift"], json!([]), "check: {check}");
}

/// Offline (`qemu-io -U` on the files): every snapshot of the history reads
/// its data in its frozen images as `show` reports them now, and each
/// disk's active image reads the live data.
fn assert_images_read(vm: &Vm, history: &History) {
    let mut wrong = Vec::new();
    let mut check = |what: &str, disk: &str, image: &Path, state: &State| {
        for (offset, byte) in expected(disk, state) {
            if !image::read_pattern_ok(image, byte, offset, K64) {
                wrong.push(format!(
                    "{what}: {disk}'s {} should read {byte:#04x} at {offset}",
                    image.display()
                ));
            }
        }
    };
    for (name, state) in &history.snapshots {
        let show = vm.snapctl.args(["show", name]).json();
        for disk in DISKS {
            let image = path_of(&show["disks"][disk]["image"]);
            check(&format!("snapshot {name}"), disk, &image, state);
        }
    }
    for (disk, active) in actives(vm) {
        check("the active image", &disk, &active, &history.live);
    }
    assert!(wrong.is_empty(), "wrong data:\n{}", wrong.join("\n"));
}

/// The image directory holds exactly what the VM needs: each disk's chain,
/// each snapshot's frozen images with their backing chains (from the
/// headers), and the foreign images (never deleted). Nothing is missing and
/// no abandoned or merged-away file is left behind.
fn assert_no_stray_images(vm: &Vm, after_what: &str) {
    let mut needed = BTreeSet::new();
    for (_, chain) in chains(vm) {
        needed.extend(chain);
    }
    for (_, frozen) in frozen_images(vm) {
        needed.extend(image::backing_chain(&frozen));
    }
    let present: BTreeSet<PathBuf> = dir_listing(&vm.images())
        .into_iter()
        .map(|name| vm.image(&name))
        .collect();
    let missing: Vec<&PathBuf> = needed.iter().filter(|p| !p.exists()).collect();
    assert!(
        missing.is_empty(),
        "{after_what}: images the VM needs are gone: {missing:?}"
    );
    let foreign: BTreeSet<PathBuf> = FOREIGN.iter().map(|f| vm.image(f)).collect();
    let stray: Vec<&PathBuf> = present
        .iter()
        .filter(|p| !needed.contains(*p) && !foreign.contains(*p))
        .collect();
    assert!(
        stray.is_empty(),
        "{after_what}: files nothing needs were left behind: {stray:?}\nneeded: {needed:#?}"
    );
    assert!(
        foreign.iter().all(|p| p.exists()),
        "{after_what}: a foreign image was deleted"
    );
}

/// With QEMU running: its devices write the active images that `chain`
/// reports (from QEMU), no job is left, every node QEMU has open is a file
/// that still exists, the journal is empty and `check` is clean.
fn assert_live_consistent(vm: &mut Vm, after_what: &str) {
    let chain = vm.snapctl.args(["chain"]).json();
    assert_eq!(chain["source"], "qemu", "{after_what}: chain: {chain}");
    let state = vm.monitor.block_state();
    for (disk, images) in chain_paths(&chain) {
        assert_eq!(
            state.root_file(&disk),
            images[0],
            "{after_what}: {disk}'s device and chain --json disagree"
        );
    }
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
        vm.monitor.ok("query-jobs", Value::Null),
        json!([]),
        "{after_what}: QEMU still has jobs"
    );
    assert_eq!(
        vm.snapctl.record()["journal"],
        json!([]),
        "{after_what}: the journal is not resolved"
    );
    assert_check_clean(vm, true);
}

/// With QEMU stopped: each disk's chain from the image headers is the one
/// `chain` reports, and every layer exists.
fn assert_headers_match_chain(vm: &Vm) {
    let chain = vm.snapctl.args(["chain"]).json();
    assert_eq!(chain["source"], "images", "chain: {chain}");
    for (disk, images) in chain_paths(&chain) {
        assert_eq!(
            image::backing_chain(&images[0]),
            images,
            "{disk}: the headers describe another chain than chain --json"
        );
    }
}

/// After deleting a snapshot whose boundary can be merged: each disk's chain
/// has lost one layer.
fn assert_merged(before: &BTreeMap<String, Vec<PathBuf>>, vm: &Vm, output: &str) {
    let after = chains(vm);
    for disk in DISKS {
        assert_eq!(
            after[disk].len() + 1,
            before[disk].len(),
            "{disk}: the boundary was not merged away\nbefore: {:?}\nafter: {:?}\n--- delete said\n{output}",
            before[disk],
            after[disk]
        );
    }
}

/// The snapshot's parent in `show --json`.
fn parent(vm: &Vm, name: &str) -> Value {
    vm.snapctl.args(["show", name]).json()["parent"].clone()
}

#[test]
fn delete_middle_snapshot_live() {
    let mut vm = Vm::two_disks();
    let mut history = three_snapshots(&mut vm);
    let foreign = foreign_digests(&vm);
    let before = chains(&vm);

    let output = vm.snapctl.args(["delete", "s2"]).stdout();
    history.deleted("s2");

    assert_eq!(snapshot_names(&vm), history.names());
    assert_eq!(list(&vm)["current"], "s3");
    assert_eq!(
        parent(&vm, "s3"),
        "s1",
        "s2's child moves up to s2's parent"
    );
    assert_merged(&before, &vm, &output);
    assert_live_consistent(&mut vm, "delete s2");
    assert_no_stray_images(&vm, "delete s2");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after delete s2", &history.live);
    let frozen = frozen_images(&vm);

    vm.quit();
    reads.assert_ok(&vm);
    assert_eq!(frozen_images(&vm), frozen);
    assert_images_read(&vm, &history);
    assert_headers_match_chain(&vm);
    assert_check_clean(&vm, false);
    assert_eq!(foreign_digests(&vm), foreign, "a foreign image was written");
}

#[test]
fn delete_newest_snapshot_live() {
    let mut vm = Vm::two_disks();
    let mut history = three_snapshots(&mut vm);
    let foreign = foreign_digests(&vm);
    let before = chains(&vm);

    // s3 froze the layer right below the active image: merging it away
    // commits the active layer (with a pivot) or streams into it.
    let report = vm.snapctl.args(["delete", "s3"]).json();
    assert!(report.is_object(), "delete --json: {report}");
    history.deleted("s3");

    assert_eq!(snapshot_names(&vm), history.names());
    assert_eq!(parent(&vm, "s2"), "s1");
    assert_merged(&before, &vm, &report.to_string());
    assert_live_consistent(&mut vm, "delete s3");
    assert_no_stray_images(&vm, "delete s3");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after delete s3", &history.live);
    // The device keeps working on its new chain.
    history.write(&mut vm, 4 * K64, 0x66);
    reads.expect(&mut vm, "after a write following delete s3", &history.live);

    vm.quit();
    reads.assert_ok(&vm);
    assert_images_read(&vm, &history);
    assert_headers_match_chain(&vm);
    assert_check_clean(&vm, false);
    assert_eq!(foreign_digests(&vm), foreign, "a foreign image was written");
}

#[test]
fn delete_oldest_snapshot_never_writes_the_foreign_base() {
    let mut vm = Vm::two_disks();
    let mut history = three_snapshots(&mut vm);
    let foreign = foreign_digests(&vm);
    let before = chains(&vm);

    // s1 froze the foreign images: they cannot take a commit.
    let output = vm.snapctl.args(["delete", "s1"]).stdout();
    history.deleted("s1");

    assert_eq!(snapshot_names(&vm), history.names());
    assert_eq!(list(&vm)["current"], "s3");
    assert_eq!(parent(&vm, "s2"), Value::Null, "s2 becomes a root");
    assert_eq!(foreign_digests(&vm), foreign, "a foreign image was written");
    let after = chains(&vm);
    for disk in DISKS {
        if after[disk].len() == before[disk].len() {
            let lower = output.to_lowercase();
            assert!(
                lower.contains("foreign") || lower.contains("shared"),
                "{disk}: the layer was kept but delete did not say why:\n{output}"
            );
        }
    }
    assert_live_consistent(&mut vm, "delete s1");
    assert_no_stray_images(&vm, "delete s1");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after delete s1", &history.live);

    vm.quit();
    reads.assert_ok(&vm);
    assert_eq!(foreign_digests(&vm), foreign, "a foreign image was written");
    assert_images_read(&vm, &history);
    assert_headers_match_chain(&vm);
    assert_check_clean(&vm, false);
}

#[test]
fn delete_offline_middle_snapshot() {
    let mut vm = Vm::two_disks();
    let mut history = three_snapshots(&mut vm);
    vm.quit();
    let foreign = foreign_digests(&vm);
    let before = chains(&vm);

    let output = vm.snapctl.args(["delete", "s2"]).stdout();
    history.deleted("s2");

    assert_eq!(snapshot_names(&vm), history.names());
    assert_eq!(list(&vm)["current"], "s3");
    assert_eq!(parent(&vm, "s3"), "s1");
    assert_merged(&before, &vm, &output);
    assert_headers_match_chain(&vm);
    assert_no_stray_images(&vm, "offline delete s2");
    assert_eq!(vm.snapctl.record()["journal"], json!([]));
    assert_images_read(&vm, &history);
    assert_check_clean(&vm, false);
    assert_eq!(foreign_digests(&vm), foreign, "a foreign image was written");
}

/// After a revert to `name`: each disk's active image is a new owned
/// overlay directly on `name`'s frozen image, and `name` is current.
fn assert_reverted_to(vm: &Vm, name: &str, old: &BTreeMap<String, Vec<PathBuf>>) {
    let show = vm.snapctl.args(["show", name]).json();
    let chain = vm.snapctl.args(["chain"]).json();
    let chains = chain_paths(&chain);
    for disk in DISKS {
        let images = &chains[disk];
        let frozen = path_of(&show["disks"][disk]["image"]);
        assert_eq!(
            images.get(1),
            Some(&frozen),
            "{disk}: after revert {name} the active image's backing is not {name}'s frozen image: {chain}"
        );
        assert!(
            !old[disk].contains(&images[0]),
            "{disk}: after revert {name} the active image is an old one: {chain}"
        );
        assert!(images[0].exists(), "{disk}: {:?} does not exist", images[0]);
        assert_eq!(chain["disks"][disk][0]["owned"], true, "{chain}");
        assert_eq!(chain["disks"][disk][0]["snapshots"], json!([]), "{chain}");
    }
    assert_eq!(list(vm)["current"], name);
    assert_eq!(show["current"], true);
}

/// The column at which `name` starts in `list --tree`.
fn tree_column(tree: &str, name: &str) -> usize {
    let line = tree
        .lines()
        .find(|l| {
            l.trim_start_matches(['│', '├', '└', '─', ' '])
                .split_whitespace()
                .next()
                == Some(name)
        })
        .unwrap_or_else(|| panic!("{name} is not in list --tree:\n{tree}"));
    line.chars()
        .position(|c| !matches!(c, '│' | '├' | '└' | '─' | ' '))
        .unwrap()
}

#[test]
fn revert_live_to_ancestor_and_to_other_branch() {
    let mut vm = Vm::two_disks();
    let mut history = three_snapshots(&mut vm);
    let mut reads = LiveReads::default();

    // To an ancestor on the current branch.
    let old = chains(&vm);
    let frozen = frozen_images(&vm);
    let frozen_digests = digests(frozen.values());
    vm.snapctl.args(["revert", "s1"]).ok();
    history.reverted("s1");
    assert_eq!(run_state(&mut vm), "running", "revert continues the VM");
    assert_reverted_to(&vm, "s1", &old);
    for (disk, chain) in &old {
        assert!(
            !chain[0].exists(),
            "{disk}: the abandoned active image {} was kept",
            chain[0].display()
        );
    }
    assert_eq!(frozen_images(&vm), frozen, "frozen images moved");
    assert_eq!(
        digests(frozen.values()),
        frozen_digests,
        "frozen images changed"
    );
    assert_live_consistent(&mut vm, "revert s1");
    assert_no_stray_images(&vm, "revert s1");
    reads.expect(&mut vm, "after revert s1", &history.live);

    // A new branch from s1.
    history.write(&mut vm, 0, 0x55);
    history.write(&mut vm, 3 * K64, 0x56);
    history.create(&mut vm, "s4");
    assert_eq!(parent(&vm, "s4"), "s1");

    // To s3, on the other branch: its frozen image is not in the open chain.
    let old = chains(&vm);
    let frozen = frozen_images(&vm);
    let frozen_digests = digests(frozen.values());
    vm.snapctl.args(["revert", "s3"]).ok();
    history.reverted("s3");
    assert_eq!(run_state(&mut vm), "running", "revert continues the VM");
    assert_reverted_to(&vm, "s3", &old);
    for (disk, chain) in &old {
        assert!(
            !chain[0].exists(),
            "{disk}: the abandoned active image {} was kept",
            chain[0].display()
        );
    }
    assert_eq!(frozen_images(&vm), frozen, "frozen images moved");
    assert_eq!(
        digests(frozen.values()),
        frozen_digests,
        "frozen images changed"
    );
    assert_live_consistent(&mut vm, "revert s3");
    assert_no_stray_images(&vm, "revert s3");
    reads.expect(&mut vm, "after revert s3", &history.live);

    let listed = list(&vm);
    assert_eq!(listed["current"], "s3");
    let tree = vm.snapctl.args(["list", "--tree"]).stdout();
    assert!(tree.contains("s3  <- current"), "list --tree:\n{tree}");
    assert_eq!(tree.lines().count(), 4, "list --tree:\n{tree}");
    assert_eq!(tree_column(&tree, "s1"), 0, "list --tree:\n{tree}");
    assert_eq!(
        tree_column(&tree, "s4"),
        tree_column(&tree, "s2"),
        "s4 is a child of s1 like s2:\n{tree}"
    );
    assert!(
        tree_column(&tree, "s3") > tree_column(&tree, "s2"),
        "s3 is below s2:\n{tree}"
    );

    vm.quit();
    reads.assert_ok(&vm);
    assert_images_read(&vm, &history);
    assert_headers_match_chain(&vm);
    assert_check_clean(&vm, false);
}

#[test]
fn revert_paused_stays_paused() {
    let mut vm = two_disks_running();
    let mut history = three_snapshots(&mut vm);
    assert_eq!(run_state(&mut vm), "running");
    let mut reads = LiveReads::default();

    let old = chains(&vm);
    vm.snapctl.args(["revert", "s1", "--paused"]).ok();
    history.reverted("s1");
    // The CPUs stay stopped. QEMU reports a VM reset while stopped as
    // "prelaunch" (and a later `stop` does not change that), so both
    // stopped states count.
    let status = vm.monitor.ok("query-status", Value::Null);
    assert_eq!(status["running"], false, "revert --paused: {status}");
    assert!(
        status["status"] == "paused" || status["status"] == "prelaunch",
        "revert --paused: {status}"
    );
    assert_reverted_to(&vm, "s1", &old);
    assert_live_consistent(&mut vm, "revert s1 --paused");
    reads.expect(&mut vm, "after revert s1 --paused", &history.live);

    // Without --paused a revert continues the VM, even one it found paused.
    vm.snapctl.args(["revert", "s2"]).ok();
    history.reverted("s2");
    assert_eq!(run_state(&mut vm), "running", "revert without --paused");
    reads.expect(&mut vm, "after revert s2", &history.live);

    vm.quit();
    reads.assert_ok(&vm);
    assert_images_read(&vm, &history);
}

/// Every string anywhere in a JSON document.
fn json_strings(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::String(s) => {
            out.insert(s.clone());
        }
        Value::Array(items) => items.iter().for_each(|v| json_strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| json_strings(v, out)),
        _ => {}
    }
}

#[test]
fn revert_offline_then_restart_with_qemu_args() {
    let mut vm = Vm::two_disks();
    let mut history = three_snapshots(&mut vm);
    vm.quit();
    let frozen = frozen_images(&vm);
    let frozen_digests = digests(frozen.values());

    let old = chains(&vm);
    let text = vm.snapctl.args(["revert", "s2"]).stdout();
    history.reverted("s2");
    assert!(
        text.contains("-blockdev"),
        "an offline revert prints the new qemu-args:\n{text}"
    );
    assert_reverted_to(&vm, "s2", &old);
    assert_headers_match_chain(&vm);
    assert_no_stray_images(&vm, "offline revert s2");

    // Again, with --json: the first revert's overlays are abandoned in turn.
    let old = chains(&vm);
    let report = vm.snapctl.args(["revert", "s2"]).json();
    let mut strings = BTreeSet::new();
    json_strings(&report, &mut strings);
    for (disk, active) in actives(&vm) {
        assert!(
            strings.contains(&*active.to_string_lossy()),
            "{disk}: revert --json does not name the new overlay {}: {report}",
            active.display()
        );
    }
    assert_eq!(chains(&vm)["vda"].get(1), old["vda"].get(1));
    assert_headers_match_chain(&vm);
    assert_no_stray_images(&vm, "second offline revert s2");
    assert_eq!(frozen_images(&vm), frozen, "frozen images moved");
    assert_eq!(
        digests(frozen.values()),
        frozen_digests,
        "frozen images changed"
    );
    assert_check_clean(&vm, false);
    let active = actives(&vm);

    let args: Vec<String> = serde_json::from_value(vm.snapctl.args(["qemu-args"]).json())
        .expect("qemu-args --json is an array of strings");
    vm.restart(&args);
    let state = vm.monitor.block_state();
    for disk in DISKS {
        assert_eq!(state.root_file(disk), active[disk]);
    }
    assert_live_consistent(&mut vm, "restart after an offline revert");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "restarted after revert s2", &history.live);
    history.write(&mut vm, 4 * K64, 0x77);
    reads.expect(&mut vm, "a write after the restart", &history.live);

    vm.quit();
    reads.assert_ok(&vm);
    assert_images_read(&vm, &history);
    assert_check_clean(&vm, false);
}

#[test]
fn delete_metadata_only_keeps_files() {
    let mut vm = Vm::two_disks();
    let mut history = three_snapshots(&mut vm);
    flush(&mut vm);
    let files = directory_digests(&vm);
    let graph = vm.monitor.block_state();
    let chains_before = chains(&vm);
    let s3 = vm.snapctl.args(["show", "s3"]).json();

    vm.snapctl.args(["delete", "s2", "--metadata-only"]).ok();
    history.deleted("s2");

    assert_eq!(snapshot_names(&vm), history.names());
    assert_eq!(list(&vm)["current"], "s3");
    assert_eq!(
        directory_digests(&vm),
        files,
        "--metadata-only touched files"
    );
    assert_eq!(
        vm.monitor.block_state(),
        graph,
        "--metadata-only changed QEMU's graph"
    );
    assert_eq!(chains(&vm), chains_before);
    assert_eq!(vm.snapctl.args(["show", "s3"]).json()["disks"], s3["disks"]);
    assert_check_clean(&vm, true);

    vm.quit();
    assert_images_read(&vm, &history);
    assert_check_clean(&vm, false);
}

#[test]
fn unknown_snapshot_is_refused_and_changes_nothing() {
    let mut vm = Vm::two_disks();
    three_snapshots(&mut vm);
    flush(&mut vm);
    let before = vm.untouched_state();
    let files = directory_digests(&vm);
    let status = run_state(&mut vm);

    let cases: [&[&str]; 7] = [
        &["revert", "nope"],
        &["revert", "nope", "--paused"],
        &["revert", "nope", "--dry-run"],
        &["delete", "nope"],
        &["delete", "nope", "--children"],
        &["delete", "nope", "--metadata-only"],
        &["delete", "nope", "--dry-run"],
    ];
    for args in cases {
        let mut cmd = vm.snapctl.args(args);
        let what = cmd.command_line();
        cmd.error_line(&["nope"]);
        vm.assert_untouched(&before, &what);
        assert_eq!(run_state(&mut vm), status, "{what} changed the run state");
    }
    assert_eq!(directory_digests(&vm), files);

    vm.quit();
    let record = vm.snapctl.record_bytes();
    let files = directory_digests(&vm);
    for args in [["revert", "nope"], ["delete", "nope"]] {
        let mut cmd = vm.snapctl.args(args);
        let what = cmd.command_line();
        cmd.error_line(&["nope"]);
        assert!(
            vm.snapctl.record_bytes() == record,
            "{what} changed the record"
        );
        assert_eq!(directory_digests(&vm), files, "{what} changed the images");
    }
}

#[test]
fn dry_run_changes_nothing_for_revert_and_delete() {
    let mut vm = Vm::two_disks();
    let history = three_snapshots(&mut vm);
    flush(&mut vm);
    let before = vm.untouched_state();
    let files = directory_digests(&vm);
    let status = run_state(&mut vm);

    let unchanged = |vm: &mut Vm, what: &str| {
        vm.assert_untouched(&before, what);
        assert_eq!(directory_digests(vm), files, "{what} changed the images");
        assert_eq!(run_state(vm), status, "{what} changed the run state");
    };

    // The plan must show the QMP commands (DESIGN: "the QMP commands and
    // file operations, in order"). What is missing is collected and reported
    // at the end, so that every "changes nothing" check runs first.
    let mut missing = Vec::new();
    let text = vm.snapctl.args(["revert", "s1", "--dry-run"]).stdout();
    unchanged(&mut vm, "revert --dry-run");
    for needle in ["qom-set", "system_reset"] {
        if !text.contains(needle) {
            missing.push(format!("revert --dry-run lacks {needle:?}:\n{text}"));
        }
    }
    let plan = vm.snapctl.args(["revert", "s1", "--dry-run"]).json();
    unchanged(&mut vm, "revert --dry-run --json");
    assert_eq!(plan["dry_run"], true, "{plan}");
    let steps = plan["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("revert --dry-run --json: steps is not an array: {plan}"));
    if !steps.iter().any(|s| s["command"] == "qom-set") {
        missing.push(format!(
            "revert --dry-run --json has no qom-set step: {plan}"
        ));
    }

    let merges = ["block-commit", "block-stream"];
    let text = vm.snapctl.args(["delete", "s2", "--dry-run"]).stdout();
    unchanged(&mut vm, "delete --dry-run");
    if !merges.iter().any(|m| text.contains(m)) {
        missing.push(format!(
            "delete --dry-run shows no block-commit or block-stream:\n{text}"
        ));
    }
    let plan = vm.snapctl.args(["delete", "s2", "--dry-run"]).json();
    unchanged(&mut vm, "delete --dry-run --json");
    assert_eq!(plan["dry_run"], true, "{plan}");
    // Like create's and revert's: {"dry_run": true, "steps": [...]}.
    let merge_step = plan["steps"].as_array().is_some_and(|steps| {
        steps
            .iter()
            .any(|s| merges.iter().any(|m| s["command"] == *m))
    });
    if !merge_step {
        missing.push(format!(
            "delete --dry-run --json has no \"steps\" with a block-commit or block-stream: {plan}"
        ));
    }
    vm.snapctl
        .args(["delete", "s2", "--dry-run", "--children"])
        .ok();
    unchanged(&mut vm, "delete --children --dry-run");

    // Offline too.
    vm.quit();
    let record = vm.snapctl.record_bytes();
    let files = directory_digests(&vm);
    for args in [
        ["revert", "s1", "--dry-run"],
        ["delete", "s2", "--dry-run"],
        ["delete", "s1", "--dry-run"],
    ] {
        let mut cmd = vm.snapctl.args(args);
        let what = cmd.command_line();
        let text = String::from_utf8_lossy(&cmd.ok().stdout).into_owned();
        assert!(!text.trim().is_empty(), "{what} printed no plan");
        assert!(
            vm.snapctl.record_bytes() == record,
            "{what} changed the record"
        );
        assert_eq!(directory_digests(&vm), files, "{what} changed the images");
    }
    assert_images_read(&vm, &history);
    assert!(
        missing.is_empty(),
        "the dry runs changed nothing, but their plans lack QMP commands:\n{}",
        missing.join("\n")
    );
}
