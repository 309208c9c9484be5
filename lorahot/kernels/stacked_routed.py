"""One routed shrink for the routed layers that share an input: a compiler pass.

A routed linear on its fused path (:mod:`lorahot.kernels.routed_linear`) launches the segmented
shrink, each row's ``s_k * (x @ A_k.T)`` with its own slot ``k``, and then the fused kernel that
reads it. q, k and v read the same input, and so do gate and up. The arena keeps
neighbouring layers' A rows (and scales) next to each other in every slot's region, so their
A's are one ``[slots, n R, in]`` view: one shrink over it reads ``x`` once and launches once
where the layers launch ``n`` shrinks.

Measured on an H200 before it was written (``benchmarks/experiments/stacked_shrink_probe.py``,
``runs/20261201T160539-stacked-shrink-probe.log``; 64 decode rows over 8 adapters, in 2048,
rank 64, us per group): q/k/v 13.6 as the layers run now against 9.4 stacked (its zero fill
included), gate/up 9.1 against 7.2: about 0.13 ms of a 22-block decode's GPU time, and 22 graph
nodes fewer.

The pass finds ``lorahot::routed_lora_linear`` calls in inductor's post-grad graph whose ``a``
and ``s`` are views of the same arena tensors at consecutive offsets (``as_strided(arena,
[slots, R, in], [step, in, 1], offset)``, as :func:`lorahot.layers.linear.compiled_routed`
makes them), over the same input, routing and segments, with a row count the fused path
takes (static, at most 128 rows: the segmented pair above computes its own shrink). For each
run of two or more it inserts one :func:`lorahot.kernels.routed_linear.routed_shrink` over the
stacked view, before the run's first call, and gives each call its columns as ``h``: a data
dependency, so no state passes between the calls outside the graph. Runs are cut where the
stacked rank would pad past :data:`MAX_STACKED_RANK` (the shrink's tiles must fit the GPU's
shared memory).

Measured in the model, it loses, so it is off unless ``LORAHOT_STACK_ROUTED=1``
(:data:`ENABLED`); it runs in :class:`lorahot.kernels.stacked_shrinks.StackShrinks`, whose cache
key includes it. On an H200 (``benchmarks/README.md``, "Seventeenth session") the mixed suite's
64-row decode took 2.80 / 2.99 ms of GPU time per call (1 / 8 adapters) with it against 2.70 /
2.88 without (``runs/20261201T174640-mixed.json`` against ``174158``; the base 2.17 in both),
where 0.13 ms less was predicted. The pass did fire: 88 shrinks per call instead of 154, plus 44
zero fills, 600 kernels against 622 (``runs/20261201T180600-mixed-profile-probe.log``). The
probe that predicted the gain timed each kernel alone; in the model, with early launches
(:mod:`lorahot.kernels.pdl`), each layer's own shrink runs while its fused kernel streams the
base weight, so it was mostly hidden, while the stacked shrink and its fill sit in front of the
group's first layer.
"""

from __future__ import annotations

import math
import os
from collections import defaultdict
from typing import Any

import torch

from lorahot.kernels import routed_linear  # noqa: F401 - defines the operators this pass reads and writes
from lorahot.kernels.fx_graph import arena_view, fake_mode, set_fake_values, source
from lorahot.kernels.routed_lora import rank_pad

__all__ = ["ENABLED", "MAX_STACKED_RANK", "stack_routed"]

#: whether :class:`lorahot.kernels.stacked_shrinks.StackShrinks` runs this rewrite
ENABLED = os.environ.get("LORAHOT_STACK_ROUTED") == "1"
#: the largest stacked rank (padded as the kernels pad it) one shrink takes
MAX_STACKED_RANK = 256
#: the most rows a stacked call serves: where every routed linear takes the fused path
#: (:func:`lorahot.kernels.lora_linear.routed_worth_it`)
MAX_ROWS = 128

_aten = torch.ops.aten
_ARGS = ("x", "weight", "bias", "a", "bt", "s", "route", "segs", "sized", "wide", "workspace", "h")
_DEFAULTS: dict[str, Any] = {"segs": None, "sized": False, "wide": False, "workspace": None, "h": None}

