"""The ``ppq`` click group and what its commands share: config building, option decorators,
signal flags and the client a command talks through."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

import click

from .. import __version__
from ..config import Config, load_config
from .output import run_guarded, setup_logging


def build_config(ctx: click.Context, overrides: dict[str, Any]) -> Config:
    """The command's config. A front end that runs these commands (``ppq.contrib.django``) may put in
    ``ctx.obj`` ``settings``, a mapping read as the YAML file is, and ``adjust``, a function the
    built config goes through."""
    path = ctx.obj.get("config") or os.environ.get("PPQ_CONFIG")
    base = dict(ctx.obj.get("overrides", {}))
    base.update(overrides)
    if not logging.getLogger("ppq").handlers:
        # So that a warning or error while loading the config is printed like the others.
        fmt = base.get("log_format") or os.environ.get("PPQ_LOG_FORMAT", "").lower()
        setup_logging(Config(log_format="json" if fmt == "json" else "text"))
    adjust = ctx.obj.get("adjust") or (lambda config: config)
    config = run_guarded(lambda: adjust(load_config(path, base, settings=ctx.obj.get("settings"))))
    setup_logging(config)
    return config


def _split(values: tuple[str, ...]) -> list[str] | None:
    """Comma-separated or repeated values; the tags of a ``PYROMETA:a,b@host:port`` stay together."""
    items: list[str] = []
    for value in values:
        for v in value.split(","):
            if items and items[-1].upper().startswith("PYROMETA:") and "@" not in items[-1]:
                items[-1] += "," + v.strip()
            elif v.strip():
                items.append(v.strip())
    return items or None


def _redis_map(values: tuple[str, ...]) -> dict[str, str] | None:
    if not values:
        return None
    result = {}
    for value in values:
        index, sep, url = value.partition("=")
        if not sep:
            index, url = "0", value
        result[index.strip()] = url.strip()
    return result


LOG_LEVELS = click.Choice(["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], case_sensitive=False)
LOG_FORMATS = click.Choice(["text", "json"], case_sensitive=False)


def _default(key: str) -> str:
    """How a flag's default is shown when it comes from the config: the key and its built-in value."""
    section, _, name = key.partition(".")
    value = getattr(getattr(Config(), section), name) if name else getattr(Config(), section)
    if isinstance(value, list):
        value = ",".join(value) or "none"
    return f"{key}: {value}"


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True,
                               "max_content_width": 100})
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None, show_default="$PPQ_CONFIG",
              help="YAML config file.")
@click.option("--log-level", type=LOG_LEVELS, default=None, show_default=_default("log_level"),
              help="Lowest level logged (any case).")
@click.option("--log-format", type=LOG_FORMATS, default=None, show_default=_default("log_format"),
              help="text, or json: one JSON object per line, for log shippers.")
@click.version_option(__version__, prog_name="ppq")
@click.pass_context
def main(ctx: click.Context, config_path: str | None, log_level: str | None, log_format: str | None) -> None:
    """ppq: a distributed task queue over Pyro5 and Redis.

    Settings come from, highest first: flags, PPQ_* environment variables, the
    YAML file (--config or $PPQ_CONFIG), defaults. --config, --log-level and
    --log-format are taken before or after the command.

    \b
    Example:
      ppq up --allow mytasks           # a local stack, in the foreground
      ppq push mytasks.add 2 3 --wait  # in another terminal
    """
    ctx.ensure_object(dict)
    ctx.obj["config"] = config_path
    ctx.obj["overrides"] = {"log_level": log_level, "log_format": log_format and log_format.lower()}


def config_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--config`` and logging flags on every subcommand too."""
    fn = click.option("--config", "sub_config", type=click.Path(dir_okay=False), default=None,
                      show_default="$PPQ_CONFIG", help="YAML config file.")(fn)
    fn = click.option("--log-level", "sub_log_level", type=LOG_LEVELS, default=None,
                      show_default=_default("log_level"), help="Lowest level logged (any case).")(fn)
    fn = click.option("--log-format", type=LOG_FORMATS, default=None, expose_value=False,
                      callback=_set_log_format, show_default=_default("log_format"),
                      help="text, or json: one JSON object per line, for log shippers.")(fn)
    return fn


def _set_log_format(ctx: click.Context, param: click.Parameter, value: str | None) -> None:
    if value:
        ctx.obj["overrides"]["log_format"] = value.lower()


def _apply_sub(ctx: click.Context, sub_config: str | None, sub_log_level: str | None) -> None:
    if sub_config:
        ctx.obj["config"] = sub_config
    if sub_log_level:
        ctx.obj["overrides"]["log_level"] = sub_log_level


def _renamed(old: str, new: str) -> bool:
    raise click.UsageError(f"{old} is ambiguous here and was renamed: use {new}")


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: Any) -> None:
        stop.set()

    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        signal.signal(getattr(signal, name), handler)


def _client(ctx: click.Context, masters: tuple[str, ...]) -> Any:
    from ..client import Client

    config = build_config(ctx, {"client.masters": _split(masters)})
    return run_guarded(lambda: Client(config=config))


def master_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--master", "-m", "masters", multiple=True,
                        show_default="client.masters, else worker.master_hosts, else master.host:master.port",
                        help="Master host:port, PYRO: or PYROLOC:// address, or masters registered in a "
                             "name server (PYRONAME:ppq.master@host:port); repeatable.")(fn)


def _examples_last(group: click.Group) -> None:
    """Move the "Example:" block that ends each docstring after the options, so help ends with it."""
    import inspect

    for command in [group, *group.commands.values()]:
        head, sep, example = inspect.cleandoc(command.help or "").partition("\b\nExample:")
        if sep:
            command.help = head.rstrip()
            command.epilog = "\b\nExample:" + example.rstrip()
        if isinstance(command, click.Group) and command is not group:
            _examples_last(command)

