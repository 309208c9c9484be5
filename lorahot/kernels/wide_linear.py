"""The wide LoRA linear: base and shrink in one GEMM, the expand accumulated in place.

For a layer whose weight lives in ``wide = [W; scale * A]`` (``[out + R, in]``, see
:mod:`lorahot.layers.linear`), :func:`wide_linear` computes ``[y | h] = x @ wide.T`` with one
GEMM, then ``y += h @ Bt`` with a second GEMM that accumulates into ``y`` in place (cuBLAS
``beta = 1``): two kernels where the base model has one, and ``x`` is read once. The result is
``y``, a view of the GEMM's output with row stride ``out + R``.

It is the operator ``lorahot::wide_linear`` (:mod:`lorahot.kernels.op_registry`), opaque to
the compiler, because the compiler, given the same formula as library calls, hands the strided
``h`` to a matrix product that cuBLAS runs with a poor tile choice (H200, 1024 rows: 46-108 us
per expand against about 4 us for this in-place accumulate;
``benchmarks/experiments/rows_probe.py``), and it cannot express the in-place accumulate into a
slice of its own intermediate without a copy.
"""

from __future__ import annotations

import torch

from lorahot.kernels.op_registry import define, refuse_grad

__all__ = ["wide_linear"]


def _fake(x: torch.Tensor, wide: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    n = bt.shape[1]
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    yh = x.new_empty((rows, wide.shape[0]))
    return yh[:, :n].view(*x.shape[:-1], n)


@define("wide_linear(Tensor x, Tensor wide, Tensor bt) -> Tensor", _fake)
def _wide_linear(x: torch.Tensor, wide: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    refuse_grad("wide_linear", x, wide, bt)
    n, r = bt.shape[1], bt.shape[0]
    flat = x.dim() != 2
    yh = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]) if flat else x, wide)
    y = yh.narrow(1, 0, n).addmm_(yh.narrow(1, n, r), bt)  # narrow, not [:, a:b]: a fraction of the host time
    return y.view(*x.shape[:-1], n) if flat else y


def wide_linear(x: torch.Tensor, wide: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """``x @ wide[:n].T + (x @ wide[n:].T) @ bt`` for ``x [..., in]``, ``bt [R, n]``, as the
    operator ``lorahot::wide_linear``."""
    out: torch.Tensor = torch.ops.lorahot.wide_linear(x, wide, bt)
    return out
