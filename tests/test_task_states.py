"""Each state change of a task, pinned down at the Store and master level on a real Redis.

These hold the Lua scripts (ppq/store/lua/) and the master's checks to what they
promise, line by line: where an expired or handed-back task goes in the queue, when a
retry turns into a dead task, what a cancel flag does to a report, what the counters
count, what the reaper sweeps. Each was written against a mutant of that line that
the rest of the suite let through (docs/mutation.md).
"""

from __future__ import annotations

import pickle
import signal
import time
from collections.abc import Iterator
from typing import Any

import msgpack
import pytest
import redis

from ppq import InvalidTaskError, codec
from ppq.config import LimitsConfig
from ppq.embedded import RedisServer
from ppq.master.checks import worker_entry, worker_id_of
from ppq.rpc import PyroFunc, make_proxy
from ppq.store import Store
from ppq.store.records import counts_of
from ppq.task import check_push, decode_body

from .conftest import wait_for

LIMITS = LimitsConfig()
P = "ppq:0:"
WID = "w-1"


def spec(**options: Any) -> Any:
    return check_push({"func": "add", "module": "tasks", **options}, [0], LIMITS)


@pytest.fixture
def make_store(redis_a: RedisServer, ra: redis.Redis) -> Iterator[Any]:
    stores: list[Store] = []

    def make(**kwargs: Any) -> Store:
        store = Store(0, redis_a.url, **kwargs)
        stores.append(store)
        return store

    yield make
    for store in stores:
        store.close()


@pytest.fixture
def store(make_store: Any) -> Store:
    return make_store(result_ttl=100)


def push(store: Store, *specs: Any) -> list[str]:
    return store.push(list(specs))[0]


def lease(store: Store, count: int = 1, wid: str = WID) -> list[dict[str, Any]]:
    return store.report(wid, [], count, 60)[1]


def ok(task: dict[str, Any], result: Any = 3) -> dict[str, Any]:
    return {"id": task["id"], "lease": task["lease"], "ok": True, "result": codec.encode(result)}


def error(task: dict[str, Any], retry: bool = True) -> dict[str, Any]:
    return {"id": task["id"], "lease": task["lease"], "ok": False, "error": "ValueError: x", "traceback": "tb",
            "retry": retry}


def release(task: dict[str, Any]) -> dict[str, Any]:
    return {"id": task["id"], "lease": task["lease"], "ok": False, "release": True}


def queue(ra: redis.Redis) -> list[str]:
    return [i.decode() for i in ra.lrange(P + "queue", 0, -1)]


def stats(ra: redis.Redis) -> dict[str, int]:
    return {k.decode(): int(v) for k, v in ra.hgetall(P + "stats").items()}


def field(ra: redis.Redis, task_id: str, name: str) -> str | None:
    value = ra.hget(P + "t:" + task_id, name)
    return None if value is None else value.decode()


class Channel:
    """A subscription to one of a queue_index's channels; ``messages()`` drains what arrived."""

    def __init__(self, ra: redis.Redis, name: str) -> None:
        self.pubsub = ra.pubsub()
        self.pubsub.subscribe(P + name)
        wait_for(lambda: (self.pubsub.get_message(timeout=0.1) or {}).get("type") == "subscribe", timeout=5,
                 what=f"the subscription to {name}")

    def messages(self) -> list[str]:
        out, deadline = [], time.monotonic() + 0.5
        while time.monotonic() < deadline:
            msg = self.pubsub.get_message(timeout=0.1)
            if msg and msg["type"] == "message":
                out.append(msg["data"].decode())
        self.pubsub.close()
        return out


# -- report.lua ---------------------------------------------------------------------------------------------


