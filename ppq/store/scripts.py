"""The Lua scripts: read once from ``ppq/store/lua/``, run with EVALSHA.

Each script is one file, ``lua/<name>.lua``, opening with its contract: every
``ARGV[i]`` by name and meaning, KEYS (none: every key is built from the prefix in
``ARGV[1]``), and what it returns. Code shared by several scripts is a *fragment*
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

# The scripts a Store runs, by file name without ".lua".
NAMES = ("push", "report", "heartbeat", "reap", "move", "cancel", "requeue_dead", "purge_dead", "purge", "pause",
         "schedule_save", "schedule_claim", "schedule_change", "limit", "held", "workflow_push")

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
    """A Lua script run with EVALSHA, loaded on first use (and again after a Redis restart).

    With a :class:`Link`, it goes over the link's plain connections; without one
    (TLS, unix sockets), through redis-py's registered script.
    """

    def __init__(self, source: str, client: redis.Redis, link: Link | None) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()
        self.link = link
        self.fallback = client.register_script(source)

    def __call__(self, args: Sequence[Any]) -> Any:
        if self.link is None:
            return self.fallback(args=args)
        try:
            return self.link.call("EVALSHA", self.sha, 0, *args)
        except redis.exceptions.ResponseError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
            self.link.call("SCRIPT", "LOAD", self.source)
            return self.link.call("EVALSHA", self.sha, 0, *args)
