//! What people see: chain labels, the `list` table, usage lines and help,
//! repeated `init` and `pull`, diagnostics without colour codes, read-only
//! commands that leave the state directory alone, readable overlay names, an
//! unreachable socket, and unknown disks.

use std::path::Path;

use integration::WorkDir;
use serde_json::{Value, json};

use crate::util::{K64, Snapctl, VM, Vm, dir_listing};

/// `chain`'s text lines for one disk, `(file name, label)` below the heading.
fn chain_lines(text: &str, disk: &str) -> Vec<(String, String)> {
    let heading = format!("{disk} (from ");
    let mut lines = text.lines().skip_while(|l| !l.starts_with(&heading));
    assert!(lines.next().is_some(), "no {disk} in chain:\n{text}");
    lines
        .take_while(|l| l.starts_with("  "))
        .map(|l| {
            let (path, rest) = l.trim_start().split_once(" [qcow2] ").unwrap();
            let file = Path::new(path).file_name().unwrap().to_string_lossy();
            (file.into_owned(), rest.to_owned())
        })
        .collect()
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(f, l)| (f.to_string(), l.to_string()))
        .collect()
}

#[test]
fn chain_labels_say_what_each_image_is() {
    let vm = Vm::two_disks();
    vm.snapctl.args(["init"]).ok();
    let text = vm.snapctl.args(["chain"]).stdout();
    assert_eq!(
        chain_lines(&text, "vda"),
        pairs(&[("base.qcow2", "active (changes since the start); foreign")])
    );
    assert_eq!(
        chain_lines(&text, "vdb"),
        pairs(&[
            ("data.qcow2", "active (changes since the start); foreign"),
            ("data-base.qcow2", "base; foreign"),
        ])
    );

    vm.snapctl.args(["create", "s1"]).ok();
    vm.snapctl.args(["create", "s2"]).ok();
    let expected_vda = pairs(&[
        ("vda.s2.qcow2", "active (changes since s2)"),
        ("vda.s1.qcow2", "frozen by s2; changes after s1"),
        ("base.qcow2", "base; frozen by s1; foreign"),
    ]);
    let expected_vdb = pairs(&[
        ("vdb.s2.qcow2", "active (changes since s2)"),
        ("vdb.s1.qcow2", "frozen by s2; changes after s1"),
        ("data.qcow2", "frozen by s1; foreign"),
        ("data-base.qcow2", "base; foreign"),
    ]);
    let text = vm.snapctl.args(["chain"]).stdout();
    assert!(text.starts_with("vda (from qemu):\n"), "{text}");
    assert_eq!(chain_lines(&text, "vda"), expected_vda);
    assert_eq!(chain_lines(&text, "vdb"), expected_vdb);

    // --json keeps its fields and adds the label.
    let chain = vm.snapctl.args(["chain", "vda"]).json();
    let vda = chain["disks"]["vda"].as_array().unwrap();
    assert_eq!(
        vda[1],
        json!({"image": vm.image("vda.s1.qcow2"), "format": "qcow2", "active": false,
               "snapshots": ["s2"], "owned": true, "label": "frozen by s2; changes after s1"})
    );
    let labels: Vec<&str> = vda.iter().map(|e| e["label"].as_str().unwrap()).collect();
    let expected: Vec<&str> = expected_vda.iter().map(|(_, l)| l.as_str()).collect();
    assert_eq!(labels, expected);

    // After a revert the active image stands on s1's frozen image.
    vm.snapctl.args(["revert", "s1"]).ok();
    let text = vm.snapctl.args(["chain", "vda"]).stdout();
    assert_eq!(
        chain_lines(&text, "vda"),
        pairs(&[
            ("vda.s1-r1.qcow2", "active (changes since s1)"),
            ("base.qcow2", "base; frozen by s1; foreign"),
        ])
    );
}

