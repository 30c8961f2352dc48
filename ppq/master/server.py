"""Running a master: its stores, its Pyro5 daemon, signals and shutdown.

:class:`MasterServer` opens the stores (or starts an embedded redis-server), builds
the daemon around a :class:`~ppq.master.exposed.Master`, serves it in a thread and
stops it all; :func:`serve` runs one until it is told to stop, for ``ppq master``
and ``ppq.Master(...).serve()``.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable

from .. import rpc
from ..config import Config
from ..embedded import RedisServer, default_data_dir
from ..errors import ConfigError, StorageError
from ..store import Store
from .exposed import Master

log = logging.getLogger("ppq.master")

# Oldest Redis the scripts run on (LPOP with a count).
MIN_REDIS = (6, 2)
# Seconds a master starting during a failover (Sentinel, Cluster) waits for a primary to answer.
FAILOVER_WAIT = 20.0


def open_stores(config: Config, announce: int = logging.INFO) -> tuple[dict[int, Store], RedisServer | None]:
    """Connect to each Redis of ``master.redis_map``, or start an embedded one (logged at ``announce``)."""
    m = config.master
    embedded = None
    redis_map = dict(m.redis_map)
    if not redis_map:
        data_dir = m.data_dir or default_data_dir(m.port)
        embedded = RedisServer(data_dir, appendfsync=m.appendfsync).start()
        log.log(announce, "embedded redis-server pid %s on %s, data in %s", embedded.process.pid if embedded.process
                else "?", embedded.url, embedded.data_dir)
        redis_map = {0: embedded.url}
    stores = {
        qi: Store(qi, url, timeout=m.redis_timeout, lease_timeout=m.lease_timeout,
                  max_lease_expiries=m.max_lease_expiries, result_ttl=m.result_ttl,
                  max_workers=config.limits.max_workers, wait_replicas=config.redis.wait_replicas,
                  wait_timeout=config.redis.wait_timeout)
        for qi, url in redis_map.items()
    }
    for qi, store in stores.items():
        try:
            version = _first_answer(store)
        except StorageError as exc:
            problem = f"cannot reach {store.safe_url}: {exc}"
        else:
            if version >= MIN_REDIS:
                continue
            problem = (f"{store.safe_url} runs Redis {'.'.join(map(str, version))}; ppq needs "
                       f"{'.'.join(map(str, MIN_REDIS))} or later")
        for opened in stores.values():
            opened.close()
        if embedded is not None:
            embedded.stop()
        raise ConfigError(f"master.redis_map[{qi}]: {problem}")
    return stores, embedded


def _first_answer(store: Store) -> tuple[int, ...]:
    """The Redis version of ``store``'s server. Behind Sentinel or in a cluster, a master started
    during a failover waits up to FAILOVER_WAIT seconds for a primary to be named; a plain
    Redis that does not answer is an error at once."""
    deadline = time.monotonic() + FAILOVER_WAIT
    said = False
    while True:
        try:
            return store.server_version()
        except StorageError as exc:
            if not store.follows_failover or time.monotonic() >= deadline:
                raise
            if not said:
                log.warning("queue_index %s: %s does not answer (%s); waiting up to %gs for a primary",
                            store.queue_index, store.safe_url, exc, FAILOVER_WAIT)
                said = True
            time.sleep(0.5)


def raise_open_files_limit() -> int:
    """Raise this process's open-files limit to its hard limit (one socket per connection)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or hard > soft:
            target = 1_048_576 if hard == resource.RLIM_INFINITY else hard
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            return target
        return soft
    except (ImportError, ValueError, OSError):
        return -1


