//! What the disks of a standard VM ([`Vm::one_disk`], [`Vm::two_disks`])
//! must read, and the checks that compare it, and snapctl's bookkeeping,
//! with what is there.
//!
//! A test writes byte patterns through QEMU, as a guest would, and takes
//! snapshots, keeping a table of what the live disks and every snapshot
//! must read ([`History`], laid out by a [`Pattern`]). After each operation
//! the data is checked live through the devices (HMP `qemu-io`, whose
//! results QEMU prints on its stdout, read once QEMU has quit:
//! [`LiveReads`]) and offline with `qemu-io` on every remaining snapshot's
//! frozen images as `show` reports them afterwards ([`assert_images_read`]),
//! and the bookkeeping against `list`, `show`, `chain`, `check`, the image
//! directory and QEMU's graph (the other `assert_*` functions). Every check
//! covers each disk of the VM's [`Layout`](super::Layout).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use integration::image;
use serde_json::{Value, json};

use super::{Disk, K64, Vm, dir_listing};

/// A range written whole with one byte, big enough to make merge jobs long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bulk {
    pub offset: u64,
    pub len: u64,
    pub byte: u8,
}

/// Where a [`History`] writes and reads back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pattern {
    /// The 64 KiB ranges the tests write. The last one is never written:
    /// it must read zeroes everywhere.
    pub offsets: &'static [u64],
    /// A bulk range, when the tests need long jobs.
    pub bulk: Option<Bulk>,
}

/// What the disks read at one moment: the byte at each of the pattern's
/// offsets (absent: zero), and whether the bulk range is written. (Each
/// disk holds these bytes as [`Disk::byte`] marks them.)
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct State {
    pub small: BTreeMap<u64, u8>,
    pub bulk: bool,
}

/// What the live disks and every snapshot must read.
#[derive(Debug, Clone)]
pub struct History {
    pattern: Pattern,
    pub live: State,
    pub snapshots: BTreeMap<String, State>,
}

impl History {
    /// Nothing written and no snapshot yet.
    pub fn new(pattern: Pattern) -> History {
        History {
            pattern,
            live: State::default(),
            snapshots: BTreeMap::new(),
        }
    }

    /// Every (offset, length, byte) that `disk` must read in `state`,
    /// including what its foreign images hold.
    pub fn reads(&self, disk: &Disk, state: &State) -> Vec<(u64, u64, u8)> {
        let mut reads: Vec<(u64, u64, u8)> = self
            .pattern
            .offsets
            .iter()
            .map(|&o| (o, K64, disk.byte(state.small.get(&o).copied().unwrap_or(0))))
            .collect();
        if let Some(bulk) = self.pattern.bulk {
            let byte = if state.bulk { disk.byte(bulk.byte) } else { 0 };
            reads.push((bulk.offset, bulk.len, byte));
        }
        reads.extend(disk.holds.iter().map(|&(o, byte)| (o, K64, byte)));
        reads
    }

    /// Writes `byte` at `offset` (64 KiB) on every disk through QEMU, as
    /// the guest would.
    pub fn write(&mut self, vm: &mut Vm, offset: u64, byte: u8) {
        for disk in vm.layout().disks {
            vm.monitor.write(disk.id, disk.byte(byte), offset, K64);
        }
        self.live.small.insert(offset, byte);
    }

    /// Fills the bulk range on every disk through QEMU.
    pub fn write_bulk(&mut self, vm: &mut Vm) {
        let bulk = self.pattern.bulk.expect("the pattern has no bulk range");
        for disk in vm.layout().disks {
            vm.monitor
                .write(disk.id, disk.byte(bulk.byte), bulk.offset, bulk.len);
        }
        self.live.bulk = true;
    }

    /// `snapctl create NAME`, with extra arguments.
    pub fn create_with(&mut self, vm: &mut Vm, name: &str, extra: &[&str]) {
        vm.snapctl.args(["create", name]).args(extra).ok();
        self.snapshots.insert(name.to_owned(), self.live.clone());
    }

