"""lorahot against diffusers' own SD3 loader as the oracle, on a tiny diffusers
``SD3Transformer2DModel`` from config. SD3 LoRAs in the wild are diffusers-named
(``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, as diffusers and most trainers
save them), which lorahot reads with its diffusers naming, joint-attention context projections
(``add_q_proj``, ``to_add_out``) included.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorahot
from lorahot.errors import UnknownFormatError
from tests.diffusion_names import delta, layer_weights, lora_factors
from tests.helpers import assert_norm_deltas_fold

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

D = 16  # heads x head_dim


def tiny_sd3() -> torch.nn.Module:
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=D,
        caption_projection_dim=D,
        pooled_projection_dim=D,
        pos_embed_max_size=8,
    ).eval()


def sd3_inputs() -> dict:
    g = torch.Generator().manual_seed(1)
    return {
        "hidden_states": torch.randn(1, 4, 8, 8, generator=g),
        "encoder_hidden_states": torch.randn(1, 5, D, generator=g),
        "pooled_projections": torch.randn(1, D, generator=g),
        "timestep": torch.tensor([500.0]),
    }


def sd3_file(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """A diffusers-named LoRA on every attention projection and feed-forward of the blocks,
    at mixed ranks (alpha = rank: diffusers files without metadata)."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    names = [
        n
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.startswith("transformer_blocks.") and (".attn." in n or ".ff" in n)
    ]
    assert any("add_q_proj" in n for n in names) and any("to_add_out" in n for n in names)
    for i, name in enumerate(names):
        m = model.get_submodule(name)
        r = 2 + i % 3
        sd[f"transformer.{name}.lora_A.weight"] = torch.randn(r, m.in_features, generator=g) * 0.3
        sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, r, generator=g) * 0.3
    return sd


def test_sd3_diffusers_naming_matches_diffusers(tmp_path: Path) -> None:
    sd = sd3_file(tiny_sd3(), seed=3)
    path = tmp_path / "sd3_lora.safetensors"
    save_file(sd, str(path))
    with torch.no_grad():
        oracle = tiny_sd3()
        state = diffusers.StableDiffusion3Pipeline.lora_state_dict(dict(sd))
        oracle.load_lora_adapter(state[0] if isinstance(state, tuple) else state, prefix="transformer")
        expected = oracle(**sd3_inputs(), return_dict=False)[0]
        model = tiny_sd3()
        base = model(**sd3_inputs(), return_dict=False)[0]
        runtime = lorahot.inject(model, ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                         "add_v_proj", "to_add_out", "net.0.proj", "net.2"], max_rank=8)  # fmt: skip
        info = runtime.load(path)
        ours = model(**sd3_inputs(), return_dict=False)[0]
    assert info.format == "diffusers" and len(info.ranks) == len(sd) // 2
    assert not torch.allclose(expected, base, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)


# --- SD3 / SD3.5 LoRAs in the original MMDiT names (sd-scripts' kohya spelling, ComfyUI's) ---------------
#
# The oracle is diffusers' own checkpoint conversion of the original names
# (``convert_sd3_transformer_checkpoint_to_diffusers``): a fake original checkpoint (random base
# weights) converted and loaded into the model is the base; the same checkpoint with each module's
# ``alpha / r * B @ A`` added in the original names, converted, is the reference. lorahot loads the
# LoRA file onto the base model. The conversion splits the qkv projections and swaps the
# ``(shift, scale)`` halves of ``final_layer`` and of the last block's context adaLN.


def tiny_sd3_from(dual: bool) -> torch.nn.Module:
    """SD3 (``dual=False``) or SD3.5 (second attention in block 0, RMS query/key norms), 2 blocks."""
    extra = {"dual_attention_layers": (0,), "qk_norm": "rms_norm"} if dual else {}
    torch.manual_seed(0)
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=D,
        caption_projection_dim=D,
        pooled_projection_dim=D,
        pos_embed_max_size=8,
        **extra,
    ).eval()


