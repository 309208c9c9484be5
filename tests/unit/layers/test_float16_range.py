"""float16 layers whose rank-wide intermediate leaves float16's range (largest value 65504)
while the output stays well inside it: lorahot keeps ``x @ A.T`` and ``s * (x @ A.T)`` in
float32, as PEFT does with its default float32 adapter weights, and matches a float64 reference
to float16's rounding, whole batch and routed per row, where rounding them to float16 gave inf.
The library formula does so on every device (:func:`lorahot.layers.base.library_operands`),
the fused kernels on CUDA (:mod:`lorahot.kernels.triton_lora_linear`), and the wide layers,
whose GEMM writes the shrink in float16, with each rank row of their copy shifted by a power of
two (:data:`lorahot.kernels.wide_linear.SHIFTED_DTYPES`). The CUDA cases (marked ``gpu``) run
where a GPU is."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import lorahot
from lorahot.kernels import wide_linear
from lorahot.runtime import wide
from tests.helpers import peft_keys, reference, save_peft

DT = torch.float16
RANK = 4
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class _Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _case(
    kind: str, x_size: float, a_size: float, gen: torch.Generator, rows: int = 5
) -> tuple[nn.Module, torch.Tensor, tuple]:
    """A float16 base layer, an input of ``rows`` rows and PEFT-layout ``A``, ``B`` (float16 values)."""
    if kind == "linear":
        layer = nn.Linear(64, 32)
        x = torch.randn(rows, 64, generator=gen) * x_size
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


def _run(
    layer: nn.Module,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    alpha: float,
    routed: bool,
    device: str,
    tmp_path: Path,
) -> tuple[torch.Tensor, lorahot.LoraRuntime]:
    """``layer`` (a copy, on ``device``) with the adapter in two slots, whole batch or routed per
    row over both; its float16 output on ``x`` as float64 on the CPU, and the runtime."""
    ka, kb = peft_keys(layer, "layer")
    directory = save_peft(tmp_path / "a", {ka: a, kb: b}, r=RANK, lora_alpha=alpha)
    model = _Holder(copy.deepcopy(layer)).to(device)
    runtime = lorahot.inject(model, ["layer"], max_rank=RANK, slots=2)
    runtime.load(directory, slot=0)
    runtime.load(directory, slot=1)
    rows = x.shape[0]
    if routed:
        runtime.activate([i % 2 for i in range(rows)])
    with torch.no_grad():
        got = model(x.to(device)).double().cpu()
    return got, runtime


def _assert_float64_output(got: torch.Tensor, want: torch.Tensor) -> None:
    assert torch.isfinite(got).all(), f"{(~torch.isfinite(got)).sum().item()} of {got.numel()} outputs not finite"
    err = (got - want).abs().max().item()
    assert err <= 2 * torch.finfo(DT).eps * want.abs().max().item(), err


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routed", [False, True], ids=["whole", "routed"])
@pytest.mark.parametrize(("kind", "size"), CASES)
def test_an_intermediate_past_float16_range_gives_the_float64_output(
    kind: str, size: str, routed: bool, device: str, tmp_path: Path
) -> None:
    """5 rows: on CUDA a linear takes the fused kernel (routed: the fused routed kernel), a conv
    and an embedding the library formula."""
    x_size, a_size, alpha = SIZES[size]
    layer, x, (a, b) = _case(kind, x_size, a_size, torch.Generator().manual_seed(0))
    scale = alpha / RANK
    want = reference(layer, x, a.double(), b.double(), scale)
    h = _shrink(kind, x, a.double())  # the case is what it says: the intermediate leaves float16's range
    top = h.abs().max().item()
    assert top > 65504 if size == "x@A.T" else top < 65504 < scale * top
    assert want.abs().max() < 1000
    got, _ = _run(layer, x, a, b, alpha, routed, device, tmp_path)
    _assert_float64_output(got, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("routed", [False, True], ids=["whole", "routed"])
@pytest.mark.parametrize("size", list(SIZES))
def test_float16_wide_layers_keep_the_shrink_in_range(
    size: str, routed: bool, device: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An ``nn.Linear`` at 1024 rows, past the fused kernel's rows, on a device whose layers are
    widened (the CPU widened too here): the wide GEMM writes ``x @ A.T`` in float16, each A row
    divided by its power of two and each B column multiplied by it, so the output matches the
    float64 reference. Unshifted (the negative control), ``x @ A.T`` past 65504 gave inf. Routed,
    the layer reads its slots' own buffers (the segmented kernels on CUDA)."""
    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    x_size, a_size, alpha = SIZES[size]
    layer, x, (a, b) = _case("linear", x_size, a_size, torch.Generator().manual_seed(1), rows=1024)
    want = reference(layer, x, a.double(), b.double(), alpha / RANK)
    assert _shrink("linear", x, a.double()).abs().max() * (1 if size == "x@A.T" else alpha / RANK) > 65504
    got, runtime = _run(layer, x, a, b, alpha, routed, device, tmp_path)
    assert runtime.layers["layer"].wide
    _assert_float64_output(got, want)
    if size == "x@A.T" and not routed:
        monkeypatch.setattr(wide, "SHIFTED_DTYPES", frozenset())
        monkeypatch.setattr(wide_linear, "SHIFTED_DTYPES", frozenset())
        got, runtime = _run(layer, x, a, b, alpha, routed, device, tmp_path / "unshifted")
        assert runtime.layers["layer"].wide and not torch.isfinite(got).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "extras"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_the_shift_holds_the_shrink_of_the_worst_float16_input(
    device: str, compiled: bool, extras: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``x = 65504 * sign(A_r)``, the float16 input whose shrink over A's row ``r`` is largest:
    ``65504 * sum|A_r|``, a hundred times float16's range. The wide layer's output (base weight
    zero, so that the base product stays in range) is the float64 reference's, eagerly and
    compiled (the traced shrink reads the shifted rows, not the arena's), and for layers with
    extras (``inject(..., extras=True)``, another compiled forward)."""
    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    gen = torch.Generator().manual_seed(2)
    layer = nn.Linear(64, 32, bias=False)
    nn.init.zeros_(layer.weight)
    a = torch.randn(RANK, 64, generator=gen).half()
    b = (torch.randn(32, RANK, generator=gen) * 1e-3).half()
    signs = torch.sign(a.float())
    x = (65504 * signs.repeat(256, 1)).half()  # 1024 rows, row i the worst input for A's row i % RANK
    h = x.double() @ a.double().t()
    assert h.abs().max() > 50 * 65504
    want = (h @ b.double().t()) * (1.0 / RANK)
    assert want.abs().max() < 10000
    model = _Holder(layer.to(DT)).to(device)
    runtime = lorahot.inject(model, ["layer"], max_rank=RANK, extras=extras)
    runtime.load({"layer.lora_A.weight": a, "layer.lora_B.weight": b}, config={"r": RANK, "lora_alpha": 1.0})
    assert runtime.layers["layer"].wide
    run = torch.compile(model, backend="aot_eager", fullgraph=True) if compiled else model
    with torch.no_grad():
        got = run(x.to(device)).double().cpu()
    _assert_float64_output(got, want)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fin=st.integers(1, 96),
    fout=st.integers(1, 24),
    rank=st.integers(1, 8),
    x_log=st.floats(-3.0, 4.5),
    a_log=st.floats(-2.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_any_float16_wide_layer_matches_the_float64_reference(
    fin: int, fout: int, rank: int, x_log: float, a_log: float, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Any widths, rank, input and A magnitudes (``|x @ A.T|`` from 1e-3 to far past 65504), B
    sized so the update stays in range: a widened float16 layer's output is finite and within
    float16's rounding of the float64 reference, counting the shift's subnormal steps
    (``2**-25 * p`` per value of the shifted A)."""
    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(fin, fout).to(DT)
    x = (torch.randn(16, fin, generator=g) * 10**x_log).clamp(-60000, 60000).to(DT)
    a = (torch.randn(rank, fin, generator=g) * 10**a_log).to(DT)
    b64 = torch.randn(fout, rank, generator=g, dtype=torch.float64)
    term = (x.double() @ a.double().t()) @ b64.t()
    b = (b64 * (100.0 / max(term.abs().max().item(), 1e-30))).to(DT)
    assume(0 < b.abs().max().item() < 60000 and torch.finfo(DT).tiny <= b.abs().max().item())
    assume(a.abs().max().item() >= torch.finfo(DT).tiny)
    want = reference(layer, x, a.double(), b.double(), 1.0)
    assume(bool(torch.isfinite(want).all()) and want.abs().max().item() < 30000)
    model = _Holder(copy.deepcopy(layer))
    runtime = lorahot.inject(model, ["layer"], max_rank=8)
    try:
        runtime.load({"layer.lora_A.weight": a, "layer.lora_B.weight": b}, config={"r": rank, "lora_alpha": rank})
    except lorahot.LorahotError:
        assume(False)  # a value float16 cannot hold (the load's own checks, tested elsewhere)
    assert runtime.layers["layer"].wide
    with torch.no_grad():
        got = model(x).double()
    xa, aa, ba = x.double().abs(), a.double().abs(), b.double().abs()
    shift = float(2 ** math.ceil(math.log2(max(2 * aa.sum(dim=1).max().item(), 1.0))))
    eps = torch.finfo(DT).eps
    bound = 4 * eps * (xa @ layer.weight.double().abs().t() + layer.bias.double().abs() + (xa @ aa.t()) @ ba.t())
    bound += (xa.sum(dim=1, keepdim=True) * 2**-25 * shift) * ba.sum(dim=1) + 2 * eps * want.abs()
    assert torch.isfinite(got).all()
    assert ((got - want).abs() <= bound).all(), ((got - want).abs() / bound).max()
