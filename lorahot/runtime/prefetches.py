"""The keys of prefetches still under way, so that a ``load`` of one waits for its adapter.

``runtime.prefetch(source, key="name")`` prepares the adapter on the prefetch thread, and the
host cache holds ``"name"`` only once that is done. A ``load("name")`` issued meanwhile found
no entry and no name given to preload, so it read ``"name"`` as a path or Hub id: another
adapter of that name, or a request to the Hub, depending on which thread came first. Here a
load of a key whose prefetch is queued or running waits for it, then takes the entry as any
load of a key does; a key whose prefetch failed is refused, naming the failure, and is noted as
a name given to preload (:meth:`lorahot.runtime.cache.AdapterCache.name`), so that a later load
of it is refused too rather than read.

A load finds the keys it may wait for among its sources with :func:`keys_of`.

The prefetch threads themselves (:func:`prefetch_pool`): at interpreter exit, Python joins a
pool's thread only once it has run every prefetch still queued, so a script that queued many
(Hub downloads, each up to its timeout) took that long to exit. Those still queued are
cancelled first (their futures raise ``CancelledError``, as after ``eject``); the one under way
finishes.

A done callback that raises what is not an ``Exception`` (``SystemExit``, ``KeyboardInterrupt``)
on the prefetch thread went out of ``concurrent.futures``' worker loop, which logs it and ends
the thread: the pool, which starts no other, left every later prefetch queued, and a load of
its key (or its ``result()``) waited forever. A prefetch's future (:class:`PrefetchFuture`) runs
its callbacks there as ``concurrent.futures`` runs them, logging and dropping what they raise.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import logging
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from lorahot.errors import LoraError, UsageError, message, shown
from lorahot.memo import str_bytes
from lorahot.runtime.arguments import parts_of
from lorahot.runtime.cache import AdapterCache, PreparedAdapter

__all__ = ["PendingKeys", "PrefetchFuture", "failed_prefetch", "keys_of", "prefetch_pool", "shielded"]


#: how many failed prefetches' keys are remembered with their errors (the last ones), and the
#: most bytes those keys and errors take together (a key is any str a caller passes: a count
#: alone let 256 keys of 4 MiB each pin 1 GiB), as the cache bounds its names
FAILURES_KEPT = 256
FAILURES_BYTES = 16 << 20


class PendingKeys:
    """The futures of keyed prefetches not yet done, by key (the last one for a key given
    twice), and the errors of the last :data:`FAILURES_KEPT` keys whose prefetch failed (at
    most :data:`FAILURES_BYTES` of keys and errors)."""

    def __init__(self, cache: AdapterCache) -> None:
        self._cache = cache
        self._pending: dict[str, tuple[Future[PreparedAdapter], bool]] = {}  # key -> (future, named)
        self._failed: OrderedDict[str, tuple[str, int]] = OrderedDict()  # key -> (what its prefetch raised, bytes)
        self._lock = threading.Lock()

    def add(self, key: str, future: Future[PreparedAdapter], named: bool) -> None:
        """Notes ``future`` as the prefetch of ``key`` until it is done; ``named``: the key is a
        name of its own (not its source's path), noted as one if the prefetch fails."""
        with self._lock:
            self._pending[key] = future, named
            self._failed.pop(key, None)
        future.add_done_callback(functools.partial(self._done, key, named))

    def _done(self, key: str, named: bool, future: Future[PreparedAdapter]) -> None:
        failure = _failure(future)
        with self._lock:
            if self._pending.get(key, (None,))[0] is not future:
                return  # a later prefetch of the key
            del self._pending[key]
            if failure is not None and named:
                self._remember_locked(key, failure)
        if named and failure is not None:
            self._cache.name(key)

    def forget(self, key: str) -> None:
        """``key`` was preloaded since its prefetch failed: the failure no longer describes it."""
        with self._lock:
            self._failed.pop(key, None)

    def _remember_locked(self, key: str, failure: str) -> None:
        """Keeps ``failure`` for ``key``, dropping the oldest beyond :data:`FAILURES_KEPT` or
        :data:`FAILURES_BYTES` (one larger than that alone is not kept: a load of its key is
        refused as a name with no entry, :meth:`AdapterCache.name`, or reads it as a path)."""
        self._failed.pop(key, None)
        self._failed[key] = failure, str_bytes(key) + str_bytes(failure)
        while len(self._failed) > FAILURES_KEPT or self._bytes_locked() > FAILURES_BYTES:
            self._failed.popitem(last=False)

    def _bytes_locked(self) -> int:
        """The failures' bytes, summed (at most :data:`FAILURES_KEPT` of them): no running count
        for an interrupt to leave wrong."""
        return sum(size for _, size in self._failed.values())

    def settle(self, keys: list[str], on_prefetch_thread: bool) -> None:
        """Waits until the prefetch of each of ``keys`` under way, if any, is done, raising
        nothing (:meth:`failure` tells how it went). A load calls this before it takes the
        runtime's call lock: a done callback of an earlier prefetch may be waiting for that
        lock on the prefetch thread, which the prefetch of ``keys`` needs."""
        if on_prefetch_thread:
            return
        with self._lock:
            futures = [p[0] for p in (self._pending.get(k) for k in keys) if p is not None]
        concurrent.futures.wait(futures)

    def failure(self, key: str, on_prefetch_thread: bool) -> str | None:
        """Once the prefetch of ``key`` under way, if any, is done: what it raised, if it (or the
        last prefetch of ``key``) failed and ``key`` is a name of its own, else None (a key that
        is its source's path is read as that path).

        Raises:
            UsageError: that prefetch is not done and this is the prefetch thread itself, which
                would wait for itself (a load in a prefetch future's done callback).
        """
        with self._lock:
            pending = self._pending.get(key)
            failed = self._failed.get(key)
        if pending is None:
            return None if failed is None else failed[0]
        future, named = pending
        if on_prefetch_thread and not future.done():
            raise UsageError(
                f"{shown(key, 200)} is the key of a prefetch queued on the prefetch thread, and this load runs on "
                "that thread (a prefetch future's done callback), which cannot wait for it; load it from the "
                "serving thread."
            )
        concurrent.futures.wait([future])
        return _failure(future) if named else None


def failed_prefetch(key: str, failure: str) -> UsageError:
    """The refusal of a load of ``key``, whose prefetch failed (``failure``: what it raised)."""
    return UsageError(
        f"{shown(key, 200)} is the key of a prefetch that failed ({failure}), so there is no adapter under that "
        "name; fix the source and prefetch or preload it again."
    )


def _failure(future: Future[PreparedAdapter]) -> str | None:
    """What a done prefetch raised, as text (the error itself would keep its frames alive)."""
    if future.cancelled():
        return "CancelledError: cancelled by eject or at interpreter exit"
    exc = future.exception()
    if exc is None:
        return None
    return f"{type(exc).__name__}: {message(exc) if isinstance(exc, LoraError) else exc}"


class PrefetchFuture(Future[PreparedAdapter]):
    """The future of a prefetch: a :class:`~concurrent.futures.Future` whose done callbacks,
    where they run on the prefetch thread, cannot end it (see the module docstring)."""

    def add_done_callback(self, fn: Callable[[Future[PreparedAdapter]], object]) -> None:
        super().add_done_callback(functools.partial(_shielded, fn))


def _shielded(fn: Callable[[Future[PreparedAdapter]], object], future: Future[PreparedAdapter]) -> None:
    """Calls ``fn(future)``; on the prefetch thread, logs what it raises as ``concurrent.futures``
    logs a callback's ``Exception``, rather than let it end the thread."""
    try:
        fn(future)
    except BaseException:
        if not threading.current_thread().name.startswith(_THREAD_PREFIX):
            raise
        logging.getLogger("concurrent.futures").exception("exception calling callback for %r", future)


def shielded(future: Future[PreparedAdapter]) -> PrefetchFuture:
    """``future``, a prefetch pool's, as a :class:`PrefetchFuture` (the same object: the pool
    completes it, and ``eject`` cancels it)."""
    future.__class__ = PrefetchFuture
    return future  # type: ignore[return-value]


#: the name of every prefetch thread starts so
_THREAD_PREFIX = "lorahot-prefetch"

#: every prefetch pool alive, whose queued prefetches are cancelled at interpreter exit
_POOLS: weakref.WeakSet[ThreadPoolExecutor] = weakref.WeakSet()
_registered = threading.Lock()
_hooked = False  # the exit hook is registered once per process, with the first pool


def prefetch_pool() -> ThreadPoolExecutor:
    """A runtime's prefetch thread (one: prefetches run in the order given), whose queued
    prefetches are cancelled when the interpreter exits."""
    global _hooked
    with _registered:
        if not _hooked:
            _at_exit(_cancel_queued)
            _hooked = True
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=_THREAD_PREFIX)
        _POOLS.add(pool)
    return pool


def _at_exit(hook: Callable[[], None]) -> None:
    """Runs ``hook`` at interpreter exit before non-daemon threads are joined: ``threading``'s
    own hooks run there, last registered first, so this runs before ``concurrent.futures``'
    (registered when it was imported) joins the pools. Where that hook is missing or exit has
    begun, nothing is registered (queued prefetches then run before exit, as they did)."""
    register = getattr(threading, "_register_atexit", None)
    if register is None:
        return
    with contextlib.suppress(RuntimeError):  # "can't register atexit after shutdown"
        register(hook)


def _cancel_queued() -> None:
    with _registered:
        pools = list(_POOLS)
    for pool in pools:
        pool.shutdown(wait=False, cancel_futures=True)


def keys_of(source: object) -> list[str]:
    """The strings among a load's sources (perhaps preload keys); none where ``source`` is no
    list a load takes (its checks say why)."""
    try:
        sources, _ = parts_of(source)
    except Exception:
        return []
    return [s for s in sources if isinstance(s, str)]
