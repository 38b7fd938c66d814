//! `snapctl revert` and `snapctl delete` against real QEMU (TCG, no guest OS).
//!
//! Every test starts its own two-disk VM ([`Vm::two_disks`]) and builds the
//! same history with [`three_snapshots`], keeping a table of what each
//! snapshot and the live disks must read ([`History`]). After each operation
//! the tests check the data three ways: live through the devices
//! ([`LiveReads`]), offline on every remaining snapshot's frozen images as
//! `show` reports them after the operation ([`assert_images_read`]), and
//! against the bookkeeping: `list`, `show`, `chain`, `check`, the image
//! directory and QEMU's graph (the shared checks of [`crate::util::history`]).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde_json::{Value, json};

use crate::util::history::{
    actives, assert_check_clean, assert_headers_match_chain, assert_images_read,
    assert_live_consistent, assert_no_stray_images, chain_paths, chains, digests,
    directory_digests, flush, foreign_digests, frozen_images, list, parent, path_of,
    snapshot_names,
};
use crate::util::{History, K64, LiveReads, Pattern, Vm};

/// The disks of the test VM.
const DISKS: [&str; 2] = ["vda", "vdb"];

/// Where the tests write (each a 64 KiB range) and read back, on both disks
/// (vdb's bytes with the high bit set, see [`crate::util::vm::TWO_DISKS`]).
/// The last one is never written: it must read zeroes everywhere.
const PATTERN: Pattern = Pattern {
    offsets: &[0, K64, 2 * K64, 3 * K64, 4 * K64],
    bulk: None,
};

/// Registers the VM and takes s1, s2, s3, each after writes; every step also
/// overwrites offset 0, so each moment reads differently there.
///
/// | when | vda (vdb: the same bytes with the high bit set) |
/// |---|---|
/// | before s1 | 0x11 at 0 |
/// | before s2 | 0x12 at 0, 0x22 at 64 KiB |
/// | before s3 | 0x13 at 0, 0x33 at 128 KiB |
/// | after s3 | 0x14 at 0, 0x44 at 192 KiB |
///
/// The chains are then, per disk (vdb: `data.qcow2` over `data-base.qcow2`
/// where vda has `base.qcow2`):
/// `base (s1) <- vda.s1 (s2) <- vda.s2 (s3) <- vda.s3 (active)`.
fn three_snapshots(vm: &mut Vm) -> History {
    vm.snapctl.args(["init"]).ok();
    let mut history = History::new(PATTERN);
    history.write(vm, 0, 0x11);
    history.create(vm, "s1");
    history.write(vm, 0, 0x12);
    history.write(vm, K64, 0x22);
    history.create(vm, "s2");
    history.write(vm, 0, 0x13);
    history.write(vm, 2 * K64, 0x33);
    history.create(vm, "s3");
    history.write(vm, 0, 0x14);
    history.write(vm, 3 * K64, 0x44);
    history
}

/// After deleting a snapshot whose boundary can be merged: each disk's chain
/// has lost one layer.
fn assert_merged(before: &BTreeMap<String, Vec<PathBuf>>, vm: &Vm, output: &str) {
    let after = chains(vm);
    for disk in DISKS {
        assert_eq!(
            after[disk].len() + 1,
            before[disk].len(),
            "{disk}: the boundary was not merged away\nbefore: {:?}\nafter: {:?}\n--- delete said\n{output}",
            before[disk],
            after[disk]
        );
    }
}

#[test]
fn delete_middle_snapshot_live() {
    let mut vm = Vm::two_disks();
    let mut history = three_snapshots(&mut vm);
    let foreign = foreign_digests(&vm);
    let before = chains(&vm);

    let output = vm.snapctl.args(["delete", "s2"]).stdout();
    history.removed("s2");

    assert_eq!(snapshot_names(&vm), history.names());
    assert_eq!(list(&vm)["current"], "s3");
    assert_eq!(
        parent(&vm, "s3"),
        "s1",
        "s2's child moves up to s2's parent"
    );
    assert_merged(&before, &vm, &output);
    assert_live_consistent(&mut vm, "delete s2");
    assert_no_stray_images(&vm, "delete s2");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after delete s2", &history);
    let frozen = frozen_images(&vm);

    vm.quit();
    reads.assert_ok(&vm);
    assert_eq!(frozen_images(&vm), frozen);
    assert_images_read(&vm, &history);
    assert_headers_match_chain(&vm);
    assert_check_clean(&vm, false, "after quit");
    assert_eq!(foreign_digests(&vm), foreign, "a foreign image was written");
}

