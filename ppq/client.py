"""The high-level client: ``Client`` and the ``@task`` decorator, over :class:`PyroFunc`."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import codec
from .config import Config, load_config
from .errors import InvalidTaskError, MessageTooLargeError, ResultTimeoutError, TaskExpiredError, TaskFailedError
from .limits import LimitClient, declare
from .rpc import DEFAULT_TIMEOUT, PyroFunc, apply_tls
from .schedules import ScheduleClient
from .task import DONE, EXPIRED, FINAL_STATES, new_id
from .workflow import Node, Signature, target_name

# Tasks sent per push_tasks call by push_many.
DEFAULT_CHUNK = 5000
# Task ids sent per wait_tasks call by results (a master takes up to limits.max_lookup, 1000 by default).
LOOKUP_CHUNK = 1000
# Most waiting tasks one purge_queue call deletes (the master takes up to 100,000).
PURGE_CHUNK = 20_000
# Longest single wait the master is asked to hold, in seconds.
_WAIT_STEP = 20.0


class Client(ScheduleClient, LimitClient):
    """Push tasks and read their state and results (and manage periodic schedules: ScheduleClient).

    ``masters`` is a list of ``host:port`` or ``PYRO:`` URIs, or name server entries
    (``PYRONAME:ppq.master@host:port``: every master registered there; default: from the
    config: ``client.masters`` and ``client.nameserver``, else the worker's). Each push carries a
    task id made here, so a push retried after a dropped reply is stored once.
    """

    def __init__(
        self,
        masters: str | Sequence[str] | None = None,
        *,
        config: Config | None = None,
        token: str | None = None,
        retry: int | None = None,
        timeout: float | None = None,
        allow_pickle: bool | None = None,
        queue_index: int = 0,
    ) -> None:
        config = config or load_config()
        apply_tls(config.tls)
        masters = masters or config.client_masters()
        self.queue_index = queue_index
        self.allow_pickle = config.client.allow_pickle if allow_pickle is None else allow_pickle
        self.call = PyroFunc(
            masters,
            retry=config.client.retry if retry is None else retry,
            random_idx=True,
            token=token if token is not None else config.client_secret,
            timeout=timeout or config.client.timeout or DEFAULT_TIMEOUT,
            max_message=config.limits.max_message,
        )
        # A wait held by the master must end before the proxy's own timeout.
        self._wait_step = max(0.5, min(_WAIT_STEP, (self.call.timeout or _WAIT_STEP + 2) - 2))

    def _task(self, target: str | Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any] | None,
              options: dict[str, Any]) -> dict[str, Any]:
        module, func, fclass = target_name(target)
        task: dict[str, Any] = {"func": func, "module": module, "task_id": options.pop("task_id", None) or new_id()}
        if fclass and "fclass" not in options:
            task["fclass"] = fclass
        if self.allow_pickle:
            task["parameters"] = codec.encode_parameters(args, kwargs, use_pickle=True)
        else:
            task["args"] = list(args)
            task["kwargs"] = dict(kwargs or {})
        task.setdefault("queue_index", self.queue_index)
        task.update(options)
        return task

    def push(self, target: str | Callable[..., Any] | Node, *args: Any, kwargs: dict[str, Any] | None = None,
             **options: Any) -> str:
        """Push ``target(*args, **kwargs)``; ``options`` are push_task's (queue_index, delay, key,
        priority: 0-9, higher first; expires: seconds from now or a unix time by which it must
        have started...).

        ``target`` may be a workflow (``chain``, ``group``, ``chord`` from :mod:`ppq.workflow`):
        it is sent as plain data to the master's ``push_workflow``, with ``queue_index`` the
        only option; its id is returned, for :meth:`result`, :meth:`info` and :meth:`cancel`.

        ``on_commit=True`` (with Django: :mod:`ppq.contrib.django`) pushes once the current
        database transaction commits, and never if it rolls back; the id is returned at once."""
        if isinstance(target, Node):
            if args or kwargs or set(options) - {"queue_index"}:
                raise InvalidTaskError("a workflow is pushed with queue_index as its only option; give the other "
                                       "options (priority, max_retry...) to its steps")
            qi = options.get("queue_index", self.queue_index)
            return str(self.call("push_workflow", target.to_data(), qi, new_id()))
        if options.get("on_commit") is not None:
            on_commit = options.pop("on_commit")
            if on_commit is not True and on_commit is not False:
                raise InvalidTaskError(f"on_commit must be true or false, got {on_commit!r}")
            if on_commit:
                try:
                    from .contrib.django import push_on_commit
                except ImportError as exc:
                    raise InvalidTaskError(f"on_commit=True needs Django ({exc})") from None
                return push_on_commit(target, *args, kwargs=kwargs, client=self, **options)
        return str(self.call("push_task", **self._task(target, args, kwargs, options)))

    def push_many(self, tasks: Iterable[Any], chunk: int = DEFAULT_CHUNK, **options: Any) -> list[str]:
        """Push many tasks, ``chunk`` per round trip.

        Each item is ``(target, args)``, ``(target, args, kwargs)`` or a dict of
        push_task fields. ``options`` apply to every task. While the master stores
        one chunk, the next is built.
        """
        chunks = self._chunks(tasks, max(1, chunk), options)
        first = next(chunks, None)
        if first is None:
            return []
        if len(first) < chunk:
            return self._push_batch(first)
        ids: list[str] = []
        with ThreadPoolExecutor(1, thread_name_prefix="ppq-push-many") as builder:
            batch: list[dict[str, Any]] | None = first
            while batch is not None:
                following = builder.submit(next, chunks, None)
                ids.extend(self._push_batch(batch))
                batch = following.result()
        return ids

    def _push_batch(self, batch: list[dict[str, Any]]) -> list[str]:
        """One push_tasks call, or halves of it while it is larger than one call carries."""
        try:
            return list(self.call("push_tasks", batch))
        except MessageTooLargeError:
            if len(batch) == 1:
                raise
            half = len(batch) // 2
            return self._push_batch(batch[:half]) + self._push_batch(batch[half:])

    def _chunks(self, tasks: Iterable[Any], chunk: int, options: dict[str, Any]) -> Iterator[list[dict[str, Any]]]:
        batch: list[dict[str, Any]] = []
        base = new_id()[:22]
        names: dict[str, tuple[str, str, str | None]] = {}
        # The usual item, (dotted name, args), becomes its dict here without _task's general path.
        plain = not options and not self.allow_pickle
        queue_index = self.queue_index
        for n, item in enumerate(tasks):
            task_id = f"{base}{n:010x}"
            if isinstance(item, dict):
                task = dict(options, **item)
                task.setdefault("task_id", task_id)
                task.setdefault("queue_index", queue_index)
            else:
                target, args, *rest = item
                if plain and not rest and target.__class__ is str and args.__class__ in (list, tuple):
                    module, func, _ = names.get(target) or names.setdefault(target, target_name(target))
                    task = {"func": func, "module": module, "task_id": task_id, "args": list(args), "kwargs": {},
                            "queue_index": queue_index}
                else:
                    task = self._task(target, args, rest[0] if rest else None, dict(options, task_id=task_id))
            batch.append(task)
            if len(batch) >= chunk:
                yield batch
                batch = []
        if batch:
            yield batch

    def info(self, task_id: str, queue_index: int | None = None) -> dict[str, Any] | None:
        """The task's record, or None if it is unknown."""
        qi = self.queue_index if queue_index is None else queue_index
        return self.call("get_task_info", task_id, qi)

    def cancel(self, task_id: str, queue_index: int | None = None) -> str | None:
        """Cancel a task; return the state it was in, or None if it is unknown.

        - ``"queued"``, ``"delayed"`` or ``"failed"`` (waiting for a retry): it is
          now ``cancelled`` and will never run;
        - ``"running"``: it runs to its end, then becomes ``cancelled`` with its
          result dropped (``info(id)["cancel_requested"]`` is True meanwhile);
        - ``"done"``, ``"dead"``, ``"expired"`` or ``"cancelled"``: it had ended;
          nothing changed.
        """
        qi = self.queue_index if queue_index is None else queue_index
        return self.call("cancel_task", task_id, qi)

    def server_info(self) -> dict[int, dict[str, Any]]:
        return self.call("server_info")

    def purge_queue(self, queue_index: int | None = None,
                    progress: Callable[[int, int], None] | None = None) -> int:
        """Delete every task waiting in the queue_index (ready and delayed; running and dead ones
        stay), with their records and de-duplication keys; return how many were deleted.

        The master deletes them a batch at a time, so Redis keeps serving meanwhile;
        ``progress(purged so far, left)`` is called after each call to it. Tasks pushed
        while it runs may go too.
        """
        qi = self.queue_index if queue_index is None else queue_index
        total = 0
        while True:
            reply = self.call("purge_queue", qi, PURGE_CHUNK)
            total += reply["purged"]
            if progress is not None:
                progress(total, reply["left"])
            if not reply["left"] or not reply["purged"]:
                return total

    def pause_queue(self, queue_index: int | None = None) -> bool:
        """Stop every master leasing tasks of the queue_index (pushes are still stored, running
        tasks go on); False if it was paused already."""
        qi = self.queue_index if queue_index is None else queue_index
        return bool(self.call("pause_queue", qi))

    def resume_queue(self, queue_index: int | None = None) -> bool:
        """Lease the tasks of the queue_index again; False if it was not paused."""
        qi = self.queue_index if queue_index is None else queue_index
        return bool(self.call("resume_queue", qi))

    def pause_worker(self, worker_id: str, queue_index: int | None = None) -> list[int]:
        """Lease nothing more to worker ``worker_id`` (an id ``server_info`` lists); it finishes
        what it runs and stays listed. Returns the queue_indexes where it is paused
        (``queue_index`` None: wherever it is listed); InvalidTaskError for an unknown id."""
        return list(self.call("pause_worker", worker_id, queue_index))

    def resume_worker(self, worker_id: str, queue_index: int | None = None) -> list[int]:
        """Lease to worker ``worker_id`` again; returns as :meth:`pause_worker` does."""
        return list(self.call("resume_worker", worker_id, queue_index))

    def _value(self, info: dict[str, Any]) -> Any:
        if info["state"] == DONE:
            if info.get("result_pickled") is not None:
                return codec.decode(codec.from_wire(info["result_pickled"]), allow_pickle=self.allow_pickle)
            return info.get("result")
        if info["state"] == EXPIRED:
            expires = info.get("expires")
            when = f" (expires {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(expires))} UTC)" if expires else ""
            raise TaskExpiredError(info["id"], f"not started before its expiry{when}, never run", "", expires)
        if info.get("failed_task"):
            raise self._step_failed(info)
        raise TaskFailedError(info["id"], info.get("error") or info["state"], info.get("traceback") or "")

    def _step_failed(self, info: dict[str, Any]) -> TaskFailedError:
        """The error of a workflow whose step ``failed_task`` failed: its message names the step; its
        ``type``, ``message`` and ``traceback`` are the step's."""
        error = info.get("error") or info["state"]
        step = info["failed_task"]
        record = self.info(step, info.get("queue_index"))
        exc = TaskFailedError(info["id"], error, (record or {}).get("traceback") or "")
        prefix = f"step {step} failed: "
        if error.startswith(prefix):
            inner = TaskFailedError(step, error[len(prefix):])
            exc.type, exc.message = inner.type, inner.message
        return exc

    def result(self, task_id: str, timeout: float | None = None, queue_index: int | None = None) -> Any:
        """Wait for the task to end and return its result; raise TaskFailedError if it failed
        (TaskExpiredError, a TaskFailedError, if it expired before it started).

        The master holds the call until the task ends (no polling); ``timeout``
        None waits for ever, else ResultTimeoutError is raised.
        """
        qi = self.queue_index if queue_index is None else queue_index
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            wait = self._wait_step if deadline is None else min(self._wait_step, max(deadline - time.monotonic(), 0))
            info = self.call("wait_task", task_id, qi, wait)
            if info is None:
                raise InvalidTaskError(f"task {task_id} is unknown (never pushed, or its record expired)")
            if info["state"] in FINAL_STATES:
                return self._value(info)
            if deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeoutError(f"task {task_id} is still {info['state']} after {timeout:g}s")

    def results(self, task_ids: Sequence[str], timeout: float | None = None,
                queue_index: int | None = None) -> Iterator[tuple[str, Any]]:
        """Yield ``(task_id, result)`` as tasks end, in the order they end.

        A failed task yields its TaskFailedError as the result instead of raising.
        """
        qi = self.queue_index if queue_index is None else queue_index
        deadline = None if timeout is None else time.monotonic() + timeout
        pending = list(task_ids)
        while pending:
            wait = self._wait_step if deadline is None else min(self._wait_step, max(deadline - time.monotonic(), 0))
            still = []
            for start in range(0, len(pending), LOOKUP_CHUNK):
                chunk = pending[start:start + LOOKUP_CHUNK]
                infos = self._wait_infos(chunk, qi, wait if start == 0 else 0)
                for tid, info in zip(chunk, infos, strict=True):
                    if info is None:
                        raise InvalidTaskError(f"task {tid} is unknown (never pushed, or its record expired)")
                    if info["state"] in FINAL_STATES:
                        try:
                            yield tid, self._value(info)
                        except TaskFailedError as exc:
                            yield tid, exc
                    else:
                        still.append(tid)
            pending = still
            if pending and deadline is not None and time.monotonic() >= deadline:
                raise ResultTimeoutError(f"{len(pending)} task(s) still unfinished after {timeout:g}s")

    def _wait_infos(self, task_ids: list[str], queue_index: int, wait: float) -> list[dict[str, Any] | None]:
        """wait_tasks, in halves while the records are more than one reply carries (large results)."""
        try:
            return list(self.call("wait_tasks", task_ids, queue_index, wait))
        except MessageTooLargeError:
            if len(task_ids) == 1:
                raise
            half = len(task_ids) // 2
            return self._wait_infos(task_ids[:half], queue_index, wait) + self._wait_infos(task_ids[half:],
                                                                                           queue_index, 0)

    def close(self) -> None:
        self.call.close()


