"""The master: a stateless Pyro5 object over the Redis stores, and ``serve()``.

Any number of masters can serve the same queues; every background duty
(delayed-task mover, lease reaper) is a Lua script that is safe to run on all of
them at once.
"""

from __future__ import annotations

import logging
import math
import operator
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import msgpack

from . import codec, rpc
from .config import Config
from .embedded import RedisServer, default_data_dir
from .errors import (
    CodecError,
    ConfigError,
    InvalidTaskError,
    LeaseLostError,
    StorageError,
)
from .store import Store
from .task import FINAL_STATES, TaskSpec, check_number, check_push, check_pushes, check_queue_index, check_task_id

log = logging.getLogger("ppq.master")

# Longest long-poll a worker may ask for, in seconds.
MAX_WAIT = 30.0
# The worker_info fields a master keeps (what ppq's worker agent sends and `ppq status` /
# `ppq workers` read): text fields with their longest length, and numbers.
WORKER_TEXT_FIELDS = {"host": 255, "pool": 32, "control_uri": 300}
WORKER_NUMBER_FIELDS = ("pid", "queue_index", "concurrency", "started", "done", "failed", "heartbeat_interval")
# Most running task ids kept from one worker_info.
MAX_RUNNING_LISTED = 100
# The body and the key of a TaskSpec; where a push_tasks error names a task's position.
_BODY, _KEY = operator.itemgetter(4), operator.itemgetter(2)
_POSITION = re.compile(r"^tasks\[(\d+)\]")
# Seconds between the INFO summary lines of each queue_index.
SUMMARY_INTERVAL = 60.0
# Leases handed out by get_task / get_tasks / piggyback that this master remembers for
# finishes and errors sent without their lease (the seed's call shape); the oldest go first.
MAX_REMEMBERED_LEASES = 100_000


class Waiter:
    """One long-poll waiting on this master: woken, or handed tasks leased by a push."""

    __slots__ = ("wid", "count", "seen", "event", "tasks", "released")

    def __init__(self, wid: str, count: int, seen: float) -> None:
        self.wid = wid
        self.count = count
        self.seen = seen
        self.event = threading.Event()
        # Set by release_worker: the worker is stopping, the long-poll returns empty at once.
        self.released = False
        # Set, with the event, by a push that claimed this waiter: the tasks it leased to it.
        self.tasks: list[dict[str, Any]] | None = None

    def hand(self, tasks: list[dict[str, Any]]) -> None:
        self.tasks = tasks
        self.event.set()


