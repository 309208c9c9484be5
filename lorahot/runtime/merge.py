"""Merged mode: fold ``scale * B @ A`` into the base weights, for forward speed equal to the base.

Each swap recomputes every targeted weight from a pristine copy kept at inject time,
``W = W0 + scale * dW``, in one fused multiply-add per layer, so rounding never accumulates
however many swaps run. The adapter itself still lives in the arena (the slots), and the
forward reads only the base weights: no LoRA work per token at all.

DoRA and LoRA biases fold too: ``W = f * (W0 + scale * dW)`` with the live DoRA factor ``f``
per output channel, and ``b = b0 + f * scale * c`` for the LoRA bias ``c`` (a layer without a
base bias cannot take a LoRA bias in merged mode: the load is refused).

Costs: one extra copy of every targeted base weight, and a swap that rewrites those weights
(a few ms for a 1B model on a GPU). Grouped convolutions cannot be merged (their LoRA mixes
all input channels), and only modules whose weight layout lorahot knows are accepted.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorahot.adapter import WeightModule
from lorahot.errors import AdapterReadError, UsageError, format_problems
from lorahot.layers import LoRALayer
from lorahot.layers.base import EXTRA_BIAS, EXTRA_F
from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.deltas import build_delta, delta_bound
from lorahot.runtime.plan import LoadPlan

__all__ = ["Merger", "check_mergeable", "check_untied"]


def check_mergeable(name: str, layer: LoRALayer, dtype: torch.dtype | None) -> None:
    """Raises :class:`UsageError` if ``layer`` cannot run in merged mode."""
    refusal = layer.merge_refusal()
    if refusal is not None:
        raise UsageError(f"{name}: {refusal}; inject without merged=True.")
    weight = layer.base_weight
    if dtype is not None and dtype != weight.dtype:
        raise UsageError(f"merged mode computes in the base weights' dtype ({weight.dtype}); drop dtype={dtype}.")
    if not weight.is_contiguous():
        raise UsageError(
            f"{name}: merged mode rewrites the weight in place and needs it contiguous; its strides are "
            f"{weight.stride()} for shape {tuple(weight.shape)}. Make it contiguous before inject, or drop merged=True."
        )


def check_untied(model: nn.Module, names: list[str]) -> None:
    """Refuses a target whose weight shares memory with any other tensor of the model.

    Merged mode rewrites each targeted weight in place, so a weight tied to another module (an
    ``lm_head`` sharing ``embed_tokens.weight``, or any view of the same storage) would change
    that module too. Found by storage and byte range, not by names.

    Raises:
        UsageError: naming the target and the module its weight is tied to.
    """
    by_storage: dict[tuple[torch.device, int], list[tuple[str, torch.Tensor]]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for qualname, t in named:
        if t.device.type != "meta" and t.numel():
            by_storage.setdefault((t.device, t.untyped_storage().data_ptr()), []).append((qualname, t))
    for name in names:
        weight = getattr(model.get_submodule(name), "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.device.type == "meta" or not weight.numel():
            continue
        own = f"{name}.weight"
        for qualname, t in by_storage.get((weight.device, weight.untyped_storage().data_ptr()), []):
            if qualname != own and _overlap(t, weight):
                owner = qualname.rpartition(".")[0] or "the model"
                raise UsageError(
                    f"{name}: its weight is tied to {owner} ({qualname} shares its memory); merged mode would rewrite "
                    f"both {name} and {owner}. Inject without merged=True, or untie the weights (give {owner} its own "
                    "copy) first."
                )


def _overlap(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether two tensors of one storage touch a common byte."""

    def span(t: torch.Tensor) -> tuple[int, int]:
        start = int(t.storage_offset()) * t.element_size()
        last = sum((int(size) - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        return start, start + (last + 1) * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


class Merger:
    """Keeps pristine base weights and rewrites the live weights from the live adapter."""

    def __init__(self, layers: dict[str, LoRALayer], buffers: BufferManager) -> None:
        self._buffers = buffers
        self._layers = layers
        self._items: list[tuple[LoRALayer, torch.Tensor, torch.Tensor, int, int]] = []
        self._biased: set[str] = set()  # layers whose bias a diff_b rewrote
        self._pristine_max: dict[str, float] = {}  # max |W0| per layer, for the range check
        for name, layer in layers.items():
            weight = layer.base_weight
            bias = getattr(layer.base_layer, "bias", None)
            with torch.no_grad():
                pristine = weight.detach().clone()
                self._pristine_max[name] = float(pristine.abs().max()) if pristine.numel() else 0.0
                if isinstance(bias, torch.Tensor):
                    layer.pristine_bias = bias.detach().clone()
            layer.pristine_weight = pristine  # eject puts it back, even without this runtime
            bias = layer.base_bias
            layer.pristine_bias = None if bias is None else bias.detach().clone()
            arena, index = buffers.where[name]
            self._items.append((layer, weight, pristine, arena, index))

    def check(self, plan: LoadPlan, multiplier: float) -> None:
        """Refuses a plan whose merged weights ``W0 + multiplier * alpha/r * B @ A`` would leave
        the weights' dtype range (they would turn into inf). Reads no weight for the usual
        adapter: ``max|W0| + |s| * r * max|A| * max|B|`` bounds every entry; only a layer whose
        bound reaches the limit gets its merged maximum computed exactly (in float32).

        Raises:
            AdapterReadError: the adapter overflows at its own scale (``multiplier`` 1).
            UsageError: it overflows only at the user's ``multiplier``.
        """
        over = [name for name in [*plan.targets, *plan.weights] if self._overflows_any(plan, name, multiplier)]
        if not over:
            return
        at_own_scale = [name for name in over if self._overflows_any(plan, name, 1.0)]
        if at_own_scale:
            raise AdapterReadError(
                format_problems(f"{plan.source}: merged weights would overflow the model's dtype in:", at_own_scale)
                + "\nThe adapter's values are too large for merged mode; inject without merged=True, or re-save it."
            )
        raise UsageError(
            format_problems(
                f"scale={multiplier:g}: merged weights would overflow the model's dtype in:", [str(n) for n in over]
            )
            + "\nPass a smaller scale."
        )

    def _overflows(self, plan: LoadPlan, name: str, multiplier: float) -> bool:
        module = plan.targets[name]
        layer = self._layers[name]
        top = torch.finfo(layer.base_weight.dtype).max
        s = abs(float(module.scale) * multiplier)
        if self._pristine_max[name] + s * plan.delta_bound.get(name, math.inf) < top:
            return False
        pristine = layer.pristine_weight
        assert pristine is not None  # set in __init__
        with torch.no_grad():
            a2 = module.A.reshape(module.A.shape[0], -1).to(pristine.device, torch.float32)  # [r, in_dim]
            bt2 = module.B.reshape(module.B.shape[0], -1).t().to(pristine.device, torch.float32)  # [r, out_dim]
            m1, m2 = layer.merge_operands(a2, bt2)
            merged = pristine.view(pristine.shape[0], -1).float() + s * (m1 @ m2)
            return not bool(merged.abs().max() <= top)  # NaN/inf compare False

    def _overflows_any(self, plan: LoadPlan, name: str, multiplier: float) -> bool:
        if name in plan.weights:
            return self._weight_overflows(plan.weights[name], name, multiplier)
        return self._overflows(plan, name, multiplier)

    def _weight_overflows(self, module: WeightModule, name: str, multiplier: float) -> bool:
        """Whether ``W0 + multiplier * scale * ΔW`` (or the bias with ``diff_b``) leaves the
        weights' dtype range. The bound of :func:`~lorahot.runtime.deltas.delta_bound` decides
        for the usual adapter; only a layer whose bound reaches the limit is computed exactly
        (in float32, or float64)."""
        layer = self._layers[name]
        top = torch.finfo(layer.base_weight.dtype).max
        b0 = layer.pristine_bias
        start = max(self._pristine_max[name], float(b0.abs().max()) if b0 is not None and b0.numel() else 0.0)
        if start + abs(multiplier * module.scale) * delta_bound(module) < top:  # NaN or inf: exact check
            return False
        merged = self._folded(layer, module, multiplier * module.scale)
        return any(not bool(t.abs().max() <= top) for t in merged if t.numel())

    def _folded(self, layer: LoRALayer, module: WeightModule, s: float) -> list[torch.Tensor]:
        """``[W0 + s * ΔW, b0 + s * diff_b]`` (the bias only with a ``diff_b``), computed in
        at least float32 on the weights' device."""
        pristine = layer.pristine_weight
        assert pristine is not None  # set in __init__
        dtype = torch.promote_types(pristine.dtype, torch.float32)
        with torch.no_grad():
            shape = (layer.spec.out_dim, *layer.spec.a_row_shape)  # torch layout [out, in, *kernel]
            delta = layer.weight_delta(build_delta(module, shape, dtype, pristine.device))
            out = [pristine.to(dtype) + s * delta]
            db, b0 = module.factors.get("diff_b"), layer.pristine_bias
            if db is not None and b0 is not None:
                out.append(b0.to(dtype) + s * db.to(pristine.device, dtype))
        return out

    def apply(self, scales: list[torch.Tensor] | None) -> None:
        """Sets every weight to ``W0 + scale * dW`` from the live region (``scales``: per arena
        float64 ``[n_layers]`` host tensors, already including the user's multiplier; None
        means no adapter)."""
        live = self._buffers.live
        with torch.no_grad():
            for layer, weight, pristine, arena_idx, index in self._items:
                s = 0.0 if scales is None else float(scales[arena_idx][index])
                arena = self._buffers.arenas[arena_idx]
                rows = max(arena.a_extent[live], arena.b_extent[live])
                extras = arena.extras(index, live) if arena.e_dirty[live] and s != 0.0 else None
                self._fold_bias(layer, extras, s)
                if s == 0.0 or rows == 0:
                    weight.copy_(pristine)
                    continue
                a, bt = arena.rows(index, live)
                m1, m2 = layer.merge_operands(a[:rows], bt[:rows])
                flat_w, flat_p = weight.view(weight.shape[0], -1), pristine.view(pristine.shape[0], -1)
                torch.addmm(flat_p, m1, m2, alpha=s, out=flat_w)
                if extras is not None:  # DoRA: each output channel times its factor (1 elsewhere)
                    f = extras[EXTRA_F]
                    flat_w.mul_((f[:, None] if layer.channel_dim() == 0 else f[None, :]).to(flat_w.dtype))

    @staticmethod
    def _fold_bias(layer: LoRALayer, extras: torch.Tensor | None, s: float) -> None:
        """Sets the base bias to ``b0 + f * s * c`` (``b0`` alone without extras)."""
        bias = getattr(layer.base_layer, "bias", None)
        if layer.pristine_bias is None or not isinstance(bias, torch.Tensor):
            return
        if extras is None:
            bias.copy_(layer.pristine_bias)
        else:
            folded = layer.pristine_bias.to(extras.dtype) + extras[EXTRA_F] * extras[EXTRA_BIAS] * s
            bias.copy_(folded)

    def fold(self, weights: dict[str, WeightModule], multiplier: float) -> None:
        """After :meth:`apply`: folds each weight-kind module into its layer, ``W = W0 + s * ΔW``
        with ``s = multiplier * module.scale`` (ΔW built on the weights' device from the
        factors); puts back every bias an earlier diff rewrote."""
        with torch.no_grad():
            for name in self._biased - set(weights):
                bias, b0 = self._layers[name].base_bias, self._layers[name].pristine_bias
                if bias is not None and b0 is not None:
                    bias.copy_(b0)
            self._biased = set()
            for name, module in weights.items():
                layer = self._layers[name]
                folded = self._folded(layer, module, multiplier * module.scale)
                layer.base_weight.copy_(folded[0])
                bias = layer.base_bias
                if len(folded) > 1 and bias is not None:
                    bias.copy_(folded[1])
                    self._biased.add(name)
