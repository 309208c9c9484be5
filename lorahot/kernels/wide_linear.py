"""The wide LoRA linear: base and shrink in one GEMM, then the expand.

For a layer whose weight lives in ``wide = [W; scale * A]`` (``[out + R, in]``, see
:mod:`lorahot.layers.linear`), :func:`wide_linear` computes ``[y | h] = x @ wide.T`` with one
GEMM, reading ``x`` once, then adds the expand ``h @ Bt`` to ``y``. How it adds depends on who
runs it:

- **Eagerly**, where no gradient flows, the expand accumulates into ``y`` in place (cuBLAS
  ``beta = 1``): two kernels where the base model has one. The result is a view with row
  stride ``out + R``.
- **Under** ``torch.compile`` (or where autograd records the call), it is plain library calls:
  the GEMM, the expand as a product of its own, and ``y + expand`` as an elementwise add that
  the compiler fuses with whatever consumes the output (the bias, an activation, a residual
  add). The compiled wrapper then calls two extern GEMMs per layer and no Python: in default
  mode (no CUDA graphs) every Python-level call costs the host tens of microseconds on a GPU
  machine.

Measured on an H200 (``benchmarks/experiments/compiled_layer_probe.py``,
``runs/20261130T160640-compiled-layer-probe.json``; each layer followed by a GELU, compiled in
default mode, per layer): the traced form costs the same GPU time as the in-place accumulate
behind an opaque operator, or less where the output is wide (SDXL's 640-channel feed-forward
input: 182 against 214 us, the add folded into the GELU instead of reading and writing the
output once more), and less wall time back to back where the host is the bound (the LLM's
gate/up at 1024 rows: 79 against 126 us; the base GEMM alone 45).

Where the output's consumer is not elementwise (attention's q and k after a rotary ``cat``,
SDPA), the compiler rewrites ``y + h @ Bt`` into ``addmm(y, h, Bt)``, and ATen's ``addmm``
copies ``y`` into its output first: a copy kernel the in-place accumulate did not need (44
per forward of the 22-block Llama at 1024 rows; ``benchmarks/README.md``, fifth session).

The input is flattened to two dimensions first, so the expand is a plain 2-D product over the
strided ``h`` (row stride ``out + R``).

**Symbolic row counts.** Under dynamic shapes (``torch.compile(dynamic=True)``, or the automatic
dynamic shapes a second input size turns on) the row count is a symbol of the graph. Choosing
between the fused kernel (:mod:`lorahot.kernels.lora_linear`, best up to a few hundred rows)
and the wide GEMMs in Python would make the compiler guard on the choice and compile one graph
per range of row counts: on an H200 the rows suite's nine shapes took lorahot 7 graphs and 297 s
against the base model's 4 graphs and 127 s (``benchmarks/experiments/compile_probe.py``).
There :func:`wide_linear_dynamic` makes the choice at run time inside one opaque operator,
``lorahot::wide_linear_dynamic``, so one graph serves every row count, as it does for the base
model. Its output has the wide GEMM's layout whichever path ran (row stride ``out + R``), as
its fake says.
"""

from __future__ import annotations

import torch

from lorahot.kernels import lora_linear as fused_kernel
from lorahot.kernels.op_registry import define, refuse_grad

__all__ = ["wide_linear", "wide_linear_dynamic"]


def wide_linear(x: torch.Tensor, wide: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """``x @ wide[:n].T + (x @ wide[n:].T) @ bt`` for ``x [..., in]``, ``wide [n + R, in]``,
    ``bt [R, n]``, as two GEMMs (see the module docstring). Differentiable: plain torch."""
    n, r = bt.shape[1], bt.shape[0]
    yh = torch.nn.functional.linear(x.reshape(-1, x.shape[-1]), wide)
    if torch.compiler.is_compiling() or _needs_grad(x, wide, bt):
        y = yh[:, :n] + yh[:, n:] @ bt
    else:
        y = yh.narrow(1, 0, n).addmm_(yh.narrow(1, n, r), bt)  # narrow, not [:, a:b]: less host time
    return y.view(*x.shape[:-1], n)


def _needs_grad(*tensors: torch.Tensor) -> bool:
    """Whether autograd records this call: an in-place write into ``yh`` would then overwrite
    the ``h`` its backward needs."""
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


def _dynamic_fake(
    x: torch.Tensor, wide: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: torch.Tensor, fused: bool
) -> torch.Tensor:
    n = bt.shape[1]
    yh = x.new_empty((x.numel() // x.shape[-1] if x.shape[-1] else 0, wide.shape[0]))
    return yh[:, :n].view(*x.shape[:-1], n)


@define(
    "wide_linear_dynamic(Tensor x, Tensor wide, Tensor a, Tensor bt, Tensor scale, bool fused) -> Tensor",
    _dynamic_fake,
)
def _wide_linear_dynamic(
    x: torch.Tensor, wide: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: torch.Tensor, fused: bool
) -> torch.Tensor:
    refuse_grad("wide_linear_dynamic", x, wide, a, bt)
    n, r = bt.shape[1], bt.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    if fused and fused_kernel.worth_it(x2.shape[0], n, wide=True):
        y = x2.new_empty((x2.shape[0], n + r)).narrow(1, 0, n)
        fused_kernel.lora_linear_into(x2, wide.narrow(0, 0, n), a, bt, scale, y)
    else:
        y = wide_linear(x2, wide, bt)  # eagerly, no gradient: the in-place accumulate
    return y.view(*x.shape[:-1], n)


def wide_linear_dynamic(
    x: torch.Tensor, wide: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: torch.Tensor, *, fused: bool
) -> torch.Tensor:
    """:func:`wide_linear` for an input whose row count the compiler keeps symbolic (see the
    module docstring): where ``fused`` (the layer's fused kernel applies) and
    :func:`lorahot.kernels.lora_linear.worth_it` says so for the rows of this call, the fused
    kernel over the weight ``wide[:n]``, the live ``a [R, in]`` and its per-row ``scale [R]``;
    else the wide GEMM and the in-place expand. One opaque operator either way; no gradient."""
    out: torch.Tensor = torch.ops.lorahot.wide_linear_dynamic(x, wide, a, bt, scale, fused)
    return out
