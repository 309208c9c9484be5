"""Regional compiling: each block compiled on its own (diffusers' ``compile_repeated_blocks``).

With ``inject(..., regional=True)`` the identical blocks of a model share one compiled graph,
so a model of more blocks than dynamo's recompile limit compiles once, and the runtime's
operations never recompile afterwards. Without it, each block's LoRA layers hold their buffer
offsets as constants of the graph, and the second block recompiles (the negative control).
Outputs are checked against an eager float64 dense reference.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import lorahot
from tests.helpers import make_adapter, stack_reference

BLOCKS = 10  # past dynamo's recompile limit (8): without sharing, the last blocks would run uncompiled
DIM, MAX_RANK = 16, 4
KINDS = ("q", "conv", "o")


class Block(nn.Module):
    """A linear with bias, a grouped Conv1d over the sequence and a linear without bias."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(DIM, DIM)
        self.conv = nn.Conv1d(DIM, DIM, 3, padding=1, groups=2)
        self.o = nn.Linear(DIM, DIM, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.q(x))
        h = h + self.conv(h.transpose(1, 2)).transpose(1, 2)
        return x + self.o(h)


class Blocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(BLOCKS))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _model() -> Blocks:
    torch.manual_seed(0)
    return Blocks()


def _names(kinds: tuple[str, ...] = KINDS) -> list[str]:
    return [f"blocks.{i}.{kind}" for i in range(BLOCKS) for kind in kinds]


def _compile_blocks(model: Blocks, backend: object) -> None:
    for block in model.blocks:
        block.compile(backend=backend)


