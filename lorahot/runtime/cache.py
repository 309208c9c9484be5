"""Host-side cache of prepared adapters: read, checked and packed, ready to copy in.

``runtime.preload(source)`` does all the work of a load except the final copies and keeps the
result here (in pinned memory when the model is on a GPU), so a later ``runtime.load(source)``
is one host-to-device copy per arena and a few device operations (see
:class:`~lorahot.runtime.buffers.Pack`). An entry's tensors are never written after it is
made: loads only read them, and the checks they passed at preload are not repeated.
``runtime.prefetch(source)`` does the same on a background thread. The cache is bounded in
bytes and evicts the least recently used entry. What an entry is filed under (:func:`preload_key`,
:func:`same_path`) and the copy of the caller's source it is made from (:func:`private`,
:func:`snapshot`) are decided here too.

Thread safety: the cache's own state is guarded by a lock, so preloads and prefetches may run
on any thread. Loads, activations, unloads and scale changes take the runtime's call lock; a
forward must still not run while one of them writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from lorahot.adapter import Adapter
from lorahot.errors import UsageError, public_api, shown
from lorahot.io.loader import checked_adapter
from lorahot.io.plain import plain
from lorahot.io.tensorfile import refuse_oversized
from lorahot.memo import str_bytes
from lorahot.runtime.arguments import entries as read_entries
from lorahot.runtime.arguments import is_sequence, text, whole
from lorahot.runtime.buffers import Pack
from lorahot.runtime.plan import LoadPlan

__all__ = [
    "PreparedAdapter",
    "AdapterCache",
    "check_prepared",
    "checked_budget",
    "preload_key",
    "private",
    "same_path",
    "snapshot",
]


#: host bytes an entry keeps alive besides its tensors' data: its plan, packs and adapter objects,
#: and per module (as read, and as planned) its tensor objects and records. Measured on the CPU
#: box as the growth of RSS over 1,000 preloads of distinct rank-1 adapters: about 14 KB an
#: entry and 1.8 KB a module; uncounted, a cache of small adapters held over ten times its budget
ENTRY_OVERHEAD = 16 << 10
MODULE_OVERHEAD = 2 << 10


@dataclass(frozen=True)
class PreparedAdapter:
    """An adapter already checked against one runtime and packed for its arenas."""

    key: str
    adapter: Adapter
    plan: LoadPlan
    packs: list[Pack]  # one per arena, in host (pinned on GPU) memory
    owner: object  # the BufferManager the plan was made for
    #: (real path, digest) of each file of its key written too recently for its stat to stand
    #: for its content (:mod:`lorahot.runtime.racy`): a load from the entry hashes them again,
    #: until one finds them unchanged and older than the margin (:func:`~lorahot.runtime.racy.checked`)
    racy: tuple[tuple[str, bytes], ...] = ()

    @functools.cached_property
    def saved_bases(self) -> tuple[str, ...]:
        """The layers whose module carries a copy of the model's base weight (PEFT's
        ``base_layer.weight``), which a load compares with the model's weight again: the model's
        own may have changed since preload compared them."""
        return tuple(name for name, m in self.plan.targets.items() if m.base_weight is not None)

    @functools.cached_property
    def nbytes(self) -> int:
        """Host bytes the entry keeps alive: its packs, the storage of the adapter's own
        tensors, which the plan keeps for stacks and merged mode (a float32 file for a float16
        model holds twice its packs), each storage counted once, and the objects that describe
        them (:data:`ENTRY_OVERHEAD`, :data:`MODULE_OVERHEAD`) and its key."""
        storages: dict[int, int] = {}
        for t in _tensors(self.adapter, self.plan):
            if not t.is_meta and t.device.type == "cpu":
                storage = t.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        adapter, plan = self.adapter, self.plan
        modules = len(adapter.modules) + len(adapter.weights) + len(plan.targets) + len(plan.weights)
        described = ENTRY_OVERHEAD + MODULE_OVERHEAD * modules + str_bytes(self.key)
        return sum(p.nbytes for p in self.packs) + sum(storages.values()) + described


def check_prepared(entry: PreparedAdapter) -> None:
    """Refuses a :class:`PreparedAdapter` whose fields are not what :meth:`runtime.preload
    <lorahot.runtime.lora_runtime.LoraRuntime.preload>` made (``dataclasses.replace`` can put
    anything there): it would pass the load's checks and fail while writing.

    Raises:
        UsageError: naming the field.
    """
    fields = (
        ("key", entry.key, str),
        ("adapter", entry.adapter, Adapter),
        ("plan", entry.plan, LoadPlan),
        ("packs", entry.packs, list),
    )
    bad = [f"{name} is {shown(value, 60)}" for name, value, kind in fields if not isinstance(value, kind)]
    if not bad and not all(isinstance(p, Pack) for p in entry.packs):
        bad.append("packs holds something other than the runtime's packs")
    if bad:
        raise UsageError(
            f"this PreparedAdapter was changed after runtime.preload made it ({'; '.join(bad)}); preload the "
            "adapter again and load what preload returns."
        )


def _tensors(adapter: Adapter, plan: LoadPlan) -> Iterator[torch.Tensor]:
    """Every tensor of ``adapter``'s and ``plan``'s modules."""
    for m in (*adapter.modules.values(), *plan.targets.values()):
        for t in (m.A, m.B, m.magnitude, m.bias, m.base_weight):
            if isinstance(t, torch.Tensor):
                yield t
    for w in (*adapter.weights.values(), *plan.weights.values()):
        yield from w.factors.values()


#: how many names given to preload a cache remembers (see :meth:`AdapterCache.name`), and the
#: most bytes they take together (a name is any str a caller passes: a count alone lets 65,536
#: names of a megabyte each pin 64 GiB)
NAMES_KEPT = 1 << 16
NAMES_BYTES = 16 << 20


class AdapterCache:
    """An LRU of :class:`PreparedAdapter`, bounded by ``budget_bytes`` of the host memory its
    entries keep alive (:attr:`PreparedAdapter.nbytes`).

    Raises:
        UsageError: a budget that is not an integer >= 0, a key that is not a str, an entry
            that is not a :class:`PreparedAdapter`.
    """

    def __init__(self, budget_bytes: int) -> None:
        self._budget = checked_budget(budget_bytes)
        self._entries: OrderedDict[str, PreparedAdapter] = OrderedDict()
        self._total = 0  # the entries' nbytes summed (each fixed when first read)
        #: keys given to preload as names of their own (not a source's path), the last NAMES_KEPT
        self._names: OrderedDict[str, int] = OrderedDict()  # name -> its bytes
        self._names_bytes = 0
        #: set while the entries or the names change with their byte counts: an interrupt
        #: (KeyboardInterrupt) midway leaves it set, and the counts are made again (_counting)
        self._unsure = False
        self._lock = threading.Lock()

    @property
    def budget_bytes(self) -> int:
        """Most bytes of packed adapters kept; lowering it evicts at once."""
        return self._budget

    @budget_bytes.setter
    def budget_bytes(self, value: int) -> None:
        budget = checked_budget(value)
        with self._lock, self._counting():
            self._budget = budget
            self._evict_locked()

    @public_api
    def get(self, key: str) -> PreparedAdapter | None:
        """The entry for ``key`` (marked most recently used), or None."""
        key = _key(key)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    @public_api
    def peek(self, key: str) -> PreparedAdapter | None:
        """The entry for ``key``, or None, without marking it used: a load looks its parts up
        before its checks, and marks them (:meth:`touch`) only once it has written them."""
        key = _key(key)
        with self._lock:
            return self._entries.get(key)

    @public_api
    def touch(self, entries: Sequence[PreparedAdapter]) -> None:
        """Marks each of ``entries`` most recently used, where the cache still holds it."""
        wanted = "a list of PreparedAdapter objects (from runtime.preload)"
        if not is_sequence(entries):
            raise UsageError(f"entries={shown(entries, 60)} must be {wanted}, not {type(entries).__name__}.")
        entries = read_entries(entries, "entries", wanted)
        if not all(isinstance(e, PreparedAdapter) for e in entries):
            raise UsageError(f"entries={shown(entries, 60)} must be {wanted}.")
        with self._lock:
            for entry in entries:
                key = text(entry.key) if isinstance(entry.key, str) else None
                if key is not None and self._entries.get(key) is entry:
                    self._entries.move_to_end(key)

    @public_api
    def put(self, entry: PreparedAdapter) -> None:
        """Adds ``entry``, evicting least recently used entries to stay within budget.

        An entry larger than the whole budget is not kept.
        """
        if not isinstance(entry, PreparedAdapter):
            raise UsageError(
                f"AdapterCache holds PreparedAdapter objects (from runtime.preload), not {type(entry).__name__}."
            )
        key = _key(entry.key)
        check_prepared(entry)
        nbytes = entry.nbytes  # before anything is dropped: a failure leaves the cache as it was
        with self._lock, self._counting():
            self._pop_locked(key)
            if nbytes > self._budget:
                return
            self._entries[key] = entry
            self._total += nbytes
            self._evict_locked()

    @contextlib.contextmanager
    def _counting(self) -> Iterator[None]:
        """A change of the entries or the names and their byte counts (under the lock): the
        counts are made again from them first where an earlier change was interrupted midway,
        and marked sure again only where this one completes."""
        if self._unsure:
            self._total, self._names_bytes = self._counts()
        self._unsure = True
        yield
        self._unsure = False  # not reached where the block raised: counted again next time

    def _counts(self) -> tuple[int, int]:
        """The entries' bytes and the names' bytes, counted."""
        return sum(e.nbytes for e in self._entries.values()), sum(self._names.values())

    def _evict_locked(self) -> None:
        while self._total > self._budget:
            self._total -= self._entries.popitem(last=False)[1].nbytes

    def _pop_locked(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._total -= entry.nbytes

    @public_api
    def discard(self, key: str) -> None:
        key = _key(key)
        with self._lock, self._counting():
            self._pop_locked(key)

    @public_api
    def name(self, key: str) -> None:
        """Notes ``key`` as a name given to preload, not a source's path or Hub id: once its entry
        is gone, ``load(key)`` is refused rather than read as a source (:meth:`is_name`)."""
        key = _key(key)
        with self._lock, self._counting():
            self._names_bytes -= self._names.pop(key, 0)
            self._names[key] = str_bytes(key)
            self._names_bytes += self._names[key]
            while len(self._names) > NAMES_KEPT or self._names_bytes > NAMES_BYTES:
                self._names_bytes -= self._names.popitem(last=False)[1]

    @public_api
    def unname(self, key: str) -> None:
        """``key`` is a source's path or Hub id, preloaded as such: no longer a name, and an entry
        kept under that name goes (it would be found before the source's own)."""
        key = _key(key)
        with self._lock, self._counting():
            if key in self._names:
                self._names_bytes -= self._names.pop(key)
                self._pop_locked(key)

    @public_api
    def is_name(self, key: str) -> bool:
        """Whether ``key`` was given to preload as a name (see :meth:`name`)."""
        key = _key(key)
        with self._lock:
            return key in self._names

    def clear(self) -> None:
        with self._lock, self._counting():
            self._entries.clear()
            self._total = 0

    def keys(self) -> list[str]:
        """Keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self.nbytes_locked()

    def nbytes_locked(self) -> int:
        return self._counts()[0] if self._unsure else self._total

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return isinstance(key, str) and text(key) in self._entries

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)


def checked_budget(value: object) -> int:
    """A cache's budget (``inject``'s ``cache_bytes``) as an int: an integer >= 0, NumPy's too.

    Raises:
        UsageError: anything else (a bool, a float, a str such as ``"2GB"``)."""
    budget = whole(value, f"cache_bytes={shown(value, 200)}")
    if budget is None or budget < 0:
        raise UsageError(
            f"cache_bytes={shown(value, 200)} must be an int number of bytes >= 0 (e.g. 2 << 30 for 2 GiB)."
        )
    return budget


def _key(key: object) -> str:
    """A cache key: a str, as a plain one (:func:`lorahot.runtime.arguments.text`)."""
    if not isinstance(key, str):
        raise UsageError(f"cache keys are str, got {type(key).__name__} {shown(key, 60)}.")
    return str(text(key))


def preload_key(key: object) -> str | None:
    """``preload``'s ``key=``: None, or a non-empty str (a plain one: see :func:`text`)."""
    if key is not None and not (isinstance(key, str) and key):
        raise UsageError(f"key={shown(key, 200)} must be a non-empty str (or None: the source's identity).")
    return None if key is None else str(text(key))


