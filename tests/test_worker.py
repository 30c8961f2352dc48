"""Worker agents as real ``ppq worker`` subprocesses against a real master and Redis:
running tasks, failures, allowlists, concurrency, timeouts, signals, executors that die,
the thread pool, heartbeats, the control object, hooks and autodiscover."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from ppq import Client, PyroFunc, encode_parameters
from ppq.task import MAX_ALLOW_NAMES

from .conftest import (
    REPO,
    TESTS_DIR,
    address_of,
    pid_gone,
    run_ppq,
    wait_for,
    wait_state,
    worker_entry,
    workers_of,
)

# These tests use conftest's function-scoped ``master`` on purpose: a worker SIGKILLed at the end
# of a test may still have a long-poll pending in the master, which would lease the next test's
# task to a dead agent (it comes back only when the lease expires). Stopping the master ends it.


def control(uri: str) -> PyroFunc:
    """A caller on a worker's control object (id ``worker``)."""
    return PyroFunc(uri, objid="worker", timeout=5)


def running_tasks(ctl: PyroFunc, count: int = 1, timeout: float = 15.0) -> list[dict]:
    """Wait until the worker reports at least ``count`` running tasks; return them."""
    return wait_for(lambda: (t := ctl("get_running_info")["tasks"]) and len(t) >= count and t, timeout=timeout,
                    interval=0.02, what=f"{count} running task(s)")


def spans(path: Path) -> list[tuple[float, float]]:
    out = []
    for line in path.read_text().splitlines():
        _, start, end = line.split()
        out.append((float(start), float(end)))
    return out


def push(call, func: str, *args, **options) -> str:
    module, _, name = func.rpartition(".")
    return call("push_task", name, module=module, args=list(args), **options)


# -- running tasks end to end ---------------------------------------------------------------------


