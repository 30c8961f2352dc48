"""All of ppq's Pyro5 glue: proxies, the auth handshake, TLS, error registration,
the daemon, and :class:`PyroFunc`, the retrying caller.

No other ppq module imports Pyro5.
"""

from __future__ import annotations

import base64
import functools
import hmac
import ipaddress
import json
import logging
import marshal
import os
import random
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import Pyro5.api
import Pyro5.callcontext
import Pyro5.errors
import Pyro5.protocol
import Pyro5.server
from Pyro5 import config as pyro_config
from Pyro5 import serializers as pyro_serializers
from Pyro5.serializers import SerializerBase

from . import errors
from .config import TLSConfig
from .errors import AuthError, ConfigError, ConnectError, InvalidTaskError, PPQError
from .task import new_id

log = logging.getLogger("ppq.rpc")

F = TypeVar("F", bound=Callable[..., Any])

# Pyro5 object id of the master.
MASTER_OBJECT = "queue"
# Pyro5 object id of a worker's control object.
WORKER_OBJECT = "worker"
# Serializer of ppq's own proxies: fast, carries bytes and int dict keys.
DEFAULT_SERIALIZER = "marshal"
# Seconds a ppq proxy waits for a reply before giving up.
DEFAULT_TIMEOUT = 10.0

expose = Pyro5.api.expose
CommunicationError = Pyro5.errors.CommunicationError

pyro_config.SERVERTYPE = "thread"
pyro_config.SERIALIZER = DEFAULT_SERIALIZER
pyro_config.DETAILED_TRACEBACK = False


def _register_errors() -> None:
    for cls in errors.ALL_ERRORS:
        name = f"{cls.__module__}.{cls.__name__}"

        def to_class(classname: str, data: dict[str, Any], cls: type = cls) -> Any:
            if cls is errors.TaskFailedError:
                ex = cls(*data.get("args", ())[:3])
                for attr, value in (data.get("attributes") or {}).items():
                    setattr(ex, attr, value)
                return ex
            return SerializerBase.make_exception(cls, data)

        SerializerBase.register_dict_to_class(name, to_class)


_register_errors()


def _bytes_as_base64(data: bytes) -> dict[str, str]:
    return {"data": base64.b64encode(data).decode("ascii"), "encoding": "base64"}


# json cannot carry bytes: a json client gets them as serpent does, a base64 dict.
SerializerBase.register_class_to_dict(bytes, _bytes_as_base64, serpent_too=False)

_request = threading.local()
_pyro_dict_to_class = SerializerBase.dict_to_class.__func__  # type: ignore[attr-defined]


def _dict_to_class(cls: type, data: dict[str, Any]) -> Any:
    """Pyro5 turns a dict with a "__class__" key into an object (an exception, a
    URI...); in a request's arguments no object is made, the call is refused."""
    if getattr(_request, "active", False):
        # A builtin type, so that a client without ppq can read it too.
        raise ValueError(f"InvalidTaskError: arguments must be plain data; a dict with a '__class__' key "
                         f"({str(data.get('__class__'))!r:.80}) is not accepted")
    return _pyro_dict_to_class(cls, data)


def _plain_loader(name: str, serializer: Any) -> Callable[[bytes], Any] | None:
    """A request reader that skips Pyro5's walk over every argument looking for class
    dicts; used when the request's bytes hold no "__class__" at all."""
    if name == "marshal":
        return marshal.loads
    if name == "msgpack":
        import msgpack

        return lambda raw: msgpack.unpackb(raw, raw=False, ext_hook=serializer.ext_hook)
    if name == "serpent":
        import serpent

        return serpent.loads  # type: ignore[no-any-return]
    if name == "json":
        def load_json(raw: bytes) -> Any:
            data = json.loads(raw.decode("utf-8"))
            return data["object"], data["method"], data["params"], data["kwargs"]

        return load_json
    return None


def _walk_only_for_classes(plain: Callable[[bytes], Any] | None, walk: Callable[[bytes], Any]
                           ) -> Callable[[Any], Any]:
    """A reader that uses ``plain`` when the bytes hold no "__class__" (Pyro5's walk over
    every value would rebuild the same data), else ``walk``."""
    def load(data: Any) -> Any:
        raw = data if type(data) is bytes else bytes(data)
        if plain is not None and b"__class__" not in raw:
            return plain(raw)
        return walk(raw)

    return load


