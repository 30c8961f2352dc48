"""The ``ppq`` command: real subprocesses against real masters, Redis and workers, and
click's CliRunner for what needs no server (usage and config errors)."""

from __future__ import annotations

import json
import logging
import os
import re
import shlex
import signal
import subprocess
import threading
import time
from contextlib import closing

import click
import psutil
import pytest
import yaml
from click.testing import CliRunner

from ppq import Client, PyroFunc, decode_parameters
from ppq.cli import main
from ppq.config import load_config
from ppq.embedded import free_port
from ppq.master import MasterServer

from .conftest import TESTS_DIR, address_of, pid_gone, ppq_command, ppq_env, run_ppq, wait_for, wait_state

W1 = {"id": "cli-test-worker", "host": "box", "pid": 77, "heartbeat_interval": 5}


@pytest.fixture
def master(module_master, ra, rb):
    """One in-process master for the tests here that start no worker; Redis flushed per test.
    Tests that start workers build their own with ``make_master`` (see test_worker.py for why)."""
    return module_master


@pytest.fixture
def runner():
    """A CliRunner; the ``ppq`` logger that a command configures is put back afterwards."""
    logger = logging.getLogger("ppq")
    saved = (list(logger.handlers), logger.level, logger.propagate)
    yield CliRunner()
    logger.handlers[:], logger.level, logger.propagate = saved


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def table_rows(text: str) -> list[tuple[str, list[dict[str, str]]]]:
    """The tables of ``ppq status``'s output: (title, rows), each row a dict by column header."""
    tables: list[tuple[str, list[dict[str, str]]]] = []
    header: list[str] = []
    title = ""
    for line in text.splitlines():
        if "\u2502" not in line:
            if line.strip() and not line.lstrip().startswith(("\u250c", "\u251c", "\u2514")):
                title, header = line.strip(), []
            continue
        cells = [c.strip() for c in line.strip().strip("\u2502").split("\u2502")]
        if not header:
            header = cells
            tables.append((title, []))
        else:
            tables[-1][1].append(dict(zip(header, cells, strict=True)))
    return tables


# A log line at INFO level of a ppq logger, in the default text format.
INFO_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO ppq\.[\w.]+: ")


# -- no server needed: CliRunner ----------------------------------------------------------------------


def test_version_and_help(runner):
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0 and "ppq, version" in result.output
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in ("master", "worker", "push", "status", "task", "dead", "up"):
        assert command in result.output
    result = runner.invoke(main, ["dead", "--help"])
    assert all(sub in result.output for sub in ("list", "requeue", "purge"))


@pytest.mark.parametrize(("config", "args", "key"), [
    ({"master": {"bogus": 1}}, ["master"], "master.bogus"),
    ({"worker": {"concurrency": "many"}}, ["worker"], "worker.concurrency"),
    ({"master": {"redis_map": {0: "http://127.0.0.1:6379"}}}, ["master"], "master.redis_map[0]"),
    ({"client": {"masters": 7600}}, ["status"], "client.masters"),
    ({}, ["master", "--redis-map", "0=not-a-url"], "master.redis_map[0]"),
    ({}, ["worker", "--concurrency", "-2"], "worker.concurrency"),
])
def test_config_errors_are_one_line_naming_the_key(runner, tmp_path, config, args, key):
    path = tmp_path / "ppq.yaml"
    path.write_text(yaml.safe_dump(config))
    for argv in (["--config", str(path), *args], [*args[:1], "--config", str(path), *args[1:]]):
        result = runner.invoke(main, argv)
        assert result.exit_code == 2, result.output
        lines = error_lines(result.stderr)
        assert len(lines) == 1 and lines[0].startswith("ppq: error:") and key in lines[0], result.stderr
        assert "Traceback" not in result.output


def test_unknown_env_variable_and_missing_config_file(runner, tmp_path):
    result = runner.invoke(main, ["status"], env={"PPQ_MASTER_PROT": "1"})
    assert result.exit_code == 2 and "PPQ_MASTER_PROT" in result.stderr
    result = runner.invoke(main, ["--config", str(tmp_path / "nope.yaml"), "status"])
    assert result.exit_code == 2 and "nope.yaml" in result.stderr
    result = runner.invoke(main, ["status"], env={"PPQ_CONFIG": str(tmp_path / "env.yaml")})
    assert result.exit_code == 2 and "env.yaml" in result.stderr


@pytest.mark.parametrize(("args", "words"), [
    (["push"], "TARGET"),
    (["push", "tasks.add", "--kwarg", "no-equals"], "KEY=VALUE"),
    (["dead", "requeue"], "--all"),
    (["worker", "--pool", "gevent"], "gevent"),
    (["push", "--file", "x.jsonl", "tasks.add"], "--file"),
])
def test_usage_errors_exit_2(runner, args, words):
    result = runner.invoke(main, ["--log-level", "ERROR", *args])
    assert result.exit_code == 2
    assert words in result.output
    assert "Traceback" not in result.output


# -- ppq master ---------------------------------------------------------------------------------------


def test_master_with_unreachable_redis_exits_with_one_clear_line(tmp_path):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    out = run_ppq("master", "--port", str(free_port()), "--redis-map", f"0={dead}")
    assert out.returncode != 0
    lines = error_lines(out.stderr)
    assert len(lines) == 1, out.stderr
    assert lines[0].startswith("ppq: error:") and "master.redis_map" in lines[0]
    assert "Traceback" not in out.stderr + out.stdout
    # The same from a config file, with the mapping form of a redis_map entry.
    path = tmp_path / "ppq.yaml"
    path.write_text(yaml.safe_dump({"master": {"port": free_port(),
                                               "redis_map": {3: {"host": "127.0.0.1", "port": free_port()}}}}))
    out = run_ppq("--config", str(path), "master")
    assert out.returncode != 0
    lines = error_lines(out.stderr)
    assert len(lines) == 1 and "master.redis_map[3]" in lines[0], out.stderr


def embedded_master(spawn, data):
    """``ppq master`` with embedded Redis in ``data``; returns it and a caller once it answers."""
    port = free_port()
    proc = spawn("master", "--port", str(port), "--data-dir", str(data), name="master-embedded")
    call = PyroFunc(f"127.0.0.1:{port}", timeout=3, default_return=None)
    wait_for(lambda: proc.poll() is not None or call("ping") == "pong", what="the embedded master")
    assert proc.poll() is None, spawn.log(proc)
    return proc, call


