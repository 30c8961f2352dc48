"""Who is there: the workers heard from, the long-polls and watched tasks, and the wake-up
channels of one queue_index: :class:`Presence`, a part of :class:`~ppq.store.Store`.

    workers          hash  worker id -> its last reported info (msgpack)
    workers:seen     zset  worker id -> until when it counts as live
    waiters          zset  long-polls registered by masters -> until when (pushes publish a
                           wake-up only while there is one)
    waiting          zset  task ids someone waits on -> until when (their end is published on
                           the finished channel)
    wake, finished   pub/sub channels: how many tasks were made ready; the id of a watched
                     task that ended
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import redis
import redis.exceptions

from .link import storage_errors
from .records import text, worker_of

log = logging.getLogger("ppq.store")


class Presence:
    """Workers, waiters and wake-ups; mixed into Store, whose ``redis`` and ``prefix`` it uses."""

    redis: Any
    _locator: Any
    prefix: str
    queue_index: int

    @storage_errors
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

    @storage_errors
    def live_workers(self) -> int:
        """How many workers were heard from recently."""
        now = float(self.redis.time()[0])
        return int(self.redis.zcount(self.prefix + "workers:seen", now, "+inf"))

    @storage_errors
    def forget_worker(self, worker_id: str) -> None:
        """Take a worker off the list of live workers (it said it is leaving)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(self.prefix + "workers", worker_id)
        pipe.zrem(self.prefix + "workers:seen", worker_id)
        pipe.execute()

    @storage_errors
    def listed_at_most(self, worker_id: str, seconds: float) -> None:
        """Have a listed worker count as live ``seconds`` more at most (its long-poll, which
        listed it past its own end, was cut off: the worker may be gone)."""
        now = float(self.redis.time()[0])
        self.redis.zadd(self.prefix + "workers:seen", {worker_id: now + seconds}, xx=True, lt=True)

    @storage_errors
    def add_waiter(self, member: str, seconds: float) -> None:
        """Register a long-poll, so that pushes publish a wake-up while it waits."""
        now = float(self.redis.time()[0])
        self.redis.zadd(self.prefix + "waiters", {member: now + seconds + 2})

    @storage_errors
    def remove_waiter(self, member: str) -> None:
        """Take a long-poll off the list (it was answered or gave up)."""
        self.redis.zrem(self.prefix + "waiters", member)

    @storage_errors
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
                if self._locator is not None:
                    self._locator.forget()
                log.warning("queue_index %s: wake-up channel lost (%s); retrying", self.queue_index, exc)
                stop.wait(delay)
                delay = min(delay * 2, 5.0)
            finally:
                if pubsub is not None:
                    try:
                        pubsub.close()
                    except redis.exceptions.RedisError:
                        pass
