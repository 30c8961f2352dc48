"""New connections, up to the first request: accept, TLS and Pyro5 handshakes, token check.

Everything here runs in the transport's selector thread and never blocks: each
connection's bytes are read as they arrive into a :class:`Pending`, bounded by
``wire.MAX_HANDSHAKE`` and :data:`HANDSHAKE_TIMEOUT`; a complete handshake is decoded
by the bounded decoders and its token compared before anything else is looked at.
An authenticated connection leaves as a Pyro5 connection object with kernel
timeouts set, for :class:`~ppq.rpc.transport.Transport` to park.
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import socket
import ssl
import struct
import threading
import time
from typing import TYPE_CHECKING, Any

import Pyro5.core
from Pyro5 import serializers as pyro_serializers
from Pyro5 import socketutil

from . import wire

if TYPE_CHECKING:
    from .server import Daemon

log = logging.getLogger("ppq.rpc")

# Seconds a new connection has to finish its TLS and Pyro5 handshakes.
HANDSHAKE_TIMEOUT = 5.0
# Connections that may be in their handshake at once (a few KB each); more wait in the
# kernel's listen backlog until some finish or expire.
MAX_PENDING = 4096
# Seconds an authenticated connection may stay idle before its thread lets go of it.
IDLE_PARK = 1.0
# Seconds a reply may wait for a client that does not read it before the connection is dropped.
SEND_TIMEOUT = 30.0
# Seconds accepting pauses after accept() fails (out of file descriptors...).
ACCEPT_PAUSE = 1.0
# Seconds between two WARNING lines about refused connections from the same address.
REFUSAL_LOG_INTERVAL = 10.0

_DAEMON_OBJECT = Pyro5.core.DAEMON_NAME


class Refusals:
    """Rate-limited WARNING lines about refused connections, one per address per interval."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def log(self, address: str, reason: str) -> None:
        host = address.rsplit(":", 1)[0]
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._last.get(host, (0.0, 0))
            if now - last < REFUSAL_LOG_INTERVAL:
                self._last[host] = (last, suppressed + 1)
                return
            if len(self._last) > 10_000:
                self._last.clear()
            self._last[host] = (now, 0)
        more = f" ({suppressed} more refused since the last line)" if suppressed else ""
        log.warning("refused a connection from %s: %s%s", address, reason, more)


def set_idle_timeouts(sock: socket.socket) -> None:
    """An authenticated connection's reads give up after IDLE_PARK seconds without data, its
    writes after SEND_TIMEOUT seconds without progress: in the kernel (SO_RCVTIMEO,
    SO_SNDTIMEO) for a plain socket, which stays blocking so that a read or write is one
    system call; with Python's timeout for TLS."""
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(IDLE_PARK)
        return
    sock.setblocking(True)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval(IDLE_PARK))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval(SEND_TIMEOUT))


class TLSConnection(socketutil.SocketConnection):
    """A TLS connection: Python's timeout stands for the kernel's, so a reply gets SEND_TIMEOUT,
    not the IDLE_PARK that reads have."""

    def send(self, data: bytes) -> None:
        self.sock.settimeout(SEND_TIMEOUT)
        try:
            super().send(data)
        finally:
            self.sock.settimeout(IDLE_PARK)


def timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))


class Pending:
    """A connection in its handshake: its bytes so far and its deadline."""

    __slots__ = ("sock", "address", "deadline", "buffer", "header", "tls_done")

    def __init__(self, sock: socket.socket, address: str, deadline: float, tls: bool) -> None:
        self.sock = sock
        self.address = address
        self.deadline = deadline
        self.buffer = b""
        self.header: wire.Header | None = None
        self.tls_done = not tls


