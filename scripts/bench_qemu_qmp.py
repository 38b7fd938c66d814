#!/usr/bin/env python3
"""The reference side of scripts/bench: query-status round trips per second
through Python's official QMP client, qemu.qmp (PyPI: qemu.qmp).

Two workloads on one QMPClient, each after a warm-up and for a fixed duration:
one task awaiting each call (sequential), then N asyncio tasks calling
execute() concurrently on the same client. qemu.qmp supports that: every
execute() gets its own id ("__qmp#NNNNN"), registers a reply queue under it
and the reader task routes each reply by id, so several calls are in flight
at once. It negotiates oob when QEMU offers it, like qmp-client.

    bench_qemu_qmp.py --socket PATH [--seconds 5] [--warmup 1] [--in-flight 8]
                      [--qemu-pid PID]

Prints one JSON object (the same shape as `bench --json`).
"""

import argparse
import asyncio
import collections
import json
import os
import sys
import time

from qemu.qmp import QMPClient

try:
    from importlib.metadata import version as _dist_version

    QEMU_QMP_VERSION = _dist_version("qemu.qmp")
except Exception:  # pragma: no cover - metadata missing
    QEMU_QMP_VERSION = "unknown"


def cpu_by_thread(pid):
    """CPU time used so far by each thread of `pid`, in ns, summed by thread name."""
    out = collections.Counter()
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tasks:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                ns = int(f.read().split()[0])
            with open(f"/proc/{pid}/task/{tid}/comm") as f:
                name = f.read().strip()
        except (OSError, ValueError, IndexError):
            continue
        out[name] += ns
    return out


async def run(qmp, tasks, seconds, qemu_pid=None):
    """`tasks` tasks issue query-status back to back until `seconds` have
    passed; every call started before then counts, and the elapsed time runs
    until the last one returned."""
    qemu_before = cpu_by_thread(qemu_pid) if qemu_pid else None
    client_before = cpu_by_thread("self")
    start = time.perf_counter()
    deadline = start + seconds

    async def worker():
        latencies = []
        before = time.perf_counter()
        while before < deadline:
            await qmp.execute("query-status")
            after = time.perf_counter()
            latencies.append(after - before)
            before = after
        return latencies

    results = await asyncio.gather(*(worker() for _ in range(tasks)))
    elapsed = time.perf_counter() - start
    client_cpu = cpu_by_thread("self") - client_before
    qemu_cpu = cpu_by_thread(qemu_pid) - qemu_before if qemu_pid else None
    latencies = sorted(x for r in results for x in r)
    calls = max(len(latencies), 1)

    def pct(p):
        if not latencies:
            return 0
        return round(latencies[round((len(latencies) - 1) * p)] * 1e6)

    return {
        "tasks": tasks,
        "calls": len(latencies),
        "seconds": elapsed,
        "per_second": len(latencies) / elapsed,
        "p50_us": pct(0.50),
        "p99_us": pct(0.99),
        "client_cpu_us_per_call": sum(client_cpu.values()) / calls / 1e3,
        "qemu_cpu_us_per_call": None
        if qemu_cpu is None
        else {
            "total": sum(qemu_cpu.values()) / calls / 1e3,
            "threads": {k: v / calls / 1e3 for k, v in sorted(qemu_cpu.items()) if v > 0},
        },
    }


async def measure(qmp, tasks, args):
    if args.warmup > 0:
        await run(qmp, tasks, args.warmup)
    return await run(qmp, tasks, args.seconds, args.qemu_pid)


async def main(args):
    qmp = QMPClient("bench")
    await qmp.connect(args.socket)
    try:
        greeting = qmp.greeting.QMP
        v = greeting.version["qemu"]
        qemu = f"{v['major']}.{v['minor']}.{v['micro']}"
        oob = "oob" in greeting.capabilities
        sequential = await measure(qmp, 1, args)
        in_flight = await measure(qmp, args.in_flight, args)
    finally:
        await qmp.disconnect()
    return {
        "client": "qemu.qmp",
        "client_version": QEMU_QMP_VERSION,
        "python": sys.version.split()[0],
        "qemu": qemu,
        "oob": oob,
        "sequential": sequential,
        "in_flight": in_flight,
        "in_flight_vs_sequential": in_flight["per_second"] / sequential["per_second"],
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--socket", required=True, help="QMP Unix socket")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--in-flight", type=int, default=8)
    parser.add_argument("--qemu-pid", type=int, help="report QEMU's CPU time per call")
    print(json.dumps(asyncio.run(main(parser.parse_args()))))
