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

/// What an image's first bytes say, read natively (the few header fields
/// `check` compares), or that `qemu-img` must be asked ([`Probe::Other`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// A qcow2 image (version 2 or 3) whose header snapctl reads completely.
    Qcow2(Qcow2Header),
    /// A regular file that no image format QEMU probes for claims: QEMU opens
    /// it as `raw`, `virtual_size` bytes (its length rounded up to 512).
    Raw { virtual_size: u64 },
    /// Anything else: another format (vmdk, vdi, …), a qcow2 image with a
    /// feature snapctl does not read, a device, something odd.
    Other,
}

/// The header fields of a qcow2 image that describe its place in a chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Header {
    pub version: u32,
    pub virtual_size: u64,
    /// The backing string exactly as written.
    pub backing: Option<String>,
    /// The backing format header extension.
    pub backing_format: Option<String>,
    /// The names of the internal snapshots.
    pub snapshots: Vec<String>,
}

const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

/// Reads what `path` is without starting a process. Errors only when the
/// file cannot be opened or read; everything snapctl does not understand
/// exactly as `qemu-img` would is [`Probe::Other`].
pub fn probe(path: &Path) -> std::io::Result<Probe> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Ok(Probe::Other);
    }
    // QEMU probes formats on the first 2 KiB.
    let mut head = vec![0u8; 2048.min(meta.len() as usize)];
    file.read_exact_at(&mut head, 0)?;
    if !head.starts_with(QCOW2_MAGIC) {
        if claimed_by_another_format(&head, path) {
            return Ok(Probe::Other);
        }
        return Ok(Probe::Raw {
            virtual_size: meta.len().next_multiple_of(512),
        });
    }
    let Some(fields) = HeaderFields::parse(&head) else {
        return Ok(Probe::Other);
    };
    // Header, extensions and backing string all live in the first cluster.
    let cluster = 1u64 << fields.cluster_bits;
    let ext_end = if fields.backing_offset != 0 {
        fields.backing_offset
    } else {
        cluster
    };
    let need = ext_end
        .max(fields.backing_offset + u64::from(fields.backing_size))
        .min(cluster)
        .min(meta.len());
    let mut first = head;
    if need > first.len() as u64 {
        first = vec![0u8; need as usize];
        file.read_exact_at(&mut first, 0)?;
    }
    let Some(mut header) = fields.read(&first) else {
        return Ok(Probe::Other);
    };
    if fields.nb_snapshots > 0 {
        match read_snapshot_names(&file, &fields, meta.len())? {
            Some(names) => header.snapshots = names,
            None => return Ok(Probe::Other),
        }
    }
    Ok(Probe::Qcow2(header))
}

/// Whether QEMU's format probing would give the first bytes `head` of a
/// file that is not qcow2 to a format other than raw. Deliberately broad:
/// a false "yes" only costs a `qemu-img` run.
fn claimed_by_another_format(head: &[u8], path: &Path) -> bool {
    const MAGICS: &[&[u8]] = &[
        b"QFI",                    // qcow (version 1) and qcow2 variants
        b"QED\0",                  // qed
        b"KDMV",                   // vmdk (sparse)
        b"COWD",                   // vmdk (version 3)
        b"conectix",               // vpc
        b"vhdxfile",               // vhdx
        b"LUKS\xba\xbe",           // luks
        b"WithoutFreeSpace",       // parallels
        b"WithouFreSpacExt",       // parallels
        b"Bochs Virtual HD Image", // bochs
        b"version=",               // vmdk descriptor
        b"#",                      // vmdk descriptor comment, cloop script
        b" ",                      // vmdk descriptor
    ];
    // vdi's signature, little-endian, after a 64-byte text.
    let vdi = head.get(0x40..0x44) == Some(&0xbeda_107f_u32.to_le_bytes()[..]);
    // dmg is probed by its file name.
    let dmg = path.extension().is_some_and(|e| e == "dmg");
    vdi || dmg || MAGICS.iter().any(|m| head.starts_with(m))
}

