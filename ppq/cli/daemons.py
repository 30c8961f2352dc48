"""The long-running commands: ``ppq master``, ``ppq worker`` and ``ppq up``."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

import click

from ..config import DEFAULT_WORKER_PORT, Config
from ..errors import ConfigError, PPQError, TaskFailedError
from ..rpc.names import DEFAULT_NAMESERVER_PORT, DEFAULT_PRUNE_AFTER
from .base import _apply_sub, _default, _redis_map, _split, _stop_on_signals, build_config, config_option, main
from .output import RET_CONFIG, RET_ERROR, RET_OK, _table, console, fail, json_logs, run_guarded

log = logging.getLogger("ppq.cli")


def _check_port_free(host: str, port: int, key: str) -> None:
    """Fail in one line if ``host:port`` cannot be listened on (taken, or not an address here)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            fail(f"{key}: cannot listen on {host}:{port}: {exc.strerror or exc}", RET_CONFIG)


@main.command()
@config_option
@click.option("--host", default=None, show_default=_default("master.host"), help="Address to bind.")
@click.option("--port", type=int, default=None, show_default=_default("master.port"),
              help="Port to bind; 0 = any free port.")
@click.option("--redis-map", "redis_map", multiple=True, show_default="master.redis_map: an embedded redis-server",
              help="QUEUE_INDEX=redis://host:port/db (repeatable); a bare URL is queue_index 0.")
@click.option("--data-dir", default=None, show_default="master.data_dir: ~/.local/share/ppq/master-PORT",
              help="Data directory of the embedded redis-server.")
@click.option("--lease-timeout", type=float, default=None, show_default=_default("master.lease_timeout"),
              help="Seconds a task stays leased without a heartbeat.")
@click.option("--insecure", is_flag=True, default=None, help="Allow a non-loopback bind without auth_token.")
@click.option("--metrics-port", type=int, default=None, show_default="master.metrics_port: 0 = off",
              help="Serve Prometheus metrics on this port.")
@click.option("--nameserver", default=None, show_default="master.nameserver: none",
              help="host:port of a Pyro5 name server to register with (see `ppq nameserver`).")
@click.pass_context
def master(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, host: str | None,
           port: int | None, redis_map: tuple[str, ...], data_dir: str | None, lease_timeout: float | None,
           insecure: bool | None, metrics_port: int | None, nameserver: str | None) -> None:
    """Run a master: the Pyro5 object `queue` over the Redis stores.

    It prints nothing on stdout; its log (stderr) says where it serves, in a
    "master ready: URI" line, and where its embedded redis-server runs.

    \b
    Example:
      ppq master --port 7600 --redis-map 0=redis://127.0.0.1:6379/0
    """
    from ..master import serve

    _apply_sub(ctx, sub_config, sub_log_level)
    config = build_config(ctx, {
        "master.host": host, "master.port": port, "master.redis_map": _redis_map(redis_map),
        "master.data_dir": data_dir, "master.lease_timeout": lease_timeout, "master.insecure": insecure,
        "master.metrics_port": metrics_port, "master.nameserver": nameserver,
    })
    run_guarded(lambda: serve(config, signals=("SIGTERM", "SIGINT", "SIGUSR1")))


@main.command()
@config_option
@click.option("--host", default="127.0.0.1", help="Address to bind.")
@click.option("--port", type=int, default=DEFAULT_NAMESERVER_PORT, help="Port to bind; 0 = any free port.")
@click.option("--prune-after", type=float, default=DEFAULT_PRUNE_AFTER,
              help="Remove an entry not registered again for this many seconds whose address refuses "
                   "connections; 0 = never.")
