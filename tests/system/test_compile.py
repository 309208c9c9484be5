"""The compile contract: after one compiled call, no runtime operation ever recompiles.

A tiny model with Embedding, grouped Conv2d and Linear targets is compiled once (CPU inductor,
with and without ``fullgraph``), then drives a random sequence of load / activate / unload /
set_scale under ``error_on_recompile=True``, checking each output against an eager float64
dense reference. Negative controls show the test would catch the mistakes lorahot avoids.
"""

from __future__ import annotations

import gc
import re
from collections.abc import Callable

import pytest
import torch
import torch._dynamo.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lorahot
from lorahot.layers.tensor_handles import TENSORS
from lorahot.runtime import wide as wide_layers
from tests.helpers import (
    ScaledEmbedding,
    ScaledProj,
    make_adapter,
    model_reference,
    stack_reference,
    tiny_convnet,
    tiny_lm,
    token_ids,
)

MAX_RANK = 4
NAMES = ("embed", "conv", "proj")
GROUPS = {"embed": 1, "conv": 2, "proj": 1}
IDS = token_ids((2, 5, 5), 16, seed=2)

_LOAD = st.tuples(
    st.just("load"),
    st.integers(0, 1),  # slot
    st.dictionaries(st.sampled_from(NAMES), st.integers(1, MAX_RANK), min_size=1),  # ranks, any subset
    st.sampled_from([0.5, 1.0, 3.0, 16.0]),  # alpha
)
_OPS = st.lists(
    st.one_of(
        _LOAD,
        st.tuples(st.just("activate"), st.integers(0, 1)),
        st.tuples(st.just("unload"), st.one_of(st.none(), st.integers(0, 1))),
        st.tuples(st.just("scale"), st.sampled_from([0.0, 0.25, 2.0])),
    ),
    min_size=1,
    max_size=6,
)


