"""The worker's security boundary, end to end with real workers and masters: the allowlist is about
the callable that runs (not only the module named), and what the master accepts at its edge."""

from __future__ import annotations

import stat

import pytest

from ppq import Client
from ppq.errors import InvalidTaskError

from .conftest import address_of, redis_snapshot, wait_state


def spawn_worker(spawn, master, allow: str, cwd: str, *extra: str):
    """``ppq worker`` like ``spawn.worker``, in the directory ``cwd``."""
    return spawn("worker", "--master-hosts", address_of(master), "--port", "0", "--concurrency", "1",
                 "--allow", allow, "--max-sleep", "1", "--heartbeat-interval", "0.5", *extra, cwd=cwd)


# -- the allowlist judges the callable ------------------------------------------------------------


def test_names_imported_into_an_allowed_module_never_run(master, call, spawn, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o755)
    markers = tmp_path / "markers"
    markers.mkdir()
    spawn_worker(spawn, master, "tasks,escape_tasks", str(home))
    escapes = {
        # func, fclass, args, the name the refusal gives as the real home of the callable
        "system": ("system", None, [f"touch {markers / 'system'}"], "posix"),
        "run": ("run", None, [["touch", str(markers / "run")]], "subprocess"),
        "shell": ("shell", None, [f"touch {markers / 'shell'}"], "functools"),
        "sneaky": ("sneaky", None, [["touch", str(markers / "sneaky")]], "subprocess"),
        "Path.chmod": ("chmod", "Path", [0o700], "pathlib"),  # Path() is the worker's cwd: home
        "Home.chmod": ("chmod", "Home", [0o700], "pathlib"),
        "Launcher.system": ("system", "Launcher", [f"touch {markers / 'launcher'}"], "posix"),
    }
    ids = {name: call("push_task", func, module="escape_tasks", fclass=fclass, args=args, max_retry=2)
           for name, (func, fclass, args, _) in escapes.items()}
    good = {
        "traced_add": (call("push_task", "traced_add", module="escape_tasks", args=[2, 3]), 5),
        "wrapped_mul": (call("push_task", "wrapped_mul", module="escape_tasks", args=[4, 5]), 20),
        "cached_square": (call("push_task", "cached_square", module="escape_tasks", args=[7]), 49),
        "Launcher.hello": (call("push_task", "hello", module="escape_tasks", fclass="Launcher"), "hello"),
        "Calculator.double": (call("push_task", "double", module="tasks", fclass="Calculator", args=[4]), 8),
        "Calculator.triple": (call("push_task", "triple", module="tasks", fclass="Calculator", args=[4]), 12),
    }
    client = Client([address_of(master)])
    good["@task mul"] = (client.push("tasks.mul", 6, 7), 42)
    good["@task times_ten"] = (client.push("tasks.times_ten", 3), 30)
    for name, (task_id, expected) in good.items():
        assert wait_state(call, task_id, ("done", "dead"))["result"] == expected, name
    for name, (*_, home_module) in escapes.items():
        info = wait_state(call, ids[name], ("dead", "done"))
        assert info["state"] == "dead", (name, info)
        assert info["error"].startswith("NotAllowedError:"), (name, info["error"])
        assert repr(home_module) in info["error"] and "allowed_modules" in info["error"], (name, info["error"])
        assert info["attempts"] == 1, name  # refused for good, never retried
    assert sorted(p.name for p in markers.iterdir()) == []
    assert stat.S_IMODE(home.stat().st_mode) == 0o755
    assert [d["id"] for d in call("dead_tasks", 0, 100)].count(ids["system"]) == 1
    client.close()


@pytest.mark.parametrize(("options", "field"), [
    ({"func": "__class__", "module": "tasks"}, "func"),
    ({"func": "tasks.__init_subclass__"}, "func"),
    ({"func": "_helper", "module": "tasks"}, "func"),
    ({"func": "__init_subclass__", "module": "tasks", "fclass": "Calculator"}, "func"),
    ({"func": "double", "module": "tasks", "fclass": "__class__"}, "fclass"),
])
def test_private_and_special_names_are_refused_at_push(call, ra, rb, options, field):
    before = redis_snapshot(ra, rb)
    with pytest.raises(InvalidTaskError) as excinfo:
        call("push_task", **options)
    assert str(excinfo.value).startswith(f"{field} ") and "'_'" in str(excinfo.value), str(excinfo.value)
    with pytest.raises(InvalidTaskError) as excinfo:
        call("push_tasks", [{"func": "add", "module": "tasks"}, options])
    assert str(excinfo.value).startswith(f"tasks[1]: {field} "), str(excinfo.value)
    assert redis_snapshot(ra, rb) == before


# -- names and ids are matched whole ------------------------------------------------------------------


NEWLINE_PUSHES = [
    ({"func": "add\n", "module": "tasks"}, "func"),
    ({"func": "tasks.add\n"}, "func"),
    ({"func": "add", "module": "tasks\n"}, "module"),
    ({"func": "add", "module": "tasks.sub\n"}, "module"),
    ({"func": "double", "module": "tasks", "fclass": "Calculator\n"}, "fclass"),
    ({"func": "add", "module": "tasks", "task_id": "abc\n"}, "task_id"),
    ({"func": "add", "module": "tasks", "key": "k\n"}, "key"),
    ({"func": "add", "module": "tasks", "key": "k\r"}, "key"),
]


@pytest.mark.parametrize(("options", "field"), NEWLINE_PUSHES)
def test_a_trailing_newline_is_refused_at_push(call, ra, rb, options, field):
    before = redis_snapshot(ra, rb)
    with pytest.raises(InvalidTaskError) as excinfo:
        call("push_task", **options)
    assert str(excinfo.value).startswith(f"{field} "), str(excinfo.value)
    with pytest.raises(InvalidTaskError) as excinfo:
        call("push_tasks", [{"func": "add", "module": "tasks", "args": [1, 2]}, options])
    assert str(excinfo.value).startswith(f"tasks[1]: {field} "), str(excinfo.value)
    assert redis_snapshot(ra, rb) == before


def test_a_task_id_with_a_trailing_newline_is_refused_everywhere(call, ra, rb):
    # The same id without the newline exists, so a loose match would reach it.
    task_id = call("push_task", "add", module="tasks", args=[1, 2], task_id="abc", delay=3600)
    before = redis_snapshot(ra, rb)
    calls = [
        ("get_task_info", ("abc\n",)), ("cancel_task", ("abc\n",)), ("wait_task", ("abc\n", 0, 0)),
        ("wait_tasks", (["abc", "abc\n"], 0, 0)), ("get_tasks_info", (["abc\n"],)),
        ("requeue_dead", (["abc\n"],)), ("purge_dead", ("abc\n",)),
        ("heartbeat", ({"id": "w1"}, 0, [["abc\n", "lease"]])),
        ("task_finish", ("abc\n", {"id": "w1"})), ("task_error", ("abc\n", {"id": "w1"})),
        ("report", ({"id": "w1"}, 0, [{"id": "abc\n", "lease": "l", "ok": False}])),
    ]
    for method, args in calls:
        with pytest.raises(InvalidTaskError) as excinfo:
            call(method, *args)
        assert "task_id" in str(excinfo.value) and "'abc\\n'" in str(excinfo.value), (method, str(excinfo.value))
    assert redis_snapshot(ra, rb) == before
    assert call("get_task_info", task_id)["state"] == "delayed"
