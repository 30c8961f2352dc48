"""``ppq dashboard``: the web dashboard, in the foreground."""

from __future__ import annotations

import click

from .base import _apply_sub, _default, _split, build_config, config_option, main, master_option
from .output import RET_CONFIG, fail, run_guarded


@main.command()
@config_option
@master_option
@click.option("--host", default=None, show_default=_default("dashboard.host"),
              help="Address to bind; anything but loopback needs auth_token.")
@click.option("--port", type=int, default=None, show_default=_default("dashboard.port"),
              help="Port to bind; 0 = any free port.")
@click.option("--read-only", is_flag=True, default=None, show_default=_default("dashboard.read_only"),
              help="Show only: no requeue, purge, pause, resume or run-now.")
@click.pass_context
def dashboard(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
              host: str | None, port: int | None, read_only: bool | None) -> None:
    """Serve the web dashboard: queues, workers, tasks, the dead list, schedules and limits.

    It logs "dashboard ready: URL" once it listens. It reaches the masters as a
    client does (and fails over between them), never Redis. With auth_token set
    it asks for it on a sign-in page; without one it refuses any address but
    loopback. Ctrl-C or SIGTERM stops it.

    \b
    Example:
      ppq dashboard --port 7680 --read-only
    """
    from .. import dashboard as dashboard_mod

    _apply_sub(ctx, sub_config, sub_log_level)
    config = build_config(ctx, {"dashboard.host": host, "dashboard.port": port, "dashboard.read_only": read_only,
                                "client.masters": _split(masters)})
    missing = dashboard_mod.missing_libraries()
    if missing:
        fail(f"the dashboard needs {', '.join(missing)}: pip install starlette uvicorn jinja2", RET_CONFIG)
    run_guarded(lambda: dashboard_mod.check_bind(config))

    def run() -> None:
        from ..dashboard.app import serve

        serve(config)

    run_guarded(run)
