//! Names: which snapshot and VM names users may choose, and the QEMU node names and
//! overlay file names derived from them.
//!
//! Users choose snapshot names freely (Unicode included), but those names end up in
//! places with much narrower rules: QEMU node names (`[A-Za-z][A-Za-z0-9._-]*`, at most
//! 31 bytes) and file names next to the user's images. The functions here map any
//! accepted name to a valid, readable, and collision-resistant derived name. The mapping
//! is stable across builds (it uses its own FNV-1a hash, not std's randomly keyed one),
//! so the same inputs always give the same names.

use crate::error::{Error, Result};

/// Longest snapshot name accepted, in bytes (a common file-name limit).
pub const MAX_SNAPSHOT_NAME_BYTES: usize = 255;

/// Longest VM name accepted, in bytes.
pub const MAX_VM_NAME_BYTES: usize = 64;

/// Longest QEMU node name, in bytes: QEMU keeps node names in a 32-byte buffer with the
/// terminating NUL.
pub const MAX_NODE_NAME_BYTES: usize = 31;

/// Checks that `name` can name a snapshot.
///
/// Refused: the empty name, `.` and `..` (they read as directory entries wherever names
/// become file names), names with `/` or NUL, names with any control character (newline,
/// tab, DEL, …: they would break line-oriented output and terminals), and names longer
/// than [`MAX_SNAPSHOT_NAME_BYTES`]. Any other Unicode is accepted.
pub fn validate_snapshot_name(name: &str) -> Result<()> {
    match snapshot_name_problem(name) {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidSnapshotName {
            name: name.to_owned(),
            reason,
        }),
    }
}

/// Which rule of [`validate_snapshot_name`] `name` breaks, if any.
pub(crate) fn snapshot_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name == "." || name == ".." {
        Some("`.` and `..` are reserved")
    } else if name.len() > MAX_SNAPSHOT_NAME_BYTES {
        Some("it is longer than 255 bytes")
    } else if name.contains('/') {
        Some("it contains `/`")
    } else if name.contains('\0') {
        Some("it contains a NUL character")
    } else if name.chars().any(char::is_control) {
        Some("it contains a control character")
    } else {
        None
    }
}

/// Checks that `name` can name a VM.
///
/// VM names become file names in the state directory (`<vm>.json`, `<vm>.lock`), so they
/// are kept to portable file-name characters: non-empty, at most [`MAX_VM_NAME_BYTES`]
/// bytes, only `[A-Za-z0-9._-]`, and not starting with `.` (hidden files, `..`) or `-`
/// (read as an option by shell tools).
pub fn validate_vm_name(name: &str) -> Result<()> {
    match vm_name_problem(name) {
        None => Ok(()),
        Some(reason) => Err(Error::InvalidVmName {
            name: name.to_owned(),
            reason,
        }),
    }
}

/// Which rule of [`validate_vm_name`] `name` breaks, if any.
pub(crate) fn vm_name_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_VM_NAME_BYTES {
        Some("it is longer than 64 bytes")
    } else if !name.bytes().all(is_portable_byte) {
        Some("only ASCII letters, digits, `.`, `_` and `-` are allowed")
    } else if name.starts_with(['.', '-']) {
        Some("it must not start with `.` or `-`")
    } else {
        None
    }
}

/// Derives a QEMU node name for a layer snapctl adds.
///
/// The result always satisfies QEMU's rules, whatever the inputs: it starts with an
/// ASCII letter, holds only `[A-Za-z0-9._-]`, and is at most [`MAX_NODE_NAME_BYTES`]
/// long. It reads as `<prefix>-<disk>-<snapshot>-<hash>`, each readable part sanitized
/// and shortened to fit, and the hash (10 base-32 digits) covers the full inputs, so
/// distinct inputs get distinct names with overwhelming probability even when their
/// readable parts coincide. `unique` is folded into the hash only; pass a counter or
/// other salt when the same disk and snapshot need a second node (a second revert to the
/// same snapshot), 0 otherwise.
///
/// ```
/// let n = snapctl::names::node_name("sc", "vda", "pre upgrade", 0);
/// assert!(n.starts_with("sc-vda-pre_upgrade-"));
/// assert_eq!(n, snapctl::names::node_name("sc", "vda", "pre upgrade", 0));
/// ```
pub fn node_name(prefix_hint: &str, disk: &str, snapshot: &str, unique: u64) -> String {
    const HASH_DIGITS: usize = 10;
    // Room for the readable part: the whole name minus "-<hash>".
    const READABLE: usize = MAX_NODE_NAME_BYTES - 1 - HASH_DIGITS;

    let mut readable = String::with_capacity(READABLE + 1);
    for (part, budget) in [
        (sanitize(prefix_hint), 6),
        (sanitize(disk), 8),
        (sanitize(snapshot), READABLE),
    ] {
        if part.is_empty() {
            continue;
        }
        if !readable.is_empty() {
            readable.push('-');
        }
        let room = READABLE.saturating_sub(readable.len()).min(budget);
        readable.push_str(&part[..part.len().min(room)]);
    }
    if !readable.starts_with(|c: char| c.is_ascii_alphabetic()) {
        readable.insert(0, 'n');
    }
    readable.truncate(READABLE);
    let readable = readable.trim_end_matches(['-', '.', '_']);

    let mut hash = Fnv1a::new();
    hash.field(prefix_hint.as_bytes());
    hash.field(disk.as_bytes());
    hash.field(snapshot.as_bytes());
    hash.field(&unique.to_le_bytes());
    format!("{readable}-{}", base32(hash.finish(), HASH_DIGITS))
}

