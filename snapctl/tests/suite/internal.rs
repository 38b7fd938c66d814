//! Internal snapshots (`create --internal`, `savevm` style): each disk's state
//! inside its own active qcow2 image, the memory in the first one's; reverted
//! inside the running QEMU; never carried away by merges; refused, saying
//! why, where they cannot be used.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use integration::{QemuBuilder, image};
use serde_json::Value;

use crate::util::{K64, M1, Vm};

/// Guest RAM through QEMU's qtest accelerator (QEMU-NOTES §9).
struct Ram(BufReader<UnixStream>);

impl Ram {
    fn connect(path: &Path) -> Ram {
        Ram(BufReader::new(UnixStream::connect(path).unwrap_or_else(
            |e| panic!("qtest {}: {e}", path.display()),
        )))
    }

    fn ask(&mut self, line: &str) -> String {
        writeln!(self.0.get_mut(), "{line}").unwrap();
        let mut reply = String::new();
        self.0.read_line(&mut reply).unwrap();
        reply.trim().to_owned()
    }

    fn write(&mut self, addr: u64, value: u64) {
        assert_eq!(self.ask(&format!("writeq {addr:#x} {value:#x}")), "OK");
    }

    fn read(&mut self, addr: u64) -> String {
        self.ask(&format!("readq {addr:#x}"))
    }
}

const ADDR: u64 = 0x100_0000;

fn qtest_args(socket: &Path) -> [String; 2] {
    [
        "-qtest".to_owned(),
        format!("unix:{},server=on,wait=off", socket.display()),
    ]
}

/// The standard two-disk VM, running, with its RAM reachable through qtest.
fn vm_with_ram() -> (Vm, Ram, PathBuf) {
    let socket = std::env::temp_dir().join(format!("qt-{}-{}.sock", std::process::id(), rand()));
    let vm = Vm::two_disks_with(QemuBuilder::new().paused(false).args(qtest_args(&socket)));
    let ram = Ram::connect(&socket);
    (vm, ram, socket)
}

fn rand() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos() as u64
}

fn active(vm: &Vm, disk: &str) -> PathBuf {
    PathBuf::from(
        vm.snapctl.record()["disks"][disk]["active"]
            .as_str()
            .unwrap(),
    )
}

fn flush(vm: &mut Vm) {
    for disk in ["vda", "vdb"] {
        vm.monitor.hmp(&format!(
            "qemu-io -d /machine/peripheral/{disk}/virtio-backend \"flush\""
        ));
    }
}

fn tags(image: &Path) -> Vec<String> {
    image::info(image)["snapshots"]
        .as_array()
        .map(|list| {
            list.iter()
                .map(|s| s["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn internal_snapshot_reverts_memory_and_disks_in_the_same_process() {
    let (mut vm, mut ram, _socket) = vm_with_ram();
    vm.snapctl.args(["init"]).ok();
    ram.write(ADDR, 0x1111_1111_1111_1111);
    vm.monitor.write("vda", 0x11, M1, K64);
    vm.monitor.write("vdb", 0x12, M1, K64);
    let created = vm.snapctl.args(["create", "i1", "--internal"]).json();
    assert_eq!(created["kind"], "internal", "{created}");
    let list = vm.snapctl.args(["list"]).json();
    assert_eq!(list["snapshots"][0]["kind"], "internal", "{list}");
    for disk in ["vda", "vdb"] {
        assert_eq!(tags(&active(&vm, disk)), ["i1"], "{disk}");
    }
    let chain = vm.snapctl.args(["chain", "vda"]).stdout();
    assert!(chain.contains("holds internal snapshot i1"), "{chain}");

    let pid = vm.qemu.pid();
    for round in 0..3u8 {
        ram.write(ADDR, 0x2222_2222_2222_2222);
        vm.monitor.write("vda", 0x21 + round, M1, K64);
        vm.monitor.write("vdb", 0x31 + round, M1, K64);
        vm.snapctl.args(["revert", "i1"]).ok();
        assert_eq!(vm.qemu.pid(), pid, "the same QEMU process");
        assert_eq!(ram.read(ADDR), "OK 0x1111111111111111", "round {round}");
        assert_eq!(vm.monitor.run_state(), "running");
        flush(&mut vm);
        assert!(image::read_pattern_ok(&active(&vm, "vda"), 0x11, M1, K64));
        assert!(image::read_pattern_ok(&active(&vm, "vdb"), 0x12, M1, K64));
    }
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], Value::Array(Vec::new()), "{check}");

    vm.snapctl.args(["delete", "i1"]).ok();
    for disk in ["vda", "vdb"] {
        assert!(tags(&active(&vm, disk)).is_empty(), "{disk}");
    }
    let list = vm.snapctl.args(["list"]).json();
    assert_eq!(list["snapshots"], Value::Array(Vec::new()), "{list}");
}

#[test]
fn images_holding_internal_snapshots_are_never_merged_away() {
    let (mut vm, mut ram, _socket) = vm_with_ram();
    vm.snapctl.args(["create", "s0"]).ok();
    vm.snapctl.args(["create", "s1"]).ok();
    ram.write(ADDR, 0x3333_3333_3333_3333);
    vm.monitor.write("vda", 0x41, M1, K64);
    vm.snapctl.args(["create", "i1", "--internal"]).ok();
    let holder = active(&vm, "vda");
    let below = image::backing_file(&holder);

    // A pull would give the image holding i1 a new backing.
    vm.snapctl
        .args(["pull", "vda"])
        .error_line(&["internal snapshot i1"]);

    // A later external snapshot freezes the image: i1 can no longer be
    // reverted to or deleted in place, the image is never committed away,
    // and each refusal says why.
    vm.snapctl.args(["create", "s2"]).ok();
    let record = vm.snapctl.record_bytes();
    vm.snapctl
        .args(["revert", "i1"])
        .error_line(&["i1", "no longer", "active image"]);
    vm.snapctl
        .args(["delete", "i1"])
        .error_line(&["i1", "froze", "--metadata-only"]);
    vm.snapctl
        .args(["commit", "vda", "--top", "s2", "--base", "s1"])
        .error_line(&["internal snapshot i1"]);
    assert_eq!(
        vm.snapctl.record_bytes(),
        record,
        "a refusal changed the record"
    );

    // Deleting s1 (which froze the layer under it) keeps the layer: a commit
    // would carry i1's image away, a stream would change what i1 shows.
    let text = vm.snapctl.args(["delete", "s1"]).stdout();
    assert!(text.contains("internal snapshot i1"), "{text}");
    assert_eq!(
        image::backing_file(&holder),
        below,
        "i1's image kept its backing"
    );

    // Back on the image that holds it, i1 works again.
    vm.snapctl.args(["revert", "s2"]).ok();
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], Value::Array(Vec::new()), "{check}");
    assert_eq!(tags(&holder), ["i1"]);
}

