"""The commands about single tasks: ``ppq push``, ``ppq task`` and ``ppq cancel``."""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
from typing import TYPE_CHECKING, Any

import click

from ..errors import PPQError, TaskExpiredError, TaskFailedError
from ..workflow import MAX_DEPTH
from .base import _apply_sub, _client, _default, _renamed, config_option, main, master_option
from .output import (
    RET_CONFIG,
    RET_ERROR,
    RET_OK,
    _json_default,
    _print_json,
    _table,
    _when,
    console,
    err_console,
    fail,
    run_guarded,
)

if TYPE_CHECKING:
    from ..client import Client


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _file_item(n: int, raw: bytes) -> dict[str, Any] | str:
    """Line ``n`` of a --file as push_task fields, or why it is refused."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text (byte {exc.start + 1} of the line is {raw[exc.start]:#04x})"
    try:
        item = json.loads(line)
    except ValueError as exc:
        return f"not JSON: {exc}"
    if not isinstance(item, dict):
        return "expected a JSON object"
    target = item.pop("task", None) or item.pop("target", None)
    if target is not None:
        module, _, func = str(target).rpartition(".")
        item.setdefault("module", module or None)
        item.setdefault("func", func)
    return item


class _PushFile:
    """``ppq push --file``: read the file a line at a time, push ``chunk`` lines per round trip,
    print "LINE<TAB>ID" for each stored line as soon as its chunk is stored.

    Ctrl-C takes effect between chunks, so every id printed is stored and every
    line before the last one reported is settled (pushed or refused); a second
    Ctrl-C stops at once, the chunk in flight left undecided.
    """

    def __init__(self, client: Any, path: str, chunk: int, skip: int, options: dict[str, Any]) -> None:
        self.client = client
        self.options = options
        self.path = path
        self.chunk = chunk
        self.skip = skip
        self.pushed = 0
        self.refused = 0
        self.settled = skip  # every line up to here is pushed or refused
        self.interrupted = False

    def _on_sigint(self, signum: int, frame: Any) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True

    def run(self) -> None:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn

        try:
            f = open(self.path, "rb")  # noqa: SIM115 - closed below
        except OSError as exc:
            fail(f"cannot read {self.path}: {exc.strerror or exc}", RET_CONFIG)
        previous = signal.signal(signal.SIGINT, self._on_sigint)
        columns = (TextColumn("pushing"), BarColumn(), DownloadColumn(), TextColumn("{task.fields[count]} pushed"))
        try:
            # The bar is drawn on stderr; ids go to stdout, through the bar's console only when
            # both are the terminal (so that they print above the bar), else straight to the file.
            with f, Progress(*columns, console=err_console.get(), transient=True,
                             redirect_stdout=sys.stdout.isatty()) as progress:
                size = os.fstat(f.fileno()).st_size or None
                bar = progress.add_task("pushing", total=size, count=0)
                batch: list[tuple[int, dict[str, Any]]] = []
                last = self.skip
                read = 0
                for n, raw in enumerate(f, 1):
                    read += len(raw)
                    if n <= self.skip:
                        continue
                    last = n
                    if raw.strip():
                        item = _file_item(n, raw)
                        if isinstance(item, str):
                            self._refuse(n, item)
                        else:
                            batch.append((n, item))
                    if len(batch) >= self.chunk:
                        self._push(batch, last)
                        batch = []
                        progress.update(bar, completed=read, count=self.pushed)
                        if self.interrupted:
                            break
                else:
                    self._push(batch, last)
        except KeyboardInterrupt:
            self._stopped(undecided=True)
        finally:
            signal.signal(signal.SIGINT, previous)
        if self.interrupted:
            self._stopped(undecided=False)
        err_console.print(f"{self.pushed} pushed, {self.refused} refused", markup=False, highlight=False)
        if self.refused:
            sys.exit(RET_ERROR)

    def _refuse(self, n: int, reason: str) -> None:
        self.refused += 1
        err_console.print(f"line {n}: refused: {reason}", markup=False, highlight=False)

    def _push(self, batch: list[tuple[int, dict[str, Any]]], last: int) -> None:
        """Push one chunk; print its ids; lines up to ``last`` are then settled."""
        from ..errors import InvalidTaskError

        pushed: list[tuple[int, str]] = []
        if batch:
            try:
                ids = self.client.push_many([item for _, item in batch], chunk=self.chunk, **self.options)
                pushed = list(zip((n for n, _ in batch), ids, strict=True))
            except InvalidTaskError:
                # One bad line refuses the whole chunk: push it line by line to name it.
                for n, item in batch:
                    try:
                        pushed.append((n, self.client.push_many([item], **self.options)[0]))
                    except InvalidTaskError as exc:
                        self._refuse(n, str(exc))
        if pushed:
            sys.stdout.write("".join(f"{n}\t{task_id}\n" for n, task_id in pushed))
            sys.stdout.flush()
        self.pushed += len(pushed)
        self.settled = last

    def _stopped(self, undecided: bool) -> None:
        first = self.skip + 1
        done = f"lines {first}-{self.settled}" if self.settled >= first else "no line"
        message = f"interrupted after {self.pushed} pushed ({done} done"
        if undecided:
            message += f"; the chunk after line {self.settled} may or may not be stored"
        message += f"): resume with --skip {self.settled}"
        err_console.print(message, markup=False, highlight=False)
        sys.exit(130)


@main.command()
@config_option
@master_option
@click.argument("target", required=False)
@click.argument("args", nargs=-1)
@click.option("--kwarg", "-k", multiple=True, help="KEY=VALUE keyword argument (VALUE read as JSON if it parses).")
@click.option("--queue-index", "-q", type=int, default=0, help="The queue_index to push to.")
@click.option("--delay", type=float, default=None, show_default="none: at once",
              help="Seconds before the task may run.")
@click.option("--key", default="", show_default="none",
              help="De-duplication key: a push with the key of a task still waiting updates that task.")
@click.option("--max-retry", type=int, default=1, help="Retries after a failure before the task is dead.")
@click.option("--retry-delay/--no-retry-delay", default=False, help="Back off exponentially between retries.")
@click.option("--priority", "-p", type=int, default=0,
              help="0-9: a worker takes the highest priority waiting first (FIFO within one).")
@click.option("--expires", type=float, default=None, show_default="never",
              help="Seconds from now (or a unix time above 10**9) by which the task must have started; "
                   "else it ends expired, never run.")
@click.option("--task-timeout", "timeout", type=float, default=None, show_default=_default("worker.task_timeout"),
              help="Seconds the task may run once started (not a wait: see --wait).")
@click.option("--timeout", "old_timeout", type=float, default=None, hidden=True, expose_value=False,
              callback=lambda ctx, param, value: value is None or _renamed("--timeout", "--task-timeout"))
@click.option("--wait", is_flag=True, help="Wait for the task to end and print its result.")
@click.option("--file", "file_", type=click.Path(dir_okay=False), default=None,
              help="Push every line of a JSON-lines file: {\"task\": \"module.func\", \"args\": [...], ...}.")
@click.option("--chunk", type=int, default=1000, help="With --file: tasks per round trip.")
@click.option("--skip", type=int, default=0,
              help="With --file: skip the first N lines (to resume after an interrupted push).")
@click.pass_context
def push(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
         target: str | None, args: tuple[str, ...], kwarg: tuple[str, ...], queue_index: int, delay: float | None,
         key: str, max_retry: int, retry_delay: bool, priority: int, expires: float | None, timeout: float | None,
         wait: bool, file_: str | None, chunk: int, skip: int) -> None:
    """Push TARGET (module.func) with ARGS (each read as JSON if it parses, else a string).

    With --file, push every line of a JSON-lines file instead; each line holds
    push_task fields ("task": "module.func" or "func" and "module", "args",
    "kwargs", "queue_index", "delay", "key", "max_retry", "priority"...); -q,
    --delay, --max-retry, --retry-delay, --priority, --expires and --task-timeout
    given here apply to lines that do not set them. The file is read as it is
    pushed, --chunk lines per round trip, and "LINE<TAB>ID" is printed for each
    line as soon as it is stored; refused lines are named on stderr with their
    reason. Ctrl-C stops after the chunk in flight and prints the --skip that
    resumes.

    \b
    Example:
      ppq push mytasks.add 2 3 --wait
      ppq push mytasks.report -k day='"2024-01-31"' --delay 60 --task-timeout 600
      ppq push mytasks.alert 42 --priority 9 --expires 300
      ppq push --file tasks.jsonl > ids.txt
    """
    _apply_sub(ctx, sub_config, sub_log_level)
    client = _client(ctx, masters)
    if file_:
        if target or args:
            fail("give either TARGET ARGS or --file, not both", RET_CONFIG)
        if chunk < 1:
            fail("--chunk must be at least 1", RET_CONFIG)
        if skip < 0:
            fail("--skip must not be negative", RET_CONFIG)
        if key or wait or kwarg:
            fail("--key, --kwarg and --wait apply to one task: put them on the lines of --file", RET_CONFIG)
        # Options given on the command line apply to every line that does not set them itself.
        given = {name: value for name, value in (("queue_index", queue_index), ("delay", delay),
                                                 ("max_retry", max_retry), ("retry_delay", retry_delay),
                                                 ("priority", priority), ("expires", expires), ("timeout", timeout))
                 if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE}
        run_guarded(lambda: _PushFile(client, file_, chunk, skip, given).run())
        return
    if skip:
        fail("--skip goes with --file", RET_CONFIG)
    if not target:
        fail("give TARGET (module.func) or --file", RET_CONFIG)
    kwargs = {}
    for item in kwarg:
        name, sep, value = item.partition("=")
        if not sep or not name:
            fail(f"--kwarg {item!r}: expected KEY=VALUE", RET_CONFIG)
        kwargs[name] = _parse_value(value)
    task_id = run_guarded(lambda: client.push(
        target, *[_parse_value(a) for a in args], kwargs=kwargs, queue_index=queue_index, delay=delay, key=key,
        max_retry=max_retry, retry_delay=retry_delay, priority=priority, expires=expires, timeout=timeout))
    click.echo(task_id)
    if wait:
        try:
            value = client.result(task_id, queue_index=queue_index)
        except TaskExpiredError as exc:
            fail(str(exc))
        except TaskFailedError as exc:
            fail(f"task {task_id} failed: {exc.error}")
        except PPQError as exc:
            fail(f"{type(exc).__name__}: {exc}")
        except KeyboardInterrupt:
            sys.exit(130)
        _print_json(value)


def _wait_end(client: Client, task_id: str, timeout: float | None, queue_index: int) -> None:
    """Wait for the task to end, whether it succeeded or failed."""
    try:
        client.result(task_id, timeout=timeout, queue_index=queue_index)
    except TaskFailedError:
        pass


@main.command()
@config_option
@master_option
@click.argument("task_id")
@click.option("--queue-index", "-q", type=int, default=0, help="The queue_index the task was pushed to.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--wait", is_flag=True, help="Wait for the task to end first.")
@click.option("--wait-timeout", "timeout", type=float, default=None, show_default="none: for ever",
              help="With --wait: seconds to wait at most.")
@click.option("--timeout", "old_timeout", type=float, default=None, hidden=True, expose_value=False,
              callback=lambda ctx, param, value: value is None or _renamed("--timeout", "--wait-timeout"))
@click.pass_context
def task(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
         task_id: str, queue_index: int, as_json: bool, wait: bool, timeout: float | None) -> None:
    """Show one task: state, retries, timestamps, result or error.

    A queued task of a module no live worker allows says so: "queued (waiting
    for a worker that allows mytasks)".

    \b
    Example:
      ppq task 3f2a9c... --wait --wait-timeout 30
    """
    _apply_sub(ctx, sub_config, sub_log_level)
    client = _client(ctx, masters)
    if wait:
        run_guarded(lambda: _wait_end(client, task_id, timeout, queue_index))
    info = run_guarded(lambda: client.info(task_id, queue_index))
    if info is None:
        fail(f"task {task_id} is unknown in queue_index {queue_index}")
    info.pop("result_pickled", None)
    if as_json:
        _print_json(info)
        return
    if "kind" in info:
        _show_node(task_id, info)
        if info["state"] == "dead" and wait:
            sys.exit(RET_ERROR)
        return
    table = _table(title=f"task {task_id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for name in ("state", "queue_index", "module", "fclass", "func", "args", "kwargs", "key", "priority", "expires",
                 "attempts", "leased", "worker", "created", "eta", "started", "finished", "result", "error",
                 "traceback"):
        value = info.get(name)
        if name == "attempts":
            value = _attempts(info)
        elif name == "leased":
            value = _leased(info)
        elif name in ("created", "eta", "started", "finished"):
            value = _when(value)
        elif name == "expires":
            value = _expires(info)
        elif name == "state" and info.get("waiting_for"):
            value = f"{value} (waiting for {info['waiting_for']})"
        elif name in ("args", "kwargs", "result"):
            value = json.dumps(value, default=_json_default) if value is not None else ""
        table.add_row(name, "" if value is None else str(value))
    if info.get("wf"):
        table.add_row("workflow", f"{info['wf']} (step {info.get('pos', 0)})")
    console.print(table)
    if info["state"] in ("dead", "failed") and wait:
        sys.exit(RET_ERROR)


def _show_node(task_id: str, info: dict[str, Any]) -> None:
    """A workflow's node (chain, group, chord): where it stands and its children."""
    table = _table(title=f"{info['kind']} {task_id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    rows = [("kind", info["kind"]), ("state", info["state"]), ("queue_index", info["queue_index"]),
            ("parent", info.get("parent") or ""), ("progress", info.get("progress", "")),
            ("created", _when(info.get("created"))), ("started", _when(info.get("started"))),
            ("finished", _when(info.get("finished")))]
    if info["state"] == "done":
        rows.append(("result", json.dumps(info.get("result"), default=_json_default)))
    if info.get("error"):
        rows += [("error", info["error"]), ("failed task", info.get("failed_task", ""))]
    children = [f"{kid['id']}  {kid['state']}" for kid in info.get("children", [])]
    if info.get("children_more"):
        children.append(f"and {info['children_more']} more")
    rows.append(("children", "\n".join(children)))
    for name, value in rows:
        table.add_row(name, "" if value is None else str(value))
    console.print(table)


