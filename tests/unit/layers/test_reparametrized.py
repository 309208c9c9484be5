"""torch's weight utilities applied to a LoRA layer rather than its base (``lorahot.layers.reparametrized``):
refused with a ``UsageError`` naming the layer and ``base_layer``, the model bitwise unchanged;
applied to ``base_layer`` they reparametrize the base under the live update."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, parametrize, prune

import lorahot
from tests.helpers import TinyConvNet, make_adapter, tiny_lm, token_ids


class _Doubled(nn.Module):
    """A parametrization of the user's own: twice the stored tensor."""

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * 2

    def right_inverse(self, w: torch.Tensor) -> torch.Tensor:
        return w / 2


#: each utility, as applied to a module; the older weight_norm warns that it is deprecated
_UTILITIES: dict[str, Callable[[nn.Module], object]] = {
    "weight_norm": lambda m: torch.nn.utils.weight_norm(m),
    "weight_norm of bias": lambda m: torch.nn.utils.weight_norm(m, "bias", dim=0),
    "spectral_norm": lambda m: torch.nn.utils.spectral_norm(m),
    "parametrizations.weight_norm": lambda m: parametrizations.weight_norm(m),
    "parametrizations.spectral_norm": lambda m: parametrizations.spectral_norm(m),
    "parametrizations.orthogonal": lambda m: parametrizations.orthogonal(m),
    "register_parametrization": lambda m: parametrize.register_parametrization(m, "weight", _Doubled()),
    "register_parametrization of bias": lambda m: parametrize.register_parametrization(m, "bias", _Doubled()),
}


def _served(model: nn.Module, targets: list[str], merged: bool = False) -> lorahot.LoraRuntime:
    runtime = lorahot.inject(model, targets, max_rank=4, merged=merged)
    runtime.load(make_adapter(model, dict.fromkeys(runtime.layers, 2), seed=1, dtype=torch.float64)[0])
    return runtime


def _snapshot(model: nn.Module) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], list[str], list[object]]:
    """Every parameter and buffer (the object and a copy of its values), the state-dict keys, and
    each module's class and hooks."""
    tensors = {k: (t, t.clone()) for k, t in [*model.named_parameters(), *model.named_buffers()]}
    kinds = [
        (n, type(m), dict(m._forward_pre_hooks), dict(m._forward_hooks), dict(m._state_dict_hooks))
        for n, m in model.named_modules()
    ]
    return tensors, list(model.state_dict()), kinds


def _assert_unchanged(model: nn.Module, snapshot: tuple) -> None:
    tensors, keys, kinds = snapshot
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert now.keys() == tensors.keys()
    assert all(now[k] is t and torch.equal(t, v) for k, (t, v) in tensors.items())
    assert list(model.state_dict()) == keys
    assert _snapshot(model)[2] == kinds


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the older weight_norm is deprecated
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("utility", list(_UTILITIES))
def test_a_reparametrization_of_the_wrapper_is_refused_and_changes_nothing(utility: str, merged: bool) -> None:
    """Applied to the LoRA layer, which holds no parameter, torch's utilities raised torch's
    ``KeyError: 'weight'`` (``weight_norm``, ``spectral_norm``) or ``ValueError``
    (``register_parametrization``, and every ``torch.nn.utils.parametrizations`` utility through
    it). Each is a ``UsageError`` naming the layer and ``base_layer``, with every parameter,
    buffer, state-dict key, class and hook as it was and the output bitwise; the runtime serves on.
    A linear and a conv layer alike."""
    for model, targets, name, inputs in (
        (tiny_lm(dtype=torch.float64), ["q_proj", "v_proj"], "layers.0.self_attn.q_proj", token_ids((2, 6), 32, 1)),
        (TinyConvNet().double(), ["conv", "proj"], "conv", torch.randint(0, 16, (2, 5, 5))),
    ):
        if merged and name == "conv":  # a grouped conv: merged mode folds no LoRA into it
            targets = ["proj"]
            name = "proj"
        runtime = _served(model, targets, merged)
        layer = model.get_submodule(name)
        snapshot = _snapshot(model)
        with torch.no_grad():
            before = model(inputs)
            with pytest.raises(lorahot.UsageError, match=rf"^{name}: torch\.nn\.utils\..* {name}\.base_layer"):
                _UTILITIES[utility](layer)
            assert torch.equal(model(inputs), before)
        _assert_unchanged(model, snapshot)
        runtime.set_scale(0.5)
        runtime.set_scale(1.0)
        with torch.no_grad():
            assert torch.equal(model(inputs), before)


