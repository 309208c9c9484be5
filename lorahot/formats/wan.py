"""Wan 2.x naming: adapters trained on the original Wan module names
(``diffusion_model.blocks.0.self_attn.q.lora_A.weight``, or ``.lora_down``/``.lora_up``, with
``.alpha``; ``model.diffusion_model.`` as ComfyUI also writes it), for a diffusers-named
``WanTransformer3DModel``.

Module keys keep the original names; the diffusers names are aliases
(``blocks.0.self_attn.q`` -> ``blocks.0.attn1.to_q``, ``cross_attn`` -> ``attn2``,
``ffn.0`` -> ``ffn.net.0.proj``, ``head.head`` -> ``proj_out``, the embedders). Nothing is fused.

A module's ``.diff_b`` beside its LoRA (CausVid, lightx2v) is a bias added at the adapter's
weight, unscaled by ``alpha / r``, as diffusers (``lora_B.bias`` of A and B it pre-scales) and
ComfyUI apply it: read as the module's LoRA bias (role ``diff_bias``, which the loader divides by
``alpha / r``), so it needs ``inject(..., extras=True)`` or merged mode. A module's ``.diff`` (a
full weight delta, lightx2v's ``head.head.diff``), with its ``.diff_b`` if any, or a ``.diff_b``
without LoRA weights, is a ``diff`` weight module, loaded in merged mode (as diffusers applies
``head.head.diff``, and ComfyUI every diff); a module with both a LoRA and a ``.diff`` is one such
module, its weight ``W + diff + alpha / r * B @ A`` as ComfyUI applies the two.

The normalization layers with a weight are aliased as diffusers' Wan conversion renames them
(``blocks.N.norm3`` -> ``blocks.N.norm2``, the cross-attention norm; ``self_attn.norm_q`` ->
``attn1.norm_q``; ``cross_attn.norm_k_img`` -> ``attn2.norm_added_k``; ``img_emb.proj.0``/``.4``
-> ``condition_embedder.image_embedder.norm1``/``norm2``): the same computation on the same
weight layout (Wan's LayerNorm and RMSNorm, in float32, are diffusers' ``FP32LayerNorm`` and
``RMSNorm``), so their ``.diff``/``.diff_b`` (ComfyUI's LoRA extraction, lightx2v's zeros) fold
into those norms in merged mode, the norms among the targets. Refused by name
(``strict=False`` skips them, as diffusers drops them): deltas of the norms without a weight
(``blocks.N.norm1``, ``blocks.N.norm2``, ``head.norm``: nothing for a delta to add to, and
``blocks.N.norm2`` would otherwise name diffusers' cross-attention norm) and of a block's
modulation parameter (``blocks.N.diff_m``, diffusers' ``scale_shift_table``, a parameter of the
block rather than a layer lorahot wraps).

DiffSynth-Studio, Wan's own trainer, saves the same names with no prefix and PEFT's adapter name
(``blocks.0.self_attn.q.lora_A.default.weight``, no ``.alpha``: alpha = rank, as its loader
computes), some of its files under ``pipe.dit.``; ComfyUI's Wan loaders read them as these
names under ``diffusion_model.``, and so does this naming (a file whose keys have no prefix is
told apart by the block modules only Wan has: ``self_attn``/``cross_attn`` ``q``, ``k``, ``v``,
``o``, ``k_img``, ``v_img``, ``ffn.0``/``ffn.2``).

ai-toolkit's Wan 2.2 files of both transformers put ``transformer_1.`` (high noise) and
``transformer_2.`` (low noise) in front of the names; a pipeline runtime routes them to its
``transformer`` and ``transformer_2`` (:mod:`lorahot.resolve.components`).

``wan-musubi`` is musubi-tuner's kohya spelling of the same names
(``lora_unet_blocks_0_self_attn_q.lora_down.weight``, ``.alpha`` per module).

Both read LyCORIS factors (LoHa, LoKr, ...) as ComfyUI and kohya namings do: merged mode.

A VACE model's ``vace_blocks.N`` take the same block names, and their own ``before_proj`` and
``after_proj`` land on ``proj_in`` and ``proj_out``, as diffusers' Wan checkpoint conversion
renames them (diffusers' Wan LoRA conversion refuses ``vace_blocks`` keys); a file of those two
alone is a Wan file too (the markers name them).
"""

