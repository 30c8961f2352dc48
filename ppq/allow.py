"""The allowlist: which modules a worker may import, and which callables it may run.

A task names its target by dotted module, function and optional class. A worker
imports the module only if ``allowed_modules`` names it (or a package holding it),
and runs the object found only if it was defined in an allowed module, so a name an
allowed module merely imported (``from os import system``) is refused. The same
names, bounded by :func:`allow_list`, are what a worker sends its masters so that
they lease it only tasks it may run.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
import types
from collections.abc import Callable, Iterable
from typing import Any

from .errors import NotAllowedError

# Most targets whose checks resolve() remembers.
_MAX_CHECKED_TARGETS = 10000


# Most module names a worker's allow list, as sent to masters for routing, holds, and most
# characters in them together.
MAX_ALLOW_NAMES = 64
MAX_ALLOW_CHARS = 1000
ALLOW_NAME = re.compile(r"\*|[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def allow_list(allowed_modules: Iterable[str]) -> list[str]:
    """What a worker with ``allowed_modules`` tells masters it runs, so that they lease it only
    tasks of those modules: the names a task's module can match, or ``['*']`` (any: the worker
    then refuses what it may not run itself) when there are more than the bounds allow."""
    names = sorted({n for n in allowed_modules if isinstance(n, str) and ALLOW_NAME.fullmatch(n)})
    if "*" in names or len(names) > MAX_ALLOW_NAMES or sum(map(len, names)) > MAX_ALLOW_CHARS:
        return ["*"]
    return names


def module_allowed(module: str, allowed: Iterable[str]) -> bool:
    """True if ``module`` is one of ``allowed`` or inside one of them, by whole segments."""
    for prefix in allowed:
        if prefix == "*" or module == prefix or module.startswith(prefix + "."):
            return True
    return False


def path_allowed(path: str, allowed: Iterable[str]) -> bool:
    import os.path

    real = os.path.realpath(path)
    for prefix in allowed:
        base = os.path.realpath(prefix)
        if real == base or real.startswith(base.rstrip(os.sep) + os.sep):
            return True
    return False


# What resolve checked, (module, func, fclass, allowed_modules) -> the objects it found: while the
# module still holds the same objects, the checks are not repeated.
_resolved: dict[tuple[Any, ...], tuple[Any, ...]] = {}


def _not_allowed_name(module: str, func: str, fclass: str, allowed: tuple[str, ...]) -> str | None:
    """Why a task's names alone are refused, or None."""
    for field, name in (("func", func), ("fclass", fclass)):
        if name.startswith("_"):
            return f"{field} {name!r} starts with '_': private and special names are not task targets"
    if not module_allowed(module, allowed):
        return (f"module {module!r} is not in this worker's allowed_modules "
                f"({', '.join(allowed) or 'empty'}); add it to worker.allowed_modules")
    return None


def _defined_in(obj: Any) -> str | None:
    """The module ``obj`` was defined in, looking through wrappers (``__wrapped__``); None if it
    does not say (a builtin of a C module names that module, e.g. 'posix')."""
    try:
        inner = inspect.unwrap(obj)
        name = inner.__module__
    except Exception:  # noqa: BLE001 - no module, a cycle of wrappers, an attribute that raises
        return None
    return name if isinstance(name, str) else None


def _check_defined(what: str, obj: Any, allowed: tuple[str, ...]) -> None:
    """Refuse ``obj`` unless it was defined in an allowed module."""
    owner = _defined_in(obj)
    if owner is None:
        raise NotAllowedError(f"{what} does not name the module it was defined in, so this worker cannot "
                              f"check it against allowed_modules ({', '.join(allowed) or 'empty'})")
    if not module_allowed(owner, allowed):
        raise NotAllowedError(f"{what} was defined in module {owner!r}, which is not in this worker's "
                              f"allowed_modules ({', '.join(allowed) or 'empty'}): only functions and classes "
                              f"defined in allowed modules run")


def _class_attribute(cls: type, name: str) -> Any:
    """``name`` as the class itself holds it (a function, staticmethod...), found without running anything."""
    for klass in cls.__mro__:
        attrs = klass.__dict__
        if name in attrs:
            return attrs[name]
    raise AttributeError(f"type object {cls.__name__!r} has no attribute {name!r}")


def resolve(
    module: str,
    func: str,
    fclass: str = "",
    path: str = "",
    allowed_modules: Iterable[str] = ("*",),
    allowed_paths: Iterable[str] = (),
) -> Callable[..., Any]:
    """Import ``module`` and return the callable ``func`` (or ``fclass.func``).

    The allowlist is about what runs, not only the module named: the module
    must be allowed before it is imported, and the object found there (a
    function, a class, a method and its class) must have been defined in an
    allowed module too, so a name the module merely imported (``from os import
    system``) is refused. Decorated functions are judged by the function they
    wrap. Names starting with ``_`` are refused. Every check runs before the
    class is instantiated or anything is called; a refusal raises
    :class:`NotAllowedError`.
    """
    allowed = tuple(allowed_modules)
    key = (module, func, fclass, allowed)
    checked = _resolved.get(key)
    if checked is None:
        reason = _not_allowed_name(module, func, fclass, allowed)
        if reason is not None:
            raise NotAllowedError(reason)
    if path:
        if not path_allowed(path, allowed_paths):
            raise NotAllowedError(f"path {path!r} is not in this worker's allowed_paths")
        if path not in sys.path:
            sys.path.insert(0, path)
    target: Any = sys.modules.get(module) or importlib.import_module(module)
    if not fclass:
        target = getattr(target, func)
        if checked is None or checked[0] is not target:
            _check_defined(f"{module}.{func}", target, allowed)
            if len(_resolved) < _MAX_CHECKED_TARGETS:
                _resolved[key] = (target,)
    else:
        cls = getattr(target, fclass)
        if not isinstance(cls, type):
            raise NotAllowedError(f"fclass {module}.{fclass} is not a class")
        raw = _class_attribute(cls, func)
        if checked is None or checked[0] is not cls or checked[1] is not raw:
            _check_defined(f"class {module}.{fclass}", cls, allowed)
            inner = raw.__func__ if isinstance(raw, (staticmethod, classmethod)) else raw
            _check_defined(f"{module}.{fclass}.{func}", inner, allowed)
            if len(_resolved) < _MAX_CHECKED_TARGETS:
                _resolved[key] = (cls, raw)
        if isinstance(raw, (staticmethod, classmethod)):
            target = getattr(cls, func)
        else:
            target = getattr(cls(), func)
            if isinstance(raw, types.FunctionType) and getattr(target, "__func__", None) is not raw:
                raise NotAllowedError(f"{module}.{fclass}.{func}: the instance holds something else than the "
                                      f"method its class defines")
    if not callable(target):
        raise TypeError(f"{module}.{func} is not callable")
    return target
