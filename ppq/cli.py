"""The ``ppq`` command. The only module that imports click, prints for people, or exits.

Settings come from, highest first: flags, ``PPQ_*`` environment variables, the
YAML file given by ``--config`` (or ``PPQ_CONFIG``), defaults.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import click

from . import __version__
from .config import DEFAULT_WORKER_PORT, Config, connect_address, load_config
from .errors import ConfigError, ConnectError, PPQError, TaskFailedError

if TYPE_CHECKING:
    from .client import Client

log = logging.getLogger("ppq.cli")

# Exit codes.
RET_OK = 0
RET_ERROR = 1
RET_CONFIG = 2


class LazyConsole:
    """A rich Console made on first use: a worker or master that prints no table never imports rich,
    which is about a third of their start-up."""

    def __init__(self, stderr: bool = False) -> None:
        self._stderr = stderr
        self._console: Any = None

    def get(self) -> Any:
        if self._console is None:
            from rich.console import Console

            stream = sys.stderr if self._stderr else sys.stdout
            # Piped output is not cut to 80 columns, unless COLUMNS says so.
            wide = stream.isatty() or "COLUMNS" in os.environ
            self._console = Console(stderr=self._stderr, width=None if wide else (400 if self._stderr else 160))
        return self._console

    def __getattr__(self, name: str) -> Any:
        return getattr(self.get(), name)


console = LazyConsole()
err_console = LazyConsole(stderr=True)


def _table(**options: Any) -> Any:
    from rich.table import Table

    return Table(**options)


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data = {"time": record.created, "level": record.levelname, "logger": record.name,
                "message": record.getMessage()}
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data)


def setup_logging(config: Config) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if config.log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("ppq")
    root.handlers[:] = [handler]
    root.setLevel(config.log_level)
    root.propagate = False


def fail(message: str, code: int = RET_ERROR) -> None:
    err_console.print(f"ppq: error: {message}", markup=False, highlight=False)
    sys.exit(code)


def run_guarded(fn: Callable[[], Any]) -> Any:
    """Turn ppq errors into one line and an exit code."""
    try:
        return fn()
    except ConfigError as exc:
        fail(str(exc), RET_CONFIG)
    except ConnectError as exc:
        fail(f"ConnectError: {exc} (is a master running there? `ppq up` starts one; -m HOST:PORT or "
             f"--config names another)")
    except PPQError as exc:
        fail(f"{type(exc).__name__}: {exc}")
    except KeyboardInterrupt:
        sys.exit(130)


def build_config(ctx: click.Context, overrides: dict[str, Any]) -> Config:
    path = ctx.obj.get("config") or os.environ.get("PPQ_CONFIG")
    base = dict(ctx.obj.get("overrides", {}))
    base.update(overrides)
    if not logging.getLogger("ppq").handlers:
        setup_logging(Config())  # so that a warning while loading the config is printed like the others
    config = run_guarded(lambda: load_config(path, base))
    setup_logging(config)
    return config  # type: ignore[no-any-return]


def _split(values: tuple[str, ...]) -> list[str] | None:
    items = [v.strip() for value in values for v in value.split(",") if v.strip()]
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


def _renamed(old: str, new: str) -> bool:
    raise click.UsageError(f"{old} is ambiguous here and was renamed: use {new}")


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, frame: Any) -> None:
        stop.set()

    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        signal.signal(getattr(signal, name), handler)


# -- master / worker / up ---------------------------------------------------------


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
@click.pass_context
def master(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, host: str | None,
           port: int | None, redis_map: tuple[str, ...], data_dir: str | None, lease_timeout: float | None,
           insecure: bool | None, metrics_port: int | None) -> None:
    """Run a master: the Pyro5 object `queue` over the Redis stores.

    \b
    Example:
      ppq master --port 7600 --redis-map 0=redis://127.0.0.1:6379/0
    """
    from .master import MasterServer, serve

    _apply_sub(ctx, sub_config, sub_log_level)
    config = build_config(ctx, {
        "master.host": host, "master.port": port, "master.redis_map": _redis_map(redis_map),
        "master.data_dir": data_dir, "master.lease_timeout": lease_timeout, "master.insecure": insecure,
        "master.metrics_port": metrics_port,
    })

    def ready(server: MasterServer) -> None:
        if server.embedded is not None:
            console.print(f"embedded redis-server: {server.embedded.url}, data in {server.embedded.data_dir}",
                          markup=False, highlight=False)
        console.print(f"ppq master ready: {server.uri}", markup=False, highlight=False)

    run_guarded(lambda: serve(config, ready=ready, signals=("SIGTERM", "SIGINT", "SIGUSR1")))


def _worker_overrides(master_hosts: tuple[str, ...], queue_index: int | None, concurrency: int | None,
                      pool: str | None, port: int | None, host: str | None, allow: tuple[str, ...],
                      allowed_paths: tuple[str, ...], task_timeout: float | None, max_sleep: float | None,
                      heartbeat_interval: float | None, autodiscover: tuple[str, ...],
                      insecure: bool | None, metrics_port: int | None, prefetch: int | None) -> dict[str, Any]:
    return {
        "worker.master_hosts": _split(master_hosts), "worker.queue_index": queue_index,
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
                     help="Master host:port, PYRO: or PYROLOC:// address; comma-separated or repeated."),
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
    from . import worker as worker_mod

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
@click.pass_context
def up(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, workers: int,
       concurrency: int | None, host: str | None, port: int | None, queue_index: int | None, data_dir: str | None,
       allow: tuple[str, ...], metrics_port: int | None, insecure: bool | None, demo: bool) -> None:
    """Run a whole local stack in the foreground: embedded Redis, a master and workers.

    Ctrl-C stops everything cleanly.

    \b
    Example:
      ppq up --allow mytasks --workers 2
    """
    from .master import MasterServer

    _apply_sub(ctx, sub_config, sub_log_level)
    if demo:
        allow = (*allow, "ppq.demo")
    config = build_config(ctx, {"master.host": host, "master.port": port, "master.data_dir": data_dir,
                                "master.metrics_port": metrics_port, "master.insecure": insecure,
                                "worker.queue_index": queue_index, "worker.allowed_modules": _split(allow)})
    if workers < 0:
        fail("--workers must not be negative", RET_CONFIG)
    stop = threading.Event()
    _stop_on_signals(stop)
    server = run_guarded(lambda: MasterServer(config).start())
    qi = config.worker.queue_index
    if qi not in server.stores:
        server.stop()
        fail(f"worker.queue_index: {qi} is not served by this master (master.redis_map has "
             f"{', '.join(map(str, sorted(server.stores)))})", RET_CONFIG)
    address = connect_address(config.master.host, int(server.port))
    if server.embedded is not None:
        console.print(f"redis: {server.embedded.url} (data in {server.embedded.data_dir})", markup=False,
                      highlight=False)
    console.print(f"master: {server.uri}", markup=False, highlight=False)
    command = [sys.executable, "-m", "ppq"]
    if ctx.obj.get("config"):
        command += ["--config", ctx.obj["config"]]
    command += ["worker", "--master-hosts", address, "--port", "0", "--queue-index", str(qi)]
    if concurrency is not None:
        command += ["--concurrency", str(concurrency)]
    for module in _split(allow) or []:
        command += ["--allow", module]
    env = dict(os.environ)
    if config.log_level:
        env["PPQ_LOG_LEVEL"] = config.log_level
    env["PPQ_LOG_FORMAT"] = config.log_format
    children = [subprocess.Popen(command, env=env) for _ in range(workers)]
    allowed = ", ".join(config.worker.allowed_modules) or "none: pass --allow MODULE"
    reach = f"--config {ctx.obj['config']}" if ctx.obj.get("config") else f"--master {address}"
    console.print(f"{workers} worker(s) started (allowed modules: {allowed}). Push with: "
                  f"ppq push {reach} module.func ARGS   (Ctrl-C stops)", markup=False, highlight=False)
    if demo:
        threading.Thread(target=_run_demo, args=(config, address, stop), daemon=True).start()
    config_error = False
    try:
        while not config_error and not stop.wait(0.5):
            for i, child in enumerate(children):
                if child.poll() is None or stop.is_set():
                    continue
                if child.returncode == RET_CONFIG:
                    # Its one-line error is above; another worker would only fail the same way.
                    config_error = True
                    break
                log.warning("worker pid %s exited with %s; starting another", child.pid, child.returncode)
                children[i] = subprocess.Popen(command, env=env)
    finally:
        console.print("stopping...", markup=False)
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + config.worker.task_timeout + 10
        for child in children:
            try:
                child.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.kill()
        server.stop()
    if config_error:
        fail("a worker stopped on a configuration error (above); everything is stopped", RET_CONFIG)


def _run_demo(config: Config, address: str, stop: threading.Event) -> None:
    """Push demo tasks through the stack and print what came back."""
    from .client import Client

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
            table.add_row(task_id, calls[task_id], json.dumps(value))
        console.print(table)
        try:
            client.result(failing, timeout=60)
        except TaskFailedError as exc:
            console.print(f"ppq.demo.fail went to the dead list as expected: {exc.error}", markup=False,
                          highlight=False)
        console.print(f"try: ppq status -m {address}   |   ppq dead list -m {address}", markup=False,
                      highlight=False)
    except PPQError as exc:
        if not stop.is_set():
            log.error("demo failed: %s", exc)
    finally:
        client.close()


# -- client commands ------------------------------------------------------------------


def _client(ctx: click.Context, masters: tuple[str, ...]) -> Any:
    from .client import Client

    config = build_config(ctx, {"client.masters": _split(masters)})
    return run_guarded(lambda: Client(config=config))


def master_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--master", "-m", "masters", multiple=True,
                        show_default="client.masters, else worker.master_hosts, else master.host:master.port",
                        help="Master host:port, PYRO: or PYROLOC:// address; repeatable.")(fn)


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _print_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, default=_json_default, sort_keys=True))


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _when(ts: Any) -> str:
    if not ts:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(ts)))


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
        from .errors import InvalidTaskError

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
         key: str, max_retry: int, retry_delay: bool, timeout: float | None, wait: bool, file_: str | None,
         chunk: int, skip: int) -> None:
    """Push TARGET (module.func) with ARGS (each read as JSON if it parses, else a string).

    With --file, push every line of a JSON-lines file instead; each line holds
    push_task fields ("task": "module.func" or "func" and "module", "args",
    "kwargs", "queue_index", "delay", "key", "max_retry"...); -q, --delay,
    --max-retry, --retry-delay and --task-timeout given here apply to lines that
    do not set them. The file is read as it is pushed, --chunk lines per round
    trip, and "LINE<TAB>ID" is printed for each line as soon as it is stored;
    refused lines are named on stderr with their reason. Ctrl-C stops after the
    chunk in flight and prints the --skip that resumes.

    \b
    Example:
      ppq push mytasks.add 2 3 --wait
      ppq push mytasks.report -k day='"2024-01-31"' --delay 60 --task-timeout 600
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
                                                 ("timeout", timeout))
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
        max_retry=max_retry, retry_delay=retry_delay, timeout=timeout))
    click.echo(task_id)
    if wait:
        try:
            value = client.result(task_id, queue_index=queue_index)
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
    table = _table(title=f"task {task_id}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value")
    for name in ("state", "queue_index", "module", "fclass", "func", "args", "kwargs", "key", "retry", "max_retry",
                 "attempts", "expiries", "worker", "created", "eta", "started", "finished", "result", "error",
                 "traceback"):
        value = info.get(name)
        if name in ("created", "eta", "started", "finished"):
            value = _when(value)
        elif name in ("args", "kwargs", "result"):
            value = json.dumps(value, default=_json_default) if value is not None else ""
        table.add_row(name, "" if value is None else str(value))
    console.print(table)
    if info["state"] in ("dead", "failed") and wait:
        sys.exit(RET_ERROR)


