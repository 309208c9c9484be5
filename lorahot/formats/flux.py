"""Flux.1 namings: adapters trained on Black Forest Labs' original module names, for a
diffusers-named ``FluxTransformer2DModel``.

The original model fuses what diffusers keeps apart: ``img_attn.qkv`` is ``to_q``/``to_k``/
``to_v``, ``txt_attn.qkv`` is ``add_q_proj``/``add_k_proj``/``add_v_proj``, and a single
block's ``linear1`` is ``to_q``, ``to_k``, ``to_v`` and ``proj_mlp`` (``D, D, D, 4 D`` rows).
Module keys keep the original names (a model with those names takes them as they are). On a
diffusers-named model, a fused module is :class:`~lorahot.formats.table.Split` onto the separate
layers, the final adaLN projection's ``(shift, scale)`` rows are swapped to diffusers'
``(scale, shift)`` (:class:`~lorahot.formats.table.Reorder`), and every other module is an
alias (``double_blocks.0.img_attn.proj`` -> ``transformer_blocks.0.attn.to_out.0``).

The namings, each a table sharing that map:

- ``flux-kohya`` (sd-scripts): ``lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight``,
  ``lora_unet_single_blocks_0_linear1``, with ``.alpha`` (scale ``alpha / r``); text-encoder
  modules (``lora_te1_...``) resolve as in the kohya naming.
- ``flux-bfl`` (BFL / ComfyUI): ``diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight``,
  or ``.lora_down``/``.lora_up``; ``.alpha`` if present.
- ``flux-xlabs``: ``double_blocks.0.processor.qkv_lora1.down.weight`` (``qkv_lora2``: the text
  stream, ``proj_lora1/2``: the output projections); no alpha (scale 1).
- ``flux-fal`` (fal's Kontext trainer, PEFT-saved): ``base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight``;
  no alpha (scale 1).

``flux-kohya``, ``flux-bfl`` and ``flux-fal`` also read LyCORIS factors (LoHa, LoKr, ...) and
diffs, as ComfyUI naming does: merged mode. ai-toolkit's Flux.2 LoKr files
(``diffusion_model.double_blocks.0.img_attn.qkv.lokr_w1``) are such; a fused module's ``ΔW`` is
split by its rows as a LoRA's B is (:func:`lorahot.resolve.split.split_weight`), which is what
diffusers computes by fusing the model's projections before loading them. The attention's
query and key norms (``img_attn.norm.query_norm``, ``txt_attn.norm.key_norm``, a single block's
``norm.query_norm``; with their parameter's name, ``.scale``, as ComfyUI names them:
``...query_norm.scale.diff``) are aliased as diffusers' Flux conversions rename them
(``attn.norm_q``, ``attn.norm_added_k``, a single block's ``attn.norm_q``): both an RMSNorm over
the head size, computed in float32 and scaled by one weight ``[head_dim]`` shared by every head,
so a ``.diff`` folds into diffusers' norm in merged mode, the norm among the targets. Refused by
name: deltas of the norms without a weight (``img_norm1``, ``txt_norm2``, ``pre_norm``,
``norm_final``, ...: ``elementwise_affine=False`` in both models), and a ``dora_scale``
(``strict=False`` skips them, a ``dora_scale`` with its module); ``flux-xlabs`` reads LoRA
weights only.
"""

from __future__ import annotations

import dataclasses
import re

from lorahot.formats import kohya
from lorahot.formats.table import (
    COMFYUI_TEXT_ENCODERS,
    ORIGINAL_PREFIXES,
    REFUSED,
    REFUSED_DORA,
    REFUSED_MERGEABLE,
    FileAliases,
    KeyFormat,
    Reorder,
    Rule,
    Split,
    lora_rules,
    lycoris_rules,
)
from lorahot.formats.table import COMPONENT_HEAD as _HEAD
from lorahot.formats.table import NAME_START as _START

__all__ = [
    "KOHYA",
    "KOHYA_OUTSIDE",
    "BFL",
    "XLABS",
    "FAL",
    "ALIASES",
    "FILE_ALIASES",
    "FLUX2_LAYERS",
    "ON_FLUX2",
    "SPLITS",
    "FINAL_ADALN",
    "BLOCK_SPLITS",
    "QKV",
    "ADD_QKV",
    "qkv_split",
]

