"""lorahot against diffusers' own Lumina2 loader as the oracle: an adapter in the original
Lumina-Image 2.0 names (``diffusion_model.layers.0.attention.qkv.lora_A.weight``), whose fused
``attention.qkv`` lorahot splits onto a diffusers-named ``Lumina2Transformer2DModel``.

diffusers' conversion hard-codes the qkv split at the full model's width (``2304, 768, 768``) and
wants every module of every block it sees, so the model is full width (2304, 24 query and 8
key-value heads) but one block of each kind deep; ranks are small.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorahot
from tests.helpers import assert_norm_deltas_fold

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

D, KV, FFN, EMB = 2304, 768, 9216, 1024


def lumina2_file(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    modules: dict[str, tuple[int, int]] = {}
    for blocks in ("noise_refiner", "context_refiner", "layers"):
        modules |= {
            f"{blocks}.0.attention.qkv": (D, D + 2 * KV),
            f"{blocks}.0.attention.out": (D, D),
            f"{blocks}.0.feed_forward.w1": (D, FFN),
            f"{blocks}.0.feed_forward.w2": (FFN, D),
            f"{blocks}.0.feed_forward.w3": (D, FFN),
        }
        if blocks != "context_refiner":
            modules[f"{blocks}.0.adaLN_modulation.1"] = (EMB, 4 * D)
    sd = {}
    for i, (name, (fan_in, fan_out)) in enumerate(modules.items()):
        r = 1 + i % 3
        sd[f"diffusion_model.{name}.lora_A.weight"] = torch.randn(r, fan_in, generator=g) * 0.05
        sd[f"diffusion_model.{name}.lora_B.weight"] = torch.randn(fan_out, r, generator=g) * 0.05
    return sd


def tiny_lumina2() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        hidden_size=D,
        num_layers=1,
        num_refiner_layers=1,
        num_attention_heads=24,
        num_kv_heads=8,
        multiple_of=16,
        axes_dim_rope=(32, 32, 32),
        axes_lens=(300, 64, 64),
        cap_feat_dim=16,
    ).eval()


def lumina2_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 4, 4, 4, generator=g),
        "timestep": torch.tensor([0.5]),
        "encoder_hidden_states": torch.randn(1, 5, 16, generator=g),
        "encoder_attention_mask": torch.ones(1, 5, dtype=torch.bool),
    }


def test_lumina2_matches_diffusers(tmp_path: Path) -> None:
    sd = lumina2_file(seed=2)
    path = tmp_path / "lumina2_lora.safetensors"
    save_file(sd, str(path))
    with torch.no_grad():
        model = tiny_lumina2()
        base = model(**lumina2_inputs(), return_dict=False)[0]
        model.load_lora_adapter(diffusers.Lumina2Pipeline.lora_state_dict(dict(sd)), prefix="transformer")
        expected = model(**lumina2_inputs(), return_dict=False)[0]
        del model
        model = tiny_lumina2()
        runtime = lorahot.inject(model, "all-linear", max_rank=4)
        runtime.load(path)
        ours = model(**lumina2_inputs(), return_dict=False)[0]
    assert lorahot.read_adapter(path).format == "lumina2"
    assert not torch.allclose(expected, base, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def test_lumina2_kohya_spelling_matches_diffusers_on_the_original_names() -> None:
    """sd-scripts' spelling of the same names (``lora_unet_layers_0_attention_qkv``, with
    ``.alpha``): read as ``lumina2-kohya``, split and aliased as the dotted names are; the oracle
    is diffusers' loader on the dotted file with each module's ``alpha / r`` folded into B (its
    Lumina2 conversion has no kohya path and reads no alphas). Before, the file read as plain
    kohya and every block module was refused as matching no layer."""
    sd = lumina2_file(seed=3)
    kohya, dotted = {}, {}
    for key, value in sd.items():
        module, role = key.removeprefix("diffusion_model.").rsplit(".", 2)[0], key.rsplit(".", 2)[1]
        stem, r = "lora_unet_" + module.replace(".", "_"), value.shape[0] if role == "lora_A" else value.shape[1]
        alpha = float(r) * (0.5 + len(module) % 3)
        kohya[f"{stem}.{'lora_down' if role == 'lora_A' else 'lora_up'}.weight"] = value
        kohya[f"{stem}.alpha"] = torch.tensor(alpha)
        dotted[key] = value * (alpha / r if role == "lora_B" else 1.0)
    with torch.no_grad():
        model = tiny_lumina2()
        model.load_lora_adapter(diffusers.Lumina2Pipeline.lora_state_dict(dotted), prefix="transformer")
        expected = model(**lumina2_inputs(), return_dict=False)[0]
        del model
        model = tiny_lumina2()
        info = lorahot.inject(model, "all-linear", max_rank=4).load(kohya)
        ours = model(**lumina2_inputs(), return_dict=False)[0]
    assert info.format == "lumina2-kohya"
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


def small_lumina2() -> torch.nn.Module:
    """A Lumina2 of hidden size 32 (for the state-dict checks, which need no diffusers conversion)."""
    torch.manual_seed(0)
    return diffusers.Lumina2Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        hidden_size=32,
        num_layers=1,
        num_refiner_layers=1,
        num_attention_heads=2,
        num_kv_heads=2,
        multiple_of=16,
        axes_dim_rope=(4, 6, 6),
        axes_lens=(64, 32, 32),
        cap_feat_dim=16,
    ).eval()


def small_zimage() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.ZImageTransformer2DModel(
        in_channels=4,
        dim=32,
        n_layers=1,
        n_refiner_layers=1,
        n_heads=2,
        n_kv_heads=2,
        cap_feat_dim=16,
        axes_dims=[4, 6, 6],
        axes_lens=[64, 32, 32],
    ).eval()


#: the original norms with a weight -> (diffusers' Lumina2 norm, Z-Image's, size), as diffusers'
#: Lumina2 and Z-Image conversions rename them
LUMINA2_NORMS = {
    "layers.0.attention.q_norm": ("layers.0.attn.norm_q", "layers.0.attention.norm_q", 16),
    "layers.0.attention.k_norm": ("layers.0.attn.norm_k", "layers.0.attention.norm_k", 16),
    "layers.0.attention_norm1": ("layers.0.norm1.norm", "layers.0.attention_norm1", 32),
    "layers.0.attention_norm2": ("layers.0.norm2", "layers.0.attention_norm2", 32),
    "layers.0.ffn_norm1": ("layers.0.ffn_norm1", "layers.0.ffn_norm1", 32),
    "noise_refiner.0.attention_norm1": ("noise_refiner.0.norm1.norm", "noise_refiner.0.attention_norm1", 32),
    "context_refiner.0.attention_norm1": ("context_refiner.0.norm1", "context_refiner.0.attention_norm1", 32),
    "context_refiner.0.ffn_norm2": ("context_refiner.0.ffn_norm2", "context_refiner.0.ffn_norm2", 32),
    "cap_embedder.0": ("time_caption_embed.caption_embedder.0", "cap_embedder.0", 16),
}


@pytest.mark.parametrize("kohya", [False, True], ids=["dotted", "kohya"])
@pytest.mark.parametrize("zimage", [False, True], ids=["lumina2", "z-image"])
def test_lumina2_norm_deltas_fold_into_diffusers_norms_in_merged_mode(zimage: bool, kohya: bool) -> None:
    """A ``.diff`` of a norm in the original Lumina2 names (``layers.0.attention_norm1``,
    ``attention.q_norm``, as ComfyUI's LoRA extraction writes one for every norm with a weight)
    matched no injected layer on diffusers' Lumina2 (``norm1.norm``, ``attn.norm_q``) or Z-Image
    (``attention.norm_q``). Now they are aliased as diffusers' conversions rename them,
    ``plan_targets`` lists the norms and the file folds: float64 ``W + s alpha / r B A`` and
    ``w + s diff`` at scales 1 and 0.5. Deltas of the weightless ``final_layer.norm_final`` and of
    the unused top-level ``norm_final`` are refused by name, nothing changed. The same in kohya's
    spelling (``lora_unet_layers_0_attention_q_norm.diff``), which read no ``.diff`` at all."""

    def spelled(name: str) -> str:
        return "lora_unet_" + name.replace(".", "_") if kohya else f"diffusion_model.{name}"

    g = torch.Generator().manual_seed(70)
    with torch.no_grad():
        model = (small_zimage() if zimage else small_lumina2()).double()
        pristine = {k: v.clone() for k, v in model.state_dict().items()}
        out = "layers.0.attention.to_out.0" if zimage else "layers.0.attn.to_out.0"
        a = torch.randn(2, 32, generator=g, dtype=torch.float64) * 0.3
        b = torch.randn(32, 2, generator=g, dtype=torch.float64) * 0.3
        stem = spelled("layers.0.attention.out")
        sd = {f"{stem}.lora_down.weight": a, f"{stem}.lora_up.weight": b, f"{stem}.alpha": torch.tensor(3.0)}
        expected = {f"{out}.weight": 1.5 * b @ a}
        for name, (lumina2, zimage_norm, size) in LUMINA2_NORMS.items():
            norm = zimage_norm if zimage else lumina2
            assert model.get_submodule(norm).weight.shape == (size,)
            sd[f"{spelled(name)}.diff"] = torch.randn(size, generator=g, dtype=torch.float64) * 0.1
            expected[f"{norm}.weight"] = sd[f"{spelled(name)}.diff"]
        runtime = assert_norm_deltas_fold(
            model,
            sd,
            {n[1] if zimage else n[0] for n in LUMINA2_NORMS.values()},
            "lumina2-kohya" if kohya else "lumina2",
            pristine,
            expected,
        )

        before = {k: v.clone() for k, v in model.state_dict().items()}
        for key, message in (
            (f"{spelled('final_layer.norm_final')}.diff", r"no weight or bias in Lumina2"),
            (f"{spelled('norm_final')}.diff", r"holds but never uses"),
        ):
            hostile = dict(sd) | {key: torch.zeros(32, dtype=torch.float64)}
            with pytest.raises(lorahot.UnknownFormatError, match=rf"{message}.*strict=False"):
                runtime.load(hostile)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


#: the original modules outside the blocks -> diffusers' Lumina2 layers, as its checkpoint conversion
#: renames them (``x_embedder`` keeps its name)
LUMINA2_OUTSIDE = {
    "x_embedder": "x_embedder",
    "t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",
    "cap_embedder.1": "time_caption_embed.caption_embedder.1",
    "final_layer.linear": "norm_out.linear_2",
    "final_layer.adaLN_modulation.1": "norm_out.linear_1",
}


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize(
    "modules",
    [
        list(LUMINA2_OUTSIDE),
        ["t_embedder.mlp.0", "t_embedder.mlp.2"],
        ["final_layer.linear", "final_layer.adaLN_modulation.1"],
        ["cap_embedder.1"],
        ["layers.0.attention.out", "t_embedder.mlp.0", "final_layer.adaLN_modulation.1", "cap_embedder.1"],
        ["layers.0.feed_forward.w1", "t_embedder.mlp.0"],
        ["noise_refiner.0.adaLN_modulation.1", "final_layer.linear"],
    ],
    ids=["all", "t_embedder", "final_layer", "cap_embedder", "with-a-block", "with-a-feed-forward", "with-an-adaln"],
)
@pytest.mark.parametrize("naming", ["comfyui", "diffusers", "peft", "kohya"])
def test_a_lumina2_file_of_modules_outside_the_blocks_lands_as_diffusers_conversion_places_them(
    naming: str, modules: list[str], merged: bool
) -> None:
    """A file of Lumina2's original modules outside the blocks (no block key tells it apart in
    most of these cases) lands where diffusers' Lumina2 checkpoint conversion puts them, in every
    naming such a file reads as: against ``W + s * alpha / r * B @ A`` in float64 at scales 1 and
    0.6. Before, ``t_embedder.mlp.*``, ``cap_embedder.1`` and the final layer were refused as
    matching no injected layer (read as Flux's, SD3's or plain kohya names, whose targets Lumina2
    lacks). With a block key in the original names (``lumina2``/``lumina2-kohya``; diffusers' and
    PEFT's namings take diffusers' block names) the outer modules land alike; a block key of a
    feed-forward or adaLN module alone tells the original names apart as an attention one does
    (before, ``lumina2-kohya`` and ``lumina2`` asked for an attention key, a dotted file for an
    attention or feed-forward one, and such a file's block modules were refused). A file of
    ``t_embedder.mlp.*`` or ``final_layer.*`` alone, names SD3, DiT and Cosmos have too (in sd-scripts'
    spelling read as ``sd3-kohya`` or ``flux-kohya``), is no Lumina2 file: refused, the model bitwise
    unchanged (diffusers' Lumina2 loader loads none of them; ``test_parity_outside_names.py``)."""
    blocks = {
        "layers.0.attention.out": "layers.0.attn.to_out.0",
        "layers.0.feed_forward.w1": "layers.0.feed_forward.linear_1",
        "noise_refiner.0.adaLN_modulation.1": "noise_refiner.0.norm1.linear",
    }
    targets = LUMINA2_OUTSIDE | blocks | {v: v for v in blocks.values()}
    if naming in ("diffusers", "peft"):
        modules = [blocks.get(m, m) for m in modules]
    base = small_lumina2().double()
    g = torch.Generator().manual_seed(len(modules))
    sd, parts = {}, {}
    for i, module in enumerate(modules):
        layer = base.get_submodule(targets[module])
        r, alpha = 1 + i % 3, 0.5 + i
        down = torch.randn(r, layer.in_features, generator=g, dtype=torch.float64) * 0.3
        up = torch.randn(layer.out_features, r, generator=g, dtype=torch.float64) * 0.3
        stem = {
            "comfyui": f"diffusion_model.{module}",
            "diffusers": f"transformer.{module}",
            "peft": module,
            "kohya": "lora_unet_" + module.replace(".", "_"),
        }[naming]
        a, b = ("lora_down", "lora_up") if naming == "kohya" else ("lora_A", "lora_B")
        sd |= {f"{stem}.{a}.weight": down, f"{stem}.{b}.weight": up, f"{stem}.alpha": torch.tensor(alpha)}
        parts[targets[module]] = alpha / r * up @ down
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in lumina2_inputs().items()}
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, "all-linear", max_rank=4, merged=merged)
    if all(m.startswith(("t_embedder.", "final_layer.")) for m in modules):
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(lorahot.AdapterMismatchError, match=r"matches no injected layer"):
            runtime.load(sd)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
        return
    runtime.load(sd)
    for scale in (1.0, 0.6):
        runtime.set_scale(scale)
        reference = copy.deepcopy(base)
        with torch.no_grad():
            for name, delta in parts.items():
                reference.get_submodule(name).weight += scale * delta
            want = reference(**inputs, return_dict=False)[0]
            got = model(**inputs, return_dict=False)[0]
            moved = base(**inputs, return_dict=False)[0]
        assert not torch.allclose(want, moved, rtol=1e-6, atol=0)
        err = float((got - want).abs().max() / want.abs().max())
        assert err < 1e-12, f"{naming} {modules} at scale {scale}: relative error {err:.2e}"
