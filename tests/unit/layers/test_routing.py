"""Per-row routing in every layer kind (lorahot.layers.routing): each row of a routed batch
equals that row run alone with its slot active, in float64; -1 rows are the base bitwise."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorahot
from lorahot.layers import routing
from lorahot.layers.refusal import refuse
from tests.helpers import Conv1D, ScaledEmbedding, make_adapter, token_ids

DT = torch.float64


class _Rows(nn.Module):
    """Every layer kind, each output flattened per row: Linear (with and without bias),
    transformers Conv1D, Conv1d (reflect padding), Conv2d, grouped Conv3d, Embedding, and a
    scaled embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(8, 6)
        self.n = nn.Linear(8, 6, bias=False)
        self.g = Conv1D(6, 8)
        self.c1 = nn.Conv1d(3, 4, 3, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.c3 = nn.Conv3d(2, 4, 2, groups=2)
        self.e = nn.Embedding(10, 5)
        self.s = ScaledEmbedding(10, 3, 2.5)

    def forward(self, x: torch.Tensor, i1: torch.Tensor, i2: torch.Tensor, i3: torch.Tensor, ids: torch.Tensor):
        parts = (self.q(x), self.n(x), self.g(x), self.c1(i1), self.c2(i2), self.c3(i3), self.e(ids), self.s(ids))
        return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


NAMES = ("q", "n", "g", "c1", "c2", "c3", "e", "s")
GROUPS = {"c3": 2}


def _model() -> _Rows:
    torch.manual_seed(0)
    return _Rows().to(DT)


def _inputs(rows: int, seed: int = 1) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(rows, 3, 8, generator=g, dtype=DT),
        torch.randn(rows, 3, 7, generator=g, dtype=DT),
        torch.randn(rows, 3, 6, 6, generator=g, dtype=DT),
        torch.randn(rows, 2, 3, 3, 3, generator=g, dtype=DT),
        token_ids((rows, 4), 10, seed=seed),
    )


def _row(inputs: tuple[torch.Tensor, ...], i: int) -> tuple[torch.Tensor, ...]:
    return tuple(t[i : i + 1] for t in inputs)


def _runtime(model: nn.Module, slots: int = 3, **kwargs) -> lorahot.LoraRuntime:
    runtime = lorahot.inject(model, list(NAMES), max_rank=4, slots=slots, **kwargs)
    for k in range(slots):
        ranks = {n: GROUPS.get(n, 1) * (1 + (k + j) % 2) for j, n in enumerate(NAMES) if (k + j) % 3}
        runtime.load(make_adapter(model, ranks, seed=k, dtype=DT)[0], slot=k, scale=0.5 + k)
    return runtime


def _alone(model: nn.Module, runtime: lorahot.LoraRuntime, inputs: tuple, route: list[int]) -> list[torch.Tensor]:
    """Each row run alone on its slot; a row of -1: that row of the model before inject run on
    the whole batch (BLAS may round a row differently beside other rows, the base model too)."""
    base = lorahot.eject(copy.deepcopy(model))
    out = []
    with torch.no_grad():
        whole = base(*inputs) if any(slot < 0 for slot in route) else None
        for i, slot in enumerate(route):
            if slot < 0:
                assert whole is not None
                out.append(whole[i : i + 1])
            else:
                runtime.activate(slot)
                out.append(model(*_row(inputs, i)))
    return out


def _assert_each_row_alone(mixed: torch.Tensor, model: nn.Module, runtime: lorahot.LoraRuntime, inputs: tuple,
                           route: list[int]) -> None:  # fmt: skip
    """Each row of the routed batch's output ``mixed`` equals it run alone (-1: bitwise the base
    model's output for the batch)."""
    for i, want in enumerate(_alone(model, runtime, inputs, route)):
        if route[i] < 0:
            assert torch.equal(mixed[i : i + 1], want)  # the base output, bitwise
        else:
            torch.testing.assert_close(mixed[i : i + 1], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["grouped", "symbolic-batch", "2-d products"])
