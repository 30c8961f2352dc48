"""Connections to one Redis: redis-py's client, and the plain link the hot path uses.

:func:`connect` builds the redis-py client every Store method but the scripts uses.
:class:`Link` is a pool of plain sockets that EVALSHA goes over for ``redis://``,
``redis+sentinel://`` and ``redis+cluster://`` URLs; other URLs (``rediss://``,
``unix://``, query options) go through redis-py.

A ``redis+sentinel://`` or ``redis+cluster://`` URL names no server of its own: a
:class:`Locator` finds the primary that serves this queue_index (Sentinel's answer
for the service; the cluster node owning the queue_index's hash slot), and both the
client and the Link connect wherever it says. A connection error, or a reply saying
the server is not that primary (READONLY, MOVED, ...), makes it ask again on the
next connection: a failover or a resharding is followed without a restart.
"""

from __future__ import annotations

import functools
import logging
import select
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlparse

import hiredis
import redis
import redis.exceptions
import redis.sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.retry import Retry

from ..errors import StorageError
from ..targets import RedisTarget

log = logging.getLogger("ppq.store")

# Replies that say a server is no longer where this queue_index's writes go: a primary
# turned replica (READONLY, also inside a script's error), a slot served elsewhere.
MISPLACED = ("READONLY", "MOVED", "ASK", "CLUSTERDOWN", "MASTERDOWN", "TRYAGAIN")


def misplaced(exc: BaseException) -> bool:
    """Whether a Redis error reply says this server is not the primary for our keys, so
    that nothing was written and the primary must be looked up again."""
    message = str(exc)
    return message.startswith(MISPLACED) or "-READONLY " in message or ": READONLY " in message


def _ask(address: tuple[str, int], timeout: float, target: RedisTarget, *command: Any) -> Any:
    """One command to one node over a plain socket, authenticated as ``target`` says."""
    with socket.create_connection(address, timeout) as sock:
        conn = (sock, hiredis.Reader())
        if target.password is not None:
            Link._roundtrip(conn, ("AUTH", target.username, target.password) if target.username
                            else ("AUTH", target.password))
        return Link._roundtrip(conn, command)


class Locator:
    """Where the primary serving one queue_index is: asked of the sentinels (``redis+sentinel://``)
    or of the cluster's nodes (``redis+cluster://``, the node owning ``key``'s hash slot), and
    kept until :meth:`forget` (a connection error, READONLY, MOVED...). When the answer
    changes, the callbacks given to :meth:`on_move` drop the idle connections to the old place.
    """

    def __init__(self, target: RedisTarget, timeout: float, key: str) -> None:
        self.target = target
        self.timeout = timeout
        self.slot = key_slot(key.encode())
        self._address: tuple[str, int] | None = None
        self._last: tuple[str, int] | None = None
        self._lock = threading.Lock()
        self._moved: list[Callable[[], None]] = []
        # The cluster's nodes: those the URL names, then the others as CLUSTER SLOTS lists them.
        self._known = list(target.nodes)
        self._sentinel: redis.sentinel.Sentinel | None = None
        if target.kind == "sentinel":
            self._sentinel = redis.sentinel.Sentinel(
                list(target.nodes), sentinel_kwargs={
                    "password": target.sentinel_password, "socket_timeout": timeout,
                    "socket_connect_timeout": timeout, "retry": Retry(NoBackoff(), 0)})

    def on_move(self, callback: Callable[[], None]) -> None:
        self._moved.append(callback)

    def address(self) -> tuple[str, int]:
        """The primary's (host, port), looked up if it is not known; redis's ConnectionError
        if no sentinel or node can tell."""
        address = self._address
        if address is not None:
            return address
        with self._lock:
            if self._address is None:
                found = self._find()
                if found != self._last:
                    if self._last is not None:
                        log.warning("%s: the primary moved from %s:%s to %s:%s", self.describe(),
                                    *self._last, *found)
                    for callback in self._moved:
                        callback()
                self._address = self._last = found
            return self._address

    def forget(self) -> None:
        """Look the primary up again before the next connection."""
        self._address = None

    def close(self) -> None:
        """Close the connections to the sentinels."""
        if self._sentinel is not None:
            for client in self._sentinel.sentinels:
                client.close()

    def describe(self) -> str:
        if self.target.kind == "sentinel":
            return f"sentinel service {self.target.service!r}"
        return f"cluster slot {self.slot}"

    def _find(self) -> tuple[str, int]:
        if self._sentinel is not None:
            host, port = self._sentinel.discover_master(self.target.service)
            return str(host), int(port)
        errors = []
        for node in list(self._known):
            try:
                ranges = _ask(node, self.timeout, self.target, "CLUSTER", "SLOTS")
            except (OSError, hiredis.ProtocolError, redis.exceptions.RedisError) as exc:
                errors.append(f"{node[0]}:{node[1]}: {exc}")
                continue
            owner = None
            for start, end, primary, *_replicas in ranges:
                address = ((primary[0].decode() or node[0]), int(primary[1]))
                if address not in self._known:
                    self._known.append(address)
                if int(start) <= self.slot <= int(end):
                    owner = address
            if owner is not None:
                return owner
            errors.append(f"{node[0]}:{node[1]}: no node serves slot {self.slot}")
        raise redis.exceptions.ConnectionError(f"no cluster node told where slot {self.slot} is ({'; '.join(errors)})")


