"""Hunyuan-DiT in Tencent's original module names (``hunyuan-dit``, ``hunyuan-dit-kohya``) on a
diffusers ``HunyuanDiT2DModel``, against diffusers' checkpoint conversion
(``scripts/convert_hunyuandit_to_diffusers.py``) of the original weights plus each module's update.

The conversion, re-stated from that script for the adapted modules: ``attn1.Wqkv`` is chunked in
3 along the rows onto ``attn1.to_q``/``to_k``/``to_v``, ``attn2.kv_proj`` in 2 onto
``attn2.to_k``/``to_v``, ``final_layer.adaLN_modulation.1``'s ``(shift, scale)`` halves are swapped
onto ``norm_out.linear``, every other module is renamed (:data:`PARTS`); its norms: ``q_norm`` ->
``norm_q``, ``norm1`` -> ``norm1.norm``, ``norm2`` and ``norm3`` swapped.
"""

from __future__ import annotations

import re

import pytest
import torch

import lorahot
from lorahot.errors import UnknownFormatError
from tests.diffusion_names import delta, layer_weights, lora_factors
from tests.helpers import assert_merged_state, assert_norm_deltas_fold

diffusers = pytest.importorskip("diffusers")

D = 16  # heads x head_dim
LAYERS = 3  # the last block has a skip connection (skip_linear, skip_norm)


def tiny_hunyuan_dit() -> torch.nn.Module:
    torch.manual_seed(0)
    return (
        diffusers.HunyuanDiT2DModel(
            num_attention_heads=2,
            attention_head_dim=8,
            in_channels=4,
            patch_size=2,
            sample_size=8,
            hidden_size=D,
            num_layers=LAYERS,
            mlp_ratio=2.0,
            cross_attention_dim=D,
            cross_attention_dim_t5=D,
            pooled_projection_dim=8,
            text_len=4,
            text_len_t5=4,
        )
        .double()
        .eval()
    )


def _parts() -> dict[str, list[str]]:
    """Original module -> the diffusers layers its rows become, in row order. The attention
    pool's projections (``pooler.q_proj`` -> ``time_extra_emb.pooler.q_proj``) are left out: its
    forward reads their weights directly, so no LoRA layer can serve there (inject refuses them)."""
    out = {
        "t_embedder.mlp.0": ["time_extra_emb.timestep_embedder.linear_1"],
        "t_embedder.mlp.2": ["time_extra_emb.timestep_embedder.linear_2"],
        "extra_embedder.0": ["time_extra_emb.extra_embedder.linear_1"],
        "extra_embedder.2": ["time_extra_emb.extra_embedder.linear_2"],
        "mlp_t5.0": ["text_embedder.linear_1"],
        "mlp_t5.2": ["text_embedder.linear_2"],
        "x_embedder.proj": ["pos_embed.proj"],
        "final_layer.linear": ["proj_out"],
        "final_layer.adaLN_modulation.1": ["norm_out.linear"],
    }
    for i in range(LAYERS):
        b = f"blocks.{i}."
        out |= {
            b + "attn1.Wqkv": [b + f"attn1.to_{p}" for p in "qkv"],
            b + "attn1.out_proj": [b + "attn1.to_out.0"],
            b + "attn2.q_proj": [b + "attn2.to_q"],
            b + "attn2.kv_proj": [b + "attn2.to_k", b + "attn2.to_v"],
            b + "attn2.out_proj": [b + "attn2.to_out.0"],
            b + "mlp.fc1": [b + "ff.net.0.proj"],
            b + "mlp.fc2": [b + "ff.net.2"],
            b + "default_modulation.1": [b + "norm1.linear"],
        }
    out[f"blocks.{LAYERS - 1}.skip_linear"] = [f"blocks.{LAYERS - 1}.skip_linear"]
    return out


PARTS = _parts()


