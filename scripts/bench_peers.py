#!/usr/bin/env python3
"""The measuring side of scripts/bench-peers: times snapctl commands next to
the cheapest way to get the same result without snapctl (its peer), on the
same QEMU or the same files, one pair of runs after the other so that both
sides see the same moment's load.

    bench_peers.py live    --snapctl BIN --dir DIR [--runs 10] [--strace-runs 5] --out FILE
    bench_peers.py gib     --snapctl BIN --dir DIR [--runs 3] [--mib 1024] --out FILE
    bench_peers.py offline --snapctl BIN --dir DIR [--runs 5] --out FILE
    bench_peers.py revert  --snapctl BIN --dir DIR [--runs 10] --out FILE
    bench_peers.py fleet   --snapctl BIN --fleet BIN --dir DIR [--vms 32] [--runs 3] --out FILE
    bench_peers.py big     --snapctl BIN --dir DIR [--snapshots 10000] [--runs 5] --out FILE

Every QEMU is paused (-S), TCG, q35, 64 MiB, no default devices, with one
qcow2 disk `vda` (1 GiB, one -blockdev per layer, virtio-blk-pci) and two QMP
monitors: one for snapctl and one for the peer, a small synchronous Python
client (class Qmp) that connects once, before anything is timed. Test data is
written through the peer monitor with HMP `qemu-io` on the disk's device.

live (one QEMU; snapctl registered it and took s0, and its active image then
got 32 MiB, so that a delete merges by active commit: snapctl commits down
when the newer layer holds no more than the frozen one). Per pair i, the two
sides alternating which goes first:
  create        `snapctl create sI`, timed;
  create peer   on the same QEMU: `qemu-img create -b ACTIVE` of the overlay,
                blockdev-add (backing null), transaction of blockdev-snapshot:
                timed from spawning qemu-img to the transaction's reply;
  delete        16 MiB written into sI's overlay (untimed), then `snapctl
                delete sI` (an active commit into the image sI froze), timed;
  delete peer   16 MiB written into the peer's overlay (untimed), then
                block-commit (job-id, base-node, auto-dismiss false), wait
                BLOCK_JOB_READY, job-complete, wait JOB_STATUS_CHANGE
                concluded (and BLOCK_JOB_COMPLETED), job-dismiss: timed from
                sending block-commit to the job-dismiss reply; the overlay's
                blockdev-del and unlink follow, untimed.
  Both sides end where they began (same chain depth every pair). Then
  --strace-runs extra deletes of the same kind run under `strace -f -ttt -T`
  with SNAPCTL_LOG=debug to split snapctl's delete into phases (see
  delete_phases).
gib: an active commit of MIB MiB of written data over an image holding MIB +
  64 MiB (a disk of MIB + 64 MiB, the lower layer written whole, so that the
  upper one holds less and snapctl commits rather than streams). Per run:
  snapctl   a QEMU on a foreign empty base, `snapctl create g0`, MIB + 64 MiB
            written into g0's overlay, `snapctl create g1`, MIB MiB written
            into g1's overlay (all untimed), then `snapctl delete g1` timed;
  qemu-img  the same chain made offline with qemu-img and qemu-io, then
            `qemu-img commit -q -d -b FROZEN TOP` (what snapctl runs offline)
            timed;
  dd        `dd if=TOP of=COPY bs=1M conv=fsync` of the top layer (whose file
            is its allocated bytes plus qcow2 metadata) timed: the cost of just
            moving the bytes once.
offline: a record written directly (like bench_depth.py's) for a chain base
  (foreign) <- A (32 MiB) <- B (16 MiB) <- C (active), snapshots s1 s2 s3
  freezing base, A, B; QEMU not running. Per run the chain is rebuilt twice
  (untimed) and `snapctl delete s2` (it commits B into A: B holds less) and
  the hand recipe `qemu-img commit -q -d -b A B; qemu-img rebase -q -u -b A -F
  qcow2 C` are timed.
revert: snapctl side: a QEMU on a foreign base, `snapctl create r1`, then
  `snapctl revert r1` timed (live: stop, new overlay, qom-set, reset).
  Peer: what a harness without snapctl does: SIGKILL its QEMU and reap it,
  `qemu-img create` a fresh overlay on the same base, start a new QEMU on it
  and connect until `query-status` answers: timed from the kill to that reply.
fleet: snapctl/examples/fleet.rs with 1 VM and with VMS VMs (its printed total:
  create, write, revert, check, delete on every VM at once, one process; and,
  from the VMS run, its median of one create alone against one on every VM at
  once, when it prints them), then
  VMS paused QEMUs registered with `snapctl init`: `snapctl create` on one of
  them, and VMS `snapctl create` processes started at once, one per VM (timed
  from the first start to the last reaping), alternating.
big: a record of one VM with SNAPSHOTS snapshots in a branching tree, written
  directly: snapshot k froze the active image and made a new overlay active,
  except every 10th, which first reverted to an earlier snapshot (chosen by a
  fixed hash of k), starting a branch. Only the files of the active chain
  exist (qemu-img). Times `list`, `list --json`, `list --tree`, `show` of a
  snapshot in the middle (each output checked), and an offline `snapctl
  create` (QEMU not running) on that record, each after one warm-up run.

Every time is time.perf_counter_ns() around starting the process and reaping
it with os.wait4 (so it includes fork and exec); the peak RSS is the reaped
process's ru_maxrss, which the kernel carries over from the forking process
through exec: this script keeps itself small (the big record is built in a
child process). FILE gets every run; scripts/bench_table.py prints medians
and min-max.
"""

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

