"""ppq's Pyro5 daemon: the server of masters and of workers' control objects.

Connections come through :class:`~ppq.rpc.transport.Transport` (handshakes and
idle connections are handled there). Every request is read here with the size
limit of its serializer (``limits.max_message`` for msgpack and marshal, less for
text), never decompressed, and decoded only by the bounded decoders of
:mod:`ppq.rpc.wire`. Requests of ppq's own clients (msgpack, no flags or
annotations) take a direct path that reads and writes Pyro5's message without
Pyro5's per-call machinery; everything else is checked here, then served by
Pyro5's own handler.
"""

from __future__ import annotations

import hmac
import logging
import marshal
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import Pyro5.callcontext
import Pyro5.core
import Pyro5.errors
import Pyro5.server
from Pyro5 import serializers as pyro_serializers

from ..errors import InvalidTaskError
from . import wire
from .roles import ALL
from .transport import Held, HeldReply, IdleError, Transport

log = logging.getLogger("ppq.rpc")

# Seconds a request may take to arrive once its first bytes have, plus one per MIN_RATE bytes.
STALL_TIMEOUT = 10.0
MIN_RATE = 256 * 1024
# Largest serpent or json request, in bytes: text parses into far more memory than binary.
MAX_TEXT_MESSAGE = 1024 * 1024

_DAEMON_OBJECT = Pyro5.core.DAEMON_NAME


class _HeldMark:
    """What a method returns after :func:`hold_reply`: its reply is sent later."""

    def __repr__(self) -> str:
        return "HELD"


HELD: Any = _HeldMark()


def hold_reply() -> HeldReply | None:
    """Hold the current call's reply: the method then returns :data:`HELD`, its thread goes
    back to the pool, and the reply is sent later through the returned HeldReply (from
    any thread). None when this call's reply cannot be held (not a direct-path call with a
    reply, or outside a call): the method answers as usual."""
    ctx = Pyro5.callcontext.current_context
    hold = getattr(ctx, "ppq_hold", None)
    if hold is None:
        return None
    daemon, conn, header = hold
    reply = HeldReply(daemon.transportServer, conn, header.seq, header.serializer_id)
    ctx.ppq_held = reply
    return reply
# Request flags ppq reads: oneway, and a correlation id (in the header, ignored).
_ACCEPTED_FLAGS = wire.FLAGS_ONEWAY | wire.FLAGS_CORR_ID


