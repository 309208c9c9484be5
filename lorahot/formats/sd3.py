"""Stable Diffusion 3 / 3.5 namings: adapters trained on the original MMDiT module names, for a
diffusers-named ``SD3Transformer2DModel``.

- ``sd3-kohya``: sd-scripts' spelling (``lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight``,
  ``.alpha`` per module), with its text encoders' modules (``lora_te1_`` CLIP-L, ``lora_te2_``
  CLIP-G, ``lora_te3_`` T5) resolved as in the kohya naming.
- ``sd3``: the same names dotted, under ComfyUI's ``diffusion_model.`` or
  ``model.diffusion_model.``, under diffusers' component ``transformer.``, or with no prefix, as
  some trainers save them (``diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_A.weight``,
  or ``.lora_down``/``.lora_up``). Told apart by ``joint_blocks.N.x_block``/``context_block`` at
  the start of a key (after the prefix), names that only SD3's original model has (diffusers'
  are ``transformer_blocks.N.attn...``).

A file holding only the modules outside the blocks (``x_embedder.proj``, ``t_embedder.mlp.0``,
``final_layer.linear``, ...) is not told apart: DiT, PixArt and Hunyuan-DiT share those names, and
Flux, Lumina2 and Cosmos its ``final_layer``. It reads as ComfyUI's, diffusers' or PEFT's naming,
which take :data:`OUTSIDE_ALIASES` exactly (only a layer of exactly the diffusers name) and the final
adaLN's swap only in a file that is SD3's (:data:`FILE_ALIASES`: one of its keys is
``y_embedder.mlp.N``, the pooled-text embedder only SD3 has): no diffusers loader renames these names
(its SD3 loader converts nothing), and the targets are layers of other models too, whose loaders load
no such key (Flux's and HunyuanVideo's ``time_text_embed.timestep_embedder``, PixArt's, Hunyuan-DiT's
and AuraFlow's ``pos_embed.proj``), so a file of ``x_embedder.proj`` or ``t_embedder.mlp.N`` alone is
refused (``key_map=`` places it). In sd-scripts' spelling such a file reads as ``sd3-kohya``
(:data:`KOHYA_OUTSIDE`), which takes them alike, only in a file that is SD3's.

The original model fuses what diffusers keeps apart: a joint block's ``x_block.attn.qkv`` is
``attn.to_q``/``to_k``/``to_v``, its ``context_block.attn.qkv`` is ``attn.add_q_proj``/
``add_k_proj``/``add_v_proj``, and SD3.5's second attention ``x_block.attn2.qkv`` is
``attn2.to_q``/``to_k``/``to_v`` (:class:`~lorahot.formats.table.Split`, equal thirds). Two adaLN
projections are ``(shift, scale)`` in the original and ``(scale, shift)`` in diffusers (whose
checkpoint conversion swaps them): ``final_layer.adaLN_modulation.1`` (``norm_out.linear``) and
the last block's ``context_block.adaLN_modulation.1`` (``norm1_context.linear``), the only
context block that projects to 2 rows per input feature (the others project to 6: shift, scale
and gate of attention and MLP, in diffusers' order too). B's halves are swapped there
(:class:`~lorahot.formats.table.Reorder` with ``rows_per_input=2``) and nowhere else. Every other
module is an alias (``joint_blocks.0.x_block.mlp.fc1`` -> ``transformer_blocks.0.ff.net.0.proj``,
``x_embedder.proj`` -> the patch-embedding conv ``pos_embed.proj``).

A model in the original names takes the keys as they are. LyCORIS factors (LoHa, LoKr, Tucker
cores, full diffs and ``diff_b``, as sd-scripts' LyCORIS networks on SD3's ``SingleDiTBlock`` and
ComfyUI write them) load in merged mode: a fused or re-ordered module folds its rows of the whole
``ΔW`` (:func:`~lorahot.resolve.split.split_weight`). A ``dora_scale`` is refused, as in the Flux.1
namings.

The attention's query and key norms (SD3.5's ``x_block.attn.ln_q``, ``context_block.attn.ln_k``,
``x_block.attn2.ln_q``) are aliased as diffusers' SD3 conversion renames them (``attn.norm_q``,
``attn.norm_added_k``, ``attn2.norm_q``): the same norm over the head size (an RMSNorm with a
weight ``[head_dim]`` shared by the heads, or a LayerNorm with its bias, as ``qk_norm`` sets in
both), so a ``.diff`` / ``.diff_b`` (ComfyUI's LoRA extraction) folds into diffusers' norm in
merged mode, the norm among the targets. Refused by name (``strict=False`` skips them): deltas of
the norms without a weight (a block's ``norm1``/``norm2``, ``final_layer.norm_final``:
``elementwise_affine=False`` in both models; diffusers' ``norm2`` is such a norm too).
"""

