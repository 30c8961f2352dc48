"""``AsyncClient``: :class:`~ppq.client.Client` for asyncio code (FastAPI, Starlette, aiohttp...).

Every method of Client is here as a coroutine with the same arguments and the same errors.
The calls themselves are Client's, over :class:`~ppq.rpc.PyroFunc` (so the same failover
between masters, retries, tokens, TLS and ``PYRONAME:`` addresses), made in a bounded
pool of threads: the event loop never blocks on the network. ``bench/aio.py`` compares
this with Pyro5 calls made on the loop itself; its README has the figures.

Waiting for results takes no thread per waiter: the ids awaited in one queue_index are
asked for together, with ``wait_tasks`` (the master holds the call until one of them
ends), in at most :data:`DEFAULT_WAIT_CALLS` calls at once, made in threads of their own
so that pushes never wait behind them; an id awaited while those are all held joins
the next one.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .client import LOOKUP_CHUNK, Client
from .config import Config
from .errors import InvalidTaskError, ResultTimeoutError, TaskFailedError
from .task import DONE, FINAL_STATES
from .workflow import Node

log = logging.getLogger("ppq.aio")

__all__ = ["DEFAULT_THREADS", "DEFAULT_WAIT_CALLS", "AsyncClient"]

# Threads that make an AsyncClient's calls but wait_tasks: as many such calls are in flight at once.
# More threads do not push faster (the master's round trip sets the pace) but contend for the GIL
# with the event loop: bench/aio.py measured its lag at 1,000 pushes at once with 8 and 32.
DEFAULT_THREADS = 8
# wait_tasks calls held at once, in threads of their own, while results are awaited.
DEFAULT_WAIT_CALLS = 4
# Longest a master holds one wait_tasks call, in seconds: an id awaited while every call is
# held waits at most this long to be asked for.
_HOLD = 2.0


class _Waiter:
    """The results awaited in one queue_index: futures per task id, asked for in shared wait_tasks calls."""

    def __init__(self, owner: AsyncClient, queue_index: int) -> None:
        self.owner = owner
        self.queue_index = queue_index
        self.futures: dict[str, list[asyncio.Future[dict[str, Any]]]] = {}
        self.unasked: dict[str, None] = {}  # ordered: the longest waiting first

    def wait(self, task_id: str) -> asyncio.Future[dict[str, Any]]:
        """A future of the task's final record (or the error of asking for it)."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        if task_id not in self.futures:
            self.futures[task_id] = []
            self.unasked[task_id] = None
        self.futures[task_id].append(future)
        self._ask()
        return future

    def forget(self, task_id: str, future: asyncio.Future[dict[str, Any]]) -> None:
        """No one waits on ``future`` any more (its caller timed out or was cancelled)."""
        waiting = self.futures.get(task_id)
        if waiting is not None and future in waiting:
            waiting.remove(future)
            if not waiting:
                del self.futures[task_id]
                self.unasked.pop(task_id, None)

    def _ask(self) -> None:
        owner = self.owner
        while self.unasked and owner._waiting_calls < owner.wait_calls:
            ids = list(self.unasked)[:LOOKUP_CHUNK]
            for task_id in ids:
                del self.unasked[task_id]
            owner._waiting_calls += 1
            task = asyncio.ensure_future(self._call(ids))
            self.owner._tasks.add(task)
            task.add_done_callback(self.owner._tasks.discard)

    async def _call(self, ids: list[str]) -> None:
        try:
            client = self.owner.client
            hold = min(_HOLD, client._wait_step)
            infos = await asyncio.get_running_loop().run_in_executor(
                self.owner._wait_pool, client._wait_infos, ids, self.queue_index, hold)
        except Exception as exc:  # noqa: BLE001 - the waiters get the error, whatever it is
            for task_id in ids:
                for future in self.futures.pop(task_id, []):
                    if not future.done():
                        future.set_exception(exc)
        except BaseException:
            for task_id in ids:
                for future in self.futures.pop(task_id, []):
                    future.cancel()
            raise
        else:
            for task_id, info in zip(ids, infos, strict=True):
                if task_id not in self.futures:
                    continue  # no one waits for it any more
                if info is None:
                    error = InvalidTaskError(f"task {task_id} is unknown (never pushed, or its record expired)")
                    for future in self.futures.pop(task_id):
                        if not future.done():
                            future.set_exception(error)
                elif info["state"] in FINAL_STATES:
                    for future in self.futures.pop(task_id):
                        if not future.done():
                            future.set_result(info)
                else:
                    self.unasked[task_id] = None
        finally:
            self.owner._waiting_calls -= 1
            for waiter in [self, *self.owner._waiters.values()]:
                waiter._ask()


