"""The routed LoRA op (lorahot.kernels.routed_lora): the library formula everywhere, one opaque
node in a compiled graph, and on the GPU both Triton kernel pairs (gather and segmented) against
a float64 per-row reference, their output poisoned with NaN first."""

from __future__ import annotations

import pytest
import torch

from lorahot.kernels import routed_lora as routed


def _operands(
    rows: int, k: int, n: int, rank: int, slots: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """x, y and slot views laid out as an arena's (each slot a region of a bigger tensor)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g).to(device, dtype)
    y = torch.randn(rows, n, generator=g).to(device, dtype)
    big_a = (torch.randn(slots + 1, rank * k + 64, generator=g) / k**0.5).to(device, dtype)
    big_b = torch.randn(slots + 1, rank * n + 64, generator=g).to(device, dtype)
    big_s = torch.rand(slots + 1, 2, rank, generator=g).to(device)
    a = big_a.as_strided((slots, rank, k), (big_a.stride(0), k, 1), 64)
    bt = big_b.as_strided((slots, rank, n), (big_b.stride(0), n, 1), 0)
    s = big_s.as_strided((slots, rank), (big_s.stride(0), 1), rank)
    return x, y, a, bt, s


def _per_row(x, y, a, bt, s, tokens) -> torch.Tensor:
    """float64, one row at a time."""
    out = y.double().clone()
    for m, k in enumerate(tokens.tolist()):
        if k >= 0:
            h = (a[k].double() @ x[m].double()) * s[k].double()
            out[m] += h @ bt[k].double()
    return out


def test_reference_equals_the_per_row_formula_and_minus_one_rows_are_y() -> None:
    x, y, a, bt, s = _operands(7, 12, 10, 4, 3, torch.float64)
    tokens = torch.tensor([2, -1, 0, 0, 1, -1, 2])
    out = routed.reference(x, y, a, bt, s, tokens)
    torch.testing.assert_close(out, _per_row(x, y, a, bt, s, tokens), rtol=1e-12, atol=1e-12)
    assert torch.equal(out[1], y[1]) and torch.equal(out[5], y[5])


def test_op_spreads_the_routing_over_equal_groups_of_rows() -> None:
    x, y, a, bt, s = _operands(6, 8, 5, 4, 2, torch.float64)
    route = torch.tensor([1, -1, 0])
    got = routed.routed_lora(x.view(3, 2, 8), y.view(3, 2, 5), a, bt, s, route)
    tokens = routed.token_route(route, 6)
    assert tokens.tolist() == [1, 1, -1, -1, 0, 0]
    torch.testing.assert_close(got.view(6, 5), _per_row(x, y, a, bt, s, tokens), rtol=1e-12, atol=1e-12)


def test_compiled_op_is_one_opaque_node() -> None:
    x, y, a, bt, s = _operands(4, 8, 5, 4, 2, torch.float32)
    route = torch.tensor([1, 0, -1, 1])
    nodes = []

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        nodes.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm

    out = torch.compile(routed.routed_lora, backend=backend, fullgraph=True)(x, y, a, bt, s, route)
    assert nodes == [torch.ops.lorahot.routed_lora]
    torch.testing.assert_close(out.double(), _per_row(x, y, a, bt, s, route), rtol=1e-5, atol=1e-5)


# -- GPU: the Triton kernels -------------------------------------------------------------------

SHAPES = [  # rows, in, out, rank, slots
    (1, 64, 48, 8, 2),
    (5, 300, 130, 16, 3),
    (8, 2048, 256, 64, 8),
    (40, 256, 512, 64, 4),
    (300, 1000, 700, 20, 8),
]


@pytest.mark.gpu
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "segmented"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_gpu_kernels_match_float64_reference(shape: tuple[int, ...], dtype: torch.dtype, gather: bool) -> None:
    from lorahot.kernels import triton_routed_lora as kernels

    rows, k, n, rank, slots = shape
    x, y, a, bt, s = _operands(rows, k, n, rank, slots, dtype, "cuda", seed=rows)
    g = torch.Generator().manual_seed(1)
    for tokens in (
        torch.randint(-1, slots, (rows,), generator=g),
        torch.full((rows,), slots - 1),  # every row in one slot
        torch.full((rows,), -1),  # none
    ):
        tokens = tokens.cuda()
        for segs in (None, routed.segments(tokens, slots)):  # computed here, or given once per routing
            out = torch.full_like(y, float("nan"))
            kernels.launch(x, y, a, bt, s, tokens, out, gather=gather, segs=segs)
            want = _per_row(x, y, a, bt, s, tokens)
            assert not out.isnan().any()
            tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
            torch.testing.assert_close(out.double(), want, rtol=tol, atol=tol * float(want.abs().max()))
            off = tokens < 0
            assert torch.equal(out[off], y[off])


@pytest.mark.gpu
@pytest.mark.parametrize("gather", [True, False], ids=["gather", "segmented"])
def test_gpu_kernels_route_groups_of_rows(gather: bool) -> None:
    """A routing of ``L`` entries over ``L * T`` rows (one entry per sequence of ``T`` tokens)."""
    from lorahot.kernels import triton_routed_lora as kernels

    x, y, a, bt, s = _operands(6 * 40, 2048, 512, 64, 8, torch.bfloat16, "cuda", seed=3)
    route = torch.tensor([3, -1, 0, 3, 7, 0], device="cuda")
    out = torch.full_like(y, float("nan"))
    kernels.launch(x, y, a, bt, s, route, out, gather=gather, segs=routed.segments(route, 8))
    want = _per_row(x, y, a, bt, s, routed.token_route(route, x.shape[0]))
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("programs", [1, 3], ids=["one-program", "three-programs"])
def test_gpu_segmented_expand_programs_loop_over_their_share_of_the_outputs(
    programs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fewer expand programs than output tiles: each loops over every ``programs``-th tile of N
    (at the model's sizes each program takes several; the shapes above give one each)."""
    from lorahot.kernels import triton_routed_lora as kernels

    monkeypatch.setattr(kernels, "_EXPAND_PROGRAMS", programs)
    x, y, a, bt, s = _operands(300, 1000, 700, 20, 8, torch.bfloat16, "cuda", seed=11)
    tokens = torch.randint(-1, 8, (300,), generator=torch.Generator().manual_seed(4)).cuda()
    out = torch.full_like(y, float("nan"))
    kernels.launch(x, y, a, bt, s, tokens, out, gather=False, segs=routed.segments(tokens, 8))
    want = _per_row(x, y, a, bt, s, tokens)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


@pytest.mark.gpu
@pytest.mark.parametrize("graph", [False, True], ids=["eager", "cuda-graph"])
def test_gpu_segmented_pair_launched_early_equals_stream_order(graph: bool) -> None:
    """The segmented pair with early launches (``early=True``: the expand starts while the
    shrink runs and loads the base GEMM's output before it waits) in a chain of layers, each
    layer's input the last one's output and each base output a GEMM's just before: every
    layer bitwise equal to the same chain launched in stream order (the pair adds no atomics),
    and the first equal to float64, output poisoned with NaN first. Without the CUDA graph
    and inside one, where the early launches are captured."""
    from lorahot.kernels import pdl
    from lorahot.kernels import triton_routed_lora as kernels

    if not pdl.active(torch.device("cuda")):
        pytest.skip("programmatic dependent launch needs an sm90 GPU and a Triton with its intrinsics")
    rows, width, rank, slots = 1024, 1024, 64, 8
    x, _, a, bt, s = _operands(rows, width, width, rank, slots, torch.bfloat16, "cuda", seed=5)
    w = [(torch.randn(width, width, device="cuda") / width**0.5).to(torch.bfloat16) for _ in range(3)]
    route = torch.tensor([3, -1, 0, 3, 7, 0, 5, 1], device="cuda")
    segs = routed.segments(route, slots)
    outs = {early: [torch.full((rows, width), float("nan"), device="cuda", dtype=torch.bfloat16) for _ in w]
            for early in (False, True)}  # fmt: skip
    ys = {early: [torch.empty_like(o) for o in outs[early]] for early in outs}

    def chain(early: bool) -> None:
        h = x
        for wi, y, out in zip(w, ys[early], outs[early]):
            torch.mm(h, wi.T, out=y)
            kernels.launch(h, y, a, bt, s, route, out, gather=False, segs=segs, early=early)
            h = out

    for early in (False, True):
        if graph:
            g = torch.cuda.CUDAGraph()
            chain(early)  # compiled before the capture
            for o in outs[early]:
                o.fill_(float("nan"))
            with torch.cuda.graph(g):
                chain(early)
            g.replay()
        else:
            chain(early)
    torch.cuda.synchronize()
    for got, want in zip(outs[True], outs[False]):
        assert not got.isnan().any() and torch.equal(got, want)
    tokens = routed.token_route(route, rows)
    want64 = _per_row(x, ys[True][0], a, bt, s, tokens)
    torch.testing.assert_close(outs[True][0].double(), want64, rtol=2e-2, atol=2e-2 * float(want64.abs().max()))


def test_segments_group_entries_by_slot_stably_with_no_slot_last() -> None:
    segs = routed.segments(torch.tensor([2, -1, 0, 2, 2, -1, 1]), 3)
    starts, counts, order = segs[:4], segs[4:8], segs[8:]
    assert counts.tolist() == [1, 1, 3, 2] and starts.tolist() == [0, 1, 2, 5]
    assert order.tolist() == [2, 6, 0, 3, 4, 1, 5]


def test_op_refuses_segments_of_another_routing() -> None:
    x, y, a, bt, s = _operands(4, 8, 5, 4, 2, torch.float32)
    route = torch.tensor([1, 0, -1, 1])
    with pytest.raises(ValueError, match="segs of 9 entries"):
        routed.routed_lora(x, y, a, bt, s, route, routed.segments(route[:3], 2))


@pytest.mark.gpu
def test_gpu_segments_group_rows_by_slot_without_a_host_sync() -> None:
    tokens = torch.tensor([2, -1, 0, 2, 2, -1, 1], device="cuda")
    torch.cuda.set_sync_debug_mode("error")
    try:
        segs = routed.segments(tokens, 3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert segs.tolist() == routed.segments(tokens.cpu(), 3).tolist()


@pytest.mark.gpu
def test_gpu_op_picks_gather_for_few_rows_and_segments_above() -> None:
    for rows in (routed.GATHER_ROWS, routed.GATHER_ROWS + 1, 256):
        x, y, a, bt, s = _operands(rows, 128, 96, 16, 4, torch.float16, "cuda", seed=rows)
        route = torch.arange(rows, device="cuda") % 5 - 1
        got = routed.routed_lora(x, y, a, bt, s, route)
        torch.testing.assert_close(got.double(), _per_row(x, y, a, bt, s, route), rtol=4e-3, atol=4e-2)
