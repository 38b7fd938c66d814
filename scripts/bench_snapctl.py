#!/usr/bin/env python3
"""The measuring side of scripts/bench-snapctl: times `snapctl create` and
`snapctl list` as a user runs them, one process from start to exit.

    bench_snapctl.py create --snapctl BIN --vm NAME --series DIR:MODE [...]
                            [--runs 20] [--warmup 3] --out FILE
    bench_snapctl.py qemu-img --dir DIR [--runs 20] --out FILE
    bench_snapctl.py floor --snapctl BIN [--runs 20] --out FILE
    bench_snapctl.py list --snapctl BIN --dir DIR [--snapshots 1000] [--runs 20] --out FILE
    bench_snapctl.py report --dir DIR [--strict]

`create` takes one or more series, each a VM already registered with
`snapctl init` (DIR holds `state/` and `snapctl.sock`) and a MODE:

  plain   no logging: the end-to-end time a user sees
  log     SNAPCTL_LOG=debug: the same, plus each QMP command's round trip as
          logged by qmp-client (`qmp{command="transaction" id=6}: ok latency_us=N`)
  strace  log, run under `strace --seccomp-bpf -f` tracing a handful of
          syscalls, to split the run into phases (see `phases`)

The series take turns, one create each, so that run i of every series sees the
same chain depth (each create adds a layer per disk, and QEMU's block queries
get slower as the graph grows) and the same moment's machine load.

Every time is taken with time.perf_counter_ns() around subprocess.run(), so it
includes fork and exec of snapctl and waiting for it to exit.
"""

import argparse
import datetime
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time

ANSI = re.compile(r"\x1b\[[0-9;]*m")
QMP_SPAN = re.compile(r'qmp\{command="([^"]+)" id=(\d+)\}: (ok|failed) latency_us=(\d+)')


def ms(ns):
    return ns / 1e6


def children_cpu():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(argv, env=None, stdout=None, stderr=None, cpu=None):
    """Runs argv once; returns (elapsed ns, exit status). With cpu (a dict),
    also stores the CPU time (user + system) the process used, in ms."""
    c0 = children_cpu()
    t0 = time.perf_counter_ns()
    p = subprocess.run(argv, env=env, stdout=stdout, stderr=stderr, stdin=subprocess.DEVNULL)
    elapsed = time.perf_counter_ns() - t0
    if cpu is not None:
        cpu["ms"] = (children_cpu() - c0) * 1000
    return elapsed, p.returncode


def summary(values):
    values = list(values)
    if not values:
        return None
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


# ---------------------------------------------------------------------------
# create


def qmp_spans(stderr_text):
    """The QMP commands qmp-client logged, in order: [(command, latency_us, ok)]."""
    spans = []
    for line in ANSI.sub("", stderr_text).splitlines():
        m = QMP_SPAN.search(line)
        if m:
            spans.append((m.group(1), int(m.group(4)), m.group(3) == "ok"))
    return spans


