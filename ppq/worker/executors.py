"""Executors: where tasks run, and the :class:`Slot` through which the agent drives one.

An executor is a process (``pool: processes``, the default) or a thread
(``pool: threads``). The agent sends it a batch of tasks at a time; it runs them
in order with :func:`execute` and sends back one report per task. Targets are
found by :func:`resolve` (from :mod:`ppq.task`), which checks the allowlists
before it imports anything.
"""

from __future__ import annotations

import importlib
import logging
import multiprocessing
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .. import codec
from ..allow import resolve
from ..errors import CodecError, NotAllowedError
from .hooks import call_hooks, has_hooks, task_context

log = logging.getLogger("ppq.worker")

__all__ = ["MAX_EXECUTOR_BATCH", "ProcessSlot", "Running", "Slot", "ThreadSlot", "execute", "resolve"]

# Seconds an executor may hold finished results before sending them to the agent.
_FLUSH_AFTER = 0.02
# Most tasks handed to one executor at once.
MAX_EXECUTOR_BATCH = 64


# -- running one task (in an executor) ---------------------------------------


def execute(task: dict[str, Any], allowed_modules: list[str], allowed_paths: list[str],
            allow_pickle: bool) -> dict[str, Any]:
    """Run one task; return its report (without lease) for the master."""
    started = time.time()
    report: dict[str, Any] = {"id": task["id"], "started": started}
    fn = None
    try:
        fn = resolve(task["module"], task["func"], task.get("fclass") or "", task.get("path") or "",
                     allowed_modules, allowed_paths)
        args, kwargs = codec.decode_parameters(task["parameters"], allow_pickle, "worker.allow_pickle")
        value = fn(*args, **kwargs)
        try:
            report["result_bytes"] = codec.encode(value, use_pickle=allow_pickle)
            report["ok"] = True
        except CodecError as exc:
            report.update(ok=False, error=f"CodecError: the return value cannot be stored: {exc}",
                          traceback="", retry=False)
    except NotAllowedError as exc:
        report.update(ok=False, error=f"NotAllowedError: {exc}", traceback="", retry=False)
    except BaseException as exc:  # noqa: BLE001 - a task's failure of any kind is reported
        report.update(ok=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(),
                      retry=True)
    if fn is None:
        report["refused"] = True  # for the agent's figures only; not sent to the master
    report["duration"] = time.time() - started
    return report


def _start(task: dict[str, Any], allowed_modules: list[str], allowed_paths: list[str], allow_pickle: bool,
           queue_index: int) -> dict[str, Any]:
    """Run the ``on_task_executing`` hooks for ``task``, the task itself, then the ``on_task_executed``
    hooks; return its report."""
    context = None
    if has_hooks("on_task_executing"):
        context = task_context(task, queue_index, allow_pickle)
        call_hooks("on_task_executing", context)
    report = execute(task, allowed_modules, allowed_paths, allow_pickle)
    if has_hooks("on_task_executed"):
        call_hooks("on_task_executed", context or task_context(task, queue_index, allow_pickle))
    return report


def _import_allowed(allowed_modules: Sequence[str]) -> None:
    """Import the allowed modules while the agent connects, so the first task does not wait for it.

    Only names of modules (not ``*``); one that fails is left for its first task to report.
    """
    for name in allowed_modules:
        if name in sys.modules or not all(part.isidentifier() for part in name.split(".")):
            continue
        try:
            importlib.import_module(name)
        except BaseException:  # noqa: BLE001 - whatever it is, the task that needs the module reports it
            log.debug("executor: importing %s ahead of its tasks failed", name, exc_info=True)


def _claim(progress: Any, lock: Any, generation: float, index: int) -> bool:
    """Start task ``index`` of batch ``generation`` if the agent has not taken it back (see ``Slot.steal``)."""
    while not lock.acquire(timeout=1.0):
        # The agent holds the lock for microseconds: if it died holding it, this executor is an orphan.
        parent = multiprocessing.parent_process()
        if parent is not None and not parent.is_alive():
            return False
    try:
        if progress[3] != generation or index >= progress[2]:
            return False
        progress[1] = time.monotonic()
        progress[0] = index
        return True
    finally:
        lock.release()


