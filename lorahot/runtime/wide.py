"""Keeps the wide layers' ``s[:, None] * A`` rows equal to the live adapter.

A widened layer (:mod:`lorahot.layers.linear`) computes its base output and its shrink in one
GEMM over ``[W; s[:, None] * A]``. Those A rows are a second copy of the live region's A, each
row times its scale, so whatever changes the live region or its scales (load, activate,
set_scale, unload) ends with :meth:`WideWeights.apply`: per arena, one batched copy of the
live A rows into the wide buffers and one multiply by the scales, both over only the rows any
adapter has used since the last refresh (a rank-8 swap after a rank-8 swap touches 8 rows per
layer, not ``max_rank``).

With one adapter live every row of a layer has the layer's scale: the runtime passes those
per-layer scales from the host, and the multiply is one multi-tensor launch with no
device-to-host read. With a stack live (:mod:`lorahot.runtime.stack`) the rows of each part
have their own scales: the multiply reads them from the live region's per-row scales, on the
device (one launch per layer). Shapes and addresses of the wide buffers never change; a
compiled graph or a captured CUDA graph reads them in place.
"""

from __future__ import annotations

import torch

from lorahot.errors import UsageError
from lorahot.layers import LoRALayer
from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.plan import LoadPlan

__all__ = ["WideWeights", "widen_layers", "DEVICE_TYPES"]

#: Devices whose layers are widened. On CUDA the wide GEMM saves a kernel launch and a pass
#: over the input per layer; on the CPU it saves little, and the plain formula keeps the
#: outputs right after inject bitwise those of the base model (a GEMM with more output columns
#: may sum in another order). The tests widen CPU layers too, to exercise the mechanism.
DEVICE_TYPES = {"cuda"}


def widen_layers(layers: dict[str, LoRALayer], buffers: BufferManager) -> None:
    """Widens every layer that can be: on a device of :data:`DEVICE_TYPES`, its weight of the
    arena's dtype (see :meth:`LoRALayer.widenable`). The others keep the library formula."""
    for name, layer in layers.items():
        arena = buffers.arenas[buffers.where[name][0]]
        if arena.device.type in DEVICE_TYPES and layer.widenable(buffers.max_rank, arena.dtype):
            layer.widen(buffers.max_rank)


class WideWeights:
    """The wide layers of one runtime, grouped by arena, and their refresh."""

    def __init__(self, layers: dict[str, LoRALayer], buffers: BufferManager) -> None:
        self.buffers = buffers
        #: per arena: (layer indices, wide A rows, live A rows), in the same order
        self.groups: list[tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = [
            ([], [], []) for _ in buffers.arenas
        ]
        for name, layer in layers.items():
            if not layer.wide:
                continue
            arena, index = buffers.where[name]
            live_a, _ = buffers.arenas[arena].rows(index, buffers.live)
            indices, wide, live = self.groups[arena]
            indices.append(index)
            wide.append(layer.wide_rows())
            live.append(live_a)
        # the layer indices as index tensors, built once: every load, swap and set_scale reads them
        self._index = [torch.tensor(indices, dtype=torch.long) for indices, _, _ in self.groups]
        self.extent = [0] * len(buffers.arenas)  # rows of the wide buffers that may be nonzero
        self._views: dict[tuple[int, int], tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]] = {}

    @property
    def nbytes(self) -> int:
        """Bytes the wide buffers added to the model (their A rows; the weights moved in)."""
        return sum(w.nbytes for _, wide, _ in self.groups for w in wide)

    @property
    def empty(self) -> bool:
        return not any(indices for indices, _, _ in self.groups)

    def check(self, plan: LoadPlan, multiplier: float, names: list[list[str]]) -> None:
        """Refuses a ``multiplier`` under which some wide layer's ``scale * A`` would leave its
        dtype's range (float16 tops out at 65504; the plain formula scales after the products).
        Each part of a stack is checked with its own weight: its rows hold only its own A.

        Raises:
            UsageError: naming the layer, the largest value and the largest multiplier allowed.
        """
        for a, (indices, _, _) in enumerate(self.groups):
            if not indices or len(plan.scaled_a) <= a:
                continue
            top = torch.finfo(self.buffers.arenas[a].dtype).max
            values = plan.scaled_a[a][self._index[a]]
            worst = int(values.argmax())
            largest = float(values[worst])
            if largest * abs(multiplier) > top:
                layer = names[a][indices[worst]] if a < len(names) else f"layer {indices[worst]}"
                raise UsageError(
                    f"{plan.source}, {layer}: scale={multiplier:g} times alpha/r times max|A| is "
                    f"{largest * abs(multiplier):.4g}, beyond the {self.buffers.arenas[a].dtype} range (max {top:.4g}) "
                    f"of the layer's scaled A rows. Pass a scale of at most {top / largest:.4g} in magnitude, or "
                    "inject with fused=False (the plain formula scales after the products)."
                )

    def apply(self, live: bool, scales: list[torch.Tensor] | None = None) -> None:
        """Sets every wide layer's A rows to the live A times its per-row scales, or to zero
        when no adapter is ``live``.

        Args:
            live: whether an adapter (or a stack) is live.
            scales: per arena, float64 ``[n_layers]`` on the host (user multiplier included)
                when every row of a layer has the same scale (one adapter): one batched
                multiply by host numbers. None: each row's own scale, read from the live
                region on the device (a stack).
        """
        with torch.no_grad():
            for a, (indices, _, _) in enumerate(self.groups):
                if not indices:
                    continue
                rows = max(self.extent[a], self.buffers.arenas[a].a_extent[self.buffers.live])
                if rows == 0:
                    continue
                wide, live_a, row_scales = self._rows(a, rows)
                if not live:
                    torch._foreach_zero_(wide)
                else:
                    torch._foreach_copy_(wide, live_a)
                    if scales is not None:
                        torch._foreach_mul_(wide, scales[a][self._index[a]].tolist())
                    else:
                        torch._foreach_mul_(wide, row_scales)  # [rows, in] * [rows, 1]: one launch per layer
                self.extent[a] = self.buffers.arenas[a].a_extent[self.buffers.live] if live else 0

    def _rows(self, arena: int, rows: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """The first ``rows`` rows of arena ``arena``'s wide and live A blocks, and of their
        live scales as ``[rows, 1]`` columns (memoized)."""
        key = (arena, rows)
        found = self._views.get(key)
        if found is None:
            indices, wide, live = self.groups[arena]
            at = self.buffers.arenas[arena]
            scales = [at.scale(i, self.buffers.live)[:rows, None] for i in indices]
            found = self._views[key] = ([w[:rows] for w in wide], [t[:rows] for t in live], scales)
        return found
