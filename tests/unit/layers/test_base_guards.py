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
