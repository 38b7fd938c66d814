//! Restore points with the guest's memory: a checkpoint (`create --memory`,
//! the memory and device state in a qcow2 container of its own) and an
//! internal snapshot (`create --internal`, everything inside the disk's
//! qcow2 image), taken while the guest writes and reverted inside the same
//! QEMU process.
//!
//! What shows that the guest continued from the restore point instead of
//! booting again:
//!
//! * QEMU is the same process (pid), still running; it runs with
//!   `-no-reboot`, so a reset would have ended it;
//! * the console after the revert holds no boot (`SNAPGUEST RESUME`,
//!   `READY`, kernel messages), only `SNAPGUEST RECORD` lines, numbered on
//!   from the restore point's last record, one at a time, not from the
//!   records written after it and not from 1;
//! * offline, after `quit`: the active image's `records.log` is one valid
//!   run of records up to the last one announced (a guest that remembered
//!   the later records, or a disk that did not go back, would break the
//!   sequence), every record carries the boot id of the one boot, and the
//!   guest's uptime in them never goes back; the ext4 filesystem is clean
//!   once its journal is replayed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use integration::guest::{DISK_ID, check_filesystem, check_records, records_log};
use serde_json::{Value, json};

use crate::vm::{GuestVm, MIN_RECORDS, RECORD_TIMEOUT, RECORDS_AFTER, path_arg, path_of};

/// Records the guest writes after the restore point, which the revert
/// throws away.
const RECORDS_TO_LOSE: u64 = 20;

/// Records the guest must announce after the revert before it counts as
/// writing on.
const RECORDS_AFTER_REVERT: u64 = 10;

/// What the guest's init prints only while it boots or shuts down; none of
/// it may follow a revert to a restore point.
const BOOT_MARKERS: [&str; 8] = [
    "SNAPGUEST MKFS",
    "SNAPGUEST RESUME",
    "SNAPGUEST TORN",
    "SNAPGUEST NOAGENT",
    "SNAPGUEST READY",
    "SNAPGUEST SHUTDOWN",
    "SNAPGUEST DOWN",
    "Linux version",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `create NAME --memory`
    Checkpoint,
    /// `create NAME --internal`
    Internal,
}

/// A restore point taken while the guest writes, and what the console and
/// the disk showed around it.
#[derive(Debug)]
struct RestorePoint {
    name: &'static str,
    kind: Kind,
    /// The last record announced before `create` started.
    before: u64,
    /// The last record announced when `create` returned.
    at_return: u64,
    /// The image holding the disk's state as of the restore point: the
    /// frozen image of a checkpoint, the image holding an internal snapshot.
    image: PathBuf,
    /// QEMU's active image after `create` (a checkpoint's overlay; an
    /// internal snapshot's own image).
    active: PathBuf,
    /// Valid records in the disk's state as of the restore point.
    in_disk: u64,
    /// A checkpoint's memory state file.
    memory_file: Option<PathBuf>,
}

/// After a revert: what the guest announced and where it writes.
#[derive(Debug)]
struct Resumed {
    /// The last record announced before the revert (the abandoned records
    /// end about there).
    lost: u64,
    /// The console's length when the revert started.
    mark: usize,
    /// The records announced after the revert, in console order.
    records: Vec<u64>,
    /// QEMU's active image after the revert.
    active: PathBuf,
    /// `revert --json`.
    reverted: Value,
}

/// Boots the guest, lets it write, and takes `name` of `kind` while it writes.
fn boot_and_take(kind: Kind, name: &'static str) -> (GuestVm, RestorePoint) {
    let mut vm = GuestVm::boot();
    vm.guest.wait_for_records(MIN_RECORDS, RECORD_TIMEOUT);
    let point = take(&mut vm, kind, name);
    (vm, point)
}

