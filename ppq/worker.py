"""The worker agent: pull tasks from a master, run them in executors, report back.

One agent process runs ``concurrency`` executors (processes, or threads with
``pool: threads``) under a supervisor loop in its main thread, plus three helper
threads, each with its own connection to a master:

- the *fetcher* long-polls a master for tasks whenever an executor is free;
- the *reporter* sends finishes and errors in batches, and takes the next tasks
  in the same reply (piggyback);
- the *heartbeat* extends the leases of running tasks and keeps the agent listed.

Signal handlers only set flags (see :meth:`Agent.request_stop`); the supervisor
acts on them. The agent never talks to Redis.
"""

from __future__ import annotations

import collections
import importlib
import logging
import multiprocessing
import multiprocessing.connection
import os
import queue
import random
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import codec, rpc
from .config import Config
from .errors import CodecError, ConfigError, InvalidTaskError, MessageTooLargeError, NotAllowedError, PPQError
from .task import resolve

log = logging.getLogger("ppq.worker")

HOOK_NAMES = ("on_task_executing", "on_task_finished", "on_task_error")
_HOOKS: dict[str, list[Callable[[dict[str, Any]], Any]]] = {name: [] for name in HOOK_NAMES}

# Labels of tasks in the agent's figures (get_worker_stats, metrics): a task refused before it ran
# (not allowed, its module or function not importable) counts under REFUSED, whatever it named; past
# MAX_FUNC_LABELS distinct functions, new ones count under OTHER. Each label costs about 3.5 KB of
# /metrics text, so the figures stay small whatever callers push.
REFUSED = "(refused)"
OTHER = "(other)"
MAX_FUNC_LABELS = 200

# How the agent was asked to stop.
GRACEFUL = "graceful"
RESTART = "restart"
NOW = "now"


def add_hook(name: str, fn: Callable[[dict[str, Any]], Any]) -> None:
    """Call ``fn(context)`` at a point of every task's life, in the agent process.

    ``name`` is ``on_task_executing``, ``on_task_finished`` or ``on_task_error``;
    ``context`` holds ``task_id``, ``func``, ``module``, ``fclass``, ``sub`` (the
    positional arguments), ``kw`` (the keyword arguments), ``lang``, and after the
    run ``return_value`` or ``exception``. A hook that raises is logged and does
    not change the task's outcome.
    """
    if name not in _HOOKS:
        raise ValueError(f"unknown hook {name!r}; expected one of {', '.join(HOOK_NAMES)}")
    if not callable(fn):
        raise TypeError("a hook must be callable")
    _HOOKS[name].append(fn)


def _call_hooks(name: str, context: dict[str, Any]) -> None:
    for fn in list(_HOOKS[name]):
        try:
            fn(context)
        except Exception:  # noqa: BLE001 - a hook never breaks a task
            log.exception("hook %s %r raised; the task is not affected", name, fn)


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


def _import_allowed(allowed_modules: list[str]) -> None:
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


