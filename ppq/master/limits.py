"""The rate and concurrency limits of the exposed ``queue`` object: :class:`Limiting`, a base
class of :class:`~ppq.master.exposed.Master`.

Limits live in each queue_index's Redis (``ppq.store.limits``) and are enforced by the
lease script, so every master and worker obeys the same ones. A master stores the config's
``rate_limits`` and ``concurrency_limits`` at start, and those ``@task(rate_limit=...,
concurrency_limit=...)`` declares in the modules of ``master.schedule_modules`` (it imports
them for ``@periodic`` too); ``limit_set``/``limit_remove`` change them live.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from .. import rpc
from ..config import Config
from ..errors import InvalidTaskError
from ..limits import DECLARED, KINDS, check_concurrency, check_function, check_rate
from ..store import Store
from .checks import import_declaring_modules

log = logging.getLogger("ppq.master")

# Limit kinds as the store names them.
_STORE_KIND = {"rate": "rate", "concurrency": "conc"}


class Limiting:
    """``limit_set``, ``limit_remove``, ``limit_list`` and the limits stored at start."""

    # Set by Master.__init__.
    config: Config
    stores: dict[int, Store]

    if TYPE_CHECKING:
        def _store(self, queue_index: Any) -> Store: ...

    def _stores_of(self, queue_index: Any) -> list[Store]:
        return list(self.stores.values()) if queue_index is None else [self._store(queue_index)]

    def declared_limits(self) -> dict[str, dict[str, Any]]:
        """function -> {"rate": spec, "concurrency": N}: the config's limits, then those declared by
        ``@task`` in ``master.schedule_modules`` for functions the config leaves unset."""
        out: dict[str, dict[str, Any]] = {}
        for fn, rate in self.config.rate_limits.items():
            out.setdefault(fn, {})["rate"] = rate
        for fn, n in self.config.concurrency_limits.items():
            out.setdefault(fn, {})["concurrency"] = n
        import_declaring_modules(self.config.master.schedule_modules)
        for module in self.config.master.schedule_modules:
            for fn, limits in DECLARED.items():
                if fn.startswith(module + "."):
                    for kind, value in limits.items():
                        out.setdefault(fn, {}).setdefault(kind, value)
        return out

    def store_declared_limits(self) -> None:
        """Store the declared limits in every queue_index (a live change to another function stays)."""
        for fn, limits in self.declared_limits().items():
            for kind, value in limits.items():
                for store in self.stores.values():
                    if store.set_limit(fn, _STORE_KIND[kind], value):
                        log.info("queue_index %s: %s limit of %s set to %s (declared)", store.queue_index, kind,
                                 fn, value)

    def held_for(self, store: Store, record: dict[str, Any]) -> str | None:
        """What a queued task held back by its function's limits waits for ("its rate limit 10/s",
        "a slot of its concurrency limit 2"), None when it is not held back."""
        fn = f"{record.get('module')}.{record.get('func')}"
        if not record.get("module") or not record.get("func") or not store.held_back(record["id"], fn):
            return None
        rate, conc, running = store.limit_of(fn)
        if conc is not None and (running >= conc or rate is None):
            return f"a slot of its concurrency limit {conc} ({running} running)"
        return f"its rate limit {rate}" if rate else "its function's limits"

    @rpc.remote
    def limit_set(self, function: Any, rate: Any = None, concurrency: Any = None, queue_index: Any = None) -> list[int]:
        """Set ``function``'s rate limit (``"10/s"``, ``"20/m"``, ``"1000/h"``) and/or its concurrency
        limit (most tasks running at once) in every queue_index (``queue_index`` None) or one.
        Returns the queue_indexes where a limit changed."""
        fn = check_function(function)
        if rate is None and concurrency is None:
            raise InvalidTaskError("rate: give a rate (like '10/s') or a concurrency, or both")
        changes: list[tuple[str, Any]] = []
        if rate is not None:
            changes.append(("rate", check_rate(rate)))
        if concurrency is not None:
            changes.append(("concurrency", check_concurrency(concurrency)))
        stores = self._stores_of(queue_index)
        changed = []
        for store in stores:
            if any([store.set_limit(fn, _STORE_KIND[kind], value) for kind, value in changes]):
                changed.append(store.queue_index)
        if changed:
            log.info("%s: %s (queue_index %s)", fn, ", ".join(f"{k} limit {v}" for k, v in changes),
                     ", ".join(map(str, changed)))
        return changed

    @rpc.remote
    def limit_remove(self, function: Any, kind: Any = None, queue_index: Any = None) -> list[int]:
        """Remove ``function``'s ``kind`` of limit ("rate" or "concurrency"; None: both); the tasks it
        held back are leased as any others. Returns the queue_indexes where a limit was removed."""
        fn = check_function(function)
        if kind is not None and kind not in KINDS:
            raise InvalidTaskError(f"kind: expected one of {', '.join(KINDS)} (or none for both), got {kind!r:.80}")
        kinds = KINDS if kind is None else (kind,)
        changed = []
        for store in self._stores_of(queue_index):
            if any([store.remove_limit(fn, _STORE_KIND[k]) for k in kinds]):
                changed.append(store.queue_index)
        if changed:
            log.info("%s: %s limit removed (queue_index %s)", fn, kind or "every", ", ".join(map(str, changed)))
        return changed

    @rpc.remote
    def limit_list(self) -> dict[int, list[dict[str, Any]]]:
        """Per queue_index, each limited function: ``function``, ``rate``, ``concurrency``, ``tokens``
        (in its bucket now), ``running`` and ``waiting`` (tasks its limits hold back)."""
        return {qi: store.limits() for qi, store in sorted(self.stores.items())}
