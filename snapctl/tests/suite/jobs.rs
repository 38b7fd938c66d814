//! `snapctl commit`, `pull`, `jobs` and `job` against real QEMU (TCG, no
//! guest OS).
//!
//! Every test starts its own one-disk VM ([`Vm::one_disk`]: `vda`, 64 MiB,
//! on the foreign `img/base.qcow2`) and builds a history of snapshots with
//! patterns, keeping a table of what each snapshot and the live disk must
//! read ([`History`]). After each operation the data is checked live
//! through the device ([`LiveReads`]) and offline on every remaining
//! snapshot's frozen image as `show` reports it afterwards
//! ([`assert_images_read`]), and the bookkeeping against `list`, `show`,
//! `chain`, `check`, the image directory and QEMU's graph (the shared checks
//! of [`crate::util::history`]).
//!
//! The long jobs are made slow with `--bandwidth 1M` on 32 MiB of data, so
//! that an interruption or a timeout always lands while the job runs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use integration::{WorkDir, command_line, image};
use serde_json::{Value, json};

use crate::util::history::{
    assert_check_clean, assert_headers_match_chain, assert_images_read, assert_intact_then_quit,
    assert_live_consistent, assert_no_stray_images, chain, directory_digests, flush,
    frozen_images_of, list, parent, sha256, sorted_snapshot_names,
};
use crate::util::{Background, Bulk, History, K64, LiveReads, M1, Pattern, Tmpfs, Vm};

/// The bulk range that makes jobs long: 32 MiB from 16 MiB.
const BULK_OFFSET: u64 = 16 * M1;
const BULK_LEN: u64 = 32 * M1;

/// The pattern of the bulk range when it is written.
const BULK_BYTE: u8 = 0x5a;

const BULK: Bulk = Bulk {
    offset: BULK_OFFSET,
    len: BULK_LEN,
    byte: BULK_BYTE,
};

/// Where the small writes go (64 KiB each; the last one is never written:
/// it must read zeroes everywhere), and the bulk range.
pub(crate) const PATTERN: Pattern = Pattern {
    offsets: &[0, K64, 2 * K64, 3 * K64, 4 * K64, 5 * K64],
    bulk: Some(BULK),
};

/// The foreign base image's file name.
const BASE: &str = "base.qcow2";

