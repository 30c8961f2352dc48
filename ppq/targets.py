"""Where a queue_index's Redis is: a ``master.redis_map`` entry read and checked.

An entry is a plain ``redis://`` (or ``rediss://``, ``unix://``) URL, a primary found through
Redis Sentinel (``redis+sentinel://``), or a Redis Cluster (``redis+cluster://``), each also
accepted as a mapping or a ``[host, port, db]`` list (:func:`redis_url` turns those into the
URL). :func:`redis_target` reads a URL into a :class:`RedisTarget` for the store's link.
A bad entry raises :class:`~ppq.errors.ConfigError` naming its key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlparse

from .errors import ConfigError

# Port a Redis Sentinel listens on when a redis+sentinel:// URL names none.
DEFAULT_SENTINEL_PORT = 26379
# Port a Redis Cluster node listens on when a redis+cluster:// URL names none.
DEFAULT_REDIS_PORT = 6379


@dataclass(frozen=True)
class RedisTarget:
    """Where one ``redis_map`` entry's Redis is, as :func:`redis_target` reads its URL.

    ``kind`` is ``"redis"`` (one server: ``url`` as given), ``"sentinel"`` (``nodes`` are the
    sentinels, ``service`` the name they know the primary by, ``db`` its database) or
    ``"cluster"`` (``nodes`` are some of the cluster's nodes; ``db`` is 0). ``password`` (and
    ``username``) are the Redis's own; ``sentinel_password`` is the sentinels'.
    """

    kind: str
    url: str
    nodes: tuple[tuple[str, int], ...] = ()
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None


def _node(text: str, default_port: int) -> tuple[str, int]:
    """``host``, ``host:port`` or ``[v6]:port`` as (host, port); ValueError if it is none of these."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ("" if not rest else "x")
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host, port = text, ""
    if not host or (port and not port.isdigit()) or (port and not 0 < int(port) < 65536):
        raise ValueError(f"bad host:port {text!r}")
    return host, int(port) if port else default_port


def redis_target(url: str) -> RedisTarget:
    """Read a ``redis_map`` URL: ``redis://`` (and ``rediss://``, ``unix://``) as given,
    ``redis+sentinel://[[user]:password@]h1:26379,h2:26379/service[/db][?sentinel_password=...]``
    or ``redis+cluster://[[user]:password@]h1:6379,h2:6379[/]``. ValueError says what is wrong."""
    scheme, sep, rest = url.partition("://")
    if scheme not in ("redis+sentinel", "redis+cluster") or not sep:
        return RedisTarget("redis", url)
    rest, _, query = rest.partition("?")
    netloc, _, path = rest.partition("/")
    auth, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, secret = auth.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if colon else unquote(user)
        if not colon:
            username = None
    if not hosts:
        raise ValueError(f"no host in {scheme}:// URL")
    sentinel = scheme == "redis+sentinel"
    nodes = tuple(_node(h, DEFAULT_SENTINEL_PORT if sentinel else DEFAULT_REDIS_PORT) for h in hosts.split(","))
    options = parse_qs(query, keep_blank_values=True)
    allowed = {"sentinel_password"} if sentinel else set()
    for name in options:
        if name not in allowed:
            raise ValueError(f"unknown option {name!r} in {scheme}:// URL")
    parts = [unquote(part) for part in path.split("/") if part]
    if sentinel:
        if not parts or len(parts) > 2:
            raise ValueError("expected redis+sentinel://host:port,.../service/db (the service name is missing)")
        if len(parts) == 2 and not parts[1].isdigit():
            raise ValueError(f"db must be an integer, got {parts[1]!r}")
        return RedisTarget("sentinel", url, nodes, parts[0], int(parts[1]) if len(parts) == 2 else 0,
                           username, password, options.get("sentinel_password", [None])[0])
    if parts not in ([], ["0"]):
        raise ValueError("a Redis Cluster has only db 0: expected redis+cluster://host:port,.../")
    return RedisTarget("cluster", url, nodes, "", 0, username, password)