def test_a_second_master_on_the_same_data_dir_is_refused_and_the_first_keeps_working(spawn, tmp_path):
    data = tmp_path / "redis-data"
    first, call = embedded_master(spawn, data)
    redis_pid = int((data / "redis.pid").read_text())
    second = spawn("master", "--port", str(free_port()), "--data-dir", str(data), name="master-second")
    assert second.wait(30) != 0
    lines = [line for line in spawn.log(second).splitlines() if line.strip() and not line.startswith("$ ")]
    assert any("in use" in line and str(data) in line for line in lines), lines
    assert "Traceback" not in spawn.log(second)
    assert not pid_gone(redis_pid), "the second master stopped the first one's redis-server"
    task_id = call("push_task", "add", module="tasks", args=[1, 2])
    assert call("get_task_info", task_id, 0)["state"] == "queued"
    call.close()


def test_master_with_an_unusable_data_dir_says_so_in_one_line(spawn, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    proc = spawn("master", "--port", str(free_port()), "--data-dir", str(blocker / "data"), name="master-bad-dir")
    assert proc.wait(30) != 0
    log = spawn.log(proc)
    assert "Traceback" not in log and str(blocker / "data") in log, log


def test_master_without_redis_map_runs_embedded_redis_that_persists(spawn, tmp_path):
    data = tmp_path / "redis-data"
    first, call = embedded_master(spawn, data)
    assert str(data) in wait_for(lambda: "data in" in spawn.log(first) and spawn.log(first), timeout=5)
    task_id = call("push_task", "add", module="tasks", args=[1, 2], key="survivor")
    assert call("get_task_info", task_id, 0)["state"] == "queued"
    redis_pid = int((data / "redis.pid").read_text())
    assert not pid_gone(redis_pid)
    first.send_signal(signal.SIGTERM)
    assert first.wait(20) == 0, spawn.log(first)
    wait_for(lambda: pid_gone(redis_pid), timeout=10, what="the embedded redis-server to stop with its master")
    call.close()
    # Started again on the same data directory: the task is still there, still queued.
    port = free_port()
    second = spawn("master", "--port", str(port), "--data-dir", str(data), name="master-embedded")
    call = PyroFunc(f"127.0.0.1:{port}", timeout=3, default_return=None)
    try:
        wait_for(lambda: second.poll() is not None or call("ping") == "pong", what="the restarted master")
        info = call("get_task_info", task_id, 0)
        assert info is not None, spawn.log(second)
        assert (info["state"], info["args"], info["key"]) == ("queued", [1, 2], "survivor")
        # Its key still de-duplicates.
        assert call("push_task", "add", module="tasks", args=[5, 5], key="survivor") == task_id
    finally:
        call.close()
    second.send_signal(signal.SIGTERM)
    assert second.wait(20) == 0


# -- config precedence through the CLI ---------------------------------------------------------------------


def test_flag_beats_env_beats_yaml_through_the_cli(make_master, master, redis_a, redis_b, tmp_path):
    """Three masters told apart by their Redis: the one `ppq status` reaches shows which setting won."""
    from_yaml = make_master(master__redis_map={0: redis_a.url})
    from_env = make_master(master__redis_map={0: redis_b.url})
    from_flag = master  # queue_index 0 and 1
    path = tmp_path / "ppq.yaml"
    path.write_text(yaml.safe_dump({"client": {"masters": [address_of(from_yaml)]}}))

    def reached(*args, env=None):
        out = run_ppq(*args, env=env)
        assert out.returncode == 0, out.stderr
        info = json.loads(out.stdout)
        return sorted(info), info["0"]["redis"]

    env = {"PPQ_CLIENT_MASTERS": address_of(from_env)}
    assert reached("--config", str(path), "status", "--json") == (["0"], redis_a.url)
    assert reached("status", "--config", str(path), "--json", env={"PPQ_CONFIG": "/nonexistent.yaml"}) == \
        (["0"], redis_a.url)
    assert reached("--config", str(path), "status", "--json", env=env) == (["0"], redis_b.url)
    assert reached("status", "--json", env={"PPQ_CONFIG": str(path), **env}) == (["0"], redis_b.url)
    assert reached("--config", str(path), "status", "--json", "-m", address_of(from_flag), env=env) == \
        (["0", "1"], redis_a.url)


# -- client commands against a master ------------------------------------------------------------------------


def test_push_prints_an_id_and_task_shows_it(master, call):
    addr = address_of(master)
    out = run_ppq("push", "-m", addr, "tasks.echo", "1", "two", '{"x": [1]}', "-k", "k=v", "-k", "n=2",
                  "--delay", "60", "--key", "cli-key", "--max-retry", "2", "--retry-delay", "--task-timeout", "9")
    assert out.returncode == 0, out.stderr
    task_id = out.stdout.strip()
    assert len(out.stdout.splitlines()) == 1 and task_id
    info = call("get_task_info", task_id, 0)
    assert (info["module"], info["func"]) == ("tasks", "echo")
    assert info["args"] == [1, "two", {"x": [1]}] and info["kwargs"] == {"k": "v", "n": 2}
    assert (info["state"], info["key"], info["max_retry"], info["retry_delay"], info["timeout"]) == \
        ("delayed", "cli-key", 2, True, 9.0)
    out = run_ppq("push", "-m", addr, "-q", "1", "tasks.add", "1", "2")
    assert out.returncode == 0 and call("get_task_info", out.stdout.strip(), 1)["args"] == [1, 2]
    shown = run_ppq("task", "-m", addr, task_id)
    assert shown.returncode == 0, shown.stderr
    assert "delayed" in shown.stdout and "echo" in shown.stdout and "cli-key" in shown.stdout
    as_json = run_ppq("task", "-m", addr, task_id, "--json")
    assert as_json.returncode == 0
    data = json.loads(as_json.stdout)
    assert (data["id"], data["state"], data["args"]) == (task_id, "delayed", [1, "two", {"x": [1]}])
    unknown = run_ppq("task", "-m", addr, "no-such-task")
    assert unknown.returncode == 1 and "unknown" in unknown.stderr
    refused = run_ppq("push", "-m", addr, "tasks.add", "1", "--delay", "-5")
    assert refused.returncode == 1 and "delay" in refused.stderr and "Traceback" not in refused.stderr
    assert len(error_lines(refused.stderr)) == 1


def test_push_file_pushes_good_lines_and_names_refused_ones(master, call, tmp_path):
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join([
        json.dumps({"task": "tasks.add", "args": [1, 2]}),
        json.dumps({"func": "echo", "module": "tasks", "kwargs": {"a": 1}, "queue_index": 1}),
        json.dumps({"task": "tasks.add", "delay": -1}),
        "not json",
        json.dumps({"task": "tasks.add", "args": [3, 4]}),
    ]) + "\n")
    out = run_ppq("push", "-m", address_of(master), "--file", str(path))
    assert out.returncode == 1
    pushed = dict(line.split("\t") for line in out.stdout.splitlines())
    assert set(pushed) == {"1", "2", "5"}
    assert call("get_task_info", pushed["1"], 0)["args"] == [1, 2]
    assert call("get_task_info", pushed["2"], 1)["kwargs"] == {"a": 1}
    assert call("get_task_info", pushed["5"], 0)["args"] == [3, 4]
    assert "line 3" in out.stderr and "delay" in out.stderr and "line 4" in out.stderr
    assert "3 pushed, 2 refused" in out.stderr


