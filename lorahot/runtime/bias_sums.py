"""Several LoRA biases of a stack on one layer, unmerged: their sum at the parts' weights.

PEFT adds every active adapter's output, LoRA bias included: a layer where parts ``p`` of a
stack each carry a LoRA bias ``c_p`` (PEFT's ``lora_B.bias``, or a ``.diff_b`` beside a LoRA)
computes ``base(x) + sum_p w_p * s_p * (B_p A_p x + c_p)``, ``s_p`` the part's ``alpha / r``
there and ``w_p`` its weight. A layer's extras hold one LoRA-bias row, scaled in the forward by
the layer's first row's scale (one part's), so such a layer keeps that row at 0 and holds the
sum ``sum_p w_p * s_p * c_p`` in its ``g`` row, the term the forward adds after the DoRA factor
(:mod:`lorahot.layers.base`): ``f = 1`` there, since a DoRA module shares its layer with no
other part (:func:`lorahot.runtime.stack.check_parts`), so ``f * (z + 0) + g = z + sum``.

The sum depends on the weights, so it is computed again on the device wherever they change:
a load, ``set_scale`` (the ordinary path and the CUDA graph replay of
:mod:`lorahot.runtime.scale_replay`, which captures :meth:`BiasSums.write`); ``activate`` copies
the row with the rest of a region, ``unload`` resets it. :class:`BiasSums` keeps, per arena,
each part's ``s_p * c_p`` in float64 on the arena's device (its own copy: a part's tensors may
be views of read buffers the next read reuses) and where the ``g`` rows lie in the extras, so
one write is one product and one indexed copy per arena, at fixed addresses, in float64
rounded once to the extras' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lorahot.layers.base import EXTRA_G
from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.layer_weights import Weight, per_layer, table

__all__ = ["BiasSums"]


@dataclass(frozen=True)
class BiasSums:
    """The summed LoRA biases of one stack (see the module docstring).

    Attributes:
        layers: per arena, layer index -> its span of ``index`` and of ``terms``' columns, for
            the layers where several parts carry a LoRA bias.
        index: per arena, int64 ``[n]`` on the arena's device: the positions in a region's
            extras ``E[region]`` of those layers' ``g`` rows, one after the other.
        terms: per arena, float64 ``[parts, n]`` on the arena's device: each part's
            ``alpha / r * lora_bias`` on those rows (0 where the part has none).
    """

    layers: list[dict[int, slice]]
    index: list[torch.Tensor]
    terms: list[torch.Tensor]

    @classmethod
    def of(
        cls, buffers: BufferManager, parts: int, biases: dict[tuple[int, int], list[tuple[int, float, torch.Tensor]]]
    ) -> BiasSums | None:
        """From ``biases``: ``(arena, layer)`` -> ``(part, alpha / r, lora_bias [out])`` of every
        part with a LoRA bias there (several). None where there are none."""
        if not biases:
            return None
        layers, index, terms = [], [], []
        for a, arena in enumerate(buffers.arenas):
            spans: dict[int, slice] = {}
            rows, cols, start = [], [], 0
            for i in sorted(i for b, i in biases if b == a):
                out = arena.specs[i].out_dim
                spans[i] = slice(start, start + out)
                start += out
                rows.append(torch.arange(out) + arena.e_off[i] + EXTRA_G * out)
                col = torch.zeros(parts, out, dtype=torch.float64, device=arena.device)  # no host round trip
                for p, scale, bias in biases[(a, i)]:
                    col[p] = bias.detach().to(arena.device, torch.float64).reshape(-1) * scale
                cols.append(col)
            layers.append(spans)
            index.append((torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)).to(arena.device))
            empty = torch.zeros(parts, 0, dtype=torch.float64, device=arena.device)
            terms.append(torch.cat(cols, dim=1) if cols else empty)
        return cls(layers, index, terms)

    def values(self, a: int, weights: torch.Tensor) -> torch.Tensor:
        """Float64 ``[n]``: arena ``a``'s summed biases at ``weights`` (float64 ``[parts]`` on
        its device, or ``[parts, n_layers]``: a weight per layer), ``sum_p w_p * s_p * c_p``."""
        if weights.dim() == 2:  # each column at its layer's weights
            columns = torch.zeros_like(self.terms[a])
            for i, span in self.layers[a].items():
                columns[:, span] = weights[:, i, None]
            return (columns * self.terms[a]).sum(0)
        return weights @ self.terms[a]

    def largest(self, a: int, layer: int, weights: Sequence[float]) -> float:
        """The largest ``|value|`` of layer ``layer``'s summed bias at ``weights`` (float64; one
        per part, each its weight on that layer)."""
        w = torch.tensor(list(weights), dtype=torch.float64, device=self.terms[a].device)
        sums = self.values(a, w)[self.layers[a][layer]]
        return float(sums.abs().max()) if sums.numel() else 0.0

    def write(self, buffers: BufferManager, regions: Sequence[int], weights: torch.Tensor | Sequence[Weight]) -> None:
        """Writes the summed biases at ``weights`` (one per part: a float64 tensor on the arenas'
        device, as a captured replay holds it, or numbers, or weights per layer) into the ``g``
        rows of ``regions``."""
        with torch.no_grad():
            for a, arena in enumerate(buffers.arenas):
                if not len(self.index[a]):
                    continue
                if not isinstance(weights, torch.Tensor) and per_layer(weights):
                    w = torch.from_numpy(table(weights, a, len(arena.specs))).to(arena.device)
                else:
                    w = torch.as_tensor(weights, dtype=torch.float64).to(arena.device)
                sums = self.values(a, w).to(arena.E.dtype)
                for r in regions:
                    arena.e_dirty[r] = True  # before the copy: one interrupted leaves the rows to reset
                    arena.E[r].index_copy_(0, self.index[a], sums)
