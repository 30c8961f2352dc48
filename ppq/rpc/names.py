"""Pyro5 name servers: serving one, registering a master in one, finding masters in one.

- :func:`serve_nameserver` runs Pyro5's own name server object (``Pyro.NameServer``)
  inside ppq's daemon, so that it has ppq's token check, TLS and wire limits; it
  refuses registrations past :data:`MAX_NAMES`, and :class:`Pruner` removes the
  entries that were not registered again for a while and whose address refuses a
  TCP connection.
- :class:`Registration` keeps one master registered (again after the name server
  restarts) and removes it on a clean stop.
- :class:`Finder` turns a ``PYRONAME:name@host:port`` or ``PYROMETA:tag@host:port``
  entry into the ``PYRO:`` URIs of the masters registered there, every lookup
  bounded in time (:data:`LOOKUP_TIMEOUT`) and reply size (:data:`MAX_LOOKUP_REPLY`),
  the answer cached for :data:`CACHE_SECONDS`.

``PYRONAME:ppq.master`` means every registration named ``ppq.master`` or
``ppq.master.<id>`` (masters register as ``<name>.<host>_<port>``);
``PYROMETA:a,b`` every registration tagged with both ``a`` and ``b``.
"""

from __future__ import annotations

import logging
import random
import socket
import ssl
import threading
import time
from collections.abc import Iterable, Mapping
from typing import Any

import Pyro5.core
import Pyro5.errors
import Pyro5.nameserver
from Pyro5.api import expose

from ..errors import ConfigError
from .client import _MISSING, _direct_call, make_proxy
from .exposed import caller_role
from .roles import ALL
from .server import Daemon

log = logging.getLogger("ppq.names")

# Port of `ppq nameserver`, Pyro5's own default name server port.
DEFAULT_NAMESERVER_PORT = 9090
# Object id of the name server in its daemon, and the name it is registered under (Pyro5's).
NAMESERVER_OBJECT = Pyro5.core.NAMESERVER_NAME
# Metadata tag of every registered master: `PYROMETA:ppq.queue@host:port` reaches one.
QUEUE_TAG = "ppq.queue"
# Metadata tag prefix that lists the queue_indexes a master serves: "ppq.queue_indexes:0,1".
QUEUE_INDEXES_TAG = "ppq.queue_indexes:"
# Seconds a name server lookup may take, connection included.
LOOKUP_TIMEOUT = 3.0
# Largest lookup reply read, in bytes.
MAX_LOOKUP_REPLY = 1024 * 1024
# Most masters one lookup yields (the others are ignored).
MAX_FOUND = 1000
# Seconds a lookup's answer is used before the name server is asked again.
CACHE_SECONDS = 5.0
# Shortest time between two lookups of the same entry, even after failures, in seconds.
MIN_LOOKUP_GAP = 0.5
# Seconds between a master's registrations (each re-registers it after a name server restart).
REFRESH_INTERVAL = 3.0
# Most registrations a ppq name server holds; registering more is refused.
MAX_NAMES = 10_000
# Longest name, URI or metadata tag accepted, in characters, and most tags per registration.
MAX_NAME_LENGTH = 300
MAX_TAGS = 32
# Seconds after its last registration that an entry whose address refuses TCP connections is
# removed by a ppq name server (0 = never).
DEFAULT_PRUNE_AFTER = 30.0
# Seconds between two checks of the registered addresses.
PRUNE_INTERVAL = 2.0


