"""Placing fused modules onto separate layers (:mod:`lorahot.resolve.split`): against a dense
float64 reference, the block-sparse layout, re-ordered rows, and every refusal (typed, with
nothing changed after a failed load)."""

from __future__ import annotations

import copy
import math
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lorahot
from lorahot.adapter import LoraModule
from lorahot.adapter.deltas import build_delta
from lorahot.resolve.keys import resolve_all
from lorahot.resolve.split import reorder_module, split_module
from tests.helpers import lora_pair


def _delta(m: LoraModule) -> torch.Tensor:
    return m.scale * (m.B.double() @ m.A.double())


@st.composite
def fused(draw: st.DrawFn) -> tuple[LoraModule, list[int], bool]:
    """A fused module with 2-4 parts of 1-6 rows, rank 1-3 per part, maybe block-sparse."""
    sizes = draw(st.lists(st.integers(1, 6), min_size=2, max_size=4))
    per_part, fan_in = draw(st.integers(1, 3)), draw(st.integers(1, 7))
    sparse, rslora = draw(st.booleans()), draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    rank = per_part * len(sizes) if sparse else draw(st.integers(1, 5))
    a, b = torch.randn(rank, fan_in, generator=g), torch.randn(sum(sizes), rank, generator=g)
    if sparse:
        b = b * torch.block_diag(*[torch.ones(n, per_part) for n in sizes])
    alpha = draw(st.floats(0.25, 32.0))
    return LoraModule("fused", a, b, alpha, rslora, ("fused.lora_A.weight", "fused.lora_B.weight")), sizes, sparse


