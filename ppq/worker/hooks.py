"""Hooks: user functions called at points of every task's life.

``on_task_executing`` runs in the executor (process or thread) just before each
task starts and ``on_task_executed`` there just after it ends, whatever its outcome;
``on_task_finished`` and ``on_task_error`` run in the agent process when the task's
report comes back. A hook that raises is logged and does not change the task's
outcome. :func:`preload_in_executors` names modules each executor imports before
the allowed ones (a framework's set-up, where hooks may be registered too).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .. import codec
from ..errors import CodecError

log = logging.getLogger("ppq.worker")

HOOK_NAMES = ("on_task_executing", "on_task_executed", "on_task_finished", "on_task_error")
_HOOKS: dict[str, list[Callable[[dict[str, Any]], Any]]] = {name: [] for name in HOOK_NAMES}
# Modules every executor imports first, in order (see preload_in_executors).
_PRELOAD: list[str] = []


def add_hook(name: str, fn: Callable[[dict[str, Any]], Any]) -> None:
    """Call ``fn(context)`` at a point of every task's life.

    ``name`` is ``on_task_executing`` (called in the executor, just before the
    task starts), ``on_task_executed`` (in the executor, just after it ended, with
    ``context`` as before it ran), ``on_task_finished`` or ``on_task_error``
    (called in the agent process). ``context`` holds ``task_id``, ``func``, ``module``, ``fclass``,
    ``sub`` (the positional arguments), ``kw`` (the keyword arguments), ``lang``,
    and after the run ``return_value`` or ``exception``. A hook that raises is
    logged and does not change the task's outcome. Register hooks when a module
    the worker imports is imported (an autodiscovered ``tasks`` module or an
    allowed one): executors import those before their first task.
    """
    if name not in _HOOKS:
        raise ValueError(f"unknown hook {name!r}; expected one of {', '.join(HOOK_NAMES)}")
    if not callable(fn):
        raise TypeError("a hook must be callable")
    _HOOKS[name].append(fn)


def preload_in_executors(module: str) -> None:
    """Have every executor of the agents started in this process import ``module`` before the
    allowed modules and its first task: where a framework sets itself up (``django.setup()``)
    in an executor started afresh, and registers its executor hooks. It does not allow the
    module's functions as tasks. As for the allowed modules, a failure to import it is left for
    the tasks to report."""
    if not isinstance(module, str) or not all(part.isidentifier() for part in module.split(".")):
        raise ValueError(f"preload_in_executors: {module!r} is not a module name")
    if module not in _PRELOAD:
        _PRELOAD.append(module)


def executor_preload() -> list[str]:
    """The modules :func:`preload_in_executors` named, in order."""
    return list(_PRELOAD)


def has_hooks(name: str) -> bool:
    return bool(_HOOKS[name])


def call_hooks(name: str, context: dict[str, Any]) -> None:
    for fn in list(_HOOKS[name]):
        try:
            fn(context)
        except Exception:  # noqa: BLE001 - a hook never breaks a task
            log.exception("hook %s %r raised; the task is not affected", name, fn)


def task_context(task: dict[str, Any], queue_index: int, allow_pickle: bool,
                 report: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``context`` a hook gets for ``task`` (and its ``report`` once it ran)."""
    try:
        args, kwargs = codec.decode_parameters(task["parameters"], allow_pickle)
    except CodecError:
        args, kwargs = [], {}
    context: dict[str, Any] = {"task_id": task["id"], "func": task["func"], "module": task["module"],
                               "fclass": task.get("fclass", ""), "sub": args, "kw": kwargs,
                               "lang": task.get("lang", ""), "queue_index": queue_index}
    if report is not None:
        if report.get("ok"):
            try:
                context["return_value"] = codec.decode(report["result_bytes"], allow_pickle)
            except CodecError:
                context["return_value"] = None
        else:
            context["exception"] = report.get("error", "")
            context["traceback"] = report.get("traceback", "")
    return context