/// How long an interrupted or timed-out merge may take to give up.
pub(crate) const GIVE_UP: Duration = Duration::from_secs(10);

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
    let mut history = History::new(PATTERN);
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
pub(crate) fn bulk_history(vm: &mut Vm, bulk_on_top: bool) -> History {
    vm.snapctl.args(["init"]).ok();
    let mut history = History::new(PATTERN);
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

/// `commit vda --top s4 --base s2` on the four-snapshot history: s4's
/// frozen image (vda.s3) and the layer below it (vda.s2, s3's) are merged
/// into vda.s1 (s2's). Checks the report and the record; returns the new
/// history.
fn commit_s4_into_s2(vm: &mut Vm, mut history: History) -> History {
    let before = chain(vm, "vda");
    let frozen = frozen_images_of(vm, "vda");
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

    assert_eq!(sorted_snapshot_names(vm), history.names());
    let after = frozen_images_of(vm, "vda");
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
    assert_eq!(
        chain(vm, "vda"),
        expected,
        "the merged layers left the chain"
    );
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
    let images = chain(vm, "vda");
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
    let mut vm = Vm::one_disk(None);
    let history = four_snapshots(&mut vm);
    let base_digest = sha256(&vm.image(BASE));

    let mut history = commit_s4_into_s2(&mut vm, history);

    // (The layers it merged are checked by
    // commit_with_base_live_closes_and_removes_the_merged_layers.)
    assert_live_consistent(&mut vm, "commit --top s4 --base s2");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after the commit", &history);
    // The device keeps working on its new chain.
    history.write(&mut vm, 5 * K64, 0x66);
    reads.expect(&mut vm, "after a write following the commit", &history);

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
    let mut vm = Vm::one_disk(None);
    let history = four_snapshots(&mut vm);
    let before = chain(&vm, "vda");

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
    let mut vm = Vm::one_disk(None);
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
    let mut vm = Vm::one_disk(None);
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
    let mut vm = Vm::one_disk(None);
    let history = four_snapshots(&mut vm);
    flush(&mut vm);
    let before = chain(&vm, "vda");
    let frozen = frozen_images_of(&vm, "vda");
    let digests: BTreeMap<&PathBuf, String> = frozen.values().map(|p| (p, sha256(p))).collect();

    let report = vm.snapctl.args(["pull", "vda", "--base", "s1"]).json();
    assert_eq!(
        report["removed_snapshots"],
        json!([]),
        "pull --json: {report}"
    );

    // The active image now sits directly on s1's frozen image.
    assert_eq!(chain(&vm, "vda"), [before[0].clone(), frozen["s1"].clone()]);
    assert_eq!(
        sorted_snapshot_names(&vm),
        history.names(),
        "pull removes no snapshot"
    );
    assert_eq!(frozen_images_of(&vm, "vda"), frozen, "frozen images moved");
    let now: BTreeMap<&PathBuf, String> = frozen.values().map(|p| (p, sha256(p))).collect();
    assert_eq!(now, digests, "pull wrote a frozen image");
    assert_intact_then_quit(&mut vm, "pull --base s1", "after the pull", &history);
}

/// After `pull vda --base s1` the layers between the active image and s1's
/// frozen image have left the chain: QEMU must close them, or their write
/// locks make later offline merges of them (deleting the snapshots that
/// hold them) fail.
#[test]
fn pull_with_base_live_closes_the_layers_it_leaves() {
    let mut vm = Vm::one_disk(None);
    let mut history = four_snapshots(&mut vm);

    vm.snapctl.args(["pull", "vda", "--base", "s1"]).ok();

    assert_no_nodes_outside_chain(&mut vm, "pull --base s1");
    for name in ["s3", "s2"] {
        vm.snapctl.args(["delete", name]).ok();
        history.removed(name);
    }
    assert_eq!(sorted_snapshot_names(&vm), history.names());
    assert_live_consistent(&mut vm, "pull --base s1, then delete s3 and s2");
    assert_no_stray_images(&vm, "pull --base s1, then delete s3 and s2");
    vm.quit();
    assert_images_read(&vm, &history);
}

#[test]
fn pull_all_offline() {
    let mut vm = Vm::one_disk(None);
    let history = four_snapshots(&mut vm);
    vm.quit();
    let active = chain(&vm, "vda")[0].clone();
    let frozen = frozen_images_of(&vm, "vda");
    let digests: BTreeMap<&PathBuf, String> = frozen.values().map(|p| (p, sha256(p))).collect();

    let report = vm.snapctl.args(["pull", "vda"]).json();
    assert_eq!(
        report["removed_snapshots"],
        json!([]),
        "pull --json: {report}"
    );

    // The active image stands alone.
    assert_eq!(chain(&vm, "vda"), std::slice::from_ref(&active));
    assert_eq!(
        image::backing_file(&active),
        None,
        "the header still names a backing file"
    );
    assert_eq!(
        sorted_snapshot_names(&vm),
        history.names(),
        "pull removes no snapshot"
    );
    assert_eq!(frozen_images_of(&vm, "vda"), frozen, "frozen images moved");
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
pub(crate) fn start_slow_job(vm: &mut Vm, args: &[&str], after: Duration) -> Background {
    let mut child = vm.snapctl.args(args).spawn();
    let started = integration::wait_until(Duration::from_secs(10), || {
        !vm.monitor.jobs().is_empty() || !child.is_running()
    });
    assert!(
        started,
        "no job appeared within 10 s of {}",
        command_line(child.command())
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
    let mut vm = Vm::one_disk(None);
    // The bulk range sits in s2's frozen image: the pull has 32 MiB to copy.
    let history = bulk_history(&mut vm, false);
    flush(&mut vm);
    let record = vm.snapctl.record();
    let before = chain(&vm, "vda");
    let frozen = frozen_images_of(&vm, "vda");

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
    assert_eq!(chain(&vm, "vda"), before);
    assert_eq!(frozen_images_of(&vm, "vda"), frozen);
    assert_intact_then_quit(
        &mut vm,
        "an interrupted pull",
        "after the interrupted pull",
        &history,
    );
}

/// An active commit interrupted mid-way has written part of the active
/// layer into s2's frozen image: s2 (the current snapshot) must leave the
/// record, its place taken by its parent, and the record stay valid.
#[test]
fn cancel_mid_active_commit() {
    let mut vm = Vm::one_disk(None);
    // The bulk range sits in the active image: the active commit into s2's
    // frozen image has 32 MiB to copy.
    let mut history = bulk_history(&mut vm, true);
    let before = chain(&vm, "vda");
    let frozen = frozen_images_of(&vm, "vda");
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

    assert_eq!(sorted_snapshot_names(&vm), history.names(), "after: {line}");
    assert_eq!(
        chain(&vm, "vda"),
        before,
        "a cancelled commit leaves the chain as it was"
    );
    assert_eq!(
        list(&vm)["current"],
        "s1",
        "s2 was current; its parent takes over"
    );
    assert_intact_then_quit(
        &mut vm,
        "an interrupted active commit",
        "after the interrupted commit",
        &history,
    );
}

/// The same interruption where the commit's base is a layer no snapshot
/// holds any more (`delete s2 --metadata-only` kept s2's frozen image): the
/// job is cancelled cleanly, no snapshot is removed, the chain and the
/// record stay as they were and the device still reads the latest data.
#[test]
fn cancel_mid_active_commit_into_a_layer_no_snapshot_holds() {
    let mut vm = Vm::one_disk(None);
    let mut history = bulk_history(&mut vm, true);
    vm.snapctl.args(["delete", "s2", "--metadata-only"]).ok();
    history.removed("s2");
    let before = chain(&vm, "vda");
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
        chain(&vm, "vda"),
        before,
        "a cancelled commit leaves the chain as it was"
    );
    assert_intact_then_quit(
        &mut vm,
        "an interrupted active commit",
        "after the interrupted commit",
        &history,
    );
}

#[test]
fn timeout_cancels_cleanly() {
    let mut vm = Vm::one_disk(None);
    let history = bulk_history(&mut vm, false);
    flush(&mut vm);
    let record = vm.snapctl.record();
    let before = chain(&vm, "vda");

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
    assert_eq!(chain(&vm, "vda"), before);
    assert_live_consistent(&mut vm, "a timed-out pull");
    assert_no_stray_images(&vm, "a timed-out pull");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after the timed-out pull", &history);

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
    let mut vm = Vm::one_disk(Some(BULK));
    vm.snapctl.args(["init"]).ok();
    let mut history = History::new(PATTERN);
    history.live.bulk = true;
    let overlay = tmpfs.path.join("vda.s1.qcow2");
    history.create_with(
        &mut vm,
        "s1",
        &["--overlay", &format!("vda={}", overlay.display())],
    );
    history.write(&mut vm, 0, 0x13);
    flush(&mut vm);
    assert_eq!(chain(&vm, "vda"), [overlay.clone(), vm.image(BASE)]);
    let record = vm.snapctl.record();
    let base_digest = sha256(&vm.image(BASE));

    let line = vm
        .snapctl
        .args(["pull", "vda"])
        .error_line_after_progress(&["No space left on device"]);

    assert_eq!(vm.snapctl.record(), record, "the record changed: {line}");
    assert_eq!(chain(&vm, "vda"), [overlay.clone(), vm.image(BASE)]);
    assert_eq!(
        vm.monitor.jobs(),
        Vec::<Value>::new(),
        "a failed job was left"
    );
    assert_live_consistent(&mut vm, "a failed pull");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after the failed pull", &history);

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
    let mut vm = Vm::one_disk(None);
    vm.snapctl.args(["init"]).ok();
    // 8 MiB below the active image: a stream of it at 1 MiB/s takes 8 s.
    vm.monitor.write("vda", BULK_BYTE, BULK_OFFSET, 8 * M1);
    vm.snapctl.args(["create", "s1"]).ok();
    vm.monitor.write("vda", 0x13, 0, K64);
    let before = chain(&vm, "vda");
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
    assert_eq!(chain(&vm, "vda"), before);
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
