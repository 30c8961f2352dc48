#!/usr/bin/env python
"""A chord of N no-op members, then one callback: ppq against Celery and Dramatiq on one Redis.

    python bench/chord.py [--rounds 3] [--n 10000] [--only ppq,celery,dramatiq]

Run it with the peers installed (``bash bench/bench.sh`` makes bench/.venv; then
``bench/.venv/bin/python bench/chord.py``). One redis-server (persistence off) serves
every system. Per system: its workers start (2 executors, as in run.py: 2 ``ppq worker
--concurrency 1`` agents; 2 ``celery worker -P solo``; ``dramatiq --processes 2 --threads
1``) and warm up on a chord of 10; then each round pushes a chord of N members
(``noop(i)``, one INCR each) whose callback records the time it started and how many
results it was given. Measured from just before the push:

  push      until the library's push call returned (the whole chord handed over)
  callback  until the callback started (every member ran, the barrier counted them)

Each figure is the median over rounds. What runs:

  ppq       ``Client.push(chord(group(sig(noop, i) ...), sig(chord_done)))``: one
            ``push_workflow`` call; the master stores the chord in Lua scripts of at most
            500 nodes each (a chord of more is staged, then made live at once), each
            member's report counts it, the last one starts the callback
  celery    ``chord(member.s(i) ...)(done.s())`` with its Redis result backend (the Redis
            backend joins natively: each member INCRs the chord's counter as it stores its
            result, the last one sends the callback; no chord_unlock polling)
  dramatiq  ``group(member.message(i) ...).add_completion_callback(done.message()).run()``
            with the Results and GroupCallbacks middleware (a Redis barrier per group); its
            callback is not given the members' results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from peers.base import BenchContext, bench_env, spawn, stop_all_spawned, stop_procs  # noqa: E402
from peers.noop_tasks import CHORD_KEY, DONE_KEY  # noqa: E402
from rich.table import Table  # noqa: E402
from run import RESULTS_DIR, RedisServer, check_alive, out, progress  # noqa: E402

SYSTEMS = ("ppq", "celery", "dramatiq")
# Seconds one chord may take before the round counts as failed.
CHORD_TIMEOUT = 600.0
# Members of the warm-up chord each system runs first.
WARM_UP = 10


class System:
    """One system's chord: its workers and its push."""

    name = ""

    def __init__(self, ctx: BenchContext) -> None:
        self.ctx = ctx
        self.env = bench_env(ctx.redis_url)

    def worker_commands(self) -> list[list[str]]:
        raise NotImplementedError

    def push(self, n: int) -> None:
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError

    def version(self) -> str:
        raise NotImplementedError

    def start(self) -> list[Any]:
        return [spawn(cmd, self.env, self.ctx.log_dir / f"chord-{self.name}-{i}.log")
                for i, cmd in enumerate(self.worker_commands())]

    def stop(self) -> None:
        pass


class Ppq(System):
    name = "ppq"

    def __init__(self, ctx: BenchContext) -> None:
        super().__init__(ctx)
        from peers.ppq_peer import PpqPeer

        self.peer = PpqPeer(ctx)
        self.peer.setup()

    def worker_commands(self) -> list[list[str]]:
        return self.peer.worker_commands(2)

    def push(self, n: int) -> None:
        from ppq import chord, group, sig

        members = group([sig("peers.noop_tasks.noop", i) for i in range(n)])
        self.peer.client.push(chord(members, sig("peers.noop_tasks.chord_done")))

    def describe(self) -> str:
        return self.peer.worker_config(2)

    def version(self) -> str:
        return self.peer.version()

    def stop(self) -> None:
        self.peer.stop()


class Celery(System):
    name = "celery"

    def __init__(self, ctx: BenchContext) -> None:
        super().__init__(ctx)
        from peers import celery_chord_app

        self.app = celery_chord_app

    def worker_commands(self) -> list[list[str]]:
        base = [sys.executable, "-m", "celery", "-A", "peers.celery_chord_app", "worker", "--loglevel", "WARNING",
                "--without-gossip", "--without-mingle", "--without-heartbeat", "-P", "solo"]
        return [base + ["-n", f"chord{j}@%h"] for j in range(2)]

    def push(self, n: int) -> None:
        from celery import chord

        chord(self.app.member.s(i) for i in range(n))(self.app.done.s())

    def describe(self) -> str:
        return "2 x `celery worker -P solo`, Redis broker and result backend"

    def version(self) -> str:
        import celery

        return str(celery.__version__)


