"""arq: ``ArqRedis.enqueue_job`` (awaited one by one); workers ``arq WorkerSettings``."""

from __future__ import annotations

import asyncio
import sys

from peers.base import Peer


class ArqPeer(Peer):
    name = "arq"
    enqueue_api = "await redis.enqueue_job('noop', i)"
    bulk_api = None

    def available(self) -> str | None:
        try:
            import arq  # noqa: F401
        except ImportError as exc:
            return f"arq not installed ({exc})"
        return None

    def version(self) -> str:
        import arq

        return str(arq.VERSION)

    def setup(self) -> None:
        from arq import create_pool

        from peers import arq_app

        self.loop = asyncio.new_event_loop()
        self.pool = self.loop.run_until_complete(create_pool(arq_app.REDIS))

    def stop(self) -> None:
        if getattr(self, "loop", None) is not None:
            self.loop.run_until_complete(self.pool.aclose())
            self.loop.close()
            self.loop = None

    def enqueue_one(self, n: int) -> None:
        async def push() -> None:
            enqueue = self.pool.enqueue_job
            for i in range(n):
                await enqueue("noop", i)

        self.loop.run_until_complete(push())

    def push_stamp(self, i: int) -> None:
        self.loop.run_until_complete(self.pool.enqueue_job("stamp", i))

    def worker_commands(self, k: int) -> list[list[str]]:
        return [[sys.executable, "-m", "arq", "peers.arq_app.WorkerSettings"] for _ in range(k)]

    def worker_config(self, k: int) -> str:
        return f"{k} x `arq WorkerSettings` (max_jobs=10, poll_delay=0.5 s: defaults)"
