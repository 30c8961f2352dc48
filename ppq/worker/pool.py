"""The pool: the agent's executors and the tasks it holds.

It decides how many tasks the agent may hold (capacity, shared by the fetcher,
the reporter and the supervisor), hands waiting tasks to idle executors, collects
their reports, replaces executors that die and enforces task timeouts. Its
``cond`` guards the inbox and the slots' batches.
"""

from __future__ import annotations

import collections
import logging
import multiprocessing
import multiprocessing.connection
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .executors import MAX_EXECUTOR_BATCH, ProcessSlot, Running, Slot, ThreadSlot
from .hooks import call_hooks, executor_preload, has_hooks, task_context
from .stats import Counters, task_name

if TYPE_CHECKING:
    from ..config import Config

log = logging.getLogger("ppq.worker")

# Seconds after which a running task holds nothing behind it: its executor's tasks not started yet
# go to other executors and, with automatic prefetch when every executor is so held, back to the
# master, where an idle worker takes them.
STALLED_AFTER = 1.0


class Pool:
    """``concurrency`` executors, the inbox of leased tasks waiting for one, and the counters."""

    def __init__(self, config: Config, concurrency: int, allowed_modules: list[str],
                 stopping: Callable[[], bool], wake: Callable[[], None]) -> None:
        w = config.worker
        self.config = config
        self.queue_index = w.queue_index
        self.concurrency = concurrency
        self.prefetch = w.prefetch
        self.task_timeout = w.task_timeout
        # What an executor needs: the allowlists, the codec option, the queue_index for hooks, and the
        # modules to import before its first task (autodiscovered ``tasks`` modules register hooks).
        # A framework's set-up (hooks.preload_in_executors) comes first.
        preload = [*executor_preload(), *allowed_modules, *(f"{package}.tasks" for package in w.autodiscover)]
        self.options = (allowed_modules, list(w.allowed_paths), w.allow_pickle, w.queue_index, preload)
        self._stopping = stopping
        self._wake = wake
        self.cond = threading.Condition()
        self.inbox: collections.deque[dict[str, Any]] = collections.deque()
        self.reserved = 0
        self.slots: list[Slot] = []
        self.counters = Counters()
        # The names of failed tasks whose report is on its way, for the reporter's log line.
        self.failing: dict[str, str] = {}
        self.mean_duration: float | None = None
        # Executors whose task has run STALLED_AFTER seconds or more (as of the last supervision).
        self.stalled = 0
        # Where finished tasks' reports go (the reporter's outbox) and the metrics, set by the agent.
        self.report: Callable[[dict[str, Any]], None] = lambda report: None
        self.metrics: Any = None
        self._mp: Any = None

    # -- capacity shared by fetcher, reporter and supervisor --

    def busy(self) -> int:
        """Tasks handed to executors that have not reported yet."""
        return sum(len(s.batch) - s.received for s in self.slots)

    def ahead(self) -> int:
        """How many tasks to hold beyond one per executor.

        ``worker.prefetch`` when set (0 = none); by default it follows the mean
        task duration: many while tasks are short, none once they take a while, so
        long tasks are not held back from other workers; and only for the
        executors that are not held by a long task.
        """
        if self.prefetch >= 0:
            return self.prefetch
        mean = self.mean_duration
        active = max(self.concurrency - self.stalled, 0)
        if mean is None:
            return active
        if mean < 0.01:
            return 64 * active
        if mean < 0.1:
            return 4 * active
        return 0

    def free(self) -> int:
        return self.concurrency + self.ahead() - self.busy() - len(self.inbox) - self.reserved

    def reserve(self, block: bool) -> int:
        with self.cond:
            while block and self.free() <= 0 and not self._stopping():
                self.cond.wait(0.5)
            if self._stopping():
                return 0
            n = max(self.free(), 0)
            self.reserved += n
            return n

    def accept(self, reserved: int, tasks: list[dict[str, Any]]) -> None:
        """Take leased tasks: straight to idle executors, the rest wait in the inbox."""
        with self.cond:
            self.reserved -= reserved
            self.inbox.extend(tasks)
            if tasks and not self._stopping() and self.slots:
                self.dispatch()

    def running_tasks(self) -> list[tuple[Slot, Running, float | None]]:
        """(slot, task, start) for each task an executor is running now."""
        out: list[tuple[Slot, Running, float | None]] = []
        for slot in list(self.slots):
            current = slot.current()
            if current is not None:
                out.append((slot, current[0], current[1]))
        return out

    # -- executors --

    def _new_slot(self, index: int) -> Slot:
        if self.config.worker.pool == "threads":
            return ThreadSlot(index, self._wake, self.options)
        return ProcessSlot(index, self._mp, self.options)

    def start_executors(self) -> None:
        if self.config.worker.pool != "processes":
            self.slots = [self._new_slot(i) for i in range(self.concurrency)]
            return
        self._mp = multiprocessing.get_context("forkserver")
        self._mp.set_forkserver_preload(["ppq.worker"])
        # The first executors are forked from this process while it has no other thread,
        # which is safe and saves starting the fork server (a fresh interpreter) before
        # the first task can run; replacements, forked later, come from the fork server.
        first = self._mp
        if sys.platform == "linux" and threading.active_count() == 1:
            first = multiprocessing.get_context("fork")
        slots: list[ProcessSlot] = []
        for i in range(self.concurrency):
            slots.append(ProcessSlot(i, first, self.options, slots))
        self.slots = [*slots]

    def _replace(self, slot: Slot) -> None:
        slot.kill()
        if not self._stopping() or self.busy():
            self.slots[slot.index] = self._new_slot(slot.index)

    def dispatch(self) -> None:
        """Hand waiting tasks to idle executors: an even share each, at most MAX_EXECUTOR_BATCH.

        Called with ``self.cond`` held, from the supervisor or a thread that got tasks.
        """
        while self.inbox:
            idle = [s for s in self.slots if s.idle and not s.dead()]
            if not idle:
                return
            slot = idle[0]
            share = max(1, min(MAX_EXECUTOR_BATCH, -(-len(self.inbox) // len(idle))))
            with self.cond:
                tasks = [Running(self.inbox.popleft()) for _ in range(min(share, len(self.inbox)))]
            try:
                slot.assign(tasks)
            except (OSError, ValueError) as exc:
                slot.batch = []
                for r in tasks:
                    self.finish(r, self.failure(r.task, f"ExecutorError: cannot hand the task to the executor: "
                                                         f"{exc}"))
                self._replace(slot)

    # -- outcomes --

    def failure(self, task: dict[str, Any], error: str, retry: bool = True) -> dict[str, Any]:
        return {"id": task["id"], "ok": False, "error": error, "traceback": "", "retry": retry, "duration": 0.0}

    def _context(self, task: dict[str, Any], report: dict[str, Any] | None = None) -> dict[str, Any]:
        return task_context(task, self.queue_index, self.config.worker.allow_pickle, report)

    def finish(self, running: Running, report: dict[str, Any]) -> None:
        """Count a task's outcome, run hooks, and queue its report for the master."""
        task = running.task
        self.counters.count(task, report, self.metrics)
        duration = report.get("duration", 0.0)
        mean = self.mean_duration
        self.mean_duration = duration if mean is None else 0.8 * mean + 0.2 * duration
        hook = "on_task_finished" if report.get("ok") else "on_task_error"
        if has_hooks(hook):
            call_hooks(hook, self._context(task, report))
        if running.lost:
            self.counters.lost += 1
        if not report.get("ok"):
            self.failing[task["id"]] = task_name(task)
        report["id"] = task["id"]
        report["lease"] = task["lease"]
        report.pop("started", None)
        report.pop("duration", None)
        self.report(report)

    def hand_back(self, tasks: list[dict[str, Any]]) -> None:
        """Release leased tasks that will not run here: the master puts them at the front of the queue."""
        for task in tasks:
            self.report({"id": task["id"], "lease": task["lease"], "release": True, "ok": False})
        if tasks:
            log.info("handing %d task(s) back to the queue", len(tasks))

    def _abort_slot(self, slot: Slot, error: str) -> None:
        """The executor is dead or being killed: fail the task it ran, requeue the rest of its batch."""
        current = slot.current()
        pending = slot.pending()
        slot.batch = []
        slot.received = 0
        again = []
        for r in pending:
            if current is not None and r is current[0]:
                self.finish(r, self.failure(r.task, error))
            else:
                again.append(r.task)
        if current is None and pending:
            # Nothing was known to run: blame the first task, as the one that was starting.
            first = pending[0]
            again = [r.task for r in pending[1:]]
            self.finish(first, self.failure(first.task, error))
        with self.cond:
            self.inbox.extendleft(reversed(again))
            self.cond.notify_all()
        self._replace(slot)

    def _timeout_of(self, running: Running) -> float:
        return float(running.task.get("timeout") or self.task_timeout)

    # -- supervision (the agent's main thread) --

    def supervise_once(self, timeout: float, wake_fd: int) -> None:
        """Wait up to ``timeout`` for news from an executor or ``wake_fd``, then act on it."""
        waitables: list[Any] = [wake_fd]
        for slot in self.slots:
            waitables.extend(slot.waitables())
        now = time.monotonic()
        for _, r, start in self.running_tasks():
            if start:
                timeout = min(timeout, start + self._timeout_of(r) - now)
        if self.busy():
            timeout = min(timeout, 0.1)
        multiprocessing.connection.wait(waitables, max(timeout, 0.0))
        try:
            while os.read(wake_fd, 4096):
                pass
        except BlockingIOError:
            pass
        with self.cond:
            self._supervise_slots()

    def _supervise_slots(self) -> None:
        """Collect reports, replace dead executors, enforce timeouts; ``self.cond`` is held."""
        freed = False
        for slot in list(self.slots):
            # Always drain: an unread message would keep the pipe readable and the loop spinning.
            reports = slot.poll()
            if reports:
                for running, report in slot.take(reports):
                    self.finish(running, report)
                freed = freed or slot.idle
            if slot.dead():
                if slot.batch:
                    log.error("executor %s died (exit code %s) with %d task(s)", slot.index, slot.exitcode(),
                              len(slot.pending()))
                    self._abort_slot(slot, f"ExecutorDied: the executor process exited with code "
                                           f"{slot.exitcode()} while running the task")
                else:
                    if not self._stopping():
                        log.warning("executor %s exited (code %s); starting a new one", slot.index, slot.exitcode())
                    self._replace(slot)
                freed = True
                continue
            current = slot.current()
            if current is not None:
                running, start = current
                limit = self._timeout_of(running)
                if start and time.monotonic() - start >= limit:
                    log.warning("task %s ran past its timeout of %gs; stopping its executor", running.task["id"],
                                limit)
                    self._abort_slot(slot, f"TaskTimeoutError: timeout: the task ran longer than {limit:g}s "
                                           f"and was stopped")
                    freed = True
        if not self._stopping():
            freed = self._rebalance() or freed
            self.dispatch()
        if freed:
            self.cond.notify_all()

    def _rebalance(self) -> bool:
        """No task waits behind a running one while an executor is idle; ``self.cond`` is held.

        An executor whose task has run STALLED_AFTER seconds gives back the tasks it
        has not started (to the front of the inbox); an idle executor, when the inbox
        is empty, takes a share of the tasks the others have not started. With
        automatic prefetch, once every executor is held by a long task, the inbox
        goes back to the master (to the front of the queue), for an idle worker.
        Moving tasks changes neither what the agent holds nor any call to a master.
        Returns whether room was made for more tasks.
        """
        now = time.monotonic()
        taken: list[Running] = []
        stalled = 0
        for slot in self.slots:
            current = slot.current()
            if current is not None and current[1] and now - current[1] >= STALLED_AFTER:
                stalled += 1
                taken += slot.steal(len(slot.batch))
        was, self.stalled = self.stalled, stalled
        if not taken and not self.inbox:
            idle = sum(1 for slot in self.slots if slot.idle)
            if idle:
                for slot in self.slots:
                    unstarted = slot.unstarted()
                    if unstarted > 0:
                        taken += slot.steal(-(-unstarted * idle // (idle + 1)))
        if taken:
            self.inbox.extendleft(reversed([r.task for r in taken]))
        if self.prefetch < 0 and stalled and stalled == len(self.slots) and self.inbox:
            waiting = list(self.inbox)
            self.inbox.clear()
            self.hand_back(waiting)
            return True
        return stalled < was

    def kill_unfinished(self) -> list[dict[str, Any]]:
        """Stop the executors that still run tasks; return those tasks (to hand back)."""
        unfinished = [r.task for s in self.slots for r in s.pending()]
        for slot in self.slots:
            if slot.batch:
                slot.batch = []
                slot.kill()
        return unfinished

    def close(self) -> None:
        for slot in self.slots:
            slot.close()
