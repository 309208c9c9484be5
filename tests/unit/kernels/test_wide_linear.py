"""The wide linear op (``lorahot.kernels.wide_linear``): base and shrink in one GEMM over
``[W; s[:, None] * A]``, the expand accumulated in place, against a float64 reference, with a
different scale on every row of A (a stack's rows: each part's own, zero on padding rows).
The op is plain torch, so it runs on the CPU too; on CUDA its output is poisoned with NaN first.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lorahot.kernels import wide_linear as wide_kernel


def _operands(m: int, k: int, n: int, r: int, dtype: torch.dtype, device: str, seed: int) -> tuple[torch.Tensor, ...]:
    """``x, w, a, bt, s`` and the wide buffer ``[w; s[:, None] * a]`` as the runtime writes it
    (the product in float32, then rounded to the weights' dtype)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    w = torch.randn(n, k, device=device, dtype=dtype, generator=g) / k**0.5
    a = torch.randn(r, k, device=device, dtype=dtype, generator=g) / k**0.5
    bt = torch.randn(r, n, device=device, dtype=dtype, generator=g) / r**0.5
    s = torch.empty(r, device=device, dtype=torch.promote_types(dtype, torch.float32)).uniform_(-2, 2, generator=g)
    s[::3] = 0.0
    wide = torch.cat([w, (a * s[:, None]).to(dtype)])  # [n + r, k]
    return x, w, a, bt, s, wide


def _reference(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    d = torch.Tensor.double
    return d(x) @ d(w).T + ((d(x) @ d(a).T) * d(s)) @ d(bt)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(0, 40),
    k=st.integers(1, 48),
    n=st.integers(1, 40),
    r=st.integers(1, 16),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_matches_float64_reference_with_per_row_scales(m: int, k: int, n: int, r: int, double: bool, seed: int) -> None:
    dtype = torch.float64 if double else torch.float32
    x, w, a, bt, s, wide = _operands(m, k, n, r, dtype, "cpu", seed)
    y = wide_kernel.wide_linear(x, wide, bt)
    assert y.shape == (m, n) and y.dtype == dtype
    if m:
        torch.testing.assert_close(
            y.double(), _reference(x, w, a, bt, s), rtol=1e-4 if not double else 1e-10, atol=1e-4
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("m", "k", "n", "r"), [(1, 256, 512, 64), (300, 512, 256, 24), (1024, 2048, 2048, 64)])
def test_gpu_matches_float64_reference_output_poisoned(m: int, k: int, n: int, r: int, dtype: torch.dtype) -> None:
    x, w, a, bt, s, wide = _operands(m, k, n, r, dtype, "cuda", seed=m + r)
    torch.full((m * (n + r) + 1,), float("nan"), device="cuda", dtype=dtype)  # freed: the op's output reuses it
    y = wide_kernel.wide_linear(x, wide, bt)
    assert y.shape == (m, n) and torch.isfinite(y).all()
    ref = _reference(x, w, a, bt, s)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


def test_the_operator_compiles_as_one_node_and_refuses_gradients() -> None:
    """``lorahot::wide_linear`` inside a compiled graph (fullgraph) equals the eager call; where
    a gradient would flow through it (it has no backward) it is refused, not run."""
    x, *_, bt, _, wide = _operands(5, 24, 16, 8, torch.float32, "cpu", seed=3)
    x3 = x.reshape(5, 1, 24)
    want = wide_kernel.wide_linear(x3, wide, bt)
    compiled = torch.compile(lambda *t: wide_kernel.wide_linear(*t), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x3, wide, bt), want)
    with pytest.raises(RuntimeError, match="lorahot::wide_linear has no backward"):
        wide_kernel.wide_linear(x, wide.requires_grad_(), bt)
    with torch.no_grad():
        assert torch.equal(wide_kernel.wide_linear(x3, wide, bt), want)
