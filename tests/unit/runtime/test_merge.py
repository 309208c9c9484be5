"""Merged mode: the adapter folded into the base weights equals the unmerged LoRA output."""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing._internal.two_tensor import TwoTensor
from torch.utils._python_dispatch import TorchDispatchMode

import lorahot
from tests.helpers import (
    Conv1D,
    PropertyWeight,
    assert_rounded_once,
    make_adapter,
    model_reference,
    tiny_lm,
    token_ids,
)


def _pair(slots: int = 1) -> tuple[nn.Module, nn.Module, lorahot.LoraRuntime, lorahot.LoraRuntime]:
    torch.manual_seed(0)
    plain = tiny_lm(dtype=torch.float64)
    merged = copy.deepcopy(plain)
    targets = ["q_proj", "v_proj", "embed_tokens"]
    return (
        plain,
        merged,
        lorahot.inject(plain, targets, max_rank=8, slots=slots),
        lorahot.inject(merged, targets, max_rank=8, slots=slots, merged=True),
    )


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), (a - b).abs().max()


@pytest.mark.parametrize("eject", ["runtime", "module"])
def test_merged_equals_unmerged_through_swaps_and_eject_restores(eject: str) -> None:
    plain, merged, rt_plain, rt_merged = _pair(slots=2)
    ids = token_ids((2, 5), vocab=32)
    base = merged(ids).clone()
    weights = {n: p.clone() for n, p in merged.state_dict().items()}
    for seed, (slot, rank) in enumerate([(0, 4), (1, 8), (0, 2)]):
        names = list(rt_plain.layers)
        tensors = make_adapter(plain, dict.fromkeys(names, rank), seed=seed, dtype=torch.float64)[0]
        for rt in (rt_plain, rt_merged):
            rt.load(tensors, slot=slot, scale=0.5 + seed)
        _close(merged(ids), plain(ids))
    for rt in (rt_plain, rt_merged):
        rt.activate(1)
        rt.set_scale(0.3)
    _close(merged(ids), plain(ids))
    rt_merged.eject() if eject == "runtime" else lorahot.eject(merged)  # an adapter is still merged
    assert torch.equal(merged(ids), base)
    assert all(torch.equal(p, weights[n]) for n, p in merged.state_dict().items())


def test_merged_grouped_conv_refuses_a_lora_at_load() -> None:
    """Merged mode holds a grouped conv for the kinds whose update has its weight's layout
    (tests/system/test_parity_lycoris_grouped.py); a LoRA, whose A mixes every group's input
    channels, is refused at load naming the layer, nothing changed."""
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    w0 = model[0].weight.detach().clone()
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    lora = {"0.lora_A.weight": torch.ones(2, 4, 3, 3), "0.lora_B.weight": torch.ones(4, 1, 1, 1)}
    with pytest.raises(
        lorahot.AdapterMismatchError, match=r"- 0: .*groups=2 .*A mixes the input channels of every group"
    ):
        runtime.load(lora)
    assert torch.equal(model[0].weight, w0) and runtime.info() is None


def _hooked(kind: str) -> nn.Module:
    torch.manual_seed(0)
    layer: nn.Module = nn.Embedding(10, 6) if kind == "embedding hook" else nn.Conv2d(3, 5, 3)
    if kind.startswith("linear"):
        layer = nn.Linear(6, 5)
    if kind == "linear pre-hook":
        layer.register_forward_pre_hook(lambda m, args: (args[0] * 2,))
    elif kind == "linear instance forward":
        plain = layer.forward
        layer.forward = lambda x: plain(x) * 0.5 + 1  # type: ignore[method-assign]  # as accelerate sets one
    else:
        layer.register_forward_hook(lambda m, args, out: out * 3)
    return nn.Sequential(layer).double()


@pytest.mark.parametrize(
    "kind", ["linear pre-hook", "linear hook", "linear instance forward", "conv hook", "embedding hook"]
)
def test_merged_refuses_a_layer_whose_hooks_would_see_the_folded_lora(kind: str) -> None:
    """A hook (or an instance forward) on the base layer would act on a folded ``B @ A`` too,
    where unmerged, as in PEFT's unmerged forward, it sees the base output alone: a different
    number, silently (a layer-kind hunt measured differences of 3.7 to 119). Refused at
    inject, the model left as it was; unmerged still serves it."""
    model = _hooked(kind)
    with pytest.raises(
        lorahot.UsageError, match=r"^0: .* which would act on the folded LoRA too .* inject without merged"
    ):
        lorahot.inject(model, ["0"], max_rank=4, merged=True)
    assert not isinstance(model[0], lorahot.LoRALayer)
    lorahot.inject(model, ["0"], max_rank=4)


class _PropertyOverParameter(nn.Module):
    """A linear-like module whose ``weight`` is a class property giving its parameter ``w``:
    the two share memory, though no other module holds it."""

    def __init__(self) -> None:
        super().__init__()
        self.in_features, self.out_features = 6, 5
        self.w = nn.Parameter(torch.randn(5, 6))

    @property
    def weight(self) -> torch.Tensor:
        return self.w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.w)


def _unstored(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "property":
        return nn.Sequential(PropertyWeight(6, 5)).double()
    if kind == "property over a parameter":
        return nn.Sequential(_PropertyOverParameter()).double()
    layer = nn.Linear(6, 5).double()
    if kind == "pruned":
        torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=0.5)
    elif kind == "spectral_norm":  # its weight is weight_orig's memory until the first call
        torch.nn.utils.spectral_norm(layer).eval()
    elif kind in ("buffer", "attribute"):
        weight = layer.weight.detach().clone()
        del layer.weight
        if kind == "buffer":
            layer.register_buffer("weight", weight)
        else:
            layer.weight = weight  # type: ignore[assignment]
    return nn.Sequential(layer)


@pytest.mark.parametrize(
    ("kind", "how"),
    [
        ("property", r"not the parameter it stores as 'weight' \(a property or an attribute of PropertyWeight"),
        ("pruned", r"computed from other tensors on each call by a forward pre-hook \(pruning, spectral_norm"),
        ("spectral_norm", r"computed from other tensors on each call by a forward pre-hook \(pruning, spectral_norm"),
        ("property over a parameter", r"given by a property of _PropertyOverParameter, not stored as a parameter"),
        ("buffer", r"a buffer, not a parameter"),
        ("attribute", r"a plain tensor attribute, not a parameter"),
    ],
)
def test_merged_refuses_a_weight_the_forward_reads_from_elsewhere_than_its_parameter(kind: str, how: str) -> None:
    """Merged mode rewrites the parameter stored as ``weight``. A forward that reads ``weight``
    from elsewhere (a class property that dequantizes: the parameter nn.Linear stored stays,
    unread) got the rewrite of a tensor nothing reads: the adapter was dropped, silently (max
    abs diff 5.68 from the float64 reference, the whole update). Refused at inject, naming what
    the weight is and the fix, the model bitwise as it was; unmerged serves it. A weight that
    shares memory with another tensor of its own module (spectral_norm's, a property over another
    parameter) is refused for what it is, not as tied to itself."""
    model = _unstored(kind)
    x = torch.randn(3, 6, dtype=torch.float64)
    state = copy.deepcopy(model.state_dict())
    # before any forward: spectral_norm's weight is weight_orig's memory until its first call
    with pytest.raises(lorahot.UsageError, match=rf"^0: its weight is {how}.*Inject without merged=True, or "):
        lorahot.inject(model, ["0"], max_rank=4, merged=True)
    assert not isinstance(model[0], lorahot.LoRALayer)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    with torch.no_grad():
        before = model(x)
    runtime = lorahot.inject(model, ["0"], max_rank=4)
    tensors, ab = make_adapter(model, {"0": 2}, seed=1, dtype=torch.float64)
    runtime.load(tensors)
    a, b = ab["0"]
    with torch.no_grad():
        _close(model(x), before + x @ a.T @ b.T)


def _reparametrize(module: nn.Module, how: str) -> None:
    """Makes ``module``'s weight (or bias) one its forward computes on each call."""
    if how == "weight_norm":
        torch.nn.utils.weight_norm(module)
    elif how == "parametrized weight_norm":
        torch.nn.utils.parametrizations.weight_norm(module)
    elif how == "spectral_norm":
        torch.nn.utils.parametrizations.spectral_norm(module)
    elif how == "pruned":
        torch.nn.utils.prune.l1_unstructured(module, "weight", amount=0.25)
    else:  # a parametrized bias
        torch.nn.utils.parametrize.register_parametrization(module, "bias", nn.Identity())


@pytest.mark.parametrize(
    ("how", "what"),
    [
        ("weight_norm", "weight is computed from other tensors on each call by a forward pre-hook"),
        ("parametrized weight_norm", r"weight is computed from other tensors on each call \(a parametrization\)"),
        ("spectral_norm", r"weight is computed from other tensors on each call \(a parametrization\)"),
        ("pruned", "weight is computed from other tensors on each call by a forward pre-hook"),
        ("bias", r"bias is computed from other tensors on each call \(a parametrization\)"),
    ],
)
@pytest.mark.parametrize("call", ["set_scale", "load", "activate", "unload"])
def test_a_weight_reparametrized_after_a_merged_inject_refuses_the_next_write(how: str, what: str, call: str) -> None:
    """A parametrization, weight_norm, spectral_norm or pruning applied to a merged layer's base
    after inject takes its weight (bias) out of the parameters merged mode rewrites: the forward
    computes it from other tensors. Each later write went to a tensor nothing reads, and the
    model kept the adapter and scale of before (0.23 off the float64 reference of a set_scale
    through weight_norm, a swap through a parametrization likewise), silently. Refused before
    anything is written, naming the layer and what its weight is; every buffer, parameter and
    the output bitwise as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, slots=2, merged=True)
    one, _ = make_adapter(model, {"0": 2, "2": 2}, seed=1, dtype=torch.float64)
    two, _ = make_adapter(model, {"0": 2, "2": 2}, seed=2, dtype=torch.float64)
    runtime.load(one)
    runtime.load(two, slot=1)
    _reparametrize(model[0].base_layer, how)
    model.eval()  # spectral_norm's power iteration steps at each training-mode call
    x = torch.randn(3, 8, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    arenas = [t.clone() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S)]
    with torch.no_grad():
        before = model(x)
    calls = {
        "set_scale": lambda: runtime.set_scale(0.5),
        "load": lambda: runtime.load(two),
        "activate": lambda: runtime.activate(1),
        "unload": lambda: runtime.unload(0),
    }
    with pytest.raises(lorahot.UsageError, match=rf"no longer store the weight or bias .*\n  - 0: its {what}"):
        calls[call]()
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(torch.equal(t, u) for t, u in zip(arenas, (t for a in runtime.buffers.arenas for t in (a.A, a.B, a.S))))


class _Doubled(nn.Module):
    """A parametrization: the tensor times 2."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return t * 2


#: per reparametrization: how to apply it to a module, how to remove it, and what the eject refusal says
_REPARAMETRIZATIONS = {
    "weight_norm": (
        torch.nn.utils.weight_norm,
        torch.nn.utils.remove_weight_norm,
        "weight is computed from other tensors on each call by a forward pre-hook",
    ),
    "parametrized weight_norm": (
        torch.nn.utils.parametrizations.weight_norm,
        lambda m: torch.nn.utils.parametrize.remove_parametrizations(m, "weight"),
        r"weight is computed from other tensors on each call \(a parametrization\)",
    ),
    "spectral_norm": (
        torch.nn.utils.spectral_norm,
        torch.nn.utils.remove_spectral_norm,
        "weight is computed from other tensors on each call by a forward pre-hook",
    ),
    "parametrized spectral_norm": (
        torch.nn.utils.parametrizations.spectral_norm,
        lambda m: torch.nn.utils.parametrize.remove_parametrizations(m, "weight"),
        r"weight is computed from other tensors on each call \(a parametrization\)",
    ),
    "pruned": (
        lambda m: torch.nn.utils.prune.l1_unstructured(m, "weight", amount=0.25),
        lambda m: torch.nn.utils.prune.remove(m, "weight"),
        "weight is computed from other tensors on each call by a forward pre-hook",
    ),
    "parametrized weight": (
        lambda m: torch.nn.utils.parametrize.register_parametrization(m, "weight", _Doubled()),
        lambda m: torch.nn.utils.parametrize.remove_parametrizations(m, "weight"),
        r"weight is computed from other tensors on each call \(a parametrization\)",
    ),
    "parametrized bias": (
        lambda m: torch.nn.utils.parametrize.register_parametrization(m, "bias", _Doubled()),
        lambda m: torch.nn.utils.parametrize.remove_parametrizations(m, "bias"),
        r"bias is computed from other tensors on each call \(a parametrization\)",
    ),
}


