//! The `snapctl` command and its record store, end to end: one test binary,
//! one module per area, and the shared support in [`util`].
//!
//! Most tests start their own paused QEMU (TCG, no guest OS) in their own
//! work directory and run the real `snapctl` executable against it; every
//! failing run prints the command line, its exit status, stdout and stderr.
//! The tests that boot a real Linux guest live in the `integration` crate
//! (`integration/tests/guest/`); no test here has `guest` in its name, so
//! `.config/nextest.toml`'s `test(/guest/)` group does not serialize these.
//!
//! | module | covers |
//! |---|---|
//! | [`adopt`] | a chain changed outside snapctl: `check` remedies, `check --repair --adopt` |
//! | [`backup`] | `backup`: copies of every disk as of a temporary snapshot merged back; interrupted ones rolled back |
//! | [`bitmaps`] | persistent dirty bitmaps follow the active image through create, delete and revert |
//! | [`bookkeeping`] | `current`, `describe`, `rename`, `create --reuse-external` |
//! | [`checkpoints`] | `create --memory`: memory and disks reverted in the same QEMU, offline and after a crash |
//! | [`cli`] | `init`, `create`, `list`, `show`, `chain`, `check`, `qemu-args`; refusals that change nothing |
//! | [`clone`] | `clone` and `forget`: thin VMs on a template that never changes under them |
//! | [`concurrency`] | several snapctl processes on one VM at once |
//! | [`disks`] | which disks a snapshot covers (a `-device` without `id=`), one record per QEMU |
//! | [`dry_run`] | what runs is what `--dry-run` printed, step for step, live and offline |
//! | [`export`] | `export`: a standalone image of a disk as of a snapshot, live and offline |
//! | [`faults`] | snapctl or QEMU killed mid-operation, full filesystems; recovery on the next run |
//! | [`hostile`] | hand-edited records, hostile names, planted symlinks, permissions |
//! | [`restart`] | `qemu-args` keeps node options, device properties, and opens backing layers read-only (two QEMUs on one template) |
//! | [`offline`] | snapshots taken while QEMU is stopped, and QEMU restarted on them |
//! | [`internal`] | `create --internal`: savevm-style snapshots reverted in the same QEMU; merges never carry their images away |
//! | [`jobs`] | `commit`, `pull`, `jobs`, `job` on a one-disk VM |
//! | [`ownership`] | overlays owned like the images they cover; a QEMU running as another user |
//! | [`relay`] | another shell while snapctl holds the monitor: the relay; a foreign client on it |
//! | [`store`] | the record store against real files: atomic saves, damage, locks |
//! | [`surgery`] | `revert` and `delete` on a two-disk VM |
//! | [`usability`] | what people see: chain labels, `list`, usage and help, no-op `init`/`pull`, read-only commands, overlay names, unknown disks |

mod adopt;
mod backup;
mod bitmaps;
mod bookkeeping;
mod checkpoints;
mod cli;
mod clone;
mod concurrency;
mod disks;
mod dry_run;
mod export;
mod faults;
mod hostile;
mod internal;
mod jobs;
mod node_map;
mod offline;
mod ownership;
mod relay;
mod restart;
mod store;
mod surgery;
mod usability;
mod util;
