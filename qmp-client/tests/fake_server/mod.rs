//! A scripted, in-process QMP (and guest-agent) server on a Unix socket.
//!
//! [`FakeServer::start`] binds a socket in a fresh temporary directory, accepts
//! one connection and runs the script, an async closure that receives a
//! [`Peer`]: the accepted stream plus helpers to read commands and write
//! replies, events and arbitrary bytes. Whatever the script returns comes back
//! from [`FakeServer::finish`], which also re-raises a panic from the script,
//! so assertions may live on either side.
//!
//! Nothing here can hang a test: every read has a time limit and the whole
//! script runs under [`SCRIPT_LIMIT`].

#![allow(dead_code)]

use std::future::Future;
use std::io::IoSliceMut;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{ControlMessageOwned, MsgFlags, recvmsg};
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;

/// How long a whole script may run.
pub const SCRIPT_LIMIT: Duration = Duration::from_secs(20);

/// How long a script waits for the client's next line before giving up.
pub const READ_LIMIT: Duration = Duration::from_secs(5);

/// A QMP greeting from QEMU 10.0.2 offering `capabilities`.
pub fn greeting(capabilities: &[&str]) -> Value {
    json!({
        "QMP": {
            "version": {
                "qemu": {"micro": 2, "minor": 0, "major": 10},
                "package": "Debian 1:10.0.2+ds-2",
            },
            "capabilities": capabilities,
        }
    })
}

/// A server that accepts one connection and runs a script on it.
#[derive(Debug)]
pub struct FakeServer<T> {
    path: PathBuf,
    task: JoinHandle<T>,
    // Last, so the directory outlives the listener inside the task.
    _dir: TempDir,
}

impl<T: Send + 'static> FakeServer<T> {
    /// Binds a socket and runs `script` on the first connection accepted.
    /// Must be called inside a tokio runtime.
    pub fn start<F, Fut>(script: F) -> FakeServer<T>
    where
        F: FnOnce(Peer) -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send + 'static,
    {
        let dir = tempfile::tempdir().expect("create a temporary directory");
        let path = dir.path().join("qmp.sock");
        let listener = UnixListener::bind(&path).expect("bind the fake server's socket");
        let task = tokio::spawn(async move {
            let run = async move {
                let (stream, _) = listener.accept().await.expect("accept a client");
                // Keep the listener until the script is done, like QEMU does.
                let result = script(Peer::new(stream)).await;
                drop(listener);
                result
            };
            tokio::time::timeout(SCRIPT_LIMIT, run)
                .await
                .expect("the fake server's script did not finish in time")
        });
        FakeServer {
            path,
            task,
            _dir: dir,
        }
    }

    /// The socket to connect to.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits for the script to end and returns what it returned; a panic in
    /// the script is re-raised here.
    pub async fn finish(self) -> T {
        match self.task.await {
            Ok(value) => value,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => panic!("fake server task failed: {e}"),
        }
    }
}

/// One command as the server read it.
#[derive(Debug, Clone)]
pub struct Command {
    /// The `execute` member.
    pub name: String,
    /// The `id` member (`Null` when absent).
    pub id: Value,
    /// The `arguments` member (`Null` when absent).
    pub args: Value,
    /// The whole line as received, without the newline (and without leading
    /// `0xFF` bytes, which [`Command::delimiters`] counts).
    pub line: Vec<u8>,
    /// How many `0xFF` bytes preceded the JSON (guest-agent resync).
    pub delimiters: usize,
}

impl Command {
    /// The line as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.line).into_owned()
    }
}

/// Why a read ended without a line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoLine {
    /// The client closed its side (or reset the connection).
    Eof,
    /// Nothing complete arrived in time.
    Timeout,
}

/// The server's end of an accepted connection.
#[derive(Debug)]
pub struct Peer {
    stream: UnixStream,
    /// Bytes read but not yet returned as a line.
    buf: Vec<u8>,
    /// How much of `buf` is known to hold no newline.
    scanned: usize,
    eof: bool,
}

impl Peer {
    fn new(stream: UnixStream) -> Peer {
        Peer {
            stream,
            buf: Vec::new(),
            scanned: 0,
            eof: false,
        }
    }

    // ---- reading ----

