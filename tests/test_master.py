"""The master over real Pyro5 and real Redis: an in-process daemon (the ``master`` fixture),
called by ppq's PyroFunc/Client and by plain ``Pyro5.api.Proxy`` objects that know nothing
of ppq, some of them acting as a worker. Redis is read directly to check what was stored.
"""

from __future__ import annotations

import base64
import json
import pickle
import socket
import subprocess
import sys
import textwrap
import threading
import time

import Pyro5.api
import pytest
import redis

import ppq
from ppq import (
    Client,
    InvalidTaskError,
    LeaseLostError,
    PyroFunc,
    ResultTimeoutError,
    TaskFailedError,
    encode_parameters,
)
from ppq.codec import decode_parameters, encode
from ppq.config import load_config
from ppq.master import serve

from . import tasks
from .conftest import address_of, redis_snapshot, wait_for, wait_state

W1 = {"id": "test-worker-1", "host": "here", "pid": 1}
W2 = {"id": "test-worker-2", "host": "here", "pid": 2}


@pytest.fixture
def master(module_master, ra, rb):
    """Overrides conftest's ``master`` in this module: one in-process master serves every test here
    (stopping a master takes most of a second), while ``ra``/``rb`` still flush Redis before each test."""
    return module_master


def plain_proxy(master, serializer="serpent"):
    """A Pyro5 proxy as an outside client makes it: no ppq handshake, a stock serializer.

    (ppq, imported in this process, sets Pyro5's global default serializer, so the
    stock default, serpent, is named explicitly.)
    """
    proxy = Pyro5.api.Proxy(master.uri)
    proxy._pyroSerializer = serializer
    proxy._pyroTimeout = 10
    return proxy


def task_state(r):
    """Everything in Redis but the worker liveness index. Used where the caller is the worker that
    holds (or held) the lease: it is alive and talking, so refreshing its "seen" mark is fair, but no
    task state may change. (A worker holding no lease must change nothing at all: see below.)"""
    (snap,) = redis_snapshot(r)
    snap.pop(b"ppq:0:workers:seen", None)
    return snap


def lease(call, worker=W1, queue_index=0):
    task = call("get_task", worker, queue_index)
    assert task is not None, "expected a task to lease"
    return task


# -- pushing ------------------------------------------------------------------------


def test_push_task_stores_a_queued_task_in_redis(call, ra, rb):
    task_id = call("push_task", "add", module="tasks", args=[2, 3], kwargs={}, queue_index=0)
    assert isinstance(task_id, str) and task_id
    assert ra.lrange("ppq:0:queue", 0, -1) == [task_id.encode()]
    assert ra.hget(f"ppq:0:t:{task_id}", "state") == b"queued"
    assert rb.dbsize() == 0
    info = call("get_task_info", task_id, 0)
    assert info["state"] == "queued"
    assert (info["module"], info["func"], info["args"], info["kwargs"]) == ("tasks", "add", [2, 3], {})
    assert info["retry"] == 0 and info["max_retry"] == 1
    assert isinstance(info["created"], float) and abs(info["created"] - time.time()) < 60
    assert info["result"] is None and not info.get("error")


def test_push_task_with_dotted_func_and_seed_parameters(call):
    a = call("push_task", "tasks.add", parameters=encode_parameters([1, 2], {}))
    b = call("push_task", "sleep", module="time", parameters=encode_parameters([0], {}), queue_index=0)
    info_a, info_b = call("get_task_info", a, 0), call("get_task_info", b, 0)
    assert (info_a["module"], info_a["func"], info_a["args"]) == ("tasks", "add", [1, 2])
    assert (info_b["module"], info_b["func"], info_b["args"], info_b["kwargs"]) == ("time", "sleep", [0], {})


def test_seed_pyrofunc_call_shape(master):
    client = PyroFunc(f"PYRO:queue@127.0.0.1:{master.port}", retry=1, random_idx=True, threaded=True)
    try:
        task_id = client("push_task", "sleep", module="time", parameters=encode_parameters([0], {}), queue_index=0)
        assert client("get_task_info", task_id, 0)["state"] == "queued"
        fixed = PyroFunc([f"127.0.0.1:{master.port}"], func="get_task_info")
        assert fixed(task_id, 0)["id"] == task_id
        fixed.close()
    finally:
        client.close()


def test_pyrofunc_default_return_and_connect_error(master):
    from ppq.embedded import free_port

    dead = f"127.0.0.1:{free_port()}"
    assert PyroFunc(dead, default_return="fallback", timeout=2)("ping") == "fallback"
    with pytest.raises(ppq.ConnectError):
        PyroFunc(dead, retry=1, timeout=2)("ping")
    # Failover: the dead master first, the live one second.
    both = PyroFunc([dead, address_of(master)], retry=1, timeout=2)
    assert both("ping") == "pong"
    both.close()


def test_calls_outside_the_direct_wire_path_get_the_same_answers(master, call):
    """ppq's own calls take a direct wire path; calls Pyro5 must handle itself (annotations,
    a correlation id, a top-level argument Pyro5 converts first) give the same results."""
    import array
    import uuid

    import Pyro5.callcontext

    task_id = call("push_task", "add", module="tasks", args=[1, 2])
    plain = call("get_task_info", task_id, 0)
    with plain_proxy(master, "marshal") as q:
        assert q.get_task_info(task_id, 0) == plain
        context = Pyro5.callcontext.current_context
        context.correlation_id = uuid.uuid4()
        context.annotations = {"XTRA": b"some bytes"}
        try:
            assert q.get_task_info(task_id, 0) == plain
            assert q.ping() == "pong"
        finally:
            context.correlation_id = None
            context.annotations = {}
        with pytest.raises(ValueError, match="queue_index"):
            q.get_task_info(task_id, 99)
        assert q.get_task_info(task_id, 0) == plain
    # Pyro5 sends an array.array argument as a list (marshal alone would send its bytes).
    converted = call("push_task", "add", module="tasks", args=array.array("i", [3, 4]))
    assert call("get_task_info", converted, 0)["args"] == [3, 4]
    # The connection stays in step after a call that took Pyro5's path.
    assert call("get_task_info", task_id, 0) == plain


