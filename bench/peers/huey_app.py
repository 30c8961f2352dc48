"""Huey instance and tasks for the Huey runs (``huey_consumer peers.huey_app.huey``)."""

import os

from huey import RedisHuey

from peers import noop_tasks

# Defaults otherwise: blocking BRPOP reads, results stored (a None result is not).
huey = RedisHuey("bench", url=os.environ["BENCH_REDIS_URL"])


@huey.task()
def noop(i):
    noop_tasks.noop(i)


@huey.task()
def stamp(i):
    noop_tasks.stamp(i)