@main.command()
@config_option
@master_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def status(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
           as_json: bool) -> None:
    """Queue counts per queue_index and the live workers.

    "leased" counts tasks handed to workers (prefetched ones too), "running"
    those the workers said they ran at their last heartbeat. Columns that do not
    fit the terminal are left out; --json has everything.

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
    ("running", "running", 2), ("dead", "dead", 1), ("done_per_min", "done/min", 3),
    ("failed_per_min", "fail/min", 4), ("workers", "workers", 5), ("pushed", "pushed", 6), ("done", "done", 6),
    ("retried", "retried", 7), ("expired", "expired", 8), ("cancelled", "cancelled", 8), ("redis", "redis", 9),
)
WORKER_COLUMNS = (
    ("id", "worker", 0), ("queue_index", "queue", 3), ("concurrency", "exec", 2), ("running", "running", 0),
    ("done", "done", 1), ("failed", "failed", 1), ("heartbeat", "heartbeat", 2), ("tasks", "running tasks", 9),
)


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
                text = key in ("id", "redis", "tasks", "heartbeat")
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
    "running" those the workers said they were running at their last heartbeat.
    """
    from rich.console import Group
    from rich.text import Text

    width = width or console.width
    queue_rows: list[dict[str, str]] = []
    worker_rows: list[dict[str, str]] = []
    notes: list[str] = []
    for qi, entry in sorted(info.items(), key=lambda kv: int(kv[0])):
        if not entry.get("ok", True):
            queue_rows.append({"queue_index": str(qi), **dict.fromkeys(("queued", "leased", "running"), "?"),
                               "redis": str(entry.get("redis", ""))})
            notes.append(f"queue_index {qi}: Redis {entry.get('redis')} UNREACHABLE: {entry.get('error', '')}")
            continue
        workers = entry.get("workers", [])
        row = {key: str(entry.get(key, 0)) for key, _, _ in QUEUE_COLUMNS}
        row.update(queue_index=str(qi), leased=str(entry.get("running", 0)), workers=str(len(workers)),
                   running=str(sum(len(w.get("running") or []) for w in workers)), redis=str(entry.get("redis", "")))
        queue_rows.append(row)
        for w in workers:
            running = w.get("running") or []
            beat = w.get("last_heartbeat")
            worker_rows.append({
                "id": str(w.get("id")), "queue_index": str(qi), "concurrency": str(w.get("concurrency", "")),
                "running": str(len(running)), "done": str(w.get("done", "")), "failed": str(w.get("failed", "")),
                "heartbeat": time.strftime("%H:%M:%S", time.localtime(float(beat))) if beat else "",
                "tasks": ", ".join(running) or "-"})
    parts: list[Any] = [_fit_table("queues", QUEUE_COLUMNS, queue_rows, width, foldable=("redis",))]
    parts += [Text(note, style="red") for note in notes]
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


