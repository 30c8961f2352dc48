"""Tools for attacking real ppq processes from outside, as an attacker would.

- :class:`Target`: a ``ppq master`` (or ``ppq worker``) subprocess started under an
  address-space cap (``prlimit --as``), so that a runaway allocation ends in a
  MemoryError or a dead process instead of exhausting the machine; its memory
  (VmRSS, VmHWM) and CPU time are read from /proc.
- Pyro5 messages built byte by byte (:func:`message`, :func:`connect_body`,
  :func:`invoke_body`), raw sockets that open a connection, authenticate, send and
  read replies with deadlines (:func:`outcome`), and marshal streams that declare
  huge containers or expand through back-references.
"""

from __future__ import annotations

import json
import marshal
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ppq.embedded import free_port
from ppq.rpc import PyroFunc

TESTS_DIR = Path(__file__).resolve().parent
REPO = TESTS_DIR.parent

# Address-space cap of an attacked process: an idle master runs in a fraction of it
# (threads reserve virtual memory: keep thread pools small in attacked configs).
ADDRESS_SPACE_CAP = 1536 * 1024 * 1024

# Pyro5 wire format (Pyro5/protocol.py).
HEADER = struct.Struct("!4sHBBHHII16sHH")
PROTOCOL = 502
MAGIC = 0x4DC5
CONNECT, CONNECTOK, CONNECTFAIL, INVOKE, RESULT, PING = 1, 2, 3, 4, 5, 6
SERPENT, MARSHAL, JSON, MSGPACK = 1, 2, 3, 4
FLAG_EXCEPTION, FLAG_COMPRESSED, FLAG_ONEWAY = 1, 2, 4

_CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- processes --------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """The Vm* figures of /proc/<pid>/status, in bytes."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("Vm"):
                name, value = line.split(":", 1)
                out[name] = int(value.split()[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def ppq_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPQ_")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO), env.get("PYTHONPATH", "")])
    env["MALLOC_ARENA_MAX"] = "2"
    env.update(extra or {})
    return env


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.02) -> Any:
    """Poll ``predicate`` until it is truthy (returned) or ``timeout`` passed (its last value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        socket.create_connection((host, port), timeout=1).close()
        return True
    except OSError:
        return False


class Target:
    """A ``python -m ppq`` subprocess under an address-space cap, its log in a file."""

    def __init__(self, args: Sequence[str], log_path: Path, env: dict[str, str] | None = None,
                 cap: int | None = ADDRESS_SPACE_CAP, cwd: str | None = None) -> None:
        command = [sys.executable, "-m", "ppq", *args]
        if cap:
            command = ["prlimit", f"--as={cap}", "--", *command]
        self.log_path = log_path
        with open(log_path, "wb") as out:
            # prlimit execs the command: the pid is the ppq process itself.
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ppq_env(env),
                                         cwd=cwd or str(TESTS_DIR), stdin=subprocess.DEVNULL)
        self.pid = self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None and alive(self.pid)

    def status(self) -> dict[str, int]:
        return proc_status(self.pid)

    def rss(self) -> int:
        return self.status()["VmRSS"]

    def hwm(self) -> int:
        return self.status()["VmHWM"]

    def cpu(self) -> float:
        return cpu_seconds(self.pid)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass


class Master(Target):
    """A ``ppq master`` on a free loopback port."""

    def __init__(self, tmp_path: Path, redis_url: str, token: str | None, config: dict[str, Any] | None = None,
                 extra: Sequence[str] = (), env: dict[str, str] | None = None,
                 cap: int | None = ADDRESS_SPACE_CAP, name: str = "master") -> None:
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.token = token
        args = []
        if config:
            path = tmp_path / f"{name}-{self.port}.yaml"
            path.write_text(json.dumps(config))  # JSON is YAML
            args += ["--config", str(path)]
        args += ["master", "--port", str(self.port), "--redis-map", f"0={redis_url}", *extra]
        env = dict(env or {})
        if token:
            env.setdefault("PPQ_AUTH_TOKEN", token)
        super().__init__(args, tmp_path / f"{name}-{self.port}.log", env=env, cap=cap)

    def wait_ready(self, timeout: float = 30.0) -> Master:
        wait_until(lambda: not self.alive() or port_open(self.port), timeout, interval=0.05)
        ping = PyroFunc(self.address, timeout=2, default_return=None, token=self.token)
        try:
            wait_until(lambda: not self.alive() or ping("ping") == "pong", timeout, interval=0.05)
        finally:
            ping.close()
        assert self.alive(), f"master did not start:\n{self.log()}"
        return self


def client_ok(address: str, token: str | None, within: float = 3.0, push: bool = True,
              objid: str = "queue") -> float:
    """Assert that a fresh authenticated client pings (and pushes) within ``within``
    seconds; return how long it took."""
    start = time.monotonic()
    call = PyroFunc(address, token=token, timeout=within, objid=objid)
    try:
        assert call("ping") == "pong"
        if push:
            task_id = call("push_task", "ok", module="redteam_tasks", args=[1])
            assert isinstance(task_id, str) and task_id
    finally:
        call.close()
    took = time.monotonic() - start
    assert took < within, f"a fresh client took {took:.2f}s"
    return took


# -- Pyro5 messages ----------------------------------------------------------------------


def message(kind: int, data: bytes = b"", *, serializer: int = MARSHAL, flags: int = 0, seq: int = 0,
            size: int | None = None, annotations: bytes = b"") -> bytes:
    """One Pyro5 message; ``size`` declares a data size other than ``len(data)``."""
    declared = len(data) if size is None else size
    return HEADER.pack(b"PYRO", PROTOCOL, kind, serializer, flags, seq, declared, len(annotations),
                       bytes(16), 0, MAGIC) + annotations + data


