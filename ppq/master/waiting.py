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

import functools
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from .. import rpc
from ..config import Config
from ..errors import StorageError
from ..store import Store
from ..task import FINAL_STATES, TaskSpec
from .checks import allow_of, worker_id_of
from .waiters import Deadlines, Parked, ParkedWaiter, Waiter, Waker

log = logging.getLogger("ppq.master")

# Most store calls one lease makes in a row while each stops after moving its most ids aside
# (a queue long with tasks of modules the worker may not run); then it waits as usual.
MAX_LOOKS = 100

# Seconds more than a parked long-poll's wait that a master's registration in the store's
# waiters lasts (renewed by the long-polls that find it about to end).
REGISTERED = 30.0

# Leases handed out by get_task / get_tasks / piggyback that this master remembers for
# finishes and errors sent without their lease (the seed's call shape); the oldest go first.
MAX_REMEMBERED_LEASES = 100_000


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
    # Parked long-polls (at most master.max_waiters), and their deadlines' timer (set by start_background).
    _parked: int
    _parked_lock: threading.Lock
    _full_logged: bool
    _timer: Deadlines | None
    # queue_index -> until when (monotonic) this master's registration in the store's waiters lasts.
    _registered: dict[int, float]

    if TYPE_CHECKING:
        def _store(self, queue_index: Any) -> Store: ...

    def _seen(self, worker_info: Any = None, wait: float = 0.0) -> float:
        """Seconds a worker counts as live after it was last heard from: three of its heartbeats
        (after the end of its long-poll, ``wait``, while one waits: an idle agent's long-polls are
        what keeps it listed), at most ``master.worker_ttl``."""
        interval = worker_info.get("heartbeat_interval") if isinstance(worker_info, Mapping) else None
        if not (isinstance(interval, (int, float)) and not isinstance(interval, bool) and 0 < interval <= 3600):
            interval = self.config.worker.heartbeat_interval
        return min(3 * float(interval) + 1 + wait, self.config.master.worker_ttl)

    def _lease(self, worker_info: Any, queue_index: Any, reports: list[dict[str, Any]], count: int,
               wait: float, strict: bool = False, failed: dict[str, list[int]] | None = None,
               hold: Callable[[list[bool], list[dict[str, Any]]], Any] | None = None
               ) -> tuple[list[bool], list[dict[str, Any]]]:
        """Record ``reports``, then lease up to ``count`` tasks, waiting up to ``wait`` seconds for some.

        With ``hold`` (the call's reply, given ``accepted`` and the tasks), a wait that finds
        nothing holds the call's reply instead of its thread (:meth:`_park`) and raises
        :class:`Parked`; the reply ``hold(accepted, tasks)`` is sent when the wait ends.
        """
        store = self._store(queue_index)
        wid = worker_id_of(worker_info)
        allow = allow_of(worker_info)
        waker = self.wakers[store.queue_index]
        generation = waker.generation
        seen = self._seen(worker_info, wait if count > 0 else 0.0)
        accepted, tasks, more = store.report(wid, reports, count, seen, strict, allow, failed)
        if more and not tasks and not (strict and not all(accepted)):
            tasks = self._look(store, wid, count, seen, allow)
        if log.isEnabledFor(logging.DEBUG):
            self._log_changes(store.queue_index, wid, reports, accepted, tasks)
        if count <= 0 or tasks or wait <= 0 or (strict and not all(accepted)):
            return accepted, tasks
        if hold is not None and self._timer is not None:
            tasks = self._park(store, waker, generation, wid, count, seen, allow, wait,
                               functools.partial(hold, accepted))
            return accepted, tasks
        return accepted, self._wait(store, waker, wid, count, seen, allow, wait)

    def _wait(self, store: Store, waker: Waker, wid: str, count: int, seen: float, allow: str,
              wait: float) -> list[dict[str, Any]]:
        """The long-poll in the calling thread: up to ``wait`` seconds for tasks."""
        # Register as a waiter first, then look again: a push in between is not missed.
        member = f"{self.id}:{threading.get_ident()}"
        store.add_waiter(member, wait)
        waiter = Waiter(wid, count, seen, allow)
        try:
            deadline = time.monotonic() + wait
            generation = waker.generation
            tasks = self._look(store, wid, count, seen, allow)
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
                tasks = self._look(store, wid, count, seen, allow)
            if tasks and log.isEnabledFor(logging.DEBUG):
                self._log_changes(store.queue_index, wid, [], [], tasks)
        finally:
            # With tasks in hand, reply first: the registration expires by itself.
            if not tasks:
                try:
                    store.remove_waiter(member)
                except StorageError:
                    pass
        return tasks

    def _park(self, store: Store, waker: Waker, generation: int, wid: str, count: int, seen: float, allow: str,
              wait: float, reply_of: Callable[[list[dict[str, Any]]], Any]) -> list[dict[str, Any]]:
        """The long-poll of a call whose reply can be held: return the tasks found at once, else
        park a :class:`ParkedWaiter` and raise :class:`Parked` (the call's thread goes back to
        the pool). ``generation``: the Waker's, read before the call's lease looked.

        Past ``master.max_waiters`` parked long-polls, one waits in its thread as before
        (``master.threadpool_size`` bounds those): returning at once with no task would
        have the agent ask again at once (its backoff is for errors), a busy loop.
        """
        held = None
        if self._parked < self.config.master.max_waiters:
            held = rpc.hold_reply()
        elif not self._full_logged:
            self._full_logged = True
            log.warning("%d long-polls are parked (master.max_waiters): more wait in a server thread each",
                        self._parked)
        if held is None:  # over the bound, or not a call whose reply can be held: wait in this thread
            return self._wait(store, waker, wid, count, seen, allow, wait)
        now = time.monotonic()
        if self._registered.get(store.queue_index, 0.0) < now + wait + 1:
            # Pushes elsewhere publish a wake-up only while a long-poll is registered in the store:
            # this master registers once for all its parked long-polls, for REGISTERED seconds
            # more than the wait (a master that stops leaves it to expire). Register first, then
            # look again: a push in between is not missed.
            store.add_waiter(self.id, wait + REGISTERED)
            self._registered[store.queue_index] = now + wait + REGISTERED
            generation = waker.generation
            tasks = self._look(store, wid, count, seen, allow)
            if tasks:
                return tasks
        waiter = ParkedWaiter(wid, count, seen, allow, held, self, store, now + wait, reply_of)
        waiter.quiet = max(seen - wait, 1.0)
        while not waker.park(waiter, generation):
            # Woken since the lease looked: look again.
            generation = waker.generation
            tasks = self._look(store, wid, count, seen, allow)
            if tasks or self._stop.is_set():
                return tasks  # the call replies itself: nobody else knows of ``held``
        with self._parked_lock:
            self._parked += 1
        held.on_abandon = functools.partial(self._abandoned, waiter)
        if self._timer is not None:
            self._timer.add(waiter)
        raise Parked

    def _answer(self, waiter: ParkedWaiter, tasks: list[dict[str, Any]]) -> None:
        """End a parked long-poll (taken off its Waker's idle list by the caller): reply with ``tasks``."""
        try:
            reply = waiter.reply_of(tasks)
        except Exception as exc:  # noqa: BLE001 - answered as the call would have failed
            self._settled(waiter, waiter.held.fail(rpc.client_error(exc, "report", waiter.held.client_is_ppq)))
            return
        # With tasks the agent reports soon: a pool thread waits for that request. Without, the
        # connection waits in the selector: at thousands of agents, a thread per empty reply
        # waiting for the agent's next long-poll adds up.
        sent = waiter.held.send(reply, again_soon=bool(tasks))
        self._settled(waiter, sent)
        if tasks and sent and log.isEnabledFor(logging.DEBUG):
            self._log_changes(waiter.store.queue_index, waiter.wid, [], [], tasks)
        if tasks and not sent:
            waiter.held.submit(self._hand_back, waiter.store, waiter.wid, tasks)

    def _settled(self, waiter: ParkedWaiter, replied: bool) -> None:
        if replied:
            with self._parked_lock:
                self._parked -= 1
                self._full_logged = False

    def _hand_back(self, store: Store, wid: str, tasks: list[dict[str, Any]]) -> None:
        """Tasks leased to a long-poll whose client went away: back to the queue at once."""
        reports = [{"id": t["id"], "lease": t["lease"], "ok": False, "result": b"", "error": "", "traceback": "",
                    "retry": True, "release": True} for t in tasks]
        try:
            store.report(wid, reports, 0, self._seen(), False)
        except StorageError as exc:
            log.warning("queue_index %s: cannot hand back %d tasks of a gone long-poll (%s); their lease "
                        "expires", store.queue_index, len(tasks), exc)

    def _abandoned(self, waiter: ParkedWaiter) -> None:
        """The client of a parked long-poll went away (the selector thread: no store calls here)."""
        self.wakers[waiter.store.queue_index].discard(waiter)
        self._settled(waiter, True)
        waiter.held.submit(self._cut_off, waiter)

    def _cut_off(self, waiter: ParkedWaiter) -> None:
        """A pool job: the worker of a long-poll whose client went away (killed, say) counts as
        live no longer than it would after a heartbeat now, instead of past the poll's end."""
        try:
            waiter.store.listed_at_most(waiter.wid, waiter.quiet)
        except StorageError:
            pass

    def _woken(self, waiter: ParkedWaiter) -> None:
        """A wake-up took a parked long-poll off its Waker's idle list: look for tasks in a pool thread."""
        if self._stop.is_set():
            self._answer(waiter, [])
        else:
            waiter.held.submit(self._rewake, waiter)

    def _rewake(self, waiter: ParkedWaiter) -> None:
        """A pool job: a woken parked long-poll looks for tasks; it replies with them, or waits
        on until its deadline (the timer replies then)."""
        if waiter.held.done:
            return
        store = waiter.store
        waker = self.wakers[store.queue_index]
        try:
            while True:
                generation = waker.generation
                tasks = self._look(store, waiter.wid, waiter.count, waiter.seen, waiter.allow)
                if tasks or waiter.released or self._stop.is_set() or time.monotonic() >= waiter.deadline:
                    break
                if waker.park(waiter, generation):
                    if self._timer is not None:
                        self._timer.add(waiter)
                    return
        except StorageError as exc:
            self._settled(waiter, waiter.held.fail(rpc.client_error(exc, "report", waiter.held.client_is_ppq)))
            return
        self._answer(waiter, tasks)

    def _expired(self, waiters: list[ParkedWaiter]) -> None:
        """The timer: these parked long-polls reached their deadline; those still idle reply empty."""
        for waiter in waiters:
            if self.wakers[waiter.store.queue_index].discard(waiter):
                self._answer(waiter, [])

    def _look(self, store: Store, wid: str, count: int, seen: float, allow: str) -> list[dict[str, Any]]:
        """Lease up to ``count`` tasks with nothing to report; ask again at once (MAX_LOOKS times at
        most) while the store's lease stops after moving its most ids aside: the queue may
        still hold tasks this worker may run behind those it may not."""
        for _ in range(MAX_LOOKS):
            _, tasks, more = store.report(wid, [], count, seen, False, allow)
            if tasks or not more:
                break
        return tasks

    def _log_changes(self, qi: int, wid: str, reports: list[dict[str, Any]], accepted: list[bool],
                     tasks: list[dict[str, Any]]) -> None:
        for report, ok in zip(reports, accepted, strict=True):
            outcome = "handed back" if report.get("release") else ("finished" if report["ok"] else "failed")
            log.debug("queue_index %s: task %s %s by %s%s", qi, report["id"], outcome, wid,
                      "" if ok else " (refused: lease lost)")
        for task in tasks:
            log.debug("queue_index %s: task %s %s.%s leased to %s", qi, task["id"], task["module"], task["func"], wid)

    def _push(self, queue_index: int, specs: list[TaskSpec]) -> list[str]:
        """Store tasks; when one is ready at once and a long-poll waits here, lease to it in the same step.

        This master's own long-polls learn of the other ready tasks from it, not from Redis: the
        push publishes a wake-up only for other masters' long-polls.
        """
        store = self.stores[queue_index]
        waker = self.wakers[queue_index]
        waiter = None
        ready = sum(1 for spec in specs if not spec.delay)
        if ready:
            waiter = waker.claim(next(spec for spec in specs if not spec.delay).module)
        if waiter is None:
            ids = store.push(specs, me=self.id)[0]
            if ready:
                waker.wake(ready)
            return ids
        tasks: list[dict[str, Any]] = []
        try:
            ids, tasks = store.push(specs, (waiter.wid, waiter.count, waiter.seen, waiter.allow), me=self.id)
        finally:
            waiter.hand(tasks)
        if ready > len(tasks):
            waker.wake(ready - len(tasks))
        if tasks and not isinstance(waiter, ParkedWaiter):
            # (A parked waiter's reply was sent by hand() itself.)
            # Let the waiter's thread send the tasks before this one replies to the pusher:
            # without this it waits for the GIL until that reply is out (about 0.1 ms more
            # from push to start; bench/run.py's latency phase).
            time.sleep(0)
        return ids

    def _listen(self, qi: int, store: Store) -> None:
        """The wake-up listener of one store (a background thread): wakes waiters when tasks are
        made ready elsewhere, and the wait_task(s) calls of tasks that end."""

        def finished(task_id: str) -> None:
            with self._watch_lock:
                events = self._watchers.get((qi, task_id), ())
                for event in events:
                    event.set()

        waker = self.wakers[qi]

        def wake(count: int) -> None:
            if count <= 0:  # (re)connected: the store may have lost this master's registration
                self._registered.pop(qi, None)
            waker.wake(count)

        store.listen(wake, finished, self._stop)

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
