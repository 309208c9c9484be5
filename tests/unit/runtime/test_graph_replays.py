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
