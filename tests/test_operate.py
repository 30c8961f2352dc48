"""Operating ppq: results, cancel, the dead list, status/top, bulk push,
metrics, logs and the ``@ppq.task`` decorator, against real processes.

Every test runs a real redis-server, a real master (the in-process ``master``
fixture or a ``ppq master`` subprocess) and real ``ppq worker`` subprocesses;
the CLI is run as ``python -m ppq`` subprocesses, ``ppq top`` in a real terminal
(a pty, and tmux when it is installed).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import termios
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import ppq
import ppq.client
from ppq import Client, PyroFunc, ResultTimeoutError, TaskFailedError
from ppq.embedded import free_port

from . import tasks as test_tasks
from .conftest import TESTS_DIR, wait_for

# -- helpers ----------------------------------------------------------------------


def address_of(master: Any) -> str:
    return f"127.0.0.1:{master.port}"


def cli(spawn: Any, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ppq ARGS`` to the end; return the completed process (text)."""
    return subprocess.run([sys.executable, "-m", "ppq", *args], env=spawn.env(), cwd=str(TESTS_DIR),
                          capture_output=True, text=True, timeout=timeout)


def wait_worker(client: Client, queue_index: int = 0, count: int = 1) -> list[dict[str, Any]]:
    """Wait until ``count`` workers are registered on ``queue_index``; return them."""
    return wait_for(lambda: (w := client.server_info()[queue_index]["workers"]) and len(w) >= count and w,
                    what=f"{count} worker(s) on queue_index {queue_index}")


def final_info(client: Client, task_id: str, state: str, queue_index: int = 0, timeout: float = 20) -> dict:
    """Wait until the task is in ``state``; return its record."""
    return wait_for(lambda: (i := client.info(task_id, queue_index)) and i["state"] == state and i,
                    timeout=timeout, what=f"task {task_id} to be {state}")


def scrape(port: int) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Prometheus samples of http://127.0.0.1:PORT/metrics as {(name, labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, frozenset(s.labels.items()))] = s.value
    return samples


def sample(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def hgetall_calls(r: Any) -> int:
    return int(r.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))


def lines_of(path: Path) -> list[str]:
    return path.read_text().split() if path.exists() else []


@pytest.fixture
def client(master: Any) -> Any:
    c = Client([address_of(master)])
    yield c
    c.close()


# -- results ------------------------------------------------------------------------


def test_result_is_kept_and_readable(master, client, call, spawn, ra):
    spawn.worker(address_of(master))
    wait_worker(client)
    task_id = client.push("tasks.echo", 1, "two", kwargs={"three": [3]})
    assert client.result(task_id, timeout=20) == {"args": [1, "two"], "kwargs": {"three": [3]}}
    info = call("get_task_info", task_id, 0)
    assert info["state"] == "done"
    assert info["result"] == {"args": [1, "two"], "kwargs": {"three": [3]}}
    assert info["finished"] and info["started"] and info["created"]
    # Kept: a second read gives the same value; the default keeps it about one day.
    assert client.result(task_id, timeout=1) == info["result"]
    assert 86000 < ra.ttl(f"ppq:0:t:{task_id}") <= 86400


def test_result_ttl_per_push(master, client, call, spawn, ra):
    spawn.worker(address_of(master))
    wait_worker(client)
    short = client.push("tasks.add", 1, 1, result_ttl=1)
    kept = client.push("tasks.add", 2, 2)
    assert client.result(short, timeout=20) == 2
    assert client.result(kept, timeout=20) == 4
    assert ra.ttl(f"ppq:0:t:{short}") <= 1
    wait_for(lambda: call("get_task_info", short, 0) is None, timeout=5, what="the result_ttl=1 record to expire")
    assert call("get_task_info", kept, 0)["result"] == 4


def test_result_ttl_from_config(make_master, spawn, ra):
    server = make_master(master__result_ttl=1)
    c = Client([address_of(server)])
    spawn.worker(address_of(server))
    wait_worker(c)
    task_id = c.push("tasks.add", 20, 22)
    longer = c.push("tasks.add", 1, 2, result_ttl=300)
    assert c.result(task_id, timeout=20) == 42
    assert c.result(longer, timeout=20) == 3
    wait_for(lambda: c.info(task_id) is None, timeout=5, what="the master.result_ttl=1 record to expire")
    # A per-push result_ttl overrides the configured one.
    assert 290 < ra.ttl(f"ppq:0:t:{longer}") <= 300
    assert c.info(longer)["result"] == 3
    c.close()


