"""The Store: one queue_index's tasks in one Redis database, the API the master uses.

Every state change that touches several keys is one Lua script (``lua/``), so a
master killed at any instant leaves each task in exactly one place; the rest are
single commands or pipelines. Redis errors come out as StorageError.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import msgpack
import redis
import redis.exceptions

from ..errors import MessageTooLargeError, StorageError
from ..task import TaskSpec
from .keys import keys_of
from .link import Link, connect, redact
from .records import counts_of, record_of, task_of, text, worker_of
from .schedules import ScheduleStore
from .scripts import SOURCES, Script

log = logging.getLogger("ppq.store")

# Most waiting tasks one purge script deletes: one batch holds Redis for a few milliseconds.
PURGE_BATCH = 1000

F = TypeVar("F", bound=Callable[..., Any])


def _storage_errors(method: F) -> F:
    """Turn redis-py's errors into StorageError naming the queue_index (and the URL, without
    its password, when Redis cannot be reached)."""

    @functools.wraps(method)
    def wrapper(self: Store, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise StorageError(
                f"queue_index {self.queue_index}: redis at {self.safe_url} is unreachable ({exc})"
            ) from None
        except redis.exceptions.RedisError as exc:
            raise StorageError(f"queue_index {self.queue_index}: redis error: {exc}") from None

    return wrapper  # type: ignore[return-value]


class Store(ScheduleStore):
    """The tasks of one queue_index, in one Redis database (and its periodic schedules: ScheduleStore)."""

    def __init__(
        self,
        queue_index: int,
        url: str,
        timeout: float = 2.0,
        lease_timeout: float = 60.0,
        max_lease_expiries: int = 10,
        result_ttl: int = 86400,
        max_workers: int = 10000,
    ) -> None:
        self.queue_index = queue_index
        self.url = url
        self.safe_url = redact(url)
        self.prefix = keys_of(queue_index)
        self.lease_timeout = lease_timeout
        self.max_lease_expiries = max_lease_expiries
        self.result_ttl = result_ttl
        # Worker ids listed at once; see the heartbeat script.
        self.max_workers = max_workers
        self.redis = connect(url, timeout)
        self._link = Link(url, timeout) if Link.usable(url) else None
        self._push = Script(SOURCES["push"], self.redis, self._link)
        self._report = Script(SOURCES["report"], self.redis, self._link)
        self._heartbeat = Script(SOURCES["heartbeat"], self.redis, self._link)
        self._reap = Script(SOURCES["reap"], self.redis, self._link)
        self._move = Script(SOURCES["move"], self.redis, self._link)
        self._cancel = Script(SOURCES["cancel"], self.redis, self._link)
        self._requeue_dead = Script(SOURCES["requeue_dead"], self.redis, self._link)
        self._purge_dead = Script(SOURCES["purge_dead"], self.redis, self._link)
        self._purge = Script(SOURCES["purge"], self.redis, self._link)
        self._pause = Script(SOURCES["pause"], self.redis, self._link)

    def close(self) -> None:
        """Close every connection; the Store is not used after."""
        if self._link is not None:
            self._link.close()
        self.redis.close()

    @_storage_errors
    def ping(self) -> bool:
        """Whether Redis answers (StorageError if it cannot be reached)."""
        return bool(self.redis.ping())

    @_storage_errors
    def server_version(self) -> tuple[int, ...]:
        """The Redis server's version, as numbers."""
        version = str(self.redis.info("server").get("redis_version", "0"))
        return tuple(int(part) for part in version.split(".") if part.isdigit())

    # -- The scripts of a task's life (ppq/store/lua/)

    @_storage_errors
    def push(self, specs: Sequence[TaskSpec], lease_to: tuple[str, int, float] | None = None
             ) -> tuple[list[str], list[dict[str, Any]]]:
        """Store tasks (or update waiting ones with the same key); return their ids in order.

        With ``lease_to`` = (worker id, count, seen), up to ``count`` ready tasks are
        then leased to that worker in the same step, as :meth:`report` would, and
        returned second; a push that hands work straight to a waiting worker saves the
        wake-up round.
        """
        wid, count, seen = lease_to or ("", 0, 0.0)
        args: list[Any] = [self.prefix, wid, count, self.lease_timeout, seen, os.urandom(16).hex() if count else "",
                           self.max_workers]
        for spec in specs:
            args += [spec.id, spec.key, spec.delay, spec.body, len(spec.options)]
            for name, value in spec.options:
                args += [name, value]
        ids = [spec.id for spec in specs]
        renamed, leased = self._push(args)
        for k in range(0, len(renamed), 2):
            ids[int(renamed[k]) - 1] = text(renamed[k + 1])
        return ids, [task_of(row, self.queue_index) for row in leased]

    @_storage_errors
    def report(self, worker_id: str, reports: Iterable[dict[str, Any]], count: int, seen: float,
               strict: bool = False) -> tuple[list[bool], list[dict[str, Any]]]:
        """Record finishes, errors and hand-backs, then lease up to ``count`` tasks to ``worker_id``.

        Each report is ``{id, lease, ok, result, error, traceback, retry, release}``.
        Returns one flag per report (False: the lease was lost, nothing changed) and
        the leased tasks. With ``strict``, nothing is leased if a report is refused.
        """
        args: list[Any] = [self.prefix, worker_id, count, self.lease_timeout, seen, self.result_ttl, int(strict),
                           os.urandom(16).hex() if count > 0 else "", self.max_workers]
        for r in reports:
            if r.get("release"):
                kind = "release"
            elif r["ok"]:
                kind = "ok"
            else:
                kind = "error" if r.get("retry", True) else "error-final"
            args += [r["id"], r["lease"], kind, r.get("result") or b"", r.get("error") or "", r.get("traceback") or ""]
        accepted, leased = self._report(args)
        return [bool(a) for a in accepted], [task_of(row, self.queue_index) for row in leased]

    @_storage_errors
    def heartbeat(self, worker_id: str, info: dict[str, Any], running: Iterable[tuple[str, str]],
                  seen: float) -> list[str] | None:
        """Extend the leases ``worker_id`` holds and list it with ``info`` for ``seen`` seconds;
        return the ids whose lease is lost or cancelled.

        None, with nothing changed, if the worker is not listed yet and ``max_workers`` are.
        """
        pairs = [x for pair in running for x in pair]
        lost = self._heartbeat([self.prefix, worker_id, self.lease_timeout, seen, self.max_workers,
                                msgpack.packb(info), *pairs])
        return None if lost is None else [text(i) for i in lost]

    @_storage_errors
    def reap(self, limit: int = 1000) -> int:
        """Requeue tasks whose lease ran out, and forget workers that went quiet."""
        return int(self._reap([self.prefix, self.max_lease_expiries, limit]))

    @_storage_errors
    def move_due(self, limit: int = 1000) -> tuple[int, float | None, float]:
        """Move delayed tasks whose time has come to the queue; return (moved, next eta, now)."""
        moved, nxt, now = self._move([self.prefix, limit])
        return int(moved), (float(nxt) if nxt else None), float(now)

    @_storage_errors
    def cancel(self, task_id: str) -> str | None:
        """Cancel a task (see cancel.lua); return the state it had, None if it is unknown."""
        state = self._cancel([self.prefix, task_id, self.result_ttl])
        return text(state) or None

    # -- The dead list

    @_storage_errors
    def dead(self, limit: int = 100, offset: int = 0, max_bytes: int = 0) -> list[dict[str, Any]]:
        """The dead tasks, newest first (``max_bytes``: as in :meth:`infos`)."""
        ids = self.redis.zrevrange(self.prefix + "dead", offset, offset + limit - 1)
        infos = self.infos([text(i) for i in ids], max_bytes)
        return [i for i in infos if i is not None]

    @_storage_errors
    def requeue_dead(self, ids: Sequence[str] | None = None) -> list[str]:
        """Put dead tasks (``ids``; None: all) back in the queue; return the ids requeued."""
        return [text(i) for i in self._requeue_dead([self.prefix, *(ids or [])])]

    @_storage_errors
    def purge_dead(self, ids: Sequence[str] | None = None) -> int:
        """Delete dead tasks (``ids``; None: all); return how many were deleted."""
        return int(self._purge_dead([self.prefix, *(ids or [])]))

    # -- The queue as a whole: purge, pause

    @_storage_errors
    def purge_queue(self, limit: int = PURGE_BATCH) -> tuple[int, int]:
        """Delete one batch of at most ``limit`` (<= PURGE_BATCH) waiting tasks, ready then delayed,
        with their records and de-duplication keys; return (deleted, ids still waiting).

        Running and dead tasks are left alone. One batch is one script: call again while
        tasks are left, so that Redis is never held for long.
        """
        purged, left = self._purge([self.prefix, max(1, min(limit, PURGE_BATCH))])
        return int(purged), int(left)

    @_storage_errors
    def pause(self, worker_id: str = "") -> int | None:
        """Lease nothing more from this queue_index (``worker_id`` ''), or nothing to that worker.

        Returns 1 if it was not paused, 0 if it was already, None (nothing changed) for a
        worker that is not listed here.
        """
        changed = int(self._pause([self.prefix, 1, worker_id]))
        return None if changed < 0 else changed

    @_storage_errors
    def resume(self, worker_id: str = "") -> int | None:
        """Undo :meth:`pause` and wake the long-polls; returns as :meth:`pause` does (a worker that
        is paused here but no longer listed may be resumed)."""
        changed = int(self._pause([self.prefix, 0, worker_id]))
        return None if changed < 0 else changed

    @_storage_errors
    def paused(self) -> dict[str, float]:
        """What is paused: ``"queue"`` and ``"worker:<id>"`` -> when the pause began."""
        return {text(k): float(v) for k, v in self.redis.hgetall(self.prefix + "paused").items()}

    # -- Records and counts

    @_storage_errors
    def info(self, task_id: str) -> dict[str, Any] | None:
        """The record of one task (None if unknown), as :meth:`infos` gives it."""
        return record_of(task_id, self.redis.hgetall(self.prefix + "t:" + task_id), self.queue_index)

    @_storage_errors
    def infos(self, task_ids: Sequence[str], max_bytes: int = 0) -> list[dict[str, Any] | None]:
        """The records of ``task_ids`` (None for an unknown one), read in one round trip.

        With ``max_bytes``, MessageTooLargeError (naming task_ids) if the stored records take more
        than that together: the reply carrying them would not fit in a message.
        """
        if len(task_ids) == 1:
            raws = [self.redis.hgetall(self.prefix + "t:" + task_ids[0])]
        else:
            pipe = self.redis.pipeline(transaction=False)
            for tid in task_ids:
                pipe.hgetall(self.prefix + "t:" + tid)
            raws = pipe.execute() if task_ids else []
        if max_bytes:
            size = sum(sum(map(len, raw.values())) for raw in raws if raw)
            if size > max_bytes:
                raise MessageTooLargeError(f"task_ids: their records take {size} bytes, more than the {max_bytes} one "
                                       f"reply may carry (limits.max_message); ask for fewer at a time")
        return [record_of(tid, raw, self.queue_index) for tid, raw in zip(task_ids, raws, strict=True)]

    @_storage_errors
    def counts(self) -> dict[str, Any]:
        """How many tasks wait, run and are dead, the counters, the rate over about a minute, and
        ``paused``: whether the queue_index is paused."""
        p = self.prefix
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(p + "queue")
        pipe.zcard(p + "delayed")
        pipe.zcard(p + "running")
        pipe.zcard(p + "dead")
        pipe.hgetall(p + "stats")
        pipe.hgetall(p + "rate")
        pipe.time()
        pipe.hexists(p + "paused", "queue")
        queued, delayed, running, dead, stats, rate, now, paused = pipe.execute()
        sizes = {"queued": queued, "delayed": delayed, "running": running, "dead": dead}
        return {**counts_of(sizes, stats, rate, int(now[0])), "paused": bool(paused)}

    # -- Workers

    @_storage_errors
    def workers(self, max_bytes: int = 8 * 1024 * 1024) -> list[dict[str, Any]]:
        """The workers heard from recently, with their last reported info and ``paused`` (whether
        nothing is leased to them), soonest to go quiet first; no more than ``max_bytes`` of
        stored infos are read."""
        p = self.prefix
        now = float(self.redis.time()[0])
        paused = set(self.redis.hkeys(p + "paused"))
        live: list[Any] = list(self.redis.zrangebyscore(p + "workers:seen", now, "+inf"))
        out: list[dict[str, Any]] = []
        used = 0
        for start in range(0, len(live), 500):
            chunk = live[start:start + 500]
            for wid, blob in zip(chunk, self.redis.hmget(p + "workers", chunk), strict=True):
                used += len(wid) + len(blob or b"")
                if used > max_bytes:
                    return out
                info = worker_of(wid, blob)
                info["paused"] = b"worker:" + wid in paused
                out.append(info)
        return out

    @_storage_errors
    def live_workers(self) -> int:
        """How many workers were heard from recently."""
        now = float(self.redis.time()[0])
        return int(self.redis.zcount(self.prefix + "workers:seen", now, "+inf"))

    @_storage_errors
    def forget_worker(self, worker_id: str) -> None:
        """Take a worker off the list of live workers (it said it is leaving)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self.prefix + "workers", worker_id)
        pipe.zrem(self.prefix + "workers:seen", worker_id)
        pipe.execute()

    # -- Waiting: long-polls, watched tasks, the wake-up channels

    @_storage_errors
    def add_waiter(self, member: str, seconds: float) -> None:
        """Register a long-poll, so that pushes publish a wake-up while it waits."""
        now = float(self.redis.time()[0])
        self.redis.zadd(self.prefix + "waiters", {member: now + seconds + 2})

    @_storage_errors
    def remove_waiter(self, member: str) -> None:
        """Take a long-poll off the list (it was answered or gave up)."""
        self.redis.zrem(self.prefix + "waiters", member)

    @_storage_errors
    def watch(self, task_ids: Sequence[str], seconds: float) -> None:
        """Ask for a message on the ``finished`` channel when any of ``task_ids`` ends."""
        now = float(self.redis.time()[0])
        self.redis.zadd(self.prefix + "waiting", {tid: now + seconds for tid in task_ids})

    def listen(self, on_wake: Callable[[int], None], on_finished: Callable[[str], None],
               stop: threading.Event) -> None:
        """Call ``on_wake(n)`` whenever tasks become ready and ``on_finished(id)`` when a
        watched task ends; runs until ``stop`` is set.

        Survives Redis outages: it reconnects with a capped backoff, and calls
        ``on_wake(0)`` after each (re)connection so waiters look again.
        """
        wake_channel = (self.prefix + "wake").encode()
        delay = 0.1
        while not stop.is_set():
            pubsub = None
            try:
                pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.prefix + "wake", self.prefix + "finished")
                on_wake(0)
                delay = 0.1
                while not stop.is_set():
                    msg = pubsub.get_message(timeout=0.5)
                    if not msg or msg.get("type") != "message":
                        continue
                    if msg["channel"] == wake_channel:
                        try:
                            on_wake(int(msg["data"]))
                        except ValueError:
                            on_wake(1)
                    else:
                        on_finished(text(msg["data"]))
            except redis.exceptions.RedisError as exc:
                log.warning("queue_index %s: wake-up channel lost (%s); retrying", self.queue_index, exc)
                stop.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except redis.exceptions.RedisError:
                        pass
