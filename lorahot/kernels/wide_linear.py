"""The wide LoRA linear: base product and expand in one GEMM when compiled, base and shrink in one eagerly.

A widened layer (:mod:`lorahot.layers.linear`) keeps its weight in one buffer laid out as ::

    wide = [[W, B_s],      # [out + R, in + R]: W [out, in], B_s [out, R]
            [A, 0  ]]      #                    A [R, in]

with the live adapter's A and its B, each rank row's column times its scale,
``B_s[:, r] = s_r * B[:, r]`` (:mod:`lorahot.runtime.wide` keeps both equal to the live
adapter). Two formulas read it, each the cheaper one where it runs:

- **Traced** (under ``torch.compile``, or where autograd records the call): the shrink
  ``h = x @ A.T``, then one GEMM over ``K = in + R``::

      y = [x | h] @ [W, B_s].T + bias = x @ W.T + (h * s) @ B.T + bias

  The expand costs the base GEMM ``R / in`` more arithmetic and no output pass of its own:
  ``y`` comes out of one GEMM, contiguous, the bias in its epilogue, as the base layer's does.
  The concatenation costs nothing where ``x`` comes from an elementwise kernel (a norm, an
  activation): the compiler has that kernel write ``x`` into the left of the concatenation's
  buffer, and the shrink's GEMM write ``h`` into its right.
- **Eager** (no gradient; also inside ``lorahot::wide_linear_dynamic``): ``[y | h] = x @
  [W; A].T`` in one GEMM, reading ``x`` once, then the expand accumulated into ``y`` in place
  (cuBLAS ``beta = 1``): two kernels, no copy. The result is a view with row stride ``out + R``.
  Eagerly the concatenation would be a copy of ``x`` of its own: in the rows suite, where the
  row count is symbolic and every layer runs eagerly inside the operator, it cost 154 copy
  kernels per forward at 2048 rows and put GPU time at 1.13-1.23x the base's at 64-2048 rows,
  against 1.06-1.14x for this form (H200, ``runs/20261130T214118-rows.json`` against
  ``runs/20261130T195205-rows.json``).

Measured on an H200, 12 layers of one shape in one compiled function (default mode), each input
from a SiLU, us per layer of GPU time (``benchmarks/experiments/compiled_layer_probe.py``,
``runs/20261130T211441-`` and ``211546-compiled-layer-probe.json``), the traced formula against
the one it replaced (one GEMM over ``[W; s * A]``, then the expand as a GEMM of its own that the
compiler adds to ``y``):

- feeding attention (not elementwise: the compiler rewrote that add into an ``addmm``, which
  copies ``y`` first): SDXL 640 q/k/v at 8192 rows 55.2 against 61.0 (base 43.2), 1280 at
  2048 rows 38.4 against 42.4 (29.9), the LLM's q/o at 1024 rows 37.6 against 40.9 (30.0);
- feeding a GELU (the add folded into it, but the expand's output written and read once
  more): SDXL's feed-forward input, 640 to 5120 at 8192 rows, 162.7 against 187.6 (145.9), 1280
  to 10240 at 2048 rows 119.2 against 132.0 (108.0); the LLM's gate/up at 1024 rows 52.5
  against 52.8 (43.8).

In the SDXL UNet (700 layers) that took a compiled step from 1.34x to 1.24x the base's in
default mode and from 1.32x to 1.20x in reduce-overhead (``runs/20261130T213356-`` and
``213609-diffusion.json``).

**Symbolic row counts.** Under dynamic shapes (``torch.compile(dynamic=True)``, or the automatic
dynamic shapes a second input size turns on) the row count is a symbol of the graph. Choosing
between the fused kernel (:mod:`lorahot.kernels.lora_linear`, best up to a few hundred rows)
and the wide GEMMs in Python would make the compiler guard on the choice and compile one graph
per range of row counts: on an H200 the rows suite's nine shapes took lorahot 7 graphs and 297 s
against the base model's 4 graphs and 127 s (``benchmarks/experiments/compile_probe.py``).
There :func:`wide_linear_dynamic` makes the choice at run time inside one opaque operator,
``lorahot::wide_linear_dynamic``, so one graph serves every row count, as it does for the base
model. Its output has the eager formula's layout whichever path ran (row stride ``out + R``),
as its fake says.
"""

from __future__ import annotations

import torch

