"""The master's boundary against a caller that holds the token but not a worker's lease,
and against calls sized to exhaust it: real redis-server processes, real masters, real
``ppq worker`` processes.

- leases are unguessable and only ever given to the worker they were leased to;
- worker registrations are bounded in number, size and time;
- one push_tasks call is bounded in bytes, one lookup call in ids;
- metrics endpoints follow the daemons' rule: loopback, or a token.
"""

from __future__ import annotations

import secrets
import socket
import urllib.error
import urllib.request
from typing import Any

import msgpack
import Pyro5.api
import pytest
import redis
from prometheus_client import CollectorRegistry

from ppq import Client, InvalidTaskError, PyroFunc
from ppq.embedded import free_port
from ppq.errors import ConfigError, LeaseLostError
from ppq.master import MasterServer
from ppq.metrics import QueueCollector, WorkerMetrics, metrics_token, serve_master_metrics, serve_metrics, stop_metrics
from ppq.rpc import make_proxy

from .conftest import wait_for

PREFIX = "ppq:0:"


def address_of(server: MasterServer) -> str:
    return f"127.0.0.1:{server.port}"


def plain_proxy(server: MasterServer) -> Pyro5.api.Proxy:
    """A stock Pyro5 proxy, as an outside program makes it (serpent, no ppq handshake)."""
    proxy = Pyro5.api.Proxy(server.uri)
    proxy._pyroSerializer = "serpent"
    proxy._pyroTimeout = 10
    return proxy


def task_and_stats(r: redis.Redis, task_id: str) -> tuple[dict[bytes, bytes], dict[bytes, bytes], list[bytes]]:
    """What a report on ``task_id`` would change: its record, the counters, the ready queue."""
    return r.hgetall(PREFIX + "t:" + task_id), r.hgetall(PREFIX + "stats"), r.lrange(PREFIX + "queue", 0, -1)


# -- leases ----------------------------------------------------------------------------


def test_nobody_but_its_worker_can_report_a_running_task(make_master, spawn, ra):
    """get_task_info and every other record the master returns carry no lease; finishes,
    errors and reports with the old-style guess (worker id + "/1"), a random string or no
    lease at all are refused and change nothing; the real worker's result is the one kept."""
    server = make_master()
    client = Client([address_of(server)])
    spawn.worker(address_of(server))
    tid = client.push("tasks.sleep_then", 4, "real")
    info = wait_for(lambda: (i := client.info(tid)) and i["state"] == "running" and i, what="the task to run")
    wid = info["worker"]
    lease = ra.hget(PREFIX + "t:" + tid, "lease").decode()
    assert lease and wid not in lease and len(lease) >= 32, lease
    records = [info, client.call("get_tasks_info", [tid], 0)[0], client.call("wait_task", tid, 0, 0),
               client.call("wait_tasks", [tid], 0, 0)[0]]
    for record in records:
        assert record["state"] == "running" and "lease" not in record
        assert lease not in repr(record)

    before = task_and_stats(ra, tid)
    guesses = (f"{wid}/1", f"{wid}/2", secrets.token_hex(16), None)
    plain = plain_proxy(server)
    forger = make_proxy(server.uri)
    try:
        for guess in guesses:
            with pytest.raises(LeaseLostError):
                forger.task_finish(tid, {"id": wid}, 0, result="forged", lease=guess)
            with pytest.raises(LeaseLostError):
                forger.task_error(tid, {"id": wid}, 0, error="forged", lease=guess, retry=False)
            with pytest.raises(RuntimeError, match="LeaseLostError"):
                plain.task_finish(tid, {"id": wid}, 0, result="forged", lease=guess)
            reply = forger.report({"id": wid}, 0, [{"id": tid, "lease": guess, "ok": True, "result": "forged"}], 0, 0)
            assert reply == {"accepted": [False], "tasks": []}
            assert forger.heartbeat({"id": wid}, 0, [[tid, guess or ""]])["lost"] == [tid]
    finally:
        plain._pyroRelease()
        forger._pyroRelease()
    assert task_and_stats(ra, tid) == before
    assert client.info(tid)["state"] == "running", "the task ended while the forgeries were tried: too short"
    assert client.result(tid, timeout=20) == "real"
    assert client.info(tid)["attempts"] == 1
    client.close()


