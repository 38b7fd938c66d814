//! The snapshot bookkeeping a virsh user expects: `current`, `describe`,
//! `rename` (the record only: image files keep their names), and
//! `create --overlay ID=PATH --reuse-external` with a prepared overlay.

use integration::image;
use serde_json::Value;

use crate::util::{DISK_SIZE, Vm, dir_listing};

#[test]
fn current_describe_and_rename_change_only_the_record() {
    let vm = Vm::two_disks();
    vm.snapctl.args(["init"]).ok();
    let current = vm.snapctl.args(["current"]).json();
    assert_eq!(current["current"], Value::Null, "{current}");
    vm.snapctl.args(["create", "s1"]).ok();
    vm.snapctl.args(["create", "s2"]).ok();
    assert_eq!(vm.snapctl.args(["current"]).stdout(), "s2\n");

    let shown = vm
        .snapctl
        .args(["describe", "s1", "before the upgrade"])
        .json();
    assert_eq!(shown["description"], "before the upgrade", "{shown}");
    let shown = vm.snapctl.args(["show", "s1"]).json();
    assert_eq!(shown["description"], "before the upgrade", "{shown}");
    vm.snapctl.args(["describe", "s1", ""]).ok();
    let shown = vm.snapctl.args(["show", "s1"]).json();
    assert_eq!(shown["description"], Value::Null, "{shown}");

    let images = dir_listing(&vm.images());
    vm.snapctl.args(["rename", "s1", "golden"]).ok();
    vm.snapctl.args(["rename", "s2", "after"]).ok();
    assert_eq!(dir_listing(&vm.images()), images, "rename moved files");
    let list = vm.snapctl.args(["list"]).json();
    assert_eq!(list["current"], "after", "{list}");
    let names: Vec<(&str, &Value)> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), &s["parent"]))
        .collect();
    assert_eq!(
        names,
        [("golden", &Value::Null), ("after", &Value::from("golden"))]
    );
    // The renamed snapshots work as before.
    vm.snapctl.args(["revert", "golden"]).ok();
    assert_eq!(vm.snapctl.args(["current"]).stdout(), "golden\n");

    let record = vm.snapctl.record_bytes();
    vm.snapctl
        .args(["rename", "golden", "after"])
        .error_line(&["already has a snapshot", "after"]);
    vm.snapctl
        .args(["rename", "nope", "x"])
        .error_line(&["no snapshot", "nope"]);
    vm.snapctl
        .args(["rename", "golden", "a/b"])
        .error_line(&["invalid snapshot name"]);
    vm.snapctl
        .args(["describe", "nope", "x"])
        .error_line(&["no snapshot", "nope"]);
    assert_eq!(
        vm.snapctl.record_bytes(),
        record,
        "a refusal changed the record"
    );
}

#[test]
fn reuse_external_takes_a_prepared_empty_overlay() {
    let mut vm = Vm::two_disks();
    let base = vm.image("base.qcow2");
    let prepared = vm.dir.join("prepared.qcow2");
    image::create_overlay(&prepared, &base, "qcow2");

    // Without --reuse-external an existing file is never used.
    let overlay_arg = format!("vda={}", prepared.display());
    vm.snapctl
        .args(["create", "s1", "--overlay", &overlay_arg])
        .error_line(&["already exists"]);

    // A prepared overlay that already holds data is refused. (QEMU holds the
    // base, so the data goes in over a spare image first, then the header is
    // pointed at the base.)
    let dirty = vm.dir.join("dirty.qcow2");
    let spare = vm.dir.join("spare.qcow2");
    image::create_qcow2(&spare, DISK_SIZE);
    image::create_overlay(&dirty, &spare, "qcow2");
    image::write_pattern(&dirty, 0x33, 0, 4096);
    let rebased = std::process::Command::new("qemu-img")
        .args(["rebase", "-q", "-u", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&dirty)
        .status()
        .unwrap();
    assert!(rebased.success());
    let before = vm.untouched_state();
    vm.snapctl
        .args([
            "create",
            "s1",
            "--reuse-external",
            "--overlay",
            &format!("vda={}", dirty.display()),
        ])
        .error_line(&["--reuse-external", "already holds data"]);
    vm.assert_untouched(&before, "a refused --reuse-external");

    let created = vm
        .snapctl
        .args([
            "create",
            "s1",
            "--reuse-external",
            "--overlay",
            &overlay_arg,
        ])
        .json();
    assert_eq!(
        created["disks"]["vda"]["overlay"],
        prepared.to_str().unwrap()
    );
    assert_eq!(vm.monitor.block_state().root_file("vda"), prepared);
    assert_eq!(
        image::backing_file(&prepared).as_deref(),
        base.to_str(),
        "the prepared header was kept"
    );
    vm.monitor.write("vda", 0x44, 0, 65536);
    vm.quit();
    assert!(image::read_pattern_ok(&prepared, 0x44, 0, 65536));
    assert_eq!(image::info(&prepared)["virtual-size"], DISK_SIZE);
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], Value::Array(Vec::new()), "{check}");
}
