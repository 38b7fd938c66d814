//! The record store against real files: what lands on disk, with which permissions, and
//! what happens when the file is damaged or the lock is taken.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::json;
use snapctl::record::{
    DeviceBinding, Disk, Layer, Snapshot, SnapshotDisk, SnapshotDisks, SnapshotKind,
};
use snapctl::{Error, Record, Store};
use tempfile::TempDir;

const NO_WAIT: Duration = Duration::ZERO;

/// A store in a fresh, not yet existing, subdirectory of a temporary directory.
fn store() -> (TempDir, Store) {
    let tmp = tempfile::tempdir().unwrap();
    let store = Store::open(&tmp.path().join("state/snapctl")).unwrap();
    (tmp, store)
}

/// A VM with one disk and two snapshots: s1 froze base, s2 froze vda.s1.
fn record(vm: &str) -> Record {
    let mut rec = Record::new(vm);
    rec.qmp_socket = Some("/run/ci1/qmp.sock".into());
    rec.disks.insert(
        "vda".into(),
        Disk {
            active: "/img/vda.s2.qcow2".into(),
            device: DeviceBinding {
                driver: "virtio-blk-pci".into(),
                extra: BTreeMap::new(),
            },
            node_options: BTreeMap::new(),
        },
    );
    let mut backing = None;
    for (image, owned) in [
        ("/img/base.qcow2", false),
        ("/img/vda.s1.qcow2", true),
        ("/img/vda.s2.qcow2", true),
    ] {
        rec.layers.insert(
            image.into(),
            Layer {
                format: "qcow2".into(),
                backing: backing.map(PathBuf::from),
                backing_string: backing.map(String::from),
                owned,
                virtual_size: Some(1 << 30),
            },
        );
        backing = Some(image);
    }
    for (name, parent, image) in [
        ("s1", None, "/img/base.qcow2"),
        ("s2", Some("s1"), "/img/vda.s1.qcow2"),
    ] {
        rec.snapshots.push(Snapshot {
            name: name.into(),
            parent: parent.map(String::from),
            created: "2026-11-23T12:00:00Z".parse().unwrap(),
            description: Some(format!("the {name} snapshot")),
            kind: SnapshotKind::DiskOnly,
            disks: SnapshotDisks::from([(
                "vda".to_owned(),
                SnapshotDisk {
                    image: image.into(),
                },
            )]),
            memory: None,
            internal: None,
            extra: BTreeMap::new(),
        });
    }
    rec.current = Some("s2".into());
    rec
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

#[test]
fn round_trip() {
    let (_tmp, store) = store();
    let lock = store.lock("ci1", NO_WAIT).unwrap();
    assert_eq!(lock.load().unwrap(), None);
    assert_eq!(store.peek("ci1").unwrap(), None);

    let rec = record("ci1");
    lock.save(&rec).unwrap();
    assert_eq!(lock.load().unwrap().as_ref(), Some(&rec));
    assert_eq!(store.peek("ci1").unwrap().as_ref(), Some(&rec));

    let bytes = fs::read_to_string(store.dir().join("ci1.json")).unwrap();
    assert_eq!(bytes, rec.to_json().unwrap());
    assert!(bytes.starts_with("{\n  \"version\": 1,\n  \"vm\": \"ci1\",\n"));
    assert!(bytes.ends_with("}\n"));
    let json: serde_json::Value = serde_json::from_str(&bytes).unwrap();
    assert_eq!(
        json["snapshots"][1]["disks"]["vda"]["image"],
        "/img/vda.s1.qcow2"
    );
}

#[test]
fn save_is_atomic_and_private() {
    let (_tmp, store) = store();
    let lock = store.lock("ci1", NO_WAIT).unwrap();
    let mut rec = record("ci1");
    for i in 0..5 {
        rec.snapshots[0].description = Some(format!("take {i}"));
        lock.save(&rec).unwrap();
    }
    // No temporary file is left behind, only the record and the lock file.
    assert_eq!(dir_entries(store.dir()), ["ci1.json", "ci1.lock"]);
    assert_eq!(mode(store.dir()), 0o700);
    assert_eq!(mode(&store.dir().join("ci1.json")), 0o600);
    assert_eq!(mode(&store.dir().join("ci1.lock")), 0o600);
    assert_eq!(store.peek("ci1").unwrap().unwrap(), rec);
}

#[test]
fn open_refuses_a_file_and_accepts_an_existing_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("state");
    fs::write(&file, b"not a directory").unwrap();
    let err = Store::open(&file).unwrap_err();
    assert!(matches!(err, Error::StateDirNotDirectory { .. }), "{err}");
    assert_eq!(
        err.to_string(),
        format!(
            "state directory {} exists and is not a directory",
            file.display()
        )
    );

    // An existing directory is used as it is; its mode is the user's choice.
    let dir = tmp.path().join("existing");
    fs::create_dir(&dir).unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o750)).unwrap();
    let store = Store::open(&dir).unwrap();
    assert_eq!(store.dir(), dir);
    assert_eq!(mode(&dir), 0o750);
}

