"""Connections to one Redis: redis-py's client, and the plain link the hot path uses.

:func:`connect` builds the redis-py client every Store method but the scripts uses.
:class:`Link` is a pool of plain sockets that EVALSHA goes over for ``redis://``
URLs; other URLs (``rediss://``, ``unix://``, query options) go through redis-py.
"""

from __future__ import annotations

import functools
import socket
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlparse

import hiredis
import redis
import redis.exceptions
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..errors import StorageError


def connect(url: str, timeout: float) -> redis.Redis:
    """A redis-py client for ``url`` that fails fast: an unreachable Redis is reported
    at once (no retries), the caller decides about retrying."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        socket_keepalive=True,
        retry_on_timeout=False,
        retry=Retry(NoBackoff(), 0),
        max_connections=10000,
    )


class Link:
    """Plain connections to one Redis for the scripts on the hot path.

    A round trip through redis-py's command machinery costs about three times the
    round trip itself; here a command is packed by hiredis, sent on a socket and
    its reply parsed by hiredis. Idle connections wait in a stack shared by all
    threads. Used for ``redis://`` URLs (TCP, no TLS).
    """

    def __init__(self, url: str, timeout: float) -> None:
        parsed = urlparse(url)
        self.address = (parsed.hostname or "127.0.0.1", parsed.port or 6379)
        self.username = unquote(parsed.username) if parsed.username else None
        self.password = unquote(parsed.password) if parsed.password else None
        path = parsed.path.strip("/")
        self.db = int(path) if path.isdigit() else int(parse_qs(parsed.query).get("db", ["0"])[0])
        self.timeout = timeout
        # Shared by every thread without a lock: list.append and list.pop are each atomic
        # in CPython, and a connection is in the list only while no thread uses it.
        self._idle: list[tuple[socket.socket, Any]] = []
        self._closed = False

    @staticmethod
    def usable(url: str) -> bool:
        """Whether ``url`` can go over a Link: ``redis://``, with no query option but ``db``."""
        parsed = urlparse(url)
        return parsed.scheme == "redis" and not parse_qs(parsed.query).keys() - {"db"}

    def _connect(self) -> tuple[socket.socket, Any]:
        sock = socket.create_connection(self.address, self.timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            conn = (sock, hiredis.Reader())
            if self.password is not None:
                auth = ("AUTH", self.username, self.password) if self.username else ("AUTH", self.password)
                self._roundtrip(conn, auth)
            if self.db:
                self._roundtrip(conn, ("SELECT", self.db))
        except BaseException:
            sock.close()
            raise
        return conn

    @staticmethod
    def _roundtrip(conn: tuple[socket.socket, Any], args: Sequence[Any]) -> Any:
        sock, reader = conn
        sock.sendall(hiredis.pack_command(tuple(args)))
        while True:
            reply = reader.gets()
            if reply is not False:
                break
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed by the server")
            reader.feed(data)
        if isinstance(reply, hiredis.ReplyError):
            raise redis.exceptions.ResponseError(str(reply))
        return reply

    def call(self, *args: Any) -> Any:
        conn = None
        try:
            try:
                conn = self._idle.pop()
            except IndexError:
                conn = self._connect()
            reply = self._roundtrip(conn, args)
        except redis.exceptions.ResponseError:
            self._idle.append(conn)  # type: ignore[arg-type]
            raise
        except (OSError, hiredis.ProtocolError) as exc:
            # A reply may be half read: this connection cannot be trusted again.
            if conn is not None:
                conn[0].close()
            raise redis.exceptions.ConnectionError(f"Error connecting to {self.address[0]}:{self.address[1]}: "
                                                   f"{exc}") from None
        if self._closed:
            conn[0].close()
        else:
            self._idle.append(conn)
        return reply

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop()[0].close()


def redact(url: str) -> str:
    """The URL without its password, for messages."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


F = TypeVar("F", bound=Callable[..., Any])


def storage_errors(method: F) -> F:
    """Turn redis-py's errors into StorageError naming the queue_index (and the URL, without
    its password, when Redis cannot be reached)."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            raise StorageError(
                f"queue_index {self.queue_index}: redis at {self.safe_url} is unreachable ({exc})"
            ) from None
        except redis.exceptions.RedisError as exc:
            raise StorageError(f"queue_index {self.queue_index}: redis error: {exc}") from None

    return wrapper  # type: ignore[return-value]
