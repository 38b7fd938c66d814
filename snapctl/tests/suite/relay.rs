//! Another shell while snapctl holds QEMU's monitor: the monitor relay
//! (`<state>/vm1.relay`) through which `jobs`, `job`, `chain` and `check`
//! reach QEMU while a slow commit runs, and what those commands say when a
//! foreign client holds snapctl's monitor instead.
//!
//! The slow jobs are commits of 32 MiB at `--bandwidth 1M`, started with
//! [`start_slow_job`]: an intermediate one (which QEMU copies 512 KiB at a
//! time, so its progress shows every second) and an active one.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::jobs::{GIVE_UP, PATTERN, bulk_history, start_slow_job};
use crate::util::history::{
    assert_images_read, assert_intact_then_quit, assert_live_consistent, assert_no_stray_images,
    chain, frozen_images_of, list, sorted_snapshot_names,
};
use crate::util::{Background, History, K64, LiveReads, Monitor, Vm, mode_of};

/// The relay socket of the test VM.
fn relay_path(vm: &Vm) -> PathBuf {
    vm.snapctl.state_dir().join("vm1.relay")
}

/// The one job `jobs --json` lists, with its progress.
fn the_job(vm: &Vm) -> Value {
    let listed = vm.snapctl.args(["jobs"]).json();
    let jobs = listed["jobs"]
        .as_array()
        .unwrap_or_else(|| panic!("jobs --json: {listed}"));
    assert_eq!(jobs.len(), 1, "jobs --json: {listed}");
    jobs[0].clone()
}

/// Registers the VM and takes s1 to s3, with the bulk range written
/// between s2 and s3: it sits in s3's frozen image, above s2's.
///
/// | when | vda |
/// |---|---|
/// | before s1 | 0x11 at 0 |
/// | before s2 | 0x12 at 0, 0x22 at 64 KiB |
/// | before s3 | 0x13 at 0, the bulk range |
/// | after s3 | 0x14 at 0 |
///
/// The chain: `base (s1) <- vda.s1 (s2) <- vda.s2 (s3) <- vda.s3 (active)`;
/// `commit vda --top s3 --base s2` copies the bulk range down into s2's
/// frozen image, 512 KiB at a time.
fn bulk_between_s2_and_s3(vm: &mut Vm) -> History {
    vm.snapctl.args(["init"]).ok();
    let mut history = History::new(PATTERN);
    history.write(vm, 0, 0x11);
    history.create(vm, "s1");
    history.write(vm, 0, 0x12);
    history.write(vm, K64, 0x22);
    history.create(vm, "s2");
    history.write(vm, 0, 0x13);
    history.write_bulk(vm);
    history.create(vm, "s3");
    history.write(vm, 0, 0x14);
    history
}

/// Starts a slow commit and waits for its relay to listen.
fn slow_commit(vm: &mut Vm, args: &[&str]) -> Background {
    let child = start_slow_job(vm, args, Duration::from_millis(300));
    let relay = relay_path(vm);
    assert!(
        integration::wait_until(Duration::from_secs(5), || relay.exists()),
        "no relay socket at {} while the commit runs",
        relay.display()
    );
    child
}