def test_pyrofunc_one_way_push_lands(call, master, ra):
    """``set_one_way``: calls do not wait for a reply and return None (see rpc.PyroFunc)."""
    oneway = PyroFunc(address_of(master), set_one_way=True)
    try:
        replies = [oneway("push_task", "add", module="tasks", args=[i, i], task_id=f"oneway-task-{i}")
                   for i in range(2)]
        for i in range(2):
            assert wait_for(lambda i=i: call("get_task_info", f"oneway-task-{i}", 0), timeout=5)["args"] == [i, i]
        assert replies == [None, None]
    finally:
        oneway.close()


@pytest.mark.parametrize("serializer", ["serpent", "json"])
def test_plain_proxy_pushes_args_kwargs_and_reads_the_result(master, serializer):
    """A plain Pyro5 client pushes with args/kwargs, plays the worker, and reads the result."""
    with plain_proxy(master, serializer) as q:
        task_id = q.push_task("echo", module="tasks", args=[1, "two"], kwargs={"three": 3.5}, queue_index=0)
        assert q.get_task_info(task_id, 0)["state"] == "queued"
        task = q.get_task({"id": "plain-worker"}, 0)
        assert task["id"] == task_id
        assert (task["module"], task["func"], task["args"], task["kwargs"]) == ("tasks", "echo", [1, "two"],
                                                                                 {"three": 3.5})
        assert task["lease"]
        assert q.get_task_info(task_id, 0)["state"] == "running"
        assert q.task_finish(task_id, {"id": "plain-worker"}, 0, result={"ok": [1, 2]}) is True
        info = q.get_task_info(task_id, 0)
    assert info["state"] == "done"
    assert info["result"] == {"ok": [1, 2]}
    assert info["finished"] >= info["started"] >= info["created"]


def test_plain_proxy_serpent_bytes_parameters_are_accepted(master, call):
    """serpent turns the seed's bytes ``parameters`` into a base64 dict: the master accepts it."""
    with plain_proxy(master, "serpent") as q:
        task_id = q.push_task("add", module="tasks", parameters=encode_parameters([4, 5], {"x": 1}))
    info = call("get_task_info", task_id, 0)
    assert (info["args"], info["kwargs"]) == ([4, 5], {"x": 1})


def test_plain_proxy_json_base64_dict_and_json_text_parameters(master, call):
    blob = encode_parameters([7], {"y": "z"})
    as_dict = {"data": base64.b64encode(blob).decode(), "encoding": "base64"}
    with plain_proxy(master, "json") as q:
        a = q.push_task("echo", module="tasks", parameters=as_dict)
        b = q.push_task("echo", module="tasks", parameters=json.dumps([[8, 9], {"k": None}]))
    assert (call("get_task_info", a, 0)["args"], call("get_task_info", a, 0)["kwargs"]) == ([7], {"y": "z"})
    assert (call("get_task_info", b, 0)["args"], call("get_task_info", b, 0)["kwargs"]) == ([8, 9], {"k": None})


