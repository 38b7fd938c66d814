//! The crate's one error type.

use std::{fmt, io, path::PathBuf, time::Duration};

/// Where a client connects: kept in errors so a message names the socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix domain socket (`-qmp unix:PATH,server=on,wait=off`).
    Unix(PathBuf),
    /// A TCP address (`-qmp tcp:HOST:PORT,server=on,wait=off`).
    Tcp(String),
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix(path) => write!(f, "{}", path.display()),
            Endpoint::Tcp(addr) => write!(f, "tcp:{addr}"),
        }
    }
}

/// Everything that can go wrong talking to QEMU.
///
/// Match on the variant when the distinction matters, or use the predicates
/// ([`Error::is_closed`], [`Error::is_timeout`], [`Error::result_unknown`],
/// [`Error::qmp_class`]), which stay stable when variants are added.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The socket could not be reached at all (missing path, refused, ...).
    #[error("cannot connect to {endpoint}: {source}")]
    Connect {
        endpoint: Endpoint,
        #[source]
        source: io::Error,
    },
    /// `connect()` itself did not finish in time.
    #[error("connecting to {endpoint} timed out after {after:?}")]
    ConnectTimeout { endpoint: Endpoint, after: Duration },
    /// The socket accepted but no greeting came. QEMU serves one client per
    /// monitor and parks further clients in the listen backlog, so this almost
    /// always means another client holds the monitor.
    #[error(
        "{endpoint} accepted the connection but sent no QMP greeting within {after:?}: \
         another client probably holds this monitor (QEMU serves one client per monitor; \
         add a second -qmp)"
    )]
    NoGreeting { endpoint: Endpoint, after: Duration },
    /// `connect()` kept failing with `EAGAIN` for `after`: the Unix socket's
    /// queue of connections waiting to be accepted is full. QEMU listens on a
    /// monitor with a backlog of 1 and accepts nobody while a client holds it;
    /// every earlier attempt that gave up waiting for a greeting stays in that
    /// queue, so after two of them the kernel refuses new connections at once.
    /// Another client holds this monitor.
    #[error(
        "{endpoint} accepted no connection within {after:?}: another client holds this \
         monitor and earlier attempts still wait in its queue (QEMU serves one client per \
         monitor; add a second -qmp)"
    )]
    QueueFull { endpoint: Endpoint, after: Duration },
    /// The peer spoke, but not QMP (an HMP monitor, a serial console, ...).
    #[error("{endpoint} is not a QMP monitor: {detail}")]
    NotQmp { endpoint: Endpoint, detail: String },
    /// QEMU answered the command with an error.
    #[error("{command}: {desc}")]
    Qmp {
        command: String,
        /// QEMU's error class, e.g. `GenericError`, `DeviceNotFound`.
        class: String,
        /// QEMU's message, verbatim.
        desc: String,
    },
    /// No reply in time. `sent` tells whether the command reached the socket:
    /// if it did, QEMU may still carry it out, so the result is unknown.
    #[error("{command} timed out after {after:?}: {}", if *sent { "sent, result unknown" } else { "never sent" })]
    Timeout {
        command: String,
        after: Duration,
        sent: bool,
    },
    /// The connection is gone. Commands in flight have an unknown result.
    #[error("QMP connection closed{}", reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default())]
    Closed { reason: Option<String> },
    /// Waiting for an event or a state ran out of time.
    #[error("timed out after {after:?} waiting for {what}")]
    WaitTimeout { what: String, after: Duration },
    /// An event subscriber fell behind and `missed` events were dropped for it;
    /// whatever it was waiting for may be among them, so re-read state.
    #[error("event subscriber lagged and missed {missed} events")]
    Lagged { missed: u64 },
    /// A line from the peer exceeded the configured limit.
    #[error("peer sent a line longer than {limit} bytes")]
    LineTooLong { limit: usize },
    /// The peer broke the protocol (malformed JSON, a message of no known shape...).
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A reply arrived but did not match the typed command's return type.
    #[error("{command}: cannot decode the reply: {source}")]
    Decode {
        command: String,
        #[source]
        source: serde_json::Error,
    },
    /// A block job ended in a way the caller did not ask for.
    #[error("job {id}: {message}")]
    Job { id: String, message: String },
    /// File-descriptor passing needs a Unix socket.
    #[error("file descriptors can only be passed over a Unix socket")]
    FdPassingUnsupported,
    /// Socket I/O failed after the connection was established.
    #[error("QMP socket I/O: {0}")]
    Io(#[from] io::Error),
}

impl Error {
    /// The connection is gone (or went away during the call).
    pub fn is_closed(&self) -> bool {
        matches!(self, Error::Closed { .. })
    }

    /// The call ran out of time.
    pub fn is_timeout(&self) -> bool {
        matches!(
            self,
            Error::Timeout { .. }
                | Error::WaitTimeout { .. }
                | Error::ConnectTimeout { .. }
                | Error::NoGreeting { .. }
                | Error::QueueFull { .. }
        )
    }

    /// Another client probably holds the monitor: no greeting came, or the
    /// socket's queue of waiting connections is full.
    pub fn is_busy(&self) -> bool {
        matches!(self, Error::NoGreeting { .. } | Error::QueueFull { .. })
    }

    /// QEMU may or may not have executed the command: it was sent and then the
    /// call timed out or the connection died. Re-read state; never blindly retry.
    pub fn result_unknown(&self) -> bool {
        matches!(
            self,
            Error::Timeout { sent: true, .. } | Error::Closed { .. }
        )
    }

    /// QEMU's error class when QEMU itself rejected the command.
    pub fn qmp_class(&self) -> Option<&str> {
        match self {
            Error::Qmp { class, .. } => Some(class),
            _ => None,
        }
    }

    /// QEMU's error message when QEMU itself rejected the command.
    pub fn qmp_desc(&self) -> Option<&str> {
        match self {
            Error::Qmp { desc, .. } => Some(desc),
            _ => None,
        }
    }
}

/// `Result` with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
