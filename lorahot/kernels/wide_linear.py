"""The wide LoRA linear: the expand summed in the base GEMM's own accumulator.

A widened layer (:mod:`lorahot.layers.linear`) keeps its weight in ``wide = [W | B_s]``
(``[out, in + R]``): the base weight's rows with the live adapter's scaled B beside them,
``B_s[:, r] = s_r * B[:, r]`` (:mod:`lorahot.runtime.wide` keeps those columns equal to the
live adapter). :func:`wide_linear` computes the shrink ``h = x @ A.T`` (``[M, R]``), then one
GEMM over ``K = in + R``::

    y = [x | h] @ wide.T + bias = x @ W.T + (h * s) @ B.T + bias

The expand costs the base GEMM ``R / in`` more arithmetic and no output pass of its own: ``y``
comes out of one GEMM, contiguous, with the bias in its epilogue, as the base layer's does.
Under ``torch.compile`` the concatenation costs nothing where ``x`` comes from an elementwise
kernel (a norm, an activation): the compiler has that kernel write ``x`` into the left of the
concatenation's buffer, and the shrink's GEMM write ``h`` into its right.

Measured on an H200, 12 layers of one shape in one compiled function (default mode), each input
from a SiLU, us per layer of GPU time (``benchmarks/experiments/compiled_layer_probe.py``,
``runs/20261130T211441-`` and ``211546-compiled-layer-probe.json``), against the form this
replaced (``[W; s * A]`` in one GEMM, then the expand as a GEMM of its own added by the compiler):

- feeding attention (not elementwise: the compiler then rewrote the add into an ``addmm``,
  which copies ``y`` first): SDXL 640 q/k/v at 8192 rows 55.2 against 61.0 (base 43.2), 1280 at
  2048 rows 38.4 against 42.4 (29.9), the LLM's q/o at 1024 rows 37.6 against 40.9 (30.0);
- feeding a GELU (the add folded into it, but the expand's output written and read once
  more): SDXL's feed-forward input, 640 to 5120 at 8192 rows, 162.7 against 187.6 (145.9), 1280
  to 10240 at 2048 rows 119.2 against 132.0 (108.0); the LLM's gate/up at 1024 rows 52.5
  against 52.8 (43.8).

**Symbolic row counts.** Under dynamic shapes (``torch.compile(dynamic=True)``, or the automatic
dynamic shapes a second input size turns on) the row count is a symbol of the graph. Choosing
between the fused kernel (:mod:`lorahot.kernels.lora_linear`, best up to a few hundred rows)
and the wide GEMMs in Python would make the compiler guard on the choice and compile one graph
per range of row counts: on an H200 the rows suite's nine shapes took lorahot 7 graphs and 297 s
against the base model's 4 graphs and 127 s (``benchmarks/experiments/compile_probe.py``).
There :func:`wide_linear_dynamic` makes the choice at run time inside one opaque operator,
``lorahot::wide_linear_dynamic``, so one graph serves every row count, as it does for the base
model.
"""

from __future__ import annotations

import torch

from lorahot.kernels import lora_linear as fused_kernel
from lorahot.kernels.op_registry import define, refuse_grad

__all__ = ["wide_linear", "wide_linear_dynamic"]


def wide_linear(x: torch.Tensor, wide: torch.Tensor, a: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``[x | x @ a.T] @ wide.T + bias`` for ``x [..., in]``, ``a [R, in]``, ``wide [out, in + R]``
    (see the module docstring): the shrink, then one GEMM. Differentiable: plain torch."""
    x2 = x.reshape(-1, x.shape[-1])
    xh = torch.cat([x2, torch.nn.functional.linear(x2, a)], dim=-1)
    y = torch.nn.functional.linear(xh, wide, bias)
    return y.view(*x.shape[:-1], wide.shape[0])


def _dynamic_fake(
    x: torch.Tensor, wide: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: torch.Tensor, fused: bool
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], wide.shape[0]))


@define(
    "wide_linear_dynamic(Tensor x, Tensor wide, Tensor a, Tensor bt, Tensor scale, bool fused) -> Tensor",
    _dynamic_fake,
)
def _wide_linear_dynamic(
    x: torch.Tensor, wide: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: torch.Tensor, fused: bool
) -> torch.Tensor:
    refuse_grad("wide_linear_dynamic", x, wide, a, bt)
    n = wide.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    if fused and fused_kernel.worth_it(x2.shape[0], n, wide=True):
        y = x2.new_empty((x2.shape[0], n))
        fused_kernel.lora_linear_into(x2, wide.narrow(1, 0, x2.shape[1]), a, bt, scale, y)
    else:
        y = wide_linear(x2, wide, a)
    return y.view(*x.shape[:-1], n)


def wide_linear_dynamic(
    x: torch.Tensor, wide: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: torch.Tensor, *, fused: bool
) -> torch.Tensor:
    """:func:`wide_linear` for an input whose row count the compiler keeps symbolic (see the
    module docstring): where ``fused`` (the layer's fused kernel applies) and
    :func:`lorahot.kernels.lora_linear.worth_it` says so for the rows of this call, the fused
    kernel over the weight ``wide[:, :in]``, the live ``a [R, in]``, ``bt [R, out]`` and the
    per-row ``scale [R]``; else :func:`wide_linear`. One opaque operator either way, its output
    contiguous; no gradient."""
    out: torch.Tensor = torch.ops.lorahot.wide_linear_dynamic(x, wide, a, bt, scale, fused)
    return out
