"""A block wrapped before inject (``torch.compile``, activation checkpointing) puts a wrapper level
inside its layers' paths; a file names them without it, or with it where it was saved from the
wrapped model: both load onto the layer (:mod:`lorahot.resolve.file_names`)."""

from __future__ import annotations

import collections
import copy

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

import lorahot
from lorahot.resolve.file_names import file_name
from tests.helpers import (
    assert_swaps_without_recompile,
    make_adapter,
    model_reference,
    reference,
    tiny_lm,
    token_ids,
)

_LAYER = "layers.0.self_attn.q_proj"


def _wrapped(model: nn.Module, wrapper: str) -> str:
    """``model.layers[0]`` wrapped before inject; the wrapper's level."""
    if wrapper == "compile":
        model.layers[0] = torch.compile(model.layers[0])
        return "_orig_mod"
    block = model.layers[0]
    apply_activation_checkpointing(model, check_fn=lambda m: m is block)
    return "_checkpoint_wrapped_module"


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().clone() for n, t in [*model.named_parameters(), *model.named_buffers()]}


def test_a_file_name_drops_every_wrapper_level() -> None:
    assert file_name("_orig_mod.layers.0._checkpoint_wrapped_module._orig_mod.q") == "layers.0.q"
    assert file_name("layers.0._orig_mod_x.q") == "layers.0._orig_mod_x.q"  # whole levels only
    # with the model's wrapper levels known, only those: a module merely named so stays
    assert file_name("a._orig_mod.b._orig_mod.c", frozenset({"a._orig_mod"})) == "a.b._orig_mod.c"
    assert file_name("blk._checkpoint_wrapped_module.proj", frozenset()) == "blk._checkpoint_wrapped_module.proj"


@pytest.mark.parametrize("spelled", ["unwrapped", "wrapped"], ids=["file of the model", "file of the wrapped model"])
@pytest.mark.parametrize("wrapper", ["compile", "checkpoint"])
def test_a_block_wrapped_before_inject_takes_a_file_in_the_models_names(wrapper: str, spelled: str) -> None:
    """A block compiled (or checkpoint-wrapped) before inject named its layers
    ``layers.0._orig_mod.self_attn.q_proj``, and key matching skipped wrapper levels only at the front
    of a path, so a file in the model's own names (``layers.0.self_attn.q_proj``) was refused as
    matching no injected layer. Either spelling now lands on that layer, named by its path: the
    float64 reference, every other parameter and buffer bitwise unchanged."""
    model = tiny_lm(layers=2)
    plain = copy.deepcopy(model)
    tensors, ab = make_adapter(model, {_LAYER: 2})
    level = _wrapped(model, wrapper)
    path = _LAYER.replace("layers.0.", f"layers.0.{level}.")
    if spelled == "wrapped":
        tensors = {k.replace("layers.0.", f"layers.0.{level}."): t for k, t in tensors.items()}
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4)
    before = _state(model)
    info = runtime.load(tensors)
    assert set(info.ranks) == {path} and path in runtime.layers
    after = _state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(t, before[n]) for n, t in after.items() if not n.startswith(path + "."))
    x = torch.randn(3, 16)
    a, b = ab[_LAYER]
    with torch.no_grad():
        got = model.get_submodule(path)(x)
    want = reference(plain.get_submodule(_LAYER), x, a, b, 1.0)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


class _Holder(nn.Module):
    """A module of the model's own with a child named as a wrapper's level (an ordinary attribute,
    no wrapper), holding ``proj`` under it and, with ``own``, beside it."""

    def __init__(self, level: str, own: bool) -> None:
        super().__init__()
        if own:
            self.proj = nn.Linear(4, 4)
        self.add_module(level, nn.Module())
        self._modules[level].proj = nn.Linear(4, 4)
        self.level = level

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inner = self._modules[self.level].proj(x)
        return inner + self.proj(x) if hasattr(self, "proj") else inner


