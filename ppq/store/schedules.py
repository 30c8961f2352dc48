"""The periodic schedules of one queue_index in Redis: :class:`ScheduleStore`, a part of
:class:`~ppq.store.Store`.

    s:<name>             hash  def (msgpack of the schedule's plain form), next (its next tick,
                               ms), paused ('1'/'0'), source ('config' or 'live'), created,
                               last_run (ms), last_id, skipped (the last tick skipped as missed)
    schedules:names      set   every schedule's name
    schedules            zset  names of the unpaused schedules -> next tick (ms)
    schedules:pending    zset  ids of the tasks claimed and not yet known pushed -> claimed at (s)

A tick is claimed by ``schedule_claim.lua`` (a compare-and-set of ``next``), then its
task pushed under an id derived from (schedule, tick), then :meth:`schedule_done`
takes the id off ``schedules:pending``; a master that finds an id left there
(its claimer died in between) pushes it again, which stores nothing twice.
"""

from __future__ import annotations

import functools
from typing import Any

import msgpack

from .link import storage_errors
from .records import text
from .scripts import Script


class ScheduleStore:
    """Schedule storage; mixed into Store, whose ``redis``, ``_link`` and ``prefix`` it uses."""

    redis: Any
    _link: Any
    _script: Any
    prefix: str
    queue_index: int
    safe_url: str

    @functools.cached_property
    def _schedule_save(self) -> Script:
        return self._script("schedule_save")

    @functools.cached_property
    def _schedule_claim(self) -> Script:
        return self._script("schedule_claim")

    @functools.cached_property
    def _schedule_change(self) -> Script:
        return self._script("schedule_change")

    @storage_errors
    def schedule_save(self, definition: dict[str, Any], next_tick: int, mode: str, source: str) -> int:
        """Store a schedule (``mode`` 'add' or 'put', see schedule_save.lua); return what changed."""
        packed = msgpack.packb(definition, use_bin_type=True)
        return int(self._schedule_save([self.prefix, definition["name"], packed, next_tick, mode, source]))

    @storage_errors
    def schedule_claim(self, name: str, tick: int, next_tick: int, fire: int | None, task_id: str) -> bool:
        """Claim due tick ``tick`` of ``name`` and move it on to ``next_tick``; True for the one caller
        that did. ``fire`` None: the tick is skipped, no task is pushed."""
        return bool(self._schedule_claim([self.prefix, name, tick, next_tick, "" if fire is None else fire,
                                          task_id if fire is not None else ""]))

    @storage_errors
    def schedule_done(self, task_id: str) -> None:
        """The task of a claimed tick is pushed: take it off the pending ones."""
        self.redis.zrem(self.prefix + "schedules:pending", task_id)

    @storage_errors
    def schedule_change(self, name: str, op: str, value: Any = "", at: int = 0) -> int | None:
        """Pause, resume (``value``: the next tick), remove, or record a run-now ('ran', ``value`` the
        task id); 1 if it changed, 0 if it was as asked, None if there is no such schedule."""
        changed = int(self._schedule_change([self.prefix, name, op, value, at]))
        return None if changed < 0 else changed

    @storage_errors
    def schedules_due(self, limit: int = 100, pending_after: float = 2.0
                      ) -> tuple[int, list[str], list[str], int | None]:
        """(now in ms by the server's clock, the names due, the pending task ids older than
        ``pending_after`` seconds, the next tick of all, None if there is none)."""
        seconds, micros = self.redis.time()
        now = int(seconds) * 1000 + int(micros) // 1000
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrangebyscore(self.prefix + "schedules", "-inf", now, start=0, num=limit)
        pipe.zrangebyscore(self.prefix + "schedules:pending", "-inf", now / 1000 - pending_after, start=0, num=limit)
        pipe.zrangebyscore(self.prefix + "schedules", f"({now}", "+inf", start=0, num=1, withscores=True)
        due, pending, following = pipe.execute()
        return now, [text(n) for n in due], [text(i) for i in pending], (int(following[0][1]) if following else None)

    @storage_errors
    def schedule(self, name: str) -> dict[str, Any] | None:
        """One stored schedule: its plain form with its state (next_tick in ms; next_run (None while
        paused), last_run, skipped, created in seconds; last_id, paused, source), None if there is none."""
        return _decoded(self.redis.hgetall(self.prefix + "s:" + name))

    @storage_errors
    def schedule_summary(self) -> dict[str, Any]:
        """``{"count", "active", "next_run"}``: how many schedules this queue_index has, how many
        are not paused, and when the soonest of those fires (unix seconds; None without one)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.scard(self.prefix + "schedules:names")
        pipe.zcard(self.prefix + "schedules")
        pipe.zrange(self.prefix + "schedules", 0, 0, withscores=True)
        count, active, first = pipe.execute()
        return {"count": int(count), "active": int(active), "next_run": first[0][1] / 1000 if first else None}

    @storage_errors
    def schedules(self) -> list[dict[str, Any]]:
        """Every stored schedule of this queue_index, as :meth:`schedule` gives them, by name."""
        names = sorted(text(n) for n in self.redis.smembers(self.prefix + "schedules:names"))
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.hgetall(self.prefix + "s:" + name)
        found = [_decoded(h) for h in pipe.execute()] if names else []
        return [s for s in found if s is not None]


def _decoded(fields: dict[bytes, bytes]) -> dict[str, Any] | None:
    if not fields or b"def" not in fields:
        return None
    out: dict[str, Any] = msgpack.unpackb(fields[b"def"], raw=False)

    def seconds(key: bytes) -> float | None:
        value = fields.get(key)
        return int(value) / 1000 if value else None

    out["next_tick"] = int(fields[b"next"]) if fields.get(b"next") else None
    paused = fields.get(b"paused") == b"1"
    out.update(next_run=None if paused else seconds(b"next"), last_run=seconds(b"last_run"),
               skipped=seconds(b"skipped"), last_id=text(fields.get(b"last_id", b"")) or None, paused=paused,
               source=text(fields.get(b"source", b"")), created=float(fields.get(b"created", 0) or 0))
    return out
