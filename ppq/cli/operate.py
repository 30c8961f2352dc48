"""The commands that watch and tend a running system: ``ppq status``, ``ppq top``,
``ppq workers`` (a group: ``pause`` and ``resume`` are in queues.py) and the ``ppq dead`` group."""

from __future__ import annotations

import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import click

from ..errors import PPQError
from .base import _apply_sub, _client, _stop_on_signals, build_config, config_option, main, master_option
from .output import RET_CONFIG, RET_ERROR, _print_json, _table, _when, console, err_console, fail, run_guarded

if TYPE_CHECKING:
    from ..client import Client


@main.command()
@config_option
@master_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
           as_json: bool) -> None:
    """Queue counts per queue_index, what each Redis holds, and the live workers.

    "leased" counts tasks handed to workers (prefetched ones too), "running"
    those the workers said they ran at their last heartbeat. Queued tasks of a
    module no live worker allows are listed under their queue ("waiting for a
    worker that allows mytasks: 3 task(s)"); the workers table shows what each
    allows. The redis table shows each Redis's used memory, its append-only file
    ("off" without AOF) and how long finished tasks are kept (result_ttl).
    Columns that do not fit the terminal are left out; --json has everything.

    \b
    Example:
      ppq status -m 127.0.0.1:7600
    """
    _apply_sub(ctx, sub_config, sub_log_level)
    client = _client(ctx, masters)
    info = run_guarded(client.server_info)
    if as_json:
        _print_json({str(k): v for k, v in info.items()})
        return
    console.print(status_tables(info))


# Columns of `ppq status` / `ppq top`: (key, header, priority). The fewer columns the
# terminal has room for, the more columns are left out, lowest priority (highest
# number) first; the rest keep this order.
QUEUE_COLUMNS = (
    ("queue_index", "queue", 0), ("queued", "queued", 0), ("delayed", "delayed", 1), ("leased", "leased", 0),
    ("running", "running", 2), ("pending", "pending", 2), ("dead", "dead", 1), ("done_per_min", "done/min", 3),
    ("failed_per_min", "fail/min", 4), ("workers", "workers", 5), ("pushed", "pushed", 6), ("done", "done", 6),
    ("retried", "retried", 7), ("expired", "expired", 8), ("cancelled", "cancelled", 8),
)
REDIS_COLUMNS = (
    ("queue_index", "queue", 0), ("used_memory", "memory", 0), ("aof_size", "AOF", 0),
    ("result_ttl", "result_ttl", 0), ("redis", "redis", 1),
)
# Most modules `ppq status` lists as waiting for a worker that allows them, per queue_index.
WAITING_LISTED = 10
LIMIT_COLUMNS = (
    ("function", "function", 0), ("queue_index", "queue", 1), ("rate", "rate", 0), ("tokens", "tokens", 2),
    ("concurrency", "concurrency", 0), ("running", "running", 2), ("waiting", "waiting", 0),
)
WORKER_COLUMNS = (
    ("id", "worker", 0), ("queue_index", "queue", 3), ("concurrency", "executors", 2), ("running", "running", 0),
    ("done", "done", 1), ("failed", "failed", 1), ("heartbeat", "last heartbeat", 2), ("allow", "allows", 4),
    ("tasks", "running tasks", 9),
)


def _size(value: Any) -> str:
    """Bytes for people: 512 B, 1.5 KiB, 221.0 MiB."""
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return ""  # pragma: no cover - the loop returns


def _duration(seconds: Any) -> str:
    """Whole seconds for people: 1d, 12h, 30m, 90s."""
    s = int(seconds)
    for unit, length in (("d", 86400), ("h", 3600), ("m", 60)):
        if s and s % length == 0:
            return f"{s // length}{unit}"
    return f"{s}s"


