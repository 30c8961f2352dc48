"""The workflows of one queue_index in Redis: :class:`FlowStore`, a part of :class:`~ppq.store.Store`.

A workflow's nodes are task records (``t:<id>``: a chain's, group's or chord's own fields,
or a leaf's task fields with ``wf`` and ``pos``), each node's children listed in
``t:<id>:kids`` and a group's results in ``t:<id>:res``; ``workflow.lua`` (included by the
scripts that end tasks) moves them on.

How a workflow is stored depends on its size. One of at most ``STAGE_NODES`` nodes and
``STAGE_BYTES`` bytes (nearly all of them) is stored by one call of ``workflow_push.lua``,
which writes every record and queues the first steps: atomic, and short.

A bigger one would hold Redis, which runs one script at a time, for seconds (a chord of
100,000 members: every other client of that Redis, pushes, leases and heartbeats of every
master, waiting meanwhile). It is *staged* instead, so that no call runs long and nothing
of it can run before all of it is stored:

1. ``workflow_begin.lua`` opens a staging, ``stage:<root>`` (an owner's token, the
   workflow's digest, its number of nodes, how many are stored: ``written``, a state) with
   the root's score in the zset ``staged``: when it counts abandoned if it makes no
   progress (``hold`` seconds, at least ``STAGE_HOLD``).
2. ``workflow_stage.lua`` stores the nodes in order, a chunk of at most ``STAGE_NODES``
   nodes, ``STAGE_BYTES`` bytes and ``STAGE_KIDS`` children's ids per call (a node of more
   children, a big group, in parts of its own: its list grows in ``stage:<root>:part``
   and is put in place with its record), each one written as ``workflow_push.lua``
   writes it, but for two things: the root's record is not written (its children's list
   waits in ``stage:<root>:kids``), and a first step is ``queued`` on no ready list (its id
   waits in ``stage:<root>:q:<priority>``). So nothing of it is leased, run or moved on:
   leases take ids from the ready lists only, and a step's report is what moves a
   workflow. Each chunk checks the token and ``written`` first: a chunk out of step or of
   a former owner writes nothing.
3. ``workflow_commit.lua`` makes it live in a few commands: it writes the root's record
   (with the ``digest`` a retried push finds), renames its children's list in place, counts
   the stats and turns the staging ``releasing``. This is the push's commit point (the
   one step ``redis.wait_replicas`` waits on): after it, the workflow is whole.
4. ``workflow_settle.lua`` moves the staged first steps to the end of their ready lists,
   ``SETTLE_IDS`` a call, and deletes the staging once none is left; then the push returns.

A master that dies part way leaves nothing runnable: before the commit, nothing is on a
ready list and the root has no record; after it, the workflow is stored whole and its
first steps are on their ready lists or in the staging. Every master's duty
(:meth:`FlowStore.settle_staged`) takes a staging whose hold ran out: one still
``staging`` is deleted, ``SETTLE_NODES`` nodes a call from the last stored back
(``cleaning``); one ``releasing`` is released as its owner would have. A client that
retries the push (the same ``workflow_id`` and data: the same digest) takes the staging
over at once from where it is (``written``, even part deleted), or, once committed,
finishes releasing it and gets the id as for a workflow stored already. A node's id
found taken mid-way (a task pushed under ``<root>.<n>``) makes its owner delete what it
stored before it refuses the push, as ``workflow_push.lua`` refuses it having written
nothing. Until the commit, a staged node is reached from nowhere (no list, no root) but
by its id, which only a caller that chose the ``workflow_id`` can know before the push
returns: ``info`` reads it; a ``cancel`` of it is not refused, and ends it and its
staged parents as in a live workflow, but not the root, not stored yet, which once live
waits for them without end.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import msgpack

from ..errors import StorageError
from .link import storage_errors
from .records import text
from .scripts import Script, UnreplicatedError

log = logging.getLogger("ppq.store")

# The most nodes, and bytes of them, that one script call stores: a workflow within both is
# stored by workflow_push.lua at once; a bigger one is staged in chunks of these sizes.
STAGE_NODES = 500
STAGE_BYTES = 512 * 1024
# The most children's ids one call stores: a node of more (a big group's) takes several calls.
STAGE_KIDS = 10_000
# Ready ids one workflow_settle.lua call moves, and staged nodes it deletes.
SETTLE_IDS = 10_000
SETTLE_NODES = 500
# Seconds (at least) a staging may go without progress before any master's duty takes it as
# abandoned; five times the Redis timeout if that is longer.
STAGE_HOLD = 10.0
# Times one push takes its staging back after finding it taken from it (by a retried push
# on another master, or by a duty that found it stalled); each time it goes on from where it was.
STAGE_ATTEMPTS = 3
# Stagings one settle_staged call takes on.
SETTLE_BATCH = 100


def node_fields(fields: Sequence[Any]) -> list[Any]:
    """A record's fields as the scripts take them: bytes kept, anything else as text."""
    return [v if isinstance(v, bytes) else str(v) for v in fields]