class Dramatiq(System):
    name = "dramatiq"

    def __init__(self, ctx: BenchContext) -> None:
        super().__init__(ctx)
        from peers import dramatiq_chord_app

        self.app = dramatiq_chord_app

    def worker_commands(self) -> list[list[str]]:
        return [[sys.executable, "-m", "dramatiq", "peers.dramatiq_chord_app", "--processes", "2", "--threads", "1"]]

    def push(self, n: int) -> None:
        from dramatiq import group

        members = group(self.app.member.message(i) for i in range(n))
        members.add_completion_callback(self.app.done.message())
        members.run()

    def describe(self) -> str:
        return "1 x `dramatiq --processes 2 --threads 1`, Results + GroupCallbacks (Redis)"

    def version(self) -> str:
        import dramatiq

        return str(dramatiq.__version__)


CLASSES: dict[str, type[System]] = {"ppq": Ppq, "celery": Celery, "dramatiq": Dramatiq}


def one_chord(system: System, rs: RedisServer, n: int, procs: list[Any]) -> dict[str, float]:
    """Push a chord of n and wait for its callback: seconds to the push's return and to the callback."""
    rs.client.delete(CHORD_KEY, DONE_KEY)
    t0 = time.time()
    system.push(n)
    pushed = time.time()
    deadline = time.monotonic() + CHORD_TIMEOUT
    while True:
        value = rs.client.get(CHORD_KEY)
        if value is not None:
            break
        check_alive(procs, f"{system.name} chord of {n}")
        if time.monotonic() > deadline:
            done = int(rs.client.get(DONE_KEY) or 0)
            raise RuntimeError(f"{system.name}: no callback after {CHORD_TIMEOUT:.0f}s ({done}/{n} members ran)")
        time.sleep(0.005)
    started, count = value.decode().split()
    ran = int(rs.client.get(DONE_KEY) or 0)
    if ran < n or int(count) not in (n, -1):
        raise RuntimeError(f"{system.name}: the callback ran after {ran}/{n} members, given {count} results")
    return {"push": pushed - t0, "callback": float(started) - t0, "results_given": int(count)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--only", default=",".join(SYSTEMS))
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "chord.json")
    args = parser.parse_args(argv)
    log_dir = RESULTS_DIR / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    rs = RedisServer(log_dir)
    os.environ["BENCH_REDIS_URL"] = rs.url
    progress(f"redis-server {rs.version} on {rs.url}; logs in {log_dir}")
    ctx = BenchContext(redis_url=rs.url, log_dir=log_dir)
    results: dict[str, Any] = {}
    try:
        for name in args.only.split(","):
            entry: dict[str, Any] = results.setdefault(name, {"rounds": [], "errors": []})
            rs.flush()
            system: System | None = None
            procs: list[Any] = []
            try:
                system = CLASSES[name](ctx)
                entry["version"], entry["workers"] = system.version(), system.describe()
                procs = system.start()
                progress(f"{name}: warm-up chord of {WARM_UP}")
                one_chord(system, rs, WARM_UP, procs)
                for rnd in range(1, args.rounds + 1):
                    progress(f"{name}: round {rnd}/{args.rounds}, a chord of {args.n}")
                    m = one_chord(system, rs, args.n, procs)
                    progress(f"{name}: push {m['push']:.2f}s, callback at {m['callback']:.2f}s")
                    entry["rounds"].append(m)
            except Exception as exc:
                entry["errors"].append(f"{type(exc).__name__}: {exc}")
                progress(f"[red]{name}: {type(exc).__name__}: {exc}[/red]")
            finally:
                stop_procs(procs)
                if system is not None:
                    system.stop()
    finally:
        stop_all_spawned()
        rs.stop()
    for entry in results.values():
        if entry["rounds"]:
            entry["median"] = {k: statistics.median(r[k] for r in entry["rounds"]) for k in ("push", "callback")}
    meta = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
            "redis_version": rs.version, "n": args.n, "rounds": args.rounds}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"systems": results, "meta": meta}, indent=2, sort_keys=True))
    table = Table(title=f"a chord of {args.n:,} no-op members, median of {args.rounds} rounds")
    for column in ("system", "version", "workers", "push (s)", "push to callback (s)", "rounds", "errors"):
        table.add_column(column)
    for name, entry in results.items():
        med = entry.get("median") or {}
        table.add_row(name, entry.get("version", "?"), entry.get("workers", "?"),
                      f"{med['push']:.2f}" if med else "-", f"{med['callback']:.2f}" if med else "-",
                      " / ".join(f"{r['callback']:.1f}" for r in entry["rounds"]), "; ".join(entry["errors"]))
    out.print(table)
    shutil.rmtree(Path(rs.dir), ignore_errors=True)
    return 1 if any(e["errors"] for e in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
