"""ppq.contrib.django in a real Django project: one written into a temporary directory (sqlite), its
``manage.py ppq_worker`` run as a process against a real master, its pushes made by
``manage.py shell -c`` scripts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ppq.master import MasterServer
from ppq.rpc import PyroFunc

from .conftest import REPO, address_of, pid_gone, wait_for, wait_state, worker_entry

SETTINGS = """\
SECRET_KEY = "test"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "ppq.contrib.django", "shop", "notasks"]
DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": {db!r}}}}}
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
PPQ = {ppq!r}
"""

MANAGE = """\
import os
import sys

if __name__ == "__main__":
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "site_settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
"""

MODELS = """\
from django.db import models


class Item(models.Model):
    name = models.CharField(max_length=50)
"""

TASKS = """\
import os

from django.db import connection

from ppq import task
from ppq.worker import add_hook

from .models import Item


@task
def add(a, b):
    return a + b


@task(max_retry=0)
def create_item(name):
    Item.objects.create(name=name)
    return sorted(Item.objects.values_list("name", flat=True))


@task(max_retry=0)
def names():
    return sorted(Item.objects.values_list("name", flat=True))


@task(max_retry=0)
def break_connection():
    # What a database restart leaves behind: a connection Django still holds but cannot use.
    connection.ensure_connection()
    connection.connection.close()
    return os.getpid()


def _seen(context):
    with open(os.environ["HOOK_LOG"], "a") as f:
        f.write(context["func"] + "\\n")