class Daemon(Pyro5.server.Daemon):
    """A Pyro5 daemon served by :class:`Transport`, with ppq's tokens and roles.

    ``tokens`` maps a token to the role it grants (see :mod:`ppq.rpc.roles`); with no
    tokens every connection has every role. ``max_message`` is the largest request read.
    """

    def __init__(self, host: str, port: int, tokens: Mapping[str, str] | None = None, threads: int = 4000,
                 max_message: int = 16 * 1024 * 1024, ssl_context: ssl.SSLContext | None = None) -> None:
        # Pyro5's Daemon.__init__ would start Pyro5's own transport server: set up its state here instead.
        self._Daemon__mustshutdown = threading.Event()
        self._Daemon__loopstopped = threading.Event()
        self._Daemon__loopstopped.set()
        self._tokens = [(token.encode("utf-8"), role) for token, role in (tokens or {}).items() if token]
        self.max_message = max_message
        self.transportServer = Transport(self, host, port, threads, ssl_context)
        self.locationStr = self.transportServer.locationStr
        self.natLocationStr = None
        interface = Pyro5.server.DaemonObject(self)
        interface._pyroId = _DAEMON_OBJECT
        self.objectsById = {_DAEMON_OBJECT: interface}
        self._pyroInstances: dict[Any, Any] = {}
        self.streaming_responses: dict[Any, Any] = {}
        self.housekeeper_lock = threading.Lock()
        self._disconnect_lock = threading.Lock()
        self.create_single_instance_lock = threading.Lock()
        self.methodcall_error_handler = Pyro5.server._default_methodcall_error_handler
        _bytes_for_json()
        # (object id, method name) -> (object, its bound method), for calls on the direct path.
        self._direct: dict[tuple[str, str], tuple[Any, Callable[..., Any]]] = {}

    def role_of(self, offered: Any) -> str | None:
        """The role a handshake's token grants, or None (refused). Constant-time compares."""
        if not self._tokens:
            return ALL
        token = offered.get("token") if isinstance(offered, dict) else offered
        if not isinstance(token, str) or len(token) > 1024:
            return None
        given = token.encode("utf-8", "replace")
        granted = None
        for expected, role in self._tokens:
            if hmac.compare_digest(given, expected) and granted is None:
                granted = role
        return granted

    def validateHandshake(self, conn: Any, data: Any) -> Any:  # noqa: N802 - Pyro5's name
        raise Pyro5.errors.SecurityError("handshakes are handled by ppq's transport")

    # -- requests --

    def _read(self, conn: Any, size: int) -> bytes:
        """Read ``size`` bytes of a request that has begun. It must arrive within STALL_TIMEOUT
        seconds plus one second per MIN_RATE bytes: a sender that trickles is dropped."""
        chunk = _recv(conn, min(size, 1 << 20))
        if chunk is not None and len(chunk) == size:
            return chunk  # the usual case: the whole request was there
        chunks = [chunk] if chunk else []
        if chunk == b"":
            raise Pyro5.errors.ConnectionClosedError("connection closed mid-request")
        left = size - len(chunk or b"")
        deadline = time.monotonic() + STALL_TIMEOUT + size / MIN_RATE
        while left:
            chunk = _recv(conn, min(left, 1 << 20))
            if chunk is None:
                if time.monotonic() > deadline:
                    raise Pyro5.errors.TimeoutError("request stalled")
                continue
            if not chunk:
                raise Pyro5.errors.ConnectionClosedError("connection closed mid-request")
            chunks.append(chunk)
            left -= len(chunk)
            if left and time.monotonic() > deadline:
                raise Pyro5.errors.TimeoutError("request trickled in too slowly")
        return b"".join(chunks)

    def handleRequest(self, conn: Any) -> None:  # noqa: N802 - Pyro5's name
        """Serve one request (see the module docstring); raise IdleError when none comes."""
        head = _recv(conn, wire.HEADER.size)
        if head is None:
            raise IdleError
        if not head:
            raise Pyro5.errors.ConnectionClosedError("closed")
        if len(head) < wire.HEADER.size:
            head += self._read(conn, wire.HEADER.size - len(head))
        header = wire.parse_header(head)
        if header.kind not in (wire.MSG_INVOKE, wire.MSG_PING):
            raise wire.WireError(f"unexpected message type {header.kind}")
        if header.serializer_id not in wire.SERIALIZER_NAMES:
            raise wire.WireError(f"unknown serializer id {header.serializer_id}")
        limit = self.max_message if header.serializer_id in (wire.MSGPACK, wire.MARSHAL) else min(
            self.max_message, MAX_TEXT_MESSAGE)
        total = header.size + header.annotations
        if total > limit:
            self._refuse(conn, header, f"a request of {total} bytes is larger than the limit of {limit} bytes "
                                       f"(limits.max_message)")
            raise wire.WireError(f"a request of {total} bytes (limit {limit})")
        body = self._read(conn, total) if total else b""
        if header.kind == wire.MSG_INVOKE:
            if header.flags & ~_ACCEPTED_FLAGS:
                # Batches (one request, many calls), kept-serialized blobs and streams are Pyro5
                # features ppq does not use; each would need limits of its own.
                self._refuse(conn, header, "batched calls and flags other than oneway are not accepted")
                return
            if header.annotations:
                try:
                    wire.check_annotations(body[:header.annotations])
                except wire.WireError as exc:
                    self._refuse(conn, header, str(exc))
                    return
            oneway = bool(header.flags & wire.FLAGS_ONEWAY)
            try:
                if (header.serializer_id in (wire.MSGPACK, wire.MARSHAL) and not header.annotations
                        and b"__class__" not in body and self._direct_request(conn, header, body, reply=not oneway)):
                    return
            except wire.WireError as exc:
                self._refuse(conn, header, str(exc))
                return
            problem = self._check_request(header, body[header.annotations:])
            if problem:
                self._refuse(conn, header, problem)
                return
            if oneway:
                # Pyro5 would start a thread per oneway call: run it here, in this connection's turn.
                self._oneway(conn, header, body[header.annotations:])
                return
        super().handleRequest(_Replay(conn, head + body))

    def _oneway(self, conn: Any, header: wire.Header, body: bytes) -> None:
        """A oneway call that is not on the direct path: run now, no reply, errors logged."""
        try:
            objid, method, vargs, kwargs = wire.loads(header.serializer_id, body)
            target = self._direct_target(objid, method) if isinstance(method, str) else None
            if target is None or not isinstance(vargs, (list, tuple)) or not isinstance(kwargs, dict):
                return
            self._set_context(conn, header)
            target(*vargs, **kwargs)
        except Exception as exc:  # noqa: BLE001 - nobody waits for a oneway call's outcome
            log.debug("oneway call from %s failed: %s", conn.__dict__.get("ppq_address"), exc)

    def _check_request(self, header: wire.Header, data: bytes) -> str:
        """Why a request for Pyro5's handler is refused ('' if it is not): bounded decoding,
        and no dicts with a "__class__" key (Pyro5 would make objects of them)."""
        try:
            if header.serializer_id == wire.MARSHAL:
                wire.check_marshal(data)
            elif header.serializer_id == wire.MSGPACK and len(data) > wire.SMALL:
                wire.unpack(data)
            elif header.serializer_id in (wire.SERPENT, wire.JSON):
                wire.check_text(header.serializer_id, data)
            # Text can spell the key with escapes ("\\u005f_class__"): text is always looked through.
            if b"__class__" in data or header.serializer_id in (wire.SERPENT, wire.JSON):
                found = wire.find_class_dict(wire.loads(header.serializer_id, data))
                if found is not None:
                    return (f"arguments must be plain data; a dict with a '__class__' key "
                            f"({found!r}) is not accepted")
        except wire.WireError as exc:
            return str(exc)
        return ""

    def _sendExceptionResponse(self, connection: Any, seq: int, serializer_id: int, exc_value: Any,  # noqa: N802
                               tbinfo: Any, flags: int = 0, annotations: Any = None) -> None:
        """Pyro5's error reply, without the server's traceback (paths and source lines stay here)."""
        super()._sendExceptionResponse(connection, seq, serializer_id, exc_value, [], flags, annotations)

    def _refuse(self, conn: Any, header: wire.Header, reason: str) -> None:
        """Answer a request with InvalidTaskError: as itself to ppq's clients, as a ValueError
        naming it to plain Pyro5 clients (which cannot read ppq's classes)."""
        serializer_id = header.serializer_id if header.serializer_id in wire.SERIALIZER_NAMES else wire.MSGPACK
        error: Exception = (InvalidTaskError(reason) if getattr(conn, "ppq_client", False)
                            else ValueError(f"InvalidTaskError: {reason}"))
        try:
            self._sendExceptionResponse(conn, header.seq, serializer_id, error, None)
        except Exception:  # noqa: BLE001 - the connection is closed next anyway
            pass

    def _set_context(self, conn: Any, header: wire.Header) -> None:
        ctx = Pyro5.callcontext.current_context
        ctx.client = conn
        ctx.client_sock_addr = conn.__dict__.get("ppq_address")
        ctx.seq = header.seq
        ctx.annotations = {}
        ctx.msg_flags = header.flags
        ctx.serializer_id = header.serializer_id
        ctx.correlation_id = None
        ctx.response_annotations = {}

    def _direct_request(self, conn: Any, header: wire.Header, data: bytes, reply: bool = True) -> bool:
        """Serve a plain msgpack or marshal call to ppq's own object (with ``reply`` False, a
        oneway call: nothing is sent back); False sends it Pyro5's way (WireError: marshal
        data that is not safe to read)."""
        serializer_id = header.serializer_id
        if serializer_id == wire.MARSHAL:
            wire.check_marshal(data)
            try:
                call = marshal.loads(data)
            except (ValueError, TypeError, EOFError):
                return False
        else:
            call = wire.unpack(data)
        try:
            objid, method, vargs, kwargs = call
        except (ValueError, TypeError):
            return False
        if type(vargs) is tuple:
            vargs = list(vargs)
        if type(method) is not str or type(vargs) is not list or type(kwargs) is not dict:
            return False
        cached = self._direct.get((objid, method)) if type(objid) is str else None
        if cached is not None and self.objectsById.get(objid) is cached[0]:
            target = cached[1]
        else:
            found = self._direct_target(objid, method)
            if found is None:
                return False
            target = found
        self._set_context(conn, header)
        ctx = Pyro5.callcontext.current_context
        if not reply:
            try:
                target(*vargs, **kwargs)
            except Exception as exc:  # noqa: BLE001 - nobody waits for a oneway call's outcome
                log.debug("oneway %s from %s failed: %s", method, ctx.client_sock_addr, exc)
            return True
        ctx.ppq_hold = (self, conn, header)
        ctx.ppq_held = None
        try:
            result = target(*vargs, **kwargs)
            held = ctx.ppq_held
            if held is None or result is not HELD:
                body = self.encode_reply(serializer_id, result)
        except Exception as exc:
            held = ctx.ppq_held
            if held is not None and not held.claim():
                raise Held(held) from None  # a reply was sent already: the connection is the reply's
            self.methodcall_error_handler(self, ctx.client_sock_addr, target, vargs, kwargs, exc)
            self._sendExceptionResponse(conn, header.seq, serializer_id, exc,
                                        Pyro5.errors.format_traceback(detailed=False))
            if isinstance(exc, (Pyro5.errors.CommunicationError, Pyro5.errors.SecurityError)):
                raise
            return True
        finally:
            ctx.ppq_hold = None
            ctx.ppq_held = None
        if held is not None and (result is HELD or not held.claim()):
            raise Held(held)  # the reply is sent (or was) through ``held``
        conn.send(wire.message(wire.MSG_RESULT, serializer_id, header.seq, body))
        return True

    def encode_reply(self, serializer_id: int, result: Any) -> bytes:
        """A method's result as the direct path sends it."""
        if serializer_id == wire.MSGPACK:
            return pack_reply(result)
        data: bytes = pyro_serializers.serializers_by_id[serializer_id].dumps(result)
        return data

    def _direct_target(self, objid: Any, method: str) -> Callable[..., Any] | None:
        """The bound method a direct call may run: an exposed public method of a registered
        instance; None sends the call Pyro5's way."""
        if type(objid) is not str or method.startswith("_") or objid == _DAEMON_OBJECT:
            return None
        obj = self.objectsById.get(objid)
        if obj is None or isinstance(obj, type):
            return None
        if not getattr(getattr(type(obj), method, None), "_pyroExposed", False):
            return None
        target: Callable[..., Any] = getattr(obj, method)
        self._direct[(objid, method)] = (obj, target)
        return target


