"""The task record: its states, the checks on every pushed field, and its body.

The allowlist (what a worker may import and run) is :mod:`ppq.allow`; its names are
re-exported here.
"""

from __future__ import annotations

import operator
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, NamedTuple

import msgpack

from . import codec
from .allow import ALLOW_NAME as ALLOW_NAME
from .allow import MAX_ALLOW_CHARS as MAX_ALLOW_CHARS
from .allow import MAX_ALLOW_NAMES as MAX_ALLOW_NAMES
from .allow import allow_list as allow_list
from .allow import module_allowed as module_allowed
from .allow import path_allowed as path_allowed
from .allow import resolve as resolve
from .config import LimitsConfig
from .errors import CodecError, InvalidTaskError

QUEUED = "queued"
DELAYED = "delayed"
RUNNING = "running"
DONE = "done"
FAILED = "failed"  # the last attempt failed; the task waits for its retry
DEAD = "dead"
CANCELLED = "cancelled"
EXPIRED = "expired"  # its expiry passed before it started: it never runs
# States a task does not leave by itself.
FINAL_STATES = (DONE, DEAD, CANCELLED, EXPIRED)

# Priorities: 0 (the default) to MAX_PRIORITY, higher leased first.
MAX_PRIORITY = 9
# An expiry above this is a unix time; at most this, seconds from the push.
EXPIRES_ABSOLUTE_ABOVE = 10**9
# An expiry given as a unix time may lie this many seconds in the past (clocks differ); the
# task then expires when a lease or the mover first meets it. Further back it is refused.
EXPIRES_PAST_SLACK = 60.0
# The latest unix time an expiry may name (the year 2286).
EXPIRES_LATEST = 10**10

# Matched whole (fullmatch): "$" would also match before a final newline.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DOTTED = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")
_TASK_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Options of push_task beyond the task's target, with nothing special to check.
PUSH_FIELDS = (
    "func", "key", "fclass", "module", "path", "lang", "parameters", "max_retry", "retry_delay",
    "queue_index", "delay", "args", "kwargs", "timeout", "result_ttl", "task_id", "priority", "expires",
)


class TaskSpec(NamedTuple):
    """A checked push: everything the store needs to write one task.

    ``body`` is the static part of the record (see :func:`encode_body`);
    ``options`` the retry options that differ from their defaults; ``module`` the
    module it runs (a push hands the task only to a waiting worker that allows it).
    """

    id: str
    queue_index: int
    key: str
    delay: float
    body: bytes
    options: tuple[tuple[str, Any], ...] = ()
    module: str = ""


# Short names of the task body's fields: the body is one msgpack map, stored as
# one field of the task's record and handed to workers as it is.
BODY_FIELDS = {"func": "f", "module": "m", "fclass": "c", "path": "p", "lang": "l", "params": "a", "timeout": "t",
               "max_retry": "r"}


# Body prefixes already built: (func, module, fclass, path, lang, timeout, max_retry) -> bytes.
_body_prefixes: dict[tuple[Any, ...], bytes] = {}


def encode_body(func: str, module: str, fclass: str, path: str, lang: str, params: bytes, timeout: float | None,
                max_retry: int) -> bytes:
    """The body: one msgpack map of 8 entries, its parameters last, so that tasks with the
    same target share the bytes before them."""
    target = (func, module, fclass, path, lang, timeout, max_retry)
    prefix = _body_prefixes.get(target)
    if prefix is None:
        fields = {"f": func, "m": module, "c": fclass, "p": path, "l": lang, "t": timeout, "r": max_retry}
        prefix = b"\x88" + b"".join(codec.pack(k) + codec.pack(v) for k, v in fields.items()) + codec.pack("a")
        if len(_body_prefixes) < _MAX_CHECKED_TARGETS:
            _body_prefixes[target] = prefix
    return prefix + codec.pack(params)


def decode_body(blob: bytes, params: str = "params", **extra: Any) -> dict[str, Any]:
    """The body's fields by their long names (the parameters under ``params``), plus ``extra``."""
    get = msgpack.unpackb(blob, raw=False).get
    return {"func": get("f"), "module": get("m"), "fclass": get("c"), "path": get("p"), "lang": get("l"),
            "timeout": get("t"), "max_retry": get("r"), params: get("a"), **extra}


