"""Soak test: a whole ppq stack under continuous load and random SIGKILLs, then a count.

    python bench/soak.py --seconds 60 [--workers 3] [--masters 2] [--rate 200]
    python bench/soak.py --sentinel --seconds 600 --kill-every 0.3 --failover-every 20

Starts its own redis-server (AOF on, ``appendfsync everysec`` as the embedded
default), ``--masters`` ``ppq master`` processes on that Redis and ``--workers``
``ppq worker`` processes connected to all of them, all as subprocesses. Pusher
threads push ``soak.record(log, token)`` tasks at ``--rate`` tasks/s through
``ppq.Client`` (fail-over between masters); the task appends its token to an
execution log, then works ``--task-seconds``. Every ``--kill-every`` seconds on
average (kill times drawn ahead, so a slow kill does not slow the rate) a random
worker (with its executors) or master that has been up for ``--min-age`` seconds
(its log says so) is killed with SIGKILL, and its replacement started without
waiting for it. Master 0 is never killed, so its RSS tells whether a master's
memory grows with the tasks it serves. This process is the subreaper of what it
starts: the orphans of a killed worker are reaped here, not left as zombies.

With ``--sentinel`` the Redis is a primary, ``--replicas`` replicas and three
sentinels (quorum 2), real redis-server processes without persistence
(tests/redis_topology.py); the masters reach it through a ``redis+sentinel://``
URL with ``redis.wait_replicas`` = ``--wait-replicas`` (default: every replica).
Every ``--failover-every`` seconds the primary the sentinels name is SIGKILLed;
once they have promoted a replica, the killed server starts again, empty, as a
replica of the new primary, and the next failover waits until every replica is
in sync.

A line of progress every ``--progress-every`` seconds. After ``--seconds`` the
pushers stop, the kills and failovers stop, and the queue drains (``--drain``
seconds at most). Then it prints:

- kills of workers and masters; with --sentinel the failovers, how long the
  promotions took, and the primary changes the sentinels logged;
- pushed: pushes acknowledged with an id; push failures (not acknowledged);
- done / dead: acknowledged tasks in those final states;
- lost: acknowledged tasks not finished after the drain (the at-least-once
  promise says 0);
- executions, duplicated executions (runs beyond the first; expected after
  kills: at-least-once, not exactly-once), tasks done but never run;
- the master's done counter (a task counted done twice would show here);
- RSS of master 0 at start (after a warm-up), at the end of the load and its
  peak under load (then once more after the drain, whose large
  get_tasks_info replies are not part of the steady state).

This file is also the task module the workers import (``soak.record``).
Exit status 1 if any acknowledged task was lost or never ran.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent


def record(path: str, token: str, seconds: float = 0.0) -> str:
    """The task: append ``token`` to the execution log (one line per run), then work ``seconds``."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{token}\n")
    if seconds:
        time.sleep(seconds)
    return token


# -- the stack ------------------------------------------------------------------------


