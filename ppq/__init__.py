"""ppq: a distributed task queue over Pyro5 and Redis."""

from .client import Client, task
from .codec import decode_parameters, encode_parameters
from .errors import (
    AuthError,
    CodecError,
    ConfigError,
    ConnectError,
    InvalidTaskError,
    LeaseLostError,
    NotAllowedError,
    PPQError,
    ResultTimeoutError,
    StorageError,
    TaskFailedError,
    TaskTimeoutError,
)
from .rpc import PyroFunc

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "Client",
    "CodecError",
    "ConfigError",
    "ConnectError",
    "InvalidTaskError",
    "LeaseLostError",
    "NotAllowedError",
    "PPQError",
    "PyroFunc",
    "ResultTimeoutError",
    "StorageError",
    "TaskFailedError",
    "TaskTimeoutError",
    "decode_parameters",
    "encode_parameters",
    "task",
]
