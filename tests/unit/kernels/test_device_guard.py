"""Triton launches run on the current CUDA device: the guard switches to the tensors' device."""

from __future__ import annotations

import contextlib

import pytest
import torch

from lorahot.kernels.device_guard import launching_on


def test_switches_only_to_another_device(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert isinstance(launching_on(torch.device("cuda", 0)), contextlib.nullcontext)
    assert isinstance(launching_on(torch.device("cuda")), contextlib.nullcontext)  # the current one
    guard = launching_on(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_gpu_a_fused_layer_on_the_second_device_runs_there() -> None:
    """With cuda:0 current, a fused layer on cuda:1 gives what the library formula gives."""
    from torch import nn

    import lorahot

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128)).to("cuda:1", torch.bfloat16)
    runtime = lorahot.inject(model, ["0"], max_rank=8)
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, 64, generator=g), torch.randn(128, 8, generator=g)
    runtime.load({"0.lora_A.weight": a, "0.lora_B.weight": b})
    assert model[0].fused
    x = torch.randn(4, 64, device="cuda:1", dtype=torch.bfloat16)
    with torch.cuda.device(0), torch.no_grad():
        y = model(x)
        a, b, s = model[0].lora_A.float(), model[0].lora_B.float(), model[0].lora_scale.float()
        want = model[0].base_layer(x).float() + ((x.float() @ a.T) * s) @ b
    assert float((y.float() - want).norm() / want.norm()) < 2e-2