def test_result_waits_without_polling(master, client, spawn, ra):
    """result() is one call the master holds until the task ends: it reads the task's record once
    when the wait starts and once when the finish is published (and once more every 5 s of wait,
    in case a message was lost). Every read of a record is an HGETALL; a client that polls reads it
    again on every poll, however slowly it polls."""
    spawn.worker(address_of(master))
    wait_worker(client)
    task_id = client.push("tasks.sleep_then", 2, "slept")
    wait_for(lambda: client.info(task_id)["state"] == "running", what="the task to start")
    ra.config_resetstat()
    before = hgetall_calls(ra)
    started = time.monotonic()
    assert client.result(task_id, timeout=10) == "slept"
    returned_at = time.time()
    waited = time.monotonic() - started
    calls = hgetall_calls(ra) - before
    info = client.info(task_id)
    assert waited > 1.0, f"result() returned after {waited:.2f}s while the task ran 2 s"
    assert 0 <= returned_at - info["finished"] < 1.0, "result() did not return within a second of the finish"
    allowed = 2 + int(waited // 5)
    assert calls <= allowed, f"{calls} HGETALL calls during a {waited:.1f}s wait (at most {allowed}): a poll loop"


def test_result_raises_task_failed_error(master, client, spawn):
    spawn.worker(address_of(master))
    task_id = client.push("tasks.boom", "the reactor melted", max_retry=0)
    with pytest.raises(TaskFailedError) as excinfo:
        client.result(task_id, timeout=20)
    exc = excinfo.value
    assert exc.task_id == task_id
    assert "ValueError" in exc.error and "the reactor melted" in exc.error
    assert "Traceback (most recent call last)" in exc.traceback
    assert "raise ValueError(message)" in exc.traceback and "tasks.py" in exc.traceback
    assert "the reactor melted" in str(exc)
    assert isinstance(exc, ppq.PPQError)
    assert (exc.type, exc.message) == ("ValueError", "the reactor melted")
    # The same from results(), which yields the error instead of raising it.
    other = client.push("tasks.add", 1, max_retry=0)  # add() missing an argument: TypeError
    ((tid, failed),) = list(client.results([other], timeout=20))
    assert tid == other and isinstance(failed, TaskFailedError)
    assert failed.type == "TypeError" and "missing 1 required positional argument" in failed.message
    assert "Traceback" in failed.traceback


@pytest.mark.parametrize(("error", "type_", "message"), [
    ("ValueError: a: b", "ValueError", "a: b"),
    ("app.errors.QuotaError: over quota", "app.errors.QuotaError", "over quota"),
    ("cancelled", "", "cancelled"),
    ("lease expired 3 times: workers lost", "", "lease expired 3 times: workers lost"),
    ("", "", ""),
])
def test_task_failed_error_splits_type_and_message(error, type_, message):
    exc = TaskFailedError("t1", error, "tb")
    assert (exc.task_id, exc.error, exc.type, exc.message, exc.traceback) == ("t1", error, type_, message, "tb")


def test_result_timeout(client):
    task_id = client.push("tasks.add", 1, 2)  # no worker: it stays queued
    started = time.monotonic()
    with pytest.raises(ResultTimeoutError):
        client.result(task_id, timeout=0.5)
    assert time.monotonic() - started < 5
    assert client.info(task_id)["state"] == "queued"


def test_cli_task_wait_prints_final_state(master, client, spawn):
    address = address_of(master)
    spawn.worker(address)
    wait_worker(client)
    task_id = client.push("tasks.sleep_then", 1, "finally")
    out = cli(spawn, "task", task_id, "--wait", "--json", "-m", address)
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["state"] == "done" and info["result"] == "finally" and info["id"] == task_id

    second = client.push("tasks.sleep_then", 0.5, "table")
    out = cli(spawn, "task", second, "--wait", "-m", address)
    assert out.returncode == 0, out.stderr
    assert re.search(r"state\s+│\s+done", out.stdout), out.stdout
    assert '"table"' in out.stdout

    failing = client.push("tasks.boom", "cli boom", max_retry=0)
    out = cli(spawn, "task", failing, "--wait", "-m", address)
    assert out.returncode == 1, out.stdout + out.stderr
    assert re.search(r"state\s+│\s+dead", out.stdout), out.stdout
    assert "ValueError: cli boom" in out.stdout


# -- cancel -------------------------------------------------------------------------


def test_cancel_queued_and_delayed_tasks_never_run(master, client, call, spawn, ra, tmp_path):
    queued_marker, delayed_marker, ran = tmp_path / "queued", tmp_path / "delayed", tmp_path / "ran"
    queued = client.push("tasks.record", str(queued_marker), "q")
    delayed = client.push("tasks.record", str(delayed_marker), "d", delay=1.0)
    assert call("cancel_task", queued, 0) == "queued"
    assert client.cancel(delayed) == "delayed"
    assert client.info(queued)["state"] == "cancelled"
    assert client.info(delayed)["state"] == "cancelled"
    assert call("cancel_task", "0" * 32, 0) is None
    assert ra.llen("ppq:0:queue") == 0 and ra.zcard("ppq:0:delayed") == 0
    # Sentinels behind them, one due after the cancelled delayed task's eta.
    after = client.push("tasks.record", str(ran), "now")
    late = client.push("tasks.record", str(ran), "late", delay=1.5)
    spawn.worker(address_of(master))
    assert client.result(after, timeout=20) == "now"
    assert client.result(late, timeout=20) == "late"
    assert lines_of(ran) == ["now", "late"]
    assert not queued_marker.exists() and not delayed_marker.exists()
    assert client.info(queued)["state"] == "cancelled" and client.info(delayed)["state"] == "cancelled"
    with pytest.raises(TaskFailedError, match="cancelled"):
        client.result(queued, timeout=1)
    assert client.server_info()[0]["cancelled"] == 2


def test_cancel_running_task_drops_its_result(master, client, spawn, tmp_path):
    marker = tmp_path / "running"
    spawn.worker(address_of(master))
    task_id = client.push("tasks.record", str(marker), "r", 1.5)
    wait_for(lambda: marker.exists() and client.info(task_id)["state"] == "running", what="the task to run")
    assert client.cancel(task_id) == "running"
    assert client.info(task_id)["cancel_requested"] is True
    # A waiter is woken when the task ends, and gets no result: it was dropped.
    with pytest.raises(TaskFailedError, match="cancelled"):
        client.result(task_id, timeout=10)
    info = client.info(task_id)
    assert info["state"] == "cancelled"
    assert info["result"] is None and info["has_result"] is False
    assert lines_of(marker) == ["r"]  # it ran once to its end; the result was dropped
    counts = client.server_info()[0]
    assert counts["done"] == 0 and counts["cancelled"] == 1


# -- dead list ------------------------------------------------------------------------


def test_dead_list_requeue_and_purge(master, client, spawn, ra, tmp_path):
    address = address_of(master)
    flag, log = tmp_path / "flag", tmp_path / "runs"
    spawn.worker(address)
    first = client.push("tasks.fail_until", str(flag), str(log), "first", max_retry=0)
    final_info(client, first, "dead")
    second = client.push("tasks.fail_until", str(flag), str(log), "second", max_retry=0)
    final_info(client, second, "dead")

    out = cli(spawn, "dead", "list", "-m", address)
    assert out.returncode == 0, out.stderr
    assert second in out.stdout and first in out.stdout
    assert out.stdout.index(second) < out.stdout.index(first), "not newest first:\n" + out.stdout
    assert "RuntimeError: second: flag flag is missing" in out.stdout
    assert "RuntimeError: first: flag flag is missing" in out.stdout
    assert "tasks.fail_until" in out.stdout

    out = cli(spawn, "dead", "list", "--json", "-m", address)
    assert out.returncode == 0, out.stderr
    dead = json.loads(out.stdout)
    assert [t["id"] for t in dead] == [second, first]
    assert dead[0]["state"] == "dead" and "second" in dead[0]["error"] and "Traceback" in dead[0]["traceback"]

    flag.touch()
    out = cli(spawn, "dead", "requeue", first, "-m", address)
    assert out.returncode == 0, out.stderr
    assert "requeued 1" in out.stdout
    assert client.result(first, timeout=20) == "first"
    assert [t["id"] for t in client.call("dead_tasks", 0)] == [second]

    out = cli(spawn, "dead", "requeue", "--all", "-m", address)
    assert out.returncode == 0, out.stderr
    assert "requeued 1" in out.stdout
    assert client.result(second, timeout=20) == "second"
    assert sorted(lines_of(log)) == ["first", "first", "second", "second"]  # each ran again
    assert ra.zcard("ppq:0:dead") == 0

    third = client.push("tasks.boom", "purge me", max_retry=0)
    fourth = client.push("tasks.boom", "purge me too", max_retry=0)
    final_info(client, third, "dead")
    final_info(client, fourth, "dead")
    out = cli(spawn, "dead", "purge", "--all", "--yes", "-m", address)
    assert out.returncode == 0, out.stderr
    assert "purged 2" in out.stdout
    out = cli(spawn, "dead", "list", "--json", "-m", address)
    assert json.loads(out.stdout) == []
    assert ra.zcard("ppq:0:dead") == 0
    assert client.info(third) is None and client.info(fourth) is None


# -- status and top -------------------------------------------------------------------

_STATUS_KEYS = ("queued", "delayed", "running", "dead", "done_per_min", "failed_per_min", "workers")


def _status_json(spawn: Any, address: str) -> dict[str, Any]:
    out = cli(spawn, "status", "--json", "-m", address)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_status_table_and_json(master, client, spawn):
    address = address_of(master)
    dead = client.push("tasks.boom", "status", max_retry=0)
    done = [client.push("tasks.add", i, i) for i in range(2)]
    long = client.push("tasks.sleep_then", 15)
    client.push("tasks.add", 5, 5)
    client.push("tasks.add", 6, 6)
    client.push("tasks.add", 7, 7, delay=300)
    client.push("tasks.add", 8, 8, queue_index=1)
    proc = spawn.worker(address, extra=("--prefetch", "0"))
    final_info(client, dead, "dead")
    for tid in done:
        final_info(client, tid, "done")
    wait_for(lambda: (w := client.server_info()[0]["workers"]) and w[0].get("running") == [long],
             what="the worker to report the long task running")

    info = _status_json(spawn, address)
    assert set(info) == {"0", "1"}
    q0, q1 = info["0"], info["1"]
    for key in _STATUS_KEYS:
        assert key in q0 and key in q1, key
    assert (q0["queued"], q0["delayed"], q0["running"], q0["dead"]) == (2, 1, 1, 1)
    assert q0["done_per_min"] == 2 and q0["failed_per_min"] == 1
    assert len(q0["workers"]) == 1 and q0["workers"][0]["pid"] == proc.pid
    assert (q1["queued"], q1["delayed"], q1["running"], q1["dead"], q1["workers"]) == (1, 0, 0, 0, [])

    out = cli(spawn, "status", "-m", address)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    header = next(line for line in text.splitlines() if "queued" in line)
    cells = [c.strip() for c in re.split(r"[┃│]", header) if c.strip()]
    for name in ("queue", "queued", "delayed", "leased", "running", "dead", "done/min", "fail/min", "workers"):
        assert name in cells, f"column {name} missing from {cells}"
    rows = {}
    for line in text.splitlines():
        parts = [c.strip() for c in line.split("│")]
        if len(parts) > len(cells) and parts[1].isdigit():
            rows[parts[1]] = dict(zip(cells, parts[1:], strict=False))
    assert rows["0"]["queued"] == "2" and rows["0"]["delayed"] == "1" and rows["0"]["leased"] == "1"
    assert rows["0"]["running"] == "1"  # as the worker reported at its last heartbeat
    assert rows["0"]["dead"] == "1" and rows["0"]["done/min"] == "2" and rows["0"]["fail/min"] == "1"
    assert rows["0"]["workers"] == "1" and rows["1"]["queued"] == "1" and rows["1"]["workers"] == "0"
    # The workers table: one row per live worker, with its counts and the task it runs.
    worker_id = q0["workers"][0]["id"]
    assert re.search(r"^\s*workers \(1\)\s*$", text, re.MULTILINE), text
    row = next((line for line in text.splitlines() if worker_id in line), None)
    assert row is not None, f"worker {worker_id} missing from the workers table:\n{text}"
    cells = [c.strip() for c in row.split("│")[1:-1]]
    assert cells[:6] == [worker_id, "0", "1", "1", "2", "1"] and cells[-1] == long, cells

    # done/min rises as tasks finish.
    more = [client.push("tasks.add", i, 1, queue_index=1) for i in range(3)]
    spawn.worker(address, extra=("--queue-index", "1"))
    for tid in more:
        final_info(client, tid, "done", queue_index=1)
    after = _status_json(spawn, address)
    assert after["1"]["done_per_min"] == q1["done_per_min"] + 4  # the earlier queued one and three more


class PtyTerminal:
    """A command in a real pseudo-terminal of a fixed size; its output is collected in a thread."""

    def __init__(self, argv: list[str], env: dict[str, str], rows: int = 50, cols: int = 200) -> None:
        self.master_fd, slave_fd = os.openpty()
        fcntl.ioctl(slave_fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))

        def controlling_tty() -> None:
            os.setsid()
            fcntl.ioctl(0, termios.TIOCSCTTY, 0)

        env = dict(env, TERM="xterm-256color", COLUMNS=str(cols), LINES=str(rows))
        self.proc = subprocess.Popen(argv, stdin=slave_fd, stdout=slave_fd, stderr=slave_fd, env=env,
                                     cwd=str(TESTS_DIR), preexec_fn=controlling_tty, close_fds=True)
        os.close(slave_fd)
        self.output = bytearray()
        self.lock = threading.Lock()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.master_fd], [], [], 0.1)
                if not ready:
                    if self.proc.poll() is not None:
                        return
                    continue
                data = os.read(self.master_fd, 65536)
            except OSError:  # EIO: the terminal's last user is gone
                return
            if not data:
                return
            with self.lock:
                self.output.extend(data)

    def frames(self) -> list[str]:
        """The screens drawn so far (each starts with cursor-home), without escape sequences."""
        with self.lock:
            text = bytes(self.output).decode("utf-8", "replace")
        return [re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", f) for f in text.split("\x1b[H") if f.strip()]

    def press(self, data: bytes) -> None:
        os.write(self.master_fd, data)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.reader.join(5)
        os.close(self.master_fd)


def _queued_in(screen: str, queue_index: int = 0) -> int | None:
    """The queued count of ``queue_index`` in a drawn status table, if the row is complete."""
    found = re.findall(rf"^│\s+{queue_index}\s+│\s+(\d+)\s+│", screen, re.MULTILINE)
    return int(found[-1]) if found else None


def _latest_queued(frames: list[str]) -> int | None:
    for frame in reversed(frames):
        if "ppq top" in frame and (n := _queued_in(frame)) is not None:
            return n
    return None


def test_top_in_a_pty(master, client, spawn):
    address = address_of(master)
    for i in range(3):
        client.push("tasks.add", i, i)
    term = PtyTerminal([sys.executable, "-m", "ppq", "top", "-m", address, "--interval", "0.5"], spawn.env())
    try:
        wait_for(lambda: _latest_queued(term.frames()) == 3, timeout=20, what="top to show 3 queued")
        screen = next(f for f in reversed(term.frames()) if _queued_in(f) == 3)
        for name in ("queue", "queued", "delayed", "leased", "running", "dead", "done/min", "fail/min", "workers"):
            assert name in screen, name
        drawn = len(term.frames())
        for i in range(4):
            client.push("tasks.add", i, i)
        wait_for(lambda: _latest_queued(term.frames()) == 7, timeout=20, what="top to show 7 queued")
        assert len(term.frames()) > drawn, "top did not redraw"
        term.press(b"\x03")  # Ctrl-C, through the terminal's line discipline
        assert term.proc.wait(10) == 0
    finally:
        term.close()


class Tmux:
    """A private tmux server (its own socket) running one command in a detached session."""

    def __init__(self, tmp_path: Path, command: list[str], env: dict[str, str], cols: int = 200,
                 rows: int = 50) -> None:
        self.socket = f"ppq-test-{os.getpid()}-{id(self)}"
        conf = tmp_path / "tmux.conf"
        conf.write_text("set -g remain-on-exit on\nset -g history-limit 100\n")
        self.env = dict(env, TERM="xterm-256color")
        self.env.pop("TMUX", None)
        shell_cmd = " ".join(_shell_quote(a) for a in ["env", *[f"{k}={v}" for k, v in env.items()
                                                                  if k.startswith(("PYTHON", "PATH"))],
                                                       *command])
        self.tmux("-f", str(conf), "new-session", "-d", "-s", "top", "-x", str(cols), "-y", str(rows), shell_cmd)

    def tmux(self, *args: str) -> str:
        out = subprocess.run(["tmux", "-L", self.socket, *args], env=self.env, capture_output=True, text=True,
                             timeout=20)
        assert out.returncode == 0, f"tmux {args}: {out.stderr}"
        return out.stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "top")

    def pane(self, fmt: str) -> str:
        return self.tmux("display-message", "-p", "-t", "top", fmt).strip()

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], env=self.env, capture_output=True, timeout=20)


