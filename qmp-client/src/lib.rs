//! An async client for QEMU's QMP monitor and guest agent, on tokio.
//!
//! # Example
//!
//! ```no_run
//! # async fn run() -> Result<(), qmp_client::Error> {
//! use qmp_client::Config;
//!
//! let (client, connection) = Config::new().connect_unix("/run/vm1/qmp.sock").await?;
//! // The connection owns the socket; run it in the background.
//! tokio::spawn(connection);
//!
//! let status = client.execute(qapi::qmp::query_status {}).await?;
//! println!("VM is {:?}", status.status);
//!
//! // Run a block job and wait for it: subscribing happens before the command is sent.
//! let mut job = client
//!     .start_job_raw("commit0", "block-commit", serde_json::json!({
//!         "job-id": "commit0", "device": "top", "top-node": "mid", "base-node": "base",
//!         "auto-dismiss": false,
//!     }))
//!     .await?;
//! job.finish(std::time::Duration::from_secs(600)).await?;
//! # Ok(()) }
//! ```
//!
//! A complete, runnable program that starts its own QEMU lives in
//! `examples/status.rs` (`cargo run -p qmp-client --example status`).
//!
//! # Behavior
//!
//! [`Config::connect_unix`] (or [`Config::connect_tcp`]) reads QEMU's greeting,
//! negotiates capabilities (enabling `oob` when offered) and returns a
//! [`Client`] and a [`Connection`]. The connection is a future that owns the
//! socket and must be spawned. The client is a cheap handle: clone it into as
//! many tasks as you like. When the connection ends (QEMU quits, the peer
//! breaks the protocol), every call in flight fails with [`Error::Closed`] and
//! every event subscriber receives a final [`EventItem::Disconnected`].
//!
//! QEMU serves one client per monitor; a second client's connect succeeds but
//! no greeting ever comes. That is reported as [`Error::NoGreeting`] after the
//! greeting timeout: give each program its own `-qmp` monitor. QEMU listens
//! with a backlog of 1, and connections that gave up waiting stay queued, so
//! a few attempts later the kernel refuses new ones (`EAGAIN`); the client
//! retries until the connect timeout (QEMU drains the queue once the monitor
//! is free) and then reports [`Error::QueueFull`]. [`Error::is_busy`] covers
//! both.
//!
//! # Pipelining
//!
//! Every command carries a unique `id` and replies are matched by id, so
//! several commands may be in flight at once (8 by default). Each call has a
//! timeout; a timed-out or dropped call frees only its own slot, and a reply
//! that arrives later is discarded. [`Error::Timeout`] says whether the
//! command was ever sent (if it was, QEMU may still carry it out).
//!
//! # Events and jobs
//!
//! [`Client::subscribe`] returns a bounded subscription. Subscribe before you
//! send a command whose event you wait for. [`Job`] follows QEMU's job state
//! machine through `JOB_STATUS_CHANGE`, with `complete`, `finalize`, `cancel`,
//! `dismiss`, progress and the job's error text.
//!
//! # Robustness
//!
//! Lines longer than the configured maximum, documents nested too deeply and
//! malformed JSON end the connection with an error; they never panic or grow
//! memory without bound. Unknown events, fields and enum values are passed
//! through as JSON and never break the connection.

mod client;
mod codec;
mod connect;
mod connection;
mod error;
mod events;
mod jobs;
mod message;
mod qga;
mod shared;
mod socket;

pub use client::{AddFdInfo, Client};
pub use codec::{DEFAULT_MAX_DEPTH, DEFAULT_MAX_LINE};
pub use connect::{Config, connect_unix};
pub use connection::Connection;
pub use error::{Endpoint, Error, Result};
pub use events::{EventItem, Events};
pub use jobs::{Job, JobInfo, JobStatus};
pub use message::{Event, Greeting, Version};
pub use qga::{FreezeStatus, GuestAgent};

pub use qapi;

/// Runs `bytes` through everything the client does with a peer's bytes before
/// typed decoding: line framing (fed whole and in small pieces, which must
/// agree), the JSON parse with its depth limit, greeting parsing and message
/// classification. Panics only on a broken invariant. For fuzzing; not part of
/// the API.
#[doc(hidden)]
pub fn fuzz_decode(bytes: &[u8]) {
    use tokio_util::codec::Decoder;
    const MAX_LINE: usize = 4096;
    const MAX_DEPTH: usize = 64;
    let (mode, input) = bytes.split_first().map_or((0, bytes), |(m, r)| (*m, r));
    let frames = |chunk: usize| {
        let mut codec = codec::LineCodec::new(MAX_LINE);
        if mode & 1 == 1 {
            codec.skip_to_delimiter();
        }
        let mut buf = bytes::BytesMut::new();
        let mut out = Vec::new();
        for piece in input.chunks(chunk.max(1)) {
            buf.extend_from_slice(piece);
            loop {
                match codec.decode(&mut buf) {
                    Ok(Some(line)) => out.push(Ok(line.to_vec())),
                    Ok(None) => break,
                    Err(e) => {
                        out.push(Err(e.to_string()));
                        return out;
                    }
                }
            }
        }
        match codec.decode_eof(&mut buf) {
            Ok(Some(line)) => out.push(Ok(line.to_vec())),
            Ok(None) => {}
            Err(e) => out.push(Err(e.to_string())),
        }
        out
    };
    let whole = frames(input.len());
    assert_eq!(
        whole,
        frames(usize::from(mode >> 1) + 1),
        "framing depends on chunking"
    );
    for line in whole.into_iter().filter_map(Result::ok) {
        assert!(line.len() <= MAX_LINE && !line.contains(&b'\n'));
        let Ok(value) = codec::parse_json(&line, MAX_DEPTH) else {
            continue;
        };
        let _ = message::Greeting::parse(&value);
        let _ = message::Incoming::classify(value);
    }
}
