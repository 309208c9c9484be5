"""An operator's input ``x [..., in]`` as rows: their count, and ``x`` as a 2-D ``[rows, in]``.

Written without ``-1``: a layer's ``in`` may be 0 (a shard's), where ``reshape(-1, 0)`` fails
and ``numel() // in`` divides by zero. The count is a product of sizes, symbolic under
``torch.compile`` where they are.
"""

from __future__ import annotations

import math

import torch

__all__ = ["as_rows", "row_count"]


def row_count(x: torch.Tensor) -> int:
    """The rows of ``x``: the product of every dimension but the last."""
    return math.prod(x.shape[:-1])


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., in]`` as ``[rows, in]`` (a view where ``reshape`` gives one)."""
    return x.reshape(row_count(x), x.shape[-1])
