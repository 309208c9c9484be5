"""The hooks a LoRA layer puts on itself and its base module (``lorahot.layers.base_guards``),
as pickles name them: a model saved with ``torch.save`` before they moved out of
``lorahot.layers.base`` names them there, and still loads."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

import lorahot
from lorahot.layers import base, base_guards
from tests.helpers import count_calls, make_adapter, tiny_lm, token_ids

#: what an injected model's pickle names: the layer's state-dict hooks and the base module's load hooks
_PICKLED = ("_BaseLoadHook", "_drop_base_prefix", "_add_base_prefix", "_report_base_keys")


def test_a_model_pickled_with_its_hooks_named_in_base_still_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pickled with every hook named ``lorahot.layers.base.<name>`` (as before they moved), the
    model loads: its output is the original's bitwise, its state dict keeps the base model's
    keys, and a base checkpoint loads into it (through the renaming hooks) to the original's
    weights."""
    model = tiny_lm(dtype=torch.float64)
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4)
    runtime.load(make_adapter(model, dict.fromkeys(runtime.layers, 4), seed=1, dtype=torch.float64)[0])
    ids = token_ids((2, 6), 32, seed=1)
    for name in _PICKLED:
        monkeypatch.setattr(getattr(base_guards, name), "__module__", "lorahot.layers.base")
    buffer = io.BytesIO()
    torch.save(model, buffer)
    monkeypatch.undo()
    saved = buffer.getvalue()
    for name in _PICKLED:
        assert f"lorahot.layers.base\n{name}\n".encode() in saved
        assert getattr(base, name) is getattr(base_guards, name)
    copy = torch.load(io.BytesIO(saved), weights_only=False)
    state = model.state_dict()
    with torch.no_grad():
        assert torch.equal(copy(ids), model(ids))
        assert list(copy.state_dict()) == list(state)
        for p in copy.parameters():
            p.zero_()
        copy.load_state_dict(state)
        assert all(torch.equal(copy.state_dict()[k], v) for k, v in state.items())
        assert torch.equal(copy(ids), model(ids))


def _stack(blocks: int) -> nn.Module:
    """``blocks`` blocks of two linears, a norm and an activation, injected."""
    torch.manual_seed(0)
    model = nn.Sequential(
        *[nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GELU(), nn.Linear(4, 4)) for _ in range(blocks)]
    )
    lorahot.inject(model, [f"{b}.{i}" for b in range(blocks) for i in (0, 3)], max_rank=2)
    return model


def test_state_dict_s_renaming_looks_at_each_layer_s_own_keys() -> None:
    """Each layer's hook renamed its base's keys by scanning the whole state dict saved so far
    (torch passes the model's one dict down the modules): the layers times the keys, so an
    SDXL-sized model's ``state_dict()`` took several times the base model's. It now looks at the
    layer's own keys, the last ones: four times the layers cost at most four times the calls,
    and the state dict is the base model's, keys and order."""
    count_calls(lambda: _stack(2).state_dict())  # first-call costs out of the counts
    small, large = _stack(8), _stack(32)
    assert count_calls(large.state_dict) <= 4 * count_calls(small.state_dict)
    model = _stack(3)
    torch.manual_seed(0)
    base = nn.Sequential(
        *[nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.GELU(), nn.Linear(4, 4)) for _ in range(3)]
    )
    state, expected = model.state_dict(), base.state_dict()
    assert list(state) == list(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
    assert list(model[1][0].state_dict()) == ["weight", "bias"]
    assert list(model.state_dict(prefix="m.")) == [f"m.{k}" for k in expected]


def _served(seed: int, merged: bool) -> tuple[nn.Module, lorahot.LoraRuntime]:
    """A float64 tiny LM with an adapter of ``seed`` on every q_proj and v_proj."""
    model = tiny_lm(dtype=torch.float64)
    runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=4, merged=merged)
    runtime.load(make_adapter(model, dict.fromkeys(runtime.layers, 3), seed=seed, dtype=torch.float64)[0])
    return model, runtime


