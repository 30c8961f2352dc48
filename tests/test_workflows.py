"""Workflows (chain, group, chord) end to end: a real Redis, real masters and worker agents.

The task targets are in tests/flow_tasks.py. Most tests share one in-process master and
one worker agent for the module; the last two prove the reliability model with two
masters on one Redis, two workers, and SIGKILLs mid-way.
"""

from __future__ import annotations

import importlib
import pickle
import re
import signal
import sys
import threading
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import Pyro5.api
import pytest
import redis

from ppq import AuthError, Client, StorageError, TaskFailedError, chain, chord, codec, group, sig
from ppq.config import LimitsConfig
from ppq.master import MasterServer
from ppq.master.flows import build
from ppq.rpc import PyroFunc
from ppq.store import Store
from ppq.store import flows as flow_store
from ppq.task import check_push
from ppq.workflow import MAX_DEPTH

from .conftest import TESTS_DIR, Spawner, address_of, redis_snapshot, run_ppq, wait_for

# Imported as the workers import it (by its top-level name), so that its @task functions' steps name it so.
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))
ft = importlib.import_module("flow_tasks")
ALLOW = "flow_tasks"


@pytest.fixture(scope="module")
def flow_worker(module_master: MasterServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One worker agent (2 executors) on the module's master, for the whole module."""
    spawner = Spawner(tmp_path_factory.mktemp("flow-worker"))
    proc = spawner.worker(address_of(module_master), allow=ALLOW, concurrency=2)
    yield proc
    spawner.cleanup()


@pytest.fixture
def master(module_master: MasterServer, flow_worker: Any, ra: redis.Redis, rb: redis.Redis) -> MasterServer:
    assert flow_worker.poll() is None
    return module_master


@pytest.fixture
def client(master: MasterServer) -> Iterator[Client]:
    c = Client([address_of(master)], retry=1)
    yield c
    c.close()


def stored(r: redis.Redis) -> list[dict[bytes, Any]]:
    """What Redis holds but the worker agents' registrations and long-polls (their heartbeats
    and polls go on meanwhile)."""
    return [{k: v for k, v in snap.items() if not k.startswith((b"ppq:0:workers", b"ppq:0:waiters"))}
            for snap in redis_snapshot(r)]


def path_of(tmp_path: Path, name: str = "runs") -> str:
    return str(tmp_path / name)


def lines(path: str) -> list[str]:
    p = Path(path)
    return p.read_text().split() if p.exists() else []


# -- what each kind of node does ----------------------------------------------------------------


def test_a_chain_passes_each_result_as_the_first_argument_and_an_immutable_step_ignores_it(client):
    flow = ft.add.s(1, 2) | ft.add.s(10) | ft.add.si(5, 5) | ft.mul.s(3)
    wid = client.push(flow)
    assert client.result(wid, timeout=20) == 30  # ((1 + 2) + 10), then 5 + 5 ignoring 13, then 10 * 3
    info = client.info(wid)
    assert info["kind"] == "chain" and info["state"] == "done" and info["progress"] == "4 of 4 steps done"
    steps = [client.info(kid["id"]) for kid in info["children"]]
    assert [s["args"] for s in steps] == [[1, 2], [3, 10], [5, 5], [10, 3]]
    assert [s["result"] for s in steps] == [3, 13, 10, 30]
    assert all(s["wf"] == wid for s in steps) and [s["pos"] for s in steps] == [1, 2, 3, 4]


def test_the_previous_result_goes_first_whatever_the_size_of_the_arguments_and_the_result(client):
    # 20 args (a 3-byte array header), kwargs kept after them, a 70,000-byte result (a bin32 body).
    wid = client.push(chain(ft.add.s(1, 2), sig("flow_tasks.echo", *range(20), kwargs={"k": [1, "x"]})))
    assert client.result(wid, timeout=20) == {"args": [3, *range(20)], "kwargs": {"k": [1, "x"]}}
    big = "x" * 70_000
    wid = client.push(sig("flow_tasks.ident", big) | sig("flow_tasks.echo", kwargs={"n": None}))
    assert client.result(wid, timeout=20) == {"args": [big], "kwargs": {"n": None}}
    # Parameters given as bytes (the seed's shape) work as args do.
    raw = {"func": "echo", "module": "flow_tasks", "parameters": codec.encode_parameters([7], {"a": 1})}
    wid = client.call("push_workflow", {"chain": [GOOD, raw]}, 0)
    assert client.result(wid, timeout=20) == {"args": [3, 7], "kwargs": {"a": 1}}


def test_a_result_that_is_not_msgpack_fails_the_workflow_naming_its_step(redis_b, rb):
    store = Store(2, redis_b.url)  # queue_index 2: no master or worker of this module serves it
    try:
        records = build({"chain": [GOOD, GOOD]}, 2, [2], LimitsConfig(), 100)
        assert store.push_workflow(records)
        _, leased, _ = store.report("w1", [], 1, 10.0)
        [task] = leased
        assert task["id"] == f"{records[0].id}.1"
        report = {"id": task["id"], "lease": task["lease"], "ok": True, "result": pickle.dumps({1, 2})}
        assert store.report("w1", [report], 0, 10.0)[0] == [True]
        root = store.info(records[0].id)
        assert root is not None and root["state"] == "dead"
        assert root["error"] == (f"step {task['id']} returned a value that is not msgpack; workflows pass msgpack "
                                 f"results only")
        assert store.info(f"{records[0].id}.2")["state"] == "cancelled"
        assert not store.push_workflow(records)  # pushed again (a retried call): nothing changes
    finally:
        store.close()


def test_a_step_whose_worker_was_lost_too_often_ends_its_workflow(redis_b, rb):
    store = Store(2, redis_b.url, lease_timeout=0.05, max_lease_expiries=0)
    try:
        records = build({"group": [GOOD, GOOD]}, 2, [2], LimitsConfig(), 100)
        assert store.push_workflow(records)
        _, leased, _ = store.report("w1", [], 1, 10.0)
        assert [t["id"] for t in leased] == [f"{records[0].id}.1"]
        wait_for(lambda: store.reap()[1], what="the lease to expire")
        root = store.info(records[0].id)
        assert root is not None and root["state"] == "dead" and root["failed_task"] == leased[0]["id"]
        assert root["error"] == f"step {leased[0]['id']} failed: LeaseExpired: the worker running it was lost 1 times"
        # The other member, not started, is cancelled: a lease drops it.
        assert store.info(f"{records[0].id}.2")["state"] == "cancelled"
        assert store.report("w1", [], 1, 10.0)[1] == []
    finally:
        store.close()


def test_a_group_lists_results_in_the_order_given_whatever_order_they_end_in(client):
    # The first member sleeps, so it ends last.
    gid = client.push(group(sig("flow_tasks.square", 7, kwargs={"seconds": 1.2}),
                            *(sig("flow_tasks.square", i) for i in range(5))))
    assert client.result(gid, timeout=20) == [49, 0, 1, 4, 9, 16]
    finished = [client.info(kid["id"])["finished"] for kid in client.info(gid)["children"]]
    assert finished[0] > max(finished[1:])


def test_a_chord_calls_its_callback_once_with_the_results_in_order(client, tmp_path):
    runs = path_of(tmp_path)
    members = [sig("flow_tasks.square", i, kwargs={"seconds": (4 - i) * 0.03}) for i in range(5)]
    cid = client.push(chord(members, sig("flow_tasks.tally", runs)))
    assert client.result(cid, timeout=20) == [0, 1, 4, 9, 16]
    assert lines(runs) == ["5"]
    assert client.info(cid)["kind"] == "chord"
    # group(...) | callback is the same chord.
    cid = client.push(group(ft.add.s(1, 1), ft.add.s(2, 2)) | sig("flow_tasks.tally", runs))
    assert client.result(cid, timeout=20) == [2, 4]
    assert lines(runs) == ["5", "2"]


def test_groups_and_chords_nest_in_chains_and_chains_in_groups(client, tmp_path):
    runs = path_of(tmp_path)
    # Each member of a group inside a chain gets the previous result.
    wid = client.push(chain(ft.add.s(1, 1), group(ft.add.s(1), ft.add.s(2)), sig("flow_tasks.ident")))
    assert client.result(wid, timeout=20) == [3, 4]
    wid = client.push(chain(ft.add.s(1, 1), chord([ft.add.s(1), ft.add.s(2)], sig("flow_tasks.tally", runs)),
                            sig("flow_tasks.ident")))
    assert client.result(wid, timeout=20) == [3, 4]
    assert lines(runs) == ["2"]
    gid = client.push(group(chain(ft.add.s(1, 1), ft.add.s(1)), ft.add.s(2, 2) | ft.mul.s(2)))
    assert client.result(gid, timeout=20) == [3, 8]
    # A step given as a (target, args) tuple.
    wid = client.push(chain(("flow_tasks.add", (1, 2)), ("flow_tasks.add", (4,))))
    assert client.result(wid, timeout=20) == 7


def test_nesting_deeper_than_the_limit_is_refused_naming_the_depth_and_the_limit(client, master, ra):
    node: Any = ft.add.s(1, 1)
    for level in range(MAX_DEPTH):
        node = group(node) if level % 2 else chain(node, sig("flow_tasks.ident"))
    assert node.depth == MAX_DEPTH
    with pytest.raises(ValueError, match=rf"9 deep, more than the limit of {MAX_DEPTH}"):
        group(node)
    data: Any = {"func": "add", "module": "flow_tasks", "args": [1, 1]}
    for _ in range(MAX_DEPTH + 1):
        data = {"group": [data]}
    before = stored(ra)
    with pytest.raises(ValueError, match=rf"9 deep here, more than the limit of {MAX_DEPTH}"):
        client.call("push_workflow", data, 0)
    assert stored(ra) == before
    assert client.result(client.push(node), timeout=20) == [[[[2]]]]


def test_more_tasks_than_max_workflow_tasks_are_refused_and_nothing_is_stored(make_master, ra):
    small = make_master(limits__max_workflow_tasks=5)
    c = Client([address_of(small)], retry=1)
    try:
        before = stored(ra)
        with pytest.raises(ValueError, match=r"more than 5 tasks \(limits.max_workflow_tasks\)"):
            c.push(group(ft.add.s(i, i) for i in range(6)))
        assert stored(ra) == before
        # Nodes that hold one step each add no task, and are held to the same number.
        with pytest.raises(ValueError, match=r"more than 5 chains, groups and chords \(limits.max_workflow_tasks\)"):
            c.push(group(chain(group(ft.add.s(i, i))) for i in range(3)))
        assert stored(ra) == before
        c.push(group(ft.add.s(i, i) for i in range(5)))
        assert len(stored(ra)[0]) > len(before[0])
    finally:
        c.close()


GOOD = {"func": "add", "module": "flow_tasks", "args": [1, 2]}
BAD_WORKFLOWS = [
    ({"chain": [GOOD, {"group": [GOOD, {"func": "1bad", "module": "flow_tasks"}]}]}, "chain[1].group[1]: func"),
    ({"chain": []}, "chain: must be a non-empty list"),
    ({"group": [GOOD, "x"]}, "group[1]: a step must be a dict"),
    ({"chord": [GOOD], "callback": {"module": "flow_tasks"}}, "chord.callback: func"),
    ({"chord": [GOOD], "callback": GOOD, "on_error": "maybe"}, "chord.on_error: must be one of fail, run"),
    ({"chord": {"group": [GOOD, dict(GOOD, max_retry=-1)]}, "callback": GOOD}, "chord.group[1]: max_retry"),
    ({"chain": [GOOD, dict(GOOD, parameters=pickle.dumps(([1], {})))]}, "chain[1]: parameters are pickled"),
    ({"chain": [dict(GOOD, queue_index=1)]}, "chain[0]: queue_index is not an option of a workflow step"),
    ({"group": [dict(GOOD, immutable="yes")]}, "group[0]: immutable must be true or false"),
    ({"group": [GOOD, GOOD, dict(GOOD, kwargs={1: 2})]}, "group[2]: kwargs must be a dict with string keys"),
    ({"group": [GOOD, dict(GOOD, args=[2**70])]}, "group[1]: args/kwargs: an integer of 71 bits"),
    ({"chain": [GOOD], "group": [GOOD]}, "a chain node holds only chain"),
    ("chain", "workflow: a step must be a dict"),
]


def test_bad_workflows_over_a_plain_pyro5_proxy_name_the_node_and_store_nothing(master, ra):
    proxy = Pyro5.api.Proxy(master.uri)
    proxy._pyroSerializer = "serpent"
    proxy._pyroTimeout = 10
    try:
        before = stored(ra)
        for data, message in BAD_WORKFLOWS:
            with pytest.raises(ValueError) as caught:
                proxy.push_workflow(data, 0)
            assert message in str(caught.value), (data, str(caught.value))
        assert stored(ra) == before
        wid = proxy.push_workflow({"chain": [GOOD, {"func": "add", "module": "flow_tasks", "args": [4]}]}, 0)
        assert proxy.wait_task(wid, 0, 20)["result"] == 7
    finally:
        proxy._pyroRelease()


def test_a_worker_token_cannot_push_a_workflow(make_master, ra):
    guarded = make_master(client_token="c" * 32, worker_token="w" * 32)
    as_worker = PyroFunc(address_of(guarded), token="w" * 32, timeout=5)
    as_client = PyroFunc(address_of(guarded), token="c" * 32, timeout=5)
    try:
        before = stored(ra)
        with pytest.raises(AuthError, match="push_workflow is for clients"):
            as_worker("push_workflow", {"chain": [GOOD]}, 0)
        assert stored(ra) == before
        wid = as_client("push_workflow", {"chain": [GOOD]}, 0)
        assert as_client("get_task_info", wid, 0)["kind"] == "chain"
    finally:
        as_worker.close()
        as_client.close()


# -- failures and cancels -------------------------------------------------------------------------


def test_a_dead_step_stops_its_chain_and_cancels_the_steps_after_it(client, tmp_path):
    runs = path_of(tmp_path)
    wid = client.push(chain(ft.add.s(1, 2), sig("flow_tasks.boom", max_retry=0), sig("flow_tasks.tally", runs)))
    with pytest.raises(TaskFailedError, match=r"step \S+\.2 failed: ValueError: boom"):
        client.result(wid, timeout=20)
    info = client.info(wid)
    assert info["state"] == "dead" and info["failed_task"] == f"{wid}.2"
    assert [kid["state"] for kid in info["children"]] == ["done", "dead", "cancelled"]
    assert not Path(runs).exists()


def test_a_chord_with_a_dead_member_never_calls_back_and_ends_dead(client, tmp_path):
    runs = path_of(tmp_path)
    members = [ft.add.s(1, 1), sig("flow_tasks.boom", max_retry=0),
               sig("flow_tasks.square", 3, kwargs={"seconds": 0.3})]
    cid = client.push(chord(members, sig("flow_tasks.tally", runs)))
    with pytest.raises(TaskFailedError, match="ValueError: boom"):
        client.result(cid, timeout=20)
    group_id = client.info(cid)["children"][0]["id"]
    slow = client.info(group_id)["children"][2]["id"]
    # The slow sibling still running finishes normally; its result changes nothing.
    assert client.result(slow, timeout=20) == 9
    assert client.info(group_id)["state"] == "dead"
    assert client.info(cid)["state"] == "dead" and "boom" in client.info(cid)["error"]
    assert [kid["state"] for kid in client.info(cid)["children"]] == ["dead", "cancelled"]
    assert not Path(runs).exists()


def test_a_chord_with_on_error_run_calls_back_with_each_failed_members_error(client, tmp_path):
    runs = path_of(tmp_path)
    members = [ft.add.s(1, 1), sig("flow_tasks.boom", max_retry=0), ft.add.s(2, 2)]
    cid = client.push(chord(group(members), sig("flow_tasks.tally", runs), on_error="run"))
    result = client.result(cid, timeout=20)
    failed = client.info(client.info(cid)["children"][0]["id"])["children"][1]["id"]
    assert result[0] == 2 and result[2] == 4
    assert result[1] == {"error": f"step {failed} failed: ValueError: boom", "task_id": failed}
    assert lines(runs) == ["3"]


def test_cancelling_a_workflow_mid_way_cancels_what_has_not_run(client, tmp_path):
    runs = path_of(tmp_path)
    wid = client.push(chain(sig("flow_tasks.nap", 1.0, 1), ft.add.s(1), sig("flow_tasks.tally", runs)))
    first = f"{wid}.1"
    wait_for(lambda: client.info(first)["state"] == "running", what="the first step running")
    assert client.cancel(wid) == "running"
    info = client.info(wid)
    assert info["state"] == "cancelled"
    assert client.info(first)["cancel_requested"]
    assert [client.info(f"{wid}.{n}")["state"] for n in (2, 3)] == ["cancelled", "cancelled"]
    with pytest.raises(TaskFailedError):
        client.result(wid, timeout=20)
    # The running step ends cancelled, and nothing after it ran.
    wait_for(lambda: client.info(first)["state"] == "cancelled", what="the running step cancelled")
    assert client.info(f"{wid}.2")["state"] == "cancelled" and not Path(runs).exists()
    assert client.cancel(wid) == "cancelled"


def test_cancelling_one_step_ends_its_workflow(client):
    wid = client.push(chain(sig("flow_tasks.nap", 0.5, 1), ft.add.s(1)))
    assert client.cancel(f"{wid}.2") == "pending"
    with pytest.raises(TaskFailedError, match=r"was cancelled"):
        client.result(wid, timeout=20)
    assert client.info(wid)["state"] == "dead"


def test_a_purged_step_ends_its_workflow(client):
    client.pause_queue()
    try:
        wid = client.push(ft.add.s(1, 2) | ft.add.s(3))
        assert client.info(f"{wid}.1")["state"] == "queued"
        assert client.purge_queue() == 1
        with pytest.raises(TaskFailedError, match=r"step \S+\.1 was purged"):
            client.result(wid, timeout=5)
        assert client.info(f"{wid}.2")["state"] == "cancelled"
    finally:
        client.resume_queue()


def test_a_step_whose_expiry_passed_before_its_turn_ends_its_workflow(client, tmp_path):
    runs = path_of(tmp_path)
    # expires counts from the push: the second step's turn comes after it.
    wid = client.push(chain(sig("flow_tasks.nap", 0.6, 1), sig("flow_tasks.tally", runs, expires=0.2)))
    with pytest.raises(TaskFailedError, match=r"step \S+\.2 expired before it started"):
        client.result(wid, timeout=20)
    assert client.info(f"{wid}.2")["state"] == "expired" and not Path(runs).exists()


def test_result_of_a_workflow_wakes_as_it_ends_without_polling(client):
    wid = client.push(chain(sig("flow_tasks.nap", 0.6, "x"), sig("flow_tasks.ident")))
    value = client.result(wid, timeout=20)
    returned = time.time()
    assert value == "x"
    # The master looks again every 5 s at most by itself: a return this soon came from the publish.
    assert returned - client.info(wid)["finished"] < 1.0


def test_ppq_task_shows_a_chain_and_a_group(client, master):
    wid = client.push(ft.add.s(1, 2) | ft.add.s(3) | ft.add.s(4))
    assert client.result(wid, timeout=20) == 10
    out = run_ppq("task", wid, "-m", address_of(master))
    assert out.returncode == 0, out.stderr
    assert "chain" in out.stdout and "3 of 3 steps done" in out.stdout and f"{wid}.3  done" in out.stdout
    gid = client.push(group(ft.add.s(i, i) for i in range(25)))
    assert len(client.result(gid, timeout=20)) == 25
    out = run_ppq("task", gid, "-m", address_of(master))
    assert out.returncode == 0, out.stderr
    assert "group" in out.stdout and "25 of 25 done" in out.stdout and "and 5 more" in out.stdout
    assert f"{gid}.20  done" in out.stdout and f"{gid}.21  done" not in out.stdout


# -- attacks on push_workflow -------------------------------------------------------------------


def test_cyclic_deep_or_shared_data_is_refused_before_it_is_built_naming_the_limit(master, client, ra):
    direct = master.master  # a call in the master's own process: data no wire would carry
    loop: list[Any] = []
    loop.append(loop)
    knot: dict[str, Any] = {"group": []}
    knot["group"].append(knot)  # a workflow that holds itself
    deep: Any = 1
    for _ in range(100_000):
        deep = [deep]
    half_mb = ["x" * 100_000] * 5  # one list of 500 KB, given to 200 members: 100 MB
    cases = [
        ({"group": [dict(GOOD, args=loop)]}, "nests deeper than 1044 levels of lists and dicts"),
        (knot, "nests deeper than 1044 levels"),
        ({"chain": [dict(GOOD, args=[deep])]}, "nests deeper than 1044 levels"),
        ({"group": [dict(GOOD, args=half_mb) for _ in range(200)]},
         "more than 16777216 bytes (limits.max_message), its shared parts counted each time they appear"),
    ]
    before = stored(ra)
    for data, message in cases:
        tracemalloc.start()
        try:
            with pytest.raises(ValueError, match=re.escape(message)):
                direct.push_workflow(data, 0)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 8_000_000, (message, peak)  # refused before anything was made of the data (100 MB)
    # Over the wire too (msgpack carries 1100 levels; the walk stops at its limit).
    deep = 1
    for _ in range(1100):
        deep = [deep]
    with pytest.raises(ValueError, match="workflow: the data nests deeper than 1044 levels of lists and dicts"):
        client.call("push_workflow", {"chain": [dict(GOOD, args=[deep])]}, 0)
    assert stored(ra) == before
    # The same shared list given to 20 members (10 MB once expanded) is within the limit.
    records = build({"group": [dict(GOOD, args=half_mb) for _ in range(20)]}, 0, [0], LimitsConfig(), 100)
    assert len(records) == 21


def test_a_workflow_of_max_workflow_tasks_big_steps_fits_a_capped_master(redis_b, rb, tmp_path):
    from .attack_tools import Master

    tasks = 10_000
    # On the Redis no worker of this module pulls from: the steps stay queued.
    target = Master(tmp_path, redis_b.url, None,
                    config={"limits": {"max_workflow_tasks": tasks}, "master": {"threadpool_size": 16}}).wait_ready()
    call = PyroFunc(target.address, timeout=120)
    try:
        idle = target.rss()
        # About 1,400 bytes of arguments each: 14 MB, within max_message, each step checked and stored.
        steps = [{"func": "ident", "module": "flow_tasks", "args": [f"{i:06d}" + "x" * 1400]} for i in range(tasks)]
        wid = call("push_workflow", {"group": steps}, 0)
        assert rb.hget(f"ppq:0:t:{wid}", "n") == str(tasks).encode() and rb.llen("ppq:0:queue") == tasks
        # One more is refused, naming the limit.
        with pytest.raises(ValueError, match=rf"more than {tasks} tasks \(limits.max_workflow_tasks\)"):
            call("push_workflow", {"group": [*steps, GOOD]}, 0)
        assert target.alive() and call("ping") == "pong"
        # Under its 1.5 GB cap with room to spare: the data, its records and their packing.
        assert target.hwm() - idle < 600 * 1024 * 1024, (idle, target.hwm())
    finally:
        call.close()
        target.stop()


def test_a_workflow_id_in_use_by_another_task_or_workflow_is_refused_and_nothing_is_written(client, master, ra):
    call = client.call
    plain = call("push_task", "add", module="flow_tasks", args=[1, 2], task_id="t-1")
    # A workflow whose second node would be 'w-9.2', the id of a task pushed earlier.
    squatter = call("push_task", "add", module="flow_tasks", args=[5, 5], task_id="w-9.2")
    pair = {"chain": [GOOD, dict(GOOD, args=[4])]}
    first = call("push_workflow", pair, 0, "w-1")
    assert first == "w-1" and client.result(first, timeout=20) == 7
    assert client.result(plain, timeout=20) == 3 and client.result(squatter, timeout=20) == 10
    before = stored(ra)
    cases = [
        ({"chain": [GOOD, GOOD]}, plain, rf"workflow_id '{plain}' is the id of another task or workflow"),
        ({"chain": [GOOD, GOOD]}, "w-9", r"workflow_id 'w-9' would give a node the id 'w-9.2', which is the id of "
                                         r"another task or workflow"),
        ({"group": [GOOD, GOOD, GOOD]}, "w-1", r"workflow_id 'w-1' is the id of another task or workflow"),
        ({"group": [GOOD]}, "w-1.1", r"workflow_id 'w-1.1' is the id of another task or workflow"),
    ]
    for data, wid, message in cases:
        with pytest.raises(ValueError, match=message + "; nothing was stored"):
            call("push_workflow", data, 0, wid)
    assert stored(ra) == before  # not a field of t-1, w-9.2 or w-1's records changed
    assert client.info("w-9") is None
    # The same workflow pushed again with its id (a retried push) is stored once, and its id returned.
    assert call("push_workflow", pair, 0, "w-1") == "w-1"
    assert stored(ra) == before


def test_cancelling_a_chord_as_its_last_member_ends_never_runs_the_callback(redis_b, rb):
    store = Store(2, redis_b.url)  # queue_index 2: no master or worker of this module serves it
    try:
        for cancel_first in (True, False):
            rb.flushdb()
            records = build({"chord": [GOOD, GOOD], "callback": GOOD}, 2, [2], LimitsConfig(), 100)
            assert store.push_workflow(records) is True
            root, callback = records[0].id, f"{records[0].id}.4"
            _, leased, _ = store.report("w1", [], 2, 10.0)
            assert len(leased) == 2 and store.counts()["pending"] == 1
            done = [{"id": t["id"], "lease": t["lease"], "ok": True, "result": codec.pack(3)} for t in leased]
            assert store.report("w1", done[:1], 0, 10.0)[0] == [True]
            if cancel_first:
                # The cancel lands just before the last member's report, which would push the callback.
                assert store.cancel(root) == "running"
                assert store.report("w1", done[1:], 0, 10.0)[0] == [True]
            else:
                # The last member's report pushed the callback; the cancel lands before a worker takes it.
                assert store.report("w1", done[1:], 0, 10.0)[0] == [True]
                assert store.info(callback)["state"] == "queued"
                assert store.cancel(root) == "running"
            assert store.info(root)["state"] == "cancelled"
            assert store.info(callback)["state"] == "cancelled"
            assert store.report("w1", [], 5, 10.0)[1] == []  # nothing to run: the callback never starts
            assert store.counts()["pending"] == 0
    finally:
        store.close()


def test_a_step_cancelled_before_its_group_started_ends_the_workflow_or_takes_its_place(redis_b, rb):
    store = Store(2, redis_b.url)  # queue_index 2: no master or worker of this module serves it

    def run_next(expect: str, result: Any) -> dict[str, Any]:
        [task] = store.report("w1", [], 1, 10.0)[1]
        assert task["id"] == expect
        report = {"id": task["id"], "lease": task["lease"], "ok": True, "result": codec.pack(result)}
        assert store.report("w1", [report], 0, 10.0)[0] == [True]
        return task

    try:
        # chain(a, group(b, c)): b cancelled while a runs ends the workflow at once.
        [root, *_] = records = build({"chain": [GOOD, {"group": [GOOD, GOOD]}]}, 2, [2], LimitsConfig(), 100)
        assert store.push_workflow(records) is True
        wid = root.id
        assert store.cancel(f"{wid}.3") == "pending"
        assert store.info(wid)["state"] == "dead" and store.info(wid)["failed_task"] == f"{wid}.3"
        assert store.info(f"{wid}.2")["state"] == "dead" and store.info(f"{wid}.4")["state"] == "cancelled"
        assert store.counts()["pending"] == 0
        rb.flushdb()
        # chain(a, chord([b, c], cb, on_error='run')): b's error takes its place; the callback runs.
        data = {"chain": [GOOD, {"chord": [GOOD, GOOD], "callback": GOOD, "on_error": "run"}]}
        records = build(data, 2, [2], LimitsConfig(), 100)
        assert store.push_workflow(records) is True
        wid = records[0].id
        assert store.cancel(f"{wid}.4") == "pending"
        assert store.info(wid)["state"] == "running" and store.info(f"{wid}.3")["state"] == "pending"
        run_next(f"{wid}.1", 3)
        run_next(f"{wid}.5", 4)
        callback = run_next(f"{wid}.6", "cb")
        given = codec.decode_parameters(callback["parameters"])[0][0]
        assert given == [{"error": f"step {wid}.4 was cancelled", "task_id": f"{wid}.4"}, 4]
        assert store.info(wid)["state"] == "done" and store.info(wid)["result"] == "cb"
        rb.flushdb()
        # Both members cancelled before their turn: the group ends as it starts.
        records = build(data, 2, [2], LimitsConfig(), 100)
        assert store.push_workflow(records) is True
        wid = records[0].id
        assert [store.cancel(f"{wid}.{n}") for n in (4, 5)] == ["pending", "pending"]
        run_next(f"{wid}.1", 3)
        callback = run_next(f"{wid}.6", "cb")
        assert [r["task_id"] for r in codec.decode_parameters(callback["parameters"])[0][0]] == [f"{wid}.4", f"{wid}.5"]
        assert store.info(wid)["state"] == "done" and store.counts()["pending"] == 0
    finally:
        store.close()


def test_a_group_whose_results_together_pass_max_message_ends_dead_naming_the_limit(redis_b, rb):
    store = Store(2, redis_b.url)  # queue_index 2: no master or worker of this module serves it
    try:
        for on_error in ("fail", "run"):
            rb.flushdb()
            data = {"chord": [GOOD, GOOD, GOOD], "callback": GOOD, "on_error": on_error}
            records = build(data, 2, [2], LimitsConfig(max_message=2000), 100)
            assert store.push_workflow(records) is True
            wid, gid = records[0].id, records[1].id
            leased = store.report("w1", [], 3, 10.0)[1]
            done = [{"id": t["id"], "lease": t["lease"], "ok": True, "result": codec.pack("r" * 800)} for t in leased]
            assert store.report("w1", done, 0, 10.0)[0] == [True, True, True]
            message = f"the results of group {gid} are more than 2000 bytes (limits.max_message)"
            assert store.info(gid)["state"] == "dead" and store.info(gid)["error"] == message
            assert store.info(gid)["failed_task"] == leased[2]["id"]
            assert store.info(wid)["state"] == "dead" and store.info(f"{wid}.5")["state"] == "cancelled"
            assert store.report("w1", [], 1, 10.0)[1] == []  # the callback never runs
    finally:
        store.close()


# -- dead steps, pending steps, cancels, sizes ----------------------------------------------------


def test_a_dead_step_is_not_requeued_alone_and_its_workflow_stays_dead(client, master, tmp_path):
    runs = path_of(tmp_path)
    wid = client.push(chain(ft.add.s(1, 2), sig("flow_tasks.boom", max_retry=0), sig("flow_tasks.tally", runs)))
    with pytest.raises(TaskFailedError):
        client.result(wid, timeout=20)
    step = f"{wid}.2"
    lone = client.call("push_task", "boom", module="flow_tasks", max_retry=0)
    with pytest.raises(TaskFailedError):
        client.result(lone, timeout=20)
    with pytest.raises(ValueError, match=rf"task_ids: '{re.escape(step)}' is a step of a workflow, which ended when "
                                         rf"it went dead: a step is not requeued alone \(push the workflow again\); "
                                         rf"nothing was requeued"):
        client.call("requeue_dead", [lone, step], 0)
    assert client.info(lone)["state"] == "dead" and client.info(step)["state"] == "dead"
    # Every dead task: the lone one goes back, the step stays dead, and ppq says so.
    out = run_ppq("dead", "requeue", "--all", "-m", address_of(master))
    assert out.returncode == 0, out.stderr
    assert "requeued 1 task(s)" in out.stdout
    assert "left 1 step(s) of workflows dead: a step is not requeued alone" in out.stdout
    wait_for(lambda: client.info(lone)["attempts"] == 2, what="the lone task run again")
    assert client.info(step)["state"] == "dead" and client.info(step)["attempts"] == 1
    assert client.info(wid)["state"] == "dead" and client.info(f"{wid}.3")["state"] == "cancelled"
    assert not Path(runs).exists()


def test_steps_not_started_are_counted_as_pending_in_ppq_status(client, master):
    client.pause_queue()
    try:
        wid = client.push(chain(ft.add.s(1, 2), ft.add.s(3), group(ft.add.s(1), ft.add.s(2))))
        assert client.server_info()[0]["pending"] == 3
        out = run_ppq("status", "-m", address_of(master), env={"COLUMNS": "200"})
        assert out.returncode == 0, out.stderr
        header = next(line for line in out.stdout.splitlines() if "queued" in line and "pending" in line)
        row = next(line for line in out.stdout.splitlines() if "0 paused" in line)
        cells = row.replace("│", " ").replace(" paused", "").split()
        names = header.replace("│", " ").split()
        assert cells[names.index("pending")] == "3" and cells[names.index("queued")] == "1", out.stdout
        # Cancelled, they no longer wait.
        client.cancel(wid)
        assert client.server_info()[0]["pending"] == 0
    finally:
        client.resume_queue()
    wid = client.push(ft.add.s(1, 2) | ft.add.s(3))
    assert client.result(wid, timeout=20) == 6 and client.server_info()[0]["pending"] == 0


def test_ppq_cancel_says_what_became_of_the_workflow(client, master):
    address = address_of(master)
    wid = client.push(chain(sig("flow_tasks.nap", 5.0, 1), ft.add.s(1), ft.add.s(2)))
    wait_for(lambda: client.info(f"{wid}.1")["state"] == "running", what="the first step running")
    out = run_ppq("cancel", wid, "-m", address)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"{wid}: chain cancelled (was running, step 1 of 3): its steps not started are "
                                  f"cancelled, a running one finishes with its result dropped")
    out = run_ppq("cancel", wid, "-m", address)
    assert out.returncode == 0
    assert out.stdout.strip() == f"{wid}: already cancelled; workflow {wid} (chain) is cancelled"
    out = run_ppq("cancel", f"{wid}.1", "-m", address)  # the running step, flagged by the first cancel
    assert out.returncode == 0 and out.stdout.strip() == (f"{wid}.1: running; it is cancelled when it ends, its result "
                                                          f"dropped; workflow {wid} (chain) is now cancelled")
    # One step of a group of a chain: its workflow ends dead.
    wid = client.push(chain(sig("flow_tasks.nap", 2.0, 1), group(ft.add.s(1), ft.add.s(2))))
    wait_for(lambda: client.info(f"{wid}.1")["state"] == "running", what="the first step running")
    out = run_ppq("cancel", f"{wid}.3", "-m", address)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (f"{wid}.3: cancelled (was pending); workflow {wid} (chain) is now dead (the "
                                  f"steps after the cancelled one do not run)")
    assert client.info(wid)["state"] == "dead" and client.info(f"{wid}.4")["state"] == "cancelled"


