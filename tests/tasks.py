"""Task targets used by the tests: plain importable functions."""

import os
import time


def add(a, b):
    return a + b


def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}


def boom(message="boom"):
    raise ValueError(message)


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def pid():
    return os.getpid()


def record(path, token, seconds=0.0):
    """Append ``token`` to the file at ``path`` (one line per execution), then sleep."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{token}\n")
    if seconds:
        time.sleep(seconds)
    return token


def unencodable():
    return object()


class Calculator:
    def double(self, x):
        return 2 * x

    @staticmethod
    def triple(x):
        return 3 * x


def fail_until(flag, path, token):
    """Append ``token`` to ``path`` (one line per run); raise until the file ``flag`` exists."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{token}\n")
    if not os.path.exists(flag):
        raise RuntimeError(f"{token}: flag {os.path.basename(flag)} is missing")
    return token


import ppq  # noqa: E402 - only the decorated task below needs it


@ppq.task(queue_index=1)
def times_ten(x):
    """A ``@ppq.task`` pushed to queue_index 1 by ``times_ten.push(x)``."""
    return x * 10


def sys_path():
    """The executor's sys.path (to check that a refused task `path` was not added)."""
    import sys

    return list(sys.path)


def span(path, token, seconds):
    """Sleep ``seconds``; append ``token start end`` (wall clock) to ``path``; return ``token``."""
    start = time.time()
    time.sleep(seconds)
    end = time.time()
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{token} {start!r} {end!r}\n")
    return token


def rerun(path, first_seconds):
    """Append a line to ``path``; the first execution sleeps ``first_seconds``, later ones return at once.

    Returns how many times the task has run (the line count).
    """
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{os.getpid()}\n")
    with open(path, encoding="utf-8") as f:
        runs = len(f.read().splitlines())
    if runs == 1:
        time.sleep(first_seconds)
    return runs


from ppq import task as _ppq_task  # noqa: E402 - kept beside the functions that use it


@_ppq_task
def mul(a, b):
    """Decorated with the bare ``@ppq.task``: ``mul.push(a, b)`` enqueues, ``mul(a, b)`` runs here."""
    return a * b


def plus(a, b=0):
    """Left undecorated: a test decorates it with ``ppq.task(client=..., **options)`` itself."""
    return a + b


def big(size):
    """A result of ``size`` bytes."""
    return b"x" * size
