"""lorahot.runtime.dora: the DoRA factors ``m / ||W0 + s * B @ A||`` are checked before anything
is written. An adapter whose factors are not finite is refused at load (and preload), a scale
that makes them not finite is refused by set_scale, and either way nothing changes."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from torch.testing._internal.two_tensor import TwoTensor

import lorahot
from tests.helpers import PropertyWeight, tiny_lm, token_ids

N = "layers.0.self_attn.q_proj"
P = "base_model.model." + N


def _setup() -> tuple[torch.nn.Module, lorahot.LoraRuntime, torch.Tensor]:
    model = tiny_lm(seed=0, vocab=32, dtype=torch.float64)
    runtime = lorahot.inject(model, ["q_proj"], max_rank=8, extras=True)
    return model, runtime, model.get_submodule(N).base_layer.weight.detach().clone()


def _cancelling(w: torch.Tensor, sign: float = -1.0, magnitude: float = 1.0) -> dict[str, torch.Tensor]:
    """A rank-1 DoRA adapter whose ``B @ A`` is ``sign`` times channel 3 of the base weight (at
    scale 1): with ``sign = -1`` that channel's adapted weight is exactly 0."""
    b = torch.zeros(w.shape[0], 1, dtype=w.dtype)
    b[3, 0] = 1.0
    return {
        f"{P}.lora_A.weight": sign * w[3:4].clone(),
        f"{P}.lora_B.weight": b,
        f"{P}.lora_magnitude_vector": torch.full((w.shape[0],), magnitude, dtype=w.dtype),
    }


def _state(model: torch.nn.Module, runtime: lorahot.LoraRuntime) -> tuple:
    with torch.no_grad():
        out = model(token_ids((2, 5), 32))
    return out, [t.clone() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)], runtime.info(0)


def _same(a: tuple, b: tuple) -> bool:
    return torch.equal(a[0], b[0]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1])) and a[2] == b[2]


@pytest.mark.parametrize("kind", ["zero-norm", "overflow"])
def test_an_adapter_whose_factors_are_not_finite_is_refused_and_changes_nothing(kind: str) -> None:
    model, runtime, w = _setup()
    runtime.load(_cancelling(w, sign=0.5), slot=0)  # a DoRA adapter of finite factors first
    before = _state(model, runtime)
    bad = _cancelling(w) if kind == "zero-norm" else _cancelling(w, sign=0.5, magnitude=1e308)
    with pytest.raises(
        lorahot.AdapterReadError, match=r"DoRA factors .* are not finite in:\n  - layers.0.self_attn.q_proj"
    ):
        runtime.load(bad, slot=0)
    assert _same(before, _state(model, runtime))
    with pytest.raises(lorahot.AdapterReadError, match="DoRA factors"):
        runtime.preload(bad)  # a preloaded adapter always loads: refused there too
    assert _same(before, _state(model, runtime))


def test_a_scale_that_zeroes_a_channel_is_refused_by_set_scale_and_load() -> None:
    """An adapter whose ``B @ A`` is channel 3 of the base weight: fine at its own scale (the
    channel doubles), zero at scale -1."""
    model, runtime, w = _setup()
    adapter = _cancelling(w, sign=1.0)
    runtime.load(adapter, slot=0)
    before = _state(model, runtime)
    with pytest.raises(lorahot.UsageError, match=r"scale=-1: DoRA factors .* would not be finite"):
        runtime.set_scale(-1.0)
    assert _same(before, _state(model, runtime))
    with pytest.raises(lorahot.UsageError, match=r"scale=-1: DoRA factors"):
        runtime.load(adapter, slot=0, scale=-1.0)
    assert _same(before, _state(model, runtime))
    runtime.set_scale(-0.5)  # the negative control: a scale that leaves every channel's norm above 0
    with torch.no_grad():
        assert torch.isfinite(model(token_ids((2, 5), 32))).all()