def test_a_running_task_asked_to_cancel_ends_cancelled_whatever_its_report_says(store, ra):
    ids = push(store, spec(args=[1]), spec(args=[2]), spec(args=[3]))
    tasks = lease(store, 3)
    for tid in ids:
        assert store.cancel(tid) == "running"
    accepted, _, _ = store.report(WID, [ok(tasks[0]), error(tasks[1]), release(tasks[2])], 0, 60)
    assert accepted == [True, True, True]
    for tid in ids:
        assert field(ra, tid, "state") == "cancelled"
        assert field(ra, tid, "finished") is not None
        assert field(ra, tid, "result") is None and field(ra, tid, "error") is None
        assert 0 < ra.ttl(P + "t:" + tid) <= 100
    assert queue(ra) == [] and ra.zcard(P + "running") == 0 and ra.zcard(P + "dead") == 0
    counters = stats(ra)
    assert counters["cancelled"] == 3
    assert [counters.get(name, 0) for name in ("done", "errors", "released", "retried", "dead")] == [0] * 5


def test_a_hand_back_goes_to_the_front_of_the_queue_without_its_lease(store, ra):
    first, second, third = push(store, spec(args=[1]), spec(args=[2]), spec(args=[3]))
    (task,) = lease(store, 1)
    assert task["id"] == first
    wake, finished = Channel(ra, "wake"), Channel(ra, "finished")
    store.watch([first], 30)
    assert store.report(WID, [release(task)], 0, 60)[0] == [True]
    assert queue(ra) == [first, second, third]
    assert field(ra, first, "state") == "queued" and field(ra, first, "lease") is None
    assert field(ra, first, "retry") is None and field(ra, first, "error") is None
    assert stats(ra)["released"] == 1 and stats(ra).get("errors", 0) == 0
    assert wake.messages() == ["1"]
    assert finished.messages() == []  # a hand-back is no end
    again = lease(store, 1)[0]
    assert again["id"] == first and again["retry"] == 0 and again["lease"] != task["lease"]
    assert field(ra, first, "attempts") == "2"


def test_a_retried_task_goes_to_the_back_of_the_queue_until_its_retries_run_out(store, ra):
    tid, other = push(store, spec(max_retry=2), spec(args=[2]))
    for retry, want, left in ((1, 1, [other, tid]), (2, 2, [tid])):
        task = next(t for t in lease(store, want) if t["id"] == tid)
        wake = Channel(ra, "wake")
        store.report(WID, [error(task)], 0, 60)
        assert wake.messages() == ["1"]
        assert (field(ra, tid, "state"), field(ra, tid, "retry")) == ("failed", str(retry))
        assert field(ra, tid, "eta") == field(ra, tid, "finished")  # ready again at once
        assert (field(ra, tid, "error"), field(ra, tid, "traceback")) == ("ValueError: x", "tb")
        assert queue(ra) == left and ra.zscore(P + "dead", tid) is None
    (task,) = lease(store, 1)
    store.report(WID, [error(task)], 0, 60)
    assert (field(ra, tid, "state"), field(ra, tid, "retry")) == ("dead", "3")
    assert ra.zscore(P + "dead", tid) is not None and queue(ra) == []


def test_without_max_retry_a_task_is_retried_once(store, ra):
    (tid,) = push(store, spec())
    store.report(WID, [error(lease(store)[0])], 0, 60)
    assert field(ra, tid, "state") == "failed"
    store.report(WID, [error(lease(store)[0])], 0, 60)
    assert field(ra, tid, "state") == "dead"


