"""The rewrite of compiled wide layers whose input the compiler would copy into ``[x | h]``
(:mod:`lorahot.kernels.extern_inputs`; on by default, switched explicitly here).

Compiled with inductor on the CPU, wide layers forced on: a layer after a batched GEMM is
rewritten, one after an elementwise op and two sharing a graph input are not; the outputs are
held to a float64 eager reference through swaps with ``error_on_recompile=True``, with the
rewrite switched off as the negative control.
"""

from __future__ import annotations

import operator

import pytest
import torch
from torch import nn

import lorahot
from lorahot.kernels import extern_inputs, fx_graph, stacked_shrinks, wide_groups
from lorahot.runtime import wide
from tests.helpers import make_adapter

pytestmark = pytest.mark.usefixtures("fresh_compiler")  # tests/unit/kernels/conftest.py

D, R = 16, 4
_aten = torch.ops.aten


class _Block(nn.Module):
    """``o`` after a batched GEMM (the compiler calls it: its output must be copied into a
    concatenation), ``p`` after a ReLU (generated: written straight into one), ``k`` and ``v``
    over the second input (a graph input, shared: their shrinks are stacked instead)."""

    def __init__(self) -> None:
        super().__init__()
        self.o = nn.Linear(D, D)
        self.p = nn.Linear(D, D)
        self.k = nn.Linear(D, D)
        self.v = nn.Linear(D, D)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        mixed = torch.bmm(x, y)
        shared = self.k(y) * self.v(y)
        return self.o(mixed) + x + self.p(torch.relu(x)) * shared.sum()