class MasterServer:
    """A running master: stores, the exposed object and its Pyro5 daemon.

    Its start (the embedded redis-server, then ``master ready: URI``) is logged at
    ``announce``: INFO, or DEBUG where something else says it (``ppq up``'s banner).
    """

    def __init__(self, config: Config, announce: int = logging.INFO) -> None:
        m = config.master
        self.announce = announce
        limit = raise_open_files_limit()
        if 0 <= limit < m.threadpool_size + 64:
            log.warning("open-files limit is %s: fewer than master.threadpool_size (%s) connections will fit",
                        limit, m.threadpool_size)
        rpc.check_bind(m.host, config.any_token, m.insecure, "master.host")
        ssl_context = rpc.server_ssl_context(config.tls)
        self.config = config
        self.stores, self.embedded = open_stores(config, announce)
        self.master = Master(config, self.stores)
        try:
            self.daemon = rpc.Daemon(m.host, m.port, rpc.token_roles(config.auth_token, config.worker_token,
                                                                     config.client_token),
                                     m.threadpool_size, config.limits.max_message, ssl_context)
        except OSError as exc:
            self.close_stores()
            raise ConfigError(f"master.port: cannot listen on {m.host}:{m.port}: {exc.strerror or exc}") from None
        self.uri = str(self.daemon.register(self.master, objectId=rpc.MASTER_OBJECT))
        self.port = self.daemon.locationStr.rsplit(":", 1)[1]
        self._thread: threading.Thread | None = None
        self.registration: rpc.Registration | None = None

    def start(self) -> MasterServer:
        try:
            self.master.start_background()
        except ConfigError:  # a declared schedule that this master cannot serve
            self.stop()
            raise
        self.metrics_server = None
        if self.config.master.metrics_port:
            from ..metrics import serve_master_metrics

            try:
                self.metrics_server = serve_master_metrics(self.config.master.metrics_host,
                                                           self.config.master.metrics_port,
                                                           lambda: self.master.queue_info(workers=False),
                                                           self.config.client_secret)
            except ConfigError:
                self.stop()
                raise
            except OSError as exc:
                self.stop()
                raise ConfigError(f"master.metrics_port: cannot listen on {self.config.master.metrics_port}: "
                                  f"{exc.strerror or exc}") from None
        self._thread = rpc.serve_in_thread(self.daemon, "ppq-master-daemon")
        log.log(self.announce, "master ready: %s, queue_index %s", self.uri, ", ".join(map(str, sorted(self.stores))))
        if self.config.master.nameserver:
            self.registration = self._registration().start()
        return self

    def _registration(self) -> rpc.Registration:
        """This master's entry in ``master.nameserver``: ``<nameserver_name>.<host>_<port>`` -> its URI,
        tagged ``ppq.queue`` and ``ppq.queue_indexes:0,1``."""
        m = self.config.master
        rpc.apply_tls(self.config.tls)  # the name server is reached as a client reaches a master
        ns_host, ns_port = rpc.parse_location(m.nameserver, "master.nameserver")
        host = rpc.reachable_host(m.host, ns_host, ns_port)
        if rpc.is_loopback(host) and not rpc.is_loopback(ns_host):
            log.warning("master.host %s is a loopback address: the name server %s will hand other machines an "
                        "address they cannot reach (bind an address of this machine, or 0.0.0.0)", host, m.nameserver)
        uri = f"PYRO:{rpc.MASTER_OBJECT}@{f'[{host}]' if ':' in host else host}:{self.port}"
        metadata = {rpc.QUEUE_TAG, rpc.QUEUE_INDEXES_TAG + ",".join(map(str, sorted(self.stores)))}
        name = rpc.master_name(m.nameserver_name, host, self.port)
        # Only auth_token may change a name server's entries (with no tokens, anyone may).
        token = self.config.auth_token
        return rpc.Registration(m.nameserver, name, uri, metadata, token)

    def close_stores(self) -> None:
        for store in self.stores.values():
            store.close()
        if self.embedded is not None:
            self.embedded.stop()

    def stop(self) -> None:
        if self.registration is not None:
            self.registration.stop()
            self.registration = None
        metrics_server = getattr(self, "metrics_server", None)
        if metrics_server is not None:
            from ..metrics import stop_metrics

            stop_metrics(metrics_server)
            self.metrics_server = None
        self.master.stop_background()
        self.daemon.shutdown()
        if self._thread is not None:
            self._thread.join(10)
        self.close_stores()
        log.info("master stopped")

    def __enter__(self) -> MasterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def serve(config: Config, stop: threading.Event | None = None, *, server: MasterServer | None = None,
          ready: Callable[[MasterServer], object] | None = None,
          signals: tuple[str, ...] = ("SIGTERM", "SIGINT")) -> None:
    """Run a master until ``stop`` is set or, in the main thread, one of ``signals`` arrives.

    Serves ``server``, already started, or else a MasterServer of ``config`` started
    here (its ConfigError is raised before anything is served); calls ``ready`` with
    it, waits, then stops it.
    """
    if stop is None:
        stop = threading.Event()
    if threading.current_thread() is threading.main_thread():
        def handler(signum: int, frame: object) -> None:
            stop.set()

        for name in signals:
            signal.signal(getattr(signal, name), handler)
    if server is None:
        server = MasterServer(config).start()
    if ready is not None:
        ready(server)
    try:
        while not stop.wait(0.5):
            pass
    finally:
        server.stop()
