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

The handshake side lives in :mod:`ppq.rpc.handshake` (a base class of
:class:`Transport`), the serving threads in :mod:`ppq.rpc.pool`.
"""

from __future__ import annotations

import collections
import logging
import os
import selectors
import socket
import ssl
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import Pyro5.core
import Pyro5.errors

from . import wire
from .handshake import (
    MAX_PENDING,
    Handshakes,
    Pending,
    Refusals,
)
from .pool import Pool

if TYPE_CHECKING:
    from .server import Daemon

log = logging.getLogger("ppq.rpc")

class IdleError(Exception):
    """The connection sent nothing for IDLE_PARK seconds: park it."""


class Transport(Handshakes):
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
        self.pool = Pool(threads, "ppq-serve")
        self.refusals = Refusals()
        self._selector = selectors.DefaultSelector()
        self._selector.register(sock, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._pending: collections.OrderedDict[int, Pending] = collections.OrderedDict()
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
                elif isinstance(key.data, Pending):
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