def _spy(monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], list[int]]:
    """Records each graph's rewrites and, after them, its concatenations."""
    rewrites: list[int] = []
    cats: list[int] = []
    rewrite, stack = extern_inputs.rewrite_extern_inputs, stacked_shrinks.stack_shrinks

    def counted_rewrite(graph: torch.fx.Graph) -> int:
        rewrites.append(rewrite(graph))
        return rewrites[-1]

    def counted_stack(graph: torch.fx.Graph) -> int:
        cats.append(sum(1 for n in graph.nodes if n.target is _aten.cat.default))
        return stack(graph)

    monkeypatch.setattr(extern_inputs, "rewrite_extern_inputs", counted_rewrite)
    monkeypatch.setattr(stacked_shrinks, "stack_shrinks", counted_stack)
    return rewrites, cats


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["float64", "float16"])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "extras"])
@pytest.mark.parametrize("enabled", [True, False], ids=["rewritten", "negative-control"])
def test_a_layer_after_a_library_gemm_drops_its_concatenation(
    enabled: bool, extras: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only ``o`` is rewritten (its input comes from ``bmm``): three concatenations are left
    (``p``'s, ``k``'s and ``v``'s) where there were four. Compiled, the block equals the eager
    one, and after two swaps it still does, with no recompile; so it does with the rewrite off.
    Layers with extras (``inject(..., extras=True)``: DoRA, LoRA bias) take another forward
    (the extras' pass after the wide formula) and are rewritten alike. float16 layers, whose
    shrink reads the runtime's copy of their shifted A rows, are rewritten alike (within
    float16's rounding)."""
    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    monkeypatch.setattr(wide_groups, "ENABLED", False)  # k and v as one GEMM in default mode: no concatenation
    monkeypatch.setattr(extern_inputs, "ENABLED", enabled)
    rewrites, cats = _spy(monkeypatch)
    torch.manual_seed(0)
    model = _Block().to(dtype).eval()
    names = ["o", "p", "k", "v"]
    runtime = lorahot.inject(model, names, max_rank=R, extras=extras)
    adapters = [make_adapter(model, dict.fromkeys(names, r), seed=s)[0] for r, s in ((4, 0), (2, 1), (3, 2))]
    if extras:  # a LoRA bias on every layer, so that the extras' pass changes the output
        for adapter in adapters:
            adapter.update({f"base_model.model.{n}.lora_B.bias": torch.randn(D) for n in names})
    adapters = [{k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in ad.items()} for ad in adapters]
    runtime.load(adapters[0])
    x = torch.randn(3, 5, D).to(dtype)
    y = (torch.randn(3, D, D) / D**0.5).to(dtype)  # k and v read it as 3 x 16 rows
    compiled = torch.compile(model)

    def same() -> None:  # float16: two formulas' roundings, amplified by the block's sum over k * v
        want = model(x, y)
        tol = 1e-9 if dtype == torch.float64 else 1e-2 * float(want.abs().max())
        torch.testing.assert_close(compiled(x, y), want, rtol=tol, atol=tol)

    with torch.no_grad():
        same()
        with torch._dynamo.config.patch(error_on_recompile=True):
            for adapter in adapters[1:]:
                runtime.load(adapter)
                same()
    assert rewrites == ([1] if enabled else [])
    assert cats == ([3] if enabled else [4])


class _Chain(nn.Module):
    """``a`` after a batched GEMM, ``b`` over ``a``'s output alone (a library GEMM's output too,
    until ``a`` is rewritten)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.b(self.a(torch.bmm(x, y)))
        return out


@pytest.mark.parametrize("enabled", [True, False], ids=["rewritten", "negative-control"])
def test_a_layer_over_a_rewritten_layers_output_keeps_its_concatenation(
    enabled: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``a`` is rewritten; ``b`` then reads ``a``'s expand, an addition the compiler generates,
    and keeps its concatenation (one rewrite). The rewrite of ``b`` had been planned from the
    graph before ``a``'s and read ``a``'s erased GEMM: the compiler's topological sort raised
    (found by a CPU trace-cost probe). The chain equals the eager one through a swap."""
    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    monkeypatch.setattr(wide_groups, "ENABLED", False)
    monkeypatch.setattr(extern_inputs, "ENABLED", enabled)
    rewrites, cats = _spy(monkeypatch)
    torch.manual_seed(0)
    model = _Chain().double()
    runtime = lorahot.inject(model, ["a", "b"], max_rank=R, extras=False)
    adapters = [make_adapter(model, {"a": r, "b": r}, seed=r)[0] for r in (4, 2)]
    runtime.load(adapters[0])
    x, y = torch.randn(3, 5, D, dtype=torch.float64), torch.randn(3, D, D, dtype=torch.float64) / D**0.5
    compiled = torch.compile(model)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, y), model(x, y), rtol=1e-9, atol=1e-9)
        runtime.load(adapters[1])
        with torch._dynamo.config.patch(error_on_recompile=True):
            torch.testing.assert_close(compiled(x, y), model(x, y), rtol=1e-9, atol=1e-9)
    assert rewrites == ([1] if enabled else [])
    assert cats == ([1] if enabled else [2])


class _Lookalike(nn.Module):
    """No lorahot layer: the traced formula of a wide layer after a library GEMM, over the
    user's own tensors, whose ``A`` (a view of ``bank``) is not ``mat``'s last rows."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("bank", torch.randn(3, R * D, dtype=torch.float64))
        self.register_buffer("mat", torch.randn(D + R, D + R, dtype=torch.float64))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        z = torch.bmm(x, y).reshape(-1, D)
        h = z @ self.bank.as_strided((R, D), (D, 1), R * D).t()
        return torch.nn.functional.linear(torch.cat([z, h], dim=-1), self.mat[:D])


@pytest.mark.parametrize(
    "case",
    ["a user's graph", "a live layer's geometry", "negative-control: identity unchecked"],
)
def test_a_graph_that_only_looks_like_a_wide_layer_is_left_as_it_is(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The passes are installed for every compiled graph once a runtime exists; a user's graph
    of the formula's shape, beside a runtime's wide layer, is not rewritten and keeps its
    numbers, even where its tensors have exactly a live wide layer's geometry (registered
    here): its nodes were traced from ``cat`` and ``matmul``, not from a wide layer's call of
    ``lorahot::wide_traced``. With that check taken out (the negative control), the rewrite
    takes the registered lookalike and reads ``mat``'s rows for ``A``: wrong numbers, which the
    test sees."""
    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    monkeypatch.setattr(extern_inputs, "ENABLED", True)
    rewrites, _ = _spy(monkeypatch)
    torch.manual_seed(0)
    chain = _Chain().double()
    lorahot.inject(chain, ["a"], max_rank=R, extras=False)  # a live wide layer: the passes installed
    user = _Lookalike()
    if case != "a user's graph":
        extern_inputs.register(user.mat, user.bank, ((R, D), (D, 1), R * D))
    if case.startswith("negative-control"):
        monkeypatch.setattr(extern_inputs, "_one_wide_call", lambda *nodes: True)
    x, y = torch.randn(3, 5, D, dtype=torch.float64), torch.randn(3, D, D, dtype=torch.float64)
    with torch.no_grad():
        got, want = torch.compile(user)(x, y), user(x, y)
    rewritten = case.startswith("negative-control")
    assert rewrites == [int(rewritten)]
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-9) is not rewritten


