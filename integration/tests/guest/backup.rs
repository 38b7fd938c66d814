//! `backup` of the running test guest while its workload writes: the copy is
//! a standalone image with a clean (quiesced) filesystem holding the records
//! up to the backup's instant, and the chain afterwards is the chain before.

use integration::guest::{check_filesystem, check_records};

use crate::vm::{GuestVm, MIN_RECORDS, RECORD_TIMEOUT, path_of};

pub fn backup_while_writing_leaves_the_chain_as_it_was() {
    let mut vm = GuestVm::boot();
    vm.guest.wait_for_records(MIN_RECORDS, RECORD_TIMEOUT);
    vm.snapctl.ok(&["create", "s1"]);
    let chain_before = vm.chain();
    let (names_before, _) = vm.list();

    let out = vm.dir().join("backups");
    std::fs::create_dir(&out).unwrap();
    let before = vm.guest.records_seen();
    let qga = vm.qga();
    let report = vm.snapctl.json(&[
        "backup",
        "b1",
        "--to",
        out.to_str().unwrap(),
        "--quiesce",
        "--qga",
        &qga,
    ]);
    let after = vm.guest.records_seen();
    eprintln!("backup b1: records announced {before} before, {after} after\n{report}");
    let copy = path_of(&report["images"][0], &report);

    // The chain, the snapshots and the guest go on as before.
    assert_eq!(vm.chain(), chain_before, "the chain changed");
    let (names, _) = vm.list();
    assert_eq!(names, names_before, "{report}");
    vm.check_no_drift();
    assert_eq!(vm.run_state(), "running");
    vm.guest.wait_for_records(after + 5, RECORD_TIMEOUT);
    vm.quit();

    // The copy: quiesced, clean, the records up to the backup.
    let records = check_records(&copy, before);
    assert!(
        records.valid >= before && records.valid <= after + 1,
        "{} holds {} records; {before} were announced before the backup, {after} after\n{}",
        copy.display(),
        records.valid,
        records.output
    );
    assert!(records.quiesced, "{}", records.output);
    let fs = check_filesystem(&copy);
    assert!(!fs.needs_recovery && fs.clean, "{}", fs.output);
}