    /// `snapctl create NAME`.
    pub fn create(&mut self, vm: &mut Vm, name: &str) {
        self.create_with(vm, name, &[]);
    }

    /// After a revert to `name`: the disks read that snapshot's data again.
    pub fn reverted(&mut self, name: &str) {
        self.live = self.snapshots[name].clone();
    }

    /// After an operation removed `name` from the record.
    pub fn removed(&mut self, name: &str) {
        self.snapshots
            .remove(name)
            .unwrap_or_else(|| panic!("no snapshot {name} in the history"));
    }

    /// The snapshot names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.snapshots.keys().cloned().collect()
    }
}

/// Reads through the live devices with HMP `qemu-io`. QEMU prints the
/// results on its stdout, which is complete only once QEMU has exited, so
/// the verdict comes from [`LiveReads::assert_ok`] after the quit.
#[derive(Debug, Default)]
pub struct LiveReads {
    /// One label per read, in the order they were issued.
    reads: Vec<String>,
}

impl LiveReads {
    /// Reads, on every disk, everything the history says the live disks hold.
    pub fn expect(&mut self, vm: &mut Vm, when: &str, history: &History) {
        for disk in vm.layout().disks {
            for (offset, len, byte) in history.reads(disk, &history.live) {
                vm.monitor
                    .qemu_io(disk.id, &format!("read -P {byte:#04x} {offset} {len}"));
                self.reads.push(format!(
                    "{when}: {} should read {byte:#04x} at {offset} ({len} bytes)",
                    disk.id
                ));
            }
        }
    }

