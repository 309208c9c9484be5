"""Merged mode: the adapter folded into the base weights equals the unmerged LoRA output."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorahot
from tests.helpers import make_adapter, tiny_lm, token_ids


def _pair(slots: int = 1) -> tuple[nn.Module, nn.Module, lorahot.LoraRuntime, lorahot.LoraRuntime]:
    torch.manual_seed(0)
    plain = tiny_lm(dtype=torch.float64)
    merged = copy.deepcopy(plain)
    targets = ["q_proj", "v_proj", "embed_tokens"]
    return (
        plain,
        merged,
        lorahot.inject(plain, targets, max_rank=8, slots=slots),
        lorahot.inject(merged, targets, max_rank=8, slots=slots, merged=True),
    )


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), (a - b).abs().max()


@pytest.mark.parametrize("eject", ["runtime", "module"])
def test_merged_equals_unmerged_through_swaps_and_eject_restores(eject: str) -> None:
    plain, merged, rt_plain, rt_merged = _pair(slots=2)
    ids = token_ids((2, 5), vocab=32)
    base = merged(ids).clone()
    weights = {n: p.clone() for n, p in merged.state_dict().items()}
    for seed, (slot, rank) in enumerate([(0, 4), (1, 8), (0, 2)]):
        names = list(rt_plain.layers)
        tensors = make_adapter(plain, dict.fromkeys(names, rank), seed=seed, dtype=torch.float64)[0]
        for rt in (rt_plain, rt_merged):
            rt.load(tensors, slot=slot, scale=0.5 + seed)
        _close(merged(ids), plain(ids))
    for rt in (rt_plain, rt_merged):
        rt.activate(1)
        rt.set_scale(0.3)
    _close(merged(ids), plain(ids))
    rt_merged.eject() if eject == "runtime" else lorahot.eject(merged)  # an adapter is still merged
    assert torch.equal(merged(ids), base)
    assert all(torch.equal(p, weights[n]) for n, p in merged.state_dict().items())


def test_merged_refuses_grouped_conv() -> None:
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(lorahot.UsageError, match=r"0: a conv with groups=2 cannot be merged"):
        lorahot.inject(model, ["0"], max_rank=4, merged=True)
    assert isinstance(model[0], nn.Conv2d)
