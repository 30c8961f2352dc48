"""Prometheus metrics for masters and workers (``--metrics-port``).

A master exports what Redis knows of each queue_index, read at scrape time, so
every master reports the same queue-wide figures: event counters (pushed, leased, done, errors,
retried, dead, expired, cancelled, released), depths (queued, delayed, running,
dead) and live workers. A worker exports its own task counts and the duration
and wait time (from push to start) of its tasks, per function.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("ppq.metrics")

# Event name -> its counter in the queue's figures ("failed" counts tasks that went dead; "dead" is the
# dead list's current size, a depth).
_EVENTS = {"pushed": "pushed", "leased": "leased", "done": "done", "errors": "errors", "retried": "retried",
           "dead": "failed", "expired": "expired", "cancelled": "cancelled", "released": "released"}
_DEPTHS = ("queued", "delayed", "running", "dead")
# Buckets of the duration and wait histograms, in seconds.
_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)


class QueueCollector(Collector):
    """Queue-wide figures, read from the stores when scraped."""

    def __init__(self, counts: Callable[[], Mapping[int, Mapping[str, Any]]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[Any]:
        events = CounterMetricFamily("ppq_tasks", "Task events per queue_index", labels=["queue_index", "event"])
        depth = GaugeMetricFamily("ppq_queue_depth", "Tasks per state", labels=["queue_index", "state"])
        workers = GaugeMetricFamily("ppq_workers", "Live worker agents", labels=["queue_index"])
        up = GaugeMetricFamily("ppq_redis_up", "1 if the queue's Redis answered", labels=["queue_index"])
        for qi, entry in sorted(self._counts().items()):
            label = str(qi)
            ok = bool(entry.get("ok", True))
            up.add_metric([label], 1.0 if ok else 0.0)
            if not ok:
                continue
            for event, name in _EVENTS.items():
                events.add_metric([label, event], float(entry.get(name, 0)))
            for state in _DEPTHS:
                depth.add_metric([label, state], float(entry.get(state, 0)))
            live = entry.get("workers_live")
            workers.add_metric([label], float(len(entry.get("workers", [])) if live is None else live))
        yield from (events, depth, workers, up)


def serve_master_metrics(host: str, port: int, counts: Callable[[], Mapping[int, Mapping[str, Any]]]) -> Any:
    registry = CollectorRegistry()
    registry.register(QueueCollector(counts))
    server, _ = start_http_server(port, addr=host, registry=registry)
    log.info("metrics on http://%s:%s/metrics", host, server.server_port)
    return server


class WorkerMetrics:
    """One worker agent's task figures."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tasks = Counter("ppq_worker_tasks", "Tasks run, by function and outcome", ["func", "outcome"],
                             registry=self.registry)
        self.duration = Histogram("ppq_task_duration_seconds", "Run time of tasks", ["func"], buckets=_BUCKETS,
                                  registry=self.registry)
        self.wait = Histogram("ppq_task_wait_seconds", "Time from push (or eta) to start", ["func"],
                              buckets=_BUCKETS, registry=self.registry)
        self.server: Any = None

    def observe(self, func: str, ok: bool, duration: float, wait: float | None) -> None:
        self.tasks.labels(func, "ok" if ok else "error").inc()
        self.duration.labels(func).observe(duration)
        if wait is not None and wait >= 0:
            self.wait.labels(func).observe(wait)

    def serve(self, host: str, port: int) -> None:
        self.server, _ = start_http_server(port, addr=host, registry=self.registry)
        log.info("metrics on http://%s:%s/metrics", host, self.server.server_port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
