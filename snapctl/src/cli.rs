//! The command line, as clap derive types.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// External snapshots of running QEMU VMs, over QMP, without libvirt.
#[derive(Debug, Parser)]
#[command(name = "snapctl", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// The options every command takes, shown under their own heading.
#[derive(Debug, Args)]
#[command(next_help_heading = "Global options")]
pub struct Global {
    /// The VM's name in snapctl's records (optional when only one VM is registered).
    #[arg(long, global = true, env = "SNAPCTL_VM")]
    pub vm: Option<String>,

    /// QEMU's QMP socket for this VM; remembered in the record. Give snapctl its own
    /// monitor (-qmp may be repeated): QEMU serves one client per monitor.
    #[arg(long, global = true, env = "SNAPCTL_SOCKET", value_name = "PATH")]
    pub socket: Option<PathBuf>,

    /// The guest agent's socket (for --quiesce); remembered in the record.
    #[arg(long, global = true, env = "SNAPCTL_QGA", value_name = "PATH")]
    pub qga: Option<PathBuf>,

    /// Where records live [default: $XDG_STATE_HOME/snapctl, /var/lib/snapctl for root].
    #[arg(long, global = true, env = "SNAPCTL_STATE_DIR", value_name = "DIR")]
    pub state_dir: Option<PathBuf>,

    /// Print one JSON document on stdout instead of text.
    #[arg(long, global = true)]
    pub json: bool,

    /// More diagnostics on stderr (repeat for more).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,

    /// Only errors on stderr.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    pub quiet: bool,

    /// How long to wait for another snapctl working on the same VM.
    #[arg(long, global = true, value_name = "SECONDS", default_value = "30", value_parser = seconds)]
    pub lock_wait: Duration,
}

/// Parses the command line.
///
/// Every command's usage line is fixed to what clap renders with nothing
/// given: otherwise clap's "missing argument" message lists the global
/// options set from the environment (`SNAPCTL_VM`, …) as if they were
/// required.
pub fn parse() -> Cli {
    use clap::FromArgMatches;
    let matches = command().get_matches();
    Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
}

/// The command line's definition, with fixed usage lines (see [`parse`]).
pub fn command() -> clap::Command {
    use clap::CommandFactory;
    let mut cmd = Cli::command();
    cmd.build();
    fixed_usage(cmd)
}

fn fixed_usage(mut cmd: clap::Command) -> clap::Command {
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .collect();
    for name in names {
        cmd = cmd.mut_subcommand(&name, |sub| {
            let mut sub = fixed_usage(sub);
            let usage = sub.render_usage().to_string();
            let usage = usage.strip_prefix("Usage: ").unwrap_or(&usage).to_owned();
            sub.override_usage(usage)
        });
    }
    cmd
}

