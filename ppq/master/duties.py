"""The background duties of a master, one thread per queue_index, each at its own interval:

- the mover: due delayed tasks into the queue, every ``master.reaper_interval`` seconds
  or sooner when the next delayed task is due sooner (at most every 5 ms); it also wakes
  long-polls when a function held back by its rate limit gets its next token;
- the reaper: expired leases back to the queue (or to the dead list), and the stagings of
  big workflows left by a master that died storing them settled, every
  ``master.reaper_interval`` seconds;
- the summary: one INFO line of counts every ``SUMMARY_INTERVAL`` seconds, when it changed.

Each duty is a Lua script safe to run on every master at once. A Redis outage is
logged once, and its end once. The threads are started and stopped by
:meth:`~ppq.master.exposed.Master.start_background` / ``stop_background``, with
the wake-up listeners of :mod:`ppq.master.waiting`.
"""

from __future__ import annotations

import logging
import threading
import time

from ..errors import StorageError
from ..store import Store

log = logging.getLogger("ppq.master")

# Seconds between the INFO summary lines of each queue_index.
SUMMARY_INTERVAL = 60.0


def run_duties(qi: int, store: Store, interval: float, stop: threading.Event) -> None:
    """Move due delayed tasks, reap expired leases and log the summary of queue_index ``qi``, until
    ``stop`` is set."""
    next_reap = 0.0
    next_summary = time.monotonic() + SUMMARY_INTERVAL
    last_summary = ""
    failing = False
    # The Redis time of the previous wake_held: functions held back by their rate limit whose
    # next token came due since then wake long-polls.
    since = 0.0
    while not stop.is_set():
        pause = interval
        try:
            _, next_eta, now = store.move_due()
            if next_eta is not None:
                pause = min(pause, max(next_eta - now, 0.005))
            _, next_eta, since = store.wake_held(since)
            if next_eta is not None:
                pause = min(pause, max(next_eta - since, 0.005))
            if time.monotonic() >= next_reap:
                reaped, dead = store.reap()
                if reaped > len(dead):
                    log.info("queue_index %s: %s expired lease(s): back to the queue", qi, reaped - len(dead))
                for task_id, expiries in dead:
                    log.warning("queue_index %s: task %s dead-listed: its worker was lost %s times "
                                "(master.max_lease_expiries %s)", qi, task_id, expiries, store.max_lease_expiries)
                # Big workflows whose master died while storing them (FlowStore.settle_staged).
                store.settle_staged()
                next_reap = time.monotonic() + interval
            if failing:
                log.info("queue_index %s: redis is back", qi)
                failing = False
            if time.monotonic() >= next_summary:
                next_summary = time.monotonic() + SUMMARY_INTERVAL
                c = store.counts()
                summary = (f"queued={c['queued']} delayed={c['delayed']} running={c['running']} "
                           f"dead={c['dead']} done/min={c['done_per_min']} failed/min={c['failed_per_min']}")
                if summary != last_summary:
                    log.info("queue_index %s: %s", qi, summary)
                    last_summary = summary
        except StorageError as exc:
            if not failing:
                log.error("%s", exc)
            failing = True
            pause = interval
        except Exception:  # noqa: BLE001 - keep the duty loop alive whatever happens
            log.exception("queue_index %s: background duty failed", qi)
        stop.wait(pause)
