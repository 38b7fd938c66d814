//! The QEMU command line and the running VM.

use std::ffi::OsString;
use std::io;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};

use crate::process::Process;
use crate::{absolute, require_tool};

/// How long `spawn` waits for each monitor socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);

/// The `-blockdev` JSON of one qcow2 layer: a `file` child opened from the
/// absolute form of `image`, and `"backing"` set to the node below it, or
/// `null` for the bottom layer (QEMU then opens no backing at all, whatever
/// the image header says).
pub fn qcow2_layer(node_name: &str, image: &Path, backing: Option<&str>) -> Value {
    json!({
        "driver": "qcow2",
        "node-name": node_name,
        "file": {"driver": "file", "filename": absolute(image)},
        "backing": backing,
    })
}

/// The `-blockdev` values for a chain, bottom layer first.
pub(crate) fn chain_layers(layers: &[(&str, &Path)]) -> Vec<Value> {
    let mut below = None;
    layers
        .iter()
        .map(|&(node, image)| {
            let layer = qcow2_layer(node, image, below);
            below = Some(node);
            layer
        })
        .collect()
}

/// `unix:PATH,server=on,wait=off` with QEMU's option escaping (`,` → `,,`).
pub(crate) fn unix_server(path: &Path) -> String {
    format!("unix:{},server=on,wait=off", escape_opt(path))
}

/// A path as a QEMU option value: commas are doubled.
pub(crate) fn escape_opt(path: &Path) -> String {
    absolute(path).to_string_lossy().replace(',', ",,")
}

/// Builds a `qemu-system-x86_64` command line for a guest-less VM.
///
/// The base line is `-M q35 -accel tcg -m 128 -nodefaults -display none`,
/// paused (`-S`) unless [`QemuBuilder::paused`] says otherwise: block jobs
/// need no guest OS. [`QemuBuilder::spawn`] returns once QEMU listens on
/// every monitor socket that was added.
#[derive(Debug, Clone)]
pub struct QemuBuilder {
    args: Vec<OsString>,
    sockets: Vec<PathBuf>,
    paused: bool,
    log_dir: Option<PathBuf>,
}

impl Default for QemuBuilder {
    fn default() -> QemuBuilder {
        QemuBuilder::new()
    }
}

impl QemuBuilder {
    /// A paused q35 TCG machine with 128 MiB, no default devices and no display.
    pub fn new() -> QemuBuilder {
        QemuBuilder {
            args: Vec::new(),
            sockets: Vec::new(),
            paused: true,
            log_dir: None,
        }
    }

    /// Start with the CPUs stopped (`-S`, the default) or running.
    ///
    /// A running VM without a guest OS just sits in the firmware, which is
    /// enough for `stop`/`cont` and their events.
    pub fn paused(mut self, paused: bool) -> QemuBuilder {
        self.paused = paused;
        self
    }

    /// Where QEMU's stdout and stderr files go (usually the test's
    /// [`crate::WorkDir`]). Without it they go to a private temporary
    /// directory that lives as long as the [`Qemu`] guard.
    pub fn log_dir(mut self, dir: impl AsRef<Path>) -> QemuBuilder {
        self.log_dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Adds a QMP monitor: `-qmp unix:PATH,server=on,wait=off`. Repeatable; a
    /// monitor serves one client at a time, so a test that watches what the
    /// code under test does gives each side its own.
    pub fn qmp(mut self, socket: impl AsRef<Path>) -> QemuBuilder {
        let socket = absolute(socket.as_ref());
        self.args.push("-qmp".into());
        self.args.push(unix_server(&socket).into());
        self.sockets.push(socket);
        self
    }

    /// Adds a human monitor (HMP): `-monitor unix:PATH,server=on,wait=off`.
    pub fn hmp_monitor(mut self, socket: impl AsRef<Path>) -> QemuBuilder {
        let socket = absolute(socket.as_ref());
        self.args.push("-monitor".into());
        self.args.push(unix_server(&socket).into());
        self.sockets.push(socket);
        self
    }

    /// Adds one `-blockdev` in JSON syntax.
    pub fn blockdev(self, options: Value) -> QemuBuilder {
        self.arg("-blockdev").arg(options.to_string())
    }

    /// Adds one `-device`, e.g. `virtio-blk-pci,id=vda,drive=top`.
    pub fn device(self, spec: impl Into<OsString>) -> QemuBuilder {
        self.arg("-device").arg(spec)
    }

    /// Adds a disk made of a qcow2 chain, the way libvirt lays it out.
    ///
    /// `layers` go from the bottom (base) to the top (active) layer, each a
    /// `(node name, image)` pair. Every layer gets its own `-blockdev` (see
    /// [`qcow2_layer`]) linked to the one below by `"backing": "<node>"`,
    /// and the disk is `-device virtio-blk-pci,id=<disk_id>,drive=<top node>`.
    /// Its QOM path for `query-block`'s `qdev` and HMP `qemu-io -d` is
    /// `/machine/peripheral/<disk_id>/virtio-backend`.
    pub fn blockdev_chain(mut self, disk_id: &str, layers: &[(&str, &Path)]) -> QemuBuilder {
        let (top, _) = layers
            .last()
            .unwrap_or_else(|| panic!("disk {disk_id}: a chain needs at least one layer"));
        for layer in chain_layers(layers) {
            self = self.blockdev(layer);
        }
        self.device(format!("virtio-blk-pci,id={disk_id},drive={top}"))
    }

    /// Adds a disk in the legacy form:
    /// `-drive file=<image>,format=qcow2,if=none,id=<drive_id>` and
    /// `-device virtio-blk-pci,drive=<drive_id>,id=<device_id>`.
    ///
    /// QEMU opens the backing chain from the image headers and names the
    /// nodes itself (`#blockNNN`); `query-block` lists the disk with
    /// `device` = `drive_id`.
    pub fn drive(self, drive_id: &str, device_id: &str, image: &Path) -> QemuBuilder {
        self.arg("-drive")
            .arg(format!(
                "file={},format=qcow2,if=none,id={drive_id}",
                escape_opt(image)
            ))
            .device(format!("virtio-blk-pci,drive={drive_id},id={device_id}"))
    }

    /// Adds one raw argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> QemuBuilder {
        self.args.push(arg.into());
        self
    }