#[test]
fn delete_newest_snapshot_live() {
    let mut vm = Vm::two_disks();
    let mut history = three_snapshots(&mut vm);
    let foreign = foreign_digests(&vm);
    let before = chains(&vm);

    // s3 froze the layer right below the active image: merging it away
    // commits the active layer (with a pivot) or streams into it.
    let report = vm.snapctl.args(["delete", "s3"]).json();
    assert!(report.is_object(), "delete --json: {report}");
    history.removed("s3");

    assert_eq!(snapshot_names(&vm), history.names());
    assert_eq!(parent(&vm, "s2"), "s1");
    assert_merged(&before, &vm, &report.to_string());
    assert_live_consistent(&mut vm, "delete s3");
    assert_no_stray_images(&vm, "delete s3");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after delete s3", &history);
    // The device keeps working on its new chain.
    history.write(&mut vm, 4 * K64, 0x66);
    reads.expect(&mut vm, "after a write following delete s3", &history);

    vm.quit();
    reads.assert_ok(&vm);
    assert_images_read(&vm, &history);
    assert_headers_match_chain(&vm);
    assert_check_clean(&vm, false, "after quit");
    assert_eq!(foreign_digests(&vm), foreign, "a foreign image was written");
}

#[test]
fn delete_oldest_snapshot_never_writes_the_foreign_base() {
    let mut vm = Vm::two_disks();
    let mut history = three_snapshots(&mut vm);
    let foreign = foreign_digests(&vm);
    let before = chains(&vm);

    // s1 froze the foreign images: they cannot take a commit.
    let output = vm.snapctl.args(["delete", "s1"]).stdout();
    history.removed("s1");

    assert_eq!(snapshot_names(&vm), history.names());
    assert_eq!(list(&vm)["current"], "s3");
    assert_eq!(parent(&vm, "s2"), Value::Null, "s2 becomes a root");
    assert_eq!(foreign_digests(&vm), foreign, "a foreign image was written");
    let after = chains(&vm);
    for disk in DISKS {
        if after[disk].len() == before[disk].len() {
            let lower = output.to_lowercase();
            assert!(
                lower.contains("foreign") || lower.contains("shared"),
                "{disk}: the layer was kept but delete did not say why:\n{output}"
            );
        }
    }
    assert_live_consistent(&mut vm, "delete s1");
    assert_no_stray_images(&vm, "delete s1");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after delete s1", &history);

    vm.quit();
    reads.assert_ok(&vm);
    assert_eq!(foreign_digests(&vm), foreign, "a foreign image was written");
    assert_images_read(&vm, &history);
    assert_headers_match_chain(&vm);
    assert_check_clean(&vm, false, "after quit");
}

#[test]
fn delete_offline_middle_snapshot() {
    let mut vm = Vm::two_disks();
    let mut history = three_snapshots(&mut vm);
    vm.quit();
    let foreign = foreign_digests(&vm);
    let before = chains(&vm);

    let output = vm.snapctl.args(["delete", "s2"]).stdout();
    history.removed("s2");

    assert_eq!(snapshot_names(&vm), history.names());
    assert_eq!(list(&vm)["current"], "s3");
    assert_eq!(parent(&vm, "s3"), "s1");
    assert_merged(&before, &vm, &output);
    assert_headers_match_chain(&vm);
    assert_no_stray_images(&vm, "offline delete s2");
    assert_eq!(vm.snapctl.record()["journal"], json!([]));
    assert_images_read(&vm, &history);
    assert_check_clean(&vm, false, "offline delete s2");
    assert_eq!(foreign_digests(&vm), foreign, "a foreign image was written");
}

