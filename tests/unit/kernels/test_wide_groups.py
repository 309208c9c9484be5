"""Wide layers that read one input as one GEMM (:mod:`lorahot.kernels.wide_groups`).

The operator against a float64 reference on both of its paths (the fused kernel's, here its
CPU stand-in, and the one GEMM with the expands in place), for any number of members and
shapes. Then the allocation :func:`lorahot.runtime.wide.widen_layers` makes and the compiler
pass, compiled on the CPU as for CUDA graphs (``mode="reduce-overhead"``: the graph is the one
CUDA graphs would capture), with the layers' fused flag forced on as it is on CUDA: the pass
joins the layers over one input, not the others; the output equals the eager model's through
swaps with ``error_on_recompile=True``; the pass switched off is the negative control.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn

import lorahot
from lorahot.kernels import unrolled_expand, wide_groups
from lorahot.layers import linear as linear_layer
from lorahot.layers.tensor_handles import TENSORS
from lorahot.runtime import wide
from tests.helpers import make_adapter

D, R = 24, 8
NAMES = ["q", "k", "v", "o"]


def _operands(
    outs: list[int], k: int, r: int, m: int, dtype: torch.dtype, device: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, list[tuple[torch.Tensor, ...]]]:
    """``x [m, k]``, the group's allocation (each member's ``[[w, (s * bt).T], [a, 0]]`` in
    turn) and per member ``(w, a, bt, s)``."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    alloc = torch.zeros(sum(n + r for n in outs), k + r, device=device, dtype=dtype)
    members = []
    row = 0
    for n in outs:
        w = torch.randn(n, k, device=device, dtype=dtype, generator=g) / k**0.5
        a = torch.randn(r, k, device=device, dtype=dtype, generator=g) / k**0.5
        bt = torch.randn(r, n, device=device, dtype=dtype, generator=g) / r**0.5
        s = torch.empty(r, device=device, dtype=torch.promote_types(dtype, torch.float32)).uniform_(-2, 2, generator=g)
        s[::3] = 0.0
        block = alloc[row : row + n + r]
        block[:n, :k], block[:n, k:], block[n:, :k] = w, (bt * s[:, None]).to(dtype).T, a
        members.append((w, a, bt, s))
        row += n + r
    return x, alloc, members


def _reference(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    d = torch.Tensor.double
    return d(x) @ d(w).T + ((d(x) @ d(a).T) * d(s)) @ d(bt)


@settings(max_examples=25, deadline=None)
@given(
    outs=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    k=st.integers(1, 24),
    r=st.integers(1, 8),
    m=st.integers(0, 300),
    fused=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(outs=[3, 4], k=0, r=2, m=5, fused=False, seed=0)  # no inputs (a shard's in may be 0): zeros
@example(outs=[3, 4], k=0, r=2, m=5, fused=True, seed=0)
def test_the_operator_matches_float64_reference_on_either_path(
    outs: list[int], k: int, r: int, m: int, fused: bool, seed: int
) -> None:
    """Every member's output lies in the columns of its ``W`` rows, equal to its own formula;
    the shrink columns beside it are the pass's to ignore."""
    x, alloc, members = _operands(outs, k, r, m, torch.float64, "cpu", seed)
    a, bt, s = ([mem[i] for mem in members] for i in (1, 2, 3))
    y = wide_groups.wide_group(x.reshape(1, m, k), alloc, outs, a, bt, s, fused=fused)
    assert y.shape == (1, m, alloc.shape[0])
    at = 0
    for n, member in zip(outs, members, strict=True):
        if m:
            torch.testing.assert_close(y[0, :, at : at + n], _reference(x, *member), rtol=1e-10, atol=1e-10)
        at += n + r


def test_the_operator_fake_agrees_with_the_real_output_and_refuses_gradients() -> None:
    x, alloc, members = _operands([10, 6, 6], 12, 4, 20, torch.float32, "cpu", seed=3)
    a, bt, s = ([mem[i] for mem in members] for i in (1, 2, 3))
    for fused in (False, True):
        torch.library.opcheck(
            torch.ops.lorahot.wide_group.default,
            (x.reshape(4, 5, 12), alloc, [10, 6, 6], a, bt, s, fused),
            test_utils=("test_schema", "test_faketensor"),
        )
    with pytest.raises(RuntimeError, match="no backward"):
        wide_groups.wide_group(x.requires_grad_(), alloc, [10, 6, 6], a, bt, s, fused=False)


class _Attention(nn.Module):
    """q, k and v over one input (a SiLU's output, as a norm feeds them), o over another; with
    ``ctx``, k and v over it and q over ``x`` (cross-attention)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(D, D)
        self.k = nn.Linear(D, D // 2)
        self.v = nn.Linear(D, D // 2)
        self.o = nn.Linear(D // 2, D)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        h = torch.nn.functional.silu(x)
        c = h if ctx is None else torch.nn.functional.silu(ctx)
        q = self.q(h)
        y = q[..., : D // 2] * self.k(c) + self.v(c) * q[..., D // 2 :]
        return self.o(y)


@pytest.fixture
def as_on_cuda(monkeypatch: pytest.MonkeyPatch, fresh_compiler: None) -> Iterator[list[int]]:
    """CPU layers widened and flagged fused as CUDA's are (the fused kernel itself never asked
    for eagerly: the CPU has none); yields the operators the passes removed, per graph (the
    joint-graph lowering's and the post-grad pass's, which runs after it, together)."""
    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    monkeypatch.setattr(linear_layer.LoRALinear, "fusable", lambda self, a: True)
    monkeypatch.setattr(linear_layer.LoRALinear, "can_fuse", lambda self, x, a: False)
    removed: list[int] = []
    early: list[int] = []
    real, real_early = wide_groups.group_wide_layers, wide_groups.lower_early

    def lowered_early(graph: torch.fx.Graph) -> int:
        early.append(real_early(graph))
        return 0

    def grouped(graph: torch.fx.Graph) -> int:
        removed.append(real(graph) + sum(early))
        early.clear()
        return 0

    monkeypatch.setattr(wide_groups, "lower_early", lowered_early)
    monkeypatch.setattr(wide_groups, "group_wide_layers", grouped)
    yield removed


def _model() -> tuple[nn.Module, lorahot.LoraRuntime, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    model = _Attention().double()
    runtime = lorahot.inject(model, NAMES, max_rank=R, extras=False)
    adapters = [make_adapter(model, dict.fromkeys(NAMES, r), seed=s)[0] for r, s in ((4, 0), (8, 1), (2, 2))]
    runtime.load(adapters[0])
    return model, runtime, adapters


def _eager(model: nn.Module, *args: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(*args)
    return out


def test_neighbours_under_one_parent_share_one_allocation_back_to_back(as_on_cuda: list[int]) -> None:
    """q, k, v and o (one parent, one input width) in one allocation, each layer's wide buffer
    a block of it in module order, its weight a view there; eject gives every weight its own
    storage back, bitwise as it was."""
    torch.manual_seed(0)
    model = _Attention().double()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    runtime = lorahot.inject(model, NAMES, max_rank=R, extras=False)
    q, k, v, o = (getattr(model, n) for n in NAMES)
    alloc = TENSORS[q._wide_at[0]][0]
    assert [layer._wide_at[0] for layer in (q, k, v)] == [q._wide_at[0]] * 3
    assert o._wide_at is None  # another input width: a buffer of its own
    row = 0
    for layer in (q, k, v):
        buffer = layer._buffers["_lora_wide"]
        assert buffer.untyped_storage().data_ptr() == alloc.untyped_storage().data_ptr()
        assert buffer.storage_offset() == row * (D + R) == layer._wide_at[1][2]
        assert layer.base_layer.weight.data_ptr() == buffer.data_ptr()
        row += layer.spec.out_dim + R
    assert row == alloc.shape[0]
    runtime.eject()
    for name in NAMES:
        weight = getattr(model, name).weight
        assert weight.is_contiguous() and weight.untyped_storage().nbytes() == weight.numel() * 8
    assert all(torch.equal(model.state_dict()[key], value) for key, value in before.items())


@pytest.mark.parametrize("on", [True, False], ids=["joined", "negative-control"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "symbolic-rows"])
def test_layers_over_one_input_run_as_one_operator_through_swaps(
    dynamic: bool, on: bool, as_on_cuda: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled as for CUDA graphs, past the fused kernel's rows (and, with a symbolic row
    count, below them too: the operator's fused path): q, k and v become one operator (two
    removed), and every output equals the eager model's, also after two swaps, with no
    recompile. With the pass off nothing is removed, and the outputs are the same. (No shape
    with a leading 1, which the compiler specializes: the three shapes run one graph.)"""
    monkeypatch.setattr(wide_groups, "ENABLED", on)
    model, runtime, adapters = _model()
    compiled = torch.compile(model, mode="reduce-overhead", dynamic=dynamic, fullgraph=True)
    shapes = [(2, 150, D), (2, 4, D), (3, 101, D)] if dynamic else [(2, 150, D)]
    xs = [torch.randn(*shape, dtype=torch.float64) for shape in shapes]
    with torch.no_grad():
        for x in xs:
            torch.testing.assert_close(compiled(x), _eager(model, x), rtol=1e-9, atol=1e-9)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for adapter in adapters[1:]:
                runtime.load(adapter)
                for x in xs:
                    torch.testing.assert_close(compiled(x), _eager(model, x), rtol=1e-9, atol=1e-9)
    assert as_on_cuda == ([2] if on else [0])  # one graph; with the pass off none removed


def test_layers_over_different_inputs_are_not_joined(as_on_cuda: list[int]) -> None:
    """Cross-attention: q reads ``x``, k and v read ``ctx``. Only k and v are joined (one
    removed); the output is the eager one."""
    model, _, _ = _model()
    x, ctx = torch.randn(2, 150, D, dtype=torch.float64), torch.randn(2, 150, D, dtype=torch.float64)
    compiled = torch.compile(model, mode="reduce-overhead", dynamic=False, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, ctx), _eager(model, x, ctx), rtol=1e-9, atol=1e-9)
    assert as_on_cuda == [1]


