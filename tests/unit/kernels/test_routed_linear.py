"""The routed fused linear op (lorahot.kernels.routed_linear): the base linear plus each row's
own slot's update, the library formula on the CPU, one opaque node in a compiled graph, and on
the GPU the segmented shrink then the fused kernel, against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from lorahot.kernels import routed_linear
from lorahot.kernels import routed_lora as routed
from tests.unit.kernels.test_routed_lora import _operands, _per_row


def _weights(k: int, n: int, dtype: torch.dtype, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return (torch.randn(n, k, generator=g) / k**0.5).to(device, dtype), torch.randn(n, generator=g).to(device, dtype)


def test_op_is_the_base_linear_plus_each_rows_update() -> None:
    x, _, a, bt, s = _operands(6, 8, 5, 4, 3, torch.float64)
    weight, bias = _weights(8, 5, torch.float64)
    route = torch.tensor([2, -1, 0])  # one entry per pair of rows
    got = routed_linear.routed_lora_linear(x.view(3, 2, 8), weight, bias, a, bt, s, route)
    base = x @ weight.T + bias
    want = _per_row(x, base, a, bt, s, routed.token_route(route, 6))
    torch.testing.assert_close(got.view(6, 5), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.view(6, 5)[2:4], base[2:4], rtol=0, atol=0)  # -1 rows: the base output


def test_op_refuses_segments_of_another_routing() -> None:
    x, _, a, bt, s = _operands(4, 8, 5, 4, 2, torch.float32)
    weight, bias = _weights(8, 5, torch.float32)
    route = torch.tensor([1, 0, -1, 1])
    with pytest.raises(ValueError, match="segs of 9 entries"):
        routed_linear.routed_lora_linear(x, weight, bias, a, bt, s, route, routed.segments(route[:3], 2))


@pytest.mark.parametrize(("k", "n"), [(0, 5), (8, 0)], ids=["no-inputs", "no-outputs"])
def test_op_takes_a_linear_with_no_inputs_or_no_outputs(k: int, n: int) -> None:
    """A shard's ``in`` or ``out`` may be 0: each row is the bias alone (no inputs) or empty (no
    outputs), in its input's leading shape; the shrink of no inputs is zero."""
    x, _, a, bt, s = _operands(6, k, n, 4, 3, torch.float64)
    weight, bias = _weights(k, n, torch.float64)
    route = torch.tensor([2, -1, 0])
    got = routed_linear.routed_lora_linear(x.view(3, 2, k), weight, bias, a, bt, s, route)
    assert got.shape == (3, 2, n) and torch.equal(got.view(6, n), bias.expand(6, n))  # no inputs: no update either
    h = routed_linear.routed_shrink(x.view(3, 2, k), a, s, route)
    assert h.shape == (6, 16) and (k > 0 or not h.any())
    given = routed_linear.routed_lora_linear(x.view(3, 2, k), weight, bias, a, bt, s, route, h=h)
    assert torch.equal(given, got)
    torch.library.opcheck(
        torch.ops.lorahot.routed_shrink.default, (x.view(3, 2, k), a, s, route), test_utils=("test_faketensor",)
    )


def test_compiled_op_is_one_opaque_node() -> None:
    x, _, a, bt, s = _operands(4, 8, 5, 4, 2, torch.float32)
    weight, bias = _weights(8, 5, torch.float32)
    route = torch.tensor([1, 0, -1, 1])
    nodes = []

    def backend(gm: torch.fx.GraphModule, inputs: list) -> object:
        nodes.extend(n.target for n in gm.graph.nodes if n.op == "call_function")
        return gm

    fn = torch.compile(routed_linear.routed_lora_linear, backend=backend, fullgraph=True)
    out = fn(x, weight, bias, a, bt, s, route, routed.segments(route, 2))
    assert nodes == [torch.ops.lorahot.routed_lora_linear]
    want = _per_row(x, x.double() @ weight.double().T + bias.double(), a, bt, s, route)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 2048, 256, 64, 8), (64, 2048, 2048, 64, 8), (100, 1000, 700, 20, 4)], ids=str)