/// After a revert to `name`: each disk's active image is a new owned
/// overlay directly on `name`'s frozen image, and `name` is current.
fn assert_reverted_to(vm: &Vm, name: &str, old: &BTreeMap<String, Vec<PathBuf>>) {
    let show = vm.snapctl.args(["show", name]).json();
    let chain = vm.snapctl.args(["chain"]).json();
    let chains = chain_paths(vm, &chain);
    for disk in DISKS {
        let images = &chains[disk];
        let frozen = path_of(&show["disks"][disk]["image"]);
        assert_eq!(
            images.get(1),
            Some(&frozen),
            "{disk}: after revert {name} the active image's backing is not {name}'s frozen image: {chain}"
        );
        assert!(
            !old[disk].contains(&images[0]),
            "{disk}: after revert {name} the active image is an old one: {chain}"
        );
        assert!(images[0].exists(), "{disk}: {:?} does not exist", images[0]);
        assert_eq!(chain["disks"][disk][0]["owned"], true, "{chain}");
        assert_eq!(chain["disks"][disk][0]["snapshots"], json!([]), "{chain}");
    }
    assert_eq!(list(vm)["current"], name);
    assert_eq!(show["current"], true);
}

/// The column at which `name` starts in `list --tree`.
fn tree_column(tree: &str, name: &str) -> usize {
    let line = tree
        .lines()
        .find(|l| {
            l.trim_start_matches(['│', '├', '└', '─', ' '])
                .split_whitespace()
                .next()
                == Some(name)
        })
        .unwrap_or_else(|| panic!("{name} is not in list --tree:\n{tree}"));
    line.chars()
        .position(|c| !matches!(c, '│' | '├' | '└' | '─' | ' '))
        .unwrap()
}

#[test]
fn revert_live_to_ancestor_and_to_other_branch() {
    let mut vm = Vm::two_disks();
    let mut history = three_snapshots(&mut vm);
    let mut reads = LiveReads::default();

    // To an ancestor on the current branch.
    let old = chains(&vm);
    let frozen = frozen_images(&vm);
    let frozen_digests = digests(frozen.values());
    vm.snapctl.args(["revert", "s1", "--running"]).ok();
    history.reverted("s1");
    assert_eq!(
        vm.monitor.run_state(),
        "running",
        "revert --running continues the VM"
    );
    assert_reverted_to(&vm, "s1", &old);
    for (disk, chain) in &old {
        assert!(
            !chain[0].exists(),
            "{disk}: the abandoned active image {} was kept",
            chain[0].display()
        );
    }
    assert_eq!(frozen_images(&vm), frozen, "frozen images moved");
    assert_eq!(
        digests(frozen.values()),
        frozen_digests,
        "frozen images changed"
    );
    assert_live_consistent(&mut vm, "revert s1");
    assert_no_stray_images(&vm, "revert s1");
    reads.expect(&mut vm, "after revert s1", &history);

    // A new branch from s1.
    history.write(&mut vm, 0, 0x55);
    history.write(&mut vm, 3 * K64, 0x56);
    history.create(&mut vm, "s4");
    assert_eq!(parent(&vm, "s4"), "s1");

    // To s3, on the other branch: its frozen image is not in the open chain.
    let old = chains(&vm);
    let frozen = frozen_images(&vm);
    let frozen_digests = digests(frozen.values());
    vm.snapctl.args(["revert", "s3"]).ok();
    history.reverted("s3");
    assert_eq!(
        vm.monitor.run_state(),
        "running",
        "revert keeps a running VM running"
    );
    assert_reverted_to(&vm, "s3", &old);
    for (disk, chain) in &old {
        assert!(
            !chain[0].exists(),
            "{disk}: the abandoned active image {} was kept",
            chain[0].display()
        );
    }
    assert_eq!(frozen_images(&vm), frozen, "frozen images moved");
    assert_eq!(
        digests(frozen.values()),
        frozen_digests,
        "frozen images changed"
    );
    assert_live_consistent(&mut vm, "revert s3");
    assert_no_stray_images(&vm, "revert s3");
    reads.expect(&mut vm, "after revert s3", &history);

    let listed = list(&vm);
    assert_eq!(listed["current"], "s3");
    let tree = vm.snapctl.args(["list", "--tree"]).stdout();
    assert!(tree.contains("s3  <- current"), "list --tree:\n{tree}");
    assert_eq!(tree.lines().count(), 4, "list --tree:\n{tree}");
    assert_eq!(tree_column(&tree, "s1"), 0, "list --tree:\n{tree}");
    assert_eq!(
        tree_column(&tree, "s4"),
        tree_column(&tree, "s2"),
        "s4 is a child of s1 like s2:\n{tree}"
    );
    // s2's only child continues its column, on the next line.
    assert_eq!(
        tree_column(&tree, "s3"),
        tree_column(&tree, "s2"),
        "s3 follows s2:\n{tree}"
    );
    let line_of = |name: &str| tree.lines().position(|l| l.contains(name)).unwrap();
    assert_eq!(line_of("s3"), line_of("s2") + 1, "s3 follows s2:\n{tree}");

    vm.quit();
    reads.assert_ok(&vm);
    assert_images_read(&vm, &history);
    assert_headers_match_chain(&vm);
    assert_check_clean(&vm, false, "after quit");
}

