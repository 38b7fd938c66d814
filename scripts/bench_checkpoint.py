#!/usr/bin/env python3
"""The measuring side of scripts/bench-checkpoint: times a checkpoint's round
trip (`snapctl create --memory`, `snapctl revert`) on the test guest and
compares the revert with what QEMU itself needs to load the same state.

    bench_checkpoint.py scenario --snapctl BIN --guest-env FILE --dir DIR
                                 --name NAME --memory MIB [--dirty-mib N]
                                 [--runs 5] [--warmup 1] --out FILE
    bench_checkpoint.py report --dir DIR [--strict]

`scenario` boots the test guest (`-m MIB`, TCG, records workload) in DIR,
optionally fills N MiB of its RAM with non-zero bytes (through the guest agent:
guest-exec of busybox in the guest, see dirty_ram), registers it with
`snapctl init` and then measures, every series after `--warmup` untimed runs:

  create   `snapctl create cK --memory`, process start to exit;
  revert   `snapctl revert c1`, process start to exit; run i of revert is
           followed by run i of the two floors, so they all see the same state;
  floor    on the same QEMU over a bare QMP socket: stop, blockdev-add of c1's
           memory container, snapshot-load, wait for `concluded` (query-jobs
           polled every 2 ms), job-dismiss, blockdev-del, cont; `load` is
           snapshot-load to concluded, `bare` the whole sequence from connect;
  restart  what a harness without snapctl pays for the same state in a new
           process: `quit` the old QEMU (until it exited), start a new one with
           the same command line plus `-incoming defer` on a fresh overlay (made
           with qemu-img create, timed as `overlay`) until its QMP socket
           answers, migrate-set-capabilities, migrate-incoming file:PATH, poll
           query-migrate (every 2 ms) until completed (`load`), cont.
           The stream is made once per capability set with `migrate` to file:
           from the guest stopped in c1's state (right after `snapctl revert c1
           --paused`); variants: plain, mapped-ram, mapped-ram + multifd.

One extra `create` and `revert` with SNAPCTL_LOG=debug, not counted, give the
round trip of each QMP command snapctl sent (qmp-client logs
`qmp{command="..." id=N}: ok latency_us=N`).

Every time is time.perf_counter_ns(); the JSON written to --out holds every
run, `report` prints the medians.
"""

import argparse
import base64
import glob
import json
import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import time

from benchlib import Qmp

ANSI = re.compile(r"\x1b\[[0-9;]*m")
QMP_SPAN = re.compile(r'qmp\{command="([^"]+)" id=(\d+)\}: (ok|failed) latency_us=(\d+)')
POLL = 0.002


def now():
    return time.perf_counter_ns()


def ms(ns):
    return ns / 1e6


def log(*args):
    print("bench-checkpoint:", *args, file=sys.stderr, flush=True)


class Qga:
    """The guest agent over its host-side socket (newline-delimited JSON)."""

    def __init__(self, path, timeout=30):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""
        sync = int(time.time()) & 0xFFFFFF
        self.sock.sendall(json.dumps({"execute": "guest-sync", "arguments": {"id": sync}}).encode())
        while self._read().get("return") != sync:
            pass

    def _read(self):
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("agent socket closed")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        line = line.strip(b"\xff").strip()
        return json.loads(line) if line else {}

    def cmd(self, name, args=None):
        msg = {"execute": name}
        if args is not None:
            msg["arguments"] = args
        self.sock.sendall(json.dumps(msg).encode())
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"guest agent {name}: {reply['error'].get('desc')}")
        return reply.get("return")

    def sh(self, script, timeout=300):
        pid = self.cmd("guest-exec", {"path": "/bin/sh", "arg": ["-c", script],
                                      "capture-output": True})["pid"]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.cmd("guest-exec-status", {"pid": pid})
            if st.get("exited"):
                return st
            time.sleep(0.2)
        raise TimeoutError(f"guest command did not finish in {timeout}s: {script}")


def wait_for(pred, timeout, what, proc=None, step=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"QEMU exited ({proc.returncode}) while waiting for {what}")
        time.sleep(step)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def read_env(path):
    env = {}
    for line in open(path):
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            env[k] = v.strip('"')
    return env


def opt_escape(path):
    return path.replace(",", ",,")


