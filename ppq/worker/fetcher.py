"""The fetcher thread: long-polls a master for tasks whenever the agent has room for some."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from .. import rpc
from ..errors import PPQError
from .backoff import MAX_PAUSE, Backoff

if TYPE_CHECKING:
    from .agent import Agent


class Fetcher:
    """Asks for as many tasks as the pool has room for, waiting up to ``max_sleep`` for them."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.backoff = Backoff(min(agent.max_sleep, MAX_PAUSE))
        # Set while a long-poll is in flight: a stopping agent waits for it to come back.
        self.fetching = threading.Event()

    def run(self) -> None:
        agent, pool = self.agent, self.agent.pool
        while not agent.stopping:
            n = pool.reserve(block=True)
            if n <= 0:
                continue
            self.fetching.set()
            try:
                reply = agent.poll("report", agent.light_info(), agent.queue_index, [], n, agent.max_sleep)
                tasks = reply["tasks"]
                self.backoff.reset()
                agent.outage.ok()
            except (PPQError, rpc.CommunicationError) as exc:
                tasks = []
                agent.outage.failed("cannot get tasks", exc)
                agent.stop_event.wait(self.backoff.pause)
                self.backoff.failed()
            finally:
                self.fetching.clear()
            pool.accept(n, tasks)
