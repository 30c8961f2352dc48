"""The ``ppq schedule`` group: ``list``, ``add``, ``remove``, ``pause``, ``resume`` and ``run-now``
for periodic schedules (fired by the masters, ``ppq.master.schedules``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import click

from .base import _apply_sub, _client, config_option, main, master_option
from .output import _print_json, _table, console, fail, run_guarded
from .tasks import _parse_value


def _short_time(ts: Any) -> str:
    """A time in 8 characters when it is within a day of now, else in 11."""
    if not ts:
        return "-"
    ts = float(ts)
    if abs(ts - time.time()) < 86400:
        return time.strftime("%H:%M:%S", time.localtime(ts))
    return time.strftime("%m-%d %H:%M", time.localtime(ts))


def _short_id(entry: dict[str, Any]) -> str:
    """A schedule's task id without its ``s:<name>:`` part: its tick (base 36), ``r...`` for a run-now."""
    task_id = entry.get("last_id") or ""
    return task_id.rsplit(":", 1)[-1] if task_id.startswith("s:") else task_id[:8] or "-"


def schedules_table(entries: list[dict[str, Any]]) -> Any:
    """The table ``ppq schedule list`` prints: one row per schedule, 80 columns wide for short names."""
    table = _table(box=None, pad_edge=False, header_style="bold", title=None)
    for header, options in (("name", {"overflow": "fold"}), ("spec", {"overflow": "fold"}), ("q", {}),
                            ("next run", {}), ("last run", {}), ("task", {}), ("state", {}), ("paused", {})):
        table.add_column(header, **options)
    for e in entries:
        table.add_row(e["name"], e.get("spec", ""), str(e["queue_index"]),
                      "-" if e.get("paused") else _short_time(e.get("next_run")), _short_time(e.get("last_run")),
                      _short_id(e), e.get("last_state") or "-", "yes" if e.get("paused") else "no")
    return table


@main.group()
@config_option
@click.pass_context
def schedule(ctx: click.Context, sub_config: str | None, sub_log_level: str | None) -> None:
    """Periodic schedules: each pushes its task at every tick of a cron expression or of
    `every` seconds, once, whichever masters are up.

    Schedules live in Redis, per queue_index; the config's `schedules:` and the
    @ppq.periodic functions of `master.schedule_modules` are stored by every
    master at its start.

    \b
    Example:
      ppq schedule add report mytasks.add 2 3 --every 60
      ppq schedule list
      ppq schedule pause report
    """
    _apply_sub(ctx, sub_config, sub_log_level)


def _name_command(op: str, summary: str) -> Callable[[Callable[..., Any]], Any]:
    """A command that takes a schedule's NAME and an optional --queue-index."""

    def decorate(fn: Callable[..., Any]) -> Any:
        fn = click.option("--queue-index", "-q", type=int, default=None, show_default="wherever it is",
                          help="The queue_index holding the schedule.")(fn)
        fn = click.argument("name")(fn)
        fn = master_option(fn)
        fn = config_option(fn)
        fn = click.pass_context(fn)
        return schedule.command(op, help=f"{summary}\n\n\b\nExample:\n  ppq schedule {op} nightly")(fn)

    return decorate


@schedule.command("list")
@config_option
@master_option
@click.option("--queue-index", "-q", type=int, default=None, show_default="all", help="Only this queue_index.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (times in unix seconds, full task ids).")
@click.pass_context
def schedule_list(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
                  queue_index: int | None, as_json: bool) -> None:
    """List the schedules: name, spec, queue_index, next and last run (local time), the last task
    (its tick in base 36; r... for a run-now) and its state, whether paused.

    \b
    Example:
      ppq schedule list --json
    """
    _apply_sub(ctx, sub_config, sub_log_level)
    client = _client(ctx, masters)
    entries = run_guarded(lambda: client.schedules(queue_index))
    if as_json:
        _print_json(entries)
    elif not entries:
        click.echo("no schedules")
    else:
        console.print(schedules_table(entries))


@schedule.command("add")
@config_option
@master_option
@click.argument("name")
@click.argument("task")
@click.argument("args", nargs=-1)
@click.option("--cron", default=None, help='A 5-field cron expression, e.g. "*/5 * * * *".')
@click.option("--every", type=float, default=None, help="Or: fire every this many seconds.")
@click.option("--timezone", default="UTC", help="Timezone of the cron expression.")
@click.option("--missed", type=click.Choice(["run_once", "skip"]), default="run_once",
              help="A tick missed while every master was down: run it once on return, or skip it.")