class Guest:
    """The test guest's QEMU: command line as integration/src/guest.rs builds it."""

    def __init__(self, genv, dirpath, memory):
        self.genv, self.dir, self.memory = genv, dirpath, memory
        self.console = os.path.join(dirpath, "console.log")
        self.snapctl_sock = os.path.join(dirpath, "snapctl.sock")
        self.admin_sock = os.path.join(dirpath, "admin.sock")
        self.qga_sock = os.path.join(dirpath, "qga.sock")
        self.floor_sock = os.path.join(dirpath, "floor.sock")
        self.proc = None
        self.boots = 0

    def argv(self, layers, incoming=False):
        """layers: [(node, file)] bottom first; the last is the device's root."""
        argv = ["qemu-system-x86_64", "-M", "q35", "-accel", "tcg", "-m", str(self.memory),
                "-nodefaults", "-display", "none", "-no-reboot",
                "-kernel", self.genv["SNAPGUEST_KERNEL"], "-initrd", self.genv["SNAPGUEST_INITRD"],
                "-append", self.genv["SNAPGUEST_CMDLINE"] + " snapguest.mkfs=1",
                "-chardev", f"file,id=console0,path={opt_escape(self.console)}",
                "-serial", "chardev:console0"]
        below = None
        for node, path in layers:
            layer = {"driver": "qcow2", "node-name": node,
                     "file": {"driver": "file", "filename": path}, "backing": below}
            if node != layers[-1][0]:
                layer["read-only"] = True
            argv += ["-blockdev", json.dumps(layer)]
            below = node
        argv += ["-device", f"virtio-blk-pci,id=vda,drive={layers[-1][0]}",
                 "-chardev", f"socket,id=qga0,path={opt_escape(self.qga_sock)},server=on,wait=off",
                 "-device", "virtio-serial-pci",
                 "-device", f"virtserialport,chardev=qga0,name={self.genv['SNAPGUEST_AGENT_PORT']}",
                 "-qmp", f"unix:{opt_escape(self.snapctl_sock)},server=on,wait=off",
                 "-qmp", f"unix:{opt_escape(self.admin_sock)},server=on,wait=off",
                 "-qmp", f"unix:{opt_escape(self.floor_sock)},server=on,wait=off"]
        if incoming:
            argv += ["-incoming", "defer"]
        return argv

    def start(self, layers, incoming=False):
        """Starts QEMU; returns once the admin monitor answers (a connected Qmp)."""
        for s in (self.snapctl_sock, self.admin_sock, self.qga_sock, self.floor_sock):
            if os.path.exists(s):
                os.unlink(s)
        self.boots += 1
        log_path = os.path.join(self.dir, f"qemu-{self.boots}.log")
        self.proc = subprocess.Popen(self.argv(layers, incoming), stdin=subprocess.DEVNULL,
                                     stdout=open(log_path, "wb"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"QEMU exited: {open(log_path).read()}")
            if os.path.exists(self.admin_sock):
                try:
                    return Qmp(self.admin_sock)
                except (ConnectionRefusedError, FileNotFoundError):
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError("QEMU did not open its monitor")
            time.sleep(0.001)

    def console_text(self):
        try:
            return open(self.console, errors="replace").read()
        except FileNotFoundError:
            return ""

    def records(self):
        nums = [int(m) for m in re.findall(r"SNAPGUEST RECORD (\d+)", self.console_text())]
        return max(nums, default=0)

    def stop(self, qmp=None):
        if self.proc is None:
            return
        try:
            (qmp or Qmp(self.admin_sock, timeout=5)).cmd("quit")
        except Exception:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def run_snapctl(snapctl, base, args, logged=False):
    env = dict(os.environ)
    env.pop("SNAPCTL_LOG", None)
    if logged:
        env["SNAPCTL_LOG"] = "debug"
        env["NO_COLOR"] = "1"
    t0 = now()
    p = subprocess.run([snapctl, *base, *args], env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    elapsed = now() - t0
    if p.returncode != 0:
        raise RuntimeError(f"snapctl {' '.join(args)} failed ({p.returncode}): "
                           f"{p.stderr.decode(errors='replace')[-2000:]}")
    out = {"ms": ms(elapsed), "stdout": p.stdout.decode(errors="replace")}
    if logged:
        text = ANSI.sub("", p.stderr.decode(errors="replace"))
        out["qmp"] = [(m.group(1), int(m.group(4)) / 1000, m.group(3) == "ok")
                      for m in map(QMP_SPAN.search, text.splitlines()) if m]
        out["log"] = text
    return out


def wait_job(qmp, job_id):
    while True:
        jobs = {j["id"]: j for j in qmp.cmd("query-jobs")}
        job = jobs.get(job_id)
        if job is None:
            raise RuntimeError(f"job {job_id} vanished")
        if job["status"] == "concluded":
            return job
        time.sleep(POLL)


def floor_load(admin_sock, container, tag, devices_extra=()):
    """The bare snapshot-load sequence on a fresh monitor connection."""
    t0 = now()
    q = Qmp(admin_sock)
    t_conn = now()
    q.cmd("stop")
    q.cmd("blockdev-add", {"driver": "qcow2", "node-name": "benchvms",
                           "file": {"driver": "file", "filename": container}})
    t_load0 = now()
    q.cmd("snapshot-load", {"job-id": "benchload", "tag": tag, "vmstate": "benchvms",
                            "devices": ["benchvms", *devices_extra]})
    job = wait_job(q, "benchload")
    t_load1 = now()
    if job.get("error"):
        raise RuntimeError(f"snapshot-load failed: {job['error']}")
    q.cmd("job-dismiss", {"id": "benchload"})
    q.cmd("blockdev-del", {"node-name": "benchvms"})
    q.cmd("cont")
    t_end = now()
    q.close()
    return {"load_ms": ms(t_load1 - t_load0), "bare_ms": ms(t_end - t0),
            "connect_ms": ms(t_conn - t0)}


def wait_migration(qmp):
    while True:
        st = qmp.cmd("query-migrate")
        status = st.get("status")
        if status == "completed":
            return st
        if status in ("failed", "cancelled"):
            raise RuntimeError(f"migration {status}: {st.get('error-desc')}")
        time.sleep(POLL)


VARIANTS = {
    "plain": [],
    "mapped-ram": ["mapped-ram"],
    "mapped-ram+multifd": ["mapped-ram", "multifd"],
}


def caps(names):
    return {"capabilities": [{"capability": c, "state": True} for c in names]}


def caps_off():
    return {"capabilities": [{"capability": c, "state": False} for c in ("mapped-ram", "multifd")]}


def dirty_ram(guest, mib):
    """Fills about mib MiB of the guest's RAM with non-zero bytes (zero pages
    would be skipped by both snapshot-save and migration), through qemu-ga's
    guest-exec of busybox in the guest: a tmpfs, an 8 MiB seed cut from the
    guest's own modules and binaries, a 64 MiB file of 8 seeds, then copies of
    that file (`cat`, ~150 MB/s under TCG here) until mib MiB are written.
    The guest's records workload keeps running. Returns (seconds, what the
    guest's `free -m` said afterwards)."""
    qga = Qga(guest.qga_sock, timeout=120)

    def sh(script):
        st = qga.sh(script, timeout=120)
        out = base64.b64decode(st.get("out-data", "")).decode(errors="replace")
        err = base64.b64decode(st.get("err-data", "")).decode(errors="replace")
        if st.get("exitcode") != 0:
            raise RuntimeError(f"dirtying the guest's RAM: `{script}` failed "
                               f"({st.get('exitcode')}): {out} {err}")
        return out

    t0 = time.monotonic()
    sh(f"mkdir -p /run/fill && mount -t tmpfs -o size={mib + 64}m fill /run/fill && "
       "cat /lib/modules/*/kernel/*/*/* /bin/* 2>/dev/null | head -c 8388608 >/run/fill/seed && "
       "cd /run/fill && cat seed seed seed seed seed seed seed seed >f0")
    written = 72
    i = 0
    while written + 64 <= mib:
        i += 1
        sh(f"cat /run/fill/f0 >/run/fill/f{i}")
        written += 64
    said = sh("free -m | head -2")
    return time.monotonic() - t0, written, said.strip()


def scenario(a):
    genv = read_env(a.guest_env)
    d = os.path.abspath(a.dir)
    os.makedirs(d, exist_ok=True)
    result = {"name": a.name, "memory_mib": a.memory, "dirty_mib": a.dirty_mib,
              "runs": a.runs, "warmup": a.warmup}
    guest = Guest(genv, d, a.memory)
    base_img = os.path.join(d, "base.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", base_img, "256M"], check=True)
    try:
        t0 = time.monotonic()
        admin = guest.start([("vda0", base_img)])
        wait_for(lambda: guest.records() >= 5, 180, "the guest's 5th record", guest.proc)
        result["boot_s"] = time.monotonic() - t0
        log(f"{a.name}: guest up in {result['boot_s']:.1f} s (record {guest.records()})")
        if a.dirty_mib:
            secs, written, said = dirty_ram(guest, a.dirty_mib)
            result["dirty_s"] = secs
            result["dirty_mib"] = written
            result["dirty_guest_output"] = said
            log(f"{a.name}: {written} MiB of guest RAM dirtied in {secs:.1f} s; guest: {said}")
        state = os.path.join(d, "state")
        base = ["--state-dir", state, "--vm", "bench", "--socket", guest.snapctl_sock]
        run_snapctl(a.snapctl, base, ["init"])

        # create: c0 .. are the warm-ups, then c1..cN timed, then one logged.
        creates, names = [], []
        total = a.warmup + a.runs
        for i in range(total):
            name = f"c{i - a.warmup + 1}" if i >= a.warmup else f"w{i}"
            r = run_snapctl(a.snapctl, base, ["create", name, "--memory"])
            names.append(name)
            if i >= a.warmup:
                creates.append(r["ms"])
            log(f"{a.name}: create {name} --memory {r['ms']:.0f} ms")
        logged_create = run_snapctl(a.snapctl, base, ["create", "clog", "--memory"], logged=True)
        result["create_ms"] = creates
        result["create_logged"] = {"ms": logged_create["ms"], "qmp": logged_create["qmp"]}
        show = json.loads(run_snapctl(a.snapctl, base + ["--json"], ["show", "c1"])["stdout"])
        container = show["memory"]["file"]
        result["container"] = {"file": container, "bytes": show["memory"].get("bytes")}
        snaps = subprocess.run(["qemu-img", "snapshot", "-U", "-l", container],
                               capture_output=True, text=True).stdout
        result["container_snapshots"] = snaps
        tag = next((l.split()[1] for l in snaps.splitlines()
                    if l.split() and l.split()[0].isdigit()), "c1")
        result["tag"] = tag

        # revert + floor, interleaved: revert i, then floor i.
        reverts, floors = [], []
        for i in range(total):
            r = run_snapctl(a.snapctl, base, ["revert", "c1"])
            f = floor_load(guest.floor_sock, container, tag)
            if i >= a.warmup:
                reverts.append(r["ms"])
                floors.append(f)
            log(f"{a.name}: revert c1 {r['ms']:.0f} ms; bare snapshot-load {f['load_ms']:.0f} ms "
                f"(whole bare sequence {f['bare_ms']:.0f} ms)")
        logged_revert = run_snapctl(a.snapctl, base, ["revert", "c1"], logged=True)
        result["revert_ms"] = reverts
        result["floor"] = floors
        result["revert_logged"] = {"ms": logged_revert["ms"], "qmp": logged_revert["qmp"]}
        with open(os.path.join(d, "revert-debug.log"), "w") as fh:
            fh.write(logged_revert["log"])
        with open(os.path.join(d, "create-debug.log"), "w") as fh:
            fh.write(logged_create["log"])
        result["records_before_restart"] = guest.records()

        # The migration streams of c1's state, one per capability set.
        admin.cmd("migrate-set-parameters", {"max-bandwidth": 1 << 40})
        streams = {}
        for variant, capnames in VARIANTS.items():
            run_snapctl(a.snapctl, base, ["revert", "c1", "--paused"])
            path = os.path.join(d, f"state.{variant}.mig")
            admin.cmd("migrate-set-capabilities", caps(capnames))
            t0 = now()
            admin.cmd("migrate", {"uri": f"file:{path}"})
            st = wait_migration(admin)
            streams[variant] = {"file": path, "bytes": os.path.getsize(path),
                                "allocated_bytes": os.stat(path).st_blocks * 512,
                                "save_ms": ms(now() - t0),
                                "ram": st.get("ram", {})}
            # Capabilities stay set and also apply to snapshot-save/-load,
            # which refuse mapped-ram: switch them off again.
            admin.cmd("migrate-set-capabilities", caps_off())
            admin.cmd("cont")
            log(f"{a.name}: {variant} stream {streams[variant]['bytes'] / 1048576:.0f} MiB "
                f"written in {streams[variant]['save_ms']:.0f} ms")
        result["streams"] = streams
        # The disks as of c1 for the restarted QEMUs: a fresh overlay on c1's
        # frozen image each time (its chain from qemu-img's view of it).
        frozen = show["disks"]["vda"]["image"]
        info = json.loads(subprocess.run(["qemu-img", "info", "-U", "--backing-chain",
                                          "--output=json", frozen],
                                         capture_output=True, text=True, check=True).stdout)
        chain = [(f"l{n}", img["filename"]) for n, img in enumerate(reversed(info))]
        result["restart_chain_depth"] = len(chain) + 1

        # restart: the variants take turns, one run each.
        restarts = {v: [] for v in VARIANTS}
        k = 0
        for i in range(total):
            for variant, capnames in VARIANTS.items():
                k += 1
                overlay = os.path.join(d, f"restart-{k}.qcow2")
                t0 = now()
                subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", frozen,
                                "-F", "qcow2", overlay], check=True)
                t_overlay = now()
                old = guest.proc
                try:
                    admin.cmd("quit")
                except (EOFError, ConnectionResetError):
                    pass
                old.wait(30)
                t_quit = now()
                admin = guest.start(chain + [("top", overlay)], incoming=True)
                t_started = now()
                if capnames:
                    admin.cmd("migrate-set-capabilities", caps(capnames))
                admin.cmd("migrate-incoming", {"uri": f"file:{streams[variant]['file']}"})
                wait_migration(admin)
                t_loaded = now()
                admin.cmd("cont")
                t_cont = now()
                run = {"overlay_ms": ms(t_overlay - t0), "quit_ms": ms(t_quit - t_overlay),
                       "start_ms": ms(t_started - t_quit), "load_ms": ms(t_loaded - t_started),
                       "cont_ms": ms(t_cont - t_loaded), "total_ms": ms(t_cont - t0)}
                if i >= a.warmup:
                    restarts[variant].append(run)
                log(f"{a.name}: restart {variant}: quit {run['quit_ms']:.0f} + start "
                    f"{run['start_ms']:.0f} + load {run['load_ms']:.0f} ms "
                    f"(overlay {run['overlay_ms']:.0f}, cont {run['cont_ms']:.0f})")
        result["restart"] = restarts
        # The restarted guest must go on writing records from c1's instant.
        mark = len(guest.console_text())
        wait_for(lambda: "SNAPGUEST RECORD" in guest.console_text()[mark:]
                 or "SNAPGUEST ERROR" in guest.console_text()[mark:], 60,
                 "a record from the restarted guest", guest.proc)
        tail = guest.console_text()[mark:]
        if "SNAPGUEST ERROR" in tail:
            raise RuntimeError(f"the restarted guest failed: {tail[-500:]}")
        result["restarted_guest_ok"] = True
        guest.stop(admin)
    finally:
        if guest.proc is not None:
            guest.proc.kill()
            guest.proc.wait()
    json.dump(result, open(a.out, "w"), indent=1)


