"""The web dashboard: what ``ppq dashboard`` serves and ``ppq up`` starts beside its master.

It is a client like any other: it reaches the masters through :class:`ppq.Client` (Pyro5,
failing over between them) and the workers' control objects, never Redis. The package:

- ``data.py``: what the pages show, read through the client (no web library), and the
  sampler that keeps the last minutes of counters for the charts;
- ``security.py``: the signed session cookie, sign-in, CSRF tokens, bounded request bodies;
- ``views.py``: the pages, the JSON the live pages poll, and the actions (POST);
- ``app.py``: the Starlette application and :func:`serve`, which runs it under uvicorn;
- ``templates/`` (Jinja2, autoescaped) and ``static/`` (the stylesheet and the script that
  polls and draws the charts as inline SVG; nothing is fetched from elsewhere).

Only this module is imported by ``ppq up`` and the CLI before they know the web libraries are
there: :func:`missing_libraries` says which are not.
"""

from __future__ import annotations

import importlib.util
import ipaddress

from ..config import Config
from ..errors import ConfigError

# The libraries the dashboard needs (the names they are imported by).
LIBRARIES = ("starlette", "uvicorn", "jinja2")


def missing_libraries() -> list[str]:
    """The libraries of :data:`LIBRARIES` that cannot be imported here."""
    missing = []
    for name in LIBRARIES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def is_loopback(host: str) -> bool:
    """True for an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    host = host.strip().strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def sign_in_token(config: Config) -> str | None:
    """The token the sign-in page asks for: ``auth_token``, else ``client_token`` (whoever holds
    it may do through a client all the dashboard does); None: no sign-in."""
    return config.auth_token or config.client_token or None


def check_bind(config: Config) -> None:
    """Refuse (ConfigError) a dashboard on a non-loopback address without ``auth_token``."""
    host = config.dashboard.host
    if not is_loopback(host) and not sign_in_token(config):
        raise ConfigError(f"dashboard.host: refusing to serve the dashboard on {host or 'every address'} "
                          f"without auth_token (set auth_token or PPQ_AUTH_TOKEN, or bind 127.0.0.1)")


__all__ = ["LIBRARIES", "check_bind", "is_loopback", "missing_libraries", "sign_in_token"]
