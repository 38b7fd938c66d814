//! Checkpoints (`create --memory`): the guest's memory and device state with
//! its disks, reverted inside the same QEMU process.
//!
//! The VMs here run with no guest: `-qtest` on a socket of their own lets the
//! test write and read guest RAM ([`Qtest`]), so every test checks that the
//! memory really comes back, besides the disks.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use integration::{QemuBuilder, image};
use serde_json::{Value, json};

use crate::util::vm::Untouched;
use crate::util::{K64, M1, Monitor, Tmpfs, Vm, dir_listing};

/// Two places in guest RAM (the machine has 128 MiB).
const RAM: [u64; 2] = [0x100_0000, 0x600_0000];
/// What RAM holds at the checkpoint, and what the guest writes after it.
const RAM_A: u64 = 0x1111_1111_1111_1111;
const RAM_B: u64 = 0x2222_2222_2222_2222;

/// A qtest client: one line in, one line out (`OK …` or `FAIL …`).
struct Qtest {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qtest {
    /// Connects to QEMU's `-qtest` socket, waiting for it to listen.
    fn connect(path: &Path) -> Qtest {
        let deadline = Instant::now() + Duration::from_secs(10);
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    panic!("cannot connect to qtest socket {}: {e}", path.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        // QEMU keeps listening on its descriptor; the name is not needed any more.
        let _ = std::fs::remove_file(path);
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        Qtest {
            path: path.to_owned(),
            writer: stream.try_clone().unwrap(),
            reader: BufReader::new(stream),
        }
    }

    /// Sends one command; returns what follows `OK` (asynchronous `IRQ`
    /// lines are skipped).
    fn command(&mut self, line: &str) -> String {
        self.writer
            .write_all(format!("{line}\n").as_bytes())
            .unwrap_or_else(|e| panic!("qtest {}: {e}", self.path.display()));
        loop {
            let mut reply = String::new();
            match self.reader.read_line(&mut reply) {
                Ok(0) => panic!("qtest {}: QEMU closed the socket", self.path.display()),
                Ok(_) => {}
                Err(e) => panic!("qtest {}: {line}: {e}", self.path.display()),
            }
            let reply = reply.trim_end();
            if reply.starts_with("IRQ") {
                continue;
            }
            match reply.strip_prefix("OK") {
                Some(rest) => return rest.trim().to_owned(),
                None => panic!("qtest {line:?} answered {reply:?}"),
            }
        }
    }

    fn writeq(&mut self, addr: u64, value: u64) {
        self.command(&format!("writeq {addr:#x} {value:#018x}"));
    }

    fn readq(&mut self, addr: u64) -> u64 {
        let out = self.command(&format!("readq {addr:#x}"));
        u64::from_str_radix(out.trim_start_matches("0x"), 16)
            .unwrap_or_else(|e| panic!("readq {addr:#x} answered {out:?}: {e}"))
    }

    fn memset(&mut self, addr: u64, len: u64, byte: u8) {
        self.command(&format!("memset {addr:#x} {len:#x} {byte:#04x}"));
    }

    /// Writes `value` at every address of [`RAM`].
    fn fill(&mut self, value: u64) {
        for addr in RAM {
            self.writeq(addr, value);
        }
    }

    /// Panics unless every address of [`RAM`] reads `value`.
    fn assert_reads(&mut self, value: u64, when: &str) {
        for addr in RAM {
            let got = self.readq(addr);
            assert_eq!(got, value, "{when}: RAM at {addr:#x} reads {got:#x}");
        }
    }
}

/// The `-qtest` arguments for a socket at `path`.
fn qtest_args(path: &Path) -> [String; 2] {
    [
        "-qtest".to_owned(),
        format!("unix:{},server=on,wait=off", path.display()),
    ]
}

/// A fresh path for a qtest socket (in /tmp: socket paths are short).
fn qtest_socket() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    PathBuf::from(format!(
        "/tmp/sc-qt-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ))
}

/// The standard two-disk VM, running (no `-S`) under qtest, and its qtest client.
fn qtest_vm() -> (Vm, Qtest) {
    let socket = qtest_socket();
    let vm = Vm::two_disks_with(QemuBuilder::new().paused(false).args(qtest_args(&socket)));
    let qtest = Qtest::connect(&socket);
    (vm, qtest)
}

/// The record's active image of `disk`.
fn active(vm: &Vm, disk: &str) -> PathBuf {
    PathBuf::from(
        vm.snapctl.record()["disks"][disk]["active"]
            .as_str()
            .unwrap_or_else(|| panic!("no active image for {disk}: {}", vm.snapctl.record())),
    )
}

/// Flushes `disk` in QEMU, then checks its active image offline: each
/// `(offset, byte)` range of 64 KiB reads `byte`.
fn assert_disk_reads(vm: &mut Vm, disk: &str, ranges: &[(u64, u8)], when: &str) {
    vm.monitor.qemu_io(disk, "flush");
    let image = active(vm, disk);
    for &(offset, byte) in ranges {
        assert!(
            image::read_pattern_ok(&image, byte, offset, K64),
            "{when}: {disk} ({}) does not read {byte:#04x} at {offset}",
            image.display()
        );
    }
}

/// `check --json` finds no drift (and exits 0).
fn assert_check_clean(vm: &Vm, when: &str) {
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], json!([]), "{when}: {check}");
}

/// The names of the snapshots `list --json` shows.
fn snapshot_names(vm: &Vm) -> Vec<String> {
    vm.snapctl.args(["list"]).json()["snapshots"]
        .as_array()
        .expect("list --json has snapshots")
        .iter()
        .map(|s| s["name"].as_str().unwrap().to_owned())
        .collect()
}

/// Kills QEMU with SIGKILL and waits for it to be gone.
fn kill_qemu(vm: &mut Vm) {
    let pid = nix::unistd::Pid::from_raw(vm.qemu.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).expect("kill QEMU");
    assert!(
        vm.qemu.wait_exit(Duration::from_secs(10)).is_some(),
        "QEMU survived SIGKILL"
    );
}

/// Starts a new QEMU (the old one is gone) from `qemu-args` alone: not
/// paused by the test (`-S` is for `qemu-args` to add), with a new qtest
/// socket and new monitors; returns its qtest client.
fn restart_from_qemu_args(vm: &mut Vm) -> Qtest {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let args: Vec<String> = serde_json::from_value(vm.snapctl.args(["qemu-args"]).json())
        .expect("qemu-args --json is an array of strings");
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let (snapctl_socket, test_socket) = (
        vm.dir.join(format!("sc-q{n}.sock")),
        vm.dir.join(format!("t-q{n}.sock")),
    );
    let qtest = qtest_socket();
    vm.qemu = QemuBuilder::new()
        .paused(false)
        .args(qtest_args(&qtest))
        .args(args)
        .log_dir(vm.dir.path())
        .qmp(&snapctl_socket)
        .qmp(&test_socket)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start QEMU from qemu-args: {e}"));
    vm.monitor = Monitor::connect(&test_socket);
    vm.snapctl = vm.snapctl.with_socket(&snapctl_socket);
    Qtest::connect(&qtest)
}

/// The memory file of snapshot `name` (`show --json`), checking that it is
/// there and not empty.
fn memory_file(vm: &Vm, name: &str) -> PathBuf {
    let show = vm.snapctl.args(["show", name]).json();
    assert_eq!(show["kind"], "checkpoint", "{show}");
    let file = PathBuf::from(
        show["memory"]["file"]
            .as_str()
            .unwrap_or_else(|| panic!("show {name}: no memory.file: {show}")),
    );
    let bytes = show["memory"]["bytes"]
        .as_u64()
        .unwrap_or_else(|| panic!("show {name}: no memory.bytes: {show}"));
    assert!(bytes > 0, "{show}");
    assert!(file.is_file(), "{} is missing", file.display());
    file
}

#[test]
fn checkpoint_reverts_memory_and_disks_in_the_same_process() {
    let (mut vm, mut qt) = qtest_vm();
    let pid = vm.qemu.pid();
    qt.fill(RAM_A);
    vm.monitor.write("vda", 0x11, 0, K64);
    vm.monitor.write("vdb", 0x91, 0, K64);

    let created = vm.snapctl.args(["create", "c1", "--memory"]).json();
    assert_eq!(created["snapshot"], "c1", "{created}");
    let list = vm.snapctl.args(["list"]).json();
    let kinds: Vec<&Value> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| &s["kind"])
        .collect();
    assert_eq!(kinds, [&json!("checkpoint")], "{list}");
    let memory = memory_file(&vm, "c1");
    assert_eq!(vm.monitor.run_state(), "running", "the guest continues");

