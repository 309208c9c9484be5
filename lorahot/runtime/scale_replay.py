"""``set_scale``'s device work on CUDA as one CUDA graph replay.

Re-weighting a slot changes nothing but its per-row scales (:mod:`lorahot.runtime.stack`), yet
the ordinary path is several steps, each host work or a launch: the scales computed on the host
(a gather and a multiply over every row of every layer), their upload from a pinned staging
buffer, the copy into the live region when the slot is live, and the wide layers' refresh of
their scaled B columns (:class:`~lorahot.kernels.row_scale.RowScaler`). On an H200's host the
steps after the checks took about 0.17 ms, more than the device work itself.

Each row's scale is its part's ``alpha / r`` times its part's weight (:attr:`Stack.owners`),
so for a given stack only the weights vary. :class:`ScaleReplay` captures, once per
:data:`Key` (slot, whether it is live, the rows each wide refresh covers, and the stack), a CUDA
graph that uploads the weights (one number per part) from a pinned buffer, computes
``S[slot] = own * w[part]`` on the device and writes it to the live region too (one kernel,
:func:`~lorahot.kernels.row_scale.stack_scales`: float64, rounded to the scales' dtype as the
host path rounds, bit for bit the same), writes the sums of the LoRA biases that several parts
carry on one layer (:meth:`~lorahot.runtime.bias_sums.BiasSums.write`, the ordinary path's own
call, on the device weights), and refreshes the wide rows.
A re-weighting is then: the checks, the weights written to the pinned buffer (once its last
upload is done), one replay, one event. The first call with a key runs the ordinary path (it
also compiles the scaler's kernel, and a key seen once may never come back); the second
captures and replays. Every address a graph reads is fixed for the runtime's life, and each
graph keeps its own device copy of its stack's ``own`` and ``part``.

Where it does not apply it does nothing and says so, and the caller takes the ordinary path:
arenas not all on one CUDA device, DoRA layers in the slot (their factors are recomputed from
the weights), merged mode, a wide layer refreshed by library calls, or a stream already
capturing (the caller's own CUDA graph).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import torch

from lorahot.kernels.row_scale import RowScaler, stack_scales
from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.graph_replays import Captured, GraphReplays
from lorahot.runtime.stack import Stack
from lorahot.runtime.staging import Staging
from lorahot.runtime.wide import WideWeights

__all__ = ["ScaleReplay"]

#: ``(slot, mirrored into the live region, rows each wide refresh covers, id of the stack)``
Key = tuple[int, bool, tuple[int, ...], int]

#: graphs kept (each holds its stack's rows on the device, about 1.5x one region's scales)
_KEEP = 16


class ScaleReplay(GraphReplays[Key]):
    """The captured device steps of re-weighting, per :data:`Key` (see the module docstring)."""

    def __init__(self, buffers: BufferManager, wide: WideWeights) -> None:
        super().__init__(buffers, _KEEP, "set_scale")
        self.wide = wide

    def __call__(self, slot: int, live: bool, stack: Stack, weights: Sequence[float]) -> bool:
        """Sets the per-row scales of ``slot`` to ``stack`` at ``weights`` (one per part), and
        the live region's and the wide rows if ``live``, as :meth:`BufferManager.set_scales` and
        :meth:`WideWeights.apply` would. Returns False, having changed nothing, where a replay
        does not apply or the key is new: the caller then takes the ordinary path."""
        if not self.applies() or any(stack.dora):
            return False
        calls = self.wide.device_calls() if live else []
        if calls is None:
            return False
        mirrored = self.buffers.mirrors(slot, live)
        key = (slot, mirrored, tuple(rows for _, _, rows in calls), id(stack))
        captured = self.found(key, stack)
        if captured is None:
            if self.first_use(key):
                return False
            captured = self._capture(slot, mirrored, stack, calls)
            if captured is None:
                return False
            self.store(key, captured)
        staging, _ = captured.keep
        host = staging.acquire()
        host.numpy()[:] = np.asarray(weights, dtype=np.float64)
        self.replay(key, captured)
        staging.record()
        if live:
            self.wide.settle()
        return True

    def _capture(
        self, slot: int, mirrored: bool, stack: Stack, calls: list[tuple[RowScaler, torch.Tensor, int]]
    ) -> Captured | None:
        """The steps captured: the weights uploaded from a pinned buffer of the graph's own,
        every row's scale computed on the device (float64, rounded once) into the slot and the
        live region, and the wide rows refreshed. None where the capture failed."""
        assert self.device is not None
        staging = Staging(len(stack.parts), torch.float64, self.device)
        weights = torch.zeros(len(stack.parts), dtype=torch.float64, device=self.device)
        rows = [
            (torch.from_numpy(own).to(self.device), torch.from_numpy(part).to(self.device, torch.int64))
            for own, part in stack.owners
        ]

        sums = stack.bias_sums

        def steps() -> None:
            weights.copy_(staging.buffer, non_blocking=True)
            live = self.buffers.live
            for arena, (own, part) in zip(self.buffers.arenas, rows):
                stack_scales(own, part, weights, arena.S[slot], arena.S[live] if mirrored else None)
            if sums is not None:  # several LoRA biases on one layer: their sum at the new weights
                sums.write(self.buffers, [slot, live] if mirrored else [slot], weights)
            for scaler, live_scales, n in calls:
                scaler(live_scales, n)

        graph = self.capture(steps, stacklevel=5)  # the warning names the caller of set_scale
        if graph is None:
            return None
        held = [weights, *(t for pair in rows for t in pair), *(() if sums is None else (*sums.index, *sums.terms))]
        return Captured(graph, weakref.ref(stack), (staging, held))