#: double block module (after ``double_blocks.N.``) -> diffusers' (after ``transformer_blocks.N.``)
_DOUBLE = {
    "img_attn.proj": "attn.to_out.0",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "img_mod.lin": "norm1.linear",
    "txt_attn.proj": "attn.to_add_out",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
    "txt_mod.lin": "norm1_context.linear",
}
#: single block module -> diffusers' (after ``single_transformer_blocks.N.``)
_SINGLE = {"linear2": "proj_out", "modulation.lin": "norm.linear"}
#: modules outside the blocks
_OUTSIDE = {
    "img_in": "x_embedder",
    "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out",
}
#: the attention's query/key RMSNorms of a double block -> diffusers' (Flux.1 and Flux.2 alike)
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm": "attn.norm_q",
    "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q",
    "txt_attn.norm.key_norm": "attn.norm_added_k",
}
#: those of a single block -> diffusers'
_SINGLE_NORMS = {"norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k"}
#: Chroma's approximator: its layers' MLPEmbedder names -> diffusers' (after ``distilled_guidance_layer.layers.N.``)
_APPROXIMATOR = {"in_layer": "linear_1", "out_layer": "linear_2"}

#: Flux.2's diffusers names where they differ from Flux.1's (its single block keeps ``linear1``
#: fused as ``to_qkv_mlp_proj``, so nothing is split there)
_DOUBLE2 = {
    "img_mlp.0": "ff.linear_in",
    "img_mlp.2": "ff.linear_out",
    "txt_mlp.0": "ff_context.linear_in",
    "txt_mlp.2": "ff_context.linear_out",
}
_SINGLE2 = {"linear1": "attn.to_qkv_mlp_proj", "linear2": "attn.to_out"}
_OUTSIDE2 = {
    "time_in.in_layer": "time_guidance_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_guidance_embed.timestep_embedder.linear_2",
    "guidance_in.in_layer": "time_guidance_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_guidance_embed.guidance_embedder.linear_2",
    "single_stream_modulation.lin": "single_stream_modulation.linear",
    "double_stream_modulation_img.lin": "double_stream_modulation_img.linear",
    "double_stream_modulation_txt.lin": "double_stream_modulation_txt.linear",
}

#: the LyCORIS kinds of :data:`REFUSED` (whose reason names the namings that read them)
_LYCORIS = next(pattern for pattern, why in REFUSED if why.startswith("LyCORIS (LoHa"))

#: keys the Flux.1 namings refuse in their own words, before :data:`REFUSED`: deltas of the norms
#: without a weight; and for ``flux-xlabs`` (LoRA only) bias deltas and LyCORIS factors, where
#: :data:`REFUSED`'s LyCORIS reason would point to kohya and ComfyUI naming
_NOT_READ: tuple[tuple[str, str], ...] = (
    (
        r"[._](?:img_norm[12]|txt_norm[12]|pre_norm|norm_final)\.(?:diff|diff_b)$",
        "a delta of a normalization layer that has no weight or bias in Flux (a block's img_norm1/2, txt_norm1/2 "
        "and pre_norm, the final layer's norm_final: elementwise_affine=False, as in diffusers), so there is "
        "nothing to add it to; load with strict=False to skip it",
    ),
    (
        r"\.diff_b$",
        "a bias delta (diff_b), which lorahot does not read in the Flux.1 namings (it places their LoRA weights only, "
        "splitting the fused modules); load with strict=False to skip it, with the LoRA "
        "weights of its module (loaded without their bias they would compute another update)",
    ),
    (
        _LYCORIS,
        "LyCORIS (LoHa/LoKr/Tucker/diff) weights, which lorahot does not read in the Flux.1 namings (it places their "
        "LoRA weights only, splitting the fused modules); convert the adapter to LoRA, or load "
        "with strict=False to skip the module",
    ),
)
_REFUSED = (*_NOT_READ, *REFUSED)
#: the namings that read LyCORIS factors and diffs (merged mode) refuse the weightless norms'
#: deltas, and a ``dora_scale`` (no test of these namings against an oracle reads one)
_REFUSED_MERGEABLE = (_NOT_READ[0], REFUSED_DORA, *REFUSED_MERGEABLE)

