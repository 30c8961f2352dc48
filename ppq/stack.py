"""A whole local stack under one supervisor: what ``ppq up`` runs.

:class:`Stack` runs a master in this process (with its embedded redis-server when
``master.redis_map`` is empty) and worker agents as child processes; it watches them
and stops them in order:

1. the workers, gracefully (SIGINT, as Ctrl-C would): they take no new task, let the
   running ones finish (up to ``worker.task_timeout``) and report them; a second
   :meth:`Stack.request_stop` with ``now`` (a second Ctrl-C) stops them at once and
   they hand their running tasks back to the queue;
2. the master;
3. the embedded redis-server.

The workers run in sessions of their own, so a terminal's Ctrl-C reaches this process
only and the order above holds; they die with it if it is killed outright (Linux's
parent-death signal). Their output is relayed to this process's own, so a closed
pipe (``ppq up | tee log``, then tee exits) never breaks a worker or a task that prints:
the stack notices its standard output is gone and stops as on a signal.

With ``dashboard``, the web dashboard (``ppq dashboard``) runs as one more child, started
after the workers and stopped with them. It is optional: without its libraries, or with its
port taken, the stack says so in one log line and goes on without it; a dashboard that dies
is started again, or, if it died on a configuration error or right after its start, left
stopped with one log line, and the stack goes on.

A worker that dies on its own is named in one log line and started again, unless it
exited on a configuration error (another would fail the same way) or died within
:data:`DEFAULT_QUICK_DEATH` seconds of its start (it would only die again): then the
whole stack stops. If the embedded redis-server dies, the whole stack stops.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import select
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from .config import Config, connect_address
from .errors import ConfigError
from .master import MasterServer

log = logging.getLogger("ppq.stack")

# A worker that exits this many seconds or fewer after its start is not started again.
DEFAULT_QUICK_DEATH = 5.0
# Seconds a stopping worker gets beyond worker.task_timeout + worker.max_sleep (its own bounds) before SIGKILL.
DEFAULT_STOP_GRACE = 20.0
# The exit code of `ppq worker` on a configuration error.
WORKER_CONFIG_EXIT = 2

# How a stack ended (Stack.run's return value; Stack.reason says more).
STOPPED = "stopped"  # asked to: a signal, or its standard output was closed
WORKER_CONFIG = "worker_config"  # a worker exited on a configuration error
DIED = "died"  # a child died and was not started again

_PR_SET_PDEATHSIG = 1
try:  # loaded here, not between fork and exec
    _prctl: Any = ctypes.CDLL("libc.so.6", use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - not Linux: the workers then outlive a killed `ppq up`
    _prctl = None


def _own_session_dying_with_parent() -> None:  # pragma: no cover - runs in the child
    os.setsid()
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class _Relay:
    """Copies the workers' stdout and stderr to this process's, byte for byte, in one thread.

    A write that fails (the reader of this process's output is gone) is dropped, and the
    workers' pipes keep being drained, so that they never block or break on output.
    """

    def __init__(self) -> None:
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._pending: list[tuple[Any, int]] = []
        self._open = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="ppq-stack-relay", daemon=True)
        self._thread.start()

    def add(self, proc: subprocess.Popen[bytes]) -> None:
        with self._lock:
            for pipe, target in ((proc.stdout, 1), (proc.stderr, 2)):
                if pipe is not None:
                    self._pending.append((pipe, target))
                    self._open += 1

    def close(self, timeout: float = 5.0) -> None:
        """Stop once every pipe added has reached its end (the workers and whatever they started have
        exited), each closed then; after ``timeout``, the thread goes on with those still open."""
        self._closing = True
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._lock:
                for pipe, target in self._pending:
                    self._selector.register(pipe, selectors.EVENT_READ, target)
                self._pending.clear()
                if self._closing and self._open == 0:
                    break
            for key, _ in self._selector.select(0.1):
                try:
                    data = os.read(key.fd, 65536)
                except OSError:
                    data = b""
                if not data:  # the worker (and all it started) has exited
                    self._selector.unregister(key.fileobj)
                    key.fileobj.close()  # type: ignore[union-attr]
                    with self._lock:
                        self._open -= 1
                    continue
                with contextlib.suppress(OSError):
                    view = memoryview(data)
                    while view:
                        view = view[os.write(key.data, view):]
        self._selector.close()


class Stack:
    """A master (and its embedded redis-server) in this process and ``workers`` worker agents.

    ``config_path`` is handed to the workers (``--config``), with ``concurrency`` and
    ``allow`` (their allowed modules) when given. :meth:`start`, then :meth:`run`, which
    supervises until asked to stop and then stops everything. The master's start is
    logged at ``announce`` (DEBUG when the caller prints it).
    """

    def __init__(self, config: Config, workers: int = 1, config_path: str | None = None,
                 concurrency: int | None = None, allow: list[str] | None = None,
                 announce: int = logging.INFO, dashboard: bool = False, launcher: list[str] | None = None) -> None:
        self.config = config
        # The command that runs ppq's CLI in a child (``manage.py ppq`` under Django).
        self.launcher = list(launcher or [sys.executable, "-m", "ppq"])
        self.announce = announce
        self.worker_count = workers
        self.config_path = config_path
        self.concurrency = concurrency
        self.allow = allow or []
        self.server: MasterServer | None = None
        self.address = ""
        self.workers: list[subprocess.Popen[bytes]] = []
        self.reason = ""
        self.stopping = threading.Event()
        self._now = False
        self._started_at: dict[int, float] = {}
        self._relay: _Relay | None = None
        self._output: _Output | None = None
        self.want_dashboard = dashboard
        # The dashboard's process and URL while it runs; why it does not, when it was wanted.
        self.dashboard: subprocess.Popen[bytes] | None = None
        self.dashboard_url = ""
        self.dashboard_note = ""
        self._dashboard_port = 0

    # -- start --

    def start(self) -> Stack:
        """Start the master (and its embedded redis-server), then the workers."""
        self._output = _Output(sys.stdout)
        server = MasterServer(self.config, self.announce).start()
        qi = self.config.worker.queue_index
        if qi not in server.stores:
            server.stop()
            raise ConfigError(f"worker.queue_index: {qi} is not served by this master (master.redis_map has "
                              f"{', '.join(map(str, sorted(server.stores)))})")
        self.server = server
        self.address = connect_address(self.config.master.host, int(server.port))
        self._relay = _Relay()
        try:
            for _ in range(self.worker_count):
                self.workers.append(self._start_worker())
            if self.want_dashboard:
                self._start_dashboard()
        except BaseException:
            self.stop()
            raise
        return self

    def worker_command(self) -> list[str]:
        command = list(self.launcher)
        if self.config_path:
            command += ["--config", self.config_path]
        command += ["worker", "--master-hosts", self.address, "--port", "0", "--queue-index",
                    str(self.config.worker.queue_index)]
        if self.concurrency is not None:
            command += ["--concurrency", str(self.concurrency)]
        for module in self.allow:
            command += ["--allow", module]
        return command

    def _start_worker(self) -> subprocess.Popen[bytes]:
        return self._start_child(self.worker_command())

    def _start_dashboard(self) -> None:
        """Start the dashboard (``ppq dashboard``) on ``dashboard.host:dashboard.port`` (a free port
        for 0), or say in one log line why it does not run. A non-loopback host without a token is
        a ConfigError, as it is for ``ppq dashboard``."""
        from . import dashboard
        from .embedded import free_port

        missing = dashboard.missing_libraries()
        if missing:
            self.dashboard_note = (f"dashboard off: {', '.join(missing)} not installed "
                                   f"(pip install starlette uvicorn jinja2)")
            log.warning("%s", self.dashboard_note)
            return
        dashboard.check_bind(self.config)
        host = self.config.dashboard.host
        port = self.config.dashboard.port or free_port()
        taken = _cannot_listen(host, port)
        if taken:
            self.dashboard_note = f"dashboard off: cannot listen on {host}:{port} ({taken}); set dashboard.port"
            log.warning("%s", self.dashboard_note)
            return
        self._dashboard_port = port
        self.dashboard_url = f"http://{connect_address(host, port)}/"
        self.dashboard = self._start_child(self.dashboard_command())

    def dashboard_command(self) -> list[str]:
        command = list(self.launcher)
        if self.config_path:
            command += ["--config", self.config_path]
        command += ["dashboard", "--master", self.address, "--host", self.config.dashboard.host,
                    "--port", str(self._dashboard_port)]
        if self.config.dashboard.read_only:
            command.append("--read-only")
        return command

    def _start_child(self, command: list[str]) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        if self.config.log_level:
            env["PPQ_LOG_LEVEL"] = self.config.log_level
        env["PPQ_LOG_FORMAT"] = self.config.log_format
        env.setdefault("PYTHONUNBUFFERED", "1")  # its output goes through a pipe to ours: keep it prompt
        proc = subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, preexec_fn=_own_session_dying_with_parent)
        self._started_at[proc.pid] = time.monotonic()
        assert self._relay is not None
        self._relay.add(proc)
        return proc

    # -- run --

    def request_stop(self, now: bool = False) -> None:
        """Ask the stack to stop; ``now`` a second time: the workers stop at once. Safe in a signal handler."""
        if now and self.stopping.is_set():
            self._now = True
        self.stopping.set()

    def install_signal_handlers(self) -> None:
        """SIGINT, SIGTERM, SIGHUP and SIGUSR1 stop the stack; a second SIGINT stops the workers at once."""
        def handler(signum: int, frame: Any) -> None:
            self.request_stop(now=signum == signal.SIGINT)

        for name in ("SIGINT", "SIGTERM", "SIGHUP", "SIGUSR1"):
            signal.signal(getattr(signal, name), handler)

    def run(self, on_stopping: Callable[[], None] = lambda: None, interval: float = 0.5) -> str:
        """Supervise until asked to stop or a child dies for good, then stop everything (calling
        ``on_stopping`` first); return :data:`STOPPED`, :data:`WORKER_CONFIG` or :data:`DIED`."""
        outcome = STOPPED
        output = self._output or _Output(sys.stdout)
        try:
            while not self.stopping.wait(interval):
                if output.closed():
                    log.warning("standard output was closed: stopping")
                    break
                outcome = self._check_children()
                if outcome != STOPPED:
                    break
        finally:
            self.stopping.set()
            with contextlib.suppress(Exception):
                on_stopping()
            self.stop()
        return outcome

    def _check_children(self) -> str:
        """Start again a worker that died; say why the stack cannot go on, or STOPPED if it can."""
        embedded = self.server.embedded if self.server is not None else None
        process = embedded.process if embedded is not None else None
        if process is not None and process.poll() is not None:
            self.reason = f"the embedded redis-server (pid {process.pid}) exited with {process.returncode}"
            log.error("%s; stopping everything", self.reason)
            return DIED
        for i, child in enumerate(self.workers):
            if child.poll() is None or self.stopping.is_set():
                continue
            if child.returncode == WORKER_CONFIG_EXIT:
                # Its one-line error is above; another worker would only fail the same way.
                self.reason = f"worker pid {child.pid} stopped on a configuration error"
                return WORKER_CONFIG
            lived = time.monotonic() - self._started_at.pop(child.pid, 0.0)
            if lived <= DEFAULT_QUICK_DEATH:
                self.reason = (f"worker pid {child.pid} exited with {child.returncode} {lived:.1f}s after it "
                               f"started")
                log.error("%s; stopping everything rather than starting it again", self.reason)
                return DIED
            log.warning("worker pid %s exited with %s; starting another", child.pid, child.returncode)
            self.workers[i] = self._start_worker()
        self._check_dashboard()
        return STOPPED

    def _check_dashboard(self) -> None:
        """Start the dashboard again if it died, unless it died on a configuration error or right
        after its start: then the stack goes on without it."""
        child = self.dashboard
        if child is None or child.poll() is None or self.stopping.is_set():
            return
        lived = time.monotonic() - self._started_at.pop(child.pid, 0.0)
        if child.returncode == WORKER_CONFIG_EXIT or lived <= DEFAULT_QUICK_DEATH:
            self.dashboard = None
            self.dashboard_note = (f"the dashboard (pid {child.pid}) exited with {child.returncode} "
                                   f"{lived:.1f}s after it started")
            log.error("%s; the stack goes on without it", self.dashboard_note)
            return
        log.warning("the dashboard (pid %s) exited with %s; starting another", child.pid, child.returncode)
        self.dashboard = self._start_child(self.dashboard_command())

    # -- stop --

    def stop(self) -> None:
        """Stop the workers (gracefully, then at once if asked again or past their bounds), then the
        master, then its embedded redis-server. Safe to call more than once."""
        self.stopping.set()
        live = [w for w in self.workers if w.poll() is None]
        if self.dashboard is not None and self.dashboard.poll() is None:
            live.append(self.dashboard)
        for child in live:
            with contextlib.suppress(ProcessLookupError):
                # SIGTERM for the dashboard: it stops the same once serving, and, still starting,
                # it ends quietly where a SIGINT would print a KeyboardInterrupt traceback.
                child.send_signal(signal.SIGTERM if child is self.dashboard else signal.SIGINT)
        w = self.config.worker
        deadline = time.monotonic() + w.task_timeout + w.max_sleep + DEFAULT_STOP_GRACE
        told_now = False
        while any(child.poll() is None for child in live) and time.monotonic() < deadline:
            if self._now and not told_now:
                told_now = True
                log.warning("stopping the workers at once: their running tasks go back to the queue")
                for child in live:
                    if child is self.dashboard:
                        continue
                    with contextlib.suppress(ProcessLookupError):
                        child.send_signal(signal.SIGINT)  # a worker's second SIGINT: stop now
            time.sleep(0.05)
        for child in live:
            if child.poll() is None:
                log.warning("%s pid %s did not stop in time: killing it",
                            "the dashboard" if child is self.dashboard else "worker", child.pid)
                child.kill()
                child.wait(10)
        relay, self._relay = self._relay, None
        if relay is not None:
            relay.close()
        server, self.server = self.server, None
        if server is not None:
            server.stop()  # the master, then its embedded redis-server


def _cannot_listen(host: str, port: int) -> str:
    """Why ``host:port`` cannot be listened on ("" if it can)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as exc:
            return str(exc.strerror or exc)
    return ""


class _Output:
    """Whether this process's standard output has gone away: the reader of its pipe or socket
    has closed it, or it was pointed at /dev/null after a write to it failed (rich does so)."""

    def __init__(self, stream: Any) -> None:
        try:
            self.fd = stream.fileno()
            st = os.fstat(self.fd)
            self.identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except (AttributeError, OSError, ValueError):
            self.identity = None

    def closed(self) -> bool:
        if self.identity is None:
            return False
        try:
            st = os.fstat(self.fd)
        except OSError:
            return True
        if (st.st_dev, st.st_ino) != self.identity:
            return True
        poller = select.poll()
        poller.register(self.fd, 0)  # errors and hang-ups are always reported
        return any(event & (select.POLLERR | select.POLLHUP) for _, event in poller.poll(0))