class _Mirror:
    """What each slot should hold, tracked independently of lorahot, and its dense reference."""

    def __init__(self) -> None:
        self.slots: list[dict | None] = [None, None]
        self.mult = [1.0, 1.0]
        self.active = 0

    def apply(self, runtime: lorahot.LoraRuntime, model: nn.Module, op: tuple, seed: int) -> None:
        kind, *args = op
        if kind == "load":
            slot, ranks, alpha = args
            ranks = {n: GROUPS[n] * min(r, MAX_RANK // GROUPS[n]) for n, r in ranks.items()}
            tensors, ab = make_adapter(model, ranks, seed=seed)
            runtime.load(tensors, slot=slot, config={"lora_alpha": alpha})
            self.slots[slot] = {n: (a, b, alpha / ranks[n]) for n, (a, b) in ab.items()}
            self.mult[slot] = 1.0
        elif kind == "activate":
            runtime.activate(args[0])
            self.active = args[0]
        elif kind == "unload":
            runtime.unload(args[0])
            for s in range(2) if args[0] is None else [args[0]]:
                self.slots[s] = None
        elif self.slots[self.active] is not None:
            runtime.set_scale(args[0])
            self.mult[self.active] = args[0]

    def expected(self) -> torch.Tensor:
        held, mult = self.slots[self.active] or {}, self.mult[self.active]
        return model_reference(tiny_convnet(), IDS, {n: (a, b, s * mult) for n, (a, b, s) in held.items()})


def _call(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


@pytest.mark.parametrize(
    ("fullgraph", "wide", "backend"), [(False, False, "aot_eager"), (True, False, "inductor"), (True, True, "inductor")]
)
def test_no_op_sequence_recompiles(fullgraph: bool, wide: bool, backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both layer paths run under inductor with ``fullgraph=True`` (its lowering of them, and
    lorahot's inductor pass on the wide one, against the float64 reference); without
    ``fullgraph`` the case is dynamo's (the same graph, its guards), so ``aot_eager`` traces it:
    the same guards and recompiles, no code generated."""
    if wide:  # the CUDA path on the CPU: the linear's weight and scale * A in one buffer
        monkeypatch.setattr(wide_layers, "DEVICE_TYPES", {"cpu"})
    model = tiny_convnet()
    runtime = lorahot.inject(model, list(NAMES), max_rank=MAX_RANK, slots=2)
    assert model.proj.wide == wide
    compiled = torch.compile(model, fullgraph=fullgraph, backend=backend)
    mirror = _Mirror()
    torch.testing.assert_close(
        _call(compiled).double(), mirror.expected(), rtol=1e-4, atol=1e-5
    )  # compiles, no adapter

    @settings(max_examples=12, suppress_health_check=list(HealthCheck))
    @given(ops=_OPS)
    def run(ops: list[tuple]) -> None:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed, op in enumerate(ops):
                mirror.apply(runtime, model, op, seed)
                torch.testing.assert_close(_call(compiled).double(), mirror.expected(), rtol=1e-4, atol=1e-5)

    run()


@pytest.mark.parametrize(("wide", "backend"), [(False, "aot_eager"), (True, "inductor")])
def test_compiled_after_load_swaps_across_ranks_without_recompiling(
    wide: bool, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The wide layers run under inductor (lorahot's pass stacks their shrinks; the output
    against the float64 reference); the library path's case is its guards across ranks, traced
    by ``aot_eager`` (the same guards; inductor's code for that path is checked by
    test_stacks_load_and_reweight_without_recompiling[library])."""
    if wide:
        monkeypatch.setattr(wide_layers, "DEVICE_TYPES", {"cpu"})
    model = tiny_lm()
    targets = ["q_proj", "v_proj", "embed_tokens"]
    runtime = lorahot.inject(model, targets, max_rank=8)
    assert all(runtime.layers[n].wide == wide for n in runtime.layers if not n.endswith("embed_tokens"))
    names = list(runtime.layers)
    ids = token_ids((2, 6), 32, seed=1)
    runtime.load(make_adapter(model, dict.fromkeys(names, 8), seed=0)[0])
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        compiled(ids)
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for seed, rank in enumerate([1, 8, 3, 5]):
            ranks = dict.fromkeys(names[seed % 2 :: 2], rank)
            tensors, ab = make_adapter(model, ranks, seed=10 + seed)
            runtime.load(tensors, config={"lora_alpha": 2 * rank}, scale=0.5)
            expected = model_reference(tiny_lm(), ids, {n: (a, b, 1.0) for n, (a, b) in ab.items()})
            torch.testing.assert_close(compiled(ids).double(), expected, rtol=1e-4, atol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.parametrize("mode", ["library", "wide", "merged"])
def test_stacks_load_and_reweight_without_recompiling(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two adapters of different ranks and alphas in one slot, re-weighted, swapped with a
    stack in the other slot and with a single adapter: one graph (``fullgraph=True``) for all.
    The negative control, a new input length, does recompile under the same patch. The library
    and wide paths run under inductor (its code for them, lorahot's pass on the wide one);
    merged mode's graph is the base model's (the adapters are folded into its weights: no
    LoRA operation in it), so ``aot_eager`` traces it, with the same guards."""
    if mode == "wide":
        monkeypatch.setattr(wide_layers, "DEVICE_TYPES", {"cpu"})
    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj", "v_proj", "embed_tokens"], max_rank=8, slots=2, merged=mode == "merged")
    assert runtime.layers["layers.0.self_attn.q_proj"].wide == (mode == "wide")
    names = list(runtime.layers)
    (ta, aba), (tb, abb) = (
        make_adapter(model, dict.fromkeys(names[:4], 3)),
        make_adapter(model, dict.fromkeys(names[2:], 5)),
    )
    a, b = lorahot.read_adapter(ta, config={"lora_alpha": 6}), lorahot.read_adapter(tb, config={"lora_alpha": 2.5})
    own = {"a": (aba, 6 / 3), "b": (abb, 2.5 / 5)}

    def expected(*weighted: tuple[str, float]) -> torch.Tensor:
        parts = [{n: (x, y, w * own[k][1]) for n, (x, y) in own[k][0].items()} for k, w in weighted]
        return stack_reference(tiny_lm(), ids, parts)

    ids = token_ids((2, 6), 32, seed=1)
    runtime.load([a, b], scale=[0.5, 1.0])
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager" if mode == "merged" else "inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    with torch.no_grad():
        torch.testing.assert_close(compiled(ids).double(), expected(("a", 0.5), ("b", 1.0)), rtol=1e-4, atol=1e-5)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for weights in ([2.0, -0.5], 0.25, [0.0, 1.5]):
                runtime.set_scale(weights)
                w = weights if isinstance(weights, list) else [weights] * 2
                torch.testing.assert_close(
                    compiled(ids).double(), expected(("a", w[0]), ("b", w[1])), rtol=1e-4, atol=1e-5
                )
            runtime.load([b, a], slot=1, scale=[-1.0, 0.75])
            runtime.activate(1)
            torch.testing.assert_close(compiled(ids).double(), expected(("b", -1.0), ("a", 0.75)), rtol=1e-4, atol=1e-5)
            runtime.load(a, slot=1, scale=3.0)  # a single adapter into the stacked slot
            torch.testing.assert_close(compiled(ids).double(), expected(("a", 3.0)), rtol=1e-4, atol=1e-5)
            runtime.activate(0)
            torch.testing.assert_close(compiled(ids).double(), expected(("a", 0.0), ("b", 1.5)), rtol=1e-4, atol=1e-5)
            with pytest.raises(torch._dynamo.exc.RecompileError):  # negative control
                compiled(token_ids((2, 7), 32, seed=1))
    assert counter.frame_count == 1


# -- negative controls: what lorahot avoids does recompile ------------------------------------


class _FloatScaleLoRA(nn.Module):
    """A naive LoRA linear whose scale is a Python float read in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.base = nn.Linear(6, 6)
        self.A = nn.Parameter(torch.randn(2, 6))
        self.B = nn.Parameter(torch.randn(6, 2))
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * (x @ self.A.t() @ self.B.t())


def _assert_change_recompiles(model: nn.Module, change: Callable[[], object]) -> None:
    """Compiles ``model``, applies ``change``, and checks the next call recompiles (once)."""
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(3, 6)
    compiled(x)
    change()
    with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(torch._dynamo.exc.RecompileError):
        compiled(x)
    compiled(x)
    assert counter.frame_count == 2


def test_negative_control_python_float_scale_recompiles() -> None:
    model = _FloatScaleLoRA()
    _assert_change_recompiles(model, lambda: setattr(model, "scale", 0.5))


def test_negative_control_rebinding_a_different_rank_buffer_recompiles() -> None:
    model = nn.Sequential(nn.Linear(6, 6))
    runtime = lorahot.inject(model, ["0"], max_rank=4)
    layer = runtime.layers["0"]
    # what lorahot never does: bind the layer to buffers of another rank
    _assert_change_recompiles(model, lambda: layer.bind(torch.zeros(2, 6), torch.zeros(2, 6), torch.ones(2)))


def test_positive_control_same_counter_sees_no_recompile_for_lorahot_swaps() -> None:
    model = nn.Sequential(nn.Linear(6, 6))
    runtime = lorahot.inject(model, ["0"], max_rank=4)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter)
    x = torch.randn(3, 6)
    compiled(x)
    for rank in (1, 4, 2):
        runtime.load(make_adapter(model, {"0": rank}, seed=rank)[0], scale=rank / 3)
        runtime.set_scale(0.0 if rank == 2 else 1.0)
        compiled(x)
    runtime.unload()
    compiled(x)
    assert counter.frame_count == 1


@pytest.mark.usefixtures("frozen_heap")
@pytest.mark.parametrize("release", ["eject", "drop"])
def test_a_fresh_model_injected_after_the_last_one_went_takes_its_compiled_graph(release: str) -> None:
    """A server that builds its model again (a new checkpoint, a restart in process) injects a
    fresh model of the same class each time: its compiled forward is served by the graph the
    last one compiled, as a model without LoRA is, and computes its own weights and adapter
    (float64 reference). Before, every fresh model compiled again (its arenas sat under a new
    global key), and past dynamo's recompile_limit of 8 the class ran eagerly. A model still
    alive keeps its keys and its own graph: one graph for it and one for the fresh models."""
    counter = torch._dynamo.testing.CompileCounter()
    ids = token_ids((2, 5), 32, seed=1)
    targets = ["q_proj", "v_proj", "embed_tokens"]

    def served(seed: int) -> tuple[nn.Module, lorahot.LoraRuntime, torch.Tensor, Callable[[], torch.Tensor]]:
        model = tiny_lm(seed=seed, dtype=torch.float64)
        runtime = lorahot.inject(model, targets, max_rank=4)
        names = list(runtime.layers)
        tensors, ab = make_adapter(model, {n: 1 + (seed + i) % 4 for i, n in enumerate(names)}, seed, torch.float64)
        runtime.load(tensors)
        expected = model_reference(
            tiny_lm(seed=seed, dtype=torch.float64), ids, {n: (a, b, 1.0) for n, (a, b) in ab.items()}
        )
        compiled = torch.compile(model, backend=counter)

        def call() -> torch.Tensor:
            with torch.no_grad():
                return compiled(ids)

        return model, runtime, expected, call

    gc.collect()  # runtimes an earlier test dropped: their keys are free from the start
    kept = served(100)
    torch.testing.assert_close(kept[3](), kept[2], rtol=1e-10, atol=1e-10)
    for seed in range(10):
        model, runtime, expected, call = served(seed)
        torch.testing.assert_close(call(), expected, rtol=1e-10, atol=1e-10)
        if release == "eject":
            runtime.eject()
        del model, runtime, call
        gc.collect()  # a dropped runtime goes with its model at the collector's run
    torch.testing.assert_close(kept[3](), kept[2], rtol=1e-10, atol=1e-10)  # its own arenas, its own graph
    assert counter.frame_count == 2


# -- GPU: CUDA graphs and bf16 ----------------------------------------------------------------


def _gpu_model(dtype: torch.dtype, slots: int) -> tuple[nn.Module, lorahot.LoraRuntime]:
    model = tiny_convnet().to("cuda", dtype)
    return model, lorahot.inject(model, list(NAMES), max_rank=MAX_RANK, slots=slots)


def _gpu_expected(ab: dict, scale: float = 1.0) -> torch.Tensor:
    ids = IDS.cuda()
    return model_reference(tiny_convnet().cuda(), ids, {n: (a.cuda(), b.cuda(), scale) for n, (a, b) in ab.items()})


@pytest.mark.gpu
def test_gpu_reduce_overhead_cudagraphs_swap_and_activate() -> None:
    model, runtime = _gpu_model(torch.float32, slots=3)
    adapters = [
        make_adapter(model, ranks, seed=i)
        for i, ranks in enumerate(({"conv": 4}, {"proj": 1, "embed": 4}, {"embed": 2, "conv": 2, "proj": 3}))
    ]
    ids = IDS.cuda()
    with torch._inductor.config.patch("triton.cudagraph_support_input_mutation", False):
        compiled = torch.compile(model, mode="reduce-overhead")
        for _ in range(3):  # warm up and record the graph
            _call_on(compiled, ids)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for slot, (tensors, _) in enumerate(adapters):
                runtime.load(tensors, slot=slot)
            for slot in (0, 2, 1, 2, 0):
                runtime.activate(slot)
                torch.testing.assert_close(
                    _call_on(compiled, ids).double(), _gpu_expected(adapters[slot][1]), rtol=1e-3, atol=1e-3
                )
            runtime.set_scale(0.5)
            torch.testing.assert_close(
                _call_on(compiled, ids).double(), _gpu_expected(adapters[0][1], 0.5), rtol=1e-3, atol=1e-3
            )
            runtime.load(adapters[1][0])  # into the active slot
            torch.testing.assert_close(
                _call_on(compiled, ids).double(), _gpu_expected(adapters[1][1]), rtol=1e-3, atol=1e-3
            )
            runtime.unload()
            torch.testing.assert_close(_call_on(compiled, ids).double(), _gpu_expected({}), rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_gpu_default_mode_bf16() -> None:
    model, runtime = _gpu_model(torch.bfloat16, slots=1)
    ids = IDS.cuda()
    compiled = torch.compile(model)
    _call_on(compiled, ids)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed, ranks in enumerate(({"conv": 2}, {"proj": 4, "embed": 1}, {"embed": 4, "conv": 4, "proj": 2})):
            tensors, ab = make_adapter(model, ranks, seed=seed)
            runtime.load(tensors)
            y = _call_on(compiled, ids)
            assert y.dtype == torch.bfloat16
            expected = model_reference(
                tiny_convnet().cuda(), ids, {n: (a.cuda(), b.cuda(), 1.0) for n, (a, b) in ab.items()}
            )
            torch.testing.assert_close(y.double(), expected, rtol=5e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("release", ["eject", "drop"])
def test_gpu_a_fresh_model_on_the_last_ones_keys_computes_its_own_under_cuda_graphs(release: str) -> None:
    """Under CUDA graphs a fresh model that takes the keys of the one before reads its own
    arenas: the graph is recorded again for their addresses, as for a fresh model's parameters."""
    ids = IDS.cuda()
    with torch._inductor.config.patch("triton.cudagraph_support_input_mutation", False):
        for seed in range(3):
            model = tiny_convnet(seed).cuda()
            runtime = lorahot.inject(model, list(NAMES), max_rank=MAX_RANK)
            tensors, ab = make_adapter(model, {"conv": 2, "proj": 1 + seed, "embed": 4 - seed}, seed=seed)
            runtime.load(tensors)
            compiled = torch.compile(model, mode="reduce-overhead")
            loras = {n: (a.cuda(), b.cuda(), 1.0) for n, (a, b) in ab.items()}
            expected = model_reference(tiny_convnet(seed).cuda(), ids, loras)
            for _ in range(3):  # warm up, record, replay
                torch.testing.assert_close(_call_on(compiled, ids).double(), expected, rtol=1e-3, atol=1e-3)
            if release == "eject":
                runtime.eject()
            del model, runtime, compiled
            gc.collect()


def _call_on(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).clone()


# -- dynamic shapes ----------------------------------------------------------------------------


def test_dynamic_sequence_lengths_swap_without_recompiles() -> None:
    """A serving loop sees many prompt lengths: compiled with dynamic shapes, one graph serves
    every length, and swaps across ranks still recompile nothing."""
    # one block: the lengths and the swaps are the point, and inductor's code grows with the blocks
    model, reference_model = tiny_lm(seed=2, layers=1), tiny_lm(seed=2, layers=1)
    targets = ["q_proj", "v_proj", "up_proj", "embed_tokens"]
    runtime = lorahot.inject(model, targets, max_rank=8)
    compiled = torch.compile(model, dynamic=True)
    with torch.no_grad():
        compiled(token_ids((2, 3), 32, seed=0))  # batch 2: size-1 dims would be specialized
        names = list(runtime.layers)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed, length in enumerate((5, 9, 2, 17)):
                ranks = {n: 1 + (seed + i) % 8 for i, n in enumerate(names)}
                tensors, ab = make_adapter(model, ranks, seed=seed)
                runtime.load(tensors)
                ids = token_ids((2, length), 32, seed=seed)
                expected = model_reference(reference_model, ids, {n: (a, b, 1.0) for n, (a, b) in ab.items()})
                torch.testing.assert_close(compiled(ids).double(), expected, rtol=1e-4, atol=1e-4)


def test_a_batch_size_equal_to_an_arena_size_is_not_tied_to_it() -> None:
    """Under ``dynamic=True`` the compiler ties equal sizes together; the arena tensors' shapes
    are static, so a first batch that matches one of them still leaves one graph for all. The
    tying and the guards are dynamo's (its shape environment), the same under any backend:
    ``aot_eager`` traces them (the outputs against the eager model's)."""
    model = nn.Sequential(nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12), nn.ReLU(), nn.Linear(12, 12))
    runtime = lorahot.inject(model, ["0", "2", "4"], max_rank=4)
    sizes = sorted(
        {int(d) for layer in runtime.layers.values() for t in TENSORS[layer._key] for d in t.shape if d >= 2}
    )
    assert 3 in sizes  # three layers: a scale per layer
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        compiled(torch.randn(3, 12))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for rows in [*sizes, 2, 5, 31]:
                x = torch.randn(rows, 12)
                torch.testing.assert_close(compiled(x), model(x))


def test_negative_control_static_compile_recompiles_for_a_new_length() -> None:
    """Dynamo's guard on the input's shape (``aot_eager`` traces it as inductor does)."""
    model = tiny_lm(seed=2)
    lorahot.inject(model, ["q_proj"], max_rank=4)
    compiled = torch.compile(model, dynamic=False, backend="aot_eager")
    with torch.no_grad():
        compiled(token_ids((2, 3), 32, seed=0))
        with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(torch._dynamo.exc.RecompileError):
            compiled(token_ids((2, 5), 32, seed=0))


# -- scaled embeddings -------------------------------------------------------------------------------


def _scaled_model(embed_scale: float | torch.Tensor) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(ScaledEmbedding(16, 8, embed_scale), nn.Linear(8, 6))


def test_scaled_embedding_swaps_under_compile_without_recompiling() -> None:
    model = _scaled_model(torch.tensor(2.5))
    reference = _scaled_model(torch.tensor(2.5))
    runtime = lorahot.inject(model, ["0", "1"], max_rank=4)
    ids = token_ids((2, 5), 16, seed=3)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    with torch.no_grad():
        compiled(ids)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for seed, rank in enumerate((4, 1, 3)):
                tensors, ab = make_adapter(model, {"0": rank, "1": rank}, seed=seed)
                runtime.load(tensors, scale=0.5 * (seed + 1))
                # the embedding's delta is scaled by embed_scale, as the base scales its table
                loras = {"0": (*ab["0"], 0.5 * (seed + 1) * 2.5), "1": (*ab["1"], 0.5 * (seed + 1))}
                expected = model_reference(reference, ids, loras)
                torch.testing.assert_close(compiled(ids).double(), expected, rtol=1e-4, atol=1e-5)
            runtime.set_scale(0.0)
            torch.testing.assert_close(
                compiled(ids).double(), model_reference(reference, ids, {}), rtol=1e-4, atol=1e-5
            )
    assert counter.frame_count == 1


def test_negative_control_a_python_number_embed_scale_changed_recompiles() -> None:
    """What lorahot reads of the base at forward time is guarded like the base's own forward:
    a Python-number ``embed_scale`` changed after compiling recompiles (the buffer form above
    does not); the LoRA path follows the new value."""
    model = _scaled_model(2.0)
    runtime = lorahot.inject(model, ["0"], max_rank=4)
    runtime.load(make_adapter(model, {"0": 2}, seed=1)[0])
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter)
    ids = token_ids((2, 5), 16, seed=3)
    with torch.no_grad():
        compiled(ids)
        model[0].base_layer.embed_scale = 3.0
        with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(torch._dynamo.exc.RecompileError):
            compiled(ids)
        torch.testing.assert_close(compiled(ids), model(ids))
    assert counter.frame_count == 2


def _fused_wide_mlp(monkeypatch: pytest.MonkeyPatch) -> tuple[nn.Module, nn.Module, dict]:
    """A two-linear model whose layers are both fused and wide, as on CUDA: the fused kernel's
    op has its library formula standing in for it on the CPU. Returns the lorahot model (an
    adapter loaded), an untouched base copy, and the adapter's ``(A, B, scale)`` per layer."""
    from lorahot.kernels import lora_linear as fused_kernel
    from lorahot.kernels import routed_lora

    def formula(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, *lora: torch.Tensor) -> torch.Tensor:
        a, bt, s = lora
        return torch.nn.functional.linear(x, w, bias) + ((x @ a.t()) * s).to(x.dtype) @ bt

    monkeypatch.setattr(fused_kernel, "supports", lambda base, a: True)
    monkeypatch.setattr(fused_kernel, "lora_linear", formula)
    monkeypatch.setattr(routed_lora, "available", lambda: True)
    monkeypatch.setattr(wide_layers, "DEVICE_TYPES", {"cpu"})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 4, bias=False))
    base = nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 4, bias=False))
    base.load_state_dict(model.state_dict())
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4)
    assert all(layer._plan[1] and layer.wide for layer in runtime.layers.values())  # fused and wide
    tensors, ab = make_adapter(model, {"0": 2, "2": 3}, seed=0)
    runtime.load(tensors)
    return model, base, {n: (a, b, 1.0) for n, (a, b) in ab.items()}


# Row counts as a server sees them: the first two shapes turn on dynamic shapes, then decode
# batches across the fused kernel's row limits, then prefills; 3-D inputs too.
_ROW_SHAPES = [(3, 8), (5, 8), (1, 8), (12, 8), (40, 8), (200, 8), (300, 8), (2, 7, 8), (4, 300, 8)]


def _frames(
    model: nn.Module, check: Callable[[torch.Tensor, torch.Tensor], None] | None = None, backend: str = "inductor"
) -> int:
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        for shape in _ROW_SHAPES:
            x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape) * 1000 + shape[0]))
            out = compiled(x)
            if check is not None:
                check(x, out)
    return counter.frame_count


