"""Wide layers that read one input, as one GEMM: an operator and the compiler pass that uses it.

Attention's q, k and v projections read the same input, and so do an MLP's gate and up. At
inject their wide buffers (:mod:`lorahot.kernels.wide_linear`, ``[[W, B_s], [A, 0]]`` each) are
placed back to back in one allocation (:func:`lorahot.runtime.wide.widen_layers`), so the
columns ``[:, :in]`` of the group's rows form one matrix ``[W_q; A_q; W_k; A_k; W_v; A_v]``.
One GEMM over it gives every member's base output and shrink, ``[y_q | h_q | y_k | h_k | y_v |
h_v] = x @ G.T``; each member's expand then accumulates into its ``y`` in place (cuBLAS ``beta =
1``). That is ``k + 1`` GEMMs for ``k`` members where each layer alone costs two, and it reads
``x`` once. Each member keeps its own ``[[W, B_s], [A, 0]]`` block, so every single-layer path
(the fused kernel, the traced formula, eager calls) is as it was.

Measured before it was built, on an H200 (``benchmarks/experiments/grouped_probe.py``, the
TinyLlama-shaped model with 154 rank-64 layers, one sequence of 256 tokens, reduce-overhead,
``runs/20261202T100147-grouped-probe-r256.log``): GPU time per step 1.12x the base model's with
this layout against 1.29x for the layers one by one (and 1.04x for a block-diagonal layout,
one expand for the whole group, not built); at 2048 rows nothing changes (1.13x each).

The layers of a group hand their wide buffer to the compiled graph as a view of the group's
allocation, reached through a tensor handle (:mod:`lorahot.layers.tensor_handles`), so the graph
has one input for the group and the views' offsets as constants. Where a member runs the
operator ``lorahot::wide_linear_dynamic`` (row counts the compiler keeps symbolic; every row
count the fused kernel does not take under CUDA graphs), :func:`group_wide_layers`, a post-grad
pass run by :class:`lorahot.kernels.stacked_shrinks.StackShrinks`, replaces every run of two or
more such operators over one input whose buffers lie back to back with one
``lorahot::wide_group`` and a column slice of its output per member. Inside the operator the
choice per call is the members' own: where the fused kernel pays for every member's rows
(:func:`lorahot.kernels.lora_linear.worth_it`), each member's kernel writes its columns;
else the one GEMM and the expands. A graph without such operators passes through unchanged.

**Default mode.** Without CUDA graphs each call runs the compiled wrapper on the host, which
pays about 15-20 us per launch on the H200 hosts whatever it launches, and an operator's Python
body costs more than the launches it saves (:mod:`lorahot.kernels.compile_mode`). There the
members of a group run the same operator (``fused=False``), and the pass replaces each run by
:func:`expands` traced to aten (:func:`lorahot.kernels.fx_graph.splice`; in inductor's
joint-graph passes, before the post-grad ones, where that costs the compiler least:
:func:`lower_early`), which the compiler launches from its own wrapper: one GEMM over the
group's rows, then one batched GEMM for every member's expand over strided views of the
shrinks and of the B columns, whose additions the compiler fuses into what reads each output
(the SiLU product), or, where a member's output is read at more than one place (RoPE's q and
k), one kernel writes into one buffer
(:data:`ONE_BUFFER`). q/k/v and gate/up then cost two launches each (three with that kernel)
where the base model spends three and two; every other such operator (a buffer apart from its
allocation, a member over another input, and a wide layer in no group: :data:`ALONE`) becomes
its own two GEMMs.
Where :data:`lorahot.kernels.unrolled_expand.ENABLED` (on by default, for gate/up only: see
there), at up to 128 static rows and rank 64,
each expand of a member read at one place (gate/up: the SiLU product), and of a lone layer
where :data:`~lorahot.kernels.unrolled_expand.LONE` (o, down: the residual add and RMSNorm),
is no GEMM but an elementwise sum over the rank that the compiler computes inside the kernel
reading the output. A group written into one buffer keeps its batched GEMM (its unrolled sums
are behind :data:`~lorahot.kernels.unrolled_expand.SUMS`).
Above :data:`ROWS` static rows, where a step is bound by the GPU rather than by launches, the
members keep the traced formula, whose expand adds no pass over the output.
Measured on an H200 (``benchmarks/experiments/grouped_probe.py``, the forward suite's model,
154 rank-64 layers, one decode row, 3 interleaved rounds of 30 calls,
``runs/20261202T150507-grouped-probe-default-library-groups.log``): 423 launches per decode
call against 489 with a shrink and a wide GEMM per layer and the base model's 335; 6.73 ms
against the base's 5.67 (1.19x; back to back 1.10x), where the same code before this path
read 1.98x in another process (``runs/20261202T143921-grouped-probe-default-traced-bd.log``).
With a rotated group's sums in one buffer (:data:`ONE_BUFFER`) and down as two GEMMs
(:data:`ALONE`), ``runs/20261202T172042-grouped-probe-default-one-buffer-alone.log``: 379
launches; decode 9.83 ms against the base's 8.40 (1.17x), prefill (128 rows) 11.05 against
9.14 (1.21x), on a slower host than the run before. With every expand unrolled at static rows
(2026-12-06, H100, ``runs/20261206T1617-grouped-probe-default-unrolled.log``): decode 357
launches, 8.25 ms against the base's 7.64 (1.08x; the GEMM expands 9.13, 1.19x, in the same
run); q/k/v's expands were then three kernels of their own, which this layout avoids. That
probe's host hid the GPU's time: in the forward suite (2026-12-06, H100,
``runs/20261206T185125-forward.json``, ``runs/20261206T185430-forward.json``) unrolled o and
down expands took the host's time per decode call to about the base model's (4.8 ms against
4.7) but made the call GPU-bound, 6.8-6.9 ms against 4.9-5.1 (1.36-1.39x; the GEMM expands
1.16x): an expand inside RMSNorm's kernel runs on its one program per row. With gate's and up's
alone unrolled (2026-12-06, H200, ``benchmarks/experiments/default_mode_probe.py``, 7
interleaved rounds in one process): 4.96 ms against the GEMM expands' 5.32 and the base
model's 4.37 (1.13x against 1.22x), 357 launches; the default since.
"""

