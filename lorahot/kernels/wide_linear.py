"""The wide LoRA linear: base and shrink in one GEMM, the expand accumulated in place.

For a layer whose weight lives in ``wide = [W; scale * A]`` (``[out + R, in]``, see
:mod:`lorahot.layers.linear`), :func:`wide_linear` computes ``[y | h] = x @ wide.T`` with one
GEMM, then ``y += h @ Bt`` with a second GEMM that accumulates into ``y`` in place (cuBLAS
``beta = 1``): two kernels where the base model has one, and ``x`` is read once. The result is
``y``, a view of the GEMM's output with row stride ``out + R``.

It is the custom op ``lorahot::wide_linear``, opaque to the compiler, because the compiler,
given the same formula as library calls, hands the strided ``h`` to a matrix product that
cuBLAS runs with a poor tile choice (H200, 1024 rows: 46-108 us per expand against about
4 us for this in-place accumulate; ``benchmarks/experiments/rows_probe.py``), and it cannot
express the in-place accumulate into a slice of its own intermediate without a copy.
"""

from __future__ import annotations

import torch

__all__ = ["wide_linear"]


@torch.library.custom_op("lorahot::wide_linear", mutates_args=())
def wide_linear(x: torch.Tensor, wide: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """``x @ wide[:n].T + (x @ wide[n:].T) @ bt`` for ``x [..., in]``, ``bt [R, n]``."""
    n = bt.shape[1]
    x2 = x.reshape(-1, x.shape[-1])
    yh = torch.nn.functional.linear(x2, wide)
    y = yh[:, :n]
    y.addmm_(yh[:, n:], bt)
    return y.view(*x.shape[:-1], n)


@wide_linear.register_fake
def _(x: torch.Tensor, wide: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    n = bt.shape[1]
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    yh = x.new_empty((rows, wide.shape[0]))
    return yh[:, :n].view(*x.shape[:-1], n)