@pytest.mark.parametrize("eject", ["lorahot.eject", "runtime.eject"])
@pytest.mark.parametrize("how", list(_REPARAMETRIZATIONS))
def test_eject_of_a_merged_layer_reparametrized_since_inject_refuses_until_it_is_removed(how: str, eject: str) -> None:
    """A parametrization, weight_norm, spectral_norm or pruning applied to a merged layer's base
    after inject computes its weight from the merged one (the adapter folded in). Eject put the
    base weight into a tensor the forward no longer reads: the adapter stayed in the model
    (0.65 off the base model through weight_norm), silently; and the way out, removing it, was
    refused by lorahot's own parameter hook, halfway (remove_weight_norm left the layer without
    a weight). Now eject refuses, every parameter, buffer and the output bitwise as before;
    the removal goes through; writes still refuse (the weight holds the merged weight
    reparametrized); and eject then gives the base model back bitwise."""
    apply, remove, what = _REPARAMETRIZATIONS[how]
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        base = model(x)
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, merged=True)
    runtime.load(make_adapter(model, {"0": 2, "2": 2}, seed=1, dtype=torch.float64)[0])
    apply(model[0].base_layer)
    model.eval()  # spectral_norm's power iteration steps at each training-mode call
    tensors = {k: v.clone() for k, v in [*model.named_parameters(), *model.named_buffers()]}
    with torch.no_grad():
        before = model(x)
    ejects = {"lorahot.eject": lambda: lorahot.eject(model), "runtime.eject": runtime.eject}
    with pytest.raises(lorahot.UsageError, match=rf"eject cannot take the adapter out .*\n  - 0: its {what}"):
        ejects[eject]()
    with torch.no_grad():
        assert torch.equal(model(x), before)
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert now.keys() == tensors.keys() and all(torch.equal(now[k], v) for k, v in tensors.items())
    assert isinstance(model[0], lorahot.LoRALayer) and isinstance(model[2], lorahot.LoRALayer)
    remove(model[0].base_layer)
    with pytest.raises(lorahot.UsageError, match=r"  - 0: a parametrization, .* removed since"):
        runtime.unload()
    ejects[eject]()
    assert not any(isinstance(m, lorahot.LoRALayer) for m in model.modules())
    assert model.state_dict().keys() == originals.keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in originals.items())
    with torch.no_grad():
        assert torch.equal(model(x), base)


def test_merged_refuses_a_weight_that_is_a_method() -> None:
    """torch's dynamically quantized Linear: ``weight()`` unpacks its packed weight."""
    model = nn.Sequential(torch.ao.nn.quantized.dynamic.Linear(6, 5))
    with pytest.raises(
        lorahot.UsageError, match=r"^0: its weight is a method, not a stored tensor \(a quantized module's packed"
    ):
        lorahot.inject(model, ["0"], max_rank=4, merged=True, dtype=torch.float32)


class _Dequantizing(nn.Linear):
    """A quantized linear's form: its weight in ``dtype``, times a per-row scale at forward."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__(6, 5)
        w = self.weight.detach()
        scale = w.abs().amax(1, keepdim=True) / 100
        self.weight = nn.Parameter((w / scale).to(dtype), requires_grad=False)
        self.register_buffer("scale", scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype) * self.scale, self.bias)


@pytest.mark.parametrize(
    ("weight", "what"),
    [
        (lambda: _Dequantizing(torch.float8_e4m3fn), r"torch\.float8_e4m3fn"),
        (lambda: _Dequantizing(torch.int8), r"torch\.int8"),
        (lambda: _linear_with(TwoTensor(torch.randn(5, 6), torch.randn(5, 6))), r"of type TwoTensor"),
    ],
    ids=["float8", "int8", "tensor subclass"],
)
def test_merged_refuses_a_weight_that_does_not_hold_its_values_densely(weight: Any, what: str) -> None:
    """A float8 or integer weight its forward scales, a tensor subclass (torchao's quantized
    weights): merged mode cannot write ``W + s * B @ A`` into them; refused at inject, naming
    the weight's form (a subclass failed with UnexpectedError, a float8 one with its probe
    forward's error), the model as it was."""
    module = weight()
    model = nn.Sequential(module)
    with pytest.raises(lorahot.UsageError, match=rf"^0: its weight is {what}, so merged mode cannot rewrite it"):
        lorahot.inject(model, ["0"], max_rank=4, merged=True, dtype=torch.float32)
    assert model[0] is module


def _linear_with(weight: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(6, 5)
    layer.weight = nn.Parameter(weight, requires_grad=False)
    return layer


# -- tied weights ------------------------------------------------------------------------------


def _tied_lm() -> nn.Module:
    model = tiny_lm(dtype=torch.float64)
    model.lm_head.weight = model.embed_tokens.weight  # tied, as in most LMs (one Parameter)
    return model


@pytest.mark.parametrize("targets", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]])
def test_merged_refuses_a_weight_tied_to_another_module(targets: list[str]) -> None:
    model = _tied_lm()
    weight = model.embed_tokens.weight.detach().clone()
    with pytest.raises(
        lorahot.UsageError,
        match=r"(embed_tokens|lm_head): its weight is tied to (lm_head|embed_tokens) \((lm_head|embed_tokens)\.weight "
        r"shares its memory\); merged mode would rewrite both .*Inject without merged=True, or untie them \(give",
    ):
        lorahot.inject(model, targets, max_rank=4, merged=True)
    assert isinstance(model.embed_tokens, nn.Embedding) and isinstance(model.lm_head, nn.Linear)
    assert torch.equal(model.embed_tokens.weight, weight)


def test_tied_weights_found_by_storage_not_by_name() -> None:
    """Two modules whose weights are views of one tensor, with unrelated names."""
    torch.manual_seed(0)
    shared = torch.randn(2, 6, 6, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(6, 6).double(), nn.Linear(6, 6).double(), nn.Linear(6, 6).double())
    with torch.no_grad():
        model[0].weight = nn.Parameter(shared[0])
        model[1].weight = nn.Parameter(shared[1])  # same storage, other bytes: not tied
        model[2].weight = nn.Parameter(shared[1].t())  # the same bytes as model[1], transposed
    with pytest.raises(lorahot.UsageError, match=r"^1: its weight is tied to 2 \(2\.weight shares its memory\)"):
        lorahot.inject(model, ["0", "1"], max_rank=2, merged=True)
    lorahot.inject(model, ["0"], max_rank=2, merged=True)  # a disjoint slice of the storage is fine


def test_merged_refuses_a_bias_tied_to_another_module() -> None:
    """A LoRA bias folds into the targeted layer's bias in place, so a bias shared with another
    layer would move that layer's output too (it did, silently); unmerged, the adapter applies
    and the shared bias stays as it was."""

    def model() -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6)).double()
        net[1].bias = net[0].bias  # weights apart, one bias
        return net

    net = model()
    with pytest.raises(
        lorahot.UsageError,
        match=r"^0: its bias is tied to 1 \(1\.bias shares its memory\); merged mode would rewrite both 0 and 1\. "
        r"Inject without merged=True, or untie them \(give 1 its own copy of the bias\)",
    ):
        lorahot.inject(net, ["0"], max_rank=2, merged=True, extras=True)
    assert isinstance(net[0], nn.Linear) and net[1].bias is net[0].bias
    net, x = model(), torch.randn(3, 6, dtype=torch.float64)
    bias = net[0].bias.detach().clone()
    runtime = lorahot.inject(net, ["0"], max_rank=2, extras=True)
    tensors, ab = make_adapter(net, {"0": 2}, seed=1, dtype=torch.float64)
    c = torch.randn(6, dtype=torch.float64)
    runtime.load({**tensors, "0.lora_B.bias": c})
    a, b = ab["0"]
    with torch.no_grad():
        h = x @ net[0].base_layer.weight.T + bias + x @ a.T @ b.T + c
        _close(net(x), h @ net[1].weight.T + bias)
    assert torch.equal(net[1].bias, bias)


def test_merged_refuses_a_parametrized_bias() -> None:
    """A bias recomputed on each call by a parametrization: merged mode wrote the LoRA bias into
    a tensor the next call threw away (the LoRA bias was dropped, silently)."""

    class Double(nn.Module):
        def forward(self, bias: torch.Tensor) -> torch.Tensor:
            return bias * 2

    def model() -> nn.Module:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(6, 4).double())
        torch.nn.utils.parametrize.register_parametrization(net[0], "bias", Double())
        return net

    with pytest.raises(
        lorahot.UsageError,
        match=r"^0: its bias is computed from other tensors on each call \(a parametrization\).*Inject without "
        r"merged=True, or remove the parametrization",
    ):
        lorahot.inject(model(), "0", max_rank=2, merged=True, extras=True)
    net, x = model(), torch.randn(3, 6, dtype=torch.float64)
    with torch.no_grad():
        base = net(x)
    runtime = lorahot.inject(net, "0", max_rank=2, extras=True)  # a regex: not the parametrization's "...bias.0"
    tensors, ab = make_adapter(net, {"0": 2}, seed=1, dtype=torch.float64)
    c = torch.randn(4, dtype=torch.float64)
    runtime.load({**tensors, "0.lora_B.bias": c})
    a, b = ab["0"]
    with torch.no_grad():
        _close(net(x), base + x @ a.T @ b.T + c)


def test_unmerged_mode_accepts_tied_weights_and_leaves_them_alone() -> None:
    model = _tied_lm()
    weight = model.embed_tokens.weight.detach().clone()
    runtime = lorahot.inject(model, ["embed_tokens", "lm_head"], max_rank=4)
    runtime.load(make_adapter(model, {"embed_tokens": 2, "lm_head": 3}, seed=1, dtype=torch.float64)[0])
    assert torch.equal(model.embed_tokens.weight, weight) and model.lm_head.weight is model.embed_tokens.weight


def test_one_module_under_two_names_is_refused() -> None:
    """Wrapping replaces a module under one name only; the other use would run without LoRA."""
    model = tiny_lm()
    model.layers[1].self_attn.q_proj = model.layers[0].self_attn.q_proj
    with pytest.raises(
        lorahot.UsageError,
        match=r"layers\.0\.self_attn\.q_proj: this Linear is also the model's layers\.1\.self_attn\.q_proj \(one "
        r"module used under two names\)",
    ):
        lorahot.inject(model, ["q_proj"], max_rank=4)
    assert not any(isinstance(m, lorahot.LoRALayer) for m in model.modules())


def _fp16_merged(max_rank: int = 4) -> tuple[nn.Module, lorahot.LoraRuntime]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8).half(), nn.Embedding(10, 8).half())
    return model, lorahot.inject(model, ["0", "1"], max_rank=max_rank, merged=True, slots=2)


def _large(value: float) -> dict[str, torch.Tensor]:
    """A rank-4 adapter whose A and B each fit float16 but whose ``B @ A`` entries are
    ``4 * value**2`` (alpha = rank, so scale 1)."""
    full = lambda *shape: torch.full(shape, value, dtype=torch.float16)  # noqa: E731
    return {
        "base_model.model.0.lora_A.weight": full(4, 8),
        "base_model.model.0.lora_B.weight": full(8, 4),
        "base_model.model.1.lora_embedding_A": full(4, 10),
        "base_model.model.1.lora_embedding_B": full(8, 4),
    }


def _weights(model: nn.Module) -> list[torch.Tensor]:
    return [model[0].weight.detach().clone(), model[1].weight.detach().clone()]


