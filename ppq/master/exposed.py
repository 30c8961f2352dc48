"""The object a master exposes as ``queue``: every remote method, its argument checks, and the
replies. Waiting, hand-off and wake-ups come from :class:`~ppq.master.waiting.Waiting`; the
background duties from :mod:`ppq.master.duties`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from .. import codec, rpc
from ..config import Config
from ..errors import CodecError, InvalidTaskError, LeaseLostError, StorageError
from ..store import PURGE_BATCH, Store
from ..task import check_push, check_queue_index, check_task_id
from .checks import (
    MAX_WAIT,
    check_batch,
    check_ids,
    check_worker_id,
    encode_result,
    required_number,
    text_field,
    worker_entry,
    worker_id_of,
)
from .duties import run_duties
from .schedules import Scheduling
from .waiting import Waiting, Waker

log = logging.getLogger("ppq.master")

# Most waiting tasks one purge_queue call deletes (PURGE_BATCH per script, Redis free in between).
MAX_PURGE = 100_000


def _plain(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add decoded args/kwargs for clients that are not ppq's own worker."""
    if rpc.client_is_ppq():
        return tasks
    for task in tasks:
        try:
            task["args"], task["kwargs"] = codec.decode_parameters(task["parameters"])
        except CodecError:
            task["args"], task["kwargs"] = None, None
    return tasks


