"""MiniMax-H3 namings: adapters trained on the original MiniMax-H3 module names, for a
diffusers-named ``MiniMaxH3Transformer3DModel``.

- ``minimax-h3``: ``diffusion_model.blocks.0.attn.qkv_proj.lora_A.weight`` (ai-toolkit), the same
  names without a prefix (the reference implementation's and ComfyUI's), ``.lora_down``/``.lora_up``
  and ``.alpha`` (scale ``alpha / r``); a file without ``.alpha`` tensors whose safetensors header
  records ``alpha`` (lightx2v's) has every module trained at that alpha, as diffusers reads it
  (beside LyCORIS modules, for which no loader defines the entry, refused).
- ``minimax-h3-musubi``: musubi-tuner's kohya spelling, ``lora_unet_blocks_0_attn_qkv_proj``.

The original blocks (``blocks.N``, and the text refiner's ``token_refiner.blocks.N``) fuse what
diffusers keeps apart: ``attn.qkv_proj`` is :class:`~lorahot.formats.table.Split` ``1 : 1 : 1``
onto ``attn.to_q``/``to_k``/``to_v``; ``mlp.fc1``, a SwiGLU's ``[gate; value]``, lands on
``ff.net.0.proj``, whose rows are ``[value; gate]``, its halves swapped
(:class:`~lorahot.formats.table.Reorder`). Every other module is an alias, as diffusers' MiniMax-H3
conversion renames it (``attn.out_proj`` -> ``attn.to_out.0``, ``mlp.fc2`` -> ``ff.net.2``,
``video_patch_proj`` -> ``proj_in``, ``final_layer.video_out`` -> ``proj_out``, ...). So are the
norms, RMSNorms with a weight of the same shape in both (``attn.q_norm`` -> ``attn.norm_q``, a
block's ``norm1``/``norm2``, ``final_layer.norm`` -> ``norm_out.norm``, ``token_refiner.final_norm``
as it is): a ``.diff`` (ComfyUI's LoRA extraction) folds into diffusers' norm in merged mode, the
norm among the targets. ``minimax-h3-musubi`` reads LyCORIS factors and these deltas as
``minimax-h3`` does.

- ``minimax-h3-diffsynth``: DiffSynth-Studio's files, PEFT's ``.lora_A.default.weight`` over these
  names. DiffSynth trains the raw checkpoint's ``qkv_proj``, whose rows interleave q, k and v per
  head (``[head 0: q, k, v; head 1: ...]``); its split gathers each part's rows from every head at
  the head size of the model's attention module (its ``head_dim``,
  :attr:`~lorahot.formats.table.Split.per_head`) before the cut, where diffusers assumes 128. A
  model that states no head size refuses the module, naming its shapes. Told apart by the
  ``.default.`` of every key; a file that mixes it with other spellings reads as ``minimax-h3``,
  which refuses a ``.default.`` ``qkv_proj`` by name.
"""

from __future__ import annotations

import dataclasses
import re

from lorahot.formats import kohya
from lorahot.formats.table import COMPONENT_HEAD as _HEAD
from lorahot.formats.table import (
    ORIGINAL_HEAD,
    ORIGINAL_PREFIXES,
    REFUSED,
    REFUSED_MERGEABLE,
    KeyFormat,
    Reorder,
    Rule,
    Split,
    lycoris_rules,
)

__all__ = ["FORMAT", "MUSUBI", "DIFFSYNTH", "SPLITS", "HEADER_ALPHA"]

#: the safetensors header entry some files (lightx2v's) record their one network alpha in
HEADER_ALPHA = "alpha"

