"""Attacks on real ppq processes from outside, black box.

Every test starts its own ``ppq master`` (and ``ppq worker`` where needed) as a
subprocess under an address-space cap (tests/attack_tools.py), attacks it the way
an outside attacker would (raw sockets speaking Pyro5's wire format, plain Pyro5
proxies, ppq's PyroFunc with a valid token), and asserts on behaviour only: the
process's memory and CPU time read from /proc, how long the server takes to refuse
or close, what ends up in Redis and in the log, and that a fresh authenticated
client still gets in and is served within a couple of seconds.

A refused attack may show as a closed connection or as an error reply; both pass.
"""

from __future__ import annotations

import http.client
import json
import marshal
import os
import socket
import stat
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from ppq import PyroFunc
from ppq.embedded import RedisServer, free_port

from .attack_tools import (
    CLOSED,
    CONNECT,
    CONNECTFAIL,
    CONNECTOK,
    FLAG_COMPRESSED,
    INVOKE,
    TIMEOUT,
    Master,
    Target,
    authed_socket,
    chunks_of_push,
    client_ok,
    close_all,
    connect_body,
    expanding,
    invoke_body,
    m_dict,
    m_int,
    m_str,
    message,
    outcome,
    port_open,
    raw_socket,
    refused,
    send_quietly,
    wait_until,
)

TOKEN = "attack-test-token"
MiB = 1024 * 1024
# Memory an attack may add to the master's resident high-water mark.
SMALL_GROWTH = 50 * MiB
# ... and to its peak address space (new threads' stacks and malloc heaps reserve some).
SMALL_PEAK_GROWTH = 250 * MiB
# A declared element count whose array alone is 800 MB (8 bytes per slot).
HUGE_COUNT = 100_000_000


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def targets() -> Iterator[list[Target]]:
    started: list[Target] = []
    yield started
    for target in started:
        target.stop()


@pytest.fixture
def start_master(tmp_path: Path, redis_a: RedisServer, ra: redis.Redis,
                 targets: list[Target]) -> Callable[..., Master]:
    """Start a capped ``ppq master`` on redis_a (flushed) with ``TOKEN``; wait until it serves."""

    def start(config: dict[str, Any] | None = None, token: str | None = TOKEN, extra: tuple[str, ...] = (),
              env: dict[str, str] | None = None, ready: bool = True, **kwargs: Any) -> Master:
        master = Master(tmp_path, redis_a.url, token, config=config, extra=extra, env=env, **kwargs)
        targets.append(master)
        return master.wait_ready() if ready else master

    return start


@pytest.fixture
def master(start_master: Callable[..., Master]) -> Master:
    return start_master({"master": {"threadpool_size": 16}})


def still_serving(master: Master, within: float = 3.0) -> None:
    """The master is alive and a fresh authenticated client pings and pushes within ``within`` s."""
    assert master.alive(), f"master died:\n{master.log()[-3000:]}"
    client_ok(master.address, master.token, within=within)


def assert_refused(result: Any, what: str) -> None:
    assert result != TIMEOUT, f"{what}: the server neither answered nor closed the connection"
    assert refused(result), f"{what}: not refused: {result!r:.300}"


class Pinger:
    """A client pinging the master in the background, recording each ping's latency."""

    def __init__(self, address: str, token: str | None) -> None:
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._connected = threading.Event()
        # PyroFunc keeps a connection per thread: the pinging thread connects before the attack starts.
        self._call = PyroFunc(address, token=token, timeout=5)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        assert self._connected.wait(5) and not self.errors, f"the pinger could not connect: {self.errors}"

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                start = time.monotonic()
                try:
                    self._call("ping")
                except Exception as exc:  # noqa: BLE001 - recorded, the test asserts on it
                    self.errors.append(f"{type(exc).__name__}: {exc}")
                    return
                finally:
                    self._connected.set()
                self.latencies.append(time.monotonic() - start)
                self._stop.wait(0.02)
        finally:
            self._call.close()

    def stop(self) -> float:
        """Stop; return the worst latency seen after the first ping."""
        self._stop.set()
        self._thread.join(7)
        return max(self.latencies[1:], default=0.0)


def attack_and_watch(master: Master, sock: socket.socket, data: bytes, deadline: float
                     ) -> tuple[Any, float, tuple[int, int]]:
    """Send ``data``; wait up to ``deadline`` s for the server's answer.

    Returns (outcome, CPU seconds the master spent meanwhile, growth of its memory: of its
    resident high-water mark and of its peak address space).
    """
    cpu0, before = master.cpu(), master.status()
    send_quietly(sock, data)
    result = outcome(sock, deadline)
    after = master.status()
    growth = (after["VmHWM"] - before["VmHWM"], after["VmPeak"] - before["VmPeak"])
    return result, master.cpu() - cpu0, growth


def assert_small_growth(growth: tuple[int, int], what: str, resident: int = SMALL_GROWTH,
                        peak: int = SMALL_PEAK_GROWTH) -> None:
    """Neither the master's resident high-water mark nor its peak address space grew much
    (an allocation that is never touched only shows in the second)."""
    hwm, vm = growth
    assert hwm < resident, f"{what} grew the master's resident memory by {hwm / MiB:.0f} MiB"
    assert vm < peak, f"{what} grew the master's address space by {vm / MiB:.0f} MiB"


# -- 1. a declared container size allocates before anything is checked ----------------------