@click.option("--insecure", is_flag=True, default=False, help="Allow a non-loopback bind without auth_token.")
@click.pass_context
def nameserver(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, host: str, port: int,
               prune_after: float, insecure: bool) -> None:
    """Run a Pyro5 name server where masters register and clients and workers find them.

    It is Pyro5's own name server object (`Pyro.NameServer`), served with ppq's
    token check (only auth_token may register; worker_token and client_token
    may only look names up), TLS
    settings and message limits. It keeps its names in memory: restarted, it
    is empty until the masters register again (every few seconds). An entry
    not registered again for --prune-after seconds whose address refuses a
    connection (a master that was killed) is removed.
    Like the master, it refuses a non-loopback address without auth_token.

    \b
    Example:
      ppq nameserver --host 10.0.0.1 --port 9090      # with PPQ_AUTH_TOKEN set
      ppq master --nameserver 10.0.0.1:9090 ...
      ppq worker --master-hosts PYRONAME:ppq.master@10.0.0.1:9090 ...
    """
    from .. import rpc

    _apply_sub(ctx, sub_config, sub_log_level)
    config = build_config(ctx, {})
    if not 0 <= port <= 65535:
        fail(f"--port: not a port number: {port}", RET_CONFIG)
    if prune_after < 0:
        fail(f"--prune-after: must not be negative, got {prune_after:g}", RET_CONFIG)

    def start() -> Any:
        rpc.check_bind(host, config.any_token, insecure, "--host")
        tokens = rpc.token_roles(config.auth_token, config.worker_token, config.client_token)
        try:
            return rpc.NameServerProcess(host, port, tokens, rpc.server_ssl_context(config.tls),
                                         prune_after=prune_after).start()
        except OSError as exc:
            raise ConfigError(f"--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None

    server = run_guarded(start)
    log.info("name server ready: %s", server.uri)
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
        log.info("name server stopped")


def _worker_overrides(master_hosts: tuple[str, ...], nameserver: str | None, queue_index: int | None,
                      concurrency: int | None,
                      pool: str | None, port: int | None, host: str | None, allow: tuple[str, ...],
                      allowed_paths: tuple[str, ...], task_timeout: float | None, max_sleep: float | None,
                      heartbeat_interval: float | None, autodiscover: tuple[str, ...],
                      insecure: bool | None, metrics_port: int | None, prefetch: int | None) -> dict[str, Any]:
    return {
        "worker.master_hosts": _split(master_hosts), "worker.nameserver": nameserver,
        "worker.queue_index": queue_index,
        "worker.concurrency": concurrency, "worker.pool": pool, "worker.port": port, "worker.host": host,
        "worker.allowed_modules": _split(allow), "worker.allowed_paths": _split(allowed_paths),
        "worker.task_timeout": task_timeout, "worker.max_sleep": max_sleep,
        "worker.heartbeat_interval": heartbeat_interval, "worker.autodiscover": _split(autodiscover),
        "worker.insecure": insecure, "worker.metrics_port": metrics_port, "worker.prefetch": prefetch,
    }


def worker_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    options = [
        click.option("--master-hosts", "master_hosts", multiple=True,
                     show_default="worker.master_hosts, else the config's own master",
                     help="Master host:port, PYRO:, PYROLOC://, or name server address (PYRONAME:ppq.master@"
                          "host:port, PYROMETA:ppq.queue@host:port); comma-separated or repeated."),
        click.option("--nameserver", default=None, show_default="worker.nameserver: none",
                     help="host:port of a name server: pull from the masters registered there."),
        click.option("--queue-index", type=int, default=None, show_default=_default("worker.queue_index"),
                     help="The queue_index to pull."),
        click.option("--concurrency", "-c", type=int, default=None,
                     show_default="worker.concurrency: 0 = the CPU count", help="Executors."),
        click.option("--pool", type=click.Choice(["processes", "threads"]), default=None,
                     show_default=_default("worker.pool"),
                     help="Run each task in an executor process (timeouts kill it) or a thread."),
        click.option("--port", type=int, default=None, show_default=_default("worker.port"),
                     help="Control object port; 0 = any free port."),
        click.option("--host", default=None, show_default=_default("worker.host"),
                     help="Control object bind address."),
        click.option("--allow", "--allowed-modules", "allow", multiple=True,
                     show_default="worker.allowed_modules: none",
                     help="Module (dotted prefix) tasks may come from; repeatable or comma-separated."),
        click.option("--allowed-paths", multiple=True, show_default="worker.allowed_paths: none",
                     help="Directories a task's `path` may name."),
        click.option("--task-timeout", type=float, default=None, show_default=_default("worker.task_timeout"),
                     help="Seconds a task may run; also the grace period on stop."),
        click.option("--max-sleep", type=float, default=None, show_default=_default("worker.max_sleep"),
                     help="Longest idle wait for a task, in seconds."),
        click.option("--heartbeat-interval", type=float, default=None,
                     show_default=_default("worker.heartbeat_interval"), help="Seconds between heartbeats."),
        click.option("--autodiscover", multiple=True, show_default="worker.autodiscover: none",
                     help="Packages whose `tasks` module is imported at start."),
        click.option("--insecure", is_flag=True, default=None, help="Allow a non-loopback bind without a token."),
        click.option("--metrics-port", type=int, default=None, show_default="worker.metrics_port: 0 = off",
                     help="Serve Prometheus metrics on this port."),
        click.option("--prefetch", type=int, default=None, show_default="worker.prefetch: -1 = automatic",
                     help="Tasks held ahead of free executors (-1 automatic, 0 none, N up to N)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command()
@config_option
@worker_options
@click.pass_context
def worker(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, **options: Any) -> None:
    """Run a worker agent: pull tasks from the masters and run them.

    SIGTERM, SIGINT and SIGUSR1 stop it gracefully, SIGUSR2 restarts it.

    \b
    Example:
      ppq worker --master-hosts 127.0.0.1:7600 --allow mytasks --concurrency 4
    """
    from .. import worker as worker_mod

    _apply_sub(ctx, sub_config, sub_log_level)
    config = build_config(ctx, _worker_overrides(**options))
    w = config.worker
    # The agent falls back to a free port when the default one is taken (several workers on one
    # machine); a port asked for, by flag, variable or a non-default value, must be that port.
    if w.port and (options["port"] is not None or "PPQ_WORKER_PORT" in os.environ or w.port != DEFAULT_WORKER_PORT):
        _check_port_free(w.host, w.port, "worker.port")
    mode = run_guarded(lambda: worker_mod.run(config))
    if mode == worker_mod.RESTART:
        worker_mod.restart()  # in place: the same pid, under the same supervisor
    sys.exit(RET_ERROR if mode == worker_mod.NOW else RET_OK)


@main.command()
@config_option
@click.option("--workers", "-w", type=int, default=1, help="Worker agents to start.")
@click.option("--concurrency", "-c", type=int, default=None, show_default="worker.concurrency: 0 = the CPU count",
              help="Executors per worker.")
@click.option("--host", default=None, show_default=_default("master.host"), help="Address the master binds.")
@click.option("--port", type=int, default=None, show_default=_default("master.port"),
              help="Master port; 0 = any free port.")
@click.option("--queue-index", type=int, default=None, show_default=_default("worker.queue_index"),
              help="The queue_index the workers pull (and --demo pushes to).")
@click.option("--data-dir", default=None, show_default="master.data_dir: ~/.local/share/ppq/master-PORT",
              help="Data directory of the embedded redis-server.")
@click.option("--allow", multiple=True, show_default="worker.allowed_modules: none",
              help="Module tasks may come from; repeatable or comma-separated.")
@click.option("--metrics-port", type=int, default=None, show_default="master.metrics_port: 0 = off",
              help="Serve the master's Prometheus metrics on this port.")
@click.option("--insecure", is_flag=True, default=None, help="Allow a non-loopback bind without auth_token.")
@click.option("--demo", is_flag=True, help="Push a few ppq.demo tasks once the stack is up and show their results.")
@click.option("--dashboard/--no-dashboard", default=True,
              help="Start the web dashboard (on dashboard.host:dashboard.port, 127.0.0.1:7680).")
@click.pass_context
def up(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, workers: int,
       concurrency: int | None, host: str | None, port: int | None, queue_index: int | None, data_dir: str | None,
       allow: tuple[str, ...], metrics_port: int | None, insecure: bool | None, demo: bool, dashboard: bool) -> None:
    """Run a whole local stack in the foreground: embedded Redis, a master and workers.

    Ctrl-C, SIGTERM or SIGHUP stops everything, in order, piped or not (and so
    does closing the pipe its output goes to): the workers first, which finish
    their running tasks (up to worker.task_timeout) and report them, then the
    master, then the embedded Redis. A second Ctrl-C stops the workers at once:
    their running tasks go back to the queue. The workers die with `ppq up`.

    A worker that dies is named in one line and started again, unless it
    exited on a configuration error or within 5 s of its start: then everything
    stops, as it does if the embedded Redis dies (exit code 2 for a
    configuration error, else 1).

    Its stdout says where Redis, the master and the web dashboard run and how
    to push; with --log-format json it prints nothing there, and the log says it
    instead. The dashboard is left out with --no-dashboard, and, in one line,
    when its libraries are missing or its port is taken.

    \b
    Example:
      ppq up --allow mytasks --workers 2
    """
    from .. import stack as stack_mod

    _apply_sub(ctx, sub_config, sub_log_level)
    if demo:
        allow = (*allow, "ppq.demo")
    config = build_config(ctx, {"master.host": host, "master.port": port, "master.data_dir": data_dir,
                                "master.metrics_port": metrics_port, "master.insecure": insecure,
                                "worker.queue_index": queue_index, "worker.allowed_modules": _split(allow)})
    if workers < 0:
        fail("--workers must not be negative", RET_CONFIG)
    # The banner says where Redis and the master run; the log says it only when there is no banner.
    stack = stack_mod.Stack(config, workers, config_path=ctx.obj.get("config"), concurrency=concurrency,
                            allow=_split(allow), announce=logging.INFO if json_logs() else logging.DEBUG,
                            dashboard=dashboard, launcher=ctx.obj.get("launcher"))
    stack.install_signal_handlers()
    run_guarded(stack.start)
    server = stack.server
    assert server is not None
    if not json_logs():
        if server.embedded is not None:
            _say(f"redis: {server.embedded.url} (data in {server.embedded.data_dir})")
        _say(f"master: {server.uri}")
        if stack.dashboard_url:
            _say(f"dashboard: {stack.dashboard_url}")
        allowed = ", ".join(config.worker.allowed_modules) or "none: pass --allow MODULE"
        reach = f"--config {ctx.obj['config']}" if ctx.obj.get("config") else f"--master {stack.address}"
        _say(f"{workers} worker(s) started (allowed modules: {allowed}). Push with: "
             f"ppq push {reach} module.func ARGS   (Ctrl-C stops)")
    if demo:
        threading.Thread(target=_run_demo, args=(config, stack.address, stack.stopping), daemon=True).start()
    outcome = stack.run(on_stopping=lambda: _say("stopping..."))
    if outcome == stack_mod.WORKER_CONFIG:
        fail("a worker stopped on a configuration error (above); everything is stopped", RET_CONFIG)
    if outcome == stack_mod.DIED:
        fail(f"{stack.reason}; everything is stopped")


def _say(text: str) -> None:
    """Print a line for people; if the reader of a pipe is gone, carry on without output. With
    --log-format json, log it instead: nothing plain goes out then.

    rich answers a broken pipe by pointing stdout at /dev/null and raising SystemExit:
    the stack sees its output gone and stops in order, which an exit here would skip.
    """
    if json_logs():
        log.info("%s", text)
        return
    try:
        console.print(text, markup=False, highlight=False)
    except SystemExit:
        pass


def _run_demo(config: Config, address: str, stop: threading.Event) -> None:
    """Push demo tasks through the stack and print what came back."""
    from ..client import Client

    client = Client([address], config=config, queue_index=config.worker.queue_index)
    try:
        calls = {client.push("ppq.demo.add", i, i): f"add({i}, {i})" for i in range(5)}
        calls.update({client.push("ppq.demo.slow_square", i): f"slow_square({i})" for i in range(5)})
        calls[client.push("ppq.demo.where")] = "where()"
        failing = client.push("ppq.demo.fail", max_retry=0)
        table = _table(title="demo tasks, in the order they finished")
        for name in ("task id", "call", "result"):
            table.add_column(name)
        for task_id, value in client.results(list(calls), timeout=60):
            if json_logs():
                _say(f"demo task {task_id}: {calls[task_id]} = {json.dumps(value)}")
            table.add_row(task_id, calls[task_id], json.dumps(value))
        if not json_logs():
            console.print(table)
        try:
            client.result(failing, timeout=60)
        except TaskFailedError as exc:
            _say(f"ppq.demo.fail went to the dead list as expected: {exc.error}")
        _say(f"try: ppq status -m {address}   |   ppq dead list -m {address}")
    except PPQError as exc:
        if not stop.is_set():
            log.error("demo failed: %s", exc)
    finally:
        client.close()