def connect_body(token: str | None, obj: str = "queue") -> bytes:
    return marshal.dumps({"handshake": {"token": token or "", "ppq": 1}, "object": obj})


def invoke_body(method: str, args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None,
                obj: str = "queue") -> bytes:
    return marshal.dumps((obj, method, list(args), kwargs or {}))


def parse_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition("@")[2].rpartition(":")
    return host, int(port)


def raw_socket(address: str, timeout: float = 5.0) -> socket.socket:
    sock = socket.create_connection(parse_address(address), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def recv_exactly(sock: socket.socket, size: int, deadline: float) -> bytes | None:
    """``size`` bytes, or None if the peer closed (or reset) first; TimeoutError at ``deadline``."""
    chunks = []
    while size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no reply before the deadline")
        sock.settimeout(remaining)
        try:
            chunk = sock.recv(min(size, 1 << 20))
        except TimeoutError:
            raise TimeoutError("no reply before the deadline") from None
        except OSError:
            return None
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def read_message(sock: socket.socket, deadline: float) -> tuple[int, int, bytes] | None:
    """The next message as (type, flags, data), or None if the connection ended."""
    head = recv_exactly(sock, HEADER.size, deadline)
    if head is None:
        return None
    tag, _, kind, _, flags, _, size, annotations, _, _, _ = HEADER.unpack(head)
    assert tag == b"PYRO", head
    body = recv_exactly(sock, size + annotations, deadline)
    if body is None:
        return None
    return kind, flags, body[annotations:]


CLOSED = "closed"
TIMEOUT = "timeout"


def outcome(sock: socket.socket, timeout: float) -> Any:
    """What the server did within ``timeout``: CLOSED, TIMEOUT, or the (type, flags, data) it sent."""
    try:
        msg = read_message(sock, time.monotonic() + timeout)
    except TimeoutError:
        return TIMEOUT
    return CLOSED if msg is None else msg


def refused(result: Any) -> bool:
    """True if an :func:`outcome` is a refusal: a closed connection, CONNECTFAIL or an error reply."""
    if result == CLOSED:
        return True
    if result == TIMEOUT:
        return False
    kind, flags, _ = result
    return kind == CONNECTFAIL or bool(flags & FLAG_EXCEPTION)


def send_quietly(sock: socket.socket, data: bytes) -> bool:
    """sendall that reports a peer that closed or reset instead of raising."""
    try:
        sock.sendall(data)
        return True
    except OSError:
        return False


def authed_socket(address: str, token: str | None, obj: str = "queue", timeout: float = 5.0) -> socket.socket:
    """A raw connection past the handshake."""
    sock = raw_socket(address, timeout)
    sock.sendall(message(CONNECT, connect_body(token, obj)))
    reply = read_message(sock, time.monotonic() + timeout)
    assert reply is not None and reply[0] == CONNECTOK, f"handshake refused: {reply!r:.200}"
    return sock


def close_all(socks: Iterable[socket.socket]) -> None:
    for sock in socks:
        try:
            sock.close()
        except OSError:
            pass


# -- marshal streams ----------------------------------------------------------------------


def m_int(n: int) -> bytes:
    return struct.pack("<i", n)


def m_str(text: str) -> bytes:
    """A short ASCII str in marshal's format (no back-reference slot)."""
    raw = text.encode("ascii")
    assert len(raw) < 256
    return b"z" + bytes([len(raw)]) + raw


def m_dict(items: Iterable[tuple[bytes, bytes]]) -> bytes:
    return b"{" + b"".join(k + v for k, v in items) + b"0"


FLAG_REF = 0x80


def expanding(depth: int, fanout: int, leaf: bytes) -> bytes:
    """A marshal list nested ``depth`` levels, each level holding ``fanout`` back-references
    to the level below: a few bytes per level on the wire, ``fanout ** depth`` leaves once
    walked as a tree. The outermost list takes back-reference slot 0, so put nothing with
    a slot before it."""
    def level(k: int) -> bytes:
        if k == 0:
            return bytes([ord("[") | FLAG_REF]) + m_int(1) + leaf
        # The first item defines the level below (slot depth - k + 1); the others refer to it.
        return (bytes([ord("[") | FLAG_REF]) + m_int(fanout) + level(k - 1)
                + (b"r" + m_int(depth - k + 1)) * (fanout - 1))

    return level(depth)


def chunks_of_push(tasks: int, payload: int, module: str = "redteam_tasks") -> tuple[int, Iterator[bytes]]:
    """A push_tasks call of ``tasks`` tasks of ``payload`` bytes each, as (size, chunks)
    for a message streamed without holding it whole."""
    head = b"(" + m_int(4) + m_str("queue") + m_str("push_tasks") + b"[" + m_int(1) + b"[" + m_int(tasks)
    tail = b"{0"  # kwargs: an empty dict

    def task(i: int) -> bytes:
        data = bytes([i % 251]) * payload
        return marshal.dumps({"func": "ok", "module": module, "args": [data], "task_id": f"bulk-{i:08d}"}, 2)

    size = len(head) + len(task(0)) * tasks + len(tail)

    def gen() -> Iterator[bytes]:
        yield head
        for i in range(tasks):
            yield task(i)
        yield tail

    return size, gen()


class Sampler:
    """Samples a pid's CPU time in the background; the highest VmHWM is in /proc already."""

    def __init__(self, func: Callable[[], float], interval: float = 0.05) -> None:
        self.values: list[tuple[float, float]] = []
        self._func = func
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        while not self._stop.is_set():
            try:
                self.values.append((time.monotonic(), self._func()))
            except OSError:
                return
            self._stop.wait(interval)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