def test_merged_weights_that_would_overflow_the_dtype_are_refused() -> None:
    """A, B and ``B @ A`` each fit float16 (``4 * 127.5**2 = 65025``), but with layer 0's base
    weights at 1000 the merged ``W0 + B @ A`` reaches 66025 > 65504: merging would write inf
    into the weights. Refused before anything is written, for load and preload."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8).half(), nn.Embedding(10, 8).half())
    with torch.no_grad():
        model[0].weight.fill_(1000.0)
    runtime = lorahot.inject(model, ["0", "1"], max_rank=4, merged=True, slots=2)
    before = _weights(model)
    for call in (lambda: runtime.load(_large(127.5)), lambda: runtime.load(_large(127.5), slot=1)):
        with pytest.raises(
            lorahot.AdapterReadError, match=r"<mapping>: merged weights would overflow the model's dtype in:\n  - 0\n"
        ):
            call()
        assert all(torch.equal(a, b) for a, b in zip(_weights(model), before))
    with pytest.raises(lorahot.AdapterReadError, match=r"merged weights would overflow"):
        runtime.load(runtime.preload(_large(127.5)))
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), before))


def test_an_update_that_overflows_alone_is_refused_in_merged_mode_too() -> None:
    """A and B fit float16 (200) but ``B @ A`` reaches 160,000: refused by the read's check of
    every mode, naming both layers, for load and preload, nothing written."""
    model, runtime = _fp16_merged()
    before = _weights(model)
    for call in (lambda: runtime.load(_large(200.0)), lambda: runtime.preload(_large(200.0))):
        with pytest.raises(
            lorahot.AdapterReadError,
            match=r"  - 0: its update scale \* B @ A reaches \|value\| 160000 > float16 max 65504 \(each factor is in "
            r"range\)\n  - 1: its update",
        ):
            call()
        assert all(torch.equal(a, b) for a, b in zip(_weights(model), before))


def test_a_user_scale_that_overflows_merged_weights_is_a_usage_error() -> None:
    model, runtime = _fp16_merged()
    runtime.load(_large(50.0))  # B @ A entries 10,000: fits float16
    loaded = _weights(model)
    assert all(bool(torch.isfinite(w).all()) for w in loaded)
    with pytest.raises(lorahot.UsageError, match=r"^scale=10: merged weights would overflow the model's dtype in:\n"):
        runtime.set_scale(10.0)
    with pytest.raises(lorahot.UsageError, match=r"^scale=10: merged weights would overflow"):
        runtime.load(_large(50.0), slot=1, scale=10.0)
    assert all(torch.equal(a, b) for a, b in zip(_weights(model), loaded))
    runtime.set_scale(0.5)  # within range: accepted
    assert all(bool(torch.isfinite(w).all()) for w in _weights(model))


def _merged_state(model: nn.Module, runtime: lorahot.LoraRuntime) -> list[torch.Tensor]:
    """The merged weights and every arena buffer, copied."""
    return _weights(model) + [t.clone() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)]


@pytest.mark.parametrize(("weights", "refused"), [((1.0, 1.0), True), ((0.5, 0.5), False)], ids=["1-1", "fits"])
def test_a_merged_stack_whose_summed_update_overflows_is_a_usage_error(
    weights: tuple[float, float], refused: bool
) -> None:
    """Each part's ``B @ A`` (40000) fits float16 merged alone; stacked at weights 1 and 1 the
    merged ``W0 + 80000`` does not: refused before anything is written, loaded read or
    preloaded. At 0.5 and 0.5 it merges, finite."""
    model, runtime = _fp16_merged(max_rank=8)
    prepared = runtime.preload(_large(100.0))
    for call in (
        lambda: runtime.load([_large(100.0), _large(100.0)], scale=list(weights)),
        lambda: runtime.load([prepared, _large(100.0)], slot=1, scale=list(weights)),
    ):
        before = _merged_state(model, runtime)
        if not refused:
            call()
            assert all(bool(torch.isfinite(w).all()) for w in _weights(model))
            continue
        with pytest.raises(
            lorahot.UsageError, match=r"^scale=\[1, 1\]: merged weights would overflow the model's dtype in:\n  - 0\n"
        ):
            call()
        assert all(torch.equal(a, b) for a, b in zip(_merged_state(model, runtime), before))


def test_reweighting_a_merged_stack_past_the_dtype_is_a_usage_error() -> None:
    """A merged stack at 0.5 and 0.5 (40000) re-weighted to 1 and 1 (80000): refused, the
    weights and buffers as before; re-weighted to 0.5 and 0.75 (50000), finite."""
    model, runtime = _fp16_merged(max_rank=8)
    runtime.load([_large(100.0), _large(100.0)], scale=[0.5, 0.5])
    before = _merged_state(model, runtime)
    with pytest.raises(lorahot.UsageError, match=r"^scale=\[1, 1\]: merged weights would overflow"):
        runtime.set_scale([1.0, 1.0])
    assert all(torch.equal(a, b) for a, b in zip(_merged_state(model, runtime), before))
    runtime.set_scale([0.5, 0.75])
    assert all(bool(torch.isfinite(w).all()) for w in _weights(model))


def test_the_range_check_is_exact_where_the_bound_is_not() -> None:
    """The cheap bound says "maybe" for 160,000 = 4 * 200**2; the exact merged maximum decides:
    alternating signs make ``B @ A`` zero, so the adapter merges fine."""
    model, runtime = _fp16_merged()
    tensors = _large(200.0)
    for key in ("base_model.model.0.lora_A.weight", "base_model.model.1.lora_embedding_A"):
        tensors[key][1::2] *= -1  # rows 1 and 3 negated: B @ A sums +v*v - v*v + v*v - v*v = 0
    runtime.load(tensors)
    assert all(bool(torch.isfinite(w).all()) for w in _weights(model))


def test_merged_mode_rewrites_weights_made_under_inference_mode_from_outside_it() -> None:
    """Weights made under ``torch.inference_mode()`` (as serving stacks load them) can be
    written in place only inside it: loads and eject outside it still rewrite every weight,
    each load matching the float64 reference, eject giving the base output back bitwise."""
    ids = token_ids((2, 6), 32, seed=1)
    with torch.inference_mode():
        model = tiny_lm()
        base = model(ids).clone()
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4, merged=True)
    names = list(runtime.layers)
    for seed, rank in ((1, 2), (2, 3)):
        tensors, ab = make_adapter(model, dict.fromkeys(names, rank), seed=seed)
        runtime.load(tensors)
        with torch.inference_mode():
            got = model(ids).double()
        want = model_reference(tiny_lm(), ids, {n: (a, b, 1.0) for n, (a, b) in ab.items()})
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    lorahot.eject(model)
    with torch.inference_mode():
        assert torch.equal(model(ids), base)


def test_a_base_checkpoint_loaded_after_inject_is_neither_thrown_away_nor_mixed() -> None:
    """Merged mode rebuilds each weight from the base copied at inject: after a checkpoint
    load the next call refuses (naming the layers) and changes nothing, and eject keeps it."""
    ids = token_ids((2, 6), 32, seed=1)
    model = tiny_lm()
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4, merged=True)
    names = list(runtime.layers)
    runtime.load(make_adapter(model, dict.fromkeys(names, 2), seed=1)[0])
    checkpoint = tiny_lm(seed=5)
    model.load_state_dict(checkpoint.state_dict())
    with torch.no_grad():
        want = checkpoint(ids)
        assert torch.equal(model(ids), want)
        for call in (lambda: runtime.load(make_adapter(model, dict.fromkeys(names, 2), seed=2)[0]), runtime.unload):
            with pytest.raises(lorahot.UsageError, match=r"weights or biases changed since lorahot last wrote"):
                call()
            assert torch.equal(model(ids), want)
        lorahot.eject(model)
        assert torch.equal(model(ids), want)


@pytest.mark.parametrize("change", ["bias only", "weight, one element", "the same values"])
def test_any_element_a_checkpoint_changes_is_noticed_and_an_identical_one_is_not(change: str) -> None:
    """Merged mode: ``load_state_dict`` is compared in full as it loads, so a checkpoint that
    changes only a bias (a BitFit fine-tune) or one element of a weight is refused at the next
    call, nothing changed, and eject keeps it; one that reloads the values lorahot wrote is not."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, merged=True)
    runtime.load(make_adapter(model, {"0": 2, "2": 2}, seed=1)[0])
    checkpoint = {k: v.clone() for k, v in model.state_dict().items()}
    if change == "bias only":
        checkpoint["0.bias"] += 1.0
    elif change == "weight, one element":
        checkpoint["2.weight"][3, 7] += 0.5
    model.load_state_dict(checkpoint)
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = model(x)
    if change == "the same values":
        runtime.set_scale(0.5)
        assert not torch.equal(model(x), want)
        return
    with pytest.raises(lorahot.UsageError, match=r"weights or biases changed since lorahot last wrote them"):
        runtime.set_scale(0.5)
    with torch.no_grad():
        assert torch.equal(model(x), want)
    lorahot.eject(model)  # the layer the checkpoint changed keeps it; the other gets its base back
    changed = "0" if change == "bias only" else "2"
    for key, value in model.state_dict().items():
        assert torch.equal(value, checkpoint[key] if key.startswith(changed) else pristine[key]), key


@pytest.mark.parametrize("edit", ["bias in place", "no edit"])
def test_a_bias_edited_in_place_is_noticed(edit: str) -> None:
    """Merged mode: a bias changed in place, not through ``load_state_dict`` (an optimizer
    stepping only the biases), is refused at the next call with nothing changed, and eject
    keeps it: the whole bias is compared (the edit used to be thrown away by that call's
    rebuild from the base copied at inject). Without the edit the call goes through (negative
    control)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, merged=True)
    runtime.load(make_adapter(model, {"0": 2, "2": 2}, seed=1)[0])
    if edit == "bias in place":
        with torch.no_grad():
            model[2].bias[5] += 0.25
    edited = model[2].bias.detach().clone()
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = model(x)
    if edit == "no edit":
        runtime.set_scale(0.5)
        with torch.no_grad():
            assert not torch.equal(model(x), want)
        return
    with pytest.raises(lorahot.UsageError, match=r"biases changed since lorahot last wrote them .*:\n  - 2\n"):
        runtime.set_scale(0.5)
    with torch.no_grad():
        assert torch.equal(model(x), want)
    lorahot.eject(model)
    assert torch.equal(model[2].bias, edited)


def _unsampled(weight: torch.Tensor) -> tuple[int, int]:
    """An element of ``weight`` that :func:`lorahot.runtime.merge.record` does not sample."""
    from lorahot.runtime import written_probes

    sampled = set(written_probes.positions(weight.numel(), torch.device("cpu")).tolist())
    flat = next(i for i in range(weight.numel()) if i not in sampled)
    return divmod(flat, weight.shape[1])


@pytest.mark.parametrize(
    "edit", ["one element in place", "through a detach() view", "two elements that cancel", "the same value", "no edit"]
)
def test_a_weight_edited_in_place_anywhere_is_noticed(edit: str) -> None:
    """Merged mode: a weight changed in place at elements no sample covers (``w[i, j] += v``
    under ``no_grad``, one through a ``detach()`` view, two elements changed by
    opposite amounts) is refused at the next call with nothing changed, and eject keeps the
    edit: the edit moved the weight's version counter, so its digest is compared in full. The
    same value written back moves the counter too, and the call goes through, as it does
    without an edit (negative controls)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, merged=True)
    runtime.load(make_adapter(model, {"0": 2, "2": 2}, seed=1)[0])
    weight = model[2].weight
    i, j = _unsampled(weight)
    with torch.no_grad():
        if edit == "one element in place":
            weight[i, j] += 0.25
        elif edit == "through a detach() view":
            weight.detach()[i, j].add_(0.25)
        elif edit == "two elements that cancel":
            weight[i, j] += 0.25
            weight[(i + 1) % 16, (j + 3) % 16] -= 0.25
        elif edit == "the same value":
            weight[i, j] = weight[i, j].clone()
    edited = weight.detach().clone()
    x = torch.randn(3, 16)
    with torch.no_grad():
        want = model(x)
    if edit in ("the same value", "no edit"):
        runtime.set_scale(0.5)
        with torch.no_grad():
            assert not torch.equal(model(x), want)
        return
    with pytest.raises(
        lorahot.UsageError, match=r"weights or biases changed since lorahot last wrote them .*:\n  - 2\n"
    ):
        runtime.set_scale(0.5)
    with torch.no_grad():
        assert torch.equal(model(x), want)
    lorahot.eject(model)
    assert torch.equal(model[2].weight, edited)


def test_a_weight_edited_through_data_is_noticed_where_sampled_only() -> None:
    """An edit through ``weight.data`` moves no version counter: it is noticed where it changes
    a sampled element (the first), and not elsewhere, the documented limit."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, merged=True)
    runtime.load(make_adapter(model, {"0": 2, "2": 2}, seed=1)[0])
    i, j = _unsampled(model[2].weight)
    model[2].weight.data[i, j] += 0.25
    runtime.set_scale(0.5)  # not noticed: the call rewrites the weight from the base copied at inject
    model[2].weight.data[0, 0] += 0.25
    with pytest.raises(lorahot.UsageError, match=r"weights or biases changed since lorahot last wrote them"):
        runtime.set_scale(0.25)


@pytest.mark.parametrize("slots", [1, 2])
def test_a_lora_bias_after_a_bias_diff_is_folded_not_reset(slots: int) -> None:
    """Merged mode: a full diff with ``diff_b``, then a LoRA with ``lora_B.bias`` (in the same
    slot, or in another one activated): the bias is ``b0 + c``, nothing of the diff left (the
    bias the diff had rewritten was put back to ``b0`` after the LoRA bias was folded)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3)).double()
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    gen = torch.Generator().manual_seed(1)
    diff = {"lora_unet_0.diff": torch.randn(3, 4, generator=gen), "lora_unet_0.diff_b": torch.randn(3, generator=gen)}
    a, b, c = torch.randn(2, 4, generator=gen), torch.randn(3, 2, generator=gen), torch.randn(3, generator=gen)
    lora = {
        "base_model.model.0.lora_A.weight": a,
        "base_model.model.0.lora_B.weight": b,
        "base_model.model.0.lora_B.bias": c,
    }
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True, slots=slots)
    runtime.load(diff)
    runtime.load(lora, slot=slots - 1)
    if slots == 2:
        runtime.activate(1)
    with torch.no_grad():
        torch.testing.assert_close(model[0].weight, w0 + b.double() @ a.double())
        torch.testing.assert_close(model[0].bias, b0 + c.double())
        runtime.activate(0)
        if slots == 2:  # the diff again, bias and all
            torch.testing.assert_close(model[0].weight, w0 + diff["lora_unet_0.diff"].double())
            torch.testing.assert_close(model[0].bias, b0 + diff["lora_unet_0.diff_b"].double())
        runtime.unload()
        torch.testing.assert_close(model[0].weight, w0)
        torch.testing.assert_close(model[0].bias, b0)