class LocatedConnection(redis.Connection):
    """A redis-py connection to wherever its pool's :class:`Locator` says the primary is."""

    def __init__(self, **kwargs: Any) -> None:
        self.locator: Locator = kwargs.pop("locator")
        super().__init__(**kwargs)

    def _connect(self) -> socket.socket:
        self.host, self.port = self.locator.address()
        return super()._connect()

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.exceptions.ResponseError as exc:
            if misplaced(exc):
                self.locator.forget()
                self.disconnect()
            raise
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            self.locator.forget()
            raise


def connect(url: str, timeout: float, locator: Locator | None = None) -> redis.Redis:
    """A redis-py client for ``url`` that fails fast: an unreachable Redis is reported
    at once (no retries), the caller decides about retrying. With a ``locator``, its
    connections go to the primary it finds."""
    if locator is not None:
        target = locator.target
        pool = redis.ConnectionPool(
            connection_class=LocatedConnection, locator=locator, username=target.username,
            password=target.password, db=target.db, socket_timeout=timeout, socket_connect_timeout=timeout,
            socket_keepalive=True, retry=Retry(NoBackoff(), 0), max_connections=10000)
        locator.on_move(lambda: pool.disconnect(inuse_connections=False))
        return redis.Redis(connection_pool=pool)
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

    def __init__(self, url: str, timeout: float, locator: Locator | None = None) -> None:
        self.locator = locator
        if locator is not None:
            target = locator.target
            self.address = ("", 0)
            self.username, self.password, self.db = target.username, target.password, target.db
        else:
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
        if locator is not None:
            locator.on_move(self._drop_idle)

    @staticmethod
    def usable(url: str) -> bool:
        """Whether ``url`` can go over a Link: ``redis://`` with no query option but ``db``,
        ``redis+sentinel://`` or ``redis+cluster://``."""
        if url.startswith(("redis+sentinel://", "redis+cluster://")):
            return True
        parsed = urlparse(url)
        return parsed.scheme == "redis" and not parse_qs(parsed.query).keys() - {"db"}

    def _connect(self) -> tuple[socket.socket, Any]:
        if self.locator is not None:
            self.address = self.locator.address()
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
    def _read(conn: tuple[socket.socket, Any]) -> Any:
        """The next reply on ``conn``: a value, or a hiredis.ReplyError (returned, not raised)."""
        sock, reader = conn
        while True:
            reply = reader.gets()
            if reply is not False:
                return reply
            data = sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed by the server")
            reader.feed(data)

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

    def _take(self) -> Any:
        """An idle connection (one a locator finds stale is replaced), or a new one."""
        try:
            conn = self._idle.pop()
        except IndexError:
            return self._connect()
        if self.locator is not None and self._stale(conn):
            return self._connect()
        return conn

    def call(self, *args: Any) -> Any:
        conn = None
        try:
            conn = self._take()
            reply = self._roundtrip(conn, args)
        except redis.exceptions.ResponseError as exc:
            self._keep(conn, exc)
            raise
        except (OSError, hiredis.ProtocolError) as exc:
            raise self._lost(conn, exc) from None
        if self._closed:
            conn[0].close()
        else:
            self._idle.append(conn)
        return reply

    def call_then(self, first: Sequence[Any], then: Sequence[Any]) -> tuple[Any, Any]:
        """Two commands sent together on one connection (``then`` sees ``first``'s writes, as
        WAIT must); their replies, or ResponseError for ``first``'s error after both are read."""
        conn = None
        try:
            conn = self._take()
            conn[0].sendall(hiredis.pack_command(tuple(first)) + hiredis.pack_command(tuple(then)))
            reply, after = self._read(conn), self._read(conn)
        except (OSError, hiredis.ProtocolError) as exc:
            raise self._lost(conn, exc) from None
        if isinstance(reply, hiredis.ReplyError) or isinstance(after, hiredis.ReplyError):
            error = redis.exceptions.ResponseError(str(reply if isinstance(reply, hiredis.ReplyError) else after))
            self._keep(conn, error)
            raise error
        if self._closed:
            conn[0].close()
        else:
            self._idle.append(conn)
        return reply, after

    @staticmethod
    def _stale(conn: tuple[socket.socket, Any]) -> bool:
        """Whether an idle connection was closed by the server (a demoted primary closes its
        clients' connections), or has something unasked to read: then it is closed here. Checked
        only behind Sentinel or in a cluster, where a command sent on such a connection would
        fail although a fresh connection would find the new primary."""
        poller = select.poll()
        poller.register(conn[0], select.POLLIN)
        if not poller.poll(0):
            return False  # nothing to read: open and quiet
        conn[0].close()
        return True

    def _keep(self, conn: tuple[socket.socket, Any] | None, error: redis.exceptions.ResponseError) -> None:
        """After an error reply: keep the connection, unless the reply says the server is no
        longer the primary (then close it and look the primary up again)."""
        if conn is None:
            return
        if self.locator is not None and misplaced(error):
            self.locator.forget()
            conn[0].close()
        else:
            self._idle.append(conn)

    def _lost(self, conn: tuple[socket.socket, Any] | None, exc: Exception) -> redis.exceptions.ConnectionError:
        # A reply may be half read: this connection cannot be trusted again.
        if conn is not None:
            conn[0].close()
        if self.locator is not None:
            self.locator.forget()
        return redis.exceptions.ConnectionError(f"Error connecting to {self.address[0]}:{self.address[1]}: {exc}")

    def _drop_idle(self) -> None:
        while self._idle:
            try:
                self._idle.pop()[0].close()
            except IndexError:
                break

    def close(self) -> None:
        self._closed = True
        self._drop_idle()


