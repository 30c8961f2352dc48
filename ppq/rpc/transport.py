"""How ppq's daemons take connections: handshakes without blocking, idle connections without threads.

Pyro5's own thread-pool server gives every connection a thread for life, reads a
handshake of any declared size (decompressed, deserialized, walked) before the
token is checked, and does a TLS handshake inside ``accept()``. :class:`Transport`
stands in its place:

- One *selector* thread (the one that runs ``requestLoop``) accepts connections,
  runs their TLS handshake and reads their Pyro5 handshake without blocking: at
  most ``wire.MAX_HANDSHAKE`` bytes, within :data:`HANDSHAKE_TIMEOUT` seconds of the
  accept, at most :data:`MAX_PENDING` of them at once (more wait in the listen backlog),
  decoded by bounded decoders,
  the token compared before anything else is looked at. A connection that breaks a
  rule is closed and logged (WARNING, with the peer address, rate-limited).
- An authenticated connection waits in the selector without a thread. When it sends
  a request, a pool thread serves it, and goes on serving it while requests keep
  coming; after :data:`IDLE_PARK` seconds without one it goes back to the selector.
  So idle connections cost no thread, and a full pool delays requests instead of
  refusing connections or blocking ``accept``.
"""

from __future__ import annotations

import collections
import logging
import os
import queue
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import Pyro5.core
import Pyro5.errors
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
# Pool threads kept even when idle; others end after IDLE_THREAD seconds without work.
MIN_THREADS = 8
IDLE_THREAD = 60.0
# Seconds between two WARNING lines about refused connections from the same address.
REFUSAL_LOG_INTERVAL = 10.0

_DAEMON_OBJECT = Pyro5.core.DAEMON_NAME


class IdleError(Exception):
    """The connection sent nothing for IDLE_PARK seconds: park it."""


class _Refusals:
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


class _Pool:
    """Threads that serve connections; grows up to ``size`` while work waits, shrinks when idle."""

    def __init__(self, size: int, name: str) -> None:
        self.size = max(size, MIN_THREADS)
        self.name = name
        self._jobs: queue.SimpleQueue[tuple[Callable[..., None], tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._queued = 0
        self._closed = False

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        with self._lock:
            self._queued += 1
            grow = self._queued > self._idle and self._threads < self.size and not self._closed
            if grow:
                self._threads += 1
        self._jobs.put((fn, args))
        if grow:
            try:
                threading.Thread(target=self._run, name=f"{self.name}-{self._threads}", daemon=True).start()
            except RuntimeError as exc:  # out of threads or memory: the queued work waits for a free thread
                with self._lock:
                    self._threads -= 1
                log.warning("cannot start a server thread (%s); %d serving", exc, self._threads)

    def _run(self) -> None:
        while True:
            with self._lock:
                self._idle += 1
            try:
                job = self._jobs.get(timeout=IDLE_THREAD)
            except queue.Empty:
                with self._lock:
                    self._idle -= 1
                    if self._threads > MIN_THREADS or self._closed:
                        self._threads -= 1
                        return
                continue
            with self._lock:
                self._idle -= 1
                self._queued -= 1
            if job is None:
                with self._lock:
                    self._threads -= 1
                return
            fn, args = job
            try:
                fn(*args)
            except Exception:  # noqa: BLE001 - a job's failure must not end the thread
                log.exception("server thread: unexpected error")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            count = self._threads
        for _ in range(count):
            self._jobs.put(None)


def _set_idle_timeouts(sock: socket.socket) -> None:
    """An authenticated connection's reads give up after IDLE_PARK seconds without data, its
    writes after SEND_TIMEOUT seconds without progress: in the kernel (SO_RCVTIMEO,
    SO_SNDTIMEO) for a plain socket, which stays blocking so that a read or write is one
    system call; with Python's timeout for TLS."""
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(IDLE_PARK)
        return
    sock.setblocking(True)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(IDLE_PARK))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(SEND_TIMEOUT))