def test_seed_call_runs_and_records_result_state_and_worker(master, call, spawn):
    proc = spawn.worker(address_of(master), allow="time,tasks")
    seed = PyroFunc(f"PYRO:queue@127.0.0.1:{master.port}", retry=1, random_idx=True, threaded=True)
    task_id = seed("push_task", "sleep", module="time", parameters=encode_parameters([0.3], {}), queue_index=0)
    info = wait_state(seed, task_id, "done")
    entry = worker_entry(call, proc.pid)
    assert info["worker"] == entry["id"]
    assert info["result"] is None and info["has_result"] is True
    assert (info["attempts"], info["retry"], info.get("error") or "") == (1, 0, "")
    assert info["finished"] - info["started"] >= 0.3
    # threaded=True: one PyroFunc shared by several threads.
    ids: list[str] = []
    threads = [threading.Thread(target=lambda i=i: ids.append(
        seed("push_task", "add", module="tasks", parameters=encode_parameters([i, i], {}), queue_index=0)))
        for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(set(ids)) == 4
    results = sorted(wait_state(seed, tid, "done")["result"] for tid in ids)
    assert results == [0, 2, 4, 6]
    seed.close()


def test_plain_proxy_task_runs_on_a_worker(master, spawn):
    import Pyro5.api

    spawn.worker(address_of(master))
    with Pyro5.api.Proxy(master.uri) as q:
        q._pyroSerializer = "serpent"
        task_id = q.push_task("echo", module="tasks", args=[1, [2]], kwargs={"k": {"n": None}})
        info = wait_for(lambda: (i := q.get_task_info(task_id, 0))["state"] == "done" and i, timeout=20)
    assert info["result"] == {"args": [1, [2]], "kwargs": {"k": {"n": None}}}


def test_fclass_instance_method_and_staticmethod(master, call, spawn):
    proc = spawn.worker(address_of(master), allow="tasks,tests")
    double = call("push_task", "double", module="tasks", fclass="Calculator", args=[4])
    triple = call("push_task", "triple", module="tasks", fclass="Calculator", args=[4])
    client = Client([address_of(master)])
    from . import tasks

    by_object = client.push(tasks.Calculator.triple, 5)  # module tests.tasks, fclass Calculator
    executor_pid = client.push("tasks.pid")
    assert client.result(double, timeout=20) == 8
    assert client.result(triple, timeout=20) == 12
    assert client.result(by_object, timeout=20) == 15
    assert client.result(executor_pid, timeout=20) != proc.pid  # processes pool: not the agent itself
    client.close()


def test_retry_then_dead_list_with_error_and_traceback(master, call, spawn):
    proc = spawn.worker(address_of(master))
    task_id = push(call, "tasks.boom", "it broke", max_retry=1)
    info = wait_state(call, task_id, "dead")
    assert (info["retry"], info["attempts"]) == (2, 2)
    assert info["error"] == "ValueError: it broke"
    assert "Traceback" in info["traceback"] and "tasks.py" in info["traceback"] and "boom" in info["traceback"]
    assert [d["id"] for d in call("dead_tasks", 0)] == [task_id]
    stats = control(worker_entry(call, proc.pid)["control_uri"])("get_worker_stats")
    assert (stats["tasks.boom"]["count"], stats["tasks.boom"]["failed"], stats["tasks.boom"]["ok"]) == (2, 2, 0)


def test_failing_imports_give_dead_tasks_with_a_readable_reason(master, call, spawn, tmp_path):
    (tmp_path / "ppq_broken_mod.py").write_text("raise RuntimeError('broken at import time')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS_DIR), str(REPO)])}
    spawn.worker(address_of(master), allow="tasks,ppq_missing_mod_xyz,ppq_broken_mod", env=env)
    missing = call("push_task", "f", module="ppq_missing_mod_xyz", max_retry=0)
    broken = call("push_task", "f", module="ppq_broken_mod", max_retry=0)
    no_func = call("push_task", "no_such_function", module="tasks", max_retry=0)
    info = wait_state(call, missing, "dead")
    assert "ModuleNotFoundError" in info["error"] and "ppq_missing_mod_xyz" in info["error"]
    assert info["traceback"]
    info = wait_state(call, broken, "dead")
    assert "RuntimeError" in info["error"] and "broken at import time" in info["error"]
    info = wait_state(call, no_func, "dead")
    assert "AttributeError" in info["error"] and "no_such_function" in info["error"]


# An allow list of more names than masters route by (ppq.task.MAX_ALLOW_NAMES), "tasks" among them:
# the worker tells masters it runs anything, and refuses what it may not run itself.
UNROUTED_TASKS = ",".join(["tasks", *(f"ppq_spare_{i}" for i in range(MAX_ALLOW_NAMES))])


def test_module_not_allowed_is_refused_and_never_imported(master, call, spawn, tmp_path):
    marker = tmp_path / "imported.txt"
    (tmp_path / "ppq_marker_mod.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n\ndef run():\n    return 'ran'\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS_DIR), str(REPO)])}
    # Masters lease a worker only tasks of the modules it allows: this one waits for another worker.
    routed = call("push_task", "run", module="ppq_marker_mod", max_retry=3)
    spawn.worker(address_of(master), allow="tasks", env=env)
    ok = push(call, "tasks.add", 1, 2)
    assert wait_state(call, ok, "done")["result"] == 3
    info = call("get_task_info", routed)
    assert info["state"] == "queued" and info["attempts"] == 0, info
    assert info["waiting_for"] == "a worker that allows ppq_marker_mod"
    # A worker allowing more modules than masters route by is leased any task: it refuses those
    # it may not run itself, without importing them.
    spawn.worker(address_of(master), allow=UNROUTED_TASKS, env=env)
    info = wait_state(call, routed, "dead")
    assert "NotAllowedError" in info["error"] and "ppq_marker_mod" in info["error"]
    assert info["attempts"] == 1  # not retried: it can never succeed on this worker
    assert not marker.exists()
    # The control: importing that module does write the marker.
    subprocess.run([sys.executable, "-c", "import ppq_marker_mod"], env={**os.environ, **env}, check=True,
                   timeout=30)
    assert marker.read_text() == "imported"


def test_worker_pulls_only_its_queue_index(master, call, spawn):
    proc = spawn.worker(address_of(master), extra=("--queue-index", "1"))
    zero = push(call, "tasks.add", 1, 1, queue_index=0)
    one = push(call, "tasks.add", 2, 2, queue_index=1)
    assert wait_state(call, one, "done", queue_index=1)["result"] == 4
    worker_entry(call, proc.pid, queue_index=1)
    assert call("get_task_info", zero, 0)["state"] == "queued"
    assert all(w.get("pid") != proc.pid for w in workers_of(call, 0))


def test_heartbeats_list_the_agent_with_its_running_tasks_and_drop_it_when_dead(master, call, spawn):
    proc = spawn.worker(address_of(master))
    task_id = push(call, "tasks.sleep_then", 1.5, "late")
    wait_state(call, task_id, "running")
    entry = wait_for(lambda: (e := worker_entry(call, proc.pid)) and task_id in e["running"] and e, timeout=10,
                     what="the running task in the worker's heartbeat")
    assert entry["host"] == socket.gethostname() and entry["queue_index"] == 0 and entry["concurrency"] == 1
    assert entry["control_uri"].startswith("PYRO:worker@127.0.0.1:")
    assert abs(entry["last_heartbeat"] - time.time()) < 5
    assert wait_state(call, task_id, "done")["result"] == "late"
    wait_for(lambda: worker_entry(call, proc.pid)["done"] == 1, timeout=10, what="done count in heartbeat")
    proc.kill()
    proc.wait(10)
    wait_for(lambda: all(w.get("pid") != proc.pid for w in workers_of(call)), timeout=10,
             what="the killed worker to be dropped from server_info")


def server_parked(server) -> int:
    """How many long-polls wait in ``server`` (a MasterServer) without a thread."""
    return int(server.master._parked)


def test_an_idle_worker_is_kept_listed_by_its_long_polls_and_skips_its_heartbeats(master, call, spawn):
    """Idle (no task held, nothing new to say), an agent sends no heartbeat: each long-poll keeps it
    listed (until three heartbeat intervals after the long-poll ends). A task it runs changes its
    info, so a heartbeat says so. Killed while its long-poll of a minute waits, it is dropped as
    soon as it would be after a heartbeat: the master sees the poll's connection close."""
    proc = spawn.worker(address_of(master), extra=("--max-sleep", "60", "--heartbeat-interval", "0.2"))
    first = worker_entry(call, proc.pid)["last_heartbeat"]
    # Heartbeats every 0.2 s would list it for 1.6 s after each; idle, it sends none for 6 s.
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        entry = next((w for w in workers_of(call) if w.get("pid") == proc.pid), None)
        assert entry is not None, "the idle worker dropped off the list of live workers"
        assert entry["last_heartbeat"] == first, "an idle worker sent a heartbeat with nothing new in it"
        time.sleep(0.2)
    assert wait_state(call, push(call, "tasks.add", 2, 3), "done")["result"] == 5
    entry = wait_for(lambda: (e := worker_entry(call, proc.pid)) and e["done"] == 1 and e, timeout=10,
                     what="the heartbeat that says a task was done")
    assert entry["last_heartbeat"] > first
    wait_for(lambda: server_parked(master) == 1, timeout=10, what="its next long-poll to wait")
    proc.kill()
    proc.wait(10)
    wait_for(lambda: all(w.get("pid") != proc.pid for w in workers_of(call)), timeout=15,
             what="the killed idle worker to be dropped")


def test_lease_is_extended_by_heartbeats_for_a_long_task(make_master, spawn):
    server = make_master(master__lease_timeout=1)
    call = PyroFunc(address_of(server))
    spawn.worker(address_of(server))
    task_id = push(call, "tasks.sleep_then", 2.5, "kept")
    info = wait_state(call, task_id, "done")
    assert (info["result"], info["attempts"], info["expiries"]) == ("kept", 1, 0)
    call.close()


# -- concurrency and timeouts ------------------------------------------------------------------------


def test_four_executors_run_four_sleeping_tasks_at_once(master, call, spawn, tmp_path):
    out = tmp_path / "spans.txt"
    spawn.worker(address_of(master), concurrency=4)
    ids = call("push_tasks", [{"func": "span", "module": "tasks", "args": [str(out), i, 2.0]} for i in range(4)])
    assert sorted(wait_state(call, tid, "done")["result"] for tid in ids) == [0, 1, 2, 3]
    times = spans(out)
    assert len(times) == 4
    assert max(s for s, _ in times) < min(e for _, e in times), f"the four tasks did not overlap: {times}"


def test_task_past_its_timeout_is_killed_retried_and_the_pool_is_whole_again(master, call, spawn, tmp_path):
    proc = spawn.worker(address_of(master), concurrency=4, extra=("--task-timeout", "30"))
    ctl = control(worker_entry(call, proc.pid)["control_uri"])
    task_id = push(call, "tasks.sleep_then", 30, timeout=1, max_retry=1)
    (first,) = running_tasks(ctl)
    assert first["id"] == task_id and first["executor_pid"]
    killed = first["executor_pid"]
    info = wait_state(call, task_id, "dead", timeout=20)
    assert "timeout" in info["error"].lower()
    assert (info["retry"], info["attempts"]) == (2, 2)
    assert ctl("get_worker_stats")["tasks.sleep_then"]["failed"] == 2
    wait_for(lambda: pid_gone(killed), timeout=10, what="the timed-out executor to be gone")
    # The pool is whole: four new tasks run at once on four live executors.
    out = tmp_path / "spans.txt"
    ids = call("push_tasks", [{"func": "span", "module": "tasks", "args": [str(out), i, 2.0]} for i in range(4)])
    running = running_tasks(ctl, 4)
    pids = {t["executor_pid"] for t in running}
    assert len(pids) == 4 and killed not in pids
    assert ctl("get_running_info")["concurrency"] == 4
    for tid in ids:
        wait_state(call, tid, "done")
    times = spans(out)
    assert max(s for s, _ in times) < min(e for _, e in times)
    quick = push(call, "tasks.add", 2, 3)
    assert wait_state(call, quick, "done")["result"] == 5


def test_executor_killed_with_sigkill_is_replaced_and_its_task_reported(master, call, spawn, tmp_path):
    record = tmp_path / "runs.txt"
    proc = spawn.worker(address_of(master), concurrency=2, extra=("--task-timeout", "60"))
    ctl = control(worker_entry(call, proc.pid)["control_uri"])
    task_id = push(call, "tasks.rerun", str(record), 30, timeout=60, max_retry=1)
    (running,) = running_tasks(ctl)
    executor = running["executor_pid"]
    assert executor and executor != proc.pid
    wait_for(lambda: record.exists() and record.read_text().strip(), timeout=10, what="the task to start")
    os.kill(executor, signal.SIGKILL)
    info = wait_state(call, task_id, "done", timeout=20)
    assert info["result"] == 2  # the second run, after the executor died
    assert (info["retry"], info["attempts"], info["expiries"]) == (1, 2, 0)  # reported, not left to expire
    stats = ctl("get_worker_stats")["tasks.rerun"]
    assert (stats["count"], stats["ok"], stats["failed"]) == (2, 1, 1)
    runs = record.read_text().split()
    assert runs[0] == str(executor) and runs[1] != str(executor)
    # Still two executors: two tasks at once.
    out = tmp_path / "spans.txt"
    ids = call("push_tasks", [{"func": "span", "module": "tasks", "args": [str(out), i, 1.0]} for i in range(2)])
    assert {t["executor_pid"] for t in running_tasks(ctl, 2)}.isdisjoint({executor})
    for tid in ids:
        wait_state(call, tid, "done")
    assert proc.poll() is None


def test_executors_exit_when_their_agent_is_killed(master, call, spawn):
    proc = spawn.worker(address_of(master), concurrency=2)
    worker_entry(call, proc.pid)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    executors = wait_for(lambda: len(pids := children.read_text().split()) == 2 and [int(p) for p in pids],
                         what="two executor processes")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    for pid in executors:
        wait_for(lambda pid=pid: pid_gone(pid), timeout=10, what=f"executor {pid} to exit")


def test_executors_import_allowed_modules_before_their_first_task(master, call, spawn, tmp_path):
    """Each executor imports the allowed modules as it starts, not when the first task comes."""
    marks = tmp_path / "imported.txt"
    (tmp_path / "warm_tasks.py").write_text(textwrap.dedent(f"""
        import os
        with open({str(marks)!r}, "a") as f:
            f.write(f"{{os.getpid()}}\\n")

        def pid():
            return os.getpid()
    """))
    (tmp_path / "broken_tasks.py").write_text("raise RuntimeError('broken at import')\n")
    proc = spawn.worker(address_of(master), allow="warm_tasks,broken_tasks", concurrency=2,
                        env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(__file__).parent), str(REPO)])})
    worker_entry(call, proc.pid)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
    executors = wait_for(lambda: len(pids := children.read_text().split()) == 2 and sorted(int(p) for p in pids),
                         what="two executor processes")
    # Imported once in each executor, and no task has been pushed yet.
    wait_for(lambda: marks.exists() and sorted(map(int, marks.read_text().split())) == executors,
             what="each executor to import warm_tasks")
    task_id = push(call, "warm_tasks.pid")
    assert wait_state(call, task_id, "done")["result"] in executors
    assert sorted(map(int, marks.read_text().split())) == executors
    # A module that fails to import does not stop the executor: its task reports the error.
    task_id = push(call, "broken_tasks.anything")
    info = wait_state(call, task_id, ("failed", "dead"))
    assert "broken at import" in info["error"]
    assert proc.poll() is None