def test_dynamic_row_counts_compile_no_more_graphs_than_the_base_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled with automatic dynamic shapes, a layer that chooses between the fused kernel
    and the wide GEMMs by row count makes that choice at run time, inside one operator: the
    model compiles as many graphs as the base model over the same inputs, each output equal to
    the float64 reference. The model compiles with inductor (its lowering of the operator, and
    any guard that lowering adds, counted); the base model, whose graph count is the yardstick,
    with ``aot_eager``: its graphs are dynamo's guards on a plain MLP, as many under either
    backend, without the code of each. The negative control decides in Python (as static
    shapes do) and compiles a graph per range of row counts: dynamo's guards too, traced by
    ``aot_eager``."""
    model, base, loras = _fused_wide_mlp(monkeypatch)

    def check(x: torch.Tensor, out: torch.Tensor) -> None:
        torch.testing.assert_close(out.double(), model_reference(base, x, loras), rtol=1e-4, atol=1e-5)

    base_frames = _frames(base, backend="aot_eager")
    assert _frames(model, check) == base_frames
    from lorahot.kernels import lora_linear as fused_kernel

    monkeypatch.setattr(fused_kernel, "decidable", lambda rows: True)
    assert _frames(model, check, backend="aot_eager") > base_frames


def test_a_compiled_layer_traces_only_the_arena_views_its_path_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """The common compiled case (wide, no extras, whole batch) is traced through one call that
    makes only the arena views its path reads: A's on the wide path (fused or not, rows above
    the fused kernel's limits: its shrink reads the arena, where neighbouring layers' shrinks
    can be stacked; the rest is in the wide buffer), A's, B's and the scales' on the fused
    kernel's. The
    compiler traces every layer's forward in every graph, so what it inlines there is compile
    time (``benchmarks/experiments/trace_cost_probe.py``). The control, with extras, takes the
    general path: four views per layer."""
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    def views(model: nn.Module, rows: int = 300) -> int:
        torch._dynamo.reset()
        x = torch.randn(rows, 8)
        with torch.no_grad():
            got = torch.compile(model, backend=record, fullgraph=True, dynamic=False)(x)
            torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
        return sum(1 for n in graphs[-1].graph.nodes if n.op == "call_method" and n.target == "as_strided")

    def plain(extras: bool) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 6), nn.GELU(), nn.Linear(6, 4, bias=False))
        runtime = lorahot.inject(model, ["0", "2"], max_rank=4, extras=extras)
        runtime.load(make_adapter(model, {"0": 2, "2": 3}, seed=0)[0])
        return model

    monkeypatch.setattr(wide_layers, "DEVICE_TYPES", {"cpu"})
    assert views(plain(extras=False)) == 2  # A of each layer; the wide buffer holds the rest
    assert views(plain(extras=True)) == 8  # the control: the general path
    fused = _fused_wide_mlp(monkeypatch)[0]
    assert views(fused) == 2
    assert views(fused, rows=8) == 6  # the fused kernel's rows: A, B and the scales of each layer


class _CalledBy(nn.Module):
    """An Embedding, a Conv1d, a Linear and a custom linear-like module called positionally, or
    with the input by keyword as each one's forward names it (``input=``; ``x=``)."""

    def __init__(self, keyword: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.keyword = keyword
        self.embed, self.conv = nn.Embedding(16, 8), nn.Conv1d(8, 6, 3, padding=1)
        self.proj, self.custom = nn.Linear(6, 6), ScaledProj(6, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.keyword:
            h = self.conv(input=self.embed(input=ids).transpose(1, 2)).transpose(1, 2)
            return self.custom(x=self.proj(input=h))
        h = self.conv(self.embed(ids).transpose(1, 2)).transpose(1, 2)
        return self.custom(self.proj(h))


def test_layers_called_by_keyword_compile_as_called_positionally() -> None:
    """A model that calls its layers with the input by keyword compiles into one graph with no
    break, with the very guards of the same model calling them positionally (the input's name
    is read from the layer's plan, which is guarded anyway), follows loads and scale changes
    without recompiling, and computes the float64 reference."""
    ids = token_ids((2, 5), 16, seed=2)
    names = ["embed", "conv", "proj", "custom"]
    guards = []
    for keyword in (False, True):
        model = _CalledBy(keyword)
        runtime = lorahot.inject(model, names, max_rank=MAX_RANK)
        torch._dynamo.reset()
        with torch.no_grad():
            explained = torch._dynamo.explain(model)(ids)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0)
        # (each runtime's arenas have keys of their own)
        guards.append(sorted((re.sub(r"\[\d+\]", "[key]", g.name), g.create_fn_name()) for g in explained.out_guards))
        counter = torch._dynamo.testing.CompileCounter()
        compiled = torch.compile(model, backend=counter, fullgraph=True)
        with torch.no_grad():
            compiled(ids)
            with torch._dynamo.config.patch(error_on_recompile=True):
                for seed, scale in ((1, 1.0), (2, 0.5)):
                    tensors, ab = make_adapter(model, dict.fromkeys(names, 2), seed=seed)
                    runtime.load(tensors, scale=scale)
                    want = model_reference(_CalledBy(False), ids, {n: (a, b, scale) for n, (a, b) in ab.items()})
                    torch.testing.assert_close(compiled(ids).double(), want, rtol=1e-4, atol=1e-5)
        assert counter.frame_count == 1
    assert guards[0] == guards[1]


def _arena_and_weights(runtime: lorahot.LoraRuntime, model: nn.Module) -> list[torch.Tensor]:
    """Copies of every arena tensor and of the model's state dict: what a refused call must leave bitwise."""
    arenas = [t.clone() for arena in runtime.buffers.arenas for t in (arena.A, arena.B, arena.S, arena.E)]
    return arenas + [t.clone() for t in model.state_dict().values()]


@pytest.mark.parametrize("freezing_at_inject", [True, False], ids=["freezing-at-inject", "control: freezing off"])
def test_a_merged_runtime_injected_under_freezing_refuses_writes_after_it_is_turned_off(
    freezing_at_inject: bool,
) -> None:
    """Merged, lorahot cannot see whether the model was compiled: its forward is the base
    modules' own. A runtime injected while inductor's freezing was on may serve a model
    compiled then (with the merged weights folded in) after freezing is turned off again, so
    its writes stay refused, nothing changed; injected with freezing off, they go through."""
    model = tiny_convnet()
    with torch._inductor.config.patch(freezing=freezing_at_inject):
        runtime = lorahot.inject(model, list(NAMES), max_rank=MAX_RANK, merged=True)
    adapter, _ = make_adapter(model, {"embed": 2, "proj": 3}, seed=1)
    if not freezing_at_inject:
        runtime.load(adapter)
        return
    before = _arena_and_weights(runtime, model)
    with pytest.raises(lorahot.UsageError, match=r"^inductor's freezing was on .* at inject or at an earlier call"):
        runtime.load(adapter)
    assert all(torch.equal(x, y) for x, y in zip(before, _arena_and_weights(runtime, model)))


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("freezing", [True, False], ids=["freezing", "control: freezing off"])
def test_a_model_compiled_with_inductor_freezing_refuses_every_write_with_nothing_changed(
    merged: bool, freezing: bool
) -> None:
    """Inductor's ``freezing`` (``torch._inductor.config.freezing = True``, its advice for CPU
    inference) folds every tensor the graph reads from a module or a global into the compiled
    code: the arena, and merged mode's base weights. The compiled model then kept the adapter
    of its compile through every later load, ``set_scale`` and ``unload``, with no recompile
    and no error (0.88 off the eager model after a swap on this model, 0.46 after
    ``set_scale(0)``). Those calls are now refused, every buffer, weight and the compiled
    output bitwise unchanged; ``preload`` (which writes no buffer) still runs. They stay refused
    once freezing is turned off again (the graph of the compile is still served). With freezing
    off from the start the same calls go through and the compiled model follows them without
    recompiling."""
    model = tiny_convnet()
    runtime = lorahot.inject(model, list(NAMES), max_rank=MAX_RANK, slots=2, merged=merged)
    ranks = {"embed": 2, "proj": 3} if merged else {"embed": 2, "conv": 2, "proj": 3}  # (a grouped conv merges none)
    first, held = make_adapter(model, ranks, seed=1)
    runtime.load(first)
    second, other = make_adapter(model, ranks, seed=2)
    torch._dynamo.reset()
    with torch._inductor.config.patch(freezing=freezing), torch.no_grad():
        compiled = torch.compile(model)
        want = model_reference(tiny_convnet(), IDS, {n: (a, b, 1.0) for n, (a, b) in held.items()})
        torch.testing.assert_close(compiled(IDS).double(), want, rtol=1e-4, atol=1e-5)
        runtime.preload(second, key="second")  # writes no buffer
        calls = {
            "load": lambda: runtime.load(second),
            "load(key)": lambda: runtime.load("second"),
            "set_scale": lambda: runtime.set_scale(0.0),
            "unload": lambda: runtime.unload(),
        }
        if not freezing:
            with torch._dynamo.config.patch(error_on_recompile=True):
                runtime.load("second", scale=0.5)
                want = model_reference(tiny_convnet(), IDS, {n: (a, b, 0.5) for n, (a, b) in other.items()})
                torch.testing.assert_close(compiled(IDS).double(), want, rtol=1e-4, atol=1e-5)
                runtime.unload()
                torch.testing.assert_close(compiled(IDS).double(), model_reference(tiny_convnet(), IDS, {}))
            return
        before, output = _arena_and_weights(runtime, model), compiled(IDS)

        def all_refused(merged_refusal: str) -> None:
            refused = merged_refusal if merged else r"^inductor compiled this model with freezing=True .* LoRA buffers"
            for name, call in calls.items():
                with pytest.raises(lorahot.UsageError, match=refused + r" .* Nothing"):
                    call()
                after = _arena_and_weights(runtime, model)
                assert all(torch.equal(x, y) for x, y in zip(before, after)), name
                assert torch.equal(compiled(IDS), output), name

        all_refused(r"^inductor's freezing is on .* merged weights")
    # freezing off again, no dynamo reset: the compiled graph still holds the constants of its
    # compile, so every write is still refused (merged, a load went through here and the model
    # kept computing the first adapter: the merged weights changed under a graph that no longer read them)
    with torch.no_grad():
        all_refused(r"^inductor's freezing was on .* at inject or at an earlier call .* merged weights")
