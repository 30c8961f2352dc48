"""The object a master exposes as ``queue``: every remote method, its argument checks, and the
replies. Waiting, hand-off and wake-ups come from :class:`~ppq.master.waiting.Waiting`; the
background duties from :mod:`ppq.master.duties`.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from .. import codec, rpc
from ..config import Config
from ..errors import CodecError, InvalidTaskError, LeaseLostError
from ..store import Store
from ..task import FAILED, QUEUED, check_push, check_queue_index, check_task_id, show
from .checks import (
    MAX_POLL,
    MAX_WAIT,
    check_batch,
    encode_result,
    required_number,
    text_field,
    worker_entry,
    worker_id_of,
)
from .duties import run_duties
from .flows import build
from .limits import Limiting
from .operate import Operations, unrouted
from .schedules import Scheduling
from .waiters import Deadlines, Parked, Waker
from .waiting import Waiting

log = logging.getLogger("ppq.master")

# Children of a workflow's node that get_task_info lists.
CHILDREN_LISTED = 20


def _plain(tasks: list[dict[str, Any]], ppq_client: bool | None = None) -> list[dict[str, Any]]:
    """Add decoded args/kwargs for clients that are not ppq's own worker (``ppq_client``: whether
    the caller is, when the call's context is gone: a held reply)."""
    if rpc.client_is_ppq() if ppq_client is None else ppq_client:
        return tasks
    for task in tasks:
        try:
            task["args"], task["kwargs"] = codec.decode_parameters(task["parameters"])
        except CodecError:
            task["args"], task["kwargs"] = None, None
    return tasks


