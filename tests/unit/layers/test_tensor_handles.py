"""The global handles on the arena tensors (``lorahot.layers.tensor_handles``): an entry lives
with its handle, and a handle collected while something iterates over the tables (the compiler
tracing another model) leaves them the same size."""

from __future__ import annotations

import gc

import torch

from lorahot.layers import tensor_handles
from lorahot.layers.tensor_handles import ROUTES, SEGMENTS, TENSORS, TensorHandle


def test_a_handle_collected_mid_iteration_resizes_no_table() -> None:
    keep = TensorHandle((torch.zeros(2),))
    doomed = TensorHandle((torch.ones(3),))
    key = doomed.key
    ROUTES[key] = torch.tensor([0, -1])
    iterators = [iter(table.items()) for table in (TENSORS, ROUTES, SEGMENTS)]
    for it in iterators:
        next(it)
    del doomed
    gc.collect()
    for it in iterators:
        list(it)  # "dictionary changed size during iteration" before
    assert TENSORS[key] == () and ROUTES[key] is None and SEGMENTS[key] is None  # released in place
    assert key in tensor_handles._retired
    TensorHandle((torch.zeros(1),))  # the next handle: a safe point
    assert all(key not in table for table in (TENSORS, ROUTES, SEGMENTS))
    assert TENSORS[keep.key][0].shape == (2,)


def test_a_live_handle_keeps_its_entry() -> None:
    tensors = (torch.zeros(4), torch.ones(4))
    handle = TensorHandle(tensors)
    gc.collect()
    TensorHandle((torch.zeros(1),))
    assert TENSORS[handle.key] is tensors and ROUTES[handle.key] is None
