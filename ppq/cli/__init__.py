"""The ``ppq`` command: the only part of ppq that imports click, prints for people, or exits.

Settings come from, highest first: flags, ``PPQ_*`` environment variables, the
YAML file given by ``--config`` (or ``PPQ_CONFIG``), defaults.

Each command parses its options, builds the config and calls into the library:

- ``base.py``: the ``main`` click group, config building, the option decorators
  every command shares, signal flags, the client a command talks through;
- ``output.py``: the consoles, one-line errors and exit codes (``RET_*``), JSON
  and time formatting, logging set-up;
- ``daemons.py``: ``master``, ``worker`` and ``up`` (which runs ``ppq.stack``);
- ``tasks.py``: ``push``, ``task`` and ``cancel``;
- ``operate.py``: ``status``, ``top``, ``workers`` and the ``dead`` group;
- ``queues.py``: the ``queue`` group (``purge``, ``pause``, ``resume``) and
  ``workers pause`` / ``workers resume``;
- ``schedules.py``: the ``schedule`` group (``list``, ``add``, ``remove``,
  ``pause``, ``resume``, ``run-now``);
- ``limits.py``: the ``limit`` group (``set``, ``remove``, ``list``);
- ``dashboard.py``: ``dashboard``, the web dashboard (``ppq.dashboard``).

``main`` is the entry point of the ``ppq`` console script and of ``python -m ppq``.
"""

from __future__ import annotations

from . import daemons, dashboard, limits, operate, queues, schedules, tasks  # noqa: F401 - importing them adds their commands to main
from .base import _examples_last, main
from .operate import status_tables
from .output import RET_CONFIG, RET_ERROR, RET_OK

__all__ = ["RET_CONFIG", "RET_ERROR", "RET_OK", "main", "status_tables"]

_examples_last(main)
