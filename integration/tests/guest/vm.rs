//! [`GuestVm`]: the test guest booted under QEMU and registered with
//! snapctl, and what a snapshot taken while it writes must show
//! ([`Snapshot`]); the timeouts and sizes every guest scenario shares.
//!
//! The `snapctl` binary: Cargo gives `CARGO_BIN_EXE_snapctl` only to the
//! tests of the snapctl crate itself, so these tests use
//! `<repo>/target/debug/snapctl` when it is newer than the sources and
//! manifests it is built from (what `cargo nextest run --workspace` leaves
//! there), and otherwise run `cargo build -p snapctl` once per test process
//! and use the executable Cargo reports.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use integration::guest::{
    DISK_ID, Guest, GuestBuilder, GuestImage, check_filesystem, check_records,
};
use integration::{Snapctl, WorkDir, image, snapctl_binary};
use qmp_client::qapi::qmp;
use qmp_client::{Client, Config, FreezeStatus, GuestAgent};
use serde_json::{Value, json};
use tokio::runtime::Runtime;

/// The VM name snapctl registers.
const VM: &str = "guest";

/// Size of the guest's data disk.
const DISK_SIZE: u64 = 64 << 20;

/// Records the guest writes before the first snapshot.
pub const MIN_RECORDS: u64 = 20;

/// From QEMU's start (or a reset) to `SNAPGUEST READY` (about 4 to 10 s
/// under TCG).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// For a few more records to appear (one takes about 0.1 to 0.2 s).
pub const RECORD_TIMEOUT: Duration = Duration::from_secs(30);

/// For QEMU to exit after `quit`, and for the guest agent to answer.
pub const SHORT: Duration = Duration::from_secs(10);

/// Records the guest must announce after `create` returned before the
/// snapshot counts as over: one record may be in flight when the snapshot
/// is taken, and the console may lag a line behind.
pub const RECORDS_AFTER: u64 = 3;

/// One guest at a time per test process (nextest runs one per process anyway).
static GUEST_LOCK: Mutex<()> = Mutex::new(());

