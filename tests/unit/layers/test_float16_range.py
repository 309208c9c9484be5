"""float16 layers whose rank-wide intermediate leaves float16's range (largest value 65504)
while the output stays well inside it: lorahot's library formula keeps ``x @ A.T`` and
``s * (x @ A.T)`` in float32 (:func:`lorahot.layers.base.library_operands`), as PEFT does with
its default float32 adapter weights, and matches a float64 reference to float16's rounding,
whole batch and routed per row, where rounding them to float16 gave inf."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorahot
from tests.helpers import peft_keys, reference, save_peft

DT = torch.float16
RANK = 4


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _case(kind: str, x_size: float, a_size: float, gen: torch.Generator) -> tuple[nn.Module, torch.Tensor, tuple]:
    """A float16 base layer, an input of 5 rows and PEFT-layout ``A``, ``B`` (float16 values)."""
    if kind == "linear":
        layer = nn.Linear(64, 32)
        x = torch.randn(5, 64, generator=gen) * x_size
        shapes = ((RANK, 64), (32, RANK))
    elif kind == "conv2d":
        layer = nn.Conv2d(8, 6, 3, padding=1)
        x = torch.randn(5, 8, 4, 4, generator=gen) * x_size
        shapes = ((RANK, 8, 3, 3), (6, RANK, 1, 1))
    else:
        layer = nn.Embedding(10, 16)
        x = torch.randint(0, 10, (5, 3), generator=gen)
        shapes = ((RANK, 10), (16, RANK))
        a_size = 2000.0  # the lookup's rows are A's own values, float16 values themselves
    a = torch.randn(shapes[0], generator=gen) * a_size
    b = torch.randn(shapes[1], generator=gen) * 1e-4
    x = x if kind == "embedding" else x.to(DT)
    return layer.to(DT), x, (a.to(DT), b.to(DT))


def _shrink(kind: str, x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``x @ A.T`` (the convolution with A, the lookup of A's columns) in float64."""
    if kind == "linear":
        return x.double() @ a.t()
    if kind == "conv2d":
        return F.conv2d(x.double(), a, padding=1)
    return F.embedding(x, a.t())


# (x size, A size, lora_alpha): |x @ A.T| past 65504 with s = 1, and |s * (x @ A.T)| past it
# with |x @ A.T| ~ 3e3 and s = alpha / r = 32
SIZES = {"x@A.T": (100.0, 100.0, 4.0), "s*(x@A.T)": (10.0, 20.0, 128.0)}


# an embedding's intermediate is A's own values, which float16 holds: its scaled copy only
CASES = [(k, s) for k in ("linear", "conv2d") for s in SIZES] + [("embedding", "s*(x@A.T)")]


@pytest.mark.parametrize("routed", [False, True], ids=["whole", "routed"])
@pytest.mark.parametrize(("kind", "size"), CASES)
def test_an_intermediate_past_float16_range_gives_the_float64_output(
    kind: str, size: str, routed: bool, tmp_path: Path
) -> None:
    x_size, a_size, alpha = SIZES[size]
    layer, x, (a, b) = _case(kind, x_size, a_size, torch.Generator().manual_seed(0))
    scale = alpha / RANK
    want = reference(layer, x, a.double(), b.double(), scale)
    h = _shrink(kind, x, a.double())  # the case is what it says: the intermediate leaves float16's range
    top = h.abs().max().item()
    assert top > 65504 if size == "x@A.T" else top < 65504 < scale * top
    assert want.abs().max() < 1000
    ka, kb = peft_keys(layer, "layer")
    directory = save_peft(tmp_path / "a", {ka: a, kb: b}, r=RANK, lora_alpha=alpha)
    model = _Holder(copy.deepcopy(layer))
    runtime = lorahot.inject(model, ["layer"], max_rank=RANK, slots=2)
    runtime.load(directory, slot=0)
    runtime.load(directory, slot=1)
    if routed:
        runtime.activate(torch.tensor([0, 1, 0, 1, 1]))
    with torch.no_grad():
        got = model(x).double()
    assert torch.isfinite(got).all(), f"{(~torch.isfinite(got)).sum().item()} of {got.numel()} outputs not finite"
    err = (got - want).abs().max().item()
    assert err <= 2 * torch.finfo(DT).eps * want.abs().max().item(), err
