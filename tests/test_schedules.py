"""Periodic schedules with real masters on one Redis: every tick pushed exactly once while
masters come, go and are killed; the missed policies across a time every master was down;
the checks on bad schedules (config, RPC, CLI), which change nothing; the ``ppq schedule``
commands; schedules declared in the config and with ``@ppq.periodic``."""

from __future__ import annotations

import json
import signal
import time

import pytest
import yaml

from ppq import Client
from ppq.config import load_config
from ppq.errors import ConfigError, InvalidTaskError
from ppq.master.schedules import PENDING_AFTER
from ppq.schedules import MISSED_AFTER, check_schedule, periodic, task_id_of
from ppq.store import Store

from .conftest import address_of, redis_snapshot, run_ppq, wait_for


def ticks_of(r, name: str, queue_index: int = 0) -> list[int]:
    """The ticks (ms) of the tasks schedule ``name`` pushed for its ticks (run-now ones left out)."""
    prefix = f"ppq:{queue_index}:t:s:{name}:"
    out = [int(k.decode()[len(prefix):], 36) for k in r.scan_iter(match=prefix + "*", count=1000)
           if not k.decode()[len(prefix):].startswith("r")]
    return sorted(out)


def created(r, name: str, tick: int) -> float:
    return float(r.hget(f"ppq:0:t:{task_id_of(name, tick)}", "created"))


