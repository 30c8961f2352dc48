"""The waiting long-polls of one master: :class:`Waiter` (one long-poll, waiting in its thread),
:class:`ParkedWaiter` (one waiting without a thread, its reply held), :class:`Waker` (the idle
long-polls of one queue_index: claimed by a push, woken by a wake-up) and :class:`Deadlines`
(the parked long-polls' timer). :class:`~ppq.master.waiting.Waiting` drives them.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import rpc
from ..store import Store
from .checks import spec_allows

if TYPE_CHECKING:
    from .waiting import Waiting

log = logging.getLogger("ppq.master")


class Waiter:
    """One long-poll waiting on this master: woken, or handed tasks leased by a push."""

    __slots__ = ("wid", "count", "seen", "allow", "order", "event", "tasks", "released")

    def __init__(self, wid: str, count: int, seen: float, allow: str) -> None:
        self.wid = wid
        self.count = count
        self.seen = seen
        # The modules the worker runs (checks.allow_of): a push hands tasks only to a waiter that may run them.
        self.allow = allow
        # When it became idle, in the Waker's count: the smallest has waited longest.
        self.order = 0
        self.event = threading.Event()
        # Set by release_worker: the worker is stopping, the long-poll returns empty at once.
        self.released = False
        # Set, with the event, by a push that claimed this waiter: the tasks it leased to it.
        self.tasks: list[dict[str, Any]] | None = None

    def hand(self, tasks: list[dict[str, Any]]) -> None:
        self.tasks = tasks
        self.event.set()

    def wake(self) -> None:
        self.event.set()

    def release(self) -> None:
        self.released = True
        self.event.set()


class ParkedWaiter(Waiter):
    """A long-poll waiting without a thread: its reply is held (``rpc.HeldReply``) and sent by
    whoever ends the wait: a push's hand-off, a wake-up's look, the deadline, release_worker,
    the master's stop (:class:`Waiting`). Exactly one reply goes out (the HeldReply's claim)."""

    __slots__ = ("held", "owner", "store", "deadline", "reply_of", "quiet")

    def __init__(self, wid: str, count: int, seen: float, allow: str, held: rpc.HeldReply, owner: Waiting,
                 store: Store, deadline: float, reply_of: Callable[[list[dict[str, Any]]], Any]) -> None:
        # No event: nothing waits on one (Waiter.__init__ is not called).
        self.wid = wid
        self.count = count
        self.seen = seen
        self.allow = allow
        self.order = 0
        self.released = False
        self.tasks = None
        self.held = held
        self.owner = owner
        self.store = store
        self.deadline = deadline
        # The call's reply, given the tasks leased: the same dict the method returns when it does not wait.
        self.reply_of = reply_of
        # Seconds its worker counts as live after a call that does not wait (``seen`` less the wait).
        self.quiet = seen

    def __lt__(self, other: ParkedWaiter) -> bool:  # heap order on equal deadlines
        return id(self) < id(other)

    def hand(self, tasks: list[dict[str, Any]]) -> None:
        self.owner._answer(self, tasks)

    def wake(self) -> None:
        self.owner._woken(self)

    def release(self) -> None:
        self.released = True
        self.owner._answer(self, [])


class Parked(Exception):  # noqa: N818 - not an error: the long-poll's reply is held
    """Raised by ``Waiting._lease`` when the long-poll waits without a thread: reply ``rpc.HELD``."""


class Waker:
    """The long-polls of one queue_index waiting on this master.

    A push on this master claims the longest-waiting one that may run its tasks and
    leases tasks to it in the push's own script (:meth:`claim`); tasks made ready
    elsewhere arrive as a published count and wake that many (:meth:`wake`), that many
    of each allow spec when the waiters do not all run the same modules.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.generation = 0
        self.idle: dict[Waiter, None] = {}
        # The idle waiters by allow spec, each in the order they became idle.
        self.by_allow: dict[str, dict[Waiter, None]] = {}
        # The idle waiters by worker id (release_worker ends a worker's own).
        self.by_wid: dict[str, dict[Waiter, None]] = {}
        self._order = 0

    def wake(self, count: int) -> None:
        """Wake ``count`` idle waiters (all when ``count`` <= 0) to look for tasks: ``count`` of each
        allow spec when they do not all run the same modules (a count does not say whose
        tasks were made ready)."""
        woken: list[Waiter] = []
        with self.lock:
            self.generation += 1
            if count <= 0:
                count = len(self.idle)
            if len(self.by_allow) > 1:
                for group in list(self.by_allow.values()):
                    for waiter in list(itertools.islice(group, count)):
                        self._discard(waiter)
                        woken.append(waiter)
            else:
                for _ in range(min(count, len(self.idle))):
                    woken.append(self._take())
        for waiter in woken:
            waiter.wake()

    def claim(self, module: str = "") -> Waiter | None:
        """Take the longest-waiting idle waiter that may run ``module``; the caller must ``hand()``
        it its tasks."""
        with self.lock:
            if not self.idle:
                return None
            if len(self.by_allow) == 1:
                waiter = next(iter(self.idle))
                if not spec_allows(waiter.allow, module):
                    return None
            else:
                firsts = [next(iter(group)) for spec, group in self.by_allow.items() if spec_allows(spec, module)]
                if not firsts:
                    return None
                waiter = min(firsts, key=lambda w: w.order)
            self._discard(waiter)
            return waiter

    def release(self, wid: str) -> int:
        """End the waits of worker ``wid`` (it is stopping); return how many there were."""
        with self.lock:
            mine = list(self.by_wid.get(wid, ()))
            for waiter in mine:
                self._discard(waiter)
        for waiter in mine:
            waiter.release()
        return len(mine)

    def park(self, waiter: Waiter, generation: int) -> bool:
        """List ``waiter`` as idle, unless a wake-up came after ``generation`` (False: look again)."""
        with self.lock:
            if self.generation != generation:
                return False
            self._add(waiter)
            return True

    def discard(self, waiter: Waiter) -> bool:
        """Take ``waiter`` off the idle lists; True if it was on them (then the caller ends its wait)."""
        with self.lock:
            return self._discard(waiter)

    def _take(self) -> Waiter:
        """Remove and return the longest-waiting idle waiter (``self.lock`` held)."""
        waiter = next(iter(self.idle))
        self._discard(waiter)
        return waiter

    def _add(self, waiter: Waiter) -> None:
        """List ``waiter`` as idle (``self.lock`` held)."""
        self._order += 1
        waiter.order = self._order
        self.idle[waiter] = None
        self.by_allow.setdefault(waiter.allow, {})[waiter] = None
        self.by_wid.setdefault(waiter.wid, {})[waiter] = None

    def _discard(self, waiter: Waiter) -> bool:
        """Take ``waiter`` off the idle lists; False if it was not on them (``self.lock`` held)."""
        if self.idle.pop(waiter, True) is not None:
            return False
        group = self.by_allow[waiter.allow]
        del group[waiter]
        if not group:
            del self.by_allow[waiter.allow]
        mine = self.by_wid[waiter.wid]
        del mine[waiter]
        if not mine:
            del self.by_wid[waiter.wid]
        return True

    def wait(self, waiter: Waiter, generation: int, timeout: float) -> list[dict[str, Any]] | None:
        """Wait until woken, handed tasks (returned) or ``timeout``; at once if a wake-up
        came after ``generation``."""
        with self.lock:
            if self.generation != generation:
                return None
            waiter.event.clear()
            waiter.tasks = None
            self._add(waiter)
        if not waiter.event.wait(timeout):
            with self.lock:
                if self._discard(waiter):
                    return None
            # Woken or claimed just now: a claim always ends in hand().
            waiter.event.wait()
        return waiter.tasks


