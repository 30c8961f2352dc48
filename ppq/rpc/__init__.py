"""All of ppq's Pyro5 glue; no other ppq module imports Pyro5.

- :mod:`.wire`: Pyro5's message format, read with limits and bounded decoders;
- :mod:`.server`: the daemon of masters and workers' control objects;
- :mod:`.transport`: its connection handling: idle connections parked without a
  thread, requests served by :mod:`.pool`'s threads, new connections taken through
  :mod:`.handshake` (accept, TLS, token) without blocking;
- :mod:`.client`: proxies, the direct call path, and :class:`PyroFunc`;
- :mod:`.exposed`: ``@remote``, the wrapper of every exposed method (roles, errors);
- :mod:`.roles`: which token grants which role;
- :mod:`.net`: the loopback bind rule and TLS settings;
- :mod:`.names`: Pyro5 name servers: serving one, registering masters, finding them.

Importing this package changes nothing in Pyro5: ppq's daemons and proxies set up
what they need when they are made, for themselves.
"""

from Pyro5.api import expose

from .client import (
    DEFAULT_SERIALIZER,
    DEFAULT_TIMEOUT,
    MASTER_OBJECT,
    WORKER_OBJECT,
    CommunicationError,
    PyroFunc,
    make_proxy,
    master_uri,
    register_errors,
)
from .exposed import caller_role, client_address, client_error, client_is_ppq, client_session, remote
from .names import (
    DEFAULT_NAMESERVER_PORT,
    QUEUE_INDEXES_TAG,
    QUEUE_TAG,
    NameServerProcess,
    Registration,
    master_name,
    parse_location,
    reachable_host,
)
from .net import apply_tls, check_bind, is_loopback, server_ssl_context
from .roles import ALL, ANY, CLIENT, WORKER, token_roles
from .server import HELD, Daemon, hold_reply, serve_in_thread
from .transport import HeldReply

__all__ = [
    "ALL",
    "ANY",
    "CLIENT",
    "DEFAULT_NAMESERVER_PORT",
    "DEFAULT_SERIALIZER",
    "DEFAULT_TIMEOUT",
    "HELD",
    "MASTER_OBJECT",
    "QUEUE_INDEXES_TAG",
    "QUEUE_TAG",
    "NameServerProcess",
    "Registration",
    "WORKER",
    "WORKER_OBJECT",
    "CommunicationError",
    "Daemon",
    "HeldReply",
    "PyroFunc",
    "apply_tls",
    "caller_role",
    "check_bind",
    "client_address",
    "client_error",
    "client_is_ppq",
    "client_session",
    "expose",
    "hold_reply",
    "is_loopback",
    "make_proxy",
    "master_name",
    "master_uri",
    "parse_location",
    "reachable_host",
    "register_errors",
    "remote",
    "serve_in_thread",
    "server_ssl_context",
    "token_roles",
]