def test_leases_are_distinct_per_task_and_per_call(master, call, ra):
    """Each leased task gets its own lease, not derived from the worker's id or the attempt."""
    ids = call("push_tasks", [{"func": "add", "module": "tasks", "args": [i, i]} for i in range(4)])
    worker = {"id": "w-leases"}
    first = call("get_tasks", worker, 0, 3)
    second = call("get_task", worker, 0)
    leases = [t["lease"] for t in [*first, second]]
    assert sorted(t["id"] for t in [*first, second]) == sorted(ids)
    assert len(set(leases)) == 4 and not any(lease.startswith(worker["id"]) for lease in leases)
    assert len({lease.rsplit(":", 1)[0] for lease in leases}) == 2  # one random part per call
    for t in first:
        assert ra.hget(PREFIX + "t:" + t["id"], "lease").decode() == t["lease"]
        assert call("task_finish", t["id"], worker, 0, result=1, lease=t["lease"]) is True
    assert call("task_error", second["id"], worker, 0, error="E", retry=False, lease=second["lease"]) is True
    (dead,) = call("dead_tasks", 0)
    assert dead["id"] == second["id"] and "lease" not in dead and second["lease"] not in repr(dead)


def test_a_report_without_lease_counts_only_on_the_connection_that_leased(master, call, ra):
    """The seed's call shape, task_finish(id, worker_info) without a lease, still works for the
    worker that leased the task, on its own connection; another connection claiming the same
    worker id is refused and does not take that lease away."""
    tid = call("push_task", "add", module="tasks", args=[1, 2])
    worker = {"id": "seed-worker", "host": "h", "pid": 1}
    owner, stranger = plain_proxy(master), plain_proxy(master)
    try:
        assert owner.get_task(worker, 0)["id"] == tid
        before = task_and_stats(ra, tid)
        with pytest.raises(RuntimeError, match="LeaseLostError"):
            stranger.task_finish(tid, worker, 0, result=99)
        with pytest.raises(RuntimeError, match="LeaseLostError"):
            stranger.task_error(tid, worker, 0, error="forged")
        assert task_and_stats(ra, tid) == before
        assert owner.task_finish(tid, worker, 0, result=3) is True
    finally:
        owner._pyroRelease()
        stranger._pyroRelease()
    info = call("get_task_info", tid, 0)
    assert (info["state"], info["result"]) == ("done", 3)


# -- worker registrations ------------------------------------------------------------------


def junk_info(wid: str, stuffed: bool = False) -> dict[str, Any]:
    """A worker_info as a flood sends it: 15 KiB in a field ppq never reads, or (``stuffed``)
    every field ppq reads oversized or of the wrong type."""
    if not stuffed:
        return {"id": wid, "heartbeat_interval": 3600, "junk": "j" * 15 * 1024}
    return {"id": wid, "heartbeat_interval": 3600, "host": "h" * 5000, "pool": ["x"] * 100,
            "running": ["r" * 60] * 5000, "control_uri": "u" * 5000, "pid": 10**30, "done": float("nan")}


def client_and_listed_worker(server: MasterServer, spawn: Any) -> tuple[Client, Any]:
    """A Client on ``server`` and a real worker process it lists."""
    client = Client([address_of(server)])
    proc = spawn.worker(address_of(server))
    wait_for(lambda: any(w.get("pid") == proc.pid for w in client.server_info()[0]["workers"]),
             what="the worker to be listed")
    return client, proc


def test_a_flood_of_registrations_keeps_server_info_small(make_master, spawn, ra):
    server = make_master()
    client, proc = client_and_listed_worker(server, spawn)
    flood = make_proxy(server.uri)
    try:
        for n in range(2000):
            assert flood.heartbeat(junk_info(f"fake-{n}", stuffed=n < 20), 0, []) == {"lost": []}
    finally:
        flood._pyroRelease()
    info = client.server_info()
    assert info[0]["workers_live"] == len(info[0]["workers"]) == 2001
    size = len(msgpack.packb(info))
    assert size < 2 * 1024 * 1024, f"server_info is {size} bytes"
    fake = next(w for w in info[0]["workers"] if w["id"] == "fake-0")
    assert "junk" not in fake and len(fake["host"]) == 255 and len(fake["control_uri"]) == 300
    assert "pid" not in fake and "done" not in fake and "pool" not in fake
    assert 40 < len(fake["running"]) < 60 and fake["running"][0] == "r" * 60
    assert "junk" not in next(w for w in info[0]["workers"] if w["id"] == "fake-1999")
    assert all(len(blob) <= 4096 for blob in ra.hvals(PREFIX + "workers")), "a stored worker_info exceeds 4096 bytes"
    # Listed for worker_ttl (300 s) at most, whatever heartbeat_interval it claims.
    now = float(ra.time()[0])
    assert max(score for _, score in ra.zrange(PREFIX + "workers:seen", 0, -1, withscores=True)) <= now + 301
    # The real worker is listed with its own fields and still works.
    real = next(w for w in info[0]["workers"] if w.get("pid") == proc.pid)
    assert real["concurrency"] == 1 and real["running"] == [] and real["control_uri"].startswith("PYRO:")
    assert client.result(client.push("tasks.add", 2, 3), timeout=20) == 5
    client.close()


