"""Soak test: a whole ppq stack under continuous load and random SIGKILLs, then a count.

    python bench/soak.py --seconds 60 [--workers 3] [--masters 2] [--rate 200]

Starts its own redis-server (AOF on, ``appendfsync everysec`` as the embedded
default), ``--masters`` ``ppq master`` processes on that Redis and ``--workers``
``ppq worker`` processes connected to all of them, all as subprocesses. Pusher
threads push ``soak.record(log, token)`` tasks at ``--rate`` tasks/s through
``ppq.Client`` (fail-over between masters); the task appends its token to an
execution log, then works ``--task-seconds``. Every ``--kill-every`` seconds on average a random worker (with
its executors) or master is killed with SIGKILL and replaced. Master 0 is never
killed, so its RSS tells whether a master's memory grows with the tasks it serves.

After ``--seconds`` the pushers stop, the kills stop, and the queue drains
(``--drain`` seconds at most). Then it prints:

- pushed: pushes acknowledged with an id; push failures (not acknowledged);
- done / dead: acknowledged tasks in those final states;
- lost: acknowledged tasks not finished after the drain (the at-least-once
  promise says 0);
- executions, duplicated executions (runs beyond the first; expected after
  kills: at-least-once, not exactly-once), tasks done but never run;
- the master's done counter (a task counted done twice would show here);
- RSS of master 0 at start (after a warm-up), at the end of the load and its
  peak under load (then once more after the drain, whose large
  get_tasks_info replies are not part of the steady state).

This file is also the task module the workers import (``soak.record``).
Exit status 1 if any acknowledged task was lost or never ran.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def record(path: str, token: str, seconds: float = 0.0) -> str:
    """The task: append ``token`` to the execution log (one line per run), then work ``seconds``."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{token}\n")
    if seconds:
        time.sleep(seconds)
    return token


# -- the stack ------------------------------------------------------------------------


