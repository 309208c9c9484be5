"""Merged mode and the caller's code a runtime call runs: an argument's ``__index__``,
``__float__``, ``__len__`` or ``__getitem__``, a path's ``__fspath__``, a mapping's methods, a
tensor subclass's ``__torch_function__``. Such code may replace a targeted base weight; the call
must then refuse exactly as the next call refuses a weight replaced between two calls, with the
caller's tensor kept and everything else bitwise as it was, wherever in the call the code runs
(its first run, or its last)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorahot
import lorahot.runtime.merge

Hook = Callable[[], None]
Call = Callable[[lorahot.LoraRuntime, Hook, Path], object]


class _Int(int):
    hook: Hook

    def __index__(self) -> int:
        self.hook()
        return int.__int__(self)

    def __int__(self) -> int:
        self.hook()
        return int.__int__(self)


class _Float(float):
    hook: Hook

    def __float__(self) -> float:
        self.hook()
        return float.__float__(self)


class _Seq(Sequence[Any]):
    def __init__(self, values: list[Any], hook: Hook) -> None:
        self.values, self.hook = values, hook

    def __len__(self) -> int:
        self.hook()
        return len(self.values)

    def __getitem__(self, i: Any) -> Any:
        self.hook()
        return self.values[i]


class _Map(Mapping[str, torch.Tensor]):
    def __init__(self, values: dict[str, Any], hook: Hook) -> None:
        self.values, self.hook = values, hook

    def __getitem__(self, key: str) -> Any:
        self.hook()
        return self.values[key]

    def __iter__(self) -> Iterator[str]:
        self.hook()
        return iter(self.values)

    def __len__(self) -> int:
        self.hook()
        return len(self.values)


class _Path(os.PathLike[str]):
    def __init__(self, path: Path, hook: Hook) -> None:
        self.path, self.hook = path, hook

    def __fspath__(self) -> str:
        self.hook()
        return str(self.path)


class _Tensor(torch.Tensor):
    hooks: ClassVar[list[Hook]] = []

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        for hook in cls.hooks:
            hook()
        return super().__torch_function__(func, types, args, kwargs or {})


def _int(v: int, hook: Hook) -> _Int:
    out = _Int(v)
    out.hook = hook
    return out


def _float(v: float, hook: Hook) -> _Float:
    out = _Float(v)
    out.hook = hook
    return out


def _tensor(t: torch.Tensor, hook: Hook) -> torch.Tensor:
    _Tensor.hooks[:] = [hook]
    return t.clone().as_subclass(_Tensor)


def _adapter(seed: int, names: tuple[str, ...] = ("0", "1")) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {f"{n}.lora_A.weight": torch.randn(2, 8, dtype=torch.float64, generator=gen) for n in names}
    out |= {f"{n}.lora_B.weight": torch.randn(8, 2, dtype=torch.float64, generator=gen) for n in names}
    return out


def _hand_built(seed: int, hook: Hook) -> lorahot.Adapter:
    read = lorahot.read_adapter(_adapter(seed))
    modules = {k: dataclasses.replace(m, A=_tensor(m.A, hook), B=_tensor(m.B, hook)) for k, m in read.modules.items()}
    return dataclasses.replace(read, modules=modules)


def _saved(tmp: Path) -> Path:
    path = tmp / "adapter.safetensors"
    if not path.exists():
        save_file(_adapter(5), str(path))
    return path


#: each entry point, given the caller's code (``hook``) to run inside an argument
CALLS: dict[str, Call] = {
    "activate(int)": lambda rt, h, _: rt.activate(_int(1, h)),
    "activate(sequence)": lambda rt, h, _: rt.activate(_Seq([1, 1], h)),
    "activate([int, int])": lambda rt, h, _: rt.activate([_int(1, h), _int(1, h)]),
    "activate(tensor subclass)": lambda rt, h, _: rt.activate(_tensor(torch.tensor([1, 1]), h)),
    "activate(rows, lengths=sequence)": lambda rt, h, _: rt.activate([1, 1], lengths=_Seq([2, 3], h)),
    "activate(rows, lengths=tensor subclass)": lambda rt, h, _: rt.activate(
        [1, 1], lengths=_tensor(torch.tensor([2, 3]), h)
    ),
    "set_scale(float)": lambda rt, h, _: rt.set_scale(_float(0.5, h)),
    "set_scale([float])": lambda rt, h, _: rt.set_scale([_float(0.5, h)]),
    "set_scale(sequence)": lambda rt, h, _: rt.set_scale(_Seq([0.5], h)),
    "set_scale(slot=int)": lambda rt, h, _: rt.set_scale(0.5, slot=_int(0, h)),
    "unload(int)": lambda rt, h, _: rt.unload(_int(0, h)),
    "load(mapping)": lambda rt, h, _: rt.load(_Map(_adapter(3), h)),
    "load(slot=int)": lambda rt, h, _: rt.load(_adapter(3), slot=_int(0, h)),
    "load(scale=float)": lambda rt, h, _: rt.load(_adapter(3), scale=_float(0.5, h)),
    "load(path)": lambda rt, h, tmp: rt.load(_Path(_saved(tmp), h)),
    "load(dict of tensor subclasses)": lambda rt, h, _: rt.load({k: _tensor(v, h) for k, v in _adapter(3).items()}),
    "load(hand-built Adapter of tensor subclasses)": lambda rt, h, _: rt.load(_hand_built(3, h)),
    "load(key_map=mapping)": lambda rt, h, _: rt.load(_adapter(3), key_map=_Map({}, h)),
    "load(config=mapping)": lambda rt, h, _: rt.load(_adapter(3), config=_Map({"r": 2, "lora_alpha": 4}, h)),
    "load([mapping, dict]) (a stack)": lambda rt, h, _: rt.load([_Map(_adapter(3), h), _adapter(4)]),
    "load([dict, dict], scale=sequence)": lambda rt, h, _: rt.load(
        [_adapter(3), _adapter(4)], scale=_Seq([1.0, 0.5], h)
    ),
}

#: entry points of a runtime over several models (a pipeline's components)
COMPONENT_CALLS: dict[str, Call] = {
    "activate(int)": CALLS["activate(int)"],
    "set_scale(float)": CALLS["set_scale(float)"],
    "load(mapping)": lambda rt, h, _: rt.load(_Map(_adapter(3, ("unet.0", "text_encoder.0")), h)),
}


def _runtime(components: bool) -> tuple[nn.Module, lorahot.LoraRuntime]:
    """A merged runtime of two slots, each holding an adapter, slot 0 active; and the module
    whose base weight the caller's code replaces."""
    torch.manual_seed(0)
    if not components:
        model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)).double()
        rt = lorahot.inject(model, ["0", "1"], max_rank=4, merged=True, slots=2)
        rt.load(_adapter(1), slot=0)
        rt.load(_adapter(2), slot=1)
        return model[0], rt
    models = {"unet": nn.Sequential(nn.Linear(8, 8)).double(), "text_encoder": nn.Sequential(nn.Linear(8, 8)).double()}
    rt = lorahot.inject(models, {"unet": ["0"], "text_encoder": ["0"]}, max_rank=4, merged=True, slots=2)
    names = ("unet.0", "text_encoder.0")
    rt.load(_adapter(1, names), slot=0)
    rt.load(_adapter(2, names), slot=1)
    return models["unet"][0], rt