def chunks(records: Sequence[tuple[str, Sequence[Any], Sequence[str]]], nodes: list[bytes],
           start: int) -> Iterator[tuple[int, list[bytes]]]:
    """The workflow_stage.lua calls that store a big workflow's nodes from node ``start`` on, as
    (the place of their first node, their arguments): up to STAGE_NODES nodes, STAGE_BYTES
    bytes and STAGE_KIDS children's ids each, and a node of more children in calls of its
    own, STAGE_KIDS of its ids each (its record with the last)."""
    pack = msgpack.Packer(use_bin_type=False).pack
    at = start
    while at < len(nodes):
        node_id, fields, kids = records[at]
        if len(kids) > STAGE_KIDS:
            last = (len(kids) - 1) // STAGE_KIDS * STAGE_KIDS
            for offset in range(0, last, STAGE_KIDS):
                yield at, [pack([node_id, 0, kids[offset:offset + STAGE_KIDS], offset])]
            yield at, [pack([node_id, node_fields(fields), kids[last:], last])]
            at += 1
            continue
        end, size, ids = at, 0, 0
        while end < len(nodes) and end - at < STAGE_NODES:
            more = len(records[end][2])
            if end > at and (more > STAGE_KIDS or size + len(nodes[end]) > STAGE_BYTES or ids + more > STAGE_KIDS):
                break
            size += len(nodes[end])
            ids += more
            end += 1
        yield at, nodes[at:end]
        at = end


def packed(records: Sequence[tuple[str, Sequence[Any], Sequence[str]]]) -> tuple[list[bytes], str, int, int, int]:
    """A workflow's nodes as the scripts take them, one argument each (Redis takes at most
    1,048,576 per command): the msgpack, as cmsgpack reads it, of [id, fields, children's ids];
    with their digest (hex), their number of leaves, of leaves stored 'pending', and of bytes."""
    pack = msgpack.Packer(use_bin_type=False).pack
    digest = hashlib.sha256()
    nodes: list[bytes] = []
    pending = leaves = size = 0
    for node_id, fields, kids in records:
        node = pack([node_id, node_fields(fields), kids])
        digest.update(node)
        nodes.append(node)
        size += len(node)
        if not kids:
            leaves += 1
            # A leaf's fields open with its state (flows.Builder.leaf).
            if fields[0] == "state" and fields[1] == "pending":
                pending += 1
    return nodes, digest.hexdigest(), leaves, pending, size