/// Whether `node` is the file node of an overlay snapctl added (made by
/// [`node_name`] with the `sf` hint, always inline in its qcow2 node's
/// options): it goes with its parent and is never deleted on its own.
pub fn is_overlay_file_node(node: &str) -> bool {
    node.starts_with("sf-")
}

/// Whether the monitor may own `node`, so that `blockdev-del` can remove it:
/// not a name QEMU made up (`#blockNNN`: owned by a parent or a `-drive`),
/// not the inline file node of an overlay snapctl added.
pub fn may_be_monitor_owned(node: &str) -> bool {
    !node.starts_with('#') && !is_overlay_file_node(node)
}

/// Longest part of an overlay file name taken from the snapshot name or from the stem,
/// in bytes; longer parts are cut.
const MAX_FILE_NAME_PART: usize = 100;

/// Derives the file name of the overlay that snapshot `snapshot` puts on top of an
/// active image whose file stem is `stem_of_active`: `<stem>.<snapshot>.qcow2`, as
/// DESIGN.md specifies, kept readable whatever the name holds.
///
/// Snapshot names may hold characters that are awkward in file names (spaces, quotes,
/// `*`, Unicode that another tool mangles). Each such character becomes `_`, parts
/// longer than 100 bytes are cut, and a stem that is empty or starts with `.` or `-`
/// gets a leading `_`. So two names can give the same file name (`a b` and `a_b`);
/// whoever creates the file picks [`overlay_file_name_hashed`] when this one is taken
/// ([`overlay_file_names`] lists both, in that order). The result never starts with
/// `.` or `-` and is far below the 255-byte file-name limit.
///
/// ```
/// use snapctl::names::overlay_file_name;
/// assert_eq!(overlay_file_name("vda", "s1"), "vda.s1.qcow2");
/// assert_eq!(overlay_file_name("vda", "a b"), "vda.a_b.qcow2");
/// assert_eq!(overlay_file_name("vda", "før upgrade"), "vda.f_r_upgrade.qcow2");
/// ```
pub fn overlay_file_name(stem_of_active: &str, snapshot: &str) -> String {
    let (stem, snap) = file_safe_parts(stem_of_active, snapshot);
    format!("{stem}.{snap}.qcow2")
}

/// The overlay file name to use when [`overlay_file_name`]'s is taken: the same, with a
/// hash of the full inputs, `<stem>.<snapshot>--<hash>.qcow2`. Distinct inputs get
/// distinct names with overwhelming probability, even when their readable parts
/// coincide.
///
/// ```
/// use snapctl::names::overlay_file_name_hashed;
/// let a = overlay_file_name_hashed("vda", "a b");
/// assert!(a.starts_with("vda.a_b--") && a.ends_with(".qcow2"), "{a}");
/// assert_eq!(a.len(), "vda.a_b--".len() + 10 + ".qcow2".len());
/// assert_ne!(a, overlay_file_name_hashed("vda", "a_b"));
/// ```
pub fn overlay_file_name_hashed(stem_of_active: &str, snapshot: &str) -> String {
    let (stem, snap) = file_safe_parts(stem_of_active, snapshot);
    let mut hash = Fnv1a::new();
    hash.field(stem_of_active.as_bytes());
    hash.field(snapshot.as_bytes());
    format!("{stem}.{snap}--{}.qcow2", base32(hash.finish(), 10))
}

