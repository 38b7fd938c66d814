//! Running plans against a VM.
//!
//! [`Session`] is the library's entry point: it holds what every command
//! needs (the VM's lock and record, the QMP connection when QEMU runs, the
//! facts a planner reads), plans operations and runs them. A Rust program (a
//! CI harness, say) drives a VM through it without the CLI:
//!
//! ```no_run
//! # async fn demo() -> snapctl::Result<()> {
//! use snapctl::{CreateOptions, RunOptions, Session, SessionOptions, Store};
//! let store = Store::open("/var/lib/snapctl".as_ref())?;
//! let mut vm = Session::open(&store, "ci1", &SessionOptions::socket("/run/ci1.qmp")).await?;
//! vm.create(&CreateOptions::named("golden"), &RunOptions::default()).await?;
//! // … the test changes the disks …
//! vm.revert("golden", &RunOptions::default()).await?;
//! vm.delete("golden", &RunOptions::default()).await?;
//! # Ok(()) }
//! ```
//!
//! One executor (the `exec` module) carries out every plan's steps; [`jobs`] drives
//! the merge jobs among them. The per-operation modules only say what a
//! failure means for their operation (what to undo, what the record keeps);
//! [`recover`] finishes or undoes an operation a crash interrupted.

pub mod backup;
mod clone;
mod create;
mod delete;
mod exec;
mod export;
mod internal;
pub mod jobs;
mod merge;
pub mod recover;
pub mod relay;
mod revert;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use qmp_client::{Client, GuestAgent};
use serde_json::Value;

pub use self::jobs::{Progress, ProgressFn};
use crate::error::{Error, Result};
use crate::graph::{self, LiveGraph};
use crate::operation::Operation;
use crate::plan::{self, DirState, Facts, Host, Plan};
use crate::record::Record;
use crate::store::{Store, VmLock};