def test_gpu_fused_routed_linear_matches_float64_reference(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """The fused routed path (the segmented shrink, then the fused kernel), with the runtime's
    workspace (left zero), against the per-row float64 reference."""
    rows, k, n, rank, slots = shape
    x, _, a, bt, s = _operands(rows, k, n, rank, slots, dtype, "cuda", seed=rows)
    weight, bias = _weights(k, n, dtype, "cuda")
    base = x.double() @ weight.double().T + bias.double()
    g = torch.Generator().manual_seed(1)
    for route in (torch.randint(-1, slots, (rows,), generator=g), torch.full((rows,), slots - 1)):
        route = route.cuda()
        for segs in (None, routed.segments(route, slots)):
            space = routed_linear.workspace(rank, torch.device("cuda"))
            got = routed_linear.routed_lora_linear(x, weight, bias, a, bt, s, route, segs, workspace=space)
            want = _per_row(x, base, a, bt, s, route)
            tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
            torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * float(want.abs().max()))
            assert not space.any()


def test_workspace_holds_every_row_count_the_fused_path_takes() -> None:
    """The runtime's workspace covers the largest input the routed fused path runs on (so no
    such call falls back to a zero fill of its own), the rank padded as the kernels pad it: one
    row per input row, where the segmented shrink adds its shares of K."""
    from lorahot.kernels import lora_linear as fused

    limit = max(r for r in range(1, 1024) if fused.routed_worth_it(r, 256, wide=True))
    assert limit <= routed_linear.WORKSPACE_ROWS
    for rank, pad in ((1, 16), (16, 16), (17, 32), (64, 64), (100, 128)):
        space = routed_linear.workspace(rank, torch.device("cpu"))
        assert space.shape == (routed_linear.WORKSPACE_ROWS, pad) and space.dtype == torch.float32
        assert not space.any()


