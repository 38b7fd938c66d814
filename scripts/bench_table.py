#!/usr/bin/env python3
"""The report of scripts/bench: one table of every figure the sub-benchmarks
measured in this run, each next to its peer, with the ratio and the target.

    bench_table.py --target DIR --parts qmp,snapctl,peers,depth[,checkpoint]
                   [--elapsed SECONDS] [--strict]

Reads DIR/bench/machine.json, DIR/bench/qmp/*.json (scripts/bench's qmp part),
DIR/bench-snapctl/*.json, DIR/bench-peers/*.json, DIR/bench-depth/results.json
and DIR/bench-checkpoint/results.json, for the parts named only. Prints a
Markdown table (medians, min-max in parentheses) and under it the phase
breakdown of `snapctl delete`, then writes DIR/bench/results.json with every
row and every run. --strict: exit 1 when a target is missed.
"""

import argparse
import glob
import json
import os
import statistics
import sys

MIB = 1024


def load(path):
    return json.load(open(path)) if os.path.exists(path) else None


def med(v):
    v = list(v)
    return statistics.median(v) if v else float("nan")


def fmt_ms(v, unit="ms"):
    v = list(v)
    if not v:
        return "-"
    m = med(v)
    digits = 1 if m < 100 else 0
    if len(v) == 1:
        return f"{m:.{digits}f} {unit}"
    return f"{m:.{digits}f} ({min(v):.{digits}f}-{max(v):.{digits}f}) {unit}"


def rss(kib):
    kib = list(kib)
    return f", {max(kib) / MIB:.0f} MiB peak" if kib else ""


class Table:
    def __init__(self):
        self.rows = []

    def add(self, n, what, ours, peer="-", theirs="-", ratio=None, target="-", ok=None,
            data=None):
        self.rows.append({"n": n, "measure": what, "snapctl": ours, "peer": peer,
                          "peer_value": theirs, "ratio": ratio, "target": target, "pass": ok,
                          "data": data or {}})

    def print(self):
        head = ["#", "measure", "ours", "peer", "peer's", "ratio", "target", ""]
        lines = [head]
        for r in self.rows:
            ratio = "" if r["ratio"] is None else f"{r['ratio']:.2f}x"
            res = "" if r["pass"] is None else ("met" if r["pass"] else "MISSED")
            lines.append([str(r["n"]), r["measure"], r["snapctl"], r["peer"], r["peer_value"],
                          ratio, r["target"], res])
        widths = [max(len(l[i]) for l in lines) for i in range(len(head))]
        for k, l in enumerate(lines):
            print("| " + " | ".join(c.ljust(w) for c, w in zip(l, widths)) + " |")
            if k == 0:
                print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


def qmp_rows(t, d):
    files = lambda kind: [json.load(open(f)) for f in sorted(glob.glob(f"{d}/{kind}-*.json"))]
    rust, py = files("rust"), files("python")
    if not rust or not py:
        return
    deep = load(f"{d}/deep-chain.json")

    def vals(runs, w, k):
        return [r[w][k] for r in runs]

    p50 = vals(rust, "sequential", "p50_us")
    qcpu = [r["sequential"]["qemu_cpu_us_per_call"]["total"] for r in rust
            if r["sequential"].get("qemu_cpu_us_per_call")]
    ratio = med(p50) / med(qcpu) if qcpu else float("nan")
    t.add(1, "QMP round trip, qmp-client sequential: p50", fmt_ms(p50, "us"),
          "QEMU's CPU per call", fmt_ms(qcpu, "us"), ratio, "<= 1.2x", ratio <= 1.2)
    if all(r.get("floor") for r in rust):
        fp50 = vals(rust, "floor", "p50_us")
        t.add(1, "  (same p50)", fmt_ms(p50, "us"), "floor: blocking client, same bytes",
              fmt_ms(fp50, "us"), med(p50) / med(fp50))
    ours = vals(rust, "sequential", "per_second")
    theirs = vals(py, "sequential", "per_second")
    t.add(1, "qmp-client sequential, round trips/s", fmt_ms(ours, "/s"),
          f"qemu.qmp {py[0].get('client_version', '')}".strip(), fmt_ms(theirs, "/s"),
          med(ours) / med(theirs))
    cpu_o = vals(rust, "sequential", "client_cpu_us_per_call")
    cpu_t = vals(py, "sequential", "client_cpu_us_per_call")
    t.add(1, "  client CPU per sequential call", fmt_ms(cpu_o, "us"), "qemu.qmp", fmt_ms(cpu_t, "us"),
          med(cpu_o) / med(cpu_t))
    inf = vals(rust, "in_flight", "per_second")
    inf_py = vals(py, "in_flight", "per_second")
    r8 = med(inf) / med(ours)
    t.add(1, "qmp-client 8 in flight, round trips/s", fmt_ms(inf, "/s"), "qmp-client sequential",
          fmt_ms(ours, "/s"), r8, ">= 1.5x", r8 >= 1.5)
    t.add(1, "  (8 in flight)", fmt_ms(inf, "/s"), "qemu.qmp 8 in flight", fmt_ms(inf_py, "/s"),
          med(inf) / med(inf_py))
    if deep:
        t.add(1, f"{deep['layers']}-layer query-named-block-nodes "
                 f"({deep['reply_bytes'] / 1048576:.2f} MiB reply)",
              f"{deep['call_ms']['median']:.0f} ms, {deep['peak_rss_kib'] / MIB:.1f} MiB peak",
              "QEMU's CPU per call", f"{deep['qemu_cpu_ms_per_call']:.0f} ms",
              deep["call_ms"]["median"] / deep["qemu_cpu_ms_per_call"])