def test_status_and_status_json(master, call):
    for i in range(3):
        call("push_task", "add", module="tasks", args=[i, i])
    call("push_task", "add", module="tasks", args=[0, 0], delay=300)
    call("push_task", "add", module="tasks", args=[0, 0], queue_index=1)
    call("get_task", W1, 0)
    call("heartbeat", W1, 0, [])
    out = run_ppq("status", "-m", address_of(master), env={"COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    tables = table_rows(out.stdout)
    assert [title for title, _ in tables] == ["queues", "redis", "workers (1)"], out.stdout
    queues = {row["queue"]: row for row in tables[0][1]}
    assert set(queues) == {"0", "1"}, out.stdout
    assert [queues["0"][k] for k in ("queued", "delayed", "leased", "dead", "workers")] == ["2", "1", "1", "0", "1"]
    assert [queues["1"][k] for k in ("queued", "delayed", "leased", "dead", "workers")] == ["1", "0", "0", "0", "0"]
    redis_rows = {row["queue"]: row for row in tables[1][1]}
    assert [(redis_rows[q]["AOF"], redis_rows[q]["result_ttl"]) for q in ("0", "1")] == [("off", "1d")] * 2
    (worker,) = tables[2][1]
    assert (worker["worker"], worker["queue"]) == (W1["id"], "0"), out.stdout
    out = run_ppq("status", "-m", address_of(master), "--json")
    assert out.returncode == 0
    data = json.loads(out.stdout)
    assert set(data) == {"0", "1"}
    assert (data["0"]["queued"], data["0"]["delayed"], data["0"]["running"], data["0"]["dead"]) == (2, 1, 1, 0)
    assert data["1"]["queued"] == 1
    assert W1["id"] in [w["id"] for w in data["0"]["workers"]]


def test_status_with_no_master_is_one_line(tmp_path):
    port = free_port()
    out = run_ppq("status", "-m", f"127.0.0.1:{port}", env={"PPQ_CLIENT_RETRY": "1", "PPQ_CLIENT_TIMEOUT": "2"})
    assert out.returncode == 1
    assert out.stdout == ""
    # The whole of stderr is one line: no log line, warning or traceback before or after it.
    assert out.stderr.count("\n") == 1 and out.stderr.endswith("\n"), out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"ppq: error: ConnectError: server_info: no master answered "
                           f"(PYRO:queue@127.0.0.1:{port}): cannot connect to "), line
    assert line.endswith(" (is a master running there? `ppq up` starts one; -m HOST:PORT or --config names "
                         "another)"), line


def _dead_task(call, tag):
    """Push a task, then play a worker that fails every queued task for good; return the new id."""
    task_id = call("push_task", "boom", module="tasks", args=[tag], max_retry=0)
    while (task := call("get_task", W1, 0)) is not None:
        (arg,), _ = decode_parameters(task["parameters"])
        call("task_error", task["id"], W1, 0, error=f"ValueError: {arg}", traceback="tb", lease=task["lease"],
             retry=False)
    assert call("get_task_info", task_id, 0)["state"] == "dead"
    return task_id


def test_dead_list_requeue_purge(master, call):
    addr = address_of(master)
    first = _dead_task(call, "first-death")
    second = _dead_task(call, "second-death")
    out = run_ppq("dead", "list", "-m", addr)
    assert out.returncode == 0, out.stderr
    assert first in out.stdout and second in out.stdout and "tasks.boom" in out.stdout
    assert "first-death" in out.stdout
    out = run_ppq("dead", "list", "-m", addr, "--json")
    listed = json.loads(out.stdout)
    assert [t["id"] for t in listed] == [second, first]  # newest first
    assert listed[0]["error"] == "ValueError: second-death"
    out = run_ppq("dead", "requeue", "-m", addr, first)
    assert out.returncode == 0 and "requeued 1 task(s)" in out.stdout
    assert call("get_task_info", first, 0)["state"] == "queued"
    assert [t["id"] for t in call("dead_tasks", 0)] == [second]
    out = run_ppq("dead", "purge", "-m", addr, second, "--yes")
    assert out.returncode == 0 and "purged 1 task(s)" in out.stdout
    assert call("get_task_info", second, 0) is None
    # --all / everything.
    third = _dead_task(call, "third")
    assert call("get_task_info", first, 0)["state"] == "dead"  # `first` was leased and failed again
    out = run_ppq("dead", "requeue", "-m", addr, "--all")
    assert "requeued 2 task(s)" in out.stdout
    assert {call("get_task_info", t, 0)["state"] for t in (first, third)} == {"queued"}
    fourth = _dead_task(call, "fourth")  # fails the requeued first and third again, too
    out = run_ppq("dead", "purge", "-m", addr, "--all", "--yes")
    assert out.returncode == 0 and "purged 3 task(s)" in out.stdout and call("dead_tasks", 0) == []
    assert all(call("get_task_info", t, 0) is None for t in (first, third, fourth))


def test_push_wait_prints_the_result(make_master, spawn):
    server = make_master()
    addr = address_of(server)
    spawn.worker(addr)
    out = run_ppq("push", "-m", addr, "tasks.add", "2", "3", "--wait")
    assert out.returncode == 0, out.stderr
    task_id, result = out.stdout.splitlines()
    assert json.loads(result) == 5
    call = PyroFunc(addr)
    assert call("get_task_info", task_id, 0)["state"] == "done"
    out = run_ppq("push", "-m", addr, "tasks.boom", "--max-retry", "0", "--wait")
    assert out.returncode == 1
    assert "failed" in out.stderr and "ValueError: boom" in out.stderr
    failed_id = out.stdout.strip()
    # `ppq task ID --wait` waits for the end, then shows the task, failed or not.
    shown = run_ppq("task", "-m", addr, failed_id, "--wait", "--json")
    assert shown.stdout.strip(), f"nothing shown; stderr: {shown.stderr}"
    shown_info = json.loads(shown.stdout)
    assert (shown_info["state"], shown_info["error"]) == ("dead", "ValueError: boom")
    call.close()


# -- ppq up ------------------------------------------------------------------------------------------------------


def test_up_demo_prints_each_call_with_its_result(spawn, tmp_path):
    port = free_port()
    up = spawn("up", "--demo", "--port", str(port), "--data-dir", str(tmp_path / "demo-data"), name="up-demo")
    children: set[int] = set()
    try:
        wait_for(lambda: up.poll() is not None or "went to the dead list as expected" in spawn.log(up),
                 timeout=60, what="the demo to finish")
        assert up.poll() is None, spawn.log(up)
        children = {p.pid for p in psutil.Process(up.pid).children(recursive=True)}
        rows = {}
        for line in spawn.log(up).splitlines():
            cells = [c.strip() for c in line.split("\u2502") if c.strip()]
            if len(cells) == 3 and cells[1] != "call":
                rows[cells[1]] = cells[2]
        expected = {f"add({i}, {i})": str(2 * i) for i in range(5)} | {f"slow_square({i})": str(i * i)
                                                                        for i in range(5)}
        assert {k: v for k, v in rows.items() if k != "where()"} == expected, spawn.log(up)
        assert '"pid"' in rows["where()"]
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0, spawn.log(up)
        wait_for(lambda: all(pid_gone(p) for p in children), timeout=15, what="every child of ppq up to exit")
    finally:
        for pid in children:  # only if the test failed half-way: they were started by this test
            if not pid_gone(pid):
                psutil.Process(pid).kill()


def test_up_runs_a_local_stack_and_sigint_stops_everything(spawn, tmp_path):
    port = free_port()
    data = tmp_path / "up-data"
    env = {"PPQ_WORKER_MAX_SLEEP": "1", "PPQ_WORKER_HEARTBEAT_INTERVAL": "0.5"}
    up = spawn("up", "--workers", "1", "--allow", "tasks", "--port", str(port), "--data-dir", str(data), env=env,
               name="up")
    addr = f"127.0.0.1:{port}"
    ping = PyroFunc(addr, timeout=3, default_return=None)
    children: set[int] = set()
    try:
        wait_for(lambda: up.poll() is not None or ping("ping") == "pong", what="ppq up's master")
        assert up.poll() is None, spawn.log(up)
        client = Client([addr])
        task_id = client.push("tasks.add", 2, 3)
        assert client.result(task_id, timeout=30) == 5
        client.close()
        workers = wait_for(lambda: ping("server_info")[0]["workers"], timeout=10)
        assert len(workers) == 1
        redis_pid = int((data / "redis.pid").read_text())
        children = {p.pid for p in psutil.Process(up.pid).children(recursive=True)}
        assert redis_pid in children and workers[0]["pid"] in children
        assert str(data) in spawn.log(up)
        up.send_signal(signal.SIGINT)
        assert up.wait(30) == 0, spawn.log(up)
        wait_for(lambda: pid_gone(redis_pid), timeout=10, what="redis-server to stop")
        wait_for(lambda: all(pid_gone(p) for p in children), timeout=15,
                 what=f"every child of ppq up to exit: {[p for p in children if not pid_gone(p)]}")
    finally:
        ping.close()
        for pid in children:  # only if the test failed half-way: they were started by this test
            if not pid_gone(pid):
                psutil.Process(pid).kill()


# -- ppq up supervises its children, piped or not ----------------------------------------------------------------

UP_ENV = {"PPQ_WORKER_MAX_SLEEP": "1", "PPQ_WORKER_HEARTBEAT_INTERVAL": "0.5", "PPQ_WORKER_CONCURRENCY": "1"}


def up_argv(port: int, data, *extra: str) -> list[str]:
    return [*ppq_command(), "up", "--workers", "1", "--allow", "tasks", "--port", str(port), "--data-dir", str(data),
            *extra]


def descendants(pid: int) -> set[int]:
    return {p.pid for p in psutil.Process(pid).children(recursive=True)}


def kill_left(pids: set[int]) -> None:
    """Only if a test failed half-way: these were started by the test."""
    for pid in pids:
        if not pid_gone(pid):
            psutil.Process(pid).kill()


def task_after(data, task_id: str, states: tuple[str, ...] = ("done", "queued")) -> dict:
    """The task's record once `ppq up` is gone, read through a master on the same embedded Redis data, as
    soon as it is in one of ``states`` (that master's reaper puts a task whose lease expired back in the queue)."""
    config = load_config(overrides={"master.port": 0, "master.data_dir": str(data), "master.reaper_interval": 0.2},
                         environ={})
    with MasterServer(config) as server, closing(PyroFunc(server.uri)) as call:
        return wait_state(call, task_id, states)


def running_sleeper(addr: str, seconds: float = 2.0) -> str:
    """Push tasks.sleep_then to the stack at ``addr``; return its id once a worker runs it."""
    with closing(PyroFunc(addr, timeout=3)) as call:
        wait_for(lambda: call("server_info")[0]["workers"], what="the stack's worker to register")
        client = Client([addr])
        task_id = client.push("tasks.sleep_then", seconds, "slept")
        client.close()
        wait_state(call, task_id, "running")
    return task_id


def wait_ready(proc: subprocess.Popen, addr: str) -> None:
    with closing(PyroFunc(addr, timeout=3, default_return=None)) as ping:
        wait_for(lambda: proc.poll() is not None or ping("ping") == "pong", timeout=30, what="ppq up's master")
    assert proc.poll() is None


def assert_reported(data, task_id: str) -> None:
    """Done with its result, or back in the queue: never lost, never left running."""
    info = task_after(data, task_id)
    assert info is not None and info["state"] in ("done", "queued"), info
    if info["state"] == "done":
        assert info["result"] == "slept"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_up_with_its_output_piped_stops_workers_master_and_redis_on_a_signal(tmp_path, signum):
    """`ppq up` whose stdout is a pipe read by another process; the signal goes to its process group, as a
    terminal sends it. The worker finishes the running task and reports it before the master stops."""
    port, data = free_port(), tmp_path / "up-data"
    errors = open(tmp_path / "up.err", "wb")  # noqa: SIM115 - closed below
    up = subprocess.Popen(up_argv(port, data), stdout=subprocess.PIPE, stderr=errors, env=ppq_env(UP_ENV),
                          cwd=str(TESTS_DIR), start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.decode() for line in up.stdout), daemon=True)
    reader.start()
    family: set[int] = set()
    try:
        wait_ready(up, f"127.0.0.1:{port}")
        task_id = running_sleeper(f"127.0.0.1:{port}")
        family = descendants(up.pid)
        redis_pid = int((data / "redis.pid").read_text())
        assert redis_pid in family and len(family) >= 3  # redis-server, the worker agent, its executor
        os.killpg(up.pid, signum)
        assert up.wait(60) == 0, (tmp_path / "up.err").read_text()
        wait_for(lambda: all(pid_gone(p) for p in family), timeout=15,
                 what=f"every child of ppq up to exit: {[p for p in family if not pid_gone(p)]}")
        reader.join(10)
        assert "stopping...\n" in lines, lines
        log = (tmp_path / "up.err").read_text()
        assert log.index("stopped: 1 done") < log.index("master stopped"), log
        assert task_after(data, task_id, ("done",))["result"] == "slept"
    finally:
        errors.close()
        if up.poll() is None:
            up.kill()
            up.wait(10)
        reader.join(10)
        up.stdout.close()
        kill_left(family)