def test_a_step_whose_arguments_with_the_previous_result_exceed_max_payload_fails_its_workflow(redis_b, rb):
    store = Store(2, redis_b.url)  # queue_index 2: no master or worker of this module serves it
    limits = LimitsConfig(max_payload=1000)
    try:
        data = {"chain": [dict(GOOD, func="ident", args=["a"]), dict(GOOD, func="echo", args=["b" * 500])]}
        records = build(data, 2, [2], limits, 100)
        assert store.push_workflow(records) is True
        root, second = records[0].id, f"{records[0].id}.2"
        [task] = store.report("w1", [], 1, 10.0)[1]
        # Its result (600 bytes) with the next step's 500 bytes of arguments: more than 1000.
        report = {"id": task["id"], "lease": task["lease"], "ok": True, "result": codec.pack("r" * 600)}
        assert store.report("w1", [report], 0, 10.0)[0] == [True]
        info = store.info(second)
        message = (f"step {second} was not started: its arguments with the previous result are 1109 bytes, more "
                   f"than the limit of 1000 (limits.max_payload)")
        assert info["state"] == "dead" and info["error"] == message
        assert store.info(root)["state"] == "dead" and store.info(root)["error"] == message
        assert store.info(root)["failed_task"] == second
        assert store.report("w1", [], 1, 10.0)[1] == [] and store.counts()["pending"] == 0
        # A result that fits is put first as ever.
        records = build(data, 2, [2], limits, 100)
        assert store.push_workflow(records) is True
        [task] = store.report("w1", [], 1, 10.0)[1]
        report = {"id": task["id"], "lease": task["lease"], "ok": True, "result": codec.pack("r" * 400)}
        [nxt] = store.report("w1", [report], 1, 10.0)[1]
        assert nxt["id"] == f"{records[0].id}.2"
        assert codec.decode_parameters(nxt["parameters"])[0] == ["r" * 400, "b" * 500]
    finally:
        store.close()


