//! qcow2 overlays written natively: claiming a new file (`O_EXCL`, never over
//! anything), giving it the owner, group and permission bits of the image it
//! covers, and writing an empty qcow2 header that stands on that image, so
//! that taking a snapshot costs neither a process start nor QMP round trips.

use std::fs::{Metadata, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// Creates an empty file at `path` with `O_CREAT|O_EXCL` and mode 0600: it
/// fails when anything is there already, a symlink included (the link is not
/// followed), so nothing is ever written over.
pub fn claim_file(path: &Path) -> Result<std::fs::File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| Error::Io {
            action: "create overlay",
            path: path.to_owned(),
            source,
        })
}

/// The image an overlay at `overlay` with backing string `backing` covers: the
/// backing string itself when absolute, else relative to the overlay's
/// directory (as QEMU resolves it).
pub fn covered_image(overlay: &Path, backing: &str) -> PathBuf {
    let backing = Path::new(backing);
    if backing.is_absolute() {
        backing.to_owned()
    } else {
        overlay.parent().unwrap_or(Path::new("/")).join(backing)
    }
}

/// Who a new overlay belongs to: the owner, group and permission bits of the
/// image it covers, so that whoever QEMU runs as can open it as it opened
/// that image. The owner always gets read and write (QEMU writes the overlay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ownership {
    pub uid: u32,
    pub gid: u32,
    pub mode: u32,
}

impl Ownership {
    /// The ownership an overlay on an image with metadata `covered` gets.
    pub fn of(covered: &Metadata) -> Ownership {
        Ownership {
            uid: covered.uid(),
            gid: covered.gid(),
            mode: (covered.mode() & 0o777) | 0o600,
        }
    }
}

/// The ownership an overlay at `overlay` gets when it covers `covered`, or an
/// error when snapctl cannot give it: not root, and the image belongs to
/// another user. Checked before anything is created.
pub fn overlay_ownership(overlay: &Path, covered: &Path) -> Result<Ownership> {
    let meta = std::fs::metadata(covered).map_err(|source| Error::Io {
        action: "read the owner of",
        path: covered.to_owned(),
        source,
    })?;
    let wanted = Ownership::of(&meta);
    let euid = nix::unistd::geteuid();
    if !euid.is_root() && euid.as_raw() != wanted.uid {
        return Err(Error::Refused(format!(
            "cannot create {} owned like {}: that image belongs to uid {} and snapctl runs as uid {} (not root); run snapctl as root or as uid {}",
            overlay.display(),
            covered.display(),
            wanted.uid,
            euid.as_raw(),
            wanted.uid
        )));
    }
    Ok(wanted)
}

/// Creates a qcow2 overlay at `path` of `size` bytes, backed by `backing`
/// (format `backing_format`), written into the header as given, owned like
/// the image it covers ([`overlay_ownership`]).
///
/// Never over an existing file: the path is claimed with `O_CREAT|O_EXCL`
/// (which also refuses a symlink planted there); the owner, group and
/// permission bits are set on the open file (`fchown`, `fchmod`: nothing is
/// looked up by path again) and the header written into the file snapctl now
/// owns ([`write_qcow2_overlay`]). On failure the file is removed.
pub fn new_overlay(path: &Path, size: u64, backing: &str, backing_format: &str) -> Result<()> {
    let ownership = overlay_ownership(path, &covered_image(path, backing))?;
    let mut file = claim_file(path)?;
    let fail = |action, source| {
        let _ = std::fs::remove_file(path);
        Error::Io {
            action,
            path: path.to_owned(),
            source,
        }
    };
    set_ownership(&file, ownership).map_err(|e| fail("set the owner of", e))?;
    write_qcow2_overlay(&mut file, size, backing, backing_format)
        .map_err(|e| fail("write overlay", e))
}