def _nodes_of(key: str, value: Any) -> str:
    """A list of [host, port] pairs (or "host:port" strings) as ``h1:p1,h2:p2``."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{key}: expected a list of [host, port] pairs, got {value!r}")
    out = []
    for i, node in enumerate(value):
        if isinstance(node, str):
            out.append(node)
            continue
        if (not isinstance(node, (list, tuple)) or len(node) != 2 or not isinstance(node[0], str)
                or not isinstance(node[1], int) or isinstance(node[1], bool)):
            raise ConfigError(f"{key}[{i}]: expected [host, port], got {node!r}")
        host = f"[{node[0]}]" if ":" in node[0] else node[0]
        out.append(f"{host}:{node[1]}")
    return ",".join(out)


def _auth_of(value: Mapping[str, Any], key: str) -> str:
    for name in ("username", "password", "sentinel_password"):
        if value.get(name) is not None and not isinstance(value[name], str):
            raise ConfigError(f"{key}.{name}: expected a string, got {value[name]!r}")
    if not value.get("password"):
        return ""
    return f"{quote(value.get('username') or '', safe='')}:{quote(value['password'], safe='')}@"


def _multi_node_url(key: str, value: Mapping[str, Any]) -> str:
    """The URL of a ``{sentinels: ...}`` or ``{cluster: ...}`` entry."""
    sentinel = "sentinels" in value
    known = ({"sentinels", "service", "db", "password", "username", "sentinel_password"} if sentinel
             else {"cluster", "password", "username"})
    unknown = set(value) - known
    if unknown:
        raise ConfigError(f"{key}: unknown key {sorted(map(str, unknown))[0]!r} (expected {', '.join(sorted(known))})")
    auth = _auth_of(value, key)
    if not sentinel:
        return f"redis+cluster://{auth}{_nodes_of(f'{key}.cluster', value['cluster'])}/"
    service, db = value.get("service"), value.get("db", 0)
    if not isinstance(service, str) or not service.strip() or "/" in service:
        raise ConfigError(f"{key}.service: expected the name the sentinels know the primary by, got {service!r}")
    if not isinstance(db, int) or isinstance(db, bool) or db < 0:
        raise ConfigError(f"{key}.db: expected an integer of 0 or more, got {db!r}")
    url = f"redis+sentinel://{auth}{_nodes_of(f'{key}.sentinels', value['sentinels'])}/{quote(service)}/{db}"
    if value.get("sentinel_password"):
        url += "?sentinel_password=" + quote(value["sentinel_password"], safe="")
    return url


def redis_url(key: str, value: Any) -> str:
    """Normalise one ``redis_map`` entry to a URL: a URL (``redis://``, ``rediss://``, ``unix://``,
    ``redis+sentinel://``, ``redis+cluster://``), ``{host, port, db, password}``, ``{sentinels,
    service, db, password, sentinel_password}``, ``{cluster, password}``, or the seed's
    ``[host, port, db]`` list (or tuple)."""
    if isinstance(value, Mapping) and ("sentinels" in value or "cluster" in value):
        value = _multi_node_url(key, value)
    if isinstance(value, str):
        if value.startswith(("redis+sentinel://", "redis+cluster://")):
            try:
                redis_target(value)
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from None
            return value
        parsed = urlparse(value)
        if parsed.scheme not in ("redis", "rediss", "unix") or not (parsed.hostname or parsed.path):
            raise ConfigError(f"{key}: expected a redis://, redis+sentinel:// or redis+cluster:// URL, "
                              f"got {value!r}")
        try:
            parsed.port  # noqa: B018 - raises on a bad port
        except ValueError:
            raise ConfigError(f"{key}: bad port in {value!r}") from None
        return value
    if isinstance(value, (list, tuple)):
        # The seed's form: (host, port, db), optionally with a password.
        if not 2 <= len(value) <= 4:
            raise ConfigError(f"{key}: expected [host, port, db] (or [host, port, db, password]), got {value!r}")
        value = dict(zip(("host", "port", "db", "password"), value, strict=False))
    if isinstance(value, Mapping):
        unknown = set(value) - {"host", "port", "db", "password", "username"}
        if unknown:
            raise ConfigError(f"{key}: unknown key {sorted(unknown)[0]!r} (expected host, port, db, password; "
                              f"or sentinels, service; or cluster)")
        host = value.get("host", "127.0.0.1")
        port = value.get("port", 6379)
        db = value.get("db", 0)
        if not isinstance(host, str) or not isinstance(port, int) or not isinstance(db, int):
            raise ConfigError(f"{key}: host must be a string, port and db integers")
        auth = ""
        if value.get("password"):
            auth = f"{value.get('username', '')}:{value['password']}@"
        return f"redis://{auth}{host}:{port}/{db}"
    raise ConfigError(f"{key}: expected a redis:// URL, a mapping or [host, port, db], got {value!r}")
