"""``inject`` and ``eject``: put LoRA layers into any ``nn.Module`` and take them out again."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lorahot.errors import UsageError, public_api, shown, unfinished_eject
from lorahot.layers import LayerSpec, LoRALayer
from lorahot.layers.norm import is_norm
from lorahot.layers.probes import kept_parametrizations
from lorahot.layers.sharded import is_sharded
from lorahot.runtime.arguments import whole
from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.cache import checked_budget
from lorahot.runtime.components import Pipeline, components_of, is_several, match_components
from lorahot.runtime.lora_runtime import LoraRuntime, release_hooks, roots
from lorahot.runtime.merge import check_ejectable, check_mergeable, check_untied
from lorahot.runtime.plan import WEIGHT_DTYPES
from lorahot.runtime.targets import (
    Targets,
    layer_placement,
    match_targets,
    refuse_lazy,
    unwrap_modules,
    wrap_modules,
)
from lorahot.runtime.weight_reads import check_merged_reads

__all__ = ["inject", "eject", "check_merged_model"]


#: No real adapter comes close (as in the config reader); larger values are a mistake.
MAX_RANK_LIMIT = 1 << 16
#: More resident adapters than this belong in the host cache (``preload``), not in slots.
MAX_SLOTS = 4096


@public_api
def inject(
    model: nn.Module | Mapping[str, nn.Module] | Any,
    targets: Targets | Mapping[str, Targets],
    *,
    max_rank: int,
    slots: int = 1,
    dtype: torch.dtype | None = None,
    cache_bytes: int = 2 << 30,
    merged: bool = False,
    fused: bool = True,
    extras: bool = False,
    regional: bool = False,
) -> LoraRuntime:
    """Wraps the targeted modules of ``model`` in LoRA layers and allocates their buffers.

    Args:
        model: any ``nn.Module``; modified in place. Or several models: a dict of component
            name -> ``nn.Module`` (``{"unet": unet, "text_encoder": te}``), or an object with a
            ``components`` mapping (a diffusers pipeline: its ``nn.Module`` components that
            ``targets`` matches). One runtime then serves them all: layers are named
            ``<component>.<module path>``, ``load`` routes each module of a file to its
            component by its prefix (``unet.``, ``text_encoder_2.``, ``lora_te1_``, ...;
            :mod:`lorahot.resolve.components`), and ``runtime.eject()`` restores each one.
        targets: module names (a module matches if its name equals an entry or ends with
            ``"." + entry``), a regex (full match), ``"all-linear"``, or a callable
            ``(name, module) -> bool``. For several models: one of those for every component,
            or a dict component -> one of those (only those components are injected).
        max_rank: the largest rank any adapter will have; buffers are allocated at this rank
            (1 to 65536).
        slots: how many adapters to keep resident at once (1 to 4096).
        dtype: dtype of the LoRA buffers (default: each base weight's dtype): float16,
            bfloat16, float32 or float64.
        cache_bytes: budget of the host cache of preloaded adapters, an int >= 0.
        merged: fold each adapter into the base weights (forward at base speed; swaps
            rewrite the targeted weights from a pristine copy). See :mod:`lorahot.runtime.merge`.
        fused: run each ``nn.Linear`` LoRA layer as one fused CUDA kernel where it applies
            (fp16/bf16 on CUDA with Triton, inference). See :mod:`lorahot.kernels.lora_linear`.
        extras: let the layers run DoRA and LoRA biases (PEFT ``use_dora`` / ``lora_bias``)
            unmerged: one elementwise pass per layer then applies each layer's DoRA factor and
            LoRA bias (1 and 0 for plain LoRA). It costs every forward a pass per layer and the
            compiler a kernel per layer, so it is off by default: without it such adapters are
            refused at load, naming this flag. :func:`lorahot.plan_targets` says whether a set
            of adapters needs it (``plan.extras``). Merged mode folds DoRA and LoRA biases into
            the weights either way. See :mod:`lorahot.runtime.dora`.
        regional: the model will be compiled block by block (diffusers'
            ``compile_repeated_blocks``, ``torch.compile`` on each decoder layer or transformer
            block) rather than whole. Each LoRA layer then hands its buffers to the compiled
            graph as inputs, so that identical blocks share one graph: without it every block
            compiles its own (each layer's buffer offsets are constants of its graph), and past
            ``torch._dynamo.config.recompile_limit`` (8) the remaining blocks run uncompiled.
            It costs a compiled call a few more guards per layer; a whole-model compile does
            not need it.

    Returns:
        The runtime that loads and swaps adapters. Right after inject the model's outputs
        and ``state_dict()`` are exactly as before.

    Raises:
        UsageError (also a ValueError and a TypeError): an argument of the wrong type or out
            of range; nothing matches ``targets``; a matched module cannot take LoRA (its type,
            an embedding whose forward lorahot cannot follow, one module under two names); in
            merged mode a weight tied to another module; buffers the device cannot hold. The
            model is then as it was.
    """
    # inject reads the weights it wraps; in training mode each read runs a parametrization's
    # forward (spectral norm's power iteration): its state is put back afterwards
    with kept_parametrizations(_models_of(model)):
        return _inject(model, targets, max_rank, slots, dtype, cache_bytes, merged, fused, extras, regional)


def _inject(
    model: nn.Module | Mapping[str, nn.Module] | Any,
    targets: Targets | Mapping[str, Targets],
    max_rank: int,
    slots: int,
    dtype: torch.dtype | None,
    cache_bytes: int,
    merged: bool,
    fused: bool,
    extras: bool,
    regional: bool,
) -> LoraRuntime:
    """:func:`inject`'s checks, wrapping and allocation."""
    components: tuple[str, ...] = ()
    if not is_several(model):
        max_rank, slots, cache_bytes = _check_arguments(
            model, max_rank, slots, dtype, cache_bytes, merged, fused, extras, regional
        )
        root: nn.Module = model  # type: ignore[assignment]  # checked just above
        names = match_targets(root, targets)  # type: ignore[arg-type]
    else:
        modules, named = components_of(model)
        max_rank, slots, cache_bytes = _check_arguments(
            nn.Module(), max_rank, slots, dtype, cache_bytes, merged, fused, extras, regional
        )
        root, names = match_components(modules, targets, named)
        components = tuple(root._modules)
    if not merged:
        _refuse_norms(root, names)
    if merged:
        check_merged_model(root, names)
    layers = wrap_modules(root, names)
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
        buffers = _allocate(specs, max_rank, slots)
        # a pipeline (not a dict of the caller's): checked to still call the components wrapped
        pipeline = Pipeline(model, root) if components and not isinstance(model, Mapping) else None
        return LoraRuntime(root, layers, buffers, cache_bytes, merged, fused, extras, components, regional, pipeline)
    except BaseException:
        unwrap_modules(root, layers)
        release_hooks(roots(root, components))  # what LoraRuntime hooked before it failed
        raise


def check_merged_model(root: nn.Module, names: list[str]) -> None:
    """What merged mode refuses of the targets ``names`` under ``root`` before they are wrapped:
    a tensor-parallel weight, a weight or bias tied to another module's, a weight a module on the
    target's path reads as a value (each layer's own checks follow: :func:`check_mergeable`).

    Raises:
        UsageError: naming the target, why, and the fix.
    """
    for name in names:  # before anything reads a target's tensors, which raise until materialized
        refuse_lazy(name, root.get_submodule(name))
    _refuse_sharded(root, names)
    check_untied(root, names)
    check_merged_reads(root, names)


def _refuse_norms(model: nn.Module, names: list[str]) -> None:
    """A normalization layer takes no LoRA: what adapters carry for one is a delta of its weight
    and bias, which only merged mode folds (:mod:`lorahot.layers.norm`)."""
    norms = [n for n in names if is_norm(model.get_submodule(n))]
    if norms:
        kind = type(model.get_submodule(norms[0])).__name__
        raise UsageError(
            f"{norms[0]}: cannot add LoRA to {kind}, a normalization layer: lorahot folds the deltas of its weight and "
            "bias that adapters carry (a ComfyUI .diff / .diff_b, LyCORIS w_norm / b_norm) in merged mode only. "
            "Inject with merged=True, or narrow targets to exclude it."
        )


def _refuse_sharded(model: nn.Module, names: list[str]) -> None:
    """Merged mode rewrites base weights in place, which lorahot does not do to DTensors."""
    sharded = [n for n in names if is_sharded(model.get_submodule(n))]
    if sharded:
        raise UsageError(
            f"{sharded[0]}: merged mode does not rewrite tensor-parallel (DTensor) weights; inject without "
            "merged=True (the LoRA layers then shard their buffers like the base layers)."
        )


def _check_arguments(
    model: object,
    max_rank: object,
    slots: object,
    dtype: object,
    cache_bytes: object,
    merged: object,
    fused: object,
    extras: object = True,
    regional: object = False,
) -> tuple[int, int, int]:
    """Every argument of :func:`inject` but ``targets``, before anything is touched; returns
    ``max_rank``, ``slots`` and ``cache_bytes`` as ints (a NumPy integer passes)."""
    if not isinstance(model, nn.Module):
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    counts = []
    for value, name, top in ((max_rank, "max_rank", MAX_RANK_LIMIT), (slots, "slots", MAX_SLOTS)):
        n = whole(value, f"{name}={shown(value, 200)}")
        if n is None or n < 1:
            raise UsageError(f"{name}={shown(value, 200)} must be an integer >= 1.")
        if n > top:
            raise UsageError(f"{name}={n} is absurd; it must be at most {top}.")
        counts.append(n)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or dtype not in WEIGHT_DTYPES):
        raise UsageError(
            f"dtype={shown(dtype, 200)} must be a floating-point torch.dtype LoRA weights can use: torch.float16, "
            "torch.bfloat16, torch.float32 or torch.float64 (or None: each base weight's dtype)."
        )
    budget = checked_budget(cache_bytes)
    for value, name in ((merged, "merged"), (fused, "fused"), (extras, "extras"), (regional, "regional")):
        if not isinstance(value, bool):
            raise UsageError(f"{name}={shown(value, 200)} must be True or False.")
    return counts[0], counts[1], budget


def _allocate(
    specs: dict[str, tuple[LayerSpec, torch.device, torch.dtype]], max_rank: int, slots: int
) -> BufferManager:
    """The buffer manager, or a :class:`UsageError` saying how many bytes it needed where."""
    needed = BufferManager.nbytes_needed(specs, max_rank, slots)
    for device, nbytes in needed.items():
        capacity = _capacity(device)
        if capacity is not None and nbytes > capacity:
            raise UsageError(
                f"the LoRA buffers need {nbytes:,} bytes on {device} (max_rank={max_rank}, slots={slots}), more than "
                f"its {capacity:,} bytes of memory. Inject with a smaller max_rank or fewer slots."
            )
    try:
        return BufferManager(specs, max_rank, slots)
    except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
        wanted = ", ".join(f"{n:,} bytes on {d}" for d, n in needed.items())
        raise UsageError(
            f"allocating the LoRA buffers ({wanted}; max_rank={max_rank}, slots={slots}) failed: "
            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}. Inject with a smaller max_rank or "
            "fewer slots, or free memory."
        ) from None


