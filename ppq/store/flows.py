"""The workflows of one queue_index in Redis: :class:`FlowStore`, a part of :class:`~ppq.store.Store`.

A workflow's nodes are task records (``t:<id>``: a chain's, group's or chord's own fields,
or a leaf's task fields with ``wf`` and ``pos``), each node's children listed in
``t:<id>:kids`` and a group's results in ``t:<id>:res``; ``workflow_push.lua`` stores them
all in one step, and ``workflow.lua`` (included by the scripts that end tasks) moves them on.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from typing import Any

import msgpack

from .link import connect, storage_errors
from .records import text
from .scripts import Script

# Workflows of more nodes than this are stored over a connection of their own, with a longer timeout.
BIG_WORKFLOW = 5000
# Seconds that connection waits for Redis to store a big workflow.
BIG_WORKFLOW_TIMEOUT = 120.0


class FlowStore:
    """Workflow storage; mixed into Store, whose ``redis``, ``_script`` and ``prefix`` it uses."""

    redis: Any
    _script: Any
    _locator: Any
    prefix: str
    url: str
    timeout: float

    @functools.cached_property
    def _workflow_push(self) -> Script:
        return self._script("workflow_push")

    @storage_errors
    def push_workflow(self, records: Sequence[tuple[str, Sequence[Any], Sequence[str]]]) -> bool | str:
        """Store a workflow's nodes, its root first, each (id, flat field/value list, children's ids),
        and start it (workflow_push.lua). True when stored; False, with nothing stored, when the
        same workflow is stored already (a retried push); else the id of a node whose record
        exists already (another task's or workflow's), with nothing stored."""
        pack = msgpack.Packer(use_bin_type=False).pack
        digest = hashlib.sha256()
        nodes: list[bytes] = []
        pending = 0
        # One argument per node (Redis takes at most 1,048,576 per command), as cmsgpack reads it.
        for node_id, fields, kids in records:
            node = pack([node_id, [v if isinstance(v, bytes) else str(v) for v in fields], kids])
            digest.update(node)
            nodes.append(node)
            # A leaf's fields open with its state (flows.Builder.leaf).
            if not kids and fields[0] == "state" and fields[1] == "pending":
                pending += 1
        args: list[Any] = [self.prefix, records[0][0], digest.hexdigest(), pending, *nodes]
        if len(records) <= BIG_WORKFLOW:
            stored = self._workflow_push(args)
        else:
            # Redis runs a big one for seconds (about 4 s for 100,000 tasks): on a connection of its own
            # that waits that long.
            client = connect(self.url, max(self.timeout, BIG_WORKFLOW_TIMEOUT), self._locator)
            try:
                stored = self._script("workflow_push", client)(args)
            finally:
                client.close()
        if isinstance(stored, bytes):
            return text(stored)
        return bool(stored)

    @storage_errors
    def children(self, node_id: str, count: int) -> tuple[int, list[tuple[str, str]]]:
        """How many children a workflow's node has, and the first ``count`` of them as (id, state)."""
        kids = self.prefix + "t:" + node_id + ":kids"
        pipe = self.redis.pipeline(transaction=False)
        pipe.llen(kids)
        pipe.lrange(kids, 0, count - 1)
        total, ids = pipe.execute()
        pipe = self.redis.pipeline(transaction=False)
        for kid in ids:
            pipe.hget(self.prefix + "t:" + text(kid), "state")
        states = pipe.execute() if ids else []
        return int(total), [(text(kid), text(state) or "unknown") for kid, state in zip(ids, states, strict=True)]