# Seconds the deadline timer may answer a parked long-poll late, to end those due together at once.
SLACK = 0.02


class Deadlines:
    """The one timer thread of a master's parked long-polls: a heap of their deadlines."""

    def __init__(self, expired: Callable[[list[ParkedWaiter]], None], stop: threading.Event) -> None:
        self._expired = expired
        self._stop = stop
        self._heap: list[tuple[float, ParkedWaiter]] = []
        self._cond = threading.Condition(threading.Lock())

    def add(self, waiter: ParkedWaiter) -> None:
        with self._cond:
            heapq.heappush(self._heap, (waiter.deadline, waiter))
            if self._heap[0][1] is waiter:
                self._cond.notify()

    def wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def run(self) -> None:
        while not self._stop.is_set():
            due: list[ParkedWaiter] = []
            with self._cond:
                now = time.monotonic()
                while self._heap and self._heap[0][0] <= now:
                    due.append(heapq.heappop(self._heap)[1])
                if not due:
                    # Up to SLACK late, never early: the long-polls due within it end in one batch.
                    self._cond.wait(min(1.0, self._heap[0][0] - now + SLACK) if self._heap else 1.0)
                    continue
            try:
                self._expired(due)
            except Exception:  # noqa: BLE001 - the timer must keep running
                log.exception("ending expired long-polls failed")
