"""ppq's side of a Pyro5 connection: proxies, the direct call path, and :class:`PyroFunc`."""

from __future__ import annotations

import logging
import marshal
import os
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import Pyro5.api
import Pyro5.errors
from Pyro5 import config as pyro_config
from Pyro5 import serializers as pyro_serializers
from Pyro5.serializers import SerializerBase

from .. import codec, errors
from ..config import DEFAULT_MAX_MESSAGE
from ..errors import AuthError, ConfigError, ConnectError, MessageTooLargeError
from ..task import PUSH_FIELDS, new_id
from . import wire

log = logging.getLogger("ppq.rpc")

# Pyro5 object id of the master.
MASTER_OBJECT = "queue"
# Pyro5 object id of a worker's control object.
WORKER_OBJECT = "worker"
# Serializer of ppq's own proxies: carries bytes and int dict keys, and the server
# decodes it with every length bounded by the bytes received.
DEFAULT_SERIALIZER = "msgpack"
# Seconds a ppq proxy waits for a reply before giving up.
DEFAULT_TIMEOUT = 10.0
# Seconds a master that failed a call is tried after the others.
DOWN_SECONDS = 5.0

CommunicationError = Pyro5.errors.CommunicationError

_registered = threading.Lock()
_errors_registered = False


def register_errors() -> None:
    """Teach Pyro5's deserializers ppq's error classes, so that a ppq client gets the
    master's error type and message. Called by ppq's own proxies; idempotent."""
    global _errors_registered
    with _registered:
        if _errors_registered:
            return
        for cls in errors.ALL_ERRORS:
            def to_class(classname: str, data: dict[str, Any], cls: type = cls) -> Any:
                if issubclass(cls, errors.TaskFailedError):
                    ex = cls(*data.get("args", ())[:3])
                    for attr, value in (data.get("attributes") or {}).items():
                        setattr(ex, attr, value)
                    return ex
                return SerializerBase.make_exception(cls, data)

            SerializerBase.register_dict_to_class(f"{cls.__module__}.{cls.__name__}", to_class)
        _errors_registered = True


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


class Proxy(Pyro5.api.Proxy):
    """A Pyro5 proxy whose plain msgpack calls take the direct path (see :func:`_direct_call`)."""

    def _pyroInvoke(self, methodname: str, vargs: Any, kwargs: Any, flags: int = 0,  # noqa: N802 - Pyro5's name
                    objectId: Any = None) -> Any:  # noqa: N803 - Pyro5's name
        if (not flags and objectId is None and self._pyroSerializer == "msgpack" and _direct_wire()
                and methodname not in self._pyroOneway):
            if self._pyroConnection is None:
                self._pyroBind()
            result = _direct_call(self, methodname, tuple(vargs), dict(kwargs or {}))
            if result is not _MISSING:
                return result
        return super()._pyroInvoke(methodname, vargs, kwargs, flags, objectId)


def make_proxy(uri: str, token: str | None = None, timeout: float | None = DEFAULT_TIMEOUT,
               serializer: str = DEFAULT_SERIALIZER) -> Any:
    register_errors()
    proxy = Proxy(uri)
    proxy._pyroSerializer = serializer
    proxy._pyroTimeout = timeout
    proxy._pyroHandshake = {"token": token or "", "ppq": 1}
    return proxy


def _auth_failure(exc: BaseException) -> bool:
    return "authentication failed" in str(exc)


# -- the direct call path --------------------------------------------------------
#
# A plain msgpack call with no flags or annotations is written and read as Pyro5's
# message directly (the same bytes), in two socket reads per reply, instead of through
# Pyro5's general path, which builds a message object, a correlation id and walks every
# argument and result. It saves about half of a call's cost: a ppq ping runs at about
# twice the rate of a raw Pyro5 echo call (`python bench/ab.py` prints the ppq ping rate,
# `bash bench/bench.sh` the echo's).

