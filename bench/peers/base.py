"""The interface every system module implements, and the process helpers they share.

A system module defines one ``Peer`` subclass. The driver (``bench/run.py``)
calls, for each system:

    peer = Cls(ctx)           ctx: BenchContext (redis URL, env, log dir)
    peer.available()          None, or why the system cannot run here
    peer.setup()              start long-lived parts (ppq: the master)
    peer.reset()              after every FLUSHALL: drop client-side caches
    peer.enqueue_one(n)       push n ``noop`` tasks, one library call per task
    peer.enqueue_bulk(n)      push n ``noop`` tasks through the bulk API
                              (``bulk_api`` is None where there is none)
    peer.push_stamp(i)        push one ``stamp`` task (latency samples)
    peer.start_workers(k)     spawn workers giving k parallel executors -> [Popen]
    peer.workers_ready(k)     optional extra readiness check (ppq: k agents registered)
    peer.server_pids()        pids of the system's own server processes (ppq master)
    peer.describe()           what was run, in words, for the report
    peer.stop()               stop everything setup() started

Workers are started in their own session, so ``stop_procs`` can signal a
worker's whole process group (its pool children too) by the pid recorded here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent.parent
# Seconds a worker gets to exit on SIGTERM before its process group is killed.
STOP_GRACE = 5.0


@dataclass
class BenchContext:
    redis_url: str
    log_dir: Path
    env: dict[str, str] = field(default_factory=dict)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def script(name: str) -> str:
    """A console script installed beside this interpreter (rq, huey_consumer...)."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    import shutil

    found = shutil.which(name)
    if not found:
        raise FileNotFoundError(f"console script {name!r} not found")
    return found


def bench_env(redis_url: str) -> dict[str, str]:
    """Environment of every worker subprocess: bench/ importable, no PPQ_* leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPQ_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(BENCH_DIR), env.get("PYTHONPATH", "")) if p)
    env["BENCH_REDIS_URL"] = redis_url
    env["PYTHONUNBUFFERED"] = "1"
    return env


_spawned: list[subprocess.Popen[Any]] = []


def spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[Any]:
    """Start ``cmd`` in its own session with output to ``log_path``; remembered for cleanup."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(cmd, env=env, cwd=str(BENCH_DIR), stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    _spawned.append(proc)
    return proc


def _signal_group(proc: subprocess.Popen[Any], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)  # the group whose leader is the pid we recorded
    except (ProcessLookupError, PermissionError):
        pass


def stop_procs(procs: list[subprocess.Popen[Any]], grace: float = STOP_GRACE) -> None:
    """SIGTERM each process group, wait up to ``grace`` seconds, then SIGKILL what is left."""
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            pass
    for proc in procs:
        # Also reaps pool children left behind by a leader that did exit.
        _signal_group(proc, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
        if proc in _spawned:
            _spawned.remove(proc)


def stop_all_spawned() -> None:
    """Last-resort cleanup of every process this module spawned (driver's finally)."""
    stop_procs(list(_spawned), grace=2.0)


class Peer:
    name = "?"
    # Name of the bulk-enqueue API, or None where the library has none.
    bulk_api: str | None = None
    # Human description of how enqueue_one pushes.
    enqueue_api = "?"

    def __init__(self, ctx: BenchContext) -> None:
        self.ctx = ctx
        self.env = bench_env(ctx.redis_url)
        self._nlog = 0

    # -- lifecycle -------------------------------------------------------------------
    def available(self) -> str | None:
        return None

    def version(self) -> str:
        return "?"

    def setup(self) -> None:
        pass

    def reset(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def server_pids(self) -> list[int]:
        return []

    # -- producer side ---------------------------------------------------------------
    def enqueue_one(self, n: int) -> None:
        raise NotImplementedError

    def enqueue_bulk(self, n: int) -> None:
        raise NotImplementedError

    def push_stamp(self, i: int) -> None:
        raise NotImplementedError

    # -- workers ---------------------------------------------------------------------
    def worker_commands(self, k: int) -> list[list[str]]:
        """Commands whose processes together give ``k`` parallel executors."""
        raise NotImplementedError

    def worker_config(self, k: int) -> str:
        """The worker configuration in words, for the report."""
        raise NotImplementedError

    def start_workers(self, k: int) -> list[subprocess.Popen[Any]]:
        procs = []
        for cmd in self.worker_commands(k):
            self._nlog += 1
            procs.append(spawn(cmd, self.env, self.ctx.log_dir / f"{self.name}-worker-{self._nlog}.log"))
        return procs

    def workers_ready(self, k: int) -> bool:
        return True

    def describe(self, k: int) -> dict[str, str]:
        return {
            "version": self.version(),
            "workers": self.worker_config(k),
            "enqueue": self.enqueue_api,
            "bulk": self.bulk_api or "n/a (no bulk API)",
        }
