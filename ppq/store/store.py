"""The Store: one queue_index's tasks in one Redis database, the API the master uses.

Every state change that touches several keys is one Lua script (``lua/``), so a
master killed at any instant leaves each task in exactly one place; the rest are
single commands or pipelines. Redis errors come out as StorageError.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from typing import Any

import msgpack
import redis
import redis.exceptions

from ..errors import MessageTooLargeError
from ..targets import redis_target
from ..task import MAX_PRIORITY, TaskSpec
from .admin import Admin
from .flows import FlowStore
from .keys import keys_of
from .limits import LimitStore
from .link import Link, Locator, connect, redact, storage_errors
from .presence import Presence
from .records import counts_of, record_of, task_of, text
from .schedules import ScheduleStore
from .scripts import ACKNOWLEDGED, SOURCES, Script, UnreplicatedError

log = logging.getLogger("ppq.store")

# The allow spec of a worker that may run every module (lease.lua's `allow`).
ANY_MODULE = "*"
# Most modules whose lists of tasks moved aside counts() and parked() read.
PARKED_LISTED = 1000
# The priorities above 0, each with its own list of ready ids (P..'queue:p:<n>').
PRIORITIES = tuple(range(1, MAX_PRIORITY + 1))

class Store(Admin, ScheduleStore, LimitStore, FlowStore, Presence):
    """The tasks of one queue_index, in one Redis database (the dead list, purge and pause:
    Admin; periodic schedules: ScheduleStore; rate and concurrency limits: LimitStore;
    workflows: FlowStore; workers, long-polls and wake-ups: Presence)."""

    def __init__(
        self,
        queue_index: int,
        url: str,
        timeout: float = 2.0,
        lease_timeout: float = 60.0,
        max_lease_expiries: int = 10,
        result_ttl: int = 86400,
        max_workers: int = 10000,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
    ) -> None:
        self.queue_index = queue_index
        self.url = url
        self.safe_url = redact(url)
        target = redis_target(url)
        # In a cluster, every key of the queue_index carries one hash tag (keys.py).
        self.cluster = target.kind == "cluster"
        self.prefix = keys_of(queue_index, self.cluster)
        self.lease_timeout = lease_timeout
        self.max_lease_expiries = max_lease_expiries
        self.result_ttl = result_ttl
        # Worker ids listed at once; see the heartbeat script.
        self.max_workers = max_workers
        self.timeout = timeout
        # Replicas that must confirm each acknowledged write (WAIT), and for how long (ms).
        self.wait = (wait_replicas, max(1, int(wait_timeout * 1000))) if wait_replicas > 0 else None
        # Where the primary is, behind Sentinel or in a cluster; None for one plain Redis.
        self._locator = Locator(target, timeout, self.prefix) if target.kind != "redis" else None
        # Whether the server behind the URL can change (a failover): worth waiting for at start.
        self.follows_failover = self._locator is not None
        # A WAIT holds its connection up to wait_timeout longer than any other command.
        wire = timeout + wait_timeout if self.wait else timeout
        self.redis = connect(url, wire, self._locator)
        self._link = Link(url, wire, self._locator) if Link.usable(url) else None
        self._push = self._script("push")
        self._report = self._script("report")
        # The same script when it only leases: a lease lost in a failover runs out and is
        # handed out again, so it is not worth a WAIT.
        self._lease = self._script("report", wait=False)
        self._heartbeat = self._script("heartbeat")
        self._reap = self._script("reap")
        self._move = self._script("move")
        self._cancel = self._script("cancel")
        self._requeue_dead = self._script("requeue_dead")
        self._purge_dead = self._script("purge_dead")
        self._purge = self._script("purge")
        self._pause = self._script("pause")

    def _script(self, name: str, client: redis.Redis | None = None, wait: bool = True) -> Script:
        """Script ``name`` on this store's connections (or on ``client`` alone), followed by WAIT
        when ``redis.wait_replicas`` asks for it and the script acknowledges a change."""
        return Script(SOURCES[name], client or self.redis, self._link if client is None else None,
                      key=self.prefix if self.cluster else None,
                      wait=self.wait if wait and name in ACKNOWLEDGED else None)

    def close(self) -> None:
        """Close every connection; the Store is not used after."""
        if self._link is not None:
            self._link.close()
        self.redis.close()
        if self._locator is not None:
            self._locator.close()

    @storage_errors
    def ping(self) -> bool:
        """Whether Redis answers (StorageError if it cannot be reached)."""
        return bool(self.redis.ping())

    @storage_errors
    def server_version(self) -> tuple[int, ...]:
        """The Redis server's version, as numbers."""
        version = str(self.redis.info("server").get("redis_version", "0"))
        return tuple(int(part) for part in version.split(".") if part.isdigit())

    @storage_errors
    def memory(self) -> dict[str, Any]:
        """What this Redis holds, from one INFO call: ``used_memory`` (bytes), ``aof_enabled`` and
        ``aof_size`` (the append-only file's bytes, None when AOF is off), and the ``result_ttl``
        (seconds) this store keeps finished tasks by default."""
        info = self.redis.info()
        aof = bool(int(info.get("aof_enabled", 0) or 0))
        size = info.get("aof_current_size") if aof else None
        return {"used_memory": int(info.get("used_memory", 0) or 0), "aof_enabled": aof,
                "aof_size": int(size) if size is not None else None, "result_ttl": self.result_ttl}

    # -- The scripts of a task's life (ppq/store/lua/)

    @storage_errors
    def push(self, specs: Sequence[TaskSpec], lease_to: tuple[str, int, float, str] | None = None,
             me: str = "") -> tuple[list[str], list[dict[str, Any]]]:
        """Store tasks (or update waiting ones with the same key); return their ids in order.

        With ``lease_to`` = (worker id, count, seen, allow), up to ``count`` ready tasks
        are then leased to that worker in the same step, as :meth:`report` would, and
        returned second; a push that hands work straight to a waiting worker saves the
        wake-up round. ``me``: the pushing master's registration in the waiters, which wakes
        its own long-polls itself; only other masters' registrations have the push publish a
        wake-up.
        """
        wid, count, seen, allow = lease_to or ("", 0, 0.0, ANY_MODULE)
        args: list[Any] = [self.prefix, wid, count, self.lease_timeout, seen, os.urandom(16).hex() if count else "",
                           self.max_workers, allow, self.result_ttl, me]
        for spec in specs:
            args += [spec.id, spec.key, spec.delay, spec.body, len(spec.options)]
            for name, value in spec.options:
                args += [name, value]
        ids = [spec.id for spec in specs]
        renamed, leased = self._push(args)
        for k in range(0, len(renamed), 2):
            ids[int(renamed[k]) - 1] = text(renamed[k + 1])
        return ids, [task_of(row, self.queue_index) for row in leased]

    @storage_errors
    def report(self, worker_id: str, reports: Iterable[dict[str, Any]], count: int, seen: float,
               strict: bool = False, allow: str = ANY_MODULE, failed: dict[str, list[int]] | None = None
               ) -> tuple[list[bool], list[dict[str, Any]], bool]:
        """Record finishes, errors and hand-backs, then lease up to ``count`` tasks to ``worker_id``.

        Each report is ``{id, lease, ok, result, error, traceback, retry, release}``.
        Only tasks of the modules ``allow`` names are leased (lease.lua: ``'*'`` any, else
        names joined by ``','``); the others it comes across are moved aside for workers
        that may run them. Returns one flag per report (False: the lease was lost, nothing
        changed), the leased tasks, and whether to ask again at once (the call stopped
        after moving its most ids aside). With ``strict``, nothing is leased if a report is
        refused. ``failed``, if given, gets what became of each error report accepted
        (cancelled tasks aside): ``{id: [attempts failed, max_retry, seconds to its next run
        (0: at once) or -1: dead-listed]}``.
        """
        args: list[Any] = [self.prefix, worker_id, count, self.lease_timeout, seen, self.result_ttl, int(strict),
                           os.urandom(16).hex() if count > 0 else "", self.max_workers, allow]
        given = len(args)
        for r in reports:
            if r.get("release"):
                kind = "release"
            elif r["ok"]:
                kind = "ok"
            else:
                kind = "error" if r.get("retry", True) else "error-final"
            args += [r["id"], r["lease"], kind, r.get("result") or b"", r.get("error") or "", r.get("traceback") or ""]
        if len(args) == given:
            accepted, leased, more, outcomes = self._lease(args)
        else:
            try:
                accepted, leased, more, outcomes = self._report(args)
            except UnreplicatedError as exc:
                # Refused reports changed nothing: only an accepted one waits for the replicas.
                accepted, leased, more, outcomes = exc.reply
                if any(accepted):
                    raise
        if failed is not None:
            for k in range(0, len(outcomes), 4):
                failed[text(outcomes[k])] = [int(outcomes[k + 1]), int(outcomes[k + 2]), int(outcomes[k + 3])]
        return [bool(a) for a in accepted], [task_of(row, self.queue_index) for row in leased], bool(more)

    @storage_errors
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

    @storage_errors
    def reap(self, limit: int = 1000) -> tuple[int, list[tuple[str, int]]]:
        """Requeue tasks whose lease ran out, and forget workers that went quiet; return how many
        expired leases were taken and, of those, the tasks dead-listed with their expiries."""
        taken, dead = self._reap([self.prefix, self.max_lease_expiries, limit])
        return int(taken), [(text(dead[k]), int(dead[k + 1])) for k in range(0, len(dead), 2)]

    @storage_errors
    def move_due(self, limit: int = 1000) -> tuple[int, float | None, float]:
        """Move delayed tasks whose time has come to the queue; return (moved, next eta, now)."""
        moved, nxt, now = self._move([self.prefix, limit, self.result_ttl])
        return int(moved), (float(nxt) if nxt else None), float(now)

    @storage_errors
    def cancel(self, task_id: str) -> str | None:
        """Cancel a task (see cancel.lua); return the state it had, None if it is unknown."""
        state = self._cancel([self.prefix, task_id, self.result_ttl])
        return text(state) or None

    # -- Records and counts

    @storage_errors
    def info(self, task_id: str) -> dict[str, Any] | None:
        """The record of one task (None if unknown), as :meth:`infos` gives it."""
        return record_of(task_id, self.redis.hgetall(self.prefix + "t:" + task_id), self.queue_index)

    @storage_errors
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

    @storage_errors
    def counts(self) -> dict[str, Any]:
        """How many tasks wait, run and are dead, the counters, the rate over about a minute, and
        ``parked``: module -> how many of the queued tasks wait in that module's list, moved
        aside by leases for workers that may not run them (they count in ``queued`` too), for
        the first ``PARKED_LISTED`` modules by name; ``priorities``: priority (1-9) -> how
        many ready tasks wait in its list (they count in ``queued`` too; priority 0 and the
        tasks moved aside are the rest); ``pending``: the steps of workflows not started yet (their
        turn has not come); and ``paused``: whether the queue_index is paused."""
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
        pipe.zrange(p + "parked", 0, PARKED_LISTED - 1)
        for priority in PRIORITIES:
            pipe.llen(p + "queue:p:" + str(priority))
        queued, delayed, running, dead, stats, rate, now, paused, modules, *lengths = pipe.execute()
        parked = self.parked([text(m) for m in modules])
        by_priority = {str(priority): n for priority, n in zip(PRIORITIES, lengths, strict=True) if n}
        queued += max(0, int(stats.get(b"parked", 0))) + sum(by_priority.values())
        sizes = {"queued": queued, "delayed": delayed, "running": running, "dead": dead,
                 "pending": max(0, int(stats.get(b"pending", 0)))}
        return {**counts_of(sizes, stats, rate, int(now[0])), "paused": bool(paused), "parked": parked,
                "priorities": by_priority}

    @storage_errors
    def parked(self, modules: Sequence[str] | None = None) -> dict[str, int]:
        """Module -> how many ids wait in its list of tasks moved aside (P..'queue:m:<module>'),
        for ``modules`` (None: the first ``PARKED_LISTED`` in P..'parked', by name); empty
        lists are left out."""
        if modules is None:
            modules = [text(m) for m in self.redis.zrange(self.prefix + "parked", 0, PARKED_LISTED - 1)]
        if not modules:
            return {}
        pipe = self.redis.pipeline(transaction=False)
        for module in modules:
            pipe.llen(self.prefix + "queue:m:" + module)
        return {module: n for module, n in zip(modules, pipe.execute(), strict=True) if n}