#[test]
fn newer_record_is_refused_and_kept() {
    let (_tmp, store) = store();
    let path = store.dir().join("ci1.json");
    let newer = br#"{"version": 2, "vm": "ci1", "chains": "a shape this build cannot read"}"#;
    fs::write(&path, newer).unwrap();

    let expected = format!(
        "record {} has version 2; this snapctl reads up to 1: upgrade snapctl",
        path.display()
    );
    assert_eq!(store.peek("ci1").unwrap_err().to_string(), expected);
    let lock = store.lock("ci1", NO_WAIT).unwrap();
    assert_eq!(lock.load().unwrap_err().to_string(), expected);
    assert_eq!(lock.save(&record("ci1")).unwrap_err().to_string(), expected);
    assert_eq!(fs::read(&path).unwrap(), newer);
}

#[test]
fn truncated_record_is_corrupt_and_never_overwritten() {
    let (_tmp, store) = store();
    let lock = store.lock("ci1", NO_WAIT).unwrap();
    let path = store.dir().join("ci1.json");
    let full = record("ci1").to_json().unwrap();
    let truncated = &full.as_bytes()[..full.len() / 2];
    fs::write(&path, truncated).unwrap();

    let err = lock.load().unwrap_err();
    assert!(matches!(err, Error::RecordCorrupt { .. }), "{err}");
    let message = err.to_string();
    assert!(
        message.starts_with(&format!("record {} is corrupt (line ", path.display())),
        "{message}"
    );
    assert!(
        message.ends_with("): fix or move it away; snapctl never overwrites it"),
        "{message}"
    );
    assert!(!message.contains('\n'), "{message}");
    assert_eq!(store.peek("ci1").unwrap_err().to_string(), message);

    let err = lock.save(&record("ci1")).unwrap_err();
    assert_eq!(err.to_string(), message);
    let mut rec = record("ci1");
    assert!(lock.begin(&mut rec, op("create", json!({}))).is_err());
    assert!(rec.journal.is_empty());
    assert_eq!(fs::read(&path).unwrap(), truncated);
    assert_eq!(dir_entries(store.dir()), ["ci1.json", "ci1.lock"]);
}

/// A save does not parse again a record file this lock read or wrote and
/// nobody touched since; one rewritten behind its back is parsed again, and
/// a broken one is still never overwritten.
#[test]
fn a_record_rewritten_behind_the_lock_is_checked_again() {
    let (_tmp, store) = store();
    let lock = store.lock("ci1", NO_WAIT).unwrap();
    let path = store.dir().join("ci1.json");
    lock.save(&record("ci1")).unwrap();
    assert!(lock.load().unwrap().is_some());
    lock.save(&record("ci1")).unwrap();

    let broken = b"{\"version\": 1, \"vm\": \"ci1\", \"snapshots\": 7}\n";
    fs::write(&path, broken).unwrap();
    let err = lock.save(&record("ci1")).unwrap_err();
    assert!(matches!(err, Error::RecordCorrupt { .. }), "{err}");
    assert_eq!(fs::read(&path).unwrap(), broken);
}

#[test]
fn wrong_types_are_corrupt_with_position() {
    let (_tmp, store) = store();
    let path = store.dir().join("ci1.json");
    let bad = "{\n  \"version\": 1,\n  \"vm\": \"ci1\",\n  \"snapshots\": 5\n}\n";
    fs::write(&path, bad).unwrap();
    let err = store.peek("ci1").unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "record {} is corrupt (line 4, column 16: invalid type: integer `5`, expected a \
             sequence): fix or move it away; snapctl never overwrites it",
            path.display()
        )
    );
    let lock = store.lock("ci1", NO_WAIT).unwrap();
    assert!(lock.save(&record("ci1")).is_err());
    assert_eq!(fs::read_to_string(&path).unwrap(), bad);
}