class Proc:
    """A master or worker process the soak started (and may kill): its Popen, its log, the
    line that log shows once the process is up, and its port (a master's)."""

    def __init__(self, popen: subprocess.Popen[bytes], log: Path, mark: str, port: int = 0) -> None:
        self.popen = popen
        self.log = log
        self.mark = mark.encode()
        self.port = port
        self.spawned = time.time()
        self.up_since: float | None = None  # time.time() of the mark, once seen

    def up_for(self) -> float:
        """Seconds since the process logged that it is up (-1: not yet)."""
        if self.up_since is None:
            try:
                with open(self.log, "rb") as f:
                    head = f.read(65536)
            except OSError:
                return -1.0
            at = head.find(self.mark)
            if at < 0:
                return -1.0
            line = head[head.rfind(b"\n", 0, at) + 1:at]
            try:
                self.up_since = datetime.datetime.strptime(line[:23].decode(), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                self.up_since = time.time()
        return time.time() - self.up_since


class Stack:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        from ppq.embedded import RedisServer

        self.args = args
        self.workdir = workdir
        self.redis = None if args.sentinel else RedisServer(str(workdir / "redis"), appendonly=True,
                                                             appendfsync=args.appendfsync)
        self.sentinel: Sentinel | None = Sentinel(args, workdir / "redis") if args.sentinel else None
        self.masters: list[Proc] = []
        self.workers: list[Proc] = []
        self.count = 0
        self.kills: collections.Counter[str] = collections.Counter()
        self.skipped = 0  # kill times at which no process of the kind drawn had been up --min-age
        self.exited: collections.Counter[str] = collections.Counter()  # processes that died unkilled
        self.lives: dict[str, list[tuple[float, float]]] = {"master": [], "worker": []}  # (start-up, up) s
        self.reaped = 0  # orphans (a killed worker's executors...) reaped or killed here

    @property
    def redis_url(self) -> str:
        return self.sentinel.url if self.sentinel else self.redis.url

    def env(self, master: bool = False) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PPQ_")}
        env["PYTHONPATH"] = os.pathsep.join([str(BENCH), str(REPO), env.get("PYTHONPATH", "")])
        env["PPQ_MASTER_REAPER_INTERVAL"] = "0.2"
        # Thousands of processes start: each reads ppq's bytecode, compiled once into the work directory.
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(self.workdir / "pycache")
        if self.args.result_ttl:
            env["PPQ_MASTER_RESULT_TTL"] = str(self.args.result_ttl)
        if master and self.sentinel:
            env["PPQ_REDIS_WAIT_REPLICAS"] = str(self.args.wait_replicas)
            env["PPQ_REDIS_WAIT_TIMEOUT"] = str(self.args.wait_timeout)
            env["PPQ_MASTER_REDIS_TIMEOUT"] = "1.0"
        return env

    def _spawn(self, name: str, mark: str, *argv: str, port: int = 0) -> Proc:
        self.count += 1
        path = self.workdir / f"{name}-{self.count}.log"
        with open(path, "wb") as out:
            popen = subprocess.Popen([sys.executable, "-m", "ppq", *argv], stdout=out, stderr=subprocess.STDOUT,
                                     env=self.env(master=name == "master"), cwd=str(BENCH))
        return Proc(popen, path, mark, port)

    @property
    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{m.port}" for m in self.masters]

    def start_master(self, port: int, wait: bool = True) -> Proc:
        """A ``ppq master`` on ``port``; with ``wait``, once it answers a ping (a replacement
        is not waited for: clients and workers use the other masters meanwhile)."""
        from ppq.rpc import PyroFunc

        proc = self._spawn("master", "master ready:", "master", "--port", str(port), "--redis-map",
                           f"0={self.redis_url}", "--lease-timeout", str(self.args.lease_timeout), port=port)
        if not wait:
            return proc
        ping = PyroFunc(f"127.0.0.1:{port}", timeout=2, default_return=None)
        deadline = time.monotonic() + 30
        try:
            while ping("ping") != "pong":
                if proc.popen.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit(f"master on port {port} did not start; see {self.workdir}")
                time.sleep(0.05)
        finally:
            ping.close()
        return proc

    def start_worker(self) -> Proc:
        return self._spawn("worker", " executor processes on queue_index ", "worker", "--master-hosts",
                           ",".join(self.addresses), "--port", "0", "--concurrency", str(self.args.concurrency),
                           "--allow", "soak", "--max-sleep", "1", "--heartbeat-interval", "0.5")

    def start(self) -> None:
        from ppq.embedded import free_port

        if self.sentinel:
            self.sentinel.start()
        else:
            self.redis.start()
        for _ in range(self.args.masters):
            self.masters.append(self.start_master(free_port()))
        self.workers = [self.start_worker() for _ in range(self.args.workers)]

    def kill_random(self, rng: random.Random) -> str | None:
        """SIGKILL a random worker (with its executors) or master (never master 0) that has
        been up (logged so) for ``--min-age`` seconds, and start its replacement without
        waiting for it; None when no process of the kind drawn has been up that long."""
        if len(self.masters) > 1 and rng.random() < self.args.master_kill_share:
            kind, pool, first = "master", self.masters, 1
        else:
            kind, pool, first = "worker", self.workers, 0
        ready = [i for i in range(first, len(pool)) if pool[i].up_for() >= self.args.min_age]
        if not ready:
            self.skipped += 1
            return None
        i = rng.choice(ready)
        kill_tree(pool[i].popen)
        self.kills[kind] += 1
        self.lives[kind].append((pool[i].up_since - pool[i].spawned, time.time() - pool[i].up_since))
        pool[i] = self.start_master(pool[i].port, wait=False) if kind == "master" else self.start_worker()
        return f"{kind} {i}"

    def replace_exited(self) -> None:
        """Start again any master or worker that exited without being killed (and count it)."""
        for kind, pool in (("master", self.masters), ("worker", self.workers)):
            for i, proc in enumerate(pool):
                if proc.popen.poll() is not None:
                    try:
                        refused = b"cannot reach" in proc.log.read_bytes()[-2000:]
                    except OSError:
                        refused = False
                    # A master started while no primary answers refuses to start (it retries nothing).
                    self.exited[f"{kind} (no redis at its start)" if refused else kind] += 1
                    print(f"  {kind} {i} (pid {proc.popen.pid}) exited by itself with code "
                          f"{proc.popen.returncode}; see {self.workdir}", flush=True)
                    pool[i] = self.start_master(proc.port, wait=False) if kind == "master" else self.start_worker()

    def reap(self) -> int:
        """Reap (or kill, then reap) the orphans handed to this process as their subreaper
        (a killed worker's executors, fork server...); return how many children are alive."""
        import psutil

        mine = {p.popen.pid for p in self.masters + self.workers}
        mine |= self.sentinel.pids() if self.sentinel else {self.redis.process.pid} if self.redis.process else set()
        alive = 0
        for child in psutil.Process().children():
            try:
                if child.pid in mine:
                    alive += 1
                    continue
                if child.status() != psutil.STATUS_ZOMBIE:
                    if time.time() - child.create_time() < 5:  # maybe a process still being recorded
                        continue
                    child.kill()
                os.waitpid(child.pid, 0)
                self.reaped += 1
            except (psutil.NoSuchProcess, ChildProcessError):
                pass
        return alive

    def stop(self) -> None:
        for proc in self.workers + self.masters:
            kill_tree(proc.popen)
        if self.sentinel:
            self.sentinel.stop()
        else:
            self.redis.stop()


class Sentinel:
    """A Redis primary, ``--replicas`` replicas and 3 sentinels (quorum 2), real redis-server
    processes with no persistence (tests/redis_topology.py), and the failovers forced on them:
    SIGKILL the primary the sentinels name, wait for them to promote a replica, start the
    killed server again as a replica of the new primary, wait until every replica is in sync."""

    SERVICE = "soak"

    def __init__(self, args: argparse.Namespace, directory: Path) -> None:
        self.args = args
        self.directory = directory
        self.nodes: dict[int, Any] = {}  # port -> Node, the data servers
        self.watchers: list[Any] = []
        self.failovers: list[tuple[float, float]] = []  # (seconds to promotion, seconds to full sync)
        self.failures: list[str] = []
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        from tests.redis_topology import sentinel_group

        primary, replicas, self.watchers = sentinel_group(self.directory, service=self.SERVICE,
                                                          replicas=self.args.replicas, sentinels=3)
        self.nodes = {node.port: node for node in [primary, *replicas]}

    @property
    def url(self) -> str:
        return "redis+sentinel://" + ",".join(f"127.0.0.1:{w.port}" for w in self.watchers) + f"/{self.SERVICE}/0"

    def pids(self) -> set[int]:
        return {n.process.pid for n in [*self.nodes.values(), *self.watchers] if n.process is not None}

    def primary(self) -> int | None:
        from tests.redis_topology import primary_of

        return primary_of(self.watchers, self.SERVICE)

    def start_failovers(self) -> None:
        if self.args.failover_every > 0:
            self.thread.start()

    def stop_failovers(self) -> None:
        """Start no more failovers; wait for one under way to end."""
        self.stop_event.set()
        if self.thread.is_alive():
            self.thread.join(180)

    def _run(self) -> None:
        while not self.stop_event.wait(self.args.failover_every):
            try:
                self.failover()
            except Exception as exc:  # noqa: BLE001 - reported at the end; the soak goes on
                self.failures.append(f"{type(exc).__name__}: {exc}")
                print(f"  failover failed: {type(exc).__name__}: {exc}", flush=True)

    def failover(self) -> None:
        from tests.conftest import wait_for
        from tests.redis_topology import NO_DISK

        old = self.primary()
        if old not in self.nodes:
            raise RuntimeError(f"the sentinels name no known primary ({old})")
        killed_at = time.monotonic()
        self.nodes[old].kill()
        new = None

        def promoted() -> bool:
            nonlocal new
            new = self.primary()
            return new is not None and new != old

        wait_for(promoted, timeout=60, interval=0.05, what="the sentinels to promote a replica")
        promotion = time.monotonic() - killed_at
        node = self.nodes[old]
        node.args = [*NO_DISK, "--replicaof", "127.0.0.1", str(new)]
        node.start()

        def in_sync() -> bool:
            # The primary as the sentinels name it now: they may have failed over once more meanwhile.
            current = self.primary()
            if current not in self.nodes:
                return False
            with self.nodes[current].client(timeout=1) as c:
                info = c.info("replication")
            online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)
                      and v.get("state") == "online"]
            return info.get("role") == "master" and len(online) >= self.args.replicas

        wait_for(in_sync, timeout=120, interval=0.1, what="every replica to sync with the new primary")
        self.failovers.append((promotion, time.monotonic() - killed_at))
        print(f"  failover {len(self.failovers)}: primary :{old} killed, :{new} promoted after {promotion:.1f}s, "
              f"{self.args.replicas} replicas in sync after {time.monotonic() - killed_at:.1f}s", flush=True)

    def switches(self) -> int:
        """Primary changes the sentinels made (``+switch-master`` in their logs): the forced
        failovers and any the sentinels decided on their own."""
        logs = [(w.directory / "node.log").read_text(errors="replace") for w in self.watchers]
        return max((log.count("+switch-master") for log in logs), default=0)

    def stop(self) -> None:
        for node in [*self.watchers, *self.nodes.values()]:
            node.stop()


