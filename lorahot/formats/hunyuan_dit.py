"""Hunyuan-DiT naming: adapters trained on Tencent's original Hunyuan-DiT module names, for a
diffusers-named ``HunyuanDiT2DModel``.

- ``hunyuan-dit``: the dotted names, as Tencent's LoRA training saves them with PEFT
  (``base_model.model.blocks.0.attn1.Wqkv.lora_A.weight``, which ComfyUI reads as its
  ``diffusion_model.blocks.0.attn1.Wqkv``), under ComfyUI's ``diffusion_model.`` or
  ``model.diffusion_model.``, under ``transformer.``, or with no prefix; ``.lora_down``/``.lora_up``
  and ``.alpha`` too.
- ``hunyuan-dit-kohya``: the kohya spelling of the same names
  (``lora_unet_blocks_0_attn1_Wqkv.lora_down.weight``, ``.alpha`` per module), which ComfyUI reads
  as the underscore form of its model's names.

Told apart by a block module only the original model has (``attn1.Wqkv``, ``attn1.out_proj``,
``attn2.q_proj``/``kv_proj``/``out_proj``, ``default_modulation.1``; diffusers' are
``attn1.to_q``, ..., ``norm1.linear``) or by ``mlp_t5``/``extra_embedder.N``. A file of other
modules only (``mlp.fc1``, which timm's ViT shares, ``t_embedder.mlp.0``, ...) is not told apart.

The original model fuses what diffusers keeps apart, and diffusers' checkpoint conversion
(``scripts/convert_hunyuandit_to_diffusers.py``) cuts it by rows: the self-attention's ``Wqkv`` is
``attn1.to_q``/``to_k``/``to_v`` (thirds), the cross-attention's ``kv_proj`` is ``attn2.to_k``/
``to_v`` (halves) (:class:`~lorahot.formats.table.Split`); the final adaLN projection's
``(shift, scale)`` rows are swapped to diffusers' ``(scale, shift)``
(:class:`~lorahot.formats.table.Reorder`). Every other module is an alias as that conversion
renames it (``attn1.out_proj`` -> ``attn1.to_out.0``, ``attn2.q_proj`` -> ``attn2.to_q``,
``mlp.fc1``/``fc2`` -> ``ff.net.0.proj``/``ff.net.2``, ``default_modulation.1`` ->
``norm1.linear``, ``pooler.*`` -> ``time_extra_emb.pooler.*``, ``t_embedder.mlp.0``/``2`` ->
``time_extra_emb.timestep_embedder.linear_1``/``2``, ``extra_embedder.0``/``2`` ->
``time_extra_emb.extra_embedder.linear_1``/``2``, ``mlp_t5.0``/``2`` -> ``text_embedder.linear_1``/
``2``, ``x_embedder.proj`` -> ``pos_embed.proj``, ``final_layer.linear`` -> ``proj_out``);
``skip_linear`` keeps its name. A model in the original names takes the keys as they are.

The attention pool's projections (``pooler.q_proj``, which Tencent's ``q_proj`` target takes too)
are aliased to ``time_extra_emb.pooler.*``, but the pool (diffusers' and Tencent's) computes with
their weights directly, never calling them, so inject refuses them as targets and these namings
refuse their keys by name, saying so (``strict=False`` skips them): ComfyUI and a PEFT merge fold
them into the weights, which no LoRA layer reproduces. The explanation is
:data:`lorahot.formats.table.ATTENTION_POOL`, which every naming gives the pool's keys in diffusers'
own names (``time_extra_emb.pooler.q_proj``: :data:`~lorahot.formats.table.REFUSED_POOL`).

LyCORIS factors and diffs load in merged mode, as in ComfyUI naming; a fused module's is cut by
the rows of its ``ΔW``. The attentions' query/key LayerNorms are aliased as the conversion renames
them (``attn1.q_norm`` -> ``attn1.norm_q``; ``skip_norm`` keeps its name), so a ``.diff`` folds into
diffusers' norm. The conversion moves a block's other norms (``norm1`` into ``norm1.norm``, where
diffusers' ``norm1`` is the module that holds it; ``norm2`` and ``norm3`` swapped, names both
models have): their deltas are refused by name (``strict=False`` skips them) rather than folded
into another module.
"""

from __future__ import annotations

import re

from lorahot.formats import kohya
from lorahot.formats.flux import FINAL_ADALN, qkv_split
from lorahot.formats.table import (
    ATTENTION_POOL,
    ORIGINAL_PREFIXES,
    REFUSED_MERGEABLE,
    KeyFormat,
    Reorder,
    Split,
    lora_rules,
    lycoris_rules,
)
from lorahot.formats.table import NAME_START as _START

__all__ = ["FORMAT", "KOHYA", "SPLITS"]

#: PEFT's wrapper, in front of the original names in Tencent's own LoRA files
_PEFT = "base_model.model."

#: block module (after ``blocks.N.``) -> diffusers' (after ``blocks.N.``)
_BLOCK = {
    "attn1.out_proj": "attn1.to_out.0",
    "attn2.q_proj": "attn2.to_q",
    "attn2.out_proj": "attn2.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "default_modulation.1": "norm1.linear",
    # the attentions' query/key LayerNorms
    "attn1.q_norm": "attn1.norm_q",
    "attn1.k_norm": "attn1.norm_k",
    "attn2.q_norm": "attn2.norm_q",
    "attn2.k_norm": "attn2.norm_k",
}
#: modules outside the blocks
_OUTSIDE = {
    "pooler.q_proj": "time_extra_emb.pooler.q_proj",
    "pooler.k_proj": "time_extra_emb.pooler.k_proj",
    "pooler.v_proj": "time_extra_emb.pooler.v_proj",
    "pooler.c_proj": "time_extra_emb.pooler.c_proj",
    "t_embedder.mlp.0": "time_extra_emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "time_extra_emb.timestep_embedder.linear_2",
    "extra_embedder.0": "time_extra_emb.extra_embedder.linear_1",
    "extra_embedder.2": "time_extra_emb.extra_embedder.linear_2",
    "mlp_t5.0": "text_embedder.linear_1",
    "mlp_t5.2": "text_embedder.linear_2",
    "x_embedder.proj": "pos_embed.proj",
    "final_layer.linear": "proj_out",
}

