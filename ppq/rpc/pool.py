"""The threads that serve ppq's authenticated connections."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("ppq.rpc")

# Pool threads kept even when idle; others end after IDLE_THREAD seconds without work.
MIN_THREADS = 8
IDLE_THREAD = 60.0

class Pool:
    """Threads that serve connections; grows up to ``size`` while work waits, shrinks when idle."""

    def __init__(self, size: int, name: str) -> None:
        self.size = max(size, MIN_THREADS)
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._queued = 0
        self._closed = False

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            self._queued += 1
            grow = self._queued > self._idle and self._threads < self.size and not self._closed
            if grow:
                self._threads += 1
        self._jobs.put((fn, args))
        if grow:
            try:
                threading.Thread(target=self._run, name=f"{self.name}-{self._threads}", daemon=True).start()
            except RuntimeError as exc:  # out of threads or memory: the queued work waits for a free thread
                with self._lock:
                    self._threads -= 1
                log.warning("cannot start a server thread (%s); %d serving", exc, self._threads)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=IDLE_THREAD)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._threads > MIN_THREADS or self._closed:
                        self._threads -= 1
                        return
                continue
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            if job is None:
                with self._lock:
                    self._threads -= 1
                return
            fn, args = job
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a job's failure must not end the thread
                log.exception("server thread: unexpected error")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            count = self._threads
        for _ in range(count):
            self._jobs.put(None)