_PUSH_FIELDS = frozenset(PUSH_FIELDS)
# Fields that differ from task to task in a batch; the others are checked once per run of equal values.
_PER_TASK_FIELDS = frozenset(("task_id", "args", "kwargs", "parameters"))
_NO_KWARGS = (dict, type(None))
# Targets already checked, (func, module, fclass, path, lang, name limit) -> normalised.
_checked_targets: dict[tuple[Any, ...], tuple[str, str, str, str, str]] = {}
_MAX_CHECKED_TARGETS = 10000


def _check_target(func: Any, module: Any, fclass: Any, path: Any, lang: Any,
                  limits: LimitsConfig) -> tuple[str, str, str, str, str]:
    key = (func, module, fclass, path, lang, limits.max_name_length)
    try:
        return _checked_targets[key]
    except (KeyError, TypeError):
        pass
    if module is None and isinstance(func, str) and "." in func:
        module, _, func = func.rpartition(".")
    if func is None or func == "":
        raise InvalidTaskError("func must be a non-empty function name")
    func = _str("func", func, limits.max_name_length, _IDENTIFIER, "a Python identifier")
    _public("func", func)
    if module is None or module == "":
        raise InvalidTaskError("module is required (or give func as 'module.func')")
    module = _str("module", module, limits.max_name_length, _DOTTED, "a dotted module name")
    if fclass is not None and fclass != "":
        fclass = _str("fclass", fclass, limits.max_name_length, _IDENTIFIER, "a class name")
        _public("fclass", fclass)
    if path is not None and path != "":
        path = _str("path", path, 4096)
    lang = _str("lang", "" if lang is None else lang, 32)
    checked = (func, module, fclass or "", path or "", lang)
    if len(_checked_targets) < _MAX_CHECKED_TARGETS:
        try:
            _checked_targets[key] = checked
        except TypeError:  # an unhashable value given for an empty field (lang=[]): not cached
            pass
    return checked


def show(value: Any, limit: int = 60) -> str:
    """``value`` for an error message: short, and safe for anything a caller can send (a huge
    integer has no str(), a deeply nested list no repr())."""
    if value is None or isinstance(value, (bool, float)):
        return repr(value)
    if isinstance(value, int):
        return repr(value) if value.bit_length() <= 64 else f"an integer of {value.bit_length()} bits"
    if isinstance(value, (str, bytes)):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if isinstance(value, (list, tuple, dict)):
        return f"a {type(value).__name__} of {len(value)} item{'' if len(value) == 1 else 's'}"
    return f"a {type(value).__name__}"


def _public(name: str, value: str) -> None:
    """Refuse a private or special name (``_x``, ``__class__``) as a task's target."""
    if value.startswith("_"):
        raise InvalidTaskError(f"{name} {value!r} starts with '_': private and special names are not task targets")


def new_id() -> str:
    """A fresh task id: 128 random bits as 32 hex digits (the shape of a uuid4's hex, made
    without building a UUID object, which costs four times as much)."""
    return os.urandom(16).hex()


def check_queue_index(value: Any, configured: Iterable[int]) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise InvalidTaskError(f"queue_index must be an integer, got {type(value).__name__}")
    configured = list(configured)
    if value not in configured:
        raise InvalidTaskError(
            f"queue_index {show(value)} is not configured (configured: {', '.join(map(str, sorted(configured)))})"
        )
    return value


def check_task_id(value: Any, name: str = "task_id") -> str:
    if not isinstance(value, str) or not _TASK_ID.fullmatch(value):
        raise InvalidTaskError(f"{name} must be a string of 1-64 letters, digits or _.:-, got {show(value, 80)}")
    return value


def _str(name: str, value: Any, limit: int, pattern: re.Pattern[str] | None = None, what: str = "") -> str:
    if not isinstance(value, str):
        raise InvalidTaskError(f"{name} must be a string, got {type(value).__name__}")
    if len(value) > limit:
        raise InvalidTaskError(f"{name} is longer than {limit} characters")
    if "\x00" in value:
        raise InvalidTaskError(f"{name} contains a NUL character")
    if pattern is not None and not pattern.fullmatch(value):
        raise InvalidTaskError(f"{name} {show(value, 80)} is not {what}")
    return value


