"""The fused LoRA linear kernel (lorahot.kernels.lora_linear) and the compiled-graph view of the arena
(lorahot.layers.tensor_handles): float64 references on the GPU, fallbacks everywhere else, and the
per-call cost a compiled model pays for its LoRA layers (graph inputs)."""

from __future__ import annotations

import gc
import os
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import lorahot
from lorahot.kernels import lora_linear as fused
from lorahot.layers.tensor_handles import TENSORS
from tests.helpers import make_adapter, model_reference, stack_reference

NAMES = ("0", "2", "4")


def _mlp(dtype: torch.dtype = torch.float32, device: str = "cpu", bias: bool = True) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(48, 64, bias=bias), nn.ReLU(), nn.Linear(64, 40, bias=bias), nn.ReLU(), nn.Linear(40, 24, bias=bias)
    ).to(device, dtype)


# -- everywhere -----------------------------------------------------------------------------


def test_kernel_is_off_on_cpu_and_the_layers_use_the_library_formula() -> None:
    model = _mlp()
    runtime = lorahot.inject(model, list(NAMES), max_rank=8)
    assert not any(layer.fused for layer in runtime.layers.values())
    assert not fused.supports(model[0].base_layer, runtime.layers["0"].lora_A)


def test_a_layer_wider_than_the_kernels_grid_keeps_the_library_formula(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fused kernel's grid holds a program per 64 output columns along CUDA's second
    dimension (at most 65535): a weight of more rows than that is not the kernels' (its launch
    would fail), one of exactly that many is. Stand-ins for CUDA tensors: the CPU has none."""
    monkeypatch.setattr(fused, "_kernel", lambda: object())

    def cuda_like(*shape: int) -> Any:
        return SimpleNamespace(is_cuda=True, dtype=torch.float16, shape=shape, stride=lambda dim: 1)

    widest = 65535 * 64
    assert fused.supports_tensors(cuda_like(widest, 8), None, cuda_like(4, 8))
    assert not fused.supports_tensors(cuda_like(widest + 1, 8), None, cuda_like(4, 8))


def test_a_rank_past_what_the_kernels_fit_in_shared_memory_keeps_the_library_formula(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Up to rank 512 the kernels fit an H100/H200 or an A100 (with fewer pipeline stages where
    needed); at rank 1024 the fused kernel's tiles exceed every GPU's shared memory, so a layer
    of a larger rank is not the kernels'. Stand-ins for CUDA tensors: the CPU has none."""
    monkeypatch.setattr(fused, "_kernel", lambda: object())

    def cuda_like(*shape: int) -> Any:
        return SimpleNamespace(is_cuda=True, dtype=torch.float16, shape=shape, stride=lambda dim: 1)

    assert fused.supports_tensors(cuda_like(64, 8), None, cuda_like(512, 8))
    assert not fused.supports_tensors(cuda_like(64, 8), None, cuda_like(513, 8))


def test_worth_it_follows_the_measured_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    if "LORAHOT_FUSED_WIDE_ROWS" not in os.environ:
        assert fused.WIDE_ROWS == 64  # the default
    monkeypatch.setattr(fused, "WIDE_ROWS", 64)
    # decode sizes: always the kernel
    assert all(fused.worth_it(rows, n, wide=w) for rows in (1, 16) for n in (256, 5632) for w in (False, True))
    # without the wide GEMM, the kernel up to 128 rows
    assert fused.worth_it(128, 5632) and not fused.worth_it(129, 256) and not fused.worth_it(4096, 256)
    # against the wide GEMM: mid-width layers up to WIDE_ROWS (64) rows, k/v-sized ones up to 256
    assert fused.worth_it(64, 2048, wide=True) and not fused.worth_it(64, 5632, wide=True)
    assert not fused.worth_it(65, 2048, wide=True) and not fused.worth_it(128, 2048, wide=True)
    assert fused.worth_it(128, 256, wide=True) and fused.worth_it(128, 512, wide=True)
    assert fused.worth_it(256, 256, wide=True) and not fused.worth_it(256, 2048, wide=True)
    assert not fused.worth_it(257, 256, wide=True) and not fused.worth_it(1024, 256, wide=True)


