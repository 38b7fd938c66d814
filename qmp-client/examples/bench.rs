//! Measures qmp-client against a real QEMU (`scripts/bench` runs it next to
//! Python's qemu.qmp and prints the comparison).
//!
//! Throughput (default mode): `query-status` round trips per second, first with
//! one task awaiting each call (sequential), then with several tasks sharing one
//! cloned [`Client`] (8 in flight by default). Each workload runs for a warm-up
//! and then for a fixed duration. Besides the rate it reports latency
//! percentiles and the CPU time per call of this process and of QEMU, by thread
//! (QEMU's monitor I/O thread, which parses requests, and its main thread, which
//! runs them).
//!
//! Last comes the floor: a minimal blocking client (std `UnixStream`, no
//! runtime, no parsing) on the same socket, once qmp-client has closed its
//! connection, sending the same request bytes and reading one reply line per
//! call. No client can do a sequential round trip faster, so qmp-client's
//! sequential latency is reported against it and against QEMU's CPU time per
//! call (`p50_vs_qemu_cpu`): what the floor spends above QEMU's CPU is QEMU's
//! and the kernel's (wake-ups, scheduling), what qmp-client spends above the
//! floor is the client's. With `--json`, `floor` has the same fields as
//! `sequential`, `sequential_vs_floor_p50` compares their medians, and every
//! workload has `p50_vs_qemu_cpu`.
//!
//! Deep chain (`--deep-chain N`): builds N qcow2 layers with qemu-img, starts a
//! QEMU with the base as `-blockdev` and adds every overlay with `blockdev-add`
//! (`"backing"` naming the node below), then calls
//! `query-named-block-nodes {"flat": true}` several times. It reports the
//! reply's size on the wire, the time and CPU per call, and this process's
//! resident memory before and its peak (`VmHWM`, reset just before the calls)
//! while the replies are received; then, in fresh processes, how much of that
//! the reply takes as a `serde_json::Value` and as qapi's typed structs.
//!
//! ```text
//! cargo run --release -p qmp-client --example bench -- [--socket PATH] [--seconds N] [--json]
//! cargo run --release -p qmp-client --example bench -- --deep-chain 1000 [--json]
//! ```
//!
//! Options:
//!
//! * `--socket PATH`: a QMP socket nobody else is connected to. Without it the
//!   program starts its own paused `qemu-system-x86_64` (TCG, no devices).
//! * `--seconds N` (default 5) and `--warmup N` (default 1): per workload.
//! * `--in-flight N` (default 8): tasks (and the client's in-flight limit) for
//!   the concurrent workload.
//! * `--runtime current|multi` (default `current`): tokio's current-thread
//!   runtime, or the multi-thread one with one worker per CPU. The client does
//!   little work per call (a few microseconds) and QEMU needs the CPUs, so one
//!   thread that never hands a wake-up to another is as fast or faster.
//! * `--qemu-pid PID`: with `--socket`, the QEMU behind it, to report its CPU
//!   time per call (known without it when this program starts QEMU). Thread
//!   names are shown when QEMU runs with `-name NAME,debug-threads=on`.
//! * `--raw`: use `execute_raw` (JSON in and out) instead of the typed `execute`.
//! * `--calls N` (default 3): with `--deep-chain`, how many calls to time.
//! * `--json`: print one JSON object instead of text.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use qmp_client::{Client, Config};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Result<T, E = BoxError> = std::result::Result<T, E>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flavor {
    CurrentThread,
    MultiThread,
}

impl Flavor {
    fn name(self) -> &'static str {
        match self {
            Flavor::CurrentThread => "current_thread",
            Flavor::MultiThread => "multi_thread",
        }
    }
}

#[derive(Debug)]
struct Args {
    socket: Option<PathBuf>,
    seconds: f64,
    warmup: f64,
    in_flight: usize,
    flavor: Flavor,
    raw: bool,
    json: bool,
    deep_chain: Option<usize>,
    calls: usize,
    qemu_pid: Option<u32>,
}

const USAGE: &str = "usage: bench [--socket PATH [--qemu-pid PID]] [--seconds N] [--warmup N] \
[--in-flight N] [--runtime current|multi] [--raw] [--json]\n       bench --deep-chain N [--calls N] [--json]";

