//! `qemu-args` restarts QEMU as it was: the node options the disk was opened
//! with (discard, detect-zeroes, cache), the device's properties (serial,
//! bootindex), and backing layers opened read-only, so that a second QEMU
//! can stand on the same template at the same time.

use std::path::{Path, PathBuf};

use integration::{QemuBuilder, WorkDir, image};
use serde_json::{Value, json};

use crate::util::{DISK_SIZE, K64, M1, Monitor, Vm};

/// A one-disk VM whose `-blockdev` and `-device` carry settings beyond the
/// chain: `discard=unmap`, `detect-zeroes=unmap`, `cache.direct=on`, the
/// file node's `aio=threads`; `serial=SNAP123,bootindex=2`.
fn tuned_vm() -> Vm {
    let dir = WorkDir::new();
    let img = dir.join("img");
    std::fs::create_dir(&img).unwrap();
    let base = img.join("base.qcow2");
    image::create_qcow2(&base, DISK_SIZE);
    let builder = QemuBuilder::new()
        .blockdev(json!({
            "driver": "qcow2",
            "node-name": "base",
            "discard": "unmap",
            "detect-zeroes": "unmap",
            "cache": {"direct": true},
            "file": {"driver": "file", "filename": base, "aio": "threads"},
            "backing": null,
        }))
        .device("virtio-blk-pci,id=vda,drive=base,serial=SNAP123,bootindex=2");
    Vm::start(dir, builder)
}

fn qemu_args(vm: &Vm) -> Vec<String> {
    serde_json::from_value(vm.snapctl.args(["qemu-args"]).json())
        .expect("qemu-args --json is an array of strings")
}

/// The `-blockdev` values of an argument vector, base first.
fn blockdevs(args: &[String]) -> Vec<Value> {
    args.windows(2)
        .filter(|w| w[0] == "-blockdev")
        .map(|w| serde_json::from_str(&w[1]).unwrap())
        .collect()
}

/// `args` with the top layer's image replaced by `image`.
fn with_top(args: &[String], image: &Path) -> Vec<String> {
    let last = args
        .iter()
        .rposition(|a| a == "-blockdev")
        .expect("qemu-args has a -blockdev");
    let mut top: Value = serde_json::from_str(&args[last + 1]).unwrap();
    top["file"]["filename"] = json!(image);
    let mut out = args.to_vec();
    out[last + 1] = top.to_string();
    out
}

fn qom_get(monitor: &mut Monitor, property: &str) -> Value {
    monitor.ok(
        "qom-get",
        json!({"path": "/machine/peripheral/vda", "property": property}),
    )
}

/// `query-named-block-nodes` entries of the format nodes of vda's chain,
/// active image first.
fn chain_nodes(monitor: &mut Monitor) -> Vec<Value> {
    let blocks = monitor.ok("query-block", Value::Null);
    let root = blocks
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"] == "/machine/peripheral/vda/virtio-backend")
        .expect("QEMU has vda")["inserted"]["node-name"]
        .as_str()
        .unwrap()
        .to_owned();
    let nodes = monitor.ok("query-named-block-nodes", json!({"flat": true}));
    let nodes = nodes.as_array().unwrap();
    let mut chain = Vec::new();
    let mut next = Some(root);
    while let Some(name) = next {
        let node = nodes
            .iter()
            .find(|n| n["node-name"] == name.as_str())
            .unwrap_or_else(|| panic!("no node {name}"))
            .clone();
        next = node.get("backing_file").and_then(|_| {
            let backing = node["backing_file"].as_str()?;
            nodes
                .iter()
                .find(|n| n["drv"] == "qcow2" && n["file"] == backing)
                .and_then(|n| n["node-name"].as_str())
                .map(str::to_owned)
        });
        chain.push(node);
    }
    chain
}

fn active(vm: &Vm) -> PathBuf {
    PathBuf::from(
        vm.snapctl.record()["disks"]["vda"]["active"]
            .as_str()
            .unwrap(),
    )
}

