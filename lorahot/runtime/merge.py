"""Merged mode: fold ``scale * B @ A`` into the base weights, for forward speed equal to the base.

Each swap recomputes every targeted weight from a pristine copy kept at inject time,
``W = W0 + scale * dW``, in one fused multiply-add per layer, so rounding never accumulates
however many swaps run. The adapter itself still lives in the arena (the slots), and the
forward reads only the base weights: no LoRA work per token at all.

Costs: one extra copy of every targeted base weight, and a swap that rewrites those weights
(a few ms for a 1B model on a GPU). Grouped convolutions cannot be merged (their LoRA mixes
all input channels), and only modules whose weight layout lorahot knows are accepted.
"""

from __future__ import annotations

import torch

from lorahot.errors import UsageError
from lorahot.layers import LoRALayer
from lorahot.runtime.buffers import BufferManager

__all__ = ["Merger", "check_mergeable"]


def check_mergeable(name: str, layer: LoRALayer, dtype: torch.dtype | None) -> None:
    """Raises :class:`UsageError` if ``layer`` cannot run in merged mode."""
    refusal = layer.merge_refusal()
    if refusal is not None:
        raise UsageError(f"{name}: {refusal}; inject without merged=True.")
    weight = layer.base_weight
    if dtype is not None and dtype != weight.dtype:
        raise UsageError(f"merged mode computes in the base weights' dtype ({weight.dtype}); drop dtype={dtype}.")


class Merger:
    """Keeps pristine base weights and rewrites the live weights from the live adapter."""

    def __init__(self, layers: dict[str, LoRALayer], buffers: BufferManager) -> None:
        self._buffers = buffers
        self._items: list[tuple[LoRALayer, torch.Tensor, torch.Tensor, int, int]] = []
        for name, layer in layers.items():
            weight = layer.base_weight
            with torch.no_grad():
                pristine = weight.detach().clone()
            layer.pristine_weight = pristine  # eject puts it back, even without this runtime
            arena, index = buffers.where[name]
            self._items.append((layer, weight, pristine, arena, index))

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
                if s == 0.0 or rows == 0:
                    weight.copy_(pristine)
                    continue
                a, bt = arena.rows(index, live)
                m1, m2 = layer.merge_operands(a[:rows], bt[:rows])
                flat_w, flat_p = weight.view(weight.shape[0], -1), pristine.view(pristine.shape[0], -1)
                torch.addmm(flat_p, m1, m2, alpha=s, out=flat_w)
