//! Overlays are owned like the images they cover: a QEMU that runs as
//! another user than snapctl (`-run-with user=nobody`: it drops its
//! privileges after start-up) can open them, and a snapctl that cannot give
//! an overlay its image's owner refuses before anything changes.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use integration::{QemuBuilder, WorkDir, image};
use serde_json::json;

use crate::util::{DISK_SIZE, K64, Vm, mode_of};

/// The user the QEMU of these tests runs as.
const NOBODY: u32 = 65534;

/// A user that is neither root nor [`NOBODY`], to run snapctl as.
const DAEMON: u32 = 1;

fn owner_of(path: &Path) -> (u32, u32) {
    let m = std::fs::symlink_metadata(path)
        .unwrap_or_else(|e| panic!("cannot stat {}: {e}", path.display()));
    (m.uid(), m.gid())
}

fn chown(path: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("cannot chown {}: {e}", path.display()));
}

fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("cannot chmod {}: {e}", path.display()));
}

fn require_root(what: &str) {
    assert!(
        nix::unistd::geteuid().is_root(),
        "{what} needs root (the tests run as root in CI): it starts QEMU as another user"
    );
}

/// QEMU runs as nobody on a base image nobody owns, mode 0600, in a
/// directory nobody owns; snapctl runs as root. Each overlay snapctl makes
/// (create, live revert) is nobody's with the base's mode, and QEMU writes
/// to it and reads the data back.
#[test]
fn overlays_of_a_qemu_running_as_another_user() {
    require_root("this test");
    let dir = WorkDir::new();
    // QEMU, once it is nobody, must reach the images.
    chmod(dir.path(), 0o755);
    let img = dir.join("img");
    std::fs::create_dir(&img).unwrap();
    let base = img.join("base.qcow2");
    image::create_qcow2(&base, DISK_SIZE);
    image::write_pattern(&base, 0x11, 0, K64);
    chown(&base, NOBODY, NOBODY);
    chmod(&base, 0o600);
    chown(&img, NOBODY, NOBODY);
    chmod(&img, 0o700);
    let builder = QemuBuilder::new()
        .args(["-run-with", "user=nobody"])
        .blockdev_chain("vda", &[("base", &base)]);
    let mut vm = Vm::start(dir, builder);

    vm.snapctl.args(["create", "s1"]).ok();
    let overlay = img.join("vda.s1.qcow2");
    assert_eq!(vm.monitor.block_state().root_file("vda"), overlay);
    assert_eq!(owner_of(&overlay), (NOBODY, NOBODY));
    assert_eq!(mode_of(&overlay), 0o600);
    vm.monitor.write("vda", 0x22, 0, K64);
    vm.monitor.qemu_io("vda", &format!("read -P 0x22 0 {K64}"));

    vm.snapctl.args(["revert", "s1"]).ok();
    let reverted = img.join("vda.s1-r1.qcow2");
    assert_eq!(vm.monitor.block_state().root_file("vda"), reverted);
    assert_eq!(owner_of(&reverted), (NOBODY, NOBODY));
    assert_eq!(mode_of(&reverted), 0o600);
    vm.monitor.qemu_io("vda", &format!("read -P 0x11 0 {K64}"));
    vm.monitor.write("vda", 0x33, 0, K64);
    vm.monitor.qemu_io("vda", &format!("read -P 0x33 0 {K64}"));
    assert_eq!(vm.snapctl.args(["check"]).json()["drift"], json!([]));

    vm.quit();
    let out = vm.qemu.stdout_text();
    assert!(
        !out.contains("Pattern verification failed") && !out.contains("failed"),
        "QEMU read wrong data or failed a write:\n{out}"
    );
    assert_eq!(
        out.matches(&format!("wrote {K64}/{K64} bytes")).count(),
        2,
        "both writes ran:\n{out}"
    );
    assert!(image::read_pattern_ok(&reverted, 0x33, 0, K64));
    assert!(image::read_pattern_ok(&base, 0x11, 0, K64));
}

/// snapctl running as a user who is neither root nor the owner of the image
/// an overlay covers refuses, naming both files, and changes nothing.
#[test]
fn overlay_that_cannot_be_owned_like_its_image_is_refused() {
    require_root("this test");
    let mut vm = Vm::two_disks();
    vm.snapctl.args(["create", "s1"]).ok();
    vm.quit();
    // Everything of snapctl's is the other user's now; the frozen images
    // stay root's.
    let state = vm.snapctl.state_dir().to_owned();
    for entry in std::fs::read_dir(&state).unwrap() {
        chown(&entry.unwrap().path(), DAEMON, DAEMON);
    }
    chown(&state, DAEMON, DAEMON);
    chmod(vm.dir.path(), 0o755);
    chmod(&vm.images(), 0o777);
    let record = vm.snapctl.record_bytes();
    let images = crate::util::dir_listing(&vm.images());

    let line = vm
        .snapctl
        .args(["revert", "s1"])
        .run_as(DAEMON, DAEMON)
        .error_line(&[
            &vm.image("vda.s1-r1.qcow2").display().to_string(),
            &vm.image("base.qcow2").display().to_string(),
            "not root",
        ]);
    assert_eq!(vm.snapctl.record_bytes(), record, "{line}");
    assert_eq!(crate::util::dir_listing(&vm.images()), images, "{line}");

    // As root it goes through, and the overlays are root's like the images.
    vm.snapctl.args(["revert", "s1"]).ok();
    assert_eq!(owner_of(&vm.image("vda.s1-r1.qcow2")), (0, 0));
    let status = Command::new("qemu-img")
        .args(["check", "-q"])
        .arg(vm.image("vda.s1-r1.qcow2"))
        .status()
        .unwrap();
    assert!(status.success());
}
