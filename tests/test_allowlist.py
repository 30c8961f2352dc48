"""The worker's security boundary, end to end with real workers and masters: the allowlist is about
the callable that runs (not only the module named), and what the master accepts at its edge."""

from __future__ import annotations

import collections
import copy
import logging
import math
import pickle
import stat
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ppq import Client
from ppq.errors import InvalidTaskError, LeaseLostError, PPQError

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


# -- odd input is a field error, never an internal error ------------------------------------------------


def nested(depth: int, kind: type = list) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value] if kind is list else {"k": value}
    return value


# Values a caller can send that once broke the checks: huge integers (no float(), no str()), nesting
# deeper than msgpack and Python's recursion allow, NaN and infinities, bytes for strings, newlines.
ODD = st.one_of(
    st.sampled_from([10 ** 5000, -(10 ** 5000), 2 ** 64, 2 ** 63, -(2 ** 63) - 1, math.nan, math.inf, -math.inf,
                     -1, 0, -0.0, 1e300, 5e-324, True, None, "", "abc\n", "add\n", "tasks\n", "x" * 5000,
                     "\x00", b"abc", b"\x80\x04junk.", b"\x80\x05K\x01.", {}, [], [[]], {"a": 1}]),
    st.integers(1000, 1950).map(nested),
    st.integers(1000, 1950).map(lambda depth: nested(depth, dict)),
    st.text(max_size=8),
    st.binary(max_size=8),
)

# A valid call of each method; the test puts odd values in one or two places of it.
TEMPLATES: dict[str, list[Any]] = {
    "push_task": ["add", "", None, "tasks", None, "", None, 1, False, 0, None, [1, 2], {"x": 1}, None, None, None],
    "push_tasks": [[{"func": "add", "module": "tasks", "args": [1, 2], "key": "k", "delay": 0, "task_id": "t1",
                     "max_retry": 1, "queue_index": 0, "timeout": 5, "kwargs": {}}]],
    "get_task_info": ["abc", 0],
    "wait_task": ["abc", 0, 0],
    "wait_tasks": [["abc", "def"], 0, 0],
    "cancel_task": ["abc", 0],
    "dead_tasks": [0, 10, 0],
    "requeue_dead": [["abc"], 0],
    "purge_dead": [["abc"], 0],
    "get_tasks": [{"id": "w1", "heartbeat_interval": 1}, 0, 1, 0],
    "report": [{"id": "w1", "heartbeat_interval": 1}, 0,
               [{"id": "abc", "lease": "l", "ok": True, "result": 1, "result_bytes": None, "error": "",
                 "traceback": "", "retry": True, "release": False}], 0, 0],
    "heartbeat": [{"id": "w1", "heartbeat_interval": 1}, 0, [["abc", "l"]]],
    "task_finish": ["abc", {"id": "w1"}, 0, False, 1, None, "l"],
    "task_error": ["abc", {"host": "h", "pid": 1}, 0, False, "e", "tb", "l", True],
    "server_info": [],
}


def _spoil(draw: Any, value: Any) -> Any:
    """``value`` with an odd value in place of it, or of one of its fields or items."""
    if isinstance(value, dict) and value and draw(st.booleans()):
        key = draw(st.sampled_from(sorted(value)))
        return {**value, key: draw(ODD)}
    if isinstance(value, list) and value and draw(st.booleans()):
        spoiled = list(value)
        spoiled[0] = _spoil(draw, spoiled[0])
        return spoiled
    return draw(ODD)


@st.composite
def junk_calls(draw: Any) -> tuple[str, list[Any]]:
    method = draw(st.sampled_from(sorted(TEMPLATES)))
    args = copy.deepcopy(TEMPLATES[method])
    if args:
        for i in draw(st.lists(st.integers(0, len(args) - 1), min_size=1, max_size=2)):
            args[i] = _spoil(draw, args[i])
    if draw(st.integers(0, 9)) == 0:
        args.append(draw(ODD))  # one argument too many
    return method, args


