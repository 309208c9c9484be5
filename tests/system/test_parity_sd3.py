"""lorahot against diffusers' own SD3 loader as the oracle, on a tiny diffusers
``SD3Transformer2DModel`` from config. SD3 LoRAs in the wild are diffusers-named
(``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``, as diffusers and most trainers
save them), which lorahot reads with its diffusers naming, joint-attention context projections
(``add_q_proj``, ``to_add_out``) included.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorahot

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