@settings(max_examples=150, deadline=None)
@given(fused())
def test_split_parts_are_the_fused_delta_rows(case: tuple[LoraModule, list[int], bool]) -> None:
    module, sizes, sparse = case
    parts = split_module(module, [(f"p{j}", n) for j, n in enumerate(sizes)])
    whole = _delta(module)  # [sum(sizes), in]
    rows = torch.split(whole, sizes)
    for j, (part, expected) in enumerate(zip(parts, rows)):
        assert part.key == f"p{j}" and part.source_keys == module.source_keys
        torch.testing.assert_close(_delta(part), expected, rtol=1e-12, atol=1e-12)
        assert part.rank == (module.rank // len(sizes) if sparse else module.rank)
        assert math.isclose(part.scale, module.scale, rel_tol=1e-12)


def test_dense_split_shares_a_and_views_b() -> None:
    a, b = torch.randn(2, 3), torch.randn(7, 2)
    q, mlp = split_module(LoraModule("m", a, b, 4.0), [("q", 3), ("mlp", 4)])
    assert q.A is a and mlp.A is a and q.alpha == 4.0
    assert torch.equal(q.B, b[:3]) and torch.equal(mlp.B, b[3:])


def test_one_nonzero_off_diagonal_entry_keeps_the_dense_split() -> None:
    b = torch.block_diag(torch.ones(2, 1), torch.ones(2, 1))
    b[0, 1] = 1e-30
    parts = split_module(LoraModule("m", torch.randn(2, 3), b, 2.0), [("x", 2), ("y", 2)])
    assert [p.rank for p in parts] == [2, 2]


def test_reorder_swaps_the_row_halves() -> None:
    a, b = torch.randn(2, 3), torch.randn(8, 2)
    m = reorder_module(LoraModule("final", a, b, 1.0), "norm_out.linear", [4, 4], [1, 0])
    assert m.key == "norm_out.linear"
    assert torch.equal(m.B, torch.cat([b[4:], b[:4]]))


@pytest.mark.parametrize(
    ("module", "sizes", "message"),
    [
        (LoraModule("m", torch.randn(2, 3), torch.randn(7, 2), 1.0), [3, 3], r"7 output rows, but .* add up to 6"),
        (LoraModule("m", torch.randn(2, 3), torch.randn(6, 3), 1.0), [3, 3], r"disagree on the rank"),
        (LoraModule("m", torch.randn(2, 3, 1, 1), torch.randn(6, 2, 1, 1), 1.0), [3, 3], r"only linear modules"),
    ],
    ids=["sizes", "rank", "conv"],
)
def test_split_refusals_are_typed(module: LoraModule, sizes: list[int], message: str) -> None:
    with pytest.raises(lorahot.AdapterMismatchError, match=message):
        split_module(module, [(f"p{j}", n) for j, n in enumerate(sizes)])


# -- through a naming: the Flux tables ---------------------------------------------------------


class _Single(nn.Module):
    """The layers of a Flux single block under diffusers' names, width 4 (MLP 16)."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.to_q, self.attn.to_k, self.attn.to_v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)
        self.proj_mlp = nn.Linear(4, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.attn.to_q(x), self.attn.to_k(x), self.attn.to_v(x), self.proj_mlp(x)], -1)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.single_transformer_blocks = nn.ModuleList([_Single()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.single_transformer_blocks[0](x)


def _linear1(rows: int, rank: int = 2, alpha: float = 3.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    key = "lora_unet_single_blocks_0_linear1"
    return {
        f"{key}.lora_down.weight": torch.randn(rank, 4, generator=g),
        f"{key}.lora_up.weight": torch.randn(rows, rank, generator=g),
        f"{key}.alpha": torch.tensor(alpha),
    }


def test_kohya_linear1_splits_four_ways_with_alpha() -> None:
    torch.manual_seed(0)
    model = _Model()
    x = torch.randn(3, 4)
    base = model(x)
    sd = _linear1(28)
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v", "proj_mlp"], max_rank=4)
    runtime.load(sd)
    a, b = (
        sd["lora_unet_single_blocks_0_linear1.lora_down.weight"],
        sd["lora_unet_single_blocks_0_linear1.lora_up.weight"],
    )
    torch.testing.assert_close(model(x), base + 1.5 * (x @ a.T @ b.T), rtol=1e-5, atol=1e-6)


def _failed_load_changes_nothing(tensors: dict[str, torch.Tensor], error: type[Exception], message: str) -> None:
    torch.manual_seed(0)
    model = _Model()
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v", "proj_mlp"], max_rank=4)
    runtime.load(_linear1(28, seed=1))
    x = torch.randn(3, 4)
    before = model(x)
    arenas = [(t.A.clone(), t.B.clone(), t.S.clone()) for t in runtime.buffers.arenas]
    with pytest.raises(error, match=message):
        runtime.load(tensors)
    assert torch.equal(model(x), before)
    for arena, (a, b, s) in zip(runtime.buffers.arenas, arenas):
        assert torch.equal(arena.A, a) and torch.equal(arena.B, b) and torch.equal(arena.S, s)


def test_rows_that_do_not_divide_by_the_shares_are_refused_and_change_nothing() -> None:
    _failed_load_changes_nothing(
        _linear1(27),
        lorahot.AdapterMismatchError,
        r"lora_unet_single_blocks\.0\.linear1 \(lora_unet_single_blocks_0_linear1\.lora_down\.weight.*\) -> "
        r"lora_unet_single_transformer_blocks\.0\.attn\.to_q, .*, lora_unet_single_transformer_blocks\.0\.proj_mlp: B "
        r"has shape \(27, 2\); its rows split in the ratio 1:1:1:4, which needs a positive multiple of 7 rows",
    )


class _Decoder(nn.Module):
    """A decoder layer's attention projection, named as transformers' Llama names it."""

    def __init__(self) -> None:
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList([nn.Module()])
        self.model.layers[0].self_attn = nn.Module()
        self.model.layers[0].self_attn.q_proj = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.layers[0].self_attn.q_proj(x)


class _SingleOut(nn.Module):
    """A Flux single block's output projection alone, diffusers-named: none of ``linear1``'s layers."""

    def __init__(self) -> None:
        super().__init__()
        self.single_transformer_blocks = nn.ModuleList([nn.Module()])
        self.single_transformer_blocks[0].proj_out = nn.Linear(20, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.single_transformer_blocks[0].proj_out(torch.cat([x] * 5, -1))


def _foreign_fused(naming: str) -> tuple[nn.Module, str, dict[str, torch.Tensor], tuple, str, list[str]]:
    """A model; its layer; a file of a module on that layer and a fused module of another model
    whose rows no cut of the naming divides (12 for Lumina2's 3 : 1 : 1 in PEFT naming, 27 for
    Flux's 1 : 1 : 1 : 4); the layer's ``(A, B, alpha / r)``; the fused module as messages name
    it, and its keys."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(2, 4, generator=g), torch.randn(4, 2, generator=g)
    if naming == "peft":
        layer, fused = "model.layers.0.self_attn.q_proj", "vision.layers.0.attention.qkv"
        qkv = {"lora_A.weight": torch.randn(2, 4, generator=g), "lora_B.weight": torch.randn(12, 2, generator=g)}
        sd = {f"base_model.model.{layer}.lora_A.weight": a, f"base_model.model.{layer}.lora_B.weight": b}
        sd |= {f"base_model.model.{fused}.{role}": t for role, t in qkv.items()}
        return _Decoder(), layer, sd, (a, b, 1.0), fused, [f"base_model.model.{fused}.{role}" for role in qkv]
    a = torch.randn(2, 20, generator=g)
    key = "lora_unet_single_blocks_0_linear2"
    sd = {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(3.0)} | _linear1(27)
    fused = "lora_unet_single_blocks_0_linear1"
    return _SingleOut(), "single_transformer_blocks.0.proj_out", sd, (a, b, 1.5), fused, [k for k in sd if fused in k]


@pytest.mark.parametrize("naming", ["peft", "flux-kohya"])
def test_a_fused_module_none_of_whose_parts_the_model_has_names_no_layer(naming: str) -> None:
    """A fused module none of whose parts (nor its fused layer) is a module of the model is another
    model's, whose rows say nothing of this model's layers: it names no layer, like any such key,
    refused as that with every byte unchanged, and skipped with strict=False, the rest loaded at the
    float64 reference. It was cut by the naming's first rule all the same, and rows the rule's
    shares do not divide were refused with strict=False too (PEFT naming cuts any model's
    ``layers.N.attention.qkv`` as Lumina2's)."""
    model, layer, sd, (a, b, scale), fused, fused_keys = _foreign_fused(naming)
    runtime = lorahot.inject(model, [layer.rsplit(".", 1)[1]], max_rank=4)
    state = [*model.named_parameters(), *model.named_buffers()]
    before = {k: v.clone() for k, v in state}
    with pytest.raises(lorahot.AdapterMismatchError, match=rf"- {re.escape(fused)}\b.*: matches no injected layer"):
        runtime.load(sd)
    assert all(torch.equal(v, before[k]) for k, v in state)
    assert sorted(runtime.load(sd, strict=False).skipped) == sorted(fused_keys)
    base = model.get_submodule(layer).base_layer
    eye = torch.eye(base.in_features, dtype=torch.float64)
    want = eye @ (base.weight.double() + scale * b.double() @ a.double()).T + base.bias.double()
    with torch.no_grad():
        got = model.get_submodule(layer)(eye.float()).double()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_split_part_colliding_with_a_module_of_the_file_is_refused_and_changes_nothing() -> None:
    tensors = {
        f"diffusion_model.{k[len('lora_unet_') :].replace('_0_linear1', '.0.linear1')}": v
        for k, v in _linear1(28).items()
    }
    tensors = {k.replace("lora_down", "lora_A").replace("lora_up", "lora_B"): v for k, v in tensors.items()}
    tensors["diffusion_model.single_transformer_blocks.0.attn.to_k.lora_A.weight"] = torch.randn(2, 4)
    tensors["diffusion_model.single_transformer_blocks.0.attn.to_k.lora_B.weight"] = torch.randn(4, 2)
    _failed_load_changes_nothing(
        tensors,
        lorahot.AdapterMismatchError,
        r"diffusion_model\.single_transformer_blocks\.0\.attn\.to_k: lands on "
        r"single_transformer_blocks\.0\.attn\.to_k, which single_transformer_blocks\.0\.attn\.to_k "
        r"\(part of diffusion_model\.single_blocks\.0\.linear1\) already fills",
    )


def test_rank_mismatch_in_a_fused_module_is_refused_and_changes_nothing() -> None:
    tensors = _linear1(28)
    tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"] = torch.randn(28, 3)
    _failed_load_changes_nothing(
        tensors, lorahot.AdapterMismatchError, r"A \(2, 4\) and B \(28, 3\) disagree on the rank"
    )


# -- split=: the same mechanism for any naming ------------------------------------------------


def _fused_peft(rows: int, rank: int = 2, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "base_model.model.single_transformer_blocks.0.linear1.lora_A.weight": torch.randn(rank, 4, generator=g),
        "base_model.model.single_transformer_blocks.0.linear1.lora_B.weight": torch.randn(rows, rank, generator=g),
    }


_PARTS = [("attn.to_q", 4), ("attn.to_k", 4), ("attn.to_v", 4), ("proj_mlp", 16)]


def test_split_option_places_a_fused_peft_module() -> None:
    torch.manual_seed(0)
    model = _Model()
    x = torch.randn(3, 4)
    base = model(x)
    sd = _fused_peft(28)
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v", "proj_mlp"], max_rank=4)
    runtime.load(sd, split={"linear1": _PARTS})
    a, b = (
        sd["base_model.model.single_transformer_blocks.0.linear1.lora_A.weight"],
        sd["base_model.model.single_transformer_blocks.0.linear1.lora_B.weight"],
    )
    torch.testing.assert_close(model(x), base + x @ a.T @ b.T, rtol=1e-5, atol=1e-6)


def test_split_option_sizes_that_do_not_add_up_are_refused_and_change_nothing() -> None:
    torch.manual_seed(0)
    model = _Model()
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v", "proj_mlp"], max_rank=4)
    runtime.load(_linear1(28, seed=1))
    x = torch.randn(3, 4)
    before = model(x)
    arenas = [(t.A.clone(), t.B.clone(), t.S.clone()) for t in runtime.buffers.arenas]
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"single_transformer_blocks\.0\.linear1 .* -> .*attn\.to_q, .*proj_mlp: B has 28 output rows, but the "
        r"parts' sizes \[4, 4, 4, 12\] add up to 24",
    ):
        runtime.load(_fused_peft(28), split={"linear1": [*_PARTS[:3], ("proj_mlp", 12)]})
    assert torch.equal(model(x), before)
    for arena, (a, b, s) in zip(runtime.buffers.arenas, arenas):
        assert torch.equal(arena.A, a) and torch.equal(arena.B, b) and torch.equal(arena.S, s)


@pytest.mark.parametrize(
    "split",
    [
        {},
        [("q", 1)],
        {"qkv": [("q", 4)]},
        {"qkv": [("q", 0), ("k", 4)]},
        {"qkv": ["q", "k"]},
        {"": [("q", 1), ("k", 1)]},
    ],
    ids=["empty", "list", "one-part", "zero-size", "no-sizes", "no-name"],
)
def test_malformed_split_option_is_a_usage_error(split: object) -> None:
    with pytest.raises(lorahot.UsageError, match=r"split"):
        lorahot.read_adapter(_fused_peft(28), split=split)  # type: ignore[arg-type]


def test_a_model_with_the_fused_layer_takes_the_module_whole() -> None:
    """Splitting is the fallback: a model named as the original Flux (fused qkv) takes the file's keys as they are."""
    torch.manual_seed(0)
    model = nn.Module()
    model.double_blocks = nn.ModuleList([nn.Module()])
    model.double_blocks[0].img_attn = nn.Module()
    model.double_blocks[0].img_attn.qkv = qkv = nn.Linear(4, 12)
    model.double_blocks[0].img_attn.proj = proj = nn.Linear(4, 4)
    x = torch.randn(3, 4)
    base_qkv, base_proj = qkv(x), proj(x)
    g = torch.Generator().manual_seed(4)
    sd = {}
    for name, rows in (("qkv", 12), ("proj", 4)):
        key = f"lora_unet_double_blocks_0_img_attn_{name}"
        sd |= {
            f"{key}.lora_down.weight": torch.randn(3, 4, generator=g),
            f"{key}.lora_up.weight": torch.randn(rows, 3, generator=g),
        }
        sd[f"{key}.alpha"] = torch.tensor(6.0)
    runtime = lorahot.inject(model, ["qkv", "proj"], max_rank=4)
    runtime.load(sd)
    attn = model.double_blocks[0].img_attn
    for layer, base, name in ((attn.qkv, base_qkv, "qkv"), (attn.proj, base_proj, "proj")):
        a, b = (
            sd[f"lora_unet_double_blocks_0_img_attn_{name}.lora_down.weight"],
            sd[f"lora_unet_double_blocks_0_img_attn_{name}.lora_up.weight"],
        )
        torch.testing.assert_close(layer(x), base + 2.0 * (x @ a.T @ b.T), rtol=1e-5, atol=1e-6)


def test_a_block_sparse_fused_file_loads_as_its_tensors_do(tmp_path: Path) -> None:
    """A block-sparse ``linear1`` (each part's B in its own columns, rank 2 per part, 8 in all)
    with ``max_rank=2``: each part's rank comes from B's values, which the header lacks. Loaded
    from a file, whose first read plans its fit from the header, it loads with the ranks and
    outputs of the same tensors given as a dict (the header's plan once refused it: rank 8 >
    max_rank 2)."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    key, sizes = "lora_unet_single_blocks_0_linear1", [4, 4, 4, 16]
    b = torch.randn(28, 8, generator=g) * torch.block_diag(*[torch.ones(n, 2) for n in sizes])
    tensors = {
        f"{key}.lora_down.weight": torch.randn(8, 4, generator=g),
        f"{key}.lora_up.weight": b.contiguous(),
        f"{key}.alpha": torch.tensor(8.0),
    }
    save_file(tensors, tmp_path / "adapter.safetensors")
    x = torch.randn(3, 4, generator=g)
    outs, ranks = [], []
    for source in (tensors, tmp_path / "adapter.safetensors"):
        torch.manual_seed(0)
        model = _Model()
        runtime = lorahot.inject(model, ["to_q", "to_k", "to_v", "proj_mlp"], max_rank=2)
        ranks.append(dict(runtime.load(source).ranks))
        with torch.no_grad():
            outs.append(model(x))
    assert ranks[0] == ranks[1] and set(ranks[1].values()) == {2}
    assert torch.equal(outs[0], outs[1])


def _loha(key: str, rows: int, cols: int = 4, rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        f"{key}.hada_w1_a": torch.randn(rows, rank, generator=g),
        f"{key}.hada_w1_b": torch.randn(rank, cols, generator=g),
        f"{key}.hada_w2_a": torch.randn(rows, rank, generator=g),
        f"{key}.hada_w2_b": torch.randn(rank, cols, generator=g),
    }


def _locon_per_input(key: str, rows: int, cols: int = 4, rank: int = 2) -> dict[str, torch.Tensor]:
    """A LoRA/LoCon module trained with weight decomposition over the input channels (LyCORIS
    ``wd_on_out=False``: ``dora_scale`` ``[1, in]``)."""
    g = torch.Generator().manual_seed(4)
    return {
        f"{key}.lora_down.weight": torch.randn(rank, cols, generator=g),
        f"{key}.lora_up.weight": torch.randn(rows, rank, generator=g),
        f"{key}.dora_scale": torch.rand(1, cols, generator=g) + 0.5,
    }


@pytest.mark.parametrize(
    ("tensors", "options", "match"),
    [
        (
            _locon_per_input("lora_unet_single_transformer_blocks_0_linear1", 28),
            {"split": {"linear1": _PARTS}},
            r"fused modules that cannot be placed onto the model's layers \(split=\):\n"
            r"  - .*linear1 \(lora_unet_single_transformer_blocks_0_linear1\.lora_down\.weight, .*\) -> .*attn\.to_q"
            r".*: it is a LoRA/LoCon module whose dora_scale \(1, 4\) normalizes each input channel over every output "
            r"row of its layer",
        ),
    ],
    ids=["split-locon-per-input"],
)
def test_a_weight_delta_named_by_split_or_fuse_is_refused_saying_so(
    tensors: dict[str, torch.Tensor], options: dict, match: str
) -> None:
    """fuse= joins ``B @ A`` modules; a LyCORIS kind under a key it names is refused with that
    reason, in merged mode too, where it would otherwise have been left to match no layer (the
    message then named no cause). A LoRA/LoCon whose ``dora_scale`` is per input channel is named
    by why (its norm runs over every output row of its layer, so split= cannot cut it), not as
    'a locon module, a weight delta' beside its own lora_down/lora_up keys. (fuse= joins it: each
    part's norm runs over its own rows, tests/system/test_parity_lycoris_fuse_base.py.) Nothing
    changes (bitwise)."""
    model = _Model()
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v", "proj_mlp"], max_rank=4, merged=True)
    x = torch.randn(3, 4)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorahot.AdapterMismatchError, match=match):
        runtime.load(tensors, **options)
    assert torch.equal(model(x), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# -- what a fused module holds per output row: a DoRA magnitude, a LoRA bias -----------------


def test_split_and_reorder_cut_a_magnitude_and_a_bias_with_b_rows() -> None:
    """Dense and block-sparse splits and a reorder give each part the values of its rows, in the
    tensor's own shape (PEFT's ``[out]``, LyCORIS' ``[out, 1]``)."""
    a, sparse = torch.randn(4, 3), torch.block_diag(torch.randn(3, 2), torch.randn(4, 2))
    magnitude, bias = torch.rand(7, 1) + 0.5, torch.randn(7)
    for b in (sparse, torch.randn(7, 4)):
        q, mlp = split_module(LoraModule("m", a, b, 4.0, magnitude=magnitude, bias=bias), [("q", 3), ("mlp", 4)])
        assert q.rank == (2 if b is sparse else 4)
        assert torch.equal(q.magnitude, magnitude[:3]) and torch.equal(mlp.magnitude, magnitude[3:])
        assert torch.equal(q.bias, bias[:3]) and torch.equal(mlp.bias, bias[3:])
    magnitude, bias = torch.rand(8) + 0.5, torch.randn(8)
    m = reorder_module(LoraModule("m", a, torch.randn(8, 4), 1.0, magnitude=magnitude, bias=bias), "o", [6, 2], [1, 0])
    assert torch.equal(m.magnitude, torch.cat([magnitude[6:], magnitude[:6]]))
    assert torch.equal(m.bias, torch.cat([bias[6:], bias[:6]]))


def _dora_reference(
    model: _Model,
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    m: torch.Tensor | None,
    c: torch.Tensor | None,
) -> torch.Tensor:
    """float64 output of the fused layer ``[W_q; W_k; W_v; W_mlp]`` with the fused module: DoRA
    rows ``m_i (W + s B A)_i / ||(W + s B A)_i||`` (``m`` given) and a LoRA bias ``c``, as PEFT
    computes them: ``f * (x W^T + s (x A^T B^T + c)) + b0``, ``f = m / ||W + s B A||``."""
    block = model.single_transformer_blocks[0]
    layers = (block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp)
    w = torch.cat([layer.weight.detach() for layer in layers]).double()  # [28, 4]
    b0 = torch.cat([layer.bias.detach() for layer in layers]).double()
    updated = w + scale * (b.double() @ a.double())
    f = torch.ones(len(w), dtype=torch.float64) if m is None else m.double().reshape(-1) / updated.norm(dim=1)
    lora_bias = torch.zeros_like(b0) if c is None else c.double()
    x = x.double()
    return f * (x @ w.T + scale * (x @ a.double().T @ b.double().T + lora_bias)) + b0


def _fused_extras(naming: str, rows: int = 28) -> tuple[dict[str, torch.Tensor], float, str, str | None]:
    """A fused ``linear1`` (rank 3, alpha 6) with a DoRA magnitude or a LoRA bias of ``rows``
    values: the tensors, the scale, the A and B keys' stem, the extra's key."""
    g = torch.Generator().manual_seed(5)
    a, b = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(rows, 3, generator=g, dtype=torch.float64)
    values = torch.rand(rows, generator=g, dtype=torch.float64) + 0.5
    if naming == "kohya-dora":  # LyCORIS' dora_scale [out, 1], at scale 1 only (alpha = rank)
        key = "lora_unet_single_transformer_blocks_0_linear1"
        sd = {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(3.0)}
        return sd | {f"{key}.dora_scale": values[:, None]}, 1.0, key, f"{key}.dora_scale"
    key = "base_model.model.single_transformer_blocks.0.linear1"
    sd = {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b}
    extra = f"{key}.lora_magnitude_vector" if naming == "peft-dora" else f"{key}.lora_B.bias"
    return sd | {extra: values}, 1.0, key, extra


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("naming", ["peft-dora", "kohya-dora", "peft-bias"])
def test_a_fused_dora_or_biased_module_split_computes_the_fused_layers_output(naming: str, merged: bool) -> None:
    """split= of a fused ``linear1`` with a DoRA magnitude (PEFT's ``[out]``, LyCORIS'
    ``dora_scale`` ``[out, 1]``) or a LoRA bias onto q, k, v and the MLP input: each part takes
    its rows of B and of the magnitude or bias, which is exact because DoRA normalizes each output
    row on its own. The outputs match a float64 dense reference of the fused layer (the whole
    magnitude once went to every part, which the one-value-per-output-channel check refused)."""
    torch.manual_seed(0)
    model = _Model().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    sd, scale, key, extra = _fused_extras(naming)
    kind = "dora_scale" if naming == "kohya-dora" else None
    a = sd[f"{key}.lora_down.weight" if kind else f"{key}.lora_A.weight"]
    b = sd[f"{key}.lora_up.weight" if kind else f"{key}.lora_B.weight"]
    m = None if naming == "peft-bias" else sd[extra].reshape(-1)
    c = sd[extra] if naming == "peft-bias" else None
    expected = _dora_reference(model, x, a, b, scale, m, c)
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v", "proj_mlp"], max_rank=4, extras=True, merged=merged)
    runtime.load(sd, split={"linear1": _PARTS})
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    ("naming", "rows", "what"),
    [("peft-dora", 14, r"DoRA magnitude has shape \(14,\)"), ("peft-bias", 27, r"LoRA bias has shape \(27,\)")],
    ids=["magnitude", "bias"],
)
def test_a_magnitude_or_bias_not_one_per_row_of_b_is_refused_and_changes_nothing(
    naming: str, rows: int, what: str
) -> None:
    """A magnitude or bias whose values are not B's rows cannot be cut with them: refused naming
    the tensor, its shape and B's rows, nothing changed."""
    torch.manual_seed(0)
    model = _Model().double()
    sd, _, _, extra = _fused_extras(naming)
    sd[extra] = sd[extra][:rows]
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v", "proj_mlp"], max_rank=4, extras=True)
    x = torch.randn(3, 4, dtype=torch.float64)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=rf"linear1 .*{re.escape(extra)}.* -> .*attn\.to_q, .*proj_mlp: its {what}, but cutting it with B's "
        r"rows needs one value per row of B \(28\)",
    ):
        runtime.load(sd, split={"linear1": _PARTS})
    assert torch.equal(model(x), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


# -- fuse= of parts with a DoRA magnitude or a LoRA bias --------------------------------------

#: the parts of the fused ``attn.qkv`` (input 6): name and out_features
_QKV = (("q", 4), ("k", 2), ("v", 3))


class _Separate(nn.Module):
    """``attn.q``, ``attn.k``, ``attn.v``: the output is the three concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.ModuleDict({name: nn.Linear(6, out) for name, out in _QKV})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.attn[name](x) for name, _ in _QKV], -1)


def _fused_qkv(separate: _Separate) -> nn.Module:
    """The same layers as one ``attn.qkv`` Linear ``[W_q; W_k; W_v]``."""
    qkv = nn.Linear(6, sum(out for _, out in _QKV)).double()
    with torch.no_grad():
        qkv.weight.copy_(torch.cat([separate.attn[n].weight for n, _ in _QKV]))
        qkv.bias.copy_(torch.cat([separate.attn[n].bias for n, _ in _QKV]))
    return nn.ModuleDict({"attn": nn.ModuleDict({"qkv": qkv})})


def _per_part_reference(
    separate: _Separate, x: torch.Tensor, parts: dict[str, tuple[torch.Tensor, torch.Tensor, float]], **extras: dict
) -> torch.Tensor:
    """float64 output of each part as PEFT computes it alone, concatenated: ``f (W x + s (B A x +
    c)) + b0`` with ``f = m / ||W + s B A||`` per row (``m`` in ``extras["m"]``; else ``f = 1``)
    and the LoRA bias ``c`` in ``extras["c"]`` (else 0); ``parts`` maps a name to ``(A, B, s)``
    (a part absent: no LoRA)."""
    out = []
    for name, _ in _QKV:
        layer = separate.attn[name]
        w, b0, y = layer.weight.detach(), layer.bias.detach(), x @ layer.weight.detach().T
        if name in parts:
            a, b, s = parts[name]
            c = extras.get("c", {}).get(name, torch.zeros(len(w), dtype=torch.float64))
            m = extras.get("m", {}).get(name)
            f = torch.ones(len(w), dtype=torch.float64) if m is None else m.reshape(-1) / (w + s * b @ a).norm(dim=1)
            y = f * (y + s * (x @ a.T @ b.T + c))
        out.append(y + b0)
    return torch.cat(out, -1)


def _peft_dora(tmp_path: Path) -> tuple[_Separate, dict[str, tuple[torch.Tensor, torch.Tensor, float]], dict]:
    """A PEFT DoRA adapter (ranks 2, 3, 1; alphas 3, 2, 5) on q, k, v with trained-looking
    magnitudes, saved under ``tmp_path``: the model, each part's ``(A, B, scale)`` and
    magnitudes."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    separate = _Separate().double()
    config = peft.LoraConfig(
        r=2,
        lora_alpha=3,
        target_modules=["q", "k", "v"],
        rank_pattern={"k": 3, "v": 1},
        alpha_pattern={"k": 2, "v": 5},
        use_dora=True,
        init_lora_weights=False,
    )
    model = peft.get_peft_model(copy.deepcopy(separate), config)
    parts, magnitudes = {}, {}
    with torch.no_grad():
        for name, _ in _QKV:
            layer = model.base_model.model.attn[name]
            magnitude = layer.lora_magnitude_vector["default"].weight
            magnitude.mul_(torch.rand_like(magnitude) + 0.5)  # away from ||W + s B A||, where DoRA is plain LoRA
            parts[name] = (
                layer.lora_A["default"].weight.clone(),
                layer.lora_B["default"].weight.clone(),
                layer.scaling["default"],
            )
            magnitudes[name] = magnitude.clone()
        x = torch.randn(5, 6, dtype=torch.float64)
        torch.testing.assert_close(
            model(x), _per_part_reference(separate, x, parts, m=magnitudes), rtol=1e-12, atol=1e-12
        )
    model.save_pretrained(tmp_path)
    return separate, parts, magnitudes


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_peft_dora_parts_fuse_onto_the_fused_layer(tmp_path: Path, merged: bool) -> None:
    """A PEFT DoRA adapter on separate q, k, v loads onto a model whose projections are one
    ``qkv`` Linear: the magnitudes are stacked by B's rows, and since DoRA normalizes each output
    row on its own the fused layer computes each part's DoRA rows exactly, at the load's scale and
    after ``set_scale`` (fuse= refused DoRA parts)."""
    separate, parts, magnitudes = _peft_dora(tmp_path)
    fused = _fused_qkv(separate)
    x = torch.randn(5, 6, dtype=torch.float64)
    runtime = lorahot.inject(fused, ["qkv"], max_rank=8, extras=True, merged=merged)
    info = runtime.load(tmp_path, fuse={"qkv": ["q", "k", "v"]})
    assert info.ranks == {"attn.qkv": 6}
    with torch.no_grad():
        plain = _per_part_reference(separate, x, parts)
        expected = _per_part_reference(separate, x, parts, m=magnitudes)
        assert (expected - plain).abs().max() > 0.1  # the magnitudes matter
        torch.testing.assert_close(fused["attn"]["qkv"](x), expected, rtol=1e-12, atol=1e-12)
        for weight in (0.4, 2.5):
            runtime.set_scale(weight)
            scaled = {name: (a, b, s * weight) for name, (a, b, s) in parts.items()}
            expected = _per_part_reference(separate, x, scaled, m=magnitudes)
            torch.testing.assert_close(fused["attn"]["qkv"](x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_lora_biases_on_some_parts_fuse_with_zeros_for_the_others(merged: bool) -> None:
    """PEFT LoRA biases on q only (k has none, v is untrained and given by size): the fused bias
    is q's times its scale, then zeros, exact at any scale (fuse= refused LoRA biases)."""
    torch.manual_seed(1)
    separate = _Separate().double()
    stem = "base_model.model.attn"
    q = lora_pair(f"{stem}.q", "lora_A", "lora_B", rank=2, fin=6, fout=4)
    k = lora_pair(f"{stem}.k", "lora_A", "lora_B", rank=3, fin=6, fout=2)
    tensors = {key: t.double() for key, t in (q | k).items()} | {
        f"{stem}.q.lora_B.bias": torch.randn(4, dtype=torch.float64)
    }
    parts = {n: (tensors[f"{stem}.{n}.lora_A.weight"], tensors[f"{stem}.{n}.lora_B.weight"], 0.5) for n in "qk"}
    fused = _fused_qkv(separate)
    x = torch.randn(5, 6, dtype=torch.float64)
    runtime = lorahot.inject(fused, ["qkv"], max_rank=8, extras=True, merged=merged)
    config = {"r": 2, "lora_alpha": 1, "rank_pattern": {"k": 3}, "alpha_pattern": {"k": 1.5}, "lora_bias": True}
    runtime.load(tensors, config=config, fuse={"qkv": ["q", "k", ("v", 3)]})
    c = {"q": tensors[f"{stem}.q.lora_B.bias"]}
    with torch.no_grad():
        torch.testing.assert_close(
            fused["attn"]["qkv"](x), _per_part_reference(separate, x, parts, c=c), rtol=1e-12, atol=1e-12
        )
        runtime.set_scale(3.0)
        scaled = {name: (a, b, s * 3.0) for name, (a, b, s) in parts.items()}
        torch.testing.assert_close(
            fused["attn"]["qkv"](x), _per_part_reference(separate, x, scaled, c=c), rtol=1e-12, atol=1e-12
        )


def _kohya_qkv(dora: str) -> dict[str, torch.Tensor]:
    """q, k, v LoRA/LoCon modules in kohya naming (alpha = rank), a ``dora_scale`` ``[out, 1]``
    beside the ones in ``dora``."""
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for name, out in _QKV:
        key = f"lora_unet_attn_{name}"
        tensors |= {
            f"{key}.lora_down.weight": torch.randn(2, 6, generator=g, dtype=torch.float64),
            f"{key}.lora_up.weight": torch.randn(out, 2, generator=g, dtype=torch.float64),
            f"{key}.alpha": torch.tensor(2.0),
        }
        if name in dora:
            tensors[f"{key}.dora_scale"] = torch.rand(out, 1, generator=g, dtype=torch.float64) + 0.5
    return tensors


def test_kohya_dora_scale_parts_fuse_onto_the_fused_layer() -> None:
    """LoRA/LoCon modules with a ``dora_scale`` ``[out, 1]`` on q, k, v fuse like PEFT's DoRA,
    the stacked magnitude in their layout; at scale 1 (the only one such modules take)."""
    torch.manual_seed(1)
    separate = _Separate().double()
    tensors = _kohya_qkv("qkv")
    parts = {
        n: (tensors[f"lora_unet_attn_{n}.lora_down.weight"], tensors[f"lora_unet_attn_{n}.lora_up.weight"], 1.0)
        for n, _ in _QKV
    }
    m = {n: tensors[f"lora_unet_attn_{n}.dora_scale"] for n, _ in _QKV}
    fused = _fused_qkv(separate)
    runtime = lorahot.inject(fused, ["qkv"], max_rank=8, extras=True)
    runtime.load(tensors, fuse={"qkv": ["q", "k", "v"]})
    x = torch.randn(5, 6, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(
            fused["attn"]["qkv"](x), _per_part_reference(separate, x, parts, m=m), rtol=1e-12, atol=1e-12
        )


@pytest.mark.parametrize("untrained", [False, True], ids=["plain-part", "untrained-part"])
def test_dora_parts_beside_parts_without_a_magnitude_are_refused_and_change_nothing(untrained: bool) -> None:
    """q and k DoRA (``dora_scale``), v plain LoRA (or untrained, given by size): a row without a
    magnitude has none that stays exact under ``set_scale``, so the load is refused naming both
    groups and the fix, the model bitwise unchanged."""
    torch.manual_seed(1)
    tensors = _kohya_qkv("qk")
    if untrained:
        tensors = {key: t for key, t in tensors.items() if "_v." not in key}
    fused = _fused_qkv(_Separate().double())
    runtime = lorahot.inject(fused, ["qkv"], max_rank=8, extras=True)
    x = torch.randn(5, 6, dtype=torch.float64)
    before = fused["attn"]["qkv"](x)
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    v = "'v'" if untrained else "'lora_unet_attn_v'"
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=rf"lora_unet_attn_qkv: parts \['lora_unet_attn_q', 'lora_unet_attn_k'\] are DoRA and \[{v}\] are not; "
        r".* Inject the parts as separate layers \(no fuse=\)",
    ):
        runtime.load(tensors, fuse={"qkv": ["q", "k", ("v", 3) if untrained else "v"]})
    assert torch.equal(fused["attn"]["qkv"](x), before)
    assert all(torch.equal(t, state[k]) for k, t in fused.state_dict().items())


@pytest.mark.parametrize("extra", ["lora_magnitude_vector", "lora_B.bias"], ids=["magnitude", "bias"])
def test_a_part_magnitude_or_bias_not_one_per_row_of_its_b_is_refused_and_changes_nothing(extra: str) -> None:
    """Magnitudes or biases of 3 values on q (4 rows), k (2) and v (3) add up to the fused
    layer's 9 rows, but stacked they would give rows other parts' values: refused naming the part,
    the shape and its B's rows, nothing changed."""
    torch.manual_seed(1)
    stem = "base_model.model.attn"
    tensors = {}
    for name, out in _QKV:
        tensors |= lora_pair(f"{stem}.{name}", "lora_A", "lora_B", rank=2, fin=6, fout=out)
        tensors[f"{stem}.{name}.{extra}"] = torch.rand(3) + 0.5
    tensors = {key: t.double() for key, t in tensors.items()}
    config = {"r": 2, "lora_alpha": 2} | ({"use_dora": True} if "magnitude" in extra else {"lora_bias": True})
    fused = _fused_qkv(_Separate().double())
    runtime = lorahot.inject(fused, ["qkv"], max_rank=8, extras=True)
    x = torch.randn(5, 6, dtype=torch.float64)
    before = fused["attn"]["qkv"](x)
    state = {k: v.clone() for k, v in fused.state_dict().items()}
    which = "DoRA magnitude" if "magnitude" in extra else "LoRA bias"
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=rf"attn\.qkv: part attn\.q's {which} has shape \(3,\), but fusing it with B's rows needs one value per "
        r"row of B \(4\)",
    ):
        runtime.load(tensors, config=config, fuse={"qkv": ["q", "k", "v"]})
    assert torch.equal(fused["attn"]["qkv"](x), before)
    assert all(torch.equal(t, state[k]) for k, t in fused.state_dict().items())


def test_a_fused_weight_delta_is_cut_by_rows_where_its_rows_are_the_parts() -> None:
    """A naming's fused module (Lumina2's ``attention.qkv``, ``3 : 1 : 1``) holding a weight delta
    is cut by the rows of its ``ΔW`` (each part folds its rows, a ``diff_b`` cut with them); a
    LoRA/LoCon whose ``dora_scale`` normalizes each input channel over every row is refused
    naming why, and so are rows that do not divide by the shares."""
    names = [f"layers.0.attn.to_{p}" for p in "qkv"]
    key = "diffusion_model.layers.0.attention.qkv"
    diff = {f"{key}.diff": torch.randn(20, 4, dtype=torch.float64), f"{key}.diff_b": torch.randn(20)}
    _, weights = resolve_all(lorahot.read_adapter(diff), names)
    assert list(weights) == names
    rows = {
        "layers.0.attn.to_q": slice(0, 12),
        "layers.0.attn.to_k": slice(12, 16),
        "layers.0.attn.to_v": slice(16, 20),
    }
    for name, part in weights.items():
        delta = build_delta(part, (rows[name].stop - rows[name].start, 4), torch.float64, torch.device("cpu"))
        assert torch.equal(delta, diff[f"{key}.diff"][rows[name]])
        assert torch.equal(part.factors["diff_b"], diff[f"{key}.diff_b"][rows[name]])
    per_input = _locon_per_input(key, 20)
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"attention\.qkv \(.*\) -> .*: it is a LoRA/LoCon module "
        r"whose dora_scale \(1, 4\) normalizes each input channel .*which cannot be cut by rows",
    ):
        resolve_all(lorahot.read_adapter(per_input), names)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"its ΔW has 21 rows; its rows split in the ratio 3:1:1"):
        resolve_all(lorahot.read_adapter(_loha(key, 21)), names)