/// While a slow commit runs, another shell lists the job with growing
/// progress, shows QEMU's chain, checks, is refused what the relay does not
/// pass on, and cancels the job; the commit then ends cut short, with the
/// record, QEMU and the data consistent.
#[test]
fn another_shell_watches_and_cancels_a_running_commit() {
    let mut vm = Vm::one_disk(None);
    let mut history = bulk_between_s2_and_s3(&mut vm);
    let before = chain(&vm, "vda");
    let frozen = frozen_images_of(&vm, "vda");
    assert_eq!(before[1..3], [frozen["s3"].clone(), frozen["s2"].clone()]);

    let args = [
        "commit",
        "vda",
        "--top",
        "s3",
        "--base",
        "s2",
        "--bandwidth",
        "1M",
    ];
    let mut child = slow_commit(&mut vm, &args);
    let pid = child.id();
    assert_eq!(mode_of(&relay_path(&vm)), 0o600, "the relay socket's mode");

    // jobs: the commit, with progress that grows.
    let first = the_job(&vm);
    assert_eq!(first["type"], "commit", "{first}");
    assert_eq!(first["status"], "running", "{first}");
    let id = first["id"].as_str().expect("a job id").to_owned();
    let start = first["current"].as_u64().expect("current progress");
    let total = first["total"].as_u64().expect("total progress");
    assert!(total > 0 && start < total, "{first}");
    let mut last = first.clone();
    let grew = integration::wait_until(Duration::from_secs(10), || {
        last = the_job(&vm);
        last["current"].as_u64().is_some_and(|c| c > start)
    });
    assert!(grew, "progress did not grow: first {first}, last {last}");

    // Going through the relay is said at -v, and only then.
    let quiet = vm.snapctl.args(["jobs"]).ok();
    assert!(quiet.stderr.is_empty(), "{quiet:?}");
    let verbose = vm.snapctl.args(["-v", "jobs"]).ok();
    let note = String::from_utf8_lossy(&verbose.stderr).into_owned();
    assert!(
        note.lines().count() == 1
            && note.contains("relay")
            && note.contains(&format!("pid {pid}, commit")),
        "jobs -v stderr: {note:?}"
    );

    // chain: QEMU's, unchanged so far.
    let shown = vm.snapctl.args(["chain"]).json();
    assert_eq!(shown["source"], "qemu", "chain: {shown}");
    assert_eq!(chain(&vm, "vda"), before, "chain: {shown}");

    // check: runs, names the job and the commit in progress (drift: 3).
    let check = vm.snapctl.args(["check", "--json"]).run();
    assert_eq!(check.status.code(), Some(3), "check: {check:?}");
    let report: Value = serde_json::from_slice(&check.stdout).expect("check --json");
    assert_eq!(report["qemu_running"], true, "{report}");
    let messages: Vec<&str> = report["drift"]
        .as_array()
        .expect("drift")
        .iter()
        .map(|d| d["message"].as_str().unwrap_or_default())
        .collect();
    assert!(
        messages.iter().any(|m| m.contains(&id)),
        "check does not name job {id}: {report}"
    );
    assert!(
        messages.iter().any(|m| m.contains("commit")
            && m.contains(&format!("pid {pid}"))
            && m.contains("in progress")),
        "check does not name the commit in progress: {report}"
    );
    assert!(
        !messages.iter().any(|m| m.contains("interrupted")),
        "a running commit is not interrupted: {report}"
    );

    // A writer waiting for the lock names the holder and its operation.
    vm.snapctl
        .args(["--lock-wait", "0.2", "create", "s9"])
        .error_line(&["locked", &format!("pid {pid}, commit")]);

    // The relay speaks QMP: queries pass, anything else is refused naming
    // the holder, and nothing reaches QEMU.
    let mut relay = Monitor::connect(relay_path(&vm));
    assert!(
        relay
            .ok("query-status", Value::Null)
            .get("status")
            .is_some()
    );
    let refused = relay
        .execute("job-dismiss", json!({ "id": id }))
        .expect_err("job-dismiss through the relay");
    assert!(
        refused.contains(&format!("snapctl (pid {pid}, commit) holds this monitor"))
            && refused.contains("relays only"),
        "{refused}"
    );
    let refused = relay
        .execute("quit", Value::Null)
        .expect_err("quit through the relay");
    assert!(refused.contains("holds this monitor"), "{refused}");
    drop(relay);
    assert!(child.is_running(), "the commit ended early");

    // job cancel: the commit stops cut short (it had written into s2's
    // frozen image), and says so.
    let cancelled = vm.snapctl.args(["job", "cancel", &id]).stdout();
    assert!(cancelled.contains(&id), "job cancel: {cancelled}");
    let line = child.error_line_after_progress(GIVE_UP, &["s2", "removed"]);
    history.removed("s2");

    assert!(
        !relay_path(&vm).exists(),
        "the relay socket outlived its snapctl"
    );
    assert_eq!(sorted_snapshot_names(&vm), history.names(), "after: {line}");
    assert_eq!(
        chain(&vm, "vda"),
        before,
        "a cancelled commit keeps the chain"
    );
    assert_eq!(list(&vm)["current"], "s3");
    assert_intact_then_quit(
        &mut vm,
        "a commit cancelled from another shell",
        "after the cancelled commit",
        &history,
    );
}

