"""The threads that serve ppq's authenticated connections."""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ppq.rpc")

# Pool threads kept even when idle; others end after IDLE_THREAD seconds without work.
MIN_THREADS = 8
IDLE_THREAD = 60.0

Job = tuple[Callable[..., None], tuple[Any, ...]]


class _Idle:
    """A pool thread waiting for work: ``gate`` is held until a job (or None: end) is handed to it."""

    __slots__ = ("gate", "job")

    def __init__(self) -> None:
        self.gate = threading.Lock()
        self.gate.acquire()
        self.job: Job | None = None


class Pool:
    """Threads that serve connections; grows up to ``size`` while work waits, shrinks when idle.

    A job goes to the thread that became idle last (a stack, not a queue): after a burst of
    thousands of connections, the few threads the steady load needs stay busy and warm, and the
    others end after IDLE_THREAD seconds, instead of every thread getting a job now and then
    and none ever ending.
    """

    def __init__(self, size: int, name: str) -> None:
        self.size = max(size, MIN_THREADS)
        self.name = name
        self._jobs: collections.deque[Job] = collections.deque()
        self._idle: list[_Idle] = []
        self._lock = threading.Lock()
        self._threads = 0
        self._closed = False

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            if self._idle:
                idle = self._idle.pop()
                idle.job = (fn, args)
                idle.gate.release()
                return
            self._jobs.append((fn, args))
            grow = self._threads < self.size and not self._closed
            if grow:
                self._threads += 1
                number = self._threads
        if grow:
            try:
                threading.Thread(target=self._run, name=f"{self.name}-{number}", daemon=True).start()
            except RuntimeError as exc:  # out of threads or memory: the queued work waits for a free thread
                with self._lock:
                    self._threads -= 1
                log.warning("cannot start a server thread (%s); %d serving", exc, self._threads)

    def _next(self, idle: _Idle) -> Job | None:
        """The next job for this thread, waiting for one; None when the thread should end."""
        with self._lock:
            if self._jobs:
                return self._jobs.popleft()
            if self._closed:
                self._threads -= 1
                return None
            self._idle.append(idle)
        while not idle.gate.acquire(timeout=IDLE_THREAD):
            with self._lock:
                if idle in self._idle:  # nothing was handed to it: end, unless the pool is at its floor
                    if self._threads > MIN_THREADS:
                        self._idle.remove(idle)
                        self._threads -= 1
                        return None
                    continue
            # A job was handed to it as the wait ended: its gate is released, or about to be.
        job, idle.job = idle.job, None
        if job is None:
            with self._lock:
                self._threads -= 1
        return job

    def _run(self) -> None:
        idle = _Idle()
        while True:
            job = self._next(idle)
            if job is None:
                return
            fn, args = job
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a job's failure must not end the thread
                log.exception("server thread: unexpected error")

    def close(self) -> None:
        """No new threads; idle ones end now, busy ones once the queued work is done."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for waiting in idle:
            waiting.job = None
            waiting.gate.release()