fn seconds(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v >= 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("{s:?} is not a number of seconds"))
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Register a running VM: discover its disks and record their chains (images found
    /// are foreign and never written).
    Init,

    /// Take an external snapshot of all writable disks at once (one QMP transaction).
    Create(CreateArgs),

    /// List snapshots.
    List {
        /// Draw the snapshot tree, the current snapshot marked.
        #[arg(long)]
        tree: bool,
    },

    /// Print the current snapshot: the one the VM's state descends from.
    Current,

    /// Set a snapshot's description (an empty TEXT removes it).
    Describe {
        /// The snapshot.
        name: String,
        /// The new description.
        text: String,
    },

    /// Rename a snapshot (the record only: image files keep their names).
    Rename {
        /// The snapshot's name now.
        old: String,
        /// Its new name.
        new: String,
    },

    /// Show one snapshot in full, with each disk's frozen image.
    Show {
        /// The snapshot.
        name: String,
    },

    /// Show each disk's backing chain, each image labelled with what it is (active, frozen
    /// by a snapshot, base, foreign).
    Chain {
        /// Only this disk (qdev id, e.g. vda).
        disk: Option<String>,
    },

    /// Compare the record with QEMU's graph and the image headers; exit 3 on drift.
    Check {
        /// Adopt what is unambiguous and say what changed.
        #[arg(long)]
        repair: bool,
        /// With --repair: record QEMU's chains as they are, whatever the record
        /// says (after changes made outside snapctl, e.g. a stream by hand).
        #[arg(long, requires = "repair")]
        adopt: bool,
    },

    /// Copy one disk as it was at a snapshot into a standalone image (no backing file),
    /// QEMU running or not.
    Export {
        /// The snapshot.
        name: String,
        /// The disk (optional when the snapshot covers only one).
        #[arg(long, value_name = "ID")]
        disk: Option<String>,
        /// The image to write; it must not exist.
        #[arg(long, short = 'o', value_name = "FILE")]
        output: PathBuf,
        /// The image format.
        #[arg(long, value_name = "FORMAT", default_value = "qcow2", value_parser = ["qcow2", "raw"])]
        format: String,
        /// Compress the qcow2 clusters.
        #[arg(long)]
        compress: bool,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
    },

    /// A new VM standing on a snapshot's frozen images: thin overlays for every disk in
    /// DIR, recorded as VM2 (start it with `snapctl --vm VM2 qemu-args`). The images
    /// it stands on are pinned: neither VM writes, merges away or removes them.
    Clone {
        /// The snapshot.
        name: String,
        /// The new VM's name.
        #[arg(long, value_name = "VM2")]
        to: String,
        /// Where the new overlays go.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
    },

    /// The live backup recipe in one command: a temporary snapshot NAME, a standalone
    /// copy of every disk as of it in DIR, then the temporary overlays committed back:
    /// the chain is as it was. An interrupted backup is rolled back by the next command.
    Backup {
        /// The temporary snapshot's name (also in the copies' file names).
        name: String,
        /// Where the copies go (`<disk>.<NAME>.qcow2`).
        #[arg(long, value_name = "DIR")]
        to: PathBuf,
        /// Freeze the guest's filesystems through the guest agent for the snapshot.
        #[arg(long)]
        quiesce: bool,
        /// The copies' format.
        #[arg(long, value_name = "FORMAT", default_value = "qcow2", value_parser = ["qcow2", "raw"])]
        format: String,
        /// Limit the merge back to RATE bytes per second (e.g. 50M).
        #[arg(long, value_name = "RATE", value_parser = rate)]
        bandwidth: Option<u64>,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
    },

    /// Drop this VM's record (--vm), unpinning what it stood on.
    Forget {
        /// Also remove the images it owns that no other VM uses (QEMU must be stopped).
        #[arg(long)]
        files: bool,
    },

    /// Print the -blockdev/-device arguments that reopen the current chains.
    QemuArgs {
        /// Only this disk.
        disk: Option<String>,
    },

    /// Make a snapshot's state current: a fresh overlay on its frozen images. With QEMU
    /// running the guest is reset onto it (and keeps running, or stays paused, as it was);
    /// with QEMU stopped, restart it with qemu-args.
    Revert {
        /// The snapshot.
        name: String,
        /// Leave the guest paused after a live revert.
        #[arg(long, conflicts_with = "running")]
        paused: bool,
        /// Continue the guest after a live revert, even if it was paused.
        #[arg(long)]
        running: bool,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
    },

    /// Remove a snapshot, merging its layer away when that is safe (commit the newer
    /// delta down or stream the older one up, whichever copies less and writes no
    /// foreign or shared image); otherwise keep the layer and say why.
    Delete {
        /// The snapshot.
        name: String,
        /// Also delete every snapshot descended from it.
        #[arg(long)]
        children: bool,
        /// Only drop the name; leave every image as it is.
        #[arg(long)]
        metadata_only: bool,
        /// Limit each merge job to RATE bytes per second (e.g. 50M, 1G).
        #[arg(long, value_name = "RATE", value_parser = rate)]
        bandwidth: Option<u64>,
        /// Cancel a merge that has not finished after this many seconds.
        #[arg(long, value_name = "SECONDS", value_parser = seconds)]
        timeout: Option<Duration>,
        /// Print the plan and change nothing.
        #[arg(long)]
        dry_run: bool,
    },

    /// block-commit on one disk: merge the layers from --top's down into --base's
    /// (default: the active image into the layer below it, with pivot).
    Commit {
        /// The disk (qdev id).
        disk: String,
        /// The snapshot whose frozen image is the top layer (default: the active image).
        #[arg(long, value_name = "NAME")]
        top: Option<String>,
        /// The snapshot whose frozen image receives the data (default: the layer below the top).
        #[arg(long, value_name = "NAME")]
        base: Option<String>,
        #[command(flatten)]
        job: JobArgs,
    },

    /// block-stream on one disk: copy every layer above --base's into the active
    /// image (default: all of them; the active image becomes standalone).
    Pull {
        /// The disk (qdev id).
        disk: String,
        /// The snapshot whose frozen image stays as the backing.
        #[arg(long, value_name = "NAME")]
        base: Option<String>,
        #[command(flatten)]
        job: JobArgs,
    },

    /// List QEMU's jobs with their progress.
    Jobs,

    /// Act on one of QEMU's jobs.
    Job {
        #[command(subcommand)]
        action: JobAction,
    },

    /// Print shell completions.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },

    /// Print the man page (roff).
    Man,
}

