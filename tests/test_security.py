"""The security model (README.md, "Security"), with real parts only.

Real redis-server processes, real Pyro5 connections, real ``python -m ppq``
master and worker processes; certificates made with the ``openssl`` CLI.

- auth: the token is checked in the Pyro5 handshake of masters and of worker
  control objects; ppq clients, plain Pyro5 proxies, workers and the CLI;
- binding: a non-loopback bind without a token is refused unless --insecure;
- TLS: one-way and two-way (client certificates), in subprocesses because
  Pyro5's SSL settings are process-wide;
- codec: pickle only where both master and worker opt in;
- allowlists: allowed_modules on whole segments, allowed_paths, nothing imported
  when refused;
- limits and argument checks: a clear error naming the field, Redis unchanged,
  the master keeps serving;
- property-based: generated junk thrown at every master method.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import Pyro5.api
import Pyro5.errors
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppq import AuthError, Client, ConnectError, InvalidTaskError, PPQError, PyroFunc
from ppq.config import load_config
from ppq.embedded import free_port
from ppq.errors import LeaseLostError, StorageError
from ppq.master import MasterServer
from ppq.rpc import make_proxy

from .conftest import REPO, TESTS_DIR, wait_for

TOKEN = "s3cret"
FINAL = ("done", "dead", "cancelled")


# -- helpers ------------------------------------------------------------------------


def snapshot(r: redis.Redis) -> dict[bytes, tuple[str, Any]]:
    """Every key of ``r`` with its type and full value (three round trips)."""
    keys = list(r.scan_iter(count=10000))
    pipe = r.pipeline(transaction=False)
    for key in keys:
        pipe.type(key)
    kinds = [k.decode() for k in pipe.execute()]
    readers = {
        "string": lambda p, k: p.get(k),
        "hash": lambda p, k: p.hgetall(k),
        "list": lambda p, k: p.lrange(k, 0, -1),
        "set": lambda p, k: p.smembers(k),
        "zset": lambda p, k: p.zrange(k, 0, -1, withscores=True),
        "stream": lambda p, k: p.xrange(k),
    }
    pipe = r.pipeline(transaction=False)
    read = []
    for key, kind in zip(keys, kinds, strict=True):
        if kind in readers:  # "none": expired between SCAN and TYPE
            readers[kind](pipe, key)
            read.append((key, kind))
    values = pipe.execute()
    return {key: (kind, frozenset(value) if kind == "set" else value)
            for (key, kind), value in zip(read, values, strict=True)}


def snap(ra: redis.Redis, rb: redis.Redis) -> dict[str, dict[bytes, tuple[str, Any]]]:
    return {"redis_a": snapshot(ra), "redis_b": snapshot(rb)}


def diff(before: dict[str, Any], after: dict[str, Any]) -> str:
    """A short description of what changed between two :func:`snap` results."""
    lines = []
    for server in before:
        b, a = before[server], after[server]
        for key in sorted(set(b) | set(a)):
            if b.get(key) != a.get(key):
                lines.append(f"{server} {key!r}: {str(b.get(key))[:200]} -> {str(a.get(key))[:200]}")
    return "\n".join(lines)


def address_of(server: Any) -> str:
    return f"127.0.0.1:{server.port}"


def plain_proxy(uri: str, serializer: str = "serpent", handshake: Any = None, timeout: float = 10) -> Any:
    """A Pyro5 proxy as an outside client without ppq would make it."""
    proxy = Pyro5.api.Proxy(uri)
    proxy._pyroSerializer = serializer
    proxy._pyroTimeout = timeout
    if handshake is not None:
        proxy._pyroHandshake = handshake
    return proxy


def run_ppq(spawn: Any, *args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a ``python -m ppq`` command to its end; return the completed process."""
    return subprocess.run([sys.executable, "-m", "ppq", *args], env=spawn.env(env), cwd=str(TESTS_DIR),
                          capture_output=True, text=True, timeout=timeout)


def run_python(spawn: Any, code: str, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=spawn.env(env), cwd=str(TESTS_DIR),
                          capture_output=True, text=True, timeout=timeout)


def start_master_with_token(spawn: Any, redis_url: str, token: str, *extra: str,
                            env: dict[str, str] | None = None) -> tuple[subprocess.Popen[bytes], str]:
    """``ppq master`` on a free port, readiness checked with ``token``."""
    port = free_port()
    proc = spawn("master", "--port", str(port), "--redis-map", f"0={redis_url}", *extra, env=env)
    address = f"127.0.0.1:{port}"
    ping = PyroFunc(address, timeout=2, default_return=None, token=token)
    try:
        wait_for(lambda: proc.poll() is not None or ping("ping") == "pong", what=f"master on {address}")
    finally:
        ping.close()
    assert proc.poll() is None, spawn.log(proc)
    return proc, address


def wait_final(call: PyroFunc, task_id: str, queue_index: int = 0, timeout: float = 30) -> dict[str, Any]:
    return wait_for(lambda: (i := call("get_task_info", task_id, queue_index)) and i["state"] in FINAL and i,
                    timeout=timeout, what=f"task {task_id} to end")


