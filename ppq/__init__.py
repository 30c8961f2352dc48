"""ppq: a distributed task queue over Pyro5 and Redis.

What users import is here: :class:`Client` and :func:`task` to push and wait,
:func:`periodic` to declare a schedule on a task function, :func:`chain`,
:func:`group`, :func:`chord` and :func:`sig` to build workflows,
:class:`Master` and :class:`Worker` to run the daemons from Python, :class:`Config`,
the errors, and :class:`PyroFunc` for the seed's calling style. Inside, each
layer imports only those below it:

- :mod:`ppq.cli` and :mod:`ppq.stack`: the ``ppq`` command and what ``ppq up`` supervises;
- :mod:`ppq.master` and :mod:`ppq.worker`: the two daemons;
- :mod:`ppq.contrib.django`: the Django app (its management commands run the ``ppq`` commands);
- :mod:`ppq.aio`: ``AsyncClient``, the client for asyncio code;
- :mod:`ppq.client`: the retrying client;
- :mod:`ppq.store`: Redis and its Lua scripts (the only importer of redis);
- :mod:`ppq.rpc`: Pyro5 (the only importer of Pyro5);
- :mod:`ppq.task`, :mod:`ppq.allow`, :mod:`ppq.codec`, :mod:`ppq.config`, :mod:`ppq.errors`: the
  task record and its checks, the allowlist, payloads, settings, errors.

``docs/architecture.md`` describes the processes, the task life in Redis and where
each change belongs.
"""

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
    TaskExpiredError,
    TaskFailedError,
    TaskTimeoutError,
)
from .rpc import PyroFunc
from .schedules import periodic
from .workflow import chain, chord, group, sig

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
    "TaskExpiredError",
    "TaskFailedError",
    "TaskTimeoutError",
    "Worker",
    "chain",
    "chord",
    "decode_parameters",
    "encode_parameters",
    "group",
    "load_config",
    "periodic",
    "sig",
    "task",
]