from __future__ import annotations

import re

from lorahot.formats import kohya
from lorahot.formats.table import (
    DIFFUSION_MODEL_HEAD,
    ORIGINAL_HEAD,
    ORIGINAL_PREFIXES,
    REFUSED_MERGEABLE,
    KeyFormat,
    Rule,
    lycoris_rules,
)
from lorahot.formats.table import NAME_START as _START

__all__ = ["FORMAT", "MUSUBI"]


#: block module (after ``blocks.N.``) -> diffusers' (after ``blocks.N.``)
_BLOCK = {
    **{f"self_attn.{o}": f"attn1.{c}" for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
    **{f"cross_attn.{o}": f"attn2.{c}" for o, c in zip("qkvo", ("to_q", "to_k", "to_v", "to_out.0"))},
    "cross_attn.k_img": "attn2.add_k_proj",
    "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
    # the norms with a weight (WanLayerNorm with elementwise_affine, WanRMSNorm): diffusers'
    # FP32LayerNorm and RMSNorm of the same shape; Wan's norm3 is the cross-attention norm there
    "norm3": "norm2",
    **{f"{a}.norm_{n}": f"{d}.norm_{n}" for a, d in (("self_attn", "attn1"), ("cross_attn", "attn2")) for n in "qk"},
    "cross_attn.norm_k_img": "attn2.norm_added_k",
}
#: modules outside the blocks
_OUTSIDE = {
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",  # LayerNorms of the image embedder
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
}

#: a VACE block's own modules (after ``vace_blocks.N.``) -> diffusers' (its attention and FFN
#: are a block's, which the block aliases place: ``vace_blocks.0.self_attn.q`` -> ``vace_blocks.0.attn1.to_q``)
_VACE = {"before_proj": "proj_in", "after_proj": "proj_out"}

_ALIASES: tuple[tuple[str, str], ...] = (
    *((rf"{_START}blocks\.(\d+)\.{re.escape(k)}$", rf"blocks.\1.{v}") for k, v in _BLOCK.items()),
    *((rf"{_START}vace_blocks\.(\d+)\.{k}$", rf"vace_blocks.\1.{v}") for k, v in _VACE.items()),
    *((rf"{_START}{re.escape(k)}$", v) for k, v in _OUTSIDE.items()),
)

#: deltas of what no layer lorahot wraps holds: the norms without a weight (in either spelling),
#: and a block's modulation parameter, which lightx2v's files hold (as zeros)
_NOT_LAYERS: tuple[tuple[str, str], ...] = (
    (
        r"(?:^|[._])(?:blocks[._]\d+[._]norm[12]|head[._]norm)\.(?:diff|diff_b)$",
        "a delta of a normalization layer that has no weight or bias in Wan (norm1 and norm2 of a block, the "
        "head's norm: elementwise_affine=False, as in diffusers), so there is nothing to add it to (a block's norm2 "
        "is the feed-forward norm, not diffusers' norm2, which is Wan's norm3); load with strict=False to skip it",
    ),
    (
        r"(?:^|\.)blocks\.\d+\.diff_m$",
        "a delta of a block's modulation parameter (diffusers' scale_shift_table), which no LoRA layer carries "
        "(diffusers and ComfyUI leave it unread); load with strict=False to skip it",
    ),
)
#: what the naming refuses: the deltas above, and what ComfyUI naming refuses (it reads LyCORIS factors)
_REFUSED = (*_NOT_LAYERS, *REFUSED_MERGEABLE)

#: DiffSynth-Studio's prefix in some of its files (its pipeline's ``dit``)
_DIFFSYNTH = "pipe.dit."
#: ai-toolkit's prefixes in a Wan 2.2 file of both transformers (high noise, low noise), which a
#: pipeline runtime routes to its ``transformer`` and ``transformer_2``
_DUAL = ("transformer_1.", "transformer_2.")

#: a Wan block module by its own leaf names, with or without a prefix (what tells a file of bare
#: keys apart from another model's)
_BLOCK_LEAF = r"(?:vace_)?blocks\.\d+\.(?:(?:self_attn|cross_attn)\.(?:q|k|v|o|k_img|v_img)|ffn\.[02])\."

FORMAT = KeyFormat(
    name="wan",
    rules=(
        Rule(r"(?P<module>.+)\.(?:lora_A|lora_down)(?:\.default)?\.weight", "A"),  # DiffSynth's .default.
        Rule(r"(?P<module>.+)\.(?:lora_B|lora_up)(?:\.default)?\.weight", "B"),
        Rule(r"(?P<module>.+)\.lora\.down\.weight", "A"),  # ComfyUI's dotted roles
        Rule(r"(?P<module>.+)\.lora\.up\.weight", "B"),
        Rule(r"(?P<module>.+)\.alpha", "alpha"),
        Rule(r"(?P<module>.+)\.diff", "diff"),
        *lycoris_rules(r"(?P<module>.+)"),  # LyCORIS as in ComfyUI naming (merged mode); .diff_b a LoRA's bias
    ),
    prefixes=(*ORIGINAL_PREFIXES, _DIFFSYNTH, *_DUAL),
    refuse=_REFUSED,
    marker=rf"{ORIGINAL_HEAD}{_BLOCK_LEAF}|^(?:{re.escape(_DIFFSYNTH)}|transformer_[12]\.){_BLOCK_LEAF}|"
    + DIFFUSION_MODEL_HEAD
    + r"(?:(?:vace_)?blocks\.\d+\.(?:self_attn|cross_attn|ffn)|vace_blocks\.\d+\.(?:before|after)_proj)\.",
    aliases=_ALIASES,
    example="diffusion_model.blocks.0.self_attn.q.lora_A.weight",
)

MUSUBI = kohya.spelling(
    "wan-musubi",
    renames=(  # to the dotted original names, lora_unet_ kept for prefix= and the resolver
        (
            r"^lora_unet_(vace_)?blocks_(\d+)_(self_attn|cross_attn)_(q|k|v|o|k_img|v_img)$",
            r"lora_unet_\1blocks.\2.\3.\4",
        ),
        (r"^lora_unet_(vace_)?blocks_(\d+)_ffn_(0|2)$", r"lora_unet_\1blocks.\2.ffn.\3"),
        (r"^lora_unet_(vace_)?blocks_(\d+)_norm3$", r"lora_unet_\1blocks.\2.norm3"),
        (
            r"^lora_unet_(vace_)?blocks_(\d+)_(self_attn|cross_attn)_(norm_q|norm_k|norm_k_img)$",
            r"lora_unet_\1blocks.\2.\3.\4",
        ),
        (r"^lora_unet_vace_blocks_(\d+)_(before|after)_proj$", r"lora_unet_vace_blocks.\1.\2_proj"),
        # the modules outside the blocks (the embedders, the head; the image embedder's norms)
        *((rf"^lora_unet_{k.replace('.', '_')}$", f"lora_unet_{k}") for k in _OUTSIDE),
    ),
    refuse=(_NOT_LAYERS[0], *REFUSED_MERGEABLE),
    marker=r"^lora_unet_(?:(?:vace_)?blocks_\d+_(?:self_attn|cross_attn|ffn)_|vace_blocks_\d+_(?:before|after)_proj\.)",
    aliases=_ALIASES,
    lycoris=True,
    example="lora_unet_blocks_0_self_attn_q.lora_down.weight",
)