@pytest.mark.parametrize("container", [b"(", b"["], ids=["tuple", "list"])
def test_preauth_declared_container_allocates_nothing(master: Master, container: bytes) -> None:
    """Five bytes of handshake body declaring 100 million items: no allocation, a refusal."""
    sock = raw_socket(master.address)
    try:
        result, cpu, growth = attack_and_watch(master, sock, message(CONNECT, container + m_int(HUGE_COUNT)), 10)
    finally:
        sock.close()
    assert_refused(result, "handshake declaring 100M items")
    assert_small_growth(growth, "a 5-byte handshake")
    still_serving(master)


def test_postauth_declared_list_allocates_nothing(master: Master) -> None:
    """An authenticated call whose arguments declare a list of 100 million items."""
    sock = authed_socket(master.address, TOKEN)
    body = b"(" + m_int(4) + m_str("queue") + m_str("push_task") + b"[" + m_int(HUGE_COUNT)
    try:
        result, cpu, growth = attack_and_watch(master, sock, message(INVOKE, body, seq=1), 10)
    finally:
        sock.close()
    assert_refused(result, "call declaring 100M items")
    assert_small_growth(growth, "a short call")
    still_serving(master)


# -- 2. marshal back-references expand when walked or re-encoded ------------------------------


def test_preauth_backreferences_with_class_key_bounded(master: Master) -> None:
    """A wrong-token handshake of about 1 KB whose body holds "__class__" (so it is walked for
    class dicts) and lists that refer to the level below 4 times each, 40 levels deep."""
    bomb = expanding(40, 4, m_str("__class__"))
    body = m_dict([(m_str("handshake"), m_dict([(m_str("token"), m_str("wrong")), (m_str("x"), bomb)])),
                   (m_str("object"), m_str("queue"))])
    assert len(body) < 2048
    pinger = Pinger(master.address, TOKEN)
    sock = raw_socket(master.address)
    try:
        result, cpu, growth = attack_and_watch(master, sock, message(CONNECT, body), 6)
    finally:
        sock.close()
        worst = pinger.stop()
    assert result != TIMEOUT, f"no answer to a 1 KB handshake in 6 s ({cpu:.1f} s of master CPU)"
    assert_refused(result, "expanding handshake")
    assert cpu < 3, f"a 1 KB handshake cost {cpu:.1f} s of master CPU"
    assert_small_growth(growth, "a 1 KB handshake")
    assert not pinger.errors, pinger.errors
    assert worst < 1.0, f"a connected client's ping took {worst:.2f} s during the attack"
    still_serving(master)


def test_postauth_backreferences_in_push_args_bounded(master: Master, ra: redis.Redis) -> None:
    """A push_task of about 1 KB whose args expand to 4**20 items when re-encoded."""
    bomb = expanding(20, 4, b"i" + m_int(7))
    kwargs = m_dict([(m_str("func"), m_str("ok")), (m_str("module"), m_str("redteam_tasks")),
                     (m_str("args"), bomb)])
    body = b"(" + m_int(4) + m_str("queue") + m_str("push_task") + b"[" + m_int(0) + kwargs
    assert len(body) < 2048
    pinger = Pinger(master.address, TOKEN)
    sock = authed_socket(master.address, TOKEN)
    try:
        result, cpu, growth = attack_and_watch(master, sock, message(INVOKE, body, seq=1), 6)
    finally:
        sock.close()
        worst = pinger.stop()
    assert result != TIMEOUT, f"no answer to a 1 KB push in 6 s ({cpu:.1f} s of master CPU)"
    assert_refused(result, "expanding push")
    assert cpu < 3, f"a 1 KB push cost {cpu:.1f} s of master CPU"
    assert_small_growth(growth, "a 1 KB push", resident=2 * SMALL_GROWTH)
    assert not pinger.errors, pinger.errors
    assert worst < 1.0, f"a connected client's ping took {worst:.2f} s during the attack"
    assert not ra.keys("ppq:0:t:*"), "the expanding push was stored"
    still_serving(master)


# -- 3. compressed messages inflate before auth -------------------------------------------


_ZEROS: list[bytes] = []


