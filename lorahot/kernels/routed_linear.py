"""The routed fused linear: the base product and each row's own slot's LoRA, the base weight read once.

``routed_lora_linear(x, weight, bias, a, bt, s, route, segs)`` computes, row by row,
``x @ weight.T + bias + ((x @ A_k.T) * s_k) @ Bt_k`` with ``k`` the row's slot (``-1``: the
base product alone), for the slot views of a layer's arena (``a [slots, R, in]``,
``bt [slots, R, out]``, ``s [slots, R]``). The segmented shrink
(:func:`lorahot.kernels.triton_routed_lora.shrink`) first writes every row's scaled shrink
with its own slot's A (a slot's A read once per tile of its rows); then the fused kernel of
:mod:`lorahot.kernels.lora_linear` tiles the rows as it does for one adapter, so the base
weight is read once for the whole batch, and adds for each slot its tile's rows use the expand
with that slot's B (the slots shared among the programs of a split K). Two or three launches
per layer, where the base GEMM plus the routed shrink and expand
(:mod:`lorahot.kernels.routed_lora`), which serve larger inputs, take three or four. Where K is
split the shrink adds its shares into a zeroed float32 :func:`workspace` the runtime keeps per
arena, and the split-K sum zeroes it again: no zero fill of its own per call.

An earlier version grouped the rows by slot into 16-row tiles inside the fused kernel: each
slot's tiles read the whole base weight again and gave up the split K, and at 64 decode rows
on an H200 it cost 17.6 / 7.0 / 32.9 / 40.9 us per q-o / k-v / gate-up / down call, with one
adapter, against 6.4 / 5.2 / 9.7 / 12.0 for the base GEMM alone
(``benchmarks/experiments/routed_probe.py``). Two other forms were measured on an H200 and
removed: the layer in one kernel, each program computing its rows' shrinks (2-4x slower with
eight adapters: ``benchmarks/README.md``, "Twelfth session"), and the shrink in leading programs
of the fused kernel's own launch (slower than this path with early launches: "Fourteenth session").

The operator ``lorahot::routed_lora_linear`` (:mod:`lorahot.kernels.op_registry`) is opaque to
the compiler and shape-stable for CUDA graphs. Where the fused kernel does not run (no CUDA or
Triton, other dtypes) it computes the base linear plus
:func:`lorahot.kernels.routed_lora.reference`.

The shrink is also an operator of its own, ``lorahot::routed_shrink`` (:func:`routed_shrink`),
whose result the linear takes as ``h`` instead of shrinking itself: one call over the stacked
A of several layers that read the same input serves them all. The compiler pass
:mod:`lorahot.kernels.stacked_routed` writes that into compiled graphs (off by default: it measured
slower in the model, since each layer's own shrink is mostly hidden under early launches).
"""

from __future__ import annotations

import os

import torch

from lorahot.kernels import lora_linear as fused_kernel
from lorahot.kernels import pdl
from lorahot.kernels.device_guard import launching_on
from lorahot.kernels.op_registry import define, refuse_grad
from lorahot.kernels.routed_lora import (
    available,
    check_rows,
    check_segments,
    rank_pad,
    reference,
    reference_expand,
    reference_shrink,
    routed_lora,
    segments,
    token_route,
)
from lorahot.kernels.rows import as_rows, row_count
from lorahot.kernels.triton_import import triton_module

__all__ = ["routed_lora_linear", "routed_shrink", "workspace", "WORKSPACE_ROWS"]

#: rows of :func:`workspace`: the most the fused routed path takes (``lora_linear.routed_worth_it``)
WORKSPACE_ROWS = 256

#: Above the fused path's rows, whether the routed linear writes the slots' updates first and
#: lets the base GEMM accumulate onto them (:func:`_accumulated`) instead of the base GEMM, then
#: the segmented pair reading its output back. Both forms pass over the output three times; this
#: one moves the read of it from the memory-bound expand into the compute-bound GEMM's epilogue
#: (cuBLAS's ``C`` with ``beta = 1``), where it may be hidden behind the arithmetic. Predicted at
#: the mixed suite's prefill (2048 rows, 8 adapters), if it is hidden and ``beta = 1`` costs the
#: GEMM nothing else: about 0.8 ms less GPU time per forward (8 MB less for the expand to read on
#: q/o, 23 MB on gate/up). Measured on an H200: 0.13 ms less (1.34x the base's GPU time against
#: 1.37x, ``runs/20261201T154411-mixed.json``), 2-5 us per layer (``experiments/prefill_probe.py``):
#: the read is not hidden. So off unless ``LORAHOT_ROUTED_ACCUMULATE=1``. With it on: rows of
#: no slot equal the base output up to cuBLAS's choice of algorithm for ``beta = 1`` (not
#: guaranteed bitwise, as they are without it), and forward hooks on the wrapped linear do not
#: run for inputs this form takes (as for those the fused kernel takes).
ACCUMULATE = os.environ.get("LORAHOT_ROUTED_ACCUMULATE") == "1"


