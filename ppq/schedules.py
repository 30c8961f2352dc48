"""Periodic schedules: their checks, their next fire times, and the ``@periodic`` decorator.

A schedule pushes one task at each *tick*: the instants a 5-field cron expression
names (in its ``timezone``, UTC by default; cronsim computes them) or the multiples
of ``every`` seconds since the epoch (so every master computes the same ticks).
Ticks are integer milliseconds since the epoch. The task of tick ``T`` of schedule
``N`` has the id ``s:N:<T in base 36>`` (:func:`task_id_of`), so pushing the same
tick twice stores one task.

A tick is *missed* when it is found more than ``MISSED_AFTER`` seconds late (every
master was down, or Redis unreachable): the schedule's ``missed`` policy then fires
it once for all the ticks missed (``run_once``) or not at all (``skip``), and the
schedule goes on from the first tick after now.

This module knows nothing of Redis or masters: ``ppq.store`` keeps schedules,
``ppq.master.schedules`` fires them.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from datetime import timezone as dt_timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .config import LimitsConfig
from .errors import ConfigError, InvalidTaskError, PPQError
from .task import PUSH_FIELDS, check_push

# Seconds late after which a tick counts as missed (see the module docstring).
MISSED_AFTER = 3.0
# What a schedule does with the ticks it missed.
MISSED_POLICIES = ("run_once", "skip")
# Timezone of a cron expression that names none.
DEFAULT_TIMEZONE = "UTC"
# Longest schedule name: its task ids, s:<name>:<tick>, stay within a task id's 64 characters.
MAX_NAME = 40
# Longest `every`, in seconds (ten years).
MAX_EVERY = 10 * 365 * 86400.0
# Most cron ticks walked over to find the last missed one.
MAX_WALK = 100_000

_NAME = re.compile(rf"[A-Za-z0-9_.-]{{1,{MAX_NAME}}}")
_TASK = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+")
# The keys of a schedule besides its push options.
_KEYS = ("name", "cron", "every", "timezone", "missed", "task", "args", "kwargs", "queue_index")
# Push options a schedule may carry (max_retry, retry_delay, timeout, result_ttl, ...): every push
# field except those the schedule sets itself.
OPTIONS = frozenset(PUSH_FIELDS) - {"func", "module", "fclass", "path", "lang", "parameters", "args", "kwargs",
                                    "queue_index", "task_id", "delay", "key"}
# The keys of a schedule's plain form (the rest of what the store returns is its state).
DEFINITION_KEYS = frozenset(_KEYS) | OPTIONS


@dataclass(frozen=True)
class Schedule:
    """One checked schedule (build it with :func:`check_schedule`)."""

    name: str
    task: str
    cron: str = ""
    every: float = 0.0
    timezone: str = DEFAULT_TIMEZONE
    missed: str = "run_once"
    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue_index: int = 0
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> str:
        """What it fires on, for people: the cron expression, or ``every 5s``."""
        if self.cron:
            return self.cron if self.timezone == DEFAULT_TIMEZONE else f"{self.cron} {self.timezone}"
        return f"every {self.every:g}s"

    def to_dict(self) -> dict[str, Any]:
        """The plain form: what config declares, ``schedule_add`` takes and Redis stores."""
        out: dict[str, Any] = {"name": self.name, "task": self.task, "timezone": self.timezone,
                               "missed": self.missed, "args": list(self.args), "kwargs": dict(self.kwargs),
                               "queue_index": self.queue_index, **self.options}
        if self.cron:
            out["cron"] = self.cron
        else:
            out["every"] = self.every
        return out

    def push_options(self, task_id: str) -> dict[str, Any]:
        """The push_task fields of its task for ``task_id``."""
        module, _, func = self.task.rpartition(".")
        return {"func": func, "module": module, "args": list(self.args), "kwargs": dict(self.kwargs),
                "queue_index": self.queue_index, "task_id": task_id, **self.options}

    def next_after(self, ms: int) -> int:
        """The first tick strictly after ``ms``."""
        if not self.cron:
            step = round(self.every * 1000)
            return (ms // step + 1) * step
        from cronsim import CronSim

        start = datetime.fromtimestamp(ms / 1000, zone(self.timezone))
        return int(next(CronSim(self.cron, start)).timestamp() * 1000)

    def last_at_or_before(self, tick: int, ms: int) -> int:
        """The last tick at or before ``ms``, ``tick`` being one at or before it."""
        if not self.cron:
            step = round(self.every * 1000)
            return max(tick, ms // step * step)
        from cronsim import CronSim

        ticks = CronSim(self.cron, datetime.fromtimestamp(tick / 1000, zone(self.timezone)))
        for _ in range(MAX_WALK):
            following = int(next(ticks).timestamp() * 1000)
            if following > ms:
                break
            tick = following
        return tick

    def plan(self, tick: int, now: int) -> tuple[int | None, int]:
        """For due tick ``tick`` at ``now`` (ms): (the tick to fire, None for none; the next tick)."""
        if now - tick <= MISSED_AFTER * 1000:
            return tick, self.next_after(tick)
        fire = self.last_at_or_before(tick, now) if self.missed == "run_once" else None
        return fire, self.next_after(now)


def zone(name: str) -> tzinfo:
    """The timezone ``name``: UTC without the tz database (slim systems may lack it), else zoneinfo's."""
    return dt_timezone.utc if name == DEFAULT_TIMEZONE else ZoneInfo(name)


