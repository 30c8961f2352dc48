"""Parked long-polls: a worker's ``report(..., want, wait)`` that finds nothing waits without a
thread (its reply held, ppq/master/waiting.py), and is answered by a push, a wake-up from
another master, its deadline, release_worker, or dropped when its client goes away."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import redis

from ppq.codec import decode_parameters
from ppq.master import MasterServer
from ppq.rpc import PyroFunc

from .conftest import TESTS_DIR, Spawner, address_of, finish_fake_agents, wait_for

W1 = {"id": "parked-worker-1", "heartbeat_interval": 5}
W2 = {"id": "parked-worker-2", "heartbeat_interval": 5}


def _report_poll(server: MasterServer, worker: dict[str, Any], want: int, wait: float, out: dict[str, Any],
                 queue_index: int = 0) -> threading.Thread:
    """The worker agent's long-poll, ``report(info, qi, [], want, wait)``, in a thread with its own
    connection; the reply and how long it took land in ``out``."""
    def run() -> None:
        caller = PyroFunc(server.uri, timeout=wait + 10)
        try:
            started = time.monotonic()
            out["reply"] = caller("report", worker, queue_index, [], want, wait)
            out["seconds"] = time.monotonic() - started
        except Exception as exc:  # noqa: BLE001 - the test asserts on it
            out["error"] = exc
        finally:
            caller.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _parked(server: MasterServer, count: int = 1) -> bool:
    """True once ``count`` long-polls are parked in ``server`` (their look at the queue is over)."""
    return server.master._parked == count and sum(len(w.idle) for w in server.master.wakers.values()) == count


def test_parked_long_poll_is_answered_by_a_push_with_its_tasks(make_master: Callable[..., MasterServer],
                                                              ra: redis.Redis) -> None:
    server = make_master()
    out: dict[str, Any] = {}
    thread = _report_poll(server, W1, 2, 20, out)
    wait_for(lambda: _parked(server), what="the long-poll to park")
    call = PyroFunc(server.uri)
    try:
        ids = call("push_tasks", [{"func": "add", "module": "tasks", "args": [i, i]} for i in range(3)])
        thread.join(15)
        assert not thread.is_alive() and out["seconds"] < 10, out
        reply = out["reply"]
        assert reply["accepted"] == [] and "failed" not in reply
        assert [t["id"] for t in reply["tasks"]] == ids[:2]
        assert [decode_parameters(t["parameters"]) for t in reply["tasks"]] == [([0, 0], {}), ([1, 1], {})]
        for task in reply["tasks"]:
            assert ra.hget(f"ppq:0:t:{task['id']}", "state") == b"running"
            assert ra.hget(f"ppq:0:t:{task['id']}", "worker") == W1["id"].encode()
            assert task["lease"] == ra.hget(f"ppq:0:t:{task['id']}", "lease").decode()
        wait_for(lambda: server.master._parked == 0, timeout=5, what="the parked count to settle")
        # The connection serves its next call as usual, and the leases are good.
        done = call("report", W1, 0, [{"id": t["id"], "lease": t["lease"], "ok": True, "result": 1}
                                      for t in reply["tasks"]], 0, 0)
        assert done["accepted"] == [True, True]
    finally:
        call.close()


def test_a_master_wakes_its_own_long_polls_and_publishes_a_wake_up_only_for_other_masters(
        make_master: Callable[..., MasterServer], ra: redis.Redis) -> None:
    """Two long-polls parked on one master get one task each of a push of two (the first handed
    over in the push, the other woken by the master itself), with no wake-up published: no other
    master waits. With a long-poll parked on another master, a push publishes one, and that
    long-poll gets the task."""
    here, other = make_master(), make_master()
    wake = ra.pubsub(ignore_subscribe_messages=True)
    wake.subscribe("ppq:0:wake")
    outs: list[dict[str, Any]] = [{}, {}]
    threads = [_report_poll(here, W1, 1, 20, outs[0]), _report_poll(here, W2, 1, 20, outs[1])]
    wait_for(lambda: _parked(here, 2), what="two long-polls to park")
    call = PyroFunc(here.uri)
    try:
        ids = call("push_tasks", [{"func": "add", "module": "tasks", "args": [i, i]} for i in range(2)])
        for thread in threads:
            thread.join(15)
            assert not thread.is_alive()
        assert sorted(t["id"] for out in outs for t in out["reply"]["tasks"]) == sorted(ids)
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert wake.get_message(timeout=0.1) is None, "a wake-up was published with no other master waiting"
        out: dict[str, Any] = {}
        thread = _report_poll(other, {"id": "parked-worker-3", "heartbeat_interval": 5}, 1, 20, out)
        wait_for(lambda: _parked(other), what="the other master's long-poll to park")
        task_id = call("push_task", "add", module="tasks", args=[5, 5])
        thread.join(15)
        assert not thread.is_alive() and [t["id"] for t in out["reply"]["tasks"]] == [task_id]
        message = wait_for(lambda: wake.get_message(timeout=0.1), timeout=5, what="the wake-up for the other master")
        assert message["data"] == b"1"
    finally:
        call.close()
        wake.close()


def test_parked_long_poll_is_woken_by_a_push_on_another_master(make_master: Callable[..., MasterServer],
                                                               ra: redis.Redis) -> None:
    waiting, other = make_master(), make_master()
    out: dict[str, Any] = {}
    thread = _report_poll(waiting, W1, 1, 20, out)
    wait_for(lambda: _parked(waiting), what="the long-poll to park")
    call = PyroFunc(other.uri)
    try:
        started = time.monotonic()
        task_id = call("push_task", "add", module="tasks", args=[1, 2])
        thread.join(15)
        assert not thread.is_alive() and time.monotonic() - started < 5, out
        assert [t["id"] for t in out["reply"]["tasks"]] == [task_id]
        assert call("get_task_info", task_id)["state"] == "running"
        wait_for(lambda: waiting.master._parked == 0, timeout=5, what="the parked count to settle")
    finally:
        call.close()


def test_parked_long_poll_replies_empty_at_its_deadline_not_sooner(make_master: Callable[..., MasterServer],
                                                                  ra: redis.Redis) -> None:
    server = make_master()
    out: dict[str, Any] = {}
    thread = _report_poll(server, W1, 1, 1.5, out)
    wait_for(lambda: _parked(server), what="the long-poll to park")
    thread.join(10)
    assert not thread.is_alive()
    assert out["reply"] == {"accepted": [], "tasks": []}
    assert 1.5 <= out["seconds"] < 4, out
    wait_for(lambda: server.master._parked == 0 and not server.master.wakers[0].idle, timeout=5,
             what="the parked count to settle")


def test_release_worker_ends_its_parked_long_poll_at_once(make_master: Callable[..., MasterServer],
                                                          ra: redis.Redis) -> None:
    server = make_master()
    mine: dict[str, Any] = {}
    others: dict[str, Any] = {}
    threads = [_report_poll(server, W1, 1, 20, mine), _report_poll(server, W2, 1, 4, others)]
    wait_for(lambda: _parked(server, 2), what="two long-polls to park")
    call = PyroFunc(server.uri)
    try:
        assert call("release_worker", W1, 0) == 1
        threads[0].join(5)
        assert not threads[0].is_alive()
        assert mine["reply"] == {"accepted": [], "tasks": []} and mine["seconds"] < 3
        # The other worker's long-poll still waits, and is the one a push goes to.
        assert _parked(server, 1)
        task_id = call("push_task", "add", module="tasks", args=[1, 2])
        threads[1].join(5)
        assert [t["id"] for t in others["reply"]["tasks"]] == [task_id]
    finally:
        call.close()


def test_master_stop_ends_parked_long_polls(make_master: Callable[..., MasterServer], ra: redis.Redis) -> None:
    server = make_master()
    out: dict[str, Any] = {}
    thread = _report_poll(server, W1, 1, 20, out)
    wait_for(lambda: _parked(server), what="the long-poll to park")
    server.stop()
    thread.join(10)
    assert not thread.is_alive()
    # Answered empty as the master stopped, or cut with it: in no case left waiting its 20 s.
    assert out.get("reply") == {"accepted": [], "tasks": []} or "error" in out, out


def test_long_polls_past_max_waiters_wait_in_a_thread(make_master: Callable[..., MasterServer],
                                                      ra: redis.Redis) -> None:
    """Past master.max_waiters a long-poll is not parked: it waits in its thread, as before
    (not answered at once: the agent would ask again at once), and a push still reaches it."""
    server = make_master(master__max_waiters=2)
    outs: list[dict[str, Any]] = [{}, {}, {}]
    threads = [_report_poll(server, {"id": f"w{i}"}, 1, 20, outs[i]) for i in range(2)]
    wait_for(lambda: _parked(server, 2), what="two long-polls to park")
    threads.append(_report_poll(server, {"id": "w2"}, 1, 20, outs[2]))
    wait_for(lambda: len(server.master.wakers[0].idle) == 3, what="the third long-poll to wait")
    assert server.master._parked == 2 and "reply" not in outs[2]
    call = PyroFunc(server.uri)
    try:
        for i in range(2):
            assert call("release_worker", {"id": f"w{i}"}, 0) == 1
        for thread in threads[:2]:
            thread.join(5)
            assert not thread.is_alive()
        wait_for(lambda: server.master._parked == 0, timeout=5, what="the parked count to settle")
        task_id = call("push_task", "add", module="tasks", args=[1, 2])
        threads[2].join(5)
        assert not threads[2].is_alive()
        assert [t["id"] for t in outs[2]["reply"]["tasks"]] == [task_id]
    finally:
        call.close()


def test_parked_long_poll_of_a_client_that_goes_away_is_freed(make_master: Callable[..., MasterServer],
                                                               ra: redis.Redis) -> None:
    """20 fake agents (a process of tests/fake_agents.py) long-poll for 30 s; killed, their
    connections close, and the master frees their waiters at once, not at their deadline;
    a task pushed next is not leased to any of them."""
    server = make_master()
    agents = subprocess.Popen([sys.executable, str(TESTS_DIR / "fake_agents.py"), f"PYRO:queue@{address_of(server)}",
                               "20", "--queue-index", "0", "--wait", "30", "--heartbeat", "30"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert agents.stdout is not None
        assert agents.stdout.readline().split() == ["READY", "20", "0"]
        wait_for(lambda: _parked(server, 20), what="20 long-polls to park")
        os.kill(agents.pid, signal.SIGKILL)
        agents.wait(10)
        started = time.monotonic()
        wait_for(lambda: server.master._parked == 0 and not server.master.wakers[0].idle, timeout=10,
                 what="the gone agents' waiters to be freed")
        assert time.monotonic() - started < 10
        call = PyroFunc(server.uri)
        try:
            task_id = call("push_task", "add", module="tasks", args=[1, 2])
            assert call("get_task_info", task_id)["state"] == "queued"
        finally:
            call.close()
    finally:
        if agents.poll() is None:
            agents.kill()
        agents.wait(10)
        if agents.stdout is not None:
            agents.stdout.close()
        if agents.stdin is not None:
            agents.stdin.close()


def test_500_parked_long_polls_hold_no_threads(spawn: Spawner, redis_a: Any, redis_b: Any, ra: redis.Redis,
                                               rb: redis.Redis) -> None:
    """500 fake agents (2 processes x 250, one connection each) long-poll an empty queue_index 1
    of a master whose pool has at most 32 threads: every long-poll is held its whole wait at
    once, the master's threads stay under 50, and meanwhile a worker's long-poll on
    queue_index 0 gets a pushed task at once and other calls are answered promptly."""
    master, address = spawn.master(redis_a.url, "--redis-map", f"1={redis_b.url}",
                                   env={"PPQ_MASTER_THREADPOOL_SIZE": "32"})
    helpers = [subprocess.Popen([sys.executable, str(TESTS_DIR / "fake_agents.py"), f"PYRO:queue@{address}", "250",
                                 "--queue-index", "1", "--wait", "3", "--heartbeat", "5"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for _ in range(2)]
    summaries: list[dict[str, Any]] = []
    proc = psutil.Process(master.pid)
    try:
        for h in helpers:
            assert h.stdout is not None
            assert h.stdout.readline().split() == ["READY", "250", "0"]
        call = PyroFunc(address, timeout=10)
        poller = PyroFunc(address, timeout=20)
        try:
            most_threads = 0
            slowest = 0.0
            deadline = time.monotonic() + 6  # two of the agents' long-poll waits
            while time.monotonic() < deadline:
                most_threads = max(most_threads, proc.num_threads())
                started = time.monotonic()
                call("server_info")
                slowest = max(slowest, time.monotonic() - started)
                time.sleep(0.2)
            out: dict[str, Any] = {}

            def poll() -> None:
                started = time.monotonic()
                out["reply"] = poller("report", W1, 0, [], 1, 10)
                out["seconds"] = time.monotonic() - started

            thread = threading.Thread(target=poll)
            thread.start()
            time.sleep(0.5)
            pushed = time.monotonic()
            task_id = call("push_task", "add", module="tasks", args=[1, 2])
            thread.join(10)
            assert [t["id"] for t in out["reply"]["tasks"]] == [task_id]
            assert time.monotonic() - pushed < 2
        finally:
            call.close()
            poller.close()
        print(f"\n500 parked agents: at most {most_threads} master threads; slowest server_info {slowest:.3f}s")
        assert most_threads < 50, most_threads
        assert slowest < 2.0
    finally:
        summaries += finish_fake_agents(helpers)
    assert len(summaries) == 2
    # Each agent made about one long-poll per 3 s wait, every one held its whole wait
    # (none came back early), and none failed.
    assert sum(s["polls"] for s in summaries) >= 500 * 2
    assert sum(s["short_polls"] for s in summaries) == 0, summaries
    assert sum(s["errors"] for s in summaries) == 0, summaries
    assert sum(s["still_running"] for s in summaries) == 0, summaries
    assert master.poll() is None