from lorahot.kernels import lora_linear as fused_kernel
from lorahot.kernels.op_registry import define, define_composite, refuse_grad
from lorahot.kernels.rows import as_rows

__all__ = ["SHIFTED_DTYPES", "traced", "wide_linear", "wide_linear_dynamic", "wide_traced"]

#: Dtypes whose wide buffers hold each rank row shifted by a power of two ``p_r``: ``A_r / p_r``
#: and ``B_s[:, r] * p_r`` (:func:`lorahot.kernels.row_scale.row_shifts`, kept by
#: :mod:`lorahot.runtime.wide`). Every GEMM here writes the shrink in the weights' dtype, and
#: float16 tops out at 65504: unshifted, ``x @ A.T`` of 1e5 would be inf where the output is
#: well in range. Shifted, ``|x @ (A_r / p_r)|`` is at most 65504 for every float16 ``x``, and
#: the product with the shifted B is the same (powers of two). The traced shrink reads the
#: shifted rows, never the arena's (which are not shifted): the runtime's contiguous copy of
#: them where the layer has one (``shifted=True``), else the buffer's own. bfloat16 has
#: float32's range.
SHIFTED_DTYPES = frozenset({torch.float16})


def wide_linear(
    x: torch.Tensor,
    wide: torch.Tensor,
    bias: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    shifted: bool = False,
) -> torch.Tensor:
    """``x @ W.T + (x @ A.T) @ B_s.T + bias`` for ``x [..., in]`` and the wide buffer ``wide
    [out + R, in + R]`` (see the module docstring): traced, the shrink then one GEMM over
    ``[x | h]``; eagerly without gradient, one GEMM over ``[W; A]`` then the expand in place.
    ``a`` is the same ``A [R, in]`` as the buffer's, where the traced shrink should read it
    (the layer's arena view, which :mod:`lorahot.kernels.stacked_shrinks` stacks with its
    neighbours'), unless a move of the model (``model.double()``) left it in another dtype than
    the buffer's. Differentiable: compiled with ``a``, the operator ``lorahot::wide_traced``
    (:func:`wide_traced`, which autograd and the compiler see as its formula); else plain torch."""
    if torch.compiler.is_compiling() and a is not None:
        # the operator, as compiled_wide calls it: a layer with extras (DoRA, LoRA bias)
        # compiles to the same tagged nodes, which the compiler passes match
        # (lorahot.kernels.extern_inputs reads the tag); traced handles an A of another dtype
        return wide_traced(x, wide, bias, a, shifted)
    if torch.compiler.is_compiling() or _needs_grad(x, wide, bias):
        return traced(x, wide, bias, a, shifted)
    k = x.shape[-1]
    n = _out_width(wide, k)
    y = _in_place(as_rows(x), wide, n, k)
    if bias is not None:
        y.add_(bias)
    return y.view(*x.shape[:-1], n)


def traced(
    x: torch.Tensor, wide: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor | None, shifted: bool = False
) -> torch.Tensor:
    """:func:`wide_linear`'s traced form, the shrink then one GEMM over ``[x | h]``. The
    compiler passes (:mod:`lorahot.kernels.stacked_shrinks`, :mod:`lorahot.kernels.extern_inputs`)
    match it on 2-D rows. A compiled wide layer calls it as the operator
    ``lorahot::wide_traced`` (:func:`wide_traced`). In a dtype of :data:`SHIFTED_DTYPES` the
    shrink reads ``a`` only where ``shifted`` says it holds the shifted rows (the runtime's
    contiguous copy of them, which those passes match); else the buffer's own."""
    k = x.shape[-1]
    n = _out_width(wide, k)
    x2 = as_rows(x)
    if a is None or a.dtype != wide.dtype or (wide.dtype in SHIFTED_DTYPES and not shifted):
        a = wide[n:, :k]  # a move of the model converted the buffer, not the arena; or the shifted rows
    xh = torch.cat([x2, torch.nn.functional.linear(x2, a)], dim=-1)
    y = torch.nn.functional.linear(xh, wide[:n], bias)
    # 2-D rows: the GEMM's output itself, as the base layer's F.linear gives. A view of it would
    # be one more link in a view chain, and a model that writes into the layer's output through
    # as_strided (a view chain of one on the base model) would not compile.
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)


define_composite("wide_traced(Tensor x, Tensor wide, Tensor? bias, Tensor a, bool shifted=False) -> Tensor")(traced)


