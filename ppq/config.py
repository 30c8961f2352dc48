"""Typed, frozen settings and the one loader that builds them.

Precedence, highest first: command-line flags, ``PPQ_*`` environment variables,
the YAML file, the defaults below. Environment variables are named after the key:
``PPQ_AUTH_TOKEN``, ``PPQ_MASTER_PORT``, ``PPQ_WORKER_QUEUE_INDEX``... and their
values are read as YAML scalars (``PPQ_WORKER_CONCURRENCY=4`` is an int).

Every key is documented in ``config.example.yaml``; an unknown key, a wrong type
or a value out of range raises :class:`~ppq.errors.ConfigError` naming the key.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import ConfigError
from .targets import redis_url

log = logging.getLogger("ppq.config")

# Port of the master's Pyro5 daemon.
DEFAULT_MASTER_PORT = 7600
# Port of a worker's control object; 0 picks a free port.
DEFAULT_WORKER_PORT = 7620
# Seconds a handed-out task stays leased without a heartbeat.
DEFAULT_LEASE_TIMEOUT = 60.0
# Seconds a task may run before its executor is killed.
DEFAULT_TASK_TIMEOUT = 300.0
# Largest encoded (args, kwargs) or result, in bytes.
DEFAULT_MAX_PAYLOAD = 1024 * 1024
# Seconds a finished task's record and result are kept.
DEFAULT_RESULT_TTL = 86400
# Worker ids one queue_index lists at once; a new id beyond them is refused.
DEFAULT_MAX_WORKERS = 10000
# Largest stored worker_info entry, in bytes (its list of running tasks is cut to fit).
DEFAULT_MAX_WORKER_INFO = 4096
# Largest RPC message a master or worker reads, in bytes; one push_tasks call's tasks
# together must fit in it too.
DEFAULT_MAX_MESSAGE = 16 * 1024 * 1024
# Task ids one wait_tasks / get_tasks_info call looks up (and dead tasks one dead_tasks lists).
DEFAULT_MAX_LOOKUP = 1000
# Most leaf tasks one workflow (chain, group, chord) may hold.
DEFAULT_MAX_WORKFLOW_TASKS = 100_000
# Longest a worker stays listed after it was last heard from, in seconds.
DEFAULT_WORKER_TTL = 300.0
# Seconds WAIT (redis.wait_replicas) gives the replicas to confirm a write.
DEFAULT_WAIT_TIMEOUT = 1.0
# Name masters register under in a name server (each as "<name>.<host>_<port>").
DEFAULT_NAMESERVER_NAME = "ppq.master"
# Port of the web dashboard (`ppq dashboard`, and the one `ppq up` starts); 0 picks a free port.
DEFAULT_DASHBOARD_PORT = 7680


@dataclass(frozen=True)
class TLSConfig:
    enabled: bool = False
    certfile: str = ""
    keyfile: str = ""
    cafile: str = ""
    require_client_cert: bool = False
    client_certfile: str = ""
    client_keyfile: str = ""


@dataclass(frozen=True)
class LimitsConfig:
    max_payload: int = DEFAULT_MAX_PAYLOAD
    max_batch: int = 10000
    max_name_length: int = 200
    max_key_length: int = 512
    max_delay: float = 365 * 86400.0
    max_retry: int = 100
    max_timeout: float = 7 * 86400.0
    max_result_ttl: int = 365 * 86400
    max_workers: int = DEFAULT_MAX_WORKERS
    max_worker_info: int = DEFAULT_MAX_WORKER_INFO
    max_message: int = DEFAULT_MAX_MESSAGE
    max_lookup: int = DEFAULT_MAX_LOOKUP
    max_workflow_tasks: int = DEFAULT_MAX_WORKFLOW_TASKS


@dataclass(frozen=True)
class MasterConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_MASTER_PORT
    redis_map: dict[int, str] = field(default_factory=dict)
    data_dir: str = ""
    appendfsync: str = "everysec"
    lease_timeout: float = DEFAULT_LEASE_TIMEOUT
    max_lease_expiries: int = 10
    reaper_interval: float = 1.0
    result_ttl: int = DEFAULT_RESULT_TTL
    redis_timeout: float = 2.0
    threadpool_size: int = 4000
    allow_pickle: bool = False
    insecure: bool = False
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"
    worker_ttl: float = DEFAULT_WORKER_TTL
    schedule_modules: list[str] = field(default_factory=list)
    nameserver: str = ""
    nameserver_name: str = DEFAULT_NAMESERVER_NAME
    max_waiters: int = 20_000


@dataclass(frozen=True)
class WorkerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_WORKER_PORT
    master_hosts: list[str] = field(default_factory=list)
    nameserver: str = ""
    queue_index: int = 0
    concurrency: int = 0
    pool: str = "processes"
    max_sleep: float = 240.0
    task_timeout: float = DEFAULT_TASK_TIMEOUT
    heartbeat_interval: float = 10.0
    prefetch: int = -1
    allowed_modules: list[str] = field(default_factory=list)
    allowed_paths: list[str] = field(default_factory=list)
    autodiscover: list[str] = field(default_factory=list)
    allow_pickle: bool = False
    insecure: bool = False
    metrics_port: int = 0
    metrics_host: str = "127.0.0.1"


@dataclass(frozen=True)
class ClientConfig:
    masters: list[str] = field(default_factory=list)
    nameserver: str = ""
    retry: int = 3
    timeout: float = 10.0
    allow_pickle: bool = False


@dataclass(frozen=True)
class DashboardConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_DASHBOARD_PORT
    read_only: bool = False


@dataclass(frozen=True)
class RedisConfig:
    wait_replicas: int = 0
    wait_timeout: float = DEFAULT_WAIT_TIMEOUT


@dataclass(frozen=True)
class Config:
    auth_token: str | None = None
    worker_token: str | None = None
    client_token: str | None = None
    log_level: str = "INFO"
    log_format: str = "text"
    master: MasterConfig = field(default_factory=MasterConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    tls: TLSConfig = field(default_factory=TLSConfig)
    dashboard: DashboardConfig = field(default_factory=DashboardConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    schedules: list[dict[str, Any]] = field(default_factory=list)
    rate_limits: dict[str, str] = field(default_factory=dict)
    concurrency_limits: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # An empty worker.master_hosts means this config's own master; the derived
        # list is marked, so that a copy with another master port derives it again.
        worker = self.worker
        derived = getattr(worker, "_derived_from", None)
        if not worker.master_hosts or (derived is not None and derived != self.own_master()):
            worker = dataclasses.replace(worker, master_hosts=[self.own_master()])
            object.__setattr__(worker, "_derived_from", self.own_master())
            object.__setattr__(self, "worker", worker)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Config:
        """A config from the seed's dotted settings, checked like the YAML file.

        ``Config.from_settings({"master.port": 7600, "master.redis_map": {0: ["127.0.0.1", 6379, 0]}})``.
        Keys are dotted (``"worker.master_hosts"``) or nested (``{"worker": {...}}``);
        a bad key or value raises :class:`ConfigError` naming it. ``PPQ_*``
        variables are read only when ``environ`` is given (``os.environ``, say), and
        then override the settings as they override the YAML file.
        """
        if not isinstance(settings, Mapping):
            raise ConfigError(f"settings: expected a mapping of dotted keys, got {type(settings).__name__}")
        for name in settings:
            if not isinstance(name, str):
                raise ConfigError(f"settings: key {name!r} is not a string")
        data: dict[str, Any] = {}
        _merge(data, {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in settings.items()})
        if environ is not None:
            _merge(data, env_overrides(environ))
        return _build(cls, data, "")

    def own_master(self) -> str:
        """The address of this config's master, as a client reaches it: ``master.host:master.port``,
        with a wildcard bind (``0.0.0.0``, ``::`` or empty) reached on loopback."""
        return connect_address(self.master.host, self.master.port)

    @property
    def worker_secret(self) -> str | None:
        """The token a worker agent sends: ``worker_token``, else ``auth_token``."""
        return self.worker_token or self.auth_token

    @property
    def client_secret(self) -> str | None:
        """The token a client sends: ``client_token``, else ``auth_token``."""
        return self.client_token or self.auth_token

    @property
    def any_token(self) -> bool:
        """True if connections must present a token."""
        return bool(self.auth_token or self.worker_token or self.client_token)

    def client_masters(self) -> list[str]:
        """The master addresses a client uses: ``client.masters`` and the masters registered with
        ``client.nameserver``; else those of a worker (:meth:`worker_masters`)."""
        if self.client.masters or self.client.nameserver:
            return [*self.client.masters, *self._registered(self.client.nameserver)]
        return self.worker_masters()

    def worker_masters(self) -> list[str]:
        """The master addresses a worker uses: ``worker.master_hosts`` and the masters registered
        with ``worker.nameserver``; with neither, this config's own master."""
        if not self.worker.nameserver:
            return list(self.worker.master_hosts)
        given = [] if getattr(self.worker, "_derived_from", None) is not None else list(self.worker.master_hosts)
        return [*given, *self._registered(self.worker.nameserver)]

    def _registered(self, nameserver: str) -> list[str]:
        """The address that stands for every master registered with ``nameserver`` (host:port)."""
        return [f"PYRONAME:{self.master.nameserver_name}@{nameserver}"] if nameserver else []