def _ended(pid: int) -> bool:
    """The process is gone or a zombie (it has exited; its parent, the tmux server, may reap it late)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False


def _shell_quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed (test_top_in_a_pty covers top)")
def test_top_in_tmux(master, client, spawn, tmp_path):
    address = address_of(master)
    for i in range(2):
        client.push("tasks.add", i, i)
    term = Tmux(tmp_path, [sys.executable, "-m", "ppq", "top", "-m", address, "--interval", "0.5"], spawn.env())
    try:
        wait_for(lambda: _queued_in(term.screen()) == 2, timeout=20, what="top in tmux to show 2 queued")
        screen = term.screen()
        assert "ppq top" in screen and "queued" in screen and "workers" in screen
        for i in range(3):
            client.push("tasks.add", i, i)
        wait_for(lambda: _queued_in(term.screen()) == 5, timeout=20, what="top in tmux to show 5 queued")
        assert term.pane("#{pane_dead}") == "0"
        pid = int(term.pane("#{pane_pid}"))
        term.tmux("send-keys", "-t", "top", "C-c")
        wait_for(lambda: term.pane("#{pane_dead}") == "1", timeout=10, what="the pane to close on C-c")
        wait_for(lambda: _ended(pid), timeout=10, what="the top process to end")
        # tmux sometimes reaps its child late and then shows no status (test_top_in_a_pty checks the
        # exit code is 0); a death by signal would show here.
        assert term.pane("#{pane_dead_signal}") == ""
        assert term.pane("#{pane_dead_status}") in ("", "0")
    finally:
        term.close()


# -- push --file --------------------------------------------------------------------------


def test_push_file(master, client, spawn, ra, tmp_path):
    address = address_of(master)
    path = tmp_path / "tasks.jsonl"
    path.write_text("\n".join([
        json.dumps({"task": "tasks.add", "args": [1, 2]}),                       # 1 good
        "{not json",                                                             # 2 bad JSON
        json.dumps({"task": "tasks.echo", "args": ["x"], "kwargs": {"k": 1}}),   # 3 good
        json.dumps({"task": "tasks.add", "args": [1, 1], "queue_index": 99}),    # 4 unknown queue_index
        "",                                                                      # 5 blank: skipped
        json.dumps([1, 2]),                                                      # 6 not an object
        json.dumps({"task": "tasks.add", "args": [2, 2], "max_retry": -1}),      # 7 bad max_retry
        json.dumps({"func": "add", "module": "tasks", "args": [3, 4], "queue_index": 1}),  # 8 good, qi 1
    ]) + "\n")
    out = cli(spawn, "push", "--file", str(path), "-m", address)
    assert out.returncode == 1, out.stdout + out.stderr
    pushed = dict(line.split("\t") for line in out.stdout.splitlines() if line.strip())
    assert sorted(pushed, key=int) == ["1", "3", "8"], out.stdout
    assert all(re.fullmatch(r"[0-9a-zA-Z_-]{8,}", tid) for tid in pushed.values())
    err = out.stderr
    assert re.search(r"line 2: refused: not JSON", err), err
    assert re.search(r"line 4: refused: .*queue_index", err), err
    assert re.search(r"line 6: refused: expected a JSON object", err), err
    assert re.search(r"line 7: refused: .*max_retry", err), err
    assert "line 5" not in err and "line 1:" not in err and "line 3:" not in err and "line 8:" not in err
    assert "3 pushed, 4 refused" in err
    # The good ones are stored, and run.
    assert ra.exists(f"ppq:0:t:{pushed['1']}") and ra.exists(f"ppq:0:t:{pushed['3']}")
    assert ra.llen("ppq:0:queue") == 2
    assert client.info(pushed["8"], 1)["state"] == "queued"
    spawn.worker(address)
    spawn.worker(address, extra=("--queue-index", "1"))
    assert client.result(pushed["1"], timeout=20) == 3
    assert client.result(pushed["3"], timeout=20) == {"args": ["x"], "kwargs": {"k": 1}}
    assert client.result(pushed["8"], timeout=20, queue_index=1) == 7
    assert client.server_info()[0]["pushed"] == 2


def test_push_file_all_good_exits_zero(master, spawn, tmp_path):
    path = tmp_path / "good.jsonl"
    path.write_text("".join(json.dumps({"task": "tasks.add", "args": [i, i]}) + "\n" for i in range(25)))
    out = cli(spawn, "push", "--file", str(path), "--chunk", "10", "-m", address_of(master))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(n) for n in range(1, 26)]
    assert len({line.split("\t")[1] for line in lines}) == 25
    assert "25 pushed, 0 refused" in out.stderr


# -- metrics ---------------------------------------------------------------------------


def test_metrics_master_and_worker(spawn, redis_a, ra):
    master_port, worker_port = free_port(), free_port()
    _, address = spawn.master(redis_a.url, "--metrics-port", str(master_port))
    c = Client([address])
    first = [c.push("tasks.add", i, i) for i in range(2)]
    m = wait_for(lambda: scrape(master_port), what="the master's metrics endpoint")
    assert sample(m, "ppq_tasks_total", queue_index="0", event="pushed") == 2
    assert sample(m, "ppq_queue_depth", queue_index="0", state="queued") == 2
    assert sample(m, "ppq_workers", queue_index="0") == 0

    spawn.worker(address, extra=("--metrics-port", str(worker_port)))
    failing = c.push("tasks.boom", "metrics", max_retry=1)  # fails, is retried, fails: dead
    last = c.push("tasks.add", 10, 10)
    for tid in [*first, last]:
        assert c.result(tid, timeout=20) is not None
    with pytest.raises(TaskFailedError):
        c.result(failing, timeout=20)
    c.push("tasks.add", 0, 0, delay=300)
    c.push("tasks.add", 0, 0, delay=300)

    m = scrape(master_port)
    stats = {k.decode(): int(v) for k, v in ra.hgetall("ppq:0:stats").items()}
    expected = {"pushed": 6, "done": 3, "retried": 1, "dead": 1}
    for event, count in expected.items():
        assert stats[event] == count, (event, stats)
        assert sample(m, "ppq_tasks_total", queue_index="0", event=event) == count, event
    depths = {"queued": 0, "delayed": 2, "running": 0, "dead": 1}
    for state, count in depths.items():
        assert sample(m, "ppq_queue_depth", queue_index="0", state=state) == count, state
    assert sample(m, "ppq_workers", queue_index="0") == 1
    assert sample(m, "ppq_redis_up", queue_index="0") == 1
    assert sample(m, "ppq_tasks_total", queue_index="0", event="errors") == 2  # both failed attempts
    # A counter never goes down: purging the dead list empties the depth, not the count of deaths.
    assert c.call("purge_dead", None, 0) == 1
    m = scrape(master_port)
    assert sample(m, "ppq_queue_depth", queue_index="0", state="dead") == 0
    assert sample(m, "ppq_tasks_total", queue_index="0", event="dead") == 1

    w = wait_for(lambda: scrape(worker_port), what="the worker's metrics endpoint")
    assert sample(w, "ppq_worker_tasks_total", func="tasks.add", outcome="ok") == 3
    assert sample(w, "ppq_worker_tasks_total", func="tasks.boom", outcome="error") == 2
    assert sample(w, "ppq_worker_tasks_total", func="tasks.add", outcome="error") in (None, 0)
    assert sample(w, "ppq_task_duration_seconds_count", func="tasks.add") == 3
    assert sample(w, "ppq_task_duration_seconds_count", func="tasks.boom") == 2
    assert sample(w, "ppq_task_duration_seconds_bucket", func="tasks.add", le="+Inf") == 3
    assert sample(w, "ppq_task_wait_seconds_count", func="tasks.add") == 3
    assert sample(w, "ppq_task_wait_seconds_count", func="tasks.boom") == 2
    # The two first tasks waited for the worker to start: their wait is real time, not zero.
    assert sample(w, "ppq_task_wait_seconds_sum", func="tasks.add") > 0
    c.close()


def test_metrics_count_hand_outs(make_master, spawn):
    """Hand-outs are among the master's metrics: a counter of tasks leased to workers."""
    port = free_port()
    server = make_master(master__metrics_port=port)
    c = Client([address_of(server)])
    spawn.worker(address_of(server))
    ids = [c.push("tasks.add", i, i) for i in range(3)]
    ids.append(c.push("tasks.boom", "handed out twice", max_retry=1))
    for tid in ids[:3]:
        c.result(tid, timeout=20)
    with pytest.raises(TaskFailedError):
        c.result(ids[3], timeout=20)
    m = scrape(port)
    events = {dict(labels)["event"]: value for (name, labels), value in m.items()
              if name == "ppq_tasks_total" and dict(labels).get("queue_index") == "0"}
    handed = [events[e] for e in ("leased", "handed_out", "handed", "started", "fetched") if e in events]
    assert handed == [5], f"no hand-out counter equal to the 5 hand-outs among ppq_tasks_total events {events}"
    c.close()