/// Set when the user asked to stop (SIGINT/SIGTERM). Operations check it at
/// points where stopping leaves a consistent state.
#[derive(Debug, Clone, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    pub fn new() -> Interrupt {
        Interrupt::default()
    }

    /// Marks the operation as interrupted.
    pub fn raise(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn is_raised(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }

    /// `Err(Error::Interrupted)` once raised.
    pub fn check(&self) -> Result<()> {
        if self.is_raised() {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// How to run a plan.
#[derive(Clone, Default)]
pub struct RunOptions {
    /// Give up on a merge job (an active commit that cannot converge under
    /// heavy guest writes, say) after this long: it is cancelled cleanly.
    pub timeout: Option<Duration>,
    /// Raised on SIGINT/SIGTERM: the operation stops at its next safe point.
    pub interrupt: Interrupt,
    /// Receives merge jobs' progress.
    pub progress: Option<ProgressFn>,
}

impl std::fmt::Debug for RunOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunOptions")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// What a finished operation leaves to say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Outcome {
    /// Things the user should know (a thaw that failed, a file kept open).
    pub warnings: Vec<String>,
    /// The owned files removed because nothing needed them any more.
    pub removed_files: Vec<PathBuf>,
}

/// How to reach a VM's QEMU.
#[derive(Debug, Clone)]
pub struct SessionOptions {
    /// The QMP socket; the record's when `None`. Remembered in the record.
    pub socket: Option<PathBuf>,
    /// The guest agent's socket (for quiesced snapshots); remembered too.
    pub qga: Option<PathBuf>,
    /// How long to wait for another snapctl working on the same VM.
    pub lock_wait: Duration,
    /// How long to wait for QEMU to answer one command.
    pub command_timeout: Duration,
}

impl Default for SessionOptions {
    fn default() -> Self {
        SessionOptions {
            socket: None,
            qga: None,
            lock_wait: Duration::from_secs(30),
            command_timeout: Duration::from_secs(60),
        }
    }
}

impl SessionOptions {
    /// Options for the VM whose QMP socket is `path`.
    pub fn socket(path: impl Into<PathBuf>) -> SessionOptions {
        SessionOptions {
            socket: Some(path.into()),
            ..SessionOptions::default()
        }
    }
}

/// The files on this host, as planners see them.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostFiles;

impl Host for HostFiles {
    fn exists(&self, path: &Path) -> bool {
        path.symlink_metadata().is_ok()
    }

    fn dir_state(&self, dir: &Path) -> DirState {
        match dir.metadata() {
            Ok(m) if !m.is_dir() => DirState::NotADirectory,
            Ok(_) if nix::unistd::access(dir, nix::unistd::AccessFlags::W_OK).is_err() => {
                DirState::ReadOnly
            }
            Ok(_) => DirState::Writable,
            Err(_) => DirState::Missing,
        }
    }

    fn allocated(&self, path: &Path) -> Option<u64> {
        std::fs::metadata(path).ok().map(|m| m.blocks() * 512)
    }

    fn virtual_size(&self, path: &Path) -> Option<u64> {
        crate::images::header(path).ok().map(|i| i.virtual_size)
    }

    fn image(&self, path: &Path) -> Option<plan::ImageFacts> {
        let info = crate::images::header(path).ok()?;
        let has_data = crate::images::holds_data(path).ok()?;
        Some(plan::ImageFacts {
            format: info.format,
            virtual_size: info.virtual_size,
            backing: info
                .backing_path
                .map(|b| std::path::absolute(&b).unwrap_or(b)),
            has_data,
        })
    }
}

/// One VM, locked for this session: its record, its QEMU when it runs.
#[derive(Debug)]
pub struct Session {
    /// Relays QEMU's monitor to other snapctl processes while connected;
    /// first, so that it stops before the lock is released.
    relay: Option<relay::Relay>,
    store: Store,
    lock: VmLock,
    record: Record,
    /// The record file as the session found it (`None`: there was none); a
    /// failed first `create` puts it back.
    before: Option<Record>,
    client: Option<Client>,
    socket: Option<PathBuf>,
    qga: Option<PathBuf>,
    /// QEMU's graph and the guest's run state, read once and forgotten when an
    /// operation changes them.
    live: Option<LiveGraph>,
    /// The graph a merge reads from node names alone ([`Session::read_graph`]):
    /// kept apart from `live`, as its layers carry no bitmaps.
    mapped: Option<LiveGraph>,
    running: Option<bool>,
    /// What registering disks could not read from QEMU, until said (see
    /// [`Session::take_registration_warnings`]).
    registration_warnings: Vec<String>,
}

impl Session {
    /// Locks `vm` (waiting up to `options.lock_wait`), loads its record (a new
    /// one for a VM not registered yet) and connects to its QEMU when that
    /// runs. Nothing is written.
    pub async fn open(store: &Store, vm: &str, options: &SessionOptions) -> Result<Session> {
        let lock = store.lock(vm, options.lock_wait)?;
        let before = lock.load()?;
        let record = before.clone().unwrap_or_else(|| Record::new(vm));
        let socket = options.socket.clone().or_else(|| record.qmp_socket.clone());
        let client = match &socket {
            Some(path) => connect_if_running(path, options.command_timeout).await?,
            None => None,
        };
        let qga = options.qga.clone().or_else(|| record.qga_socket.clone());
        let relay = client.as_ref().and_then(|c| {
            relay::Relay::start(&lock, c)
                .inspect_err(|e| tracing::info!("not relaying QEMU's monitor: {e}"))
                .ok()
        });
        Ok(Session {
            relay,
            store: store.clone(),
            lock,
            record,
            before,
            client,
            socket,
            qga,
            live: None,
            mapped: None,
            running: None,
            registration_warnings: Vec::new(),
        })
    }

    /// The VM's record as this session holds it.
    pub fn record(&self) -> &Record {
        &self.record
    }

    /// Whether the VM had a record when the session opened it.
    pub fn is_registered(&self) -> bool {
        self.before.is_some()
    }

    /// What the disks registered by this session could not have read from
    /// QEMU (one line, or none), taken once: `init` says it; a `create` that
    /// registers disks adds it to its outcome's warnings when it succeeds.
    pub fn take_registration_warnings(&mut self) -> Vec<String> {
        std::mem::take(&mut self.registration_warnings)
    }

    /// QEMU's monitor, when QEMU runs.
    pub fn client(&self) -> Option<&Client> {
        self.client.as_ref()
    }

    /// The client, or a clear error when QEMU does not run.
    pub fn running_client(&self) -> Result<&Client> {
        self.client.as_ref().ok_or_else(|| match &self.socket {
            Some(s) => Error::Refused(format!(
                "QEMU of vm {} is not running (nothing answers on {})",
                self.record.vm,
                s.display()
            )),
            None => Error::Refused(format!(
                "no QMP socket known for vm {}: pass --socket PATH",
                self.record.vm
            )),
        })
    }

    /// QEMU's live graph (read once, until an operation changes it).
    pub async fn live(&mut self) -> Result<Option<&LiveGraph>> {
        if self.live.is_none()
            && let Some(c) = &self.client
        {
            self.live = Some(graph::read(c).await?);
        }
        Ok(self.live.as_ref())
    }

    /// Finishes or undoes what an interrupted run left in the journal;
    /// returns one line per entry resolved. Fails while an entry stays
    /// unresolved (`snapctl check --repair` says why).
    pub async fn settle(&mut self) -> Result<Vec<String>> {
        if self.record.journal.is_empty() {
            return self.settle_backup().await;
        }
        let mut lines =
            recover::recover(self.client.as_ref(), &self.lock, &mut self.record).await?;
        self.live = None;
        self.mapped = None;
        self.running = None;
        if let Some(entry) = self.record.journal.first() {
            return Err(Error::Refused(format!(
                "an interrupted {} (pid {}) left unfinished work: run snapctl check --repair",
                entry.operation.name(),
                entry.pid
            )));
        }
        lines.extend(self.settle_backup().await?);
        Ok(lines)
    }

    /// A backup left in progress is rolled back (QEMU must run to merge back).
    async fn settle_backup(&mut self) -> Result<Vec<String>> {
        if self.record.backup.is_none() || self.client.is_none() {
            return Ok(Vec::new());
        }
        self.roll_back_backup().await
    }

    /// Like [`Session::settle`], but reports instead of failing (`check --repair`).
    pub async fn repair_journal(&mut self) -> Result<Vec<String>> {
        let mut lines =
            recover::recover(self.client.as_ref(), &self.lock, &mut self.record).await?;
        self.live = None;
        self.mapped = None;
        self.running = None;
        if self.record.journal.is_empty() {
            lines.extend(self.settle_backup().await?);
        }
        Ok(lines)
    }

    /// Adds the live disks the record does not know (their device drivers,
    /// device properties and node options read from QEMU, see
    /// [`graph::read_settings`]; what QEMU does not report is said in one
    /// warning, see [`Session::take_registration_warnings`]) and remembers the sockets, in memory; returns the disks added. Saved by [`Session::save`] or with the next operation.
    pub async fn register(&mut self) -> Result<Vec<String>> {
        let client = self.running_client()?.clone();
        let live = match self.live().await? {
            Some(g) => g.clone(),
            None => return Ok(Vec::new()),
        };
        let new: Vec<&crate::graph::LiveDisk> = live
            .disks
            .values()
            .filter(|d| d.snapshottable() && !d.anonymous && !self.record.disks.contains_key(&d.id))
            .collect();
        if !new.is_empty() {
            self.refuse_registered_elsewhere(&live)?;
        }
        let settings = graph::read_settings(&client, &new).await?;
        let mut added = Vec::new();
        for disk in new {
            let driver = graph::device_driver(&client, &disk.id).await?;
            let read = settings.get(&disk.id).cloned().unwrap_or_default();
            self.record.register_disk_with(disk, &driver, &read);
            added.push(disk.id.clone());
        }
        self.registration_warnings
            .extend(graph::unreadable_warning(&settings));
        if let Some(socket) = &self.socket {
            self.record.qmp_socket = Some(absolute(socket)?);
        }
        if let Some(qga) = &self.qga {
            self.record.qga_socket = Some(absolute(qga)?);
        }
        Ok(added)
    }

    /// One QEMU, one record: refuses when another VM's record has the same
    /// QMP socket or knows an image this QEMU writes (two records of one
    /// QEMU would each change the chains under the other).
    fn refuse_registered_elsewhere(&self, live: &LiveGraph) -> Result<()> {
        let socket = match &self.socket {
            Some(s) => Some(absolute(s)?),
            None => None,
        };
        let written: Vec<&Path> = live
            .disks
            .values()
            .filter_map(|d| d.active())
            .map(|l| l.filename.as_path())
            .collect();
        for vm in self.store.list_vms()? {
            if vm == self.record.vm {
                continue;
            }
            let Ok(Some(other)) = self.store.peek(&vm) else {
                continue;
            };
            let same_socket = socket.is_some() && other.qmp_socket == socket;
            let shared = written.iter().find(|p| other.layers.contains_key(**p));
            if same_socket || shared.is_some() {
                let why = match shared {
                    Some(image) if !same_socket => {
                        format!(
                            "its record knows {}, which this QEMU writes",
                            image.display()
                        )
                    }
                    _ => "same QMP socket".to_owned(),
                };
                return Err(Error::Refused(format!(
                    "this QEMU is already registered as vm {vm} ({why}): use --vm {vm}"
                )));
            }
        }
        Ok(())
    }

    /// Saves the record as the session holds it.
    pub fn save(&mut self) -> Result<()> {
        self.lock.save(&self.record)
    }

    /// Changes the record in memory (`check --repair` adopting what QEMU shows);
    /// saved by [`Session::save`].
    pub fn record_mut(&mut self) -> &mut Record {
        &mut self.record
    }

    /// Whether the guest's CPUs run (`None` when QEMU does not), read once.
    async fn run_state(&mut self) -> Result<Option<bool>> {
        if self.running.is_none()
            && let Some(c) = &self.client
        {
            self.running = Some(vm_running(c).await?);
        }
        Ok(self.running)
    }

    /// Reads QEMU's graph for a plan, once. A merge (delete, commit, pull)
    /// reads it from the node names alone ([`graph::read_mapped`]) when the
    /// record's node map holds for this QEMU: it needs each layer's node and
    /// file, not QEMU's description of every layer, whose cost grows with the
    /// square of the chain's depth. Other plans, and a merge the map cannot
    /// serve, read [`Session::live`].
    async fn read_graph(&mut self, merge: bool) -> Result<()> {
        // An open journal entry means an operation stopped half-way: its
        // nodes are not in the map.
        if merge
            && self.live.is_none()
            && self.mapped.is_none()
            && self.record.journal.is_empty()
            && let (Some(client), Some(map)) = (&self.client, &self.record.node_map)
        {
            let disks = self
                .record
                .disks
                .iter()
                .map(|(id, d)| (id.clone(), d.active.clone()))
                .collect();
            let layers = &self.record.layers;
            let layer = |p: &Path| {
                let l = layers.get(p)?;
                Some((l.format.clone(), l.virtual_size?, l.backing_string.clone()))
            };
            self.mapped = graph::read_mapped(client, map, &disks, &layer).await?;
        }
        if !merge || self.mapped.is_none() {
            self.live().await?;
        }
        Ok(())
    }

    /// What a plan is made from, as read by [`Session::read_graph`] (with
    /// `merge`, the node-name graph when there is one).
    fn facts<'h>(&'h self, host: &'h dyn Host, merge: bool) -> Facts<'h> {
        let live = match merge {
            true => self.mapped.as_ref().or(self.live.as_ref()),
            false => self.live.as_ref(),
        };
        Facts {
            live,
            running: self.running,
            now: jiff::Timestamp::now(),
            host,
        }
    }

    /// Plans `create` (registering the VM's disks first, in memory).
    /// With QEMU stopped, a registered VM's snapshot is taken offline.
    pub async fn plan_create(&mut self, opts: &plan::create::CreateOptions) -> Result<Plan> {
        crate::names::validate_snapshot_name(&opts.name)?;
        if self.client.is_some() {
            self.register().await?;
            self.run_state().await?;
        } else if !self.is_registered() {
            self.running_client()?;
        }
        self.read_graph(false).await?;
        let (record, facts) = (&self.record, self.facts(&HostFiles, false));
        if opts.internal {
            return plan::internal::plan_save(record, &facts, opts);
        }
        plan::create::plan(record, &facts, opts)
    }

    /// Plans a revert to `name`; a live revert leaves the guest running or
    /// paused as `after` says (by default as it was).
    pub async fn plan_revert(&mut self, name: &str, after: plan::revert::RunAfter) -> Result<Plan> {
        self.run_state().await?;
        self.read_graph(false).await?;
        let (record, facts) = (&self.record, self.facts(&HostFiles, false));
        if record.snapshot_named(name)?.internal.is_some() {
            return plan::internal::plan_load(record, &facts, name, after);
        }
        plan::revert::plan(record, &facts, name, after)
    }

    /// Plans deleting `name` (only the name with `metadata_only`).
    pub async fn plan_delete(
        &mut self,
        name: &str,
        metadata_only: bool,
        bandwidth: u64,
    ) -> Result<Plan> {
        self.read_graph(true).await?;
        let (record, facts) = (&self.record, self.facts(&HostFiles, true));
        if record.snapshot_named(name)?.internal.is_some() {
            return plan::internal::plan_delete(record, &facts, name, metadata_only);
        }
        plan::delete::plan(record, &facts, name, metadata_only, bandwidth)
    }

    /// Plans `clone NAME --to VM --dir DIR`.
    pub async fn plan_clone(&mut self, name: &str, to: &str, dir: &Path) -> Result<Plan> {
        if self.store.peek(to)?.is_some() {
            return Err(Error::Refused(format!(
                "vm {to} already has a record: choose another name, or `snapctl --vm {to} forget` it"
            )));
        }
        self.read_graph(false).await?;
        let (record, facts) = (&self.record, self.facts(&HostFiles, false));
        plan::clone::plan(record, &facts, name, to, dir)
    }

    /// Drops this VM's record, and with `files` the images it owns that no
    /// other record knows; unpins what it stood on in the other records.
    /// Returns one line per thing done.
    pub fn forget(self, files: bool) -> Result<Vec<String>> {
        let vm = self.record.vm.clone();
        if files && self.client.is_some() {
            return Err(Error::Refused(format!(
                "QEMU of vm {vm} is running: stop it before removing its files"
            )));
        }
        if let Some((image, vms)) = self.record.pins.iter().next() {
            return Err(Error::Refused(format!(
                "clone {} stands on {} of vm {vm}: forget the clones first",
                vms.iter().cloned().collect::<Vec<_>>().join(", "),
                image.display()
            )));
        }
        let others: Vec<Record> = self
            .store
            .list_vms()?
            .into_iter()
            .filter(|v| *v != vm)
            .filter_map(|v| self.store.peek(&v).ok().flatten())
            .collect();
        let mut lines = Vec::new();
        let mut removals = Vec::new();
        if files {
            for (path, layer) in &self.record.layers {
                if layer.owned && !others.iter().any(|o| o.layers.contains_key(path)) {
                    removals.push(path.clone());
                }
            }
            removals.extend(
                self.record
                    .snapshots
                    .iter()
                    .filter_map(|s| s.memory.as_ref().map(|m| m.path.clone())),
            );
        }
        self.lock.restore(None)?;
        lines.push(format!("forgot vm {vm}"));
        for other in others {
            if other.pins.values().any(|vms| vms.contains(&vm)) {
                let lock = self.store.lock(&other.vm, Duration::from_secs(30))?;
                if let Some(mut current) = lock.load()?
                    && current.unpin(&vm)
                {
                    lock.save(&current)?;
                    lines.push(format!(
                        "unpinned the images of vm {} it stood on",
                        other.vm
                    ));
                }
            }
        }
        for path in removals {
            match std::fs::remove_file(&path) {
                Ok(()) => lines.push(format!("removed {}", path.display())),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => lines.push(format!("could not remove {}: {e}", path.display())),
            }
        }
        Ok(lines)
    }

    /// Plans an export of one disk as of a snapshot.
    pub async fn plan_export(&mut self, opts: &plan::export::ExportOptions) -> Result<Plan> {
        self.read_graph(false).await?;
        let (record, facts) = (&self.record, self.facts(&HostFiles, false));
        plan::export::plan(record, &facts, opts)
    }

    /// Plans `commit DISK [--top T] [--base B]`.
    pub async fn plan_commit(
        &mut self,
        disk: &str,
        top: Option<&str>,
        base: Option<&str>,
        bandwidth: u64,
    ) -> Result<Plan> {
        self.read_graph(true).await?;
        let (record, facts) = (&self.record, self.facts(&HostFiles, true));
        plan::merge::plan_commit(record, &facts, disk, top, base, bandwidth)
    }

    /// Plans `pull DISK [--base B]`.
    pub async fn plan_pull(
        &mut self,
        disk: &str,
        base: Option<&str>,
        bandwidth: u64,
    ) -> Result<Plan> {
        self.read_graph(true).await?;
        let (record, facts) = (&self.record, self.facts(&HostFiles, true));
        plan::merge::plan_pull(record, &facts, disk, base, bandwidth)
    }

    /// Runs a plan made by this session. The record is updated (and saved) as
    /// the plan's record step says; on failure it says what is left.
    pub async fn run(&mut self, plan: &Plan, options: &RunOptions) -> Result<Outcome> {
        if let Some(relay) = &self.relay {
            relay.set_operation(plan.operation.name());
        }
        // A job changes the chain under a revert or a merge; a snapshot of
        // other disks may go ahead (QEMU refuses one of a busy node itself).
        if let Some(c) = &self.client
            && !matches!(plan.operation, Operation::Create(_))
        {
            refuse_running_jobs(c).await?;
        }
        // QEMU's snapshot-save/-load cannot work with these migration
        // capabilities on (they fail half-way): refuse before anything changes.
        if let Some(c) = &self.client
            && plan.steps.iter().any(|s| {
                matches!(s, plan::Step::Qmp { command, .. }
                    if command == "snapshot-save" || command == "snapshot-load")
            })
        {
            refuse_stream_capabilities(c).await?;
        }
        // Only a plan that stops the guest needs to know whether it ran.
        let stops = plan
            .steps
            .iter()
            .any(|s| matches!(s, plan::Step::Qmp { command, .. } if command == "stop"));
        let was_running = stops && self.run_state().await? == Some(true);
        let mut agent = match &plan.operation {
            Operation::Create(c) if c.quiesce => Some(self.connect_agent().await?),
            _ => None,
        };
        let ctx = Context {
            client: self.client.as_ref(),
            lock: &self.lock,
            record: &mut self.record,
            options,
            was_running,
            planned_on: self.live.as_ref().or(self.mapped.as_ref()),
        };
        let result = match &plan.operation {
            Operation::Create(op) => create::run(ctx, op, &plan.steps, agent.as_mut()).await,
            Operation::Revert(op) => revert::run(ctx, op, &plan.steps).await,
            Operation::Delete(op) => delete::run(ctx, op, &plan.steps).await,
            Operation::Commit(op) | Operation::Pull(op) => {
                merge::run(ctx, op, &plan.operation, &plan.steps).await
            }
            Operation::Internal(op) => internal::run(ctx, op, &plan.steps).await,
            Operation::Export(op) => export::run(ctx, op, &plan.steps).await,
            Operation::Clone(op) => clone::run(ctx, &self.store, op, &plan.steps).await,
            Operation::Unreadable { op, .. } => Err(Error::Refused(format!(
                "cannot run an unreadable {op} plan"
            ))),
        };
        self.live = None;
        self.mapped = None;
        self.running = None;
        if result.is_err() && matches!(plan.operation, Operation::Create(_)) {
            // Nothing was changed in QEMU or on disk: neither is the record,
            // not even the registration this create would have added.
            self.lock.restore(self.before.as_ref())?;
            if let Some(before) = &self.before {
                self.record = before.clone();
            }
        }
        let mut result = result;
        if let (Ok(outcome), Operation::Create(_) | Operation::Internal(_)) =
            (&mut result, &plan.operation)
        {
            let mut warnings = self.take_registration_warnings();
            warnings.append(&mut outcome.warnings);
            outcome.warnings = warnings;
        }
        result
    }

    async fn connect_agent(&self) -> Result<GuestAgent> {
        let path = self.qga.as_ref().ok_or_else(|| {
            Error::GuestAgent("--quiesce needs the guest agent socket: pass --qga PATH".into())
        })?;
        GuestAgent::connect(path, Duration::from_secs(5))
            .await
            .map_err(|e| {
                Error::GuestAgent(format!(
                    "--quiesce: the guest agent at {} does not answer ({e})",
                    path.display()
                ))
            })
    }

    /// Takes snapshot `opts.name` of every chosen disk.
    pub async fn create(
        &mut self,
        opts: &plan::create::CreateOptions,
        options: &RunOptions,
    ) -> Result<Outcome> {
        let plan = self.plan_create(opts).await?;
        self.run(&plan, options).await
    }

    /// Reverts to snapshot `name` (a guest that ran continues afterwards).
    pub async fn revert(&mut self, name: &str, options: &RunOptions) -> Result<Outcome> {
        let plan = self.plan_revert(name, plan::revert::RunAfter::Keep).await?;
        self.run(&plan, options).await
    }

    /// Deletes snapshot `name`, merging its layers away where that is safe.
    pub async fn delete(&mut self, name: &str, options: &RunOptions) -> Result<Outcome> {
        let plan = self.plan_delete(name, false, 0).await?;
        self.run(&plan, options).await
    }
}

/// What every operation's runner works with.
pub(crate) struct Context<'a> {
    pub client: Option<&'a Client>,
    pub lock: &'a VmLock,
    pub record: &'a mut Record,
    pub options: &'a RunOptions,
    pub was_running: bool,
    /// QEMU's graph the plan was made on, when it was read.
    pub planned_on: Option<&'a LiveGraph>,
}

/// An operation begun: journaled, its steps carried out as far as they went.
pub(crate) struct Begun<'a> {
    pub exec: exec::Executor<'a>,
    pub journal: u64,
}

