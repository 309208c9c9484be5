"""lorahot.runtime.aliases: an adapter whose tensors are views of what the load writes (the
live adapter's ``lora_A`` / ``lora_B``, rows of the arena) is copied before the write, so it
loads as its copy would, instead of a write that reads what it overwrites."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing._internal.two_tensor import TwoTensor

import lorahot
from lorahot.runtime import lora_runtime
from tests.helpers import make_adapter, model_reference, tiny_lm, token_ids

N = "layers.0.self_attn.q_proj"
P = "base_model.model." + N


def _loaded(slots: int) -> tuple[torch.nn.Module, lorahot.LoraRuntime]:
    model = tiny_lm(seed=0, vocab=32, dtype=torch.float64)
    runtime = lorahot.inject(model, ["q_proj"], max_rank=8, slots=slots)
    runtime.load(make_adapter(model, {N: 4}, seed=1, dtype=torch.float64)[0], slot=0)
    return model, runtime


def _live_views(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The live adapter, as views of the layer's own buffers."""
    layer = model.get_submodule(N)
    return {f"{P}.lora_A.weight": layer.lora_A[:4], f"{P}.lora_B.weight": layer.lora_B[:4].t()}


@pytest.mark.parametrize("slots", [1, 2])
def test_the_live_adapter_loaded_again_from_its_own_views_loads_as_its_copy(slots: int) -> None:
    model, runtime = _loaded(slots)
    x = token_ids((2, 5), 32)
    with torch.no_grad():
        before = model(x)
        views = _live_views(model)
        copies = {k: v.clone() for k, v in views.items()}
        runtime.load(views, slot=0, scale=0.5)
        halved = model(x)
        runtime.load(copies, slot=0, scale=0.5)
        assert torch.equal(model(x), halved)
        assert not torch.equal(halved, before) and runtime.info(0) is not None


def test_rows_of_the_slot_s_own_region_load_into_it() -> None:
    """Views of the arena rows the write itself overwrites, in slot 0's region and in the live
    region, and a stack with one such part."""
    model, runtime = _loaded(slots=2)
    arena = runtime.buffers.arenas[0]
    index = runtime.buffers.where[N][1]
    x = token_ids((2, 5), 32)
    with torch.no_grad():
        want = model(x)
        for region in (0, runtime.buffers.live):
            a, bt = arena.rows(index, region)
            runtime.load({f"{P}.lora_A.weight": a[:4], f"{P}.lora_B.weight": bt[:4].t()}, slot=0)
            assert torch.equal(model(x), want)
        runtime.load([_live_views(model)], slot=0)
        assert torch.equal(model(x), want)


def test_negative_control_without_the_copy_the_write_fails_and_empties_the_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(lora_runtime, "unaliased", lambda adapter, storages: adapter)
    model, runtime = _loaded(slots=1)
    with pytest.raises(lorahot.WriteError, match="slot 0 was emptied"):
        runtime.load(_live_views(model), slot=0)
    assert runtime.info(0) is None


class _Quantized(nn.Module):
    """A module holding its weight as a wrapper tensor subclass (as torchao's quantized weights
    are held), which the model computes with through its own code; never a target."""

    def __init__(self) -> None:
        super().__init__()
        two = TwoTensor(torch.randn(4, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64))
        self.weight = nn.Parameter(two, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.a.t()  # (..., 4)


class _WithQuantized(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(8, 6).double()
        self.other = _Quantized()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.proj(x), self.other(x)], dim=-1)


@pytest.mark.parametrize("merged", [False, True])
def test_a_model_holding_tensor_subclass_weights_elsewhere_injects_and_loads(merged: bool) -> None:
    """A wrapper tensor subclass (torchao's quantized and float8 weights) has a storage with no
    data to point at: listing the model's memory (the runtime's own storages, and merged mode's
    tie check) read every parameter's, and inject failed with an UnexpectedError wherever in the
    model such a weight was, targeted or not."""
    model = _WithQuantized()
    x = torch.randn(3, 8, dtype=torch.float64)
    runtime = lorahot.inject(model, ["proj"], max_rank=4, merged=merged)
    tensors, ab = make_adapter(model, {"proj": 2}, seed=1, dtype=torch.float64)
    runtime.load(tensors)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model_reference(_WithQuantized(), x, {"proj": (*ab["proj"], 1.0)}))