def test_a_base_s_parametrization_removed_through_the_wrapper_is_refused_and_the_base_computes_as_before() -> None:
    """A weight parametrized before inject (unmerged): ``remove_parametrizations`` applied to the
    LoRA layer found the base's parametrizations through it, wrote the parametrized weight into
    the base's original (``leave_parametrized=True``, the default), then raised ``AttributeError``
    on the layer's class: the base computed the parametrization twice from then on (0.54 off).
    Refused, nothing changed; the layer is not parametrized itself (``is_parametrized``,
    ``type_before_parametrizations``), and the removal from ``base_layer`` leaves the weight the
    base computed with under the live update (float64 reference)."""
    model = tiny_lm(dtype=torch.float64)
    parametrize.register_parametrization(model.layers[0].self_attn.q_proj, "weight", _Doubled())
    runtime = lorahot.inject(model, lambda n, m: n.endswith(("q_proj", "v_proj")), max_rank=4)
    runtime.load(make_adapter(model, dict.fromkeys(runtime.layers, 3), seed=1, dtype=torch.float64)[0])
    layer = model.layers[0].self_attn.q_proj
    ids = token_ids((2, 6), 32, seed=1)
    snapshot = _snapshot(model)
    with torch.no_grad():
        before = model(ids)
        with pytest.raises(lorahot.UsageError, match=r"^layers\.0\.self_attn\.q_proj: .*remove_parametrizations"):
            parametrize.remove_parametrizations(layer, "weight")
        assert torch.equal(model(ids), before)
    _assert_unchanged(model, snapshot)
    assert not parametrize.is_parametrized(layer) and parametrize.type_before_parametrizations(layer) is type(layer)
    assert "weight" not in layer.parametrizations and len(layer.parametrizations) == 0
    assert parametrize.is_parametrized(layer.base_layer, "weight")
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        weight = layer.base_layer.weight.clone()  # twice the stored original
        delta = layer(x) - layer.base_layer(x)
        parametrize.remove_parametrizations(layer.base_layer, "weight")
        assert torch.equal(layer.base_layer.weight, weight)
        torch.testing.assert_close(layer(x), x @ weight.T + delta, rtol=0, atol=1e-12)
        assert torch.equal(model(ids), before)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the older weight_norm is deprecated
@pytest.mark.parametrize("utility", list(_UTILITIES))
def test_a_reparametrization_of_base_layer_keeps_the_live_update(utility: str) -> None:
    """Applied to ``base_layer`` (unmerged), each utility reparametrizes the base: the layer
    computes the base's new output plus the same update as before (float64, 1e-12)."""
    model = TinyConvNet().double().eval()  # eval: spectral norm runs no power iteration per call
    _served(model, ["proj"])
    layer = model.proj  # a Linear with a bias
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        delta = layer(x) - layer.base_layer(x)
        _UTILITIES[utility](layer.base_layer)
        got, base = layer(x), layer.base_layer(x)
    torch.testing.assert_close(got, base + delta, rtol=0, atol=1e-12)


