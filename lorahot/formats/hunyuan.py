"""HunyuanVideo naming: adapters trained on the original HunyuanVideo module names
(``diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight``; ``transformer.`` or no prefix
also occur), for a diffusers-named ``HunyuanVideoTransformer3DModel``.

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
"""

from __future__ import annotations

import re

from lorahot.formats.flux import ADD_QKV, QKV, qkv_split
from lorahot.formats.table import COMPONENT_HEAD as _HEAD
from lorahot.formats.table import NAME_START as _START
from lorahot.formats.table import REFUSED, KeyFormat, Reorder, Split, lora_rules

__all__ = ["FORMAT", "SPLITS"]


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
}
#: single block module -> diffusers' (after ``single_transformer_blocks.N.``)
_SINGLE = {"linear2": "proj_out", "modulation.linear": "norm.linear"}
#: token-refiner block module (after ``txt_in.individual_token_refiner.blocks.N.``) -> diffusers'
#: (after ``context_embedder.token_refiner.refiner_blocks.N.``)
_REFINER = {
    "self_attn_proj": "attn.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm_out.linear",
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

#: module names only HunyuanVideo spells this way (Flux.1's are ``img_attn.qkv``, ``img_mlp.0``,
#: ``img_mod.lin``, ``modulation.lin``, ``time_in.in_layer``, and its ``txt_in`` is one linear)
_MARKER = (
    r"(?:^|\.)(?:double_blocks\.\d+\.(?:img|txt)_(?:attn_qkv|attn_proj|mod\.linear|mlp\.fc[12])"
    r"|single_blocks\.\d+\.modulation\.linear|txt_in\.(?:individual_token_refiner|input_embedder|t_embedder|c_embedder)\."
    r"|(?:time_in|guidance_in)\.mlp\.[02]\.|img_in\.proj\.)"
)

FORMAT = KeyFormat(
    name="hunyuan-video",
    rules=lora_rules(),
    prefixes=("diffusion_model.", "transformer."),
    aliases=_ALIASES,
    refuse=REFUSED,
    marker=_MARKER,
    splits=SPLITS,
    example="diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight",
)