from __future__ import annotations

import itertools
import math
import os
from collections import defaultdict
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from lorahot.kernels import compile_mode
from lorahot.kernels import lora_linear as fused_kernel
from lorahot.kernels import unrolled_expand as unrolled
from lorahot.kernels.fx_graph import (
    RESHAPES,
    adjacent_runs,
    arena_view,
    erase_unused,
    fake_mode,
    set_fake_values,
    source,
    splice,
)
from lorahot.kernels.op_registry import define, refuse_grad
from lorahot.kernels.rows import as_rows

__all__ = [
    "ACCUMULATE",
    "ALONE",
    "ENABLED",
    "JOIN_SYMBOLIC",
    "ONE_BUFFER",
    "ROWS",
    "EARLY",
    "expands",
    "joins",
    "lower_early",
    "wide_group",
    "group_wide_layers",
]

#: Whether :func:`group_wide_layers` joins a group's members (for graphs compiled from then on).
ENABLED = True

#: In default mode, the row counts above which a group's members keep the traced formula
#: (:mod:`lorahot.kernels.wide_linear`: the expand inside the wide GEMM's accumulator). There
#: a step is bound by the GPU, not by launches, and :func:`expands` writes each expand's output
#: and reads it back (measured per layer on SDXL's q/k/v at 8192 rows, 2026-11-30: 61.0 us for
#: that form against 55.2 for the traced one). Not measured with the groups.
ROWS = 512

#: Whether, with a symbolic row count, a group whose first member is wider than the rest (GQA's
#: q) does every member's expand in one batched GEMM, as at up to :data:`ROWS` static rows
#: (:func:`expands`), rather than the first member's on its own: one launch fewer per group,
#: for a ``[k, rows, sum(out_i + R)]`` temporary at every row count the graph serves. Off
#: unless ``LORAHOT_JOIN_SYMBOLIC=1`` at import. Measured on an H200 (2026-12-03, the rows
#: suite's model in default mode, ``benchmarks/README.md``, thirty-third session): 22 launches
#: fewer per call and GPU time within 0.5% (1-3% lower at 8-256 rows), but wall time 1.4% and
#: 1.7% higher at 1024 and 2048 rows, and no fall at 8-256 rows beyond the host's noise: off.
JOIN_SYMBOLIC = os.environ.get("LORAHOT_JOIN_SYMBOLIC") == "1"

#: In default mode, at rows where :func:`joins`, whether a wide layer in no group (an MLP's down)
#: runs the operator too, which the pass lowers to its GEMM over ``[W; A]`` and its expand: two
#: launches, as the traced formula's shrink and wide GEMM (the compiler writes the shrink beside
#: the input). Measured on an H200 (2026-12-02, the forward suite's model in default mode, one
#: process): 379 launches per decode call against 401 with the traced formula for down; decode
#: 1.17x the base model against 1.19x, prefill 1.21x against 1.24x.
ALONE = True