/// Gives the open `file` `ownership`. The owner is changed only when it
/// differs (root only, checked by [`overlay_ownership`]); a group snapctl may
/// not give (a user who is not in it) is left as it is.
fn set_ownership(file: &std::fs::File, ownership: Ownership) -> std::io::Result<()> {
    let meta = file.metadata()?;
    if meta.uid() != ownership.uid || meta.gid() != ownership.gid {
        let uid = (meta.uid() != ownership.uid).then_some(ownership.uid);
        match std::os::unix::fs::fchown(file, uid, Some(ownership.gid)) {
            Ok(()) => {}
            Err(e) if uid.is_none() && e.kind() == std::io::ErrorKind::PermissionDenied => {
                tracing::debug!(gid = ownership.gid, "cannot give the overlay its group");
            }
            Err(e) => return Err(e),
        }
    }
    // After the chown, which may clear mode bits.
    file.set_permissions(std::fs::Permissions::from_mode(ownership.mode))
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;
    use crate::images::backing_chain;

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
        new_overlay(&overlay, 1 << 20, base.to_str().unwrap(), "qcow2").unwrap();
        let chain = backing_chain(&overlay).unwrap();
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[0].backing_string.as_deref(), base.to_str());
        assert_eq!(chain[1].filename, base);

        std::fs::write(dir.path().join("keep"), b"precious").unwrap();
        let err = new_overlay(
            &dir.path().join("keep"),
            1 << 20,
            base.to_str().unwrap(),
            "qcow2",
        );
        assert!(err.is_err());
        assert_eq!(std::fs::read(dir.path().join("keep")).unwrap(), b"precious");

        std::os::unix::fs::symlink(dir.path().join("target"), dir.path().join("link")).unwrap();
        assert!(
            new_overlay(
                &dir.path().join("link"),
                1 << 20,
                base.to_str().unwrap(),
                "qcow2"
            )
            .is_err()
        );
        assert!(
            !dir.path().join("target").exists(),
            "a planted symlink is never followed"
        );
    }
}

/// Creates the qcow2 container of a checkpoint's memory and device state at
/// `path`, never over an existing file (as [`new_overlay`]): no backing, a
/// small virtual disk nobody reads; QEMU's `snapshot-save` puts the state in
/// the image's state area.
pub fn new_state_file(path: &Path) -> Result<()> {
    let mut file = claim_file(path)?;
    write_qcow2(&mut file, 1 << 20, None).map_err(|source| {
        let _ = std::fs::remove_file(path);
        Error::Io {
            action: "write memory state file",
            path: path.to_owned(),
            source,
        }
    })
}

/// Creates an empty standalone image at `path`, never over an existing file:
/// qcow2 (no backing) or raw (a sparse file) of `size` bytes.
pub fn new_image(path: &Path, format: &str, size: u64) -> Result<()> {
    let mut file = claim_file(path)?;
    let written = match format {
        "qcow2" => write_qcow2(&mut file, size, None),
        "raw" => file.set_len(size),
        other => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("snapctl does not write {other} images"),
        )),
    };
    written.map_err(|source| {
        let _ = std::fs::remove_file(path);
        Error::Io {
            action: "write image",
            path: path.to_owned(),
            source,
        }
    })
}

/// Writes an empty qcow2 (version 3) overlay into `file`, which must be new
/// and empty: `size` bytes of virtual disk, backed by `backing` in format
/// `backing_format`, 64 KiB clusters, 16-bit refcounts, no feature beyond the
/// basics. This is the layout `qemu-img create -f qcow2 -b … -F …` produces
/// (header, refcount table, one refcount block, L1 table), written directly so
/// that taking a snapshot costs neither a process start nor QMP round trips.
pub fn write_qcow2_overlay(
    file: &mut std::fs::File,
    size: u64,
    backing: &str,
    backing_format: &str,
) -> std::io::Result<()> {
    if backing.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "unusable backing file name",
        ));
    }
    write_qcow2(file, size, Some((backing, backing_format)))
}

