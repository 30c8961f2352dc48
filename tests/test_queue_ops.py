"""Operator commands on a whole queue_index or one worker: purging the waiting tasks,
pausing and resuming a queue_index, pausing and resuming one worker.

Master-level tests use an in-process master (``master`` / ``call``); the ones that
show a paused queue or worker is really left alone run real worker agents
(``spawn.worker``) and the ``ppq`` command (``run_ppq``).
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import threading
import time
from pathlib import Path

import pytest

from ppq import Client
from ppq.errors import InvalidTaskError
from ppq.store import PURGE_BATCH

from .conftest import address_of, ppq_command, ppq_env, redis_snapshot, run_ppq, wait_for, wait_state, worker_entry

WORKER = {"id": "w-test", "heartbeat_interval": 1}
# How long a check that nothing happens watches for it, in seconds.
QUIET = 1.5


@pytest.fixture
def client(master):
    c = Client([address_of(master)])
    yield c
    c.close()


def counts(call, queue_index=0):
    return call("server_info")[queue_index]


def watch_nothing_happens(check, seconds=QUIET):
    """Assert ``check()`` stays true for ``seconds`` (a deadline, checked every 50 ms)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check()
        time.sleep(0.05)


def lines(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


# -- purge ----------------------------------------------------------------------------------


def test_purge_deletes_ready_and_delayed_tasks_with_their_records_and_keys_and_leaves_running_and_dead_ones(
        client, call, ra):
    running = call("push_tasks", [{"func": "add", "module": "tasks", "args": [i, i]} for i in range(2)])
    dead = call("push_task", "boom", module="tasks")
    leased = {t["id"]: t for t in call("get_tasks", WORKER, 0, 3)}
    assert set(leased) == {*running, dead}
    call("task_error", dead, WORKER, lease=leased[dead]["lease"], retry=False)
    retrying = call("push_task", "boom", module="tasks", max_retry=3, retry_delay=True)
    task = call("get_task", WORKER)
    assert task["id"] == retrying
    call("task_error", retrying, WORKER, lease=task["lease"])
    assert call("get_task_info", retrying)["state"] == "failed"
    ready = [call("push_task", "add", module="tasks", args=[i, 1], key=f"k{i}") for i in range(5)]
    delayed = [call("push_task", "add", module="tasks", args=[i, 2], delay=600) for i in range(3)]
    before = counts(call)
    assert (before["queued"], before["delayed"], before["running"], before["dead"]) == (5, 4, 2, 1)

    progress = []
    assert client.purge_queue(progress=lambda done, left: progress.append((done, left))) == 9
    assert progress == [(9, 0)]

    after = counts(call)
    assert (after["queued"], after["delayed"], after["running"], after["dead"]) == (0, 0, 2, 1)
    assert after["purged"] == 9
    for tid in [*ready, *delayed, retrying]:
        assert call("get_task_info", tid) is None
    assert ra.hlen("ppq:0:keys") == 0
    # A key freed by the purge starts a new task.
    again = call("push_task", "add", module="tasks", args=[0, 1], key="k0")
    assert again != ready[0] and counts(call)["queued"] == 1
    # The running tasks are untouched: their leases stand and they finish.
    for tid in running:
        assert call("task_finish", tid, WORKER, lease=leased[tid]["lease"], result=1) is True
    assert call("get_task_info", dead)["state"] == "dead"
    # Nothing waiting: purging again deletes nothing and says so.
    client.purge_queue()
    assert client.purge_queue() == 0


def test_purge_runs_in_bounded_batches_and_says_how_many_are_left(call):
    ids = call("push_tasks", [{"func": "add", "module": "tasks", "args": [i, 0], "delay": i % 2 * 600}
                              for i in range(2 * PURGE_BATCH + 500)])
    reply = call("purge_queue", 0, PURGE_BATCH + 10)
    assert reply == {"purged": PURGE_BATCH + 10, "left": PURGE_BATCH + 490}
    # Ready ones go first.
    info = counts(call)
    assert (info["queued"], info["delayed"]) == (240, PURGE_BATCH + 250)
    assert call("purge_queue", 0) == {"purged": PURGE_BATCH + 490, "left": 0}
    assert call("get_tasks_info", ids[:5]) == [None] * 5


def test_purge_takes_the_ready_tasks_a_lease_moved_aside_to_their_modules_lists(call, ra):
    """A lease moves a task its worker may not run to P..'queue:m:<module>' and names the module
    in P..'parked' (lease.lua); purge empties those lists too."""
    aside = call("push_tasks", [{"func": "add", "module": "other", "args": [i, 0]} for i in range(3)])
    assert call("report", {"id": "w", "allow": ["tasks"]}, 0, [], 1, 0)["tasks"] == []
    ready = call("push_tasks", [{"func": "add", "module": "tasks", "args": [i, 0]} for i in range(2)])
    ra.zadd("ppq:0:parked", {"gone": 0})  # a module whose list is gone already
    assert counts(call)["queued"] == 5
    assert call("purge_queue", 0, 4) == {"purged": 4, "left": 1}
    assert ra.llen("ppq:0:queue") == 0 and ra.lrange("ppq:0:queue:m:other", 0, -1) == [aside[2].encode()]
    assert ra.zrange("ppq:0:parked", 0, -1) == [b"other"]
    assert counts(call)["queued"] == 1
    assert call("purge_queue", 0) == {"purged": 1, "left": 0}
    assert not ra.exists("ppq:0:queue:m:other", "ppq:0:parked")
    assert counts(call)["queued"] == 0 and int(ra.hget("ppq:0:stats", "parked")) == 0
    assert call("get_tasks_info", aside + ready) == [None] * 5


def test_a_wait_on_a_purged_task_ends_at_once(client, call, ra):
    tid = client.push("tasks.add", 1, 2)
    errors = []

    def wait():
        try:
            client.result(tid, timeout=30)
        except InvalidTaskError as exc:
            errors.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    wait_for(lambda: ra.zscore("ppq:0:waiting", tid), timeout=10, what="the wait to reach the master")
    started = time.monotonic()
    assert client.purge_queue() == 1
    waiter.join(10)
    assert not waiter.is_alive() and time.monotonic() - started < 5
    assert errors and "unknown" in str(errors[0])


def test_purge_arguments_are_checked_and_change_nothing(call, ra, rb):
    call("push_task", "add", module="tasks", args=[1, 2])
    before = redis_snapshot(ra, rb)
    for args, field in (((99,), "queue_index 99"), (("0",), "queue_index"), ((0, 0), "limit"),
                        ((0, 10**9), "limit"), ((0, "all"), "limit")):
        with pytest.raises(InvalidTaskError, match=field):
            call("purge_queue", *args)
    assert redis_snapshot(ra, rb) == before


def test_queue_purge_command_refuses_without_yes_off_a_terminal_then_purges_and_prints_how_many(master, call, ra, rb):
    addr = address_of(master)
    running = call("push_task", "add", module="tasks", args=[0, 0])
    lease = call("get_task", WORKER)["lease"]
    for i in range(4):
        call("push_task", "add", module="tasks", args=[i, 1], delay=i % 2 * 600)
    before = redis_snapshot(ra, rb)
    out = run_ppq("queue", "purge", "-m", addr)
    assert out.returncode == 2 and out.stdout == ""
    assert "--yes" in out.stderr and "4 task(s) waiting in queue_index 0" in out.stderr, out.stderr
    assert redis_snapshot(ra, rb) == before
    out = run_ppq("queue", "purge", "-m", addr, "-q", "0", "--yes")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "purged 4 task(s) from queue_index 0"
    info = counts(call)
    assert (info["queued"], info["delayed"], info["running"]) == (0, 0, 1)
    assert call("task_finish", running, WORKER, lease=lease, result=0) is True
    out = run_ppq("queue", "purge", "-m", addr, "-q", "1")
    assert out.returncode == 0 and out.stdout.strip() == "purged 0 task(s) from queue_index 1", out.stderr
    out = run_ppq("queue", "purge", "-m", addr, "-q", "7", "--yes")
    assert out.returncode == 1 and "queue_index 7" in out.stderr


def purge_at_a_terminal(addr: str, answer: str) -> tuple[int, str, str]:
    """Run ``ppq queue purge`` with a terminal for stdin and stderr, answer its question; return
    (exit code, stdout, what the terminal showed)."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([*ppq_command(), "queue", "purge", "-m", addr], stdin=follower, stderr=follower,
                            stdout=subprocess.PIPE, env=ppq_env(), text=True)
    os.close(follower)
    shown = b""
    try:
        while b"[y/N]" not in shown:
            ready, _, _ = select.select([leader], [], [], 20)
            assert ready, f"no question asked; the terminal shows {shown!r}"
            shown += os.read(leader, 4096)
        os.write(leader, answer.encode() + b"\n")
        stdout, _ = proc.communicate(timeout=30)
        while select.select([leader], [], [], 0.2)[0]:
            try:
                shown += os.read(leader, 4096)
            except OSError:
                break
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stdout, shown.decode(errors="replace")


def test_queue_purge_asks_at_a_terminal_showing_how_many_will_go(master, call, ra, rb):
    addr = address_of(master)
    call("push_tasks", [{"func": "add", "module": "tasks", "args": [i, 0]} for i in range(3)])
    before = redis_snapshot(ra, rb)
    code, stdout, shown = purge_at_a_terminal(addr, "n")
    assert "Delete the 3 task(s) waiting in queue_index 0 for good?" in shown
    assert code == 1 and "nothing done" in shown and stdout == ""
    assert redis_snapshot(ra, rb) == before
    code, stdout, shown = purge_at_a_terminal(addr, "y")
    assert code == 0 and stdout.strip() == "purged 3 task(s) from queue_index 0", shown
    assert counts(call)["queued"] == 0


# -- pausing a queue_index ----------------------------------------------------------------------


def test_a_paused_queue_index_leases_nothing_on_any_master_but_takes_pushes(make_master, master, client, call):
    other = Client([address_of(make_master())])
    try:
        first = client.push("tasks.add", 1, 1)
        assert client.pause_queue() is True
        assert client.pause_queue() is False
        info = counts(call)
        assert info["paused"] is True and counts(call, 1)["paused"] is False
        second = other.push("tasks.add", 2, 2)
        assert counts(call)["queued"] == 2
        for c in (client, other):
            assert c.call("get_task", WORKER, 0) is None
            assert c.call("get_tasks", WORKER, 0, 5) == []
            assert c.call("report", WORKER, 0, [], 5)["tasks"] == []
        # queue_index 1 is not paused.
        one = client.push("tasks.add", 3, 3, queue_index=1)
        assert call("get_task", WORKER, 1)["id"] == one

        assert other.resume_queue() is True
        assert other.resume_queue() is False
        assert counts(call)["paused"] is False
        assert [t["id"] for t in client.call("get_tasks", WORKER, 0, 5)] == [first, second]
    finally:
        other.close()


def test_resuming_wakes_a_long_poll_waiting_on_a_paused_queue_index(client, call, ra):
    client.pause_queue()
    tid = client.push("tasks.add", 1, 1)
    got = []
    poll = threading.Thread(target=lambda: got.append(call("get_task", WORKER, 0, 20)))
    poll.start()
    wait_for(lambda: ra.zcard("ppq:0:waiters"), timeout=10, what="the long-poll to wait")
    assert not got
    started = time.monotonic()
    client.resume_queue()
    poll.join(10)
    assert got and got[0]["id"] == tid
    assert time.monotonic() - started < 5


def test_queue_pause_and_resume_commands_and_status(master, call):
    addr = address_of(master)
    out = run_ppq("queue", "pause", "-m", addr, "-q", "1")
    assert out.returncode == 0 and out.stdout.startswith("queue_index 1 paused"), out.stderr
    assert run_ppq("queue", "pause", "-m", addr, "-q", "1").stdout.strip() == "queue_index 1 was paused already"
    assert [counts(call, qi)["paused"] for qi in (0, 1)] == [False, True]
    table = run_ppq("status", "-m", addr, env={"COLUMNS": "200"})
    assert table.returncode == 0, table.stderr
    assert "1 paused" in table.stdout and "queue_index 1 is paused" in table.stdout
    assert "0 paused" not in table.stdout
    out = run_ppq("queue", "resume", "-m", addr, "-q", "1")
    assert out.returncode == 0 and out.stdout.strip() == "queue_index 1 resumed"
    assert run_ppq("queue", "resume", "-m", addr, "-q", "1").stdout.strip() == "queue_index 1 was not paused"
    assert counts(call, 1)["paused"] is False
    assert "paused" not in run_ppq("status", "-m", addr, env={"COLUMNS": "200"}).stdout
    out = run_ppq("queue", "pause", "-m", addr, "-q", "9")
    assert out.returncode == 1 and "queue_index 9 is not configured" in out.stderr


def test_pause_arguments_are_checked_and_change_nothing(call, ra, rb):
    before = redis_snapshot(ra, rb)
    for method in ("pause_queue", "resume_queue"):
        for value, field in ((99, "queue_index 99"), ("0", "queue_index"), (None, "queue_index")):
            with pytest.raises(InvalidTaskError, match=field):
                call(method, value)
    for method in ("pause_worker", "resume_worker"):
        for args, field in ((("",), "worker_id"), ((7,), "worker_id"), (("x" * 201,), "worker_id"),
                            (("nobody",), "worker_id: no worker 'nobody'"), (("w", 99), "queue_index 99")):
            with pytest.raises(InvalidTaskError, match=field):
                call(method, *args)
    assert redis_snapshot(ra, rb) == before


def test_paused_tasks_do_not_run_and_run_after_resume(master, client, call, spawn, tmp_path):
    out = tmp_path / "ran.txt"
    proc = spawn.worker(address_of(master))
    worker_entry(call, proc.pid)
    assert client.pause_queue()
    ids = [client.push("tasks.record", str(out), f"t{i}") for i in range(3)]
    status = run_ppq("status", "--json", "-m", address_of(master))
    assert status.returncode == 0, status.stderr
    assert '"paused": true' in status.stdout
    watch_nothing_happens(lambda: not lines(out) and counts(call)["queued"] == 3)
    client.resume_queue()
    for tid in ids:
        wait_state(call, tid, "done")
    assert sorted(lines(out)) == ["t0", "t1", "t2"]


# -- pausing one worker ---------------------------------------------------------------------------


def test_a_paused_worker_gets_nothing_while_the_other_runs_everything_and_gets_tasks_after_resume(
        master, client, call, spawn):
    one, two = spawn.worker(address_of(master)), spawn.worker(address_of(master))
    paused_id = worker_entry(call, one.pid)["id"]
    other_id = worker_entry(call, two.pid)["id"]
    addr = address_of(master)
    out = run_ppq("workers", "pause", paused_id, "-m", addr)
    assert out.returncode == 0 and out.stdout.startswith(f"worker {paused_id} paused (queue_index 0)"), out.stderr
    assert client.pause_worker(paused_id) == [0]
    assert {w["id"]: w["paused"] for w in counts(call)["workers"]} == {paused_id: True, other_id: False}
    listed = run_ppq("workers", "-m", addr, env={"COLUMNS": "200"})
    assert listed.returncode == 0 and f"{paused_id} (paused)" in listed.stdout, listed.stderr
    assert f"{other_id} (paused)" not in listed.stdout
    ids = [client.push("tasks.add", i, 1) for i in range(20)]
    assert sorted(value for _, value in client.results(ids, timeout=30)) == list(range(1, 21))
    assert {info["worker"] for info in call("get_tasks_info", ids)} == {other_id}
    # Still listed, still paused.
    assert worker_entry(call, one.pid)["paused"] is True

    out = run_ppq("workers", "resume", paused_id, "-m", addr)
    assert out.returncode == 0 and out.stdout.strip() == f"worker {paused_id} resumed (queue_index 0)", out.stderr
    assert worker_entry(call, one.pid)["paused"] is False

    def one_runs_some():
        batch = [client.push("tasks.sleep_then", 0.05, None) for _ in range(4)]
        list(client.results(batch, timeout=30))
        return paused_id in {info["worker"] for info in call("get_tasks_info", batch)}

    wait_for(one_runs_some, timeout=30, what="the resumed worker to run a task")


def test_a_worker_paused_while_it_runs_a_task_finishes_it_and_stays_listed(master, client, call, spawn):
    proc = spawn.worker(address_of(master))
    wid = worker_entry(call, proc.pid)["id"]
    tid = client.push("tasks.sleep_then", 1.0, "finished")
    wait_state(call, tid, "running")
    client.pause_worker(wid)
    assert client.result(tid, timeout=20) == "finished"
    later = client.push("tasks.add", 1, 1)
    watch_nothing_happens(lambda: call("get_task_info", later)["state"] == "queued")
    assert worker_entry(call, proc.pid)["paused"] is True and proc.poll() is None
    client.resume_worker(wid)
    assert client.result(later, timeout=20) == 2


def test_pausing_an_unknown_worker_is_an_error_and_changes_nothing(master, client, ra, rb):
    before = redis_snapshot(ra, rb)
    for method in (client.pause_worker, client.resume_worker):
        with pytest.raises(InvalidTaskError, match="worker_id: no worker 'nobody' is listed in any queue_index"):
            method("nobody")
    for action in ("pause", "resume"):
        out = run_ppq("workers", action, "nobody", "-m", address_of(master))
        assert out.returncode == 1 and out.stdout == ""
        assert "no worker 'nobody' is listed in any queue_index" in out.stderr
    out = run_ppq("workers", "pause", "nobody", "-q", "1", "-m", address_of(master))
    assert out.returncode == 1 and "no worker 'nobody' is listed in queue_index 1" in out.stderr
    assert redis_snapshot(ra, rb) == before


def test_a_paused_worker_that_goes_quiet_is_forgotten_with_its_pause(call, ra):
    quiet = {"id": "w-quiet", "heartbeat_interval": 0.01}
    call("heartbeat", quiet, 0, [])
    assert call("pause_worker", "w-quiet") == [0]
    assert ra.hexists("ppq:0:paused", "worker:w-quiet")
    wait_for(lambda: not ra.hexists("ppq:0:paused", "worker:w-quiet"), timeout=10,
             what="the reaper to forget the quiet worker and its pause")
    with pytest.raises(InvalidTaskError, match="no worker 'w-quiet'"):
        call("resume_worker", "w-quiet")
