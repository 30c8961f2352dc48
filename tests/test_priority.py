"""Priorities and expiry, two push options.

``priority`` (0-9, higher first): a lease takes the highest priority waiting first, FIFO
within one; priority 0 stays in ``queue`` as before, the others wait in ``queue:p:<n>``,
and a task keeps its priority through retries, hand-backs, lease expiries, the mover,
``requeue_dead`` and key updates. ``expires`` (seconds from the push, or a unix time): a
task not started by then ends ``expired``, never run.

The first tests call the master as a worker would (an in-process master, the worker's calls
made by hand); the others run real ``ppq worker`` processes and the real CLI.
"""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from ppq import Client
from ppq.errors import InvalidTaskError, TaskExpiredError, TaskFailedError

from .conftest import address_of, redis_snapshot, run_ppq, wait_for, wait_state, worker_entry

WORKER = {"id": "w-prio", "heartbeat_interval": 1}


@pytest.fixture
def client(master):
    c = Client([address_of(master)])
    yield c
    c.close()


def push(call, *args: Any, **options: Any) -> str:
    return str(call("push_task", "add", module="tasks", args=list(args), **options))


def lease(call, want: int = 100, reports: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    return list(call("report", WORKER, 0, reports or [], want, 0)["tasks"])


def ids(tasks: list[dict[str, Any]]) -> list[str]:
    return [t["id"] for t in tasks]


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


# -- priorities, by hand -------------------------------------------------------------------------


def test_a_lease_takes_the_highest_priority_first_and_each_priority_in_push_order(call, ra):
    low = [push(call, i, 0) for i in range(4)]
    mid = [push(call, i, 1, priority=3) for i in range(3)]
    high = [push(call, i, 2, priority=9) for i in range(2)]
    more_mid = [push(call, i, 3, priority=3) for i in range(2)]
    # Priority 0 stays in the plain queue; the others have lists, named in a zset.
    assert ra.lrange("ppq:0:queue", 0, -1) == [i.encode() for i in low]
    assert ra.zrange("ppq:0:priorities", 0, -1) == [b"3", b"9"]
    info = call("get_task_info", high[0])
    assert info["priority"] == 9 and call("get_task_info", low[0])["priority"] == 0
    assert b"priority" not in ra.hgetall(f"ppq:0:t:{low[0]}")  # stored only when not 0
    counts = call("server_info")[0]
    assert counts["queued"] == 11 and counts["priorities"] == {"3": 5, "9": 2}
    # A lease across the lists, then one that ends within one.
    assert ids(lease(call, 3)) == high + mid[:1]
    assert ids(lease(call, 100)) == mid[1:] + more_mid + low
    # Emptied lists leave the zset.
    assert ra.zcard("ppq:0:priorities") == 0 and call("server_info")[0]["queued"] == 0


def test_a_bulk_push_keeps_push_order_within_each_priority(call):
    batch = [{"func": "add", "module": "tasks", "args": [i, 0], "priority": [0, 5, 1, 5][i % 4]} for i in range(40)]
    pushed = call("push_tasks", batch)
    got = ids(lease(call, 100))
    by = {p: [tid for tid, t in zip(pushed, batch, strict=True) if t["priority"] == p] for p in (5, 1, 0)}
    assert got == by[5] + by[1] + by[0]


def test_client_push_many_and_task_options_carry_the_priority(client, call):
    low = client.push_many([("tasks.add", (i, 0)) for i in range(3)])
    high = client.push_many([("tasks.add", (i, 1)) for i in range(3)], priority=4)
    mixed = client.push_many([{"func": "tasks.add", "args": [1, 2], "priority": 8},
                              {"func": "tasks.add", "args": [3, 4], "expires": 3600}])
    assert call("get_task_info", mixed[1])["priority"] == 0 and call("get_task_info", mixed[1])["expires"]
    assert ids(lease(call, 100)) == mixed[:1] + high + low + mixed[1:]


def test_retries_hand_backs_and_lease_expiries_keep_the_priority(make_master, ra):
    from ppq.rpc import PyroFunc

    server = make_master(master__lease_timeout=1)
    call = PyroFunc(server.uri)
    try:
        first_low = push(call, 1, 1)
        high = push(call, 2, 2, priority=7, max_retry=3)
        [task] = lease(call, 1)
        assert task["id"] == high
        # A failure retried at once: back on the priority 7 list, ahead of the older priority-0 task.
        reply = call("report", WORKER, 0, [{"id": high, "lease": task["lease"], "ok": False, "error": "E: x",
                                           "traceback": ""}], 1, 0)
        assert reply["failed"][high][2] == 0
        assert ids(reply["tasks"]) == [high]
        assert call("get_task_info", high)["priority"] == 7
        # Handed back unrun: to the front of its list.
        other_high = push(call, 3, 3, priority=7)
        reply = call("report", WORKER, 0, [{"id": high, "lease": reply["tasks"][0]["lease"], "ok": False,
                                           "release": True}], 1, 0)
        assert ids(reply["tasks"]) == [high]
        # Its lease runs out: the reaper puts it back at the front of its list.
        wait_state(call, high, "queued", timeout=10)
        assert ra.lrange("ppq:0:queue:p:7", 0, -1) == [high.encode(), other_high.encode()]
        assert ids(lease(call, 10)) == [high, other_high, first_low]
    finally:
        call.close()


def test_the_mover_requeue_dead_cancel_and_key_updates_keep_or_change_the_priority(call, ra):
    delayed = push(call, 1, 1, priority=4, delay=0.3)
    low = push(call, 2, 2)
    wait_state(call, delayed, "queued")
    assert ra.lrange("ppq:0:queue:p:4", 0, -1) == [delayed.encode()]
    # A dead task requeued goes back to its priority's list.
    [first] = lease(call, 1)
    assert first["id"] == delayed
    call("report", WORKER, 0, [{"id": delayed, "lease": first["lease"], "ok": False, "error": "E: x",
                                "retry": False}], 0, 0)
    assert call("requeue_dead", [delayed]) == [delayed]
    assert ra.lrange("ppq:0:queue:p:4", 0, -1) == [delayed.encode()]
    # Cancel finds a queued task in its priority's list.
    cancelled = push(call, 3, 3, priority=2)
    assert call("cancel_task", cancelled) == "queued"
    assert ra.llen("ppq:0:queue:p:2") == 0
    # A key update may change the priority: the task moves to the end of its new list.
    keyed = push(call, 4, 4, key="k", priority=4)
    assert push(call, 5, 5, key="k", priority=8) == keyed
    assert ra.lrange("ppq:0:queue:p:8", 0, -1) == [keyed.encode()]
    assert ra.lrange("ppq:0:queue:p:4", 0, -1) == [delayed.encode()]
    assert push(call, 6, 6, key="k") == keyed  # back to 0: the end of the plain queue
    assert ra.lrange("ppq:0:queue", 0, -1) == [low.encode(), keyed.encode()]
    assert call("get_task_info", keyed)["priority"] == 0
    assert ids(lease(call, 10)) == [delayed, low, keyed]


def test_purge_takes_the_priority_lists_too(call, ra):
    for p in (0, 3, 9):
        push(call, p, p, priority=p)
    assert call("purge_queue") == {"purged": 3, "left": 0}
    assert not ra.keys("ppq:0:queue*") and ra.zcard("ppq:0:priorities") == 0
    assert call("server_info")[0]["queued"] == 0


def test_a_worker_takes_the_high_priority_tasks_first(master, client, call, spawn, tmp_path):
    out = tmp_path / "ran.txt"
    proc = spawn.worker(address_of(master), concurrency=1)
    worker_entry(call, proc.pid)
    assert client.pause_queue()
    low = [client.push("tasks.record", str(out), f"low{i}") for i in range(20)]
    high = [client.push("tasks.record", str(out), f"high{i}", priority=9) for i in range(3)]
    mid = [client.push("tasks.record", str(out), f"mid{i}", priority=5) for i in range(2)]
    status = run_ppq("status", "--json", "-m", address_of(master))
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)["0"]
    assert shown["queued"] == 25 and shown["priorities"] == {"9": 3, "5": 2} and shown["paused"]
    client.resume_queue()
    for tid in low + high + mid:
        wait_state(call, tid, "done")
    assert lines(out) == [f"high{i}" for i in range(3)] + [f"mid{i}" for i in range(2)] + [f"low{i}" for i in range(20)]


