//! A chain changed outside snapctl: `check` names the drift and what to do,
//! `check --repair` says when it cannot repair, `check --repair --adopt`
//! records QEMU's chain as it is, and the snapshots still work afterwards.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::util::Vm;

#[test]
fn a_stream_by_hand_is_adopted_on_request() {
    let mut vm = Vm::two_disks();
    vm.snapctl.args(["create", "s1"]).ok();
    vm.monitor.write("vda", 0x21, 0, 65536);
    vm.snapctl.args(["create", "s2"]).ok();
    let root = vm.monitor.block_state().roots["vda"].node.clone();

    // Someone streams the whole chain into vda's active image by hand.
    vm.monitor.ok(
        "block-stream",
        json!({ "job-id": "by-hand", "device": root }),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !vm.monitor.jobs().is_empty() {
        assert!(Instant::now() < deadline, "the stream did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }

    let check = vm.snapctl.args(["check", "--json"]).run();
    assert_eq!(check.status.code(), Some(3), "{check:?}");
    let report: Value = serde_json::from_slice(&check.stdout).unwrap();
    let backing = report["drift"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["kind"] == "backing")
        .unwrap_or_else(|| panic!("no backing drift: {report}"));
    assert!(
        backing["remedy"].as_str().unwrap().contains("--adopt"),
        "{report}"
    );

    // --repair alone cannot tell what to adopt, and says what would.
    let repair = vm.snapctl.args(["check", "--repair"]).run();
    assert_eq!(repair.status.code(), Some(3), "{repair:?}");
    let text = String::from_utf8_lossy(&repair.stdout);
    assert!(
        text.contains("what to do") && text.contains("--adopt"),
        "{text}"
    );

    let adopt = vm.snapctl.args(["check", "--repair", "--adopt"]).run();
    assert_eq!(adopt.status.code(), Some(0), "{adopt:?}");
    let text = String::from_utf8_lossy(&adopt.stdout);
    assert!(text.contains("recorded QEMU's chain"), "{text}");
    let check = vm.snapctl.args(["check"]).run();
    assert!(check.status.success(), "{check:?}");

    // s2's frozen image still holds s2 (a stream leaves it as it was).
    vm.snapctl.args(["revert", "s2"]).ok();
    vm.quit();
    let active = vm.snapctl.record()["disks"]["vda"]["active"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(integration::image::read_pattern_ok(
        active.as_ref(),
        0x21,
        0,
        65536
    ));
}