def test_routed_worth_it_weighs_the_kernel_against_the_segmented_pair() -> None:
    """The routed path has no wide GEMM to fall back on: the kernel up to 128 rows at any width
    (gate/up at decode too), and past that where it beats the wide GEMM on a widened layer."""
    assert fused.routed_worth_it(64, 5632, wide=True) and not fused.worth_it(64, 5632, wide=True)
    assert fused.routed_worth_it(128, 5632) and not fused.routed_worth_it(129, 5632, wide=True)
    assert fused.routed_worth_it(256, 256, wide=True) and not fused.routed_worth_it(256, 256)
    assert not fused.routed_worth_it(2048, 256, wide=True)


def test_compiled_graph_has_four_adapter_inputs_per_arena_not_per_layer() -> None:
    """Each LoRA layer reaches the arena through one global handle, so a compiled model gets
    (and guards) A, B, S and E (the extras) once, whatever the number of layers."""
    counts = {}
    for injected in (False, True):
        model = _mlp()
        if injected:
            runtime = lorahot.inject(model, list(NAMES), max_rank=4)
            runtime.load(make_adapter(model, dict.fromkeys(NAMES, 2))[0])

        def backend(gm: torch.fx.GraphModule, inputs: list, injected: bool = injected) -> object:
            counts[injected] = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
            return gm

        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(model, backend=backend)(torch.randn(2, 48))
    assert counts[True] == counts[False] + 4


def test_tensor_handle_entry_lives_with_the_layers_and_goes_with_them() -> None:
    model = _mlp()
    runtime = lorahot.inject(model, list(NAMES), max_rank=4)
    keys = {layer._key for layer in runtime.layers.values()}
    assert len(keys) == 1
    key = keys.pop()
    assert TENSORS[key][0] is runtime.buffers.arenas[0].A
    del runtime
    gc.collect()
    assert key in TENSORS  # the model's layers still read it
    lorahot.eject(model)
    gc.collect()
    assert TENSORS.get(key, ()) == ()  # released (the entry itself goes when the next handle is made)
    lorahot.inject(_mlp(), list(NAMES), max_rank=4)
    assert key not in TENSORS


# -- GPU ------------------------------------------------------------------------------------


def _ref(x, w, b, a, bt, s):
    """float64 ``x @ w.T + ((x @ a.T) * s) @ bt + b``, ``s [r]`` one scale per row of ``a``."""
    d = torch.Tensor.double
    y = d(x) @ d(w).T + ((d(x) @ d(a).T) * d(s)) @ d(bt)
    return y if b is None else y + d(b)