# -- the reliability model: SIGKILLs mid-way ------------------------------------------------------


def test_a_chord_of_1000_calls_back_once_while_a_worker_and_a_master_are_killed(spawn, redis_a, ra, tmp_path):
    runs = path_of(tmp_path)
    env = {"PPQ_MASTER_LEASE_TIMEOUT": "2", "PPQ_MASTER_REAPER_INTERVAL": "0.2"}
    m1, a1 = spawn.master(redis_a.url, env=env)
    m2, a2 = spawn.master(redis_a.url, env=env)
    w1 = spawn.worker(a1, a2, allow=ALLOW, concurrency=2)
    spawn.worker(a1, a2, allow=ALLOW, concurrency=2)
    c = Client([a1, a2], retry=3)
    try:
        members = [sig("flow_tasks.square", i, kwargs={"seconds": 0.01}) for i in range(1000)]
        cid = c.push(chord(members, sig("flow_tasks.tally", runs)))
        gid = f"{cid}.1"
        wait_for(lambda: int(ra.hget(f"ppq:0:t:{gid}", "remaining") or 1000) < 700, timeout=60,
                 what="300 members done")
        w1.send_signal(signal.SIGKILL)
        m1.send_signal(signal.SIGKILL)
        assert ra.hget(f"ppq:0:t:{gid}", "state") == b"running"  # killed mid-way
        assert c.result(cid, timeout=90) == [i * i for i in range(1000)]
        assert lines(runs) == ["1000"]
        assert c.info(gid)["progress"] == "1000 of 1000 done"
    finally:
        c.close()


