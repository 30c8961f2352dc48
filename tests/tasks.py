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