class Handshakes:
    """The selector thread's side of new connections; :class:`~ppq.rpc.transport.Transport`
    inherits it and owns the state declared here."""

    daemon: Daemon
    sock: socket.socket | None
    ssl_context: ssl.SSLContext | None
    refusals: Refusals
    _selector: selectors.BaseSelector
    _pending: collections.OrderedDict[int, Pending]
    _shutting_down: bool
    _accepting: bool
    _resume_at: float

    def _register_parked(self, conn: Any) -> None:
        raise NotImplementedError

    def _accept(self) -> None:
        while self.sock is not None:
            if len(self._pending) >= MAX_PENDING:
                # Full: leave the rest in the kernel's backlog until handshakes end or expire.
                self._selector.unregister(self.sock)
                self._accepting = False
                log.warning("%d connections are in their handshake; accepting more as they finish", MAX_PENDING)
                return
            try:
                sock, addr = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # Out of file descriptors, say: stop accepting for a moment instead of spinning.
                self._selector.unregister(self.sock)
                self._accepting = False
                self._resume_at = time.monotonic() + ACCEPT_PAUSE
                self.refusals.log("accept", f"accept failed ({exc}); pausing {ACCEPT_PAUSE:g}s")
                return
            address = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
            if self._shutting_down:
                sock.close()
                continue
            sock.setblocking(False)
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
            if self.ssl_context is not None:
                try:
                    sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
                except (OSError, ValueError) as exc:
                    self.refusals.log(address, f"TLS: {exc}")
                    sock.close()
                    continue
            pending = Pending(sock, address, time.monotonic() + HANDSHAKE_TIMEOUT, self.ssl_context is not None)
            self._pending[sock.fileno()] = pending
            self._selector.register(sock, selectors.EVENT_READ, pending)

    def _drop(self, pending: Pending, reason: str = "") -> None:
        self._pending.pop(pending.sock.fileno(), None)
        try:
            self._selector.unregister(pending.sock)
        except (KeyError, ValueError):
            pass
        if reason:
            self.refusals.log(pending.address, reason)
        try:
            pending.sock.close()
        except OSError:
            pass

    def _expire(self) -> None:
        now = time.monotonic()
        while self._pending:
            first = next(iter(self._pending.values()))
            if first.deadline > now:
                return
            self._drop(first, f"no complete handshake within {HANDSHAKE_TIMEOUT:g}s")

    def _advance(self, pending: Pending) -> None:
        """Read what the handshake has sent so far; finish it when complete."""
        sock = pending.sock
        try:
            if not pending.tls_done:
                try:
                    sock.do_handshake()  # type: ignore[attr-defined]
                except ssl.SSLWantReadError:
                    self._selector.modify(sock, selectors.EVENT_READ, pending)
                    return
                except ssl.SSLWantWriteError:
                    self._selector.modify(sock, selectors.EVENT_WRITE, pending)
                    return
                pending.tls_done = True
                self._selector.modify(sock, selectors.EVENT_READ, pending)
            wanted = wire.HEADER.size if pending.header is None else (
                wire.HEADER.size + pending.header.size + pending.header.annotations)
            while len(pending.buffer) < wanted:
                try:
                    chunk = sock.recv(wanted - len(pending.buffer))
                except (ssl.SSLWantReadError, BlockingIOError):
                    return
                if not chunk:
                    self._drop(pending)
                    return
                pending.buffer += chunk
                if pending.header is None and len(pending.buffer) == wire.HEADER.size:
                    header = wire.parse_header(pending.buffer)
                    if header.kind != wire.MSG_CONNECT:
                        raise wire.WireError("the first message is not a handshake")
                    if header.size + header.annotations > wire.MAX_HANDSHAKE:
                        raise wire.WireError(f"a handshake of {header.size + header.annotations} bytes "
                                             f"(at most {wire.MAX_HANDSHAKE})")
                    pending.header = header
                    wanted = wire.HEADER.size + header.size + header.annotations
        except wire.WireError as exc:
            self._drop(pending, str(exc))
            return
        except (OSError, ValueError) as exc:
            self._drop(pending, f"{type(exc).__name__}: {exc}")
            return
        self._finish_handshake(pending)

    def _finish_handshake(self, pending: Pending) -> None:
        header = pending.header
        assert header is not None
        self._pending.pop(pending.sock.fileno(), None)
        self._selector.unregister(pending.sock)
        data = pending.buffer[wire.HEADER.size + header.annotations:]
        serializer = pyro_serializers.serializers_by_id.get(header.serializer_id)
        try:
            if serializer is None:
                raise wire.WireError(f"unknown serializer id {header.serializer_id}")
            request = wire.loads(header.serializer_id, data)
            offered, objid = (request.get("handshake"), request.get("object")) if isinstance(request, dict) else (
                None, None)
            role = self.daemon.role_of(offered)
        except wire.WireError as exc:
            self.refusals.log(pending.address, str(exc))
            pending.sock.close()
            return
        if role is None:
            self.refusals.log(pending.address, "authentication failed")
            self._reply_and_close(pending, header, serializer, "authentication failed")
            return
        try:
            meta = self.daemon.objectsById[_DAEMON_OBJECT].get_metadata(objid)
        except Exception as exc:  # noqa: BLE001 - Pyro5's error for an unknown object
            self._reply_and_close(pending, header, serializer, str(exc))
            return
        reply = wire.message(wire.MSG_CONNECTOK, header.serializer_id, header.seq,
                             serializer.dumps({"handshake": "ok", "meta": meta}))
        try:
            sent = pending.sock.send(reply)
        except (OSError, ssl.SSLError):
            sent = -1
        if sent != len(reply):
            pending.sock.close()
            return
        tls = isinstance(pending.sock, ssl.SSLSocket)
        conn = (TLSConnection if tls else socketutil.SocketConnection)(pending.sock, objid)
        conn.ppq_client = isinstance(offered, dict) and bool(offered.get("ppq"))
        conn.ppq_role = role
        conn.ppq_address = pending.address
        # Tells this connection from a later one that reuses its address and port.
        conn.ppq_session = os.urandom(8).hex()
        try:
            set_idle_timeouts(pending.sock)
        except OSError:
            conn.close()
            return
        self._register_parked(conn)

    def _reply_and_close(self, pending: Pending, header: wire.Header, serializer: Any, reason: str) -> None:
        try:
            pending.sock.send(wire.message(wire.MSG_CONNECTFAIL, header.serializer_id, header.seq,
                                           serializer.dumps(reason)))
        except (OSError, ssl.SSLError):
            pass
        pending.sock.close()