def _arena(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.named_buffers() if "_lora_arena_" in k}


@pytest.mark.parametrize("passed", ["zeros", "another model's", "stacked ensemble"])
def test_functional_call_with_other_lora_buffers_is_refused_and_changes_nothing(passed: str) -> None:
    """``torch.func.functional_call`` with other tensors for the LoRA buffers (``named_buffers()``
    lists them; ``torch.func.stack_module_state`` stacks them): the layers compute with the views
    of their own arena, so the values were ignored, silently: a ``vmap`` ensemble of two injected
    models holding different adapters gave both members the first model's output (1.69 off the
    second's), and another model's parameters and buffers gave this model's adapter. Refused
    naming the layer and the buffer, every parameter and buffer bitwise as before (the same
    tensors), the output too, and the runtime still serves."""
    model, runtime = _served(1, merged=False)
    other, _ = _served(2, merged=False)
    ids = token_ids((2, 6), 32, seed=1)
    if passed == "zeros":
        zeros = {k: torch.zeros_like(v) for k, v in _arena(model).items()}
        call = lambda: torch.func.functional_call(model, zeros, ids)  # noqa: E731
    elif passed == "another model's":
        state = {**dict(other.named_parameters()), **_arena(other)}
        call = lambda: torch.func.functional_call(model, state, ids)  # noqa: E731
    else:
        params, buffers = torch.func.stack_module_state([model, other])  # type: ignore[arg-type]
        member = lambda p, b: torch.func.functional_call(model, (p, b), (ids,))  # noqa: E731
        call = lambda: torch.func.vmap(member)(params, buffers)  # noqa: E731
    kept = {k: (v, v.clone()) for k, v in [*model.named_parameters(), *model.named_buffers()]}
    with torch.no_grad():
        before = model(ids)
        with pytest.raises(
            lorahot.UsageError,
            match=r"^layers\.0\.self_attn\.q_proj: called with another tensor in place of its LoRA buffer "
            r"_lora_arena_A .*functional_call.*Leave the _lora_arena_\* keys out",
        ):
            call()
        assert torch.equal(model(ids), before)
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert now.keys() == kept.keys()
    for k, (tensor, values) in kept.items():
        assert now[k] is tensor and torch.equal(tensor, values), k
    runtime.set_scale(0.5)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_functional_call_with_the_model_s_own_lora_buffers_computes_what_the_model_does(merged: bool) -> None:
    """The model's own LoRA buffers passed back (``named_buffers()`` as they are, or detached: the
    same memory), also after ``model.float()`` moved them, compute what the model does, bitwise."""
    model, _ = _served(1, merged)
    ids = token_ids((2, 6), 32, seed=1)
    with torch.no_grad():
        for _ in range(2):
            want = model(ids)
            assert torch.equal(torch.func.functional_call(model, dict(model.named_buffers()), ids), want)
            detached = {k: v.detach() for k, v in _arena(model).items()}
            assert torch.equal(torch.func.functional_call(model, detached, ids), want)
            model.float()


def test_a_merged_ensemble_computes_each_member_with_its_own_weights() -> None:
    """Merged, the weights hold each model's adapter and no LoRA buffer is read: a ``vmap``
    ensemble of two merged models (``stack_module_state``, buffers included) gives each member
    its own model's output."""
    models = [_served(seed, merged=True)[0] for seed in (1, 2)]
    ids = token_ids((2, 6), 32, seed=1)
    params, buffers = torch.func.stack_module_state(models)  # type: ignore[arg-type]
    member = lambda p, b: torch.func.functional_call(models[0], (p, b), (ids,))  # noqa: E731
    with torch.no_grad():
        got = torch.func.vmap(member)(params, buffers)
        for i, model in enumerate(models):
            torch.testing.assert_close(got[i], model(ids), rtol=0, atol=1e-12)