def test_new_worker_ids_beyond_max_workers_are_refused(make_master, spawn, ra):
    server = make_master(limits__max_workers=20)
    client, proc = client_and_listed_worker(server, spawn)
    flood = make_proxy(server.uri)
    try:
        for n in range(19):
            flood.heartbeat({"id": f"fake-{n}"}, 0, [])
        before = snapshot_workers(ra)
        with pytest.raises(InvalidTaskError, match="limits.max_workers"):
            flood.heartbeat({"id": "one-too-many"}, 0, [])
        # A new id that only asks for work is served, but not listed.
        assert flood.report({"id": "asks-only"}, 0, [], 1, 0) == {"accepted": [], "tasks": []}
        assert snapshot_workers(ra) == before
        assert flood.heartbeat({"id": "fake-3", "host": "again"}, 0, []) == {"lost": []}
    finally:
        flood._pyroRelease()
    info = client.server_info()[0]
    assert info["workers_live"] == 20 and "one-too-many" not in {w["id"] for w in info["workers"]}
    assert next(w for w in info["workers"] if w["id"] == "fake-3")["host"] == "again"
    # The real worker keeps heartbeating (a listed id) and running tasks.
    seen = ra.zscore(PREFIX + "workers:seen", next(w["id"] for w in info["workers"] if w.get("pid") == proc.pid))
    assert client.result(client.push("tasks.add", 1, 1), timeout=20) == 2
    wid = next(w["id"] for w in info["workers"] if w.get("pid") == proc.pid)
    wait_for(lambda: ra.zscore(PREFIX + "workers:seen", wid) > seen, what="a later heartbeat of the real worker")
    client.close()


def snapshot_workers(r: redis.Redis) -> tuple[Any, ...]:
    return r.hgetall(PREFIX + "workers"), r.zrange(PREFIX + "workers:seen", 0, -1)


def test_a_quiet_worker_is_dropped_after_worker_ttl(make_master, ra):
    server = make_master(master__worker_ttl=1.5)
    call = PyroFunc(address_of(server))
    try:
        assert call("heartbeat", {"id": "quiet", "heartbeat_interval": 3600}, 0, []) == {"lost": []}
        assert [w["id"] for w in call("server_info")[0]["workers"]] == ["quiet"]
        now = float(ra.time()[0])
        assert ra.zscore(PREFIX + "workers:seen", "quiet") <= now + 2.5
        wait_for(lambda: call("server_info")[0]["workers"] == [], timeout=10, what="the quiet worker to go")
        # server_info stops listing it at once; the reaper then forgets its info.
        wait_for(lambda: ra.hlen(PREFIX + "workers") == 0, timeout=10, what="the reaper to forget it")
    finally:
        call.close()


# -- one push_tasks call -------------------------------------------------------------------------


def test_push_tasks_whose_tasks_together_exceed_max_message_is_refused(master, call, ra, rb):
    """Each task within limits.max_payload, together more than limits.max_message (16 MiB):
    refused before anything is stored. The message itself stays small, as it repeats one string."""
    big = "x" * (1000 * 1024)
    before = (snapshot(ra), snapshot(rb))
    # ppq's client sends msgpack, which repeats the string: the request itself is too large.
    with pytest.raises(InvalidTaskError, match=r"larger than the limit of 16777216 bytes \(limits\.max_message\)"):
        call("push_tasks", [{"func": "echo", "module": "tasks", "args": [big]} for _ in range(20)])
    assert call("ping") == "pong"
    # marshal sends the string once and refers back to it: a small request, refused by its tasks' size.
    proxy = make_proxy(master.uri, serializer="marshal")
    with proxy:
        with pytest.raises(InvalidTaskError, match=r"^tasks: .*16777216 bytes.*limits\.max_message"):
            proxy.push_tasks([{"func": "echo", "module": "tasks", "args": [big]} for _ in range(20)])
        with pytest.raises(InvalidTaskError, match="limits.max_message"):
            proxy.push_tasks([{"func": "echo", "module": "tasks", "args": [i]} for i in range(100)]
                             + [{"func": "echo", "module": "tasks", "args": [big], "key": str(i)} for i in range(20)])
    assert (snapshot(ra), snapshot(rb)) == before
    ids = call("push_tasks", [{"func": "echo", "module": "tasks", "args": [big]} for _ in range(15)])
    assert len(ids) == 15 and ra.llen(PREFIX + "queue") == 15