def one_line_error(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert "Traceback" not in output, output
    assert len(lines) == 1, f"expected one line, got:\n{output}"
    return lines[0]


def no_env_config() -> Any:
    return load_config(environ={})


# -- auth ----------------------------------------------------------------------------


def test_auth_no_or_wrong_token_is_refused_and_nothing_is_stored(make_master, ra, rb):
    master = make_master(auth_token=TOKEN)
    good = Client(address_of(master), token=TOKEN, config=no_env_config(), retry=1)
    good.push("tasks.add", 1, 2)  # something in Redis, so "unchanged" means something
    before = snap(ra, rb)
    for token in (None, "", "wrong", TOKEN + "x", TOKEN[:-1], TOKEN.upper()):
        client = Client(address_of(master), token=token, config=no_env_config(), retry=1)
        with pytest.raises(AuthError, match="authentication failed"):
            client.push("tasks.add", 1, 2)
        with pytest.raises(AuthError, match="authentication failed"):
            client.push_many([("tasks.add", [1, 2])])
        with pytest.raises(AuthError, match="authentication failed"):
            client.server_info()
        client.close()
        func = PyroFunc(master.uri, token=token, retry=3)
        for method, args in (("push_task", ("add",)), ("ping", ()), ("purge_dead", ()), ("get_task", ("w",))):
            with pytest.raises(AuthError, match="authentication failed"):
                func(method, *args, module="tasks") if method == "push_task" else func(method, *args)
        func.close()
    assert snap(ra, rb) == before, diff(before, snap(ra, rb))
    assert good.call("ping") == "pong"
    good.close()


@pytest.mark.parametrize("serializer", ["serpent", "json", "marshal"])
def test_auth_plain_pyro5_proxy(make_master, ra, rb, serializer):
    master = make_master(auth_token=TOKEN)
    before = snap(ra, rb)
    for handshake in (None, "wrong", {"token": "wrong"}, {"ppq": 1}, 12345, ["s3cret"]):
        proxy = plain_proxy(master.uri, serializer, handshake)
        with pytest.raises(Pyro5.errors.CommunicationError, match="rejected: authentication failed"):
            proxy.push_task("add", module="tasks", args=[1, 2])
        proxy._pyroRelease()
    assert snap(ra, rb) == before, diff(before, snap(ra, rb))
    # The documented way for outside clients: the token as the handshake.
    for handshake in (TOKEN, {"token": TOKEN}):
        with plain_proxy(master.uri, serializer, handshake) as proxy:
            task_id = proxy.push_task("add", module="tasks", args=[1, 2])
            assert proxy.get_task_info(task_id)["state"] == "queued"


def test_auth_right_token_works_with_every_client(make_master):
    master = make_master(auth_token=TOKEN)
    client = Client(address_of(master), token=TOKEN, config=no_env_config())
    task_id = client.push("tasks.add", 2, 3)
    assert client.info(task_id)["state"] == "queued"
    client.close()
    func = PyroFunc(master.uri, token=TOKEN)
    assert func("ping") == "pong"
    assert func("get_task_info", task_id)["args"] == [2, 3]
    func.close()
    # The token can also come from the config (auth_token / PPQ_AUTH_TOKEN).
    config = load_config(environ={"PPQ_AUTH_TOKEN": TOKEN})
    client = Client(address_of(master), config=config)
    assert client.info(task_id)["state"] == "queued"
    client.close()


def test_auth_master_process_token_from_env_and_cli(spawn, redis_a, ra, rb):
    proc, address = start_master_with_token(spawn, redis_a.url, TOKEN, env={"PPQ_AUTH_TOKEN": TOKEN})
    with pytest.raises(AuthError, match="authentication failed"):
        PyroFunc(address)("ping")
    before = snap(ra, rb)
    for env in ({"PPQ_AUTH_TOKEN": "wrong"}, {}):
        status = run_ppq(spawn, "status", "-m", address, env=env)
        assert status.returncode != 0, status
        assert "authentication failed" in status.stderr, status.stderr
        assert "Traceback" not in status.stderr + status.stdout, status.stderr
        push = run_ppq(spawn, "push", "-m", address, "tasks.add", "1", "2", env=env)
        assert push.returncode != 0, push
        assert "authentication failed" in push.stderr, push.stderr
        assert "Traceback" not in push.stderr + push.stdout, push.stderr
    assert snap(ra, rb) == before, diff(before, snap(ra, rb))
    ok = run_ppq(spawn, "status", "-m", address, "--json", env={"PPQ_AUTH_TOKEN": TOKEN})
    assert ok.returncode == 0, ok.stderr
    assert "0" in json.loads(ok.stdout)
    assert proc.poll() is None


def test_auth_worker_with_wrong_token_cannot_pull(make_master, spawn):
    master = make_master(auth_token=TOKEN)
    address = address_of(master)
    call = PyroFunc(address, token=TOKEN)
    task_id = call("push_task", "add", module="tasks", args=[2, 3])
    bad = spawn.worker(address, env={"PPQ_AUTH_TOKEN": "wrong"})
    wait_for(lambda: spawn.log(bad).count("authentication failed") >= 2 or bad.poll() is not None,
             what="the worker with the wrong token to be refused")
    info = call("get_task_info", task_id)
    assert info["state"] == "queued" and info["attempts"] == 0, info
    assert call("server_info")[0]["workers"] == []
    # The same worker with the right token runs it.
    spawn.worker(address, env={"PPQ_AUTH_TOKEN": TOKEN})
    info = wait_final(call, task_id)
    assert info["state"] == "done" and info["result"] == 5, info
    call.close()


def test_auth_worker_control_object_requires_the_token(make_master, spawn):
    master = make_master(auth_token=TOKEN)
    call = PyroFunc(master.uri, token=TOKEN)
    spawn.worker(address_of(master), env={"PPQ_AUTH_TOKEN": TOKEN})
    workers = wait_for(lambda: [w for w in call("server_info")[0]["workers"] if w.get("control_uri")],
                       what="the worker to register with its control_uri")
    control_uri = workers[0]["control_uri"]
    for token in (None, "wrong"):
        control = PyroFunc(control_uri, token=token, objid="worker")
        for method in ("get_running_info", "get_worker_stats", "ping"):
            with pytest.raises(AuthError, match="authentication failed"):
                control(method)
        control.close()
    for serializer in ("serpent", "marshal"):
        proxy = plain_proxy(control_uri, serializer)
        with pytest.raises(Pyro5.errors.CommunicationError, match="authentication failed"):
            proxy.get_running_info()
        proxy._pyroRelease()
    control = PyroFunc(control_uri, token=TOKEN, objid="worker")
    info = control("get_running_info")
    assert info["id"] == workers[0]["id"]
    assert isinstance(control("get_worker_stats"), dict)
    control.close()
    with plain_proxy(control_uri, "serpent", TOKEN) as proxy:
        assert proxy.get_running_info()["id"] == workers[0]["id"]
    call.close()


# -- binding -------------------------------------------------------------------------


def test_bind_master_non_loopback_without_token_is_refused(spawn, redis_a):
    proc = spawn("master", "--host", "0.0.0.0", "--port", str(free_port()), "--redis-map", f"0={redis_a.url}")
    assert proc.wait(30) != 0
    line = one_line_error(spawn.log(proc))
    assert "auth_token" in line and "--insecure" in line and "0.0.0.0" in line, line


@pytest.mark.parametrize("host", ["", "::"])
def test_bind_master_on_every_interface_without_token_is_refused(spawn, redis_a, host):
    """An empty host binds every interface, like 0.0.0.0: refused without a token too."""
    proc = spawn("master", "--host", host, "--port", str(free_port()), "--redis-map", f"0={redis_a.url}")
    assert proc.wait(30) != 0
    line = one_line_error(spawn.log(proc))
    assert "auth_token" in line and "--insecure" in line and "master.host" in line, line


def test_bind_master_non_loopback_insecure_or_with_token_starts(spawn, redis_a):
    proc, address = spawn.master(redis_a.url, "--host", "0.0.0.0", "--insecure")
    assert PyroFunc(address)("ping") == "pong"
    proc, address = start_master_with_token(spawn, redis_a.url, TOKEN, "--host", "0.0.0.0",
                                            env={"PPQ_AUTH_TOKEN": TOKEN})
    with pytest.raises(AuthError):
        PyroFunc(address)("ping")
    assert proc.poll() is None


def test_bind_worker_non_loopback_without_token_is_refused(master, spawn):
    proc = spawn.worker(address_of(master), extra=("--host", "0.0.0.0"))
    assert proc.wait(30) != 0
    line = one_line_error(spawn.log(proc))
    assert "auth_token" in line and "--insecure" in line and "worker.host" in line, line


def test_bind_worker_non_loopback_insecure_or_with_token_starts(make_master, spawn):
    open_master = make_master()
    call = PyroFunc(open_master.uri)
    insecure = spawn.worker(address_of(open_master), extra=("--host", "0.0.0.0", "--insecure"))
    wait_for(lambda: call("server_info")[0]["workers"] or insecure.poll() is not None,
             what="the --insecure worker to register")
    assert insecure.poll() is None, spawn.log(insecure)
    call.close()
    locked = make_master(auth_token=TOKEN)
    call = PyroFunc(locked.uri, token=TOKEN)
    worker = spawn.worker(address_of(locked), extra=("--host", "0.0.0.0"), env={"PPQ_AUTH_TOKEN": TOKEN})
    wait_for(lambda: call("server_info")[0]["workers"] or worker.poll() is not None,
             what="the worker with a token to register")
    assert worker.poll() is None, spawn.log(worker)
    call.close()


# -- TLS -----------------------------------------------------------------------------


def _self_signed(directory: Path, name: str, subject: str, san: str | None) -> tuple[str, str]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    command = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
               "-days", "1", "-subj", subject]
    if san:
        command += ["-addext", f"subjectAltName={san}"]
    subprocess.run(command, check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A server certificate for 127.0.0.1, two client certificates (one trusted), and bundles."""
    directory = tmp_path_factory.mktemp("certs")
    server_cert, server_key = _self_signed(directory, "server", "/CN=127.0.0.1", "IP:127.0.0.1,DNS:localhost")
    client_cert, client_key = _self_signed(directory, "client", "/CN=ppq-client", None)
    rogue_cert, rogue_key = _self_signed(directory, "rogue", "/CN=ppq-client", None)
    bundle = directory / "trusted.pem"
    bundle.write_text(Path(server_cert).read_text() + Path(client_cert).read_text())
    return {"server_cert": server_cert, "server_key": server_key, "client_cert": client_cert,
            "client_key": client_key, "rogue_cert": rogue_cert, "rogue_key": rogue_key, "bundle": str(bundle),
            "dir": str(directory)}


def _write_yaml(path: Path, data: dict[str, Any]) -> str:
    path.write_text(json.dumps(data))  # JSON is YAML
    return str(path)


def _tls_master(spawn: Any, tmp_path: Path, redis_url: str, tls: dict[str, Any]) -> tuple[Any, str]:
    port = free_port()
    config = _write_yaml(tmp_path / "master.yaml", {
        "tls": {"enabled": True, **tls},
        "master": {"port": port, "redis_map": {0: redis_url}},
    })
    proc = spawn("--config", config, "master", name="tls-master")
    wait_for(lambda: proc.poll() is not None or "master ready: " in spawn.log(proc), what="the TLS master")
    assert proc.poll() is None, spawn.log(proc)
    return proc, f"127.0.0.1:{port}"


def _client_config(tmp_path: Path, name: str, address: str, tls: dict[str, Any] | None) -> str:
    data: dict[str, Any] = {"client": {"masters": [address], "retry": 1, "timeout": 5}}
    if tls is not None:
        data["tls"] = {"enabled": True, **tls}
    return _write_yaml(tmp_path / f"{name}.yaml", data)


def _assert_plain_clients_fail(address: str) -> None:
    """A client without TLS (in this process, which never turned SSL on) gets nowhere."""
    proxy = plain_proxy(f"PYRO:queue@{address}", "serpent", timeout=5)
    with pytest.raises(Pyro5.errors.CommunicationError):
        proxy.ping()
    proxy._pyroRelease()
    with pytest.raises(ConnectError):
        PyroFunc(address, timeout=5)("ping")


def test_tls_one_way(spawn, redis_a, certs, tmp_path):
    _, address = _tls_master(spawn, tmp_path, redis_a.url, {
        "certfile": certs["server_cert"], "keyfile": certs["server_key"], "cafile": certs["server_cert"]})
    client_yaml = _client_config(tmp_path, "client", address, {"cafile": certs["server_cert"]})
    status = run_ppq(spawn, "--config", client_yaml, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["0"]["queued"] == 0
    # A TLS worker (its control object serves TLS too) runs a task pushed by a TLS client.
    worker_yaml = _write_yaml(tmp_path / "worker.yaml", {
        "tls": {"enabled": True, "certfile": certs["server_cert"], "keyfile": certs["server_key"],
                "cafile": certs["server_cert"]},
        "worker": {"master_hosts": [address], "port": 0, "concurrency": 1, "allowed_modules": ["tasks"],
                   "max_sleep": 1, "heartbeat_interval": 0.5},
    })
    spawn("--config", worker_yaml, "worker", name="tls-worker")
    pushed = run_python(spawn, f"""
        from ppq import Client
        from ppq.config import load_config
        client = Client(config=load_config({client_yaml!r}))
        print(client.result(client.push("tasks.add", 20, 22), timeout=30))
    """)
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.strip() == "42"
    # No TLS on the client side: refused.
    _assert_plain_clients_fail(address)
    plain_cli = run_ppq(spawn, "status", "-m", address, env={"PPQ_CLIENT_RETRY": "1"})
    assert plain_cli.returncode != 0, plain_cli.stdout
    # A client that does not trust the server's certificate: refused.
    distrust = _client_config(tmp_path, "distrust", address, {"cafile": certs["rogue_cert"]})
    status = run_ppq(spawn, "--config", distrust, "status")
    assert status.returncode != 0, status.stdout
    assert "Traceback" not in status.stderr, status.stderr


def test_tls_two_way_requires_a_trusted_client_certificate(spawn, redis_a, certs, tmp_path):
    _, address = _tls_master(spawn, tmp_path, redis_a.url, {
        "certfile": certs["server_cert"], "keyfile": certs["server_key"], "cafile": certs["bundle"],
        "require_client_cert": True})
    no_cert = _client_config(tmp_path, "no-cert", address, {"cafile": certs["server_cert"]})
    status = run_ppq(spawn, "--config", no_cert, "status")
    assert status.returncode != 0, status.stdout
    assert "Traceback" not in status.stderr, status.stderr
    rogue = _client_config(tmp_path, "rogue", address, {
        "cafile": certs["server_cert"], "client_certfile": certs["rogue_cert"], "client_keyfile": certs["rogue_key"]})
    status = run_ppq(spawn, "--config", rogue, "status")
    assert status.returncode != 0, status.stdout
    with_cert = _client_config(tmp_path, "with-cert", address, {
        "cafile": certs["server_cert"], "client_certfile": certs["client_cert"],
        "client_keyfile": certs["client_key"]})
    status = run_ppq(spawn, "--config", with_cert, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert "0" in json.loads(status.stdout)
    pushed = run_python(spawn, f"""
        from ppq import Client
        from ppq.config import load_config
        client = Client(config=load_config({with_cert!r}))
        task_id = client.push("tasks.add", 1, 2)
        print(client.info(task_id)["state"])
    """)
    assert pushed.returncode == 0, pushed.stderr
    assert pushed.stdout.strip() == "queued"
    _assert_plain_clients_fail(address)


# -- codec: pickle is opt-in on both ends ----------------------------------------------


class FileCreator:
    """Unpickling this creates the file at ``path`` (a stand-in for any code run on load)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> Any:
        return (open, (self.path, "w"))


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_pickle_refused_at_push_without_allow_pickle(make_master, ra, rb, tmp_path, protocol):
    master = make_master()
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(([FileCreator(str(marker))], {}), protocol=protocol)
    simple = pickle.dumps(([1], {}), protocol=protocol)
    call = PyroFunc(master.uri)
    call("push_task", "add", module="tasks", args=[1, 2])
    before = snap(ra, rb)
    for parameters in (simple, payload):
        with pytest.raises(InvalidTaskError) as exc:
            call("push_task", "echo", module="tasks", parameters=parameters)
        if protocol >= 2:  # older protocols have no header: refused as not msgpack/JSON
            assert "pickle" in str(exc.value) and "allow_pickle" in str(exc.value), exc.value
        assert "parameters" in str(exc.value), exc.value
        with pytest.raises(InvalidTaskError):
            call("push_tasks", [{"func": "add", "module": "tasks"},
                                {"func": "echo", "module": "tasks", "parameters": parameters}])
        with plain_proxy(master.uri) as proxy:  # serpent: bytes arrive as a base64 dict
            with pytest.raises(ValueError, match="parameters"):
                proxy.push_task("echo", module="tasks", parameters=parameters)
    assert snap(ra, rb) == before, diff(before, snap(ra, rb))
    assert not marker.exists()
    assert call("ping") == "pong"
    call.close()


def test_pickle_accepted_by_master_but_refused_by_worker_without_allow_pickle(make_master, spawn, tmp_path):
    master = make_master(master__allow_pickle=True)
    call = PyroFunc(master.uri)
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(([FileCreator(str(marker))], {}))
    task_id = call("push_task", "echo", module="tasks", parameters=payload, max_retry=0)
    simple = call("push_task", "add", module="tasks", parameters=pickle.dumps(([1, 2], {})), max_retry=0)
    # Reading it back never unpickles on the master either.
    assert call("get_task_info", task_id)["state"] == "queued"
    with plain_proxy(master.uri) as proxy:
        proxy.get_task_info(task_id)
    assert not marker.exists()
    spawn.worker(address_of(master))
    for tid in (task_id, simple):
        info = wait_final(call, tid)
        assert info["state"] == "dead", info
        assert "pickle" in info["error"] and "allow_pickle" in info["error"], info["error"]
    assert not marker.exists()
    call.close()


def test_pickle_runs_when_both_ends_opt_in(make_master, spawn):
    master = make_master(master__allow_pickle=True)
    call = PyroFunc(master.uri)
    task_id = call("push_task", "add", module="tasks", parameters=pickle.dumps(([2, 3], {})))
    spawn.worker(address_of(master), env={"PPQ_WORKER_ALLOW_PICKLE": "true"})
    info = wait_final(call, task_id)
    assert info["state"] == "done" and info["result"] == 5, info
    call.close()


# -- allowlists ------------------------------------------------------------------------


def _write(path: Path, text: str, marker: Path | None = None) -> None:
    """Write a Python source file; importing it creates ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    side_effect = f"open({str(marker)!r}, 'w').close()\n" if marker else ""
    path.write_text(side_effect + text)


def _pythonpath(*dirs: Path) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([*map(str, dirs), str(TESTS_DIR), str(REPO)])}


def test_allowed_modules_match_whole_segments(master, spawn, tmp_path):
    pkgs = tmp_path / "pkgs"
    markers = tmp_path / "markers"
    markers.mkdir()
    _write(pkgs / "app" / "__init__.py", "")
    _write(pkgs / "app" / "tasks.py", "def x():\n    return 'app-ok'\n")
    _write(pkgs / "apple" / "__init__.py", "def x():\n    return 'apple-ran'\n", markers / "apple")
    _write(pkgs / "apple" / "tasks.py", "def x():\n    return 'apple-ran'\n", markers / "apple.tasks")
    _write(pkgs / "appx.py", "def x():\n    return 'appx-ran'\n", markers / "appx")
    call = PyroFunc(master.uri)
    ok = call("push_task", "x", module="app.tasks")
    top = call("push_task", "x", module="app")  # `app` itself is allowed (no x in it: fails normally)
    refused = {name: call("push_task", "x", module=name, max_retry=3) for name in ("apple", "apple.tasks", "appx")}
    system = call("push_task", "system", module="os", args=[f"touch {markers / 'os'}"], max_retry=3)
    spawn.worker(address_of(master), allow="app", env=_pythonpath(pkgs))
    info = wait_final(call, ok)
    assert info["state"] == "done" and info["result"] == "app-ok", info
    info = wait_final(call, top)
    assert "NotAllowedError" not in (info["error"] or ""), info
    # The master routes by the same rule: tasks of the other modules are never leased to this
    # worker; they wait for a worker that allows them.
    for name, task_id in [*refused.items(), ("os", system)]:
        info = call("get_task_info", task_id)
        assert info["state"] == "queued" and info["attempts"] == 0, info
        assert info["waiting_for"] == f"a worker that allows {name}", info
    wait_for(lambda: call("server_info")[0]["waiting_for"] == {"apple": 1, "apple.tasks": 1, "appx": 1, "os": 1},
             what="the refused modules listed as waiting for a worker")
    assert sorted(os.listdir(markers)) == [], "a refused module was imported"
    call.close()


def test_allowed_paths(master, spawn, tmp_path):
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    sibling = tmp_path / "allowed_evil"  # shares the prefix "allowed" but is another directory
    markers = tmp_path / "markers"
    for d in (allowed, outside, sibling, markers):
        d.mkdir()
    _write(allowed / "mod_inside.py", "def hello():\n    return 'inside'\n")
    _write(outside / "mod_outside.py", "def hello():\n    return 'outside'\n", markers / "mod_outside")
    _write(sibling / "mod_sibling.py", "def hello():\n    return 'sibling'\n", markers / "mod_sibling")
    (allowed / "link").symlink_to(outside)
    call = PyroFunc(master.uri)
    refused = call("push_tasks", [
        {"func": "hello", "module": "mod_outside", "path": str(outside)},
        {"func": "hello", "module": "mod_outside", "path": f"{allowed}{os.sep}..{os.sep}outside"},
        {"func": "hello", "module": "mod_outside", "path": str(allowed / "link")},
        {"func": "hello", "module": "mod_sibling", "path": str(sibling)},
    ])
    check = call("push_task", "sys_path", module="tasks")
    inside = call("push_task", "hello", module="mod_inside", path=str(allowed))
    check_after = call("push_task", "sys_path", module="tasks")
    spawn.worker(address_of(master), allow="tasks,mod_inside,mod_outside,mod_sibling",
                 extra=("--allowed-paths", str(allowed)))
    for task_id in refused:
        info = wait_final(call, task_id)
        assert info["state"] == "dead", info
        assert "NotAllowedError" in info["error"] and "path" in info["error"], info["error"]
    assert sorted(os.listdir(markers)) == [], "a module outside allowed_paths was imported"
    path = wait_final(call, check)["result"]
    assert not any(str(d) in p for p in path for d in (outside, sibling)) and str(allowed) not in path, path
    info = wait_final(call, inside)
    assert info["state"] == "done" and info["result"] == "inside", info
    assert str(allowed) in wait_final(call, check_after)["result"]
    call.close()


# -- limits and argument checks ------------------------------------------------------------

LIMITS = {"limits__max_payload": 1000, "limits__max_batch": 5}
GOOD = {"func": "add", "module": "tasks"}
NAN, INF = float("nan"), float("inf")

# (id, method, args, kwargs, words the error must contain)
BAD_CALLS: list[tuple[str, str, tuple[Any, ...], dict[str, Any], tuple[str, ...]]] = [
    ("args-too-big", "push_task", ("add",), {"module": "tasks", "args": ["x" * 2000]}, ("parameters", "bytes", "1000")),
    ("kwargs-too-big", "push_task", ("add",), {"module": "tasks", "kwargs": {"a": "x" * 2000}}, ("parameters", "1000")),
    ("parameters-too-big", "push_task", ("add",), {"module": "tasks", "parameters": b"\x92\x90\x80" + b"x" * 2000},
     ("parameters", "1000")),
    ("batch-too-big", "push_tasks", ([dict(GOOD)] * 6,), {}, ("tasks", "5")),
    ("batch-one-bad", "push_tasks", ([dict(GOOD)] * 4 + [dict(GOOD, delay=-1)],), {}, ("tasks[4]", "delay")),
    ("batch-not-list", "push_tasks", ("abc",), {}, ("tasks",)),
    ("batch-item-not-dict", "push_tasks", ([dict(GOOD), "x"],), {}, ("tasks[1]",)),
    ("batch-unknown-option", "push_tasks", ([dict(GOOD, bogus=1)],), {}, ("bogus",)),
    ("get_tasks-count", "get_tasks", ("w1", 0, 6), {}, ("count",)),
    ("result-too-big", "task_finish", ("abc", "w1"), {"result": "x" * 2000}, ("result", "1000")),
    ("func-long", "push_task", ("f" * 201,), {"module": "tasks"}, ("func", "200")),
    ("func-not-identifier", "push_task", ("a-b",), {"module": "tasks"}, ("func",)),
    ("func-nul", "push_task", ("add\x00",), {"module": "tasks"}, ("func",)),
    ("func-empty", "push_task", ("",), {"module": "tasks"}, ("func",)),
    ("func-none", "push_task", (None,), {"module": "tasks"}, ("func",)),
    ("module-long", "push_task", ("add",), {"module": "m" * 201}, ("module", "200")),
    ("module-path", "push_task", ("add",), {"module": "../tasks"}, ("module",)),
    ("module-missing", "push_task", ("add",), {}, ("module",)),
    ("fclass-long", "push_task", ("add",), {"module": "tasks", "fclass": "C" * 201}, ("fclass", "200")),
    ("key-long", "push_task", ("add",), {"module": "tasks", "key": "k" * 513}, ("key", "512")),
    ("key-not-str", "push_task", ("add",), {"module": "tasks", "key": 5}, ("key",)),
    ("path-long", "push_task", ("add",), {"module": "tasks", "path": "/" + "p" * 5000}, ("path",)),
    ("lang-long", "push_task", ("add",), {"module": "tasks", "lang": "l" * 100}, ("lang",)),
    ("delay-too-long", "push_task", ("add",), {"module": "tasks", "delay": 365 * 86400 + 1}, ("delay",)),
    ("delay-negative", "push_task", ("add",), {"module": "tasks", "delay": -1}, ("delay",)),
    ("delay-nan", "push_task", ("add",), {"module": "tasks", "delay": NAN}, ("delay",)),
    ("delay-inf", "push_task", ("add",), {"module": "tasks", "delay": INF}, ("delay",)),
    ("delay-minus-inf", "push_task", ("add",), {"module": "tasks", "delay": -INF}, ("delay",)),
    ("delay-str", "push_task", ("add",), {"module": "tasks", "delay": "5"}, ("delay",)),
    ("delay-bool", "push_task", ("add",), {"module": "tasks", "delay": True}, ("delay",)),
    ("timeout-negative", "push_task", ("add",), {"module": "tasks", "timeout": -1}, ("timeout",)),
    ("timeout-zero", "push_task", ("add",), {"module": "tasks", "timeout": 0}, ("timeout",)),
    ("timeout-nan", "push_task", ("add",), {"module": "tasks", "timeout": NAN}, ("timeout",)),
    ("timeout-inf", "push_task", ("add",), {"module": "tasks", "timeout": INF}, ("timeout",)),
    ("timeout-too-long", "push_task", ("add",), {"module": "tasks", "timeout": 7 * 86400 + 1}, ("timeout",)),
    ("max_retry-too-high", "push_task", ("add",), {"module": "tasks", "max_retry": 101}, ("max_retry", "100")),
    ("max_retry-negative", "push_task", ("add",), {"module": "tasks", "max_retry": -1}, ("max_retry",)),
    ("max_retry-float", "push_task", ("add",), {"module": "tasks", "max_retry": 1.5}, ("max_retry",)),
    ("max_retry-bool", "push_task", ("add",), {"module": "tasks", "max_retry": True}, ("max_retry",)),
    ("max_retry-huge", "push_task", ("add",), {"module": "tasks", "max_retry": 10**30}, ("max_retry",)),
    ("retry_delay-str", "push_task", ("add",), {"module": "tasks", "retry_delay": "yes"}, ("retry_delay",)),
    ("result_ttl-negative", "push_task", ("add",), {"module": "tasks", "result_ttl": -1}, ("result_ttl",)),
    ("result_ttl-huge", "push_task", ("add",), {"module": "tasks", "result_ttl": 10**16}, ("result_ttl",)),
    ("task_id-bad", "push_task", ("add",), {"module": "tasks", "task_id": "a b"}, ("task_id",)),
    ("task_id-long", "push_task", ("add",), {"module": "tasks", "task_id": "a" * 65}, ("task_id",)),
    ("args-not-list", "push_task", ("add",), {"module": "tasks", "args": "ab"}, ("args",)),
    ("kwargs-int-keys", "push_task", ("add",), {"module": "tasks", "kwargs": {1: 2}}, ("kwargs",)),
    ("both-parameters-and-args", "push_task", ("add",),
     {"module": "tasks", "args": [1], "parameters": b"\x92\x90\x80"}, ("parameters",)),
    ("parameters-not-msgpack", "push_task", ("add",), {"module": "tasks", "parameters": b"\x01\x02"},
     ("parameters",)),
    ("parameters-not-pair", "push_task", ("add",), {"module": "tasks", "parameters": b"\x93\x01\x02\x03"},
     ("parameters",)),
    ("unknown-keyword", "push_task", ("add",), {"module": "tasks", "bogus": 1}, ("bogus",)),
    ("get_task_info-bad-id", "get_task_info", ("a/b",), {}, ("task_id",)),
    ("cancel-bad-id", "cancel_task", ("x" * 100,), {}, ("task_id",)),
    ("dead_tasks-limit", "dead_tasks", (0, -1), {}, ("limit",)),
    ("list_tasks-state", "list_tasks", ("done",), {}, ("state",)),
    ("list_tasks-limit", "list_tasks", ("queued", 0, 201), {}, ("limit",)),
    ("list_tasks-offset", "list_tasks", ("dead", 0, 10, -1), {}, ("offset",)),
    ("list_tasks-func", "list_tasks", ("queued",), {"func": "f" * 201}, ("func",)),
    ("requeue-bad-ids", "requeue_dead", ([1, 2],), {}, ("task_id",)),
    ("purge-empty-list", "purge_dead", ([],), {}, ("task_ids",)),
    ("get_task-wait", "get_task", ("w1", 0, 31), {}, ("wait",)),
    ("report-wait", "report", ({"id": "w1"}, 0, [], 1, 301), {}, ("wait",)),
    ("get_task-worker-none", "get_task", (None,), {}, ("worker_info",)),
    ("heartbeat-running", "heartbeat", ("w1", 0, "junk"), {}, ("running",)),
]
QUEUE_INDEXES = [2, -1, 10**30, True, False, "0", 0.0, 1.0, None, [0], NAN]
for _qi in QUEUE_INDEXES:
    BAD_CALLS.append((f"push-queue_index-{_qi!r}", "push_task", ("add",), {"module": "tasks", "queue_index": _qi},
                      ("queue_index",)))
    BAD_CALLS.append((f"info-queue_index-{_qi!r}", "get_task_info", ("abc",), {"queue_index": _qi},
                      ("queue_index",)))
    BAD_CALLS.append((f"batch-queue_index-{_qi!r}", "push_tasks", ([dict(GOOD, queue_index=_qi)],), {},
                      ("queue_index",)))


def _module_master(redis_a: Any, redis_b: Any, **overrides: Any) -> MasterServer:
    """A master like conftest's make_master builds, for a whole module (one master start, not hundreds)."""
    values = {"master.port": 0, "master.redis_map": {0: redis_a.url, 1: redis_b.url},
              # No reaper runs while a test does: only the calls under test change Redis.
              "master.reaper_interval": 3600.0}
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return MasterServer(load_config(overrides=values, environ={})).start()


@pytest.fixture(scope="module")
def limits_master(redis_a, redis_b) -> Any:
    server = _module_master(redis_a, redis_b, **LIMITS)
    yield server
    server.stop()


@pytest.fixture
def limited(limits_master, ra, rb) -> Any:
    """The module's limited master over freshly flushed Redis holding a few tasks."""
    master = limits_master
    call = PyroFunc(master.uri)
    call("push_tasks", [dict(GOOD, args=[1, 2], queue_index=0), dict(GOOD, args=[3, 4], queue_index=1),
                        dict(GOOD, args=[5, 6], delay=3600, key="k")])
    yield master
    call.close()


@pytest.mark.parametrize("serializer", ["ppq", "serpent"])
@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_bad_argument_is_refused_naming_the_field(limited, ra, rb, case, serializer):
    _, method, args, kwargs, words = case
    if serializer == "serpent" and any(isinstance(v, dict) and any(not isinstance(k, str) for k in v)
                                       for v in kwargs.values()):
        pytest.skip("serpent cannot send a dict with int keys")
    before = snap(ra, rb)
    if serializer == "ppq":
        proxy = make_proxy(limited.uri)
        expected: tuple[type[BaseException], ...] = (InvalidTaskError,)
    else:
        proxy = plain_proxy(limited.uri, "serpent")
        expected = (ValueError,)
    with proxy:
        with pytest.raises(expected) as exc:
            getattr(proxy, method)(*args, **kwargs)
        message = str(exc.value)
        for word in words:
            assert word in message, f"{word!r} not in {message!r}"
        assert "internal error" not in message
        assert proxy.ping() == "pong"
    after = snap(ra, rb)
    assert after == before, diff(before, after)


def test_limits_are_configurable_upwards_and_the_edge_is_accepted(make_master):
    master = make_master(limits__max_payload=1000, limits__max_batch=5)
    call = PyroFunc(master.uri)
    # msgpack of [[s], {}] with a 256+ character s is len(s) + 6 bytes: 994 fits exactly, 995 does not.
    assert call("push_task", "echo", module="tasks", args=["x" * 994])
    with pytest.raises(InvalidTaskError, match="parameters are 1001 bytes"):
        call("push_task", "echo", module="tasks", args=["x" * 995])
    assert len(call("push_tasks", [dict(GOOD)] * 5)) == 5
    assert call("push_task", "add", module="tasks", delay=365 * 86400, max_retry=100, timeout=7 * 86400)
    assert call("push_task", "f" * 200, module="m" * 200, key="k" * 512)
    call.close()


def test_refused_finish_or_error_changes_nothing(limited, ra, rb):
    """A finish or error that is refused (unknown task, or a lease this worker does not hold) writes nothing."""
    proxy = make_proxy(limited.uri)
    leased = proxy.get_task({"id": "w1"}, 0)
    assert leased is not None
    stranger = proxy.push_task("add", module="tasks", args=[7, 8])
    before = snap(ra, rb)
    calls = [
        ("task_finish", ("no-such-task", "w2"), {}),
        ("task_error", ("no-such-task", "w2"), {"error": "boom"}),
        ("task_finish", (leased["id"], "w2"), {"result": 1}),  # w1 holds the lease
        ("task_error", (leased["id"], "w2"), {"error": "boom"}),
        ("task_finish", (leased["id"], "w1"), {"lease": "w1/999"}),  # a stale lease
        ("task_finish", (stranger, "w2"), {"piggyback": True}),  # queued, leased to nobody
    ]
    failures = []
    for method, args, kwargs in calls:
        with pytest.raises(LeaseLostError):
            getattr(proxy, method)(*args, **kwargs)
        after = snap(ra, rb)
        if after != before:
            failures.append(f"{method}{args} {kwargs}:\n{diff(before, after)}")
            before = after
    assert not failures, "a refused report changed Redis:\n" + "\n".join(failures)
    assert [w["id"] for w in proxy.server_info()[0]["workers"]] == ["w1"], "a refused report registered a worker"
    proxy._pyroRelease()


CLASS_DICT_CALLS = [
    ("get_task_info", ({"__class__": "x"},), {}),
    ("get_task_info", ({"__class__": "a__b"},), {}),
    ("push_task", ("add",), {"module": "tasks", "args": [{"__class__": "x", "data": 1}]}),
    ("push_task", ("add",), {"module": "tasks", "kwargs": {"__class__": None}}),
    ("push_tasks", ([{"__class__": "ppq.errors.PPQError", "__exception__": True, "args": ["x"],
                      "attributes": {}}],), {}),
    ("heartbeat", ({"__class__": "Pyro5.core.URI", "state": ["PYRO", "x", None, "localhost", 1]},), {}),
    ("server_info", (), {"__class__": None}),
    ("server_info", (), {"__class__": "builtins.SystemExit", "__exception__": True, "args": [1]}),
]


@pytest.mark.parametrize("flavour", ["ppq", "serpent"])
def test_class_dicts_in_arguments(limited, ra, rb, flavour):
    """Pyro5 reads a dict with a "__class__" key as a serialized object; as an argument it is still junk:
    a clean error, Redis unchanged, the master serving."""
    before = snap(ra, rb)
    unclean = []
    for method, args, kwargs in CLASS_DICT_CALLS:
        proxy = make_proxy(limited.uri) if flavour == "ppq" else plain_proxy(limited.uri, "serpent")
        try:
            proxy._pyroInvoke(method, args, kwargs)
            unclean.append(f"{method}(*{args!r}, **{kwargs!r}) was accepted")
        except Exception as exc:  # noqa: BLE001 - judged below
            if not _is_clean(exc):
                unclean.append(f"{method}(*{args!r}, **{kwargs!r}) raised "
                               f"{type(exc).__module__}.{type(exc).__name__}: {exc}")
        finally:
            proxy._pyroRelease()
        assert make_proxy(limited.uri).ping() == "pong"
        assert snap(ra, rb) == before, diff(before, snap(ra, rb))
    assert not unclean, "\n".join(unclean)


# -- property-based: junk at every master method ------------------------------------------

METHODS: dict[str, tuple[str, ...]] = {
    "push_task": ("func", "key", "fclass", "module", "path", "lang", "parameters", "max_retry", "retry_delay",
                  "queue_index", "delay", "args", "kwargs", "timeout", "result_ttl", "task_id", "priority",
                  "expires"),
    "push_tasks": ("tasks",),
    "push_workflow": ("workflow", "queue_index", "workflow_id"),
    "get_task": ("worker_info", "queue_index", "wait"),
    "get_tasks": ("worker_info", "queue_index", "count", "wait"),
    "task_finish": ("task_id", "worker_info", "queue_index", "piggyback", "result", "result_bytes", "lease"),
    "task_error": ("task_id", "worker_info", "queue_index", "piggyback", "error", "traceback", "lease", "retry"),
    "report": ("worker_info", "queue_index", "reports", "want", "wait"),
    "heartbeat": ("worker_info", "queue_index", "running"),
    "get_task_info": ("task_id", "queue_index"),
    "get_tasks_info": ("task_ids", "queue_index"),
    "cancel_task": ("task_id", "queue_index"),
    "dead_tasks": ("queue_index", "limit", "offset"),
    "list_tasks": ("state", "queue_index", "limit", "offset", "func"),
    "requeue_dead": ("task_ids", "queue_index"),
    "purge_dead": ("task_ids", "queue_index"),
    "purge_queue": ("queue_index", "limit"),
    "pause_queue": ("queue_index",),
    "resume_queue": ("queue_index",),
    "pause_worker": ("worker_id", "queue_index"),
    "resume_worker": ("worker_id", "queue_index"),
    "server_info": (),
    "schedule_list": ("queue_index",),
    "schedule_add": ("schedule",),
    "schedule_remove": ("name", "queue_index"),
    "schedule_pause": ("name", "queue_index"),
    "schedule_resume": ("name", "queue_index"),
    "schedule_run_now": ("name", "queue_index"),
    "limit_set": ("function", "rate", "concurrency", "queue_index"),
    "limit_remove": ("function", "kind", "queue_index"),
    "limit_list": (),
}
# Methods that may change Redis when (and only when) they succeed.
CHANGING = {"push_task", "push_tasks", "push_workflow", "report", "heartbeat", "get_task", "get_tasks", "purge_queue",
            "pause_queue", "schedule_add", "schedule_remove", "schedule_pause", "schedule_resume", "schedule_run_now",
            "limit_set", "limit_remove"}

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([0, 1, 2, -1, 2**31, 2**63, -(2**63) - 1, 10**30, -(10**40)]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, -0.0, 0.5, 1e-300, 1e300, math.nan, math.inf, -math.inf]),
    st.text(max_size=20),
    st.sampled_from(["", "\x00", "a\x00b", "😀" * 3, "x" * 5000, "tasks", "add", "abc", "w1", "0", "queued",
                     "\u202e\ufeff", "../../etc/passwd", "PYRO:queue@127.0.0.1:1", "*"]),
    st.binary(max_size=20),
    st.sampled_from([b"", b"\x00", b"\x80\x04.", pickle.dumps(([1], {})), b"\x92\x90\x80", b"[[], {}]"]),
)
# Dict keys; "__class__" is left to test_class_dicts_in_arguments (Pyro5 reads such dicts as objects).
DICT_KEYS = st.text(max_size=8).filter(lambda k: k != "__class__")
# Plausible shapes, to get past the first checks into the deeper ones.
PLAUSIBLE = st.sampled_from([
    {"id": "w1"}, {"id": "w1", "heartbeat_interval": 0.001}, {"id": ""}, {"id": 5}, {"host": "h", "pid": 1},
    ["abc", "lease"], [["abc", "w1/1"]], [{"id": "abc", "lease": "w1/1", "ok": True}],
    [{"id": "abc", "ok": False, "release": True}], [{"func": "add", "module": "tasks"}],
    [{"func": "add", "module": "tasks", "queue_index": 7}], ["abc", "def"],
    {"data": "!!notbase64", "encoding": "base64"}, {"data": "kpCA", "encoding": "base64"},
])
JUNK = st.recursive(
    st.one_of(SCALARS, PLAUSIBLE),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(DICT_KEYS, children, max_size=4)),
    max_leaves=8,
)


