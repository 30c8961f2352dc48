"""The checks on what callers send a master that are not a task's fields (those are in
ppq.task): the worker_info a worker sends with every call, bounded numbers, results, and
a push_tasks batch as a whole, worker ids. Each raises InvalidTaskError (or CodecError) naming the field.
"""

from __future__ import annotations

import importlib
import math
import operator
import os
import re
import sys
from collections.abc import Iterable, Mapping
from typing import Any

import msgpack

from .. import codec
from ..config import LimitsConfig
from ..errors import CodecError, ConfigError, InvalidTaskError
from ..store import ANY_MODULE, Store
from ..task import (
    ALLOW_NAME,
    MAX_ALLOW_CHARS,
    MAX_ALLOW_NAMES,
    TaskSpec,
    check_number,
    check_pushes,
    check_task_id,
    module_allowed,
    show,
)

# Longest wait of get_task(s) and wait_task(s), in seconds: each holds a server thread.
MAX_WAIT = 30.0
# Longest long-poll of report (a worker agent's), in seconds: it waits without a thread.
MAX_POLL = 300.0
# The worker_info fields a master keeps (what ppq's worker agent sends and `ppq status` /
# `ppq workers` read): text fields with their longest length, and numbers.
WORKER_TEXT_FIELDS = {"host": 255, "pool": 32, "control_uri": 300}
WORKER_NUMBER_FIELDS = ("pid", "queue_index", "concurrency", "started", "done", "failed", "heartbeat_interval")
# Most running task ids kept from one worker_info.
MAX_RUNNING_LISTED = 100
# Allow lists already checked: tuple of names -> the spec lease.lua takes.
_allow_specs: dict[tuple[Any, ...], str] = {}
_MAX_ALLOW_SPECS = 1000
# The body and the key of a TaskSpec; where a push_tasks error names a task's position.
_BODY, _KEY = operator.itemgetter(4), operator.itemgetter(2)
_POSITION = re.compile(r"^tasks\[(\d+)\]")


def worker_id_of(worker_info: Any) -> str:
    """The id of a worker from the ``worker_info`` it sends with every call."""
    if isinstance(worker_info, Mapping):
        wid = worker_info.get("id")
        if wid is None:
            host, pid = worker_info.get("host", "?"), worker_info.get("pid", "?")
            if not (_plain_part(host) and _plain_part(pid)):
                raise InvalidTaskError("worker_info: host and pid must be strings or numbers")
            wid = f"{host}:{pid}"
    elif isinstance(worker_info, (list, tuple)):
        if not all(_plain_part(x) for x in worker_info):
            raise InvalidTaskError("worker_info as a list must hold strings and numbers")
        wid = ":".join(str(x) for x in worker_info)
    elif isinstance(worker_info, (str, int)) and not isinstance(worker_info, bool) and _plain_part(worker_info):
        wid = str(worker_info)
    else:
        raise InvalidTaskError(f"worker_info must be a dict or a string, got {type(worker_info).__name__}")
    if not isinstance(wid, str) or not wid or len(wid) > 200 or "\x00" in wid:
        raise InvalidTaskError("worker_info: id must be a non-empty string of at most 200 characters")
    return wid


def _plain_part(value: Any) -> bool:
    """True for a value that may make up a worker id: a string, or a number str() can print."""
    return isinstance(value, (str, float)) or (isinstance(value, int) and value.bit_length() <= 64)


def allow_of(worker_info: Any) -> str:
    """The modules a worker runs, from ``worker_info["allow"]`` (a list of dotted module names or
    ``'*'``), as lease.lua takes them: ``'*'`` for any (also when the worker does not say: a
    plain client or an older worker), else the names, sorted, joined by ``','`` (``''``: none)."""
    names = worker_info.get("allow") if isinstance(worker_info, Mapping) else None
    if names is None:
        return ANY_MODULE
    if (names.__class__ is list or names.__class__ is tuple) and len(names) <= MAX_ALLOW_NAMES:
        try:
            return _allow_specs[tuple(names)]
        except (KeyError, TypeError):
            pass
    if (not isinstance(names, (list, tuple)) or len(names) > MAX_ALLOW_NAMES
            or not all(isinstance(n, str) for n in names) or sum(map(len, names)) > MAX_ALLOW_CHARS
            or not all(ALLOW_NAME.fullmatch(n) for n in names)):
        raise InvalidTaskError(f"worker_info: allow must be a list of at most {MAX_ALLOW_NAMES} dotted module names "
                               f"(or '*'), {MAX_ALLOW_CHARS} characters in all, got {show(names)}")
    spec = ANY_MODULE if ANY_MODULE in names else ",".join(sorted(set(names)))
    if len(_allow_specs) < _MAX_ALLOW_SPECS:
        _allow_specs[tuple(names)] = spec
    return spec