def same_path(key: str, source: str | os.PathLike[str]) -> bool:
    """Whether ``key`` names ``source`` itself (the same absolute path)."""
    try:
        return os.path.abspath(key) == os.path.abspath(os.fspath(source))
    except Exception:  # the caller's __fspath__ may raise anything: the read refuses the source
        return False


def private(source: Any) -> Any:
    """``source`` with tensors of its own where it holds the caller's (a mapping of tensors, an
    :class:`Adapter`): a prepared adapter keeps them for stacks and merged mode, and a caller
    that reuses its tensors (``fill_``, an optimizer step) must not change what was checked.
    Within :func:`~lorahot.io.tensorfile.largest_tensor`, a tensor of more elements than any
    layer could take is refused before anything is copied: a copy of an expanded view of a few
    bytes can take terabytes."""
    if isinstance(source, Adapter):
        return _owned_adapter(source)  # checked first: see checked_adapter
    if isinstance(source, Mapping):
        source = plain(source, "source", "a dict of tensors keyed by name")  # read once, keyed by plain strings
        shapes = ((k, v.shape) for k, v in source.items() if isinstance(k, str) and isinstance(v, torch.Tensor))
        refuse_oversized("<mapping>", shapes, "tensors were not copied")  # a copy may be larger than the view
        return {k: _own(v) for k, v in source.items()}
    return source