def test_thread_pool_runs_tasks_in_the_agent_process(master, call, spawn, tmp_path):
    proc = spawn.worker(address_of(master), concurrency=2, extra=("--pool", "threads"))
    task_id = push(call, "tasks.pid")
    assert wait_state(call, task_id, "done")["result"] == proc.pid
    out = tmp_path / "spans.txt"
    ids = call("push_tasks", [{"func": "span", "module": "tasks", "args": [str(out), i, 1.0]} for i in range(2)])
    for tid in ids:
        wait_state(call, tid, "done")
    times = spans(out)
    assert max(s for s, _ in times) < min(e for _, e in times)
    entry = worker_entry(call, proc.pid)
    assert entry["pool"] == "threads"
    stats = control(entry["control_uri"])("get_worker_stats")
    assert stats["tasks.pid"]["ok"] == 1 and stats["tasks.span"]["count"] == 2
    assert stats["tasks.span"]["mean_time"] >= 1.0
    # `ppq workers` shows the same, read from the control object.
    out = run_ppq("workers", "-m", address_of(master), "--json")
    assert out.returncode == 0, out.stderr
    rows = [r for r in json.loads(out.stdout) if r["worker"].get("pid") == proc.pid]
    assert rows and rows[0]["stats"]["tasks.span"]["count"] == 2


