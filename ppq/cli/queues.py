"""The commands that act on a whole queue_index or on one worker: the ``ppq queue`` group
(``purge``, ``pause``, ``resume``) and ``ppq workers pause`` / ``ppq workers resume``."""

from __future__ import annotations

import time

import click

from .base import _apply_sub, _client, config_option, main, master_option
from .operate import _confirm, workers
from .output import RET_ERROR, err_console, fail, run_guarded

# Seconds between progress lines of a long purge.
PROGRESS_EVERY = 1.0


def queue_index_option(fn: click.decorators.FC) -> click.decorators.FC:
    return click.option("--queue-index", "-q", type=int, default=0, help="The queue_index to act on.")(fn)


@main.group()
@config_option
@click.pass_context
def queue(ctx: click.Context, sub_config: str | None, sub_log_level: str | None) -> None:
    """A whole queue_index: delete the tasks waiting in it, pause and resume it.

    \b
    Example:
      ppq queue pause -q 1
      ppq queue resume -q 1
      ppq queue purge -q 1 --yes
    """
    _apply_sub(ctx, sub_config, sub_log_level)


@queue.command("purge")
@config_option
@master_option
@queue_index_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask: needed when stdin is not a terminal.")
@click.pass_context
def queue_purge(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
                queue_index: int, yes: bool) -> None:
    """Delete every task waiting in a queue_index, ready and delayed, for good.

    Their records and de-duplication keys go with them; running tasks finish as
    usual and dead ones stay (`ppq dead purge` deletes those). Asks first at a
    terminal, showing how many will go; elsewhere it needs --yes. The master
    deletes them a batch at a time, so Redis keeps serving meanwhile; a long
    run prints its progress on stderr.

    \b
    Example:
      ppq queue purge -q 0 --yes
    """
    _apply_sub(ctx, sub_config, sub_log_level)
    client = _client(ctx, masters)
    entry = run_guarded(client.server_info).get(queue_index)
    if entry is None:
        fail(f"queue_index {queue_index} is not configured on this master")
    if not entry.get("ok", True):
        fail(f"queue_index {queue_index}: {entry.get('error')}")
    count = int(entry.get("queued", 0)) + int(entry.get("delayed", 0))
    if count:
        _confirm(yes, f"Delete the {count} task(s) waiting in queue_index {queue_index} for good?")
    last = [time.monotonic()]

    def progress(done: int, left: int) -> None:
        if left and time.monotonic() - last[0] >= PROGRESS_EVERY:
            last[0] = time.monotonic()
            err_console.print(f"purged {done} task(s), {left} left", markup=False, highlight=False)

    n = run_guarded(lambda: client.purge_queue(queue_index, progress)) if count else 0
    click.echo(f"purged {n} task(s) from queue_index {queue_index}")


@queue.command("pause")
@config_option
@master_option
@queue_index_option
@click.pass_context
def queue_pause(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
                queue_index: int) -> None:
    """Stop every master from handing out tasks of a queue_index until `ppq queue resume`.

    Pushes are still taken and stored, and running tasks finish; `ppq status`
    shows the queue_index as paused.

    \b
    Example:
      ppq queue pause -q 1
    """
    _apply_sub(ctx, sub_config, sub_log_level)
    client = _client(ctx, masters)
    if run_guarded(lambda: client.pause_queue(queue_index)):
        click.echo(f"queue_index {queue_index} paused: no task of it is handed out until "
                   f"`ppq queue resume -q {queue_index}`")
    else:
        click.echo(f"queue_index {queue_index} was paused already")


@queue.command("resume")
@config_option
@master_option
@queue_index_option
@click.pass_context
def queue_resume(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
                 queue_index: int) -> None:
    """Hand out the tasks of a paused queue_index again.

    \b
    Example:
      ppq queue resume -q 1
    """
    _apply_sub(ctx, sub_config, sub_log_level)
    client = _client(ctx, masters)
    if run_guarded(lambda: client.resume_queue(queue_index)):
        click.echo(f"queue_index {queue_index} resumed")
    else:
        click.echo(f"queue_index {queue_index} was not paused")


def _pause_worker(ctx: click.Context, masters: tuple[str, ...], worker_id: str, queue_index: int | None,
                  on: bool) -> list[int]:
    client = _client(ctx, masters)
    method = client.pause_worker if on else client.resume_worker
    found = run_guarded(lambda: method(worker_id, queue_index))
    if not found:  # pragma: no cover - the master raises instead
        fail(f"no worker {worker_id!r} is listed", RET_ERROR)
    return list(found)


@workers.command("pause")
@config_option
@master_option
@click.argument("worker_id")
@click.option("--queue-index", "-q", type=int, default=None, show_default="wherever it is listed",
              help="The queue_index to pause it in.")
@click.pass_context
def workers_pause(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
                  worker_id: str, queue_index: int | None) -> None:
    """Hand no new task to the worker WORKER_ID (as `ppq workers` lists it) until
    `ppq workers resume`.

    It finishes the tasks it runs and stays listed, shown as paused. An id no
    master lists is an error, and nothing changes.

    \b
    Example:
      ppq workers pause host1:4242:9f3c
    """
    _apply_sub(ctx, sub_config, sub_log_level)
    found = _pause_worker(ctx, masters, worker_id, queue_index, True)
    click.echo(f"worker {worker_id} paused (queue_index {', '.join(map(str, found))}): it finishes what it runs "
               f"and gets no new task until `ppq workers resume {worker_id}`")


@workers.command("resume")
@config_option
@master_option
@click.argument("worker_id")
@click.option("--queue-index", "-q", type=int, default=None, show_default="wherever it is listed",
              help="The queue_index to resume it in.")
@click.pass_context
def workers_resume(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
                   worker_id: str, queue_index: int | None) -> None:
    """Hand tasks to the paused worker WORKER_ID again.

    \b
    Example:
      ppq workers resume host1:4242:9f3c
    """
    _apply_sub(ctx, sub_config, sub_log_level)
    found = _pause_worker(ctx, masters, worker_id, queue_index, False)
    click.echo(f"worker {worker_id} resumed (queue_index {', '.join(map(str, found))})")
