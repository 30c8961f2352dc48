"""RQ: ``Queue.enqueue`` / ``Queue.enqueue_many``; workers ``rq worker`` (SimpleWorker)."""

from __future__ import annotations

import os

from peers.base import Peer, script

TASK = "peers.noop_tasks.noop"
STAMP = "peers.noop_tasks.stamp"
# rq's default Worker forks a work horse per job; SimpleWorker runs the job in the
# worker process (documented, and ~10x faster for tiny jobs). BENCH_RQ_WORKER
# switches back to "rq.worker.Worker" to compare.
WORKER_CLASS = os.environ.get("BENCH_RQ_WORKER", "rq.worker.SimpleWorker")


class RqPeer(Peer):
    name = "rq"
    enqueue_api = "Queue.enqueue(func, i)"
    bulk_api = "Queue.enqueue_many([Queue.prepare_data(...)]) (one pipeline)"

    def version(self) -> str:
        import rq

        return rq.__version__

    def setup(self) -> None:
        import redis
        from rq import Queue

        self.redis = redis.Redis.from_url(self.ctx.redis_url)
        self.queue = Queue("default", connection=self.redis)

    def enqueue_one(self, n: int) -> None:
        enqueue = self.queue.enqueue
        for i in range(n):
            enqueue(TASK, i)

    def enqueue_bulk(self, n: int) -> None:
        from rq import Queue

        self.queue.enqueue_many([Queue.prepare_data(TASK, (i,)) for i in range(n)])

    def push_stamp(self, i: int) -> None:
        self.queue.enqueue(STAMP, i)

    def worker_commands(self, k: int) -> list[list[str]]:
        return [[script("rq"), "worker", "--url", self.ctx.redis_url, "-w", WORKER_CLASS,
                 "--logging_level", "WARNING", "default"] for _ in range(k)]

    def worker_config(self, k: int) -> str:
        return f"{k} x `rq worker -w {WORKER_CLASS}`"
