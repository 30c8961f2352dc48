"""Physical references measured in the same run: what one client can do at best.

- ``redis_loop``: raw redis-py RPUSH then LPOP, one client, one call per op.
- ``pyro_echo``: raw Pyro5 calls of a trivial ``echo`` method on a daemon running
  in a subprocess (``python bench/refs.py echo-server PORT``), one proxy, per
  serializer.

No ppq code is involved: these bound what a Redis-backed queue (one round trip
per push) and a Pyro5-fronted queue (one RPC per push) can reach on this machine.
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
if str(BENCH_DIR) not in sys.path:
    sys.path.insert(0, str(BENCH_DIR))

from peers.base import bench_env, free_port, spawn, stop_procs  # noqa: E402

REF_KEY = "bench:ref"
# Seconds the echo server gets to come up.
ECHO_START_TIMEOUT = 20.0


def redis_loop(redis_url: str, n: int, samples: int = 100) -> dict[str, float]:
    """ops/s of RPUSH (n calls) and then LPOP (n calls), one connection; then the
    round trip of a PING sent after an idle gap (``samples`` of them)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    r.delete(REF_KEY)
    rpush, lpop = r.rpush, r.lpop
    t0 = time.perf_counter()
    for i in range(n):
        rpush(REF_KEY, i)
    t1 = time.perf_counter()
    for _ in range(n):
        lpop(REF_KEY)
    t2 = time.perf_counter()
    r.delete(REF_KEY)
    idle = idle_round_trips(r.ping, samples)
    r.close()
    return {"rpush_per_s": n / (t1 - t0), "lpop_per_s": n / (t2 - t1), "redis_idle_rt_ms": idle}


def idle_round_trips(call: Any, samples: int) -> float:
    """Median ms of one ``call()`` made 20-80 ms after the last, as the latency phase spaces its
    pushes: on an idle machine every process woken for it starts cold, which a tight loop hides."""
    times = []
    for _ in range(samples):
        time.sleep(random.uniform(0.02, 0.08))
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def pyro_echo(n: int, log_dir: Path, serializers: tuple[str, ...] = ("marshal", "msgpack"),
              samples: int = 100) -> dict[str, float]:
    """calls/s of ``echo(i)`` through one proxy, for each serializer; then the round
    trip of an echo sent after an idle gap (marshal, ``samples`` of them)."""
    import Pyro5.api

    port = free_port()
    server = spawn([sys.executable, str(Path(__file__).resolve()), "echo-server", str(port)],
                   bench_env("redis://unused"), log_dir / "pyro-echo-server.log")
    out: dict[str, float] = {}
    try:
        uri = f"PYRO:echo@127.0.0.1:{port}"
        deadline = time.monotonic() + ECHO_START_TIMEOUT
        while True:
            try:
                with Pyro5.api.Proxy(uri) as probe:
                    probe._pyroBind()
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("Pyro5 echo server did not start: see pyro-echo-server.log") from None
                time.sleep(0.05)
        for ser in serializers:
            with Pyro5.api.Proxy(uri) as proxy:
                proxy._pyroSerializer = ser
                proxy._pyroTimeout = 10
                proxy.echo(0)  # connect, and fetch metadata, before the clock
                echo = proxy.echo
                t0 = time.perf_counter()
                for i in range(n):
                    echo(i)
                out[f"{ser}_per_s"] = n / (time.perf_counter() - t0)
                if ser == "marshal":
                    out["pyro_idle_rt_ms"] = idle_round_trips(lambda echo=echo: echo(0), samples)
    finally:
        stop_procs([server], grace=2.0)
    return out


def serve_echo(port: int) -> None:
    import Pyro5.api

    class Echo:
        @Pyro5.api.expose
        def echo(self, value: Any) -> Any:
            return value

    daemon = Pyro5.api.Daemon(host="127.0.0.1", port=port)
    daemon.register(Echo(), "echo")
    daemon.requestLoop()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "echo-server":
        serve_echo(int(sys.argv[2]))
    else:
        sys.exit("usage: refs.py echo-server PORT")