impl Args {
    fn parse() -> Result<Args> {
        let mut args = Args {
            socket: None,
            seconds: 5.0,
            warmup: 1.0,
            in_flight: 8,
            flavor: Flavor::CurrentThread,
            raw: false,
            json: false,
            deep_chain: None,
            calls: 3,
            qemu_pid: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(arg) = it.next() {
            let mut value = |name: &str| {
                it.next()
                    .ok_or_else(|| format!("{name} needs a value\n{USAGE}"))
            };
            match arg.as_str() {
                "--socket" => args.socket = Some(value("--socket")?.into()),
                "--seconds" => args.seconds = value("--seconds")?.parse()?,
                "--warmup" => args.warmup = value("--warmup")?.parse()?,
                "--in-flight" => args.in_flight = value("--in-flight")?.parse()?,
                "--deep-chain" => args.deep_chain = Some(value("--deep-chain")?.parse()?),
                "--calls" => args.calls = value("--calls")?.parse()?,
                "--qemu-pid" => args.qemu_pid = Some(value("--qemu-pid")?.parse()?),
                "--runtime" => {
                    args.flavor = match value("--runtime")?.as_str() {
                        "current" | "current_thread" => Flavor::CurrentThread,
                        "multi" | "multi_thread" => Flavor::MultiThread,
                        other => return Err(format!("unknown runtime {other:?}\n{USAGE}").into()),
                    }
                }
                "--raw" => args.raw = true,
                "--json" => args.json = true,
                "-h" | "--help" => {
                    println!("{USAGE}");
                    std::process::exit(0);
                }
                other => return Err(format!("unknown argument {other:?}\n{USAGE}").into()),
            }
        }
        if args.seconds <= 0.0 || args.in_flight == 0 || args.calls == 0 {
            return Err(
                format!("--seconds, --in-flight and --calls must be positive\n{USAGE}").into(),
            );
        }
        Ok(args)
    }
}

fn main() -> Result<()> {
    let mut argv = std::env::args().skip(1);
    if argv.next().as_deref() == Some("--measure-tree") {
        let (Some(kind), Some(file)) = (argv.next(), argv.next()) else {
            return Err("usage: bench --measure-tree value|typed FILE".into());
        };
        return measure_tree(&kind, Path::new(&file));
    }
    let args = Args::parse()?;
    let runtime = match args.flavor {
        Flavor::CurrentThread => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        Flavor::MultiThread => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()?,
    };
    let report = match args.deep_chain {
        Some(layers) => runtime.block_on(deep_chain(&args, layers))?,
        None => runtime.block_on(throughput(&args))?,
    };
    if args.json {
        println!("{report}");
    }
    Ok(())
}

/// A QEMU this program started; killed when dropped.
struct Qemu {
    child: Child,
    dir: tempfile::TempDir,
}

impl Qemu {
    /// Starts a paused QEMU without devices, with `monitors` QMP sockets
    /// (`qmp0.sock`, `qmp1.sock`, ...) and the extra arguments given.
    fn start(monitors: usize, extra: &[String]) -> Result<Qemu> {
        // Unix socket paths are limited to 108 bytes: keep the directory short.
        let dir = tempfile::Builder::new()
            .prefix("qmpbench")
            .tempdir_in("/tmp")?;
        let log = std::fs::File::create(dir.path().join("qemu.log"))?;
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args(["-M", "q35", "-accel", "tcg", "-m", "64", "-nodefaults"])
            .args(["-name", "bench,debug-threads=on"])
            .args(["-display", "none", "-S"]);
        for i in 0..monitors {
            let socket = dir.path().join(format!("qmp{i}.sock"));
            cmd.arg("-qmp")
                .arg(format!("unix:{},server=on,wait=off", socket.display()));
        }
        cmd.args(extra)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        let child = cmd.spawn().map_err(|e| {
            format!("cannot start qemu-system-x86_64 ({e}); install it with scripts/setup")
        })?;
        let mut qemu = Qemu { child, dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !(0..monitors).all(|i| qemu.socket(i).exists()) {
            if let Some(status) = qemu.child.try_wait()? {
                let log = std::fs::read_to_string(qemu.dir.path().join("qemu.log"))?;
                return Err(format!("QEMU exited ({status}) before listening:\n{log}").into());
            }
            if Instant::now() > deadline {
                return Err("QEMU did not create its QMP socket within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(qemu)
    }

    fn socket(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("qmp{i}.sock"))
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Connects and spawns the connection task; its handle finishes once every
/// clone of the client is dropped and the socket is closed.
async fn connect(socket: &Path, in_flight: usize) -> Result<(Client, JoinHandle<()>)> {
    let config = Config::new().max_in_flight(in_flight);
    // QEMU creates the socket file before it listens on it: a connect in
    // between is refused, so a QEMU that was just started gets a moment more.
    let deadline = Instant::now() + Duration::from_secs(10);
    let (client, connection) = loop {
        match config.connect_unix(socket).await {
            Err(qmp_client::Error::Connect { source, .. })
                if source.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            result => break result?,
        }
    };
    let task = tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("bench: QMP connection ended: {e}");
        }
    });
    Ok((client, task))
}

/// CPU time used so far by each thread of process `pid` (`"self"` for this
/// one), in nanoseconds, summed by thread name.
fn cpu_by_thread(pid: &str) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let dir = task.path();
        let (Ok(stat), Ok(comm)) = (
            std::fs::read_to_string(dir.join("schedstat")),
            std::fs::read_to_string(dir.join("comm")),
        ) else {
            continue;
        };
        let ns: u64 = stat
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        *out.entry(comm.trim().to_owned()).or_default() += ns;
    }
    out
}

/// CPU time spent by `pid` between two [`cpu_by_thread`] readings, by thread name.
fn cpu_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(name, ns)| {
            let was = before.get(name).copied().unwrap_or(0);
            (name.clone(), ns.saturating_sub(was))
        })
        .collect()
}

