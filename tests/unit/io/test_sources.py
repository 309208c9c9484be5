"""Opening sources: pickle checkpoints are refused without being opened."""

from __future__ import annotations

from pathlib import Path

import pytest

import lorahot


def test_pickles_are_refused(tmp_path: Path) -> None:
    for name in ("adapter.bin", "adapter.pt", "adapter.ckpt"):
        (tmp_path / name).write_bytes(b"\x80\x04")
        with pytest.raises(lorahot.AdapterReadError, match=r"lorahot never unpickles\. Convert it to \.safetensors"):
            lorahot.read_adapter(tmp_path / name)
    with pytest.raises(
        lorahot.AdapterReadError, match=r"holds only pickle checkpoints \(adapter\.bin, adapter\.ckpt, adapter\.pt\)"
    ):
        lorahot.read_adapter(tmp_path)
