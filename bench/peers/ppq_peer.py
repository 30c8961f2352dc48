"""ppq: ``Client.push`` / ``Client.push_many``; a master subprocess plus ``ppq worker`` agents."""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

from peers.base import Peer, free_port, spawn, stop_procs

TASK = "peers.noop_tasks.noop"
STAMP = "peers.noop_tasks.stamp"
# "agents": k agents with --concurrency 1; "one": one agent with --concurrency k.
MODE = os.environ.get("BENCH_PPQ_MODE", "agents")
# Executor pool of each agent: processes (ppq's default) or threads.
POOL = os.environ.get("BENCH_PPQ_POOL", "processes")
# Seconds the master gets to come up.
MASTER_START_TIMEOUT = 30.0


class PpqPeer(Peer):
    name = "ppq"
    enqueue_api = "Client.push('mod.func', i)"
    bulk_api = "Client.push_many([(target, args), ...]) (5000 per push_tasks call)"

    def available(self) -> str | None:
        try:
            import ppq  # noqa: F401
            from ppq import Client  # noqa: F401
        except ImportError as exc:
            return f"ppq is not importable ({exc})"
        import subprocess

        probe = subprocess.run([sys.executable, "-m", "ppq", "--help"], env=self.env, capture_output=True,
                               timeout=60)
        if probe.returncode != 0:
            return f"`python -m ppq --help` failed: {probe.stderr.decode(errors='replace')[-300:]}"
        return None

    def version(self) -> str:
        import ppq

        return str(getattr(ppq, "__version__", "?"))

    def setup(self) -> None:
        from ppq import Client

        self.port = free_port()
        cmd = [sys.executable, "-m", "ppq", "--log-level", "WARNING", "master", "--port", str(self.port),
               "--redis-map", f"0={self.ctx.redis_url}"]
        self.master = spawn(cmd, self.env, self.ctx.log_dir / "ppq-master.log")
        self.client = Client([f"PYRO:queue@127.0.0.1:{self.port}"], retry=1, timeout=30)
        deadline = time.monotonic() + MASTER_START_TIMEOUT
        rpc_log = logging.getLogger("ppq.rpc")
        level = rpc_log.level
        rpc_log.setLevel(logging.ERROR)  # no "trying the next master" line per probe while it starts
        try:
            while True:
                if self.master.poll() is not None:
                    raise RuntimeError(f"ppq master exited with {self.master.returncode}: see ppq-master.log")
                try:
                    self.client.server_info()
                    break
                except Exception:
                    if time.monotonic() > deadline:
                        raise RuntimeError("ppq master did not answer in time") from None
                    time.sleep(0.1)
        finally:
            rpc_log.setLevel(level)

    def stop(self) -> None:
        if getattr(self, "client", None) is not None:
            try:
                self.client.close()
            except Exception:
                pass
        if getattr(self, "master", None) is not None:
            stop_procs([self.master])
            self.master = None

    def server_pids(self) -> list[int]:
        return [self.master.pid] if getattr(self, "master", None) is not None else []

    def enqueue_one(self, n: int) -> None:
        push = self.client.push
        for i in range(n):
            push(TASK, i)

    def enqueue_bulk(self, n: int) -> None:
        self.client.push_many((TASK, (i,)) for i in range(n))

    def push_stamp(self, i: int) -> None:
        self.client.push(STAMP, i)

    def _worker_cmd(self, concurrency: int) -> list[str]:
        return [sys.executable, "-m", "ppq", "--log-level", "WARNING", "worker",
                "--master-hosts", f"127.0.0.1:{self.port}", "--concurrency", str(concurrency),
                "--pool", POOL, "--allow", "peers.noop_tasks", "--port", "0"]

    def worker_commands(self, k: int) -> list[list[str]]:
        if MODE == "one":
            return [self._worker_cmd(k)]
        return [self._worker_cmd(1) for _ in range(k)]

    def worker_config(self, k: int) -> str:
        if MODE == "one":
            return f"1 x `ppq worker --concurrency {k} --pool {POOL}`"
        return f"{k} x `ppq worker --concurrency 1 --pool {POOL}`"

    def workers_ready(self, k: int) -> bool:
        agents = 1 if MODE == "one" else k
        info: dict[Any, Any] = self.client.server_info()
        entry = info.get(0) or info.get("0") or {}
        return len(entry.get("workers") or []) >= agents
