"""The agent's figures: tasks run per function, as ``get_worker_stats`` and /metrics show them."""

from __future__ import annotations

import collections
import logging
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


@dataclass
class FuncStats:
    count: int = 0
    ok: int = 0
    failed: int = 0
    total_time: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"count": self.count, "ok": self.ok, "failed": self.failed, "total_time": self.total_time,
                "mean_time": self.total_time / self.count if self.count else 0.0}


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
        stats.count += 1
        stats.total_time += duration
        if report.get("ok"):
            stats.ok += 1
            self.done += 1
            if log.isEnabledFor(logging.DEBUG):
                log.debug("task %s %s done in %.3fs", task["id"], name, duration)
        else:
            # Its log line comes with the master's reply: which attempt it was, and what comes next.
            stats.failed += 1
            self.failed += 1