    let checkpoint = |byte: u8| [(0, byte), (K64, 0), (2 * M1, 0)];
    for round in 1..=3u8 {
        let when = format!("after revert #{round}");
        // The guest goes on: new RAM, new data over and beside the checkpoint's.
        qt.fill(RAM_B);
        vm.monitor.write("vda", 0x20 + round, 0, K64);
        vm.monitor.write("vda", 0x30 + round, K64, K64);
        vm.monitor.write("vdb", 0xa0 + round, 0, K64);
        vm.monitor.write("vdb", 0xb0 + round, K64, K64);
        vm.monitor.write("vdb", 0xc0 + round, 2 * M1, K64);

        vm.snapctl.args(["revert", "c1"]).ok();
        assert_eq!(vm.qemu.pid(), pid, "{when}: same QEMU");
        assert!(vm.qemu.try_status().is_none(), "{when}: QEMU exited");
        qt.assert_reads(RAM_A, &when);
        assert_disk_reads(&mut vm, "vda", &checkpoint(0x11), &when);
        // vdb's base holds 0x07 at 2 MiB.
        let mut vdb = checkpoint(0x91);
        vdb[2].1 = 0x07;
        assert_disk_reads(&mut vm, "vdb", &vdb, &when);
        assert_eq!(vm.monitor.run_state(), "running", "{when}");
        assert_check_clean(&vm, &when);
        assert_eq!(vm.snapctl.args(["list"]).json()["current"], "c1", "{when}");
    }