/// One workload's result.
#[derive(Debug)]
struct Sample {
    tasks: usize,
    calls: u64,
    elapsed: Duration,
    /// Per-call latencies in microseconds, sorted.
    latencies: Vec<u32>,
    /// CPU time of this process during the workload, by thread name (ns).
    client_cpu: BTreeMap<String, u64>,
    /// CPU time of QEMU during the workload, by thread name (ns), when known.
    qemu_cpu: Option<BTreeMap<String, u64>>,
}

impl Sample {
    fn per_second(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }

    fn percentile(&self, p: f64) -> u32 {
        if self.latencies.is_empty() {
            return 0;
        }
        let i = ((self.latencies.len() - 1) as f64 * p).round() as usize;
        self.latencies[i]
    }

    /// Microseconds of CPU per call, in total and by thread name.
    fn per_call(&self, cpu: &BTreeMap<String, u64>) -> (f64, BTreeMap<String, f64>) {
        let calls = self.calls.max(1) as f64;
        let total = cpu.values().sum::<u64>() as f64 / calls / 1e3;
        let threads = cpu
            .iter()
            .filter(|(_, ns)| **ns > 0)
            .map(|(name, ns)| (name.clone(), *ns as f64 / calls / 1e3))
            .collect();
        (total, threads)
    }

    /// The median latency over QEMU's CPU time per call: how much of a round
    /// trip is spent outside QEMU's threads (1.0 would be none).
    fn p50_vs_qemu_cpu(&self) -> Option<f64> {
        let (qemu_us, _) = self.per_call(self.qemu_cpu.as_ref()?);
        (qemu_us > 0.0).then(|| f64::from(self.percentile(0.50)) / qemu_us)
    }

    fn to_json(&self) -> Value {
        let (client_us, _) = self.per_call(&self.client_cpu);
        let qemu = self.qemu_cpu.as_ref().map(|cpu| {
            let (total, threads) = self.per_call(cpu);
            json!({ "total": total, "threads": threads })
        });
        json!({
            "tasks": self.tasks,
            "calls": self.calls,
            "seconds": self.elapsed.as_secs_f64(),
            "per_second": self.per_second(),
            "p50_us": self.percentile(0.50),
            "p99_us": self.percentile(0.99),
            "client_cpu_us_per_call": client_us,
            "qemu_cpu_us_per_call": qemu,
            "p50_vs_qemu_cpu": self.p50_vs_qemu_cpu(),
        })
    }
}