# -- signals ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_graceful_signal_lets_the_running_task_finish_and_exits_0(master, call, spawn, signame):
    proc = spawn.worker(address_of(master), extra=("--task-timeout", "20"))
    task_id = push(call, "tasks.sleep_then", 2, "finished")
    assert wait_state(call, task_id, "running")["worker"] == worker_entry(call, proc.pid)["id"]
    signalled = time.time()
    proc.send_signal(getattr(signal, signame))
    assert proc.wait(20) == 0, spawn.log(proc)
    info = call("get_task_info", task_id, 0)
    assert (info["state"], info["result"], info["attempts"]) == ("done", "finished", 1)
    assert info["finished"] > signalled


def test_sigterm_with_a_short_task_timeout_hands_the_task_to_another_worker(master, call, spawn, tmp_path):
    record = tmp_path / "runs.txt"
    first = spawn.worker(address_of(master), extra=("--task-timeout", "1"))
    first_id = worker_entry(call, first.pid)["id"]
    # The task's own timeout (60 s) lets it run; the agent's task_timeout (1 s) bounds the stop.
    task_id = push(call, "tasks.rerun", str(record), 60, timeout=60, max_retry=0)
    assert wait_state(call, task_id, "running")["worker"] == first_id
    second = spawn.worker(address_of(master))
    second_id = worker_entry(call, second.pid)["id"]
    first.send_signal(signal.SIGTERM)
    assert first.wait(20) == 0, spawn.log(first)
    info = wait_state(call, task_id, "done", timeout=20)
    assert info["worker"] == second_id
    assert info["result"] == 2 and info["retry"] == 0  # handed back, not failed
    assert call("server_info")[0]["released"] == 1
    assert second.poll() is None


