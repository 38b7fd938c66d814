//! `snapctl revert` and `snapctl delete` on a running Linux guest that keeps
//! writing.
//!
//! Each test boots the test guest (`scripts/build-guest`, see
//! [`integration::guest`]) on a fresh qcow2 data disk. The guest appends a
//! checksummed, fsynced record to `records.log` about every 100 ms and, with
//! `snapguest.report_every=1`, announces every durable record on its
//! console. The tests take snapshots while it writes, then revert to one or
//! delete one (the merges run as QEMU block jobs under the guest's writes),
//! and verify with `scripts/check-records` and the raw `records.log` bytes
//! that every remaining snapshot still shows exactly what it froze and that
//! the live disk holds a valid run of records.
//!
//! What the console proves about a snapshot: every record announced before
//! `snapctl create` started is in the frozen image, and once a few more
//! records are announced after `create` returned, the frozen image cannot
//! hold more than that count.
//!
//! A revert resets the guest with QMP `system_reset`. The guest runs under
//! `-no-reboot` (a guest that panics ends QEMU), and under that QEMU turns a
//! reset into a shutdown; so the revert test lets resets reset (QMP
//! `set-action reboot=reset`) for the revert only.
//!
//! Test names contain `guest`: nextest runs them one at a time (the
//! `qemu-guest` group in `.config/nextest.toml`); under plain `cargo test` a
//! lock in this file does the same.
//!
//! The `snapctl` binary: `<repo>/target/debug/snapctl` when it is newer than
//! the sources and manifests it is built from, otherwise `cargo build -p
//! snapctl` once per test process (as in `tests/guest.rs`).

use integration::{Snapctl, snapctl_binary};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use integration::guest::{
    DISK_ID, Guest, GuestBuilder, GuestImage, check_filesystem, check_records, records_log,
};
use integration::{WorkDir, image};
use qmp_client::Client;
use qmp_client::qapi::qmp;
use qmp_client::{Config, FreezeStatus, GuestAgent};
use serde_json::{Value, json};
use tokio::runtime::Runtime;

/// The VM name snapctl registers.
const VM: &str = "guest";

/// Size of the guest's data disk.
const DISK_SIZE: u64 = 64 << 20;

/// Records the guest writes before the first snapshot.
const MIN_RECORDS: u64 = 20;

/// From QEMU's start (or a reset) to `SNAPGUEST READY` (about 4 to 10 s
/// under TCG).
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

/// For a few more records to appear (one takes about 0.1 to 0.2 s).
const RECORD_TIMEOUT: Duration = Duration::from_secs(30);

/// For QEMU to exit after `quit`, and for the guest agent to answer.
const SHORT: Duration = Duration::from_secs(10);

/// Records the guest must announce after `create` returned before the
/// snapshot counts as over: one record may be in flight when the snapshot
/// is taken, and the console may lag a line behind.
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
    started: Instant,
    _dir: WorkDir,
    _one_at_a_time: MutexGuard<'static, ()>,
}

