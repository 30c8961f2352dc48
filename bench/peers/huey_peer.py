"""Huey: calling a ``@huey.task`` enqueues it; workers ``huey_consumer -k process``."""

from __future__ import annotations

import os
import sys

from peers.base import Peer

# "one": one consumer with k worker processes (huey's normal multi-process setup);
# "many": k consumers with one worker each.
MODE = os.environ.get("BENCH_HUEY_MODE", "one")


class HueyPeer(Peer):
    name = "huey"
    enqueue_api = "task(i) (decorated function call)"
    bulk_api = None

    def version(self) -> str:
        import huey

        return huey.__version__

    def setup(self) -> None:
        from peers import huey_app

        self.app = huey_app

    def enqueue_one(self, n: int) -> None:
        noop = self.app.noop
        for i in range(n):
            noop(i)

    def push_stamp(self, i: int) -> None:
        self.app.stamp(i)

    def worker_commands(self, k: int) -> list[list[str]]:
        base = [sys.executable, "-m", "huey.bin.huey_consumer", "peers.huey_app.huey", "-k", "process", "-q"]
        if MODE == "many":
            return [base + ["-w", "1"] for _ in range(k)]
        return [base + ["-w", str(k)]]

    def worker_config(self, k: int) -> str:
        if MODE == "many":
            return f"{k} x `huey_consumer -k process -w 1`"
        return f"1 x `huey_consumer -k process -w {k}`"