class Stack:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        from ppq.embedded import RedisServer

        self.args = args
        self.workdir = workdir
        self.redis = RedisServer(str(workdir / "redis"), appendonly=True, appendfsync=args.appendfsync)
        self.masters: list[tuple[subprocess.Popen[bytes], int]] = []
        self.workers: list[subprocess.Popen[bytes]] = []
        self.count = 0
        self.kills = collections.Counter()

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PPQ_")}
        env["PYTHONPATH"] = os.pathsep.join([str(BENCH), str(REPO), env.get("PYTHONPATH", "")])
        env["PPQ_MASTER_REAPER_INTERVAL"] = "0.2"
        if self.args.result_ttl:
            env["PPQ_MASTER_RESULT_TTL"] = str(self.args.result_ttl)
        return env

    def _spawn(self, name: str, *argv: str) -> subprocess.Popen[bytes]:
        self.count += 1
        with open(self.workdir / f"{name}-{self.count}.log", "wb") as out:
            return subprocess.Popen([sys.executable, "-m", "ppq", *argv], stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env(), cwd=str(BENCH))

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{port}" for _, port in self.masters]

    def start_master(self, port: int) -> subprocess.Popen[bytes]:
        from ppq.rpc import PyroFunc

        proc = self._spawn("master", "master", "--port", str(port), "--redis-map", f"0={self.redis.url}",
                           "--lease-timeout", str(self.args.lease_timeout))
        ping = PyroFunc(f"127.0.0.1:{port}", timeout=2, default_return=None)
        deadline = time.monotonic() + 30
        try:
            while ping("ping") != "pong":
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"master on port {port} did not start; see {self.workdir}")
                time.sleep(0.05)
        finally:
            ping.close()
        return proc

    def start_worker(self) -> subprocess.Popen[bytes]:
        return self._spawn("worker", "worker", "--master-hosts", ",".join(self.addresses), "--port", "0",
                           "--concurrency", str(self.args.concurrency), "--allow", "soak", "--max-sleep", "1",
                           "--heartbeat-interval", "0.5")

    def start(self) -> None:
        from ppq.embedded import free_port

        self.redis.start()
        for _ in range(self.args.masters):
            port = free_port()
            self.masters.append((self.start_master(port), port))
        self.workers = [self.start_worker() for _ in range(self.args.workers)]

    def kill_random(self, rng: random.Random) -> str:
        """SIGKILL a random worker (with its executors) or master (never master 0); replace it."""
        if len(self.masters) > 1 and rng.random() < self.args.master_kill_share:
            i = rng.randrange(1, len(self.masters))
            proc, port = self.masters[i]
            kill_tree(proc)
            self.kills["master"] += 1
            self.masters[i] = (self.start_master(port), port)
            return f"master {i}"
        i = rng.randrange(len(self.workers))
        kill_tree(self.workers[i])
        self.kills["worker"] += 1
        self.workers[i] = self.start_worker()
        return f"worker {i}"

    def stop(self) -> None:
        for proc in self.workers + [p for p, _ in self.masters]:
            kill_tree(proc)
        self.redis.stop()


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and then the processes it started (by pid)."""
    import psutil

    if proc.poll() is not None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    for child in children:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=10)


# -- load ------------------------------------------------------------------------------


class Pushers:
    """Threads pushing batches of ``soak.record`` at a steady total rate."""

    def __init__(self, args: argparse.Namespace, addresses: list[str], log: Path) -> None:
        self.args = args
        self.addresses = addresses
        self.log = log
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.acked: dict[str, str] = {}  # id -> token
        self.failed_tasks = 0
        self.failed_calls: collections.Counter[str] = collections.Counter()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(args.pushers)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self, index: int) -> None:
        from ppq import Client

        client = Client(self.addresses, retry=3, timeout=10)
        per_thread = self.args.rate / self.args.pushers
        batch = self.args.batch
        n = 0
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            tokens = [f"p{index}-{n + k}" for k in range(batch)]
            n += batch
            try:
                ids = client.push_many([("soak.record", [str(self.log), tok, self.args.task_seconds])
                                        for tok in tokens], max_retry=5)
                with self.lock:
                    self.acked.update(zip(ids, tokens, strict=True))
            except Exception as exc:  # noqa: BLE001 - counted, the load goes on
                with self.lock:
                    self.failed_tasks += batch
                    self.failed_calls[type(exc).__name__] += 1
            next_at += batch / per_thread
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop_event.wait(delay)
            else:
                next_at = time.monotonic()
        client.close()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(30)


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def final_states(call: Any, ids: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start:start + 1000]
        for tid, info in zip(chunk, call("get_tasks_info", chunk, 0), strict=True):
            out[tid] = (info or {}).get("state", "missing")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="How long to push and kill.")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--masters", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2, help="Executors per worker.")
    parser.add_argument("--rate", type=float, default=200.0, help="Tasks pushed per second, in total.")
    parser.add_argument("--task-seconds", type=float, default=0.01,
                        help="How long each task works after logging its run (so kills catch tasks mid-run).")
    parser.add_argument("--pushers", type=int, default=2, help="Pushing threads.")
    parser.add_argument("--batch", type=int, default=10, help="Tasks per push_many call.")
    parser.add_argument("--kill-every", type=float, default=3.0, help="Mean seconds between kills (0: none).")
    parser.add_argument("--master-kill-share", type=float, default=0.3,
                        help="Share of kills that hit a master (other than master 0).")
    parser.add_argument("--lease-timeout", type=float, default=2.0)
    parser.add_argument("--appendfsync", choices=["always", "everysec", "no"], default="everysec")
    parser.add_argument("--result-ttl", type=int, default=0, help="master.result_ttl (0: the default).")
    parser.add_argument("--drain", type=float, default=120.0, help="Most seconds to wait for the queue to drain.")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="Keep the work directory (logs, AOF).")
    parser.add_argument("--verbose", action="store_true", help="Show the clients' fail-over warnings.")
    args = parser.parse_args()
    if not args.verbose:
        logging.getLogger("ppq").setLevel(logging.ERROR)  # fail-over warnings are expected here

    sys.path.insert(0, str(REPO))
    from ppq.rpc import PyroFunc

    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="ppq-soak-"))
    log = workdir / "executions.log"
    stack = Stack(args, workdir)
    started = time.monotonic()
    try:
        stack.start()
        print(f"stack up: redis {stack.redis.url} (AOF {args.appendfsync}), masters {', '.join(stack.addresses)}, "
              f"{args.workers} workers x {args.concurrency}; work dir {workdir}", flush=True)
        master0 = stack.masters[0][0].pid
        pushers = Pushers(args, stack.addresses, log)
        pushers.start()
        rss: list[tuple[float, float]] = []
        warmup = min(5.0, args.seconds / 6)
        t0 = time.monotonic()
        next_kill = t0 + rng.expovariate(1 / args.kill_every) if args.kill_every > 0 else float("inf")
        next_sample = t0
        while (now := time.monotonic()) < t0 + args.seconds:
            if now >= next_sample:
                rss.append((now - t0, rss_mib(master0)))
                next_sample += 1.0
            if now >= next_kill:
                what = stack.kill_random(rng)
                print(f"  {now - t0:6.1f}s  kill -9 {what}", flush=True)
                next_kill = time.monotonic() + rng.expovariate(1 / args.kill_every)
            time.sleep(max(0.0, min(next_sample, next_kill, t0 + args.seconds) - time.monotonic()))
        pushers.stop()
        push_seconds = time.monotonic() - t0
        rss_load_end = rss_mib(master0)

        call = PyroFunc(stack.addresses[0], timeout=30)
        ids = list(pushers.acked)
        drain_start = time.monotonic()
        states: dict[str, str] = {}
        while True:
            states = final_states(call, ids)
            if all(s in ("done", "dead") for s in states.values()) or time.monotonic() - drain_start > args.drain:
                break
            time.sleep(0.5)
        drain_seconds = time.monotonic() - drain_start
        counters = call("server_info")[0]
        rss_drained = rss_mib(master0)
        call.close()

        tally = collections.Counter(states.values())
        runs = collections.Counter(line for line in log.read_text().splitlines() if line) if log.exists() else {}
        tokens = set(pushers.acked.values())
        done_ids = [tid for tid, s in states.items() if s == "done"]
        never_ran = [tid for tid in done_ids if runs.get(pushers.acked[tid], 0) == 0]
        duplicated = sum(n - 1 for n in runs.values() if n > 1)
        tasks_repeated = sum(1 for n in runs.values() if n > 1)
        lost = len(ids) - tally["done"] - tally["dead"]
        after_warmup = [m for t, m in rss if t >= warmup] or [m for _, m in rss]
        rss_start = after_warmup[0]
        peak = max([m for _, m in rss] + [rss_load_end])

        print()
        print(f"soak: {push_seconds:.0f}s of load at {args.rate:g} tasks/s of {args.task_seconds:g}s each, "
              f"{args.masters} masters, "
              f"{args.workers} workers x {args.concurrency}, lease {args.lease_timeout:g}s; drained in "
              f"{drain_seconds:.1f}s")
        print(f"  kills (SIGKILL)          workers {stack.kills['worker']}, masters {stack.kills['master']}")
        print(f"  pushed (acknowledged)    {len(ids)}")
        print(f"  push failures            {pushers.failed_tasks} tasks in {sum(pushers.failed_calls.values())} "
              f"calls {dict(pushers.failed_calls) or ''}")
        print(f"  done                     {tally['done']}")
        print(f"  dead                     {tally['dead']}")
        others = {state: n for state, n in tally.items() if state not in ("done", "dead")}
        print(f"  lost                     {lost}  {others or ''}")
        print(f"  executions               {sum(runs.values())} of {len(tokens)} acknowledged tasks "
              f"(+{sum(n for t, n in runs.items() if t not in tokens)} of unacknowledged pushes)")
        print(f"  duplicated executions    {duplicated} (tasks run more than once: {tasks_repeated})")
        print(f"  done but never ran       {len(never_ran)}")
        print(f"  master counters          pushed {counters['pushed']}, done {counters['done']}, "
              f"expired leases {counters['expired']}, dead {counters['dead']}")
        print(f"  master 0 RSS             start {rss_start:.1f} MiB (at {warmup:.0f}s), end of load "
              f"{rss_load_end:.1f} MiB, peak under load {peak:.1f} MiB; after the drain's status queries "
              f"{rss_drained:.1f} MiB")
        step = max(1, len(rss) // 10)
        print("  master 0 RSS over time   " + ", ".join(f"{t:.0f}s {m:.1f}" for t, m in rss[::step]) + " MiB")
        print(f"  total time               {time.monotonic() - started:.0f}s")
        return 1 if lost or never_ran else 0
    finally:
        stack.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
