"""README.md, run: every console and python block, against a stack started the README's way.

A temporary HOME and working directory stand for the user's; mytasks.py is written there from
the README (the ``$ cat mytasks.py`` output, then the block that adds ``@task`` to it), and
``ppq up --allow mytasks --workers 2`` is started there as "terminal 1". The README's port,
7600, is the default; here every block runs against a free port instead, and how each block
gets there is said in BLOCKS below: console commands get ``PPQ_MASTER_PORT`` (client commands
and workers reach the config's own master, so the README's commands run unchanged), python
blocks get their ``7600`` replaced by the port. A block the table does not know fails the
test, so a new README example must say here how it runs.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from ppq import PyroFunc
from ppq.embedded import free_port

from .conftest import REPO, pid_gone, ppq_command, wait_for

README = REPO / "README.md"


def readme_blocks() -> list[tuple[str, str]]:
    """(language, text) of every console and python block of README.md, in order."""
    return [(lang, text) for lang, text in re.findall(r"```(\w+)\n(.*?)```", README.read_text(), re.DOTALL)
            if lang in ("console", "python")]


def console_commands(text: str) -> list[tuple[str, list[str]]]:
    """Each ``$ command`` of a console block, without its comment, with the output lines shown under it."""
    out: list[tuple[str, list[str]]] = []
    lines = iter(text.splitlines())
    for line in lines:
        if line.startswith("$ "):
            while line.endswith("\\"):  # a command continued on the next line
                line = line[:-1] + next(lines, "")
            out.append((" ".join(shlex.split(line[2:], comments=True)), []))
        elif out:
            out[-1][1].append(line)
    return out


class Session:
    """The user's machine: a HOME, a working directory, and the processes started in it."""

    def __init__(self, tmp_path: Path) -> None:
        self.home = tmp_path / "home"
        self.cwd = tmp_path / "work"
        self.home.mkdir()
        self.cwd.mkdir()
        self.port = free_port()  # the README's 7600
        self.background: list[subprocess.Popen[bytes]] = []
        self.count = 0

    def env(self, port: int | None = None) -> dict[str, str]:
        """The user's environment; PPQ_MASTER_PORT stands for the README's 7600 (none when ``port`` is 0)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PPQ_", "XDG_"))}
        env.update(HOME=str(self.home), PYTHONPATH=str(REPO))
        env["PPQ_DASHBOARD_PORT"] = "0"  # the dashboard each `ppq up` starts: a free port, not the README's 7680
        if port != 0:
            env["PPQ_MASTER_PORT"] = str(port or self.port)
        return env

    def argv(self, command: str) -> list[str]:
        words = shlex.split(command)
        if words[0] == "ppq":
            return [*ppq_command(), *words[1:]]
        if words[0] == "python":
            return [sys.executable, *words[1:]]
        raise AssertionError(f"no way to run {command!r}")

    def run(self, command: str, port: int | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv(command), cwd=self.cwd, env=self.env(port), capture_output=True, text=True,
                              timeout=120, stdin=subprocess.DEVNULL)

    def start(self, argv: list[str], port: int | None = None) -> subprocess.Popen[bytes]:
        self.count += 1
        log = self.cwd.parent / f"background-{self.count}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(argv, cwd=self.cwd, env=self.env(port), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        proc.log = log  # type: ignore[attr-defined]
        self.background.append(proc)
        return proc

    def python(self, text: str, port: int | None = None, background: bool = False, **swap: int) -> Any:
        """Run a python block as a script in the working directory, its ports swapped as given."""
        for old, new in {"7600": port or self.port, **{k.lstrip("_"): v for k, v in swap.items()}}.items():
            text = text.replace(str(old), str(new))
        self.count += 1
        script = self.cwd / f"block_{self.count}.py"
        script.write_text(text)
        if background:
            return self.start([sys.executable, script.name], port)
        return subprocess.run([sys.executable, script.name], cwd=self.cwd, env=self.env(port), capture_output=True,
                              text=True, timeout=120, stdin=subprocess.DEVNULL)

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGINT) -> int:
        children = {p.pid for p in psutil.Process(proc.pid).children(recursive=True)} if proc.poll() is None else set()
        if proc.poll() is None:
            proc.send_signal(sig)
        code = proc.wait(60)
        wait_for(lambda: all(pid_gone(p) for p in children), timeout=30, what="the children to exit")
        return code

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return Path(proc.log).read_text(errors="replace")  # type: ignore[attr-defined]

    def cleanup(self) -> None:
        for proc in self.background:
            if proc.poll() is None:
                for child in psutil.Process(proc.pid).children(recursive=True):
                    child.kill()
                proc.kill()
                proc.wait(10)


@pytest.fixture
def session(tmp_path: Path) -> Iterator[Session]:
    s = Session(tmp_path)
    yield s
    s.cleanup()


def answers(port: int) -> Callable[[], bool]:
    ping = PyroFunc(f"127.0.0.1:{port}", timeout=2, default_return=None)
    return lambda: ping("ping") == "pong"


# -- how each block runs, keyed by a line it holds ---------------------------------------------------------


def quickstart(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """`pip install .` is skipped (the test runs from the checkout); `ppq up --demo` runs on its own
    free port, in the temporary HOME, until its demo has printed; then Ctrl-C."""
    commands = dict(console_commands(text))
    assert set(commands) == {"pip install .", "ppq up --demo"}
    port = free_port()
    up = s.start(s.argv("ppq up --demo"), port=port)
    wait_for(lambda: up.poll() is not None or "went to the dead list as expected" in s.log(up), timeout=90,
             what="the demo")
    assert up.poll() is None, s.log(up)
    assert f"master-{port}" in s.log(up)  # the data directory named in the README, under HOME
    assert (s.home / ".local" / "share" / "ppq" / f"master-{port}").is_dir()
    assert s.stop(up) == 0, s.log(up)


def first_steps(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """mytasks.py was written from this block; "terminal 1" is a background `ppq up` in the working
    directory, "terminal 2" runs the rest; each command as written, with PPQ_MASTER_PORT set."""
    commands = console_commands(text)
    assert [c for c, _ in commands] == ["cat mytasks.py", "ppq up --allow mytasks --workers 2",
                                        "ppq push mytasks.add 2 3 --wait", "ppq status", "ppq dead list"]
    assert (s.cwd / "mytasks.py").read_text().startswith("\n".join(commands[0][1]) + "\n")
    out = s.run(commands[2][0])
    assert out.returncode == 0, out.stderr
    task_id, result = out.stdout.split()
    assert re.fullmatch(r"[0-9a-f]{32}", task_id) and result == "5"
    out = s.run(commands[3][0])
    assert out.returncode == 0 and "queues" in out.stdout and "workers (2)" in out.stdout, out.stdout + out.stderr
    out = s.run(commands[4][0])
    assert out.returncode == 0 and out.stdout.strip() == "no dead tasks in queue_index 0", out.stderr


def python_block(expected: list[str] | None = None, choices: set[str] | None = None) -> Callable[..., None]:
    """A python block run as a script against the stack (7600 replaced by its port); each line it
    prints is checked against the values in the README's comments."""

    def run(s: Session, text: str, ctx: dict[str, Any]) -> None:
        out = s.python(text)
        assert out.returncode == 0, out.stderr
        lines = out.stdout.split()
        if expected is not None:
            assert lines == expected, (lines, out.stderr)
        if choices is not None:
            assert len(lines) == 1 and lines[0] in choices, lines

    return run