@pytest.mark.parametrize("call", ["activate", "set_scale", "load"])
def test_a_base_weight_written_in_place_is_seen_by_the_next_runtime_call(call: str) -> None:
    """The base weight and bias written in place (``mul_``/``add_`` under no_grad, as an
    optimizer's step does), not through ``load_state_dict``: the next runtime call computes the
    factors again from the weight as it is (its version counter moved), as PEFT's forward does on
    every call, and so does the eager forward before it (``tests/system/test_dora_base_writes.py``).
    Against a float64 reference ``f * (W x + s B A x) + b``, ``f = m / ||W + s B A||`` per output
    channel."""
    model, runtime, _ = _setup()
    layer = model.get_submodule(N)
    w, b = layer.base_layer.weight, layer.base_layer.bias
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, w.shape[1], generator=g, dtype=w.dtype) / 4
    bb = torch.randn(w.shape[0], 4, generator=g, dtype=w.dtype) / 4
    m = torch.rand(w.shape[0], generator=g, dtype=w.dtype) + 0.5
    tensors = {f"{P}.lora_A.weight": a, f"{P}.lora_B.weight": bb, f"{P}.lora_magnitude_vector": m}
    runtime.load(tensors)
    x = torch.randn(3, w.shape[1], dtype=w.dtype)

    def reference() -> torch.Tensor:
        adapted = w + bb @ a
        f = m / adapted.norm(dim=1)
        bias = 0.0 if b is None else b
        return f * (x @ w.T + x @ a.T @ bb.T) + bias

    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference(), rtol=1e-12, atol=1e-12)
        w.mul_(1.5)
        if b is not None:
            b.add_(0.25)
        {
            "activate": lambda: runtime.activate(0),
            "set_scale": lambda: runtime.set_scale(1.0),
            "load": lambda: runtime.load(tensors),
        }[call]()
        torch.testing.assert_close(layer(x), reference(), rtol=1e-12, atol=1e-12)


class _Int8Linear(torch.nn.Linear):
    """A quantized linear's form: an int8 weight, times a per-row scale at forward."""

    def __init__(self) -> None:
        super().__init__(8, 6)
        w = self.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / 127
        self.weight = torch.nn.Parameter(torch.round(w / scale).to(torch.int8), requires_grad=False)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype) * self.scale, self.bias)


