"""Lumina2 naming: adapters trained on the original Lumina-Image 2.0 module names
(``diffusion_model.layers.0.attention.qkv.lora_A.weight``, or ``.lora_down``/``.lora_up``, with
``.alpha``), for a diffusers-named ``Lumina2Transformer2DModel``.

The original attention fuses q, k and v (``attention.qkv``: ``24 + 8 + 8`` heads of grouped-query
attention, rows ``3 : 1 : 1``); on a diffusers-named model it is
:class:`~lorahot.formats.table.Split` onto ``attn.to_q``/``to_k``/``to_v``. Every other module is an
alias (``attention.out`` -> ``attn.to_out.0``, ``feed_forward.w1`` -> ``feed_forward.linear_1``,
``adaLN_modulation.1`` -> ``norm1.linear``), in the main ``layers`` and the ``noise_refiner`` and
``context_refiner`` blocks alike.

Z-Image (``ZImageTransformer2DModel``) keeps these block names with its own module names
(``attention.to_q``, ``feed_forward.w1``), which its files spell as they are, but for the
output projection: ``attention.out`` there is ``attention.to_out.0``, as diffusers' Z-Image
conversion renames it. An alias is taken only where the model has its target, so each model
finds its own.

Ideogram 4 (``Ideogram4Transformer2DModel``) writes the same original names (``layers.N``,
``attention.qkv``, ``feed_forward.w1``), under ``diffusion_model.`` or
``conditional_transformer.``, with ``attention.o`` for the output projection. Its attention has
as many key-value heads as query heads, so its ``attention.qkv`` is cut ``1 : 1 : 1`` onto
``attention.to_q``/``to_k``/``to_v``, as diffusers' Ideogram 4 conversion cuts it. Of the two
cuts of ``attention.qkv``, each model takes the one whose layers it has
(:func:`lorahot.resolve.split.placed`).

LyCORIS factors (LoHa, LoKr, ...: ai-toolkit's Z-Image LoKr files, which diffusers' Z-Image
loader reads) load in merged mode, as in ComfyUI naming; one on the fused ``attention.qkv`` of
a diffusers-named model is cut by the rows of its ``ΔW``, as a LoRA by B's rows.

The normalization layers with a weight are aliased as diffusers' Lumina2 conversion renames them
(``attention.q_norm`` -> ``attn.norm_q``, ``attention_norm1`` -> ``norm1.norm``, a context-refiner
block's ``norm1``, ``attention_norm2`` -> ``norm2``, ``ffn_norm1``/``ffn_norm2`` as they are,
``cap_embedder.0`` -> ``time_caption_embed.caption_embedder.0``; Z-Image keeps them but for
``attention.q_norm`` -> ``attention.norm_q``): RMSNorms computed in float32 with a weight of the
same shape in both, so a ``.diff`` (ComfyUI's LoRA extraction) folds into diffusers' norm in merged
mode, the norm among the targets. Refused by name (``strict=False`` skips them): deltas of
``final_layer.norm_final`` (``elementwise_affine=False`` in both models) and of the top-level
``norm_final``, a weight the original model holds but never uses (diffusers' conversion drops it).

``lumina2-kohya`` is sd-scripts' spelling of the same names (``lora_unet_layers_0_attention_qkv``,
``.alpha`` per module), placed the same way; Z-Image files in that spelling name the output
projection ``attention_out``, as diffusers' Z-Image conversion reads it. It reads LyCORIS factors
and norm deltas (``lora_unet_layers_0_attention_q_norm.diff``) as the dotted naming does, in merged
mode, and refuses the same weightless norms' deltas by name.
"""

from __future__ import annotations

import re

from lorahot.formats import kohya
from lorahot.formats.table import COMPONENT_HEAD as _HEAD
from lorahot.formats.table import (
    DIFFUSION_MODEL,
    REFUSED_MERGEABLE,
    FileAliases,
    KeyFormat,
    Reorder,
    Split,
    lora_rules,
    lycoris_rules,
)
from lorahot.formats.table import NAME_START as _START

__all__ = ["FORMAT", "KOHYA", "KOHYA_OUTSIDE", "SPLITS", "OUTSIDE_ALIASES", "FILE_ALIASES", "BLOCK_ALIASES"]

