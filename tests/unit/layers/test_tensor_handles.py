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
from lorahot.layers.tensor_handles import ROUTES, SEGMENTS, TENSORS, TOKENS, TensorHandle
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
    fresh = TensorHandle((torch.zeros(1),))  # the next handle: a safe point, which may take the freed key
    assert all(key not in table for table in (TENSORS, ROUTES, SEGMENTS)) or fresh.key == key
    assert TENSORS[fresh.key][0].shape == (1,) and ROUTES[fresh.key] is None and SEGMENTS[fresh.key] is None
    assert TENSORS[keep.key][0].shape == (2,)


def test_a_live_handle_keeps_its_entry() -> None:
    tensors = (torch.zeros(4), torch.ones(4))
    handle = TensorHandle(tensors)
    gc.collect()
    TensorHandle((torch.zeros(1),))
    assert TENSORS[handle.key] is tensors and ROUTES[handle.key] is None


def test_a_copied_handle_owns_a_new_key_over_the_copied_tensors_and_routing() -> None:
    """The copy's routing is a copy of the original's (equal, not shared): the original's
    later routings do not reach it."""
    t = torch.arange(4.0)
    handle = TensorHandle((t,))
    ROUTES[handle.key], TOKENS[handle.key], SEGMENTS[handle.key] = torch.tensor([0, -1]), True, torch.tensor([1, 2])
    memo: dict = {}
    twin = copy.deepcopy(handle, memo)
    assert twin.key != handle.key
    assert TENSORS[twin.key][0] is memo[id(t)] and torch.equal(TENSORS[twin.key][0], t)
    for table in (ROUTES, SEGMENTS):
        assert table[twin.key] is not table[handle.key] and torch.equal(table[twin.key], table[handle.key])
    assert TOKENS[twin.key] is True
    ROUTES[handle.key] = SEGMENTS[handle.key] = None
    TOKENS[handle.key] = False
    assert ROUTES[twin.key] is not None  # the original's change does not reach the copy
    unrouted = copy.deepcopy(handle)
    assert ROUTES[unrouted.key] is None and SEGMENTS[unrouted.key] is None and TOKENS[unrouted.key] is False


def test_a_copied_or_reloaded_routed_model_keeps_each_row_s_slot() -> None:
    """A model copied (``deepcopy``, ``torch.save``/``torch.load``) while a per-row routing is
    in force computes each row with its own slot, as the original did when copied, eagerly and
    compiled; the original's later routings do not reach it. Without the routing copied, every
    row of the copy computed with the live slot, silently."""
    model = tiny_lm(dtype=torch.float64)
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4, slots=2)
    names = list(runtime.layers)
    for slot in range(2):
        runtime.load(make_adapter(model, dict.fromkeys(names, 4), seed=slot + 1, dtype=torch.float64)[0], slot=slot)
    ids = token_ids((3, 6), 32, seed=1)
    runtime.activate([1, -1, 0])
    with torch.no_grad():
        want = model(ids)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copies = [copy.deepcopy(model), torch.load(buffer, weights_only=False)]
        runtime.activate(0)
        assert not torch.equal(model(ids), want)
        for c in copies:
            torch.testing.assert_close(c(ids), want, rtol=1e-12, atol=1e-12)
            compiled = torch.compile(c, backend="aot_eager", fullgraph=True)
            torch.testing.assert_close(compiled(ids), want, rtol=1e-12, atol=1e-12)


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
