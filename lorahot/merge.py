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
from torch import nn

from lorahot.arena import BufferManager
from lorahot.errors import UsageError
from lorahot.layers import LoRAConv, LoRAEmbedding, LoRALayer, LoRALinear

__all__ = ["Merger"]


def _delta_operands(layer: LoRALayer, a: torch.Tensor, bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(m1, m2)`` with ``m1 @ m2`` equal to dW in the (flattened) layout of the base weight.

    ``a`` is ``[rows, in_dim]`` and ``bt`` is ``[rows, out_dim]`` (B transposed).
    """
    if isinstance(layer, LoRAEmbedding) or type(layer.base_layer).__name__ == "Conv1D":
        return a.t(), bt  # weight [num, dim] / Conv1D weight [in, out]
    return bt.t(), a  # Linear [out, in] / Conv [out, in * prod(kernel)]


def check_mergeable(name: str, layer: LoRALayer, dtype: torch.dtype | None) -> None:
    """Raises :class:`UsageError` if ``layer`` cannot run in merged mode."""
    base = layer.base_layer
    known = isinstance(base, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or type(base).__name__ == "Conv1D"
    if not isinstance(layer, (LoRALinear, LoRAConv, LoRAEmbedding)) or not known:
        raise UsageError(f"{name}: merged mode needs nn.Linear, Conv1D, Conv1d/2d/3d or Embedding, got {type(base).__name__}; inject without merged=True.")
    if layer.spec.groups > 1:
        raise UsageError(f"{name}: a conv with groups={layer.spec.groups} cannot be merged (its LoRA mixes all input channels); inject without merged=True.")
    if dtype is not None and dtype != base.weight.dtype:
        raise UsageError(f"merged mode computes in the base weights' dtype ({base.weight.dtype}); drop dtype={dtype}.")


class Merger:
    """Keeps pristine base weights and rewrites the live weights from the live adapter."""

    def __init__(self, layers: dict[str, LoRALayer], manager: BufferManager) -> None:
        self._manager = manager
        self._items = []
        for name, layer in layers.items():
            weight = layer.base_layer.weight
            with torch.no_grad():
                pristine = weight.detach().clone()
            layer.pristine_weight = pristine  # eject puts it back, even without this runtime
            arena, index = manager.where[name]
            self._items.append((layer, weight, pristine, arena, index))

    @property
    def nbytes(self) -> int:
        """Bytes of pristine weight copies."""
        return sum(p.nbytes for _, _, p, _, _ in self._items)

    def apply(self, scales: list[torch.Tensor] | None) -> None:
        """Sets every weight to ``W0 + scale * dW`` from the live region (``scales``: per arena
        float64 ``[n_layers]`` host tensors, already including the user's multiplier; None
        means no adapter)."""
        live = self._manager.live
        with torch.no_grad():
            for layer, weight, pristine, arena_idx, index in self._items:
                s = 0.0 if scales is None else float(scales[arena_idx][index])
                arena = self._manager.arenas[arena_idx]
                rows = max(arena.a_extent[live], arena.b_extent[live])
                if s == 0.0 or rows == 0:
                    weight.copy_(pristine)
                    continue
                a, bt = arena.rows(index, live)
                m1, m2 = _delta_operands(layer, a[:rows], bt[:rows])
                flat_w, flat_p = weight.view(weight.shape[0], -1), pristine.view(pristine.shape[0], -1)
                torch.addmm(flat_p, m1, m2, alpha=s, out=flat_w)