def test_up_a_second_ctrl_c_stops_the_worker_at_once_and_its_task_goes_back_to_the_queue(tmp_path):
    """The worker hands its running task back; if its long-poll still in flight takes it again, the
    lease (master.lease_timeout, 3 s here) expires and the task is back in the queue all the same."""
    port, data = free_port(), tmp_path / "up-data"
    errors = open(tmp_path / "up.err", "wb")  # noqa: SIM115 - closed below
    up = subprocess.Popen(up_argv(port, data), stdout=subprocess.PIPE, stderr=errors,
                          env=ppq_env({**UP_ENV, "PPQ_MASTER_LEASE_TIMEOUT": "3"}),
                          cwd=str(TESTS_DIR), start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(line.decode() for line in up.stdout), daemon=True)
    reader.start()
    family: set[int] = set()
    try:
        wait_ready(up, f"127.0.0.1:{port}")
        task_id = running_sleeper(f"127.0.0.1:{port}", seconds=60)
        family = descendants(up.pid)
        os.killpg(up.pid, signal.SIGINT)
        wait_for(lambda: "stopping...\n" in lines, what="ppq up to start stopping")
        os.killpg(up.pid, signal.SIGINT)
        assert up.wait(30) == 0, (tmp_path / "up.err").read_text()
        wait_for(lambda: all(pid_gone(p) for p in family), timeout=15, what="every child of ppq up to exit")
        assert "stopping the workers at once" in (tmp_path / "up.err").read_text()
        assert task_after(data, task_id, ("queued",))["state"] == "queued"
    finally:
        errors.close()
        if up.poll() is None:
            up.kill()
            up.wait(10)
        reader.join(10)
        up.stdout.close()
        kill_left(family)


