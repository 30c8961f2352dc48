"""Decoding what Redis holds into the plain dicts the master hands out.

Pure functions, no Redis calls: a leased task from a row of ``lease.lua``
(:func:`task_of`), a task record from its hash (:func:`record_of`), the counters
from the ``stats`` and ``rate`` hashes (:func:`counts_of`), a worker's info from its
msgpack (:func:`worker_of`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgpack

from .. import codec
from ..errors import CodecError
from ..task import BODY_FIELDS, decode_body

# Fields of a task record given out as text. The lease is not among them: only the
# worker it was leased to ever learns it (in the reply that leased the task).
TEXT_FIELDS = ("key", "state", "worker", "error", "traceback")
FLOAT_FIELDS = ("created", "eta", "started", "finished", "expires")
INT_FIELDS = ("retry", "attempts", "expiries", "priority")

# The counters of the stats hash that counts_of gives out under their own name.
# "expired" counts expired leases; "expired_tasks" the tasks that ended expired (not started
# before their expiry).
STAT_FIELDS = ("pushed", "leased", "done", "errors", "retried", "expired", "cancelled", "released",
               "purged", "expired_tasks")


def text(value: Any) -> str:
    """A Redis reply as text: "" for nil (None or False), bytes decoded as UTF-8."""
    if value is None or value is False:
        return ""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def task_of(row: Sequence[Any], queue_index: int) -> dict[str, Any]:
    """A leased task as the worker gets it, from a row of the lease script."""
    tid, body, retry, lease, ready_at = row
    return decode_body(body, "parameters", id=text(tid), retry=int(retry), lease=text(lease),
                       queue_index=queue_index, ready_at=float(ready_at))


def record_of(task_id: str, raw: dict[Any, Any], queue_index: int) -> dict[str, Any] | None:
    """A task record as the master returns it, from its hash (empty: unknown, None)."""
    if not raw:
        return None
    data = {text(k): v for k, v in raw.items()}
    out: dict[str, Any] = {"id": task_id, "queue_index": queue_index}
    body = decode_body(data["body"]) if data.get("body") else dict.fromkeys(BODY_FIELDS)
    for name in ("func", "module", "fclass", "path", "lang"):
        out[name] = body[name] or ""
    out["timeout"] = body["timeout"]
    out["max_retry"] = int(text(data.get("max_retry")) or 1)
    value = text(data.get("result_ttl"))
    out["result_ttl"] = int(value) if value else None
    for name in TEXT_FIELDS:
        if name in data:
            out[name] = text(data[name])
    for name in FLOAT_FIELDS:
        value = text(data.get(name))
        out[name] = float(value) if value else None
    for name in INT_FIELDS:
        value = text(data.get(name))
        out[name] = int(value) if value else 0
    out["retry_delay"] = text(data.get("retry_delay")) == "1"
    out["cancel_requested"] = text(data.get("cancel")) == "1"
    params = body["params"] or b""
    out["args"], out["kwargs"] = None, None
    if params and not codec.is_pickle(params):
        try:
            out["args"], out["kwargs"] = codec.decode_parameters(params)
        except CodecError:
            pass
    result = data.get("result")
    out["result"] = None
    out["result_pickled"] = None
    if result is not None:
        if codec.is_pickle(result):
            out["result_pickled"] = result
        else:
            try:
                out["result"] = codec.decode(result)
            except CodecError:
                out["result_pickled"] = result
    out["has_result"] = result is not None
    if "kind" in data or "wf" in data:
        # A workflow's node, or one of its tasks.
        for name in ("kind", "parent", "wf", "failed_task"):
            if name in data:
                out[name] = text(data[name])
        for name in ("pos", "n", "next", "remaining"):
            if name in data:
                out[name] = int(text(data[name]))
    return out


def counts_of(sizes: dict[str, int], stats: dict[bytes, bytes], rate: dict[bytes, bytes],
              now: int) -> dict[str, Any]:
    """The counts :meth:`Store.counts` returns: ``sizes`` (queued, delayed, running, dead),
    the ``stats`` counters, and the tasks done and failed in about the last minute from
    the ``rate`` buckets, at server time ``now`` (whole seconds)."""
    out: dict[str, Any] = dict(sizes)
    for name in STAT_FIELDS:
        out[name] = int(stats.get(name.encode(), 0))
    # Tasks that ever went dead (the dead list's size is "dead").
    out["failed"] = int(stats.get(b"dead", 0))
    # The last six 10-second buckets, the current one included: about one minute.
    current = now // 10
    per_min = {"d": 0, "f": 0}
    for field, value in rate.items():
        kind, _, bucket = text(field).partition(":")
        if kind in per_min and bucket.lstrip("-").isdigit() and int(bucket) > current - 6:
            per_min[kind] += int(value)
    out["done_per_min"] = per_min["d"]
    out["failed_per_min"] = per_min["f"]
    return out


def worker_of(worker_id: Any, blob: Any) -> dict[str, Any]:
    """A worker's last reported info (from its msgpack in the ``workers`` hash), with its id."""
    info: dict[str, Any] = msgpack.unpackb(blob, raw=False, strict_map_key=False) if blob else {}
    info["id"] = text(worker_id)
    return info