#[test]
fn internal_snapshot_with_qemu_stopped_waits_for_the_next_qemu() {
    let (mut vm, mut ram, socket) = vm_with_ram();
    vm.snapctl.args(["init"]).ok();
    ram.write(ADDR, 0x4444_4444_4444_4444);
    vm.monitor.write("vda", 0x51, M1, K64);
    vm.snapctl.args(["create", "i1", "--internal"]).ok();
    vm.monitor.write("vda", 0x52, M1, K64);
    drop(ram);
    vm.quit();

    // With QEMU stopped: the disks are reverted in their images, the memory
    // state waits, and qemu-args starts QEMU paused for it.
    let text = vm.snapctl.args(["revert", "i1"]).stdout();
    assert!(text.contains("snapctl revert i1"), "{text}");
    assert!(image::read_pattern_ok(&active(&vm, "vda"), 0x51, M1, K64));
    let args: Vec<String> = serde_json::from_value(vm.snapctl.args(["qemu-args"]).json()).unwrap();
    assert_eq!(args[0], "-S", "{args:?}");
    let _ = std::fs::remove_file(&socket);
    let mut full: Vec<String> = qtest_args(&socket).to_vec();
    full.extend(args);
    vm.restart(&full);
    let mut ram = Ram::connect(&socket);
    vm.snapctl.args(["revert", "i1"]).ok();
    assert_eq!(ram.read(ADDR), "OK 0x4444444444444444");
    assert_eq!(vm.monitor.run_state(), "running");
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], Value::Array(Vec::new()), "{check}");

    // Deleted with QEMU stopped: qemu-img removes it from the images.
    vm.quit();
    vm.snapctl.args(["delete", "i1"]).ok();
    assert!(tags(&active(&vm, "vda")).is_empty());
    assert!(tags(&active(&vm, "vdb")).is_empty());
}

#[test]
fn internal_snapshot_bad_input_changes_nothing() {
    let dir = integration::WorkDir::new();
    std::fs::create_dir(dir.join("img")).unwrap();
    let raw = dir.join("img/raw.img");
    std::fs::File::create(&raw)
        .unwrap()
        .set_len(8 * M1)
        .unwrap();
    let builder = QemuBuilder::new()
        .blockdev(serde_json::json!({
            "driver": "raw", "node-name": "r0",
            "file": {"driver": "file", "filename": raw},
        }))
        .device("virtio-blk-pci,drive=r0,id=vda");
    let mut vm = Vm::start(dir, builder);
    vm.snapctl.args(["init"]).ok();
    let before = vm.untouched_state();
    vm.snapctl
        .args(["create", "i1", "--internal"])
        .error_line(&["raw", "qcow2"]);
    vm.assert_untouched(&before, "--internal on a raw disk");
    let both = vm
        .snapctl
        .args(["create", "i1", "--internal", "--memory"])
        .run();
    assert_eq!(both.status.code(), Some(2), "{both:?}");
    vm.assert_untouched(&before, "--internal with --memory");
}