def test_up_piped_into_tee_stops_everything_on_ctrl_c_and_the_task_is_reported(tmp_path):
    """`ppq up ... | tee log`, then Ctrl-C: tee dies with the signal, so `ppq up` writes into a pipe with no
    reader; it still stops the worker (which reports its task), the master and Redis, and nothing outlives it."""
    port, data = free_port(), tmp_path / "up-data"
    argv = " ".join(shlex.quote(a) for a in up_argv(port, data))
    err, out = shlex.quote(str(tmp_path / "up.err")), shlex.quote(str(tmp_path / "tee.out"))
    shell = subprocess.Popen(["sh", "-c", f"{argv} 2>{err} | tee {out}"], stdout=subprocess.DEVNULL,
                             env=ppq_env(UP_ENV), cwd=str(TESTS_DIR), start_new_session=True)
    family: set[int] = set()
    try:
        up_pid = wait_for(lambda: next((p.pid for p in psutil.Process(shell.pid).children()
                                        if "up" in p.cmdline()), None), what="ppq up under sh")
        tee = next(p for p in psutil.Process(shell.pid).children() if p.name() == "tee")
        wait_ready(shell, f"127.0.0.1:{port}")
        task_id = running_sleeper(f"127.0.0.1:{port}")
        family = descendants(up_pid) | {up_pid}
        assert len(family) >= 4
        os.killpg(shell.pid, signal.SIGINT)
        wait_for(lambda: pid_gone(tee.pid), timeout=10, what="tee to die of the Ctrl-C")
        wait_for(lambda: all(pid_gone(p) for p in family), timeout=60,
                 what=f"ppq up and its children to exit: {[p for p in family if not pid_gone(p)]}")
        log = (tmp_path / "up.err").read_text()
        assert "stopped: 1 done" in log and "Traceback" not in log, log
        assert "master: PYRO:queue@" in (tmp_path / "tee.out").read_text()
        assert_reported(data, task_id)
    finally:
        if shell.poll() is None:
            shell.kill()
        shell.wait(10)
        kill_left(family)


def test_up_stops_everything_when_the_reader_of_its_output_goes_away(tmp_path):
    """No signal at all: the process reading `ppq up`'s stdout closes it (as `| head` does)."""
    port, data = free_port(), tmp_path / "up-data"
    errors = open(tmp_path / "up.err", "wb")  # noqa: SIM115 - closed below
    up = subprocess.Popen(up_argv(port, data), stdout=subprocess.PIPE, stderr=errors, env=ppq_env(UP_ENV),
                          cwd=str(TESTS_DIR), start_new_session=True)
    family: set[int] = set()
    try:
        assert up.stdout.readline().startswith(b"redis: ")
        wait_ready(up, f"127.0.0.1:{port}")
        task_id = running_sleeper(f"127.0.0.1:{port}")
        family = descendants(up.pid)
        up.stdout.close()
        assert up.wait(60) == 0, (tmp_path / "up.err").read_text()
        wait_for(lambda: all(pid_gone(p) for p in family), timeout=15, what="every child of ppq up to exit")
        log = (tmp_path / "up.err").read_text()
        assert "standard output was closed: stopping" in log and "stopped: 1 done" in log, log
        assert task_after(data, task_id, ("done",))["result"] == "slept"
    finally:
        errors.close()
        if up.poll() is None:
            up.kill()
            up.wait(10)
        up.stdout.close()
        kill_left(family)


