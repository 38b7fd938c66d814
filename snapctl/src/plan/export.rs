//! Planning `export`: a standalone image (no backing file) of one disk as it
//! was at a snapshot, QEMU running or not. The snapshot's frozen image never
//! changes, so `qemu-img convert` reads its chain while QEMU runs (shared,
//! read-only); an internal snapshot is read from inside its image. The output
//! file is claimed first (`O_EXCL`: never over an existing file) and then
//! filled (`convert -n`).

use std::path::{Path, PathBuf};

use super::{Facts, Plan, Step, image_size, new_file_problem};
use crate::error::{Error, Result};
use crate::operation::{Export, Operation};
use crate::record::Record;

/// What the user asked `export` for.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    pub snapshot: String,
    /// The disk; may be left out when the snapshot covers only one.
    pub disk: Option<String>,
    pub output: PathBuf,
    /// `qcow2` or `raw`.
    pub format: String,
    /// Compressed qcow2 clusters.
    pub compress: bool,
}

/// Plans an export.
pub fn plan(record: &Record, facts: &Facts<'_>, opts: &ExportOptions) -> Result<Plan> {
    let snapshot = record.snapshot_named(&opts.snapshot)?;
    let disk = match &opts.disk {
        Some(d) => d.clone(),
        None if snapshot.disks.len() == 1 => {
            snapshot.disks.keys().next().cloned().unwrap_or_default()
        }
        None => {
            return Err(Error::Refused(format!(
                "snapshot {} covers {}: choose one with --disk",
                opts.snapshot,
                snapshot
                    .disks
                    .keys()
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    };
    let Some(sd) = snapshot.disks.get(&disk) else {
        return Err(Error::UnknownDisk {
            vm: record.vm.clone(),
            disk,
            known: snapshot
                .disks
                .keys()
                .cloned()
                .collect::<Vec<_>>()
                .join(", "),
        });
    };
    if !matches!(opts.format.as_str(), "qcow2" | "raw") {
        return Err(Error::Refused(format!(
            "--format {}: snapctl exports qcow2 or raw",
            opts.format
        )));
    }
    if opts.compress && opts.format != "qcow2" {
        return Err(Error::Refused("--compress needs --format qcow2".into()));
    }
    let output =
        std::path::absolute(&opts.output).map_err(|e| Error::io("resolve", &opts.output, e))?;
    if let Some(reason) = new_file_problem(facts, &output) {
        return Err(Error::Refused(format!(
            "cannot export to {}: {reason}",
            output.display()
        )));
    }
    if record.layers.contains_key(&output) {
        return Err(Error::Refused(format!(
            "cannot export to {}: it is one of the VM's images",
            output.display()
        )));
    }
    let size = image_size(record, facts, &sd.image)?;
    let export = Export {
        snapshot: opts.snapshot.clone(),
        disk,
        source: sd.image.clone(),
        source_format: record.format_of(&sd.image).to_owned(),
        internal_tag: snapshot.internal.as_ref().map(|i| i.tag.clone()),
        output,
        format: opts.format.clone(),
        compress: opts.compress,
        size,
    };
    Ok(Plan {
        steps: steps(&export),
        operation: Operation::Export(export),
    })
}

/// The steps: claim the output as an empty image, fill it with the chain's data.
pub fn steps(export: &Export) -> Vec<Step> {
    let path = |p: &Path| p.to_string_lossy().into_owned();
    let mut argv: Vec<String> = ["qemu-img", "convert", "-q", "-U", "-n"]
        .map(str::to_owned)
        .to_vec();
    argv.extend(["-f".into(), export.source_format.clone()]);
    if let Some(tag) = &export.internal_tag {
        argv.extend(["-l".into(), format!("snapshot.name={tag}")]);
    }
    argv.extend(["-O".into(), export.format.clone()]);
    if export.compress {
        argv.push("-c".into());
    }
    argv.extend([path(&export.source), path(&export.output)]);
    vec![
        Step::CreateImage {
            path: export.output.clone(),
            format: export.format.clone(),
            size: export.size,
        },
        Step::Tool { argv },
    ]
}
