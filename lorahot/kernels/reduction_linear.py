"""The LoRA of a few rows as reductions the compiler writes itself, for graphs launched per call.

Tried on 2026-12-02 and reverted (next commit): on an H200 host it added launches instead of
removing them (``runs/20261202T033442-default-mode-probe.log``).

For a row count the graph holds as a constant and no larger than :data:`ROWS`, in a graph that
launches its kernels on every call (default mode), the layer writes its LoRA as two reductions
over broadcast products::

    h     = sum_k x[.., k] * A[r, k]          # [rows, R]: shrink, float32 accumulation
    delta = sum_r (h * s)[.., r] * Bt[r, n]   # [rows, out]: expand of the rounded scaled shrink
    y     = F.linear(x, W, bias) + delta      # one rounding

so that no GEMM is added to the base layer's own.
"""

from __future__ import annotations

import torch

__all__ = ["ROWS", "applies", "reduction_linear"]

#: The most rows (a constant of the graph) for which a layer compiled for per-call launches
#: takes the reduction form.
ROWS = 16


def applies(rows: int | torch.SymInt) -> bool:
    """Whether a layer of ``rows`` rows takes the reduction form: a plain integer row count
    of at least one and at most :data:`ROWS`."""
    return isinstance(rows, int) and 0 < rows <= ROWS


def reduction_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    bt: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """``x @ weight.T + bias + ((x @ a.T) * scale) @ bt`` with the LoRA as broadcast products
    and sums (plain torch, for the compiler to trace)."""
    h = (x.unsqueeze(-2).float() * a.float()).sum(-1)  # [..., R]
    hs = (h * scale).to(x.dtype)
    delta = (hs.unsqueeze(-1).float() * bt.float()).sum(-2)  # [..., out]
    y = torch.nn.functional.linear(x, weight, bias)
    return (y + delta).to(y.dtype)
