#!/usr/bin/env python
"""The dashboard's pages on a big system: how long each takes to serve.

    python bench/dashboard.py [--tasks 1000000] [--workers 100] [--requests 20]

On a fresh redis-server: a ``ppq master`` serving queue_index 0 and 1, ``--tasks`` tasks
pushed to queue_index 0 with ``Client.push_many`` (no worker runs them: they stay queued),
a thousand delayed and a thousand dead ones beside them (dead: pushed to a function that
does not exist, with no retry, run by one real worker that allows only that module), and
``--workers`` light worker agents connected to queue_index 1 (tests/fake_agents.py: each
makes an agent's real calls, heartbeat and the long-poll ``report``). Then ``ppq dashboard``
starts, and each page is fetched ``--requests`` times over one keep-alive connection, one
after the other: median, p95 and the slowest, in ms, from sending the request to the last
byte of the reply (over loopback: the server's time plus well under a millisecond).

Prints a table; the goal is every page under 200 ms. The run takes about 2-3 minutes on
2 cores, most of it the push.
"""

from __future__ import annotations

import argparse
import http.client
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ppq import Client  # noqa: E402
from ppq.embedded import RedisServer, free_port  # noqa: E402

GOAL_MS = 200.0


def ppq_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PPQ_")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), str(REPO / "tests"), env.get("PYTHONPATH", "")) if p)
    return env


def start(cmd: list[str], log: Path, **kwargs: object) -> subprocess.Popen[bytes]:
    out = open(log, "wb")  # noqa: SIM115 - closed with the process, at exit
    return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=ppq_env(), cwd=str(REPO),
                            **kwargs)  # type: ignore[call-overload]


def wait(what: str, check: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():  # type: ignore[operator]
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)


def fetch(conn: http.client.HTTPConnection, path: str) -> tuple[float, int, int]:
    t = time.perf_counter()
    conn.request("GET", path, headers={"Accept": "text/html"})
    response = conn.getresponse()
    body = response.read()
    return (time.perf_counter() - t) * 1000, response.status, len(body)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=100)
    parser.add_argument("--requests", type=int, default=20)
    args = parser.parse_args(argv)
    py = sys.executable
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="ppq-bench-dashboard-") as tmp_dir:
        tmp = Path(tmp_dir)
        redis = RedisServer(str(tmp / "redis"), appendonly=False).start()
        agents = None
        try:
            port = free_port()
            address = f"127.0.0.1:{port}"
            procs.append(start([py, "-m", "ppq", "--log-level", "WARNING", "master", "--port", str(port),
                                "--redis-map", f"0={redis.url}", "--redis-map",
                                f"1={redis.url.rsplit('/', 1)[0]}/1"], tmp / "master.log"))
            client = Client([address], retry=1, timeout=120)
            wait("the master", client.server_info)
            t = time.perf_counter()
            client.push_many(("tasks.add", (i, i)) for i in range(args.tasks))
            push_s = time.perf_counter() - t
            client.push_many((("tasks.add", (i, i)) for i in range(1000)), delay=3600)
            # Dead tasks: a module only this worker allows, whose function does not exist.
            client.push_many((("redteam_tasks.nothing_here", (i,)) for i in range(1000)), max_retry=0,
                             queue_index=1)
            worker = start([py, "-m", "ppq", "--log-level", "WARNING", "worker", "--master-hosts", address,
                            "--queue-index", "1", "--allow", "redteam_tasks", "--concurrency", "4", "--port", "0"],
                           tmp / "worker.log")
            procs.append(worker)
            wait("the dead tasks", lambda: client.server_info()[1]["dead"] >= 1000, timeout=120)
            worker.terminate()
            worker.wait(30)
            agents = subprocess.Popen([py, str(REPO / "tests" / "fake_agents.py"), address, str(args.workers),
                                       "--queue-index", "1", "--wait", "2"], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=open(tmp / "agents.log", "wb"),  # noqa: SIM115
                                      env=ppq_env(), text=True)
            ready = (agents.stdout.readline() if agents.stdout else "").split()
            if not ready or ready[0] != "READY":
                raise SystemExit(f"the fake agents did not start: {ready}")
            info = client.server_info()
            dash_port = free_port()
            procs.append(start([py, "-m", "ppq", "--log-level", "WARNING", "dashboard", "-m", address,
                                "--port", str(dash_port)], tmp / "dashboard.log"))
            wait("the dashboard", lambda: fetch(http.client.HTTPConnection("127.0.0.1", dash_port, timeout=5),
                                                "/static/dashboard.css")[1] == 200)
            conn = http.client.HTTPConnection("127.0.0.1", dash_port, timeout=30)
            some = client.call("list_tasks", "queued", 0, 1, args.tasks // 2)["tasks"][0]["id"]
            pages = ["/", "/api/overview", "/workers", "/api/workers?page=4", "/tasks?q=0",
                     f"/tasks?q=0&offset={args.tasks // 2}", f"/tasks?q=0&offset={args.tasks - 50}",
                     "/tasks?q=0&func=tasks.mul", "/tasks?q=0&state=delayed", "/tasks?q=1&state=dead",
                     f"/tasks/0/{some}", "/dead/1", "/dead/1?page=10", "/schedules", "/limits", "/workflows"]
            rows = []
            for path in pages:
                fetch(conn, path)  # warm: the first read of a page
                times: list[float] = []
                statuses: set[int] = set()
                for _ in range(args.requests):
                    ms, status, size = fetch(conn, path)
                    times.append(ms)
                    statuses.add(status)
                times.sort()
                p95 = times[min(len(times) - 1, int(0.95 * len(times)))]
                codes = ",".join(map(str, sorted(statuses)))
                rows.append((path, statistics.median(times), p95, times[-1], codes, size))
            print(f"# {info[0]['queued']:,} queued and {info[0]['delayed']:,} delayed in queue_index 0, "
                  f"{info[1]['dead']:,} dead and {info[1]['workers_live']} live workers in queue_index 1 "
                  f"(pushed in {push_s:.0f} s); {args.requests} requests per page")
            print("| page | median ms | p95 ms | max ms | status | bytes |\n|---|---|---|---|---|---|")
            for path, median, p95, top, codes, size in rows:
                flag = "" if p95 < GOAL_MS else " (over the goal)"
                print(f"| `{path[:60]}` | {median:.1f} | {p95:.1f}{flag} | {top:.1f} | "
                      f"{codes} | {size:,} |")
            return 0 if all(r[2] < GOAL_MS and r[4] == "200" for r in rows) else 1
        finally:
            if agents is not None:
                if agents.stdin:
                    agents.stdin.close()
                try:
                    agents.wait(40)
                except subprocess.TimeoutExpired:
                    agents.kill()
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
            redis.stop()


if __name__ == "__main__":
    sys.exit(main())
