"""Calls made in and out of ``torch.inference_mode()`` in turn; on CUDA each call's device
steps are captured as CUDA graphs on a later use (loads from the host cache, activate,
set_scale, merged mode's checks and rewrite): a buffer first made inside inference mode is an
inference tensor, which an in-place write outside it may not touch."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorahot
from tests.helpers import make_adapter

NAMES = ["0", "1", "2"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _model(device: str) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Linear(64, 64)).to(device).bfloat16()


def _steps(model: nn.Module, runtime: lorahot.LoraRuntime, merged: bool) -> list[Callable[[], object]]:
    """One round of calls: a load from file, a host-cache load into another slot, activations,
    scales (and a per-row routing unmerged)."""
    targets = {"0": "0", "1": "2", "2": "3"}
    directory = tempfile.mkdtemp()
    files = []
    for seed in (1, 2):
        tensors = make_adapter(model, {targets[n]: 8 * seed for n in NAMES}, seed=seed)[0]
        files.append(os.path.join(directory, f"{seed}.safetensors"))
        save_file(tensors, files[-1])
    runtime.preload(files[1], key="b")
    steps: list[Callable[[], object]] = [
        lambda: runtime.load(files[0], slot=0),
        lambda: runtime.load("b", slot=1),
        lambda: runtime.activate(1),
        lambda: runtime.set_scale(0.5),
        lambda: runtime.activate(0),
        lambda: runtime.set_scale(2.0),
    ]
    if not merged:
        steps += [lambda: runtime.activate([0, 1, -1, 1]), lambda: runtime.activate(0)]
    return steps


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("first", ["outside", "inside"])
def test_calls_in_and_out_of_inference_mode_equal_calls_outside_it(device: str, merged: bool, first: str) -> None:
    """Four rounds of the same calls, the rounds alternately inside and outside inference mode
    (so that graphs captured in one are replayed in the other), against a runtime whose calls
    all run outside it: every call goes through, and after each round the outputs and weights
    are bitwise the reference's."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pairs = []
    for k in range(2):  # this runtime injected in the first round's mode, the reference outside
        model = _model(device)
        with torch.inference_mode() if k == 0 and first == "inside" else contextlib.nullcontext():
            runtime = lorahot.inject(model, ["0", "2", "3"], max_rank=16, slots=2, merged=merged)
        pairs.append((model, runtime, _steps(model, runtime, merged)))
    x = torch.randn(4, 64, device=device, dtype=torch.bfloat16)
    for round_ in range(4):
        inside = (round_ % 2 == 0) == (first == "inside")
        mine, ref = pairs
        for step, ref_step in zip(mine[2], ref[2], strict=True):
            with torch.inference_mode() if inside else contextlib.nullcontext():
                step()
            ref_step()
        with torch.no_grad():
            assert torch.equal(mine[0](x), ref[0](x)), round_
        for (k, a), b in zip(mine[0].state_dict().items(), ref[0].state_dict().values(), strict=True):
            assert torch.equal(a, b), (round_, k)