def _fit_table(title: str, columns: tuple[tuple[str, str, int], ...], rows: list[dict[str, str]], width: int,
               foldable: tuple[str, ...] = ()) -> Any:
    """A table of ``rows`` with as many of ``columns`` as fit in ``width`` without cutting a value.

    Columns go lowest priority first until the table fits; a ``foldable`` column
    (an id, a URL) takes at most a third of the width and is folded onto several lines.
    """
    import io

    from rich import box
    from rich.console import Console
    from rich.measure import Measurement

    def build(keys: list[str]) -> Any:
        table = _table(title=title, box=box.SQUARE, title_justify="left")
        for key, header, _ in columns:
            if key in keys:
                text = key in ("id", "redis", "tasks", "heartbeat", "allow")
                table.add_column(header, justify="left" if text else "right", no_wrap=key not in foldable,
                                 overflow="fold" if key in foldable else "ellipsis",
                                 max_width=max(20, width // 3) if key in foldable else None)
        for row in rows:
            table.add_row(*(row.get(key, "") for key, _, _ in columns if key in keys))
        return table

    measure = Console(file=io.StringIO(), width=100_000)
    keys = [key for key, _, _ in columns]
    for priority in sorted({p for _, _, p in columns}, reverse=True):
        table = build(keys)
        if Measurement.get(measure, measure.options, table).maximum <= width or priority == 0:
            return table
        keys = [key for key, _, p in columns if p < priority]
    return build(keys)  # pragma: no cover - the loop returns at priority 0


def status_tables(info: dict[Any, dict[str, Any]], width: int | None = None) -> Any:
    """The queues and workers of ``server_info()``, fitted to ``width`` columns (the terminal's).

    "leased" counts the tasks handed to workers (prefetched ones included),
    "running" those the workers said they were running at their last heartbeat, "pending"
    the steps of workflows stored whose turn has not come.
    """
    from rich.console import Group
    from rich.text import Text

    width = width or console.width
    queue_rows: list[dict[str, str]] = []
    worker_rows: list[dict[str, str]] = []
    redis_rows: list[dict[str, str]] = []
    limit_rows: list[dict[str, str]] = []
    notes: list[str] = []
    for qi, entry in sorted(info.items(), key=lambda kv: int(kv[0])):
        if not entry.get("ok", True):
            queue_rows.append({"queue_index": str(qi), **dict.fromkeys(("queued", "leased", "running"), "?")})
            notes.append(f"queue_index {qi}: Redis {entry.get('redis')} UNREACHABLE: {entry.get('error', '')}")
            redis_rows.append({"queue_index": str(qi), "used_memory": "?", "aof_size": "?", "result_ttl": "?",
                               "redis": str(entry.get("redis", ""))})
            continue
        held = "used_memory" in entry  # (a master of an earlier version does not say)
        redis_rows.append({
            "queue_index": str(qi), "used_memory": _size(entry["used_memory"]) if held else "?",
            "aof_size": "?" if not held else _size(entry["aof_size"]) if entry.get("aof_enabled") and
            entry.get("aof_size") is not None else "off",
            "result_ttl": _duration(entry["result_ttl"]) if entry.get("result_ttl") is not None else "?",
            "redis": str(entry.get("redis", ""))})
        workers = entry.get("workers", [])
        row = {key: str(entry.get(key, 0)) for key, _, _ in QUEUE_COLUMNS}
        row.update(queue_index=str(qi), leased=str(entry.get("running", 0)), workers=str(len(workers)),
                   running=str(sum(len(w.get("running") or []) for w in workers)))
        if entry.get("paused"):
            row["queue_index"] = f"{qi} paused"
            notes.append(f"queue_index {qi} is paused: no task of it is handed out until `ppq queue resume -q {qi}`")
        queue_rows.append(row)
        waiting = sorted((entry.get("waiting_for") or {}).items(), key=lambda kv: (-kv[1], kv[0]))
        for module, count in waiting[:WAITING_LISTED]:
            notes.append(f"queue_index {qi}: waiting for a worker that allows {module}: {count} task(s)")
        if len(waiting) > WAITING_LISTED:
            notes.append(f"queue_index {qi}: waiting for a worker that allows them: "
                         f"{len(waiting) - WAITING_LISTED} more module(s) (--json lists them)")
        sched = entry.get("schedules") or {}
        if sched.get("count"):
            paused = sched["count"] - sched.get("active", 0)
            nxt = sched.get("next_run")
            notes.append(f"queue_index {qi}: {sched['count']} schedule(s)" + (f", {paused} paused" if paused else "")
                         + (f"; next at {time.strftime('%H:%M:%S', time.localtime(nxt))}" if nxt else "")
                         + " (ppq schedule list)")
        for e in entry.get("limits") or []:
            limit_rows.append({
                "function": str(e["function"]), "queue_index": str(qi), "rate": e.get("rate") or "-",
                "tokens": "-" if e.get("tokens") is None else f"{e['tokens']:g}",
                "concurrency": "-" if e.get("concurrency") is None else str(e["concurrency"]),
                "running": str(e.get("running", 0)), "waiting": str(e.get("waiting", 0))})
        for w in workers:
            running = w.get("running") or []
            beat = w.get("last_heartbeat")
            worker_rows.append({
                "id": str(w.get("id")) + (" (paused)" if w.get("paused") else ""),
                "queue_index": str(qi), "concurrency": str(w.get("concurrency", "")),
                "running": str(len(running)), "done": str(w.get("done", "")), "failed": str(w.get("failed", "")),
                "heartbeat": time.strftime("%H:%M:%S", time.localtime(float(beat))) if beat else "",
                "allow": "*" if w.get("allow") is None else ", ".join(map(str, w["allow"])) or "(none)",
                "tasks": ", ".join(running) or "-"})
    parts: list[Any] = [_fit_table("queues", QUEUE_COLUMNS, queue_rows, width)]
    parts += [Text(note, style="yellow" if "waiting for a worker" in note else
                   "" if "schedule(s)" in note else "red") for note in notes]
    if limit_rows:
        parts.append(_fit_table("limits", LIMIT_COLUMNS, limit_rows, width, foldable=("function",)))
    if redis_rows:
        parts.append(_fit_table("redis", REDIS_COLUMNS, redis_rows, width, foldable=("redis",)))
    if worker_rows:
        parts.append(_fit_table(f"workers ({len(worker_rows)})", WORKER_COLUMNS, worker_rows, width,
                                foldable=("id", "tasks")))
    else:
        parts.append(Text("no live workers"))
    return Group(*parts)


@main.command()
@config_option
@master_option
@click.option("--interval", type=float, default=1.0, help="Seconds between refreshes.")
@click.option("--iterations", type=int, default=0, help="Stop after this many refreshes; 0 = until Ctrl-C.")
@click.pass_context
def top(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
        interval: float, iterations: int) -> None:
    """`ppq status`, refreshed live in the terminal (Ctrl-C to quit).

    \b
    Example:
      ppq top --interval 2
    """
    from rich.live import Live

    _apply_sub(ctx, sub_config, sub_log_level)
    if interval <= 0:
        fail("--interval must be greater than 0", RET_CONFIG)
    client = _client(ctx, masters)
    stop = threading.Event()
    _stop_on_signals(stop)
    count = 0

    def frame() -> Any:
        from rich.console import Group
        from rich.text import Text

        try:
            body = status_tables(client.server_info(), console.width)
        except PPQError as exc:
            body = Text(f"{type(exc).__name__}: {exc}", style="red")
        return Group(Text(f"ppq top  {time.strftime('%H:%M:%S')}  every {interval:g}s  (Ctrl-C quits)"), body)

    with Live(frame(), console=console.get(), refresh_per_second=4, screen=console.is_terminal) as live:
        while not stop.wait(interval):
            count += 1
            live.update(frame())
            if iterations and count >= iterations:
                break


@main.group(invoke_without_command=True)
@config_option
@master_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def workers(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
            as_json: bool) -> None:
    """Live workers with their per-function stats, read from their control objects; a
    paused one is shown as such (`ppq workers pause` / `resume`, in ppq.cli.queues).

    \b
    Example:
      ppq workers --json
      ppq workers pause host1:4242:9f3c
    """
    from ..rpc import WORKER_OBJECT, PyroFunc

    _apply_sub(ctx, sub_config, sub_log_level)
    if ctx.invoked_subcommand is not None:
        return
    client = _client(ctx, masters)
    config = build_config(ctx, {})
    info = run_guarded(client.server_info)
    rows = []
    # A control_uri is what the worker said: it gets a token it could have had anyway (the worker
    # token; auth_token where roles are not split), never the client token, which a process
    # with only the worker token could otherwise collect by listing a control_uri of its own.
    ask_control = bool(config.worker_token) or not config.client_token
    control_token = config.worker_token or config.auth_token
    for entry in info.values():
        for w in entry.get("workers", []):
            stats: dict[str, Any] = {}
            running: list[Any] = []
            uri = w.get("control_uri")
            # Why a worker shows no figures, in place of its functions.
            why = "(not heard from yet)" if not uri else "(no task run yet)"
            if uri and ask_control:
                control = PyroFunc(uri, token=control_token, timeout=3, objid=WORKER_OBJECT, default_return=None)
                answer = control("get_worker_stats")
                if answer is None:
                    why = "(its control object does not answer)"
                stats = answer or {}
                running = (control("get_running_info") or {}).get("tasks", [])
                control.close()
            elif uri:
                why = "(figures need the worker token)"
            rows.append({"worker": w, "stats": stats, "running": running, "why": why})
    if as_json:
        _print_json([{k: v for k, v in row.items() if k != "why"} for row in rows])
        return
    if not rows:
        click.echo("no live workers")
        return
    table = _table(title="workers")
    for name in ("worker", "function", "count", "ok", "failed", "mean / p95 (s)"):
        table.add_column(name)
    for row in rows:
        wid = str(row["worker"].get("id")) + (" (paused)" if row["worker"].get("paused") else "")
        if not row["stats"]:
            table.add_row(wid, row["why"], "-", "-", "-", "-")
        for name, s in sorted(row["stats"].items()):
            p95 = s.get("p95_time")
            times = f"{s['mean_time']:.4f} / " + ("-" if p95 is None else f"{p95:.4f}")
            table.add_row(wid, name, str(s["count"]), str(s["ok"]), str(s["failed"]), times)
    console.print(table)


@main.group()
@config_option
@click.pass_context
def dead(ctx: click.Context, sub_config: str | None, sub_log_level: str | None) -> None:
    """The dead list: tasks that exhausted their retries.

    \b
    Example:
      ppq dead list
      ppq dead requeue 3f2a... 9c1b...
      ppq dead purge --all --yes
    """
    _apply_sub(ctx, sub_config, sub_log_level)


@dead.command("list")
@config_option
@master_option
@click.option("--queue-index", "-q", type=int, default=0, help="The queue_index whose dead list to show.")
@click.option("--limit", type=int, default=50, help="Most tasks shown.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (with tracebacks).")
@click.pass_context
def dead_list(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
              queue_index: int, limit: int, as_json: bool) -> None:
    """Dead tasks, newest first, with the reason.

    \b
    Example:
      ppq dead list -q 1 --limit 10
    """
    _apply_sub(ctx, sub_config, sub_log_level)
    client = _client(ctx, masters)
    tasks = run_guarded(lambda: client.call("dead_tasks", queue_index, limit))
    if as_json:
        for t in tasks:
            t.pop("result_pickled", None)
        _print_json(tasks)
        return
    if not tasks:
        click.echo(f"no dead tasks in queue_index {queue_index}")
        return
    table = _table(title=f"dead tasks, queue_index {queue_index}")
    # An id is never cut (it is what `ppq dead requeue` takes); the reason folds instead.
    table.add_column("id", no_wrap=True, min_width=max(len(str(t["id"])) for t in tasks))
    for name in ("task", "failed runs", "died", "reason"):
        table.add_column(name, overflow="fold")
    for t in tasks:
        runs = f"{t.get('retry') or 0} of {(t.get('max_retry') or 0) + 1}"
        table.add_row(t["id"], f"{t['module']}.{t['func']}", runs, _when(t.get("finished")), t.get("error", ""))
    console.print(table)


def _not_dead(client: Client, task_ids: list[str], queue_index: int) -> dict[str, str]:
    """Of ``task_ids``, those not on the dead list, each with why: unknown, or its state."""
    infos = run_guarded(lambda: client.call("get_tasks_info", task_ids, queue_index))
    return {tid: ("unknown" if info is None else f"{info['state']}, not dead")
            for tid, info in zip(task_ids, infos, strict=True) if info is None or info["state"] != "dead"}


def _report_skipped(skipped: dict[str, str], queue_index: int) -> None:
    for tid, why in skipped.items():
        err_console.print(f"{tid}: {why} in queue_index {queue_index}", markup=False, highlight=False)


def _confirm(yes: bool, question: str) -> None:
    """Ask at a terminal; elsewhere only --yes goes ahead."""
    if yes:
        return
    if not sys.stdin.isatty():
        fail(f"{question.rstrip('?')}: stdin is not a terminal, so pass --yes to confirm", RET_CONFIG)
    if not click.confirm(question, default=False, err=True):
        err_console.print("nothing done", markup=False, highlight=False)
        sys.exit(RET_ERROR)


def _dead_ids(task_ids: tuple[str, ...], all_: bool) -> list[str] | None:
    if task_ids and all_:
        fail("give task ids or --all, not both", RET_CONFIG)
    if not task_ids and not all_:
        fail("give task ids or --all", RET_CONFIG)
    return list(dict.fromkeys(task_ids)) or None


@dead.command("requeue")
@config_option
@master_option
@click.argument("task_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Requeue every dead task.")
@click.option("--queue-index", "-q", type=int, default=0, help="The queue_index the tasks are in.")
@click.pass_context
def dead_requeue(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
                 task_ids: tuple[str, ...], all_: bool, queue_index: int) -> None:
    """Put dead tasks (IDs, or --all) back in the queue, their retries reset.

    An id that is unknown or not dead is named on stderr, and the exit code is 1. A
    workflow's step is not requeued alone (its workflow ended when it went dead): given
    by id it is an error and nothing is requeued; --all leaves it dead and says so.

    \b
    Example:
      ppq dead requeue --all
    """
    _apply_sub(ctx, sub_config, sub_log_level)
    ids = _dead_ids(task_ids, all_)
    client = _client(ctx, masters)
    done = run_guarded(lambda: client.call("requeue_dead", ids, queue_index))
    skipped = _not_dead(client, [t for t in ids if t not in set(done)], queue_index) if ids else {}
    click.echo(f"requeued {len(done)} task(s)")
    if ids is None:
        left = run_guarded(lambda: client.call("dead_tasks", queue_index, 1000))
        steps = sum(1 for info in left if info.get("wf"))
        if steps:
            click.echo(f"left {steps} step(s) of workflows dead: a step is not requeued alone, as its workflow "
                       f"ended when it went dead (push the workflow again)")
    _report_skipped(skipped, queue_index)
    if skipped:
        sys.exit(RET_ERROR)


@dead.command("purge")
@config_option
@master_option
@click.argument("task_ids", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Delete every dead task.")
@click.option("--yes", "-y", is_flag=True, help="Do not ask: needed when stdin is not a terminal.")
@click.option("--queue-index", "-q", type=int, default=0, help="The queue_index the tasks are in.")
@click.pass_context
def dead_purge(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
               task_ids: tuple[str, ...], all_: bool, yes: bool, queue_index: int) -> None:
    """Delete dead tasks (IDs, or --all) for good, records and errors with them.

    Asks first at a terminal; elsewhere it needs --yes. An id that is unknown or
    not dead is named on stderr, nothing is done to it, and the exit code is 1.

    \b
    Example:
      ppq dead purge 3f2a9c... 9c1b07...
    """
    _apply_sub(ctx, sub_config, sub_log_level)
    ids = _dead_ids(task_ids, all_)
    client = _client(ctx, masters)
    skipped: dict[str, str] = {}
    if ids is None:
        entry = run_guarded(client.server_info).get(queue_index) or {}
        count = entry.get("dead", 0)
    else:
        skipped = _not_dead(client, ids, queue_index)
        ids = [t for t in ids if t not in skipped]
        count = len(ids)
    _report_skipped(skipped, queue_index)
    if count:
        what = "every dead task" if ids is None else f"{count} dead task(s)"
        _confirm(yes, f"Delete {what} in queue_index {queue_index} ({count}) for good?")
        n = run_guarded(lambda: client.call("purge_dead", ids, queue_index)) if ids is None or ids else 0
    else:
        n = 0
    click.echo(f"purged {n} task(s)")
    if skipped:
        sys.exit(RET_ERROR)