#[test]
fn list_shows_utc_times_and_aligns_long_names() {
    let vm = Vm::two_disks();
    let long = "a-snapshot-name-longer-than-twenty-chars";
    vm.snapctl.args(["create", "s1"]).ok();
    vm.snapctl.args(["create", long, "-d", "second"]).ok();
    vm.snapctl.args(["create", "s3"]).ok();
    let text = vm.snapctl.args(["list"]).stdout();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    let header = lines[0];
    assert!(header.starts_with("  NAME "), "{text}");
    let column = |name: &str| {
        header
            .find(name)
            .unwrap_or_else(|| panic!("no {name} in {header:?}"))
    };
    let created = column("CREATED (UTC)");
    let parent = column("PARENT");
    let kind = column("KIND");
    let disks = column("DISKS");
    let description = column("DESCRIPTION");
    let json = vm.snapctl.args(["list"]).json();
    for (row, s) in lines[1..].iter().zip(json["snapshots"].as_array().unwrap()) {
        let cell = |at: usize| row[at..].split("  ").next().unwrap().trim_end();
        assert_eq!(cell(2), s["name"].as_str().unwrap(), "{text}");
        // RFC 3339 in --json; the same instant, in UTC, in the table.
        let rfc = s["created"].as_str().unwrap();
        let shown = cell(created);
        assert!(shown.ends_with('Z'), "{shown}");
        assert_eq!(&shown[..10], &rfc[..10], "{text}");
        assert_eq!(&shown[11..19], &rfc[11..19], "{text}");
        assert_eq!(cell(parent), s["parent"].as_str().unwrap_or("-"), "{text}");
        assert_eq!(cell(kind), "disk-only", "{text}");
        assert_eq!(cell(disks), "vda,vdb", "{text}");
        if s["name"] == long {
            assert_eq!(&row[description..], "second", "{text}");
        }
        assert_eq!(row.starts_with('*'), s["current"] == true, "{text}");
    }
}

#[test]
fn second_init_and_finished_pull_are_no_ops() {
    let mut vm = Vm::two_disks();
    let first = vm.snapctl.args(["init"]).stdout();
    assert_eq!(first.lines().next(), Some("registered vm1"), "{first}");
    let again = vm.snapctl.args(["init"]).stdout();
    assert_eq!(
        again,
        format!(
            "already registered vm1\n  vda (known): {}\n  vdb (known): {} <- {}\n",
            vm.image("base.qcow2").display(),
            vm.image("data.qcow2").display(),
            vm.image("data-base.qcow2").display()
        )
    );

    vm.snapctl.args(["create", "s1"]).ok();
    vm.monitor.write("vda", 0x5a, 0, K64);
    vm.snapctl.args(["create", "s2"]).ok();
    vm.snapctl.args(["pull", "vda", "--base", "s1"]).ok();
    let before = vm.untouched_state();
    for args in [
        &["pull", "vda", "--base", "s1"][..],
        &["pull", "vda", "--base", "s1", "--dry-run"][..],
    ] {
        let output = vm.snapctl.args(args).ok();
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert_eq!(
            stdout,
            format!(
                "vda: nothing to pull: {} stands on s1's image {} already\n",
                vm.image("vda.s2.qcow2").display(),
                vm.image("base.qcow2").display()
            )
        );
        assert!(output.stderr.is_empty(), "{output:?}");
        vm.assert_untouched(&before, &args.join(" "));
    }
    let report = vm.snapctl.args(["pull", "vda", "--base", "s1"]).json();
    assert_eq!(
        report,
        json!({"disk": "vda", "merge": null, "job": null, "removed_snapshots": [],
               "removed_files": [], "warnings": [], "nothing_to_do": true})
    );

    vm.snapctl.args(["pull", "vda"]).ok();
    let before = vm.untouched_state();
    let stdout = vm.snapctl.args(["pull", "vda"]).stdout();
    assert_eq!(
        stdout,
        format!(
            "vda: nothing to pull: {} stands alone already\n",
            vm.image("vda.s2.qcow2").display()
        )
    );
    vm.assert_untouched(&before, "pull vda, twice");
    // A pull that does something still says what it did.
    let report = vm.snapctl.args(["pull", "vdb"]).json();
    assert_eq!(report["nothing_to_do"], false);
    assert_eq!(report["merge"]["operation"], "pull");
}