from __future__ import annotations

import dataclasses
import re

from lorahot.formats import kohya
from lorahot.formats.flux import ADD_QKV, QKV, qkv_split
from lorahot.formats.table import COMPONENT_HEAD as _HEAD
from lorahot.formats.table import NAME_START as _START
from lorahot.formats.table import (
    ORIGINAL_HEAD,
    ORIGINAL_PREFIXES,
    REFUSED_DORA,
    REFUSED_MERGEABLE,
    FileAliases,
    KeyFormat,
    Reorder,
    Split,
    lora_rules,
    lycoris_rules,
)

__all__ = ["KOHYA", "KOHYA_OUTSIDE", "FORMAT", "SPLITS", "OUTSIDE_ALIASES", "FILE_ALIASES"]

#: joint-block module (after ``joint_blocks.N.``) -> diffusers' (after ``transformer_blocks.N.``)
_JOINT = {
    "x_block.attn.proj": "attn.to_out.0",
    "x_block.attn2.proj": "attn2.to_out.0",
    "x_block.mlp.fc1": "ff.net.0.proj",
    "x_block.mlp.fc2": "ff.net.2",
    "x_block.adaLN_modulation.1": "norm1.linear",
    "context_block.attn.proj": "attn.to_add_out",
    "context_block.mlp.fc1": "ff_context.net.0.proj",
    "context_block.mlp.fc2": "ff_context.net.2",
    # the attention's query/key norms (SD3.5: RMSNorm [head_dim]), as diffusers' conversion renames them
    "x_block.attn.ln_q": "attn.norm_q",
    "x_block.attn.ln_k": "attn.norm_k",
    "context_block.attn.ln_q": "attn.norm_added_q",
    "context_block.attn.ln_k": "attn.norm_added_k",
    "x_block.attn2.ln_q": "attn2.norm_q",
    "x_block.attn2.ln_k": "attn2.norm_k",
}
#: modules outside the blocks (``context_embedder`` has the same name in both)
_OUTSIDE = {
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "y_embedder.mlp.0": "time_text_embed.text_embedder.linear_1",
    "y_embedder.mlp.2": "time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
}

#: SD3's modules outside the blocks, as aliases: what its naming (:data:`FORMAT`, :data:`KOHYA`) takes
#: for them, and the namings that read a file of these alone (no block key tells it apart) take in a
#: file that is SD3's (:data:`FILE_ALIASES`)
OUTSIDE_ALIASES: tuple[tuple[str, str], ...] = tuple((rf"{_START}{re.escape(k)}$", v) for k, v in _OUTSIDE.items())

#: the final layer's adaLN projection: ``(shift, scale)`` in the original model, ``(scale, shift)`` in
#: diffusers' ``norm_out.linear``
_FINAL_ADALN = Reorder(_HEAD + r"final_layer\.adaLN_modulation\.1", r"\g<head>norm_out.linear", (1, 1), (1, 0))

#: the names only SD3's original model has, which mark a file of its names outside the blocks as
#: SD3's: the pooled-text embedder's ``y_embedder.mlp.0`` / ``.2`` (DiT's ``y_embedder`` is an
#: embedding table, PixArt's ``y_embedder.y_proj``) and a joint block's module; never
#: ``x_embedder.proj``, ``t_embedder.mlp.N`` or ``final_layer.*``, which DiT, PixArt, Hunyuan-DiT,
#: Lumina2, Cosmos and HiDream name alike
_OWN = r"(?:^|\.)(?:y_embedder\.mlp\.[02]$|joint_blocks\.\d+\.(?:x_block|context_block)\.)"