/// The test guest under snapctl. Fields drop in order: QEMU stops before
/// the work directory holding its images and sockets is removed.
#[derive(Debug)]
pub struct GuestVm {
    pub guest: Guest,
    admin: Client,
    pub snapctl: Snapctl,
    runtime: Runtime,
    started: Instant,
    _dir: WorkDir,
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl GuestVm {
    /// Boots the guest on a new data disk `base.qcow2`, waits until it is
    /// ready, connects the test's monitor and registers the VM with snapctl.
    pub fn boot() -> GuestVm {
        let one_at_a_time = GUEST_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        let started = Instant::now();
        let image = GuestImage::locate();
        let bin = snapctl_binary().to_owned();
        let dir = WorkDir::new();
        let base = dir.join("base.qcow2");
        image::create_qcow2(&base, DISK_SIZE);
        let mut guest = GuestBuilder::new(&image, dir.path(), &base)
            .kernel_arg("snapguest.report_every=1")
            .spawn()
            .expect("start QEMU");
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("tokio runtime");
        let admin = runtime.block_on(async {
            let (client, connection) = Config::new()
                .connect_unix(guest.admin_socket())
                .await
                .unwrap_or_else(|e| panic!("connect to {}: {e}", guest.admin_socket().display()));
            tokio::spawn(connection);
            client
        });
        guest.wait_ready(BOOT_TIMEOUT);
        eprintln!("guest ready {:.1?} after QEMU started", started.elapsed());
        let snapctl = Snapctl::new(
            &bin,
            dir.join("state"),
            VM,
            guest.snapctl_socket().to_owned(),
            dir.path(),
        );
        snapctl.ok(&["init"]);
        GuestVm {
            guest,
            admin,
            snapctl,
            runtime,
            started,
            _dir: dir,
            _one_at_a_time: one_at_a_time,
        }
    }

    /// The test's work directory.
    pub fn dir(&self) -> &std::path::Path {
        self._dir.path()
    }

    /// The guest agent's socket as a snapctl argument.
    pub fn qga(&self) -> String {
        path_arg(self.guest.qga_socket())
    }

    /// `snapctl create NAME [--quiesce --qga …] --json` while the guest
    /// writes, with the records the console announced around it.
    pub fn take_snapshot(&mut self, name: &str, quiesce: bool) -> Snapshot {
        let before = self.guest.records_seen();
        let qga = self.qga();
        let mut args = vec!["create", name];
        if quiesce {
            args.extend(["--quiesce", "--qga", &qga]);
        }
        let created = self.snapctl.json(&args);
        let at_return = self.guest.records_seen();
        let after = self
            .guest
            .wait_for_records(at_return + RECORDS_AFTER, RECORD_TIMEOUT);
        eprintln!("{name}: records announced: {before} before create, {after} after it");

        assert_eq!(created["snapshot"], name, "{created}");
        assert_eq!(created["quiesced"], quiesce, "{created}");
        assert_eq!(created["warnings"], json!([]), "{created}");
        let disk = &created["disks"][DISK_ID];
        let snapshot = Snapshot {
            name: name.to_owned(),
            quiesced: quiesce,
            frozen: path_of(&disk["image"], &created),
            overlay: path_of(&disk["overlay"], &created),
            before,
            after,
        };
        assert_eq!(
            self.active_image(),
            snapshot.overlay,
            "QEMU's active image after {name}"
        );
        snapshot
    }

    /// The file of the data disk's active image, from QEMU (`query-block`).
    pub fn active_image(&self) -> PathBuf {
        let blocks = self
            .runtime
            .block_on(self.admin.execute_raw("query-block", Value::Null))
            .unwrap_or_else(|e| panic!("query-block: {e}"));
        let qdev = format!("/machine/peripheral/{DISK_ID}/virtio-backend");
        let block = blocks
            .as_array()
            .and_then(|blocks| blocks.iter().find(|b| b["qdev"] == qdev))
            .unwrap_or_else(|| panic!("no disk {DISK_ID} in query-block: {blocks}"));
        path_of(&block["inserted"]["file"], &blocks)
    }

    /// What QEMU does when the guest or a monitor asks for a reset:
    /// `"reset"`, or `"shutdown"` (what `-no-reboot` set at start).
    pub fn set_reboot_action(&self, action: &str) {
        self.runtime
            .block_on(
                self.admin
                    .execute_raw("set-action", json!({ "reboot": action })),
            )
            .unwrap_or_else(|e| panic!("set-action reboot={action}: {e}"));
    }

    /// QEMU's run state (`query-status`), e.g. `running`.
    pub fn run_state(&self) -> String {
        let status = self
            .runtime
            .block_on(self.admin.execute_raw("query-status", Value::Null))
            .unwrap_or_else(|e| panic!("query-status: {e}"));
        status["status"].as_str().unwrap_or_default().to_owned()
    }

    /// `guest-fsfreeze-status`, asked over a fresh agent connection.
    pub fn freeze_status(&self) -> FreezeStatus {
        let qga = self.guest.qga_socket();
        self.runtime.block_on(async {
            let mut agent = GuestAgent::connect(qga, SHORT)
                .await
                .unwrap_or_else(|e| panic!("connect to the guest agent: {e}"));
            agent
                .fsfreeze_status()
                .await
                .unwrap_or_else(|e| panic!("guest-fsfreeze-status: {e}"))
        })
    }

    /// The frozen image of `name`'s data disk, as `snapctl show` reports it.
    pub fn frozen_image(&self, name: &str) -> PathBuf {
        let shown = self.snapctl.json(&["show", name]);
        assert_eq!(shown["name"], name, "{shown}");
        path_of(&shown["disks"][DISK_ID]["image"], &shown)
    }

    /// The data disk's chain as `snapctl chain` reports it, active image first.
    pub fn chain(&self) -> Vec<PathBuf> {
        let chain = self.snapctl.json(&["chain"]);
        chain["disks"][DISK_ID]
            .as_array()
            .unwrap_or_else(|| panic!("{chain}"))
            .iter()
            .map(|layer| path_of(&layer["image"], &chain))
            .collect()
    }

    /// The snapshot names `snapctl list` reports, and the current one.
    pub fn list(&self) -> (Vec<String>, Value) {
        let list = self.snapctl.json(&["list"]);
        let names = list["snapshots"]
            .as_array()
            .unwrap_or_else(|| panic!("{list}"))
            .iter()
            .map(|s| {
                s["name"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{list}"))
                    .to_owned()
            })
            .collect();
        (names, list["current"].clone())
    }

    /// `snapctl check --json`: exit status 0 and no drift.
    pub fn check_no_drift(&self) {
        let check = self.snapctl.json(&["check"]);
        assert_eq!(check["drift"], json!([]), "{check}");
    }

    /// `quit` on the test's monitor; waits for QEMU to exit cleanly, so the
    /// images are closed before they are checked offline.
    pub fn quit(&mut self) {
        match self.runtime.block_on(self.admin.execute(qmp::quit {})) {
            Ok(_) => {}
            // The socket may close before the reply is read.
            Err(e) if e.is_closed() => {}
            Err(e) => panic!("quit: {e}"),
        }
        let status = self
            .guest
            .wait_exit(SHORT)
            .unwrap_or_else(|| panic!("QEMU did not exit within {SHORT:?} of quit"));
        assert!(status.success(), "QEMU's exit status after quit: {status}");
        eprintln!("QEMU quit {:.1?} after it started", self.started.elapsed());
    }
}

/// One snapshot and the records the console announced around it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub name: String,
    pub quiesced: bool,
    /// The image holding the disk as of the snapshot.
    pub frozen: PathBuf,
    /// The image QEMU wrote after it.
    pub overlay: PathBuf,
    /// Announced before `create` started: the frozen image holds at least these.
    pub before: u64,
    /// Announced well after `create` returned: the frozen image holds at most these.
    pub after: u64,
}

impl Snapshot {
    /// Verifies the records in `image`, which must show this snapshot's
    /// state, against the console; returns how many are valid.
    pub fn check_records_in(&self, image: &Path) -> u64 {
        let report = check_records(image, self.before);
        eprintln!(
            "{}: {} holds {} valid records (quiesced: {})",
            self.name,
            image.display(),
            report.valid,
            report.quiesced
        );
        assert!(
            report.valid <= self.after,
            "{}: {} holds {} records, but the console had announced only {} well after \
             create returned\n{}",
            self.name,
            image.display(),
            report.valid,
            self.after,
            report.output
        );
        assert_eq!(
            report.quiesced,
            self.quiesced,
            "{}: quiesced filesystem (no needs_recovery) in {}\n{}",
            self.name,
            image.display(),
            report.output
        );
        if self.quiesced {
            assert_eq!(
                report.torn, None,
                "{}: a quiesced image has no torn record\n{}",
                self.name, report.output
            );
        }
        report.valid
    }