/// The fixed part of a qcow2 header.
#[derive(Debug, Clone, Copy)]
struct HeaderFields {
    version: u32,
    backing_offset: u64,
    backing_size: u32,
    cluster_bits: u32,
    size: u64,
    nb_snapshots: u32,
    snapshots_offset: u64,
    header_length: u64,
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

impl HeaderFields {
    /// The fixed header, or `None` when it uses anything beyond what snapctl
    /// reads exactly (encryption, incompatible features, odd geometry).
    fn parse(b: &[u8]) -> Option<HeaderFields> {
        let version = be32(b, 4)?;
        let (header_length, incompatible) = match version {
            2 => (72, 0),
            3 => (u64::from(be32(b, 100)?), be64(b, 72)?),
            _ => return None,
        };
        let cluster_bits = be32(b, 20)?;
        let crypt_method = be32(b, 32)?;
        let f = HeaderFields {
            version,
            backing_offset: be64(b, 8)?,
            backing_size: be32(b, 16)?,
            cluster_bits,
            size: be64(b, 24)?,
            nb_snapshots: be32(b, 60)?,
            snapshots_offset: be64(b, 64)?,
            header_length,
        };
        let cluster = 1u64 << cluster_bits.min(63);
        let sane = (9..=21).contains(&cluster_bits)
            && crypt_method == 0
            && incompatible == 0
            && (version == 2 || (104..=cluster).contains(&header_length))
            && f.backing_size <= 1023
            && (f.backing_size == 0
                || f.backing_offset.saturating_add(u64::from(f.backing_size)) <= cluster);
        sane.then_some(f)
    }

    /// The header fields read from the image's first bytes `b` (header
    /// extensions and backing string included).
    fn read(&self, b: &[u8]) -> Option<Qcow2Header> {
        const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
        let cluster = 1u64 << self.cluster_bits;
        let ext_end = if self.backing_offset != 0 {
            self.backing_offset
        } else {
            cluster
        };
        let ext_end = usize::try_from(ext_end.min(b.len() as u64)).ok()?;
        let mut at = usize::try_from(self.header_length).ok()?;
        let mut backing_format = None;
        while at + 8 <= ext_end {
            let (kind, len) = (be32(b, at)?, be32(b, at + 4)? as usize);
            at += 8;
            if kind == 0 {
                break;
            }
            if at + len > ext_end {
                return None;
            }
            if kind == EXT_BACKING_FORMAT {
                let s = std::str::from_utf8(&b[at..at + len]).ok()?;
                // QEMU keeps up to the first NUL byte.
                backing_format = Some(s.split('\0').next().unwrap_or_default().to_owned());
            }
            at += len.next_multiple_of(8);
        }
        let backing = if self.backing_size == 0 || self.backing_offset == 0 {
            None
        } else {
            let start = usize::try_from(self.backing_offset).ok()?;
            let bytes = b.get(start..start + self.backing_size as usize)?;
            let s = std::str::from_utf8(bytes).ok()?;
            if s.contains('\0') {
                return None;
            }
            Some(s.to_owned())
        };
        Some(Qcow2Header {
            version: self.version,
            virtual_size: self.size / 512 * 512,
            backing,
            backing_format: backing_format.filter(|f| !f.is_empty()),
            snapshots: Vec::new(),
        })
    }
}

/// The names in the snapshot table, or `None` when it looks damaged.
fn read_snapshot_names(
    file: &std::fs::File,
    f: &HeaderFields,
    file_len: u64,
) -> std::io::Result<Option<Vec<String>>> {
    use std::os::unix::fs::FileExt;
    // QEMU refuses more than 65536 snapshots and tables over 64 MiB.
    const MAX_TABLE: u64 = 64 << 20;
    if f.nb_snapshots > 65536 || f.snapshots_offset == 0 || f.snapshots_offset >= file_len {
        return Ok(None);
    }
    let len = (file_len - f.snapshots_offset).min(MAX_TABLE);
    let mut table = vec![0u8; len as usize];
    file.read_exact_at(&mut table, f.snapshots_offset)?;
    let mut names = Vec::with_capacity(f.nb_snapshots as usize);
    let mut at = 0usize;
    for _ in 0..f.nb_snapshots {
        let entry = || -> Option<(String, usize)> {
            let id_len = usize::from(u16::from_be_bytes(
                table.get(at + 12..at + 14)?.try_into().ok()?,
            ));
            let name_len = usize::from(u16::from_be_bytes(
                table.get(at + 14..at + 16)?.try_into().ok()?,
            ));
            let extra = be32(&table, at + 36)? as usize;
            let id_at = at + 40 + extra;
            let name_at = id_at + id_len;
            let name = std::str::from_utf8(table.get(name_at..name_at + name_len)?).ok()?;
            Some((name.to_owned(), (name_at + name_len).next_multiple_of(8)))
        };
        let Some((name, next)) = entry() else {
            return Ok(None);
        };
        names.push(name);
        at = next;
    }
    Ok(Some(names))
}