def _fp16_linear(scale_weight: float = 1.0) -> nn.Sequential:
    torch.manual_seed(0)
    layer = nn.Linear(16, 16)
    with torch.no_grad():
        layer.weight.mul_(scale_weight)
    return nn.Sequential(layer).half()


def _peft(a: torch.Tensor, b: torch.Tensor, **extra: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"base_model.model.0.lora_A.weight": a, "base_model.model.0.lora_B.weight": b}
    return out | {f"base_model.model.0.{k}": v for k, v in extra.items()}


def test_float16_stacks_and_dora_merge_in_float32_where_a_factor_alone_leaves_the_range() -> None:
    """Merged float16: a stack part's weight of 1e5 (its scaled A is past float16's range, its
    product is 200) and a DoRA factor m / |W| of about 3e5 (the merged weight at most |m|) both
    give finite merged weights, equal to the float64 formula to float16's rounding."""
    model = _fp16_linear()
    runtime = lorahot.inject(model, ["0"], max_rank=8, merged=True)
    w0 = runtime.layers["0"].pristine_weight.double()
    big = _peft(torch.ones(2, 16, dtype=torch.float16), torch.full((16, 2), 1e-3, dtype=torch.float16))
    small = _peft(torch.full((2, 16), 0.5, dtype=torch.float16), torch.full((16, 2), 0.5, dtype=torch.float16))
    runtime.load([big, small], scale=[1e5, 1.0])
    want = w0 + sum(
        w * (t["base_model.model.0.lora_B.weight"].double() @ t["base_model.model.0.lora_A.weight"].double())
        for t, w in ((big, 1e5), (small, 1.0))
    )
    torch.testing.assert_close(model[0].weight.double(), want, rtol=2e-3, atol=2e-3)

    model = _fp16_linear(0.2)
    runtime = lorahot.inject(model, ["0"], max_rank=8, merged=True)
    w0 = runtime.layers["0"].pristine_weight.double()
    g = torch.Generator().manual_seed(1)
    a, b = (torch.randn(2, 16, generator=g) * 0.1).half(), (torch.randn(16, 2, generator=g) * 0.1).half()
    m = torch.full((16,), 30000.0, dtype=torch.float16)
    runtime.load(_peft(a, b, lora_magnitude_vector=m), config={"use_dora": True, "lora_alpha": 2})
    wd = w0 + b.double() @ a.double()
    want = m.double()[:, None] * wd / wd.norm(dim=1, keepdim=True)
    assert float((m.double() / wd.norm(dim=1)).max()) > 65504  # the factor alone leaves float16's range
    torch.testing.assert_close(model[0].weight.double(), want, rtol=2e-3, atol=1.0)


@pytest.mark.parametrize("case", ["lora bias", "lora bias and diff_b", "rounded factors", "dora magnitude"])
def test_float16_merges_that_would_overflow_are_refused_with_nothing_changed(case: str) -> None:
    """A LoRA bias folded past float16's range (``b0 + 100 * 1000``), a LoRA bias and a stacked
    diff_b that fit alone but not summed (``b0 + 40000 + 40000``: the bias was written inf), a
    product that fits with the file's float32 factors (65499.97) but not with the float16 ones
    the buffers hold (65535.9), and a DoRA magnitude of 1e6 (each output channel rescaled to
    that norm): refused, the model as it was."""
    model = _fp16_linear()
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if case == "lora bias":
        g = torch.Generator().manual_seed(1)
        a, b = (torch.randn(2, 16, generator=g) * 0.1).half(), (torch.randn(16, 2, generator=g) * 0.1).half()
        adapter = _peft(a, b, **{"lora_B.bias": torch.full((16,), 1000.0, dtype=torch.float16)})
        call = lambda: runtime.load(adapter, config={"lora_bias": True, "lora_alpha": 2}, scale=100.0)  # noqa: E731
    elif case == "lora bias and diff_b":
        lora = _peft(torch.zeros(2, 16), torch.zeros(16, 2), **{"lora_B.bias": torch.full((16,), 40000.0)})
        diff = {"lora_unet_0.diff": torch.zeros(16, 16), "lora_unet_0.diff_b": torch.full((16,), 40000.0)}
        call = lambda: runtime.load([lora, diff])  # noqa: E731
    elif case == "dora magnitude":
        g = torch.Generator().manual_seed(1)
        a, b = torch.randn(2, 16, generator=g) * 0.1, torch.randn(16, 2, generator=g) * 0.1
        adapter = _peft(a, b, lora_magnitude_vector=torch.full((16,), 1e6))
        call = lambda: runtime.load(adapter, config={"use_dora": True, "lora_alpha": 2})  # noqa: E731
    else:
        with torch.no_grad():
            model[0].weight.zero_()
        runtime = lorahot.inject(lorahot.eject(model), ["0"], max_rank=4, merged=True)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        a, b = torch.zeros(1, 16), torch.zeros(16, 1)
        a[0, 0], b[0, 0] = 1.0006, 65460.7  # float16 rounds them to 1.000977 and 65472
        call = lambda: runtime.load(_peft(a, b))  # noqa: E731
    with pytest.raises(lorahot.LoraError, match="merged weights would overflow the model's dtype"):
        call()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("move", ["half", "bfloat16", "meta"])
@pytest.mark.parametrize("eject", ["runtime", "module"])
def test_a_merged_model_moved_after_inject_is_refused_and_ejects_to_its_base(move: str, eject: str) -> None:
    """``model.half()`` (or another dtype, or the meta device) after a merged load: runtime
    calls refuse with the move's UsageError, not a crash of the base check, and eject puts the
    base weights back, converted as the move converted the rest (an independent audit found
    every call, eject included, raising UnexpectedError, and a failed eject marking the runtime
    ejected with its layers still in place)."""
    _, merged, _, rt = _pair()
    base = copy.deepcopy(merged)
    rt.load(make_adapter(merged, dict.fromkeys(rt.layers, 4), seed=1, dtype=torch.float64)[0])
    to = {"half": torch.float16, "bfloat16": torch.bfloat16, "meta": torch.device("meta")}[move]
    merged.to(to)
    base.to(to)
    with pytest.raises(lorahot.UsageError, match="LoRA buffers were replaced"):
        rt.load(make_adapter(merged, dict.fromkeys(rt.layers, 2), seed=2, dtype=torch.float64)[0])
    rt.eject() if eject == "runtime" else lorahot.eject(merged)
    assert not any(isinstance(m, lorahot.LoRALayer) for m in merged.modules())
    if move != "meta":  # every weight is the base model's again, in the new dtype, bitwise
        for (name, got), want in zip(merged.state_dict().items(), base.state_dict().values()):
            assert torch.equal(got, want), name


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_a_model_moved_to_meta_after_inject_materializes_with_to_empty_and_ejects_to_its_checkpoint(
    merge: bool,
) -> None:
    """``model.to("meta")`` then ``model.to_empty(device="cpu")`` after a load (the way a model is
    materialized before its checkpoint is loaded): in merged mode to_empty raised
    NotImplementedError ('Cannot copy out of meta tensor') from the LoRA layer's move, which
    carried the sums merged mode notes of the weight off the meta device, leaving the model
    half moved (the base layers before it on the CPU, the rest on meta) and every later eject
    failing the same way. Now it moves whole, and after the base checkpoint is loaded, eject
    gives the base model back bitwise; the runtime refuses its calls meanwhile."""
    plain, merged, runtime, merged_runtime = _pair()
    model, rt = (merged, merged_runtime) if merge else (plain, runtime)
    base = copy.deepcopy(model)  # the checkpoint: the base model as it was at inject
    rt.load(make_adapter(model, dict.fromkeys(rt.layers, 4), seed=1, dtype=torch.float64)[0])
    model.to("meta")
    model.to_empty(device="cpu")
    assert all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    model.load_state_dict(base.state_dict())
    with pytest.raises(lorahot.UsageError, match="LoRA buffers were replaced"):
        rt.unload()
    rt.eject()
    assert not any(isinstance(m, lorahot.LoRALayer) for m in model.modules())
    for (name, got), want in zip(model.state_dict().items(), base.state_dict().values(), strict=True):
        assert torch.equal(got, want), name
    ids = torch.randint(0, 32, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids), base(ids))


@pytest.mark.parametrize(
    "moves", [(torch.float32, torch.float64), (torch.float16, torch.float32), (torch.bfloat16, torch.float16)]
)
def test_eject_after_a_lossy_round_trip_of_dtypes_restores_the_base_as_the_moves_left_it(
    moves: tuple[torch.dtype, ...],
) -> None:
    """float64 -> float16 -> float32 after a merged load: the merged weights were rounded by the
    first move, which the elements merged mode reads back took for a base checkpoint loaded since,
    so eject kept the adapter merged, silently (an independent audit: the output off the base by
    41). The pristine weights and those elements now follow every move of the model."""
    _, merged, _, rt = _pair()
    base = copy.deepcopy(merged)
    rt.load(make_adapter(merged, dict.fromkeys(rt.layers, 4), seed=1, dtype=torch.float64)[0])
    for dtype in moves:
        merged.to(dtype)
        base.to(dtype)
    rt.eject()
    for (name, got), want in zip(merged.state_dict().items(), base.state_dict().values()):
        assert torch.equal(got, want), name


def test_a_layer_with_no_outputs_merges_like_it_runs_unmerged() -> None:
    """``Linear(8, 0)`` (an empty projection) takes an adapter in merged mode as unmerged: the
    load writes nothing to it and the output stays empty. It used to fail mid-write, after
    every check had passed, reshaping its empty weight (found by an independent audit)."""
    model = nn.Sequential(nn.Linear(8, 6), nn.Linear(6, 0)).double()
    tensors = make_adapter(model, {"0": 2, "1": 2}, seed=1, dtype=torch.float64)[0]
    unmerged = copy.deepcopy(model)
    lorahot.inject(unmerged, ["0", "1"], max_rank=2).load(tensors)
    runtime = lorahot.inject(model, ["0", "1"], max_rank=2, merged=True)
    runtime.load(tensors)
    runtime.set_scale(0.5)
    runtime.unload()
    runtime.load(tensors)
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        assert model(x).shape == (3, 0)
        torch.testing.assert_close(model[0](x), unmerged[0](x), rtol=1e-12, atol=1e-12)


def test_a_weight_of_more_than_2_24_elements_merges_and_ejects() -> None:
    """A merged weight of ``2**24 + 4`` elements (Flux.1's 3072 x 12288 feed-forward has 37.7 M):
    the few elements merged mode reads back to notice a base checkpoint were placed in float32,
    which rounds the last position up to one past the end; the inject failed (an index out of
    bounds; a device-side assert on CUDA), found by the diffusion benchmark on a Flux.1-sized
    transformer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2**22 + 1, 4, bias=False))  # 2**24 + 4 elements
    base = model[0].weight.detach().clone()
    runtime = lorahot.inject(model, ["0"], max_rank=1, merged=True)
    a, b = torch.randn(1, 2**22 + 1), torch.randn(4, 1)
    runtime.load({"0.lora_A.weight": a, "0.lora_B.weight": b})
    x = torch.randn(2, 2**22 + 1)
    want = x.double() @ (base.double() + b.double() @ a.double()).T
    got = model(x).double()
    assert ((got - want).norm() / want.norm()) < 1e-3  # float32 sums of 4 M products; the adapter moves it by ~1
    runtime.eject()
    assert torch.equal(model[0].weight, base)


def test_an_inference_weight_edited_in_place_anywhere_is_noticed() -> None:
    """Weights made under ``torch.inference_mode()`` have no version counter: their digest is
    compared at every call, so an edit at an element no sample covers is refused, and without
    one the call goes through."""
    torch.manual_seed(0)
    with torch.inference_mode():
        model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, merged=True)
    runtime.load(make_adapter(model, {"0": 2, "2": 2}, seed=1)[0])
    runtime.set_scale(0.5)
    i, j = _unsampled(model[2].weight)
    with torch.inference_mode():
        model[2].weight[i, j] += 0.25
    with pytest.raises(lorahot.UsageError, match=r"weights or biases changed since lorahot last wrote them"):
        runtime.set_scale(0.25)


@pytest.mark.parametrize("move", ["to its own device", "to its own dtype"])
def test_an_edit_after_a_move_that_changes_no_byte_is_still_noticed(move: str) -> None:
    """``model.to(device)`` again (a pipeline moved to where it is) or ``float()`` on a float32
    model converts no byte: the version and sums still apply, so an edit at an unsampled
    element after it is refused (before, any move fell back to the samples)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, merged=True)
    runtime.load(make_adapter(model, {"0": 2, "2": 2}, seed=1)[0])
    model.to("cpu") if move == "to its own device" else model.float()
    i, j = _unsampled(model[2].weight)
    with torch.no_grad():
        model[2].weight[i, j] += 0.25
    with pytest.raises(lorahot.UsageError, match=r"weights or biases changed since lorahot last wrote them"):
        runtime.set_scale(0.5)