class AsyncClient:
    """Push tasks and await their results from asyncio code; the methods of :class:`Client`, awaitable.

    The arguments are Client's (``masters``, ``config``, ``token``, ``retry``, ``timeout``,
    ``allow_pickle``, ``queue_index``), plus ``threads``, the most calls in flight at once (more
    wait for a free thread), and ``wait_calls``, the most ``wait_tasks`` calls held at once for
    awaited results, each in a thread of its own. Use it as ``async with AsyncClient(...) as client:`` or
    call :meth:`close` (awaitable) at the end; one client serves a whole application,
    from the one event loop it is first awaited in.
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
        threads: int = DEFAULT_THREADS,
        wait_calls: int = DEFAULT_WAIT_CALLS,
    ) -> None:
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise ValueError(f"threads: expected an integer of at least 1, got {threads!r}")
        if not isinstance(wait_calls, int) or isinstance(wait_calls, bool) or wait_calls < 1:
            raise ValueError(f"wait_calls: expected an integer of at least 1, got {wait_calls!r}")
        self.client = Client(masters, config=config, token=token, retry=retry, timeout=timeout,
                             allow_pickle=allow_pickle, queue_index=queue_index)
        self.queue_index = queue_index
        self.wait_calls = wait_calls
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="ppq-aio")
        self._wait_pool = ThreadPoolExecutor(wait_calls, thread_name_prefix="ppq-aio-wait")
        self._waiting_calls = 0
        self._waiters: dict[int, _Waiter] = {}
        self._tasks: set[asyncio.Future[Any]] = set()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` in one of the client's threads."""
        return await asyncio.get_running_loop().run_in_executor(self._pool, functools.partial(fn, *args, **kwargs))

    # -- pushing --

    async def push(self, target: str | Callable[..., Any] | Node, *args: Any, kwargs: dict[str, Any] | None = None,
                   **options: Any) -> str:
        """Push ``target(*args, **kwargs)`` (or a workflow); return its id. As :meth:`Client.push`."""
        return str(await self._run(self.client.push, target, *args, kwargs=kwargs, **options))

    async def push_many(self, tasks: Iterable[Any], chunk: int | None = None, **options: Any) -> list[str]:
        """Push many tasks in few round trips; return their ids. As :meth:`Client.push_many`
        (``tasks`` is read in a thread of the client: a generator there must not need the loop)."""
        if chunk is None:
            return list(await self._run(self.client.push_many, tasks, **options))
        return list(await self._run(self.client.push_many, tasks, chunk, **options))

    # -- results --

    async def result(self, task_id: str, timeout: float | None = None, queue_index: int | None = None) -> Any:
        """Wait for the task to end and return its result; TaskFailedError if it failed, ResultTimeoutError
        after ``timeout`` seconds (None: for ever). As :meth:`Client.result`, holding no thread meanwhile."""
        qi = self.queue_index if queue_index is None else queue_index
        info = await self._final(task_id, qi, timeout)
        return await self._value(info)

    async def results(self, task_ids: Sequence[str], timeout: float | None = None,
                      queue_index: int | None = None) -> AsyncIterator[tuple[str, Any]]:
        """Yield ``(task_id, result)`` as tasks end, in the order they end; a failed task's result is its
        TaskFailedError. ResultTimeoutError if some are still unfinished after ``timeout`` seconds."""
        qi = self.queue_index if queue_index is None else queue_index
        waiter = self._waiter(qi)
        futures = {waiter.wait(task_id): task_id for task_id in task_ids}
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        pending = set(futures)
        try:
            while pending:
                left = None if deadline is None else max(0.0, deadline - loop.time())
                done, pending = await asyncio.wait(pending, timeout=left, return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    raise ResultTimeoutError(f"{len(pending)} task(s) still unfinished after {timeout:g}s")
                for future in done:
                    info = future.result()
                    try:
                        yield futures[future], await self._value(info)
                    except TaskFailedError as exc:
                        yield futures[future], exc
        finally:
            for future in pending:
                waiter.forget(futures[future], future)

    async def _final(self, task_id: str, queue_index: int, timeout: float | None) -> dict[str, Any]:
        waiter = self._waiter(queue_index)
        future = waiter.wait(task_id)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except asyncio.TimeoutError:
            raise ResultTimeoutError(f"task {task_id} is still unfinished after {timeout:g}s") from None
        finally:
            if not future.done():
                waiter.forget(task_id, future)

    async def _value(self, info: dict[str, Any]) -> Any:
        if info["state"] == DONE and info.get("result_pickled") is None:
            return info.get("result")
        # Decoding a pickled result, or reading a workflow's failed step, may take a while or a call.
        return await self._run(self.client._value, info)

    def _waiter(self, queue_index: int) -> _Waiter:
        waiter = self._waiters.get(queue_index)
        if waiter is None:
            waiter = self._waiters[queue_index] = _Waiter(self, queue_index)
        return waiter

    # -- the other calls of Client --

    async def info(self, task_id: str, queue_index: int | None = None) -> dict[str, Any] | None:
        """The task's record, or None if it is unknown."""
        return await self._run(self.client.info, task_id, queue_index)

    async def cancel(self, task_id: str, queue_index: int | None = None) -> str | None:
        """Cancel a task; return the state it was in (None if unknown). As :meth:`Client.cancel`."""
        return await self._run(self.client.cancel, task_id, queue_index)

    async def server_info(self) -> dict[int, dict[str, Any]]:
        return await self._run(self.client.server_info)

    async def purge_queue(self, queue_index: int | None = None,
                          progress: Callable[[int, int], None] | None = None) -> int:
        """As :meth:`Client.purge_queue`; ``progress`` is called in a thread of the client."""
        return int(await self._run(self.client.purge_queue, queue_index, progress))

    async def pause_queue(self, queue_index: int | None = None) -> bool:
        return bool(await self._run(self.client.pause_queue, queue_index))

    async def resume_queue(self, queue_index: int | None = None) -> bool:
        return bool(await self._run(self.client.resume_queue, queue_index))

    async def pause_worker(self, worker_id: str, queue_index: int | None = None) -> list[int]:
        return list(await self._run(self.client.pause_worker, worker_id, queue_index))

    async def resume_worker(self, worker_id: str, queue_index: int | None = None) -> list[int]:
        return list(await self._run(self.client.resume_worker, worker_id, queue_index))

    async def schedules(self, queue_index: int | None = None) -> list[dict[str, Any]]:
        return list(await self._run(self.client.schedules, queue_index))

    async def add_schedule(self, name: str, task: str | Callable[..., Any], **options: Any) -> dict[str, Any]:
        """As :meth:`Client.add_schedule` (``cron=`` or ``every=``, args, kwargs...)."""
        return await self._run(self.client.add_schedule, name, task, **options)

    async def remove_schedule(self, name: str, queue_index: int | None = None) -> list[int]:
        return list(await self._run(self.client.remove_schedule, name, queue_index))

    async def pause_schedule(self, name: str, queue_index: int | None = None) -> list[int]:
        return list(await self._run(self.client.pause_schedule, name, queue_index))

    async def resume_schedule(self, name: str, queue_index: int | None = None) -> list[int]:
        return list(await self._run(self.client.resume_schedule, name, queue_index))

    async def run_schedule_now(self, name: str, queue_index: int | None = None) -> str:
        return str(await self._run(self.client.run_schedule_now, name, queue_index))

    async def limits(self) -> dict[int, list[dict[str, Any]]]:
        return await self._run(self.client.limits)

    async def set_limit(self, function: str, rate: str | None = None, concurrency: int | None = None,
                        queue_index: int | None = None) -> list[int]:
        return list(await self._run(self.client.set_limit, function, rate, concurrency, queue_index))

    async def remove_limit(self, function: str, kind: str | None = None, queue_index: int | None = None) -> list[int]:
        return list(await self._run(self.client.remove_limit, function, kind, queue_index))

    async def close(self) -> None:
        """Stop waiting (awaited results get CancelledError) and let the threads go: each ends, and
        its connections close, once its call in flight has returned (a held wait_tasks within 2 s)."""
        for task in list(self._tasks):
            task.cancel()
        for waiter in self._waiters.values():
            for futures in waiter.futures.values():
                for future in futures:
                    future.cancel()
        self._waiters.clear()
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._wait_pool.shutdown(wait=False, cancel_futures=True)
        self.client.close()
