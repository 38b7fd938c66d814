//! Read-only views of a VM: snapshot lists, chains, and the arguments that
//! restart QEMU on the current chains. These build the documented JSON shapes
//! (see the README); the binary renders them as tables or JSON.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::Result;
use crate::graph::LiveGraph;
use crate::images;
use crate::names;
use crate::record::{Record, Snapshot};

/// `list --json`.
#[derive(Debug, Serialize)]
pub struct SnapshotList<'a> {
    pub vm: &'a str,
    /// A clone: the VM and snapshot it was cloned from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clone_of: Option<&'a crate::record::CloneOrigin>,
    pub current: Option<&'a str>,
    pub snapshots: Vec<SnapshotView<'a>>,
}

/// One snapshot (`show NAME --json`, and each element of `list --json`).
#[derive(Debug, Serialize)]
pub struct SnapshotView<'a> {
    pub name: &'a str,
    pub parent: Option<&'a str>,
    pub created: String,
    pub description: Option<&'a str>,
    pub kind: crate::record::SnapshotKind,
    pub current: bool,
    /// A checkpoint's memory state: the file and its size on disk.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryView<'a>>,
    /// Per disk, the frozen image (`{"vda": {"image": PATH}}`).
    pub disks: &'a crate::record::SnapshotDisks,
    pub children: Vec<&'a str>,
}

/// Where a checkpoint's memory state is (`show --json`: `"memory": {"file", "bytes"}`).
#[derive(Debug, Serialize)]
pub struct MemoryView<'a> {
    pub file: &'a Path,
    /// Its size; `null` when the file cannot be read.
    pub bytes: Option<u64>,
}