# -- logs ----------------------------------------------------------------------------------


def test_json_debug_logs_name_each_state_change(spawn, redis_a, ra, tmp_path):
    port = free_port()
    address = f"127.0.0.1:{port}"
    err_path, out_path = tmp_path / "master.err", tmp_path / "master.out"
    with open(err_path, "wb") as err, open(out_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "ppq", "--log-format", "json", "--log-level", "DEBUG",
                                 "master", "--port", str(port), "--redis-map", f"0={redis_a.url}"],
                                stdout=out, stderr=err, env=spawn.env(), cwd=str(TESTS_DIR))
    spawn.procs.append(proc)
    ping = PyroFunc(address, timeout=2, default_return=None)
    wait_for(lambda: proc.poll() is not None or ping("ping") == "pong", what="the master")
    ping.close()
    assert proc.poll() is None, err_path.read_text()
    c = Client([address])
    spawn.worker(address)
    ok = c.push("tasks.add", 1, 2)
    bad = c.push("tasks.boom", "logged", max_retry=0)
    assert c.result(ok, timeout=20) == 3
    with pytest.raises(TaskFailedError):
        c.result(bad, timeout=20)

    def records() -> list[dict[str, Any]]:
        return [json.loads(line) for line in err_path.read_text().splitlines() if line.strip()]

    def debug_about(task_id: str) -> list[str]:
        return [r["message"] for r in records() if r["level"] == "DEBUG" and task_id in r["message"]]

    wait_for(lambda: any("finished" in m for m in debug_about(ok)) and any("failed" in m for m in debug_about(bad)),
             timeout=10, what="the finish lines in the master's log")
    for line in err_path.read_text().splitlines():
        record = json.loads(line)  # every line is JSON
        assert {"level", "logger", "message"} <= set(record), record
        assert record["logger"].startswith("ppq")
    for task_id in (ok, bad):
        messages = debug_about(task_id)
        assert any("pushed" in m for m in messages), messages
        assert any("leased" in m for m in messages), messages
    assert any("finished" in m for m in debug_about(ok))
    assert any("failed" in m for m in debug_about(bad))
    assert all(r["logger"] == "ppq.master" for r in records() if r["level"] == "DEBUG" and ok in r["message"])
    c.close()