def test_push_tasks_names_the_position_of_a_bad_task_in_a_long_batch(call, ra):
    tasks = [{"func": "add", "module": "tasks", "args": [i, i]} for i in range(300)]
    tasks[270] = {"func": "add", "module": "tasks", "args": [1], "max_retry": -1}
    with pytest.raises(InvalidTaskError, match=r"^tasks\[270\]: max_retry"):
        call("push_tasks", tasks)
    assert ra.keys("*") == []


def snapshot(r: redis.Redis) -> dict[bytes, Any]:
    return {key: r.dump(key) for key in r.keys("*")}


# -- lookups per call --------------------------------------------------------------------------


def hgetall_calls(r: redis.Redis) -> int:
    return int(r.info("commandstats").get("cmdstat_hgetall", {}).get("calls", 0))


def test_lookups_beyond_max_lookup_are_refused(call, ra):
    ids = [f"unknown-{n}" for n in range(1001)]
    for method, args in (("get_tasks_info", (ids, 0)), ("wait_tasks", (ids, 0, 5))):
        with pytest.raises(InvalidTaskError, match=r"task_ids .*1000 ids \(limits\.max_lookup\)"):
            call(method, *args)
    with pytest.raises(InvalidTaskError, match="limit"):
        call("dead_tasks", 0, 1001)
    assert ra.keys("*") == []


def test_a_thousand_ids_are_answered_in_one_call(call, ra):
    known = call("push_tasks", [{"func": "add", "module": "tasks", "args": [n, n]} for n in range(10)])
    done = call("get_task", {"id": "w-lookup"}, 0)
    assert call("task_finish", done["id"], {"id": "w-lookup"}, 0, result={"sum": 0}, lease=done["lease"]) is True
    ids = [f"unknown-{n}" for n in range(1000)]
    for n, tid in enumerate(known):
        ids[n * 99] = tid
    calls = hgetall_calls(ra)
    infos = call("get_tasks_info", ids, 0)
    assert hgetall_calls(ra) - calls == 1000
    assert len(infos) == 1000
    for tid, info in zip(ids, infos, strict=True):
        if tid in known:
            assert info["id"] == tid and info["state"] == ("done" if tid == done["id"] else "queued")
        else:
            assert info is None
    assert infos[ids.index(done["id"])]["result"] == {"sum": 0}
    # wait_tasks answers at once: an unknown id counts as ended.
    assert call("wait_tasks", ids, 0, 20) == infos
    assert call("wait_tasks", known, 0, 0) == [infos[ids.index(tid)] for tid in known]


def test_records_too_large_for_one_reply_are_refused(make_master):
    server = make_master(limits__max_message=65536)
    call = PyroFunc(address_of(server))
    try:
        ids = call("push_tasks", [{"func": "add", "module": "tasks", "args": [n, n]} for n in range(3)])
        worker = {"id": "w-big"}
        for _ in ids:
            task = call("get_task", worker, 0)
            call("task_finish", task["id"], worker, 0, result="r" * 20_000, lease=task["lease"])
        with pytest.raises(InvalidTaskError, match=r"task_ids: .*limits\.max_message"):
            call("get_tasks_info", ids, 0)
        with pytest.raises(InvalidTaskError, match=r"task_ids: .*limits\.max_message"):
            call("wait_tasks", ids, 0, 0)
        assert [i["result"] for i in call("get_tasks_info", ids[:1], 0)] == ["r" * 20_000]
    finally:
        call.close()


# -- metrics endpoints ---------------------------------------------------------------------------


