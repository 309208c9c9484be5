"""The fused LoRA linear: base product, shrink, per-row scale, expand and bias in one CUDA kernel.

A LoRA linear written with library calls launches the base GEMM, the shrink ``x @ A.T`` and
the expand ``h @ B`` (plus an elementwise add the compiler can fuse away): three kernels where
the base model has one. At small batch sizes, decode in particular, each of those kernels
costs a few microseconds of latency however small it is, and on a 154-layer model that adds
up to more than the base model's whole forward. :func:`lora_linear` does it all in one Triton
kernel (see :mod:`lorahot.kernels.triton_lora_linear`; layers with few output tiles add a small kernel that
sums split-K partials), registered as the operator ``lorahot::lora_linear`` so that
``torch.compile`` and CUDA graphs treat it as one opaque, shape-stable call.

It is used where it applies (:func:`supports`: CUDA tensors, float16 or bfloat16, an
``nn.Linear`` base layer whose weight has the arena's dtype, Triton importable; no autograd
needed) and where it pays (:func:`worth_it`: decode and short prefill, by measured shape). Larger
inputs take the wide GEMM where the layer is widened (:mod:`lorahot.layers.linear`), else the
plain library-call formula, which is also the reference the kernel is tested against.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true

from lorahot.kernels.triton_import import triton_module

__all__ = [
    "MAX_OUT",
    "MAX_RANK",
    "available",
    "supports",
    "supports_tensors",
    "worth_it",
    "routed_worth_it",
    "decidable",
    "lora_linear",
    "lora_linear_into",
]

_DTYPES = (torch.float16, torch.bfloat16)

#: The most outputs the kernels take: the fused kernel's grid holds a program per 64 output
#: columns along its second dimension, which CUDA caps at 65535 (the routed gather expand's, per
#: 128). A wider layer keeps the library formula, where a launch would fail.
MAX_OUT = 65535 * 64

#: The largest rank the kernels take. Their tiles in shared memory grow with the rank; by
#: Triton's compile metadata, with the fewest pipeline stages (:mod:`lorahot.kernels.direct_launch`)
#: every kernel fits an H100/H200 and an A100 up to rank 512, and at rank 1024 the fused kernel
#: needs 262,144 bytes for a decode into more than 12,288 outputs, past every GPU's limit. Layers
#: of a larger rank keep the library formula.
MAX_RANK = 512


def _kernel() -> Any:
    """The Triton module, or None where Triton (or CUDA) is missing."""
    return triton_module("triton_lora_linear")


def available() -> bool:
    """Whether the fused kernel can run on this machine (CUDA and Triton present)."""
    return _kernel() is not None


def supports(base: nn.Module, lora_A: torch.Tensor) -> bool:
    """Whether a LoRA linear over ``base`` with live buffer ``lora_A`` can use the kernel."""
    weight = getattr(base, "weight", None)
    bias = getattr(base, "bias", None)
    return type(base) is nn.Linear and isinstance(weight, torch.Tensor) and supports_tensors(weight, bias, lora_A)


def supports_tensors(weight: torch.Tensor, bias: torch.Tensor | None, lora_A: torch.Tensor) -> bool:
    """Whether the kernel runs on these plain tensors: a linear's ``weight [out, in]`` (rows
    contiguous, at most :data:`MAX_OUT` of them) and ``bias``, and the live ``lora_A`` (at most
    :data:`MAX_RANK` rows), on CUDA in one fp16/bf16 dtype."""
    return (
        weight.is_cuda
        and weight.shape[0] <= MAX_OUT
        and lora_A.shape[0] <= MAX_RANK
        and weight.dtype in _DTYPES
        and weight.dtype == lora_A.dtype
        and weight.stride(-1) == 1
        and (bias is None or bias.dtype == weight.dtype)
        and available()
    )


def worth_it(rows: int, out_features: int, *, wide: bool = False) -> bool:
    """Whether the kernel beats the alternative for ``rows`` tokens into ``out_features``.

    The alternative is the wide GEMM (:mod:`lorahot.layers.linear`: base and shrink in one
    cuBLAS call, then the expand) where the layer is widened, else base + shrink + expand.
    Measured on an H200 (``benchmarks/experiments/large_probe.py``, TinyLlama projection shapes
    at rank 64, each call in a CUDA graph, us per call, kernel / wide):

    - 1 row: q/o 7.6 / 9.1, k/v 4.4 / 7.3, gate/up 12.4 / 12.2, down 11.0 / 14.6;
    - 64 rows: q/o 9.0 / 9.3, k/v 5.6 / 8.4, gate/up 18.3 / 13.0, down 13.2 / 15.3;
    - 256 rows: q/o 17.0 / 10.2, k/v 7.1 / 8.7, gate/up 23.6 / 17.3, down 41.3 / 17.3;
    - 1024 rows: the wide GEMM everywhere (k/v 15.4 / 9.2).

    Against base + shrink + expand the kernel wins up to 128 rows (H100, same probe). On a
    widened layer it serves q, o and down up to :data:`WIDE_ROWS` rows.
    """
    if rows <= _ALWAYS_ROWS:
        return True
    if not wide:
        return rows <= _LIBRARY_ROWS
    if rows <= WIDE_ROWS:
        return out_features < 4096
    return rows <= _NARROW_ROWS and out_features <= 512


def routed_worth_it(rows: int, out_features: int, *, wide: bool = False) -> bool:
    """Whether the routed fused path (:mod:`lorahot.kernels.routed_linear`) beats the base GEMM
    plus the segmented pair for ``rows`` tokens into ``out_features``: where the kernel beats
    the library formula (up to 128 rows at any width; the wide GEMM serves one adapter only,
    so it is no alternative here), and on a widened layer wherever it beats the wide GEMM too.
    At 64 rows on an H200, us per gate/up layer with one and eight adapters, early launches on
    (:mod:`lorahot.kernels.pdl`): 13.7 / 15.9 against the pair's 18.5 / 19.9; with them off the
    fused path is within 0.6 us of the pair on the GPU and launches one kernel fewer
    (``benchmarks/experiments/pdl_probe.py``)."""
    return worth_it(rows, out_features, wide=False) or worth_it(rows, out_features, wide=wide)


#: The most rows at which a widened layer of fewer than 4096 outputs (q, o, down) still runs the
#: kernel; above it, up to 256 rows, only the narrowest (at most 512 outputs: k, v) do
#: (``LORAHOT_FUSED_WIDE_ROWS`` at import sets another limit). At 128 rows on an H100
#: (``large_probe``, us per layer, kernel / wide GEMM): q/o 10.07 / 9.78, down 18.14 / 17.73, k/v
#: 5.66 / 8.55; at 64 rows q/o 8.51 / 9.59, down 14.31 / 16.72. In the model the wide form also
#: lets q, k and v share one GEMM (:mod:`lorahot.kernels.wide_groups`): the forward suite's
#: 128-row prefill under CUDA graphs took 2.37 ms back to back against the base model's 2.05
#: (1.155x) with this limit at 64, 2.52 against 2.06 (1.22x) at 128, on two H100 machines
#: (sixty-sixth session, ``benchmarks/README.md``).
WIDE_ROWS = int(os.environ.get("LORAHOT_FUSED_WIDE_ROWS", "64"))

#: the most rows at which every layer runs the kernel (decode), at which one that is not widened
#: does (against base + shrink + expand), and at which a widened one of at most 512 outputs does
_ALWAYS_ROWS, _LIBRARY_ROWS, _NARROW_ROWS = 16, 128, 256

#: the row counts at which :func:`worth_it` changes its answer
_ROW_LIMITS = tuple(sorted({_ALWAYS_ROWS, WIDE_ROWS, _LIBRARY_ROWS, _NARROW_ROWS}))


def decidable(rows: int | torch.SymInt) -> bool:
    """Whether :func:`worth_it` can answer for ``rows`` without a guard: always eagerly, and
    under ``torch.compile`` where the row count is a constant of the graph, or symbolic but
    known to lie between two of its limits. Where it is not, asking would make the compiler
    guard on the answer, and compile one graph per range of row counts where the base model
    compiles one for all (:meth:`lorahot.layers.linear.LoRALinear.dynamic_rows`)."""
    # above every limit or below every limit (large inputs, decode): one or two tests
    if statically_known_true(rows > _ROW_LIMITS[-1]) or statically_known_true(rows <= _ROW_LIMITS[0]):
        return True
    # a loop, not a generator expression: the compiler traces this in every layer of every graph
    for t in _ROW_LIMITS:  # noqa: SIM110
        if not (statically_known_true(rows <= t) or statically_known_true(rows > t)):
            return False
    return True


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    bt: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """``x @ weight.T + bias + ((x @ a.T) * scale) @ bt`` on CUDA in fp16/bf16: one kernel, two
    where K is split. ``scale`` is ``[R]`` (float32), one per row of ``a``: the shrink's
    column ``k`` is scaled by ``scale[k]`` before the expand.

    Calls the registered op directly (registered by :func:`available`, which
    :func:`supports` runs at bind time), so the compiler traces nothing but the op.
    """
    y: torch.Tensor = torch.ops.lorahot.lora_linear(x, weight, bias, a, bt, scale)
    return y


def lora_linear_into(
    x2: torch.Tensor,
    weight: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    scale: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """:func:`lora_linear` without bias on 2-D ``x2 [M, K]``, written into ``out [M, N]``
    (columns contiguous, any row stride); called eagerly, from inside another operator. Where
    the kernel cannot run (no CUDA or Triton), the library formula stands in for it."""
    kernel = _kernel()
    if kernel is not None and x2.is_cuda:
        kernel.run_into(x2, weight, None, a, bt, scale, out)
        return
    h = (x2 @ a.t() * scale).to(x2.dtype)
    out.copy_(x2 @ weight.t() + h @ bt)
