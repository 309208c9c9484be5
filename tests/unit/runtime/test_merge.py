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


# -- tied weights ------------------------------------------------------------------------------


def _tied_lm() -> nn.Module:
    model = tiny_lm(dtype=torch.float64)
    model.lm_head.weight = model.embed_tokens.weight  # tied, as in most LMs (one Parameter)
    return model


@pytest.mark.parametrize("targets", [["embed_tokens"], ["lm_head"], ["embed_tokens", "lm_head"]])
def test_merged_refuses_a_weight_tied_to_another_module(targets: list[str]) -> None:
    model = _tied_lm()
    weight = model.embed_tokens.weight.detach().clone()
    with pytest.raises(
        lorahot.UsageError,
        match=r"(embed_tokens|lm_head): its weight is tied to (lm_head|embed_tokens) \((lm_head|embed_tokens)\.weight "
        r"shares its memory\); merged mode would rewrite both .*Inject without merged=True, or untie the weights",
    ):
        lorahot.inject(model, targets, max_rank=4, merged=True)
    assert isinstance(model.embed_tokens, nn.Embedding) and isinstance(model.lm_head, nn.Linear)
    assert torch.equal(model.embed_tokens.weight, weight)


def test_tied_weights_found_by_storage_not_by_name() -> None:
    """Two modules whose weights are views of one tensor, with unrelated names."""
    torch.manual_seed(0)
    shared = torch.randn(2, 6, 6, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(6, 6).double(), nn.Linear(6, 6).double(), nn.Linear(6, 6).double())
    with torch.no_grad():
        model[0].weight = nn.Parameter(shared[0])
        model[1].weight = nn.Parameter(shared[1])  # same storage, other bytes: not tied
        model[2].weight = nn.Parameter(shared[1].t())  # the same bytes as model[1], transposed
    with pytest.raises(lorahot.UsageError, match=r"^1: its weight is tied to 2 \(2\.weight shares its memory\)"):
        lorahot.inject(model, ["0", "1"], max_rank=2, merged=True)
    lorahot.inject(model, ["0"], max_rank=2, merged=True)  # a disjoint slice of the storage is fine


def test_unmerged_mode_accepts_tied_weights_and_leaves_them_alone() -> None:
    model = _tied_lm()
    weight = model.embed_tokens.weight.detach().clone()
    runtime = lorahot.inject(model, ["embed_tokens", "lm_head"], max_rank=4)
    runtime.load(make_adapter(model, {"embed_tokens": 2, "lm_head": 3}, seed=1, dtype=torch.float64)[0])
    assert torch.equal(model.embed_tokens.weight, weight) and model.lm_head.weight is model.embed_tokens.weight


def test_one_module_under_two_names_is_refused() -> None:
    """Wrapping replaces a module under one name only; the other use would run without LoRA."""
    model = tiny_lm()
    model.layers[1].self_attn.q_proj = model.layers[0].self_attn.q_proj
    with pytest.raises(
        lorahot.UsageError,
        match=r"layers\.0\.self_attn\.q_proj: this Linear is also the model's layers\.1\.self_attn\.q_proj \(one "
        r"module used under two names\)",
    ):
        lorahot.inject(model, ["q_proj"], max_rank=4)
    assert not any(isinstance(m, lorahot.LoRALayer) for m in model.modules())
