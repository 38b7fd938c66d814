//! Crash points for testing recovery. In debug builds, when the environment
//! variable `SNAPCTL_FAULT` names a point, the process kills itself there with
//! SIGKILL, exactly as a crash or `kill -9` would, leaving journal, files and
//! QEMU as they are at that instant. Release builds compile this to nothing.

/// Dies here when `SNAPCTL_FAULT` is `point` (debug builds only).
pub fn point(point: &str) {
    if cfg!(debug_assertions) && std::env::var("SNAPCTL_FAULT").is_ok_and(|p| p == point) {
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
