"""The keyed CUDA graphs behind set_scale's and host-cache loads' replays
(lorahot.runtime.graph_replays): a key's first use takes the ordinary path, its second
captures; a graph of an owner that is gone is dropped when another object reuses the key; the
least recently used go beyond the limit; nothing applies off CUDA. The captures themselves run in
the GPU tests of test_scale_replay.py and test_load_replay.py."""

from __future__ import annotations

import weakref
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from lorahot.runtime.graph_replays import Captured, GraphReplays


def refuse_captures(monkeypatch: pytest.MonkeyPatch, launcher: type) -> None:
    """Makes ``launcher``'s launches fail while a stream captures, as a launch that cannot be
    captured would, and run as before otherwise."""
    launch = launcher.__call__

    def refuses(self: object, *args: object) -> None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("operation not permitted when stream is capturing")
        launch(self, *args)

    monkeypatch.setattr(launcher, "__call__", refuses)


def _replays(*devices: str, keep: int = 2) -> GraphReplays[Any]:
    buffers = SimpleNamespace(arenas=[SimpleNamespace(device=torch.device(d)) for d in devices])
    return GraphReplays(buffers, keep, "a test")  # type: ignore[arg-type]


class _Owner:
    pass


def test_replays_apply_on_one_cuda_device_only() -> None:
    assert _replays("cpu").device is None and not _replays("cpu").applies()
    assert _replays("cuda:0", "cuda:1").device is None
    assert _replays("cuda:0").device == torch.device("cuda:0")


def test_a_key_is_new_once() -> None:
    replays = _replays("cpu")
    assert replays.first_use(("a", 1))
    assert not replays.first_use(("a", 1))
    assert replays.first_use(("a", 2))


def test_a_graph_is_found_for_its_owner_only_and_the_least_recent_go() -> None:
    replays = _replays("cpu", keep=2)
    owners = [_Owner() for _ in range(3)]
    for i, owner in enumerate(owners):
        replays.store(i, Captured(graph=None, owner=weakref.ref(owner)))  # type: ignore[arg-type]
    assert replays.found(0, owners[0]) is None  # beyond the limit: gone
    assert replays.found(1, owners[1]) is not None and replays.found(2, owners[2]) is not None
    assert replays.found(1, _Owner()) is None  # another object at the key: dropped
    assert replays.found(1, owners[1]) is None


def _writer() -> tuple[GraphReplays[Any], SimpleNamespace, SimpleNamespace]:
    arena = SimpleNamespace(device=torch.device("cuda:0"), a_extent=[64, 0], b_extent=[64, 0], e_dirty=[True, False])
    replays: GraphReplays[Any] = GraphReplays(SimpleNamespace(arenas=[arena]), 2, "a test")  # type: ignore[arg-type]
    return replays, arena, SimpleNamespace(extent=[64])


def _steps(arena: SimpleNamespace, wide: SimpleNamespace, fail: bool) -> Any:
    def steps() -> None:  # the host's side of a write, then (``fail``) a launch that cannot be captured
        arena.a_extent[0], arena.b_extent[0], arena.e_dirty[0] = 8, 8, False
        wide.extent[0] = 8
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")

    return steps


@pytest.mark.usefixtures("fake_cuda")
def test_a_capture_keeps_the_record_its_writes_left() -> None:
    replays, arena, wide = _writer()
    assert replays.capture_writes(_steps(arena, wide, fail=False), wide, 1) is not None  # type: ignore[arg-type]
    assert (arena.a_extent, arena.b_extent, arena.e_dirty, wide.extent) == ([8, 0], [8, 0], [False, False], [8])
    assert replays.device is not None


@pytest.mark.usefixtures("fake_cuda")
def test_a_failed_capture_puts_the_record_back_and_turns_replays_off() -> None:
    replays, arena, wide = _writer()
    with pytest.warns(RuntimeWarning, match="a test could not capture"):
        assert replays.capture_writes(_steps(arena, wide, fail=True), wide, 1) is None  # type: ignore[arg-type]
    assert (arena.a_extent, arena.b_extent, arena.e_dirty, wide.extent) == ([64, 0], [64, 0], [True, False], [64])
    assert replays.device is None and not replays.applies()


@pytest.mark.usefixtures("fake_cuda")
def test_a_failed_capture_puts_the_record_back_where_warnings_are_errors() -> None:
    """The fallback's warning raised (``-W error``) still leaves the record as it was."""
    import warnings

    replays, arena, wide = _writer()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(RuntimeWarning, match="could not capture"):
            replays.capture_writes(_steps(arena, wide, fail=True), wide, 1)  # type: ignore[arg-type]
    assert (arena.a_extent, arena.b_extent, arena.e_dirty, wide.extent) == ([64, 0], [64, 0], [True, False], [64])
    assert replays.device is None