def _children(pid: int) -> dict[int, str]:
    """The child processes of ``pid`` and their states (R, S, Z...), from /proc."""
    out = {}
    for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
        try:
            out[int(child)] = Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            pass
    return out


@pytest.mark.parametrize("pool", ["processes", "threads"])
def test_sigusr2_drains_then_restarts_the_agent_in_place_with_the_same_pid(master, call, spawn, pool):
    proc = spawn.worker(address_of(master), concurrency=2, extra=("--pool", pool, "--task-timeout", "20"))
    old = worker_entry(call, proc.pid)
    old_children = set(_children(proc.pid))
    assert len(old_children) == (2 if pool == "processes" else 0)
    running = push(call, "tasks.sleep_then", 1, "drained")
    assert wait_state(call, running, "running")["worker"] == old["id"]
    proc.send_signal(signal.SIGUSR2)
    # The running task finishes first (a graceful drain), then the agent comes back under the same pid.
    info = wait_state(call, running, "done", timeout=20)
    assert (info["result"], info["worker"], info["attempts"]) == ("drained", old["id"], 1)
    new = wait_for(lambda: next((w for w in workers_of(call) if w.get("pid") == proc.pid and w["id"] != old["id"]),
                                None), timeout=20, what="the restarted agent in server_info")
    assert proc.poll() is None, spawn.log(proc)
    assert not any(w["id"] == old["id"] for w in workers_of(call))  # the old agent signed off
    cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes().split(b"\0")
    assert b"ppq" in cmdline and b"worker" in cmdline
    task_id = push(call, "tasks.add", 20, 22)
    info = wait_state(call, task_id, "done")
    assert (info["result"], info["worker"]) == (42, new["id"])
    # The old executors are gone (reaped, not zombies); the new ones are the agent's only children.
    children = _children(proc.pid)
    assert not old_children & set(children) and "Z" not in children.values()
    assert len(children) == (2 if pool == "processes" else 0)
    assert "restarting in place" in spawn.log(proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0, spawn.log(proc)


def test_second_sigint_stops_at_once_and_hands_the_task_back(master, call, spawn):
    proc = spawn.worker(address_of(master), extra=("--task-timeout", "60"))
    task_id = push(call, "tasks.sleep_then", 30, timeout=60)
    assert wait_state(call, task_id, "running")["worker"] == worker_entry(call, proc.pid)["id"]
    proc.send_signal(signal.SIGINT)
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(1.0)  # graceful: it waits for the 30 s task
    signalled = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.wait(15)
    assert time.monotonic() - signalled < 8  # "at once": not after the 30 s task
    info = wait_state(call, task_id, "queued", timeout=5)
    assert info["retry"] == 0 and not info.get("error")
    assert call("server_info")[0]["released"] == 1


# -- hooks and autodiscover --------------------------------------------------------------------------------


HOOK_MODULE = '''
import json
import os

import ppq.worker

OUT = os.environ["HOOK_OUT"]
KEYS = ("task_id", "func", "module", "sub", "kw", "lang", "return_value", "exception")


def _recorder(name):
    def hook(context):
        with open(OUT, "a", encoding="utf-8") as f:
            f.write(json.dumps({"hook": name, "keys": sorted(context),
                                **{k: context.get(k) for k in KEYS}}) + "\\n")
    return hook


def broken(context):
    raise RuntimeError("this hook is broken on purpose")


for name in ("on_task_executing", "on_task_finished", "on_task_error"):
    ppq.worker.add_hook(name, broken)
    ppq.worker.add_hook(name, _recorder(name))


def mul(a, b, scale=1):
    return a * b * scale


def fail():
    raise KeyError("nope")
'''


def test_hooks_from_an_autodiscovered_package(master, call, spawn, tmp_path):
    package = tmp_path / "hookpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(textwrap.dedent(HOOK_MODULE))
    out = tmp_path / "hooks.jsonl"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS_DIR), str(REPO)]), "HOOK_OUT": str(out)}
    # Only `tasks` is allowed explicitly: autodiscover must allow hookpkg itself.
    proc = spawn.worker(address_of(master), allow="tasks", extra=("--autodiscover", "hookpkg"), env=env)
    ok = call("push_task", "mul", module="hookpkg.tasks", args=[3, 4], kwargs={"scale": 2}, lang="py")
    bad = call("push_task", "fail", module="hookpkg.tasks", max_retry=0)
    info = wait_state(call, ok, "done")
    assert info["result"] == 24  # the raising hook did not fail the task
    assert "KeyError" in wait_state(call, bad, "dead")["error"]
    records = wait_for(lambda: out.exists() and (lines := [json.loads(x) for x in out.read_text().splitlines()])
                       and len(lines) >= 4 and lines, timeout=10, what="four hook records")
    by_hook = {(r["hook"], r["task_id"]): r for r in records}
    executing = by_hook[("on_task_executing", ok)]
    assert (executing["func"], executing["sub"], executing["kw"], executing["lang"]) == ("mul", [3, 4],
                                                                                         {"scale": 2}, "py")
    finished = by_hook[("on_task_finished", ok)]
    assert finished["return_value"] == 24 and finished["module"] == "hookpkg.tasks"
    assert {"func", "sub", "kw", "lang", "return_value"} <= set(finished["keys"])
    errored = by_hook[("on_task_error", bad)]
    assert "KeyError" in errored["exception"] and errored["func"] == "fail"
    assert ("on_task_finished", bad) not in by_hook and ("on_task_error", ok) not in by_hook
    assert "broken on purpose" in spawn.log(proc)
    assert proc.poll() is None


