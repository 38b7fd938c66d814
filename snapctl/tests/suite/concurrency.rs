//! Several snapctl processes on one VM at once: writers queue on the VM's lock
//! (`--lock-wait`), readers never see a half-written record, and afterwards
//! the record, QEMU and the image directory agree with each other.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use crate::util::{Background, K64, M1, Vm, dir_listing, fail};
use serde_json::{Value, json};
use snapctl::record::Record;

/// How long each process may wait for the lock.
const LOCK_WAIT: &str = "60";

/// How long a process may run before the test gives up on it.
const RUN_LIMIT: Duration = Duration::from_secs(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Create,
    List,
    Delete,
}

#[test]
fn eight_processes_at_once_keep_the_record_consistent() {
    let mut vm = Vm::two_disks();
    vm.snapctl.args(["init"]).ok();
    vm.monitor.write("vda", 0x11, 0, K64);
    vm.snapctl.args(["create", "d1"]).ok();
    vm.monitor.write("vda", 0x22, M1, K64);
    vm.snapctl.args(["create", "d2"]).ok();
    vm.monitor.write("vdb", 0x33, 0, K64);

    let jobs: Vec<(Kind, Vec<&str>)> = vec![
        (Kind::Create, vec!["create", "c1"]),
        (Kind::List, vec!["list", "--json"]),
        (Kind::Delete, vec!["delete", "d1"]),
        (Kind::Create, vec!["create", "c2"]),
        (Kind::Create, vec!["create", "c3"]),
        (Kind::Delete, vec!["delete", "d2"]),
        (Kind::List, vec!["list", "--json"]),
        (Kind::Create, vec!["create", "c4"]),
    ];
    let mut running: Vec<(Kind, String, Background)> = jobs
        .iter()
        .map(|(kind, args)| {
            let cmd = vm.snapctl.args(["--lock-wait", LOCK_WAIT]).args(args);
            let line = cmd.command_line();
            (*kind, line, cmd.spawn())
        })
        .collect();

    let mut created = Vec::new();
    let mut deleted = Vec::new();
    for (kind, line, process) in &mut running {
        let output = process.wait(RUN_LIMIT);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        if !output.status.success() {
            // Only a wait past the limit may fail, and then only as "locked".
            let waited_out = process.elapsed() >= Duration::from_secs(60);
            if !(waited_out && stderr.contains("locked")) {
                fail(process.command(), &output, "expected success");
            }
            continue;
        }
        let name = line.rsplit(' ').next().unwrap().to_owned();
        match kind {
            Kind::Create => created.push(name),
            Kind::Delete => deleted.push(name),
            Kind::List => {
                // A reader sees some whole record: every name known, parents listed.
                let list: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
                    fail(process.command(), &output, &format!("not JSON: {e}"))
                });
                let names: BTreeSet<&str> = list["snapshots"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| s["name"].as_str().unwrap())
                    .collect();
                let known = ["d1", "d2", "c1", "c2", "c3", "c4"];
                assert!(names.iter().all(|n| known.contains(n)), "{list}");
                if let Some(current) = list["current"].as_str() {
                    assert!(names.contains(current), "{list}");
                }
            }
        }
    }
    assert_eq!(created.len(), 4, "every create succeeds: {created:?}");
    assert_eq!(deleted.len(), 2, "every delete succeeds: {deleted:?}");

    // The record parses and validates, and holds each snapshot exactly once.
    let bytes = vm.snapctl.record_bytes().expect("a record");
    let record = Record::parse(&vm.snapctl.record_path(), &bytes).expect("the record parses");
    record.validate().expect("the record is valid");
    let names: Vec<&str> = record.snapshots.iter().map(|s| s.name.as_str()).collect();
    for name in &created {
        assert_eq!(
            names.iter().filter(|n| *n == name).count(),
            1,
            "{name} in {names:?}"
        );
    }
    for name in &deleted {
        assert!(!names.contains(&name.as_str()), "{name} in {names:?}");
    }
    assert_eq!(names.len(), created.len(), "{names:?}");
    assert!(record.journal.is_empty(), "{:?}", record.journal);

    // Record, QEMU and headers agree.
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], json!([]), "{check}");
    let graph = vm.monitor.block_state();
    for (id, disk) in &record.disks {
        assert_eq!(graph.root_file(id), disk.active, "{id}");
    }

    // No stray files: the image directory holds the recorded layers.
    let layers: BTreeSet<String> = record
        .layers
        .keys()
        .map(|p| {
            assert_eq!(p.parent(), Some(vm.images().as_path()), "{}", p.display());
            file_name(p)
        })
        .collect();
    // The images snapctl found (foreign) are never removed, even when a merge
    // left nothing depending on them; every other file must be a recorded layer.
    let foreign: BTreeSet<String> = ["base.qcow2", "data-base.qcow2", "data.qcow2"]
        .map(String::from)
        .into();
    let on_disk = dir_listing(&vm.images());
    assert!(
        layers.is_subset(&on_disk),
        "missing layers: {layers:?} vs {on_disk:?}"
    );
    let stray: Vec<&String> = on_disk
        .difference(&layers)
        .filter(|f| !foreign.contains(*f))
        .collect();
    assert!(
        stray.is_empty(),
        "stray files in the image directory: {stray:?}"
    );
    let state: Vec<String> = dir_listing(vm.snapctl.state_dir())
        .into_iter()
        .filter(|f| f != "vm1.json" && f != "vm1.lock")
        .collect();
    assert!(
        state.is_empty(),
        "stray files in the state directory: {state:?}"
    );
}

fn file_name(path: &Path) -> String {
    path.file_name().unwrap().to_string_lossy().into_owned()
}