def converted(original: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The conversion script's mapping of the adapted modules' weights."""
    out = {}
    for name, w in original.items():
        module = name.removesuffix(".weight")
        if module == "final_layer.adaLN_modulation.1":
            shift, scale = w.chunk(2, dim=0)
            w = torch.cat([scale, shift], dim=0)
        targets = PARTS[module]
        out |= {f"{t}.weight": c for t, c in zip(targets, w.chunk(len(targets), dim=0), strict=True)}
    return out


def original_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapted modules' weights in the original names: the model's, put back together (the
    inverse of :func:`converted`), so that the conversion of these is the model's own."""
    sd = model.state_dict()
    out = {}
    for name, targets in PARTS.items():
        w = torch.cat([sd[f"{t}.weight"] for t in targets], dim=0)
        if name == "final_layer.adaLN_modulation.1":
            scale, shift = w.chunk(2, dim=0)
            w = torch.cat([shift, scale], dim=0)
        out[f"{name}.weight"] = w
    return out


def module_key(name: str, naming: str, head: str) -> str:
    return "lora_unet_" + name.replace(".", "_") if naming == "hunyuan-dit-kohya" else head + name


def lora_file(factors: dict[str, tuple], naming: str, head: str) -> dict[str, torch.Tensor]:
    """The LoRA in kohya's spelling, or dotted under ``head``: Tencent's PEFT files
    (``base_model.model.``) with ``lora_A``/``lora_B`` and no alpha, the others with ``.alpha``."""
    sd = {}
    for name, (a, b, alpha) in factors.items():
        module = module_key(name, naming, head)
        if head == "base_model.model.":
            sd |= {f"{module}.lora_A.weight": a, f"{module}.lora_B.weight": b}
        else:
            sd |= {f"{module}.lora_down.weight": a, f"{module}.lora_up.weight": b}
            sd[f"{module}.alpha"] = torch.tensor(alpha)
    return sd


NAMINGS = [
    ("hunyuan-dit", "base_model.model."),
    ("hunyuan-dit", "diffusion_model."),
    ("hunyuan-dit", "model.diffusion_model."),
    ("hunyuan-dit", "transformer."),
    ("hunyuan-dit", ""),
    ("hunyuan-dit-kohya", ""),
]
IDS = ["tencent-peft", "comfyui", "model-diffusion-model", "transformer", "no-prefix", "kohya"]


@pytest.mark.parametrize(("naming", "head"), NAMINGS, ids=IDS)
def test_hunyuan_dit_original_names_match_diffusers_checkpoint_conversion(naming: str, head: str) -> None:
    """Every module of Hunyuan-DiT in its original names (``attn1.Wqkv`` in thirds, ``attn2.kv_proj``
    in halves, the final adaLN's halves swapped, the patch conv, the pooler, the embedders, the
    skip connection), each with its own rank and alpha (Tencent's PEFT files: none, scale 1):
    each layer's float64 weight equals the one diffusers' conversion makes of the original weight
    plus the module's update. They were refused as matching no injected layer."""
    model = tiny_hunyuan_dit()
    base = original_weights(model)
    factors = lora_factors(base, PARTS, seed=7)
    updated = {}
    for name, (a, b, alpha) in factors.items():
        scale = a.shape[0] if head == "base_model.model." else alpha
        updated[f"{name}.weight"] = base[f"{name}.weight"] + delta(a, b, scale)
    oracle = tiny_hunyuan_dit()
    oracle.load_state_dict(converted(updated), strict=False)
    names = sorted({t for targets in PARTS.values() for t in targets})
    assert set(names) == {
        n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and ".pooler." not in n
    }
    runtime = lorahot.inject(model, names, max_rank=8)
    info = runtime.load(lora_file(factors, naming, head))
    assert info.format == naming
    ours, theirs = layer_weights(model, names), layer_weights(oracle, names)
    for name in names:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-12, atol=1e-12, msg=name)
    assert not torch.equal(
        ours["blocks.0.attn1.to_k"], layer_weights(tiny_hunyuan_dit(), ["blocks.0.attn1.to_k"])["blocks.0.attn1.to_k"]
    )


#: the original norms with a weight that keep their meaning -> diffusers' (the conversion's renames)
NORMS = {
    "blocks.0.attn1.q_norm": "blocks.0.attn1.norm_q",
    "blocks.0.attn1.k_norm": "blocks.0.attn1.norm_k",
    "blocks.0.attn2.q_norm": "blocks.0.attn2.norm_q",
    "blocks.0.attn2.k_norm": "blocks.0.attn2.norm_k",
    f"blocks.{LAYERS - 1}.skip_norm": f"blocks.{LAYERS - 1}.skip_norm",
}


