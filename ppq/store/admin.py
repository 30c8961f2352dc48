"""The operator's side of a Store: the dead list, and purging or pausing a queue_index.

:class:`Admin` is a base class of :class:`~ppq.store.store.Store`, which owns the
connections and scripts declared here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from .link import storage_errors
from .records import text
from .scripts import Script

if TYPE_CHECKING:
    import redis

# Most waiting tasks one purge script deletes: one batch holds Redis for a few milliseconds.
PURGE_BATCH = 1000
# The states list_tasks reads, and the order each is listed in.
LISTED_STATES = ("queued", "delayed", "running", "dead")
# Most lists of tasks moved aside (per module, per limited function) list_tasks reads past the others.
ASIDE_LISTS = 50


class Admin:
    """The dead list, purge and pause."""

    # Set by Store.__init__.
    queue_index: int
    safe_url: str
    prefix: str
    redis: redis.Redis
    _requeue_dead: Script
    _purge_dead: Script
    _purge: Script
    _pause: Script

    if TYPE_CHECKING:
        def infos(self, task_ids: Sequence[str], max_bytes: int = 0) -> list[dict[str, Any] | None]: ...

    # -- Tasks by state, a page at a time

    @storage_errors
    def list_ids(self, state: str, limit: int, offset: int) -> tuple[list[str], int]:
        """A page of the ids in ``state`` and how many there are in it, never reading more than
        the page: ``queued`` in lease order (priority lists highest first, then the queue, then
        the first ASIDE_LISTS lists of tasks moved aside by module and by limited function, each
        oldest first), ``delayed`` soonest due first, ``running`` soonest lease end first,
        ``dead`` newest first. A list's length or a set's size is one O(1) command."""
        p = self.prefix
        if state != "queued":
            key = p + state
            pipe = self.redis.pipeline(transaction=False)
            pipe.zcard(key)
            if state == "dead":
                pipe.zrevrange(key, offset, offset + limit - 1)
            else:
                pipe.zrange(key, offset, offset + limit - 1)
            total, ids = pipe.execute()
            return [text(i) for i in ids], int(total)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zrevrange(p + "priorities", 0, -1)
        pipe.zrange(p + "parked", 0, ASIDE_LISTS - 1)
        pipe.zrange(p + "throttled", 0, ASIDE_LISTS - 1)
        priorities, modules, functions = pipe.execute()
        keys = [p + "queue:p:" + text(n) for n in priorities if text(n).isdigit()]
        keys += [p + "queue"] + [p + "queue:m:" + text(m) for m in modules]
        keys += [p + "queue:f:" + text(f) for f in functions]
        pipe = self.redis.pipeline(transaction=False)
        for key in keys:
            pipe.llen(key)
        lengths = [int(n) for n in pipe.execute()]
        pipe = self.redis.pipeline(transaction=False)
        skip, want = offset, limit
        for key, length in zip(keys, lengths, strict=True):
            if want <= 0:
                break
            if skip >= length:
                skip -= length
                continue
            pipe.lrange(key, skip, skip + want - 1)
            want -= min(length - skip, want)
            skip = 0
        ids = [text(i) for chunk in pipe.execute() for i in chunk]
        return ids[:limit], sum(lengths)

    # -- The dead list

    @storage_errors
    def dead(self, limit: int = 100, offset: int = 0, max_bytes: int = 0) -> list[dict[str, Any]]:
        """The dead tasks, newest first (``max_bytes``: as in :meth:`infos`)."""
        ids = self.redis.zrevrange(self.prefix + "dead", offset, offset + limit - 1)
        infos = self.infos([text(i) for i in ids], max_bytes)
        return [i for i in infos if i is not None]

    @storage_errors
    def requeue_dead(self, ids: Sequence[str] | None = None) -> tuple[list[str], list[str]]:
        """Put dead tasks (``ids``; None: all) back in the queue; return the ids requeued and the
        dead steps of workflows left dead (requeue_dead.lua: when ``ids`` holds one, nothing is
        requeued)."""
        done, steps = self._requeue_dead([self.prefix, *(ids or [])])
        return [text(i) for i in done], [text(i) for i in steps]

    @storage_errors
    def purge_dead(self, ids: Sequence[str] | None = None) -> int:
        """Delete dead tasks (``ids``; None: all); return how many were deleted."""
        return int(self._purge_dead([self.prefix, *(ids or [])]))

    # -- The queue as a whole: purge, pause

    @storage_errors
    def purge_queue(self, limit: int = PURGE_BATCH) -> tuple[int, int]:
        """Delete one batch of at most ``limit`` (<= PURGE_BATCH) waiting tasks, ready then delayed,
        with their records and de-duplication keys; return (deleted, ids still waiting).

        Running and dead tasks are left alone. One batch is one script: call again while
        tasks are left, so that Redis is never held for long.
        """
        purged, left = self._purge([self.prefix, max(1, min(limit, PURGE_BATCH))])
        return int(purged), int(left)

    @storage_errors
    def pause(self, worker_id: str = "") -> int | None:
        """Lease nothing more from this queue_index (``worker_id`` ''), or nothing to that worker.

        Returns 1 if it was not paused, 0 if it was already, None (nothing changed) for a
        worker that is not listed here.
        """
        changed = int(self._pause([self.prefix, 1, worker_id]))
        return None if changed < 0 else changed

    @storage_errors
    def resume(self, worker_id: str = "") -> int | None:
        """Undo :meth:`pause` and wake the long-polls; returns as :meth:`pause` does (a worker that
        is paused here but no longer listed may be resumed)."""
        changed = int(self._pause([self.prefix, 0, worker_id]))
        return None if changed < 0 else changed

    @storage_errors
    def paused(self) -> dict[str, float]:
        """What is paused: ``"queue"`` and ``"worker:<id>"`` -> when the pause began."""
        return {text(k): float(v) for k, v in self.redis.hgetall(self.prefix + "paused").items()}
