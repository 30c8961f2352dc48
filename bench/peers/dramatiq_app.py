"""Dramatiq broker and actors for the Dramatiq runs (``dramatiq peers.dramatiq_app``)."""

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker

from peers import noop_tasks

broker = RedisBroker(url=os.environ["BENCH_REDIS_URL"])
dramatiq.set_broker(broker)


@dramatiq.actor(max_retries=0)
def noop(i):
    noop_tasks.noop(i)


@dramatiq.actor(max_retries=0)
def stamp(i):
    noop_tasks.stamp(i)