def test_plain_pyro5_in_a_process_without_ppq(master, tmp_path):
    """The whole round trip from a Python process that never imports ppq (stock Pyro5 defaults)."""
    script = tmp_path / "outside.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        import Pyro5.api
        q = Pyro5.api.Proxy("{master.uri}")
        tid = q.push_task("add", module="tasks", args=[20, 22])
        worker = {{"id": "outside-worker"}}
        task = q.get_task(worker, 0)
        q.task_finish(task["id"], worker, 0, result=sum(task["args"]))
        info = q.get_task_info(tid, 0)
        try:
            q.push_task("", module="tasks")
            refused = None
        except Exception as exc:
            refused = [type(exc).__name__, str(exc)]
        print(json.dumps({{"tid": tid, "task_id": task["id"], "state": info["state"], "result": info["result"],
                          "refused": refused, "ppq_loaded": any(m.split(".")[0] == "ppq" for m in sys.modules)}}))
    """))
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30,
                         cwd=str(tmp_path), env={"PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["ppq_loaded"] is False
    assert data["task_id"] == data["tid"]
    assert (data["state"], data["result"]) == ("done", 42)
    assert data["refused"][0] == "ValueError" and "func" in data["refused"][1]


# -- queue_index on two Redis servers -------------------------------------------------------


def test_two_queue_indexes_on_two_redis_servers_stay_apart(call, ra, rb):
    a = call("push_task", "add", module="tasks", args=[1, 1], queue_index=0)
    b = call("push_task", "add", module="tasks", args=[2, 2], queue_index=1)
    assert ra.exists(f"ppq:0:t:{a}") and not ra.exists(f"ppq:1:t:{b}") and not ra.exists(f"ppq:0:t:{b}")
    assert rb.exists(f"ppq:1:t:{b}") and not rb.exists(f"ppq:0:t:{a}") and not rb.exists(f"ppq:1:t:{a}")
    assert all(k.startswith(b"ppq:0:") for k in ra.keys("*"))
    assert all(k.startswith(b"ppq:1:") for k in rb.keys("*"))
    assert call("get_task_info", a, 1) is None and call("get_task_info", b, 0) is None
    assert call("get_task_info", b, 1)["args"] == [2, 2]
    # A worker of queue_index 1 gets only the task of queue_index 1.
    task = lease(call, queue_index=1)
    assert task["id"] == b
    assert call("get_task", W1, 1) is None
    assert call("get_task_info", a, 0)["state"] == "queued"
    info = call("server_info")
    assert (info[0]["queued"], info[0]["running"]) == (1, 0)
    assert (info[1]["queued"], info[1]["running"]) == (0, 1)


def test_fifo_order_within_a_queue_index(call):
    ids = [call("push_task", "add", module="tasks", args=[i, i]) for i in range(5)]
    assert [lease(call)["id"] for _ in ids] == ids


# -- delay, key de-duplication -----------------------------------------------------------------------


def test_delayed_task_is_not_handed_out_before_its_delay(call, ra):
    task_id = call("push_task", "add", module="tasks", args=[1, 2], delay=1.2)
    info = call("get_task_info", task_id, 0)
    assert info["state"] == "delayed"
    assert info["eta"] == pytest.approx(info["created"] + 1.2, abs=0.05)
    assert ra.zscore("ppq:0:delayed", task_id) == pytest.approx(info["eta"], abs=0.01)
    assert ra.llen("ppq:0:queue") == 0
    assert call("get_task", W1, 0) is None
    task = wait_for(lambda: call("get_task", W1, 0), timeout=10, interval=0.05, what="the delayed task")
    assert task["id"] == task_id
    started = call("get_task_info", task_id, 0)["started"]
    assert started >= info["eta"] - 0.01


def test_same_key_while_waiting_updates_the_task_then_a_new_one_after_lease(call, ra):
    first = call("push_task", "echo", module="tasks", key="report-42", args=[1])
    again = call("push_task", "echo", module="tasks", key="report-42", args=[2], kwargs={"v": 2})
    assert again == first
    assert ra.llen("ppq:0:queue") == 1
    info = call("get_task_info", first, 0)
    assert (info["args"], info["kwargs"], info["key"], info["state"]) == ([2], {"v": 2}, "report-42", "queued")
    assert call("server_info")[0]["pushed"] == 1
    task = lease(call)
    assert task["id"] == first and ppq.decode_parameters(task["parameters"]) == ([2], {"v": 2})
    third = call("push_task", "echo", module="tasks", key="report-42", args=[3])
    assert third != first
    assert call("get_task_info", third, 0)["args"] == [3]
    assert call("get_task_info", first, 0)["state"] == "running"


def test_key_dedup_of_a_delayed_task_moves_it_to_the_queue(call, ra):
    first = call("push_task", "echo", module="tasks", key="k", args=[1], delay=60)
    assert call("get_task_info", first, 0)["state"] == "delayed"
    again = call("push_task", "echo", module="tasks", key="k", args=[2])
    assert again == first
    assert call("get_task_info", first, 0)["state"] == "queued"
    assert ra.zcard("ppq:0:delayed") == 0 and ra.lrange("ppq:0:queue", 0, -1) == [first.encode()]


# -- the worker side: lease, finish, error, piggyback, retries, dead list --------------------------------


def test_get_task_finish_error_piggyback_as_a_plain_worker(master, call):
    ok_id = call("push_task", "add", module="tasks", args=[1, 2])
    err_id = call("push_task", "boom", module="tasks", max_retry=0)
    with plain_proxy(master) as q:
        worker = {"id": "plain-w", "host": "h", "pid": 9}
        first = q.get_task(worker, 0)
        assert first["id"] == ok_id
        nxt = q.task_finish(first["id"], worker, 0, piggyback=True, result=3)
        assert nxt is not None and nxt["id"] == err_id
        assert nxt["func"] == "boom"
        assert q.task_error(err_id, worker, 0, error="ValueError: boom", traceback="Traceback: line 1") is True
        assert q.get_task(worker, 0) is None
    assert call("get_task_info", ok_id, 0)["result"] == 3
    dead = call("get_task_info", err_id, 0)
    assert dead["state"] == "dead"
    assert dead["error"] == "ValueError: boom" and dead["traceback"] == "Traceback: line 1"


def test_piggyback_with_nothing_left_returns_none(call):
    task_id = call("push_task", "add", module="tasks", args=[1, 2])
    task = lease(call)
    assert call("task_finish", task_id, W1, 0, piggyback=True, result=3, lease=task["lease"]) is None
    assert call("get_task_info", task_id, 0)["state"] == "done"


def test_retry_then_dead_with_error_and_traceback(call, ra):
    task_id = call("push_task", "boom", module="tasks", max_retry=1)
    first = lease(call)
    assert call("task_error", task_id, W1, 0, error="ValueError: first", traceback="tb-1", lease=first["lease"])
    info = call("get_task_info", task_id, 0)
    assert (info["state"], info["retry"]) == ("failed", 1)
    assert info["error"] == "ValueError: first"
    assert ra.lrange("ppq:0:queue", 0, -1) == [task_id.encode()]  # retry_delay=False: requeued at once
    second = lease(call, W2)
    assert second["id"] == task_id and second["retry"] == 1 and second["lease"] != first["lease"]
    assert call("task_error", task_id, W2, 0, error="ValueError: second", traceback="tb-2", lease=second["lease"])
    info = call("get_task_info", task_id, 0)
    assert (info["state"], info["retry"], info["attempts"]) == ("dead", 2, 2)
    assert (info["error"], info["traceback"]) == ("ValueError: second", "tb-2")
    assert ra.zscore("ppq:0:dead", task_id) is not None
    assert call("get_task", W1, 0) is None
    dead = call("dead_tasks", 0)
    assert [d["id"] for d in dead] == [task_id] and dead[0]["error"] == "ValueError: second"
    assert call("server_info")[0]["dead"] == 1
    # Requeue from the dead list: back in the queue with its retries reset.
    assert call("requeue_dead", [task_id], 0) == [task_id]
    info = call("get_task_info", task_id, 0)
    assert (info["state"], info["retry"]) == ("queued", 0)
    assert call("dead_tasks", 0) == []
    third = lease(call)
    call("task_error", task_id, W1, 0, error="E", retry=False, lease=third["lease"])
    assert call("get_task_info", task_id, 0)["state"] == "dead"  # retry=False: dead at once
    assert call("purge_dead", None, 0) == 1
    assert call("get_task_info", task_id, 0) is None and not ra.exists(f"ppq:0:t:{task_id}")


def test_max_retry_zero_goes_dead_on_first_error(call):
    task_id = call("push_task", "boom", module="tasks", max_retry=0)
    task = lease(call)
    call("task_error", task_id, W1, 0, error="ValueError: x", traceback="tb", lease=task["lease"])
    assert call("get_task_info", task_id, 0)["state"] == "dead"


def test_retry_delay_backs_off_exponentially(call, ra):
    task_id = call("push_task", "boom", module="tasks", max_retry=3, retry_delay=True)
    task = lease(call)
    call("task_error", task_id, W1, 0, error="ValueError: x", traceback="tb", lease=task["lease"])
    info = call("get_task_info", task_id, 0)
    assert (info["state"], info["retry"], info["retry_delay"]) == ("failed", 1, True)
    assert info["eta"] >= info["finished"] + 1 + 2 ** 1 - 0.01
    assert info["eta"] <= info["finished"] + 1 + 2 ** 1 + 1
    assert ra.zscore("ppq:0:delayed", task_id) == pytest.approx(info["eta"], abs=0.01)
    assert ra.llen("ppq:0:queue") == 0
    assert call("get_task", W1, 0) is None


def test_finish_with_a_wrong_lease_is_refused_and_changes_nothing(master, call, ra):
    task_id = call("push_task", "add", module="tasks", args=[1, 2])
    task = lease(call)
    before = task_state(ra)
    with pytest.raises(LeaseLostError):
        call("task_finish", task_id, W1, 0, result=3, lease=task["lease"] + "-forged")
    with pytest.raises(LeaseLostError):
        call("task_error", task_id, W1, 0, error="x", lease=task["lease"] + "-forged")
    with plain_proxy(master) as q:
        with pytest.raises((ValueError, RuntimeError)) as excinfo:
            q.task_finish(task_id, W1, 0, result=3, lease="test-worker-1/99")
        assert "LeaseLostError" in str(excinfo.value)
    assert task_state(ra) == before
    assert call("get_task_info", task_id, 0)["state"] == "running"
    assert call("task_finish", task_id, W1, 0, result=3, lease=task["lease"]) is True
    # Finishing twice is refused too: a task is never counted done twice.
    with pytest.raises(LeaseLostError):
        call("task_finish", task_id, W1, 0, result=4, lease=task["lease"])
    info = call("get_task_info", task_id, 0)
    assert (info["state"], info["result"]) == ("done", 3)
    assert call("server_info")[0]["done"] == 1


def test_report_from_a_worker_that_holds_no_lease_changes_nothing_at_all(master, call, ra):
    """A finish/error from a worker that never held the task is refused and leaves Redis exactly
    as it was: no task state, and no phantom entry for that worker in server_info either."""
    task_id = call("push_task", "add", module="tasks", args=[1, 2])
    lease(call, W1)
    before = redis_snapshot(ra)
    with pytest.raises(LeaseLostError):
        call("task_finish", task_id, W2, 0, result=3)  # no lease
    with pytest.raises(LeaseLostError):
        call("task_error", task_id, W2, 0, error="x", lease="test-worker-2/1")  # a guessed lease
    with plain_proxy(master) as q:
        with pytest.raises((ValueError, RuntimeError)) as excinfo:
            q.task_finish(task_id, {"id": "plain-stranger"}, 0, result=3)
        assert "LeaseLostError" in str(excinfo.value)
    assert call("get_task_info", task_id, 0)["state"] == "running"
    assert [w["id"] for w in call("server_info")[0]["workers"] if w["id"] != W1["id"]] == []
    assert redis_snapshot(ra) == before


def test_expired_lease_requeues_the_task_and_refuses_the_old_lease(make_master, ra):
    server = make_master(master__lease_timeout=1)
    call = PyroFunc(address_of(server))
    try:
        task_id = call("push_task", "add", module="tasks", args=[1, 2])
        old = lease(call, W1)
        info = wait_state(call, task_id, "queued", timeout=10)
        assert info["expiries"] == 1
        before = task_state(ra)
        with pytest.raises(LeaseLostError):
            call("task_finish", task_id, W1, 0, result=3, lease=old["lease"])
        with pytest.raises(LeaseLostError):
            call("task_finish", task_id, W1, 0, result=3)
        with plain_proxy(server) as q, pytest.raises((ValueError, RuntimeError)) as excinfo:
            q.task_error(task_id, W1, 0, error="late", lease=old["lease"])
        assert "LeaseLostError" in str(excinfo.value)
        assert task_state(ra) == before
        new = lease(call, W2)
        assert new["id"] == task_id and new["lease"] != old["lease"]
        assert call("task_finish", task_id, W2, 0, result=3, lease=new["lease"]) is True
        info = call("get_task_info", task_id, 0)
        assert (info["state"], info["attempts"], info["worker"]) == ("done", 2, W2["id"])
    finally:
        call.close()


def test_heartbeat_extends_a_lease(make_master):
    server = make_master(master__lease_timeout=1)
    call = PyroFunc(address_of(server))
    try:
        task_id = call("push_task", "add", module="tasks", args=[1, 2])
        task = lease(call, W1)
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:  # heartbeats for 2.5 s, 2.5 lease timeouts
            assert call("heartbeat", W1, 0, [[task_id, task["lease"]]]) == {"lost": []}
            assert call("get_task_info", task_id, 0)["state"] == "running"
            time.sleep(0.3)  # the heartbeat period itself, not a synchronisation
        assert call("task_finish", task_id, W1, 0, result=3, lease=task["lease"]) is True
        assert call("get_task_info", task_id, 0)["expiries"] == 0
        assert call("heartbeat", W1, 0, [[task_id, task["lease"]]]) == {"lost": [task_id]}
    finally:
        call.close()


# -- bad input: a clear error naming the field, and Redis unchanged -----------------------------------------

BAD_PUSHES = [
    ({"func": "add", "module": "tasks", "queue_index": 99}, "queue_index"),
    ({"func": "add", "module": "tasks", "queue_index": "0"}, "queue_index"),
    ({"func": "add", "module": "tasks", "queue_index": True}, "queue_index"),
    ({"func": "", "module": "tasks"}, "func"),
    ({"func": 123, "module": "tasks"}, "func"),
    ({"func": "not-an-identifier", "module": "tasks"}, "func"),
    ({"func": "add", "module": "not a module!"}, "module"),
    ({"func": "add", "module": ""}, "module"),
    ({"func": "add", "module": "tasks", "delay": -1}, "delay"),
    ({"func": "add", "module": "tasks", "delay": "soon"}, "delay"),
    ({"func": "add", "module": "tasks", "max_retry": "3"}, "max_retry"),
    ({"func": "add", "module": "tasks", "max_retry": -1}, "max_retry"),
    ({"func": "add", "module": "tasks", "max_retry": 10 ** 6}, "max_retry"),
    ({"func": "add", "module": "tasks", "retry_delay": "yes"}, "retry_delay"),
    ({"func": "add", "module": "tasks", "args": "abc"}, "args"),
    ({"func": "add", "module": "tasks", "kwargs": [1, 2]}, "kwargs"),
    ({"func": "add", "module": "tasks", "timeout": 0}, "timeout"),
    ({"func": "add", "module": "tasks", "result_ttl": -5}, "result_ttl"),
    ({"func": "add", "module": "tasks", "fclass": "Not A Class"}, "fclass"),
    ({"func": "add", "module": "tasks", "path": 5}, "path"),
    ({"func": "add", "module": "tasks", "lang": 5}, "lang"),
    ({"func": "add", "module": "tasks", "key": "k" * 600}, "key"),
    ({"func": "add", "module": "tasks", "task_id": "bad id!"}, "task_id"),
    ({"func": "add", "module": "tasks", "bogus_option": 1}, "bogus_option"),
    ({"func": "add", "module": "tasks", "args": ["x" * (1024 * 1024 + 10)]}, "parameters"),
    ({"func": "add", "module": "tasks", "parameters": b"\x92" + b"\x00" * (1024 * 1024 + 10)}, "parameters"),
    ({"func": "add", "module": "tasks", "parameters": pickle.dumps(([1], {}), protocol=2)}, "parameters"),
    ({"func": "add", "module": "tasks", "parameters": encode([1, 2, 3])}, "parameters"),
    ({"func": "add", "module": "tasks", "parameters": b"not msgpack \xc1\xc1"}, "parameters"),
    ({"func": "add", "module": "tasks", "parameters": encode_parameters([1], {}), "args": [1]}, "parameters"),
]


def _populate(call):
    """Give Redis some content (queued, delayed, keyed, running tasks) to compare against."""
    call("push_task", "add", module="tasks", args=[1, 2], key="kept")
    call("push_task", "add", module="tasks", args=[1, 2], delay=300)
    call("push_task", "add", module="tasks", args=[3, 4])
    call("push_task", "add", module="tasks", args=[5, 6], queue_index=1)
    lease(call)


@pytest.mark.parametrize(("options", "field"), BAD_PUSHES, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD_PUSHES)])
def test_bad_push_is_refused_naming_the_field_and_redis_is_unchanged(call, ra, rb, options, field):
    _populate(call)
    before = redis_snapshot(ra, rb)
    with pytest.raises(InvalidTaskError) as excinfo:
        call("push_task", **options)
    assert field in str(excinfo.value)
    assert redis_snapshot(ra, rb) == before
    # The same through push_tasks: all or nothing, the bad element named.
    good = {"func": "add", "module": "tasks", "args": [9, 9]}
    with pytest.raises(InvalidTaskError) as excinfo:
        call("push_tasks", [good, good, options])
    assert "tasks[2]" in str(excinfo.value) and field in str(excinfo.value)
    assert redis_snapshot(ra, rb) == before


@pytest.mark.parametrize("serializer", ["serpent", "json"])
def test_bad_push_from_a_plain_client_is_a_builtin_error_naming_the_field(master, call, ra, rb, serializer):
    _populate(call)
    before = redis_snapshot(ra, rb)
    with plain_proxy(master, serializer) as q:
        for options, field in [({"func": "add", "module": "tasks", "queue_index": 99}, "queue_index"),
                               ({"func": "", "module": "tasks"}, "func"),
                               ({"func": "add", "module": "not a module!"}, "module"),
                               ({"func": "add", "module": "tasks", "delay": -1}, "delay"),
                               ({"func": "add", "module": "tasks", "bogus_option": 1}, "bogus_option")]:
            with pytest.raises(ValueError) as excinfo:
                q.push_task(**options)
            assert "InvalidTaskError" in str(excinfo.value) and field in str(excinfo.value), options
    assert redis_snapshot(ra, rb) == before


def test_other_rpc_arguments_are_checked(call, ra, rb):
    task_id = call("push_task", "add", module="tasks", args=[1, 2])
    before = redis_snapshot(ra, rb)
    for method, args, kwargs, field in [
        ("get_task", (W1, 7), {}, "queue_index"),
        ("get_task", (3.5, 0), {}, "worker_info"),
        ("get_task", (W1, 0), {"wait": -1}, "wait"),
        ("get_task_info", ("bad id!", 0), {}, "task_id"),
        ("get_task_info", (task_id, 5), {}, "queue_index"),
        ("task_finish", ("bad id!", W1, 0), {}, "task_id"),
        ("task_finish", (task_id, W1, 0), {"lease": 12}, "lease"),
        ("task_finish", (task_id, W1, 0), {"bogus": 1}, "bogus"),
        ("push_tasks", ("not a list",), {}, "tasks"),
        ("push_tasks", ([1],), {}, "tasks[0]"),
        ("heartbeat", (W1, 0, "nope"), {}, "running"),
    ]:
        with pytest.raises(InvalidTaskError) as excinfo:
            call(method, *args, **kwargs)
        assert field in str(excinfo.value), (method, args, str(excinfo.value))
    assert redis_snapshot(ra, rb) == before


def test_push_tasks_returns_ids_in_order_across_queue_indexes(call, ra, rb):
    ids = call("push_tasks", [
        {"func": "add", "module": "tasks", "args": [1, 1]},
        {"func": "tasks.add", "args": [2, 2], "queue_index": 1},
        {"func": "sleep", "module": "time", "parameters": encode_parameters([0], {})},
    ])
    assert len(ids) == 3 and len(set(ids)) == 3
    assert call("get_task_info", ids[0], 0)["args"] == [1, 1]
    assert call("get_task_info", ids[1], 1)["args"] == [2, 2]
    assert call("get_task_info", ids[2], 0)["module"] == "time"
    assert ra.lrange("ppq:0:queue", 0, -1) == [ids[0].encode(), ids[2].encode()]
    assert rb.lrange("ppq:1:queue", 0, -1) == [ids[1].encode()]


def test_a_task_id_is_stored_once_across_pushes_and_within_one(call, ra):
    """A push retried after a lost reply, or an id given twice in one batch, stores one task."""
    first = call("push_tasks", [{"func": "add", "module": "tasks", "args": [1, 1], "task_id": f"given-{i}"}
                                for i in range(3)])
    assert first == ["given-0", "given-1", "given-2"]
    task = lease(call)
    assert task["id"] == "given-0"
    # The same ids again, one of them twice, among new ones: the stored tasks are left as they are.
    again = call("push_tasks", [{"func": "add", "module": "tasks", "args": [9, 9], "task_id": tid}
                                for tid in ("given-0", "new-0", "given-1", "new-0", "new-1")])
    assert again == ["given-0", "new-0", "given-1", "new-0", "new-1"]
    assert ra.hget("ppq:0:t:given-0", "state") == b"running"
    assert call("get_task_info", "given-1", 0)["state"] == "queued"
    assert [t.decode() for t in ra.lrange("ppq:0:queue", 0, -1)] == ["given-1", "given-2", "new-0", "new-1"]
    assert int(ra.hget("ppq:0:stats", "pushed")) == 5
    again = call("push_task", "add", module="tasks", args=[9, 9], task_id="given-2")
    assert again == "given-2" and len(ra.lrange("ppq:0:queue", 0, -1)) == 4
    # An id repeated in a push where no id was stored before.
    twice = call("push_tasks", [{"func": "add", "module": "tasks", "args": [1, 2], "task_id": tid}
                                for tid in ("dup-a", "dup-a", "dup-b")])
    assert twice == ["dup-a", "dup-a", "dup-b"]
    assert [t.decode() for t in ra.lrange("ppq:0:queue", 0, -1)][-2:] == ["dup-a", "dup-b"]
    assert int(ra.hget("ppq:0:stats", "pushed")) == 7


def test_push_tasks_runs_of_alike_tasks_keep_each_task_its_own_fields(call):
    """Tasks that share their fields but the id and arguments are checked once per run: each still
    gets its own arguments, and a change of any other field starts a new run."""
    tasks = []
    for i in range(30):
        task = {"func": "add", "module": "tasks", "args": [i, i]}
        if 10 <= i < 20:
            task.update(max_retry=5, timeout=2.5, kwargs={"n": i})
        if i >= 20:
            task.update(func="echo", parameters=encode_parameters([i], {"k": "v"}))
            del task["args"]
        tasks.append(task)
    tasks.append({"func": "add", "module": "tasks", "args": [1], "bogus": 1})
    with pytest.raises(InvalidTaskError, match=r"tasks\[30\]: unknown push option 'bogus'"):
        call("push_tasks", tasks)
    ids = call("push_tasks", tasks[:30])
    for i, task_id in enumerate(ids):
        info = call("get_task_info", task_id, 0)
        if i < 10:
            assert (info["func"], info["args"], info["kwargs"], info["max_retry"]) == ("add", [i, i], {}, 1)
        elif i < 20:
            assert (info["args"], info["kwargs"], info["max_retry"], info["timeout"]) == ([i, i], {"n": i}, 5, 2.5)
        else:
            assert (info["func"], info["args"], info["kwargs"]) == ("echo", [i], {"k": "v"})


def _long_poll(master, count, wait, out):
    """get_tasks(count, wait) in a thread with its own connection; the reply lands in ``out``."""
    def run():
        caller = PyroFunc(master.uri, timeout=wait + 10)
        try:
            started = time.monotonic()
            out["tasks"] = caller("get_tasks", W1, 0, count, wait)
            out["seconds"] = time.monotonic() - started
        finally:
            caller.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _waiting(server):
    """True once a long-poll waits idle in ``server`` (its look at the queue is over)."""
    return bool(server.master.wakers[0].idle)


def test_push_hands_tasks_to_a_long_poll_on_the_same_master(master, call, ra):
    """The long-poll gets the first tasks, leased to it, in order (how they reach it, in the push's
    own script, is pinned by test_push_leases_to_a_waiting_long_poll_in_its_own_redis_step)."""
    out = {}
    thread = _long_poll(master, 3, 20, out)
    wait_for(lambda: _waiting(master), what="the long-poll to wait")
    ids = call("push_tasks", [{"func": "add", "module": "tasks", "args": [i, i]} for i in range(5)])
    thread.join(15)
    assert not thread.is_alive() and out["seconds"] < 10
    got = out["tasks"]
    assert [t["id"] for t in got] == ids[:3]
    assert [decode_parameters(t["parameters"]) for t in got] == [([i, i], {}) for i in range(3)]
    for task in got:
        assert ra.hget(f"ppq:0:t:{task['id']}", "state") == b"running"
        assert ra.hget(f"ppq:0:t:{task['id']}", "worker") == W1["id"].encode()
        assert task["lease"] == ra.hget(f"ppq:0:t:{task['id']}", "lease").decode()
    assert [x.decode() for x in ra.lrange("ppq:0:queue", 0, -1)] == ids[3:]
    assert call("server_info")[0]["leased"] == 3
    # The leases are good: the worker can finish the handed tasks.
    for task in got:
        call("task_finish", task["id"], W1, 0, result=1, lease=task["lease"])
    assert [call("get_task_info", t["id"])["state"] for t in got] == ["done"] * 3


def _script_calls(r):
    """How many scripts (EVALSHA/EVAL round trips) the Redis behind ``r`` has run since it started
    (a call refused with NOSCRIPT, the first use of a script, runs nothing: it is not counted)."""
    stats = r.info("commandstats")
    return sum(stats.get(name, {}).get("calls", 0) - stats.get(name, {}).get("failed_calls", 0)
               for name in ("cmdstat_evalsha", "cmdstat_eval"))


def test_push_leases_to_a_waiting_long_poll_in_its_own_redis_step(make_master, tmp_path):
    """A push on the master where a long-poll waits leases the tasks to it in the push's own
    script: from the push to the long-poll's reply Redis runs one script, not a push followed
    by the woken long-poll's second look. The master has a Redis of its own, and background
    duties far apart, so that every script run on that Redis is this test's."""
    from ppq.embedded import RedisServer

    own = RedisServer(str(tmp_path / "redis"), appendonly=False).start()
    r = redis.Redis.from_url(own.url)
    try:
        server = make_master(master__redis_map={0: own.url}, master__reaper_interval=3600)
        out = {}
        thread = _long_poll(server, 2, 20, out)
        wait_for(lambda: _waiting(server), what="the long-poll to wait")
        before = _script_calls(r)
        call = PyroFunc(server.uri)
        try:
            ids = call("push_tasks", [{"func": "add", "module": "tasks", "args": [i, i]} for i in range(3)])
        finally:
            call.close()
        thread.join(15)
        assert not thread.is_alive()
        assert [t["id"] for t in out["tasks"]] == ids[:2]
        assert _script_calls(r) - before == 1, "the push did not hand its tasks to the waiting long-poll"
        assert [x.decode() for x in r.lrange("ppq:0:queue", 0, -1)] == ids[2:]
    finally:
        r.close()
        own.stop()