# Types msgpack writes as Pyro5's msgpack serializer does. Pyro5 converts other types of
# arguments (an array.array to a list, a UUID to a str...) first: those calls go its way.
_PLAIN = frozenset((str, int, float, bool, type(None), bytes, list, dict, tuple))
_MISSING: Any = object()
def _encode_call(objid: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[int, bytes] | None:
    """The request's serializer and bytes: msgpack, or marshal for what msgpack cannot carry
    (integers past 64 bits, sets, deep nesting), which the master then checks before reading;
    None when neither can (Pyro5's own path takes the call)."""
    try:
        return wire.MSGPACK, codec.pack((objid, method, args, kwargs))
    except (TypeError, ValueError, OverflowError):
        pass
    try:
        return wire.MARSHAL, marshal.dumps((objid, method, list(args), kwargs))
    except (TypeError, ValueError):
        return None


def _direct_wire() -> bool:
    """The direct path is off while Pyro5 is set to log the wire or compress."""
    return not pyro_config.LOGWIRE and not pyro_config.COMPRESSION


def _direct_call(proxy: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any],
                 max_message: int = DEFAULT_MAX_MESSAGE, max_reply: int | None = None) -> Any:
    """Call ``method`` on a connected msgpack proxy over the direct path.

    A reply larger than ``max_reply`` bytes (default: Pyro5's MAX_MESSAGE_SIZE) is refused
    unread with ProtocolError.

    Returns ``_MISSING`` (nothing sent) when the arguments need Pyro5's own conversion.
    A failure after the request went out closes the connection, as Pyro5 does, so a
    late reply is never read as the next call's.
    """
    conn = proxy._pyroConnection
    for value in (*args, *kwargs.values()):
        if type(value) not in _PLAIN:
            return _MISSING
    encoded = _encode_call(conn.objectId, method, args, kwargs)
    if encoded is None:
        return _MISSING
    serializer_id, data = encoded
    if len(data) > max_message:
        # The master would refuse it unread and close the connection: say so here, before sending.
        raise MessageTooLargeError(f"{method}: a request of {len(data)} bytes is larger than the limit of "
                               f"{max_message} bytes (limits.max_message); send less per call")
    seq = proxy._pyroSeq = (proxy._pyroSeq + 1) & 0xFFFF
    try:
        conn.send(wire.message(wire.MSG_INVOKE, serializer_id, seq, data))
        try:
            header = wire.parse_header(conn.recv(wire.HEADER.size))
        except wire.WireError as exc:
            raise Pyro5.errors.ProtocolError(f"invalid reply message: {exc}") from None
        if header.kind != wire.MSG_RESULT or header.seq != seq or header.serializer_id != serializer_id:
            raise Pyro5.errors.ProtocolError(f"invoke: reply out of sync (seq {header.seq}, expected {seq})")
        total = header.size + header.annotations
        if total > (max_reply or pyro_config.MAX_MESSAGE_SIZE):
            raise Pyro5.errors.ProtocolError(f"reply too large ({total} bytes)")
        body = conn.recv(total) if total else b""
        if header.annotations:
            body = body[header.annotations:]
        if header.flags & wire.FLAGS_ITEMSTREAMRESULT:
            raise Pyro5.errors.ProtocolError("result of call is an iterator, which ppq does not use")
        if header.flags & wire.FLAGS_EXCEPTION or serializer_id != wire.MSGPACK:
            result = pyro_serializers.serializers_by_id[serializer_id].loads(body)
        else:
            try:
                result = wire.unpack(body)
            except wire.WireError as exc:
                raise Pyro5.errors.ProtocolError(f"invalid reply: {exc}") from None
    except BaseException:
        proxy._pyroRelease()
        raise
    if header.flags & wire.FLAGS_EXCEPTION:
        raise result
    return result


# Where task_id stands among push_task's positional parameters.
_TASK_ID_POSITION = PUSH_FIELDS.index("task_id")


