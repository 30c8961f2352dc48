"""The rate and concurrency limits of one queue_index in Redis: :class:`LimitStore`, a part
of :class:`~ppq.store.Store`. The lease script enforces them (``lua/limits.lua``).

    limits           hash  'rate:<module.func>' -> '10/s' | '20/m' | '1000/h',
                           'conc:<module.func>' -> N
    buckets          hash  module.func -> '<tokens>:<time>' (its token bucket when last used)
    slots            hash  module.func -> its tasks running under its concurrency limit
                           (field 'slot' of such a task's record names the function)
    throttled        zset  module.func -> when it may start a task next ('+inf': when a slot frees)
    queue:f:<func>   list  ready ids held back by their function's limits, in queue order
"""

from __future__ import annotations

import functools
from typing import Any

from .link import storage_errors
from .records import text
from .scripts import Script

# Most limited functions limits() reads.
LIMITS_LISTED = 1000


class LimitStore:
    """Limit storage; mixed into Store, whose ``redis``, ``_link`` and ``prefix`` it uses."""

    redis: Any
    _link: Any
    _script: Any
    prefix: str

    @functools.cached_property
    def _limit(self) -> Script:
        return self._script("limit")

    @functools.cached_property
    def _held(self) -> Script:
        return self._script("held")

    @storage_errors
    def wake_held(self, since: float = 0.0) -> tuple[int, float | None, float]:
        """Wake long-polls for the functions held back by their rate limit whose next token came
        due after ``since`` (the ``now`` of the previous call); return (how many, when the next
        is due or None, now)."""
        due, nxt, now = self._held([self.prefix, since])
        return int(due), (float(nxt) if nxt else None), float(now)

    @storage_errors
    def set_limit(self, function: str, kind: str, value: str | int) -> bool:
        """Set ``function``'s rate (``kind`` 'rate', a checked spec) or concurrency (``kind``
        'conc', a checked N) limit; returns whether it changed."""
        return bool(self._limit([self.prefix, function, kind, str(value)]))

    @storage_errors
    def remove_limit(self, function: str, kind: str) -> bool:
        """Remove one limit of ``function`` (``kind`` 'rate' or 'conc'); its held tasks go back
        to the queue once it has none. Returns whether it changed."""
        return bool(self._limit([self.prefix, function, kind, ""]))

    @storage_errors
    def limits(self) -> list[dict[str, Any]]:
        """Each limited function (and each holding tasks back) with ``rate``, ``concurrency``
        (None where unset), ``tokens`` (in its bucket now, None without a rate), ``running``
        (counted against its concurrency limit) and ``waiting`` (held back), by name."""
        p = self.prefix
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(p + "limits")
        pipe.hgetall(p + "slots")
        pipe.hgetall(p + "buckets")
        pipe.zrange(p + "throttled", 0, LIMITS_LISTED - 1)
        pipe.time()
        raw, slots, buckets, held, now = pipe.execute()
        clock = now[0] + now[1] / 1e6
        out: dict[str, dict[str, Any]] = {}

        def entry(fn: str) -> dict[str, Any]:
            return out.setdefault(fn, {"function": fn, "rate": None, "concurrency": None, "tokens": None,
                                       "running": 0, "waiting": 0})

        for field, value in raw.items():
            kind, _, fn = text(field).partition(":")
            if kind == "rate":
                entry(fn)["rate"] = text(value)
            elif kind == "conc":
                entry(fn)["concurrency"] = int(value)
        for fn in held:
            entry(text(fn))
        names = sorted(out)[:LIMITS_LISTED]
        pipe = self.redis.pipeline(transaction=False)
        for fn in names:
            pipe.llen(p + "queue:f:" + fn)
        for fn, waiting in zip(names, pipe.execute(), strict=True):
            e = out[fn]
            e["waiting"] = int(waiting)
            e["running"] = int(slots.get(fn.encode(), 0))
            if e["rate"]:
                count, unit = e["rate"].split("/")
                rate = int(count) / {"s": 1, "m": 60, "h": 3600}[unit]
                cap = max(1.0, rate)
                tokens, at = cap, clock
                state = buckets.get(fn.encode())
                if state:
                    t, _, a = text(state).partition(":")
                    tokens, at = float(t), float(a)
                e["tokens"] = round(min(cap, tokens + max(0.0, clock - at) * rate), 2)
        return [out[fn] for fn in names]

    @storage_errors
    def held_back(self, task_id: str, function: str) -> bool:
        """Whether ``task_id`` waits in ``function``'s list of tasks held back by its limits."""
        return self.redis.lpos(self.prefix + "queue:f:" + function, task_id) is not None

    @storage_errors
    def limit_of(self, function: str) -> tuple[str | None, int | None, int]:
        """``function``'s rate spec and concurrency limit (None where unset) and its running count."""
        rate, conc = self.redis.hmget(self.prefix + "limits", "rate:" + function, "conc:" + function)
        running = self.redis.hget(self.prefix + "slots", function)
        return (text(rate) if rate else None), (int(conc) if conc else None), int(running or 0)
