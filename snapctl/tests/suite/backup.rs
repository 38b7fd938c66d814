//! `backup`: a temporary snapshot, a standalone copy of every disk as of it,
//! the temporary overlays committed back. The copies hold the disks' data,
//! the chain and the record afterwards are as before, what runs is what
//! `--dry-run` printed, and an interrupted backup is rolled back.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;

use integration::image;
use serde_json::Value;

use crate::util::{K64, M1, Vm, read_if_exists};

/// The record's chains, snapshots and current snapshot (what a backup must
/// leave as it found them).
fn shape(vm: &Vm) -> Value {
    let record = vm.snapctl.record();
    serde_json::json!({
        "disks": record["disks"], "layers": record["layers"],
        "snapshots": record["snapshots"], "current": record["current"],
    })
}

fn same_content(a: &Path, b: &Path) -> bool {
    Command::new("qemu-img")
        .args(["compare", "-q", "-U"])
        .arg(a)
        .arg(b)
        .status()
        .expect("qemu-img: run scripts/setup")
        .success()
}

#[test]
fn backup_copies_every_disk_and_leaves_the_chain_as_it_was() {
    let mut vm = Vm::two_disks();
    vm.monitor.write("vda", 0x11, M1, K64);
    vm.snapctl.args(["create", "s1"]).ok();
    vm.monitor.write("vda", 0x22, 2 * M1, K64);
    vm.monitor.write("vdb", 0x23, M1, K64);
    let before = shape(&vm);
    let out = vm.dir.join("backups");
    std::fs::create_dir(&out).unwrap();
    let dir = out.to_str().unwrap();

    let planned = vm
        .snapctl
        .args(["backup", "b1", "--to", dir, "--dry-run"])
        .json();
    assert_eq!(shape(&vm), before, "a dry run changed the record");
    let log = vm.dir.join("backup-steps.jsonl");
    let report = vm
        .snapctl
        .args(["backup", "b1", "--to", dir])
        .env("SNAPCTL_STEP_LOG", log.to_str().unwrap())
        .json();
    let done: Vec<Value> = String::from_utf8(read_if_exists(&log).unwrap())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(
        planned["steps"].as_array().unwrap(),
        &done,
        "the backup ran other steps than its dry run printed"
    );

    assert_eq!(shape(&vm), before, "the chain or the snapshots changed");
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], Value::Array(Vec::new()), "{check}");
    for disk in ["vda", "vdb"] {
        let copy = out.join(format!("{disk}.b1.qcow2"));
        assert!(
            report["images"]
                .as_array()
                .unwrap()
                .contains(&Value::from(copy.to_str().unwrap())),
            "{report}"
        );
        assert_eq!(
            image::backing_file(&copy),
            None,
            "{disk}: a standalone copy"
        );
        let active = vm.snapctl.record()["disks"][disk]["active"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            same_content(Path::new(&active), &copy),
            "{disk}: the copy differs"
        );
    }
    let vda = out.join("vda.b1.qcow2");
    assert!(image::read_pattern_ok(&vda, 0x11, M1, K64));
    assert!(image::read_pattern_ok(&vda, 0x22, 2 * M1, K64));
    // The guest's disks go on as before the backup.
    vm.monitor.write("vda", 0x33, 3 * M1, K64);
    vm.snapctl.args(["create", "s2"]).ok();
}

#[test]
fn an_interrupted_backup_is_rolled_back() {
    let vm = Vm::two_disks();
    vm.snapctl.args(["create", "s1"]).ok();
    let before = shape(&vm);
    let out = vm.dir.join("backups");
    std::fs::create_dir(&out).unwrap();
    // snapctl dies right after the copies, as the merge back's jobs start.
    let died = vm
        .snapctl
        .args(["backup", "b1", "--to", out.to_str().unwrap()])
        .env("SNAPCTL_FAULT", "jobs:started")
        .run();
    assert_eq!(died.status.signal(), Some(9), "{died:?}");
    let repair = vm.snapctl.args(["check", "--repair"]).stdout();
    assert!(repair.contains("rolled back the backup b1"), "{repair}");
    assert_eq!(
        std::fs::read_dir(&out).unwrap().count(),
        0,
        "the partial copies stay"
    );
    let list = vm.snapctl.args(["list"]).json();
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["s1"], "{list}");
    assert!(vm.snapctl.record().get("backup").is_none());
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], Value::Array(Vec::new()), "{check}");
    // The chain may keep the temporary layer when its merge was cut short;
    // the snapshots are as they were.
    assert_eq!(before["snapshots"], shape(&vm)["snapshots"]);
}
