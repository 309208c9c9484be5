"""One runtime call at a time, and no call from within one on its own thread.

``load``, ``activate``, ``unload`` and ``set_scale`` each hold a runtime's call lock
(:class:`CallGuard`), so that calls from two threads run one after the other: interleaved,
their writes could leave a slot holding parts of two adapters that ``info`` does not describe.
Code such a call runs (a source's mapping methods or ``__fspath__``, an argument's
``__float__``, ``__index__``, ``__len__`` or ``__getitem__``) calling the runtime again on the
same thread is refused (:meth:`CallGuard.refuse_within_call`): it would change the slots under
a call that has checked its arguments against them. A load also holds the read buffers
(:func:`reading`). Forwards take no lock (see the README's threading contract). Each call runs
with autocast off (:meth:`CallGuard.autocast_off`): what it computes on the device (DoRA factors,
merged weights) is part of the adapter, not of one forward.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Concatenate, ParamSpec, Protocol, TypeVar

import torch

from lorahot.errors import UsageError
from lorahot.io.read_buffers import ReadBuffers
from lorahot.layers.state_marks import count_calls

__all__ = ["CallGuard", "on_prefetch_thread", "one_call_at_a_time", "reading"]

_T = TypeVar("_T")
_P = ParamSpec("_P")


class CallGuard:
    """A runtime's call lock, and the note of the call holding it (for the message of
    :meth:`refuse_within_call`)."""

    def __init__(self, keys: tuple[int, ...] = (), device_types: tuple[str, ...] = ()) -> None:
        #: the device types of the runtime's buffers, besides the CPU: autocast is off there for each call
        self.device_types = tuple(dict.fromkeys(("cpu", *device_types)))
        #: the runtime's arena handle keys: every call under way is counted on them when it ends,
        #: done or not (:func:`lorahot.layers.state_marks.count_calls`: a checkpointed forward's
        #: recompute after a call is refused)
        self.keys = keys
        #: held by load, activate, unload and set_scale (see one_call_at_a_time); reentrant: a
        #: forward hook of the model may call them within one of them on the same thread
        self.calls = threading.RLock()
        #: the call holding the call lock and its thread: code it runs (a source's mapping or
        #: __fspath__, an argument's __float__, __index__ or __getitem__) calling the runtime on that
        #: thread is refused (refuse_within_call)
        self._running: tuple[int, str] | None = None

    @contextlib.contextmanager
    def under_way(self, call: str) -> Iterator[None]:
        """Notes ``call`` (``load``, ``activate``, ``unload``, ``set_scale``, under the call lock)
        as running on this thread, for the message of :meth:`refuse_within_call` (called
        before the lock is taken)."""
        self._running = threading.get_ident(), call
        try:
            yield
        finally:
            self._running = None
            count_calls(self.keys)

    @contextlib.contextmanager
    def autocast_off(self) -> Iterator[None]:
        """Autocast off on the runtime's devices for a call made under ``torch.autocast``: a
        serving loop may wrap every step in it, and the call would compute what it keeps for
        every later forward in the autocast dtype (a float32 model's DoRA factors
        ``m / ||W0 + s B @ A||``, its merged DoRA weights: 2e-3 to 8e-3 off, where float32
        rounding is 3e-7). Only where autocast is on: a call outside it enters nothing."""
        with contextlib.ExitStack() as stack:
            for device_type in self.device_types:
                if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
                    stack.enter_context(torch.autocast(device_type, enabled=False))
            yield

    def refuse_within_call(self, call: str) -> None:
        """Refuses ``call`` issued on the thread of a runtime call under way, from code that call
        runs: a source's mapping methods or ``__fspath__`` (a load would wait forever for the read
        buffers its own thread holds), an argument's ``__float__``, ``__index__``, ``__len__`` or
        ``__getitem__`` (``set_scale([w0, w1])`` reads its weights against the stack the slot
        holds). Any such call would change the slots, or eject the runtime, under a call that has
        checked its arguments against them. Nothing has changed when this raises.

        A call is under way on this thread exactly where this thread holds the call lock (which
        every such call takes after this check); the note of :meth:`under_way` only names it,
        so a note an interrupt left behind (a signal before its reset ran) refuses nothing."""
        if not self.calls._is_owned():  # type: ignore[attr-defined]  # RLock's own test, as Condition uses it
            return
        running = self._running
        if running is None or running[0] != threading.get_ident():
            running = threading.get_ident(), "another call"
        if running[1] != "load":
            raise UsageError(
                f"runtime.{call}() was called while runtime.{running[1]}() of this runtime runs on the same thread "
                "(from code it runs: an argument's __float__, __index__, __len__ or __getitem__), which would change "
                f"the slots, or eject the runtime, under a {running[1]} that has checked its arguments against them; "
                "call the runtime after it returns, or pass plain numbers (float(w), int(slot), list(weights))."
            )
        raise UsageError(
            f"runtime.{call}() was called while a load of this runtime runs on the same thread (from code that "
            "load runs: the source's mapping methods, its __fspath__ or its tensors), which would wait forever "
            "for that load's read buffers or change the slots that load has checked; call the runtime after load "
            "returns, or build the source before calling load."
        )


class _Guarded(Protocol):
    """A runtime: what :func:`one_call_at_a_time` takes the guard of."""

    @property
    def _guard(self) -> CallGuard: ...


_G = TypeVar("_G", bound=_Guarded)


def one_call_at_a_time(method: Callable[Concatenate[_G, _P], _T]) -> Callable[Concatenate[_G, _P], _T]:
    """Runs ``method`` (``activate``, ``unload``, ``set_scale``; ``load`` takes it itself) holding the runtime's
    call lock, so that calls from two threads run one after the other: interleaved, their writes
    could leave a slot holding parts of two adapters (merged mode's weights too) that ``info``
    does not describe. Forwards take no lock (see the README's threading contract)."""

    @functools.wraps(method)
    def one_at_a_time(runtime: _G, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        guard = runtime._guard
        guard.refuse_within_call(method.__name__)
        with guard.calls, guard.under_way(method.__name__), guard.autocast_off():
            return method(runtime, *args, **kwargs)

    return one_at_a_time


def on_prefetch_thread(executor: ThreadPoolExecutor | None) -> bool:
    """Whether this thread is one of ``executor``'s (a runtime's prefetch thread)."""
    return threading.current_thread() in getattr(executor, "_threads", ())


@contextlib.contextmanager
def reading(read_buffers: ReadBuffers | None) -> Iterator[None]:
    """A load's hold on the read buffers: one load at a time reads into them, and whatever
    it queued on the device (its transfers, checks and writes) is waited for before the
    next transfer into them, whether the load succeeded or not."""
    if read_buffers is None:
        yield
        return
    with read_buffers.lock:
        try:
            yield
        finally:
            read_buffers.used()
