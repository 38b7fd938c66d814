//! The `snapctl` command against real, paused QEMU processes (TCG, no guest OS).
//!
//! Each test has its own work directory and QEMU. snapctl talks to QEMU
//! through its own monitor; the test writes guest data and inspects QEMU's
//! graph through a second one, and checks the bytes of every image offline
//! once QEMU has quit.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use integration::{QemuBuilder, WorkDir, image, qcow2_layer, wait_until};
use serde_json::{Value, json};

use crate::util::{DISK_SIZE, K64, M1, Monitor, Snapctl, Vm, dir_listing};

/// Writes `pattern` to both disks of the standard VM.
fn write_both(vm: &mut Vm, pattern: u8, offset: u64) {
    for disk in ["vda", "vdb"] {
        vm.monitor.write(disk, pattern, offset, K64);
    }
}

/// The scenario of the first two tests: three snapshots, each after a write.
///
/// | when | vda and vdb |
/// |---|---|
/// | before s1 | 0x11 at 0 |
/// | before s2 | 0x22 at 0, 0x2b at 1 MiB |
/// | before s3 | 0x33 at 0 |
/// | after s3 | 0x44 at 0 |
fn take_three_snapshots(vm: &mut Vm) {
    vm.snapctl.args(["init"]).ok();
    write_both(vm, 0x11, 0);
    vm.snapctl.args(["create", "s1"]).ok();
    write_both(vm, 0x22, 0);
    write_both(vm, 0x2b, M1);
    vm.snapctl
        .args(["create", "s2", "--description", "after the second write"])
        .ok();
    write_both(vm, 0x33, 0);
    vm.snapctl.args(["create", "s3"]).ok();
    write_both(vm, 0x44, 0);
}

/// Each disk's chain after [`take_three_snapshots`], active image first.
fn expected_chains(vm: &Vm) -> BTreeMap<&'static str, Vec<PathBuf>> {
    BTreeMap::from([
        (
            "vda",
            ["vda.s3.qcow2", "vda.s2.qcow2", "vda.s1.qcow2", "base.qcow2"]
                .map(|f| vm.image(f))
                .to_vec(),
        ),
        (
            "vdb",
            [
                "vdb.s3.qcow2",
                "vdb.s2.qcow2",
                "vdb.s1.qcow2",
                "data.qcow2",
                "data-base.qcow2",
            ]
            .map(|f| vm.image(f))
            .to_vec(),
        ),
    ])
}

/// `chain --json` as expected after [`take_three_snapshots`], without `source`.
fn expected_chain_json(vm: &Vm) -> Value {
    let mut disks = serde_json::Map::new();
    for (disk, chain) in expected_chains(vm) {
        let entries: Vec<Value> = chain
            .iter()
            .enumerate()
            .map(|(i, image)| {
                // The active image holds nothing; each image below it holds
                // the snapshot that froze it, s3, s2, s1; vdb's data-base nothing.
                let holds: Vec<String> = match 3usize.checked_sub(i) {
                    Some(n) if i > 0 => vec![format!("s{}", n + 1)],
                    _ => vec![],
                };
                let owned = image
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .starts_with(disk);
                json!({
                    "image": image,
                    "format": "qcow2",
                    "active": i == 0,
                    "snapshots": holds,
                    "owned": owned,
                })
            })
            .collect();
        disks.insert(disk.to_owned(), Value::Array(entries));
    }
    Value::Object(disks)
}

/// The documented fields of `chain --json`'s disks (more may be added).
fn chain_fields(chain: &Value) -> Value {
    let mut disks = serde_json::Map::new();
    for (disk, entries) in chain["disks"].as_object().expect("chain --json has disks") {
        let entries = entries
            .as_array()
            .expect("a disk's chain is an array")
            .iter()
            .map(|e| {
                json!({
                    "image": e["image"],
                    "format": e["format"],
                    "active": e["active"],
                    "snapshots": e["snapshots"],
                    "owned": e["owned"],
                })
            })
            .collect();
        disks.insert(disk.clone(), Value::Array(entries));
    }
    Value::Object(disks)
}

