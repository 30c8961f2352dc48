"""Output for people and its failures: the consoles, one-line errors with exit codes, JSON and times."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from ..config import Config
from ..errors import ConfigError, ConnectError, PPQError

# Exit codes.
RET_OK = 0
RET_ERROR = 1
RET_CONFIG = 2


class LazyConsole:
    """A rich Console made on first use: a worker or master that prints no table never imports rich,
    which is about a third of their start-up."""

    def __init__(self, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Any = None

    def get(self) -> Any:
        if self._console is None:
            from rich.console import Console

            stream = sys.stderr if self._stderr else sys.stdout
            # Piped output is not cut to 80 columns, unless COLUMNS says so.
            wide = stream.isatty() or "COLUMNS" in os.environ
            self._console = Console(stderr=self._stderr, width=None if wide else (400 if self._stderr else 160))
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


console = LazyConsole()
err_console = LazyConsole(stderr=True)


def _table(**options: Any) -> Any:
    from rich.table import Table

    return Table(**options)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"time": record.created, "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


# Whether the logs are JSON lines (``--log-format json``): then an error is one too.
_json_logs = False


def json_logs() -> bool:
    """True when logging is set up for JSON lines: commands print nothing plain for people then."""
    return _json_logs


def setup_logging(config: Config) -> None:
    global _json_logs
    handler = logging.StreamHandler(sys.stderr)
    _json_logs = config.log_format == "json"
    if _json_logs:
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("ppq")
    root.handlers[:] = [handler]
    root.setLevel(config.log_level)
    root.propagate = False


def fail(message: str, code: int = RET_ERROR) -> None:
    """The command's one-line error (a JSON line with ``--log-format json``), then its exit code."""
    if _json_logs:
        print(json.dumps({"time": time.time(), "level": "ERROR", "logger": "ppq.cli", "message": message}),
              file=sys.stderr, flush=True)
    else:
        err_console.print(f"ppq: error: {message}", markup=False, highlight=False)
    sys.exit(code)


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Turn ppq errors into one line and an exit code."""
    try:
        return fn()
    except ConfigError as exc:
        fail(str(exc), RET_CONFIG)
    except ConnectError as exc:
        fail(f"ConnectError: {exc} (is a master running there? `ppq up` starts one; -m HOST:PORT or "
             f"--config names another)")
    except PPQError as exc:
        fail(f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)



def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_json_default, sort_keys=True))


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _when(ts: Any) -> str:
    if not ts:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts)))