def original_parts(dual: bool, layers: int = 2) -> dict[str, list[str]]:
    """Original parameter name -> the diffusers parameters its rows become (for shapes only: the
    values are converted by diffusers)."""
    out = {
        "x_embedder.proj": ["pos_embed.proj"],
        "t_embedder.mlp.0": ["time_text_embed.timestep_embedder.linear_1"],
        "t_embedder.mlp.2": ["time_text_embed.timestep_embedder.linear_2"],
        "y_embedder.mlp.0": ["time_text_embed.text_embedder.linear_1"],
        "y_embedder.mlp.2": ["time_text_embed.text_embedder.linear_2"],
        "context_embedder": ["context_embedder"],
        "final_layer.linear": ["proj_out"],
        "final_layer.adaLN_modulation.1": ["norm_out.linear"],
    }
    for i in range(layers):
        d, o = f"transformer_blocks.{i}.", f"joint_blocks.{i}."
        out |= {
            o + "x_block.attn.qkv": [d + f"attn.to_{p}" for p in "qkv"],
            o + "x_block.attn.proj": [d + "attn.to_out.0"],
            o + "x_block.mlp.fc1": [d + "ff.net.0.proj"],
            o + "x_block.mlp.fc2": [d + "ff.net.2"],
            o + "x_block.adaLN_modulation.1": [d + "norm1.linear"],
            o + "context_block.attn.qkv": [d + f"attn.add_{p}_proj" for p in "qkv"],
            o + "context_block.adaLN_modulation.1": [d + "norm1_context.linear"],
        }
        if i < layers - 1:  # the last context block is pre-only
            out |= {
                o + "context_block.attn.proj": [d + "attn.to_add_out"],
                o + "context_block.mlp.fc1": [d + "ff_context.net.0.proj"],
                o + "context_block.mlp.fc2": [d + "ff_context.net.2"],
            }
        if dual and i == 0:
            out |= {
                o + "x_block.attn2.qkv": [d + f"attn2.to_{p}" for p in "qkv"],
                o + "x_block.attn2.proj": [d + "attn2.to_out.0"],
            }
    return out


def original_base(model: torch.nn.Module, parts: dict[str, list[str]], dual: bool) -> dict[str, torch.Tensor]:
    """A random float64 checkpoint in the original names, shaped to ``model``."""
    g = torch.Generator().manual_seed(5)
    sd = model.state_dict()
    base = {"pos_embed": torch.randn(sd["pos_embed.pos_embed"].shape, generator=g, dtype=torch.float64)}
    for name, targets in parts.items():
        for what in ("weight", "bias"):
            shape = list(sd[f"{targets[0]}.{what}"].shape)
            shape[0] = sum(sd[f"{t}.{what}"].shape[0] for t in targets)
            base[f"{name}.{what}"] = torch.randn(shape, generator=g, dtype=torch.float64) * 0.3
    for i in range(2):
        attn2 = (("x_block", "attn2"),) if dual and i == 0 else ()
        for block, attn in (("x_block", "attn"), ("context_block", "attn"), *attn2):
            for norm in ("ln_q", "ln_k") if dual else ():
                base[f"joint_blocks.{i}.{block}.{attn}.{norm}.weight"] = 1 + torch.rand(
                    8, generator=g, dtype=torch.float64
                )
    return base


def lora_file(factors: dict[str, tuple], naming: str, head: str = "diffusion_model.") -> dict[str, torch.Tensor]:
    """The LoRA in sd-scripts' spelling (``naming="sd3-kohya"``) or dotted under ``head``."""
    sd = {}
    for name, (a, b, alpha) in factors.items():
        module = "lora_unet_" + name.replace(".", "_") if naming == "sd3-kohya" else f"{head}{name}"
        sd |= {f"{module}.lora_down.weight": a, f"{module}.lora_up.weight": b, f"{module}.alpha": torch.tensor(alpha)}
    return sd