#: a component prefix (``diffusion_model.``, ``lora_unet_``), kept for ``prefix=`` and the resolver

#: original module names -> diffusers', one layer each: tried on a module key that names no
#: injected layer (a model with the original names takes the file's keys as they are); the
#: diffusers, PEFT and ComfyUI namings take them too, exactly, in a file :data:`FILE_ALIASES` marks
ALIASES: tuple[tuple[str, str], ...] = (
    *((rf"{_START}double_blocks\.(\d+)\.{re.escape(k)}$", rf"transformer_blocks.\1.{v}") for k, v in _DOUBLE.items()),
    *(
        (rf"{_START}single_blocks\.(\d+)\.{re.escape(k)}$", rf"single_transformer_blocks.\1.{v}")
        for k, v in _SINGLE.items()
    ),
    *((rf"{_START}{re.escape(k)}$", v) for k, v in _OUTSIDE.items()),
    # the norms, with or without their parameter's name (ComfyUI keys a diff by the parameter, .scale)
    *(
        (rf"{_START}double_blocks\.(\d+)\.{re.escape(k)}(?:\.scale)?$", rf"transformer_blocks.\1.{v}")
        for k, v in _DOUBLE_NORMS.items()
    ),
    *(
        (rf"{_START}single_blocks\.(\d+)\.{re.escape(k)}(?:\.scale)?$", rf"single_transformer_blocks.\1.{v}")
        for k, v in _SINGLE_NORMS.items()
    ),
    *(
        (rf"{_START}distilled_guidance_layer\.layers\.(\d+)\.{k}$", rf"distilled_guidance_layer.layers.\1.{v}")
        for k, v in _APPROXIMATOR.items()
    ),
    # Flux.2, whose files use the same original names: tried alongside, the model has one of them
    *((rf"{_START}double_blocks\.(\d+)\.{re.escape(k)}$", rf"transformer_blocks.\1.{v}") for k, v in _DOUBLE2.items()),
    *(
        (rf"{_START}single_blocks\.(\d+)\.{re.escape(k)}$", rf"single_transformer_blocks.\1.{v}")
        for k, v in _SINGLE2.items()
    ),
    *((rf"{_START}{re.escape(k)}$", v) for k, v in _OUTSIDE2.items()),
    # ``sformer_blocks.N`` (``transformer_blocks.N`` cut short by some Flux.2 exports, which
    # diffusers' Flux.2 conversion reads as ``transformer_blocks.N``): a name no model has
    (rf"{_START}sformer_blocks\.(\d+\..+)$", r"transformer_blocks.\1"),
)


#: the module names only Flux.1's, Flux.2's and Chroma's original model has: a block module
#: (``double_blocks.N.``, ``single_blocks.N.``; ``sformer_blocks.N.``, a Flux.2 export's), the
#: embedders' ``in_layer`` / ``out_layer`` (``time_in``, ``vector_in``, ``guidance_in``, Chroma's
#: approximator), Flux.2's modulations; never ``img_in``, ``txt_in`` or ``final_layer.*``, which other
#: models have as their own names (Qwen-Image's ``img_in`` and ``txt_in``, HiDream's ``final_layer``)
_OWN = (
    r"(?:^|\.)(?:(?:double_blocks|single_blocks|sformer_blocks)\.\d+\."
    r"|(?:time_in|vector_in|guidance_in)\.(?:in|out)_layer$"
    r"|distilled_guidance_layer\.layers\.\d+\.(?:in|out)_layer$"
    r"|(?:single_stream_modulation|double_stream_modulation_(?:img|txt))\.lin$)"
)


def qkv_split(pattern: str, block: str, names: tuple[str, ...]) -> Split:
    """A fused ``pattern`` (block number as group ``n``) split evenly onto ``<block>.<n>.<name>``."""
    return Split(_HEAD + pattern, tuple((rf"\g<head>{block}.\g<n>.{n}", 1) for n in names))