def _executor_main(conn: Any, progress: Any, lock: Any, allowed_modules: list[str], allowed_paths: list[str],
                   allow_pickle: bool, queue_index: int, preload: Sequence[str],
                   inherited: Sequence[Any] = ()) -> None:
    """An executor process: run the batches of tasks the agent sends until it sends None.

    ``progress`` is shared memory (see :class:`Slot`), guarded by ``lock``: the
    agent reads it to enforce timeouts and writes ``end`` to take back tasks not
    started yet. Results go back in small groups, at once for a task that took a while.
    ``preload`` names the modules to import before the first task (the allowed
    ones and the autodiscovered ``tasks`` modules, which may register hooks).
    """
    # A forked executor holds copies of the agent's ends of the pipes: closed, so that
    # the agent's exit reaches it as end of file.
    for other in inherited:
        other.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for name in ("SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    _import_allowed(preload)
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        generation, tasks = batch
        done: list[dict[str, Any]] = []
        flushed = time.monotonic()
        index = 0
        while _claim(progress, lock, generation, index):
            done.append(_start(tasks[index], allowed_modules, allowed_paths, allow_pickle, queue_index))
            index += 1
            now = time.monotonic()
            if now - flushed > _FLUSH_AFTER or now - progress[1] > _FLUSH_AFTER:
                conn.send(done)
                done = []
                flushed = now
        if done:
            conn.send(done)


# -- executor slots -------------------------------------------------------------


@dataclass
class Running:
    """A leased task held by the agent; ``lost`` once the master said its lease is gone."""

    task: dict[str, Any]
    lost: bool = False


class Slot(Protocol):
    """How the agent drives one executor, whatever it is (process or thread).

    ``batch`` lists the tasks sent, in order; the first ``received`` of them have
    reported. ``progress`` is ``[index in the batch of the task running now, its
    start on the monotonic clock, end, generation]``: the executor writes the
    first two as it starts each task, but only while the index is below ``end``
    and the batch is the current ``generation``, checked under ``lock``; so the
    agent can lower ``end`` to take back tasks not started yet (:meth:`steal`).
    Every method is called from the agent's main thread with the pool's ``cond``
    held, except ``current`` and ``pending``, which the heartbeat and control
    threads read.
    """

    index: int
    progress: Any
    lock: Any
    batch: list[Running]
    received: int

    @property
    def pid(self) -> int | None:
        """The executor's process id; None for a thread."""

    @property
    def idle(self) -> bool:
        """No task handed to it is waiting for its report."""

    def pending(self) -> list[Running]:
        """The tasks handed to it that have not reported yet."""

    def current(self) -> tuple[Running, float] | None:
        """The task running now and its start (monotonic), if it can be told."""

    def unstarted(self) -> int:
        """How many tasks of the batch the executor has not started yet (a hint: it may start one now)."""

    def assign(self, tasks: list[Running]) -> None:
        """Hand an idle executor a batch of tasks."""

    def steal(self, count: int) -> list[Running]:
        """Take back up to ``count`` tasks from the end of the batch that the executor has not started."""

    def take(self, reports: list[dict[str, Any]]) -> list[tuple[Running, dict[str, Any]]]:
        """Match reports to the batch in order; the batch is cleared once all have reported."""

    def poll(self) -> list[dict[str, Any]] | None:
        """The reports that arrived since the last poll, without waiting; None if none."""

    def waitables(self) -> list[Any]:
        """Objects for ``multiprocessing.connection.wait`` that become ready when it has news."""

    def dead(self) -> bool:
        """The executor has exited."""

    def exitcode(self) -> int | None:
        """Its exit code, for the log (None for a thread)."""

    def kill(self) -> None:
        """Stop it now, whatever it runs (a thread is abandoned)."""

    def close(self) -> None:
        """Ask it to exit once idle, and wait a little for it."""


class _Batch:
    """The batch bookkeeping that both kinds of slot share."""

    progress: Any
    lock: Any

    def __init__(self) -> None:
        self.batch: list[Running] = []
        self.received = 0
        self.generation = 0

    @property
    def idle(self) -> bool:
        return not self.batch

    def pending(self) -> list[Running]:
        return self.batch[self.received:]

    def current(self) -> tuple[Running, float] | None:
        if not self.batch:
            return None
        index = int(self.progress[0])
        if index < self.received or index >= len(self.batch):
            return None
        return self.batch[index], float(self.progress[1])

    def unstarted(self) -> int:
        if not self.batch:
            return 0
        return len(self.batch) - max(int(self.progress[0]) + 1, self.received)

    def assign(self, tasks: list[Running]) -> None:
        self.batch = tasks
        self.received = 0
        self.generation += 1
        if not self.lock.acquire(timeout=1.0):
            raise OSError("the executor does not let go of its lock")
        try:
            self.progress[0] = -1
            self.progress[1] = 0.0
            self.progress[2] = len(tasks)
            self.progress[3] = self.generation
        finally:
            self.lock.release()
        self.send((self.generation, [r.task for r in tasks]))

    def steal(self, count: int) -> list[Running]:
        if count <= 0 or not self.batch:
            return []
        # The executor holds the lock for a few microseconds; one that does not let go has died.
        if not self.lock.acquire(timeout=1.0):
            return []
        try:
            keep = max(int(self.progress[0]) + 1, self.received, len(self.batch) - count)
            if keep >= len(self.batch):
                return []
            self.progress[2] = keep
        finally:
            self.lock.release()
        taken = self.batch[keep:]
        del self.batch[keep:]
        if self.received >= len(self.batch):
            self.batch = []
            self.received = 0
        return taken

    def take(self, reports: list[dict[str, Any]]) -> list[tuple[Running, dict[str, Any]]]:
        pairs = []
        for report in reports:
            if self.received < len(self.batch):
                pairs.append((self.batch[self.received], report))
                self.received += 1
        if self.received >= len(self.batch):
            self.batch = []
            self.received = 0
        return pairs

    def send(self, batch: tuple[int, list[dict[str, Any]]]) -> None:
        raise NotImplementedError


class ProcessSlot(_Batch):
    """One executor process."""

    def __init__(self, index: int, ctx: Any, options: tuple[Any, ...], siblings: Sequence[ProcessSlot] = ()
                 ) -> None:
        super().__init__()
        self.index = index
        self.progress = ctx.Array("d", 4, lock=False)
        self.lock = ctx.Lock()
        self.conn, child = ctx.Pipe()
        # Forked (not from the fork server): the agent's ends of its pipes are inherited.
        inherited = [self.conn, *(s.conn for s in siblings)] if ctx.get_start_method() == "fork" else []
        self.process = ctx.Process(target=_executor_main, args=(child, self.progress, self.lock, *options, inherited),
                                   name=f"ppq-executor-{index}", daemon=True)
        self.process.start()
        child.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def waitables(self) -> list[Any]:
        return [self.conn, self.process.sentinel]

    def send(self, batch: tuple[int, list[dict[str, Any]]]) -> None:
        self.conn.send(batch)

    def poll(self) -> list[dict[str, Any]] | None:
        reports: list[dict[str, Any]] = []
        try:
            while self.conn.poll():
                reports.extend(self.conn.recv())
        except (EOFError, OSError):
            pass
        return reports or None

    def dead(self) -> bool:
        return not self.process.is_alive()

    def exitcode(self) -> int | None:
        return self.process.exitcode

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(5)
        self.conn.close()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, ValueError):
            pass
        self.process.join(2)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(2)
        self.conn.close()