def test_push_on_one_master_wakes_a_long_poll_on_another(make_master, master, call, ra):
    other = make_master()
    out = {}
    thread = _long_poll(other, 1, 20, out)
    wait_for(lambda: _waiting(other), what="the long-poll to wait")
    assert not _waiting(master)
    (task_id,) = call("push_tasks", [{"func": "add", "module": "tasks", "args": [1, 2]}])
    thread.join(15)
    assert not thread.is_alive() and out["seconds"] < 10
    assert [t["id"] for t in out["tasks"]] == [task_id]
    assert call("get_task_info", task_id)["state"] == "running"


def test_delayed_push_is_not_handed_to_a_long_poll(master, call, ra):
    out = {}
    thread = _long_poll(master, 1, 1.5, out)
    wait_for(lambda: _waiting(master), what="the long-poll to wait")
    task_id = call("push_task", "add", module="tasks", args=[1, 2], delay=30)
    thread.join(15)
    assert out["tasks"] == [] and out["seconds"] >= 1.4
    assert call("get_task_info", task_id)["state"] == "delayed"


def test_push_with_the_same_task_id_is_stored_once(call, ra):
    a = call("push_task", "add", module="tasks", args=[1, 2], task_id="fixed-id-1")
    b = call("push_task", "add", module="tasks", args=[1, 2], task_id="fixed-id-1")
    assert a == b == "fixed-id-1"
    assert ra.llen("ppq:0:queue") == 1