@pytest.mark.parametrize("route", [[2, -1, 0, 1, 0], [1], [-1, -1], [0, 0, 0]])
def test_every_layer_kind_routes_each_row_to_its_slot(
    route: list[int], form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``symbolic-batch``: convs take the form a symbolic batch takes under dynamic shapes
    (``LoRAConv._symbolic_delta``: every slot's shrink over the whole batch, each row keeping
    its own), forced eagerly (the grouped Conv3d included). ``2-d products``: every layer
    takes the form it takes where batched products miscompute (CPU max-autotune:
    :func:`lorahot.layers.routing.batched_products`), forced eagerly: no ``bmm``, each row's
    own slot's columns of every slot's shrink and one product (a conv: one grouped
    convolution) with every slot's B."""
    if form != "grouped":
        monkeypatch.setattr(routing, "constant", lambda size: False)
    if form == "2-d products":
        monkeypatch.setattr(routing, "batched_products", lambda x: False)
    model = _model()
    runtime = _runtime(model)
    inputs = _inputs(len(route))
    runtime.activate(route)
    with torch.no_grad():
        mixed = model(*inputs)
    assert runtime.routing == tuple(route)
    _assert_each_row_alone(mixed, model, runtime, inputs, route)


def test_a_size_is_constant_eagerly_and_under_static_shapes_only() -> None:
    def kind(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if routing.constant(x.shape[0]) else x - 1

    assert routing.constant(5) and routing.constant(0)
    x = torch.zeros(3)
    assert torch.compile(kind, backend="eager", dynamic=False)(x)[0] == 1
    assert torch.compile(kind, backend="eager", dynamic=True)(x)[0] == -1


def test_a_routing_tensor_on_the_device_and_a_list_give_the_same_output() -> None:
    model = _model()
    runtime = _runtime(model)
    inputs = _inputs(3)
    runtime.activate([1, 0, 2])
    with torch.no_grad():
        a = model(*inputs)
        runtime.activate(torch.tensor([1, 0, 2], dtype=torch.int32))
        b = model(*inputs)
    assert torch.equal(a, b)


def test_stacked_slot_routes_with_its_own_per_row_scales() -> None:
    model = _model()
    runtime = _runtime(model, slots=2)
    first, second = (
        lorahot.read_adapter(make_adapter(model, dict.fromkeys(NAMES[:3], 2), seed=s, dtype=DT)[0]) for s in (7, 8)
    )
    runtime.load([first, second], slot=1, scale=[0.5, -2.0])
    inputs = _inputs(3)
    route = [1, 0, 1]
    runtime.activate(route)
    with torch.no_grad():
        mixed = model(*inputs)
    _assert_each_row_alone(mixed, model, runtime, inputs, route)


def test_whole_batch_activate_ends_the_routing() -> None:
    model = _model()
    runtime = _runtime(model)
    inputs = _inputs(2)
    runtime.activate(1)
    with torch.no_grad():
        whole = model(*inputs)
        runtime.activate([0, 2])
        runtime.activate(1)
        assert runtime.routing is None and runtime.active_slot == 1
        assert torch.equal(model(*inputs), whole)


def _lm() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(12, 8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 5)).to(DT)


def test_flattened_tokens_follow_their_row_and_packed_tokens_route_per_token() -> None:
    """``[B * T, in]`` with one entry per row gives each row's T tokens its slot, in a linear; an
    embedding's flattened ids ``[B * T]`` are refused (they could as well be one sequence every
    row shares) and route per token with ``lengths``; a packed ``[1, N]`` input with ``lengths``
    gives each sequence's tokens its slot."""
    model = _lm()
    runtime = lorahot.inject(model, ["0", "1", "3"], max_rank=4, slots=2)
    for k in range(2):
        runtime.load(make_adapter(model, {"0": 2, "1": 3, "3": 4}, seed=k, dtype=DT)[0], slot=k)
    ids = token_ids((3, 4), 12, seed=3)
    runtime.activate([1, -1, 0])
    with torch.no_grad():
        rows = model(ids)  # [3, 4, 5]
        with pytest.raises(lorahot.UsageError, match=r"its input \(12,\) does not fit a routing of 3 entries"):
            model(ids.reshape(12))  # the embedding's ids flattened
        runtime.activate([1, -1, 0], lengths=[4, 4, 4])
        flat = model(ids.reshape(12))  # [12, 5]: every layer sees 12 rows, one entry each
        torch.testing.assert_close(flat.view(3, 4, 5), rows, rtol=1e-12, atol=1e-12)
        runtime.activate([1, -1, 0])
        hidden = model[0](ids).reshape(12, -1)  # the linears' input flattened: 4 rows per entry
        torch.testing.assert_close(model[1:](hidden).view(3, 4, 5), rows, rtol=1e-12, atol=1e-12)
        lengths = [4, 2, 3]
        packed = torch.cat([ids[i, :n] for i, n in enumerate(lengths)])[None]  # [1, 9]
        runtime.activate([1, -1, 0], lengths=lengths)
        assert runtime.routing == (1,) * 4 + (-1,) * 2 + (0,) * 3
        out = model(packed)[0]
        starts = [0, 4, 6]
        for i, n in enumerate(lengths):  # tokens are independent in this model
            torch.testing.assert_close(out[starts[i] : starts[i] + n], rows[i, :n], rtol=1e-12, atol=1e-12)


def test_an_input_that_does_not_fit_the_routing_raises_naming_the_layer_and_shape() -> None:
    model = _model()
    runtime = _runtime(model)
    runtime.activate([0, 1])
    with pytest.raises(lorahot.UsageError, match=r"q \(LoRALinear over Linear \(8 -> 6\)\): its input \(3, 3, 8\)"):
        model(*_inputs(3))
    conv = nn.Sequential(nn.Conv2d(3, 4, 3))
    rt = lorahot.inject(conv, ["0"], max_rank=2)
    rt.load(make_adapter(conv, {"0": 2})[0])
    rt.activate([0, -1])
    with pytest.raises(lorahot.UsageError, match="a conv routes its batch dimension"):
        conv(torch.randn(4, 3, 5, 5))


@pytest.mark.parametrize(
    ("shape", "length", "tokens", "fits"),
    [
        ((4, 5, 8), 4, False, True),  # one entry per sequence
        ((4, 2, 3, 8), 4, False, True),  # [B, H, T, d]: the batch first
        ((20, 8), 4, False, True),  # tokens flattened, rows outermost: 5 tokens per entry
        ((20, 8), 20, False, True),  # [B, in]: one entry per row
        ((1, 20, 8), 20, True, True),  # packed input, one entry per token (lengths=)
        ((20, 8), 20, True, True),  # packed tokens flattened (lengths=)
        ((4, 5, 8), 20, True, True),  # one entry per token of a batch (lengths=)
        ((4, 5, 8), 2, False, False),  # a routing left from a batch of 2
        ((8, 5, 8), 4, False, False),  # a batch doubled for classifier-free guidance, the routing not
        ((5, 4, 8), 4, False, False),  # sequence-first input
        ((1, 24, 8), 12, True, False),  # packed input whose lengths add up to 12 tokens
        ((1, 20, 8), 4, False, False),  # packed input routed per sequence without lengths
        ((21, 8), 4, False, False),  # flattened tokens that do not split into equal groups
        ((1, 4, 8), 4, False, False),  # shared by every row ([1, T] position ids), T equal to the batch of 4
        ((1, 20, 8), 20, False, False),  # a routing of 20 rows read as 20 tokens: only with lengths=
        ((4, 5, 8), 20, False, False),  # the same over a batch of 4 sequences
        ((4, 5, 8), 4, True, False),  # 4 packed tokens, not 4 sequences of 5
        ((40, 8), 20, True, False),  # 20 packed tokens, 40 rows
    ],
)
def test_a_linear_routes_its_batch_its_tokens_or_equal_groups_of_flattened_tokens_and_nothing_else(
    shape: tuple[int, ...], length: int, tokens: bool, fits: bool
) -> None:
    """What would give rows the wrong slots is refused, not split into equal groups; every
    leading position is a token only under a routing that says it has one entry per token
    (``lengths=``). The message names the layer, the input's shape and the routing's length."""
    x, route = torch.empty(shape), torch.zeros(length, dtype=torch.int64)
    assert routing.row_misfit(x, length, "linear", 1, tokens) is not fits
    with pytest.raises(lorahot.UsageError) as refused:
        refuse(routing.misfit_message("layer.q (LoRALinear)", "linear", tokens), lambda: x, x, route)
    message = str(refused.value)
    assert message.startswith(f"layer.q (LoRALinear): its input {shape} does not fit a routing of {length} entries")
    assert "classifier-free guidance" in message
    assert ("one entry per token of packed input" in message) is tokens


def test_a_batch_doubled_for_guidance_is_refused_and_the_doubled_routing_runs() -> None:
    """A batch ``[uncond; cond]`` with the routing of the undoubled batch raises, naming the
    layer; the routing doubled gives each half its rows' slots."""
    model = _model()
    runtime = _runtime(model)
    inputs = _inputs(2)
    doubled = tuple(torch.cat([t, t]) for t in inputs)
    runtime.activate([0, 2])
    with torch.no_grad(), pytest.raises(lorahot.UsageError, match=r"^q \(LoRALinear.*classifier-free guidance"):
        model(*doubled)
    runtime.activate([0, 2, 0, 2])
    with torch.no_grad():
        out = model(*doubled)
    want = _alone(model, runtime, doubled, [0, 2, 0, 2])
    for i, w in enumerate(want):
        torch.testing.assert_close(out[i : i + 1], w, rtol=1e-12, atol=1e-12)


def test_slot_geometry_spans_every_slot_region_but_the_live_one() -> None:
    root = torch.zeros(4, 10)  # 3 slots and the live region
    view = root[3, 2:8].view(2, 3)
    shape, stride, offset = routing.slot_geometry(view, root)
    assert shape == (3, 2, 3) and stride == (10, 3, 1) and offset == 2
    alone = torch.zeros(2, 3)
    assert routing.slot_geometry(alone, alone) == ((1, 2, 3), (0, 3, 1), 0)


@pytest.mark.parametrize("rows", [5, 130], ids=["decode: one fused kernel", "larger: base, then the routed sum"])
def test_a_fusable_linear_routes_through_the_fused_op_up_to_its_row_limit(
    rows: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the fused kernel applies, a routed linear runs base and LoRA in one op for as many
    rows as the fused kernel takes in whole-batch mode, and the routed sum above. Both equal the
    library path (the ops' CPU formula stands in for the kernels here)."""
    from lorahot.kernels import lora_linear, routed_linear
    from lorahot.kernels import routed_lora as routed_kernel

    calls: list[str] = []
    for module, name in ((routed_linear, "routed_lora_linear"), (routed_kernel, "routed_lora")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k))
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 4, bias=False)).to(DT)
    fused = copy.deepcopy(plain)
    runtimes = [lorahot.inject(plain, ["0", "1"], max_rank=4, slots=2)]
    with monkeypatch.context() as m:
        m.setattr(lora_linear, "supports", lambda base, a: True)
        m.setattr(routed_kernel, "available", lambda: True)
        runtimes.append(lorahot.inject(fused, ["0", "1"], max_rank=4, slots=2))
    assert fused[0]._plan[1] and not plain[0]._plan[1]  # the fused flag
    for k in range(2):
        tensors = make_adapter(plain, {"0": 2 + k, "1": 3}, seed=k, dtype=DT)[0]
        for runtime in runtimes:
            runtime.load(tensors, slot=k)
    route = [(i % 3) - 1 for i in range(rows)]
    x = torch.randn(rows, 8, dtype=DT, generator=torch.Generator().manual_seed(1))
    outs = []
    with torch.no_grad():
        for model, runtime in zip((plain, fused), runtimes):
            runtime.activate(route)
            outs.append(model(x))
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-12, atol=1e-12)
    assert calls == (["routed_lora_linear"] * 2 if rows <= 128 else ["routed_lora"] * 2)


