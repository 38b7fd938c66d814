//! The node map: after an operation, the record says which file each node of
//! the disks' chains has open in that QEMU process, and a merge (delete,
//! commit, pull) then finds its nodes from the node names alone instead of
//! QEMU's description of every layer. Whatever the map cannot vouch for
//! (another QEMU process, a node someone else added) sends snapctl back to
//! reading the whole graph.

use serde_json::json;

use crate::util::history::{assert_check_clean, assert_live_consistent};
use crate::util::{History, K64, LiveReads, Pattern, Vm};

const PATTERN: Pattern = Pattern {
    offsets: &[0, K64, 2 * K64, 3 * K64, 4 * K64],
    bulk: None,
};

/// The QMP commands a snapctl run sent (from its debug log).
fn commands_sent(vm: &Vm, args: &[&str]) -> Vec<String> {
    let output = vm.snapctl.args(args).env("SNAPCTL_LOG", "debug").ok();
    String::from_utf8_lossy(&output.stderr)
        .lines()
        .filter_map(|l| l.split("command=\"").nth(1)?.split('"').next())
        .map(str::to_owned)
        .collect()
}

/// Whether `commands` include one of QEMU's descriptions of every layer.
fn describes_layers(commands: &[String]) -> bool {
    commands
        .iter()
        .any(|c| c == "query-block" || c == "query-named-block-nodes")
}

#[test]
fn merges_find_their_nodes_by_name_while_the_graph_is_snapctls() {
    let mut vm = Vm::two_disks();
    vm.snapctl.args(["init"]).ok();
    let mut history = History::new(PATTERN);
    for (i, name) in ["s1", "s2", "s3", "s4"].into_iter().enumerate() {
        history.write(&mut vm, i as u64 * K64, 0x11 * (i as u8 + 1));
        history.create(&mut vm, name);
    }
    let map = vm.snapctl.record()["node_map"].clone();
    assert_eq!(map["qemu"]["pid"], json!(vm.qemu.pid()), "{map}");

    // After snapctl's own operations a merge plans on node names alone.
    let sent = commands_sent(&vm, &["delete", "s2"]);
    assert!(!describes_layers(&sent), "delete s2 sent {sent:?}");
    assert!(
        sent.iter()
            .any(|c| c == "block-commit" || c == "block-stream"),
        "{sent:?}"
    );
    history.removed("s2");
    assert_live_consistent(&mut vm, "delete s2 by node names");
    assert_check_clean(&vm, true, "delete s2 by node names");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after delete s2", &history);

    // Another QEMU process: the same names need not be the same nodes. (Its
    // backing layers are opened read-only, as qemu-args gives them: the
    // delete's merge writes into one, which QEMU must be able to reopen.)
    let args: Vec<String> = serde_json::from_value(vm.snapctl.args(["qemu-args"]).json()).unwrap();
    vm.quit();
    reads.assert_ok(&vm);
    vm.restart(args);
    let sent = commands_sent(&vm, &["delete", "s3"]);
    assert!(
        describes_layers(&sent),
        "delete after a restart sent {sent:?}"
    );
    history.removed("s3");
    assert_live_consistent(&mut vm, "delete s3 after a restart");
    // That delete mapped the new process's nodes.
    assert_eq!(
        vm.snapctl.record()["node_map"]["qemu"]["pid"],
        json!(vm.qemu.pid())
    );
    let sent = commands_sent(&vm, &["delete", "--dry-run", "s4"]);
    assert!(!describes_layers(&sent), "{sent:?}");

    // A node added behind snapctl's back: the map no longer covers the graph.
    let root = vm.monitor.block_state().roots["vdb"].node.clone();
    let outside = vm.dir.join("outside.qcow2");
    vm.monitor.ok(
        "blockdev-snapshot-sync",
        json!({"node-name": root, "snapshot-file": outside,
               "snapshot-node-name": "outside", "format": "qcow2"}),
    );
    let sent = commands_sent(&vm, &["delete", "--dry-run", "s4"]);
    assert!(
        describes_layers(&sent),
        "after a snapshot outside snapctl: {sent:?}"
    );
    vm.quit();
}