class NameServerEntry:
    """A parsed ``PYRONAME:`` / ``PYROMETA:`` master address."""

    def __init__(self, address: str) -> None:
        kind, _, rest = address.partition(":")
        kind = kind.upper()
        if kind not in ("PYRONAME", "PYROMETA"):
            raise ConfigError(f"master address {address!r} is not a PYRONAME: or PYROMETA: address")
        key, sep, location = rest.rpartition("@")
        if not sep:
            key, location = rest, f"127.0.0.1:{DEFAULT_NAMESERVER_PORT}"
        self.host, self.port = parse_location(location, f"master address {address!r}")
        key = key.strip()
        if not key or len(key) > MAX_NAME_LENGTH:
            raise ConfigError(f"master address {address!r}: the name or tag is empty or too long")
        self.address = address
        self.kind = kind
        self.name = key if kind == "PYRONAME" else ""
        self.tags = [t.strip() for t in key.split(",") if t.strip()] if kind == "PYROMETA" else []

    @property
    def location(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def is_name_address(address: str) -> bool:
    return address.strip().upper().startswith(("PYRONAME:", "PYROMETA:"))


def parse_location(location: str, what: str) -> tuple[str, int]:
    """``host:port`` (``[v6]:port``) as (host, port); ConfigError naming ``what`` otherwise."""
    host, sep, port = location.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{what}: expected host:port of a name server, got {location!r}")
    return host, int(port)


def nameserver_uri(host: str, port: int) -> str:
    host = f"[{host}]" if ":" in host else host
    return f"PYRO:{NAMESERVER_OBJECT}@{host}:{port}"


def _call(proxy: Any, method: str, *args: Any, **kwargs: Any) -> Any:
    """One call on a name server proxy; its reply is refused unread past MAX_LOOKUP_REPLY bytes."""
    if proxy._pyroConnection is None:
        proxy._pyroBind()
    result = _direct_call(proxy, method, args, kwargs, max_reply=MAX_LOOKUP_REPLY)
    if result is _MISSING:  # pragma: no cover - every argument here is plain data
        result = getattr(proxy, method)(*args, **kwargs)
    return result


def _release(proxy: Any) -> None:
    try:
        proxy._pyroRelease()
    except Exception:  # noqa: BLE001 - a broken proxy may fail to close
        pass


def _uri_location(uri: str) -> tuple[str, int] | None:
    try:
        parsed = Pyro5.core.URI(uri)
    except (Pyro5.errors.PyroError, ValueError):
        return None
    if parsed.protocol != "PYRO" or not parsed.host or not parsed.port:
        return None
    return parsed.host, parsed.port


# -- finding masters -----------------------------------------------------------


def lookup(entry: NameServerEntry, token: str | None, timeout: float = LOOKUP_TIMEOUT) -> list[tuple[str, set[str]]]:
    """The (URI, metadata) pairs registered under ``entry``'s name (or with all its tags),
    at most MAX_FOUND, in random order. Raises Pyro5's CommunicationError when the name
    server does not answer within ``timeout`` or sends a reply larger than MAX_LOOKUP_REPLY."""
    proxy = make_proxy(nameserver_uri(entry.host, entry.port), token, timeout)
    try:
        if entry.kind == "PYRONAME":
            reply = _call(proxy, "list", prefix=entry.name, return_metadata=True)
        else:
            reply = _call(proxy, "yplookup", meta_all=entry.tags, return_metadata=True)
    except Pyro5.errors.ProtocolError as exc:
        raise Pyro5.errors.CommunicationError(f"name server {entry.location}: {exc}") from None
    finally:
        _release(proxy)
    found: list[tuple[str, set[str]]] = []
    if not isinstance(reply, Mapping):
        raise Pyro5.errors.CommunicationError(f"name server {entry.location} sent a {type(reply).__name__}, "
                                              f"not a mapping of names")
    for name, value in reply.items():
        if not isinstance(name, str) or name == NAMESERVER_OBJECT:
            continue
        if entry.kind == "PYRONAME" and name != entry.name and not name.startswith(entry.name + "."):
            continue
        if not isinstance(value, (list, tuple)) or len(value) != 2 or not isinstance(value[0], str):
            continue
        uri, tags = value
        if not uri.startswith("PYRO:") or len(uri) > MAX_NAME_LENGTH or _uri_location(uri) is None:
            continue
        metadata = {t for t in tags if isinstance(t, str)} if isinstance(tags, (list, tuple, set)) else set()
        found.append((uri, metadata))
        if len(found) >= MAX_FOUND:
            break
    random.shuffle(found)
    return found


def serves_queue(metadata: Iterable[str], queue_index: int) -> bool:
    """False only when the metadata lists a master's queue_indexes and ``queue_index`` is not one of them."""
    for tag in metadata:
        if tag.startswith(QUEUE_INDEXES_TAG):
            return str(queue_index) in tag[len(QUEUE_INDEXES_TAG):].split(",")
    return True


class Finder:
    """The masters behind one ``PYRONAME:`` / ``PYROMETA:`` entry, looked up at most every
    CACHE_SECONDS (sooner when :meth:`uris` is asked for ``fresh`` ones after a failure,
    but never twice within MIN_LOOKUP_GAP). A name server that does not answer leaves the
    last answer in use. Safe to share between threads."""

    def __init__(self, address: str, token: str | None, queue_index: int | None = None,
                 timeout: float = LOOKUP_TIMEOUT) -> None:
        self.entry = NameServerEntry(address)
        self.token = token
        self.queue_index = queue_index
        self.timeout = timeout
        self._uris: list[str] = []
        # Why the last lookup failed ('' after one that answered).
        self.problem = ""
        self._looked_up = float("-inf")
        self._lock = threading.Lock()
        self._failing = False

    def uris(self, fresh: bool = False) -> list[str]:
        """The masters' URIs, looked up again if the answer is old (or ``fresh`` is asked for). While
        one thread looks up, the others use the last answer, if there is one, instead of waiting."""
        if self._due(fresh) and self._lock.acquire(blocking=not self._uris):
            try:
                if self._due(fresh):
                    self._refresh()
            finally:
                self._lock.release()
        return list(self._uris)

    def _due(self, fresh: bool) -> bool:
        age = time.monotonic() - self._looked_up
        return age >= CACHE_SECONDS or (fresh and age >= MIN_LOOKUP_GAP)

    def _refresh(self) -> None:
        self._looked_up = time.monotonic()
        try:
            found = lookup(self.entry, self.token, self.timeout)
        except (Pyro5.errors.PyroError, OSError) as exc:
            self.problem = f"name server {self.entry.location} did not answer: {type(exc).__name__}: {exc}"
            if not self._failing:
                self._failing = True
                log.warning("name server %s did not answer (%s: %s); using the %d master(s) it named before",
                            self.entry.location, type(exc).__name__, exc, len(self._uris))
            return
        self.problem = ""
        if self._failing:
            self._failing = False
            log.info("name server %s answers again", self.entry.location)
        uris = [uri for uri, metadata in found
                if self.queue_index is None or serves_queue(metadata, self.queue_index)]
        if set(uris) != set(self._uris):
            log.debug("%s: %d master(s): %s", self.entry.address, len(uris), ", ".join(uris))
        self._uris = uris


# -- registering a master ------------------------------------------------------


def master_name(base: str, host: str, port: int | str) -> str:
    """The name a master registers under: ``<base>.<host>_<port>``."""
    return f"{base}.{host.strip('[]').replace(':', '-')}_{port}"


def reachable_host(bind_host: str, ns_host: str, ns_port: int) -> str:
    """The address others reach a server bound to ``bind_host`` at: itself, or, for a wildcard
    bind, this machine's address on the way to the name server."""
    if bind_host not in ("", "0.0.0.0", "::", "*"):
        return bind_host
    family = socket.AF_INET6 if ":" in ns_host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            probe.connect((ns_host, ns_port))
            return str(probe.getsockname()[0])
    except OSError:
        return socket.gethostname()


class Registration:
    """Keep ``name`` -> ``uri`` registered in the name server at ``location`` (host:port):
    registered every REFRESH_INTERVAL seconds (so again soon after the name server
    restarts), removed by :meth:`stop`."""

    def __init__(self, location: str, name: str, uri: str, metadata: Iterable[str], token: str | None,
                 interval: float = REFRESH_INTERVAL) -> None:
        self.host, self.port = parse_location(location, "master.nameserver")
        self.location = location
        self.name = name
        self.uri = uri
        self.metadata = sorted(metadata)
        self.token = token
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.registered = threading.Event()
        self._warned = False

    def _proxy(self) -> Any:
        return make_proxy(nameserver_uri(self.host, self.port), self.token, LOOKUP_TIMEOUT)

    def register_once(self) -> bool:
        proxy = self._proxy()
        try:
            _call(proxy, "register", self.name, self.uri, False, self.metadata)
        except (Pyro5.errors.CommunicationError, OSError) as exc:
            if self.registered.is_set() or not self._warned:
                self._warned = True
                log.warning("cannot register %s with the name server %s (%s: %s); trying again every %gs",
                            self.name, self.location, type(exc).__name__, exc, self.interval)
            self.registered.clear()
            return False
        except Exception as exc:  # noqa: BLE001 - the name server refused it (NamingError, our limits...)
            log.warning("the name server %s refused %s: %s", self.location, self.name, exc)
            self.registered.clear()
            return False
        finally:
            _release(proxy)
        if not self.registered.is_set():
            log.info("registered as %s with the name server %s (%s)", self.name, self.location,
                     ", ".join(self.metadata))
            self.registered.set()
        return True

    def start(self) -> Registration:
        self.register_once()
        self._thread = threading.Thread(target=self._run, name="ppq-nameserver-registration", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.register_once()

    def stop(self) -> None:
        """Stop refreshing and remove the registration (if the name server answers)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(LOOKUP_TIMEOUT + 1)
        proxy = self._proxy()
        try:
            _call(proxy, "remove", self.name)
            log.info("unregistered %s from the name server %s", self.name, self.location)
        except Exception as exc:  # noqa: BLE001 - stopping goes on: the entry is pruned later
            log.warning("could not unregister %s from the name server %s: %s", self.name, self.location, exc)
        finally:
            _release(proxy)


# -- serving a name server ----------------------------------------------------


@expose
class BoundedNameServer(Pyro5.nameserver.NameServer):
    """Pyro5's name server with limits: names, URIs and tags of at most MAX_NAME_LENGTH
    characters, at most MAX_TAGS tags, MAX_NAMES registrations. Only connections that
    authenticated with ``auth_token`` (or all, when it has no tokens) may change entries:
    one holding the worker or the client token may only look names up (else it could point
    the others at a master of its own and collect their tokens)."""

    def __init__(self) -> None:
        super().__init__()
        # name -> when it was last registered (monotonic seconds), for the Pruner.
        self.refreshed: dict[str, float] = {}

    def _may_change(self) -> None:
        if caller_role() != ALL:
            raise PermissionError(f"the {caller_role()} token may look names up, not change them: "
                                  f"registering needs auth_token")

    def register(self, name: Any, uri: Any, safe: bool = False, metadata: Any = None) -> None:
        self._may_change()
        uri = str(uri) if isinstance(uri, Pyro5.core.URI) else uri
        if not isinstance(name, str) or not isinstance(uri, str):
            raise TypeError("name and uri must be strings")
        if len(name) > MAX_NAME_LENGTH or len(uri) > MAX_NAME_LENGTH:
            raise ValueError(f"a name or URI is longer than {MAX_NAME_LENGTH} characters")
        self._check_tags(metadata)
        with self.lock:
            if name not in self.storage and len(self.storage) >= MAX_NAMES:
                raise Pyro5.errors.NamingError(f"the name server holds {MAX_NAMES} names already")
            super().register(name, uri, safe, metadata)
            self.refreshed[name] = time.monotonic()

    def set_metadata(self, name: Any, metadata: Any) -> None:
        self._may_change()
        self._check_tags(metadata)
        super().set_metadata(name, metadata)

    def remove(self, name: Any = None, prefix: Any = None, regex: Any = None) -> int:
        self._may_change()
        return int(super().remove(name, prefix, regex))

    @staticmethod
    def _check_tags(metadata: Any) -> None:
        if metadata is None:
            return
        if isinstance(metadata, str) or not isinstance(metadata, (list, tuple, set, frozenset)):
            raise TypeError("metadata must be a list or set of strings")
        if len(metadata) > MAX_TAGS:
            raise ValueError(f"more than {MAX_TAGS} metadata tags")
        for tag in metadata:
            if not isinstance(tag, str) or len(tag) > MAX_NAME_LENGTH:
                raise ValueError(f"a metadata tag is not a string of at most {MAX_NAME_LENGTH} characters")


class Pruner:
    """Remove the registrations that were not registered again for ``after`` seconds and whose
    address refuses a TCP connection (a ppq master registers again every REFRESH_INTERVAL:
    its address is only probed once it stops)."""

    def __init__(self, nameserver: BoundedNameServer, after: float, interval: float = PRUNE_INTERVAL) -> None:
        self.nameserver = nameserver
        self.after = after
        self.interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ppq-nameserver-pruner", daemon=True)

    def start(self) -> Pruner:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.prune_once()
            except Exception:  # noqa: BLE001 - the next round tries again
                log.exception("pruning the name server's entries failed")

    def prune_once(self) -> list[str]:
        now = time.monotonic()
        ns = self.nameserver
        with ns.lock:
            entries = {name: uri for name, (uri, _) in ns.storage.items()
                       if name != NAMESERVER_OBJECT and now - ns.refreshed.setdefault(name, now) >= self.after}
        removed = []
        for name, uri in entries.items():
            location = _uri_location(uri)
            if location is None:
                continue
            try:
                socket.create_connection(location, timeout=1.0).close()
            except OSError:
                with ns.lock:
                    current = ns.storage.get(name)
                    if current is not None and current[0] == uri and now - ns.refreshed.get(name, now) >= self.after:
                        del ns.storage[name]
                        ns.refreshed.pop(name, None)
                        removed.append(name)
                        log.info("removed %s (%s): not registered again for %.0fs and unreachable", name, uri,
                                 self.after)
        return removed


class NameServerProcess:
    """A running name server: the daemon, its object, the pruner."""

    def __init__(self, host: str, port: int, tokens: Mapping[str, str] | None = None,
                 ssl_context: ssl.SSLContext | None = None, max_message: int = 1024 * 1024,
                 prune_after: float = DEFAULT_PRUNE_AFTER) -> None:
        self.daemon = Daemon(host, port, tokens, 256, max_message, ssl_context)
        self.nameserver = BoundedNameServer()
        self.uri = str(self.daemon.register(self.nameserver, objectId=NAMESERVER_OBJECT))
        Pyro5.nameserver.NameServer.register(self.nameserver, NAMESERVER_OBJECT, self.uri,
                                             metadata={"class:Pyro5.nameserver.NameServer"})
        self.location = self.daemon.locationStr
        self.pruner = Pruner(self.nameserver, prune_after) if prune_after > 0 else None
        self._thread: threading.Thread | None = None

    def start(self) -> NameServerProcess:
        from .server import serve_in_thread

        self._thread = serve_in_thread(self.daemon, "ppq-nameserver")
        if self.pruner is not None:
            self.pruner.start()
        return self

    def stop(self) -> None:
        if self.pruner is not None:
            self.pruner.stop()
        self.daemon.shutdown()
        if self._thread is not None:
            self._thread.join(10)