EXECUTING_HOOK_MODULE = '''
import os
import time

import ppq.worker

OUT = os.environ["HOOK_OUT"]


def executing(context):
    with open(OUT, "a", encoding="utf-8") as f:
        f.write(f"{context['task_id']} {time.time()!r} {os.getpid()}\\n")


ppq.worker.add_hook("on_task_executing", executing)
'''


@pytest.mark.parametrize("pool", ["processes", "threads"])
def test_executing_hooks_fire_in_the_executor_as_each_prefetched_task_starts(master, call, spawn, tmp_path, pool):
    """Tasks fetched together run as one batch in one executor: each one's on_task_executing hook
    fires when that task starts, so at or after the end of the task before it."""
    package = tmp_path / "hookpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text(textwrap.dedent(EXECUTING_HOOK_MODULE))
    hooks_out, spans_out = tmp_path / "hooks.txt", tmp_path / "spans.txt"
    ids = call("push_tasks", [{"func": "span", "module": "tasks", "args": [str(spans_out), i, 0.2]}
                              for i in range(5)])
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS_DIR), str(REPO)]), "HOOK_OUT": str(hooks_out)}
    proc = spawn.worker(address_of(master), extra=("--autodiscover", "hookpkg", "--prefetch", "10", "--pool", pool),
                        env=env)
    for task_id in ids:
        wait_state(call, task_id, "done")
    ends = {int(token): end for token, (_, end) in zip((line.split()[0] for line in spans_out.read_text().splitlines()),
                                                       spans(spans_out), strict=True)}
    hooks = {task_id: (float(at), int(pid)) for task_id, at, pid in
             (line.split() for line in hooks_out.read_text().splitlines())}
    assert sorted(hooks) == sorted(ids)
    pids = {pid for _, pid in hooks.values()}
    assert pids == ({proc.pid} if pool == "threads" else pids - {proc.pid}) and len(pids) == 1
    for i in range(1, 5):
        assert hooks[ids[i]][0] >= ends[i - 1], f"task {i}'s hook fired before task {i - 1} ended"


@pytest.mark.parametrize("pool", ["processes", "threads"])
def test_idle_agent_does_not_spin_after_running_tasks(master, spawn, pool):
    """After a burst of tasks the agent goes back to waiting: its CPU use while idle stays
    far below one busy core (a pipe left unread once made the supervisor loop spin)."""
    import psutil

    client = Client([address_of(master)])
    proc = spawn.worker(address_of(master), concurrency=2, extra=("--pool", pool))
    ids = [client.push("tasks.add", i, i) for i in range(200)]
    # Tasks of a few milliseconds: each executor reports them one by one.
    ids += [client.push("tasks.sleep_then", 0.006, i) for i in range(150)]
    assert [client.result(t, timeout=30) for t in ids] == [2 * i for i in range(200)] + list(range(150))
    agent = psutil.Process(proc.pid)
    tree = [agent, *agent.children(recursive=True)]

    def cpu_seconds() -> float:
        return sum(p.cpu_times().user + p.cpu_times().system for p in tree)

    before, started = cpu_seconds(), time.monotonic()
    time.sleep(2.0)  # the quantity measured is CPU used over a span of idle wall time
    busy = (cpu_seconds() - before) / (time.monotonic() - started)
    client.close()
    assert busy < 0.25, f"idle agent used {busy:.0%} of a core"