#: the original block lists -> diffusers' (``\1``: the block's index); a main block's name is not
#: the tail of a refiner block's
_BLOCKS = {
    r"(?<!token_refiner[._])blocks\.(\d+)": r"transformer_blocks.\1",
    r"token_refiner\.blocks\.(\d+)": r"token_refiner.refiner_blocks.\1",
}
#: block module (after the block) -> diffusers' (the fused qkv_proj and fc1 are SPLITS); the norms
#: are RMSNorms with a weight of the same shape in both
_BLOCK = {
    "attn.out_proj": "attn.to_out.0",
    "mlp.fc2": "ff.net.2",
    "adaln_proj.linear": "adaln_proj.linear",
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.q_norm": "attn.norm_q",
    "attn.k_norm": "attn.norm_k",
}
#: modules outside the blocks
_OUTSIDE = {
    "video_patch_proj": "proj_in",
    "audio_patch_proj": "audio_proj_in",
    "condition_proj": "context_embedder",
    "time_embedder.proj_in": "time_embedder.linear_1",
    "time_embedder.proj_out": "time_embedder.linear_2",
    "final_layer.adaln_proj.linear": "norm_out.linear",
    "final_layer.video_out": "proj_out",
    "final_layer.audio_out": "audio_proj_out",
    "final_layer.norm": "norm_out.norm",
}

#: where an original name starts: at the key's start, after a ``.``, or after musubi-tuner's
#: ``lora_unet_`` (its renames keep it); never inside a name (``blocks`` in diffusers'
#: ``transformer_blocks``, whose ``transformer_blocks.N.adaln_proj.linear`` is the model's own)
_START = r"(?:(?<![^.])|(?<=^lora_unet_))"

_ALIASES: tuple[tuple[str, str], ...] = (
    *(
        (rf"{_START}{block}\.{re.escape(k)}$", rf"{target}.{v}")
        for block, target in _BLOCKS.items()
        for k, v in _BLOCK.items()
    ),
    *((rf"{_START}{re.escape(k)}$", v) for k, v in _OUTSIDE.items()),
)

_QKV = ("to_q", "to_k", "to_v")
#: :data:`_BLOCKS` with the block's index as group ``n``, for the splits
_SPLIT_BLOCKS = (
    (r"(?<!token_refiner[._])blocks\.(?P<n>\d+)", r"transformer_blocks.\g<n>"),
    (r"token_refiner\.blocks\.(?P<n>\d+)", r"token_refiner.refiner_blocks.\g<n>"),
)

#: the fused attention input (q, k, v of as many heads each), and the SwiGLU's ``[gate; value]``
#: onto diffusers' ``[value; gate]``
SPLITS: tuple[Split | Reorder, ...] = tuple(
    rule
    for block, target in _SPLIT_BLOCKS
    for rule in (
        Split(_HEAD + block + r"\.attn\.qkv_proj", tuple((rf"\g<head>{target}.attn.{n}", 1) for n in _QKV)),
        Reorder(_HEAD + block + r"\.mlp\.fc1", rf"\g<head>{target}.ff.net.0.proj", (1, 1), (1, 0)),
    )
)

#: :data:`SPLITS` with DiffSynth-Studio's per-head interleaved ``qkv_proj``
DIFFSYNTH_SPLITS: tuple[Split | Reorder, ...] = tuple(
    dataclasses.replace(rule, per_head=True) if isinstance(rule, Split) else rule for rule in SPLITS
)

#: a block module of these names, after an optional prefix: what tells a file of them apart (a
#: file of the modules outside the blocks alone, ``time_embedder.proj_in``, ..., is not: other
#: models share such names)
_MARKER = (
    ORIGINAL_HEAD + r"(?:token_refiner\.)?blocks\.\d+\."
    r"(?:attn\.(?:qkv|out)_proj|mlp\.fc[12]|adaln_proj\.linear)\."
)

#: DiffSynth-Studio's fused qkv_proj, whose rows interleave q, k and v per head
_DIFFSYNTH_QKV = (
    r"(?:^|\.)blocks\.\d+\.attn\.qkv_proj\.lora_[AB]\.default\.weight$",
    "DiffSynth-Studio's LoRA of MiniMax-H3's fused qkv_proj (PEFT's .default. spelling), trained on the raw "
    "checkpoint's rows, which interleave q, k and v per head, in a file whose other keys are not all of that "
    "spelling: read as minimax-h3 naming, whose qkv_proj rows are q, then k, then v, it would land cut the wrong way; "
    "save the whole file in DiffSynth's spelling (minimax-h3-diffsynth gathers the heads at the model's head size), or "
    "load with strict=False to skip the module",
)