add_hook("on_task_finished", _seen)
"""


class Project:
    """A Django project in ``root``: settings (with ``PPQ``), the ``shop`` app, its sqlite database."""

    def __init__(self, root: Path, ppq: dict[str, Any]) -> None:
        self.root = root
        self.db = root / "db.sqlite3"
        self.procs: list[subprocess.Popen[bytes]] = []
        self.extra_env: dict[str, str] = {}
        (root / "shop").mkdir(parents=True)
        (root / "shop" / "__init__.py").write_text("")
        (root / "shop" / "models.py").write_text(MODELS)
        (root / "shop" / "tasks.py").write_text(TASKS)
        (root / "notasks").mkdir()
        (root / "notasks" / "__init__.py").write_text("")
        (root / "manage.py").write_text(MANAGE)
        self.configure(ppq)

    def configure(self, ppq: Any) -> None:
        (self.root / "site_settings.py").write_text(SETTINGS.format(db=str(self.db), ppq=ppq))

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PPQ_", "DJANGO_"))}
        env["PYTHONPATH"] = str(REPO)
        env["HOOK_LOG"] = str(self.root / "hooks.log")
        env.update(self.extra_env)
        return env

    def manage(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "manage.py", *args], cwd=self.root, env=self.env(), text=True,
                              capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def shell(self, code: str) -> Any:
        """Run ``code`` in ``manage.py shell``; return the JSON it prints last."""
        out = self.manage("shell", "-c", textwrap.dedent(code))
        assert out.returncode == 0, out.stdout + out.stderr
        return json.loads(out.stdout.strip().splitlines()[-1])

    def migrate(self) -> None:
        out = self.manage("migrate", "--run-syncdb", "-v", "0")
        assert out.returncode == 0, out.stdout + out.stderr

    def start(self, *args: str) -> subprocess.Popen[bytes]:
        log = self.root / f"{args[0]}-{len(self.procs)}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, "manage.py", *args], cwd=self.root, env=self.env(),
                                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        proc.log_path = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def cleanup(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)


def ppq_settings(master: MasterServer) -> dict[str, Any]:
    return {"worker": {"master_hosts": [address_of(master)], "max_sleep": 1, "heartbeat_interval": 0.5,
                       "port": 0},
            "client": {"masters": [address_of(master)]}}


@pytest.fixture
def project(tmp_path: Path, master: MasterServer) -> Iterator[Project]:
    p = Project(tmp_path / "site", ppq_settings(master))
    p.migrate()
    yield p
    p.cleanup()


@pytest.fixture
def call(master: MasterServer) -> Iterator[PyroFunc]:
    func = PyroFunc(master.uri, timeout=15)
    yield func
    func.close()


def start_worker(project: Project, call: PyroFunc, *flags: str, queue_index: int = 0) -> subprocess.Popen[bytes]:
    worker = project.start("ppq_worker", "--concurrency", "1", *flags)
    wait_for(lambda: worker.poll() is not None or any(w.get("pid") == worker.pid
                                                      for w in call("server_info")[queue_index]["workers"]),
             what="manage.py ppq_worker to register")
    assert worker.poll() is None, project.log(worker)
    return worker


def test_app_tasks_pushed_with_push_run_on_a_manage_py_worker(project, call):
    worker = start_worker(project, call)
    entry = worker_entry(call, worker.pid)
    assert "shop.tasks" in entry["allow"] and "notasks.tasks" not in entry["allow"], entry
    ids = project.shell("""
        import json
        from shop.tasks import add, create_item
        print(json.dumps([add.push(2, 3), create_item.push("spoon")]))
    """)
    assert wait_state(call, ids[0], "done")["result"] == 5
    assert wait_state(call, ids[1], "done")["result"] == ["spoon"]
    # The ORM's write is in the project's database, and the app's hook ran in the agent.
    assert project.shell("""
        import json
        from shop.models import Item
        print(json.dumps(list(Item.objects.values_list("name", flat=True))))
    """) == ["spoon"]
    wait_for(lambda: (project.root / "hooks.log").exists()
             and (project.root / "hooks.log").read_text().split() == ["add", "create_item"], what="the hooks")
    # A module of an app, not its tasks module, is not allowed: masters do not hand it to this worker.
    refused = call("push_task", "Item", module="shop.models", max_retry=0)
    info = wait_for(lambda: call("get_task_info", refused).get("waiting_for"), what="the master's reason")
    assert info == "a worker that allows shop.models" and call("get_task_info", refused)["state"] == "queued"
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, project.log(worker)


@pytest.mark.parametrize("pool", ["processes", "threads"])
def test_orm_task_after_a_database_restart(project, call, pool):
    worker = start_worker(project, call, "--pool", pool)
    first = call("push_task", "create_item", module="shop.tasks", args=["cup"])
    assert wait_state(call, first, "done")["result"] == ["cup"]
    # The connection the task used is held by the executor, then lost under it.
    broken = call("push_task", "break_connection", module="shop.tasks")
    executor = wait_state(call, broken, "done")["result"]
    after = call("push_task", "names", module="shop.tasks")
    assert wait_state(call, after, "done")["result"] == ["cup"]
    # A database replaced by a new one (a file deleted and made again): the next task uses the new one.
    project.db.unlink()
    project.migrate()
    replaced = call("push_task", "create_item", module="shop.tasks", args=["bowl"])
    assert wait_state(call, replaced, "done")["result"] == ["bowl"]
    assert call("get_task_info", replaced)["worker"] == call("get_task_info", broken)["worker"]
    if pool == "threads":
        assert executor == worker.pid  # one executor thread, whose connection Django keeps per thread
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(30) == 0, project.log(worker)
        return
    assert executor != worker.pid and not pid_gone(executor)  # the same executor ran them all
    # An executor started afresh (from the fork server, not forked from the set-up agent) sets Django up.
    os.kill(executor, signal.SIGKILL)
    again = call("push_task", "create_item", module="shop.tasks", args=["plate"])
    assert wait_state(call, again, "done")["result"] == ["bowl", "plate"]
    fresh = call("push_task", "break_connection", module="shop.tasks")
    assert wait_state(call, fresh, "done")["result"] not in (executor, worker.pid)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, project.log(worker)


def test_push_on_commit_pushes_after_the_commit_and_never_on_rollback(project, call):
    out = project.shell("""
        import json
        from django.db import transaction
        from ppq.client import default_client
        from ppq.contrib.django import push_on_commit
        from shop.models import Item
        from shop.tasks import create_item

        client = default_client()
        with transaction.atomic():
            Item.objects.create(name="fork")
            committed = push_on_commit(create_item, "knife")
            named = push_on_commit("shop.tasks.names", priority=5)
            by_client = client.push("shop.tasks.names", on_commit=True)
            inside = client.info(committed) or client.info(named) or client.info(by_client)
        after = client.info(committed)
        try:
            with transaction.atomic():
                Item.objects.create(name="plate")
                rolled_back = push_on_commit("shop.tasks.create_item", "glass", priority=3)
                client_rolled_back = client.push("shop.tasks.names", on_commit=True)
                raise RuntimeError
        except RuntimeError:
            pass
        print(json.dumps({"committed": committed, "named": named, "inside": inside,
                          "after": after and after["state"], "rolled_back": rolled_back,
                          "by_client": by_client, "client_rolled_back": client_rolled_back}))
    """)
    assert out["inside"] is None and out["after"] == "queued"
    assert call("get_task_info", out["rolled_back"]) is None
    assert call("get_task_info", out["by_client"])["state"] == "queued"
    assert call("get_task_info", out["client_rolled_back"]) is None
    worker = start_worker(project, call)
    # The row written in the same transaction as the push is there when the task runs.
    assert wait_state(call, out["committed"], "done")["result"] == ["fork", "knife"]
    named = wait_state(call, out["named"], "done")
    assert named["priority"] == 5 and named["result"] in (["fork"], ["fork", "knife"])
    assert call("get_task_info", out["rolled_back"]) is None
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, project.log(worker)


def test_settings_errors_name_the_key(tmp_path, master, call):
    project = Project(tmp_path / "site", {"worker": {"port": -1}})
    try:
        out = project.manage("ppq_worker")
        assert out.returncode == 2
        assert "settings.PPQ: worker.port: must not be negative, got -1" in out.stderr, out.stderr
        out = project.manage("check")
        assert out.returncode != 0 and "ppq.E001" in out.stderr and "worker.port" in out.stderr, out.stderr
        project.configure({"wroker": {}})
        out = project.manage("ppq_master")
        assert out.returncode == 2
        assert "settings.PPQ: unknown config key 'wroker' (did you mean worker?)" in out.stderr, out.stderr
        project.configure({"client": {"retry": "often"}})
        out = project.manage("shell", "-c", "from shop.tasks import add; add.push(1, 2)")
        assert out.returncode != 0 and "settings.PPQ: client.retry: expected an integer" in out.stderr, out.stderr
        project.configure(["worker"])
        out = project.manage("ppq_worker")
        assert out.returncode == 2 and "settings.PPQ: expected a dict of ppq config keys, got list" in out.stderr
        assert call("server_info")[0]["pushed"] == 0
    finally:
        project.cleanup()


def test_flags_and_env_override_settings(project, call, master):
    """The click command's flags, unchanged: --help lists them; PPQ_* and flags beat settings.PPQ."""
    out = project.manage("ppq_worker", "--help")
    assert out.returncode == 0 and "--master-hosts" in out.stdout and "--concurrency" in out.stdout, out.stderr
    assert "manage.py ppq_worker" in out.stdout
    out = project.manage("ppq_worker", "--no-such-flag")
    assert out.returncode == 2 and "No such option '--no-such-flag'" in out.stderr, out.stderr
    # settings.PPQ says queue_index 0, PPQ_WORKER_QUEUE_INDEX says 1: the variable wins.
    project.configure({**ppq_settings(master), "worker": {**ppq_settings(master)["worker"], "queue_index": 0}})
    project.extra_env["PPQ_WORKER_QUEUE_INDEX"] = "1"
    worker = start_worker(project, call, queue_index=1)
    task_id = call("push_task", "add", module="shop.tasks", args=[1, 2], queue_index=1)
    assert wait_state(call, task_id, "done", queue_index=1)["result"] == 3
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(30) == 0, project.log(worker)
    # Any ppq command, through `manage.py ppq`, reaches the master settings.PPQ names.
    out = project.manage("ppq", "task", task_id, "--queue-index", "1", "--json")
    assert out.returncode == 0 and json.loads(out.stdout)["state"] == "done", out.stdout + out.stderr
    # call_command hands its arguments to click as they are.
    out = project.manage("shell", "-v", "0", "-c", "from django.core.management import call_command\n"
                         f"call_command('ppq', 'task', '{task_id}', '--queue-index', '1', '--json')")
    assert out.returncode == 0 and json.loads(out.stdout)["result"] == 3, out.stdout + out.stderr