def connect_address(host: str, port: int) -> str:
    """``host:port`` to connect to a server bound to ``host``: a wildcard bind is reached on loopback."""
    host = (host or "").strip()
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


_SECTIONS = {
    "master": MasterConfig,
    "worker": WorkerConfig,
    "client": ClientConfig,
    "limits": LimitsConfig,
    "tls": TLSConfig,
    "dashboard": DashboardConfig,
    "redis": RedisConfig,
}
_TOKENS = ("auth_token", "worker_token", "client_token")
_CHOICES = {
    "log_level": ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
    "log_format": ("text", "json"),
    "worker.pool": ("processes", "threads"),
    "master.appendfsync": ("always", "everysec", "no"),
}
_NON_NEGATIVE = {
    "master.port", "worker.port", "worker.concurrency", "worker.queue_index",
    "master.metrics_port", "worker.metrics_port", "dashboard.port", "redis.wait_replicas",
}
_POSITIVE = {
    "master.lease_timeout", "master.reaper_interval", "master.redis_timeout", "master.threadpool_size",
    "master.max_lease_expiries", "master.result_ttl", "worker.max_sleep", "worker.task_timeout",
    "worker.heartbeat_interval", "client.retry", "client.timeout", "limits.max_payload", "limits.max_batch",
    "limits.max_name_length", "limits.max_key_length", "limits.max_delay", "limits.max_timeout",
    "limits.max_result_ttl", "limits.max_message", "limits.max_workers", "master.worker_ttl", "limits.max_lookup",
    "limits.max_workflow_tasks", "redis.wait_timeout", "master.max_waiters",
}
# Keys with a floor above zero: key -> the smallest value accepted.
_AT_LEAST = {"limits.max_worker_info": 1024, "limits.max_message": 65536}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp)).replace("NoneType", "null")


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check ``value`` against the annotated type ``tp``; return it converted."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        inner = [t for t in options if t is not type(None)]
        return _coerce(key, value, inner[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key in _TOKENS:
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_coerce(f"{key}[{i}]", v, item_tp) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")  # pragma: no cover


def _redis_map(value: Mapping[Any, Any]) -> dict[int, str]:
    result: dict[int, str] = {}
    for raw_index, target in value.items():
        try:
            index = int(raw_index)
        except (TypeError, ValueError):
            raise ConfigError(f"master.redis_map: queue_index {raw_index!r} is not an integer") from None
        if index < 0:
            raise ConfigError(f"master.redis_map: queue_index {index} is negative")
        result[index] = redis_url(f"master.redis_map[{index}]", target)
    return result


def _build(cls: type, data: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        key = f"{prefix}{name}"
        if name not in names:
            import difflib

            close = difflib.get_close_matches(str(name), sorted(names), 1, 0.75)
            hint = f" (did you mean {prefix}{close[0]!s}?)" if close else ""
            raise ConfigError(f"unknown config key {key!r}{hint}")
        if name in _SECTIONS and not prefix:
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"{key}: expected a mapping, got {value!r}")
            kwargs[name] = _build(_SECTIONS[name], value, f"{key}.")
            continue
        if key in ("rate_limits", "concurrency_limits"):
            from .limits import check_config_limits

            kwargs[name] = check_config_limits(key, value)
            continue
        value = _coerce(key, value, hints[name])
        if key == "master.redis_map":
            value = _redis_map(value)
        if key == "schedules":
            from .schedules import check_config_schedules

            value = check_config_schedules(value)
        if key in _CHOICES:
            value = value.upper() if key == "log_level" else value
            if value not in _CHOICES[key]:
                raise ConfigError(f"{key}: expected one of {', '.join(_CHOICES[key])}, got {value!r}")
        if key in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value!r}")
        if key in _POSITIVE and value <= 0:
            raise ConfigError(f"{key}: must be greater than 0, got {value!r}")
        if key in _AT_LEAST and value < _AT_LEAST[key]:
            raise ConfigError(f"{key}: must be at least {_AT_LEAST[key]}, got {value!r}")
        if key == "worker.prefetch" and value < -1:
            raise ConfigError(f"{key}: must be -1 (automatic), 0 or more, got {value!r}")
        if key in ("master.port", "worker.port", "dashboard.port") and value > 65535:
            raise ConfigError(f"{key}: not a port number: {value!r}")
        if key in ("master.nameserver", "worker.nameserver", "client.nameserver") and value:
            value = _nameserver_address(key, value)
        if key == "master.nameserver_name" and (not value or any(c in value for c in "@:, \t\n")):
            raise ConfigError(f"{key}: expected a dotted name such as ppq.master (no '@', ':', ',' or spaces), "
                              f"got {value!r}")
        if key == "dashboard.host" and not value.strip():
            raise ConfigError(f"{key}: expected an address to bind (127.0.0.1, or 0.0.0.0 for every "
                              f"interface), got an empty string")
        kwargs[name] = value
    return cls(**kwargs)


def _nameserver_address(key: str, value: str) -> str:
    """A name server's ``host:port`` (``[v6]:port``), checked."""
    value = value.strip()
    host, sep, port = value.rpartition(":")
    if not sep or not host.strip("[]") or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"{key}: expected host:port of a name server, got {value!r}")
    return value


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> None:
    """Merge a dotted-key mapping (``{"master.port": 1}``) into nested ``base``."""
    for dotted, value in extra.items():
        parts = dotted.split(".")
        node = base
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        last = parts[-1]
        if len(parts) == 1 and last in _SECTIONS and isinstance(value, Mapping) and isinstance(node.get(last), dict):
            node[last].update(value)  # a whole section after some of its dotted keys
        else:
            node[last] = value


