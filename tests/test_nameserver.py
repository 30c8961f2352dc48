"""Name servers: `ppq nameserver`, masters registering there, clients and workers finding them.

Real processes: the name server, masters and workers run as `python -m ppq` subprocesses
(killed by pid with SIGKILL where the test says so); Redis is the session's redis_a.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from typing import Any

import Pyro5.errors
import pytest
import redis

from ppq.client import Client
from ppq.config import load_config
from ppq.embedded import RedisServer, free_port
from ppq.errors import ConfigError, ConnectError
from ppq.rpc import PyroFunc, make_proxy
from ppq.rpc.names import (
    MAX_LOOKUP_REPLY,
    Finder,
    NameServerEntry,
    NameServerProcess,
    lookup,
    serves_queue,
)
from ppq.rpc.roles import token_roles
from tests.conftest import Spawner, run_ppq, wait_for

NS_NAME = "ppq.master"


def start_nameserver(spawn: Spawner, port: int, *extra: str, env: dict[str, str] | None = None,
                     token: str | None = None) -> subprocess.Popen[bytes]:
    """`ppq nameserver` on 127.0.0.1:port; returns once it answers a lookup."""
    proc = spawn("nameserver", "--port", str(port), *extra, env=env, name="nameserver")
    wait_for(lambda: proc.poll() is not None or registered(port, token) is not None,
             what=f"the name server on port {port}")
    assert proc.poll() is None, spawn.log(proc)
    return proc


def registered(port: int, token: str | None = None, address: str = "") -> list[str] | None:
    """The master URIs registered at the name server on ``port`` (None if it does not answer)."""
    try:
        found = lookup(NameServerEntry(address or f"PYRONAME:{NS_NAME}@127.0.0.1:{port}"), token, timeout=2)
    except (Pyro5.errors.PyroError, OSError):
        return None
    return sorted(uri for uri, _ in found)


def uri_of(address: str) -> str:
    return f"PYRO:queue@{address}"


def kill9(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)


def test_two_masters_found_by_name_failover_and_a_stale_entry_skipped(spawn: Spawner, redis_a: RedisServer,
                                                                      ra: redis.Redis) -> None:
    """Two masters register; a client (PYRONAME:) and a worker (--nameserver) find them. Each
    master in turn is SIGKILLed (its entry stays: pruning is off): the client and the worker
    skip it and every task pushed is done; the master restarted on its port registers again."""
    ns_port = free_port()
    ns = f"127.0.0.1:{ns_port}"
    start_nameserver(spawn, ns_port, "--prune-after", "0")
    port_a, port_b = free_port(), free_port()
    master_a, address_a = spawn.master(redis_a.url, "--nameserver", ns, port=port_a)
    _master_b, address_b = spawn.master(redis_a.url, "--nameserver", ns, port=port_b)
    both = sorted([uri_of(address_a), uri_of(address_b)])
    wait_for(lambda: registered(ns_port) == both, what="both masters registered")
    # Tagged with what they serve: PYROMETA finds them too.
    assert registered(ns_port, address=f"PYROMETA:ppq.queue@{ns}") == both
    assert registered(ns_port, address=f"PYROMETA:ppq.queue_indexes:0@{ns}") == both

    config = load_config(overrides={"client.timeout": 3.0}, environ={})
    client = Client([f"PYRONAME:{NS_NAME}@{ns}"], config=config)
    spawn.worker(extra=("--nameserver", ns))  # no master_hosts: the name server's masters only
    try:
        assert sorted(client.call.targets()) == both
        ids = [client.push("tasks.add", i, 1) for i in range(10)]
        assert [r for _, r in sorted(client.results(ids, timeout=30), key=lambda x: ids.index(x[0]))] == \
            [i + 1 for i in range(10)]

        kill9(master_a)
        # A SIGKILLed master cannot unregister: its entry stays, and is skipped.
        assert registered(ns_port) == both
        ids = [client.push("tasks.add", i, 2) for i in range(10)]
        assert sorted(r for _, r in client.results(ids, timeout=30)) == [i + 2 for i in range(10)]

        # Back on its port, it registers again; now the other one dies.
        master_a, _ = spawn.master(redis_a.url, "--nameserver", ns, port=port_a)
        ping = Client([address_a], config=config)
        try:
            wait_for(lambda: ping.call("ping") == "pong", what="master a back")
        finally:
            ping.close()
        kill9(_master_b)
        ids = [client.push("tasks.add", i, 3) for i in range(10)]
        assert sorted(r for _, r in client.results(ids, timeout=30)) == [i + 3 for i in range(10)]
        assert registered(ns_port) == both
    finally:
        client.close()


def test_masters_register_again_after_the_name_server_restarts(spawn: Spawner,
                                                              make_master: Callable[..., Any]) -> None:
    """The name server is SIGKILLed and restarted empty: the master's entry comes back by
    itself; a clean stop removes it."""
    ns_port = free_port()
    ns = f"127.0.0.1:{ns_port}"
    proc = start_nameserver(spawn, ns_port)
    server = make_master(master__nameserver=ns)
    mine = [f"PYRO:queue@127.0.0.1:{server.port}"]
    wait_for(lambda: registered(ns_port) == mine, what="the master registered")
    kill9(proc)
    proc = start_nameserver(spawn, ns_port)
    wait_for(lambda: registered(ns_port) == mine, timeout=15, what="the master registered again")
    server.stop()
    assert registered(ns_port) == []


def test_the_name_server_prunes_an_entry_whose_master_is_gone(make_master: Callable[..., Any]) -> None:
    """An entry whose address refuses connections for --prune-after seconds is removed; the
    live master's entry stays."""
    server = NameServerProcess("127.0.0.1", 0, prune_after=0.5).start()
    try:
        ns_port = int(server.location.rsplit(":", 1)[1])
        live = make_master(master__nameserver=f"127.0.0.1:{ns_port}")
        dead_port = free_port()
        proxy = make_proxy(server.uri)
        try:
            proxy.register(f"{NS_NAME}.gone", f"PYRO:queue@127.0.0.1:{dead_port}", False, ["ppq.queue"])
        finally:
            proxy._pyroRelease()
        alive = f"PYRO:queue@127.0.0.1:{live.port}"
        wait_for(lambda: registered(ns_port) == sorted([alive, f"PYRO:queue@127.0.0.1:{dead_port}"]),
                 what="both entries listed")
        wait_for(lambda: registered(ns_port) == [alive], timeout=15, what="the dead entry pruned")
    finally:
        server.stop()


