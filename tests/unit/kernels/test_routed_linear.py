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