class _Unequal(nn.Module):
    """q wider than the fused kernel's limit at 129-256 rows (512 outputs), k and v within it."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(D, 520)
        self.k = nn.Linear(D, 12)
        self.v = nn.Linear(D, 12)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(x)
        out: torch.Tensor = self.q(h)[..., :12] * self.k(h) + self.v(h)
        return out


def _unequal_compiled_as_eager(rows: int) -> None:
    """:class:`_Unequal` with an adapter on q, k and v, compiled under CUDA graphs with static
    rows over two sequences of ``rows / 2`` tokens, equals its eager forward."""
    torch.manual_seed(0)
    model = _Unequal().double()
    runtime = lorahot.inject(model, ["q", "k", "v"], max_rank=R, extras=False)
    runtime.load(make_adapter(model, dict.fromkeys(["q", "k", "v"], 4))[0])
    x = torch.randn(2, rows // 2, D, dtype=torch.float64)
    with torch.no_grad():
        got = torch.compile(model, mode="reduce-overhead", dynamic=False, fullgraph=True)(x)
    torch.testing.assert_close(got, _eager(model, x), rtol=1e-9, atol=1e-9)


def test_a_group_takes_the_fused_kernel_only_where_it_pays_for_every_member(as_on_cuda: list[int]) -> None:
    """At 200 rows the fused kernel would pay for k and v alone, not for q: the three run as
    one operator (two removed), where each deciding for itself left q alone in the operator
    and k and v on the fused kernel (which this CPU does not have: the negative control is
    that call failing)."""
    _unequal_compiled_as_eager(rows=200)
    assert as_on_cuda == [2]


@pytest.mark.parametrize("limit", [64, 128])
def test_between_the_limits_a_group_with_a_mid_width_member_takes_the_one_gemm(
    limit: int, as_on_cuda: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 96 rows the fused kernel pays for a widened layer of 12 outputs but, above
    ``lora_linear.WIDE_ROWS`` (64), not for one of 520: q, k and v run as one operator (two
    removed) and no fused kernel is called. The negative control, the limit at 128 as before:
    every member takes the fused kernel (a float64 stand-in here, the CPU having none) and
    nothing is joined."""
    from lorahot.kernels import lora_linear as fused_kernel

    calls: list[int] = []

    def stand_in(
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        bt: torch.Tensor,
        scale: torch.Tensor,
    ) -> torch.Tensor:
        calls.append(weight.shape[0])
        y = x @ weight.t() + ((x @ a.t()) * scale) @ bt
        return y if bias is None else y + bias

    monkeypatch.setattr(fused_kernel, "WIDE_ROWS", limit)
    monkeypatch.setattr(fused_kernel, "lora_linear", stand_in)
    _unequal_compiled_as_eager(rows=96)
    if limit == 64:
        assert as_on_cuda == [2] and calls == []
    else:
        assert as_on_cuda == [0] and sorted(calls) == [12, 12, 520]