def task_id_of(name: str, tick: int) -> str:
    """The id of the task schedule ``name`` pushes for ``tick``."""
    return f"s:{name}:{_base36(tick)}"


def run_now_id(name: str, now: int) -> str:
    """The id of the task ``run-now`` pushes for schedule ``name`` at ``now`` (ms)."""
    return f"s:{name}:r{_base36(now)}"


def name_of(task_id: str) -> str:
    """The schedule name in one of its task ids."""
    return task_id.split(":")[1]


def _base36(n: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        n, r = divmod(n, 36)
        out = digits[r] + out
        if not n:
            return out


def check_name(value: Any, where: str = "", error: type[PPQError] = InvalidTaskError) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise error(f"{where}name: expected 1 to {MAX_NAME} letters, digits, '_', '.' or '-', got {_show(value)}")
    return value


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, (str, int, float, bool, type(None))) else type(value).__name__
    return text if len(text) <= 80 else text[:77] + "..."


def check_schedule(data: Any, where: str = "", error: type[PPQError] = InvalidTaskError,
                   limits: LimitsConfig | None = None, queue_indexes: Any = None) -> Schedule:
    """Check one schedule's plain form; return it as a :class:`Schedule`.

    A bad value raises ``error`` naming its field after ``where`` (``schedules[1].``
    in a config file). The task's push fields are checked as a push would check
    them (against ``limits`` and, when given, the configured ``queue_indexes``).
    """
    if not isinstance(data, Mapping):
        raise error(f"{where.rstrip('.') or 'schedule'}: expected a mapping, got {_show(data)}")
    for key in data:
        if key not in _KEYS and key not in OPTIONS:
            shown = key if isinstance(key, str) and key.isidentifier() else _show(key)
            raise error(f"{where}{shown}: unknown key (expected {', '.join(_KEYS)} or a push option: "
                        f"{', '.join(sorted(OPTIONS))})")
    name = check_name(data.get("name"), where, error)
    cron, every = data.get("cron"), data.get("every")
    if (cron is None) == (every is None):
        raise error(f"{where}cron: give exactly one of cron (a 5-field cron expression) or every (seconds)")
    timezone = data.get("timezone", DEFAULT_TIMEZONE)
    if timezone is None:
        timezone = DEFAULT_TIMEZONE
    if not isinstance(timezone, str) or not timezone:
        raise error(f"{where}timezone: expected a timezone name such as 'Europe/Paris', got {_show(timezone)}")
    try:
        zone(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise error(f"{where}timezone: unknown timezone {_show(timezone)} (names come from the tz database: "
                    f"the system's, else the tzdata package)") from None
    if cron is not None:
        cron = _check_cron(cron, where, error)
        every = 0.0
    else:
        if isinstance(every, bool) or not isinstance(every, (int, float)) or not 0 < every <= MAX_EVERY:
            raise error(f"{where}every: expected a number of seconds greater than 0 (at most {MAX_EVERY:g}), "
                        f"got {_show(every)}")
        if round(every * 1000) < 1:
            raise error(f"{where}every: at least 0.001 seconds, got {_show(every)}")
        every = float(every)
        cron = ""
    missed = data.get("missed", "run_once")
    if missed not in MISSED_POLICIES:
        raise error(f"{where}missed: expected one of {', '.join(MISSED_POLICIES)}, got {_show(missed)}")
    task = data.get("task")
    if not isinstance(task, str) or not _TASK.fullmatch(task):
        raise error(f"{where}task: expected a dotted name module.func, got {_show(task)}")
    args = data.get("args", [])
    if args is None:
        args = []
    if not isinstance(args, (list, tuple)):
        raise error(f"{where}args: expected a list, got {_show(args)}")
    kwargs = data.get("kwargs", {})
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, Mapping) or not all(isinstance(k, str) for k in kwargs):
        raise error(f"{where}kwargs: expected a mapping of names to values, got {_show(kwargs)}")
    queue_index = data.get("queue_index", 0)
    if isinstance(queue_index, bool) or not isinstance(queue_index, int) or queue_index < 0:
        raise error(f"{where}queue_index: expected an integer of 0 or more, got {_show(queue_index)}")
    if queue_indexes is not None and queue_index not in queue_indexes:
        raise error(f"{where}queue_index: {queue_index} is not configured on this master "
                    f"(it serves {', '.join(map(str, sorted(queue_indexes)))})")
    options = {k: v for k, v in data.items() if k in OPTIONS}
    schedule = Schedule(name=name, task=task, cron=cron, every=every, timezone=timezone, missed=missed,
                        args=list(args), kwargs=dict(kwargs), queue_index=queue_index, options=options)
    try:
        check_push(schedule.push_options(task_id_of(name, 0)), [queue_index], limits or LimitsConfig())
    except InvalidTaskError as exc:
        message = str(exc)
        first = re.match(r"\w+", message)
        named = first.group(0) if first else ""
        if named in ("func", "module"):
            raise error(f"{where}task: {message}") from None
        if named in data or named in ("args", "kwargs"):
            raise error(f"{where}{named}: {message}") from None
        raise error(f"{where}task: {message}") from None
    return schedule