def test_a_merged_conv_moved_to_channels_last_keeps_merging() -> None:
    """A conv weight moved to ``channels_last`` after inject has no flat view: each swap
    computes the merged weight flat and writes it in the weight's own layout. Through swaps and
    scales the model equals a float64 reference, and eject gives the base weights back bitwise."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)).double()
    base = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1)).double()
    base.load_state_dict(model.state_dict())
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    model.to(memory_format=torch.channels_last)
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    for seed, scale in ((1, 1.0), (2, 0.5)):
        tensors, ab = make_adapter(base, {"0": 4}, seed=seed, dtype=torch.float64)
        runtime.load(tensors, scale=scale)
        a, b = ab["0"]
        delta = (b.flatten(1) @ a.flatten(1)).view_as(base[0].weight) * scale
        with torch.no_grad():
            want = nn.functional.conv2d(x, base[0].weight + delta, base[0].bias, padding=1)
            torch.testing.assert_close(model(x), want, rtol=1e-10, atol=1e-10)
    assert model[0].base_layer.weight.is_contiguous(memory_format=torch.channels_last)
    lorahot.eject(model)  # its weight in channels_last, its values the base's (a conv over another layout rounds apart)
    assert torch.equal(model[0].weight, base[0].weight) and torch.equal(model[0].bias, base[0].bias)


# -- dense layouts other than contiguous -----------------------------------------------------------


def _laid_out(layout: str, dtype: torch.dtype = torch.float64) -> nn.Sequential:
    """One target (``0``) whose weight is dense but not contiguous: a conv in ``channels_last``
    (``channels_last_3d``), a Linear whose weight is stored transposed; ``contiguous`` for
    comparison."""
    torch.manual_seed(0)
    if layout == "conv3d channels_last_3d":
        return nn.Sequential(nn.Conv3d(3, 4, 2, dtype=dtype)).to(memory_format=torch.channels_last_3d)
    if layout == "linear transposed":
        model = nn.Sequential(nn.Linear(6, 5, dtype=dtype))
        model[0].weight = nn.Parameter(model[0].weight.detach().t().contiguous().t())
        return model
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=1, dtype=dtype))
    return model.to(memory_format=torch.channels_last) if layout == "conv2d channels_last" else model


def _input(model: nn.Module, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A batch for :func:`_laid_out`'s model, in the layout of its weight."""
    torch.manual_seed(1)
    weight = model[0].weight
    if weight.dim() == 2:
        return torch.randn(3, weight.shape[1], dtype=dtype)
    x = torch.randn(2, weight.shape[1], *([5] * (weight.dim() - 2)), dtype=dtype)
    fmt = torch.channels_last if weight.dim() == 4 else torch.channels_last_3d
    return x.to(memory_format=fmt) if weight.is_contiguous(memory_format=fmt) and not weight.is_contiguous() else x


def _dense_reference(model: nn.Module, weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The base module's computation with ``weight`` in its place, in float64."""
    base = model[0].base_layer if isinstance(model[0], lorahot.LoRALayer) else model[0]
    bias = base.bias.detach().double()
    if weight.dim() == 2:
        return F.linear(x.double(), weight.double(), bias)
    conv = F.conv2d if weight.dim() == 4 else F.conv3d
    return conv(x.double(), weight.double(), bias, padding=base.padding)


def _bits(model: nn.Module) -> dict[str, tuple[torch.Tensor, tuple[int, ...]]]:
    """Every parameter and buffer's bytes (in its logical order) and strides."""
    return {
        k: (v.detach().contiguous().reshape(-1).view(torch.uint8), v.stride())
        for k, v in model.state_dict(keep_vars=True).items()
    }


def _same_bits(
    a: dict[str, tuple[torch.Tensor, tuple[int, ...]]], b: dict[str, tuple[torch.Tensor, tuple[int, ...]]]
) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k][0], b[k][0]) and a[k][1] == b[k][1] for k in a)


_LAYOUTS = ["conv2d channels_last", "conv3d channels_last_3d", "linear transposed", "contiguous"]


@pytest.mark.parametrize("layout", _LAYOUTS)
def test_merged_mode_writes_a_dense_weight_of_any_layout_in_place(layout: str) -> None:
    """A weight dense in memory in another order than contiguous (a UNet or VAE moved to
    channels_last before inject, as diffusers' users do; channels_last_3d; a transposed Linear
    weight) was refused at inject ('needs it contiguous'). Merged mode now writes W0 + s dW into
    it in place in its own layout: its address and strides never change, the model gives the
    float64 reference and PEFT's merged weight, a swap back to an adapter gives the weight of
    its first merge bitwise however many swaps ran in between, and eject gives W0 back bitwise,
    in its layout."""
    peft = pytest.importorskip("peft")
    model = _laid_out(layout)
    w0 = model[0].weight.detach().clone()
    address, strides = model[0].weight.data_ptr(), model[0].weight.stride()
    oracle = copy.deepcopy(model)
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    x = _input(model)
    first, ab = make_adapter(oracle, {"0": 4}, seed=1, dtype=torch.float64)
    second, _ = make_adapter(oracle, {"0": 2}, seed=2, dtype=torch.float64)
    runtime.load(first, scale=0.7)
    merged = model[0].base_layer.weight.detach().clone()
    a, b = ab["0"]
    delta = (b.flatten(1) @ a.flatten(1)).view_as(w0)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _dense_reference(model, w0 + 0.7 * delta, x), rtol=1e-12, atol=1e-12)
    peft_model = peft.inject_adapter_in_model(peft.LoraConfig(r=4, lora_alpha=4 * 0.7, target_modules=["0"]), oracle)
    peft.set_peft_model_state_dict(peft_model, {k.removeprefix("base_model.model."): v for k, v in first.items()})
    peft_model[0].merge()
    torch.testing.assert_close(merged, peft_model[0].base_layer.weight.detach(), rtol=1e-13, atol=1e-13)
    for scale in (0.3, -1.5, 2.0):
        runtime.load(second, scale=scale)
        runtime.set_scale(scale / 2)
    runtime.load(first, scale=0.7)
    weight = model[0].base_layer.weight
    assert torch.equal(weight, merged) and weight.data_ptr() == address and weight.stride() == strides
    lorahot.eject(model)
    assert torch.equal(model[0].weight, w0) and model[0].weight.stride() == strides


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_merged_channels_last_weight_holds_the_bits_of_the_contiguous_one(dtype: torch.dtype) -> None:
    """In half precision the layout changes no bit of the merged weight: channels_last and
    contiguous copies of one conv, merged with one adapter through swaps and scales, hold the
    same values bitwise (rounded once, as the contiguous weight is)."""
    contiguous = _laid_out("contiguous", dtype)
    channels_last = copy.deepcopy(contiguous).to(memory_format=torch.channels_last)
    runtimes = [lorahot.inject(m, ["0"], max_rank=4, merged=True) for m in (contiguous, channels_last)]
    tensors, _ = make_adapter(contiguous, {"0": 4}, seed=3, dtype=dtype)
    for scale in (1.0, 0.37, -2.5):
        for runtime in runtimes:
            runtime.load(tensors, scale=scale)
        weights = [m[0].base_layer.weight for m in (contiguous, channels_last)]
        assert torch.equal(weights[0].view(torch.int16), weights[1].view(torch.int16)), scale
    assert channels_last[0].base_layer.weight.is_contiguous(memory_format=torch.channels_last)


def test_a_refused_merge_of_a_channels_last_weight_changes_nothing() -> None:
    """The overflow check and the check of the weights since the last write hold for a
    channels_last weight: a float16 merge that would overflow is refused, and so is a call
    after an in-place edit of the merged weight; every parameter and buffer keeps its bytes and
    strides."""
    model = _laid_out("conv2d channels_last", torch.float16)
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    tensors, _ = make_adapter(model, {"0": 4}, seed=4, dtype=torch.float16)
    runtime.load(tensors)
    before = _bits(model)
    other, ab = make_adapter(model, {"0": 4}, seed=5, dtype=torch.float16)
    a, b = (t.flatten(1).float() for t in ab["0"])
    over = 2 * 65504 / float((b @ a).abs().max())  # a scale whose merged weight leaves float16's range
    with pytest.raises(lorahot.UsageError, match=r"merged weights would overflow the model's dtype in:\n  - 0"):
        runtime.load(other, scale=over)
    with pytest.raises(lorahot.UsageError, match=r"merged weights would overflow the model's dtype in:\n  - 0"):
        runtime.set_scale(over)
    assert _same_bits(before, _bits(model))
    with torch.no_grad():
        model[0].base_layer.weight[5, 3, 2, 1] += 1  # an element lorahot did not write
    edited = _bits(model)
    with pytest.raises(lorahot.UsageError, match=r"changed since lorahot last wrote them"):
        runtime.set_scale(0.5)
    assert _same_bits(edited, _bits(model))


@pytest.mark.parametrize("layout", _LAYOUTS[:3])
def test_a_compiled_model_merged_in_another_layout_swaps_without_recompiling(layout: str) -> None:
    """Merged swaps write the weight in its own layout, so a compiled model's graph (which
    guards on the weight's strides) serves every swap without a recompile; the negative control,
    the model moved to the contiguous format, recompiles."""
    model = _laid_out(layout)
    w0 = model[0].weight.detach().clone()
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    x = _input(model)
    tensors, ab = make_adapter(model, {"0": 4}, seed=5, dtype=torch.float64)
    a, b = ab["0"]
    delta = (b.flatten(1) @ a.flatten(1)).view_as(w0)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for scale in (0.5, -1.0):
                runtime.load(tensors, scale=scale)
                want = _dense_reference(model, w0 + scale * delta, x)
                torch.testing.assert_close(compiled(x), want, rtol=1e-12, atol=1e-12)
        assert counter.frame_count == 1
        if layout != "linear transposed":  # (.to(memory_format=) leaves 2-D weights as they are)
            model.to(memory_format=torch.contiguous_format)
        else:
            model[0].base_layer.weight.data = model[0].base_layer.weight.detach().contiguous()
        with torch._dynamo.config.patch(error_on_recompile=True), pytest.raises(torch._dynamo.exc.RecompileError):
            compiled(x)


class _WholeCopies(TorchDispatchMode):
    """Counts the copies of ``numel`` elements or more (clones and ``copy_``) run under it."""

    def __init__(self, numel: int) -> None:
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in (torch.ops.aten.clone.default, torch.ops.aten.copy_.default) and out.numel() >= self.numel:
            self.count += 1
        return out


