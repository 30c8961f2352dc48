"""The ``ppq limit`` group: ``set``, ``remove`` and ``list`` for the rate and concurrency limits
of functions (kept in Redis, enforced by every master's lease: ``ppq.master.limits``)."""

from __future__ import annotations

from typing import Any

import click

from .base import _apply_sub, _client, config_option, main, master_option
from .output import _print_json, _table, console, run_guarded


def limits_table(by_queue: dict[int, list[dict[str, Any]]]) -> Any:
    """One row per limited function and queue_index: its limits, tokens and running now, and
    the tasks its limits hold back."""
    table = _table(box=None, pad_edge=False, header_style="bold", title=None)
    for header in ("function", "q", "rate", "tokens", "concurrency", "running", "waiting"):
        table.add_column(header, overflow="fold" if header == "function" else "ellipsis")
    for qi, entries in sorted(by_queue.items()):
        for e in entries:
            table.add_row(e["function"], str(qi), e["rate"] or "-",
                          "-" if e["tokens"] is None else f"{e['tokens']:g}",
                          "-" if e["concurrency"] is None else str(e["concurrency"]), str(e["running"]),
                          str(e["waiting"]))
    return table


@main.group()
@config_option
@click.pass_context
def limit(ctx: click.Context, sub_config: str | None, sub_log_level: str | None) -> None:
    """Rate and concurrency limits of functions (module.func), over every master and worker.

    A rate "N/s", "N/m" or "N/h" is a token bucket holding a second's worth of
    tokens (at least 1); a concurrency N lets at most N of the function's tasks
    run at once. A task over its limit stays queued, in its function's own list,
    until its token is due or a slot frees: no worker polls for it and it burns
    no attempt. Limits live in Redis per queue_index; the config's `rate_limits:`
    and `concurrency_limits:` (and @ppq.task(rate_limit=...) in the modules of
    `master.schedule_modules`) are stored by every master at its start.

    \b
    Example:
      ppq limit set app.mail.send 10/s
      ppq limit set app.reports.build --concurrency 2
      ppq limit list
      ppq limit remove app.mail.send
    """
    _apply_sub(ctx, sub_config, sub_log_level)


@limit.command("set")
@config_option
@master_option
@click.argument("function")
@click.argument("rate", required=False)
@click.option("--concurrency", "-c", type=int, default=None, help="At most this many running at once.")
@click.option("--queue-index", "-q", type=int, default=None, show_default="all", help="Only this queue_index.")
@click.pass_context
def limit_set(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
              function: str, rate: str | None, concurrency: int | None, queue_index: int | None) -> None:
    """Set FUNCTION's RATE ("10/s", "20/m", "1000/h") and/or its --concurrency.

    \b
    Example:
      ppq limit set app.mail.send 10/s
      ppq limit set app.reports.build --concurrency 2
    """
    _apply_sub(ctx, sub_config, sub_log_level)
    client = _client(ctx, masters)
    changed = run_guarded(lambda: client.set_limit(function, rate, concurrency, queue_index))
    what = ", ".join(x for x in (rate and f"rate {rate}", concurrency and f"concurrency {concurrency}") if x)
    if changed:
        click.echo(f"{function}: {what} (queue_index {', '.join(map(str, changed))})")
    else:
        click.echo(f"{function}: {what} already")


@limit.command("remove")
@config_option
@master_option
@click.argument("function")
@click.option("--kind", type=click.Choice(["rate", "concurrency"]), default=None, show_default="both",
              help="Which limit to remove.")
@click.option("--queue-index", "-q", type=int, default=None, show_default="all", help="Only this queue_index.")
@click.pass_context
def limit_remove(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
                 function: str, kind: str | None, queue_index: int | None) -> None:
    """Remove FUNCTION's limits (one declared in the config comes back at a master's next start);
    the tasks they held back are leased as any others.

    \b
    Example:
      ppq limit remove app.mail.send --kind rate
    """
    _apply_sub(ctx, sub_config, sub_log_level)
    client = _client(ctx, masters)
    changed = run_guarded(lambda: client.remove_limit(function, kind, queue_index))
    if changed:
        click.echo(f"{function}: {kind or 'every'} limit removed (queue_index {', '.join(map(str, changed))})")
    else:
        click.echo(f"{function}: no such limit")


@limit.command("list")
@config_option
@master_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def limit_list(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
               as_json: bool) -> None:
    """List the limited functions: rate and tokens in the bucket now, concurrency and running now,
    tasks waiting for their limits.

    \b
    Example:
      ppq limit list --json
    """
    _apply_sub(ctx, sub_config, sub_log_level)
    client = _client(ctx, masters)
    by_queue = run_guarded(client.limits)
    if as_json:
        _print_json({str(k): v for k, v in by_queue.items()})
    elif not any(by_queue.values()):
        click.echo("no limits")
    else:
        console.print(limits_table(by_queue))
