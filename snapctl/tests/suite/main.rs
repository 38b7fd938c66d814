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
//! | [`cli`] | `init`, `create`, `list`, `show`, `chain`, `check`, `qemu-args`; refusals that change nothing |
//! | [`concurrency`] | several snapctl processes on one VM at once |
//! | [`dry_run`] | what runs is what `--dry-run` printed, step for step, live and offline |
//! | [`faults`] | snapctl or QEMU killed mid-operation, full filesystems; recovery on the next run |
//! | [`hostile`] | hand-edited records, hostile names, planted symlinks, permissions |
//! | [`jobs`] | `commit`, `pull`, `jobs`, `job` on a one-disk VM |
//! | [`relay`] | another shell while snapctl holds the monitor: the relay; a foreign client on it |
//! | [`store`] | the record store against real files: atomic saves, damage, locks |
//! | [`surgery`] | `revert` and `delete` on a two-disk VM |

mod cli;
mod concurrency;
mod dry_run;
mod faults;
mod hostile;
mod jobs;
mod relay;
mod store;
mod surgery;
mod util;
