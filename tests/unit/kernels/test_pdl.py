"""Programmatic dependent launch (lorahot.kernels.pdl): when it is on; on a GPU, that a chain of
fused layers (the routed ones sharing the runtime's zeroed workspace) computes what the same
chain with a zero fill per call computes, in stream order and, on an sm90 GPU, launched early,
eagerly and replayed from a CUDA graph."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from lorahot.kernels import lora_linear as fused
from lorahot.kernels import pdl, routed_linear
from lorahot.kernels import routed_lora as routed


def test_off_on_the_cpu_and_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not pdl.active(torch.device("cpu"))
    monkeypatch.setattr(pdl, "ENABLED", False)
    assert not pdl.active(torch.device("cuda", 0))  # decided before any device query


def test_on_by_default_and_off_only_when_asked_at_import(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    try:
        for value, on in (("1", True), ("0", False), ("yes", True)):
            monkeypatch.setenv("LORAHOT_PDL", value)
            assert importlib.reload(pdl).ENABLED is on
        monkeypatch.delenv("LORAHOT_PDL")
        assert importlib.reload(pdl).ENABLED is True
    finally:
        monkeypatch.delenv("LORAHOT_PDL", raising=False)
        importlib.reload(pdl)


#: the chain's layers: routed (r) or single-adapter (1); the first two routed back to back, as
#: q, k and v read one input, the rest separated by a library op (as norms and activations are)
_KINDS = "rr1r1r1"


def _layer(
    kind: str,
    h: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    route: torch.Tensor,
    segs: torch.Tensor,
    workspace: torch.Tensor | None,
) -> torch.Tensor:
    w, a, bt, s = weights
    if kind == "r":
        return routed_linear.routed_lora_linear(h, w, None, a, bt, s, route, segs, workspace=workspace)
    return fused.lora_linear(h, w, None, a[0], bt[0], s[0])


def _chain(
    x: torch.Tensor,
    layers: list[tuple[torch.Tensor, ...]],
    route: torch.Tensor,
    segs: torch.Tensor,
    workspace: torch.Tensor | None,
) -> list[torch.Tensor]:
    """The chain of :data:`_KINDS` on ``x``, the routed layers sharing ``workspace`` as a
    runtime's arena does: every layer's input, then the last output."""
    seen = [x]
    h = x
    for i, (kind, weights) in enumerate(zip(_KINDS, layers)):
        h = _layer(kind, h, weights, route, segs, workspace)
        if i + 1 < len(_KINDS) and _KINDS[i + 1] == "r" and kind == "r":
            seen.append(h)  # straight into the next layer
        else:
            h = torch.tanh(h)
            seen.append(h)
    return seen


def _check_layers(
    seen: list[torch.Tensor], layers: list[tuple[torch.Tensor, ...]], route: torch.Tensor, segs: torch.Tensor
) -> None:
    """Each layer's output in ``seen`` against that layer recomputed in stream order (a zero
    fill of its own) from its own recorded input. The single-adapter layers and the routed
    layers' rows of no slot have no atomics: bitwise. The other rows differ at most by the
    order of the shrink's atomic adds, which can flip a rounding of the shrink, not more."""
    off = route < 0
    for i, (kind, weights) in enumerate(zip(_KINDS, layers)):
        want = _layer(kind, seen[i], weights, route, segs, None)
        nxt = i + 1 < len(_KINDS) and _KINDS[i + 1] == "r" and kind == "r"
        want = want if nxt else torch.tanh(want)
        got = seen[i + 1]
        assert torch.isfinite(got).all(), f"layer {i}"
        if kind == "1":
            assert torch.equal(got, want), f"layer {i}"
        else:
            assert torch.equal(got[off], want[off]), f"layer {i}: rows of no slot"
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()), msg=f"layer {i}")


def _gpu_random(early: bool, seed: int) -> tuple[torch.Generator, Callable[..., torch.Tensor]]:
    """Skips without the kernels (or, ``early``, without early launches); else a seeded CUDA
    generator and ``randn(*shape, scale=)``: bf16 normals times ``scale`` drawn from it."""
    if not fused.available():
        pytest.skip("needs CUDA and Triton")
    if early and not pdl._supported(torch.cuda.current_device()):
        pytest.skip("needs an sm90 GPU and a Triton with griddepcontrol")
    g = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape: int, scale: float) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g) * scale

    return g, randn


def _replayed(
    run: Callable[[torch.Tensor], list[torch.Tensor]], inputs: list[torch.Tensor], outputs_from: int
) -> list[list[torch.Tensor]]:
    """``run`` captured in a CUDA graph on a static input (after a warm-up on a side stream),
    then replayed on each of ``inputs``: what each replay leaves in ``run``'s tensors, those from
    ``outputs_from`` on (the graph's own outputs) poisoned with NaN before it, so an element it
    does not write stays NaN."""
    static = inputs[0].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = run(static)
    replayed = []
    for x in inputs:
        static.copy_(x)
        for t in outs[outputs_from:]:
            t.fill_(float("nan"))
        graph.replay()
        replayed.append([t.clone() for t in outs])
    torch.cuda.synchronize()
    return replayed


