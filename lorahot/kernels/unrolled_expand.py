"""A few rows' expand as an elementwise expression, which the compiler computes inside its reader.

In ``torch.compile``'s default mode (no CUDA graphs) a call at decode sizes is bound by the
host, which pays for every kernel launch the compiled wrapper makes
(:mod:`lorahot.kernels.compile_mode`). There a layer's expand ``h @ B_s.T`` is a GEMM, a launch
of its own, even where the layer's base product and shrink come from one GEMM over ``[W; A]``
(:func:`lorahot.kernels.wide_groups.expands`): o's and down's expands were the two launches per
block that lorahot added to a Llama's decode step.

``lorahot::unrolled_expand(h, bt)`` computes ``h @ bt`` (``h [rows, R]``, ``bt [R, n]``) in
float32 (float64 for float64 inputs) and returns it in ``h``'s dtype. Inductor lowers it
(:func:`register`) to an elementwise node over ``[rows, n]`` whose every element sums its
``R`` products in order, and fuses that node into the kernel that reads the layer's output
(the residual add and RMSNorm, the SiLU product, RoPE), as it does with any elementwise
producer: the expand costs no launch. Its arithmetic then runs on the GPU's CUDA cores, ``R``
multiply-adds and ``2 R`` loads per output element, so :func:`fits` takes it only for a few
rows known statically and a small rank; above, the expand stays a GEMM. Outside inductor
(eagerly, other backends) the op is a GEMM in that precision.
"""

from __future__ import annotations

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from lorahot.kernels.op_registry import define, refuse_grad

__all__ = ["ENABLED", "RANK", "ROWS", "fits", "register", "unrolled_expand"]

#: Whether :func:`fits` takes the unrolled form at all (read when a graph is compiled).
ENABLED = True

#: The most rows (known statically: a symbolic row count keeps the GEMM, with no guard) whose
#: expand is unrolled.
ROWS = 128

#: The largest rank unrolled: each output element sums ``R`` products.
RANK = 64


def fits(rows: int | torch.SymInt, rank: int) -> bool:
    """Whether an expand of ``rows`` rows and rank ``rank`` is unrolled (see the module)."""
    return ENABLED and 0 < rank <= RANK and statically_known_true(rows <= ROWS)


def _fake(h: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    return h.new_empty((h.shape[0], bt.shape[1]))


@define("unrolled_expand(Tensor h, Tensor bt) -> Tensor", _fake)
def _unrolled_expand(h: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    refuse_grad("unrolled_expand", h, bt)
    wide = torch.promote_types(h.dtype, torch.float32)
    return (h.to(wide) @ bt.to(wide)).to(h.dtype)


def unrolled_expand(h: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """``h @ bt`` for ``h [rows, R]`` and ``bt [R, n]`` of one dtype, summed in float32 and
    returned in that dtype; under inductor an elementwise node it fuses into the reader (call
    :func:`register` before the graph is lowered). No gradient."""
    out: torch.Tensor = torch.ops.lorahot.unrolled_expand(h, bt)
    return out


_REGISTERED = False


def register() -> None:
    """Registers the op's inductor lowering, once (the compiler passes call it: importing
    inductor's lowering module at ``import lorahot`` would cost every user its import time)."""
    global _REGISTERED
    if _REGISTERED:
        return
    import sympy  # type: ignore[import-untyped]
    from torch._inductor import ir
    from torch._inductor.lowering import register_lowering
    from torch._inductor.virtualized import ops

    @register_lowering(torch.ops.lorahot.unrolled_expand.default, type_promotion_kind=None)
    def _lower(h: ir.TensorBox, bt: ir.TensorBox) -> ir.TensorBox:
        rows, rank = h.get_size()
        n = bt.get_size()[1]
        dtype = h.get_dtype()
        wide = torch.promote_types(dtype, torch.float32)
        load_h, load_bt = h.make_loader(), bt.make_loader()

        def element(index: list[sympy.Expr]) -> object:
            i, j = index
            total = None
            for k in range(int(rank)):
                at = sympy.Integer(k)
                left = ops.to_dtype(load_h([i, at]), wide)
                term = ops.mul(left, ops.to_dtype(load_bt([at, j]), wide))
                total = term if total is None else ops.add(total, term)
            return ops.to_dtype(total, dtype)

        box: ir.TensorBox = ir.Pointwise.create(device=h.get_device(), dtype=dtype, inner_fn=element, ranges=[rows, n])
        return box

    _REGISTERED = True