import benchlib

SIZE = 1 << 30
VM = "peer"
DEVICE = "/machine/peripheral/vda/virtio-backend"


def die(msg):
    sys.exit(f"bench-peers: {msg}")


def log(msg):
    print(f"bench-peers: {msg}", file=sys.stderr, flush=True)


def now():
    return time.perf_counter_ns()


def sh(argv, **kw):
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        die(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def spawn(argv, env=None, out=None, err=None):
    return subprocess.Popen(argv, env=env, stdout=out or subprocess.DEVNULL,
                            stderr=err or (subprocess.STDOUT if out else subprocess.DEVNULL),
                            stdin=subprocess.DEVNULL)


def reap(p):
    """Waits for p; returns (exit status, peak RSS KiB)."""
    _, status, rusage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, rusage.ru_maxrss


def timed(argv, env=None, out_path=None):
    """Runs argv once; returns (elapsed ms, exit status, peak RSS KiB). With
    out_path, stdout goes there and stderr to out_path + ".err"."""
    out = open(out_path, "wb") if out_path else None
    err = open(out_path + ".err", "wb") if out_path else None
    try:
        t0 = now()
        p = spawn(argv, env, out, err)
        rc, rss = reap(p)
        return (now() - t0) / 1e6, rc, rss
    finally:
        if out:
            out.close()
            err.close()


def snap_env(state, sock=None, vm=VM):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPCTL_")}
    env.update(SNAPCTL_STATE_DIR=state, SNAPCTL_VM=vm, NO_COLOR="1")
    if sock:
        env["SNAPCTL_SOCKET"] = sock
    return env


class Snapctl:
    def __init__(self, binary, state, sock=None, vm=VM, out_dir=None):
        self.binary, self.env = binary, snap_env(state, sock, vm)
        self.out = os.path.join(out_dir or state, "snapctl.out")

    def run(self, *argv, env_extra=None, wrap=()):
        """Runs snapctl once: (ms, peak RSS KiB); dies on failure."""
        env = dict(self.env, **(env_extra or {}))
        ms, rc, rss = timed([*wrap, self.binary, *argv], env, self.out)
        if rc != 0:
            die(f"snapctl {' '.join(argv)} exited {rc}: {self.text(True).strip()[-2000:]}")
        return ms, rss

    def text(self, stderr=False):
        """What the last run printed on stdout (stderr: on stderr too)."""
        text = open(self.out, errors="replace").read()
        if stderr:
            text += open(self.out + ".err", errors="replace").read()
        return text


class Qmp(benchlib.Qmp):
    """The shared QMP client, with what this script does through it."""

    def __init__(self, path, timeout=120):
        super().__init__(path, timeout)

    def hmp(self, line):
        out = self.cmd("human-monitor-command", {"command-line": line})
        if out and re.search(r"error|fail|No such|not found", out, re.I):
            die(f"HMP {line}: {out.strip()}")
        return out

    def write(self, mib, pattern, offset_mib=0):
        step = 64
        done = 0
        while done < mib:
            n = min(step, mib - done)
            self.hmp(f'qemu-io -d {DEVICE} "write -q -P {pattern} {offset_mib + done}M {n}M"')
            done += n
        self.hmp(f'qemu-io -d {DEVICE} "flush"')

    def root(self):
        """(node name, file) of vda's active image."""
        for b in self.cmd("query-block"):
            if b.get("qdev") == DEVICE and b.get("inserted"):
                return b["inserted"]["node-name"], b["inserted"]["image"]["filename"]
        die("query-block: no vda")


def qemu_argv(layers, d):
    """A paused QEMU on the chain `layers` (paths, base first)."""
    args = []
    for k, path in enumerate(layers):
        node = {"driver": "qcow2", "node-name": f"n{k}",
                "file": {"driver": "file", "filename": path}}
        if k > 0:
            node["backing"] = f"n{k - 1}"
        args += ["-blockdev", json.dumps(node, separators=(",", ":"))]
    return ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-m", "64", "-nodefaults",
            "-display", "none", "-S", *args,
            "-device", f"virtio-blk-pci,id=vda,drive=n{len(layers) - 1}",
            "-qmp", f"unix:{d}/snapctl.sock,server=on,wait=off",
            "-qmp", f"unix:{d}/peer.sock,server=on,wait=off"]


class Qemu:
    def __init__(self, layers, d):
        self.d = d
        for s in ("snapctl.sock", "peer.sock"):
            if os.path.exists(os.path.join(d, s)):
                os.unlink(os.path.join(d, s))
        self.logf = open(os.path.join(d, "qemu.log"), "ab")
        self.proc = subprocess.Popen(qemu_argv(layers, d), stdin=subprocess.DEVNULL,
                                     stdout=self.logf, stderr=self.logf)
        self.sock = os.path.join(d, "snapctl.sock")
        self.qmp = connect_when_up(os.path.join(d, "peer.sock"), self.proc, d)

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        self.logf.close()


