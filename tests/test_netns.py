"""Across hosts: Redis, a name server, two masters, two workers and a client, each in its own
network namespace, joined by veth pairs to a bridge in a namespace of its own. Private
10.x addresses live inside the namespaces only: the host's interfaces and routes are not
touched, and every namespace (with its links) is deleted at the end. Auth token and TLS on.

Under a steady push load a master's link is cut and restored; then, the moment a worker runs
one of a few long tasks, its link is cut until the reaper has returned those leases and the
other worker has taken them: no acknowledged task is lost, and the worker comes back by
itself. Root only (skipped otherwise, or where `ip netns` does not work).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ppq.embedded import find_redis_server
from tests.conftest import REPO, TESTS_DIR, wait_for

TOKEN = "netns-token-5b1f"
NS_PORT = 9090
MASTER_PORT = 7600
HOSTS = {"redis": 1, "ma": 2, "mb": 3, "w1": 4, "w2": 5, "cl": 6}


def _netns_problem() -> str:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "the `ip` command (iproute2) is not installed"
    probe = f"ppq-{os.getpid()}-probe"
    done = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True, timeout=10)
    if done.returncode:
        return f"`ip netns add` does not work here: {done.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True, timeout=10)
    return ""


class Lab:
    """Namespaces ``ppq-<pid>-<host>`` on a bridge in ``ppq-<pid>-sw``; processes started in them."""

    def __init__(self, tmp_path: Path) -> None:
        self.prefix = f"ppq-{os.getpid()}"
        self.subnet = f"10.{200 + os.getpid() % 50}.{os.getpid() % 250}"
        self.tmp_path = tmp_path
        self.namespaces: list[str] = []
        self.procs: list[subprocess.Popen[bytes]] = []

    def ns(self, host: str) -> str:
        return f"{self.prefix}-{host}"

    def ip(self, host: str) -> str:
        return f"{self.subnet}.{HOSTS[host]}"

    def run(self, *args: str) -> None:
        done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
        if done.returncode:
            raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")

    def build(self) -> None:
        switch = self.ns("sw")
        self.run("netns", "add", switch)
        self.namespaces.append(switch)
        self.run("-n", switch, "link", "add", "br0", "type", "bridge")
        self.run("-n", switch, "link", "set", "br0", "up")
        for host in HOSTS:
            name = self.ns(host)
            self.run("netns", "add", name)
            self.namespaces.append(name)
            self.run("-n", name, "link", "set", "lo", "up")
            self.run("-n", name, "link", "add", f"v-{host}", "type", "veth", "peer", "name", f"s-{host}",
                     "netns", switch)
            self.run("-n", switch, "link", "set", f"s-{host}", "master", "br0")
            self.run("-n", switch, "link", "set", f"s-{host}", "up")
            self.run("-n", name, "addr", "add", f"{self.ip(host)}/24", "dev", f"v-{host}")
            self.run("-n", name, "link", "set", f"v-{host}", "up")

    def cut(self, host: str) -> None:
        self.run("-n", self.ns(host), "link", "set", f"v-{host}", "down")

    def restore(self, host: str) -> None:
        self.run("-n", self.ns(host), "link", "set", f"v-{host}", "up")

    def start(self, host: str, name: str, *argv: str) -> subprocess.Popen[bytes]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PPQ_")}
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO), env.get("PYTHONPATH", "")])
        log = self.tmp_path / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(["ip", "netns", "exec", self.ns(host), *argv], stdout=out,
                                    stderr=subprocess.STDOUT, env=env, cwd=str(TESTS_DIR))
        proc.log_path = log  # type: ignore[attr-defined]
        self.procs.append(proc)
        return proc

    def python(self, host: str, script: str, *args: str, timeout: float = 40) -> subprocess.CompletedProcess[str]:
        """Run a python script in ``host``'s namespace to its end (bounded by ``timeout``)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PPQ_")}
        env["PYTHONPATH"] = os.pathsep.join([str(TESTS_DIR), str(REPO), env.get("PYTHONPATH", "")])
        return subprocess.run(["ip", "netns", "exec", self.ns(host), sys.executable, "-c", script, *args],
                              capture_output=True, text=True, timeout=timeout, env=env, cwd=str(TESTS_DIR))

    def ppq(self, host: str, name: str, *args: str) -> subprocess.Popen[bytes]:
        return self.start(host, name, sys.executable, "-m", "ppq", *args)

    @staticmethod
    def log(proc: subprocess.Popen[bytes]) -> str:
        return Path(proc.log_path).read_text(errors="replace")  # type: ignore[attr-defined]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "del", name], capture_output=True, timeout=10)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    problem = _netns_problem()
    if problem:
        pytest.skip(problem)
    lab = Lab(tmp_path)
    try:
        lab.build()
        yield lab
    finally:
        lab.close()