def _shrink_fake(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, *_: object) -> torch.Tensor:
    rows = row_count(x)
    return x.new_empty((rows, rank_pad(a.shape[-2])), dtype=torch.promote_types(a.dtype, s.dtype))


@define("routed_shrink(Tensor x, Tensor a, Tensor s, Tensor route, Tensor? segs=None) -> Tensor", _shrink_fake)
def _routed_shrink(
    x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, route: torch.Tensor, segs: torch.Tensor | None = None
) -> torch.Tensor:
    refuse_grad("routed_shrink", x, a)
    x2 = as_rows(x)
    check_rows(x2.shape[0], route.shape[0])
    r = a.shape[-2]
    kernels = triton_module("triton_routed_lora") if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) else None
    if kernels is None or x2.shape[0] == 0 or s.dtype != torch.float32:
        h = reference_shrink(x2, a, s, token_route(route, x2.shape[0]))
        return torch.nn.functional.pad(h, (0, rank_pad(r) - r))  # the kernels' columns
    grouped = segments(route, a.shape[0]) if segs is None else segs
    with launching_on(x.device):
        # K split: shares added into a zero fill of its own; else each row written once (rows of
        # no slot are left unset: every reader masks them)
        early = pdl.active(x.device)  # as the fused kernel's own shrink launches: it waits to read the result
        t = x2.shape[0] // route.shape[0]
        stacked: torch.Tensor = kernels.shrink(x2.contiguous(), a, s, grouped, t, early=early)[0]
    return stacked


def routed_shrink(
    x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, route: torch.Tensor, segs: torch.Tensor | None = None
) -> torch.Tensor:
    """Each row's scaled shrink with its own slot's A, ``h[m] = s_k * (x[m] @ A_k.T)`` (``k`` the
    row's slot; ``-1`` rows zero on the CPU, unset on CUDA), ``[rows, rank_pad(R)]`` in
    ``promote(a.dtype, s.dtype)`` (float32 under the kernels): the first launch of the routed
    fused linear, for ``a [slots, R, in]`` and ``s [slots, R]`` over several layers at once.

    The layers that share an input (q/k/v, gate/up) keep their A rows next to each other in the
    arena, so one call over their stacked view computes all their shrinks, each layer's its
    ``R_layer`` columns; :func:`routed_lora_linear` takes them as ``h``. The compiler pass
    :func:`lorahot.kernels.stacked_routed.stack_routed` writes that (where
    :data:`lorahot.kernels.stacked_routed.ENABLED` is on)."""
    check_segments(segs, a.shape[0], route.shape[0])
    out: torch.Tensor = torch.ops.lorahot.routed_shrink(x, a, s, route, segs)
    return out


def workspace(rank: int, device: torch.device) -> torch.Tensor:
    """A zeroed float32 ``[WORKSPACE_ROWS, rank padded]`` workspace for :func:`routed_lora_linear`
    on ``device`` (the runtime keeps one per arena, at a fixed address).

    The routed decode's shrink adds its shares of K into it. Without one, each call zeroes a
    fresh buffer: one more kernel per layer, which costs a replayed CUDA graph about 0.9 us of
    the device's time besides its work (0.6 with early launches) and the replay's launch about
    0.5 us of host time on an H200 host (``benchmarks/experiments/graph_launch_probe.py``,
    ``mixed_profile_probe.py``). With one, the split-K sum that ends
    the call zeroes it again once the fused kernel has read it, so it is zero whenever no call
    is running. Calls that share a workspace must therefore not run at the same time (two
    streams): a runtime's forwards already share its routing."""
    return torch.zeros((WORKSPACE_ROWS, rank_pad(rank)), device=device, dtype=torch.float32)


