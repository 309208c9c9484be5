"""The Triton kernel behind :mod:`lorahot.kernels.row_scale` (imported only where Triton and CUDA exist).

One program scales one row of one layer, ``BLOCK`` columns at a time: it reads the layer's
source and destination addresses from two int64 tables (the grouped-GEMM pattern: pointers as
data), the row's scale from the per-row scale tensor, and writes
``dst[row, :] = round(src[row, :] * s)`` with the product in float32, as a PyTorch multiply of
a half-precision tensor by a scale computes it. Float16's wide layers also shift each rank row
by a power of two (:mod:`lorahot.runtime.wide`): the A copy finds and divides by it, the B
copy multiplies by it. A program per row (not per ``BLOCK`` piece of
the widest row) launches no programs that find nothing to do: with the Llama shapes' rows of
2048 and 5632 columns, two programs in three of the per-piece grid did nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorahot.kernels.device_guard import launching_on
from lorahot.kernels.direct_launch import cdiv

__all__ = ["launch", "stack_scales"]

_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_BLOCK = 1024
#: the most programs a CUDA grid holds along its second and third dimensions
GRID_Y = 65535


@triton.jit
def _power_of_two_at_least(v):
    """The smallest power of two ``>= v`` for a positive normal float32 ``v``, from its bits
    (exact: no ``log2``/``exp2`` approximation)."""
    bits = v.to(tl.int32, bitcast=True)
    up = ((bits & 0x7FFFFF) != 0).to(tl.int32)  # any mantissa bit: past the power of two below
    return (((bits >> 23) + up) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _row_scale_kernel(
    DST, SRC, S, LAYER, COLS, LD, s_stride, SHIFT, shift_stride,
    BLOCK: tl.constexpr, DTYPE: tl.constexpr, NORMALIZE: tl.constexpr,
):  # fmt: skip
    """Each row times its scale; with ``NORMALIZE``, its shift found first
    (:func:`_power_of_two_at_least` of twice its sum of ``|value|``, at least 1;
    :func:`lorahot.kernels.row_scale.row_shifts`), written to ``SHIFT[g, row]``, and the row
    divided by it too."""
    g = tl.program_id(0)
    row = tl.program_id(1)
    n = tl.load(COLS + g)
    dst = tl.load(DST + g).to(tl.pointer_type(DTYPE)) + row * tl.load(LD + g)  # the block's rows LD apart
    src = tl.load(SRC + g).to(tl.pointer_type(DTYPE)) + row * n
    s = tl.load(S + tl.load(LAYER + g) * s_stride + row).to(tl.float32)
    if NORMALIZE:
        total = tl.zeros((BLOCK,), dtype=tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            total += tl.abs(tl.load(src + offs, mask=offs < n, other=0.0).to(tl.float32))
        p = _power_of_two_at_least(tl.maximum(2.0 * tl.sum(total, axis=0), 1.0))
        tl.store(SHIFT + g * shift_stride + row, p)
        s = s / p  # a power of two: exact
    for start in range(0, n, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        mask = offs < n
        x = tl.load(src + offs, mask=mask)
        tl.store(dst + offs, (x.to(tl.float32) * s).to(DTYPE), mask=mask)


@triton.jit
def _col_scale_kernel(
    DST, SRC, S, LAYER, COLS, LD, s_stride, rows, SHIFT, shift_stride,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, DTYPE: tl.constexpr, SHIFTED: tl.constexpr,
):  # fmt: skip
    """Transposed destinations: block ``g``'s element ``(r, c)`` lives at ``dst + r + c * ld``.
    One program covers ``BLOCK_N`` columns of one block and all ``rows`` rows, ``BLOCK_R`` at a
    time: it reads the source along its rows (contiguous) and writes the destination along its
    columns (each of the destination's rows holds ``rows`` consecutive values). Where a block
    has more column tiles than the grid has programs along them (CUDA's limit, :data:`GRID_Y`),
    each program goes on to every ``num_programs(1)``-th tile after its first. ``SHIFTED``: each
    row's scale times ``SHIFT[g, row]`` too."""
    g = tl.program_id(0)
    n = tl.load(COLS + g)
    ld = tl.load(LD + g)
    dst = tl.load(DST + g).to(tl.pointer_type(DTYPE))
    src = tl.load(SRC + g).to(tl.pointer_type(DTYPE))
    s_row = S + tl.load(LAYER + g) * s_stride
    for c0 in range(tl.program_id(1) * BLOCK_N, n, tl.num_programs(1) * BLOCK_N):
        cc = c0 + tl.arange(0, BLOCK_N)
        c_ok = cc < n
        for r0 in range(0, rows, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            r_ok = rr < rows
            mask = r_ok[:, None] & c_ok[None, :]
            s = tl.load(s_row + rr, mask=r_ok, other=0.0).to(tl.float32)
            if SHIFTED:
                s = s * tl.load(SHIFT + g * shift_stride + rr, mask=r_ok, other=0.0)
            x = tl.load(src + rr[:, None].to(tl.int64) * n + cc[None, :], mask=mask, other=0.0)
            y = (x.to(tl.float32) * s[:, None]).to(DTYPE)
            tl.store(dst + rr[:, None] + cc[None, :].to(tl.int64) * ld, y, mask=mask)


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
        _stack_scales_kernel[(cdiv(n, _BLOCK),)](
            own, part, weights, out, out if mirror is None else mirror, n, MIRROR=mirror is not None, BLOCK=_BLOCK
        )


def launch(
    dst: torch.Tensor,
    src: torch.Tensor,
    scales: torch.Tensor,
    layer: torch.Tensor,
    cols: torch.Tensor,
    ld: torch.Tensor,
    rows: int,
    dtype: torch.dtype,
    widest: int = 0,
    shift: torch.Tensor | None = None,
) -> None:
    """See :class:`lorahot.kernels.row_scale.RowScaler`: destinations of contiguous rows ``ld``
    apart, or with ``widest`` (the most columns of any block) transposed ones, their columns
    ``ld`` apart; ``shift`` (float32 ``[blocks, R]``, contiguous rows): with transposed blocks it
    multiplies each row's scale, with blocks of rows it is found, written and divides it."""
    stride = 0 if shift is None else shift.stride(0)
    with launching_on(dst.device):
        if not widest:
            _row_scale_kernel[(dst.numel(), rows)](
                dst, src, scales, layer, cols, ld, scales.stride(0), scales if shift is None else shift, stride,
                BLOCK=_BLOCK, DTYPE=_TL[dtype], NORMALIZE=shift is not None,
            )  # fmt: skip
            return
        block_n = 64
        _col_scale_kernel[(dst.numel(), min(cdiv(widest, block_n), GRID_Y))](
            dst, src, scales, layer, cols, ld, scales.stride(0), rows, scales if shift is None else shift, stride,
            BLOCK_R=32, BLOCK_N=block_n, DTYPE=_TL[dtype], SHIFTED=shift is not None,
        )  # fmt: skip
