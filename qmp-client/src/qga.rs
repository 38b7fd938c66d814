//! A client for the QEMU guest agent (`qemu-ga`), over its host-side socket.
//!
//! The agent speaks QMP's JSON framing without a greeting, answers one command
//! at a time, and may hold stale output from an earlier client. Every session
//! therefore starts with `guest-sync-delimited`: we send a `0xFF` byte (which
//! makes the agent drop any partial input) and a random id; the agent answers
//! with `0xFF` followed by the id, and everything before that is discarded.
//! After a timeout the stream is out of step, so the next call resyncs first.
//!
//! The agent's socket accepts connections before the agent inside the guest
//! runs, so [`GuestAgent::connect`] retries the sync until its deadline.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio_util::codec::FramedRead;

use crate::codec::{DEFAULT_MAX_DEPTH, DEFAULT_MAX_LINE, LineCodec, parse_json};
use crate::error::{Endpoint, Error, Result};
use crate::message::{Incoming, decode_reply};

/// Whether the guest's filesystems are frozen (`guest-fsfreeze-status`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreezeStatus {
    Thawed,
    Frozen,
    Other(String),
}

/// A connection to a guest agent.
#[derive(Debug)]
pub struct GuestAgent {
    path: PathBuf,
    reader: FramedRead<OwnedReadHalf, LineCodec>,
    writer: OwnedWriteHalf,
    timeout: Duration,
    in_sync: bool,
    next_sync: i64,
}