# -- expiry ---------------------------------------------------------------------------------------


def test_a_task_not_started_by_its_expiry_ends_expired_never_run(master, client, call, spawn, tmp_path, ra):
    out = tmp_path / "ran.txt"
    late = client.push("tasks.record", str(out), "late", expires=1, key="once")
    fine = client.push("tasks.record", str(out), "fine", expires=600)
    info = call("get_task_info", late)
    assert info["state"] == "queued" and info["expires"] == pytest.approx(info["created"] + 1, abs=0.01)
    waited: list[Any] = []

    def wait() -> None:
        try:
            waited.append(client.result(late, timeout=30))
        except TaskFailedError as exc:
            waited.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    # No worker until the expiry has passed (by the Redis clock the store uses).
    wait_for(lambda: float(ra.time()[0]) > info["expires"] + 0.1, timeout=5, what="the expiry to pass")
    proc = spawn.worker(address_of(master))
    worker_entry(call, proc.pid)
    assert client.result(fine, timeout=20) == "fine"
    expired = wait_state(call, late, "expired")
    waiter.join(10)
    assert lines(out) == ["fine"]
    assert expired["finished"] and not expired["started"] and expired["attempts"] == 0
    assert isinstance(waited[0], TaskExpiredError) and waited[0].task_id == late
    with pytest.raises(TaskExpiredError, match="not started before its expiry"):
        client.result(late, timeout=5)
    counts = call("server_info")[0]
    assert counts["expired_tasks"] == 1 and counts["queued"] == 0
    # Its de-duplication key is free: a push with it stores a new task.
    again = client.push("tasks.record", str(out), "again", key="once")
    assert again != late and client.result(again, timeout=20) == "again"
    # The record is kept for the result ttl.
    assert 0 < ra.ttl(f"ppq:0:t:{late}") <= 86400
    shown = run_ppq("task", late, "-m", address_of(master))
    assert shown.returncode == 0, shown.stderr
    assert "expired" in shown.stdout and "never run" in shown.stdout