#: In default mode, whether a group some member's output of which is read at more than one
#: place (RoPE reads q and k at two places per element) writes the members' outputs with one
#: kernel into one buffer (:func:`expands`' ``one_buffer``), which the readers then read as they
#: read the base model's GEMM outputs. Measured on an H200 (2026-12-02): on the forward suite's
#: model (no KV cache) the compiler otherwise writes a rotation kernel per rotated member, each
#: recomputing its sum, ahead of attention's input kernels, and one buffer saves a launch per
#: block (379 launches per decode call against 401; decode 1.17x the base model against 1.22x,
#: prefill 1.21x against 1.32x, one process). With transformers' KV cache on, the compiler fused
#: the separate sums into attention's input kernels itself, and one buffer cost one launch per
#: block at small widths or nothing (``benchmarks/experiments/rope_fusion_probe.py``).
ONE_BUFFER = True

#: Whether :func:`lower_early` lowers default-mode graphs in inductor's joint-graph passes (else
#: the post-grad pass does, as before). On unless ``LORAHOT_EARLY_LOWERING=0`` at import.
EARLY = os.environ.get("LORAHOT_EARLY_LOWERING", "1") == "1"

#: In default mode, whether each expand accumulates into its member's base output inside the
#: batched GEMM that computes it (``baddbmm``, ``beta = 1``: :func:`_accumulated`), so the GEMM
#: writes the member's output, rather than writing the expand alone for the compiler to add in
#: what reads it (or in one kernel, :data:`ONE_BUFFER`): the same launches in the compiled
#: wrapper, one rounding fewer, and no temporaries beside the outputs. Those temporaries keep a
#: decode graph's memory at its estimated peak, where inductor refuses to reuse a freed buffer
#: across it and allocates anew in every block (on an H100 host 206 allocations per decode call
#: against the base model's 55; on the CPU box, 3 blocks at full width, 38 against 28 with this
#: on and 14 for the base model). Off unless ``LORAHOT_ACCUMULATE_EXPANDS=1`` at import: on a GPU
#: ATen's ``baddbmm`` into another tensor first copies the added input into it (a launch of its
#: own), which may cost more than the allocations it saves. Not measured on a GPU.
ACCUMULATE = os.environ.get("LORAHOT_ACCUMULATE_EXPANDS") == "1"
_aten = torch.ops.aten
#: ops that read no element: a reader of a member's output through them reads the output
_VIEWS = RESHAPES | {
    _aten.permute.default,
    _aten.transpose.int,
    _aten.t.default,
    _aten.unsqueeze.default,
    _aten.squeeze.dim,
    _aten.squeeze.dims,
    _aten.expand.default,
    _aten.slice.Tensor,
    _aten.select.int,
    _aten.alias.default,
    _aten.as_strided.default,
}
#: what a member's replaced operator leaves unused, erased with it
_REMOVABLE = RESHAPES | {_aten.as_strided.default}


def _group_fake(
    x: torch.Tensor,
    group: torch.Tensor,
    outs: list[int],
    a: list[torch.Tensor],
    bt: list[torch.Tensor],
    scale: list[torch.Tensor],
    fused: bool,
) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], group.shape[0]))


@define(
    "wide_group(Tensor x, Tensor group, int[] outs, Tensor[] a, Tensor[] bt, Tensor[] scale, bool fused) -> Tensor",
    _group_fake,
)
def _wide_group(
    x: torch.Tensor,
    group: torch.Tensor,
    outs: list[int],
    a: list[torch.Tensor],
    bt: list[torch.Tensor],
    scale: list[torch.Tensor],
    fused: bool,
) -> torch.Tensor:
    refuse_grad("wide_group", x, group, *a, *bt)
    k = x.shape[-1]
    rank = group.shape[1] - k
    x2 = as_rows(x)
    rows = x2.shape[0]
    if fused and all(fused_kernel.worth_it(rows, n, wide=True) for n in outs):
        yh = x2.new_empty((rows, group.shape[0]))
        at = 0
        for n, a_i, bt_i, s_i in zip(outs, a, bt, scale, strict=True):
            weight = group.narrow(0, at, n).narrow(1, 0, k)
            fused_kernel.lora_linear_into(x2, weight, a_i, bt_i, s_i, yh.narrow(1, at, n))
            at += n + rank
    else:
        yh = torch.nn.functional.linear(x2, group.narrow(1, 0, k))
        at = 0
        for n in outs:
            expand = group.narrow(0, at, n).narrow(1, k, rank)
            yh.narrow(1, at, n).addmm_(yh.narrow(1, at + n, rank), expand.t())
            at += n + rank
    return yh.view(*x.shape[:-1], group.shape[0])