# -- server_info ----------------------------------------------------------------------------


def test_server_info_shape(master, call):
    for i in range(3):
        call("push_task", "add", module="tasks", args=[i, i])
    call("push_task", "add", module="tasks", args=[0, 0], delay=300)
    call("push_task", "add", module="tasks", args=[0, 0], queue_index=1)
    lease(call)
    dead = lease(call)
    call("task_error", dead["id"], W1, 0, error="E", retry=False, lease=dead["lease"])
    worker = {"id": "hb-worker", "host": "box", "pid": 4242, "queue_index": 0, "running": [],
              "heartbeat_interval": 5}
    assert call("heartbeat", worker, 0, []) == {"lost": []}
    info = call("server_info")
    assert set(info) == {0, 1} and all(isinstance(k, int) for k in info)
    q0, q1 = info[0], info[1]
    assert (q0["queued"], q0["delayed"], q0["running"], q0["dead"]) == (1, 1, 1, 1)
    assert (q1["queued"], q1["delayed"], q1["running"], q1["dead"]) == (1, 0, 0, 0)
    assert isinstance(q0["workers"], list) and q1["workers"] == []
    entry = next(w for w in q0["workers"] if w["id"] == "hb-worker")
    assert entry["id"] == "hb-worker" and entry["host"] == "box" and entry["pid"] == 4242
    assert abs(entry["last_heartbeat"] - time.time()) < 30
    with plain_proxy(master, "serpent") as q:
        plain = q.server_info()
    assert set(plain) == {0, 1} and plain[0]["queued"] == 1


