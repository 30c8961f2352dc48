"""The control object a worker serves over Pyro5 as ``worker`` (``ppq workers`` reads it)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import rpc

if TYPE_CHECKING:
    from .agent import Agent


class WorkerControl:
    """The object a worker exposes as ``worker``."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent

    @rpc.remote(role=rpc.ANY)
    def ping(self) -> str:
        return "pong"

    @rpc.remote(role=rpc.ANY)
    def get_running_info(self) -> dict[str, Any]:
        """The agent's identity and the tasks it is running now."""
        return self.agent.running_info()

    @rpc.remote(role=rpc.ANY)
    def get_worker_stats(self) -> dict[str, Any]:
        """Per function: count, ok, failed, total_time and mean_time in seconds.

        Tasks refused before they ran count under ``(refused)``; functions beyond the
        first MAX_FUNC_LABELS under ``(other)``.
        """
        return self.agent.stats_snapshot()