impl GuestAgent {
    /// Connects to the agent socket (`-chardev socket,path=…,server=on,wait=off`
    /// bound to `virtserialport name=org.qemu.guest_agent.0`) and synchronises,
    /// retrying for up to `timeout` while the agent is not yet answering.
    pub async fn connect(path: impl AsRef<Path>, timeout: Duration) -> Result<GuestAgent> {
        let path = path.as_ref().to_owned();
        let endpoint = Endpoint::Unix(path.clone());
        let stream = match tokio::time::timeout(timeout, UnixStream::connect(&path)).await {
            Ok(Ok(s)) => s,
            Ok(Err(source)) => return Err(Error::Connect { endpoint, source }),
            Err(_) => {
                return Err(Error::ConnectTimeout {
                    endpoint,
                    after: timeout,
                });
            }
        };
        let (read, writer) = stream.into_split();
        let mut agent = GuestAgent {
            path,
            reader: FramedRead::new(read, LineCodec::new(DEFAULT_MAX_LINE)),
            writer,
            timeout: Duration::from_secs(10),
            in_sync: false,
            next_sync: seed(),
        };
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match agent.sync(left.min(Duration::from_secs(1))).await {
                Ok(()) => return Ok(agent),
                Err(e) if e.is_timeout() && Instant::now() < deadline => continue,
                Err(e) if e.is_timeout() => {
                    return Err(Error::WaitTimeout {
                        what: format!("the guest agent on {} to answer", agent.path.display()),
                        after: timeout,
                    });
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Sets the per-command timeout (default 10 s).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// `guest-sync-delimited`: brings the stream back in step.
    pub async fn sync(&mut self, timeout: Duration) -> Result<()> {
        self.in_sync = false;
        let id = self.next_sync;
        self.next_sync = self.next_sync.wrapping_add(1) & 0x7fff_ffff;
        let mut line = vec![0xFF];
        line.extend_from_slice(
            json!({"execute": "guest-sync-delimited", "arguments": {"id": id}})
                .to_string()
                .as_bytes(),
        );
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        self.reader.decoder_mut().skip_to_delimiter();
        let wait = async {
            loop {
                match self.read_reply("guest-sync-delimited").await {
                    Ok(v) if v.as_i64() == Some(id) => return Ok(()),
                    // The stream is gone: waiting longer cannot help.
                    Err(e @ (Error::Closed { .. } | Error::Io(_) | Error::LineTooLong { .. })) => {
                        return Err(e);
                    }
                    // Anything else is stale output from before the sync (a late
                    // reply, an answer to an earlier sync, garbage). Our answer
                    // starts with 0xFF, so skip to the next one.
                    _ => self.reader.decoder_mut().skip_to_delimiter(),
                }
            }
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => {
                self.in_sync = result.is_ok();
                result
            }
            Err(_) => Err(Error::Timeout {
                command: "guest-sync-delimited".into(),
                after: timeout,
                sent: true,
            }),
        }
    }

    async fn read_reply(&mut self, command: &str) -> Result<Value> {
        loop {
            let line = match self.reader.next().await {
                Some(line) => line?,
                None => {
                    return Err(Error::Closed {
                        reason: Some("the guest agent socket closed".into()),
                    });
                }
            };
            match Incoming::classify(parse_json(&line, DEFAULT_MAX_DEPTH)?)? {
                Incoming::Reply { result, .. } => {
                    return result.map_err(|e| Error::Qmp {
                        command: command.to_owned(),
                        class: e.class,
                        desc: e.desc,
                    });
                }
                other => tracing::debug!(?other, "guest agent output ignored"),
            }
        }
    }

    /// Runs a command by name, resyncing first if an earlier call timed out.
    pub async fn execute_raw(&mut self, name: &str, arguments: Value) -> Result<Value> {
        if !self.in_sync {
            self.sync(self.timeout).await?;
        }
        let mut message = serde_json::Map::new();
        message.insert("execute".into(), name.into());
        if !arguments.is_null() {
            message.insert("arguments".into(), arguments);
        }
        let mut line = serde_json::to_vec(&message).expect("JSON values serialize");
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        match tokio::time::timeout(self.timeout, self.read_reply(name)).await {
            Ok(result) => result,
            Err(_) => {
                self.in_sync = false;
                Err(Error::Timeout {
                    command: name.to_owned(),
                    after: self.timeout,
                    sent: true,
                })
            }
        }
    }

    /// Runs a typed guest-agent command from [`qapi::qga`].
    pub async fn execute<C: qapi::Command>(&mut self, command: C) -> Result<C::Ok> {
        let args = serde_json::to_value(&command).map_err(|source| Error::Decode {
            command: C::NAME.to_owned(),
            source,
        })?;
        let reply = self.execute_raw(C::NAME, args).await?;
        decode_reply(C::NAME, reply)
    }

    /// `guest-ping`.
    pub async fn ping(&mut self) -> Result<()> {
        self.execute_raw("guest-ping", Value::Null).await.map(drop)
    }

    /// `guest-fsfreeze-freeze`: returns how many filesystems were frozen. On
    /// error the agent thaws everything itself.
    pub async fn fsfreeze_freeze(&mut self) -> Result<u64> {
        let reply = self
            .execute_raw("guest-fsfreeze-freeze", Value::Null)
            .await?;
        decode_reply("guest-fsfreeze-freeze", reply)
    }

    /// `guest-fsfreeze-thaw`: returns how many filesystems were thawed.
    pub async fn fsfreeze_thaw(&mut self) -> Result<u64> {
        let reply = self.execute_raw("guest-fsfreeze-thaw", Value::Null).await?;
        decode_reply("guest-fsfreeze-thaw", reply)
    }

    /// `guest-fsfreeze-status`.
    pub async fn fsfreeze_status(&mut self) -> Result<FreezeStatus> {
        let reply = self
            .execute_raw("guest-fsfreeze-status", Value::Null)
            .await?;
        Ok(match reply.as_str() {
            Some("thawed") => FreezeStatus::Thawed,
            Some("frozen") => FreezeStatus::Frozen,
            _ => FreezeStatus::Other(reply.to_string()),
        })
    }
}

/// A sync id unlikely to match one an earlier client left in the stream.
fn seed() -> i64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    (i64::from(std::process::id()) << 20 ^ i64::from(nanos)) & 0x7fff_ffff
}