QKV = ("attn.to_q", "attn.to_k", "attn.to_v")
ADD_QKV = ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")

#: the final layer's adaLN projection: ``(shift, scale)`` in the original model, ``(scale, shift)``
#: in diffusers' ``norm_out.linear`` (the other namings that read Flux's names outside the blocks
#: take it too, in a file :data:`FILE_ALIASES` marks: :mod:`lorahot.formats.comfyui`,
#: :mod:`lorahot.formats.diffusers`, :mod:`lorahot.formats.peft`)
FINAL_ADALN = Reorder(_HEAD + r"final_layer\.adaLN_modulation\.1", r"\g<head>norm_out.linear", (1, 1), (1, 0))

#: the fused modules of the original model's blocks, in its names
BLOCK_SPLITS: tuple[Split | Reorder, ...] = (
    qkv_split(r"double_blocks\.(?P<n>\d+)\.img_attn\.qkv", "transformer_blocks", QKV),
    qkv_split(r"double_blocks\.(?P<n>\d+)\.txt_attn\.qkv", "transformer_blocks", ADD_QKV),
    Split(
        _HEAD + r"single_blocks\.(?P<n>\d+)\.linear1",
        (
            *((rf"\g<head>single_transformer_blocks.\g<n>.{n}", 1) for n in QKV),
            (r"\g<head>single_transformer_blocks.\g<n>.proj_mlp", 4),
        ),
    ),
    # ComfyUI's ``linear1_qkv``: rows ``0 .. 3 D`` of ``linear1`` (its q, k and v), the MLP's rows untouched
    dataclasses.replace(
        qkv_split(r"single_blocks\.(?P<n>\d+)\.linear1_qkv", "single_transformer_blocks", QKV),
        within=r"\g<head>single_blocks.\g<n>.linear1",
    ),
)
#: the fused and re-ordered modules of the original model, in its names
SPLITS: tuple[Split | Reorder, ...] = (*BLOCK_SPLITS, FINAL_ADALN)

#: :data:`ALIASES` and :data:`FINAL_ADALN` for the namings that read any model's names (PEFT's,
#: diffusers', ComfyUI's), taken only by a file one of whose module keys is a name only Flux's
#: original model has (:data:`_OWN`): diffusers renames Flux's names under PEFT's
#: ``base_model.model.`` in its Flux.2 loader and, in its Flux.1 loader, only in a file of Flux's
#: blocks (fal's Kontext files; bare, BFL's control LoRAs, told by a ``query_norm.scale`` key); no
#: other model's loader renames them, so another model's lone ``img_in`` is no ``x_embedder``, nor its
#: ``final_layer.adaLN_modulation.1`` (Lumina2's, Cosmos's) ``norm_out.linear`` with its halves swapped
FILE_ALIASES = FileAliases("Flux", _OWN, ALIASES, (FINAL_ADALN,))

#: the layers only diffusers' Flux.2 transformer has (``Flux2Transformer2DModel``, Flux.2 and Flux.2
#: Klein): the modulations its blocks share; Flux.1's and Chroma's have none of them
FLUX2_LAYERS = r"(?:^|\.)(?:double_stream_modulation_(?:img|txt)|single_stream_modulation)\.linear$"

#: :data:`ALIASES` taken on a Flux.2 model (:data:`FLUX2_LAYERS`) by the namings that take
#: :data:`FILE_ALIASES` but diffusers' (ComfyUI's, PEFT's, ``flux-kohya``), in a file that no key marks:
#: diffusers' Flux.2 loader converts a ``diffusion_model.``, ``base_model.model.`` or sd-scripts file of
#: ``img_in``, ``txt_in`` or ``final_layer.linear`` alone onto ``x_embedder``, ``context_embedder`` and
#: ``proj_out``; its Flux.1 and Chroma loaders load such a file nowhere, its model loader raises on one
#: under ``transformer.``. Without :data:`FINAL_ADALN`: that loader places ``final_layer.adaLN_modulation.1``
#: on ``norm_out.linear`` unswapped (its kohya conversion leaves it out), where diffusers' checkpoint
#: conversion swaps the halves, so a file of it alone stays refused
ON_FLUX2 = FileAliases("Flux.2", "", ALIASES, model_marker=FLUX2_LAYERS)