    vm.snapctl.args(["delete", "c1"]).ok();
    assert!(
        !memory.exists(),
        "delete c1 left its memory file {}",
        memory.display()
    );
    assert!(snapshot_names(&vm).is_empty());
    assert_check_clean(&vm, "after delete c1");
    // The guest still reads what it had.
    qt.assert_reads(RAM_A, "after delete c1");
    assert_disk_reads(&mut vm, "vda", &checkpoint(0x11), "after delete c1");
}

#[test]
fn checkpoint_survives_qemu_being_killed() {
    let (mut vm, mut qt) = qtest_vm();
    qt.fill(RAM_A);
    vm.monitor.write("vda", 0x11, 0, K64);
    vm.monitor.write("vdb", 0x91, 0, K64);
    vm.snapctl.args(["create", "c1", "--memory"]).ok();
    let memory = memory_file(&vm, "c1");

    qt.fill(RAM_B);
    vm.monitor.write("vda", 0x22, 0, K64);
    vm.monitor.write("vdb", 0xa2, K64, K64);
    drop(qt);
    kill_qemu(&mut vm);

    // Offline: the disks are prepared, the memory state is pending.
    let out = vm.snapctl.args(["revert", "c1"]).stdout();
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines.iter().any(|l| l.starts_with("-S ")),
        "revert offline prints a qemu-args line starting with -S:\n{out}"
    );
    assert!(
        out.contains("snapctl revert c1"),
        "revert offline says to revert again on the new QEMU:\n{out}"
    );
    let args = vm.snapctl.args(["qemu-args"]).json();
    assert_eq!(args[0], "-S", "{args}");
    assert!(memory.is_file());

    let mut qt = restart_from_qemu_args(&mut vm);
    assert_ne!(
        vm.monitor.run_state(),
        "running",
        "-S keeps the guest stopped"
    );
    vm.snapctl.args(["revert", "c1"]).ok();
    qt.assert_reads(RAM_A, "after the second revert");
    assert_disk_reads(
        &mut vm,
        "vda",
        &[(0, 0x11), (K64, 0)],
        "after the second revert",
    );
    assert_disk_reads(
        &mut vm,
        "vdb",
        &[(0, 0x91), (K64, 0), (2 * M1, 0x07)],
        "after the second revert",
    );
    assert_eq!(vm.monitor.run_state(), "running");
    assert_check_clean(&vm, "after the second revert");
    let args = vm.snapctl.args(["qemu-args"]).json();
    assert_ne!(args[0], "-S", "nothing is pending any more: {args}");

    // And it is a checkpoint like any other: once more, live.
    qt.fill(RAM_B);
    vm.monitor.write("vda", 0x33, 0, K64);
    vm.snapctl.args(["revert", "c1"]).ok();
    qt.assert_reads(RAM_A, "after a live revert");
    assert_disk_reads(&mut vm, "vda", &[(0, 0x11)], "after a live revert");
    assert_check_clean(&vm, "after a live revert");
}