@pytest.mark.parametrize(("naming", "head"), [NAMINGS[1], NAMINGS[5]], ids=[IDS[1], IDS[5]])
def test_hunyuan_dit_norm_deltas_fold_as_the_conversion_renames_them(naming: str, head: str) -> None:
    """``.diff`` deltas of the original query/key norms fold in merged mode into the diffusers norm
    the conversion renames each to (``attn1.q_norm`` -> ``attn1.norm_q``; ``skip_norm`` as it is),
    beside a LoRA on the fused ``Wqkv``; a delta of ``norm1`` (diffusers' ``norm1.norm``), ``norm2``
    or ``norm3`` (swapped by the conversion, names both models have) is refused by name, every
    parameter bitwise unchanged, and skipped with strict=False."""
    model = tiny_hunyuan_dit()
    pristine = {k: v.clone() for k, v in model.state_dict().items()}
    g = torch.Generator().manual_seed(3)
    qkv = module_key("blocks.0.attn1.Wqkv", naming, head)
    a, b = torch.randn(2, D, generator=g, dtype=torch.float64), torch.randn(3 * D, 2, generator=g, dtype=torch.float64)
    sd = {f"{qkv}.lora_down.weight": a, f"{qkv}.lora_up.weight": b}
    expected = {f"blocks.0.attn1.to_{p}.weight": w for p, w in zip("qkv", (b @ a).chunk(3), strict=True)}
    for name, norm in NORMS.items():
        shape = model.get_submodule(norm).weight.shape
        sd[f"{module_key(name, naming, head)}.diff"] = diff = torch.randn(shape, generator=g, dtype=torch.float64)
        expected[f"{norm}.weight"] = diff
    runtime = assert_norm_deltas_fold(model, sd, NORMS.values(), naming, pristine, expected)

    for moved in ("blocks.1.norm1", "blocks.1.norm2", "blocks.1.norm3"):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        hostile = dict(sd) | {f"{module_key(moved, naming, head)}.diff": torch.zeros(D, dtype=torch.float64)}
        with pytest.raises(
            UnknownFormatError, match=r"norm[123]\.diff: a delta of a block's norm1, norm2 or norm3, which"
        ):
            runtime.load(hostile)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        assert runtime.load(hostile, strict=False).skipped == (f"{module_key(moved, naming, head)}.diff",)
        assert_merged_state(model, pristine, expected, 1.0)


