//! What runs is what `--dry-run` printed: for every mutating command, on the
//! standard two-disk VM (a `-blockdev` disk and a legacy `-drive` one) with
//! QEMU running and with QEMU stopped, the steps snapctl carried out
//! (recorded through `SNAPCTL_STEP_LOG`: the QMP commands, image-tool runs,
//! file operations and record changes, as it carried each out) equal the
//! steps `--dry-run --json` printed for the same state, in the same order,
//! and QEMU refuses none of the commands (no `blockdev-del` of a node the new
//! chain uses or the monitor does not own); the text plan reads `qmp: stop`,
//! not `qmp: stop null`.

use std::path::Path;

use serde_json::Value;

use crate::util::{Vm, read_if_exists};

/// The plan `args --dry-run --json` prints.
fn dry_run(vm: &Vm, args: &[&str]) -> Vec<Value> {
    let plan = vm.snapctl.args(args).arg("--dry-run").json();
    assert_eq!(plan["dry_run"], true, "{plan}");
    plan["steps"]
        .as_array()
        .unwrap_or_else(|| panic!("{args:?} --dry-run --json: no steps: {plan}"))
        .clone()
}

/// The steps `args` carried out, from the step log. Run at `-vv`, where the
/// QMP client logs every command QEMU refused: a plan whose steps all fit
/// the graph issues none.
fn executed(vm: &Vm, args: &[&str]) -> Vec<Value> {
    let log = vm.dir.join(format!("steps-{}.jsonl", args.join("-")));
    let output = vm
        .snapctl
        .args(args)
        .arg("-vv")
        .env("SNAPCTL_STEP_LOG", log.to_str().unwrap())
        .ok();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let refused: Vec<&str> = stderr.lines().filter(|l| l.contains("failed")).collect();
    assert!(
        refused.is_empty(),
        "{args:?}: QEMU refused commands:\n{}",
        refused.join("\n")
    );
    let text = read_if_exists(&log).unwrap_or_default();
    String::from_utf8(text)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{}: {e}: {l}", log.display())))
        .collect()
}

/// Plans `args`, runs it, and checks that the two agree step for step.
fn runs_as_planned(vm: &Vm, args: &[&str]) -> Vec<Value> {
    let planned = dry_run(vm, args);
    let done = executed(vm, args);
    assert!(!planned.is_empty(), "{args:?}: an empty plan");
    for (i, (p, d)) in planned.iter().zip(&done).enumerate() {
        assert_eq!(p, d, "{args:?}: step {} differs from the dry run", i + 1);
    }
    assert_eq!(
        planned.len(),
        done.len(),
        "{args:?}: planned {planned:#?}\ncarried out {done:#?}"
    );
    planned
}

fn kinds(steps: &[Value]) -> Vec<&str> {
    steps
        .iter()
        .map(|s| s["step"].as_str().unwrap_or("?"))
        .collect()
}

fn commands(steps: &[Value]) -> Vec<&str> {
    steps.iter().filter_map(|s| s["command"].as_str()).collect()
}

/// The files a plan removes.
fn removed(steps: &[Value]) -> Vec<&Path> {
    steps
        .iter()
        .filter(|s| s["step"] == "remove-file")
        .map(|s| Path::new(s["path"].as_str().unwrap()))
        .collect()
}

