"""Celery app and tasks for the Celery runs (``celery -A peers.celery_app worker``)."""

import os

from celery import Celery

from peers import noop_tasks

# Redis broker, no result backend (Celery's default), acks after receipt (default).
app = Celery("bench", broker=os.environ["BENCH_REDIS_URL"])
app.conf.update(
    task_ignore_result=True,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)


@app.task(name="bench.noop")
def noop(i):
    noop_tasks.noop(i)


@app.task(name="bench.stamp")
def stamp(i):
    noop_tasks.stamp(i)