def test_a_chain_of_100_steps_ends_in_order_while_a_worker_is_killed(spawn, redis_a, ra, tmp_path):
    runs = path_of(tmp_path)
    env = {"PPQ_MASTER_LEASE_TIMEOUT": "2", "PPQ_MASTER_REAPER_INTERVAL": "0.2"}
    _, address = spawn.master(redis_a.url, env=env)
    w1 = spawn.worker(address, allow=ALLOW)
    spawn.worker(address, allow=ALLOW)
    c = Client([address], retry=3)
    try:
        wid = c.push(chain(sig("flow_tasks.step", [], 0, runs, 0.01),
                           *(sig("flow_tasks.step", i, runs, 0.01) for i in range(1, 100))))
        wait_for(lambda: len(lines(runs)) >= 30, timeout=60, what="30 steps run")
        w1.send_signal(signal.SIGKILL)
        assert ra.hget(f"ppq:0:t:{wid}", "state") == b"running"  # killed mid-way
        assert c.result(wid, timeout=90) == list(range(100))
        ran = [int(x) for x in lines(runs)]
        # At least once each, in order: a step the killed worker ran may run again, right after.
        assert sorted(set(ran)) == list(range(100)) and ran == sorted(ran)
        assert len(ran) - 100 <= 1
    finally:
        c.close()


