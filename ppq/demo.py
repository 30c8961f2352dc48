"""Tasks for ``ppq up --demo``: a first look at a working queue."""

from __future__ import annotations

import os
import time


def add(a: float, b: float) -> float:
    return a + b


def slow_square(x: float, seconds: float = 0.2) -> float:
    time.sleep(seconds)
    return x * x


def where() -> dict[str, object]:
    return {"pid": os.getpid(), "host": os.uname().nodename}


def fail(message: str = "this task fails on purpose") -> None:
    raise RuntimeError(message)
