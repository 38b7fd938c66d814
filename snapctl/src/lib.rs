//! The snapshot engine behind the `snapctl` command: external disk-snapshot chains of
//! QEMU VMs, managed over QMP without libvirt.
//!
//! The pieces:
//!
//! - [`record`]: what snapctl knows about one VM — its disks, the layers of each disk's
//!   image tree, its snapshots and the operations in flight — and the model's invariants.
//! - [`store`]: where records live: one JSON file per VM, written atomically, one writer
//!   at a time behind a per-VM lock.
//! - [`names`]: which snapshot and VM names are accepted, and the QEMU node names and
//!   overlay file names derived from them.
//! - [`graph`]: QEMU's live block graph, per disk the chain of layers; [`images`]: the
//!   same from image headers, and overlay creation.
//! - [`plan`]: pure planners (record + live graph in, ordered steps out); `--dry-run`
//!   prints their steps. [`create`] runs a create plan against QEMU.
//! - [`views`]: snapshot lists, chains, `qemu-args`; [`check`]: drift between record,
//!   QEMU and headers.
//! - [`error`]: the one error type.
//!
//! The library never prints; the binary owns stdout and stderr.

pub mod check;
pub mod create;
pub mod delete;
pub mod error;
pub mod fault;
pub mod graph;
pub mod images;
pub mod merge;
pub mod names;
pub mod plan;
pub mod record;
pub mod recover;
pub mod revert;
pub mod store;
pub mod views;

pub use error::{Error, Result};
pub use record::{RECORD_VERSION, Record};
pub use store::{Store, VmLock};