def make_certificate(directory: Path, ips: list[str]) -> tuple[str, str]:
    cert, key = directory / "cert.pem", directory / "key.pem"
    san = ",".join(f"IP:{ip}" for ip in ips)
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "1", "-subj", "/CN=ppq-netns", "-addext", f"subjectAltName={san}"],
                   check=True, capture_output=True, timeout=60)
    return str(cert), str(key)


# The client: pushes one task every 100 ms until the stop file appears, writing how many pushes
# were acknowledged; then waits for every acknowledged task and writes what came back.
DRIVER = textwrap.dedent("""
    import json, os, sys, time
    from ppq.client import Client
    from ppq.config import load_config
    from ppq.errors import PPQError
    config = load_config(sys.argv[1], environ={})
    out, stop = sys.argv[2], sys.argv[3]
    client = Client(config=config)
    acked, refused, n = {}, 0, 0
    deadline = time.monotonic() + 75
    while not os.path.exists(stop) and time.monotonic() < deadline:
        try:
            acked[client.push("tasks.sleep_then", 0.4, n)] = n
        except PPQError as exc:
            refused += 1
            print("push refused:", exc, flush=True)
        n += 1
        with open(out + ".n.tmp", "w") as f:
            f.write(str(len(acked)))
        os.replace(out + ".n.tmp", out + ".n")
        time.sleep(0.1)
    results, missing = {}, ""
    try:
        for task_id, value in client.results(list(acked), timeout=40):
            results[task_id] = value if not isinstance(value, Exception) else repr(value)
    except PPQError as exc:
        missing = repr(exc)
    try:
        extra = json.load(open(out + ".extra"))
    except FileNotFoundError:
        extra = []
    infos = {t: client.info(t) for t in [*acked, *extra]}
    with open(out, "w") as f:
        json.dump({"acked": acked, "results": results, "refused": refused, "missing": missing,
                   "infos": infos}, f)
""")


# Pushes long tasks, waits (at most 20 s) until the worker with pid argv[2] runs one, then at once
# cuts that worker's link (argv[3]: its namespace, argv[4]: its interface) and prints the ids it holds.
CUT_BUSY_WORKER = textwrap.dedent("""
    import json, subprocess, sys, time
    from ppq.client import Client
    from ppq.config import load_config
    client = Client(config=load_config(sys.argv[1], environ={}))
    mark = f":{sys.argv[2]}:"
    long_ids = {client.push("tasks.sleep_then", 3.0, f"long-{n}", priority=9) for n in range(4)}
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        running = {t for w in client.server_info()[0]["workers"] if mark in w["id"] for t in w.get("running", [])}
        held = sorted(running & long_ids)
        if held:
            subprocess.run(["ip", "-n", sys.argv[3], "link", "set", sys.argv[4], "down"], check=True)
            print(json.dumps(held))
            break
        time.sleep(0.05)
""")


# Waits (at most 25 s) until every task of argv[2] (a JSON list) has had its lease expire and
# was leased again to the worker with pid argv[3]; prints their records.
TAKEN_OVER = textwrap.dedent("""
    import json, sys, time
    from ppq.client import Client
    from ppq.config import load_config
    client = Client(config=load_config(sys.argv[1], environ={}))
    held, mark = json.loads(sys.argv[2]), f":{sys.argv[3]}:"
    deadline = time.monotonic() + 25
    while time.monotonic() < deadline:
        infos = [client.info(t) for t in held]
        if all(i["expiries"] >= 1 and mark in (i.get("worker") or "") for i in infos):
            break
        time.sleep(0.1)
    print(json.dumps(infos))
""")