class _Vocoder(nn.Module):
    """A HiFi-GAN-like stack: two weight-normed Conv1d (torch's older, hook-based
    ``weight_norm``, which transformers' and most vocoders' ``remove_weight_norm()`` undo), one
    spectral-normed, and a pruned Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_pre = torch.nn.utils.weight_norm(nn.Conv1d(4, 8, 3, padding=1))
        self.up = torch.nn.utils.weight_norm(nn.Conv1d(8, 8, 3, padding=1))
        self.post = torch.nn.utils.spectral_norm(nn.Conv1d(8, 8, 1))
        self.head = nn.Linear(8, 3)
        prune.l1_unstructured(self.head, "weight", 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 4, T) -> (B, T, 3)
        h = self.post(torch.tanh(self.up(torch.tanh(self.conv_pre(x)))))
        return self.head(h.transpose(1, 2))


#: the removal of each reparametrization of _Vocoder, by the module it was applied to
_REMOVALS: dict[str, tuple[str, Callable[[nn.Module], object]]] = {
    "remove_weight_norm": ("conv_pre", lambda m: torch.nn.utils.remove_weight_norm(m)),
    "remove_spectral_norm": ("post", lambda m: torch.nn.utils.remove_spectral_norm(m)),
    "prune.remove": ("head", lambda m: prune.remove(m, "weight")),
}


def _delta(layer: nn.Module, a: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``B(A(x))`` at scale 1 (alpha = rank), in float64: a conv's A with the base's padding."""
    if isinstance(layer.base_layer, nn.Linear):
        return x @ a.T @ b.T
    return nn.functional.conv1d(nn.functional.conv1d(x, a, padding=layer.base_layer.padding), b)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # the older weight_norm is deprecated
@pytest.mark.parametrize("removal", list(_REMOVALS))
def test_removing_a_base_s_norm_or_pruning_through_the_wrapper_is_refused_and_from_base_layer_works(
    removal: str,
) -> None:
    """A vocoder's weight-normed convs (pruned linears alike) take LoRA unmerged over their own
    output. ``remove_weight_norm``, ``remove_spectral_norm`` and ``prune.remove`` applied to the
    LoRA layer raised torch's ``ValueError`` ("weight_norm of 'weight' not found in LoRAConv(...)",
    "has to be pruned before pruning can be removed"), naming neither the layer's path nor the
    fix. Each is a ``UsageError`` naming the layer and ``base_layer``, nothing changed; applied to
    ``base_layer`` it fixes the base weight at what it computed, the update stays live, and a
    swap loads the next adapter over it (float64 reference, 1e-12)."""
    torch.manual_seed(0)
    model = _Vocoder().double().eval()
    runtime = lorahot.inject(model, ["conv_pre", "up", "post", "head"], max_rank=4)
    ranks = dict.fromkeys(runtime.layers, 2)
    runtime.load(make_adapter(model, ranks, seed=1, dtype=torch.float64)[0])
    name, remove = _REMOVALS[removal]
    layer = model.get_submodule(name)
    x = torch.randn(2, 4, 5, dtype=torch.float64)
    snapshot = _snapshot(model)
    with torch.no_grad():
        before = model(x)
        refused = rf"^{name}: torch\.nn\.utils\.{re.escape(removal)} of 'weight' .* {name}\.base_layer "
        with pytest.raises(lorahot.UsageError, match=refused):
            remove(layer)
        with pytest.raises(ValueError, match=r"_Vocoder\("):  # applied to the model: torch's error about the model
            remove(model)
        assert torch.equal(model(x), before)
    _assert_unchanged(model, snapshot)
    with torch.no_grad():
        computed = layer.base_layer.weight.clone()
        remove(layer.base_layer)
        assert type(layer.base_layer.weight) is nn.Parameter and torch.equal(layer.base_layer.weight, computed)
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-12)
    tensors, ab = make_adapter(model, ranks, seed=2, dtype=torch.float64)
    runtime.load(tensors)
    h = torch.randn(2, 8, 5, dtype=torch.float64) if name != "conv_pre" else x
    h = h.transpose(1, 2).contiguous() if name == "head" else h
    with torch.no_grad():
        want = layer.base_layer(h) + _delta(layer, *ab[name], h)
        torch.testing.assert_close(layer(h), want, rtol=0, atol=1e-12)
