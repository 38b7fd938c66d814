//! Hostile input to the `snapctl` command: records edited by hand, snapshot names
//! that look like paths, shell code or other scripts, symlinks planted where
//! snapctl creates files, and the permissions of what it creates. Every refusal
//! is one clear line on stderr, and a refused command changes nothing: not the
//! record (byte for byte), not the image directory, not QEMU's graph.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::{VM, Vm, dir_listing, mode_of};
use serde_json::{Value, json};

/// A path outside every work directory, unique to this process and `what`.
fn outside(what: &str) -> PathBuf {
    std::env::temp_dir().join(format!("snapctl-hostile-{}-{what}", std::process::id()))
}

/// A VM with snapshots s1 and s2 taken; returns it with the record's bytes.
fn vm_with_two_snapshots() -> (Vm, Vec<u8>) {
    let vm = Vm::two_disks();
    vm.snapctl.args(["create", "s1"]).ok();
    vm.snapctl.args(["create", "s2"]).ok();
    let bytes = vm.snapctl.record_bytes().expect("create wrote a record");
    (vm, bytes)
}

/// The path of `vm`'s foreign base image of vda, as the record spells it.
fn base_of_vda(vm: &Vm) -> String {
    vm.image("base.qcow2").display().to_string()
}

fn write_record(vm: &Vm, record: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(record).unwrap();
    bytes.push(b'\n');
    std::fs::write(vm.snapctl.record_path(), &bytes).unwrap();
    bytes
}

/// A snapshot object of the record by name.
fn snapshot_mut<'a>(record: &'a mut Value, name: &str) -> &'a mut Value {
    record["snapshots"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|s| s["name"] == name)
        .unwrap_or_else(|| panic!("no snapshot {name}"))
}

type Edit = Box<dyn Fn(&Vm, &mut Value)>;

/// Hand edits that make a record unusable, with what the error must say.
fn broken_records() -> Vec<(&'static str, Edit, Vec<&'static str>)> {
    vec![
        (
            "snapshot name of the wrong type",
            Box::new(|_, r| snapshot_mut(r, "s1")["name"] = json!(5)),
            vec!["corrupt", "invalid type", "line"],
        ),
        (
            "owned is a string",
            Box::new(|vm, r| r["layers"][base_of_vda(vm)]["owned"] = json!("yes")),
            vec!["corrupt", "invalid type", "line"],
        ),
        (
            "disks is an array",
            Box::new(|_, r| r["disks"] = json!([])),
            vec!["corrupt", "invalid type"],
        ),
        (
            "version is a string",
            Box::new(|_, r| r["version"] = json!("1")),
            vec!["corrupt", "version"],
        ),
        (
            "created is not a time",
            Box::new(|_, r| snapshot_mut(r, "s2")["created"] = json!("yesterday")),
            vec!["corrupt", "line"],
        ),
        (
            "kind is unknown",
            Box::new(|_, r| snapshot_mut(r, "s2")["kind"] = json!("quantum")),
            vec!["corrupt", "quantum"],
        ),
        (
            "snapshot cycle",
            Box::new(|_, r| snapshot_mut(r, "s1")["parent"] = json!("s2")),
            vec!["its own ancestor"],
        ),
        (
            "snapshot is its own parent",
            Box::new(|_, r| snapshot_mut(r, "s2")["parent"] = json!("s2")),
            vec!["s2", "its own ancestor"],
        ),
        (
            "relative layer path",
            Box::new(|vm, r| {
                // Renamed everywhere it appears, so only its relativity is wrong.
                let text = r
                    .to_string()
                    .replace(&format!("\"{}\"", base_of_vda(vm)), "\"img/base.qcow2\"");
                *r = serde_json::from_str(&text).unwrap();
            }),
            vec!["img/base.qcow2", "not absolute"],
        ),
        (
            "relative backing",
            Box::new(|vm, r| {
                let frozen = snapshot_mut(r, "s2")["disks"]["vda"]["image"]
                    .as_str()
                    .unwrap()
                    .to_owned();
                assert_ne!(frozen, base_of_vda(vm));
                r["layers"][frozen]["backing"] = json!("base.qcow2");
            }),
            vec!["base.qcow2", "not absolute"],
        ),
        (
            "snapshot names an unknown layer",
            Box::new(|_, r| {
                snapshot_mut(r, "s2")["disks"]["vda"]["image"] = json!("/nowhere/vda.s1.qcow2")
            }),
            vec!["/nowhere/vda.s1.qcow2", "not a known layer"],
        ),
        (
            "active image is an unknown layer",
            Box::new(|_, r| r["disks"]["vdb"]["active"] = json!("/nowhere/data.qcow2")),
            vec!["/nowhere/data.qcow2", "not a known layer"],
        ),
        (
            "current names no snapshot",
            Box::new(|_, r| r["current"] = json!("s9")),
            vec!["s9", "not in the record"],
        ),
        (
            "snapshot name with a slash",
            Box::new(|_, r| snapshot_mut(r, "s2")["name"] = json!("../s2")),
            vec!["`/`"],
        ),
        (
            "duplicate snapshot",
            Box::new(|_, r| snapshot_mut(r, "s2")["name"] = json!("s1")),
            vec!["s1", "more than once"],
        ),
        (
            "record of another vm",
            Box::new(|_, r| r["vm"] = json!("vm2")),
            vec!["vm2"],
        ),
    ]
}