def converted(checkpoint: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    return convert_sd3_transformer_checkpoint_to_diffusers(dict(checkpoint))


@pytest.mark.parametrize(
    ("naming", "head"),
    [
        ("sd3-kohya", ""),
        ("sd3", "diffusion_model."),
        ("sd3", "model.diffusion_model."),
        ("sd3", "transformer."),
        ("sd3", ""),
    ],
    ids=["sd3-kohya", "sd3", "sd3-model-diffusion-model", "sd3-transformer", "sd3-no-prefix"],
)
@pytest.mark.parametrize("dual", [False, True], ids=["sd3", "sd3.5"])
def test_sd3_original_names_match_diffusers_checkpoint_conversion(naming: str, head: str, dual: bool) -> None:
    """Every module of SD3 / SD3.5 (qkv splits, the last block's context adaLN and the final
    adaLN swapped, the patch conv, the embedders), each with its own rank and alpha, in
    sd-scripts' spelling or dotted under ComfyUI's prefixes, diffusers' ``transformer.`` or none:
    each layer's float64 weight equals the one diffusers' conversion makes of the original weight
    plus the LoRA's update, and the outputs agree."""
    parts = original_parts(dual)
    model = tiny_sd3_from(dual).double()
    base = original_base(model, parts, dual)
    factors = lora_factors(base, parts, seed=7)
    updated = dict(base)
    for name, (a, b, alpha) in factors.items():
        updated[f"{name}.weight"] = base[f"{name}.weight"] + delta(a, b, alpha)
    oracle = tiny_sd3_from(dual).double()
    oracle.load_state_dict(converted(updated), strict=True)
    model.load_state_dict(converted(base), strict=True)
    names = sorted({t for targets in parts.values() for t in targets})
    runtime = lorahot.inject(model, names, max_rank=8)
    info = runtime.load(lora_file(factors, naming, head))
    assert info.format == naming
    ours, theirs = layer_weights(model, names), layer_weights(oracle, names)
    for name in names:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-12, atol=1e-12, msg=name)
    inputs = {k: v.double() for k, v in sd3_inputs().items()}
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs, return_dict=False)[0], oracle(**inputs, return_dict=False)[0])


def _nested(path: str) -> torch.nn.Module:
    """A module holding one ``Linear(8, 8)`` at the dotted ``path`` (a text encoder's layer)."""
    module: torch.nn.Module = torch.nn.Linear(8, 8)
    for part in reversed(path.split(".")):
        module = torch.nn.ModuleList([module]) if part.isdigit() else torch.nn.ModuleDict({part: module})
    return module


#: component -> (its layer's path, sd-scripts' name of it)
TEXT_ENCODERS = {
    "text_encoder": (
        "text_model.encoder.layers.0.self_attn.q_proj",
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
    ),
    "text_encoder_3": ("encoder.block.0.layer.0.SelfAttention.q", "lora_te3_encoder_block_0_layer_0_SelfAttention_q"),
}


def test_sd3_kohya_text_encoder_modules_go_to_their_text_encoders() -> None:
    """``lora_te1_`` (CLIP-L) and ``lora_te3_`` (T5) modules of an sd-scripts SD3 file land on
    the pipeline's ``text_encoder`` and ``text_encoder_3``, as in the kohya naming; the
    transformer's modules (the patch conv left out: not injected here) as above."""
    parts = {k: v for k, v in original_parts(dual=False).items() if k != "x_embedder.proj"}
    model = tiny_sd3_from(dual=False)
    sd_model = model.state_dict()
    shapes = {
        f"{n}.weight": torch.zeros(
            sum(sd_model[f"{t}.weight"].shape[0] for t in ts), *sd_model[f"{ts[0]}.weight"].shape[1:]
        )
        for n, ts in parts.items()
    }
    factors = {k: (a.float(), b.float(), alpha) for k, (a, b, alpha) in lora_factors(shapes, parts, seed=8).items()}
    encoders = {component: _nested(path) for component, (path, _) in TEXT_ENCODERS.items()}
    g = torch.Generator().manual_seed(9)
    te = {}
    for _, name in TEXT_ENCODERS.values():
        te |= {
            f"{name}.lora_down.weight": torch.randn(2, 8, generator=g),
            f"{name}.lora_up.weight": torch.randn(8, 2, generator=g),
        }
    runtime = lorahot.inject(
        {"transformer": model, **encoders},
        {"transformer": "all-linear", "text_encoder": ["q_proj"], "text_encoder_3": ["q"]},
        max_rank=8,
    )
    info = runtime.load(lora_file(factors, "sd3-kohya") | te)
    assert info.format == "sd3-kohya"
    assert info.components["text_encoder"] == 1 and info.components["text_encoder_3"] == 1
    assert info.components["transformer"] > len(parts)  # the qkv modules were split
    x = torch.randn(3, 8, generator=g)
    with torch.no_grad():
        for component, (path, name) in TEXT_ENCODERS.items():
            layer = encoders[component].get_submodule(path)
            update = te[f"{name}.lora_up.weight"] @ te[f"{name}.lora_down.weight"]
            torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ update.T)