# -- the high-level Client and the @task decorator ----------------------------------------------------------


def _run_one(call, worker=W1, queue_index=0):
    """Play the worker for one task, in this process: run the real function from tests/tasks.py."""
    task = call("get_task", worker, queue_index)
    assert task is not None
    fn = getattr(tasks, task["func"]) if not task["fclass"] else getattr(getattr(tasks, task["fclass"])(),
                                                                          task["func"])
    args, kwargs = ppq.decode_parameters(task["parameters"])
    try:
        value = fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - reported as the task's error
        call("task_error", task["id"], worker, queue_index, error=f"{type(exc).__name__}: {exc}",
             traceback="tb", lease=task["lease"], retry=False)
    else:
        call("task_finish", task["id"], worker, queue_index, result=value, lease=task["lease"])
    return task


def test_client_push_info_result_results_cancel(master, call, ra):
    client = Client([address_of(master)])
    try:
        a = client.push("tasks.add", 2, 3)
        b = client.push("tasks.echo", 1, kwargs={"k": "v"}, queue_index=1)
        c = client.push("tasks.boom", "bad", max_retry=0)
        assert client.info(a)["state"] == "queued"
        assert client.info(b, queue_index=1)["kwargs"] == {"k": "v"}
        assert client.info("never-pushed") is None
        with pytest.raises(ResultTimeoutError):
            client.result(a, timeout=0.3)
        _run_one(call)
        assert client.result(a, timeout=5) == 5
        _run_one(call, queue_index=1)
        assert client.result(b, timeout=5, queue_index=1) == {"args": [1], "kwargs": {"k": "v"}}
        _run_one(call)
        with pytest.raises(TaskFailedError) as excinfo:
            client.result(c, timeout=5)
        assert "ValueError: bad" in str(excinfo.value) and excinfo.value.task_id == c
        # result() blocks until a worker finishes the task: the worker below runs it only once
        # the master holds result()'s wait (it registers the id in the `waiting` set).
        d = client.push("tasks.add", 10, 20)

        def late_worker():
            wait_for(lambda: ra.zscore("ppq:0:waiting", d) is not None, timeout=10)
            _run_one(PyroFunc(address_of(master)))

        worker = threading.Thread(target=late_worker)
        worker.start()
        assert client.result(d, timeout=10) == 30
        worker.join(10)
        # cancel: a waiting task is never handed out.
        e = client.push("tasks.add", 1, 1)
        assert client.cancel(e) == "queued"
        assert client.info(e)["state"] == "cancelled"
        assert call("get_task", W1, 0) is None
        with pytest.raises(TaskFailedError):
            client.result(e, timeout=5)
        assert client.cancel("never-pushed") is None
    finally:
        client.close()


