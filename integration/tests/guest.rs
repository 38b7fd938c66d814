//! snapctl against a running Linux guest that keeps writing while it is
//! snapshotted.
//!
//! Each test boots the test guest (`scripts/build-guest`, see
//! [`integration::guest`]) on a fresh qcow2 data disk. The guest appends a
//! checksummed, fsynced record to `records.log` about every 100 ms and, with
//! `snapguest.report_every=1`, announces every durable record on its console.
//! The tests run the `snapctl` command against the VM's `snapctl.sock`
//! monitor, watch QEMU through `admin.sock` and the guest through its agent,
//! and then verify the records and the ext4 filesystem inside every frozen
//! image with `scripts/check-records`, `dumpe2fs` and `e2fsck`.
//!
//! What the console proves about a snapshot: every record announced before
//! `snapctl create` started was durable, so the frozen image holds at least
//! that many. The guest writes one record at a time, so once the console has
//! announced a few more records after `create` returned, the frozen image
//! cannot hold more than that count.
//!
//! Test names contain `guest`: nextest runs them one at a time (the
//! `qemu-guest` group in `.config/nextest.toml`); under plain `cargo test` a
//! lock in this file does the same.
//!
//! The `snapctl` binary: Cargo gives `CARGO_BIN_EXE_snapctl` only to the
//! tests of the snapctl crate itself, so these tests use
//! `<repo>/target/debug/snapctl` when it is newer than the sources and
//! manifests it is built from (what `cargo nextest run --workspace` leaves
//! there), and otherwise run `cargo build -p snapctl` once per test process
//! and use the executable Cargo reports.

use integration::{Snapctl, snapctl_binary};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use integration::guest::{
    DISK_ID, Guest, GuestBuilder, GuestImage, check_filesystem, check_records,
};
use integration::{WorkDir, image};
use qmp_client::qapi::qmp;
use qmp_client::{Client, Config, FreezeStatus, GuestAgent};
use serde_json::Value;
use tokio::runtime::Runtime;

/// The VM name snapctl registers.
const VM: &str = "guest";

/// Size of the guest's data disk.
const DISK_SIZE: u64 = 64 << 20;

/// Records the guest writes before the first snapshot.
const MIN_RECORDS: u64 = 20;

/// From QEMU's start to `SNAPGUEST READY` (about 4 to 10 s under TCG).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// For a few more records to appear (one takes about 0.1 to 0.2 s).
const RECORD_TIMEOUT: Duration = Duration::from_secs(30);

/// For QEMU to exit after `quit`, and for the guest agent to answer.
const SHORT: Duration = Duration::from_secs(10);

/// Records the guest must announce after `create` returned before the
/// snapshot counts as over: one record may be in flight (written, or fsynced
/// but not yet announced) when the snapshot is taken, and the console may lag
/// a line behind, so three more are certainly after it.
const RECORDS_AFTER: u64 = 3;

/// One guest at a time per test process (nextest runs one per process anyway).
static GUEST_LOCK: Mutex<()> = Mutex::new(());