#[test]
fn usage_lines_and_help_keep_global_options_apart() {
    let dir = WorkDir::new();
    let state = dir.join("state");
    let env = |cmd: crate::util::run::TestCommand| {
        cmd.env("SNAPCTL_VM", VM)
            .env("SNAPCTL_SOCKET", "/nowhere.sock")
            .env("SNAPCTL_STATE_DIR", state.to_str().unwrap())
    };
    for (args, usage) in [
        (&["show"][..], "Usage: snapctl show [OPTIONS] <NAME>"),
        (&["create"][..], "Usage: snapctl create [OPTIONS] <NAME>"),
        (&["commit"][..], "Usage: snapctl commit [OPTIONS] <DISK>"),
        (
            &["job", "wait"][..],
            "Usage: snapctl job wait [OPTIONS] <ID>",
        ),
        (&["job"][..], "Usage: snapctl job [OPTIONS] <COMMAND>"),
    ] {
        for mut cmd in [
            env(Snapctl::bare().args(args)),
            Snapctl::bare()
                .args(["--vm", VM, "--socket", "/nowhere.sock"])
                .args(args),
        ] {
            let output = cmd.run();
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{stderr}");
            let line = stderr
                .lines()
                .find(|l| l.starts_with("Usage:"))
                .unwrap_or_else(|| panic!("no usage line:\n{stderr}"));
            assert_eq!(line, usage, "{stderr}");
        }
    }

    let help = env(Snapctl::bare().args(["list", "--help"])).stdout();
    let (options, global) = help
        .split_once("\nGlobal options:\n")
        .unwrap_or_else(|| panic!("no Global options heading:\n{help}"));
    assert!(help.contains("Usage: snapctl list [OPTIONS]\n"), "{help}");
    assert!(options.contains("--tree"), "{help}");
    for option in [
        "--vm",
        "--socket",
        "--qga",
        "--state-dir",
        "--json",
        "--lock-wait",
    ] {
        assert!(!options.contains(option), "{option} not global:\n{help}");
        assert!(global.contains(option), "{option} missing:\n{help}");
    }
    assert!(!global.contains("--tree"), "{help}");
    assert!(!state.exists(), "help touched the state directory");
}

#[test]
fn diagnostics_have_no_colour_codes_off_a_terminal() {
    let vm = Vm::two_disks();
    vm.snapctl.args(["init"]).ok();
    let output = vm.snapctl.args(["-vv", "chain"]).ok();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("DEBUG"),
        "-vv printed no diagnostics:\n{stderr}"
    );
    assert!(
        !stderr.contains('\x1b'),
        "colour codes on a pipe:\n{stderr:?}"
    );
}

#[test]
fn read_only_commands_create_no_state() {
    let dir = WorkDir::new();
    let state = dir.join("state");
    let snapctl = Snapctl::new(&state, VM, dir.join("none.sock"));
    let commands: [&[&str]; 9] = [
        &["list"],
        &["list", "--tree"],
        &["show", "s1"],
        &["chain"],
        &["chain", "vda"],
        &["qemu-args"],
        &["jobs"],
        &["job", "wait", "j1"],
        &["check"],
    ];
    for args in commands {
        snapctl.args(args).error_line(&["vm1 is not registered"]);
        assert!(!state.exists(), "{args:?} created the state directory");
    }
    // Without --vm: nothing is registered.
    Snapctl::bare()
        .env("SNAPCTL_STATE_DIR", state.to_str().unwrap())
        .arg("list")
        .error_line(&["no VM given"]);
    assert!(!state.exists());

    // An existing state directory gets no file either, and the commands
    // that change things still create what they need.
    std::fs::create_dir(&state).unwrap();
    for args in commands {
        snapctl.args(args).error_line(&["vm1 is not registered"]);
        assert_eq!(dir_listing(&state).len(), 0, "{args:?} created a file");
    }
    snapctl
        .args(["check", "--repair"])
        .error_line(&["not registered"]);

    // A registered VM: reading it creates nothing, not even a lock file.
    let vm = Vm::two_disks();
    vm.snapctl.args(["create", "s1"]).ok();
    std::fs::remove_file(vm.snapctl.lock_path()).unwrap();
    let listing = dir_listing(vm.snapctl.state_dir());
    for args in [
        &["list"][..],
        &["show", "s1"],
        &["chain"],
        &["qemu-args"],
        &["jobs"],
    ] {
        vm.snapctl.args(args).ok();
        assert_eq!(
            dir_listing(vm.snapctl.state_dir()),
            listing,
            "{args:?} created a file"
        );
    }
    // Plain check takes no lock: it reads, and creates nothing either.
    assert!(vm.snapctl.args(["check"]).stdout().contains("no drift"));
    assert_eq!(dir_listing(vm.snapctl.state_dir()), listing);
    vm.snapctl.args(["check", "--repair"]).ok();
    assert!(vm.snapctl.lock_path().exists());
    assert!(vm.snapctl.args(["check"]).stdout().contains("no drift"));
}