def become_subreaper() -> None:
    """Have the orphans of killed processes (a worker's executors) handed to this process
    instead of init, so that :meth:`Stack.reap` reaps them (Linux; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def kill_tree(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL ``proc`` and then the processes it started (by pid)."""
    import psutil

    if proc.poll() is not None:
        return
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    for child in children:
        try:
            child.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=10)


# -- load ------------------------------------------------------------------------------


class Pushers:
    """Threads pushing batches of ``soak.record`` at a steady total rate."""

    def __init__(self, args: argparse.Namespace, addresses: list[str], log: Path) -> None:
        self.args = args
        self.addresses = addresses
        self.log = log
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.acked: dict[str, str] = {}  # id -> token
        self.failed_tasks = 0
        self.failed_calls: collections.Counter[str] = collections.Counter()
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(args.pushers)]

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def _run(self, index: int) -> None:
        from ppq import Client

        client = Client(self.addresses, retry=3, timeout=10)
        per_thread = self.args.rate / self.args.pushers
        batch = self.args.batch
        n = 0
        next_at = time.monotonic()
        while not self.stop_event.is_set():
            tokens = [f"p{index}-{n + k}" for k in range(batch)]
            n += batch
            try:
                ids = client.push_many([("soak.record", [str(self.log), tok, self.args.task_seconds])
                                        for tok in tokens], max_retry=5)
                with self.lock:
                    self.acked.update(zip(ids, tokens, strict=True))
            except Exception as exc:  # noqa: BLE001 - counted, the load goes on
                with self.lock:
                    self.failed_tasks += batch
                    self.failed_calls[type(exc).__name__] += 1
            next_at += batch / per_thread
            delay = next_at - time.monotonic()
            if delay > 0:
                self.stop_event.wait(delay)
            else:
                next_at = time.monotonic()
        client.close()

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(30)


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


