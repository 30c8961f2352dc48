"""What the daemons and commands say, read from their real stdout and stderr: each fact once,
JSON lines only with ``--log-format json``, one line per failed attempt, one line per error."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ppq import Client
from ppq.embedded import free_port
from ppq.rpc import PyroFunc

from .conftest import TESTS_DIR, ppq_env, run_ppq, wait_for

STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}"


class Daemon:
    """``python -m ppq ARGS`` with its stdout and stderr in files of their own."""

    def __init__(self, tmp_path: Path, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.out_path = tmp_path / f"{name}.out"
        self.err_path = tmp_path / f"{name}.err"
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "ppq", *args], stdout=out, stderr=err,
                                         stdin=subprocess.DEVNULL, env=ppq_env(env), cwd=str(TESTS_DIR))

    def out(self) -> list[str]:
        return self.out_path.read_text(errors="replace").splitlines()

    def err(self) -> list[str]:
        return self.err_path.read_text(errors="replace").splitlines()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def start(name: str, *args: str, env: dict[str, str] | None = None) -> Daemon:
        daemon = Daemon(tmp_path, name, *args, env=env)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        if daemon.proc.poll() is None:
            daemon.proc.kill()
            daemon.proc.wait(10)


def ready_master(daemons: Any, port: int, redis_url: str) -> Daemon:
    """A ``ppq master`` on ``port`` over ``redis_url``, once its log says it is ready."""
    master: Daemon = daemons("master", "master", "--port", str(port), "--redis-map", f"0={redis_url}")
    wait_for(lambda: master.proc.poll() is not None or any("master ready" in line for line in master.err()),
             what="the master to start")
    assert master.proc.poll() is None, master.err()
    return master


def matching(lines: list[str], patterns: list[str]) -> None:
    """Assert that ``lines`` are exactly one line per pattern (full matches), in order."""
    assert len(lines) == len(patterns), "\n".join(lines)
    for line, pattern in zip(lines, patterns, strict=True):
        assert re.fullmatch(pattern, line), f"{line!r} does not match {pattern!r}"


def json_messages(lines: list[str]) -> list[str]:
    """The messages of ``lines``, each of which must be a JSON object of a ppq logger."""
    messages = []
    for line in lines:
        data = json.loads(line)
        assert data["logger"].startswith("ppq.") and data["level"] in ("DEBUG", "INFO", "WARNING", "ERROR"), line
        messages.append(data["message"])
    return messages


# -- 1. start-up: each fact once ---------------------------------------------------------------------


def test_master_logs_redis_and_its_uri_once_and_prints_nothing(daemons, tmp_path):
    port = free_port()
    data = tmp_path / "data"
    master = daemons("master", "master", "--port", str(port), "--data-dir", str(data))
    wait_for(lambda: any("master ready" in line for line in master.err()), what="the master to start")
    assert master.stop() == 0
    assert master.out() == []
    matching(master.err(), [
        rf"{STAMP} INFO ppq\.master: embedded redis-server pid \d+ on redis://127\.0\.0\.1:\d+/0, data in {data}",
        rf"{STAMP} INFO ppq\.master: master ready: PYRO:queue@127\.0\.0\.1:{port}, queue_index 0",
        rf"{STAMP} INFO ppq\.master: master stopped",
    ])


def test_master_with_json_logs_writes_json_lines_only(daemons, tmp_path):
    port = free_port()
    data = tmp_path / "data"
    master = daemons("master", "master", "--log-format", "json", "--port", str(port), "--data-dir", str(data))
    wait_for(lambda: any("master ready" in line for line in master.err()), what="the master to start")
    assert master.stop() == 0
    assert master.out() == []
    messages = json_messages(master.err())
    matching(messages, [rf"embedded redis-server pid \d+ on redis://127\.0\.0\.1:\d+/0, data in {data}",
                        rf"master ready: PYRO:queue@127\.0\.0\.1:{port}, queue_index 0", "master stopped"])


def test_a_daemon_error_with_json_logs_is_a_json_line(daemons, redis_a):
    port = free_port()
    master = daemons("master", "master", "--log-format", "json", "--port", str(port), "--redis-map",
                     f"0={redis_a.url}", "--lease-timeout", "-1")
    assert master.proc.wait(30) == 2
    assert master.out() == []
    (message,) = json_messages(master.err())
    assert "lease_timeout" in message and not message.startswith("ppq: error"), message


def test_up_says_each_fact_once_in_its_banner(daemons, tmp_path):
    port = free_port()
    data = tmp_path / "data"
    up = daemons("up", "up", "--port", str(port), "--data-dir", str(data), "--allow", "tasks",
                 env={"PPQ_DASHBOARD_PORT": "0"})  # a free port: 7680 may be another test's
    wait_for(lambda: any("executor" in line for line in up.err()), what="the worker to start")
    assert up.stop(signal.SIGINT) == 0
    matching(up.out(), [
        rf"redis: redis://127\.0\.0\.1:\d+/0 \(data in {data}\)",
        rf"master: PYRO:queue@127\.0\.0\.1:{port}",
        r"dashboard: http://127\.0\.0\.1:\d+/",
        rf"1 worker\(s\) started \(allowed modules: tasks\)\. Push with: ppq push --master 127\.0\.0\.1:{port} "
        r"module\.func ARGS   \(Ctrl-C stops\)",
        r"stopping\.\.\.",
    ])
    redis_url = re.search(r"redis://\S+", up.out()[0]).group(0)  # type: ignore[union-attr]
    err = "\n".join(up.err())
    assert redis_url not in err and str(data) not in err and "master ready" not in err, err
    assert sum(f"masters PYRO:queue@127.0.0.1:{port}, control" in line for line in up.err()) == 1, err


def test_up_with_json_logs_prints_nothing_and_logs_json_only(daemons, tmp_path):
    port = free_port()
    data = tmp_path / "data"
    up = daemons("up", "--log-format", "json", "up", "--port", str(port), "--data-dir", str(data),
                 "--allow", "tasks")
    wait_for(lambda: any("executor" in line for line in up.err()), what="the worker to start")
    assert up.stop(signal.SIGINT) == 0
    assert up.out() == []
    messages = json_messages(up.err())  # the worker's lines too: it logs JSON as well
    assert sum(bool(re.fullmatch(rf"embedded redis-server pid \d+ on redis://127\.0\.0\.1:\d+/0, data in {data}",
                                 m)) for m in messages) == 1, messages
    assert messages.count(f"master ready: PYRO:queue@127.0.0.1:{port}, queue_index 0") == 1, messages
    assert sum(m.startswith("worker ") and "executor" in m for m in messages) == 1, messages


# -- 2. retries: one line per failed attempt ---------------------------------------------------------


def test_each_failed_attempt_is_one_line_with_its_number_and_what_comes_next(daemons, redis_a, ra):
    port = free_port()
    master = ready_master(daemons, port, redis_a.url)
    address = f"127.0.0.1:{port}"
    worker = daemons("worker", "worker", "--master-hosts", address, "--port", "0", "--concurrency", "1",
                     "--allow", "tasks", "--max-sleep", "1")
    client = Client([address])
    try:
        thrice = client.push("tasks.boom", "x", max_retry=2)
        delayed = client.push("tasks.boom", "y", max_retry=1, retry_delay=True)
        final = client.push("tasks.boom", "z", max_retry=0)
        for tid in (thrice, delayed, final):
            wait_for(lambda tid=tid: client.info(tid)["state"] == "dead", timeout=30, what=f"task {tid} dead")
        task_out = run_ppq("task", "-m", address, thrice, env={"COLUMNS": "100"})
    finally:
        client.close()
    assert worker.stop() == 0
    assert master.stop() == 0

    def lines_of(tid: str) -> list[str]:
        return [line for line in worker.err() if tid in line]

    head = rf"{STAMP} (INFO|WARNING) ppq\.worker: task "
    matching(lines_of(thrice), [
        rf"{head}{thrice} tasks\.boom failed \(attempt 1 of 3\): ValueError: x; retrying now",
        rf"{head}{thrice} tasks\.boom failed \(attempt 2 of 3\): ValueError: x; retrying now",
        rf"{STAMP} WARNING ppq\.worker: task {thrice} tasks\.boom failed \(attempt 3 of 3\): ValueError: x; "
        r"no retries left: dead-listed",
    ])
    assert " INFO " in lines_of(thrice)[0] and " INFO " in lines_of(thrice)[1]
    matching(lines_of(delayed), [
        rf"{STAMP} INFO ppq\.worker: task {delayed} tasks\.boom failed \(attempt 1 of 2\): ValueError: y; "
        r"retrying in 3s",
        rf"{STAMP} WARNING ppq\.worker: task {delayed} tasks\.boom failed \(attempt 2 of 2\): ValueError: y; "
        r"no retries left: dead-listed",
    ])
    matching(lines_of(final), [
        rf"{STAMP} WARNING ppq\.worker: task {final} tasks\.boom failed \(attempt 1 of 1\): ValueError: z; "
        r"no retries left: dead-listed",
    ])
    # Said by the worker alone: the master logs none of it.
    assert not [line for line in master.err() if thrice in line or delayed in line], master.err()

    # 3. `ppq task` of the dead task: its runs against the runs it was allowed.
    assert task_out.returncode == 0, task_out.stderr
    rows = {cells[0]: cells[1] for line in task_out.stdout.splitlines()
            if len(cells := [c.strip() for c in line.split("│")[1:-1]]) == 2}
    assert rows["state"] == "dead"
    assert rows["attempts"] == "3 of 3 (max_retry 2), 3 failed", rows
    assert rows["leased"] == "3 times", rows
    assert "retry" not in rows and "max_retry" not in rows, rows


# -- 4. client retries and unreachable masters --------------------------------------------------------


@pytest.mark.parametrize("command", [("status",), ("push", "tasks.add", "1", "2"), ("dead", "list")])
def test_one_unreachable_master_is_one_error_line(command):
    address = f"127.0.0.1:{free_port()}"
    out = run_ppq(*command, "-m", address)
    assert out.returncode == 1
    assert out.stdout == ""
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"ppq: error: ConnectError: {'server_info' if command[0] == 'status' else ''}"), line
    assert f"PYRO:queue@{address}" in line and "Connection refused" in line, line


def test_several_unreachable_masters_are_one_warning_each_then_the_error():
    first, second = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    out = run_ppq("status", "-m", first, "-m", second)
    assert out.returncode == 1 and out.stdout == ""
    lines = out.stderr.splitlines()
    assert len(lines) == 3, out.stderr
    for address in (first, second):
        assert sum(f"WARNING ppq.rpc: server_info on PYRO:queue@{address} failed" in line
                   and line.endswith("; trying the next master") for line in lines[:2]) == 1, out.stderr
    assert lines[2].startswith("ppq: error: ConnectError: server_info: no master answered"), out.stderr


def test_worker_warns_once_per_outage_and_is_listed_in_full_as_soon_as_a_master_answers(daemons, redis_a, ra):
    port = free_port()
    address = f"127.0.0.1:{port}"
    # The default heartbeat interval (10 s): the listing below comes well before the next one is due.
    worker = daemons("worker", "--log-level", "DEBUG", "worker", "--master-hosts", address, "--port", "0",
                     "--concurrency", "1", "--allow", "tasks", "--max-sleep", "1")

    def attempts() -> int:
        return sum("DEBUG ppq.worker: cannot get tasks: ConnectError" in line for line in worker.err())

    wait_for(lambda: attempts() >= 4, timeout=30, what="the worker to try the master a few times")
    warnings = [line for line in worker.err() if " WARNING " in line]
    assert len(warnings) == 1, "\n".join(warnings)
    assert re.fullmatch(rf"{STAMP} WARNING ppq\.worker: heartbeat failed: ConnectError: heartbeat: no master "
                        rf"answered \(PYRO:queue@{address}\): .*; retrying until a master answers", warnings[0])
    assert not [line for line in worker.err() if "ppq.rpc" in line and " DEBUG " not in line]

    daemons("master", "master", "--port", str(port), "--redis-map", f"0={redis_a.url}")
    wait_for(lambda: any("INFO ppq.worker: the masters answer again, after" in line for line in worker.err()),
             timeout=30, what="the worker to find the master")
    call = PyroFunc(address)
    try:
        entry = wait_for(lambda: [w for w in call("server_info")[0]["workers"] if w.get("control_uri")],
                         timeout=5, what="the worker listed with its control_uri")
    finally:
        call.close()
    assert entry[0]["pid"] == worker.proc.pid and entry[0]["concurrency"] == 1
    assert worker.stop() == 0
    assert len([line for line in worker.err() if " WARNING " in line]) == 1


def test_worker_with_json_logs_writes_json_lines_only(daemons, redis_a, ra):
    port = free_port()
    address = f"127.0.0.1:{port}"
    ready_master(daemons, port, redis_a.url)
    worker = daemons("worker", "worker", "--log-format", "json", "--master-hosts", address, "--port", "0",
                     "--concurrency", "1", "--allow", "tasks", "--max-sleep", "1")
    client = Client([address])
    try:
        tid = client.push("tasks.boom", "j", max_retry=0)
        wait_for(lambda: client.info(tid)["state"] == "dead", what="the task dead")
    finally:
        client.close()
    assert worker.stop() == 0
    assert worker.out() == []
    messages = json_messages(worker.err())
    assert f"task {tid} tasks.boom failed (attempt 1 of 1): ValueError: j; no retries left: dead-listed" in messages


# -- 6. what each Redis holds, in `ppq status` ----------------------------------------------------------


def info_calls(client: Any) -> int:
    return int(client.info("commandstats").get("cmdstat_info", {}).get("calls", 0))


def test_status_shows_memory_aof_and_result_ttl_of_each_redis_in_80_columns(daemons, master, ra, tmp_path):
    # An embedded redis-server (AOF on) with a result_ttl of its own, beside the master over redis_a
    # and redis_b (AOF off).
    port = free_port()
    embedded = daemons("embedded", "master", "--port", str(port), "--data-dir", str(tmp_path / "data"),
                       env={"PPQ_MASTER_RESULT_TTL": "600"})
    wait_for(lambda: any("master ready" in line for line in embedded.err()), what="the embedded master")
    pusher = Client([f"127.0.0.1:{port}"])
    try:
        pusher.push_many([("tasks.add", (i, i)) for i in range(50)])
    finally:
        pusher.close()

    out = run_ppq("status", "-m", f"127.0.0.1:{port}", env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    assert max(len(line) for line in out.stdout.splitlines()) <= 80, out.stdout
    row = next(line for line in out.stdout.splitlines() if "redis://127.0.0.1:" in line)
    cells = [c.strip() for c in row.split("│")[1:-1]]
    assert cells[0] == "0" and re.fullmatch(r"\d+\.\d (KiB|MiB)", cells[1]), cells
    assert re.fullmatch(r"\d+(\.\d)? (B|KiB|MiB)", cells[2]) and cells[3] == "10m", cells
    header = next(line for line in out.stdout.splitlines() if "result_ttl" in line)
    assert [c.strip() for c in header.split("│")[1:-1]][:4] == ["queue", "memory", "AOF", "result_ttl"], header
    data = json.loads(run_ppq("status", "--json", "-m", f"127.0.0.1:{port}").stdout)["0"]
    assert data["aof_enabled"] is True and data["aof_size"] > 0 and data["used_memory"] > 0, data
    assert data["result_ttl"] == 600

    # The test Redis runs without AOF: "off", null in JSON; one INFO per Redis per status call.
    address = f"127.0.0.1:{master.port}"
    pusher = Client([address])
    try:
        pusher.push_many([("tasks.add", (i, i)) for i in range(50)])
    finally:
        pusher.close()
    before = info_calls(ra)
    data = json.loads(run_ppq("status", "--json", "-m", address).stdout)
    assert info_calls(ra) - before == 2  # the status call's, and the one reading it above
    assert data["0"]["aof_enabled"] is False and data["0"]["aof_size"] is None
    assert data["0"]["result_ttl"] == 86400 and data["0"]["used_memory"] > 0
    out = run_ppq("status", "-m", address, env={"COLUMNS": "80"})
    rows = [[c.strip() for c in line.split("│")[1:-1]] for line in out.stdout.splitlines() if "redis://" in line]
    assert [r[2:4] for r in rows] == [["off", "1d"], ["off", "1d"]], out.stdout


# -- 5. `ppq workers`: each worker complete from its start, and why one shows no figures ----------------


def test_workers_lists_a_new_worker_in_full_and_says_why_figures_are_missing(daemons, redis_a, ra):
    port = free_port()
    address = f"127.0.0.1:{port}"
    ready_master(daemons, port, redis_a.url)
    worker = daemons("worker", "worker", "--master-hosts", address, "--port", "0", "--concurrency", "1",
                     "--allow", "tasks")
    wait_for(lambda: any("executor process on queue_index 0" in line for line in worker.err()),
             what="the worker to start")
    call = PyroFunc(address)
    try:
        # Listed with its full info by the time it says it started: no waiting for a heartbeat.
        (entry,) = call("server_info")[0]["workers"]
        assert entry["pid"] == worker.proc.pid and entry["control_uri"].startswith("PYRO:worker@")
        # A worker id that only ever asked for tasks (no heartbeat) is listed without its info.
        call("report", {"id": "quiet-worker"}, 0, [], 0, 0)
    finally:
        call.close()
    out = run_ppq("workers", "-m", address, env={"COLUMNS": "120"})
    assert out.returncode == 0, out.stderr
    rows = {cells[0]: cells[1:] for line in out.stdout.splitlines()
            if len(cells := [c.strip() for c in line.split("│")[1:-1]]) == 6}
    assert rows[entry["id"]] == ["(no task run yet)", "-", "-", "-", "-"], out.stdout
    assert rows["quiet-worker"] == ["(not heard from yet)", "-", "-", "-", "-"], out.stdout
    # Once it has run a task: its count, and the mean and p95 run times.
    call = PyroFunc(address)
    try:
        assert call("wait_task", call("push_task", "add", module="tasks", args=[1, 2]), 0, 20)["state"] == "done"
    finally:
        call.close()
    out = run_ppq("workers", "-m", address, env={"COLUMNS": "120"})
    rows = {cells[1]: cells for line in out.stdout.splitlines()
            if len(cells := [c.strip() for c in line.split("│")[1:-1]]) == 6}
    assert rows["tasks.add"][2:5] == ["1", "1", "0"], out.stdout
    mean, p95 = (float(x) for x in rows["tasks.add"][5].split(" / "))
    assert 0 <= mean <= p95 < 5, out.stdout
    out = run_ppq("status", "-m", address, env={"COLUMNS": "200"})
    header = next(line for line in out.stdout.splitlines() if "last heartbeat" in line)
    assert [c.strip() for c in header.split("│")[1:-1]] == [
        "worker", "queue", "executors", "running", "done", "failed", "last heartbeat", "allows",
        "running tasks"], header
    assert worker.stop() == 0


def test_master_says_when_lost_workers_dead_list_a_task(daemons, redis_a, ra):
    port = free_port()
    address = f"127.0.0.1:{port}"
    master = daemons("master", "master", "--port", str(port), "--redis-map", f"0={redis_a.url}",
                     "--lease-timeout", "1", env={"PPQ_MASTER_MAX_LEASE_EXPIRIES": "1",
                                                  "PPQ_MASTER_REAPER_INTERVAL": "0.2"})
    wait_for(lambda: any("master ready" in line for line in master.err()), what="the master to start")
    call = PyroFunc(address)
    try:
        tid = call("push_task", "add", module="tasks", args=[1, 2])
        for state in ("queued", "dead"):
            # A worker that leases the task and is never heard from again.
            (task,) = call("report", {"id": "lost-worker"}, 0, [], 1, 0)["tasks"]
            assert task["id"] == tid
            wait_for(lambda state=state: call("get_task_info", tid, 0)["state"] == state, timeout=10,
                     what=f"the lease to expire ({state})")
    finally:
        call.close()
    assert master.stop() == 0
    matching([line for line in master.err() if "expired" in line or tid in line], [
        rf"{STAMP} INFO ppq\.master: queue_index 0: 1 expired lease\(s\): back to the queue",
        rf"{STAMP} WARNING ppq\.master: queue_index 0: task {tid} dead-listed: its worker was lost 2 times "
        r"\(master\.max_lease_expiries 1\)",
    ])


# -- 7. the deploy files say what SIGUSR2 does ---------------------------------------------------------------


def test_deploy_files_say_sigusr2_restarts_in_place():
    from .conftest import REPO

    unit = (REPO / "deploy/systemd/ppq-worker@.service").read_text()
    assert "RestartForceExitStatus" not in unit
    assert "ExecReload=/bin/kill -USR2 $MAINPID" in unit and "os.execv: the same pid" in unit
    for path in ("deploy/README.md", "deploy/supervisord/ppq.conf", "deploy/docker-compose.yml", "README.md",
                 "deploy/systemd/ppq-worker@.service"):
        text = (REPO / path).read_text()
        assert "successor" not in text and "new pid" not in text and "fresh agent" not in text, path
    assert "| SIGUSR2 | graceful restart: the same stop, then it replaces itself in place (`os.execv`: same pid" \
        in (REPO / "deploy/README.md").read_text()
