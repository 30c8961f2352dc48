"""The wrapper of every method a ppq daemon exposes: roles, argument errors, error types."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import Pyro5.api
import Pyro5.callcontext

from .. import errors
from ..errors import AuthError, InvalidTaskError, PPQError
from .roles import ALL, ANY, CLIENT

log = logging.getLogger("ppq.rpc")

F = TypeVar("F", bound=Callable[..., Any])

_PLAIN_ERRORS: dict[type, type] = {
    errors.InvalidTaskError: ValueError,
    errors.AuthError: PermissionError,
    errors.StorageError: ConnectionError,
    errors.LeaseLostError: RuntimeError,
}


def _connection() -> Any:
    return getattr(Pyro5.callcontext.current_context, "client", None)


def client_is_ppq() -> bool:
    """True if the current call comes from ppq's own client (not a plain Pyro5 proxy)."""
    return bool(getattr(_connection(), "ppq_client", False))


def client_address() -> str:
    addr = getattr(Pyro5.callcontext.current_context, "client_sock_addr", None)
    if isinstance(addr, str):
        return addr
    return f"{addr[0]}:{addr[1]}" if addr else ""


def client_session() -> str:
    """An id of the current call's connection, unique for the life of the process ('' outside a call)."""
    return str(getattr(_connection(), "ppq_session", "") or "")


def caller_role() -> str:
    """The role the current call's connection authenticated as (every role outside a call)."""
    conn = _connection()
    return getattr(conn, "ppq_role", ALL) if conn is not None else ALL


def client_error(exc: Exception, name: str, ppq_client: bool) -> Exception:
    """The error a client gets for ``exc`` raised by exposed method ``name``: a ppq error as
    itself to ppq's clients, as the closest builtin type naming it to plain Pyro5 clients;
    anything else logged and reported as an internal error."""
    if isinstance(exc, PPQError):
        if ppq_client:
            return exc
        plain = next((v for k, v in _PLAIN_ERRORS.items() if isinstance(exc, k)), RuntimeError)
        return plain(f"{type(exc).__name__}: {exc}")
    log.error("internal error in %s", name, exc_info=exc)
    return (PPQError if ppq_client else RuntimeError)(f"internal error in {name}: {type(exc).__name__}: {exc}")


def remote(method: F | None = None, *, role: str = CLIENT) -> Any:
    """Expose a method to ppq's clients: ``@remote`` (a client's method),
    ``@remote(role=WORKER)`` or ``@remote(role=ANY)``.

    A call from a connection without the role gets AuthError. Bad arguments and ppq
    errors become clear errors: a ppq client gets the ppq error itself; a plain Pyro5
    client, which cannot deserialize ppq's classes, gets the closest builtin type with
    the ppq error's name in the message. Anything unexpected is logged and reported as
    an internal error.
    """
    if method is None:
        return functools.partial(remote, role=role)

    name = method.__name__

    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            granted = caller_role()
            if role != ANY and granted != ALL and granted != role:
                raise AuthError(f"{name} is for {role}s; this connection authenticated as a {granted}")
            try:
                return method(*args, **kwargs)
            except TypeError as exc:
                # Raised by the call itself (wrong arguments), not from inside the method.
                if exc.__traceback__ is not None and exc.__traceback__.tb_next is None:
                    message = str(exc).split(".")[-1].replace("() ", ": ", 1)
                    raise InvalidTaskError(message) from None
                raise
        except Exception as exc:
            error = client_error(exc, name, client_is_ppq())
            if error is exc:
                raise
            raise error from None

    wrapper.ppq_role = role  # type: ignore[attr-defined]
    return Pyro5.api.expose(wrapper)