def _fast_marshal_replies() -> None:
    """Read marshal replies without Pyro5's walk when they carry no class dicts."""
    serializer = pyro_serializers.serializers["marshal"]
    if getattr(serializer, "_ppq_fast_replies", False):
        return
    serializer.loads = _walk_only_for_classes(marshal.loads, serializer.loads)
    serializer._ppq_fast_replies = True


_fast_marshal_replies()


def _guard_requests() -> None:
    """Make every serializer read a request's arguments as plain data (see :func:`_dict_to_class`)."""
    if getattr(SerializerBase, "_ppq_guarded", False):
        return
    SerializerBase.dict_to_class = classmethod(_dict_to_class)  # type: ignore[method-assign,assignment]
    for name, serializer in pyro_serializers.serializers.items():
        def guarded(raw: bytes, load_call: Callable[[Any], Any] = serializer.loadsCall) -> Any:
            _request.active = True
            try:
                return load_call(raw)
            finally:
                _request.active = False

        serializer.loadsCall = _walk_only_for_classes(_plain_loader(name, serializer), guarded)
    SerializerBase._ppq_guarded = True  # type: ignore[attr-defined]


def is_loopback(host: str) -> bool:
    """True if ``host`` is reachable from this machine only (an empty host binds every interface)."""
    if host == "localhost":
        return True
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(ipaddress.ip_address(info[4][0]).is_loopback
                       for info in socket.getaddrinfo(host, None))
        except OSError:
            return False


def check_bind(host: str, token: str | None, insecure: bool, key: str) -> None:
    """Refuse a non-loopback bind without an auth token, unless forced."""
    if not is_loopback(host) and not token and not insecure:
        raise ConfigError(
            f"{key} is {host!r}, which is reachable from other machines, and no auth_token is set: "
            f"set auth_token (or PPQ_AUTH_TOKEN), or pass --insecure to run without one"
        )


def apply_tls(tls: TLSConfig, server: bool) -> None:
    """Set Pyro5's process-wide SSL settings from ``tls``."""
    if not tls.enabled:
        return
    pyro_config.SSL = True
    pyro_config.SSL_CACERTS = tls.cafile
    if server:
        if not tls.certfile or not tls.keyfile:
            raise ConfigError("tls.certfile and tls.keyfile are required when tls.enabled is true")
        pyro_config.SSL_SERVERCERT = tls.certfile
        pyro_config.SSL_SERVERKEY = tls.keyfile
        pyro_config.SSL_REQUIRECLIENTCERT = tls.require_client_cert
    pyro_config.SSL_CLIENTCERT = tls.client_certfile
    pyro_config.SSL_CLIENTKEY = tls.client_keyfile


def master_uri(address: str, objid: str = MASTER_OBJECT) -> str:
    """``host:port`` (or a full ``PYRO:`` URI) as a Pyro5 URI of ``objid``.

    The Pyro4-era ``PYROLOC://host:port/objid`` form (objid optional) names the
    same thing and becomes ``PYRO:objid@host:port``.
    """
    address = address.strip()
    if address.startswith(("PYRO:", "PYROMETA:", "PYRONAME:")):
        return address
    if address.upper().startswith("PYROLOC://"):
        location, _, named = address[len("PYROLOC://"):].partition("/")
        host, sep, port = location.rpartition(":")
        if not sep or not port.isdigit() or not host or "/" in named:
            raise ConfigError(f"master address {address!r} is not PYROLOC://host:port/objid")
        return f"PYRO:{named or objid}@{host}:{port}"
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ConfigError(f"master address {address!r} is not host:port or a PYRO: URI")
    return f"PYRO:{objid}@{host}:{port}"


def make_proxy(uri: str, token: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
               serializer: str = DEFAULT_SERIALIZER) -> Any:
    proxy = Pyro5.api.Proxy(uri)
    proxy._pyroSerializer = serializer
    proxy._pyroTimeout = timeout
    proxy._pyroHandshake = {"token": token or "", "ppq": 1}
    return proxy


def _auth_failure(exc: BaseException) -> bool:
    return "authentication failed" in str(exc)