def snapctl_rows(t, d):
    create = load(f"{d}/create.json")
    lst = load(f"{d}/list.json")
    if create:
        by = {s["mode"]: s["runs"] for s in create["series"]}
        plain, logged = by.get("plain", []), by.get("log", [])
        over = [p["total_ms"] - l["transaction_ms"] for p, l in zip(plain, logged)]
        tx = [l["transaction_ms"] for l in logged]
        if over:
            t.add(2, "create, 2 disks (bench-snapctl): total - transaction",
                  fmt_ms(over), "QEMU's transaction", fmt_ms(tx), med(over) / med(tx),
                  "< 20 ms", med(over) < 20)
    if lst:
        for v, r in lst["variants"].items():
            t.add(8, f"{v}, {lst['snapshots']} snapshots linear (bench-snapctl)", fmt_ms(r["ms"]),
                  target="< 50 ms", ok=med(r["ms"]) < 50)


def peer_rows(t, d, phases_out):
    live = load(f"{d}/live.json")
    if live:
        r = live["results"]
        c, cp = [x[0] for x in r["create"]], r["create_peer"]
        t.add(2, "create, 1 disk (paused QEMU)", fmt_ms(c) + rss(x[1] for x in r["create"]),
              "qemu-img create + blockdev-add + transaction", fmt_ms(cp), med(c) / med(cp))
        dl, dp = [x[0] for x in r["delete"]], r["delete_peer"]
        ratio = med(dl) / med(dp)
        t.add(3, f"delete NEWEST, {live['data_mib']} MiB ({', '.join(live['merges'])})",
              fmt_ms(dl) + rss(x[1] for x in r["delete"]),
              "block-commit .. job-dismiss", fmt_ms(dp), ratio, "<= 1.3x", ratio <= 1.3)
        phases_out.extend(live.get("delete_phases") or [])
    gib = load(f"{d}/gib.json")
    if gib:
        r = gib["results"]
        ratio = med(r["snapctl"]) / med(r["qemu_img"])
        what = f"{gib['mib'] / 1024:g} GiB" if gib["mib"] >= 1024 else f"{gib['mib']} MiB"
        t.add(4, f"delete NEWEST live, {what} active commit ({', '.join(gib['merges'])})",
              fmt_ms(r["snapctl"]) + rss(r["snapctl_rss_kib"]),
              "qemu-img commit (offline)", fmt_ms(r["qemu_img"]), ratio, "<= 1.2x", ratio <= 1.2)
        t.add(4, "  (same)", fmt_ms(r["snapctl"]), "dd of the top layer, conv=fsync",
              fmt_ms(r["dd"]), med(r["snapctl"]) / med(r["dd"]))
    off = load(f"{d}/offline.json")
    if off:
        r = off["results"]
        t.add(5, f"delete middle offline ({', '.join(off['merges'])}: "
                 f"{' + '.join(off['tool_steps'] or [])}), 16 MiB",
              fmt_ms(r["snapctl"]) + rss(r["snapctl_rss_kib"]),
              "qemu-img commit + rebase -u", fmt_ms(r["qemu_img"]),
              med(r["snapctl"]) / med(r["qemu_img"]))
    rev = load(f"{d}/revert.json")
    if rev:
        r = rev["results"]
        t.add(6, "revert (live, paused QEMU)", fmt_ms(r["snapctl"]) + rss(r["snapctl_rss_kib"]),
              "kill + qemu-img + new QEMU to query-status", fmt_ms(r["restart"]),
              med(r["snapctl"]) / med(r["restart"]))
    fl = load(f"{d}/fleet.json")
    if fl:
        r, n = fl["results"], fl["vms"]
        t.add(7, f"fleet example (library), {n} VMs at once", fmt_ms(r["fleet_n"]),
              "1 VM", fmt_ms(r["fleet_1"]), med(r["fleet_n"]) / med(r["fleet_1"]))
        if r.get("lib_n"):
            ratio = med(r["lib_n"]) / med(r["lib_1"])
            t.add(7, f"{n} creates at once (library, fleet example)", fmt_ms(r["lib_n"]),
                  "one create, 1 VM", fmt_ms(r["lib_1"]), ratio, "< 8x", ratio < 8)
        ratio = med(r["cli_n"]) / med(r["cli_1"])
        t.add(7, f"{n} concurrent `snapctl create` (CLI, {n} VMs)",
              fmt_ms(r["cli_n"]) + rss(r["cli_n_rss_kib"]), "one create, 1 VM",
              fmt_ms(r["cli_1"]), ratio, "< 8x", ratio < 8)
    big = load(f"{d}/big.json")
    if big:
        n = big["snapshots"]
        for v, r in big["results"].items():
            if r.get("error"):
                t.add(8, f"{v}, {n} snapshots", "failed: " + r["error"].splitlines()[-1][:120])
                continue
            ms, kib = med(r["ms"]), max(r["rss_kib"])
            is_list = v.startswith("list")
            target = ("< 100 ms, < 20 MiB" if is_list else
                      "< 20 MiB" if v.startswith("show") else "-")
            ok = None
            if is_list:
                ok = ms < 100 and kib < 20 * MIB
            elif v.startswith("show"):
                ok = kib < 20 * MIB
            t.add(8, f"{v}, {n} snapshots (tree, {big['branches']} branches)",
                  fmt_ms(r["ms"]) + rss(r["rss_kib"]), target=target, ok=ok)


