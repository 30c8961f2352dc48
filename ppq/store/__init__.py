"""One queue_index's storage in Redis: the only part of ppq that imports redis."""

from .store import Store, keys_of, task_of

__all__ = ["Store", "keys_of", "task_of"]