#: one member: (A's offset, S's offset, the call)
Member = tuple[int, int, torch.fx.Node]


def stack_routed(graph: torch.fx.Graph) -> int:
    """Rewrites every run of routed calls that share an input and whose A and scale views are
    adjacent (see the module docstring); returns how many shrinks it removed."""
    target = torch.ops.lorahot.routed_lora_linear.default
    groups: dict[tuple[Any, ...], list[Member]] = defaultdict(list)
    for node in graph.nodes:
        if node.op == "call_function" and node.target is target:
            found = _member(node)
            if found is not None:
                key, a_off, s_off = found
                groups[key].append((a_off, s_off, node))
    order = {node: i for i, node in enumerate(graph.nodes)}
    removed = 0
    for key, members in groups.items():
        rank, fan_in = key[4], key[5]
        members.sort(key=lambda m: m[0])
        run = [members[0]]
        for member in members[1:]:
            adjacent = member[0] == run[-1][0] + rank * fan_in and member[1] == run[-1][1] + rank
            if adjacent and rank_pad((len(run) + 1) * rank) <= MAX_STACKED_RANK:
                run.append(member)
                continue
            removed += _stack(graph, run, key, order)
            run = [member]
        removed += _stack(graph, run, key, order)
    return removed


def _args(node: torch.fx.Node) -> dict[str, Any]:
    """The call's arguments by name (positional, then keyword, then the schema's defaults)."""
    args = dict(_DEFAULTS)
    args.update(zip(_ARGS, node.args))
    args.update(node.kwargs)
    return args


def _member(node: torch.fx.Node) -> tuple[tuple[Any, ...], int, int] | None:
    """``(group key, A's offset, S's offset)`` for a routed call the pass may stack, else None."""
    args = _args(node)
    if args["h"] is not None or args["sized"]:
        return None
    x = args["x"]
    value = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if value is None or not all(isinstance(d, int) for d in value.shape):
        return None  # symbolic rows: the operator chooses per call, the pair shrinking for itself
    rows = math.prod(value.shape[:-1])
    if rows == 0 or rows > MAX_ROWS:
        return None
    a, s = arena_view(args["a"], 3), arena_view(args["s"], 2)
    if a is None or s is None:
        return None
    a_arena, (slots, rank, fan_in), a_stride, a_off = a
    s_arena, s_size, s_stride, s_off = s
    if a_stride[1:] != [fan_in, 1] or s_size != [slots, rank]:
        return None
    key = (source(x), args["route"], args["segs"], a_arena, rank, fan_in, slots, a_stride[0], s_arena, s_stride[0])
    return key, a_off, s_off


def _stack(graph: torch.fx.Graph, run: list[Member], key: tuple[Any, ...], order: dict[torch.fx.Node, int]) -> int:
    """One stacked shrink before the run's first call in the graph's ``order``; each call
    takes its columns of it as ``h``."""
    if len(run) < 2:
        return 0
    _, route, segs, a_arena, rank, fan_in, slots, a_step, s_arena, s_step = key
    first = min((node for *_, node in run), key=order.__getitem__)
    x = _args(first)["x"]
    fake = fake_mode(first)
    n = len(run)
    with graph.inserting_before(first):
        a = graph.call_function(
            _aten.as_strided.default, (a_arena, [slots, n * rank, fan_in], [a_step, fan_in, 1], run[0][0])
        )
        s = graph.call_function(_aten.as_strided.default, (s_arena, [slots, n * rank], [s_step, 1], run[0][1]))
        h = graph.call_function(torch.ops.lorahot.routed_shrink.default, (x, a, s, route, segs))
        set_fake_values(fake, (a, s, h))
        for i, (*_, node) in enumerate(run):
            part = graph.call_function(_aten.slice.Tensor, (h, 1, i * rank, (i + 1) * rank))
            set_fake_values(fake, (part,))
            node.update_kwarg("h", part)
    return n - 1