def test_client_push_many_and_results(master, call):
    client = Client([address_of(master)])
    try:
        ids = client.push_many([("tasks.add", (i, i)) for i in range(5)]
                               + [("tasks.echo", (1,), {"x": 2}), {"func": "add", "module": "tasks", "args": [7, 7]}])
        assert len(ids) == 7 and len(set(ids)) == 7
        assert client.info(ids[5])["kwargs"] == {"x": 2}
        small_chunks = client.push_many([("tasks.add", (1, 1))] * 5, chunk=2)
        assert len(set(small_chunks)) == 5
        for _ in range(12):
            _run_one(call)
        got = dict(client.results(ids, timeout=10))
        assert got == {ids[i]: 2 * i for i in range(5)} | {ids[5]: {"args": [1], "kwargs": {"x": 2}}, ids[6]: 14}
        assert dict(client.results(small_chunks, timeout=10)) == dict.fromkeys(small_chunks, 2)
    finally:
        client.close()


def test_client_push_many_in_chunks_keeps_order_and_stops_at_a_bad_item(master, call):
    client = Client([address_of(master)])
    try:
        items = [("tasks.add", (i, 1)) if i % 3 else ("tasks.echo", [i], {"k": i}) for i in range(11)]
        ids = client.push_many(iter(items), chunk=4)
        assert len(set(ids)) == 11
        for i, tid in enumerate(ids):
            info = client.info(tid)
            assert info["func"] == ("add" if i % 3 else "echo")
            assert info["args"] == [i, 1] if i % 3 else info["kwargs"] == {"k": i}

        def bad_after_five():
            yield from [("tasks.add", (i, 0)) for i in range(5)]
            yield ("not-a-dotted-name", ())

        before = call("server_info")[0]["queued"]
        with pytest.raises(InvalidTaskError, match="not-a-dotted-name"):
            client.push_many(bad_after_five(), chunk=2)
        # Whole chunks before the bad item were stored; the chunk holding it was not.
        assert call("server_info")[0]["queued"] == before + 4
    finally:
        client.close()


