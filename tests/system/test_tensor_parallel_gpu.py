"""The sharded layers' fused path on a GPU: the tiny Llama parallelized over a one-rank NCCL mesh
(every shard whole, the DTensor plumbing all there), in bf16, against the same model unsharded
with the same adapters: the fused kernels on the shards, the output wrapped as the base's
DTensor, eagerly and compiled under CUDA graphs without recompiling. The two-rank behaviour
is covered on the CPU (``test_tensor_parallel.py``) and by ``benchmarks/tensor_parallel.py``."""

from __future__ import annotations

import copy
from collections.abc import Iterator

import pytest
import torch
import torch.distributed as dist

import lorahot
from lorahot.layers import ShardedLoRALinear
from tests.helpers import make_adapter
from tests.parallel_helpers import TARGETS, tiny_llama, tp_plan

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def mesh() -> Iterator[object]:
    if not torch.cuda.is_available() or not dist.is_nccl_available():
        pytest.skip("needs CUDA and NCCL")
    if dist.is_initialized():
        pytest.skip("a process group is already initialized")
    from torch.distributed.device_mesh import init_device_mesh

    dist.init_process_group("nccl", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield init_device_mesh("cuda", (1,))
    finally:
        dist.destroy_process_group()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def test_gpu_fused_kernels_on_the_shards_match_the_unsharded_model(mesh: object) -> None:
    from torch.distributed.tensor.parallel import parallelize_module

    ref = tiny_llama().to("cuda", torch.bfloat16)
    tp = copy.deepcopy(ref)
    parallelize_module(tp, mesh, tp_plan(tp))  # type: ignore[arg-type]
    linears = [n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear)]
    runtimes = [lorahot.inject(m, TARGETS, max_rank=8, slots=2) for m in (tp, ref)]
    sharded = {n: layer for n, layer in runtimes[0].layers.items() if isinstance(layer, ShardedLoRALinear)}
    assert sharded and all(
        layer.fused == (not (layer.spec.shard.dim == "in" and layer.base_layer.bias is not None))  # type: ignore[union-attr]
        for layer in sharded.values()
    )
    for slot, seed in ((0, 1), (1, 2)):
        tensors, _ = make_adapter(tiny_llama(), dict.fromkeys(linears, 4), seed=seed)
        for r in runtimes:
            r.load(tensors, slot=slot)
    ids = torch.randint(0, 40, (3, 6), generator=torch.Generator().manual_seed(1)).cuda()
    compiled = torch.compile(tp, mode="reduce-overhead")
    with torch.no_grad():
        for route in (0, 1, [0, 1, -1], [1, -1, 0]):
            for r in runtimes:
                r.activate(route)
            want = ref(ids)
            assert _rel(tp(ids), want) < 2e-2, route
            for _ in range(3):
                compiled(ids)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for route in (1, 0, [1, 0, 0], [-1, 1, 0]):
                for r in runtimes:
                    r.activate(route)
                assert _rel(compiled(ids), ref(ids)) < 2e-2, route