#[test]
fn qemu_args_restart_with_the_same_node_options_device_properties_and_read_only_backing() {
    let mut vm = tuned_vm();
    vm.monitor.write("vda", 0x11, M1, K64);

    // init reads the settings and says, once, what QEMU does not report.
    let init = vm.snapctl.args(["init"]).ok();
    let stderr = String::from_utf8_lossy(&init.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("vda: ") && stderr.contains("aio"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("discard"),
        "discard=unmap is known from detect-zeroes=unmap: {stderr}"
    );
    let record = vm.snapctl.record();
    assert_eq!(
        record["disks"]["vda"]["device"]["extra"],
        json!({"bootindex": "2", "serial": "SNAP123"}),
        "{record:#}"
    );
    assert_eq!(
        record["disks"]["vda"]["node_options"],
        json!({"cache.direct": true, "detect-zeroes": "unmap", "discard": "unmap"}),
        "{record:#}"
    );
    // Registered already: nothing read again, nothing said.
    let again = vm.snapctl.args(["init"]).ok();
    assert!(again.stderr.is_empty(), "{again:?}");

    vm.snapctl.args(["create", "s1"]).ok();
    vm.monitor.write("vda", 0x22, M1, K64);
    vm.snapctl.args(["create", "s2"]).ok();
    vm.quit();
    let reverted = vm.snapctl.args(["revert", "s1"]).json();
    assert_eq!(reverted["live"], false, "{reverted}");

    let args = qemu_args(&vm);
    assert_eq!(reverted["qemu_args"], json!(args), "{reverted}");
    let specs = blockdevs(&args);
    assert_eq!(specs.len(), 2, "{args:?}");
    for (i, spec) in specs.iter().enumerate() {
        assert_eq!(spec["discard"], "unmap", "{spec}");
        assert_eq!(spec["detect-zeroes"], "unmap", "{spec}");
        assert_eq!(spec["cache"]["direct"], true, "{spec}");
        let backing_layer = i + 1 < specs.len();
        assert_eq!(
            spec["read-only"].as_bool() == Some(true),
            backing_layer,
            "{spec}"
        );
        // The protocol node inherits it: QEMU can then reopen the layer
        // read-write for a merge into it.
        assert_eq!(spec["file"].get("read-only"), None, "{spec}");
    }

    vm.restart(&args);
    assert_eq!(qom_get(&mut vm.monitor, "serial"), "SNAP123");
    assert_eq!(qom_get(&mut vm.monitor, "bootindex"), 2);
    let chain = chain_nodes(&mut vm.monitor);
    assert_eq!(chain.len(), 2, "{chain:#?}");
    assert_eq!(chain[0]["file"], active(&vm).to_str().unwrap());
    assert_eq!(chain[1]["file"], vm.image("base.qcow2").to_str().unwrap());
    for (i, node) in chain.iter().enumerate() {
        assert_eq!(node["detect_zeroes"], "unmap", "{node}");
        assert_eq!(node["cache"]["direct"], true, "{node}");
        assert_eq!(node["ro"], i > 0, "{node}");
    }
    // A second QEMU on the same template while the first runs: a fresh
    // overlay on s1's frozen image, the layers below read-only as qemu-args
    // gives them.
    let frozen = vm.snapctl.record()["snapshots"][0]["disks"]["vda"]["image"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(frozen, vm.image("base.qcow2").to_str().unwrap());
    let second = vm.dir.join("img/second.qcow2");
    image::create_overlay(&second, Path::new(&frozen), "qcow2");
    let socket = vm.dir.join("second.sock");
    let mut qemu = QemuBuilder::new()
        .args(with_top(&args, &second))
        .log_dir(vm.dir.join("img"))
        .qmp(&socket)
        .spawn()
        .unwrap_or_else(|e| panic!("a second QEMU on the shared template did not start: {e}"));
    let mut monitor = Monitor::connect(&socket);
    let nodes = chain_nodes(&mut monitor);
    assert_eq!(nodes[0]["file"], second.to_str().unwrap());
    assert_eq!(nodes[1]["ro"], true);
    assert_eq!(qom_get(&mut monitor, "serial"), "SNAP123");
    monitor.quit();
    qemu.wait_exit(std::time::Duration::from_secs(10));

    // Without read-only backing layers (what qemu-args gave before), the
    // same second QEMU is refused the write lock: the check above means it.
    let mut writable = with_top(&args, &second);
    for arg in writable.iter_mut() {
        if let Ok(mut spec) = serde_json::from_str::<Value>(arg)
            && spec.get("read-only").is_some()
        {
            spec.as_object_mut().unwrap().remove("read-only");
            spec["file"].as_object_mut().unwrap().remove("read-only");
            *arg = spec.to_string();
        }
    }
    // QEMU may open its monitor before it fails on the lock: then it exits.
    let refused = match QemuBuilder::new()
        .args(writable)
        .log_dir(vm.dir.join("img"))
        .qmp(vm.dir.join("third.sock"))
        .spawn()
    {
        Err(error) => error.to_string(),
        Ok(mut third) => {
            let status = third.wait_exit(std::time::Duration::from_secs(10));
            assert!(
                status.is_some_and(|s| !s.success()),
                "a writable backing layer shared with a running QEMU: {status:?}"
            );
            third.stderr_text()
        }
    };
    assert!(refused.contains("\"write\" lock"), "{refused}");

    // The restarted VM goes on: a live snapshot on it, and qemu-args keeps
    // the settings for the new overlay too, its backing layers read-only.
    vm.snapctl.args(["create", "s3"]).ok();
    let args = qemu_args(&vm);
    let specs = blockdevs(&args);
    assert_eq!(specs.len(), 3, "{args:?}");
    assert_eq!(specs[2]["file"]["filename"], active(&vm).to_str().unwrap());
    assert!(specs[2].get("read-only").is_none(), "{}", specs[2]);
    for spec in &specs[..2] {
        assert_eq!(spec["read-only"], true, "{spec}");
    }
    for spec in &specs {
        assert_eq!(spec["detect-zeroes"], "unmap", "{spec}");
    }
    let device = &args[args.len() - 1];
    assert!(
        device.starts_with("virtio-blk-pci,id=vda,drive=")
            && device.ends_with(",bootindex=2,serial=SNAP123"),
        "{device}"
    );
}

#[test]
fn a_plain_disk_gets_plain_arguments() {
    // Nothing set beyond the chain: no options, no properties (the base
    // read-only all the same); the legacy
    // -drive disk keeps its write-through cache as the device's write-cache.
    let dir = WorkDir::new();
    let img = dir.join("img");
    std::fs::create_dir(&img).unwrap();
    let base = img.join("base.qcow2");
    let data = img.join("data.qcow2");
    image::create_qcow2(&base, DISK_SIZE);
    image::create_qcow2(&data, DISK_SIZE);
    let builder = QemuBuilder::new()
        .blockdev_chain("vda", &[("base", &base)])
        .arg("-drive")
        .arg(format!(
            "file={},format=qcow2,if=none,id=d1,cache=writethrough",
            data.display()
        ))
        .device("virtio-blk-pci,drive=d1,id=vdb");
    let mut vm = Vm::start(dir, builder);
    // The first create registers the disks and says what QEMU did not report.
    let created = vm.snapctl.args(["create", "s0"]).json();
    let warnings = created["warnings"].as_array().unwrap();
    assert_eq!(warnings.len(), 1, "{created}");
    assert!(
        warnings[0]
            .as_str()
            .unwrap()
            .contains("vda, vdb: discard, aio"),
        "{created}"
    );
    let again = vm.snapctl.args(["create", "s1"]).json();
    assert_eq!(again["warnings"], json!([]), "{again}");
    let record = vm.snapctl.record();
    assert!(
        record["disks"]["vda"].get("node_options").is_none(),
        "{record:#}"
    );
    assert_eq!(record["disks"]["vda"]["device"]["extra"], json!({}));
    assert_eq!(
        record["disks"]["vdb"]["device"]["extra"],
        json!({"write-cache": "off"}),
        "{record:#}"
    );
    let args = qemu_args(&vm);
    let specs = blockdevs(&args);
    assert_eq!(
        specs[0],
        json!({
            "driver": "qcow2",
            "node-name": specs[0]["node-name"],
            "backing": null,
            "read-only": true,
            "file": {"driver": "file", "filename": base},
        })
    );
    vm.quit();
    vm.restart(&args);
    let vdb = vm.monitor.ok("query-block", Value::Null);
    let vdb = vdb
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["qdev"] == "/machine/peripheral/vdb/virtio-backend")
        .unwrap()
        .clone();
    assert_eq!(vdb["inserted"]["cache"]["writeback"], false, "{vdb}");
}
