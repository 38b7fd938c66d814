//! Image files through `qemu-img`: reading headers and running the image-tool steps of
//! offline plans. Overlays are written natively ([`crate::qcow2`]).
//!
//! snapctl never hands a user string to a shell: arguments go to `qemu-img`
//! as an argument vector.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize;

use crate::error::{Error, Result};

/// One image's header, as `qemu-img info` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ImageInfo {
    pub filename: PathBuf,
    pub format: String,
    #[serde(rename = "virtual-size")]
    pub virtual_size: u64,
    /// The backing string exactly as written in the header.
    #[serde(rename = "backing-filename", default)]
    pub backing_string: Option<String>,
    /// The backing file resolved to a path (relative strings are relative to
    /// the directory of the image that contains them).
    #[serde(rename = "full-backing-filename", default)]
    pub backing_path: Option<PathBuf>,
    #[serde(rename = "backing-filename-format", default)]
    pub backing_format: Option<String>,
    /// The internal snapshots the image holds.
    #[serde(default)]
    pub snapshots: Vec<InternalSnapshotInfo>,
}

/// One internal snapshot in an image's header.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InternalSnapshotInfo {
    pub name: String,
}

impl ImageInfo {
    /// Whether the image holds an internal snapshot named `tag`.
    pub fn holds(&self, tag: &str) -> bool {
        self.snapshots.iter().any(|s| s.name == tag)
    }
}

fn qemu_img(args: &[&std::ffi::OsStr]) -> Result<Vec<u8>> {
    let output = Command::new("qemu-img").args(args).output().map_err(|e| {
        Error::Tool(format!(
            "cannot run qemu-img ({e}); install QEMU with scripts/setup"
        ))
    })?;
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let line = stderr
            .lines()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("failed");
        return Err(Error::Tool(format!(
            "qemu-img {}: {}",
            args.first()
                .map(|a| a.to_string_lossy())
                .unwrap_or_default(),
            line.trim().trim_start_matches("qemu-img: ")
        )));
    }
    Ok(output.stdout)
}

/// The chain of `image` read from the headers, the image itself first.
/// Opens with `-U` (force-share), so it works while QEMU has the images open.
pub fn backing_chain(image: &Path) -> Result<Vec<ImageInfo>> {
    read_info(image, true)
}

/// One image's header.
pub fn info(image: &Path) -> Result<ImageInfo> {
    read_info(image, false)
}

fn read_info<T: serde::de::DeserializeOwned>(image: &Path, chain: bool) -> Result<T> {
    let mut args: Vec<&std::ffi::OsStr> = vec!["info".as_ref()];
    if chain {
        args.push("--backing-chain".as_ref());
    }
    args.extend(["--output=json".as_ref(), "-U".as_ref(), image.as_os_str()]);
    let out = qemu_img(&args)?;
    serde_json::from_slice(&out).map_err(|e| {
        Error::Tool(format!(
            "unexpected qemu-img info output for {}: {e}",
            image.display()
        ))
    })
}

/// Whether `image` itself holds data (clusters of its own, not its backing's):
/// `qemu-img map` reports every extent with its depth in the chain.
pub fn holds_data(image: &Path) -> Result<bool> {
    #[derive(Deserialize)]
    struct Extent {
        depth: u64,
        data: bool,
    }
    let out = qemu_img(&[
        "map".as_ref(),
        "--output=json".as_ref(),
        "-U".as_ref(),
        image.as_os_str(),
    ])?;
    let extents: Vec<Extent> = serde_json::from_slice(&out).map_err(|e| {
        Error::Tool(format!(
            "unexpected qemu-img map output for {}: {e}",
            image.display()
        ))
    })?;
    Ok(extents.iter().any(|e| e.depth == 0 && e.data))
}

/// Runs an image tool exactly as a plan's [`crate::plan::Step::Tool`] says
/// (`argv[0]` is `qemu-img`), failing with its first line of error output.
pub fn run_tool(argv: &[String]) -> Result<()> {
    match argv.split_first() {
        Some((tool, args)) if tool == "qemu-img" => {
            let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
            qemu_img(&args).map(drop)
        }
        _ => Err(Error::Tool(format!(
            "snapctl runs only qemu-img, not {}",
            argv.first().map_or("nothing", String::as_str)
        ))),
    }
}

/// Fails when a process (QEMU) holds `image` open for writing: offline
/// operations must never touch images a running VM uses. This is `qemu-img
/// info` without `-U`, which takes the shared lock QEMU's writer excludes.
pub fn ensure_unlocked(image: &Path) -> Result<()> {
    qemu_img(&["info".as_ref(), image.as_os_str()])
        .map(drop)
        .map_err(|e| {
            Error::Refused(format!(
                "{} is in use by another process (is QEMU still running?): {e}",
                image.display()
            ))
        })
}