DEPTH_ORDER = ["create", "chain --json", "check", "delete (middle)", "revert (live)"]


def depth_rows(t, res, copy_mib_s):
    rows = {r["depth"]: r["commands"] for r in res["depths"]}
    if not rows:
        return
    deepest = max(rows)
    for c in DEPTH_ORDER:
        cells, kib = [], []
        for depth in sorted(rows):
            s = rows[depth].get(c)
            if s:
                cells.append(f"{depth}: {med(s['ms']):.0f}")
                kib += s["rss_kib"]
        if not cells:
            continue
        top = rows[deepest].get(c)
        ours = " / ".join(cells) + " ms" + rss(kib)
        peer, theirs, ratio, target, ok = "-", "-", None, "-", None
        if top:
            at = med(top["ms"])
            if c == "create" and rows[min(rows)].get(c):
                one = med(rows[min(rows)][c]["ms"])
                peer, theirs, ratio = f"depth {min(rows)}", f"{one:.0f} ms", at / one
                target, ok = f"<= 2x at {deepest}", ratio <= 2
            elif c in ("chain --json", "check"):
                target, ok = f"< 100 ms at {deepest}", at < 100
            else:
                # delete merges 64 KiB, revert copies nothing
                copy = (0.0625 / copy_mib_s * 1000) if c.startswith("delete") and copy_mib_s else 0
                target, ok = f"< {150 + copy:.0f} ms at {deepest}", at < 150 + copy
        t.add(9, f"{c}, chain depth", ours, peer, theirs, ratio, target, ok)


