"""LoRA over torchao's quantized weights (``quantize_``: int8 weight-only, int8 dynamic, float8
weight-only), whose ``weight`` is a tensor subclass holding its values in another form.

Unmerged, the layers add the LoRA to the quantized module's own output: the oracle is that
output plus the update computed densely in float64, through loads, ``set_scale``, per-row
routing, ``unload`` and eject (bitwise the base), eagerly and compiled. Merged mode cannot
rewrite such a weight and refuses it at inject; DoRA, whose factor needs the weight's values,
is refused at load. Skipped where torchao is not installed (it is not a test dependency).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import pytest
import torch
from torch import nn

import lorahot

torchao_quantization = pytest.importorskip("torchao.quantization")

CONFIGS: dict[str, Callable[[], object]] = {
    "int8 weight-only": lambda: torchao_quantization.Int8WeightOnlyConfig(),
    "int8 dynamic": lambda: torchao_quantization.Int8DynamicActivationInt8WeightConfig(),
    "float8 weight-only": lambda: torchao_quantization.Float8WeightOnlyConfig(),
}
P = "base_model.model.proj"
CONFIG = {"r": 2, "lora_alpha": 4}  # scale 2


class _Model(nn.Module):
    def __init__(self, config: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = nn.Linear(32, 16, device=device, dtype=dtype)
        self.head = nn.Linear(16, 8, device=device, dtype=dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torchao_quantization.quantize_(self, CONFIGS[config](), filter_fn=lambda m, name: name == "proj")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.nn.functional.gelu(self.proj(x)))


def _adapter(seed: int, rank: int = 2) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """A PEFT LoRA on ``proj`` (alpha = 2 * rank: scale 2), and its dense ``dW [16, 32]`` (float64)."""
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(rank, 32, generator=gen) / math.sqrt(32)
    b = torch.randn(16, rank, generator=gen) / math.sqrt(rank)
    return {f"{P}.lora_A.weight": a, f"{P}.lora_B.weight": b}, 2.0 * b.double() @ a.double()


def _reference(model: _Model, x: torch.Tensor, delta: torch.Tensor | None) -> torch.Tensor:
    """The model in float64 but for the quantized ``proj``'s own output, plus ``x @ dW.T``."""
    proj = getattr(model.proj, "base_layer", model.proj)
    h = proj(x).double()
    if delta is not None:
        h = h + x.double() @ delta.t()
    head = getattr(model.head, "base_layer", model.head)
    return torch.nn.functional.linear(torch.nn.functional.gelu(h), head.weight.double(), head.bias.double())


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("config", list(CONFIGS))
def test_lora_over_torchao_weights_follows_loads_scales_routing_and_ejects_bitwise(config: str, compiled: bool) -> None:
    model = _Model(config)
    assert type(model.proj.weight) is not nn.Parameter  # the subclass quantize_ put there
    x = torch.randn(3, 5, 32)
    with torch.no_grad():
        base = model(x)
        runtime = lorahot.inject(model, ["proj"], max_rank=4, slots=2)
        run = torch.compile(model) if compiled else model
        assert torch.equal(run(x), base) or compiled
        (first, d1), (second, d2) = _adapter(1), _adapter(2)
        runtime.load(first, config=CONFIG)
        runtime.load(second, slot=1, config=CONFIG)
        tol = {"rtol": 1e-4, "atol": 1e-4}
        torch.testing.assert_close(run(x).double(), _reference(model, x, d1), **tol)
        runtime.set_scale(0.5)
        torch.testing.assert_close(run(x).double(), _reference(model, x, 0.5 * d1), **tol)
        runtime.activate([1, -1, 0])
        rows = [_reference(model, x[i : i + 1], d) for i, d in enumerate((d2, None, 0.5 * d1))]
        torch.testing.assert_close(run(x).double(), torch.cat(rows), **tol)
        runtime.activate(0)
        runtime.unload()
        assert torch.equal(model(x), base)
        runtime.load(first, config=CONFIG)
        runtime.eject()
        assert torch.equal(model(x), base)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_merged_mode_refuses_torchao_weights_and_dora_is_refused_at_load(config: str) -> None:
    """Merged mode failed with an UnexpectedError in its copy of the weight; DoRA's load with an
    UnexpectedError in the weight's norm."""
    model = _Model(config)
    x = torch.randn(3, 32)
    with torch.no_grad():
        base = model(x)
    kind = type(model.proj.weight).__name__
    with pytest.raises(lorahot.UsageError, match=rf"^proj: its weight is of type {kind}, so merged mode cannot"):
        lorahot.inject(model, ["proj"], max_rank=4, merged=True)
    assert type(model.proj) is nn.Linear
    lorahot.inject(model, ["head"], max_rank=4, merged=True)  # a plain layer beside it merges
    runtime = lorahot.inject(_Model(config), ["proj"], max_rank=4, extras=True)
    tensors = {**_adapter(1)[0], f"{P}.lora_magnitude_vector": torch.ones(16)}
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"DoRA's factor .* its weight is of type {kind}"):
        runtime.load(tensors, config={"use_dora": True})
    with torch.no_grad():
        assert torch.equal(_Model(config)(x), base)


@pytest.mark.gpu
def test_gpu_lora_over_torchao_bf16_weights_takes_the_library_path_not_the_fused_kernel() -> None:
    """On CUDA in bfloat16 a torchao weight reports bf16, the fused kernel's dtype, and has no
    bf16 memory to read: the layer computes through the quantized module (library path)."""
    model = _Model("int8 weight-only", device="cuda", dtype=torch.bfloat16)
    x = torch.randn(64, 32, device="cuda", dtype=torch.bfloat16)
    runtime = lorahot.inject(model, ["proj"], max_rank=4)
    assert not model.proj.fused and not model.proj.wide
    tensors, delta = _adapter(1)
    runtime.load(tensors, config=CONFIG)
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), _reference(model, x, delta.cuda()), rtol=3e-2, atol=3e-2)
