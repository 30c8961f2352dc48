"""The dashboard's Starlette application and :func:`serve`, which runs it under uvicorn."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..config import Config, connect_address
from ..errors import ConfigError
from . import check_bind, sign_in_token
from .data import Source
from .security import Sessions
from .views import SECURITY_HEADERS, Views

log = logging.getLogger("ppq.dashboard")

STATIC = Path(__file__).resolve().parent / "static"


class _Forward(logging.Handler):
    """Hands uvicorn's log records (its warnings: bad requests, closed connections) to
    ``ppq.dashboard.http``, so that they go out like every ppq line (text or JSON)."""

    def emit(self, record: logging.LogRecord) -> None:
        record.name = "ppq.dashboard.http"
        logging.getLogger(record.name).handle(record)


def _forward_uvicorn_logs() -> None:
    uvicorn_log = logging.getLogger("uvicorn")
    uvicorn_log.handlers = [_Forward()]
    uvicorn_log.setLevel(logging.WARNING)
    uvicorn_log.propagate = False


class _Static(StaticFiles):
    """The stylesheet and the script, with the same headers as the pages."""

    async def get_response(self, path: str, scope: Any) -> Any:
        response = await super().get_response(path, scope)
        response.headers.update({k: v for k, v in SECURITY_HEADERS.items() if k != "Cache-Control"})
        return response


def create_app(config: Config, masters: list[str] | None = None, read_only: bool | None = None,
               source: Source | None = None) -> Starlette:
    """The application: every page and action, reading the masters through ``source`` (made from
    ``config`` and ``masters`` when not given; its sampler runs while the application does)."""
    source = source or Source(config, masters)
    views = Views(source, Sessions(sign_in_token(config)),
                  config.dashboard.read_only if read_only is None else read_only, config.dashboard.host)
    g = views.guard
    routes = [
        Route("/", g(views.overview)),
        Route("/api/overview", g(views.api_overview, api=True)),
        Route("/workers", g(views.workers)),
        Route("/api/workers", g(views.api_workers, api=True)),
        Route("/tasks", g(views.tasks)),
        Route("/tasks/{qi}/{task_id}", g(views.task)),
        Route("/dead", g(views.dead)),
        Route("/dead/{qi}", g(views.dead)),
        Route("/dead/{qi}/act", g(views.dead_action, action=True), methods=["POST"]),
        Route("/schedules", g(views.schedules)),
        Route("/schedules/act", g(views.schedule_action, action=True), methods=["POST"]),
        Route("/limits", g(views.limits)),
        Route("/workflows", g(views.workflows)),
        Route("/signin", g(views.signin, public=True), methods=["GET", "POST"]),
        Route("/signout", g(views.signout, public=True), methods=["POST"]),
        Mount("/static", app=_Static(directory=str(STATIC)), name="static"),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        source.start()
        try:
            yield
        finally:
            source.close()

    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.views = views
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port`` (0: a free port), or ConfigError naming dashboard.port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on sockets whose proto says TCP, and the
    # connections accepted here inherit it. Without it a reply written in two parts (headers,
    # then body) waits on the client's delayed ACK: 40 ms per request on a kept-alive connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as exc:
        sock.close()
        raise ConfigError(f"dashboard.port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def serve(config: Config, masters: list[str] | None = None, read_only: bool | None = None,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Serve the dashboard on ``dashboard.host:dashboard.port`` until SIGINT or SIGTERM.

    A non-loopback host without a token, or a port that cannot be listened on, is a
    ConfigError before anything starts. ``on_ready(url)`` is called once it listens.
    """
    import uvicorn

    class Server(uvicorn.Server):
        """uvicorn's server, stopping on SIGINT and SIGTERM with exit code 0 (uvicorn raises the
        signal again once stopped, which would end the process as killed by it)."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    check_bind(config)
    _forward_uvicorn_logs()
    sock = listen(config.dashboard.host, config.dashboard.port)
    port = sock.getsockname()[1]
    url = f"http://{connect_address(config.dashboard.host, port)}/"
    app = create_app(config, masters, read_only)
    server = Server(uvicorn.Config(app, log_config=None, access_log=False, server_header=False,
                                   h11_max_incomplete_event_size=16 * 1024, timeout_keep_alive=5,
                                   timeout_graceful_shutdown=3, limit_concurrency=200, lifespan="on"))
    log.info("dashboard ready: %s (masters: %s%s)", url, ", ".join(app.state.views.source.masters),
             "; read-only" if app.state.views.read_only else "")
    if on_ready is not None:
        on_ready(url)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