def check_number(name: str, value: Any, low: float, high: float, allow_none: bool = True) -> float | None:
    """``value`` as a float within ``low``..``high`` (None stays None where allowed); else
    InvalidTaskError naming ``name``."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTaskError(f"{name} must be a number, got {type(value).__name__}")
    # Compared as they are: float() of a huge integer overflows, and NaN fails every comparison.
    if not low <= value <= high:
        raise InvalidTaskError(f"{name} must be between {low:g} and {high:g}, got {show(value)}")
    return float(value)


def _task_id(value: Any) -> str:
    """The pushed task_id, checked, or a new one."""
    if value is None:
        return new_id()
    if value.__class__ is not str or not _TASK_ID.fullmatch(value):
        check_task_id(value)
    return value


def check_push(
    options: Mapping[str, Any],
    queue_indexes: Iterable[int],
    limits: LimitsConfig,
    allow_pickle: bool = False,
) -> TaskSpec:
    """Check every field of one push; return the task to store or raise InvalidTaskError."""
    if not _PUSH_FIELDS.issuperset(options):
        unknown = sorted(show(k) for k in set(options) - _PUSH_FIELDS)
        raise InvalidTaskError(f"unknown push option {unknown[0]}")
    get = options.get
    func, module, fclass, path, lang = _check_target(get("func"), get("module"), get("fclass"), get("path"),
                                                     get("lang"), limits)
    key = get("key") or ""
    if key:
        key = _str("key", key, limits.max_key_length)
        if _CONTROL.search(key):
            raise InvalidTaskError(f"key {show(key, 80)} contains a control character (newline, tab...)")
    queue_index = get("queue_index", 0)
    if queue_index.__class__ is not int or queue_index not in queue_indexes:
        queue_index = check_queue_index(queue_index, queue_indexes)
    extra: list[tuple[str, Any]] = []
    max_retry = get("max_retry", 1)
    if max_retry is None:
        max_retry = 1
    elif max_retry != 1 or max_retry.__class__ is not int:
        if isinstance(max_retry, bool) or not isinstance(max_retry, int):
            raise InvalidTaskError(f"max_retry must be an integer, got {type(max_retry).__name__}")
        if not 0 <= max_retry <= limits.max_retry:
            raise InvalidTaskError(f"max_retry must be between 0 and {limits.max_retry}, got {show(max_retry)}")
        extra.append(("max_retry", max_retry))
    retry_delay = get("retry_delay")
    if retry_delay is not None and retry_delay is not False:
        if retry_delay is not True:
            raise InvalidTaskError(f"retry_delay must be true or false, got {show(retry_delay)}")
        extra.append(("retry_delay", 1))
    delay = get("delay")
    delay = (check_number("delay", delay, 0, limits.max_delay) or 0.0) if delay is not None else 0.0
    timeout = get("timeout")
    if timeout is not None:
        timeout = check_number("timeout", timeout, 0.001, limits.max_timeout)
    result_ttl = get("result_ttl")
    if result_ttl is not None:
        if (isinstance(result_ttl, bool) or not isinstance(result_ttl, int)
                or not 0 <= result_ttl <= limits.max_result_ttl):
            raise InvalidTaskError(f"result_ttl must be an integer of seconds from 0 to {limits.max_result_ttl}, "
                                   f"got {show(result_ttl)}")
        extra.append(("result_ttl", result_ttl))
    priority = get("priority")
    if priority is not None and (priority.__class__ is not int or priority != 0):
        extra.append(("priority", check_priority(priority)))
    expires = get("expires")
    if expires is not None:
        extra.append(("expires", check_expires(expires)))
    task_id = _task_id(get("task_id"))
    params = _parameters(get("parameters"), get("args"), get("kwargs"), limits, allow_pickle)
    body = encode_body(func, module, fclass, path, lang, params, timeout, max_retry)
    return TaskSpec(task_id, queue_index, key, delay, body, tuple(extra), module)


def check_priority(value: Any) -> int:
    """A push's ``priority``: an integer from 0 to MAX_PRIORITY; else InvalidTaskError naming it."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_PRIORITY:
        raise InvalidTaskError(f"priority must be an integer from 0 to {MAX_PRIORITY} (higher runs first), "
                               f"got {show(value)}")
    return value


def check_expires(value: Any, now: float | None = None) -> float:
    """A push's ``expires``: seconds from the push (above 0, at most 10**9) or a unix time
    (above 10**9, not more than EXPIRES_PAST_SLACK seconds past ``now``); else
    InvalidTaskError naming it. Returned as given: the store makes seconds a time by its clock."""
    what = "expires must be seconds from the push (above 0) or a unix time above 10**9"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTaskError(f"{what}, got {show(value)}")
    if not 0 < value <= EXPIRES_LATEST:  # NaN fails too
        raise InvalidTaskError(f"{what} (and before {EXPIRES_LATEST}), got {show(value)}")
    if value > EXPIRES_ABSOLUTE_ABOVE:
        now = time.time() if now is None else now
        if value < now - EXPIRES_PAST_SLACK:
            raise InvalidTaskError(f"expires {value:.0f} is a unix time {now - value:.0f}s in the past")
    return value


