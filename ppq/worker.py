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
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import codec, rpc
from .config import Config
from .errors import CodecError, ConfigError, NotAllowedError, PPQError
from .task import resolve

log = logging.getLogger("ppq.worker")

HOOK_NAMES = ("on_task_executing", "on_task_finished", "on_task_error")
_HOOKS: dict[str, list[Callable[[dict[str, Any]], Any]]] = {name: [] for name in HOOK_NAMES}

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


def remove_hooks() -> None:
    for fns in _HOOKS.values():
        fns.clear()


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
    try:
        fn = resolve(task["module"], task["func"], task.get("fclass") or "", task.get("path") or "",
                     allowed_modules, allowed_paths)
        args, kwargs = codec.decode_parameters(task["parameters"], allow_pickle=allow_pickle)
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
    report["duration"] = time.time() - started
    return report


def _executor_main(conn: Any, allowed_modules: list[str], allowed_paths: list[str], allow_pickle: bool) -> None:
    """An executor process: run the tasks the agent sends until it sends None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for name in ("SIGUSR1", "SIGUSR2"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        conn.send(execute(task, allowed_modules, allowed_paths, allow_pickle))


# -- executor slots -------------------------------------------------------------


@dataclass
class Running:
    task: dict[str, Any]
    started: float
    deadline: float
    lost: bool = False


class ProcessSlot:
    """One executor process and the task it runs."""

    def __init__(self, index: int, ctx: Any, options: tuple[Any, ...]) -> None:
        self.index = index
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_executor_main, args=(child, *options), name=f"ppq-executor-{index}",
                                   daemon=True)
        self.process.start()
        child.close()
        self.running: Running | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def waitables(self) -> list[Any]:
        return [self.conn, self.process.sentinel]

    def send(self, task: dict[str, Any]) -> None:
        self.conn.send(task)

    def poll(self) -> dict[str, Any] | None:
        if self.running is not None and self.conn.poll():
            try:
                return self.conn.recv()  # type: ignore[no-any-return]
            except (EOFError, OSError):
                return None
        return None

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


class ThreadSlot:
    """One executor thread. A thread cannot be killed: on timeout it is abandoned."""

    def __init__(self, index: int, wake: Callable[[], None], options: tuple[Any, ...]) -> None:
        self.index = index
        self.options = options
        self._wake = wake
        self._tasks: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self._abandoned = False
        self.thread = threading.Thread(target=self._loop, name=f"ppq-executor-{index}", daemon=True)
        self.thread.start()
        self.running: Running | None = None

    pid = None

    def _loop(self) -> None:
        while True:
            task = self._tasks.get()
            if task is None or self._abandoned:
                return
            self._results.put(execute(task, *self.options))
            self._wake()

    def waitables(self) -> list[Any]:
        return []

    def send(self, task: dict[str, Any]) -> None:
        self._tasks.put(task)

    def poll(self) -> dict[str, Any] | None:
        try:
            return self._results.get_nowait()
        except queue.Empty:
            return None

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

    @rpc.remote
    def ping(self) -> str:
        return "pong"

    @rpc.remote
    def get_running_info(self) -> dict[str, Any]:
        """The agent's identity and the tasks it is running now."""
        return self.agent.running_info()

    @rpc.remote
    def get_worker_stats(self) -> dict[str, Any]:
        """Per function: count, ok, failed, total_time and mean_time in seconds."""
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
        self.capacity = self.concurrency + w.prefetch
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
        token = config.auth_token
        self._call = rpc.PyroFunc(self.masters, retry=1, token=token, timeout=self.max_sleep + 15)
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

    def info(self) -> dict[str, Any]:
        running = [s.running.task["id"] for s in self.slots if s.running is not None]
        return {
            "id": self.id, "host": self.host, "pid": os.getpid(), "queue_index": self.queue_index,
            "concurrency": self.concurrency, "pool": self.config.worker.pool, "started": self.started,
            "running": running, "done": self.counters.done, "failed": self.counters.failed,
            "control_uri": self.control_uri, "heartbeat_interval": self.config.worker.heartbeat_interval,
        }

    def running_info(self) -> dict[str, Any]:
        now = time.time()
        tasks = []
        for slot in list(self.slots):
            r = slot.running
            if r is not None:
                t = r.task
                tasks.append({"id": t["id"], "func": t["func"], "module": t["module"], "fclass": t.get("fclass", ""),
                              "started": r.started, "elapsed": now - r.started, "executor": slot.index,
                              "executor_pid": slot.pid})
        info = self.info()
        info["tasks"] = tasks
        info["waiting"] = len(self._inbox)
        return info

    def stats_snapshot(self) -> dict[str, Any]:
        return {name: s.as_dict() for name, s in list(self.counters.per_func.items())}

    # -- capacity shared by fetcher, reporter and supervisor --

    def _busy(self) -> int:
        return sum(1 for s in self.slots if s.running is not None)

    def _free(self) -> int:
        return self.capacity - self._busy() - len(self._inbox) - self._reserved

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
        with self._cond:
            self._reserved -= reserved
            self._inbox.extend(tasks)
        if tasks:
            self._wake()

    # -- threads talking to masters --

    def _fetcher(self) -> None:
        pause = 0.05
        while not self.stopping:
            n = self._reserve(block=True)
            if n <= 0:
                continue
            self._fetching.set()
            try:
                reply = self._call("report", self.info(), self.queue_index, [], n, self.max_sleep)
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
                reply = self._call("report", self.info(), self.queue_index, batch, n, 0)
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
            for report, ok in zip(batch, reply["accepted"]):
                if not ok:
                    log.warning("task %s: report refused, the lease was lost (the task was requeued)",
                                report["id"])
            return

    def _heartbeat(self) -> None:
        interval = self.config.worker.heartbeat_interval
        while True:
            running = [(s.running.task["id"], s.running.task["lease"]) for s in list(self.slots)
                       if s.running is not None]
            with self._cond:
                running += [(t["id"], t["lease"]) for t in self._inbox]
            try:
                lost = self._call("heartbeat", self.info(), self.queue_index, running)["lost"]
                for slot in list(self.slots):
                    if slot.running is not None and slot.running.task["id"] in lost and not slot.running.lost:
                        slot.running.lost = True
                        log.warning("task %s: lease lost or task cancelled; its result will be dropped",
                                    slot.running.task["id"])
            except (PPQError, rpc.CommunicationError) as exc:
                log.warning("heartbeat failed: %s", exc)
            if self._stop_event.wait(interval) and self._done_reporting.is_set():
                return

    # -- executors --

    def _options(self) -> tuple[Any, ...]:
        return (self.allowed_modules, self.allowed_paths, self.config.worker.allow_pickle)

    def _new_slot(self, index: int) -> Any:
        if self.config.worker.pool == "threads":
            return ThreadSlot(index, self._wake, self._options())
        return ProcessSlot(index, self._mp, self._options())

    def _start_executors(self) -> None:
        if self.config.worker.pool == "processes":
            self._mp = multiprocessing.get_context("forkserver")
            self._mp.set_forkserver_preload(["ppq.worker"])
        self.slots = [self._new_slot(i) for i in range(self.concurrency)]

    def _replace(self, slot: Any) -> None:
        slot.kill()
        if not self.stopping:
            self.slots[slot.index] = self._new_slot(slot.index)

    def _dispatch(self) -> None:
        while self._inbox:
            free = next((s for s in self.slots if s.running is None and not s.dead()), None)
            if free is None:
                return
            with self._cond:
                task = self._inbox.popleft()
            timeout = task.get("timeout") or self.task_timeout
            now = time.time()
            free.running = Running(task, now, time.monotonic() + timeout)
            if _HOOKS["on_task_executing"]:
                _call_hooks("on_task_executing", self._context(task))
            try:
                free.send(task)
            except (OSError, ValueError) as exc:
                self._complete(free, self._failure(task, f"ExecutorError: cannot hand the task to the executor: "
                                                         f"{exc}"))
                self._replace(free)

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

    def _complete(self, slot: Any, report: dict[str, Any]) -> None:
        running = slot.running
        slot.running = None
        with self._cond:
            self._cond.notify_all()
        if running is None or running.task["id"] != report["id"]:
            return
        task = running.task
        name = f"{task['module']}.{task['fclass'] + '.' if task.get('fclass') else ''}{task['func']}"
        stats = self.counters.per_func[name]
        stats.count += 1
        stats.total_time += report.get("duration", 0.0)
        if report.get("ok"):
            stats.ok += 1
            self.counters.done += 1
            log.debug("task %s %s done in %.3fs", task["id"], name, report.get("duration", 0.0))
        else:
            stats.failed += 1
            self.counters.failed += 1
            log.info("task %s %s failed: %s", task["id"], name, report.get("error"))
        hook = "on_task_finished" if report.get("ok") else "on_task_error"
        if _HOOKS[hook]:
            _call_hooks(hook, self._context(task, report))
        if running.lost:
            self.counters.lost += 1
        report["lease"] = task["lease"]
        report.pop("started", None)
        report.pop("duration", None)
        self._outbox.put(report)

    def _hand_back(self, tasks: list[dict[str, Any]]) -> None:
        for task in tasks:
            self._outbox.put({"id": task["id"], "lease": task["lease"], "release": True, "ok": False})
        if tasks:
            log.info("handing %d task(s) back to the queue", len(tasks))

    def _supervise_once(self, timeout: float) -> None:
        waitables: list[Any] = [self._wake_r]
        for slot in self.slots:
            waitables.extend(slot.waitables())
        now = time.monotonic()
        deadlines = [s.running.deadline for s in self.slots if s.running is not None]
        if deadlines:
            timeout = max(0.0, min(timeout, min(deadlines) - now))
        multiprocessing.connection.wait(waitables, timeout)
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        for slot in list(self.slots):
            report = slot.poll() if slot.running is not None else None
            if report is not None:
                self._complete(slot, report)
            elif slot.dead():
                if slot.running is not None:
                    task = slot.running.task
                    log.error("executor %s died (exit code %s) while running task %s", slot.index, slot.exitcode(),
                              task["id"])
                    self._complete(slot, self._failure(task, f"ExecutorDied: the executor process exited with "
                                                             f"code {slot.exitcode()} while running the task"))
                elif not self.stopping:
                    log.warning("executor %s exited (code %s); starting a new one", slot.index, slot.exitcode())
                self._replace(slot)
            elif slot.running is not None and time.monotonic() >= slot.running.deadline:
                task = slot.running.task
                timeout_s = task.get("timeout") or self.task_timeout
                log.warning("task %s ran past its timeout of %gs; stopping its executor", task["id"], timeout_s)
                self._complete(slot, self._failure(task, f"TaskTimeoutError: timeout: the task ran longer than "
                                                         f"{timeout_s:g}s and was stopped"))
                self._replace(slot)
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
                    raise
                log.warning("autodiscover: %s has no tasks module", package)

    def _serve_control(self) -> None:
        w = self.config.worker
        rpc.check_bind(w.host, self.config.auth_token, w.insecure, "worker.host")
        try:
            self._daemon = rpc.Daemon(w.host, w.port, self.config.auth_token, threadpool_size=32)
        except OSError as exc:
            if w.port == 0:
                raise
            log.warning("worker.port %s is taken (%s); the control object uses a free port", w.port,
                        exc.strerror or exc)
            self._daemon = rpc.Daemon(w.host, 0, self.config.auth_token, threadpool_size=32)
        self.control_uri = str(self._daemon.register(WorkerControl(self), objectId=rpc.WORKER_OBJECT))
        self._threads.append(rpc.serve_in_thread(self._daemon, "ppq-worker-control"))

    def start(self) -> None:
        """Start executors, the control object and the helper threads."""
        rpc.apply_tls(self.config.tls, server=True)
        self._done_reporting = threading.Event()
        self._autodiscover()
        self._start_executors()
        self._serve_control()
        try:
            self._call("heartbeat", self.info(), self.queue_index, [])
        except (PPQError, rpc.CommunicationError) as exc:
            log.warning("no master answered at start (%s); will keep trying", exc)
        for target, name in ((self._fetcher, "fetcher"), (self._reporter, "reporter"),
                             (self._heartbeat, "heartbeat")):
            t = threading.Thread(target=target, name=f"ppq-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        log.info("worker %s: %d %s executor(s) on queue_index %s, masters %s, control %s", self.id,
                 self.concurrency, self.config.worker.pool, self.queue_index, ", ".join(self.masters),
                 self.control_uri)

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
        # A long-poll in flight may still bring tasks: wait for it, then hand them back.
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
        unfinished = [s.running.task for s in self.slots if s.running is not None]
        for slot in self.slots:
            if slot.running is not None:
                slot.running = None
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

    def _close(self) -> None:
        for slot in self.slots:
            slot.close()
        if self._daemon is not None:
            self._daemon.shutdown()
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