def _executor_main(conn: Any, progress: Any, allowed_modules: list[str], allowed_paths: list[str],
                   allow_pickle: bool, inherited: Sequence[Any] = ()) -> None:
    """An executor process: run the batches of tasks the agent sends until it sends None.

    ``progress`` is shared memory: [index in the batch of the task running now,
    its start on the monotonic clock]; the agent reads it to enforce timeouts.
    Results go back in small groups, at once for a task that took a while.
    """
    # A forked executor holds copies of the agent's ends of the pipes: closed, so that
    # the agent's exit reaches it as end of file.
    for other in inherited:
        other.close()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for name in ("SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    _import_allowed(allowed_modules)
    while True:
        try:
            batch = conn.recv()
        except (EOFError, OSError):
            return
        if batch is None:
            return
        done: list[dict[str, Any]] = []
        flushed = time.monotonic()
        for index, task in enumerate(batch):
            progress[1] = time.monotonic()
            progress[0] = index
            done.append(execute(task, allowed_modules, allowed_paths, allow_pickle))
            now = time.monotonic()
            if now - flushed > _FLUSH_AFTER or now - progress[1] > _FLUSH_AFTER:
                conn.send(done)
                done = []
                flushed = now
        if done:
            conn.send(done)


# Seconds an executor may hold finished results before sending them to the agent.
_FLUSH_AFTER = 0.02
# Most tasks handed to one executor at once.
MAX_EXECUTOR_BATCH = 64


# -- executor slots -------------------------------------------------------------


@dataclass
class Running:
    task: dict[str, Any]
    lost: bool = False


class Slot:
    """An executor and the batch of tasks it holds.

    ``batch`` lists the tasks sent, in order; the first ``received`` of them have
    reported. ``progress`` tells which one runs now and since when.
    """

    index: int
    progress: Any

    def __init__(self) -> None:
        self.batch: list[Running] = []
        self.received = 0

    @property
    def idle(self) -> bool:
        return not self.batch

    def pending(self) -> list[Running]:
        return self.batch[self.received:]

    def current(self) -> tuple[Running, float] | None:
        """The task running now and its start (monotonic), if it can be told."""
        if not self.batch:
            return None
        index = int(self.progress[0])
        if index < self.received or index >= len(self.batch):
            return None
        return self.batch[index], float(self.progress[1])

    def assign(self, tasks: list[Running]) -> None:
        self.batch = tasks
        self.received = 0
        self.progress[0] = -1
        self.progress[1] = 0.0
        self.send([r.task for r in tasks])

    def take(self, reports: list[dict[str, Any]]) -> list[tuple[Running, dict[str, Any]]]:
        """Match reports to the batch; clear the batch once every task has reported."""
        pairs = []
        for report in reports:
            if self.received < len(self.batch):
                pairs.append((self.batch[self.received], report))
                self.received += 1
        if self.received >= len(self.batch):
            self.batch = []
            self.received = 0
        return pairs

    def send(self, tasks: list[dict[str, Any]]) -> None:
        raise NotImplementedError

    def poll(self) -> list[dict[str, Any]] | None:
        raise NotImplementedError


class ProcessSlot(Slot):
    """One executor process."""

    def __init__(self, index: int, ctx: Any, options: tuple[Any, ...], siblings: Sequence[ProcessSlot] = ()
                 ) -> None:
        super().__init__()
        self.index = index
        self.progress = ctx.Array("d", 2, lock=False)
        self.conn, child = ctx.Pipe()
        # Forked (not from the fork server): the agent's ends of its pipes are inherited.
        inherited = [self.conn, *(s.conn for s in siblings)] if ctx.get_start_method() == "fork" else []
        self.process = ctx.Process(target=_executor_main, args=(child, self.progress, *options, inherited),
                                   name=f"ppq-executor-{index}", daemon=True)
        self.process.start()
        child.close()

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def waitables(self) -> list[Any]:
        return [self.conn, self.process.sentinel]

    def send(self, tasks: list[dict[str, Any]]) -> None:
        self.conn.send(tasks)

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


class ThreadSlot(Slot):
    """One executor thread. A thread cannot be killed: on timeout it is abandoned."""

    pid = None

    def __init__(self, index: int, wake: Callable[[], None], options: tuple[Any, ...]) -> None:
        super().__init__()
        self.index = index
        self.options = options
        self.progress = [-1.0, 0.0]
        self._wake = wake
        self._tasks: queue.SimpleQueue[list[dict[str, Any]] | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._abandoned = False
        self.thread = threading.Thread(target=self._loop, name=f"ppq-executor-{index}", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            batch = self._tasks.get()
            if batch is None or self._abandoned:
                return
            for index, task in enumerate(batch):
                self.progress[1] = time.monotonic()
                self.progress[0] = index
                report = execute(task, *self.options)
                if self._abandoned:
                    return
                self._results.put(report)
                self._wake()

    def waitables(self) -> list[Any]:
        return []

    def send(self, tasks: list[dict[str, Any]]) -> None:
        self._tasks.put(tasks)

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


# -- the control object ------------------------------------------------------------


class WorkerControl:
    """The object a worker exposes as ``worker``."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    @rpc.remote(role=rpc.ANY)
    def ping(self) -> str:
        return "pong"

    @rpc.remote(role=rpc.ANY)
    def get_running_info(self) -> dict[str, Any]:
        """The agent's identity and the tasks it is running now."""
        return self.agent.running_info()

    @rpc.remote(role=rpc.ANY)
    def get_worker_stats(self) -> dict[str, Any]:
        """Per function: count, ok, failed, total_time and mean_time in seconds.

        Tasks refused before they ran count under ``(refused)``; functions beyond the
        first MAX_FUNC_LABELS under ``(other)``.
        """
        return self.agent.stats_snapshot()


@dataclass
class FuncStats:
    count: int = 0
    ok: int = 0
    failed: int = 0
    total_time: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "ok": self.ok, "failed": self.failed, "total_time": self.total_time,
                "mean_time": self.total_time / self.count if self.count else 0.0}


@dataclass
class Counters:
    done: int = 0
    failed: int = 0
    lost: int = 0
    per_func: dict[str, FuncStats] = field(default_factory=lambda: collections.defaultdict(FuncStats))


# -- the agent --------------------------------------------------------------------


class Agent:
    """A worker agent. ``run()`` blocks until it is asked to stop; it returns how."""

    def __init__(self, config: Config) -> None:
        w = config.worker
        self.config = config
        self.queue_index = w.queue_index
        self.concurrency = w.concurrency or os.cpu_count() or 1
        self.prefetch = w.prefetch
        self._mean_duration: float | None = None
        self.task_timeout = w.task_timeout
        self.max_sleep = min(w.max_sleep, 30.0)
        self.allowed_modules = list(w.allowed_modules)
        for package in w.autodiscover:
            if package not in self.allowed_modules:
                self.allowed_modules.append(package)
        self.allowed_paths = list(w.allowed_paths)
        self.host = socket.gethostname()
        self.id = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.started = time.time()
        addresses = list(w.master_hosts)
        if not addresses:
            raise ConfigError("worker.master_hosts is empty: give at least one master address")
        random.shuffle(addresses)
        self.masters = [rpc.master_uri(a) for a in addresses]
        self._call = rpc.PyroFunc(self.masters, retry=1, token=config.worker_secret, timeout=self.max_sleep + 15)
        self._stop_mode: str | None = None
        self._stop_event = threading.Event()
        self._cond = threading.Condition()
        self._inbox: collections.deque[dict[str, Any]] = collections.deque()
        self._reserved = 0
        self._outbox: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.slots: list[Any] = []
        self.counters = Counters()
        self.control_uri = ""
        self._daemon: rpc.Daemon | None = None
        self._threads: list[threading.Thread] = []
        self._fetching = threading.Event()
        self.metrics: Any = None

    # -- signals and flags --

    def request_stop(self, mode: str = GRACEFUL) -> None:
        """Ask the agent to stop; safe to call from a signal handler."""
        if mode == NOW or self._stop_mode is None or (mode == RESTART and self._stop_mode == GRACEFUL):
            self._stop_mode = mode
        self._stop_event.set()
        self._wake()

    @property
    def stopping(self) -> bool:
        return self._stop_mode is not None

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    # -- info --

    def light_info(self) -> dict[str, Any]:
        """What every report call carries: enough to know the worker and how long it stays listed."""
        return {"id": self.id, "heartbeat_interval": self.config.worker.heartbeat_interval}

    def running_tasks(self) -> list[tuple[Any, Running, float | None]]:
        """(slot, task, start) for each task an executor is running now."""
        out = []
        for slot in list(self.slots):
            current = slot.current()
            if current is not None:
                out.append((slot, current[0], current[1]))
        return out

    def info(self) -> dict[str, Any]:
        running = [r.task["id"] for _, r, _ in self.running_tasks()]
        return {
            "id": self.id, "host": self.host, "pid": os.getpid(), "queue_index": self.queue_index,
            "concurrency": self.concurrency, "pool": self.config.worker.pool, "started": self.started,
            "running": running, "done": self.counters.done, "failed": self.counters.failed,
            "control_uri": self.control_uri, "heartbeat_interval": self.config.worker.heartbeat_interval,
        }

    def running_info(self) -> dict[str, Any]:
        now = time.monotonic()
        wall = time.time()
        tasks = []
        for slot, r, start in self.running_tasks():
            t = r.task
            elapsed = now - start if start else 0.0
            tasks.append({"id": t["id"], "func": t["func"], "module": t["module"], "fclass": t.get("fclass", ""),
                          "started": wall - elapsed, "elapsed": elapsed, "executor": slot.index,
                          "executor_pid": slot.pid})
        info = self.info()
        info["tasks"] = tasks
        info["waiting"] = len(self._inbox)
        return info

    def stats_snapshot(self) -> dict[str, Any]:
        return {name: s.as_dict() for name, s in list(self.counters.per_func.items())}

    # -- capacity shared by fetcher, reporter and supervisor --

    def _busy(self) -> int:
        """Tasks handed to executors that have not reported yet."""
        return sum(len(s.batch) - s.received for s in self.slots)

    def _ahead(self) -> int:
        """How many tasks to hold beyond one per executor.

        ``worker.prefetch`` when set (0 = none); by default it follows the mean
        task duration: many while tasks are short, none once they take a while, so
        long tasks are not held back from other workers.
        """
        if self.prefetch >= 0:
            return self.prefetch
        mean = self._mean_duration
        if mean is None:
            return self.concurrency
        if mean < 0.01:
            return 64 * self.concurrency
        if mean < 0.1:
            return 4 * self.concurrency
        return 0

    def _free(self) -> int:
        return self.concurrency + self._ahead() - self._busy() - len(self._inbox) - self._reserved

    def _reserve(self, block: bool) -> int:
        with self._cond:
            while block and self._free() <= 0 and not self.stopping:
                self._cond.wait(0.5)
            if self.stopping:
                return 0
            n = max(self._free(), 0)
            self._reserved += n
            return n

    def _accept(self, reserved: int, tasks: list[dict[str, Any]]) -> None:
        """Take leased tasks: straight to idle executors, the rest wait in the inbox."""
        with self._cond:
            self._reserved -= reserved
            self._inbox.extend(tasks)
            if tasks and not self.stopping and self.slots:
                self._dispatch()

    # -- threads talking to masters --

    def _fetcher(self) -> None:
        pause = 0.05
        while not self.stopping:
            n = self._reserve(block=True)
            if n <= 0:
                continue
            self._fetching.set()
            try:
                reply = self._call("report", self.light_info(), self.queue_index, [], n, self.max_sleep)
                tasks = reply["tasks"]
                pause = 0.05
            except (PPQError, rpc.CommunicationError) as exc:
                tasks = []
                log.warning("cannot get tasks (%s); retrying in %.1fs", exc, pause)
                self._stop_event.wait(pause)
                pause = min(pause * 2, self.max_sleep)
            finally:
                self._fetching.clear()
            self._accept(n, tasks)

    def _reporter(self) -> None:
        while True:
            try:
                first = self._outbox.get(timeout=0.5)
            except queue.Empty:
                if self.stopping and self._done_reporting.is_set():
                    return
                continue
            batch = [first]
            while len(batch) < 500:
                try:
                    batch.append(self._outbox.get_nowait())
                except queue.Empty:
                    break
            self._send_reports(batch)

    def _send_reports(self, batch: list[dict[str, Any]]) -> None:
        pause = 0.05
        deadline = None
        while True:
            n = 0 if self.stopping else self._reserve(block=False)
            try:
                reply = self._call("report", self.light_info(), self.queue_index, batch, n, 0)
            except InvalidTaskError as exc:
                self._accept(n, [])
                if isinstance(exc, MessageTooLargeError) and len(batch) > 1:
                    # Large results: the batch goes in halves, each as large as one call carries.
                    half = len(batch) // 2
                    self._send_reports(batch[:half])
                    self._send_reports(batch[half:])
                    return
                if any(r.get("ok") or r.get("result_bytes") for r in batch):
                    # Refused for good: report plain failures instead, which carry nothing to refuse.
                    log.error("the master refused %d report(s) (%s); reporting them as failed", len(batch), exc)
                    batch = [{"id": r["id"], "lease": r["lease"], "ok": False, "retry": False,
                              "error": f"ReportRefusedError: {exc}"} if not r.get("release") else r
                             for r in batch]
                    continue
                log.error("the master refused %d report(s) (%s); their leases will expire and the tasks run "
                          "again", len(batch), exc)
                return
            except (PPQError, rpc.CommunicationError) as exc:
                self._accept(n, [])
                if self.stopping:
                    deadline = deadline or time.monotonic() + 10
                    if time.monotonic() > deadline:
                        log.error("could not report %d task(s) before stopping: %s; their leases will expire "
                                  "and they will run again", len(batch), exc)
                        return
                log.warning("cannot report %d result(s) (%s); retrying in %.1fs", len(batch), exc, pause)
                time.sleep(pause)
                pause = min(pause * 2, self.max_sleep)
                continue
            self._accept(n, reply["tasks"])
            for report, ok in zip(batch, reply["accepted"], strict=True):
                if not ok:
                    log.warning("task %s: report refused, the lease was lost (the task was requeued)",
                                report["id"])
            return

    def _heartbeat(self) -> None:
        interval = self.config.worker.heartbeat_interval
        while True:
            held = [r for slot in list(self.slots) for r in slot.pending()]
            running = [(r.task["id"], r.task["lease"]) for r in held]
            with self._cond:
                running += [(t["id"], t["lease"]) for t in self._inbox]
            try:
                lost = set(self._call("heartbeat", self.info(), self.queue_index, running)["lost"])
                for r in held:
                    if r.task["id"] in lost and not r.lost:
                        r.lost = True
                        log.warning("task %s: lease lost or task cancelled; its result will be dropped",
                                    r.task["id"])
            except (PPQError, rpc.CommunicationError) as exc:
                log.warning("heartbeat failed: %s", exc)
            # Leases are still extended while a graceful stop lets tasks finish.
            if self._done_reporting.wait(interval):
                return

    # -- executors --

    def _options(self) -> tuple[Any, ...]:
        return (self.allowed_modules, self.allowed_paths, self.config.worker.allow_pickle)

    def _new_slot(self, index: int) -> Any:
        if self.config.worker.pool == "threads":
            return ThreadSlot(index, self._wake, self._options())
        return ProcessSlot(index, self._mp, self._options())

    def _start_executors(self) -> None:
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
        self.slots = []
        for i in range(self.concurrency):
            self.slots.append(ProcessSlot(i, first, self._options(), self.slots))

    def _replace(self, slot: Any) -> None:
        slot.kill()
        if not self.stopping or self._busy():
            self.slots[slot.index] = self._new_slot(slot.index)

    def _dispatch(self) -> None:
        """Hand waiting tasks to idle executors: an even share each, at most MAX_EXECUTOR_BATCH.

        Called with ``self._cond`` held, from the supervisor or a thread that got tasks.
        """
        while self._inbox:
            idle = [s for s in self.slots if s.idle and not s.dead()]
            if not idle:
                return
            slot = idle[0]
            share = max(1, min(MAX_EXECUTOR_BATCH, -(-len(self._inbox) // len(idle))))
            with self._cond:
                tasks = [Running(self._inbox.popleft()) for _ in range(min(share, len(self._inbox)))]
            if _HOOKS["on_task_executing"]:
                for r in tasks:
                    _call_hooks("on_task_executing", self._context(r.task))
            try:
                slot.assign(tasks)
            except (OSError, ValueError) as exc:
                slot.batch = []
                for r in tasks:
                    self._finish(r, self._failure(r.task, f"ExecutorError: cannot hand the task to the executor: "
                                                           f"{exc}"))
                self._replace(slot)

    def _failure(self, task: dict[str, Any], error: str, retry: bool = True) -> dict[str, Any]:
        return {"id": task["id"], "ok": False, "error": error, "traceback": "", "retry": retry, "duration": 0.0}

    def _context(self, task: dict[str, Any], report: dict[str, Any] | None = None) -> dict[str, Any]:
        try:
            args, kwargs = codec.decode_parameters(task["parameters"], self.config.worker.allow_pickle)
        except CodecError:
            args, kwargs = [], {}
        context: dict[str, Any] = {"task_id": task["id"], "func": task["func"], "module": task["module"],
                                   "fclass": task.get("fclass", ""), "sub": args, "kw": kwargs,
                                   "lang": task.get("lang", ""), "queue_index": self.queue_index}
        if report is not None:
            if report.get("ok"):
                try:
                    context["return_value"] = codec.decode(report["result_bytes"], self.config.worker.allow_pickle)
                except CodecError:
                    context["return_value"] = None
            else:
                context["exception"] = report.get("error", "")
                context["traceback"] = report.get("traceback", "")
        return context

    def _finish(self, running: Running, report: dict[str, Any]) -> None:
        """Count a task's outcome, run hooks, and queue its report for the master."""
        task = running.task
        name = f"{task['module']}.{task['fclass'] + '.' if task.get('fclass') else ''}{task['func']}"
        per_func = self.counters.per_func
        if report.pop("refused", False):
            label = REFUSED
        elif name in per_func or len(per_func) < MAX_FUNC_LABELS:
            label = name
        else:
            label = OTHER
        duration = report.get("duration", 0.0)
        if self.metrics is not None:
            started = report.get("started")
            wait = started - task["ready_at"] if started and task.get("ready_at") else None
            self.metrics.observe(label, bool(report.get("ok")), duration, wait)
        stats = per_func[label]
        stats.count += 1
        stats.total_time += duration
        mean = self._mean_duration
        self._mean_duration = duration if mean is None else 0.8 * mean + 0.2 * duration
        if report.get("ok"):
            stats.ok += 1
            self.counters.done += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("task %s %s done in %.3fs", task["id"], name, duration)
        else:
            stats.failed += 1
            self.counters.failed += 1
            log.info("task %s %s failed: %s", task["id"], name, report.get("error"))
        hook = "on_task_finished" if report.get("ok") else "on_task_error"
        if _HOOKS[hook]:
            _call_hooks(hook, self._context(task, report))
        if running.lost:
            self.counters.lost += 1
        report["id"] = task["id"]
        report["lease"] = task["lease"]
        report.pop("started", None)
        report.pop("duration", None)
        self._outbox.put(report)

    def _abort_slot(self, slot: Any, error: str) -> None:
        """The executor is dead or being killed: fail the task it ran, requeue the rest of its batch."""
        current = slot.current()
        pending = slot.pending()
        slot.batch = []
        slot.received = 0
        again = []
        for r in pending:
            if current is not None and r is current[0]:
                self._finish(r, self._failure(r.task, error))
            else:
                again.append(r.task)
        if current is None and pending:
            # Nothing was known to run: blame the first task, as the one that was starting.
            first = pending[0]
            again = [r.task for r in pending[1:]]
            self._finish(first, self._failure(first.task, error))
        with self._cond:
            self._inbox.extendleft(reversed(again))
            self._cond.notify_all()
        self._replace(slot)

    def _hand_back(self, tasks: list[dict[str, Any]]) -> None:
        for task in tasks:
            self._outbox.put({"id": task["id"], "lease": task["lease"], "release": True, "ok": False})
        if tasks:
            log.info("handing %d task(s) back to the queue", len(tasks))

    def _timeout_of(self, running: Running) -> float:
        return float(running.task.get("timeout") or self.task_timeout)

    def _supervise_once(self, timeout: float) -> None:
        waitables: list[Any] = [self._wake_r]
        for slot in self.slots:
            waitables.extend(slot.waitables())
        now = time.monotonic()
        for _, r, start in self.running_tasks():
            if start:
                timeout = min(timeout, start + self._timeout_of(r) - now)
        if self._busy():
            timeout = min(timeout, 0.1)
        multiprocessing.connection.wait(waitables, max(timeout, 0.0))
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        with self._cond:
            self._supervise_slots()

    def _supervise_slots(self) -> None:
        """Collect reports, replace dead executors, enforce timeouts; ``self._cond`` is held."""
        freed = False
        for slot in list(self.slots):
            # Always drain: an unread message would keep the pipe readable and the loop spinning.
            reports = slot.poll()
            if reports:
                for running, report in slot.take(reports):
                    self._finish(running, report)
                freed = freed or slot.idle
            if slot.dead():
                if slot.batch:
                    log.error("executor %s died (exit code %s) with %d task(s)", slot.index, slot.exitcode(),
                              len(slot.pending()))
                    self._abort_slot(slot, f"ExecutorDied: the executor process exited with code "
                                           f"{slot.exitcode()} while running the task")
                else:
                    if not self.stopping:
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
        if freed:
            self._cond.notify_all()
        if not self.stopping:
            self._dispatch()

    # -- the main loop --

    def _autodiscover(self) -> None:
        for package in self.config.worker.autodiscover:
            name = f"{package}.tasks"
            try:
                importlib.import_module(name)
                log.info("autodiscover: imported %s", name)
            except ModuleNotFoundError as exc:
                if exc.name not in (name, package):
                    raise ConfigError(f"worker.autodiscover: importing {name} failed: {exc}") from None
                log.warning("autodiscover: %s has no tasks module", package)
            except Exception as exc:  # noqa: BLE001 - any failure of the user's module is reported in one line
                raise ConfigError(f"worker.autodiscover: importing {name} failed: "
                                  f"{type(exc).__name__}: {exc}") from None

    def _serve_control(self) -> None:
        w = self.config.worker
        config = self.config
        rpc.check_bind(w.host, config.any_token, w.insecure, "worker.host")
        tokens = rpc.token_roles(config.auth_token, config.worker_token, config.client_token)
        ssl_context = rpc.server_ssl_context(config.tls)
        try:
            self._daemon = rpc.Daemon(w.host, w.port, tokens, 32, config.limits.max_message, ssl_context)
        except OSError as exc:
            if w.port == 0:
                raise
            log.warning("worker.port %s is taken (%s); the control object uses a free port", w.port,
                        exc.strerror or exc)
            self._daemon = rpc.Daemon(w.host, 0, tokens, 32, config.limits.max_message, ssl_context)
        self.control_uri = str(self._daemon.register(WorkerControl(self), objectId=rpc.WORKER_OBJECT))
        self._threads.append(rpc.serve_in_thread(self._daemon, "ppq-worker-control"))

    def start(self) -> None:
        """Start executors, the control object and the helper threads."""
        rpc.apply_tls(self.config.tls)
        self._done_reporting = threading.Event()
        self._autodiscover()
        self._start_executors()
        self._serve_control()
        if self.config.worker.metrics_port:
            from .metrics import WorkerMetrics

            self.metrics = WorkerMetrics()
            try:
                self.metrics.serve(self.config.worker.metrics_host, self.config.worker.metrics_port,
                                   self.config.client_secret)
            except OSError as exc:
                raise ConfigError(f"worker.metrics_port: cannot listen on {self.config.worker.metrics_port}: "
                                  f"{exc.strerror or exc}") from None
        try:
            self._call("heartbeat", self.info(), self.queue_index, [])
        except (PPQError, rpc.CommunicationError) as exc:
            log.warning("no master answered at start (%s); will keep trying", exc)
        for target, name in ((self._fetcher, "fetcher"), (self._reporter, "reporter"),
                             (self._heartbeat, "heartbeat")):
            t = threading.Thread(target=target, name=f"ppq-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        kind = {"processes": "process", "threads": "thread"}[self.config.worker.pool]
        log.info("worker %s: %d executor %s%s on queue_index %s, masters %s, control %s", self.id,
                 self.concurrency, kind, "" if self.concurrency == 1 else ("es" if kind == "process" else "s"),
                 self.queue_index, ", ".join(self.masters), self.control_uri)

    def run(self) -> str:
        """Run until asked to stop; return the stop mode (graceful, restart or now)."""
        self.start()
        try:
            while not self.stopping:
                self._supervise_once(0.5)
            self._shutdown()
        finally:
            self._close()
        return self._stop_mode or GRACEFUL

    def _shutdown(self) -> None:
        mode = self._stop_mode
        log.info("stopping (%s): no new tasks; %d running", mode, self._busy())
        with self._cond:
            self._cond.notify_all()
        # The long-poll in flight ends at once (the master answers it with no task)...
        self._release(leaving=False)
        # ...or may still bring tasks: wait for it, then hand them back.
        deadline = time.monotonic() + self.max_sleep + 2
        while self._fetching.is_set() and time.monotonic() < deadline and self._stop_mode != NOW:
            time.sleep(0.02)
        with self._cond:
            waiting = list(self._inbox)
            self._inbox.clear()
        self._hand_back(waiting)
        deadline = time.monotonic() + self.task_timeout
        while self._busy() and self._stop_mode != NOW and time.monotonic() < deadline:
            self._supervise_once(min(0.5, max(deadline - time.monotonic(), 0)))
        unfinished = [r.task for s in self.slots for r in s.pending()]
        for slot in self.slots:
            if slot.batch:
                slot.batch = []
                slot.kill()
        self._hand_back(unfinished)
        if unfinished:
            log.warning("%d task(s) did not finish in time and were handed back", len(unfinished))
        deadline = time.monotonic() + 15
        while not self._outbox.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
        self._done_reporting.set()
        for t in self._threads:
            if t.name in ("ppq-reporter",):
                t.join(15)

    def _release(self, leaving: bool) -> None:
        """Tell the master this agent is stopping: its long-poll ends; with ``leaving``, it is
        taken off the list of live workers at once (the last heartbeat has been sent)."""
        if leaving:
            # Reporting is over (or never began): the heartbeat thread ends at its next wait.
            done = getattr(self, "_done_reporting", None)
            if done is not None:
                done.set()
            for t in self._threads:
                if t.name == "ppq-heartbeat":
                    t.join(5)
        try:
            self._call("release_worker", self.light_info(), self.queue_index, leaving)
        except (PPQError, rpc.CommunicationError) as exc:
            log.debug("could not tell the master this worker is stopping: %s", exc)

    def _close(self) -> None:
        self._release(leaving=True)
        for slot in self.slots:
            slot.close()
        if self._daemon is not None:
            self._daemon.shutdown()
        if self.metrics is not None:
            self.metrics.stop()
        self._call.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        log.info("worker %s stopped: %d done, %d failed", self.id, self.counters.done, self.counters.failed)


def install_signal_handlers(agent: Agent) -> None:
    """SIGTERM/SIGINT/SIGUSR1: graceful stop; SIGUSR2: graceful restart; a second SIGINT: stop now."""
    interrupted = []

    def graceful(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if interrupted:
                agent.request_stop(NOW)
                return
            interrupted.append(True)
        agent.request_stop(GRACEFUL)

    def restart(signum: int, frame: Any) -> None:
        agent.request_stop(RESTART)

    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        signal.signal(getattr(signal, name), graceful)
    signal.signal(signal.SIGUSR2, restart)


def run(config: Config) -> str:
    """Run an agent in this process with signal handling; return how it stopped.

    Like other task queues' workers, it puts the current directory on sys.path so
    that task modules beside the deployment import as they do for the pusher.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    agent = Agent(config)
    install_signal_handlers(agent)
    return agent.run()


def restart_command() -> list[str]:
    """The command that starts this agent again."""
    return [sys.executable, "-m", "ppq", *sys.argv[1:]]