# -- big workflows: staged in chunks, no Redis call long -------------------------------------------


def stage(store: Store, records: Any, token: str, count: int, commit: bool = False) -> None:
    """Store the first ``count`` nodes of a big workflow as a push does (ppq/store/flows.py), in
    chunks of STAGE_NODES, under ``token``; then commit it when asked, without releasing it."""
    nodes, digest, leaves, pending, _ = flow_store.packed(records)
    root, p = records[0].id, store.prefix
    assert store._workflow_begin([p, root, digest, len(nodes), token, 60]) == [b"new", 0]
    for first in range(0, count, flow_store.STAGE_NODES):
        chunk = nodes[first:min(first + flow_store.STAGE_NODES, count)]
        assert store._workflow_stage([p, root, token, first, 60, *chunk]) == [b"ok", first + len(chunk)]
    if commit:
        assert store._workflow_commit([p, root, token, digest, leaves, pending, 60, nodes[0]]) == [b"ok", 0]


def ready(r: redis.Redis, qi: int = 2) -> list[str]:
    return [x.decode() for x in r.lrange(f"ppq:{qi}:queue", 0, -1)]


def test_a_big_workflow_is_staged_unseen_then_a_retried_push_takes_it_over_and_makes_it_live(redis_b, rb):
    store = Store(2, redis_b.url)  # queue_index 2: no master or worker of this module serves it
    try:
        n = 3 * flow_store.STAGE_NODES
        records = build({"chord": [dict(GOOD, args=[i, 1]) for i in range(n)], "callback": GOOD}, 2, [2],
                        LimitsConfig(), 100, "big")
        stage(store, records, "first-owner", 2 * flow_store.STAGE_NODES)
        # Two thirds of its records are written, and nothing of it is seen or ready.
        assert rb.exists("ppq:2:t:big.1", "ppq:2:t:big.500") == 2 and rb.exists("ppq:2:t:big.1000") == 0
        assert store.info("big") is None and ready(rb) == [] and rb.hget("ppq:2:stats", "pushed") is None
        # The same push again (a client's retry on another master) goes on from there.
        assert store.push_workflow(records) is True
        assert ready(rb) == [f"big.{i}" for i in range(2, n + 2)]  # the chord's members, in order
        assert rb.keys("ppq:2:stage*") == [] and rb.exists("ppq:2:staged") == 0
        root = store.info("big")
        assert root is not None and root["kind"] == "chord" and root["state"] == "running"
        assert rb.lrange("ppq:2:t:big:kids", 0, -1) == [b"big.1", f"big.{n + 2}".encode()]
        assert rb.hget("ppq:2:stats", "pushed") == str(n + 1).encode()
        assert rb.hget("ppq:2:stats", "pending") == b"1"  # the callback
        # The first owner's next chunk writes nothing; a third push finds it stored.
        assert store._workflow_stage(["ppq:2:", "big", "first-owner", 1000, 60, b""]) == [b"lost", 0]
        before = stored(rb)
        assert store.push_workflow(records) is False
        assert stored(rb) == before
    finally:
        store.close()