_ALIASES: tuple[tuple[str, str], ...] = (
    *((rf"{_START}blocks\.(\d+)\.{re.escape(k)}$", rf"blocks.\1.{v}") for k, v in _BLOCK.items()),
    *((rf"{_START}{re.escape(k)}$", v) for k, v in _OUTSIDE.items()),
)

#: the fused and re-ordered modules of the original model, in its names
SPLITS: tuple[Split | Reorder, ...] = (
    qkv_split(r"blocks\.(?P<n>\d+)\.attn1\.Wqkv", "blocks", ("attn1.to_q", "attn1.to_k", "attn1.to_v")),
    qkv_split(r"blocks\.(?P<n>\d+)\.attn2\.kv_proj", "blocks", ("attn2.to_k", "attn2.to_v")),
    FINAL_ADALN,
)

#: keys these namings refuse: deltas of a block's three LayerNorms (in either spelling), and what
#: every naming that reads LyCORIS factors refuses
_REFUSED: tuple[tuple[str, str], ...] = (
    (
        r"(?:^|[._])blocks[._]\d+[._]norm[123]\.(?:diff|diff_b|w_norm|b_norm)$",
        "a delta of a block's norm1, norm2 or norm3, which diffusers' Hunyuan-DiT conversion moves: norm1 into "
        "norm1.norm (diffusers' norm1 is the AdaLayerNormShift that holds it), and norm2 and norm3 swapped (the "
        "original norm2 is diffusers' norm3, its norm3 diffusers' norm2), so the key's own name would fold it into "
        "another module; lorahot does not place these deltas: load with strict=False to skip it",
    ),
    (r"(?:^|[._])pooler[._][qkvc]_proj\.", ATTENTION_POOL),  # Tencent's names; diffusers' in every naming
    *REFUSED_MERGEABLE,
)

#: a block module only the original model has, or a module outside the blocks only it names so
_MODULE = (
    r"(?:blocks\.\d+\.(?:attn1\.(?:Wqkv|out_proj)|attn2\.(?:q_proj|kv_proj|out_proj)|default_modulation\.1)"
    r"|mlp_t5\.[02]|extra_embedder\.[02])"
)

FORMAT = KeyFormat(
    name="hunyuan-dit",
    rules=(*lora_rules(), *lycoris_rules(r"(?P<module>.+)")),  # LyCORIS as in ComfyUI naming (merged mode)
    prefixes=(_PEFT, *ORIGINAL_PREFIXES),
    aliases=_ALIASES,
    refuse=_REFUSED,
    marker=rf"^(?:{re.escape(_PEFT)}|(?:model\.)?diffusion_model\.|transformer\.|net\.)?{_MODULE}\.",
    splits=SPLITS,
    example="base_model.model.blocks.0.attn1.Wqkv.lora_A.weight",
)

#: kohya's underscore names of the original modules -> the dotted ones (``lora_unet_`` kept:
#: ``prefix="lora_unet"`` selects them, and the resolver drops it)
_KOHYA_TO_DOTTED: tuple[tuple[str, str], ...] = (
    (r"^lora_unet_blocks_(\d+)_(attn[12])_(Wqkv|q_proj|kv_proj|out_proj|q_norm|k_norm)$", r"lora_unet_blocks.\1.\2.\3"),
    (r"^lora_unet_blocks_(\d+)_mlp_(fc1|fc2)$", r"lora_unet_blocks.\1.mlp.\2"),
    (r"^lora_unet_blocks_(\d+)_default_modulation_1$", r"lora_unet_blocks.\1.default_modulation.1"),
    (r"^lora_unet_blocks_(\d+)_(skip_linear|skip_norm|norm[123])$", r"lora_unet_blocks.\1.\2"),
    (r"^lora_unet_pooler_([qkvc]_proj)$", r"lora_unet_pooler.\1"),
    (r"^lora_unet_t_embedder_mlp_(0|2)$", r"lora_unet_t_embedder.mlp.\1"),
    (r"^lora_unet_(extra_embedder|mlp_t5)_(0|2)$", r"lora_unet_\1.\2"),
    (r"^lora_unet_x_embedder_proj$", "lora_unet_x_embedder.proj"),
    (r"^lora_unet_final_layer_linear$", "lora_unet_final_layer.linear"),
    (r"^lora_unet_final_layer_adaLN_modulation_1$", "lora_unet_final_layer.adaLN_modulation.1"),
)

KOHYA = kohya.spelling(
    "hunyuan-dit-kohya",
    renames=_KOHYA_TO_DOTTED,
    aliases=_ALIASES,
    refuse=_REFUSED,
    marker=r"^lora_unet_(?:blocks_\d+_(?:attn1_(?:Wqkv|out_proj)|attn2_(?:q_proj|kv_proj|out_proj)|default_modulation_1)"
    r"|mlp_t5_[02]|extra_embedder_[02])\.",
    splits=SPLITS,
    lycoris=True,
    example="lora_unet_blocks_0_attn1_Wqkv.lora_down.weight",
)
