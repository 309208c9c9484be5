"""The release of lorahot's hooks at eject (lorahot/runtime/hooked.py): each module is looked
at once, and a module is released exactly when no LoRA layer is left under it."""

from __future__ import annotations

import sys
from typing import Any

import pytest
import torch
from torch import nn

import lorahot
from lorahot.runtime import assigned_loads
from lorahot.runtime.hooked import Hooked


def _blocks(blocks: int) -> tuple[nn.Module, list[str]]:
    """``blocks`` blocks of two linears each, among other modules a few levels deep."""
    torch.manual_seed(0)

    def block() -> nn.Module:
        return nn.ModuleDict(
            {
                "norm": nn.LayerNorm(4),
                "attn": nn.ModuleDict({"q": nn.Linear(4, 4), "drop": nn.Dropout(0.0)}),
                "mlp": nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.Sequential(nn.ReLU(), nn.Identity())),
            }
        )

    model = nn.Sequential(nn.ModuleDict({"blocks": nn.ModuleList([block() for _ in range(blocks)])}))
    return model, [f"0.blocks.{b}.{p}" for b in range(blocks) for p in ("attn.q", "mlp.0")]


def _walks(monkeypatch: pytest.MonkeyPatch, blocks: int, eject: str) -> int:
    """How many walks of a module's descendants (``named_modules``, and ``modules`` through it,
    not counting torch's own recursion into the children) one eject of a model of ``blocks``
    blocks makes."""
    model, names = _blocks(blocks)
    runtime = lorahot.inject(model, names, max_rank=2)
    real = nn.Module.named_modules
    count = 0

    def counted(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        nonlocal count
        count += sys._getframe(1).f_code is not real.__code__  # a walk's step into a child is no walk
        return real(self, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "named_modules", counted)
    runtime.eject() if eject == "runtime.eject" else lorahot.eject(model)
    monkeypatch.setattr(nn.Module, "named_modules", real)
    assert not [n for n, m in model.named_modules() if isinstance(m, lorahot.LoRALayer)]
    return count


@pytest.mark.parametrize("eject", ["runtime.eject", "lorahot.eject"])
def test_eject_walks_the_model_as_often_whatever_its_size(monkeypatch: pytest.MonkeyPatch, eject: str) -> None:
    """The release of the hooks asked every module of the model whether a LoRA layer is left
    under it by a walk of its own descendants, for each of four hooks: a walk per module, so the
    modules times their depth (an SDXL UNet's eject walked its modules about ten times over).
    Each module is now looked at once per release."""
    assert _walks(monkeypatch, 4, eject) == _walks(monkeypatch, 16, eject)


def _hooked(model: nn.Module) -> set[str]:
    """The modules holding the assigned-load check (:mod:`lorahot.runtime.assigned_loads`)."""
    return {
        n
        for n, m in model.named_modules()
        if any(assigned_loads._is_check(h) for h in m._load_state_dict_pre_hooks.values())
    }


def test_a_module_is_released_exactly_when_no_lora_layer_is_left_under_it() -> None:
    """Two runtimes in one model: ejecting one releases the modules holding only its layers and
    keeps the hooks of those on the way to the other's; the second eject releases the rest."""
    model, names = _blocks(3)
    first = lorahot.inject(model, names[:2], max_rank=2)  # block 0
    second = lorahot.inject(model, names[4:], max_rank=2)  # block 2
    assert {"", "0", "0.blocks", "0.blocks.0", "0.blocks.2"} <= _hooked(model)
    first.eject()
    assert "0.blocks.0" not in _hooked(model) and {"", "0", "0.blocks", "0.blocks.2"} <= _hooked(model)
    second.eject()
    assert _hooked(model) == set()


def test_a_module_under_itself_is_answered_by_walks() -> None:
    """A module placed under itself (a cycle torch's ``modules()`` walks once each): the
    release answers as the walk does and ends."""
    released = []
    outer = nn.Sequential(nn.Sequential(nn.Linear(2, 2)))
    outer[0].append(outer)  # outer -> outer[0] -> outer
    hooks = Hooked()
    hooks.add(outer[0])
    hooks.release([outer], released.append)
    assert released == [outer, outer[0]]
