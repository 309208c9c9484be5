"""lorahot against diffusers' own Lumina2 loader as the oracle: an adapter in the original
Lumina-Image 2.0 names (``diffusion_model.layers.0.attention.qkv.lora_A.weight``), whose fused
``attention.qkv`` lorahot splits onto a diffusers-named ``Lumina2Transformer2DModel``.

diffusers' conversion hard-codes the qkv split at the full model's width (``2304, 768, 768``) and
wants every module of every block it sees, so the model is full width (2304, 24 query and 8
key-value heads) but one block of each kind deep; ranks are small.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorahot

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