/// Every command that reads the record, with a hand-broken record: each fails
/// with one line naming the problem, and nothing changes.
#[test]
fn hand_edited_records_are_refused_and_left_byte_identical() {
    let (mut vm, original) = vm_with_two_snapshots();
    let commands: [&[&str]; 9] = [
        &["list"],
        &["list", "--tree", "--json"],
        &["show", "s1"],
        &["create", "c1"],
        &["check"],
        &["check", "--repair"],
        &["delete", "s1"],
        &["revert", "s1"],
        &["qemu-args"],
    ];
    for (case, edit, expected) in broken_records() {
        let mut record: Value = serde_json::from_slice(&original).unwrap();
        edit(&vm, &mut record);
        let bytes = write_record(&vm, &record);
        assert_ne!(bytes, original, "{case}: the edit changed nothing");
        let before = vm.untouched_state();
        for args in commands {
            let mut cmd = vm.snapctl.args(args);
            let what = format!("{case}: {}", cmd.command_line());
            let line = cmd.error_line(&expected);
            assert!(line.starts_with("snapctl: "), "{what}: {line}");
            vm.assert_untouched(&before, &what);
            assert_eq!(
                vm.snapctl.record_bytes().as_deref(),
                Some(&bytes[..]),
                "{what}"
            );
        }
    }
    // Put back, everything works again.
    std::fs::write(vm.snapctl.record_path(), &original).unwrap();
    vm.snapctl.args(["check"]).ok();
    vm.snapctl.args(["create", "s3"]).ok();
}

/// Fields this build does not know, anywhere in the record, are accepted by
/// every command.
#[test]
fn unknown_fields_are_accepted() {
    let (vm, original) = vm_with_two_snapshots();
    let mut record: Value = serde_json::from_slice(&original).unwrap();
    record["added_later"] = json!({"nested": [1, 2, {"x": null}]});
    record["disks"]["vda"]["cache"] = json!("writeback");
    record["disks"]["vda"]["device"]["hotplugged"] = json!(true);
    record["layers"][base_of_vda(&vm)]["encrypted"] = json!(false);
    snapshot_mut(&mut record, "s1")["vmstate"] = json!("/img/s1.mem");
    snapshot_mut(&mut record, "s2")["labels"] = json!({"ci": "run 7"});
    write_record(&vm, &record);

    let list = vm.snapctl.args(["list"]).json();
    let names: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["s1", "s2"]);
    vm.snapctl.args(["show", "s1"]).json();
    vm.snapctl.args(["chain"]).json();
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], json!([]));
    vm.snapctl.args(["create", "s3"]).ok();
    let list = vm.snapctl.args(["list"]).json();
    assert_eq!(list["current"], "s3");
    vm.snapctl.args(["check"]).ok();
}

