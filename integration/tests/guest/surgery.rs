//! `snapctl revert` and `snapctl delete` on a running guest that keeps
//! writing: the merges run as QEMU block jobs under the guest's writes, and
//! `scripts/check-records` and the raw `records.log` bytes show that every
//! remaining snapshot still holds exactly what it froze and that the live
//! disk holds a valid run of records.
//!
//! A revert resets the guest with QMP `system_reset`. The guest runs under
//! `-no-reboot` (a guest that panics ends QEMU), and under that QEMU turns a
//! reset into a shutdown; so the revert scenario lets resets reset (QMP
//! `set-action reboot=reset`) for the revert only.

use integration::guest::{DISK_ID, check_filesystem, check_records, records_log};
use qmp_client::FreezeStatus;
use serde_json::{Value, json};

use crate::vm::{
    BOOT_TIMEOUT, GuestVm, MIN_RECORDS, RECORD_TIMEOUT, RECORDS_AFTER, SHORT, path_arg, path_of,
};

/// The first `n` lines of a `records.log` (each with its newline).
fn first_records(log: &[u8], n: u64) -> &[u8] {
    let mut end = 0;
    for _ in 0..n {
        match log[end..].iter().position(|&b| b == b'\n') {
            Some(newline) => end += newline + 1,
            None => panic!(
                "records.log has fewer than {n} complete lines:\n{}",
                String::from_utf8_lossy(log)
            ),
        }
    }
    &log[..end]
}

/// The delete report of one snapshot from `snapctl delete NAME --json`,
/// after checking that it names the snapshot and merges one disk with a
/// live QEMU job. Returns the disk's entry.
fn deleted_disk<'a>(deleted: &'a Value, name: &str) -> &'a Value {
    let reports = deleted["deleted"]
        .as_array()
        .unwrap_or_else(|| panic!("{deleted}"));
    assert_eq!(reports.len(), 1, "{deleted}");
    assert_eq!(reports[0]["snapshot"], name, "{deleted}");
    let disks = reports[0]["disks"]
        .as_array()
        .unwrap_or_else(|| panic!("{deleted}"));
    assert_eq!(disks.len(), 1, "{deleted}");
    assert_eq!(disks[0]["disk"], DISK_ID, "{deleted}");
    assert!(
        disks[0]["job"].is_object(),
        "the merge runs as a QEMU job while the guest writes: {deleted}"
    );
    &disks[0]
}

/// Records the guest writes after s1 before the revert throws them away.
const RECORDS_TO_LOSE: u64 = 15;