# -- decorator and client conveniences -----------------------------------------------------------


def test_task_decorator_pushes_to_its_queue_index(master, spawn, ra, rb, monkeypatch):
    address = address_of(master)
    monkeypatch.setenv("PPQ_CLIENT_MASTERS", address)
    monkeypatch.setattr(ppq.client, "_default_client", None)  # built from PPQ_* on first use
    fn = test_tasks.times_ten
    assert fn(3) == 30  # runs here
    task_id = fn.push(4)
    assert rb.llen("ppq:1:queue") == 1 and ra.llen("ppq:0:queue") == 0
    assert rb.lrange("ppq:1:queue", 0, -1) == [task_id.encode()]
    assert rb.hget(f"ppq:1:t:{task_id}", "state") == b"queued"
    c = Client([address])
    info = c.info(task_id, 1)
    assert info["func"] == "times_ten" and info["module"] == fn.__module__ and info["args"] == [4]
    assert c.info(task_id, 0) is None
    spawn.worker(address, allow="tests.tasks,tasks", extra=("--queue-index", "1"))
    assert c.result(task_id, timeout=20, queue_index=1) == 40
    ppq.client._default_client.close()
    c.close()


def test_results_yield_in_finish_order(master, client, spawn):
    spawn.worker(address_of(master), concurrency=2)
    wait_worker(client)
    slow = client.push("tasks.sleep_then", 2, "slow")
    fast = client.push("tasks.sleep_then", 0.2, "fast")
    got = []
    for task_id, value in client.results([slow, fast], timeout=20):
        got.append((task_id, value, time.monotonic()))
    assert [(t, v) for t, v, _ in got] == [(fast, "fast"), (slow, "slow")]
    assert got[1][2] - got[0][2] > 1.0, "the fast result was not yielded before the slow one finished"