@pytest.mark.parametrize("kind", ["linear", "conv1d-transformers", "conv2d"])
@pytest.mark.parametrize("route", [[-1, 1], [-1, 1, 1]], ids=["gathered", "every-slot"])
def test_a_base_row_stays_the_base_output_where_slot_0_overflows(kind: str, route: list[int]) -> None:
    """A -1 row is the base output bitwise even where slot 0's shrink of it overflows float16
    (a zero scale times inf is NaN); the other rows keep their own slot's finite update. Two
    routings: up to one entry per slot (each entry's weights gathered) and more (every slot's
    shrink over every row)."""
    torch.manual_seed(0)
    layer = {"linear": nn.Linear(64, 8), "conv1d-transformers": Conv1D(8, 64), "conv2d": nn.Conv2d(64, 8, 1)}[kind]
    with torch.no_grad():
        layer.weight.mul_(0.01)
    base = nn.Sequential(layer).half()
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["0"], max_rank=4, slots=2)
    big = {k: torch.full_like(v, 1.5) if "lora_A" in k else v for k, v in make_adapter(model, {"0": 4})[0].items()}
    runtime.load({k: v.half() for k, v in big.items()}, slot=0)
    runtime.load({k: v.half() for k, v in make_adapter(model, {"0": 4}, seed=1)[0].items()}, slot=1)
    shape = (len(route), 64) if kind != "conv2d" else (len(route), 64, 1, 1)
    x = torch.randn(shape).half()
    x[0] = 1000.0  # slot 0's shrink of this row: 64 * 1.5 * 1000 > float16's 65504
    runtime.activate(route)
    with torch.no_grad():
        got, want = model(x), base(x)
        runtime.activate(1)
        own = model(x)
    assert torch.isfinite(want).all() and torch.equal(got[0], want[0])
    assert torch.isfinite(got[1:]).all() and torch.equal(got[1:], own[1:])