def test_cron_ticks_follow_the_timezone_and_every_ticks_the_epoch():
    paris = check_schedule({"name": "n", "cron": "0 9 * * *", "timezone": "Europe/Paris", "task": "tasks.add"})
    winter = 1767225600000  # 2026-01-01 00:00 UTC
    assert paris.next_after(winter) == winter + 8 * 3600 * 1000  # 09:00 in Paris is 08:00 UTC in winter
    summer = 1782864000000  # 2026-07-01 00:00 UTC
    assert paris.next_after(summer) == summer + 7 * 3600 * 1000
    every = check_schedule({"name": "n", "every": 5, "task": "tasks.add"})
    assert every.next_after(12_345) == 15_000 and every.next_after(15_000) == 20_000
    # Found late by more than MISSED_AFTER: run_once fires the last tick due, skip fires none.
    late = 100_000 + int(MISSED_AFTER * 1000) + 7_000
    assert every.plan(100_000, late) == (late // 5000 * 5000, late // 5000 * 5000 + 5000)
    skip = check_schedule({"name": "n", "every": 5, "task": "tasks.add", "missed": "skip"})
    assert skip.plan(100_000, late) == (None, late // 5000 * 5000 + 5000)
    assert skip.plan(100_000, 100_500) == (100_000, 105_000)
    minutely = check_schedule({"name": "n", "cron": "* * * * *", "task": "tasks.add"})
    assert minutely.plan(winter, winter + 86_400_000 + 30_000) == (winter + 86_400_000, winter + 86_460_000)


def test_three_masters_push_every_tick_exactly_once_while_one_is_killed(spawn, redis_a, ra):
    masters = [spawn.master(redis_a.url) for _ in range(3)]
    client = Client([addr for _, addr in masters], config=load_config(environ={}))
    added = time.time()
    client.add_schedule("tick", "tasks.add", every=1, args=[1, 2])
    wait_for(lambda: len(ticks_of(ra, "tick")) >= 8, timeout=30, what="8 ticks")
    masters[1][0].send_signal(signal.SIGKILL)  # mid-way, whatever it was doing
    masters[1][0].wait(10)
    killed = time.time()
    wait_for(lambda: len([t for t in ticks_of(ra, "tick") if t > killed * 1000]) >= 8, timeout=30,
             what="8 ticks after the kill")
    client.pause_schedule("tick")
    stopped = time.time()
    # A tick claimed as the pause came is pushed (and its pending mark cleared) right after.
    wait_for(lambda: ra.zcard("ppq:0:schedules:pending") == 0, timeout=PENDING_AFTER + 5, what="the last push")
    ticks = ticks_of(ra, "tick")
    # Every tick from the first to the last, each once: contiguous seconds, and one record and one
    # queue entry per tick.
    assert ticks == list(range(ticks[0], ticks[-1] + 1000, 1000)), ticks
    assert ticks[0] <= (added + 1) * 1000 and ticks[-1] >= (stopped - MISSED_AFTER - 1) * 1000, (added, ticks, stopped)
    queued = [i.decode() for i in ra.lrange("ppq:0:queue", 0, -1)]
    assert sorted(queued) == sorted(task_id_of("tick", t) for t in ticks)
    assert int(ra.hget("ppq:0:stats", "pushed")) == len(ticks)
    # Each tick was pushed before it counted as missed (none fired as a catch-up, though a master died).
    assert all(created(ra, "tick", t) - t / 1000 < MISSED_AFTER for t in ticks)
    client.close()


def test_a_tick_claimed_by_a_master_that_died_before_pushing_it_is_pushed_once(make_master, redis_a, ra):
    store = Store(0, redis_a.url)
    schedule = check_schedule({"name": "lost", "every": 3600, "task": "tasks.add", "args": [2, 3]})
    now = int(time.time() * 1000)
    tick = schedule.next_after(now)
    store.schedule_save(schedule.to_dict(), tick, "add", "live")
    # What a master does before it dies: the claim, and no push.
    assert store.schedule_claim("lost", tick, tick + 3_600_000, tick, task_id_of("lost", tick))
    assert not store.schedule_claim("lost", tick, tick + 3_600_000, tick, task_id_of("lost", tick))
    assert ra.zrange("ppq:0:schedules:pending", 0, -1) == [task_id_of("lost", tick).encode()]
    assert ticks_of(ra, "lost") == []
    make_master()
    make_master()
    wait_for(lambda: ra.zcard("ppq:0:schedules:pending") == 0, timeout=PENDING_AFTER + 10, what="the push")
    assert ticks_of(ra, "lost") == [tick]
    assert ra.lrange("ppq:0:queue", 0, -1) == [task_id_of("lost", tick).encode()]
    assert int(ra.hget("ppq:0:stats", "pushed")) == 1
    store.close()


def test_when_every_master_was_down_run_once_fires_once_on_return_and_skip_fires_nothing(spawn, redis_a, ra):
    proc, addr = spawn.master(redis_a.url)
    client = Client([addr], config=load_config(environ={}))
    client.add_schedule("once", "tasks.add", every=2, args=[1, 1], missed="run_once")
    client.add_schedule("skip", "tasks.add", every=2, args=[1, 1], missed="skip")
    wait_for(lambda: ticks_of(ra, "once") and ticks_of(ra, "skip"), timeout=10, what="a first tick of each")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    down = time.time()
    first_missed = (int(down * 1000) // 2000 + 1) * 2000
    # Down until two ticks have fallen due, the first more than MISSED_AFTER ago.
    wait_for(lambda: time.time() * 1000 > first_missed + 2000 + MISSED_AFTER * 1000 + 300,
             timeout=MISSED_AFTER + 10, interval=0.05, what="the down time")
    restart = time.time()
    spawn.master(redis_a.url, port=int(addr.rsplit(":", 1)[1]))
    wait_for(lambda: len([t for t in ticks_of(ra, "once") if t >= first_missed]) >= 3
             and len([t for t in ticks_of(ra, "skip") if t >= first_missed]) >= 2, timeout=20,
             what="the schedules to go on after the return")
    once = [t for t in ticks_of(ra, "once") if t >= first_missed]
    # One task stood for the ticks missed (at least two: first_missed and the one after)...
    assert once[0] >= first_missed + 2000, (first_missed, once)
    assert created(ra, "once", once[0]) >= restart
    assert created(ra, "once", once[0]) * 1000 - first_missed > MISSED_AFTER * 1000
    # ... then every tick as usual, each on time.
    assert once[1:] == list(range(once[0] + 2000, once[-1] + 2000, 2000)), once
    assert all(created(ra, "once", t) - t / 1000 < MISSED_AFTER for t in once[1:])
    skip = [t for t in ticks_of(ra, "skip") if t >= first_missed]
    # skip: none of the ticks due while down, then every tick from the return on, on time.
    assert skip[0] >= restart * 1000, (restart, skip)
    assert all(created(ra, "skip", t) - t / 1000 < MISSED_AFTER for t in skip)
    assert skip == list(range(skip[0], skip[-1] + 2000, 2000))
    listed = {s["name"]: s for s in client.schedules()}
    assert listed["skip"]["skipped"] == first_missed / 1000
    client.close()


BAD = [
    ({"name": "b", "cron": "61 * * * *", "task": "tasks.add"}, "cron"),
    ({"name": "b", "cron": "* * * *", "task": "tasks.add"}, "cron"),
    ({"name": "b", "cron": "*/5 * * * *", "every": 5, "task": "tasks.add"}, "cron"),
    ({"name": "b", "task": "tasks.add"}, "cron"),
    ({"name": "b", "every": 0, "task": "tasks.add"}, "every"),
    ({"name": "b", "every": -1, "task": "tasks.add"}, "every"),
    ({"name": "b", "every": "often", "task": "tasks.add"}, "every"),
    ({"name": "b", "every": True, "task": "tasks.add"}, "every"),
    ({"name": "b", "every": 5, "task": "tasks.add", "timezone": "Mars/Olympus"}, "timezone"),
    ({"name": "b", "every": 5, "task": "add"}, "task"),
    ({"name": "b", "every": 5, "task": "tasks.add()"}, "task"),
    ({"name": "b", "every": 5, "task": 7}, "task"),
    ({"name": "b c", "every": 5, "task": "tasks.add"}, "name"),
    ({"name": "b:c", "every": 5, "task": "tasks.add"}, "name"),
    ({"name": "x" * 41, "every": 5, "task": "tasks.add"}, "name"),
    ({"every": 5, "task": "tasks.add"}, "name"),
    ({"name": "b", "every": 5, "task": "tasks.add", "missed": "sometimes"}, "missed"),
    ({"name": "b", "every": 5, "task": "tasks.add", "args": "1 2"}, "args"),
    ({"name": "b", "every": 5, "task": "tasks.add", "kwargs": [1]}, "kwargs"),
    ({"name": "b", "every": 5, "task": "tasks.add", "queue_index": -1}, "queue_index"),
    ({"name": "b", "every": 5, "task": "tasks.add", "max_retry": -1}, "max_retry"),
    ({"name": "b", "every": 5, "task": "tasks.add", "timeout": "long"}, "timeout"),
    ({"name": "b", "every": 5, "task": "tasks.add", "colour": "red"}, "colour"),
]


@pytest.mark.parametrize(("item", "field"), BAD, ids=[f"{f}-{i}" for i, (_, f) in enumerate(BAD)])
def test_a_bad_schedule_in_the_config_is_an_error_naming_its_field(tmp_path, item, field):
    path = tmp_path / "ppq.yaml"
    path.write_text(yaml.safe_dump({"schedules": [{"name": "good", "every": 5, "task": "tasks.add"}, item]}))
    with pytest.raises(ConfigError) as exc:
        load_config(str(path), environ={})
    assert str(exc.value).startswith(f"schedules[1].{field}:"), str(exc.value)


def test_config_errors_name_duplicates_and_the_list(tmp_path):
    with pytest.raises(ConfigError, match=r"^schedules\[1\]\.name: 'a' is declared twice"):
        load_config(overrides={"schedules": [{"name": "a", "every": 1, "task": "m.f"},
                                             {"name": "a", "every": 2, "task": "m.f"}]}, environ={})
    with pytest.raises(ConfigError, match=r"^schedules: expected a list"):
        load_config(overrides={"schedules": {"name": "a"}}, environ={})
    with pytest.raises(ConfigError, match=r"^schedules\[0\]: expected a mapping"):
        load_config(overrides={"schedules": ["a"]}, environ={})


def test_bad_schedules_and_names_over_rpc_are_errors_naming_the_field_and_change_nothing(master, ra, rb):
    client = Client([address_of(master)], config=load_config(environ={}))
    client.add_schedule("kept", "tasks.add", every=3600)
    before = redis_snapshot(ra, rb)
    for item, field in [*BAD, ({"name": "b", "every": 5, "task": "tasks.add", "queue_index": 7}, "queue_index"),
                        ({"name": "kept", "every": 5, "task": "tasks.add"}, "name")]:
        with pytest.raises(InvalidTaskError) as exc:
            client.call("schedule_add", item)
        assert str(exc.value).startswith(f"{field}:"), (item, str(exc.value))
    for junk in ("junk", None, [1], {1: 2}, 10**30):
        with pytest.raises(InvalidTaskError):
            client.call("schedule_add", junk)
    for method in ("schedule_remove", "schedule_pause", "schedule_resume", "schedule_run_now"):
        for name, queue_index, field in [("nope", None, "name"), ("a b", None, "name"), (None, None, "name"),
                                         (["kept"], None, "name"), ("kept", 9, "queue_index"),
                                         ("kept", "0", "queue_index"), ("kept", 1, "name")]:
            with pytest.raises(InvalidTaskError) as exc:
                client.call(method, name, queue_index)
            assert field in str(exc.value), (method, name, queue_index, str(exc.value))
    for junk in (9, "x", [0]):
        with pytest.raises(InvalidTaskError):
            client.call("schedule_list", junk)
    assert redis_snapshot(ra, rb) == before
    client.close()


def test_the_schedule_commands_through_the_real_cli(master, ra, rb):
    addr = address_of(master)
    out = run_ppq("schedule", "add", "tick", "tasks.add", "2", "3", "--every", "1", "-m", addr, "--max-retry", "2")
    assert out.returncode == 0 and out.stdout.startswith("schedule tick added (every 1s, queue_index 0)"), out
    out = run_ppq("schedule", "add", "nightly", "tasks.echo", "--cron", "30 2 * * *", "--timezone", "Europe/Paris",
                  "-k", "who=night", "-q", "1", "-m", addr)
    assert out.returncode == 0, out.stderr
    wait_for(lambda: len(ticks_of(ra, "tick")) >= 2, timeout=10, what="two ticks")
    listed = json.loads(run_ppq("schedule", "list", "--json", "-m", addr).stdout)
    by_name = {s["name"]: s for s in listed}
    assert set(by_name) == {"tick", "nightly"}
    tick = by_name["tick"]
    assert tick["last_id"].startswith("s:tick:") and tick["last_state"] == "queued" and not tick["paused"]
    assert tick["args"] == [2, 3] and tick["max_retry"] == 2 and tick["source"] == "live"
    assert by_name["nightly"]["spec"] == "30 2 * * * Europe/Paris" and by_name["nightly"]["queue_index"] == 1
    assert by_name["nightly"]["kwargs"] == {"who": "night"} and by_name["nightly"]["last_run"] is None
    out = run_ppq("schedule", "list", "-m", addr, env={"COLUMNS": "80"})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), out.stdout
    assert lines[0].split() == ["name", "spec", "q", "next", "run", "last", "run", "task", "state", "paused"]
    row = next(line for line in lines if line.startswith("tick "))
    assert "every 1s" in row and "queued" in row and row.split()[-1] == "no"
    # The last task's id (its tick in base 36), from this listing: a tick may have fired since the first.
    shown = row.split()[-3]
    assert shown == tick["last_id"].rsplit(":", 1)[1] or int(shown, 36) in ticks_of(ra, "tick"), (row, tick)
    # pause: no tick more; resume: ticks again.
    assert run_ppq("schedule", "pause", "tick", "-m", addr).stdout.strip() == "schedule tick paused"
    assert run_ppq("schedule", "pause", "tick", "-m", addr).stdout.strip() == "schedule tick was paused already"
    paused_at = len(ticks_of(ra, "tick"))
    row = next(line for line in run_ppq("schedule", "list", "-m", addr).stdout.splitlines()
               if line.startswith("tick "))
    assert row.split()[-1] == "yes"
    out = run_ppq("schedule", "run-now", "tick", "-m", addr)
    assert out.returncode == 0 and out.stdout.strip().startswith("s:tick:r"), out
    run_id = out.stdout.strip()
    assert ra.hget(f"ppq:0:t:{run_id}", "state") == b"queued"
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:  # paused: nothing fires
        assert len(ticks_of(ra, "tick")) <= paused_at + 1  # a tick claimed as the pause came
        time.sleep(0.1)
    settled = len(ticks_of(ra, "tick"))
    assert run_ppq("schedule", "resume", "tick", "-m", addr).stdout.strip() == "schedule tick resumed"
    wait_for(lambda: len(ticks_of(ra, "tick")) >= settled + 2, timeout=10, what="ticks after resume")
    # Bad input: an error naming the field, nothing changed.
    before = redis_snapshot(rb)
    for args, field in [(["add", "x", "tasks.add", "--cron", "61 * * * *"], "cron"),
                        (["add", "x", "tasks.add", "--every", "0"], "every"),
                        (["add", "x", "tasks.add", "--every", "1", "--timezone", "Nowhere/City"], "timezone"),
                        (["add", "x", "nodots", "--every", "1"], "task"),
                        (["add", "tick", "tasks.add", "--every", "1", "-q", "1"], "name"),
                        (["remove", "nope", "-q", "1"], "name"),
                        (["pause", "nope"], "name")]:
        out = run_ppq("schedule", *args, "-m", addr)
        assert out.returncode == 1 and f"{field}:" in out.stderr and out.stdout == "", (args, out)
    assert redis_snapshot(rb) == before
    assert run_ppq("schedule", "remove", "tick", "-m", addr).stdout.strip() == "schedule tick removed (queue_index 0)"
    assert run_ppq("schedule", "remove", "nightly", "-m", addr).returncode == 0
    assert run_ppq("schedule", "list", "-m", addr).stdout.strip() == "no schedules"
    assert ra.smembers("ppq:0:schedules:names") == set() and ra.zcard("ppq:0:schedules") == 0


def test_config_and_decorated_schedules_are_stored_at_master_start_keeping_their_state(spawn, redis_a, ra,
                                                                                     tmp_path):
    path = tmp_path / "ppq.yaml"
    path.write_text(yaml.safe_dump({
        "master": {"schedule_modules": ["periodic_tasks"]},
        "schedules": [{"name": "every-2", "every": 2, "task": "tasks.add", "args": [1, 2], "max_retry": 3},
                      {"name": "cron-paris", "cron": "0 9 * * 1-5", "timezone": "Europe/Paris",
                       "task": "tasks.echo", "queue_index": 0, "missed": "skip"}]}))
    proc, addr = spawn.master(redis_a.url, "--config", str(path))
    listed = {s["name"]: s for s in json.loads(run_ppq("schedule", "list", "--json", "-m", addr).stdout)}
    assert set(listed) == {"every-2", "cron-paris", "hourly-add"}, listed
    assert listed["every-2"]["source"] == "config" and listed["every-2"]["max_retry"] == 3
    assert listed["cron-paris"]["spec"] == "0 9 * * 1-5 Europe/Paris" and listed["cron-paris"]["missed"] == "skip"
    assert listed["hourly-add"]["task"] == "periodic_tasks.add" and listed["hourly-add"]["every"] == 3600
    wait_for(lambda: ticks_of(ra, "every-2"), timeout=10, what="a tick of the config's schedule")
    # Paused stays paused when a master starts with the same config.
    assert run_ppq("schedule", "pause", "every-2", "-m", addr).returncode == 0
    spawn.master(redis_a.url, "--config", str(path))
    listed = {s["name"]: s for s in json.loads(run_ppq("schedule", "list", "--json", "-m", addr).stdout)}
    assert listed["every-2"]["paused"] and listed["every-2"]["last_id"]
    # A config naming a queue_index the master does not serve is refused at its start.
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"schedules": [{"name": "q", "every": 2, "task": "tasks.add", "queue_index": 3}]}))
    out = run_ppq("master", "--config", str(bad), "--port", "0", "--redis-map", f"0={redis_a.url}")
    assert out.returncode == 2 and "schedules[0].queue_index: 3 is not configured" in out.stderr, out