def env_overrides(environ: Mapping[str, str]) -> dict[str, Any]:
    """The dotted keys set by ``PPQ_*`` variables.

    An unknown ``PPQ_*`` name close to a known one (``PPQ_MASTER_PROT``) is an
    error that names the known one; any other unknown ``PPQ_*`` name is logged
    once as a warning and ignored.
    """
    known: dict[str, str] = {}
    for f in dataclasses.fields(Config):
        if f.name in _SECTIONS:
            for sub in dataclasses.fields(_SECTIONS[f.name]):
                known[f"PPQ_{f.name}_{sub.name}".upper()] = f"{f.name}.{sub.name}"
        else:
            known[f"PPQ_{f.name}".upper()] = f.name
    result: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith("PPQ_") or name in _IGNORED_ENV:
            continue
        if name not in known:
            _unknown_env(name, [*known, *_IGNORED_ENV])
            continue
        key = known[name]
        if key in _TOKENS:
            result[key] = raw
            continue
        import yaml

        try:
            result[key] = yaml.safe_load(raw) if raw != "" else None
        except yaml.YAMLError:
            result[key] = raw
    return result


# PPQ_* variables that are not config keys.
_IGNORED_ENV = {"PPQ_CONFIG"}
# How alike (difflib ratio) an unknown PPQ_* name and a known one must be for the
# unknown one to count as a typo of it, and so to stop the command.
_TYPO_RATIO = 0.85
# Unknown PPQ_* names already warned about in this process.
_warned_env: set[str] = set()


