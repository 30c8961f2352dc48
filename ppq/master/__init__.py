"""The master: a stateless Pyro5 object over the Redis stores, and ``serve()``.

Any number of masters can serve the same queues; every background duty
(delayed-task mover, lease reaper) is a Lua script that is safe to run on all of
them at once.

The package, in import order (each module imports only those above it):

- ``checks.py``: the checks on what callers send that is not a task's fields
  (``worker_info``, bounded numbers, results, dead-task ids, a push_tasks batch
  as a whole);
- ``waiting.py``: long-polls (:class:`Waiter`, :class:`Waker`), the hand-off of a
  push to a waiting worker, wake-ups from other masters, ``wait_task(s)``;
- ``duties.py``: the background duties of each queue_index (mover, reaper,
  summary line), each at its own interval;
- ``schedules.py``: :class:`Scheduling`, a base class of ``Master``: the due-check
  that fires periodic schedules exactly once across masters, and the remote
  methods that manage them;
- ``operate.py``: :class:`Operations`, the operator's methods of the ``queue``
  object: cancel, the dead list, purge and pause, ``server_info``;
- ``exposed.py``: :class:`Master`, the object exposed as ``queue`` (with
  :class:`Operations`, :class:`Scheduling` and :class:`Waiting` as its bases): pushes, the worker's
  calls, task lookups and waits, and their argument checks;
- ``server.py``: :class:`MasterServer` (stores, Pyro5 daemon, metrics, shutdown)
  and :func:`serve`, which runs one until it is told to stop.
"""

from .checks import (
    MAX_POLL,
    MAX_RUNNING_LISTED,
    MAX_WAIT,
    WORKER_NUMBER_FIELDS,
    WORKER_TEXT_FIELDS,
    worker_entry,
    worker_id_of,
)
from .duties import SUMMARY_INTERVAL, run_duties
from .exposed import Master
from .operate import Operations
from .server import MIN_REDIS, MasterServer, open_stores, raise_open_files_limit, serve
from .waiters import Waiter, Waker
from .waiting import MAX_REMEMBERED_LEASES, Waiting

__all__ = [
    "MAX_REMEMBERED_LEASES",
    "MAX_RUNNING_LISTED",
    "MAX_POLL",
    "MAX_WAIT",
    "MIN_REDIS",
    "SUMMARY_INTERVAL",
    "WORKER_NUMBER_FIELDS",
    "WORKER_TEXT_FIELDS",
    "Master",
    "Operations",
    "MasterServer",
    "Waiter",
    "Waiting",
    "Waker",
    "open_stores",
    "raise_open_files_limit",
    "run_duties",
    "serve",
    "worker_entry",
    "worker_id_of",
]