impl<'a> SnapshotView<'a> {
    /// Snapshot `s` of `record`, whose children are `children`.
    pub fn new(record: &'a Record, s: &'a Snapshot, children: &[&'a Snapshot]) -> SnapshotView<'a> {
        SnapshotView {
            name: &s.name,
            parent: s.parent.as_deref(),
            created: s.created.to_string(),
            description: s.description.as_deref(),
            kind: s.kind,
            memory: s.memory.as_ref().map(|m| MemoryView {
                file: &m.path,
                bytes: std::fs::metadata(&m.path).ok().map(|md| md.len()),
            }),
            current: record.current.as_deref() == Some(s.name.as_str()),
            disks: &s.disks,
            children: children.iter().map(|c| c.name.as_str()).collect(),
        }
    }
}

pub fn list(record: &Record) -> SnapshotList<'_> {
    let children = record.children_by_parent();
    SnapshotList {
        vm: &record.vm,
        clone_of: record.clone_of.as_ref(),
        current: record.current.as_deref(),
        snapshots: record
            .snapshots
            .iter()
            .map(|s| {
                let of = children.get(s.name.as_str()).map_or(&[][..], Vec::as_slice);
                SnapshotView::new(record, s, of)
            })
            .collect(),
    }
}

/// One image of a chain (`chain --json`).
#[derive(Debug, Clone, Serialize)]
pub struct ChainEntry {
    pub image: PathBuf,
    pub format: String,
    pub active: bool,
    /// Snapshots whose frozen state this image holds.
    pub snapshots: Vec<String>,
    /// Internal snapshots kept inside this image.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub internal: Vec<String>,
    /// Its persistent dirty bitmaps (from QEMU; not read from headers).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bitmaps: Vec<String>,
    /// Whether snapctl created the image (false: found, never written).
    pub owned: bool,
    /// What the image is, for people: `active (changes since s2)`, `frozen by
    /// s2; changes after s1`, `base; frozen by s1; foreign` (see [`label`]).
    pub label: String,
}

/// `chain --json`.
#[derive(Debug, Serialize)]
pub struct ChainView {
    /// Where the chains were read: `qemu` (live graph) or `images` (headers).
    pub source: &'static str,
    pub disks: BTreeMap<String, Vec<ChainEntry>>,
}

/// The chains of `disks` (all recorded disks when empty): from QEMU's live
/// graph when given, otherwise from the image headers.
pub fn chains(record: &Record, live: Option<&LiveGraph>, only: Option<&str>) -> Result<ChainView> {
    let mut out = BTreeMap::new();
    for (id, disk) in &record.disks {
        if only.is_some_and(|o| o != id) {
            continue;
        }
        let files: Vec<(PathBuf, String, Vec<String>)> = match live.and_then(|g| g.disks.get(id)) {
            Some(d) => d
                .chain
                .iter()
                .map(|l| {
                    let bitmaps = l.bitmaps.iter().map(|b| b.name.clone()).collect();
                    (l.filename.clone(), l.format.clone(), bitmaps)
                })
                .collect(),
            None if live.is_some() => Vec::new(),
            None => images::backing_chain(&disk.active)?
                .into_iter()
                .map(|i| (i.filename, i.format, Vec::new()))
                .collect(),
        };
        let mut entries: Vec<ChainEntry> = files
            .into_iter()
            .enumerate()
            .map(|(i, (image, format, bitmaps))| ChainEntry {
                bitmaps,
                snapshots: record
                    .snapshots
                    .iter()
                    .filter(|s| s.internal.is_none())
                    .filter(|s| s.disks.get(id).is_some_and(|d| d.image == image))
                    .map(|s| s.name.clone())
                    .collect(),
                internal: record
                    .internal_snapshots_in(&image)
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
                owned: record.layers.get(&image).is_some_and(|l| l.owned),
                active: i == 0,
                image,
                format,
                label: String::new(),
            })
            .collect();
        for i in 0..entries.len() {
            entries[i].label = label(&entries, i);
        }
        out.insert(id.clone(), entries);
    }
    Ok(ChainView {
        source: if live.is_some() { "qemu" } else { "images" },
        disks: out,
    })
}

/// What `chain[i]` is (a chain, active image first), for people:
///
/// - the active image: `active (changes since S)`, S being the snapshot that
///   froze the layer below it (`since the start` when none did);
/// - the bottom layer: `base`;
/// - an image snapshots froze: `frozen by S`, and when it is not the base,
///   what it holds: `changes after P`, P being the snapshot that froze the
///   layer below it;
/// - `foreign` when snapctl did not create it.
///
/// The parts are joined with `; `.
pub fn label(chain: &[ChainEntry], i: usize) -> String {
    let entry = &chain[i];
    let below = chain.get(i + 1).filter(|b| !b.snapshots.is_empty());
    let mut parts = Vec::new();
    if entry.active {
        parts.push(match below {
            Some(b) => format!("active (changes since {})", b.snapshots.join(", ")),
            None => "active (changes since the start)".to_owned(),
        });
    } else if i + 1 == chain.len() {
        parts.push("base".to_owned());
    }
    if !entry.snapshots.is_empty() {
        parts.push(format!("frozen by {}", entry.snapshots.join(", ")));
    }
    if !entry.active
        && let Some(b) = below
    {
        parts.push(format!("changes after {}", b.snapshots.join(", ")));
    }
    if !entry.internal.is_empty() {
        parts.push(format!(
            "holds internal snapshot {}",
            entry.internal.join(", ")
        ));
    }
    if !entry.owned {
        parts.push("foreign".to_owned());
    }
    if !entry.bitmaps.is_empty() {
        parts.push(format!("bitmaps {}", entry.bitmaps.join(", ")));
    }
    parts.join("; ")
}

/// The QEMU arguments that reopen the recorded chains: one `-blockdev` per
/// layer, base first, linked by node name, then the `-device` binding.
///
/// Every layer gets the disk's recorded node options ([`crate::record::Disk::node_options`],
/// `file.`-keys on its protocol node); every layer below the active one is
/// opened `"read-only": true` (its protocol node inherits that), so that two
/// QEMUs can share them (a template). Only the format node says so: QEMU
/// reopens a layer read-write for a merge into it (`block-commit`,
/// `block-stream`) only when its protocol node's read-only was inherited.
/// The `-device` carries the recorded properties.
pub fn qemu_args(record: &Record, only: Option<&str>) -> Vec<String> {
    let mut args = Vec::new();
    // A checkpoint reverted while QEMU was stopped: the guest must not run
    // before its memory state is loaded (`snapctl revert NAME` on that QEMU).
    if record.pending_memory.is_some() {
        args.push("-S".to_owned());
    }
    for (id, disk) in &record.disks {
        if only.is_some_and(|o| o != id) {
            continue;
        }
        let mut chain = record.chain(id);
        chain.reverse();
        let mut below: Option<String> = None;
        let top = chain.len().saturating_sub(1);
        for (i, path) in chain.iter().enumerate() {
            let format = record
                .layers
                .get(*path)
                .map(|l| l.format.as_str())
                .unwrap_or("qcow2");
            let node = names::node_name("l", id, &i.to_string(), 0);
            let mut spec = serde_json::json!({
                "driver": format,
                "node-name": node,
                "file": { "driver": "file", "filename": path },
            });
            for (key, value) in &disk.node_options {
                set_dotted(&mut spec, key, value.clone());
            }
            if i != top {
                spec["read-only"] = true.into();
            }
            if let Some(b) = &below {
                spec["backing"] = b.clone().into();
            } else if format == "qcow2" {
                spec["backing"] = serde_json::Value::Null;
            }
            args.push("-blockdev".to_owned());
            args.push(spec.to_string());
            below = Some(node);
        }
        if let Some(top) = below {
            let mut device = format!("{},id={id},drive={top}", disk.device.driver);
            // A property name from a hand-edited record cannot smuggle in
            // another property (`x,drive=…`): only plain names are written.
            let plain = |k: &str| {
                !k.is_empty()
                    && !matches!(k, "id" | "drive" | "driver")
                    && k.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
            };
            for (k, v) in disk.device.extra.iter().filter(|(k, _)| plain(k)) {
                device.push_str(&format!(",{k}={}", v.replace(',', ",,")));
            }
            args.push("-device".to_owned());
            args.push(device);
        }
    }
    args
}

/// Sets `a.b.c` in a `-blockdev` object (`{"a": {"b": {"c": value}}}`),
/// keeping what is there. The node's own keys (`driver`, `node-name`,
/// `filename`, `backing`) are never taken from the record.
fn set_dotted(spec: &mut serde_json::Value, key: &str, value: serde_json::Value) {
    let parts: Vec<&str> = key.split('.').collect();
    let Some((last, path)) = parts.split_last() else {
        return;
    };
    if matches!(*last, "driver" | "node-name" | "filename" | "backing") {
        return;
    }
    let mut at = spec;
    for part in path {
        if !at.get(*part).is_some_and(serde_json::Value::is_object) {
            at[*part] = serde_json::json!({});
        }
        at = &mut at[*part];
    }
    at[*last] = value;
}

pub use crate::names::shell_quote;

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(active: bool, snapshots: &[&str], owned: bool) -> ChainEntry {
        ChainEntry {
            internal: Vec::new(),
            bitmaps: Vec::new(),
            image: PathBuf::from("/img/x.qcow2"),
            format: "qcow2".into(),
            active,
            snapshots: snapshots.iter().map(|s| s.to_string()).collect(),
            owned,
            label: String::new(),
        }
    }

