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
//! greeting timeout: give each program its own `-qmp` monitor.
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
