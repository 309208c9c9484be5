"""The placement checks every call runs (lorahot/runtime/placement.py): their cost does not grow
with the model's size per layer, and FSDP on a layer's path is still found."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch
from torch import nn

import lorahot


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