def test_a_result_over_the_size_limit_fails_its_task_and_the_worker_goes_on(master, spawn):
    """A result larger than limits.max_payload cannot be stored: that task fails for good with the
    reason, and the tasks reported with it and after it are not held up."""
    client = Client([address_of(master)])
    spawn.worker(address_of(master), concurrency=1)
    huge = client.push("tasks.big", 2 * 1024 * 1024, max_retry=3)
    small = [client.push("tasks.add", i, 1) for i in range(20)]
    assert [client.result(t, timeout=30) for t in small] == [i + 1 for i in range(20)]
    info = wait_state(client.call, huge, "dead", timeout=30)
    assert "InvalidResultError" in info["error"] and "limit" in info["error"], info["error"]
    assert info["retry"] == 1, "a result that cannot be stored is not retried"
    assert client.result(client.push("tasks.add", 1, 1), timeout=30) == 2
    client.close()


def test_an_autodiscovered_tasks_module_that_fails_to_import_is_one_clear_line(master, spawn, tmp_path):
    package = tmp_path / "brokenpkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "tasks.py").write_text("def oops(:\n")
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path), str(TESTS_DIR), str(REPO)])}
    proc = spawn.worker(address_of(master), extra=("--autodiscover", "brokenpkg"), env=env)
    assert proc.wait(30) != 0
    log = spawn.log(proc)
    assert "Traceback" not in log, log
    assert "worker.autodiscover" in log and "brokenpkg.tasks" in log and "SyntaxError" in log, log


# -- the agent's figures stay bounded ------------------------------------------------------------------


def _scrape(port: int) -> str:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        return reply.read().decode()


def _func_labels(body: str) -> set[str]:
    import re

    return set(re.findall(r'^ppq_worker_tasks_total\{func="([^"]*)"', body, re.MULTILINE))


def _dead_count(call) -> int:
    return call("server_info")[0]["dead"]


def test_refused_tasks_with_distinct_names_share_one_label(master, call, spawn):
    from ppq.embedded import free_port

    metrics_port = free_port()
    proc = spawn.worker(address_of(master), allow=UNROUTED_TASKS, extra=("--metrics-port", str(metrics_port)))
    total = 5000
    for start in range(0, total, 1000):
        batch = []
        for i in range(start, start + 1000):
            if i % 2:
                batch.append({"func": f"run_{i}", "module": f"not_allowed_{i}", "max_retry": 0})
            else:
                batch.append({"func": f"missing_{i}", "module": "tasks", "max_retry": 0})
        call("push_tasks", batch)
    wait_for(lambda: _dead_count(call) == total, timeout=120, interval=0.2, what=f"{total} dead tasks")
    body = _scrape(metrics_port)
    assert _func_labels(body) == {"(refused)"}
    assert 'ppq_worker_tasks_total{func="(refused)",outcome="error"} 5000.0' in body
    assert len(body.encode()) < 20_000, len(body.encode())
    stats = control(worker_entry(call, proc.pid)["control_uri"])("get_worker_stats")
    assert list(stats) == ["(refused)"] and stats["(refused)"]["failed"] == total
    # A task that runs still gets its own label.
    assert wait_state(call, push(call, "tasks.add", 1, 2), "done")["result"] == 3
    assert _func_labels(_scrape(metrics_port)) == {"(refused)", "tasks.add"}


def test_distinct_functions_past_the_cap_count_as_other(master, call, spawn):
    from ppq.embedded import free_port
    from ppq.worker import MAX_FUNC_LABELS

    metrics_port = free_port()
    proc = spawn.worker(address_of(master), allow="escape_tasks", extra=("--metrics-port", str(metrics_port)))
    extra = 50
    ids = call("push_tasks", [{"func": f"many_{i}", "module": "escape_tasks"}
                              for i in range(MAX_FUNC_LABELS + extra)])
    wait_for(lambda: all(i and i["state"] == "done" for i in call("get_tasks_info", ids)), timeout=60,
             interval=0.2, what="every task done")
    stats = control(worker_entry(call, proc.pid)["control_uri"])("get_worker_stats")
    assert len(stats) == MAX_FUNC_LABELS + 1
    assert stats["(other)"]["count"] == extra and stats["(other)"]["ok"] == extra
    assert sum(s["count"] for s in stats.values()) == MAX_FUNC_LABELS + extra
    body = _scrape(metrics_port)
    assert _func_labels(body) == set(stats)
    assert len(body.encode()) < 1_000_000, len(body.encode())


def test_a_stopped_idle_worker_exits_at_once_and_leaves_the_list(master, spawn):
    """SIGTERM to an idle worker whose long-poll waits up to 5 s: the master ends the long-poll,
    the agent exits well within those 5 s, and server_info stops listing it as it exits."""
    call = PyroFunc(address_of(master))
    proc = spawn.worker(address_of(master), extra=("--max-sleep", "5", "--heartbeat-interval", "10"))
    worker_entry(call, proc.pid)
    waker = master.master.wakers[0]
    wait_for(lambda: any(w.wid.split(":")[1] == str(proc.pid) for w in list(waker.idle)), timeout=10,
             what="the worker's long-poll to wait on the master")
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    took = time.monotonic() - started
    assert proc.returncode == 0, spawn.log(proc)
    assert took < 3.0, f"the worker took {took:.1f}s to stop"
    assert not [w for w in workers_of(call) if w.get("pid") == proc.pid], "a stopped worker is still listed"
    call.close()