class ThreadSlot(_Batch):
    """One executor thread. A thread cannot be killed: on timeout it is abandoned."""

    @property
    def pid(self) -> int | None:
        return None

    def __init__(self, index: int, wake: Callable[[], None], options: tuple[Any, ...]) -> None:
        super().__init__()
        self.index = index
        self.options = options
        self.progress = [-1.0, 0.0, 0.0, 0.0]
        self.lock = threading.Lock()
        self._wake = wake
        self._tasks: queue.SimpleQueue[tuple[int, list[dict[str, Any]]] | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._abandoned = False
        self.thread = threading.Thread(target=self._loop, name=f"ppq-executor-{index}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            batch = self._tasks.get()
            if batch is None or self._abandoned:
                return
            generation, tasks = batch
            index = 0
            while _claim(self.progress, self.lock, generation, index):
                report = _start(tasks[index], *self.options[:4])
                index += 1
                if self._abandoned:
                    return
                self._results.put(report)
                self._wake()

    def waitables(self) -> list[Any]:
        return []

    def send(self, batch: tuple[int, list[dict[str, Any]]]) -> None:
        self._tasks.put(batch)

    def poll(self) -> list[dict[str, Any]] | None:
        reports = []
        while True:
            try:
                reports.append(self._results.get_nowait())
            except queue.Empty:
                return reports or None

    def dead(self) -> bool:
        return not self.thread.is_alive()

    def exitcode(self) -> int | None:
        return None

    def kill(self) -> None:
        self._abandoned = True
        self._tasks.put(None)

    def close(self) -> None:
        self._tasks.put(None)
