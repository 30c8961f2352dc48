"""Routing: a task is leased only to a worker that allows its module. Workers send their allow
list with every call; a lease moves tasks its worker may not run aside, to one list per module
that workers allowing the module lease first; a task no live worker allows stays queued and
says so (server_info, get_task_info, ``ppq status``, ``ppq task``).

The first tests call the master as workers would (an in-process master, the worker's calls
made by hand); the last ones run real ``ppq worker`` processes and the real CLI.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from ppq.errors import InvalidTaskError
from ppq.store.scripts import read
from ppq.task import encode_body

from .conftest import REPO, TESTS_DIR, address_of, redis_snapshot, run_ppq, wait_for, wait_state


def worker(name: str, *allow: str) -> dict[str, Any]:
    """The light worker_info of a worker that allows ``allow``."""
    return {"id": name, "allow": list(allow), "heartbeat_interval": 0.5}


def lease(call, who: dict[str, Any], want: int = 100, wait: float = 0) -> list[dict[str, Any]]:
    return list(call("report", who, 0, [], want, wait)["tasks"])


def push(call, module: str, *args: Any, **options: Any) -> str:
    return str(call("push_task", "add", module=module, args=list(args), **options))


def done(call, who: dict[str, Any], tasks: list[dict[str, Any]]) -> None:
    reports = [{"id": t["id"], "lease": t["lease"], "ok": True, "result": None} for t in tasks]
    assert call("report", who, 0, reports, 0, 0)["accepted"] == [True] * len(tasks)


def test_each_worker_leases_only_the_modules_it_allows_in_push_order(call, ra):
    pushed = {"tasks": [], "other.jobs": []}
    for i in range(10):
        module = "tasks" if i % 3 else "other.jobs"
        pushed[module].append(push(call, module, i, 0))
    a, b = worker("a", "tasks"), worker("b", "other")  # "other" allows other.jobs: whole dotted segments
    got_a = lease(call, a)
    assert [t["id"] for t in got_a] == pushed["tasks"]
    assert {t["module"] for t in got_a} == {"tasks"}
    # a moved the others aside, in queue order; b takes them from there.
    assert ra.zrange("ppq:0:parked", 0, -1) == [b"other.jobs"]
    assert call("server_info")[0]["queued"] == len(pushed["other.jobs"])
    got_b = lease(call, b)
    assert [t["id"] for t in got_b] == pushed["other.jobs"]
    assert lease(call, a) == [] and lease(call, b) == []
    assert call("server_info")[0]["queued"] == 0 and call("server_info")[0]["leased"] == 10


def test_order_within_a_module_is_kept_across_the_side_list_and_the_queue(call):
    a, b = worker("a", "tasks"), worker("b", "other")
    first = [push(call, "other", i) for i in range(3)]
    assert lease(call, a, 1) == []  # moves the three aside
    later = [push(call, "other", i) for i in range(3, 6)]
    own = push(call, "tasks", 1, 2)
    more = call("push_tasks", [{"func": "add", "module": "other", "args": [i]} for i in range(6, 9)])
    assert [t["id"] for t in lease(call, b, 4)] == first + later[:1]
    assert [t["id"] for t in lease(call, a, 5)] == [own]
    assert [t["id"] for t in lease(call, b, 10)] == later[1:] + more


def test_a_worker_allowing_everything_takes_tasks_moved_aside_first(call):
    aside = [push(call, "other", i) for i in range(3)]
    assert lease(call, worker("a", "tasks")) == []
    fresh = push(call, "tasks", 1, 1)
    assert [t["id"] for t in lease(call, worker("any", "*"))] == [*aside, fresh]
    # A caller that does not say what it allows (a plain Pyro5 client, an older worker) runs anything.
    ids = [push(call, "other", 1), push(call, "tasks", 2)]
    assert [t["id"] for t in lease(call, worker("a", "tasks"))] == ids[1:]
    assert [t["id"] for t in call("get_tasks", {"id": "plain"}, 0, 10)] == ids[:1]


@pytest.mark.parametrize(("func", "module"), [
    ("add", "tasks"), ("f" * 40, "m" * 40), ("g", "a." * 99 + "b"), ("h" * 200, "pkg.mod"),
])
def test_the_store_reads_a_tasks_module_from_its_body(ra, func, module):
    script = read("module.lua") + "\nreturn module_of(ARGV[1])"
    body = encode_body(func, module, "", "", "", b"\x92\x90\x80", None, 1)
    assert ra.eval(script, 0, body) == module.encode()


@pytest.mark.parametrize("body", [b"", b"\x88", b"\x88\xa1f\xa3add", b"\x88\xa1f\xa3add\xa1x\xa1y", b"\x81\xa1m\xa1y",
                                  b"\x88\xa1f\xffadd", b"\x88\xa1f\xd9"])
def test_a_body_laid_out_otherwise_has_no_module(ra, body):
    assert ra.eval(read("module.lua") + "\nreturn module_of(ARGV[1])", 0, body) is None


def test_a_task_whose_body_names_no_module_the_store_can_read_goes_to_any_worker(call, ra):
    tid = push(call, "other", 1)
    # The same fields in another order: module_of does not read it.
    body = msgpack.packb({"m": "other", "f": "add", "a": msgpack.packb([[1], {}])})
    ra.hset(f"ppq:0:t:{tid}", "body", body)
    got = lease(call, worker("a", "tasks"))
    assert [(t["id"], t["module"]) for t in got] == [(tid, "other")]


def test_a_task_no_live_worker_allows_waits_and_says_so(call, ra):
    a = worker("a", "tasks")
    call("heartbeat", a, 0, [])
    waiting = [push(call, "nobody.mod", i) for i in range(3)]
    runs = push(call, "tasks", 1, 2)
    assert [t["id"] for t in lease(call, a)] == [runs]
    info = call("server_info")[0]
    assert info["queued"] == 3 and info["parked"] == {"nobody.mod": 3}
    assert info["waiting_for"] == {"nobody.mod": 3}
    assert [w["allow"] for w in info["workers"]] == [["tasks"]]
    record = call("get_task_info", waiting[0])
    assert record["state"] == "queued" and record["waiting_for"] == "a worker that allows nobody.mod"
    # A worker that allows it: no longer shown as waiting for one, and it gets the tasks.
    b = worker("b", "nobody")
    call("heartbeat", b, 0, [])
    wait_for(lambda: "waiting_for" not in call("get_task_info", waiting[0]), timeout=5, what="allow lists re-read")
    assert call("server_info")[0]["waiting_for"] == {}
    assert [t["id"] for t in lease(call, b)] == waiting
    assert call("server_info")[0]["parked"] == {} and ra.zcard("ppq:0:parked") == 0


def test_cancel_takes_a_task_out_of_its_side_list(call, ra):
    ids = [push(call, "other", i) for i in range(3)]
    assert lease(call, worker("a", "tasks")) == []
    assert call("cancel_task", ids[1]) == "queued"
    assert call("get_task_info", ids[1])["state"] == "cancelled"
    assert [i.decode() for i in ra.lrange("ppq:0:queue:m:other", 0, -1)] == [ids[0], ids[2]]
    assert call("server_info")[0]["queued"] == 2
    for tid in (ids[0], ids[2]):
        assert call("cancel_task", tid) == "queued"
    assert not ra.exists("ppq:0:queue:m:other") and ra.zcard("ppq:0:parked") == 0
    assert call("server_info")[0]["queued"] == 0 and lease(call, worker("b", "other")) == []


def test_a_key_update_that_changes_the_module_routes_the_task_again(call, ra):
    tid = push(call, "other", 1, key="k1")
    assert lease(call, worker("a", "tasks")) == []
    assert ra.lrange("ppq:0:queue:m:other", 0, -1) == [tid.encode()]
    assert push(call, "tasks", 2, 3, key="k1") == tid  # the same waiting task, now of module tasks
    assert not ra.exists("ppq:0:queue:m:other")
    got = lease(call, worker("a", "tasks"))
    assert [t["id"] for t in got] == [tid] and got[0]["module"] == "tasks"
    # Delayed by a later push with the same key: it leaves the side list for the delayed set.
    tid = push(call, "other", 1, key="k2")
    assert lease(call, worker("a", "tasks")) == []
    assert push(call, "other", 1, key="k2", delay=60) == tid
    assert not ra.exists("ppq:0:queue:m:other") and ra.zscore("ppq:0:delayed", tid) is not None
    assert call("get_task_info", tid)["state"] == "delayed"


def test_a_lease_moves_at_most_1000_ids_aside_per_script_and_the_master_asks_again(call, ra):
    foreign = call("push_tasks", [{"func": "add", "module": "other", "args": [i]} for i in range(2500)])
    own = push(call, "tasks", 1, 2)
    assert [t["id"] for t in lease(call, worker("a", "tasks"), 1)] == [own]
    assert ra.llen("ppq:0:queue:m:other") == 2500 and ra.llen("ppq:0:queue") == 0
    assert [t["id"] for t in lease(call, worker("b", "other"), 3000)] == foreign


def test_requeued_and_expired_tasks_are_routed_again(make_master):
    server = make_master(master__lease_timeout=0.3, master__max_lease_expiries=5)
    from ppq import PyroFunc

    call = PyroFunc(server.uri)
    try:
        tid = push(call, "other", 1)
        b = worker("b", "other")
        assert [t["id"] for t in lease(call, b)] == [tid]
        # b is lost: the lease expires, the reaper puts the task back at the front of the queue.
        wait_state(call, tid, "queued", timeout=10)
        assert lease(call, worker("a", "tasks")) == []
        assert [t["id"] for t in lease(call, b)] == [tid]
    finally:
        call.close()


@pytest.mark.parametrize("allow", [
    "tasks", ["a b"], ["tasks."], [".tasks"], ["x"] * 65, ["m" * 1001], [1], [["tasks"]], {"tasks": 1}, ["ta\x00sks"],
])
def test_a_bad_allow_list_is_refused_naming_the_field_and_changes_nothing(call, ra, rb, allow):
    push(call, "tasks", 1, 2)
    before = redis_snapshot(ra, rb)
    with pytest.raises(InvalidTaskError, match="worker_info: allow must be a list"):
        call("report", {"id": "w", "allow": allow}, 0, [], 1, 0)
    with pytest.raises(InvalidTaskError, match="worker_info: allow must be a list"):
        call("heartbeat", {"id": "w", "allow": allow}, 0, [])
    assert redis_snapshot(ra, rb) == before


def test_a_push_hands_its_task_only_to_a_long_poll_that_allows_it(call, master):
    got: dict[str, list[dict[str, Any]]] = {}

    def poll(who: dict[str, Any]) -> None:
        from ppq import PyroFunc

        own = PyroFunc(master.uri)
        try:
            got[who["id"]] = lease(own, who, 1, 5)
        finally:
            own.close()

    threads = [threading.Thread(target=poll, args=(w,)) for w in (worker("a", "tasks"), worker("b", "other"))]
    for t in threads:
        t.start()
    waker = master.master.wakers[0]
    wait_for(lambda: len(waker.idle) == 2, timeout=10, what="two long-polls waiting")
    tid = push(call, "other", 1)
    threads[1].join(10)
    assert [t["id"] for t in got["b"]] == [tid]
    threads[0].join(10)
    assert got["a"] == []


def test_a_wake_up_from_another_master_reaches_a_long_poll_that_allows_the_task(make_master):
    from ppq import PyroFunc

    first, second = make_master(), make_master()
    got: dict[str, tuple[list[dict[str, Any]], float]] = {}

    def poll(who: dict[str, Any]) -> None:
        own = PyroFunc(first.uri, timeout=30)
        started = time.monotonic()
        try:
            got[who["id"]] = (lease(own, who, 1, 10), time.monotonic() - started)
        finally:
            own.close()

    # Several long-polls that may not run the task wait longer than the one that may.
    who = [worker(f"a{i}", "tasks") for i in range(3)] + [worker("b", "other")]
    threads = [threading.Thread(target=poll, args=(w,)) for w in who]
    waker = first.master.wakers[0]
    for t in threads:
        t.start()
        wait_for(lambda n=len(waker.idle) + 1: len(waker.idle) >= n, timeout=10, what="the long-poll waiting")
    pusher = PyroFunc(second.uri)
    try:
        tid = push(pusher, "other", 1)  # pushed elsewhere: this master hears a published count of 1
    finally:
        pusher.close()
    threads[-1].join(15)
    tasks, took = got["b"]
    assert [t["id"] for t in tasks] == [tid]
    assert took < 8, took  # woken, not answered by its 10 s timeout
    for t in threads[:-1]:
        t.join(15)
    assert all(got[w["id"]][0] == [] for w in who[:-1])


# -- real workers and the real CLI ------------------------------------------------------------------


def write_module(directory: Path, name: str) -> None:
    directory.mkdir(exist_ok=True)
    (directory / f"{name}.py").write_text(
        "import os\n\n\ndef pid():\n    return os.getpid()\n\n\ndef add(a, b):\n    return a + b\n")


def start_worker(spawn, master, allow: str, modules: Path):
    return spawn.worker(address_of(master), allow=allow,
                        env={"PYTHONPATH": os.pathsep.join([str(modules), str(TESTS_DIR), str(REPO)])})


def test_two_workers_with_different_allow_lists_each_run_only_their_tasks(master, call, spawn, tmp_path):
    modules = tmp_path / "modules"
    write_module(modules, "routed_b")
    ids = {"tasks": [], "routed_b": []}
    for i in range(40):
        module = "tasks" if i % 2 else "routed_b"
        ids[module].append(call("push_task", "pid", module=module, max_retry=0))
    a = start_worker(spawn, master, "tasks", modules)
    b = start_worker(spawn, master, "routed_b", modules)
    for module, proc in (("tasks", a), ("routed_b", b)):
        for tid in ids[module]:
            info = wait_state(call, tid, ("done", "dead"))
            assert info["state"] == "done", info
            # Run by the worker that allows the module: its id is host:pid:suffix.
            assert info["worker"].split(":")[1] == str(proc.pid), (module, info["worker"])
    info = call("server_info")[0]
    assert info["dead"] == 0 and info["done"] == 40 and info["queued"] == 0


def test_a_task_no_worker_allows_waits_visibly_then_runs_when_one_does(master, call, spawn, tmp_path):
    modules = tmp_path / "modules"
    write_module(modules, "routed_c")
    start_worker(spawn, master, "tasks", modules)
    waiting = call("push_tasks", [{"func": "add", "module": "routed_c", "args": [i, 1]} for i in range(6)])
    ran = call("push_task", "add", module="tasks", args=[1, 1])
    assert wait_state(call, ran, "done")["result"] == 2
    wait_for(lambda: call("server_info")[0]["waiting_for"] == {"routed_c": 6}, what="routed_c shown as waiting")
    cancelled = waiting.pop(2)
    address = address_of(master)
    status = run_ppq("status", "-m", address)
    assert status.returncode == 0, status.stderr
    assert "waiting for a worker that allows routed_c: 6 task(s)" in status.stdout, status.stdout
    shown = run_ppq("task", waiting[0], "-m", address)
    assert shown.returncode == 0, shown.stderr
    assert "waiting for a worker that allows routed_c" in shown.stdout, shown.stdout
    assert call("cancel_task", cancelled) == "queued"
    assert call("get_task_info", cancelled)["state"] == "cancelled"
    start_worker(spawn, master, "routed_c", modules)
    infos = [wait_state(call, tid, ("done", "dead")) for tid in waiting]
    assert [(i["state"], i["result"]) for i in infos] == [("done", n + 1) for n in (0, 1, 3, 4, 5)]
    # One executor: they ran in the order they were pushed.
    assert [i["started"] for i in infos] == sorted(i["started"] for i in infos)
    assert call("get_task_info", cancelled)["state"] == "cancelled"
    assert call("server_info")[0]["waiting_for"] == {}


def test_tasks_of_many_modules_moved_aside_cost_a_lease_only_the_modules_it_allows(call, ra):
    modules = [f"m{i}" for i in range(3000)]
    foreign = call("push_tasks", [{"func": "add", "module": m, "args": [1, 2]} for m in modules])
    own = push(call, "tasks", 1, 2)
    assert [t["id"] for t in lease(call, worker("a", "tasks"), 5)] == [own]
    assert ra.zcard("ppq:0:parked") == 3000 and int(ra.hget("ppq:0:stats", "parked")) == 3000
    info = call("server_info")[0]
    assert info["queued"] == 3000 and len(info["parked"]) == 1000  # the first 1000 modules by name are listed
    # m5 allows m5 only (not m50...): whole dotted segments.
    assert [t["id"] for t in lease(call, worker("b", "m5"), 10)] == [foreign[5]]
    got = lease(call, worker("any", "*"), 5000)
    assert sorted(t["id"] for t in got) == sorted(foreign[:5] + foreign[6:])
    assert ra.zcard("ppq:0:parked") == 0 and int(ra.hget("ppq:0:stats", "parked")) == 0
    assert call("server_info")[0]["queued"] == 0