#[test]
fn record_of_another_vm_is_refused_and_kept() {
    let (_tmp, store) = store();
    let path = store.dir().join("ci1.json");
    let other = record("ci2").to_json().unwrap();
    fs::write(&path, &other).unwrap();
    let err = store.peek("ci1").unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("record {} is for vm ci2, not ci1", path.display())
    );
    let lock = store.lock("ci1", NO_WAIT).unwrap();
    assert!(matches!(
        lock.save(&record("ci1")),
        Err(Error::RecordVmMismatch { .. })
    ));
    // Nor may a lock on ci1 write ci2's record.
    assert!(matches!(
        lock.save(&record("ci2")),
        Err(Error::RecordVmMismatch { .. })
    ));
    assert_eq!(fs::read_to_string(&path).unwrap(), other);
}

#[test]
fn invalid_record_is_not_saved() {
    let (_tmp, store) = store();
    let lock = store.lock("ci1", NO_WAIT).unwrap();
    let good = record("ci1");
    lock.save(&good).unwrap();
    let before = fs::read(store.dir().join("ci1.json")).unwrap();

    let mut bad = good.clone();
    bad.snapshots[1].parent = Some("s9".into());
    let err = lock.save(&bad).unwrap_err();
    assert_eq!(
        err.to_string(),
        "record ci1: snapshot s2 names parent s9, which is not in the record"
    );
    assert_eq!(fs::read(store.dir().join("ci1.json")).unwrap(), before);
}

#[test]
fn invalid_record_on_disk_is_reported_on_load() {
    let (_tmp, store) = store();
    let mut json: serde_json::Value =
        serde_json::from_str(&record("ci1").to_json().unwrap()).unwrap();
    json["current"] = "gone".into();
    fs::write(store.dir().join("ci1.json"), json.to_string()).unwrap();
    assert_eq!(
        store.peek("ci1").unwrap_err().to_string(),
        "record ci1: current snapshot gone is not in the record"
    );
}

/// A journal entry's operation from its on-disk parts (an unreadable one for
/// these made-up details: the store keeps it as it is).
fn op(name: &str, detail: serde_json::Value) -> snapctl::operation::Operation {
    snapctl::operation::Operation::from_parts(name, detail)
}

#[test]
fn journal_begin_and_resolve() {
    let (_tmp, store) = store();
    let lock = store.lock("ci1", NO_WAIT).unwrap();
    let mut rec = record("ci1");
    lock.save(&rec).unwrap();

    let plan = json!({"create": ["/img/vda.s3.qcow2"], "nodes": ["sc-vda-s3"]});
    let first = lock.begin(&mut rec, op("create", plan.clone())).unwrap();
    let second = lock.begin(&mut rec, op("delete", json!(null))).unwrap();
    assert_ne!(first, second);

    let on_disk = store.peek("ci1").unwrap().unwrap();
    assert_eq!(on_disk, rec);
    assert_eq!(on_disk.journal.len(), 2);
    let entry = &on_disk.journal[0];
    assert_eq!(entry.id, first);
    assert_eq!(entry.operation.name(), "create");
    assert_eq!(entry.pid, std::process::id());
    assert_eq!(entry.operation.detail().unwrap(), plan);

    lock.resolve(&mut rec, first).unwrap();
    let on_disk = store.peek("ci1").unwrap().unwrap();
    assert_eq!(on_disk.journal.len(), 1);
    assert_eq!(on_disk.journal[0].id, second);

    let err = lock.resolve(&mut rec, 999).unwrap_err();
    assert_eq!(err.to_string(), "vm ci1 has no journal entry 999");

    // A failed save leaves the in-memory record as the file has it.
    rec.current = Some("gone".into());
    assert!(lock.begin(&mut rec, op("revert", json!({}))).is_err());
    assert_eq!(rec.journal.len(), 1);
    assert!(lock.resolve(&mut rec, second).is_err());
    assert_eq!(rec.journal.len(), 1);
    assert_eq!(store.peek("ci1").unwrap().unwrap().journal, rec.journal);
}

#[test]
fn vm_names_are_checked_before_touching_files() {
    let (_tmp, store) = store();
    for vm in ["", "../etc/passwd", ".hidden", "-rf", "a/b", "ü"] {
        assert!(
            matches!(store.lock(vm, NO_WAIT), Err(Error::InvalidVmName { .. })),
            "{vm:?}"
        );
        assert!(matches!(store.peek(vm), Err(Error::InvalidVmName { .. })));
    }
    assert!(dir_entries(store.dir()).is_empty());
}