#: sd-scripts' underscore names of the original modules -> the dotted ones (``lora_unet_`` kept:
#: ``prefix="lora_unet"`` selects them, and the resolver drops it)
_KOHYA_TO_DOTTED: tuple[tuple[str, str], ...] = (
    (
        r"^lora_unet_double_blocks_(\d+)_(img|txt)_(attn|mlp|mod)_(qkv|proj|0|2|lin)$",
        r"lora_unet_double_blocks.\1.\2_\3.\4",
    ),
    (r"^lora_unet_single_blocks_(\d+)_(linear1_qkv|linear1|linear2)$", r"lora_unet_single_blocks.\1.\2"),
    (r"^lora_unet_single_blocks_(\d+)_modulation_lin$", r"lora_unet_single_blocks.\1.modulation.lin"),
    (
        r"^lora_unet_double_blocks_(\d+)_(img|txt)_attn_norm_(query|key)_norm(_scale)?$",
        r"lora_unet_double_blocks.\1.\2_attn.norm.\3_norm",
    ),
    (r"^lora_unet_single_blocks_(\d+)_norm_(query|key)_norm(_scale)?$", r"lora_unet_single_blocks.\1.norm.\2_norm"),
    (r"^lora_unet_final_layer_adaLN_modulation_1$", "lora_unet_final_layer.adaLN_modulation.1"),
    (r"^lora_unet_final_layer_linear$", "lora_unet_final_layer.linear"),
    (r"^lora_unet_(time|vector|guidance)_in_(in|out)_layer$", r"lora_unet_\1_in.\2_layer"),
    (
        r"^lora_unet_distilled_guidance_layer_layers_(\d+)_(in|out)_layer$",
        r"lora_unet_distilled_guidance_layer.layers.\1.\2_layer",
    ),
    (
        r"^lora_unet_(single_stream_modulation|double_stream_modulation_img|double_stream_modulation_txt)_lin$",
        r"lora_unet_\1.lin",
    ),
)

#: the aliases and the final adaLN's swap only in a file that is Flux's (:data:`FILE_ALIASES`: a block
#: module, which every file the marker detects has, ``time_in``'s ``in_layer``, ...), as in ComfyUI's,
#: diffusers' and PEFT's namings: a file of ``img_in``, ``txt_in`` or ``final_layer.*`` alone
#: (:data:`KOHYA_OUTSIDE`) is as much Qwen-Image's, SD3's, Lumina2's or HiDream's, and another model's
#: loader loads none of it (Lumina2's ``x_embedder`` took ``lora_unet_img_in``)
KOHYA = dataclasses.replace(
    kohya.spelling(
        "flux-kohya",
        renames=_KOHYA_TO_DOTTED,
        refuse=_REFUSED_MERGEABLE,
        marker=r"^lora_unet_(?:double_blocks|single_blocks)_\d+_",
        splits=BLOCK_SPLITS,
        lycoris=True,
        example="lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight",
    ),
    file_aliases=(FILE_ALIASES, ON_FLUX2),
)

#: sd-scripts' names of the modules outside the blocks (no block key tells such a file apart)
_KOHYA_OUTSIDE = (
    r"lora_unet_(?:img_in|txt_in|(?:time|vector|guidance)_in_(?:in|out)_layer|final_layer_(?:linear|adaLN_modulation_1)"
    r"|(?:single_stream_modulation|double_stream_modulation_(?:img|txt))_lin"  # Flux.2
    r"|distilled_guidance_layer_layers_\d+_(?:in|out)_layer)"  # Chroma's approximator
)
#: ``flux-kohya`` for a file whose diffusion-model modules all lie outside the blocks
#: (``lora_unet_final_layer_linear``, ``lora_unet_img_in``, ...; :func:`lorahot.formats.kohya.outside`).
#: HiDream, whose diffusers model has ``final_layer.linear`` and ``final_layer.adaLN_modulation.1``
#: itself, takes such keys as they are (a layer of the key's own name comes before any alias or
#: swap), as in kohya naming. Any other model takes them only in a file :data:`FILE_ALIASES` marks.
KOHYA_OUTSIDE = kohya.outside(KOHYA, _KOHYA_OUTSIDE, example="lora_unet_final_layer_linear.lora_down.weight")

