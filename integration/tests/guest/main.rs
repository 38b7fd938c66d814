//! snapctl against a running Linux guest that keeps writing while it is
//! snapshotted, reverted and merged: one test binary whose `#[test]`s are
//! thin wrappers around the scenarios of [`snapshots`] and [`surgery`].
//!
//! Each scenario boots the test guest (`scripts/build-guest`, see
//! [`integration::guest`]) on a fresh qcow2 data disk with [`vm::GuestVm`].
//! The guest appends a checksummed, fsynced record to `records.log` about
//! every 100 ms and, with `snapguest.report_every=1`, announces every
//! durable record on its console. The scenarios run the `snapctl` command
//! against the VM's `snapctl.sock` monitor, watch QEMU through `admin.sock`
//! and the guest through its agent, and then verify the records and the
//! ext4 filesystem inside the images.
//!
//! Test names contain `guest`: nextest runs them one at a time (the
//! `qemu-guest` group in `.config/nextest.toml`); under plain `cargo test` a
//! lock in [`vm`] does the same.

mod backup;
mod restore_points;
mod snapshots;
mod surgery;
mod vm;

#[test]
fn guest_quiesced_snapshot_is_clean() {
    snapshots::quiesced_snapshot_is_clean();
}

#[test]
fn guest_crash_consistent_snapshot_recovers() {
    snapshots::crash_consistent_snapshot_recovers();
}

#[test]
fn guest_keeps_writing_after_snapshots() {
    snapshots::keeps_writing_after_snapshots();
}

#[test]
fn guest_revert_live_sees_exactly_the_snapshot() {
    surgery::revert_live_sees_exactly_the_snapshot();
}

#[test]
fn guest_active_commit_while_writing() {
    surgery::active_commit_while_writing();
}

#[test]
fn guest_delete_middle_snapshot_while_running() {
    surgery::delete_middle_snapshot_while_running();
}

#[test]
fn guest_checkpoint_revert_resumes_without_reboot() {
    restore_points::checkpoint_revert_resumes_without_reboot();
}

#[test]
fn guest_internal_snapshot_revert_resumes_without_reboot() {
    restore_points::internal_snapshot_revert_resumes_without_reboot();
}

#[test]
fn guest_checkpoint_delete_after_revert_removes_memory_file() {
    restore_points::checkpoint_delete_after_revert_removes_memory_file();
}

#[test]
fn guest_backup_while_writing_leaves_the_chain_as_it_was() {
    backup::backup_while_writing_leaves_the_chain_as_it_was();
}