def test_prune_applied_to_the_wrapper_is_refused_and_leaves_no_key_behind() -> None:
    """``torch.nn.utils.prune`` applied to the LoRA layer rather than its base registered the
    base weight on the wrapper as ``weight_orig``, then failed with torch's ``KeyError`` on the
    weight the wrapper does not hold: the model's state dict kept ``...q_proj.weight_orig``, so
    it no longer loaded into the base model strictly. Refused with a ``UsageError`` naming the
    layer and ``base_layer``, nothing registered (same parameters, buffers and state-dict keys,
    the output bitwise); applied to ``base_layer`` it prunes the base, under the live adapter."""
    import torch.nn.utils.prune as prune

    model, runtime = _served(1, merged=False)
    ids = token_ids((2, 6), 32, seed=1)
    layer = model.layers[0].self_attn.q_proj
    kept = {k: (v, v.clone()) for k, v in [*model.named_parameters(), *model.named_buffers()]}
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(ids)
        with pytest.raises(
            lorahot.UsageError, match=r"^layers\.0\.self_attn\.q_proj: a parameter 'weight_orig' .*base_layer"
        ):
            prune.l1_unstructured(layer, "weight", 0.5)
        assert torch.equal(model(ids), before)
    assert list(model.state_dict()) == keys
    now = dict([*model.named_parameters(), *model.named_buffers()])
    assert now.keys() == kept.keys() and all(now[k] is t and torch.equal(t, v) for k, (t, v) in kept.items())
    tiny_lm(dtype=torch.float64).load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(3, 16, dtype=torch.float64)
    with torch.no_grad():
        delta = layer(x) - x @ layer.base_layer.weight.T  # the live adapter's update
    prune.l1_unstructured(layer.base_layer, "weight", 0.5)
    with torch.no_grad():
        pruned = layer.base_layer.weight
        assert int((pruned == 0).sum()) == pruned.numel() // 2
        torch.testing.assert_close(layer(x), x @ pruned.T + delta, rtol=0, atol=1e-12)
    runtime.set_scale(0.5)


@pytest.mark.parametrize("compiled", ["the model", "the call"])
def test_functional_call_of_a_compiled_model_with_other_lora_buffers_is_refused_at_the_swap(compiled: str) -> None:
    """A compiled forward reads the arena through the global table, never the LoRA buffers, and
    the eager forward's test does not run there: ``functional_call`` of a compiled model (or a
    compiled ``functional_call``) with another model's buffers computed this model's adapter,
    1.69 off the other's, silently. The swap itself is refused (the layer's ``_buffers``:
    ``base_guards.ArenaBuffers``), torch puts back what it swapped, and nothing changed; the
    model's own buffers passed back compute what the model does."""
    model, runtime = _served(1, merged=False)
    other, _ = _served(2, merged=False)
    ids = token_ids((2, 6), 32, seed=1)
    state = {**dict(other.named_parameters()), **_arena(other)}
    if compiled == "the model":
        c = torch.compile(model, backend="eager")
        call = lambda s: torch.func.functional_call(c, s, ids)  # noqa: E731
    else:
        call = torch.compile(lambda s: torch.func.functional_call(model, s, ids), backend="eager")
    kept = {k: (v, v.clone()) for k, v in [*model.named_parameters(), *model.named_buffers()]}
    with torch.no_grad():
        before = model(ids)
        with pytest.raises(lorahot.UsageError, match=r"another tensor in place of its LoRA buffer _lora_arena_A"):
            call(state)
        assert torch.equal(model(ids), before)
        assert torch.equal(call(dict(model.named_buffers())), before)
    now = dict([*model.named_parameters(), *model.named_buffers()])
    for k, (tensor, values) in kept.items():
        assert now[k] is tensor and torch.equal(tensor, values), k
    runtime.set_scale(0.5)
