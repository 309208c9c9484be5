"""Every CUDA path a linear layer can take, at any size, against the float64 dense reference.

On CUDA a :class:`lorahot.LoRALinear` picks its path by the input's row count, its sizes and
the routing: the fused kernel (one adapter, decode sizes), the routed fused kernel (a per-row
routing, up to ``routed_linear.WORKSPACE_ROWS`` rows), the wide GEMMs (one adapter, larger
inputs) and the segmented pair (a routing, larger inputs). The kernel tests check each kernel
on a few shapes; here hypothesis draws the model's sizes, the batch, the ranks, the number of
slots, the dtype, a bias or none, and a whole-batch or per-row routing, runs a small block of
three wrapped linears eagerly and compiled, and demands:

- each row within the dtype's rounding of the float64 reference with its own slot's adapter
  (or none for ``-1``), the caching allocator's free memory filled with NaN first, so an
  output element a kernel leaves unwritten shows;
- nothing else: no NaN, no Inf;
- rows routed to ``-1`` equal the base model's own output: bitwise where the layers run the base
  layer's product (above the routed fused kernel's rows), to the dtype's rounding where that
  kernel computes it (README, "Mixed batches").
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lorahot
from tests.helpers import make_adapter, model_reference

pytestmark = pytest.mark.gpu


class _Block(nn.Module):
    """Two linears reading one input (as q and k do), their sum read by a third."""

    def __init__(self, width: int, hidden: int, bias: bool) -> None:
        super().__init__()
        self.q = nn.Linear(width, hidden, bias=bias)
        self.k = nn.Linear(width, hidden, bias=bias)
        self.o = nn.Linear(hidden, width, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(self.q(x) + self.k(x))


def _poison_free_memory() -> None:
    """Leaves the caching allocator's free memory filled with NaN, so that a tensor allocated
    next and not wholly written by a kernel reads NaN where it was not: its cached segments are
    released, then one large block (which later large tensors split) and many small ones (the
    pool of tensors under 1 MB) are filled and freed."""
    torch.cuda.empty_cache()
    nan = float("nan")
    torch.full((64 << 20,), nan, dtype=torch.float32, device="cuda")
    small = [torch.full((128 << 10,), nan, dtype=torch.float32, device="cuda") for _ in range(64)]
    del small


def _tolerance(dtype: torch.dtype) -> float:
    return 3e-2 if dtype == torch.bfloat16 else 6e-3


def _setup(width: int, hidden: int, bias: bool, dtype: torch.dtype, ranks: list[int], max_rank: int, seed: int):
    torch.manual_seed(seed)
    reference = _Block(width, hidden, bias).to(dtype)  # float64 copies of the low-precision weights
    model = _Block(width, hidden, bias).to(dtype)
    model.load_state_dict(reference.state_dict())
    model.cuda().eval()
    base = copy.deepcopy(model)
    runtime = lorahot.inject(model, ["q", "k", "o"], max_rank=max_rank, slots=len(ranks))
    held = []
    for slot, rank in enumerate(ranks):
        names = ["q", "k", "o"] if slot % 2 == 0 else ["k", "o"]  # targets differ between slots
        tensors, ab = make_adapter(reference, dict.fromkeys(names, rank), seed=seed + slot)
        runtime.load(tensors, slot=slot)
        held.append({n: (a, b, 1.0) for n, (a, b) in ab.items()})
    return model, runtime, reference, held, base


def _expected(reference: nn.Module, x: torch.Tensor, route: list[int], held: list[dict]) -> torch.Tensor:
    rows = [model_reference(reference, x[i : i + 1].cpu(), held[s] if s >= 0 else {}) for i, s in enumerate(route)]
    return torch.cat(rows)


def _check(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    got = got.double().cpu()
    assert torch.isfinite(got).all(), f"{what}: non-finite output (an element left unwritten?)"
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    assert err <= _tolerance(dtype) * scale, f"{what}: max abs diff {err:.4g} against {scale:.4g}"


_SIZES = st.sampled_from([8, 24, 64, 200, 256, 1000, 2048])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    width=_SIZES,
    hidden=_SIZES,
    batch=st.integers(1, 6),
    tokens=st.sampled_from([1, 3, 16, 17, 43, 64, 100, 300]),
    ranks=st.lists(st.sampled_from([1, 3, 8, 16, 33, 64]), min_size=1, max_size=3),
    pad=st.booleans(),
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    bias=st.booleans(),
    routed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_gpu_any_size_batch_rank_and_routing_match_the_float64_reference(
    width: int,
    hidden: int,
    batch: int,
    tokens: int,
    ranks: list[int],
    pad: bool,
    dtype: torch.dtype,
    bias: bool,
    routed: bool,
    seed: int,
) -> None:
    """Eager: rows from 1 to 1,800 cross every path's bounds (fused, routed fused, wide,
    segmented); ranks below, at and (``pad``) well below ``max_rank``."""
    max_rank = 64 if pad else max(ranks)
    model, runtime, reference, held, base = _setup(width, hidden, bias, dtype, ranks, max_rank, seed)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, width, generator=g).to(dtype)
    if routed:
        route = torch.randint(-1, len(ranks), (batch,), generator=g).tolist()
        runtime.activate(route)
    else:
        route = [len(ranks) - 1] * batch
        runtime.activate(len(ranks) - 1)
    _poison_free_memory()
    with torch.no_grad():
        got = model(x.cuda())
        plain = base(x.cuda())
    _check(got, _expected(reference, x, route, held), dtype, f"rows {batch * tokens}, route {route}")
    none = [i for i, s in enumerate(route) if s < 0]
    if batch * tokens > 256:  # every layer runs the base layer's product
        assert torch.equal(got[none], plain[none]), f"rows of no slot differ from the base model: {route}"
    elif none:
        _check(got[none], plain[none].double().cpu(), dtype, f"rows of no slot, {batch * tokens} rows")


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_compiled_block_matches_the_float64_reference_at_every_row_count(mode: str) -> None:
    """Compiled once with a dynamic token count, then run at row counts on both sides of every
    path's bound, whole batch and routed, through a swap: each within rounding of float64."""
    dtype = torch.bfloat16
    model, runtime, reference, held, _ = _setup(1000, 2048, True, dtype, [64, 8, 33], 64, seed=3)
    compiled = torch.compile(model, mode=mode)
    g = torch.Generator().manual_seed(0)
    for tokens in (2, 16, 32, 33, 64, 65, 300):  # rows 4x: across 128 and 256
        x = torch.randn(4, tokens, 1000, generator=g).to(dtype)
        torch._dynamo.mark_dynamic(x, 1)
        for route in ([2, 2, 2, 2], [0, -1, 2, 1], [1, 1, -1, -1]):
            runtime.activate(route)
            _poison_free_memory()
            with torch.no_grad():
                got = compiled(x.cuda())
            _check(got, _expected(reference, x, route, held), dtype, f"{mode}, rows {4 * tokens}, route {route}")
    tensors, ab = make_adapter(reference, dict.fromkeys(["q", "o"], 16), seed=99)
    runtime.load(tensors, slot=1)  # a swap into a routed slot: the compiled model follows it
    held[1] = {n: (a, b, 1.0) for n, (a, b) in ab.items()}
    x = torch.randn(4, 17, 1000, generator=g).to(dtype)
    runtime.activate([1, 0, -1, 1])
    with torch.no_grad():
        got = compiled(x.cuda())
    _check(got, _expected(reference, x, [1, 0, -1, 1], held), dtype, f"{mode}, after a swap")
