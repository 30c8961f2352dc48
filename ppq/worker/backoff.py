"""The pause between retries of a call to the masters (doubles from 50 ms up to a cap), and the
one warning per outage when they do not answer."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..errors import ConnectError, StorageError
from ..rpc import CommunicationError

log = logging.getLogger("ppq.worker")

# The first pause after a failed call, in seconds.
DEFAULT_FIRST_PAUSE = 0.05
# The longest pause between retries, in seconds (less when worker.max_sleep is less): an agent
# whose masters come back is back within this.
MAX_PAUSE = 5.0


class Backoff:
    """``pause`` is how long to wait now; ``failed()`` doubles it (capped), ``reset()`` starts over."""

    def __init__(self, cap: float, first: float = DEFAULT_FIRST_PAUSE) -> None:
        self.first = first
        self.cap = cap
        self.pause = first

    def failed(self) -> None:
        self.pause = min(self.pause * 2, self.cap)

    def reset(self) -> None:
        self.pause = self.first


class Outage:
    """The masters not answering, said once per outage: the first failed call of any of the agent's
    threads is a WARNING, the next ones (the same error) DEBUG, the first success after them one INFO line.

    An outage is masters that cannot be reached or whose Redis cannot (ConnectError,
    StorageError, Pyro5's communication errors); a different kind of those (a storage error
    after refused connections) is a new WARNING. Any other error (a refusal) is no outage: it
    is a WARNING each time. :meth:`ok` costs one attribute read while all is well; the first
    one after an outage also calls ``on_back``.
    """

    def __init__(self, on_back: Callable[[], object] = lambda: None) -> None:
        self.on_back = on_back
        self._lock = threading.Lock()
        self._since: float | None = None
        self._kind = ""

    def failed(self, what: str, exc: BaseException) -> None:
        kind = type(exc).__name__
        if not isinstance(exc, (ConnectError, StorageError, CommunicationError)):
            log.warning("%s: %s: %s", what, kind, exc)
            return
        with self._lock:
            new = self._since is None or kind != self._kind
            if self._since is None:
                self._since = time.monotonic()
            self._kind = kind
        if new:
            log.warning("%s: %s: %s; retrying until a master answers", what, kind, exc)
        else:
            log.debug("%s: %s: %s", what, kind, exc)

    def ok(self) -> None:
        if self._since is None:
            return
        with self._lock:
            since, self._since, self._kind = self._since, None, ""
        if since is not None:
            log.info("the masters answer again, after %.1fs", time.monotonic() - since)
            self.on_back()
