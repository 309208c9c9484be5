"""Placing fused modules onto separate layers (:mod:`lorahot.resolve.split`): against a dense
float64 reference, the block-sparse layout, re-ordered rows, and every refusal (typed, with
nothing changed after a failed load)."""

from __future__ import annotations

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
from lorahot.resolve.split import reorder_module, split_module


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
        r"single_transformer_blocks\.0\.attn\.to_k, which diffusion_model\.single_transformer_blocks\.0\.attn\.to_k "
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


@pytest.mark.parametrize(
    ("tensors", "options", "match"),
    [
        (
            _loha("lora_unet_single_transformer_blocks_0_linear1", 28),
            {"split": {"linear1": _PARTS}},
            r"split= cuts LoRA modules \(B @ A\) by rows; these are weight deltas it does not cut:\n"
            r"  - lora_unet_single_transformer_blocks_0_linear1\.hada_w1_a, .*: a loha module",
        ),
        (
            {**_loha("lora_unet_attn_to_q", 4), **_loha("lora_unet_attn_to_k", 4)},
            {"fuse": {"to_qk": ["to_q", "to_k"]}},
            r"cannot fuse:\n  - 'lora_unet_attn_to_q': a loha module, a weight delta; "
            r"fuse= joins LoRA modules \(B @ A\) only",
        ),
    ],
    ids=["split", "fuse"],
)
def test_a_weight_delta_named_by_split_or_fuse_is_refused_saying_so(
    tensors: dict[str, torch.Tensor], options: dict, match: str
) -> None:
    """split= and fuse= reshape ``B @ A`` modules; a LyCORIS kind under a key they name is
    refused with that reason, in merged mode too, where it would otherwise have been left to
    match no layer (the message then named no cause)."""
    model = _Model()
    runtime = lorahot.inject(model, ["to_q", "to_k", "to_v", "proj_mlp"], max_rank=4, merged=True)
    x = torch.randn(3, 4)
    before = model(x)
    with pytest.raises(lorahot.AdapterMismatchError, match=match):
        runtime.load(tensors, **options)
    assert torch.equal(model(x), before)


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
