"""The heartbeat thread: extends the leases of the tasks the agent holds and keeps it listed."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .. import rpc
from ..errors import PPQError

if TYPE_CHECKING:
    from .agent import Agent

log = logging.getLogger("ppq.worker")


class Heartbeat:
    """Every ``worker.heartbeat_interval`` seconds, one ``heartbeat`` call; ends once reporting is over.

    A failed heartbeat is not retried sooner: the next one comes at the next
    interval, well within the lease, which lasts several intervals.
    """

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.interval = agent.config.worker.heartbeat_interval

    def run(self) -> None:
        agent, pool = self.agent, self.agent.pool
        while True:
            held = [r for slot in list(pool.slots) for r in slot.pending()]
            running = [(r.task["id"], r.task["lease"]) for r in held]
            with pool.cond:
                running += [(t["id"], t["lease"]) for t in pool.inbox]
            try:
                lost = set(agent.call("heartbeat", agent.info(), agent.queue_index, running)["lost"])
                for r in held:
                    if r.task["id"] in lost and not r.lost:
                        r.lost = True
                        log.warning("task %s: lease lost or task cancelled; its result will be dropped",
                                    r.task["id"])
            except (PPQError, rpc.CommunicationError) as exc:
                log.warning("heartbeat failed: %s", exc)
            # Leases are still extended while a graceful stop lets tasks finish.
            if agent.reporter.done.wait(self.interval):
                return
