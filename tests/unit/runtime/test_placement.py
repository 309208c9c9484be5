"""The placement checks every call runs (lorahot/runtime/placement.py): their cost does not grow
with the model's size per layer, FSDP on a layer's path is still found, and a module on the path
replaced by one holding the same layers is no layer leaving the model."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import lorahot
from tests.helpers import make_adapter, tiny_lm, token_ids


def _stack(blocks: int) -> nn.Module:
    """``blocks`` blocks of two linears each, inside a few levels of containers."""
    torch.manual_seed(0)
    inner = [nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)) for _ in range(blocks)]
    return nn.Sequential(nn.ModuleDict({"blocks": nn.ModuleList(inner)}))


def _adapter(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for n in names:
        out[f"{n}.lora_A.weight"] = torch.randn(2, 8, generator=g)
        out[f"{n}.lora_B.weight"] = torch.randn(8, 2, generator=g)
    return out


def _walks(monkeypatch: pytest.MonkeyPatch, blocks: int) -> int:
    """How many times one load, set_scale and activate walk a module's descendants
    (``named_modules`` / ``modules``) on a model of ``blocks`` blocks."""
    model = _stack(blocks)
    names = [f"0.blocks.{b}.{i}" for b in range(blocks) for i in (0, 2)]
    runtime = lorahot.inject(model, names, max_rank=4)
    runtime.load(_adapter(model, names))
    count = 0
    real = nn.Module.named_modules

    def counted(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        nonlocal count
        count += 1
        return real(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "named_modules", counted)
    runtime.load({k: 2 * v for k, v in _adapter(model, names).items()})
    runtime.set_scale(0.5)
    runtime.activate(0)
    monkeypatch.setattr(nn.Module, "named_modules", real)
    return count


def test_the_checks_of_each_call_do_not_walk_the_model_once_per_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """With FSDP's classes imported (as transformers and diffusers do), each call looked for FSDP
    wrappers by walking every module of the model once per layer, twice per load: a swap of an
    SDXL-sized UNet's 700 layers took 3.3 s on an H100 where it took 47 ms. The walks per call
    no longer grow with the number of layers."""
    pytest.importorskip("torch.distributed.fsdp")
    import torch.distributed.fsdp  # noqa: F401  # the classes the FSDP check looks for exist

    assert _walks(monkeypatch, 4) == _walks(monkeypatch, 32)


def test_a_block_fully_sharded_after_inject_is_refused_naming_it(one_rank: Any) -> None:
    """``fully_shard`` on a block (not the model) after inject: found on the layer's path (each
    module on it, not every module of the model), named as the innermost FSDP module, and the
    load writes nothing."""
    from torch.distributed.fsdp import fully_shard

    model = _stack(2)
    names = ["0.blocks.0.0", "0.blocks.1.2"]
    runtime = lorahot.inject(model, names, max_rank=4)
    runtime.load(_adapter(model, names))
    fully_shard(model[0]["blocks"][1], mesh=one_rank)
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    with pytest.raises(lorahot.UsageError, match=rf"^{re.escape('0.blocks.1.2')}: .* on 0\.blocks\.1\)"):
        runtime.load({k: 2 * v for k, v in _adapter(model, names).items()})
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())


def test_each_call_looks_at_a_weight_it_finds_unchanged_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """A load checks every layer twice (before and after its read): a base weight still a
    Parameter of the class inject saw is not looked at again in full (``is_sharded``, the walk
    for FSDP1's flat parameters), which cost about 5 us a layer (3.6 ms a check on an SDXL-shaped
    UNet's 700 layers, 0.5 ms now)."""
    from lorahot.runtime import placement

    model = _stack(8)
    names = [f"0.blocks.{b}.{i}" for b in range(8) for i in (0, 2)]
    runtime = lorahot.inject(model, names, max_rank=4)
    calls = {"is_sharded": 0, "flattened_on_path": 0}

    def counted(name: str) -> Any:
        real = getattr(placement, name)

        def call(*args: Any) -> Any:
            calls[name] += 1
            return real(*args)

        return call

    for name in calls:
        monkeypatch.setattr(placement, name, counted(name))
    runtime.load(_adapter(model, names))
    runtime.set_scale(0.5)
    runtime.activate(0)
    assert calls == {"is_sharded": 0, "flattened_on_path": 0}


@pytest.mark.parametrize("change", ["parallelized", "gathered"])
def test_a_base_weight_parallelized_or_gathered_after_inject_is_refused(change: str, one_rank: Any) -> None:
    """The weight's class says whether it changed: a plain weight replaced by a DTensor
    Parameter after inject (as ``parallelize_module`` registers one), or a DTensor weight by a
    plain one, is looked at in full and refused; the load writes nothing."""
    from torch.distributed.tensor import Shard, distribute_tensor

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    if change == "gathered":
        model[0].weight = nn.Parameter(distribute_tensor(model[0].weight.detach(), one_rank, [Shard(0)]))
    runtime = lorahot.inject(model, ["0"], max_rank=4)
    base = model[0].base_layer
    weight = base.weight.detach()
    new = weight.full_tensor() if change == "gathered" else distribute_tensor(weight, one_rank, [Shard(0)])
    base._parameters["weight"] = nn.Parameter(new)  # as parallelize_module puts its Parameters in
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    now = "no longer" if change == "gathered" else "now"
    with pytest.raises(lorahot.UsageError, match=rf"^0: its base layer was parallelized \(or gathered\) .*is {now} a"):
        runtime.load(_adapter(model, ["0"]))
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())