impl<'a> Context<'a> {
    /// Journals `operation`, then runs `steps`. At the record step `apply`
    /// changes the record (saved then when `save_at_record`, otherwise with the
    /// journal's resolution).
    pub async fn begin(
        &mut self,
        operation: Operation,
        steps: &[plan::Step],
        agent: Option<&'a mut GuestAgent>,
        apply: &(dyn Fn(&mut Record) + Sync),
        save_at_record: bool,
    ) -> Result<(Begun<'a>, std::result::Result<(), exec::Failure>)> {
        let journal = self.lock.begin(self.record, operation)?;
        let mut exec = exec::Executor::new(
            self.client,
            agent,
            self.options,
            self.was_running,
            self.planned_on,
        );
        let (lock, record) = (self.lock, &mut *self.record);
        let result = exec
            .run(steps, &mut || {
                apply(record);
                if save_at_record {
                    lock.save(record)?;
                }
                Ok(())
            })
            .await;
        Ok((Begun { exec, journal }, result))
    }

    /// The operation is done: its journal entry goes, the record is saved,
    /// with the nodes QEMU now has for the disks' chains when it runs.
    pub async fn finish(&mut self, mut begun: Begun<'_>) -> Result<Outcome> {
        if let Some(client) = self.client {
            let layout = match begun.exec.layout.take() {
                Some(layout) => Some(layout),
                None => graph::read_layout(client).await.ok().flatten(),
            };
            self.record.node_map = layout.and_then(|l| {
                graph::map_nodes(graph::QemuProcess::of(client), &l, &begun.exec.known)
            });
        }
        self.lock.resolve(self.record, begun.journal)?;
        Ok(Outcome {
            warnings: begun.exec.warnings,
            removed_files: begun.exec.removed,
        })
    }

