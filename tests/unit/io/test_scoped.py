"""The context variables a load's reads take their settings from (lorahot/io/scoped.py): an
interrupt while a block sets one leaves it as it was."""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextlib import AbstractContextManager
from contextvars import ContextVar
from types import FrameType
from typing import Any

import pytest
import torch

from lorahot.io import digests, read_buffers, tensorfile
from lorahot.io.read_buffers import ReadBuffers

_TRACED = ("lorahot/io/scoped.py", "lorahot/io/read_buffers.py", "lorahot/io/digests.py", "lorahot/io/tensorfile.py")

BLOCKS: dict[str, tuple[Callable[[], AbstractContextManager[Any]], ContextVar[Any]]] = {
    "read_buffers.lend": (lambda: ReadBuffers(torch.device("cpu")).lend(0), read_buffers._LENT),
    "digests.recording": (lambda: digests.recording(["/x"]), digests._WANTED),
    "tensorfile.largest_tensor": (lambda: tensorfile.largest_tensor(10), tensorfile._LARGEST),
}


def _enter_interrupted_at(k: int, block: AbstractContextManager[Any]) -> bool:
    """Enters ``block`` with a KeyboardInterrupt raised at the k-th line lorahot's io runs
    while entering; True where it was raised (else the block is entered and left again)."""
    seen = 0

    def trace(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal seen
        if not frame.f_code.co_filename.replace("\\", "/").endswith(_TRACED):
            return None
        if event == "line":
            seen += 1
            if seen == k:
                raise KeyboardInterrupt
        return trace

    sys.settrace(trace)
    try:
        block.__enter__()
    except KeyboardInterrupt:
        return True
    finally:
        sys.settrace(None)
    block.__exit__(None, None, None)
    return False


@pytest.mark.parametrize("name", list(BLOCKS))
def test_an_interrupt_while_a_block_sets_its_variable_leaves_it_as_it_was(name: str) -> None:
    """``token = var.set(v)`` then ``try: yield finally: var.reset(token)`` left the variable
    set where an interrupt came between the two: a load's lent read buffers stayed lent to
    every later read of the thread (a suite's next test saw them, as a later load would).
    Interrupted at each line of entering the block, the variable is as before."""
    make, var = BLOCKS[name]
    before = var.get()
    k = 1
    while _enter_interrupted_at(k, make()):
        assert var.get() is before, f"interrupted at line {k} of entering {name}: the variable stays set"
        k += 1
    assert k > 2 and var.get() is before  # interrupted at a few points, then entered and left whole
