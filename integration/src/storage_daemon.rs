//! `qemu-storage-daemon`: QEMU's block layer without a VM.

use std::ffi::OsString;
use std::io;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;

use crate::process::Process;
use crate::qemu::{chain_layers, unix_server};
use crate::{absolute, require_tool};

/// How long `spawn` waits for each monitor socket.
const SOCKET_TIMEOUT: Duration = Duration::from_secs(20);

/// Builds a `qemu-storage-daemon` command line:
/// `--blockdev <json>`... and, per QMP monitor,
/// `--chardev socket,path=P,server=on,wait=off,id=mN --monitor chardev=mN`.
#[derive(Debug, Clone, Default)]
pub struct StorageDaemonBuilder {
    args: Vec<OsString>,
    sockets: Vec<PathBuf>,
    log_dir: Option<PathBuf>,
}

impl StorageDaemonBuilder {
    /// An empty daemon (no nodes, no monitors).
    pub fn new() -> StorageDaemonBuilder {
        StorageDaemonBuilder::default()
    }

    /// Where the daemon's stdout and stderr files go (see [`crate::QemuBuilder::log_dir`]).
    pub fn log_dir(mut self, dir: impl AsRef<Path>) -> StorageDaemonBuilder {
        self.log_dir = Some(dir.as_ref().to_owned());
        self
    }

    /// Adds one `--blockdev` in JSON syntax.
    pub fn blockdev(self, options: Value) -> StorageDaemonBuilder {
        self.arg("--blockdev").arg(options.to_string())
    }

    /// Adds a qcow2 chain, bottom layer first, one `--blockdev` per layer
    /// linked by `"backing": "<node>"` (as [`crate::QemuBuilder::blockdev_chain`],
    /// without a device: every node is a root owned by the monitor).
    pub fn blockdev_chain(mut self, layers: &[(&str, &Path)]) -> StorageDaemonBuilder {
        for layer in chain_layers(layers) {
            self = self.blockdev(layer);
        }
        self
    }

    /// Adds a QMP monitor on a Unix socket. Repeatable.
    pub fn qmp(mut self, socket: impl AsRef<Path>) -> StorageDaemonBuilder {
        let socket = absolute(socket.as_ref());
        let id = format!("qmp{}", self.sockets.len());
        let chardev = format!(
            "socket,{},id={id}",
            unix_server(&socket).replacen("unix:", "path=", 1)
        );
        self.sockets.push(socket);
        self.arg("--chardev")
            .arg(chardev)
            .arg("--monitor")
            .arg(format!("chardev={id}"))
    }

    /// Adds one raw argument.
    pub fn arg(mut self, arg: impl Into<OsString>) -> StorageDaemonBuilder {
        self.args.push(arg.into());
        self
    }

    /// The full command line as it will be run.
    pub fn command(&self) -> Command {
        let mut command = Command::new("qemu-storage-daemon");
        command.args(&self.args);
        command
    }

    /// Starts the daemon and waits until it listens on every monitor socket.
    /// Panics when `qemu-storage-daemon` is not installed.
    pub fn spawn(&self) -> io::Result<StorageDaemon> {
        require_tool("qemu-storage-daemon");
        let mut process = Process::spawn(self.command(), self.log_dir.as_deref())?;
        for socket in &self.sockets {
            process.wait_for_socket(socket, SOCKET_TIMEOUT)?;
        }
        Ok(StorageDaemon { process })
    }
}

/// A running `qemu-storage-daemon`, stopped when dropped. Derefs to [`Process`].
#[derive(Debug)]
pub struct StorageDaemon {
    process: Process,
}

impl Deref for StorageDaemon {
    type Target = Process;

    fn deref(&self) -> &Process {
        &self.process
    }
}

impl DerefMut for StorageDaemon {
    fn deref_mut(&mut self) -> &mut Process {
        &mut self.process
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_monitor_gets_its_own_chardev() {
        let args: Vec<String> = StorageDaemonBuilder::new()
            .blockdev_chain(&[("base", Path::new("/i/base.qcow2"))])
            .qmp("/s/a.sock")
            .qmp("/s/b.sock")
            .command()
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            &args[2..],
            [
                "--chardev",
                "socket,path=/s/a.sock,server=on,wait=off,id=qmp0",
                "--monitor",
                "chardev=qmp0",
                "--chardev",
                "socket,path=/s/b.sock,server=on,wait=off,id=qmp1",
                "--monitor",
                "chardev=qmp1",
            ]
        );
    }
}