def _recv(conn: Any, size: int) -> bytes | None:
    """Up to ``size`` bytes from ``conn``; None if none came within IDLE_PARK seconds.

    A plain socket is blocking with the kernel's receive timeout (SO_RCVTIMEO) set by
    the transport, so a read costs one system call however it ends; a TLS socket has
    Python's timeout instead.
    """
    try:
        return conn.sock.recv(size)
    except (BlockingIOError, TimeoutError):
        return None


_packer = threading.local()
_json_bytes = threading.Lock()


def _bytes_for_json() -> None:
    """json cannot carry bytes: a json client gets them as serpent does, a base64 dict
    (registered once, by the first ppq daemon of the process)."""
    with _json_bytes:
        if getattr(_bytes_for_json, "done", False):
            return
        import base64

        def as_base64(data: bytes) -> dict[str, str]:
            return {"data": base64.b64encode(data).decode("ascii"), "encoding": "base64"}

        pyro_serializers.SerializerBase.register_class_to_dict(bytes, as_base64, serpent_too=False)
        _bytes_for_json.done = True  # type: ignore[attr-defined]


def pack_reply(value: Any) -> bytes:
    """msgpack a reply as Pyro5's msgpack serializer would (other types through its converter)."""
    packer = getattr(_packer, "packer", None)
    if packer is None:
        serializer = pyro_serializers.serializers["msgpack"]
        import msgpack

        packer = _packer.packer = msgpack.Packer(use_bin_type=True, default=serializer.default)
    try:
        return packer.pack(value)
    except BaseException:
        packer.reset()
        raise


class _Replay:
    """A server connection whose first bytes were already read: ``recv`` serves those first."""

    def __init__(self, conn: Any, data: bytes) -> None:
        self._conn = conn
        self._data = data

    def recv(self, size: int) -> bytes:
        if not self._data:
            return self._conn.recv(size)
        head, self._data = self._data[:size], self._data[size:]
        if len(head) < size:
            head += self._conn.recv(size - len(head))
        return head

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def serve_in_thread(daemon: Daemon, name: str) -> threading.Thread:
    thread = threading.Thread(target=daemon.requestLoop, name=name, daemon=True)
    thread.start()
    return thread