def _unknown_env(name: str, known: list[str]) -> None:
    """A typo of a known variable is an error naming the right one; anything else is warned about once."""
    import difflib

    close = difflib.get_close_matches(name, known, 1, _TYPO_RATIO)
    if close:
        raise ConfigError(f"unknown environment variable {name}: did you mean {close[0]}?")
    if name not in _warned_env:
        _warned_env.add(name)
        near = difflib.get_close_matches(name, known, 1, 0.7)
        hint = f" (did you mean {near[0]}?)" if near else ""
        log.warning("ignoring environment variable %s: not a ppq setting%s", name, hint)


def read_yaml(path: str) -> dict[str, Any]:
    """Read a YAML config file into a dict, with errors that name the file."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


def load_config(
    path: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    settings: Mapping[str, Any] | None = None,
) -> Config:
    """Build a :class:`Config` from defaults, a YAML file, ``PPQ_*`` env and overrides.

    With no ``path``, the file named by ``PPQ_CONFIG`` is read, if set.
    ``overrides`` holds dotted keys (``{"master.port": 7601}``) from command-line
    flags; a None value means "not given" and is skipped. ``settings`` is read as
    the YAML file is (Django's ``settings.PPQ``, say), over the file's keys and
    under the ``PPQ_*`` variables.
    """
    env = os.environ if environ is None else environ
    path = path or env.get("PPQ_CONFIG") or None
    data: dict[str, Any] = read_yaml(path) if path else {}
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
    if settings:
        _merge(data, {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in settings.items()})
    _merge(data, env_overrides(env))
    _merge(data, {k: v for k, v in (overrides or {}).items() if v is not None})
    return _build(Config, data, "")


def to_dict(config: Config) -> dict[str, Any]:
    """The config as plain data, as it would be written in YAML."""
    return dataclasses.asdict(config)