class Master(Operations, Scheduling, Limiting, Waiting):
    """The object a master daemon exposes as ``queue``."""

    def __init__(self, config: Config, stores: Mapping[int, Store]) -> None:
        self.config = config
        self.stores = dict(stores)
        self.wakers = {qi: Waker() for qi in self.stores}
        self._watchers: dict[tuple[int, str], list[threading.Event]] = {}
        self._watch_lock = threading.Lock()
        # (queue_index, task id) -> (caller's connection, worker id, lease): see _remember_leases.
        self._handed: OrderedDict[tuple[int, str], tuple[str, str, str]] = OrderedDict()
        self._handed_lock = threading.Lock()
        self.limits = config.limits
        # Most bytes of stored task records one reply carries.
        self._reply_bytes = config.limits.max_message // 2
        self.id = uuid.uuid4().hex[:12]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._parked = 0
        self._parked_lock = threading.Lock()
        self._full_logged = False
        self._timer: Deadlines | None = None
        self._registered: dict[int, float] = {}
        # queue_index -> (when read, the allow specs of its live workers): see _live_allows.
        self._allows: dict[int, tuple[float, list[str]]] = {}

    # -- lifecycle -------------------------------------------------------

    def start_background(self) -> None:
        """Start the wake-up listener (ppq.master.waiting), the duties (ppq.master.duties) and the schedules'
        due-check (ppq.master.schedules) of each store."""
        self.start_schedules()  # first: it checks the declared schedules (ConfigError)
        self.store_declared_limits()
        interval = self.config.master.reaper_interval
        for qi, store in self.stores.items():
            for target, args, name in ((self._listen, (qi, store), "wake"),
                                       (run_duties, (qi, store, interval, self._stop), "duties")):
                t = threading.Thread(target=target, args=args, name=f"ppq-{name}-{qi}", daemon=True)
                t.start()
                self._threads.append(t)
        timer = Deadlines(self._expired, self._stop)
        t = threading.Thread(target=timer.run, name="ppq-deadlines", daemon=True)
        t.start()
        self._threads.append(t)
        self._timer = timer

    def stop_background(self) -> None:
        self._stop.set()
        if self._timer is not None:
            self._timer.wake()
        for t in self._threads:
            t.join(5)
        for waker in self.wakers.values():
            waker.wake(0)

    # -- helpers -----------------------------------------------------------

    def _store(self, queue_index: Any) -> Store:
        return self.stores[check_queue_index(queue_index, self.stores)]

    def _result_report(self, task_id: Any, lease: Any, ok: bool, result: Any = None, result_bytes: Any = None,
                       error: Any = "", traceback: Any = "", retry: bool = True) -> dict[str, Any]:
        check_task_id(task_id)
        if lease is not None and not isinstance(lease, str):
            raise InvalidTaskError("lease must be a string")
        encoded = b""
        if ok:
            if result_bytes is not None:
                encoded = codec.from_wire(result_bytes)
                if codec.is_pickle(encoded) and not self.config.master.allow_pickle:
                    raise InvalidTaskError("result is pickled, and this master does not accept pickle "
                                           "(master.allow_pickle is false)")
            else:
                encoded = encode_result(result)
            if len(encoded) > self.limits.max_payload:
                raise InvalidTaskError(f"result is {len(encoded)} bytes, more than the limit of "
                                       f"{self.limits.max_payload}")
        return {
            "id": task_id, "lease": lease or "", "ok": ok, "result": encoded,
            "error": text_field("error", error, 10_000), "traceback": text_field("traceback", traceback, 100_000),
            "retry": bool(retry), "release": False,
        }

    def _finish(self, report: dict[str, Any], worker_info: Any, queue_index: Any, piggyback: bool) -> Any:
        self._fill_lease(report, queue_index, worker_info)
        accepted, tasks = self._lease(worker_info, queue_index, [report], 1 if piggyback else 0, 0, strict=True)
        if not accepted[0]:
            raise LeaseLostError(f"task {report['id']}: this worker no longer holds its lease "
                                 f"(it expired or was handed to another worker); the report was refused")
        if piggyback:
            self._remember_leases(queue_index, worker_info, tasks)
            return _plain(tasks)[0] if tasks else None
        return True

    # -- the exposed methods ------------------------------------------------

    @rpc.remote(role=rpc.ANY)
    def ping(self) -> str:
        return "pong"

    @rpc.remote
    def push_task(self, func: Any, key: Any = "", fclass: Any = None, module: Any = None, path: Any = None,
                  lang: Any = "", parameters: Any = None, max_retry: Any = 1, retry_delay: Any = False,
                  queue_index: Any = 0, delay: Any = None, args: Any = None, kwargs: Any = None,
                  timeout: Any = None, result_ttl: Any = None, task_id: Any = None, priority: Any = 0,
                  expires: Any = None) -> str:
        """Push one task; return its id. The fields are described in README.md and checked in task.check_push."""
        options = {
            "func": func, "key": key, "fclass": fclass, "module": module, "path": path, "lang": lang,
            "parameters": parameters, "max_retry": max_retry, "retry_delay": retry_delay,
            "queue_index": queue_index, "delay": delay, "args": args, "kwargs": kwargs,
            "timeout": timeout, "result_ttl": result_ttl, "task_id": task_id, "priority": priority,
            "expires": expires,
        }
        spec = check_push(options, self.stores, self.limits, self.config.master.allow_pickle)
        task_id = self._push(spec.queue_index, [spec])[0]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("queue_index %s: task %s pushed%s", spec.queue_index, task_id,
                      f" (delay {spec.delay:g}s)" if spec.delay else "")
        return task_id

    @rpc.remote
    def push_tasks(self, tasks: Any) -> list[str]:
        """Push many tasks in one call; all are checked before any is stored."""
        if not isinstance(tasks, (list, tuple)):
            raise InvalidTaskError(f"tasks must be a list of dicts, got {type(tasks).__name__}")
        if len(tasks) > self.limits.max_batch:
            raise InvalidTaskError(f"tasks holds {len(tasks)} tasks, more than the limit of {self.limits.max_batch}")
        specs = check_batch(tasks, self.stores, self.limits, self.config.master.allow_pickle)
        by_queue: dict[int, list[int]] = {}
        for i, spec in enumerate(specs):
            by_queue.setdefault(spec.queue_index, []).append(i)
        ids: list[str] = [""] * len(specs)
        for qi, positions in by_queue.items():
            for pos, tid in zip(positions, self._push(qi, [specs[p] for p in positions]), strict=True):
                ids[pos] = tid
        if log.isEnabledFor(logging.DEBUG):
            for spec, tid in zip(specs, ids, strict=True):
                log.debug("queue_index %s: task %s pushed", spec.queue_index, tid)
        return ids

    @rpc.remote
    def push_workflow(self, workflow: Any, queue_index: Any = 0, workflow_id: Any = None) -> str:
        """Push a workflow (chain, group, chord) given as plain data (``ppq/master/flows.py``);
        return its id. Every node is checked first, and an error names the path of the bad
        one ("chain[2].group[0]: func: ..."); nothing is stored then. ``workflow_id`` (made by
        the caller) makes a retried push store the workflow once; an id that another task or
        workflow has (the root's or any node's: ``<id>.<n>``) is refused, and nothing is stored."""
        store = self._store(queue_index)
        records = build(workflow, store.queue_index, self.stores, self.limits, store.result_ttl, workflow_id)
        stored = store.push_workflow(records)
        if isinstance(stored, str):
            taken = ("is the id" if stored == records[0].id
                     else f"would give a node the id {show(stored)}, which is the id")
            raise InvalidTaskError(f"workflow_id {show(records[0].id)} {taken} of another task or workflow; "
                                   f"nothing was stored")
        if stored:
            log.debug("queue_index %s: workflow %s pushed (%d nodes)", store.queue_index, records[0].id, len(records))
        return records[0].id

    @rpc.remote(role=rpc.WORKER)
    def get_task(self, worker_info: Any, queue_index: Any = 0, wait: Any = 0) -> dict[str, Any] | None:
        """Lease the next task of ``queue_index`` (waiting up to ``wait`` seconds); None if there is none."""
        wait = required_number("wait", wait, 0, MAX_WAIT)
        _, tasks = self._lease(worker_info, queue_index, [], 1, wait)
        self._remember_leases(queue_index, worker_info, tasks)
        return _plain(tasks)[0] if tasks else None

    @rpc.remote(role=rpc.WORKER)
    def get_tasks(self, worker_info: Any, queue_index: Any = 0, count: Any = 1, wait: Any = 0) -> list[dict[str, Any]]:
        """Lease up to ``count`` tasks."""
        count = int(required_number("count", count, 1, self.limits.max_batch))
        wait = required_number("wait", wait, 0, MAX_WAIT)
        _, tasks = self._lease(worker_info, queue_index, [], count, wait)
        self._remember_leases(queue_index, worker_info, tasks)
        return _plain(tasks)

    @rpc.remote(role=rpc.WORKER)
    def task_finish(self, task_id: Any, worker_info: Any, queue_index: Any = 0, piggyback: Any = False,
                    result: Any = None, result_bytes: Any = None, lease: Any = None) -> Any:
        """Record a task's success. Refused (LeaseLostError) if the worker lost its lease.

        With ``piggyback`` the reply is the next task (or None) instead of True.
        """
        report = self._result_report(task_id, lease, True, result=result, result_bytes=result_bytes)
        return self._finish(report, worker_info, queue_index, bool(piggyback))

    @rpc.remote(role=rpc.WORKER)
    def task_error(self, task_id: Any, worker_info: Any, queue_index: Any = 0, piggyback: Any = False,
                   error: Any = "", traceback: Any = "", lease: Any = None, retry: Any = True) -> Any:
        """Record a task's failure: it is retried while retries remain, else it goes to the dead list."""
        report = self._result_report(task_id, lease, False, error=error, traceback=traceback, retry=bool(retry))
        return self._finish(report, worker_info, queue_index, bool(piggyback))

    @rpc.remote(role=rpc.WORKER)
    def report(self, worker_info: Any, queue_index: Any = 0, reports: Any = (), want: Any = 0,
               wait: Any = 0) -> dict[str, Any]:
        """The worker's fast path: many finishes/errors/hand-backs and the next tasks in one call.

        Each report: ``{id, lease, ok, result_bytes | result, error, traceback, retry, release}``.
        Returns ``{"accepted": [bool, ...], "tasks": [...]}``, and ``"failed"`` when error reports
        were accepted: ``{id: [attempts failed, max_retry, seconds to the next run (0: at once)
        or -1: dead-listed]}`` (a cancelled task is not in it).
        """
        if not isinstance(reports, (list, tuple)) or len(reports) > self.limits.max_batch:
            raise InvalidTaskError(f"reports must be a list of at most {self.limits.max_batch} dicts")
        want = int(required_number("want", want, 0, self.limits.max_batch))
        wait = required_number("wait", wait, 0, MAX_POLL)
        checked = []
        for i, r in enumerate(reports):
            if not isinstance(r, Mapping):
                raise InvalidTaskError(f"reports[{i}] must be a dict")
            try:
                item = self._result_report(r.get("id"), r.get("lease"), bool(r.get("ok")), r.get("result"),
                                           r.get("result_bytes"), r.get("error", ""), r.get("traceback", ""),
                                           r.get("retry", True))
            except InvalidTaskError as exc:
                if not r.get("ok") or r.get("release"):
                    raise
                # A result that cannot be stored fails its task for good; the batch's other reports stand.
                item = self._result_report(r.get("id"), r.get("lease"), False,
                                           error=f"InvalidResultError: {exc}", retry=False)
            item["release"] = bool(r.get("release"))
            checked.append(item)
        failed: dict[str, list[int]] = {}
        ppq_client = rpc.client_is_ppq()

        def reply_of(accepted: list[bool], tasks: list[dict[str, Any]]) -> dict[str, Any]:
            reply: dict[str, Any] = {"accepted": accepted, "tasks": _plain(tasks, ppq_client)}
            if failed:
                reply["failed"] = failed
            return reply

        try:
            accepted, tasks = self._lease(worker_info, queue_index, checked, want, wait, failed=failed,
                                          hold=reply_of)
        except Parked:
            return rpc.HELD  # the reply is sent when the long-poll ends (Waiting._park)
        return reply_of(accepted, tasks)

    @rpc.remote(role=rpc.WORKER)
    def heartbeat(self, worker_info: Any, queue_index: Any = 0, running: Any = ()) -> dict[str, Any]:
        """Extend the leases of ``running`` (``[[id, lease], ...]``); register the worker.

        Returns ``{"lost": [ids]}``: tasks whose lease is gone or that were cancelled.
        """
        info = worker_entry(worker_info, self.limits.max_worker_info, address=rpc.client_address(),
                            last_heartbeat=time.time())
        if not isinstance(running, (list, tuple)) or len(running) > self.limits.max_batch:
            raise InvalidTaskError("running must be a list of [task_id, lease] pairs")
        pairs = []
        for item in running:
            if not isinstance(item, (list, tuple)) or len(item) != 2:
                raise InvalidTaskError("running must be a list of [task_id, lease] pairs")
            pairs.append((check_task_id(item[0]), text_field("lease", item[1], 300)))
        store = self._store(queue_index)
        lost = store.heartbeat(info["id"], info, pairs, self._seen(worker_info))
        if lost is None:
            raise InvalidTaskError(f"worker_info: queue_index {store.queue_index} already lists "
                                   f"{self.limits.max_workers} workers (limits.max_workers); a new worker id is "
                                   f"refused until listed ones go quiet for master.worker_ttl")
        return {"lost": lost}

    @rpc.remote(role=rpc.WORKER)
    def release_worker(self, worker_info: Any, queue_index: Any = 0, leaving: Any = False) -> int:
        """A worker is stopping: end its long-polls waiting on this master at once (they return no
        task); with ``leaving``, also take it off the list of live workers. Returns how many
        long-polls were ended."""
        wid = worker_id_of(worker_info)
        store = self._store(queue_index)
        ended = self.wakers[store.queue_index].release(wid)
        if leaving:
            store.forget_worker(wid)
        return ended

    @rpc.remote
    def get_task_info(self, task_id: Any, queue_index: Any = 0) -> dict[str, Any] | None:
        """The task's record (state, retry, timestamps, result or error); None if unknown.

        A task that waits (queued, or failed and due for its retry) of a module no live
        worker allows has ``waiting_for``: "a worker that allows <module>"; one its function's
        limits hold back, "its rate limit 10/s" or "a slot of its concurrency limit 2 (2 running)".
        """
        check_task_id(task_id)
        store = self._store(queue_index)
        record = store.info(task_id)
        if record is not None and "kind" in record:
            self._node_info(store, record)
        if record is not None and record["state"] in (QUEUED, FAILED) and record["module"]:
            if unrouted({record["module"]: 1}, self._live_allows(store)):
                record["waiting_for"] = f"a worker that allows {record['module']}"
            else:
                held = self.held_for(store, record)
                if held:
                    record["waiting_for"] = held
        return record

    def _node_info(self, store: Store, record: dict[str, Any]) -> None:
        """A workflow node's ``children`` (up to CHILDREN_LISTED, as {id, state}),
        ``children_more`` (how many more) and ``progress`` ("step 3 of 5", "412 of 1000 done")."""
        total, kids = store.children(record["id"], CHILDREN_LISTED)
        record["children"] = [{"id": kid, "state": state} for kid, state in kids]
        record["children_more"] = max(0, total - len(kids))
        n = record.get("n", total)
        if record["kind"] == "group":
            record["progress"] = f"{n - record.get('remaining', n)} of {n} done"
        elif record["state"] == "done":
            record["progress"] = f"{n} of {n} steps done"
        else:
            record["progress"] = f"step {record.get('next', 0) or 1} of {n}"

    @rpc.remote
    def wait_task(self, task_id: Any, queue_index: Any = 0, timeout: Any = 10) -> dict[str, Any] | None:
        """Wait up to ``timeout`` seconds for the task to end; return its record (None if unknown)."""
        check_task_id(task_id)
        timeout = required_number("timeout", timeout, 0, MAX_WAIT)
        return self._wait_final(self._store(queue_index), [task_id], timeout)[0]

    @rpc.remote
    def wait_tasks(self, task_ids: Any, queue_index: Any = 0, timeout: Any = 10) -> list[dict[str, Any] | None]:
        """Wait until at least one of ``task_ids`` has ended (or ``timeout``); return all their records."""
        if not isinstance(task_ids, (list, tuple)) or not task_ids or len(task_ids) > self.limits.max_lookup:
            raise InvalidTaskError(f"task_ids must be a non-empty list of at most {self.limits.max_lookup} ids "
                                   f"(limits.max_lookup)")
        ids = [check_task_id(t) for t in task_ids]
        timeout = required_number("timeout", timeout, 0, MAX_WAIT)
        return self._wait_final(self._store(queue_index), ids, timeout)

    @rpc.remote
    def get_tasks_info(self, task_ids: Any, queue_index: Any = 0) -> list[dict[str, Any] | None]:
        if not isinstance(task_ids, (list, tuple)) or len(task_ids) > self.limits.max_lookup:
            raise InvalidTaskError(f"task_ids must be a list of at most {self.limits.max_lookup} ids "
                                   f"(limits.max_lookup)")
        ids = [check_task_id(t) for t in task_ids]
        return self._store(queue_index).infos(ids, self._reply_bytes)