#[test]
fn live_operations_run_exactly_their_dry_run() {
    let mut vm = Vm::two_disks();
    let create = runs_as_planned(&vm, &["create", "s1"]);
    assert_eq!(
        commands(&create),
        ["blockdev-add", "blockdev-add", "transaction"]
    );
    vm.monitor.write("vda", 0x11, 0, 65536);
    runs_as_planned(&vm, &["create", "s2"]);
    vm.monitor.write("vda", 0x22, 0, 65536);
    runs_as_planned(&vm, &["create", "s3"]);

    // A live delete in the middle: merge jobs for both disks, finalized together.
    let delete = runs_as_planned(&vm, &["delete", "s2"]);
    assert!(kinds(&delete).contains(&"await-jobs"), "{delete:#?}");
    assert!(commands(&delete).contains(&"job-finalize"), "{delete:#?}");

    // A live revert: stop, overlays, switch, record, release, reset, cont,
    // and the files of the abandoned state.
    let text = vm
        .snapctl
        .args(["revert", "s1", "--running", "--dry-run"])
        .stdout();
    assert!(text.lines().any(|l| l.ends_with(". qmp: stop")), "{text}");
    assert!(!text.contains("null"), "{text}");
    let revert = runs_as_planned(&vm, &["revert", "s1", "--running"]);
    // Each node released is gone afterwards: none was one the new overlays
    // stand on (QEMU would have kept it), none one QEMU named itself.
    let nodes = vm.monitor.block_state().nodes;
    for step in revert.iter().filter(|s| s["step"] == "release-node") {
        let node = step["node"].as_str().unwrap();
        assert!(!node.starts_with('#'), "{step}");
        assert!(!nodes.iter().any(|n| n.name == node), "{step}: still open");
    }
    let revert_commands = commands(&revert);
    assert_eq!(revert_commands.first(), Some(&"stop"));
    assert!(revert_commands.contains(&"qom-set"), "{revert:#?}");
    assert_eq!(revert_commands.last(), Some(&"cont"));
    for path in removed(&revert) {
        assert!(!path.exists(), "{} was to be removed", path.display());
    }

    // Raw merges: an active commit on vda, then a pull on vdb.
    runs_as_planned(&vm, &["create", "s4"]);
    vm.monitor.write("vda", 0x44, 0, 65536);
    let commit = runs_as_planned(&vm, &["commit", "vda"]);
    assert_eq!(commands(&commit)[0], "block-commit");
    assert!(commands(&commit).contains(&"job-complete"), "{commit:#?}");
    let pull = runs_as_planned(&vm, &["pull", "vdb"]);
    assert_eq!(commands(&pull)[0], "block-stream");

    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], Value::Array(Vec::new()), "{check}");
}

#[test]
fn offline_operations_run_exactly_their_dry_run() {
    let mut vm = Vm::two_disks();
    runs_as_planned(&vm, &["create", "s1"]);
    vm.monitor.write("vda", 0x11, 0, 65536);
    runs_as_planned(&vm, &["create", "s2"]);
    vm.monitor.write("vdb", 0x22, 0, 65536);
    runs_as_planned(&vm, &["create", "s3"]);
    vm.quit();

    // Offline: qemu-img runs exactly as printed (argument vectors compared).
    let delete = runs_as_planned(&vm, &["delete", "s2"]);
    assert!(kinds(&delete).contains(&"tool"), "{delete:#?}");
    let revert = runs_as_planned(&vm, &["revert", "s1"]);
    assert_eq!(kinds(&revert)[0], "create-overlay");
    runs_as_planned(&vm, &["delete", "s3", "--metadata-only"]);
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], Value::Array(Vec::new()), "{check}");
}

#[test]
fn offline_commit_and_pull_run_exactly_their_dry_run() {
    let mut vm = Vm::two_disks();
    for name in ["s1", "s2", "s3"] {
        vm.monitor.write("vda", 0x30, 0, 65536);
        runs_as_planned(&vm, &["create", name]);
    }
    vm.quit();
    let commit = runs_as_planned(&vm, &["commit", "vda", "--top", "s3", "--base", "s2"]);
    let tool: Vec<&Value> = commit.iter().filter(|s| s["step"] == "tool").collect();
    assert_eq!(
        (&tool[0]["argv"][0], &tool[0]["argv"][1]),
        (&"qemu-img".into(), &"commit".into())
    );
    runs_as_planned(&vm, &["pull", "vdb"]);
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], Value::Array(Vec::new()), "{check}");
}
