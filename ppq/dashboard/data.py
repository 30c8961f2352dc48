"""What the dashboard's pages show, read through :class:`ppq.Client` and the workers' control
objects (Pyro5 only: never Redis), and the sampler that keeps the last minutes of counters.

Nothing here imports a web library. Every read is bounded: counts come from ``server_info``
(a few O(1) commands per queue_index on the master), lists are read a page at a time
(``dead_tasks`` with an offset), workers' control objects are asked only for the workers of the
page shown (and for the chart, the first :data:`STATS_SAMPLED`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from ..client import Client
from ..config import Config
from ..errors import PPQError
from ..rpc import WORKER_OBJECT, PyroFunc

log = logging.getLogger("ppq.dashboard")

# Seconds a call to a master may take before the dashboard gives up on it (and tries another).
DEFAULT_CALL_TIMEOUT = 5.0
# Seconds a worker's control object may take to answer.
CONTROL_TIMEOUT = 2.0
# Seconds between samples while a page is open (a live page polls at least this often).
SAMPLE_WATCHED = 2.0
# Seconds between samples while no page has asked for a while (WATCHED_FOR).
SAMPLE_IDLE = 15.0
# Seconds after the last request during which the dashboard counts as watched.
WATCHED_FOR = 60.0
# Fewest seconds between two points of the charts.
MIN_POINT_GAP = 1.0
# Seconds of history the charts show.
HISTORY_SECONDS = 600.0
# Workers whose run times feed the latency chart (the first by id).
STATS_SAMPLED = 32
# Workers shown on one page of the workers page (their control objects are asked for each view).
WORKERS_PER_PAGE = 25
# Dead tasks shown on one page.
DEAD_PER_PAGE = 50
# Tasks read for one page of the tasks page (queued, delayed, running or dead).
TASKS_PER_PAGE = 50
# Most children of a workflow node read at once; most levels shown; most nodes shown in all.
WORKFLOW_CHILDREN = 200
WORKFLOW_DEPTH = 6
WORKFLOW_NODES = 1000


class Source:
    """The dashboard's view of the system: a client on the masters, control objects of workers, and
    a sampler thread feeding :meth:`latest` (the last ``server_info``) and :meth:`series` (the charts)."""

    def __init__(self, config: Config, masters: list[str] | None = None) -> None:
        self.config = config
        timeout = min(config.client.timeout, DEFAULT_CALL_TIMEOUT)
        self.client = Client(masters or None, config=config, timeout=timeout)
        self.masters = list(masters or config.client_masters())
        # What a worker's control object is asked with: as `ppq workers` does, never the client token.
        self.ask_control = bool(config.worker_token) or not config.client_token
        self.control_token = config.worker_token or config.auth_token
        self._controls: dict[str, PyroFunc] = {}
        self._controls_lock = threading.Lock()
        self._pool = ThreadPoolExecutor(8, thread_name_prefix="ppq-dashboard-control")
        self._lock = threading.Lock()
        self._latest: dict[str, Any] = {"ok": False, "error": "not read yet", "at": 0.0, "queues": {}}
        self._points: deque[dict[str, Any]] = deque()
        self._run_totals: dict[str, tuple[float, int]] = {}
        self._watched = time.monotonic()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- the sampler -----------------------------------------------------------------------

    def start(self) -> Source:
        self._thread = threading.Thread(target=self._run, name="ppq-dashboard-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(DEFAULT_CALL_TIMEOUT + 1)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def watched(self) -> None:
        """A page or a poll came in: sample often, and at once if the dashboard was idle."""
        idle = time.monotonic() - self._watched > WATCHED_FOR
        self._watched = time.monotonic()
        if idle:
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample(chart=True)
            watched = time.monotonic() - self._watched <= WATCHED_FOR
            self._wake.wait(SAMPLE_WATCHED if watched else SAMPLE_IDLE)
            self._wake.clear()

    def sample(self, chart: bool = False) -> dict[str, Any]:
        """Read ``server_info`` once: the latest state, and with ``chart`` (the sampler's own
        reads, evenly spaced) a point of the charts."""
        now = time.time()
        try:
            info = self.client.server_info()
        except PPQError as exc:
            error = f"{type(exc).__name__}: {exc}"
            with self._lock:
                if self._latest.get("ok") or self._latest.get("error") != error:  # once per outage
                    log.warning("dashboard: no master answers: %s", error)
                self._latest = {**self._latest, "ok": False, "error": error, "at": now}
                return self._latest
        queues = {int(qi): entry for qi, entry in info.items()}
        point: dict[str, Any] = {"t": now, "run_time": None}
        for name in ("pushed", "done", "errors", "queued"):
            point[name] = sum(int(e.get(name, 0) or 0) for e in queues.values() if e.get("ok", True))
        if chart and time.monotonic() - self._watched <= WATCHED_FOR:
            point["run_time"] = self._mean_run_time(queues)
        with self._lock:
            if not self._latest.get("ok") and self._latest.get("at"):
                log.info("dashboard: a master answers again")
            self._latest = {"ok": True, "error": "", "at": now, "queues": queues}
            if not chart or (self._points and now - self._points[-1]["t"] < MIN_POINT_GAP):
                return self._latest
            self._points.append(point)
            while self._points and self._points[0]["t"] < now - HISTORY_SECONDS:
                self._points.popleft()
            return self._latest

    def latest(self, fresh: float = SAMPLE_WATCHED) -> dict[str, Any]:
        """The last ``server_info`` read (``ok`` False with ``error`` when no master answered it),
        read again when older than ``fresh`` seconds."""
        with self._lock:
            latest = self._latest
        if time.time() - latest["at"] > fresh:
            latest = self.sample()
        return latest

    def series(self) -> list[dict[str, Any]]:
        """The charts' points: per interval between two samples, tasks pushed, done and failed per
        second, and the mean run time of the tasks the sampled workers ran (seconds; None unknown)."""
        with self._lock:
            points = list(self._points)
        out = []
        for before, after in zip(points, points[1:], strict=False):
            span = after["t"] - before["t"]
            if span <= 0:
                continue
            rates = {name: max(0, after[name] - before[name]) / span for name in ("pushed", "done", "errors")}
            out.append({"t": after["t"], **rates, "queued": after["queued"], "run_time": after["run_time"]})
        return out

    def _mean_run_time(self, queues: dict[int, dict[str, Any]]) -> float | None:
        """The mean run time of the tasks the first STATS_SAMPLED workers finished since the last
        sample, from the totals their control objects keep (the sampler thread's alone)."""
        workers = sorted((w for e in queues.values() for w in e.get("workers") or []), key=lambda w: str(w.get("id")))
        workers = [w for w in workers if w.get("control_uri")][:STATS_SAMPLED]
        if not workers or not self.ask_control:
            return None
        answers = list(self._pool.map(lambda w: (str(w["id"]), self._control(w, "get_worker_stats")), workers))
        spent, count = 0.0, 0
        totals: dict[str, tuple[float, int]] = {}
        for wid, stats in answers:
            if not isinstance(stats, dict):
                continue
            total = sum(float(s.get("total_time", 0) or 0) for s in stats.values() if isinstance(s, dict))
            n = sum(int(s.get("count", 0) or 0) for s in stats.values() if isinstance(s, dict))
            totals[wid] = (total, n)
            before = self._run_totals.get(wid)
            if before is not None and n >= before[1]:
                spent += total - before[0]
                count += n - before[1]
        self._run_totals = totals
        return spent / count if count else None

    # -- workers' control objects ---------------------------------------------------------

    def _control(self, worker: dict[str, Any], method: str) -> Any:
        """``method`` of a worker's control object; None if it does not answer (or may not be asked)."""
        uri = worker.get("control_uri")
        if not uri or not self.ask_control:
            return None
        with self._controls_lock:
            control = self._controls.get(uri)
            if control is None:
                if len(self._controls) > 4 * STATS_SAMPLED:
                    self._controls.clear()
                control = self._controls[uri] = PyroFunc(uri, token=self.control_token, timeout=CONTROL_TIMEOUT,
                                                         objid=WORKER_OBJECT, default_return=None)
        try:
            return control(method)
        except PPQError:
            return None

    # -- the pages' reads -----------------------------------------------------------------

    def workers(self, page: int, fresh: float = 0.0) -> dict[str, Any]:
        """One page of the live workers (by id), each with what its control object says: its
        functions (count, ok, failed, mean time) and the tasks it runs now, for how long."""
        latest = self.latest(fresh)
        listed = []
        for qi, entry in sorted(latest["queues"].items()):
            for w in entry.get("workers") or []:
                listed.append({**w, "queue_index": qi})
        listed.sort(key=lambda w: (str(w.get("id")), w["queue_index"]))
        pages = max(1, -(-len(listed) // WORKERS_PER_PAGE))
        page = min(max(page, 1), pages)
        shown = listed[(page - 1) * WORKERS_PER_PAGE:page * WORKERS_PER_PAGE]

        def ask(worker: dict[str, Any]) -> dict[str, Any]:
            stats = self._control(worker, "get_worker_stats")
            running = self._control(worker, "get_running_info") if stats is not None else None
            if not worker.get("control_uri"):
                why = "not heard from yet"
            elif not self.ask_control:
                why = "its figures need the worker token"
            elif stats is None:
                why = "its control object does not answer"
            else:
                why = ""
            functions = sorted(((name, s) for name, s in (stats or {}).items() if isinstance(s, dict)),
                               key=lambda kv: kv[0])
            tasks = (running or {}).get("tasks") or []
            return {"worker": worker, "functions": functions, "tasks": tasks, "why": why,
                    "waiting": (running or {}).get("waiting")}

        rows = list(self._pool.map(ask, shown))
        return {"ok": latest["ok"], "error": latest["error"], "rows": rows, "page": page, "pages": pages,
                "total": len(listed)}

    def task(self, task_id: str, queue_index: int) -> dict[str, Any] | None:
        return self.client.info(task_id, queue_index)

    def list_tasks(self, state: str, queue_index: int, offset: int, func: str | None) -> dict[str, Any]:
        """A page of the tasks in ``state`` (the master's ``list_tasks``: TASKS_PER_PAGE ids read
        from ``offset``, those of ``func`` kept)."""
        return dict(self.client.call("list_tasks", state, queue_index, TASKS_PER_PAGE, offset, func))

    def dead(self, queue_index: int, page: int) -> list[dict[str, Any]]:
        offset = (max(page, 1) - 1) * DEAD_PER_PAGE
        return list(self.client.call("dead_tasks", queue_index, DEAD_PER_PAGE, offset))

    def workflow(self, task_id: str, queue_index: int) -> dict[str, Any] | None:
        """A task and, when it is a workflow node (``kind``, ``children``), its tree: each node
        ``{"info": record, "children": [nodes], "more": children left out}``, WORKFLOW_DEPTH levels,
        WORKFLOW_CHILDREN children per node and WORKFLOW_NODES nodes at most."""
        root = self.client.info(task_id, queue_index)
        if root is None:
            return None
        budget = [WORKFLOW_NODES]

        def node(info: dict[str, Any], depth: int) -> dict[str, Any]:
            # The master lists a node's first children as {id, state} and counts the rest.
            listed = [str(c["id"]) for c in info.get("children") or [] if isinstance(c, dict) and "id" in c]
            ids = listed[:min(WORKFLOW_CHILDREN, budget[0])] if depth < WORKFLOW_DEPTH else []
            budget[0] -= len(ids)
            children: list[dict[str, Any]] = []
            if ids:
                infos = self.client.call("get_tasks_info", ids, queue_index)
                # A child that is a node itself: its own info lists its children.
                infos = [self.client.info(tid, queue_index) if i is not None and "kind" in i else i
                         for tid, i in zip(ids, infos, strict=False)]
                children = [node(i, depth + 1) if i is not None else
                            {"info": {"id": tid, "state": "unknown"}, "children": [], "more": 0}
                            for tid, i in zip(ids, infos, strict=False)]
            more = len(listed) - len(ids) + int(info.get("children_more") or 0)
            return {"info": info, "children": children, "more": more}

        return node(root, 0)

    def close(self) -> None:
        self.stop()
        self.client.close()
        with self._controls_lock:
            for control in self._controls.values():
                control.close()
            self._controls.clear()
