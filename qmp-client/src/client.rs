//! The cheap, clonable handle through which commands are sent.
//!
//! A [`Client`] never touches the socket: it serializes a command into a
//! [`Request`] and hands it to the connection task over a channel, then waits
//! for the reply. Everything it shares with that task (the in-flight slots,
//! the closed flag, the event sender) is in [`Shared`], so this module does
//! not depend on [`crate::connection`].

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};
use tracing::Instrument;

use crate::error::{Endpoint, Error, Result};
use crate::events::Events;
use crate::message::{Greeting, decode_reply};
use crate::shared::{Request, Shared};

/// A handle to a QMP connection. Clone it freely: clones share the connection.
///
/// Calls may run concurrently from many tasks; up to the configured limit
/// (8 by default) are in flight at once, the rest wait for a slot. Each call
/// has a timeout (the [`crate::Config`] default, or [`Client::with_timeout`]);
/// a call that times out or is dropped frees only its own slot, and a reply
/// that arrives later is discarded.
#[derive(Debug, Clone)]
pub struct Client {
    requests: mpsc::Sender<Request>,
    pub(crate) shared: Arc<Shared>,
    timeout: Option<Duration>,
}

/// The result of `add-fd`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct AddFdInfo {
    /// The fd set the descriptor was added to.
    #[serde(rename = "fdset-id")]
    pub fdset_id: u64,
    /// The descriptor's number inside QEMU (use as `/dev/fdset/<fdset_id>`).
    pub fd: i64,
}

impl Client {
    pub(crate) fn new(
        requests: mpsc::Sender<Request>,
        shared: Arc<Shared>,
        timeout: Option<Duration>,
    ) -> Client {
        Client {
            requests,
            shared,
            timeout,
        }
    }

    /// What QEMU said when we connected (version, capabilities).
    pub fn greeting(&self) -> &Greeting {
        &self.shared.greeting
    }

    /// The process at the other end of a Unix socket (the kernel's
    /// `SO_PEERCRED`): QEMU's pid, unless something relays its monitor.
    /// `None` over TCP or when the kernel cannot say (the peer is in another
    /// PID namespace).
    pub fn peer_pid(&self) -> Option<u32> {
        self.shared.peer_pid.get().copied()
    }

    /// The socket this client talks to.
    pub fn endpoint(&self) -> &Endpoint {
        &self.shared.endpoint
    }

    /// True once the connection has ended; every further call fails with
    /// [`Error::Closed`].
    pub fn is_closed(&self) -> bool {
        self.shared.close_reason().is_some() || self.requests.is_closed()
    }

    /// A handle to the same connection whose calls time out after `timeout`
    /// (`None`: wait forever).
    pub fn with_timeout(&self, timeout: Option<Duration>) -> Client {
        Client {
            timeout,
            ..self.clone()
        }
    }