class _Chain(nn.Module):
    """a and b over ``x``, c and d over a's output: the second group reads the first's."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (nn.Linear(D, D, bias=False) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ya = self.a(x)
        out: torch.Tensor = self.b(x) + self.c(ya) * self.d(ya)
        return out


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "symbolic-rows"])
def test_a_group_over_another_groups_output_is_joined_too(dynamic: bool, as_on_cuda: list[int]) -> None:
    """The first join makes a's output a slice of its operator, which c and d then read: both
    runs are joined and the output is the eager one (the pass looked the slice up in the
    graph's order from before the first join, and raised: an independent review's finding)."""
    torch.manual_seed(0)
    model = _Chain().double()
    runtime = lorahot.inject(model, ["a", "b", "c", "d"], max_rank=R, extras=False)
    runtime.load(make_adapter(model, dict.fromkeys(["a", "b", "c", "d"], 4))[0])
    x = torch.randn(300, D, dtype=torch.float64)
    with torch.no_grad():
        got = torch.compile(model, mode="reduce-overhead", dynamic=dynamic, fullgraph=True)(x)
    torch.testing.assert_close(got, _eager(model, x), rtol=1e-9, atol=1e-9)
    assert as_on_cuda == [2]


class _Strided(nn.Module):
    """q, k and v over one input; q and k read through ``as_strided`` with the strides their
    outputs have (a sliding-window view, as Longformer's chunking takes), v plainly; no bias
    (whose addition would write a new tensor for the view to read)."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(D, n, bias=False) for n in (D, D // 2, D // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q(x), self.k(x), self.v(x)
        rows = x.shape[0]
        windows = q.as_strided((rows - 1, 2, 6), (q.stride(0), q.stride(0), 1))  # rows i and i + 1
        keys = k.as_strided((rows, 2, 6), (k.stride(0), 3, 1))  # overlapping halves
        return windows.sum(1).sum(-1)[:, None] * v[:-1] + keys.prod(1).sum(-1)[:-1, None]


@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "symbolic-rows"])
@pytest.mark.parametrize("guarded", [True, False], ids=["left-alone", "negative-control"])
def test_an_output_read_through_as_strided_keeps_its_own_operator(
    guarded: bool, dynamic: bool, mode: str, as_on_cuda: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """``as_strided`` takes the strides and offset the layer's output had when traced (the
    operator's row stride ``out + R``) and reads the storage under any view, so a member joined
    into a group or lowered to the expands would be read at the wrong elements (an
    independent review's finding; out of bounds, as the negative control shows, where the
    pass ignores such readers). q and k keep their own operators, v alone is rewritten, and
    the output equals the eager model's through swaps, in both modes, with static and
    symbolic rows."""
    if not guarded:
        monkeypatch.setattr(wide_groups, "_strided", lambda node: False)
    torch.manual_seed(0)
    model = _Strided().double()
    names = ["q", "k", "v"]
    runtime = lorahot.inject(model, names, max_rank=R, extras=False)
    adapters = [make_adapter(model, dict.fromkeys(names, r), seed=s)[0] for r, s in ((4, 0), (8, 1))]
    runtime.load(adapters[0])
    compiled = torch.compile(model, mode=None if mode == "default" else mode, dynamic=dynamic, fullgraph=True)
    rows = (300, 9) if dynamic else (300,)  # static: past the fused kernel's rows
    xs = [torch.randn(m, D, dtype=torch.float64) for m in rows]
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=not dynamic):
        outs = []
        for adapter in adapters:
            runtime.load(adapter)
            outs += [(compiled(x), _eager(model, x)) for x in xs]
    if not guarded:  # the negative control: some output read at the wrong elements
        assert any(not torch.allclose(got, want) for got, want in outs)
        return
    for got, want in outs:
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert as_on_cuda[0] == (1 if mode == "default" else 0)  # v lowered alone; no run of two to join


@pytest.mark.parametrize(
    ("mode", "dynamic", "rows"),
    [("reduce-overhead", True, 300), ("reduce-overhead", False, 300), ("default", False, 300), ("default", False, 600)],
)
def test_a_move_after_inject_compiles_with_the_layers_own_buffers(
    mode: str, dynamic: bool, rows: int, as_on_cuda: list[int]
) -> None:
    """``model.double()`` after inject converts each layer's wide buffer apart from the group's
    allocation: the compiled layers read their own converted buffers (nothing to join), as
    before the groups, and compute what the eager model does (the allocation's old dtype had
    reached the operator, and, with static rows, the traced formula's shrink: an independent
    review's findings), with a symbolic row count, static rows under CUDA graphs, and static
    rows in default mode on either side of :data:`~lorahot.kernels.wide_groups.ROWS`."""
    torch.manual_seed(0)
    model = _Attention()
    runtime = lorahot.inject(model, NAMES, max_rank=R, extras=False)
    runtime.load(make_adapter(model, dict.fromkeys(NAMES, 4))[0])
    model.double()
    x = torch.randn(rows, D, dtype=torch.float64)
    with torch.no_grad():
        got = torch.compile(model, mode=None if mode == "default" else mode, dynamic=dynamic, fullgraph=True)(x)
    torch.testing.assert_close(got, _eager(model, x), rtol=1e-6, atol=1e-6)
    alone = mode == "default" and rows <= wide_groups.ROWS  # each layer lowered over its own buffer
    assert as_on_cuda == [len(NAMES) if alone else 0]


