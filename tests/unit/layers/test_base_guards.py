"""The hooks a LoRA layer puts on itself and its base module (``lorahot.layers.base_guards``),
as pickles name them: a model saved with ``torch.save`` before they moved out of
``lorahot.layers.base`` names them there, and still loads."""

from __future__ import annotations

import io

import pytest
import torch

import lorahot
from lorahot.layers import base, base_guards
from tests.helpers import make_adapter, tiny_lm, token_ids

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
