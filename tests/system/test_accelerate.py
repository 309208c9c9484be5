"""accelerate's placement (``dispatch_model``, ``cpu_offload``, ``disk_offload``,
``load_checkpoint_and_dispatch``) before and after inject: it works where the targeted layers
stay on their device, and is refused with a ``UsageError`` naming the layer otherwise, every
parameter and buffer bitwise as before, against a float64 dense reference."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import lorahot
from lorahot.errors import UsageError

accelerate = pytest.importorskip("accelerate")
hooks = pytest.importorskip("accelerate.hooks")


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, dtype=torch.float64)
        self.b = nn.Linear(4, 4, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _model() -> Two:
    torch.manual_seed(0)
    return Two()


def _adapter(names: list[str]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for n in names:
        out[f"base_model.model.{n}.lora_A.weight"] = torch.randn(2, 4, generator=g, dtype=torch.float64)
        out[f"base_model.model.{n}.lora_B.weight"] = torch.randn(4, 2, generator=g, dtype=torch.float64)
    return out


def _dense(base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], x: torch.Tensor, s: float) -> torch.Tensor:
    """``b(a(x))`` with ``W + s B A`` for each layer the adapter has (alpha = rank: scale ``s``)."""
    for n in ("a", "b"):
        w = base[f"{n}.weight"]
        key = f"base_model.model.{n}.lora_"
        if key + "A.weight" in adapter:
            w = w + s * adapter[key + "B.weight"] @ adapter[key + "A.weight"]
        x = x @ w.T + base[f"{n}.bias"]
    return x


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    return {k: v.detach().clone() for k, v in tensors.items()}


_X = torch.randn(3, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


def _dispatch(model: nn.Module, tmp: Path) -> None:
    accelerate.dispatch_model(model, device_map={"a": "cpu", "b": "disk"}, main_device="cpu", offload_dir=str(tmp))


def _checkpoint(model: nn.Module, tmp: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _model().state_dict().items()}, str(tmp / "m.safetensors"))
    accelerate.load_checkpoint_and_dispatch(
        model, str(tmp / "m.safetensors"), device_map={"a": "cpu", "b": "disk"}, offload_folder=str(tmp / "o")
    )


PLACEMENTS: dict[str, Callable[[nn.Module, Path], object]] = {
    "dispatch_model": _dispatch,
    "cpu_offload": lambda m, tmp: accelerate.cpu_offload(m, execution_device="cpu"),
    "disk_offload": lambda m, tmp: accelerate.disk_offload(m, str(tmp), execution_device="cpu"),
    "load_checkpoint_and_dispatch": _checkpoint,
}


def _assert_serves(
    model: nn.Module, runtime: lorahot.LoraRuntime, base: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor]
) -> None:
    """``model`` holding ``adapter`` computes the float64 reference at scale 1, then at 0.5
    after set_scale, then the base model's output after unload."""
    torch.testing.assert_close(model(_X), _dense(base, adapter, _X, 1.0), rtol=1e-12, atol=1e-12)
    runtime.set_scale(0.5)
    torch.testing.assert_close(model(_X), _dense(base, adapter, _X, 0.5), rtol=1e-12, atol=1e-12)
    runtime.unload()
    torch.testing.assert_close(model(_X), _dense(base, {}, _X, 1.0), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("merged", [False, True])
@pytest.mark.parametrize("place", ["dispatch_model", "cpu_offload", "disk_offload"])
def test_accelerate_placement_after_inject_is_refused_before_it_moves_a_lora_layer(
    place: str, merged: bool, tmp_path: Path
) -> None:
    """Was: accelerate's offload index holds the state_dict keys (``b.weight``) and its hook
    looks the weights up by parameter path (``b.base_layer.weight``): the forward raised
    KeyError from accelerate, with the weights offloaded to the meta device."""
    model = _model()
    base = _state(model)
    runtime = lorahot.inject(model, ["a", "b"], max_rank=2, merged=merged)
    adapter = _adapter(["a", "b"])
    runtime.load(adapter)
    before = _state(model)
    with pytest.raises(UsageError, match=r"^a: accelerate's hooks .* cannot be attached to a LoRA layer after inject"):
        PLACEMENTS[place](model, tmp_path)
    after = _state(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) and after[k].device == v.device for k, v in before.items())
    hooks.remove_hook_from_module(model, recurse=True)  # what accelerate hooked before the refusal
    _assert_serves(model, runtime, base, adapter)
    lorahot.eject(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in base.items())


@pytest.mark.parametrize("place", list(PLACEMENTS))
def test_accelerate_offloaded_layer_is_refused_at_inject_and_a_placed_one_serves(place: str, tmp_path: Path) -> None:
    """Dispatched before inject: an offloaded layer (weights on the meta device between calls)
    is refused naming accelerate, and a layer accelerate keeps on its execution device serves,
    its hooks and all, through load, set_scale, unload and eject."""
    if place == "load_checkpoint_and_dispatch":
        with accelerate.init_empty_weights():
            model = Two()
    else:
        model = _model()
    base = _state(_model())
    PLACEMENTS[place](model, tmp_path)
    offloaded = "b" if place in ("dispatch_model", "load_checkpoint_and_dispatch") else "a"
    before = dict(model.named_parameters())
    with pytest.raises(UsageError, match=rf"^{offloaded}: base weights are offloaded by accelerate's hooks"):
        lorahot.inject(model, ["a", "b"], max_rank=2)
    assert dict(model.named_parameters()) == before  # the same parameters, none wrapped
    torch.testing.assert_close(model(_X), _dense(base, {}, _X, 1.0), rtol=0, atol=0)
    if offloaded == "a":
        return  # cpu_offload and disk_offload offload every layer
    runtime = lorahot.inject(model, ["a"], max_rank=2)
    adapter = _adapter(["a"])
    runtime.load(adapter)
    _assert_serves(model, runtime, base, adapter)
    lorahot.eject(model)
    torch.testing.assert_close(model(_X), _dense(base, {}, _X, 1.0), rtol=1e-12, atol=1e-12)