    /// A complete line from the buffer, if there is one. Each byte is
    /// searched once, so multi-megabyte lines cost linear time.
    fn take_line(&mut self) -> Option<Vec<u8>> {
        match self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
            Some(pos) => {
                let end = self.scanned + pos;
                self.scanned = 0;
                let mut line: Vec<u8> = self.buf.drain(..=end).collect();
                line.pop();
                Some(line)
            }
            None => {
                self.scanned = self.buf.len();
                None
            }
        }
    }

    /// The next line (without its newline), waiting at most `limit`.
    pub async fn next_line(&mut self, limit: Duration) -> Result<Vec<u8>, NoLine> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if let Some(line) = self.take_line() {
                return Ok(line);
            }
            if self.eof {
                return Err(NoLine::Eof);
            }
            let mut chunk = vec![0u8; 256 * 1024];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(NoLine::Timeout),
                Ok(Ok(0)) | Ok(Err(_)) => self.eof = true,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next line; panics when none comes within [`READ_LIMIT`].
    pub async fn read_line(&mut self) -> Vec<u8> {
        match self.next_line(READ_LIMIT).await {
            Ok(line) => line,
            Err(why) => panic!("fake server: expected a line from the client, got {why:?}"),
        }
    }

    /// The next command, with its name, id and arguments.
    pub async fn read_command(&mut self) -> Command {
        let line = self.read_line().await;
        parse_command(line)
    }

    /// The next command, which must be `name`.
    pub async fn expect(&mut self, name: &str) -> Command {
        let command = self.read_command().await;
        assert_eq!(
            command.name,
            name,
            "fake server: unexpected command {}",
            command.text()
        );
        command
    }

    /// The next command if one arrives within `limit`.
    pub async fn try_read_command(&mut self, limit: Duration) -> Result<Command, NoLine> {
        self.next_line(limit).await.map(parse_command)
    }

    /// Asserts that no complete line arrives within `limit` (EOF is fine).
    pub async fn assert_silent(&mut self, limit: Duration) {
        if let Ok(line) = self.next_line(limit).await {
            panic!(
                "fake server: expected silence, got {}",
                String::from_utf8_lossy(&line)
            );
        }
    }

    /// Reads until the client closes the connection and returns every line
    /// that came meanwhile; panics if the client is still there after `limit`.
    pub async fn wait_eof(&mut self, limit: Duration) -> Vec<Vec<u8>> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut lines = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_line(left).await {
                Ok(line) => lines.push(line),
                Err(NoLine::Eof) => return lines,
                Err(NoLine::Timeout) => panic!("fake server: the client did not disconnect"),
            }
        }
    }

    /// Reads one line with `recvmsg`, collecting descriptors passed with
    /// SCM_RIGHTS. Returns the line and the received descriptors (owned by the
    /// caller, who must close them).
    pub async fn read_line_with_fds(&mut self) -> (Vec<u8>, Vec<RawFd>) {
        assert!(
            self.buf.is_empty(),
            "fake server: bytes already buffered before recvmsg"
        );
        let mut fds = Vec::new();
        let deadline = tokio::time::Instant::now() + READ_LIMIT;
        loop {
            if let Some(line) = self.take_line() {
                return (line, fds);
            }
            tokio::time::timeout_at(deadline, self.stream.readable())
                .await
                .expect("fake server: no data for recvmsg")
                .expect("fake server: socket error");
            let mut chunk = [0u8; 4096];
            let mut space = nix::cmsg_space!([RawFd; 8]);
            let raw = self.stream.as_raw_fd();
            let got = self.stream.try_io(Interest::READABLE, || {
                let mut iov = [IoSliceMut::new(&mut chunk)];
                let msg =
                    recvmsg::<()>(raw, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)
                        .map_err(std::io::Error::from)?;
                let mut received = Vec::new();
                for cmsg in msg.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(list) = cmsg {
                        received.extend(list);
                    }
                }
                Ok((msg.bytes, received))
            });
            match got {
                Ok((0, _)) => panic!("fake server: EOF while waiting for a line with fds"),
                Ok((n, received)) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    fds.extend(received);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("fake server: recvmsg failed: {e}"),
            }
        }
    }

    // ---- writing ----

    /// Writes `bytes` as they are.
    pub async fn try_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await?;
        self.stream.flush().await
    }

    /// Writes `bytes` as they are; panics if the write fails.
    pub async fn raw(&mut self, bytes: &[u8]) {
        self.try_raw(bytes)
            .await
            .expect("fake server: write to the client failed");
    }

    /// Writes one JSON document and a newline.
    pub async fn send(&mut self, value: &Value) {
        let mut line = serde_json::to_vec(value).expect("JSON serializes");
        line.push(b'\n');
        self.raw(&line).await;
    }

    /// `{"return": value, "id": id}`.
    pub async fn reply(&mut self, id: &Value, value: Value) {
        self.send(&json!({"return": value, "id": id})).await;
    }

    /// `{"error": {"class": class, "desc": desc}, "id": id}`.
    pub async fn error(&mut self, id: &Value, class: &str, desc: &str) {
        self.send(&json!({"error": {"class": class, "desc": desc}, "id": id}))
            .await;
    }

    /// An event with a timestamp, like QEMU's.
    pub async fn event(&mut self, name: &str, data: Value) {
        self.send(&json!({
            "event": name,
            "data": data,
            "timestamp": {"seconds": 1_750_000_000, "microseconds": 123_456},
        }))
        .await;
    }

    /// A `JOB_STATUS_CHANGE` event.
    pub async fn job_status(&mut self, id: &str, status: &str) {
        self.event("JOB_STATUS_CHANGE", json!({"id": id, "status": status}))
            .await;
    }

    /// Closes the connection (the client sees EOF).
    pub async fn close(mut self) {
        let _ = self.stream.shutdown().await;
        drop(self);
    }

    // ---- QMP conveniences ----

    /// Sends a greeting offering `capabilities`.
    pub async fn greet(&mut self, capabilities: &[&str]) {
        self.send(&greeting(capabilities)).await;
    }

    /// Greeting offering `oob`, then answers `qmp_capabilities`; returns that
    /// command as received.
    pub async fn handshake(&mut self) -> Command {
        self.greet(&["oob"]).await;
        let caps = self.expect("qmp_capabilities").await;
        self.reply(&caps.id, json!({})).await;
        caps
    }

    // ---- guest-agent conveniences ----

    /// Writes a delimited reply: `0xFF` then `{"return": value}`.
    pub async fn agent_delimited(&mut self, value: Value) {
        let mut bytes = vec![0xFF];
        bytes.extend(serde_json::to_vec(&json!({ "return": value })).expect("JSON serializes"));
        bytes.push(b'\n');
        self.raw(&bytes).await;
    }

    /// A plain guest-agent reply, `{"return": value}` (the agent sends no ids).
    pub async fn agent_reply(&mut self, value: Value) {
        self.send(&json!({ "return": value })).await;
    }

    /// Reads a `guest-sync-delimited`, checks its leading `0xFF`, and returns
    /// the sync id it carries.
    pub async fn agent_read_sync(&mut self) -> i64 {
        let sync = self.expect("guest-sync-delimited").await;
        assert!(
            sync.delimiters >= 1,
            "fake agent: sync without a leading 0xFF: {}",
            sync.text()
        );
        sync.args["id"]
            .as_i64()
            .expect("guest-sync-delimited carries an integer id")
    }

    /// Answers one sync properly.
    pub async fn agent_sync(&mut self) -> i64 {
        let id = self.agent_read_sync().await;
        self.agent_delimited(json!(id)).await;
        id
    }
}

fn parse_command(mut line: Vec<u8>) -> Command {
    let delimiters = line.iter().take_while(|&&b| b == 0xFF).count();
    line.drain(..delimiters);
    let value: Value = serde_json::from_slice(&line).unwrap_or_else(|e| {
        panic!(
            "fake server: the client sent malformed JSON ({e}): {}",
            String::from_utf8_lossy(&line)
        )
    });
    let name = value["execute"]
        .as_str()
        .unwrap_or_else(|| panic!("fake server: not a command: {value}"))
        .to_owned();
    Command {
        name,
        id: value.get("id").cloned().unwrap_or(Value::Null),
        args: value.get("arguments").cloned().unwrap_or(Value::Null),
        line,
        delimiters,
    }
}