def spec_allows(spec: str, module: str) -> bool:
    """Whether a worker with allow spec ``spec`` (see :func:`allow_of`) may run ``module``, as
    lease.lua judges it: ppq.task.module_allowed; a task without a module goes to any worker."""
    return spec == ANY_MODULE or not module or module_allowed(module, spec.split(",") if spec else ())


def worker_entry(worker_info: Any, limit: int, **extra: Any) -> dict[str, Any]:
    """What a master stores of a worker's ``worker_info``: its id, the fields ppq reads, each
    bounded, and ``extra``; the list of running task ids is cut so that the whole, encoded,
    takes at most ``limit`` bytes. Anything else the worker sent is dropped."""
    entry: dict[str, Any] = {"id": worker_id_of(worker_info)}
    source = worker_info if isinstance(worker_info, Mapping) else {}
    for name, longest in WORKER_TEXT_FIELDS.items():
        value = source.get(name)
        if isinstance(value, str):
            entry[name] = value[:longest]
    for name in WORKER_NUMBER_FIELDS:
        value = source.get(name)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and abs(value) < 2**53:
            entry[name] = value
    spec = allow_of(worker_info)
    entry["allow"] = spec.split(",") if spec else []
    entry.update(extra)
    # The running ids fill what is left of the limit: each costs its length and at most 2 bytes
    # of msgpack header; the list and its key, 12 more.
    room = limit - len(msgpack.packb(entry)) - 12
    running: list[str] = []
    listed = source.get("running")
    for tid in listed[:MAX_RUNNING_LISTED] if isinstance(listed, (list, tuple)) else ():
        if isinstance(tid, str):
            tid = tid[:64]
            room -= len(tid.encode("utf-8", "replace")) + 2
            if room < 0:
                break
            running.append(tid)
    entry["running"] = running
    return entry


def required_number(name: str, value: Any, low: float, high: float) -> float:
    """A required number within ``low``..``high`` (task.check_number without None)."""
    return check_number(name, value, low, high, allow_none=False)  # type: ignore[return-value]


def encode_result(result: Any) -> bytes:
    try:
        return codec.encode(result)
    except CodecError as exc:
        raise CodecError(f"result: {exc}") from None


def text_field(name: str, value: Any, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise InvalidTaskError(f"{name} must be a string, got {type(value).__name__}")
    return value[:limit]


def check_worker_id(worker_id: Any) -> str:
    """A worker id as ``ppq workers`` lists it (what :func:`worker_id_of` made of its worker_info)."""
    if not isinstance(worker_id, str) or not worker_id or len(worker_id) > 200 or "\x00" in worker_id:
        raise InvalidTaskError(f"worker_id must be a non-empty string of at most 200 characters, "
                               f"got {type(worker_id).__name__}")
    return worker_id


def check_ids(task_ids: Any, limit: int) -> list[str] | None:
    """The ``task_ids`` of requeue_dead / purge_dead: a non-empty list (or one id) of at most
    ``limit`` ids, or None for all."""
    if task_ids is None:
        return None
    if isinstance(task_ids, str):
        task_ids = [task_ids]
    if not isinstance(task_ids, (list, tuple)) or not task_ids or len(task_ids) > limit:
        raise InvalidTaskError("task_ids must be a non-empty list of ids, or None for all")
    return [check_task_id(t) for t in task_ids]


def check_batch(tasks: list[Any] | tuple[Any, ...], stores: Mapping[int, Store], limits: LimitsConfig,
                allow_pickle: bool) -> list[TaskSpec]:
    """check_pushes, a run of tasks at a time, refusing the batch as soon as the tasks
    together take more than ``limits.max_message`` bytes: a message can repeat one object
    many times, so its own size does not bound theirs."""
    limit = limits.max_message
    step = max(1, min(256, 4 * limit // limits.max_payload))
    specs: list[TaskSpec] = []
    total = 0
    for start in range(0, len(tasks), step):
        try:
            chunk = check_pushes(tasks[start:start + step], stores, limits, allow_pickle)
        except InvalidTaskError as exc:
            if not start:
                raise
            message = str(exc)
            where = _POSITION.match(message)
            if where:
                message = f"tasks[{start + int(where[1])}]{message[where.end():]}"
            raise type(exc)(message) from None
        total += sum(map(len, map(_BODY, chunk))) + sum(map(len, map(_KEY, chunk)))
        if total > limit:
            raise InvalidTaskError(f"tasks: these {len(tasks)} tasks take more than {limit} bytes together "
                                   f"(limits.max_message); push them in smaller batches")
        specs += chunk
    return specs


def import_declaring_modules(modules: Iterable[str]) -> None:
    """Import ``master.schedule_modules``, whose ``@periodic`` and ``@task(rate_limit=...)``
    declarations a master stores, from where the master runs (as ``ppq worker`` imports
    tasks); ConfigError naming the module that does not import."""
    modules = list(modules)
    if modules and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # noqa: BLE001 - any import failure is a configuration error
            raise ConfigError(f"master.schedule_modules: cannot import {module!r}: "
                              f"{type(exc).__name__}: {exc}") from None
