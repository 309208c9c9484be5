"""A load from the host cache, its device writes on CUDA as one CUDA graph replay.

A prepared adapter (:meth:`LoRARuntime.preload`) is one pinned :class:`~lorahot.runtime.buffers.Pack`
per arena, so a load from the host cache is one upload and a few device writes per arena: the
zero fill where the slot's last adapter had more rows, the A and B rows (an ``index_copy_``
each), the per-row scales, the extras, the copy into the live region when the slot is live,
and the wide layers' refresh (:class:`~lorahot.runtime.wide.WideWeights`: two Triton launches
per arena). The device work is about 0.03 ms on an H200; issuing it took the host 0.26-0.55 ms
in different processes (``benchmarks/experiments/host_swap_probe.py``), more than the upload
itself (0.22 ms at rank 8), so the swap measured 1.5x to 2.6x its floor from one process to
the next.

:class:`LoadReplay` captures those writes, once per :data:`Key`, as a CUDA graph, and a load
is then: the checks, the upload (outside the graph, into the read buffers), one replay, and
the host's record of what changed (:meth:`BufferManager.wrote`, :meth:`WideWeights.settle`).
The key holds everything the writes depend on besides the staged bytes: the packs (their
layout), the slot, whether the live region mirrors it, whether the wide rows are refreshed and
over how many rows, the multiplier (a kernel argument), which arenas are zeroed first and which
have extras to reset, and where the upload landed (the address the graph reads). The first
load with a key takes the ordinary path (a key seen once may never come back); the second
captures and replays. The graph reads the arenas (fixed for the runtime's life) and the read
buffers' device memory at the key's address: a graph is replayed only after an upload to that
address of the same packs.

Where it does not apply it does nothing and the caller takes the ordinary path: arenas not all
on one CUDA device, DoRA layers (their factors are recomputed from the weights), merged mode,
wide layers refreshed by library calls, no read buffers, or a stream already capturing.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from lorahot.runtime.buffers import BufferManager, Pack
from lorahot.runtime.stack import Stack
from lorahot.runtime.wide import WideWeights

__all__ = ["LoadReplay"]

#: ``(id of the first pack, slot, mirrored, wide spans or None, multiplier as hex, zeroed per
#: arena, extras reset per arena, staged addresses)``
Key = tuple[int, int, bool, tuple[int, ...] | None, str, tuple[bool, ...], tuple[bool, ...], tuple[int, ...]]

#: graphs kept (a graph holds no memory of its own: its writes go to the arenas)
_KEEP = 32

#: keys remembered as seen once, before the memory of them is cleared
_SEEN = 256


@dataclass
class _Replay:
    """One captured graph and the packs it was captured for."""

    graph: torch.cuda.CUDAGraph
    packs: weakref.ref[Pack]


class LoadReplay:
    """The captured device writes of a load from the host cache, per :data:`Key` (see the module docstring)."""

    def __init__(self, buffers: BufferManager, wide: WideWeights) -> None:
        self.buffers = buffers
        self.wide = wide
        devices = {arena.device for arena in buffers.arenas}
        self.device = devices.pop() if len(devices) == 1 else None
        if self.device is not None and self.device.type != "cuda":
            self.device = None
        self._graphs: OrderedDict[Key, _Replay] = OrderedDict()
        self._seen: set[Key] = set()
        self._stream: torch.cuda.Stream | None = None
        #: loads that replayed a graph (for tests and probes)
        self.replays = 0

    def __call__(
        self,
        slot: int,
        live: bool,
        packs: list[Pack],
        staged: list[torch.Tensor],
        multiplier: float,
        stack: Stack,
        merged: bool,
    ) -> bool:
        """Writes ``packs`` (``staged``: their data on the device, :meth:`BufferManager.stage`)
        into ``slot`` at ``multiplier``, into the live region too and the wide rows if ``live``,
        as :meth:`BufferManager.write` then :meth:`WideWeights.apply` would. Returns False,
        having changed nothing, where a replay does not apply or the key is new: the caller
        then takes the ordinary path. ``merged``: the runtime is in merged mode."""
        if self.device is None or merged or any(stack.dora) or not packs or torch.cuda.is_current_stream_capturing():
            return False
        refresh = live and not self.wide.empty
        if refresh and not self.wide.replayable():
            return False
        key = self._key(slot, live, packs, staged, multiplier, refresh)
        replay = self._graphs.get(key)
        if replay is not None and replay.packs() is not packs[0]:  # other packs at a reused id
            del self._graphs[key]
            replay = None
        if replay is None:
            if key not in self._seen:
                if len(self._seen) >= _SEEN:
                    self._seen.clear()
                self._seen.add(key)
                return False
            replay = self._capture(slot, live, packs, staged, multiplier, stack, refresh)
            if replay is None:
                return False
            self._graphs[key] = replay
            if len(self._graphs) > _KEEP:
                self._graphs.popitem(last=False)
        else:  # the capture recorded the host's side as it went; a replay records it here
            self.buffers.wrote(slot, packs, live)
            if refresh:
                self.wide.settle()
        self._graphs.move_to_end(key)
        with torch.cuda.device(self.device):
            replay.graph.replay()
        self.replays += 1
        return True

    def _key(
        self, slot: int, live: bool, packs: list[Pack], staged: list[torch.Tensor], multiplier: float, refresh: bool
    ) -> Key:
        arenas = self.buffers.arenas
        spans = self.wide.spans([pack.a_rows for pack in packs]) if refresh else None
        return (
            id(packs[0]),
            slot,
            self.buffers.mirrors(slot, live),
            spans,
            float(multiplier).hex(),
            tuple(arena.needs_zero(slot, pack) for arena, pack in zip(arenas, packs)),
            tuple(arena.e_dirty[slot] for arena in arenas),
            tuple(t.data_ptr() for t in staged),
        )

    def _capture(
        self,
        slot: int,
        live: bool,
        packs: list[Pack],
        staged: list[torch.Tensor],
        multiplier: float,
        stack: Stack,
        refresh: bool,
    ) -> _Replay | None:
        """Captures the ordinary writes on a side stream. Capturing runs nothing on the device
        (the caller replays) but runs the host's side of the writes, their record of extents:
        a capture that fails puts that record back, turns the replays off with a warning, and
        returns None, so the ordinary path then runs from the state it expects."""
        assert self.device is not None
        saved = self._record()
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
                        self.buffers.write(slot, packs, multiplier, live=live, staged=staged)
                        if refresh:
                            self.wide.apply(stack, (multiplier,))
                    finally:
                        graph.capture_end()
            except RuntimeError as e:
                self._restore(saved)
                self.device = None
                self._graphs.clear()
                warnings.warn(
                    f"lorahot: a load from the host cache could not capture its device writes as a CUDA graph ({e}); "
                    "loads keep the ordinary launches from now on (same results, more host time).",
                    RuntimeWarning,
                    stacklevel=4,
                )
                return None
            finally:
                current.wait_stream(self._stream)
        return _Replay(graph, weakref.ref(packs[0]))

    def _record(self) -> tuple[list[tuple[list[int], list[int], list[bool]]], list[int]]:
        """The host's record a write changes: every arena's extents and extras flags, and the wide rows' extents."""
        arenas = [(list(a.a_extent), list(a.b_extent), list(a.e_dirty)) for a in self.buffers.arenas]
        return arenas, list(self.wide.extent)

    def _restore(self, saved: tuple[list[tuple[list[int], list[int], list[bool]]], list[int]]) -> None:
        for arena, (a, b, e) in zip(self.buffers.arenas, saved[0]):
            arena.a_extent[:], arena.b_extent[:], arena.e_dirty[:] = a, b, e
        self.wide.extent[:] = saved[1]
