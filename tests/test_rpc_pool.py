"""The server's thread pool (ppq/rpc/pool.py): it grows with a burst, hands steady work to the
thread idle last, so that the threads the burst left behind end, and ends them all on close."""

from __future__ import annotations

import threading

import pytest

from ppq.rpc import pool as pool_module
from ppq.rpc.pool import MIN_THREADS, Pool

from .conftest import wait_for


def _serving(name: str) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(name + "-")]


def test_a_burst_grows_the_pool_steady_work_stays_on_one_thread_and_the_rest_end(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(pool_module, "IDLE_THREAD", 0.5)
    pool = Pool(64, "pool-under-test")
    try:
        gate = threading.Event()
        started = threading.Semaphore(0)

        def held() -> None:
            started.release()
            gate.wait(10)

        for _ in range(40):
            pool.submit(held)
        for _ in range(40):
            assert started.acquire(timeout=10)
        assert len(_serving("pool-under-test")) == 40
        gate.set()
        wait_for(lambda: len(pool._idle) == 40, timeout=10, what="the burst's threads to be idle")

        # One job after another, each submitted once the one before has ended: the same thread runs them.
        ran: list[str] = []
        for _ in range(30):
            done = threading.Event()
            pool.submit(lambda done=done: (ran.append(threading.current_thread().name), done.set()))
            assert done.wait(10)
            wait_for(lambda: len(pool._idle) == 40, timeout=10, what="the thread to be idle again")
        assert len(set(ran)) == 1, ran

        # The threads nothing was handed to end after IDLE_THREAD; MIN_THREADS stay.
        wait_for(lambda: len(_serving("pool-under-test")) == MIN_THREADS, timeout=15,
                 what="the pool to shrink to its floor")
        done = threading.Event()
        pool.submit(done.set)
        assert done.wait(10)
    finally:
        pool.close()
    wait_for(lambda: not _serving("pool-under-test"), timeout=10, what="every thread to end on close")
