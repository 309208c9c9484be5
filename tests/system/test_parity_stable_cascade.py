"""Stable Cascade's kohya naming (``lora_prior_unet_``, ``lora_prior_te_``) on diffusers' Stage C.

sd-scripts' Stable Cascade trainer writes ``lora_prior_unet_`` + its Stage C module names with
``_`` for ``.``, the names ComfyUI's Stage C has (its ``model_lora_keys_unet`` maps
``lora_prior_unet_<name>`` onto ``diffusion_model.<name>.weight``), and ``lora_prior_te_`` for the
CLIP text encoder. Those are the original checkpoint's names but for the attention, whose
``attention.attn.to_q``/``to_k``/``to_v``/``out_proj`` diffusers' checkpoint conversion
(``convert_stable_cascade_unet_single_file_to_diffusers``) renames ``attention.to_q``/.../
``attention.to_out.0``. diffusers has no loader for these files; the reference is ComfyUI's
update, ``W + alpha / r * up @ down`` on each named layer, in float64, on diffusers' layer of
that name after the conversion's renames.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from torch import nn

import lorahot

diffusers = pytest.importorskip("diffusers")


def _stage_c() -> nn.Module:
    torch.manual_seed(0)
    return diffusers.StableCascadeUNet(
        in_channels=4,
        out_channels=4,
        timestep_ratio_embedding_dim=8,
        patch_size=1,
        conditioning_dim=16,
        block_out_channels=(16, 16),
        num_attention_heads=(2, 2),
        down_num_layers_per_block=(1, 1),
        up_num_layers_per_block=(1, 1),
        down_blocks_repeat_mappers=(1, 1),
        up_blocks_repeat_mappers=(1, 1),
        block_types_per_layer=(("SDCascadeResBlock", "SDCascadeTimestepBlock", "SDCascadeAttnBlock"),) * 2,
        clip_text_in_channels=12,
        clip_text_pooled_in_channels=12,
        clip_image_in_channels=12,
        clip_seq=2,
        effnet_in_channels=None,
        pixel_mapper_in_channels=None,
        kernel_size=3,
        dropout=(0.0, 0.0),
        self_attn=True,
        timestep_conditioning_type=("sca",),
        switch_level=None,
    ).double()


def _comfyui_name(diffusers_name: str) -> str:
    """The Stage C module name in ComfyUI and sd-scripts (the original checkpoint's, its attention
    split): diffusers' conversion read backwards."""
    name = re.sub(r"\.attention\.(to_[qkv])$", r".attention.attn.\1", diffusers_name)
    return re.sub(r"\.attention\.to_out\.0$", ".attention.attn.out_proj", name)


def _file(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA on every Linear of ``model`` and its 1x1 ... convs but the grouped ``depthwise``, in
    sd-scripts' spelling, each with its own ``.alpha``; and diffusers' layer of each key."""
    g = torch.Generator().manual_seed(1)
    tensors: dict[str, torch.Tensor] = {}
    where: dict[str, str] = {}
    for i, (name, layer) in enumerate(model.named_modules()):
        if (isinstance(layer, nn.Conv2d) and layer.groups > 1) or not isinstance(layer, nn.Linear | nn.Conv2d):
            continue
        stem = "lora_prior_unet_" + _comfyui_name(name).replace(".", "_")
        inner = layer.weight.shape[1:]
        tensors[f"{stem}.lora_down.weight"] = torch.randn(2, *inner, generator=g, dtype=torch.float64)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(
            layer.weight.shape[0], 2, *(1,) * (layer.weight.ndim - 2), generator=g, dtype=torch.float64
        )
        tensors[f"{stem}.alpha"] = torch.tensor(float(1 + i % 3))
        where[stem] = name
    return tensors, where


def test_stable_cascade_kohya_file_lands_as_comfyui_applies_it() -> None:
    base = _stage_c()
    tensors, where = _file(base)
    assert any(k.endswith("_attention_attn_out_proj.lora_down.weight") for k in tensors)
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, sorted(set(where.values())), max_rank=4, merged=True)
    info = runtime.load(tensors)
    assert info.format == "kohya" and len(info.ranks) == len(where)
    layers = dict(model.named_modules())
    originals = dict(base.named_modules())
    for stem, name in where.items():
        down, up = tensors[f"{stem}.lora_down.weight"], tensors[f"{stem}.lora_up.weight"]
        alpha, w = float(tensors[f"{stem}.alpha"]), originals[name].weight
        want = w + alpha / 2 * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        torch.testing.assert_close(layers[name].weight, want, rtol=1e-12, atol=1e-12, msg=name)


def test_stable_cascade_kohya_file_unmerged_matches_merged() -> None:
    base = _stage_c()
    tensors, where = _file(base)
    targets = sorted(set(where.values()))
    merged, unmerged = copy.deepcopy(base), copy.deepcopy(base)
    lorahot.inject(merged, targets, max_rank=4, merged=True).load(tensors)
    lorahot.inject(unmerged, targets, max_rank=4).load(tensors)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    r = torch.rand(1, generator=g, dtype=torch.float64)
    clip = {
        "clip_text_pooled": torch.randn(1, 1, 12, generator=g, dtype=torch.float64),
        "clip_text": torch.randn(1, 3, 12, generator=g, dtype=torch.float64),
        "clip_img": torch.randn(1, 1, 12, generator=g, dtype=torch.float64),
    }
    with torch.no_grad():
        want, got, before = merged(x, r, **clip).sample, unmerged(x, r, **clip).sample, base(x, r, **clip).sample
    assert not torch.allclose(want, before)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_a_stable_cascade_text_encoder_key_is_kohyas() -> None:
    """``lora_prior_te_`` is sd-scripts' prefix of Stable Cascade's CLIP text encoder: read as
    kohya naming, routed to a pipeline's ``text_encoder`` (a prior pipeline's CLIP-G)."""
    from lorahot.resolve.components import route

    key = "lora_prior_te_text_model_encoder_layers_0_self_attn_q_proj"
    adapter = lorahot.read_adapter(
        {f"{key}.lora_down.weight": torch.randn(2, 8), f"{key}.lora_up.weight": torch.randn(8, 2)}
    )
    assert adapter.format == "kohya" and list(adapter.modules) == [key]
    assert route(key, ("prior", "text_encoder")) == ("text_encoder", "lora_prior_te_")
    assert route("lora_prior_unet_clf_1", ("prior", "text_encoder")) == ("prior", "lora_prior_unet_")
