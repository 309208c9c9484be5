"""One shrink GEMM for the LoRA layers that share an input: a compiler pass.

Attention's q, k and v projections (and an MLP's gate and up) read the same input. Compiled,
each LoRA layer computes its own shrink ``h = x @ A.T``: a GEMM with ``R`` outputs that reads
all of ``x`` for little arithmetic, so each costs about as much as reading ``x`` (4-6 us per
layer on an H200 at the UNet's and a prefill's sizes). Three layers over one ``x`` can read it
once: ``[h_q | h_k | h_v] = x @ [A_q; A_k; A_v].T``, then each layer takes its columns.

The stacked ``A`` costs nothing to build: the arena keeps every layer's live ``A [R, in]``
contiguous, one layer after the other in the order they were injected (a module's q, k and v
are neighbours), so the rows of consecutive layers form one ``[n R, in]`` view of the same
buffer. Under ``torch.compile`` the layers read their ``A`` as ``as_strided`` views of the
arena tensor (:mod:`lorahot.layers.tensor_handles`), which the compiler's post-grad graph keeps
as ``mm(x, permute(as_strided(arena, [R, in], [in, 1], offset), [1, 0]))``. This pass finds
those shrinks, groups them by input and arena, and rewrites every run of two or more whose
``A`` views are adjacent into one ``mm`` over the stacked view, each old result becoming a
column slice of the new one. Nothing else changes: the slices feed what the shrinks fed (the
wide layers' ``[x | h]`` concatenation, or the library formula's scale and expand), and the
arena stays the only copy of ``A``, so swaps need no extra write.

Measured on an H200 before it was written (``benchmarks/experiments/compiled_layer_probe.py``,
``runs/20261130T232749-compiled-layer-probe.json``; groups of three layers over one input that
a SiLU made, each output into attention, GPU us per layer): SDXL 640 at 8192 rows 48.7 against
54.3 with a shrink each (base 43.2), SDXL 1280 at 2048 rows 33.6 against 37.9 (30.6), the LLM's
q/o shape at 1024 rows 33.4 against 37.8 (29.9): half or more of the wide layers' cost over the
base. On the SDXL-shaped UNet (``benchmarks/diffusion.py``, 700 layers) it then saved 0.72 ms
of GPU time per step under CUDA graphs and 0.92 ms in default mode (1.18x to 1.15x and 1.19x to
1.16x the base's), and 140 kernels: each group's slices are copied into the layers' ``[x | h]``
buffers by one kernel, where each shrink wrote its own ``h`` there
(``runs/20261201T031958-`` and ``033141-diffusion.json``).

Before stacking, where :data:`lorahot.kernels.extern_inputs.ENABLED` (on by default), the
pass runs :func:`lorahot.kernels.extern_inputs.rewrite_extern_inputs`, which gives the layers
whose input the compiler would have to copy into ``[x | h]`` (attention's output, a graph input)
the formula without that buffer.

:func:`install` puts the pass in inductor's ``post_grad_custom_pre_pass`` (beside a pass
already there, which runs first), and :class:`JointLowering` (the default-mode lowering of
:mod:`lorahot.kernels.wide_groups`, which is best done before the post-grad passes: see
:func:`~lorahot.kernels.wide_groups.lower_early`) in its ``joint_custom_post_pass``;
:func:`lorahot.inject` installs them when it binds layers, and :func:`uninstall` takes them out
again (for graphs compiled from then on, until the next inject). They rewrite only nodes of
lorahot's forms over graph inputs, so a graph without lorahot's layers passes through
unchanged; their ``uuid`` (a hash of these files and of the passes before them) keeps
inductor's cache of compiled graphs valid.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch._inductor import config as inductor_config
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

from lorahot.kernels import extern_inputs, fx_graph, stacked_routed, unrolled_expand, wide_groups
from lorahot.kernels.fx_graph import (
    RESHAPES,
    adjacent_runs,
    arena_view,
    erase_unused,
    fake_mode,
    set_fake_values,
    source,
)

__all__ = ["JointLowering", "StackShrinks", "install", "uninstall", "stack_shrinks"]

_aten = torch.ops.aten

#: what a stacked shrink leaves unused, erased with it
_REMOVABLE = RESHAPES | {_aten.permute.default, _aten.as_strided.default}
#: ``(input, arena, rows, columns)`` -> shrinks of that input over that arena: ``(offset, mm node)``
Groups = dict[tuple[Any, ...], list[tuple[int, torch.fx.Node]]]


class StackShrinks(CustomGraphPass):
    """The pass (see the module docstring), after ``before``: what the slot held when it was
    installed (None, a pass, or a list of passes, as inductor takes them)."""

    def __init__(self, before: Any = None) -> None:
        self.before = before

    def _before(self) -> list[Any]:
        if self.before is None:
            return []
        return list(self.before) if isinstance(self.before, (list, tuple)) else [self.before]

    def __call__(self, graph: torch.fx.Graph) -> None:
        for earlier in self._before():
            earlier(graph)
        if extern_inputs.ENABLED:  # first: the layers it rewrites have no shrink left to stack
            extern_inputs.rewrite_extern_inputs(graph)
        stack_shrinks(graph)
        if stacked_routed.ENABLED:
            stacked_routed.stack_routed(graph)
        wide_groups.group_wide_layers(graph)  # joins where ENABLED; in default mode lowers to aten too

    def uuid(self) -> Any:
        """This file's, :mod:`~lorahot.kernels.extern_inputs`', :mod:`~lorahot.kernels.stacked_routed`'s,
        :mod:`~lorahot.kernels.wide_groups`' and :mod:`~lorahot.kernels.fx_graph`'s hash, whether
        the three are on (and the groups' switches and limits, among them whether default mode
        is lowered in the joint-graph passes, :data:`~lorahot.kernels.wide_groups.EARLY`), the
        unrolled expands' switches, the live wide layers' geometries the extern-input rewrite
        matches, and the earlier passes' ids; None (no caching of compiled graphs, as inductor
        does for such a pass) where an earlier pass has no id. :class:`JointLowering` has the
        same id: the two passes make one graph together."""
        earlier = [getattr(p, "uuid", lambda: None)() for p in self._before()]
        if any(u is None for u in earlier):
            return None
        files = (
            __file__,
            extern_inputs.__file__,
            stacked_routed.__file__,
            wide_groups.__file__,
            fx_graph.__file__,
            unrolled_expand.__file__,
        )
        on = (
            extern_inputs.ENABLED,
            stacked_routed.ENABLED,
            wide_groups.ENABLED,
            wide_groups.ROWS,
            wide_groups.ONE_BUFFER,
            wide_groups.JOIN_SYMBOLIC,
            wide_groups.ACCUMULATE,
            wide_groups.EARLY,
            unrolled_expand.ENABLED,
            unrolled_expand.ROWS,
            unrolled_expand.RANK,
            unrolled_expand.SUMS,
            unrolled_expand.MEMBERS,
            unrolled_expand.LONE,
            unrolled_expand.LONE_SUMS,
            unrolled_expand.REDUCED,
        )
        return (get_hash_for_files(files), *on, repr(extern_inputs.signatures()), *earlier)


class JointLowering(StackShrinks):
    """The default-mode lowering of the wide layers' operators
    (:func:`lorahot.kernels.wide_groups.lower_early`), after ``before`` (what inductor's
    ``joint_custom_post_pass`` held when it was installed), with :class:`StackShrinks`' id: it
    runs in inductor's joint-graph passes, which every graph it compiles goes through, before
    the fake propagation that precedes the post-grad passes. Nothing else runs there: the
    rewrites of :class:`StackShrinks` keep their place."""

    def __call__(self, graph: torch.fx.Graph) -> None:
        for earlier in self._before():
            earlier(graph)
        wide_groups.lower_early(graph)


def install() -> None:
    """Puts :class:`StackShrinks` in inductor's post-grad passes and :class:`JointLowering` in
    its joint-graph passes, once each (a pass already there keeps running, before it)."""
    current = inductor_config.post_grad_custom_pre_pass
    if not isinstance(current, StackShrinks):
        inductor_config.post_grad_custom_pre_pass = StackShrinks(current)
    joint = inductor_config.joint_custom_post_pass
    if not isinstance(joint, JointLowering):
        inductor_config.joint_custom_post_pass = JointLowering(joint)


def uninstall() -> None:
    """Takes :class:`StackShrinks` and :class:`JointLowering` out of inductor's passes (the
    passes that were there before them stay); graphs compiled from then on keep a shrink per
    layer, and their wide layers' operators."""
    current = inductor_config.post_grad_custom_pre_pass
    if isinstance(current, StackShrinks):
        inductor_config.post_grad_custom_pre_pass = current.before
    joint = inductor_config.joint_custom_post_pass
    if isinstance(joint, JointLowering):
        inductor_config.joint_custom_post_pass = joint.before