    /// [`Snapshot::check_records_in`] the frozen image `create` reported.
    pub fn check_records(&self) -> u64 {
        self.check_records_in(&self.frozen)
    }

    /// Checks the frozen image's ext4 filesystem: clean, and needing journal
    /// recovery exactly when the snapshot was not quiesced.
    pub fn check_filesystem(&self) {
        let fs = check_filesystem(&self.frozen);
        assert_eq!(
            fs.needs_recovery,
            !self.quiesced,
            "{}: needs_recovery in {}\n{}",
            self.name,
            self.frozen.display(),
            fs.output
        );
        assert!(
            fs.clean,
            "{}: e2fsck -fn found problems in {}{}\n{}",
            self.name,
            self.frozen.display(),
            if fs.needs_recovery {
                " after replaying the journal"
            } else {
                ""
            },
            fs.output
        );
    }
}

/// A JSON string that names a file, as a path; panics with `context`.
pub fn path_of(value: &Value, context: &Value) -> PathBuf {
    PathBuf::from(
        value
            .as_str()
            .unwrap_or_else(|| panic!("expected a path: {context}")),
    )
}

/// A path as a snapctl argument (the work directories are ASCII).
pub fn path_arg(path: &Path) -> String {
    path.to_str()
        .unwrap_or_else(|| panic!("not UTF-8: {}", path.display()))
        .to_owned()
}