#[test]
fn list_vms_lists_records_only() {
    let (_tmp, store) = store();
    for vm in ["web", "ci1", "ci2"] {
        store.lock(vm, NO_WAIT).unwrap().save(&record(vm)).unwrap();
    }
    store.lock("no-record-yet", NO_WAIT).unwrap();
    for junk in [".ci1.json.abc123.tmp", "notes.txt", ".json", "-x.json"] {
        fs::write(store.dir().join(junk), b"").unwrap();
    }
    assert_eq!(store.list_vms().unwrap(), ["ci1", "ci2", "web"]);
}

#[test]
fn lock_file_names_its_holder_while_held() {
    let (_tmp, store) = store();
    let path = store.dir().join("ci1.lock");
    let lock = store.lock("ci1", NO_WAIT).unwrap();
    assert_eq!(lock.vm(), "ci1");
    assert_eq!(
        fs::read_to_string(&path).unwrap(),
        format!("{}\n", std::process::id())
    );
    drop(lock);
    assert_eq!(fs::read_to_string(&path).unwrap(), "");
    // The lock file stays: removing it could let two processes lock different files.
    assert!(path.exists());
}

/// std's file locks are `flock`s: per open file, so two opens conflict even within one
/// process. The thread-based tests below rely on this.
#[test]
#[allow(
    clippy::incompatible_msrv,
    reason = "File::try_lock is stable since Rust 1.89; snapctl is built with 1.95"
)]
fn separate_opens_of_one_file_conflict() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("x.lock");
    let a = fs::File::create(&path).unwrap();
    let b = fs::File::open(&path).unwrap();
    a.try_lock().unwrap();
    assert!(matches!(b.try_lock(), Err(fs::TryLockError::WouldBlock)));
    drop(a);
    b.try_lock().unwrap();
}

#[test]
fn second_locker_times_out_naming_the_holder() {
    let (_tmp, store) = store();
    let held = store.lock("ci1", NO_WAIT).unwrap();

    let other = store.clone();
    let waiter = thread::spawn(move || {
        let start = Instant::now();
        let result = other.lock("ci1", Duration::from_millis(300));
        (result.map(drop), start.elapsed())
    });
    let (result, waited) = waiter.join().unwrap();
    let err = result.unwrap_err();
    assert!(err.is_locked());
    assert_eq!(
        err.to_string(),
        format!(
            "vm ci1 is locked by another snapctl (pid {}); gave up after 300ms",
            std::process::id()
        )
    );
    assert!(waited >= Duration::from_millis(300), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");

    // Other VMs are not affected.
    store.lock("ci2", NO_WAIT).unwrap();

    drop(held);
    store.lock("ci1", NO_WAIT).unwrap();
}

#[test]
fn waiter_gets_the_lock_once_released() {
    let (_tmp, store) = store();
    let held = store.lock("ci1", NO_WAIT).unwrap();
    let releaser = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        drop(held);
    });
    let start = Instant::now();
    let lock = store.lock("ci1", Duration::from_secs(10)).unwrap();
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(150), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    releaser.join().unwrap();
    drop(lock);
}

/// A lock held by another process (util-linux `flock`, which writes no pid) blocks us,
/// and is released when that process dies, however it dies.
#[test]
fn lock_held_by_another_process() {
    let (_tmp, store) = store();
    drop(store.lock("ci1", NO_WAIT).unwrap());
    let path = store.dir().join("ci1.lock");
    // `-o`: only flock itself holds the lock, not the `sleep` it runs; the process group
    // lets the test kill both.
    let mut child = match Command::new("flock")
        .arg("-o")
        .arg(&path)
        .args(["sleep", "60"])
        .stdin(Stdio::null())
        .process_group(0)
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("skipped: util-linux `flock` is not installed");
            return;
        }
        Err(e) => panic!("spawning flock: {e}"),
    };

    let group = Pid::from_raw(i32::try_from(child.id()).unwrap());
    // Kills flock and its sleep however the test ends; SIGKILL, as in a crash.
    struct KillGroup(Pid);
    impl Drop for KillGroup {
        fn drop(&mut self) {
            let _ = killpg(self.0, Signal::SIGKILL);
        }
    }
    let guard = KillGroup(group);

    // Wait until the child holds the lock.
    let deadline = Instant::now() + Duration::from_secs(10);
    let err = loop {
        match store.lock("ci1", NO_WAIT) {
            Err(e) => break e,
            Ok(lock) => drop(lock),
        }
        assert!(Instant::now() < deadline, "flock never took the lock");
        thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(
        err.to_string(),
        "vm ci1 is locked by another snapctl; gave up after 0ms"
    );

    // The holder dies without releasing anything: the kernel releases the lock.
    drop(guard);
    child.wait().unwrap();
    store.lock("ci1", Duration::from_secs(5)).unwrap();
}
