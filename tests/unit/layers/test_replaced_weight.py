"""A new parameter for a wrapped base layer's weight after inject (``lm_head.weight = ...``, as
transformers' ``tie_weights`` assigns it; ``load_state_dict(assign=True)``).

A layer that calls its base layer takes the new weight. A wide layer computes from its own copy
of the weight, and a merged one holds the adapter merged into it: there the assignment is
refused before it takes effect, with a typed error, and the model computes what it did. The
negative control shows what the refusal prevents: without it a wide layer keeps the old weight,
silently.
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from torch import nn

import lorahot
from lorahot.errors import UsageError
from lorahot.layers import base as layer_base
from lorahot.layers import base_guards
from lorahot.runtime import wide
from tests.helpers import TINY_DECODER, make_adapter


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).double()


def _injected(monkeypatch: pytest.MonkeyPatch, *, widened: bool, merged: bool = False) -> tuple[nn.Module, object]:
    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"} if widened else {"cuda"})
    model = _model()
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, merged=merged)
    runtime.load(make_adapter(model, {"0": 4, "2": 2}, dtype=torch.float64)[0])
    return model, runtime


def _new_weight() -> nn.Parameter:
    return nn.Parameter(torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5)))


@pytest.mark.parametrize("through", ["wrapper", "base layer"])
def test_a_wide_layer_refuses_a_new_weight_and_nothing_changes(through: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = _injected(monkeypatch, widened=True)
    layer = model[0]
    assert layer.wide
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    old = layer.base_layer.weight
    target = layer if through == "wrapper" else layer.base_layer
    with pytest.raises(UsageError, match=r"^0: its base layer's weight was replaced after inject .*wide layer.*eject"):
        target.weight = _new_weight()
    assert layer.base_layer.weight is old
    with torch.no_grad():
        assert torch.equal(model(x), before)


def test_without_the_refusal_the_runtime_can_no_longer_serve_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: the same assignment with the check taken away goes through, and the
    runtime's next call refuses the model (its wide layer's weight left the wide buffer); a
    compiled graph would keep reading the old block. The refusal keeps the model servable."""
    model, runtime = _injected(monkeypatch, widened=True)
    monkeypatch.setattr(base_guards, "_WRAPPERS", weakref.WeakKeyDictionary())
    model[0].weight = _new_weight()
    with pytest.raises(UsageError, match="replaced"):
        runtime.set_scale(1.0)  # type: ignore[attr-defined]


