"""The global handles on the arena tensors (``lorahot.layers.tensor_handles``): an entry lives
with its handle, and a handle collected while something iterates over the tables (the compiler
tracing another model) leaves them the same size."""

from __future__ import annotations

import copy
import gc
import io

import torch

import lorahot
from lorahot.layers import tensor_handles
from lorahot.layers.tensor_handles import ROUTES, SEGMENTS, TENSORS, TensorHandle
from tests.helpers import make_adapter, tiny_lm, token_ids


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


def test_a_copied_handle_owns_a_new_key_over_the_copied_tensors() -> None:
    t = torch.arange(4.0)
    handle = TensorHandle((t,))
    ROUTES[handle.key] = torch.tensor([0])
    memo: dict = {}
    twin = copy.deepcopy(handle, memo)
    assert twin.key != handle.key and ROUTES[twin.key] is None
    assert TENSORS[twin.key][0] is memo[id(t)] and torch.equal(TENSORS[twin.key][0], t)
    ROUTES[handle.key] = None


def _model_and_copies() -> tuple[torch.nn.Module, lorahot.LoraRuntime, list[torch.nn.Module], torch.Tensor]:
    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4, slots=2)
    names = list(runtime.layers)
    for slot in range(2):
        runtime.load(make_adapter(model, dict.fromkeys(names, 4), seed=slot + 1)[0], slot=slot)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    copies = [copy.deepcopy(model), torch.load(buffer, weights_only=False)]
    return model, runtime, copies, token_ids((2, 6), 32, seed=1)


def test_a_copied_or_reloaded_model_keeps_its_adapter_through_the_original_s_swaps_and_routings() -> None:
    """A copy belongs to no runtime: the original's loads and routings reach neither its eager
    nor its compiled forward, and it runs after the original is gone."""
    model, runtime, copies, ids = _model_and_copies()
    with torch.no_grad():
        want = model(ids)
        compiled = [torch.compile(c, backend="aot_eager", fullgraph=True) for c in copies]
        runtime.activate(1)  # another adapter in the original
        other = model(ids)
        runtime.activate([1, -1])
        assert not torch.equal(other, want)
        for c, fn in zip(copies, compiled):
            assert torch.equal(c(ids), want)
            assert torch.equal(fn(ids), want)
        del model, runtime
        gc.collect()
        for fn in compiled:
            assert torch.equal(fn(ids), want)