def _cancelled_in_workflow(client: Any, task_id: str, queue_index: int, state: str, after: dict[str, Any]) -> int:
    """Print what cancelling ``task_id``, a workflow's node or step that was in ``state`` (its
    record now ``after``), did to its workflow; return 1 if it had already ended, else 0."""
    root, up = task_id, after.get("parent") or after.get("wf")
    for _ in range(MAX_DEPTH + 1):
        if not up:
            break
        root = up
        node = run_guarded(functools.partial(client.info, up, queue_index)) or {}
        up = node.get("parent")
    workflow = run_guarded(functools.partial(client.info, root, queue_index)) or {}
    where = f"workflow {root} ({workflow.get('kind', '?')})"
    if state == "cancelled":
        click.echo(f"{task_id}: already cancelled; {where} is {workflow.get('state', '?')}")
        return 0
    if state not in ("pending", "running", "queued", "delayed", "failed"):
        err_console.print(f"{task_id}: already {state}, not cancelled; {where} is {workflow.get('state', '?')}",
                          markup=False, highlight=False)
        return 1
    if after.get("kind"):
        what = (f"{task_id}: {after['kind']} cancelled (was {state}, {after.get('progress', '')}): its steps not "
                f"started are cancelled, a running one finishes with its result dropped")
    elif state == "running":
        what = f"{task_id}: running; it is cancelled when it ends, its result dropped"
    else:
        what = f"{task_id}: cancelled (was {state})"
    if root != task_id:
        what += f"; {where} is now {workflow.get('state', '?')}"
        if workflow.get("state") == "dead":
            what += " (the steps after the cancelled one do not run)"
    click.echo(what)
    return 0


