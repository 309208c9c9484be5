"""Property tests of the LoRA layers against a float64 dense reference.

Each example draws one base module (Linear, transformers-style Conv1D, a custom linear-like
module, Conv1d/2d/3d with any stride/padding/dilation/groups/padding_mode, or Embedding), an
input batch and adapters, injects lorahot into a one-module holder and checks the output.
"""

from __future__ import annotations

import copy
import re
import types
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.testing._internal.two_tensor import TwoTensor

import lorahot
from lorahot.layers.embedding import LoRAEmbedding
from lorahot.layers.linear import computes_as_stored
from tests.helpers import Conv1D, ScaledProj, make_adapter, reference

_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class Holder(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


@dataclass
class Case:
    """One drawn geometry: how to build the base module and an input for it."""

    kind: str
    params: dict
    batch: tuple[int, ...]
    groups: int = 1

    def module(self, seed: int = 0) -> nn.Module:
        torch.manual_seed(seed)
        p = self.params
        if self.kind == "linear":
            m = nn.Linear(p["fin"], p["fout"], bias=p["bias"])
        elif self.kind == "conv1d_tf":
            m = Conv1D(p["fout"], p["fin"])
        elif self.kind == "custom":
            m = ScaledProj(p["fin"], p["fout"])
        elif self.kind == "embedding":
            m = nn.Embedding(p["num"], p["dim"])
        else:
            m = _CONVS[p["nd"]](**{k: v for k, v in p.items() if k not in ("nd", "size")})
        return m.double()

    def input(self, seed: int = 1) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        p = self.params
        if self.kind == "embedding":
            return torch.randint(0, p["num"], self.batch, generator=gen)
        if self.kind == "conv":
            shape = (*self.batch, p["in_channels"], *(p["size"],) * p["nd"])
        else:
            shape = (*self.batch, p["fin"])
        return torch.randn(shape, generator=gen, dtype=torch.float64)


@st.composite
def cases(draw: st.DrawFn) -> Case:
    kind = draw(st.sampled_from(["linear", "conv1d_tf", "custom", "conv", "embedding"]))
    if kind == "embedding":
        params = {"num": draw(st.integers(1, 40)), "dim": draw(st.integers(1, 24))}
        return Case(kind, params, tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2))))
    if kind != "conv":
        params = {"fin": draw(st.integers(1, 40)), "fout": draw(st.integers(1, 40)), "bias": draw(st.booleans())}
        return Case(kind, params, tuple(draw(st.lists(st.integers(1, 3), max_size=2))))
    nd = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 1, 2, 4]))
    stride = draw(st.integers(1, 2))
    padding_mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    pad_choices = [0, 1, 2, "valid"] + (["same"] if stride == 1 else [])
    params = {
        "nd": nd,
        "in_channels": groups * draw(st.integers(1, 3)),
        "out_channels": groups * draw(st.integers(1, 3)),
        "kernel_size": draw(st.integers(1, 3)),
        "stride": stride,
        "padding": draw(st.sampled_from(pad_choices)),
        "dilation": draw(st.integers(1, 2)),
        "groups": groups,
        "bias": draw(st.booleans()),
        "padding_mode": padding_mode,
        "size": draw(st.integers(5, 7 if nd < 3 else 5)),
    }
    return Case("conv", params, (draw(st.integers(1, 2)),), groups)


