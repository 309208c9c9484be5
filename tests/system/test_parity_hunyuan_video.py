"""lorahot against diffusers' own HunyuanVideo loader as the oracle: an adapter in the original
HunyuanVideo names (``diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight``), whose fused
modules lorahot splits onto a diffusers-named ``HunyuanVideoTransformer3DModel``.

- **Model outputs** on a tiny transformer from config: diffusers reads the file with
  ``HunyuanVideoPipeline.lora_state_dict`` (its real conversion code) and loads it with
  ``load_lora_adapter``; lorahot injects and loads the same file. diffusers' conversion
  hard-codes a single block's ``linear1`` sizes at the full model's (``3072, 3072, 3072, 12288``),
  so the tiny file leaves ``linear1`` out; and it cuts a token-refiner block's ``self_attn_qkv``
  A into thirds along the rank (so its A and B disagree and PEFT refuses them), so the file
  leaves that out too (lorahot splits it as it splits ``img_attn_qkv``). For the final adaLN
  projection diffusers swaps the halves of A's rows (the rank) as well as B's (the shift and
  scale rows), which is B's swap alone only when A's halves are equal: the file's A is so.
- **Conversion at full size** (rank 2, so cheap): ``linear1``'s four-way split, diffusers'
  converted ``B @ A`` against lorahot's ``scale * B @ A`` on a random probe.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorahot
from lorahot.resolve.keys import resolve_keys
from tests.helpers import assert_norm_deltas_fold

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

D, MLP, TEXT, POOLED = 16, 64, 16, 8


def original_modules(linear1: bool) -> dict[str, tuple[int, int]]:
    """Original module name -> (in, out) of the tiny model."""
    out = {
        "img_in.proj": (0, 0),  # placeholder removed below: a conv, left out
        "time_in.mlp.0": (256, D),
        "time_in.mlp.2": (D, D),
        "guidance_in.mlp.0": (256, D),
        "guidance_in.mlp.2": (D, D),
        "vector_in.in_layer": (POOLED, D),
        "vector_in.out_layer": (D, D),
        "txt_in.input_embedder": (TEXT, D),
        "txt_in.t_embedder.mlp.0": (256, D),
        "txt_in.t_embedder.mlp.2": (D, D),
        "txt_in.c_embedder.linear_1": (TEXT, D),
        "txt_in.c_embedder.linear_2": (D, D),
        "txt_in.individual_token_refiner.blocks.0.self_attn_proj": (D, D),
        "txt_in.individual_token_refiner.blocks.0.mlp.fc1": (D, MLP),
        "txt_in.individual_token_refiner.blocks.0.mlp.fc2": (MLP, D),
        "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1": (D, 2 * D),
        "final_layer.linear": (D, 4),
        "final_layer.adaLN_modulation.1": (D, 2 * D),
        "single_blocks.0.linear2": (D + MLP, D),
        "single_blocks.0.modulation.linear": (D, 3 * D),
    }
    del out["img_in.proj"]
    for s in ("img", "txt"):
        out |= {
            f"double_blocks.0.{s}_attn_qkv": (D, 3 * D),
            f"double_blocks.0.{s}_attn_proj": (D, D),
            f"double_blocks.0.{s}_mlp.fc1": (D, MLP),
            f"double_blocks.0.{s}_mlp.fc2": (MLP, D),
            f"double_blocks.0.{s}_mod.linear": (D, 6 * D),
        }
    if linear1:
        out["single_blocks.0.linear1"] = (D, 3 * D + MLP)
    return out


def hunyuan_file(modules: dict[str, tuple[int, int]], prefix: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for i, (name, (fan_in, fan_out)) in enumerate(modules.items()):
        r = 2 + i % 3
        sd[f"{prefix}{name}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) * 0.3
        sd[f"{prefix}{name}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * 0.3
        if name == "final_layer.adaLN_modulation.1":  # see the module docstring
            sd[f"{prefix}{name}.lora_A.weight"] = torch.randn(2, fan_in, generator=g).repeat(2, 1) * 0.3
            sd[f"{prefix}{name}.lora_B.weight"] = torch.randn(fan_out, 4, generator=g) * 0.3
    return sd


def tiny_hunyuan() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=D // 2,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=TEXT,
        pooled_projection_dim=POOLED,
        rope_axes_dim=(2, 2, 4),
    ).eval()


def hunyuan_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 4, 2, 4, 4, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 5, TEXT, generator=g),
        "encoder_attention_mask": torch.ones(1, 5, dtype=torch.long),
        "pooled_projections": torch.randn(1, POOLED, generator=g),
        "guidance": torch.tensor([3500.0]),
    }


@pytest.mark.parametrize("prefix", ["diffusion_model.", "transformer.", ""])
def test_hunyuan_video_matches_diffusers(prefix: str, tmp_path: Path) -> None:
    sd = hunyuan_file(original_modules(linear1=False), prefix, seed=2)
    path = tmp_path / "hunyuan_lora.safetensors"
    save_file(sd, str(path))
    with torch.no_grad():
        oracle = tiny_hunyuan()
        oracle.load_lora_adapter(diffusers.HunyuanVideoPipeline.lora_state_dict(dict(sd)), prefix="transformer")
        expected = oracle(**hunyuan_inputs(), return_dict=False)[0]
        model = tiny_hunyuan()
        base = model(**hunyuan_inputs(), return_dict=False)[0]
        runtime = lorahot.inject(model, "all-linear", max_rank=8)
        runtime.load(path)
        ours = model(**hunyuan_inputs(), return_dict=False)[0]
    assert lorahot.read_adapter(path).format == "hunyuan-video"
    assert not torch.allclose(expected, base, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_hunyuan_video_refiner_qkv_splits_like_img_attn_qkv(tmp_path: Path) -> None:
    """The token refiner's fused ``self_attn_qkv``: each of q, k, v gets A and its third of B's rows."""
    sd = hunyuan_file({"txt_in.individual_token_refiner.blocks.0.self_attn_qkv": (D, 3 * D)}, "", seed=3)
    names = [n for n, m in tiny_hunyuan().named_modules() if isinstance(m, torch.nn.Linear)]
    placed = resolve_keys(lorahot.read_adapter(dict(sd)), names)
    a, b = (
        sd["txt_in.individual_token_refiner.blocks.0.self_attn_qkv.lora_A.weight"],
        sd["txt_in.individual_token_refiner.blocks.0.self_attn_qkv.lora_B.weight"],
    )
    for j, part in enumerate(("to_q", "to_k", "to_v")):
        m = placed[f"context_embedder.token_refiner.refiner_blocks.0.attn.{part}"]
        torch.testing.assert_close(m.scale * m.B @ m.A, b[j * D : (j + 1) * D] @ a)


def test_hunyuan_video_full_size_linear1_split_matches_diffusers_conversion() -> None:
    full_d, full_mlp = 3072, 12288
    modules = {
        "double_blocks.0.img_attn_qkv": (full_d, 3 * full_d),
        "single_blocks.0.linear1": (full_d, 3 * full_d + full_mlp),
        "single_blocks.0.linear2": (full_d + full_mlp, full_d),
    }
    g = torch.Generator().manual_seed(6)
    sd = {}
    for name, (fan_in, fan_out) in modules.items():
        sd[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(2, fan_in, generator=g)
        sd[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(fan_out, 2, generator=g)
    probes = {n: torch.randn(n, 2, generator=g, dtype=torch.float64) for n in (full_d, full_d + full_mlp)}
    theirs = {}
    converted = diffusers.HunyuanVideoPipeline.lora_state_dict(dict(sd))
    for key, a in converted.items():
        if key.endswith(".lora_A.weight"):
            b = converted[key.replace(".lora_A.", ".lora_B.")]
            theirs[key[len("transformer.") : -len(".lora_A.weight")]] = b.double() @ (a.double() @ probes[a.shape[1]])
    adapter = lorahot.read_adapter(dict(sd))
    assert adapter.format == "hunyuan-video"
    placed = resolve_keys(adapter, sorted(theirs))
    ours = {k: m.scale * (m.B.double() @ (m.A.double() @ probes[m.A.shape[1]])) for k, m in placed.items()}
    assert sorted(ours) == sorted(theirs)
    for name in theirs:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-6, atol=1e-6, msg=name)


#: musubi-tuner's kohya spelling: ``lora_unet_`` and the original name with every ``.`` as ``_``
def musubi_name(name: str) -> str:
    return "lora_unet_" + name.replace(".", "_")


def musubi_pair(modules: dict[str, tuple[int, int]], seed: int) -> tuple[dict, dict]:
    """A musubi-tuner file with an ``.alpha`` per module (alphas differ between modules), and the
    same factors and alphas in the original naming (``diffusion_model.``, ``lora_A``/``lora_B``)."""
    original = hunyuan_file(modules, "diffusion_model.", seed)
    musubi = {}
    for i, name in enumerate(modules):
        a, b = (original[f"diffusion_model.{name}.lora_{x}.weight"] for x in "AB")
        alpha = torch.tensor(a.shape[0] * (0.5 + i % 3))
        original[f"diffusion_model.{name}.alpha"] = alpha
        musubi |= {f"{musubi_name(name)}.lora_down.weight": a, f"{musubi_name(name)}.lora_up.weight": b}
        musubi[f"{musubi_name(name)}.alpha"] = alpha
    return musubi, original


@pytest.mark.parametrize("naming", ["hunyuan-video-musubi", "hunyuan-video"])
def test_hunyuan_video_musubi_matches_diffusers_on_the_original_names(naming: str, tmp_path: Path) -> None:
    """musubi-tuner's spelling (``lora_unet_double_blocks_0_img_mlp_fc1``) was read as Flux's kohya
    naming: the modules whose names Flux shares were placed, ``img_mlp_fc1``, ``img_mod_linear``
    and ``modulation_linear`` refused as unmapped. diffusers has no musubi HunyuanVideo
    conversion, and its HunyuanVideo conversion fails on ``.alpha`` keys (it chunks the 0-d
    alpha of a fused module); it loads the same factors in the original naming with each alpha
    folded into B. lorahot loads the musubi file, and the original-named one with its
    ``.alpha`` keys. ``linear1`` and the refiner's ``self_attn_qkv`` are left out as in
    :func:`test_hunyuan_video_matches_diffusers`."""
    musubi, original = musubi_pair(original_modules(linear1=False), seed=11)
    folded = {}
    for key, t in original.items():
        if key.endswith(".lora_B.weight"):
            alpha = original[key.replace(".lora_B.weight", ".alpha")]
            t = t * (alpha / t.shape[1])
        if not key.endswith(".alpha"):
            folded[key] = t
    path = tmp_path / "hunyuan_alphas.safetensors"
    save_file(musubi if naming == "hunyuan-video-musubi" else original, str(path))
    with torch.no_grad():
        oracle = tiny_hunyuan()
        oracle.load_lora_adapter(diffusers.HunyuanVideoPipeline.lora_state_dict(folded), prefix="transformer")
        expected = oracle(**hunyuan_inputs(), return_dict=False)[0]
        model = tiny_hunyuan()
        base = model(**hunyuan_inputs(), return_dict=False)[0]
        runtime = lorahot.inject(model, "all-linear", max_rank=8)
        info = runtime.load(path)
        ours = model(**hunyuan_inputs(), return_dict=False)[0]
    assert info.format == naming
    assert not torch.allclose(expected, base, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


#: the module names HunyuanVideo and Flux.1 spell alike in kohya naming (and mean alike)
_SHARED = ("img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj", "linear1", "linear2", "final_layer")


@pytest.mark.parametrize("subset", ["all", "shared"])
def test_hunyuan_video_musubi_places_every_module_as_the_original_naming(subset: str) -> None:
    """Every module, ``linear1`` and the refiner's ``self_attn_qkv`` split, the final adaLN rows
    swapped, each with its own alpha: the update of each layer in float64 equals the one the same
    factors make in the original naming (checked against diffusers above). A file of the names
    Flux.1 shares only reads as ``flux-kohya``, which places them the same way."""
    modules = original_modules(linear1=True)
    modules["txt_in.individual_token_refiner.blocks.0.self_attn_qkv"] = (D, 3 * D)
    if subset == "shared":
        modules = {k: v for k, v in modules.items() if k.rpartition(".")[2] in _SHARED or "final_layer" in k}
    musubi, original = musubi_pair(modules, seed=12)
    names = [n for n, m in tiny_hunyuan().named_modules() if isinstance(m, torch.nn.Linear)]
    ours_adapter = lorahot.read_adapter(dict(musubi))
    assert ours_adapter.format == ("hunyuan-video-musubi" if subset == "all" else "flux-kohya")

    def updates(adapter: lorahot.Adapter) -> dict[str, torch.Tensor]:
        return {k: m.scale * m.B.double() @ m.A.double() for k, m in resolve_keys(adapter, names).items()}

    ours, reference = updates(ours_adapter), updates(lorahot.read_adapter(dict(original)))
    assert sorted(ours) == sorted(reference)
    assert len(ours) > len(modules)  # the fused modules were split
    for name in reference:
        torch.testing.assert_close(ours[name], reference[name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("naming", ["hunyuan-video", "hunyuan-video-musubi"])
def test_hunyuan_video_lycoris_merges_whole_and_fused_modules(naming: str) -> None:
    """A LoHa on ``img_mlp.fc1`` (one diffusers layer) merges as LyCORIS computes it, and one on
    the fused ``img_attn_qkv`` as LyCORIS computes it on the fused layer: its ``ΔW``'s rows
    ``[0, D)``, ``[D, 2 D)``, ``[2 D, 3 D)`` on ``to_q``, ``to_k``, ``to_v``. Both were refused as
    'LyCORIS ... in kohya or ComfyUI naming', though ComfyUI naming loads such factors; then the
    fused one as 'lorahot splits LoRA modules only'."""
    g = torch.Generator().manual_seed(10)
    spell = (
        (lambda n: f"diffusion_model.{n}")
        if naming == "hunyuan-video"
        else (lambda n: "lora_unet_" + n.replace(".", "_"))
    )

    def loha(key: str, rows: int) -> dict[str, torch.Tensor]:
        shapes = {"hada_w1_a": (rows, 2), "hada_w1_b": (2, D), "hada_w2_a": (rows, 2), "hada_w2_b": (2, D)}
        return {f"{key}.{f}": torch.randn(*s, generator=g, dtype=torch.float64) * 0.3 for f, s in shapes.items()}

    def delta(key: str) -> torch.Tensor:
        return (sd[f"{key}.hada_w1_a"] @ sd[f"{key}.hada_w1_b"]) * (sd[f"{key}.hada_w2_a"] @ sd[f"{key}.hada_w2_b"])

    mlp, qkv = spell("double_blocks.0.img_mlp.fc1"), spell("double_blocks.0.img_attn_qkv")
    sd = loha(mlp, MLP) | loha(qkv, 3 * D)
    model = tiny_hunyuan().double()
    layers = ["ff.net.0.proj", "attn.to_q", "attn.to_k", "attn.to_v"]
    base = {n: model.get_submodule(f"transformer_blocks.0.{n}").weight.detach().clone() for n in layers}
    runtime = lorahot.inject(model, "all-linear", max_rank=8, merged=True)
    assert runtime.load(dict(sd)).format == naming
    fused = delta(qkv)
    expected = {"ff.net.0.proj": delta(mlp), "attn.to_q": fused[:D], "attn.to_k": fused[D : 2 * D]}
    expected["attn.to_v"] = fused[2 * D :]
    for n in layers:
        weight = model.get_submodule(f"transformer_blocks.0.{n}").weight
        torch.testing.assert_close(weight, base[n] + expected[n], rtol=1e-12, atol=1e-12, msg=n)


REFINER = "txt_in.individual_token_refiner.blocks.0"
#: HunyuanVideo's norms with a weight -> (diffusers' norm, size, has a bias), as diffusers'
#: HunyuanVideo conversion renames them
HUNYUAN_NORMS = {
    "double_blocks.0.img_attn_q_norm": ("transformer_blocks.0.attn.norm_q", D // 2, False),
    "double_blocks.0.img_attn_k_norm": ("transformer_blocks.0.attn.norm_k", D // 2, False),
    "double_blocks.0.txt_attn_q_norm": ("transformer_blocks.0.attn.norm_added_q", D // 2, False),
    "double_blocks.0.txt_attn_k_norm": ("transformer_blocks.0.attn.norm_added_k", D // 2, False),
    "single_blocks.0.q_norm": ("single_transformer_blocks.0.attn.norm_q", D // 2, False),
    "single_blocks.0.k_norm": ("single_transformer_blocks.0.attn.norm_k", D // 2, False),
    # a token-refiner block's LayerNorms, with a bias
    **{f"{REFINER}.{n}": (f"context_embedder.token_refiner.refiner_blocks.0.{n}", D, True) for n in ("norm1", "norm2")},
}


@pytest.mark.parametrize("naming", ["hunyuan-video", "hunyuan-video-musubi"])
def test_hunyuan_video_norm_deltas_fold_into_diffusers_norms_in_merged_mode(naming: str) -> None:
    """ComfyUI's LoRA extraction writes a ``.diff`` (and ``.diff_b``) for every norm with a weight;
    the HunyuanVideo namings placed none of them on diffusers' model (``img_attn_q_norm.diff``
    matched no injected layer, with a hint to inject a norm that the key could never reach). Now
    ``plan_targets`` lists diffusers' norms and the file folds: float64 ``W + s alpha / r B A`` and
    ``w + s diff``, ``b + s diff_b`` at scales 1 and 0.5. The deltas of the weightless norms
    (``img_norm1``, ``pre_norm``, ``norm_final``) are refused by name, nothing changed."""
    g = torch.Generator().manual_seed(40)
    spell = musubi_name if naming == "hunyuan-video-musubi" else (lambda n: f"diffusion_model.{n}")
    with torch.no_grad():
        model = tiny_hunyuan().double()
        pristine = {k: v.clone() for k, v in model.state_dict().items()}
        a = torch.randn(2, D, generator=g, dtype=torch.float64) * 0.3
        b = torch.randn(MLP, 2, generator=g, dtype=torch.float64) * 0.3
        fc1 = spell("double_blocks.0.img_mlp.fc1")
        sd = {f"{fc1}.lora_down.weight": a, f"{fc1}.lora_up.weight": b, f"{fc1}.alpha": torch.tensor(3.0)}
        expected = {"transformer_blocks.0.ff.net.0.proj.weight": 1.5 * b @ a}
        for name, (norm, size, bias) in HUNYUAN_NORMS.items():
            assert model.get_submodule(norm).weight.shape == (size,)
            sd[f"{spell(name)}.diff"] = torch.randn(size, generator=g, dtype=torch.float64) * 0.1
            expected[f"{norm}.weight"] = sd[f"{spell(name)}.diff"]
            if bias:
                sd[f"{spell(name)}.diff_b"] = torch.randn(size, generator=g, dtype=torch.float64) * 0.1
                expected[f"{norm}.bias"] = sd[f"{spell(name)}.diff_b"]
        runtime = assert_norm_deltas_fold(
            model, sd, {n for n, _, _ in HUNYUAN_NORMS.values()}, naming, pristine, expected
        )

        before = {k: v.clone() for k, v in model.state_dict().items()}
        for weightless in ("double_blocks.0.img_norm1", "double_blocks.0.txt_norm2", "single_blocks.0.pre_norm"):
            hostile = dict(sd) | {f"{spell(weightless)}.diff": torch.zeros(D, dtype=torch.float64)}
            with pytest.raises(lorahot.UnknownFormatError, match=r"no weight or bias in HunyuanVideo.*strict=False"):
                runtime.load(hostile)
        hostile = dict(sd) | {f"{spell('final_layer.norm_final')}.diff_b": torch.zeros(D, dtype=torch.float64)}
        with pytest.raises(lorahot.UnknownFormatError, match=r"norm_final\.diff_b: a delta of a normalization layer"):
            runtime.load(hostile)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
