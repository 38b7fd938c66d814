//! The VMs the tests start: [`Vm`] (a QEMU with snapctl's monitor and the
//! test's own, in a work directory), its standard setups and their
//! [`Layout`]s, and [`Tmpfs`] for tests that need a full filesystem.
//!
//! Every VM gets two QMP monitors: `sc.sock` for snapctl and `t.sock` for the
//! test (QEMU serves one client per monitor). Images live in `<workdir>/img`,
//! the record in `<workdir>/state/vm1.json`.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use integration::{Qemu, QemuBuilder, WorkDir, image};

use super::history::Bulk;
use super::{BlockState, DISK_SIZE, K64, M1, Monitor, Snapctl, VM, dir_listing};

/// One disk of a standard VM, as the history tables and the shared
/// assertions see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Disk {
    /// The qdev id, e.g. `vda`.
    pub id: &'static str,
    /// Bits set in every non-zero byte the tests write on this disk, so
    /// that data landing on the wrong disk shows.
    pub mark: u8,
    /// 64 KiB ranges (offset, byte) that the disk's foreign images hold and
    /// that it reads at every moment.
    pub holds: &'static [(u64, u8)],
}

impl Disk {
    /// The byte a write of `byte` puts on this disk.
    pub fn byte(&self, byte: u8) -> u8 {
        if byte != 0 { byte | self.mark } else { byte }
    }
}

/// The disks of a standard VM and its foreign images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub disks: &'static [Disk],
    /// The foreign images' file names in `img/`: found by snapctl, never
    /// written or deleted by it.
    pub foreign: &'static [&'static str],
}

impl Layout {
    /// The disk with qdev id `id`.
    pub fn disk(&self, id: &str) -> &'static Disk {
        self.disks
            .iter()
            .find(|d| d.id == id)
            .unwrap_or_else(|| panic!("the VM has no disk {id}: {self:?}"))
    }
}

/// [`Vm::one_disk`]: `vda` on the foreign `img/base.qcow2`.
pub const ONE_DISK: Layout = Layout {
    disks: &[Disk {
        id: "vda",
        mark: 0,
        holds: &[],
    }],
    foreign: &["base.qcow2"],
};

/// [`Vm::two_disks`]: `vda` as in [`ONE_DISK`], and `vdb`, whose bytes the
/// tests write with the high bit set, on `img/data.qcow2` over
/// `img/data-base.qcow2`, which holds 0x07 at 2 MiB.
pub const TWO_DISKS: Layout = Layout {
    disks: &[
        Disk {
            id: "vda",
            mark: 0,
            holds: &[],
        },
        Disk {
            id: "vdb",
            mark: 0x80,
            holds: &[(2 * M1, 0x07)],
        },
    ],
    foreign: &["base.qcow2", "data.qcow2", "data-base.qcow2"],
};

/// A running QEMU with snapctl's monitor and the test's own, in a work
/// directory. Fields drop in order: QEMU stops before the directory goes.
#[derive(Debug)]
pub struct Vm {
    pub qemu: Qemu,
    pub monitor: Monitor,
    pub snapctl: Snapctl,
    /// QEMU generation, to give a restarted QEMU fresh socket names.
    generation: u32,
    /// The disks and foreign images, for the standard setups.
    layout: Option<&'static Layout>,
    pub dir: WorkDir,
}

impl Vm {
    /// Starts QEMU as `builder` describes, adding the two QMP monitors.
    pub fn start(dir: WorkDir, builder: QemuBuilder) -> Vm {
        let (qemu, monitor, socket) = spawn(&dir, builder, 0);
        let snapctl = Snapctl::new(dir.join("state"), VM, socket);
        Vm {
            qemu,
            monitor,
            snapctl,
            generation: 0,
            layout: None,
            dir,
        }
    }

    /// The standard VM ([`TWO_DISKS`]): two 8 MiB disks, paused (`-S`).
    ///
    /// * `vda`: one `-blockdev` layer, `img/base.qcow2` (node `base`).
    /// * `vdb`: legacy `-drive` (QEMU names the nodes) on `img/data.qcow2`,
    ///   an overlay of `img/data-base.qcow2`, which holds 0x07 at 2 MiB.
    pub fn two_disks() -> Vm {
        Vm::two_disks_with(QemuBuilder::new())
    }

    /// The standard two-disk VM with its CPUs running from the start
    /// instead of paused (`-S`).
    pub fn two_disks_running() -> Vm {
        Vm::two_disks_with(QemuBuilder::new().paused(false))
    }

    /// The standard two-disk VM started from `builder` (extra options, run state).
    pub fn two_disks_with(builder: QemuBuilder) -> Vm {
        let dir = WorkDir::new();
        let img = dir.join("img");
        std::fs::create_dir(&img).unwrap();
        let base = img.join("base.qcow2");
        let data_base = img.join("data-base.qcow2");
        let data = img.join("data.qcow2");
        image::create_qcow2(&base, DISK_SIZE);
        image::create_qcow2(&data_base, DISK_SIZE);
        image::write_pattern(&data_base, 0x07, 2 * M1, K64);
        image::create_overlay(&data, &data_base, "qcow2");
        let builder =
            builder
                .blockdev_chain("vda", &[("base", &base)])
                .drive("drive-vdb", "vdb", &data);
        Vm::start(dir, builder).with_layout(&TWO_DISKS)
    }

