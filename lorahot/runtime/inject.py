"""``inject`` and ``eject``: put LoRA layers into any ``nn.Module`` and take them out again."""

from __future__ import annotations

import torch
from torch import nn

from lorahot.errors import UsageError, public_api
from lorahot.layers import LoRALayer
from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.lora_runtime import LoraRuntime
from lorahot.runtime.merge import check_mergeable
from lorahot.runtime.targets import Targets, layer_placement, match_targets, unwrap_modules, wrap_modules

__all__ = ["inject", "eject"]


@public_api
def inject(
    model: nn.Module,
    targets: Targets,
    *,
    max_rank: int,
    slots: int = 1,
    dtype: torch.dtype | None = None,
    cache_bytes: int = 2 << 30,
    merged: bool = False,
    fused: bool = True,
) -> LoraRuntime:
    """Wraps the targeted modules of ``model`` in LoRA layers and allocates their buffers.

    Args:
        model: any ``nn.Module``; modified in place.
        targets: module names (a module matches if its name equals an entry or ends with
            ``"." + entry``), a regex (full match), ``"all-linear"``, or a callable
            ``(name, module) -> bool``.
        max_rank: the largest rank any adapter will have; buffers are allocated at this rank.
        slots: how many adapters to keep resident at once.
        dtype: dtype of the LoRA buffers (default: each base weight's dtype).
        cache_bytes: budget of the host cache of preloaded adapters.
        merged: fold each adapter into the base weights (forward at base speed; swaps
            rewrite the targeted weights from a pristine copy). See :mod:`lorahot.runtime.merge`.
        fused: run each ``nn.Linear`` LoRA layer as one fused CUDA kernel where it applies
            (fp16/bf16 on CUDA with Triton, inference). See :mod:`lorahot.kernels.lora_linear`.

    Returns:
        The runtime that loads and swaps adapters. Right after inject the model's outputs
        and ``state_dict()`` are exactly as before.

    Raises:
        ValueError: nothing matches ``targets``.
        TypeError: a matched module cannot take LoRA.
        UsageError: bad ``max_rank``/``slots``/``dtype``.
    """
    for value, name in ((max_rank, "max_rank"), (slots, "slots")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UsageError(f"{name}={value!r} must be an integer >= 1.")
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise UsageError(f"dtype={dtype!r} must be a floating-point torch.dtype.")
    names = match_targets(model, targets)
    layers = wrap_modules(model, names)
    try:
        specs = {}
        for name, layer in layers.items():
            if max_rank % layer.spec.groups:
                raise UsageError(
                    f"{name}: conv with groups={layer.spec.groups} needs max_rank divisible by {layer.spec.groups}; "
                    f"got {max_rank}."
                )
            if merged:
                check_mergeable(name, layer, dtype)
            specs[name] = (layer.spec, *layer_placement(layer, dtype, name))
        return LoraRuntime(model, layers, BufferManager(specs, max_rank, slots), cache_bytes, merged, fused)
    except BaseException:
        unwrap_modules(model, layers)
        raise


@public_api
def eject(model: nn.Module) -> nn.Module:
    """Puts every original module back in place of its LoRA wrapper; returns ``model``.

    The base weights were never modified (merged mode puts its pristine copy back), so the
    model computes bitwise what it did before ``inject``. A runtime attached to the model must
    not be used afterwards.
    """
    unwrap_modules(model, {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)})
    return model