def _fused_linear1(model: _Model) -> nn.Linear:
    """The model's ``to_q``, ``to_k``, ``to_v`` and ``proj_mlp`` as one ``linear1`` ``[28, 4]``."""
    block = model.single_transformer_blocks[0]
    layers = (block.attn.to_q, block.attn.to_k, block.attn.to_v, block.proj_mlp)
    fused = nn.Linear(4, 28).double()
    with torch.no_grad():
        fused.weight.copy_(torch.cat([layer.weight for layer in layers]))
        fused.bias.copy_(torch.cat([layer.bias for layer in layers]))
    return fused


@pytest.mark.parametrize(
    "kind", ["loha", "lokr", "loha-dora", "diff"], ids=["loha", "lokr", "loha-dora-on-out", "diff-with-bias"]
)
def test_split_option_cuts_a_weight_delta_by_the_rows_of_its_delta(kind: str) -> None:
    """split= of a fused ``linear1`` holding a LyCORIS LoHa, a LoKr, a LoHa trained with weight
    decomposition over the output rows (``dora_scale [28, 1]``) or a full diff with a
    ``diff_b``: each part folds its rows of the whole ``ΔW`` (and of the ``dora_scale`` and
    ``diff_b``), so the merged model computes the fused layer with LyCORIS' own module applied
    (``lycoris-lora``'s forward; float64 within 1e-12), and each layer's weight is its rows of
    the fused weight plus LyCORIS' ``get_weight``. All were refused ('split= cuts LoRA modules')."""
    torch.manual_seed(0)
    model = _Model().double()
    fused = _fused_linear1(model)
    key = "lora_unet_single_transformer_blocks_0_linear1"
    x = torch.randn(3, 4, dtype=torch.float64)
    g = torch.Generator().manual_seed(6)
    if kind == "diff":
        delta, bias = torch.randn(28, 4, generator=g, dtype=torch.float64), torch.randn(28, generator=g).double()
        sd = {f"{key}.diff": delta, f"{key}.diff_b": bias}
        with torch.no_grad():
            expected = fused(x) + x @ delta.T + bias
    else:
        modules = pytest.importorskip("lycoris.modules")
        options = {"lora_dim": 2, "alpha": 3.0, "weight_decompose": kind == "loha-dora"}
        if kind == "lokr":
            options |= {"factor": 2, "decompose_both": True}
        cls = modules.LokrModule if kind == "lokr" else modules.LohaModule
        module = cls(key, fused, 1.0, **options).double()
        with torch.no_grad():
            for p in module.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
        sd = {f"{key}.{k}": v.detach().clone() for k, v in module.custom_state_dict().items()}
        assert (f"{key}.dora_scale" in sd) == (kind == "loha-dora")
        delta = module.get_weight(module.shape) * module.scalar
        module.apply_to()
        with torch.no_grad():
            expected = fused(x)
    assert torch.count_nonzero(delta) == delta.numel()
    base = model(x).detach()
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v", "proj_mlp"], max_rank=4, merged=True)
    info = runtime.load(sd, split={"linear1": _PARTS})
    assert sorted(info.ranks) == sorted(f"single_transformer_blocks.0.{p}" for p, _ in _PARTS)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
        assert not torch.allclose(expected, base)
        if kind != "loha-dora":
            block, start = model.single_transformer_blocks[0], 0
            for name, n in _PARTS:
                layer = block.get_submodule(name)
                want = fused.weight[start : start + n] + delta[start : start + n].detach()
                torch.testing.assert_close(layer.weight, want, rtol=1e-12, atol=1e-12)
                start += n


