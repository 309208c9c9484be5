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
rows known statically and a small rank; above, the expand stays a GEMM. The arithmetic runs
with the reader's grid, though: a reduction over the row (RMSNorm) has one program per row,
so at decode that one program does the whole expand: by default only the expands read by an
elementwise kernel are unrolled (:data:`ENABLED`, :data:`LONE`).
Outside inductor (eagerly, other backends) the op is a GEMM in that precision.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from lorahot.kernels.op_registry import define, refuse_grad

__all__ = [
    "ENABLED",
    "LONE",
    "LONE_SUMS",
    "MEMBERS",
    "RANK",
    "REDUCED",
    "ROWS",
    "SUMS",
    "fits",
    "register",
    "unrolled_expand",
    "unrolled_output",
    "unrolled_sums",
]

#: Whether :func:`fits` takes the unrolled form at all (read when a graph is compiled), for the
#: layers :data:`MEMBERS`, :data:`LONE` and :data:`SUMS` let through: by default gate's and up's
#: expands, read by the SiLU product (an elementwise kernel with its programs across the
#: columns), and q/k/v's one buffer (:data:`SUMS`). On unless ``LORAHOT_UNROLLED_EXPANDS=0`` at
#: import. Measured on an H200 (``benchmarks/README.md``, fifty-ninth session,
#: ``benchmarks/experiments/default_mode_probe.py``, the forward suite's model, 154 rank-64
#: layers, one decode row, 7 interleaved rounds in one process): 4.96 ms per decode call against
#: the GEMM expands' 5.32 and the base model's 4.37 (1.13x against 1.22x), 357 launches against
#: 379 and 184 allocations against 206. o's and down's (:data:`LONE`) are not: on an H100
#: (fifty-seventh and fifty-eighth sessions) they cost the host 4.8 ms per call against the base
#: model's 4.7 (the GEMM expands: 6.1), but 6.6-6.8 ms synced against 4.9: the GPU became the
#: bound. Inductor computes an expand read by the residual add and RMSNorm inside that row's
#: reduction kernel, one program per row, so at decode one program streams the whole ``B`` and
#: sums every column's ``R`` products, twice (the looped reduction's two passes). Compile time
#: grows: inductor generates code for every unrolled node, once per layer, where a GEMM is one
#: extern call (the model above: 75 s against 66 for the GEMM expands; with o's and down's too,
#: 72 s against 27 on one core).
ENABLED = os.environ.get("LORAHOT_UNROLLED_EXPANDS", "1") == "1"

#: The most rows (known statically: a symbolic row count keeps the GEMM, with no guard) whose
#: expand is unrolled. Each output element sums its ``R`` products on the CUDA cores, a cost
#: that grows with the rows where a GEMM's does not; a GEMM expand costs a launch, which the
#: host pays on every call in default mode. On an H100 (torch 2.11, sixty-fifth session, the
#: forward suite's model, 154 rank-64 layers, a 128-row prefill in default mode; run files
#: ``benchmarks/results/runs/20261207T1442-*`` and ``*T1445-*``): with the GEMM expands (that
#: process compiled lorahot's prefill with a symbolic row count) 388 launches per call, 8.25 ms
#: of host time and 1.99 ms of GPU time, the base model's 342, 7.44 and 1.99 ms; unrolled at
#: static rows, in a process of its own, 342 launches, 6.30 ms of host time and 3.19 ms of GPU
#: time (gate's and up's SiLU product 40 us per layer, q/k/v's sums 25 us): host-bound either
#: way, so the launches are what counts. Alone at 128 rows in a CUDA graph
#: (``benchmarks/experiments/unrolled_rows_probe.py``) the SiLU product with both reduced
#: expands took 32.9 us against 8.3 us for the GEMMs and their reader, 2.1 us without LoRA.
#: Above 128 rows the GPU's share grows with every row, and the GEMMs stay
#: (``LORAHOT_UNROLLED_ROWS`` at import sets another limit).
ROWS = int(os.environ.get("LORAHOT_UNROLLED_ROWS", "128"))

#: The largest rank unrolled: each output element sums ``R`` products.
RANK = 64

#: Whether the members of a group of two or more layers (gate/up, each read once: by the
#: SiLU product, an elementwise kernel over every column) are unrolled. On unless
#: ``LORAHOT_UNROLLED_MEMBERS=0`` at import (read only where :data:`ENABLED`).
MEMBERS = os.environ.get("LORAHOT_UNROLLED_MEMBERS", "1") == "1"

