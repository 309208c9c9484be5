"""HunyuanVideo naming: adapters trained on the original HunyuanVideo module names
(``diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight``; ``model.diffusion_model.``,
``transformer.`` or no prefix also occur), for a diffusers-named ``HunyuanVideoTransformer3DModel``.

The original model fuses what diffusers keeps apart: ``img_attn_qkv`` is ``attn.to_q``/``to_k``/
``to_v``, ``txt_attn_qkv`` is ``attn.add_q_proj``/``add_k_proj``/``add_v_proj``, a token-refiner
block's ``self_attn_qkv`` is its ``attn.to_q``/``to_k``/``to_v``, and a single block's ``linear1``
is ``attn.to_q``, ``to_k``, ``to_v`` and ``proj_mlp`` (``D, D, D, 4 D`` rows). Module keys keep
the original names; on a diffusers-named model a fused module is
:class:`~lorahot.formats.table.Split` onto the separate layers, the final adaLN projection's
``(shift, scale)`` rows are swapped to diffusers' ``(scale, shift)``
(:class:`~lorahot.formats.table.Reorder`), and every other module is an alias
(``double_blocks.0.img_attn_proj`` -> ``transformer_blocks.0.attn.to_out.0``).

The names share their block structure with Flux.1's (``double_blocks``, ``single_blocks``), but
spell the modules apart (``img_attn_qkv``, ``img_mlp.fc1``, ``img_mod.linear``,
``modulation.linear``, ``txt_in.individual_token_refiner``, ``time_in.mlp``): the marker looks
for those, and this naming is detected before Flux's BFL one. A file of single blocks'
``linear1``/``linear2`` only is read as BFL's, which places them the same way.

``hunyuan-video-musubi`` is musubi-tuner's kohya spelling of the same names
(``lora_unet_double_blocks_0_img_mlp_fc1.lora_down.weight``, ``.alpha`` per module), which shares
its prefix and block names with Flux's kohya naming: module names only HunyuanVideo spells
(``img_mlp_fc1``, ``img_mod_linear``, ``modulation_linear``, the token refiner, ``time_in_mlp``)
tell it apart, and it is detected before ``flux-kohya``. The names the two models share
(``img_attn_qkv``, ``img_attn_proj``, ``linear1``, ``linear2``, ``final_layer_linear``,
``vector_in_in_layer``) mean the same layers in both, split the same way, so a file of those
only, read as ``flux-kohya``, places them as this naming would.

Both read LyCORIS factors (LoHa, LoKr, ...) as ComfyUI and kohya namings do (merged mode); one on
a fused module of a diffusers-named model is cut by the rows of its ``ΔW``, as a LoRA by B's rows.

The normalization layers with a weight are aliased as diffusers' HunyuanVideo conversion renames
them: the attention's query and key RMSNorms (``img_attn_q_norm`` -> ``attn.norm_q``,
``txt_attn_k_norm`` -> ``attn.norm_added_k``, a single block's ``q_norm`` -> ``attn.norm_q``: one
weight ``[head_dim]`` shared by the heads, computed in float32, in both) and a token-refiner
block's LayerNorms (``norm1``, ``norm2``, with a weight and a bias in both). Their ``.diff`` /
``.diff_b`` (ComfyUI's LoRA extraction) fold into those norms in merged mode, the norms among the
targets. Refused by name (``strict=False`` skips them): deltas of the norms without a weight
(``img_norm1``, ``txt_norm2``, ``pre_norm``, ``final_layer.norm_final``: ``elementwise_affine=False``
in both models), where there is nothing to add them to.
"""

from __future__ import annotations

import re

from lorahot.formats import kohya
from lorahot.formats.flux import ADD_QKV, QKV, qkv_split
from lorahot.formats.table import COMPONENT_HEAD as _HEAD
from lorahot.formats.table import NAME_START as _START
from lorahot.formats.table import (
    ORIGINAL_PREFIXES,
    REFUSED_MERGEABLE,
    KeyFormat,
    Reorder,
    Split,
    lora_rules,
    lycoris_rules,
)

__all__ = ["FORMAT", "MUSUBI", "SPLITS"]