#: :data:`OUTSIDE_ALIASES` and the final adaLN's swap for the namings that read any model's names (PEFT's, diffusers',
#: ComfyUI's), taken only in a file one of whose module keys is a name only SD3 has (:data:`_OWN`):
#: no diffusers loader renames them (its SD3 loader converts nothing; its checkpoint conversion
#: places them, the reference of lorahot's SD3 namings), and on another model that has a target
#: (Flux's and HunyuanVideo's ``time_text_embed.timestep_embedder``, PixArt's and AuraFlow's
#: ``pos_embed.proj``) its loader loads no such key, so another model's ``t_embedder.mlp.0`` (Lumina2's,
#: DiT's) or ``x_embedder.proj`` is refused, not placed there
FILE_ALIASES = FileAliases("SD3", _OWN, OUTSIDE_ALIASES, (_FINAL_ADALN,))

#: the joint blocks' modules, one layer each
_BLOCK_ALIASES: tuple[tuple[str, str], ...] = tuple(
    (rf"{_START}joint_blocks\.(\d+)\.{re.escape(k)}$", rf"transformer_blocks.\1.{v}") for k, v in _JOINT.items()
)
_ALIASES: tuple[tuple[str, str], ...] = (*_BLOCK_ALIASES, *OUTSIDE_ALIASES)

_CONTEXT_ADALN = _HEAD + r"joint_blocks\.(?P<n>\d+)\.context_block\.adaLN_modulation\.1"
_NORM1_CONTEXT = r"\g<head>transformer_blocks.\g<n>.norm1_context.linear"

#: the fused and re-ordered modules of the original model's blocks, in its names
_BLOCK_SPLITS: tuple[Split | Reorder, ...] = (
    qkv_split(r"joint_blocks\.(?P<n>\d+)\.x_block\.attn\.qkv", "transformer_blocks", QKV),
    qkv_split(r"joint_blocks\.(?P<n>\d+)\.context_block\.attn\.qkv", "transformer_blocks", ADD_QKV),
    qkv_split(
        r"joint_blocks\.(?P<n>\d+)\.x_block\.attn2\.qkv",
        "transformer_blocks",
        ("attn2.to_q", "attn2.to_k", "attn2.to_v"),
    ),
    # the last block's pre-only context block: (shift, scale), 2 rows per input feature
    Reorder(_CONTEXT_ADALN, _NORM1_CONTEXT, (1, 1), (1, 0), rows_per_input=2),
    # every other block's: the same 6 chunks in both (not an alias, which would take the last one too)
    Reorder(_CONTEXT_ADALN, _NORM1_CONTEXT, (1,), (0,)),
)
#: the fused and re-ordered modules of the original model, in its names
SPLITS: tuple[Split | Reorder, ...] = (*_BLOCK_SPLITS, _FINAL_ADALN)

#: keys the SD3 namings refuse: deltas of the norms without a weight (in either spelling), a DoRA
#: magnitude (no test of these namings against an oracle reads one), and what every naming that
#: reads LyCORIS factors refuses
_REFUSED: tuple[tuple[str, str], ...] = (
    (
        r"(?:^|[._])(?:joint_blocks[._]\d+[._](?:x_block|context_block)[._]norm[12]|final_layer[._]norm_final)"
        r"\.(?:diff|diff_b)$",
        "a delta of a normalization layer that has no weight or bias in SD3 (a block's norm1/norm2, the final "
        "layer's norm_final: elementwise_affine=False, as in diffusers), so there is nothing to add it to; load "
        "with strict=False to skip it",
    ),
    REFUSED_DORA,
    *REFUSED_MERGEABLE,
)