#[test]
fn revert_paused_leaves_a_checkpoint_paused() {
    let (mut vm, mut qt) = qtest_vm();
    qt.fill(RAM_A);
    vm.monitor.write("vda", 0x11, 0, K64);

    vm.snapctl
        .args(["create", "c1", "--memory", "--paused"])
        .ok();
    assert_eq!(
        vm.monitor.run_state(),
        "paused",
        "create --memory --paused leaves the guest paused"
    );
    memory_file(&vm, "c1");
    vm.monitor.ok("cont", Value::Null);
    assert_eq!(vm.monitor.run_state(), "running");

    qt.fill(RAM_B);
    vm.monitor.write("vda", 0x22, 0, K64);
    let reverted = vm.snapctl.args(["revert", "c1", "--paused"]).json();
    assert_eq!(reverted["paused"], true, "{reverted}");
    qt.assert_reads(RAM_A, "after revert --paused");
    assert_disk_reads(&mut vm, "vda", &[(0, 0x11)], "after revert --paused");
    assert_eq!(vm.monitor.run_state(), "paused", "revert --paused");
    assert_check_clean(&vm, "after revert --paused");

    // Without --paused, a paused checkpoint's guest resumes.
    qt.fill(RAM_B);
    vm.snapctl.args(["revert", "c1"]).ok();
    qt.assert_reads(RAM_A, "after revert");
    assert_eq!(vm.monitor.run_state(), "running", "revert of a checkpoint");
}