def wide_group(
    x: torch.Tensor,
    group: torch.Tensor,
    outs: list[int],
    a: list[torch.Tensor],
    bt: list[torch.Tensor],
    scale: list[torch.Tensor],
    *,
    fused: bool,
) -> torch.Tensor:
    """The wide layers whose buffers lie back to back in ``group`` (``[sum(out_i + R), in + R]``,
    each member's ``[[W_i, B_s_i], [A_i, 0]]`` in turn), on one input ``x [..., in]``; without
    bias. Returns ``[..., sum(out_i + R)]``: member ``i``'s output in the columns where its ``W``
    rows are (its shrink beside them). Where ``fused`` and the fused kernel pays for every
    member at this row count, each member's kernel over its ``a_i [R, in]``, ``bt_i [R, out_i]``
    and per-row ``scale_i [R]``; else one GEMM over ``group``'s first ``in`` columns and each
    member's expand in place. No gradient."""
    out: torch.Tensor = torch.ops.lorahot.wide_group(x, group, outs, a, bt, scale, fused)
    return out


#: a member of a group: its buffer's offset in the allocation, its rows, its operator's node
Member = tuple[int, int, torch.fx.Node]
#: ``(input, allocation, columns, fused)`` -> the members over it
Groups = dict[tuple[Any, ...], list[Member]]


def group_wide_layers(graph: torch.fx.Graph) -> int:
    """Rewrites every run of two or more ``lorahot::wide_linear_dynamic`` nodes over one input
    whose wide buffers are adjacent views of one graph input (where :data:`ENABLED`), and
    returns how many operators it removed. Where the graph launches its kernels from the host
    on every call (default mode, whose layers pass ``fused=False``), a run becomes
    :func:`expands` in aten, which the compiler launches itself, and so does every other such
    node alone: an operator's Python body costs the host more there than the launches it
    saves. Elsewhere (CUDA graphs, where the body runs once, at capture) a run becomes one
    ``lorahot::wide_group``. In default mode :func:`lower_early` has lowered the operators
    already, where it ran."""
    return _rewrite(graph, early=False)


def lower_early(graph: torch.fx.Graph) -> int:
    """In default mode (and where :data:`EARLY`), what :func:`group_wide_layers` does there:
    every ``lorahot::wide_linear_dynamic`` node becomes :func:`expands` in aten, a run over one
    input joined; returns how many operators it removed. Elsewhere nothing. For inductor's
    joint-graph passes (:class:`lorahot.kernels.stacked_shrinks.JointLowering`), which run
    before the fake propagation that precedes its post-grad passes: the nodes made here get
    their fake values there, once (until then they keep those of the trace they were copied
    from: right in shape and layout, which is all a later trace here reads). The post-grad passes fake-run
    again every node they did not see when they began (a pass of their own,
    ``FakeTensorUpdater``), and then everything that reads it, to the graph's end: a node run
    again never compares equal to its old value. Lowered there, as before, every node from the
    first LoRA layer on was fake-run three times; here, once. On the CPU box (torch 2.13.0+cpu,
    the forward suite's model cut to 8 blocks, small widths, the wide path forced onto the CPU,
    caches off, a 128-row prefill, one run each): the lowering, the fake propagation and the
    post-grad passes took 0.79 s against 1.21 s lowered after them (the base model's 0.35 s)."""
    return _rewrite(graph, early=True) if EARLY else 0


def _rewrite(graph: torch.fx.Graph, early: bool) -> int:
    """:func:`group_wide_layers` (``early`` False) or :func:`lower_early` (True: only in default
    mode, lowering alone, no fake values given)."""
    per_call = compile_mode.lowering_per_call()
    if early and not per_call:
        return 0
    if per_call:
        unrolled.register()  # the lowering of the expands that expands() unrolls
    order = {node: i for i, node in enumerate(graph.nodes)}  # the operators' places, for _lower
    memo: dict[Any, torch.fx.Graph] = {}  # expands traced once per shape (fx_graph.splice)
    removed = 0
    for (_, alloc, cols, fused), members in _groups(graph).items():
        members.sort(key=lambda m: m[0])
        lower = per_call and not fused

        def follows(a: Member, b: Member, cols: int = cols) -> bool:
            return ENABLED and b[0] == a[0] + a[1] * cols

        for run in adjacent_runs(members, follows):
            if lower:
                removed += _lower(graph, run, alloc, cols, order, memo, early)
            elif not early:  # joins are the post-grad pass's alone
                # the graph's order as it is now: a join before this one made nodes (a member's
                # output slice) that this run's members may read (layers over a member's output)
                now = {node: float(i) for i, node in enumerate(graph.nodes)}
                removed += _join(graph, run, alloc, cols, now)
    if per_call:  # the others (a buffer apart from its allocation), each alone
        target = torch.ops.lorahot.wide_linear_dynamic.default
        for node in list(graph.nodes):
            wide = node.args[1] if node.op == "call_function" and node.target is target else None
            if isinstance(wide, torch.fx.Node) and node.args[-1] is False and not _strided(node):
                removed += _lower(graph, [(0, 0, node)], wide, None, order, memo, early)
    return removed