def _with_task_ids(method: str, args: tuple[Any, ...],
                   kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """Give each pushed task an id made here, so that a push retried after a lost reply is stored once.

    A push_task given its options positionally past ``task_id``'s place keeps what it gave.
    """
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
    A master that failed within the last :data:`DOWN_SECONDS` is tried after the others.

    An address may be a name server entry, ``PYRONAME:ppq.master@host:port`` or
    ``PYROMETA:ppq.queue@host:port``: it stands for every master registered there
    (see :mod:`ppq.rpc.names`), looked up again after a failure and every few
    seconds; with ``queue_index`` given, only the masters that serve it.

    ``push_task`` and ``push_tasks`` calls get a task id made here (unless
    given), so a push retried after a lost reply is stored once. ``token``
    defaults to ``PPQ_AUTH_TOKEN``.

    Proxies are kept per thread, so one PyroFunc can be shared by many threads
    (``threaded`` is accepted for compatibility; it is always so). With
    ``set_one_way`` calls do not wait for a reply and return None. A request larger than
    ``max_message`` (the master's ``limits.max_message``) is refused here with
    MessageTooLargeError instead of being sent.
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
        max_message: int = DEFAULT_MAX_MESSAGE,
        queue_index: int | None = None,
    ) -> None:
        addresses = [uri_or_list] if isinstance(uri_or_list, str) else list(uri_or_list)
        if not addresses:
            raise ConfigError("PyroFunc needs at least one master address")
        self.uris = [master_uri(a, objid) for a in addresses]
        self.func = func
        self.default_return = default_return
        self.retry = max(1, int(retry))
        self.random_idx = random_idx
        self.set_one_way = set_one_way
        self.token = token if token is not None else os.environ.get("PPQ_AUTH_TOKEN") or None
        self.timeout = timeout
        self.serializer = serializer
        self.max_message = max_message
        self._local = threading.local()
        # Name server entries -> their finders (ppq.rpc.names).
        self._finders: dict[str, Any] = {}
        for uri in self.uris:
            if uri.upper().startswith(("PYRONAME:", "PYROMETA:")):
                from .names import Finder

                self._finders[uri] = Finder(uri, self.token, queue_index)
        # The masters whose last call failed (shared by the threads): each is named in one
        # warning until it answers again; and when each failed last (monotonic seconds).
        self._down: set[str] = set()
        self._failed_at: dict[str, float] = {}

    def targets(self, fresh: bool = False) -> list[str]:
        """The ``PYRO:`` URIs of the masters: the addresses given, name server entries looked up
        (again, with ``fresh``, unless they were a moment ago)."""
        if not self._finders:
            return self.uris
        found: dict[str, None] = {}
        for uri in self.uris:
            finder = self._finders.get(uri)
            for target in (finder.uris(fresh) if finder is not None else [uri]):
                found.setdefault(target)
        return list(found)

    def _proxies(self) -> dict[str, Any]:
        proxies = getattr(self._local, "proxies", None)
        if proxies is None:
            proxies = self._local.proxies = {}
        return proxies

    def _proxy(self, uri: str) -> Any:
        proxies = self._proxies()
        proxy = proxies.get(uri)
        if proxy is None:
            proxy = proxies[uri] = make_proxy(uri, self.token, self.timeout, self.serializer)
        return proxy

    def _drop(self, uri: str) -> None:
        proxy = self._proxies().pop(uri, None)
        if proxy is not None:
            try:
                proxy._pyroRelease()
            except Exception:  # noqa: BLE001 - a broken proxy may fail to close
                pass

    def close(self) -> None:
        """Close this thread's connections."""
        for uri in list(self._proxies()):
            self._drop(uri)

    def order(self, targets: Sequence[str] | None = None) -> list[str]:
        """The masters in the order a call tries them: from a random one with ``random_idx``,
        those that failed within DOWN_SECONDS last."""
        uris = list(self.targets() if targets is None else targets)
        if self.random_idx and len(uris) > 1:
            start = random.randrange(len(uris))
            uris = uris[start:] + uris[:start]
        if self._failed_at and len(uris) > 1:
            now = time.monotonic()
            recent = {u for u in uris if now - self._failed_at.get(u, -DOWN_SECONDS) < DOWN_SECONDS}
            if recent:
                uris = [u for u in uris if u not in recent] + [u for u in uris if u in recent]
        return uris

    def _call_one(self, uri: str, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        proxy = self._proxy(uri)
        if self.set_one_way:
            if method not in proxy._pyroOneway:
                # Binding fetches the object's metadata, which resets the one-way set.
                if proxy._pyroConnection is None:
                    proxy._pyroBind()
                proxy._pyroOneway.add(method)
        elif self.serializer == "msgpack" and _direct_wire():
            if proxy._pyroConnection is None:
                proxy._pyroBind()
            result = _direct_call(proxy, method, args, kwargs, self.max_message)
            if result is not _MISSING:
                return result
        return getattr(proxy, method)(*args, **kwargs)

    def _failed(self, uri: str, method: str, exc: BaseException, more: bool) -> None:
        """Say that a master did not answer, once until it answers again, and only when another
        master is tried next: with one master, or past the last, the caller's error says it all."""
        first = uri not in self._down
        self._down.add(uri)
        self._failed_at[uri] = time.monotonic()
        if first and more:
            log.warning("%s on %s failed (%s: %s); trying the next master", method, uri, type(exc).__name__, exc)
        else:
            log.debug("%s on %s failed (%s: %s)", method, uri, type(exc).__name__, exc)

    def _answered(self, uri: str) -> None:
        self._failed_at.pop(uri, None)
        if uri in self._down:
            self._down.discard(uri)
            if len(self.uris) > 1 or self._finders:
                log.info("%s answers again", uri)

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
            order = self.order(self.targets(fresh=last is not None))
            if not order:
                problems = [f.problem for f in self._finders.values() if f.problem]
                last = CommunicationError("; ".join(problems) or "no master is registered with the name server")
            for n, uri in enumerate(order):
                try:
                    result = self._call_one(uri, method, args, kwargs)
                except CommunicationError as exc:
                    self._drop(uri)
                    if _auth_failure(exc):
                        raise AuthError(f"authentication failed at {uri}: "
                                        f"check auth_token / PPQ_AUTH_TOKEN") from None
                    last = exc
                    self._failed(uri, method, exc, len(order) > 1 and (n + 1 < len(order) or attempt + 1 < self.retry))
                    continue
                if uri in self._failed_at:
                    self._answered(uri)
                return result
        if self.default_return is not _MISSING:
            return self.default_return
        raise ConnectError(f"{method}: no master answered ({', '.join(self.uris)}): {last}")