/// Fields a newer snapctl added within the same record version survive when
/// this build rewrites the record.
#[test]
fn unknown_fields_survive_a_rewrite() {
    let (vm, original) = vm_with_two_snapshots();
    let mut record: Value = serde_json::from_slice(&original).unwrap();
    record["added_later"] = json!(1);
    snapshot_mut(&mut record, "s1")["vmstate"] = json!("/img/s1.mem");
    write_record(&vm, &record);
    vm.snapctl.args(["create", "s3"]).ok();
    let after = vm.snapctl.record();
    assert_eq!(after["added_later"], json!(1));
    assert_eq!(after["snapshots"][0]["vmstate"], json!("/img/s1.mem"));
}

/// Names that are paths, control characters or too long are refused before
/// anything is touched.
#[test]
fn path_like_control_and_overlong_names_are_refused() {
    let (mut vm, _) = vm_with_two_snapshots();
    let long = "ü".repeat(150); // 300 bytes in 150 characters
    assert_eq!(long.len(), 300);
    let cases: [(&str, &[&str]); 9] = [
        ("../x", &["`/`"]),
        ("../../../etc/passwd", &["`/`"]),
        ("..", &["reserved"]),
        ("a\nb", &["control character"]),
        ("line\r", &["control character"]),
        ("esc\u{1b}[31m", &["control character"]),
        ("nul\u{85}", &["control character"]),
        (&long, &["255 bytes"]),
        (&"x".repeat(300), &["255 bytes"]),
    ];
    let before = vm.untouched_state();
    for (name, expected) in cases {
        for args in [vec!["create", name], vec!["create", name, "--dry-run"]] {
            let mut cmd = vm.snapctl.args(&args);
            let what = cmd.command_line();
            let line = cmd.error_line(expected);
            assert!(
                !line.contains('\r') && !line.contains('\u{1b}'),
                "{what}: {line:?}"
            );
            vm.assert_untouched(&before, &what);
        }
    }
    let outside = vm.dir.join("x.qcow2");
    assert!(!outside.exists());
}

/// A Unicode name is a valid name: its overlay gets a portable file name in
/// the image directory, and every command shows the name as given.
#[test]
fn unicode_names_get_safe_overlay_files() {
    let vm = Vm::two_disks();
    vm.snapctl.args(["init"]).ok();
    let images_before = dir_listing(&vm.images());
    let name = "før-升级";
    let created = vm.snapctl.args(["create", name]).json();
    assert_eq!(created["snapshot"], name);

    let new: BTreeSet<String> = dir_listing(&vm.images())
        .difference(&images_before)
        .cloned()
        .collect();
    assert_eq!(new.len(), 2, "one overlay per disk: {new:?}");
    for disk in ["vda", "vdb"] {
        let overlay = PathBuf::from(created["disks"][disk]["overlay"].as_str().unwrap());
        assert_eq!(overlay.parent(), Some(vm.images().as_path()), "{overlay:?}");
        let file = overlay.file_name().unwrap().to_str().unwrap().to_owned();
        assert!(new.contains(&file), "{file} not in {new:?}");
        assert_eq!(file, format!("{disk}.f_r-__.qcow2"));
        assert!(
            file.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b)),
            "{file}"
        );
    }
    let list = vm.snapctl.args(["list"]).json();
    assert_eq!(list["current"], name);
    assert_eq!(list["snapshots"][0]["name"], name);
    let tree = vm.snapctl.args(["list", "--tree"]).stdout();
    assert!(tree.contains(name), "{tree}");
    assert_eq!(vm.snapctl.args(["show", name]).json()["name"], name);
    let chain = vm.snapctl.args(["chain", "vda"]).json();
    assert_eq!(chain["disks"]["vda"][1]["snapshots"], json!([name]));
    let check = vm.snapctl.args(["check"]).json();
    assert_eq!(check["drift"], json!([]));
    // A second Unicode name that sanitizes the same way gets another file.
    let twin = "fær-升级";
    let created = vm.snapctl.args(["create", twin]).json();
    let first = PathBuf::from(
        list["snapshots"][0]["disks"]["vda"]["image"]
            .as_str()
            .unwrap(),
    );
    assert_ne!(
        created["disks"]["vda"]["overlay"]
            .as_str()
            .map(PathBuf::from),
        Some(first)
    );
    vm.snapctl.args(["delete", name]).ok();
    vm.snapctl.args(["check"]).ok();
}