class _TLSConnection(socketutil.SocketConnection):
    """A TLS connection: Python's timeout stands for the kernel's, so a reply gets SEND_TIMEOUT,
    not the IDLE_PARK that reads have."""

    def send(self, data: bytes) -> None:
        self.sock.settimeout(SEND_TIMEOUT)
        try:
            super().send(data)
        finally:
            self.sock.settimeout(IDLE_PARK)


def _timeval(seconds: float) -> bytes:
    return struct.pack("ll", int(seconds), int((seconds % 1) * 1_000_000))


class _Pending:
    """A connection in its handshake: its bytes so far and its deadline."""

    __slots__ = ("sock", "address", "deadline", "buffer", "header", "tls_done")

    def __init__(self, sock: socket.socket, address: str, deadline: float, tls: bool) -> None:
        self.sock = sock
        self.address = address
        self.deadline = deadline
        self.buffer = b""
        self.header: wire.Header | None = None
        self.tls_done = not tls


class Transport:
    """Accepts, authenticates and dispatches connections for a :class:`Daemon` (see the module docstring).

    It stands where Pyro5's daemon expects its transport server: ``loop``, ``shutdown``,
    ``close``, ``sock``, ``sockets``, ``locationStr``.
    """

    def __init__(self, daemon: Daemon, host: str, port: int, threads: int,
                 ssl_context: ssl.SSLContext | None) -> None:
        self.daemon = daemon
        self.ssl_context = ssl_context
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
            sock.listen(4096)
        except OSError:
            sock.close()
            raise
        sock.setblocking(False)
        os.set_inheritable(sock.fileno(), False)
        self.sock: socket.socket | None = sock
        bound = sock.getsockname()
        shown = host or bound[0]
        self.locationStr = f"[{shown}]:{bound[1]}" if ":" in shown else f"{shown}:{bound[1]}"
        self.pool = _Pool(threads, "ppq-serve")
        self.refusals = _Refusals()
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending: collections.OrderedDict[int, _Pending] = collections.OrderedDict()
        self._to_park: collections.deque[Any] = collections.deque()
        self._parked: dict[int, Any] = {}
        self._shutting_down = False
        self._accepting = True
        self._resume_at = 0.0

    # -- the interface Pyro5's daemon uses --

    @property
    def sockets(self) -> list[socket.socket]:
        return [self.sock] if self.sock is not None else []

    @property
    def selector(self) -> Any:
        raise TypeError("ppq's server has no selector to combine")

    def combine_loop(self, server: Any) -> None:
        raise TypeError("ppq's server cannot be combined with another")

    def events(self, eventsockets: Any) -> None:
        raise TypeError("ppq's server runs its own loop")

    def wakeup(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def loop(self, loopCondition: Callable[[], bool] = lambda: True) -> None:  # noqa: N803 - Pyro5's name
        while self.sock is not None and not self._shutting_down and loopCondition():
            timeout = 1.0 if self._accepting else min(1.0, max(0.01, self._resume_at - time.monotonic()))
            if self._pending:
                first = next(iter(self._pending.values()))
                timeout = max(0.0, min(timeout, first.deadline - time.monotonic()))
            try:
                events = self._selector.select(timeout)
            except OSError:
                if self._shutting_down:
                    break
                raise
            for key, _mask in events:
                if key.fileobj is self.sock:
                    self._accept()
                elif key.fileobj == self._wake_r:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                elif isinstance(key.data, _Pending):
                    try:
                        self._advance(key.data)
                    except Exception:  # noqa: BLE001 - one bad connection must not stop the server
                        log.exception("handshake with %s failed", key.data.address)
                        self._drop(key.data)
                else:
                    self._unpark(key.data)
            self._park_waiting()
            self._expire()
            if (not self._accepting and len(self._pending) < MAX_PENDING and self.sock is not None
                    and time.monotonic() >= self._resume_at):
                self._selector.register(self.sock, selectors.EVENT_READ, None)
                self._accepting = True

    def shutdown(self) -> None:
        self._shutting_down = True
        self.wakeup()

    def close(self) -> None:
        self._shutting_down = True
        sock, self.sock = self.sock, None
        if sock is not None:
            try:
                self._selector.unregister(sock)
            except (KeyError, ValueError):
                pass
            sock.close()
        for pending in list(self._pending.values()):
            self._drop(pending)
        for conn in list(self._parked.values()):
            self._close_conn(conn)
        self._parked.clear()
        self.pool.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            self._selector.close()
        except (OSError, ValueError):
            pass

    # -- new connections: TLS and Pyro5 handshakes, without blocking --

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
            pending = _Pending(sock, address, time.monotonic() + HANDSHAKE_TIMEOUT, self.ssl_context is not None)
            self._pending[sock.fileno()] = pending
            self._selector.register(sock, selectors.EVENT_READ, pending)

    def _drop(self, pending: _Pending, reason: str = "") -> None:
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

    def _advance(self, pending: _Pending) -> None:
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

    def _finish_handshake(self, pending: _Pending) -> None:
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
        conn = (_TLSConnection if tls else socketutil.SocketConnection)(pending.sock, objid)
        conn.ppq_client = isinstance(offered, dict) and bool(offered.get("ppq"))
        conn.ppq_role = role
        conn.ppq_address = pending.address
        # Tells this connection from a later one that reuses its address and port.
        conn.ppq_session = os.urandom(8).hex()
        try:
            _set_idle_timeouts(pending.sock)
        except OSError:
            conn.close()
            return
        self._register_parked(conn)

    def _reply_and_close(self, pending: _Pending, header: wire.Header, serializer: Any, reason: str) -> None:
        try:
            pending.sock.send(wire.message(wire.MSG_CONNECTFAIL, header.serializer_id, header.seq,
                                           serializer.dumps(reason)))
        except (OSError, ssl.SSLError):
            pass
        pending.sock.close()

    # -- authenticated connections: parked in the selector, served by the pool --

    def _register_parked(self, conn: Any) -> None:
        try:
            self._selector.register(conn.sock, selectors.EVENT_READ, conn)
            self._parked[conn.sock.fileno()] = conn
        except (KeyError, ValueError, OSError):
            self._close_conn(conn)

    def _park_waiting(self) -> None:
        while self._to_park:
            conn = self._to_park.popleft()
            if self._shutting_down:
                self._close_conn(conn)
            else:
                self._register_parked(conn)

    def _unpark(self, conn: Any) -> None:
        self._parked.pop(conn.sock.fileno(), None)
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        self.pool.submit(self._serve, conn)

    def _serve(self, conn: Any) -> None:
        """Serve requests on ``conn`` until it idles (back to the selector) or ends."""
        daemon = self.daemon
        while not self._shutting_down:
            try:
                daemon.handleRequest(conn)
            except IdleError:
                sock = conn.sock
                if isinstance(sock, ssl.SSLSocket) and sock.pending():
                    continue
                self._to_park.append(conn)
                self.wakeup()
                return
            except wire.WireError as exc:
                self.refusals.log(getattr(conn, "ppq_address", "?"), str(exc))
                break
            except (OSError, Pyro5.errors.ConnectionClosedError, Pyro5.errors.SecurityError,
                    Pyro5.errors.TimeoutError, Pyro5.errors.ProtocolError):
                break
            except Exception as exc:  # noqa: BLE001 - malformed input Pyro5's handler choked on: drop it
                self.refusals.log(getattr(conn, "ppq_address", "?"), f"{type(exc).__name__}: {exc}"[:200])
                break
        self._close_conn(conn)

    def _close_conn(self, conn: Any) -> None:
        try:
            self.daemon._clientDisconnect(conn)
        except Exception:  # noqa: BLE001
            pass
        conn.close()