def _accumulates(x2: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`_accumulated` can run: the segmented kernels on CUDA, a weight cuBLAS reads as it is."""
    return x2.is_cuda and x2.dtype in (torch.float16, torch.bfloat16) and weight.dtype == x2.dtype and available()


def _accumulated(
    x2: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    bt: torch.Tensor,
    s: torch.Tensor,
    route: torch.Tensor,
    segs: torch.Tensor | None,
) -> torch.Tensor:
    """The routed layer on many rows, the base output never read back by a kernel of its own:
    the segmented shrink, the segmented expand writing each row's update (plus the bias) alone,
    then the base GEMM accumulating onto it (cuBLAS's ``beta = 1``, the update read in its
    epilogue). See :data:`ACCUMULATE`."""
    kernels = triton_module("triton_routed_lora")
    assert kernels is not None  # _accumulates said so
    x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], weight.shape[0]), device=x2.device, dtype=x2.dtype)
    with launching_on(x2.device):
        kernels.launch(
            x2, None, a, bt, s, route, out, gather=False, segs=segs, bias=None if bias is None else bias.contiguous()
        )
        out.addmm_(x2, weight.t())
    return out


def _fake(x: torch.Tensor, weight: torch.Tensor, *_: object) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@define(
    "routed_lora_linear(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor bt, Tensor s, Tensor route, "
    "Tensor? segs=None, bool sized=False, bool wide=False, Tensor? workspace=None, Tensor? h=None) -> Tensor",
    _fake,
)
def _routed_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    bt: torch.Tensor,
    s: torch.Tensor,
    route: torch.Tensor,
    segs: torch.Tensor | None = None,
    sized: bool = False,
    wide: bool = False,
    workspace: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
) -> torch.Tensor:
    refuse_grad("routed_lora_linear", x, weight, bias, a, bt)
    x2 = as_rows(x)
    check_rows(x2.shape[0], route.shape[0])
    n = weight.shape[0]
    if sized and not fused_kernel.routed_worth_it(x2.shape[0], n, wide=wide):  # the base GEMM, then the routed sum
        if ACCUMULATE and _accumulates(x2, weight):
            return _accumulated(x2, weight, bias, a, bt, s, route, segs).view(*x.shape[:-1], n)
        y = torch.nn.functional.linear(x2, weight, bias)
        return routed_lora(x2, y, a, bt, s, route, segs).view(*x.shape[:-1], n)
    kernel = triton_module("triton_lora_linear") if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) else None
    if kernel is None or x2.shape[0] == 0:
        y = torch.nn.functional.linear(x2, weight, bias)
        tokens = token_route(route, x2.shape[0])
        z = reference(x2, y, a, bt, s, tokens) if h is None else reference_expand(y, h, bt, tokens)
        return z.view(*x.shape[:-1], n)
    x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], n), device=x.device, dtype=x.dtype)
    grouped = segments(route, a.shape[0]) if segs is None else segs
    with launching_on(x.device):
        config = kernel.config_for(x2.shape[0], n, x2.shape[1])
        routing = (grouped, route, x2.shape[0] // route.shape[0], None if h is not None else workspace)
        if h is not None and (h.dtype != torch.float32 or h.stride(-1) != 1):
            h = h.float().contiguous()  # the kernel reads float32 rows with contiguous columns
        kernel.launch(x2, weight, bias, a, bt, s, out, config, routing=routing, h=h)
    return out.view(*x.shape[:-1], n)


def routed_lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    bt: torch.Tensor,
    s: torch.Tensor,
    route: torch.Tensor,
    segs: torch.Tensor | None = None,
    *,
    sized: bool = False,
    wide: bool = False,
    workspace: torch.Tensor | None = None,
    h: torch.Tensor | None = None,
) -> torch.Tensor:
    """The base linear plus each row's own slot's update: on CUDA the segmented shrink, then
    the fused kernel (see the module docstring). With ``sized`` (compiled, the row count
    symbolic: see :mod:`lorahot.kernels.wide_linear`), the operator itself asks
    :func:`lorahot.kernels.lora_linear.routed_worth_it` (``wide`` as the layer's) for the rows of each
    call, and above its limits runs the base GEMM and :func:`lorahot.kernels.routed_lora.routed_lora`,
    as the layer would: one graph for every row count.

    Args:
        x: ``[..., in]`` the layer's input; its rows a multiple of ``route``'s length.
        weight: ``[out, in]`` the base weight; bias: ``[out]`` or None.
        a: ``[slots, R, in]``; bt: ``[slots, R, out]``; s: ``[slots, R]`` (float32).
        route: ``[L]`` int64, each group of rows' slot or -1.
        segs: ``segments(route, slots)`` where the caller keeps it per routing (else computed here).
        workspace: a :func:`workspace` for ``a``'s rank, zero, that no other call uses at the
            same time; the kernels use it where it holds the rows (and leave it zero), else zero
            their own.
        h: the rows' scaled shrinks already computed (:func:`routed_shrink`, ``[rows, >= R]``,
            its rows ``h.stride(0)`` apart: a layer's columns of a stacked shrink): the shrink
            is not run again where the fused path or the library formula runs (the base GEMM
            and the segmented pair above the fused path's rows compute their own).

    Returns:
        ``[..., out]`` in ``x``'s dtype.
    """
    check_segments(segs, a.shape[0], route.shape[0])
    if h is not None:
        rows = row_count(x)
        if h.dim() != 2 or h.shape[0] != rows or h.shape[1] < a.shape[-2]:
            raise ValueError(f"h of shape {tuple(h.shape)} does not give {rows} rows at least {a.shape[-2]} ranks each")
    out: torch.Tensor = torch.ops.lorahot.routed_lora_linear(
        x, weight, bias, a, bt, s, route, segs, sized, wide, workspace, h
    )
    return out
