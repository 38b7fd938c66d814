//! The task that owns the socket.
//!
//! [`Connection`] is a future: it reads lines, routes replies to the callers
//! waiting on them by `id`, fans events out to subscribers, and writes
//! commands (with their file descriptors) as clients submit them. It ends when
//! QEMU closes the socket, when the peer breaks the protocol, or when every
//! [`crate::Client`] is gone. However it ends, every call in flight fails with
//! [`Error::Closed`] and every subscriber gets a final disconnect.
//!
//! It knows the clients only through the [`Request`]s they submit and the
//! [`Shared`] state, not through [`crate::client`] or [`crate::events`].

use std::collections::HashMap;
use std::future::Future;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};

use futures_util::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWriteExt};
use tokio::net::tcp;
use tokio::sync::{mpsc, oneshot};
use tokio_util::codec::FramedRead;

use crate::codec::{LineCodec, parse_json};
use crate::error::{Error, Result};
use crate::message::Incoming;
use crate::shared::{Notice, Request, Shared};
use crate::socket;

/// Commands sent and not answered (including those whose callers gave up)
/// beyond which QEMU is taken to have stopped answering.
const MAX_UNANSWERED: usize = 4096;

struct Pending {
    command: String,
    reply: oneshot::Sender<Result<Value>>,
}

pub(crate) type Reader = FramedRead<Box<dyn AsyncRead + Send + Unpin>, LineCodec>;

/// The write side of the socket.
#[derive(Debug)]
pub(crate) enum Writer {
    Unix(socket::WriteHalf),
    Tcp(tcp::OwnedWriteHalf),
}

impl Writer {
    pub(crate) async fn write_line(&mut self, line: &[u8], fds: &[OwnedFd]) -> Result<()> {
        match self {
            Writer::Unix(w) => {
                let raw: Vec<RawFd> = fds.iter().map(AsRawFd::as_raw_fd).collect();
                w.write_all(line, &raw).await?;
            }
            Writer::Tcp(_) if !fds.is_empty() => return Err(Error::FdPassingUnsupported),
            Writer::Tcp(w) => w.write_all(line).await?,
        }
        Ok(())
    }
}

/// The future that drives a QMP connection. Spawn it (`tokio::spawn(connection)`);
/// nothing is sent or received while it is not polled.
#[must_use = "the connection does nothing unless it is polled or spawned"]
pub struct Connection {
    inner: Pin<Box<dyn Future<Output = Result<()>> + Send>>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection").finish_non_exhaustive()
    }
}

impl Future for Connection {
    type Output = Result<()>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        self.inner.as_mut().poll(cx)
    }
}

impl Connection {
    pub(crate) fn new(
        reader: Reader,
        writer: Writer,
        requests: mpsc::Receiver<Request>,
        shared: Arc<Shared>,
    ) -> Connection {
        let driver = Driver {
            reader,
            writer,
            requests,
            pending: HashMap::new(),
            shared,
        };
        Connection {
            inner: Box::pin(driver.run()),
        }
    }
}

struct Driver {
    reader: Reader,
    writer: Writer,
    requests: mpsc::Receiver<Request>,
    pending: HashMap<u64, Pending>,
    shared: Arc<Shared>,
}

impl Driver {
    async fn run(mut self) -> Result<()> {
        let result = self.serve().await;
        let reason = match &result {
            Ok(()) => None,
            Err(e) => Some(e.to_string()),
        };
        self.shut_down(reason);
        result
    }

    async fn serve(&mut self) -> Result<()> {
        loop {
            tokio::select! {
                // Read first: replies free slots and let waiting callers finish.
                biased;
                frame = self.reader.next() => match frame {
                    None => {
                        tracing::debug!("QEMU closed the QMP connection");
                        return Ok(());
                    }
                    Some(Err(e)) => return Err(e),
                    Some(Ok(line)) => self.dispatch(&line)?,
                },
                request = self.requests.recv() => match request {
                    Some(request) => self.send(request).await?,
                    None => {
                        tracing::debug!("every client dropped; closing the QMP connection");
                        return Ok(());
                    }
                },
            }
        }
    }