def test_a_final_error_is_dead_at_once_and_every_counter_counts_its_report(store, ra):
    ids = push(store, *(spec(args=[i], max_retry=3) for i in range(4)))
    tasks = lease(store, 4)
    now = int(float(ra.time()[0]))
    store.report(WID, [ok(tasks[0]), ok(tasks[1]), error(tasks[2]), error(tasks[3], retry=False)], 0, 60)
    assert [field(ra, i, "state") for i in ids] == ["done", "done", "failed", "dead"]
    assert float(ra.zscore(P + "workers:seen", WID)) == pytest.approx(now + 60, abs=2)
    counters = stats(ra)
    assert (counters["pushed"], counters["leased"], counters["done"], counters["errors"], counters["retried"],
            counters["dead"]) == (4, 4, 2, 2, 1, 1)
    rate = {k.decode(): int(v) for k, v in ra.hgetall(P + "rate").items()}
    bucket = str(now // 10)
    if rate != {f"d:{bucket}": 2, f"f:{bucket}": 2}:  # the clock crossed a 10 s bucket: one later
        bucket = str(now // 10 + 1)
    assert rate == {f"d:{bucket}": 2, f"f:{bucket}": 2}
    counts = store.counts()
    assert (counts["done_per_min"], counts["failed_per_min"], counts["failed"]) == (2, 2, 1)


def test_a_result_is_kept_for_its_task_result_ttl_else_the_store_default_and_zero_keeps_none(store, ra):
    own, default, none = push(store, spec(result_ttl=30), spec(args=[2]), spec(args=[3], result_ttl=0))
    tasks = {t["id"]: t for t in lease(store, 3)}
    store.report(WID, [ok(tasks[own]), ok(tasks[default]), ok(tasks[none])], 0, 60)
    assert 20 < ra.ttl(P + "t:" + own) <= 30
    assert 90 < ra.ttl(P + "t:" + default) <= 100
    assert not ra.exists(P + "t:" + none)
    assert codec.decode(ra.hget(P + "t:" + own, "result")) == 3


def test_a_strict_report_with_a_lost_lease_leases_nothing_and_marks_no_one_seen(store, ra):
    push(store, spec(args=[1]), spec(args=[2]))
    (task,) = lease(store, 1, wid="")
    forged = {**ok(task), "lease": task["lease"] + "x"}
    accepted, leased, _ = store.report(WID, [forged], 1, 60, strict=True)
    assert (accepted, leased) == ([False], [])
    assert ra.zscore(P + "workers:seen", WID) is None
    accepted, leased, _ = store.report(WID, [forged], 1, 60)
    assert accepted == [False] and len(leased) == 1
    assert field(ra, task["id"], "state") == "running" and field(ra, task["id"], "lease") == task["lease"]


def test_an_end_of_a_watched_task_is_published_and_others_are_not(store, ra):
    watched, other = push(store, spec(args=[1]), spec(args=[2]))
    tasks = {t["id"]: t for t in lease(store, 2)}
    store.watch([watched], 30)
    finished = Channel(ra, "finished")
    store.report(WID, [ok(tasks[other]), error(tasks[watched], retry=False)], 0, 60)
    assert finished.messages() == [watched]


# -- lease.lua ----------------------------------------------------------------------------------------------


def test_lease_drops_ids_of_tasks_no_longer_waiting_and_fills_the_count_from_the_rest(store, ra):
    first, second, third = push(store, spec(args=[1]), spec(args=[2]), spec(args=[3]))
    assert store.cancel(second) == "queued"
    ra.lpush(P + "queue", "gone")  # an id whose record expired
    ra.rpush(P + "queue", second)  # and a cancelled one still listed
    tasks = lease(store, 2)
    assert [t["id"] for t in tasks] == [first, third]
    assert queue(ra) == [second]
    assert stats(ra)["leased"] == 2
    for task in tasks:
        assert field(ra, task["id"], "worker") == WID and field(ra, task["id"], "attempts") == "1"
        started = float(field(ra, task["id"], "started"))
        deadline = ra.zscore(P + "running", task["id"])
        assert deadline == pytest.approx(started + store.lease_timeout, abs=0.01)
    assert tasks[0]["lease"] != tasks[1]["lease"]
    assert tasks[0]["ready_at"] == pytest.approx(float(field(ra, first, "created")), abs=0.001)


def test_leasing_a_task_frees_its_key_for_a_new_push(store, ra):
    (keyed,) = push(store, spec(key="k"))
    assert ra.hget(P + "keys", "k").decode() == keyed
    lease(store)
    assert ra.hget(P + "keys", "k") is None
    (fresh,) = push(store, spec(key="k", args=[9]))
    assert fresh != keyed and ra.hget(P + "keys", "k").decode() == fresh


# -- push.lua -----------------------------------------------------------------------------------------------


def test_a_push_with_the_key_of_a_waiting_task_updates_it_in_place(store, ra):
    first, other = push(store, spec(key="k", max_retry=3, retry_delay=True, result_ttl=5), spec(args=[2]))
    renamed = push(store, spec(key="k", args=[7]), spec(key="j"), spec(key="k", args=[8], max_retry=4, result_ttl=9))
    assert renamed[0] == first and renamed[2] == first and renamed[1] not in (first, other)
    record = store.info(first)
    assert record["args"] == [8] and record["state"] == "queued"
    assert (record["max_retry"], record["retry_delay"], record["result_ttl"]) == (4, False, 9)
    push(store, spec(key="k", args=[9]))
    record = store.info(first)
    assert (record["args"], record["max_retry"], record["retry_delay"], record["result_ttl"]) == ([9], 1, False, None)
    assert queue(ra) == [first, other, renamed[1]]
    assert stats(ra)["pushed"] == 3


def test_a_delay_on_a_keyed_push_moves_its_waiting_task_between_queue_and_delayed(store, ra):
    ready, keyed = push(store, spec(args=[1]), spec(key="k"))
    now = float(ra.time()[0])
    assert push(store, spec(key="k", delay=60)) == [keyed]
    assert queue(ra) == [ready]
    assert field(ra, keyed, "state") == "delayed"
    assert ra.zscore(P + "delayed", keyed) == pytest.approx(now + 60, abs=2)
    assert float(field(ra, keyed, "eta")) == pytest.approx(now + 60, abs=2)
    # Pushed again ready, in a batch: it joins the queue after the batch's earlier tasks.
    store.add_waiter("poll-1", 30)
    wake = Channel(ra, "wake")
    later, again = push(store, spec(args=[2]), spec(key="k"))
    assert again == keyed and queue(ra) == [ready, later, keyed]
    assert wake.messages() == ["2"]
    assert field(ra, keyed, "state") == "queued" and ra.zcard(P + "delayed") == 0


def test_a_new_delayed_task_waits_in_the_delayed_set_with_its_eta(store, ra):
    now = float(ra.time()[0])
    (tid,) = push(store, spec(delay=30))
    assert queue(ra) == [] and field(ra, tid, "state") == "delayed"
    assert ra.zscore(P + "delayed", tid) == pytest.approx(now + 30, abs=2)
    assert float(field(ra, tid, "eta")) == pytest.approx(now + 30, abs=2)
    assert float(field(ra, tid, "created")) == pytest.approx(now, abs=2)


def test_a_push_wakes_registered_long_polls_with_the_count_it_did_not_lease(store, ra):
    push(store, spec(args=[0]))  # nobody waits: no wake-up
    wake = Channel(ra, "wake")
    push(store, spec(args=[1]))
    assert wake.messages() == []
    store.add_waiter("poll-1", 30)
    wake = Channel(ra, "wake")
    push(store, spec(args=[2]), spec(args=[3]), spec(args=[4], delay=30))
    assert wake.messages() == ["2"]
    wake = Channel(ra, "wake")
    push(store, spec(args=[5], delay=30))
    assert wake.messages() == []  # nothing ready: no wake-up (0 would wake every long-poll)
    wake = Channel(ra, "wake")
    ids, leased = store.push([spec(args=[6]), spec(args=[7])], lease_to=(WID, 4, 60, "*"))
    assert len(leased) == 4 and queue(ra) == ids  # the four that waited longest
    assert ra.zscore(P + "workers:seen", WID) is not None
    assert wake.messages() == []


# -- reap.lua -----------------------------------------------------------------------------------------------


def expire_all(store: Store, ra: redis.Redis) -> int:
    """Run the reaper: with lease_timeout=0 every lease has run out by then (the server's clock
    counts microseconds). Returns how many leases it handled."""
    return store.reap()[0]


def test_an_expired_lease_puts_its_task_back_at_the_front_of_the_queue(make_store, ra):
    store = make_store(lease_timeout=0)
    first, second = push(store, spec(args=[1]), spec(args=[2]))
    (task,) = lease(store, 1)
    wake = Channel(ra, "wake")
    assert expire_all(store, ra) == 1
    assert queue(ra) == [first, second]
    assert (field(ra, first, "state"), field(ra, first, "lease"), field(ra, first, "expiries")) == ("queued", None, "1")
    assert ra.zcard(P + "running") == 0 and stats(ra)["expired"] == 1
    assert wake.messages() == ["1"]
    assert store.report(WID, [ok(task)], 0, 60)[0] == [False]


def test_a_task_goes_dead_when_its_lease_expires_more_than_max_lease_expiries_times(make_store, ra):
    store = make_store(lease_timeout=0, max_lease_expiries=2)
    (tid,) = push(store, spec())
    store.watch([tid], 30)
    for n in (1, 2):
        lease(store)
        expire_all(store, ra)
        assert (field(ra, tid, "state"), field(ra, tid, "expiries")) == ("queued", str(n))
    lease(store)
    finished = Channel(ra, "finished")
    expire_all(store, ra)
    assert (field(ra, tid, "state"), field(ra, tid, "expiries")) == ("dead", "3")
    assert field(ra, tid, "error") == "LeaseExpired: the worker running it was lost 3 times"
    assert ra.zscore(P + "dead", tid) is not None and queue(ra) == []
    assert stats(ra)["dead"] == 1 and stats(ra)["expired"] == 3
    assert finished.messages() == [tid]


def test_an_expired_lease_of_a_task_asked_to_cancel_ends_it_cancelled(make_store, ra):
    store = make_store(lease_timeout=0)
    (tid,) = push(store, spec())
    lease(store)
    store.cancel(tid)
    expire_all(store, ra)
    assert field(ra, tid, "state") == "cancelled" and field(ra, tid, "finished") is not None
    assert queue(ra) == [] and ra.zcard(P + "dead") == 0


def test_the_reaper_takes_at_most_its_limit_and_skips_records_that_are_gone(make_store, ra):
    store = make_store(lease_timeout=0)
    ids = push(store, *(spec(args=[i]) for i in range(3)))
    lease(store, 3)
    ra.delete(P + "t:" + ids[0])
    assert store.reap(limit=2)[0] == 2
    assert ra.zcard(P + "running") == 1
    assert store.reap(limit=2)[0] == 1
    assert sorted(queue(ra)) == sorted(ids[1:])
    assert not ra.exists(P + "t:" + ids[0]) and stats(ra)["expired"] == 2


def test_the_reaper_sweeps_past_waits_old_rate_buckets_and_quiet_workers(store, ra):
    while True:
        now = float(ra.time()[0])
        bucket = int(now // 10)
        ra.zadd(P + "waiting", {"past": now - 1, "future": now + 60})
        ra.zadd(P + "waiters", {"past": now - 1, "future": now + 60})
        ra.hset(P + "rate", mapping={f"d:{bucket - 13}": 1, f"f:{bucket - 12}": 1, f"d:{bucket}": 1})
        ra.zadd(P + "workers:seen", {"quiet": now - 1, "alive": now + 60})
        ra.hset(P + "workers", mapping={"quiet": b"x", "alive": b"y"})
        wake = Channel(ra, "wake")
        store.reap()
        assert wake.messages() == []  # nothing was made ready: no wake-up (0 would wake every long-poll)
        if int(float(ra.time()[0]) // 10) == bucket:
            break  # else the clock crossed a bucket while the reaper ran: again
    assert ra.zrange(P + "waiting", 0, -1) == [b"future"]
    assert ra.zrange(P + "waiters", 0, -1) == [b"future"]
    assert sorted(ra.hkeys(P + "rate")) == sorted([f"f:{bucket - 12}".encode(), f"d:{bucket}".encode()])
    assert ra.zrange(P + "workers:seen", 0, -1) == [b"alive"]
    assert ra.hkeys(P + "workers") == [b"alive"]


# -- the master's checks on what workers and clients send (ppq/master/checks.py) -------------------------


def test_worker_ids_from_each_form_of_worker_info():
    assert worker_id_of({"id": "w"}) == "w"
    assert worker_id_of({"host": "box", "pid": 12}) == "box:12"
    assert worker_id_of({"host": "box"}) == "box:?" and worker_id_of({"pid": 7}) == "?:7"
    assert worker_id_of(["box", 12]) == "box:12"
    assert worker_id_of("w-2") == "w-2" and worker_id_of(5) == "5"
    for bad in ({"host": {"x": 1}, "pid": 1}, {"host": "h", "pid": [1]}, ["box", {"x": 1}], True, None, b"w",
                {"id": ""}, {"id": "x" * 201}, {"id": "a\x00b"}, ["x" * 201]):
        with pytest.raises(InvalidTaskError, match="worker_info"):
            worker_id_of(bad)
    assert worker_id_of({"id": "x" * 200}) == "x" * 200


def test_a_worker_entry_keeps_the_fields_ppq_reads_each_bounded():
    info = {"id": "w", "host": "h" * 300, "pool": 5, "pid": 2**53 - 1, "concurrency": 2**53, "done": True,
            "failed": float("inf"), "started": -1.5, "other": "dropped"}
    entry = worker_entry(info, 4096, address="a")
    assert entry == {"id": "w", "host": "h" * 255, "pid": 2**53 - 1, "started": -1.5, "address": "a", "running": [],
                     "allow": ["*"]}
    assert worker_entry(["h", 1], 4096) == {"id": "h:1", "running": [], "allow": ["*"]}


def test_a_worker_entry_lists_running_ids_within_its_size_limit():
    base = {"id": "w", "host": "h"}
    assert worker_entry({**base, "running": ["a" * 70, 5, "b"]}, 4096)["running"] == ["a" * 64, "b"]
    many = [f"task-{i:05d}" for i in range(150)]
    assert worker_entry({**base, "running": many}, 4096)["running"] == many[:100]
    assert worker_entry({**base, "running": tuple(many)}, 4096)["running"] == many[:100]
    # Each id costs its length and 2 bytes; the list and its key 12: a limit that fits k ids exactly.
    fixed = len(msgpack.packb({k: v for k, v in worker_entry(base, 4096).items() if k != "running"}))
    for k in (1, 5, 40):
        limit = fixed + 12 + k * (10 + 2)
        entry = worker_entry({**base, "running": many}, limit)
        assert entry["running"] == many[:k]
        assert len(msgpack.packb(entry)) <= limit


def test_push_tasks_stores_every_task_of_a_batch_longer_than_one_checked_run(call, ra):
    ids = call("push_tasks", [{"func": "add", "module": "tasks", "args": [i, i]} for i in range(150)])
    assert len(set(ids)) == 150 and ra.lrange(P + "queue", 0, -1) == [i.encode() for i in ids]


def test_push_tasks_counts_the_bytes_of_every_run_of_a_batch_and_its_keys(master, ra):
    """64 tasks of 200 KiB pass one check together; 100 of them, 20 MB, are over 16 MiB; so are
    tasks whose bodies are just under it when 800 keys of 512 bytes are added."""
    # Four strings, each sent once and referred back to (marshal allows each about 30 such references).
    parts = [letter * (200 * 1024) for letter in "wxyz"]
    key = "k" * 512
    made = iter(range(10**6))

    def big() -> dict[str, Any]:
        return {"func": "echo", "module": "tasks", "args": [parts[next(made) % 4]]}

    limit = LIMITS.max_message
    # Bodies within 150-355 kB of the limit, and 800 keys of 512 bytes to go over it.
    n = (limit - 150_000) // len(check_push(big(), [0], LIMITS).body)
    with make_proxy(master.uri, timeout=30) as proxy:
        proxy._pyroSerializer = "marshal"  # each string goes once: the message stays small
        with pytest.raises(InvalidTaskError, match=r"^tasks: .*limits\.max_message"):
            proxy.push_tasks([big() for _ in range(100)])
        with pytest.raises(InvalidTaskError, match=r"^tasks: .*limits\.max_message"):
            proxy.push_tasks([big() for _ in range(n)]
                             + [{"func": "echo", "module": "tasks", "args": [i], "key": key} for i in range(800)])
    assert ra.keys("*") == []


def test_requeue_and_purge_dead_take_one_id_as_a_list_of_one(call, ra):
    tid = call("push_task", "boom", module="tasks", max_retry=0)
    task = call("get_task", {"id": WID}, 0)
    call("task_error", tid, {"id": WID}, 0, error="E", lease=task["lease"])
    assert call("requeue_dead", tid, 0) == [tid]
    assert field(ra, tid, "state") == "queued"
    with pytest.raises(InvalidTaskError, match="task_ids"):
        call("requeue_dead", [], 0)
    assert call("purge_dead", "nothing-dead", 0) == 0


def test_a_master_that_allows_pickle_takes_it_in_a_batch_and_bounds_dead_ids_at_max_batch(make_master, ra):
    server = make_master(master__allow_pickle=True, limits__max_batch=3)
    call = PyroFunc(server.uri)
    try:
        (tid,) = call("push_tasks", [{"func": "add", "module": "tasks", "parameters": pickle.dumps(([2, 3], {}))}])
        assert codec.is_pickle(store_params(ra, tid))
        assert call("purge_dead", ["a", "b", "c"], 0) == 0
        with pytest.raises(InvalidTaskError, match="task_ids"):
            call("purge_dead", ["a", "b", "c", "d"], 0)
    finally:
        call.close()


def store_params(ra: redis.Redis, task_id: str) -> bytes:
    return decode_body(ra.hget(P + "t:" + task_id, "body"))["params"]


def test_a_report_without_error_text_stores_none_and_a_non_string_is_refused_naming_its_field(call, ra):
    tid = call("push_task", "boom", module="tasks", max_retry=0)
    task = call("get_task", {"id": WID}, 0)
    with pytest.raises(InvalidTaskError, match=r"^error must be a string, got int"):
        call("task_error", tid, {"id": WID}, 0, error=5, lease=task["lease"])
    with pytest.raises(InvalidTaskError, match=r"^traceback must be a string, got list"):
        call("task_error", tid, {"id": WID}, 0, error="E", traceback=[1], lease=task["lease"])
    assert field(ra, tid, "state") == "running"
    call("task_error", tid, {"id": WID}, 0, error="E", traceback=None, lease=task["lease"])
    assert (field(ra, tid, "state"), field(ra, tid, "error"), field(ra, tid, "traceback")) == ("dead", "E", "")


# -- long-polls and waits (ppq/master/waiting.py) ---------------------------------------------------------


def in_thread(target: Any, *args: Any) -> tuple[Any, list[Any]]:
    import threading

    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(target(*args)), daemon=True)
    thread.start()
    return thread, out


def test_release_worker_ends_its_long_poll_at_once(master, ra):
    poller, control = PyroFunc(master.uri), PyroFunc(master.uri)
    try:
        started = time.monotonic()
        thread, out = in_thread(poller, "get_tasks", {"id": WID}, 0, 1, 20)
        wait_for(lambda: ra.zcard(P + "waiters") == 1, timeout=10, what="the long-poll registered")
        wait_for(lambda: control("release_worker", {"id": WID}, 0) == 1, timeout=10, what="the long-poll released")
        thread.join(5)
        assert out == [[]] and time.monotonic() - started < 10
        # Leaving: off the list of live workers at once.
        control("heartbeat", {"id": WID, "host": "h"}, 0, [])
        assert [w["id"] for w in control("server_info")[0]["workers"]] == [WID]
        assert control("release_worker", {"id": WID}, 0, True) == 0
        assert control("server_info")[0]["workers"] == [] and ra.hlen(P + "workers") == 0
        assert ra.zscore(P + "workers:seen", WID) is None
    finally:
        poller.close()
        control.close()


def test_a_refused_report_does_not_stop_the_same_call_leasing(call, ra):
    done, waiting = (call("push_task", "add", module="tasks", args=[i, i]) for i in range(2))
    task = call("get_task", {"id": WID}, 0)
    call("task_finish", done, {"id": WID}, 0, result=1, lease=task["lease"])
    reply = call("report", {"id": WID}, 0, [{"id": done, "lease": task["lease"], "ok": True, "result": 2}], 1, 0)
    assert reply["accepted"] == [False] and [t["id"] for t in reply["tasks"]] == [waiting]


def test_wait_task_returns_as_soon_as_its_task_ends(master, call, ra):
    tid = call("push_task", "add", module="tasks", args=[1, 2])
    task = call("get_task", {"id": WID}, 0)
    waiter = PyroFunc(master.uri)
    try:
        started = time.monotonic()
        thread, out = in_thread(waiter, "wait_task", tid, 0, 20)
        wait_for(lambda: ra.zcard(P + "waiting") == 1, timeout=10, what="wait_task watching")
        # Let its first look find the task running, so that the end arrives while it waits (the test
        # passes either way; only this order checks the wait itself).
        time.sleep(0.3)
        call("task_finish", tid, {"id": WID}, 0, result=3, lease=task["lease"])
        thread.join(10)
        assert out and out[0]["state"] == "done" and out[0]["result"] == 3
        assert time.monotonic() - started < 4  # woken by the finished message, not the 5 s re-check
    finally:
        waiter.close()


def test_dead_tasks_pages_through_the_dead_list_newest_first(store, ra):
    ids = push(store, *(spec(args=[i], max_retry=0) for i in range(3)))
    for task in lease(store, 3):
        store.report(WID, [error(task)], 0, 60)
    ra.zadd(P + "dead", {tid: n for n, tid in enumerate(ids)})  # distinct times of death
    assert [d["id"] for d in store.dead(limit=2, offset=0)] == [ids[2], ids[1]]
    assert [d["id"] for d in store.dead(limit=2, offset=2)] == [ids[0]]
    assert [d["id"] for d in store.dead(limit=1, offset=1)] == [ids[1]]


# -- records.py: what the master reads back ----------------------------------------------------------------


def test_counts_read_absent_counters_as_zero_and_the_rate_over_the_last_six_buckets():
    counts = counts_of({"queued": 0}, {}, {b"d:94": b"5", b"d:95": b"1", b"f:100": b"2", b"x:100": b"9"}, 1000)
    assert [counts[name] for name in ("pushed", "leased", "done", "errors", "failed")] == [0] * 5
    assert (counts["done_per_min"], counts["failed_per_min"]) == (1, 2)


def test_a_record_says_whether_it_has_a_result_and_keeps_one_it_cannot_decode(store, ra):
    done, bad, waiting = push(store, spec(args=[1]), spec(args=[2]), spec(args=[3]))
    tasks = {t["id"]: t for t in lease(store, 2)}
    store.report(WID, [ok(tasks[done])], 0, 60)
    ra.hset(P + "t:" + bad, "result", b"\xc1")  # not msgpack
    assert (store.info(done)["has_result"], store.info(done)["result"]) == (True, 3)
    assert store.info(waiting)["has_result"] is False
    record = store.info(bad)
    assert (record["has_result"], record["result"], record["result_pickled"]) == (True, None, b"\xc1")


# -- the worker's reporter (ppq/worker/reporter.py) ---------------------------------------------------------


def test_a_stopping_worker_whose_master_is_gone_gives_up_its_reports_and_exits(spawn, redis_a, ra):
    master, address = spawn.master(redis_a.url)
    call = PyroFunc(address)
    try:
        tid = call("push_task", "sleep_then", module="tasks", args=[1.5, "x"])
        worker = spawn.worker(address)
        wait_for(lambda: field(ra, tid, "state") == "running", what="the task running")
    finally:
        call.close()
    master.kill()
    master.wait(10)
    worker.send_signal(signal.SIGTERM)
    # It finishes the task, cannot report it, and stops trying 10 s later (the lease expires; it reruns).
    assert worker.wait(40) is not None
    assert "could not report 1 task(s) before stopping" in spawn.log(worker)
    assert field(ra, tid, "state") == "running"
