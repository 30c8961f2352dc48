"""The pause between retries of a call to the masters: doubles from 50 ms up to a cap."""

from __future__ import annotations

# The first pause after a failed call, in seconds.
DEFAULT_FIRST_PAUSE = 0.05


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