def test_push_many_and_results(master, client, spawn):
    spawn.worker(address_of(master), concurrency=2)
    ids = client.push_many([("tasks.add", (1, 2)), ("tasks.echo", ("a",), {"b": 2}),
                            {"func": "boom", "module": "tasks", "args": ["many"], "max_retry": 0}])
    assert len(ids) == 3 and len(set(ids)) == 3
    results = dict(client.results(ids, timeout=20))
    assert results[ids[0]] == 3
    assert results[ids[1]] == {"args": ["a"], "kwargs": {"b": 2}}
    assert isinstance(results[ids[2]], TaskFailedError) and "many" in results[ids[2]].error


def test_log_format_is_taken_after_the_command_too(spawn, redis_a, tmp_path):
    """`ppq master --log-format json` (the flag after the command, as for --log-level) logs JSON lines."""
    port = free_port()
    err_path = tmp_path / "master.err"
    with open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "ppq", "master", "--log-format", "json", "--log-level", "INFO",
                                 "--port", str(port), "--redis-map", f"0={redis_a.url}"],
                                stdout=subprocess.DEVNULL, stderr=err, env=spawn.env(), cwd=str(TESTS_DIR))
    spawn.procs.append(proc)
    lines = wait_for(lambda: [x for x in err_path.read_text().splitlines() if x.strip()], what="a log line")
    assert proc.poll() is None, err_path.read_text()
    for line in lines:
        assert json.loads(line)["logger"].startswith("ppq"), line