    fn labels(chain: &[ChainEntry]) -> Vec<String> {
        (0..chain.len()).map(|i| label(chain, i)).collect()
    }

    #[test]
    fn chain_labels_say_what_each_image_is() {
        let chain = [
            entry(true, &[], true),
            entry(false, &["s2"], true),
            entry(false, &["s1"], false),
        ];
        assert_eq!(
            labels(&chain),
            [
                "active (changes since s2)",
                "frozen by s2; changes after s1",
                "base; frozen by s1; foreign",
            ]
        );
        // No snapshot yet; a layer below that no snapshot froze.
        let chain = [
            entry(true, &[], true),
            entry(false, &[], false),
            entry(false, &[], false),
        ];
        assert_eq!(
            labels(&chain),
            [
                "active (changes since the start)",
                "foreign",
                "base; foreign"
            ]
        );
        let chain = [
            entry(true, &[], true),
            entry(false, &["s1"], false),
            entry(false, &[], false),
        ];
        assert_eq!(
            labels(&chain),
            [
                "active (changes since s1)",
                "frozen by s1; foreign",
                "base; foreign"
            ]
        );
        assert_eq!(
            labels(&[entry(true, &[], false)]),
            ["active (changes since the start); foreign"]
        );
    }

    fn two_layer_record() -> Record {
        use crate::record::{DeviceBinding, Disk, Layer};
        let mut rec = Record::new("vm1");
        let layer = |backing: Option<&str>| Layer {
            format: "qcow2".into(),
            backing: backing.map(PathBuf::from),
            backing_string: backing.map(str::to_owned),
            owned: false,
            virtual_size: Some(1 << 20),
        };
        rec.layers.insert("/i/base.qcow2".into(), layer(None));
        rec.layers
            .insert("/i/mid.qcow2".into(), layer(Some("/i/base.qcow2")));
        rec.layers
            .insert("/i/top.qcow2".into(), layer(Some("/i/mid.qcow2")));
        rec.disks.insert(
            "vda".into(),
            Disk {
                active: "/i/top.qcow2".into(),
                device: DeviceBinding {
                    driver: "virtio-blk-pci".into(),
                    extra: BTreeMap::from([
                        ("bootindex".into(), "2".into()),
                        ("serial".into(), "a,b".into()),
                        ("x,drive=evil".into(), "1".into()),
                        ("drive".into(), "evil".into()),
                    ]),
                },
                node_options: BTreeMap::from([
                    ("cache.direct".into(), true.into()),
                    ("detect-zeroes".into(), "unmap".into()),
                    ("discard".into(), "unmap".into()),
                    ("file.aio".into(), "threads".into()),
                ]),
            },
        );
        rec
    }