def checkpoint_rows(t, res):
    for r in res["scenarios"]:
        rev = r["revert_ms"]
        load_ = [f["load_ms"] for f in r["floor"]]
        limit = 1.2 * med(load_) + 30
        t.add(10, f"checkpoint revert, {r['name']}", fmt_ms(rev), "snapshot-load alone",
              fmt_ms(load_), med(rev) / med(load_), "<= 1.2x + 30 ms", med(rev) <= limit)
        plain = r.get("restart", {}).get("plain")
        if plain:
            tot = [x["quit_ms"] + x["start_ms"] + x["load_ms"] + x["cont_ms"] for x in plain]
            t.add(10, "  (same)", fmt_ms(rev), "restart with -incoming file:", fmt_ms(tot),
                  med(rev) / med(tot))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--target", required=True)
    ap.add_argument("--parts", required=True)
    ap.add_argument("--elapsed", type=float)
    ap.add_argument("--strict", action="store_true")
    a = ap.parse_args()
    parts = set(a.parts.replace(",", " ").split())
    tgt = a.target
    machine = load(f"{tgt}/bench/machine.json") or {}
    t, phases = Table(), []
    if "qmp" in parts:
        qmp_rows(t, f"{tgt}/bench/qmp")
    if "snapctl" in parts:
        snapctl_rows(t, f"{tgt}/bench-snapctl")
    if "peers" in parts:
        peer_rows(t, f"{tgt}/bench-peers", phases)
    copy_mib_s = None
    gib = load(f"{tgt}/bench-peers/gib.json") if "peers" in parts else None
    if gib:
        copy_mib_s = gib["mib"] / (med(gib["results"]["dd"]) / 1000)
    depth = load(f"{tgt}/bench-depth/results.json") if "depth" in parts else None
    if depth:
        depth_rows(t, depth, copy_mib_s)
    ckpt = load(f"{tgt}/bench-checkpoint/results.json") if "checkpoint" in parts else None
    if ckpt:
        checkpoint_rows(t, ckpt)
    t.rows.sort(key=lambda r: r["n"])

    print()
    print(f"machine: {machine.get('cpu', '?')}, {machine.get('cores', '?')} cores, "
          f"kernel {machine.get('kernel', '?')}, QEMU {machine.get('qemu', '?')} (TCG, paused "
          f"guests); load average at start {machine.get('load', '?')}; snapctl "
          f"{machine.get('git', '?')}")
    print()
    t.print()
    print()
    print("Medians, (min-max) of the runs; `ours` is snapctl (or qmp-client), timed from process "
          "start to reaping, peak RSS from wait4. Each snapctl run is paired with its peer's, "
          "the two alternating which goes first, so both see the same load; other work shared "
          "this machine's cores.")
    if phases:
        print()
        print(f"`snapctl delete` NEWEST, 16 MiB, under strace -f -T and SNAPCTL_LOG=debug "
              f"({len(phases)} runs, median ms per phase; total under strace "
              f"{med(p['total_ms'] for p in phases):.1f} ms, {phases[0]['fsyncs']} fsyncs):")
        from bench_peers import PHASES
        names = [c for c in PHASES if any(c in p["phases_ms"] for p in phases)]
        for c in names:
            v = [p["phases_ms"].get(c, 0.0) for p in phases]
            print(f"  {c:<52} {med(v):7.1f}  ({min(v):.1f}-{max(v):.1f})")
        per_cmd = {}
        for p in phases:
            for cmd, lat in p["qmp_ms"]:
                per_cmd.setdefault(cmd, []).append(lat)
        print("  QMP round trips snapctl logged (median ms): " +
              ", ".join(f"{c} {med(v):.1f}" for c, v in per_cmd.items()))
    if a.elapsed is not None:
        print()
        print(f"scripts/bench (BENCH_ONLY={','.join(sorted(parts))}) took {a.elapsed / 60:.1f} min")
    missed = [r for r in t.rows if r["pass"] is False]
    sources = {"qmp": {"qmp_client": [load(f) for f in sorted(glob.glob(f"{tgt}/bench/qmp/rust-*.json"))],
                       "qemu_qmp": [load(f) for f in sorted(glob.glob(f"{tgt}/bench/qmp/python-*.json"))],
                       "deep_chain": load(f"{tgt}/bench/qmp/deep-chain.json")},
               "snapctl": load(f"{tgt}/bench-snapctl/results.json"),
               "peers": {os.path.basename(f)[:-5]: load(f)
                         for f in sorted(glob.glob(f"{tgt}/bench-peers/*.json"))},
               "depth": depth, "checkpoint": ckpt}
    json.dump({"machine": machine, "parts": sorted(parts), "elapsed_s": a.elapsed,
               "rows": t.rows, "delete_phases": phases,
               "runs": {k: v for k, v in sources.items() if k in parts},
               "targets": [{"row": r["n"], "measure": r["measure"], "target": r["target"],
                            "pass": r["pass"]} for r in t.rows if r["pass"] is not None]},
              open(f"{tgt}/bench/results.json", "w"), indent=1)
    if missed and a.strict:
        sys.exit(1)


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    main()