impl GuestVm {
    /// Boots the guest on a new data disk `base.qcow2`, waits until it is
    /// ready, connects the test's monitor and registers the VM with snapctl.
    fn boot() -> GuestVm {
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

    /// `snapctl create NAME [--quiesce --qga …] --json` while the guest
    /// writes, with the records the console announced around it.
    fn take_snapshot(&mut self, name: &str, quiesce: bool) -> Snapshot {
        let before = self.guest.records_seen();
        let qga = path_arg(self.guest.qga_socket());
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
        path_of(&block["inserted"]["file"], &blocks)
    }

    /// What QEMU does when the guest or a monitor asks for a reset:
    /// `"reset"`, or `"shutdown"` (what `-no-reboot` set at start).
    fn set_reboot_action(&self, action: &str) {
        self.runtime
            .block_on(
                self.admin
                    .execute_raw("set-action", json!({ "reboot": action })),
            )
            .unwrap_or_else(|e| panic!("set-action reboot={action}: {e}"));
    }

    /// QEMU's run state (`query-status`), e.g. `running`.
    fn run_state(&self) -> String {
        let status = self
            .runtime
            .block_on(self.admin.execute_raw("query-status", Value::Null))
            .unwrap_or_else(|e| panic!("query-status: {e}"));
        status["status"].as_str().unwrap_or_default().to_owned()
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

    /// The frozen image of `name`'s data disk, as `snapctl show` reports it.
    fn frozen_image(&self, name: &str) -> PathBuf {
        let shown = self.snapctl.json(&["show", name]);
        assert_eq!(shown["name"], name, "{shown}");
        path_of(&shown["disks"][DISK_ID]["image"], &shown)
    }

    /// The data disk's chain as `snapctl chain` reports it, active image first.
    fn chain(&self) -> Vec<PathBuf> {
        let chain = self.snapctl.json(&["chain"]);
        chain["disks"][DISK_ID]
            .as_array()
            .unwrap_or_else(|| panic!("{chain}"))
            .iter()
            .map(|layer| path_of(&layer["image"], &chain))
            .collect()
    }

    /// The snapshot names `snapctl list` reports, and the current one.
    fn list(&self) -> (Vec<String>, Value) {
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
    fn check_no_drift(&self) {
        let check = self.snapctl.json(&["check"]);
        assert_eq!(check["drift"], json!([]), "{check}");
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
        eprintln!("QEMU quit {:.1?} after it started", self.started.elapsed());
    }
}

/// One snapshot and the records the console announced around it.
#[derive(Debug, Clone)]
struct Snapshot {
    name: String,
    quiesced: bool,
    /// The image holding the disk as of the snapshot.
    frozen: PathBuf,
    /// The image QEMU wrote after it.
    overlay: PathBuf,
    /// Announced before `create` started: the frozen image holds at least these.
    before: u64,
    /// Announced well after `create` returned: the frozen image holds at most these.
    after: u64,
}

impl Snapshot {
    /// Verifies the records in `image`, which must show this snapshot's
    /// state, against the console; returns how many are valid.
    fn check_records_in(&self, image: &Path) -> u64 {
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
    fn check_records(&self) -> u64 {
        self.check_records_in(&self.frozen)
    }
}

/// The first `n` lines of a `records.log` (each with its newline).
fn first_records(log: &[u8], n: u64) -> &[u8] {
    let mut end = 0;
    for _ in 0..n {
        match log[end..].iter().position(|&b| b == b'\n') {
            Some(newline) => end += newline + 1,
            None => panic!(
                "records.log has fewer than {n} complete lines:\n{}",
                String::from_utf8_lossy(log)
            ),
        }
    }
    &log[..end]
}

/// The delete report of one snapshot from `snapctl delete NAME --json`,
/// after checking that it names the snapshot and merges one disk with a
/// live QEMU job. Returns the disk's entry.
fn deleted_disk<'a>(deleted: &'a Value, name: &str) -> &'a Value {
    let reports = deleted["deleted"]
        .as_array()
        .unwrap_or_else(|| panic!("{deleted}"));
    assert_eq!(reports.len(), 1, "{deleted}");
    assert_eq!(reports[0]["snapshot"], name, "{deleted}");
    let disks = reports[0]["disks"]
        .as_array()
        .unwrap_or_else(|| panic!("{deleted}"));
    assert_eq!(disks.len(), 1, "{deleted}");
    assert_eq!(disks[0]["disk"], DISK_ID, "{deleted}");
    assert!(
        disks[0]["job"].is_object(),
        "the merge runs as a QEMU job while the guest writes: {deleted}"
    );
    &disks[0]
}

/// A JSON string that names a file, as a path; panics with `context`.
fn path_of(value: &Value, context: &Value) -> PathBuf {
    PathBuf::from(
        value
            .as_str()
            .unwrap_or_else(|| panic!("expected a path: {context}")),
    )
}

/// A path as a snapctl argument (the work directories are ASCII).
fn path_arg(path: &Path) -> String {
    path.to_str()
        .unwrap_or_else(|| panic!("not UTF-8: {}", path.display()))
        .to_owned()
}

/// Records the guest writes after s1 before the revert throws them away.
const RECORDS_TO_LOSE: u64 = 15;

/// A live revert to a quiesced snapshot while the guest writes: the guest
/// resets and boots on exactly s1's state (it resumes after the last record
/// s1's frozen image holds), writes on from there, and the active image ends
/// up as s1's records followed by the new ones.
fn revert_live_sees_exactly_the_snapshot() {
    let mut vm = GuestVm::boot();
    vm.guest.wait_for_records(MIN_RECORDS, RECORD_TIMEOUT);

    let s1 = vm.take_snapshot("s1", true);
    assert_eq!(s1.frozen, vm.guest.disk(), "s1 freezes the base image");
    assert_eq!(vm.freeze_status(), FreezeStatus::Thawed);
    let in_s1 = s1.check_records();
    let s1_log = records_log(&s1.frozen);

    // Records that s1 does not hold and the revert must make disappear.
    let lost = vm
        .guest
        .wait_for_records(s1.after + RECORDS_TO_LOSE, RECORD_TIMEOUT);
    assert!(lost >= in_s1 + RECORDS_TO_LOSE);

    vm.set_reboot_action("reset");
    let mark = vm.guest.console_mark();
    let reverted = vm.snapctl.json(&["revert", "s1"]);
    assert_eq!(reverted["snapshot"], "s1", "{reverted}");
    assert_eq!(reverted["live"], true, "{reverted}");
    assert_eq!(reverted["paused"], false, "{reverted}");
    assert_eq!(reverted["warnings"], json!([]), "{reverted}");
    let disk = &reverted["disks"][DISK_ID];
    assert_eq!(path_of(&disk["image"], &reverted), s1.frozen, "{reverted}");
    let overlay = path_of(&disk["overlay"], &reverted);
    assert_ne!(overlay, s1.overlay, "a fresh overlay: {reverted}");
    assert_eq!(
        vm.active_image(),
        overlay,
        "QEMU's active image after revert"
    );
    assert_eq!(
        vm.run_state(),
        "running",
        "revert without --paused continues"
    );

    // A new boot on s1's disk: it resumes after s1's last record.
    let resumed = vm.guest.wait_ready_since(mark, BOOT_TIMEOUT);
    vm.set_reboot_action("shutdown");
    let new_boot = vm.guest.console_since(mark);
    assert_eq!(
        resumed,
        Some(in_s1),
        "the guest must resume after s1's {in_s1} records; console since the revert:\n{new_boot}"
    );
    assert!(
        !new_boot.contains("SNAPGUEST TORN"),
        "s1 is quiesced: nothing to cut off\n{new_boot}"
    );
    let written = vm
        .guest
        .wait_for_records_since(mark, in_s1 + 10, RECORD_TIMEOUT);
    let last = *written.last().expect("records after the revert");
    assert_eq!(
        written,
        (in_s1 + 1..=last).collect::<Vec<_>>(),
        "after the revert the guest numbers on from s1's {in_s1}, one record at a time"
    );

    // The abandoned overlay (records up to {lost}) is gone; s1 stays, current.
    assert!(
        !s1.overlay.exists(),
        "{} is needed by nothing after the revert and should be removed",
        s1.overlay.display()
    );
    assert_eq!(vm.chain(), [overlay.clone(), s1.frozen.clone()]);
    let (names, current) = vm.list();
    assert_eq!(names, ["s1"]);
    assert_eq!(current, "s1");
    vm.check_no_drift();
    assert_eq!(vm.frozen_image("s1"), s1.frozen);

    // The console still shows the records of before the revert: count this boot's.
    let written = vm.guest.wait_for_records_since(mark, last, SHORT);
    let last = *written.last().expect("records after the revert");
    vm.quit();

    let active = check_records(&overlay, last);
    eprintln!(
        "s1 holds {in_s1} records; the guest wrote up to {lost} before the revert and {last} \
         after; the active image holds {}",
        active.valid
    );
    let active_log = records_log(&overlay);
    assert_eq!(
        first_records(&active_log, in_s1),
        first_records(&s1_log, in_s1),
        "records 1..{in_s1} of the active image are s1's, byte for byte"
    );
    // s1's frozen image is untouched by the revert and what came after.
    assert_eq!(records_log(&s1.frozen), s1_log);
    let fs = check_filesystem(&s1.frozen);
    assert!(!fs.needs_recovery && fs.clean, "{}", fs.output);
}

/// Deleting the current snapshot while the guest writes: its boundary is the
/// active image, so the newer delta is committed down with an active commit
/// and QEMU pivots to the layer below, under the guest's writes.
fn active_commit_while_writing() {
    let mut vm = GuestVm::boot();
    vm.guest.wait_for_records(MIN_RECORDS, RECORD_TIMEOUT);

    let s1 = vm.take_snapshot("s1", true);
    // s1's overlay gets many more records than s2's will: committing s2's
    // small delta down is then the smaller merge, the one snapctl picks.
    vm.guest.wait_for_records(s1.after + 20, RECORD_TIMEOUT);
    let s2 = vm.take_snapshot("s2", false);
    assert_eq!(s2.frozen, s1.overlay);

    let before = vm.guest.records_seen();
    let deleted = vm.snapctl.json(&["delete", "s2"]);
    let at_return = vm.guest.records_seen();
    eprintln!("delete s2: records announced: {before} before, {at_return} when it returned");
    let disk = deleted_disk(&deleted, "s2");
    assert_eq!(disk["frozen"], path_arg(&s2.frozen), "{deleted}");
    assert_eq!(
        disk["merge"],
        json!({"merge": "commit", "top": path_arg(&s2.overlay), "base": path_arg(&s2.frozen)}),
        "{deleted}"
    );
    assert_eq!(disk["job"]["command"], "block-commit", "{deleted}");
    assert_eq!(disk["job"]["active"], true, "{deleted}");

    // QEMU pivoted to s2's frozen image, which is s1's overlay again.
    assert_eq!(
        vm.active_image(),
        s2.frozen,
        "QEMU's active image after delete"
    );
    assert_eq!(vm.run_state(), "running");
    let later = vm
        .guest
        .wait_for_records(at_return + 2 * RECORDS_AFTER, RECORD_TIMEOUT);
    assert!(
        !s2.overlay.exists(),
        "{} was committed away and should be removed",
        s2.overlay.display()
    );
    let (names, current) = vm.list();
    assert_eq!(names, ["s1"]);
    assert_eq!(current, "s1");
    assert_eq!(vm.chain(), [s1.overlay.clone(), s1.frozen.clone()]);
    assert_eq!(vm.frozen_image("s1"), s1.frozen);
    vm.check_no_drift();

    let last = vm.guest.records_seen().max(later);
    vm.quit();

    let active = check_records(&s1.overlay, last);
    eprintln!(
        "{before} records before delete, {last} at quit; the active image holds {}",
        active.valid
    );
    assert!(active.valid >= before, "{}", active.output);
    let in_s1 = s1.check_records();
    assert!(active.valid > in_s1, "{}", active.output);
    let fs = check_filesystem(&s1.frozen);
    assert!(!fs.needs_recovery && fs.clean, "{}", fs.output);
}

/// Deleting a snapshot in the middle of the tree while the guest writes:
/// the merge (commit down or stream up, whichever snapctl picks) runs as a
/// QEMU job under the guest's writes, and the snapshots on either side show
/// exactly what they showed before, byte for byte.
fn delete_middle_snapshot_while_running() {
    let mut vm = GuestVm::boot();
    vm.guest.wait_for_records(MIN_RECORDS, RECORD_TIMEOUT);

    let s1 = vm.take_snapshot("s1", false);
    let s2 = vm.take_snapshot("s2", true);
    let s3 = vm.take_snapshot("s3", false);
    assert_eq!(s2.frozen, s1.overlay);
    assert_eq!(s3.frozen, s2.overlay);

    let in_s1 = s1.check_records();
    let in_s3 = s3.check_records();
    let s1_log = records_log(&s1.frozen);
    let s3_log = records_log(&s3.frozen);

    let before = vm.guest.records_seen();
    let deleted = vm.snapctl.json(&["delete", "s2"]);
    let at_return = vm.guest.records_seen();
    eprintln!("delete s2: records announced: {before} before, {at_return} when it returned");
    let disk = deleted_disk(&deleted, "s2");
    assert_eq!(disk["job"]["active"], false, "{deleted}");
    let merge = &disk["merge"];
    let s3_image = match merge["merge"].as_str() {
        Some("commit") => {
            assert_eq!(merge["top"], path_arg(&s2.overlay), "{deleted}");
            assert_eq!(merge["base"], path_arg(&s2.frozen), "{deleted}");
            assert_eq!(disk["job"]["command"], "block-commit", "{deleted}");
            // s3's state now lives in the image s2 froze.
            s2.frozen.clone()
        }
        Some("stream") => {
            assert_eq!(merge["from"], path_arg(&s2.frozen), "{deleted}");
            assert_eq!(merge["into"], path_arg(&s2.overlay), "{deleted}");
            assert_eq!(disk["job"]["command"], "block-stream", "{deleted}");
            s3.frozen.clone()
        }
        _ => panic!("delete s2 must merge its boundary away: {deleted}"),
    };
    let gone = if s3_image == s3.frozen {
        &s2.frozen
    } else {
        &s2.overlay
    };
    eprintln!("delete s2 merged with a {merge}");

    assert_eq!(vm.active_image(), s3.overlay, "the active image stays");
    assert_eq!(vm.run_state(), "running");
    let later = vm
        .guest
        .wait_for_records(at_return + 2 * RECORDS_AFTER, RECORD_TIMEOUT);

    let (names, current) = vm.list();
    assert_eq!(names, ["s1", "s3"]);
    assert_eq!(current, "s3");
    let shown = vm.snapctl.json(&["show", "s3"]);
    assert_eq!(shown["parent"], "s1", "{shown}");
    assert_eq!(vm.frozen_image("s1"), s1.frozen);
    assert_eq!(vm.frozen_image("s3"), s3_image);
    assert_eq!(
        vm.chain(),
        [s3.overlay.clone(), s3_image.clone(), s1.frozen.clone()]
    );
    assert!(
        !gone.exists(),
        "{} was merged away and should be removed",
        gone.display()
    );
    vm.check_no_drift();

    // The same records, while QEMU still runs, and the same bytes.
    assert_eq!(s1.check_records_in(&s1.frozen), in_s1);
    assert_eq!(s3.check_records_in(&s3_image), in_s3);
    assert_eq!(records_log(&s1.frozen), s1_log, "s1's records.log");
    assert_eq!(records_log(&s3_image), s3_log, "s3's records.log");

    let last = vm.guest.records_seen().max(later);
    vm.quit();
    let active = check_records(&s3.overlay, last);
    eprintln!(
        "records: s1 {in_s1}, s3 {in_s3}, {before} before delete, {last} at quit; active {}",
        active.valid
    );
    assert!(active.valid > in_s3, "{}", active.output);
}

#[test]
fn guest_revert_live_sees_exactly_the_snapshot() {
    revert_live_sees_exactly_the_snapshot();
}

#[test]
fn guest_active_commit_while_writing() {
    active_commit_while_writing();
}

#[test]
fn guest_delete_middle_snapshot_while_running() {
    delete_middle_snapshot_while_running();
}