/// Writes an empty qcow2 image into the new, empty `file`, standing on
/// `backing` (file name and format) when given.
fn write_qcow2(
    file: &mut std::fs::File,
    size: u64,
    backing: Option<(&str, &str)>,
) -> std::io::Result<()> {
    use std::io::{Error as IoError, ErrorKind, Seek, SeekFrom, Write};
    let (backing, backing_format) = backing.unwrap_or(("", ""));
    const CLUSTER_BITS: u32 = 16;
    const CLUSTER: u64 = 1 << CLUSTER_BITS;
    // One L2 table maps CLUSTER / 8 clusters; one L1 entry per L2 table.
    const BYTES_PER_L1_ENTRY: u64 = CLUSTER * (CLUSTER / 8);
    const HEADER_LENGTH: u32 = 112;
    const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

    if backing.len() > 1023 || backing_format.len() > 16 {
        return Err(IoError::new(
            ErrorKind::InvalidInput,
            "unusable backing file name",
        ));
    }
    let l1_size = size.div_ceil(BYTES_PER_L1_ENTRY);
    let l1_bytes = l1_size * 8;
    let l1_clusters = l1_bytes.div_ceil(CLUSTER).max(1);
    let (refcount_table, refcount_block, l1_table) = (CLUSTER, 2 * CLUSTER, 3 * CLUSTER);
    let clusters_used = 3 + l1_clusters;
    if clusters_used > CLUSTER / 2 || u32::try_from(l1_size).is_err() {
        return Err(IoError::new(
            ErrorKind::InvalidInput,
            "virtual size too large",
        ));
    }

    let mut header = Vec::with_capacity(512);
    let be32 = |v: &mut Vec<u8>, x: u32| v.extend_from_slice(&x.to_be_bytes());
    let be64 = |v: &mut Vec<u8>, x: u64| v.extend_from_slice(&x.to_be_bytes());
    header.extend_from_slice(b"QFI\xfb");
    be32(&mut header, 3); // version
    let backing_offset_at = header.len();
    be64(&mut header, 0); // backing_file_offset, filled in below
    be32(&mut header, backing.len() as u32);
    be32(&mut header, CLUSTER_BITS);
    be64(&mut header, size);
    be32(&mut header, 0); // no encryption
    be32(&mut header, l1_size as u32);
    be64(&mut header, l1_table);
    be64(&mut header, refcount_table);
    be32(&mut header, 1); // refcount table clusters
    be32(&mut header, 0); // snapshots
    be64(&mut header, 0); // snapshots offset
    be64(&mut header, 0); // incompatible features
    be64(&mut header, 0); // compatible features
    be64(&mut header, 0); // autoclear features
    be32(&mut header, 4); // refcount order: 16-bit refcounts
    be32(&mut header, HEADER_LENGTH);
    header.push(0); // compression type: zlib
    header.resize(HEADER_LENGTH as usize, 0);
    if !backing.is_empty() {
        // Header extension: the backing file's format, padded to 8 bytes.
        be32(&mut header, EXT_BACKING_FORMAT);
        be32(&mut header, backing_format.len() as u32);
        header.extend_from_slice(backing_format.as_bytes());
        header.resize(header.len().next_multiple_of(8), 0);
    }
    be64(&mut header, 0); // end of extensions
    if !backing.is_empty() {
        let backing_offset = header.len() as u64;
        header[backing_offset_at..backing_offset_at + 8]
            .copy_from_slice(&backing_offset.to_be_bytes());
        header.extend_from_slice(backing.as_bytes());
    }

    let mut refcounts = Vec::with_capacity(clusters_used as usize * 2);
    for _ in 0..clusters_used {
        refcounts.extend_from_slice(&1u16.to_be_bytes());
    }
    file.write_all(&header)?;
    file.seek(SeekFrom::Start(refcount_table))?;
    file.write_all(&refcount_block.to_be_bytes())?;
    file.seek(SeekFrom::Start(refcount_block))?;
    file.write_all(&refcounts)?;
    // The L1 table is all zeros (nothing allocated): extending the file is enough.
    file.set_len(l1_table + l1_bytes)?;
    file.sync_all()
}

#[cfg(test)]
mod ownership_tests {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    use super::*;

