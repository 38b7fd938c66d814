//! The `snapctl` executable for end-to-end tests of this crate. Integration
//! tests of another package cannot use Cargo's `CARGO_BIN_EXE_snapctl`, so
//! the binary is found under `target/debug` and built when missing or older
//! than its sources.

use std::cell::Cell;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;

use crate::wait_until;

/// How long one snapctl command may take in a test.
const SNAPCTL_TIMEOUT: Duration = Duration::from_secs(60);

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

/// Runs the `snapctl` binary with `--state-dir`, `--vm` and `--socket` set,
/// its output in numbered files in the work directory.
#[derive(Debug)]
pub struct Snapctl {
    bin: PathBuf,
    state_dir: PathBuf,
    vm: String,
    socket: PathBuf,
    log_dir: PathBuf,
    runs: Cell<u32>,
}

impl Snapctl {
    /// A runner for VM `vm` of the state directory `state_dir` on the QMP
    /// socket `socket`; each run's output goes to files in `log_dir`.
    pub fn new(
        bin: &Path,
        state_dir: impl Into<PathBuf>,
        vm: &str,
        socket: impl Into<PathBuf>,
        log_dir: impl Into<PathBuf>,
    ) -> Snapctl {
        Snapctl {
            bin: bin.to_owned(),
            state_dir: state_dir.into(),
            vm: vm.to_owned(),
            socket: socket.into(),
            log_dir: log_dir.into(),
            runs: Cell::new(0),
        }
    }

    /// Runs `snapctl <args>`; panics, with everything it printed, unless it
    /// exits 0 within a minute. Returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let n = self.runs.get() + 1;
        self.runs.set(n);
        let stdout_path = self.log_dir.join(format!("snapctl-{n}.stdout"));
        let stderr_path = self.log_dir.join(format!("snapctl-{n}.stderr"));
        let line = format!("snapctl {}", args.join(" "));
        let mut command = Command::new(&self.bin);
        for var in [
            "SNAPCTL_VM",
            "SNAPCTL_SOCKET",
            "SNAPCTL_QGA",
            "SNAPCTL_STATE_DIR",
            "SNAPCTL_LOG",
        ] {
            command.env_remove(var);
        }
        command
            .arg("--state-dir")
            .arg(&self.state_dir)
            .arg("--vm")
            .arg(&self.vm)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path).expect("create snapctl's stdout file"))
            .stderr(File::create(&stderr_path).expect("create snapctl's stderr file"));
        let started = Instant::now();
        let mut child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", self.bin.display()));
        let mut status = None;
        wait_until(SNAPCTL_TIMEOUT, || {
            status = child.try_wait().expect("wait for snapctl");
            status.is_some()
        });
        let elapsed = started.elapsed();
        let read = |path: &Path| {
            String::from_utf8_lossy(&std::fs::read(path).unwrap_or_default()).into_owned()
        };
        let problem = match status {
            Some(status) if status.success() => None,
            Some(status) => Some(format!("failed ({status})")),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                Some(format!("did not finish within {SNAPCTL_TIMEOUT:?}"))
            }
        };
        let stdout = read(&stdout_path);
        if let Some(problem) = problem {
            panic!(
                "$ {line}\n{problem} after {elapsed:.1?}\n--- stdout\n{stdout}\n--- stderr\n{}",
                read(&stderr_path)
            );
        }
        eprintln!("$ {line}   ({elapsed:.1?})");
        stdout
    }

    /// Runs `snapctl <args> --json` and parses stdout.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut args = args.to_vec();
        args.push("--json");
        let stdout = self.ok(&args);
        serde_json::from_str(&stdout).unwrap_or_else(|e| {
            panic!(
                "snapctl {}: stdout is not JSON ({e}):\n{stdout}",
                args.join(" ")
            )
        })
    }
}
