"""The Triton kernel behind :mod:`lorahot.kernels.word_sums` (imported only where Triton and CUDA exist).

One program sums one *item*: up to :data:`~lorahot.kernels.word_sums.ITEM_ROWS` rows and
:data:`~lorahot.kernels.word_sums.BLOCK_C` columns of one 2-D view of int32 words, whose start
address, row stride, size and destinations it reads from a row of an int64 table (the
grouped-GEMM pattern: pointers as data). It walks down its column
strip ``BLOCK_R`` rows at a time; each tile's row sums are added to the layer's row sums with
int32 atomics, and the strip's column sums, kept in registers until the last tile, to the
layer's column sums. int32 addition wraps modulo 2**32 and is associative and commutative, so
the order the atomics land in does not change a bit of the result: it equals ``torch.sum(w,
dim, dtype=torch.int32)``. The sums must be zero before the launch.

A column strip of 256 words and ``BLOCK_R`` of 32 make a tile of 32 KB (8 warps, eight 128-bit
loads a thread where the views are aligned); the atomics are one per 256 words for the row sums
and one per 512 rows of a column for the column sums, about 0.6 % of the words.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorahot.kernels.device_guard import launching_on
from lorahot.kernels.word_sums import BLOCK_C

__all__ = ["launch"]

#: rows of a tile (an item's last tile is masked where its rows are not a multiple)
BLOCK_R = 32


@triton.jit
def _word_sums_kernel(ITEMS, OUT, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, ALIGNED: tl.constexpr):
    item = ITEMS + tl.program_id(0).to(tl.int64) * 6
    addr = tl.load(item)
    ld = tl.load(item + 1)
    n_rows = tl.load(item + 2)
    n_cols = tl.load(item + 3)
    rows_at = tl.load(item + 4)
    cols_at = tl.load(item + 5)
    base = addr.to(tl.pointer_type(tl.int32))
    if ALIGNED:  # every view 16-byte aligned, its rows and columns multiples of 4 words: 128-bit loads
        base = tl.multiple_of(base, 16)
        ld = tl.multiple_of(ld, 4)
        n_cols = tl.multiple_of(n_cols, 4)
    cc = tl.arange(0, BLOCK_C)
    c_ok = cc < n_cols
    strip = tl.zeros([BLOCK_R, BLOCK_C], dtype=tl.int32)  # the column sums so far, reduced at the end
    for r0 in range(0, n_rows, BLOCK_R):
        rr = r0 + tl.arange(0, BLOCK_R)
        r_ok = rr < n_rows
        x = tl.load(base + rr[:, None].to(tl.int64) * ld + cc[None, :], mask=r_ok[:, None] & c_ok[None, :], other=0)
        strip += x
        tl.atomic_add(OUT + rows_at + rr, tl.sum(x, axis=1), mask=r_ok, sem="relaxed")
    tl.atomic_add(OUT + cols_at + cc, tl.sum(strip, axis=0), mask=c_ok, sem="relaxed")


def launch(items: torch.Tensor, out: torch.Tensor, aligned: bool) -> None:
    """Adds every item's row and column sums into ``out`` (int32, zero where the sums go); see
    :class:`lorahot.kernels.word_sums.WordSums` for the table ``items`` (int64, ``[n, 6]``,
    on ``out``'s device). ``aligned`` only where every item's address is a multiple of 16 bytes
    and its row stride and columns multiples of 4."""
    n = items.shape[0]
    if n == 0:
        return
    with launching_on(out.device):
        _word_sums_kernel[(n,)](items, out, BLOCK_R=BLOCK_R, BLOCK_C=BLOCK_C, ALIGNED=aligned, num_warps=8)