/// A live revert to a quiesced snapshot while the guest writes: the guest
/// resets and boots on exactly s1's state (it resumes after the last record
/// s1's frozen image holds), writes on from there, and the active image ends
/// up as s1's records followed by the new ones.
pub fn revert_live_sees_exactly_the_snapshot() {
    let mut vm = GuestVm::boot();
    vm.guest.wait_for_records(MIN_RECORDS, RECORD_TIMEOUT);

    let s1 = vm.take_snapshot("s1", true);
    assert_eq!(s1.frozen, vm.guest.disk(), "s1 freezes the base image");
    assert_eq!(vm.freeze_status(), FreezeStatus::Thawed);
    let in_s1 = s1.check_records();
    let s1_log = records_log(&s1.frozen);

    // Records that s1 does not hold and the revert must make disappear.
    let lost = vm
        .guest
        .wait_for_records(s1.after + RECORDS_TO_LOSE, RECORD_TIMEOUT);
    assert!(lost >= in_s1 + RECORDS_TO_LOSE);

    vm.set_reboot_action("reset");
    let mark = vm.guest.console_mark();
    let reverted = vm.snapctl.json(&["revert", "s1"]);
    assert_eq!(reverted["snapshot"], "s1", "{reverted}");
    assert_eq!(reverted["live"], true, "{reverted}");
    assert_eq!(reverted["paused"], false, "{reverted}");
    assert_eq!(reverted["warnings"], json!([]), "{reverted}");
    let disk = &reverted["disks"][DISK_ID];
    assert_eq!(path_of(&disk["image"], &reverted), s1.frozen, "{reverted}");
    let overlay = path_of(&disk["overlay"], &reverted);
    assert_ne!(overlay, s1.overlay, "a fresh overlay: {reverted}");
    assert_eq!(
        vm.active_image(),
        overlay,
        "QEMU's active image after revert"
    );
    assert_eq!(
        vm.run_state(),
        "running",
        "revert without --paused continues"
    );

    // A new boot on s1's disk: it resumes after s1's last record.
    let resumed = vm.guest.wait_ready_since(mark, BOOT_TIMEOUT);
    vm.set_reboot_action("shutdown");
    let new_boot = vm.guest.console_since(mark);
    assert_eq!(
        resumed,
        Some(in_s1),
        "the guest must resume after s1's {in_s1} records; console since the revert:\n{new_boot}"
    );
    assert!(
        !new_boot.contains("SNAPGUEST TORN"),
        "s1 is quiesced: nothing to cut off\n{new_boot}"
    );
    let written = vm
        .guest
        .wait_for_records_since(mark, in_s1 + 10, RECORD_TIMEOUT);
    let last = *written.last().expect("records after the revert");
    assert_eq!(
        written,
        (in_s1 + 1..=last).collect::<Vec<_>>(),
        "after the revert the guest numbers on from s1's {in_s1}, one record at a time"
    );

    // The abandoned overlay (records up to {lost}) is gone; s1 stays, current.
    assert!(
        !s1.overlay.exists(),
        "{} is needed by nothing after the revert and should be removed",
        s1.overlay.display()
    );
    assert_eq!(vm.chain(), [overlay.clone(), s1.frozen.clone()]);
    let (names, current) = vm.list();
    assert_eq!(names, ["s1"]);
    assert_eq!(current, "s1");
    vm.check_no_drift();
    assert_eq!(vm.frozen_image("s1"), s1.frozen);

    // The console still shows the records of before the revert: count this boot's.
    let written = vm.guest.wait_for_records_since(mark, last, SHORT);
    let last = *written.last().expect("records after the revert");
    vm.quit();

    let active = check_records(&overlay, last);
    eprintln!(
        "s1 holds {in_s1} records; the guest wrote up to {lost} before the revert and {last} \
         after; the active image holds {}",
        active.valid
    );
    let active_log = records_log(&overlay);
    assert_eq!(
        first_records(&active_log, in_s1),
        first_records(&s1_log, in_s1),
        "records 1..{in_s1} of the active image are s1's, byte for byte"
    );
    // s1's frozen image is untouched by the revert and what came after.
    assert_eq!(records_log(&s1.frozen), s1_log);
    let fs = check_filesystem(&s1.frozen);
    assert!(!fs.needs_recovery && fs.clean, "{}", fs.output);
}

/// Deleting the current snapshot while the guest writes: its boundary is the
/// active image, so the newer delta is committed down with an active commit
/// and QEMU pivots to the layer below, under the guest's writes.
pub fn active_commit_while_writing() {
    let mut vm = GuestVm::boot();
    vm.guest.wait_for_records(MIN_RECORDS, RECORD_TIMEOUT);

    let s1 = vm.take_snapshot("s1", true);
    // s1's overlay gets many more records than s2's will: committing s2's
    // small delta down is then the smaller merge, the one snapctl picks.
    vm.guest.wait_for_records(s1.after + 20, RECORD_TIMEOUT);
    let s2 = vm.take_snapshot("s2", false);
    assert_eq!(s2.frozen, s1.overlay);

    let before = vm.guest.records_seen();
    let deleted = vm.snapctl.json(&["delete", "s2"]);
    let at_return = vm.guest.records_seen();
    eprintln!("delete s2: records announced: {before} before, {at_return} when it returned");
    let disk = deleted_disk(&deleted, "s2");
    assert_eq!(disk["frozen"], path_arg(&s2.frozen), "{deleted}");
    assert_eq!(
        disk["merge"],
        json!({"operation": "commit", "top": path_arg(&s2.overlay), "base": path_arg(&s2.frozen)}),
        "{deleted}"
    );
    assert_eq!(disk["job"]["command"], "block-commit", "{deleted}");
    assert_eq!(disk["job"]["active"], true, "{deleted}");

    // QEMU pivoted to s2's frozen image, which is s1's overlay again.
    assert_eq!(
        vm.active_image(),
        s2.frozen,
        "QEMU's active image after delete"
    );
    assert_eq!(vm.run_state(), "running");
    let later = vm
        .guest
        .wait_for_records(at_return + 2 * RECORDS_AFTER, RECORD_TIMEOUT);
    assert!(
        !s2.overlay.exists(),
        "{} was committed away and should be removed",
        s2.overlay.display()
    );
    let (names, current) = vm.list();
    assert_eq!(names, ["s1"]);
    assert_eq!(current, "s1");
    assert_eq!(vm.chain(), [s1.overlay.clone(), s1.frozen.clone()]);
    assert_eq!(vm.frozen_image("s1"), s1.frozen);
    vm.check_no_drift();

    let last = vm.guest.records_seen().max(later);
    vm.quit();

    let active = check_records(&s1.overlay, last);
    eprintln!(
        "{before} records before delete, {last} at quit; the active image holds {}",
        active.valid
    );
    assert!(active.valid >= before, "{}", active.output);
    let in_s1 = s1.check_records();
    assert!(active.valid > in_s1, "{}", active.output);
    let fs = check_filesystem(&s1.frozen);
    assert!(!fs.needs_recovery && fs.clean, "{}", fs.output);
}