    /// A paused VM with one 64 MiB disk ([`ONE_DISK`]), room for a delta
    /// big enough to keep a 1 MiB/s job busy: `vda`, one `-blockdev` layer
    /// on the foreign `img/base.qcow2`, which holds `bulk` when given.
    pub fn one_disk(bulk: Option<Bulk>) -> Vm {
        let dir = WorkDir::new();
        let img = dir.join("img");
        std::fs::create_dir(&img).unwrap();
        let base = img.join("base.qcow2");
        image::create_qcow2(&base, 64 * M1);
        if let Some(bulk) = bulk {
            image::write_pattern(&base, bulk.byte, bulk.offset, bulk.len);
        }
        let builder = QemuBuilder::new().blockdev_chain("vda", &[("base", &base)]);
        Vm::start(dir, builder).with_layout(&ONE_DISK)
    }

    fn with_layout(self, layout: &'static Layout) -> Vm {
        Vm {
            layout: Some(layout),
            ..self
        }
    }

    /// The disks and foreign images of a standard setup.
    pub fn layout(&self) -> &'static Layout {
        self.layout.expect(
            "this VM was started with Vm::start, not a standard setup: its layout is unknown",
        )
    }

    /// `<workdir>/img`.
    pub fn images(&self) -> PathBuf {
        self.dir.join("img")
    }

    /// `<workdir>/img/<name>`.
    pub fn image(&self, name: &str) -> PathBuf {
        self.images().join(name)
    }

    /// Quits QEMU through the test's monitor and waits for it to exit.
    pub fn quit(&mut self) {
        self.monitor.quit();
        if self.qemu.wait_exit(Duration::from_secs(10)).is_none() {
            self.qemu.dump_output();
            self.qemu.quit_or_kill(Duration::from_secs(5));
            panic!("QEMU did not exit after quit");
        }
    }

    /// Starts a new QEMU (after [`Vm::quit`]) with the base machine and
    /// `args`, fresh monitors, and points snapctl at the new one.
    pub fn restart<I, S>(&mut self, args: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.generation += 1;
        let builder = QemuBuilder::new().args(args);
        let (qemu, monitor, socket) = spawn(&self.dir, builder, self.generation);
        self.qemu = qemu;
        self.monitor = monitor;
        self.snapctl = self.snapctl.with_socket(socket);
    }

    /// Everything a failed command must leave as it was.
    pub fn untouched_state(&mut self) -> Untouched {
        Untouched {
            record: self.snapctl.record_bytes(),
            images: dir_listing(&self.images()),
            graph: self.monitor.block_state(),
        }
    }

    /// Panics, saying what changed, unless the state is still `before`.
    pub fn assert_untouched(&mut self, before: &Untouched, after_what: &str) {
        let now = self.untouched_state();
        assert!(
            now.record == before.record,
            "{after_what}: the record changed\n--- before\n{}\n--- after\n{}",
            lossy(before.record.as_deref()),
            lossy(now.record.as_deref()),
        );
        assert_eq!(
            now.images, before.images,
            "{after_what}: the image directory changed"
        );
        assert_eq!(
            now.graph, before.graph,
            "{after_what}: QEMU's block graph changed"
        );
    }
}

fn lossy(bytes: Option<&[u8]>) -> String {
    match bytes {
        Some(b) => String::from_utf8_lossy(b).into_owned(),
        None => "(no record)".to_owned(),
    }
}

/// Record bytes, image directory and block graph, to compare after a failure.
#[derive(Debug, Clone)]
pub struct Untouched {
    record: Option<Vec<u8>>,
    images: BTreeSet<String>,
    graph: BlockState,
}

fn spawn(dir: &WorkDir, builder: QemuBuilder, generation: u32) -> (Qemu, Monitor, PathBuf) {
    let suffix = if generation == 0 {
        String::new()
    } else {
        format!("-{generation}")
    };
    let snapctl_socket = dir.join(format!("sc{suffix}.sock"));
    let test_socket = dir.join(format!("t{suffix}.sock"));
    let qemu = builder
        .log_dir(dir.path())
        .qmp(&snapctl_socket)
        .qmp(&test_socket)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start QEMU: {e}"));
    let monitor = Monitor::connect(&test_socket);
    (qemu, monitor, snapctl_socket)
}

/// A small tmpfs mounted for one test, unmounted on drop.
#[derive(Debug)]
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (e.g. `1M`) at `path`, created if missing.
    /// Needs root, as the tests run in CI; without it the test fails saying so.
    pub fn mount(path: PathBuf, size: &str) -> Tmpfs {
        std::fs::create_dir_all(&path).unwrap();
        let output = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size},mode=0700"))
            .arg("tmpfs")
            .arg(&path)
            .output()
            .expect("run mount");
        assert!(
            output.status.success(),
            "this test fills a small tmpfs to make a write fail with ENOSPC, \
             and mounting one needs root (uid {}): mount said: {}",
            current_uid(),
            String::from_utf8_lossy(&output.stderr).trim()
        );
        Tmpfs { path }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.path)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // Still busy (QEMU being killed while a test unwinds): detach it.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

fn current_uid() -> u32 {
    nix::unistd::getuid().as_raw()
}
