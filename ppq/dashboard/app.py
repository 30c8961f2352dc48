"""The dashboard's Starlette application and :func:`serve`, which runs it under uvicorn."""

from __future__ import annotations

import asyncio
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
# Seconds a client has to send a whole request (headers and body), from its connection or from the
# end of the reply before: a client that trickles bytes holds a connection no longer than that.
REQUEST_READ_TIMEOUT = 10.0


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


def _protocol() -> type:
    """uvicorn's h11 protocol, with REQUEST_READ_TIMEOUT: uvicorn's own keep-alive timeout is reset
    by every byte received, so a slow client could hold a connection (and one of
    ``limit_concurrency``'s places) for ever."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(REQUEST_READ_TIMEOUT, self._too_slow)

        def _too_slow(self) -> None:
            self._deadline = None
            # IDLE: no request yet; SEND_BODY: its body still coming. DONE: the reply is being made.
            if not self.transport.is_closing() and self.conn.their_state in (h11.IDLE, h11.SEND_BODY):
                log.debug("dashboard: closing a connection that sent no whole request in %ss",
                          REQUEST_READ_TIMEOUT)
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None
            super().connection_lost(exc)

    return Protocol


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
    server = Server(uvicorn.Config(app, http=_protocol(), log_config=None, access_log=False, server_header=False,
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
