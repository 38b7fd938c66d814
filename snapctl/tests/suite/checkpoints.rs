//! Checkpoints (`create --memory`): the guest's memory and device state with
//! its disks, reverted inside the same QEMU process.