# Valid values per parameter name: mixed with junk, they lead calls past the first checks.
VALID: dict[str, list[Any]] = {
    "func": ["add", "tasks.add", "echo"], "module": ["tasks", "tasks.sub"], "key": ["", "k1", "seed-key"],
    "fclass": [None, "Calculator"], "path": [None, ""], "lang": ["", "py"],
    "parameters": [None, b"\x92\x90\x80", b"[[1], {}]", {"data": "kpCA", "encoding": "base64"}],
    "max_retry": [0, 1, 100], "retry_delay": [False, True], "queue_index": [0, 1], "delay": [None, 0, 0.5, 3600],
    "args": [None, [], [1, 2]], "kwargs": [None, {}, {"a": 1}], "timeout": [None, 1.0], "result_ttl": [None, 0, 60],
    "priority": [0, 3, 9], "expires": [None, 60, 2.5],
    "task_id": [None, "abc", "t-1", "a" * 64],
    "tasks": [[], [{"func": "add", "module": "tasks"}], [{"func": "add", "module": "tasks", "queue_index": 1},
                                                           {"func": "echo", "module": "tasks", "key": "k1"}]],
    "workflow": [{"chain": [{"func": "add", "module": "tasks", "args": [1, 2]}, {"func": "add", "module": "tasks"}]},
                 {"group": [{"func": "add", "module": "tasks"}, {"chain": [{"func": "echo", "module": "tasks"}]}]},
                 {"chord": [{"func": "add", "module": "tasks"}], "callback": {"func": "echo", "module": "tasks"},
                  "on_error": "run"},
                 {"chain": [{"func": "add", "module": "tasks", "queue_index": 1}]}, {"chain": []}],
    "workflow_id": [None, "wf-1", "a" * 57],
    "worker_info": ["w1", 7, {"id": "w1"}, {"id": "w1", "heartbeat_interval": 1}, {"host": "h", "pid": 1}],
    "wait": [0, 0.01], "count": [1, 2, 5], "piggyback": [False, True], "result": [None, 1, "x", {"a": [1]}],
    "result_bytes": [None, b"\xc0", b""], "lease": [None, "", "w1/1"], "error": ["", "boom"],
    "traceback": ["", "tb"], "retry": [True, False], "want": [0, 1, 2],
    "reports": [[], [{"id": "abc", "lease": "w1/1", "ok": True}],
                [{"id": "abc", "lease": "w1/1", "ok": False, "error": "e", "retry": False}],
                [{"id": "abc", "lease": "w1/1", "release": True}]],
    "running": [[], [["abc", "w1/1"]]], "task_ids": [None, ["abc"], "abc", ["abc", "t-1"]],
    "limit": [1, 100], "offset": [0, 5], "state": ["queued", "delayed", "running", "dead", "done"],
    "worker_id": ["w1", "h:1:abc", ""],
    # Ticks on January 1st only: nothing fires while a call is checked.
    "schedule": [{"name": "s1", "cron": "0 0 1 1 *", "task": "tasks.add"},
                 {"name": "s1", "cron": "0 0 1 1 *", "task": "tasks.add", "queue_index": 1, "max_retry": 2},
                 {"name": "s1", "every": 0, "task": "tasks.add"}, {"name": "s1", "cron": "61 * * * *"}],
    "name": ["s1", "nope", "", "a:b"],
    "function": ["tasks.add", "add", "tasks.sleep_then"], "rate": [None, "10/s", "0/s", "5/d", "20/m"],
    "concurrency": [None, 1, 0, -1], "kind": [None, "rate", "concurrency", "speed"],
}