def _state(rt: lorahot.LoraRuntime) -> dict[str, object]:
    """Every parameter and buffer of the runtime's layers (their arenas included), each layer's
    copy of its base weight and bias of inject, and what the runtime says it serves."""
    found: dict[str, object] = {}
    for name, layer in rt.layers.items():
        for key, t in [*layer.named_parameters(), *layer.named_buffers()]:
            found[f"{name}.{key}"] = t.detach().clone()
        found[f"{name}.pristine"] = (layer.pristine_weight.clone(), layer.pristine_bias)
    found["served"] = (rt.active_slot, rt.routing, [rt.info(s) for s in range(rt.slots)])
    return found


def _same(a: object, b: object) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _run(call: Call, components: bool, at: int | None, tmp: Path) -> tuple[nn.Module, lorahot.LoraRuntime, dict]:
    """``call`` on a fresh runtime, whose argument replaces the module's base weight with zeros
    (``.data =``) at the ``at``-th time the runtime runs its code (never where None); the
    module, the runtime and what happened (``count``: the runs, ``user``: the tensor put there,
    ``error``: what the call raised, ``before``: the runtime's state before the call)."""
    module, rt = _runtime(components)
    seen: dict[str, Any] = {"count": 0, "user": None, "error": None, "before": _state(rt)}

    def hook() -> None:
        seen["count"] += 1
        if seen["count"] == at:
            user = torch.zeros(8, 8, dtype=torch.float64)
            with torch.no_grad():
                module.base_layer.weight.data = user
            seen["user"] = user

    try:
        call(rt, hook, tmp)
    except lorahot.LoraError as exc:
        seen["error"] = exc
    finally:
        _Tensor.hooks[:] = []
    return module, rt, seen


