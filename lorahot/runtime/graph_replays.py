"""Device steps captured as a CUDA graph once per key, and replayed after.

The mechanism behind the replays of ``set_scale`` (:mod:`lorahot.runtime.scale_replay`), of
loads from the host cache (:mod:`lorahot.runtime.load_replay`) and of ``activate``
(:mod:`lorahot.runtime.activate_replay`). Issuing a few small device
steps costs the host more than the device takes to run them; one replay of the captured steps
costs it one launch.

- **Keys.** A key names everything the steps depend on besides the data the graph reads at
  fixed addresses. An object the key names by ``id`` (a stack, a pack) is its *owner*, held
  weakly: a graph whose owner is gone, and whose key another object now matches, is dropped.
- **Second use.** The first use of a key takes the caller's ordinary path (a key seen once may
  never come back), the second captures and replays, later ones replay.
- **Failure.** A capture that fails turns the replays off for good, with a warning, and
  returns None: nothing ran, and the caller's ordinary path stays correct, only slower.
- **Where.** Arenas all on one CUDA device, and no stream already capturing (the caller's own
  CUDA graph); elsewhere :attr:`GraphReplays.device` is None and nothing is captured.
"""

from __future__ import annotations

import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import torch

from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.wide import WideWeights

__all__ = ["GraphReplays", "Captured"]

K = TypeVar("K", bound=Hashable)

#: keys remembered as seen once, before the memory of them is cleared
_SEEN = 256


@dataclass
class Captured:
    """One captured graph, the owner its key names, and what the graph needs kept (its
    caller's: pinned buffers it uploads from, device tensors it reads)."""

    graph: torch.cuda.CUDAGraph
    owner: weakref.ref[Any]
    keep: Any = None


class GraphReplays(Generic[K]):
    """Captured graphs of one kind of device steps, per key (see the module docstring); the
    latest ``keep`` used are kept."""

    def __init__(self, buffers: BufferManager, keep: int, what: str) -> None:
        self.buffers = buffers
        devices = {arena.device for arena in buffers.arenas}
        #: the device the graphs run on; None where replays do not apply (or were turned off)
        self.device: torch.device | None = devices.pop() if len(devices) == 1 else None
        if self.device is not None and self.device.type != "cuda":
            self.device = None
        self._keep = keep
        self._what = what
        self._graphs: OrderedDict[K, Captured] = OrderedDict()
        self._seen: set[K] = set()
        self._stream: torch.cuda.Stream | None = None
        #: replays run (for tests and probes)
        self.replays = 0

    def applies(self) -> bool:
        """Whether a replay may apply now (a CUDA device, no stream capturing)."""
        return self.device is not None and not torch.cuda.is_current_stream_capturing()

    def found(self, key: K, owner: object) -> Captured | None:
        """The graph captured for ``key`` and ``owner``, else None (a graph of another owner at
        a reused ``id`` is dropped)."""
        captured = self._graphs.get(key)
        if captured is not None and captured.owner() is not owner:
            del self._graphs[key]
            return None
        return captured

    def first_use(self, key: K) -> bool:
        """Whether ``key`` is new (remembered from now on): the caller then takes its ordinary path."""
        if key in self._seen:
            return False
        if len(self._seen) >= _SEEN:
            self._seen.clear()
        self._seen.add(key)
        return True

    def capture(self, steps: Callable[[], None], stacklevel: int) -> torch.cuda.CUDAGraph | None:
        """``steps`` captured as a CUDA graph on a side stream (capturing runs nothing on the
        device; the caller replays), or None where the capture failed: replays are then turned
        off (the work queued before is waited for, so that no graph dropped here is still
        reading a buffer it keeps), with a warning at ``stacklevel``."""
        assert self.device is not None
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
                        steps()
                    finally:
                        graph.capture_end()
            except RuntimeError as e:
                torch.cuda.synchronize(self.device)
                self.device = None
                self._graphs.clear()
                warnings.warn(
                    f"lorahot: {self._what} could not capture its device steps as a CUDA graph ({e}); it keeps "
                    "the ordinary launches from now on (same results, more host time).",
                    RuntimeWarning,
                    stacklevel=stacklevel + 1,
                )
                return None
            finally:
                current.wait_stream(self._stream)
        return graph

    def capture_writes(
        self, steps: Callable[[], None], wide: WideWeights, stacklevel: int
    ) -> torch.cuda.CUDAGraph | None:
        """:meth:`capture` for ``steps`` that write the arenas and the wide rows through their
        ordinary code: capturing runs the host's side of those writes (the record of extents
        and extras) as it goes, so a capture that fails puts that record back, and the caller's
        ordinary path then runs from the state it expects."""
        arenas = [(list(a.a_extent), list(a.b_extent), list(a.e_dirty)) for a in self.buffers.arenas]
        extent = list(wide.extent)
        graph = None
        try:
            graph = self.capture(steps, stacklevel + 1)
        finally:
            if graph is None:  # failed, or raised (the warning, where warnings are errors)
                for arena, (a, b, e) in zip(self.buffers.arenas, arenas):
                    arena.a_extent[:], arena.b_extent[:], arena.e_dirty[:] = a, b, e
                wide.extent[:] = extent
        return graph

    def store(self, key: K, captured: Captured) -> None:
        """Keeps ``captured`` for ``key`` (the least recently used beyond ``keep`` go)."""
        self._graphs[key] = captured
        if len(self._graphs) > self._keep:
            self._graphs.popitem(last=False)

    def replay(self, key: K, captured: Captured) -> None:
        """Replays ``captured`` on the current stream (``key`` becomes the most recently used)."""
        self._graphs.move_to_end(key)
        with torch.cuda.device(self.device):
            captured.graph.replay()
        self.replays += 1
