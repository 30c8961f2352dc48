"""The agent's lifecycle: start, run, and stop (gracefully, now, or to restart)."""

from __future__ import annotations

import importlib
import logging
import os
import random
import socket
import threading
import time
import uuid
from typing import Any

from .. import rpc
from ..allow import MAX_ALLOW_CHARS, MAX_ALLOW_NAMES, allow_list
from ..config import Config
from ..errors import ConfigError, PPQError
from .backoff import Outage
from .control import WorkerControl
from .fetcher import Fetcher
from .heartbeat import Heartbeat
from .pool import Pool
from .reporter import Reporter

log = logging.getLogger("ppq.worker")

# How the agent was asked to stop.
GRACEFUL = "graceful"
RESTART = "restart"
NOW = "now"

# Longest long-poll a master takes (ppq.master.MAX_POLL), in seconds.
LONGEST_POLL = 300.0
# Seconds a call that does not wait (heartbeat, report, release) may take before the agent tries
# another master; the long-poll may take its wait more.
CALL_TIMEOUT = 20.0


class Agent:
    """A worker agent. ``run()`` blocks until it is asked to stop; it returns how."""

    def __init__(self, config: Config) -> None:
        w = config.worker
        self.config = config
        self.queue_index = w.queue_index
        self.concurrency = w.concurrency or os.cpu_count() or 1
        self.task_timeout = w.task_timeout
        self.max_sleep = min(w.max_sleep, LONGEST_POLL)
        self.allowed_modules = list(w.allowed_modules)
        for package in w.autodiscover:
            if package not in self.allowed_modules:
                self.allowed_modules.append(package)
        # What masters are told this worker runs (task.allow_list): they lease it nothing else.
        self.allow = allow_list(self.allowed_modules)
        if self.allow == ["*"] and "*" not in self.allowed_modules:
            log.warning("worker.allowed_modules holds more names than masters route by (%d, %d characters in all): "
                        "masters lease this worker any task, and it refuses those it may not run",
                        MAX_ALLOW_NAMES, MAX_ALLOW_CHARS)
        self.host = socket.gethostname()
        self.id = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.started = time.time()
        addresses = config.worker_masters()
        if not addresses:
            raise ConfigError("worker.master_hosts is empty: give at least one master address")
        random.shuffle(addresses)
        self.masters = [rpc.master_uri(a) for a in addresses]
        # Name server entries (PYRONAME:, PYROMETA:) stand for the masters that serve this queue_index.
        self.call = rpc.PyroFunc(self.masters, retry=1, token=config.worker_secret, timeout=CALL_TIMEOUT,
                                 queue_index=self.queue_index)
        # The fetcher's long-polls: a master that vanished is given up after the wait and CALL_TIMEOUT.
        self.poll = rpc.PyroFunc(self.masters, retry=1, token=config.worker_secret,
                                 timeout=self.max_sleep + CALL_TIMEOUT, queue_index=self.queue_index)
        self._stop_mode: str | None = None
        self.stop_event = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.pool = Pool(config, self.concurrency, self.allowed_modules, lambda: self.stopping, self._wake)
        self.fetcher = Fetcher(self)
        self.reporter = Reporter(self)
        self.heartbeat = Heartbeat(self)
        # After an outage, a heartbeat at once: leases extended, and the worker listed with its full info.
        self.outage = Outage(on_back=self.heartbeat.refresh)
        self.pool.report = self.reporter.outbox.put
        self.control_uri = ""
        self._daemon: rpc.Daemon | None = None
        self._threads: list[threading.Thread] = []
        self.metrics: Any = None

    # -- signals and flags --

    def request_stop(self, mode: str = GRACEFUL) -> None:
        """Ask the agent to stop; safe to call from a signal handler."""
        if mode == NOW or self._stop_mode is None or (mode == RESTART and self._stop_mode == GRACEFUL):
            self._stop_mode = mode
        self.stop_event.set()
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
        """What every report call carries: enough to know the worker, how long it stays listed and
        which modules it runs (masters lease it only tasks of those)."""
        return {"id": self.id, "heartbeat_interval": self.config.worker.heartbeat_interval, "allow": self.allow}

    def info(self) -> dict[str, Any]:
        running = [r.task["id"] for _, r, _ in self.pool.running_tasks()]
        counters = self.pool.counters
        return {
            "id": self.id, "host": self.host, "pid": os.getpid(), "queue_index": self.queue_index,
            "concurrency": self.concurrency, "pool": self.config.worker.pool, "started": self.started,
            "running": running, "done": counters.done, "failed": counters.failed,
            "control_uri": self.control_uri, "heartbeat_interval": self.config.worker.heartbeat_interval,
            "allow": self.allow,
        }

    def running_info(self) -> dict[str, Any]:
        now = time.monotonic()
        wall = time.time()
        tasks = []
        for slot, r, start in self.pool.running_tasks():
            t = r.task
            elapsed = now - start if start else 0.0
            tasks.append({"id": t["id"], "func": t["func"], "module": t["module"], "fclass": t.get("fclass", ""),
                          "started": wall - elapsed, "elapsed": elapsed, "executor": slot.index,
                          "executor_pid": slot.pid})
        info = self.info()
        info["tasks"] = tasks
        info["waiting"] = len(self.pool.inbox)
        return info

    def stats_snapshot(self) -> dict[str, Any]:
        return {name: s.as_dict() for name, s in list(self.pool.counters.per_func.items())}

    # -- starting --

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
        self._autodiscover()
        self.pool.start_executors()
        self._serve_control()
        if self.config.worker.metrics_port:
            from ..metrics import WorkerMetrics

            self.metrics = self.pool.metrics = WorkerMetrics()
            try:
                self.metrics.serve(self.config.worker.metrics_host, self.config.worker.metrics_port,
                                   self.config.client_secret)
            except OSError as exc:
                raise ConfigError(f"worker.metrics_port: cannot listen on {self.config.worker.metrics_port}: "
                                  f"{exc.strerror or exc}") from None
        # Listed with its full info (control_uri included) before it asks for a task.
        self.heartbeat.beat()
        for target, name in ((self.fetcher.run, "fetcher"), (self.reporter.run, "reporter"),
                             (self.heartbeat.run, "heartbeat")):
            t = threading.Thread(target=target, name=f"ppq-{name}", daemon=True)
            t.start()
            self._threads.append(t)
        kind = {"processes": "process", "threads": "thread"}[self.config.worker.pool]
        log.info("worker %s: %d executor %s%s on queue_index %s, masters %s, control %s", self.id,
                 self.concurrency, kind, "" if self.concurrency == 1 else ("es" if kind == "process" else "s"),
                 self.queue_index, ", ".join(self.masters), self.control_uri)

    # -- running and stopping --

    def run(self) -> str:
        """Run until asked to stop; return the stop mode (graceful, restart or now)."""
        self.start()
        try:
            while not self.stopping:
                self.pool.supervise_once(0.5, self._wake_r)
            self._shutdown()
        finally:
            self._close()
        return self._stop_mode or GRACEFUL

    def _shutdown(self) -> None:
        mode = self._stop_mode
        pool = self.pool
        log.info("stopping (%s): no new tasks; %d running", mode, pool.busy())
        with pool.cond:
            pool.cond.notify_all()
        # The long-poll in flight ends at once (the master answers it with no task)...
        self._release(leaving=False)
        # ...or may still bring tasks: wait for it, then hand them back.
        deadline = time.monotonic() + min(self.max_sleep, CALL_TIMEOUT) + 2
        while self.fetcher.fetching.is_set() and time.monotonic() < deadline and self._stop_mode != NOW:
            time.sleep(0.02)
        with pool.cond:
            waiting = list(pool.inbox)
            pool.inbox.clear()
        pool.hand_back(waiting)
        deadline = time.monotonic() + self.task_timeout
        while pool.busy() and self._stop_mode != NOW and time.monotonic() < deadline:
            pool.supervise_once(min(0.5, max(deadline - time.monotonic(), 0)), self._wake_r)
        unfinished = pool.kill_unfinished()
        pool.hand_back(unfinished)
        if unfinished:
            log.warning("%d task(s) did not finish in time and were handed back", len(unfinished))
        deadline = time.monotonic() + 15
        while not self.reporter.outbox.empty() and time.monotonic() < deadline:
            time.sleep(0.02)
        self.reporter.done.set()
        for t in self._threads:
            if t.name in ("ppq-reporter",):
                t.join(15)

    def _release(self, leaving: bool) -> None:
        """Tell the master this agent is stopping: its long-poll ends; with ``leaving``, it is
        taken off the list of live workers at once (the last heartbeat has been sent)."""
        if leaving:
            # Reporting is over (or never began): the heartbeat thread ends at its next wait.
            self.reporter.done.set()
            self.heartbeat.wake.set()
            for t in self._threads:
                if t.name == "ppq-heartbeat":
                    t.join(5)
        try:
            self.call("release_worker", self.light_info(), self.queue_index, leaving)
        except (PPQError, rpc.CommunicationError) as exc:
            log.debug("could not tell the master this worker is stopping: %s", exc)

    def _close(self) -> None:
        self._release(leaving=True)
        self.pool.close()
        if self._daemon is not None:
            self._daemon.shutdown()
        if self.metrics is not None:
            self.metrics.stop()
        self.call.close()
        self.poll.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        counters = self.pool.counters
        log.info("worker %s stopped: %d done, %d failed", self.id, counters.done, counters.failed)
