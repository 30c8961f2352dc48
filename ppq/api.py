"""Run a master or a worker agent from Python: ``ppq.Master(config).serve()``,
``ppq.Worker(config).serve()``.

Both take a :class:`~ppq.config.Config`, or the seed's dotted settings as a plain
mapping (read with :meth:`Config.from_settings`), or nothing (the same config
the ``ppq`` command would load: ``PPQ_CONFIG``, ``PPQ_*`` variables, defaults).
``serve()`` blocks until ``stop()`` is called from another thread or, when it
runs in the main thread, until SIGTERM or SIGINT. The daemons' modules are
imported only here, so ``import ppq`` stays light.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Mapping
from typing import Any

from .config import Config, load_config


def as_config(config: Config | Mapping[str, Any] | None) -> Config:
    """A Config from a Config, a mapping of dotted settings, or None (loaded as the CLI does)."""
    if config is None:
        return load_config()
    if isinstance(config, Config):
        return config
    return Config.from_settings(config)


class Master:
    """A master daemon over the config's ``master.redis_map`` (an embedded Redis when empty)."""

    def __init__(self, config: Config | Mapping[str, Any] | None = None) -> None:
        self.config = as_config(config)
        self.server: Any = None
        self._stop = threading.Event()

    def start(self) -> Master:
        """Start serving in background threads and return at once."""
        from .master import MasterServer

        self.server = MasterServer(self.config).start()
        return self

    @property
    def address(self) -> str:
        """``host:port`` a client on this machine reaches the running master at."""
        from .config import connect_address

        return connect_address(self.config.master.host, int(self.server.port))

    def serve(self) -> None:
        """Serve until :meth:`stop`, SIGTERM or SIGINT (signals only in the main thread)."""
        from .master import serve

        try:
            serve(self.config, self._stop, server=self.server, ready=self._serving)
        finally:
            self.server = None

    def _serving(self, server: Any) -> None:
        self.server = server

    def stop(self) -> None:
        """Make :meth:`serve` return (safe from a signal handler or another thread)."""
        self._stop.set()


class Worker:
    """A worker agent pulling from ``worker.master_hosts`` (default: the config's own master)."""

    def __init__(self, config: Config | Mapping[str, Any] | None = None) -> None:
        self.config = as_config(config)
        self.agent: Any = None
        self._stop_asked = False

    def serve(self) -> str:
        """Run until :meth:`stop` or a signal; return how it stopped ("graceful", "restart" or "now").

        In the main thread it handles signals as ``ppq worker`` does (SIGTERM, SIGINT
        and SIGUSR1 stop gracefully, SIGUSR2 asks for a restart, a second SIGINT stops
        at once). Like ``ppq worker``, it puts the current directory on sys.path.
        """
        from . import worker as worker_mod

        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        self.agent = worker_mod.Agent(self.config)
        if self._stop_asked:
            self.agent.request_stop()
        if threading.current_thread() is threading.main_thread():
            worker_mod.install_signal_handlers(self.agent)
        return str(self.agent.run())

    def stop(self) -> None:
        """Ask :meth:`serve` to stop gracefully."""
        self._stop_asked = True
        if self.agent is not None:
            self.agent.request_stop()
