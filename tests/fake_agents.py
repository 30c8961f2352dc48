"""Light fake worker agents for the load test of tests/test_faults.py.

Run as a script: ``python fake_agents.py URI COUNT [--queue-index 1] [--wait 2]
[--heartbeat 5]``. It starts COUNT threads; each holds its own real Pyro5 proxy
(``ppq.rpc.make_proxy``) to the master, registers with a heartbeat, then loops:
long-poll ``get_task(wait=...)`` on ``queue_index`` and heartbeat every
``--heartbeat`` seconds. Each proxy is one TCP connection held open for the whole
run, so COUNT threads are COUNT connections the master must serve at once.

Protocol with the parent (line based, on stdout/stdin):

- prints ``READY <connected> <failed>`` once every thread has made its first
  heartbeat (or failed to);
- stops when stdin reaches EOF (the parent closes it), lets every long-poll in
  flight end, and prints ``SUMMARY <json>`` with per-call counts and errors.

Nothing is mocked: the calls are the ones a worker makes. A task leased here
(there should be none: the queue_index is kept empty) is counted as ``stolen``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ppq.rpc import make_proxy  # noqa: E402


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connected = 0
        self.failed_connect = 0
        self.polls = 0
        self.heartbeats = 0
        self.stolen = 0
        self.errors: list[str] = []
        self.slowest_heartbeat = 0.0

    def error(self, text: str) -> None:
        with self.lock:
            self.errors.append(text)


def raise_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def agent(index: int, args: argparse.Namespace, stats: Stats, started: threading.Barrier,
          stop: threading.Event) -> None:
    info = {"id": f"fake-{os.getpid()}-{index}", "heartbeat_interval": args.heartbeat, "fake": True}
    proxy = make_proxy(args.uri, timeout=args.wait + 20)
    ok = False
    try:
        try:
            proxy.heartbeat(info, args.queue_index, [])
            ok = True
            with stats.lock:
                stats.connected += 1
                stats.heartbeats += 1
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            with stats.lock:
                stats.failed_connect += 1
            stats.error(f"connect: {type(exc).__name__}: {exc}")
        try:
            started.wait()
        except threading.BrokenBarrierError:
            pass
        next_beat = time.monotonic() + args.heartbeat * random.random()
        # The first long-poll is of a random length, so the agents do not all come
        # back in the same instant (a fleet started together drifts apart the same way).
        wait = args.wait * random.uniform(0.05, 1.0)
        while ok and not stop.is_set():
            try:
                task = proxy.get_task(info, args.queue_index, round(wait, 3))
                wait = args.wait
                with stats.lock:
                    stats.polls += 1
                    if task is not None:
                        stats.stolen += 1
                if time.monotonic() >= next_beat:
                    t0 = time.monotonic()
                    proxy.heartbeat(info, args.queue_index, [])
                    took = time.monotonic() - t0
                    with stats.lock:
                        stats.heartbeats += 1
                        stats.slowest_heartbeat = max(stats.slowest_heartbeat, took)
                    next_beat = time.monotonic() + args.heartbeat
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                stats.error(f"call: {type(exc).__name__}: {exc}")
                break
    finally:
        try:
            proxy._pyroRelease()
        except Exception:  # noqa: BLE001
            pass


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("uri")
    parser.add_argument("count", type=int)
    parser.add_argument("--queue-index", type=int, default=1)
    parser.add_argument("--wait", type=float, default=2.0)
    parser.add_argument("--heartbeat", type=float, default=5.0)
    args = parser.parse_args()
    raise_nofile(args.count + 256)
    threading.stack_size(256 * 1024)
    stats = Stats()
    stop = threading.Event()
    started = threading.Barrier(args.count + 1)
    threads = [threading.Thread(target=agent, args=(i, args, stats, started, stop), daemon=True)
               for i in range(args.count)]
    for t in threads:
        t.start()
    try:
        started.wait(timeout=120)
    except threading.BrokenBarrierError:
        pass
    print(f"READY {stats.connected} {stats.failed_connect}", flush=True)
    sys.stdin.read()  # until the parent closes our stdin
    stop.set()
    deadline = time.monotonic() + args.wait + 25
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    summary = {
        "connected": stats.connected, "failed_connect": stats.failed_connect, "polls": stats.polls,
        "heartbeats": stats.heartbeats, "stolen": stats.stolen, "errors": len(stats.errors),
        "error_samples": stats.errors[:5], "still_running": sum(t.is_alive() for t in threads),
        "slowest_heartbeat": round(stats.slowest_heartbeat, 3),
    }
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