def compressed_zeros(size: int = 512 * MiB) -> bytes:
    """zlib of ``size`` zero bytes (about 2 MB), made once."""
    if not _ZEROS:
        packer = zlib.compressobj(1)
        block = bytes(16 * MiB)
        _ZEROS.append(b"".join(packer.compress(block) for _ in range(size // len(block))) + packer.flush())
    return _ZEROS[0]


def test_preauth_compressed_handshake_not_inflated(master: Master) -> None:
    """A 2 MB handshake flagged COMPRESSED that inflates to 512 MiB of zeros."""
    data = compressed_zeros()
    sock = raw_socket(master.address)
    try:
        result, cpu, growth = attack_and_watch(master, sock, message(CONNECT, data, flags=FLAG_COMPRESSED), 10)
    finally:
        sock.close()
    assert_refused(result, "compressed handshake")
    assert_small_growth(growth, "a compressed handshake")
    still_serving(master)


# -- 4. declared sizes and connections without a deadline -----------------------------------


def test_preauth_large_declared_size_refused_at_once(master: Master) -> None:
    """A handshake header declaring 512 MiB (and a few bytes of it) is refused at once."""
    sock = raw_socket(master.address)
    before = master.status()
    try:
        start = time.monotonic()
        send_quietly(sock, message(CONNECT, b"\x00" * 10, size=512 * MiB))
        result = outcome(sock, 3)
        took = time.monotonic() - start
    finally:
        sock.close()
    assert_refused(result, "handshake declaring 512 MiB")
    assert took < 3
    after = master.status()
    assert_small_growth((after["VmHWM"] - before["VmHWM"], after["VmPeak"] - before["VmPeak"]),
                        "a handshake declaring 512 MiB")
    still_serving(master)


def test_unfinished_handshakes_closed_by_the_server(master: Master) -> None:
    """Connections that never finish their handshake (silent, a partial header, a partial
    body, a body trickled a byte at a time) are closed by the server within about 10 s
    (14 s allowed here)."""
    silent = raw_socket(master.address)
    partial_header = raw_socket(master.address)
    partial_header.sendall(message(CONNECT, connect_body(TOKEN))[:20])
    body = connect_body(TOKEN)
    partial_body = raw_socket(master.address)
    partial_body.sendall(message(CONNECT, body)[:-5])
    trickle = raw_socket(master.address)
    trickled = message(CONNECT, body + b"\x00" * (1000 - len(body)), size=1000)
    trickle.sendall(trickled[:50])
    stop = threading.Event()

    def drip() -> None:
        for i in range(50, len(trickled)):
            if stop.wait(0.25) or not send_quietly(trickle, trickled[i:i + 1]):
                return

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    socks = {"silent": silent, "partial header": partial_header, "partial body": partial_body, "trickle": trickle}
    start = time.monotonic()
    results = {}
    try:
        for name, sock in socks.items():
            results[name] = (outcome(sock, max(start + 14 - time.monotonic(), 0.01)), time.monotonic() - start)
    finally:
        stop.set()
        close_all(socks.values())
        dripper.join(5)
    still_open = [name for name, (result, _) in results.items() if result == TIMEOUT]
    assert not still_open, f"still open after 14 s: {still_open}"
    for name, (result, _) in results.items():
        assert refused(result), f"{name}: {result!r:.200}"
    still_serving(master)


def test_postauth_message_over_max_message_refused_unread(master: Master) -> None:
    """After auth, a call declaring 64 MiB (over the default limits.max_message of 16 MiB)
    is refused at once, without waiting for its bytes."""
    sock = authed_socket(master.address, TOKEN)
    try:
        start = time.monotonic()
        send_quietly(sock, message(INVOKE, invoke_body("ping")[:10], seq=1, size=64 * MiB))
        result = outcome(sock, 3)
        took = time.monotonic() - start
    finally:
        sock.close()
    assert_refused(result, "call declaring 64 MiB")
    assert took < 3
    still_serving(master)


# -- 5. idle connections hold pool threads ---------------------------------------------------


def open_idle(address: str, count: int) -> list[socket.socket]:
    """``count`` TCP connections that send nothing (connect() returns once the kernel accepts them)."""
    socks = []
    for _ in range(count):
        socks.append(raw_socket(address, timeout=5))
    return socks


def test_idle_connections_do_not_lock_out_clients(master: Master) -> None:
    """master.threadpool_size is 16: 60 silent TCP connections and 40 authenticated idle
    ones; a fresh client still connects and pings within 2 s."""
    socks = open_idle(master.address, 60)
    try:
        for i in range(40):
            try:
                socks.append(authed_socket(master.address, TOKEN, timeout=3))
            except (OSError, AssertionError) as exc:
                pytest.fail(f"authenticated connection {i + 1} of 40 was not served within 3 s while 60 idle "
                            f"connections were open: {type(exc).__name__}: {exc}")
        assert master.alive()
        client_ok(master.address, TOKEN, within=2.0)
    finally:
        close_all(socks)
    still_serving(master)


def start_worker(tmp_path: Path, targets: list[Target], master: Master, *extra: str, allow: str = "redteam_tasks",
                 token: str | None = TOKEN, config: dict[str, Any] | None = None, cwd: str | None = None,
                 name: str = "worker") -> Target:
    """A real ``ppq worker`` (not capped) on ``master``, its control object on a free port."""
    args: list[str] = []
    if config:
        path = tmp_path / f"{name}-{len(targets)}.yaml"
        path.write_text(json.dumps(config))
        args += ["--config", str(path)]
    args += ["worker", "--master-hosts", master.address, "--port", "0", "--concurrency", "1",
             "--allow", allow, "--max-sleep", "1", "--heartbeat-interval", "0.5", *extra]
    env = {"PPQ_AUTH_TOKEN": token} if token else {}
    worker = Target(args, tmp_path / f"{name}-{len(targets)}.log", env=env, cap=None, cwd=cwd)
    targets.append(worker)
    return worker


def worker_entry(master: Master, worker: Target, timeout: float = 20.0) -> dict[str, Any]:
    """The worker's entry in the master's server_info, once it is there."""
    call = PyroFunc(master.address, token=master.token, timeout=5)
    try:
        entry = wait_until(lambda: not worker.alive() or next(
            (w for w in call("server_info")[0]["workers"] if w.get("pid") == worker.pid), None), timeout, 0.05)
    finally:
        call.close()
    assert worker.alive(), f"worker died:\n{worker.log()[-3000:]}"
    assert entry, f"worker never registered:\n{worker.log()[-3000:]}"
    return entry  # type: ignore[no-any-return]


def test_idle_connections_do_not_lock_out_worker_control(master: Master, tmp_path: Path,
                                                         targets: list[Target]) -> None:
    """60 silent TCP connections to a worker's control port; get_worker_stats still answers in 2 s."""
    worker = start_worker(tmp_path, targets, master)
    control = worker_entry(master, worker)["control_uri"]
    socks = open_idle(control, 60)
    try:
        start = time.monotonic()
        call = PyroFunc(control, token=TOKEN, timeout=2, objid="worker")
        try:
            stats = call("get_worker_stats")
        finally:
            call.close()
        took = time.monotonic() - start
        assert isinstance(stats, dict)
        assert took < 2
    finally:
        close_all(socks)
    assert worker.alive()


# -- 6. TLS handshakes inside accept() ----------------------------------------------------------


def make_cert(tmp_path: Path) -> tuple[str, str]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


TLS_CLIENT = textwrap.dedent("""
    import sys, time
    from ppq.config import load_config
    from ppq.rpc import PyroFunc, apply_tls
    config = load_config(sys.argv[1], environ={})
    apply_tls(config.tls)
    call = PyroFunc(sys.argv[2], token=sys.argv[3], timeout=3)
    start = time.monotonic()
    print(call("ping"), round(time.monotonic() - start, 3))
""")


def tls_ping(config_path: Path, address: str) -> tuple[str, float]:
    """Ping over TLS from a fresh process (Pyro5's SSL settings are process-wide); (reply, seconds)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPQ_")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parent.parent), env.get("PYTHONPATH", "")])
    try:
        done = subprocess.run([sys.executable, "-c", TLS_CLIENT, str(config_path), address, TOKEN], env=env,
                              capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "no answer in 20 s", 20.0
    if done.returncode:
        return f"failed: {done.stderr[-1500:]}", 20.0
    reply, took = done.stdout.split()
    return reply, float(took)


def test_tls_idle_connection_does_not_block_accept(start_master: Callable[..., Master], tmp_path: Path) -> None:
    """With TLS on, one TCP connection that never starts its TLS handshake does not keep a
    fresh TLS client from pinging within 3 s."""
    cert, key = make_cert(tmp_path)
    tls = {"enabled": True, "certfile": cert, "keyfile": key, "cafile": cert}
    master = start_master({"master": {"threadpool_size": 16}, "tls": tls}, ready=False)
    assert wait_until(lambda: not master.alive() or port_open(master.port), 30, 0.05)
    client_config = tmp_path / "client.yaml"
    client_config.write_text(json.dumps({"tls": tls}))
    reply, took = tls_ping(client_config, master.address)
    assert reply == "pong", reply
    idle = raw_socket(master.address)
    try:
        reply, took = tls_ping(client_config, master.address)
    finally:
        idle.close()
    assert reply == "pong", f"a TLS client was not served while one TCP connection sat idle: {reply}"
    assert took < 3
    assert master.alive()


# -- 7. the allowlist is checked on the module name only -------------------------------------


FINAL = ("done", "dead", "cancelled")


def wait_final(call: PyroFunc, task_id: str, timeout: float = 20.0) -> dict[str, Any]:
    info = wait_until(lambda: (i := call("get_task_info", task_id)) and i["state"] in FINAL and i, timeout, 0.05)
    assert info, f"task {task_id} did not end in {timeout} s: {call('get_task_info', task_id)}"
    return info  # type: ignore[no-any-return]


def test_allowlist_reaches_only_the_modules_own_functions(master: Master, tmp_path: Path,
                                                           targets: list[Target]) -> None:
    """A worker allowing only redteam_tasks never runs what that module imported (os.system,
    subprocess.run, pathlib.Path) nor its dunder attributes; its own function still runs."""
    victim = tmp_path / "victim"
    victim.mkdir()
    victim.chmod(0o755)
    mode = stat.S_IMODE(victim.stat().st_mode)
    marker_system, marker_run = tmp_path / "marker-system", tmp_path / "marker-run"
    # The worker's working directory is ``victim``: Path() is that directory.
    worker = start_worker(tmp_path, targets, master, cwd=str(victim))
    worker_entry(master, worker)
    call = PyroFunc(master.address, token=TOKEN, timeout=5)
    attacks: dict[str, dict[str, Any]] = {
        "os.system": dict(func="system", args=[f"touch {marker_system}"]),
        "subprocess.run": dict(func="run", args=[["touch", str(marker_run)]]),
        "Path().chmod": dict(fclass="Path", func="chmod", args=[0o750]),
        "module.__class__": dict(func="__class__", args=["x"]),
        "module.__init_subclass__": dict(func="__init_subclass__", args=[]),
        "module.__getattribute__": dict(func="__getattribute__", args=["ok"]),
    }
    pushed: dict[str, str] = {}
    try:
        for name, fields in attacks.items():
            try:
                pushed[name] = call("push_task", module="redteam_tasks", max_retry=0, **fields)
            except Exception as exc:  # noqa: BLE001 - a refusal at push is fine for dunder names
                assert fields["func"].startswith("_"), f"{name}: refused at push: {exc}"
        normal = call("push_task", "ok", module="redteam_tasks", args=[42], max_retry=0)
        assert wait_final(call, normal)["state"] == "done"
        assert call("get_task_info", normal)["result"] == 42
        ran = []
        for name, task_id in pushed.items():
            info = wait_final(call, task_id)
            error = str(info.get("error") or "")
            if info["state"] != "dead" or "notallowed" not in error.replace(" ", "").lower():
                ran.append(f"{name}: {info['state']} {error[:120]!r}")
        assert not marker_system.exists(), "os.system ran as a task"
        assert not marker_run.exists(), "subprocess.run ran as a task"
        assert stat.S_IMODE(victim.stat().st_mode) == mode, "Path().chmod ran as a task"
        assert not ran, f"not refused as not allowed: {ran}"
    finally:
        victim.chmod(0o755)
        call.close()


# -- 8. results forged by any token holder; one token for every role --------------------------------


def test_running_task_info_reveals_no_lease_and_forged_reports_are_refused(
        master: Master, tmp_path: Path, targets: list[Target]) -> None:
    """A running task's info carries no lease; task_finish / task_error / report with the
    guessable lease ("<worker id>/1") or random strings are refused; the worker's own result
    is the one Client.result returns."""

    worker = start_worker(tmp_path, targets, master)
    wid = worker_entry(master, worker)["id"]
    call = PyroFunc(master.address, token=TOKEN, timeout=5)
    try:
        task_id = call("push_task", "slow", module="redteam_tasks", args=[3, "real"], max_retry=0)
        info = wait_until(lambda: (i := call("get_task_info", task_id)) and i["state"] == "running" and i, 10)
        assert info, "the task never ran"
        assert not info.get("lease"), f"a running task's info shows its lease: {info.get('lease')!r}"
        worker_id = info.get("worker") or wid
        forged = []
        for lease in (f"{worker_id}/1", f"{wid}/1", f"{worker_id}/2", os.urandom(8).hex(), "*"):
            attempts: dict[str, Callable[[str], Any]] = {
                "task_finish": lambda lease: call("task_finish", task_id, worker_id, 0, False, result="forged",
                                                  lease=lease),
                "task_error": lambda lease: call("task_error", task_id, worker_id, 0, False, error="forged",
                                                 lease=lease, retry=False),
                "report": lambda lease: call("report", worker_id, 0, [
                    {"id": task_id, "lease": lease, "ok": True, "result": "forged"}], 0, 0)["accepted"] != [False],
            }
            for name, attempt in attempts.items():
                try:
                    accepted = attempt(lease)
                except Exception:  # noqa: BLE001 - refused
                    continue
                if accepted:
                    forged.append(f"{name} with lease {lease!r}")
        assert not forged, f"forged reports accepted: {forged}"
        assert_real_result(master, task_id)
    finally:
        call.close()


def assert_real_result(master: Master, task_id: str) -> None:
    """The task's result is the one its real worker returned."""
    from ppq import Client
    from ppq.config import load_config

    client = Client([master.address], token=TOKEN, config=load_config(environ={}), timeout=10)
    try:
        assert client.result(task_id, timeout=15) == "real"
    finally:
        client.close()


def test_forged_report_without_lease_impersonating_the_worker_is_refused(
        master: Master, tmp_path: Path, targets: list[Target]) -> None:
    """A client naming the running worker's id (listed by server_info) and no lease at all
    cannot finish that worker's task."""

    worker = start_worker(tmp_path, targets, master)
    entry = worker_entry(master, worker)
    call = PyroFunc(master.address, token=TOKEN, timeout=5)
    try:
        task_id = call("push_task", "slow", module="redteam_tasks", args=[3, "real"], max_retry=0)
        assert wait_until(lambda: call("get_task_info", task_id)["state"] == "running", 10)
        accepted = []
        for worker_info in (entry["id"], entry):
            try:
                accepted.append(call("task_finish", task_id, worker_info, 0, False, result="forged"))
            except Exception:  # noqa: BLE001 - refused
                pass
        assert not any(accepted), "a finish without a lease, naming the worker, was accepted"
        assert_real_result(master, task_id)
    finally:
        call.close()


CLIENT_TOKEN = "client-side-token"
WORKER_TOKEN = "worker-side-token"


@pytest.fixture
def role_master(start_master: Callable[..., Master]) -> Master:
    """A master with one token for clients and another for workers (no shared auth_token)."""
    master = start_master({"master": {"threadpool_size": 16}, "client_token": CLIENT_TOKEN,
                           "worker_token": WORKER_TOKEN}, token=None, ready=False)
    master.token = CLIENT_TOKEN
    return master.wait_ready(timeout=15)


def refusal_reason(call: Callable[[], Any]) -> str:
    """'' if ``call`` was refused as not permitted; else what happened instead."""
    try:
        value = call()
    except Exception as exc:  # noqa: BLE001 - classified below
        text = f"{type(exc).__name__}: {exc}"
        lowered = text.lower()
        if any(word in lowered for word in ("auth", "permission", "not allowed", "forbidden", "role",
                                            "not permitted", "security")):
            return ""
        return text[:200]
    return f"returned {value!r:.100}"


def test_client_token_is_refused_worker_methods(role_master: Master) -> None:
    call = PyroFunc(role_master.address, token=CLIENT_TOKEN, timeout=5)
    me = {"id": "impostor"}
    task_id = call("push_task", "ok", module="redteam_tasks", args=[1])
    try:
        methods: dict[str, Callable[[], Any]] = {
            "get_task": lambda: call("get_task", me, 0, 0),
            "get_tasks": lambda: call("get_tasks", me, 0, 1, 0),
            "report": lambda: call("report", me, 0, [], 1, 0),
            "task_finish": lambda: call("task_finish", task_id, me, 0, False, result=1, lease="x"),
            "task_error": lambda: call("task_error", task_id, me, 0, False, error="x", lease="x"),
            "heartbeat": lambda: call("heartbeat", me, 0, []),
        }
        allowed = {name: reason for name, fn in methods.items() if (reason := refusal_reason(fn))}
        assert not allowed, f"worker methods not refused to the client token: {allowed}"
        assert call("get_task_info", task_id)["state"] == "queued"
    finally:
        call.close()


def test_worker_token_is_refused_client_methods(role_master: Master, ra: redis.Redis) -> None:
    call = PyroFunc(role_master.address, token=WORKER_TOKEN, timeout=5)
    client = PyroFunc(role_master.address, token=CLIENT_TOKEN, timeout=5)
    try:
        queued = client("push_task", "ok", module="redteam_tasks", args=[1])
        methods: dict[str, Callable[[], Any]] = {
            "push_task": lambda: call("push_task", "ok", module="redteam_tasks", args=[1]),
            "push_tasks": lambda: call("push_tasks", [{"func": "ok", "module": "redteam_tasks"}]),
            "cancel_task": lambda: call("cancel_task", queued, 0),
            "requeue_dead": lambda: call("requeue_dead", None, 0),
            "purge_dead": lambda: call("purge_dead", None, 0),
            "purge_queue": lambda: call("purge_queue", 0),
            "list_tasks": lambda: call("list_tasks", "queued", 0),
            "pause_queue": lambda: call("pause_queue", 0),
            "pause_worker": lambda: call("pause_worker", "w1"),
            "schedule_add": lambda: call("schedule_add", {"name": "s1", "every": 1, "task": "redteam_tasks.ok"}),
            "schedule_list": lambda: call("schedule_list"),
            "limit_set": lambda: call("limit_set", "redteam_tasks.ok", "1/s"),
            "limit_remove": lambda: call("limit_remove", "redteam_tasks.ok"),
            "limit_list": lambda: call("limit_list"),
        }
        allowed = {name: reason for name, fn in methods.items() if (reason := refusal_reason(fn))}
        assert not allowed, f"client methods not refused to the worker token: {allowed}"
        assert client("get_task_info", queued)["state"] == "queued"
        assert len(ra.keys("ppq:0:t:*")) == 1
        assert not ra.exists("ppq:0:paused") and not ra.exists("ppq:0:schedules:names")
        assert not ra.exists("ppq:0:limits")
    finally:
        call.close()
        client.close()


def test_worker_token_worker_runs_client_token_tasks(role_master: Master, tmp_path: Path,
                                                     targets: list[Target]) -> None:
    worker = start_worker(tmp_path, targets, role_master, token=WORKER_TOKEN,
                          config={"worker_token": WORKER_TOKEN})
    client = PyroFunc(role_master.address, token=CLIENT_TOKEN, timeout=5)
    try:
        task_id = client("push_task", "ok", module="redteam_tasks", args=[7])
        info = wait_final(client, task_id)
        assert info["state"] == "done" and info["result"] == 7, info
    finally:
        client.close()
    assert worker.alive()


# -- 9. one call is not bounded ---------------------------------------------------------------


def test_huge_push_tasks_refused_quickly(master: Master, ra: redis.Redis) -> None:
    """One push_tasks of 300 tasks of 1000 KiB each (each under max_payload; 300 MB in all)
    is refused within 3 s, grows the master by less than 200 MB and stores nothing."""
    memory_before = ra.info("memory")["used_memory"]
    size, chunks = chunks_of_push(300, 1000 * 1024)
    sock = authed_socket(master.address, TOKEN)
    before = master.status()
    cpu0 = master.cpu()

    def send() -> None:
        if send_quietly(sock, message(INVOKE, b"", seq=1, size=size)):
            for chunk in chunks:
                if not send_quietly(sock, chunk):
                    return

    sender = threading.Thread(target=send, daemon=True)
    start = time.monotonic()
    sender.start()
    try:
        result = outcome(sock, 10)
        took = time.monotonic() - start
    finally:
        sock.close()
        sender.join(10)
    after = master.status()
    assert result != TIMEOUT, f"no answer in 10 s ({master.cpu() - cpu0:.1f} s of master CPU)"
    assert_refused(result, "300 MB push_tasks")
    assert took < 3, f"refusing a 300 MB push_tasks took {took:.1f} s"
    assert_small_growth((after["VmHWM"] - before["VmHWM"], after["VmPeak"] - before["VmPeak"]),
                        "a 300 MB push_tasks", resident=200 * MiB, peak=400 * MiB)
    assert not ra.keys("ppq:0:t:*"), "tasks of the refused batch were stored"
    assert not ra.llen("ppq:0:queue")
    assert ra.info("memory")["used_memory"] - memory_before < 10 * MiB
    still_serving(master)


# -- 10. unbounded growth from junk --------------------------------------------------------


def http_get(port: int, path: str = "/metrics", headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_worker_metrics_do_not_grow_with_refused_task_names(start_master: Callable[..., Master],
                                                              tmp_path: Path, targets: list[Target]) -> None:
    """1,000 failing tasks with distinct names leave a worker's /metrics under 1 MB: functions
    missing from the allowed module (the master routes tasks of other modules elsewhere).
    (No token anywhere, so that /metrics is served on loopback
    without credentials.)"""
    master = start_master({"master": {"threadpool_size": 16}}, token=None)
    metrics_port = free_port()
    worker = start_worker(tmp_path, targets, master, "--metrics-port", str(metrics_port), token=None)
    worker_entry(master, worker)
    call = PyroFunc(master.address, timeout=10)
    try:
        call("push_tasks", [{"func": f"missing_{i}", "module": "redteam_tasks", "max_retry": 0}
                            for i in range(1000)])
        done = wait_until(lambda: call("server_info")[0]["dead"] >= 1000, 60, 0.2)
        assert done, f"the worker did not get through the tasks: {call('server_info')[0]}"
    finally:
        call.close()
    status, body = http_get(metrics_port)
    assert status == 200
    assert len(body) < 1_000_000, f"/metrics is {len(body) / MiB:.1f} MiB after 1,000 refused tasks"
    assert worker.alive()


def test_server_info_does_not_grow_with_fake_heartbeats(master: Master) -> None:
    """2,000 heartbeats from made-up workers with 15 KiB of info each leave server_info under 2 MB."""
    call = PyroFunc(master.address, token=TOKEN, timeout=10)
    junk = "j" * (15 * 1024)
    refusals = 0
    try:
        for i in range(2000):
            try:
                call("heartbeat", {"id": f"fake-{i}", "junk": junk, "heartbeat_interval": 3600}, 0, [])
            except Exception:  # noqa: BLE001 - a refused registration is fine
                refusals += 1
        info = call("server_info")
    finally:
        call.close()
    size = len(marshal.dumps(info))
    assert size < 2 * MiB, f"server_info is {size / MiB:.1f} MiB after 2,000 fake heartbeats ({refusals} refused)"
    still_serving(master)


# -- 11. smaller holes ---------------------------------------------------------------------------


def test_task_id_with_newline_refused(master: Master, ra: redis.Redis) -> None:
    call = PyroFunc(master.address, token=TOKEN, timeout=5)
    try:
        with pytest.raises(Exception) as raised:
            call("push_task", "ok", module="redteam_tasks", args=[1], task_id="abc\n")
        assert "task_id" in str(raised.value)
    finally:
        call.close()
    assert not [k for k in ra.keys("*") if b"\n" in k or b"abc" in k]


def traceback_lines(master: Master) -> list[str]:
    return [line for line in master.log().splitlines() if "Traceback" in line]


def clear_errors(cases: dict[str, tuple[tuple[str, ...], Callable[[], Any]]]) -> dict[str, str]:
    """Run each case; those that were accepted or whose error names none of its field's names
    (or is an "internal error"), with what happened."""
    unclear = {}
    for name, (fields, fn) in cases.items():
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - the error is checked below
            text = str(exc)
            if not any(field in text for field in fields) or "internal error" in text:
                unclear[name] = f"{type(exc).__name__}: {text[:150]}"
        else:
            unclear[name] = "accepted"
    return unclear


def test_huge_numbers_and_deep_nesting_get_a_clear_error(master: Master) -> None:
    """wait=10**5000, timeout=10**5000 and 1,900-deep nested args: an error naming the field,
    no "internal error", no traceback in the master's log."""
    call = PyroFunc(master.address, token=TOKEN, timeout=10)
    nested: Any = 1
    for _ in range(1900):
        nested = [nested]
    cases: dict[str, tuple[tuple[str, ...], Callable[[], Any]]] = {
        "get_task wait": (("wait",), lambda: call("get_task", {"id": "w"}, 0, 10**5000)),
        "get_tasks wait": (("wait",), lambda: call("get_tasks", {"id": "w"}, 0, 1, 10**5000)),
        "wait_task timeout": (("timeout",), lambda: call("wait_task", "a" * 32, 0, 10**5000)),
        "push_task args": (("args", "argument"),
                           lambda: call("push_task", "ok", module="redteam_tasks", args=[nested])),
    }
    try:
        unclear = clear_errors(cases)
    finally:
        call.close()
    assert not unclear, "\n".join(f"{k}: {v}" for k, v in unclear.items())
    assert not traceback_lines(master), master.log()[-3000:]
    still_serving(master)


def test_huge_delay_gets_a_clear_error(master: Master, ra: redis.Redis) -> None:
    """delay=10**5000 and timeout=10**5000 on push_task: an error naming the field, nothing stored,
    no traceback in the master's log."""
    call = PyroFunc(master.address, token=TOKEN, timeout=10)
    cases: dict[str, tuple[tuple[str, ...], Callable[[], Any]]] = {
        "push_task delay": (("delay",), lambda: call("push_task", "ok", module="redteam_tasks", delay=10**5000)),
        "push_task timeout": (("timeout",),
                              lambda: call("push_task", "ok", module="redteam_tasks", timeout=10**5000)),
    }
    try:
        unclear = clear_errors(cases)
    finally:
        call.close()
    assert not unclear, "\n".join(f"{k}: {v}" for k, v in unclear.items())
    assert not ra.keys("ppq:0:t:*")
    assert not traceback_lines(master), master.log()[-3000:]
    still_serving(master)


def test_many_wait_tasks_of_unknown_ids_are_cheap(start_master: Callable[..., Master]) -> None:
    """20 concurrent wait_tasks of 10,000 unknown ids each: refused or cheap (< 3 s of master CPU)."""
    master = start_master({"master": {"threadpool_size": 64}})
    call = PyroFunc(master.address, token=TOKEN, timeout=60)
    cpu0 = master.cpu()
    outcomes: list[str] = []

    def wait_many() -> None:
        try:
            call("wait_tasks", [os.urandom(16).hex() for _ in range(10_000)], 0, 10)
            outcomes.append("answered")
        except Exception as exc:  # noqa: BLE001 - a refusal is fine
            outcomes.append(type(exc).__name__)

    threads = [threading.Thread(target=wait_many, daemon=True) for _ in range(20)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 8
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.01))
    cpu = master.cpu() - cpu0
    assert cpu < 3, f"20 wait_tasks of 10,000 unknown ids cost {cpu:.1f} s of master CPU ({len(outcomes)} ended)"
    assert len(outcomes) == 20, "the calls did not end within 8 s"
    still_serving(master)


def listening_on_all_interfaces(port: int) -> bool:
    """True if some socket listens on 0.0.0.0:port or [::]:port."""
    for table, anywhere in (("/proc/net/tcp", "00000000"), ("/proc/net/tcp6", "0" * 32)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, _, hexport = local.partition(":")
            if state == "0A" and address == anywhere and int(hexport, 16) == port:
                return True
    return False


def test_metrics_not_served_on_all_interfaces_without_token(start_master: Callable[..., Master]) -> None:
    """``ppq master --host 0.0.0.0 --insecure --metrics-port P`` with no token: the metrics
    endpoint is not opened on every interface (the master may refuse to start)."""
    metrics_port = free_port()
    master = start_master(token=None, extra=("--host", "0.0.0.0", "--insecure", "--metrics-port",
                                             str(metrics_port)), ready=False)
    started = wait_until(lambda: not master.alive() or "ready" in master.log(), 20, 0.05)
    assert started
    if not master.alive():
        assert master.proc.returncode != 0 and "metrics" in master.log().lower(), master.log()
        return
    assert not listening_on_all_interfaces(metrics_port), "metrics served on 0.0.0.0 without a token"


def test_metrics_require_the_token_when_one_is_set(start_master: Callable[..., Master]) -> None:
    metrics_port = free_port()
    master = start_master({"master": {"threadpool_size": 16}}, extra=("--metrics-port", str(metrics_port)))
    assert wait_until(lambda: port_open(metrics_port), 10)
    status, _ = http_get(metrics_port)
    assert status == 401, f"/metrics answered {status} without credentials"
    status, _ = http_get(metrics_port, headers={"Authorization": "Bearer wrong"})
    assert status == 401, f"/metrics answered {status} to a wrong token"
    assert master.alive()


def warning_lines(master: Master) -> list[str]:
    return [line for line in master.log().splitlines() if "WARNING" in line and "127.0.0.1" in line]


def test_malformed_handshake_logs_a_warning_naming_the_peer(master: Master) -> None:
    sock = raw_socket(master.address)
    try:
        send_quietly(sock, message(CONNECT, b"\xff\x00junk"))
        assert_refused(outcome(sock, 5), "malformed handshake")
    finally:
        sock.close()
    assert wait_until(lambda: warning_lines(master), 3), f"no WARNING naming 127.0.0.1:\n{master.log()[-2000:]}"
    still_serving(master)


def test_preauth_warnings_are_rate_limited(master: Master) -> None:
    """300 wrong-token handshakes leave at least one WARNING naming the peer, and far fewer than 300."""
    for _ in range(300):
        sock = raw_socket(master.address)
        try:
            sock.sendall(message(CONNECT, connect_body("wrong")))
            assert refused(outcome(sock, 5))
        finally:
            sock.close()
    assert wait_until(lambda: warning_lines(master), 3), "no WARNING naming 127.0.0.1"
    time.sleep(0.2)  # let the log catch up with the last refusals before counting
    count = len(warning_lines(master))
    assert count <= 100, f"{count} WARNING lines for 300 refused handshakes"
    still_serving(master)


# -- controls: the attack tools speak valid Pyro5 -------------------------------------------------


def test_control_attack_tools_speak_valid_pyro5(master: Master, ra: redis.Redis) -> None:
    """Small, well-meant versions of the attacks' messages are served: a refusal above is the
    server's defence, not a malformed message. Also the margins hold for an unattacked master."""
    # A handshake with the right token, extra data holding "__class__" and back-references.
    body = m_dict([(m_str("handshake"), m_dict([(m_str("token"), m_str(TOKEN)), (m_str("ppq"), b"i" + m_int(1)),
                                                (m_str("x"), expanding(3, 2, m_str("__class__")))])),
                   (m_str("object"), m_str("queue"))])
    # ppq refuses compressed messages outright (see the compression attack), so only the plain form here.
    for flags, data in ((0, body),):
        pinger = Pinger(master.address, TOKEN)
        sock = raw_socket(master.address)
        try:
            result, cpu, growth = attack_and_watch(master, sock, message(CONNECT, data, flags=flags), 5)
            assert result not in (TIMEOUT, CLOSED) and result[0] == CONNECTOK, result
            assert_small_growth(growth, "a valid handshake")
            # A call with back-references in its arguments.
            kwargs = m_dict([(m_str("func"), m_str("ok")), (m_str("module"), m_str("redteam_tasks")),
                             (m_str("args"), expanding(3, 2, b"i" + m_int(7)))])
            call = b"(" + m_int(4) + m_str("queue") + m_str("push_task") + b"[" + m_int(0) + kwargs
            result, cpu, growth = attack_and_watch(master, sock, message(INVOKE, call, seq=1), 5)
            assert result not in (TIMEOUT, CLOSED) and not refused(result), result
            task_id = marshal.loads(result[2])
        finally:
            sock.close()
            worst = pinger.stop()
        assert worst < 1.0 and not pinger.errors
        reader = PyroFunc(master.address, token=TOKEN, timeout=5)
        try:
            info = reader("get_task_info", task_id)
        finally:
            reader.close()
        assert info["args"] == [[[[7], [7]], [[7], [7]]], [[[7], [7]], [[7], [7]]]], info
    # A wrong token is refused with CONNECTFAIL.
    sock = raw_socket(master.address)
    try:
        assert outcome_after(sock, message(CONNECT, connect_body("wrong")))[0] == CONNECTFAIL
    finally:
        sock.close()
    # The streamed push_tasks, small.
    size, chunks = chunks_of_push(3, 1000)
    sock = authed_socket(master.address, TOKEN)
    try:
        result = outcome_after(sock, message(INVOKE, b"".join(chunks), seq=1, size=size))
        assert not refused(result) and len(marshal.loads(result[2])) == 3, result
    finally:
        sock.close()
    assert len(ra.keys("ppq:0:t:bulk-*")) == 3
    still_serving(master)


def outcome_after(sock: socket.socket, data: bytes, timeout: float = 5) -> Any:
    sock.sendall(data)
    result = outcome(sock, timeout)
    assert result not in (TIMEOUT, CLOSED), result
    return result
