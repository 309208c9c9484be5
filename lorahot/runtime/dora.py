"""DoRA factors: ``f = m / ||W0 + scale * B @ A||`` per output channel, computed on the device.

A DoRA adapter (PEFT ``use_dora=True``) rescales each output channel of the adapted weight to
its trained magnitude ``m``. PEFT's forward (``DoraLinearLayer.forward``) computes, for a base
layer with weight ``W0`` and bias ``b0``, ``f * (W0 x + scale * (B A x + lora_bias)) + b0``
with ``f = m / ||W0 + scale * B @ A||`` (the norm detached, over each output channel's
weights). The factor depends on the scale, so it is recomputed whenever the region's scales
change: after a load and after ``set_scale``; ``activate`` copies it with the rest of a region.
It depends on the base weight and bias too: after ``load_state_dict`` writes them, the runtime
computes the layer's factors again in every region that holds a DoRA adapter for it
(:meth:`lorahot.runtime.lora_runtime.LoraRuntime._base_loaded`, called from the layer's load
hooks, :meth:`lorahot.layers.LoRALayer.attach`), whether the load went through the model, the
LoRA layer or the wrapped module itself. A layer of a copy of the model (``copy.deepcopy``, no
runtime) refuses such a load through it with a UsageError instead, since it cannot compute
them. Not seen: a write to the base weight by other means (``weight.data.copy_``), and a load
into a copy's wrapped module itself.

The factor lives in row 0 of each layer's extras (:mod:`lorahot.runtime.buffers`) and
``g = (1 - f) * b0`` in row 2, so the forward ``f * (base(x) + scale * (delta + lora_bias)) + g``
is PEFT's formula whatever the layer's path (the base output includes ``b0``). A DoRA layer
holds one adapter (a stack refuses DoRA on a layer another part touches: PEFT computes a
factor per adapter), so every row it uses has one scale, its row 0's. Computed from
the region's own A, B, scale and magnitude rows, on the device, with the pristine base weight:
a load from a file and one from the host cache compute bitwise the same factors. The norm is
computed in the scales' dtype (float32, float64 for float64 layers); PEFT computes it in the
input's dtype, the same for float32 and float64 models.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lorahot.layers import LoRALayer
from lorahot.layers.base import EXTRA_F, EXTRA_G, EXTRA_M
from lorahot.runtime.buffers import BufferManager

__all__ = ["DoraFactors"]


class DoraFactors:
    """Computes the DoRA factors of a region's DoRA layers (see the module docstring).

    Args:
        layers: the runtime's layers by name.
        buffers: their buffer manager.
        weight_of: the pristine base weight of a layer, by name.
        bias_of: the pristine base bias of a layer, by name (None if it has none).
    """

    def __init__(
        self,
        layers: dict[str, LoRALayer],
        buffers: BufferManager,
        weight_of: Callable[[str], torch.Tensor],
        bias_of: Callable[[str], torch.Tensor | None],
    ) -> None:
        self._buffers = buffers
        self._items: dict[tuple[int, int], tuple[LoRALayer, str]] = {
            where: (layers[name], name) for name, where in buffers.where.items()
        }
        self._weight_of = weight_of
        self._bias_of = bias_of

    def refresh(self, region: int, dora: list[list[int]]) -> None:
        """Recomputes ``f`` and ``g`` of the layers ``dora`` (per arena, layer indices) in
        ``region`` from its A, B, scales and magnitudes. Nothing here can fail on the adapter's
        content: it was checked before the write."""
        with torch.no_grad():
            for a, indices in enumerate(dora):
                arena = self._buffers.arenas[a]
                rows = max(arena.a_extent[region], arena.b_extent[region])
                for index in indices:
                    layer, name = self._items[(a, index)]
                    e = arena.extras(index, region)
                    scale = arena.S[region, index, 0]  # 0-d: every row in use has it
                    f = e[EXTRA_M] / self.norm(layer, name, arena.rows(index, region), scale, rows)
                    e[EXTRA_F].copy_(f)
                    bias = self._bias_of(name)
                    if bias is None:
                        e[EXTRA_G].zero_()
                    else:
                        e[EXTRA_G].copy_((1 - f) * bias.detach().to(e.dtype))

    def norm(
        self, layer: LoRALayer, name: str, ab: tuple[torch.Tensor, torch.Tensor], scale: torch.Tensor, rows: int
    ) -> torch.Tensor:
        """``[out]``: ``||W0 + scale * B @ A||`` per output channel, in the scale's dtype."""
        a, bt = ab
        dtype = scale.dtype
        m1, m2 = layer.merge_operands(a[:rows].to(dtype), bt[:rows].to(dtype))
        w0 = self._weight_of(name).detach()
        weight = w0.flatten(1).to(dtype) + scale * (m1 @ m2)
        return layer.dora_norm(weight)