/// Checks offline that each image reads exactly the data of its moment.
fn assert_frozen_data(vm: &Vm) {
    for (disk, chain) in expected_chains(vm) {
        let [active, frozen_s3, frozen_s2, frozen_s1] = [0, 1, 2, 3].map(|i| &chain[i]);
        let expect = |img: &Path, pattern: u8, offset: u64| {
            assert!(
                image::read_pattern_ok(img, pattern, offset, K64),
                "{disk}: {} should read {pattern:#04x} at {offset}",
                img.display()
            );
        };
        expect(frozen_s1, 0x11, 0);
        expect(frozen_s1, 0x00, M1);
        expect(frozen_s2, 0x22, 0);
        expect(frozen_s2, 0x2b, M1);
        expect(frozen_s3, 0x33, 0);
        expect(frozen_s3, 0x2b, M1);
        expect(active, 0x44, 0);
        expect(active, 0x2b, M1);
        if disk == "vdb" {
            for img in &chain {
                expect(img, 0x07, 2 * M1);
            }
        }
    }
}

#[test]
fn create_three_snapshots_two_disks() {
    let mut vm = Vm::two_disks();
    take_three_snapshots(&mut vm);
    let chains = expected_chains(&vm);
    let [vda, vdb] = [&chains["vda"], &chains["vdb"]];

    let list = vm.snapctl.args(["list"]).json();
    assert_eq!(list["vm"], "vm1");
    assert_eq!(list["current"], "s3");
    let snapshots = list["snapshots"].as_array().expect("snapshots is an array");
    let summary: Vec<Value> = snapshots
        .iter()
        .map(|s| {
            json!({
                "name": s["name"],
                "parent": s["parent"],
                "kind": s["kind"],
                "current": s["current"],
                "disks": s["disks"],
            })
        })
        .collect();
    assert_eq!(
        summary,
        [
            json!({"name": "s1", "parent": null, "kind": "disk-only", "current": false,
                   "disks": {"vda": {"image": vda[3]}, "vdb": {"image": vdb[3]}}}),
            json!({"name": "s2", "parent": "s1", "kind": "disk-only", "current": false,
                   "disks": {"vda": {"image": vda[2]}, "vdb": {"image": vdb[2]}}}),
            json!({"name": "s3", "parent": "s2", "kind": "disk-only", "current": true,
                   "disks": {"vda": {"image": vda[1]}, "vdb": {"image": vdb[1]}}}),
        ]
    );
    for s in snapshots {
        let created = s["created"].as_str().expect("created is a string");
        assert!(
            created.contains('T') && created.ends_with('Z'),
            "created is not RFC 3339 UTC: {created}"
        );
    }

    let chain = vm.snapctl.args(["chain"]).json();
    assert_eq!(chain["source"], "qemu");
    assert_eq!(chain_fields(&chain), expected_chain_json(&vm));

    let show = vm.snapctl.args(["show", "s2"]).json();
    assert_eq!(show["name"], "s2");
    assert_eq!(show["parent"], "s1");
    assert_eq!(show["current"], false);
    assert_eq!(show["description"], "after the second write");
    assert_eq!(show["children"], json!(["s3"]));
    assert_eq!(
        show["disks"],
        json!({"vda": {"image": vda[2]}, "vdb": {"image": vdb[2]}})
    );
    assert_eq!(show, snapshots[1], "show s2 is list's element for s2");

    let tree = vm.snapctl.args(["list", "--tree"]).stdout();
    assert!(tree.contains("s3  <- current"), "list --tree:\n{tree}");
    assert_eq!(tree.lines().next(), Some("s1"), "list --tree:\n{tree}");
    assert_eq!(tree.lines().count(), 3, "list --tree:\n{tree}");

    let check = vm.snapctl.args(["check"]).stdout();
    assert!(check.contains("no drift"), "check:\n{check}");

    let state = vm.monitor.block_state();
    assert_eq!(state.root_file("vda"), vda[0]);
    assert_eq!(state.root_file("vdb"), vdb[0]);

    vm.quit();
    assert_frozen_data(&vm);
    for (disk, chain) in &chains {
        assert_eq!(&image::backing_chain(&chain[0]), chain, "{disk}'s headers");
    }

    let offline = vm.snapctl.args(["chain"]).json();
    assert_eq!(offline["source"], "images");
    assert_eq!(chain_fields(&offline), expected_chain_json(&vm));
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["qemu_running"], false);
    assert_eq!(check["drift"], json!([]));
}

