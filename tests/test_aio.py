"""ppq.aio.AsyncClient from a real ASGI app (Starlette, driven by its TestClient) against real masters and workers."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from ppq import InvalidTaskError, ResultTimeoutError, TaskFailedError, group
from ppq.aio import AsyncClient
from ppq.config import load_config

from .conftest import address_of, worker_entry


def make_app(masters: list[str]) -> Starlette:
    """An app with one AsyncClient, made at start-up and closed at shutdown."""
    state: dict[str, AsyncClient] = {}

    async def push(request: Request) -> JSONResponse:
        body = await request.json()
        task_id = await state["ppq"].push(body["task"], *body.get("args", []), **body.get("options", {}))
        return JSONResponse({"id": task_id})

    async def result(request: Request) -> JSONResponse:
        try:
            value = await state["ppq"].result(request.path_params["task_id"], timeout=30)
        except TaskFailedError as exc:
            return JSONResponse({"error": exc.type}, status_code=500)
        return JSONResponse({"result": value})

    async def call(request: Request) -> JSONResponse:
        """Push, then await the result, while a 1 ms ticker on the same loop measures how late it runs."""
        body = await request.json()
        lateness: list[float] = []
        done = asyncio.Event()

        async def ticker() -> None:
            loop = asyncio.get_running_loop()
            while not done.is_set():
                before = loop.time()
                await asyncio.sleep(0.001)
                lateness.append(loop.time() - before - 0.001)

        tick = asyncio.ensure_future(ticker())
        client = state["ppq"]
        started = time.monotonic()
        value = await client.result(await client.push(body["task"], *body["args"]), timeout=30)
        took = time.monotonic() - started
        done.set()
        await tick
        lateness.sort()
        return JSONResponse({"result": value, "took": took, "ticks": len(lateness), "max_lag": lateness[-1],
                             "p99_lag": lateness[int(len(lateness) * 0.99)]})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with AsyncClient(masters, config=load_config(environ={}), retry=2, timeout=5) as client:
            state["ppq"] = client
            yield

    return Starlette(routes=[Route("/push", push, methods=["POST"]), Route("/result/{task_id}", result),
                             Route("/call", call, methods=["POST"])], lifespan=lifespan)


@pytest.fixture
def stack(spawn, redis_a, ra) -> Iterator[dict[str, Any]]:
    """Two `ppq master` processes on one Redis and a worker pulling from both. A task the first
    master had leased to the worker when it was killed, in a reply the worker never got, runs
    again once its lease expires: 5 s here, and the reaper looks every 0.2 s."""
    args, env = ("--lease-timeout", "5"), {"PPQ_MASTER_REAPER_INTERVAL": "0.2"}
    first, first_address = spawn.master(redis_a.url, *args, env=env)
    second, second_address = spawn.master(redis_a.url, *args, env=env)
    worker = spawn.worker(first_address, second_address, concurrency=2)
    yield {"masters": [first, second], "addresses": [first_address, second_address], "worker": worker}


def test_asgi_app_pushes_and_awaits_results(master, spawn):
    worker = spawn.worker(address_of(master), concurrency=2)
    from ppq.rpc import PyroFunc

    call = PyroFunc(master.uri)
    worker_entry(call, worker.pid)
    call.close()
    with TestClient(make_app([address_of(master)])) as http:
        ids = [http.post("/push", json={"task": "tasks.add", "args": [i, i]}).json()["id"] for i in range(5)]
        assert [http.get(f"/result/{task_id}").json() for task_id in ids] == [{"result": 2 * i} for i in range(5)]
        failing = http.post("/push", json={"task": "tasks.boom", "args": ["no"], "options": {"max_retry": 0}})
        response = http.get(f"/result/{failing.json()['id']}")
        assert response.status_code == 500 and response.json() == {"error": "ValueError"}


def test_many_concurrent_pushes_and_results_from_one_loop(master, spawn):
    """200 pushes and 200 awaited results at once, with a workflow and the other calls, on one loop."""
    worker = spawn.worker(address_of(master), concurrency=2)

    async def main() -> None:
        async with AsyncClient([address_of(master)], config=load_config(environ={}), threads=8) as client:
            ids = await asyncio.gather(*(client.push("tasks.add", i, 1) for i in range(200)))
            assert len(set(ids)) == 200
            values = await asyncio.gather(*(client.result(task_id, timeout=60) for task_id in ids))
            assert values == [i + 1 for i in range(200)]
            more = await client.push_many([("tasks.times_ten", (i,)) for i in range(20)])
            ended = {task_id: value async for task_id, value in client.results(more, timeout=60)}
            assert ended == {task_id: 10 * i for i, task_id in enumerate(more)}
            flow = await client.push(group([("tasks.add", (1, 2)), ("tasks.mul", (3, 4))]))
            assert await client.result(flow, timeout=60) == [3, 12]
            slow = await client.push("tasks.sleep_then", 5, "late")
            with pytest.raises(ResultTimeoutError):
                await client.result(slow, timeout=0.3)
            assert (await client.info(slow))["state"] in ("queued", "running")
            assert await client.cancel(slow) in ("queued", "running")
            info = await client.server_info()
            assert info[0]["pushed"] >= 223
            assert any(w["pid"] == worker.pid for w in info[0]["workers"])
            unknown = "0" * 32
            with pytest.raises(InvalidTaskError, match="unknown"):
                await client.result(unknown, timeout=5)

    asyncio.run(main())


def test_loop_lag_stays_low_while_a_result_is_awaited(master, spawn):
    worker = spawn.worker(address_of(master), concurrency=1)
    from ppq.rpc import PyroFunc

    call = PyroFunc(master.uri)
    worker_entry(call, worker.pid)
    call.close()
    with TestClient(make_app([address_of(master)])) as http:
        reply = http.post("/call", json={"task": "tasks.sleep_then", "args": [1.5, "slept"]}).json()
    assert reply["result"] == "slept" and reply["took"] >= 1.5
    # The loop ran its 1 ms ticker all along (a blocking wait would have stopped it for 1.5 s).
    assert reply["ticks"] > 300, reply
    assert reply["max_lag"] < 0.25 and reply["p99_lag"] < 0.05, reply


def test_failover_to_a_second_master(stack):
    first, second = stack["masters"]
    with TestClient(make_app(stack["addresses"])) as http:
        def roundtrip(i: int) -> Any:
            task_id = http.post("/push", json={"task": "tasks.add", "args": [i, 100]}).json()["id"]
            return http.get(f"/result/{task_id}").json()["result"]

        assert [roundtrip(i) for i in range(6)] == [i + 100 for i in range(6)]
        # A result awaited while its master dies is read from the other one.
        task_id = http.post("/push", json={"task": "tasks.sleep_then", "args": [1.0, "survived"]}).json()["id"]
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert http.get(f"/result/{task_id}").json() == {"result": "survived"}
        assert [roundtrip(i) for i in range(6)] == [i + 100 for i in range(6)]
    assert second.poll() is None


def test_bad_arguments_are_named(master):
    with pytest.raises(ValueError, match="threads"):
        AsyncClient([address_of(master)], threads=0)
    with pytest.raises(ValueError, match="wait_calls"):
        AsyncClient([address_of(master)], wait_calls=0)

    async def main() -> None:
        async with AsyncClient([address_of(master)], config=load_config(environ={})) as client:
            with pytest.raises(InvalidTaskError, match="priority"):
                await client.push("tasks.add", 1, 2, priority=99)

    asyncio.run(main())