def test_up_restarts_a_worker_that_dies_and_stops_everything_when_redis_dies(spawn, tmp_path):
    port, data = free_port(), tmp_path / "up-data"
    up = spawn(*up_argv(port, data)[len(ppq_command()):], env=UP_ENV, name="up")
    addr = f"127.0.0.1:{port}"
    family: set[int] = set()
    try:
        wait_ready(up, addr)
        with closing(PyroFunc(addr, timeout=3)) as call:
            first = wait_for(lambda: call("server_info")[0]["workers"], what="the first worker")[0]["pid"]
            agent = psutil.Process(first)
            # One that dies within 5 s of its start stops the stack instead: let it live longer.
            wait_for(lambda: time.time() - agent.create_time() > 5.5, timeout=15, interval=0.2,
                     what="the worker to be older than 5 s")
            family = descendants(up.pid)
            agent.kill()
            wait_for(lambda: f"worker pid {first} exited with -9; starting another" in spawn.log(up),
                     what="ppq up to name the dead worker")
            second = wait_for(lambda: [w["pid"] for w in call("server_info")[0]["workers"] if w["pid"] != first],
                              what="the new worker to register")[0]
        assert second in descendants(up.pid)
        family |= descendants(up.pid)
        redis_pid = int((data / "redis.pid").read_text())
        psutil.Process(redis_pid).kill()
        assert up.wait(60) == 1, spawn.log(up)
        last = spawn.log(up).strip().splitlines()[-1]
        assert last == (f"ppq: error: the embedded redis-server (pid {redis_pid}) exited with -9; "
                        f"everything is stopped"), spawn.log(up)
        wait_for(lambda: all(pid_gone(p) for p in family), timeout=15,
                 what=f"every child of ppq up to exit: {[p for p in family if not pid_gone(p)]}")
    finally:
        kill_left(family)


# -- user paths: a stack started with `ppq up --config FILE` -------------------------------------------------


class UpStack:
    """A ``ppq up --config cfg.yaml`` subprocess on a free port, with its embedded Redis under tmp_path."""

    def __init__(self, spawn, tmp_path, *args, config=None, env=None):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        data = {"master": {"port": self.port, "data_dir": str(tmp_path / "up-data")},
                "worker": {"max_sleep": 1, "heartbeat_interval": 0.5}}
        for section, values in (config or {}).items():
            data.setdefault(section, {}).update(values)
        self.config = tmp_path / "cfg.yaml"
        self.config.write_text(yaml.safe_dump(data))
        self.spawn = spawn
        self.proc = spawn("up", "--config", str(self.config), *args, env=env, name="up")
        self.call = PyroFunc(self.address, timeout=3, default_return=None)
        wait_for(lambda: self.proc.poll() is not None or self.call("ping") == "pong", timeout=30,
                 what="ppq up's master")
        assert self.proc.poll() is None, spawn.log(self.proc)
        self.children = {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}

    def stop(self):
        self.call.close()
        if self.proc.poll() is None:
            self.children |= {p.pid for p in psutil.Process(self.proc.pid).children(recursive=True)}
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(30)
            except Exception:  # noqa: BLE001 - killed below
                self.proc.kill()
        for pid in self.children:  # started by this test; only left if it failed half-way
            if not pid_gone(pid):
                psutil.Process(pid).kill()


@pytest.fixture
def up_stack(spawn, tmp_path):
    stacks = []

    def start(*args, config=None, env=None):
        stacks.append(UpStack(spawn, tmp_path, *args, config=config, env=env))
        return stacks[-1]

    yield start
    for stack in stacks:
        stack.stop()


def test_client_commands_and_workers_reach_the_configs_own_master(up_stack, spawn, tmp_path):
    """With master.port in the config and nothing else, every client command given that config (by
    --config, PPQ_CONFIG or PPQ_MASTER_PORT) and a worker given it reach that master, not 7600."""
    stack = up_stack("--workers", "1", "--allow", "tasks")
    cfg = str(stack.config)
    redis_url = stack.call("server_info")[0]["redis"]
    out = run_ppq("push", "--config", cfg, "tasks.add", "2", "3", "--wait")
    assert out.returncode == 0, out.stderr
    task_id, result = out.stdout.split()
    assert json.loads(result) == 5 and stack.call("get_task_info", task_id, 0)["state"] == "done"
    for args, env in ((["status", "--config", cfg, "--json"], None),
                      (["--config", cfg, "status", "--json"], None),
                      (["status", "--json"], {"PPQ_CONFIG": cfg}),
                      (["status", "--json"], {"PPQ_MASTER_PORT": str(stack.port)})):
        out = run_ppq(*args, env=env)
        assert out.returncode == 0, (args, env, out.stderr)
        assert json.loads(out.stdout)["0"]["redis"] == redis_url, (args, env)
    out = run_ppq("push", "tasks.add", "1", "1", env={"PPQ_CONFIG": cfg})
    assert out.returncode == 0, out.stderr
    assert stack.call("get_task_info", out.stdout.strip(), 0) is not None
    # A worker given only the config pulls from the same master.
    worker = spawn("worker", "--config", cfg, "--allow", "tasks", "--port", "0", "-c", "1")
    wait_for(lambda: any(w.get("pid") == worker.pid for w in stack.call("server_info")[0]["workers"]),
             what="the worker started with --config to register")
    # -m beats the config.
    out = run_ppq("status", "--config", cfg, "-m", f"127.0.0.1:{free_port()}",
                  env={"PPQ_CLIENT_RETRY": "1", "PPQ_CLIENT_TIMEOUT": "2"})
    assert out.returncode == 1 and "ConnectError" in out.stderr


def test_unknown_ppq_variables_warn_and_typos_stop_with_the_right_name(master):
    addr = address_of(master)
    out = run_ppq("workers", "-m", addr, "--json", env={"PPQ_PROJECT": "/x"})
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("PPQ_PROJECT") == 1 and "not a ppq setting" in out.stderr
    assert json.loads(out.stdout) == []
    out = run_ppq("workers", "-m", addr)
    assert out.returncode == 0 and out.stdout.strip() == "no live workers"
    out = run_ppq("status", "-m", addr, env={"PPQ_MASTER_PROT": "7600"})
    assert out.returncode == 2
    assert error_lines(out.stderr) == ["ppq: error: unknown environment variable PPQ_MASTER_PROT: did you mean "
                                       "PPQ_MASTER_PORT?"]