#[test]
fn qemu_args_reopen_the_chain() {
    let mut vm = Vm::two_disks();
    take_three_snapshots(&mut vm);
    let chains = expected_chains(&vm);
    vm.quit();

    let args: Vec<String> = serde_json::from_value(vm.snapctl.args(["qemu-args"]).json())
        .expect("qemu-args --json is an array of strings");
    let blockdevs = args.iter().filter(|a| *a == "-blockdev").count();
    assert_eq!(blockdevs, 4 + 5, "one -blockdev per layer: {args:?}");

    // The text form is the same vector, shell-quoted on one line.
    let line = vm.snapctl.args(["qemu-args"]).stdout();
    assert_eq!(line.lines().count(), 1, "qemu-args: {line}");
    let split = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "for a in {}; do printf '%s\\n' \"$a\"; done",
            line.trim_end()
        ))
        .output()
        .expect("run sh");
    let split: Vec<String> = String::from_utf8_lossy(&split.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(split, args, "the shell reads back the JSON vector");

    vm.restart(&args);
    let state = vm.monitor.block_state();
    assert_eq!(state.root_file("vda"), chains["vda"][0]);
    assert_eq!(state.root_file("vdb"), chains["vdb"][0]);
    for disk in ["vda", "vdb"] {
        vm.monitor.qemu_io(disk, &format!("read -P 0x44 0 {K64}"));
        vm.monitor
            .qemu_io(disk, &format!("read -P 0x2b {M1} {K64}"));
    }
    vm.monitor
        .qemu_io("vdb", &format!("read -P 0x07 {} {K64}", 2 * M1));

    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["qemu_running"], true);
    assert_eq!(check["drift"], json!([]));
    let chain = vm.snapctl.args(["chain"]).json();
    assert_eq!(chain["source"], "qemu");
    assert_eq!(chain_fields(&chain), expected_chain_json(&vm));

    vm.quit();
    // HMP qemu-io prints to QEMU's stdout, complete once QEMU has exited.
    let out = vm.qemu.stdout_text();
    assert!(
        !out.contains("Pattern verification failed"),
        "QEMU read wrong data:\n{out}"
    );
    assert_eq!(
        out.matches(&format!("read {K64}/{K64} bytes")).count(),
        5,
        "every read ran:\n{out}"
    );
    assert_frozen_data(&vm);
}

#[test]
fn dry_run_changes_nothing() {
    let mut vm = Vm::two_disks();
    let vda_overlay = vm.image("vda.s1.qcow2");
    let vdb_overlay = vm.image("vdb.s1.qcow2");

    for registered in [false, true] {
        if registered {
            vm.snapctl.args(["init"]).ok();
        }
        let before = vm.untouched_state();

        let text = vm.snapctl.args(["create", "s1", "--dry-run"]).stdout();
        for needle in [
            "blockdev-add",
            "transaction",
            "blockdev-snapshot",
            &vda_overlay.display().to_string(),
            &vdb_overlay.display().to_string(),
        ] {
            assert!(text.contains(needle), "dry run lacks {needle:?}:\n{text}");
        }
        vm.assert_untouched(&before, "create --dry-run");

        let plan = vm.snapctl.args(["create", "s1", "--dry-run"]).json();
        assert_eq!(plan["dry_run"], true);
        let steps = plan["steps"].as_array().expect("steps is an array");
        let kinds: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "create-overlay",
                "create-overlay",
                "qmp",
                "qmp",
                "qmp",
                "record"
            ]
        );
        assert_eq!(steps[0]["path"], json!(vda_overlay));
        assert_eq!(steps[0]["backing"], json!(vm.image("base.qcow2")));
        assert_eq!(steps[1]["path"], json!(vdb_overlay));
        assert_eq!(steps[1]["backing"], json!(vm.image("data.qcow2")));
        assert_eq!(steps[2]["command"], "blockdev-add");
        assert_eq!(steps[4]["command"], "transaction");
        let actions = steps[4]["arguments"]["actions"]
            .as_array()
            .expect("transaction actions");
        assert_eq!(actions.len(), 2);
        assert!(
            actions.iter().all(|a| a["type"] == "blockdev-snapshot"),
            "{actions:?}"
        );
        vm.assert_untouched(&before, "create --dry-run --json");
        assert!(!vda_overlay.exists() && !vdb_overlay.exists());
    }
    let record = vm.snapctl.record();
    assert_eq!(record["snapshots"], json!([]));
}

