"""The Lua scripts: read once from ``ppq/store/lua/``, run with EVALSHA.

Each script is one file, ``lua/<name>.lua``, opening with its contract: every
``ARGV[i]`` by name and meaning, KEYS (none: every key is built from the prefix in
``ARGV[1]``), and what it returns. In a Redis Cluster the call also passes that prefix
as its one key (``KEYS[1]``, which the scripts do not read): the node then checks that
it owns the queue_index's hash slot before the script runs, and answers MOVED if not.

Code shared by several scripts is a *fragment*
(``now.lua``, ``module.lua``, ``limits.lua``, ``lease.lua``, ``seen.lua``, ``workflow.lua``...):
a script line that reads exactly

    -- include: lease.lua

is replaced by that fragment's text, so the fragment runs in the script's scope,
reading the script's locals and setting new ones; each fragment's header says
which locals it expects and which it sets. A fragment includes nothing itself.

The sources are assembled once, when this module is imported.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from importlib import resources
from typing import Any

import redis
import redis.exceptions

from .link import Link

# The scripts that change tasks on behalf of a caller waiting for the answer (a push, a
# finish, a cancel...): with ``redis.wait_replicas``, each is followed by WAIT. The
# background duties, heartbeats and schedule ticks are not: what they change is redone
# by the next run if a failover loses it.
ACKNOWLEDGED = frozenset(("push", "report", "cancel", "requeue_dead", "purge_dead", "purge", "pause",
                          "schedule_save", "schedule_change", "limit", "workflow_push", "workflow_commit"))


class UnreplicatedError(redis.exceptions.RedisError):
    """A write the primary made that fewer replicas than ``redis.wait_replicas`` confirmed in time;
    ``reply`` is the script's own reply."""

    def __init__(self, message: str, reply: Any) -> None:
        super().__init__(message)
        self.reply = reply

# The scripts a Store runs, by file name without ".lua".
NAMES = ("push", "report", "heartbeat", "reap", "move", "cancel", "requeue_dead", "purge_dead", "purge", "pause",
         "schedule_save", "schedule_claim", "schedule_change", "limit", "held", "workflow_push",
         "workflow_begin", "workflow_stage", "workflow_commit", "workflow_settle")

INCLUDE = re.compile(r"^-- include: (\w+\.lua)$", re.MULTILINE)


def read(filename: str) -> str:
    """The text of ``lua/<filename>``, as shipped in the package."""
    return (resources.files("ppq.store") / "lua" / filename).read_text(encoding="utf-8")


def assemble(name: str) -> str:
    """Script ``name`` as Redis runs it: ``lua/<name>.lua`` with its fragments included."""

    def include(match: re.Match[str]) -> str:
        fragment = read(match.group(1))
        if INCLUDE.search(fragment):
            raise ValueError(f"lua/{match.group(1)}: a fragment may not include another")
        return fragment.rstrip("\n")

    return INCLUDE.sub(include, read(name + ".lua"))


# Script name -> the source sent to Redis.
SOURCES = {name: assemble(name) for name in NAMES}


class Script:
    """A Lua script run with EVALSHA, loaded on first use (and again after a Redis restart
    or a failover to a primary that has not seen it).

    With a :class:`Link`, it goes over the link's plain connections; without one
    (TLS, unix sockets), through redis-py's registered script. ``key``: the one key a
    cluster call passes (the prefix). ``wait``: (replicas, milliseconds) for a WAIT sent
    with the script on its connection; fewer confirmations raise UnreplicatedError.
    """

    def __init__(self, source: str, client: redis.Redis, link: Link | None, key: str | None = None,
                 wait: tuple[int, int] | None = None) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()
        self.link = link
        self.client = client
        self.fallback = client.register_script(source)
        self.keys = [key] if key else []
        self.head: tuple[Any, ...] = ("EVALSHA", self.sha, len(self.keys), *self.keys)
        self.wait = wait

    def __call__(self, args: Sequence[Any]) -> Any:
        if self.wait is not None:
            return self._call_and_wait(args, *self.wait)
        if self.link is None:
            return self.fallback(keys=self.keys, args=args)
        try:
            return self.link.call(*self.head, *args)
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            self.link.call("SCRIPT", "LOAD", self.source)
            return self.link.call(*self.head, *args)

    def _call_and_wait(self, args: Sequence[Any], replicas: int, millis: int) -> Any:
        for attempt in (1, 2):
            try:
                if self.link is not None:
                    reply, acked = self.link.call_then((*self.head, *args), ("WAIT", replicas, millis))
                else:
                    pipe = self.client.pipeline(transaction=False)
                    pipe.execute_command(*self.head, *args)
                    pipe.execute_command("WAIT", replicas, millis)
                    reply, acked = pipe.execute()
            except redis.exceptions.ResponseError as exc:
                if attempt == 2 or not str(exc).startswith("NOSCRIPT"):
                    raise
                if self.link is not None:
                    self.link.call("SCRIPT", "LOAD", self.source)
                else:
                    self.client.script_load(self.source)
                continue
            if int(acked) < replicas:
                raise UnreplicatedError(
                    f"the primary made this change, but only {acked} of the {replicas} replicas "
                    f"redis.wait_replicas asks for confirmed it within {millis / 1000:g}s: a failover "
                    f"now could lose it", reply)
            return reply
        raise AssertionError("unreachable")  # pragma: no cover
