"""A task module that imports dangerous names, for the tests of the worker's allowlist.

A worker allowing this module must run only what is defined here: ``system``,
``run``, ``Path``, ``shell`` and ``sneaky`` are reachable as attributes of the
module but were defined elsewhere, so tasks naming them are refused.
"""

import functools
from functools import partial
from os import system  # noqa: F401 - a name a task must not reach
from pathlib import Path, PosixPath  # noqa: F401 - Path: a class a task must not reach
from subprocess import run

shell = partial(run, shell=True)


def _foreign(fn):
    """A decorator as a library writes it: the wrapper keeps its own module and points at ``fn``."""

    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    wrapper.__module__ = "some_library.decorators"
    wrapper.__wrapped__ = fn
    return wrapper


def _wraps(fn):
    """A ``functools.wraps`` decorator."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs)

    return wrapper


# Defined here, but only a wrapper around subprocess.run: refused.
sneaky = _wraps(run)


@_foreign
def traced_add(a, b):
    return a + b


@_wraps
def wrapped_mul(a, b):
    return a * b


@functools.cache
def cached_square(x):
    return x * x


class Home(PosixPath):
    """Defined here, but its methods (chmod...) come from pathlib."""


class Launcher:
    """Counts its instances: a refused method must be refused before the class is instantiated."""

    created = 0

    def __init__(self):
        Launcher.created += 1

    system = system
    run = staticmethod(run)

    def hello(self):
        return "hello"


class Shadow:
    """Its instances hide a method of the class behind an attribute of their own."""

    def __init__(self):
        self.hello = system

    def hello(self):
        return "hello"


def __getattr__(name):
    """Module attributes ``many_N``: as many distinct task functions as a test needs, defined here."""
    if name.startswith("many_"):

        def many():
            return name

        many.__qualname__ = name
        return many
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