_BLOCKS = r"(?P<blocks>layers|noise_refiner|context_refiner)\.(?P<n>\d+)"

#: block module (after ``<blocks>.N.``) -> diffusers' (after ``<blocks>.N.``)
_BLOCK = {
    "attention.out": "attn.to_out.0",
    "feed_forward.w1": "feed_forward.linear_1",
    "feed_forward.w2": "feed_forward.linear_2",
    "feed_forward.w3": "feed_forward.linear_3",
    "adaLN_modulation.1": "norm1.linear",
}

#: the same for Z-Image and Ideogram 4, whose other block modules keep the original names
_ZIMAGE_BLOCK = {"attention.out": "attention.to_out.0", "attention.o": "attention.to_out.0"}
#: the block norms with a weight (RMSNorms of the same shape in both): Lumina2's, then Z-Image's
#: (which keeps its ``attention_norm1``/``ffn_norm1`` names); ``attention_norm1`` of a modulated block
#: (``layers``, ``noise_refiner``) is ``norm1.norm`` in diffusers' Lumina2, a context refiner's ``norm1``
_BLOCK_NORMS = {
    "attention.q_norm": "attn.norm_q",
    "attention.k_norm": "attn.norm_k",
    "attention_norm2": "norm2",
}
_ZIMAGE_NORMS = {"attention.q_norm": "attention.norm_q", "attention.k_norm": "attention.norm_k"}

#: modules outside the blocks -> diffusers' (``x_embedder`` has the same name in both), as diffusers'
#: Lumina2 checkpoint conversion renames them; the final adaLN projects to the scale alone (no halves
#: to swap, unlike Flux's and SD3's)
_OUTSIDE = {
    "t_embedder.mlp.0": "time_caption_embed.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_caption_embed.timestep_embedder.linear_2",
    "cap_embedder.1": "time_caption_embed.caption_embedder.1",
    "final_layer.linear": "norm_out.linear_2",
    "final_layer.adaLN_modulation.1": "norm_out.linear_1",
}

#: the same as aliases: what the Lumina2 namings take (and the namings that read any model's names, in
#: a file of the Lumina models: :data:`FILE_ALIASES`). The targets are layers only of the Lumina models
#: (Lumina2 and Lumina-Next, whose original names mean the same there) and Cosmos (``norm_out.linear_1``
#: / ``linear_2``, its final adaLN, which its original names call so too); Flux's and SD3's targets of
#: the same keys (``proj_out``, ``time_text_embed.*``) are layers of no Lumina model.
OUTSIDE_ALIASES: tuple[tuple[str, str], ...] = tuple((rf"{_START}{re.escape(k)}$", v) for k, v in _OUTSIDE.items())

#: the names only the Lumina models have (Lumina2's original names; Z-Image's, Ideogram 4's and Bria
#: Fibo 2's, which keep its blocks and embedders; Lumina2's and Lumina-Next's diffusers names): the
#: caption embedder ``cap_embedder.N``, a refiner block's module, a main block's fused
#: ``attention.qkv``, its ``attention.out`` / ``attention.o`` or its ``adaLN_modulation.1``, diffusers'
#: ``feed_forward.linear_N`` of a main block and ``time_caption_embed.*``; never ``t_embedder.mlp.N`` or
#: ``final_layer.*`` (SD3's, DiT's, Cosmos's names too), nor ``layers.N.feed_forward.wN`` (Llama's
#: original names)
_OWN = (
    r"(?:^|\.)(?:cap_embedder\.[01]$|(?:noise_refiner|context_refiner)\.\d+\.|time_caption_embed\."
    r"|layers\.\d+\.(?:attention\.(?:qkv|out|o)|adaLN_modulation\.1|feed_forward\.linear_[123])$)"
)

#: :data:`OUTSIDE_ALIASES` for the namings that read any model's names (PEFT's, diffusers',
#: ComfyUI's), taken only in a file one of whose module keys is a name only the Lumina models have
#: (:data:`_OWN`): no diffusers loader renames them (its Lumina2 loader refuses them in a
#: ``diffusion_model.`` file and loads such keys as they are in any other; its checkpoint conversion
#: places them, the reference of lorahot's Lumina2 namings), so another model's ``t_embedder.mlp.0``
#: or ``final_layer.linear`` (SD3's, Cosmos's) is refused, not placed on a Lumina layer
FILE_ALIASES = FileAliases("Lumina2", _OWN, OUTSIDE_ALIASES)