def lycoris_file(base: dict[str, torch.Tensor], parts: dict[str, list[str]], naming: str, head: str) -> tuple:
    """LyCORIS modules (``lycoris-lora``'s own, random factors) on every original module, the
    kinds in turn (LoHa, LoKr with low-rank factors, LoKr with whole ones, a full diff with a
    ``diff_b``): the file in sd-scripts' spelling or dotted under ``head``, and each module's
    ``(ΔW, Δbias)`` as LyCORIS computes them (``get_weight`` times its ``scalar``)."""
    from lycoris.modules import LohaModule, LokrModule

    g = torch.Generator().manual_seed(9)
    sd, deltas = {}, {}
    for i, name in enumerate(parts):
        w = base[f"{name}.weight"]
        module = "lora_unet_" + name.replace(".", "_") if naming == "sd3-kohya" else f"{head}{name}"
        kind = i % 4
        if kind == 3:
            diff, diff_b = (
                torch.randn(t.shape, generator=g, dtype=torch.float64) * 0.1 for t in (w, base[f"{name}.bias"])
            )
            sd |= {f"{module}.diff": diff, f"{module}.diff_b": diff_b}
            deltas[name] = (diff, diff_b)
            continue
        if w.ndim == 4:
            layer: torch.nn.Module = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], stride=w.shape[2:])
        else:
            layer = torch.nn.Linear(w.shape[1], w.shape[0])
        if kind == 0:
            lycoris_module = LohaModule(module, layer, 1.0, lora_dim=2, alpha=3.0)
        else:  # low-rank w1 and w2, or both whole
            lycoris_module = LokrModule(
                module, layer, 1.0, lora_dim=2 if kind == 1 else 64, alpha=5.0, factor=4, decompose_both=kind == 1
            )
        lycoris_module = lycoris_module.double()
        with torch.no_grad():
            for param in lycoris_module.parameters():
                param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype) * 0.3)
            update = lycoris_module.get_weight(lycoris_module.shape) * lycoris_module.scalar
        sd |= {f"{module}.{k}": v.detach().clone() for k, v in lycoris_module.custom_state_dict().items()}
        deltas[name] = (update.detach().reshape(w.shape), None)
    return sd, deltas