#[test]
fn overlay_names_stay_readable_and_get_a_suffix_only_on_a_clash() {
    let mut vm = Vm::two_disks();
    let created = vm.snapctl.args(["create", "a b"]).json();
    assert_eq!(
        created["disks"]["vda"]["overlay"],
        json!(vm.image("vda.a_b.qcow2"))
    );
    assert_eq!(
        created["disks"]["vdb"]["overlay"],
        json!(vm.image("vdb.a_b.qcow2"))
    );
    let created = vm.snapctl.args(["create", "a_b"]).json();
    for disk in ["vda", "vdb"] {
        let overlay = created["disks"][disk]["overlay"].as_str().unwrap();
        let file = Path::new(overlay).file_name().unwrap().to_str().unwrap();
        let hash = file
            .strip_prefix(&format!("{disk}.a_b--"))
            .and_then(|h| h.strip_suffix(".qcow2"))
            .unwrap_or_else(|| panic!("{file} is not {disk}.a_b--<hash>.qcow2"));
        assert_eq!(hash.len(), 10, "{file}");
        assert_eq!(vm.monitor.block_state().root_file(disk), Path::new(overlay));
    }
    assert_eq!(vm.snapctl.args(["check"]).json()["drift"], json!([]));
}

#[test]
fn chain_says_when_qemu_is_not_reachable_at_the_socket() {
    let vm = Vm::two_disks();
    vm.snapctl.args(["create", "s1"]).ok();
    let wrong = vm.dir.join("wrong.sock");
    let output = vm.snapctl.with_socket(&wrong).args(["chain", "vda"]).ok();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stdout.starts_with("vda (from images):\n"), "{stdout}");
    assert_eq!(
        stderr,
        format!(
            "snapctl: QEMU is not reachable at {} (nothing listens there): showing the chains from the image headers\n",
            wrong.display()
        )
    );
    // --json keeps stdout one document; the note goes to stderr all the same.
    let output = vm
        .snapctl
        .with_socket(&wrong)
        .args(["chain", "--json"])
        .ok();
    let chain: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(chain["source"], "images");
    assert!(String::from_utf8_lossy(&output.stderr).contains("not reachable"));
    // Reachable: no note.
    let output = vm.snapctl.args(["chain"]).ok();
    assert!(output.stderr.is_empty(), "{output:?}");
}

#[test]
fn every_command_that_takes_a_disk_refuses_an_unknown_one_alike() {
    let mut vm = Vm::two_disks();
    vm.snapctl.args(["create", "s1"]).ok();
    let before = vm.untouched_state();
    let expected = "snapctl: vm vm1 has no disk vdz; its disks: vda, vdb";
    for args in [
        &["qemu-args", "vdz"][..],
        &["chain", "vdz"],
        &["commit", "vdz"],
        &["pull", "vdz"],
        &["pull", "vdz", "--dry-run"],
        &["commit", "vdz", "--dry-run"],
    ] {
        let line = vm.snapctl.args(args).error_line(&[]);
        assert_eq!(line, expected, "{args:?}");
        vm.assert_untouched(&before, &args.join(" "));
    }
}