# -- no task waits behind a long one while an executor or a worker is idle ---------------------------------


def _long_poll_waiting(master, pid: int) -> None:
    waker = master.master.wakers[0]
    wait_for(lambda: any(w.wid.split(":")[1] == str(pid) for w in list(waker.idle)), timeout=10,
             what=f"the long-poll of worker pid {pid} to wait on the master")


@pytest.mark.parametrize("pool", ["processes", "threads"])
def test_short_tasks_prefetched_behind_a_long_one_go_to_the_idle_executor(master, call, spawn, pool):
    """One 5 s task then 50 short ones, 2 executors, automatic prefetch: the short ones that were
    handed to the long task's executor move to the other one, so all finish well under 5 s."""
    proc = spawn.worker(address_of(master), concurrency=2, extra=("--pool", pool))
    worker_entry(call, proc.pid)
    _long_poll_waiting(master, proc.pid)
    pushed = time.time()
    ids = call("push_tasks", [{"func": "sleep_then", "module": "tasks", "args": [5, "long"]}]
               + [{"func": "add", "module": "tasks", "args": [i, 1]} for i in range(50)])
    long_id, short = ids[0], ids[1:]
    finished = [wait_state(call, task_id, "done", timeout=10)["finished"] for task_id in short]
    slowest = max(finished) - pushed
    assert slowest < 3.0, f"a short task finished {slowest:.1f}s after the push, behind the long one"
    assert call("get_task_info", long_id, 0)["state"] == "running"
    assert wait_state(call, long_id, "done", timeout=15)["result"] == "long"
    assert call("server_info")[0]["released"] == 0  # moved between executors, not handed back


def test_a_task_prefetched_behind_a_long_one_goes_back_to_an_idle_worker(master, call, spawn):
    """A one-executor worker leases a long task and a short one together (automatic prefetch): once
    the long task has run a while, the short one goes back to the queue and an idle worker runs it."""
    first = spawn.worker(address_of(master))
    first_id = worker_entry(call, first.pid)["id"]
    _long_poll_waiting(master, first.pid)
    pushed = time.time()
    long_id, short_id = call("push_tasks", [{"func": "sleep_then", "module": "tasks", "args": [6, "long"]},
                                            {"func": "add", "module": "tasks", "args": [20, 22]}])
    assert wait_state(call, long_id, "running")["worker"] == first_id
    assert wait_state(call, short_id, "running")["worker"] == first_id  # leased to the busy worker
    second = spawn.worker(address_of(master))
    second_id = worker_entry(call, second.pid)["id"]
    info = wait_state(call, short_id, "done", timeout=10)
    assert (info["result"], info["worker"]) == (42, second_id)
    assert info["finished"] - pushed < 5.0
    assert call("get_task_info", long_id, 0)["state"] == "running"
    assert call("server_info")[0]["released"] == 1
    assert wait_state(call, long_id, "done", timeout=15)["worker"] == first_id


def test_an_executor_whose_pipe_breaks_at_hand_over_fails_that_batch_and_is_replaced():
    """An executor process whose pipe breaks just as the agent hands it a batch: those tasks are
    reported failed (ExecutorError, retried by the master), the executor is replaced by a new
    process, and the pool counts nothing as running afterwards; the tasks that went to the other
    executor run."""
    from ppq.config import load_config
    from ppq.worker.pool import Pool

    config = load_config(None)
    pool = Pool(config, 2, ["tests.tasks"], stopping=lambda: False, wake=lambda: None)
    reports: list[dict] = []
    pool.report = reports.append
    pool.start_executors()
    try:
        broken = pool.slots[0]
        old_pid = broken.pid
        broken.conn.close()  # the agent's end of the pipe: the next send fails as a broken pipe does
        tasks = [{"id": f"t{i}", "lease": f"l{i}", "module": "tests.tasks", "func": "add", "fclass": "", "path": "",
                  "parameters": encode_parameters([i, 1]), "retry": 0} for i in range(4)]
        with pool.cond:
            pool.accept(0, tasks)
        failed = [r for r in reports if not r["ok"]]
        # The first executor was handed an even share (2 of 4); both failed at once, to be retried.
        assert [r["id"] for r in failed] == ["t0", "t1"]
        assert all(r["error"].startswith("ExecutorError: cannot hand the task to the executor") and r["retry"]
                   for r in failed)
        assert pool.slots[0] is not broken and pool.slots[0].pid not in (None, old_pid)

        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)

        def supervised() -> bool:
            pool.supervise_once(0.05, wake_r)
            return len(reports) == 4

        wait_for(supervised, timeout=15, what="the other two tasks to run")
        assert sorted((r["id"], r.get("ok")) for r in reports[2:]) == [("t2", True), ("t3", True)]
        assert pool.busy() == 0 and not pool.inbox
        os.close(wake_r)
        os.close(wake_w)
    finally:
        pool.close()