/// An overlay directory that even root cannot write to, and the reason
/// snapctl gives for it.
fn unwritable_overlay(dir: &WorkDir) -> (PathBuf, &'static str) {
    if nix::unistd::geteuid().is_root() {
        // Root bypasses directory permissions, so a 0555 directory proves
        // nothing here; /proc refuses new files even to root.
        (PathBuf::from("/proc/x.qcow2"), "/proc/x.qcow2")
    } else {
        use std::os::unix::fs::PermissionsExt;
        let ro = dir.join("ro");
        std::fs::create_dir(&ro).unwrap();
        std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
        (ro.join("x.qcow2"), "not writable")
    }
}

#[test]
fn bad_input_is_refused_and_changes_nothing() {
    let mut vm = Vm::two_disks();
    vm.snapctl.args(["create", "s1"]).ok();

    let existing = vm.dir.join("existing.qcow2");
    std::fs::write(&existing, b"precious").unwrap();
    let dangling = vm.dir.join("dangling.qcow2");
    std::os::unix::fs::symlink(vm.dir.join("target.qcow2"), &dangling).unwrap();
    let (unwritable, unwritable_reason) = unwritable_overlay(&vm.dir);
    let overlay = |disk: &str, path: &Path| {
        let mut arg = OsString::from(format!("{disk}="));
        arg.push(path);
        arg
    };

    let long = "x".repeat(256);
    let cases: Vec<(Vec<OsString>, Vec<&str>)> = vec![
        (os(["create", ""]), vec!["empty"]),
        (os(["create", "a/b"]), vec!["`/`"]),
        (os(["create", "."]), vec!["reserved"]),
        (os(["create", ".."]), vec!["reserved"]),
        (os(["create", "tab\tname"]), vec!["control character"]),
        (os(["create", "new\nline"]), vec!["control character"]),
        (os(["create", &long]), vec!["255 bytes"]),
        (os(["create", "s1"]), vec!["already has a snapshot", "s1"]),
        (os(["create", "s2", "--disk", "vdz"]), vec!["vdz", "vda"]),
        (os(["create", "s2", "--exclude", "vdz"]), vec!["vdz"]),
        (
            vec![
                "create".into(),
                "s2".into(),
                "--overlay".into(),
                overlay("vda", &existing),
            ],
            vec!["already exists"],
        ),
        (
            vec![
                "create".into(),
                "s2".into(),
                "--overlay".into(),
                overlay("vda", &dangling),
            ],
            vec!["already exists"],
        ),
        (
            os(["create", "s2", "--overlay", "vda=/nonexistent-dir/x.qcow2"]),
            vec!["/nonexistent-dir/x.qcow2", "does not exist"],
        ),
        (
            vec![
                "create".into(),
                "s2".into(),
                "--overlay".into(),
                overlay("vda", &unwritable),
            ],
            vec![unwritable_reason],
        ),
        (
            vec![
                "create".into(),
                "s2".into(),
                "--overlay".into(),
                overlay("vda", &vm.image("vdb.s2.qcow2")),
            ],
            vec!["two disks"],
        ),
        (os(["show", "nope"]), vec!["nope"]),
        (os(["chain", "vdz"]), vec!["vdz"]),
    ];

    let before = vm.untouched_state();
    for (args, expected) in &cases {
        let mut cmd = vm.snapctl.args(args);
        let what = cmd.command_line();
        cmd.error_line(expected);
        vm.assert_untouched(&before, &what);
    }
    assert_eq!(std::fs::read(&existing).unwrap(), b"precious");
    assert!(
        !vm.dir.join("target.qcow2").exists(),
        "a symlink was followed"
    );

    // A VM name that cannot be a file name is refused before anything is read.
    Snapctl::new(vm.snapctl.state_dir(), "../evil", vm.dir.join("sc.sock"))
        .args(["create", "s2"])
        .error_line(&["invalid vm name"]);
    vm.assert_untouched(&before, "--vm ../evil");

    // 255 bytes is a valid name; its overlay file name is shortened.
    let longest = "x".repeat(255);
    vm.snapctl.args(["create", &longest]).ok();
    let show = vm.snapctl.args(["show", &longest]).json();
    assert_eq!(show["name"], longest.as_str());
    assert_eq!(show["parent"], "s1");
    let active = vm.monitor.block_state().root_file("vda").to_owned();
    let file_name = active.file_name().unwrap().to_string_lossy().into_owned();
    assert_eq!(
        file_name,
        format!("vda.{}.qcow2", "x".repeat(100)),
        "overlay of a 255-byte name"
    );
    assert_eq!(active.parent(), Some(vm.images().as_path()));
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], json!([]));
}

