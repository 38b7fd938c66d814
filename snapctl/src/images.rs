//! Image files on disk, through `qemu-img`: reading headers and creating overlays.
//!
//! snapctl never hands a user string to a shell: arguments go to `qemu-img`
//! as an argument vector.

use std::fs::OpenOptions;
use std::os::unix::fs::OpenOptionsExt;
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

/// Commits `top` into `base` (its backing, or lower in its chain), offline.
/// `top` is left as it was (`-d`): it is about to be removed anyway.
pub fn commit(top: &Path, base: &Path) -> Result<()> {
    qemu_img(&[
        "commit".as_ref(),
        "-q".as_ref(),
        "-d".as_ref(),
        "-b".as_ref(),
        base.as_os_str(),
        top.as_os_str(),
    ])
    .map(drop)
}

/// Rewrites `image`'s backing string only (`qemu-img rebase -u`): for an image
/// whose backing now holds exactly the same data under another name.
pub fn rebase_unsafe(image: &Path, backing: &Path, backing_format: &str) -> Result<()> {
    qemu_img(&[
        "rebase".as_ref(),
        "-q".as_ref(),
        "-u".as_ref(),
        "-b".as_ref(),
        backing.as_os_str(),
        "-F".as_ref(),
        backing_format.as_ref(),
        image.as_os_str(),
    ])
    .map(drop)
}

/// Moves `image` onto `backing` (`None`: no backing at all), copying into
/// `image` whatever differs, so what `image` shows is unchanged: the offline
/// equivalent of `block-stream`.
pub fn rebase_safe(image: &Path, backing: Option<&Path>, backing_format: &str) -> Result<()> {
    let mut args: Vec<&std::ffi::OsStr> = vec!["rebase".as_ref(), "-q".as_ref()];
    match backing {
        Some(b) => args.extend::<[&std::ffi::OsStr; 4]>([
            "-b".as_ref(),
            b.as_os_str(),
            "-F".as_ref(),
            backing_format.as_ref(),
        ]),
        None => args.extend::<[&std::ffi::OsStr; 2]>(["-b".as_ref(), "".as_ref()]),
    }
    args.push(image.as_os_str());
    qemu_img(&args).map(drop)
}

/// Fails when a process (QEMU) holds `image` open for writing: offline
/// operations must never touch images a running VM uses. This is `qemu-img
/// info` without `-U`, which takes the shared lock QEMU's writer excludes.
pub fn ensure_unlocked(image: &Path) -> Result<()> {
    qemu_img(&["info".as_ref(), image.as_os_str()])
        .map(drop)
        .map_err(|e| {
            Error::Drift(format!(
                "{} is in use by another process (is QEMU still running?): {e}",
                image.display()
            ))
        })
}

/// Creates an empty file at `path` with `O_CREAT|O_EXCL` and mode 0600: it
/// fails when anything is there already, a symlink included (the link is not
/// followed), so nothing is ever written over.
pub fn claim_file(path: &Path) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map(drop)
        .map_err(|source| Error::Io {
            action: "create overlay",
            path: path.to_owned(),
            source,
        })
}

/// Creates a qcow2 overlay at `path` backed by `backing` (format `backing_format`),
/// written into the header as `backing_string`.
///
/// Never over an existing file: the path is first claimed with `O_CREAT|O_EXCL`
/// (which also refuses a symlink planted there), and only then does `qemu-img`
/// write the qcow2 header into the file we own. On failure the file is removed.
pub fn create_overlay(path: &Path, backing_string: &str, backing_format: &str) -> Result<()> {
    claim_file(path)?;
    let created = qemu_img(&[
        "create".as_ref(),
        "-q".as_ref(),
        "-f".as_ref(),
        "qcow2".as_ref(),
        "-b".as_ref(),
        backing_string.as_ref(),
        "-F".as_ref(),
        backing_format.as_ref(),
        path.as_os_str(),
    ]);
    if let Err(e) = created {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_never_replaces_an_existing_file() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2"])
            .arg(&base)
            .arg("1M")
            .status()
            .expect("qemu-img not found: run scripts/setup");
        assert!(out.success());
        let overlay = dir.path().join("o.qcow2");
        create_overlay(&overlay, base.to_str().unwrap(), "qcow2").unwrap();
        let chain = backing_chain(&overlay).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0].backing_string.as_deref(), base.to_str());
        assert_eq!(chain[1].filename, base);

        std::fs::write(dir.path().join("keep"), b"precious").unwrap();
        let err = create_overlay(&dir.path().join("keep"), base.to_str().unwrap(), "qcow2");
        assert!(err.is_err());
        assert_eq!(std::fs::read(dir.path().join("keep")).unwrap(), b"precious");

        std::os::unix::fs::symlink(dir.path().join("target"), dir.path().join("link")).unwrap();
        assert!(create_overlay(&dir.path().join("link"), base.to_str().unwrap(), "qcow2").is_err());
        assert!(
            !dir.path().join("target").exists(),
            "a planted symlink is never followed"
        );
    }
}