def _poison_allocator(nbytes: int) -> None:
    """Fills and frees ``nbytes`` of CUDA memory with NaN: the caching allocator hands the same
    block to the next allocation of that size, so an output element a kernel does not write
    stays NaN."""
    torch.full((nbytes // 2 + 1,), float("nan"), device="cuda", dtype=torch.float16)


@pytest.mark.gpu
@given(
    m=st.integers(0, 300),
    k=st.integers(1, 600),
    n=st.integers(1, 600),
    r=st.integers(1, 64),
    bias=st.booleans(),
    half=st.booleans(),
    split=st.sampled_from([0, 1, 2, 3, 8]),
    seed=st.integers(0, 2**16),
)
def test_kernel_matches_float64_reference(
    m: int, k: int, n: int, r: int, bias: bool, half: bool, split: int, seed: int
) -> None:
    """The op's own tile choice (``split=0``) and explicit split-K configurations, with a
    different scale on every row of A (as a stack of adapters has, zero on some); the output
    starts as NaN, so an element the kernel does not write fails the check."""
    assert fused.available()
    dtype = torch.float16 if half else torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", dtype=dtype, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=dtype, generator=g) / k**0.5
    a = torch.randn(r, k, device="cuda", dtype=dtype, generator=g) / k**0.5
    bt = torch.randn(r, n, device="cuda", dtype=dtype, generator=g) / r**0.5
    b = torch.randn(n, device="cuda", dtype=dtype, generator=g) if bias else None
    scale = torch.empty(r, device="cuda").uniform_(-2, 2, generator=g)  # float32 [r], as the arena holds it
    scale[::3] = 0.0  # rows of a part at weight 0 (and padding)
    if split and m:
        from lorahot.kernels import triton_lora_linear

        y = torch.full((m, n), float("nan"), device="cuda", dtype=dtype)
        triton_lora_linear.launch(x, w, b, a, bt, scale, y, (16, 32, 64, 4, 4, split))
    else:
        _poison_allocator(m * n * x.element_size())
        y = fused.lora_linear(x, w, b, a, bt, scale)
    assert y.shape == (m, n) and y.dtype == dtype
    if m:
        ref = _ref(x, w, b, a, bt, scale)
        assert torch.isfinite(y).all()
        assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
def test_kernel_reads_strided_input_rows_and_3d_batches() -> None:
    assert fused.available()
    g = torch.Generator(device="cuda").manual_seed(0)
    big = torch.randn(2, 3, 100, device="cuda", dtype=torch.bfloat16, generator=g)
    x = big[..., :64]  # rows are not contiguous with each other
    w = torch.randn(32, 64, device="cuda", dtype=torch.bfloat16, generator=g) / 8
    a = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16, generator=g) / 8
    bt = torch.randn(16, 32, device="cuda", dtype=torch.bfloat16, generator=g) / 4
    scale = torch.linspace(-1.0, 1.5, 16, device="cuda")
    _poison_allocator(6 * 32 * 2)
    y = fused.lora_linear(x, w, None, a, bt, scale)
    ref = _ref(x.reshape(-1, 64), w, None, a, bt, scale).view(2, 3, 32)
    assert y.shape == (2, 3, 32) and torch.isfinite(y).all()
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_fused_layers_after_swaps_compiled_match_reference_without_recompiles(mode: str) -> None:
    model = _mlp(torch.bfloat16, "cuda")
    reference_model = _mlp(torch.float32, "cuda")
    runtime = lorahot.inject(model, list(NAMES), max_rank=16)
    assert all(layer.fused for layer in runtime.layers.values())
    from torch._inductor.utils import run_and_get_code

    compiled = torch.compile(model, mode=None if mode == "default" else mode)
    x = torch.randn(4, 48, device="cuda", dtype=torch.bfloat16)
    with torch.inference_mode():
        _, code = run_and_get_code(compiled, x)
        # the fused kernel is an opaque op: under CUDA graphs the compiled code calls it once per
        # layer; launched per call (default mode) the layers take the compiler's own GEMMs
        # (lorahot.kernels.compile_mode), whose launches cost the host far less than the op's body
        calls = "\n".join(code).count("torch.ops.lorahot.lora_linear.default(")
        if mode == "default":
            assert calls == 0, "the fused operator in a default-mode graph"
        else:
            assert calls >= len(NAMES), "no fused kernel"
        for _ in range(3):
            compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed, ranks in enumerate(({"0": 16, "2": 3}, {"4": 8}, {"0": 1, "2": 16, "4": 5})):
                tensors, ab = make_adapter(model, ranks, seed=seed)
                runtime.load(tensors, scale=0.5 + seed)
                y = compiled(x).clone()
                expected = model_reference(
                    reference_model, x.float(), {n: (a.cuda(), b.cuda(), 0.5 + seed) for n, (a, b) in ab.items()}
                )
                assert float((y.double() - expected).norm() / expected.norm()) < 2e-2


@pytest.mark.gpu
def test_inputs_over_128_rows_and_autograd_use_the_library_formula() -> None:
    model = _mlp(torch.bfloat16, "cuda")
    runtime = lorahot.inject(model, list(NAMES), max_rank=8)
    tensors, ab = make_adapter(model, {"0": 8, "2": 4}, seed=3)
    runtime.load(tensors)
    layer = runtime.layers["0"]
    with torch.no_grad():
        assert layer.can_fuse(torch.zeros(16, 48, device="cuda", dtype=torch.bfloat16), layer.lora_A)
        assert layer.can_fuse(torch.zeros(128, 48, device="cuda", dtype=torch.bfloat16), layer.lora_A)
        assert not layer.can_fuse(torch.zeros(300, 48, device="cuda", dtype=torch.bfloat16), layer.lora_A)
    x = torch.randn(3, 48, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    assert not layer.can_fuse(x, layer.lora_A)  # autograd needs the library formula (the weights require grad)
    model(x).float().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.inference_mode():
        fast = model(x.detach())
    expected = model_reference(
        _mlp(torch.float32, "cuda"), x.detach().float(), {n: (a.cuda(), b.cuda(), 1.0) for n, (a, b) in ab.items()}
    )
    assert float((fast.double() - expected).norm() / expected.norm()) < 2e-2


@pytest.mark.gpu
def test_fused_layers_under_dynamic_shapes_match_reference_without_recompiles() -> None:
    """Up to 16 rows the kernel runs its decode tiles, 17..128 rows its prefill tiles, more
    rows take the library formula; one dynamic graph serves each range, through swaps."""
    model = _mlp(torch.bfloat16, "cuda")
    reference_model = _mlp(torch.float32, "cuda")
    runtime = lorahot.inject(model, list(NAMES), max_rank=16)
    compiled = torch.compile(model, dynamic=True)
    with torch.inference_mode():
        for rows in (3, 40, 150):  # one graph per range
            compiled(torch.randn(rows, 48, device="cuda", dtype=torch.bfloat16))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed, rows in enumerate((2, 7, 16, 40, 128, 129, 33, 200)):
                tensors, ab = make_adapter(model, {"0": 1 + seed, "2": 16, "4": 4}, seed=seed)
                runtime.load(tensors)
                x = torch.randn(rows, 48, device="cuda", dtype=torch.bfloat16)
                y = compiled(x).clone()
                expected = model_reference(
                    reference_model, x.float(), {n: (a.cuda(), b.cuda(), 1.0) for n, (a, b) in ab.items()}
                )
                assert float((y.double() - expected).norm() / expected.norm()) < 2e-2


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_fused_layers_holding_a_stack_follow_every_reweighting_without_recompiles(mode: str) -> None:
    """Two adapters of different ranks in one slot: the kernel reads each row's own scale
    (part 0's rows, part 1's, zero padding), through re-weightings, on a compiled model."""
    model = _mlp(torch.bfloat16, "cuda")
    reference_model = _mlp(torch.float32, "cuda")
    runtime = lorahot.inject(model, list(NAMES), max_rank=16)
    assert all(layer.fused for layer in runtime.layers.values())
    (ta, aba), (tb, abb) = make_adapter(model, {"0": 5, "2": 8}, seed=1), make_adapter(model, {"0": 9, "4": 3}, seed=2)
    a, b = lorahot.read_adapter(ta, config={"lora_alpha": 10}), lorahot.read_adapter(tb, config={"lora_alpha": 3})
    runtime.load([a, b], scale=[0.5, 1.5])
    x = torch.randn(4, 48, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, mode=None if mode == "default" else mode)
    with torch.inference_mode():
        for _ in range(3):
            compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for weights in ([0.5, 1.5], [-1.0, 0.0], [2.0, -0.75]):
                runtime.set_scale(weights)
                y = compiled(x).clone()
                parts = [
                    {n: (p.cuda(), q.cuda(), w * alpha / p.shape[0]) for n, (p, q) in ab.items()}
                    for ab, alpha, w in ((aba, 10, weights[0]), (abb, 3, weights[1]))
                ]
                expected = stack_reference(reference_model, x.float(), parts)
                assert torch.isfinite(y).all()
                assert float((y.double() - expected).norm() / expected.norm()) < 2e-2, weights


@pytest.mark.gpu
def test_layer_with_a_strided_bias_matches_the_library_formula() -> None:
    """An ``nn.Linear`` whose bias is a strided view (every other element of a packed tensor):
    the fused path gives what the library formula gives, within bf16 rounding."""
    g = torch.Generator("cuda").manual_seed(3)
    packed = torch.randn(2 * 64, device="cuda", dtype=torch.bfloat16, generator=g)
    x = torch.randn(3, 48, device="cuda", dtype=torch.bfloat16, generator=g)
    outs = []
    for fused_path in (True, False):
        model = _mlp(torch.bfloat16, "cuda")
        model[0].bias = nn.Parameter(packed[::2], requires_grad=False)
        assert model[0].bias.stride(0) == 2
        runtime = lorahot.inject(model, list(NAMES), max_rank=8, fused=fused_path)
        runtime.load(make_adapter(model, dict.fromkeys(NAMES, 8), seed=4)[0])
        assert model[0].fused == fused_path
        with torch.inference_mode():
            outs.append(model(x))
    assert torch.isfinite(outs[0]).all()
    assert float((outs[0].double() - outs[1].double()).norm() / outs[1].double().norm()) < 1e-2