    #[test]
    fn qemu_args_keep_node_options_device_properties_and_open_backing_layers_read_only() {
        let args = qemu_args(&two_layer_record(), None);
        assert_eq!(args.len(), 8, "{args:?}");
        let specs: Vec<serde_json::Value> = args[..6]
            .chunks(2)
            .map(|pair| {
                assert_eq!(pair[0], "-blockdev");
                serde_json::from_str(&pair[1]).unwrap()
            })
            .collect();
        let names: Vec<&str> = specs
            .iter()
            .map(|s| s["node-name"].as_str().unwrap())
            .collect();
        for (i, spec) in specs.iter().enumerate() {
            assert_eq!(spec["detect-zeroes"], "unmap", "{spec}");
            assert_eq!(spec["discard"], "unmap", "{spec}");
            assert_eq!(spec["cache"], serde_json::json!({"direct": true}), "{spec}");
            assert_eq!(spec["file"]["aio"], "threads", "{spec}");
            assert_eq!(spec["file"]["driver"], "file", "{spec}");
            let top = i == 2;
            assert_eq!(
                spec.get("read-only"),
                (!top).then_some(&true.into()),
                "{spec}"
            );
            assert_eq!(spec["file"].get("read-only"), None, "{spec}");
            let backing = if i == 0 {
                serde_json::Value::Null
            } else {
                names[i - 1].into()
            };
            assert_eq!(spec["backing"], backing, "{spec}");
        }
        assert_eq!(specs[0]["file"]["filename"], "/i/base.qcow2");
        assert_eq!(specs[2]["file"]["filename"], "/i/top.qcow2");
        assert_eq!(args[6], "-device");
        assert_eq!(
            args[7],
            format!(
                "virtio-blk-pci,id=vda,drive={},bootindex=2,serial=a,,b",
                names[2]
            )
        );
    }

    #[test]
    fn qemu_args_of_a_one_layer_disk_without_settings_are_as_before() {
        let mut rec = two_layer_record();
        rec.layers.clear();
        rec.layers.insert(
            "/i/top.qcow2".into(),
            crate::record::Layer {
                format: "raw".into(),
                backing: None,
                backing_string: None,
                owned: false,
                virtual_size: None,
            },
        );
        let disk = rec.disks.get_mut("vda").unwrap();
        disk.node_options.clear();
        disk.device.extra.clear();
        let args = qemu_args(&rec, None);
        let spec: serde_json::Value = serde_json::from_str(&args[1]).unwrap();
        assert_eq!(
            spec,
            serde_json::json!({
                "driver": "raw",
                "node-name": spec["node-name"],
                "file": {"driver": "file", "filename": "/i/top.qcow2"},
            })
        );
        assert_eq!(
            args[3],
            format!(
                "virtio-blk-pci,id=vda,drive={}",
                spec["node-name"].as_str().unwrap()
            )
        );
    }

    #[test]
    fn dotted_keys_never_replace_the_nodes_own() {
        let mut spec = serde_json::json!({"driver": "qcow2", "file": {"filename": "/a"}});
        set_dotted(&mut spec, "driver", "raw".into());
        set_dotted(&mut spec, "file.filename", "/b".into());
        set_dotted(&mut spec, "file.cache.no-flush", true.into());
        assert_eq!(
            spec,
            serde_json::json!({"driver": "qcow2", "file": {"filename": "/a", "cache": {"no-flush": true}}})
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("-blockdev"), "-blockdev");
        assert_eq!(shell_quote(r#"{"a":"b c"}"#), r#"'{"a":"b c"}'"#);
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
