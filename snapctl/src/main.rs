//! The `snapctl` command: a thin layer over the engine in the `snapctl` library.
//! It owns stdout/stderr; errors are printed once, as one line, with exit status 1
//! (3 when `check` finds drift, 2 for usage errors).

mod cli;
mod output;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{CommandFactory, Parser};
use qmp_client::{Client, GuestAgent};
use snapctl::create::Interrupt;
use snapctl::plan::{self, CreateOptions};
use snapctl::record::Record;
use snapctl::{Store, check, graph, revert, views};

use crate::cli::{Cli, Command, CreateArgs, JobAction, JobArgs};

/// Exit status when `check` finds drift.
const EXIT_DRIFT: u8 = 3;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.global.verbose, cli.global.quiet);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("snapctl: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(err) => {
            if is_broken_pipe(&err) {
                return ExitCode::SUCCESS;
            }
            eprintln!("snapctl: {}", one_line(&err));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, each fact once.
fn one_line(err: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in err.chain() {
        let text = cause.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ").replace('\n', " ")
}

fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn init_tracing(verbose: u8, quiet: bool) {
    let level = match (quiet, verbose) {
        (true, _) => "error",
        (false, 0) => "warn",
        (false, 1) => "info",
        (false, 2) => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("SNAPCTL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    match &cli.command {
        Command::Completions { shell } => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "snapctl",
                &mut std::io::stdout(),
            );
            return Ok(ExitCode::SUCCESS);
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            return Ok(ExitCode::SUCCESS);
        }
        _ => {}
    }
    let store = Store::open(&g.state_dir.clone().unwrap_or_else(Store::default_dir))?;
    let vm = resolve_vm(&store, g.vm.as_deref())?;
    match &cli.command {
        Command::Init => init(&cli, &store, &vm).await,
        Command::Create(args) => create(&cli, &store, &vm, args).await,
        Command::List { tree } => {
            let record = registered(&store, &vm)?;
            output::list(&record, *tree, g.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { name } => {
            let record = registered(&store, &vm)?;
            let snapshot =
                record
                    .snapshot(name)
                    .ok_or_else(|| snapctl::Error::UnknownSnapshot {
                        vm: vm.clone(),
                        name: name.clone(),
                    })?;
            output::show(&record, snapshot, g.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Chain { disk } => {
            let record = registered(&store, &vm)?;
            if let Some(d) = disk
                && !record.disks.contains_key(d)
            {
                return Err(snapctl::Error::UnknownDisk {
                    vm: vm.clone(),
                    disk: d.clone(),
                    known: record.disks.keys().cloned().collect::<Vec<_>>().join(", "),
                }
                .into());
            }
            let client = connect_if_running(socket_of(g, Some(&record)).as_deref()).await?;
            let live = graph::read_if_running(client.as_ref()).await?;
            let view = views::chains(&record, live.as_ref(), disk.as_deref())?;
            output::chain(&view, g.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { repair } => check_cmd(&cli, &store, &vm, *repair).await,
        Command::Delete {
            name,
            children,
            metadata_only,
            bandwidth,
            timeout,
            dry_run,
        } => {
            let options = snapctl::delete::JobOptions {
                bandwidth: bandwidth.unwrap_or(0),
                timeout: *timeout,
                interrupt: Interrupt::new(),
                progress: Some(output::progress_reporter(g.json)),
            };
            delete(
                &cli,
                &store,
                &vm,
                name,
                *children,
                *metadata_only,
                &options,
                *dry_run,
            )
            .await
        }
        Command::Commit {
            disk,
            top,
            base,
            job,
        } => {
            raw_merge(&cli, &store, &vm, job, |record, live| {
                snapctl::merge::plan_commit(record, live, disk, top.as_deref(), base.as_deref())
            })
            .await
        }
        Command::Pull { disk, base, job } => {
            raw_merge(&cli, &store, &vm, job, |record, live| {
                snapctl::merge::plan_pull(record, live, disk, base.as_deref())
            })
            .await
        }
        Command::Jobs => {
            let record = registered(&store, &vm)?;
            let client = connect(&need_socket(g, Some(&record))?).await?;
            let jobs = client.query_jobs().await?;
            output::jobs(&jobs, g.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Job { action } => {
            let record = registered(&store, &vm)?;
            let client = connect(&need_socket(g, Some(&record))?).await?;
            job_action(&client, action, g.json).await
        }
        Command::Revert {
            name,
            paused,
            dry_run,
        } => revert(&cli, &store, &vm, name, *paused, *dry_run).await,
        Command::QemuArgs { disk } => {
            let record = registered(&store, &vm)?;
            let args = views::qemu_args(&record, disk.as_deref());
            if g.json {
                output::json(&args)?;
            } else {
                let line: Vec<String> = args.iter().map(|a| views::shell_quote(a)).collect();
                writeln!(std::io::stdout(), "{}", line.join(" "))?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Completions { .. } | Command::Man => unreachable!("handled above"),
    }
}

/// The VM to work on: `--vm`, or the only registered one.
fn resolve_vm(store: &Store, vm: Option<&str>) -> anyhow::Result<String> {
    if let Some(vm) = vm {
        snapctl::names::validate_vm_name(vm)?;
        return Ok(vm.to_owned());
    }
    let vms = store.list_vms()?;
    match vms.as_slice() {
        [only] => Ok(only.clone()),
        [] => bail!("no VM given: pass --vm NAME (or set SNAPCTL_VM)"),
        _ => bail!(
            "several VMs are registered ({}): pass --vm NAME",
            vms.join(", ")
        ),
    }
}

fn registered(store: &Store, vm: &str) -> anyhow::Result<Record> {
    store
        .peek(vm)?
        .ok_or_else(|| snapctl::Error::UnknownVm { vm: vm.to_owned() }.into())
}

fn socket_of(g: &cli::Global, record: Option<&Record>) -> Option<PathBuf> {
    g.socket
        .clone()
        .or_else(|| record.and_then(|r| r.qmp_socket.clone()))
}

async fn connect(socket: &Path) -> anyhow::Result<Client> {
    let (client, connection) = qmp_client::Config::new()
        .connect_timeout(Duration::from_secs(5))
        .greeting_timeout(Duration::from_secs(5))
        .command_timeout(Some(Duration::from_secs(60)))
        .connect_unix(socket)
        .await?;
    tokio::spawn(connection);
    Ok(client)
}

/// Connects when QEMU runs; `None` when the socket is absent or refuses
/// (QEMU stopped). A busy or non-QMP socket is an error.
async fn connect_if_running(socket: Option<&Path>) -> anyhow::Result<Option<Client>> {
    let Some(socket) = socket else {
        return Ok(None);
    };
    match connect(socket).await {
        Ok(c) => Ok(Some(c)),
        Err(e) => match e.downcast_ref::<qmp_client::Error>() {
            Some(qmp_client::Error::Connect { source, .. })
                if matches!(
                    source.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
                ) =>
            {
                Ok(None)
            }
            _ => Err(e),
        },
    }
}

fn need_socket(g: &cli::Global, record: Option<&Record>) -> anyhow::Result<PathBuf> {
    socket_of(g, record).context("no QMP socket known for this VM: pass --socket PATH")
}

/// The record to update, or a fresh one for an unregistered VM.
fn load_or_new(lock: &snapctl::VmLock, vm: &str) -> anyhow::Result<Record> {
    Ok(lock.load()?.unwrap_or_else(|| Record::new(vm)))
}

/// Registers the live disks the record lacks (their drivers read through QOM).
async fn register(
    client: &Client,
    record: &mut Record,
    live: &graph::LiveGraph,
) -> anyhow::Result<Vec<String>> {
    let mut drivers = std::collections::BTreeMap::new();
    for disk in live.disks.values().filter(|d| d.snapshottable()) {
        if !record.disks.contains_key(&disk.id) {
            drivers.insert(
                disk.id.clone(),
                graph::device_driver(client, &disk.id).await?,
            );
        }
    }
    Ok(plan::register(record, live, &drivers))
}

fn remember_sockets(g: &cli::Global, record: &mut Record, socket: &Path) -> anyhow::Result<()> {
    record.qmp_socket = Some(std::path::absolute(socket)?);
    if let Some(qga) = &g.qga {
        record.qga_socket = Some(std::path::absolute(qga)?);
    }
    Ok(())
}

async fn init(cli: &Cli, store: &Store, vm: &str) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    let lock = store.lock(vm, g.lock_wait)?;
    let mut record = load_or_new(&lock, vm)?;
    let socket = need_socket(g, Some(&record))?;
    let client = connect(&socket).await?;
    let live = graph::read(&client).await?;
    let added = register(&client, &mut record, &live).await?;
    if record.disks.is_empty() {
        return Err(snapctl::Error::NoWritableDisk { vm: vm.to_owned() }.into());
    }
    remember_sockets(g, &mut record, &socket)?;
    lock.save(&record)?;
    output::init(&record, &added, g.json)?;
    Ok(ExitCode::SUCCESS)
}

async fn create(cli: &Cli, store: &Store, vm: &str, args: &CreateArgs) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    // Bad names fail before anything is opened.
    snapctl::names::validate_snapshot_name(&args.name)?;
    let lock = store.lock(vm, g.lock_wait)?;
    let mut before = lock.load()?;
    let mut record = before.clone().unwrap_or_else(|| Record::new(vm));
    let socket = need_socket(g, Some(&record))?;
    let client = connect(&socket).await?;
    if let Some(settled) = before.as_mut().filter(|_| !args.dry_run) {
        settle_journal(Some(&client), &lock, settled).await?;
        record = settled.clone();
    }
    let live = graph::read(&client).await?;
    let mut updated = record.clone();
    register(&client, &mut updated, &live).await?;
    remember_sockets(g, &mut updated, &socket)?;

    let opts = CreateOptions {
        name: args.name.clone(),
        description: args.description.clone(),
        disks: args.disks.clone(),
        exclude: args.exclude.clone(),
        overlays: args.overlays.iter().cloned().collect(),
        quiesce: args.quiesce,
    };
    let plan = plan::plan_create(&updated, &live, &opts, jiff::Timestamp::now())?;
    if args.dry_run {
        output::plan(&plan.steps(), g.json)?;
        return Ok(ExitCode::SUCCESS);
    }

    let mut agent = if args.quiesce {
        let path = g
            .qga
            .clone()
            .or_else(|| updated.qga_socket.clone())
            .context("--quiesce needs the guest agent socket: pass --qga PATH")?;
        let agent = GuestAgent::connect(&path, Duration::from_secs(5))
            .await
            .with_context(|| {
                format!(
                    "--quiesce: the guest agent at {} does not answer",
                    path.display()
                )
            })?;
        Some(agent)
    } else {
        None
    };

    let interrupt = Interrupt::new();
    let watcher = watch_signals(interrupt.clone());
    record = updated;
    let result = snapctl::create::run(
        &client,
        &lock,
        &mut record,
        &plan,
        agent.as_mut(),
        &interrupt,
    )
    .await;
    watcher.abort();
    let warnings = match result {
        Ok(warnings) => warnings,
        Err(e) => {
            // Nothing was changed in QEMU or on disk: neither is the record,
            // not even the registration this command would have added.
            lock.restore(before.as_ref())?;
            return Err(e.into());
        }
    };
    for w in &warnings {
        tracing::warn!("{w}");
    }
    output::created(&plan, &warnings, g.json)?;
    Ok(ExitCode::SUCCESS)
}

/// Turns SIGINT/SIGTERM into a raised [`Interrupt`]; the operation stops at
/// its next safe point instead of dying half-way.
fn watch_signals(interrupt: Interrupt) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => return,
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        interrupt.raise();
    })
}

async fn check_cmd(cli: &Cli, store: &Store, vm: &str, repair: bool) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    let lock = store.lock(vm, g.lock_wait)?;
    let Some(mut record) = lock.load()? else {
        return Err(snapctl::Error::UnknownVm { vm: vm.to_owned() }.into());
    };
    let client = connect_if_running(socket_of(g, Some(&record)).as_deref()).await?;
    let mut changes = Vec::new();
    if repair {
        changes = snapctl::recover::recover(client.as_ref(), &lock, &mut record).await?;
    }
    let (live, jobs) = match &client {
        Some(c) => {
            let live = graph::read(c).await?;
            let jobs = c
                .query_jobs()
                .await?
                .into_iter()
                .map(|j| check::RunningJob {
                    id: j.id,
                    kind: j.kind,
                    status: j.status.to_string(),
                })
                .collect();
            (Some(live), jobs)
        }
        None => (None, Vec::new()),
    };
    if repair {
        let adopted = check::repair(&mut record, live.as_ref());
        if !adopted.is_empty() {
            lock.save(&record)?;
        }
        changes.extend(adopted);
    }
    let drifts = check::drifts(&record, live.as_ref(), &jobs);
    output::check(&drifts, &changes, live.is_some(), g.json)?;
    Ok(if drifts.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DRIFT)
    })
}

async fn revert(
    cli: &Cli,
    store: &Store,
    vm: &str,
    name: &str,
    paused: bool,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    let lock = store.lock(vm, g.lock_wait)?;
    let mut record = lock
        .load()?
        .ok_or_else(|| snapctl::Error::UnknownVm { vm: vm.to_owned() })?;
    let client = connect_if_running(socket_of(g, Some(&record)).as_deref()).await?;
    if !dry_run {
        settle_journal(client.as_ref(), &lock, &mut record).await?;
    }
    let live = graph::read_if_running(client.as_ref()).await?;
    let plan = revert::plan(&record, live.as_ref(), name, paused)?;
    if dry_run {
        output::plan(&plan.steps(&record), g.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    let interrupt = Interrupt::new();
    let watcher = watch_signals(interrupt.clone());
    let result = match &client {
        Some(c) => revert::run_live(c, &lock, &mut record, &plan, &interrupt).await,
        None => revert::run_offline(&lock, &mut record, &plan),
    };
    watcher.abort();
    let warnings = result?;
    for w in &warnings {
        tracing::warn!("{w}");
    }
    let args = (!plan.live).then(|| views::qemu_args(&record, None));
    output::reverted(&plan, args.as_deref(), &warnings, g.json)?;
    Ok(ExitCode::SUCCESS)
}

#[allow(clippy::too_many_arguments)]
async fn delete(
    cli: &Cli,
    store: &Store,
    vm: &str,
    name: &str,
    children: bool,
    metadata_only: bool,
    options: &snapctl::delete::JobOptions,
    dry_run: bool,
) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    let lock = store.lock(vm, g.lock_wait)?;
    let mut record = lock
        .load()?
        .ok_or_else(|| snapctl::Error::UnknownVm { vm: vm.to_owned() })?;
    if record.snapshot(name).is_none() {
        return Err(snapctl::Error::UnknownSnapshot {
            vm: vm.to_owned(),
            name: name.to_owned(),
        }
        .into());
    }
    let client = connect_if_running(socket_of(g, Some(&record)).as_deref()).await?;
    if !dry_run {
        settle_journal(client.as_ref(), &lock, &mut record).await?;
    }
    let targets = if children {
        snapctl::delete::with_descendants(&record, name)
    } else {
        vec![name.to_owned()]
    };
    let watcher = watch_signals(options.interrupt.clone());
    let mut reports = Vec::new();
    let mut steps = Vec::new();
    for target in &targets {
        let live = graph::read_if_running(client.as_ref()).await?;
        let plan = snapctl::delete::plan(&record, live.as_ref(), target, metadata_only)?;
        if dry_run {
            steps.extend(plan.steps(&record, options));
            // Plan the next target against the record as this one leaves it
            // (in memory only: nothing is saved).
            snapctl::delete::apply(&mut record, &plan);
            continue;
        }
        let lines =
            snapctl::delete::run(client.as_ref(), &lock, &mut record, &plan, options).await?;
        if g.json {
            let mut v = snapctl::delete::to_json(&plan);
            v["report"] = lines.into();
            reports.push(v);
        } else {
            let mut out = std::io::stdout().lock();
            writeln!(out, "deleted snapshot {target}")?;
            for l in lines {
                writeln!(out, "  {l}")?;
            }
        }
    }
    watcher.abort();
    if dry_run {
        output::plan(&steps, g.json)?;
    } else if g.json {
        output::json(&serde_json::json!({ "deleted": reports }))?;
    }
    Ok(ExitCode::SUCCESS)
}

async fn job_action(
    client: &Client,
    action: &JobAction,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    let (id, timeout, cancel) = match action {
        JobAction::Cancel { id } => (id, Some(Duration::from_secs(300)), true),
        JobAction::Wait { id, timeout } => (id, *timeout, false),
    };
    let mut job = client.attach_job(id).await?;
    if *job.status() == qmp_client::JobStatus::Null {
        bail!("QEMU has no job {id}");
    }
    if cancel {
        job.cancel().await?;
    }
    let limit = timeout.unwrap_or(Duration::from_secs(365 * 24 * 3600));
    let error = job.wait_concluded(limit).await?;
    if as_json {
        output::json(
            &serde_json::json!({ "id": id, "status": job.status().to_string(), "error": error }),
        )?;
    } else {
        writeln!(
            std::io::stdout(),
            "job {id} {}{}",
            if cancel { "cancelled, " } else { "" },
            job.status()
        )?;
    }
    match error {
        Some(e) if !cancel => bail!("job {id} failed: {e}"),
        _ => Ok(ExitCode::SUCCESS),
    }
}

async fn raw_merge(
    cli: &Cli,
    store: &Store,
    vm: &str,
    args: &JobArgs,
    plan: impl FnOnce(&Record, Option<&graph::LiveGraph>) -> snapctl::Result<snapctl::merge::RawPlan>,
) -> anyhow::Result<ExitCode> {
    let g = &cli.global;
    let lock = store.lock(vm, g.lock_wait)?;
    let mut record = lock
        .load()?
        .ok_or_else(|| snapctl::Error::UnknownVm { vm: vm.to_owned() })?;
    let client = connect_if_running(socket_of(g, Some(&record)).as_deref()).await?;
    if !args.dry_run {
        settle_journal(client.as_ref(), &lock, &mut record).await?;
    }
    let live = graph::read_if_running(client.as_ref()).await?;
    let plan = plan(&record, live.as_ref())?;
    let options = snapctl::delete::JobOptions {
        bandwidth: args.bandwidth.unwrap_or(0),
        timeout: args.timeout,
        interrupt: Interrupt::new(),
        progress: Some(output::progress_reporter(g.json)),
    };
    if args.dry_run {
        output::plan(&plan.steps(&record, &options), g.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    let watcher = watch_signals(options.interrupt.clone());
    let result = snapctl::merge::run(client.as_ref(), &lock, &mut record, &plan, &options).await;
    watcher.abort();
    let lines = result?;
    if g.json {
        output::json(&serde_json::json!({
            "disk": plan.disk,
            "merge": plan.merge,
            "removed_snapshots": plan.removed_snapshots,
            "report": lines,
        }))?;
    } else {
        let mut out = std::io::stdout().lock();
        match &plan.merge {
            snapctl::merge::RawMerge::Commit { top, base } => writeln!(
                out,
                "{}: committed {} into {}",
                plan.disk,
                top.display(),
                base.display()
            )?,
            snapctl::merge::RawMerge::Pull { active, .. } => {
                writeln!(out, "{}: pulled into {}", plan.disk, active.display())?
            }
        }
        for l in lines {
            writeln!(out, "  {l}")?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Before a mutating command: finish or undo what an interrupted run left in
/// the journal, and say which; refuse to go on while something stays unresolved.
async fn settle_journal(
    client: Option<&Client>,
    lock: &snapctl::VmLock,
    record: &mut Record,
) -> anyhow::Result<()> {
    if record.journal.is_empty() {
        return Ok(());
    }
    for line in snapctl::recover::recover(client, lock, record).await? {
        eprintln!("snapctl: {line}");
    }
    if let Some(entry) = record.journal.first() {
        bail!(
            "an interrupted {} (pid {}) left unfinished work: run snapctl check --repair",
            entry.op,
            entry.pid
        );
    }
    Ok(())
}