class FlowStore:
    """Workflow storage; mixed into Store, whose ``redis``, ``_script`` and ``prefix`` it uses."""

    redis: Any
    _script: Any
    prefix: str
    queue_index: int
    timeout: float

    @functools.cached_property
    def _workflow_push(self) -> Script:
        return self._script("workflow_push")

    @functools.cached_property
    def _workflow_begin(self) -> Script:
        return self._script("workflow_begin")

    @functools.cached_property
    def _workflow_stage(self) -> Script:
        return self._script("workflow_stage")

    @functools.cached_property
    def _workflow_commit(self) -> Script:
        return self._script("workflow_commit")

    @functools.cached_property
    def _workflow_settle(self) -> Script:
        return self._script("workflow_settle")

    @property
    def _hold(self) -> float:
        return max(STAGE_HOLD, 5 * self.timeout)

    @storage_errors
    def push_workflow(self, records: Sequence[tuple[str, Sequence[Any], Sequence[str]]]) -> bool | str:
        """Store a workflow's nodes, its root first, each (id, flat field/value list, children's ids),
        and start it: at once (workflow_push.lua), or staged in chunks when it is big (see the
        module's docstring). True when stored; False, with nothing stored, when the same
        workflow is stored already (a retried push); else the id of a node whose record
        exists already (another task's or workflow's), with nothing stored."""
        nodes, digest, leaves, pending, size = packed(records)
        if len(nodes) == 1 or (len(nodes) <= STAGE_NODES and size <= STAGE_BYTES):
            stored = self._workflow_push([self.prefix, records[0][0], digest, pending, *nodes])
            if isinstance(stored, bytes):
                return text(stored)
            return bool(stored)
        return self._push_staged(records, digest, nodes, leaves, pending)

    def _push_staged(self, records: Sequence[tuple[str, Sequence[Any], Sequence[str]]], digest: str,
                     nodes: list[bytes], leaves: int, pending: int) -> bool | str:
        """Store a big workflow in chunks, then make it live (steps 1-4 of the module's docstring)."""
        root, hold = records[0][0], self._hold
        token = os.urandom(12).hex()
        # The root as the commit takes it: its record, its children's ids staged already.
        head = msgpack.packb([root, node_fields(records[0][1]), []], use_bin_type=False)
        for _ in range(STAGE_ATTEMPTS):
            what, arg = self._workflow_begin([self.prefix, root, digest, len(nodes), token, hold])
            what = text(what)
            if what == "taken":
                return text(arg)
            if what == "stored":
                return False
            if what == "releasing":
                self._settle(root)
                return False
            for first, chunk in chunks(records, nodes, int(arg)):
                what, arg = self._workflow_stage([self.prefix, root, token, first, hold, *chunk])
                what = text(what)
                if what != "ok":
                    break
            else:
                try:
                    what, arg = self._workflow_commit([self.prefix, root, token, digest, leaves, pending, hold, head])
                except UnreplicatedError as exc:
                    what, arg = exc.reply
                    if text(what) == "ok":
                        # Live on the primary, its replicas unconfirmed: its first steps go on their
                        # ready lists as with workflow_push.lua, then the caller hears of it.
                        self._settle(root)
                        raise
                what = text(what)
            if what == "taken":
                # Delete what was staged, then refuse the push as workflow_push.lua would.
                self._settle(root, token)
                return text(arg)
            if what == "ok":
                self._settle(root)
                return True
            log.info("queue_index %s: workflow %s: its staging was taken over or found stalled; going on with it",
                     self.queue_index, root)
        raise StorageError(f"workflow {root}: its staging was taken from this master {STAGE_ATTEMPTS} times "
                           f"(another master storing the same push); nothing of it runs until one of them commits it")

    def _settle(self, root: str, token: str = "") -> tuple[str, int]:
        """Run workflow_settle.lua on staging ``root`` until it is gone or not this call's to move on;
        return the state it was first found in and what is left."""
        first = ""
        while True:
            _, state, left = self._workflow_settle([self.prefix, root, token, SETTLE_IDS, SETTLE_NODES, self._hold])
            state, left = text(state), int(left)
            first = first or state
            token = ""
            if left == 0 or state not in ("releasing", "cleaning"):
                return first, left

    @storage_errors
    def settle_staged(self) -> int:
        """Take on the stagings of big workflows whose hold ran out (their master died or stalled
        while storing them): release a committed one's first steps, delete what an uncommitted
        one stored. Return how many were taken on; a master's duty calls it every reaper tick."""
        done = 0
        for _ in range(SETTLE_BATCH):
            root, state, left = self._workflow_settle([self.prefix, "", "", SETTLE_IDS, SETTLE_NODES, self._hold])
            root, state = text(root), text(state)
            if not root:
                break
            if state == "none":
                continue
            done += 1
            if int(left) and state in ("releasing", "cleaning"):
                self._settle(root)
            if state == "releasing":
                log.warning("queue_index %s: workflow %s: its master stopped before putting all its first steps on "
                            "the ready lists; done now", self.queue_index, root)
            else:
                log.warning("queue_index %s: workflow %s: its master stopped while storing it, before it was "
                            "live; what it stored is deleted", self.queue_index, root)
        return done

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