    /// The overlay gets the owner, group and permission bits of the image it
    /// covers (as root, another user's image; otherwise one's own).
    #[test]
    fn overlay_is_owned_like_the_image_it_covers() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        std::fs::write(&base, b"").unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o640)).unwrap();
        let root = nix::unistd::geteuid().is_root();
        let (uid, gid) = if root {
            (65534, 65534)
        } else {
            let m = std::fs::metadata(&base).unwrap();
            (m.uid(), m.gid())
        };
        if root {
            std::os::unix::fs::chown(&base, Some(uid), Some(gid)).unwrap();
        }
        let overlay = dir.path().join("o.qcow2");
        new_overlay(&overlay, 1 << 20, base.to_str().unwrap(), "qcow2").unwrap();
        let m = std::fs::symlink_metadata(&overlay).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (uid, gid, 0o640));

        // A relative backing string is resolved from the overlay's directory;
        // the owner always gets read and write.
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o444)).unwrap();
        let overlay = dir.path().join("o2.qcow2");
        new_overlay(&overlay, 1 << 20, "base.qcow2", "qcow2").unwrap();
        let m = std::fs::symlink_metadata(&overlay).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (uid, gid, 0o644));

        // A covered image that cannot be read: nothing is created.
        let overlay = dir.path().join("o3.qcow2");
        let err = new_overlay(&overlay, 1 << 20, "missing.qcow2", "qcow2").unwrap_err();
        assert!(err.to_string().contains("missing.qcow2"), "{err}");
        assert!(!overlay.exists());
    }
}

#[cfg(test)]
mod header_tests {
    use std::process::Command;

    use super::*;

    fn qemu_img(args: &[&str]) -> std::process::Output {
        Command::new("qemu-img")
            .args(args)
            .output()
            .expect("qemu-img not found: run scripts/setup")
    }

    /// The overlay is what qemu-img would have made: same info, a clean
    /// `qemu-img check`, and it reads its backing's data and takes writes.
    #[test]
    fn written_overlays_are_valid_qcow2() {
        let dir = tempfile::tempdir().unwrap();
        for (size, name) in [
            (64 << 20, "small"),
            ((1 << 30) + 65536, "odd"),
            (16u64 << 40, "huge"),
            (512, "tiny"),
        ] {
            let base = dir.path().join(format!("{name}-base.qcow2"));
            let s = size.to_string();
            assert!(
                qemu_img(&["create", "-q", "-f", "qcow2", base.to_str().unwrap(), &s])
                    .status
                    .success()
            );
            let ours = dir.path().join(format!("{name}-ours.qcow2"));
            let theirs = dir.path().join(format!("{name}-theirs.qcow2"));
            let mut f = claim_file(&ours).unwrap();
            write_qcow2_overlay(&mut f, size, base.to_str().unwrap(), "qcow2").unwrap();
            assert!(
                qemu_img(&[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    base.to_str().unwrap(),
                    "-F",
                    "qcow2",
                    theirs.to_str().unwrap()
                ])
                .status
                .success()
            );

            let check = qemu_img(&["check", ours.to_str().unwrap()]);
            assert!(check.status.success(), "{name}: {check:?}");
            let info = |p: &Path| -> serde_json::Value {
                serde_json::from_slice(
                    &qemu_img(&["info", "--output=json", p.to_str().unwrap()]).stdout,
                )
                .unwrap()
            };
            let (a, b) = (info(&ours), info(&theirs));
            for key in [
                "virtual-size",
                "format",
                "cluster-size",
                "backing-filename",
                "backing-filename-format",
            ] {
                assert_eq!(a[key], b[key], "{name}: {key}");
            }
            assert_eq!(a["format-specific"]["data"]["compat"], "1.1");
            assert_eq!(a["format-specific"]["data"]["refcount-bits"], 16);

            // Reads fall through to the backing image; writes land in ours.
            let io = |img: &Path, cmd: &str| {
                let out = Command::new("qemu-io")
                    .args(["-f", "qcow2", "-c", cmd, img.to_str().unwrap()])
                    .output()
                    .unwrap();
                assert!(
                    out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("fail"),
                    "{cmd}: {out:?}"
                );
            };
            let len = size.min(65536);
            io(&base, &format!("write -P 0x5a 0 {len}"));
            io(&ours, &format!("read -P 0x5a 0 {len}"));
            io(&ours, &format!("write -P 0xa5 0 {len}"));
            io(&ours, &format!("read -P 0xa5 0 {len}"));
            io(&base, &format!("read -P 0x5a 0 {len}"));
            assert!(
                qemu_img(&["check", ours.to_str().unwrap()])
                    .status
                    .success()
            );
        }
    }
}
