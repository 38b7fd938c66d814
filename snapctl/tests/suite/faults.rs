//! snapctl killed (SIGKILL) in the middle of `create`, at each crash point:
//! the next run finds the journal entry, reads QEMU's graph and either
//! completes the snapshot (the transaction had happened) or rolls it back
//! (it had not), and afterwards record, QEMU and headers agree and every
//! byte the guest wrote is where it belongs.

use std::os::unix::process::ExitStatusExt;

use crate::util::{K64, Tmpfs, Vm};

fn killed_create_is_recovered(point: &str, transaction_happened: bool) {
    let mut vm = Vm::two_disks();
    vm.snapctl.args(["init"]).ok();
    vm.monitor.write("vda", 0x11, 0, K64);
    let before = vm.monitor.block_state();

    let output = vm
        .snapctl
        .args(["create", "s1"])
        .env("SNAPCTL_FAULT", point)
        .run();
    assert_eq!(
        output.status.signal(),
        Some(9),
        "snapctl should die at {point}: {output:?}"
    );
    // The journal holds the interrupted create: check reports it (exit 3).
    let check = vm.snapctl.args(["check"]).run();
    assert_eq!(check.status.code(), Some(3), "{check:?}");
    assert!(String::from_utf8_lossy(&check.stdout).contains("interrupted create"));

    // The next mutating command settles it first, then does its own work.
    vm.snapctl.args(["create", "s2"]).ok();
    let list = vm.snapctl.args(["list"]).json();
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    if transaction_happened {
        assert_eq!(names, ["s1", "s2"], "{list}");
    } else {
        assert_eq!(names, ["s2"], "{list}");
        // Nothing of the rolled-back s1 remains: no file, no node.
        assert!(!vm.image("vda.s1.qcow2").exists());
        let state = vm.monitor.block_state();
        let leftovers: Vec<_> = state
            .nodes
            .iter()
            .filter(|n| n.name.contains("-s1-"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
    assert_ne!(
        before.root_file("vda"),
        vm.monitor.block_state().root_file("vda")
    );
    assert_eq!(
        vm.snapctl.args(["check"]).json()["drift"],
        serde_json::json!([])
    );

    // The data written before the crash is in the image that froze at the
    // first snapshot that exists, and the device still reads it.
    vm.monitor.write("vda", 0x22, K64, K64);
    vm.monitor.qemu_io("vda", "read -P 0x11 0 64k");
    vm.monitor.qemu_io("vda", "read -P 0x22 64k 64k");
    let first = if transaction_happened { "s1" } else { "s2" };
    let frozen = vm.snapctl.args(["show", first]).json()["disks"]["vda"]["image"]
        .as_str()
        .unwrap()
        .to_owned();
    vm.quit();
    assert!(integration::image::read_pattern_ok(
        std::path::Path::new(&frozen),
        0x11,
        0,
        K64
    ));
    assert!(
        !vm.qemu
            .stdout_text()
            .contains("Pattern verification failed"),
        "{}",
        vm.qemu.stdout_text()
    );
}

#[test]
fn create_killed_after_formatting_overlays_rolls_back() {
    killed_create_is_recovered("create:formatted", false);
}

#[test]
fn create_killed_after_adding_nodes_rolls_back() {
    killed_create_is_recovered("create:added", false);
}

#[test]
fn create_killed_after_the_transaction_completes() {
    killed_create_is_recovered("create:switched", true);
}

/// Three snapshots with known data on vda: 0x11 before s1, 0x22 before s2,
/// 0x33 before s3, 0x44 after.
fn three_snapshots() -> Vm {
    three_snapshots_on(Vm::two_disks(), 0)
}

/// `bulk` bytes of 0x55 at 8 MiB go into s3's frozen layer and as many of
/// 0x66 right after them into the active layer, so that merging either side
/// of s3's boundary takes a while at a low bandwidth.
fn three_snapshots_on(mut vm: Vm, bulk: u64) -> Vm {
    vm.snapctl.args(["init"]).ok();
    for (i, name) in ["s1", "s2", "s3"].iter().enumerate() {
        vm.monitor
            .write("vda", 0x11 * (i as u8 + 1), i as u64 * K64, K64);
        if *name == "s3" && bulk > 0 {
            vm.monitor.write("vda", 0x55, 8 * 1024 * 1024, bulk);
        }
        vm.snapctl.args(["create", name]).ok();
    }
    vm.monitor.write("vda", 0x44, 3 * K64, K64);
    if bulk > 0 {
        // Elsewhere, so a pull still has the first bulk to copy.
        vm.monitor.write("vda", 0x66, 8 * 1024 * 1024 + bulk, bulk);
    }
    vm
}

/// Every remaining snapshot still reads its data (after QEMU quits).
fn assert_snapshots_intact(vm: &mut Vm, live_reads: &[(u8, u64)]) {
    for (pattern, at) in live_reads {
        vm.monitor
            .qemu_io("vda", &format!("read -P {pattern:#x} {at} 64k"));
    }
    let list = vm.snapctl.args(["list"]).json();
    let frozen: Vec<(String, String)> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_owned(),
                s["disks"]["vda"]["image"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        vm.snapctl.args(["check"]).json()["drift"],
        serde_json::json!([])
    );
    vm.quit();
    assert!(
        !vm.qemu
            .stdout_text()
            .contains("Pattern verification failed"),
        "{}",
        vm.qemu.stdout_text()
    );
    for (name, image) in frozen {
        let n: u8 = name[1..].parse().unwrap();
        for k in 1..n {
            assert!(
                integration::image::read_pattern_ok(
                    std::path::Path::new(&image),
                    0x11 * k,
                    (k as u64 - 1) * K64,
                    K64
                ),
                "{name} lost the data written before s{k}"
            );
        }
    }
}

fn killed_delete_is_recovered(point: &str, victim: &str) {
    let mut vm = three_snapshots();
    let output = vm
        .snapctl
        .args(["delete", victim])
        .env("SNAPCTL_FAULT", point)
        .run();
    assert_eq!(output.status.signal(), Some(9), "{output:?}");
    let repair = vm.snapctl.args(["check", "--repair"]).run();
    assert_eq!(repair.status.code(), Some(0), "{repair:?}");
    let list = vm.snapctl.args(["list"]).json();
    assert!(
        !list.to_string().contains(&format!("\"{victim}\"")),
        "{victim} is gone after recovery: {list}"
    );
    assert!(vm.monitor.jobs().is_empty(), "no job is left behind");
    assert_snapshots_intact(
        &mut vm,
        &[(0x11, 0), (0x22, K64), (0x33, 2 * K64), (0x44, 3 * K64)],
    );
}

#[test]
fn delete_killed_after_starting_jobs() {
    killed_delete_is_recovered("jobs:started", "s2");
}

#[test]
fn delete_killed_with_jobs_pending() {
    killed_delete_is_recovered("jobs:pending", "s2");
}

#[test]
fn delete_killed_after_finalizing() {
    killed_delete_is_recovered("jobs:finalized", "s2");
}

#[test]
fn active_commit_killed_with_jobs_pending() {
    killed_delete_is_recovered("jobs:pending", "s3");
}

fn killed_revert_is_recovered(point: &str, switched: bool) {
    let mut vm = three_snapshots();
    let output = vm
        .snapctl
        .args(["revert", "s1"])
        .env("SNAPCTL_FAULT", point)
        .run();
    assert_eq!(output.status.signal(), Some(9), "{output:?}");
    vm.snapctl.args(["check", "--repair"]).ok();
    let list = vm.snapctl.args(["list"]).json();
    let current = if switched { "s1" } else { "s3" };
    assert_eq!(list["current"], current, "{list}");
    let reads: &[(u8, u64)] = if switched {
        &[(0x00, K64)]
    } else {
        &[(0x22, K64), (0x44, 3 * K64)]
    };
    assert_snapshots_intact(&mut vm, reads);
}

#[test]
fn revert_killed_before_the_switch_rolls_back() {
    killed_revert_is_recovered("revert:prepared", false);
}

#[test]
fn revert_killed_after_the_switch_completes() {
    killed_revert_is_recovered("revert:switched", true);
}

/// QEMU itself dies (SIGKILL) in the middle of a merge job. snapctl reports the
/// lost connection and leaves a record that is true to the images; QEMU
/// restarted from `qemu-args` runs on a consistent chain, `check --repair`
/// agrees, and every remaining snapshot reads its data.
fn qemu_killed_during(op: &[&str]) {
    // Enough data that the job at 1 MiB/s is still running when QEMU dies
    // (an active commit copies its first 16 MiB at once).
    let mut vm = three_snapshots_on(Vm::one_disk(None), 24 * 1024 * 1024);
    let mut args: Vec<&str> = op.to_vec();
    args.extend(["--bandwidth", "1M"]);
    let mut merge = vm.snapctl.args(args).spawn();
    let running = integration::wait_until(std::time::Duration::from_secs(10), || {
        !vm.monitor.jobs().is_empty()
    });
    assert!(running, "the merge job started");
    std::thread::sleep(std::time::Duration::from_millis(500));
    vm.qemu.quit_or_kill(std::time::Duration::from_millis(1));
    let out = merge.wait(std::time::Duration::from_secs(30));
    assert!(!out.status.success(), "{out:?}");

    let qemu_args: Vec<String> =
        serde_json::from_value(vm.snapctl.args(["qemu-args"]).json()).unwrap();
    vm.restart(&qemu_args);
    vm.snapctl.args(["check", "--repair"]).ok();
    assert_eq!(
        vm.snapctl.args(["check"]).json()["drift"],
        serde_json::json!([])
    );
    assert_snapshots_intact(&mut vm, &[(0x11, 0)]);
}

#[test]
fn qemu_killed_during_an_active_commit() {
    qemu_killed_during(&["delete", "s3"]);
}

#[test]
fn qemu_killed_during_a_stream() {
    qemu_killed_during(&["pull", "vda"]);
}

/// A QEMU started with `-no-reboot` exits at the guest reset of a live revert:
/// the revert is complete and recorded, and QEMU restarted from `qemu-args`
/// runs on the snapshot's state.
#[test]
fn revert_on_a_no_reboot_qemu_is_recorded_and_restartable() {
    let dir = integration::WorkDir::new();
    let img = dir.join("img");
    std::fs::create_dir(&img).unwrap();
    let base = img.join("base.qcow2");
    integration::image::create_qcow2(&base, 8 * 1024 * 1024);
    let builder = integration::QemuBuilder::new()
        .blockdev_chain("vda", &[("base", &base)])
        .arg("-no-reboot");
    let mut vm = three_snapshots_on(Vm::start(dir, builder), 0);
    let out = vm.snapctl.args(["revert", "s1"]).ok();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("qemu-args"),
        "{out:?}"
    );
    assert!(
        vm.qemu
            .wait_exit(std::time::Duration::from_secs(10))
            .is_some(),
        "QEMU exits at the reset"
    );
    assert_eq!(vm.snapctl.args(["list"]).json()["current"], "s1");
    let qemu_args: Vec<String> =
        serde_json::from_value(vm.snapctl.args(["qemu-args"]).json()).unwrap();
    vm.restart(&qemu_args);
    assert_eq!(
        vm.snapctl.args(["check"]).json()["drift"],
        serde_json::json!([])
    );
    // s1's state: nothing written yet at 64k (s2's data is not there).
    vm.monitor.qemu_io("vda", "read -P 0 64k 64k");
    assert_snapshots_intact(&mut vm, &[]);
}

/// The overlay's filesystem is full: `create` fails with one clear line and
/// leaves nothing behind (no file, no node, record and QEMU unchanged).
#[test]
fn create_on_a_full_filesystem_fails_cleanly() {
    let mut vm = Vm::two_disks();
    vm.snapctl.args(["init"]).ok();
    let full = Tmpfs::mount(vm.dir.join("full"), "4k");
    let record = vm.snapctl.record_bytes();
    let graph = vm.monitor.block_state();
    let overlay = full.path.join("vda.s1.qcow2");
    let mut arg = std::ffi::OsString::from("vda=");
    arg.push(&overlay);
    vm.snapctl
        .args(["create", "s1", "--overlay"])
        .arg(&arg)
        .error_line(&["No space left on device"]);
    assert!(!overlay.exists(), "the half-written overlay is removed");
    assert_eq!(vm.snapctl.record_bytes(), record);
    assert_eq!(vm.monitor.block_state(), graph);
    drop(full);
    vm.snapctl.args(["create", "s1"]).ok();
}

/// QEMU dies (SIGKILL) in the middle of a live revert, after the switch and
/// before the guest reset: restarted from `qemu-args` it runs on a chain the
/// record describes, `check --repair` settles the journal, nothing is lost.
#[test]
fn qemu_killed_during_a_revert() {
    let mut vm = three_snapshots();
    let out = vm
        .snapctl
        .args(["revert", "s1"])
        .env("SNAPCTL_FAULT", "revert:switched")
        .run();
    assert_eq!(out.status.signal(), Some(9), "{out:?}");
    vm.qemu.quit_or_kill(std::time::Duration::from_millis(1));
    let repair = vm.snapctl.args(["check", "--repair"]).run();
    assert!(
        String::from_utf8_lossy(&repair.stdout).contains("revert"),
        "{repair:?}"
    );
    let qemu_args: Vec<String> =
        serde_json::from_value(vm.snapctl.args(["qemu-args"]).json()).unwrap();
    vm.restart(&qemu_args);
    vm.snapctl.args(["check", "--repair"]).ok();
    assert_eq!(
        vm.snapctl.args(["check"]).json()["drift"],
        serde_json::json!([])
    );
    assert_snapshots_intact(&mut vm, &[(0x11, 0)]);
}

/// snapctl killed in the middle of a raw `commit` or `pull`: `check --repair`
/// settles the jobs and the record, and every remaining snapshot is intact.
fn killed_merge_is_recovered(op: &[&str], point: &str) {
    let mut vm = three_snapshots();
    let out = vm
        .snapctl
        .args(op.to_vec())
        .env("SNAPCTL_FAULT", point)
        .run();
    assert_eq!(out.status.signal(), Some(9), "{out:?}");
    vm.snapctl.args(["check", "--repair"]).ok();
    assert!(vm.monitor.jobs().is_empty(), "no job is left behind");
    assert_snapshots_intact(
        &mut vm,
        &[(0x11, 0), (0x22, K64), (0x33, 2 * K64), (0x44, 3 * K64)],
    );
}

#[test]
fn commit_killed_with_its_job_pending() {
    killed_merge_is_recovered(&["commit", "vda"], "jobs:pending");
}

#[test]
fn pull_killed_after_starting_its_job() {
    killed_merge_is_recovered(&["pull", "vda"], "jobs:started");
}

/// A commit into an image on a full filesystem fails inside QEMU with ENOSPC.
/// The base may hold part of the commit, so the snapshot whose state it held
/// is removed (and said so); the chain is unchanged and the guest's data is
/// all there.
#[test]
fn commit_onto_a_full_filesystem_fails_cleanly() {
    let mut vm = Vm::two_disks();
    vm.snapctl.args(["init"]).ok();
    let full = Tmpfs::mount(vm.dir.join("full"), "1M");
    let on_full = full.path.join("vda.s1.qcow2");
    let mut arg = std::ffi::OsString::from("vda=");
    arg.push(&on_full);
    vm.snapctl
        .args(["create", "s1", "--disk", "vda", "--overlay"])
        .arg(&arg)
        .ok();
    let mut arg2 = std::ffi::OsString::from("vda=");
    arg2.push(vm.image("vda.s2.qcow2"));
    vm.snapctl
        .args(["create", "s2", "--disk", "vda", "--overlay"])
        .arg(&arg2)
        .ok();
    vm.monitor.write("vda", 0x77, 0, 4 * 1024 * 1024);
    let line = vm
        .snapctl
        .args(["commit", "vda"])
        .error_line_after_progress(&["No space left on device", "s2"]);
    assert!(line.contains("removed"), "{line}");
    assert!(vm.monitor.jobs().is_empty());
    assert_eq!(
        vm.snapctl.args(["check"]).json()["drift"],
        serde_json::json!([])
    );
    vm.monitor.qemu_io("vda", "read -P 0x77 0 4M");
    vm.quit();
    assert!(
        !vm.qemu
            .stdout_text()
            .contains("Pattern verification failed"),
        "{}",
        vm.qemu.stdout_text()
    );
    drop(full);
}