def test_ppq_up_runs_the_apps_tasks(project):
    """manage.py ppq_up: its own master, and workers that are manage.py processes of the project."""
    from ppq.embedded import free_port

    port = free_port()
    project.configure({"master": {"port": port, "data_dir": str(project.root / "data")},
                       "worker": {"max_sleep": 1, "heartbeat_interval": 0.5}})
    up = project.start("ppq_up", "--workers", "1", "--concurrency", "1", "--no-dashboard")
    call = PyroFunc(f"127.0.0.1:{port}", timeout=5, default_return=None)
    try:
        wait_for(lambda: up.poll() is not None or (call("server_info") or {0: {"workers": []}})[0]["workers"],
                 timeout=60, what="ppq_up and its worker")
        assert up.poll() is None, project.log(up)
        task_id = project.shell("""
            import json
            from shop.tasks import create_item
            print(json.dumps(create_item.push("pan")))
        """)
        assert wait_state(call, task_id, "done")["result"] == ["pan"]
    finally:
        call.close()
    up.send_signal(signal.SIGINT)
    assert up.wait(60) == 0, project.log(up)


def test_on_commit_takes_only_true_or_false():
    from ppq import Client
    from ppq.errors import InvalidTaskError

    client = Client(["127.0.0.1:1"], retry=0, timeout=1)
    try:
        with pytest.raises(InvalidTaskError, match="on_commit must be true or false, got 'yes'"):
            client.push("shop.tasks.names", on_commit="yes")
    finally:
        client.close()