def stack_shrinks(graph: torch.fx.Graph) -> int:
    """Rewrites every run of adjacent shrinks over one input into one ``mm``; returns how many
    shrinks it removed."""
    removed = 0
    order = {node: i for i, node in enumerate(graph.nodes)}
    for (_, arena, rows, cols), members in _groups(graph).items():
        members.sort(key=lambda m: m[0])

        def follows(a: tuple[int, torch.fx.Node], b: tuple[int, torch.fx.Node], size: int = rows * cols) -> bool:
            return b[0] == a[0] + size

        for run in adjacent_runs(members, follows):
            removed += _stack(graph, run, arena, rows, cols, order)
    return removed


def _groups(graph: torch.fx.Graph) -> Groups:
    groups: Groups = defaultdict(list)
    for node in graph.nodes:
        found = _shrink(node)
        if found is not None:
            key, offset = found
            groups[key].append((offset, node))
    return groups


def _shrink(node: torch.fx.Node) -> tuple[tuple[Any, ...], int] | None:
    """``((input, arena, rows, columns), offset)`` where ``node`` is ``mm(x, permute(as_strided(
    arena, [rows, columns], [columns, 1], offset), [1, 0]))`` with ``arena`` a graph input."""
    if node.op != "call_function" or node.target is not _aten.mm.default:
        return None
    lhs, rhs = node.args
    if not (isinstance(lhs, torch.fx.Node) and isinstance(rhs, torch.fx.Node)):
        return None
    if rhs.target is not _aten.permute.default or list(rhs.args[1]) != [1, 0]:  # type: ignore[arg-type]
        return None
    view = arena_view(rhs.args[0], 2)
    if view is None:
        return None
    arena, (rows, cols), stride, offset = view
    if stride != [cols, 1]:
        return None
    return (source(lhs), arena, rows, cols), offset


