"""Celery (Redis broker): ``task.delay`` / ``group(...).apply_async()``; workers ``celery worker``."""

from __future__ import annotations

import os
import sys

from peers.base import Peer

# "solo": k workers with -P solo; "prefork": one worker -P prefork -c k;
# "threads": one worker -P threads -c k.
MODE = os.environ.get("BENCH_CELERY_MODE", "solo")
# Commonly recommended for Redis-broker deployments; they only cut startup and idle chatter.
QUIET = ["--without-gossip", "--without-mingle", "--without-heartbeat"]


class CeleryPeer(Peer):
    name = "celery"
    enqueue_api = "task.delay(i)"
    bulk_api = "group(task.s(i) ...).apply_async()"

    def version(self) -> str:
        import celery

        return celery.__version__

    def setup(self) -> None:
        from peers import celery_app

        self.mod = celery_app

    def reset(self) -> None:
        # After FLUSHALL kombu's binding table is gone while its per-connection
        # "already declared" cache says otherwise: declare the queues again.
        app = self.mod.app
        with app.connection_for_write() as conn:
            for queue in app.amqp.queues.values():
                queue(conn.default_channel).declare()

    def enqueue_one(self, n: int) -> None:
        delay = self.mod.noop.delay
        for i in range(n):
            delay(i)

    def enqueue_bulk(self, n: int) -> None:
        from celery import group

        sig = self.mod.noop.s
        group(sig(i) for i in range(n)).apply_async()

    def push_stamp(self, i: int) -> None:
        self.mod.stamp.delay(i)

    def worker_commands(self, k: int) -> list[list[str]]:
        base = [sys.executable, "-m", "celery", "-A", "peers.celery_app", "worker", "--loglevel", "WARNING",
                *QUIET]
        if MODE == "solo":
            return [base + ["-P", "solo", "-n", f"w{j}@%h"] for j in range(k)]
        return [base + ["-P", MODE, "-c", str(k)]]

    def worker_config(self, k: int) -> str:
        if MODE == "solo":
            return f"{k} x `celery worker -P solo {' '.join(QUIET)}`"
        return f"1 x `celery worker -P {MODE} -c {k} {' '.join(QUIET)}`"