    /// The timeout this handle's calls use.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout
    }

    /// Subscribes to events. Subscribe *before* sending a command whose event
    /// you will wait for.
    pub fn subscribe(&self) -> Events {
        Events::new(self.shared.clone())
    }

    /// Runs a typed command from the [`qapi`] crate, e.g. `qapi::qmp::query_status {}`.
    ///
    /// A reply that does not fit the typed return value (a field or enum value
    /// from a newer QEMU) fails this call with [`Error::Decode`], never the
    /// connection; use [`Client::execute_raw`] to see the reply as JSON.
    pub async fn execute<C: qapi::Command>(&self, command: C) -> Result<C::Ok> {
        let value = self.call(C::NAME, &command, Vec::new()).await?;
        decode_reply(C::NAME, value)
    }

    /// Runs any command by name with JSON arguments (`Value::Null` for none).
    pub async fn execute_raw(&self, name: &str, arguments: Value) -> Result<Value> {
        self.call(name, &arguments, Vec::new()).await
    }

    /// Runs a command and sends `fds` with it (SCM_RIGHTS on the same write),
    /// as `getfd` and `add-fd` require. Unix sockets only.
    pub async fn execute_with_fds(
        &self,
        name: &str,
        arguments: Value,
        fds: Vec<OwnedFd>,
    ) -> Result<Value> {
        if !matches!(self.shared.endpoint, Endpoint::Unix(_)) && !fds.is_empty() {
            return Err(Error::FdPassingUnsupported);
        }
        self.call(name, &arguments, fds).await
    }

    /// `getfd`: hands QEMU a copy of `fd` under `fdname` (for `-netdev`,
    /// `chardev-add`, ...). The caller keeps its own descriptor.
    pub async fn getfd(&self, fdname: &str, fd: BorrowedFd<'_>) -> Result<()> {
        let copy = fd.try_clone_to_owned().map_err(Error::Io)?;
        self.execute_with_fds("getfd", json!({ "fdname": fdname }), vec![copy])
            .await
            .map(drop)
    }

    /// `add-fd`: adds a copy of `fd` to an fd set (a new one when `fdset_id` is
    /// `None`), so block nodes can open `/dev/fdset/N`.
    pub async fn add_fd(
        &self,
        fd: impl AsFd,
        fdset_id: Option<u64>,
        opaque: Option<&str>,
    ) -> Result<AddFdInfo> {
        let copy = fd.as_fd().try_clone_to_owned().map_err(Error::Io)?;
        let mut args = serde_json::Map::new();
        if let Some(id) = fdset_id {
            args.insert("fdset-id".into(), id.into());
        }
        if let Some(opaque) = opaque {
            args.insert("opaque".into(), opaque.into());
        }
        let reply = self
            .execute_with_fds("add-fd", Value::Object(args), vec![copy])
            .await?;
        decode_reply("add-fd", reply)
    }

    /// Runs an HMP command line through `human-monitor-command` and returns its
    /// text output (some commands, like `qemu-io`, print to QEMU's stdout instead).
    ///
    /// HMP reports its own failures as text, not as QMP errors: a failed HMP
    /// command still returns `Ok` with output such as `"Error: …"`; check it.
    pub async fn hmp(&self, command_line: &str) -> Result<String> {
        let reply = self
            .execute_raw(
                "human-monitor-command",
                json!({ "command-line": command_line }),
            )
            .await?;
        decode_reply("human-monitor-command", reply)
    }

    async fn call(
        &self,
        name: &str,
        arguments: &impl Serialize,
        fds: Vec<OwnedFd>,
    ) -> Result<Value> {
        let sent = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let span = tracing::debug_span!("qmp", command = name, id = tracing::field::Empty);
        let line = request_line(name, arguments).map_err(|source| Error::Decode {
            command: name.to_owned(),
            source,
        })?;
        let exchange = self.exchange(name, line, fds, sent.clone(), span.clone());
        let result = match self.timeout {
            Some(limit) => match tokio::time::timeout(limit, exchange)
                .instrument(span.clone())
                .await
            {
                Ok(result) => result,
                Err(_) => Err(Error::Timeout {
                    command: name.to_owned(),
                    after: limit,
                    // Claims the command if the connection has not yet: it
                    // then never writes it, so "never sent" stays true.
                    sent: sent.swap(true, Ordering::AcqRel),
                }),
            },
            None => exchange.instrument(span.clone()).await,
        };
        span.in_scope(|| {
            let latency_us = started.elapsed().as_micros() as u64;
            match &result {
                Ok(_) => tracing::debug!(latency_us, "ok"),
                Err(e) => tracing::debug!(latency_us, error = %e, "failed"),
            }
        });
        result
    }

    async fn exchange(
        &self,
        name: &str,
        line: Vec<u8>,
        fds: Vec<OwnedFd>,
        sent: Arc<AtomicBool>,
        span: tracing::Span,
    ) -> Result<Value> {
        let closed = || Error::Closed {
            reason: self.shared.close_reason().flatten(),
        };
        let _slot = self.shared.acquire_slot().await.map_err(|_| closed())?;
        let (reply, result) = oneshot::channel();
        let request = Request {
            command: name.to_owned(),
            line,
            fds,
            reply,
            span,
            sent,
        };
        self.requests.send(request).await.map_err(|_| closed())?;
        result.await.map_err(|_| closed())?
    }
}

/// The request for command `name` without its closing brace (the connection
/// appends the id and the brace): `{"execute":"NAME","arguments":{...}`.
///
/// The arguments are serialized straight into the line, with no intermediate
/// [`Value`]. Arguments that come out as `{}` or `null` are left out: QEMU
/// treats a missing `arguments` like `{}`, and every byte left out saves QEMU
/// time, as its monitor reads requests one byte at a time.
fn request_line(name: &str, arguments: &impl Serialize) -> serde_json::Result<Vec<u8>> {
    let mut line = Vec::with_capacity(64);
    line.extend_from_slice(b"{\"execute\":");
    serde_json::to_writer(&mut line, name)?;
    let bare = line.len();
    line.extend_from_slice(b",\"arguments\":");
    let start = line.len();
    serde_json::to_writer(&mut line, arguments)?;
    if matches!(&line[start..], b"{}" | b"null") {
        line.truncate(bare);
    }
    Ok(line)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(name: &str, arguments: &impl Serialize) -> String {
        String::from_utf8(request_line(name, arguments).unwrap()).unwrap()
    }

    #[test]
    fn empty_arguments_are_left_out() {
        assert_eq!(line("stop", &Value::Null), r#"{"execute":"stop""#);
        assert_eq!(line("stop", &json!({})), r#"{"execute":"stop""#);
        assert_eq!(
            line("query-status", &qapi::qmp::query_status {}),
            r#"{"execute":"query-status""#
        );
    }

    #[test]
    fn arguments_are_serialized_in_place() {
        assert_eq!(
            line("getfd", &json!({ "fdname": "a\"b" })),
            r#"{"execute":"getfd","arguments":{"fdname":"a\"b"}"#
        );
        assert_eq!(
            line(
                "query-named-block-nodes",
                &qapi::qmp::query_named_block_nodes { flat: Some(true) }
            ),
            r#"{"execute":"query-named-block-nodes","arguments":{"flat":true}"#
        );
        assert_eq!(
            line("odd\"name", &json!([])),
            r#"{"execute":"odd\"name","arguments":[]"#
        );
    }
}