def test_a_node_id_found_taken_mid_way_refuses_a_big_workflow_and_leaves_nothing_of_it(redis_b, rb):
    store = Store(2, redis_b.url)
    try:
        n = 3 * flow_store.STAGE_NODES
        # A task already holds the id the workflow's node 1200 would get, in its third chunk.
        squatter = store.push([check_push({"func": "add", "module": "flow_tasks", "args": [1, 1],
                                           "task_id": "big.1200", "queue_index": 2}, [2], LimitsConfig(),
                                          False)])[0][0]
        assert squatter == "big.1200"
        before = stored(rb)
        records = build({"group": [dict(GOOD, args=[i, 1]) for i in range(n)]}, 2, [2], LimitsConfig(), 100, "big")
        assert store.push_workflow(records) == "big.1200"
        # What its first two chunks stored is deleted: Redis holds what it held before.
        assert stored(rb) == before
    finally:
        store.close()


def test_a_master_duty_deletes_an_abandoned_staging_and_releases_a_committed_one(redis_b, rb):
    store = Store(2, redis_b.url)
    try:
        n = 2 * flow_store.STAGE_NODES + 10
        before = stored(rb)
        dropped = build({"group": [dict(GOOD, args=[i, 1]) for i in range(n)]}, 2, [2], LimitsConfig(), 100, "gone")
        stage(store, dropped, "dead-owner", 2 * flow_store.STAGE_NODES)
        priority = [dict(GOOD, args=[i, 1], priority=5) for i in range(n)]
        live = build({"chain": [{"group": priority}, GOOD]}, 2, [2], LimitsConfig(), 100, "live")
        stage(store, live, "dead-owner", len(live), commit=True)
        assert store.settle_staged() == 0  # their hold has not run out
        assert ready(rb) == [] and rb.llen("ppq:2:queue:p:5") == 0
        # Their masters died: both holds run out.
        rb.zadd("ppq:2:staged", {"gone": 0, "live": 0})
        assert store.settle_staged() == 2
        # The uncommitted one is gone; the committed one's first steps are on their ready list, in order.
        assert [x.decode() for x in rb.lrange("ppq:2:queue:p:5", 0, -1)] == [f"live.{i}" for i in range(2, n + 2)]
        assert rb.zrange("ppq:2:priorities", 0, -1) == [b"5"] and ready(rb) == []
        assert not rb.keys("ppq:2:t:gone*") and not rb.keys("ppq:2:stage*") and not rb.exists("ppq:2:staged")
        assert store.info("live")["state"] == "running"
        rb.delete(*rb.keys("ppq:2:t:live*"), "ppq:2:queue:p:5", "ppq:2:priorities", "ppq:2:stats")
        assert stored(rb) == before
    finally:
        store.close()