#: double block module (after ``double_blocks.N.``) -> diffusers' (after ``transformer_blocks.N.``)
_DOUBLE = {
    "img_attn_proj": "attn.to_out.0",
    "txt_attn_proj": "attn.to_add_out",
    "img_mod.linear": "norm1.linear",
    "txt_mod.linear": "norm1_context.linear",
    "img_mlp.fc1": "ff.net.0.proj",
    "img_mlp.fc2": "ff.net.2",
    "txt_mlp.fc1": "ff_context.net.0.proj",
    "txt_mlp.fc2": "ff_context.net.2",
    # the attention's query/key RMSNorms (weight [head_dim]): diffusers' RMSNorm of the same shape
    "img_attn_q_norm": "attn.norm_q",
    "img_attn_k_norm": "attn.norm_k",
    "txt_attn_q_norm": "attn.norm_added_q",
    "txt_attn_k_norm": "attn.norm_added_k",
}
#: single block module -> diffusers' (after ``single_transformer_blocks.N.``)
_SINGLE = {"linear2": "proj_out", "modulation.linear": "norm.linear", "q_norm": "attn.norm_q", "k_norm": "attn.norm_k"}
#: token-refiner block module (after ``txt_in.individual_token_refiner.blocks.N.``) -> diffusers'
#: (after ``context_embedder.token_refiner.refiner_blocks.N.``)
_REFINER = {
    "self_attn_proj": "attn.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm_out.linear",
    "norm1": "norm1",  # LayerNorms with a weight and a bias, in both models
    "norm2": "norm2",
}
#: modules outside the blocks
_OUTSIDE = {
    "img_in.proj": "x_embedder.proj",
    "time_in.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "time_in.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.mlp.0": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.mlp.2": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "txt_in.input_embedder": "context_embedder.proj_in",
    "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
}

_ALIASES: tuple[tuple[str, str], ...] = (
    *((rf"{_START}double_blocks\.(\d+)\.{re.escape(k)}$", rf"transformer_blocks.\1.{v}") for k, v in _DOUBLE.items()),
    *(
        (rf"{_START}single_blocks\.(\d+)\.{re.escape(k)}$", rf"single_transformer_blocks.\1.{v}")
        for k, v in _SINGLE.items()
    ),
    *(
        (
            rf"{_START}txt_in\.individual_token_refiner\.blocks\.(\d+)\.{re.escape(k)}$",
            rf"context_embedder.token_refiner.refiner_blocks.\1.{v}",
        )
        for k, v in _REFINER.items()
    ),
    *((rf"{_START}{re.escape(k)}$", v) for k, v in _OUTSIDE.items()),
)


#: the fused modules of the original model, in its names
SPLITS: tuple[Split | Reorder, ...] = (
    qkv_split(r"double_blocks\.(?P<n>\d+)\.img_attn_qkv", "transformer_blocks", QKV),
    qkv_split(r"double_blocks\.(?P<n>\d+)\.txt_attn_qkv", "transformer_blocks", ADD_QKV),
    qkv_split(
        r"txt_in\.individual_token_refiner\.blocks\.(?P<n>\d+)\.self_attn_qkv",
        "context_embedder.token_refiner.refiner_blocks",
        QKV,
    ),
    Split(
        _HEAD + r"single_blocks\.(?P<n>\d+)\.linear1",
        (
            *((rf"\g<head>single_transformer_blocks.\g<n>.{n}", 1) for n in QKV),
            (r"\g<head>single_transformer_blocks.\g<n>.proj_mlp", 4),
        ),
    ),
    Reorder(_HEAD + r"final_layer\.adaLN_modulation\.1", r"\g<head>norm_out.linear", (1, 1), (1, 0)),
)

#: deltas of the norms without a weight, in either spelling
_WEIGHTLESS: tuple[tuple[str, str], ...] = (
    (
        r"(?:^|[._])(?:double_blocks[._]\d+[._](?:img|txt)_norm[12]|single_blocks[._]\d+[._]pre_norm"
        r"|final_layer[._]norm_final)\.(?:diff|diff_b)$",
        "a delta of a normalization layer that has no weight or bias in HunyuanVideo (a double block's img_norm1/2 "
        "and txt_norm1/2, a single block's pre_norm, the final layer's norm_final: elementwise_affine=False, as in "
        "diffusers), so there is nothing to add it to; load with strict=False to skip it",
    ),
)

#: module names only HunyuanVideo spells this way (Flux.1's are ``img_attn.qkv``, ``img_mlp.0``,
#: ``img_mod.lin``, ``modulation.lin``, ``time_in.in_layer``, and its ``txt_in`` is one linear)
_MARKER = (
    r"(?:^|\.)(?:double_blocks\.\d+\.(?:img|txt)_(?:attn_qkv|attn_proj|mod\.linear|mlp\.fc[12])"
    r"|single_blocks\.\d+\.modulation\.linear|txt_in\.(?:individual_token_refiner|input_embedder|t_embedder|c_embedder)\."
    r"|(?:time_in|guidance_in)\.mlp\.[02]\.|img_in\.proj\.)"
)

