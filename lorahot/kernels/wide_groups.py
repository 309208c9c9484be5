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
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from lorahot.kernels import lora_linear as fused_kernel
from lorahot.kernels.fx_graph import (
    RESHAPES,
    adjacent_runs,
    arena_view,
    erase_unused,
    fake_mode,
    set_fake_values,
    source,
)
from lorahot.kernels.op_registry import define, refuse_grad

__all__ = ["ENABLED", "wide_group", "group_wide_layers"]

#: Whether :class:`lorahot.kernels.stacked_shrinks.StackShrinks` runs :func:`group_wide_layers`
#: (for graphs compiled from then on).
ENABLED = True

_aten = torch.ops.aten
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
    x2 = x.reshape(-1, k)
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
    whose wide buffers are adjacent views of one graph input into one ``lorahot::wide_group``;
    returns how many operators it removed."""
    removed = 0
    for (_, alloc, cols, _), members in _groups(graph).items():
        members.sort(key=lambda m: m[0])

        def follows(a: Member, b: Member, cols: int = cols) -> bool:
            return b[0] == a[0] + a[1] * cols

        for run in adjacent_runs(members, follows):
            # the graph's order as it is now: a join before this one made nodes (a member's
            # output slice) that this run's members may read (layers over a member's output)
            order = {node: float(i) for i, node in enumerate(graph.nodes)}
            removed += _join(graph, run, alloc, cols, order)
    return removed


def _groups(graph: torch.fx.Graph) -> Groups:
    groups: Groups = defaultdict(list)
    target = torch.ops.lorahot.wide_linear_dynamic.default
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not target or len(node.args) != 6:
            continue
        x, wide, *_, fused = node.args
        view = arena_view(wide, 2)
        if view is None or not isinstance(x, torch.fx.Node) or not isinstance(fused, bool):
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
