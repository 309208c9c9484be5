"""The Triton kernel behind :mod:`lorahot.kernels.row_scale` (imported only where Triton and CUDA exist).

One program scales one row of one layer, ``BLOCK`` columns at a time: it reads the layer's
source and destination addresses from two int64 tables (the grouped-GEMM pattern: pointers as
data), the row's scale from the per-row scale tensor, and writes
``dst[row, :] = round(src[row, :] * s)`` with the product in float32, as a PyTorch multiply of
a half-precision tensor by a scale computes it. A program per row (not per ``BLOCK`` piece of
the widest row) launches no programs that find nothing to do: with the Llama shapes' rows of
2048 and 5632 columns, two programs in three of the per-piece grid did nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorahot.kernels.device_guard import launching_on

__all__ = ["launch", "stack_scales"]

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_BLOCK = 1024


@triton.jit
def _row_scale_kernel(DST, SRC, S, LAYER, COLS, s_stride, BLOCK: tl.constexpr, DTYPE: tl.constexpr):
    g = tl.program_id(0)
    row = tl.program_id(1)
    n = tl.load(COLS + g)
    dst = tl.load(DST + g).to(tl.pointer_type(DTYPE)) + row * n
    src = tl.load(SRC + g).to(tl.pointer_type(DTYPE)) + row * n
    s = tl.load(S + tl.load(LAYER + g) * s_stride + row).to(tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(src + offs, mask=mask)
        tl.store(dst + offs, (x.to(tl.float32) * s).to(DTYPE), mask=mask)


@triton.jit
def _stack_scales_kernel(OWN, PART, W, S0, S1, N, MIRROR: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < N
    own = tl.load(OWN + offs, mask=ok, other=0.0)
    w = tl.load(W + tl.load(PART + offs, mask=ok, other=0), mask=ok, other=0.0)
    s = (own * w).to(S0.dtype.element_ty)  # float64 product, rounded once
    tl.store(S0 + offs, s, mask=ok)
    if MIRROR:
        tl.store(S1 + offs, s, mask=ok)


def stack_scales(
    own: torch.Tensor, part: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, mirror: torch.Tensor | None
) -> None:
    """See :func:`lorahot.kernels.row_scale.stack_scales`."""
    n = out.numel()
    with launching_on(out.device):
        _stack_scales_kernel[(triton.cdiv(n, _BLOCK),)](
            own, part, weights, out, out if mirror is None else mirror, n, MIRROR=mirror is not None, BLOCK=_BLOCK
        )


def launch(
    dst: torch.Tensor,
    src: torch.Tensor,
    scales: torch.Tensor,
    layer: torch.Tensor,
    cols: torch.Tensor,
    rows: int,
    dtype: torch.dtype,
) -> None:
    """See :func:`lorahot.kernels.row_scale.scale_rows`."""
    grid = (dst.numel(), rows)
    with launching_on(dst.device):
        _row_scale_kernel[grid](dst, src, scales, layer, cols, scales.stride(0), BLOCK=_BLOCK, DTYPE=_TL[dtype])