def test_client_push_refuses_a_local_function():
    def local():
        return 1

    with pytest.raises(InvalidTaskError):
        Client(["127.0.0.1:1"]).push(local)


def test_bare_task_decorator_push_and_local_call(master, call, monkeypatch):
    """``@ppq.task`` (tests/tasks.py: mul) uses the default client, configured from PPQ_* variables."""
    monkeypatch.setenv("PPQ_CLIENT_MASTERS", address_of(master))
    monkeypatch.setattr(ppq.client, "_default_client", None)
    assert tasks.mul(6, 7) == 42  # still runs here
    task_id = tasks.mul.push(6, 7)
    assert isinstance(task_id, str)
    info = call("get_task_info", task_id, 0)
    assert (info["module"], info["func"], info["args"], info["state"]) == ("tests.tasks", "mul", [6, 7], "queued")


def test_task_decorator_with_a_client_and_options(master, call):
    client = Client([address_of(master)])
    try:
        decorated = ppq.task(client=client, max_retry=3, queue_index=1)(tasks.plus)
        assert decorated(1, 2) == 3
        task_id = decorated.push(1, b=2)
        info = call("get_task_info", task_id, 1)
        assert (info["module"], info["func"], info["args"], info["kwargs"], info["max_retry"]) == \
            ("tests.tasks", "plus", [1], {"b": 2}, 3)
    finally:
        client.close()


def test_client_fclass_from_a_method_object(master, call):
    client = Client([address_of(master)])
    a = client.push(tasks.Calculator.triple, 4)
    b = client.push("tasks.double", 5, fclass="Calculator")
    info = call("get_task_info", a, 0)
    assert (info["module"], info["fclass"], info["func"]) == ("tests.tasks", "Calculator", "triple")
    assert call("get_task_info", b, 0)["fclass"] == "Calculator"
    client.close()


def test_serve_runs_a_master_until_its_stop_event_is_set(redis_a, ra):
    """master.serve() (what `ppq master` and ppq.Master.serve run): the master answers once
    ``ready`` has it, and stops, its port closed, when ``stop`` is set."""
    config = load_config(overrides={"master.port": 0, "master.redis_map": {0: redis_a.url}}, environ={})
    stop = threading.Event()
    ready = []
    thread = threading.Thread(target=serve, args=(config, stop), kwargs={"ready": ready.append}, daemon=True)
    thread.start()
    wait_for(lambda: ready, what="serve() calling ready")
    call = PyroFunc(ready[0].uri)
    try:
        assert call("ping") == "pong"
    finally:
        call.close()
    stop.set()
    thread.join(20)
    assert not thread.is_alive()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", int(ready[0].port)), timeout=2).close()