def test_a_wide_layer_takes_a_new_bias(monkeypatch: pytest.MonkeyPatch) -> None:
    """Its bias is read on every call: a new one is used."""
    model, _ = _injected(monkeypatch, widened=True)
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        before = model[0](x)
        model[0].bias = nn.Parameter(model[0].bias + 1.0)
        torch.testing.assert_close(model[0](x), before + 1.0)


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_a_merged_layer_refuses_a_new_weight_or_bias(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model, runtime = _injected(monkeypatch, widened=False, merged=True)
    pristine = {k: v.clone() for k, v in _model().state_dict().items()}
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        before = model(x)
    old = getattr(model[0].base_layer, name)
    new = nn.Parameter(old.detach() + 1.0)
    with pytest.raises(UsageError, match=rf"^0: its base layer's {name} was replaced after inject .*merged in"):
        setattr(model[0], name, new)
    assert getattr(model[0].base_layer, name) is old
    with torch.no_grad():
        assert torch.equal(model(x), before)
    runtime.eject()  # type: ignore[attr-defined]
    for key, value in model.state_dict().items():
        assert torch.equal(value, pristine[key]), key


@pytest.mark.parametrize("copied", [False, True], ids=["model", "deepcopy"])
@pytest.mark.parametrize("merged", [False, True], ids=["wide", "merged"])
def test_load_state_dict_with_assign_is_refused_with_a_typed_error(
    merged: bool, copied: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch collects an exception raised while it assigns a tensor into a ``RuntimeError`` of
    its own; the refusal comes first, from a load hook, as lorahot's error (a copy's too). The
    runtime then still serves, and in merged mode eject gives back the pristine base (the
    refused load had left the layer marked as loaded: every call refused, eject kept the
    adapter merged)."""
    model, runtime = _injected(monkeypatch, widened=not merged, merged=merged)
    pristine = _model().state_dict()
    target = copy.deepcopy(model) if copied else model
    state = {k: v.clone() + 1.0 for k, v in target.state_dict().items()}
    old = target[0].base_layer.weight
    refused = r"^0: its base layer's weight was replaced .*refused before it loaded anything"
    with pytest.raises(UsageError, match=refused):
        target.load_state_dict(state, assign=True)
    assert target[0].base_layer.weight is old
    runtime.set_scale(0.5)  # type: ignore[attr-defined]
    runtime.eject()  # type: ignore[attr-defined]
    if merged and not copied:
        for key, value in model.state_dict().items():
            assert torch.equal(value, pristine[key]), key


def test_a_layer_that_calls_its_base_takes_the_new_weight(monkeypatch: pytest.MonkeyPatch) -> None:
    """Through the wrapper as through the base layer: the model then equals one given the same
    weight before inject, with the same adapter."""
    model, _ = _injected(monkeypatch, widened=False)
    assert not model[0].wide
    weight = _new_weight()
    model[0].weight = weight
    assert model[0].base_layer.weight is weight
    reference = _model()
    reference[0].weight = nn.Parameter(weight.detach().clone())
    runtime = lorahot.inject(reference, ["0", "2"], max_rank=4)
    runtime.load(make_adapter(_model(), {"0": 4, "2": 2}, dtype=torch.float64)[0])
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-12)


def test_after_eject_and_outside_lorahot_weights_are_assigned_as_usual(monkeypatch: pytest.MonkeyPatch) -> None:
    model, runtime = _injected(monkeypatch, widened=True)
    runtime.eject()  # type: ignore[attr-defined]
    weight = _new_weight()
    model[0].weight = weight
    assert model[0].weight is weight
    plain = copy.deepcopy(_model())
    plain[0].weight = weight
    assert plain[0].weight is weight


def test_the_check_lets_any_module_register_parameters() -> None:
    """It runs for every module of the process: one whose class makes it unhashable (an
    ``__eq__`` without ``__hash__``) registers its parameters as it would without lorahot."""

    class Unhashable(nn.Module):
        def __eq__(self, other: object) -> bool:
            return isinstance(other, Unhashable)

        __hash__ = None  # type: ignore[assignment]

    module = Unhashable()
    weight = nn.Parameter(torch.ones(2))
    module.weight = weight
    assert module._parameters["weight"] is weight


@pytest.mark.gpu
def test_gpu_a_wide_layer_refuses_a_new_weight() -> None:
    """On CUDA, where layers widen by default: the refusal, and the compiled-free forward
    bitwise as before."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256)).to("cuda", torch.bfloat16)
    runtime = lorahot.inject(model, ["0", "2"], max_rank=16)
    runtime.load(make_adapter(model, {"0": 16, "2": 8}, dtype=torch.bfloat16)[0])
    assert model[0].wide and model[2].wide
    x = torch.randn(300, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        before = model(x)
    old = model[2].base_layer.weight
    with pytest.raises(UsageError, match=r"^2: its base layer's weight was replaced"):
        model[2].weight = nn.Parameter(torch.zeros_like(old))
    assert model[2].base_layer.weight is old
    with torch.no_grad():
        assert torch.equal(model(x), before)


def _reference(model: nn.Module, ab: dict[str, tuple[torch.Tensor, torch.Tensor]], x: torch.Tensor) -> torch.Tensor:
    """float64: each layer's base weight and bias as the model now has them, plus ``B @ A``."""
    h = x
    for name in ("0", "2"):
        base, (a, b) = model[int(name)].base_layer, ab[name]
        h = nn.functional.linear(h, base.weight.detach().double() + b @ a, base.bias.detach().double())
        h = h.relu() if name == "0" else h
    return h


_BYPASSES = {
    "data": lambda base, w: setattr(base.weight, "data", w),
    "_parameters": lambda base, w: base._parameters.__setitem__("weight", nn.Parameter(w)),
    "swap_tensors": lambda base, w: torch.utils.swap_tensors(base.weight, nn.Parameter(w)),
}


@pytest.mark.parametrize("how", [*_BYPASSES, "move then load"])
@pytest.mark.parametrize("bound", [True, False], ids=["checked", "negative-control"])
def test_a_wide_layer_follows_a_weight_changed_past_attribute_assignment(
    how: str, bound: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """New storage under the weight (``.data``, a parameter put in ``_parameters`` as accelerate
    does, ``swap_tensors``) or a weight loaded after a move (``model.float()`` converts the
    weight and the wide buffer apart): the eager forward notices the weight is no longer the
    wide buffer's block and calls the base layer, so the output is the float64 reference of the
    weights the model now has. With the check forced to pass (negative control) it is not."""
    model, _ = _injected(monkeypatch, widened=True)
    ab = {
        n: tuple(t.double() for t in v)
        for n, v in make_adapter(_model(), {"0": 4, "2": 2}, dtype=torch.float64)[1].items()
    }
    if not bound:
        monkeypatch.setattr(type(model[0]), "wide_bound", lambda self: True)
    new = torch.randn(6, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    x = torch.randn(3, 8, dtype=torch.float64)
    if how == "move then load":
        model.float()
        state = model.state_dict()
        state["0.weight"] = new.float()
        model.load_state_dict(state)
        x = x.float()
    else:
        _BYPASSES[how](model[0].base_layer, new)
    with torch.no_grad():
        err = float((model(x).double() - _reference(model, ab, x.double())).abs().max())
    tolerance = 1e-5 if how == "move then load" else 1e-12
    assert (err < tolerance) == bound, err


def _tied_llama() -> nn.Module:
    """The tiny Llama of the test helpers, its head tied to its embeddings."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**TINY_DECODER, tie_word_embeddings=True)
    model: nn.Module = transformers.LlamaForCausalLM(config).eval()
    return model


def test_tie_weights_on_weights_tied_before_inject_passes(monkeypatch: pytest.MonkeyPatch) -> None:
    """``tie_weights()`` assigns the head the parameter it already has: nothing changes, so a
    widened head takes it (it was refused as a replaced weight)."""
    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    model = _tied_llama()
    lorahot.inject(model, ["lm_head"], max_rank=4)
    assert model.lm_head.wide and model.lm_head.weight is model.model.embed_tokens.weight
    ids = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(ids).logits
        model.tie_weights()
        assert torch.equal(model(ids).logits, before)


def test_a_weight_of_another_shape_is_refused_by_every_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The LoRA buffers are shaped for the weight at inject: a plain layer refuses a new one of
    another shape, and so does a tied head that ``resize_token_embeddings`` resizes (the
    forward then failed with torch's shape error, nothing naming the layer)."""
    model, _ = _injected(monkeypatch, widened=False)
    old = model[0].base_layer.weight
    with pytest.raises(UsageError, match=r"^0: its base layer's weight would change shape after inject, from \(6, 8\)"):
        model[0].weight = nn.Parameter(torch.randn(7, 8, dtype=torch.float64))
    assert model[0].base_layer.weight is old
    llama = _tied_llama()
    runtime = lorahot.inject(llama, ["lm_head"], max_rank=4)
    # the model's own method is refused up front (lorahot.runtime.embedding_resize); the class's,
    # called past it, resizes the tied weight in place, then ties: the layer refuses that
    with pytest.raises(UsageError, match=r"resize_token_embeddings on a model whose embeddings lorahot wraps"):
        llama.resize_token_embeddings(72, mean_resizing=False)
    with pytest.raises(UsageError, match=r"^lm_head: .* resized in place after inject, from \(64, 32\) to \(72, 32\)"):
        type(llama).resize_token_embeddings(llama, 72, mean_resizing=False)
    with pytest.raises(UsageError, match=r"^lm_head: its base layer's weight was resized in place"):
        runtime.set_scale(1.0)  # type: ignore[attr-defined]  # the model can no longer be served


def test_a_new_base_layer_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward computes with the module it wrapped: a new one would be ignored, silently."""
    model, runtime = _injected(monkeypatch, widened=False)
    layer = model[0]
    with pytest.raises(UsageError, match=r"^0: its base_layer cannot be replaced after inject"):
        layer.base_layer = nn.Linear(8, 6).double()
    layer.base_layer = layer.base_layer  # the same module again passes
    runtime.eject()  # type: ignore[attr-defined]
    assert type(model[0]) is nn.Linear


@pytest.mark.parametrize("merged", [False, True], ids=["wide", "merged"])
def test_a_copy_of_the_model_checks_its_weights_as_the_original(merged: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A deepcopy's layers compute as the original's (a widened copy from its own wide
    buffer): a new weight there is refused too (it was taken, and ignored or unmerged)."""
    model, _ = _injected(monkeypatch, widened=not merged, merged=merged)
    clone = copy.deepcopy(model)
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        before = clone(x)
    with pytest.raises(UsageError, match=r"^0: its base layer's weight was replaced"):
        clone[0].weight = _new_weight()
    with torch.no_grad():
        assert torch.equal(clone(x), before)


@pytest.mark.parametrize("kind", ["plain", "wide", "merged"])
@pytest.mark.parametrize("put", [True, False], ids=["checked", "negative-control"])
def test_functional_call_with_the_state_dict_computes_what_the_model_does(
    kind: str, put: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``torch.func.functional_call(model, model.state_dict(), x)`` puts plain tensors where the
    parameters are, through the wrapper (which holds none of its own). They go to the base
    layer as they would without inject, and the output is the model's, bitwise; after the call
    every parameter is back and the runtime still serves. Negative control: the wrapper's
    plain-tensor path taken away, torch refuses a tensor for a parameter with its own
    ``TypeError`` (what it raised before)."""
    model, runtime = _injected(monkeypatch, widened=kind == "wide", merged=kind == "merged")
    if not put:
        monkeypatch.setattr(layer_base, "_put_plain_tensor", lambda layer, name, t: setattr(layer._base, name, t))
    params = dict(model.named_parameters())
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
        if not put:
            with pytest.raises(TypeError):
                torch.func.functional_call(model, model.state_dict(), (x,))
            return
        got = torch.func.functional_call(model, model.state_dict(), (x,))
    assert torch.equal(got, want)
    assert all(p is params[n] for n, p in model.named_parameters())
    runtime.set_scale(0.5)  # type: ignore[attr-defined]


@pytest.mark.parametrize("kind", ["plain", "wide"])
def test_functional_call_with_other_weights_computes_with_them(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Other values for the weights (an ensemble, a meta-learning step): the layers compute with
    them and the live adapter, as the float64 reference of those weights says; the model's own
    are back afterwards. An eager widened layer notices the weight is not its wide block and
    calls its base layer."""
    model, _ = _injected(monkeypatch, widened=kind == "wide")
    ab = {
        n: tuple(t.double() for t in v)
        for n, v in make_adapter(_model(), {"0": 4, "2": 2}, dtype=torch.float64)[1].items()
    }
    x = torch.randn(3, 8, dtype=torch.float64)
    other = {k: v + 0.25 for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
        got = torch.func.functional_call(model, other, (x,))
        shifted = _model()
        shifted.load_state_dict(other)
        want = _reference(nn.Sequential(*(_Base(m) for m in shifted)), ab, x)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
        assert torch.equal(model(x), before)


class _Base(nn.Module):
    """A plain module seen as a wrapper by :func:`_reference` (its ``base_layer`` is itself)."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.base_layer = module


@pytest.mark.parametrize("changed", ["0.weight", "2.bias"])
def test_functional_call_refuses_other_weights_in_merged_mode(changed: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A merged layer holds the adapter merged into its weight and bias: other values would
    compute without it. Refused with a typed error, and the model is as it was (parameters,
    output), also where the tensors before the refused one had been put in place (``2.bias``
    comes last: torch puts the others back through the wrapper, and the check lets them pass)."""
    model, _ = _injected(monkeypatch, widened=False, merged=True)
    params = dict(model.named_parameters())
    x = torch.randn(3, 8, dtype=torch.float64)
    other = {k: v + 0.25 if k == changed else v for k, v in model.state_dict().items()}
    layer, name = changed.split(".")
    with torch.no_grad():
        before = model(x)
        with pytest.raises(UsageError, match=rf"^{layer}: its base layer's {name} was replaced .*merged in"):
            torch.func.functional_call(model, other, (x,))
        assert torch.equal(model(x), before)
    assert all(p is params[n] for n, p in model.named_parameters())


class _Outer(nn.Module):
    """A plain layer loaded before the LoRA layers (``first``), then ``inner`` holding them."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(8, 8).double()
        self.inner = _model()


@pytest.mark.parametrize("called_on", ["model", "submodule"])
@pytest.mark.parametrize("guarded", [True, False], ids=["refused-up-front", "negative-control"])
def test_a_refused_assigned_load_loads_nothing(called_on: str, guarded: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """``load_state_dict(assign=True)`` that a wide layer refuses, on the model or on the
    container under it: the refusal names the layer and says nothing was loaded, and every
    parameter and buffer is the tensor it was, bitwise. ``first`` and ``inner.0`` come before
    the layer in torch's order. The negative control removes the up-front check: the layer's
    own hook still refuses, but only after torch loaded the modules before it."""
    from lorahot.runtime import assigned_loads

    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    model = _Outer()
    runtime = lorahot.inject(model, ["inner.2"], max_rank=4)
    runtime.load(make_adapter(model, {"inner.2": 4}, dtype=torch.float64)[0])
    if not guarded:  # the runtime's hooks out: only the layers' own are left
        for module in model.modules():
            for key in [k for k, h in module._load_state_dict_pre_hooks.items() if assigned_loads._is_check(h)]:
                del module._load_state_dict_pre_hooks[key]
    target = model if called_on == "model" else model.inner
    before = {k: (v, v.clone()) for k, v in target.state_dict(keep_vars=True).items()}
    first = (model.first.weight, model.first.weight.detach().clone())
    state = {k: v.detach().clone() + 1.0 for k, v in target.state_dict().items()}
    stopped = r"stopped at this layer" if not guarded else r"refused before it loaded anything"
    with pytest.raises(UsageError, match=rf"^inner\.2: its base layer's weight was replaced .*{stopped}"):
        target.load_state_dict(state, assign=True)
    now = target.state_dict(keep_vars=True)
    if guarded:
        for key, (tensor, value) in before.items():
            assert now[key] is tensor and torch.equal(now[key], value), key
        assert model.first.weight is first[0] and torch.equal(model.first.weight, first[1])
    else:  # what the up-front check prevents: the modules before the layer were loaded
        loaded = "inner.0.weight" if called_on == "model" else "0.weight"
        assert now[loaded] is not before[loaded][0] and torch.equal(now[loaded], before[loaded][1] + 1.0)
    runtime.set_scale(0.5)  # the runtime still serves


def test_eject_takes_the_load_hooks_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """After eject no module keeps the up-front check, and an assigned load takes every tensor."""
    from lorahot.runtime import assigned_loads

    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    model = _Outer()
    runtime = lorahot.inject(model, ["inner.0", "inner.2"], max_rank=4)
    hooked = [m for m in model.modules() if any(map(assigned_loads._is_check, m._load_state_dict_pre_hooks.values()))]
    assert {id(m) for m in hooked} == {id(model), id(model.inner)}
    runtime.eject()  # type: ignore[attr-defined]
    assert not any(any(map(assigned_loads._is_check, m._load_state_dict_pre_hooks.values())) for m in model.modules())
    old = model.state_dict(keep_vars=True)
    state = {k: v.detach().clone() + 1.0 for k, v in old.items()}
    model.load_state_dict(state, assign=True)
    for key, value in model.state_dict(keep_vars=True).items():
        assert value is not old[key] and torch.equal(value, state[key]), key


@pytest.mark.parametrize("wrapper", ["torch.compile", "a container"])
def test_a_refused_assigned_load_through_a_wrapper_made_after_inject_loads_nothing(
    wrapper: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A wrapper made after inject is not hooked (``torch.compile``'s keys start with
    ``_orig_mod.``): the model's own hook checks every layer where the load reaches it, so
    ``first``, loaded before the refusing layer, keeps its tensor."""
    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    model = _Outer()
    lorahot.inject(model, ["inner.2"], max_rank=4)
    outer = torch.compile(model) if wrapper == "torch.compile" else nn.Sequential(model)
    before = {k: (v, v.detach().clone()) for k, v in outer.state_dict(keep_vars=True).items()}
    state = {k: v.detach().clone() + 1.0 for k, v in outer.state_dict().items()}
    with pytest.raises(UsageError, match=r"^inner\.2: .*refused before it loaded anything"):
        outer.load_state_dict(state, assign=True)
    now = outer.state_dict(keep_vars=True)
    for key, (tensor, value) in before.items():
        assert now[key] is tensor and torch.equal(now[key], value), key


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("name", ["base_layer", "weight", "bias"])
def test_deleting_the_base_layer_or_its_weight_through_the_layer_is_refused(name: str, merged: bool) -> None:
    """``del model.fc.base_layer`` after inject went through: the model's state dict lost the
    layer's keys (a base checkpoint no longer loaded strictly), and eject, in merged mode every
    call too, raised ``UnexpectedError`` (``AttributeError``), leaving the layer in the model.
    ``del model.fc.weight`` raised torch's ``AttributeError`` on a weight reading gives. Each is
    a ``UsageError`` naming the layer, nothing deleted: the output and state dict bitwise, and
    eject gives the base model back."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 4)).double()
    base = copy.deepcopy(model)
    runtime = lorahot.inject(model, ["0", "2"], max_rank=4, merged=merged)
    runtime.load(make_adapter(model, dict.fromkeys(runtime.layers, 2), seed=1, dtype=torch.float64)[0])
    x = torch.randn(3, 8, dtype=torch.float64)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(x)
    with pytest.raises(UsageError, match=rf"^0: .*{name}.*(eject|0\.base_layer)"):
        delattr(model[0], name)
    with torch.no_grad():
        assert torch.equal(model(x), before)
    assert state.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    runtime.set_scale(0.5)
    lorahot.eject(model)
    assert type(model[0]) is nn.Linear
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in base.state_dict().items())