def client_is_ppq() -> bool:
    """True if the current call comes from ppq's own client (not a plain Pyro5 proxy)."""
    conn = getattr(Pyro5.callcontext.current_context, "client", None)
    return bool(getattr(conn, "ppq_client", False))


def client_address() -> str:
    addr = getattr(Pyro5.callcontext.current_context, "client_sock_addr", None)
    return f"{addr[0]}:{addr[1]}" if addr else ""


_PLAIN_ERRORS: dict[type, type] = {
    errors.InvalidTaskError: ValueError,
    errors.AuthError: PermissionError,
    errors.StorageError: ConnectionError,
    errors.LeaseLostError: RuntimeError,
}


def remote(method: F) -> F:
    """Wrap an exposed method: bad arguments and ppq errors become clear errors.

    A ppq client gets the ppq error itself; a plain Pyro5 client, which cannot
    deserialize ppq's classes, gets the closest builtin type with the ppq error's
    name in the message. Anything unexpected is logged and reported as a PPQError.
    """
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            try:
                return method(*args, **kwargs)
            except TypeError as exc:
                # Raised by the call itself (wrong arguments), not from inside the method.
                if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
                    message = str(exc).split(".")[-1].replace("() ", ": ", 1)
                    raise InvalidTaskError(message) from None
                raise
        except PPQError as exc:
            if client_is_ppq():
                raise
            plain = next((v for k, v in _PLAIN_ERRORS.items() if isinstance(exc, k)), RuntimeError)
            raise plain(f"{type(exc).__name__}: {exc}") from None
        except Exception as exc:
            log.exception("internal error in %s", method.__name__)
            raise (PPQError if client_is_ppq() else RuntimeError)(
                f"internal error in {method.__name__}: {type(exc).__name__}: {exc}") from None

    return expose(wrapper)  # type: ignore[no-any-return]


# -- the direct wire path ------------------------------------------------------
#
# Most calls between ppq's own processes are the plainest kind of Pyro5 call: marshal,
# no flags, no annotations, a reply of plain data. For those, both ends read and write
# Pyro5's message (a 40-byte header, then the marshal data) directly, in two socket
# reads per message, instead of Pyro5's general path, which builds a message object,
# a correlation uuid and a peer-address lookup per call and walks every argument.
# The bytes on the wire are the same; anything else takes Pyro5's own path.

# Pyro5's message header: tag, version, type, serializer, flags, seq, data size,
# annotations size, correlation id, reserved, magic.
_HEADER = struct.Struct("!4sHBBHHII16sHH")
_PROTOCOL = 502
_MAGIC = 0x4DC5
_NO_CORRELATION = bytes(16)
_MARSHAL_ID = pyro_serializers.MarshalSerializer.serializer_id
_INVOKE = Pyro5.protocol.MSG_INVOKE
_RESULT = Pyro5.protocol.MSG_RESULT
_EXCEPTION = Pyro5.protocol.FLAGS_EXCEPTION
_COMPRESSED = Pyro5.protocol.FLAGS_COMPRESSED
_STREAMED = Pyro5.protocol.FLAGS_ITEMSTREAMRESULT
_DIRECT_WIRE = (Pyro5.protocol.PROTOCOL_VERSION == _PROTOCOL
                and _HEADER.size == getattr(Pyro5.protocol, "_header_size", None))
# Types marshal writes as Pyro5's marshal serializer does. Pyro5 converts other types of
# arguments and results (an array.array to a list, a UUID to a str...) first.
_PLAIN = frozenset((str, int, float, bool, type(None), bytes, list, dict, tuple))


def _direct_wire() -> bool:
    """The direct path is off while Pyro5 is set to log the wire or compress."""
    return _DIRECT_WIRE and not pyro_config.LOGWIRE and not pyro_config.COMPRESSION


def _message(kind: int, seq: int, data: bytes) -> bytes:
    return _HEADER.pack(b"PYRO", _PROTOCOL, kind, _MARSHAL_ID, 0, seq, len(data), 0, _NO_CORRELATION, 0, _MAGIC) + data