#: a module key of the original model, with an optional component prefix
_BFL_MARKER = r"(?:^|\.)(?:double_blocks|single_blocks)\.\d+\."

BFL = KeyFormat(
    name="flux-bfl",
    rules=(*lora_rules(), *lycoris_rules(r"(?P<module>.+)")),  # LyCORIS as in ComfyUI naming (merged mode)
    prefixes=(*ORIGINAL_PREFIXES, *COMFYUI_TEXT_ENCODERS),
    aliases=ALIASES,
    refuse=_REFUSED_MERGEABLE,
    marker=_BFL_MARKER,
    splits=SPLITS,
    example="diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight",
)

#: xlabs' attention-processor LoRAs: ``qkv_lora1``/``proj_lora1`` on the image stream,
#: ``qkv_lora2``/``proj_lora2`` on the text stream; single blocks have ``qkv_lora``/``proj_lora``.
_XLABS_RENAMES: tuple[tuple[str, str], ...] = (
    (rf"{_START}double_blocks\.(\d+)\.processor\.qkv_lora1$", r"double_blocks.\1.img_attn.qkv"),
    (rf"{_START}double_blocks\.(\d+)\.processor\.qkv_lora2$", r"double_blocks.\1.txt_attn.qkv"),
    (rf"{_START}double_blocks\.(\d+)\.processor\.proj_lora1$", r"double_blocks.\1.img_attn.proj"),
    (rf"{_START}double_blocks\.(\d+)\.processor\.proj_lora2$", r"double_blocks.\1.txt_attn.proj"),
    (rf"{_START}single_blocks\.(\d+)\.processor\.qkv_lora$", r"single_blocks.\1.attn.qkv"),
    (rf"{_START}single_blocks\.(\d+)\.processor\.proj_lora$", r"single_blocks.\1.linear2"),
)

XLABS = KeyFormat(
    name="flux-xlabs",
    rules=(
        Rule(r"(?P<module>.+\.processor\.(?:qkv|proj)_lora[12]?)\.down\.weight", "A"),
        Rule(r"(?P<module>.+\.processor\.(?:qkv|proj)_lora[12]?)\.up\.weight", "B"),
    ),
    prefixes=("diffusion_model.",),
    renames=_XLABS_RENAMES,
    aliases=ALIASES,
    refuse=_REFUSED,
    marker=r"(?:^|\.)(?:double_blocks|single_blocks)\.\d+\.processor\.",
    splits=(
        *SPLITS,
        # ComfyUI converts it to ``linear1_qkv``
        dataclasses.replace(
            qkv_split(r"single_blocks\.(?P<n>\d+)\.attn\.qkv", "single_transformer_blocks", QKV),
            within=r"\g<head>single_blocks.\g<n>.linear1",
        ),
    ),
    roles=("down", "up"),
    example="double_blocks.0.processor.qkv_lora1.down.weight",
)

FAL = KeyFormat(
    name="flux-fal",
    rules=(
        Rule(r"base_model\.model\.(?P<module>.+)\.lora_A\.weight", "A"),
        Rule(r"base_model\.model\.(?P<module>.+)\.lora_B\.weight", "B"),
        # ai-toolkit's Flux.2 LoKr in PEFT's wrapper, with its alphas
        Rule(r"base_model\.model\.(?P<module>.+)\.alpha", "alpha"),
        *lycoris_rules(r"base_model\.model\.(?P<module>.+)"),
    ),
    aliases=ALIASES,
    refuse=_REFUSED_MERGEABLE,
    marker=r"^base_model\.model\.(?:double_blocks|single_blocks)\.\d+\.",
    splits=SPLITS,
    example="base_model.model.double_blocks.0.img_attn.qkv.lora_A.weight",
)