def test_a_delayed_task_whose_expiry_passes_is_expired_by_the_mover(call, ra):
    tid = push(call, 1, 1, delay=0.5, expires=0.2, priority=3)
    wait_state(call, tid, "expired", timeout=10)
    assert ra.zcard("ppq:0:delayed") == 0 and ra.llen("ppq:0:queue:p:3") == 0
    assert call("server_info")[0]["expired_tasks"] == 1


def test_an_expiry_as_a_unix_time_is_kept_as_given(call):
    when = time.time() + 3600
    tid = push(call, 1, 1, expires=when)
    assert call("get_task_info", tid)["expires"] == pytest.approx(when, abs=0.001)
    assert ids(lease(call)) == [tid]


# -- bad values -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("field", "value", "message"), [
    ("priority", -1, "priority must be an integer from 0 to 9"),
    ("priority", 10, "priority must be an integer from 0 to 9"),
    ("priority", "x", "priority must be an integer from 0 to 9"),
    ("priority", True, "priority must be an integer from 0 to 9"),
    ("priority", False, "priority must be an integer from 0 to 9"),
    ("priority", 1.0, "priority must be an integer from 0 to 9"),
    ("expires", "x", "expires must be seconds from the push"),
    ("expires", True, "expires must be seconds from the push"),
    ("expires", 0, "expires must be seconds from the push"),
    ("expires", -5, "expires must be seconds from the push"),
    ("expires", math.nan, "expires must be seconds from the push"),
    ("expires", math.inf, "expires must be seconds from the push"),
    ("expires", 10**12, "expires must be seconds from the push"),
    ("expires", 1_500_000_000, "expires 1500000000 is a unix time .*s in the past"),
])
def test_a_bad_priority_or_expiry_is_refused_naming_it_and_stores_nothing(call, ra, rb, field, value, message):
    push(call, 0, 0)  # something stored already
    before = redis_snapshot(ra, rb)
    with pytest.raises(InvalidTaskError, match=message):
        push(call, 1, 1, **{field: value})
    with pytest.raises(InvalidTaskError, match=rf"tasks\[1\]: {message}"):
        call("push_tasks", [{"func": "add", "module": "tasks", "args": [1, 1]},
                            {"func": "add", "module": "tasks", "args": [2, 2], field: value}])
    assert redis_snapshot(ra, rb) == before


def test_the_push_command_takes_priority_and_expires_and_task_shows_them(master, call):
    addr = address_of(master)
    res = run_ppq("push", "tasks.add", "1", "2", "--priority", "6", "--expires", "120", "-m", addr)
    assert res.returncode == 0, res.stderr
    tid = res.stdout.strip()
    info = call("get_task_info", tid)
    assert info["priority"] == 6 and info["expires"] == pytest.approx(info["created"] + 120, abs=0.01)
    shown = run_ppq("task", tid, "-m", addr)
    assert shown.returncode == 0, shown.stderr
    assert "priority" in shown.stdout and " 6 " in shown.stdout and "expires" in shown.stdout
    bad = run_ppq("push", "tasks.add", "1", "2", "--priority", "12", "-m", addr)
    assert bad.returncode != 0 and "priority must be an integer from 0 to 9" in bad.stderr
    status = run_ppq("status", "--json", "-m", addr)
    assert status.returncode == 0, status.stderr
    shown = json.loads(status.stdout)["0"]
    assert shown["queued"] == 1 and shown["priorities"] == {"6": 1}