/// Deleting a snapshot in the middle of the tree while the guest writes:
/// the merge (commit down or stream up, whichever snapctl picks) runs as a
/// QEMU job under the guest's writes, and the snapshots on either side show
/// exactly what they showed before, byte for byte.
pub fn delete_middle_snapshot_while_running() {
    let mut vm = GuestVm::boot();
    vm.guest.wait_for_records(MIN_RECORDS, RECORD_TIMEOUT);

    let s1 = vm.take_snapshot("s1", false);
    let s2 = vm.take_snapshot("s2", true);
    let s3 = vm.take_snapshot("s3", false);
    assert_eq!(s2.frozen, s1.overlay);
    assert_eq!(s3.frozen, s2.overlay);

    let in_s1 = s1.check_records();
    let in_s3 = s3.check_records();
    let s1_log = records_log(&s1.frozen);
    let s3_log = records_log(&s3.frozen);

    let before = vm.guest.records_seen();
    let deleted = vm.snapctl.json(&["delete", "s2"]);
    let at_return = vm.guest.records_seen();
    eprintln!("delete s2: records announced: {before} before, {at_return} when it returned");
    let disk = deleted_disk(&deleted, "s2");
    assert_eq!(disk["job"]["active"], false, "{deleted}");
    let merge = &disk["merge"];
    let s3_image = match merge["operation"].as_str() {
        Some("commit") => {
            assert_eq!(merge["top"], path_arg(&s2.overlay), "{deleted}");
            assert_eq!(merge["base"], path_arg(&s2.frozen), "{deleted}");
            assert_eq!(disk["job"]["command"], "block-commit", "{deleted}");
            // s3's state now lives in the image s2 froze.
            s2.frozen.clone()
        }
        Some("stream") => {
            assert_eq!(merge["from"], path_arg(&s2.frozen), "{deleted}");
            assert_eq!(merge["into"], path_arg(&s2.overlay), "{deleted}");
            assert_eq!(disk["job"]["command"], "block-stream", "{deleted}");
            s3.frozen.clone()
        }
        _ => panic!("delete s2 must merge its boundary away: {deleted}"),
    };
    let gone = if s3_image == s3.frozen {
        &s2.frozen
    } else {
        &s2.overlay
    };
    eprintln!("delete s2 merged with a {merge}");

    assert_eq!(vm.active_image(), s3.overlay, "the active image stays");
    assert_eq!(vm.run_state(), "running");
    let later = vm
        .guest
        .wait_for_records(at_return + 2 * RECORDS_AFTER, RECORD_TIMEOUT);

    let (names, current) = vm.list();
    assert_eq!(names, ["s1", "s3"]);
    assert_eq!(current, "s3");
    let shown = vm.snapctl.json(&["show", "s3"]);
    assert_eq!(shown["parent"], "s1", "{shown}");
    assert_eq!(vm.frozen_image("s1"), s1.frozen);
    assert_eq!(vm.frozen_image("s3"), s3_image);
    assert_eq!(
        vm.chain(),
        [s3.overlay.clone(), s3_image.clone(), s1.frozen.clone()]
    );
    assert!(
        !gone.exists(),
        "{} was merged away and should be removed",
        gone.display()
    );
    vm.check_no_drift();

    // The same records, while QEMU still runs, and the same bytes.
    assert_eq!(s1.check_records_in(&s1.frozen), in_s1);
    assert_eq!(s3.check_records_in(&s3_image), in_s3);
    assert_eq!(records_log(&s1.frozen), s1_log, "s1's records.log");
    assert_eq!(records_log(&s3_image), s3_log, "s3's records.log");

    let last = vm.guest.records_seen().max(later);
    vm.quit();
    let active = check_records(&s3.overlay, last);
    eprintln!(
        "records: s1 {in_s1}, s3 {in_s3}, {before} before delete, {last} at quit; active {}",
        active.valid
    );
    assert!(active.valid > in_s3, "{}", active.output);
}
