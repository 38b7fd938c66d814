//! Harness for end-to-end tests with real QEMU processes.