@pytest.mark.gpu
@pytest.mark.parametrize("early", [False, True], ids=["stream-order", "early-launch"])
def test_gpu_chain_computes_what_stream_order_computes(monkeypatch: pytest.MonkeyPatch, early: bool) -> None:
    """64 decode rows over 8 slots, K split (the shrink, fused kernel and sum of each routed
    layer, the fused kernel and sum of each single one), the routed layers sharing a zeroed
    workspace, which must be zero after every chain; eagerly and replayed from a CUDA graph,
    each replay on a new input. Each layer is checked against itself recomputed in stream
    order from its recorded input (:func:`_check_layers`), so a layer that read its input, or
    wrote its output, before the one before it ended shows at that layer, and a rounding flip
    from the atomics' order does not compound down the chain. With ``early``, the kernels
    launch early (:mod:`lorahot.kernels.pdl`)."""
    g, randn = _gpu_random(early, seed=3)
    rows, k, rank, slots = 64, 1024, 64, 8

    layers = [
        (randn(k, k, scale=k**-0.5), randn(slots, rank, k, scale=k**-0.5), randn(slots, rank, k, scale=0.5),
         torch.rand(slots, rank, device="cuda", generator=g))
        for _ in _KINDS
    ]  # fmt: skip
    route = torch.randint(-1, slots, (rows,), device="cuda", generator=g)
    segs = routed.segments(route, slots)
    inputs = [randn(rows, k, scale=1.0) for _ in range(6)]

    workspace = routed_linear.workspace(rank, torch.device("cuda"))
    monkeypatch.setattr(pdl, "ENABLED", early)
    eager = [_chain(x, layers, route, segs, workspace) for x in inputs]
    assert not workspace.any()

    replayed = _replayed(lambda x: _chain(x, layers, route, segs, workspace), inputs, outputs_from=1)
    assert not workspace.any()
    monkeypatch.setattr(pdl, "ENABLED", False)
    for seen in eager + replayed:
        _check_layers(seen, layers, route, segs)


@pytest.mark.gpu
@pytest.mark.parametrize("early", [False, True], ids=["stream-order", "early-launch"])
def test_gpu_a_stacked_routed_shrinks_group_computes_what_stream_order_computes(
    monkeypatch: pytest.MonkeyPatch, early: bool
) -> None:
    """Three routed layers on one input, as q/k/v (their A rows and scales one stacked view, as
    the arena keeps them), after a routed layer and a library op, with one routed shrink for the
    three (``routed_linear.routed_shrink``), each layer reading its columns
    (:mod:`lorahot.kernels.stacked_routed` writes this into compiled graphs). A member's fused
    kernel signals at once and waits only before it reads its columns, so the second and third
    rely on the wait of the one before. Eagerly and replayed from a CUDA graph on new inputs,
    each member against itself with its own shrink in stream order: bitwise on rows of no slot,
    up to the atomics' order elsewhere."""
    g, randn = _gpu_random(early, seed=4)
    rows, k, rank, slots = 64, 1024, 64, 8

    first = (randn(k, k, scale=k**-0.5), randn(slots, rank, k, scale=k**-0.5), randn(slots, rank, k, scale=0.5),
             torch.rand(slots, rank, device="cuda", generator=g))  # fmt: skip
    a_all = randn(slots, 3 * rank, k, scale=k**-0.5)
    s_all = torch.rand(slots, 3 * rank, device="cuda", generator=g)
    members = [
        (randn(k, k, scale=k**-0.5), a_all[:, j * rank : (j + 1) * rank], randn(slots, rank, k, scale=0.5),
         s_all[:, j * rank : (j + 1) * rank])
        for j in range(3)
    ]  # fmt: skip
    route = torch.randint(-1, slots, (rows,), device="cuda", generator=g)
    segs = routed.segments(route, slots)
    inputs = [randn(rows, k, scale=1.0) for _ in range(4)]

    def group(x: torch.Tensor) -> list[torch.Tensor]:
        w, a, bt, s = first
        h0 = torch.tanh(routed_linear.routed_lora_linear(x, w, None, a, bt, s, route, segs))
        stacked = routed_linear.routed_shrink(h0, a_all, s_all, route, segs)
        cols = [stacked[:, j * rank : (j + 1) * rank] for j in range(3)]
        outs = [
            routed_linear.routed_lora_linear(h0, w, None, a, bt, s, route, segs, h=c)
            for c, (w, a, bt, s) in zip(cols, members)
        ]
        return [h0, *outs]

    monkeypatch.setattr(pdl, "ENABLED", early)
    eager = [group(x) for x in inputs]
    replayed = _replayed(group, inputs, outputs_from=0)
    monkeypatch.setattr(pdl, "ENABLED", False)
    off = route < 0
    for seen in eager + replayed:
        h0 = seen[0]
        for j, (w, a, bt, s) in enumerate(members):
            want = routed_linear.routed_lora_linear(h0, w, None, a, bt, s, route, segs)
            got = seen[1 + j]
            assert torch.isfinite(got).all(), f"member {j}"
            assert torch.equal(got[off], want[off]), f"member {j}: rows of no slot"
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()), msg=f"member {j}")