def _count_accumulated(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at each call of ``routed_linear._accumulated`` (which still runs)."""
    calls: list[int] = []
    accumulated = routed_linear._accumulated

    def counted(*args: object) -> torch.Tensor:
        calls.append(1)
        return accumulated(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(routed_linear, "_accumulated", counted)
    return calls


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("per_entry", [1, 256], ids=["per-row", "per-sequence"])
def test_gpu_accumulated_routed_linear_matches_float64_reference(
    per_entry: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Above the fused path's rows, with ACCUMULATE on: the slots' updates (and the bias)
    written first, the base GEMM accumulated onto them, against the per-row float64 reference
    and against the default path (the base GEMM, then the segmented pair); its negative
    control, ACCUMULATE off, takes the default path."""
    rows, k, n, rank, slots = 2048, 1024, 768, 64, 8
    x, _, a, bt, s = _operands(rows, k, n, rank, slots, dtype, "cuda", seed=7)
    weight, bias = _weights(k, n, dtype, "cuda")
    base = x.double() @ weight.double().T + bias.double()
    g = torch.Generator().manual_seed(3)
    route = torch.randint(-1, slots, (rows // per_entry,), generator=g).cuda()
    segs = routed.segments(route, slots)
    want = _per_row(x, base, a, bt, s, routed.token_route(route, rows))
    calls = _count_accumulated(monkeypatch)
    outs = {}
    for on in (False, True):
        monkeypatch.setattr(routed_linear, "ACCUMULATE", on)
        outs[on] = routed_linear.routed_lora_linear(x, weight, bias, a, bt, s, route, segs, sized=True)
        assert len(calls) == int(on)
        tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
        torch.testing.assert_close(outs[on].double(), want, rtol=tol, atol=tol * float(want.abs().max()))
    err = {on: float((outs[on].double() - want).norm() / want.norm()) for on in outs}
    assert err[True] <= 1.5 * err[False] + 1e-4, err  # as close to the reference as the default path
    none = routed.token_route(route, rows) < 0  # rows of no slot: the base output, up to cuBLAS's algorithm
    torch.testing.assert_close(outs[True][none], outs[False][none], rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
def test_gpu_a_routed_layer_takes_the_accumulated_form_where_it_is_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through a runtime (eager, static shapes): with ACCUMULATE on, a routed layer on 2048 rows
    runs the accumulated form once per call and computes what it computes with it off."""
    import lorahot

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 768)).to("cuda", torch.bfloat16)
    runtime = lorahot.inject(model, ["0"], max_rank=16, slots=4)
    g = torch.Generator().manual_seed(2)
    for slot, rank in enumerate((4, 8, 16, 8)):
        tensors = {"0.lora_A.weight": torch.randn(rank, 512, generator=g) / 512**0.5}
        tensors["0.lora_B.weight"] = torch.randn(768, rank, generator=g) / rank**0.5
        runtime.load(lorahot.read_adapter(tensors, config={"r": rank, "lora_alpha": 2 * rank}), slot=slot)
    runtime.activate([0, 1, 2, 3, -1, 0, 1, 2])  # 8 sequences of 256 tokens
    x = torch.randn(8, 256, 512, device="cuda", dtype=torch.bfloat16)
    calls = _count_accumulated(monkeypatch)
    with torch.no_grad():
        off = model(x)
        assert not calls
        monkeypatch.setattr(routed_linear, "ACCUMULATE", True)
        on = model(x)
    assert len(calls) == 1
    assert float((on.double() - off.double()).norm() / off.double().norm()) < 1e-2


def _stacked(rows: int, k: int, ns: list[int], rank: int, slots: int, dtype: torch.dtype, seed: int = 0) -> tuple:
    """``x`` and several layers' slot views as an arena keeps them: their A rows and scales next
    to each other in every slot's region. Returns ``(x, a_all, s_all, [(a, bt, s) per layer])``."""
    g = torch.Generator().manual_seed(seed)
    n_layers = len(ns)
    x = torch.randn(rows, k, generator=g).to(dtype)
    big_a = (torch.randn(slots + 1, n_layers * rank * k + 64, generator=g) / k**0.5).to(dtype)
    big_s = torch.rand(slots + 1, n_layers * rank + 8, generator=g) + 0.5
    a_all = big_a.as_strided((slots, n_layers * rank, k), (big_a.stride(0), k, 1), 64)
    s_all = big_s.as_strided((slots, n_layers * rank), (big_s.stride(0), 1), 8)
    if dtype == torch.float64:
        s_all = s_all.double()
    layers = []
    for j, n in enumerate(ns):
        bt = torch.randn(slots, rank, n, generator=g).to(dtype)
        layers.append((a_all[:, j * rank : (j + 1) * rank], bt, s_all[:, j * rank : (j + 1) * rank]))
    return x, a_all, s_all, layers


def test_a_stacked_shrink_gives_each_layer_what_its_own_would() -> None:
    """One routed shrink over two layers' stacked A: each layer given its columns as ``h``
    equals the layer computing its own shrink, and the per-row float64 reference (-1 rows the
    base output, bitwise)."""
    x, a_all, s_all, layers = _stacked(6, 8, [5, 3], 4, 3, torch.float64)
    route = torch.tensor([2, -1, 0, 1, 0, -1])
    h = routed_linear.routed_shrink(x, a_all, s_all, route)
    assert h.shape == (6, 16) and h.dtype == torch.float64
    for j, (a, bt, s) in enumerate(layers):
        weight, bias = _weights(8, bt.shape[-1], torch.float64)
        got = routed_linear.routed_lora_linear(x, weight, bias, a, bt, s, route, h=h[:, j * 4 : (j + 1) * 4])
        alone = routed_linear.routed_lora_linear(x, weight, bias, a, bt, s, route)
        torch.testing.assert_close(got, alone, rtol=1e-12, atol=1e-12)
        base = x @ weight.T + bias
        torch.testing.assert_close(got, _per_row(x, base, a, bt, s, route), rtol=1e-12, atol=1e-12)
        assert torch.equal(got[route < 0], base[route < 0])


def test_a_given_shrink_is_read_only_on_rows_of_a_slot_and_must_fit_the_rows() -> None:
    """The kernels leave the stacked shrink's rows of no slot unset: whatever they hold (NaN
    here) does not reach the output. An ``h`` with too few rows or ranks is refused."""
    x, a_all, s_all, layers = _stacked(4, 8, [5], 4, 2, torch.float64)
    a, bt, s = layers[0]
    weight, bias = _weights(8, 5, torch.float64)
    route = torch.tensor([1, -1, 0, -1])
    h = routed_linear.routed_shrink(x, a_all, s_all, route)
    h[route < 0] = float("nan")
    got = routed_linear.routed_lora_linear(x, weight, bias, a, bt, s, route, h=h)
    torch.testing.assert_close(got, routed_linear.routed_lora_linear(x, weight, bias, a, bt, s, route))
    for bad in (h[:3], h[:, :3]):
        with pytest.raises(ValueError, match="does not give 4 rows"):
            routed_linear.routed_lora_linear(x, weight, bias, a, bt, s, route, h=bad)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 64, 100])
def test_gpu_stacked_shrink_feeds_the_fused_routed_linear(rows: int) -> None:
    """On the GPU: the segmented shrink over three layers' stacked A (rank 64: 192 columns,
    padded to 256), each layer's fused kernel reading its columns, against the float64
    reference."""
    x, a_all, s_all, layers = _stacked(rows, 2048, [2048, 256, 256], 64, 8, torch.bfloat16, seed=rows)
    x, a_all, s_all = x.cuda(), a_all.cuda(), s_all.cuda()
    route = torch.tensor([i % 9 - 1 for i in range(rows)], device="cuda")
    segs = routed.segments(route, 8)
    h = routed_linear.routed_shrink(x, a_all, s_all, route, segs)
    assert h.shape == (rows, 256) and h.dtype == torch.float32
    for j, (a, bt, s) in enumerate(layers):
        a, bt, s = a.cuda(), bt.cuda(), s.cuda()
        weight, bias = _weights(2048, bt.shape[-1], torch.bfloat16, "cuda")
        got = routed_linear.routed_lora_linear(x, weight, bias, a, bt, s, route, segs, h=h[:, j * 64 : (j + 1) * 64])
        base = x.double() @ weight.double().T + bias.double()
        want = _per_row(x, base, a, bt, s, route)
        torch.testing.assert_close(got.double(), want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))


@pytest.mark.parametrize("length", [4, 0], ids=["not-a-divisor", "empty"])
def test_every_routed_operator_refuses_rows_that_do_not_split_into_the_routing(length: int) -> None:
    """Rows that are not whole groups of a routing's entries are refused by each routed operator
    before it picks a path (on CUDA the kernels would leave the rows past the last whole group
    unset, or read past the routing): ValueError on every device, no output."""
    x, y, a, bt, s = _operands(10, 8, 5, 4, 3, torch.float32)
    weight, bias = _weights(8, 5, torch.float32)
    route = torch.tensor([2, -1, 0, 1])[:length]
    calls = [
        lambda: routed.routed_lora(x, y, a, bt, s, route),
        lambda: routed_linear.routed_lora_linear(x, weight, bias, a, bt, s, route),
        lambda: routed_linear.routed_lora_linear(x, weight, bias, a, bt, s, route, sized=True),
        lambda: routed_linear.routed_shrink(x, a, s, route),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=f"10 rows do not split into {length} equal groups"):
            call()
