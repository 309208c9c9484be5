"""lorahot's Triton kernels (routed, row-scale, fused linear, word sums) on the CPU, in Triton's interpreter
(``make test-interpret``).

A CPU box has no GPU to run the kernels on, but Triton's interpreter (``TRITON_INTERPRET=1``)
runs the same kernel code on CPU tensors with NumPy: indexing, masks, splits and atomics are
checked before a device call, against the same float64 references the GPU tests use. Float16
only (the interpreter's bfloat16 is not reliable), and no timing. Skipped unless the
interpreter is on and Triton imports; ``make test`` skips it.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lorahot.kernels import routed_lora as routed
from lorahot.kernels.routed_linear import workspace as make_workspace
from lorahot.runtime import written_probes
from tests.unit.kernels.test_routed_lora import _operands, _per_row

INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = [pytest.mark.interpret, pytest.mark.skipif(not INTERPRETING, reason="run by make test-interpret")]

SHAPES = [  # rows, in, out, rank, slots
    (5, 300, 130, 16, 3),
    (40, 256, 512, 64, 4),
    (64, 2048, 64, 64, 8),  # K split 16 ways at decode size
    (300, 1000, 200, 20, 8),
]


@pytest.mark.parametrize("gather", [True, False], ids=["gather", "segmented"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_routed_kernels_match_float64_reference(shape: tuple[int, ...], gather: bool) -> None:
    kernels = pytest.importorskip("lorahot.kernels.triton_routed_lora")
    rows, k, n, rank, slots = shape
    x, y, a, bt, s = _operands(rows, k, n, rank, slots, torch.float16, seed=rows)
    g = torch.Generator().manual_seed(1)
    for tokens in (torch.randint(-1, slots, (rows,), generator=g), torch.full((rows,), slots - 1)):
        for segs in (None, routed.segments(tokens, slots)):
            out = torch.full_like(y, float("nan"))
            kernels.launch(x, y, a, bt, s, tokens, out, gather=gather, segs=segs)
            want = _per_row(x, y, a, bt, s, tokens)
            assert not out.isnan().any()
            torch.testing.assert_close(out.double(), want, rtol=4e-3, atol=4e-3 * float(want.abs().max()))
            assert torch.equal(out[tokens < 0], y[tokens < 0])


@pytest.mark.parametrize("gather", [True, False], ids=["gather", "segmented"])
def test_routed_kernels_route_groups_of_rows(gather: bool) -> None:
    kernels = pytest.importorskip("lorahot.kernels.triton_routed_lora")
    x, y, a, bt, s = _operands(6 * 5, 300, 64, 16, 8, torch.float16, seed=3)
    route = torch.tensor([3, -1, 0, 3, 7, 0])
    out = torch.full_like(y, float("nan"))
    kernels.launch(x, y, a, bt, s, route, out, gather=gather, segs=routed.segments(route, 8))
    want = _per_row(x, y, a, bt, s, routed.token_route(route, 30))
    torch.testing.assert_close(out.double(), want, rtol=4e-3, atol=4e-3 * float(want.abs().max()))


def test_row_scale_writes_each_block_its_rows_times_its_scales() -> None:
    kernel = pytest.importorskip("lorahot.kernels.triton_row_scale")
    g = torch.Generator().manual_seed(0)
    rank, widths, layers = 16, [64, 2500, 5], [3, 0, 3]  # 2500: a row over several blocks
    src = [torch.randn(rank, w, generator=g).half() for w in widths]
    dst = [torch.full((rank, w), float("nan"), dtype=torch.float16) for w in widths]
    scales = torch.randn(4, rank, generator=g)
    tables = [torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64) for ts in (dst, src)]
    cols = torch.tensor(widths, dtype=torch.int32)
    kernel.launch(tables[0], tables[1], scales, torch.tensor(layers), cols, cols.long(), 5, torch.float16)
    for d, s_, layer in zip(dst, src, layers):
        assert torch.equal(d[:5], (s_[:5].float() * scales[layer, :5, None]).half())
        assert torch.isnan(d[5:]).all()


def test_row_scale_writes_transposed_blocks_its_rows_times_its_scales() -> None:
    """The wide layers' B columns: each destination a transposed view into a wider buffer
    (rows 1 apart, columns a buffer row apart), rank rows past the count and the buffer's own
    columns left alone."""
    kernel = pytest.importorskip("lorahot.kernels.triton_row_scale")
    g = torch.Generator().manual_seed(0)
    rank, widths, layers, k = 40, [64, 150, 5], [3, 0, 3], 24  # 40 rows: two row blocks of 32
    src = [torch.randn(rank, w, generator=g).half() for w in widths]
    bufs = [torch.full((w, k + rank), float("nan"), dtype=torch.float16) for w in widths]
    dst = [b[:, k:].t() for b in bufs]  # [rank, w], strides (1, k + rank)
    scales = torch.randn(4, rank, generator=g)
    tables = [torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64) for ts in (dst, src)]
    cols = torch.tensor(widths, dtype=torch.int32)
    ld = torch.tensor([d.stride(1) for d in dst])
    kernel.launch(tables[0], tables[1], scales, torch.tensor(layers), cols, ld, 37, torch.float16, max(widths))
    for d, b, s_, layer in zip(dst, bufs, src, layers):
        assert torch.equal(d[:37], (s_[:37].float() * scales[layer, :37, None]).half())
        assert torch.isnan(d[37:]).all() and torch.isnan(b[:, :k]).all()


def test_row_scale_normalized_rows_find_write_and_divide_by_their_shifts() -> None:
    """The float16 wide layers' A copy: each row's power of two (``row_shifts``: twice its sum of
    ``|value|``, rounded up, at least 1) written to the shift table at the block's position, and
    the row divided by it; then the B copy's columns times their row's scale and shift."""
    kernel = pytest.importorskip("lorahot.kernels.triton_row_scale")
    from lorahot.kernels.row_scale import row_shifts

    g = torch.Generator().manual_seed(0)
    rank, widths, k = 8, [64, 2500, 5], 24  # 2500: a row over several blocks
    src = [(torch.randn(rank, w, generator=g) * 3).half() for w in widths]
    src[2][1] = 0.0  # a zero row: shift 1
    src[2][2] = torch.tensor([0.25, -0.125, 0.125, 0.0, 0.0]).half()  # twice its sum is exactly 1
    dst = [torch.full((rank, w), float("nan"), dtype=torch.float16) for w in widths]
    shift = torch.full((3, rank), float("nan"))
    ones = torch.ones(3, rank)
    tables = [torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64) for ts in (dst, src)]
    cols = torch.tensor(widths, dtype=torch.int32)
    kernel.launch(tables[0], tables[1], ones, torch.arange(3), cols, cols.long(), 6, torch.float16, 0, shift)
    for i, (d, s_) in enumerate(zip(dst, src)):
        assert torch.equal(shift[i, :6], row_shifts(s_[:6]))
        assert torch.equal(d[:6], (s_[:6].float() / shift[i, :6, None]).half())
        assert torch.isnan(d[6:]).all() and torch.isnan(shift[i, 6:]).all()
    assert shift[2, 1] == 1.0 and shift[2, 2] == 1.0
    # the B copy: transposed columns times scale and shift (small: the range check's job)
    src = [(torch.randn(rank, w, generator=g) * 1e-3).half() for w in widths]
    bufs = [torch.full((w, k + rank), float("nan"), dtype=torch.float16) for w in widths]
    cols_t = [b[:, k:].t() for b in bufs]
    scales = torch.randn(4, rank, generator=g)
    tables = [torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64) for ts in (cols_t, src)]
    ld = torch.tensor([d.stride(1) for d in cols_t])
    layers = torch.tensor([3, 0, 3])
    kernel.launch(tables[0], tables[1], scales, layers, cols, ld, 6, torch.float16, max(widths), shift)
    for i, (d, s_) in enumerate(zip(cols_t, src)):
        want = (s_[:6].float() * (scales[layers[i], :6] * shift[i, :6])[:, None]).half()
        assert torch.equal(d[:6], want)


def test_row_scale_folds_column_tiles_past_the_grid_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A transposed block wider than a CUDA grid's second dimension holds tiles for (65535 of 64
    columns) launches within the limit, each program going on to every ``GRID_Y``-th tile: the
    grid asked for 4,194,241 columns, recorded without a launch, and with the limit at 2 here,
    blocks of 1 to 3 tiles written whole, nothing past their rows or beside their columns."""
    kernel = pytest.importorskip("lorahot.kernels.triton_row_scale")
    grids: list[tuple[int, ...]] = []
    real = kernel._col_scale_kernel

    class _Recorded:
        def __init__(self, launch: bool) -> None:
            self.launch = launch

        def __getitem__(self, grid: tuple[int, ...]) -> object:
            grids.append(grid)
            return real[grid] if self.launch else lambda *args, **kwargs: None

    monkeypatch.setattr(kernel, "_col_scale_kernel", _Recorded(launch=False))
    table = torch.zeros(1, dtype=torch.int64)
    cols = torch.tensor([4_194_241], dtype=torch.int32)
    kernel.launch(table, table, torch.ones(1, 8), table, cols, table, 8, torch.float16, 4_194_241)
    assert grids[-1][1] <= 65535
    monkeypatch.setattr(kernel, "_col_scale_kernel", _Recorded(launch=True))
    monkeypatch.setattr(kernel, "GRID_Y", 2, raising=False)
    g = torch.Generator().manual_seed(0)
    rank, widths, layers, k = 40, [64, 150, 5], [3, 0, 3], 24  # 1, 3 and 1 tiles of 64 columns
    src = [torch.randn(rank, w, generator=g).half() for w in widths]
    bufs = [torch.full((w, k + rank), float("nan"), dtype=torch.float16) for w in widths]
    dst = [b[:, k:].t() for b in bufs]
    scales = torch.randn(4, rank, generator=g)
    tables = [torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64) for ts in (dst, src)]
    cols = torch.tensor(widths, dtype=torch.int32)
    ld = torch.tensor([d.stride(1) for d in dst])
    kernel.launch(tables[0], tables[1], scales, torch.tensor(layers), cols, ld, 37, torch.float16, max(widths))
    assert grids[-1] == (3, 2)
    for d, b, s_, layer in zip(dst, bufs, src, layers):
        assert torch.equal(d[:37], (s_[:37].float() * scales[layer, :37, None]).half())
        assert torch.isnan(d[37:]).all() and torch.isnan(b[:, :k]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stack_scales_equal_the_host_formula_bitwise_in_both_regions(dtype: torch.dtype) -> None:
    """A stack's per-row scales computed by one kernel: ``own * w[part]`` in float64, rounded
    once, into the slot's region and its mirror, bit for bit the library formula."""
    kernel = pytest.importorskip("lorahot.kernels.triton_row_scale")
    g = torch.Generator().manual_seed(3)
    own = torch.randn(37, 64, generator=g, dtype=torch.float64)
    own[:, 50:] = 0.0  # rows no part holds
    part = torch.randint(0, 3, (37, 64), generator=g)
    weights = torch.tensor([0.8, -1.7, 1 / 3], dtype=torch.float64)
    out, mirror = (torch.full((37, 64), float("nan"), dtype=dtype) for _ in range(2))
    kernel.stack_scales(own, part, weights, out, mirror)
    want = (own * weights[part]).to(dtype)
    assert torch.equal(out, want) and torch.equal(mirror, want)
    alone = torch.full((37, 64), float("nan"), dtype=dtype)
    kernel.stack_scales(own, part, weights, alone, None)
    assert torch.equal(alone, want)


@pytest.mark.parametrize("m,k,n", [(1, 2048, 256), (5, 300, 130), (40, 256, 512)], ids=lambda v: str(v))
def test_fused_lora_linear_matches_float64_reference(m: int, k: int, n: int) -> None:
    """The fused kernel, split over K or not (``config_for`` picks), with a bias."""
    kernel = pytest.importorskip("lorahot.kernels.triton_lora_linear")
    g = torch.Generator().manual_seed(m)
    rank = 16
    x = torch.randn(m, k, generator=g).half()
    weight = (torch.randn(n, k, generator=g) / k**0.5).half()
    bias = torch.randn(n, generator=g).half()
    a = (torch.randn(rank, k, generator=g) / k**0.5).half()
    bt = torch.randn(rank, n, generator=g).half()
    scale = torch.rand(rank, generator=g)
    out = torch.full((m, n), float("nan"), dtype=torch.float16)
    config = kernel.config_for(m, n, k)
    kernel.launch(x, weight, bias, a, bt, scale, out, config)
    xd = x.double()
    want = xd @ weight.double().T + bias.double() + ((xd @ a.double().T) * scale.double()) @ bt.double()
    torch.testing.assert_close(out.double(), want, rtol=4e-3, atol=4e-3 * float(want.abs().max()))


@pytest.mark.parametrize("workspace", [False, True], ids=["own-zero-fill", "workspace"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("shape", [(1, 2048, 256, 16, 3), (40, 256, 512, 64, 4), (64, 700, 96, 20, 8)], ids=str)
def test_routed_fused_linear_matches_float64_reference(shape: tuple[int, ...], bias: bool, workspace: bool) -> None:
    """Base and each row's slot's LoRA: the segmented shrink, then the fused kernel adding each
    slot's expand, split over K or not (``config_for`` picks), routed per row and per group of
    rows; with the runtime's zeroed workspace, which every call leaves zero."""
    kernel = pytest.importorskip("lorahot.kernels.triton_lora_linear")

    rows, k, n, rank, slots = shape
    x, _, a, bt, s = _operands(rows, k, n, rank, slots, torch.float16, seed=rows)
    g = torch.Generator().manual_seed(2)
    weight = (torch.randn(n, k, generator=g) / k**0.5).half()
    b = torch.randn(n, generator=g).half() if bias else None
    base = x.double() @ weight.double().T + (b.double() if b is not None else 0.0)
    groups = [torch.randint(-1, slots, (rows,), generator=g), torch.full((rows,), slots - 1)]
    if rows % 4 == 0:
        groups.append(torch.tensor([slots - 1, -1, 0, slots - 1]))  # one entry per quarter of the rows
    scratch = make_workspace(rank, torch.device("cpu")) if workspace else None
    for route in groups:
        out = torch.full((rows, n), float("nan"), dtype=torch.float16)
        t = rows // route.shape[0]
        config = kernel.config_for(rows, n, k)
        kernel.launch(x, weight, b, a, bt, s, out, config, routing=(routed.segments(route, slots), route, t, scratch))
        want = _per_row(x, base, a, bt, s, routed.token_route(route, rows))
        torch.testing.assert_close(out.double(), want, rtol=4e-3, atol=4e-3 * float(want.abs().max()))
        assert scratch is None or not scratch.any()


def test_routed_fused_linear_adds_into_the_workspace_and_leaves_it_zero() -> None:
    """With K split the shrink adds into the caller's workspace instead of zeroing its own:
    a workspace that was not zero shows in the result (which is why the runtime's must be), and
    the split-K sum leaves it zero. Where K is not split, the workspace is not touched."""
    kernel = pytest.importorskip("lorahot.kernels.triton_lora_linear")
    rows, k, n, rank, slots = 8, 1024, 64, 16, 2
    x, _, a, bt, s = _operands(rows, k, n, rank, slots, torch.float16, seed=3)
    weight = (torch.randn(n, k, generator=torch.Generator().manual_seed(3)) / k**0.5).half()
    route = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1])
    routing = (routed.segments(route, slots), route, 1)
    config = kernel.config_for(rows, n, k)
    assert config[-1] > 1
    outs = []
    for dirt in (0.0, 1.0):
        scratch = make_workspace(rank, torch.device("cpu"))
        scratch[:rows] = dirt
        out = torch.full((rows, n), float("nan"), dtype=torch.float16)
        kernel.launch(x, weight, None, a, bt, s, out, config, routing=(*routing, scratch))
        assert not scratch.any()
        outs.append(out)
    assert torch.equal(outs[0][route < 0], outs[1][route < 0]) and not torch.equal(outs[0], outs[1])
    scratch = make_workspace(rank, torch.device("cpu")).fill_(2.0)
    unsplit = (*config[:-1], 1)
    kernel.launch(x, weight, None, a, bt, s, out, unsplit, routing=(*routing, scratch))
    torch.testing.assert_close(out.double(), outs[0].double(), rtol=2e-3, atol=2e-3)
    assert (scratch == 2.0).all()


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_segmented_expand_without_a_base_output_leaves_the_gemm_its_accumulator(bias: bool) -> None:
    """Without ``y`` the segmented pair writes each row's update alone (plus the bias), the bias
    or zeros for the rows of no slot, every element of ``out``: a GEMM accumulating onto it then
    gives the routed layer (``routed_linear._accumulated``)."""
    kernels = pytest.importorskip("lorahot.kernels.triton_routed_lora")
    x, _, a, bt, s = _operands(300, 260, 330, 24, 3, torch.float16, seed=9)
    g = torch.Generator().manual_seed(4)
    weight = (torch.randn(330, 260, generator=g) / 260**0.5).half()
    b = torch.randn(330, generator=g).half() if bias else None
    for route in (torch.randint(-1, 3, (300,), generator=g), torch.full((300,), -1), torch.full((30,), 2)):
        out = torch.full((300, 330), float("nan"), dtype=torch.float16)
        kernels.launch(x, None, a, bt, s, route, out, gather=False, segs=routed.segments(route, 3), bias=b)
        assert not out.isnan().any()
        tokens = routed.token_route(route, 300)
        zero = torch.zeros(300, 330, dtype=torch.float64) + (0 if b is None else b.double())
        torch.testing.assert_close(out.double()[tokens < 0], zero[tokens < 0], rtol=0, atol=0)
        got = out.double() + x.double() @ weight.double().T  # the GEMM's beta = 1, in float64
        want = _per_row(x, x.double() @ weight.double().T + zero, a, bt, s, tokens)
        torch.testing.assert_close(got, want, rtol=4e-3, atol=4e-3 * float(want.abs().max()))
    with pytest.raises(ValueError, match="gather kernels add into a base output"):
        kernels.launch(x, None, a, bt, s, route, out, gather=True)
    if b is not None:
        with pytest.raises(ValueError, match="the bias goes with y=None"):
            kernels.launch(x, out, a, bt, s, route, out, gather=False, bias=b)


@pytest.mark.parametrize("programs", [1, 3], ids=["one-program", "three-programs"])
def test_segmented_expand_programs_loop_over_their_share_of_the_outputs(
    programs: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With fewer expand programs than output tiles, each loops over its share (every
    ``programs``-th tile of N): the output equals the per-row reference, every column written."""
    kernels = pytest.importorskip("lorahot.kernels.triton_routed_lora")
    monkeypatch.setattr(kernels, "_EXPAND_PROGRAMS", programs)
    x, y, a, bt, s = _operands(300, 260, 330, 24, 3, torch.float16, seed=5)  # 6 column tiles of 64
    route = torch.randint(-1, 3, (300,), generator=torch.Generator().manual_seed(2))
    out = torch.full_like(y, float("nan"))
    kernels.launch(x, y, a, bt, s, route, out, gather=False, segs=routed.segments(route, 3))
    want = _per_row(x, y, a, bt, s, route)
    assert not out.isnan().any()
    torch.testing.assert_close(out.double(), want, rtol=4e-3, atol=4e-3 * float(want.abs().max()))


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 40),
    k=st.integers(1, 300),
    n=st.integers(1, 130),
    rank=st.integers(1, 32),
    slots=st.integers(1, 5),
    per_group=st.sampled_from([1, 2, 4]),
    seed=st.integers(0, 2**16),
)
def test_any_routing_of_any_shape_matches_the_per_row_reference(
    rows: int, k: int, n: int, rank: int, slots: int, per_group: int, seed: int
) -> None:
    """The fused routed kernel (with and without the runtime's workspace) and the segmented pair
    after it, on random shapes and routings (one entry per row or per group of rows, -1 included)."""
    fused = pytest.importorskip("lorahot.kernels.triton_lora_linear")
    kernels = pytest.importorskip("lorahot.kernels.triton_routed_lora")
    rows *= per_group
    x, y, a, bt, s = _operands(rows, k, n, rank, slots, torch.float16, seed=seed)
    weight = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5).half()
    route = torch.randint(-1, slots, (rows // per_group,), generator=torch.Generator().manual_seed(seed + 1))
    segs, tokens = routed.segments(route, slots), routed.token_route(route, rows)
    want = _per_row(x, x.double() @ weight.double().T, a, bt, s, tokens)
    scratch = make_workspace(rank, torch.device("cpu"))
    for kept in (None, scratch):
        out = torch.full((rows, n), float("nan"), dtype=torch.float16)
        config = fused.config_for(rows, n, k)
        fused.launch(x, weight, None, a, bt, s, out, config, routing=(segs, route, per_group, kept))
        torch.testing.assert_close(out.double(), want, rtol=4e-3, atol=4e-3 * float(want.abs().max()) + 1e-3)
    assert not scratch.any()
    out = torch.full_like(y, float("nan"))
    kernels.launch(x, y, a, bt, s, route, out, gather=False, segs=segs)
    want = _per_row(x, y, a, bt, s, tokens)
    torch.testing.assert_close(out.double(), want, rtol=4e-3, atol=4e-3 * float(want.abs().max()) + 1e-3)


@pytest.mark.parametrize("per_row", [False, True], ids=["one-adapter", "routed"])
def test_fused_kernels_read_a_strided_weight_and_bias_right(per_row: bool) -> None:
    """A bias that is a strided view (every other element of a packed tensor) and a weight
    stored transposed give the result of their contiguous copies: the kernel reads the bias and
    each weight row as contiguous runs."""
    kernel = pytest.importorskip("lorahot.kernels.triton_lora_linear")
    g = torch.Generator().manual_seed(11)
    m, k, n, rank, slots = 5, 64, 48, 8, 3
    x = torch.randn(m, k, generator=g).half()
    weight = (torch.randn(n, k, generator=g) / k**0.5).half()
    packed = torch.randn(2 * n, generator=g).half()
    bias = packed[::2]
    assert bias.stride(0) == 2
    shape = (slots, rank) if per_row else (rank,)
    a = (torch.randn(*shape, k, generator=g) / k**0.5).half()
    bt = torch.randn(*shape, n, generator=g).half()
    scale = torch.rand(*shape, generator=g)
    outs = []
    strided_weight = weight.t().contiguous().t()
    assert strided_weight.stride(-1) != 1
    for w, b in ((strided_weight, bias), (weight, bias.contiguous())):
        out = torch.full((m, n), float("nan"), dtype=torch.float16)
        config = kernel.config_for(m, n, k)
        if per_row:
            route = torch.tensor([0, 2, -1, 1, 0])
            segs = routed.segments(route, slots)
            kernel.launch(x, w, b, a, bt, scale, out, config, routing=(segs, route, 1, None))
        else:
            kernel.launch(x, w, b, a, bt, scale, out, config)
        outs.append(out)
    assert torch.isfinite(outs[0]).all() and torch.equal(outs[0], outs[1])


def test_the_fused_operator_dispatches_compiles_and_refuses_gradients() -> None:
    """``lorahot::lora_linear`` as the layers call it: through the dispatcher, inside a compiled
    graph (fullgraph: one opaque node), and refused where a gradient would flow through it."""
    pytest.importorskip("lorahot.kernels.triton_lora_linear")
    g = torch.Generator().manual_seed(5)
    m, k, n, rank = 6, 96, 40, 8
    x = torch.randn(2, m // 2, k, generator=g).half()
    weight = (torch.randn(n, k, generator=g) / k**0.5).half()
    bias = torch.randn(n, generator=g).half()
    a = (torch.randn(rank, k, generator=g) / k**0.5).half()
    bt = torch.randn(rank, n, generator=g).half()
    scale = torch.rand(rank, generator=g)
    xd = x.double()
    want = xd @ weight.double().T + bias.double() + ((xd @ a.double().T) * scale.double()) @ bt.double()
    got = torch.ops.lorahot.lora_linear(x, weight, bias, a, bt, scale)
    assert got.shape == (2, m // 2, n)
    torch.testing.assert_close(got.double(), want, rtol=4e-3, atol=4e-3 * float(want.abs().max()))
    compiled = torch.compile(lambda *t: torch.ops.lorahot.lora_linear(*t), backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, weight, bias, a, bt, scale), got)
    with pytest.raises(RuntimeError, match="lorahot::lora_linear has no backward"):
        torch.ops.lorahot.lora_linear(x, weight.requires_grad_(), bias, a, bt, scale)
    with torch.no_grad():
        assert torch.equal(torch.ops.lorahot.lora_linear(x, weight, bias, a, bt, scale), got)


@pytest.mark.parametrize("shape", [(40, 256, (96, 64), 16, 4), (64, 512, (64, 32, 48), 64, 8)], ids=str)
def test_stacked_shrink_feeds_each_layers_fused_routed_linear(shape: tuple) -> None:
    """The segmented shrink over several layers' stacked A (``routed_linear.routed_shrink``'s
    kernel), each layer's fused kernel reading its columns of it (``h``: rows the stacked
    rank's padding apart), against the float64 reference; no workspace is touched."""
    kernels = pytest.importorskip("lorahot.kernels.triton_routed_lora")
    kernel = pytest.importorskip("lorahot.kernels.triton_lora_linear")
    from tests.unit.kernels.test_routed_linear import _stacked

    rows, k, ns, rank, slots = shape
    x, a_all, s_all, layers = _stacked(rows, k, list(ns), rank, slots, torch.float16, seed=rows)
    route = torch.randint(-1, slots, (rows,), generator=torch.Generator().manual_seed(4))
    segs = routed.segments(route, slots)
    h = kernels.shrink(x, a_all, s_all, segs, 1)[0]
    assert h.shape == (rows, kernels.rank_pad(len(ns) * rank))
    for j, (a, bt, s) in enumerate(layers):
        n = bt.shape[-1]
        weight = (torch.randn(n, k, generator=torch.Generator().manual_seed(j)) / k**0.5).half()
        out = torch.full((rows, n), float("nan"), dtype=torch.float16)
        config = kernel.config_for(rows, n, k)
        part = h[:, j * rank : (j + 1) * rank]
        kernel.launch(x, weight, None, a, bt, s, out, config, routing=(segs, route, 1, None), h=part)
        want = _per_row(x, x.double() @ weight.double().T, a, bt, s, route)
        torch.testing.assert_close(out.double(), want, rtol=4e-3, atol=4e-3 * float(want.abs().max()))


def test_word_sums_equal_the_library_sums_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    """Row and column sums of views of assorted shapes (one row, one column, rows past a tile
    and an item, a column slice off alignment, no columns, sums that wrap) in one launch, bit
    for bit ``torch.sum(..., dtype=torch.int32)``, and nothing written between them; the
    aligned variant on views that allow it."""
    kernel = pytest.importorskip("lorahot.kernels.triton_word_sums")
    from lorahot.kernels import word_sums
    from tests.unit.kernels.test_word_sums import assert_sums, word_views

    monkeypatch.setattr(word_sums, "_kernel", lambda: kernel)
    views, rows_at, cols_at, out = word_views("cpu")
    summer = word_sums.WordSums(views, rows_at, cols_at)
    assert not summer.aligned
    summer(out)
    assert_sums(views, rows_at, cols_at, out)
    g = torch.Generator().manual_seed(1)
    aligned = [torch.randint(-(2**31), 2**31, s, generator=g, dtype=torch.int64).int() for s in [(70, 520), (3, 8)]]
    out = torch.zeros(70 + 520 + 3 + 8, dtype=torch.int32)
    summer = word_sums.WordSums(aligned, [0, 590], [70, 593])
    assert summer.aligned
    summer(out)
    assert torch.equal(out[:70], written_probes.sums(aligned[0], 1))
    assert torch.equal(out[70:590], written_probes.sums(aligned[0], 0))
    assert torch.equal(out[590:593], written_probes.sums(aligned[1], 1))
    assert torch.equal(out[593:], written_probes.sums(aligned[1], 0))


def test_word_sums_reach_rows_past_2_to_the_31_words(monkeypatch: pytest.MonkeyPatch) -> None:
    """A view whose second row lies 2**31 + 64 words (8.6 GB) after its first, in an allocation
    of which only those rows are touched, is summed from the right memory: the offsets within
    an item are int64 (an int32 product of row and stride wraps to another address)."""
    kernel = pytest.importorskip("lorahot.kernels.triton_word_sums")
    from lorahot.kernels import word_sums

    monkeypatch.setattr(word_sums, "_kernel", lambda: kernel)
    ld = 2**31 + 64
    big = torch.empty(ld + 128, dtype=torch.int32)  # untouched pages take no memory
    w = big.as_strided((2, 100), (ld, 1))
    w.copy_(torch.randint(-(2**31), 2**31, (2, 100), generator=torch.Generator().manual_seed(2)).int())
    out = torch.zeros(102, dtype=torch.int32)
    word_sums.WordSums([w], [0], [2])(out)
    assert torch.equal(out[:2], written_probes.sums(w, 1)) and torch.equal(out[2:], written_probes.sums(w, 0))


def test_merged_probes_sum_with_one_launch_as_the_library_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Merged mode's record and check through the one-launch sums (as on CUDA with Triton),
    on the CPU: see :func:`tests.unit.runtime.test_written_probes.check_one_launch_sums`."""
    kernel = pytest.importorskip("lorahot.kernels.triton_word_sums")
    from lorahot.kernels import word_sums
    from tests.unit.runtime.test_written_probes import check_one_launch_sums

    monkeypatch.setattr(word_sums, "_kernel", lambda: kernel)
    monkeypatch.setattr(word_sums, "available", lambda device: True)
    check_one_launch_sums("cpu", monkeypatch)


def _far_slots(rank: int, k: int, n: int, slots: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slot views ``a [slots, R, k]``, ``bt [slots, R, n]``, ``s [slots, R]`` whose regions lie
    2**30 + 64 elements apart, as in an arena of a large model's layers (a Llama-8B's A at rank
    64 is 80M elements a region: its 27th slot lies 2**31 elements past the first). Each view
    starts 2**31 elements into its allocation, so an offset wrapped by int32 arithmetic still
    lands inside it (on untouched zeros) rather than outside the process's memory."""
    g = torch.Generator().manual_seed(seed)
    step, start = 2**30 + 64, 2**31
    views = []
    for cols in (k, n):
        # untouched pages take no memory
        big = torch.empty(start + (slots - 1) * step + rank * cols, dtype=torch.float16)
        view = big.as_strided((slots, rank, cols), (step, cols, 1), start)
        for i in range(slots):
            view[i].copy_(torch.randn(rank, cols, generator=g) / (k**0.5 if cols == k else 1.0))
        views.append(view)
    s = torch.rand(slots, rank, generator=g)
    return views[0], views[1], s


@pytest.mark.parametrize("path", ["gather", "segmented", "fused"])
def test_routed_kernels_read_slots_past_2_to_the_31_elements(path: str) -> None:
    """Every routed kernel reads a slot's A and B from its own region, 2**31 + 128 elements
    past the first slot's (an int32 product of slot and slot stride wraps to another address),
    on rows of every slot, of none, and of the far slot alone."""
    fused = pytest.importorskip("lorahot.kernels.triton_lora_linear")
    kernels = pytest.importorskip("lorahot.kernels.triton_routed_lora")
    rows, k, n, rank, slots = 24, 64, 48, 16, 3
    a, bt, s = _far_slots(rank, k, n, slots, seed=7)
    g = torch.Generator().manual_seed(8)
    x = torch.randn(rows, k, generator=g).half()
    weight = (torch.randn(n, k, generator=g) / k**0.5).half()
    y = (x.double() @ weight.double().T).half()
    for route in (torch.randint(-1, slots, (rows,), generator=g), torch.full((rows,), slots - 1)):
        segs = routed.segments(route, slots)
        out = torch.full((rows, n), float("nan"), dtype=torch.float16)
        if path == "fused":
            routing = (segs, route, 1, None)
            fused.launch(x, weight, None, a, bt, s, out, fused.config_for(rows, n, k), routing=routing)
        else:
            kernels.launch(x, y, a, bt, s, route, out, gather=path == "gather", segs=segs)
        want = _per_row(x, y.double(), a, bt, s, route)
        torch.testing.assert_close(out.double(), want, rtol=4e-3, atol=4e-3 * float(want.abs().max()))


@pytest.mark.parametrize(("k", "n"), [(0, 40), (1024, 0), (0, 0)], ids=["no-inputs", "no-outputs", "neither"])
def test_fused_kernels_take_a_linear_with_no_inputs_or_no_outputs(k: int, n: int) -> None:
    """A shard's ``in`` or ``out`` may be 0: the fused operator and the routed fused kernel give
    each row the bias alone (no inputs) or nothing (no outputs), and leave the runtime's
    workspace zero (no shrink added into it that no split-K sum would clear)."""
    kernel = pytest.importorskip("lorahot.kernels.triton_lora_linear")
    rows, rank, slots = 8, 16, 2
    x, _, a, bt, s = _operands(rows, k, n, rank, slots, torch.float16, seed=4)
    weight = torch.randn(n, k, generator=torch.Generator().manual_seed(4)).half()
    bias = torch.randn(n, generator=torch.Generator().manual_seed(5)).half()
    got = torch.ops.lorahot.lora_linear(x.view(2, 4, k), weight, bias, a[0], bt[0], s[0])
    assert got.shape == (2, 4, n) and torch.equal(got.view(rows, n), bias.expand(rows, n))
    route = torch.tensor([0, 1, -1, 1, 0, 0, 1, -1])
    scratch = make_workspace(rank, torch.device("cpu"))
    out = torch.full((rows, n), float("nan"), dtype=torch.float16)
    routing = (routed.segments(route, slots), route, 1, scratch)
    kernel.launch(x, weight, bias, a, bt, s, out, kernel.config_for(rows, n, k), routing=routing)
    assert torch.equal(out, bias.expand(rows, n)) and not scratch.any()


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=st.integers(1, 300),
    k=st.integers(1, 700),
    n=st.integers(1, 130),
    rank=st.integers(1, 40),
    bias=st.booleans(),
    pads=st.tuples(st.integers(0, 9), st.integers(0, 9), st.integers(0, 9)),
    seed=st.integers(0, 2**16),
)
def test_the_fused_kernel_on_any_shape_and_row_strides_matches_the_float64_reference(
    rows: int, k: int, n: int, rank: int, bias: bool, pads: tuple[int, int, int], seed: int
) -> None:
    """``run_into`` as the wide layers call it: ``x``, the weight and ``out`` each a column slice
    of a wider buffer (rows ``pad`` elements longer than their columns), any K (split or not,
    ``config_for`` picks), N and rank (padded to a power of two); rank padding contributes
    nothing and every element of ``out`` beside the slice is left as it was."""
    kernel = pytest.importorskip("lorahot.kernels.triton_lora_linear")
    g = torch.Generator().manual_seed(seed)
    px, pw, po = pads
    x = torch.randn(rows, k + px, generator=g).half()[:, :k]
    weight = (torch.randn(n, k + pw, generator=g) / k**0.5).half()[:, :k]
    b = torch.randn(n, generator=g).half() if bias else None
    a = (torch.randn(rank, k, generator=g) / k**0.5).half()
    bt = torch.randn(rank, n, generator=g).half()
    scale = torch.rand(rank, generator=g)
    buf = torch.full((rows, n + po), float("nan"), dtype=torch.float16)
    kernel.run_into(x, weight, b, a, bt, scale, buf[:, :n])
    xd = x.double()
    want = xd @ weight.double().T + ((xd @ a.double().T) * scale.double()) @ bt.double()
    want += 0.0 if b is None else b.double()
    torch.testing.assert_close(buf[:, :n].double(), want, rtol=4e-3, atol=4e-3 * float(want.abs().max()) + 1e-3)
    assert buf[:, n:].isnan().all()


def test_the_fused_kernels_grid_holds_the_widest_layer_it_takes() -> None:
    """At every row count, the fused kernel's tiles for the widest layer the kernels take
    (``lora_linear.MAX_OUT`` outputs) and its K splits stay within CUDA's 65535 programs along
    the grid's second and third dimensions, as do the routed gather expand's (128 columns a
    program)."""
    kernel = pytest.importorskip("lorahot.kernels.triton_lora_linear")
    from lorahot.kernels import lora_linear

    n = lora_linear.MAX_OUT
    for m in range(1, 300):
        for k in (1, 4096, 65536):
            _, bn, _, _, _, split = kernel.config_for(m, n, k)
            assert -(-n // bn) <= 65535 and split <= 65535, (m, k)
    assert -(-n // 128) <= 65535


def _far_rows(t: torch.Tensor) -> torch.Tensor:
    """``t [rows, cols]`` copied into a view whose rows lie 2**30 + 64 elements apart, starting
    2**31 elements into its allocation (see :func:`_far_slots`): row 2 is 2**31 + 128 elements
    past row 0, as in a prefill of 256k tokens by 8192 features."""
    step, start = 2**30 + 64, 2**31
    big = torch.empty(start + (t.shape[0] - 1) * step + t.shape[1], dtype=t.dtype)  # untouched pages take no memory
    view = big.as_strided(tuple(t.shape), (step, 1), start)
    view.copy_(t)
    return view


@pytest.mark.parametrize("path", ["fused", "fused-routed", "gather", "segmented"])
def test_kernels_reach_rows_past_2_to_the_31_elements(path: str) -> None:
    """Inputs, base outputs, weights and outputs whose rows lie 2**31 + 128 elements apart are
    read and written at the right addresses: every row offset is int64 (an int32 product of
    row and stride wraps to another address)."""
    fused = pytest.importorskip("lorahot.kernels.triton_lora_linear")
    kernels = pytest.importorskip("lorahot.kernels.triton_routed_lora")
    rows, k, n, rank, slots = 3, 64, 3, 16, 2
    x0, y0, a, bt, s = _operands(rows, k, n, rank, slots, torch.float16, seed=6)
    w0 = (torch.randn(n, k, generator=torch.Generator().manual_seed(6)) / k**0.5).half()
    x, y, weight = _far_rows(x0), _far_rows(y0), _far_rows(w0)
    out = _far_rows(torch.full((rows, n), float("nan"), dtype=torch.float16))
    route = torch.tensor([1, 0, 1])
    if path == "fused":
        fused.launch(x, weight, None, a[1], bt[1], s[1], out, fused.config_for(rows, n, k))
        base, route = x0.double() @ w0.double().T, torch.ones(rows, dtype=torch.int64)
    elif path == "fused-routed":
        routing = (routed.segments(route, slots), route, 1, None)
        fused.launch(x, weight, None, a, bt, s, out, fused.config_for(rows, n, k), routing=routing)
        base = x0.double() @ w0.double().T
    else:
        kernels.launch(x, y, a, bt, s, route, out, gather=path == "gather", segs=routed.segments(route, slots))
        base = y0.double()
    want = _per_row(x0, base, a, bt, s, route)
    torch.testing.assert_close(out.double(), want, rtol=4e-3, atol=4e-3 * float(want.abs().max()))


#: (|x @ A.T| wanted, s): the shrink itself past float16's 65504 with s = 1, and its scaled copy
#: past it with |x @ A.T| ~ 3e3 and s = alpha / r = 32
FLOAT16_RANGE = {"x@A.T": (1.5e5, 1.0), "s*(x@A.T)": (5e3, 32.0)}


def _past_float16(
    rows: int, k: int, n: int, slots: int, size: str, seed: int, boost: float = 1.0
) -> tuple[torch.Tensor, ...]:
    """float16 ``x [rows, k]``, a base ``weight [n, k]`` and slot views ``a [slots, 16, k]``,
    ``bt [slots, 16, n]``, ``s [slots, 16]`` whose every factor fits float16 while the scaled
    shrink ``s * (x @ A.T)`` passes 65504 (:data:`FLOAT16_RANGE`, its shrink ``boost`` times
    larger); B is small, so the update and the output stay well inside float16's range."""
    shrink, scale = FLOAT16_RANGE[size]
    x, _, a, bt, s = _operands(rows, k, n, 16, slots, torch.float16, seed=seed)
    x = (x.float() * 10).half()
    a = (a.float() * boost * shrink / (10 * 4)).half()  # |x @ A.T| ~ 10 * |A row| ~ shrink
    bt = (bt.float() * 1e-4).half()
    s = torch.full_like(s, scale)
    weight = (torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5).half()
    return x, weight, a, bt, s


def _assert_float16_output(out: torch.Tensor, want: torch.Tensor, shrink: torch.Tensor) -> None:
    """``out`` finite and within float16's rounding of the float64 ``want`` (4 eps of its
    largest value), the case being what it says: some scaled shrink past 65504."""
    assert shrink.abs().max() > 65504 and want.abs().max() < 5000
    assert torch.isfinite(out).all(), f"{(~torch.isfinite(out)).sum().item()} of {out.numel()} outputs not finite"
    err = (out.double() - want).abs().max().item()
    assert err <= 4 * torch.finfo(torch.float16).eps * want.abs().max().item(), err


@pytest.mark.parametrize("size", list(FLOAT16_RANGE))
# K split 16 ways at one row: each split's partial shrink must itself pass 65504 (boost)
@pytest.mark.parametrize("shape", [(5, 256, 130, 1.0), (1, 2048, 96, 8.0)], ids=["unsplit", "split-k"])
def test_fused_kernel_keeps_a_float16_shrink_past_65504_in_float32(
    shape: tuple[int, int, int, float], size: str
) -> None:
    """float16 weights: the fused kernel's scaled shrink ``s * (x @ A.T)`` past float16's range
    stays float32 through the expand (``H32``), so the output matches the float64 reference
    where rounding it to float16 gave inf; K split or not (``config_for`` picks)."""
    kernel = pytest.importorskip("lorahot.kernels.triton_lora_linear")
    rows, k, n, boost = shape
    x, weight, a, bt, s = _past_float16(rows, k, n, 1, size, seed=rows, boost=boost)
    out = torch.full((rows, n), float("nan"), dtype=torch.float16)
    kernel.launch(x, weight, None, a[0], bt[0], s[0], out, kernel.config_for(rows, n, k))
    want = _per_row(x, x.double() @ weight.double().T, a, bt, s, torch.zeros(rows, dtype=torch.int64))
    _assert_float16_output(out, want, (x.double() @ a[0].double().T) * s[0].double())


@pytest.mark.parametrize("size", list(FLOAT16_RANGE))
@pytest.mark.parametrize("path", ["fused-routed", "segmented", "segmented-no-y", "gather"])
def test_routed_kernels_keep_a_float16_shrink_past_65504_in_float32(path: str, size: str) -> None:
    """float16 weights, each row its own slot: the routed fused kernel's slot expands and the
    segmented expand (with a base output, and without one for a GEMM to accumulate onto) keep
    the scaled shrink in float32 (``H32``), as the gather kernels always did; the output
    matches the float64 reference row by row, where rounding the shrink to float16 gave inf."""
    fused = pytest.importorskip("lorahot.kernels.triton_lora_linear")
    kernels = pytest.importorskip("lorahot.kernels.triton_routed_lora")
    rows, k, n, slots = 40, 256, 130, 3
    x, weight, a, bt, s = _past_float16(rows, k, n, slots, size, seed=7)
    route = torch.randint(-1, slots, (rows,), generator=torch.Generator().manual_seed(7))
    route[:slots] = torch.arange(slots)  # every slot has rows
    y = (x.double() @ weight.double().T).half()
    segs = routed.segments(route, slots)
    out = torch.full((rows, n), float("nan"), dtype=torch.float16)
    if path == "fused-routed":
        fused.launch(x, weight, None, a, bt, s, out, fused.config_for(rows, n, k), routing=(segs, route, 1, None))
        base = x.double() @ weight.double().T
    else:
        kernels.launch(
            x, None if path == "segmented-no-y" else y, a, bt, s, route, out, gather=path == "gather", segs=segs
        )
        base = torch.zeros(rows, n, dtype=torch.float64) if path == "segmented-no-y" else y.double()
    want = _per_row(x, base, a, bt, s, route)
    shrink = torch.stack(
        [(x[m].double() @ a[max(t, 0)].double().T) * s[max(t, 0)].double() for m, t in enumerate(route.tolist())]
    )
    _assert_float16_output(out, want, shrink[route >= 0])