def test_a_merged_swap_of_a_channels_last_weight_copies_it_twice_at_most() -> None:
    """A weight with no flat view (channels_last) was copied whole six times per swap, most of
    the swap (4.6x a contiguous weight's on a CPU): flat, only to find it was not a view; its
    pristine copy, kept in its layout, read flat; the sampled elements of the record and of the
    check, each from a whole flat copy; the merged weight into it, and the record's digest. The
    pristine copy is now kept contiguous, the weight's view is tried without a copy and the
    samples are gathered alone (torch.take): the write and the digest remain."""
    model = _laid_out("conv2d channels_last")
    runtime = lorahot.inject(model, ["0"], max_rank=4, merged=True)
    tensors, _ = make_adapter(model, {"0": 4}, seed=7, dtype=torch.float64)
    runtime.load(tensors)
    with _WholeCopies(model[0].base_layer.weight.numel()) as copies:
        runtime.set_scale(0.5)
    assert copies.count <= 2, copies.count
    assert model[0].base_layer.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize(
    ("make", "strides"),
    [
        (lambda: nn.Parameter(torch.randn(5, 12)[:, ::2]), r"\(12, 2\)"),
        (lambda: nn.Parameter(torch.randn(1, 6).expand(5, 6)), r"\(0, 1\)"),
    ],
    ids=["strided slice", "overlapping"],
)
def test_merged_mode_refuses_a_weight_that_is_not_dense(make: Any, strides: str) -> None:
    """Only a weight whose elements are not dense in memory, each once, is refused: a strided
    slice of a larger tensor, an expanded (overlapping) one; typed, naming the strides and the
    fix, the model as it was."""
    model = _linear_with(make())
    holder = nn.Sequential(model)
    with pytest.raises(
        lorahot.UsageError,
        match=rf"^0: merged mode rewrites the weight in place and needs its elements dense in memory, each once .*"
        rf"its strides are {strides} for shape \(5, 6\).*Give the module a weight of its own",
    ):
        lorahot.inject(holder, ["0"], max_rank=2, merged=True)
    assert holder[0] is model


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_a_model_moved_to_channels_last_after_inject_computes_the_reference(
    merged: bool, dora: bool, compiled: bool
) -> None:
    """``model.to(memory_format=torch.channels_last)`` after inject replaces each conv weight's
    ``.data`` (the parameter stays): merged mode writes the parameter it holds, so the swap
    reaches the new memory, its record compares values, not layouts, and its pristine copy is
    converted as the weights are; unmerged, LoRAConv, DoRA's weight norm and the factors
    computed before the move read values the move did not change. With channels_last input,
    before and after a set_scale, the model gives the float64 reference (PEFT's DoRA formula),
    and eject gives W0 back bitwise, channels_last."""
    model = _laid_out("contiguous")
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    runtime = lorahot.inject(model, ["0"], max_rank=2, merged=merged, extras=dora)
    tensors, ab = make_adapter(model, {"0": 2}, seed=6, dtype=torch.float64)
    magnitude = torch.rand(6, dtype=torch.float64) + 0.5
    if dora:
        tensors["base_model.model.0.lora_magnitude_vector"] = magnitude
    runtime.load(tensors, scale=0.5)
    run = torch.compile(model, backend="aot_eager") if compiled else model
    x = _input(model)
    run(x)
    model.to(memory_format=torch.channels_last)
    x = x.to(memory_format=torch.channels_last)
    a, b = ab["0"]
    delta = (b.flatten(1) @ a.flatten(1)).view_as(w0)
    for scale in (0.5, 0.7):
        if scale != 0.5:
            runtime.set_scale(scale)
        weight = w0 + scale * delta
        want = F.conv2d(x, weight, None, padding=1)
        if dora:  # PEFT: m / ||W0 + s B A|| per output channel, times the whole output but the bias
            want = want * (magnitude / weight.flatten(1).norm(dim=1)).view(1, -1, 1, 1)
        with torch.no_grad():
            torch.testing.assert_close(run(x), want + b0.view(1, -1, 1, 1), rtol=1e-12, atol=1e-12)
    assert model[0].base_layer.weight.is_contiguous(memory_format=torch.channels_last)
    lorahot.eject(model)
    assert torch.equal(model[0].weight, w0) and model[0].weight.is_contiguous(memory_format=torch.channels_last)


def test_merged_inject_into_a_model_with_a_sparse_buffer() -> None:
    """The tied-weight check reads every tensor's storage; a sparse buffer has none (torch's
    NotImplementedError, reported as an UnexpectedError): it cannot share a dense weight's
    memory, so it is passed over, and the merged runtime serves."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))
    model.register_buffer("mask", torch.eye(4).to_sparse())
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, merged=True)
    tensors, ab = make_adapter(model, {"0": 2, "2": 2}, seed=1)
    runtime.load(tensors)
    a, b = ab["0"]
    torch.testing.assert_close(model[0].weight, model[0].pristine_weight + b @ a)


def test_a_preload_does_not_read_the_merged_weights(tmp_path: Path) -> None:
    """preload may run on any thread while the serving thread loads; in merged mode it checked
    the targeted weights against lorahot's record, which a load on the serving thread updates only
    after rewriting them, so a preload during a load was refused (924 of 1,610 in a race). A
    preload writes no weight: it reads the file and packs it; the load that follows checks them.
    Here a weight changed behind lorahot stands in for a rewrite in progress."""
    from safetensors.torch import save_file

    model = tiny_lm(0, dim=32, hidden=48)
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=8, merged=True)
    path = tmp_path / "a.safetensors"
    save_file(make_adapter(model, dict.fromkeys(runtime.layers, 4), seed=1)[0], str(path))
    runtime.load(str(path))
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.base_layer.weight[0, 0] += 1.0
    assert runtime.preload(str(path), key="again") is not None
    with pytest.raises(lorahot.UsageError, match="changed since lorahot last wrote them"):
        runtime.load("again")


def test_a_base_layer_converted_alone_after_inject_is_refused_before_any_write() -> None:
    """Merged mode: one targeted base layer converted after inject (``base_layer.half()``;
    ``model.half()`` converts lorahot's copies too) is refused by the next call, naming the
    layer and both dtypes, with every weight as it was. Before, the rewrite failed at that layer
    after rewriting the ones before it, and reported the slot emptied."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(16, 16, dtype=torch.bfloat16) for _ in range(3)])
    runtime = lorahot.inject(model, ["0", "1", "2"], max_rank=4, merged=True)
    runtime.load(make_adapter(model, {"0": 2, "1": 2, "2": 2}, seed=1, dtype=torch.bfloat16)[0])
    model[1].base_layer.half()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        lorahot.UsageError,
        match=r"converted or moved after inject:\n  - 1: \(16, 16\) torch.float16 on cpu, where its base weight was "
        r"copied at inject as \(16, 16\) torch.bfloat16 on cpu\n.*eject, convert, and inject again",
    ):
        runtime.load(make_adapter(model, {"0": 2, "1": 2, "2": 2}, seed=2, dtype=torch.bfloat16)[0])
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
    with pytest.raises(lorahot.UsageError, match="converted or moved after inject"):
        runtime.set_scale(0.5)


# -- half precision: a stack of LoRA and weight-kind parts rounds once ----------------------------

#: part kinds of the drawn stacks: LoRAs (PEFT's with a LoRA bias, kohya's with an alpha) and the
#: weight kinds merged mode folds beside them (a diff with its diff_b)
_PART_KINDS = ("peft-lora-bias", "kohya-lora", "loha", "lokr", "diff")
_RANK = 2


def _half_layer(kind: str, dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    layer = {
        "linear": lambda: nn.Linear(12, 16),
        "conv1d": lambda: Conv1D(16, 12),
        "conv2d": lambda: nn.Conv2d(3, 16, 3),
    }
    return nn.Sequential(layer[kind]()).to(dtype)


def _drawn_part(kind: str, shape: tuple[int, ...], seed: int) -> tuple[dict[str, torch.Tensor], Any]:
    """A part of ``kind`` for a layer whose torch-layout weight has ``shape`` ``[out, in, *kernel]``:
    its file and ``(dtype) -> (ΔW, bias delta)``, the float64 reference at part weight 1 from the
    factors as lorahot holds them (A and B rounded to the model's dtype, a LoRA bias to float32,
    LyCORIS factors and diffs as read)."""
    g = torch.Generator().manual_seed(seed)
    out, rest = shape[0], shape[1:]

    def r(*s: int) -> torch.Tensor:
        return torch.randn(*s, generator=g, dtype=torch.float64) * 0.5

    if kind in ("peft-lora-bias", "kohya-lora"):
        a, b = r(_RANK, *rest), r(out, _RANK, *[1] * (len(shape) - 2))
        if kind == "kohya-lora":
            file = {
                "lora_unet_0.lora_down.weight": a,
                "lora_unet_0.lora_up.weight": b,
                "lora_unet_0.alpha": torch.tensor(3.0),
            }
            scale, c = 3.0 / _RANK, None
        else:
            c = r(out)
            file = {"base_model.model.0.lora_A.weight": a, "base_model.model.0.lora_B.weight": b}
            file["base_model.model.0.lora_B.bias"] = c
            scale = 1.0

        def lora(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
            a2, b2 = (t.to(dtype).double().reshape(t.shape[0], -1) for t in (a, b))
            bias = None if c is None else c.float().double()
            return scale * (b2 @ a2).reshape(shape), None if bias is None else scale * bias

        return file, lora
    flat = math.prod(rest)
    if kind == "loha":
        f = {"hada_w1_a": r(out, 2), "hada_w1_b": r(2, flat), "hada_w2_a": r(out, 2), "hada_w2_b": r(2, flat)}
        delta = (f["hada_w1_a"] @ f["hada_w1_b"]) * (f["hada_w2_a"] @ f["hada_w2_b"]) * (1.0 / 2)
        f["alpha"], db = torch.tensor(1.0), None
    elif kind == "lokr":
        f = {"lokr_w1": r(4, 1), "lokr_w2": r(out // 4, flat)}
        delta, db = torch.kron(f["lokr_w1"], f["lokr_w2"]), None
    else:
        f = {"diff": r(*shape), "diff_b": r(out)}
        delta, db = f["diff"], f["diff_b"]
    return {f"lora_unet_0.{k}": v for k, v in f.items()}, lambda dtype: (delta.reshape(shape), db)


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    dtype=st.sampled_from([torch.float16, torch.bfloat16]),
    layer=st.sampled_from(["linear", "conv1d", "conv2d"]),
    kinds=st.lists(st.sampled_from(_PART_KINDS), min_size=1, max_size=3),  # LoRA biases of several parts add up
    scales=st.lists(
        st.lists(st.floats(-2, 2, allow_nan=False, width=16), min_size=3, max_size=3), min_size=2, max_size=2
    ),
    seed=st.integers(0, 1000),
)
def test_half_precision_stacks_of_lora_and_weight_kinds_are_rounded_once(
    dtype: torch.dtype, layer: str, kinds: list[str], scales: list[list[float]], seed: int
) -> None:
    """A merged float16 or bfloat16 layer (Linear, Conv1D, Conv2d) holding a stack of LoRAs and
    LoHa/LoKr/diff parts: its weight is ``W0 + sum_p w_p (s_p B_p A_p or ΔW_p)`` and its bias
    ``b0 + sum_p w_p (s_p c_p or diff_b_p)``, computed in float64 from what lorahot holds and
    rounded once (:func:`~tests.helpers.assert_rounded_once`), at load and after ``set_scale``;
    unload puts both back bitwise. Folding the weight-kind parts onto a weight the LoRA parts
    had already rounded missed by one ulp in about 8% of the elements."""
    model = _half_layer(layer, dtype)
    base = model[0]
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    shape = (16, 12) if layer != "conv2d" else tuple(w0.shape)  # the torch layout [out, in, *kernel]
    parts = [_drawn_part(kind, shape, seed + i) for i, kind in enumerate(kinds)]
    runtime = lorahot.inject(model, ["0"], max_rank=8, merged=True)
    runtime.load([file for file, _ in parts], scale=scales[0][: len(parts)])
    for weights in (scales[0][: len(parts)], scales[1][: len(parts)]):
        runtime.set_scale(weights)
        want_w, want_b = w0.double().clone(), b0.double().clone()
        for w, (_, reference) in zip(weights, parts):
            delta, bias = reference(dtype)
            want_w += w * (delta.t() if layer == "conv1d" else delta)
            want_b += 0 if bias is None else w * bias
        assert_rounded_once(base.weight, want_w)
        assert_rounded_once(base.bias, want_b)
    runtime.unload()
    assert torch.equal(base.weight, w0) and torch.equal(base.bias, b0)


@pytest.mark.usefixtures("fake_cuda")
@pytest.mark.parametrize("lora_too", [False, True], ids=["diffs-only", "a-lora-beside"])
def test_a_rewrite_whose_every_layer_folds_outside_the_graph_captures_nothing(
    lora_too: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Layers with weight-kind modules are folded outside merged mode's CUDA graph; where every
    layer is one, the graph would be empty (torch warns "The CUDA Graph is empty"), so none is
    captured. The control, a LoRA on one layer beside a diff on the other, captures at the key's
    second load. (The replays run on the CPU here: the merger's device is set to the CPU and
    the capture is counted and declined, so each load writes on the ordinary path.)"""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8)).double()
    runtime = lorahot.inject(model, ["0", "1"], max_rank=8, merged=True)
    replays = runtime._merger._replays  # type: ignore[union-attr]
    replays.device = torch.device("cpu")
    captures: list[object] = []
    monkeypatch.setattr(replays, "capture", lambda steps, stacklevel: captures.append(steps))
    g = torch.Generator().manual_seed(1)
    adapter = {"lora_unet_1.diff": torch.randn(8, 24, generator=g, dtype=torch.float64)}
    if lora_too:
        adapter |= {
            "lora_unet_0.lora_down.weight": torch.randn(4, 16, generator=g, dtype=torch.float64),
            "lora_unet_0.lora_up.weight": torch.randn(24, 4, generator=g, dtype=torch.float64),
        }
    else:
        adapter["lora_unet_0.diff"] = torch.randn(24, 16, generator=g, dtype=torch.float64)
    for _ in range(3):
        runtime.load(adapter)
    assert len(captures) == (2 if lora_too else 0)


# -- the rewrite of one adapter as a graph replay, beside folded layers ---------------------------


@pytest.mark.usefixtures("replaying_cuda")
def test_replayed_rewrites_follow_the_layers_each_slot_folds() -> None:
    """Merged mode rewrites one adapter's ``B @ A`` layers as a graph replay (the CPU stand-in of
    ``conftest.replaying_cuda``) and leaves layers with weight-kind modules to the fold, marked
    in the replay's key. Three slots fold different layers (a diff with its diff_b on ``1``, a
    LoHa on ``0``, none; the first and the last alike but for the diff): after each activate and
    set_scale among them the weights and biases are bitwise a twin's that never replays, so no
    graph captured for one set of folded layers ran for another, and replays did run."""
    torch.manual_seed(0)
    models = [nn.Sequential(nn.Linear(12, 16), nn.Linear(16, 8)).double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    runtimes = [lorahot.inject(m, ["0", "1"], max_rank=8, slots=3, merged=True) for m in models]
    runtimes[0]._merger._replays.device = torch.device("cpu")  # as on one CUDA device
    g = torch.Generator().manual_seed(1)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * 0.3

    def lora(name: str, fan_in: int, fan_out: int) -> dict[str, torch.Tensor]:
        return {f"lora_unet_{name}.lora_down.weight": r(2, fan_in), f"lora_unet_{name}.lora_up.weight": r(fan_out, 2)}

    loha = {k: r(*s) for k, s in (("hada_w1_a", (16, 2)), ("hada_w1_b", (2, 12)), ("hada_w2_a", (16, 2)))}
    loha["hada_w2_b"] = r(2, 12)
    adapters = [
        lora("0", 12, 16) | {"lora_unet_1.diff": r(8, 16), "lora_unet_1.diff_b": r(8)},
        {f"lora_unet_0.{k}": v for k, v in loha.items()} | lora("1", 16, 8),
        lora("0", 12, 16),  # slot 0's key but for its folded layer 1, here to be put back to W0
    ]
    for slot, adapter in enumerate(adapters):
        for runtime in runtimes:
            runtime.load(adapter, slot=slot)
    for step in ("0", "1", "2", "0", "1", "2", "0", "s", "1", "s", "2", "0", "2", "1", "0", "1"):
        for runtime in runtimes:
            runtime.set_scale(-0.5) if step == "s" else runtime.activate(int(step))
        mine, twin = (m.state_dict() for m in models)
        assert all(torch.equal(v, twin[k]) for k, v in mine.items()), step
    assert runtimes[0]._merger._replays.replays >= 8 and runtimes[1]._merger._replays.replays == 0


# -- a rewrite writes only the layers whose merged delta changes ----------------------------------


def _six_layers() -> nn.Sequential:
    """Six biased layers, four float32 and two float16 (two arenas)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(6, 6) for _ in range(6)])
    model[4].half()
    model[5].half()
    return model