class _Packed(torch.nn.Module):
    """A GPTQ/AWQ-style linear: ``in_features`` / ``out_features``, packed data, no weight."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 8, 6
        w = torch.randn(6, 8)
        scale = w.abs().amax(1, keepdim=True) / 127
        self.register_buffer("qweight", torch.round(w / scale).to(torch.int8))
        self.register_buffer("scales", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.to(x.dtype) * self.scales)


class _StaleWeight(_Packed):
    """The same, with a float ``weight`` its forward never reads (kept for a checkpoint's keys)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(6, 8), requires_grad=False)


def _dora_adapter(seed: int = 3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    p = "base_model.model.0"
    return {
        f"{p}.lora_A.weight": torch.randn(2, 8, generator=gen),
        f"{p}.lora_B.weight": torch.randn(6, 2, generator=gen),
        f"{p}.lora_magnitude_vector": torch.rand(6, generator=gen) + 0.5,
    }


@pytest.mark.parametrize(
    ("make", "why"),
    [
        (_Int8Linear, r"its weight is torch\.int8, not the values it computes with"),
        (_Packed, r"it has no weight tensor \(weight is NoneType\)"),
        (_StaleWeight, r"_StaleWeight does not compute the linear map of its weight \(on a probe input"),
    ],
    ids=["int8 weight", "no weight", "a weight its forward does not read"],
)
def test_dora_is_refused_where_the_weight_is_not_the_one_the_layer_computes_with(make: type, why: str) -> None:
    """DoRA's factor m / ||W0 + s * B @ A|| reads the base weight W0. On a quantized layer's
    int8 weight (its forward scales it) it took the integers for the weights: silently wrong
    (max abs diff 2.70 from the float64 reference with the weight the forward computes with);
    on a float weight the forward does not read, 0.84; on a layer with no weight tensor an
    UnexpectedError (an AttributeError inside ``base_weight``). Refused at load, naming the
    layer and why, the model as it was; a plain LoRA still loads."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(make())
    runtime = lorahot.inject(model, ["0"], max_rank=4, extras=True, dtype=torch.float32)
    x = torch.randn(3, 8)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"- 0 \(.*\): DoRA's factor .* and {why}"):
        runtime.load(_dora_adapter(), config={"use_dora": True})
    assert runtime.info(0) is None
    with torch.no_grad():
        assert torch.equal(model(x), before)
    plain = {k: v for k, v in _dora_adapter().items() if "magnitude" not in k}
    runtime.load(plain)


def test_dora_runs_on_a_layer_whose_weight_property_gives_what_it_computes_with() -> None:
    """A weight read through a property that dequantizes is the one the forward computes with:
    DoRA runs there, against the float64 reference f * (W0 x + s B A x) + b0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(PropertyWeight(8, 6))
    runtime = lorahot.inject(model, ["0"], max_rank=4, extras=True)
    tensors = _dora_adapter()
    runtime.load(tensors, config={"use_dora": True, "lora_alpha": 4, "r": 2})
    x = torch.randn(3, 8)
    a, b, m = (t.double() for t in tensors.values())
    w0, b0 = model[0].weight.double(), model[0].bias.double()
    f = m / torch.linalg.vector_norm(w0 + 2 * b @ a, dim=1)
    want = f * (x.double() @ w0.t() + 2 * x.double() @ a.t() @ b.t()) + b0
    with torch.no_grad():
        torch.testing.assert_close(model(x).double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dora_is_refused_on_a_layer_whose_forward_pre_hooks_may_rewrite_its_weight(kind: str) -> None:
    """A forward pre-hook that rewrites the weight in place (a clamp) runs before each call;
    lorahot computes DoRA's factor when the adapter or its scale changes, so every forward went
    on with the factor of the weight before the hook: 0.30 off the float64 reference where PEFT
    computes the factor at each call, silently. Refused at load, the model as it was; a plain
    LoRA still loads."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 6) if kind == "linear" else torch.nn.Conv2d(8, 6, 1)

    def clamp(module: torch.nn.Module, args: tuple) -> None:
        with torch.no_grad():
            module.weight.clamp_(-0.1, 0.1)

    layer.register_forward_pre_hook(clamp)
    model = torch.nn.Sequential(layer)
    runtime = lorahot.inject(model, ["0"], max_rank=4, extras=True)
    tensors = _dora_adapter()
    if kind == "conv":
        tensors = {k: v[..., None, None] if v.dim() == 2 else v for k, v in tensors.items()}
    x = torch.randn(3, 8) if kind == "linear" else torch.randn(2, 8, 3, 3)
    with torch.no_grad():
        before = model(x)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"- 0 \(.*\): (Linear|Conv2d) has forward pre-hooks, which"):
        runtime.load(tensors, config={"use_dora": True})
    with torch.no_grad():
        assert torch.equal(model(x), before)
    runtime.load({k: v for k, v in tensors.items() if "magnitude" not in k})


@pytest.mark.parametrize("kind", ["embedding", "conv"])
def test_dora_is_refused_on_an_embedding_or_conv_whose_weight_is_a_tensor_subclass(kind: str) -> None:
    """A tensor subclass weight (torchao's quantized embeddings, IntxWeightOnlyConfig) does not
    hold the values the layer computes with: DoRA's norm over it failed with an UnexpectedError
    (torchao) or ran over whatever the subclass's arithmetic gave (torch's TwoTensor), silently.
    Refused at load for every layer kind, as for a Linear."""
    torch.manual_seed(0)
    layer = torch.nn.Embedding(20, 6) if kind == "embedding" else torch.nn.Conv2d(8, 6, 1)
    weight = layer.weight.detach()
    layer.weight = torch.nn.Parameter(TwoTensor(weight, weight.clone()), requires_grad=False)
    runtime = lorahot.inject(torch.nn.Sequential(layer), ["0"], max_rank=4, extras=True)
    gen = torch.Generator().manual_seed(1)
    p = "base_model.model.0"
    if kind == "embedding":
        tensors = {
            f"{p}.lora_embedding_A": torch.randn(2, 20, generator=gen),
            f"{p}.lora_embedding_B": torch.randn(6, 2),
        }
    else:
        tensors = {f"{p}.lora_A.weight": torch.randn(2, 8, 1, 1), f"{p}.lora_B.weight": torch.randn(6, 2, 1, 1)}
    tensors[f"{p}.lora_magnitude_vector"] = torch.rand(6, generator=gen) + 0.5
    with pytest.raises(
        lorahot.AdapterMismatchError, match=r"needs the weight W0 that \w+ computes with, and its weight "
    ):
        runtime.load(tensors, config={"use_dora": True})
    assert runtime.info(0) is None


class _Scaled(torch.nn.Module):
    """A parametrization: the tensor times 1.5."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * 1.5


#: ways a base layer comes to compute its weight (or bias) anew at each call
_REPARAMETRIZE = {
    "parametrized weight_norm": torch.nn.utils.parametrizations.weight_norm,
    "parametrized spectral_norm": torch.nn.utils.parametrizations.spectral_norm,
    "parametrized weight": lambda m: torch.nn.utils.parametrize.register_parametrization(m, "weight", _Scaled()),
    "parametrized bias": lambda m: torch.nn.utils.parametrize.register_parametrization(m, "bias", _Scaled()),
    "weight_norm": torch.nn.utils.weight_norm,
    "pruned": lambda m: torch.nn.utils.prune.l1_unstructured(m, "weight", amount=0.25),
}
_COMPUTED = (
    r"(Parametrized\w+'s (weight|bias) is computed by a parametrization at each call|Linear has forward pre-hooks)"
)


def _tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer (a spectral_norm's power-iteration vectors too), cloned."""
    return {k: v.detach().clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}


def _unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    now = _tensors(model)
    return now.keys() == before.keys() and all(torch.equal(now[k], v) for k, v in before.items())


@pytest.mark.parametrize("how", list(_REPARAMETRIZE))
def test_dora_is_refused_on_a_base_that_computes_its_weight_at_each_call(how: str) -> None:
    """PEFT computes DoRA's factor m / ||W + s B A|| from the weight each call gives; lorahot when
    the adapter or its scale changes. A parametrized weight (weight_norm's g and v trained, a
    spectral_norm stepping its power iteration at each training-mode call) changes between
    them, and its version counter, read from a tensor computed anew at each read, never moved:
    the factor went stale, silently. Refused at load like forward pre-hooks (the older
    weight_norm, pruning), every parameter and buffer bitwise as before in training mode (the
    refusal runs no parametrization); a plain LoRA loads and matches the float64 reference."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6)).double()
    runtime = lorahot.inject(model, ["0"], max_rank=4, extras=True)
    _REPARAMETRIZE[how](model[0].base_layer)
    tensors = {k: v.double() for k, v in _dora_adapter().items()}
    before = _tensors(model)
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"- 0 \(.*\): {_COMPUTED}, which .* the weight DoRA's"):
        runtime.load(tensors, config={"use_dora": True, "r": 2, "lora_alpha": 2})
    assert _unchanged(model, before)
    runtime.load({k: v for k, v in tensors.items() if "magnitude" not in k}, config={"r": 2, "lora_alpha": 2})
    model.eval()
    x = torch.randn(3, 8, dtype=torch.float64)
    a, b = tensors["base_model.model.0.lora_A.weight"], tensors["base_model.model.0.lora_B.weight"]
    with torch.no_grad():
        torch.testing.assert_close(model(x), model[0].base_layer(x) + x @ a.T @ b.T, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("call", ["set_scale", "activate", "load"])
@pytest.mark.parametrize("how", list(_REPARAMETRIZE))
def test_a_base_reparametrized_after_a_dora_load_refuses_the_next_runtime_call(how: str, call: str) -> None:
    """A parametrization, weight_norm, spectral_norm or pruning applied to a base layer after a
    DoRA adapter was loaded on it: the forward went on with the factor of the weight before
    (0.006 off the float64 reference through spectral_norm), no runtime call noticed (the
    counter of a weight computed anew at each read never moves), and each call read the weight,
    stepping a spectral_norm's power iteration in training mode. The next runtime call refuses,
    reading no weight: every parameter, buffer and LoRA buffer bitwise as before. unload is the
    way out: the layer then computes its base output."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6)).double()
    runtime = lorahot.inject(model, ["0"], max_rank=4, extras=True)
    tensors = {k: v.double() for k, v in _dora_adapter().items()}
    runtime.load(tensors, config={"use_dora": True, "r": 2, "lora_alpha": 2})
    _REPARAMETRIZE[how](model[0].base_layer)
    before = _tensors(model)
    arenas = [t.clone() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)]
    calls = {
        "set_scale": lambda: runtime.set_scale(0.5),
        "activate": lambda: runtime.activate(0),
        "load": lambda: runtime.load(tensors, config={"use_dora": True, "r": 2, "lora_alpha": 2}),
    }
    with pytest.raises(
        lorahot.UsageError, match=rf"DoRA adapter compute their base weight anew .*\n  - 0: {_COMPUTED}"
    ):
        calls[call]()
    assert _unchanged(model, before)
    assert all(
        torch.equal(t, u) for t, u in zip(arenas, (t for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)))
    )
    runtime.unload()
    model.eval()
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(model(x), model[0].base_layer(x))


@pytest.mark.parametrize("how", ["prune.remove", "weight.data ="])
def test_a_base_weight_given_new_memory_is_seen_by_the_next_runtime_call(how: str) -> None:
    """``weight.data = new`` puts new memory under the weight without moving its version
    counter, and so does pruning made permanent (``prune.l1_unstructured``, then
    ``prune.remove``, which the runtime's refusal of the pruned layer advises): the DoRA factors
    stayed those of the weight before through every runtime call that does not recompute them
    itself (``activate``: 0.32 and 0.029 off the float64 reference ``f * (W x + B A x) + b``,
    ``f = m / ||W + B A||``), silently. The next runtime call now computes them again from the
    weight as it is."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6)).double()
    runtime = lorahot.inject(model, ["0"], max_rank=4, extras=True)
    tensors = {k: v.double() for k, v in _dora_adapter().items()}
    config = {"use_dora": True, "r": 2, "lora_alpha": 2}
    runtime.load(tensors, config=config)
    base = model[0].base_layer
    if how == "prune.remove":
        torch.nn.utils.prune.l1_unstructured(base, "weight", amount=0.5)
        torch.nn.utils.prune.remove(base, "weight")
    else:
        base.weight.data = base.weight.data * 0.5
    runtime.activate(0)
    p = "base_model.model.0"
    a, b, m = tensors[f"{p}.lora_A.weight"], tensors[f"{p}.lora_B.weight"], tensors[f"{p}.lora_magnitude_vector"]
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        w = base.weight
        want = m / (w + b @ a).norm(dim=1) * (x @ w.T + x @ a.T @ b.T) + base.bias
        torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)


class _LinearConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(64, 32)
        self.conv = torch.nn.Conv2d(4, 6, 3, padding=1)

    def forward(self, x: torch.Tensor, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.fc(x), self.conv(img)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("call", ["load", "activate", "set_scale"])
def test_calls_under_autocast_compute_dora_factors_in_the_models_dtype(tmp_path, call: str, merged: bool) -> None:
    """A serving loop may wrap every step in ``torch.autocast``: a call made there still computes
    the factors ``m / ||W0 + s B @ A||`` (merged: the folded weights) of a float32 model in
    float32, for every later forward. Under CPU bfloat16 autocast they were computed in
    bfloat16 (2e-3 to 8e-3 off PEFT's float64 output, float32 rounding being 3e-7)."""
    peft = pytest.importorskip("peft")
    import copy

    torch.manual_seed(0)
    base = _LinearConv()
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["fc", "conv"], init_lora_weights=False, use_dora=True)
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(str(tmp_path))
    x, img = torch.randn(3, 64), torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(copy.deepcopy(base).double(), str(tmp_path))(x.double(), img.double())
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, ["fc", "conv"], max_rank=8, slots=2, merged=merged, extras=not merged)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16)
    if call == "load":
        with autocast:
            runtime.load(str(tmp_path))
    elif call == "activate":
        runtime.load(str(tmp_path), slot=1)
        with autocast:
            runtime.activate(1)
    else:
        runtime.load(str(tmp_path), scale=0.5)
        with autocast:
            runtime.set_scale(1.0)
    assert torch.is_autocast_enabled("cpu") is False
    with torch.no_grad():
        got = model(x, img)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), w, rtol=0, atol=1e-5)