#: Whether a layer in no group (o, down) is unrolled. Off unless ``LORAHOT_UNROLLED_LONE=1`` at
#: import: in a Llama such a layer's output is read by the residual add and RMSNorm, a reduction
#: over the row, into whose one program per row inductor fuses the whole expand (see
#: :data:`ENABLED`: on an H100 that made decode GPU-bound at 1.36-1.39x the base model's time).
#: With :data:`REDUCED` (the default) such an expand is a reduction over the rank, which Triton
#: does not fuse into RMSNorm's reduction over the row: a kernel of its own, as a GEMM is.
LONE = os.environ.get("LORAHOT_UNROLLED_LONE") == "1"

#: Whether a group whose outputs are written into one buffer (``wide_groups.ONE_BUFFER``: RoPE's
#: q/k/v) writes it with :func:`unrolled_sums` where :func:`fits`, rather than the batched GEMM
#: expands. The expands of such a group are not unrolled member by member: inductor realizes an
#: elementwise node of more than 100 operations as a buffer of its own, and a buffer read
#: through the one buffer's padded views is not fused into the kernel that writes it (on an
#: H100, q/k/v then took four kernels where the batched GEMM and the sums take two). With the
#: sums (lowered as a reduction, :data:`REDUCED`) a decode call of the forward suite's model
#: launches as many kernels as the base model's, 335 against 357 without them, and took 5.43 ms
#: against the base model's 5.19 (1.05x) and 5.81 (1.12x) without them, on an H100, seven
#: interleaved rounds in one process
#: (``benchmarks/results/runs/20261207T0831-default-mode-probe-reduced-sums-84dbddf.log``). On
#: unless ``LORAHOT_UNROLLED_SUMS=0`` at import.
SUMS = os.environ.get("LORAHOT_UNROLLED_SUMS", "1") == "1"

#: Whether a layer in no group (o, down) writes its output ``y + h @ B_s.T`` with
#: :func:`unrolled_output` where :func:`fits`: a kernel of its own in place of the expand's
#: GEMM, so that one buffer ``[rows, out]``, not the layer's GEMM output and its expand, stays
#: alive through the MLP. The aim is memory: a Llama's residual add is recomputed by the
#: kernels that read it (RMSNorm, the next residual add), so with a GEMM expand both of the
#: layer's buffers stay alive, which lifts the blocks' estimated peak, and inductor then refuses
#: the reuses of buffers across blocks (``benchmarks/experiments/wrapper_code_probe.py``,
#: ``PROBE_REFUSALS=1``; sixtieth session, CPU box). The output is a reduction over the rank
#: (the sixty-first session's form), which Triton cannot fuse into RMSNorm's reduction over the
#: row: an elementwise node of the unrolled sums (the sixtieth session's form) could be, and
#: inductor's rules for Triton allow it (an elementwise producer whose size is the reduction's
#: rows times its length), which would put the expand in RMSNorm's one program per row, the
#: cost that keeps :data:`LONE` off. Not measured on a GPU. Off unless
#: ``LORAHOT_UNROLLED_LONE_SUMS=1`` at import (read only where :data:`ENABLED`, and where
#: :data:`LONE` is off).
LONE_SUMS = os.environ.get("LORAHOT_UNROLLED_LONE_SUMS") == "1"

#: Whether :func:`unrolled_expand` is lowered as a reduction over the rank (``R`` products per
#: output element, summed in float32 and rounded once, as now) rather than as an elementwise
#: node that spells out its ``R`` products; :func:`unrolled_sums` too (where :data:`SUMS`): one
#: reduction over the group's one buffer, each column's term that of the member whose columns
#: hold it, the ``y`` column added with the first. The aim is compile time: inductor builds and
#: simplifies every term of the elementwise form (``2 R`` loads) at every layer, and realizes
#: the node in its IR (more than 100 operations), where a reduction's inner function is one
#: product. On the CPU box (torch 2.13.0+cpu, the forward suite's model cut to 4 blocks at full
#: width, the decode graph alone, caches off): the elementwise form 11.4-11.8 s against the
#: base model's 4.2 s and the GEMM expands' 4.5 s; this form 4.6-5.1 s against the base
#: model's 3.3 s in another process. On a GPU the reader must take the reduction's
#: result in the same kernel for the launch count to stay: an elementwise reader (the SiLU
#: product) can be the reduction's epilogue, a reduction over the row (RMSNorm) cannot. On an
#: H100 (torch 2.11, ``benchmarks/results/runs/20261207T0708-default-mode-probe-reduced-a81fc39.log``)
#: it is: the SiLU product is one Triton kernel with both reductions, 357 launches per decode
#: call either way. The forward suite's model then compiled in 75.3 s against the elementwise
#: form's 87.3 and the base model's 48.1, and decoded in 5.18 ms against 5.08 and 4.59 (three
#: rounds, overlapping). On unless ``LORAHOT_UNROLLED_REDUCED=0`` at import.
REDUCED = os.environ.get("LORAHOT_UNROLLED_REDUCED", "1") == "1"


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