    fn dispatch(&mut self, line: &[u8]) -> Result<()> {
        let value = parse_json(line, self.shared.max_depth)?;
        match Incoming::classify(value)? {
            Incoming::Reply { id, result } => {
                let Some(id) = id.as_ref().and_then(Value::as_u64) else {
                    tracing::warn!(?id, ?result, "QMP reply without a known id ignored");
                    return Ok(());
                };
                match self.pending.remove(&id) {
                    Some(Pending { command, reply }) => {
                        let result = result.map_err(|e| Error::Qmp {
                            command,
                            class: e.class,
                            desc: e.desc,
                        });
                        // The caller may have given up (timeout, drop): discard then.
                        let _ = reply.send(result);
                    }
                    None => tracing::debug!(id, "late reply discarded"),
                }
            }
            Incoming::Event(event) => {
                tracing::trace!(event = %event.name, "QMP event");
                // No subscriber is not an error.
                let _ = self.shared.events.send(Notice::Event(Arc::new(event)));
            }
            Incoming::Unknown(value) => {
                tracing::debug!(%value, "QMP message of unknown shape ignored");
            }
        }
        Ok(())
    }

    async fn send(&mut self, request: Request) -> Result<()> {
        if request.reply.is_closed() || request.sent.swap(true, Ordering::AcqRel) {
            // The caller gave up before the command reached the socket: it is
            // never sent, which is what the caller's "never sent" error said.
            return Ok(());
        }
        // Ids are the smallest not in use. QEMU reads its monitor one byte at a
        // time, so a short id makes every round trip measurably faster. Calls
        // whose callers gave up stay in `pending` until QEMU answers them, so
        // their ids are not reused and their late replies are discarded.
        if self.pending.len() >= MAX_UNANSWERED {
            return Err(Error::Protocol(format!(
                "QEMU left {MAX_UNANSWERED} commands unanswered"
            )));
        }
        let id = (1..)
            .find(|id| !self.pending.contains_key(id))
            .expect("fewer than u64::MAX commands are pending");
        request.span.record("id", id);
        let mut line = request.line;
        push_id(&mut line, id);
        self.writer.write_line(&line, &request.fds).await?;
        self.pending.insert(
            id,
            Pending {
                command: request.command,
                reply: request.reply,
            },
        );
        Ok(())
    }

    fn shut_down(&mut self, reason: Option<String>) {
        let reason = self.shared.mark_closed(reason);
        for (_, pending) in self.pending.drain() {
            let _ = pending.reply.send(Err(Error::Closed {
                reason: reason.clone(),
            }));
        }
        // Callers still queued get a "closed" error when their sender is dropped.
        self.requests.close();
    }
}

/// Appends `,"id":ID}` and the newline to a request line, writing the digits
/// directly rather than through the formatting machinery: it runs for every
/// command.
fn push_id(line: &mut Vec<u8>, id: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    let mut rest = id;
    loop {
        at -= 1;
        digits[at] = b'0' + (rest % 10) as u8;
        rest /= 10;
        if rest == 0 {
            break;
        }
    }
    line.extend_from_slice(b",\"id\":");
    line.extend_from_slice(&digits[at..]);
    line.extend_from_slice(b"}\n");
}

impl Drop for Driver {
    fn drop(&mut self) {
        // The future was dropped before finishing (runtime shutdown, abort):
        // subscribers must still see a disconnect.
        if self.shared.close_reason().is_none() {
            self.shut_down(Some("connection task dropped".into()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::push_id;

    #[test]
    fn ids_are_written_in_decimal() {
        for id in [0, 1, 9, 10, 99, 4096, u64::MAX] {
            let mut line = b"{\"execute\":\"stop\"".to_vec();
            push_id(&mut line, id);
            assert_eq!(
                line,
                format!("{{\"execute\":\"stop\",\"id\":{id}}}\n").into_bytes()
            );
        }
    }
}
