//! Planning `clone`: the template-and-thin-instances pattern. A new VM record
//! whose disks are fresh overlays (in a directory of the user's choosing) on a
//! snapshot's frozen images. The images the clone stands on are pinned in the
//! source VM's record: no operation there writes, merges away or removes them
//! while the clone is recorded (`forget` unpins). In the clone's record they
//! are foreign, never written either.

use std::path::{Path, PathBuf};

use super::{Facts, Plan, Step, image_size, new_file_problem};
use crate::error::{Error, Result};
use crate::names;
use crate::operation::{Clone, DiskClone, Operation};
use crate::record::{CloneOrigin, Disk, Layer, Record};

/// Plans `clone NAME --to VM2 --dir DIR`.
pub fn plan(record: &Record, facts: &Facts<'_>, name: &str, to: &str, dir: &Path) -> Result<Plan> {
    names::validate_vm_name(to)?;
    let snapshot = record.snapshot_named(name)?;
    if snapshot.internal.is_some() {
        return Err(Error::Refused(format!(
            "{name} is an internal snapshot: it lives inside images that keep changing; clone an external one"
        )));
    }
    if to == record.vm {
        return Err(Error::Refused(format!(
            "a clone needs a name other than {to}"
        )));
    }
    let dir = std::path::absolute(dir).map_err(|e| Error::io("resolve", dir, e))?;
    let mut disks = Vec::new();
    for (id, sd) in &snapshot.disks {
        let overlay = dir.join(names::overlay_file_name(id, to));
        if let Some(reason) = new_file_problem(facts, &overlay) {
            return Err(Error::Refused(format!(
                "cannot create {}: {reason}",
                overlay.display()
            )));
        }
        let size = image_size(record, facts, &sd.image)?;
        disks.push(DiskClone {
            disk: id.clone(),
            frozen: sd.image.clone(),
            frozen_format: record.format_of(&sd.image).to_owned(),
            overlay,
            size,
        });
    }
    let clone = Clone {
        snapshot: name.to_owned(),
        to: to.to_owned(),
        disks,
    };
    Ok(Plan {
        steps: steps(&clone),
        operation: Operation::Clone(clone),
    })
}

pub fn steps(clone: &Clone) -> Vec<Step> {
    let mut steps: Vec<Step> = clone
        .disks
        .iter()
        .map(|d| Step::CreateOverlay {
            path: d.overlay.clone(),
            backing: d.frozen.display().to_string(),
            backing_format: d.frozen_format.clone(),
            size: d.size,
        })
        .collect();
    steps.push(Step::Record {
        change: format!(
            "record vm {} (a clone of {}), pin the images it stands on",
            clone.to, clone.snapshot
        ),
    });
    steps
}

/// The images the clone's chains stand on, in the source record.
pub fn stood_on<'r>(record: &'r Record, clone: &'r Clone) -> Vec<&'r Path> {
    clone
        .disks
        .iter()
        .flat_map(|d| record.chain_from(&d.frozen))
        .collect()
}

/// Pins the images the clone stands on in the source record.
pub fn apply(record: &mut Record, clone: &Clone) {
    let images: Vec<PathBuf> = stood_on(record, clone)
        .into_iter()
        .map(Path::to_path_buf)
        .collect();
    for image in images {
        record.pin(&image, &clone.to);
    }
}

/// The clone's own record: its overlays (owned), the chains below them
/// (foreign: the source VM's), the devices as the source VM has them.
pub fn new_record(source: &Record, clone: &Clone) -> Record {
    let mut record = Record::new(clone.to.clone());
    record.clone_of = Some(CloneOrigin {
        vm: source.vm.clone(),
        snapshot: clone.snapshot.clone(),
    });
    for d in &clone.disks {
        for path in source.chain_from(&d.frozen) {
            if let Some(layer) = source.layers.get(path) {
                record.layers.insert(
                    path.to_owned(),
                    Layer {
                        owned: false,
                        ..layer.clone()
                    },
                );
            }
        }
        record.layers.insert(
            d.overlay.clone(),
            Layer {
                format: "qcow2".into(),
                backing: Some(d.frozen.clone()),
                backing_string: Some(d.frozen.display().to_string()),
                owned: true,
                virtual_size: Some(d.size),
            },
        );
        if let Some(disk) = source.disks.get(&d.disk) {
            record.disks.insert(
                d.disk.clone(),
                Disk {
                    active: d.overlay.clone(),
                    device: disk.device.clone(),
                    node_options: disk.node_options.clone(),
                },
            );
        }
    }
    record
}
