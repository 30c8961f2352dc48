"""Dramatiq broker and actors for the chord benchmark (bench/chord.py): a group whose
completion callback runs once every member ended (the GroupCallbacks middleware counts
them in Redis; the Results middleware is what groups rely on)."""

import os

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from dramatiq.middleware import GroupCallbacks
from dramatiq.rate_limits.backends import RedisBackend as RateLimiterBackend
from dramatiq.results import Results
from dramatiq.results.backends import RedisBackend

from peers import noop_tasks

url = os.environ["BENCH_REDIS_URL"]
broker = RedisBroker(url=url)
broker.add_middleware(Results(backend=RedisBackend(url=url)))
broker.add_middleware(GroupCallbacks(RateLimiterBackend(url=url)))
dramatiq.set_broker(broker)


@dramatiq.actor(max_retries=0, store_results=True)
def member(i):
    noop_tasks.noop(i)


@dramatiq.actor(max_retries=0)
def done():
    noop_tasks.chord_done(None)