def joins(rows: int | torch.SymInt) -> bool:
    """Whether a group's members run as one in default mode at ``rows``: where the groups are
    :data:`ENABLED` and ``rows`` is not known to exceed :data:`ROWS` (a symbolic row count
    joins, with no guard)."""
    return ENABLED and not statically_known_true(rows > ROWS)


def expands(x: torch.Tensor, wide: torch.Tensor, outs: list[int], *, one_buffer: bool = False) -> list[torch.Tensor]:
    """The members' outputs, without bias, from their buffers back to back in ``wide``
    (``[sum(out_i + R), in + R]``, each ``[[W_i, B_s_i], [A_i, 0]]``), in plain torch for the
    compiler to launch: one GEMM over the first ``in`` columns, ``[y_1 | h_1 | y_2 | h_2 ..] =
    x @ [W_1; A_1; W_2; A_2 ..].T``, then the expands, each ``y_i + h_i @ B_s_i.T``, whose
    additions the compiler fuses with what reads them. Members of one width lie evenly spaced:
    their shrinks are one view ``[k, rows, R]`` and their B blocks another, and one batched
    GEMM does their expands. Where the first member is wider than the rest (GQA's q), at up to
    :data:`ROWS` rows known statically, one batched GEMM does every member's expand against the
    B columns of the whole group, of which each keeps its own block: ``k`` times the expand's
    arithmetic (about 2.5% of a TinyLlama block's) and a ``[k, rows, sum(out_i + R)]``
    temporary, for one launch fewer; above (or with a symbolic row count) the first member's
    expand is a GEMM of its own. Views throughout, no copy.

    With ``one_buffer``, the members' sums are written by one kernel into one buffer ``[rows,
    sum(out_i + R)]`` laid out as the GEMM's output (each expand placed in its member's
    columns, an ``as_strided`` of the sum, which the compiler realizes), and each output is a
    view of it: for members whose output is read more than once (RoPE reads q at two places
    per element), where the compiler would otherwise write a kernel of its own per member
    that recomputes ``y_i + expand_i``. In float32 and float64 the values are the same
    either way (the placed zeros add exactly); in bf16 the stored sum is one rounding more than
    a reader that fused ``y_i + expand_i`` in float32 (an independent review measured 4.1e-3
    against 3.7e-3 relative to eager at GQA widths), the rounding the base model's own GEMM
    output has. A member returned from the graph is a view of the whole buffer, which it keeps
    alive.

    Rounding: ``y_i`` and the expand are each rounded to the weights' dtype before the sum
    (three roundings, as PEFT's ``base(x) + lora_B(lora_A(x)) * s`` does), where the eager
    form accumulates the expand into ``y_i`` in place (two). In bf16 that measured about 1.2x
    the eager form's error against a float64 reference (the test bounds it)."""
    k = x.shape[-1]
    lead = x.shape[:-1]
    rows = math.prod(lead)
    r = wide.shape[1] - k
    yh = x.reshape(rows, k) @ _columns(wide, 0, k).t()
    bt = _columns(wide, k, r).t()  # [R, sum(out_i + R)]: B_s_i.T in member i's columns, zeros under the A rows
    at = list(itertools.accumulate([0] + [n + r for n in outs[:-1]]))
    few = unrolled.fits(rows, r)
    if ACCUMULATE and not (few and (unrolled.MEMBERS if len(outs) > 1 else unrolled.LONE)):
        return [d.view(*lead, o) for d, o in zip(_accumulated(yh, bt, outs, at, r), outs, strict=True)]
    if one_buffer and len(outs) > 1:
        if few and unrolled.SUMS:  # one elementwise node, which the compiler realizes as the one buffer
            joined = unrolled.unrolled_sums(yh, bt, at, outs)
        else:
            total = wide.shape[0]
            placed = [_placed(d, start, gap, total) for d, start, gap in _expands(yh, bt, outs, at, r, rows)]
            joined = torch.as_strided(yh + sum(placed[1:], placed[0]), (rows, total), (total, 1))
        return [_columns(joined, i, o).view(*lead, o) for i, o in zip(at, outs, strict=True)]
    if few and len(outs) == 1 and unrolled.LONE_SUMS and not unrolled.LONE:
        return [unrolled.unrolled_output(yh, _columns(bt, 0, outs[0])).view(*lead, outs[0])]
    unroll = few and (unrolled.MEMBERS if len(outs) > 1 else unrolled.LONE)
    parts = _unrolled(yh, bt, outs, at, r) if unroll else _expands(yh, bt, outs, at, r, rows)
    # the unrolled parts are one member's [rows, n] each; the GEMMs' [count, rows, n]
    ds = [d for d, _, _ in parts] if unroll else [d[c] for d, _, _ in parts for c in range(d.shape[0])]
    return [(_columns(yh, i, o) + d).view(*lead, o) for i, o, d in zip(at, outs, ds, strict=True)]


