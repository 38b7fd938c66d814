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

/// One image's header as [`info`] reports it, read natively when it is a
/// qcow2 image or a raw file ([`crate::qcow2::probe`]); anything else (another
/// format, a qcow2 feature snapctl does not read, a backing string with a
/// protocol prefix) is left to `qemu-img info`. No process is started in the
/// common case, so reading a long chain costs microseconds per layer.
pub fn header(image: &Path) -> Result<ImageInfo> {
    use crate::qcow2::Probe;
    // A relative image path with a ':' before any '/' is a protocol to QEMU.
    let image_str = image.to_string_lossy();
    if !image_str.starts_with('/') && image_str.split('/').next().is_some_and(|f| f.contains(':')) {
        return info(image);
    }
    let native = match crate::qcow2::probe(image) {
        Ok(Probe::Qcow2(h)) => {
            let backing_path = match h.backing.as_deref() {
                None => None,
                Some(b) => match full_backing_path(image, b) {
                    Some(p) => Some(p),
                    None => return info(image),
                },
            };
            Some(ImageInfo {
                filename: image.to_owned(),
                format: "qcow2".to_owned(),
                virtual_size: h.virtual_size,
                backing_string: h.backing,
                backing_path,
                backing_format: h.backing_format,
                snapshots: h
                    .snapshots
                    .into_iter()
                    .map(|name| InternalSnapshotInfo { name })
                    .collect(),
            })
        }
        Ok(Probe::Raw { virtual_size }) => Some(ImageInfo {
            filename: image.to_owned(),
            format: "raw".to_owned(),
            virtual_size,
            backing_string: None,
            backing_path: None,
            backing_format: None,
            snapshots: Vec::new(),
        }),
        Ok(Probe::Other) | Err(_) => None,
    };
    match native {
        Some(i) => Ok(i),
        None => info(image),
    }
}

