"""A memo bounded by bytes, not by entry count: the one cache helper of the read side.

Memos speed up reloading the same adapter (a checked header, parsed keys, resolved names), but
their keys come from files: a count bound alone lets 64 hostile 8 MiB headers, or 65,536 keys of
a megabyte each, pin gigabytes. :class:`BoundedMemo` charges each entry an estimate of the bytes
it keeps alive, skips entries larger than ``max_entry`` (computed every time instead) and evicts
the least recently used entries beyond ``max_bytes``. Only values that were computed are stored:
an exception (a rejected file) stores nothing.
"""

from __future__ import annotations

import hashlib
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from typing import Any, Generic, TypeVar

__all__ = ["BoundedMemo", "digest", "str_bytes"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: bytes charged per entry on top of its own estimate (dict slot, tuple, small objects)
ENTRY_OVERHEAD = 200


class BoundedMemo(Generic[K, V]):
    """A thread-safe LRU memo whose entries together cost at most ``max_bytes``.

    Args:
        max_bytes: the budget for all entries together (estimated bytes kept alive).
        cost: the estimated bytes an entry keeps alive (key and value), called on a miss.
        max_entry: entries estimated above this are never stored (default: ``max_bytes // 8``).
    """

    def __init__(self, max_bytes: int, cost: Callable[[K, V], int], max_entry: int | None = None) -> None:
        self.max_bytes = max_bytes
        self.max_entry = max_bytes // 8 if max_entry is None else max_entry
        self._cost = cost
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._total = 0
        #: set while the entries and the total change: an interrupt (KeyboardInterrupt) between
        #: the two leaves it set, and the total is counted again from the entries
        self._unsure = False
        self._lock = threading.Lock()

    def get(self, key: K, compute: Callable[..., V], *args: Any) -> V:
        """The memoized value of ``key``; on a miss ``compute(*args)``, stored if it fits.

        Exceptions from ``compute`` propagate and store nothing.
        """
        hit = self._entries.get(key)  # one C call: atomic under the GIL, no lock on the hot path
        if hit is not None:
            try:  # noqa: SIM105 - contextlib.suppress costs an object per call on this hot path
                self._entries.move_to_end(key)
            except KeyError:  # evicted meanwhile by another thread
                pass
            return hit[0]
        value = compute(*args)
        self._put(key, value, self._cost(key, value) + ENTRY_OVERHEAD)
        return value

    def _put(self, key: K, value: V, cost: int) -> None:
        if cost > self.max_entry:
            return
        with self._lock:
            self._total = self._counted()
            self._unsure = True
            old = self._entries.pop(key, None)
            if old is not None:
                self._total -= old[1]
            self._entries[key] = (value, cost)
            self._total += cost
            while self._total > self.max_bytes:
                _, (_, dropped) = self._entries.popitem(last=False)
                self._total -= dropped
            self._unsure = False

    def _counted(self) -> int:
        """The total, counted again from the entries where a change of them was interrupted."""
        return sum(c for _, c in list(self._entries.values())) if self._unsure else self._total

    @property
    def nbytes(self) -> int:
        """The estimated bytes held now (at most ``max_bytes``)."""
        return self._counted()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def clear(self) -> None:
        with self._lock:
            self._unsure = True
            self._entries.clear()
            self._total = 0
            self._unsure = False


def str_bytes(s: str) -> int:
    """Bytes a str takes in memory (one of astral characters takes 4 per character)."""
    return sys.getsizeof(s)


def digest(strings: Iterable[str]) -> bytes:
    """A 32-byte digest of a sequence of strings (of its ``repr``, so no two sequences collide by
    concatenation); keys a memo by a large input without keeping the input alive."""
    text = repr(list(strings)).encode("utf-8", "surrogatepass")
    return hashlib.blake2b(text, digest_size=32).digest()