def _sums_fake(yh: torch.Tensor, bt: torch.Tensor, starts: list[int], outs: list[int]) -> torch.Tensor:
    return yh.new_empty(yh.shape)


@define("unrolled_sums(Tensor yh, Tensor bt, int[] starts, int[] outs) -> Tensor", _sums_fake)
def _unrolled_sums(yh: torch.Tensor, bt: torch.Tensor, starts: list[int], outs: list[int]) -> torch.Tensor:
    refuse_grad("unrolled_sums", yh, bt)
    wide = torch.promote_types(yh.dtype, torch.float32)
    rank = bt.shape[0]
    out = yh.to(wide, copy=True)
    for at, n in zip(starts, outs, strict=True):
        out[:, at : at + n] += yh[:, at + n : at + n + rank].to(wide) @ bt[:, at : at + n].to(wide)
    return out.to(yh.dtype)


def unrolled_sums(yh: torch.Tensor, bt: torch.Tensor, starts: list[int], outs: list[int]) -> torch.Tensor:
    """A wide group's outputs in one buffer, as :func:`lorahot.kernels.wide_groups.expands` lays
    them out with ``one_buffer``: ``yh [rows, total]`` (the group's GEMM output, ``[y_1 | h_1 |
    y_2 | h_2 ..]``) with each member's expand ``h_i @ bt[:, at_i : at_i + n_i]`` added to its
    ``y_i`` columns (``starts`` the ``at_i``, ``outs`` the ``n_i``; ``bt [R, total]``), summed
    in float32 and rounded once; the shrink columns as they are. Under inductor one elementwise
    node, which it realizes as one kernel (the buffer the members' readers read). No gradient."""
    out: torch.Tensor = torch.ops.lorahot.unrolled_sums(yh, bt, starts, outs)
    return out