    /// The operation stopped: undoes what its steps did unless they had
    /// switched something or recorded the result. Returns whether a commit
    /// job had begun writing into its base (the caller then says what that
    /// destroyed).
    pub async fn stop(&mut self, begun: &mut Begun<'_>, failure: &exec::Failure) -> bool {
        if failure.recorded {
            return false;
        }
        failure.switched || begun.exec.rollback().await
    }

    /// Resolves the journal entry of an operation that stopped, then fails
    /// with `error`. A node map stays only if nothing had switched (what
    /// the steps added was removed again).
    pub fn abandon(&mut self, begun: &Begun<'_>, error: Error) -> Result<Outcome> {
        if begun.exec.switched() {
            self.record.node_map = None;
        }
        self.lock.resolve(self.record, begun.journal)?;
        Err(error)
    }
}

fn absolute(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path).map_err(|e| Error::io("resolve", path, e))
}

/// Connects when QEMU runs; `None` when the socket is absent or refuses
/// (QEMU stopped). A busy or non-QMP socket is an error.
pub async fn connect_if_running(
    socket: &Path,
    command_timeout: Duration,
) -> Result<Option<Client>> {
    let connected = qmp_client::Config::new()
        .connect_timeout(Duration::from_secs(5))
        .greeting_timeout(Duration::from_secs(5))
        .command_timeout(Some(command_timeout))
        .connect_unix(socket)
        .await;
    match connected {
        Ok((client, connection)) => {
            tokio::spawn(connection);
            Ok(Some(client))
        }
        Err(qmp_client::Error::Connect { source, .. })
            if matches!(
                source.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Whether every disk of a create now writes its new overlay (the
/// transaction happened), judging by QEMU's graph.
async fn overlays_active(client: &Client, op: &crate::operation::Create) -> bool {
    match graph::read(client).await {
        Ok(g) => op.disks.iter().all(|d| {
            g.disks
                .get(&d.disk)
                .and_then(|disk| disk.active())
                .is_some_and(|a| a.node == d.overlay_node)
        }),
        Err(_) => false,
    }
}

/// Whether the guest's CPUs run.
async fn vm_running(client: &Client) -> Result<bool> {
    let status = client.execute_raw("query-status", Value::Null).await?;
    Ok(status.get("running").and_then(Value::as_bool) == Some(true))
}

/// Refuses when a migration capability that `snapshot-save`/`-load` cannot
/// work with is on (`mapped-ram`, `multifd`: set for migrations to files).
async fn refuse_stream_capabilities(client: &Client) -> Result<()> {
    let caps = client
        .execute_raw("query-migrate-capabilities", Value::Null)
        .await?;
    let on: Vec<&str> = caps
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["state"] == true)
        .filter_map(|c| c["capability"].as_str())
        .filter(|c| matches!(*c, "mapped-ram" | "multifd"))
        .collect();
    if on.is_empty() {
        return Ok(());
    }
    Err(Error::Refused(format!(
        "QEMU has the migration capability {} on, with which it cannot save or load a VM state inside an image: turn it off (migrate-set-capabilities) first",
        on.join(", ")
    )))
}

/// Refuses when QEMU runs a job: the chain may be changing under us.
async fn refuse_running_jobs(client: &Client) -> Result<()> {
    let jobs = client.query_jobs().await?;
    if let Some(job) = jobs.iter().find(|j| !j.status.is_finished()) {
        return Err(Error::Refused(format!(
            "QEMU runs job {} ({}, {}): wait for it or cancel it first",
            job.id, job.kind, job.status
        )));
    }
    Ok(())
}