def _stack(
    graph: torch.fx.Graph,
    run: list[tuple[int, torch.fx.Node]],
    arena: torch.fx.Node,
    rows: int,
    cols: int,
    order: dict[torch.fx.Node, int],
) -> int:
    """One ``mm`` over the run's stacked rows of ``arena``, before the run's first shrink in
    the graph's ``order``; each shrink becomes a column slice of it."""
    if len(run) < 2:
        return 0
    first = min((node for _, node in run), key=order.__getitem__)
    lhs = first.args[0]
    fake = fake_mode(first)
    with graph.inserting_before(first):
        view = graph.call_function(_aten.as_strided.default, (arena, [rows * len(run), cols], [cols, 1], run[0][0]))
        stacked = graph.call_function(_aten.permute.default, (view, [1, 0]))
        product = graph.call_function(_aten.mm.default, (lhs, stacked))
        set_fake_values(fake, (view, stacked, product))
        for i, (_, node) in enumerate(run):
            part = graph.call_function(_aten.slice.Tensor, (product, 1, i * rows, (i + 1) * rows))
            set_fake_values(fake, (part,))
            node.replace_all_uses_with(part)
    for _, node in run:  # each shrink, its transposed view of the arena, an input reshape
        erase_unused(graph, node, _REMOVABLE)
    return len(run) - 1