# -- the seed's documented usage, as scripts run in their own processes ----------------------------------

SEED_MASTER = """
import ppq

settings = {{
    "master.port": {port},
    "master.redis_map": {{0: ["127.0.0.1", {redis_port}, 0]}},
    "master.allow_pickle": {pickle},
}}
ppq.Master(ppq.Config.from_settings(settings)).serve()
"""

SEED_WORKER = """
import ppq

settings = {{
    "worker.master_hosts": ["PYROLOC://127.0.0.1:{port}/queue"],
    "worker.queue_index": 0,
    "worker.port": 0,
    "worker.max_sleep": 1,
    "worker.allowed_modules": ["time"],
    "worker.allow_pickle": {pickle},
}}
ppq.Worker(ppq.Config.from_settings(settings)).serve()
"""

SEED_CLIENT = """
import pickle
import sys

from ppq import PyroFunc

client = PyroFunc("PYROLOC://127.0.0.1:{port}/queue", retry=1, random_idx=True, threaded=True)
print(client("push_task", "sleep", module="time", queue_index=0), flush=True)
args, kw = (0.01,), {{}}
print(client("push_task", "sleep", module="time", parameters=pickle.dumps((args, kw)), queue_index=0), flush=True)
"""


def run_script(spawn: Any, tmp_path: Path, name: str, text: str, wait: bool = False) -> Any:
    path = tmp_path / f"{name}.py"
    path.write_text(text)
    log = tmp_path / f"{name}.log"
    with open(log, "wb") as out:
        if wait:
            return subprocess.run([sys.executable, str(path)], env=spawn.env(), cwd=str(tmp_path),
                                  stdout=subprocess.PIPE, stderr=out, text=True, timeout=60), log
        proc = subprocess.Popen([sys.executable, str(path)], env=spawn.env(), cwd=str(tmp_path), stdout=out,
                                stderr=subprocess.STDOUT)
    spawn.procs.append(proc)  # killed at teardown if the test fails half-way
    return proc, log


@pytest.mark.parametrize("pickle_on", [("master", "worker"), ("master",), ()])
def test_seed_master_worker_and_client_snippets(spawn, redis_a, ra, tmp_path, pickle_on):
    """A master and a worker started from Python with the seed's dotted settings (a [host, port, db]
    redis_map, a PYROLOC master address), and the seed's PyroFunc client pushing to them."""
    port = free_port()
    master, master_log = run_script(spawn, tmp_path, "seed_master", SEED_MASTER.format(
        port=port, redis_port=redis_a.port, pickle="master" in pickle_on))
    call = PyroFunc(f"127.0.0.1:{port}", timeout=3, default_return=None)
    wait_for(lambda: master.poll() is not None or call("ping") == "pong", what="the seed master")
    assert master.poll() is None, master_log.read_text()
    worker, worker_log = run_script(spawn, tmp_path, "seed_worker", SEED_WORKER.format(
        port=port, pickle="worker" in pickle_on))
    wait_for(lambda: worker.poll() is not None or call("server_info")[0]["workers"], what="the seed worker")
    assert worker.poll() is None, worker_log.read_text()
    pushed, client_log = run_script(spawn, tmp_path, "seed_client", SEED_CLIENT.format(port=port), wait=True)
    ids = pushed.stdout.split()
    # time.sleep() with no argument fails in the worker, as it always did (TypeError), then goes dead.
    info = wait_for(lambda: (i := call("get_task_info", ids[0], 0)) and i["state"] == "dead" and i, timeout=30)
    assert info["error"].startswith("TypeError")
    if "master" not in pickle_on:
        assert pushed.returncode == 1 and len(ids) == 1
        assert "master.allow_pickle" in client_log.read_text()
    else:
        assert pushed.returncode == 0, client_log.read_text()
        state = "done" if "worker" in pickle_on else "dead"
        info = wait_for(lambda: (i := call("get_task_info", ids[1], 0)) and i["state"] == state and i, timeout=30)
        if state == "dead":
            assert "worker.allow_pickle" in info["error"], info
    call.close()
    for proc in (worker, master):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0


def test_dead_purge_asks_at_a_terminal(master, client, call, spawn):
    """At a terminal, purge shows what it will delete and asks; "n" keeps everything, "y" deletes."""
    address = address_of(master)
    ids = [client.push("tasks.boom", max_retry=0) for _ in range(2)]
    worker = spawn.worker(address)
    for task_id in ids:
        final_info(client, task_id, "dead")
    worker.terminate()
    for answer, code, left in ((b"n\r", 1, 2), (b"y\r", 0, 0)):
        term = PtyTerminal([sys.executable, "-m", "ppq", "dead", "purge", "--all", "-m", address], spawn.env(),
                           cols=120)
        try:
            wait_for(lambda term=term: "for good? [y/N]" in "".join(term.frames()), what="the question")
            assert "(2)" in "".join(term.frames())
            term.press(answer)
            assert term.proc.wait(20) == code, "".join(term.frames())
        finally:
            term.close()
        assert len(call("dead_tasks", 0)) == left


def _busy_info() -> dict[int, dict[str, Any]]:
    worker = {"id": "a-rather-long-hostname.example.com:123456:abcdef", "concurrency": 16, "running": ["a" * 32],
              "done": 1234567, "failed": 89012, "last_heartbeat": time.time()}
    return {0: {"ok": True, "queued": 1234567, "delayed": 23456, "running": 34567, "dead": 4567,
                "done_per_min": 567890, "failed_per_min": 6789, "pushed": 987654321, "done": 87654321,
                "retried": 7654321, "expired": 65432, "cancelled": 5432, "redis": "redis://127.0.0.1:6379/0",
                "used_memory": 1234567890, "aof_enabled": True, "aof_size": 987654321098, "result_ttl": 86399,
                "workers": [worker, dict(worker, id="w2")]},
            1: {"ok": False, "redis": "redis://10.0.0.1:6379/1", "error": "Connection refused", "workers": []}}


