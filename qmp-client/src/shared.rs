//! What the client handles, the event subscriptions and the connection task
//! have in common: the [`Shared`] state, the [`Request`] a client hands to the
//! connection, and the [`Notice`] the connection broadcasts to subscribers.
//!
//! These types are the contract between [`crate::Client`], [`crate::Events`]
//! and [`crate::Connection`]. They live here, apart from all three, so that
//! each of those modules depends on this one and none depends on another:
//! the client and the connection meet only through a channel of requests and
//! this state, never by reaching into each other.

use std::os::fd::OwnedFd;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use serde_json::Value;
use tokio::sync::{AcquireError, OwnedSemaphorePermit, Semaphore, broadcast, oneshot};

use crate::error::{Endpoint, Result};
use crate::message::{Event, Greeting};

/// State shared by every client handle, subscriptions and the connection task.
#[derive(Debug)]
pub(crate) struct Shared {
    pub greeting: Greeting,
    pub endpoint: Endpoint,
    pub events: broadcast::Sender<Notice>,
    /// Set once, when the connection ends: `Some(reason)` (the reason itself
    /// is `None` for an orderly close).
    closed: OnceLock<Option<String>>,
    /// Limits how many commands are in flight at once.
    slots: Arc<Semaphore>,
    pub max_depth: usize,
    /// The process at the other end of a Unix socket, as the kernel says
    /// (`SO_PEERCRED`): set once, right after the handshake.
    pub peer_pid: OnceLock<u32>,
}

impl Shared {
    pub(crate) fn new(
        greeting: Greeting,
        endpoint: Endpoint,
        events: broadcast::Sender<Notice>,
        max_in_flight: usize,
        max_depth: usize,
    ) -> Shared {
        Shared {
            greeting,
            endpoint,
            events,
            closed: OnceLock::new(),
            slots: Arc::new(Semaphore::new(max_in_flight.max(1))),
            max_depth,
            peer_pid: OnceLock::new(),
        }
    }

    /// Waits for one of the in-flight slots; the command holds it until the
    /// permit is dropped (reply, timeout or the caller giving up).
    pub(crate) async fn acquire_slot(
        &self,
    ) -> std::result::Result<OwnedSemaphorePermit, AcquireError> {
        self.slots.clone().acquire_owned().await
    }

    /// `None` while connected; `Some(reason)` once closed.
    pub(crate) fn close_reason(&self) -> Option<Option<String>> {
        self.closed.get().cloned()
    }

    /// Records the end of the connection once and tells every subscriber.
    /// Returns the reason that was recorded (the first one wins).
    pub(crate) fn mark_closed(&self, reason: Option<String>) -> Option<String> {
        if self.closed.set(reason.clone()).is_ok() {
            let _ = self
                .events
                .send(Notice::Disconnected(reason.as_deref().map(Arc::from)));
        }
        self.closed.get().cloned().flatten()
    }
}

/// What travels through the broadcast channel.
#[derive(Debug, Clone)]
pub(crate) enum Notice {
    Event(Arc<Event>),
    Disconnected(Option<Arc<str>>),
}

/// A command on its way to the socket.
pub(crate) struct Request {
    pub command: String,
    /// The serialized command without its closing `}`: the connection appends
    /// `,"id":N}` and the newline once it has chosen the id.
    pub line: Vec<u8>,
    /// Descriptors sent with SCM_RIGHTS on the same write as `line`.
    pub fds: Vec<OwnedFd>,
    pub reply: oneshot::Sender<Result<Value>>,
    /// Receives the id the command was sent with (for the caller's trace span).
    pub span: tracing::Span,
    /// Tells "never sent" from "result unknown". Set by whichever comes first:
    /// the connection, just before it starts writing the line (a write once
    /// started is finished), or the caller when it times out. The connection
    /// does not write a command whose caller set it.
    pub sent: Arc<AtomicBool>,
}