def connect_when_up(path, proc, d, step=0.002, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.exists(path):
            try:
                return Qmp(path)
            except (OSError, EOFError):
                pass
        if proc.poll() is not None:
            die(f"QEMU exited: {open(os.path.join(d, 'qemu.log'), errors='replace').read()[-2000:]}")
        time.sleep(step)
    proc.kill()
    die(f"QEMU did not answer on {path}")


def qcow2(path, backing=None, size=SIZE):
    argv = ["qemu-img", "create", "-q", "-f", "qcow2"]
    if backing:
        argv += ["-b", backing, "-F", "qcow2"]
    sh(argv + [path] + ([] if backing else [str(size)]))


def qemu_io_write(path, mib, pattern, offset_mib=0):
    cmds = []
    for off in range(0, mib, 64):
        cmds += ["-c", f"write -q -P {pattern} {offset_mib + off}M {min(64, mib - off)}M"]
    sh(["qemu-io", "-f", "qcow2", *cmds, path])


def fresh_dir(d):
    subprocess.run(["rm", "-rf", d], check=True)
    os.makedirs(d)
    return d


# ---------------------------------------------------------------------------
# live: create and delete against their bare QMP sequences on one QEMU


def floor_create(qmp, d, i):
    node, active = qmp.root()
    path = os.path.join(d, f"floor{i}.qcow2")
    t0 = now()
    p = spawn(["qemu-img", "create", "-q", "-f", "qcow2", "-b", active, "-F", "qcow2", path])
    if reap(p)[0] != 0:
        die("qemu-img create of the floor overlay failed")
    qmp.cmd("blockdev-add", {"driver": "qcow2", "node-name": f"flr{i}",
                             "file": {"driver": "file", "filename": path}, "backing": None})
    qmp.cmd("transaction", {"actions": [{"type": "blockdev-snapshot",
                                         "data": {"node": node, "overlay": f"flr{i}"}}]})
    return (now() - t0) / 1e6, node, path


def floor_commit(qmp, top, base, job):
    qmp.events.clear()
    t0 = now()
    qmp.cmd("block-commit", {"job-id": job, "device": top, "base-node": base,
                             "auto-dismiss": False})
    qmp.wait_event(lambda e: e["event"] == "BLOCK_JOB_READY" and e["data"]["device"] == job)
    qmp.cmd("job-complete", {"id": job})
    seen = {}
    while len(seen) < 2:
        e = qmp.wait_event(lambda e: e["event"] == "BLOCK_JOB_COMPLETED"
                           and e["data"]["device"] == job
                           or e["event"] == "JOB_STATUS_CHANGE" and e["data"]["id"] == job
                           and e["data"]["status"] == "concluded")
        seen[e["event"]] = e
    if seen["BLOCK_JOB_COMPLETED"]["data"].get("error"):
        die(f"floor commit {job}: {seen}")
    qmp.cmd("job-dismiss", {"id": job})
    return (now() - t0) / 1e6


def cmd_live(a):
    d = fresh_dir(a.dir)
    state = os.path.join(d, "state")
    base = os.path.join(d, "base.qcow2")
    qcow2(base)
    q = Qemu([base], d)
    try:
        s = Snapctl(a.snapctl, state, q.sock, out_dir=d)
        s.run("init")
        s.run("create", "s0")
        q.qmp.write(32, 0x11)
        res = {k: [] for k in ("create", "create_peer", "delete", "delete_peer")}
        merges = set()
        for i in range(a.warmup + a.runs):
            keep = i >= a.warmup

            def ours():
                t = s.run("create", f"s{i + 1}")
                q.qmp.write(16, 0x22 + i % 100)
                os.sync()
                u = s.run("--json", "delete", f"s{i + 1}")
                doc = json.loads(s.text())
                for disk in doc["deleted"][0]["disks"]:
                    merges.add(f"{disk['merge']['operation']}"
                               f"{' (active)' if (disk.get('job') or {}).get('active') else ''}")
                return t, u

            def peer():
                ms, base_node, path = floor_create(q.qmp, d, i)
                q.qmp.write(16, 0x22 + i % 100)
                os.sync()
                c = floor_commit(q.qmp, f"flr{i}", base_node, f"fc{i}")
                q.qmp.cmd("blockdev-del", {"node-name": f"flr{i}"})
                os.unlink(path)
                return ms, c

            if i % 2 == 0:
                mine, theirs = ours(), peer()
            else:
                theirs, mine = peer(), ours()
            if keep:
                res["create"].append(mine[0])
                res["delete"].append(mine[1])
                res["create_peer"].append(theirs[0])
                res["delete_peer"].append(theirs[1])
                log(f"live pair {i - a.warmup + 1}/{a.runs}: create {mine[0][0]:.1f} / "
                    f"{theirs[0]:.1f} ms, delete {mine[1][0]:.1f} / {theirs[1]:.1f} ms")
        traces = []
        if a.strace_runs and strace_ok():
            for i in range(a.strace_runs):
                name = f"t{i}"
                s.run("create", name)
                q.qmp.write(16, 0x33)
                trace = os.path.join(d, f"{name}.strace")
                s.run("delete", name, env_extra={"SNAPCTL_LOG": "debug"},
                      wrap=["strace", "-f", "-q", "-ttt", "-T", "-s", "256",
                            "-e", "trace=" + STRACE_SYSCALLS, "-e", "signal=none", "-o", trace])
                ph = delete_phases(trace, s.text(True))
                if ph is None:
                    die(f"could not read the strace output {trace}")
                traces.append(ph)
                os.unlink(trace)
        elif a.strace_runs:
            log("strace not usable here: no phase breakdown of delete")
        s.run("check")
    finally:
        q.kill()
    json.dump({"runs": a.runs, "data_mib": 16, "merges": sorted(merges), "results": res,
               "delete_phases": traces}, open(a.out, "w"), indent=1)


STRACE_SYSCALLS = ("execve,openat,flock,connect,sendto,sendmsg,write,recvfrom,recvmsg,read,"
                   "fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat,clone,clone3,exit_group")
QMP_SPAN = re.compile(r'qmp\{command="([^"]+)" id=(\d+)\}: (ok|failed) latency_us=(\d+)')

START, LOCK, READ, CONNECT, GRAPH, JOB, OTHER_QMP, CPU, WRITE, FSYNC, IMAGES, REMOVE, EXIT = (
    "process start (exec to the lock file's open)",
    "lock (open + flock of <vm>.lock)",
    "record read (open, read, parse)",
    "QMP connect + handshake",
    "graph read (QMP queries)",
    "job: block-commit sent to job-dismiss answered",
    "other QMP (blockdev-del, ...)",
    "snapctl CPU between steps (plan, decode)",
    "record writes (journal + result: write, rename)",
    "fsyncs (record, directory)",
    "image files (open, header reads)",
    "overlay file removal (unlink)",
    "exit",
)
PHASES = [START, LOCK, READ, CONNECT, GRAPH, IMAGES, CPU, JOB, OTHER_QMP, WRITE, FSYNC, REMOVE,
          EXIT]


def strace_ok():
    p = subprocess.run(["strace", "-f", "-qq", "-o", "/dev/null", "-e", "trace=exit_group", "true"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return p.returncode == 0


def strace_calls(path):
    """`strace -f -ttt -T` output as [(pid, start, end, name, text)], resumed
    calls joined to their start."""
    line_re = re.compile(r"^(\d+)\s+(\d+\.\d+)\s+(.*)$")
    pending, out = {}, []
    for line in open(path, errors="replace"):
        m = line_re.match(line.rstrip("\n"))
        if not m:
            continue
        pid, ts, rest = int(m.group(1)), float(m.group(2)), m.group(3)
        if rest.startswith("+++"):
            out.append((pid, ts, ts, "+++exit", rest))
            continue
        if rest.startswith("---"):
            continue
        dur = re.search(r"<(\d+\.\d+)>$", rest)
        r = re.match(r"<\.\.\. (\w+) resumed>(.*)$", rest)
        if r:
            start, head = pending.pop((pid, r.group(1)), (ts, r.group(1) + "("))
            out.append((pid, start, ts + (float(dur.group(1)) if dur else 0), r.group(1),
                        head + r.group(2)))
            continue
        n = re.match(r"(\w+)\(", rest)
        if not n:
            continue
        if rest.endswith("<unfinished ...>"):
            pending[(pid, n.group(1))] = (ts, rest[: -len("<unfinished ...>")])
        else:
            out.append((pid, ts, ts + (float(dur.group(1)) if dur else 0), n.group(1), rest))
    out.sort(key=lambda e: e[1])
    return out


def qmp_category(cmd):
    if cmd == "qmp_capabilities":
        return CONNECT
    if cmd in ("block-commit", "block-stream", "query-jobs", "query-block-jobs") \
            or cmd.startswith(("job-", "block-job-")):
        return JOB
    if cmd.startswith(("query-", "x-debug-", "qom-get")):
        return GRAPH
    return OTHER_QMP


def delete_phases(path, log_text):
    """Splits one traced `snapctl delete` into phases by landmarks: the
    syscalls of snapctl's threads (exec; open and flock of the lock file; open
    of the record; connect to the monitor; each QMP request written, named by
    its "execute"; each read from the monitor; opens of the record's temp file,
    renames, fsyncs; exit). The time from one landmark to the next goes to the
    phase the first one started; the time after the last read of a run of
    reads goes to snapctl's CPU, unless a job is running (snapctl then waits
    for QEMU's events). An fsync's own duration goes to `fsyncs`."""
    calls = strace_calls(path)
    if not calls:
        return None
    main = calls[0][0]
    marks, qmp_fds, cur, in_job = [], set(), START, False
    fsync_ms, n_fsync = 0.0, 0

    def fd_of(text):
        m = re.match(r"\w+\((\d+)", text)
        return int(m.group(1)) if m else None

    for pid, start, end, name, text in calls:
        if name == "execve" and not marks:
            marks.append((start, START))
        elif name == "openat":
            if '.lock"' in text:
                marks.append((start, LOCK))
            elif re.search(r'\.json"', text) and "O_RDONLY" in text and not in_job:
                marks.append((start, READ))
            elif re.search(r'\.tmp|O_WRONLY|O_CREAT', text) and "/state" in text:
                marks.append((start, WRITE))
            elif ".qcow2\"" in text:
                marks.append((start, IMAGES))
        elif name in ("unlink", "unlinkat"):
            marks.append((start, REMOVE))
            marks.append((end, CPU))
        elif name == "flock" and "LOCK_EX" in text:
            marks.append((end, READ))
        elif name == "connect" and "sun_path" in text:
            fd = fd_of(text)
            if ret_ok(text) and fd is not None:
                qmp_fds.add(fd)
            marks.append((start, CONNECT))
        elif name in ("sendto", "sendmsg", "write") and fd_of(text) in qmp_fds:
            m = re.search(r'\\"execute\\":\s*\\"([\w-]+)\\"', text)
            if m:
                cat = qmp_category(m.group(1))
                if m.group(1) == "block-commit":
                    in_job = True
                if m.group(1) == "job-dismiss":
                    in_job = False
                    cat = JOB
                cur = cat
                marks.append((start, cat))
        elif name in ("recvfrom", "recvmsg", "read") and fd_of(text) in qmp_fds:
            marks.append((end, "recv:" + (JOB if in_job or cur == JOB else cur)))
            if cur == JOB and not in_job:
                cur = CPU
        elif name in ("fsync", "fdatasync"):
            marks.append((start, FSYNC))
            marks.append((end, WRITE))
            fsync_ms += (end - start) * 1000
            n_fsync += 1
        elif name in ("rename", "renameat", "renameat2"):
            marks.append((start, WRITE))
        elif name == "exit_group" and pid == main:
            marks.append((start, EXIT))
        elif name == "+++exit" and pid == main:
            marks.append((end, None))
    marks.sort(key=lambda m: m[0])
    if not marks or marks[-1][1] is not None:
        return None
    out = {}
    for i in range(len(marks) - 1):
        ts, cat = marks[i]
        nxt = marks[i + 1]
        if cat.startswith("recv:"):
            cat = cat[5:]
            if not nxt[1] or not nxt[1].startswith("recv:"):
                cat = JOB if cat == JOB and nxt[1] in (JOB, None) else (JOB if cat == JOB else CPU)
        out[cat] = out.get(cat, 0.0) + (nxt[0] - ts) * 1000
    spans = [(m.group(1), int(m.group(4)) / 1000) for m in QMP_SPAN.finditer(
        re.sub(r"\x1b\[[0-9;]*m", "", log_text))]
    return {"total_ms": (marks[-1][0] - marks[0][0]) * 1000, "phases_ms": out,
            "fsyncs": n_fsync, "fsync_ms": fsync_ms, "qmp_ms": spans}


def ret_ok(text):
    m = re.search(r"\)\s+=\s+(-?\d+)", text)
    return m is not None and int(m.group(1)) >= 0


# ---------------------------------------------------------------------------
# gib: a large active commit, live, offline, and as a plain copy


def cmd_gib(a):
    mib = a.mib
    size = (mib + 64) << 20
    res = {"snapctl": [], "snapctl_rss_kib": [], "qemu_img": [], "dd": []}
    merges = set()
    for i in range(a.runs):
        def ours():
            d = fresh_dir(os.path.join(a.dir, "live"))
            base = os.path.join(d, "base.qcow2")
            qcow2(base, size=size)
            q = Qemu([base], d)
            try:
                s = Snapctl(a.snapctl, os.path.join(d, "state"), q.sock, out_dir=d)
                s.run("init")
                s.run("create", "g0")
                q.qmp.write(mib + 64, 0x44)
                s.run("create", "g1")
                q.qmp.write(mib, 0x55)
                os.sync()
                ms, rss = s.run("--json", "delete", "g1")
                for disk in json.loads(s.text())["deleted"][0]["disks"]:
                    merges.add(f"{disk['merge']['operation']}"
                               f"{' (active)' if (disk.get('job') or {}).get('active') else ''}")
            finally:
                q.kill()
            return ms, rss

        def theirs():
            d = fresh_dir(os.path.join(a.dir, "offline"))
            base, mid, top = (os.path.join(d, f) for f in ("base.qcow2", "mid.qcow2", "top.qcow2"))
            qcow2(base, size=size)
            qcow2(mid, base)
            qemu_io_write(mid, mib + 64, 0x44)
            qcow2(top, mid)
            qemu_io_write(top, mib, 0x55)
            os.sync()
            copy = os.path.join(d, "copy")
            dd, rc, _ = timed(["dd", f"if={top}", f"of={copy}", "bs=1M", "conv=fsync"])
            if rc != 0:
                die("dd failed")
            os.unlink(copy)
            ms, rc, _ = timed(["qemu-img", "commit", "-q", "-d", "-b", mid, top])
            if rc != 0:
                die("qemu-img commit failed")
            return ms, dd

        if i % 2 == 0:
            mine, peer = ours(), theirs()
        else:
            peer, mine = theirs(), ours()
        res["snapctl"].append(mine[0])
        res["snapctl_rss_kib"].append(mine[1])
        res["qemu_img"].append(peer[0])
        res["dd"].append(peer[1])
        log(f"{mib} MiB commit run {i + 1}/{a.runs}: snapctl {mine[0]:.0f} ms, qemu-img commit "
            f"{peer[0]:.0f} ms, dd {peer[1]:.0f} ms")
    subprocess.run(["rm", "-rf", a.dir])
    json.dump({"runs": a.runs, "mib": mib, "merges": sorted(merges), "results": res},
              open(a.out, "w"), indent=1)


# ---------------------------------------------------------------------------
# offline: a middle snapshot deleted with QEMU stopped


def write_record(state, vm, sock, active, layers, snapshots, current):
    os.makedirs(state, mode=0o700, exist_ok=True)
    rec = {
        "version": 1, "vm": vm, "qmp_socket": sock, "qga_socket": None,
        "disks": {"vda": {"active": active, "device": {"driver": "virtio-blk-pci", "extra": {}}}},
        "layers": layers, "snapshots": snapshots, "current": current, "journal": [],
    }
    path = os.path.join(state, f"{vm}.json")
    with open(path, "w") as f:
        json.dump(rec, f, indent=1)
        f.write("\n")
    os.chmod(path, 0o600)
    return path


def layer(backing, owned):
    return {"format": "qcow2", "backing": backing, "backing_string": backing, "owned": owned,
            "virtual_size": SIZE}


def stamp(k):
    t0 = datetime.datetime(2026, 11, 23, 12, 0, 0, tzinfo=datetime.timezone.utc)
    return (t0 + datetime.timedelta(minutes=k)).strftime("%Y-%m-%dT%H:%M:%SZ")


def snapshot(name, parent, image, k):
    return {"name": name, "parent": parent, "created": stamp(k), "description": None,
            "kind": "disk-only", "disks": {"vda": {"image": image}}}


def offline_chain(d):
    fresh_dir(d)
    base, a_, b_, c_ = (os.path.join(d, f) for f in ("base.qcow2", "vda.s1.qcow2",
                                                    "vda.s2.qcow2", "vda.s3.qcow2"))
    qcow2(base)
    qcow2(a_, base)
    qemu_io_write(a_, 32, 0x61)
    qcow2(b_, a_)
    qemu_io_write(b_, 16, 0x62)
    qcow2(c_, b_)
    os.sync()
    state = os.path.join(d, "state")
    write_record(state, VM, os.path.join(d, "gone.sock"), c_,
                 {base: layer(None, False), a_: layer(base, True), b_: layer(a_, True),
                  c_: layer(b_, True)},
                 [snapshot("s1", None, base, 1), snapshot("s2", "s1", a_, 2),
                  snapshot("s3", "s2", b_, 3)], "s3")
    return state, a_, b_, c_


def cmd_offline(a):
    res = {"snapctl": [], "snapctl_rss_kib": [], "qemu_img": []}
    merges, steps = set(), None
    for i in range(a.warmup + a.runs):
        def ours():
            d = os.path.join(a.dir, "s")
            state, *_ = offline_chain(d)
            s = Snapctl(a.snapctl, state, out_dir=d)
            s.run("check")
            nonlocal steps
            if steps is None:
                s.run("--json", "delete", "s2", "--dry-run")
                steps = [" ".join(st["argv"][:2]) for st in json.loads(s.text())["steps"]
                         if st["step"] == "tool"]
            ms, rss = s.run("--json", "delete", "s2")
            for disk in json.loads(s.text())["deleted"][0]["disks"]:
                merges.add(disk["merge"]["operation"] + (" (live)" if disk.get("job") else ""))
            s.run("check")
            return ms, rss

        def theirs():
            _, a_, b_, c_ = offline_chain(os.path.join(a.dir, "h"))
            t0 = now()
            for argv in (["qemu-img", "commit", "-q", "-d", "-b", a_, b_],
                         ["qemu-img", "rebase", "-q", "-u", "-b", a_, "-F", "qcow2", c_]):
                if reap(spawn(argv))[0] != 0:
                    die(f"{' '.join(argv)} failed")
            return (now() - t0) / 1e6

        if i % 2 == 0:
            mine, peer = ours(), theirs()
        else:
            peer, mine = theirs(), ours()
        if i >= a.warmup:
            res["snapctl"].append(mine[0])
            res["snapctl_rss_kib"].append(mine[1])
            res["qemu_img"].append(peer)
    subprocess.run(["rm", "-rf", a.dir])
    json.dump({"runs": a.runs, "merges": sorted(merges), "tool_steps": steps, "results": res},
              open(a.out, "w"), indent=1)


# ---------------------------------------------------------------------------
# revert: live revert against killing QEMU and starting a new one


def cmd_revert(a):
    d = fresh_dir(os.path.join(a.dir, "s"))
    base = os.path.join(d, "base.qcow2")
    qcow2(base)
    q = Qemu([base], d)
    hd = fresh_dir(os.path.join(a.dir, "h"))
    hbase = os.path.join(hd, "base.qcow2")
    qcow2(hbase)
    h = Qemu([hbase], hd)
    res = {"snapctl": [], "snapctl_rss_kib": [], "restart": []}
    try:
        s = Snapctl(a.snapctl, os.path.join(d, "state"), q.sock, out_dir=d)
        s.run("init")
        s.run("create", "r1")
        for i in range(a.warmup + a.runs):
            def ours():
                q.qmp.write(1, 0x71)
                return s.run("revert", "r1")

            def theirs():
                nonlocal h
                h.qmp.write(1, 0x71)
                overlay = os.path.join(hd, f"o{i}.qcow2")
                t0 = now()
                h.proc.send_signal(signal.SIGKILL)
                reap(h.proc)
                h.qmp.close()
                h.logf.close()
                if reap(spawn(["qemu-img", "create", "-q", "-f", "qcow2", "-b", hbase,
                               "-F", "qcow2", overlay]))[0] != 0:
                    die("qemu-img create failed")
                h = Qemu([hbase, overlay], hd)
                st = h.qmp.cmd("query-status")
                ms = (now() - t0) / 1e6
                if st.get("status") != "prelaunch":
                    die(f"restarted QEMU: {st}")
                if i:
                    os.unlink(os.path.join(hd, f"o{i - 1}.qcow2"))
                return ms

            if i % 2 == 0:
                mine, peer = ours(), theirs()
            else:
                peer, mine = theirs(), ours()
            if i >= a.warmup:
                res["snapctl"].append(mine[0])
                res["snapctl_rss_kib"].append(mine[1])
                res["restart"].append(peer)
        s.run("check")
    finally:
        q.kill()
        h.kill()
    subprocess.run(["rm", "-rf", a.dir])
    json.dump({"runs": a.runs, "results": res}, open(a.out, "w"), indent=1)


# ---------------------------------------------------------------------------
# fleet: many VMs at once


def cmd_fleet(a):
    res = {"fleet_1": [], "fleet_n": [], "cli_1": [], "cli_n": [], "cli_n_rss_kib": [],
           "lib_1": [], "lib_n": []}
    fleet_out = os.path.join(a.dir, "fleet.out")
    os.makedirs(a.dir, exist_ok=True)

    def fleet(n):
        ms, rc, _ = timed([a.fleet, str(n)], out_path=fleet_out)
        text = open(fleet_out, errors="replace").read()
        m = re.search(r"every cycle at once: ([\d.]+) ms", text)
        if rc != 0 or not m:
            die(f"fleet {n} exited {rc}: {text[-2000:]}")
        # Newer versions also time one create alone against one on every VM at once.
        c = re.search(r"one create, 1 VM: ([\d.]+) ms; one create on each of \d+ VMs at once: "
                      r"([\d.]+) ms", text)
        if c and n == a.vms:
            res["lib_1"].append(float(c.group(1)))
            res["lib_n"].append(float(c.group(2)))
        return float(m.group(1))

    for i in range(a.runs):
        pair = (lambda: fleet(1), lambda: fleet(a.vms))
        r = [f() for f in (pair if i % 2 == 0 else pair[::-1])]
        one, many = (r if i % 2 == 0 else r[::-1])
        res["fleet_1"].append(one)
        res["fleet_n"].append(many)
        log(f"fleet run {i + 1}/{a.runs}: 1 VM {one:.0f} ms, {a.vms} VMs {many:.0f} ms")

    d = fresh_dir(os.path.join(a.dir, "cli"))
    state = os.path.join(d, "state")
    qemus = []
    try:
        for k in range(a.vms):
            vd = os.path.join(d, f"v{k}")
            os.makedirs(vd)
            base = os.path.join(vd, "base.qcow2")
            qcow2(base)
            qemus.append(Qemu([base], vd))
        clis = [Snapctl(a.snapctl, state, q.sock, vm=f"vm{k}", out_dir=q.d)
                for k, q in enumerate(qemus)]
        for c in clis:
            c.run("init")
        for i in range(a.warmup + a.runs):
            def one():
                return clis[0].run("create", f"a{i}")[0]

            def many():
                t0 = now()
                procs = [(c, spawn([c.binary, "create", f"b{i}"], c.env, open(c.out, "wb"),
                                   open(c.out + ".err", "wb")))
                         for c in clis]
                rss = []
                for c, p in procs:
                    rc, r = reap(p)
                    if rc != 0:
                        die(f"concurrent create on {c.env['SNAPCTL_VM']} exited {rc}: {c.text(True)}")
                    rss.append(r)
                return (now() - t0) / 1e6, max(rss)

            if i % 2 == 0:
                o, m = one(), many()
            else:
                m, o = many(), one()
            if i >= a.warmup:
                res["cli_1"].append(o)
                res["cli_n"].append(m[0])
                res["cli_n_rss_kib"].append(m[1])
                log(f"concurrent create run {i - a.warmup + 1}/{a.runs}: 1 VM {o:.0f} ms, "
                    f"{a.vms} VMs {m[0]:.0f} ms")
    finally:
        for q in qemus:
            q.kill()
    subprocess.run(["rm", "-rf", a.dir])
    json.dump({"runs": a.runs, "vms": a.vms, "results": res}, open(a.out, "w"), indent=1)


# ---------------------------------------------------------------------------
# big: a branching tree of many snapshots


def branching(d, n):
    """Snapshot k (1-based) froze F[k]. Normally F[k] is the overlay snapshot
    k-1 made active (the base for k = 1) and k's parent is k-1; every 10th
    snapshot first reverted to an earlier one p (a new overlay on F[p]),
    which it then froze, so its parent is p. The last snapshot's overlay is
    the active image."""
    base = os.path.join(d, "base.qcow2")
    img = lambda k: os.path.join(d, f"vda.s{k:05}.qcow2")  # overlay made active by k
    rev = lambda k: os.path.join(d, f"vda.r{k:05}.qcow2")  # overlay made by a revert before k
    layers = {base: layer(None, False)}
    snaps, frozen, parent_of = [], {}, {}
    for k in range(1, n + 1):
        if k % 10 == 0 and k > 10:
            p = 1 + (k * 2654435761) % (k - 2)
            f = rev(k)
            layers[f] = layer(frozen[p], True)
            parent = p
        else:
            f = base if k == 1 else img(k - 1)
            parent = k - 1 if k > 1 else None
        frozen[k], parent_of[k] = f, parent
        layers[img(k)] = layer(f, True)
        snaps.append(snapshot(f"s{k:05}", f"s{parent:05}" if parent else None, f, k))
    # Overlays no snapshot froze, other than the active one, were removed by
    # the reverts that abandoned them.
    needed = {s["disks"]["vda"]["image"] for s in snaps} | {img(n)}
    layers = {p: v for p, v in layers.items() if p in needed}
    chain, p = [], img(n)
    while p:
        chain.append(p)
        p = layers[p]["backing"]
    return layers, snaps, img(n), chain[::-1]


def big_record(d, n):
    """Writes the record and the active chain's images; returns the record's
    path, the snapshot names, the number of branches and the active chain's
    length."""
    state = os.path.join(d, "state")
    layers, snaps, active, chain = branching(d, n)
    qcow2(chain[0])
    for lower, upper in zip(chain, chain[1:]):
        qcow2(upper, lower)
    path = write_record(state, "big", os.path.join(d, "gone.sock"), active, layers, snaps,
                        snaps[-1]["name"])
    names = [s["name"] for s in snaps]
    parents = {s["name"]: s["parent"] for s in snaps}
    branches = sum(1 for i, n in enumerate(names) if parents[n] and parents[n] != names[i - 1])
    return path, names, branches, len(chain)


def in_child(work):
    """work() run in a forked child; what it returns (as JSON). The kernel
    keeps a process's peak RSS across exec, so a child's ru_maxrss is at least
    what this process had when it forked: whatever needs much memory (the
    large record, its outputs parsed) runs in a child, and this process stays
    small."""
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        os.close(reader)
        try:
            with os.fdopen(writer, "w") as w:
                json.dump(work(), w)
        finally:
            os._exit(0)
    os.close(writer)
    with os.fdopen(reader) as r:
        result = r.read()
    os.waitpid(child, 0)
    if not result:
        die("a child process of bench_peers.py failed")
    return json.loads(result)


def cmd_big(a):
    d = fresh_dir(a.dir)
    state = os.path.join(d, "state")

    def build():
        path, names, branches, chain_len = big_record(d, a.snapshots)
        return path, names[len(names) // 2], branches, chain_len

    path, mid, branches, chain_len = in_child(build)
    s = Snapctl(a.snapctl, state, vm="big", out_dir=d)

    def check(variant, text, names):
        if variant == "list --json":
            doc = json.loads(text)
            return [x["name"] for x in doc["snapshots"]] == names and doc["current"] == names[-1]
        if variant == "list":
            rows = text.splitlines()[1:]
            return [r[2:].split()[0] for r in rows] == names and rows[-1].startswith("*")
        if variant == "list --tree":
            got = re.findall(r"s\d{5}", text)
            return sorted(got) == names and "<- current" in text
        if variant.startswith("show"):
            return mid in text
        return True

    res = {}
    outputs = {}
    for variant, argv in (("list", ["list"]), ("list --json", ["list", "--json"]),
                          ("list --tree", ["list", "--tree"]), (f"show {mid}", ["show", mid])):
        times = []
        for i in range(a.runs + 1):
            ms, rss = s.run(*argv)
            if i:
                times.append((ms, rss))
        # Checked after every command has run: parsing the outputs grows
        # this process, and with it (see above) the children's peak RSS.
        outputs[variant] = os.path.join(d, f"{variant.replace(' ', '_')}.out")
        shutil.copyfile(s.out, outputs[variant])
        res[variant] = {"ms": [t for t, _ in times], "rss_kib": [r for _, r in times]}
        log(f"{variant}: {statistics.median(res[variant]['ms']):.1f} ms")
    create = {"ms": [], "rss_kib": [], "error": None}
    for i in range(a.runs + 1):
        ms, rc, rss = timed([s.binary, "create", f"new{i}"], s.env, s.out)
        if rc != 0:
            create["error"] = s.text(True).strip()
            log(f"offline create on the {a.snapshots}-snapshot record failed: {create['error']}")
            break
        if i:
            create["ms"].append(ms)
            create["rss_kib"].append(rss)
    res["create (offline)"] = create
    def check_all():
        with open(path) as f:
            record = json.load(f)
        names = [x["name"] for x in record["snapshots"] if not x["name"].startswith("new")]
        for variant, out in outputs.items():
            text = open(out, errors="replace").read()
            if not check(variant, text, names):
                return f"{variant} did not print the {a.snapshots} snapshots as expected: {text[:500]}"
        return None

    wrong = in_child(check_all)
    if wrong:
        die(wrong)
    json.dump({"runs": a.runs, "snapshots": a.snapshots, "branches": branches,
               "record_bytes": os.path.getsize(path), "active_chain": chain_len,
               "results": res}, open(a.out, "w"), indent=1)
    subprocess.run(["rm", "-rf", a.dir])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, runs in (("live", 10), ("gib", 3), ("offline", 5), ("revert", 10), ("fleet", 3),
                       ("big", 5)):
        p = sub.add_parser(name)
        p.add_argument("--snapctl", required=True)
        p.add_argument("--dir", required=True)
        p.add_argument("--runs", type=int, default=runs)
        p.add_argument("--warmup", type=int, default=1)
        p.add_argument("--out", required=True)
        if name == "live":
            p.add_argument("--strace-runs", type=int, default=5)
        if name == "gib":
            p.add_argument("--mib", type=int, default=1024)
        if name == "fleet":
            p.add_argument("--fleet", required=True)
            p.add_argument("--vms", type=int, default=32)
        if name == "big":
            p.add_argument("--snapshots", type=int, default=10000)
    a = ap.parse_args()
    a.dir = os.path.abspath(a.dir)
    {"live": cmd_live, "gib": cmd_gib, "offline": cmd_offline, "revert": cmd_revert,
     "fleet": cmd_fleet, "big": cmd_big}[a.cmd](a)


if __name__ == "__main__":
    main()