def _numbers(info: dict[int, dict[str, Any]]) -> set[str]:
    found = {"0", "1", "2", "16"}  # queue indexes, worker and running counts, executors
    for entry in info.values():
        found |= {str(v) for v in entry.values() if isinstance(v, int)}
        for w in entry["workers"]:
            found |= {str(v) for v in w.values() if isinstance(v, int)}
    return found


@pytest.mark.parametrize("width", [80, 100, 132, 200])
def test_status_tables_fit_the_width_without_cutting_a_number(width):
    import io

    from rich.console import Console

    from ppq.cli import status_tables

    info = _busy_info()
    out = Console(file=io.StringIO(), width=width)
    out.print(status_tables(info, width))
    text = out.file.getvalue()
    assert max(len(line) for line in text.splitlines()) <= width, text
    assert "…" not in text
    numbers = [c.strip() for line in text.splitlines() for c in line.split("│")[1:-1] if c.strip().isdigit()]
    assert numbers and set(numbers) <= _numbers(info), text
    header = next(line for line in text.splitlines() if "queued" in line)
    for name in ("queue", "queued", "leased", "dead"):
        assert f" {name} " in header, header  # the first columns are always there
    if width >= 200:
        assert "pushed" in header and "redis://127.0.0.1:6379/0" in text and "a" * 32 in text
    assert "queue_index 1: Redis redis://10.0.0.1:6379/1 UNREACHABLE" in text.replace("\n", " ")
    assert "1.1 GiB" in text and "919.8 GiB" in text and "86399s" in text, text  # memory, AOF, result_ttl


@pytest.mark.parametrize("command", ["status", "top"])
def test_status_and_top_in_an_80_column_terminal(master, client, spawn, command):
    address = address_of(master)
    for i in range(1234):
        client.push("tasks.add", i, i)
    argv = [sys.executable, "-m", "ppq", command, "-m", address]
    if command == "top":
        argv += ["--interval", "0.5"]
    term = PtyTerminal(argv, spawn.env(), rows=40, cols=80)
    try:
        wait_for(lambda: _latest_queued(term.frames()) == 1234 if command == "top"
                 else term.proc.poll() is not None, timeout=20, what=f"ppq {command} to draw")
        frames = term.frames()
        if command == "top":
            term.press(b"\x03")
        assert term.proc.wait(10) == 0
    finally:
        term.close()
    screen = next(f for f in reversed(frames) if _queued_in(f)) if command == "top" else "\n".join(frames)
    lines = screen.replace("\r", "").splitlines()
    assert max(len(line) for line in lines) <= 80, screen
    assert _queued_in(screen) == 1234, screen
    assert "leased" in screen and "…" not in screen


def test_push_file_at_a_terminal_with_ids_to_a_file(master, spawn, tmp_path):
    """`ppq push --file tasks.jsonl > ids.txt` typed at a terminal: the progress bar is drawn on the
    terminal, and every id still goes to ids.txt."""
    lines = 3000
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(f'{{"task": "tasks.add", "args": [{i}, 0]}}\n' for i in range(lines)))
    ids_path = tmp_path / "ids.txt"
    master_fd, slave_fd = os.openpty()
    fcntl.ioctl(slave_fd, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))
    output = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(master_fd, 65536)
            except OSError:  # EIO: the terminal's last user is gone
                return
            if not chunk:
                return
            output.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    with open(ids_path, "w") as ids:
        proc = subprocess.run([sys.executable, "-m", "ppq", "push", "-m", address_of(master), "--file", str(path),
                               "--chunk", "100"], stdin=slave_fd, stdout=ids, stderr=slave_fd,
                              env=dict(spawn.env(), TERM="xterm-256color"), cwd=str(TESTS_DIR), timeout=60)
    os.close(slave_fd)
    reader.join(10)
    os.close(master_fd)
    terminal = bytes(output)
    assert proc.returncode == 0, terminal.decode(errors="replace")
    printed = ids_path.read_text().splitlines()
    assert [int(line.split("\t")[0]) for line in printed] == list(range(1, lines + 1))
    assert f"{lines} pushed, 0 refused".encode() in terminal
    assert b"\t" not in terminal.replace(b"\r", b"")  # no id went to the terminal


def test_metrics_show_pauses_schedules_limits_expiry_and_purges(spawn, redis_a, ra):
    """The master's /metrics follow the operator's features: a paused queue, schedules (active
    and paused), the tasks a limit holds back, expired and purged tasks."""
    master_port = free_port()
    _, address = spawn.master(redis_a.url, "--metrics-port", str(master_port))
    c = Client([address])
    m = wait_for(lambda: scrape(master_port), what="the master's metrics endpoint")
    assert sample(m, "ppq_queue_paused", queue_index="0") == 0
    assert sample(m, "ppq_schedules", queue_index="0", state="active") == 0

    c.pause_queue(0)
    c.add_schedule("nightly", "tasks.add", cron="0 3 * * *", args=[1, 2])
    c.add_schedule("hourly", "tasks.add", every=3600, args=[1, 2])
    c.pause_schedule("hourly")
    c.set_limit("tasks.add", rate="5/s")
    c.push("tasks.add", 1, 1, expires=1)
    c.push("tasks.add", 2, 2)
    m = scrape(master_port)
    assert sample(m, "ppq_queue_paused", queue_index="0") == 1
    assert sample(m, "ppq_schedules", queue_index="0", state="active") == 1
    assert sample(m, "ppq_schedules", queue_index="0", state="paused") == 1
    assert sample(m, "ppq_limit_tasks", queue_index="0", function="tasks.add", state="waiting") == 0

    purged_before = sample(m, "ppq_tasks_total", queue_index="0", event="purged")
    assert c.purge_queue(0) >= 1
    m = scrape(master_port)
    assert sample(m, "ppq_tasks_total", queue_index="0", event="purged") == purged_before + 2
    assert sample(m, "ppq_tasks_total", queue_index="0", event="task_expired") == 0
