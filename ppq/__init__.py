"""ppq: a distributed task queue over Pyro5 and Redis."""

from .api import Master, Worker
from .client import Client, task
from .codec import decode_parameters, encode_parameters
from .config import Config, load_config
from .errors import (
    AuthError,
    CodecError,
    ConfigError,
    ConnectError,
    InvalidTaskError,
    LeaseLostError,
    MessageTooLargeError,
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
    "Config",
    "ConfigError",
    "ConnectError",
    "InvalidTaskError",
    "LeaseLostError",
    "MessageTooLargeError",
    "Master",
    "NotAllowedError",
    "PPQError",
    "PyroFunc",
    "ResultTimeoutError",
    "StorageError",
    "TaskFailedError",
    "TaskTimeoutError",
    "Worker",
    "decode_parameters",
    "encode_parameters",
    "load_config",
    "task",
]