def _lora_on(layers: dict[str, int], seed: int, bias: str | None = None) -> dict[str, torch.Tensor]:
    """A PEFT LoRA on ``layers`` (name -> rank), a LoRA bias on layer ``bias``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, rank in layers.items():
        out[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, 6, generator=g) * 0.3
        out[f"base_model.model.{name}.lora_B.weight"] = torch.randn(6, rank, generator=g) * 0.3
    if bias is not None:
        out[f"base_model.model.{bias}.lora_B.bias"] = torch.randn(6, generator=g) * 0.3
    return out


def _lokr_on(name: str, seed: int) -> dict[str, torch.Tensor]:
    """A kohya-named LoKr (a weight-kind module: no A or B rows) on layer ``name``."""
    g = torch.Generator().manual_seed(seed)
    return {
        f"lora_unet_{name}.lokr_w1": torch.randn(2, 1, generator=g),
        f"lora_unet_{name}.lokr_w2": torch.randn(3, 6, generator=g),
    }


def _versions(model: nn.Module) -> list[int]:
    return [layer.weight._version for layer in model]


def _rewritten(model: nn.Module, before: list[int]) -> list[str]:
    return [str(i) for i, (v, w) in enumerate(zip(before, _versions(model), strict=True)) if v != w]


def test_a_merged_set_scale_or_activate_rewrites_only_the_layers_whose_delta_changes() -> None:
    """Merged mode after ``set_scale`` and ``activate`` writes only the weights whose merged
    delta changed (counted by their version counters): a layer no adapter touches is not written,
    nor, in a stack, a layer only the part that kept its weight touches; an ``activate`` between
    two adapters on different layers writes those layers alone. Before, every layer was written
    at each call (800 layers on a CPU: about 20 ms). The weights are what a rewrite of every
    layer writes (:func:`test_merged_rewrites_of_changed_layers_equal_rewrites_of_every_layer`)."""
    model = _six_layers()
    runtime = lorahot.inject(model, [str(i) for i in range(6)], max_rank=8, merged=True, slots=2)
    runtime.load(_lora_on({"0": 2, "1": 2}, seed=1))
    before = _versions(model)
    runtime.set_scale(0.5)
    assert _rewritten(model, before) == ["0", "1"]
    runtime.load([_lora_on({str(i): 2 for i in range(6)}, seed=2), _lora_on({"2": 2, "4": 3}, seed=3)], scale=[1, 1])
    before = _versions(model)
    runtime.set_scale([1.0, -0.5])
    assert _rewritten(model, before) == ["2", "4"]
    runtime.load(_lora_on({"3": 2}, seed=4), slot=1)
    runtime.load(_lora_on({"5": 2}, seed=5), slot=0)
    before = _versions(model)
    runtime.activate(1)
    assert _rewritten(model, before) == ["3", "5"]
    before = _versions(model)
    runtime.set_scale(1.0)  # its scale already
    assert _rewritten(model, before) == []


def _rewrites_all(runtime: lorahot.LoraRuntime) -> None:
    """Makes ``runtime``'s merged mode rewrite every layer at each call, as it did before."""
    merger = runtime._merger
    assert merger is not None
    merger._kept = lambda written: None  # type: ignore[method-assign]


def _dora_dir(root: Path) -> Path:
    """A PEFT DoRA adapter on layer ``1`` (magnitudes), in a folder with its config."""
    import json

    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(7)
    tensors = _lora_on({"1": 2}, seed=8) | {
        "base_model.model.1.lora_magnitude_vector": torch.rand(6, generator=g) + 0.5
    }
    root.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(root / "adapter_model.safetensors"))
    (root / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2, "use_dora": True})
    )
    return root


#: what the drawn loads load: PEFT LoRAs (one with a LoRA bias, two alike but for their values), a
#: DoRA, two LoKrs on one layer (no A or B rows), a diff with its diff_b, and stacks of them
_LOADS = ("lora-bias", "lora", "lora-2", "dora", "lokr", "lokr-2", "diff", "stack", "stack-lokr", "stack-dora")

_STEP = st.one_of(
    st.tuples(st.just("load"), st.sampled_from(_LOADS), st.integers(0, 1), st.sampled_from([1.0, 0.5, -1.0, 0.0])),
    st.tuples(st.just("scale"), st.sampled_from([1.0, 0.5, -1.0, 0.0, 2.0]), st.integers(0, 1), st.booleans()),
    st.tuples(st.just("activate"), st.integers(0, 1)),
    st.tuples(st.just("unload"), st.integers(0, 1)),
    st.tuples(st.just("refused"), st.integers(0, 1)),
    st.tuples(st.just("fault"), st.integers(0, 1)),
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(_STEP, min_size=1, max_size=10))
@example(steps=[("load", "lora", 0, 1.0), ("load", "lora-2", 0, 1.0)])  # new A and B rows, the same scales
@example(steps=[("load", "lokr", 1, 1.0), ("activate", 1), ("load", "lokr-2", 1, 1.0)])
@example(steps=[("load", "stack", 0, 0.0), ("fault", 0), ("load", "stack", 0, 0.0)])  # written, then emptied
def test_merged_rewrites_of_changed_layers_equal_rewrites_of_every_layer(tmp_path: Path, steps: list[Any]) -> None:
    """Random loads (one adapter, stacks, DoRA, LoRA biases, LoKr and diff modules), set_scale,
    activate and unload calls on two slots of a merged model: every parameter and buffer is
    bitwise what a twin that rewrites every layer at each call holds, after each call. A refused
    call (a scale that overflows float16) changes nothing, and a write that fails after the
    checks (a fault while noting the weights) empties the slot in both, alike."""
    dora = tmp_path / "dora"
    if not dora.exists():
        _dora_dir(dora)
    sources: dict[str, list[Any]] = {
        "lora-bias": [_lora_on({"0": 2, "2": 3}, seed=11, bias="0")],
        "lora": [_lora_on({"2": 2, "4": 2, "5": 1}, seed=12)],
        "lora-2": [_lora_on({"2": 2, "4": 2, "5": 1}, seed=20)],  # as "lora", but for its values
        "dora": [str(dora)],
        "lokr": [_lokr_on("3", seed=13)],
        "lokr-2": [_lokr_on("3", seed=14)],
        "diff": [{"lora_unet_5.diff": torch.randn(6, 6), "lora_unet_5.diff_b": torch.randn(6)}],
        "stack": [_lora_on({"0": 2, "4": 2}, seed=15), _lora_on({"4": 2, "5": 2}, seed=16, bias="5")],
        "stack-lokr": [_lora_on({"0": 2, "3": 2}, seed=17), _lokr_on("3", seed=18)],
        "stack-dora": [str(dora), _lora_on({"0": 2}, seed=19)],
    }
    models = [_six_layers() for _ in range(2)]
    runtimes = [lorahot.inject(m, [str(i) for i in range(6)], max_rank=8, merged=True, slots=2) for m in models]
    _rewrites_all(runtimes[1])

    def call(runtime: lorahot.LoraRuntime, step: tuple[Any, ...]) -> None:
        kind, *args = step
        if kind == "load":
            parts = sources[args[0]]
            runtime.load(parts if len(parts) > 1 else parts[0], slot=args[1], scale=[args[2]] * len(parts))
        elif kind == "scale":
            held = runtime._stacks[args[1]]
            if held is None:
                return
            weights = [args[0]] * len(held.parts)
            if args[2] and len(weights) > 1:
                weights[-1] = -weights[-1] or 0.25
            runtime.set_scale(weights, slot=args[1])
        elif kind == "activate":
            runtime.activate(args[0])
        elif kind == "unload":
            runtime.unload(args[0])
        elif kind == "refused":
            held = runtime._stacks[args[0]]
            if held is not None:
                runtime.set_scale(1e6, slot=args[0])
        else:  # a fault after the writes, once
            merger, record = runtime._merger, runtime._merger._record

            def faulty(*a: Any) -> None:
                merger._record = record  # type: ignore[method-assign]
                raise RuntimeError("a device fault")

            merger._record = faulty  # type: ignore[method-assign]
            try:
                runtime.set_scale(0.75, slot=args[0]) if runtime._stacks[args[0]] is not None else runtime.activate(
                    args[0]
                )
            finally:
                merger._record = record  # type: ignore[method-assign]

    for step in steps:
        outcomes = []
        for model, runtime in zip(models, runtimes, strict=True):
            before = {k: v.clone() for k, v in model.state_dict().items()}
            try:
                call(runtime, step)
                outcomes.append(None)
            except (lorahot.UsageError, lorahot.AdapterReadError) as exc:
                outcomes.append(type(exc))
                after = model.state_dict()
                assert all(torch.equal(v, after[k]) for k, v in before.items()), (step, "changed on refusal")
            except lorahot.WriteError as exc:
                outcomes.append(type(exc))
        assert outcomes[0] is outcomes[1], (step, outcomes)
        mine, twin = (m.state_dict() for m in models)
        assert all(torch.equal(v, twin[k]) and v.dtype == twin[k].dtype for k, v in mine.items()), step
        assert [i.parts if i else None for i in (runtimes[0].info(s) for s in range(2))] == [
            i.parts if i else None for i in (runtimes[1].info(s) for s in range(2))
        ]


@pytest.mark.parametrize("how", ["torch.save", "pickle"])
def test_a_merged_model_saves_whole_and_its_copy_computes_and_ejects_as_the_original(how: str) -> None:
    """``torch.save(model)`` of a merged model raised torch's RuntimeError ('Cannot save multiple
    tensors or storages that view the same data as different types'), right after inject and
    after every load: each layer's probe of what merged mode wrote holds views of one int64
    buffer in the weight's dtype and as int32 sums. A layer now pickles its probe as copies of
    its own; the copy computes the original's output (at the float64 reference of the active
    slot), the original is bitwise untouched, and the copy ejects to the base model bitwise."""
    import io
    import pickle

    base = tiny_lm()
    model = copy.deepcopy(base)
    names = ["layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj", "embed_tokens"]
    runtime = lorahot.inject(model, names, max_rank=8, slots=2, merged=True)
    adapters = [make_adapter(base, dict.fromkeys(names, 4), seed=seed) for seed in (1, 2)]
    for slot, (tensors, _) in enumerate(adapters):
        runtime.load(tensors, slot=slot)
    runtime.activate(1)
    ids = token_ids((2, 5), vocab=32)
    before = {n: t.clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}
    if how == "torch.save":
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        twin = torch.load(buffer, weights_only=False)
    else:
        twin = pickle.loads(pickle.dumps(model))
    for n, t in [*model.named_parameters(), *model.named_buffers()]:
        assert torch.equal(t, before[n]), n
    want = model_reference(base, ids, {n: (a, b, 1.0) for n, (a, b) in adapters[1][1].items()})
    with torch.no_grad():
        got = twin(ids)
        assert torch.equal(got, model(ids))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)
    lorahot.eject(twin)
    assert not any(isinstance(m, lorahot.LoRALayer) for m in twin.modules())
    for (name, t), w in zip(twin.state_dict().items(), base.state_dict().values(), strict=True):
        assert torch.equal(t, w), name


