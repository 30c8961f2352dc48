"""Running ppq's click commands as Django management commands, with the project's settings."""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

import click
from django.core.management.base import BaseCommand

from ...config import Config
from ...errors import ConfigError

log = logging.getLogger("ppq.contrib.django")

# The module every executor imports first: Django's set-up and the connection hooks.
EXECUTOR_SETUP = "ppq.contrib.django.executor"
# Django's own options, applied by manage.py before the command runs: dropped from what click parses.
_DJANGO_OPTIONS = ("--settings", "--pythonpath")


def app_task_modules() -> list[str]:
    """The ``tasks`` module of each installed app that has one, in INSTALLED_APPS order."""
    from django.apps import apps

    found = []
    for app in apps.get_app_configs():
        name = f"{app.name}.tasks"
        if app.name != "ppq.contrib.django" and importlib.util.find_spec(name) is not None:
            found.append(name)
    return found


def allow_app_tasks(config: Config) -> Config:
    """``config`` whose workers also run the tasks of every installed app's ``tasks`` module."""
    allowed = list(config.worker.allowed_modules)
    for name in app_task_modules():
        if name not in allowed:
            allowed.append(name)
    if allowed == config.worker.allowed_modules:
        return config
    return dataclasses.replace(config, worker=dataclasses.replace(config.worker, allowed_modules=allowed))


def launcher() -> list[str]:
    """The command that runs ``ppq`` under this project's settings in a child process (``ppq up``'s workers)."""
    script = sys.argv[0] if sys.argv else ""
    if script.endswith(".py") and os.path.isfile(script):
        return [sys.executable, os.path.abspath(script), "ppq"]
    return [sys.executable, "-m", "django", "ppq"]


def prepare_worker() -> None:
    """Before an agent starts in this process: the apps' tasks imported here (where their
    ``on_task_finished`` / ``on_task_error`` hooks run), Django set up first in every executor, and
    no database connection of this process inherited by the executors it forks."""
    from django.db import connections

    from ...worker.hooks import preload_in_executors

    for name in app_task_modules():
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any failure of the user's module is one line
            raise ConfigError(f"INSTALLED_APPS: importing {name} failed: {type(exc).__name__}: {exc}") from None
        log.debug("imported %s", name)
    importlib.import_module(EXECUTOR_SETUP)
    preload_in_executors(EXECUTOR_SETUP)
    connections.close_all()


def run_click(command: click.Command, args: Sequence[str], prog_name: str) -> None:
    """Run ``command`` (one of ppq's click commands or its group) on ``args``, its config read from
    ``settings.PPQ`` as from a YAML file; exits as the ``ppq`` command does."""
    from ...cli.output import RET_CONFIG, fail
    from .settings import ppq_settings

    try:
        settings = ppq_settings()
        prepare_worker()
    except ConfigError as exc:
        fail(str(exc), RET_CONFIG)
    obj: dict[str, Any] = {"config": None, "overrides": {"log_level": None, "log_format": None},
                           "settings": settings, "adjust": allow_app_tasks, "launcher": launcher()}
    command.main(list(args), prog_name=prog_name, obj=obj)


def _strip_django_options(args: Sequence[str]) -> list[str]:
    out: list[str] = []
    skip = False
    for arg in args:
        if skip:
            skip = False
        elif arg in _DJANGO_OPTIONS:
            skip = True
        elif not arg.startswith(tuple(f"{o}=" for o in _DJANGO_OPTIONS)):
            out.append(arg)
    return out


class ClickCommand(BaseCommand):
    """A management command that hands its arguments to one of ppq's click commands."""

    #: The click command's name in the ``ppq`` group; empty for the group itself.
    ppq_command = ""

    def click_command(self) -> click.Command:
        from ...cli import main

        return main.commands[self.ppq_command] if self.ppq_command else main

    def run_from_argv(self, argv: list[str]) -> None:
        prog = f"{os.path.basename(argv[0])} {argv[1]}"
        run_click(self.click_command(), _strip_django_options(argv[2:]), prog)

    def print_help(self, prog_name: str, subcommand: str, *args: Any, **kwargs: Any) -> None:
        run_click(self.click_command(), ["--help"], f"{os.path.basename(prog_name)} {subcommand}")

    def create_parser(self, prog_name: str, subcommand: str, **kwargs: Any) -> Any:
        """Django's parser, for ``call_command``: what it does not know goes to click as it came."""
        parser = super().create_parser(prog_name, subcommand, **kwargs)
        parse_known_args = parser.parse_known_args

        def parse_args(args: Sequence[str] | None = None, namespace: Any = None) -> Any:
            options, rest = parse_known_args(args, namespace)
            options.args = rest
            return options

        parser.parse_args = parse_args
        return parser

    def handle(self, *args: Any, **options: Any) -> None:
        """``call_command("ppq_worker", "--concurrency", "2")``: the arguments go to click as they are."""
        name = f"manage.py {self.ppq_command or 'ppq'}"
        try:
            run_click(self.click_command(), [str(a) for a in args], name)
        except SystemExit as exc:
            if exc.code not in (0, None):
                raise