def _capacity(device: torch.device) -> int | None:
    """Total memory of ``device`` in bytes, where it can be known without allocating."""
    try:
        if device.type == "cpu":
            return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
        if device.type == "cuda":
            return int(torch.cuda.get_device_properties(device).total_memory)
    except (ValueError, OSError, AttributeError, RuntimeError, AssertionError):
        return None
    return None


def _models_of(model: Any) -> list[nn.Module]:
    """The modules of what :func:`inject` was given (none where it is neither a module nor
    several: its checks refuse it)."""
    if isinstance(model, nn.Module):
        return [model]
    return list(components_of(model)[0].values()) if is_several(model) else []


@public_api
def eject(model: nn.Module | Mapping[str, nn.Module] | Any) -> Any:
    """Puts every original module back in place of its LoRA wrapper; returns ``model``.

    The base weights were never modified (merged mode puts its pristine copy back), so the
    model computes bitwise what it did before ``inject``. Every runtime whose layers were found
    is ejected with them: its other layers (anywhere in its own model) are unwrapped too, its
    prefetch thread stops, and each of its operations raises :class:`UsageError` from now on.
    A dict of models or a pipeline (what :func:`inject` takes) ejects each of its components.

    Raises:
        UsageError: a merged layer's base weight or bias is computed by a parametrization,
            ``weight_norm``, ``spectral_norm`` or pruning applied after inject (from the weight
            with the adapter merged in), naming the layer and how to remove it first; nothing
            changed. Once removed, eject puts the base weight of inject back.
    """
    if not isinstance(model, nn.Module):
        if is_several(model):
            for module in components_of(model)[0].values():
                eject(module)
            return model
        raise UsageError(f"model must be a torch.nn.Module, got {type(model).__name__}.")
    found = {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    states = {id(layer.state): layer.state for layer in found.values() if layer.state is not None}
    for state in states.values():  # before anything changes: every runtime's layers, wherever they are
        if state.ejected is None and state.before_eject is not None:
            state.before_eject()
    check_ejectable({n: layer for n, layer in found.items() if layer.state is None or layer.state.ejected is None})
    try:
        for state in states.values():
            state.mark_ejected("lorahot.eject(model)")  # its runtime unwraps its own layers
        unwrap_modules(model, found)  # layers no runtime took out (or that moved within the model)
    except Exception as exc:
        raise unfinished_eject("lorahot.eject(model)", exc) from exc
    release_hooks([model])  # a copy of an injected model keeps the hooks
    return model