def test_a_compiled_call_does_not_recheck_a_member_s_own_buffer(
    as_on_cuda: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member of a wide group (q, k, v) reads its buffer as a view of the group's allocation
    through its handle, so a compiled call re-checks neither its ``_buffers`` (their keys, the
    wide buffer's tensor guard) nor ``_views``'s default argument: each would be guards per
    layer on every call (``benchmarks/experiments/guard_cost_probe.py``). o, in no allocation,
    reads its own buffer, which is guarded. Nor does it re-check, per layer, that the instance
    does not shadow the methods of the compiled path: that path is module functions
    (``lorahot.layers.linear.compiled_wide``). Negative control: ``model.float()`` converts the
    buffers apart from their allocations, the members leave their groups, and the graph
    reads, and guards, their own buffers, computing what the eager model does."""
    import torch._dynamo.guards as dynamo_guards

    trees: list[str] = []
    monkeypatch.setattr(dynamo_guards, "guard_manager_testing_hook_fn", lambda m, scope, b: trees.append(str(m)))
    model, _, _ = _model()
    members = [n for n in NAMES if model.get_submodule(n)._wide_at is not None]
    assert members == ["q", "k", "v"]
    x = torch.randn(2, 5, D, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True)(x), _eager(model, x), rtol=1e-9, atol=1e-9)
    forward = trees[-1]  # the forward's frame (the one before: the adapter_names= pre-hook's)
    assert "_modules['o']._buffers['_lora_wide']" in forward and "_plan" in forward
    assert not any(f"_modules['{n}']._buffers" in forward for n in members)
    assert "__defaults__" not in forward
    # the compiled paths are module functions: no per-layer check that the instance shadows none
    assert "___dict_contains('forward'" in forward  # (the modules' own calls are checked)
    assert not any(
        f"___dict_contains('{m}'" in forward for m in ("compiled_forward", "_views", "dynamic_forward", "_wide_input")
    )
    model.float()
    assert all(model.get_submodule(n)._wide_at is None for n in members)
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True)(x.float())
    torch.testing.assert_close(got, _eager(model, x.float()), rtol=1e-5, atol=1e-5)
    assert all(f"_modules['{n}']._buffers['_lora_wide']" in trees[-1] for n in members)


def test_a_copy_of_the_model_reads_its_own_allocation(as_on_cuda: list[int]) -> None:
    """A deepcopy's layers hold a handle of their own over the copied allocation (their plan
    names its key), so its compiled forward computes the copy's adapter, not the original's
    after a swap there."""
    model, runtime, adapters = _model()
    clone = copy.deepcopy(model)
    key, copied = model.q._wide_at[0], clone.q._wide_at[0]
    assert copied != key and clone.q._plan[7][0] == copied
    storage = clone.q._buffers["_lora_wide"].untyped_storage()
    assert TENSORS[copied][0].untyped_storage().data_ptr() == storage.data_ptr()
    x = torch.randn(2, 150, D, dtype=torch.float64)
    want = _eager(clone, x)
    runtime.load(adapters[1])  # the original only
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(clone, mode="reduce-overhead")(x), want, rtol=1e-9, atol=1e-9)
    assert as_on_cuda == [2]


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["reduce-overhead", "default"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "symbolic-rows"])
def test_gpu_a_group_follows_swaps_under_cuda_graphs(dynamic: bool, mode: str) -> None:
    """On CUDA in bf16 under CUDA graphs: 512 rows (the one GEMM) and, with a symbolic row
    count, 8 rows (each member's fused kernel inside the operator), through swaps, no
    recompile, each output near the eager model's. In default mode the same through the
    group's formula in aten (one GEMM, one batched expand over a stride-0 B)."""
    torch.manual_seed(0)
    model = _Attention().cuda().to(torch.bfloat16)
    runtime = lorahot.inject(model, NAMES, max_rank=R, extras=False)
    adapters = [make_adapter(model, dict.fromkeys(NAMES, r), seed=s)[0] for r, s in ((4, 0), (8, 1))]
    runtime.load(adapters[0])
    shapes = [(512, D), (8, D)] if dynamic else [(512, D)]
    xs = [torch.randn(*shape, device="cuda", dtype=torch.bfloat16) for shape in shapes]
    compiled = torch.compile(model, mode=None if mode == "default" else mode, dynamic=dynamic)
    with torch.no_grad():
        for x in xs:
            compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for adapter in adapters:
                runtime.load(adapter)
                for x in xs:
                    got = compiled(x).float().clone()
                    want = _eager(model, x).float()
                    assert float((got - want).norm() / want.norm()) < 1e-2


@settings(max_examples=25, deadline=None)
@given(
    outs=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    equal=st.booleans(),
    k=st.integers(1, 24),
    r=st.integers(1, 8),
    lead=st.lists(st.integers(0, 40), min_size=1, max_size=2),
    one_buffer=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_the_default_mode_formula_matches_float64_reference(
    outs: list[int], equal: bool, k: int, r: int, lead: list[int], one_buffer: bool, seed: int
) -> None:
    """:func:`~lorahot.kernels.wide_groups.expands` on each of its three forms (members of one
    width: one batched expand over their own B; members 2..k of one width and the first wider:
    one batched expand over the group's B columns; otherwise an expand per member), any leading
    shape (no rows too), the outputs apart or views of one buffer: each member's output is its
    own formula."""
    if equal:
        outs = [outs[0]] * len(outs)
    x, alloc, members = _operands(outs, k, r, math.prod(lead), torch.float64, "cpu", seed)
    got = wide_groups.expands(x.reshape(*lead, k), alloc, outs, one_buffer=one_buffer)
    assert len(got) == len(outs)
    for y, n, member in zip(got, outs, members, strict=True):
        assert y.shape == (*lead, n)
        torch.testing.assert_close(y.reshape(-1, n), _reference(x, *member), rtol=1e-10, atol=1e-10)


class _Block(nn.Module):
    """q, k and v over one input (q wider: one batched expand over the group's B columns), gate
    and up over another (one width: over their own B), o and down alone."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = nn.Linear(D, D), nn.Linear(D, D // 2), nn.Linear(D, D // 2), nn.Linear(D, D)
        self.gate, self.up, self.down = nn.Linear(D, 32, bias=False), nn.Linear(D, 32, bias=False), nn.Linear(32, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(x)
        q = self.q(h)
        z = self.o(torch.cat([q[..., : D // 2] * self.k(h), self.v(h)], -1)) + x
        out: torch.Tensor = self.down(torch.nn.functional.silu(self.gate(z)) * self.up(z)) + z
        return out


BLOCK = ["q", "k", "v", "o", "gate", "up", "down"]


def _gemms(code: list[str]) -> dict[str, int]:
    src = "\n".join(code)
    assert "lorahot." not in src.replace("lorahot.kernels", "")  # no lorahot operator left to run its body
    return {op: src.count(f"extern_kernels.{op}(") for op in ("mm", "addmm", "bmm")}


def _compiled_through_swaps(dynamic: bool, shapes: list[tuple[int, ...]]) -> list[str]:
    """The inductor code of :class:`_Block` (float64, lorahot on every projection) compiled in
    default mode at ``shapes[0]``, after checking that its outputs equal the eager model's at
    every shape through two swaps, with no recompile."""
    from torch._inductor.utils import run_and_get_code

    torch.manual_seed(0)
    model = _Block().double()
    runtime = lorahot.inject(model, BLOCK, max_rank=R, extras=False)
    adapters = [make_adapter(model, dict.fromkeys(BLOCK, r), seed=s)[0] for r, s in ((4, 0), (8, 1), (2, 2))]
    runtime.load(adapters[0])
    compiled = torch.compile(model, dynamic=dynamic, fullgraph=True)
    xs = [torch.randn(*shape, dtype=torch.float64) for shape in shapes]
    with torch.no_grad():
        got, code = run_and_get_code(compiled, xs[0])
        torch.testing.assert_close(got, _eager(model, xs[0]), rtol=1e-9, atol=1e-9)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for adapter in adapters[1:]:
                runtime.load(adapter)
                for x in xs:
                    torch.testing.assert_close(compiled(x), _eager(model, x), rtol=1e-9, atol=1e-9)
    return code


@pytest.mark.parametrize(
    ("dynamic", "on", "unroll"),
    [
        (False, True, "all"),
        (False, True, "members"),
        (False, True, "lone"),
        (False, True, "lone-sums"),
        (False, True, ""),
        (False, False, "all"),
        (True, True, "all"),
        (True, False, "all"),
    ],
    ids=[
        "static-joined",
        "static-joined-members-unrolled",
        "static-joined-lone-layers-unrolled",
        "static-joined-lone-layers-summed",
        "static-joined-gemm-expands",
        "static-negative-control",
        "symbolic-rows-joined",
        "symbolic-rows-negative-control",
    ],
)
def test_in_default_mode_a_group_is_one_gemm_and_one_batched_expand(
    dynamic: bool, on: bool, unroll: str, as_on_cuda: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Compiled in default mode (each call launches every kernel from the host, where an
    operator's Python body costs more than the launches it saves): q/k/v and gate/up each run
    as one GEMM over the group's rows and one batched expand, in aten the compiler launches
    itself, and no lorahot operator is left in the graph. o (in the allocation with q/k/v,
    one parent and input width, but over another input) and down (another width, an allocation
    of its own) each run alone as a GEMM over ``[W; A]`` and an expand: 8 GEMMs where the base
    model has 7; with a symbolic row count q (wider than k and v) takes an expand of its own,
    whose rows are not bounded, 9. The outputs equal the
    eager model's through two swaps with no recompile, with static and with symbolic rows.
    With a symbolic row count :data:`~lorahot.kernels.wide_groups.ROWS` is 8 here and the rows
    lie on either side of it (6 to 36): the one graph joins whatever the row count, with no
    guard on it (the symbolic half of
    :func:`test_in_default_mode_a_group_above_its_rows_keeps_the_traced_formula`).
    Negative control, the groups off: a shrink and a wide GEMM per layer, the shrinks of
    q/k/v and of gate/up stacked: 11 GEMMs. The joined variant with symbolic rows, with
    :data:`~lorahot.kernels.wide_groups.JOIN_SYMBOLIC` off, is also the negative control of
    :func:`test_in_default_mode_a_symbolic_row_count_joins_q_s_expand_where_switched_on` (the
    same block and switches, compiled once for both tests: q's expand apart, 9 GEMMs), at that
    test's row counts too.

    At static rows up to :data:`lorahot.kernels.unrolled_expand.ROWS` (10 here) the expands are
    unrolled into the kernels that read each output (:mod:`lorahot.kernels.unrolled_expand`):
    one GEMM per group and per lone layer, 4 where the base model has 7, no batched expand; with
    the unrolling off (``static-joined-gemm-expands``) the batched expands are back (6 GEMMs
    and 2 batched); with only lone layers unrolled
    (:data:`~lorahot.kernels.unrolled_expand.MEMBERS` off), q/k/v's and gate/up's batched
    expands are back (4 GEMMs and 2 batched); with only the groups' members (the default of
    :data:`~lorahot.kernels.unrolled_expand.LONE`), o's and down's expand GEMMs are (6 GEMMs);
    with those layers' outputs summed by kernels of their own instead
    (:data:`~lorahot.kernels.unrolled_expand.LONE_SUMS`), 4 GEMMs again, the members unrolled.
    A symbolic row count is not unrolled."""

    monkeypatch.setattr(unrolled_expand, "ENABLED", bool(unroll))
    monkeypatch.setattr(unrolled_expand, "MEMBERS", unroll in ("all", "members", "lone-sums"))
    monkeypatch.setattr(unrolled_expand, "LONE", unroll in ("all", "lone"))
    monkeypatch.setattr(unrolled_expand, "LONE_SUMS", unroll == "lone-sums")
    monkeypatch.setattr(wide_groups, "ENABLED", on)
    monkeypatch.setattr(wide_groups, "JOIN_SYMBOLIC", False)
    monkeypatch.setattr(wide_groups, "ACCUMULATE", False)
    if dynamic:  # a symbolic row count is not compared with ROWS: rows on either side of it
        monkeypatch.setattr(wide_groups, "ROWS", 8)
    code = _compiled_through_swaps(
        dynamic, [(2, 5, D), (3, 7, D), (3, 3, D), (4, 9, D), (2, 3, D)] if dynamic else [(2, 5, D)]
    )
    # the negative control: the base model's seven GEMMs; o and down take a shrink and a wide
    # GEMM (with the bias: addmm), and gate and up have no bias (mm). Joined: no addition is
    # folded into a GEMM (q is read at two places, so the q/k/v group's sums are written into
    # one buffer; o's and down's expands are added where their outputs are read); with a
    # symbolic row count q's expand is an mm of its own
    want = {"mm": 6 + dynamic, "addmm": 0, "bmm": 2} if on else {"mm": 6, "addmm": 5, "bmm": 0}
    if on and unroll and not dynamic:  # one GEMM per group and per lone layer, each expand in its reader
        want = {
            "all": {"mm": 4, "addmm": 0, "bmm": 0},
            "members": {"mm": 6, "addmm": 0, "bmm": 0},
            "lone-sums": {"mm": 4, "addmm": 0, "bmm": 0},
        }.get(unroll, {"mm": 4, "addmm": 0, "bmm": 2})
    assert _gemms(code) == want
    assert as_on_cuda[0] == (7 if on else 0)  # the first graph's operators (o's and down's too), all replaced


@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "symbolic-rows"])
@pytest.mark.parametrize("on", [True, False], ids=["accumulated", "negative-control"])
def test_in_default_mode_accumulated_expands_write_each_output_in_their_batched_gemm(
    dynamic: bool, on: bool, as_on_cuda: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """With :data:`~lorahot.kernels.wide_groups.ACCUMULATE` each expand adds its member's base
    output inside the batched GEMM that computes it (``baddbmm``): q alone, k and v in one, gate
    and up in one, o and down each alone, after the same GEMMs over the groups' rows (4 ``mm``
    and 5 ``baddbmm``, no other batched GEMM), with static rows and with a symbolic row count
    (q has its own either way). The outputs equal the eager model's through two swaps with no
    recompile. Negative control, the switch off: no ``baddbmm``, the batched expands
    (``bmm``) of the default form."""

    monkeypatch.setattr(unrolled_expand, "ENABLED", False)
    monkeypatch.setattr(wide_groups, "ACCUMULATE", on)
    monkeypatch.setattr(wide_groups, "JOIN_SYMBOLIC", False)
    if dynamic:
        monkeypatch.setattr(wide_groups, "ROWS", 8)
    code = _compiled_through_swaps(dynamic, [(2, 5, D), (3, 7, D), (4, 9, D)] if dynamic else [(2, 5, D)])
    src = "\n".join(code)
    baddbmm = src.count("extern_kernels.baddbmm(")
    if on:
        assert (_gemms(code), baddbmm) == ({"mm": 4, "addmm": 0, "bmm": 0}, 5)
    else:
        assert baddbmm == 0 and _gemms(code)["bmm"] == 2


def test_in_default_mode_a_group_above_its_rows_keeps_the_traced_formula(
    as_on_cuda: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Static rows above :data:`~lorahot.kernels.wide_groups.ROWS` (here 8, against 10 rows):
    each member keeps the traced formula, whose expand runs inside the wide GEMM (11 GEMMs, the
    groups-off count), the output the eager one. That a symbolic row count joins (9 GEMMs: q's
    expand apart) whatever its value, with no guard on it, at the same ``ROWS`` (8, rows from 6
    to 36 in one graph through swaps), is checked by
    ``test_in_default_mode_a_group_is_one_gemm_and_one_batched_expand[symbolic-rows-joined]``,
    which compiles that graph (the same block and switches) once for both tests."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(wide_groups, "ROWS", 8)
    torch.manual_seed(0)
    model = _Block().double()
    runtime = lorahot.inject(model, BLOCK, max_rank=R, extras=False)
    runtime.load(make_adapter(model, dict.fromkeys(BLOCK, 4), seed=0)[0])
    x = torch.randn(2, 5, D, dtype=torch.float64)
    with torch.no_grad():
        got, code = run_and_get_code(torch.compile(model, fullgraph=True), x)
        torch.testing.assert_close(got, _eager(model, x), rtol=1e-9, atol=1e-9)
        assert _gemms(code) == {"mm": 6, "addmm": 5, "bmm": 0}


def test_in_default_mode_a_symbolic_row_count_joins_q_s_expand_where_switched_on(
    as_on_cuda: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """:data:`~lorahot.kernels.wide_groups.JOIN_SYMBOLIC`: with a symbolic row count q's expand
    joins k's and v's in the group's batched GEMM, as at static rows: 8 GEMMs where the base
    model has 7. The outputs equal the eager model's through a swap and at three row counts,
    with no recompile. The negative control, the switch off (9 GEMMs, q's expand an mm of its
    own, at these row counts through swaps), is
    ``test_in_default_mode_a_group_is_one_gemm_and_one_batched_expand[symbolic-rows-joined]``,
    which compiles the same block with the same switches."""
    from torch._inductor.utils import run_and_get_code

    monkeypatch.setattr(wide_groups, "JOIN_SYMBOLIC", True)
    torch.manual_seed(0)
    model = _Block().double()
    runtime = lorahot.inject(model, BLOCK, max_rank=R, extras=False)
    adapters = [make_adapter(model, dict.fromkeys(BLOCK, r), seed=s)[0] for r, s in ((4, 0), (8, 1))]
    runtime.load(adapters[0])
    compiled = torch.compile(model, fullgraph=True, dynamic=True)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    with torch.no_grad():
        got, code = run_and_get_code(compiled, x)
        torch.testing.assert_close(got, _eager(model, x), rtol=1e-9, atol=1e-9)
        assert _gemms(code) == {"mm": 6, "addmm": 0, "bmm": 2}
        with torch._dynamo.config.patch(error_on_recompile=True):
            runtime.load(adapters[1])
            for shape in ((2, 5, D), (3, 3, D), (4, 9, D)):
                y = torch.randn(*shape, dtype=torch.float64)
                torch.testing.assert_close(compiled(y), _eager(model, y), rtol=1e-9, atol=1e-9)


class _Projections(nn.Module):
    """q, k and v of GQA widths (q wider) over one input, no bias."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.q = nn.Linear(width, width, bias=False)
        self.k, self.v = nn.Linear(width, width // 4, bias=False), nn.Linear(width, width // 4, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], -1)


@pytest.mark.parametrize(
    ("rows", "joined"), [(64, False), (1024, False), (1024, True)], ids=["one-expand", "first-apart", "symbolic-joined"]
)
def test_in_default_mode_bf16_error_stays_near_the_eager_forms(
    rows: int, joined: bool, as_on_cuda: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """In bf16 the group's formula rounds each expand before adding it (PEFT's order), where the
    eager form accumulates it into ``y`` in place: against a float64 reference of the same
    weights its error stays within 1.5x the eager form's (measured about 1.2x), at rows that
    take one batched expand for the group and, past :data:`~lorahot.kernels.wide_groups.ROWS`
    with a symbolic row count, q's expand apart (or, with
    :data:`~lorahot.kernels.wide_groups.JOIN_SYMBOLIC` on, one batched expand there too). An
    adapter whose B is 4x a usual one's, so that the LoRA term is large."""
    monkeypatch.setattr(wide_groups, "JOIN_SYMBOLIC", joined)
    torch.manual_seed(0)
    model = _Projections(128)
    reference = copy.deepcopy(model).double()
    model = model.to(torch.bfloat16)
    names = ["q", "k", "v"]
    runtime, ref_runtime = (lorahot.inject(m, names, max_rank=32, extras=False) for m in (model, reference))
    tensors = make_adapter(model, dict.fromkeys(names, 32), seed=3, dtype=torch.float64)[0]
    tensors = {k: (v * 4 if "lora_B" in k else v).to(torch.bfloat16) for k, v in tensors.items()}
    runtime.load(tensors)
    ref_runtime.load({k: v.double() for k, v in tensors.items()})
    x = torch.randn(rows, 128, dtype=torch.bfloat16)
    with torch.no_grad():
        want = reference(x.double())
        got = torch.compile(model, fullgraph=True, dynamic=rows > 512)(x).double()
        eager = model(x).double()
    assert as_on_cuda[0] == 3
    err, eager_err = (float((y - want).norm() / want.norm()) for y in (got, eager))
    assert err < 1.5 * eager_err


class _Rotary(nn.Module):
    """q, k and v of GQA widths over one input, q and k rotated as RoPE does (each read at two
    places per element), v read once; gate and up over another input, each read once."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = nn.Linear(D, D, bias=False), nn.Linear(D, D // 2), nn.Linear(D, D // 2)
        self.gate, self.up = nn.Linear(D, 32, bias=False), nn.Linear(D, 32, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        def rope(t: torch.Tensor) -> torch.Tensor:
            t = t.view(*t.shape[:-1], -1, 6).transpose(-2, -3)
            return t * cos + torch.cat([-t[..., 3:], t[..., :3]], -1) * sin

        q, k = rope(self.q(x)), rope(self.k(x)).repeat_interleave(2, -3)
        v = self.v(x).view(*x.shape[:-1], -1, 6).transpose(-2, -3).repeat_interleave(2, -3)
        z = torch.nn.functional.scaled_dot_product_attention(q, k, v).transpose(-2, -3).reshape(x.shape)
        out: torch.Tensor = torch.nn.functional.silu(self.gate(z)) * self.up(z)
        return out


def _joined_sums(graph: torch.fx.Graph) -> list[list[int]]:
    """The sizes of the ``as_strided`` nodes over an addition in ``graph``, and of the
    ``unrolled_sums`` nodes (:mod:`lorahot.kernels.unrolled_expand`): a group's outputs written
    into one buffer."""
    add, found = torch.ops.aten.add.Tensor, []
    for node in graph.nodes:
        if node.target is torch.ops.aten.as_strided.default and getattr(node.args[0], "target", None) is add:
            found.append([v if isinstance(v, int) else -1 for v in node.args[1]])
        elif node.target is torch.ops.lorahot.unrolled_sums.default:  # static rows: the sums unrolled
            found.append([v if isinstance(v, int) else -1 for v in node.meta["val"].shape])
    return found


@pytest.mark.parametrize(
    ("dynamic", "on", "sums"),
    [
        (False, True, "gemm"),
        (False, True, "elementwise"),
        (False, True, "reduced"),
        (False, False, "gemm"),
        (True, True, "gemm"),
        (True, False, "gemm"),
    ],
    ids=[
        "static-one-buffer",
        "static-one-buffer-unrolled-sums",
        "static-one-buffer-sums-reduced-over-the-rank",
        "static-negative-control",
        "symbolic-rows-one-buffer",
        "symbolic-rows-negative-control",
    ],
)
def test_in_default_mode_a_group_read_twice_writes_its_outputs_into_one_buffer(
    dynamic: bool, on: bool, sums: str, as_on_cuda: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """q and k rotated as RoPE does (each element read at two places): in default mode the
    q/k/v group's sums ``y_i + expand_i`` are one addition over the group's GEMM output, an
    ``as_strided`` of which the compiler writes with one kernel, and RoPE reads the members'
    views of it as it reads the base model's GEMM outputs (without it, the compiler writes
    one kernel per rotated member that recomputes each sum). Gate and up, each read once, keep
    their additions fused into what reads them. The outputs equal the eager model's through
    swaps with no recompile, with static and symbolic rows; the negative control,
    :data:`~lorahot.kernels.wide_groups.ONE_BUFFER` off, has no such buffer. With
    :data:`lorahot.kernels.unrolled_expand.SUMS` (static rows) the buffer is one
    ``unrolled_sums`` node instead, of the same size, with the same outputs, lowered as
    elementwise sums or (:data:`~lorahot.kernels.unrolled_expand.REDUCED`) over the rank."""
    monkeypatch.setattr(wide_groups, "ONE_BUFFER", on)
    monkeypatch.setattr(unrolled_expand, "SUMS", sums != "gemm")
    monkeypatch.setattr(unrolled_expand, "ENABLED", sums != "gemm")
    monkeypatch.setattr(unrolled_expand, "REDUCED", sums == "reduced")
    graphs: list[torch.fx.Graph] = []
    grouped = wide_groups.group_wide_layers
    monkeypatch.setattr(wide_groups, "group_wide_layers", lambda graph: (grouped(graph), graphs.append(graph))[0])
    torch.manual_seed(0)
    model = _Rotary().double()
    names = ["q", "k", "v", "gate", "up"]
    runtime = lorahot.inject(model, names, max_rank=R, extras=False)
    adapters = [make_adapter(model, dict.fromkeys(names, r), seed=s)[0] for r, s in ((4, 0), (8, 1), (2, 2))]
    runtime.load(adapters[0])
    compiled = torch.compile(model, dynamic=dynamic, fullgraph=True)
    shapes = [(2, 5), (3, 7)] if dynamic else [(2, 5)]
    xs = [(torch.randn(*s, D, dtype=torch.float64), torch.randn(s[1], 6, dtype=torch.float64)) for s in shapes]
    with torch.no_grad():
        for x, cos in xs:
            torch.testing.assert_close(compiled(x, cos, cos.flip(0)), _eager(model, x, cos, cos.flip(0)))
        with torch._dynamo.config.patch(error_on_recompile=True):
            for adapter in adapters[1:]:
                runtime.load(adapter)
                for x, cos in xs:
                    got, want = compiled(x, cos, cos.flip(0)), _eager(model, x, cos, cos.flip(0))
                    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert as_on_cuda[0] == 5
    width = D + D // 2 * 2 + 3 * R  # q, k and v, each with its shrink columns
    assert _joined_sums(graphs[0]) == ([[-1 if dynamic else 10, width]] if on else [])
    assert sum(n.target is torch.ops.lorahot.unrolled_sums.default for n in graphs[0].nodes) == int(sums != "gemm")


class _Blocks(nn.Module):
    """Two ``_Block`` modules in a row: their groups have the same shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _blocks_injected() -> tuple[nn.Module, lorahot.LoraRuntime, list[dict[str, torch.Tensor]]]:
    """:class:`_Blocks` in float64, lorahot on every projection, two adapters (ranks 4 and 8),
    the first loaded."""
    torch.manual_seed(0)
    model = _Blocks().double()
    names = [f"blocks.{i}.{n}" for i in range(2) for n in BLOCK]
    runtime = lorahot.inject(model, names, max_rank=R, extras=False)
    adapters = [make_adapter(model, dict.fromkeys(names, r), seed=s)[0] for r, s in ((4, 0), (8, 1))]
    runtime.load(adapters[0])
    return model, runtime, adapters


def _compiled_through_a_swap(
    model: nn.Module, runtime: lorahot.LoraRuntime, adapters: list[dict[str, torch.Tensor]], dynamic: bool = False
) -> None:
    """Compiles ``model`` in default mode (``adapters[0]`` loaded) and checks its output against
    the eager model's, then loads ``adapters[1]`` and checks again, with no recompile."""
    runtime.load(adapters[0])
    compiled = torch.compile(model, dynamic=dynamic, fullgraph=True)
    x = torch.randn(2, 5, D, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), _eager(model, x), rtol=1e-9, atol=1e-9)
        with torch._dynamo.config.patch(error_on_recompile=True):
            runtime.load(adapters[1])
            torch.testing.assert_close(compiled(x), _eager(model, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("memo", [True, False], ids=["traced-once", "negative-control"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "symbolic-rows"])
def test_in_default_mode_groups_of_one_shape_are_traced_once_each_copy_with_values_of_its_own(
    dynamic: bool, memo: bool, as_on_cuda: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two identical blocks in default mode: ``expands`` is traced once per shape (q/k/v,
    gate/up, o, down: 4 traces for 8 lowerings; the negative control, the graph's memo
    dropped, traces each of the 8), later lowerings copy the trace, and every copied node
    has a fake value of its own (inductor reads a node's storage from it: a shared value would
    read as an alias). The output equals the eager model's through a swap, with no recompile.
    With the unrolled expands on (:mod:`lorahot.kernels.unrolled_expand`), static rows take them."""
    from lorahot.kernels import fx_graph

    monkeypatch.setattr(unrolled_expand, "ENABLED", True)
    monkeypatch.setattr(unrolled_expand, "LONE", True)
    traced: list[int] = []
    real = wide_groups.expands
    monkeypatch.setattr(wide_groups, "expands", lambda *a, **k: (traced.append(1), real(*a, **k))[1])
    if not memo:
        splice = fx_graph.splice
        monkeypatch.setattr(wide_groups, "splice", lambda g, fn, args, fake, *_: splice(g, fn, args, fake))
    graphs: list[torch.fx.Graph] = []
    grouped = wide_groups.group_wide_layers
    monkeypatch.setattr(wide_groups, "group_wide_layers", lambda graph: (grouped(graph), graphs.append(graph))[0])
    model, runtime, adapters = _blocks_injected()
    _compiled_through_a_swap(model, runtime, adapters, dynamic=dynamic)
    assert as_on_cuda[0] == 14  # every operator lowered
    assert len(traced) == (4 if memo else 8)
    values = [n.meta["val"] for n in graphs[0].nodes if isinstance(n.meta.get("val"), torch.Tensor)]
    assert len({id(v) for v in values}) == len(values)
    ops = [str(n.target) for n in graphs[0].nodes]
    # static rows (10): every member's expand unrolled into its reader (unrolled_expand); symbolic:
    # q/k/v's and gate/up's batched expands, per block
    assert ops.count("aten.bmm.default") == (4 if dynamic else 0)
    assert ops.count("lorahot.unrolled_expand.default") == (0 if dynamic else 14)


@pytest.mark.parametrize("early", [True, False], ids=["joint-graph", "negative-control"])
@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "symbolic-rows"])
def test_in_default_mode_the_post_grad_passes_fake_run_no_node_again(
    dynamic: bool, early: bool, as_on_cuda: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two blocks in default mode, their operators lowered in inductor's joint-graph passes
    (:func:`lorahot.kernels.wide_groups.lower_early`): the post-grad passes' fake-value updater
    runs no node again (it reruns every node it had not seen, and all that reads it), and the
    output equals the eager model's through a swap, with no recompile. The negative control,
    lowered by the post-grad pass as before, has it rerun nodes."""
    from torch._inductor import fx_utils

    monkeypatch.setattr(wide_groups, "EARLY", early)
    updated: list[int] = []
    real = fx_utils.FakeTensorUpdater.incremental_update

    def counted(self: fx_utils.FakeTensorUpdater) -> int:
        updated.append(real(self))
        return updated[-1]

    monkeypatch.setattr(fx_utils.FakeTensorUpdater, "incremental_update", counted)
    model, runtime, adapters = _blocks_injected()
    _compiled_through_a_swap(model, runtime, adapters, dynamic=dynamic)
    assert as_on_cuda == [14]  # every operator lowered, one graph
    assert updated  # the updater ran
    if early:
        assert sum(updated) == 0
    else:
        assert sum(updated) > 14


def test_in_default_mode_a_graph_from_inductor_s_caches_is_the_lowered_one(
    as_on_cuda: list[int], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """With inductor's caches on (an empty cache directory of the test's own), a second compile
    of the same model after ``torch._dynamo.reset()`` loads the graph the first one lowered in
    the joint-graph passes (no pass runs again) and computes what the eager model does through
    a swap, with no recompile."""
    from torch._dynamo.utils import counters
    from torch._inductor import config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    model, runtime, adapters = _blocks_injected()
    hits = []
    with inductor_config.patch(fx_graph_cache=True), torch._functorch.config.patch(enable_autograd_cache=True):
        for _ in range(2):
            torch._dynamo.reset()
            counters.clear()
            _compiled_through_a_swap(model, runtime, adapters)
            hits.append(counters["inductor"]["fxgraph_cache_hit"] + counters["aot_autograd"]["autograd_cache_hit"])
    assert as_on_cuda == [14]  # lowered once: the second compile ran no pass
    assert hits[0] == 0 and hits[1] >= 1


def test_in_default_mode_a_graph_compiled_with_inductor_freezing_is_lowered_and_right(
    as_on_cuda: list[int],
) -> None:
    """With inductor's ``freezing`` (its joint-graph passes run before it folds the module's
    tensors into the code), default mode's operators are lowered there as without it, and the
    compiled model computes what the eager model does with the adapter of its compile."""
    from torch._inductor import config as inductor_config

    model, _, _ = _blocks_injected()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    with inductor_config.patch(freezing=True), torch.no_grad():
        compiled = torch.compile(model, fullgraph=True)
        torch.testing.assert_close(compiled(x), _eager(model, x), rtol=1e-9, atol=1e-9)
    assert as_on_cuda == [14]


LLAMA = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(device: str, dtype: torch.dtype, **config: Any) -> tuple[nn.Module, lorahot.LoraRuntime]:
    """The tiny transformers Llama (``config`` over its shape), every projection injected, a
    rank-8 adapter loaded."""
    pytest.importorskip("transformers")
    from tests.helpers import tiny_llama

    model = tiny_llama(**config).to(device=device, dtype=dtype)
    runtime = lorahot.inject(model, LLAMA, max_rank=R, extras=False)
    ranks = {name: R for name, _ in model.named_modules() if name.rsplit(".", 1)[-1] in LLAMA}
    runtime.load(make_adapter(model, ranks, seed=0)[0])
    return model, runtime


def test_in_default_mode_llama_rotary_groups_write_one_buffer_and_mlp_groups_do_not(
    as_on_cuda: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers' Llama in default mode: each block's q/k/v group (RoPE reads q and k at two
    places) writes its sums into one buffer, its gate/up group (SiLU and the product read each
    once) does not; the logits equal the eager model's."""
    graphs: list[torch.fx.Graph] = []
    grouped = wide_groups.group_wide_layers
    monkeypatch.setattr(wide_groups, "group_wide_layers", lambda graph: (grouped(graph), graphs.append(graph))[0])
    model, _ = _llama("cpu", torch.float64)
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        got = torch.compile(model, fullgraph=True)(input_ids=ids).logits
        want = model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the rotary angles are float32
    width = 32 + 2 * 16 + 3 * R  # q, k and v of the tiny shape (2 of 4 heads for k and v), each with its shrink
    assert _joined_sums(graphs[0]) == [[6, width]] * 2  # one per block
    assert as_on_cuda[0] == 14  # every projection's operator replaced


@pytest.mark.gpu
def test_gpu_llama_rotary_groups_launch_fewer_kernels_with_one_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA in bf16, default mode, transformers' Llama as the grouped probe's small model
    (hidden 128, 4 heads of 32, 2 KV heads, 2 blocks, no KV cache), compiled on a 128-token
    prefill and then a one-token decode (the second graph has a symbolic row count): with its
    q/k/v groups' sums in one buffer the decode graph launches at least one kernel fewer per
    block than with the sums apart, where the compiler writes a rotation kernel per rotated
    member, each recomputing its sum, ahead of attention's input kernels (measured 37 against
    39 with every expand a GEMM, and on the forward suite's 22 blocks 379 against 401; 33
    against 39 on an H100 with gate's and up's expands unrolled, the default since the
    fifty-ninth session, where the sums apart also unroll q's, k's and v's expands member by
    member). The logits near the eager model's.

    Shape-dependent: with a KV cache (transformers' default), measured on the same day at
    hidden 32 to 2048, the compiler fused the separate sums into attention's input kernels
    and one buffer cost a launch per block or nothing (41 against 39, 39 against 39)."""
    from torch._inductor.utils import run_and_get_code

    shape = {"vocab_size": 1000, "hidden_size": 128, "intermediate_size": 352, "max_position_embeddings": 2048}
    model, _ = _llama("cuda", torch.bfloat16, **shape, use_cache=False)
    prefill, decode = (torch.randint(0, 1000, (1, n), device="cuda") for n in (128, 1))
    launches = {}
    with torch.no_grad():
        want = model(input_ids=decode).logits.float()
        for on in (True, False):
            monkeypatch.setattr(wide_groups, "ONE_BUFFER", on)
            torch._dynamo.reset()
            compiled = torch.compile(model, fullgraph=True)
            compiled(input_ids=prefill)
            got, code = run_and_get_code(compiled, input_ids=decode)
            assert float((got.logits.float() - want).norm() / want.norm()) < 3e-2
            src = "\n".join(code)
            launches[on] = src.count(".run(") + src.count("extern_kernels.")
    assert launches[True] <= launches[False] - 2, launches  # two blocks
