"""Workflows: steps that run in an order, from one push.

- ``chain(a, b, c)`` (or ``a | b | c``) runs each step after the previous one succeeded and
  passes its result as the first positional argument of the next (unless that step is
  immutable); its result is its last step's.
- ``group(a, b, c)`` runs its members at once; its result is the list of theirs, in the
  order given.
- ``chord(group(...), callback)`` (or ``group(...) | callback``) calls the callback with the
  group's list once every member succeeded; with ``on_error="run"`` it runs anyway, each
  failed member's place holding ``{"error": ..., "task_id": ...}``.

A step is a :class:`Signature`: ``add.s(1, 2)`` of a ``@task`` function,
``add.si(1, 2)`` (immutable: it ignores the previous result), ``sig("mytasks.add", 1, 2)``,
or a ``(target, args)`` / ``(target, args, kwargs)`` tuple. ``Client.push(workflow)``
sends :meth:`Workflow.to_data`, the plain data the master's ``push_workflow`` takes, and
returns the workflow's id. The master checks and stores it (``ppq/master/flows.py``); the
scripts in ``ppq/store/lua/`` run it.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable
from typing import Any

from .errors import InvalidTaskError
from .task import PUSH_FIELDS

# Deepest nesting of chains, groups and chords (a leaf step adds no level).
MAX_DEPTH = 8
# What a chord does when a member fails: 'fail' (the callback never runs, the chord is dead)
# or 'run' (the callback runs with the failed members' errors in their places).
ON_ERROR = ("fail", "run")
# Push options a step may not carry: a workflow lives in one queue_index and its ids are made
# by the master.
STEP_REFUSED = ("queue_index", "task_id", "key", "delay")


def target_name(target: str | Callable[..., Any]) -> tuple[str, str, str | None]:
    """(module, func, fclass) of a dotted name or a function object."""
    if callable(target) and not isinstance(target, str):
        fn = inspect.unwrap(target)
        qual = fn.__qualname__.split(".")
        if "<locals>" in qual or "<lambda>" in fn.__qualname__:
            raise InvalidTaskError(f"{fn.__qualname__} is not importable by a worker: use a module-level function")
        module = fn.__module__
        if len(qual) == 2:
            return module, qual[1], qual[0]
        return module, qual[-1], None
    if not isinstance(target, str) or "." not in target:
        raise InvalidTaskError(f"target must be 'module.func' or a function, got {target!r:.80}")
    module, _, func = target.rpartition(".")
    return module, func, None


class Node:
    """A piece of a workflow: a step, a chain, a group or a chord."""

    depth = 0

    def __or__(self, other: Any) -> Chain:
        return Chain(self, other)

    def __ror__(self, other: Any) -> Chain:
        return Chain(other, self)

    def to_data(self) -> dict[str, Any]:
        """The plain data (dicts, lists, numbers, strings) the master's ``push_workflow`` takes."""
        raise NotImplementedError


class Signature(Node):
    """One step: a function and its arguments, with push options (priority, max_retry, timeout,
    expires, result_ttl, retry_delay...)."""

    def __init__(self, target: str | Callable[..., Any], args: Iterable[Any] = (),
                 kwargs: dict[str, Any] | None = None, immutable: bool = False, **options: Any) -> None:
        unknown = sorted(set(options) - set(PUSH_FIELDS))
        if unknown:
            raise ValueError(f"{unknown[0]!r} is not a push option (a function's keyword arguments go in kwargs=)")
        refused = sorted(set(options) & set(STEP_REFUSED))
        if refused:
            raise ValueError(f"{refused[0]} is not an option of a workflow step (a workflow lives in one "
                             f"queue_index, given to push, and the master makes its ids)")
        self.module, self.func, self.fclass = target_name(target)
        self.args = list(args)
        self.kwargs = dict(kwargs or {})
        self.immutable = bool(immutable)
        self.options = options

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"func": self.func, "module": self.module, "args": self.args, "kwargs": self.kwargs}
        if self.fclass:
            data["fclass"] = self.fclass
        data.update(self.options)
        if self.immutable:
            data["immutable"] = True
        return data

    def __repr__(self) -> str:
        return f"{'sig' if not self.immutable else 'sig(immutable)'}({self.module}.{self.func}, {self.args!r})"