def test_dead_commands_confirm_report_unknown_ids_and_say_when_empty(master, call, tmp_path):
    addr = address_of(master)
    out = run_ppq("dead", "list", "-m", addr)
    assert out.returncode == 0 and out.stdout.strip() == "no dead tasks in queue_index 0"
    first, second = _dead_task(call, "one"), _dead_task(call, "two")
    unknown = "f" * 32
    # Nothing named: a usage error, nothing deleted.
    out = run_ppq("dead", "purge", "-m", addr)
    assert out.returncode == 2 and "--all" in out.stderr
    # --all without a terminal to ask at: refused without --yes.
    out = run_ppq("dead", "purge", "-m", addr, "--all")
    assert out.returncode == 2 and "--yes" in out.stderr
    assert len(call("dead_tasks", 0)) == 2
    # Unknown ids are named and make the exit code 1; the known ones are still handled.
    out = run_ppq("dead", "purge", "-m", addr, first, unknown, "--yes")
    assert out.returncode == 1 and "purged 1 task(s)" in out.stdout
    assert f"{unknown}: unknown in queue_index 0" in out.stderr
    assert call("get_task_info", first, 0) is None
    queued = call("push_task", "add", module="tasks", args=[1, 1])
    out = run_ppq("dead", "requeue", "-m", addr, unknown, queued)
    assert out.returncode == 1 and "requeued 0 task(s)" in out.stdout
    assert f"{unknown}: unknown" in out.stderr and f"{queued}: queued, not dead" in out.stderr
    # The group takes --config too.
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"client": {"masters": [addr]}}))
    out = run_ppq("dead", "--config", str(cfg), "list", "--json")
    assert out.returncode == 0, out.stderr
    assert [t["id"] for t in json.loads(out.stdout)] == [second]


def test_cancel_command(master, call):
    addr = address_of(master)
    gone = _dead_task(call, "gone")
    waiting = call("push_task", "add", module="tasks", args=[1, 1])
    later = call("push_task", "add", module="tasks", args=[1, 1], delay=60)
    out = run_ppq("cancel", "-m", addr, waiting, later)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{waiting}: cancelled (was queued)", f"{later}: cancelled (was delayed)"]
    assert {call("get_task_info", t, 0)["state"] for t in (waiting, later)} == {"cancelled"}
    out = run_ppq("cancel", "-m", addr, waiting, gone, "0" * 32)
    assert out.returncode == 1
    assert out.stdout.strip() == f"{waiting}: already cancelled"
    assert f"{gone}: already dead, not cancelled" in out.stderr and f"{'0' * 32}: unknown" in out.stderr
    assert call("get_task_info", gone, 0)["state"] == "dead"
    out = run_ppq("cancel", "-m", addr)
    assert out.returncode == 2


def test_push_file_streams_and_prints_ids_as_chunks_are_stored(master, call, tmp_path):
    """The file is a FIFO still being written: ids of the first chunks come out before it ends."""
    fifo = tmp_path / "tasks.fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([*ppq_command(), "push", "-m", address_of(master), "--file", str(fifo), "--chunk", "2",
                             "-q", "1", "--max-retry", "3"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=ppq_env(), cwd=str(TESTS_DIR), text=True)
    try:
        with open(fifo, "w") as writer:
            for i in range(4):
                writer.write(json.dumps({"task": "tasks.add", "args": [i, i]}) + "\n")
            writer.write(json.dumps({"task": "tasks.add", "args": [9, 9], "queue_index": 0}) + "\n")
            writer.flush()
            first = [proc.stdout.readline() for _ in range(4)]  # before the writer has closed the file
            assert [line.split("\t")[0] for line in first] == ["1", "2", "3", "4"]
        rest, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    ids = dict(line.split("\t") for line in [*first, *rest.splitlines()])
    ids = {n: t.strip() for n, t in ids.items()}
    info = call("get_task_info", ids["1"], 1)  # -q applies to lines that do not set queue_index
    assert (info["args"], info["max_retry"]) == ([0, 0], 3)
    assert call("get_task_info", ids["5"], 0)["args"] == [9, 9]
    assert "5 pushed, 0 refused" in err


def test_push_file_names_a_line_that_is_not_utf8(master, call, tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps({"task": "tasks.echo", "args": ["ok"]}).encode() + b"\n"
                     + '{"task": "tasks.echo", "args": ["caf\u00e9"]}\n'.encode("latin-1"))
    out = run_ppq("push", "-m", address_of(master), "--file", str(path))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "line 2: refused: not UTF-8 text" in out.stderr and "1 pushed, 1 refused" in out.stderr
    (n, task_id), = (line.split("\t") for line in out.stdout.splitlines())
    assert n == "1" and call("get_task_info", task_id, 0)["args"] == ["ok"]


def test_push_file_ctrl_c_keeps_every_printed_id_and_resumes_with_skip(master, ra, tmp_path):
    """SIGINT to a real `ppq push --file big.jsonl > ids.txt` mid-file: every id in ids.txt is stored,
    nothing else is, and --skip N from the message pushes exactly the rest."""
    lines = 60_000
    big = tmp_path / "big.jsonl"
    with open(big, "w") as f:
        for i in range(lines):
            f.write(f'{{"task": "tasks.add", "args": [{i}, 1]}}\n')
    ids_path = tmp_path / "ids.txt"
    args = [*ppq_command(), "push", "-m", address_of(master), "--file", str(big), "--chunk", "200"]
    with open(ids_path, "w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.PIPE, env=ppq_env(), cwd=str(TESTS_DIR),
                                text=True)
    try:
        wait_for(lambda: ids_path.stat().st_size > 0, what="the first ids")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    found = re.search(r"interrupted after (\d+) pushed \(lines 1-(\d+) done\): resume with --skip (\d+)", err)
    assert found, err
    pushed, last, skip = map(int, found.groups())
    assert pushed == last == skip and 0 < pushed < lines
    printed = [line.split("\t") for line in ids_path.read_text().splitlines()]
    assert [int(n) for n, _ in printed] == list(range(1, pushed + 1))
    assert ra.llen("ppq:0:queue") == pushed
    with open(ids_path, "a") as out:
        rest = subprocess.run([*args, "--skip", str(skip)], stdout=out, stderr=subprocess.PIPE, env=ppq_env(),
                              cwd=str(TESTS_DIR), text=True, timeout=120)
    assert rest.returncode == 0, rest.stderr
    printed = [line.split("\t") for line in ids_path.read_text().splitlines()]
    assert [int(n) for n, _ in printed] == list(range(1, lines + 1))
    assert len({t for _, t in printed}) == lines and ra.llen("ppq:0:queue") == lines


