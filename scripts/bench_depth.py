#!/usr/bin/env python3
"""The measuring side of scripts/bench-depth: times snapctl commands on one
disk whose chain is DEPTH layers deep, one process from start to exit.

    bench_depth.py run --snapctl BIN --depth N --dir DIR [--runs 5] --out FILE
    bench_depth.py report --dir DIR

`run` builds the chain and the VM in DIR (which must be short: it holds the
QMP socket), times the commands and writes FILE:

  chain    base.qcow2 (1 GiB, qemu-img) and DEPTH-1 overlays made with
           `qemu-img create -b` (absolute backing strings), 64 KiB of data
           written with qemu-io into the layers the `delete` runs merge;
  QEMU     paused, TCG, one `-blockdev` per layer linked by "backing", the top
           one on virtio-blk-pci `vda`, a QMP monitor for snapctl;
  record   `snapctl init` records the chain, then snapshot k (s0001 ...) is
           added as having frozen layer k-1 and made layer k active, the
           overlays owned by snapctl, as if snapctl had taken every snapshot;
           `snapctl check` must then find no drift, or the run stops.

Each command is timed RUNS times (the read-only ones after one warm-up run);
runs of the commands that change the chain are paired with an untimed command
that puts the depth back:

  chain --json    must list DEPTH layers
  check           must exit 0
  revert S        S is the current snapshot: the active overlay is replaced
                  by a new one on the same image, depth unchanged (live)
  create cI       then `delete cI` (untimed, an active commit of nothing)
  delete sK       a middle snapshot (K = DEPTH/2 + I: 64 KiB in the layers it
                  merges), after an untimed `create dI`

Every time is time.perf_counter_ns() around starting the process and reaping
it (os.wait4), so it includes fork and exec; the peak RSS is the reaped
process's ru_maxrss, which covers the children it waited for (qemu-img).
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import subprocess
import sys
import time

VM = "depth"
SIZE = 1 << 30


def die(msg):
    sys.exit(f"bench-depth: {msg}")


def sh(argv, **kw):
    p = subprocess.run(argv, capture_output=True, text=True, **kw)
    if p.returncode != 0:
        die(f"{' '.join(argv)} exited {p.returncode}: {p.stderr.strip()}")
    return p.stdout


def timed(argv, env, out_path):
    """Runs argv once; returns (elapsed ms, exit status, peak RSS KiB)."""
    with open(out_path, "wb") as out:
        t0 = time.perf_counter_ns()
        p = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL)
        _, status, rusage = os.wait4(p.pid, 0)
        elapsed = time.perf_counter_ns() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    return elapsed / 1e6, p.returncode, rusage.ru_maxrss


def layer_path(d, k):
    return os.path.join(d, "base.qcow2") if k == 0 else os.path.join(d, f"vda.s{k:04}.qcow2")


def snap(k):
    return f"s{k:04}"


def build_chain(d, depth, data_layers):
    sh(["qemu-img", "create", "-q", "-f", "qcow2", layer_path(d, 0), str(SIZE)])
    for k in range(1, depth):
        sh(["qemu-img", "create", "-q", "-f", "qcow2", "-b", layer_path(d, k - 1), "-F", "qcow2",
            layer_path(d, k)])
    for k in data_layers:
        if 0 <= k < depth:
            off = (k % 1024) * 65536
            sh(["qemu-io", "-f", "qcow2", "-c", f"write -q -P {k % 251 + 1} {off} 64k",
                layer_path(d, k)])


def start_qemu(d, depth):
    args = []
    for k in range(depth):
        node = {"driver": "qcow2", "node-name": f"n{k}",
                "file": {"driver": "file", "filename": layer_path(d, k)}}
        if k > 0:
            node["backing"] = f"n{k - 1}"
        args += ["-blockdev", json.dumps(node, separators=(",", ":"))]
    sock = os.path.join(d, "snapctl.sock")
    log = open(os.path.join(d, "qemu.log"), "wb")
    q = subprocess.Popen(
        ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-m", "64", "-nodefaults",
         "-display", "none", "-S", *args, "-device", f"virtio-blk-pci,id=vda,drive=n{depth - 1}",
         "-qmp", f"unix:{sock},server=on,wait=off"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=log)
    for _ in range(600):
        if os.path.exists(sock):
            s = socket.socket(socket.AF_UNIX)
            try:
                s.connect(sock)
                s.close()
                return q, sock
            except OSError:
                s.close()
        if q.poll() is not None:
            die(f"QEMU exited: {open(os.path.join(d, 'qemu.log')).read()}")
        time.sleep(0.1)
    q.kill()
    die(f"QEMU did not create its QMP socket {sock}")


def add_snapshots(state, d, depth):
    """Snapshot k froze layer k-1 and made layer k active; overlays owned."""
    path = os.path.join(state, f"{VM}.json")
    rec = json.load(open(path))
    t0 = datetime.datetime(2026, 11, 23, 12, 0, 0, tzinfo=datetime.timezone.utc)
    for k in range(1, depth):
        rec["layers"][layer_path(d, k)]["owned"] = True
        rec["snapshots"].append({
            "name": snap(k),
            "parent": snap(k - 1) if k > 1 else None,
            "created": (t0 + datetime.timedelta(minutes=k)).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "description": None,
            "kind": "disk-only",
            "disks": {"vda": {"image": layer_path(d, k - 1)}},
        })
    rec["current"] = snap(depth - 1) if depth > 1 else None
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(rec, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o600)
    os.rename(tmp, path)


def cmd_run(args):
    d, depth, runs = os.path.abspath(args.dir), args.depth, args.runs
    os.makedirs(d, exist_ok=True)
    state = os.path.join(d, "state")
    mid = depth // 2
    t_setup = time.perf_counter()
    build_chain(d, depth, range(mid - 2, mid + runs + 1))
    q, sock = start_qemu(d, depth)
    out_path = os.path.join(d, "out")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SNAPCTL_")}
        env.update(SNAPCTL_STATE_DIR=state, SNAPCTL_VM=VM, SNAPCTL_SOCKET=sock)
        sh([args.snapctl, "init"], env=env)
        add_snapshots(state, d, depth)
        setup_s = time.perf_counter() - t_setup

        def run(*argv, expect=0):
            ms, rc, rss = timed([args.snapctl, *argv], env, out_path)
            if rc != expect:
                die(f"snapctl {' '.join(argv)} at depth {depth} exited {rc}: "
                    f"{open(out_path, errors='replace').read().strip()}")
            return ms, rss

        results = {}

        def series(name, times):
            results[name] = {"ms": [t for t, _ in times], "rss_kib": [r for _, r in times]}

        run("check")  # no drift, or the synthesized record is wrong

        def chain_json():
            r = run("chain", "--json")
            doc = json.load(open(out_path))
            text = json.dumps(doc)
            if text.count(".qcow2") < depth or layer_path(d, 0) not in text:
                die(f"chain --json at depth {depth} does not list the {depth} layers: {text[:300]}")
            return r

        chain_json()
        series("chain --json", [chain_json() for _ in range(runs)])
        run("check")
        series("check", [run("check") for _ in range(runs)])
        current = snap(depth - 1)
        if depth > 1:
            series("revert (live)", [run("revert", current) for _ in range(runs)])
        times = []
        for i in range(runs):
            times.append(run("create", f"c{i}"))
            run("delete", f"c{i}")
        series("create", times)
        if depth > 2 and mid + runs < depth:
            times = []
            for i in range(runs):
                run("create", f"d{i}")
                times.append(run("delete", snap(mid + i)))
            series("delete (middle)", times)
        run("check")
    finally:
        q.kill()
        q.wait()
    json.dump({"depth": depth, "runs": runs, "setup_s": setup_s, "commands": results},
              open(args.out, "w"), indent=1)


ORDER = ["create", "chain --json", "check", "delete (middle)", "revert (live)"]


def cmd_report(args):
    meta = json.load(open(os.path.join(args.dir, "meta.json")))
    rows = []
    for name in sorted(os.listdir(args.dir)):
        if name.startswith("depth-") and name.endswith(".json"):
            rows.append(json.load(open(os.path.join(args.dir, name))))
    rows.sort(key=lambda r: r["depth"])
    print()
    print(f"snapctl {meta['snapctl_version']} ({meta['git']}), QEMU {meta['qemu']}, TCG, paused guest; "
          f"{meta['cpus']} CPUs; load average {meta['load_before']} before, {meta['load_after']} after")
    print(f"one qcow2 disk, -blockdev per layer; median (min-max) of {rows[0]['runs'] if rows else 0} runs "
          f"per cell, process start to exit, in ms; peak RSS median in MiB")
    print()
    head = f"{'depth':>5}  " + "  ".join(f"{c:>22}" for c in ORDER)
    print(head)
    for r in rows:
        cells = []
        for c in ORDER:
            s = r["commands"].get(c)
            if not s:
                cells.append(f"{'-':>22}")
                continue
            ms = s["ms"]
            rss = statistics.median(s["rss_kib"]) / 1024
            cells.append(f"{f'{statistics.median(ms):.0f} ({min(ms):.0f}-{max(ms):.0f}) {rss:.0f}M':>22}")
        print(f"{r['depth']:>5}  " + "  ".join(cells))
    json.dump({"meta": meta, "depths": rows}, open(os.path.join(args.dir, "results.json"), "w"),
              indent=1)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--snapctl", required=True)
    r.add_argument("--depth", type=int, required=True)
    r.add_argument("--dir", required=True)
    r.add_argument("--runs", type=int, default=5)
    r.add_argument("--out", required=True)
    p = sub.add_parser("report")
    p.add_argument("--dir", required=True)
    args = ap.parse_args()
    if args.cmd == "run" and args.depth < 1:
        die("--depth must be at least 1")
    {"run": cmd_run, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
