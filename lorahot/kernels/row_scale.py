"""Scaled copies of many row blocks in one launch: ``dst[l][k] = src[l][k] * s[layer[l], k]``.

The wide layers (:mod:`lorahot.runtime.wide`) keep a copy of the live B beside each base weight,
every rank row multiplied by its per-row scale (a destination block is then a transposed view:
its rows 1 apart, its columns a weight row apart). After every load, activation, re-weighting and unload
all of them are rewritten: with a copy and a multiply per layer (or two multi-tensor calls over
lists of 154 views and a host-computed scale per view), the host work alone took 0.3-0.6 ms per
swap on an H200, several times the swap's own copy. :class:`RowScaler` does it with one kernel
launch that reads the per-row scales from the device: the layers' addresses are fixed after
inject, so it builds their tables once and each refresh is a single call with no host loop.
It applies on CUDA where Triton is available (:func:`available`); elsewhere the caller keeps its
library-call path.
"""

from __future__ import annotations

from typing import Any

import torch

from lorahot.kernels.triton_import import triton_module

__all__ = ["available", "RowScaler", "stack_scales", "power_of_two_at_least", "row_shifts"]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _kernel() -> Any:
    """The Triton module, or None where Triton (or CUDA) is missing."""
    return triton_module("triton_row_scale")


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether :class:`RowScaler` runs for tensors of ``device`` and ``dtype``."""
    return device.type == "cuda" and dtype in _DTYPES and _kernel() is not None


class RowScaler:
    """``dst[l][:rows] = src[l][:rows] * scales[layer[l], :rows, None]`` for every pair, in one
    launch. ``src`` is a list of contiguous ``[R, cols_l]`` blocks, ``dst`` a list of blocks of
    the same shapes, all of contiguous rows (``stride(1) == 1``, the rows ``stride(0)`` apart: the
    wide layers' A rows) or all transposed views (``stride(0) == 1``, the columns ``stride(1)``
    apart: their B columns), same dtype and device; their addresses must not change afterwards.
    ``layer[l]`` is the row of ``scales`` (``[n_layers, R]``, contiguous rows) holding block
    ``l``'s per-row scales.

    ``shift`` (float32 ``[len(dst), R]``, contiguous rows): with transposed destinations (the
    wide float16 layers' B columns), block ``l``'s row ``k`` is multiplied by ``shift[l, k]``
    too; with destinations of contiguous rows (their A rows) the kernel finds it first,
    :func:`row_shifts` of the source row, writes it there, and divides by it instead
    (:mod:`lorahot.runtime.wide`)."""

    def __init__(
        self,
        dst: list[torch.Tensor],
        src: list[torch.Tensor],
        layer: list[int],
        shift: torch.Tensor | None = None,
    ) -> None:
        device, dtype = dst[0].device, dst[0].dtype
        self.transposed = _transposed(dst[0])
        for d, s in zip(dst, src, strict=True):  # lorahot's own buffers: a mismatch is a bug, not bad input
            same = d.shape == s.shape and d.dtype == s.dtype == dtype
            layout = _transposed(d) if self.transposed else _rows(d)
            if not (same and layout and s.is_contiguous()):
                raise ValueError(
                    f"row blocks must be {dtype} pairs of one shape, the sources contiguous and the destinations "
                    f"all of contiguous rows or all transposed; got {d.shape} {d.stride()}, {s.shape} {s.stride()}"
                )
        self.dtype = dtype
        self._dst = torch.tensor([d.data_ptr() for d in dst], dtype=torch.int64, device=device)
        self._src = torch.tensor([s.data_ptr() for s in src], dtype=torch.int64, device=device)
        self._layer = torch.tensor(layer, dtype=torch.int64, device=device)
        self._cols = torch.tensor([d.shape[1] for d in dst], dtype=torch.int32, device=device)
        self._ld = torch.tensor([d.stride(1 if self.transposed else 0) for d in dst], dtype=torch.int64, device=device)
        self._widest = max(d.shape[1] for d in dst)
        self._keep = (dst, src)  # the blocks the tables point into stay alive with them
        if shift is not None and not (
            shift.dtype == torch.float32
            and shift.device == device
            and shift.dim() == 2
            and shift.shape[0] == len(dst)
            and shift.stride(1) == 1
        ):
            raise ValueError(f"shift must be float32 [{len(dst)}, R] with contiguous rows on {device}")
        self.shift = shift

    def __call__(self, scales: torch.Tensor, rows: int) -> None:
        """Rewrites the first ``rows`` rows of every destination block."""
        if rows <= 0:
            return
        widest = self._widest if self.transposed else 0
        _kernel().launch(
            self._dst, self._src, scales, self._layer, self._cols, self._ld, rows, self.dtype, widest, self.shift
        )  # fmt: skip


def power_of_two_at_least(t: torch.Tensor) -> torch.Tensor:
    """The smallest power of two ``>= t``, elementwise, for positive finite ``t`` (exact:
    from :func:`torch.frexp`, ``t = m * 2**e`` with ``m`` in ``[0.5, 1)``)."""
    m, e = torch.frexp(t)
    return torch.where(m == 0.5, t, torch.ldexp(torch.ones_like(t), e))


def row_shifts(rows: torch.Tensor) -> torch.Tensor:
    """Per row of ``rows [k, n]`` (float16), float32: the smallest power of two at least twice
    its sum of ``|value|``, and at least 1. Divided by it and rounded to float16, the row's dot
    product with any float16 vector stays inside float16's range: ``|x . a| <= max|x| * sum|a|``
    with ``max|x| <= 65504``, and the factor two covers the rounding of the divided row (relative
    ``2**-11``, and ``2**-25`` per subnormal value: below 1 for ``n < 2**24``). The division is
    exact where the row's values stay normal; :mod:`lorahot.runtime.wide` puts the factor back in
    B. The kernel computes the same, its sum in another order."""
    return power_of_two_at_least((2.0 * rows.float().abs().sum(dim=1)).clamp_min(1.0))


def _rows(t: torch.Tensor) -> bool:
    """Whether a 2-D block's rows are contiguous runs, each at least a row's length after the last."""
    return t.dim() == 2 and (t.shape[1] <= 1 or t.stride(1) == 1) and (t.shape[0] <= 1 or t.stride(0) >= t.shape[1])


def _transposed(t: torch.Tensor) -> bool:
    """Whether a 2-D block is a transposed view: rows 1 apart, columns at least a row's length apart."""
    return (
        t.dim() == 2 and (t.shape[0] <= 1 or t.stride(0) == 1) and t.stride(1) >= t.shape[0] and not t.is_contiguous()
    )


def stack_scales(
    own: torch.Tensor, part: torch.Tensor, weights: torch.Tensor, out: torch.Tensor, mirror: torch.Tensor | None = None
) -> None:
    """``out[i] = own[i] * weights[part[i]]`` (float64, rounded once to ``out``'s dtype, as the
    host computes a stack's per-row scales), and the same into ``mirror`` where given: one
    kernel on CUDA with Triton, where the library calls take a gather, a multiply and a copy per
    output. All contiguous and of one shape, ``own`` and ``weights`` float64, ``part`` int64."""
    if out.is_cuda and _kernel() is not None:
        _kernel().stack_scales(own, part, weights, out, mirror)
        return
    out.copy_(own * weights[part])
    if mirror is not None:
        mirror.copy_(out)
