//! `export`: a standalone image of one disk as it was at a snapshot, with QEMU
//! running and stopped, qcow2 and raw; its content equals the snapshot's
//! frozen chain (`qemu-img compare`), it has no backing file, and the VM is
//! left as it was.

use std::path::Path;
use std::process::Command;

use integration::image;
use serde_json::Value;

use crate::util::{K64, M1, Vm};

/// `qemu-img compare -U` of an export against the frozen image's chain.
fn same_content(frozen: &Path, export: &Path, format: &str) -> bool {
    let status = Command::new("qemu-img")
        .args(["compare", "-q", "-U", "-F", format])
        .arg(frozen)
        .arg(export)
        .status()
        .expect("qemu-img: run scripts/setup");
    status.success()
}

fn frozen(vm: &Vm, snapshot: &str, disk: &str) -> String {
    vm.snapctl.args(["show", snapshot]).json()["disks"][disk]["image"]
        .as_str()
        .unwrap()
        .to_owned()
}

#[test]
fn export_live_and_offline_in_both_formats() {
    let mut vm = Vm::two_disks();
    vm.monitor.write("vda", 0x11, M1, K64);
    vm.snapctl.args(["create", "s1"]).ok();
    vm.monitor.write("vda", 0x22, 2 * M1, K64);
    vm.monitor.write("vdb", 0x23, M1, K64);
    vm.snapctl.args(["create", "s2"]).ok();
    vm.monitor.write("vda", 0x33, 3 * M1, K64);

    let before = vm.untouched_state();
    let cases = [("vda", "qcow2"), ("vdb", "raw")];
    for (disk, format) in cases {
        let output = vm.dir.join(format!("live-{disk}.{format}"));
        let out = output.to_str().unwrap();
        let report = vm
            .snapctl
            .args([
                "export", "s2", "--disk", disk, "-o", out, "--format", format,
            ])
            .json();
        assert_eq!(report["output"], out, "{report}");
        let frozen_image = frozen(&vm, "s2", disk);
        assert!(
            same_content(Path::new(&frozen_image), &output, format),
            "{disk}: the export differs from s2's chain"
        );
        if format == "qcow2" {
            assert_eq!(image::backing_file(&output), None, "a standalone image");
        }
    }
    // What s2 held, and not what came after it.
    let vda = vm.dir.join("live-vda.qcow2");
    assert!(image::read_pattern_ok(&vda, 0x11, M1, K64));
    assert!(image::read_pattern_ok(&vda, 0x22, 2 * M1, K64));
    assert!(image::read_pattern_ok(&vda, 0x00, 3 * M1, K64));
    vm.assert_untouched(&before, "export");

    // An existing output file is never written.
    std::fs::write(vm.dir.join("taken.qcow2"), b"precious").unwrap();
    let taken = vm.dir.join("taken.qcow2");
    vm.snapctl
        .args([
            "export",
            "s1",
            "--disk",
            "vda",
            "-o",
            taken.to_str().unwrap(),
        ])
        .error_line(&["already exists"]);
    assert_eq!(std::fs::read(&taken).unwrap(), b"precious");
    vm.snapctl
        .args(["export", "s1", "-o", "/tmp/never.qcow2"])
        .error_line(&["--disk", "vda", "vdb"]);

    // With QEMU stopped, compressed.
    vm.quit();
    let output = vm.dir.join("offline.qcow2");
    let dry = vm
        .snapctl
        .args([
            "export",
            "s1",
            "--disk",
            "vda",
            "-o",
            output.to_str().unwrap(),
        ])
        .args(["--compress", "--dry-run"])
        .stdout();
    assert!(dry.contains("convert") && dry.contains(" -c "), "{dry}");
    assert!(!output.exists(), "a dry run wrote the output");
    vm.snapctl
        .args([
            "export",
            "s1",
            "--disk",
            "vda",
            "-o",
            output.to_str().unwrap(),
        ])
        .arg("--compress")
        .ok();
    assert!(same_content(
        Path::new(&frozen(&vm, "s1", "vda")),
        &output,
        "qcow2"
    ));
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], Value::Array(Vec::new()), "{check}");
}