#[test]
fn revert_paused_stays_paused() {
    let mut vm = Vm::two_disks_running();
    let mut history = three_snapshots(&mut vm);
    assert_eq!(vm.monitor.run_state(), "running");
    let mut reads = LiveReads::default();

    let old = chains(&vm);
    vm.snapctl.args(["revert", "s1", "--paused"]).ok();
    history.reverted("s1");
    // The CPUs stay stopped. QEMU reports a VM reset while stopped as
    // "prelaunch" (and a later `stop` does not change that), so both
    // stopped states count.
    let status = vm.monitor.ok("query-status", Value::Null);
    assert_eq!(status["running"], false, "revert --paused: {status}");
    assert!(
        status["status"] == "paused" || status["status"] == "prelaunch",
        "revert --paused: {status}"
    );
    assert_reverted_to(&vm, "s1", &old);
    assert_live_consistent(&mut vm, "revert s1 --paused");
    reads.expect(&mut vm, "after revert s1 --paused", &history);

    // Without a flag a revert keeps the run state it found: paused stays paused.
    vm.snapctl.args(["revert", "s2"]).ok();
    history.reverted("s2");
    let status = vm.monitor.ok("query-status", Value::Null);
    assert_eq!(status["running"], false, "revert of a paused VM: {status}");
    reads.expect(&mut vm, "after revert s2", &history);

    // --running continues a VM it found paused.
    vm.snapctl.args(["revert", "s1", "--running"]).ok();
    history.reverted("s1");
    assert_eq!(vm.monitor.run_state(), "running", "revert --running");
    reads.expect(&mut vm, "after revert s1 --running", &history);

    vm.quit();
    reads.assert_ok(&vm);
    assert_images_read(&vm, &history);
}

/// Every string anywhere in a JSON document.
fn json_strings(value: &Value, out: &mut BTreeSet<String>) {
    match value {
        Value::String(s) => {
            out.insert(s.clone());
        }
        Value::Array(items) => items.iter().for_each(|v| json_strings(v, out)),
        Value::Object(map) => map.values().for_each(|v| json_strings(v, out)),
        _ => {}
    }
}