#: the block modules' aliases (Lumina2's, then Z-Image's and Ideogram 4's output projection), which
#: PEFT naming takes too, exactly, for the same names without a prefix: diffusers' Ideogram 4 loader
#: reads such files, and its Z-Image loader where they carry ``.alpha``
BLOCK_ALIASES: tuple[tuple[str, str], ...] = tuple(
    (rf"{_START}(layers|noise_refiner|context_refiner)\.(\d+)\.{re.escape(k)}$", rf"\1.\2.{v}")
    for table in (_BLOCK, _ZIMAGE_BLOCK)
    for k, v in table.items()
)

_ALIASES: tuple[tuple[str, str], ...] = (
    *OUTSIDE_ALIASES,
    *BLOCK_ALIASES,
    *(
        (rf"{_START}(layers|noise_refiner|context_refiner)\.(\d+)\.{re.escape(k)}$", rf"\1.\2.{v}")
        for table in (_BLOCK_NORMS, _ZIMAGE_NORMS)
        for k, v in table.items()
    ),
    (rf"{_START}(layers|noise_refiner)\.(\d+)\.attention_norm1$", r"\1.\2.norm1.norm"),
    (rf"{_START}context_refiner\.(\d+)\.attention_norm1$", r"context_refiner.\1.norm1"),
    (rf"{_START}cap_embedder\.0$", "time_caption_embed.caption_embedder.0"),
)

#: deltas of norms that compute nothing with a weight (in either spelling)
_NO_NORM: tuple[tuple[str, str], ...] = (
    (
        r"(?:^|[._])final_layer[._]norm_final\.(?:diff|diff_b)$",
        "a delta of a normalization layer that has no weight or bias in Lumina2 (the final layer's norm_final: "
        "elementwise_affine=False, as in diffusers), so there is nothing to add it to; load with strict=False "
        "to skip it",
    ),
    (
        r"^(?:(?:model\.)?diffusion_model\.|conditional_transformer\.|lora_unet_)norm_final\.(?:diff|diff_b)$",
        "a delta of the top-level norm_final, a weight the original Lumina2 model holds but never uses (diffusers' "
        "conversion drops it), so it changes no output; load with strict=False to skip it",
    ),
)

#: the fused attention input: q (all heads), then k and v (the key-value heads), rows 3 : 1 : 1
SPLITS: tuple[Split | Reorder, ...] = (
    Split(
        _HEAD + _BLOCKS + r"\.attention\.qkv",
        tuple((rf"\g<head>\g<blocks>.\g<n>.attn.{n}", s) for n, s in (("to_q", 3), ("to_k", 1), ("to_v", 1))),
    ),
    # Ideogram 4 (and Z-Image's names): as many key-value heads as query heads
    Split(
        _HEAD + _BLOCKS + r"\.attention\.qkv",
        tuple((rf"\g<head>\g<blocks>.\g<n>.attention.{n}", 1) for n in ("to_q", "to_k", "to_v")),
    ),
)

#: the modules of the blocks, which Z-Image names as it does (``attention.to_q``) and its marker
#: leaves unmarked, either spelling: the layers its blocks have (Lumina2's, Z-Image's and
#: Ideogram 4's names), whole names, not any model's ``layers.N`` (OmniGen's ``self_attn.qkv_proj``)
_BLOCKS = (
    r"^(?:layers|noise_refiner|context_refiner)[._]\d+[._](?:attention[._](?:to_[qkv]|to_out[._]0|norm_[qk]|[qk]_norm"
    r"|qkv|out|o)|feed_forward[._]w[123]|(?:attention|ffn)_norm[12]|adaLN_modulation[._][01])$"
)

#: Z-Image's projections as diffusers' Z-Image loader reads a kohya name split at every ``_``
#: (``attention.to.q``; its ``.alpha`` under ``attention.to_q``): the module keys of both, one module
_DOTTED_PROJECTIONS = (
    (rf"^(.*{_START}(?:layers|noise_refiner|context_refiner)\.\d+\.attention)\.to\.([qkv])$", r"\1.to_\2"),
)

