#!/usr/bin/env python
"""One master, N connected idle agents long-polling: the master's CPU, and push latency meanwhile.

    python bench/idle_agents.py [--agents 100,1000,10000] [--per-process 1000] [--wait 240]
                                [--heartbeat 10] [--idle-beats N] [--seconds 30] [--pushes 500] [--repo PATH]

For each N: two throwaway redis-servers (queue_index 0 and 1), one ``ppq master``
serving both, one real ``ppq worker`` (threads, concurrency 1) on queue_index 0,
and N fake agents (tests/fake_agents.py: processes of up to --per-process threads,
one connection each, the worker agent's calls) heartbeating and long-polling
(``report(..., want 1, wait)``) the empty queue_index 1. Once every agent is
connected and has settled, it measures:

- the master's CPU% (100 = one core) over --seconds (psutil cpu_times), and its
  thread count;
- --pushes single ``Client.push`` calls to queue_index 0, 10-20 ms apart, each of a
  task that records when it starts: push (call to return) p50/p99, and push-to-start
  p50/p99 (task start minus the push call's start, wall clocks of one machine).

``--repo`` runs the master, worker and fake agents from another checkout (to
measure the code before a change: ``git worktree add --detach /tmp/before main``).
Raise RLIMIT_NOFILE first for N = 10,000 (the script raises its own soft limit and
the children inherit it). Prints one JSON line per N and a table at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import psutil  # noqa: E402
import redis  # noqa: E402
from peers.base import free_port  # noqa: E402
from peers.noop_tasks import LAT_KEY  # noqa: E402
from run import RedisServer, cpu_seconds  # noqa: E402


def raise_nofile(wanted: int) -> None:
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def wait_until(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.2)


def run_one(n: int, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    repo = Path(args.repo).resolve()
    sys.path.insert(0, str(repo))
    from ppq import Client

    ra, rb = RedisServer(log_dir), RedisServer(log_dir)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPQ_")}
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR), str(repo)])
    env["BENCH_REDIS_URL"] = ra.url
    port = free_port()
    address = f"127.0.0.1:{port}"
    procs: list[subprocess.Popen[Any]] = []
    agents: list[subprocess.Popen[str]] = []
    result: dict[str, Any] = {"agents": n}
    try:
        with open(log_dir / f"master-{n}.log", "ab") as mlog:
            master = subprocess.Popen([sys.executable, "-m", "ppq", "--log-level", "WARNING", "master", "--port",
                                       str(port), "--redis-map", f"0={ra.url}", "--redis-map", f"1={rb.url}"],
                                      cwd=repo, env=env, stdout=mlog, stderr=subprocess.STDOUT)
        procs.append(master)
        client = Client([address], retry=1, timeout=30)
        wait_until(lambda: _answers(client), 30, "the master")
        with open(log_dir / f"worker-{n}.log", "ab") as wlog:
            procs.append(subprocess.Popen([sys.executable, "-m", "ppq", "--log-level", "WARNING", "worker",
                                           "--master-hosts", address, "--concurrency", "1", "--pool", "threads",
                                           "--allow", "peers.noop_tasks", "--port", "0"],
                                          cwd=repo, env=env, stdout=wlog, stderr=subprocess.STDOUT))
        wait_until(lambda: _workers(client, 0) >= 1, 30, "the real worker")
        fake = repo / "tests" / "fake_agents.py"
        left = n
        started = time.monotonic()
        while left:
            count = min(left, args.per_process)
            left -= count
            agents.append(subprocess.Popen([sys.executable, str(fake), f"PYRO:queue@{address}", str(count),
                                            "--queue-index", "1", "--wait", str(args.wait),
                                            "--heartbeat", str(args.heartbeat)]
                                           + (["--idle-beats", str(args.idle_beats)] if args.idle_beats else []),
                                           cwd=repo, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           text=True))
        for proc in agents:
            assert proc.stdout is not None
            ready = proc.stdout.readline().split()
            if ready[:1] != ["READY"] or ready[2:3] != ["0"]:
                raise RuntimeError(f"fake agents: {ready}")
        result["connect_s"] = round(time.monotonic() - started, 1)
        time.sleep(args.wait + 1)  # every agent is in its long-poll cycle
        mproc = psutil.Process(master.pid)
        c0, t0, times0 = cpu_seconds([mproc]), time.monotonic(), mproc.cpu_times()
        profile = os.environ.get("IDLE_AGENTS_PYSPY")  # a py-spy profile (GIL holder) of the window
        if profile:
            subprocess.run(["py-spy", "record", "-p", str(master.pid), "-d", str(int(args.seconds)), "-o",
                            f"{profile}-{n}.txt", "-f", "raw", "-r", "100", "--gil"],
                           capture_output=True)
        else:
            time.sleep(args.seconds)
        took = time.monotonic() - t0
        times1 = mproc.cpu_times()
        result["master_cpu_pct"] = round((cpu_seconds([mproc]) - c0) / took * 100, 1)
        result["master_sys_pct"] = round((times1.system - times0.system) / took * 100, 1)
        result["master_threads"] = mproc.num_threads()
        result["master_rss_mb"] = round(mproc.memory_info().rss / 2**20)
        try:
            result.update(measure_pushes(client, ra.url, args))
        except Exception as exc:  # noqa: BLE001 - a master that cannot serve is a result too
            result["push_error"] = f"{type(exc).__name__}: {exc}"[:200]
        client.close()
    finally:
        for proc in agents:
            if proc.stdin is not None:
                proc.stdin.close()
        summaries = []
        for proc in agents:
            assert proc.stdout is not None
            out = proc.stdout.read()  # the helper ends within its own wait + 25 s
            proc.wait(30)
            line = next((ln for ln in (out or "").splitlines() if ln.startswith("SUMMARY ")), None)
            if line:
                summaries.append(json.loads(line[len("SUMMARY "):]))
        if summaries:
            result["agent_errors"] = sum(s["errors"] for s in summaries)
            result["short_polls"] = sum(s["short_polls"] for s in summaries)
            result["polls"] = sum(s["polls"] for s in summaries)
            result["heartbeats"] = sum(s["heartbeats"] for s in summaries)
            result["slowest_heartbeat_s"] = max(s["slowest_heartbeat"] for s in summaries)
            result["error_samples"] = sorted({e[:80] for s in summaries for e in s["error_samples"]})[:4]
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        ra.stop()
        rb.stop()
    return result


def measure_pushes(client: Any, redis_url: str, args: argparse.Namespace) -> dict[str, Any]:
    """Push p50/p99 and push-to-start p50/p99 of --pushes single pushes, after a warm-up."""
    lat = redis.Redis.from_url(redis_url)
    # Warm up: the worker's first tasks (its executor starting) are not measured.
    for i in range(20):
        client.push("peers.noop_tasks.stamp", -1 - i)
        time.sleep(0.02)
    wait_until(lambda: lat.llen(LAT_KEY) >= 20, 60, "the warm-up tasks")
    time.sleep(0.5)
    lat.delete(LAT_KEY)
    pushed: dict[int, float] = {}
    calls: list[float] = []
    for i in range(args.pushes):
        wall, t = time.time(), time.perf_counter()
        client.push("peers.noop_tasks.stamp", i)
        calls.append((time.perf_counter() - t) * 1000)
        pushed[i] = wall
        time.sleep(random.uniform(0.010, 0.020))
    wait_until(lambda: lat.llen(LAT_KEY) >= args.pushes, 60, "the stamp tasks")
    starts = []
    for raw in lat.lrange(LAT_KEY, 0, -1):
        i, at = raw.decode().split()
        starts.append((float(at) - pushed[int(i)]) * 1000)
    if os.environ.get("IDLE_AGENTS_DEBUG"):
        print("starts:", [round(x, 1) for x in sorted(starts)[-30:]], file=sys.stderr)
    figures = {
        "push_p50_ms": round(statistics.median(calls), 2), "push_p99_ms": round(percentile(calls, 99), 2),
        "start_p50_ms": round(statistics.median(starts), 2), "start_p99_ms": round(percentile(starts, 99), 2),
    }
    lat.close()
    return figures


def _answers(client: Any) -> bool:
    try:
        client.server_info()
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False


def _workers(client: Any, qi: int) -> int:
    info = client.server_info()
    entry = info.get(qi) or info.get(str(qi)) or {}
    return len(entry.get("workers") or [])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", default="100,1000,10000", help="comma-separated agent counts")
    p.add_argument("--per-process", type=int, default=1000, help="fake agents (threads) per process")
    p.add_argument("--wait", type=float, default=240.0, help="the agents' long-poll wait (worker.max_sleep: 240)")
    p.add_argument("--heartbeat", type=float, default=10.0,
                   help="the agents' heartbeat interval (worker.heartbeat_interval: 10)")
    p.add_argument("--idle-beats", type=int, default=0,
                   help="heartbeat every this many intervals (default: as an idle agent does; 1: every one)")
    p.add_argument("--seconds", type=float, default=30.0, help="CPU measurement window")
    p.add_argument("--pushes", type=int, default=500, help="single pushes timed")
    p.add_argument("--repo", default=str(BENCH_DIR.parent), help="the checkout to run (default: this one)")
    args = p.parse_args()
    counts = [int(x) for x in args.agents.split(",") if x.strip()]
    raise_nofile(max(counts) + 4096)
    log_dir = Path(tempfile.mkdtemp(prefix="ppq-idle-agents-"))
    print(f"logs in {log_dir}", file=sys.stderr)
    results = []
    for n in counts:
        result = run_one(n, args, log_dir)
        print(json.dumps(result), flush=True)
        results.append(result)
    print(f"\n{'agents':>7} {'CPU%':>6} {'threads':>7} {'push p50':>9} {'push p99':>9} {'start p50':>10} "
          f"{'start p99':>10} {'short':>6} {'errors':>6}")
    for r in results:
        print(f"{r['agents']:>7} {r.get('master_cpu_pct', '-'):>6} {r.get('master_threads', '-'):>7} "
              f"{r.get('push_p50_ms', '-'):>9} {r.get('push_p99_ms', '-'):>9} {r.get('start_p50_ms', '-'):>10} "
              f"{r.get('start_p99_ms', '-'):>10} {r.get('short_polls', '-'):>6} {r.get('agent_errors', '-'):>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