def _checkpointed_in_a_new_list(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    model.layers[0] = checkpoint_wrapper(model.layers[0])  # type: ignore[index]
    model.layers = nn.ModuleList(list(model.layers))  # type: ignore[arg-type]


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize(
    "edit",
    [
        lambda model: setattr(model, "layers", nn.ModuleList(list(model.layers))),
        lambda model: model.layers.__setitem__(0, copy.copy(model.layers[0])),
        _checkpointed_in_a_new_list,
    ],
    ids=["a new list of the same blocks", "a shallow copy of a block", "checkpointed, then a new list"],
)
def test_a_module_on_the_path_replaced_by_one_holding_the_same_layers_keeps_serving(
    edit: Callable[[nn.Module], object], merged: bool
) -> None:
    """A module on the layers' paths replaced by one that holds the same layers at the same paths
    (``model.layers = nn.ModuleList(list(model.layers))``) leaves every layer in the model, where
    the calls write: each call raised ``UnexpectedError`` (``StopIteration``: the check found the
    paths changed, then no layer that left). Loads, scales and activations go on, computing what
    the same model unedited computes (float64), eject gives the base model back bitwise, and a
    layer replaced afterwards is still refused."""
    models, runtimes = [], []
    for _ in range(2):
        model = tiny_lm(dtype=torch.float64)
        runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4, slots=2, merged=merged)
        runtime.load(make_adapter(model, dict.fromkeys(runtime.layers, 3), seed=1, dtype=torch.float64)[0])
        models.append(model)
        runtimes.append(runtime)
    edit(models[0])
    ids = token_ids((2, 6), 32, seed=1)
    second = make_adapter(models[1], dict.fromkeys(runtimes[1].layers, 2), seed=2, dtype=torch.float64)[0]
    for runtime in runtimes:
        runtime.load(second, slot=1)
        runtime.activate(1)
        runtime.set_scale(0.5)
    with torch.no_grad():
        torch.testing.assert_close(models[0](ids), models[1](ids), rtol=0, atol=1e-12)
    models[0].layers[1].self_attn.q_proj = nn.Linear(16, 16, dtype=torch.float64)
    with pytest.raises(lorahot.UsageError, match=r"^layers\.1\.self_attn\.q_proj: this LoRA layer is no longer"):
        runtimes[0].set_scale(1.0)
    models[0].layers[1].self_attn.q_proj = runtimes[0].layers["layers.1.self_attn.q_proj"]
    runtimes[0].set_scale(1.0)
    lorahot.eject(models[0])
    base = tiny_lm(dtype=torch.float64).state_dict()
    state = models[0].state_dict()
    assert state.keys() == base.keys() and all(torch.equal(state[k], v) for k, v in base.items())