def snapshot(source: Any) -> Any:
    """:func:`private` of what ``prefetch`` was given, taken before it returns: the caller may
    reuse its tensors or change its dict as soon as it has (preload copies them before it
    returns too). A source it cannot copy goes as it is, for preload to refuse on the prefetch
    thread (the future raises it)."""
    try:
        return private(source)
    except Exception:
        return source


def _owned_adapter(adapter: Adapter) -> Adapter:
    """``adapter`` with each of its modules' tensors copied (a deep copy refuses tensors that are
    not graph leaves), after the checks of a hand-built adapter's structure (which the read
    repeats)."""
    adapter = checked_adapter(adapter)
    modules = {
        k: dataclasses.replace(
            m, A=_own(m.A), B=_own(m.B), base_weight=_own(m.base_weight), magnitude=_own(m.magnitude), bias=_own(m.bias)
        )
        for k, m in adapter.modules.items()
    }
    weights = {
        k: dataclasses.replace(w, factors={n: _own(t) for n, t in w.factors.items()})
        for k, w in adapter.weights.items()
    }
    return dataclasses.replace(adapter, modules=modules, weights=weights)


def _own(value: Any) -> Any:
    """A tensor's detached copy; anything else as it is."""
    return value.detach().clone() if isinstance(value, torch.Tensor) else value