FORMAT = KeyFormat(
    name="minimax-h3",
    rules=(
        Rule(r"(?P<module>.+)\.(?:lora_A|lora_down)(?:\.default)?\.weight", "A"),
        Rule(r"(?P<module>.+)\.(?:lora_B|lora_up)(?:\.default)?\.weight", "B"),
        Rule(r"(?P<module>.+)\.lora\.down\.weight", "A"),  # ComfyUI's dotted roles
        Rule(r"(?P<module>.+)\.lora\.up\.weight", "B"),
        Rule(r"(?P<module>.+)\.alpha", "alpha"),
        *lycoris_rules(r"(?P<module>.+)"),  # LyCORIS as in ComfyUI naming (merged mode)
    ),
    prefixes=ORIGINAL_PREFIXES,
    refuse=(_DIFFSYNTH_QKV, *REFUSED_MERGEABLE),
    marker=_MARKER,
    aliases=_ALIASES,
    splits=SPLITS,
    example="diffusion_model.blocks.0.attn.qkv_proj.lora_A.weight",
    header_alpha=HEADER_ALPHA,
)

DIFFSYNTH = KeyFormat(
    name="minimax-h3-diffsynth",
    rules=(
        Rule(r"(?P<module>.+)\.lora_A\.default\.weight", "A"),
        Rule(r"(?P<module>.+)\.lora_B\.default\.weight", "B"),
        Rule(r"(?P<module>.+)\.alpha", "alpha"),
    ),
    prefixes=ORIGINAL_PREFIXES,
    refuse=REFUSED,
    marker=_MARKER + r"lora_[AB]\.default\.weight$",
    aliases=_ALIASES,
    splits=DIFFSYNTH_SPLITS,
    example="blocks.0.attn.qkv_proj.lora_A.default.weight",
    header_alpha=HEADER_ALPHA,
)

#: musubi-tuner's underscore names -> the dotted original ones (``lora_unet_`` kept for ``prefix=``
#: and the resolver)
_MUSUBI_TO_DOTTED: tuple[tuple[str, str], ...] = (
    (r"^lora_unet_(token_refiner_)?blocks_(\d+)_attn_(qkv|out)_proj$", r"lora_unet_\1blocks.\2.attn.\3_proj"),
    (r"^lora_unet_(token_refiner_)?blocks_(\d+)_mlp_fc([12])$", r"lora_unet_\1blocks.\2.mlp.fc\3"),
    (r"^lora_unet_(token_refiner_)?blocks_(\d+)_adaln_proj_linear$", r"lora_unet_\1blocks.\2.adaln_proj.linear"),
    (r"^lora_unet_(token_refiner_)?blocks_(\d+)_(norm[12])$", r"lora_unet_\1blocks.\2.\3"),
    (r"^lora_unet_(token_refiner_)?blocks_(\d+)_attn_([qk]_norm)$", r"lora_unet_\1blocks.\2.attn.\3"),
    (r"^lora_unet_token_refiner_blocks\.", "lora_unet_token_refiner.blocks."),
    (r"^lora_unet_time_embedder_proj_(in|out)$", r"lora_unet_time_embedder.proj_\1"),
    (r"^lora_unet_final_layer_adaln_proj_linear$", "lora_unet_final_layer.adaln_proj.linear"),
    (r"^lora_unet_final_layer_(video|audio)_out$", r"lora_unet_final_layer.\1_out"),
    (r"^lora_unet_final_layer_norm$", "lora_unet_final_layer.norm"),
    (r"^lora_unet_token_refiner_final_norm$", "lora_unet_token_refiner.final_norm"),
)

MUSUBI = dataclasses.replace(
    kohya.spelling(
        "minimax-h3-musubi",
        renames=_MUSUBI_TO_DOTTED,
        aliases=_ALIASES,
        refuse=REFUSED_MERGEABLE,
        marker=r"^lora_unet_(?:token_refiner_)?blocks_\d+_(?:attn_(?:qkv|out)_proj|mlp_fc[12]|adaln_proj_linear)\.",
        splits=SPLITS,
        example="lora_unet_blocks_0_attn_qkv_proj.lora_down.weight",
        lycoris=True,
    ),
    header_alpha=HEADER_ALPHA,
)
