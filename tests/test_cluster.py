"""A master over a real Redis Cluster: three primaries on loopback (redis-server --cluster-enabled,
slots assigned and nodes met by hand), one master serving queue_index 0, 1 and 2 on it
through one ``redis+cluster://`` URL, and one worker agent per queue_index.

Everything a master does works there (push, run, results, cancel, the dead list,
schedules, limits, workflows), and every key of a queue_index carries its hash tag,
``ppq:{<queue_index>}:``, so it sits in one slot on one node.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.crc import key_slot

from ppq import Client, chain, group
from ppq.config import load_config
from ppq.errors import ConfigError
from ppq.master import MasterServer
from ppq.rpc import PyroFunc
from ppq.store import Store, keys_of
from ppq.targets import redis_target

from .conftest import REPO, Spawner, address_of, wait_for, wait_state
from .redis_topology import Node, cluster_of

QUEUES = (0, 1, 2)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Node]]:
    nodes = cluster_of(tmp_path_factory.mktemp("cluster"))
    yield nodes
    for node in nodes:
        node.stop()


@pytest.fixture(scope="module")
def cluster_url(cluster: list[Node]) -> str:
    # Two of the three nodes: the third is found through them.
    return f"redis+cluster://127.0.0.1:{cluster[0].port},127.0.0.1:{cluster[1].port}/"


@pytest.fixture(scope="module")
def master(cluster_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[MasterServer]:
    config = load_config(overrides={"master.port": 0, "master.reaper_interval": 0.2,
                                    "master.redis_map": {qi: cluster_url for qi in QUEUES}}, environ={})
    server = MasterServer(config).start()
    spawner = Spawner(tmp_path_factory.mktemp("cluster-workers"))
    for qi in QUEUES:
        spawner.worker(address_of(server), allow="tasks,flow_tasks", extra=("--queue-index", str(qi)))
    yield server
    spawner.cleanup()
    server.stop()


@pytest.fixture
def call(master: MasterServer) -> Iterator[PyroFunc]:
    func = PyroFunc(master.uri)
    yield func
    func.close()


@pytest.fixture
def client(master: MasterServer) -> Iterator[Client]:
    c = Client([address_of(master)], retry=1)
    yield c
    c.close()


def keys_by_node(cluster: list[Node]) -> dict[int, list[str]]:
    out = {}
    for node in cluster:
        with node.client() as c:
            out[node.port] = [k for k in c.scan_iter("ppq:*", count=1000)]
    return out


def test_a_cluster_url_or_mapping_parses_and_a_bad_one_is_refused_naming_the_key():
    config = load_config(overrides={"master.redis_map": {
        0: {"cluster": [["10.0.0.9", 6379], "10.0.0.10:6380"], "password": "s3cret"},
        1: "redis+cluster://10.0.0.9,10.0.0.10:7000/"}}, environ={})
    zero = redis_target(config.master.redis_map[0])
    assert (zero.kind, zero.nodes, zero.password) == ("cluster", (("10.0.0.9", 6379), ("10.0.0.10", 6380)), "s3cret")
    assert redis_target(config.master.redis_map[1]).nodes == (("10.0.0.9", 6379), ("10.0.0.10", 7000))
    for bad, field in [("redis+cluster://h:1/2", r"master\.redis_map\[0\]: a Redis Cluster has only db 0"),
                       ("redis+cluster:///", r"master\.redis_map\[0\]: no host"),
                       ({"cluster": []}, r"master\.redis_map\[0\]\.cluster: expected a list"),
                       ({"cluster": [["h", "p"]]}, r"master\.redis_map\[0\]\.cluster\[0\]: expected \[host, port\]"),
                       ({"cluster": [["h", 1]], "db": 1}, r"master\.redis_map\[0\]: unknown key 'db'")]:
        with pytest.raises(ConfigError, match=field):
            load_config(overrides={"master.redis_map": {0: bad}}, environ={})


def test_tasks_run_on_every_queue_index_and_each_queue_index_keeps_to_one_slot(master, client, call, cluster):
    ids = {qi: client.push("tasks.add", qi, 10, queue_index=qi) for qi in QUEUES}
    assert {qi: client.result(tid, timeout=20, queue_index=qi) for qi, tid in ids.items()} == {0: 10, 1: 11, 2: 12}
    batch = call("push_tasks", [{"func": "add", "module": "tasks", "args": [i, 1], "queue_index": 1}
                                for i in range(20)])
    assert dict(client.results(batch, timeout=20, queue_index=1)) == {tid: i + 1 for i, tid in enumerate(batch)}
    info = call("server_info")
    assert {qi: info[qi]["done"] for qi in QUEUES} == {0: 1, 1: 21, 2: 1}
    assert all(info[qi]["workers_live"] == 1 for qi in QUEUES), info
    homes: dict[int, set[int]] = {qi: set() for qi in QUEUES}
    for port, keys in keys_by_node(cluster).items():
        for key in keys:
            assert key.startswith(tuple(keys_of(qi, cluster=True) for qi in QUEUES)), key
            qi = int(key[len("ppq:{"):key.index("}")])
            assert key_slot(key.encode()) == key_slot(keys_of(qi, cluster=True).encode()), key
            homes[qi].add(port)
    # Each queue_index lives on exactly one node, and they do not all share one.
    assert all(len(ports) == 1 for ports in homes.values()), homes
    assert len(set.union(*homes.values())) > 1, homes


def test_cancel_and_the_dead_list_work_in_a_cluster(master, client, call):
    for qi in QUEUES:
        later = call("push_task", "add", module="tasks", args=[1, 1], delay=600, queue_index=qi)
        assert call("cancel_task", later, qi) == "delayed"
        assert call("get_task_info", later, qi)["state"] == "cancelled"
        dead = call("push_task", "boom", module="tasks", args=["no"], max_retry=0, queue_index=qi)
        wait_state(call, dead, "dead", queue_index=qi)
        assert [t["id"] for t in call("dead_tasks", qi)] == [dead]
        assert call("requeue_dead", [dead], qi) == [dead]
        wait_state(call, dead, "dead", queue_index=qi)
        assert call("purge_dead", None, qi) == 1
        assert call("dead_tasks", qi) == []


def test_schedules_and_limits_work_in_a_cluster(master, client, call, tmp_path):
    runs = tmp_path / "ticks"
    client.call("schedule_add", {"name": "tick", "every": 1, "task": "tasks.record",
                                 "args": [str(runs), "tick"], "queue_index": 2})
    assert [s["name"] for s in call("schedule_list", 2)] == ["tick"]
    wait_for(lambda: runs.exists() and len(runs.read_text().split()) >= 2, what="two scheduled runs")
    assert call("schedule_remove", "tick", 2) == [2]
    assert call("limit_set", "tasks.mul", "5/m", 1, 1) == [1]
    assert call("limit_list")[1][0]["function"] == "tasks.mul"
    held = [call("push_task", "mul", module="tasks", args=[i, 2], queue_index=1) for i in range(3)]
    assert client.result(held[0], timeout=20, queue_index=1) == 0
    assert call("limit_remove", "tasks.mul", None, 1) == [1]
    assert dict(client.results(held, timeout=20, queue_index=1)) == dict(zip(held, [0, 2, 4], strict=True))


def test_workflows_run_in_a_cluster(master, client):
    for qi in QUEUES:
        flow = chain(("flow_tasks.add", (1, 2)), group(("flow_tasks.add", (10,)), ("flow_tasks.add", (20,))))
        wid = client.push(flow, queue_index=qi)
        assert client.result(wid, timeout=30, queue_index=qi) == [13, 23]


def test_a_store_on_a_cluster_follows_its_slot_and_plain_redis_keeps_its_prefix(cluster_url, redis_a):
    store = Store(1, cluster_url)
    try:
        assert store.prefix == "ppq:{1}:" and store.cluster
        assert store.ping()
        host, port = store._locator.address()  # type: ignore[union-attr]
        with redis.Redis(host=host, port=port) as direct:
            slot = key_slot(b"ppq:{1}:")
            assert direct.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) >= 0
            owner = [r for r in direct.execute_command("CLUSTER", "SLOTS") if r[0] <= slot <= r[1]][0]
            assert int(owner[2][1]) == port
    finally:
        store.close()
    plain = Store(1, redis_a.url)
    try:
        assert plain.prefix == "ppq:1:" and plain._locator is None and not plain.cluster
    finally:
        plain.close()


def test_config_mapping_of_a_cluster_round_trips(cluster: list[Node]):
    url = load_config(overrides={"master.redis_map": {0: {"cluster": [["127.0.0.1", cluster[2].port]]}}},
                      environ={}).master.redis_map[0]
    assert dataclasses.asdict(redis_target(url))["nodes"] == (("127.0.0.1", cluster[2].port),)
    store = Store(0, url)
    try:
        assert store.counts()["queued"] >= 0
    finally:
        store.close()



def test_the_readme_cluster_example_is_a_valid_config(tmp_path: Path):
    found = re.search(r"```yaml\n(# cluster\.yaml\n.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    assert found, "README.md: no cluster.yaml block"
    path = tmp_path / "cluster.yaml"
    path.write_text(found.group(1))
    config = load_config(str(path), environ={})
    targets = [redis_target(config.master.redis_map[qi]) for qi in (0, 1, 2)]
    assert [t.kind for t in targets] == ["cluster"] * 3
    assert targets[0].nodes == targets[1].nodes and len(targets[0].nodes) == 3
    assert targets[2].password == "redis-secret"


def test_a_store_follows_its_slot_when_it_moves_to_another_node(cluster: list[Node], cluster_url: str):
    """Resharding moves a queue_index's slot (and its keys) to another node: the store's next script
    gets MOVED from the old node, asks the cluster again and runs on the new one, in one call."""
    store = Store(7, cluster_url)
    try:
        assert store.pause() == 1
        slot = key_slot(b"ppq:{7}:")
        assert store._locator is not None
        source = next(n for n in cluster if n.port == store._locator.address()[1])
        target = next(n for n in cluster if n is not source)
        with source.client() as src, target.client() as dst:
            src_id, dst_id = src.execute_command("CLUSTER", "MYID"), dst.execute_command("CLUSTER", "MYID")
            dst.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", dst_id)
            keys = src.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 1000)
            assert "ppq:{7}:paused" in keys
            src.execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            for node in cluster:
                with node.client() as c:
                    c.execute_command("CLUSTER", "SETSLOT", slot, "NODE", dst_id)
        assert store._locator.address()[1] == source.port  # nothing told the store yet
        assert store.resume() == 1
        assert store._locator.address()[1] == target.port
        assert store.paused() == {}
        assert store.pause() == 1
        with target.client() as dst, source.client() as src:
            assert dst.hexists("ppq:{7}:paused", "queue")
            assert src.execute_command("CLUSTER", "COUNTKEYSINSLOT", slot) == 0
    finally:
        store.close()