@pytest.mark.parametrize("merge", [False, True], ids=["unmerged", "merged"])
def test_a_saved_state_dict_holds_the_base_unmerged_and_the_folded_weights_merged(merge: bool) -> None:
    """``torch.save(model.state_dict())`` after loads, a swap and ``set_scale``: unmerged it is the
    base model's, bitwise (the LoRA buffers are not persistent), and a fresh base model that loads
    it and the adapter computes the float64 reference; merged it holds what the model computes
    (``W0 + s B A``), so a fresh base model loading it computes the adapter at its reference with
    no lorahot at all, and a fresh merged runtime refuses to fold another adapter over it
    (UsageError, nothing changed) where the adapter would count twice."""
    import io

    base = tiny_lm(dtype=torch.float64)
    model = copy.deepcopy(base)
    names = ["layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj", "embed_tokens"]
    runtime = lorahot.inject(model, names, max_rank=8, slots=2, merged=merge)
    adapters = [make_adapter(base, dict.fromkeys(names, 4), seed=seed, dtype=torch.float64) for seed in (1, 2)]
    for slot, (tensors, _) in enumerate(adapters):
        runtime.load(tensors, slot=slot)
    runtime.activate(1)
    runtime.set_scale(0.5)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    assert list(saved) == list(base.state_dict())
    ids = token_ids((2, 5), vocab=32)
    want = model_reference(base, ids, {n: (a, b, 0.5) for n, (a, b) in adapters[1][1].items()})
    fresh = tiny_lm(dtype=torch.float64)
    fresh.load_state_dict(saved)
    with torch.no_grad():
        if merge:
            _close(fresh(ids), want)
        else:
            assert all(torch.equal(v, saved[k]) for k, v in base.state_dict().items())
            assert torch.equal(fresh(ids), base(ids))
    injected = tiny_lm(dtype=torch.float64)
    again = lorahot.inject(injected, names, max_rank=8, merged=merge)
    injected.load_state_dict(saved)
    before = {n: t.clone() for n, t in [*injected.named_parameters(), *injected.named_buffers()]}
    if merge:
        with pytest.raises(lorahot.UsageError, match=r"targeted weights or biases changed since lorahot last wrote"):
            again.load(adapters[1][0], scale=0.5)
        for n, t in [*injected.named_parameters(), *injected.named_buffers()]:
            assert torch.equal(t, before[n]), n
    else:
        again.load(adapters[1][0], scale=0.5)
        with torch.no_grad():
            _close(injected(ids), want)


class _ScaledLinear(nn.Linear):
    """A Linear whose forward takes a second argument: its output times ``scale`` (1 by default)."""

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return super().forward(x) * scale


class _ScaledConv(nn.Conv2d):
    """A Conv2d whose forward takes a second argument: its output times ``scale`` (1 by default)."""

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        return super().forward(x) * scale


class _Calls(nn.Module):
    """Calls ``proj`` with its input alone, or with ``scale=2`` besides it (by keyword or positionally)."""

    def __init__(self, proj: nn.Module, how: str) -> None:
        super().__init__()
        self.proj, self.how = proj, how

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.how == "keyword":
            return self.proj(x, scale=2.0)
        return self.proj(x, 2.0) if self.how == "positional" else self.proj(x)


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("how", ["alone", "keyword", "positional"])
@pytest.mark.parametrize(
    ("make", "shape"),
    [(lambda: _ScaledLinear(6, 5), (3, 6)), (lambda: _ScaledConv(3, 4, 3, padding=1), (2, 3, 5, 5))],
    ids=["Linear", "Conv2d"],
)
def test_merged_refuses_a_call_passing_its_layer_more_than_the_input(
    make: Any, shape: tuple[int, ...], how: str, compiled: bool
) -> None:
    """A subclass whose forward takes more than its input passes inject's merged-mode check,
    which calls it with its input alone. Called with ``scale=2`` it multiplied the folded LoRA
    too: 2 * (W0 + dW) x where PEFT's unmerged forward (and lorahot's) give 2 * W0 x + dW x,
    1.4 to 3.5 off, silently. Such a call is now refused, eagerly and when compiled, naming the
    layer; with its input alone merged mode gives PEFT's output, and unmerged every call does."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = _Calls(make().double(), how)
    tensors, _ = make_adapter(model, {"proj": 2}, dtype=torch.float64)
    oracle = peft.inject_adapter_in_model(
        peft.LoraConfig(r=2, lora_alpha=2, target_modules=["proj"]), copy.deepcopy(model)
    )
    peft.set_peft_model_state_dict(oracle, {k.removeprefix("base_model.model."): v for k, v in tensors.items()})
    x = torch.randn(shape, dtype=torch.float64)
    with torch.no_grad():
        want = oracle(x)
    for merged in (False, True):
        injected = copy.deepcopy(model)
        lorahot.inject(injected, ["proj"], max_rank=2, merged=merged).load(tensors)
        run = torch.compile(injected, backend="aot_eager") if compiled else injected
        if merged and how != "alone":
            kind = type(model.proj).__name__
            with pytest.raises(
                lorahot.UsageError,
                match=rf"^proj \(LoRA\w+ over {kind} .*\): called in merged mode with .*more than its input\. .*"
                r"Call it with its input alone, or inject without merged=True",
            ):
                run(x)
            continue
        with torch.no_grad():
            torch.testing.assert_close(run(x), want, rtol=1e-12, atol=1e-12)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", _LAYOUTS[:3])
def test_gpu_merged_swaps_of_a_dense_weight_in_any_layout_hold_the_contiguous_bits(layout: str) -> None:
    """On CUDA, where a merged swap's record and check are CUDA graph replays (from the second
    call on), a weight dense in another layout (channels_last, channels_last_3d, a transposed
    Linear) holds after every swap the bits the same weight holds contiguous, keeps its address
    and strides, and an edit after the swaps is refused with every byte and stride as it was."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    dtype = torch.bfloat16
    laid = _laid_out(layout, dtype).cuda()
    if layout == "linear transposed":  # .cuda() keeps the strides of a dense parameter
        assert not laid[0].weight.is_contiguous()
    plain = copy.deepcopy(laid)
    plain[0].weight = nn.Parameter(plain[0].weight.detach().contiguous())
    address, strides = laid[0].weight.data_ptr(), laid[0].weight.stride()
    runtimes = [lorahot.inject(m, ["0"], max_rank=4, merged=True) for m in (plain, laid)]
    adapters = [make_adapter(plain, {"0": r}, seed=10 + r, dtype=dtype)[0] for r in (4, 2)]
    for i, scale in enumerate((1.0, 0.37, -2.5, 0.8, 1.3)):
        for runtime in runtimes:
            runtime.load(adapters[i % 2], scale=scale)
            runtime.set_scale(scale / 2)
        weights = [m[0].base_layer.weight for m in (plain, laid)]
        assert torch.equal(weights[0].view(torch.int16), weights[1].contiguous().view(torch.int16)), (layout, scale)
        assert weights[1].data_ptr() == address and weights[1].stride() == strides
    with torch.no_grad():
        laid[0].base_layer.weight[(-1,) * laid[0].base_layer.weight.dim()] += 1
    before = _bits(laid)
    with pytest.raises(lorahot.UsageError, match=r"changed since lorahot last wrote them"):
        runtimes[1].set_scale(0.5)
    assert _same_bits(before, _bits(laid))


def _product_first_addmm(
    inp: torch.Tensor, m1: torch.Tensor, m2: torch.Tensor, *, alpha: float = 1.0, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``torch.addmm`` as a BLAS that forms ``m1 @ m2`` in the output's dtype before scaling it
    by ``alpha`` computes it (MKL's AVX-512 kernels, cuBLAS's float32 accumulators)."""
    got = inp + alpha * (m1 @ m2)
    return got if out is None else out.copy_(got)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("blas", ["product-first", "this-machine"])
def test_a_merged_layer_whose_unscaled_product_overflows_its_gemm_is_written_exactly(
    dtype: torch.dtype, blas: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A and B of 1e22 at a scale of 2e-38 (alpha 2e-30 over rank 2, times 2e-8): the merged
    update is about 4e6, but ``B @ A`` alone (1e44) leaves float32's range. Such a layer is
    written in float64 with the scale folded into A, so the weight is the float64 reference
    rounded once, whatever the BLAS does first; its neighbour, in range, keeps the one GEMM
    (negative control: the product-first BLAS gives inf or NaN through that GEMM)."""
    from lorahot.runtime import merge

    if blas == "product-first":
        monkeypatch.setattr(merge.torch, "addmm", _product_first_addmm)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4)).to(dtype)
    pristine = [m.weight.detach().double().clone() for m in model]
    g = torch.Generator().manual_seed(1)
    huge = {"a": torch.randn(2, 8, generator=g, dtype=torch.float64) * 1e22}
    huge["b"] = torch.randn(4, 2, generator=g, dtype=torch.float64) * 1e22
    small = {k: torch.randn(*shape, generator=g, dtype=torch.float64) for k, shape in (("a", (2, 4)), ("b", (4, 2)))}
    runtime = lorahot.inject(model, ["0", "1"], max_rank=2, merged=True)
    tensors = {f"{i}.lora_{k.upper()}.weight": t[k].float() for i, t in ((0, huge), (1, small)) for k in ("a", "b")}
    runtime.load(tensors, config={"r": 2, "lora_alpha": 2e-30}, scale=2e-8)
    s = 1e-30 * 2e-8
    for layer, w0, t in zip(model, pristine, (huge, small), strict=True):
        a, b = t["a"].float().to(dtype).double(), t["b"].float().to(dtype).double()
        want = (w0 + s * (b @ a)).to(dtype)
        got = layer.base_layer.weight.detach()
        assert torch.isfinite(got).all()
        if t is huge:
            assert torch.equal(got, want)  # the float64 sum, rounded once
        else:
            torch.testing.assert_close(got.double(), want.double(), rtol=0, atol=1e-6)


def test_negative_control_the_product_first_blas_breaks_the_one_gemm_rewrite(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the test above guards against: ``W0 + s * B @ A`` through the product-first GEMM
    with factors of 1e22 is not finite."""
    w0 = torch.zeros(4, 8)
    a, b = torch.full((2, 8), 1e22), torch.full((4, 2), 1e22)
    assert not torch.isfinite(_product_first_addmm(w0, b, a, alpha=2e-38)).any()


def test_a_scale_whose_bound_reaches_the_limit_is_checked_exactly_beyond_float32() -> None:
    """A and B of 1e20 whose products cancel (``B @ A`` is at most 2e36, its bound
    ``r * max|A| * max|B|`` 2e40) at ``alpha / r`` of 1e-6, then ``set_scale(5e5)`` (0.5 in
    all), whose bound reaches float32's limit, so merged mode computes the merged weight
    exactly. In float32 the unscaled terms (1e40) overflow and the scale was refused; in float64
    the weight fits and the scale is taken, the weight the float64 reference's. Negative
    control: at a scale the true weight leaves the range at, the scale is refused and nothing
    changes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    w0 = model[0].weight.detach().double().clone()
    a = torch.tensor([[1e20, 1e20, 1e20, 1e20], [1e20, 1e20, 1e20, 1e20 + 2e16]], dtype=torch.float64)
    b = torch.tensor([[1e20, -1e20], [-1e20, 1e20], [1e20, -1e20]], dtype=torch.float64)
    runtime = lorahot.inject(model, ["0"], max_rank=2, merged=True)
    # alpha / r of 1e-6: the load's checks find the bound far from the limit and keep it
    runtime.load({"0.lora_A.weight": a.float(), "0.lora_B.weight": b.float()}, config={"r": 2, "lora_alpha": 2e-6})
    runtime.set_scale(5e5)  # 0.5 in all
    af, bf = a.float().double(), b.float().double()
    assert (bf @ af).abs().max() < 1e38 < 2 * float(af.abs().max() * bf.abs().max())
    want = (w0 + 0.5 * (bf @ af)).float()
    assert torch.equal(model[0].base_layer.weight.detach(), want)
    kept = model[0].base_layer.weight.detach().clone()
    with pytest.raises(lorahot.UsageError, match="would overflow"):
        runtime.set_scale(1e9)
    assert torch.equal(model[0].base_layer.weight.detach(), kept)
