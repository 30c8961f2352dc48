"""The payload codec and the task record's checks, without servers: what crosses the wire,
what a push may hold, and how a worker resolves a target (allowlists before any import)."""

from __future__ import annotations

import base64
import json
import math
import pickle
import sys

import pytest
import serpent

from ppq import codec
from ppq.config import LimitsConfig
from ppq.errors import CodecError, InvalidTaskError, NotAllowedError
from ppq.task import (
    check_push,
    decode_body,
    encode_body,
    module_allowed,
    path_allowed,
    resolve,
)

LIMITS = LimitsConfig()
QUEUES = (0, 1)


# -- codec ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [None, True, 0, -5, 2 ** 40, 1.5, "text", "ünïcode", b"\x00\xffbytes",
                                   [1, [2, [3]]], {"a": {"b": [None, 1.0]}}, {1: "int keys"}])
def test_encode_decode_round_trip(value):
    data = codec.encode(value)
    assert isinstance(data, bytes)
    assert codec.decode(data) == value
    assert not codec.is_pickle(data)


def test_tuples_come_back_as_lists():
    assert codec.decode(codec.encode((1, (2, 3)))) == [1, [2, 3]]


def test_encode_refuses_objects_naming_their_type():
    with pytest.raises(CodecError) as excinfo:
        codec.encode({"ok": [1, {"bad": object()}]})
    assert "object" in str(excinfo.value)
    with pytest.raises(CodecError):
        codec.encode({1, 2})


def test_pickle_is_opt_in_on_both_ends():
    value = {1, 2, 3}
    data = codec.encode(value, use_pickle=True)
    assert codec.is_pickle(data)
    with pytest.raises(CodecError) as excinfo:
        codec.decode(data)
    assert "pickle" in str(excinfo.value)
    assert codec.decode(data, allow_pickle=True) == value
    # JSON-like data stays msgpack even when pickle is allowed.
    assert not codec.is_pickle(codec.encode([1, 2], use_pickle=True))


def test_decode_refuses_garbage():
    with pytest.raises(CodecError):
        codec.decode(b"\xc1")


def test_parameters_round_trip_and_json_text():
    data = codec.encode_parameters((1, "a"), {"k": [1, 2]})
    assert codec.decode_parameters(data) == ([1, "a"], {"k": [1, 2]})
    assert codec.decode_parameters(codec.encode_parameters()) == ([], {})
    assert codec.decode_parameters(b'[[1, 2], {"x": null}]') == ([1, 2], {"x": None})
    assert codec.decode_parameters(json.dumps([[], None]).encode()) == ([], {})


@pytest.mark.parametrize("data", [codec.encode([1, 2, 3]), codec.encode({"args": []}), codec.encode(["a", {}]),
                                  codec.encode([[1], {1: 2}]), b"[1, 2", b"{}"])
def test_decode_parameters_refuses_what_is_not_an_args_kwargs_pair(data):
    with pytest.raises(CodecError) as excinfo:
        codec.decode_parameters(data)
    assert "parameters" in str(excinfo.value)


def test_pickled_parameters_need_allow_pickle():
    data = codec.encode_parameters([{1, 2}], {}, use_pickle=True)
    with pytest.raises(CodecError):
        codec.decode_parameters(data)
    assert codec.decode_parameters(data, allow_pickle=True) == ([{1, 2}], {})


def test_from_wire_accepts_every_pyro5_serializer_shape_of_bytes():
    blob = codec.encode_parameters([1], {"a": 2})
    assert codec.from_wire(blob) == blob
    assert codec.from_wire(bytearray(blob)) == blob
    assert codec.from_wire(memoryview(blob)) == blob
    # What serpent really makes of bytes on the wire.
    over_serpent = serpent.loads(serpent.dumps({"p": blob}))["p"]
    assert isinstance(over_serpent, dict) and over_serpent["encoding"] == "base64"
    assert codec.from_wire(over_serpent) == blob
    assert codec.from_wire("[[1], {}]") == b"[[1], {}]"
    with pytest.raises(CodecError):
        codec.from_wire({"data": "!!!not base64!!!", "encoding": "base64"})
    with pytest.raises(CodecError) as excinfo:
        codec.from_wire(12)
    assert "parameters" in str(excinfo.value)


# -- check_push -------------------------------------------------------------------------------