impl Command {
    /// Whether the command only reads: it must then create neither the state
    /// directory nor any file in it.
    pub fn is_read_only(&self) -> bool {
        match self {
            Command::List { .. }
            | Command::Show { .. }
            | Command::Chain { .. }
            | Command::QemuArgs { .. }
            | Command::Current
            | Command::Jobs
            | Command::Job { .. }
            | Command::Completions { .. }
            | Command::Man => true,
            Command::Check { repair, .. } => !repair,
            Command::Init
            | Command::Describe { .. }
            | Command::Rename { .. }
            | Command::Export { .. }
            | Command::Clone { .. }
            | Command::Backup { .. }
            | Command::Forget { .. }
            | Command::Create(_)
            | Command::Revert { .. }
            | Command::Delete { .. }
            | Command::Commit { .. }
            | Command::Pull { .. } => false,
        }
    }
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// The snapshot's name (up to 255 bytes; no '/', NUL or control characters).
    pub name: String,

    /// A free-form description.
    #[arg(long, short = 'd', value_name = "TEXT")]
    pub description: Option<String>,

    /// Only this disk (repeatable).
    #[arg(long = "disk", value_name = "ID")]
    pub disks: Vec<String>,

    /// Leave this disk out (repeatable).
    #[arg(long, value_name = "ID")]
    pub exclude: Vec<String>,

    /// Put DISK's overlay at PATH instead of <dir of active>/<disk>.<NAME>.qcow2.
    #[arg(long = "overlay", value_name = "ID=PATH", value_parser = overlay)]
    pub overlays: Vec<(String, PathBuf)>,

    /// The --overlay files exist already: empty qcow2 images on the disks' active
    /// images, prepared beforehand; use them as they are.
    #[arg(long, requires = "overlays")]
    pub reuse_external: bool,

    /// Freeze the guest's filesystems through the guest agent around the snapshot.
    #[arg(long)]
    pub quiesce: bool,

    /// A checkpoint: the guest's memory and device state too, at the same instant as
    /// the disks (the guest is stopped from before the disks switch until the state
    /// is saved). A revert to it resumes the guest where it was, without a reboot.
    #[arg(long, conflicts_with = "quiesce")]
    pub memory: bool,

    /// An internal snapshot (savevm style): each disk's state inside its own active
    /// qcow2 image, the memory and device state in the first one's; no overlay.
    #[arg(long, conflicts_with_all = ["memory", "quiesce", "overlays", "reuse_external"])]
    pub internal: bool,

    /// Where the checkpoint's state goes [default: beside the first overlay].
    #[arg(long, value_name = "PATH", requires = "memory")]
    pub memory_file: Option<PathBuf>,

    /// Leave the guest paused after the checkpoint (it continues if it ran).
    #[arg(long, requires = "memory")]
    pub paused: bool,

    /// Print the plan (files and QMP commands, in order) and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// `50M`, `1G`, `512K`, `1000` (bytes per second; binary multiples).
fn rate(s: &str) -> Result<u64, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?} is not a rate like 50M"))?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "K" | "k" => 1 << 10,
        "M" | "m" => 1 << 20,
        "G" | "g" => 1 << 30,
        _ => return Err(format!("{s:?} is not a rate like 50M")),
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("{s:?} is not a usable rate"))
}

fn overlay(s: &str) -> Result<(String, PathBuf), String> {
    let (id, path) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?} is not ID=PATH"))?;
    if id.is_empty() || path.is_empty() {
        return Err(format!("{s:?} is not ID=PATH"));
    }
    Ok((id.to_owned(), PathBuf::from(path)))
}

#[derive(Debug, Subcommand)]
pub enum JobAction {
    /// Cancel a job and wait until it has concluded (a cancelled commit may already
    /// have written part of its data into the lower image).
    Cancel {
        /// The job id (see `snapctl jobs`).
        id: String,
    },
    /// Wait until a job has concluded; fails with the job's error if it failed.
    Wait {
        /// The job id (see `snapctl jobs`).
        id: String,
        /// Give up waiting after this many seconds (the job keeps running).
        #[arg(long, value_name = "SECONDS", value_parser = seconds)]
        timeout: Option<Duration>,
    },
}

#[derive(Debug, Args)]
pub struct JobArgs {
    /// Limit the job to RATE bytes per second (e.g. 50M, 1G).
    #[arg(long, value_name = "RATE", value_parser = rate)]
    pub bandwidth: Option<u64>,
    /// Cancel the job if it has not finished after this many seconds.
    #[arg(long, value_name = "SECONDS", value_parser = seconds)]
    pub timeout: Option<Duration>,
    /// Print the plan and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}
