"""``activate(slot)``'s device work on CUDA as one CUDA graph replay.

Activating a resident slot for the whole batch copies it into the live region (four device
copies per arena: A, B, the scales and the extras) and refreshes the wide layers' rows from it
(:class:`~lorahot.runtime.wide.WideWeights`: two Triton launches per arena). The copies take the
device about 0.06 ms on the TinyLlama shape at rank 64; the swap suite measured 0.19-0.29 ms per
activation on H200 hosts, the rest the host's issuing of the steps (as it was for loads from
the host cache, :mod:`lorahot.runtime.load_replay`).

:class:`ActivateReplay` captures those steps once per :data:`Key` on :mod:`lorahot.runtime.graph_replays`:
the slot, whether it holds an adapter (an empty one zeroes the wide rows), and the rows each
wide refresh covers. Every address the graph reads and writes is the arenas' and the wide
buffers', fixed for the runtime's life. Not in merged mode (the base weights are rewritten from
host-computed terms), nor where a wide layer is refreshed by library calls.
"""

from __future__ import annotations

import weakref

from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.graph_replays import Captured, GraphReplays
from lorahot.runtime.layer_weights import Weight
from lorahot.runtime.stack import Stack
from lorahot.runtime.wide import WideWeights

__all__ = ["ActivateReplay"]

#: ``(slot, the slot is empty, rows each wide refresh covers or None without wide layers)``
Key = tuple[int, bool, tuple[int, ...] | None]

#: graphs kept (a graph holds no memory of its own: its writes go to the arenas)
_KEEP = 16


class ActivateReplay(GraphReplays[Key]):
    """The captured device steps of ``activate(slot)``, per :data:`Key` (see the module docstring)."""

    def __init__(self, buffers: BufferManager, wide: WideWeights) -> None:
        super().__init__(buffers, _KEEP, "activate")
        self.wide = wide

    def __call__(self, slot: int, stack: Stack | None, weights: tuple[Weight, ...], merged: bool) -> bool:
        """Makes the live region a copy of ``slot`` and refreshes the wide rows from it
        (``stack``: what the slot holds, at ``weights``), as :meth:`BufferManager.activate`
        then :meth:`WideWeights.apply` would. Returns False, having changed nothing, where a
        replay does not apply or the key is new: the caller then takes the ordinary path."""
        if not self.applies() or merged:
            return False
        mirrored = self.buffers.mirrors(slot, True)
        refresh = not self.wide.empty
        if refresh and not self.wide.replayable():
            return False
        spans = self.wide.spans([arena.a_extent[slot] for arena in self.buffers.arenas]) if refresh else None
        if not mirrored and not any(spans or ()):  # nothing to do on the device: a graph would be empty
            return False
        key = (slot, stack is None, spans)
        captured = self.found(key, self.buffers)  # nothing named by id: the buffers own every graph
        if captured is None:
            if self.first_use(key):
                return False

            def steps() -> None:  # the ordinary steps
                self.buffers.activate(slot)
                if refresh:
                    self.wide.apply(stack)

            graph = self.capture_writes(steps, self.wide, stacklevel=4)  # the warning names the caller of activate
            if graph is None:
                return False
            captured = Captured(graph, weakref.ref(self.buffers))
            self.store(key, captured)
            self.replay(key, captured)
            return True  # the capture recorded the host's side as it went
        self.replay(key, captured)
        self.buffers.activated(slot)
        if refresh:
            self.wide.settle(empty=stack is None)
        return True