def strace_usable():
    if not shutil.which("strace"):
        return None
    for extra in (["--seccomp-bpf"], []):
        p = subprocess.run(
            ["strace", *extra, "-f", "-qq", "-o", "/dev/null", "-e", "trace=exit_group", "true"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        if p.returncode == 0:
            return extra
    return None


STRACE_SYSCALLS = (
    "execve,connect,sendto,sendmsg,recvfrom,recvmsg,clone,clone3,vfork,fork,"
    "wait4,waitid,fsync,fdatasync,rename,renameat,renameat2,exit_group"
)


def strace_events(path):
    """Parses `strace -f -ttt -o path` output into syscalls:
    [(pid, start, end, name, text)], resumed calls joined to their start."""
    line_re = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
    pending = {}
    out = []
    with open(path, errors="replace") as f:
        for line in f:
            m = line_re.match(line.rstrip("\n"))
            if not m:
                continue
            pid, ts, rest = int(m.group(1)), float(m.group(2)), m.group(3)
            if rest.startswith("+++"):
                out.append((pid, ts, ts, "+++exit", rest))
                continue
            if rest.startswith("---"):
                continue
            r = re.match(r"<\.\.\. (\w+) resumed>(.*)$", rest)
            if r:
                start, head = pending.pop((pid, r.group(1)), (ts, r.group(1) + "("))
                out.append((pid, start, ts, r.group(1), head + r.group(2)))
                continue
            n = re.match(r"(\w+)\(", rest)
            if not n:
                continue
            if rest.endswith("<unfinished ...>"):
                pending[(pid, n.group(1))] = (ts, rest[: -len("<unfinished ...>")])
            else:
                out.append((pid, ts, ts, n.group(1), rest))
    out.sort(key=lambda e: e[1])
    return out


def ret_value(text):
    m = re.search(r"\)\s+=\s+(-?\d+)", text)
    return int(m.group(1)) if m else None


GRAPH, CREATE_QMP, ADD, TX, HANDSHAKE = (
    "read block graph (QMP query-*)",
    "create overlays over QMP (blockdev-create jobs)",
    "blockdev-add of the overlays (QMP)",
    "transaction (QMP round trip)",
    "QMP connect + handshake",
)
START = "start-up: exec, runtime, lock, read record"
CPU = "snapctl CPU: decode, register, plan, serialize"
RECORD = "record writes: fsync, rename, fsync dir"
QEMU_IMG = "qemu-img create (spawn to exit)"
EXIT = "print result + exit"
PHASE_ORDER = [START, HANDSHAKE, GRAPH, CPU, RECORD, QEMU_IMG, CREATE_QMP, ADD, TX, EXIT]


def command_category(cmd):
    if cmd == "qmp_capabilities":
        return HANDSHAKE
    if cmd.startswith("query-") and cmd != "query-jobs" or cmd.startswith("x-debug-"):
        return GRAPH
    if cmd == "blockdev-add":
        return ADD
    if cmd == "transaction":
        return TX
    if cmd in ("blockdev-create", "query-jobs", "blockdev-del") or cmd.startswith(("job-", "block-job-")):
        return CREATE_QMP
    return f"QMP {cmd}"


def phases(path):
    """Splits one traced `snapctl create` into phases.

    Landmarks are the syscalls of snapctl's own threads: exec, connect to the
    monitor, each QMP request sent (named by its "execute"), each read from
    the socket, each fsync/rename of the record, each child spawned and
    reaped, exit. The time from one landmark to the next is charged to what
    the first one started: a request's category until its replies are read,
    a spawned child until it is reaped, and so on. Reading the last reply
    before a non-QMP step starts snapctl's own CPU work (decoding, planning,
    serializing the record)."""
    events = strace_events(path)
    if not events:
        return None
    main = events[0][0]
    group = {main}
    children = set()
    marks = []  # (ts, kind, category)
    current_qmp = HANDSHAKE
    for pid, start, end, name, text in events:
        if pid in children:
            continue
        if pid not in group:
            continue
        if name in ("clone", "clone3", "vfork", "fork"):
            new = ret_value(text)
            if "CLONE_THREAD" in text:
                if new:
                    group.add(new)
            else:
                if new:
                    children.add(new)
                marks.append((start, "spawn", QEMU_IMG))
        elif name == "execve" and not marks:
            marks.append((start, "start", START))
        elif name == "connect":
            marks.append((start, "connect", HANDSHAKE))
        elif name in ("sendto", "sendmsg"):
            m = re.search(r'\\"(?:execute|exec-oob)\\":\\"([\w-]+)\\"', text)
            if m:
                current_qmp = command_category(m.group(1))
                # A protocol node added for blockdev-create to write to.
                driver = re.search(r'\\"driver\\":\\"([\w-]+)\\"', text)
                if m.group(1) == "blockdev-add" and driver and driver.group(1) == "file":
                    current_qmp = CREATE_QMP
                marks.append((start, "send:" + m.group(1), current_qmp))
        elif name in ("recvfrom", "recvmsg"):
            marks.append((end, "recv", current_qmp))
        elif name in ("fsync", "fdatasync", "rename", "renameat", "renameat2"):
            marks.append((start, name, RECORD))
        elif name in ("wait4", "waitid"):
            marks.append((end, "reaped", CPU))
        elif name == "exit_group" and pid == main:
            marks.append((start, "exit", EXIT))
        elif name == "+++exit" and pid == main:
            marks.append((end, "end", None))
    marks.sort(key=lambda m: m[0])
    if not marks or marks[0][1] != "start" or marks[-1][1] != "end":
        return None
    out = {}
    for i in range(len(marks) - 1):
        ts, kind, cat = marks[i]
        nxt = marks[i + 1]
        if kind == "recv" and nxt[1] != "recv":
            cat = CPU
        out[cat] = out.get(cat, 0.0) + (nxt[0] - ts) * 1000
    spawns = sum(1 for m in marks if m[1] == "spawn")
    sends = [m[1][5:] for m in marks if m[1].startswith("send:")]
    return {
        "total_ms": (marks[-1][0] - marks[0][0]) * 1000,
        "phases_ms": out,
        "spawns": spawns,
        "qmp_commands": sends,
        "record_fsyncs": sum(1 for m in marks if m[1] in ("fsync", "fdatasync")),
    }


def cmd_create(args):
    series = []
    strace_flags = strace_usable()
    for spec in args.series:
        d, mode = spec.rsplit(":", 1)
        if mode == "strace" and strace_flags is None:
            print("bench: strace not usable here; skipping the phase breakdown", file=sys.stderr)
            continue
        series.append({"dir": d, "mode": mode, "runs": []})
    counter = {s["dir"]: 0 for s in series}

    def one(s, name, record):
        env = dict(os.environ)
        env.update(
            SNAPCTL_STATE_DIR=os.path.join(s["dir"], "state"),
            SNAPCTL_VM=args.vm,
            SNAPCTL_SOCKET=os.path.join(s["dir"], "snapctl.sock"),
            NO_COLOR="1",
        )
        env.pop("SNAPCTL_LOG", None)
        if s["mode"] in ("log", "strace"):
            env["SNAPCTL_LOG"] = "debug"
        argv = [args.snapctl, "create", name]
        trace = os.path.join(s["dir"], f"{name}.strace")
        if s["mode"] == "strace":
            argv = ["strace", *strace_flags, "-f", "-q", "-ttt", "-s", "65536",
                    "-e", "trace=" + STRACE_SYSCALLS, "-e", "signal=none", "-o", trace, *argv]
        out_path = os.path.join(s["dir"], "out.txt")
        err_path = os.path.join(s["dir"], "err.txt")
        cpu = {}
        with open(out_path, "wb") as out, open(err_path, "wb") as err:
            ns, rc = timed(argv, env=env, stdout=out, stderr=err, cpu=cpu)
        err_text = open(err_path, errors="replace").read()
        if rc != 0:
            sys.exit(f"bench: snapctl create {name} ({s['mode']}) exited {rc}:\n{err_text}")
        if not record:
            return
        run = {"name": name, "total_ms": ms(ns), "cpu_ms": cpu["ms"]}
        if s["mode"] in ("log", "strace"):
            spans = qmp_spans(err_text)
            tx = [lat for cmd, lat, ok in spans if cmd == "transaction"]
            if len(tx) != 1:
                sys.exit(f"bench: expected one logged transaction in create {name}, found {len(tx)}:\n{err_text}")
            run["transaction_ms"] = tx[0] / 1000
            run["qmp_ms"] = [[cmd, lat / 1000] for cmd, lat, ok in spans]
        if s["mode"] == "strace":
            run["trace"] = phases(trace)
            if run["trace"] is None:
                sys.exit(f"bench: could not read the strace output {trace}")
            os.unlink(trace)
        s["runs"].append(run)

    total = args.warmup + args.runs
    for i in range(total):
        record = i >= args.warmup
        order = series[i % len(series):] + series[: i % len(series)]
        for s in order:
            counter[s["dir"]] += 1
            name = f"b{counter[s['dir']]}" if record else f"w{counter[s['dir']]}"
            one(s, name, record)
        if record:
            print(f"bench: create run {i - args.warmup + 1}/{args.runs}", file=sys.stderr)
    json.dump({"series": series, "warmup": args.warmup, "runs": args.runs}, open(args.out, "w"), indent=1)


# ---------------------------------------------------------------------------
# reference timings


def cmd_qemu_img(args):
    base = os.path.join(args.dir, "base.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base, "1G"], check=True)
    times = []
    for i in range(args.runs + 2):
        path = os.path.join(args.dir, f"o{i}.qcow2")
        ns, rc = timed(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", path])
        if rc != 0:
            sys.exit("bench: qemu-img create failed")
        os.unlink(path)
        if i >= 2:
            times.append(ms(ns))
    json.dump({"overlay_create_ms": times}, open(args.out, "w"), indent=1)


def cmd_floor(args):
    times = []
    for i in range(args.runs + 2):
        ns, rc = timed([args.snapctl, "--version"], stdout=subprocess.DEVNULL)
        if rc != 0:
            sys.exit("bench: snapctl --version failed")
        if i >= 2:
            times.append(ms(ns))
    json.dump({"version_ms": times}, open(args.out, "w"), indent=1)


# ---------------------------------------------------------------------------
# list


def synth_record(vm, img_dir, n):
    """A record of one disk, vda, with a base image and n overlays in one
    linear chain, and n snapshots: snapshot k froze the image active before
    it (the base for the first) and made overlay k active."""
    base = os.path.join(img_dir, "base.qcow2")
    overlay = lambda k: os.path.join(img_dir, f"vda.s{k:04}.qcow2")
    size = 1 << 30
    layers = {base: {"format": "qcow2", "backing": None, "backing_string": None,
                     "owned": False, "virtual_size": size}}
    snapshots = []
    t0 = datetime.datetime(2026, 11, 23, 12, 0, 0, tzinfo=datetime.timezone.utc)
    below = base
    for k in range(1, n + 1):
        layers[overlay(k)] = {"format": "qcow2", "backing": below, "backing_string": below,
                              "owned": True, "virtual_size": size}
        snapshots.append({
            "name": f"s{k:04}",
            "parent": f"s{k - 1:04}" if k > 1 else None,
            "created": (t0 + datetime.timedelta(minutes=k)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "description": f"nightly build {k}",
            "kind": "disk-only",
            "disks": {"vda": {"image": below}},
        })
        below = overlay(k)
    return {
        "version": 1,
        "vm": vm,
        "qmp_socket": os.path.join(img_dir, "big.sock"),
        "qga_socket": None,
        "disks": {"vda": {"active": below, "device": {"driver": "virtio-blk-pci", "extra": {}}}},
        "layers": layers,
        "snapshots": snapshots,
        "current": f"s{n:04}",
        "journal": [],
    }


def cmd_list(args):
    state = os.path.join(args.dir, "state")
    os.makedirs(state, mode=0o700, exist_ok=True)
    rec = synth_record("big", args.dir, args.snapshots)
    path = os.path.join(state, "big.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=2)
        f.write("\n")
    os.chmod(path, 0o600)
    names = [s["name"] for s in rec["snapshots"]]
    env = dict(os.environ)
    env.pop("SNAPCTL_LOG", None)
    for k in ("SNAPCTL_VM", "SNAPCTL_SOCKET", "SNAPCTL_STATE_DIR", "SNAPCTL_QGA"):
        env.pop(k, None)
    out_path = os.path.join(args.dir, "list.out")

    def check(variant, text):
        lines = text.splitlines()
        if variant == "list --json":
            doc = json.loads(text)
            got = [s["name"] for s in doc["snapshots"]]
            ok = got == names and doc["current"] == names[-1]
            return ok, len(got)
        if variant == "list --tree":
            got = [l.strip().removeprefix("└── ").removesuffix("  <- current") for l in lines]
            return got == names and lines[-1].endswith("<- current"), len(lines)
        rows = lines[1:]  # a header line, then one line per snapshot
        got = [r[2:].split()[0] for r in rows]
        return got == names and rows[-1].startswith("*"), len(rows)

    results = {"snapshots": args.snapshots, "record_bytes": os.path.getsize(path), "variants": {}}
    for variant, extra in (("list", []), ("list --json", ["--json"]), ("list --tree", ["--tree"])):
        argv = [args.snapctl, "--state-dir", state, "--vm", "big", "list", *extra]
        times, cpus = [], []
        for i in range(args.runs + 2):
            cpu = {}
            with open(out_path, "wb") as out:
                ns, rc = timed(argv, env=env, stdout=out, stderr=subprocess.PIPE, cpu=cpu)
            if rc != 0:
                sys.exit(f"bench: {' '.join(argv)} exited {rc}")
            text = open(out_path, encoding="utf-8").read()
            ok, count = check(variant, text)
            if not ok:
                sys.exit(f"bench: {variant} did not print the {args.snapshots} snapshots in order "
                         f"(got {count} lines); output in {out_path}")
            if i >= 2:
                times.append(ms(ns))
                cpus.append(cpu["ms"])
        results["variants"][variant] = {"ms": times, "cpu_ms": cpus, "lines": count,
                                        "output_bytes": len(text.encode())}
    json.dump(results, open(args.out, "w"), indent=1)


# ---------------------------------------------------------------------------
# report


def cmd_report(args):
    d = args.dir
    create = json.load(open(f"{d}/create.json"))
    lst = json.load(open(f"{d}/list.json"))
    qimg = json.load(open(f"{d}/qemu-img.json"))
    floor = json.load(open(f"{d}/floor.json"))
    meta = json.load(open(f"{d}/meta.json"))
    by_mode = {s["mode"]: s["runs"] for s in create["series"]}
    plain, log, traced = by_mode.get("plain", []), by_mode.get("log", []), by_mode.get("strace", [])

    tot_plain = summary(r["total_ms"] for r in plain)
    tot_log = summary(r["total_ms"] for r in log)
    tx = summary(r["transaction_ms"] for r in log)
    # Run i of each series had the same chain depth: pair them.
    over_paired = summary(p["total_ms"] - l["transaction_ms"] for p, l in zip(plain, log))
    over_log = summary(r["total_ms"] - r["transaction_ms"] for r in log)

    print()
    print(f"snapctl {meta['snapctl_version']} ({meta['git']}), QEMU {meta['qemu']}, TCG, paused guest; "
          f"{meta['cpus']} CPUs; load average {meta['load_before']} before, {meta['load_after']} after")
    print(f"create: 2 disks (1 GiB qcow2 each), {create['warmup']} warm-up + {create['runs']} timed runs per series, "
          f"series taking turns; process start to exit")
    print()
    hdr = f"{'':<52} {'median':>8} {'min':>8} {'max':>8}"
    print(hdr)

    def row(label, s, unit="ms"):
        if s is None:
            return
        print(f"{label:<52} {s['median']:>8.1f} {s['min']:>8.1f} {s['max']:>8.1f}  {unit}")

    row("create, no logging: total", tot_plain)
    row("  of which snapctl's CPU time (user + system)", summary(r["cpu_ms"] for r in plain))
    row("create, SNAPCTL_LOG=debug: total", tot_log)
    row("  transaction round trip (logged)", tx)
    row("overhead = total - transaction (paired runs)", over_paired)
    row("overhead within the logged runs", over_log)
    if log:
        per_cmd = {}
        for r in log:
            for cmd, lat in r["qmp_ms"]:
                per_cmd.setdefault(cmd, []).append(lat)
        for cmd, lats in per_cmd.items():
            per_run = len(lats) / len(log)
            label = f"  QMP {cmd}" + (f" (x{per_run:g} per run)" if per_run != 1 else "")
            row(label, summary(lats))
        def qmp_sum(r):
            graph = [lat for cmd, lat in r["qmp_ms"] if command_category(cmd) == GRAPH]
            rest = [lat for cmd, lat in r["qmp_ms"] if command_category(cmd) != GRAPH]
            return max(graph, default=0) + sum(rest)
        row("  all QMP round trips (the 3 pipelined queries once)", summary(qmp_sum(r) for r in log))
        row("  total minus all QMP round trips", summary(r["total_ms"] - qmp_sum(r) for r in log))
        q = [max((lat for cmd, lat in r["qmp_ms"] if cmd == "query-named-block-nodes"), default=0) for r in log]
        k = max(1, len(q) // 4)
        print(f"  (query-named-block-nodes grows with the chain: median {statistics.median(q[:k]):.1f} ms "
              f"over the first {k} runs, {statistics.median(q[-k:]):.1f} ms over the last {k})")

    row("reference: qemu-img create of one overlay", summary(qimg["overlay_create_ms"]))
    row("reference: snapctl --version (process floor)", summary(floor["version_ms"]))

    if traced:
        print()
        spawns = statistics.median(r["trace"]["spawns"] for r in traced)
        cmds = traced[0]["trace"]["qmp_commands"]
        print(f"create phases under strace ({len(traced)} runs, median per phase; "
              f"child processes per run: {spawns:g}; QMP commands: {' '.join(cmds)})")
        cats = [c for c in PHASE_ORDER if any(c in r["trace"]["phases_ms"] for r in traced)]
        cats += sorted({c for r in traced for c in r["trace"]["phases_ms"]} - set(cats))
        for c in cats:
            vals = [r["trace"]["phases_ms"].get(c, 0.0) for r in traced]
            row("  " + c, summary(vals))
        row("  total under strace", summary(r["trace"]["total_ms"] for r in traced))

    print()
    print(f"list: {lst['snapshots']} snapshots in one linear chain, record {lst['record_bytes'] / 1024:.0f} KiB, "
          f"{len(next(iter(lst['variants'].values()))['ms'])} runs each")
    for v, r in lst["variants"].items():
        row(f"{v} ({r['lines']} lines, {r['output_bytes'] / 1024:.0f} KiB)", summary(r["ms"]))
        row("  CPU time (user + system)", summary(r["cpu_ms"]))

    print()
    targets = []
    if over_paired:
        targets.append(("create overhead (total - transaction) < 20 ms", over_paired["median"], 20.0))
    for v, r in lst["variants"].items():
        targets.append((f"{v} with {lst['snapshots']} snapshots < 50 ms", statistics.median(r["ms"]), 50.0))
    failed = 0
    for what, got, limit in targets:
        ok = got < limit
        failed += not ok
        print(f"target: {what:<48} {got:7.1f} ms  {'PASS' if ok else 'FAIL'}")

    json.dump({"meta": meta, "create": create, "list": lst, "qemu_img": qimg, "floor": floor,
               "targets": [{"target": w, "ms": g, "pass": g < t} for w, g, t in targets]},
              open(f"{d}/results.json", "w"), indent=1)
    if failed and args.strict:
        sys.exit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("create")
    c.add_argument("--snapctl", required=True)
    c.add_argument("--vm", required=True)
    c.add_argument("--series", action="append", required=True)
    c.add_argument("--runs", type=int, default=20)
    c.add_argument("--warmup", type=int, default=3)
    c.add_argument("--out", required=True)
    q = sub.add_parser("qemu-img")
    q.add_argument("--dir", required=True)
    q.add_argument("--runs", type=int, default=20)
    q.add_argument("--out", required=True)
    f = sub.add_parser("floor")
    f.add_argument("--snapctl", required=True)
    f.add_argument("--runs", type=int, default=20)
    f.add_argument("--out", required=True)
    lp = sub.add_parser("list")
    lp.add_argument("--snapctl", required=True)
    lp.add_argument("--dir", required=True)
    lp.add_argument("--snapshots", type=int, default=1000)
    lp.add_argument("--runs", type=int, default=20)
    lp.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("--dir", required=True)
    r.add_argument("--strict", action="store_true")
    args = ap.parse_args()
    {"create": cmd_create, "qemu-img": cmd_qemu_img, "floor": cmd_floor, "list": cmd_list,
     "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
