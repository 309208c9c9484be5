"""Host-side cache of prepared adapters: read, checked and packed, ready to copy in.

``runtime.preload(source)`` does all the work of a load except the final copies and keeps the
result here (in pinned memory when the model is on a GPU), so a later ``runtime.load(source)``
is only a handful of host-to-device copies. ``runtime.prefetch(source)`` does the same on a
background thread. The cache is bounded in bytes and evicts the least recently used entry.

Thread safety: the cache's own state is guarded by a lock, so preloads and prefetches may run
on any thread. Loads, activations and forwards must still be issued from one thread at a time.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from lorahot.adapter import Adapter
from lorahot.runtime.buffers import Pack
from lorahot.runtime.plan import LoadPlan

__all__ = ["PreparedAdapter", "AdapterCache"]


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter already checked against one runtime and packed for its arenas."""

    key: str
    adapter: Adapter
    plan: LoadPlan
    packs: list[Pack]  # one per arena, in host (pinned on GPU) memory
    owner: object  # the BufferManager the plan was made for

    @property
    def nbytes(self) -> int:
        """Host bytes the packed adapter occupies."""
        return sum(p.nbytes for p in self.packs)


class AdapterCache:
    """An LRU of :class:`PreparedAdapter`, bounded by ``budget_bytes`` of packed data."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, PreparedAdapter] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> PreparedAdapter | None:
        """The entry for ``key`` (marked most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, entry: PreparedAdapter) -> None:
        """Adds ``entry``, evicting least recently used entries to stay within budget.

        An entry larger than the whole budget is not kept.
        """
        with self._lock:
            self._entries.pop(entry.key, None)
            if entry.nbytes > self.budget_bytes:
                return
            self._entries[entry.key] = entry
            while self.nbytes_locked() > self.budget_bytes:
                self._entries.popitem(last=False)

    def discard(self, key: str) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def keys(self) -> list[str]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self.nbytes_locked()

    def nbytes_locked(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)
