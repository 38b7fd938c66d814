//! Disk images: `qemu-img` and `qemu-io` run offline (or with `-U` on images
//! a live QEMU holds).
//!
//! Data is checked with byte patterns: [`write_pattern`] fills a range with
//! one byte value and [`read_pattern_ok`] verifies that every byte of a range
//! has it. Every helper panics when the tool itself fails, printing the
//! command line, exit status, stdout and stderr.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::process::command_line;
use crate::{absolute, require_tool};

/// `qemu-img create -f qcow2 <path> <size>` (size in bytes).
pub fn create_qcow2(path: &Path, size: u64) {
    qemu_img(
        &["create", "-f", "qcow2"],
        &[path.as_os_str()],
        Some(&size.to_string()),
    );
}

/// `qemu-img create -f qcow2 -b <backing> -F <backing_fmt> <path>`: a new
/// overlay of the backing's size. `backing` is written into the header as
/// given: pass an absolute path, or one relative to the overlay's directory.
pub fn create_overlay(path: &Path, backing: &Path, backing_fmt: &str) {
    qemu_img(
        &["create", "-f", "qcow2", "-F", backing_fmt, "-b"],
        &[backing.as_os_str(), path.as_os_str()],
        None,
    );
}

/// `qemu-io -f qcow2 -c 'write -P <pattern> <offset> <len>' <image>`.
/// The image must not be in use by a running QEMU.
pub fn write_pattern(image: &Path, pattern: u8, offset: u64, len: u64) {
    let script = format!("write -P {pattern:#04x} {offset} {len}");
    let mut command = qemu_io(&["-f", "qcow2", "-c", &script], image);
    let output = run(&mut command);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !stdout.contains(&format!("wrote {len}/{len} bytes")) {
        fail_command(&command, &output);
    }
}

/// True when every byte of `[offset, offset + len)` of the image, as seen
/// through its backing chain, equals `pattern`; false on "Pattern
/// verification failed". Opens read-only with `-U`, so it works on images a
/// live QEMU holds (the answer is then only as current as QEMU's flushes).
pub fn read_pattern_ok(image: &Path, pattern: u8, offset: u64, len: u64) -> bool {
    let script = format!("read -P {pattern:#04x} {offset} {len}");
    let mut command = qemu_io(&["-f", "qcow2", "-r", "-U", "-c", &script], image);
    let output = output_of(&mut command);
    let stdout = String::from_utf8_lossy(&output.stdout);
    if stdout.contains("Pattern verification failed") {
        return false;
    }
    if output.status.success() && stdout.contains(&format!("read {len}/{len} bytes")) {
        return true;
    }
    fail_command(&command, &output);
}

/// `qemu-img compare -U a b`: true when the guest-visible contents are equal
/// (exit 0), false when they differ (exit 1); panics on anything else.
pub fn compare(a: &Path, b: &Path) -> bool {
    require_tool("qemu-img");
    let mut command = Command::new("qemu-img");
    command.args(["compare", "-U"]).arg(a).arg(b);
    let output = output_of(&mut command);
    match output.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => fail_command(&command, &output),
    }
}

/// `qemu-img info --output=json -U <image>`.
pub fn info(image: &Path) -> Value {
    let output = qemu_img(&["info", "--output=json", "-U"], &[image.as_os_str()], None);
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("qemu-img info {}: bad JSON: {e}", image.display()))
}

/// The backing file string in the image header (`backing-filename` as
/// written, not resolved), `None` when the image has no backing file.
pub fn backing_file(image: &Path) -> Option<String> {
    info(image)
        .get("backing-filename")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// The files of the chain that the headers describe, top first:
/// `qemu-img info --output=json -U --backing-chain`'s `filename`s (the top
/// as given, absolute when given absolute; backing files resolved by
/// qemu-img).
pub fn backing_chain(image: &Path) -> Vec<PathBuf> {
    let output = qemu_img(
        &["info", "--output=json", "-U", "--backing-chain"],
        &[image.as_os_str()],
        None,
    );
    let chain: Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("qemu-img info {}: bad JSON: {e}", image.display()));
    chain
        .as_array()
        .unwrap_or_else(|| panic!("qemu-img info --backing-chain: not an array: {chain}"))
        .iter()
        .map(|layer| {
            let name = layer["filename"]
                .as_str()
                .unwrap_or_else(|| panic!("qemu-img info: a layer has no filename: {layer}"));
            PathBuf::from(name)
        })
        .collect()
}

fn qemu_img(args: &[&str], paths: &[&std::ffi::OsStr], size: Option<&str>) -> Output {
    require_tool("qemu-img");
    let mut command = Command::new("qemu-img");
    command.args(args).args(paths);
    if let Some(size) = size {
        command.arg(size);
    }
    run(&mut command)
}

fn qemu_io(args: &[&str], image: &Path) -> Command {
    require_tool("qemu-io");
    let mut command = Command::new("qemu-io");
    command.args(args).arg(absolute(image));
    command
}

/// Runs `command`; panics with everything it printed unless it exits 0.
fn run(command: &mut Command) -> Output {
    let output = output_of(command);
    if !output.status.success() {
        fail_command(command, &output);
    }
    output
}

fn output_of(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", command_line(command)))
}

fn fail_command(command: &Command, output: &Output) -> ! {
    panic!(
        "command failed: {}\nstatus: {}\n--- stdout\n{}\n--- stderr\n{}",
        command_line(command),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr),
    )
}