def _ranks(draw: st.DrawFn, groups: int, max_rank: int, n: int) -> list[int]:
    return [groups * draw(st.integers(1, max_rank // groups)) for _ in range(n)]


def _load(
    runtime: lorahot.LoraRuntime, holder: Holder, rank: int, seed: int, alpha_per_rank: float, scale: float = 1.0
):
    tensors, ab = make_adapter(holder, {"layer": rank}, seed=seed, dtype=torch.float64)
    runtime.load(tensors, config={"r": rank, "lora_alpha": alpha_per_rank * rank}, scale=scale)
    return ab["layer"]


_DYADIC = st.sampled_from([0.25, 0.5, 1.0, 1.5, 2.0])  # exact in float32, where scales live


@given(case=cases(), data=st.data())
def test_output_matches_dense_reference(case: Case, data: st.DataObject) -> None:
    max_rank = case.groups * data.draw(st.integers(1, 4))
    (rank,) = _ranks(data.draw, case.groups, max_rank, 1)
    alpha_per_rank, mult = data.draw(_DYADIC), data.draw(_DYADIC)
    base = case.module()
    x = case.input()
    holder = Holder(case.module())
    runtime = lorahot.inject(holder, ["layer"], max_rank=max_rank)
    a, b = _load(runtime, holder, rank, seed=3, alpha_per_rank=alpha_per_rank, scale=mult)
    with torch.no_grad():
        y = holder(x)
    expected = reference(base, x, a, b, alpha_per_rank * mult)
    assert y.shape == expected.shape and y.dtype == torch.float64
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10 * float(expected.abs().max()) + 1e-300)
    delta = y - reference(base, x, None, None, 0.0)
    assert bool(delta.abs().max() > 0) or not bool(a.abs().max() > 0)


@given(case=cases(), data=st.data())
def test_padding_to_max_rank_does_not_change_output(case: Case, data: st.DataObject) -> None:
    (rank,) = _ranks(data.draw, case.groups, 8, 1)
    x = case.input()
    outs = []
    for max_rank in (8, 64):
        holder = Holder(case.module())
        runtime = lorahot.inject(holder, ["layer"], max_rank=max_rank)
        _load(runtime, holder, rank, seed=5, alpha_per_rank=1.0)
        with torch.no_grad():
            outs.append(holder(x))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)


@given(case=cases(), data=st.data())
def test_any_swap_sequence_equals_fresh_load(case: Case, data: st.DataObject) -> None:
    max_rank = case.groups * data.draw(st.integers(1, 4))
    ranks = _ranks(data.draw, case.groups, max_rank, data.draw(st.integers(2, 4)))
    unload_before = data.draw(st.lists(st.booleans(), min_size=len(ranks), max_size=len(ranks)))
    x = case.input()
    holder = Holder(case.module())
    runtime = lorahot.inject(holder, ["layer"], max_rank=max_rank)
    for i, (rank, unload) in enumerate(zip(ranks, unload_before)):
        if unload:
            runtime.unload()
        _load(runtime, holder, rank, seed=10 + i, alpha_per_rank=0.5)
    fresh = Holder(case.module())
    fresh_runtime = lorahot.inject(fresh, ["layer"], max_rank=max_rank)
    _load(fresh_runtime, fresh, ranks[-1], seed=10 + len(ranks) - 1, alpha_per_rank=0.5)
    with torch.no_grad():
        assert torch.equal(holder(x), fresh(x))
    for got, want in zip(_arena(runtime), _arena(fresh_runtime)):
        assert torch.equal(got, want)


@given(case=cases(), data=st.data())
def test_eject_restores_bitwise(case: Case, data: st.DataObject) -> None:
    max_rank = case.groups * data.draw(st.integers(1, 4))
    (rank,) = _ranks(data.draw, case.groups, max_rank, 1)
    x = case.input()
    holder = Holder(case.module())
    original = holder.layer
    with torch.no_grad():
        before = holder(x)
    runtime = lorahot.inject(holder, ["layer"], max_rank=max_rank)
    with torch.no_grad():
        assert torch.equal(holder(x), before)
    _load(runtime, holder, rank, seed=7, alpha_per_rank=2.0)
    runtime.eject()
    assert holder.layer is original
    with torch.no_grad():
        assert torch.equal(holder(x), before)


def _arena(runtime: lorahot.LoraRuntime) -> list[torch.Tensor]:
    return [t for arena in runtime.buffers.arenas for t in (arena.A, arena.B, arena.S)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_layers_keep_dtype(dtype: torch.dtype) -> None:
    holder = Holder(nn.Linear(12, 10).to(dtype))
    runtime = lorahot.inject(holder, ["layer"], max_rank=4)
    tensors, ab = make_adapter(holder, {"layer": 3}, seed=1)
    runtime.load(tensors)
    x = torch.randn(5, 12).to(dtype)
    with torch.no_grad():
        y = holder(x)
    assert y.dtype == dtype
    expected = reference(holder.layer.base_layer, x, *ab["layer"], 1.0)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y.double(), expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("buffers", [None, torch.float32], ids=["float16-buffers", "float32-buffers"])
@pytest.mark.parametrize("routed", [False, True], ids=["whole", "routed"])
def test_a_float32_update_on_a_float16_layer_is_added_then_rounded_once(
    buffers: torch.dtype | None, routed: bool
) -> None:
    """The update of a float16 layer is computed in float32 (its float16 buffers widened, or
    ``dtype=torch.float32``); added to the float16 base output in float32 and the sum rounded
    once, as PEFT does, the output is the float16 rounding of ``base(x) + delta`` (float64), to
    the last bit but for float32's own error on a tie. Rounded to float16 first and then summed,
    29% of the outputs were one ulp off it."""
    torch.manual_seed(0)
    base = nn.Linear(256, 256).half()
    holder = Holder(base)
    x = torch.randn(64, 256).half()
    with torch.no_grad():
        y = base(x)  # the base output the layer computes too
    a = torch.randn(8, 256).half().float()  # values float16 holds: both buffer dtypes store them exactly
    b = (torch.randn(256, 8) * 0.05).half().float()
    runtime = lorahot.inject(holder, ["layer"], max_rank=8, dtype=buffers, slots=2)
    runtime.load({"base_model.model.layer.lora_A.weight": a, "base_model.model.layer.lora_B.weight": b}, slot=1)
    route = torch.tensor([1, -1] * 32)
    runtime.activate(route.tolist() if routed else 1)
    with torch.no_grad():
        got = holder(x)
    delta = x.double() @ a.double().T @ b.double().T  # alpha = r: scale 1
    if routed:
        delta[route < 0] = 0
    want = (y.double() + delta).half()  # float64 to float16 rounds once, correctly
    assert got.dtype == torch.float16
    off = (got != want).sum().item()
    assert off <= got.numel() // 200, f"{off} of {got.numel()} outputs are not the once-rounded sum"
    if routed:
        assert torch.equal(got[route < 0], y[route < 0])  # rows of no slot: the base output itself


def test_transformers_conv1d_is_wrapped_as_linear() -> None:
    transformers = pytest.importorskip("transformers.pytorch_utils")
    torch.manual_seed(0)
    holder = Holder(transformers.Conv1D(10, 6).double())
    with torch.no_grad():
        holder.layer.bias.normal_()
    base = Holder(transformers.Conv1D(10, 6).double())
    base.load_state_dict(holder.state_dict())
    runtime = lorahot.inject(holder, ["layer"], max_rank=4)
    assert isinstance(holder.layer, lorahot.LoRALinear)
    tensors, ab = make_adapter(holder, {"layer": 4}, seed=2, dtype=torch.float64)
    assert ab["layer"][0].shape == (4, 6) and ab["layer"][1].shape == (10, 4)
    runtime.load(tensors)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    with torch.no_grad():
        y = holder(x)
    torch.testing.assert_close(y, reference(base.layer, x, *ab["layer"], 1.0), rtol=1e-10, atol=1e-12)


def test_a_layer_made_by_hand_and_never_bound_says_how_layers_are_made() -> None:
    layer = lorahot.LoRALinear(nn.Linear(4, 3))
    with pytest.raises(lorahot.UsageError, match=r"bound by lorahot\.inject"):
        layer(torch.randn(2, 4))


def test_forward_plan_follows_every_flag_it_gathers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward reads its branches from one constant tuple (one guard per layer under
    compile, not one per flag): it must equal the flags after inject, widen, unwiden and in
    merged mode."""
    from lorahot.runtime import wide

    monkeypatch.setattr(wide, "DEVICE_TYPES", ("cpu", "cuda"))
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    lorahot.inject(model, ["0", "1"], max_rank=4, extras=True)
    layers = list(model)
    for layer in layers:
        assert layer.wide
        geometries = (layer._key, layer._geometry, layer._slot_geometry, layer._wide_at)
        assert layer._plan == (False, layer.fused, True, True, *geometries, False, "input", None, False)
        assert layer._wide_at is not None  # neighbours under one parent, one input width: one wide group
    lorahot.eject(model)
    assert all(layer._plan[2] is False and layer._plan[7] is None for layer in layers)  # unwidened
    merged = nn.Sequential(nn.Linear(8, 8))
    lorahot.inject(merged, ["0"], max_rank=4, merged=True)
    assert merged[0]._plan == (True, False, False, False, -1, (), (), None, False, None, None, False)
    plain = nn.Sequential(nn.Linear(8, 8))
    lorahot.inject(plain, ["0"], max_rank=4, fused=False)
    layer = plain[0]
    plan = (False, False, False, False, layer._key, layer._geometry, layer._slot_geometry, None, False, "input", None)
    assert layer._plan == (*plan, False)
    layer.wide = True  # any later change of a gathered flag reaches the plan
    assert layer._plan[2] is True
    moved = (((1, 4, 8), (32, 8, 1), 0),) * 4
    layer._slot_geometry = moved  # and of a geometry
    assert layer._plan[6] == moved
    experts = nn.ModuleDict({"experts": nn.ModuleList([nn.Linear(8, 8)])})
    lorahot.inject(experts, ["experts.0"], max_rank=4)
    assert experts.experts[0]._plan[8] is True  # a mixture-of-experts block's expert
    for is_merged in (False, True):  # an embedding reads its max_norm (checks_max_norm), merged or not
        table = nn.Sequential(nn.Embedding(6, 4))
        lorahot.inject(table, ["0"], max_rank=2, merged=is_merged)
        assert table[0]._plan[11] is True


def _autocast_pair(monkeypatch: pytest.MonkeyPatch, dtype: torch.dtype) -> tuple[nn.Module, nn.Module]:
    """The same adapter on a widened model (the wide path forced onto the CPU) and on a
    ``fused=False`` one (the library formula), weights in ``dtype``."""
    from lorahot.runtime import wide

    monkeypatch.setattr(wide, "DEVICE_TYPES", ("cpu", "cuda"))
    models = []
    for fused in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 16)).eval().to(dtype)
        runtime = lorahot.inject(model, ["0", "2"], max_rank=8, fused=fused)
        runtime.load(make_adapter(model, {"0": 8, "2": 4}, seed=1, dtype=dtype)[0])
        assert model[0].wide == fused
        models.append(model)
    return models[0], models[1]


def test_autocast_to_another_dtype_takes_the_library_formula_as_the_base_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under autocast to a dtype other than the weights', the base layer's product runs in
    autocast's dtype; a widened layer then takes the library formula (the wide path's in-place
    accumulate would mix the two dtypes and raise): eagerly the same bits as a ``fused=False``
    model, in autocast's dtype as the base layer's output is, and compiled the same values."""
    widened, plain = _autocast_pair(monkeypatch, torch.float32)
    x = torch.randn(4, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = widened(x), plain(x)
        assert got.dtype == want.dtype == torch.bfloat16
        assert torch.equal(got, want)
        compiled = torch.compile(widened, fullgraph=True)(x)
    torch.testing.assert_close(compiled.float(), want.float(), rtol=2e-2, atol=2e-2)
    with torch.no_grad():  # autocast off again: the wide path, float32
        assert widened(x).dtype == torch.float32


def test_autocast_to_the_weights_dtype_keeps_the_wide_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Autocast to the weights' own dtype changes nothing the layer computes: the wide path
    stays, and gives the bits it gives without autocast."""
    from lorahot.kernels import wide_linear

    widened, _ = _autocast_pair(monkeypatch, torch.bfloat16)
    calls = []
    real = wide_linear.wide_linear
    monkeypatch.setattr(wide_linear, "wide_linear", lambda *t: calls.append(1) or real(*t))
    x = torch.randn(4, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        want = widened(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = widened(x)
    assert len(calls) == 4 and torch.equal(got, want)


@pytest.mark.parametrize("merged", [False, True])
def test_an_embedding_with_max_norm_is_refused(merged: bool) -> None:
    """max_norm renormalizes the looked-up rows in place on each call, PEFT's LoRA A among them,
    so PEFT's output depends on which ids earlier calls read: refused, not approximated."""
    model = nn.Sequential(nn.Embedding(10, 4, max_norm=1.0))
    with pytest.raises(lorahot.UsageError, match=r"max_norm=1\.0"):
        lorahot.inject(model, ["0"], max_rank=2, merged=merged)
    assert type(model[0]) is nn.Embedding


@pytest.mark.parametrize("routed", [False, True], ids=["one slot", "routed"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_an_embedding_given_a_max_norm_after_inject_refuses_its_forward(compiled: bool, routed: bool) -> None:
    """A max_norm set after inject: the base renormalized its looked-up rows and lorahot added
    its LoRA unrenormalized, where PEFT renormalizes its A's rows as well: another number,
    silently. Now the forward refuses, eagerly and compiled, one slot and routed; with max_norm
    back to None it computes the dense reference of the table as the base left it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, dtype=torch.float64))
    tensors, ab = make_adapter(model, {"0": 2}, dtype=torch.float64)
    runtime = lorahot.inject(model, ["0"], max_rank=2, slots=2)
    runtime.load(tensors)
    runtime.load(tensors, slot=1)
    if routed:
        runtime.activate([1, 0])
    run = torch.compile(model, backend="aot_eager") if compiled else model
    ids = torch.tensor([[1, 2, 7], [3, 2, 0]])
    run(ids)  # compiled: a graph for max_norm=None first, as a model serving would have
    model[0].base_layer.max_norm = 0.5
    with pytest.raises(
        lorahot.UsageError, match=r"^0 \(LoRAEmbedding over Embedding .*\): its nn\.Embedding has max_no"
    ):
        run(ids)
    model[0].base_layer.max_norm = None
    with torch.no_grad():
        want = reference(model[0].base_layer, ids, *ab["0"], 1.0)
        torch.testing.assert_close(run(ids), want, rtol=1e-12, atol=1e-12)


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def _bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a
    )


def _guards(guards: object) -> list[tuple[str, str]]:
    """Each guard's source and kind, numbers dropped (dynamo's count of globals dicts, the arena keys)."""
    return sorted((re.sub(r"\d+", "#", g.name), g.create_fn_name()) for g in guards)  # type: ignore[attr-defined]


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_an_embedding_given_a_max_norm_after_inject_refuses_its_forward_before_writing(
    compiled: bool, merged: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A max_norm set after inject: merged, the forward renormalized the looked-up rows of the
    table, the folded LoRA in them, in place in that very call (only the next runtime call
    refused the changed weight); unmerged, the base renormalized them before the delta refused.
    Now the call refuses before anything runs, eagerly and compiled: every parameter and buffer
    bitwise as before, and with max_norm back to None the next call and a runtime call compute
    the float64 reference. The check adds no guard (torch._dynamo.explain)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 4, dtype=torch.float64))
    with torch.no_grad():
        model[0].weight.mul_(3.0)  # rows well over the max_norm below
    base = model[0].weight.detach().clone()
    tensors, ab = make_adapter(model, {"0": 2}, dtype=torch.float64)
    plain = copy.deepcopy(model)
    runtime = lorahot.inject(model, ["0"], max_rank=2, merged=merged)
    runtime.load(tensors)
    ids = torch.tensor([[1, 2, 7], [3, 2, 0]])
    with monkeypatch.context() as unchecked:  # the same layer without the check
        unchecked.setattr(LoRAEmbedding, "checks_max_norm", False)
        lorahot.inject(plain, ["0"], max_rank=2, merged=merged).load(tensors, scale=0.5)
    guards = _guards(torch._dynamo.explain(plain)(ids).out_guards)
    torch._dynamo.reset()
    run = torch.compile(model, backend="aot_eager") if compiled else model
    run(ids)  # compiled: a graph for max_norm=None first, as a model serving would have
    before = _state(model)
    model[0].base_layer.max_norm = 0.5
    with pytest.raises(
        lorahot.UsageError, match=r"^0 \(LoRAEmbedding over Embedding .*\): its nn\.Embedding has max_no"
    ):
        run(ids)
    assert _bitwise_equal(before, _state(model))
    model[0].base_layer.max_norm = None
    runtime.set_scale(0.5)
    a, b = ab["0"]
    with torch.no_grad():
        want = F.embedding(ids, base) + 0.5 * F.embedding(ids, a.t()) @ b.t()
        torch.testing.assert_close(run(ids), want, rtol=1e-12, atol=1e-12)
    torch._dynamo.reset()
    assert _guards(torch._dynamo.explain(model)(ids).out_guards) == guards


def _pad_circularly(conv: nn.Module) -> None:
    """What a seamless-tiling pipeline does to each conv of a model: a ``_conv_forward`` of the
    module's own that pads circularly, whatever its ``padding_mode``."""

    def conv_forward(self: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = F.pad(x, self._reversed_padding_repeated_twice, mode="circular")
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)

    conv._conv_forward = types.MethodType(conv_forward, conv)


class _CircularConv(nn.Conv2d):
    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        x = F.pad(x, self._reversed_padding_repeated_twice, mode="circular")
        return F.conv2d(x, weight, bias, self.stride, 0, self.dilation, self.groups)


class _StandardizedConv(nn.Conv2d):
    """Weight standardization inside ``_conv_forward``: not linear in the weight."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        weight = (weight - weight.mean()) / (weight.std() + 1e-5)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


@pytest.mark.parametrize("routed", [False, True], ids=["one-slot", "routed"])
@pytest.mark.parametrize(
    "how",
    ["padding-mode-after-inject", "conv-forward-after-inject", "conv-forward-before-inject", "conv-forward-class"],
)
def test_a_conv_lora_pads_as_its_base_pads_at_each_call(how: str, routed: bool) -> None:
    """A conv's LoRA convolves its input as the base convolves it at each call: after a pipeline
    sets ``padding_mode = "circular"`` or a circular ``_conv_forward`` on the conv (seamless
    tiling), before or after inject, or with a class whose ``_conv_forward`` pads circularly.
    Float64 against the circularly padded conv with the weight ``W + B @ A``; per-row routing
    (a row of the adapter's slot beside a base row) too. The LoRA path kept zero padding before
    (max abs diff 1.9 at the borders)."""
    torch.manual_seed(0)
    base = (_CircularConv if how == "conv-forward-class" else nn.Conv2d)(4, 6, 3, padding=1).double()
    if how == "conv-forward-before-inject":
        _pad_circularly(base)
    model = Holder(base)
    tensors, ab = make_adapter(model, {"layer": 4}, dtype=torch.float64)
    circular = nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular").double()
    circular.load_state_dict(base.state_dict())
    runtime = lorahot.inject(model, ["layer"], max_rank=4, slots=2)
    runtime.load(tensors, slot=1)
    runtime.activate([1, -1] if routed else 1)
    if how == "padding-mode-after-inject":
        base.padding_mode = "circular"
    elif how == "conv-forward-after-inject":
        _pad_circularly(base)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    a, b = ab["layer"]
    want = reference(circular, x, a, b, 1.0)
    if routed:
        want[1:] = reference(circular, x[1:], None, None, 1.0)
    with torch.no_grad():
        got = model(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("how", ["not-linear", "grouped"])
def test_a_conv_forward_of_its_own_that_the_lora_cannot_follow_is_refused_at_inject(how: str) -> None:
    """A ``_conv_forward`` of the module's own that is not linear in its weight (weight
    standardization), or on a grouped conv (A convolves with groups 1), is refused at inject
    naming the module, the model as it was; before, the LoRA was added as a plain conv's."""
    torch.manual_seed(0)
    if how == "not-linear":
        base: nn.Module = _StandardizedConv(4, 6, 3)
        match = r"layer: _StandardizedConv: its _conv_forward is not the torch class's .* not linear in its weight"
    else:
        base = _CircularConv(4, 6, 3, groups=2)
        match = r"layer: _CircularConv with groups=2: its _conv_forward is not the torch class's"
    model = Holder(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorahot.UsageError, match=match):
        lorahot.inject(model, ["layer"], max_rank=4)
    assert model.layer is base and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_grouped_conv_given_a_conv_forward_after_inject_refuses_to_compute() -> None:
    """A grouped conv given a ``_conv_forward`` of its own after inject (which A's groups-1
    convolution cannot go through) refuses its next forward, naming the layer."""
    torch.manual_seed(0)
    model = Holder(nn.Conv2d(4, 6, 3, padding=1, groups=2))
    tensors, _ = make_adapter(model, {"layer": 4})
    lorahot.inject(model, ["layer"], max_rank=4).load(tensors)
    _pad_circularly(model.layer.base_layer)
    with pytest.raises(lorahot.UsageError, match=r"layer \(LoRAConv over Conv2d .*set after inject"):
        model(torch.randn(1, 4, 5, 5))


@pytest.mark.parametrize("dtype", [None, torch.float32], ids=["default-dtype", "float32-buffers"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_layer_with_complex_weights_is_refused_whatever_the_buffers_dtype(
    kind: str, dtype: torch.dtype | None
) -> None:
    """A layer with complex weights is refused at inject, the model as it was. With ``dtype=``
    given it used to take real buffers and cast its complex input to them, dropping the
    imaginary part with a warning: max abs diff 1.67 against the float64 dense reference."""
    torch.manual_seed(0)
    base = nn.Linear(6, 5, dtype=torch.complex64) if kind == "linear" else nn.Conv1d(3, 4, 3, dtype=torch.complex64)
    model = Holder(base)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    name = type(base).__name__
    with pytest.raises(
        lorahot.UsageError, match=rf"^layer: {name} has torch\.complex64 weights; LoRA buffers are real"
    ):
        lorahot.inject(model, ["layer"], max_rank=4, dtype=dtype)
    assert model.layer is base and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _ByKeyword(nn.Module):
    """Calls its layer with the input by keyword, as ``self.proj(input=x)``: ``name`` is the
    first parameter of the layer's own ``forward``."""

    def __init__(self, layer: nn.Module, name: str) -> None:
        super().__init__()
        self.layer, self.name = layer, name

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(**{self.name: x})


_BY_KEYWORD = {  # kind -> (module, its forward's input name, an input)
    "linear": (lambda: nn.Linear(4, 3), "input", lambda g: torch.randn(2, 3, 4, generator=g)),
    "conv": (lambda: nn.Conv2d(4, 3, 3, padding=1), "input", lambda g: torch.randn(2, 4, 5, 5, generator=g)),
    "embedding": (lambda: nn.Embedding(7, 4), "input", lambda g: torch.randint(0, 7, (2, 3), generator=g)),
    "conv1d_tf": (lambda: Conv1D(3, 4), "x", lambda g: torch.randn(2, 3, 4, generator=g)),
    "custom": (lambda: ScaledProj(4, 3), "x", lambda g: torch.randn(2, 3, 4, generator=g)),
}


@pytest.mark.parametrize(
    ("kind", "mode"),
    # merged mode folds only Linear, Conv1D, conv and Embedding weights
    [(k, m) for k in _BY_KEYWORD for m in ("one-slot", "routed", "merged") if (k, m) != ("custom", "merged")],
)
def test_a_layer_called_by_keyword_computes_what_a_positional_call_does(kind: str, mode: str) -> None:
    """A model that calls a wrapped module with its input by keyword (``self.proj(input=x)``;
    ``x=`` for transformers' Conv1D and a custom module whose forward names it so) gets the
    base output plus the LoRA update, as a positional call: float64 against the dense
    reference, bitwise equal to the positional call; per-row routing and merged mode too. It
    raised ``TypeError: LoRALayer.forward() missing 1 required positional argument: 'x'``."""
    make, name, draw = _BY_KEYWORD[kind]
    torch.manual_seed(0)
    base = make().double()
    model = _ByKeyword(base, name)
    x = draw(torch.Generator().manual_seed(1))
    x = x if kind == "embedding" else x.double()
    tensors, ab = make_adapter(model, {"layer": 2}, dtype=torch.float64)
    want = reference(base, x, *ab["layer"], 1.0)
    if mode == "routed":
        want[1:] = reference(base, x[1:], None, None, 1.0)
    runtime = lorahot.inject(model, ["layer"], max_rank=2, slots=2, merged=mode == "merged")
    runtime.load(tensors)
    if mode == "routed":
        runtime.activate([0, -1])
    with torch.no_grad():
        got = model(x)
        positional = model.layer(x)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert torch.equal(got, positional)


class _Packed(nn.Module):
    """A linear-like module whose forward takes ``*args``: its input has no name a keyword call
    can give."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(4, 3)
        self.in_features, self.out_features = 4, 3

    def forward(self, *args: torch.Tensor) -> torch.Tensor:
        return self.inner(args[0])


@pytest.mark.parametrize(
    ("make", "call", "match"),
    [
        (
            lambda: nn.Linear(4, 3),
            {"inp": torch.randn(2, 4)},
            r"^layer \(LoRALinear over Linear \(4 -> 3\)\): called with inp= and no positional input; .* "
            r"Linear\.forward names it 'input'\. Pass it positionally or as input=x\.$",
        ),
        (
            _Packed,
            {"x": torch.randn(2, 4)},
            r"^layer \(LoRALinear over _Packed \(4 -> 3\)\): called with x= .* _Packed\.forward gives it no name a "
            r"keyword call can use\. Pass it positionally\.$",
        ),
    ],
    ids=["wrong-name", "no-name"],
)
def test_a_keyword_call_that_does_not_name_the_input_is_refused(make, call: dict, match: str) -> None:
    """A call that passes no input positionally and not under the name the base's forward
    gives it is refused, naming the layer, the keywords given and the name to use."""
    model = Holder(make())
    lorahot.inject(model, ["layer"], max_rank=2)
    with pytest.raises(lorahot.UsageError, match=match):
        model.layer(**call)


def _sliced(kind: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A module whose weight was sliced by hand after construction (pruning), its size attributes
    left as they were, a twin built at the weight's own sizes holding the same tensors, and an
    input the base takes."""
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    if kind == "linear":
        stale, twin = nn.Linear(8, 6), nn.Linear(5, 4)
        x = torch.randn(2, 3, 5, generator=gen)
    elif kind == "conv":
        stale, twin = nn.Conv2d(4, 6, 3, padding=1), nn.Conv2d(3, 5, 2, padding=1)
        x = torch.randn(2, 3, 5, 5, generator=gen)
    elif kind == "conv-grouped":
        stale, twin = nn.Conv1d(8, 6, 3, groups=2), nn.Conv1d(4, 4, 3, groups=2)
        x = torch.randn(2, 4, 7, generator=gen)
    else:
        stale, twin = nn.Embedding(10, 6), nn.Embedding(7, 4)
        x = torch.randint(0, 7, (2, 3), generator=gen)
    with torch.no_grad():
        index = tuple(slice(0, n) for n in twin.weight.shape)
        stale.weight = nn.Parameter(stale.weight[index].clone())
        if getattr(stale, "bias", None) is not None:
            stale.bias = nn.Parameter(stale.bias[: twin.weight.shape[0]].clone())
    twin.load_state_dict(stale.state_dict())
    return stale.double(), twin.double(), x if kind == "embedding" else x.double()


@pytest.mark.parametrize(
    ("kind", "merged"),
    # a grouped conv's LoRA mixes every input channel: merged mode refuses it, stale or not
    [
        (k, m)
        for k in ("linear", "conv", "conv-grouped", "embedding")
        for m in (False, True)
        if k != "conv-grouped" or not m
    ],
)
def test_a_layer_whose_size_attributes_are_stale_computes_with_its_weights_sizes(kind: str, merged: bool) -> None:
    """A Linear, conv or Embedding whose weight was sliced by hand (its in_features /
    out_features, in_channels / out_channels / kernel_size, num_embeddings / embedding_dim left
    stale; its forward reads only the weight and groups) takes LoRA at its weight's sizes:
    float64 against its twin built at those sizes with the dense update. Before, inject accepted
    it at the stale sizes and its first forward crashed with an untyped RuntimeError."""
    stale, twin, x = _sliced(kind)
    model = Holder(stale)
    tensors, ab = make_adapter(Holder(twin), {"layer": 2}, dtype=torch.float64)
    want = reference(twin, x, *ab["layer"], 1.0)
    with torch.no_grad():
        base_out = model(x)
    runtime = lorahot.inject(model, ["layer"], max_rank=2, merged=merged)
    with torch.no_grad():
        assert torch.equal(model(x), base_out)
        runtime.load(tensors)
        torch.testing.assert_close(model(x), want, rtol=0, atol=1e-12)


class _CountingLinear(nn.Linear):
    """An ``nn.Linear`` subclass with a forward of its own (it counts its calls)."""

    calls = 0

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        type(self).calls += 1
        return super().forward(input)


def test_a_linear_subclass_with_its_own_forward_and_stale_sizes_is_refused() -> None:
    """An ``nn.Linear`` subclass that overrides forward and whose weight disagrees with its
    declared sizes is refused at inject, naming the module, both shapes and the fix: which of the
    two its forward computes with cannot be told. The model is as it was."""
    layer = _CountingLinear(8, 6)
    with torch.no_grad():
        layer.weight = nn.Parameter(layer.weight[:4, :5].clone())
        layer.bias = nn.Parameter(layer.bias[:4].clone())
    model = Holder(layer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        lorahot.UsageError,
        match=r"^layer: _CountingLinear declares in_features=8 and out_features=6, but its weight has shape \(4, 5\), "
        r"not \(6, 8\), .* Set in_features and out_features to the weight's",
    ):
        lorahot.inject(model, ["layer"], max_rank=2)
    assert model.layer is layer and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


class _Router(nn.Linear):
    """An ``nn.Linear`` whose forward returns ``(scores, logits)`` (transformers' Llama4Router)."""

    def forward(self, input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = super().forward(input)
        return logits.sigmoid(), logits


class _TwoDimensional(nn.Linear):
    """An ``nn.Linear`` whose forward takes only 2-D input (as a quantized one may take only
    its own device or dtype): the probe raises, and it is trusted as a Linear."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if input.dim() != 2:
            raise RuntimeError("2-D input only")
        return super().forward(input)


def test_a_linear_subclass_whose_forward_returns_no_output_of_its_size_is_refused() -> None:
    """An ``nn.Linear`` subclass with a forward of its own runs on inject's probe input: one
    returning a tuple is refused, naming the module and what it returned (Llama4's router gave
    an untyped AttributeError at the first forward, from the LoRA's add onto a tuple; "all-linear"
    leaves it out, ``tests/unit/runtime/test_inject.py``). One whose forward raises on the probe
    is wrapped and computes the float64 reference on input it takes."""
    torch.manual_seed(0)
    model = Holder(_Router(6, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        lorahot.UsageError,
        match=r"^layer: _Router declares in_features=6 and out_features=4, but its forward maps a probe input of "
        r"shape \(2, 3, 6\) to tuple, not \(2, 3, 4\)\..*Exclude this module from targets\.$",
    ):
        lorahot.inject(model, ["layer"], max_rank=2)
    assert type(model.layer) is _Router and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    layer = _TwoDimensional(6, 4).double()
    model = Holder(layer)
    tensors, ab = make_adapter(model, {"layer": 2}, dtype=torch.float64)
    lorahot.inject(model, ["layer"], max_rank=2).load(tensors)
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(layer, x, *ab["layer"], 1.0), rtol=1e-12, atol=1e-12)


class _ChannelMix(nn.Module):
    """A custom module that declares ``in_features`` / ``out_features`` but mixes channels
    first (``[B, C, L] -> [B, O, L]``, a 1x1 convolution), with what a forward may touch: a
    dropout drawing from the global generator, a running buffer and a call counter."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.in_features, self.out_features = cin, cout
        self.weight = nn.Parameter(torch.randn(cout, cin) / cin**0.5)
        self.register_buffer("seen", torch.zeros(()))
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.seen += x.detach().abs().mean()
        return F.dropout(torch.einsum("bcl,oc->bol", x, self.weight), 0.1, self.training)


@pytest.mark.parametrize(("cin", "cout"), [(6, 6), (6, 4)], ids=["same-sizes", "other-sizes"])
def test_a_custom_module_that_computes_over_another_dimension_is_refused_at_inject(cin: int, cout: int) -> None:
    """A custom module that declares in_features / out_features but computes over dimension 1
    (channels first) is refused at inject, naming the module and what its forward did with a
    probe input ``(2, 3, in)``. Before, it was wrapped and its LoRA added over the input's last
    dimension: silently wrong where that dimension's size equals ``in`` (max abs diff 2.9
    against the float64 channel-mixing reference on ``[2, 6, 6]``), an untyped RuntimeError
    elsewhere. The probe leaves the module, the model and the random generator as they were (its
    forward's counter, buffer and dropout; its forward hook never runs)."""
    torch.manual_seed(0)
    layer = _ChannelMix(cin, cout).train()
    hooked: list[object] = []
    layer.register_forward_hook(lambda *args: hooked.append(args))
    model = Holder(layer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    with pytest.raises(
        lorahot.UsageError,
        match=rf"^layer: _ChannelMix declares in_features={cin} and out_features={cout}, but its forward raised "
        r"RuntimeError on a probe input of shape \(2, 3, 6\): einsum\(\).*Exclude this module from targets\.$",
    ):
        lorahot.inject(model, ["layer"], max_rank=2)
    assert model.layer is layer and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert layer.calls == 0 and hooked == [] and torch.equal(torch.get_rng_state(), rng)


class _EitherLayout(nn.Module):
    """A custom linear over the last dimension of a 2-D or 3-D input, but channels first over a
    4-D one (``[B, C, H, W]``, as a 1x1 convolution): it passes inject's probe."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.in_features, self.out_features = cin, cout
        self.weight = nn.Parameter(torch.randn(cout, cin) / cin**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return torch.einsum("bchw,oc->bohw", x, self.weight)
        return x @ self.weight.t()


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("routed", [False, True], ids=["one-slot", "routed"])
def test_an_input_whose_last_dimension_is_not_the_layers_features_is_refused(routed: bool, compiled: bool) -> None:
    """A linear-like layer given an input whose last dimension is not its ``in`` features (a
    module that took it channels first) refuses its forward with a UsageError naming the
    layer, the input's shape and the fix, eagerly and compiled; inputs ``(..., in)`` compute
    the float64 reference. Before, an untyped RuntimeError (mat1 and mat2 shapes cannot be
    multiplied)."""
    torch.manual_seed(0)
    layer = _EitherLayout(6, 4).double()
    model = Holder(layer)
    tensors, ab = make_adapter(model, {"layer": 2}, dtype=torch.float64)
    x = torch.randn(2, 3, 6, dtype=torch.float64)
    want = reference(layer, x, *ab["layer"], 1.0)
    runtime = lorahot.inject(model, ["layer"], max_rank=2, slots=2)
    runtime.load(tensors)
    if routed:
        runtime.activate([0, -1])
        want[1:] = reference(layer, x[1:], None, None, 1.0)
    call = torch.compile(model, fullgraph=True) if compiled else model
    with torch.no_grad():
        torch.testing.assert_close(call(x), want, rtol=0, atol=1e-12)
        with pytest.raises(
            lorahot.UsageError,
            match=r"^layer \(LoRALinear over _EitherLayout \(6 -> 4\)\): its input has shape \(2, 6, 3, 5\), whose "
            r"last dimension is not its 6 input features\. .* Exclude this module from targets, or call it with "
            r"inputs \(\.\.\., 6\)\.$",
        ):
            call(torch.randn(2, 6, 3, 5, dtype=torch.float64))


def test_a_weight_that_holds_its_values_elsewhere_takes_the_library_path() -> None:
    """The fused kernel and the wide path read an nn.Linear's weight memory themselves (on CUDA,
    fp16/bf16). A torchao weight (a wrapper tensor subclass) reports the dtype it stands for and
    has no memory of it to read: both paths ask computes_as_stored, which now says no, and the
    layer calls the quantized module (the GPU half: tests/system/test_torchao.py)."""
    quantized = nn.Linear(6, 5)
    quantized.weight = nn.Parameter(TwoTensor(torch.randn(5, 6), torch.randn(5, 6)), requires_grad=False)
    assert not computes_as_stored(quantized)
    assert computes_as_stored(nn.Linear(6, 5))