FORMAT = KeyFormat(
    name="hunyuan-video",
    rules=(*lora_rules(), *lycoris_rules(r"(?P<module>.+)")),  # LyCORIS as in ComfyUI naming (merged mode)
    prefixes=ORIGINAL_PREFIXES,
    aliases=_ALIASES,
    refuse=(*_WEIGHTLESS, *REFUSED_MERGEABLE),
    marker=_MARKER,
    splits=SPLITS,
    example="diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight",
)

#: musubi-tuner's underscore names of the original modules -> the dotted ones (``lora_unet_``
#: kept: ``prefix="lora_unet"`` selects them, and the resolver drops it)
_MUSUBI_TO_DOTTED: tuple[tuple[str, str], ...] = (
    (r"^lora_unet_double_blocks_(\d+)_(img|txt)_(attn_qkv|attn_proj)$", r"lora_unet_double_blocks.\1.\2_\3"),
    (r"^lora_unet_double_blocks_(\d+)_(img|txt)_mlp_(fc1|fc2)$", r"lora_unet_double_blocks.\1.\2_mlp.\3"),
    (r"^lora_unet_double_blocks_(\d+)_(img|txt)_mod_linear$", r"lora_unet_double_blocks.\1.\2_mod.linear"),
    (r"^lora_unet_double_blocks_(\d+)_(img|txt)_attn_(q|k)_norm$", r"lora_unet_double_blocks.\1.\2_attn_\3_norm"),
    (r"^lora_unet_single_blocks_(\d+)_(q|k)_norm$", r"lora_unet_single_blocks.\1.\2_norm"),
    (r"^lora_unet_single_blocks_(\d+)_(linear1|linear2)$", r"lora_unet_single_blocks.\1.\2"),
    (r"^lora_unet_single_blocks_(\d+)_modulation_linear$", r"lora_unet_single_blocks.\1.modulation.linear"),
    (
        r"^lora_unet_txt_in_individual_token_refiner_blocks_(\d+)_(self_attn_qkv|self_attn_proj)$",
        r"lora_unet_txt_in.individual_token_refiner.blocks.\1.\2",
    ),
    (
        r"^lora_unet_txt_in_individual_token_refiner_blocks_(\d+)_mlp_(fc1|fc2)$",
        r"lora_unet_txt_in.individual_token_refiner.blocks.\1.mlp.\2",
    ),
    (
        r"^lora_unet_txt_in_individual_token_refiner_blocks_(\d+)_adaLN_modulation_1$",
        r"lora_unet_txt_in.individual_token_refiner.blocks.\1.adaLN_modulation.1",
    ),
    (
        r"^lora_unet_txt_in_individual_token_refiner_blocks_(\d+)_(norm1|norm2)$",
        r"lora_unet_txt_in.individual_token_refiner.blocks.\1.\2",
    ),
    (r"^lora_unet_txt_in_input_embedder$", "lora_unet_txt_in.input_embedder"),
    (r"^lora_unet_txt_in_t_embedder_mlp_(0|2)$", r"lora_unet_txt_in.t_embedder.mlp.\1"),
    (r"^lora_unet_txt_in_c_embedder_linear_(1|2)$", r"lora_unet_txt_in.c_embedder.linear_\1"),
    (r"^lora_unet_(time|guidance)_in_mlp_(0|2)$", r"lora_unet_\1_in.mlp.\2"),
    (r"^lora_unet_vector_in_(in|out)_layer$", r"lora_unet_vector_in.\1_layer"),
    (r"^lora_unet_img_in_proj$", "lora_unet_img_in.proj"),
    (r"^lora_unet_final_layer_linear$", "lora_unet_final_layer.linear"),
    (r"^lora_unet_final_layer_adaLN_modulation_1$", "lora_unet_final_layer.adaLN_modulation.1"),
)

#: musubi module names only HunyuanVideo has (Flux's kohya ones are ``img_mlp_0``,
#: ``img_mod_lin``, ``modulation_lin``, ``time_in_in_layer``, ``txt_in``, ``img_in``)
_MUSUBI_MARKER = (
    r"^lora_unet_(?:double_blocks_\d+_(?:img|txt)_(?:mlp_fc[12]|mod_linear)\.|single_blocks_\d+_modulation_linear\."
    r"|txt_in_(?:individual_token_refiner|input_embedder|t_embedder|c_embedder)[._]"
    r"|(?:time_in|guidance_in)_mlp_[02]\.|img_in_proj\.)"
)

MUSUBI = kohya.spelling(
    "hunyuan-video-musubi",
    renames=_MUSUBI_TO_DOTTED,
    aliases=_ALIASES,
    refuse=(*_WEIGHTLESS, *REFUSED_MERGEABLE),
    marker=_MUSUBI_MARKER,
    splits=SPLITS,
    lycoris=True,
    example="lora_unet_double_blocks_0_img_mlp_fc1.lora_down.weight",
)