def test_a_token_protects_the_name_server_and_other_tokens_only_look_up(
        make_master: Callable[..., Any]) -> None:
    """With tokens set, a lookup without one is refused; the worker and client tokens may look up,
    not register or remove; the master registers with auth_token."""
    server = NameServerProcess("127.0.0.1", 0, token_roles("s3cret", "w-token", "c-token")).start()
    try:
        ns_port = int(server.location.rsplit(":", 1)[1])
        master = make_master(auth_token="s3cret", master__nameserver=f"127.0.0.1:{ns_port}")
        alive = [f"PYRO:queue@127.0.0.1:{master.port}"]
        wait_for(lambda: registered(ns_port, "s3cret") == alive, what="the master registered")
        assert registered(ns_port, None) is None
        assert registered(ns_port, "wrong") is None
        for token, role in (("w-token", "worker"), ("c-token", "client")):
            assert registered(ns_port, token) == alive
            proxy = make_proxy(server.uri, token)
            try:
                with pytest.raises(PermissionError, match=f"the {role} token may look names up"):
                    proxy.register(f"{NS_NAME}.intruder", "PYRO:queue@127.0.0.1:1", False, ["ppq.queue"])
                with pytest.raises(PermissionError, match="auth_token"):
                    proxy.remove(f"{NS_NAME}.127.0.0.1_{master.port}")
            finally:
                proxy._pyroRelease()
        assert registered(ns_port, "s3cret") == alive
        # A client with the token finds the master through it.
        config = load_config(overrides={"auth_token": "s3cret", "client.nameserver": f"127.0.0.1:{ns_port}"},
                             environ={})
        client = Client(config=config)
        try:
            assert client.call("ping") == "pong"
        finally:
            client.close()
    finally:
        server.stop()