def redact(url: str) -> str:
    """The URL without its passwords, for messages."""
    if "sentinel_password=" in url:
        url = url.split("?", 1)[0] + "?sentinel_password=***"
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


F = TypeVar("F", bound=Callable[..., Any])


def storage_errors(method: F) -> F:
    """Turn redis-py's errors into StorageError naming the queue_index (and the URL, without
    its password, when Redis cannot be reached).

    Behind Sentinel or in a cluster (``self._locator``), an error says where the primary is
    not: the primary is looked up again for the next call, and a call refused because the
    server is not the primary (READONLY, MOVED: nothing was written) is made once more.
    """

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return method(self, *args, **kwargs)
            except redis.exceptions.ResponseError as exc:
                if self._locator is None or not misplaced(exc):
                    raise
                self._locator.forget()
                log.info("queue_index %s: %s; asking where the primary is", self.queue_index, exc)
                return method(self, *args, **kwargs)
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            if self._locator is not None:
                self._locator.forget()
            raise StorageError(
                f"queue_index {self.queue_index}: redis at {self.safe_url} is unreachable ({exc})"
            ) from None
        except redis.exceptions.RedisError as exc:
            raise StorageError(f"queue_index {self.queue_index}: redis error: {exc}") from None

    return wrapper  # type: ignore[return-value]