def _between_calls(components: bool) -> lorahot.LoraError:
    """What a call refuses where the weight was replaced between two calls."""
    module, rt = _runtime(components)
    with torch.no_grad():
        module.base_layer.weight.data = torch.zeros(8, 8, dtype=torch.float64)
    with pytest.raises(lorahot.LoraError) as refused:
        rt.set_scale(0.5)
    return refused.value


@pytest.mark.parametrize("when", ["first", "last"])
@pytest.mark.parametrize(
    "components, name",
    [(False, name) for name in CALLS] + [(True, name) for name in COMPONENT_CALLS],
    ids=list(CALLS) + [f"components {name}" for name in COMPONENT_CALLS],
)
def test_a_merged_call_whose_argument_replaces_a_weight_refuses_as_the_next_call_would(
    components: bool, name: str, when: str, tmp_path: Path
) -> None:
    call = (COMPONENT_CALLS if components else CALLS)[name]
    _, _, counted = _run(call, components, None, tmp_path)
    assert counted["error"] is None  # the argument serves as one: the call goes through
    if not counted["count"]:  # none of the caller's code runs (a subclass's tensors read as plain ones)
        return
    module, rt, seen = _run(call, components, 1 if when == "first" else counted["count"], tmp_path)
    want = _between_calls(components)
    error = seen["error"]
    assert seen["user"] is not None
    assert type(error) is type(want) and str(error) == str(want), f"{name}: {error!r}"
    # the caller's tensor is there as the caller left it, and nothing else changed
    weight = module.base_layer.weight
    assert weight.data_ptr() == seen["user"].data_ptr() and not weight.any()
    after, before, replaced = _state(rt), seen["before"], f"{_name(rt, module)}.base_layer.weight"
    assert replaced in before
    assert [k for k in before if k != replaced and not _same(before[k], after[k])] == []
    # and the next call refuses the same
    with pytest.raises(type(want)) as again:
        rt.set_scale(1.0)
    assert str(again.value) == str(want)


def _name(rt: lorahot.LoraRuntime, module: nn.Module) -> str:
    """The runtime's name of the layer ``module`` is."""
    return next(name for name, layer in rt.layers.items() if layer is module)


def test_an_int_whose_conversion_zeroes_a_weight_is_refused_and_the_zeros_kept() -> None:
    module, rt = _runtime(False)
    zeros = torch.zeros(8, 8, dtype=torch.float64)

    class Sneaky(int):
        def __int__(self) -> int:  # what int() calls (an __index__ alone is never called: int() reads the int)
            with torch.no_grad():
                module.base_layer.weight.data = zeros
            return 1

        __index__ = __int__

    with pytest.raises(lorahot.UsageError, match=r"changed since lorahot last wrote them .*:\n  - 0\n"):
        rt.activate(Sneaky(1))
    assert rt.active_slot == 0
    with pytest.raises(lorahot.UsageError, match=r"changed since lorahot last wrote them .*:\n  - 0\n"):
        rt.set_scale(0.5)
    assert module.base_layer.weight.data_ptr() == zeros.data_ptr() and not zeros.any()


@pytest.mark.parametrize(
    "call",
    [
        lambda rt: rt.set_scale(0.25),
        lambda rt: rt.activate(1),
        lambda rt: rt.activate([1, 1]),
        lambda rt: rt.load(_adapter(3), slot=0),
        lambda rt: rt.unload(0),
    ],
    ids=["set_scale", "activate", "activate(rows)", "load", "unload"],
)
def test_a_merged_call_lays_out_the_weights_once(
    call: Callable[[lorahot.LoraRuntime], object], monkeypatch: Any
) -> None:
    """The check's signature of the weights is the rewrite's: one walk over every layer's
    weight and bias a call."""
    _, rt = _runtime(False)
    walks = []
    signature = lorahot.runtime.merge.signature

    def counted(layers: Any) -> Any:
        walks.append(len(layers))
        return signature(layers)

    monkeypatch.setattr(lorahot.runtime.merge, "signature", counted)
    call(rt)
    assert walks == [2]