fn os<const N: usize>(args: [&str; N]) -> Vec<OsString> {
    args.iter().map(OsString::from).collect()
}

#[test]
fn unreachable_foreign_or_busy_monitor_is_refused() {
    let dir = WorkDir::new();
    std::fs::create_dir(dir.join("img")).unwrap();
    let base = dir.join("img/base.qcow2");
    image::create_qcow2(&base, DISK_SIZE);
    let hmp = dir.join("hmp.sock");
    let builder = QemuBuilder::new()
        .blockdev_chain("vda", &[("base", &base)])
        .hmp_monitor(&hmp);
    let mut vm = Vm::start(dir, builder);
    let before = vm.untouched_state();

    let missing = vm.snapctl.with_socket(vm.dir.join("nope.sock"));
    for args in [["init"].as_slice(), ["create", "s1"].as_slice()] {
        missing.args(args).error_line(&["nope.sock"]);
        vm.assert_untouched(&before, "socket missing");
    }

    let human = vm.snapctl.with_socket(&hmp);
    human.args(["create", "s1"]).error_line(&["hmp.sock"]);
    vm.assert_untouched(&before, "HMP socket");

    let holder = Monitor::connect(vm.dir.join("sc.sock"));
    let started = Instant::now();
    vm.snapctl
        .args(["create", "s1"])
        .error_line(&["another client"]);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(7),
        "a busy monitor took {took:?} to report"
    );
    vm.assert_untouched(&before, "busy socket");
    drop(holder);

    // Once the other client is gone, the monitor serves snapctl again.
    vm.snapctl.args(["init"]).ok();
}

#[test]
fn vm_without_writable_disk_is_refused() {
    let dir = WorkDir::new();
    std::fs::create_dir(dir.join("img")).unwrap();
    let base = dir.join("img/base.qcow2");
    image::create_qcow2(&base, DISK_SIZE);
    let mut read_only = qcow2_layer("ro0", &base, None);
    read_only["read-only"] = json!(true);
    let builder = QemuBuilder::new()
        .blockdev(read_only)
        .device("virtio-blk-pci,id=vda,drive=ro0");
    let mut vm = Vm::start(dir, builder);
    let before = vm.untouched_state();

    vm.snapctl.args(["init"]).error_line(&["writable"]);
    vm.assert_untouched(&before, "init");
    vm.snapctl.args(["create", "s1"]).error_line(&["writable"]);
    vm.assert_untouched(&before, "create");
    vm.snapctl
        .args(["create", "s1", "--disk", "vda"])
        .error_line(&["vda", "read-only"]);
    vm.assert_untouched(&before, "create --disk vda");
    assert_eq!(vm.snapctl.record_bytes(), None);

    // No disk at all.
    vm.quit();
    vm.restart(Vec::<String>::new());
    let before = vm.untouched_state();
    vm.snapctl.args(["init"]).error_line(&["writable"]);
    vm.snapctl.args(["create", "s1"]).error_line(&["writable"]);
    vm.assert_untouched(&before, "no disk");
}