def med(values):
    return statistics.median(values) if values else float("nan")


def report(a):
    results = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(a.dir, "scenario-*.json")))]
    meta = json.load(open(os.path.join(a.dir, "meta.json")))
    print()
    print(f"QEMU {meta['qemu']}, TCG, {meta['cpus']} CPUs, snapctl {meta['snapctl_version']} "
          f"({meta['git']}); median of {results[0]['runs']} runs after {results[0]['warmup']} "
          f"warm-up; load average {meta['load_before']} -> {meta['load_after']}")
    for r in results:
        fl = r["floor"]
        rows = [
            ("snapctl create c1 --memory", med(r["create_ms"]), r["create_ms"]),
            ("snapctl revert c1", med(r["revert_ms"]), r["revert_ms"]),
            ("  floor: snapshot-load alone", med([f["load_ms"] for f in fl]),
             [f["load_ms"] for f in fl]),
            ("  floor: whole bare QMP sequence", med([f["bare_ms"] for f in fl]),
             [f["bare_ms"] for f in fl]),
        ]
        for v, runs in r["restart"].items():
            tot = [x["quit_ms"] + x["start_ms"] + x["load_ms"] + x["cont_ms"] for x in runs]
            rows.append((f"restart ({v}): quit+start+load+cont", med(tot), tot))
            for part in ("quit", "start", "load"):
                vals = [x[f"{part}_ms"] for x in runs]
                rows.append((f"    {part}", med(vals), vals))
            r.setdefault("restart_total_ms", {})[v] = tot
        dirty = (f", {r['dirty_mib']} MiB dirtied by a guest command in {r['dirty_s']:.0f} s"
                 if r["dirty_mib"] else ", RAM as the workload leaves it")
        cont = r["container"]
        print()
        print(f"{r['name']}: {r['memory_mib']} MiB guest{dirty}; memory container "
              f"{(cont.get('bytes') or 0) / 1048576:.0f} MiB; streams "
              + ", ".join(f"{v} {s['allocated_bytes'] / 1048576:.0f} MiB"
                          for v, s in r["streams"].items()))
        print(f"  {'what':<46} {'median ms':>10}   runs")
        for what, m, runs in rows:
            print(f"  {what:<46} {m:>10.0f}   {'/'.join(f'{x:.0f}' for x in runs)}")
    print()
    targets = []
    for r in results:
        rev = med(r["revert_ms"])
        load = med([f["load_ms"] for f in r["floor"]])
        limit = 1.2 * load + 30
        targets.append((f"{r['name']}: revert <= 1.2 x snapshot-load + 30 ms",
                        f"{rev:.0f} ms vs {limit:.0f} ms", rev <= limit))
        best_v, best = min(((v, med(t)) for v, t in r["restart_total_ms"].items()),
                           key=lambda x: x[1])
        plain = med(r["restart_total_ms"]["plain"])
        targets.append((f"{r['name']}: revert <= restart (plain)", f"{rev:.0f} ms vs {plain:.0f} ms",
                        rev <= plain))
        targets.append((f"{r['name']}: revert <= restart (fastest: {best_v})",
                        f"{rev:.0f} ms vs {best:.0f} ms", rev <= best))
    failed = 0
    for what, got, ok in targets:
        failed += not ok
        print(f"target: {what:<58} {got:<22} {'PASS' if ok else 'MISS'}")
    print()
    print("QMP round trips snapctl logged (one SNAPCTL_LOG=debug run each, ms; sum vs wall):")
    for r in results:
        for which in ("create_logged", "revert_logged"):
            lg = r[which]
            spans = lg["qmp"]
            total = sum(s[1] for s in spans)
            big = sorted(spans, key=lambda s: -s[1])[:6]
            print(f"  {r['name']} {which.split('_')[0]}: wall {lg['ms']:.0f}, {len(spans)} commands "
                  f"sum {total:.0f}; largest: " + ", ".join(f"{c} {t:.1f}" for c, t, _ in big))
    summary = {"scenarios": results, "meta": meta,
               "targets": [{"target": w, "value": g, "pass": ok} for w, g, ok in targets]}
    json.dump(summary, open(os.path.join(a.dir, "results.json"), "w"), indent=1)
    if failed and a.strict:
        sys.exit(1)


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scenario")
    s.add_argument("--snapctl", required=True)
    s.add_argument("--guest-env", required=True)
    s.add_argument("--dir", required=True)
    s.add_argument("--name", required=True)
    s.add_argument("--memory", type=int, required=True)
    s.add_argument("--dirty-mib", type=int, default=0)
    s.add_argument("--runs", type=int, default=5)
    s.add_argument("--warmup", type=int, default=1)
    s.add_argument("--out", required=True)
    r = sub.add_parser("report")
    r.add_argument("--dir", required=True)
    r.add_argument("--strict", action="store_true")
    a = p.parse_args()
    {"scenario": scenario, "report": report}[a.cmd](a)


if __name__ == "__main__":
    main()
