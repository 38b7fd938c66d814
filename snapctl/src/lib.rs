//! The snapshot engine behind the `snapctl` command: external disk-snapshot chains of
//! QEMU VMs, managed over QMP without libvirt.
//!
//! Start with [`Session`]: it opens one VM (its lock, its record, its QEMU when that
//! runs), plans operations and runs them.
//!
//! The pieces, bottom up:
//!
//! - [`error`]: the one error type, with distinct kinds (refused, drift, job failed,
//!   timed out, cut short, interrupted, QEMU gone).
//! - [`names`]: which snapshot and VM names are accepted, and the QEMU node names and
//!   overlay file names derived from them.
//! - [`operation`]: the operations as data (create, revert, delete, commit, pull), what
//!   the journal stores.
//! - [`record`]: what snapctl knows about one VM (disks, layers, snapshots, the journal),
//!   the model's invariants, and every change an operation makes to it.
//! - [`store`]: where records live: one JSON file per VM, written atomically, one writer
//!   at a time behind a per-VM lock.
//! - [`graph`]: QEMU's live block graph, per disk the chain of layers; [`images`]: the
//!   same from image headers, through `qemu-img`; [`qcow2`]: overlays written natively.
//! - [`plan`]: pure planners (record + facts in, typed operation and ordered steps out);
//!   `--dry-run` prints the steps.
//! - [`run`]: the [`Session`], and the one executor that carries out any plan's steps;
//!   recovery of interrupted operations; [`run::relay`], through which other snapctl
//!   processes reach QEMU's monitor while a session holds it.
//! - [`views`]: snapshot lists, chains, `qemu-args`; [`check`]: drift between record,
//!   QEMU and headers.
//!
//! The library never prints; the binary owns stdout and stderr.

pub mod check;
pub mod error;
pub mod fault;
pub mod graph;
pub mod images;
pub mod names;
pub mod operation;
pub mod plan;
pub mod qcow2;
pub mod record;
pub mod run;
pub mod store;
pub mod views;

pub use error::{Error, Result};
pub use plan::create::CreateOptions;
pub use plan::{Plan, Step};
pub use record::{RECORD_VERSION, Record};
pub use run::{Interrupt, Outcome, RunOptions, Session, SessionOptions};
pub use store::{Store, VmLock};
