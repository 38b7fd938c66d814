//! Persistent dirty bitmaps (what incremental backup tools track changes
//! with) follow the active image: carried, with their bits, to every overlay
//! a snapshot or a revert puts on the disk, and kept through a delete's
//! merge, so the bitmap on the active image covers exactly the clusters
//! written since it began.

use serde_json::{Value, json};

use crate::util::{K64, M1, Vm};

/// The active node's bitmap `name`: how many bytes it marks dirty.
fn dirty_bytes(vm: &mut Vm, disk: &str, name: &str) -> Option<u64> {
    let root = vm.monitor.block_state().roots[disk].node.clone();
    let nodes = vm
        .monitor
        .ok("query-named-block-nodes", json!({"flat": true}));
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == root)?["dirty-bitmaps"]
        .as_array()?
        .iter()
        .find(|b| b["name"] == name)
        .map(|b| b["count"].as_u64().unwrap())
}

#[test]
fn a_bitmap_covers_exactly_the_written_clusters_through_create_delete_and_revert() {
    let mut vm = Vm::two_disks();
    vm.monitor.ok(
        "block-dirty-bitmap-add",
        json!({"node": "base", "name": "b0", "persistent": true}),
    );
    vm.monitor.write("vda", 0x11, 0, K64);
    assert_eq!(dirty_bytes(&mut vm, "vda", "b0"), Some(K64));

    vm.snapctl.args(["create", "s1"]).ok();
    assert_eq!(
        dirty_bytes(&mut vm, "vda", "b0"),
        Some(K64),
        "carried to s1's overlay"
    );
    vm.monitor.write("vda", 0x22, M1, K64);
    vm.snapctl.args(["create", "s2"]).ok();
    vm.monitor.write("vda", 0x33, 2 * M1, K64);
    assert_eq!(dirty_bytes(&mut vm, "vda", "b0"), Some(3 * K64));

    // An active commit (s2's layer into s1's) keeps every bit.
    vm.snapctl.args(["delete", "s2"]).ok();
    assert_eq!(
        dirty_bytes(&mut vm, "vda", "b0"),
        Some(3 * K64),
        "after delete s2"
    );

    // A revert: the new overlay starts from the bits of the state it leaves.
    vm.snapctl.args(["revert", "s1"]).ok();
    assert_eq!(
        dirty_bytes(&mut vm, "vda", "b0"),
        Some(3 * K64),
        "after revert"
    );
    vm.monitor.write("vda", 0x44, 3 * M1, K64);
    assert_eq!(dirty_bytes(&mut vm, "vda", "b0"), Some(4 * K64));

    // chain shows it on the active image.
    let chain = vm.snapctl.args(["chain", "vda"]).json();
    assert_eq!(
        chain["disks"]["vda"][0]["bitmaps"],
        json!(["b0"]),
        "{chain}"
    );
    let text = vm.snapctl.args(["chain", "vda"]).stdout();
    assert!(
        text.lines().nth(1).unwrap().contains("bitmaps b0"),
        "{text}"
    );

    // vdb had no bitmap: none appears.
    assert_eq!(dirty_bytes(&mut vm, "vdb", "b0"), None);
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], Value::Array(Vec::new()), "{check}");
}