@main.command()
@config_option
@master_option
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def workers(ctx: click.Context, sub_config: str | None, sub_log_level: str | None, masters: tuple[str, ...],
            as_json: bool) -> None:
    """Live workers with their per-function stats, read from their control objects.

    \b
    Example:
      ppq workers --json
    """
    from .rpc import WORKER_OBJECT, PyroFunc

    _apply_sub(ctx, sub_config, sub_log_level)
    client = _client(ctx, masters)
    config = build_config(ctx, {})
    info = run_guarded(client.server_info)
    rows = []
    # A control_uri is what the worker said: it gets a token it could have had anyway (the worker
    # token; auth_token where roles are not split), never the client token, which a process
    # with only the worker token could otherwise collect by listing a control_uri of its own.
    control_token: str | None | bool = config.worker_token or (False if config.client_token else config.auth_token)
    for entry in info.values():
        for w in entry.get("workers", []):
            stats: dict[str, Any] = {}
            running: list[Any] = []
            uri = w.get("control_uri")
            if uri and control_token is not False:
                control = PyroFunc(uri, token=control_token, timeout=3, objid=WORKER_OBJECT, default_return=None)
                stats = control("get_worker_stats") or {}
                running = (control("get_running_info") or {}).get("tasks", [])
                control.close()
            rows.append({"worker": w, "stats": stats, "running": running})
    if as_json:
        _print_json(rows)
        return
    if not rows:
        click.echo("no live workers")
        return
    table = _table(title="workers")
    for name in ("worker", "function", "count", "ok", "failed", "mean time (s)"):
        table.add_column(name)
    for row in rows:
        wid = str(row["worker"].get("id"))
        if not row["stats"]:
            table.add_row(wid, "-", "0", "0", "0", "-")
        for name, s in sorted(row["stats"].items()):
            table.add_row(wid, name, str(s["count"]), str(s["ok"]), str(s["failed"]), f"{s['mean_time']:.4f}")
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
    for name in ("id", "task", "retry", "died", "reason"):
        table.add_column(name)
    for t in tasks:
        table.add_row(t["id"], f"{t['module']}.{t['func']}", str(t.get("retry")), _when(t.get("finished")),
                      t.get("error", ""))
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

    An id that is unknown or not dead is named on stderr, and the exit code is 1.

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
        state = run_guarded(lambda task_id=task_id: client.cancel(task_id, queue_index))
        if state is None:
            bad += 1
            err_console.print(f"{task_id}: unknown in queue_index {queue_index}", markup=False, highlight=False)
        elif state in ("queued", "delayed", "failed"):
            click.echo(f"{task_id}: cancelled (was {state})")
        elif state == "running":
            click.echo(f"{task_id}: running; it is cancelled when it ends, its result dropped")
        elif state == "cancelled":
            click.echo(f"{task_id}: already cancelled")
        else:
            bad += 1
            err_console.print(f"{task_id}: already {state}, not cancelled", markup=False, highlight=False)
    sys.exit(RET_ERROR if bad else RET_OK)


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


_examples_last(main)


if __name__ == "__main__":  # pragma: no cover
    main()
