//! `clone` and `forget`: thin VMs standing on a snapshot's frozen images. The
//! clone reads the snapshot's data, its writes never reach the template's
//! images, the source VM never writes, merges away or removes an image the
//! clone stands on, and `forget` drops the clone and unpins.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use integration::{QemuBuilder, image};
use serde_json::Value;

use crate::util::{K64, M1, Monitor, Snapctl, Vm};

fn sha(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn digests(paths: &[PathBuf]) -> BTreeMap<PathBuf, Vec<u8>> {
    paths.iter().map(|p| (p.clone(), sha(p))).collect()
}

#[test]
fn a_clone_stands_on_a_template_that_never_changes_under_it() {
    let mut vm = Vm::two_disks();
    vm.monitor.write("vda", 0x11, M1, K64);
    vm.snapctl.args(["create", "s1"]).ok();
    vm.monitor.write("vda", 0x22, 2 * M1, K64);
    vm.snapctl.args(["create", "s2"]).ok();
    let dir = vm.dir.join("clone");
    std::fs::create_dir(&dir).unwrap();

    let report = vm
        .snapctl
        .args(["clone", "s2", "--to", "vm2", "--dir", dir.to_str().unwrap()])
        .json();
    assert_eq!(report["vm"], "vm2", "{report}");
    let clone = Snapctl::new(vm.snapctl.state_dir(), "vm2", vm.dir.join("vm2.sock"));
    let list = clone.args(["list"]).json();
    assert_eq!(list["clone_of"]["vm"], "vm1", "{list}");
    assert_eq!(list["clone_of"]["snapshot"], "s2", "{list}");

    // The template: s2's frozen images and everything under them.
    let template: Vec<PathBuf> = ["vda", "vdb"]
        .iter()
        .flat_map(|d| {
            let frozen = report["disks"][d]["image"].as_str().unwrap();
            image::backing_chain(Path::new(frozen))
        })
        .collect();
    let before = digests(&template);

    // The clone starts from its qemu-args while the source VM runs (the
    // template's layers open read-only in both) and reads s2's data.
    let args: Vec<String> = serde_json::from_value(clone.args(["qemu-args"]).json()).unwrap();
    let socket = vm.dir.join("vm2.sock");
    let mut qemu = QemuBuilder::new()
        .log_dir(vm.dir.path())
        .args(&args)
        .qmp(&socket)
        .qmp(vm.dir.join("vm2-test.sock"))
        .spawn()
        .expect("the clone starts beside its source");
    let mut monitor = Monitor::connect(vm.dir.join("vm2-test.sock"));
    monitor.write("vda", 0x77, M1, K64);
    monitor.hmp("qemu-io -d /machine/peripheral/vda/virtio-backend \"flush\"");
    let vda = dir.join("vda.vm2.qcow2");
    assert!(image::read_pattern_ok(&vda, 0x77, M1, K64));
    assert!(image::read_pattern_ok(&vda, 0x22, 2 * M1, K64), "s2's data");
    clone.args(["create", "c1"]).ok();

    // The source VM goes on: deleting s2 and s1 never writes, merges away or
    // removes an image the clone stands on.
    let delete = vm.snapctl.args(["delete", "s2"]).stdout();
    vm.snapctl.args(["delete", "s1"]).ok();
    for path in &template {
        assert!(path.exists(), "{} was removed: {delete}", path.display());
    }
    vm.quit();
    monitor.quit();
    qemu.quit_or_kill(std::time::Duration::from_secs(5));
    assert_eq!(digests(&template), before, "a template image changed");
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], Value::Array(Vec::new()), "{check}");

    // forget drops the clone (and its own files) and unpins.
    let forgot = clone.args(["forget", "--files"]).stdout();
    assert!(forgot.contains("unpinned"), "{forgot}");
    assert!(!vm.snapctl.state_dir().join("vm2.json").exists());
    assert!(!vda.exists(), "the clone's own overlay stays");
    assert!(vm.snapctl.record().get("pins").is_none());
    for path in &template {
        assert!(path.exists(), "forget removed {}", path.display());
    }
}

#[test]
fn clone_refusals_change_nothing() {
    let vm = Vm::two_disks();
    vm.snapctl.args(["create", "s1"]).ok();
    let dir = vm.dir.join("c");
    std::fs::create_dir(&dir).unwrap();
    let record = vm.snapctl.record_bytes();
    vm.snapctl
        .args(["clone", "s1", "--to", "vm1", "--dir", dir.to_str().unwrap()])
        .error_line(&["another name"]);
    vm.snapctl
        .args(["clone", "s1", "--to", "vm2", "--dir", "/nonexistent"])
        .error_line(&["does not exist"]);
    vm.snapctl
        .args([
            "clone",
            "nope",
            "--to",
            "vm2",
            "--dir",
            dir.to_str().unwrap(),
        ])
        .error_line(&["no snapshot", "nope"]);
    assert_eq!(vm.snapctl.record_bytes(), record);
    assert!(!vm.snapctl.state_dir().join("vm2.json").exists());
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);

    // A clone's source keeps its pinned layers through commit, too.
    vm.snapctl
        .args(["clone", "s1", "--to", "vm2", "--dir", dir.to_str().unwrap()])
        .ok();
    vm.snapctl.args(["create", "s2"]).ok();
    vm.snapctl
        .args(["forget"])
        .error_line(&["vm2", "forget the clones first"]);
}