def _call_strategy(method: str) -> Any:
    """(flavour, positional args, keyword args): pure junk, or plausible calls with junk mixed in."""
    params = METHODS[method]
    names = list(params) + ["bogus", "self", "_pyroTimeout", "é", "method", "args", "kwargs"]
    keyword = st.one_of(st.sampled_from(names), DICT_KEYS.filter(bool))
    junk = st.tuples(st.lists(JUNK, max_size=len(params) + 1), st.dictionaries(keyword, JUNK, max_size=4))
    plausible = st.tuples(
        st.just([]),
        st.fixed_dictionaries({}, optional={name: st.one_of(st.sampled_from(VALID[name]), JUNK) for name in params}),
    )
    positional = st.lists(st.one_of(*(st.sampled_from(VALID[name]) for name in params[:3])), max_size=3) \
        if params else st.just([])
    return st.tuples(st.sampled_from(["ppq", "serpent"]),
                     st.one_of(junk, plausible, st.tuples(positional, st.just({}))))


def _is_clean(exc: BaseException) -> bool:
    """An error the caller can act on: not a transport failure, a Redis error or an internal error."""
    if isinstance(exc, Pyro5.errors.PyroError):
        return False
    message = str(exc)
    if "internal error" in message or "StorageError" in message or isinstance(exc, (StorageError, ConnectError)):
        return False
    if isinstance(exc, PPQError):
        return isinstance(exc, (InvalidTaskError, LeaseLostError))
    # A plain client gets builtins: ValueError for bad input, RuntimeError("LeaseLostError: ...").
    return isinstance(exc, ValueError) or (isinstance(exc, RuntimeError) and message.startswith("LeaseLostError"))


