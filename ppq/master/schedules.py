"""Periodic schedules on a master: the due-check duty that fires them, and the remote methods
that manage them (``schedule_list``, ``schedule_add``, ``schedule_remove``, ``schedule_pause``,
``schedule_resume``, ``schedule_run_now``), as :class:`Scheduling`, a base class of
:class:`~ppq.master.exposed.Master`.

Exactly once, with any number of masters, any of which may die at any instant:

1. every master's due-check (one thread per queue_index) reads the schedules whose next
   tick has come, by the Redis server's clock, and sleeps until the next one (at most
   ``CHECK_INTERVAL``);
2. for a due tick it computes the tick that follows and runs ``schedule_claim.lua``, a
   compare-and-set of the schedule's ``next`` from the tick it read to the following
   one: one master wins, the others change nothing. The same script adds the task id,
   ``s:<name>:<tick>``, to ``schedules:pending``;
3. the winner pushes the task under that id (the ordinary push, so a waiting worker
   gets it at once), then takes the id off ``schedules:pending``;
4. an id left pending for ``PENDING_AFTER`` seconds (its master died between 2 and 3)
   is pushed again by whichever master sees it: a push of an id already stored stores
   nothing, so a tick is neither lost nor run twice.

Declared schedules (the config's ``schedules`` and the ``@periodic`` functions of
``master.schedule_modules``) are stored when the due-check starts, keeping the state
(paused, last run) of those already stored.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from .. import rpc
from ..config import Config
from ..errors import ConfigError, InvalidTaskError, StorageError
from ..schedules import (
    DEFINITION_KEYS,
    PERIODIC,
    Schedule,
    check_name,
    check_schedule,
    name_of,
    run_now_id,
    task_id_of,
)
from ..store import Store
from ..task import TaskSpec, check_push, check_queue_index
from .checks import import_declaring_modules

log = logging.getLogger("ppq.master.schedules")

# Longest sleep of a due-check between two looks at Redis, in seconds: a schedule added or
# resumed through another master is seen within it.
CHECK_INTERVAL = 1.0
# Seconds a claimed tick's task may stay unpushed before another master pushes it.
PENDING_AFTER = 2.0
# Most due schedules (and pending ticks) one look handles; more are handled at once after.
DUE_BATCH = 100


def _when(ms: int | None) -> str:
    if ms is None:
        return "-"
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


class Scheduling:
    """The schedules part of the master (see the module docstring)."""

    config: Config
    stores: dict[int, Store]
    _stop: threading.Event
    _threads: list[threading.Thread]

    # Provided by Waiting: store tasks, handing them to a waiting long-poll.
    _push: Callable[[int, list[TaskSpec]], list[str]]

    # -- the due-check ---------------------------------------------------

    def declared_schedules(self) -> dict[int, list[Schedule]]:
        """The config's schedules and those ``@periodic`` declares in ``master.schedule_modules``,
        checked against this master's queue_indexes, by queue_index (ConfigError naming the field)."""
        declared: list[tuple[str, Mapping[str, Any]]] = [
            (f"schedules[{i}].", item) for i, item in enumerate(self.config.schedules)]
        import_declaring_modules(self.config.master.schedule_modules)
        for module in self.config.master.schedule_modules:
            declared += [(f"@periodic {name} (in {module}): ", item) for name, item in PERIODIC.items()
                         if item["task"].startswith(module + ".")]
        out: dict[int, list[Schedule]] = {}
        names: set[str] = set()
        for where, item in declared:
            schedule = check_schedule(item, where, ConfigError, self.config.limits, self.stores)
            if schedule.name in names:
                raise ConfigError(f"{where}name: {schedule.name!r} is declared twice")
            names.add(schedule.name)
            out.setdefault(schedule.queue_index, []).append(schedule)
        return out

    def start_schedules(self) -> None:
        """Check the declared schedules (ConfigError), then start one due-check per queue_index."""
        declared = self.declared_schedules()
        for qi, store in self.stores.items():
            t = threading.Thread(target=self._due_check, args=(qi, store, declared.get(qi, [])),
                                 name=f"ppq-schedules-{qi}", daemon=True)
            t.start()
            self._threads.append(t)

    def _due_check(self, qi: int, store: Store, declared: list[Schedule]) -> None:
        """Store the declared schedules, then fire due ticks and push pending ones until stopped."""
        failing = False
        while not self._stop.is_set():
            pause = CHECK_INTERVAL
            try:
                while declared:
                    schedule = declared[0]
                    now = int(time.time() * 1000)
                    if store.schedule_save(schedule.to_dict(), schedule.next_after(now), "put", "config") in (1, 3):
                        log.info("queue_index %s: schedule %s (%s, %s) stored", qi, schedule.name, schedule.spec,
                                 schedule.task)
                    declared.pop(0)
                now, due, pending, following = store.schedules_due(DUE_BATCH, PENDING_AFTER)
                for name in due:
                    self._fire(store, name, now)
                for task_id in pending:
                    self._push_again(store, task_id)
                if len(due) >= DUE_BATCH or len(pending) >= DUE_BATCH:
                    pause = 0.0
                elif following is not None:
                    pause = min(pause, max((following - now) / 1000, 0.002))
                if failing:
                    log.info("queue_index %s: schedules: redis is back", qi)
                    failing = False
            except StorageError as exc:
                if not failing:
                    log.error("schedules: %s", exc)
                failing = True
            except Exception:  # noqa: BLE001 - keep the due-check alive whatever happens
                log.exception("queue_index %s: schedule due-check failed", qi)
            self._stop.wait(pause)

    def _stored(self, store: Store, name: str) -> tuple[dict[str, Any], Schedule] | None:
        entry = store.schedule(name)
        if entry is None:
            return None
        definition = {k: v for k, v in entry.items() if k in DEFINITION_KEYS}
        return entry, check_schedule(definition, f"schedule {name}: ", InvalidTaskError, self.config.limits,
                                     self.stores)

    def _fire(self, store: Store, name: str, now: int) -> None:
        """Claim the due tick of ``name`` and push its task, unless another master claimed it first."""
        try:
            found = self._stored(store, name)
        except InvalidTaskError as exc:
            log.error("queue_index %s: %s; it is paused", store.queue_index, exc)
            store.schedule_change(name, "pause")
            return
        if found is None:
            return
        entry, schedule = found
        tick = entry["next_tick"]
        if entry["paused"] or tick is None or tick > now:
            return
        fire, following = schedule.plan(tick, now)
        task_id = task_id_of(name, fire) if fire is not None else ""
        if not store.schedule_claim(name, tick, following, fire, task_id):
            return  # another master claimed it
        if fire is None:
            log.warning("queue_index %s: schedule %s missed its tick of %s (missed: skip); next at %s",
                        store.queue_index, name, _when(tick), _when(following))
            return
        if fire != tick or now - tick > 1000 * PENDING_AFTER:
            log.warning("queue_index %s: schedule %s missed its ticks from %s (missed: run_once): run once now",
                        store.queue_index, name, _when(tick))
        self._push_tick(store, schedule, task_id)

    def _push_tick(self, store: Store, schedule: Schedule, task_id: str) -> None:
        try:
            spec = check_push(schedule.push_options(task_id), self.stores, self.config.limits,
                              self.config.master.allow_pickle)
            self._push(store.queue_index, [spec])
        except InvalidTaskError as exc:
            log.error("queue_index %s: schedule %s: task %s not pushed: %s", store.queue_index, schedule.name,
                      task_id, exc)
        else:
            log.debug("queue_index %s: schedule %s: task %s pushed", store.queue_index, schedule.name, task_id)
        store.schedule_done(task_id)

    def _push_again(self, store: Store, task_id: str) -> None:
        """Push a claimed tick whose master did not say it pushed it (a second push stores nothing)."""
        try:
            found = self._stored(store, name_of(task_id))
        except InvalidTaskError:
            found = None
        if found is None:
            store.schedule_done(task_id)
            return
        log.warning("queue_index %s: schedule %s: task %s was claimed and not known pushed; pushing it "
                    "(stored once whatever happened)", store.queue_index, found[1].name, task_id)
        self._push_tick(store, found[1], task_id)

    # -- the remote methods ------------------------------------------------

    def _holding(self, name: Any, queue_index: Any) -> list[Store]:
        """The stores holding schedule ``name`` (only ``queue_index``'s when given); InvalidTaskError if none."""
        name = check_name(name)
        stores = list(self.stores.values()) if queue_index is None else [
            self.stores[check_queue_index(queue_index, self.stores)]]
        found = [store for store in stores if store.schedule(name) is not None]
        if not found:
            where = "any queue_index" if queue_index is None else f"queue_index {queue_index}"
            raise InvalidTaskError(f"name: no schedule {name!r} in {where} (ppq schedule list lists them)")
        return found

    @rpc.remote
    def schedule_list(self, queue_index: Any = None) -> list[dict[str, Any]]:
        """Every schedule (of ``queue_index``, None: of all), each with its state: ``spec``,
        ``next_run``, ``last_run`` (seconds), ``last_id`` and that task's ``last_state``, ``paused``."""
        stores = list(self.stores.values()) if queue_index is None else [
            self.stores[check_queue_index(queue_index, self.stores)]]
        out: list[dict[str, Any]] = []
        for store in sorted(stores, key=lambda s: s.queue_index):
            entries = store.schedules()
            ids = [e["last_id"] for e in entries if e["last_id"]]
            states = {i: (info or {}).get("state") for i, info in zip(ids, store.infos(ids), strict=True)}
            for entry in entries:
                definition = {k: v for k, v in entry.items() if k in DEFINITION_KEYS}
                try:
                    entry["spec"] = check_schedule(definition, "", InvalidTaskError).spec
                except InvalidTaskError:
                    entry["spec"] = entry.get("cron") or f"every {entry.get('every')}s"
                entry["last_state"] = states.get(entry["last_id"]) if entry["last_id"] else None
                entry.pop("next_tick", None)
                out.append(entry)
        return out

    @rpc.remote
    def schedule_add(self, schedule: Any) -> dict[str, Any]:
        """Store a new schedule (its plain form: name, cron | every, task, args, kwargs, queue_index,
        timezone, missed, push options); return it with its state. A name already stored in any
        queue_index is refused."""
        checked = check_schedule(schedule, "", InvalidTaskError, self.config.limits, self.stores)
        for store in self.stores.values():
            if store.schedule(checked.name) is not None:
                raise InvalidTaskError(f"name: a schedule {checked.name!r} exists already (queue_index "
                                       f"{store.queue_index}); remove it first")
        store = self.stores[checked.queue_index]
        if not store.schedule_save(checked.to_dict(), checked.next_after(int(time.time() * 1000)), "add", "live"):
            raise InvalidTaskError(f"name: a schedule {checked.name!r} exists already; remove it first")
        log.info("queue_index %s: schedule %s (%s, %s) added", store.queue_index, checked.name, checked.spec,
                 checked.task)
        entry = dict(store.schedule(checked.name) or {})
        entry.pop("next_tick", None)
        entry["spec"] = checked.spec
        return entry

    @rpc.remote
    def schedule_remove(self, name: Any, queue_index: Any = None) -> list[int]:
        """Delete schedule ``name``; returns the queue_indexes it was removed from. A schedule declared
        in the config comes back at a master's next start."""
        return self._change(name, queue_index, "remove")

    @rpc.remote
    def schedule_pause(self, name: Any, queue_index: Any = None) -> list[int]:
        """Fire nothing of schedule ``name`` until schedule_resume; returns the queue_indexes where it
        changed."""
        return self._change(name, queue_index, "pause")

    @rpc.remote
    def schedule_resume(self, name: Any, queue_index: Any = None) -> list[int]:
        """Fire schedule ``name`` again, from its first tick after now (the ticks of the pause are skipped)."""
        return self._change(name, queue_index, "resume")

    def _change(self, name: Any, queue_index: Any, op: str) -> list[int]:
        changed = []
        for store in self._holding(name, queue_index):
            value: Any = ""
            if op == "resume":
                found = self._stored(store, name)
                if found is None:
                    continue
                value = found[1].next_after(int(time.time() * 1000))
            if store.schedule_change(name, op, value):
                changed.append(store.queue_index)
        if changed:
            log.info("schedule %s: %s (queue_index %s)", name, {"remove": "removed", "pause": "paused",
                                                               "resume": "resumed"}[op], ", ".join(map(str, changed)))
        return changed

    @rpc.remote
    def schedule_run_now(self, name: Any, queue_index: Any = None) -> str:
        """Push schedule ``name``'s task now, besides its ticks (paused or not); return the task id."""
        store = self._holding(name, queue_index)[0]
        found = self._stored(store, name)
        if found is None:
            raise InvalidTaskError(f"name: no schedule {name!r}")
        now = int(time.time() * 1000)
        task_id = run_now_id(name, now)
        spec = check_push(found[1].push_options(task_id), self.stores, self.config.limits,
                          self.config.master.allow_pickle)
        task_id = self._push(store.queue_index, [spec])[0]
        store.schedule_change(name, "ran", task_id, now)
        log.info("queue_index %s: schedule %s run now: task %s", store.queue_index, name, task_id)
        return task_id


__all__ = ["CHECK_INTERVAL", "DUE_BATCH", "PENDING_AFTER", "Scheduling"]
