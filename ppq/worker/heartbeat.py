"""The heartbeat thread: extends the leases of the tasks the agent holds and keeps it listed."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from .. import rpc
from ..errors import PPQError

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("ppq.worker")


class Heartbeat:
    """Every ``worker.heartbeat_interval`` seconds, one ``heartbeat`` call; ends once reporting is over.

    The agent sends the first one itself as it starts (:meth:`beat`), so that it is listed with
    its full info before it asks for a task. A failed heartbeat is not retried sooner: the next
    one comes at the next interval, well within the lease, which lasts several intervals, or as
    soon as a master answers another call again (``wake``), which also lists at once, in full,
    a worker whose first heartbeat found no master.
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.interval = agent.config.worker.heartbeat_interval
        self.wake = threading.Event()

    def beat(self) -> None:
        """One heartbeat: the agent's info and the leases of every task it holds."""
        agent, pool = self.agent, self.agent.pool
        held = [r for slot in list(pool.slots) for r in slot.pending()]
        running = [(r.task["id"], r.task["lease"]) for r in held]
        with pool.cond:
            running += [(t["id"], t["lease"]) for t in pool.inbox]
        try:
            lost = set(agent.call("heartbeat", agent.info(), agent.queue_index, running)["lost"])
        except (PPQError, rpc.CommunicationError) as exc:
            agent.outage.failed("heartbeat failed", exc)
            return
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
            self.beat()