#[test]
fn checkpoint_bad_input_changes_nothing() {
    let mut vm = Vm::two_disks();
    vm.monitor.write("vda", 0x11, 0, K64);
    vm.snapctl.args(["create", "s0"]).ok();
    let before = vm.untouched_state();

    // Refused by the command line parser.
    for args in [
        &["create", "c1", "--memory", "--quiesce"][..],
        &["create", "c1", "--memory-file", "/tmp/never-made.qcow2"][..],
        &["create", "c1", "--paused"][..],
    ] {
        let out = vm.snapctl.args(args).run();
        assert!(
            !out.status.success() && out.status.code().is_some(),
            "{args:?} should be refused: {out:?}"
        );
        assert!(!out.stderr.is_empty(), "{args:?}: {out:?}");
        vm.assert_untouched(&before, &format!("{args:?}"));
    }
    assert!(!Path::new("/tmp/never-made.qcow2").exists());

    // A memory file that exists is never overwritten.
    let taken = vm.dir.join("taken.qcow2");
    std::fs::write(&taken, b"precious").unwrap();
    vm.snapctl
        .args(["create", "c1", "--memory", "--memory-file"])
        .arg(&taken)
        .error_line(&["already exists", "taken.qcow2"]);
    vm.assert_untouched(&before, "--memory-file that exists");
    assert_eq!(std::fs::read(&taken).unwrap(), b"precious");

    // Nor is a directory made for it.
    let nowhere = vm.dir.join("nowhere");
    vm.snapctl
        .args(["create", "c1", "--memory", "--memory-file"])
        .arg(nowhere.join("mem.qcow2"))
        .error_line(&["does not exist"]);
    vm.assert_untouched(&before, "--memory-file in a missing directory");
    assert!(!nowhere.exists());

    // QEMU stopped: there is no memory to save.
    vm.quit();
    let record = vm.snapctl.record_bytes();
    let images = dir_listing(&vm.images());
    vm.snapctl
        .args(["create", "c1", "--memory"])
        .error_line(&["not running"]);
    assert!(vm.snapctl.record_bytes() == record, "the record changed");
    assert_eq!(dir_listing(&vm.images()), images);
    assert_eq!(snapshot_names(&vm), ["s0"]);
}

#[test]
fn checkpoint_on_a_full_disk_resumes_and_records_nothing() {
    let (mut vm, mut qt) = qtest_vm();
    qt.fill(RAM_A);
    // A few MiB of non-zero RAM: the state is far bigger than the filesystem.
    qt.memset(0x200_0000, 8 * M1, 0x5a);
    vm.monitor.write("vda", 0x11, 0, K64);
    vm.snapctl.args(["init"]).ok();
    let full = Tmpfs::mount(vm.dir.join("full"), "512k");
    let before = vm.untouched_state();

    let err = vm
        .snapctl
        .args(["create", "c1", "--memory", "--memory-file"])
        .arg(full.path.join("mem.qcow2"))
        .error_line(&[]);
    assert!(
        err.contains("VM state"),
        "the error says what failed: {err}"
    );
    assert_eq!(vm.monitor.run_state(), "running", "the guest runs again");
    vm.assert_untouched(&before, "a checkpoint on a full filesystem");
    assert!(
        dir_listing(&full.path).is_empty(),
        "a partial memory file is left: {:?}",
        dir_listing(&full.path)
    );
    assert!(vm.monitor.jobs().is_empty(), "{:?}", vm.monitor.jobs());
    assert_check_clean(&vm, "after the failed checkpoint");
    qt.assert_reads(RAM_A, "after the failed checkpoint");
    assert_eq!(qt.readq(0x200_0000 + 4 * M1), 0x5a5a_5a5a_5a5a_5a5a);

    // With room, the same checkpoint works.
    vm.snapctl.args(["create", "c1", "--memory"]).ok();
    memory_file(&vm, "c1");
    drop(full);
}

/// snapctl SIGKILLed at `point` during `create c1 --memory`; returns the VM,
/// its qtest client and the state before the create.
fn killed_checkpoint(point: &str) -> (Vm, Qtest, Untouched) {
    let (mut vm, mut qt) = qtest_vm();
    qt.fill(RAM_A);
    vm.monitor.write("vda", 0x11, 0, K64);
    vm.monitor.write("vdb", 0x91, 0, K64);
    vm.snapctl.args(["init"]).ok();
    let before = vm.untouched_state();
    let output = vm
        .snapctl
        .args(["create", "c1", "--memory"])
        .env("SNAPCTL_FAULT", point)
        .run();
    assert_eq!(
        output.status.signal(),
        Some(9),
        "snapctl should die at {point}: {output:?}"
    );
    (vm, qt, before)
}

