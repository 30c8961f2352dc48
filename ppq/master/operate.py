"""The operator's side of the exposed ``queue`` object: cancel, the dead list, purging and
pausing a queue, pausing a worker, and what ``server_info`` reports (counts, workers, what
each Redis holds, the modules waiting for a worker that allows them).

:class:`Operations` is a base class of :class:`~ppq.master.exposed.Master`, which owns the
state declared here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import rpc
from ..config import Config, LimitsConfig
from ..errors import InvalidTaskError, StorageError
from ..store import LISTED_STATES, PURGE_BATCH, Store
from ..task import check_task_id, show
from .checks import check_ids, check_worker_id, required_number, spec_allows
from .waiters import Waker

log = logging.getLogger("ppq.master")

# Seconds the allow lists of the live workers of a queue_index are reused for (get_task_info,
# server_info): reading them reads every worker's info.
ALLOWS_TTL = 2.0


def _allow_spec(worker: Mapping[str, Any]) -> str:
    """A listed worker's allow spec (checks.allow_of) from the list its info holds; any module
    when it holds none (an older worker, a plain client)."""
    names = worker.get("allow")
    if not isinstance(names, list):
        return "*"
    return "*" if "*" in names else ",".join(n for n in names if isinstance(n, str))


def unrouted(modules: Mapping[str, int], specs: list[str]) -> dict[str, int]:
    """The entries of ``modules`` that no worker with one of the allow ``specs`` may run."""
    return {m: n for m, n in modules.items() if not any(spec_allows(spec, m) for spec in specs)}


# Most tasks one list_tasks call reads; the fields of each it returns; the longest error it returns.
MAX_LISTED = 200
LISTED_FIELDS = ("id", "state", "module", "fclass", "func", "created", "eta", "started", "finished", "retry",
                 "max_retry", "worker", "priority", "expires")
LISTED_ERROR = 300
# Most waiting tasks one purge_queue call deletes (PURGE_BATCH per script, Redis free in between).
MAX_PURGE = 100_000


class Operations:
    """Cancel, dead list, purge and pause, and ``server_info``."""

    # Set by Master.__init__.
    config: Config
    limits: LimitsConfig
    stores: dict[int, Store]
    wakers: dict[int, Waker]
    _allows: dict[int, tuple[float, list[str]]]
    _reply_bytes: int

    if TYPE_CHECKING:
        def _store(self, queue_index: Any) -> Store: ...

    def _live_allows(self, store: Store, workers: list[dict[str, Any]] | None = None) -> list[str]:
        """The allow specs of the live workers of ``store`` (from ``workers``, its workers just read,
        or as read at most ALLOWS_TTL seconds ago)."""
        now = time.monotonic()
        if workers is None:
            cached = self._allows.get(store.queue_index)
            if cached is not None and now - cached[0] < ALLOWS_TTL:
                return cached[1]
            workers = store.workers()
        specs = sorted({_allow_spec(w) for w in workers})
        self._allows[store.queue_index] = (now, specs)
        return specs

    @rpc.remote
    def cancel_task(self, task_id: Any, queue_index: Any = 0) -> str | None:
        """Cancel a waiting task; a running one is marked so its result is dropped.

        Returns the state the task was in, or None if it is unknown.
        """
        check_task_id(task_id)
        return self._store(queue_index).cancel(task_id)

    @rpc.remote
    def dead_tasks(self, queue_index: Any = 0, limit: Any = 100, offset: Any = 0) -> list[dict[str, Any]]:
        limit = int(required_number("limit", limit, 1, self.limits.max_lookup))
        offset = int(required_number("offset", offset, 0, 1e12))
        return self._store(queue_index).dead(limit, offset, self._reply_bytes)

    @rpc.remote
    def list_tasks(self, state: Any, queue_index: Any = 0, limit: Any = 50, offset: Any = 0,
                   func: Any = None) -> dict[str, Any]:
        """A page of the tasks in ``state`` (queued, delayed, running or dead), ``limit`` (at most
        MAX_LISTED) ids from ``offset`` in the order Store.list_ids gives, each as a summary
        (LISTED_FIELDS, and ``error`` cut to LISTED_ERROR characters). ``func`` (``module.func``,
        or a bare function name) keeps only that function's tasks *of the page read*: a page may
        hold fewer than ``limit``, and no more than the page is ever read.

        Returns ``{"tasks": [...], "total": tasks in that state, "read": ids read, "next":
        the offset of the next page or None}``.
        """
        if state not in LISTED_STATES:
            raise InvalidTaskError(f"state must be one of {', '.join(LISTED_STATES)}, got {str(state)[:40]!r}")
        limit = int(required_number("limit", limit, 1, MAX_LISTED))
        offset = int(required_number("offset", offset, 0, 1e12))
        if func is not None and (not isinstance(func, str) or not 0 < len(func) <= 200):
            raise InvalidTaskError("func must be a function name (module.func) of at most 200 characters, or None")
        store = self._store(queue_index)
        ids, total = store.list_ids(state, limit, offset)
        tasks = []
        for record in store.infos(ids, self._reply_bytes) if ids else []:
            if record is None:  # ended between the two reads
                continue
            name = f"{record['module']}.{record['fclass'] + '.' if record.get('fclass') else ''}{record['func']}"
            if func is not None and func not in (name, record["func"]):
                continue
            summary = {k: record.get(k) for k in LISTED_FIELDS}
            summary["name"] = name
            summary["error"] = (record.get("error") or "")[:LISTED_ERROR]
            tasks.append(summary)
        end = offset + len(ids)
        return {"tasks": tasks, "total": total, "read": len(ids), "next": end if end < total else None}

    @rpc.remote
    def requeue_dead(self, task_ids: Any = None, queue_index: Any = 0) -> list[str]:
        """Put dead tasks (the given ids, or all when None) back in the queue. A dead step of a
        workflow is not requeued: given by id, InvalidTaskError names it and nothing is requeued;
        with None, it stays dead."""
        store = self._store(queue_index)
        done, steps = store.requeue_dead(check_ids(task_ids, self.limits.max_batch))
        if steps and task_ids is not None:
            raise InvalidTaskError(
                f"task_ids: {show(steps[0])}{f' (and {len(steps) - 1} more)' if len(steps) > 1 else ''} is a step "
                f"of a workflow, which ended when it went dead: a step is not requeued alone (push the workflow "
                f"again); nothing was requeued")
        if steps:
            log.info("queue_index %s: %d dead workflow step(s) left dead: a step is not requeued alone",
                     store.queue_index, len(steps))
        return done

    @rpc.remote
    def purge_dead(self, task_ids: Any = None, queue_index: Any = 0) -> int:
        """Delete dead tasks (the given ids, or all when None)."""
        return self._store(queue_index).purge_dead(check_ids(task_ids, self.limits.max_batch))

    @rpc.remote
    def purge_queue(self, queue_index: Any = 0, limit: Any = MAX_PURGE) -> dict[str, int]:
        """Delete up to ``limit`` tasks waiting in ``queue_index`` (ready and delayed, never running
        or dead ones) with their records and de-duplication keys, a script per batch of
        PURGE_BATCH. Returns ``{"purged": n, "left": ids still waiting}``: call again while
        ``left`` is not 0."""
        store = self._store(queue_index)
        limit = int(required_number("limit", limit, 1, MAX_PURGE))
        purged, left = 0, 0
        for _ in range(-(-limit // PURGE_BATCH)):
            n, left = store.purge_queue(min(PURGE_BATCH, limit - purged))
            purged += n
            if not left or purged >= limit:
                break
        log.info("queue_index %s: %d waiting task(s) purged, %d left", store.queue_index, purged, left)
        return {"purged": purged, "left": left}

    @rpc.remote
    def pause_queue(self, queue_index: Any = 0) -> bool:
        """Lease no task of ``queue_index`` until resume_queue, on every master (pushes are still
        stored; running tasks go on). Returns False if it was paused already."""
        return self._pause_queue(queue_index, True)

    @rpc.remote
    def resume_queue(self, queue_index: Any = 0) -> bool:
        """Lease the tasks of ``queue_index`` again. Returns False if it was not paused."""
        return self._pause_queue(queue_index, False)

    def _pause_queue(self, queue_index: Any, on: bool) -> bool:
        store = self._store(queue_index)
        changed = bool(store.pause() if on else store.resume())
        if changed:
            log.info("queue_index %s %s", store.queue_index, "paused" if on else "resumed")
        return changed

    @rpc.remote
    def pause_worker(self, worker_id: Any, queue_index: Any = None) -> list[int]:
        """Lease nothing to worker ``worker_id`` (as ``ppq workers`` lists it) until resume_worker;
        it finishes what it runs and stays listed. ``queue_index`` None: wherever it is listed.
        Returns the queue_indexes where it is now paused; InvalidTaskError if it is listed in none."""
        return self._pause_worker(worker_id, queue_index, True)

    @rpc.remote
    def resume_worker(self, worker_id: Any, queue_index: Any = None) -> list[int]:
        """Lease to worker ``worker_id`` again; returns as pause_worker does."""
        return self._pause_worker(worker_id, queue_index, False)

    def _pause_worker(self, worker_id: Any, queue_index: Any, on: bool) -> list[int]:
        wid = check_worker_id(worker_id)
        stores = list(self.stores.values()) if queue_index is None else [self._store(queue_index)]
        found = []
        for store in stores:
            if (store.pause(wid) if on else store.resume(wid)) is not None:
                found.append(store.queue_index)
        if not found:
            where = "any queue_index" if queue_index is None else f"queue_index {queue_index}"
            raise InvalidTaskError(f"worker_id: no worker {wid!r} is listed in {where} "
                                   f"(ppq workers lists them)")
        log.info("worker %s %s (queue_index %s)", wid, "paused" if on else "resumed", ", ".join(map(str, found)))
        return found

    @rpc.remote(role=rpc.ANY)
    def server_info(self) -> dict[int, dict[str, Any]]:
        """One dict per queue_index: queued/delayed/running/dead counts, counters, whether it is
        ``paused``, and live workers (each with ``paused``)."""
        return self.queue_info()

    def queue_info(self, workers: bool = True) -> dict[int, dict[str, Any]]:
        """Counts of each queue_index, ``workers_live`` (how many workers are listed) and, with
        ``workers``, their infos (all together as many as fit in half of ``limits.max_message``)
        and what its Redis holds (``Store.memory``: used_memory, aof_enabled, aof_size, result_ttl).

        ``waiting_for``: module -> how many queued tasks of that module wait for a worker that
        allows it, for the modules no live worker allows (of the tasks leases moved aside,
        ``parked``). With ``workers``, ``limits``: each limited function as ``limit_list`` gives it.
        """
        out: dict[int, dict[str, Any]] = {}
        for qi, store in sorted(self.stores.items()):
            entry: dict[str, Any] = {"queue_index": qi, "redis": store.safe_url}
            try:
                entry.update(store.counts())
                entry["workers_live"] = store.live_workers()
                entry["workers"] = store.workers(self.limits.max_message // (2 * len(self.stores))) if workers else []
                entry["waiting_for"] = {}
                if entry["parked"]:
                    listed = entry["workers"] if len(entry["workers"]) >= entry["workers_live"] else None
                    specs = self._live_allows(store, listed)
                    entry["waiting_for"] = unrouted(entry["parked"], specs)
                entry["limits"] = store.limits()
                entry["schedules"] = store.schedule_summary()
                if workers:
                    entry.update(store.memory())
                entry["ok"] = True
            except StorageError as exc:
                entry.update({"ok": False, "error": str(exc), "workers": [], "workers_live": 0})
            out[qi] = entry
        return out