    /// After [`Vm::quit`]: every read ran and none saw other bytes.
    pub fn assert_ok(&self, vm: &Vm) {
        let out = vm.qemu.stdout_text();
        let verdicts = read_verdicts(&out);
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

/// For each `read N/N bytes at offset O` report of `qemu-io` in `out`, in
/// order: whether the read failed. qemu-io prints "Pattern verification
/// failed ..." before the report of the read it belongs to, so the text
/// before the n-th report (after the one before) belongs to the n-th read.
fn read_verdicts(out: &str) -> Vec<bool> {
    const TAIL: &str = " bytes at offset ";
    let mut verdicts = Vec::new();
    let mut segment_start = 0;
    let mut from = 0;
    while let Some(found) = out[from..].find(TAIL) {
        let at = from + found;
        from = at + TAIL.len();
        // A read's report, not a write's: "read <done>/<asked>" before it.
        let head = &out[segment_start..at];
        let counts = head.trim_end_matches(|c: char| c.is_ascii_digit() || c == '/');
        if counts.len() < head.len() && counts.ends_with("read ") {
            verdicts.push(counts.contains("Pattern verification failed"));
            segment_start = from;
        }
    }
    verdicts
}

/// A JSON string as a path.
pub fn path_of(value: &Value) -> PathBuf {
    PathBuf::from(
        value
            .as_str()
            .unwrap_or_else(|| panic!("expected a path, got {value}")),
    )
}

/// Each disk's chain as `chain --json` gives it, active image first.
pub fn chains(vm: &Vm) -> BTreeMap<String, Vec<PathBuf>> {
    let chain = vm.snapctl.args(["chain"]).json();
    chain_paths(vm, &chain)
}

/// `disk`'s chain as `chain --json` gives it, active image first.
pub fn chain(vm: &Vm, disk: &str) -> Vec<PathBuf> {
    chains(vm)
        .remove(disk)
        .unwrap_or_else(|| panic!("chain --json has no {disk}"))
}

/// Each disk's chain in a `chain --json` document, active image first;
/// checks that every disk of the VM is there and that each chain starts
/// with the active image.
pub fn chain_paths(vm: &Vm, chain: &Value) -> BTreeMap<String, Vec<PathBuf>> {
    let disks = chain["disks"]
        .as_object()
        .unwrap_or_else(|| panic!("chain --json has no disks: {chain}"));
    for disk in vm.layout().disks {
        assert!(
            disks.contains_key(disk.id),
            "chain --json has no {}: {chain}",
            disk.id
        );
    }
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
pub fn actives(vm: &Vm) -> BTreeMap<String, PathBuf> {
    chains(vm)
        .into_iter()
        .map(|(disk, chain)| (disk, chain[0].clone()))
        .collect()
}

/// `list --json`.
pub fn list(vm: &Vm) -> Value {
    vm.snapctl.args(["list"]).json()
}

/// The snapshot names `list` reports, in its order.
pub fn snapshot_names(vm: &Vm) -> Vec<String> {
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

/// The snapshot names `list` reports, sorted.
pub fn sorted_snapshot_names(vm: &Vm) -> Vec<String> {
    let mut names = snapshot_names(vm);
    names.sort();
    names
}

/// Every snapshot's frozen image per disk, as `list --json` reports them now.
pub fn frozen_images(vm: &Vm) -> BTreeMap<(String, String), PathBuf> {
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

/// Every snapshot's frozen image of `disk`, as `list --json` reports them now.
pub fn frozen_images_of(vm: &Vm, disk: &str) -> BTreeMap<String, PathBuf> {
    list(vm)["snapshots"]
        .as_array()
        .expect("list --json has a snapshots array")
        .iter()
        .map(|s| {
            let name = s["name"].as_str().expect("a snapshot has a name");
            (name.to_owned(), path_of(&s["disks"][disk]["image"]))
        })
        .collect()
}

/// The snapshot's parent in `show --json`.
pub fn parent(vm: &Vm, name: &str) -> Value {
    vm.snapctl.args(["show", name]).json()["parent"].clone()
}

/// `sha256sum` of a file.
pub fn sha256(path: &Path) -> String {
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

/// `sha256sum` of each file.
pub fn digests<'a>(paths: impl IntoIterator<Item = &'a PathBuf>) -> BTreeMap<PathBuf, String> {
    paths
        .into_iter()
        .map(|path| (path.clone(), sha256(path)))
        .collect()
}

/// The foreign images' digests.
pub fn foreign_digests(vm: &Vm) -> BTreeMap<PathBuf, String> {
    let foreign: Vec<PathBuf> = vm.layout().foreign.iter().map(|f| vm.image(f)).collect();
    digests(&foreign)
}

/// Every file of the image directory with its digest.
pub fn directory_digests(vm: &Vm) -> BTreeMap<PathBuf, String> {
    let files: Vec<PathBuf> = dir_listing(&vm.images())
        .into_iter()
        .map(|name| vm.image(&name))
        .collect();
    digests(&files)
}

/// Makes QEMU write out everything it caches for the disks, so that the
/// files' bytes stay put while nothing changes.
pub fn flush(vm: &mut Vm) {
    for disk in vm.layout().disks {
        vm.monitor.qemu_io(disk.id, "flush");
    }
}

/// `check` exits 0 and reports no drift.
pub fn assert_check_clean(vm: &Vm, running: bool, after_what: &str) {
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(
        check["qemu_running"], running,
        "{after_what}: check: {check}"
    );
    assert_eq!(check["drift"], json!([]), "{after_what}: check: {check}");
}

/// Offline (`qemu-io -U` on the files): every snapshot of the history reads
/// its data in its frozen images as `show` reports them now, and each
/// disk's active image reads the live data.
pub fn assert_images_read(vm: &Vm, history: &History) {
    let layout = vm.layout();
    let mut wrong = Vec::new();
    let mut check = |what: &str, disk: &Disk, image: &Path, state: &State| {
        for (offset, len, byte) in history.reads(disk, state) {
            if !image::read_pattern_ok(image, byte, offset, len) {
                wrong.push(format!(
                    "{what}: {}'s {} should read {byte:#04x} at {offset} ({len} bytes)",
                    disk.id,
                    image.display()
                ));
            }
        }
    };
    for (name, state) in &history.snapshots {
        let show = vm.snapctl.args(["show", name]).json();
        for disk in layout.disks {
            let image = path_of(&show["disks"][disk.id]["image"]);
            check(&format!("snapshot {name}"), disk, &image, state);
        }
    }
    for (disk, active) in actives(vm) {
        check(
            "the active image",
            layout.disk(&disk),
            &active,
            &history.live,
        );
    }
    assert!(wrong.is_empty(), "wrong data:\n{}", wrong.join("\n"));
}

/// The image directory holds exactly what the VM needs: each disk's chain,
/// each snapshot's frozen images with their backing chains (from the
/// headers), and the foreign images (never deleted). Nothing is missing and
/// no abandoned or merged-away file is left behind.
pub fn assert_no_stray_images(vm: &Vm, after_what: &str) {
    let mut needed = BTreeSet::new();
    for (_, chain) in chains(vm) {
        needed.extend(chain);
    }
    for (_, frozen) in frozen_images(vm) {
        needed.extend(image::backing_chain(&frozen));
    }
    let missing: Vec<&PathBuf> = needed.iter().filter(|p| !p.exists()).collect();
    assert!(
        missing.is_empty(),
        "{after_what}: images the VM needs are gone: {missing:?}"
    );
    let foreign: BTreeSet<PathBuf> = vm.layout().foreign.iter().map(|f| vm.image(f)).collect();
    let deleted: Vec<&PathBuf> = foreign.iter().filter(|p| !p.exists()).collect();
    assert!(
        deleted.is_empty(),
        "{after_what}: a foreign image was deleted: {deleted:?}"
    );
    let stray: Vec<PathBuf> = dir_listing(&vm.images())
        .into_iter()
        .map(|name| vm.image(&name))
        .filter(|p| !needed.contains(p) && !foreign.contains(p))
        .collect();
    assert!(
        stray.is_empty(),
        "{after_what}: files nothing needs were left behind: {stray:?}\nneeded: {needed:#?}"
    );
}

/// With QEMU running: its devices write the active images that `chain`
/// reports (from QEMU), no job is left, every node QEMU has open is on a
/// file that still exists, the journal is empty and `check` is clean.
pub fn assert_live_consistent(vm: &mut Vm, after_what: &str) {
    let chain = vm.snapctl.args(["chain"]).json();
    assert_eq!(chain["source"], "qemu", "{after_what}: chain: {chain}");
    let state = vm.monitor.block_state();
    for (disk, images) in chain_paths(vm, &chain) {
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

/// With QEMU stopped: each disk's chain from the image headers is the one
/// `chain` reports.
pub fn assert_headers_match_chain(vm: &Vm) {
    let chain = vm.snapctl.args(["chain"]).json();
    assert_eq!(chain["source"], "images", "chain: {chain}");
    for (disk, images) in chain_paths(vm, &chain) {
        assert_eq!(
            image::backing_chain(&images[0]),
            images,
            "{disk}: the headers describe another chain than chain --json"
        );
    }
}

#[test]
fn read_verdicts_skip_writes_and_pin_mismatches_on_their_read() {
    let out = "wrote 65536/65536 bytes at offset 0\n\
               64 KiB, 1 ops; 00.00 sec\n\
               read 65536/65536 bytes at offset 0\n\
               64 KiB, 1 ops; 00.00 sec\n\
               Pattern verification failed at offset 65536, 65536 bytes\n\
               read 65536/65536 bytes at offset 65536\n\
               read 33554432/33554432 bytes at offset 16777216\n";
    assert_eq!(read_verdicts(out), [false, true, false]);
}

/// After an interrupted or refused operation: QEMU and the record agree, no
/// image is left over, the device reads what `history` says (`when`); then
/// QEMU quits, and every image and header agrees with the history and the
/// record (`check` clean).
pub fn assert_intact_then_quit(vm: &mut Vm, after_what: &str, when: &str, history: &History) {
    assert_live_consistent(vm, after_what);
    assert_no_stray_images(vm, after_what);
    let mut reads = LiveReads::default();
    reads.expect(vm, when, history);

    vm.quit();
    reads.assert_ok(vm);
    assert_images_read(vm, history);
    assert_headers_match_chain(vm);
    assert_check_clean(vm, false, "after quit");
}