/// Nothing of the rolled-back checkpoint c1 is left: no snapshot, no file,
/// no node, no job.
fn assert_rolled_back(vm: &mut Vm, images: &[String]) {
    assert!(snapshot_names(vm).is_empty());
    let listing: Vec<String> = dir_listing(&vm.images()).into_iter().collect();
    assert_eq!(listing, images, "files left in the images directory");
    let state = vm.monitor.block_state();
    let left: Vec<_> = state
        .nodes
        .iter()
        .filter(|n| n.name.contains("-c1-"))
        .collect();
    assert!(left.is_empty(), "nodes left: {left:?}");
    assert!(vm.monitor.jobs().is_empty(), "{:?}", vm.monitor.jobs());
    assert_check_clean(vm, "after the roll-back");
}

#[test]
fn snapctl_killed_during_a_checkpoint_leaves_nothing() {
    // Killed while the state is being saved: rolled back.
    let (mut vm, mut qt, before) = killed_checkpoint("jobs:started");
    assert_eq!(
        vm.monitor.run_state(),
        "paused",
        "snapctl died with the guest stopped"
    );
    let left = dir_listing(&vm.images());
    assert!(
        left.contains("vda.c1.qcow2") && left.contains("vdb.c1.qcow2") && left.len() == 6,
        "the overlays and the memory file are there before the repair: {left:?}"
    );
    let repair = vm.snapctl.args(["check", "--repair"]).run();
    assert!(repair.status.success(), "{repair:?}");
    assert!(
        String::from_utf8_lossy(&repair.stdout).contains("rolled back"),
        "{repair:?}"
    );
    let original: Vec<String> = ["base.qcow2", "data-base.qcow2", "data.qcow2"]
        .map(str::to_owned)
        .into();
    assert_rolled_back(&mut vm, &original);
    vm.assert_untouched(&before, "after the roll-back");
    // The guest goes on from where it was, on its old disks.
    if vm.monitor.run_state() != "running" {
        vm.monitor.ok("cont", Value::Null);
    }
    qt.assert_reads(RAM_A, "after the roll-back");
    assert_disk_reads(&mut vm, "vda", &[(0, 0x11)], "after the roll-back");
    drop((vm, qt));

    // The same, and QEMU killed too before anything settled it.
    let (mut vm, qt, _) = killed_checkpoint("jobs:started");
    drop(qt);
    kill_qemu(&mut vm);
    assert_eq!(
        dir_listing(&vm.images()).len(),
        6,
        "overlays and memory file"
    );
    let qt = restart_from_qemu_args(&mut vm);
    let repair = vm.snapctl.args(["check", "--repair"]).run();
    assert!(repair.status.success(), "{repair:?}");
    assert_rolled_back(&mut vm, &original);
    assert_disk_reads(&mut vm, "vda", &[(0, 0x11)], "after the roll-back");
    drop((vm, qt));

    // Killed right after the disks switched: the checkpoint is completed.
    let (mut vm, mut qt, _) = killed_checkpoint("create:switched");
    let repair = vm.snapctl.args(["check", "--repair"]).run();
    assert!(repair.status.success(), "{repair:?}");
    assert!(
        String::from_utf8_lossy(&repair.stdout).contains("completed"),
        "{repair:?}"
    );
    assert_eq!(snapshot_names(&vm), ["c1"]);
    memory_file(&vm, "c1");
    assert!(vm.monitor.jobs().is_empty(), "{:?}", vm.monitor.jobs());
    let state = vm.monitor.block_state();
    assert!(
        !state.nodes.iter().any(|n| n.name.starts_with("sv-")),
        "the memory node is left: {state:#?}"
    );
    assert_check_clean(&vm, "after completing the checkpoint");
    if vm.monitor.run_state() != "running" {
        vm.monitor.ok("cont", Value::Null);
    }
    // It is a whole checkpoint: reverting to it brings back memory and disks.
    qt.fill(RAM_B);
    vm.monitor.write("vda", 0x22, 0, K64);
    vm.snapctl.args(["revert", "c1"]).ok();
    qt.assert_reads(RAM_A, "after reverting to the completed checkpoint");
    assert_disk_reads(
        &mut vm,
        "vda",
        &[(0, 0x11)],
        "after reverting to the completed checkpoint",
    );
    assert_disk_reads(
        &mut vm,
        "vdb",
        &[(0, 0x91)],
        "after reverting to the completed checkpoint",
    );
    assert_eq!(vm.monitor.run_state(), "running");
    assert_check_clean(&vm, "after reverting to the completed checkpoint");
}

