//! The `snapctl` executable for end-to-end tests of this crate. Integration
//! tests of another package cannot use Cargo's `CARGO_BIN_EXE_snapctl`, so
//! the binary is found under `target/debug` and built when missing or older
//! than its sources.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::SystemTime;

use serde_json::Value;

/// The repository root.
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the integration crate lives inside the repository")
}

/// The `snapctl` executable, built if it is missing or older than its sources.
pub fn snapctl_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let built = repo_root().join("target/debug/snapctl");
        let built_at = built.metadata().and_then(|m| m.modified()).ok();
        let sources_at = newest_source();
        if built_at.is_some_and(|built_at| built_at >= sources_at) {
            return built;
        }
        build_snapctl()
    })
}

/// The newest modification time among the files `snapctl` is built from.
fn newest_source() -> SystemTime {
    fn walk(path: &Path, newest: &mut SystemTime) {
        let Ok(meta) = path.metadata() else { return };
        if let Ok(modified) = meta.modified() {
            *newest = (*newest).max(modified);
        }
        if meta.is_dir()
            && let Ok(entries) = std::fs::read_dir(path)
        {
            for entry in entries.flatten() {
                walk(&entry.path(), newest);
            }
        }
    }
    let root = repo_root();
    let mut newest = SystemTime::UNIX_EPOCH;
    for path in [
        "Cargo.toml",
        "Cargo.lock",
        "snapctl/Cargo.toml",
        "snapctl/build.rs",
        "snapctl/src",
        "qmp-client/Cargo.toml",
        "qmp-client/src",
    ] {
        walk(&root.join(path), &mut newest);
    }
    newest
}

/// `cargo build -p snapctl`; returns the executable Cargo reports.
fn build_snapctl() -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    eprintln!("building snapctl: cargo build -p snapctl");
    let output = Command::new(&cargo)
        .args([
            "build",
            "-p",
            "snapctl",
            "--bin",
            "snapctl",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(repo_root())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", cargo.to_string_lossy()));
    assert!(
        output.status.success(),
        "cargo build -p snapctl failed ({})",
        output.status
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|message| {
            message["reason"] == "compiler-artifact" && message["target"]["name"] == "snapctl"
        })
        .find_map(|message| message["executable"].as_str().map(PathBuf::from))
        .expect("cargo build -p snapctl reported no snapctl executable")
}
