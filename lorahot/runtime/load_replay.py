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

import weakref
from collections.abc import Callable

import torch

from lorahot.runtime.buffers import BufferManager, Pack
from lorahot.runtime.graph_replays import Captured, GraphReplays
from lorahot.runtime.stack import Stack
from lorahot.runtime.wide import WideWeights

__all__ = ["LoadReplay"]

#: ``(id of the first pack, slot, mirrored, wide spans or None, multiplier as hex, zeroed per
#: arena, extras reset per arena, staged addresses)``
Key = tuple[int, int, bool, tuple[int, ...] | None, str, tuple[bool, ...], tuple[bool, ...], tuple[int, ...]]

#: graphs kept (a graph holds no memory of its own: its writes go to the arenas)
_KEEP = 32


class LoadReplay(GraphReplays[Key]):
    """The captured device writes of a load from the host cache, per :data:`Key` (see the module docstring)."""

    def __init__(self, buffers: BufferManager, wide: WideWeights) -> None:
        super().__init__(buffers, _KEEP, "a load from the host cache")
        self.wide = wide

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
        if not self.applies() or merged or any(stack.dora) or not packs:
            return False
        refresh = live and not self.wide.empty
        if refresh and not self.wide.replayable():
            return False
        key = self._key(slot, live, packs, staged, multiplier, refresh)
        captured = self.found(key, packs[0])
        if captured is None:
            if self.first_use(key):
                return False

            def steps() -> None:  # the ordinary writes
                self.buffers.write(slot, packs, multiplier, live=live, staged=staged)
                if refresh:
                    self.wide.apply(stack)

            captured = self._capture(steps, packs[0])
            if captured is None:
                return False
            self.store(key, captured)
            self.replay(key, captured)
            return True  # the capture recorded the host's side as it went
        self.replay(key, captured)
        self.buffers.wrote(slot, packs, live)
        if refresh:
            self.wide.settle()
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

    def _capture(self, steps: Callable[[], None], owner: Pack) -> Captured | None:
        graph = self.capture_writes(steps, self.wide, stacklevel=7)  # the warning names the caller of load
        return None if graph is None else Captured(graph, weakref.ref(owner))