/// A checkpoint reverted with QEMU stopped, whose new QEMU ran its guest
/// (`cont`) and wrote to the prepared disks before `revert` was run again.
fn pending_checkpoint_whose_guest_ran() -> (Vm, Qtest) {
    let (mut vm, mut qt) = qtest_vm();
    qt.fill(RAM_A);
    vm.monitor.write("vda", 0x11, 0, K64);
    vm.snapctl.args(["create", "c1", "--memory"]).ok();
    drop(qt);
    kill_qemu(&mut vm);
    vm.snapctl.args(["revert", "c1"]).ok();
    let mut qt = restart_from_qemu_args(&mut vm);
    // The user starts the guest instead of running `revert c1` first.
    vm.monitor.ok("cont", Value::Null);
    qt.fill(RAM_B);
    vm.monitor.write("vda", 0x33, 0, K64);
    (vm, qt)
}

#[test]
fn a_pending_checkpoint_whose_guest_ran_is_reverted_whole() {
    let (mut vm, mut qt) = pending_checkpoint_whose_guest_ran();
    vm.snapctl.args(["revert", "c1"]).ok();
    qt.assert_reads(RAM_A, "after revert c1");
    assert_disk_reads(
        &mut vm,
        "vda",
        &[(0, 0x11)],
        "c1's memory must come with c1's disks, not with what the guest wrote since",
    );
    assert_eq!(vm.monitor.run_state(), "running");
    assert_check_clean(&vm, "after revert c1");
}

#[test]
fn deleting_a_pending_checkpoint_forgets_its_memory() {
    let (mut vm, mut qt) = qtest_vm();
    qt.fill(RAM_A);
    vm.snapctl.args(["create", "c1", "--memory"]).ok();
    vm.snapctl.args(["create", "s2"]).ok();
    drop(qt);
    kill_qemu(&mut vm);
    vm.snapctl.args(["revert", "c1"]).ok();
    assert_eq!(vm.snapctl.args(["qemu-args"]).json()[0], "-S");
    let memory = memory_file(&vm, "c1");
    vm.snapctl.args(["delete", "c1"]).ok();
    assert!(!memory.exists());
    let args = vm.snapctl.args(["qemu-args"]).json();
    assert_ne!(
        args[0], "-S",
        "no memory state is left to load, so nothing needs QEMU to start paused: {args}"
    );
    assert_eq!(vm.snapctl.record()["pending_memory"], Value::Null);
}

/// QEMU cannot save or load a state inside an image with the migration
/// capabilities of file streams on: a checkpoint is refused before anything
/// changes, and so is a revert to one.
#[test]
fn stream_capabilities_are_refused_before_anything_changes() {
    let (mut vm, _qtest) = qtest_vm();
    vm.snapctl.args(["create", "c1", "--memory"]).ok();
    let on = |vm: &mut Vm, state: bool| {
        vm.monitor.ok(
            "migrate-set-capabilities",
            serde_json::json!({"capabilities": [{"capability": "mapped-ram", "state": state}]}),
        );
    };
    on(&mut vm, true);
    let before = vm.untouched_state();
    vm.snapctl
        .args(["create", "c2", "--memory"])
        .error_line(&["mapped-ram", "migrate-set-capabilities"]);
    vm.snapctl
        .args(["revert", "c1"])
        .error_line(&["mapped-ram"]);
    vm.assert_untouched(&before, "a refused checkpoint");
    on(&mut vm, false);
    vm.snapctl.args(["revert", "c1"]).ok();
}