@click.option("--kwarg", "-k", multiple=True, help="KEY=VALUE keyword argument (VALUE read as JSON if it parses).")
@click.option("--queue-index", "-q", type=int, default=0, help="The queue_index its tasks go to.")
@click.option("--max-retry", type=int, default=None, show_default="1", help="Retries of each task.")
@click.option("--retry-delay/--no-retry-delay", default=None, help="Back off exponentially between retries.")
@click.option("--task-timeout", "timeout", type=float, default=None, show_default="worker.task_timeout",
              help="Seconds each task may run.")
@click.option("--result-ttl", type=int, default=None, show_default="master.result_ttl",
              help="Seconds each task's result is kept.")
@click.option("--json", "as_json", is_flag=True, help="Print the stored schedule as JSON.")
@click.pass_context
def schedule_add(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
                 name: str, task: str, args: tuple[str, ...], cron: str | None, every: float | None, timezone: str,
                 missed: str, kwarg: tuple[str, ...], queue_index: int, max_retry: int | None,
                 retry_delay: bool | None, timeout: float | None, result_ttl: int | None, as_json: bool) -> None:
    """Add a schedule NAME pushing TASK (module.func) with ARGS (each read as JSON if it parses).

    \b
    Example:
      ppq schedule add nightly app.reports.build 7 --cron "30 2 * * *" --timezone Europe/Paris
      ppq schedule add heartbeat app.ping --every 30 --missed skip
    """
    _apply_sub(ctx, sub_config, sub_log_level)
    kwargs: dict[str, Any] = {}
    for item in kwarg:
        key, sep, value = item.partition("=")
        if not sep or not key:
            fail(f"--kwarg: expected KEY=VALUE, got {item!r}")
        kwargs[key] = _parse_value(value)
    options = {k: v for k, v in (("max_retry", max_retry), ("retry_delay", retry_delay), ("timeout", timeout),
                                 ("result_ttl", result_ttl)) if v is not None}
    client = _client(ctx, masters)
    entry = run_guarded(lambda: client.add_schedule(name, task, cron=cron, every=every,
                                                    args=[_parse_value(a) for a in args], kwargs=kwargs,
                                                    queue_index=queue_index, timezone=timezone, missed=missed,
                                                    **options))
    if as_json:
        _print_json(entry)
    else:
        click.echo(f"schedule {entry['name']} added ({entry.get('spec')}, queue_index {entry['queue_index']}); "
                   f"next run {_short_time(entry.get('next_run'))}")


@_name_command("remove", "Delete schedule NAME (one the config declares comes back at a master's next start).")
def schedule_remove(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
                    name: str, queue_index: int | None) -> None:
    _apply_sub(ctx, sub_config, sub_log_level)
    client = _client(ctx, masters)
    where = run_guarded(lambda: client.remove_schedule(name, queue_index))
    click.echo(f"schedule {name} removed (queue_index {', '.join(map(str, where))})")


@_name_command("pause", "Fire nothing of schedule NAME until `ppq schedule resume`.")
def schedule_pause(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
                   name: str, queue_index: int | None) -> None:
    _apply_sub(ctx, sub_config, sub_log_level)
    client = _client(ctx, masters)
    changed = run_guarded(lambda: client.pause_schedule(name, queue_index))
    click.echo(f"schedule {name} paused" if changed else f"schedule {name} was paused already")


@_name_command("resume", "Fire schedule NAME again, from its next tick (those of the pause are skipped).")
def schedule_resume(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
                    name: str, queue_index: int | None) -> None:
    _apply_sub(ctx, sub_config, sub_log_level)
    client = _client(ctx, masters)
    changed = run_guarded(lambda: client.resume_schedule(name, queue_index))
    click.echo(f"schedule {name} resumed" if changed else f"schedule {name} was not paused")


@_name_command("run-now", "Push schedule NAME's task now, besides its ticks (paused or not); print its id.")
def schedule_run_now(ctx: click.Context, sub_config: str | None, sub_log_level: str | None,
                     masters: tuple[str, ...], name: str, queue_index: int | None) -> None:
    _apply_sub(ctx, sub_config, sub_log_level)
    client = _client(ctx, masters)
    click.echo(run_guarded(lambda: client.run_schedule_now(name, queue_index)))