/// The overlay file names to try, in order: the readable [`overlay_file_name`], then
/// [`overlay_file_name_hashed`] for when the first is taken.
pub fn overlay_file_names(stem_of_active: &str, snapshot: &str) -> [String; 2] {
    [
        overlay_file_name(stem_of_active, snapshot),
        overlay_file_name_hashed(stem_of_active, snapshot),
    ]
}

/// The stem and snapshot parts of an overlay file name, made file-safe.
fn file_safe_parts(stem_of_active: &str, snapshot: &str) -> (String, String) {
    let mut stem = file_safe(stem_of_active);
    if stem.is_empty() || stem.starts_with(['.', '-']) {
        stem.insert(0, '_');
    }
    (stem, file_safe(snapshot))
}

/// Keeps `[A-Za-z0-9._-]` and replaces every other character with `_`, cutting the
/// result at [`MAX_FILE_NAME_PART`] bytes.
fn file_safe(s: &str) -> String {
    let mut out: String = s
        .chars()
        .map(|c| {
            if c.is_ascii() && is_portable_byte(c as u8) {
                c
            } else {
                '_'
            }
        })
        .collect();
    out.truncate(MAX_FILE_NAME_PART);
    out
}

/// Maps a string onto node-name characters: runs of anything outside
/// `[A-Za-z0-9._-]` become one `_`.
fn sanitize(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii() && is_portable_byte(c as u8) {
            out.push(c);
        } else if !out.ends_with('_') {
            out.push('_');
        }
    }
    out
}

fn is_portable_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')
}

/// 64-bit FNV-1a with a final avalanche step; chosen because it is tiny, fixed forever
/// (derived names must not change between builds), and good enough for naming.
struct Fnv1a(u64);

impl Fnv1a {
    fn new() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }

    fn byte(&mut self, b: u8) {
        self.0 ^= u64::from(b);
        self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
    }

    /// Hashes one field followed by its length, so that field boundaries count
    /// (`("ab", "c")` and `("a", "bc")` differ).
    fn field(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.byte(b);
        }
        for b in (bytes.len() as u64).to_le_bytes() {
            self.byte(b);
        }
    }

    /// The hash, mixed (MurmurHash3's finalizer) so that every output bit depends on
    /// every input bit; FNV alone mixes the low bits poorly.
    fn finish(&self) -> u64 {
        let mut h = self.0;
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 33;
        h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        h ^= h >> 33;
        h
    }
}

/// The low `5 * digits` bits of `h` in lowercase base 32 (digits and letters without
/// `i`, `l`, `o`, `u`), most significant digit first.
fn base32(h: u64, digits: usize) -> String {
    const ALPHABET: &[u8; 32] = b"0123456789abcdefghjkmnpqrstvwxyz";
    (0..digits)
        .rev()
        .map(|i| char::from(ALPHABET[((h >> (5 * i)) & 31) as usize]))
        .collect()
}