@pytest.mark.parametrize("kind", ["linear", "embedding"])
def test_packed_tokens_do_not_copy_a_slot_s_weights_per_token(kind: str) -> None:
    """Packed input routed per token (one entry per token, far more entries than slots): no
    intermediate holds a copy of A or B per token (``tokens * R * width`` elements), and each
    token still computes with its own slot."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        numel = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    self.numel = max(self.numel, t.numel())
            return out

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48) if kind == "linear" else nn.Embedding(40, 32)).to(DT)
    runtime = lorahot.inject(model, ["0"], max_rank=4, slots=2)
    for k in range(2):
        runtime.load(make_adapter(model, {"0": 4}, seed=k, dtype=DT)[0], slot=k)
    tokens = 256
    x = torch.randn(1, tokens, 32, dtype=DT) if kind == "linear" else token_ids((1, tokens), 40)
    route = [k % 3 - 1 for k in range(8)]  # -1, 0, 1, ...
    lengths = [tokens // 8] * 8
    runtime.activate(route, lengths=lengths)
    with torch.no_grad(), Largest() as seen:
        got = model(x)
    assert seen.numel < tokens * 4 * 32  # a per-token copy of A alone would be that large
    per_token = [slot for slot, n in zip(route, lengths) for _ in range(n)]
    for slot in (-1, 0, 1):
        rows = torch.tensor([i for i, s in enumerate(per_token) if s == slot])
        runtime.activate(slot) if slot >= 0 else None
        with torch.no_grad():
            want = lorahot.eject(copy.deepcopy(model))(x) if slot < 0 else model(x)
        torch.testing.assert_close(got[0, rows], want[0, rows], rtol=1e-12, atol=1e-12)


def test_the_library_formula_copies_a_slot_s_weights_only_where_rows_share_the_copy() -> None:
    """Gathered where the entries are no more than the slots, or each holds at least as many
    rows as there are slots, or a symbolic count of them; every slot's shrink where one row per
    entry goes beyond the slots."""
    assert routing.gathers(4, 1, 4) and routing.gathers(17, 256, 16) and routing.gathers(9, 8, 8)
    assert not routing.gathers(9, 1, 8) and not routing.gathers(4096, 1, 2) and not routing.gathers(17, 15, 16)


@pytest.mark.parametrize("route", [[0, 1], [0, 1, -1, 1, 0]])
def test_a_linear_with_no_inputs_routes_to_its_bias(route: list[int]) -> None:
    """``Linear(0, n)`` alone in its arena (whose A has no elements, one slot's view): every row
    is the bias, whichever slot it names."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(0, 8))
    runtime = lorahot.inject(model, ["0"], max_rank=2, slots=2)
    for k in range(2):
        runtime.load(make_adapter(model, {"0": 2}, seed=k)[0], slot=k)
    runtime.activate(route)
    with torch.no_grad():
        y = model(torch.randn(len(route), 0))
    assert torch.equal(y, model[0].base_layer.bias.expand(len(route), 8))


@pytest.mark.parametrize(
    ("shape", "length", "tokens", "fits"),
    [
        ((4, 5), 4, False, True),  # ids [B, T]: one entry per sequence
        ((4,), 4, False, True),  # ids [B]: one per row (a decode step)
        ((20,), 20, True, True),  # packed ids flattened, one entry per token (lengths=)
        ((8,), 4, False, False),  # 1-D ids of two per entry: positions arange(8) every row shares, or flattened
        ((1, 8), 4, False, False),  # [1, T] position ids every row shares
    ],
)
def test_an_embedding_refuses_1d_ids_that_a_linear_would_split_into_groups(
    shape: tuple[int, ...], length: int, tokens: bool, fits: bool
) -> None:
    """A linear's ``[B * T, in]`` is tokens flattened, but an embedding's 1-D ids ``[k * B]`` are
    as often one sequence every row shares (nanoGPT's ``wpe(arange(T))``), whose positions would
    take the slots of equal groups of rows: refused. The linear's rule (the negative control)
    splits the same leading size into groups."""
    x = torch.empty(shape, dtype=torch.int64)
    assert routing.row_misfit(x, length, "embedding", 0, tokens) is not fits
    if shape == (8,):
        assert not routing.row_misfit(torch.empty(8, 3), length, "linear", 1, tokens)


def test_positions_every_row_shares_as_1d_ids_are_refused_not_split() -> None:
    """nanoGPT's position embedding, ``wpe(arange(T))``, with an adapter on it in each slot and a
    routing of two rows: refused for every ``T`` other than the batch's (before, ``T`` a multiple
    of the batch gave each half of the positions one row's slot, in both rows). ``T == B`` reads
    as one id per row, as class labels do (README, "What the shapes cannot show")."""

    class _Positions(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.wte, self.wpe = nn.Embedding(32, 8, dtype=torch.float64), nn.Embedding(16, 8, dtype=torch.float64)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            out: torch.Tensor = self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))
            return out

    model = _Positions()
    runtime = lorahot.inject(model, ["wte", "wpe"], max_rank=2, slots=2)
    for slot in (0, 1):
        runtime.load(make_adapter(model, {"wpe": 2}, seed=slot, dtype=torch.float64)[0], slot=slot)
    runtime.activate([0, 1])
    for t in (3, 4):
        with pytest.raises(lorahot.UsageError, match=r"wpe \(LoRAEmbedding.*its input \(\d+,\) does not fit"):
            model(torch.zeros(2, t, dtype=torch.int64))
