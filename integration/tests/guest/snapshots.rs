//! Snapshots of a running guest that keeps writing: quiesced through the
//! guest agent or crash-consistent, one or several in a row.
//!
//! What the console proves about a snapshot: every record announced before
//! `snapctl create` started was durable, so the frozen image holds at least
//! that many. The guest writes one record at a time, so once the console has
//! announced a few more records after `create` returned, the frozen image
//! cannot hold more than that count. The records and the ext4 filesystem
//! inside every frozen image are verified with `scripts/check-records`,
//! `dumpe2fs` and `e2fsck`.

use integration::guest::{DISK_ID, check_records};
use qmp_client::FreezeStatus;

use crate::vm::{GuestVm, MIN_RECORDS, RECORD_TIMEOUT, Snapshot, path_arg};

/// A quiesced snapshot taken while the guest writes: the frozen image's
/// filesystem is clean without journal recovery and holds every record
/// announced before the snapshot, none torn; the agent thawed the guest.
pub fn quiesced_snapshot_is_clean() {
    let mut vm = GuestVm::boot();
    vm.guest.wait_for_records(MIN_RECORDS, RECORD_TIMEOUT);

    let s1 = vm.take_snapshot("s1", true);
    assert_eq!(s1.frozen, vm.guest.disk(), "s1 freezes the base image");
    assert_eq!(vm.freeze_status(), FreezeStatus::Thawed);

    // QEMU still runs; the frozen image no longer changes.
    s1.check_filesystem();
    let in_s1 = s1.check_records();

    let last = vm.guest.records_seen();
    vm.quit();
    let active = check_records(&s1.overlay, last);
    assert!(active.valid > in_s1, "{}", active.output);
}

/// A snapshot without the agent: the frozen image is crash-consistent, its
/// journal replays to a clean filesystem, and the records up to the
/// snapshot are intact.
pub fn crash_consistent_snapshot_recovers() {
    let mut vm = GuestVm::boot();
    vm.guest.wait_for_records(MIN_RECORDS, RECORD_TIMEOUT);

    let s1 = vm.take_snapshot("s1", false);
    assert_eq!(s1.frozen, vm.guest.disk(), "s1 freezes the base image");

    s1.check_filesystem();
    let in_s1 = s1.check_records();

    let last = vm.guest.records_seen();
    vm.quit();
    let active = check_records(&s1.overlay, last);
    assert!(active.valid > in_s1, "{}", active.output);
}

/// Three snapshots (the second quiesced) while the guest writes: QEMU
/// switches to each new overlay, the guest writes on after each, and once
/// QEMU has quit every image of the chain holds a valid prefix of the
/// records, longer from one snapshot to the next.
pub fn keeps_writing_after_snapshots() {
    let mut vm = GuestVm::boot();
    vm.guest.wait_for_records(MIN_RECORDS, RECORD_TIMEOUT);

    let snapshots = [
        vm.take_snapshot("s1", false),
        vm.take_snapshot("s2", true),
        vm.take_snapshot("s3", false),
    ];
    assert_eq!(snapshots[0].frozen, vm.guest.disk());
    assert_eq!(snapshots[1].frozen, snapshots[0].overlay);
    assert_eq!(snapshots[2].frozen, snapshots[1].overlay);
    vm.snapctl.ok(&["check"]);
    let list = vm.snapctl.json(&["list"]);
    assert_eq!(list["current"], "s3", "{list}");

    let last = vm.guest.records_seen();
    vm.quit();

    let chain = vm.snapctl.json(&["chain"]);
    let images: Vec<&str> = chain["disks"][DISK_ID]
        .as_array()
        .unwrap_or_else(|| panic!("{chain}"))
        .iter()
        .map(|layer| layer["image"].as_str().unwrap_or_else(|| panic!("{chain}")))
        .collect();
    let expected: Vec<String> = [
        &snapshots[2].overlay,
        &snapshots[1].overlay,
        &snapshots[0].overlay,
        &snapshots[0].frozen,
    ]
    .map(|p| path_arg(p))
    .to_vec();
    assert_eq!(images, expected, "{chain}");

    let mut counts: Vec<u64> = snapshots.iter().map(Snapshot::check_records).collect();
    let active = check_records(&snapshots[2].overlay, last);
    counts.push(active.valid);
    eprintln!("valid records in s1, s2, s3, active: {counts:?}");
    assert!(
        counts.windows(2).all(|w| w[0] < w[1]),
        "each image holds more records than the one it was frozen before: {counts:?}"
    );
}