def test_odd_arguments_get_field_errors_never_internal_errors(master, call, ra, rb, caplog):
    caplog.set_level(logging.WARNING, logger="ppq")
    outcomes: collections.Counter[str] = collections.Counter()

    @settings(max_examples=200, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                     HealthCheck.data_too_large])
    @given(junk_calls())
    def check(junk: tuple[str, list[Any]]) -> None:
        method, args = junk
        ra.flushall()
        rb.flushall()
        before = redis_snapshot(ra, rb)
        try:
            call(method, *args)
            outcomes["ok"] += 1
        except PPQError as exc:
            assert isinstance(exc, (InvalidTaskError, LeaseLostError)), f"{method}: {type(exc).__name__}: {exc}"
            assert not str(exc).startswith("internal error"), f"{method}: {exc}"
            assert redis_snapshot(ra, rb) == before, f"{method} failed ({exc}) but changed Redis"
            outcomes[type(exc).__name__] += 1
        broken = [r for r in caplog.records if r.exc_info or "internal error" in r.getMessage()]
        assert not broken, f"{method}: the master logged {broken[0].getMessage()}"

    check()
    # Both kinds of outcome were reached, so the calls went past the first checks.
    assert outcomes["ok"] and outcomes["InvalidTaskError"] + outcomes["CodecError"], outcomes


def test_odd_numbers_and_nesting_are_named_in_the_error(call, ra, rb):
    before = redis_snapshot(ra, rb)
    cases = [
        (("push_task", "add"), {"module": "tasks", "delay": 10 ** 5000}, "delay"),
        (("push_task", "add"), {"module": "tasks", "timeout": math.inf}, "timeout"),
        (("push_task", "add"), {"module": "tasks", "max_retry": 10 ** 5000}, "max_retry"),
        (("push_task", "add"), {"module": "tasks", "queue_index": -(10 ** 5000)}, "queue_index"),
        (("push_task", "add"), {"module": "tasks", "result_ttl": math.nan}, "result_ttl"),
        (("push_task", "add"), {"module": "tasks", "args": [nested(1900)]}, "args"),
        (("push_task", "add"), {"module": "tasks", "kwargs": {"a": nested(1900, dict)}}, "args/kwargs"),
        (("push_task", "add"), {"module": "tasks", "args": [10 ** 30]}, "args"),
        (("push_task", "add"), {"module": "tasks", "task_id": nested(1900)}, "task_id"),
        (("push_task", "add"), {"module": b"tasks"}, "module"),
        (("push_task", "add"), {"module": "tasks", "parameters": b"[" * 5000 + b"]" * 5000}, "parameters"),
        (("wait_task", "abc", 0, 10 ** 5000), {}, "timeout"),
        (("get_tasks", {"id": "w1"}, 0, 1, math.nan), {}, "wait"),
        (("dead_tasks", 0, 10 ** 5000), {}, "limit"),
        (("heartbeat", ["w", 10 ** 5000]), {}, "worker_info"),
        (("heartbeat", {"host": "h", "pid": 10 ** 5000}), {}, "worker_info"),
        (("get_tasks", {"host": nested(1900), "pid": 1}), {}, "worker_info"),
        (("task_finish", "abc", {"id": "w1"}, 0, False, nested(1900)), {}, "result"),
    ]
    for args, kwargs, field in cases:
        with pytest.raises(InvalidTaskError) as excinfo:
            call(*args, **kwargs)
        assert field in str(excinfo.value) and "internal error" not in str(excinfo.value), (args[0], field,
                                                                                             str(excinfo.value))
    assert redis_snapshot(ra, rb) == before


def test_a_pickled_result_is_refused_naming_master_allow_pickle(call, ra, rb):
    task_id = call("push_task", "add", module="tasks", args=[1, 2])
    [task] = call("get_tasks", {"id": "w1"}, 0, 1, 0)
    before = redis_snapshot(ra, rb)
    for protocol in (2, 5):
        with pytest.raises(InvalidTaskError) as excinfo:
            call("task_finish", task_id, {"id": "w1"}, 0, False, None, pickle.dumps({1, 2}, protocol=protocol),
                 task["lease"])
        assert "pickle" in str(excinfo.value) and "master.allow_pickle" in str(excinfo.value), str(excinfo.value)
    assert redis_snapshot(ra, rb) == before
    assert call("get_task_info", task_id)["state"] == "running"