def _expected(pristine: Blocks, x: torch.Tensor, held: dict | None, scale: float = 1.0) -> torch.Tensor:
    """``pristine``'s output in float64 with ``held`` (``name -> (A, B, scale)``) added densely."""
    parts = [] if held is None else [{n: (a, b, s * scale) for n, (a, b, s) in held.items()}]
    return stack_reference(pristine, x, parts)


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    """float32 through ten blocks whose adapters grow the outputs to about 1e6: an entry formed
    by cancellation carries float32's rounding of the largest ones, so the absolute tolerance
    scales with them (1e-5 of the largest entry; float32's own rounding, eager or compiled,
    reads 2e-6 there)."""
    torch.testing.assert_close(got.double(), want, rtol=1e-3, atol=1e-3 + 1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_regional_blocks_share_one_graph_and_no_operation_recompiles(backend: str) -> None:
    model = _model()
    pristine = copy.deepcopy(model)
    runtime = lorahot.inject(model, list(KINDS), max_rank=MAX_RANK, slots=2, regional=True)
    tensors, ab = make_adapter(model, dict.fromkeys(_names(), 4), seed=1)
    runtime.load(tensors, config={"lora_alpha": 8})  # scale 2
    first = {n: (a, b, 2.0) for n, (a, b) in ab.items()}
    tensors, ab = make_adapter(model, dict.fromkeys(_names(("q", "conv")), 2), seed=2)
    second = {n: (a, b, 0.5) for n, (a, b) in ab.items()}
    counter = torch._dynamo.testing.CompileCounterWithBackend(backend)
    _compile_blocks(model, counter)
    x = torch.randn(2, 5, DIM, generator=torch.Generator().manual_seed(3))
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        _close(model(x), _expected(pristine, x, first))  # block 0 compiles, the other nine reuse its graph
        assert counter.frame_count == 1
        runtime.load(tensors, slot=1, config={"lora_alpha": 1})  # another rank, fewer layers
        runtime.activate(1)
        _close(model(x), _expected(pristine, x, second))
        runtime.set_scale(0.25)
        _close(model(x), _expected(pristine, x, second, 0.25))
        runtime.activate(0)
        _close(model(x), _expected(pristine, x, first))
        runtime.unload(0)
        _close(model(x), _expected(pristine, x, None))
    assert counter.frame_count == 1


def test_regional_routing_compiles_once_then_routes_without_recompiling() -> None:
    """A routed batch is a graph of its own (the compiler guards on whether a routing is set):
    one more graph for all blocks together, then any routing of the batch replays it."""
    model = _model()
    pristine = copy.deepcopy(model)
    runtime = lorahot.inject(model, list(KINDS), max_rank=MAX_RANK, slots=2, regional=True)
    held = []
    for slot, (rank, seed) in enumerate(((4, 1), (2, 2))):
        tensors, ab = make_adapter(model, dict.fromkeys(_names(), rank), seed=seed)
        runtime.load(tensors, slot=slot, config={"lora_alpha": rank})
        held.append({n: (a, b, 1.0) for n, (a, b) in ab.items()})
    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    _compile_blocks(model, counter)
    x = torch.randn(3, 4, DIM, generator=torch.Generator().manual_seed(4))
    runtime.activate([0, 1, -1])
    with torch.no_grad():
        model(x)
    assert counter.frame_count == 1
    with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
        for route in ([1, -1, 0], [0, 0, 1], [-1, -1, -1]):
            runtime.activate(route)
            got = model(x)
            for row, slot in enumerate(route):
                want = _expected(pristine, x[row : row + 1], None if slot < 0 else held[slot])
                _close(got[row : row + 1], want)
    assert counter.frame_count == 1


def test_regional_blocks_compiled_with_dynamic_shapes_share_one_graph_across_batch_sizes() -> None:
    """dynamic=True: a view whose size equals the batch (or another view's offset) became a
    guard, which the next block or batch size broke; the views' shapes are static."""
    model = _model()
    runtime = lorahot.inject(model, list(KINDS), max_rank=MAX_RANK, regional=True)
    runtime.load(make_adapter(model, dict.fromkeys(_names(), 2), seed=1)[0])
    counter = torch._dynamo.testing.CompileCounterWithBackend("eager")
    for block in model.blocks:
        block.compile(backend=counter, dynamic=True)
    with torch.no_grad():
        model(torch.randn(3, 4, DIM))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for shape in ((6, 4), (4, 3), (5, 7)):  # batch 4 = max_rank, sequence 3 = the conv's kernel
                model(torch.randn(*shape, DIM))
    assert counter.frame_count == 1


def test_negative_control_blocks_recompile_without_regional() -> None:
    """The same model injected for a whole-model compile: the second block's graph differs (its
    layers' buffer offsets), which ``error_on_recompile`` reports."""
    model = _model()
    runtime = lorahot.inject(model, list(KINDS), max_rank=MAX_RANK)
    runtime.load(make_adapter(model, dict.fromkeys(_names(), 2), seed=1)[0])
    _compile_blocks(model, "eager")
    x = torch.randn(2, 5, DIM)
    with (
        torch._dynamo.config.patch(error_on_recompile=True),
        torch.no_grad(),
        pytest.raises(torch._dynamo.exc.RecompileError),
    ):
        model(x)


def test_regional_must_be_a_bool() -> None:
    with pytest.raises(lorahot.UsageError, match="regional"):
        lorahot.inject(_model(), ["q"], max_rank=2, regional="yes")  # type: ignore[arg-type]


@pytest.mark.gpu
def test_gpu_regional_blocks_bf16() -> None:
    """On CUDA in bf16 (the fused kernel at these rows, the wide path above them), each block
    compiled on its own (default mode: block by block under CUDA graphs, torch 2.11 refuses an
    output a later block's replay overwrote, for the base model as well), swaps without
    recompiling, against the float64 reference to bf16's rounding of outputs in the hundreds."""
    model = _model().to("cuda", torch.bfloat16)
    pristine = _model().to("cuda", torch.bfloat16)
    runtime = lorahot.inject(model, ["q", "o"], max_rank=MAX_RANK, regional=True)
    adapters = []
    for rank, seed in ((4, 1), (2, 2)):
        tensors, ab = make_adapter(model, dict.fromkeys(_names(("q", "o")), rank), seed=seed)
        adapters.append(
            ({k: v.cuda() for k, v in tensors.items()}, {n: (a.cuda(), b.cuda(), 1.0) for n, (a, b) in ab.items()})
        )
    runtime.load(adapters[0][0], config={"lora_alpha": 4})
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    for block in model.blocks:
        block.compile(backend=counter)
    for rows in (2, 64):  # 10 and 320 tokens
        x = torch.randn(rows, 5, DIM, device="cuda", dtype=torch.bfloat16)
        runtime.load(adapters[0][0], config={"lora_alpha": 4})
        for _ in range(3):
            with torch.no_grad():
                model(x)
        with torch._dynamo.config.patch(error_on_recompile=True), torch.no_grad():
            for tensors, held in (adapters[1], adapters[0]):
                runtime.load(tensors, config={"lora_alpha": next(iter(held.values()))[0].shape[0]})
                got = model(x).clone()
                want = _expected(pristine, x, held)
                torch.testing.assert_close(got.double(), want, rtol=3e-2, atol=3e-2 * float(want.abs().max()))
    assert counter.frame_count == 2  # one graph per row count, shared by the ten blocks


@pytest.mark.parametrize("extras", [False, pytest.param(True, marks=pytest.mark.slow)])  # 8 s: two compiled runs
def test_a_routed_embedding_before_regional_blocks_adds_no_graph(extras: bool) -> None:
    """A routed embedding's output feeds the first compiled block: as a view its base was
    guarded on, and the first routed packed call compiled one graph more with the embedding
    targeted than without (an independent audit); now the same count either way, and the routed
    embedding's output is no view. With ``extras=True`` (DoRA, LoRA biases) the routed output was
    still a view of the row-shaped result, and the packed call still added that graph."""
    from tests.helpers import tiny_lm, token_ids

    def frames(embedding: bool) -> int:
        torch._dynamo.reset()
        model = tiny_lm(layers=2)  # the second block takes the first's output, not the embedding's
        targets = ["q_proj", "v_proj", "up_proj", *(["embed_tokens"] if embedding else [])]
        runtime = lorahot.inject(model, targets, max_rank=4, slots=3, regional=True, extras=extras)
        for k in range(3):
            runtime.load(make_adapter(model, dict.fromkeys(runtime.layers, 1 + k), seed=k)[0], slot=k)
        counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
        for block in model.layers:
            block.compile(backend=counter)
        with torch.no_grad():
            model(token_ids((4, 5), 32, seed=3))
            runtime.activate([0, 1, 2, -1])
            model(token_ids((4, 5), 32, seed=3))
            runtime.activate([1, 2], lengths=[5, 7])
            packed = token_ids((1, 12), 32, seed=4)
            out = model.embed_tokens(packed)
            assert out._base is None, "the routed output is a view"
            model(packed)
            with torch._dynamo.config.patch(error_on_recompile=True):
                runtime.activate([2, 0], lengths=[9, 3])
                model(packed)
        return int(counter.frame_count)

    assert frames(embedding=True) == frames(embedding=False)