def test_check_push_builds_a_spec():
    spec = check_push({"func": "add", "module": "tasks", "args": [1, 2], "kwargs": {"x": 1}, "key": "k",
                       "delay": 2, "max_retry": 3, "retry_delay": True, "queue_index": 1, "timeout": 5},
                      QUEUES, LIMITS)
    assert (spec.queue_index, spec.key, spec.delay) == (1, "k", 2.0)
    assert dict(spec.options) == {"max_retry": 3, "retry_delay": 1}
    body = decode_body(spec.body)
    assert (body["func"], body["module"], body["timeout"], body["max_retry"]) == ("add", "tasks", 5.0, 3)
    assert codec.decode_parameters(body["params"]) == ([1, 2], {"x": 1})
    assert len(spec.id) >= 16


def test_check_push_splits_a_dotted_func_and_keeps_seed_parameters():
    params = codec.encode_parameters([0], {})
    spec = check_push({"func": "time.sleep", "parameters": params}, QUEUES, LIMITS)
    body = decode_body(spec.body)
    assert (body["module"], body["func"]) == ("time", "sleep")
    assert codec.decode_parameters(body["params"]) == ([0], {})
    b64 = {"data": base64.b64encode(params).decode(), "encoding": "base64"}
    assert decode_body(check_push({"func": "sleep", "module": "time", "parameters": b64}, QUEUES,
                                  LIMITS).body)["params"] == params


@pytest.mark.parametrize(("options", "field"), [
    ({"func": "", "module": "m"}, "func"),
    ({"func": None, "module": "m"}, "func"),
    ({"func": "f"}, "module"),
    ({"func": "f", "module": "a..b"}, "module"),
    ({"func": "f", "module": "1abc"}, "module"),
    ({"func": "f", "module": "m" * 201}, "module"),
    ({"func": "f", "module": "m", "delay": -0.5}, "delay"),
    ({"func": "f", "module": "m", "delay": float("nan")}, "delay"),
    ({"func": "f", "module": "m", "delay": 400 * 86400}, "delay"),
    ({"func": "f", "module": "m", "queue_index": 2}, "queue_index"),
    ({"func": "f", "module": "m", "queue_index": -1}, "queue_index"),
    ({"func": "f", "module": "m", "max_retry": 101}, "max_retry"),
    ({"func": "f", "module": "m", "max_retry": 1.5}, "max_retry"),
    ({"func": "f", "module": "m", "retry_delay": 1}, "retry_delay"),
    ({"func": "f", "module": "m", "timeout": -1}, "timeout"),
    ({"func": "f", "module": "m", "result_ttl": "1"}, "result_ttl"),
    ({"func": "f", "module": "m", "task_id": ""}, "task_id"),
    ({"func": "f", "module": "m", "task_id": "x" * 65}, "task_id"),
    ({"func": "f", "module": "m", "key": "k\x00"}, "key"),
    ({"func": "f", "module": "m", "surprise": 1}, "surprise"),
    ({"func": "f", "module": "m", "args": {"a": 1}}, "args"),
    ({"func": "f", "module": "m", "kwargs": {1: 1}}, "kwargs"),
    ({"func": "f", "module": "m", "args": [object()]}, "args|parameters"),
    ({"func": "f", "module": "m", "parameters": codec.encode_parameters([1]), "kwargs": {}}, "parameters"),
    ({"func": "f", "module": "m", "parameters": pickle.dumps(([1], {}))}, "parameters"),
    ({"func": "f", "module": "m", "parameters": 42}, "parameters"),
    ({"func": "__class__", "module": "m"}, "func"),
    ({"func": "_helper", "module": "m"}, "func"),
    ({"func": "m._helper"}, "func"),
    ({"func": "__init_subclass__", "module": "m", "fclass": "Calculator"}, "func"),
    ({"func": "f", "module": "m", "fclass": "_Hidden"}, "fclass"),
    ({"func": "f\n", "module": "m"}, "func"),
    ({"func": "f", "module": "m\n"}, "module"),
    ({"func": "f", "module": "m", "fclass": "C\n"}, "fclass"),
    ({"func": "f", "module": "m", "task_id": "abc\n"}, "task_id"),
    ({"func": "f", "module": "m", "key": "k\n"}, "key"),
    ({"func": "f", "module": "m", "key": "k\tk"}, "key"),
])
def test_check_push_refuses_bad_fields_naming_them(options, field):
    with pytest.raises(InvalidTaskError) as excinfo:
        check_push(options, QUEUES, LIMITS)
    assert any(name in str(excinfo.value) for name in field.split("|")), str(excinfo.value)