/// The test guest under snapctl. Fields drop in order: QEMU stops before
/// the work directory holding its images and sockets is removed.
#[derive(Debug)]
struct GuestVm {
    guest: Guest,
    admin: Client,
    snapctl: Snapctl,
    runtime: Runtime,
    _dir: WorkDir,
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl GuestVm {
    /// Boots the guest on a new data disk `base.qcow2` and waits until it is
    /// ready; connects the test's monitor.
    fn boot() -> GuestVm {
        let one_at_a_time = GUEST_LOCK.lock().unwrap_or_else(PoisonError::into_inner);
        let image = GuestImage::locate();
        let bin = snapctl_binary().to_owned();
        let dir = WorkDir::new();
        let base = dir.join("base.qcow2");
        image::create_qcow2(&base, DISK_SIZE);
        let started = Instant::now();
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
        GuestVm {
            guest,
            admin,
            snapctl,
            runtime,
            _dir: dir,
            _one_at_a_time: one_at_a_time,
        }
    }

    /// The guest agent's socket as a snapctl argument.
    fn qga(&self) -> String {
        path_arg(self.guest.qga_socket())
    }

    /// `snapctl create NAME [--quiesce --qga …] --json` while the guest
    /// writes, with the records the console announced around it.
    fn take_snapshot(&mut self, name: &str, quiesce: bool) -> Snapshot {
        let before = self.guest.records_seen();
        let qga = self.qga();
        let mut args = vec!["create", name];
        if quiesce {
            args.extend(["--quiesce", "--qga", &qga]);
        }
        let created = self.snapctl.json(&args);
        let at_return = self.guest.records_seen();
        // The guest goes on writing (after the thaw, when quiesced).
        let after = self
            .guest
            .wait_for_records(at_return + RECORDS_AFTER, RECORD_TIMEOUT);
        eprintln!("{name}: records announced: {before} before create, {after} after it");

        assert_eq!(created["snapshot"], name, "{created}");
        assert_eq!(created["quiesced"], quiesce, "{created}");
        assert_eq!(created["warnings"], serde_json::json!([]), "{created}");
        let disk = &created["disks"][DISK_ID];
        let frozen = PathBuf::from(
            disk["image"]
                .as_str()
                .unwrap_or_else(|| panic!("{created}")),
        );
        let overlay = PathBuf::from(
            disk["overlay"]
                .as_str()
                .unwrap_or_else(|| panic!("{created}")),
        );
        assert_eq!(
            self.active_image(),
            overlay,
            "QEMU's active image after {name}"
        );
        Snapshot {
            name: name.to_owned(),
            quiesced: quiesce,
            frozen,
            overlay,
            before,
            after,
        }
    }

    /// The file of the data disk's active image, from QEMU (`query-block`).
    fn active_image(&self) -> PathBuf {
        let blocks = self
            .runtime
            .block_on(self.admin.execute_raw("query-block", Value::Null))
            .unwrap_or_else(|e| panic!("query-block: {e}"));
        let qdev = format!("/machine/peripheral/{DISK_ID}/virtio-backend");
        let block = blocks
            .as_array()
            .and_then(|blocks| blocks.iter().find(|b| b["qdev"] == qdev))
            .unwrap_or_else(|| panic!("no disk {DISK_ID} in query-block: {blocks}"));
        PathBuf::from(
            block["inserted"]["file"]
                .as_str()
                .unwrap_or_else(|| panic!("disk {DISK_ID} has no inserted image: {block}")),
        )
    }

    /// `guest-fsfreeze-status`, asked over a fresh agent connection.
    fn freeze_status(&self) -> FreezeStatus {
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

    /// `quit` on the test's monitor; waits for QEMU to exit cleanly, so the
    /// images are closed before they are checked offline.
    fn quit(&mut self) {
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
    }
}

/// One snapshot and the records the console announced around it.
#[derive(Debug)]
struct Snapshot {
    name: String,
    quiesced: bool,
    /// The image holding the disk as of the snapshot.
    frozen: PathBuf,
    /// The image QEMU writes after it.
    overlay: PathBuf,
    /// Announced before `create` started: the frozen image holds at least these.
    before: u64,
    /// Announced well after `create` returned: the frozen image holds at most these.
    after: u64,
}

impl Snapshot {
    /// Verifies the records in the frozen image against the console and
    /// returns how many are valid.
    fn check_records(&self) -> u64 {
        let report = check_records(&self.frozen, self.before);
        eprintln!(
            "{}: {} holds {} valid records (quiesced: {})",
            self.name,
            self.frozen.display(),
            report.valid,
            report.quiesced
        );
        assert!(
            report.valid <= self.after,
            "{}: the frozen image holds {} records, but the console had announced only {} \
             well after create returned\n{}",
            self.name,
            report.valid,
            self.after,
            report.output
        );
        assert_eq!(
            report.quiesced, self.quiesced,
            "{}: quiesced filesystem (no needs_recovery)\n{}",
            self.name, report.output
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

    /// Checks the frozen image's ext4 filesystem: clean, and needing journal
    /// recovery exactly when the snapshot was not quiesced.
    fn check_filesystem(&self) {
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

/// A path as a snapctl argument (the work directories are ASCII).
fn path_arg(path: &Path) -> String {
    path.to_str()
        .unwrap_or_else(|| panic!("not UTF-8: {}", path.display()))
        .to_owned()
}

/// A quiesced snapshot taken while the guest writes: the frozen image's
/// filesystem is clean without journal recovery and holds every record
/// announced before the snapshot, none torn; the agent thawed the guest.
fn quiesced_snapshot_is_clean() {
    let mut vm = GuestVm::boot();
    vm.snapctl.ok(&["init"]);
    vm.guest.wait_for_records(MIN_RECORDS, RECORD_TIMEOUT);

    let s1 = vm.take_snapshot("s1", true);
    assert_eq!(s1.frozen, vm.guest.disk(), "s1 freezes the base image");
    assert_eq!(vm.freeze_status(), FreezeStatus::Thawed);

    // QEMU still runs; the frozen image no longer changes.
    s1.check_filesystem();
    let in_s1 = s1.check_records();

    let last = vm.guest.records_seen();
    vm.quit();
    let active = check_records(&s1.overlay, last);
    assert!(active.valid > in_s1, "{}", active.output);
}

/// A snapshot without the agent: the frozen image is crash-consistent, its
/// journal replays to a clean filesystem, and the records up to the
/// snapshot are intact.
fn crash_consistent_snapshot_recovers() {
    let mut vm = GuestVm::boot();
    vm.snapctl.ok(&["init"]);
    vm.guest.wait_for_records(MIN_RECORDS, RECORD_TIMEOUT);

    let s1 = vm.take_snapshot("s1", false);
    assert_eq!(s1.frozen, vm.guest.disk(), "s1 freezes the base image");

    s1.check_filesystem();
    let in_s1 = s1.check_records();

    let last = vm.guest.records_seen();
    vm.quit();
    let active = check_records(&s1.overlay, last);
    assert!(active.valid > in_s1, "{}", active.output);
}

/// Three snapshots (the second quiesced) while the guest writes: QEMU
/// switches to each new overlay, the guest writes on after each, and once
/// QEMU has quit every image of the chain holds a valid prefix of the
/// records, longer from one snapshot to the next.
fn keeps_writing_after_snapshots() {
    let mut vm = GuestVm::boot();
    vm.snapctl.ok(&["init"]);
    vm.guest.wait_for_records(MIN_RECORDS, RECORD_TIMEOUT);

    let snapshots = [
        vm.take_snapshot("s1", false),
        vm.take_snapshot("s2", true),
        vm.take_snapshot("s3", false),
    ];
    assert_eq!(snapshots[0].frozen, vm.guest.disk());
    assert_eq!(snapshots[1].frozen, snapshots[0].overlay);
    assert_eq!(snapshots[2].frozen, snapshots[1].overlay);
    vm.snapctl.ok(&["check"]);
    let list = vm.snapctl.json(&["list"]);
    assert_eq!(list["current"], "s3", "{list}");

    let last = vm.guest.records_seen();
    vm.quit();

    let chain = vm.snapctl.json(&["chain"]);
    let images: Vec<&str> = chain["disks"][DISK_ID]
        .as_array()
        .unwrap_or_else(|| panic!("{chain}"))
        .iter()
        .map(|layer| layer["image"].as_str().unwrap_or_else(|| panic!("{chain}")))
        .collect();
    let expected: Vec<String> = [
        &snapshots[2].overlay,
        &snapshots[1].overlay,
        &snapshots[0].overlay,
        &snapshots[0].frozen,
    ]
    .map(|p| path_arg(p))
    .to_vec();
    assert_eq!(images, expected, "{chain}");

    let mut counts: Vec<u64> = snapshots.iter().map(Snapshot::check_records).collect();
    let active = check_records(&snapshots[2].overlay, last);
    counts.push(active.valid);
    eprintln!("valid records in s1, s2, s3, active: {counts:?}");
    assert!(
        counts.windows(2).all(|w| w[0] < w[1]),
        "each image holds more records than the one it was frozen before: {counts:?}"
    );
}

#[test]
fn guest_quiesced_snapshot_is_clean() {
    quiesced_snapshot_is_clean();
}

#[test]
fn guest_crash_consistent_snapshot_recovers() {
    crash_consistent_snapshot_recovers();
}

#[test]
fn guest_keeps_writing_after_snapshots() {
    keeps_writing_after_snapshots();
}