@pytest.mark.parametrize(("naming", "head"), [("sd3-kohya", ""), ("sd3", "diffusion_model."), ("sd3", "")])
def test_sd3_namings_merge_lycoris_factors_as_lycoris_computes(naming: str, head: str) -> None:
    """SD3.5 files of LyCORIS modules on every original module (the fused qkvs, the swapped
    adaLNs, the patch conv): loaded in merged mode, each layer's float64 weight and bias equal
    what diffusers' checkpoint conversion makes of the original weights plus LyCORIS' ``ΔW``
    (``lycoris-lora``'s ``get_weight``) and ``diff_b``, and the outputs agree. They were refused
    ('LyCORIS ... not read in the SD3 namings'). An unmerged runtime refuses them, saying
    merged=True, and a ``dora_scale`` is refused naming it, both changing nothing."""
    pytest.importorskip("lycoris")
    parts = original_parts(dual=True)
    model = tiny_sd3_from(True).double()
    base = original_base(model, parts, True)
    sd, deltas = lycoris_file(base, parts, naming, head)
    updated = dict(base)
    for name, (update, bias) in deltas.items():
        updated[f"{name}.weight"] = base[f"{name}.weight"] + update
        if bias is not None:
            updated[f"{name}.bias"] = base[f"{name}.bias"] + bias
    oracle = tiny_sd3_from(True).double()
    oracle.load_state_dict(converted(updated), strict=True)
    model.load_state_dict(converted(base), strict=True)
    names = sorted({t for targets in parts.values() for t in targets})
    inputs = {k: v.double() for k, v in sd3_inputs().items()}
    with torch.no_grad():
        before = model(**inputs, return_dict=False)[0]

    unmerged = lorahot.inject(tiny_sd3_from(True).double(), names, max_rank=8)
    with pytest.raises(lorahot.AdapterMismatchError, match=r"loads only in merged mode[\s\S]*merged=True"):
        unmerged.load(dict(sd))
    runtime = lorahot.inject(model, names, max_rank=8, merged=True)
    qkv = (
        "lora_unet_joint_blocks_0_x_block_attn_qkv"
        if naming == "sd3-kohya"
        else f"{head}joint_blocks.0.x_block.attn.qkv"
    )
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnknownFormatError, match=rf"{re.escape(qkv)}\.dora_scale: DoRA magnitude"):
        runtime.load({**sd, f"{qkv}.dora_scale": torch.ones(3 * D, 1, dtype=torch.float64)})
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())

    info = runtime.load(dict(sd))
    assert info.format == naming
    ours, theirs = layer_weights(model, names), layer_weights(oracle, names)
    for name in names:
        torch.testing.assert_close(ours[name], theirs[name], rtol=1e-12, atol=1e-12, msg=name)
    with torch.no_grad():
        out = model(**inputs, return_dict=False)[0]
        torch.testing.assert_close(out, oracle(**inputs, return_dict=False)[0])
        assert not torch.allclose(out, before)


#: SD3.5's query/key norms (RMSNorm [head_dim]) -> diffusers', as diffusers' SD3 conversion renames them
SD3_NORMS = {
    "joint_blocks.0.x_block.attn.ln_q": "transformer_blocks.0.attn.norm_q",
    "joint_blocks.0.x_block.attn.ln_k": "transformer_blocks.0.attn.norm_k",
    "joint_blocks.0.context_block.attn.ln_q": "transformer_blocks.0.attn.norm_added_q",
    "joint_blocks.0.context_block.attn.ln_k": "transformer_blocks.0.attn.norm_added_k",
    "joint_blocks.0.x_block.attn2.ln_q": "transformer_blocks.0.attn2.norm_q",
    "joint_blocks.0.x_block.attn2.ln_k": "transformer_blocks.0.attn2.norm_k",
    "joint_blocks.1.context_block.attn.ln_k": "transformer_blocks.1.attn.norm_added_k",
}


