"""Celery app for the chord benchmark (bench/chord.py): the Redis broker and Redis result
backend on the same server. The result backend is what makes a chord work in Celery: each
member stores its result and counts itself in the chord's counter (the Redis backend joins
natively, without polling by chord_unlock); the last one sends the callback."""

import os

from celery import Celery

from peers import noop_tasks

url = os.environ["BENCH_REDIS_URL"]
app = Celery("bench_chord", broker=url, backend=url)
app.conf.update(
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=4,
)


@app.task(name="bench.chord_member")
def member(i):
    noop_tasks.noop(i)


@app.task(name="bench.chord_done")
def done(results):
    noop_tasks.chord_done(results)
