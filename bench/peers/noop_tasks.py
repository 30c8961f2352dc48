"""Plain task functions shared by every system (RQ and ppq run them directly).

Each task does one Redis call so the driver can count completions the same way
for every system: ``noop`` INCRs ``bench:done``; ``stamp`` RPUSHes the wall-clock
time at which it started (push-to-start latency). The Redis URL comes from
``BENCH_REDIS_URL``, set by the driver for itself and every worker it spawns.
"""

from __future__ import annotations

import os
import time

import redis

DONE_KEY = "bench:done"
LAT_KEY = "bench:lat"

_conn: redis.Redis | None = None


def conn() -> redis.Redis:
    """One connection per process (redis-py reconnects by itself after a fork)."""
    global _conn
    if _conn is None:
        _conn = redis.Redis.from_url(os.environ["BENCH_REDIS_URL"])
    return _conn


def noop(i: int) -> None:
    conn().incr(DONE_KEY)


def stamp(i: int) -> None:
    started = time.time()
    conn().rpush(LAT_KEY, f"{i} {started!r}")


CHORD_KEY = "bench:chord"


def chord_done(results: list | None = None) -> None:
    """A chord's callback: records when it started and how many results it was given."""
    started = time.time()
    conn().set(CHORD_KEY, f"{started!r} {len(results) if results is not None else -1}")