class Fuzzer:
    """One master, two proxies (ppq's own and a plain serpent one), and the checks after each call."""

    def __init__(self, master: Any, ra: redis.Redis, rb: redis.Redis) -> None:
        self.master, self.ra, self.rb = master, ra, rb
        self.proxies = {"ppq": make_proxy(master.uri, timeout=10),
                        "serpent": plain_proxy(master.uri, "serpent", timeout=10)}
        self.seeder = make_proxy(master.uri, timeout=10)

    def reset(self) -> None:
        """Fresh Redis holding a ready task in each queue (so no valid get_task waits) and a schedule."""
        self.ra.flushall()
        self.rb.flushall()
        self.seeder.push_tasks([dict(GOOD, args=[1, 2], queue_index=0), dict(GOOD, args=[3, 4], queue_index=1),
                                dict(GOOD, delay=3600, key="seed-key", queue_index=0)])
        self.seeder.schedule_add({"name": "s1", "cron": "0 0 1 1 *", "task": "tasks.add"})

    def check(self, flavour: str, method: str, args: list[Any], kwargs: dict[str, Any]) -> None:
        self.reset()
        before = snap(self.ra, self.rb)
        proxy = self.proxies[flavour]
        ok = False
        try:
            proxy._pyroInvoke(method, args, kwargs)  # the raw call: any keyword name goes through
            ok = True
        except Exception as exc:  # noqa: BLE001 - judged below
            if isinstance(exc, Pyro5.errors.CommunicationError):
                proxy._pyroRelease()  # reconnect for the next example
            assert _is_clean(exc), f"{method}(*{args!r:.300}, **{kwargs!r:.300}) raised {type(exc).__name__}: {exc}"
        assert self.seeder.ping() == "pong"
        after = snap(self.ra, self.rb)
        if not (ok and method in CHANGING):
            assert after == before, (f"{method}(*{args!r:.300}, **{kwargs!r:.300}) "
                                     f"{'returned' if ok else 'failed'} but changed Redis:\n{diff(before, after)}")

    def close(self) -> None:
        for proxy in (*self.proxies.values(), self.seeder):
            proxy._pyroRelease()


@pytest.fixture(scope="module")
def fuzz_master(redis_a, redis_b) -> Any:
    server = _module_master(redis_a, redis_b)
    yield server
    server.stop()


@pytest.fixture
def fuzzer(fuzz_master, ra, rb) -> Any:
    fuzz = Fuzzer(fuzz_master, ra, rb)
    yield fuzz
    fuzz.close()


@pytest.mark.parametrize("method", sorted(METHODS))
def test_junk_arguments_never_break_the_master(fuzzer, method):
    @settings(max_examples=50, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large, HealthCheck.filter_too_much])
    @given(call=_call_strategy(method))
    def run(call: tuple[str, tuple[list[Any], dict[str, Any]]]) -> None:
        flavour, (args, kwargs) = call
        fuzzer.check(flavour, method, args, kwargs)

    run()
