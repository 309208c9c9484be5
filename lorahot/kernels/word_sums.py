"""Row and column sums of many 2-D views of int32 words in one launch, as int32 modulo 2**32.

Merged mode's record of the base weights (:mod:`lorahot.runtime.written_probes`) digests each
targeted weight as the row and column sums of its bytes read as 32-bit words. Two reductions
per layer took 7.8 and 6.2 us on an H200 for the SDXL UNet's 700 weights: 10 ms of latency for
4.4 GB that one pass reads in about 1.3 ms. :class:`WordSums` cuts every view into items of up
to :data:`ITEM_ROWS` rows and :data:`BLOCK_C` columns (:func:`items`), lays them out once in a
device table (addresses as data), and sums all of them with one kernel launch that adds into
the destinations with int32 atomics (zeroed by the caller first). int32 addition wraps and
does not depend on order: the sums equal ``torch.sum(w, dim, dtype=torch.int32)`` bit for bit.
It applies on CUDA where Triton is available (:func:`available`); elsewhere the caller keeps its
library-call path.
"""

from __future__ import annotations

from typing import Any

import torch

from lorahot.kernels.triton_import import triton_module

__all__ = ["BLOCK_C", "ITEM_ROWS", "available", "items", "WordSums"]

#: columns (words) of an item, and of the kernel's tiles: a row's piece of a tile is 1 KB
BLOCK_C = 256
#: the most rows of an item: its column sums are added once per 512 rows, and the largest item
#: (512 KB) is a small part of one SM's share of a pass over the SDXL UNet's weights
ITEM_ROWS = 512


def _kernel() -> Any:
    """The Triton module, or None where Triton (or CUDA) is missing."""
    return triton_module("triton_word_sums")


def available(device: torch.device) -> bool:
    """Whether :class:`WordSums` runs for views on ``device``."""
    return device.type == "cuda" and _kernel() is not None


def items(views: torch.Tensor, block_c: int = BLOCK_C, item_rows: int = ITEM_ROWS) -> torch.Tensor:
    """The work items of ``views`` (int64 ``[n_views, 6]``: address in bytes, rows, columns, row
    stride in words, offset of the row sums, offset of the column sums): int64 ``[n_items, 6]``,
    each an item's start address, row stride, rows, columns, and the offsets of its first row's
    and first column's sums. An item covers up to ``item_rows`` rows and ``block_c`` columns of
    one view; a view with no rows or no columns has none. Computed in int64 throughout: an
    item's address is exact for a view of any size."""
    addr, rows, cols, ld, rows_at, cols_at = views.unbind(1)
    per_r = (rows + item_rows - 1) // item_rows
    per_c = (cols + block_c - 1) // block_c
    count = per_r * per_c
    owner = torch.repeat_interleave(torch.arange(views.shape[0]), count)  # the view of each item
    first = torch.cumsum(count, 0) - count
    k = torch.arange(owner.numel()) - first[owner]
    r0 = k // per_c[owner] * item_rows
    c0 = k % per_c[owner] * block_c
    ld_i = ld[owner]
    return torch.stack(
        [
            addr[owner] + (r0 * ld_i + c0) * 4,
            ld_i,
            torch.clamp(rows[owner] - r0, max=item_rows),
            torch.clamp(cols[owner] - c0, max=block_c),
            rows_at[owner] + r0,
            cols_at[owner] + c0,
        ],
        1,
    )


class WordSums:
    """``torch.sum(w, 1, dtype=torch.int32)`` into ``out[rows_at[i]:][:w.shape[0]]`` and
    ``torch.sum(w, 0, dtype=torch.int32)`` into ``out[cols_at[i]:][:w.shape[1]]`` for every view
    ``w = views[i]``, in one launch. ``views`` are 2-D int32 tensors on one device, each of
    contiguous rows (``stride(1) == 1`` where it has more than one column), their addresses fixed
    from now on; ``out`` (given at each call) is an int32 tensor on the same device, zero where
    the sums go."""

    def __init__(self, views: list[torch.Tensor], rows_at: list[int], cols_at: list[int]) -> None:
        device = views[0].device
        rows = []
        for w in views:  # lorahot's own views: a mismatch is a bug, not bad input
            if w.dim() != 2 or w.dtype != torch.int32 or w.device != device or (w.shape[1] > 1 and w.stride(1) != 1):
                raise ValueError(
                    f"word views must be 2-D int32 on {device} with contiguous rows; got {w.dtype} {tuple(w.shape)} "
                    f"strides {w.stride()} on {w.device}"
                )
            ld = w.stride(0) if w.shape[0] > 1 else w.shape[1]
            rows.append([w.data_ptr(), w.shape[0], w.shape[1], ld])
        table = torch.tensor(rows, dtype=torch.int64).reshape(-1, 4)
        at = torch.tensor([rows_at, cols_at], dtype=torch.int64).reshape(2, -1).t()
        planned = items(torch.cat([table, at], 1))
        #: whether every item allows 128-bit loads (16-byte addresses, rows and columns in fours)
        self.aligned = bool(((planned[:, 0] % 16 == 0) & (planned[:, 1] % 4 == 0) & (planned[:, 3] % 4 == 0)).all())
        #: the items, one program of the launch each
        self.programs = planned.shape[0]
        self._items = planned.to(device)
        self._keep = views  # the views the table points into stay alive with it

    def __call__(self, out: torch.Tensor) -> None:
        """Adds every view's row and column sums into ``out`` (see the class docstring)."""
        _kernel().launch(self._items, out, self.aligned)
