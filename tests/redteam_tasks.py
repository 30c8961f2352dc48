"""Task module of the attack tests: one ordinary task, and names that a module
commonly imports (a shell, a process runner, a filesystem class) which a worker
allowing this module must still never run as tasks."""

from __future__ import annotations

import time
from os import system  # noqa: F401 - present on purpose: a name a task must not reach
from pathlib import Path  # noqa: F401 - present on purpose
from subprocess import run  # noqa: F401 - present on purpose


def ok(value: object = None) -> object:
    """The ordinary task: returns its argument."""
    return value


def slow(seconds: float, value: object = "real") -> object:
    """Sleeps, then returns ``value``."""
    time.sleep(seconds)
    return value