def test_check_push_payload_limit():
    small = LimitsConfig(max_payload=100)
    check_push({"func": "f", "module": "m", "args": ["x" * 50]}, QUEUES, small)
    with pytest.raises(InvalidTaskError) as excinfo:
        check_push({"func": "f", "module": "m", "args": ["x" * 200]}, QUEUES, small)
    assert "parameters" in str(excinfo.value) and "100" in str(excinfo.value)
    with pytest.raises(InvalidTaskError):
        check_push({"func": "f", "module": "m", "parameters": codec.encode_parameters(["x" * 200])}, QUEUES, small)


def test_check_push_accepts_pickle_only_when_allowed():
    data = pickle.dumps(([1], {}), protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(InvalidTaskError) as excinfo:
        check_push({"func": "f", "module": "m", "parameters": data}, QUEUES, LIMITS)
    assert "pickle" in str(excinfo.value)
    spec = check_push({"func": "f", "module": "m", "parameters": data}, QUEUES, LIMITS, allow_pickle=True)
    assert decode_body(spec.body)["params"] == data


def test_body_round_trip():
    blob = encode_body("f", "m", "C", "/p", "py", b"\x01", 2.5, 4)
    assert decode_body(blob) == {"func": "f", "module": "m", "fclass": "C", "path": "/p", "lang": "py",
                                 "params": b"\x01", "timeout": 2.5, "max_retry": 4}


# -- allowlists and resolve -------------------------------------------------------------------------


def test_module_allowed_matches_whole_segments():
    assert module_allowed("app", ["app"])
    assert module_allowed("app.tasks.sub", ["app"])
    assert not module_allowed("apple", ["app"])
    assert not module_allowed("app", ["app.tasks"])
    assert not module_allowed("os", [])
    assert module_allowed("anything.at.all", ["*"])


def test_path_allowed(tmp_path):
    (tmp_path / "inside").mkdir()
    assert path_allowed(str(tmp_path / "inside"), [str(tmp_path)])
    assert path_allowed(str(tmp_path), [str(tmp_path)])
    assert not path_allowed(str(tmp_path) + "-sibling", [str(tmp_path)])
    assert not path_allowed(str(tmp_path / "inside" / ".." / ".."), [str(tmp_path)])


def _marker_module(tmp_path, name):
    marker = tmp_path / f"{name}.imported"
    (tmp_path / f"{name}.py").write_text(f"open({str(marker)!r}, 'w').write('imported')\n\ndef run():\n"
                                         f"    return 'ran'\n")
    return marker


def test_resolve_refuses_a_module_not_allowed_without_importing_it(tmp_path):
    marker = _marker_module(tmp_path, "ppq_resolve_marker_a")
    sys.path.insert(0, str(tmp_path))
    try:
        with pytest.raises(NotAllowedError) as excinfo:
            resolve("ppq_resolve_marker_a", "run", allowed_modules=["tests"])
        assert "ppq_resolve_marker_a" in str(excinfo.value)
        assert not marker.exists() and "ppq_resolve_marker_a" not in sys.modules
        # The control: allowed, the same module is imported (and writes its marker).
        assert resolve("ppq_resolve_marker_a", "run", allowed_modules=["ppq_resolve_marker_a"])() == "ran"
        assert marker.exists()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("ppq_resolve_marker_a", None)


def test_resolve_refuses_a_path_not_allowed(tmp_path):
    marker = _marker_module(tmp_path, "ppq_resolve_marker_b")
    before = list(sys.path)
    with pytest.raises(NotAllowedError) as excinfo:
        resolve("ppq_resolve_marker_b", "run", path=str(tmp_path), allowed_modules=["*"], allowed_paths=["/nowhere"])
    assert "path" in str(excinfo.value)
    assert sys.path == before and not marker.exists()
    try:
        assert resolve("ppq_resolve_marker_b", "run", path=str(tmp_path), allowed_modules=["*"],
                       allowed_paths=[str(tmp_path)])() == "ran"
    finally:
        if str(tmp_path) in sys.path:
            sys.path.remove(str(tmp_path))
        sys.modules.pop("ppq_resolve_marker_b", None)


def test_resolve_functions_instance_methods_and_staticmethods():
    assert resolve("tests.tasks", "add", allowed_modules=["tests"])(2, 3) == 5
    assert resolve("tests.tasks", "double", fclass="Calculator", allowed_modules=["tests"])(4) == 8
    assert resolve("tests.tasks", "triple", fclass="Calculator", allowed_modules=["tests"])(4) == 12
    with pytest.raises(ModuleNotFoundError):
        resolve("tests.no_such_module_here", "f", allowed_modules=["tests"])
    with pytest.raises(AttributeError):
        resolve("tests.tasks", "no_such_function", allowed_modules=["tests"])


def test_resolve_refuses_callables_defined_outside_the_allowed_modules():
    from . import escape_tasks

    allowed = ["tests.escape_tasks"]
    created = escape_tasks.Launcher.created
    refused = {("system", ""): "posix", ("run", ""): "subprocess", ("shell", ""): "functools",
               ("sneaky", ""): "subprocess", ("chmod", "Path"): "pathlib", ("chmod", "Home"): "pathlib",
               ("system", "Launcher"): "posix", ("run", "Launcher"): "subprocess", ("hello", "Shadow"): "instance"}
    for (func, fclass), home in refused.items():
        with pytest.raises(NotAllowedError) as excinfo:
            resolve("tests.escape_tasks", func, fclass=fclass, allowed_modules=allowed)
        message = str(excinfo.value)
        if home == "instance":
            assert "the instance holds" in message, message
        else:
            assert f"module {home!r}, which is not in" in message and "allowed_modules" in message, message
    # Checked before the class is instantiated.
    assert escape_tasks.Launcher.created == created
    # Twice: the second answer comes from what the first one checked.
    for _ in range(2):
        assert resolve("tests.escape_tasks", "traced_add", allowed_modules=allowed)(2, 3) == 5
        assert resolve("tests.escape_tasks", "wrapped_mul", allowed_modules=allowed)(2, 3) == 6
        assert resolve("tests.escape_tasks", "cached_square", allowed_modules=allowed)(3) == 9
        assert resolve("tests.escape_tasks", "hello", fclass="Launcher", allowed_modules=allowed)() == "hello"
        with pytest.raises(NotAllowedError):
            resolve("tests.escape_tasks", "system", allowed_modules=allowed)
    assert escape_tasks.Launcher.created == created + 2
    # "*" still allows everything.
    assert resolve("tests.escape_tasks", "run", allowed_modules=["*"]) is escape_tasks.run
    assert resolve("tests.escape_tasks", "Path", allowed_modules=["*"]) is escape_tasks.Path


def test_resolve_judges_the_object_the_module_holds_now():
    from . import escape_tasks

    allowed = ["tests.escape_tasks"]
    original = escape_tasks.wrapped_mul
    assert resolve("tests.escape_tasks", "wrapped_mul", allowed_modules=allowed) is original
    escape_tasks.wrapped_mul = escape_tasks.run
    try:
        with pytest.raises(NotAllowedError) as excinfo:
            resolve("tests.escape_tasks", "wrapped_mul", allowed_modules=allowed)
        assert "'subprocess'" in str(excinfo.value)
    finally:
        escape_tasks.wrapped_mul = original
    assert resolve("tests.escape_tasks", "wrapped_mul", allowed_modules=allowed) is original


@pytest.mark.parametrize(("func", "fclass", "field"), [
    ("__class__", "", "func"), ("_foreign", "", "func"), ("__getattr__", "", "func"),
    ("__init_subclass__", "Launcher", "func"), ("hello", "_Hidden", "fclass"),
])
def test_resolve_refuses_private_and_special_names(func, fclass, field):
    with pytest.raises(NotAllowedError) as excinfo:
        resolve("tests.escape_tasks", func, fclass=fclass, allowed_modules=["*"])
    assert str(excinfo.value).startswith(f"{field} ") and "'_'" in str(excinfo.value)


def test_resolve_refuses_what_has_no_module_or_is_no_class():
    with pytest.raises(NotAllowedError) as excinfo:
        resolve("tests.tasks", "os", allowed_modules=["tests"])  # a module object, not a callable
    assert "does not name the module" in str(excinfo.value)
    with pytest.raises(NotAllowedError) as excinfo:
        resolve("tests.tasks", "system", fclass="os", allowed_modules=["tests"])
    assert "not a class" in str(excinfo.value)


def _nested(depth, kind=list):
    value = 1
    for _ in range(depth):
        value = [value] if kind is list else {"k": value}
    return value


@pytest.mark.parametrize(("value", "words"), [
    (_nested(1900), "nested deeper"), (_nested(50_000, dict), "nested deeper"),
    ([1, {"a": [10 ** 5000]}], "bits"), ({"ok": [object()]}, "object"),
])
def test_encode_names_what_it_cannot_carry_however_deep(value, words):
    with pytest.raises(CodecError) as excinfo:
        codec.encode(value)
    assert words in str(excinfo.value)


def test_deep_json_parameters_are_a_codec_error():
    with pytest.raises(CodecError) as excinfo:
        codec.decode_parameters(b"[" * 100_000 + b"]" * 100_000)
    assert "parameters" in str(excinfo.value)


@pytest.mark.parametrize(("options", "field"), [
    ({"delay": 10 ** 5000}, "delay"), ({"timeout": -(10 ** 5000)}, "timeout"), ({"delay": math.inf}, "delay"),
    ({"max_retry": 10 ** 5000}, "max_retry"), ({"queue_index": 10 ** 5000}, "queue_index"),
    ({"result_ttl": 10 ** 5000}, "result_ttl"), ({"retry_delay": _nested(1900)}, "retry_delay"),
    ({"task_id": _nested(1900)}, "task_id"), ({"task_id": 10 ** 5000}, "task_id"), ({10 ** 5000: 1}, "option"),
    ({"args": [_nested(1900)]}, "args"), ({"kwargs": {"k": 10 ** 5000}}, "args"),
    ({"priority": 10 ** 5000}, "priority"), ({"priority": _nested(1900)}, "priority"),
    ({"expires": 10 ** 5000}, "expires"), ({"expires": -(10 ** 5000)}, "expires"), ({"expires": math.nan}, "expires"),
])
def test_check_push_names_the_field_of_a_huge_or_deep_value(options, field):
    with pytest.raises(InvalidTaskError) as excinfo:
        check_push({"func": "f", "module": "m", **options}, QUEUES, LIMITS)
    assert field in str(excinfo.value) and len(str(excinfo.value)) < 300, str(excinfo.value)


# -- pickle is recognised by its framing, not by its ends ------------------------------------------


class _Runs:
    """Unpickling this runs ``os.system`` (never done by these tests: only walked)."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        import os

        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_real_pickles_are_recognised_and_refused_naming_the_setting(protocol, tmp_path):
    marker = tmp_path / "ran"
    data = pickle.dumps(([_Runs(f"touch {marker}")], {}), protocol=protocol)
    assert codec.is_pickle(data)
    assert not marker.exists()  # recognising it ran nothing
    with pytest.raises(CodecError) as excinfo:
        codec.decode_parameters(data, setting="worker.allow_pickle")
    assert "pickle" in str(excinfo.value) and "worker.allow_pickle" in str(excinfo.value)
    with pytest.raises(InvalidTaskError) as excinfo:
        check_push({"func": "f", "module": "m", "parameters": data}, QUEUES, LIMITS)
    assert "pickle" in str(excinfo.value) and "master.allow_pickle" in str(excinfo.value)
    assert not marker.exists()
    assert codec.decode(pickle.dumps({1, 2}, protocol=protocol), allow_pickle=True) == {1, 2}


@pytest.mark.parametrize("data", [
    b"\x80\x04junk.",  # PROTO 4 ... STOP, but no pickle in between
    b"\x80\x05K\x01..",  # a whole pickle, then one more byte
    pickle.dumps([1], protocol=4) + b"\x92\x90\x80.",  # a pickle with msgpack after it
    b"\x80\x02" + b"\x00" * 100 + b".",
    b"\x80\x03X\xff\xff\xff\xff.",  # an argument longer than the data
])
def test_data_that_only_looks_like_a_pickle_at_its_ends_is_what_it_is(data):
    assert not codec.is_pickle(data)
    for allow_pickle in (False, True):
        with pytest.raises(CodecError) as excinfo:
            codec.decode(data, allow_pickle=allow_pickle)
        assert "not valid msgpack" in str(excinfo.value), str(excinfo.value)
    with pytest.raises(CodecError) as excinfo:
        check_push({"func": "f", "module": "m", "parameters": data}, QUEUES, LIMITS, allow_pickle=True)
    assert "not valid msgpack" in str(excinfo.value), str(excinfo.value)


def test_pickles_of_protocol_0_and_1_are_never_unpickled(tmp_path):
    marker = tmp_path / "ran"
    for protocol in (0, 1):
        data = pickle.dumps(_Runs(f"touch {marker}"), protocol=protocol)
        assert not codec.is_pickle(data)
        with pytest.raises(CodecError):
            codec.decode(data, allow_pickle=True)
    assert not marker.exists()
