"""An adapter's part for one rank of a tensor-parallel model: which slices a rank reads from a
file, and how a module is cut to them (the layers themselves run in
``tests/system/test_tensor_parallel.py``, on two processes)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lorahot.io.loader import read_adapter, read_adapter_sliced
from lorahot.io.tensorfile import TensorSlice
from lorahot.layers.base import LayerSpec, Shard
from lorahot.runtime.sharding import file_slices, localize
from tests.helpers import make_adapter, save_peft

#: rank 1 of 2: q is column-parallel (outputs 2:4 of 4), o row-parallel (inputs 2:4 of 4)
SPECS = {
    "q": LayerSpec("linear", 6, 2, (6,), shard=Shard("out", 2, 4, 4, 1, 2)),
    "o": LayerSpec("linear", 2, 6, (2,), shard=Shard("in", 2, 4, 4, 1, 2)),
    "head": LayerSpec("linear", 6, 3, (6,)),
}


def _model() -> nn.Module:
    return nn.ModuleDict({"q": nn.Linear(6, 4), "o": nn.Linear(4, 6), "head": nn.Linear(6, 3)})


def _file(tmp_path: Path) -> tuple[Path, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    tensors, ab = make_adapter(_model(), {"q": 3, "o": 3, "head": 3})
    return save_peft(tmp_path / "a", tensors, r=3, lora_alpha=3), ab


def test_a_rank_reads_only_its_slices_of_the_sharded_factors(tmp_path: Path) -> None:
    path, ab = _file(tmp_path)
    tensors: dict[str, torch.Tensor] = {}
    meta = read_adapter(path, device="meta", _keys=tensors)
    slices = file_slices(meta, {id(t): k for k, t in tensors.items()}, SPECS)
    assert slices == {
        "base_model.model.q.lora_B.weight": TensorSlice(0, 2, 4),
        "base_model.model.o.lora_A.weight": TensorSlice(1, 2, 4),
    }
    adapter = read_adapter_sliced(path, lambda m, k: file_slices(m, k, SPECS))
    q, o = adapter.modules["q"], adapter.modules["o"]
    assert torch.equal(q.B[2:], ab["q"][1][2:]) and not q.B[:2].any() and torch.equal(q.A, ab["q"][0])
    assert torch.equal(o.A[:, 2:], ab["o"][0][:, 2:]) and not o.A[:, :2].any() and torch.equal(o.B, ab["o"][1])
    local, problems = localize("q", q, SPECS["q"])
    assert not problems and torch.equal(local.B, ab["q"][1][2:4]) and local.B.is_contiguous()
    local, problems = localize("o", o, SPECS["o"])
    assert not problems and torch.equal(local.A, ab["o"][0][:, 2:4]) and local.A.is_contiguous()


def test_unsharded_layers_are_untouched(tmp_path: Path) -> None:
    path, _ = _file(tmp_path)
    module = read_adapter(path).modules["head"]
    assert localize("head", module, SPECS["head"]) == (module, [])


@pytest.mark.parametrize("name, a, b", [("q", (3, 6), (2, 3)), ("o", (3, 2), (6, 3))])
def test_a_module_is_checked_against_the_whole_layer(name: str, a: tuple[int, int], b: tuple[int, int]) -> None:
    from lorahot.adapter import LoraModule

    module = LoraModule(name, torch.zeros(a), torch.zeros(b), 3.0)  # shaped like this rank's part: refused
    _, problems = localize(name, module, SPECS[name])
    assert len(problems) == 1
    assert "expected (r, " in problems[0] and "tensor-parallel linear" in problems[0] and "rank 1 of 2" in problems[0]