def final_states(call: Any, ids: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start:start + 1000]
        for tid, info in zip(chunk, call("get_tasks_info", chunk, 0), strict=True):
            out[tid] = (info or {}).get("state", "missing")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="How long to push and kill.")
    parser.add_argument("--kills", type=int, default=0,
                        help="Go on past --seconds until this many kills are done (at most --seconds-max).")
    parser.add_argument("--seconds-max", type=float, default=1800.0, help="The longest load with --kills.")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--masters", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=2, help="Executors per worker.")
    parser.add_argument("--rate", type=float, default=200.0, help="Tasks pushed per second, in total.")
    parser.add_argument("--task-seconds", type=float, default=0.01,
                        help="How long each task works after logging its run (so kills catch tasks mid-run).")
    parser.add_argument("--pushers", type=int, default=2, help="Pushing threads.")
    parser.add_argument("--batch", type=int, default=10, help="Tasks per push_many call.")
    parser.add_argument("--kill-every", type=float, default=3.0, help="Mean seconds between kills (0: none).")
    parser.add_argument("--master-kill-share", type=float, default=0.3,
                        help="Share of kills that hit a master (other than master 0).")
    parser.add_argument("--min-age", type=float, default=0.5,
                        help="Seconds a process has been up (has logged so) before it may be killed.")
    parser.add_argument("--lease-timeout", type=float, default=2.0)
    parser.add_argument("--appendfsync", choices=["always", "everysec", "no"], default="everysec")
    parser.add_argument("--sentinel", action="store_true",
                        help="Redis as a primary, --replicas replicas and 3 sentinels (no persistence), the "
                             "masters on a redis+sentinel:// URL with redis.wait_replicas; fail the primary over "
                             "every --failover-every seconds.")
    parser.add_argument("--replicas", type=int, default=2, help="With --sentinel: replicas of the primary.")
    parser.add_argument("--wait-replicas", type=int, default=None,
                        help="With --sentinel: redis.wait_replicas (default: --replicas).")
    parser.add_argument("--wait-timeout", type=float, default=1.0, help="With --sentinel: redis.wait_timeout.")
    parser.add_argument("--failover-every", type=float, default=20.0,
                        help="With --sentinel: seconds between primary failovers (0: none).")
    parser.add_argument("--progress-every", type=float, default=10.0, help="Seconds between progress lines.")
    parser.add_argument("--result-ttl", type=int, default=0, help="master.result_ttl (0: the default).")
    parser.add_argument("--drain", type=float, default=120.0, help="Most seconds to wait for the queue to drain.")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true", help="Keep the work directory (logs, AOF).")
    parser.add_argument("--verbose", action="store_true", help="Show every kill and the clients' fail-over warnings.")
    parser.add_argument("--dry-run", action="store_true", help="Check the options, say what would run, start nothing.")
    args = parser.parse_args()
    if args.wait_replicas is None:
        args.wait_replicas = args.replicas
    if args.sentinel and not 1 <= args.replicas:
        parser.error("--replicas: at least 1 with --sentinel")
    if args.sentinel and not 0 <= args.wait_replicas <= args.replicas:
        parser.error(f"--wait-replicas: between 0 and --replicas ({args.replicas})")
    if args.dry_run:
        redis_kind = (f"a primary, {args.replicas} replica(s) and 3 sentinels, wait_replicas {args.wait_replicas}"
                      if args.sentinel else "one redis-server with AOF")
        print(f"would run {args.masters} masters and {args.workers} workers of {args.concurrency} executors on "
              f"{redis_kind}; {args.rate:g} tasks/s for {args.seconds:g} s"
              + (f" (or until {args.kills} kills)" if args.kills else "")
              + f", a kill every {args.kill_every:g} s on average"
              + (f", a failover every {args.failover_every:g} s" if args.sentinel else ""))
        return 0
    if not args.verbose:
        logging.getLogger("ppq").setLevel(logging.ERROR)  # fail-over warnings are expected here

    sys.path.insert(0, str(REPO))
    from ppq.rpc import PyroFunc

    become_subreaper()
    rng = random.Random(args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="ppq-soak-"))
    log = workdir / "executions.log"
    stack = Stack(args, workdir)
    started = time.monotonic()
    try:
        stack.start()
        redis_what = (f"primary + {args.replicas} replicas + 3 sentinels ({stack.redis_url}), wait_replicas "
                      f"{args.wait_replicas}" if args.sentinel else f"{stack.redis_url} (AOF {args.appendfsync})")
        print(f"stack up: redis {redis_what}, masters {', '.join(stack.addresses)}, "
              f"{args.workers} workers x {args.concurrency}; work dir {workdir}", flush=True)
        master0 = stack.masters[0].popen.pid
        pushers = Pushers(args, stack.addresses, log)
        pushers.start()
        if stack.sentinel:
            stack.sentinel.start_failovers()
        progress = PyroFunc(stack.addresses[0], timeout=5, default_return=None)
        rss: list[tuple[float, float]] = []
        most_children = 0
        warmup = min(5.0, args.seconds / 6)
        t0 = time.monotonic()
        # Kill times are drawn ahead from t0 (a Poisson process), so a slow kill does not slow the rate.
        next_kill = t0 + rng.expovariate(1 / args.kill_every) if args.kill_every > 0 else float("inf")
        next_sample = t0
        next_progress = t0 + args.progress_every
        def loading(now: float) -> bool:
            if now < t0 + args.seconds:
                return True
            return stack.kills.total() < args.kills and now < t0 + args.seconds_max

        while loading(now := time.monotonic()):
            if now >= next_sample:
                rss.append((now - t0, rss_mib(master0)))
                stack.replace_exited()
                most_children = max(most_children, stack.reap())
                next_sample += 1.0
            if now >= next_kill:
                what = stack.kill_random(rng)
                if args.verbose and what:
                    print(f"  {now - t0:6.1f}s  kill -9 {what}", flush=True)
                next_kill += rng.expovariate(1 / args.kill_every)
            if now >= next_progress:
                info = progress("server_info")
                counters = info[0] if info else {}
                with pushers.lock:
                    acked, failed = len(pushers.acked), pushers.failed_tasks
                print(f"  {now - t0:5.0f}s  kills {stack.kills.total()} ({stack.kills['worker']} workers, "
                      f"{stack.kills['master']} masters), "
                      f"failovers {len(stack.sentinel.failovers) if stack.sentinel else '-'}, "
                      f"pushed {acked} (failed {failed}), done {counters.get('done', '?')}, "
                      f"queued {counters.get('queued', '?')}, children {most_children}, "
                      f"load {os.getloadavg()[0]:.1f}", flush=True)
                next_progress += args.progress_every
            time.sleep(max(0.0, min(next_sample, next_kill, next_progress) - time.monotonic()))
        if stack.sentinel:
            stack.sentinel.stop_event.set()
        pushers.stop()
        push_seconds = time.monotonic() - t0
        if stack.sentinel:
            stack.sentinel.stop_failovers()
        rss_load_end = rss_mib(master0)
        progress.close()

        call = PyroFunc(stack.addresses[0], timeout=30)
        ids = list(pushers.acked)
        drain_start = time.monotonic()
        states: dict[str, str] = {}
        while True:
            stack.replace_exited()
            stack.reap()
            states = final_states(call, ids)
            if all(s in ("done", "dead") for s in states.values()) or time.monotonic() - drain_start > args.drain:
                break
            time.sleep(0.5)
        drain_seconds = time.monotonic() - drain_start
        counters = call("server_info")[0]
        rss_drained = rss_mib(master0)
        call.close()

        tally = collections.Counter(states.values())
        runs = collections.Counter(line for line in log.read_text().splitlines() if line) if log.exists() else {}
        tokens = set(pushers.acked.values())
        done_ids = [tid for tid, s in states.items() if s == "done"]
        never_ran = [tid for tid in done_ids if runs.get(pushers.acked[tid], 0) == 0]
        duplicated = sum(n - 1 for n in runs.values() if n > 1)
        tasks_repeated = sum(1 for n in runs.values() if n > 1)
        lost = len(ids) - tally["done"] - tally["dead"]
        after_warmup = [m for t, m in rss if t >= warmup] or [m for _, m in rss]
        rss_start = after_warmup[0]
        peak = max([m for _, m in rss] + [rss_load_end])

        print()
        print(f"soak: {push_seconds:.0f}s of load at {args.rate:g} tasks/s of {args.task_seconds:g}s each, "
              f"{args.masters} masters, "
              f"{args.workers} workers x {args.concurrency}, lease {args.lease_timeout:g}s; drained in "
              f"{drain_seconds:.1f}s")
        print(f"  redis                    {redis_what}")
        print(f"  kills (SIGKILL)          {stack.kills.total()}: workers {stack.kills['worker']}, masters "
              f"{stack.kills['master']} (mean every {args.kill_every:g}s; {stack.skipped} times none had been up "
              f"{args.min_age:g}s)")
        for kind, lives in stack.lives.items():
            if lives:
                startup, up = sorted(a for a, _ in lives), sorted(b for _, b in lives)
                print(f"  killed {kind}s            start-up (spawn to up) median {startup[len(startup) // 2]:.1f}s, "
                      f"up before the kill median {up[len(up) // 2]:.1f}s, max {up[-1]:.1f}s")
        if stack.sentinel:
            done_f = stack.sentinel.failovers
            promo = sorted(p for p, _ in done_f)
            print(f"  primary failovers        {len(done_f)} (SIGKILL of the primary every "
                  f"{args.failover_every:g}s; {len(stack.sentinel.failures)} failed "
                  f"{stack.sentinel.failures[:3] or ''}); primary changes the sentinels logged: "
                  f"{stack.sentinel.switches()}")
            if done_f:
                print(f"  promotion after          {promo[0]:.1f}s min, {promo[len(promo) // 2]:.1f}s median, "
                      f"{promo[-1]:.1f}s max; every replica in sync again after "
                      f"{max(s for _, s in done_f):.1f}s at most")
        print(f"  exited unkilled          {dict(stack.exited) or 0}; orphans reaped {stack.reaped}; "
              f"most child processes at once {most_children}")
        print(f"  pushed (acknowledged)    {len(ids)}")
        print(f"  push failures            {pushers.failed_tasks} tasks in {sum(pushers.failed_calls.values())} "
              f"calls {dict(pushers.failed_calls) or ''}")
        print(f"  done                     {tally['done']}")
        print(f"  dead                     {tally['dead']}")
        others = {state: n for state, n in tally.items() if state not in ("done", "dead")}
        print(f"  lost                     {lost}  {others or ''}")
        if lost:
            missing = [tid for tid, s in states.items() if s not in ("done", "dead")]
            print(f"  lost ids (first 10)      {missing[:10]}")
        print(f"  executions               {sum(runs.values())} of {len(tokens)} acknowledged tasks "
              f"(+{sum(n for t, n in runs.items() if t not in tokens)} of unacknowledged pushes)")
        acked_repeats = sum(n - 1 for t, n in runs.items() if t in tokens and n > 1)
        print(f"  duplicated executions    {duplicated} (tasks run more than once: {tasks_repeated}); of the "
              f"acknowledged tasks: {acked_repeats} runs beyond the first")
        print(f"  done but never ran       {len(never_ran)}")
        print(f"  master counters          pushed {counters['pushed']}, done {counters['done']}, "
              f"expired leases {counters['expired']}, dead {counters['dead']}")
        print(f"  master 0 RSS             start {rss_start:.1f} MiB (at {warmup:.0f}s), end of load "
              f"{rss_load_end:.1f} MiB, peak under load {peak:.1f} MiB; after the drain's status queries "
              f"{rss_drained:.1f} MiB")
        step = max(1, len(rss) // 10)
        print("  master 0 RSS over time   " + ", ".join(f"{t:.0f}s {m:.1f}" for t, m in rss[::step]) + " MiB")
        print(f"  load average             {' '.join(f'{x:.2f}' for x in os.getloadavg())} (1, 5, 15 min)")
        print(f"  total time               {time.monotonic() - started:.0f}s")
        return 1 if lost or never_ran else 0
    finally:
        if stack.sentinel:
            stack.sentinel.stop_failovers()
        stack.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