/// `init` on a state directory that does not exist yet creates it private
/// (0700) and the record and lock 0600, whatever the umask; later writes keep
/// those modes.
#[test]
fn state_directory_and_record_are_private() {
    let vm = Vm::two_disks();
    assert!(!vm.snapctl.state_dir().exists());
    // Run under umask 000: the modes must come from snapctl, not the umask.
    let status = Command::new("sh")
        .arg("-c")
        .arg("umask 000 && exec \"$@\"")
        .arg("sh")
        .arg(env!("CARGO_BIN_EXE_snapctl"))
        .arg("--state-dir")
        .arg(vm.snapctl.state_dir())
        .args(["--vm", VM, "--socket"])
        .arg(vm.dir.join("sc.sock"))
        .arg("init")
        .status()
        .unwrap();
    assert!(status.success());
    let modes = |what: &str| {
        assert_eq!(
            mode_of(vm.snapctl.state_dir()),
            0o700,
            "{what}: state directory"
        );
        assert_eq!(mode_of(&vm.snapctl.record_path()), 0o600, "{what}: record");
        assert_eq!(mode_of(&vm.snapctl.lock_path()), 0o600, "{what}: lock file");
        let others: Vec<String> = dir_listing(vm.snapctl.state_dir())
            .into_iter()
            .filter(|f| f != "vm1.json" && f != "vm1.lock")
            .collect();
        assert!(others.is_empty(), "{what}: stray files {others:?}");
    };
    modes("after init");
    vm.snapctl.args(["create", "s1"]).ok();
    modes("after create");
    // Overlays snapctl creates hold guest data: they are exactly as private as
    // the images they cover (their permission bits, whatever the umask).
    let record = vm.snapctl.record();
    let overlay = record["disks"]["vda"]["active"].as_str().unwrap();
    let base = vm.image("base.qcow2");
    assert_eq!(mode_of(Path::new(overlay)), mode_of(&base), "{overlay}");
    std::fs::set_permissions(
        vm.image("vda.s1.qcow2"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    vm.snapctl.args(["create", "s2"]).ok();
    assert_eq!(mode_of(&vm.image("vda.s2.qcow2")), 0o600);
}

/// A symlink planted where an overlay is to go is never followed: given with
/// `--overlay` it is refused; at the default overlay name, the overlay gets
/// the hashed name beside it. Its target is never created or written.
#[test]
fn planted_symlink_overlay_is_refused() {
    let mut vm = Vm::two_disks();
    vm.snapctl.args(["init"]).ok();
    let target = outside("overlay-target");
    let _ = std::fs::remove_file(&target);
    let link = vm.dir.join("innocent.qcow2");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    let default_name = vm.image("vda.s9.qcow2");
    std::os::unix::fs::symlink(&target, &default_name).unwrap();
    let existing = outside("existing-target");
    std::fs::write(&existing, b"precious").unwrap();
    let link_to_existing = vm.image("vdb.s8.qcow2");
    std::os::unix::fs::symlink(&existing, &link_to_existing).unwrap();

    let mut overlay = OsString::from("vda=");
    overlay.push(&link);
    let before = vm.untouched_state();
    let cases: Vec<(Vec<OsString>, Vec<String>)> = vec![(
        vec!["create".into(), "s1".into(), "--overlay".into(), overlay],
        vec![link.display().to_string(), "already exists".into()],
    )];
    for (args, expected) in &cases {
        let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
        let mut cmd = vm.snapctl.args(args);
        let what = cmd.command_line();
        cmd.error_line(&expected);
        vm.assert_untouched(&before, &what);
        assert!(!target.exists(), "{what}: the symlink was followed");
        assert_eq!(std::fs::read(&existing).unwrap(), b"precious", "{what}");
    }
    for (name, disk, link) in [
        ("s9", "vda", &default_name),
        ("s8", "vdb", &link_to_existing),
    ] {
        let created = vm.snapctl.args(["create", name]).json();
        let overlay = PathBuf::from(created["disks"][disk]["overlay"].as_str().unwrap());
        let file = overlay.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            file.starts_with(&format!("{disk}.{name}--")) && file.ends_with(".qcow2"),
            "{file}"
        );
        assert_eq!(overlay.parent(), link.parent());
        assert!(link.symlink_metadata().unwrap().file_type().is_symlink());
        assert!(!target.exists(), "create {name}: the symlink was followed");
        assert_eq!(
            std::fs::read(&existing).unwrap(),
            b"precious",
            "create {name}"
        );
    }
    std::fs::remove_file(&existing).unwrap();
}

/// A symlink planted as the VM's lock file must not let snapctl create or
/// truncate the file it points to.
#[test]
fn planted_symlink_lock_file_is_not_followed() {
    let vm = Vm::two_disks();
    std::fs::create_dir_all(vm.snapctl.state_dir()).unwrap();
    let victim = outside("lock-victim");
    std::fs::write(&victim, b"precious").unwrap();
    std::os::unix::fs::symlink(&victim, vm.snapctl.lock_path()).unwrap();
    let _ = vm.snapctl.args(["init"]).run();
    let content = std::fs::read(&victim).unwrap();
    std::fs::remove_file(&victim).unwrap();
    assert_eq!(content, b"precious", "the lock file's symlink was followed");
}

/// Shell syntax in snapshot names, descriptions and overlay paths stays data:
/// nothing is executed, and `qemu-args` quotes what it prints so that `eval`
/// gives back exactly the argument vector of `qemu-args --json`.
#[test]
fn user_strings_never_reach_a_shell() {
    let vm = Vm::two_disks();
    let cwd = vm.dir.join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    let absolute_pwned = outside("pwned");
    let _ = std::fs::remove_file(&absolute_pwned);

    // With a `/`, a name is refused outright.
    vm.snapctl
        .args([
            "create".to_owned(),
            format!("$(touch {})", absolute_pwned.display()),
        ])
        .current_dir(&cwd)
        .error_line(&["`/`"]);

    let names = [
        "$(touch pwned1)",
        "`touch pwned2`",
        "x;touch pwned3",
        "x|touch pwned4",
        "x&&touch pwned5",
        "'$(touch pwned6)'",
        "\"; touch pwned7; \"",
        "${IFS}touch${IFS}pwned8",
        "-rf",
        "--help",
    ];
    for name in names {
        vm.snapctl
            .args(["create", "-d", "$(touch pwned-description)", "--", name])
            .current_dir(&cwd)
            .ok();
    }
    // An overlay path full of shell syntax (a legal file name).
    let odd = vm.image("o $(touch pwned9) `touch pwned10`; 'q'.qcow2");
    let mut overlay = OsString::from("vda=");
    overlay.push(&odd);
    vm.snapctl
        .args([
            OsString::from("create"),
            "odd".into(),
            "--overlay".into(),
            overlay,
        ])
        .current_dir(&cwd)
        .ok();
    assert!(odd.exists());

    let list = vm.snapctl.args(["list"]).current_dir(&cwd).json();
    let listed: Vec<&str> = list["snapshots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    let mut expected: Vec<&str> = names.to_vec();
    expected.push("odd");
    assert_eq!(listed, expected);
    for s in list["snapshots"].as_array().unwrap() {
        if s["name"] != "odd" {
            assert_eq!(s["description"], "$(touch pwned-description)");
        }
    }
    vm.snapctl
        .args(["list", "--tree"])
        .current_dir(&cwd)
        .stdout();

    // qemu-args output, evaluated by a shell, is the JSON vector again.
    let line = vm.snapctl.args(["qemu-args"]).current_dir(&cwd).stdout();
    let vector = vm.snapctl.args(["qemu-args"]).current_dir(&cwd).json();
    let evaluated = Command::new("bash")
        .arg("-c")
        .arg("eval \"set -- $1\" && printf '%s\\0' \"$@\"")
        .arg("bash")
        .arg(line.trim_end())
        .current_dir(&cwd)
        .output()
        .unwrap();
    assert!(evaluated.status.success(), "{evaluated:?}");
    let args: Vec<String> = evaluated
        .stdout
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8(a.to_vec()).unwrap())
        .collect();
    assert_eq!(json!(args), vector, "qemu-args does not survive eval");
    assert!(
        line.contains("pwned9"),
        "the odd overlay is in the chain: {line}"
    );

    vm.snapctl.args(["check"]).current_dir(&cwd).ok();
    let mut places = vec![cwd.clone(), vm.images(), vm.snapctl.state_dir().to_owned()];
    places.push(vm.dir.path().to_owned());
    for place in places {
        let pwned: Vec<String> = dir_listing(&place)
            .into_iter()
            .filter(|f| f.starts_with("pwned"))
            .collect();
        assert!(pwned.is_empty(), "{}: {pwned:?}", place.display());
    }
    assert!(!absolute_pwned.exists());
    assert!(!Path::new("pwned1").exists() && !Path::new("pwned-description").exists());
}

/// What the `record_load` fuzz target does, on every input kept under
/// `fuzz/seeds/record_load`, with the outcome each one must have.
#[test]
fn fuzz_seed_records_load_as_expected() {
    use snapctl::record::Record;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/seeds/record_load");
    let expected: &[(&str, Option<&str>)] = &[
        ("backing-loop", Some("its own backing image")),
        ("deep-detail", Some("corrupt")),
        (
            "duplicate-journal-id",
            Some("journal entry 1 appears more than once"),
        ),
        ("empty-vm", None),
        ("layer-backed-by-itself", Some("its own backing image")),
        ("misspelt-disks-field", None),
        ("newer", Some("upgrade snapctl")),
        ("snapshot-cycle", Some("its own ancestor")),
        ("valid", None),
        ("version-float", Some("not a positive integer")),
        ("version-huge", Some("not a positive integer")),
    ];
    let mut seen = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(&path).unwrap();
        let outcome = Record::parse(Path::new("/state/vm1.json"), &bytes).and_then(|record| {
            // The queries end on anything that parses, loops included.
            for disk in record.disks.keys() {
                assert!(record.chain(disk).len() <= record.layers.len() + 1);
            }
            for layer in record.layers.keys() {
                assert!(record.chain_from(layer).len() <= record.layers.len() + 1);
                let _ = record.dependents(layer);
                let _ = record.snapshots_holding(layer);
            }
            for s in &record.snapshots {
                let _ = record.children(&s.name);
            }
            let _ = record.layers_needed();
            record.validate()?;
            let json = record.to_json()?;
            let again = Record::parse(Path::new("/state/vm1.json"), json.as_bytes())?;
            again.validate()?;
            assert_eq!(again.to_json()?, json, "{name}: encoding is not stable");
            Ok(())
        });
        match expected.iter().find(|(n, _)| *n == name) {
            Some((_, None)) => assert!(outcome.is_ok(), "{name}: {outcome:?}"),
            Some((_, Some(message))) => {
                let err = outcome.expect_err(&name).to_string();
                assert!(err.contains(message), "{name}: {err}");
            }
            // A new seed (e.g. a fuzzer finding): it must not panic, which it did not.
            None => {}
        }
        seen.insert(name);
    }
    for (name, _) in expected {
        assert!(seen.contains(*name), "seed {name} is missing");
    }
}