def test_a_group_of_more_children_than_one_call_stores_is_staged_in_parts_and_resumed_from_its_first(redis_b, rb):
    store = Store(2, redis_b.url)
    try:
        n = 2 * flow_store.STAGE_KIDS + 5
        records = build({"group": [dict(GOOD, args=[i, 1]) for i in range(n)]}, 2, [2], LimitsConfig(), 100, "wide")
        nodes, digest, _, _, _ = flow_store.packed(records)
        calls = list(flow_store.chunks(records, nodes, 0))
        # The root's children in three parts, each a call of its own, then its members in chunks.
        assert [first for first, _ in calls[:4]] == [0, 0, 0, 1] and all(len(args) == 1 for _, args in calls[:3])
        assert sum(len(args) for _, args in calls[3:]) == n
        p = store.prefix
        assert store._workflow_begin([p, "wide", digest, len(nodes), "first-owner", 60]) == [b"new", 0]
        assert store._workflow_stage([p, "wide", "first-owner", 0, 60, *calls[0][1]]) == [b"ok", 0]
        # A part out of step (its offset not what is stored so far) writes nothing.
        assert store._workflow_stage([p, "wide", "first-owner", 0, 60, *calls[2][1]]) == [b"lost", 0]
        assert rb.llen("ppq:2:stage:wide:part") == flow_store.STAGE_KIDS
        # A retried push takes over at node 0 and sends its parts again from the first.
        assert store.push_workflow(records) is True
        kids = [f"wide.{i}" for i in range(1, n + 1)]
        assert [x.decode() for x in rb.lrange("ppq:2:t:wide:kids", 0, -1)] == kids == ready(rb)
        assert not rb.keys("ppq:2:stage*")
    finally:
        store.close()


def test_a_big_workflow_whose_commit_no_replica_confirms_is_live_and_its_push_says_so(redis_b, rb):
    # redis.wait_replicas 1 on a Redis with no replica: the commit is made, and not confirmed.
    store = Store(2, redis_b.url, wait_replicas=1, wait_timeout=0.05)
    try:
        n = 2 * flow_store.STAGE_NODES
        records = build({"group": [dict(GOOD, args=[i, 1]) for i in range(n)]}, 2, [2], LimitsConfig(), 100, "unsure")
        with pytest.raises(StorageError, match=r"only 0 of the 1 replicas redis\.wait_replicas asks for"):
            store.push_workflow(records)
        # As a push of one call would be: live, its steps ready, nothing left staged.
        assert ready(rb) == [f"unsure.{i}" for i in range(1, n + 1)] and not rb.keys("ppq:2:stage*")
        assert store.info("unsure")["state"] == "running"
    finally:
        store.close()