/// Ctrl-C in the holder still cancels its job cleanly while a relay client
/// is connected (and waiting on events), and that client is let go.
#[test]
fn ctrl_c_in_the_holder_with_a_relay_client_connected() {
    let mut vm = Vm::one_disk(None);
    let mut history = bulk_history(&mut vm, true);
    let before = chain(&vm, "vda");

    let child = slow_commit(&mut vm, &["commit", "vda", "--bandwidth", "1M"]);
    let mut relay = Monitor::connect(relay_path(&vm));
    assert_eq!(relay.jobs().len(), 1);

    let interrupted = Instant::now();
    child.interrupt();
    let line = child.error_line_after_progress(GIVE_UP, &["s2", "removed"]);
    assert!(
        interrupted.elapsed() < Duration::from_secs(5),
        "the interrupted commit took {:?} to stop",
        interrupted.elapsed()
    );
    history.removed("s2");
    assert!(!relay_path(&vm).exists(), "the relay socket was left");
    drop(relay);

    assert_eq!(sorted_snapshot_names(&vm), history.names(), "after: {line}");
    assert_eq!(chain(&vm, "vda"), before);
    assert_live_consistent(&mut vm, "an interrupted commit with a relay client");
    assert_no_stray_images(&vm, "an interrupted commit with a relay client");
    let mut reads = LiveReads::default();
    reads.expect(&mut vm, "after the interrupted commit", &history);
    vm.quit();
    reads.assert_ok(&vm);
    assert_images_read(&vm, &history);
}

/// A foreign client (the test's own connection) holds snapctl's monitor:
/// `jobs` fails with one line that blames no snapctl, also once QEMU's
/// accept queue is full (no bare "Resource temporarily unavailable");
/// `chain` and `check` fall back to the image headers and say so.
#[test]
fn a_foreign_client_on_snapctls_monitor() {
    let vm = Vm::one_disk(None);
    vm.snapctl.args(["init"]).ok();
    vm.snapctl.args(["create", "s1"]).ok();
    let images = chain(&vm, "vda");
    let socket = vm.dir.join("sc.sock");
    let foreign = Monitor::connect(&socket);

    let line = vm
        .snapctl
        .args(["jobs"])
        .error_line(&["another client", "add a second -qmp"]);
    assert!(!line.contains("snapctl (pid"), "{line}");

    let shown = vm.snapctl.args(["chain", "--json"]).ok();
    let note = String::from_utf8_lossy(&shown.stderr).into_owned();
    assert!(
        note.lines().count() == 1
            && note.contains("QEMU's monitor is busy: showing the chains from the image headers"),
        "chain stderr: {note:?}"
    );
    let view: Value = serde_json::from_slice(&shown.stdout).expect("chain --json");
    assert_eq!(view["source"], "images", "{view}");

    // Two attempts wait in QEMU's accept queue now (backlog 1): further
    // connections are refused by the kernel with EAGAIN.
    let check = vm.snapctl.args(["check", "--json"]).ok();
    let note = String::from_utf8_lossy(&check.stderr).into_owned();
    assert!(
        note.lines().count() == 1 && note.contains("cannot compare with QEMU"),
        "check stderr: {note:?}"
    );
    assert!(!note.contains("os error"), "check stderr: {note:?}");
    let report: Value = serde_json::from_slice(&check.stdout).expect("check --json");
    assert_eq!(report["qemu_running"], false, "{report}");
    assert_eq!(report["drift"], json!([]), "{report}");

    let line = vm
        .snapctl
        .args(["jobs"])
        .error_line(&["another client", "add a second -qmp"]);
    assert!(
        !line.contains("os error") && !line.contains("snapctl (pid"),
        "{line}"
    );

    // Once the foreign client leaves, QEMU drains its queue and snapctl
    // gets its monitor back.
    drop(foreign);
    assert_eq!(vm.snapctl.args(["jobs"]).json(), json!({ "jobs": [] }));
    assert_eq!(chain(&vm, "vda"), images);
}

/// A relay socket left by a snapctl that died is replaced by the next
/// holder's; a symlink planted there is removed, never followed; and no
/// relay socket outlives its session.
#[test]
fn stale_relay_sockets_and_symlinks_are_replaced() {
    let vm = Vm::one_disk(None);
    vm.snapctl.args(["init"]).ok();
    let relay = relay_path(&vm);

    // A socket nobody listens on any more.
    drop(std::os::unix::net::UnixListener::bind(&relay).unwrap());
    assert!(relay.exists());
    vm.snapctl.args(["create", "s1"]).ok();
    assert!(!relay.exists(), "the stale socket was left");

    // A symlink to a file that must stay as it is.
    let target = vm.dir.join("precious");
    std::fs::write(&target, b"keep").unwrap();
    std::os::unix::fs::symlink(&target, &relay).unwrap();
    vm.snapctl.args(["create", "s2"]).ok();
    assert!(relay.symlink_metadata().is_err(), "the symlink was left");
    assert_eq!(std::fs::read(&target).unwrap(), b"keep");
}