/// `snapctl create NAME --memory|--internal --json` while the guest writes;
/// checks what it reports, what `show` says and what the disk state holds.
fn take(vm: &mut GuestVm, kind: Kind, name: &'static str) -> RestorePoint {
    let base = vm.guest.disk().to_owned();
    let pid = vm.guest.pid();
    let before = vm.guest.records_seen();
    let flag = match kind {
        Kind::Checkpoint => "--memory",
        Kind::Internal => "--internal",
    };
    let started = Instant::now();
    let created = vm.snapctl.json(&["create", name, flag]);
    let took = started.elapsed();
    let at_return = vm.guest.records_seen();
    // The guest was stopped for the snapshot and must run on by itself.
    let after = vm
        .guest
        .wait_for_records(at_return + RECORDS_AFTER, RECORD_TIMEOUT);
    eprintln!(
        "create {name} {flag}: {took:.1?}; records announced: {before} before, {at_return} when \
         it returned, {after} a little later"
    );
    assert_eq!(vm.guest.pid(), pid, "QEMU's pid after create {name}");
    assert_eq!(vm.run_state(), "running", "after create {name} {flag}");
    assert_eq!(created["snapshot"], name, "{created}");
    assert_eq!(created["warnings"], json!([]), "{created}");

    let disk = &created["disks"][DISK_ID];
    let image = path_of(&disk["image"], &created);
    assert_eq!(
        image, base,
        "{name} holds the base image's state: {created}"
    );
    let shown = vm.snapctl.json(&["show", name]);
    assert_eq!(shown["name"], name, "{shown}");
    assert_eq!(shown["current"], true, "{shown}");
    let (active, memory_file, in_disk) = match kind {
        Kind::Checkpoint => {
            let overlay = path_of(&disk["overlay"], &created);
            assert_ne!(overlay, base, "{created}");
            assert_eq!(
                vm.active_image(),
                overlay,
                "QEMU's active image after {name}"
            );
            assert_eq!(shown["kind"], "checkpoint", "{shown}");
            let memory = path_of(&shown["memory"]["file"], &shown);
            let expected = overlay
                .parent()
                .expect("the overlay is in a directory")
                .join(format!("guest-memory.{name}.qcow2"));
            assert_eq!(memory, expected, "where the README puts it: {shown}");
            let bytes = std::fs::metadata(&memory)
                .unwrap_or_else(|e| panic!("{}: {e}", memory.display()))
                .len();
            assert!(bytes > 1 << 20, "{bytes} bytes of memory state: {shown}");
            assert_eq!(shown["memory"]["bytes"], bytes, "{shown}");
            // The frozen image no longer changes: read it while QEMU runs.
            let in_disk = check_records(&image, before).valid;
            (overlay, Some(memory), in_disk)
        }
        Kind::Internal => {
            assert_eq!(created["kind"], "internal", "{created}");
            assert_eq!(created["live"], true, "{created}");
            assert_eq!(
                vm.active_image(),
                base,
                "an internal snapshot has no overlay"
            );
            assert_eq!(shown["kind"], "internal", "{shown}");
            assert!(shown["memory"].is_null(), "{shown}");
            let tags = internal_snapshots(&base);
            assert!(
                tags.iter().any(|t| t == name),
                "qemu-img snapshot -l {} lists {tags:?}, not {name}",
                base.display()
            );
            let in_disk = records_in_internal_snapshot(&base, name, before);
            (base.clone(), None, in_disk)
        }
    };
    eprintln!("{name}: its disk state holds {in_disk} valid records");
    // A record may be in flight when the guest is stopped, and the console
    // may lag a line behind the disk.
    assert!(
        (before..=at_return + 1).contains(&in_disk),
        "{name}'s disk state holds {in_disk} records; the console announced {before} before \
         create and {at_return} when it returned"
    );
    vm.check_no_drift();
    RestorePoint {
        name,
        kind,
        before,
        at_return,
        image,
        active,
        in_disk,
        memory_file,
    }
}

/// The tags of the internal snapshots in a qcow2 image (`qemu-img snapshot
/// -l -U`, so QEMU may have it open).
fn internal_snapshots(image: &Path) -> Vec<String> {
    let output = run(Command::new("qemu-img")
        .args(["snapshot", "-l", "-U"])
        .arg(image));
    // "ID  TAG  VM_SIZE  DATE  VM_CLOCK  ICOUNT" after two header lines.
    output
        .lines()
        .skip(2)
        .filter_map(|line| line.split_whitespace().nth(1).map(str::to_owned))
        .collect()
}