def _check_cron(cron: Any, where: str, error: type[PPQError]) -> str:
    from cronsim import CronSim, CronSimError

    if not isinstance(cron, str) or len(cron.split()) != 5:
        raise error(f"{where}cron: expected 5 fields (minute hour day-of-month month day-of-week), "
                    f"got {_show(cron)}")
    cron = " ".join(cron.split())
    try:
        CronSim(cron, datetime.now(dt_timezone.utc))
    except CronSimError as exc:
        raise error(f"{where}cron: {exc} in {cron!r}") from None
    return cron


def check_config_schedules(value: Any) -> list[dict[str, Any]]:
    """The ``schedules`` config key: a list of schedules with distinct names, each checked."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ConfigError(f"schedules: expected a list, got {_show(value)}")
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, item in enumerate(value):
        schedule = check_schedule(item, f"schedules[{i}].", ConfigError)
        if schedule.name in seen:
            raise ConfigError(f"schedules[{i}].name: {schedule.name!r} is declared twice")
        seen.add(schedule.name)
        out.append(schedule.to_dict())
    return out


# Schedules declared with @periodic in the modules imported so far: name -> plain form.
PERIODIC: dict[str, dict[str, Any]] = {}


def periodic(cron: str | None = None, *, every: float | None = None, name: str | None = None,
             timezone: str = DEFAULT_TIMEZONE, missed: str = "run_once", args: Any = (),
             kwargs: dict[str, Any] | None = None, queue_index: int = 0, **options: Any) -> Callable[[Any], Any]:
    """Declare a schedule for a module-level (``@task``) function: ``@periodic("*/5 * * * *")`` or
    ``@periodic(every=30)``. ``name`` defaults to ``module.func`` with its dots as dashes;
    ``options`` are push options (max_retry, retry_delay, timeout, result_ttl...).

    Importing the module registers the schedule in :data:`PERIODIC`; masters import the
    modules named in ``master.schedule_modules`` at start and store what they declare, as
    they do the config's ``schedules``.
    """

    def decorate(fn: Any) -> Any:
        target = inspect.unwrap(fn)
        qualname = getattr(target, "__qualname__", "")
        if not callable(target) or "." in qualname or "<" in qualname:
            raise InvalidTaskError(f"@periodic: {qualname or fn!r} is not a module-level function")
        task = f"{target.__module__}.{qualname}"
        data: dict[str, Any] = {"name": name or task.replace(".", "-")[-MAX_NAME:], "task": task,
                                "timezone": timezone, "missed": missed, "args": list(args),
                                "kwargs": dict(kwargs or {}), "queue_index": queue_index, **options}
        if cron is not None:
            data["cron"] = cron
        if every is not None:
            data["every"] = every
        schedule = check_schedule(data, f"@periodic on {task}: ")
        PERIODIC[schedule.name] = schedule.to_dict()
        return fn

    return decorate


class ScheduleClient:
    """The schedule methods of :class:`~ppq.client.Client` (a base class of it), over its ``call``."""

    call: Any

    def schedules(self, queue_index: int | None = None) -> list[dict[str, Any]]:
        """Every schedule (of ``queue_index``; None: of all) with its state: ``spec``, ``next_run``,
        ``last_run`` (unix seconds), ``last_id`` and its ``last_state``, ``paused``, ``source``."""
        return list(self.call("schedule_list", queue_index))

    def add_schedule(self, name: str, task: str | Callable[..., Any], *, cron: str | None = None,
                     every: float | None = None, args: Any = (), kwargs: dict[str, Any] | None = None,
                     queue_index: int = 0, timezone: str = DEFAULT_TIMEZONE, missed: str = "run_once",
                     **options: Any) -> dict[str, Any]:
        """Store a new schedule on the masters; it fires from its first tick after now. ``task`` is
        ``"module.func"`` or a module-level function; ``options`` are push options (max_retry,
        retry_delay, timeout, result_ttl). Returns it as :meth:`schedules` lists it."""
        if callable(task) and not isinstance(task, str):
            target = inspect.unwrap(task)
            task = f"{target.__module__}.{target.__qualname__}"
        data: dict[str, Any] = {"name": name, "task": task, "args": list(args), "kwargs": dict(kwargs or {}),
                                "queue_index": queue_index, "timezone": timezone, "missed": missed, **options}
        if cron is not None:
            data["cron"] = cron
        if every is not None:
            data["every"] = every
        return dict(self.call("schedule_add", data))

    def remove_schedule(self, name: str, queue_index: int | None = None) -> list[int]:
        """Delete schedule ``name``; returns the queue_indexes it was in (InvalidTaskError if none)."""
        return list(self.call("schedule_remove", name, queue_index))

    def pause_schedule(self, name: str, queue_index: int | None = None) -> list[int]:
        """Fire nothing of ``name`` until :meth:`resume_schedule`; returns where it changed."""
        return list(self.call("schedule_pause", name, queue_index))

    def resume_schedule(self, name: str, queue_index: int | None = None) -> list[int]:
        """Fire ``name`` again from its next tick; returns where it changed."""
        return list(self.call("schedule_resume", name, queue_index))

    def run_schedule_now(self, name: str, queue_index: int | None = None) -> str:
        """Push ``name``'s task now, besides its ticks; return the task id."""
        return str(self.call("schedule_run_now", name, queue_index))
