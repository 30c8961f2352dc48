"""Task targets of the workflow tests (tests/test_workflows.py)."""

import time

from ppq import task


@task
def add(a, b):
    return a + b


@task(max_retry=0)
def mul(a, b):
    return a * b


def ident(value):
    return value


def boom(*args):
    raise ValueError("boom")


def tally(results, path):
    """A chord's callback: one line per run, the number of results it got; returns them."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{len(results)}\n")
    return results


def step(previous, i, path, seconds=0.0):
    """A chain's step: appends its place to the file and to the list it was given."""
    with open(path, "a", encoding="utf-8") as f:
        f.write(f"{i}\n")
    if seconds:
        time.sleep(seconds)
    return previous + [i]


def square(x, seconds=0.0):
    if seconds:
        time.sleep(seconds)
    return x * x


def nap(seconds, value=None):
    time.sleep(seconds)
    return value


def echo(*args, **kwargs):
    return {"args": list(args), "kwargs": kwargs}