def _expires(info: dict[str, Any]) -> str:
    """When the task must have started by ("" for never), and whether it missed it."""
    expires = info.get("expires")
    if not expires:
        return ""
    text = _when(expires)
    return f"{text} (expired: never run)" if info.get("state") == "expired" else text


def _attempts(info: dict[str, Any]) -> str:
    """Runs of the task so far against the runs it may have: "2 of 2 (max_retry 1), 2 failed"."""
    failed = int(info.get("retry") or 0)
    max_retry = int(info.get("max_retry") or 0)
    runs = failed + (1 if info.get("state") in ("running", "done") else 0)
    text = f"{runs} of {max_retry + 1} (max_retry {max_retry})"
    return f"{text}, {failed} failed" if failed else text


def _leased(info: dict[str, Any]) -> str:
    """How often the task was handed to a worker (prefetches and hand-backs included) and how
    many of those leases ran out."""
    times = int(info.get("attempts") or 0)
    expiries = int(info.get("expiries") or 0)
    text = f"{times} time{'' if times == 1 else 's'}"
    return f"{text}, {expiries} lease{'' if expiries == 1 else 's'} expired" if expiries else text


@main.command()
@config_option
@master_option
@click.argument("task_ids", nargs=-1, required=True)
@click.option("--queue-index", "-q", type=int, default=0, help="The queue_index the tasks are in.")
@click.pass_context
def cancel(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
           task_ids: tuple[str, ...], queue_index: int) -> None:
    """Cancel tasks: a waiting one never runs; a running one finishes, but its result is dropped.

    Prints one line per id. The exit code is 1 if any id is unknown or had
    already ended (done, dead or expired), else 0.

    \b
    Example:
      ppq cancel 3f2a9c... -q 1
    """
    _apply_sub(ctx, sub_config, sub_log_level)
    client = _client(ctx, masters)
    bad = 0
    for task_id in dict.fromkeys(task_ids):
        state = run_guarded(functools.partial(client.cancel, task_id, queue_index))
        after = run_guarded(functools.partial(client.info, task_id, queue_index)) if state else None
        if after and (after.get("kind") or after.get("wf")):
            bad += _cancelled_in_workflow(client, task_id, queue_index, state or "", after)
        elif state is None:
            bad += 1
            err_console.print(f"{task_id}: unknown in queue_index {queue_index}", markup=False, highlight=False)
        elif state in ("queued", "delayed", "failed", "pending"):
            click.echo(f"{task_id}: cancelled (was {state})")
        elif state == "running":
            click.echo(f"{task_id}: running; it is cancelled when it ends, its result dropped")
        elif state == "cancelled":
            click.echo(f"{task_id}: already cancelled")
        else:
            bad += 1
            err_console.print(f"{task_id}: already {state}, not cancelled", markup=False, highlight=False)
    sys.exit(RET_ERROR if bad else RET_OK)
