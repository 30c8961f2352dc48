"""The ppq error family.

Every error ppq raises on purpose is a :class:`PPQError`. The classes here are
registered with Pyro5's serializer (see :mod:`ppq.rpc`), so a ppq client gets the
same type and message the master raised. This module imports nothing from ppq.
"""


class PPQError(Exception):
    """Base class of every ppq error."""


class ConfigError(PPQError):
    """A configuration key is unknown, of the wrong type or out of range."""


class InvalidTaskError(PPQError, ValueError):
    """An argument of an RPC call (a task field, a queue_index...) is invalid."""


class MessageTooLargeError(InvalidTaskError):
    """A request is larger than ``limits.max_message``; sent in smaller parts, it may pass."""


class CodecError(InvalidTaskError):
    """A payload cannot be encoded or decoded by the configured codec."""


class StorageError(PPQError):
    """Redis could not be reached or answered with an error."""


class AuthError(PPQError):
    """Authentication failed."""


class NotAllowedError(PPQError):
    """A worker refused to import a module or use a path not in its allowlists."""


class LeaseLostError(PPQError):
    """A worker reported on a task whose lease it no longer holds."""


class TaskTimeoutError(PPQError):
    """A task ran past its timeout and was stopped."""


class TaskFailedError(PPQError):
    """A task ended in failure.

    ``error`` is the remote error as recorded ("ValueError: bad input"), split
    into ``type`` ("ValueError"; "" when the task did not fail with an
    exception, as a cancelled or expired one) and ``message`` ("bad input");
    ``traceback`` is the remote traceback, if there was one.
    """

    def __init__(self, task_id: str, error: str = "", traceback: str = "") -> None:
        super().__init__(task_id, error, traceback)
        self.task_id = task_id
        self.error = error
        self.traceback = traceback
        self.type, self.message = _split_error(error)

    def __str__(self) -> str:
        return f"task {self.task_id} failed: {self.error}"


def _split_error(error: str) -> tuple[str, str]:
    """("ValueError", "bad input") from "ValueError: bad input"; ("", error) when it names no type."""
    name, sep, message = error.partition(": ")
    parts = name.split(".")
    if sep and all(part.isidentifier() for part in parts) and parts[-1][:1].isupper():
        return name, message
    return "", error


class TaskExpiredError(TaskFailedError):
    """A task ended ``expired``: its ``expires`` time passed before it started, so it never ran.

    A :class:`TaskFailedError` whose ``type`` is "" and ``error`` says when it expired;
    ``expires`` is that unix time (None if unknown).
    """

    def __init__(self, task_id: str, error: str = "", traceback: str = "", expires: float | None = None) -> None:
        super().__init__(task_id, error, traceback)
        self.expires = expires

    def __str__(self) -> str:
        return f"task {self.task_id} expired: {self.error}"


class ResultTimeoutError(PPQError, TimeoutError):
    """A wait for a task's result ran out of time."""


class ConnectError(PPQError, ConnectionError):
    """No master could be reached after every retry."""


ALL_ERRORS = (
    PPQError,
    ConfigError,
    InvalidTaskError,
    MessageTooLargeError,
    CodecError,
    StorageError,
    AuthError,
    NotAllowedError,
    LeaseLostError,
    TaskTimeoutError,
    TaskFailedError,
    TaskExpiredError,
    ResultTimeoutError,
    ConnectError,
)
