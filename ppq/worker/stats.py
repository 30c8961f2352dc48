"""The agent's figures: tasks run per function, as ``get_worker_stats`` and /metrics show them."""

from __future__ import annotations

import collections
import logging
import math
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("ppq.worker")

# Labels of tasks in the agent's figures (get_worker_stats, metrics): a task refused before it ran
# (not allowed, its module or function not importable) counts under REFUSED, whatever it named; past
# MAX_FUNC_LABELS distinct functions, new ones count under OTHER. Each label costs about 3.5 KB of
# /metrics text, so the figures stay small whatever callers push.
REFUSED = "(refused)"
OTHER = "(other)"
MAX_FUNC_LABELS = 200


def task_name(task: dict[str, Any]) -> str:
    """``module.func`` (``module.Class.func``) of a leased task."""
    return f"{task['module']}.{task['fclass'] + '.' if task.get('fclass') else ''}{task['func']}"


# Run times are counted in a log-histogram per function: STEPS buckets per power of two (each about
# 12% to 25% wide), from 2**MIN_EXP seconds (about 8 us; shorter counts in the first bucket) to
# 2**MAX_EXP (about 36 h; longer counts in the last). Its list of ints is made once per function:
# counting a task is a frexp and an increment, and the whole table stays MAX_FUNC_LABELS x BUCKETS.
STEPS = 4
MIN_EXP = -16
MAX_EXP = 17
BUCKETS = (MAX_EXP - MIN_EXP) * STEPS


_frexp = math.frexp
# bucket_of's offset: seconds = m * 2**e (0.5 <= m < 1) falls in (e - 1 - MIN_EXP) * STEPS + int((2m - 1) * STEPS).
_OFFSET = -STEPS * (1 + MIN_EXP) - STEPS


def bucket_of(seconds: float) -> int:
    """The histogram bucket of a run time."""
    if not seconds > 0.0:
        return 0
    mantissa, exponent = _frexp(seconds)
    index = exponent * STEPS + int(mantissa * (2 * STEPS)) + _OFFSET
    return 0 if index < 0 else BUCKETS - 1 if index >= BUCKETS else index


def bucket_top(index: int) -> float:
    """The longest run time bucket ``index`` holds (seconds)."""
    exponent, step = divmod(index + 1, STEPS)
    return math.ldexp(1.0 + step / STEPS, exponent + MIN_EXP)


@dataclass
class FuncStats:
    count: int = 0
    ok: int = 0
    failed: int = 0
    total_time: float = 0.0
    # Tasks per run-time bucket (bucket_of); made with the function's entry, never per task.
    histogram: list[int] = field(default_factory=lambda: [0] * BUCKETS)

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total_time += seconds
        index = 0
        if seconds > 0.0:  # bucket_of, inlined: this runs once per task
            mantissa, exponent = _frexp(seconds)
            index = exponent * STEPS + int(mantissa * (2 * STEPS)) + _OFFSET
            index = 0 if index < 0 else BUCKETS - 1 if index >= BUCKETS else index
        self.histogram[index] += 1

    def quantile(self, q: float) -> float:
        """The run time that a share ``q`` of the counted tasks took at most (the top of its
        bucket: at most 25% over); 0.0 before any task."""
        if not self.count:
            return 0.0
        rank = math.ceil(q * self.count)
        seen = 0
        for index, n in enumerate(self.histogram):
            seen += n
            if seen >= rank:
                return bucket_top(index)
        return bucket_top(BUCKETS - 1)  # pragma: no cover - the counts add up to count

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "ok": self.ok, "failed": self.failed, "total_time": self.total_time,
                "mean_time": self.total_time / self.count if self.count else 0.0,
                "p95_time": self.quantile(0.95)}


@dataclass
class Counters:
    done: int = 0
    failed: int = 0
    lost: int = 0
    per_func: dict[str, FuncStats] = field(default_factory=lambda: collections.defaultdict(FuncStats))

    def count(self, task: dict[str, Any], report: dict[str, Any], metrics: Any) -> None:
        """Count one task's outcome under its label (and in ``metrics``, if the agent serves them)."""
        name = task_name(task)
        per_func = self.per_func
        if report.pop("refused", False):
            label = REFUSED
        elif name in per_func or len(per_func) < MAX_FUNC_LABELS:
            label = name
        else:
            label = OTHER
        duration = report.get("duration", 0.0)
        if metrics is not None:
            started = report.get("started")
            wait = started - task["ready_at"] if started and task.get("ready_at") else None
            metrics.observe(label, bool(report.get("ok")), duration, wait)
        stats = per_func[label]
        stats.observe(duration)
        if report.get("ok"):
            stats.ok += 1
            self.done += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("task %s %s done in %.3fs", task["id"], name, duration)
        else:
            # Its log line comes with the master's reply: which attempt it was, and what comes next.
            stats.failed += 1
            self.failed += 1
