"""Binding rules and TLS settings for ppq's daemons and proxies."""

from __future__ import annotations

import ipaddress
import socket
import ssl

from Pyro5 import config as pyro_config

from ..config import TLSConfig
from ..errors import ConfigError


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


def check_bind(host: str, token: str | bool | None, insecure: bool, key: str) -> None:
    """Refuse a non-loopback bind when no token is configured (``token`` falsy), unless forced."""
    if not is_loopback(host) and not token and not insecure:
        raise ConfigError(
            f"{key} is {host!r}, which is reachable from other machines, and no auth_token is set: "
            f"set auth_token (or PPQ_AUTH_TOKEN), or pass --insecure to run without one"
        )


def server_ssl_context(tls: TLSConfig) -> ssl.SSLContext | None:
    """The SSL context of a ppq daemon, or None without TLS."""
    if not tls.enabled:
        return None
    if not tls.certfile or not tls.keyfile:
        raise ConfigError("tls.certfile and tls.keyfile are required when tls.enabled is true")
    try:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.certfile, tls.keyfile)
        if tls.cafile:
            context.load_verify_locations(cafile=tls.cafile)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls: cannot load the certificate or key: {exc}") from None
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return context


def apply_tls(tls: TLSConfig) -> None:
    """Pyro5's proxies take TLS from its process-wide settings: set them for ppq's clients."""
    if not tls.enabled:
        return
    pyro_config.SSL = True
    pyro_config.SSL_CACERTS = tls.cafile
    pyro_config.SSL_CLIENTCERT = tls.client_certfile
    pyro_config.SSL_CLIENTKEY = tls.client_keyfile
