"""Stand-ins for the CUDA runtime, so that the keyed graph replays (lorahot.runtime.graph_replays)
run their host side, and with :class:`_ReplayingGraph` their replays, on a CPU box; a 1-rank
gloo process group for DTensors and FSDP (:func:`one_rank`)."""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lorahot.runtime.graph_replays import GraphReplays


class _FakeGraph:
    """Stands in for ``torch.cuda.CUDAGraph`` on a CPU box: capturing runs the steps' host side."""

    def capture_begin(self, **_: object) -> None:
        pass

    def capture_end(self) -> None:
        pass


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Enough of ``torch.cuda`` for :meth:`GraphReplays.capture` to run its host side on a CPU box."""
    from contextlib import nullcontext

    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "device", lambda device: nullcontext())
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)


class _ReplayingGraph(_FakeGraph):
    """A stand-in CUDA graph that replays on a CPU box: the CPU has no queue, so its capture ran
    the steps' device side at once, and a replay runs the steps again with the host's record of
    the arenas and the wide rows put back after, as a replay repeats only the device's side.
    Its replay decides the steps' branches again from the state at the time, where a real one
    repeats those of its capture: it checks the replay paths and the record they leave, not
    that a key holds everything the steps depend on (the GPU tests do)."""

    steps: Any = None
    owner: Any = None

    def replay(self) -> None:
        arenas = self.owner.buffers.arenas
        record = [(list(a.a_extent), list(a.b_extent), list(a.e_dirty)) for a in arenas]
        wide = getattr(self.owner, "wide", None)  # merged mode's replays have no wide layers
        extent = None if wide is None else list(wide.extent)
        self.steps()
        for arena, (a, b, e) in zip(arenas, record):
            arena.a_extent[:], arena.b_extent[:], arena.e_dirty[:] = a, b, e
        if wide is not None:
            wide.extent[:] = extent


@pytest.fixture
def replaying_cuda(fake_cuda: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """:func:`fake_cuda` with graphs that replay (:class:`_ReplayingGraph`) on the CPU."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _ReplayingGraph)
    capture = GraphReplays.capture

    def keeping_steps(self: GraphReplays[Any], steps: Any, stacklevel: int) -> Any:
        graph = capture(self, steps, stacklevel + 1)
        if graph is not None:
            graph.steps, graph.owner = steps, self
        return graph

    monkeypatch.setattr(GraphReplays, "capture", keeping_steps)


@pytest.fixture(scope="module")
def one_rank() -> Iterator[Any]:
    """A 1-rank gloo process group in this process and its CPU device mesh."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("needs torch.distributed with gloo")
    from torch.distributed.device_mesh import init_device_mesh

    started = not dist.is_initialized()
    if started:
        dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield init_device_mesh("cpu", (1,))
    if started:
        dist.destroy_process_group()