@pytest.mark.parametrize("spelling", ["peft", "kohya"])
def test_tencent_lora_with_the_attention_pool_is_refused_naming_it_or_skips_it(spelling: str) -> None:
    """Tencent's LoRA targets (``Wqkv``, ``q_proj``, ``kv_proj``, ``out_proj``) take the attention
    pool's ``pooler.q_proj`` too, whose weight the pool (diffusers' and Tencent's) hands to
    ``F.multi_head_attention_forward`` without calling the module, so no LoRA layer can serve
    there, where ComfyUI and a PEFT merge fold it into the weight. The file is refused naming that
    module and why (it was refused as matching no injected layer, with the hint to inject it, which
    inject refuses), in PEFT's and kohya's spelling, every parameter bitwise unchanged; with
    strict=False the rest lands as the conversion places it."""
    model = tiny_hunyuan_dit()
    names = [
        t for n in ("attn1.Wqkv", "attn1.out_proj", "attn2.q_proj", "attn2.kv_proj") for t in PARTS[f"blocks.0.{n}"]
    ]
    runtime = lorahot.inject(model, names, max_rank=8)
    g = torch.Generator().manual_seed(5)
    sd, expected = {}, {}
    for name in (
        "blocks.0.attn1.Wqkv",
        "blocks.0.attn1.out_proj",
        "blocks.0.attn2.q_proj",
        "blocks.0.attn2.kv_proj",
        "pooler.q_proj",
    ):
        targets = PARTS.get(name, ["time_extra_emb.pooler.q_proj"])
        a = torch.randn(4, D, generator=g, dtype=torch.float64)
        b = torch.randn(D * len(targets), 4, generator=g, dtype=torch.float64)
        if spelling == "peft":
            sd |= {f"base_model.model.{name}.lora_A.weight": a, f"base_model.model.{name}.lora_B.weight": b}
        else:
            key = "lora_unet_" + name.replace(".", "_")
            sd |= {f"{key}.lora_down.weight": a, f"{key}.lora_up.weight": b, f"{key}.alpha": torch.tensor(4.0)}
        expected |= dict(zip(targets, (b @ a).chunk(len(targets)), strict=True))
    pool = (
        ["base_model.model.pooler.q_proj.lora_A.weight", "base_model.model.pooler.q_proj.lora_B.weight"]
        if spelling == "peft"
        else [f"lora_unet_pooler_q_proj.{r}" for r in ("alpha", "lora_down.weight", "lora_up.weight")]
    )
    before = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    with pytest.raises(
        lorahot.UnknownFormatError,
        match=rf"{re.escape(pool[-1])}: a module of the attention pool \(pooler\.q_proj, .*\), whose weights the "
        r"pool hands to F\.multi_head_attention_forward without calling the module, in diffusers' "
        r"HunyuanDiTAttentionPool as in Tencent's AttentionPool: no LoRA layer can serve it.*ComfyUI and a PEFT "
        r"merge_and_unload fold it into the weight.*load with strict=False to skip it knowingly",
    ):
        runtime.load(dict(sd))
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    info = runtime.load(dict(sd), strict=False)
    assert info.format == ("hunyuan-dit" if spelling == "peft" else "hunyuan-dit-kohya")
    assert sorted(info.skipped) == pool
    pristine = layer_weights(tiny_hunyuan_dit(), names)
    ours = layer_weights(model, names)
    for name in names:
        torch.testing.assert_close(ours[name], pristine[name] + expected[name].T, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize(
    ("head", "down", "up", "naming"),
    [
        ("transformer.", "lora_A.weight", "lora_B.weight", "diffusers"),
        ("", "lora_A.weight", "lora_B.weight", "peft"),
        ("base_model.model.", "lora_A.weight", "lora_B.weight", "peft"),
        ("diffusion_model.", "lora_A.weight", "lora_B.weight", "comfyui"),
        ("lora_unet_", "lora_down.weight", "lora_up.weight", "kohya"),
    ],
)
@pytest.mark.parametrize("pool", ["q_proj", "c_proj"])
def test_the_attention_pool_in_diffusers_names_is_refused_as_in_tencents(
    head: str, down: str, up: str, naming: str, pool: str
) -> None:
    """A file of the diffusers model's own names that adapts the attention pool
    (``time_extra_emb.pooler.q_proj``, ...) got the generic refusal of a module matching no
    injected layer, with the hint to inject it, which inject refuses; Tencent's names got why
    (the pool hands those weights to ``F.multi_head_attention_forward`` without calling the
    modules). Every naming now refuses the pool's keys with that one explanation, every
    parameter and buffer bitwise unchanged; strict=False skips them and lands the rest in float64."""
    model = tiny_hunyuan_dit()
    names = ["blocks.0.attn1.to_q", "blocks.1.attn2.to_k"]
    runtime = lorahot.inject(model, names, max_rank=8)
    g = torch.Generator().manual_seed(7)
    sd, expected = {}, {}
    for name in (*names, f"time_extra_emb.pooler.{pool}"):
        key = head + (name.replace(".", "_") if head == "lora_unet_" else name)
        a = torch.randn(4, D, generator=g, dtype=torch.float64)
        b = torch.randn(D, 4, generator=g, dtype=torch.float64)
        sd |= {f"{key}.{down}": a, f"{key}.{up}": b}
        expected[name] = b @ a  # no alpha: scale 1
    refused = [k for k in sd if "pooler" in k]
    before = {k: v.clone() for k, v in model.state_dict(keep_vars=True).items()}
    with pytest.raises(
        lorahot.UnknownFormatError,
        match=rf"{re.escape(refused[-1])}: a module of the attention pool \(pooler\.q_proj, .*time_extra_emb\.pooler"
        r"\), whose weights the pool hands to F\.multi_head_attention_forward without calling the module.*no LoRA "
        r"layer can serve it.*load with strict=False to skip it knowingly",
    ):
        runtime.load(dict(sd))
    after = model.state_dict(keep_vars=True)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    info = runtime.load(dict(sd), strict=False)
    assert info.format == naming and sorted(info.skipped) == sorted(refused)
    pristine = layer_weights(tiny_hunyuan_dit(), names)
    ours = layer_weights(model, names)
    for name in names:
        torch.testing.assert_close(ours[name], pristine[name] + expected[name].T, rtol=1e-12, atol=1e-12, msg=name)