def test_lookups_are_bounded_in_time_and_reply_size() -> None:
    """A name server that never answers costs the lookup's timeout, not more; a reply larger than
    MAX_LOOKUP_REPLY is refused unread; a Finder keeps what it found before."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    try:
        port = silent.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(Pyro5.errors.CommunicationError):
            lookup(NameServerEntry(f"PYRONAME:{NS_NAME}@127.0.0.1:{port}"), None, timeout=1.0)
        assert time.monotonic() - start < 3.0
        # A client whose only master address is that name server says so.
        call = PyroFunc(f"PYRONAME:{NS_NAME}@127.0.0.1:{port}", timeout=1)
        with pytest.raises(ConnectError, match=f"name server 127.0.0.1:{port} did not answer"):
            call("ping")
        call.close()
    finally:
        silent.close()

    server = NameServerProcess("127.0.0.1", 0, prune_after=0).start()
    try:
        ns_port = int(server.location.rsplit(":", 1)[1])
        address = f"PYRONAME:{NS_NAME}@127.0.0.1:{ns_port}"
        finder = Finder(address, None)
        proxy = make_proxy(server.uri)
        try:
            proxy.register(f"{NS_NAME}.first", "PYRO:queue@127.0.0.1:7600", False, ["ppq.queue"])
            assert finder.uris() == ["PYRO:queue@127.0.0.1:7600"]
            padding = "x" * 200
            per_entry = len(padding) + 60
            for n in range(MAX_LOOKUP_REPLY // per_entry + 100):
                proxy.register(f"{NS_NAME}.{n}.{padding}", f"PYRO:queue@127.0.0.{n % 250 + 1}:7600", False,
                               ["ppq.queue"])
        finally:
            proxy._pyroRelease()
        with pytest.raises(Pyro5.errors.CommunicationError, match="too large"):
            lookup(NameServerEntry(address), None)
        assert finder.uris(fresh=True) == ["PYRO:queue@127.0.0.1:7600"]
    finally:
        server.stop()


def test_name_server_config_keys_are_checked_and_used() -> None:
    config = load_config(overrides={"client.nameserver": "10.0.0.9:9090", "master.nameserver_name": "jobs"},
                         environ={})
    assert config.client_masters() == ["PYRONAME:jobs@10.0.0.9:9090"]
    config = load_config(overrides={"worker.nameserver": "ns:9090", "worker.master_hosts": ["10.0.0.2:7600"]},
                         environ={})
    assert config.worker_masters() == ["10.0.0.2:7600", "PYRONAME:ppq.master@ns:9090"]
    # The worker's derived default (its own master) is not mixed in with a name server.
    assert load_config(overrides={"worker.nameserver": "ns:9090"}, environ={}).worker_masters() == \
        ["PYRONAME:ppq.master@ns:9090"]
    for key, value in (("master.nameserver", "nohost"), ("worker.nameserver", "ns:99999"),
                       ("client.nameserver", ":9090"), ("master.nameserver_name", "a@b")):
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            load_config(overrides={key: value}, environ={})
    with pytest.raises(ConfigError, match="PYRONAME"):
        NameServerEntry("PYRONAME:@nohost")
    # Masters tagged with their queue_indexes serve only those.
    assert serves_queue({"ppq.queue", "ppq.queue_indexes:0,1"}, 1)
    assert not serves_queue({"ppq.queue", "ppq.queue_indexes:0,1"}, 2)
    assert serves_queue({"ppq.queue"}, 7)


def test_ppq_nameserver_refuses_a_public_address_without_a_token() -> None:
    result = run_ppq("nameserver", "--host", "0.0.0.0", "--port", "0", timeout=20)
    assert result.returncode == 2, result.stderr
    assert "--host" in result.stderr and "auth_token" in result.stderr


def test_a_worker_finds_only_the_masters_that_serve_its_queue_index() -> None:
    """Masters tagged ppq.queue_indexes:0 and :0,1: a Finder for queue_index 1 (what a worker uses)
    gets only the second; one for a client (no queue_index) gets both; PYROMETA on a tag, the one tagged."""
    server = NameServerProcess("127.0.0.1", 0, prune_after=0).start()
    try:
        ns_port = int(server.location.rsplit(":", 1)[1])
        proxy = make_proxy(server.uri)
        try:
            proxy.register(f"{NS_NAME}.a", "PYRO:queue@10.0.0.1:7600", False, ["ppq.queue", "ppq.queue_indexes:0"])
            proxy.register(f"{NS_NAME}.b", "PYRO:queue@10.0.0.2:7600", False,
                           ["ppq.queue", "ppq.queue_indexes:0,1"])
            proxy.register("other.c", "PYRO:queue@10.0.0.3:7600", False, ["elsewhere"])
        finally:
            proxy._pyroRelease()
        address = f"PYRONAME:{NS_NAME}@127.0.0.1:{ns_port}"
        assert Finder(address, None, queue_index=1).uris() == ["PYRO:queue@10.0.0.2:7600"]
        assert sorted(Finder(address, None).uris()) == ["PYRO:queue@10.0.0.1:7600", "PYRO:queue@10.0.0.2:7600"]
        assert Finder(f"PYROMETA:elsewhere@127.0.0.1:{ns_port}", None).uris() == ["PYRO:queue@10.0.0.3:7600"]
        assert Finder(f"PYRONAME:{NS_NAME}.b@127.0.0.1:{ns_port}", None).uris() == ["PYRO:queue@10.0.0.2:7600"]
    finally:
        server.stop()