    /// Adds raw arguments.
    pub fn args<I, S>(mut self, args: I) -> QemuBuilder
    where
        I: IntoIterator<Item = S>,
        S: Into<OsString>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// The full command line as it will be run.
    pub fn command(&self) -> Command {
        let mut command = Command::new("qemu-system-x86_64");
        command.args([
            "-M",
            "q35",
            "-accel",
            "tcg",
            "-m",
            "128",
            "-nodefaults",
            "-display",
            "none",
        ]);
        if self.paused {
            command.arg("-S");
        }
        command.args(&self.args);
        command
    }

    /// Starts QEMU and waits until it listens on every monitor socket.
    ///
    /// Panics when `qemu-system-x86_64` is not installed. Fails with QEMU's
    /// stderr in the message when it exits during startup (a bad option, an
    /// image it cannot open).
    pub fn spawn(&self) -> io::Result<Qemu> {
        require_tool("qemu-system-x86_64");
        let mut process = Process::spawn(self.command(), self.log_dir.as_deref())?;
        for socket in &self.sockets {
            process.wait_for_socket(socket, SOCKET_TIMEOUT)?;
        }
        Ok(Qemu { process })
    }
}

/// A running `qemu-system-x86_64`, stopped when dropped.
///
/// Everything about the process (output, waiting, stopping) is on
/// [`Process`], which this derefs to. Typical end of a test: QMP `quit`,
/// then [`Process::wait_exit`], then check the images offline.
#[derive(Debug)]
pub struct Qemu {
    process: Process,
}

impl Deref for Qemu {
    type Target = Process;

    fn deref(&self) -> &Process {
        &self.process
    }
}

impl DerefMut for Qemu {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_links_each_layer_to_the_one_below() {
        let b = QemuBuilder::new()
            .blockdev_chain(
                "vda",
                &[
                    ("base", Path::new("/i/base.qcow2")),
                    ("top", Path::new("/i/top.qcow2")),
                ],
            )
            .drive("drive0", "vdb", Path::new("/i/a,b.qcow2"))
            .qmp("/s/q.sock");
        let args: Vec<String> = b
            .command()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let blockdevs: Vec<Value> = args
            .windows(2)
            .filter(|w| w[0] == "-blockdev")
            .map(|w| serde_json::from_str(&w[1]).unwrap())
            .collect();
        assert_eq!(
            blockdevs,
            vec![
                json!({"driver":"qcow2","node-name":"base","backing":null,
                       "file":{"driver":"file","filename":"/i/base.qcow2"}}),
                json!({"driver":"qcow2","node-name":"top","backing":"base",
                       "file":{"driver":"file","filename":"/i/top.qcow2"}}),
            ]
        );
        let line = args.join(" ");
        assert!(line.starts_with("-M q35 -accel tcg -m 128 -nodefaults -display none -S "));
        assert!(line.contains("-device virtio-blk-pci,id=vda,drive=top"));
        assert!(line.contains("-drive file=/i/a,,b.qcow2,format=qcow2,if=none,id=drive0"));
        assert!(line.contains("-device virtio-blk-pci,drive=drive0,id=vdb"));
        assert!(line.ends_with("-qmp unix:/s/q.sock,server=on,wait=off"));
    }
}