FORMAT = KeyFormat(
    name="lumina2",
    rules=(*lora_rules(), *lycoris_rules(r"(?P<module>.+)")),  # LyCORIS as in ComfyUI naming (merged mode)
    prefixes=(*DIFFUSION_MODEL, "conditional_transformer."),
    require_prefix=True,
    renames=_DOTTED_PROJECTIONS,
    refuse=(*_NO_NORM, *REFUSED_MERGEABLE),
    marker=(
        r"^(?:(?:model\.)?diffusion_model|conditional_transformer)\.(?:layers|noise_refiner|context_refiner)\.\d+\."
        r"(?:attention\.(?:qkv|out|o|to\.[qkv])|feed_forward\.w[123]|adaLN_modulation\.1)\."
    ),
    aliases=_ALIASES,
    splits=SPLITS,
    example="diffusion_model.layers.0.attention.qkv.lora_A.weight",
    shared=_BLOCKS,
)

#: sd-scripts' spelling: ``lora_unet_layers_0_attention_qkv``; the block modules back to the
#: dotted original names (``lora_unet_`` kept for ``prefix=`` and the resolver), the others (Z-Image's
#: ``attention_to_q``, ``all_x_embedder_2-1``) left to the underscore match of plain kohya
_KOHYA_TO_DOTTED = (
    (
        r"^lora_unet_(layers|noise_refiner|context_refiner)_(\d+)_(attention|feed_forward|adaLN_modulation)_"
        r"(qkv|out|o|w[123]|\d+)$",
        r"lora_unet_\1.\2.\3.\4",
    ),
    # the norms with a weight (the aliases then place them as in the dotted naming)
    (
        r"^lora_unet_(layers|noise_refiner|context_refiner)_(\d+)_attention_(q_norm|k_norm)$",
        r"lora_unet_\1.\2.attention.\3",
    ),
    (
        r"^lora_unet_(layers|noise_refiner|context_refiner)_(\d+)_(attention_norm[12]|ffn_norm[12])$",
        r"lora_unet_\1.\2.\3",
    ),
    (r"^lora_unet_cap_embedder_([01])$", r"lora_unet_cap_embedder.\1"),
    # the modules outside the blocks
    (r"^lora_unet_t_embedder_mlp_([02])$", r"lora_unet_t_embedder.mlp.\1"),
    (r"^lora_unet_final_layer_linear$", "lora_unet_final_layer.linear"),
    (r"^lora_unet_final_layer_adaLN_modulation_1$", "lora_unet_final_layer.adaLN_modulation.1"),
)

KOHYA = kohya.spelling(
    "lumina2-kohya",
    renames=_KOHYA_TO_DOTTED,
    aliases=_ALIASES,
    refuse=(*_NO_NORM, *REFUSED_MERGEABLE),
    # any block module of the original names (a file of feed-forward or adaLN modules alone too)
    marker=r"^lora_unet_(?:layers|noise_refiner|context_refiner)_\d+_(?:attention_(?:qkv|out|o)|feed_forward_w[123]|adaLN_modulation_1)\.",
    splits=SPLITS,
    lycoris=True,
    example="lora_unet_layers_0_attention_qkv.lora_down.weight",
    shared=_BLOCKS,
)

#: ``lumina2-kohya`` for a file whose modules all lie outside the blocks and one of which only the
#: Lumina models have (``lora_unet_cap_embedder_1``; :func:`lorahot.formats.kohya.outside`); a file of
#: ``t_embedder``/``final_layer`` keys alone reads as SD3's or Flux's (detected first), names of several
#: models, and its keys are placed on no Lumina layer (refused on Lumina2, as diffusers' loaders load
#: none of them)
KOHYA_OUTSIDE = kohya.outside(
    KOHYA,
    r"lora_unet_(?:x_embedder|cap_embedder_1|t_embedder_mlp_[02]|final_layer_(?:linear|adaLN_modulation_1))",
    marker=r"lora_unet_cap_embedder_1",
    example="lora_unet_cap_embedder_1.lora_down.weight",
)