def _nothing(options: Any) -> None:
    return None


def check_pushes(
    tasks: Iterable[Any],
    queue_indexes: Iterable[int],
    limits: LimitsConfig,
    allow_pickle: bool = False,
) -> list[TaskSpec]:
    """:func:`check_push` for each task of a batch, naming the position of a bad one.

    Tasks usually differ only in their id and arguments: the other fields are
    checked once for each run of tasks where they are the same.
    """
    specs: list[TaskSpec] = []
    append = specs.append
    make = tuple.__new__
    pack = codec.pack
    keys: Any = None
    # The fields a run of alike tasks shares, read in one C call, and their values in the run.
    shared: Callable[[Any], Any] = _nothing
    values: Any = None
    template: TaskSpec | None = None
    prefix = b""
    for i, options in enumerate(tasks):
        if options.__class__ is not dict and not isinstance(options, Mapping):
            raise InvalidTaskError(f"tasks[{i}] must be a dict, got {type(options).__name__}")
        try:
            get = options.get
            if template is None or options.keys() != keys or shared(options) != values:
                template = check_push(options, queue_indexes, limits, allow_pickle)
                params = _parameters(get("parameters"), get("args"), get("kwargs"), limits, allow_pickle)
                prefix = template.body[:len(template.body) - len(pack(params))]
                keys = options.keys()
                names = [k for k in options if k not in _PER_TASK_FIELDS]
                shared = operator.itemgetter(*names) if names else _nothing
                values = shared(options)
                append(template)
                continue
            task_id = get("task_id")
            if task_id is None:
                task_id = new_id()
            elif task_id.__class__ is not str or not _TASK_ID.fullmatch(task_id):
                check_task_id(task_id)
            args = get("args")
            kwargs = get("kwargs")
            if args.__class__ is list and not kwargs and kwargs.__class__ in _NO_KWARGS and "parameters" not in options:
                # The usual task, a list of arguments: _parameters' checks, inlined.
                try:
                    params = pack([args, {}])
                except CodecError as exc:
                    raise CodecError(f"args/kwargs: {exc}") from None
                if len(params) > limits.max_payload:
                    raise InvalidTaskError(f"parameters are {len(params)} bytes, more than the limit of "
                                           f"{limits.max_payload}")
            else:
                params = _parameters(get("parameters"), args, kwargs, limits, allow_pickle)
            body = prefix + pack(params)
            append(make(TaskSpec, (task_id, template[1], template[2], template[3], body, template[5], template[6])))
        except InvalidTaskError as exc:
            raise type(exc)(f"tasks[{i}]: {exc}") from None
    return specs


def _parameters(parameters: Any, args: Any, kwargs: Any, limits: LimitsConfig, allow_pickle: bool) -> bytes:
    if parameters is not None:
        if args is not None or kwargs is not None:
            raise InvalidTaskError("give either parameters or args/kwargs, not both")
        data = codec.from_wire(parameters)
        if len(data) > limits.max_payload:
            raise InvalidTaskError(f"parameters are {len(data)} bytes, more than the limit of {limits.max_payload}")
        if codec.is_pickle(data):
            if not allow_pickle:
                raise InvalidTaskError("parameters are pickled, and this master does not accept pickle "
                                       "(master.allow_pickle is false)")
            return data
        args, kwargs = codec.decode_parameters(data)
    if args is None:
        args = []
    elif args.__class__ is not list:
        if not isinstance(args, (list, tuple)):
            raise InvalidTaskError(f"args must be a list, got {type(args).__name__}")
        args = list(args)
    if not kwargs:
        if kwargs is not None and kwargs.__class__ is not dict:
            raise InvalidTaskError("kwargs must be a dict with string keys")
        kwargs = {}
    elif not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise InvalidTaskError("kwargs must be a dict with string keys")
    try:
        data = codec.pack([args, kwargs])
    except CodecError as exc:
        raise CodecError(f"args/kwargs: {exc}") from None
    if len(data) > limits.max_payload:
        raise InvalidTaskError(f"parameters are {len(data)} bytes, more than the limit of {limits.max_payload}")
    return data
