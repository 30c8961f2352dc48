"""arq functions and WorkerSettings for the arq runs (``arq peers.arq_app.WorkerSettings``).

arq tasks are coroutines, so they use the worker's own async Redis connection
(``ctx['redis']``) for the same one Redis call the other systems make.
"""

import os
import time

from arq.connections import RedisSettings

from peers.noop_tasks import DONE_KEY, LAT_KEY

REDIS = RedisSettings.from_dsn(os.environ["BENCH_REDIS_URL"])


async def noop(ctx, i):
    await ctx["redis"].incr(DONE_KEY)


async def stamp(ctx, i):
    started = time.time()
    await ctx["redis"].rpush(LAT_KEY, f"{i} {started!r}")


class WorkerSettings:
    """arq defaults otherwise: max_jobs=10, poll_delay=0.5 s, results kept 1 h."""

    functions = [noop, stamp]
    redis_settings = REDIS