def test_periodic_registers_a_checked_schedule_on_import():
    from ppq.schedules import PERIODIC

    from . import periodic_tasks

    # Imported here as tests.periodic_tasks; a master imports it as periodic_tasks.
    assert PERIODIC["hourly-add"]["task"] == "tests.periodic_tasks.add"
    assert PERIODIC["hourly-add"]["every"] == 3600 and PERIODIC["hourly-add"]["max_retry"] == 2
    assert periodic_tasks.add(2, 3) == 5 and hasattr(periodic_tasks.add, "push")
    with pytest.raises(InvalidTaskError, match="cron"):
        periodic("61 * * * *")(periodic_tasks.add)
    with pytest.raises(InvalidTaskError, match="every"):
        periodic(every=0)(periodic_tasks.add)


def test_an_in_process_master_refuses_a_schedule_for_a_queue_index_it_does_not_serve(redis_a, ra):
    from ppq.master import MasterServer

    config = load_config(overrides={"master.port": 0, "master.redis_map": {0: redis_a.url},
                                    "schedules": [{"name": "q", "every": 1, "task": "tasks.add", "queue_index": 1}]},
                         environ={})
    with pytest.raises(ConfigError, match=r"^schedules\[0\]\.queue_index: 1 is not configured"):
        MasterServer(config).start()
    assert ra.keys("ppq:*") == []
