#!/usr/bin/env python
"""ppq's rates with a short queue and with a deep one, side by side.

    python bench/depth.py [--depths 1000,1000000] [--n 20000] [--rounds 3]

For each depth D (and each round), on a fresh redis-server and a ppq master:

- fill: push D no-op tasks with ``Client.push_many`` (the bulk rate with the queue
  growing from 0 to D), then read Redis ``used_memory`` per queued task;
- enqueue: push 2,000 more one call each (``Client.push``): tasks/s with D queued;
- bulk: push N more with ``push_many``: tasks/s with D queued, measured twice:
  "bulk after fill" right after the fill, and "bulk/s" once Redis has finished
  growing its key table. Redis doubles that table when the key count passes a
  power of two (2^20 = 1,048,576 sits just above a million tasks) and moves the
  keys over incrementally, a few seconds during which every command costs more;
  a queue that holds a million tasks is past that;
- drain: start 2 ``ppq worker --concurrency 1`` agents and time N completions
  after the first 1,000 (so worker start-up is left out), with the queue still
  holding at least D - N tasks when D is the deep one.

Prints the medians per depth and the ratio deep/shallow for each rate (1.00 =
no change; the target is within 20%).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from peers.base import bench_env, free_port, spawn, stop_all_spawned, stop_procs  # noqa: E402
from peers.noop_tasks import DONE_KEY  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from run import RedisServer  # noqa: E402

TASK = "peers.noop_tasks.noop"
# Completions before the drain clock starts: workers started and warmed up.
WARM = 1000
# Per-call pushes measured at each depth.
ONE_BY_ONE = 2000
# Seconds a drain may go without progress before it is declared stuck.
STALL = 60.0

out = Console(highlight=False)


def wait_count(rs: RedisServer, target: int) -> float:
    last, last_change = -1, time.monotonic()
    while True:
        done = int(rs.client.get(DONE_KEY) or 0)
        now = time.monotonic()
        if done >= target:
            return time.perf_counter()
        if done != last:
            last, last_change = done, now
        elif now - last_change > STALL:
            raise RuntimeError(f"drain stuck at {done}/{target}")
        time.sleep(0.002)


def rehashing(rs: RedisServer) -> bool | None:
    """True while Redis moves db 0's keys to a bigger table; None if DEBUG is refused."""
    try:
        stats = rs.client.execute_command("DEBUG", "HTSTATS", 0)
    except Exception:
        return None
    return b"rehashing target" in stats


def settle(rs: RedisServer, limit: float = 120.0) -> float:
    """Wait until Redis has finished growing its key table; return the seconds waited."""
    t = time.monotonic()
    while rehashing(rs) and time.monotonic() - t < limit:  # None (DEBUG refused) ends the wait
        time.sleep(0.2)
    return time.monotonic() - t


def one_round(depth: int, n: int, log_dir: Path) -> dict[str, float]:
    from ppq import Client

    rs = RedisServer(log_dir)
    env = bench_env(rs.url)
    port = free_port()
    master = spawn([sys.executable, "-m", "ppq", "--log-level", "WARNING", "master", "--port", str(port),
                    "--redis-map", f"0={rs.url}"], env, log_dir / "depth-master.log")
    workers = []
    try:
        client = Client([f"127.0.0.1:{port}"], retry=1, timeout=60)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.server_info()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        m: dict[str, float] = {}
        before = rs.used_memory()
        t = time.perf_counter()
        client.push_many((TASK, (i,)) for i in range(depth))
        m["fill/s"] = depth / (time.perf_counter() - t)
        m["bytes/task"] = (rs.used_memory() - before) / depth
        t = time.perf_counter()
        for i in range(ONE_BY_ONE):
            client.push(TASK, i)
        m["enqueue/s"] = ONE_BY_ONE / (time.perf_counter() - t)
        t = time.perf_counter()
        client.push_many((TASK, (i,)) for i in range(n))
        m["bulk after fill"] = n / (time.perf_counter() - t)
        m["settle s"] = settle(rs)
        t = time.perf_counter()
        client.push_many((TASK, (i,)) for i in range(n))
        m["bulk/s"] = n / (time.perf_counter() - t)
        cmd = [sys.executable, "-m", "ppq", "--log-level", "WARNING", "worker", "--master-hosts",
               f"127.0.0.1:{port}", "--concurrency", "1", "--allow", "peers.noop_tasks", "--port", "0"]
        workers = [spawn(cmd, env, log_dir / f"depth-worker-{k}.log") for k in range(2)]
        start = wait_count(rs, WARM)
        end = wait_count(rs, WARM + n)
        m["drain/s"] = n / (end - start)
        m["queued at end"] = float(client.server_info()[0]["queued"])
        client.close()
        return m
    finally:
        stop_procs(workers + [master])
        rs.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", default="1000,1000000", help="queue depths, comma-separated")
    p.add_argument("--n", type=int, default=20000, help="tasks per bulk and drain measurement")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    logging.getLogger("ppq").setLevel(logging.ERROR)  # no retry lines while a master starts
    depths = [int(d) for d in args.depths.split(",")]
    log_dir = BENCH_DIR / "results" / "logs"
    results: dict[int, list[dict[str, float]]] = {d: [] for d in depths}
    try:
        for r in range(args.rounds):
            for d in depths:
                Console(stderr=True).print(f"[dim]round {r + 1}: depth {d:,}[/dim]")
                results[d].append(one_round(d, args.n, log_dir))
    finally:
        stop_all_spawned()
    keys = ["fill/s", "enqueue/s", "bulk after fill", "settle s", "bulk/s", "drain/s", "bytes/task", "queued at end"]
    table = Table(title=f"ppq with a short and a deep queue: medians of {args.rounds} round(s), N={args.n:,}")
    table.add_column("metric")
    for d in depths:
        table.add_column(f"{d:,} queued", justify="right")
    table.add_column(f"{depths[-1]:,} / {depths[0]:,}", justify="right")
    for key in keys:
        meds = [statistics.median(m[key] for m in results[d]) for d in depths]
        ratio = f"{meds[-1] / meds[0]:.2f}" if (key.endswith("/s") or key.startswith("bulk")) and meds[0] else ""
        table.add_row(key, *[f"{v:,.1f}" if key == "settle s" else f"{v:,.0f}" for v in meds], ratio)
    out.print(table)
    out.print('"bulk after fill": right after the fill, while Redis may still be growing its key table; '
              '"bulk/s": once it has finished ("settle s" later; 0 where DEBUG HTSTATS is refused).')
    return 0


if __name__ == "__main__":
    sys.exit(main())
