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
- A request whose method holds its reply (:func:`~ppq.rpc.server.hold_reply`: a
  worker's long-poll that found nothing) costs no thread either: its connection is
  not read from meanwhile (a Pyro5 client sends one request at a time), only watched
  by the selector for the client going away. Whoever ends the wait sends the reply
  through its :class:`HeldReply`, from any thread, and the connection goes back to the
  selector (or to the pool when the client will likely call again at once).

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
import threading
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


class Held(Exception):  # noqa: N818 - not an error: the request's reply was held
    """The request's reply is held (:class:`HeldReply`): the connection belongs to it now."""


class HeldReply:
    """The reply of one request, sent later from any thread: exactly once, whatever races.

    ``send`` writes it without blocking when the socket takes it at once (the usual case:
    a reply is small), else a pool thread finishes the write. ``abandon`` is what the
    selector calls when the client goes away meanwhile: nothing is sent, the connection is
    closed and ``on_abandon`` (set by the holder) is called once.
    """

    __slots__ = ("transport", "conn", "seq", "serializer_id", "client_is_ppq", "on_abandon", "_lock", "done")

    def __init__(self, transport: Transport, conn: Any, seq: int, serializer_id: int) -> None:
        self.transport = transport
        self.conn = conn
        self.seq = seq
        self.serializer_id = serializer_id
        self.client_is_ppq = bool(getattr(conn, "ppq_client", False))
        self.on_abandon: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self.done = False

    @property
    def conn_id(self) -> str:
        """An id of the connection, unique for the life of the process."""
        return str(getattr(self.conn, "ppq_session", "") or id(self.conn))

    def claim(self) -> bool:
        """True once: the caller, and nobody else, replies (or drops the connection)."""
        with self._lock:
            if self.done:
                return False
            self.done = True
            return True

    def send(self, value: Any, again_soon: bool = False) -> bool:
        """Reply ``value`` (encoded as the direct path encodes a method's result); False if a
        reply was already sent or the client went away. ``again_soon``: the client will likely
        send its next request at once (it got tasks), so a pool thread waits for it."""
        if not self.claim():
            return False
        try:
            body = self.transport.daemon.encode_reply(self.serializer_id, value)
        except Exception as exc:  # noqa: BLE001 - a reply that cannot be encoded is answered with the error
            log.exception("cannot encode a held reply")
            self._send_error(exc)
            return True
        self._write(wire.message(wire.MSG_RESULT, self.serializer_id, self.seq, body),
                    "serve" if again_soon else "park")
        return True

    def fail(self, exc: Exception) -> bool:
        """Reply with an error, as the direct path answers a method that raised it."""
        if not self.claim():
            return False
        self._send_error(exc)
        return True

    def submit(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` in a pool thread of the connection's server."""
        self.transport.pool.submit(fn, *args)

    def abandon(self) -> bool:
        """The client went away: nothing will be sent; True if no reply had been."""
        if not self.claim():
            return False
        callback = self.on_abandon
        if callback is not None:
            try:
                callback()
            except Exception:  # noqa: BLE001 - the connection is closed anyway
                log.exception("a held reply's abandon callback failed")
        return True

    def _send_error(self, exc: Exception) -> None:
        def job() -> None:
            try:
                self.transport.daemon._sendExceptionResponse(self.conn, self.seq, self.serializer_id, exc, None)
            except Exception:  # noqa: BLE001 - errors while replying close the connection
                self.transport.command("close", self.conn)
                return
            self.transport.command("park", self.conn)

        self.submit(job)

    def _write(self, data: bytes, then: str) -> None:
        sock = self.conn.sock
        sent = 0
        if not isinstance(sock, ssl.SSLSocket):
            try:
                sent = sock.send(data, socket.MSG_DONTWAIT)
            except BlockingIOError:
                sent = 0
            except OSError:
                self.transport.command("close", self.conn)
                return
            if sent == len(data):
                self.transport.command(then, self.conn)
                return

        def job() -> None:
            try:
                self.conn.send(data[sent:])
            except Exception:  # noqa: BLE001 - errors while replying close the connection
                self.transport.command("close", self.conn)
                return
            self.transport.command(then, self.conn)

        self.submit(job)


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
        # What the selector thread does next with connections handed to it by other threads:
        # (action, connection or HeldReply); see _run_commands.
        self._commands: collections.deque[tuple[str, Any]] = collections.deque()
        self._parked: dict[int, Any] = {}
        self._wake_pending = False
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
        self._wake_pending = True
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
                elif isinstance(key.data, HeldReply):
                    self._held_readable(key.data)
                elif isinstance(key.data, Pending):
                    try:
                        self._advance(key.data)
                    except Exception:  # noqa: BLE001 - one bad connection must not stop the server
                        log.exception("handshake with %s failed", key.data.address)
                        self._drop(key.data)
                else:
                    self._unpark(key.data)
            self._run_commands()
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
        try:
            held = [key.data for key in self._selector.get_map().values() if isinstance(key.data, HeldReply)]
        except (RuntimeError, ValueError):
            held = []
        while self._commands:
            action, item = self._commands.popleft()
            if action == "watch":
                held.append(item)
            else:
                self._close_conn(item)
        for reply in held:
            if reply.abandon():
                self._close_conn(reply.conn)
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

    def command(self, action: str, item: Any) -> None:
        """Have the selector thread (the only one that changes the selector) do ``action``:
        "park" a connection (wait in the selector for its next request), "serve" it (a
        pool thread reads its next request), "close" it, or "watch" a HeldReply's
        connection for the client going away."""
        self._commands.append((action, item))
        # One wake-up is enough for the commands queued until the selector thread runs them
        # (it clears the flag before it takes them).
        if not self._wake_pending:
            self.wakeup()

    def _run_commands(self) -> None:
        self._wake_pending = False
        while self._commands:
            action, item = self._commands.popleft()
            if action == "watch":
                # A reply sent already (then a park/serve/close command follows) needs no watching.
                if not item.done and not self._shutting_down:
                    self._forget(item.conn)
                    try:
                        self._selector.register(item.conn.sock, selectors.EVENT_READ, item)
                    except (KeyError, ValueError, OSError):
                        if item.abandon():
                            self._close_conn(item.conn)
                continue
            if action == "park" and not self._shutting_down:
                try:
                    fd = item.sock.fileno()
                    watched = self._selector.get_map().get(fd) is not None
                    if watched:
                        # Still watched for its held reply: the same registration now waits for a request.
                        self._selector.modify(fd, selectors.EVENT_READ, item)
                        self._parked[fd] = item
                except (KeyError, ValueError, OSError):
                    watched = False
                if not watched:
                    self._register_parked(item)
                continue
            self._forget(item)
            if self._shutting_down or action == "close":
                self._close_conn(item)
            elif action == "serve":
                self.pool.submit(self._serve, item)
            else:
                self._register_parked(item)

    def _forget(self, conn: Any) -> None:
        """Take ``conn``'s socket out of the selector if it is there (a held reply's watch)."""
        try:
            # By descriptor: a miss costs no KeyError naming the socket (its repr asks the kernel).
            key = self._selector.get_map().get(conn.sock.fileno())
        except (KeyError, ValueError, OSError):
            return
        if key is None or (key.data is not conn and not isinstance(key.data, HeldReply)):
            return
        try:
            self._selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _held_readable(self, reply: HeldReply) -> None:
        """A connection whose reply is held became readable: the client closed it (abandon the
        reply, close the connection), or it sent early (stop watching; read after the reply)."""
        if reply.done:
            return  # a command about it is queued
        try:
            data = socket.socket.recv(reply.conn.sock, 1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._forget(reply.conn)
        if not data and reply.abandon():
            self._close_conn(reply.conn)

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
                self.command("park", conn)
                return
            except Held as held:
                # The reply is held: the connection belongs to it now; watch it for the client leaving.
                self.command("watch", held.args[0])
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