class Waker:
    """The long-polls of one queue_index waiting on this master.

    A push on this master claims the longest-waiting one and leases tasks to it in
    the push's own script (:meth:`claim`); tasks made ready elsewhere arrive as a
    published count and wake that many (:meth:`wake`).
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generation = 0
        self.idle: dict[Waiter, None] = {}

    def wake(self, count: int) -> None:
        """Wake ``count`` idle waiters (all when ``count`` <= 0) to look for tasks."""
        with self.lock:
            self.generation += 1
            for _ in range(len(self.idle) if count <= 0 else min(count, len(self.idle))):
                self._take().event.set()

    def claim(self) -> Waiter | None:
        """Take the longest-waiting idle waiter; the caller must ``hand()`` it its tasks."""
        with self.lock:
            return self._take() if self.idle else None

    def release(self, wid: str) -> int:
        """End the waits of worker ``wid`` (it is stopping); return how many there were."""
        with self.lock:
            mine = [w for w in self.idle if w.wid == wid]
            for waiter in mine:
                del self.idle[waiter]
                waiter.released = True
                waiter.event.set()
        return len(mine)

    def _take(self) -> Waiter:
        """Remove and return the longest-waiting idle waiter (``self.lock`` held)."""
        waiter = next(iter(self.idle))
        del self.idle[waiter]
        return waiter

    def wait(self, waiter: Waiter, generation: int, timeout: float) -> list[dict[str, Any]] | None:
        """Wait until woken, handed tasks (returned) or ``timeout``; at once if a wake-up
        came after ``generation``."""
        with self.lock:
            if self.generation != generation:
                return None
            waiter.event.clear()
            waiter.tasks = None
            self.idle[waiter] = None
        if not waiter.event.wait(timeout):
            with self.lock:
                if self.idle.pop(waiter, True) is None:
                    return None
            # Woken or claimed just now: a claim always ends in hand().
            waiter.event.wait()
        return waiter.tasks


def worker_id_of(worker_info: Any) -> str:
    """The id of a worker from the ``worker_info`` it sends with every call."""
    if isinstance(worker_info, Mapping):
        wid = worker_info.get("id")
        if wid is None:
            host, pid = worker_info.get("host", "?"), worker_info.get("pid", "?")
            if not (_plain_part(host) and _plain_part(pid)):
                raise InvalidTaskError("worker_info: host and pid must be strings or numbers")
            wid = f"{host}:{pid}"
    elif isinstance(worker_info, (list, tuple)):
        if not all(_plain_part(x) for x in worker_info):
            raise InvalidTaskError("worker_info as a list must hold strings and numbers")
        wid = ":".join(str(x) for x in worker_info)
    elif isinstance(worker_info, (str, int)) and not isinstance(worker_info, bool) and _plain_part(worker_info):
        wid = str(worker_info)
    else:
        raise InvalidTaskError(f"worker_info must be a dict or a string, got {type(worker_info).__name__}")
    if not isinstance(wid, str) or not wid or len(wid) > 200 or "\x00" in wid:
        raise InvalidTaskError("worker_info: id must be a non-empty string of at most 200 characters")
    return wid


def _plain_part(value: Any) -> bool:
    """True for a value that may make up a worker id: a string, or a number str() can print."""
    return isinstance(value, (str, float)) or (isinstance(value, int) and value.bit_length() <= 64)


def worker_entry(worker_info: Any, limit: int, **extra: Any) -> dict[str, Any]:
    """What a master stores of a worker's ``worker_info``: its id, the fields ppq reads, each
    bounded, and ``extra``; the list of running task ids is cut so that the whole, encoded,
    takes at most ``limit`` bytes. Anything else the worker sent is dropped."""
    entry: dict[str, Any] = {"id": worker_id_of(worker_info)}
    source = worker_info if isinstance(worker_info, Mapping) else {}
    for name, longest in WORKER_TEXT_FIELDS.items():
        value = source.get(name)
        if isinstance(value, str):
            entry[name] = value[:longest]
    for name in WORKER_NUMBER_FIELDS:
        value = source.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and abs(value) < 2**53:
            entry[name] = value
    entry.update(extra)
    # The running ids fill what is left of the limit: each costs its length and at most 2 bytes
    # of msgpack header; the list and its key, 12 more.
    room = limit - len(msgpack.packb(entry)) - 12
    running: list[str] = []
    listed = source.get("running")
    for tid in listed[:MAX_RUNNING_LISTED] if isinstance(listed, (list, tuple)) else ():
        if isinstance(tid, str):
            tid = tid[:64]
            room -= len(tid.encode("utf-8", "replace")) + 2
            if room < 0:
                break
            running.append(tid)
    entry["running"] = running
    return entry


def _number(name: str, value: Any, low: float, high: float) -> float:
    """A required number within ``low``..``high`` (task.check_number without None)."""
    return check_number(name, value, low, high, allow_none=False)  # type: ignore[return-value]


def _encode_result(result: Any) -> bytes:
    try:
        return codec.encode(result)
    except CodecError as exc:
        raise CodecError(f"result: {exc}") from None


def _text_field(name: str, value: Any, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidTaskError(f"{name} must be a string, got {type(value).__name__}")
    return value[:limit]


class Master:
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
        """Start the wake-up listeners and the mover/reaper loop of each store."""
        for qi, store in self.stores.items():
            for target, name in ((self._listen, "wake"), (self._duties, "duties")):
                t = threading.Thread(target=target, args=(qi, store), name=f"ppq-{name}-{qi}", daemon=True)
                t.start()
                self._threads.append(t)

    def stop_background(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(5)
        for waker in self.wakers.values():
            waker.wake(0)

    def _listen(self, qi: int, store: Store) -> None:
        def finished(task_id: str) -> None:
            with self._watch_lock:
                events = self._watchers.get((qi, task_id), ())
                for event in events:
                    event.set()

        store.listen(self.wakers[qi].wake, finished, self._stop)

    def _wait_final(self, store: Store, task_ids: list[str], timeout: float) -> list[dict[str, Any] | None]:
        """Infos of ``task_ids`` once one has ended (or ``timeout`` passed), without polling."""
        event = threading.Event()
        keys = [(store.queue_index, tid) for tid in task_ids]
        with self._watch_lock:
            for key in keys:
                self._watchers.setdefault(key, []).append(event)
        try:
            if timeout > 0:
                store.watch(task_ids, timeout + 5)
            infos = store.infos(task_ids, self._reply_bytes)
            if timeout <= 0 or any(i is None or i["state"] in FINAL_STATES for i in infos):
                return infos
            deadline = time.monotonic() + timeout
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return infos
                # The finished channel can miss a message in a Redis outage: look again now and then.
                event.wait(min(remaining, 5.0))
                event.clear()
                infos = store.infos(task_ids, self._reply_bytes)
                if any(i is None or i["state"] in FINAL_STATES for i in infos):
                    return infos
        finally:
            with self._watch_lock:
                for key in keys:
                    events = self._watchers.get(key)
                    if events is not None:
                        events.remove(event)
                        if not events:
                            del self._watchers[key]

    def _duties(self, qi: int, store: Store) -> None:
        """Move due delayed tasks and reap expired leases, forever."""
        interval = self.config.master.reaper_interval
        next_reap = 0.0
        next_summary = time.monotonic() + SUMMARY_INTERVAL
        last_summary = ""
        failing = False
        while not self._stop.is_set():
            pause = interval
            try:
                _, next_eta, now = store.move_due()
                if next_eta is not None:
                    pause = min(pause, max(next_eta - now, 0.005))
                if time.monotonic() >= next_reap:
                    reaped = store.reap()
                    if reaped:
                        log.info("queue_index %s: %s expired lease(s) handled", qi, reaped)
                    next_reap = time.monotonic() + interval
                if failing:
                    log.info("queue_index %s: redis is back", qi)
                    failing = False
                if time.monotonic() >= next_summary:
                    next_summary = time.monotonic() + SUMMARY_INTERVAL
                    c = store.counts()
                    summary = (f"queued={c['queued']} delayed={c['delayed']} running={c['running']} "
                               f"dead={c['dead']} done/min={c['done_per_min']} failed/min={c['failed_per_min']}")
                    if summary != last_summary:
                        log.info("queue_index %s: %s", qi, summary)
                        last_summary = summary
            except StorageError as exc:
                if not failing:
                    log.error("%s", exc)
                failing = True
                pause = interval
            except Exception:  # noqa: BLE001 - keep the duty loop alive whatever happens
                log.exception("queue_index %s: background duty failed", qi)
            self._stop.wait(pause)

    # -- helpers -----------------------------------------------------------

    def _store(self, queue_index: Any) -> Store:
        return self.stores[check_queue_index(queue_index, self.stores)]

    def _seen(self, worker_info: Any = None) -> float:
        """Seconds a worker counts as live after it was last heard from: three of its heartbeats,
        at most ``master.worker_ttl``."""
        interval = worker_info.get("heartbeat_interval") if isinstance(worker_info, Mapping) else None
        if not (isinstance(interval, (int, float)) and not isinstance(interval, bool) and 0 < interval <= 3600):
            interval = self.config.worker.heartbeat_interval
        return min(3 * float(interval) + 1, self.config.master.worker_ttl)

    def _lease(self, worker_info: Any, queue_index: Any, reports: list[dict[str, Any]], count: int,
               wait: float, strict: bool = False) -> tuple[list[bool], list[dict[str, Any]]]:
        store = self._store(queue_index)
        wid = worker_id_of(worker_info)
        waker = self.wakers[store.queue_index]
        generation = waker.generation
        accepted, tasks = store.report(wid, reports, count, self._seen(worker_info), strict)
        if log.isEnabledFor(logging.DEBUG):
            self._log_changes(store.queue_index, wid, reports, accepted, tasks)
        if count <= 0 or tasks or wait <= 0 or (strict and not all(accepted)):
            return accepted, tasks
        # Register as a waiter first, then look again: a push in between is not missed.
        member = f"{self.id}:{threading.get_ident()}"
        store.add_waiter(member, wait)
        seen = self._seen(worker_info)
        waiter = Waiter(wid, count, seen)
        try:
            deadline = time.monotonic() + wait
            generation = waker.generation
            _, tasks = store.report(wid, [], count, seen)
            while not tasks:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    break
                handed = waker.wait(waiter, generation, remaining)
                if handed:
                    tasks = handed
                    break
                if waiter.released:
                    break
                generation = waker.generation
                _, tasks = store.report(wid, [], count, seen)
            if tasks and log.isEnabledFor(logging.DEBUG):
                self._log_changes(store.queue_index, wid, [], [], tasks)
        finally:
            # With tasks in hand, reply first: the registration expires by itself.
            if not tasks:
                try:
                    store.remove_waiter(member)
                except StorageError:
                    pass
        return accepted, tasks

    def _log_changes(self, qi: int, wid: str, reports: list[dict[str, Any]], accepted: list[bool],
                     tasks: list[dict[str, Any]]) -> None:
        for report, ok in zip(reports, accepted, strict=True):
            outcome = "handed back" if report.get("release") else ("finished" if report["ok"] else "failed")
            log.debug("queue_index %s: task %s %s by %s%s", qi, report["id"], outcome, wid,
                      "" if ok else " (refused: lease lost)")
        for task in tasks:
            log.debug("queue_index %s: task %s %s.%s leased to %s", qi, task["id"], task["module"], task["func"], wid)

    def _plain(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Add decoded args/kwargs for clients that are not ppq's own worker."""
        if rpc.client_is_ppq():
            return tasks
        for task in tasks:
            try:
                task["args"], task["kwargs"] = codec.decode_parameters(task["parameters"])
            except CodecError:
                task["args"], task["kwargs"] = None, None
        return tasks

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
                encoded = _encode_result(result)
            if len(encoded) > self.limits.max_payload:
                raise InvalidTaskError(f"result is {len(encoded)} bytes, more than the limit of "
                                       f"{self.limits.max_payload}")
        return {
            "id": task_id, "lease": lease or "", "ok": ok, "result": encoded,
            "error": _text_field("error", error, 10_000), "traceback": _text_field("traceback", traceback, 100_000),
            "retry": bool(retry), "release": False,
        }

    def _remember_leases(self, queue_index: Any, worker_info: Any, tasks: list[dict[str, Any]]) -> None:
        """Remember the leases of ``tasks``, just handed to the caller, for its reports without a lease.

        Such a report is the seed's call shape (``task_finish(id, worker_info)``); it is
        filled in only for the same connection and worker id that leased the task, so that
        knowing a task's worker (which get_task_info shows) is not enough to report for it.
        """
        if not tasks:
            return
        qi = self._store(queue_index).queue_index
        entry = (rpc.client_session(), worker_id_of(worker_info))
        with self._handed_lock:
            for task in tasks:
                self._handed[(qi, task["id"])] = (*entry, task["lease"])
            while len(self._handed) > MAX_REMEMBERED_LEASES:
                self._handed.popitem(last=False)

    def _fill_lease(self, report: dict[str, Any], queue_index: Any, worker_info: Any) -> None:
        """A report without a lease: use the one this master handed to the same caller, if any."""
        if report["lease"]:
            return
        key = (self._store(queue_index).queue_index, report["id"])
        caller = (rpc.client_session(), worker_id_of(worker_info))
        with self._handed_lock:
            entry = self._handed.get(key)
            if entry is not None and caller[0] and entry[:2] == caller:
                del self._handed[key]
                report["lease"] = entry[2]

    def _finish(self, report: dict[str, Any], worker_info: Any, queue_index: Any, piggyback: bool) -> Any:
        self._fill_lease(report, queue_index, worker_info)
        accepted, tasks = self._lease(worker_info, queue_index, [report], 1 if piggyback else 0, 0, strict=True)
        if not accepted[0]:
            raise LeaseLostError(f"task {report['id']}: this worker no longer holds its lease "
                                 f"(it expired or was handed to another worker); the report was refused")
        if piggyback:
            self._remember_leases(queue_index, worker_info, tasks)
            return self._plain(tasks)[0] if tasks else None
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

    def _push(self, queue_index: int, specs: list[TaskSpec]) -> list[str]:
        """Store tasks; when one is ready at once and a long-poll waits here, lease to it in the same step."""
        store = self.stores[queue_index]
        waiter = None
        if any(not spec.delay for spec in specs):
            waiter = self.wakers[queue_index].claim()
        if waiter is None:
            return store.push(specs)[0]
        tasks: list[dict[str, Any]] = []
        try:
            ids, tasks = store.push(specs, (waiter.wid, waiter.count, waiter.seen))
        finally:
            waiter.hand(tasks)
        return ids

    @rpc.remote
    def push_tasks(self, tasks: Any) -> list[str]:
        """Push many tasks in one call; all are checked before any is stored."""
        if not isinstance(tasks, (list, tuple)):
            raise InvalidTaskError(f"tasks must be a list of dicts, got {type(tasks).__name__}")
        if len(tasks) > self.limits.max_batch:
            raise InvalidTaskError(f"tasks holds {len(tasks)} tasks, more than the limit of {self.limits.max_batch}")
        specs = self._check_batch(tasks)
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

    def _check_batch(self, tasks: list[Any] | tuple[Any, ...]) -> list[TaskSpec]:
        """check_pushes, a run of tasks at a time, refusing the batch as soon as the tasks
        together take more than ``limits.max_message`` bytes: a message can repeat one object
        many times, so its own size does not bound theirs."""
        limit = self.limits.max_message
        step = max(1, min(256, 4 * limit // self.limits.max_payload))
        specs: list[TaskSpec] = []
        total = 0
        for start in range(0, len(tasks), step):
            try:
                chunk = check_pushes(tasks[start:start + step], self.stores, self.limits,
                                     self.config.master.allow_pickle)
            except InvalidTaskError as exc:
                if not start:
                    raise
                message = str(exc)
                where = _POSITION.match(message)
                if where:
                    message = f"tasks[{start + int(where[1])}]{message[where.end():]}"
                raise type(exc)(message) from None
            total += sum(map(len, map(_BODY, chunk))) + sum(map(len, map(_KEY, chunk)))
            if total > limit:
                raise InvalidTaskError(f"tasks: these {len(tasks)} tasks take more than {limit} bytes together "
                                       f"(limits.max_message); push them in smaller batches")
            specs += chunk
        return specs

    @rpc.remote(role=rpc.WORKER)
    def get_task(self, worker_info: Any, queue_index: Any = 0, wait: Any = 0) -> dict[str, Any] | None:
        """Lease the next task of ``queue_index`` (waiting up to ``wait`` seconds); None if there is none."""
        wait = _number("wait", wait, 0, MAX_WAIT)
        _, tasks = self._lease(worker_info, queue_index, [], 1, wait)
        self._remember_leases(queue_index, worker_info, tasks)
        return self._plain(tasks)[0] if tasks else None

    @rpc.remote(role=rpc.WORKER)
    def get_tasks(self, worker_info: Any, queue_index: Any = 0, count: Any = 1, wait: Any = 0) -> list[dict[str, Any]]:
        """Lease up to ``count`` tasks."""
        count = int(_number("count", count, 1, self.limits.max_batch))
        wait = _number("wait", wait, 0, MAX_WAIT)
        _, tasks = self._lease(worker_info, queue_index, [], count, wait)
        self._remember_leases(queue_index, worker_info, tasks)
        return self._plain(tasks)

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
        want = int(_number("want", want, 0, self.limits.max_batch))
        wait = _number("wait", wait, 0, MAX_WAIT)
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
        return {"accepted": accepted, "tasks": self._plain(tasks)}

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
            pairs.append((check_task_id(item[0]), _text_field("lease", item[1], 300)))
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
        timeout = _number("timeout", timeout, 0, MAX_WAIT)
        return self._wait_final(self._store(queue_index), [task_id], timeout)[0]

    @rpc.remote
    def wait_tasks(self, task_ids: Any, queue_index: Any = 0, timeout: Any = 10) -> list[dict[str, Any] | None]:
        """Wait until at least one of ``task_ids`` has ended (or ``timeout``); return all their records."""
        if not isinstance(task_ids, (list, tuple)) or not task_ids or len(task_ids) > self.limits.max_lookup:
            raise InvalidTaskError(f"task_ids must be a non-empty list of at most {self.limits.max_lookup} ids "
                                   f"(limits.max_lookup)")
        ids = [check_task_id(t) for t in task_ids]
        timeout = _number("timeout", timeout, 0, MAX_WAIT)
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
        limit = int(_number("limit", limit, 1, self.limits.max_lookup))
        offset = int(_number("offset", offset, 0, 1e12))
        return self._store(queue_index).dead(limit, offset, self._reply_bytes)

    @rpc.remote
    def requeue_dead(self, task_ids: Any = None, queue_index: Any = 0) -> list[str]:
        """Put dead tasks (the given ids, or all when None) back in the queue."""
        return self._store(queue_index).requeue_dead(self._ids(task_ids))

    @rpc.remote
    def purge_dead(self, task_ids: Any = None, queue_index: Any = 0) -> int:
        """Delete dead tasks (the given ids, or all when None)."""
        return self._store(queue_index).purge_dead(self._ids(task_ids))

    def _ids(self, task_ids: Any) -> list[str] | None:
        if task_ids is None:
            return None
        if isinstance(task_ids, str):
            task_ids = [task_ids]
        if not isinstance(task_ids, (list, tuple)) or not task_ids or len(task_ids) > self.limits.max_batch:
            raise InvalidTaskError("task_ids must be a non-empty list of ids, or None for all")
        return [check_task_id(t) for t in task_ids]

    @rpc.remote(role=rpc.ANY)
    def server_info(self) -> dict[int, dict[str, Any]]:
        """One dict per queue_index: queued/delayed/running/dead counts, counters and live workers."""
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


# Oldest Redis the scripts run on (LPOP with a count).
MIN_REDIS = (6, 2)


def open_stores(config: Config) -> tuple[dict[int, Store], RedisServer | None]:
    """Connect to each Redis of ``master.redis_map``, or start an embedded one."""
    m = config.master
    embedded = None
    redis_map = dict(m.redis_map)
    if not redis_map:
        data_dir = m.data_dir or default_data_dir(m.port)
        embedded = RedisServer(data_dir, appendfsync=m.appendfsync).start()
        redis_map = {0: embedded.url}
    stores = {
        qi: Store(qi, url, timeout=m.redis_timeout, lease_timeout=m.lease_timeout,
                  max_lease_expiries=m.max_lease_expiries, result_ttl=m.result_ttl,
                  max_workers=config.limits.max_workers)
        for qi, url in redis_map.items()
    }
    for qi, store in stores.items():
        try:
            version = store.server_version()
        except StorageError as exc:
            problem = f"cannot reach {store.safe_url}: {exc}"
        else:
            if version >= MIN_REDIS:
                continue
            problem = (f"{store.safe_url} runs Redis {'.'.join(map(str, version))}; ppq needs "
                       f"{'.'.join(map(str, MIN_REDIS))} or later")
        for opened in stores.values():
            opened.close()
        if embedded is not None:
            embedded.stop()
        raise ConfigError(f"master.redis_map[{qi}]: {problem}")
    return stores, embedded


def raise_open_files_limit() -> int:
    """Raise this process's open-files limit to its hard limit (one socket per connection)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = 1_048_576 if hard == resource.RLIM_INFINITY else hard
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        return soft
    except (ImportError, ValueError, OSError):
        return -1


class MasterServer:
    """A running master: stores, the exposed object and its Pyro5 daemon."""

    def __init__(self, config: Config) -> None:
        m = config.master
        limit = raise_open_files_limit()
        if 0 <= limit < m.threadpool_size + 64:
            log.warning("open-files limit is %s: fewer than master.threadpool_size (%s) connections will fit",
                        limit, m.threadpool_size)
        rpc.check_bind(m.host, config.any_token, m.insecure, "master.host")
        ssl_context = rpc.server_ssl_context(config.tls)
        self.config = config
        self.stores, self.embedded = open_stores(config)
        self.master = Master(config, self.stores)
        try:
            self.daemon = rpc.Daemon(m.host, m.port, rpc.token_roles(config.auth_token, config.worker_token,
                                                                     config.client_token),
                                     m.threadpool_size, config.limits.max_message, ssl_context)
        except OSError as exc:
            self.close_stores()
            raise ConfigError(f"master.port: cannot listen on {m.host}:{m.port}: {exc.strerror or exc}") from None
        self.uri = str(self.daemon.register(self.master, objectId=rpc.MASTER_OBJECT))
        self.port = self.daemon.locationStr.rsplit(":", 1)[1]
        self._thread: threading.Thread | None = None

    def start(self) -> MasterServer:
        self.master.start_background()
        self.metrics_server = None
        if self.config.master.metrics_port:
            from .metrics import serve_master_metrics

            try:
                self.metrics_server = serve_master_metrics(self.config.master.metrics_host,
                                                           self.config.master.metrics_port,
                                                           lambda: self.master.queue_info(workers=False),
                                                           self.config.client_secret)
            except ConfigError:
                self.stop()
                raise
            except OSError as exc:
                self.stop()
                raise ConfigError(f"master.metrics_port: cannot listen on {self.config.master.metrics_port}: "
                                  f"{exc.strerror or exc}") from None
        self._thread = rpc.serve_in_thread(self.daemon, "ppq-master-daemon")
        log.info("master serving %s, queue_index %s", self.uri, ", ".join(map(str, sorted(self.stores))))
        return self

    def close_stores(self) -> None:
        for store in self.stores.values():
            store.close()
        if self.embedded is not None:
            self.embedded.stop()

    def stop(self) -> None:
        if getattr(self, "metrics_server", None) is not None:
            from .metrics import stop_metrics

            stop_metrics(self.metrics_server)
            self.metrics_server = None
        self.master.stop_background()
        self.daemon.shutdown()
        if self._thread is not None:
            self._thread.join(10)
        self.close_stores()
        log.info("master stopped")

    def __enter__(self) -> MasterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
