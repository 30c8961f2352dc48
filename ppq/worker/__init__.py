"""The worker agent: pull tasks from a master, run them in executors, report back.

One agent process runs ``concurrency`` executors (processes, or threads with
``pool: threads``) under a supervisor loop in its main thread, plus three helper
threads, each calling a master:

- the *fetcher* long-polls a master for tasks whenever an executor is free;
- the *reporter* sends finishes and errors in batches, and takes the next tasks
  in the same reply (piggyback);
- the *heartbeat* extends the leases of running tasks and keeps the agent listed.

Signal handlers only set flags (see :meth:`Agent.request_stop`); the supervisor
acts on them. The agent never talks to Redis.

Where things live:

- ``agent.py``: :class:`Agent`, its lifecycle (start, run, graceful stop);
- ``runner.py``: an agent as this process: signal handlers, :func:`run`, and
  :func:`restart` in place (``os.execv``) after SIGUSR2;
- ``pool.py``: :class:`Pool`, the executors and the tasks the agent holds:
  capacity, dispatch, timeouts, outcomes;
- ``fetcher.py``, ``reporter.py``, ``heartbeat.py``: one class per helper
  thread, each with its own backoff (``backoff.py``);
- ``executors.py``: the :class:`Slot` protocol, process and thread slots,
  :func:`execute` and :func:`resolve` (with the allowlist);
- ``hooks.py``: :func:`add_hook`; ``stats.py``: the figures per function;
- ``control.py``: :class:`WorkerControl`, served over Pyro5 as ``worker``.
"""

from __future__ import annotations

from .agent import GRACEFUL, NOW, RESTART, Agent
from .backoff import Backoff
from .control import WorkerControl
from .executors import MAX_EXECUTOR_BATCH, ProcessSlot, Running, Slot, ThreadSlot, execute, resolve
from .fetcher import Fetcher
from .heartbeat import Heartbeat
from .hooks import HOOK_NAMES, add_hook, preload_in_executors
from .pool import Pool
from .reporter import Reporter
from .runner import install_signal_handlers, restart, restart_command, run
from .stats import MAX_FUNC_LABELS, OTHER, REFUSED, Counters, FuncStats

__all__ = [
    "GRACEFUL", "HOOK_NAMES", "MAX_EXECUTOR_BATCH", "MAX_FUNC_LABELS", "NOW", "OTHER", "REFUSED", "RESTART",
    "Agent", "Backoff", "Counters", "Fetcher", "FuncStats", "Heartbeat", "Pool", "ProcessSlot", "Reporter",
    "Running", "Slot", "ThreadSlot", "WorkerControl", "add_hook", "execute", "install_signal_handlers",
    "preload_in_executors", "resolve", "restart", "restart_command", "run",
]
