"""Rate and concurrency limits per function: their checks and ``LimitClient``.

A *rate limit* (``"10/s"``, ``"20/m"``, ``"1000/h"``) is a token bucket per function
(``module.func``) in each queue_index's Redis: it refills at that rate and holds a
second's worth of tokens (at least one), so a full bucket starts a second's worth at
once. A *concurrency limit* ``N`` lets at most N tasks of the function run at once,
over every master and worker. Both are checked by the lease script for each task it
would hand out (``ppq/store/lua/limits.lua``): a task over its limit waits, still
queued, in its function's own list and is leased when its token is due or a slot frees.
It burns no attempt and no worker polls for it.

This module knows nothing of Redis or masters: ``ppq.store`` keeps the limits,
``ppq.master.limits`` serves them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .errors import ConfigError, InvalidTaskError

# Rate units and their seconds.
UNITS = {"s": 1, "m": 60, "h": 3600}
# Largest count of a rate or of a concurrency limit.
MAX_LIMIT = 1_000_000
# Limit kinds as the CLI and the master methods name them.
KINDS = ("rate", "concurrency")

# Limits declared by @task(rate_limit=..., concurrency_limit=...): function -> {kind: limit}.
# A master stores those of the modules of master.schedule_modules at start.
DECLARED: dict[str, dict[str, Any]] = {}

_FUNCTION = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
_RATE = re.compile(r"\s*(\d+)\s*/\s*([a-z]+)\s*")


def check_function(value: Any, name: str = "function") -> str:
    """A function's dotted name, ``module.func`` (InvalidTaskError naming ``name`` otherwise)."""
    if not isinstance(value, str) or len(value) > 200 or not _FUNCTION.fullmatch(value):
        raise InvalidTaskError(f"{name}: expected a dotted function name like 'module.func', got {value!r:.80}")
    return value


def check_rate(value: Any, name: str = "rate") -> str:
    """A rate spec, ``N/s``, ``N/m`` or ``N/h`` with N a whole number from 1; returned canonical
    (``"10/s"``). InvalidTaskError naming ``name`` otherwise."""
    found = _RATE.fullmatch(value) if isinstance(value, str) else None
    if not found:
        raise InvalidTaskError(f"{name}: expected a rate like '10/s', '20/m' or '1000/h', got {value!r:.80}")
    count, unit = int(found.group(1)), found.group(2)
    if unit not in UNITS:
        raise InvalidTaskError(f"{name}: unknown unit {unit!r} in {value!r:.80}: use s, m or h (per second, "
                               f"minute, hour)")
    if not 1 <= count <= MAX_LIMIT:
        raise InvalidTaskError(f"{name}: the count of {value!r:.80} must be from 1 to {MAX_LIMIT}")
    return f"{count}/{unit}"


def check_concurrency(value: Any, name: str = "concurrency") -> int:
    """A concurrency limit: a whole number from 1 (InvalidTaskError naming ``name`` otherwise)."""
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
        raise InvalidTaskError(f"{name}: expected a whole number of running tasks from 1 to {MAX_LIMIT}, "
                               f"got {value!r:.80}")
    return value


def per_second(rate: str) -> float:
    """Tokens per second of a checked rate spec."""
    count, unit = rate.split("/")
    return int(count) / UNITS[unit]


def check_config_limits(key: str, value: Any) -> dict[str, Any]:
    """The config's ``rate_limits`` or ``concurrency_limits``: a mapping function -> limit
    (ConfigError naming the key and entry otherwise)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping of module.func to a limit, got {type(value).__name__}")
    out: dict[str, Any] = {}
    for fn, limit in value.items():
        try:
            check_function(fn, f"{key}")
            out[fn] = check_rate(limit, f"{key}.{fn}") if key == "rate_limits" else \
                check_concurrency(limit, f"{key}.{fn}")
        except InvalidTaskError as exc:
            raise ConfigError(str(exc)) from None
    return out


def declare(function: str, rate: Any = None, concurrency: Any = None) -> None:
    """Record the limits ``@task`` declares for ``function`` (checked: InvalidTaskError naming
    rate_limit or concurrency_limit; ``function`` '': only checked)."""
    limits: dict[str, Any] = {}
    if rate is not None:
        limits["rate"] = check_rate(rate, "rate_limit")
    if concurrency is not None:
        limits["concurrency"] = check_concurrency(concurrency, "concurrency_limit")
    if limits and function:
        DECLARED[function] = limits


class LimitClient:
    """The limit methods of :class:`~ppq.client.Client` (a base class of it), over its ``call``."""

    call: Any

    def limits(self) -> dict[int, list[dict[str, Any]]]:
        """Per queue_index, one dict per limited function: ``function``, ``rate`` (or None),
        ``concurrency`` (or None), ``tokens`` (now), ``running`` (of those it counts) and
        ``waiting`` (tasks held back by its limits)."""
        return {int(k): list(v) for k, v in self.call("limit_list").items()}

    def set_limit(self, function: str, rate: str | None = None, concurrency: int | None = None,
                  queue_index: int | None = None) -> list[int]:
        """Set ``function``'s rate limit (``"10/s"``) and/or concurrency limit on every queue_index
        (or one); returns the queue_indexes where something changed."""
        return list(self.call("limit_set", function, rate, concurrency, queue_index))

    def remove_limit(self, function: str, kind: str | None = None, queue_index: int | None = None) -> list[int]:
        """Remove ``function``'s ``kind`` ("rate", "concurrency"; None: both) of limit; its
        waiting tasks are leased as any others. Returns the queue_indexes where it changed."""
        return list(self.call("limit_remove", function, kind, queue_index))