def mytasks_addition(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """Added to mytasks.py before the stack starts (see test_readme); here it is checked as a module."""
    assert "def mul" in (s.cwd / "mytasks.py").read_text()


def seed_client(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """7600 is the stack's port; 7601 a free port where nothing listens, so PyroFunc fails over."""
    out = s.python(text, _7601=free_port())
    assert out.returncode == 0, out.stderr
    call = PyroFunc(f"127.0.0.1:{s.port}")
    counts = call("server_info")[0]
    call.close()
    assert counts["pushed"] >= 3


def seed_master(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """Run in the background on a port of its own, 6379 replaced by the tests' Redis; stopped with
    SIGTERM after seed_worker.py has registered with it."""
    port = free_port()
    ctx["seed_port"] = port
    ctx["seed_master"] = s.python(text, port=port, background=True, _6379=ctx["redis_port"])
    wait_for(lambda: ctx["seed_master"].poll() is not None or answers(port)(), what="seed_master.py")
    assert ctx["seed_master"].poll() is None, s.log(ctx["seed_master"])


def seed_worker(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """Run in the background against seed_master.py's port, until it is listed there; then both get SIGTERM."""
    port = ctx["seed_port"]
    worker = s.python(text, port=port, background=True)
    call = PyroFunc(f"127.0.0.1:{port}", timeout=3)
    wait_for(lambda: worker.poll() is not None or call("server_info")[0]["workers"], what="seed_worker.py")
    assert worker.poll() is None, s.log(worker)
    call.close()
    assert s.stop(worker, signal.SIGTERM) == 0, s.log(worker)
    assert s.stop(ctx["seed_master"], signal.SIGTERM) == 0, s.log(ctx["seed_master"])


def for_real(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """A ppq.yaml of the test's (master port, data directory) in the working directory, and no
    PPQ_MASTER_PORT: master, worker and status reach each other through the file alone. Master
    and worker run in the background as written (--concurrency 8 becomes 2 on this shared
    machine), then `ppq status --config ppq.yaml` must show the worker."""
    commands = [c for c, _ in console_commands(text)]
    assert commands == ["ppq master --config ppq.yaml", "ppq worker --config ppq.yaml --concurrency 8",
                        "ppq status --config ppq.yaml"]
    port = free_port()
    (s.cwd / "ppq.yaml").write_text(yaml.safe_dump({
        "master": {"port": port, "data_dir": str(s.cwd / "real-data")},
        "worker": {"heartbeat_interval": 0.5, "max_sleep": 1}}))
    master = s.start(s.argv(commands[0]), port=0)
    wait_for(lambda: master.poll() is not None or answers(port)(), what="ppq master --config")
    assert master.poll() is None, s.log(master)
    worker = s.start(s.argv(commands[1].replace("--concurrency 8", "--concurrency 2")), port=0)
    call = PyroFunc(f"127.0.0.1:{port}", timeout=3)
    wait_for(lambda: call("server_info")[0]["workers"], what="the worker to register")
    call.close()
    out = s.run(commands[2], port=0)
    assert out.returncode == 0 and "workers (1)" in out.stdout, out.stdout + out.stderr
    assert s.stop(worker, signal.SIGTERM) == 0, s.log(worker)
    assert s.stop(master, signal.SIGTERM) == 0, s.log(master)


def periodic_commands(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """Each command as written, against the stack: the schedule fires (its tasks run to done on the
    stack's workers), the table has the columns shown, run-now prints the id of a task that runs,
    and after remove nothing is listed."""
    commands = [c for c, _ in console_commands(text)]
    assert commands == ["ppq schedule add adder mytasks.add 2 3 --every 2", "ppq schedule list",
                        "ppq schedule run-now adder", "ppq schedule pause adder", "ppq schedule remove adder"]
    shown = dict(console_commands(text))["ppq schedule list"][0].split()
    out = s.run(commands[0])
    assert out.returncode == 0 and out.stdout.startswith("schedule adder added (every 2s"), out.stdout + out.stderr

    def last_done() -> bool:
        listed = json.loads(s.run("ppq schedule list --json").stdout)
        return bool(listed) and listed[0]["last_state"] == "done"

    wait_for(last_done, timeout=20, what="a tick of the schedule to run")
    out = s.run(commands[1])
    assert out.returncode == 0 and out.stdout.split("\n")[0].split() == shown, out.stdout + out.stderr
    assert "adder" in out.stdout and "done" in out.stdout
    out = s.run(commands[2])
    task_id = out.stdout.strip()
    assert out.returncode == 0 and task_id.startswith("s:adder:r"), out.stdout + out.stderr
    call = PyroFunc(f"127.0.0.1:{s.port}", timeout=3)
    assert call("wait_task", task_id, 0, 10)["result"] == 5
    call.close()
    for command in commands[3:]:
        out = s.run(command)
        assert out.returncode == 0, out.stderr
    assert s.run("ppq schedule list").stdout.strip() == "no schedules"


def declared_schedules(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """periodic_jobs.py written from the block, schedules.yaml from the README's yaml block (plus a
    free master port and a data directory); a `ppq master --config schedules.yaml` started there
    lists both schedules."""
    (s.cwd / "periodic_jobs.py").write_text(text)
    found = re.search(r"```yaml\n(# schedules.yaml\n.*?)```", README.read_text(), re.DOTALL)
    assert found
    config = yaml.safe_load(found.group(1))
    port = free_port()
    config["master"].update(port=port, data_dir=str(s.cwd / "schedules-data"))
    (s.cwd / "schedules.yaml").write_text(yaml.safe_dump(config))
    master = s.start(s.argv("ppq master --config schedules.yaml"), port=0)
    wait_for(lambda: master.poll() is not None or answers(port)(), what="ppq master --config schedules.yaml")
    assert master.poll() is None, s.log(master)
    out = s.run(f"ppq schedule list --json -m 127.0.0.1:{port}", port=0)
    listed = {e["name"]: e for e in json.loads(out.stdout)}
    assert set(listed) == {"nightly-report", "cleanup"}, out.stdout + out.stderr
    nightly = listed["nightly-report"]
    assert nightly["spec"] == "30 2 * * * Europe/Paris" and nightly["missed"] == "skip" and nightly["args"] == [2, 3]
    assert listed["cleanup"]["task"] == "periodic_jobs.cleanup" and listed["cleanup"]["max_retry"] == 2
    assert s.stop(master, signal.SIGTERM) == 0, s.log(master)


def limit_commands(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """Each command as written, against the stack: with mytasks.add at 5/s, 15 of its tasks start over
    about 2 s (5 at once, then 5 a second), the table has the columns and rows shown, and after
    the removals nothing is listed."""
    commands = [c for c, _ in console_commands(text)]
    assert commands == ["ppq limit set mytasks.add 5/s", "ppq limit set mytasks.mul --concurrency 1",
                        "ppq limit list", "ppq limit remove mytasks.add",
                        "ppq limit remove mytasks.mul --kind concurrency"]
    shown = dict(console_commands(text))["ppq limit list"]
    for command in commands[:2]:
        out = s.run(command)
        assert out.returncode == 0, out.stdout + out.stderr
    out = s.run(commands[2])
    assert out.returncode == 0 and [line.split() for line in out.stdout.strip().split("\n")] == \
        [line.split() for line in shown], out.stdout + out.stderr
    call = PyroFunc(f"127.0.0.1:{s.port}", timeout=10)
    ids = [call("push_task", "add", module="mytasks", args=[i, i]) for i in range(15)]
    infos = [call("wait_task", tid, 0, 10) for tid in ids]
    assert [i["result"] for i in infos] == [2 * i for i in range(15)]
    starts = sorted(i["started"] for i in infos)
    assert 1.6 <= starts[-1] - starts[0] <= 3.0, starts
    call.close()
    for command in commands[3:]:
        out = s.run(command)
        assert out.returncode == 0, out.stdout + out.stderr
    assert s.run("ppq limit list").stdout.strip() == "no limits"


def dashboard(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """Run as written (7681 replaced by a free port) against the stack, which it reaches through
    the config's own master (PPQ_MASTER_PORT): the overview answers with the stack's queue_index 0,
    the dead list has no actions (read-only), and it stops on SIGINT."""
    import urllib.request

    (command, _), = console_commands(text)
    assert command == "ppq dashboard --port 7681 --read-only"
    port = free_port()
    proc = s.start(s.argv(command.replace("7681", str(port))))

    def fetch(path: str) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
            return str(response.read().decode())

    def answers_http() -> bool:
        assert proc.poll() is None, s.log(proc)
        try:
            return "Overview" in fetch("/")
        except OSError:
            return False

    wait_for(answers_http, timeout=30, what="ppq dashboard")
    overview = json.loads(fetch("/api/overview"))
    assert overview["ok"] is True and 'data-queue="0"' in overview["html"], overview
    assert "read-only" in fetch("/dead/0") and "requeue-all" not in fetch("/dead/0")
    assert s.stop(proc) == 0, s.log(proc)


def nameserver_commands(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """Each command as written, on loopback (10.0.0.1 becomes 127.0.0.1, 9090 a free port), with a
    ppq.yaml of the test's (master port, data directory): the master registers, the worker finds
    it through the name server alone, `ppq status -m PYRONAME:...` lists the worker; stopped with
    SIGTERM, the master unregisters."""
    from ppq.rpc.names import NameServerEntry, lookup

    commands = [c for c, _ in console_commands(text)]
    assert commands == ["ppq nameserver --host 10.0.0.1 --port 9090",
                        "ppq master --nameserver 10.0.0.1:9090 --config ppq.yaml",
                        "ppq worker --nameserver 10.0.0.1:9090 --config ppq.yaml",
                        "ppq status -m PYRONAME:ppq.master@10.0.0.1:9090"]
    ns_port, port = free_port(), free_port()
    commands = [c.replace("10.0.0.1", "127.0.0.1").replace("9090", str(ns_port)) for c in commands]
    (s.cwd / "ppq.yaml").write_text(yaml.safe_dump({
        "master": {"port": port, "data_dir": str(s.cwd / "names-data")},
        "worker": {"heartbeat_interval": 0.5, "max_sleep": 1, "concurrency": 1}}))
    entry = NameServerEntry(f"PYRONAME:ppq.master@127.0.0.1:{ns_port}")

    def registered() -> list[str] | None:
        try:
            return [uri for uri, _ in lookup(entry, None, timeout=2)]
        except Exception:  # noqa: BLE001 - not answering yet
            return None

    nameserver = s.start(s.argv(commands[0]), port=0)
    wait_for(lambda: nameserver.poll() is not None or registered() is not None, what="ppq nameserver")
    assert nameserver.poll() is None, s.log(nameserver)
    master = s.start(s.argv(commands[1]), port=0)
    wait_for(lambda: master.poll() is not None or registered(), what="the master to register")
    assert master.poll() is None, s.log(master)
    assert registered() == [f"PYRO:queue@127.0.0.1:{port}"]
    worker = s.start(s.argv(commands[2]), port=0)
    wait_for(lambda: worker.poll() is not None or "workers (1)" in s.run(commands[3], port=0).stdout,
             interval=0.3, what="ppq status through the name server to list the worker")
    assert worker.poll() is None, s.log(worker)
    assert s.stop(worker, signal.SIGTERM) == 0, s.log(worker)
    assert s.stop(master, signal.SIGTERM) == 0, s.log(master)
    assert registered() == []
    assert s.stop(nameserver, signal.SIGTERM) == 0, s.log(nameserver)


def development(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """Not run: installing is what the test environment already did, and the test run is this one."""
    assert [c for c, _ in console_commands(text)] == ["pip install -e .[dev]", "ruff check ppq tests", "mypy",
                                                      "python -m pytest -q -p no:cacheprovider --durations=20"]


# The Django project the README's blocks go into: the settings a new project has, less what the
# README's example does not use (admin, sessions, middleware), with a root URLconf for shop's view.
DJANGO_SETTINGS = """\
SECRET_KEY = "readme"
ALLOWED_HOSTS = ["testserver"]
USE_TZ = True
INSTALLED_APPS = ["django.contrib.auth", "django.contrib.contenttypes", "shop"]
DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": {db!r}}}}}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
ROOT_URLCONF = "urls"
"""
DJANGO_MANAGE = """\
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
"""


def django_settings(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """A Django project in site/ (sqlite, the auth app, an empty shop app, no URLs yet): the block is appended to
    its settings.py, the master's 7600 replaced by the stack's port; then migrated."""
    site = s.cwd / "site"
    (site / "shop").mkdir(parents=True)
    (site / "shop" / "__init__.py").write_text("")
    (site / "manage.py").write_text(DJANGO_MANAGE)
    (site / "urls.py").write_text("urlpatterns = []\n")
    (site / "settings.py").write_text(DJANGO_SETTINGS.format(db=str(site / "db.sqlite3")) + "\n"
                                      + text.replace("7600", str(s.port)))
    ctx["site"] = site


def django_tasks(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """shop/tasks.py, as written."""
    (ctx["site"] / "shop" / "tasks.py").write_text(text)


def django_worker(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """Migrated, then the worker started as written, next to manage.py: it registers with the
    stack's master allowing shop.tasks (and mytasks.py's module not)."""
    site = ctx["site"]
    (command, _), = console_commands(text)
    assert command == "python manage.py ppq_worker --concurrency 2"
    out = subprocess.run([sys.executable, "manage.py", "migrate", "-v", "0"], cwd=site, env=s.env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    worker = s.start([sys.executable, str(site / "manage.py"), *shlex.split(command)[2:]])
    call = PyroFunc(f"127.0.0.1:{s.port}", timeout=3)
    entry = wait_for(lambda: worker.poll() is not None or next(
        (w for w in call("server_info")[0]["workers"] if w.get("pid") == worker.pid), None),
        timeout=60, what="manage.py ppq_worker")
    call.close()
    assert worker.poll() is None, s.log(worker)
    assert "shop.tasks" in entry["allow"] and "mytasks" not in entry["allow"], entry
    ctx["django_worker"] = worker


def django_view(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """shop/views.py as written, behind /signup: a POST through Django's test client (in `manage.py
    shell`) answers the task's id, and the task, pushed at the commit, greets the new user."""
    site = ctx["site"]
    (site / "shop" / "views.py").write_text(text)
    (site / "urls.py").write_text("from django.urls import path\n\nfrom shop import views\n\n"
                                  "urlpatterns = [path(\"signup\", views.signup)]\n")
    script = ("from django.test import Client\n"
              "print(Client().post('/signup', {'username': 'ada'}).json()['task_id'])\n")
    out = subprocess.run([sys.executable, "manage.py", "shell", "-c", script], cwd=site, env=s.env(),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    task_id = out.stdout.split()[-1]
    call = PyroFunc(f"127.0.0.1:{s.port}", timeout=15)
    info = call("wait_task", task_id, 0, 10)
    call.close()
    assert info["state"] == "done" and info["result"] == "welcome, ada", info
    assert s.stop(ctx["django_worker"], signal.SIGTERM) == 0, s.log(ctx["django_worker"])


def asgi_app(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """webapp.py, written to the working directory with the stack's port for 7600."""
    (s.cwd / "webapp.py").write_text(text.replace("7600", str(s.port)))


def asgi_commands(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """uvicorn as written (8000 replaced by a free port), in the working directory; the curl line's
    request answers what the README shows; SIGINT stops uvicorn (and the app's client) cleanly."""
    import urllib.request

    commands = console_commands(text)
    assert [c for c, _ in commands] == ["uvicorn webapp:app --port 8000",
                                        "curl http://127.0.0.1:8000/add?a=2&b=3"]
    port = free_port()
    server = s.start([sys.executable, "-m", *shlex.split(commands[0][0].replace("8000", str(port)))])
    url = commands[1][0].split()[1].replace("8000", str(port))

    def fetch() -> str | None:
        assert server.poll() is None, s.log(server)
        try:
            with urllib.request.urlopen(url, timeout=15) as response:
                return str(response.read().decode())
        except OSError:
            return None

    assert wait_for(fetch, timeout=30, what="uvicorn webapp:app") == "\n".join(commands[1][1]).strip()
    assert s.stop(server) == 0, s.log(server)


def soak_command(s: Session, text: str, ctx: dict[str, Any]) -> None:
    """The soak's command, as written, is valid for bench/soak.py as it is: its run takes ten
    minutes (the README's table), so here it checks its options (--dry-run) and starts nothing."""
    (command, _), = console_commands(text)
    argv = shlex.split(command)
    assert argv[:2] == ["python", "bench/soak.py"], command
    out = subprocess.run([sys.executable, str(REPO / "bench" / "soak.py"), *argv[2:], "--dry-run"],
                         capture_output=True, text=True, timeout=60, env=s.env())
    assert out.returncode == 0, out.stderr
    assert "3 masters and 8 workers" in out.stdout and "a failover every 20 s" in out.stdout, out.stdout


# A line of each block -> how it runs.
BLOCKS: dict[str, Callable[..., None]] = {
    "$ ppq up --demo": quickstart,
    "$ cat mytasks.py": first_steps,
    "client = Client([\"127.0.0.1:7600\"])\ntask_id": python_block(["5", "999000"]),
    "except TaskFailedError as exc:": python_block(["TypeError"]),
    "@task(max_retry=2)": mytasks_addition,
    "task_id = mytasks.mul.push(3, 4)": python_block(["12", "12"]),
    "except TaskExpiredError:": python_block(["2", "expired"]),
    "client = PyroFunc(": seed_client,
    "# seed_master.py": seed_master,
    "# seed_worker.py": seed_worker,
    "queue = Pyro5.api.Proxy(": python_block(choices={"queued", "running", "done"}),
    "$ ppq master --config ppq.yaml": for_real,
    "$ pip install -e": development,
    "$ ppq schedule add adder": periodic_commands,
    "# periodic_jobs.py": declared_schedules,
    "$ ppq limit set mytasks.add": limit_commands,
    "pipeline = chain(": python_block(["30", "[0,", "1,", "4,", "9,", "16]", "5", "of", "5", "done",
                                       "[0,", "1,", "4,", "9,", "16,", "25]", "TypeError"]),
    "$ ppq dashboard --port 7681": dashboard,
    "INSTALLED_APPS += [\"ppq.contrib.django\"]": django_settings,
    "def welcome(user_id):": django_tasks,
    "$ python manage.py ppq_worker": django_worker,
    "def signup(request):": django_view,
    "async def main():": python_block(["90"]),
    "# webapp.py": asgi_app,
    "$ uvicorn webapp:app": asgi_commands,
    "$ ppq nameserver --host 10.0.0.1": nameserver_commands,
    "$ python bench/soak.py --sentinel": soak_command,
}


def handler(lang: str, text: str) -> Callable[..., None]:
    found = [run for key, run in BLOCKS.items() if key in text]
    assert len(found) == 1, f"README {lang} block matched {len(found)} entries of BLOCKS:\n{text}"
    return found[0]


def test_readme(session, redis_a):
    blocks = readme_blocks()
    handlers = [handler(lang, text) for lang, text in blocks]
    assert len(set(map(id, handlers))) == len(BLOCKS), "an entry of BLOCKS matches no README block"
    # mytasks.py as the README shows it: the `cat` output, then the @task addition.
    cat = dict(console_commands(next(t for _, t in blocks if "$ cat mytasks.py" in t)))["cat mytasks.py"]
    addition = next(t for _, t in blocks if "@task(max_retry=2)" in t)
    (session.cwd / "mytasks.py").write_text("\n".join(cat) + "\n\n\n" + addition)
    # Terminal 1.
    up = session.start(session.argv("ppq up --allow mytasks --workers 2"))
    call = PyroFunc(f"127.0.0.1:{session.port}", timeout=3, default_return=None)
    wait_for(lambda: up.poll() is not None or len((call("server_info") or {0: {}})[0].get("workers", [])) == 2,
             timeout=60, what="ppq up and its two workers")
    assert up.poll() is None, session.log(up)
    call.close()
    ctx: dict[str, Any] = {"redis_port": redis_a.port}
    for (_, text), run in zip(blocks, handlers, strict=True):
        run(session, text, ctx)
    assert session.stop(up) == 0, session.log(up)