/// Runs `tasks` tasks, each issuing `query-status` back to back on a clone of
/// `client`, until `duration` has passed. Every call started before the end
/// counts, and the elapsed time runs until the last one returned.
async fn run(
    client: &Client,
    tasks: usize,
    raw: bool,
    qemu_pid: Option<u32>,
    duration: Duration,
) -> Result<Sample> {
    let qemu_before = qemu_pid.map(|pid| cpu_by_thread(&pid.to_string()));
    let client_before = cpu_by_thread("self");
    let start = Instant::now();
    let deadline = start + duration;
    let mut handles = Vec::with_capacity(tasks);
    for _ in 0..tasks {
        let client = client.clone();
        handles.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(1 << 16);
            let mut before = Instant::now();
            while before < deadline {
                if raw {
                    client.execute_raw("query-status", Value::Null).await?;
                } else {
                    client
                        .execute(qmp_client::qapi::qmp::query_status {})
                        .await?;
                }
                let after = Instant::now();
                latencies.push((after - before).as_micros().min(u32::MAX as u128) as u32);
                before = after;
            }
            Ok::<_, qmp_client::Error>(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for handle in handles {
        latencies.extend(handle.await??);
    }
    let elapsed = start.elapsed();
    let client_cpu = cpu_delta(&client_before, &cpu_by_thread("self"));
    let qemu_cpu = qemu_pid
        .zip(qemu_before)
        .map(|(pid, before)| cpu_delta(&before, &cpu_by_thread(&pid.to_string())));
    latencies.sort_unstable();
    Ok(Sample {
        tasks,
        calls: latencies.len() as u64,
        elapsed,
        latencies,
        client_cpu,
        qemu_cpu,
    })
}

async fn measure(
    client: &Client,
    tasks: usize,
    args: &Args,
    qemu_pid: Option<u32>,
) -> Result<Sample> {
    if args.warmup > 0.0 {
        let warmup = Duration::from_secs_f64(args.warmup);
        run(client, tasks, args.raw, None, warmup).await?;
    }
    let duration = Duration::from_secs_f64(args.seconds);
    run(client, tasks, args.raw, qemu_pid, duration).await
}

/// The request the floor sends: byte for byte what qmp-client writes for a
/// typed `query_status {}` when no other call is in flight (no empty
/// `arguments`, the smallest free id).
const FLOOR_REQUEST: &[u8] = b"{\"execute\":\"query-status\",\"id\":1}\n";

/// A minimal blocking QMP client on its own connection: greeting, capabilities
/// (`oob` when offered, as qmp-client does), then [`FLOOR_REQUEST`] written
/// and one reply line read back (events skipped), over and over. No runtime,
/// no channel, no JSON parsing: one `write` and one blocking `read` per call,
/// so its latency is what QEMU and the kernel take for a round trip, the
/// lowest any client can reach on this socket.
struct Floor {
    stream: StdUnixStream,
    reader: BufReader<StdUnixStream>,
    line: Vec<u8>,
}

impl Floor {
    fn connect(socket: &Path) -> Result<Floor> {
        let stream = StdUnixStream::connect(socket)?;
        // QEMU greets only once the previous client's close has been seen.
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut floor = Floor {
            reader: BufReader::new(stream.try_clone()?),
            stream,
            line: Vec::with_capacity(256),
        };
        let greeting: Value = serde_json::from_slice(floor.read_line()?)?;
        let oob = greeting["QMP"]["capabilities"]
            .as_array()
            .is_some_and(|caps| caps.iter().any(|c| c == "oob"));
        let enable = if oob { json!(["oob"]) } else { json!([]) };
        let mut request = serde_json::to_vec(&json!({
            "execute": "qmp_capabilities",
            "arguments": { "enable": enable },
        }))?;
        request.push(b'\n');
        floor.stream.write_all(&request)?;
        let reply = floor.reply()?;
        if !reply.starts_with(b"{\"return\"") {
            return Err(format!(
                "qmp_capabilities failed: {}",
                String::from_utf8_lossy(reply)
            )
            .into());
        }
        Ok(floor)
    }

    fn read_line(&mut self) -> Result<&[u8]> {
        self.line.clear();
        if self.reader.read_until(b'\n', &mut self.line)? == 0 {
            return Err("QEMU closed the floor's connection".into());
        }
        Ok(&self.line)
    }

    /// The next line that is not an event.
    fn reply(&mut self) -> Result<&[u8]> {
        loop {
            self.read_line()?;
            if !self.line.starts_with(b"{\"event\"") {
                return Ok(&self.line);
            }
        }
    }

    /// One round trip.
    fn call(&mut self) -> Result<()> {
        self.stream.write_all(FLOOR_REQUEST)?;
        let reply = self.reply()?;
        if !reply.starts_with(b"{\"return\"") {
            return Err(format!("query-status failed: {}", String::from_utf8_lossy(reply)).into());
        }
        Ok(())
    }

    /// Calls back to back until `duration` has passed, measured like [`run`].
    fn run(&mut self, qemu_pid: Option<u32>, duration: Duration) -> Result<Sample> {
        let qemu_before = qemu_pid.map(|pid| cpu_by_thread(&pid.to_string()));
        let client_before = cpu_by_thread("self");
        let start = Instant::now();
        let deadline = start + duration;
        let mut latencies = Vec::with_capacity(1 << 16);
        let mut before = start;
        while before < deadline {
            self.call()?;
            let after = Instant::now();
            latencies.push((after - before).as_micros().min(u32::MAX as u128) as u32);
            before = after;
        }
        let elapsed = start.elapsed();
        let client_cpu = cpu_delta(&client_before, &cpu_by_thread("self"));
        let qemu_cpu = qemu_pid
            .zip(qemu_before)
            .map(|(pid, before)| cpu_delta(&before, &cpu_by_thread(&pid.to_string())));
        latencies.sort_unstable();
        Ok(Sample {
            tasks: 1,
            calls: latencies.len() as u64,
            elapsed,
            latencies,
            client_cpu,
            qemu_cpu,
        })
    }
}

/// The floor workload on `socket` (which no one else may hold), with the same
/// warm-up and duration as the others, on a thread of its own.
async fn measure_floor(socket: &Path, args: &Args, qemu_pid: Option<u32>) -> Result<Sample> {
    let socket = socket.to_owned();
    let (warmup, seconds) = (args.warmup, args.seconds);
    tokio::task::spawn_blocking(move || {
        let mut floor = Floor::connect(&socket)?;
        if warmup > 0.0 {
            floor.run(None, Duration::from_secs_f64(warmup))?;
        }
        floor.run(qemu_pid, Duration::from_secs_f64(seconds))
    })
    .await?
}

async fn throughput(args: &Args) -> Result<Value> {
    let mut _qemu = None;
    let (socket, qemu_pid) = match &args.socket {
        Some(path) => (path.clone(), args.qemu_pid),
        None => {
            let qemu = Qemu::start(1, &[])?;
            let socket = qemu.socket(0);
            let pid = qemu.child.id();
            _qemu = Some(qemu);
            (socket, Some(pid))
        }
    };
    let (client, connection) = connect(&socket, args.in_flight).await?;
    let version = client.greeting().version.to_string();
    let oob = client.greeting().oob_enabled;

    let sequential = measure(&client, 1, args, qemu_pid).await?;
    let concurrent = measure(&client, args.in_flight, args, qemu_pid).await?;
    let speedup = concurrent.per_second() / sequential.per_second();
    // The monitor serves one client at a time: close ours before the floor's.
    drop(client);
    connection.await?;
    let floor = measure_floor(&socket, args, qemu_pid).await?;
    let vs_floor = f64::from(sequential.percentile(0.5)) / f64::from(floor.percentile(0.5).max(1));

    if !args.json {
        println!(
            "qmp-client against QEMU {version} (oob {}), tokio {}, {} calls, {} s per workload",
            if oob { "on" } else { "off" },
            args.flavor.name(),
            if args.raw { "raw" } else { "typed" },
            args.seconds,
        );
        for (name, s) in [
            ("sequential", &sequential),
            (&format!("{} in flight", args.in_flight)[..], &concurrent),
            ("floor", &floor),
        ] {
            let (client_us, _) = s.per_call(&s.client_cpu);
            let qemu = match &s.qemu_cpu {
                Some(cpu) => {
                    let (total, threads) = s.per_call(cpu);
                    let threads: Vec<String> = threads
                        .iter()
                        .map(|(name, us)| format!("{name} {us:.0}"))
                        .collect();
                    format!(", QEMU {total:.0} ({})", threads.join(", "))
                }
                None => String::new(),
            };
            println!(
                "{name:<14} {:>9.0} round trips/s   p50 {:>5} us   p99 {:>5} us   \
                 CPU us/call: client {client_us:.0}{qemu}",
                s.per_second(),
                s.percentile(0.50),
                s.percentile(0.99),
            );
        }
        println!("{} in flight / sequential: {speedup:.2}x", args.in_flight);
        println!("sequential p50 / floor p50: {vs_floor:.2}x");
        for (name, s) in [("sequential", &sequential), ("floor", &floor)] {
            if let Some(ratio) = s.p50_vs_qemu_cpu() {
                println!("{name} p50 / QEMU CPU per call: {ratio:.2}x");
            }
        }
    }
    Ok(json!({
        "client": "qmp-client",
        "qemu": version,
        "oob": oob,
        "runtime": args.flavor.name(),
        "typed": !args.raw,
        "sequential": sequential.to_json(),
        "in_flight": concurrent.to_json(),
        "in_flight_vs_sequential": speedup,
        "floor": floor.to_json(),
        "sequential_vs_floor_p50": vs_floor,
    }))
}

/// `VmRSS` and `VmHWM` of this process, in KiB.
fn memory() -> Result<(u64, u64)> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or_else(|| format!("no {name} in /proc/self/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Resets `VmHWM` to the current RSS (Linux 4.0+). Returns whether it worked.
fn reset_peak() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok()
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Creates `layers` qcow2 images in `dir`: a base and overlays, each backed by
/// the previous one. Returns their paths, base first.
fn build_chain(dir: &Path, layers: usize) -> Result<Vec<PathBuf>> {
    let paths: Vec<PathBuf> = (0..layers)
        .map(|i| dir.join(format!("l{i}.qcow2")))
        .collect();
    // The overlays name their backing file and format, with the size given, so
    // `-u` lets qemu-img skip opening the backing file and the images can be
    // created in parallel.
    let mut children: Vec<Child> = Vec::new();
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get()) * 2;
    for (i, path) in paths.iter().enumerate() {
        let mut cmd = Command::new("qemu-img");
        cmd.args(["create", "-q", "-f", "qcow2"]);
        if i > 0 {
            cmd.arg("-u")
                .arg("-b")
                .arg(&paths[i - 1])
                .args(["-F", "qcow2"]);
        }
        cmd.arg(path).arg("1M").stdin(Stdio::null());
        if children.len() >= parallel {
            wait_ok(children.remove(0))?;
        }
        children
            .push(cmd.spawn().map_err(|e| {
                format!("cannot run qemu-img ({e}); install it with scripts/setup")
            })?);
    }
    for child in children {
        wait_ok(child)?;
    }
    Ok(paths)
}

fn wait_ok(mut child: Child) -> Result<()> {
    let status = child.wait()?;
    if !status.success() {
        return Err(format!("qemu-img failed: {status}").into());
    }
    Ok(())
}

fn layer_node(path: &Path, node: &str, backing: Option<&str>) -> Value {
    let mut options = json!({
        "driver": "qcow2",
        "node-name": node,
        "read-only": true,
        "file": { "driver": "file", "filename": path, "read-only": true },
    });
    options["backing"] = match backing {
        Some(backing) => json!(backing),
        None => Value::Null,
    };
    options
}

/// Runs this program again with `--measure-tree KIND FILE` for each kind;
/// returns the peak growth in KiB for the reply as a `serde_json::Value` and
/// as typed structs (one fresh process each: freed heap is reused).
fn measure_tree_in_child(file: &Path) -> Result<(Option<u64>, Option<u64>)> {
    let mut kib = Vec::new();
    for kind in ["value", "typed"] {
        let out = Command::new(std::env::current_exe()?)
            .args(["--measure-tree", kind])
            .arg(file)
            .stderr(Stdio::inherit())
            .output()?;
        if !out.status.success() {
            return Err(format!("--measure-tree {kind} failed: {}", out.status).into());
        }
        kib.push(String::from_utf8_lossy(&out.stdout).trim().parse().ok());
    }
    Ok((kib[0], kib[1]))
}

/// `--measure-tree value|typed FILE`: prints by how many KiB this process's
/// peak RSS grows while FILE (one `query-named-block-nodes` reply) is parsed
/// into a `serde_json::Value`, or straight into qapi's typed structs.
fn measure_tree(kind: &str, file: &Path) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Reply {
        #[serde(rename = "return")]
        _nodes: Vec<qmp_client::qapi::qmp::BlockDeviceInfo>,
    }
    let text = std::fs::read(file)?;
    let (rss, _) = memory()?;
    if !reset_peak() {
        println!("unknown");
        return Ok(());
    }
    match kind {
        "value" => drop(serde_json::from_slice::<Value>(&text)?),
        "typed" => drop(serde_json::from_slice::<Reply>(&text)?),
        other => return Err(format!("--measure-tree: unknown kind {other:?}").into()),
    }
    let (_, hwm) = memory()?;
    println!("{}", hwm.saturating_sub(rss));
    Ok(())
}

/// Reads one reply line from a second monitor, to know the reply's size on the wire.
fn wire_reply(socket: &Path, command: &Value) -> Result<Vec<u8>> {
    let mut stream = StdUnixStream::connect(socket)?;
    stream.set_read_timeout(Some(Duration::from_secs(120)))?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut line = Vec::new();
    reader.read_until(b'\n', &mut line)?; // greeting
    stream.write_all(b"{\"execute\": \"qmp_capabilities\"}\n")?;
    line.clear();
    reader.read_until(b'\n', &mut line)?;
    let mut request = serde_json::to_vec(command)?;
    request.push(b'\n');
    stream.write_all(&request)?;
    loop {
        line.clear();
        reader.read_until(b'\n', &mut line)?;
        if line.is_empty() {
            return Err("QEMU closed the second monitor".into());
        }
        if !line.starts_with(b"{\"event\"") {
            return Ok(line);
        }
    }
}

async fn deep_chain(args: &Args, layers: usize) -> Result<Value> {
    if layers < 2 {
        return Err("--deep-chain needs at least 2 layers".into());
    }
    let images = tempfile::Builder::new().prefix("qmpchain").tempdir()?;
    let started = Instant::now();
    let paths = build_chain(images.path(), layers)?;
    let images_built = started.elapsed();

    // The base is on the command line; the overlays are added over QMP, each
    // backed by the node below it (argv stays short whatever N is). A second
    // monitor is used once at the end to see the reply's exact size on the wire.
    let base = layer_node(&paths[0], "l0", None);
    let qemu = Qemu::start(2, &["-blockdev".to_owned(), base.to_string()])?;
    let qemu_pid = qemu.child.id().to_string();
    let (client, _connection) = connect(&qemu.socket(0), 8).await?;
    let version = client.greeting().version.to_string();
    let started = Instant::now();
    for (i, path) in paths.iter().enumerate().skip(1) {
        let prev = format!("l{}", i - 1);
        client
            .execute_raw(
                "blockdev-add",
                layer_node(path, &format!("l{i}"), Some(&prev)),
            )
            .await?;
    }
    let nodes_added = started.elapsed();

    // Peak memory while receiving and decoding the replies, from a baseline
    // taken just before (the peak is reset to the current RSS where the kernel
    // allows it, so setup does not count).
    let (rss_before, hwm_setup) = memory()?;
    let reset = reset_peak();
    let client_cpu_before = cpu_by_thread("self");
    let qemu_cpu_before = cpu_by_thread(&qemu_pid);
    let (mut node_count, mut linked) = (0, 0);
    let mut raw_ms = Vec::new();
    for i in 0..args.calls {
        let t = Instant::now();
        let reply = client
            .execute_raw("query-named-block-nodes", json!({ "flat": true }))
            .await?;
        raw_ms.push(t.elapsed().as_secs_f64() * 1e3);
        if i == 0 {
            let nodes = reply.as_array().map(Vec::as_slice).unwrap_or_default();
            node_count = nodes.len();
            // Layers whose node reports a backing file: every one but the base.
            linked = nodes
                .iter()
                .filter(|n| n["node-name"].as_str().is_some_and(|s| s.starts_with('l')))
                .filter(|n| n["backing_file"].is_string())
                .count();
        }
        drop(reply);
    }
    let client_cpu = cpu_delta(&client_cpu_before, &cpu_by_thread("self"));
    let qemu_cpu = cpu_delta(&qemu_cpu_before, &cpu_by_thread(&qemu_pid));
    let (_, hwm_raw) = memory()?;
    // The same reply decoded into qapi's typed structs (one call).
    let t = Instant::now();
    let typed = client
        .execute(qmp_client::qapi::qmp::query_named_block_nodes { flat: Some(true) })
        .await?;
    let typed_ms = t.elapsed().as_secs_f64() * 1e3;
    drop(typed);
    let (_, hwm_after) = memory()?;
    let wire = wire_reply(
        &qemu.socket(1),
        &json!({ "execute": "query-named-block-nodes", "arguments": { "flat": true } }),
    )?;
    drop(client);
    drop(qemu);
    let reply_bytes = wire.len();
    // How much of the peak is the reply as a JSON tree (what execute_raw
    // returns): parse the same bytes into a serde_json::Value in a fresh
    // process, where freed heap from earlier calls cannot hide the growth.
    let saved = images.path().join("reply.json");
    std::fs::write(&saved, &wire)?;
    drop(wire);
    let tree_kib = measure_tree_in_child(&saved)?;

    let calls = raw_ms.len() as f64;
    let client_cpu_ms = client_cpu.values().sum::<u64>() as f64 / calls / 1e6;
    let qemu_cpu_ms = qemu_cpu.values().sum::<u64>() as f64 / calls / 1e6;
    raw_ms.sort_by(f64::total_cmp);
    let median = raw_ms[raw_ms.len() / 2];
    let (min, max) = (raw_ms[0], raw_ms[raw_ms.len() - 1]);
    let peak = if reset {
        hwm_after
    } else {
        hwm_after.max(hwm_setup)
    };
    let delta = peak.saturating_sub(rss_before);
    if !args.json {
        println!(
            "{layers}-layer chain, QEMU {version}: {node_count} block nodes, \
             {linked} layers linked to a backing node"
        );
        println!(
            "  setup: {layers} images {:.1} s, {} x blockdev-add {:.1} s",
            images_built.as_secs_f64(),
            layers - 1,
            nodes_added.as_secs_f64()
        );
        println!(
            "  query-named-block-nodes {{\"flat\": true}}: reply {reply_bytes} bytes ({:.2} MiB)",
            reply_bytes as f64 / 1048576.0
        );
        println!(
            "  call: median {median:.0} ms (min {min:.0}, max {max:.0}) over {} calls; \
             CPU per call: QEMU {qemu_cpu_ms:.0} ms, client {client_cpu_ms:.1} ms; \
             typed call {typed_ms:.0} ms",
            args.calls
        );
        println!(
            "  client RSS {:.1} MiB before, peak {:.1} MiB during the calls \
             (+{:.1} MiB; raw JSON calls only: {:.1} MiB){}",
            mib(rss_before),
            mib(peak),
            mib(delta),
            mib(hwm_raw),
            if reset {
                ""
            } else {
                " (peak could not be reset: it includes setup)"
            }
        );
        if let (Some(tree), Some(typed)) = tree_kib {
            println!(
                "  the reply alone, parsed in a fresh process: as a serde_json::Value {:.1} MiB \
                 ({:.1}x its size on the wire); straight into typed structs {:.1} MiB",
                mib(tree),
                tree as f64 * 1024.0 / reply_bytes as f64,
                mib(typed),
            );
        }
    }
    Ok(json!({
        "client": "qmp-client",
        "qemu": version,
        "layers": layers,
        "nodes": node_count,
        "linked_layers": linked,
        "images_seconds": images_built.as_secs_f64(),
        "blockdev_add_seconds": nodes_added.as_secs_f64(),
        "reply_bytes": reply_bytes,
        "calls": args.calls,
        "call_ms": { "median": median, "min": min, "max": max },
        "qemu_cpu_ms_per_call": qemu_cpu_ms,
        "client_cpu_ms_per_call": client_cpu_ms,
        "typed_call_ms": typed_ms,
        "rss_before_kib": rss_before,
        "peak_rss_kib": peak,
        "peak_rss_raw_calls_kib": hwm_raw,
        "peak_delta_kib": delta,
        "peak_reset": reset,
        "json_tree_kib": tree_kib.0,
        "typed_from_bytes_kib": tree_kib.1,
    }))
}