_default_client: Client | None = None
_default_config: Callable[[], Config] | None = None


def default_client() -> Client:
    """The Client used by ``@task`` functions: configured from ``PPQ_*`` variables (and the file
    ``PPQ_CONFIG`` names), or as :func:`set_default_config` says."""
    global _default_client
    if _default_client is None:
        _default_client = Client(config=_default_config() if _default_config is not None else None)
    return _default_client


def set_default_config(config: Config | Callable[[], Config] | None) -> None:
    """Configure the Client of ``@task`` functions (:func:`default_client`): a Config, or a function
    that builds one when the first push needs it (``ppq.contrib.django`` reads ``settings.PPQ``);
    None goes back to ``PPQ_*`` variables. The next push builds the client anew."""
    global _default_client, _default_config
    if isinstance(config, Config):
        built = config
        config = lambda: built  # noqa: E731
    _default_config = config
    if _default_client is not None:
        _default_client.close()
        _default_client = None


def _step_options(push_options: dict[str, Any]) -> dict[str, Any]:
    """The decorator's push options that apply to a workflow step (not queue_index, key, delay)."""
    return {k: v for k, v in push_options.items() if k not in ("queue_index", "key", "delay", "task_id")}


def task(fn: Callable[..., Any] | None = None, *, client: Client | None = None, rate_limit: str | None = None,
         concurrency_limit: int | None = None, **push_options: Any) -> Any:
    """Decorate a module-level function so that ``fn.push(*args, **kwargs)`` enqueues it
    (``fn.push_with(args, kwargs, **options)`` with other push options too), and
    ``fn.s(*args, **kwargs)`` / ``fn.si(...)`` make it a workflow step (``si``: immutable, it
    ignores the previous step's result).

    ``fn(*args, **kwargs)`` still runs it here. ``push_options`` (queue_index,
    delay, max_retry, key, priority, expires...) apply to every push. ``rate_limit``
    ("10/s") and ``concurrency_limit`` (N) declare its limits: a master stores them at
    start when its module is in ``master.schedule_modules`` (``ppq limit set`` sets them live).
    """

    declare("", rate_limit, concurrency_limit)  # checked before anything else

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        target_name(func)
        if rate_limit is not None or concurrency_limit is not None:
            target = inspect.unwrap(func)
            declare(f"{target.__module__}.{target.__qualname__}", rate_limit, concurrency_limit)

        def push(*args: Any, **kwargs: Any) -> str:
            return (client or default_client()).push(func, *args, kwargs=kwargs, **push_options)

        def push_with(args: Sequence[Any] = (), kwargs: dict[str, Any] | None = None, **options: Any) -> str:
            """``push`` with push options besides the decorator's (``task_id``, ``delay``...), over them."""
            return (client or default_client()).push(func, *args, kwargs=kwargs, **{**push_options, **options})

        def s(*args: Any, **kwargs: Any) -> Signature:
            return Signature(func, args, kwargs, **_step_options(push_options))

        def si(*args: Any, **kwargs: Any) -> Signature:
            return Signature(func, args, kwargs, True, **_step_options(push_options))

        func.push = push  # type: ignore[attr-defined]
        func.push_with = push_with  # type: ignore[attr-defined]
        func.s = s  # type: ignore[attr-defined]
        func.si = si  # type: ignore[attr-defined]
        return func

    return decorate(fn) if fn is not None else decorate
