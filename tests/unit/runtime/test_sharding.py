"""An adapter's part for one rank of a tensor-parallel model: how a module read whole is cut to
the rank's slices, and the sums of the whole factors the ranks compare (the layers themselves
and the ranks' refusals run in ``tests/system/test_tensor_parallel.py``, on two processes)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from lorahot.io.loader import read_adapter
from lorahot.layers.base import LayerSpec, Shard
from lorahot.runtime.fingerprint import checksums
from lorahot.runtime.sharding import cut_factors, localize
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


def test_a_rank_cuts_its_slices_of_the_sharded_factors(tmp_path: Path) -> None:
    path, ab = _file(tmp_path)
    adapter = read_adapter(path)
    local, problems = localize("q", adapter.modules["q"], SPECS["q"])
    assert not problems and torch.equal(local.B, ab["q"][1][2:4]) and local.B.is_contiguous()
    assert torch.equal(local.A, ab["q"][0])
    local, problems = localize("o", adapter.modules["o"], SPECS["o"])
    assert not problems and torch.equal(local.A, ab["o"][0][:, 2:4]) and local.A.is_contiguous()
    assert torch.equal(local.B, ab["o"][1])


@pytest.mark.parametrize("name, factor, index", [("q", "B", (0, 1)), ("q", "B", (3, 2)), ("o", "A", (1, 0))])
def test_the_cut_factor_is_summed_whole_every_ranks_slice_included(
    tmp_path: Path, name: str, factor: str, index: tuple[int, int]
) -> None:
    """B of a column-parallel layer, A of a row-parallel one: summed as read whole, before the
    cut, so an element changed in rank 0's slice (rows or columns 0:2, which rank 1 does not
    keep) moves rank 1's sums as one in its own slice does."""
    path, ab = _file(tmp_path)
    modules = read_adapter(path).modules
    got = cut_factors({name: modules[name]}, SPECS)[name]
    whole = ab[name][1] if factor == "B" else ab[name][0]
    assert (got.factor, got.dtype, got.shape) == (factor, whole.dtype, tuple(whole.shape))
    assert torch.equal(got.sums, checksums([whole])[0])
    edited = whole.clone()
    edited[index] += 1.0
    changed = {"A": modules[name].A, "B": modules[name].B, factor: edited}
    moved = cut_factors({name: replace(modules[name], **changed)}, SPECS)[name]
    assert not torch.equal(moved.sums, got.sums)


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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_a_cut_factor_read_onto_cuda_sums_as_on_the_host(tmp_path: Path, dtype: torch.dtype) -> None:
    """A load reads onto the arenas' GPU and sums there, a preload on the host: the ranks
    compare the two (rank 0's host cache against rank 1's read), so the sums of a file read
    onto CUDA must be the host's bitwise, for each factor the ranks cut."""
    path, _ = _file(tmp_path)
    host = read_adapter(path).modules
    cuda = read_adapter(path, device="cuda").modules
    cast = {n: replace(m, A=m.A.to(dtype), B=m.B.to(dtype)) for n, m in host.items() if n in ("q", "o")}
    on_cuda = {n: replace(m, A=m.A.to(dtype), B=m.B.to(dtype)) for n, m in cuda.items() if n in ("q", "o")}
    want, got = cut_factors(cast, SPECS), cut_factors(on_cuda, SPECS)
    assert on_cuda["q"].B.is_cuda and want.keys() == got.keys() == {"q", "o"}
    for name in want:
        assert got[name].sums.device.type == "cpu" and torch.equal(got[name].sums, want[name].sums)
        assert (got[name].factor, got[name].shape) == (want[name].factor, want[name].shape)
