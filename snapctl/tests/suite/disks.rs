//! Which disks snapctl covers, and which QEMU a record belongs to: a writable
//! disk whose `-device` has no `id=` is never silently left out of a
//! snapshot; one QEMU is never registered under two VM names.

use integration::{QemuBuilder, WorkDir, image};
use serde_json::Value;

use crate::util::{DISK_SIZE, Snapctl, Vm};

/// A VM with `vda` (`-blockdev` + `id=vda`) and a second writable disk whose
/// `-device` has no `id=` (QEMU files it under `/machine/peripheral-anon/`),
/// plus a spare QMP monitor for a second registration attempt.
fn vm_with_anonymous_disk() -> Vm {
    let dir = WorkDir::new();
    std::fs::create_dir(dir.join("img")).unwrap();
    let base = dir.join("img/base.qcow2");
    let other = dir.join("img/other.qcow2");
    image::create_qcow2(&base, DISK_SIZE);
    image::create_qcow2(&other, DISK_SIZE);
    let builder = QemuBuilder::new()
        .blockdev_chain("vda", &[("base", &base)])
        .blockdev(integration::qcow2_layer("drv2", &other, None))
        .device("virtio-blk-pci,drive=drv2");
    Vm::start(dir, builder)
}

/// The QOM path QEMU gave the device without an id.
fn anonymous_path(vm: &mut Vm) -> String {
    let blocks = vm.monitor.ok("query-block", Value::Null);
    let qdev = blocks
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|b| b["qdev"].as_str())
        .find(|q| q.starts_with("/machine/peripheral-anon/"))
        .unwrap_or_else(|| panic!("no anonymous disk in {blocks}"))
        .to_owned();
    qdev.trim_end_matches("/virtio-backend").to_owned()
}

#[test]
fn a_disk_without_id_is_never_left_out_silently() {
    let mut vm = vm_with_anonymous_disk();
    let anon = anonymous_path(&mut vm);

    // init registers vda and says why the other disk is not registered.
    let init = vm.snapctl.args(["init"]).ok();
    let stderr = String::from_utf8_lossy(&init.stderr);
    assert!(
        stderr.contains(&anon) && stderr.contains("id="),
        "init does not name the disk without id=: {stderr}"
    );
    let record = vm.snapctl.record();
    let disks: Vec<&String> = record["disks"].as_object().unwrap().keys().collect();
    assert_eq!(disks, ["vda"]);

    // A snapshot of "every writable disk" refuses, naming the disk and both ways out.
    let before = vm.untouched_state();
    let line = vm
        .snapctl
        .args(["create", "s1"])
        .error_line(&[&anon, "id=", "--exclude"]);
    assert!(line.contains("no id="), "{line}");
    vm.assert_untouched(&before, "create with a disk without id=");

    // check names it as a disk snapshots do not cover.
    let check = vm.snapctl.args(["check", "--json"]).run();
    assert_eq!(check.status.code(), Some(3), "{check:?}");
    let report: Value = serde_json::from_slice(&check.stdout).unwrap();
    let kinds: Vec<(&str, &str)> = report["drift"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| (d["kind"].as_str().unwrap(), d["disk"].as_str().unwrap()))
        .collect();
    assert_eq!(kinds, [("unmanaged-disk", anon.as_str())]);

    // Left out on purpose, the snapshot covers vda.
    let created = vm.snapctl.args(["create", "s1", "--exclude", &anon]).json();
    let covered: Vec<&String> = created["disks"].as_object().unwrap().keys().collect();
    assert_eq!(covered, ["vda"], "{created}");
}

#[test]
fn one_qemu_is_registered_once() {
    let dir = WorkDir::new();
    std::fs::create_dir(dir.join("img")).unwrap();
    let base = dir.join("img/base.qcow2");
    image::create_qcow2(&base, DISK_SIZE);
    let spare = dir.join("spare.sock");
    let builder = QemuBuilder::new()
        .blockdev_chain("vda", &[("base", &base)])
        .qmp(&spare);
    let vm = Vm::start(dir, builder);
    vm.snapctl.args(["init"]).ok();
    vm.snapctl.args(["create", "s1"]).ok();
    let record = vm.snapctl.record_bytes();

    // The same socket under another name.
    let again = Snapctl::new(vm.snapctl.state_dir(), "vm9", vm.dir.join("sc.sock"));
    let line = again
        .args(["init"])
        .error_line(&["already registered", "vm1", "same QMP socket"]);
    assert!(line.contains("--vm vm1"), "{line}");
    // The same QEMU through another monitor: it writes vm1's images.
    let other = Snapctl::new(vm.snapctl.state_dir(), "vm9", &spare);
    for args in [["init"].as_slice(), ["create", "x"].as_slice()] {
        other
            .args(args)
            .error_line(&["already registered", "vm1", "vda.s1.qcow2"]);
    }
    assert!(!vm.snapctl.state_dir().join("vm9.json").exists());
    assert_eq!(vm.snapctl.record_bytes(), record, "vm1's record changed");
    let check = vm.snapctl.args(["check"]).run();
    assert!(check.status.success(), "{check:?}");
}