#[test]
fn revert_offline_then_restart_with_qemu_args() {
    let mut vm = Vm::two_disks();
    let mut history = three_snapshots(&mut vm);
    vm.quit();
    let frozen = frozen_images(&vm);
    let frozen_digests = digests(frozen.values());

    let old = chains(&vm);
    let text = vm.snapctl.args(["revert", "s2"]).stdout();
    history.reverted("s2");
    assert!(
        text.contains("-blockdev"),
        "an offline revert prints the new qemu-args:\n{text}"
    );
    assert_reverted_to(&vm, "s2", &old);
    assert_headers_match_chain(&vm);
    assert_no_stray_images(&vm, "offline revert s2");

    // Again, with --json: the first revert's overlays are abandoned in turn.
    let old = chains(&vm);
    let report = vm.snapctl.args(["revert", "s2"]).json();
    let mut strings = BTreeSet::new();
    json_strings(&report, &mut strings);
    for (disk, active) in actives(&vm) {
        assert!(
            strings.contains(&*active.to_string_lossy()),
            "{disk}: revert --json does not name the new overlay {}: {report}",
            active.display()
        );
    }
    assert_eq!(chains(&vm)["vda"].get(1), old["vda"].get(1));
    assert_headers_match_chain(&vm);
    assert_no_stray_images(&vm, "second offline revert s2");
    assert_eq!(frozen_images(&vm), frozen, "frozen images moved");
    assert_eq!(
        digests(frozen.values()),
        frozen_digests,
        "frozen images changed"
    );
    assert_check_clean(&vm, false, "second offline revert s2");
    let active = actives(&vm);

    let args: Vec<String> = serde_json::from_value(vm.snapctl.args(["qemu-args"]).json())
        .expect("qemu-args --json is an array of strings");
    vm.restart(&args);
    let state = vm.monitor.block_state();
    for disk in DISKS {
        assert_eq!(state.root_file(disk), active[disk]);
    }
    assert_live_consistent(&mut vm, "restart after an offline revert");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "restarted after revert s2", &history);
    history.write(&mut vm, 4 * K64, 0x77);
    reads.expect(&mut vm, "a write after the restart", &history);

    vm.quit();
    reads.assert_ok(&vm);
    assert_images_read(&vm, &history);
    assert_check_clean(&vm, false, "after quit");
}

#[test]
fn delete_metadata_only_keeps_files() {
    let mut vm = Vm::two_disks();
    let mut history = three_snapshots(&mut vm);
    flush(&mut vm);
    let files = directory_digests(&vm);
    let graph = vm.monitor.block_state();
    let chains_before = chains(&vm);
    let s3 = vm.snapctl.args(["show", "s3"]).json();

    vm.snapctl.args(["delete", "s2", "--metadata-only"]).ok();
    history.removed("s2");

    assert_eq!(snapshot_names(&vm), history.names());
    assert_eq!(list(&vm)["current"], "s3");
    assert_eq!(
        directory_digests(&vm),
        files,
        "--metadata-only touched files"
    );
    assert_eq!(
        vm.monitor.block_state(),
        graph,
        "--metadata-only changed QEMU's graph"
    );
    assert_eq!(chains(&vm), chains_before);
    assert_eq!(vm.snapctl.args(["show", "s3"]).json()["disks"], s3["disks"]);
    assert_check_clean(&vm, true, "delete s2 --metadata-only");

    vm.quit();
    assert_images_read(&vm, &history);
    assert_check_clean(&vm, false, "after quit");
}

#[test]
fn unknown_snapshot_is_refused_and_changes_nothing() {
    let mut vm = Vm::two_disks();
    three_snapshots(&mut vm);
    flush(&mut vm);
    let before = vm.untouched_state();
    let files = directory_digests(&vm);
    let status = vm.monitor.run_state();

    let cases: [&[&str]; 7] = [
        &["revert", "nope"],
        &["revert", "nope", "--paused"],
        &["revert", "nope", "--dry-run"],
        &["delete", "nope"],
        &["delete", "nope", "--children"],
        &["delete", "nope", "--metadata-only"],
        &["delete", "nope", "--dry-run"],
    ];
    for args in cases {
        let mut cmd = vm.snapctl.args(args);
        let what = cmd.command_line();
        cmd.error_line(&["nope"]);
        vm.assert_untouched(&before, &what);
        assert_eq!(
            vm.monitor.run_state(),
            status,
            "{what} changed the run state"
        );
    }
    assert_eq!(directory_digests(&vm), files);

    vm.quit();
    let record = vm.snapctl.record_bytes();
    let files = directory_digests(&vm);
    for args in [["revert", "nope"], ["delete", "nope"]] {
        let mut cmd = vm.snapctl.args(args);
        let what = cmd.command_line();
        cmd.error_line(&["nope"]);
        assert!(
            vm.snapctl.record_bytes() == record,
            "{what} changed the record"
        );
        assert_eq!(directory_digests(&vm), files, "{what} changed the images");
    }
}