class Prober(threading.Thread):
    """Another client of the Redis, without a pause: a PING, then a push of a task to queue_index 5
    (as a master pushes: push.lua), and again; keeps the longest wait."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.r = redis.Redis.from_url(url, socket_timeout=60)
        self.store = Store(5, url, timeout=60)
        self.stop = threading.Event()
        self.longest = 0.0
        self.count = 0

    def run(self) -> None:
        task = {"func": "add", "module": "flow_tasks", "args": [1, 1], "queue_index": 5}
        while not self.stop.is_set():
            spec = check_push(task, [5], LimitsConfig(), False)  # a fresh id each time
            start = time.monotonic()
            self.r.ping()
            self.store.push([spec])
            self.longest = max(self.longest, time.monotonic() - start)
            self.count += 1

    def halt(self) -> None:
        self.stop.set()
        self.join(10)
        self.r.close()
        self.store.close()


def test_a_chord_of_20000_is_pushed_while_redis_keeps_answering_others_and_calls_back_once(
        client, redis_a, ra, tmp_path):
    runs = path_of(tmp_path)
    members = 20_000
    old = ra.config_get("slowlog-log-slower-than")["slowlog-log-slower-than"]
    ra.config_set("slowlog-log-slower-than", 200_000)  # microseconds
    ra.slowlog_reset()
    prober = Prober(redis_a.url)
    prober.start()
    try:
        wait_for(lambda: prober.count > 0, what="the prober's first ping")
        started = time.monotonic()
        cid = client.push(chord([sig("flow_tasks.square", i) for i in range(members)], sig("flow_tasks.tally", runs)))
        took = time.monotonic() - started
        pings = prober.count
        prober.halt()
        # Redis answered all along: no call of the push held it (one script held it for seconds before).
        slow = ra.slowlog_get(10)
        assert not slow, [(e["duration"], e["command"][:60]) for e in slow]
        assert prober.longest < 1.0, (prober.longest, took)
        assert pings > 10 and ra.llen("ppq:5:queue") == prober.count
        print(f"push {took:.2f} s; longest ping and push {prober.longest * 1000:.0f} ms over {pings}")
    finally:
        prober.halt()
        ra.config_set("slowlog-log-slower-than", old)
    assert client.result(cid, timeout=600) == [i * i for i in range(members)]
    assert lines(runs) == [str(members)]


def push_then_kill(spawn: Spawner, url: str, rb: redis.Redis, data: Any, wid: str,
                   members: int) -> tuple[Any, str, float]:
    """Push workflow ``wid`` to a master of its own and SIGKILL that master once two chunks of it are
    staged; return a second master on the same Redis (its process and address) and the Redis
    time of the kill."""
    env = {"PPQ_MASTER_REAPER_INTERVAL": "0.2"}
    doomed, address = spawn.master(url, env=env)
    survivor, other = spawn.master(url, env=env)
    errors: list[BaseException] = []

    def push() -> None:
        call = PyroFunc(address, timeout=120)
        try:
            call("push_workflow", data, 0, wid)
        except Exception as exc:  # noqa: BLE001 - the push dies with its master
            errors.append(exc)
        finally:
            call.close()

    pusher = threading.Thread(target=push, daemon=True)
    pusher.start()
    wait_for(lambda: int(rb.hget(f"ppq:0:stage:{wid}", "written") or 0) >= 2 * flow_store.STAGE_NODES, timeout=120,
             interval=0.002, what="two chunks staged")
    doomed.send_signal(signal.SIGKILL)
    doomed.wait(10)
    seconds, micros = rb.time()
    pusher.join(30)
    assert errors and not pusher.is_alive()  # the push was never acknowledged
    staged = int(rb.hget(f"ppq:0:stage:{wid}", "written"))
    assert staged < members  # killed mid-way
    # Nothing of it is live or ready: no root record, no ready list, nothing counted.
    assert rb.exists(f"ppq:0:t:{wid}", f"ppq:0:t:{wid}:kids") == 0 and rb.exists(f"ppq:0:t:{wid}.{staged - 1}") == 1
    assert not rb.keys("ppq:0:queue*") and rb.hget("ppq:0:stats", "pushed") is None
    return survivor, other, seconds + micros / 1e6


def test_a_master_killed_while_storing_a_big_workflow_leaves_nothing_runnable_and_another_deletes_it(
        spawn, redis_b, rb):
    # On redis_b, whose queue_index 0 no master or worker of this module serves.
    members = 40_000
    data = {"group": [{"func": "square", "module": "flow_tasks", "args": [i]} for i in range(members)]}
    survivor, other, _ = push_then_kill(spawn, redis_b.url, rb, data, "big-1", members)
    # Once its hold runs out, the other master's duty deletes what it staged.
    wait_for(lambda: not rb.keys("ppq:0:t:big-1*") and not rb.keys("ppq:0:stage*") and not rb.exists("ppq:0:staged"),
             timeout=60, interval=0.2, what="the staging deleted")
    assert "workflow big-1: its master stopped while storing it, before it was live" in spawn.log(survivor)
    assert not rb.keys("ppq:0:queue*") and rb.hget("ppq:0:stats", "pushed") is None
    # The push again stores it whole.
    call = PyroFunc(other, timeout=120)
    try:
        assert call("push_workflow", data, 0, "big-1") == "big-1"
    finally:
        call.close()
    assert rb.lrange("ppq:0:queue", 0, -1) == [f"big-1.{i}".encode() for i in range(1, members + 1)]
    assert not rb.keys("ppq:0:stage*") and not rb.exists("ppq:0:staged")


def test_a_retried_push_takes_over_the_staging_of_a_killed_master_and_the_chord_calls_back_once(
        spawn, redis_b, rb, tmp_path):
    # On redis_b, whose queue_index 0 no master or worker of this module serves but those started here.
    runs = path_of(tmp_path)
    members = 20_000
    data = chord([sig("flow_tasks.square", i) for i in range(members)], sig("flow_tasks.tally", runs)).to_data()
    _, other, killed_at = push_then_kill(spawn, redis_b.url, rb, data, "big-2", members)
    # The client's retry, on the other master, goes on from where the first one stopped.
    c = Client([other], retry=1, timeout=120)
    try:
        assert c.call("push_workflow", data, 0, "big-2") == "big-2"
        assert float(rb.hget("ppq:0:t:big-2.2", "created")) < killed_at < float(rb.hget("ppq:0:t:big-2", "created"))
        assert not rb.keys("ppq:0:stage*") and rb.llen("ppq:0:queue") == members
        spawn.worker(other, allow=ALLOW, concurrency=2)
        assert c.result("big-2", timeout=600) == [i * i for i in range(members)]
        assert lines(runs) == [str(members)]
    finally:
        c.close()