@pytest.mark.parametrize(
    ("tensors", "split", "match"),
    [
        (
            _loha("lora_unet_single_transformer_blocks_0_linear1", 28),
            {"linear1": [*_PARTS[:3], ("proj_mlp", 12)]},
            r"linear1 \(lora_unet_single_transformer_blocks_0_linear1\.hada_w1_a, .*\) -> .*attn\.to_q, .*proj_mlp: "
            r"its ΔW has 28 output rows, but the parts' sizes \[4, 4, 4, 12\] add up to 24",
        ),
        (
            {
                "lora_unet_single_transformer_blocks_0_linear1.diff": torch.randn(28, 4),
                "lora_unet_single_transformer_blocks_0_linear1.diff_b": torch.randn(27),
            },
            {"linear1": _PARTS},
            r"linear1 \(.*\.diff, .*\) -> .*: its diff_b has shape \(27,\), but cutting it with ΔW's rows needs one "
            r"value per row",
        ),
    ],
    ids=["sizes", "diff-b"],
)
def test_split_option_refuses_a_weight_delta_whose_rows_are_not_the_parts_and_changes_nothing(
    tensors: dict[str, torch.Tensor], split: dict, match: str
) -> None:
    """Sizes that do not add up to ``ΔW``'s rows, a ``diff_b`` without one value per row: refused
    naming the module, its keys, the parts and the shapes, before anything is written (the model's
    weights and the arenas bitwise as before; a LoRA loaded earlier stays)."""
    torch.manual_seed(0)
    model = _Model()
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v", "proj_mlp"], max_rank=4, merged=True)
    runtime.load(_linear1(28, seed=1))
    x = torch.randn(3, 4)
    before = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorahot.AdapterMismatchError, match=match):
        runtime.load(tensors, split=split)
    assert torch.equal(model(x), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _interleaved_rows(heads: int, d: int, j: int, k: int = 3) -> torch.Tensor:
    """The rows of part ``j`` of ``k`` in a fused B whose rows are ``[head h: part 0, ..., part k-1]``."""
    return torch.cat([torch.arange((h * k + j) * d, (h * k + j + 1) * d) for h in range(heads)])


def test_a_per_head_split_gathers_each_parts_rows_from_every_head() -> None:
    """A :attr:`Split.per_head` rule at the head size the model states (2, three heads) gives each
    part its rows of every head, for a LoRA (B's rows, a DoRA magnitude with them) and for a weight
    delta (the rows of its ``ΔW``); no head size, several, or parts that are not whole heads of it
    are problems naming the rows and the parts."""
    from lorahot.adapter import WeightModule
    from lorahot.formats.table import Split
    from lorahot.resolve.split import placed

    rule = Split(r"(?P<head>.*\.)qkv", tuple((rf"\g<head>{p}", 1) for p in "qkv"), per_head=True)
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(2, 4, generator=g, dtype=torch.float64), torch.randn(18, 2, generator=g, dtype=torch.float64)
    magnitude = torch.rand(18, generator=g, dtype=torch.float64) + 0.5
    lora = LoraModule("x.qkv", a, b, 2.0, magnitude=magnitude)
    diff = WeightModule("x.qkv", "diff", {"diff": torch.randn(18, 4, generator=g, dtype=torch.float64)})
    problems: list[str] = []
    parts = placed("x.qkv", lora, (rule,), problems, head_sizes=lambda targets: {2})
    folded = placed("x.qkv", diff, (rule,), problems, head_sizes=lambda targets: {2})
    assert not problems
    for j, (part, weight) in enumerate(zip(parts, folded)):
        rows = _interleaved_rows(3, 2, j)
        assert part.key == weight.key == f"x.{'qkv'[j]}"
        assert torch.equal(part.B, b[rows]) and part.A is a and torch.equal(part.magnitude, magnitude[rows])
        delta = build_delta(weight, (6, 4), torch.float64, torch.device("cpu"))
        assert torch.equal(delta, diff.factors["diff"][rows])
    for sizes, why in (
        (set(), r"its 18 rows interleave 3 parts of 6 rows per attention head, and the model states none"),
        ({2, 3}, r"and the model states several \(2, 3\) for the modules holding the parts"),
        ({4}, r"its parts' sizes \[6, 6, 6\] are not whole heads of the model's head size 4"),
    ):
        problems = []
        assert placed("x.qkv", lora, (rule,), problems, head_sizes=lambda targets, s=sizes: s) == []
        assert len(problems) == 1 and re.search(rf"x\.qkv \(x\.qkv\) -> x\.q, x\.k, x\.v: .*{why}", problems[0])
