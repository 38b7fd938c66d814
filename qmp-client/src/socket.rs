//! The QMP Unix socket, registered with the runtime for readability only.
//!
//! A `tokio::net::UnixStream` is registered for reading and writing at once,
//! edge-triggered. A Unix socket signals "writable" again whenever the peer
//! has consumed what was written, so every request QEMU reads wakes the
//! runtime once more, in the middle of QEMU's work, for a readiness nobody
//! waits for: one more context switch and `epoll_wait` per call on the
//! client's side, and the cost of that wake-up charged to QEMU's monitor
//! thread, which is doing the read. Requests are small and the socket buffer
//! is large, so a write almost never has to wait. This socket therefore
//! registers the descriptor for readability alone, writes without asking
//! first, and only when a write would block registers a duplicate of the
//! descriptor for writability, for as long as that wait lasts.

use std::io::{self, IoSlice, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use nix::sys::socket::{ControlMessage, MsgFlags, send, sendmsg};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, Interest, ReadBuf};
use tokio::net::UnixStream;

/// Splits a connected stream into halves that share one registration.
pub(crate) fn split(stream: UnixStream) -> io::Result<(ReadHalf, WriteHalf)> {
    let stream = stream.into_std()?;
    stream.set_nonblocking(true)?;
    let fd = Arc::new(register(stream, Interest::READABLE)?);
    Ok((ReadHalf(fd.clone()), WriteHalf(fd)))
}

/// Registers `stream` with the runtime for `interest` alone (tokio's safe
/// constructor for that is deprecated in favour of this unsafe one).
#[allow(unsafe_code)]
fn register(stream: StdUnixStream, interest: Interest) -> io::Result<AsyncFd<StdUnixStream>> {
    // SAFETY: the `AsyncFd` owns `stream`, which owns its descriptor: it stays
    // open, and `as_raw_fd` returns the same one, until the `AsyncFd` is dropped.
    unsafe { AsyncFd::register_with_interest(stream, interest) }.map_err(io::Error::from)
}

/// The most one read asks for.
const MAX_READ: usize = 64 << 10;

/// Reads from the socket as the runtime reports it readable.
#[derive(Debug)]
pub(crate) struct ReadHalf(Arc<AsyncFd<StdUnixStream>>);

impl AsyncRead for ReadHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.0.poll_read_ready(cx))?;
            // Reading into the buffer means zeroing it first (without unsafe
            // code); a bounded read keeps that cost small when the buffer
            // has grown large for a big reply.
            let unfilled = buf.initialize_unfilled_to(buf.remaining().min(MAX_READ));
            let wanted = unfilled.len();
            match guard.try_io(|fd| {
                let mut stream = fd.get_ref();
                stream.read(unfilled)
            }) {
                Ok(Ok(n)) => {
                    // A short read emptied the socket: the next byte to arrive
                    // raises a new edge, so forget the readiness now rather
                    // than learn it from one more read failing with EAGAIN
                    // (what tokio's own streams do too).
                    if n > 0 && n < wanted {
                        guard.clear_ready();
                    }
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

/// Writes to the socket, waiting for room only when a write would block.
#[derive(Debug)]
pub(crate) struct WriteHalf(Arc<AsyncFd<StdUnixStream>>);

impl WriteHalf {
    /// Writes all of `data`, the first bytes together with `fds` (SCM_RIGHTS)
    /// when there are any.
    pub(crate) async fn write_all(&self, mut data: &[u8], fds: &[RawFd]) -> io::Result<()> {
        let mut fds = fds;
        while !data.is_empty() || !fds.is_empty() {
            let socket = self.0.as_raw_fd();
            let written = if fds.is_empty() {
                send(socket, data, MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
            } else {
                send_with_fds(socket, data, fds)
            };
            match written {
                Ok(0) if !data.is_empty() => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    data = &data[n..];
                    fds = &[];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Waits until the socket has room, through a duplicate descriptor
    /// registered for writability (the shared one is registered for reading
    /// only). Registering reports the current state, so no wake-up is lost.
    async fn writable(&self) -> io::Result<()> {
        let dup = register(self.0.get_ref().try_clone()?, Interest::WRITABLE)?;
        dup.writable().await.map(drop)
    }
}

/// One `sendmsg` carrying the descriptors with the first bytes of `data`.
fn send_with_fds(socket: RawFd, data: &[u8], fds: &[RawFd]) -> io::Result<usize> {
    let iov = [IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    sendmsg::<()>(socket, &iov, &cmsg, MsgFlags::MSG_NOSIGNAL, None).map_err(io::Error::from)
}