/// `scripts/check-records` on the disk state inside the internal snapshot
/// `tag` of `image`, copied out to a raw file with `qemu-img convert -U -l`.
fn records_in_internal_snapshot(image: &Path, tag: &str, min: u64) -> u64 {
    let tmp = tempfile::Builder::new()
        .prefix("sc-internal-")
        .tempdir()
        .expect("a temporary directory");
    let raw = tmp.path().join("disk.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-U", "-O", "raw", "-l"])
        .arg(format!("snapshot.name={tag}"))
        .arg(image)
        .arg(&raw));
    let report = check_records(&raw, min);
    assert!(
        !report.quiesced,
        "the guest's filesystem was mounted and not frozen at {tag}\n{}",
        report.output
    );
    report.valid
}

/// Runs a tool; panics with its output unless it exits 0. Returns stdout.
fn run(command: &mut Command) -> String {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        output.status.success(),
        "{command:?}: {}\n--- stdout\n{}\n--- stderr\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// The numbers of the complete `SNAPGUEST RECORD n` lines of `console`, in
/// the order the guest printed them.
fn records_in_order(console: &str) -> Vec<u64> {
    console
        .split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .filter_map(|line| {
            line.trim_end()
                .strip_prefix("SNAPGUEST RECORD ")?
                .parse()
                .ok()
        })
        .collect()
}

/// The records the console announced after `mark`, the console's length
/// when a revert started, split in two: the old run's last few (numbered
/// above `lost`, the last one announced before the mark), which the guest
/// may still print until snapctl stops it, and those of the guest as the
/// revert left it.
fn since_revert(vm: &GuestVm, mark: usize, lost: u64) -> (Vec<u64>, Vec<u64>) {
    let mut records = records_in_order(&vm.guest.console_since(mark));
    let old = records.iter().take_while(|&&r| r > lost).count();
    let resumed = records.split_off(old);
    (records, resumed)
}

/// Waits until the guest as the revert left it has announced `n` records;
/// returns [`since_revert`].
fn wait_resumed(vm: &GuestVm, mark: usize, lost: u64, n: usize) -> (Vec<u64>, Vec<u64>) {
    let done =
        integration::wait_until(RECORD_TIMEOUT, || since_revert(vm, mark, lost).1.len() >= n);
    assert!(
        done,
        "{n} records after the revert within {RECORD_TIMEOUT:?}: {:?}\n--- console since the \
         revert\n{}",
        since_revert(vm, mark, lost),
        vm.guest.console_since(mark)
    );
    since_revert(vm, mark, lost)
}

/// The last record the guest announced since the revert.
fn last_since(vm: &GuestVm, resumed: &Resumed) -> u64 {
    *since_revert(vm, resumed.mark, resumed.lost)
        .1
        .last()
        .expect("records announced since the revert")
}

/// Lets the guest write [`RECORDS_TO_LOSE`] records past the restore point,
/// then `snapctl revert NAME --json`: checks that the same QEMU continues
/// the guest from the restore point, without a boot, and that it writes on.
fn revert_and_resume(vm: &mut GuestVm, point: &RestorePoint) -> Resumed {
    let name = point.name;
    vm.guest
        .wait_for_records(point.at_return + RECORDS_TO_LOSE, RECORD_TIMEOUT);
    let pid = vm.guest.pid();
    let lost = vm.guest.records_seen();
    let mark = vm.guest.console_mark();
    let started = Instant::now();
    let reverted = vm.snapctl.json(&["revert", name]);
    let took = started.elapsed();

    assert_eq!(
        vm.guest.pid(),
        pid,
        "the revert keeps the QEMU process: {reverted}"
    );
    assert!(
        vm.guest.try_status().is_none(),
        "QEMU (-no-reboot) exited during revert {name}: it was reset\n{reverted}"
    );
    assert_eq!(
        vm.run_state(),
        "running",
        "revert without --paused continues"
    );
    assert_eq!(reverted["snapshot"], name, "{reverted}");
    assert_eq!(reverted["live"], true, "{reverted}");
    assert_eq!(reverted["warnings"], json!([]), "{reverted}");
    let disk = &reverted["disks"][DISK_ID];
    assert_eq!(
        path_of(&disk["image"], &reverted),
        point.image,
        "{reverted}"
    );
    let active = match point.kind {
        Kind::Checkpoint => {
            assert_eq!(reverted["paused"], false, "{reverted}");
            let overlay = path_of(&disk["overlay"], &reverted);
            assert_ne!(overlay, point.active, "a fresh overlay: {reverted}");
            assert_ne!(overlay, point.image, "{reverted}");
            overlay
        }
        Kind::Internal => {
            assert_eq!(reverted["kind"], "internal", "{reverted}");
            // Reverted in place.
            point.image.clone()
        }
    };
    assert_eq!(
        vm.active_image(),
        active,
        "QEMU's active image after revert"
    );

    // The guest goes on by itself, from the restore point.
    let (old, records) = wait_resumed(vm, mark, lost, RECORDS_AFTER_REVERT as usize + 1);
    let console = vm.guest.console_since(mark);
    let first = records[0];
    let last = *records.last().expect("records after the revert");
    // Printed between the mark and snapctl's `stop`.
    assert_eq!(
        old,
        (lost + 1..lost + 1 + old.len() as u64).collect::<Vec<_>>(),
        "records of the old run announced during revert {name}\n{console}"
    );
    eprintln!(
        "revert {name}: {took:.1?}; records: {} before create, {} when it returned, {} in its \
         disk state, {lost} before the revert; after it: {old:?} (old run), then {records:?}",
        point.before, point.at_return, point.in_disk
    );

    // A line cut by the mark is the tail of one printed before the revert.
    let whole_lines = if mark == 0 || vm.guest.console_text().as_bytes()[mark - 1] == b'\n' {
        console.as_str()
    } else {
        console.split_once('\n').map_or("", |(_, rest)| rest)
    };
    for marker in BOOT_MARKERS {
        assert!(
            !console.contains(marker),
            "the guest booted again after revert {name} ({marker:?}); console since the \
             revert:\n{console}"
        );
    }
    let other: Vec<&str> = whole_lines
        .lines()
        .map(str::trim_end)
        .filter(|line| !line.is_empty() && !line.starts_with("SNAPGUEST RECORD "))
        .collect();
    assert!(
        other.is_empty(),
        "after revert {name} the console shows only records, no boot or kernel messages: \
         {other:?}\n--- console since the revert\n{console}"
    );

    assert!(
        point.in_disk.saturating_sub(1) <= first && first <= point.in_disk + 1,
        "the first record after revert {name} is {first}: the guest must go on from the \
         restore point, whose disk holds {} records (console: {} before create, {} when it \
         returned; {lost} before the revert)\n{console}",
        point.in_disk,
        point.before,
        point.at_return
    );
    assert!(
        point.before <= first && first <= point.at_return + RECORDS_AFTER && first < lost,
        "the first record after revert {name} is {first}: {} announced before create, {} when \
         it returned, {lost} before the revert\n{console}",
        point.before,
        point.at_return
    );
    assert_eq!(
        records,
        (first..=last).collect::<Vec<_>>(),
        "after revert {name} the guest numbers on from {first}, one record at a time\n{console}"
    );
    assert!(records.len() as u64 > RECORDS_AFTER_REVERT, "{records:?}");
    Resumed {
        lost,
        mark,
        records,
        active,
        reverted,
    }
}

/// One record of `records.log`: its number, the boot id and the guest's
/// uptime in centiseconds from its payload.
#[derive(Debug, PartialEq)]
struct Record {
    seq: u64,
    boot: String,
    up_cs: u64,
}

/// Parses the complete lines of a `records.log` (`seq=N crc=C
/// payload=boot=B,up=S.CC,pad=…`).
fn parse_records(log: &[u8]) -> Vec<Record> {
    let text = String::from_utf8_lossy(log);
    text.split_inclusive('\n')
        .filter(|line| line.ends_with('\n'))
        .map(|line| {
            let parse = || -> Option<Record> {
                let mut fields = line.split_whitespace();
                let seq = fields.next()?.strip_prefix("seq=")?.parse().ok()?;
                fields.next()?;
                let payload = fields.next()?.strip_prefix("payload=")?;
                let mut boot = None;
                let mut up_cs = None;
                for part in payload.split(',') {
                    if let Some(b) = part.strip_prefix("boot=") {
                        boot = Some(b.to_owned());
                    } else if let Some(up) = part.strip_prefix("up=") {
                        let (s, cs) = up.split_once('.')?;
                        up_cs = Some(s.parse::<u64>().ok()? * 100 + cs.parse::<u64>().ok()?);
                    }
                }
                Some(Record {
                    seq,
                    boot: boot?,
                    up_cs: up_cs?,
                })
            };
            parse().unwrap_or_else(|| panic!("not a record line: {line:?}"))
        })
        .collect()
}

/// Quits QEMU and checks the active image offline: a clean filesystem,
/// records valid up to the last one announced, all of one boot, with an
/// uptime that never goes back (the guest went on from the restore point).
fn quit_and_check(vm: &mut GuestVm, point: &RestorePoint, resumed: &Resumed) {
    let name = point.name;
    let last = last_since(vm, resumed);
    vm.quit();

    let fs = check_filesystem(&resumed.active);
    assert!(
        fs.clean,
        "e2fsck -fn found problems in {} after revert {name}\n{}",
        resumed.active.display(),
        fs.output
    );
    let report = check_records(&resumed.active, last);
    eprintln!(
        "{}: {} valid records (the console announced up to {last}); needs_recovery: {}; torn: {:?}",
        resumed.active.display(),
        report.valid,
        fs.needs_recovery,
        report.torn
    );

    let records = parse_records(&records_log(&resumed.active));
    let boot = &records[0].boot;
    let other_boot: Vec<&Record> = records.iter().filter(|r| &r.boot != boot).collect();
    assert!(
        other_boot.is_empty(),
        "every record is of the guest's one boot {boot}, none of a boot after revert {name}: \
         {other_boot:?}"
    );
    let back_in_time: Vec<&[Record]> = records
        .windows(2)
        .filter(|w| w[1].up_cs < w[0].up_cs)
        .collect();
    assert!(
        back_in_time.is_empty(),
        "the guest's uptime never goes back in {}: {back_in_time:?}",
        resumed.active.display()
    );
    let first = resumed.records[0];
    eprintln!(
        "records {} and {first} (around the revert) at uptime {:.2} s and {:.2} s",
        first - 1,
        records[first as usize - 2].up_cs as f64 / 100.0,
        records[first as usize - 1].up_cs as f64 / 100.0
    );
}

/// A checkpoint taken while the guest writes and reverted in the same QEMU:
/// the guest continues from the checkpoint, no boot, and writes on; the
/// abandoned overlay is removed, the checkpoint and its memory file stay.
pub fn checkpoint_revert_resumes_without_reboot() {
    let (mut vm, c1) = boot_and_take(Kind::Checkpoint, "c1");
    let resumed = revert_and_resume(&mut vm, &c1);
    let memory = c1.memory_file.as_ref().expect("a checkpoint's memory file");

    let removed = &resumed.reverted["removed_files"];
    assert_eq!(
        removed,
        &json!([path_arg(&c1.active)]),
        "{}",
        resumed.reverted
    );
    assert!(
        !c1.active.exists(),
        "{} (records up to {}) is needed by nothing after the revert",
        c1.active.display(),
        resumed.lost
    );
    assert!(
        memory.exists(),
        "c1 stays a checkpoint: {}",
        memory.display()
    );
    assert_eq!(vm.chain(), [resumed.active.clone(), c1.image.clone()]);
    let (names, current) = vm.list();
    assert_eq!(names, ["c1"]);
    assert_eq!(current, "c1");
    let shown = vm.snapctl.json(&["show", "c1"]);
    assert_eq!(shown["kind"], "checkpoint", "{shown}");
    assert_eq!(shown["memory"]["file"], path_arg(memory), "{shown}");
    vm.check_no_drift();

    quit_and_check(&mut vm, &c1, &resumed);
    // The checkpoint's disk state is untouched by what came after.
    assert_eq!(check_records(&c1.image, c1.in_disk).valid, c1.in_disk);
}

/// An internal snapshot taken while the guest writes and reverted in the
/// same QEMU: the disk image reverts in place, the guest continues from the
/// snapshot, no boot, and writes on; the snapshot stays in the image.
pub fn internal_snapshot_revert_resumes_without_reboot() {
    let (mut vm, i1) = boot_and_take(Kind::Internal, "i1");
    let resumed = revert_and_resume(&mut vm, &i1);

    assert_eq!(vm.chain(), std::slice::from_ref(&i1.image));
    let (names, current) = vm.list();
    assert_eq!(names, ["i1"]);
    assert_eq!(current, "i1");
    vm.check_no_drift();
    // The snapshot's own state is unchanged by the writes after the revert.
    assert_eq!(
        records_in_internal_snapshot(&i1.image, "i1", i1.in_disk),
        i1.in_disk
    );

    quit_and_check(&mut vm, &i1, &resumed);
    assert!(internal_snapshots(&i1.image).iter().any(|t| t == "i1"));
}

/// `snapctl delete c1` after reverting to it, while the guest writes: the
/// memory file goes with the checkpoint, `check` is clean, the guest keeps
/// writing, and the filesystem and records stay valid.
pub fn checkpoint_delete_after_revert_removes_memory_file() {
    let (mut vm, c1) = boot_and_take(Kind::Checkpoint, "c1");
    let mut resumed = revert_and_resume(&mut vm, &c1);
    let memory = c1.memory_file.clone().expect("a checkpoint's memory file");

    let before = last_since(&vm, &resumed);
    let started = Instant::now();
    let deleted = vm.snapctl.json(&["delete", "c1"]);
    let took = started.elapsed();
    let at_return = last_since(&vm, &resumed);
    eprintln!(
        "delete c1: {took:.1?}; records announced: {before} before, {at_return} after\n{deleted}"
    );
    let reports = deleted["deleted"]
        .as_array()
        .unwrap_or_else(|| panic!("{deleted}"));
    assert_eq!(reports.len(), 1, "{deleted}");
    assert_eq!(reports[0]["snapshot"], "c1", "{deleted}");
    assert_eq!(reports[0]["warnings"], json!([]), "{deleted}");
    let removed: Vec<PathBuf> = reports[0]["removed_files"]
        .as_array()
        .unwrap_or_else(|| panic!("{deleted}"))
        .iter()
        .map(|f| path_of(f, &deleted))
        .collect();
    assert!(
        removed.contains(&memory),
        "delete c1 reports removing its memory file {}: {deleted}",
        memory.display()
    );
    assert!(!memory.exists(), "{} outlived c1", memory.display());
    assert_eq!(vm.guest.try_status(), None, "QEMU runs on after delete");
    assert_eq!(vm.run_state(), "running");

    let (names, current) = vm.list();
    assert!(names.is_empty(), "{names:?}");
    assert!(current.is_null(), "{current}");
    vm.check_no_drift();
    let check = vm.snapctl.ok(&["check"]);
    eprintln!("snapctl check after delete:\n{check}");
    // Whatever the merge did, QEMU writes into the image snapctl reports.
    let chain = vm.chain();
    assert_eq!(vm.active_image(), chain[0], "{chain:?}");
    resumed.active = chain[0].clone();

    // The guest writes on through the delete, one record at a time.
    let after_delete = at_return + RECORDS_AFTER_REVERT - resumed.records[0] + 1;
    let (_, written) = wait_resumed(&vm, resumed.mark, resumed.lost, after_delete as usize);
    let console = vm.guest.console_since(resumed.mark);
    let first = resumed.records[0];
    let last = *written.last().expect("records after the revert");
    assert_eq!(
        written,
        (first..=last).collect::<Vec<_>>(),
        "from the revert on, through delete c1 (records {before} to {at_return}), the guest \
         numbers on one record at a time\n{console}"
    );

    quit_and_check(&mut vm, &c1, &resumed);
}
