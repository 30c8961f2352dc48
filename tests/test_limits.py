"""Rate and concurrency limits per function with real masters, workers and Redis: a rate limit
spreads tasks over time across two masters, a concurrency limit caps the tasks running at once
(and a killed worker's slot comes back when its lease expires), bad limits are refused and
change nothing, and the config, @task and the ppq limit commands set them."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from ppq import Client
from ppq.config import load_config
from ppq.errors import ConfigError, InvalidTaskError
from ppq.rpc import PyroFunc

from .conftest import address_of, redis_snapshot, run_ppq, wait_for


def windows(starts: list[float], width: float = 1.0) -> int:
    """The most starts in any window of ``width`` seconds."""
    starts = sorted(starts)
    most, first = 0, 0
    for last, t in enumerate(starts):
        while t - starts[first] >= width:
            first += 1
        most = max(most, last - first + 1)
    return most


def spans(path: Path) -> list[tuple[float, float]]:
    return [(float(a), float(b)) for _, a, b in (line.split() for line in path.read_text().splitlines())]


def most_at_once(intervals: list[tuple[float, float]]) -> int:
    events = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def test_a_rate_limit_holds_tasks_back_across_two_masters_and_three_workers(make_master, spawn):
    """10/s, 300 tasks pushed through one master, limit set through the other, workers on both:
    the run takes about 29 s (a full bucket of 10 at once, then 10 a second) and no second holds
    more starts than the bucket allows (a second's burst plus a second's refill)."""
    a, b = make_master(), make_master()
    ca, cb = Client([address_of(a)]), Client([address_of(b)])
    try:
        assert ca.set_limit("tasks.add", rate="10/s") == [0, 1]
        assert cb.set_limit("tasks.add", rate="10/s") == []  # the same limit, shared
        masters = f"{address_of(a)},{address_of(b)}"
        for _ in range(3):
            spawn.worker(masters)
        wait_for(lambda: cb.server_info()[0]["workers_live"] == 3, what="three workers listed")
        ids = cb.push_many([("tasks.add", (i, 1)) for i in range(300)])
        held = wait_for(lambda: next((e for e in cb.limits()[0] if e["waiting"] > 200), None),
                        what="the held tasks listed")
        assert held["rate"] == "10/s" and held["concurrency"] is None
        assert cb.info(ids[-1])["waiting_for"] == "its rate limit 10/s"
        results = dict(ca.results(ids, timeout=60))
        assert results == {tid: i + 1 for i, tid in enumerate(ids)}
        infos = [ca.info(tid) for tid in ids]
        assert {info["attempts"] for info in infos} == {1}  # held tasks burn no attempt
        starts = [info["started"] for info in infos]
        took = max(starts) - min(starts)
        assert 29 * 0.85 <= took <= 29 * 1.15, took
        assert windows(starts) <= 20, windows(starts)
        entry = ca.limits()[0][0]
        assert (entry["function"], entry["waiting"], entry["running"]) == ("tasks.add", 0, 0)
    finally:
        ca.close()
        cb.close()


def test_a_concurrency_limit_caps_running_tasks_and_a_killed_workers_slot_comes_back(make_master, spawn, tmp_path):
    master = make_master(master__lease_timeout=2)
    client = Client([address_of(master)])
    out = tmp_path / "spans"
    try:
        client.set_limit("tasks.span", concurrency=2)
        workers = [spawn.worker(address_of(master), concurrency=2) for _ in range(3)]
        ids = client.push_many([("tasks.span", (str(out), i, 0.4)) for i in range(12)])
        wait_for(lambda: client.limits()[0][0]["waiting"] > 0, what="tasks waiting for a slot")
        assert dict(client.results(ids, timeout=30)) == {tid: i for i, tid in enumerate(ids)}
        assert most_at_once(spans(out)) == 2
        # A worker killed while it runs the only task the limit lets run: its slot comes back
        # when its lease expires, and the task waiting for it runs then.
        client.set_limit("tasks.sleep_then", concurrency=1)
        first = client.push("tasks.sleep_then", 30)
        running = wait_for(lambda: (i := client.info(first))["state"] == "running" and i, what="the first running")
        second = client.push("tasks.sleep_then", 0, "second")
        wait_for(lambda: client.info(second).get("waiting_for") == "a slot of its concurrency limit 1 (1 running)",
                 what="the second held back")
        victim = next(w for w in workers if str(w.pid) in running["worker"])
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        assert client.result(second, timeout=20) == "second"
        assert client.info(second)["started"] >= running["started"] + 2
        # The first went back to the queue and waits for the slot the second held.
        assert client.info(first)["state"] in ("queued", "running")
    finally:
        client.close()


@pytest.mark.parametrize("args, field", [
    (("tasks.add", "0/s"), "rate"), (("tasks.add", "-1/s"), "rate"), (("tasks.add", "10/d"), "rate"),
    (("tasks.add", "ten/s"), "rate"), (("tasks.add", 10), "rate"), (("tasks.add", "10/s", 0), "concurrency"),
    (("tasks.add", None, -2), "concurrency"), (("tasks.add", None, True), "concurrency"),
    (("tasks.add", None, "2"), "concurrency"), (("add", "10/s"), "function"), ((5, "10/s"), "function"),
    (("tasks.add",), "rate"), (("tasks.add", "10/s", None, 7), "queue_index"),
])
def test_a_bad_limit_is_refused_naming_its_field_and_nothing_changes(master, call, ra, rb, args, field):
    call("limit_set", "tasks.mul", "5/m", 3)
    before = redis_snapshot(ra, rb)
    with pytest.raises(InvalidTaskError, match=field):
        call("limit_set", *args)
    with pytest.raises(InvalidTaskError, match="kind"):
        call("limit_remove", "tasks.mul", "speed")
    assert redis_snapshot(ra, rb) == before
    assert call("limit_list")[0] == [{"function": "tasks.mul", "rate": "5/m", "concurrency": 3, "tokens": 1.0,
                                      "running": 0, "waiting": 0}]


@pytest.mark.parametrize("key, value, message", [
    ("rate_limits", {"tasks.add": "5/d"}, "rate_limits.tasks.add: unknown unit 'd'"),
    ("rate_limits", {"tasks.add": "0/s"}, "rate_limits.tasks.add"),
    ("rate_limits", ["tasks.add"], "rate_limits: expected a mapping"),
    ("concurrency_limits", {"tasks.add": 0}, "concurrency_limits.tasks.add"),
    ("concurrency_limits", {"nodots": 1}, "concurrency_limits: expected a dotted function name"),
])
def test_a_bad_limit_in_the_config_is_named(key, value, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(overrides={key: value}, environ={})


def test_config_limits_are_stored_at_start_and_a_removed_limit_lets_its_tasks_go(make_master, spawn):
    master = make_master(rate_limits={"tasks.add": "1/h"}, concurrency_limits={"tasks.mul": 4})
    client = Client([address_of(master)])
    try:
        listed = {e["function"]: e for e in client.limits()[0]}
        assert (listed["tasks.add"]["rate"], listed["tasks.mul"]["concurrency"]) == ("1/h", 4)
        spawn.worker(address_of(master))
        ids = client.push_many([("tasks.add", (i, i)) for i in range(5)])
        assert client.result(ids[0], timeout=20) == 0
        wait_for(lambda: client.info(ids[1]).get("waiting_for") == "its rate limit 1/h", what="the rest held")
        assert client.remove_limit("tasks.add") == [0, 1]
        assert dict(client.results(ids, timeout=20)) == {tid: 2 * i for i, tid in enumerate(ids)}
        assert [e["function"] for e in client.limits()[0]] == ["tasks.mul"]
    finally:
        client.close()


def test_the_limit_commands_set_list_and_remove(master, ra):
    address = address_of(master)
    done = run_ppq("limit", "set", "tasks.add", "10/s", "-m", address)
    assert done.returncode == 0, done.stderr
    done = run_ppq("limit", "set", "tasks.mul", "--concurrency", "2", "-m", address)
    assert done.returncode == 0, done.stderr
    listed = run_ppq("limit", "list", "-m", address)
    assert listed.returncode == 0 and "tasks.add" in listed.stdout and "10/s" in listed.stdout, listed
    assert "tasks.mul" in listed.stdout
    bad = run_ppq("limit", "set", "tasks.add", "10/d", "-m", address)
    assert bad.returncode != 0 and "unit 'd'" in bad.stderr + bad.stdout
    assert ra.hget("ppq:0:limits", "rate:tasks.add") == b"10/s"
    done = run_ppq("limit", "remove", "tasks.add", "-m", address)
    assert done.returncode == 0, done.stderr
    assert ra.hget("ppq:0:limits", "rate:tasks.add") is None
    status = run_ppq("status", "-m", address)
    assert status.returncode == 0 and "tasks.mul" in status.stdout, status


def test_task_declares_its_limits_and_a_master_importing_its_module_stores_them(make_master):
    master = make_master(master__schedule_modules=["tests.limited_tasks"])
    call = PyroFunc(address_of(master))
    try:
        assert call("limit_list")[0] == [{"function": "tests.limited_tasks.send", "rate": "3/m", "concurrency": 2,
                                          "tokens": 1.0, "running": 0, "waiting": 0}]
    finally:
        call.close()
    with pytest.raises(InvalidTaskError, match="rate_limit"):
        import ppq

        ppq.task(rate_limit="3/d")(lambda: None)


def test_held_tasks_keep_their_priority_and_order_and_cancel_finds_them(master, call, ra):
    """A lease holds back what is over the limit (no worker: leases through get_tasks); a cancelled
    held task leaves its list; removing the limit puts the rest back on their priority's list, in
    order, and the next lease takes them."""
    call("limit_set", "tasks.add", "1/h")
    ids = [call("push_task", "add", module="tasks", args=[i, i], priority=9) for i in range(4)]
    leased = call("get_tasks", {"id": "w1"}, 0, 4)
    assert [t["id"] for t in leased] == ids[:1]
    assert ra.lrange("ppq:0:queue:f:tasks.add", 0, -1) == [i.encode() for i in ids[1:]]
    assert call("get_task_info", ids[2])["waiting_for"] == "its rate limit 1/h"
    assert call("get_tasks", {"id": "w1"}, 0, 4) == []  # no token: nothing leased, nothing burnt
    assert call("cancel_task", ids[2]) == "queued"
    assert ra.lrange("ppq:0:queue:f:tasks.add", 0, -1) == [ids[1].encode(), ids[3].encode()]
    assert call("server_info")[0]["queued"] == 2
    assert call("limit_remove", "tasks.add", "rate") == [0, 1]
    assert ra.lrange("ppq:0:queue:p:9", 0, -1) == [ids[1].encode(), ids[3].encode()]
    assert not ra.exists("ppq:0:queue:f:tasks.add") and not ra.exists("ppq:0:throttled")
    assert [t["id"] for t in call("get_tasks", {"id": "w1"}, 0, 4)] == [ids[1], ids[3]]
    assert {call("get_task_info", i)["attempts"] for i in (ids[1], ids[3])} == {1}
