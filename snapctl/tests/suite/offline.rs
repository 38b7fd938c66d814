//! Snapshots taken while QEMU is stopped (as `virsh snapshot-create-as
//! --disk-only` does for an inactive domain): the overlays are written on the
//! recorded active images and recorded, and QEMU restarted from `qemu-args`
//! runs on them with the data intact.

use std::path::PathBuf;

use integration::image;
use serde_json::Value;

use crate::util::{K64, M1, Snapctl, Vm};

fn active(vm: &Vm, disk: &str) -> PathBuf {
    PathBuf::from(
        vm.snapctl.record()["disks"][disk]["active"]
            .as_str()
            .unwrap(),
    )
}

#[test]
fn create_with_qemu_stopped_then_restart_from_qemu_args() {
    let mut vm = Vm::two_disks();
    vm.snapctl.args(["create", "s1"]).ok();
    vm.monitor.write("vda", 0x5a, M1, K64);
    vm.monitor.write("vdb", 0x5b, M1, K64);
    let s1_overlays = [active(&vm, "vda"), active(&vm, "vdb")];
    vm.quit();

    // QEMU is stopped: the snapshot is taken offline.
    let created = vm.snapctl.args(["create", "s2", "-d", "offline"]).json();
    assert_eq!(created["snapshot"], "s2", "{created}");
    for (disk, frozen) in ["vda", "vdb"].iter().zip(&s1_overlays) {
        assert_eq!(created["disks"][disk]["image"], frozen.to_str().unwrap());
        let overlay = active(&vm, disk);
        assert_eq!(created["disks"][disk]["overlay"], overlay.to_str().unwrap());
        assert_eq!(overlay, vm.image(&format!("{disk}.s2.qcow2")));
        assert_eq!(
            image::backing_file(&overlay).as_deref(),
            frozen.to_str(),
            "{disk}: the overlay's header names the frozen image"
        );
    }
    let list = vm.snapctl.args(["list"]).json();
    assert_eq!(list["current"], "s2", "{list}");
    let check = vm.snapctl.args(["check"]).run();
    assert!(check.status.success(), "{check:?}");

    // A snapshot of a VM that is not registered cannot be taken offline.
    Snapctl::new(vm.snapctl.state_dir(), "vm7", vm.dir.join("sc.sock"))
        .args(["create", "x"])
        .error_line(&["vm7", "not running"]);
    assert!(!vm.snapctl.state_dir().join("vm7.json").exists());

    // QEMU started from qemu-args runs on the new overlays and reads what
    // was written before the snapshot.
    let args: Vec<String> = serde_json::from_value(vm.snapctl.args(["qemu-args"]).json())
        .expect("qemu-args --json is an array of strings");
    vm.restart(&args);
    let state = vm.monitor.block_state();
    for disk in ["vda", "vdb"] {
        assert_eq!(state.root_file(disk), active(&vm, disk), "{disk}");
    }
    let overlay = active(&vm, "vda");
    assert!(image::read_pattern_ok(&overlay, 0x5a, M1, K64));
    assert!(image::read_pattern_ok(&active(&vm, "vdb"), 0x5b, M1, K64));

    // And the chain is live again: a revert to s1 drops the offline layer.
    vm.snapctl.args(["revert", "s1"]).ok();
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], Value::Array(Vec::new()), "{check}");
}