def http_get(port: int, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as reply:
            return reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def queue_counts() -> dict[int, dict[str, Any]]:
    return {0: {"ok": True, "queued": 7, "workers": [], "workers_live": 2}}


def test_metrics_with_a_token_require_the_bearer_header():
    registry = CollectorRegistry()
    registry.register(QueueCollector(queue_counts))
    server = serve_metrics("127.0.0.1", 0, registry, token="m3trics-t0ken")
    port = server.server_port
    try:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Bearer m3trics-t0ken2"},
                        {"Authorization": "m3trics-t0ken"}, {"Authorization": "Basic bTN0cmljcy10MGtlbg=="}):
            status, reply_headers, body = http_get(port, headers)
            assert status == 401, headers
            assert reply_headers["WWW-Authenticate"].startswith("Bearer") and b"ppq_" not in body
        # A silent connection and an oversized request line hold nothing up.
        with socket.create_connection(("127.0.0.1", port), timeout=10) as silent, \
                socket.create_connection(("127.0.0.1", port), timeout=10) as huge:
            huge.sendall(b"GET /" + b"x" * 100_000 + b" HTTP/1.1\r\n\r\n")
            assert huge.recv(100).startswith(b"HTTP/1.0 414")
            status, _, body = http_get(port, {"Authorization": "Bearer m3trics-t0ken"})
            assert silent.fileno() >= 0
        assert status == 200
        assert 'ppq_queue_depth{queue_index="0",state="queued"} 7.0' in body.decode()
        assert 'ppq_workers{queue_index="0"} 2.0' in body.decode()
    finally:
        stop_metrics(server)


def test_metrics_need_the_token_when_one_is_set_and_a_non_loopback_host_needs_one():
    server = serve_master_metrics("127.0.0.1", 0, queue_counts)
    try:
        status, _, body = http_get(server.server_port)
        assert status == 200 and b"ppq_queue_depth" in body
    finally:
        stop_metrics(server)
    server = serve_master_metrics("127.0.0.1", 0, queue_counts, token="t0ken")
    try:
        assert http_get(server.server_port)[0] == 401
        assert http_get(server.server_port, {"Authorization": "Bearer t0ken"})[0] == 200
    finally:
        stop_metrics(server)
    with pytest.raises(ConfigError, match=r"master\.metrics_host is '0\.0\.0\.0'.*auth_token"):
        serve_master_metrics("0.0.0.0", 0, queue_counts)
    with pytest.raises(ConfigError, match=r"worker\.metrics_host is '0\.0\.0\.0'.*auth_token"):
        WorkerMetrics().serve("0.0.0.0", 0)
    assert metrics_token("0.0.0.0", "t0ken", "master.metrics_host") == "t0ken"
    assert metrics_token("127.0.0.1", "t0ken", "master.metrics_host") == "t0ken"
    assert metrics_token("127.0.0.1", None, "master.metrics_host") is None


def test_a_master_with_a_token_serves_metrics_to_scrapers_that_send_it(make_master):
    port = free_port()
    server = make_master(master__metrics_port=port, auth_token="s3cret")
    client = Client([address_of(server)], token="s3cret")
    client.push("tasks.add", 1, 2)
    def refused_without_token() -> bool:
        try:
            return http_get(port)[0] == 401
        except OSError:
            return False

    wait_for(refused_without_token, what="the metrics endpoint")
    status, _, body = http_get(port, {"Authorization": "Bearer s3cret"})
    assert status == 200
    assert 'ppq_queue_depth{queue_index="0",state="queued"} 1.0' in body.decode()
    client.close()


def test_push_many_and_a_worker_send_large_batches_in_parts_that_fit(master, spawn, ra):
    """Tasks and results near limits.max_payload: Client.push_many halves a chunk that is larger
    than one call carries, and a worker halves a batch of reports the same way."""
    client = Client([address_of(master)])
    big = "x" * (1000 * 1024)
    ids = client.push_many([("tasks.echo", (big,)) for _ in range(24)])
    assert len(set(ids)) == 24 and ra.llen(PREFIX + "queue") == 24
    ra.delete(PREFIX + "queue")
    ids = client.push_many([("tasks.big", (1000 * 1024,)) for _ in range(24)])
    spawn.worker(address_of(master), concurrency=2)
    results = dict(client.results(ids, timeout=60))
    assert all(not isinstance(v, Exception) and len(v) == 1000 * 1024 for v in results.values()), \
        {k: v for k, v in results.items() if isinstance(v, Exception)}
    assert len(results) == 24
    client.close()