#: expands of members evenly spaced in the group: ``([count, rows, n], first column, spacing)``;
#: an unrolled member's ``[rows, n]`` alone (no unit dimension added and taken away: each view is
#: a node the compiler fakes and lowers, in every layer)
_Part = tuple[torch.Tensor, int, int]


def _expands(yh: torch.Tensor, bt: torch.Tensor, outs: list[int], at: list[int], r: int, rows: int) -> list[_Part]:
    """Every member's expand, in the members' order, as parts, each a :data:`_Part` (see :func:`expands`
    for the forms)."""
    n, m = outs[-1], len(outs)
    if m > 1 and all(o == n for o in outs):
        return [(_evenly_spaced(yh, bt, 0, m, n, r), 0, n + r)]
    if m > 1 and all(o == n for o in outs[1:]) and outs[0] > n:
        if statically_known_true(rows <= ROWS) or (JOIN_SYMBOLIC and not statically_known_true(rows > ROWS)):
            # every member against the group's B columns
            gap = n + r
            h = _columns(yh, outs[0] + r - gap, m * gap).view(rows, m, gap)[..., gap - r :].transpose(0, 1)
            d = torch.bmm(h, bt.expand(m, r, bt.shape[1]))
            return [(d[j : j + 1][..., i : i + o], i, o + r) for j, (i, o) in enumerate(zip(at, outs, strict=True))]
        first = _columns(yh, outs[0], r) @ _columns(bt, 0, outs[0])
        return [(first[None], 0, outs[0] + r), (_evenly_spaced(yh, bt, at[1], m - 1, n, r), at[1], n + r)]
    # a GEMM's expand keeps its unit dimension: without it the compiler's post-grad patterns fold
    # ``y + h @ B_s.T`` into an addmm, whose copy of ``y`` into the output is a kernel of its own on
    # CUDA (thirty-seventh session), and the addition is no longer fused into the output's reader
    return [((_columns(yh, i + o, r) @ _columns(bt, i, o))[None], i, o + r) for i, o in zip(at, outs, strict=True)]


def _accumulated(yh: torch.Tensor, bt: torch.Tensor, outs: list[int], at: list[int], r: int) -> list[torch.Tensor]:
    """Every member's output ``y_i + h_i @ B_s_i.T``, in the members' order, each written by the
    batched GEMM that computes its expand (``baddbmm`` with ``y_i`` as the added input): members
    of one width lying evenly spaced share one; a first member wider than the rest (GQA's q) has
    one of its own. ``baddbmm`` and not ``addmm`` for a lone member too: inductor splits an
    ``addmm`` read only by elementwise ops back into a GEMM and an addition on a GPU."""
    n, m = outs[-1], len(outs)
    if m > 1 and all(o == n for o in outs):
        return list(_accumulated_run(yh, bt, 0, m, n, r).unbind(0))
    if m > 1 and all(o == n for o in outs[1:]) and outs[0] > n:
        first = _accumulated_run(yh, bt, 0, 1, outs[0], r)[0]
        return [first, *_accumulated_run(yh, bt, at[1], m - 1, n, r).unbind(0)]
    return [_accumulated_run(yh, bt, i, 1, o, r)[0] for i, o in zip(at, outs, strict=True)]


