"""Waiting and hand-off: the long-polls of workers and clients waiting on this master.

- A worker's long-poll (``get_task(s)`` or ``report`` with ``wait``) registers a
  :class:`Waiter` with the :class:`Waker` of its queue_index and sleeps on its event.
- A push on this master claims the longest-waiting waiter and leases tasks to it in
  the push's own script (:meth:`Waiting._push`): the hand-off.
- Tasks made ready elsewhere (another master's push, a retry, the mover, the
  reaper) arrive as a published count on the store's wake channel and wake that
  many waiters (:meth:`Waiting._listen`); they then look for tasks themselves.
- A client's ``wait_task(s)`` waits for a task's finished message (:meth:`Waiting._wait_final`).
- Leases handed to a caller are remembered for its reports sent without their lease
  (the seed's call shape).

:class:`Waiting` is a base class of :class:`~ppq.master.exposed.Master`, whose
``__init__`` sets the state it uses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .. import rpc
from ..config import Config
from ..errors import StorageError
from ..store import Store
from ..task import FINAL_STATES, TaskSpec
from .checks import worker_id_of

log = logging.getLogger("ppq.master")

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


class Waiting:
    """The long-poll, hand-off and wake-up half of :class:`~ppq.master.exposed.Master`."""

    # Set by Master.__init__.
    config: Config
    stores: dict[int, Store]
    wakers: dict[int, Waker]
    id: str
    _stop: threading.Event
    _reply_bytes: int
    _watchers: dict[tuple[int, str], list[threading.Event]]
    _watch_lock: threading.Lock
    _handed: OrderedDict[tuple[int, str], tuple[str, str, str]]
    _handed_lock: threading.Lock

    if TYPE_CHECKING:
        def _store(self, queue_index: Any) -> Store: ...

    def _seen(self, worker_info: Any = None) -> float:
        """Seconds a worker counts as live after it was last heard from: three of its heartbeats,
        at most ``master.worker_ttl``."""
        interval = worker_info.get("heartbeat_interval") if isinstance(worker_info, Mapping) else None
        if not (isinstance(interval, (int, float)) and not isinstance(interval, bool) and 0 < interval <= 3600):
            interval = self.config.worker.heartbeat_interval
        return min(3 * float(interval) + 1, self.config.master.worker_ttl)

    def _lease(self, worker_info: Any, queue_index: Any, reports: list[dict[str, Any]], count: int,
               wait: float, strict: bool = False, failed: dict[str, list[int]] | None = None
               ) -> tuple[list[bool], list[dict[str, Any]]]:
        store = self._store(queue_index)
        wid = worker_id_of(worker_info)
        waker = self.wakers[store.queue_index]
        generation = waker.generation
        accepted, tasks = store.report(wid, reports, count, self._seen(worker_info), strict, failed)
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

    def _listen(self, qi: int, store: Store) -> None:
        """The wake-up listener of one store (a background thread): wakes waiters when tasks are
        made ready elsewhere, and the wait_task(s) calls of tasks that end."""

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
