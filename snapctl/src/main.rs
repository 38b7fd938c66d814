//! The `snapctl` command: a thin layer over the engine in the `snapctl` library.
//! It owns stdout/stderr; errors are printed once, as one line, with exit status 1
//! (3 when `check` finds drift, 2 for usage errors).

mod cli;
mod output;

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::CommandFactory;
use qmp_client::Client;
use snapctl::operation::Operation;
use snapctl::plan::revert::RunAfter;
use snapctl::record::Record;
use snapctl::run::relay;
use snapctl::{
    CreateOptions, Interrupt, Plan, RunOptions, Session, SessionOptions, Store, check, graph, views,
};

use crate::cli::{Cli, Command, CreateArgs, JobAction, JobArgs};

/// Exit status when `check` finds drift.
const EXIT_DRIFT: u8 = 3;

fn main() -> ExitCode {
    let cli = cli::parse();
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
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
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
    let state_dir = g.state_dir.clone().unwrap_or_else(Store::default_dir);
    let store = if cli.command.is_read_only() {
        Store::open_read_only(&state_dir)?
    } else {
        Store::open(&state_dir)?
    };
    let vm = resolve_vm(&store, g.vm.as_deref())?;
    match &cli.command {
        Command::Init => init(g, &store, &vm).await,
        Command::Create(args) => create(g, &store, &vm, args).await,
        Command::List { tree } => {
            let record = registered(&store, &vm)?;
            output::list(&record, *tree, g.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Current => {
            let record = registered(&store, &vm)?;
            output::current(&record, g.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Describe { name, text } => {
            let mut session = open(g, &store, &vm).await?;
            let text = (!text.is_empty()).then(|| text.clone());
            session.record_mut().describe_snapshot(name, text)?;
            session.save()?;
            let snapshot = session.record().snapshot_named(name)?;
            output::show(session.record(), snapshot, g.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Rename { old, new } => {
            let mut session = open(g, &store, &vm).await?;
            settle(&mut session, false).await?;
            session.record_mut().rename_snapshot(old, new)?;
            session.save()?;
            let snapshot = session.record().snapshot_named(new)?;
            output::show(session.record(), snapshot, g.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Show { name } => {
            let record = registered(&store, &vm)?;
            let snapshot = record.snapshot_named(name)?;
            output::show(&record, snapshot, g.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Chain { disk } => {
            let record = registered(&store, &vm)?;
            if let Some(d) = disk {
                snapctl::plan::known_disk(&record, d)?;
            }
            let instead = "showing the chains from the image headers";
            let client = reader(g, &store, &vm, &record, instead, true).await?;
            let live = graph::read_if_running(client.as_ref()).await?;
            let view = views::chains(&record, live.as_ref(), disk.as_deref())?;
            output::chain(&view, g.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Check { repair, adopt } => check_cmd(g, &store, &vm, *repair, *adopt).await,
        Command::Delete {
            name,
            children,
            metadata_only,
            bandwidth,
            timeout,
            dry_run,
        } => {
            let mut session = open(g, &store, &vm).await?;
            let targets = if *children {
                snapctl::plan::delete::with_descendants(session.record(), name)
            } else {
                vec![name.clone()]
            };
            session.record().snapshot_named(name)?;
            settle(&mut session, *dry_run).await?;
            let bandwidth = bandwidth.unwrap_or(0);
            if *dry_run {
                let mut steps = Vec::new();
                for target in &targets {
                    let plan = session
                        .plan_delete(target, *metadata_only, bandwidth)
                        .await?;
                    steps.extend(plan.steps);
                    // Plan the next target against the record as this one
                    // leaves it (in memory only: nothing is saved).
                    match &plan.operation {
                        Operation::Delete(op) => {
                            snapctl::plan::delete::apply(session.record_mut(), op);
                        }
                        Operation::Internal(op) => {
                            snapctl::plan::internal::apply(session.record_mut(), op)
                        }
                        _ => {}
                    }
                }
                output::plan(&steps, g.json)?;
                return Ok(ExitCode::SUCCESS);
            }
            let options = run_options(g, *timeout);
            let watcher = watch_signals(options.interrupt.clone());
            let mut done = Vec::new();
            for target in &targets {
                let plan = session
                    .plan_delete(target, *metadata_only, bandwidth)
                    .await?;
                let outcome = session.run(&plan, &options).await?;
                if !g.json {
                    output::deleted_text(&plan.operation, &outcome)?;
                }
                done.push((plan.operation, outcome));
            }
            watcher.abort();
            if g.json {
                let reports: Vec<_> = done
                    .iter()
                    .filter_map(|(op, o)| output::deleted(op, o))
                    .collect();
                output::deleted_json(&reports)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Commit {
            disk,
            top,
            base,
            job,
        } => {
            let mut session = open(g, &store, &vm).await?;
            settle(&mut session, job.dry_run).await?;
            let plan = session
                .plan_commit(
                    disk,
                    top.as_deref(),
                    base.as_deref(),
                    job.bandwidth.unwrap_or(0),
                )
                .await?;
            run_merge(g, &mut session, plan, job).await
        }
        Command::Pull { disk, base, job } => {
            let mut session = open(g, &store, &vm).await?;
            settle(&mut session, job.dry_run).await?;
            let idle =
                snapctl::plan::merge::nothing_to_pull(session.record(), disk, base.as_deref())?;
            if let Some(reason) = idle {
                output::nothing_to_merge(disk, &reason, g.json)?;
                return Ok(ExitCode::SUCCESS);
            }
            let plan = session
                .plan_pull(disk, base.as_deref(), job.bandwidth.unwrap_or(0))
                .await?;
            run_merge(g, &mut session, plan, job).await
        }
        Command::Jobs => {
            let client = connect(g, &store, &vm).await?;
            let jobs = client.query_jobs().await?;
            output::jobs(&jobs, g.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Job { action } => {
            let client = connect(g, &store, &vm).await?;
            job_action(&client, action, g.json).await
        }
        Command::Revert {
            name,
            paused,
            running,
            dry_run,
        } => {
            let mut session = open(g, &store, &vm).await?;
            settle(&mut session, *dry_run).await?;
            let after = match (paused, running) {
                (true, _) => RunAfter::Paused,
                (_, true) => RunAfter::Running,
                _ => RunAfter::Keep,
            };
            let plan = session.plan_revert(name, after).await?;
            if *dry_run {
                output::plan(&plan.steps, g.json)?;
                return Ok(ExitCode::SUCCESS);
            }
            let options = run_options(g, None);
            let outcome = run_watched(&mut session, &plan, &options).await?;
            match &plan.operation {
                Operation::Revert(op) => {
                    let args = (!op.live).then(|| views::qemu_args(session.record(), None));
                    output::reverted(op, &outcome, args.as_deref(), g.json)?;
                }
                Operation::Internal(op) => {
                    let args = (!op.live).then(|| views::qemu_args(session.record(), None));
                    output::internal(op, &outcome, args.as_deref(), g.json)?;
                }
                _ => unreachable!("a revert plan holds a revert"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Export {
            name,
            disk,
            output,
            format,
            compress,
            dry_run,
        } => {
            let mut session = open(g, &store, &vm).await?;
            settle(&mut session, *dry_run).await?;
            let opts = snapctl::plan::export::ExportOptions {
                snapshot: name.clone(),
                disk: disk.clone(),
                output: output.clone(),
                format: format.clone(),
                compress: *compress,
            };
            let plan = session.plan_export(&opts).await?;
            if *dry_run {
                output::plan(&plan.steps, g.json)?;
                return Ok(ExitCode::SUCCESS);
            }
            let outcome = run_watched(&mut session, &plan, &run_options(g, None)).await?;
            if let Operation::Export(op) = &plan.operation {
                output::exported(op, &outcome, g.json)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Clone {
            name,
            to,
            dir,
            dry_run,
        } => {
            let mut session = open(g, &store, &vm).await?;
            settle(&mut session, *dry_run).await?;
            let plan = session.plan_clone(name, to, dir).await?;
            if *dry_run {
                output::plan(&plan.steps, g.json)?;
                return Ok(ExitCode::SUCCESS);
            }
            let outcome = run_watched(&mut session, &plan, &run_options(g, None)).await?;
            if let Operation::Clone(op) = &plan.operation {
                output::cloned(op, &outcome, g.json)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup {
            name,
            to,
            quiesce,
            format,
            bandwidth,
            dry_run,
        } => {
            let mut session = open(g, &store, &vm).await?;
            settle(&mut session, *dry_run).await?;
            let opts = snapctl::run::backup::BackupOptions {
                name: name.clone(),
                dir: to.clone(),
                quiesce: *quiesce,
                bandwidth: bandwidth.unwrap_or(0),
                format: format.clone(),
            };
            let plan = session.plan_backup(&opts).await?;
            if *dry_run {
                output::plan(&plan.steps(), g.json)?;
                return Ok(ExitCode::SUCCESS);
            }
            let options = run_options(g, None);
            let watcher = watch_signals(options.interrupt.clone());
            let result = session.run_backup(&plan, &options).await;
            watcher.abort();
            let outcome = result?;
            output::backed_up(name, &plan.outputs(), &outcome, g.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Forget { files } => {
            let session = open(g, &store, &vm).await?;
            let lines = session.forget(*files)?;
            output::lines(&lines, g.json)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::QemuArgs { disk } => {
            let record = registered(&store, &vm)?;
            if let Some(d) = disk {
                snapctl::plan::known_disk(&record, d)?;
            }
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

/// How long QEMU may take to answer one command.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

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

/// QEMU's monitor of a registered VM, without taking the VM's lock (`jobs`,
/// `job`: they must work while another snapctl runs a job, through its relay).
async fn connect(g: &cli::Global, store: &Store, vm: &str) -> anyhow::Result<Client> {
    let record = registered(store, vm)?;
    let Some(socket) = socket_of(g, Some(&record)) else {
        bail!("no QMP socket known for this VM: pass --socket PATH");
    };
    match relay::connect_reader(store, vm, &socket, COMMAND_TIMEOUT).await? {
        Some(reader) => Ok(reader.client),
        None => bail!(
            "QEMU of vm {vm} is not running (nothing answers on {})",
            socket.display()
        ),
    }
}

/// QEMU's monitor for a command that can do without it (`chain`, `check`):
/// `None` when QEMU does not run, or when another client holds its monitor,
/// which is then said on stderr, followed by what the command does instead.
async fn reader(
    g: &cli::Global,
    store: &Store,
    vm: &str,
    record: &Record,
    instead: &str,
    say_unreachable: bool,
) -> anyhow::Result<Option<Client>> {
    let Some(socket) = socket_of(g, Some(record)) else {
        return Ok(None);
    };
    match relay::connect_reader(store, vm, &socket, COMMAND_TIMEOUT).await {
        Ok(None) => {
            if say_unreachable && !g.quiet {
                eprintln!(
                    "snapctl: QEMU is not reachable at {} (nothing listens there): {}",
                    socket.display(),
                    instead
                );
            }
            Ok(None)
        }
        Ok(reader) => Ok(reader.map(|r| r.client)),
        Err(e) if e.is_monitor_busy() => {
            eprintln!("snapctl: QEMU's monitor is busy: {instead} ({e})");
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// Opens a registered VM for a command that changes it.
async fn open(g: &cli::Global, store: &Store, vm: &str) -> anyhow::Result<Session> {
    let session = Session::open(store, vm, &session_options(g)).await?;
    if !session.is_registered() {
        return Err(snapctl::Error::UnknownVm { vm: vm.to_owned() }.into());
    }
    Ok(session)
}

fn session_options(g: &cli::Global) -> SessionOptions {
    SessionOptions {
        socket: g.socket.clone(),
        qga: g.qga.clone(),
        lock_wait: g.lock_wait,
        command_timeout: COMMAND_TIMEOUT,
    }
}

/// Before a command that changes the VM (not for a dry run): finish or undo
/// what an interrupted run left in the journal, and say which.
async fn settle(session: &mut Session, dry_run: bool) -> anyhow::Result<()> {
    if dry_run {
        return Ok(());
    }
    for line in session.settle().await? {
        eprintln!("snapctl: {line}");
    }
    Ok(())
}

fn run_options(g: &cli::Global, timeout: Option<Duration>) -> RunOptions {
    RunOptions {
        timeout,
        interrupt: Interrupt::new(),
        progress: Some(output::progress_reporter(g.json)),
    }
}

/// Runs a plan with SIGINT/SIGTERM turned into a clean stop.
async fn run_watched(
    session: &mut Session,
    plan: &Plan,
    options: &RunOptions,
) -> snapctl::Result<snapctl::Outcome> {
    let watcher = watch_signals(options.interrupt.clone());
    let result = session.run(plan, options).await;
    watcher.abort();
    result
}

async fn init(g: &cli::Global, store: &Store, vm: &str) -> anyhow::Result<ExitCode> {
    let mut session = Session::open(store, vm, &session_options(g)).await?;
    session.running_client()?;
    let added = session.register().await?;
    for warning in session.take_registration_warnings() {
        tracing::warn!("{warning}");
    }
    let anonymous: Vec<String> = session
        .live()
        .await?
        .iter()
        .flat_map(|g| g.disks.values())
        .filter(|d| d.snapshottable() && d.anonymous)
        .map(|d| d.id.clone())
        .collect();
    for id in &anonymous {
        tracing::warn!(
            "not registered: writable disk {id} has no id=, so snapctl cannot follow it; give its -device an id=, or leave it out of snapshots with --exclude '{id}'"
        );
    }
    if session.record().disks.is_empty() {
        return Err(snapctl::Error::NoWritableDisk { vm: vm.to_owned() }.into());
    }
    session.save()?;
    output::init(session.record(), &added, g.json)?;
    Ok(ExitCode::SUCCESS)
}

async fn create(
    g: &cli::Global,
    store: &Store,
    vm: &str,
    args: &CreateArgs,
) -> anyhow::Result<ExitCode> {
    // Bad names fail before anything is opened.
    snapctl::names::validate_snapshot_name(&args.name)?;
    let mut session = Session::open(store, vm, &session_options(g)).await?;
    if session.is_registered() {
        settle(&mut session, args.dry_run).await?;
    }
    let opts = CreateOptions {
        name: args.name.clone(),
        description: args.description.clone(),
        disks: args.disks.clone(),
        exclude: args.exclude.clone(),
        overlays: args.overlays.iter().cloned().collect(),
        reuse_external: args.reuse_external,
        quiesce: args.quiesce,
        memory: args.memory,
        memory_file: args.memory_file.clone(),
        paused: args.paused,
        internal: args.internal,
    };
    let plan = session.plan_create(&opts).await?;
    if args.dry_run {
        output::plan(&plan.steps, g.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    let outcome = run_watched(&mut session, &plan, &run_options(g, None)).await?;
    match &plan.operation {
        Operation::Create(op) => output::created(op, &outcome, g.json)?,
        Operation::Internal(op) => output::internal(op, &outcome, None, g.json)?,
        _ => unreachable!("a create plan holds a create"),
    }
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

async fn check_cmd(
    g: &cli::Global,
    store: &Store,
    vm: &str,
    repair: bool,
    adopt: bool,
) -> anyhow::Result<ExitCode> {
    if !repair {
        // Only reads: no lock, so that it works while another snapctl
        // runs an operation (whose journal entry is then in progress).
        let record = registered(store, vm)?;
        let holder = store.holder(vm)?.and_then(|h| h.pid);
        let instead = "cannot compare with QEMU; comparing the record with the image headers";
        let client = reader(g, store, vm, &record, instead, false).await?;
        let jobs = running_jobs(client.as_ref()).await?;
        let live = graph::read_if_running(client.as_ref()).await?;
        let drifts = check::drifts_during(&record, live.as_ref(), &jobs, holder);
        return report_check(&drifts, &[], live.is_some(), g.json);
    }
    let mut session = open(g, store, vm).await?;
    let mut changes = Vec::new();
    if repair {
        changes = session.repair_journal().await?;
    }
    let jobs = running_jobs(session.client()).await?;
    let live = session.live().await?.cloned();
    if adopt {
        let Some(live) = &live else {
            bail!("--adopt records QEMU's chains: QEMU must be running");
        };
        let adopted = check::adopt(session.record_mut(), live);
        if !adopted.is_empty() {
            session.save()?;
        }
        changes.extend(adopted);
    } else if repair {
        let adopted = check::repair(session.record_mut(), live.as_ref());
        if !adopted.is_empty() {
            session.save()?;
        }
        changes.extend(adopted);
    }
    let drifts = check::drifts(session.record(), live.as_ref(), &jobs);
    report_check(&drifts, &changes, live.is_some(), g.json)
}

fn report_check(
    drifts: &[check::Drift],
    changes: &[String],
    live: bool,
    as_json: bool,
) -> anyhow::Result<ExitCode> {
    output::check(drifts, changes, live, as_json)?;
    Ok(if drifts.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_DRIFT)
    })
}

/// QEMU's jobs, as `check` reports them.
async fn running_jobs(client: Option<&Client>) -> anyhow::Result<Vec<check::RunningJob>> {
    let Some(c) = client else {
        return Ok(Vec::new());
    };
    Ok(c.query_jobs()
        .await?
        .into_iter()
        .map(|j| check::RunningJob {
            id: j.id,
            kind: j.kind,
            status: j.status.to_string(),
        })
        .collect())
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
        output::json(&output::JobEnd {
            id,
            status: job.status().as_str(),
            error: error.as_deref(),
        })?;
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

async fn run_merge(
    g: &cli::Global,
    session: &mut Session,
    plan: Plan,
    args: &JobArgs,
) -> anyhow::Result<ExitCode> {
    if args.dry_run {
        output::plan(&plan.steps, g.json)?;
        return Ok(ExitCode::SUCCESS);
    }
    let outcome = run_watched(session, &plan, &run_options(g, args.timeout)).await?;
    let (Operation::Commit(op) | Operation::Pull(op)) = &plan.operation else {
        unreachable!("a commit or pull plan holds a merge")
    };
    output::merged(op, &outcome, g.json)?;
    Ok(ExitCode::SUCCESS)
}