class _Replay:
    """A server connection whose first bytes were already read: ``recv`` serves those first."""

    def __init__(self, conn: Any, data: bytes) -> None:
        self._conn = conn
        self._data = data

    def recv(self, size: int) -> bytes:
        if not self._data:
            return self._conn.recv(size)  # type: ignore[no-any-return]
        head, self._data = self._data[:size], self._data[size:]
        if len(head) < size:
            head += self._conn.recv(size - len(head))
        return head

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)


def _direct_call(proxy: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """Call ``method`` on a connected marshal proxy over the direct path.

    Returns ``_MISSING`` (nothing sent) when the arguments need Pyro5's own conversion.
    A failure after the request went out closes the connection, as Pyro5 does, so a
    late reply is never read as the next call's.
    """
    conn = proxy._pyroConnection
    for value in (*args, *kwargs.values()):
        if type(value) not in _PLAIN:
            return _MISSING
    try:
        data = marshal.dumps((conn.objectId, method, list(args), kwargs))
    except ValueError:
        return _MISSING
    seq = proxy._pyroSeq = (proxy._pyroSeq + 1) & 0xFFFF
    try:
        conn.send(_message(_INVOKE, seq, data))
        tag, version, kind, serializer_id, flags, rseq, size, annotations, _, _, magic = _HEADER.unpack(
            conn.recv(_HEADER.size))
        if tag != b"PYRO" or version != _PROTOCOL or magic != _MAGIC or kind != _RESULT:
            raise Pyro5.errors.ProtocolError("invalid reply message")
        if rseq != seq or serializer_id != _MARSHAL_ID:
            raise Pyro5.errors.ProtocolError(f"invoke: reply out of sync (seq {rseq}, expected {seq})")
        if size + annotations > pyro_config.MAX_MESSAGE_SIZE:
            raise Pyro5.errors.ProtocolError(f"reply too large ({size + annotations} bytes)")
        body = conn.recv(size + annotations) if size + annotations else b""
        if annotations:
            body = body[annotations:]
        if flags & _COMPRESSED:
            body = zlib.decompress(body)
        if flags & _STREAMED:
            raise Pyro5.errors.ProtocolError("result of call is an iterator, which ppq does not use")
        result = pyro_serializers.serializers["marshal"].loads(body)
    except BaseException:
        proxy._pyroRelease()
        raise
    if flags & _EXCEPTION:
        raise result
    return result


class Daemon(Pyro5.server.Daemon):
    """A Pyro5 daemon that checks ppq's auth token in the connection handshake."""

    def __init__(self, host: str, port: int, token: str | None = None, threadpool_size: int = 4000) -> None:
        pyro_config.THREADPOOL_SIZE = max(threadpool_size, 8)
        pyro_config.THREADPOOL_SIZE_MIN = 8
        pyro_config.COMMTIMEOUT = 0.0
        self._token = (token or "").encode("utf-8")
        # (object id, method name) -> (object, its bound method), for calls on the direct path.
        self._direct: dict[tuple[str, str], tuple[Any, Callable[..., Any]]] = {}
        _guard_requests()
        super().__init__(host=host, port=port)

    def validateHandshake(self, conn: Any, data: Any) -> Any:  # noqa: N802 - Pyro5's name
        offered = data.get("token") if isinstance(data, dict) else data
        if self._token:
            if not isinstance(offered, str) or not hmac.compare_digest(offered.encode("utf-8"), self._token):
                log.warning("authentication failed for a connection from %s", _peer(conn))
                raise Pyro5.errors.SecurityError("authentication failed")
        conn.ppq_client = isinstance(data, dict) and bool(data.get("ppq"))
        return "ok"

    def handleRequest(self, conn: Any) -> None:  # noqa: N802 - Pyro5's name
        """Serve one request: a plain marshal call to ppq's own object over the direct path
        (see ``_direct_call``), anything else through Pyro5's own handler."""
        if not _direct_wire():
            return super().handleRequest(conn)
        head = conn.recv(_HEADER.size)
        tag, version, kind, serializer_id, flags, seq, size, annotations, _, _, magic = _HEADER.unpack(head)
        if (kind != _INVOKE or serializer_id != _MARSHAL_ID or flags or annotations or tag != b"PYRO"
                or version != _PROTOCOL or magic != _MAGIC or size > pyro_config.MAX_MESSAGE_SIZE):
            return super().handleRequest(_Replay(conn, head))
        data = conn.recv(size) if size else b""
        try:
            objid, method, vargs, kwargs = pyro_serializers.serializers["marshal"].loadsCall(data)
            cached = self._direct.get((objid, method)) if type(method) is str else None
            if cached is not None and self.objectsById.get(objid) is cached[0]:
                target = cached[1]
            else:
                target = self._direct_target(objid, method)
        except Exception:  # noqa: BLE001 - Pyro5's handler makes the error reply
            target = None
        if target is None or type(vargs) not in (list, tuple) or type(kwargs) is not dict:
            return super().handleRequest(_Replay(conn, head + data))
        ctx = Pyro5.callcontext.current_context
        ctx.client = conn
        ctx.client_sock_addr = address = conn.__dict__.get("ppq_address") or _peer_address(conn)
        ctx.seq = seq
        ctx.annotations = {}
        ctx.msg_flags = 0
        ctx.serializer_id = _MARSHAL_ID
        ctx.correlation_id = None
        ctx.response_annotations = {}
        try:
            result = target(*vargs, **kwargs)
            if type(result) in _PLAIN:
                reply = marshal.dumps(result)
            else:
                reply = pyro_serializers.serializers["marshal"].dumps(result)
            if len(reply) > pyro_config.MAX_MESSAGE_SIZE:
                raise Pyro5.errors.ProtocolError(f"reply too large ({len(reply)} bytes)")
        except Exception as exc:
            self.methodcall_error_handler(self, address, target, vargs, kwargs, exc)
            self._sendExceptionResponse(conn, seq, _MARSHAL_ID, exc,
                                        Pyro5.errors.format_traceback(detailed=pyro_config.DETAILED_TRACEBACK))
            if isinstance(exc, (Pyro5.errors.CommunicationError, Pyro5.errors.SecurityError)):
                raise
            return None
        conn.send(_message(_RESULT, seq, reply))
        return None

    def _direct_target(self, objid: Any, method: Any) -> Callable[..., Any] | None:
        """The bound method a direct call may run: an exposed public method of one of
        ppq's own objects (registered as instances); None sends the call Pyro5's way."""
        if objid not in (MASTER_OBJECT, WORKER_OBJECT) or type(method) is not str or method.startswith("_"):
            return None
        obj = self.objectsById.get(objid)
        if obj is None or isinstance(obj, type):
            return None
        if not getattr(getattr(type(obj), method, None), "_pyroExposed", False):
            return None
        target: Callable[..., Any] = getattr(obj, method)
        self._direct[(objid, method)] = (obj, target)
        return target


def _peer_address(conn: Any) -> Any:
    """The peer address of a server connection, looked up once per connection."""
    try:
        address = conn.sock.getpeername()
    except OSError:
        return None
    conn.ppq_address = address
    return address


def _peer(conn: Any) -> str:
    try:
        host, port = conn.sock.getpeername()[:2]
        return f"{host}:{port}"
    except (OSError, AttributeError):
        return "?"


def serve_in_thread(daemon: Daemon, name: str) -> threading.Thread:
    thread = threading.Thread(target=daemon.requestLoop, name=name, daemon=True)
    thread.start()
    return thread


_MISSING: Any = object()
# Position of task_id among push_task's parameters.
_TASK_ID_POSITION = 15


def _with_task_ids(method: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Give each pushed task an id made here, so that a push retried after a lost reply is stored once."""
    if method == "push_task" and "task_id" not in kwargs and len(args) <= _TASK_ID_POSITION:
        kwargs = dict(kwargs, task_id=new_id())
    elif method == "push_tasks" and args and isinstance(args[0], (list, tuple)):
        tasks = [dict(t, task_id=new_id()) if isinstance(t, dict) and "task_id" not in t else t
                 for t in args[0]]
        args = (tasks, *args[1:])
    return args, kwargs


class PyroFunc:
    """Call a method on one of several masters, retrying and failing over.

    ``PyroFunc(uris)('push_task', 'sleep', module='time')`` calls
    ``push_task('sleep', module='time')``; with ``func='push_task'`` the method
    name is fixed and every argument goes to it. ``random_idx`` starts at a
    random master. On a communication error (master down, connection dropped,
    timeout) the next master is tried; each of ``retry`` rounds tries every master
    once, with a jittered pause between rounds. When every try failed,
    ``default_return`` is returned if it was given, else :class:`ConnectError` is
    raised. Errors raised by the master itself (bad arguments...) are not retried.

    ``push_task`` and ``push_tasks`` calls get a task id made here (unless
    given), so a push retried after a lost reply is stored once. ``token``
    defaults to ``PPQ_AUTH_TOKEN``.

    Proxies are kept per thread, so one PyroFunc can be shared by many threads
    (``threaded`` is accepted for compatibility; it is always so). With
    ``set_one_way`` calls do not wait for a reply and return None.
    """

    def __init__(
        self,
        uri_or_list: str | Sequence[str],
        func: str = "",
        default_return: Any = _MISSING,
        retry: int = 1,
        random_idx: bool = False,
        threaded: bool = False,
        set_one_way: bool = False,
        *,
        token: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        serializer: str = DEFAULT_SERIALIZER,
        objid: str = MASTER_OBJECT,
    ) -> None:
        addresses = [uri_or_list] if isinstance(uri_or_list, str) else list(uri_or_list)
        if not addresses:
            raise ConfigError("PyroFunc needs at least one master address")
        self.uris = [master_uri(a, objid) for a in addresses]
        self.func = func
        self.default_return = default_return
        self.retry = max(1, int(retry))
        self.random_idx = random_idx
        self.threaded = threaded
        self.set_one_way = set_one_way
        self.token = token if token is not None else os.environ.get("PPQ_AUTH_TOKEN") or None
        self.timeout = timeout
        self.serializer = serializer
        self._local = threading.local()

    def _proxies(self) -> dict[int, Any]:
        proxies = getattr(self._local, "proxies", None)
        if proxies is None:
            proxies = self._local.proxies = {}
        return proxies

    def _proxy(self, index: int) -> Any:
        proxies = self._proxies()
        proxy = proxies.get(index)
        if proxy is None:
            proxy = proxies[index] = make_proxy(self.uris[index], self.token, self.timeout, self.serializer)
        return proxy

    def _drop(self, index: int) -> None:
        proxy = self._proxies().pop(index, None)
        if proxy is not None:
            try:
                proxy._pyroRelease()
            except Exception:  # noqa: BLE001 - a broken proxy may fail to close
                pass

    def close(self) -> None:
        """Close this thread's connections."""
        for index in list(self._proxies()):
            self._drop(index)

    def order(self) -> list[int]:
        indexes = list(range(len(self.uris)))
        if self.random_idx and len(indexes) > 1:
            start = random.randrange(len(indexes))
            indexes = indexes[start:] + indexes[:start]
        return indexes

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.func:
            method = self.func
        else:
            if not args:
                raise TypeError("PyroFunc call needs the method name as its first argument")
            method, args = args[0], args[1:]
        args, kwargs = _with_task_ids(method, args, kwargs)
        last: BaseException | None = None
        for attempt in range(self.retry):
            if attempt:
                time.sleep(min(0.05 * 2 ** attempt, 2.0) * (0.5 + random.random()))
            for index in self.order():
                try:
                    proxy = self._proxy(index)
                    if self.set_one_way and method not in proxy._pyroOneway:
                        # Binding fetches the object's metadata, which resets the one-way set.
                        if proxy._pyroConnection is None:
                            proxy._pyroBind()
                        proxy._pyroOneway.add(method)
                    elif (proxy._pyroConnection is not None and self.serializer == "marshal"
                          and not proxy._pyroOneway and _direct_wire()):
                        result = _direct_call(proxy, method, args, kwargs)
                        if result is not _MISSING:
                            return result
                    return getattr(proxy, method)(*args, **kwargs)
                except CommunicationError as exc:
                    self._drop(index)
                    if _auth_failure(exc):
                        raise AuthError(f"authentication failed at {self.uris[index]}: "
                                        f"check auth_token / PPQ_AUTH_TOKEN") from None
                    last = exc
                    log.warning("%s on %s failed (%s: %s); trying the next master", method, self.uris[index],
                                type(exc).__name__, exc)
        if self.default_return is not _MISSING:
            return self.default_return
        raise ConnectError(f"{method}: no master answered ({', '.join(self.uris)}): {last}")