def acked_so_far(path: Path) -> int:
    try:
        return int((path.parent / (path.name + ".n")).read_text() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def test_masters_and_workers_across_namespaces_survive_cut_links(lab: Lab, tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path, [lab.ip(h) for h in HOSTS])
    nameserver = f"{lab.ip('redis')}:{NS_PORT}"
    config = {
        "auth_token": TOKEN,
        "log_level": "INFO",
        "tls": {"enabled": True, "certfile": cert, "keyfile": key, "cafile": cert},
        "master": {"redis_map": {0: f"redis://{lab.ip('redis')}:6379/0"}, "lease_timeout": 3.0,
                   "reaper_interval": 0.5, "nameserver": nameserver},
        "worker": {"nameserver": nameserver, "max_sleep": 1.0, "heartbeat_interval": 0.5, "pool": "threads",
                   "concurrency": 2, "allowed_modules": ["tasks"], "port": 7620},
        "client": {"nameserver": nameserver, "timeout": 2.0, "retry": 5},
    }
    config_path = tmp_path / "ppq.yaml"
    config_path.write_text(json.dumps(config))
    cfg = str(config_path)

    redis = lab.start("redis", "redis", find_redis_server(), "--bind", lab.ip("redis"), "--port", "6379",
                      "--save", "", "--appendonly", "no", "--protected-mode", "no", "--dir", str(tmp_path))
    ns = lab.ppq("redis", "nameserver", "nameserver", "--config", cfg, "--host", lab.ip("redis"),
                 "--port", str(NS_PORT))
    wait_for(lambda: "Ready to accept connections" in lab.log(redis) or redis.poll() is not None, what="redis")
    wait_for(lambda: "name server ready" in lab.log(ns) or ns.poll() is not None, what="the name server")
    assert redis.poll() is None and ns.poll() is None, lab.log(redis) + lab.log(ns)
    masters = {h: lab.ppq(h, h, "master", "--config", cfg, "--host", lab.ip(h), "--port", str(MASTER_PORT))
               for h in ("ma", "mb")}
    for host, proc in masters.items():
        wait_for(lambda proc=proc: "registered as" in lab.log(proc) or proc.poll() is not None,
                 what=f"master {host} registered")
        assert proc.poll() is None, lab.log(proc)
    workers = {h: lab.ppq(h, h, "worker", "--config", cfg, "--host", lab.ip(h)) for h in ("w1", "w2")}
    for host, proc in workers.items():
        wait_for(lambda proc=proc: "executor thread" in lab.log(proc) or proc.poll() is not None,
                 what=f"worker {host} started")
        assert proc.poll() is None, lab.log(proc)

    out, stop = tmp_path / "driver.json", tmp_path / "stop"
    driver = lab.start("cl", "driver", sys.executable, "-c", DRIVER, cfg, str(out), str(stop))
    try:
        wait_for(lambda: acked_so_far(out) >= 30 or driver.poll() is not None, timeout=30, what="pushes under way")
        assert driver.poll() is None, lab.log(driver)

        # A master's host drops off the network for a while: pushes go on through the other one.
        lab.cut("ma")
        before = acked_so_far(out)
        wait_for(lambda: acked_so_far(out) >= before + 40, timeout=30, what="pushes while master a is cut off")
        lab.restore("ma")

        # A worker's host drops off long enough for its leases to run out: the reaper requeues its tasks.
        before = acked_so_far(out)
        wait_for(lambda: acked_so_far(out) >= before + 20, timeout=30, what="pushes after master a is back")

        def expiries() -> int:
            return sum(lab.log(p).count("expired lease(s): back to the queue") for p in masters.values())

        reaped_before = expiries()
        probe = lab.python("cl", CUT_BUSY_WORKER, cfg, str(workers["w1"].pid), lab.ns("w1"), "v-w1")
        held = json.loads(probe.stdout or "[]")
        assert held, f"worker w1 never ran a long task: {probe.stderr[-2000:]}"
        (tmp_path / "driver.json.extra").write_text(json.dumps(held))
        taken = lab.python("cl", TAKEN_OVER, cfg, json.dumps(held), str(workers["w2"].pid))
        assert expiries() > reaped_before, "no master logged an expired lease while w1 was cut off"
        for info in json.loads(taken.stdout or "[]") or [{"expiries": 0, "error": taken.stderr[-2000:]}]:
            assert info["expiries"] >= 1 and f":{workers['w2'].pid}:" in (info.get("worker") or ""), info
        lab.restore("w1")
        restored_at = time.time()
        before = acked_so_far(out)
        wait_for(lambda: acked_so_far(out) >= before + 40, timeout=30, what="pushes after w1 is back")
        stop.write_text("stop")
        wait_for(lambda: driver.poll() is not None, timeout=60, what="the client to collect every result")
        assert driver.returncode == 0, lab.log(driver)
    finally:
        stop.write_text("stop")

    report = json.loads(out.read_text())
    acked, results, infos = report["acked"], report["results"], report["infos"]
    assert len(acked) >= 120, report["refused"]
    assert not report["missing"], report["missing"]
    # No acknowledged task was lost, and each ran to its own value.
    assert set(results) == set(acked)
    assert all(results[t] == n for t, n in acked.items())
    # The long tasks w1 held when its link was cut were taken back by the reaper (their leases
    # expired), leased to w2 while w1 was still cut off, and ran to their own value.
    w1_pid = workers["w1"].pid
    for task_id in held:
        info = infos[task_id]
        assert info["state"] == "done" and info["expiries"] >= 1 and info["result"].startswith("long-"), info
    # w1 came back by itself: it finished tasks that started after its link was restored.
    assert any(f":{w1_pid}:" in (i.get("worker") or "") and (i.get("started") or 0) > restored_at
               for i in infos.values() if i), lab.log(workers["w1"])[-3000:]
    assert all(p.poll() is None for p in (*masters.values(), *workers.values()))