@pytest.mark.parametrize(("naming", "head"), [("sd3-kohya", ""), ("sd3", "diffusion_model.")], ids=["kohya", "sd3"])
def test_sd3_query_key_norm_deltas_fold_into_diffusers_norms_in_merged_mode(naming: str, head: str) -> None:
    """A ``.diff`` of SD3.5's query/key norms (``x_block.attn.ln_q``, as ComfyUI's LoRA extraction
    writes one for every norm with a weight) matched no injected layer, with a hint to inject a norm
    the key could never reach. Now the norms are aliased as diffusers' conversion renames them
    (``attn.norm_q``, ``attn.norm_added_k``, ``attn2.norm_q``), ``plan_targets`` lists them and the
    file folds: float64 ``W + s alpha / r B A`` and ``w + s diff`` at scales 1 and 0.5. The deltas
    of the weightless norms (a block's ``norm1``/``norm2``, ``final_layer.norm_final``) are refused
    by name, nothing changed."""
    g = torch.Generator().manual_seed(60)
    with torch.no_grad():
        model = tiny_sd3_from(dual=True).double()
        pristine = {k: v.clone() for k, v in model.state_dict().items()}
        a = torch.randn(2, D, generator=g, dtype=torch.float64) * 0.3
        b = torch.randn(D, 2, generator=g, dtype=torch.float64) * 0.3
        sd = lora_file({"joint_blocks.0.x_block.attn.proj": (a, b, 3.0)}, naming, head)
        expected = {"transformer_blocks.0.attn.to_out.0.weight": 1.5 * b @ a}
        diffs = {name: torch.randn(D // 2, generator=g, dtype=torch.float64) * 0.1 for name in SD3_NORMS}
        for name, norm in SD3_NORMS.items():
            assert model.get_submodule(norm).weight.shape == (D // 2,)
            module = "lora_unet_" + name.replace(".", "_") if naming == "sd3-kohya" else f"{head}{name}"
            sd[f"{module}.diff"] = diffs[name]
            expected[f"{norm}.weight"] = diffs[name]
        runtime = assert_norm_deltas_fold(model, sd, SD3_NORMS.values(), naming, pristine, expected)

        before = {k: v.clone() for k, v in model.state_dict().items()}
        for weightless in (
            "joint_blocks.0.x_block.norm1",
            "joint_blocks.0.x_block.norm2",
            "joint_blocks.1.context_block.norm1",
            "final_layer.norm_final",
        ):
            module = "lora_unet_" + weightless.replace(".", "_") if naming == "sd3-kohya" else f"{head}{weightless}"
            for suffix in ("diff", "diff_b"):
                hostile = dict(sd) | {f"{module}.{suffix}": torch.zeros(D, dtype=torch.float64)}
                with pytest.raises(UnknownFormatError, match=rf"{suffix}: a delta of a .*no weight or bias in SD3"):
                    runtime.load(hostile)
        assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


#: SD3's modules outside the blocks, in its original names
OUTSIDE = (
    "x_embedder.proj",
    "t_embedder.mlp.0",
    "t_embedder.mlp.2",
    "y_embedder.mlp.0",
    "y_embedder.mlp.2",
    "context_embedder",
    "final_layer.linear",
    "final_layer.adaLN_modulation.1",
)


def _outside_factors() -> tuple[dict, dict, dict]:
    """SD3's original parts, a random original checkpoint, and LoRA factors of the modules
    outside the blocks."""
    every = original_parts(dual=False)
    parts = {k: every[k] for k in OUTSIDE}
    base = original_base(tiny_sd3_from(dual=False).double(), every, dual=False)
    return parts, base, lora_factors(base, parts, seed=11)


def _assert_outside_lands(sd: dict[str, torch.Tensor], merged: bool) -> None:
    """``sd``, a file of :func:`_outside_factors`, loaded on diffusers' SD3: every layer's float64
    weight equals diffusers' conversion of ``W + s * alpha / r * B @ A`` (the final adaLN's halves
    swapped by the conversion), at scales 1 and 0.6, and so do the outputs."""
    parts, base, factors = _outside_factors()
    model = tiny_sd3_from(dual=False).double()
    model.load_state_dict(converted(base), strict=True)
    names = sorted({t for targets in parts.values() for t in targets})
    runtime = lorahot.inject(model, names, max_rank=8, merged=merged)
    runtime.load(sd)
    inputs = {k: v.double() for k, v in sd3_inputs().items()}
    for s in (1.0, 0.6):
        updated = dict(base)
        for name, (a, b, alpha) in factors.items():
            updated[f"{name}.weight"] = base[f"{name}.weight"] + s * delta(a, b, alpha)
        oracle = tiny_sd3_from(dual=False).double()
        oracle.load_state_dict(converted(updated), strict=True)
        runtime.set_scale(s)
        ours, theirs = layer_weights(model, names), layer_weights(oracle, names)
        for name in names:
            torch.testing.assert_close(ours[name], theirs[name], rtol=1e-12, atol=1e-12, msg=f"{name} at {s}")
        with torch.no_grad():
            torch.testing.assert_close(model(**inputs, return_dict=False)[0], oracle(**inputs, return_dict=False)[0])


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
@pytest.mark.parametrize("head", ["diffusion_model.", "transformer.", ""], ids=["comfyui", "transformer", "bare"])
@pytest.mark.parametrize("spelling", [("lora_A", "lora_B"), ("lora_down", "lora_up")], ids=["lora_A", "lora_down"])
def test_an_sd3_file_of_modules_outside_the_blocks_only_lands_as_with_a_block_key(
    spelling: tuple[str, str], head: str, merged: bool
) -> None:
    """An SD3 file whose modules are all outside the blocks (the patch conv, the timestep and
    pooled-text embedders, the context embedder, the final layer) has no ``joint_blocks.N.`` key
    to tell SD3 apart: it reads as ComfyUI's, diffusers' or PEFT's naming, where
    ``x_embedder.proj``, ``t_embedder.*`` and ``y_embedder.*`` were no layer of diffusers' model
    (refused). Each module now lands where diffusers' checkpoint conversion puts it."""
    sd = {}
    for name, (a, b, alpha) in _outside_factors()[2].items():
        sd |= {
            f"{head}{name}.{spelling[0]}.weight": a,
            f"{head}{name}.{spelling[1]}.weight": b,
            f"{head}{name}.alpha": torch.tensor(alpha),
        }
    _assert_outside_lands(sd, merged)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_an_sd3_kohya_file_of_modules_outside_the_blocks_only_lands_as_with_a_block_key(merged: bool) -> None:
    """The same file in sd-scripts' spelling (``lora_unet_x_embedder_proj``, ...: no
    ``lora_unet_joint_blocks_N_`` key for the sd3-kohya marker) read as kohya naming, whose
    underscore names are no layer of diffusers' SD3 (refused). It now reads as sd3-kohya, each
    module where diffusers' checkpoint conversion puts it, with its ``.alpha``."""
    sd = lora_file(_outside_factors()[2], "sd3-kohya")
    assert lorahot.read_adapter(sd).format == "sd3-kohya"
    _assert_outside_lands(sd, merged)


def test_onetrainer_clip_text_projections_land_on_the_encoders_projections() -> None:
    """OneTrainer's SD3 files adapt the CLIP encoders' ``text_projection`` as
    ``lora_te1_text_projection`` (CLIP-L) and ``lora_te2_text_projection`` (CLIP-G), beside
    ``lora_transformer_`` modules; ComfyUI maps them to ``clip_l``'s and ``clip_g``'s
    ``text_projection``. On an SD3 pipeline runtime they land on ``text_encoder.text_projection``
    and ``text_encoder_2.text_projection`` (each a ``CLIPTextModelWithProjection``): float64
    ``W + alpha / r * up @ down``, as ComfyUI adds it; the transformer's module beside them."""
    from tests.diffusion_names import weights
    from tests.helpers import tiny_clip

    def clip(seed: int) -> torch.nn.Module:
        torch.manual_seed(seed)
        return tiny_clip(with_projection=True).double()

    components = {"transformer": tiny_sd3().double(), "text_encoder": clip(1), "text_encoder_2": clip(2)}
    layers = {
        "lora_transformer_transformer_blocks_0_attn_to_q": "transformer.transformer_blocks.0.attn.to_q",
        "lora_te1_text_projection": "text_encoder.text_projection",
        "lora_te2_text_projection": "text_encoder_2.text_projection",
    }
    g = torch.Generator().manual_seed(70)
    sd, expected = {}, {}
    for i, (key, path) in enumerate(layers.items()):
        component, _, name = path.partition(".")
        layer = components[component].get_submodule(name)
        down = torch.randn(2, layer.in_features, generator=g, dtype=torch.float64)
        up = torch.randn(layer.out_features, 2, generator=g, dtype=torch.float64)
        alpha = 3.0 + i
        sd |= {f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up, f"{key}.alpha": torch.tensor(alpha)}
        expected[path] = layer.weight.detach() + alpha / 2 * up @ down
    info = lorahot.inject(components, "all-linear", max_rank=8).load(sd)
    assert info.ranks == dict.fromkeys(layers.values(), 2)
    for path, weight in expected.items():
        component, _, name = path.partition(".")
        probed = weights(components[component], [name])[name]
        torch.testing.assert_close((probed[:-1] - probed[-1]).T, weight, rtol=1e-12, atol=1e-12, msg=path)
