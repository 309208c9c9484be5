"""``set_scale``'s device work on CUDA as one CUDA graph replay.

Re-weighting a slot changes nothing but its per-row scales (:mod:`lorahot.runtime.stack`), yet
on the device that is several steps, each a host-side launch: per arena, the upload of the new
scales from their pinned staging buffer, the copy into the live region when the slot is live,
and the wide layers' refresh of their scaled A rows (:class:`~lorahot.kernels.row_scale.RowScaler`).
Each launch costs the host tens of microseconds, more than the device work itself.

Every address those steps touch is fixed once the runtime exists: the scale buffers, the
staging buffer, the wide rows and the scaler's tables. Only three things vary: the slot, whether
it is live, and how many rows each arena's refresh covers. :class:`ScaleReplay` therefore
captures the steps once per such key as a CUDA graph, and a re-weighting is: write the scales
into the staging buffer (once its last upload is done), one replay, one event. The first call
with a key runs the ordinary path (it compiles the scaler's kernel, and a key seen once may
never come back); the second captures and replays.

Where it does not apply it does nothing and says so, and the caller takes the ordinary path:
arenas not all on one CUDA device, DoRA layers in the slot (their factors are recomputed from
the weights), merged mode, a wide layer refreshed by library calls, or a stream already
capturing (the caller's own CUDA graph).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict

import torch

from lorahot.kernels.row_scale import RowScaler
from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.stack import Stack
from lorahot.runtime.wide import WideWeights

__all__ = ["ScaleReplay"]

#: ``(slot, mirrored into the live region, rows each wide refresh covers)``
Key = tuple[int, bool, tuple[int, ...]]

#: graphs kept: keys differ only by slot, liveness and the live adapter's rank, so a few suffice
_KEEP = 16


class ScaleReplay:
    """The captured device steps of re-weighting, per :data:`Key` (see the module docstring)."""

    def __init__(self, buffers: BufferManager, wide: WideWeights) -> None:
        self.buffers = buffers
        self.wide = wide
        devices = {arena.device for arena in buffers.arenas}
        self.device = devices.pop() if len(devices) == 1 else None
        if self.device is not None and self.device.type != "cuda":
            self.device = None
        self._graphs: OrderedDict[Key, torch.cuda.CUDAGraph] = OrderedDict()
        self._seen: set[Key] = set()
        self._stream: torch.cuda.Stream | None = None

    def __call__(self, slot: int, live: bool, stack: Stack, scales: list[torch.Tensor]) -> bool:
        """Writes ``scales`` (per arena, float64 ``[n_layers, R]`` on the host) into ``slot``,
        and into the live region and the wide rows if ``live``, as :meth:`BufferManager.set_scales`
        and :meth:`WideWeights.apply` would. Returns False, having changed nothing, where a
        replay does not apply or the key is new: the caller then takes the ordinary path."""
        if self.device is None or any(stack.dora) or torch.cuda.is_current_stream_capturing():
            return False
        calls = self.wide.device_calls() if live else []
        if calls is None:
            return False
        mirrored = self.buffers._mirrored(slot, live)
        key = (slot, mirrored, tuple(rows for _, _, rows in calls))
        graph = self._graphs.get(key)
        if graph is None and key not in self._seen:
            self._seen.add(key)
            return False
        staged = [arena.stage_scales(s) for arena, s in zip(self.buffers.arenas, scales)]
        if graph is None:
            graph = self._capture(slot, mirrored, staged, calls)
            if graph is None:
                return False
            self._graphs[key] = graph
            if len(self._graphs) > _KEEP:
                self._graphs.popitem(last=False)
        self._graphs.move_to_end(key)
        with torch.cuda.device(self.device):
            graph.replay()
        for arena in self.buffers.arenas:
            arena.scale_staging.record()
        if live:
            self.wide.settle()
        return True

    def _capture(
        self,
        slot: int,
        mirrored: bool,
        staged: list[torch.Tensor],
        calls: list[tuple[RowScaler, torch.Tensor, int]],
    ) -> torch.cuda.CUDAGraph | None:
        """Captures the steps on a side stream (capturing runs nothing: the caller replays). A
        capture that fails turns the replays off, with a warning, and returns None: nothing
        ran, and the ordinary path stays correct, only slower."""
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(self.device):
            if self._stream is None:
                self._stream = torch.cuda.Stream()
            current = torch.cuda.current_stream()
            self._stream.wait_stream(current)
            try:
                with torch.cuda.stream(self._stream), torch.no_grad():
                    graph.capture_begin(capture_error_mode="thread_local")
                    try:
                        for arena, stage in zip(self.buffers.arenas, staged):
                            arena.S[slot].copy_(stage, non_blocking=True)
                            if mirrored:
                                arena.S[self.buffers.live].copy_(arena.S[slot])
                        for scaler, live_scales, rows in calls:
                            scaler(live_scales, rows)
                    finally:
                        graph.capture_end()
            except RuntimeError as e:
                self.device = None
                warnings.warn(
                    f"lorahot: set_scale could not capture its device steps as a CUDA graph ({e}); it keeps "
                    "the ordinary launches from now on (same results, more host time).",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return None
            finally:
                current.wait_stream(self._stream)
        return graph
