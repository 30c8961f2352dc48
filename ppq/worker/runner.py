"""Running an agent as this process: signal handlers, :func:`run`, and :func:`restart` in place."""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any, NoReturn

from ..config import Config
from .agent import GRACEFUL, NOW, RESTART, Agent

log = logging.getLogger("ppq.worker")


def install_signal_handlers(agent: Agent) -> None:
    """SIGTERM/SIGINT/SIGUSR1: graceful stop; SIGUSR2: graceful restart; a second SIGINT: stop now."""
    interrupted: list[bool] = []

    def graceful(signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            if interrupted:
                agent.request_stop(NOW)
                return
            interrupted.append(True)
        agent.request_stop(GRACEFUL)

    def restart(signum: int, frame: Any) -> None:
        agent.request_stop(RESTART)

    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        signal.signal(getattr(signal, name), graceful)
    signal.signal(signal.SIGUSR2, restart)


def run(config: Config) -> str:
    """Run an agent in this process with signal handling; return how it stopped.

    Like other task queues' workers, it puts the current directory on sys.path so
    that task modules beside the deployment import as they do for the pusher.
    """
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    agent = Agent(config)
    install_signal_handlers(agent)
    return agent.run()


def restart_command() -> list[str]:
    """The command that started this agent, interpreter options included: what a restart runs."""
    return [sys.executable, *sys.orig_argv[1:]]


def _stop_multiprocessing_helpers() -> None:
    """Stop the fork server and resource tracker multiprocessing may have started for executors:
    after an exec they would be children nobody waits for."""
    from multiprocessing import forkserver, resource_tracker

    for helper in (getattr(forkserver, "_forkserver", None), getattr(resource_tracker, "_resource_tracker", None)):
        stop = getattr(helper, "_stop", None)
        if stop is not None:
            try:
                stop()
            except (OSError, ChildProcessError):
                pass


def restart() -> NoReturn:
    """Replace this process, once its agent has stopped, by a fresh agent with the same command line.

    ``os.execv`` keeps the pid, so systemd, supervisord or ``ppq up`` keep
    supervising it and nothing leaves the process group (huey restarts its
    consumer the same way). The executors have exited by now; file descriptors
    close on exec (Python opens them non-inheritable).
    """
    command = restart_command()
    log.info("restarting in place (pid %d): %s", os.getpid(), " ".join(command))
    _stop_multiprocessing_helpers()
    for handler in [*logging.getLogger().handlers, *logging.getLogger("ppq").handlers]:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(command[0], command)