#[test]
fn record_locked_by_another_process_is_refused() {
    let mut vm = Vm::two_disks();
    vm.snapctl.args(["init"]).ok();
    let before = vm.untouched_state();

    // Hold the lock the way a running snapctl does: flock on the sidecar
    // file, with the holder's pid in it.
    let mut lock = File::options()
        .read(true)
        .write(true)
        .open(vm.snapctl.lock_path())
        .expect("init left the lock file");
    lock.lock().expect("take the lock");
    lock.set_len(0).unwrap();
    writeln!(lock, "{}", std::process::id()).unwrap();
    let pid = format!("pid {}", std::process::id());

    let started = Instant::now();
    vm.snapctl
        .args(["create", "s1", "--lock-wait", "1"])
        .error_line(&["locked", &pid]);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "--lock-wait 1 gave up after {took:?}"
    );
    vm.assert_untouched(&before, "create while locked");
    vm.snapctl
        .args(["init", "--lock-wait", "0"])
        .error_line(&["locked"]);
    vm.assert_untouched(&before, "init while locked");

    // Readers need no lock.
    let list = vm.snapctl.args(["list"]).json();
    assert_eq!(list["snapshots"], json!([]));

    lock.unlock().unwrap();
    vm.snapctl.args(["create", "s1", "--lock-wait", "1"]).ok();
}