def test_a_layers_formula_is_traced_from_one_call_of_the_operator(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the identity check reads: every node the rewrite matches in a wide layer's compiled
    graph was traced from one call of ``lorahot::wide_traced`` (o and p: two calls), and the
    name the check compares with is that operator's."""
    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    monkeypatch.setattr(extern_inputs, "ENABLED", True)
    monkeypatch.setattr(wide_groups, "ENABLED", False)  # each layer its own formula, as above
    assert torch.ops.lorahot.wide_traced._qualified_op_name == extern_inputs.WIDE_TRACED
    calls: list[set[tuple[str, str] | None]] = []
    match = extern_inputs._match

    def spy(node: torch.fx.Node, known: set[extern_inputs.Signature]) -> extern_inputs.Match | None:
        found = match(node, known)
        if found is not None:
            cat = node.args[1] if node.target is _aten.addmm.default else node.args[0]
            calls.append({fx_graph.traced_call(n) for n in (node, cat, found[1])})  # type: ignore[arg-type]
        return found

    monkeypatch.setattr(extern_inputs, "_match", spy)
    model = _Block().double()
    lorahot.inject(model, ["o", "p"], max_rank=R, extras=False)
    x, y = torch.randn(3, 5, D, dtype=torch.float64), torch.randn(3, D, D, dtype=torch.float64)
    with torch.no_grad():
        torch.compile(model)(x, y)
    assert calls and all(len(c) == 1 for c in calls)  # each match one call (layers are matched twice)
    names = {next(iter(c)) for c in calls}
    assert len(names) == 2 and all(what == extern_inputs.WIDE_TRACED for _, what in names)  # type: ignore[misc]


def test_the_registered_geometries_follow_the_wide_layers_and_key_the_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    """Widening registers a layer's geometry, a copy of the model registers its own buffers, and
    eject forgets them even while the runtime (which keeps views of the buffers) lives on; the
    passes' cache id changes with them, so inductor's cache cannot carry a rewrite into a
    process whose layers have other geometries."""
    import copy
    import gc

    from lorahot.layers.base import WIDE_BUFFER

    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    model = nn.Sequential(nn.Linear(13, 11), nn.ReLU(), nn.Linear(11, 7)).double()  # sizes no other test uses
    before = set(extern_inputs.signatures())
    uuid = stacked_shrinks.StackShrinks(None).uuid()
    runtime = lorahot.inject(model, ["0", "2"], max_rank=3, extras=False)
    buffers = [layer._buffers[WIDE_BUFFER] for layer in runtime.layers.values()]
    assert all(b in extern_inputs._LAYERS for b in buffers)
    mine = set(extern_inputs.signatures()) - before
    assert len(mine) == 2 and stacked_shrinks.StackShrinks(None).uuid() != uuid
    twin = copy.deepcopy(model)
    copied = [twin.get_submodule(n)._buffers[WIDE_BUFFER] for n in ("0", "2")]
    assert all(b in extern_inputs._LAYERS for b in copied)
    runtime.eject()
    assert not any(b in extern_inputs._LAYERS for b in buffers)
    assert all(b in extern_inputs._LAYERS for b in copied)
    del twin, copied
    gc.collect()
    assert not mine & set(extern_inputs.signatures())


def test_what_needs_a_copy() -> None:
    """A graph input, a library GEMM's output, one output of attention and a custom
    operator's, behind views or not, need a copy; an elementwise op's output does not."""
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    bmm = graph.call_function(_aten.bmm.default, (x, x))
    permuted = graph.call_function(_aten.permute.default, (bmm, [1, 0, 2]))
    view = graph.call_function(_aten.view.default, (permuted, [4, 4]))
    relu = graph.call_function(_aten.relu.default, (x,))
    attention = graph.call_function(_aten._scaled_dot_product_flash_attention_for_cpu.default, (x, x, x))
    out = graph.call_function(operator.getitem, (attention, 0))
    custom = graph.call_function(torch.ops.lorahot.wide_linear_dynamic.default, (x, x, x, x, x, True))
    assert extern_inputs.needs_copy(x) and extern_inputs.needs_copy(view) and extern_inputs.needs_copy(out)
    assert extern_inputs.needs_copy(custom)
    assert not extern_inputs.needs_copy(relu)
    assert not extern_inputs.needs_copy(graph.call_function(_aten.view.default, (relu, [4, 4])))


def test_a_diffusers_unet_rewrites_the_projections_after_attention(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a diffusers UNet (wide layers on the CPU) the rewrite takes the two ``to_out.0``
    of every transformer block, whose input is attention's output. The stacked-shrink pass
    (:mod:`lorahot.kernels.stacked_shrinks`), in the same compile, finds the shrinks that share
    an input in every block: self-attention's q, k and v (two removed), cross-attention's k and
    v over the text states (one removed, and they keep the concatenated form together); q of
    cross-attention, the output projections and the feed-forward keep theirs. The compiled
    step equals the eager one. (One compile covers both passes.)

    The UNet is ``tests.helpers.tiny_unet`` narrowed so that every transformer block is of this
    one kind: one resolution (16 channels, no down- or upsampling, no middle block), a
    down block without attention and a cross-attention up block, whose two transformer blocks
    (over the concatenations with the skips) read the same text states: each block's k and v
    are stacked apart from the other block's."""
    pytest.importorskip("diffusers")
    from tests.helpers import tiny_unet

    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    monkeypatch.setattr(wide_groups, "ENABLED", False)  # q/k/v as one GEMM in default mode: no shrinks to stack
    monkeypatch.setattr(extern_inputs, "ENABLED", True)
    rewrites, _ = _spy(monkeypatch)
    removed: list[int] = []
    stack = stacked_shrinks.stack_shrinks
    monkeypatch.setattr(stacked_shrinks, "stack_shrinks", lambda graph: removed.append(stack(graph)) or 0)
    unet = tiny_unet(
        block_out_channels=(16,),
        down_block_types=("DownBlock2D",),
        up_block_types=("CrossAttnUpBlock2D",),
        mid_block_type=None,
    )
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"]
    runtime = lorahot.inject(unet, targets, max_rank=R, extras=False)
    blocks = sum(1 for name, _ in unet.named_modules() if name.endswith("attn1"))
    runtime.load(make_adapter(unet, {n: 4 for n, _ in runtime.layers.items()})[0])
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 4, 8, 8, generator=g)
    text = torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        got = torch.compile(unet)(sample, 10, encoder_hidden_states=text).sample
        want = unet(sample, 10, encoder_hidden_states=text).sample
    assert blocks == 2 and rewrites == [2 * blocks] and removed == [3 * blocks]
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead", "reduce-overhead-grouped"])
def test_gpu_a_rewritten_layer_follows_swaps(mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The block on CUDA in bf16 (wide layers; CUDA graphs in reduce-overhead), 2 x 256 rows
    (past the fused kernel's), the rewrite on: one layer rewritten, and the compiled block
    gives the eager one's output through swaps, no recompile.

    The four layers share a parent and an input width, so inject makes them one wide group
    (:mod:`lorahot.kernels.wide_groups`). A group's members run the operator that reads its
    input in place (under CUDA graphs, at few rows, the fused kernel; in default mode the
    group's formula in aten), so there is no concatenation left to rewrite:
    ``reduce-overhead-grouped`` checks exactly that, and ``default`` and ``reduce-overhead``
    widen each layer alone, as a layer without neighbours (an MLP's ``down``) is, to test the
    rewrite there; in default mode, where at up to :data:`~lorahot.kernels.wide_groups.ROWS`
    rows a layer alone runs its GEMM over ``[W; A]`` and its expand, with that off
    (:data:`~lorahot.kernels.wide_groups.ALONE`), as it is above those rows.

    ``max_rank=8``: every GEMM's sizes a multiple of 8, so inductor's shape padding has nothing
    to pad. With rank 4 the wide GEMM's ``K`` (16 + 4) and the shrink's ``N`` (4) are not, and
    where inductor's timing of the padded form against the plain one (``pad_mm``, cached on
    disk per shape) picks the padded form, the layer's GEMMs no longer have the form the
    rewrite matches: the numbers stay right, one launch is not saved. That is the likely cause
    of one GPU run in which both modes counted no rewrite (2026-12-02; not confirmed: three
    later runs of the rank-4 form, on two machines, rewrote)."""
    monkeypatch.setattr(extern_inputs, "ENABLED", True)
    rewrites, _ = _spy(monkeypatch)
    joined: list[int] = []
    group = wide_groups.group_wide_layers
    monkeypatch.setattr(wide_groups, "group_wide_layers", lambda graph: joined.append(group(graph)) or 0)
    monkeypatch.setattr(wide_groups, "ALONE", False)
    if mode != "reduce-overhead-grouped":
        singles = wide._groups
        monkeypatch.setattr(wide, "_groups", lambda *a: [[m] for g in singles(*a) for m in g])
    torch.manual_seed(0)
    model = _Block().cuda().to(torch.bfloat16).eval()
    names = ["o", "p", "k", "v"]
    runtime = lorahot.inject(model, names, max_rank=8, extras=False)
    adapters = [make_adapter(model, dict.fromkeys(names, r), seed=s)[0] for r, s in ((4, 0), (2, 1))]
    runtime.load(adapters[0])
    x = torch.randn(2, 256, D, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(2, D, D, device="cuda", dtype=torch.bfloat16) / D**0.5
    compiled = torch.compile(model, mode=None if mode == "default" else "reduce-overhead")
    with torch.no_grad():
        compiled(x, y)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for adapter in adapters:
                runtime.load(adapter)
                got = compiled(x, y).float().clone()
                want = model(x, y).float()
                assert float((got - want).norm() / want.norm()) < 2e-2
    if mode == "reduce-overhead-grouped":
        # o and p (512 rows) run the operator; k and v read y's 32 rows, where the fused kernel
        # pays for every member of the group, so they take it and there is nothing to join
        # (test_wide_groups joins members at such rows)
        assert rewrites == [0] and joined == [0]
    else:
        assert rewrites and all(r == 1 for r in rewrites)
