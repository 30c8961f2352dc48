"""Prometheus metrics for masters and workers (``--metrics-port``).

A master exports what Redis knows of each queue_index, read at scrape time, so
every master reports the same queue-wide figures: event counters (pushed, leased, done, errors,
retried, dead, expired, cancelled, released), depths (queued, delayed, running,
dead) and live workers. A worker exports its own task counts and the duration
and wait time (from push to start) of its tasks, per function: the agent gives
the labels, a bounded set (tasks refused before they ran share one label, and
functions past the first few hundred another; see ppq.worker.MAX_FUNC_LABELS).

The endpoints bind ``metrics_host`` (127.0.0.1 unless set) and follow the
daemons' rule: with a token configured (``client_token``, else ``auth_token``)
every request must carry ``Authorization: Bearer <token>``; a non-loopback host
without a token is refused at start.
"""

from __future__ import annotations

import hmac
import logging
import socket
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Counter, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import ThreadingWSGIServer
from prometheus_client.registry import Collector

from . import rpc
from .errors import ConfigError

log = logging.getLogger("ppq.metrics")

# Seconds a metrics connection may stay silent before it is dropped.
REQUEST_TIMEOUT = 10.0

# Event name -> its counter in the queue's figures ("failed" counts tasks that went dead; "dead" is the
# dead list's current size, a depth).
_EVENTS = {"pushed": "pushed", "leased": "leased", "done": "done", "errors": "errors", "retried": "retried",
           "dead": "failed", "expired": "expired", "cancelled": "cancelled", "released": "released",
           "purged": "purged", "task_expired": "expired_tasks"}
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
        paused = GaugeMetricFamily("ppq_queue_paused", "1 while the queue_index is paused", labels=["queue_index"])
        schedules = GaugeMetricFamily("ppq_schedules", "Periodic schedules", labels=["queue_index", "state"])
        limited = GaugeMetricFamily("ppq_limit_tasks", "Tasks of a rate- or concurrency-limited function",
                                    labels=["queue_index", "function", "state"])
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
            paused.add_metric([label], 1.0 if entry.get("paused") else 0.0)
            sched = entry.get("schedules") or {}
            schedules.add_metric([label, "active"], float(sched.get("active", 0)))
            schedules.add_metric([label, "paused"], float(sched.get("count", 0) - sched.get("active", 0)))
            for limit in entry.get("limits") or []:
                for state in ("running", "waiting"):
                    limited.add_metric([label, str(limit["function"]), state], float(limit.get(state, 0)))
        yield from (events, depth, workers, up, paused, schedules, limited)


class _Handler(WSGIRequestHandler):
    """One request: its line and headers are bounded by http.server (64 KiB a line, 100
    headers), a silent connection is dropped after REQUEST_TIMEOUT, and nothing is logged
    to stderr."""

    timeout = REQUEST_TIMEOUT

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        log.debug("metrics request from %s: " + format, self.address_string(), *args)


def _bearer(app: Callable[..., Iterable[bytes]], token: str) -> Callable[..., Iterable[bytes]]:
    """``app`` behind a check of ``Authorization: Bearer <token>`` (compared in constant time)."""
    expected = f"Bearer {token}".encode()

    def guarded(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        # WSGI gives header values as latin-1 text: back to the bytes that were sent.
        offered = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", "replace")
        if hmac.compare_digest(offered, expected):
            return app(environ, start_response)
        start_response("401 Unauthorized", [("Content-Type", "text/plain; charset=utf-8"),
                                            ("WWW-Authenticate", 'Bearer realm="ppq metrics"')])
        return [b"401 Unauthorized: send the header Authorization: Bearer <client_token or auth_token>\n"]

    return guarded


def serve_metrics(host: str, port: int, registry: CollectorRegistry, token: str | None = None) -> WSGIServer:
    """Serve ``registry`` over HTTP on ``host``:``port`` in a daemon thread; with ``token``, only
    to requests carrying ``Authorization: Bearer <token>``, whatever the host."""
    family, *_, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

    class Server(ThreadingWSGIServer):
        address_family = family

        def handle_error(self, request: Any, client_address: Any) -> None:
            # A client that went silent or away: one DEBUG line, not a traceback on stderr.
            log.debug("metrics request from %s failed: %s", client_address, sys.exc_info()[1])

    app = make_wsgi_app(registry)
    server = make_server(str(address[0]), port, _bearer(app, token) if token else app, Server, handler_class=_Handler)
    threading.Thread(target=server.serve_forever, name="ppq-metrics", daemon=True).start()
    log.info("metrics on http://%s:%s/metrics%s", host, server.server_port,
             " (Authorization: Bearer <token> required)" if token else "")
    return server


def metrics_token(host: str, token: str | None, key: str) -> str | None:
    """The token a metrics endpoint requires: the configured one, whatever the host (as the
    daemons do). A non-loopback host without a token is refused (ConfigError naming ``key``):
    metrics tell about every task and worker."""
    if not rpc.is_loopback(host) and not token:
        raise ConfigError(f"{key} is {host!r}, which is reachable from other machines, and no token is set: "
                          f"set client_token or auth_token (scrapers then send Authorization: Bearer <token>), "
                          f"or serve metrics on 127.0.0.1")
    return token or None


def stop_metrics(server: WSGIServer) -> None:
    server.shutdown()
    server.server_close()


def serve_master_metrics(host: str, port: int, counts: Callable[[], Mapping[int, Mapping[str, Any]]],
                         token: str | None = None) -> WSGIServer:
    """A master's endpoint: ``host`` is ``master.metrics_host``, ``token`` the client's token."""
    required = metrics_token(host, token, "master.metrics_host")
    registry = CollectorRegistry()
    registry.register(QueueCollector(counts))
    return serve_metrics(host, port, registry, required)


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

    def serve(self, host: str, port: int, token: str | None = None) -> None:
        """Serve on ``worker.metrics_host`` (``host``); ``token`` is the client's token."""
        self.server = serve_metrics(host, port, self.registry, metrics_token(host, token, "worker.metrics_host"))

    def stop(self) -> None:
        if self.server is not None:
            stop_metrics(self.server)
            self.server = None
