"""The heartbeat thread: extends the leases of the tasks the agent holds and keeps it listed."""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any

from .. import rpc
from ..errors import PPQError

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("ppq.worker")

# An idle agent (no task held, nothing new to say) sends one heartbeat in this many intervals:
# its long-polls keep it listed; this one refreshes its stored info.
IDLE_BEATS = 30


class Heartbeat:
    """Every ``worker.heartbeat_interval`` seconds, one ``heartbeat`` call; ends once reporting is over.

    The agent sends the first one itself as it starts (:meth:`beat`), so that it is listed with
    its full info before it asks for a task. A failed heartbeat is not retried sooner: the next
    one comes at the next interval, well within the lease, which lasts several intervals, or as
    soon as a master answers another call again (``wake``), which also lists at once, in full,
    a worker whose first heartbeat found no master.

    An idle agent skips its heartbeats: while it holds no task, its long-poll is out and its
    info is what it last sent, its long-polls keep it listed (a master counts a worker live for
    three heartbeat intervals after its long-poll ends), and it sends one heartbeat every
    :data:`IDLE_BEATS` intervals. Ten thousand idle agents cost a master one call each per
    ``worker.max_sleep``.
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.interval = agent.config.worker.heartbeat_interval
        self.wake = threading.Event()
        # The info of the last heartbeat a master took, and when (monotonic) it went.
        self._sent: dict[str, Any] | None = None
        self._sent_at = 0.0

    def refresh(self) -> None:
        """A heartbeat at once, in full (the masters answer again after an outage)."""
        self._sent = None
        self.wake.set()

    def beat(self, idle_skip: bool = False) -> None:
        """One heartbeat: the agent's info and the leases of every task it holds. With
        ``idle_skip``, none when the agent is idle and has nothing new to say."""
        agent, pool = self.agent, self.agent.pool
        held = [r for slot in list(pool.slots) for r in slot.pending()]
        running = [(r.task["id"], r.task["lease"]) for r in held]
        with pool.cond:
            running += [(t["id"], t["lease"]) for t in pool.inbox]
        info = agent.info()
        now = time.monotonic()
        if (idle_skip and not running and info == self._sent and agent.fetcher.fetching.is_set()
                and now - self._sent_at < IDLE_BEATS * self.interval):
            return
        try:
            lost = set(agent.call("heartbeat", info, agent.queue_index, running)["lost"])
        except (PPQError, rpc.CommunicationError) as exc:
            self._sent = None
            agent.outage.failed("heartbeat failed", exc)
            return
        self._sent, self._sent_at = info, now
        agent.outage.ok()
        for r in held:
            if r.task["id"] in lost and not r.lost:
                r.lost = True
                log.warning("task %s: lease lost or task cancelled; its result will be dropped", r.task["id"])

    def run(self) -> None:
        done = self.agent.reporter.done
        # Leases are still extended while a graceful stop lets tasks finish.
        while not done.is_set():
            self.wake.wait(self.interval)
            self.wake.clear()
            if done.is_set():
                return
            self.beat(idle_skip=True)
