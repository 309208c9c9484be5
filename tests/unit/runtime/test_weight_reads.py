"""Modules whose weight the model's code reads instead of calling them
(:mod:`lorahot.runtime.weight_reads`): refused as targets where nothing calls them, refused in
merged mode wherever such a read runs, and metadata reads left alone."""

from __future__ import annotations

import ast
import copy
import functools
import inspect
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorahot
from lorahot.runtime import weight_reads
from lorahot.runtime.weight_reads import class_uses
from tests.helpers import make_adapter, model_reference


class _ReadHead(nn.Module):
    """Computes with ``proj``'s weight and never calls it (as MobileBERT's prediction head)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self._project(x))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.proj.weight.T


class _ReadByAnotherName(nn.Module):
    """As :class:`_ReadHead`, its methods naming their instance otherwise than ``self`` (the
    language allows any name for the first parameter)."""

    def __init__(this) -> None:
        super().__init__()
        this.proj = nn.Linear(8, 6)
        this.out = nn.Linear(6, 4)

    def forward(me, x: torch.Tensor) -> torch.Tensor:
        return me.out(me._project(x))

    def _project(module, x: torch.Tensor) -> torch.Tensor:
        return x @ module.proj.weight.T


def _convolve(conv: nn.Conv1d, x: torch.Tensor) -> torch.Tensor:
    return F.conv1d(x, conv.weight, conv.bias, padding=1)


class _Handed(nn.Module):
    """Hands ``conv`` to a function that computes with its weight (as the Mamba mixers)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(8, 8, 3)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(_convolve(self.conv, x.transpose(1, 2)).transpose(1, 2))


class _OnePath(nn.Module):
    """Calls ``proj`` on one path and computes with its weight on the other (Jamba's dt_proj)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4)
        self.quantized = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x) if self.quantized else x @ self.proj.weight.T + self.proj.bias
        return self.out(h)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class _TiedHead(nn.Module):
    """Calls ``block.proj`` through ``block``, and computes its head with that weight."""

    def __init__(self) -> None:
        super().__init__()
        self.block = _Block()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block(x) @ self.block.proj.weight


class _Described(nn.Module):
    """Reads only what describes ``proj``'s weight."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.proj.weight, torch.Tensor) and self.proj.weight is not None:
            x = x.to(device=self.proj.weight.device, dtype=self.proj.weight.dtype)
        assert self.proj.weight.shape[1] == x.shape[-1]
        return self.proj(x)


def _traced(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return method(*args, **kwargs)

    return wrapper


class _Decorated(nn.Module):
    """A decorated forward that reaches a read through a helper method."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(8, 6)
        self.out = nn.Linear(6, 4)

    @_traced
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self._project(x))

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.proj.weight.T


def _x() -> torch.Tensor:
    return torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(1))


def _run(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(_x())


@pytest.mark.parametrize(
    ("build", "target", "where"),
    [
        (_ReadHead, "proj", r"_ReadHead\._project reads self\.proj\.weight"),
        (_ReadByAnotherName, "proj", r"_ReadByAnotherName\._project reads self\.proj\.weight"),
        (_Handed, "conv", r"_Handed\.forward"),
    ],
    ids=["read", "another-name", "handed"],
)
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_a_module_whose_weight_is_read_and_never_called_is_refused(build, target: str, where: str, merged) -> None:
    """A LoRA there never applies unmerged (nor PEFT's), and merged it would: MobileBERT's
    all-linear adapter merged was 1.58 off PEFT's logits (rel. 3.1), WavLM's q/v/out_proj 0.15."""
    torch.manual_seed(0)
    model = build().eval()
    before = _run(model)
    with pytest.raises(lorahot.UsageError, match=where + r".* and nothing on its path calls it, so a LoRA there"):
        lorahot.inject(model, [target, "out"], max_rank=4, merged=merged)
    assert not any(isinstance(m, lorahot.LoRALayer) for m in model.modules())
    assert torch.equal(_run(model), before)


def test_all_linear_leaves_out_a_linear_whose_weight_is_read_and_never_called() -> None:
    torch.manual_seed(0)
    runtime = lorahot.inject(_ReadHead().eval(), "all-linear", max_rank=4)
    assert list(runtime.layers) == ["out"]


@pytest.mark.parametrize(
    ("build", "target", "where"),
    [(_OnePath, "proj", r"_OnePath\.forward reads self\.proj\.weight"), (_TiedHead, "block.proj", r"_TiedHead")],
    ids=["other-path", "ancestor"],
)
def test_merged_mode_refuses_a_target_whose_weight_is_read_besides_its_calls(build, target: str, where: str) -> None:
    """Unmerged the LoRA applies where the module is called only (as PEFT's); merged it would
    reach the read too (Jamba's dt_proj: 0.16 off PEFT's logits). Merged inject refuses it,
    unmerged computes the float64 reference of a LoRA added at the call."""
    torch.manual_seed(0)
    base = build().eval()
    merged = copy.deepcopy(base)
    before = _run(merged)
    with pytest.raises(lorahot.UsageError, match=where + r".*merged mode would fold it in"):
        lorahot.inject(merged, [target], max_rank=4, merged=True)
    assert not any(isinstance(m, lorahot.LoRALayer) for m in merged.modules())
    assert torch.equal(_run(merged), before)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, [target], max_rank=4)
    tensors, ab = make_adapter(model, {target: 2}, seed=3)
    runtime.load(tensors)
    lora = {target: (*ab[target], 1.0)}  # the reference adds it where the module is called
    torch.testing.assert_close(_run(model).double(), model_reference(base, _x(), lora), rtol=1e-5, atol=1e-6)
    if isinstance(base, _OnePath):  # the path that calls it
        model.quantized = base.quantized = True
        torch.testing.assert_close(_run(model).double(), model_reference(base, _x(), lora), rtol=1e-5, atol=1e-6)
        assert not torch.allclose(_run(model), _run(base))


def test_reads_of_what_describes_a_weight_are_not_reads() -> None:
    """dtype, device, shape, isinstance and ``is None`` tests do not compute with the weight."""
    assert not class_uses(_Described).reads
    assert "proj" in class_uses(_Described).calls
    torch.manual_seed(0)
    base = _Described().eval()
    for merged in (False, True):
        model = copy.deepcopy(base)
        runtime = lorahot.inject(model, ["proj"], max_rank=4, merged=merged)
        tensors, ab = make_adapter(model, {"proj": 2}, seed=3)
        runtime.load(tensors)
        want = model_reference(base, _x(), {"proj": (*ab["proj"], 1.0)})
        torch.testing.assert_close(_run(model).double(), want, rtol=1e-5, atol=1e-6)


def test_a_method_is_parsed_from_its_own_lines_not_its_whole_file(monkeypatch) -> None:
    """A model's file may hold thousands of lines never on a target's path: parsing diffusers'
    attention_processor.py whole took 0.3-0.5 s of an SDXL UNet's first inject."""
    parsed: list[int] = []
    parse = ast.parse

    def counted(source: str, *args: Any, **kwargs: Any) -> ast.AST:
        parsed.append(len(source))
        return parse(source, *args, **kwargs)

    monkeypatch.setattr(weight_reads.ast, "parse", counted)
    uses = class_uses(_Decorated)
    assert dict(uses.reads) == {"proj": "_Decorated._project"}
    assert {"out", "_project"} <= uses.calls
    assert parsed and max(parsed) < len(inspect.getsource(sys.modules[__name__])) // 4