def _commands(group, prefix=()):
    for name, command in sorted(group.commands.items()):
        yield (*prefix, name), command
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))


def test_every_help_documents_each_option_shows_defaults_one_way_and_ends_with_an_example():
    paths = [(), *(path for path, _ in _commands(main))]
    assert ("cancel",) in paths and ("dead", "purge") in paths
    for path in paths:
        command = main
        for name in path:
            command = command.commands[name]
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                assert param.help, f"ppq {' '.join(path)} {param.opts[0]} has no help"
                assert "default" not in param.help.lower(), f"{param.opts[0]}: a default written in its help"
        out = run_ppq(*path, "--help")
        assert out.returncode == 0, out.stderr
        lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
        start = max(i for i, line in enumerate(lines) if line == "Example:")
        examples = lines[start + 1:]
        assert examples and all(line.startswith("ppq ") for line in examples), (path, examples)
        if path:
            assert any(line.startswith(f"ppq {' '.join(path)}") for line in examples), (path, examples)
        assert "[default:" in out.stdout, path
    push_help = run_ppq("push", "--help").stdout
    assert "--task-timeout" in push_help and "(worker.task_timeout: 300.0)" in push_help
    assert "--wait-timeout" in run_ppq("task", "--help").stdout


def test_log_level_is_a_case_insensitive_choice_and_ambiguous_timeouts_are_renamed(master):
    addr = address_of(master)
    for args in (["--log-level", "debug", "status", "-m", addr, "--json"],
                 ["status", "--log-level", "Warning", "-m", addr, "--json", "--log-format", "JSON"]):
        out = run_ppq(*args)
        assert out.returncode == 0, out.stderr
    out = run_ppq("status", "--log-level", "loud", "-m", addr)
    assert out.returncode == 2 and "loud" in out.stderr
    out = run_ppq("push", "-m", addr, "tasks.add", "1", "2", "--timeout", "5")
    assert out.returncode == 2 and "--task-timeout" in out.stderr and out.stdout == ""
    out = run_ppq("task", "-m", addr, "0" * 32, "--wait", "--timeout", "5")
    assert out.returncode == 2 and "--wait-timeout" in out.stderr


# -- ports -------------------------------------------------------------------------------------------------


@pytest.fixture
def taken_port():
    """A port this test holds open (listening), so that nothing else can bind it."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    yield sock.getsockname()[1]
    sock.close()


def test_an_explicit_port_that_is_taken_is_an_error_everywhere(taken_port, redis_a, tmp_path):
    port = str(taken_port)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"worker": {"port": taken_port}}))
    redis_map = f"0={redis_a.url}"
    cases = [
        (["worker", "--port", port, "--master-hosts", "127.0.0.1:1"], None, "worker.port"),
        (["worker", "--master-hosts", "127.0.0.1:1"], {"PPQ_WORKER_PORT": port}, "worker.port"),
        (["worker", "--config", str(cfg), "--master-hosts", "127.0.0.1:1"], None, "worker.port"),
        (["worker", "--port", "0", "--metrics-port", port, "--master-hosts", "127.0.0.1:1"], None,
         "worker.metrics_port"),
        (["master", "--port", port, "--redis-map", redis_map], None, "master.port"),
        (["master", "--port", "0", "--metrics-port", port, "--redis-map", redis_map], None, "master.metrics_port"),
        (["up", "--port", port, "--data-dir", str(tmp_path / "d1"), "--workers", "0"], None, "master.port"),
        (["up", "--port", "0", "--metrics-port", port, "--data-dir", str(tmp_path / "d2"), "--workers", "0"], None,
         "master.metrics_port"),
    ]
    for args, env, key in cases:
        out = run_ppq(*args, env=env, timeout=60)
        assert out.returncode == 2, (args, out.stdout, out.stderr)
        assert out.stdout == "", (args, out.stdout)
        # The error is the last line and the only one; before it, at most INFO lines of what was
        # started and stopped again (the embedded redis-server, the master): no warning, no traceback.
        *before, last = error_lines(out.stderr)
        assert last.startswith("ppq: error:") and key in last and port in last, (args, out.stderr)
        assert all(INFO_LINE.match(line) for line in before), (args, out.stderr)


def test_up_takes_host_queue_index_and_metrics_port_like_the_daemons(up_stack, redis_a, redis_b, ra, rb):
    metrics = free_port()
    stack = up_stack("--host", "127.0.0.1", "--queue-index", "1", "--metrics-port", str(metrics), "--allow", "tasks",
                     config={"master": {"redis_map": {0: redis_a.url, 1: redis_b.url}}})
    cfg = str(stack.config)
    out = run_ppq("push", "--config", cfg, "-q", "1", "tasks.add", "20", "22", "--wait", timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.split()[1]) == 42
    workers = stack.call("server_info")[1]["workers"]
    assert len(workers) == 1 and stack.call("server_info")[0]["workers"] == []
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/metrics", timeout=5) as reply:
        assert "queue_index=\"1\"" in reply.read().decode()
    out = run_ppq("up", "--config", cfg, "--port", "0", "--queue-index", "5", "--workers", "0", timeout=60)
    assert out.returncode == 2 and "worker.queue_index: 5 is not served" in out.stderr


def test_up_stops_when_a_worker_fails_on_its_config_instead_of_restarting_it(spawn, tmp_path, taken_port):
    """Two workers cannot share worker.metrics_port: the one that cannot listen exits with a config
    error, and `ppq up` stops everything with exit code 2 rather than restarting it again and again."""
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"master": {"port": free_port(), "data_dir": str(tmp_path / "data")},
                                   "worker": {"metrics_port": taken_port}}))
    up = spawn("up", "--config", str(cfg), "--workers", "1", name="up")
    assert up.wait(60) == 2, spawn.log(up)
    log = spawn.log(up)
    assert "starting another" not in log
    assert f"worker.metrics_port: cannot listen on {taken_port}" in log
    assert log.strip().splitlines()[-1] == ("ppq: error: a worker stopped on a configuration error (above); "
                                            "everything is stopped")
