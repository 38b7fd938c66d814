//! The test's own view of QEMU: [`Monitor`], a small synchronous QMP
//! client on the second monitor socket every test VM has (snapctl has the
//! first), which writes and reads guest data with HMP `qemu-io`, and
//! [`BlockState`], QEMU's block graph as far as the tests compare it.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

/// How long the test's own QMP exchanges may take.
const MONITOR_TIMEOUT: Duration = Duration::from_secs(30);

/// A plain synchronous QMP client for the test's own monitor.
#[derive(Debug)]
pub struct Monitor {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    next_id: u64,
}

impl Monitor {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(path: impl AsRef<Path>) -> Monitor {
        let path = path.as_ref().to_owned();
        let stream = UnixStream::connect(&path)
            .unwrap_or_else(|e| panic!("cannot connect to QMP monitor {}: {e}", path.display()));
        stream.set_read_timeout(Some(MONITOR_TIMEOUT)).unwrap();
        let writer = stream.try_clone().unwrap();
        let mut monitor = Monitor {
            path,
            reader: BufReader::new(stream),
            writer,
            next_id: 0,
        };
        let greeting = monitor.read_message();
        assert!(
            greeting.get("QMP").is_some(),
            "{}: expected a QMP greeting, got {greeting}",
            monitor.path.display()
        );
        monitor.ok("qmp_capabilities", Value::Null);
        monitor
    }

    fn read_message(&mut self) -> Value {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => panic!("QMP monitor {} closed the connection", self.path.display()),
            Ok(_) => serde_json::from_str(&line).unwrap_or_else(|e| {
                panic!(
                    "QMP monitor {}: bad JSON {line:?}: {e}",
                    self.path.display()
                )
            }),
            Err(e) => panic!("QMP monitor {}: {e}", self.path.display()),
        }
    }

    /// Runs one command; `Err` holds QEMU's error description.
    pub fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        self.next_id += 1;
        let id = format!("t{}", self.next_id);
        let mut message = json!({ "execute": command, "id": id });
        if !arguments.is_null() {
            message["arguments"] = arguments;
        }
        let mut line = message.to_string();
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .unwrap_or_else(|e| panic!("QMP monitor {}: {e}", self.path.display()));
        loop {
            let reply = self.read_message();
            if reply.get("event").is_some() || reply.get("id") != Some(&json!(id)) {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            let desc = reply["error"]["desc"]
                .as_str()
                .unwrap_or("(no description)");
            return Err(desc.to_owned());
        }
    }

    /// Runs one command and panics on a QMP error.
    pub fn ok(&mut self, command: &str, arguments: Value) -> Value {
        self.execute(command, arguments.clone())
            .unwrap_or_else(|e| panic!("QMP {command} {arguments} failed: {e}"))
    }

    /// An HMP command line; returns its text output.
    pub fn hmp(&mut self, command_line: &str) -> String {
        let out = self.ok(
            "human-monitor-command",
            json!({ "command-line": command_line }),
        );
        out.as_str().unwrap_or_default().to_owned()
    }

    /// HMP `qemu-io` on a virtio disk by qdev id. Its results go to QEMU's
    /// stdout; the HMP reply is empty unless the device is not found.
    pub fn qemu_io(&mut self, disk: &str, script: &str) {
        let out = self.hmp(&format!(
            "qemu-io -d /machine/peripheral/{disk}/virtio-backend \"{script}\""
        ));
        assert!(
            out.trim().is_empty(),
            "qemu-io on {disk} {script:?} said: {out}"
        );
    }

    /// Fills `[offset, offset + len)` of a disk with `pattern`, as the guest would.
    pub fn write(&mut self, disk: &str, pattern: u8, offset: u64, len: u64) {
        self.qemu_io(disk, &format!("write -P {pattern:#04x} {offset} {len}"));
    }

    /// The block graph as far as the tests compare it.
    pub fn block_state(&mut self) -> BlockState {
        let blocks = self.ok("query-block", Value::Null);
        let nodes = self.ok("query-named-block-nodes", json!({ "flat": true }));
        let mut roots = BTreeMap::new();
        for b in blocks.as_array().expect("query-block returns an array") {
            let Some(qdev) = b["qdev"].as_str() else {
                continue;
            };
            let id = qdev
                .strip_prefix("/machine/peripheral/")
                .and_then(|rest| rest.split('/').next())
                .unwrap_or(qdev)
                .to_owned();
            let root = match b.get("inserted") {
                Some(i) => Root {
                    node: i["node-name"].as_str().unwrap_or_default().to_owned(),
                    file: PathBuf::from(i["file"].as_str().unwrap_or_default()),
                },
                None => Root::default(),
            };
            roots.insert(id, root);
        }
        let nodes = nodes
            .as_array()
            .expect("query-named-block-nodes returns an array")
            .iter()
            .map(|n| Node {
                name: n["node-name"].as_str().unwrap_or_default().to_owned(),
                driver: n["drv"].as_str().unwrap_or_default().to_owned(),
                file: n["file"].as_str().unwrap_or_default().to_owned(),
                read_only: n["ro"].as_bool().unwrap_or_default(),
            })
            .collect();
        BlockState { roots, nodes }
    }

    /// QEMU's run state (`query-status`), e.g. `running`.
    pub fn run_state(&mut self) -> String {
        self.ok("query-status", Value::Null)["status"]
            .as_str()
            .expect("query-status has a status")
            .to_owned()
    }

    /// `query-jobs`.
    pub fn jobs(&mut self) -> Vec<Value> {
        match self.ok("query-jobs", Value::Null) {
            Value::Array(jobs) => jobs,
            other => panic!("query-jobs returned {other}"),
        }
    }

    /// Sends `quit`; QEMU closes the connection as it exits.
    pub fn quit(&mut self) {
        // The reply may or may not arrive before the socket closes.
        let _ = self.writer.write_all(b"{\"execute\": \"quit\"}\n");
    }
}

/// What a device's root node is.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Root {
    pub node: String,
    pub file: PathBuf,
}

/// One node of `query-named-block-nodes`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Node {
    pub name: String,
    pub driver: String,
    pub file: String,
    pub read_only: bool,
}

/// QEMU's block graph: each device's root, and every named node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockState {
    /// By qdev id.
    pub roots: BTreeMap<String, Root>,
    pub nodes: BTreeSet<Node>,
}

impl BlockState {
    pub fn root_file(&self, disk: &str) -> &Path {
        &self
            .roots
            .get(disk)
            .unwrap_or_else(|| panic!("QEMU has no disk {disk}: {self:#?}"))
            .file
    }
}