/// The backing file `backing` of `image` as QEMU resolves it
/// (`bdrv_make_absolute_filename`): absolute strings as they are, relative
/// ones appended to the image's path up to its last `/`, nothing normalized.
/// `None` for a string with a protocol prefix (`nbd:`, `json:`), which only
/// `qemu-img` resolves.
pub fn full_backing_path(image: &Path, backing: &str) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    if backing.starts_with('/') {
        return Some(PathBuf::from(backing));
    }
    // QEMU's path_has_protocol: a ':' before any '/'.
    if backing
        .split('/')
        .next()
        .is_some_and(|first| first.contains(':'))
    {
        return None;
    }
    let bytes = image.as_os_str().as_bytes();
    let dir = match bytes.iter().rposition(|&c| c == b'/') {
        Some(i) => &bytes[..=i],
        None => &[][..],
    };
    let mut full = dir.to_vec();
    full.extend_from_slice(backing.as_bytes());
    Some(PathBuf::from(std::ffi::OsStr::from_bytes(&full)))
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

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn qemu_img(dir: &Path, args: &[&str]) {
        let out = Command::new("qemu-img")
            .current_dir(dir)
            .args(args)
            .output()
            .expect("qemu-img not found: run scripts/setup");
        assert!(out.status.success(), "qemu-img {args:?}: {out:?}");
    }

    /// [`header`] reads what `qemu-img info` reports, field for field, for
    /// the images it reads natively and for those it leaves to qemu-img.
    #[test]
    fn native_headers_match_qemu_img_info() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let d = dir.to_str().unwrap();
        std::fs::create_dir(dir.join("sub")).unwrap();
        qemu_img(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "1G"]);
        let abs_base = format!("{d}/base.qcow2");
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                &abs_base,
                "-F",
                "qcow2",
                "abs.qcow2",
            ],
        );
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "rel.qcow2",
            ],
        );
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "../base.qcow2",
                "-F",
                "qcow2",
                "sub/up.qcow2",
            ],
        );
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "v2.qcow2",
            ],
        );
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "snaps.qcow2",
            ],
        );
        qemu_img(dir, &["snapshot", "-c", "first", "snaps.qcow2"]);
        qemu_img(dir, &["snapshot", "-c", "a longer name", "snaps.qcow2"]);
        // No backing-format extension: its type overwritten by one nobody
        // knows (skipped by QEMU and by snapctl).
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "nofmt.qcow2",
            ],
        );
        let mut bytes = std::fs::read(dir.join("nofmt.qcow2")).unwrap();
        let at = bytes[..4096]
            .windows(4)
            .position(|w| w == 0xe279_2acau32.to_be_bytes())
            .unwrap();
        bytes[at..at + 4].copy_from_slice(&0x1234_5678u32.to_be_bytes());
        std::fs::write(dir.join("nofmt.qcow2"), bytes).unwrap();
        // Left to qemu-img: a protocol backing, zstd clusters, other formats.
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-u",
                "-b",
                "nbd:localhost:10809",
                "-F",
                "raw",
                "nbd.qcow2",
                "1M",
            ],
        );
        qemu_img(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compression_type=zstd",
                "zstd.qcow2",
                "1M",
            ],
        );
        qemu_img(dir, &["create", "-q", "-f", "vmdk", "disk.vmdk", "1M"]);
        qemu_img(dir, &["create", "-q", "-f", "vdi", "disk.vdi", "1M"]);
        qemu_img(dir, &["create", "-q", "-f", "vpc", "disk.vhd", "1M"]);
        let mut f = crate::qcow2::claim_file(&dir.join("ours.qcow2")).unwrap();
        crate::qcow2::write_qcow2_overlay(&mut f, 1000, "base.qcow2", "qcow2").unwrap();
        std::fs::write(dir.join("odd.raw"), [0x5au8; 1000]).unwrap();
        std::fs::write(dir.join("empty.raw"), b"").unwrap();
        let mut mbr = vec![0u8; 1 << 20];
        mbr[0..3].copy_from_slice(&[0xeb, 0x63, 0x90]);
        mbr[510..512].copy_from_slice(&[0x55, 0xaa]);
        std::fs::write(dir.join("boot.img"), &mbr).unwrap();

        let files = [
            "base.qcow2",
            "abs.qcow2",
            "rel.qcow2",
            "sub/up.qcow2",
            "v2.qcow2",
            "snaps.qcow2",
            "nofmt.qcow2",
            "nbd.qcow2",
            "zstd.qcow2",
            "disk.vmdk",
            "disk.vdi",
            "disk.vhd",
            "ours.qcow2",
            "odd.raw",
            "empty.raw",
            "boot.img",
        ];
        for name in files {
            for path in [
                dir.join(name),
                dir.join(".").join(name),
                dir.join("sub/..").join(name),
            ] {
                assert_eq!(
                    header(&path).unwrap(),
                    info(&path).unwrap(),
                    "{}",
                    path.display()
                );
            }
        }
        assert_eq!(info(&dir.join("snaps.qcow2")).unwrap().snapshots.len(), 2);
        assert_eq!(info(&dir.join("boot.img")).unwrap().format, "raw");
        assert_eq!(info(&dir.join("nofmt.qcow2")).unwrap().backing_format, None);
        // Relative image paths resolve relative backing strings relatively.
        let cwd = std::env::current_dir().unwrap();
        let rel = pathdiff(dir, &cwd).join("sub/up.qcow2");
        assert_eq!(header(&rel).unwrap(), info(&rel).unwrap());
        // What is read natively, and what is not.
        use crate::qcow2::{Probe, probe};
        for name in [
            "abs.qcow2",
            "rel.qcow2",
            "v2.qcow2",
            "snaps.qcow2",
            "nofmt.qcow2",
            "ours.qcow2",
        ] {
            assert!(
                matches!(probe(&dir.join(name)).unwrap(), Probe::Qcow2(_)),
                "{name}"
            );
        }
        for name in ["odd.raw", "empty.raw", "boot.img"] {
            assert!(
                matches!(probe(&dir.join(name)).unwrap(), Probe::Raw { .. }),
                "{name}"
            );
        }
        for name in ["zstd.qcow2", "disk.vmdk", "disk.vdi", "disk.vhd"] {
            assert_eq!(probe(&dir.join(name)).unwrap(), Probe::Other, "{name}");
        }
        assert!(full_backing_path(&dir.join("nbd.qcow2"), "nbd:localhost:10809").is_none());
        // A missing file fails as qemu-img fails.
        let missing = dir.join("missing.qcow2");
        assert_eq!(
            header(&missing).unwrap_err().to_string(),
            info(&missing).unwrap_err().to_string()
        );
    }

    /// `to` relative to `from` (both absolute), through `..` components.
    fn pathdiff(to: &Path, from: &Path) -> PathBuf {
        let (to, from): (Vec<_>, Vec<_>) = (to.components().collect(), from.components().collect());
        let common = to.iter().zip(&from).take_while(|(a, b)| a == b).count();
        let mut out = PathBuf::new();
        for _ in common..from.len() {
            out.push("..");
        }
        for c in &to[common..] {
            out.push(c);
        }
        out
    }
}