def _accumulated_run(yh: torch.Tensor, bt: torch.Tensor, start: int, count: int, n: int, r: int) -> torch.Tensor:
    """The outputs ``[count, rows, n]`` of ``count`` members of width ``n`` whose blocks lie back
    to back from column ``start`` of ``yh`` (``[y | h]`` each, ``n + r`` wide), their ``B_s.T``
    in the same columns of ``bt``: one ``baddbmm`` over strided views, no copy."""
    gap = n + r
    seg = _columns(yh, start, count * gap).view(yh.shape[0], count, gap).transpose(0, 1)
    b = _columns(bt, start, count * gap).view(r, count, gap).transpose(0, 1)[..., :n]
    return torch.baddbmm(seg[..., :n], seg[..., n:], b)


def _unrolled(yh: torch.Tensor, bt: torch.Tensor, outs: list[int], at: list[int], r: int) -> list[_Part]:
    """Every member's expand as :func:`lorahot.kernels.unrolled_expand.unrolled_expand`, an
    elementwise node the compiler computes inside what reads the member's output: no launch."""
    return [
        (unrolled.unrolled_expand(_columns(yh, i + o, r), _columns(bt, i, o)), i, o + r)
        for i, o in zip(at, outs, strict=True)
    ]


def _placed(d: torch.Tensor, start: int, gap: int, total: int) -> torch.Tensor:
    """The expands ``d [count, rows, n]`` of members whose columns begin at ``start`` and every
    ``gap`` after it, placed in a ``[rows, total]`` of zeros (pads, which the compiler reads as
    masked loads). One member's is one pad (three nodes fewer in the graph, each of which every
    compiler phase after the trace handles)."""
    count, rows, n = d.shape
    if count == 1:
        return torch.nn.functional.pad(d[0], (start, total - start - n))
    spread = torch.nn.functional.pad(d.transpose(0, 1), (0, gap - n)).reshape(rows, count * gap)
    return torch.nn.functional.pad(spread, (start, total - start - count * gap))


def _evenly_spaced(yh: torch.Tensor, bt: torch.Tensor, start: int, count: int, n: int, r: int) -> torch.Tensor:
    """The expands ``[count, rows, n]`` of ``count`` members of width ``n`` whose blocks lie
    back to back from row ``start`` of the group: their shrinks in ``yh``'s columns and their
    ``B_s.T`` in ``bt``'s, both evenly spaced, in one batched GEMM."""
    gap = n + r
    h = _columns(yh, start, count * gap).view(yh.shape[0], count, gap)[..., n:].transpose(0, 1)
    return torch.bmm(h, _columns(bt, start, count * gap).view(r, count, gap).transpose(0, 1)[..., :n])


