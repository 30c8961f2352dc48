"""Light fake worker agents for the load test of tests/test_faults.py.

Run as a script: ``python fake_agents.py URI COUNT [--queue-index 1] [--wait 2]
[--heartbeat 5]``. It starts COUNT threads; each is one agent that talks to the master
as ppq's worker agent (ppq/worker.py) does, through the same caller: a
``ppq.rpc.PyroFunc`` (msgpack, the direct wire path, one connection per thread),
with the same calls and arguments:

- ``heartbeat(info, queue_index, [])`` at start, with the worker_info fields an agent
  sends, then as an idle agent sends them: every ``--idle-beats`` heartbeat intervals
  (``--heartbeat`` seconds; ``--idle-beats 1``: every interval, as a busy agent);
- the long-poll ``report(light_info, queue_index, [], want, wait)``, want 1;
- at the stop, ``release_worker(light_info, queue_index, False)`` (sent for every agent
  from the main thread, as an agent's own stop ends its long-poll in flight), then each
  agent's ``release_worker(light_info, queue_index, True)`` as it leaves.

Each thread holds its connection open for the whole run, so COUNT threads are COUNT
connections the master must serve at once.

Protocol with the parent (line based, on stdout/stdin):

- prints ``READY <connected> <failed>`` once every thread has made its first
  heartbeat (or failed to);
- stops when stdin reaches EOF (the parent closes it), ends every long-poll in flight,
  and prints ``SUMMARY <json>`` with per-call counts and errors.

A task leased here (there should be none: the queue_index is kept empty) is counted as
``stolen``. A long-poll that came back empty before its wait was over, while no stop
was asked, is counted in ``short_polls``: the master did not hold it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ppq.rpc import PyroFunc  # noqa: E402
from ppq.worker.heartbeat import IDLE_BEATS  # noqa: E402

# A long-poll that comes back empty sooner than this share of its wait was not held.
HELD = 0.9


class Stats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.connected = 0
        self.failed_connect = 0
        self.polls = 0
        self.short_polls = 0
        self.heartbeats = 0
        self.released = 0
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


def agent_id(index: int) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:fake{index}"


def light_info(index: int, args: argparse.Namespace) -> dict[str, object]:
    """What an agent's report and release_worker calls carry (Agent.light_info)."""
    return {"id": agent_id(index), "heartbeat_interval": args.heartbeat}


def full_info(index: int, args: argparse.Namespace, started: float) -> dict[str, object]:
    """What an agent's heartbeat carries (Agent.info): one thread executor, nothing running."""
    return {"id": agent_id(index), "host": socket.gethostname(), "pid": os.getpid(),
            "queue_index": args.queue_index, "concurrency": 1, "pool": "threads", "started": started,
            "running": [], "done": 0, "failed": 0, "control_uri": "", "heartbeat_interval": args.heartbeat}


def agent(index: int, args: argparse.Namespace, stats: Stats, started: threading.Barrier,
          stop: threading.Event) -> None:
    light = light_info(index, args)
    info = full_info(index, args, time.time())
    # The worker's caller: retry=1, a timeout of the long-poll's wait plus 15 s.
    call = PyroFunc(args.uri, retry=1, timeout=args.wait + 15)
    ok = False
    try:
        try:
            call("heartbeat", info, args.queue_index, [])
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
        every = args.heartbeat * args.idle_beats
        next_beat = time.monotonic() + every * random.random()
        # The first long-poll is of a random length, so the agents do not all come
        # back in the same instant (a fleet started together drifts apart the same way).
        wait = round(args.wait * random.uniform(0.05, 1.0), 3)
        while ok and not stop.is_set():
            try:
                t0 = time.monotonic()
                reply = call("report", light, args.queue_index, [], 1, wait)
                took = time.monotonic() - t0
                with stats.lock:
                    stats.polls += 1
                    stats.stolen += len(reply["tasks"])
                    if not reply["tasks"] and took < HELD * wait and not stop.is_set():
                        stats.short_polls += 1
                wait = args.wait
                if time.monotonic() >= next_beat:
                    t0 = time.monotonic()
                    call("heartbeat", info, args.queue_index, [])
                    took = time.monotonic() - t0
                    with stats.lock:
                        stats.heartbeats += 1
                        stats.slowest_heartbeat = max(stats.slowest_heartbeat, took)
                    next_beat = time.monotonic() + every
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                stats.error(f"call: {type(exc).__name__}: {exc}")
                break
        if ok:
            try:
                call("release_worker", light, args.queue_index, True)
            except Exception as exc:  # noqa: BLE001 - reported to the parent
                stats.error(f"release: {type(exc).__name__}: {exc}")
    finally:
        call.close()


def release_all(args: argparse.Namespace, stats: Stats) -> None:
    """End every agent's long-poll in flight, as a stopping agent ends its own."""
    call = PyroFunc(args.uri, retry=1, timeout=15)
    try:
        for index in range(args.count):
            ended = call("release_worker", light_info(index, args), args.queue_index, False)
            with stats.lock:
                stats.released += ended
    except Exception as exc:  # noqa: BLE001 - reported to the parent
        stats.error(f"release: {type(exc).__name__}: {exc}")
    finally:
        call.close()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("uri")
    parser.add_argument("count", type=int)
    parser.add_argument("--queue-index", type=int, default=1)
    parser.add_argument("--wait", type=float, default=2.0)
    parser.add_argument("--heartbeat", type=float, default=5.0)
    parser.add_argument("--idle-beats", type=int, default=IDLE_BEATS)
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
    release_all(args, stats)
    deadline = time.monotonic() + args.wait + 25
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    summary = {
        "connected": stats.connected, "failed_connect": stats.failed_connect, "polls": stats.polls,
        "short_polls": stats.short_polls, "released": stats.released, "heartbeats": stats.heartbeats,
        "stolen": stats.stolen, "errors": len(stats.errors),
        "error_samples": stats.errors[:5], "still_running": sum(t.is_alive() for t in threads),
        "slowest_heartbeat": round(stats.slowest_heartbeat, 3),
    }
    print("SUMMARY " + json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