#: sd-scripts' underscore names of the original modules -> the dotted ones (``lora_unet_`` kept:
#: ``prefix="lora_unet"`` selects them, and the resolver drops it)
_KOHYA_TO_DOTTED: tuple[tuple[str, str], ...] = (
    (
        r"^lora_unet_joint_blocks_(\d+)_(x_block|context_block)_(attn2?)_(qkv|proj)$",
        r"lora_unet_joint_blocks.\1.\2.\3.\4",
    ),
    (r"^lora_unet_joint_blocks_(\d+)_(x_block|context_block)_mlp_(fc1|fc2)$", r"lora_unet_joint_blocks.\1.\2.mlp.\3"),
    (
        r"^lora_unet_joint_blocks_(\d+)_(x_block|context_block)_(attn2?)_(ln_q|ln_k)$",
        r"lora_unet_joint_blocks.\1.\2.\3.\4",
    ),
    (
        r"^lora_unet_joint_blocks_(\d+)_(x_block|context_block)_adaLN_modulation_1$",
        r"lora_unet_joint_blocks.\1.\2.adaLN_modulation.1",
    ),
    (r"^lora_unet_(t|y)_embedder_mlp_(0|2)$", r"lora_unet_\1_embedder.mlp.\2"),
    (r"^lora_unet_x_embedder_proj$", "lora_unet_x_embedder.proj"),
    (r"^lora_unet_final_layer_linear$", "lora_unet_final_layer.linear"),
    (r"^lora_unet_final_layer_adaLN_modulation_1$", "lora_unet_final_layer.adaLN_modulation.1"),
)

#: the modules outside the blocks (and the final adaLN's swap) only in a file that is SD3's, as in
#: ComfyUI's, diffusers' and PEFT's namings (:data:`FILE_ALIASES`: a joint block's module, which every
#: file the marker detects has, or ``y_embedder``'s): sd-scripts writes ``lora_unet_t_embedder_mlp_0``
#: and ``lora_unet_final_layer_linear`` for Lumina2 too, and ``x_embedder_proj`` / ``t_embedder_mlp_N``
#: are DiT's names, so a file of those alone (:data:`KOHYA_OUTSIDE`) is no SD3 file: on Flux, whose
#: ``time_text_embed.timestep_embedder`` SD3's alias names, diffusers' loader refuses it, and on
#: Lumina2 it loads none of it
KOHYA = dataclasses.replace(
    kohya.spelling(
        "sd3-kohya",
        renames=_KOHYA_TO_DOTTED,
        aliases=_BLOCK_ALIASES,
        refuse=_REFUSED,
        marker=r"^lora_unet_joint_blocks_\d+_(?:x_block|context_block)_",
        splits=_BLOCK_SPLITS,
        lycoris=True,
        example="lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight",
    ),
    file_aliases=(FILE_ALIASES,),
)

#: ``sd3-kohya`` for a file whose modules all lie outside the blocks (``lora_unet_x_embedder_proj``,
#: ``lora_unet_t_embedder_mlp_0``, ...; :func:`lorahot.formats.kohya.outside`); one of the final
#: layer alone is Flux's (:data:`lorahot.formats.flux.KOHYA_OUTSIDE`, detected first), which places
#: it the same way; its modules are placed only in a file with ``lora_unet_y_embedder_mlp_N``
#: (:data:`FILE_ALIASES`), refused in any other
KOHYA_OUTSIDE = kohya.outside(
    KOHYA,
    r"lora_unet_(?:x_embedder_proj|[ty]_embedder_mlp_[02]|context_embedder|final_layer_(?:linear|adaLN_modulation_1))",
    example="lora_unet_x_embedder_proj.lora_down.weight",
)

FORMAT = KeyFormat(
    name="sd3",
    rules=(*lora_rules(), *lycoris_rules(r"(?P<module>.+)")),  # LyCORIS as in ComfyUI naming (merged mode)
    prefixes=ORIGINAL_PREFIXES,
    aliases=_ALIASES,
    refuse=_REFUSED,
    # joint_blocks.N.x_block / context_block are SD3's original names only; anchored, so that PEFT's
    # base_model.model. in front of them (an adapter of a model in the original names) stays PEFT's
    marker=ORIGINAL_HEAD + r"joint_blocks\.\d+\.(?:x_block|context_block)\.",
    splits=SPLITS,
    example="diffusion_model.joint_blocks.0.x_block.attn.qkv.lora_A.weight",
    # the one module of the original names that diffusers' names alike (Flux's too): beside a block key it
    # tells no file apart as ComfyUI's, diffusers' or PEFT's (a tie of the two refused the file as mixed)
    shared=r"^context_embedder$",
)