def _columns(t: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """``t[:, start : start + width]`` as one ``slice`` of the columns, and ``t`` itself where
    that is every column. Indexing ``t[:, a:b]`` traces a slice of every row too, which a
    symbolic row count keeps in the graph, and inductor's post-grad passes erase a slice that
    takes everything: each node whose input changes there is fake-run again, with everything
    that reads it, to the graph's end (``FakeTensorUpdater``: a node run again never compares
    equal to its old value; :func:`lower_early`)."""
    return t if start == 0 and width == t.shape[1] else t.narrow(1, start, width)


def _lower(
    graph: torch.fx.Graph,
    run: list[Member],
    alloc: torch.fx.Node,
    cols: int | None,
    order: dict[torch.fx.Node, int],
    memo: dict[Any, torch.fx.Graph],
    early: bool = False,
) -> int:
    """Replaces the run's operators by :func:`expands` over the run's rows of ``alloc`` (with
    ``cols`` columns; None: a lone operator's own buffer, ``alloc``), traced to aten in the
    graph's fake mode and placed before the first member in the graph's ``order`` (taken once:
    the operators were all there, and lowering others moves none): the members' input is the
    first's (one source, the run's key), computed before it. ``memo``: the graph's traces of
    :func:`expands`, one per shape (:func:`lorahot.kernels.fx_graph.splice`)."""
    nodes = [node for _, _, node in run]
    first = min(nodes, key=order.__getitem__)
    fake, x = fake_mode(first), first.args[0]
    if fake is None or not isinstance(x, torch.fx.Node):
        return 0
    outs = [int(node.meta["val"].shape[-1]) for node in nodes]
    one_buffer = ONE_BUFFER and any(len(_places(node)) > 1 for node in nodes)
    with graph.inserting_before(first):
        if cols is None:
            wide = alloc
        else:
            size = [sum(r for _, r, _ in run), cols]
            wide = graph.call_function(_aten.as_strided.default, (alloc, size, [cols, 1], run[0][0]))
            set_fake_values(fake, (wide,))
        key = (tuple(outs), one_buffer)
        values = splice(
            graph, lambda x, w: expands(x, w, outs, one_buffer=one_buffer), (x, wide), fake, memo, key, not early
        )
    for node, value in zip(nodes, values, strict=True):
        node.replace_all_uses_with(value)
        erase_unused(graph, node, _REMOVABLE)
    return len(nodes)


def _places(node: torch.fx.Node) -> set[torch.fx.Node]:
    """The views of ``node`` (``node`` itself among them) that something other than a view
    reads: more than one where its elements are read at more than one place each (RoPE's
    ``q * cos + rotate_half(q) * sin`` reads q through three), which the compiler does not fuse
    into one read of a sum; one for readers of the same view (``x * sigmoid(x)``). A proxy, affecting
    speed only: disjoint slices each read once count as several places, and reads through
    ``split``/``chunk``/``unbind`` (a ``getitem`` of their outputs) as one."""
    found: set[torch.fx.Node] = set()
    for user in node.users:
        if user.op == "call_function" and user.target in _VIEWS:
            found |= _places(user)
        else:
            found.add(node)
    return found


def _strided(node: torch.fx.Node) -> bool:
    """Whether an ``as_strided`` reads ``node``'s output (itself or through views): its sizes,
    strides and offset are the operator's layout at trace time (row stride ``out + R``, from
    the fake), which a column of a group's output or a sum of the expands does not have, and
    the compiler's ``as_strided`` reads the storage under any view. Such an operator is left
    as it is, neither joined nor lowered."""
    return any(
        user.op == "call_function"
        and user.target in _VIEWS
        and (user.target is _aten.as_strided.default or _strided(user))
        for user in node.users
    )


def _groups(graph: torch.fx.Graph) -> Groups:
    groups: Groups = defaultdict(list)
    target = torch.ops.lorahot.wide_linear_dynamic.default
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not target or len(node.args) != 6:
            continue
        x, wide, *_, fused = node.args
        view = arena_view(wide, 2)
        if view is None or not isinstance(x, torch.fx.Node) or not isinstance(fused, bool) or _strided(node):
            continue
        alloc, (rows, cols), stride, offset = view
        if stride != [cols, 1]:
            continue
        groups[(source(x), alloc, cols, fused)].append((offset, rows, node))
    return groups


def _join(
    graph: torch.fx.Graph,
    run: list[Member],
    alloc: torch.fx.Node,
    cols: int,
    order: dict[torch.fx.Node, float],
) -> int:
    """One ``wide_group`` over the run's rows of ``alloc``, before the run's first member in the
    graph's ``order``, each member becoming a column slice of it; nothing where the run has one
    member or a member's inputs cannot be computed before the first."""
    if len(run) < 2:
        return 0
    nodes = [node for _, _, node in run]
    first = min(nodes, key=order.__getitem__)
    operands = [node.args[i] for node in nodes for i in (2, 3, 4)]
    if not all(_hoist(arg, first, order) for arg in (first.args[0], *operands)):
        return 0
    outs = [int(node.meta["val"].shape[-1]) for node in nodes]
    fake = fake_mode(first)
    x = first.args[0]
    with graph.inserting_before(first):
        size = [sum(r for _, r, _ in run), cols]
        view = graph.call_function(_aten.as_strided.default, (alloc, size, [cols, 1], run[0][0]))
        a, bt, scale = ([n.args[i] for n in nodes] for i in (2, 3, 4))
        group = graph.call_function(torch.ops.lorahot.wide_group.default, (x, view, outs, a, bt, scale, first.args[5]))
        set_fake_values(fake, (view, group))
        dim = len(first.meta["val"].shape) - 1
        at = 0
        for (_, rows, node), n in zip(run, outs, strict=True):
            part = graph.call_function(_aten.slice.Tensor, (group, dim, at, at + n))
            set_fake_values(fake, (part,))
            node.replace_all_uses_with(part)
            at += rows
    for node in nodes:
        erase_unused(graph, node, _REMOVABLE)
    return len(run) - 1


def _hoist(arg: Any, before: torch.fx.Node, order: dict[torch.fx.Node, float]) -> bool:
    """Whether ``arg`` is computed before ``before`` in the graph, moving it (and, the same way,
    its inputs) there where it is a pure view computed later: the members' arena views are made
    next to each member."""
    if not isinstance(arg, torch.fx.Node) or order[arg] < order[before]:
        return True
    if arg.op != "call_function" or arg.target not in _REMOVABLE:
        return False
    if not all(_hoist(a, before, order) for a in arg.all_input_nodes):
        return False
    before.prepend(arg)
    order[arg] = order[before] - 0.5 / (1 + len(order))
    return True
