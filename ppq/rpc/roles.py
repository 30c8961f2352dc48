"""Who may call what: the role a connection's token grants.

``auth_token`` is the one shared secret of simple setups and grants every role.
``worker_token`` and ``client_token`` split it: a connection that authenticated with
the worker token may call the worker-side methods (leasing and reporting tasks,
heartbeats), one with the client token everything else (pushing, reading, cancelling,
the dead list). Methods marked ``any`` (ping, server_info) are open to both. With no
token configured (loopback-only setups) every connection has every role.
"""

from __future__ import annotations

ALL = "all"
CLIENT = "client"
WORKER = "worker"
# A method any authenticated connection may call.
ANY = "any"


def token_roles(auth_token: str | None, worker_token: str | None = None,
                client_token: str | None = None) -> dict[str, str]:
    """token -> role, for a daemon's handshake check."""
    roles: dict[str, str] = {}
    if client_token:
        roles[client_token] = CLIENT
    if worker_token:
        roles[worker_token] = WORKER
    if auth_token:
        roles[auth_token] = ALL
    return roles
