"""Dramatiq (Redis broker): ``actor.send``; workers ``dramatiq --processes k --threads T``."""

from __future__ import annotations

import os
import sys

from peers.base import Peer

# Threads per worker process: dramatiq's default 8 drains ~3x faster than 1 (more prefetch,
# Redis round trips overlap); BENCH_DRAMATIQ_THREADS=1 to compare.
THREADS = int(os.environ.get("BENCH_DRAMATIQ_THREADS", "8"))


class DramatiqPeer(Peer):
    name = "dramatiq"
    enqueue_api = "actor.send(i)"
    bulk_api = None  # group(...).run() sends one message at a time: no bulk path

    def version(self) -> str:
        import dramatiq

        return dramatiq.__version__

    def setup(self) -> None:
        from peers import dramatiq_app

        self.mod = dramatiq_app

    def enqueue_one(self, n: int) -> None:
        send = self.mod.noop.send
        for i in range(n):
            send(i)

    def push_stamp(self, i: int) -> None:
        self.mod.stamp.send(i)

    def worker_commands(self, k: int) -> list[list[str]]:
        return [[sys.executable, "-m", "dramatiq", "peers.dramatiq_app", "--processes", str(k),
                 "--threads", str(THREADS)]]

    def worker_config(self, k: int) -> str:
        return f"1 x `dramatiq --processes {k} --threads {THREADS}`"
