"""Helpers of the parity tests of diffusion files in original module names: each layer's adapted
weight read by probing it with the identity, as lorahot and diffusers' pipeline loaders leave it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import lorahot


def linears(model: nn.Module, keep: Callable[[str], bool] = lambda name: True) -> list[str]:
    """The names of ``model``'s ``nn.Linear`` modules that ``keep`` accepts."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and keep(n)]


@torch.no_grad()
def weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Each layer's ``[in + 1, out]`` response to the identity and to zero: its adapted weight and
    bias, probed on the layer's device and returned on the CPU."""
    out = {}
    for name in names:
        layer = model.get_submodule(name)
        base = layer if isinstance(layer, nn.Linear) else layer.base_layer
        probe = torch.eye(base.in_features + 1, dtype=torch.float64, device=base.weight.device)
        out[name] = layer(probe[:, : base.in_features]).cpu()
    return out


def lorahot_weights(
    make: Callable[[], nn.Module], sd: dict[str, torch.Tensor], names: list[str], **load: Any
) -> tuple[dict[str, torch.Tensor], str]:
    """The layers' weights after lorahot loads ``sd`` into a fresh model (every Linear
    injected), and the naming it read."""
    model = make()
    info = lorahot.inject(model, "all-linear", max_rank=8).load({k: v.clone() for k, v in sd.items()}, **load)
    return weights(model, names), info.format


def diffusers_weights(
    make: Callable[[], nn.Module], loader: Any, sd: dict[str, torch.Tensor], names: list[str]
) -> dict[str, torch.Tensor]:
    """The layers' weights after diffusers' pipeline loader (``lora_state_dict``, then ``load_lora_adapter``)."""
    model = make()
    state = loader.lora_state_dict({k: v.clone() for k, v in sd.items()})
    model.load_lora_adapter(state[0] if isinstance(state, tuple) else state, prefix="transformer", adapter_name="o")
    return weights(model, names)


def assert_same(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> None:
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-9, atol=1e-12, msg=name)


def peft_default_adapter(sd: dict[str, torch.Tensor], spelling: str) -> dict[str, torch.Tensor]:
    """A ``diffusion_model.<module>.lora_down.weight`` file with PEFT's adapter name after each
    role (``.lora_down.default.weight``), the module under ``diffusion_model.`` (``spelling``
    ``"comfyui"``), bare (``"bare"``) or in kohya's spelling (``"kohya"``: ``lora_unet_`` + the name
    with ``_`` for ``.``); ``.alpha`` keys keep their place."""
    out = {}
    for key, tensor in sd.items():
        module, role = key.removeprefix("diffusion_model.").rsplit(".", 1)
        if role == "weight":
            module, role = module.rsplit(".", 1)
            role += ".default.weight"
        if spelling == "kohya":
            module = "lora_unet_" + module.replace(".", "_")
        out[f"{'diffusion_model.' if spelling == 'comfyui' else ''}{module}.{role}"] = tensor
    return out


def lora_factors(base: dict[str, torch.Tensor], parts: dict[str, list[str]], seed: int) -> dict[str, tuple]:
    """Original module -> (A, B, alpha): mixed ranks and alphas; a conv's A is ``[r, in, k, k]``,
    its B ``[out, r, 1, 1]``."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, name in enumerate(parts):
        w = base[f"{name}.weight"]
        r = 2 + i % 3
        a = torch.randn(r, *w.shape[1:], generator=g, dtype=torch.float64) * 0.3
        b = torch.randn(w.shape[0], r, *([1] * (w.ndim - 2)), generator=g, dtype=torch.float64) * 0.3
        out[name] = (a, b, float(r) * (0.5 + i % 3))
    return out


def delta(a: torch.Tensor, b: torch.Tensor, alpha: float) -> torch.Tensor:
    """``alpha / r * B @ A`` in the weight's shape (a conv's ``[out, in, k, k]``)."""
    return (alpha / a.shape[0]) * (b.flatten(1) @ a.flatten(1)).reshape(b.shape[0], *a.shape[1:])


def layer_weights(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """Each Linear's and Conv2d's (a patch embedding's) effective weight, read by probing with
    the identity, less the response to zero."""
    out = {}
    with torch.no_grad():
        for name in names:
            layer = model.get_submodule(name)
            base = getattr(layer, "base_layer", layer)
            if isinstance(base, torch.nn.Conv2d):
                k = base.kernel_size
                eye = torch.eye(base.in_channels * k[0] * k[1], dtype=torch.float64).reshape(-1, base.in_channels, *k)
                out[name] = layer(eye).flatten(1) - layer(torch.zeros_like(eye[:1])).flatten(1)
            else:
                eye = torch.eye(base.in_features, dtype=torch.float64)
                out[name] = layer(eye) - layer(torch.zeros_like(eye[:1]))
    return out