class Master(Scheduling, Waiting):
    """The object a master daemon exposes as ``queue``."""

    def __init__(self, config: Config, stores: Mapping[int, Store]) -> None:
        self.config = config
        self.stores = dict(stores)
        self.wakers = {qi: Waker() for qi in self.stores}
        self._watchers: dict[tuple[int, str], list[threading.Event]] = {}
        self._watch_lock = threading.Lock()
        # (queue_index, task id) -> (caller's connection, worker id, lease): see _remember_leases.
        self._handed: OrderedDict[tuple[int, str], tuple[str, str, str]] = OrderedDict()
        self._handed_lock = threading.Lock()
        self.limits = config.limits
        # Most bytes of stored task records one reply carries.
        self._reply_bytes = config.limits.max_message // 2
        self.id = uuid.uuid4().hex[:12]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- lifecycle -------------------------------------------------------

    def start_background(self) -> None:
        """Start the wake-up listener (ppq.master.waiting), the duties (ppq.master.duties) and the schedules'
        due-check (ppq.master.schedules) of each store."""
        self.start_schedules()  # first: it checks the declared schedules (ConfigError)
        interval = self.config.master.reaper_interval
        for qi, store in self.stores.items():
            for target, args, name in ((self._listen, (qi, store), "wake"),
                                       (run_duties, (qi, store, interval, self._stop), "duties")):
                t = threading.Thread(target=target, args=args, name=f"ppq-{name}-{qi}", daemon=True)
                t.start()
                self._threads.append(t)

    def stop_background(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for waker in self.wakers.values():
            waker.wake(0)

    # -- helpers -----------------------------------------------------------

    def _store(self, queue_index: Any) -> Store:
        return self.stores[check_queue_index(queue_index, self.stores)]

    def _result_report(self, task_id: Any, lease: Any, ok: bool, result: Any = None, result_bytes: Any = None,
                       error: Any = "", traceback: Any = "", retry: bool = True) -> dict[str, Any]:
        check_task_id(task_id)
        if lease is not None and not isinstance(lease, str):
            raise InvalidTaskError("lease must be a string")
        encoded = b""
        if ok:
            if result_bytes is not None:
                encoded = codec.from_wire(result_bytes)
                if codec.is_pickle(encoded) and not self.config.master.allow_pickle:
                    raise InvalidTaskError("result is pickled, and this master does not accept pickle "
                                           "(master.allow_pickle is false)")
            else:
                encoded = encode_result(result)
            if len(encoded) > self.limits.max_payload:
                raise InvalidTaskError(f"result is {len(encoded)} bytes, more than the limit of "
                                       f"{self.limits.max_payload}")
        return {
            "id": task_id, "lease": lease or "", "ok": ok, "result": encoded,
            "error": text_field("error", error, 10_000), "traceback": text_field("traceback", traceback, 100_000),
            "retry": bool(retry), "release": False,
        }

    def _finish(self, report: dict[str, Any], worker_info: Any, queue_index: Any, piggyback: bool) -> Any:
        self._fill_lease(report, queue_index, worker_info)
        accepted, tasks = self._lease(worker_info, queue_index, [report], 1 if piggyback else 0, 0, strict=True)
        if not accepted[0]:
            raise LeaseLostError(f"task {report['id']}: this worker no longer holds its lease "
                                 f"(it expired or was handed to another worker); the report was refused")
        if piggyback:
            self._remember_leases(queue_index, worker_info, tasks)
            return _plain(tasks)[0] if tasks else None
        return True

    # -- the exposed methods ------------------------------------------------

    @rpc.remote(role=rpc.ANY)
    def ping(self) -> str:
        return "pong"

    @rpc.remote
    def push_task(self, func: Any, key: Any = "", fclass: Any = None, module: Any = None, path: Any = None,
                  lang: Any = "", parameters: Any = None, max_retry: Any = 1, retry_delay: Any = False,
                  queue_index: Any = 0, delay: Any = None, args: Any = None, kwargs: Any = None,
                  timeout: Any = None, result_ttl: Any = None, task_id: Any = None) -> str:
        """Push one task; return its id. The fields are described in README.md and checked in task.check_push."""
        options = {
            "func": func, "key": key, "fclass": fclass, "module": module, "path": path, "lang": lang,
            "parameters": parameters, "max_retry": max_retry, "retry_delay": retry_delay,
            "queue_index": queue_index, "delay": delay, "args": args, "kwargs": kwargs,
            "timeout": timeout, "result_ttl": result_ttl, "task_id": task_id,
        }
        spec = check_push(options, self.stores, self.limits, self.config.master.allow_pickle)
        task_id = self._push(spec.queue_index, [spec])[0]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("queue_index %s: task %s pushed%s", spec.queue_index, task_id,
                      f" (delay {spec.delay:g}s)" if spec.delay else "")
        return task_id

    @rpc.remote
    def push_tasks(self, tasks: Any) -> list[str]:
        """Push many tasks in one call; all are checked before any is stored."""
        if not isinstance(tasks, (list, tuple)):
            raise InvalidTaskError(f"tasks must be a list of dicts, got {type(tasks).__name__}")
        if len(tasks) > self.limits.max_batch:
            raise InvalidTaskError(f"tasks holds {len(tasks)} tasks, more than the limit of {self.limits.max_batch}")
        specs = check_batch(tasks, self.stores, self.limits, self.config.master.allow_pickle)
        by_queue: dict[int, list[int]] = {}
        for i, spec in enumerate(specs):
            by_queue.setdefault(spec.queue_index, []).append(i)
        ids: list[str] = [""] * len(specs)
        for qi, positions in by_queue.items():
            for pos, tid in zip(positions, self._push(qi, [specs[p] for p in positions]), strict=True):
                ids[pos] = tid
        if log.isEnabledFor(logging.DEBUG):
            for spec, tid in zip(specs, ids, strict=True):
                log.debug("queue_index %s: task %s pushed", spec.queue_index, tid)
        return ids

    @rpc.remote(role=rpc.WORKER)
    def get_task(self, worker_info: Any, queue_index: Any = 0, wait: Any = 0) -> dict[str, Any] | None:
        """Lease the next task of ``queue_index`` (waiting up to ``wait`` seconds); None if there is none."""
        wait = required_number("wait", wait, 0, MAX_WAIT)
        _, tasks = self._lease(worker_info, queue_index, [], 1, wait)
        self._remember_leases(queue_index, worker_info, tasks)
        return _plain(tasks)[0] if tasks else None

    @rpc.remote(role=rpc.WORKER)
    def get_tasks(self, worker_info: Any, queue_index: Any = 0, count: Any = 1, wait: Any = 0) -> list[dict[str, Any]]:
        """Lease up to ``count`` tasks."""
        count = int(required_number("count", count, 1, self.limits.max_batch))
        wait = required_number("wait", wait, 0, MAX_WAIT)
        _, tasks = self._lease(worker_info, queue_index, [], count, wait)
        self._remember_leases(queue_index, worker_info, tasks)
        return _plain(tasks)

    @rpc.remote(role=rpc.WORKER)
    def task_finish(self, task_id: Any, worker_info: Any, queue_index: Any = 0, piggyback: Any = False,
                    result: Any = None, result_bytes: Any = None, lease: Any = None) -> Any:
        """Record a task's success. Refused (LeaseLostError) if the worker lost its lease.

        With ``piggyback`` the reply is the next task (or None) instead of True.
        """
        report = self._result_report(task_id, lease, True, result=result, result_bytes=result_bytes)
        return self._finish(report, worker_info, queue_index, bool(piggyback))

    @rpc.remote(role=rpc.WORKER)
    def task_error(self, task_id: Any, worker_info: Any, queue_index: Any = 0, piggyback: Any = False,
                   error: Any = "", traceback: Any = "", lease: Any = None, retry: Any = True) -> Any:
        """Record a task's failure: it is retried while retries remain, else it goes to the dead list."""
        report = self._result_report(task_id, lease, False, error=error, traceback=traceback, retry=bool(retry))
        return self._finish(report, worker_info, queue_index, bool(piggyback))

    @rpc.remote(role=rpc.WORKER)
    def report(self, worker_info: Any, queue_index: Any = 0, reports: Any = (), want: Any = 0,
               wait: Any = 0) -> dict[str, Any]:
        """The worker's fast path: many finishes/errors/hand-backs and the next tasks in one call.

        Each report: ``{id, lease, ok, result_bytes | result, error, traceback, retry, release}``.
        Returns ``{"accepted": [bool, ...], "tasks": [...]}``.
        """
        if not isinstance(reports, (list, tuple)) or len(reports) > self.limits.max_batch:
            raise InvalidTaskError(f"reports must be a list of at most {self.limits.max_batch} dicts")
        want = int(required_number("want", want, 0, self.limits.max_batch))
        wait = required_number("wait", wait, 0, MAX_WAIT)
        checked = []
        for i, r in enumerate(reports):
            if not isinstance(r, Mapping):
                raise InvalidTaskError(f"reports[{i}] must be a dict")
            try:
                item = self._result_report(r.get("id"), r.get("lease"), bool(r.get("ok")), r.get("result"),
                                           r.get("result_bytes"), r.get("error", ""), r.get("traceback", ""),
                                           r.get("retry", True))
            except InvalidTaskError as exc:
                if not r.get("ok") or r.get("release"):
                    raise
                # A result that cannot be stored fails its task for good; the batch's other reports stand.
                item = self._result_report(r.get("id"), r.get("lease"), False,
                                           error=f"InvalidResultError: {exc}", retry=False)
            item["release"] = bool(r.get("release"))
            checked.append(item)
        accepted, tasks = self._lease(worker_info, queue_index, checked, want, wait)
        return {"accepted": accepted, "tasks": _plain(tasks)}

    @rpc.remote(role=rpc.WORKER)
    def heartbeat(self, worker_info: Any, queue_index: Any = 0, running: Any = ()) -> dict[str, Any]:
        """Extend the leases of ``running`` (``[[id, lease], ...]``); register the worker.

        Returns ``{"lost": [ids]}``: tasks whose lease is gone or that were cancelled.
        """
        info = worker_entry(worker_info, self.limits.max_worker_info, address=rpc.client_address(),
                            last_heartbeat=time.time())
        if not isinstance(running, (list, tuple)) or len(running) > self.limits.max_batch:
            raise InvalidTaskError("running must be a list of [task_id, lease] pairs")
        pairs = []
        for item in running:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise InvalidTaskError("running must be a list of [task_id, lease] pairs")
            pairs.append((check_task_id(item[0]), text_field("lease", item[1], 300)))
        store = self._store(queue_index)
        lost = store.heartbeat(info["id"], info, pairs, self._seen(worker_info))
        if lost is None:
            raise InvalidTaskError(f"worker_info: queue_index {store.queue_index} already lists "
                                   f"{self.limits.max_workers} workers (limits.max_workers); a new worker id is "
                                   f"refused until listed ones go quiet for master.worker_ttl")
        return {"lost": lost}

    @rpc.remote(role=rpc.WORKER)
    def release_worker(self, worker_info: Any, queue_index: Any = 0, leaving: Any = False) -> int:
        """A worker is stopping: end its long-polls waiting on this master at once (they return no
        task); with ``leaving``, also take it off the list of live workers. Returns how many
        long-polls were ended."""
        wid = worker_id_of(worker_info)
        store = self._store(queue_index)
        ended = self.wakers[store.queue_index].release(wid)
        if leaving:
            store.forget_worker(wid)
        return ended

    @rpc.remote
    def get_task_info(self, task_id: Any, queue_index: Any = 0) -> dict[str, Any] | None:
        """The task's record (state, retry, timestamps, result or error); None if unknown."""
        check_task_id(task_id)
        return self._store(queue_index).info(task_id)

    @rpc.remote
    def wait_task(self, task_id: Any, queue_index: Any = 0, timeout: Any = 10) -> dict[str, Any] | None:
        """Wait up to ``timeout`` seconds for the task to end; return its record (None if unknown)."""
        check_task_id(task_id)
        timeout = required_number("timeout", timeout, 0, MAX_WAIT)
        return self._wait_final(self._store(queue_index), [task_id], timeout)[0]

    @rpc.remote
    def wait_tasks(self, task_ids: Any, queue_index: Any = 0, timeout: Any = 10) -> list[dict[str, Any] | None]:
        """Wait until at least one of ``task_ids`` has ended (or ``timeout``); return all their records."""
        if not isinstance(task_ids, (list, tuple)) or not task_ids or len(task_ids) > self.limits.max_lookup:
            raise InvalidTaskError(f"task_ids must be a non-empty list of at most {self.limits.max_lookup} ids "
                                   f"(limits.max_lookup)")
        ids = [check_task_id(t) for t in task_ids]
        timeout = required_number("timeout", timeout, 0, MAX_WAIT)
        return self._wait_final(self._store(queue_index), ids, timeout)

    @rpc.remote
    def get_tasks_info(self, task_ids: Any, queue_index: Any = 0) -> list[dict[str, Any] | None]:
        if not isinstance(task_ids, (list, tuple)) or len(task_ids) > self.limits.max_lookup:
            raise InvalidTaskError(f"task_ids must be a list of at most {self.limits.max_lookup} ids "
                                   f"(limits.max_lookup)")
        ids = [check_task_id(t) for t in task_ids]
        return self._store(queue_index).infos(ids, self._reply_bytes)

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
    def requeue_dead(self, task_ids: Any = None, queue_index: Any = 0) -> list[str]:
        """Put dead tasks (the given ids, or all when None) back in the queue."""
        return self._store(queue_index).requeue_dead(check_ids(task_ids, self.limits.max_batch))

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
        store = self._store(queue_index)
        changed = bool(store.pause())
        if changed:
            log.info("queue_index %s paused", store.queue_index)
        return changed

    @rpc.remote
    def resume_queue(self, queue_index: Any = 0) -> bool:
        """Lease the tasks of ``queue_index`` again. Returns False if it was not paused."""
        store = self._store(queue_index)
        changed = bool(store.resume())
        if changed:
            log.info("queue_index %s resumed", store.queue_index)
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
        ``workers``, their infos (all together as many as fit in half of ``limits.max_message``)."""
        out: dict[int, dict[str, Any]] = {}
        for qi, store in sorted(self.stores.items()):
            entry: dict[str, Any] = {"queue_index": qi, "redis": store.safe_url}
            try:
                entry.update(store.counts())
                entry["workers_live"] = store.live_workers()
                entry["workers"] = store.workers(self.limits.max_message // (2 * len(self.stores))) if workers else []
                entry["ok"] = True
            except StorageError as exc:
                entry.update({"ok": False, "error": str(exc), "workers": [], "workers_live": 0})
            out[qi] = entry
        return out