@pytest.mark.parametrize("level", ["_orig_mod", "_checkpoint_wrapped_module"])
def test_a_module_of_the_models_own_named_as_a_wrapper_level_keeps_its_level_as_peft_does(level: str) -> None:
    """A module of the model's own merely named ``_orig_mod`` (an attribute of an ordinary module,
    no torch.compile) was taken for a wrapper level and dropped from its layers' file names: beside
    ``blk.proj``, PEFT's key ``blk.proj`` was refused as ambiguous with ``blk._orig_mod.proj``, and
    without it that key landed on ``blk._orig_mod.proj``. PEFT names that layer
    ``blk._orig_mod.proj`` (its saved keys) and places ``blk.proj`` on ``blk.proj`` or nowhere. A level
    is now a wrapper's only under a wrapper (:func:`wrapper_levels`): PEFT's file loads at PEFT's
    output, and a ``blk.proj`` without such a layer is refused, nothing changed."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("blk", _Holder(level, own=True))
    plain = copy.deepcopy(model)
    config = peft.LoraConfig(r=2, lora_alpha=2, target_modules=["proj"], init_lora_weights=False)
    oracle = peft.get_peft_model(copy.deepcopy(model), config).double()
    saved = peft.get_peft_model_state_dict(oracle)
    if level == "_checkpoint_wrapped_module" and len({k.rsplit(".lora_", 1)[0] for k in saved}) == 1:
        # PEFT 0.22 drops a level named as torch's checkpoint wrapper names one wherever it stands,
        # so its file holds one of the two layers under ``blk.proj``: its saved keys cannot be the
        # oracle's names here. Its model still computes both layers; PEFT 0.21 saved them thus.
        saved = {n.replace(".default.", "."): p.detach() for n, p in oracle.named_parameters() if ".lora_" in n}
    assert {k.rsplit(".lora_", 1)[0] for k in saved} == {
        "base_model.model.blk.proj",
        f"base_model.model.blk.{level}.proj",
    }
    runtime = lorahot.inject(model, ["proj"], max_rank=2)
    assert set(runtime.load(saved).ranks) == {"blk.proj", f"blk.{level}.proj"}
    x = torch.randn(3, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x.float()).double(), oracle(x), rtol=1e-5, atol=1e-5)
    runtime.unload()
    one = {k.removeprefix("base_model.model."): t for k, t in saved.items() if f".{level}." not in k}
    assert set(runtime.load(one).ranks) == {"blk.proj"}  # not ambiguous: the model's own blk.proj
    with torch.no_grad():
        a, b = (one[f"blk.proj.lora_{r}.weight"].double() for r in "AB")
        want = reference(plain.blk.proj, x, a, b, 1.0) + plain.blk._modules[level].proj.double()(x)
        torch.testing.assert_close(model(x.float()).double(), want, rtol=1e-5, atol=1e-5)
    alone = nn.Sequential()
    alone.add_module("blk", _Holder(level, own=False))
    runtime = lorahot.inject(alone, ["proj"], max_rank=2)
    before = _state(alone)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"  - blk\.proj: matches no injected layer"):
        runtime.load(one)
    after = _state(alone)
    assert after.keys() == before.keys() and all(torch.equal(t, before[n]) for n, t in after.items())
    with pytest.raises(lorahot.AdapterMismatchError, match=r"  - blk\.proj: matches no injected layer"):
        lorahot.plan_targets(one, nn.Sequential(collections.OrderedDict(blk=_Holder(level, own=False))))


@pytest.mark.slow  # 5 s: a compiled model
def test_a_block_checkpointed_before_inject_swaps_without_recompile_once_compiled() -> None:
    """The model compiled after inject (its block checkpoint-wrapped before) takes a file in the
    model's names, and a swap of it, without a recompile."""
    model = tiny_lm(layers=2)
    plain = copy.deepcopy(model)
    first, ab1 = make_adapter(model, {_LAYER: 2}, seed=1)
    second, ab2 = make_adapter(model, {_LAYER: 2}, seed=2)
    _wrapped(model, "checkpoint")
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4)
    ids = token_ids((2, 5), 32)
    swaps = [
        (t, model_reference(plain, ids, {_LAYER: (*ab[_LAYER], 1.0)}).float())
        for t, ab in ((first, ab1), (second, ab2))
    ]
    assert_swaps_without_recompile(runtime, model, ids, swaps, 1e-4)


@pytest.mark.parametrize("level", ["_orig_mod", "_checkpoint_wrapped_module"])
def test_a_file_saved_from_a_wrapped_model_loads_onto_the_unwrapped_one(level: str) -> None:
    """A file saved from a model whose block was wrapped (``layers.0._orig_mod.self_attn.q_proj``) names
    the same layer of the model unwrapped: it lands there, at the float64 reference."""
    model = tiny_lm(layers=2)
    plain = copy.deepcopy(model)
    tensors, ab = make_adapter(model, {_LAYER: 2})
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4)
    info = runtime.load({k.replace("layers.0.", f"layers.0.{level}."): t for k, t in tensors.items()})
    assert set(info.ranks) == {_LAYER}
    x = torch.randn(3, 16)
    with torch.no_grad():
        got = model.get_submodule(_LAYER)(x)
    torch.testing.assert_close(
        got.double(), reference(plain.get_submodule(_LAYER), x, *ab[_LAYER], 1.0), rtol=1e-5, atol=1e-5
    )


def test_a_file_without_wrapper_levels_pays_nothing_for_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each key was also tried without wrapper levels of its own, :func:`file_name` of each of its
    candidates: about 1.5 us a key, 30 ms of a 20,000-key file that has none (5-8% of its
    matching). A key without a wrapper level's name is now tried as it is only; one with it still
    lands on the unwrapped layer (``test_a_file_saved_from_a_wrapped_model_loads_onto_the_unwrapped_one``)."""
    from lorahot.resolve import keys
    from lorahot.resolve.file_names import WRAPPER_LEVELS, may_hold_wrapper

    assert all(may_hold_wrapper(f"a.{level}.b") for level in WRAPPER_LEVELS)
    calls: list[str] = []
    monkeypatch.setattr(keys, "file_name", lambda path, levels=None: calls.append(path) or file_name(path, levels))
    names = [f"model.layers.{i}.mlp.proj_{j}" for i in range(300) for j in range(7)]
    a, b = torch.zeros(1, 1), torch.zeros(1, 1)
    for fmt, key in (("peft", "base_model.model.{}"), ("kohya", "lora_unet_{}")):
        spelled = [key.format(n if fmt == "peft" else n.replace(".", "_")) for n in names]
        adapter = lorahot.Adapter({k: lorahot.LoraModule(k, a, b, 1.0) for k in spelled}, fmt, "<mapping>")
        assert set(keys.resolve_keys(adapter, names)) == set(names)
    assert calls == []