#[test]
fn corrupt_or_newer_record_is_never_touched() {
    let mut vm = Vm::two_disks();
    std::fs::create_dir_all(vm.snapctl.state_dir()).unwrap();
    let commands: [&[&str]; 7] = [
        &["list"],
        &["show", "s1"],
        &["chain"],
        &["check"],
        &["qemu-args"],
        &["init"],
        &["create", "s1"],
    ];
    for (content, expected) in [
        (&br#"{"version": 1, "vm": "#[..], "corrupt"),
        (&br#"{"version": 99}"#[..], "upgrade snapctl"),
    ] {
        std::fs::write(vm.snapctl.record_path(), content).unwrap();
        let before = vm.untouched_state();
        for args in commands {
            let mut cmd = vm.snapctl.args(args);
            let what = cmd.command_line();
            cmd.error_line(&[expected, &vm.snapctl.record_path().display().to_string()]);
            vm.assert_untouched(&before, &what);
        }
    }
}

#[test]
fn failed_transaction_leaves_nothing() {
    let mut vm = Vm::two_disks();
    vm.snapctl.args(["init"]).ok();

    // A stream job on vdb's active node, throttled to a crawl, makes the node
    // busy: blockdev-snapshot on it fails inside the transaction, after both
    // overlay files were created and both overlay nodes added.
    vm.monitor.ok(
        "block-stream",
        json!({"job-id": "busy", "device": "drive-vdb", "speed": 1}),
    );
    let before = vm.untouched_state();
    let line = vm
        .snapctl
        .args(["create", "s1"])
        .error_line(&["is busy", "block job"]);
    vm.assert_untouched(&before, &format!("failed create ({line})"));
    let state = vm.monitor.block_state();
    assert!(
        !state.nodes.iter().any(|n| n.name.starts_with("sc-")),
        "snapctl's overlay nodes were left behind: {:#?}",
        state.nodes
    );
    assert!(!vm.image("vda.s1.qcow2").exists());
    assert!(!vm.image("vdb.s1.qcow2").exists());
    let record = vm.snapctl.record();
    assert_eq!(record["snapshots"], json!([]));
    assert_eq!(record["journal"], json!([]));
    assert!(record["current"].is_null());

    // Once the node is free again, the same snapshot goes through.
    vm.monitor.ok("job-cancel", json!({"id": "busy"}));
    let monitor = &mut vm.monitor;
    assert!(
        wait_until(Duration::from_secs(10), || {
            monitor.ok("query-jobs", Value::Null) == json!([])
        }),
        "the stream job did not go away"
    );
    vm.snapctl.args(["create", "s1"]).ok();
    let state = vm.monitor.block_state();
    assert_eq!(state.root_file("vda"), vm.image("vda.s1.qcow2"));
    assert_eq!(state.root_file("vdb"), vm.image("vdb.s1.qcow2"));
    assert_eq!(vm.snapctl.args(["check"]).json()["drift"], json!([]));
}

/// `create` registers an unknown VM implicitly, but only when it succeeds: a
/// failed `create` leaves no record behind ("the record is unchanged").
#[test]
fn failed_create_on_unregistered_vm_leaves_no_record() {
    let mut vm = Vm::two_disks();
    vm.monitor.ok(
        "block-stream",
        json!({"job-id": "busy", "device": "drive-vdb", "speed": 1}),
    );
    let before = vm.untouched_state();
    let line = vm.snapctl.args(["create", "s1"]).error_line(&["is busy"]);
    vm.assert_untouched(&before, &format!("failed create ({line})"));
}

/// A disk behind a filter node (here a throttle group, as libvirt sets up for
/// I/O limits): the layers are the format nodes below the filter, and the
/// snapshot goes below the filter too.
#[test]
fn disk_behind_a_throttle_filter() {
    let dir = WorkDir::new();
    std::fs::create_dir(dir.join("img")).unwrap();
    let base = dir.join("img/base.qcow2");
    image::create_qcow2(&base, DISK_SIZE);
    let builder = QemuBuilder::new()
        .args(["-object", "throttle-group,id=tg0,x-bps-total=1000000000"])
        .blockdev(qcow2_layer("base", &base, None))
        .blockdev(json!({"driver": "throttle", "node-name": "thr", "throttle-group": "tg0", "file": "base"}))
        .device("virtio-blk-pci,id=vda,drive=thr");
    let mut vm = Vm::start(dir, builder);

    vm.snapctl.args(["init"]).ok();
    vm.monitor.write("vda", 0x55, 0, K64);
    vm.snapctl.args(["create", "s1"]).ok();
    vm.monitor.write("vda", 0x66, 0, K64);

    let overlay = vm.image("vda.s1.qcow2");
    let chain = vm.snapctl.args(["chain"]).json();
    assert_eq!(
        chain_fields(&chain),
        json!({"vda": [
            {"image": overlay, "format": "qcow2", "active": true, "snapshots": [], "owned": true},
            {"image": base, "format": "qcow2", "active": false, "snapshots": ["s1"], "owned": false},
        ]})
    );
    assert_eq!(vm.snapctl.args(["check"]).json()["drift"], json!([]));

    vm.quit();
    assert!(image::read_pattern_ok(&base, 0x55, 0, K64));
    assert!(image::read_pattern_ok(&overlay, 0x66, 0, K64));
}

#[test]
fn quiesce_without_agent_fails_before_touching_anything() {
    let mut vm = Vm::two_disks();
    let nope = vm.dir.join("nope.sock");
    let mut qga = OsString::from("--qga=");
    qga.push(&nope);

    for registered in [false, true] {
        if registered {
            vm.snapctl.args(["init"]).ok();
        }
        let before = vm.untouched_state();
        vm.snapctl
            .args(["create", "s1", "--quiesce"])
            .arg(&qga)
            .error_line(&["guest agent", "nope.sock"]);
        vm.assert_untouched(&before, "create --quiesce without an agent");
    }
    assert!(vm.snapctl.record()["qga_socket"].is_null());
}

#[test]
fn completions_and_man() {
    let dir = WorkDir::new();
    let snapctl = Snapctl::new(dir.join("state"), "vm1", dir.join("none.sock"));
    let bash = snapctl.args(["completions", "bash"]).stdout();
    assert!(bash.contains("snapctl"), "completions bash:\n{bash}");
    assert!(bash.contains("complete"), "completions bash:\n{bash}");
    let man = snapctl.args(["man"]).stdout();
    assert!(man.starts_with(".ie") || man.contains(".TH"), "man:\n{man}");
    assert!(man.contains("snapctl"), "man:\n{man}");
    assert_eq!(
        dir_listing(dir.path()).len(),
        0,
        "completions and man touch no state"
    );
}