def sig(target: str | Callable[..., Any], *args: Any, immutable: bool = False,
        kwargs: dict[str, Any] | None = None, **options: Any) -> Signature:
    """A step calling ``target(*args, **kwargs)``; ``options`` are push options."""
    return Signature(target, args, kwargs, immutable, **options)


def step_of(step: Any) -> Node:
    """A node from what a user gives as a step: a node, or a ``(target, args[, kwargs])`` tuple."""
    if isinstance(step, Node):
        return step
    if isinstance(step, tuple) and len(step) in (2, 3):
        return Signature(step[0], step[1], step[2] if len(step) == 3 else None)
    raise TypeError(f"a workflow step must be a signature (task.s(...), ppq.sig(...)), a chain, group or "
                    f"chord, or a (target, args[, kwargs]) tuple; got {type(step).__name__}")


def _deeper(kind: str, steps: list[Node]) -> int:
    depth = 1 + max((s.depth for s in steps), default=0)
    if depth > MAX_DEPTH:
        raise ValueError(f"{kind} nests workflows {depth} deep, more than the limit of {MAX_DEPTH}")
    return depth


def _steps(kind: str, steps: tuple[Any, ...]) -> list[Node]:
    if len(steps) == 1 and isinstance(steps[0], (list, Iterable)) and not isinstance(steps[0], (Node, tuple, str)):
        steps = tuple(steps[0])
    if not steps:
        raise ValueError(f"a {kind} needs at least one step")
    return [step_of(s) for s in steps]


class Chain(Node):
    """Steps run one after the other, each result passed to the next."""

    steps: list[Node]

    def __init__(self, *steps: Any) -> None:
        flat: list[Node] = []
        for step in _steps("chain", steps):
            # a | b | c is one chain of three, not a chain of a chain.
            flat.extend(step.steps if isinstance(step, Chain) else [step])
        self.steps = flat
        self.depth = _deeper("chain", flat)

    def to_data(self) -> dict[str, Any]:
        return {"chain": [s.to_data() for s in self.steps]}


class Group(Node):
    """Members run at once; the result is the list of theirs, in order."""

    steps: list[Node]

    def __init__(self, *steps: Any) -> None:
        self.steps = _steps("group", steps)
        self.depth = _deeper("group", self.steps)

    def __or__(self, other: Any) -> Chain | Chord:  # type: ignore[override]
        if isinstance(other, (Signature, tuple)):
            return Chord(self, other)
        return Chain(self, other)

    def to_data(self) -> dict[str, Any]:
        return {"group": [s.to_data() for s in self.steps]}


class Chord(Node):
    """A group, then a callback given the group's list of results."""

    def __init__(self, header: Any, callback: Any, on_error: str = "fail") -> None:
        self.header = header if isinstance(header, Group) else Group(*_steps("chord", (header,)))
        self.callback = step_of(callback)
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {', '.join(ON_ERROR)}, got {on_error!r}")
        self.on_error = on_error
        self.depth = _deeper("chord", [self.header, self.callback])

    def to_data(self) -> dict[str, Any]:
        data: dict[str, Any] = {"chord": self.header.to_data(), "callback": self.callback.to_data()}
        if self.on_error != "fail":
            data["on_error"] = self.on_error
        return data


def chain(*steps: Any) -> Chain:
    """``chain(a, b, c)``: a, then b(result of a), then c(result of b)."""
    return Chain(*steps)


def group(*steps: Any) -> Group:
    """``group(a, b, c)`` or ``group([a, b, c])``: all at once, results listed in order."""
    return Group(*steps)


def chord(header: Any, callback: Any, on_error: str = "fail") -> Chord:
    """``chord(group(a, b), cb)``: cb([result of a, result of b]) once both succeeded."""
    return Chord(header, callback, on_error)