def _output_fake(yh: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    return yh.new_empty((yh.shape[0], bt.shape[1]))


@define("unrolled_output(Tensor yh, Tensor bt) -> Tensor", _output_fake)
def _unrolled_output(yh: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    refuse_grad("unrolled_output", yh, bt)
    wide = torch.promote_types(yh.dtype, torch.float32)
    n = bt.shape[1]
    return (yh[:, :n].to(wide) + yh[:, n:].to(wide) @ bt.to(wide)).to(yh.dtype)


def unrolled_output(yh: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """A lone layer's output ``y + h @ bt`` from its GEMM's ``yh [rows, n + R]`` (``[y | h]``)
    and ``bt [R, n]``, summed in float32 and rounded once, as the base layer's GEMM output is;
    under inductor one reduction over the rank (``y`` added with the first term), realized, with
    its programs across the outputs (see :data:`LONE_SUMS`). No gradient."""
    out: torch.Tensor = torch.ops.lorahot.unrolled_output(yh, bt)
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

    def summed(rank: int, left: Callable[[int], object], right: Callable[[int], object], wide: torch.dtype) -> object:
        """``sum_k left(k) * right(k)`` over ``k < rank`` in ``wide``, in order: one expand element."""
        total = None
        for k in range(rank):
            term = ops.mul(ops.to_dtype(left(k), wide), ops.to_dtype(right(k), wide))
            total = term if total is None else ops.add(total, term)
        return total

    def rank_sum(like: ir.TensorBox, term: Callable[..., object], rows: object, n: int, rank: int) -> ir.TensorBox:
        """``sum_k term([i, j], [k])`` over ``k < rank`` for every ``[i, j]`` of ``[rows, n]``, as one
        realized reduction: summed in float32 (float64 for float64) and stored in ``like``'s dtype."""
        dtype = like.get_dtype()
        box: ir.TensorBox = ir.Reduction.create(
            device=like.get_device_or_error(),
            dst_dtype=dtype,
            src_dtype=torch.promote_types(dtype, torch.float32),
            inner_fn=term,
            ranges=[rows, n],
            reduction_ranges=[rank],
            reduction_type="sum",
        )
        box.realize()
        return box

    @register_lowering(torch.ops.lorahot.unrolled_expand.default, type_promotion_kind=None)
    def _lower(h: ir.TensorBox, bt: ir.TensorBox) -> ir.TensorBox:
        rows, rank = h.get_size()
        n = bt.get_size()[1]
        dtype = h.get_dtype()
        wide = torch.promote_types(dtype, torch.float32)
        load_h, load_bt = h.make_loader(), bt.make_loader()

        if REDUCED:

            def term(index: list[sympy.Expr], rindex: list[sympy.Expr]) -> object:
                (i, j), (k,) = index, rindex
                return ops.mul(ops.to_dtype(load_h([i, k]), wide), ops.to_dtype(load_bt([k, j]), wide))

            return rank_sum(h, term, rows, n, rank)

        def element(index: list[sympy.Expr]) -> object:
            i, j = index
            total = summed(
                int(rank), lambda k: load_h([i, sympy.Integer(k)]), lambda k: load_bt([sympy.Integer(k), j]), wide
            )
            return ops.to_dtype(total, dtype)

        box: ir.TensorBox = ir.Pointwise.create(device=h.get_device(), dtype=dtype, inner_fn=element, ranges=[rows, n])
        return box

    @register_lowering(torch.ops.lorahot.unrolled_sums.default, type_promotion_kind=None)
    def _lower_sums(yh: ir.TensorBox, bt: ir.TensorBox, starts: list[int], outs: list[int]) -> ir.TensorBox:
        rank = int(bt.get_size()[0])
        dtype = yh.get_dtype()
        wide = torch.promote_types(dtype, torch.float32)
        load_yh, load_bt = yh.make_loader(), bt.make_loader()

        def inside(column: object, at: int, n: int) -> object:
            return ops.and_(
                ops.ge(column, ops.index_expr(sympy.Integer(at), torch.int64)),
                ops.lt(column, ops.index_expr(sympy.Integer(at + n), torch.int64)),
            )

        if REDUCED:

            def term(index: list[sympy.Expr], rindex: list[sympy.Expr]) -> object:
                # y[i, c] at k == 0, plus h_m[i, k] * bt[k, c] for the member m whose columns hold c
                (i, c), (k,) = index, rindex
                column = ops.index_expr(c, torch.int64)
                first = ops.eq(ops.index_expr(k, torch.int64), ops.constant(0, torch.int64))
                total = ops.where(first, ops.to_dtype(load_yh([i, c]), wide), ops.constant(0.0, wide))
                for at, n in zip(starts, outs, strict=True):

                    def product(h_at: int = at + n) -> object:
                        return ops.mul(ops.to_dtype(load_yh([i, h_at + k]), wide), ops.to_dtype(load_bt([k, c]), wide))

                    total = ops.add(total, ops.masked(inside(column, at, n), product, 0.0))
                return total

            return rank_sum(yh, term, yh.get_size()[0], yh.get_size()[1], rank)

        def element(index: list[sympy.Expr]) -> object:
            i, c = index
            total = ops.to_dtype(load_yh([i, c]), wide)
            column = ops.index_expr(c, torch.int64)
            for at, n in zip(starts, outs, strict=True):

                def expand(h_at: int = at + n) -> object:
                    return summed(
                        rank,
                        lambda k: load_yh([i, sympy.Integer(h_at + k)]),
                        lambda k: load_bt([sympy.Integer(k), c]),
                        wide,
                    )

                total = ops.add(total, ops.masked(inside(column, at, n), expand, 0.0))
            return ops.to_dtype(total, dtype)

        box: ir.TensorBox = ir.Pointwise.create(
            device=yh.get_device(), dtype=dtype, inner_fn=element, ranges=list(yh.get_size())
        )
        box.realize()  # the one buffer the members' readers read
        return box

    @register_lowering(torch.ops.lorahot.unrolled_output.default, type_promotion_kind=None)
    def _lower_output(yh: ir.TensorBox, bt: ir.TensorBox) -> ir.TensorBox:
        rank, n = (int(d) for d in bt.get_size())
        rows = yh.get_size()[0]
        dtype = yh.get_dtype()
        wide = torch.promote_types(dtype, torch.float32)
        load_yh, load_bt = yh.make_loader(), bt.make_loader()

        def term(index: list[sympy.Expr], rindex: list[sympy.Expr]) -> object:
            # h[i, k] * B_s[j, k], with y[i, j] added at k == 0: the reduction's sum is the output
            (i, j), (k,) = index, rindex
            product = ops.mul(ops.to_dtype(load_yh([i, n + k]), wide), ops.to_dtype(load_bt([k, j]), wide))
            first = ops.eq(ops.index_expr(k, torch.int64), ops.constant(0, torch.int64))
            return ops.add(product, ops.where(first, ops.to_dtype(load_yh([i, j]), wide), ops.constant(0.0, wide)))

        return rank_sum(yh, term, rows, n, rank)

    _REGISTERED = True