def wide_traced(
    x: torch.Tensor, wide: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, shifted: bool = False
) -> torch.Tensor:
    """:func:`traced` as one operator (``CompositeImplicitAutograd``,
    :func:`lorahot.kernels.op_registry.define_composite`): the compiler's trace of a layer records
    one node where the formula inline is up to six operations (reshape, shrink, concatenation, slice,
    GEMM, view), and AOTAutograd writes the same aten graph as before. Tracing each operation
    costs the compiler about as much as the rest of the layer: on the SDXL-shaped UNet's 700
    layers, dynamo's part of a compile was 29.5 s against the base model's 12.6 with the
    formula inline (H200 host, ``benchmarks/experiments/unet_compile_probe.py``)."""
    out: torch.Tensor = torch.ops.lorahot.wide_traced(x, wide, bias, a, shifted)
    return out


def _in_place(x2: torch.Tensor, wide: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """``[y | h] = x2 @ [W; A].T``, then ``y += h @ B_s.T`` in place; ``y`` a view with row
    stride ``n + R`` (``narrow``, not ``[:, a:b]``: less host time)."""
    yh = torch.nn.functional.linear(x2, wide.narrow(1, 0, k))
    r = wide.shape[0] - n
    return yh.narrow(1, 0, n).addmm_(yh.narrow(1, n, r), wide.narrow(0, 0, n).narrow(1, k, r).t())


def _out_width(wide: torch.Tensor, k: int) -> int:
    """The output width ``out`` of a wide buffer ``[out + R, in + R]`` read by inputs ``k = in`` wide."""
    return wide.shape[0] - (wide.shape[1] - k)


def _needs_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records this call: an in-place write into ``yh`` would then overwrite
    the ``h`` its backward needs."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _dynamic_fake(
    x: torch.Tensor, wide: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: torch.Tensor, fused: bool
) -> torch.Tensor:
    # one allocation with the real output's layout (the first n columns of [rows, out + R],
    # viewed with x's leading dimensions), not the three ops that make it eagerly: dynamo runs
    # this at every layer it traces
    n, total = _out_width(wide, x.shape[-1]), wide.shape[0]
    lead = x.shape[:-1]
    if not lead:
        return x.new_empty((n,))
    strides = [total]
    for d in reversed(lead[1:]):
        strides.append(strides[-1] * d)
    return x.new_empty_strided((*lead, n), (*reversed(strides), 1))


@define(
    "wide_linear_dynamic(Tensor x, Tensor wide, Tensor a, Tensor bt, Tensor scale, bool fused) -> Tensor",
    _dynamic_fake,
)
def _wide_linear_dynamic(
    x: torch.Tensor, wide: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: torch.Tensor, fused: bool
) -> torch.Tensor:
    refuse_grad("wide_linear_dynamic", x, wide, a, bt)
    k = x.shape[-1]
    n = _out_width(wide, k)
    x2 = as_rows(x)
    if fused and fused_kernel.worth_it(x2.shape[0], n, wide=True):
        y = x2.new_empty((x2.shape[0], wide.shape[0])).narrow(1, 0, n)
        fused_kernel.lora_linear_into(x2, wide.narrow(0, 0, n).narrow(1, 0, k), a, bt, scale, y)
    else:
        y = _in_place(x2, wide, n, k)  # eagerly, no gradient
    return y.view(*x.shape[:-1], n)


def wide_linear_dynamic(
    x: torch.Tensor, wide: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, scale: torch.Tensor, *, fused: bool
) -> torch.Tensor:
    """:func:`wide_linear` for an input whose row count the compiler keeps symbolic (see the
    module docstring): where ``fused`` (the layer's fused kernel applies) and
    :func:`lorahot.kernels.lora_linear.worth_it` says so for the rows of this call, the fused
    kernel over the weight ``W`` in ``wide``, the live ``a [R, in]``, ``bt [R, out]`` and the
    per-row ``scale [R]``; else the eager :func:`wide_linear`, which reads ``wide`` alone (``a``,
    ``bt`` and ``scale`` may then be any tensors: the output's width is ``wide``'s rows less
    its padding, ``wide [out + R, in + R]``). One opaque operator either way, its output with
    row stride ``out + R``; no gradient."""
    out: torch.Tensor = torch.ops.lorahot.wide_linear_dynamic(x, wide, a, bt, scale, fused)
    return out
