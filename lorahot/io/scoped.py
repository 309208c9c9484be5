"""A context variable set for the span of a ``with`` block, interrupt-safe.

The reads of a load take per-call settings from context variables (the read buffers lent,
the digests wanted, the largest tensor a header may declare). ``token = var.set(v)`` followed
by ``try: ... finally: var.reset(token)`` leaves the variable set for good where an interrupt
(Ctrl-C, a signal) lands between the two statements: every later read in that context then
lands in buffers lent to a load long finished. :func:`scoped` sets the variable inside the
``try`` and restores the value it had, so the block leaves it as it found it wherever an
interrupt lands.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from typing import TypeVar

__all__ = ["scoped"]

_T = TypeVar("_T")


@contextlib.contextmanager
def scoped(var: ContextVar[_T], value: _T) -> Iterator[_T]:
    """``var`` set to ``value`` within the block (yielded), back to its value before it
    after, however the block ends."""
    before = var.get()
    try:
        var.set(value)
        yield value
    finally:
        var.set(before)