#[test]
fn dry_run_changes_nothing_for_revert_and_delete() {
    let mut vm = Vm::two_disks();
    let history = three_snapshots(&mut vm);
    flush(&mut vm);
    let before = vm.untouched_state();
    let files = directory_digests(&vm);
    let status = vm.monitor.run_state();

    let unchanged = |vm: &mut Vm, what: &str| {
        vm.assert_untouched(&before, what);
        assert_eq!(directory_digests(vm), files, "{what} changed the images");
        assert_eq!(
            vm.monitor.run_state(),
            status,
            "{what} changed the run state"
        );
    };

    // The plan must show the QMP commands (DESIGN: "the QMP commands and
    // file operations, in order"). What is missing is collected and reported
    // at the end, so that every "changes nothing" check runs first.
    let mut missing = Vec::new();
    let text = vm.snapctl.args(["revert", "s1", "--dry-run"]).stdout();
    unchanged(&mut vm, "revert --dry-run");
    for needle in ["qom-set", "system_reset"] {
        if !text.contains(needle) {
            missing.push(format!("revert --dry-run lacks {needle:?}:\n{text}"));
        }
    }
    let plan = vm.snapctl.args(["revert", "s1", "--dry-run"]).json();
    unchanged(&mut vm, "revert --dry-run --json");
    assert_eq!(plan["dry_run"], true, "{plan}");
    let steps = plan["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("revert --dry-run --json: steps is not an array: {plan}"));
    if !steps.iter().any(|s| s["command"] == "qom-set") {
        missing.push(format!(
            "revert --dry-run --json has no qom-set step: {plan}"
        ));
    }

    let merges = ["block-commit", "block-stream"];
    let text = vm.snapctl.args(["delete", "s2", "--dry-run"]).stdout();
    unchanged(&mut vm, "delete --dry-run");
    if !merges.iter().any(|m| text.contains(m)) {
        missing.push(format!(
            "delete --dry-run shows no block-commit or block-stream:\n{text}"
        ));
    }
    let plan = vm.snapctl.args(["delete", "s2", "--dry-run"]).json();
    unchanged(&mut vm, "delete --dry-run --json");
    assert_eq!(plan["dry_run"], true, "{plan}");
    // Like create's and revert's: {"dry_run": true, "steps": [...]}.
    let merge_step = plan["steps"].as_array().is_some_and(|steps| {
        steps
            .iter()
            .any(|s| merges.iter().any(|m| s["command"] == *m))
    });
    if !merge_step {
        missing.push(format!(
            "delete --dry-run --json has no \"steps\" with a block-commit or block-stream: {plan}"
        ));
    }
    vm.snapctl
        .args(["delete", "s2", "--dry-run", "--children"])
        .ok();
    unchanged(&mut vm, "delete --children --dry-run");

    // Offline too.
    vm.quit();
    let record = vm.snapctl.record_bytes();
    let files = directory_digests(&vm);
    for args in [
        ["revert", "s1", "--dry-run"],
        ["delete", "s2", "--dry-run"],
        ["delete", "s1", "--dry-run"],
    ] {
        let mut cmd = vm.snapctl.args(args);
        let what = cmd.command_line();
        let text = String::from_utf8_lossy(&cmd.ok().stdout).into_owned();
        assert!(!text.trim().is_empty(), "{what} printed no plan");
        assert!(
            vm.snapctl.record_bytes() == record,
            "{what} changed the record"
        );
        assert_eq!(directory_digests(&vm), files, "{what} changed the images");
    }
    assert_images_read(&vm, &history);
    assert!(
        missing.is_empty(),
        "the dry runs changed nothing, but their plans lack QMP commands:\n{}",
        missing.join("\n")
    );
}