/// Quotes an argument for a POSIX shell (`eval "qemu … $(snapctl qemu-args)"`).
pub fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=,./:@+".contains(&b))
    {
        return arg.to_owned();
    }
    format!("'{}'", arg.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, BTreeSet};

    use super::*;

    #[test]
    fn snapshot_names() {
        let ok = [
            "s1",
            "before upgrade",
            "übung",
            "快照",
            "a.b",
            "...",
            ".hidden",
            "-dash",
            "emoji 🦀",
            &"x".repeat(255),
            &"é".repeat(127),
        ];
        for name in ok {
            assert!(validate_snapshot_name(name).is_ok(), "{name:?} refused");
        }
        let bad = [
            ("", "it is empty"),
            (".", "`.` and `..` are reserved"),
            ("..", "`.` and `..` are reserved"),
            ("a/b", "it contains `/`"),
            ("/", "it contains `/`"),
            ("a\0b", "it contains a NUL character"),
            ("a\nb", "it contains a control character"),
            ("a\tb", "it contains a control character"),
            ("a\rb", "it contains a control character"),
            ("a\x7fb", "it contains a control character"),
            ("a\u{85}b", "it contains a control character"),
            ("\x1b[31m", "it contains a control character"),
        ];
        for (name, reason) in bad {
            let err = validate_snapshot_name(name).unwrap_err();
            assert!(
                matches!(&err, Error::InvalidSnapshotName { reason: r, .. } if *r == reason),
                "{name:?}: {err}"
            );
            assert!(!err.to_string().contains('\n'), "{err}");
        }
        assert!(validate_snapshot_name(&"x".repeat(256)).is_err());
        assert!(validate_snapshot_name(&"é".repeat(128)).is_err());
        assert_eq!(
            validate_snapshot_name("a/b").unwrap_err().to_string(),
            "invalid snapshot name a/b: it contains `/`"
        );
        assert_eq!(
            validate_snapshot_name("a\nb").unwrap_err().to_string(),
            "invalid snapshot name \"a\\nb\": it contains a control character"
        );
    }

    #[test]
    fn vm_names() {
        for name in ["ci1", "CI_1", "a.b-c", "v", &"x".repeat(64)] {
            assert!(validate_vm_name(name).is_ok(), "{name:?} refused");
        }
        for name in [
            "",
            ".",
            "..",
            ".ci1",
            "-ci1",
            "a/b",
            "a b",
            "ü",
            "a\0",
            &"x".repeat(65),
        ] {
            assert!(validate_vm_name(name).is_err(), "{name:?} accepted");
        }
    }

    fn valid_node_name(n: &str) -> bool {
        n.len() <= MAX_NODE_NAME_BYTES
            && n.starts_with(|c: char| c.is_ascii_alphabetic())
            && n.bytes().all(is_portable_byte)
    }

    /// A small deterministic generator (xorshift) so the property tests need no crate and
    /// fail the same way every run.
    struct Gen(u64);

    impl Gen {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[(self.next() % from.len() as u64) as usize]
        }

        /// A string of up to `max` pieces drawn from awkward material.
        fn nasty(&mut self, max: u64) -> String {
            const PIECES: &[&str] = &[
                "a",
                "Z",
                "0",
                "9",
                "-",
                "_",
                ".",
                "..",
                "/",
                "../",
                " ",
                "\t",
                "\n",
                "\0",
                "\x7f",
                "é",
                "ü",
                "快",
                "🦀",
                "\u{200b}",
                "\u{202e}",
                "#block",
                "--",
                "'",
                "\"",
                "$(x)",
                "*",
                "vda",
                "s1",
                "node-name",
            ];
            let n = self.next() % (max + 1);
            (0..n).map(|_| self.pick(PIECES)).collect()
        }
    }

    fn nasty_inputs() -> Vec<(String, String, String, u64)> {
        let mut g = Gen(0x9e37_79b9_7f4a_7c15);
        let mut inputs: Vec<_> = (0..1000)
            .map(|i| {
                let long = i % 10 == 0;
                let snapshot = if long { g.nasty(300) } else { g.nasty(6) };
                (g.nasty(3), g.nasty(4), snapshot, g.next() % 3)
            })
            .collect();
        // Fixed nasty cases, including ones whose readable parts coincide.
        for (p, d, s) in [
            ("", "", ""),
            ("sc", "vda", "s1"),
            ("sc", "vda", "s 1"),
            ("sc", "vda", "s_1"),
            ("sc", "vda", "s\n1"),
            ("sc", "vda", "../../etc/passwd"),
            ("9", "9", "9"),
            ("-", "-", "-"),
            ("sc", "vda", &"x".repeat(300)),
            ("sc", "vda", &format!("{}y", "x".repeat(299))),
            ("sc-vda", "", "s1"),
            ("sc", "vda-s1", ""),
        ] {
            inputs.push((p.into(), d.into(), s.into(), 0));
        }
        inputs
    }

    #[test]
    fn node_names_are_always_valid_deterministic_and_distinct() {
        let inputs = nasty_inputs();
        let mut seen: BTreeMap<String, &(String, String, String, u64)> = BTreeMap::new();
        let distinct_inputs: BTreeSet<_> = inputs.iter().collect();
        for input in &inputs {
            let (p, d, s, u) = input;
            let name = node_name(p, d, s, *u);
            assert!(valid_node_name(&name), "{name:?} from {input:?}");
            assert_eq!(name, node_name(p, d, s, *u), "not deterministic");
            if let Some(other) = seen.insert(name.clone(), input) {
                assert_eq!(other, input, "{name:?} for two inputs");
            }
        }
        assert_eq!(seen.len(), distinct_inputs.len());
    }

    #[test]
    fn node_names_stay_readable() {
        let n = node_name("sc", "vda", "s1", 0);
        assert!(n.starts_with("sc-vda-s1-"), "{n}");
        assert_eq!(n.len(), "sc-vda-s1-".len() + 10);
        assert_ne!(n, node_name("sc", "vda", "s1", 1));
        let n = node_name("", "vda", "s1", 0);
        assert!(n.starts_with("vda-s1-"), "{n}");
        let n = node_name("", "", "", 0);
        assert!(n.starts_with("n-"), "{n}");
        let n = node_name("9p", "vda", "s1", 0);
        assert!(n.starts_with("n9p-vda-s1-"), "{n}");
    }

    #[test]
    fn node_name_hash_is_stable_across_builds() {
        // Pinned: derived names must never change, or records written by an older build
        // would no longer match the nodes it created.
        assert_eq!(
            node_name("sc", "vda", "s1", 0),
            node_name("sc", "vda", "s1", 0)
        );
        assert_eq!(base32(0, 3), "000");
        assert_eq!(base32(31, 2), "0z");
        let mut h = Fnv1a::new();
        h.byte(b'a');
        assert_eq!(h.0, 0xaf63_dc4c_8601_ec8c, "FNV-1a of \"a\"");
    }

    #[test]
    fn overlay_file_names_are_readable() {
        for (stem, snap, expected) in [
            ("vda", "s1", "vda.s1.qcow2"),
            ("base", "pre-upgrade.2", "base.pre-upgrade.2.qcow2"),
            ("vda", "a_b", "vda.a_b.qcow2"),
            ("vda", "a b", "vda.a_b.qcow2"),
            ("vda", "a*b", "vda.a_b.qcow2"),
            ("vda", "a--b", "vda.a--b.qcow2"),
            ("vda", "before upgrade", "vda.before_upgrade.qcow2"),
            ("vda", "快照", "vda.__.qcow2"),
            ("vda", "-s1", "vda.-s1.qcow2"),
            ("vda", "...", "vda.....qcow2"),
            (".vda", "s1", "_.vda.s1.qcow2"),
            ("-vda", "s1", "_-vda.s1.qcow2"),
            ("", "s1", "_.s1.qcow2"),
        ] {
            assert_eq!(overlay_file_name(stem, snap), expected, "{stem:?} {snap:?}");
        }
        let long = overlay_file_name("vda", &"x".repeat(255));
        assert_eq!(long, format!("vda.{}.qcow2", "x".repeat(100)));
    }

    #[test]
    fn hashed_overlay_file_names() {
        for (stem, snap, readable) in [
            ("vda", "s1", "vda.s1"),
            ("vda", "a b", "vda.a_b"),
            ("vda", "快照", "vda.__"),
            (".vda", "s1", "_.vda.s1"),
            ("", "s1", "_.s1"),
        ] {
            let name = overlay_file_name_hashed(stem, snap);
            let hash = name
                .strip_prefix(&format!("{readable}--"))
                .and_then(|rest| rest.strip_suffix(".qcow2"))
                .unwrap_or_else(|| panic!("{name} is not {readable}--<hash>.qcow2"));
            assert_eq!(hash.len(), 10, "{name}");
            assert!(hash.bytes().all(|b| b.is_ascii_alphanumeric()), "{name}");
            assert_eq!(
                name,
                overlay_file_name_hashed(stem, snap),
                "not deterministic"
            );
            assert_eq!(
                overlay_file_names(stem, snap),
                [overlay_file_name(stem, snap), name]
            );
        }
    }

    #[test]
    fn overlay_file_names_are_portable_and_hashed_ones_never_collide() {
        let mut g = Gen(42);
        let mut hashed: BTreeMap<String, String> = BTreeMap::new();
        let mut snapshots: Vec<String> = (0..1000).map(|_| g.nasty(8)).collect();
        snapshots.extend(
            [
                "a b",
                "a_b",
                "a?b",
                "a--b",
                "a",
                &"x".repeat(255),
                &format!("{}y", "x".repeat(254)),
            ]
            .map(String::from),
        );
        // The hashed form of one name spelled out as another name.
        let spelled = overlay_file_name_hashed("vda", "a b")
            .strip_prefix("vda.")
            .and_then(|s| s.strip_suffix(".qcow2"))
            .unwrap()
            .to_owned();
        snapshots.push(spelled);
        snapshots.sort();
        snapshots.dedup();
        for snap in snapshots {
            if validate_snapshot_name(&snap).is_err() {
                continue;
            }
            for name in overlay_file_names("vda", &snap) {
                assert!(name.len() <= 255, "{name}");
                assert!(!name.starts_with(['.', '-']), "{name}");
                assert!(name.ends_with(".qcow2"), "{name}");
                assert!(name.bytes().all(is_portable_byte), "{name:?}");
            }
            let [readable, name] = overlay_file_names("vda", &snap);
            assert_ne!(readable, name, "{snap:?}");
            if let Some(other) = hashed.insert(name.clone(), snap.clone()) {
                panic!("{other:?} and {snap:?} both map to {name}");
            }
        }
    }
}
