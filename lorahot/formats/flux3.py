"""Flux.3 naming: adapters trained on the original Flux.3 module names
(``diffusion_model.single_blocks.0.q_proj.lora_A.weight``, or ``.lora_down``/``.lora_up``, with
``.alpha``; also under ``transformer.`` or ``net.``, or with no prefix, as OneTrainer saves them), for
a diffusers-named ``Flux3Transformer2DModel``. ``flux3-kohya`` is the kohya spelling of the same
names (``lora_unet_single_blocks_0_q_proj.lora_down.weight``, OneTrainer's kohya output), detected
before Flux.1's kohya naming, whose marker (``lora_unet_single_blocks_N_``) it shares.

The blocks' projections are aliases, as diffusers' Flux.3 conversion renames them: ``q_proj`` /
``k_proj`` / ``v_proj`` -> ``attn.to_q`` / ``to_k`` / ``to_v``, ``attn_out`` -> ``attn.to_out.0``,
``mlp_in`` / ``mlp_out`` -> ``ff.linear_in`` / ``ff.linear_out``, in ``content_mode_blocks``
(diffusers' ``mode_blocks``), ``txt_mode_blocks`` and ``single_blocks``
(``single_transformer_blocks``). The modules outside the blocks keep their names. Nothing is
fused. A ``.alpha`` is read as ``alpha / rank``, as ComfyUI reads it. Detected before Flux.1's
BFL naming, whose marker (``single_blocks.N.``) these files share.

A block's query and key norms (``norm.query_norm`` / ``norm.key_norm``, also keyed by their
parameter, ``.scale``, as ComfyUI keys a ``.diff``) are aliased as diffusers' conversion renames
them (``attn.norm_q`` / ``attn.norm_k``): an RMSNorm over the head size scaled by one ``[head_dim]``
weight in both, so a ``.diff`` folds into diffusers' norm in merged mode, the norm among the targets.
A block's ``pre_norm`` is diffusers' ``norm``, a LayerNorm without a weight in both: a delta of it
is refused, naming the norm (:func:`lorahot.resolve.keys.resolve_all`).
"""

from __future__ import annotations

import re

from lorahot.formats import kohya
from lorahot.formats.table import DOTTED_START as _START
from lorahot.formats.table import (
    ORIGINAL_HEAD,
    ORIGINAL_PREFIXES,
    REFUSED_MERGEABLE,
    KeyFormat,
    lora_rules,
    lycoris_rules,
)

__all__ = ["FORMAT", "KOHYA"]

#: original block list -> diffusers'; the original's blocks may sit under a stream name (``.image``)
_BLOCKS = {
    "content_mode_blocks": "mode_blocks",
    "txt_mode_blocks": "txt_mode_blocks",
    "single_blocks": "single_transformer_blocks",
}
#: a block's projection -> diffusers' (after the block's ``N.``)
_LEAVES = {
    "q_proj": "attn.to_q",
    "k_proj": "attn.to_k",
    "v_proj": "attn.to_v",
    "attn_out": "attn.to_out.0",
    "mlp_in": "ff.linear_in",
    "mlp_out": "ff.linear_out",
}

#: a block's query/key RMSNorm -> diffusers' (after the block's ``N.``): one ``[head_dim]`` weight
#: shared by the heads in both (the original's ``scale``), with or without the parameter's name
_NORMS = {
    r"norm\.query_norm(?:\.scale)?": "attn.norm_q",
    r"norm\.key_norm(?:\.scale)?": "attn.norm_k",
    # the LayerNorm before the attention and MLP, without a weight in both: a delta of it is refused as such
    r"pre_norm": "norm",
}

_ALIASES: tuple[tuple[str, str], ...] = tuple(
    (rf"{_START}{re.escape(block)}\.((?:[A-Za-z_]\w*\.)?\d+)\.{leaf}$", rf"{target}.\1.{to}")
    for block, target in _BLOCKS.items()
    for leaf, to in (*((re.escape(k), v) for k, v in _LEAVES.items()), *_NORMS.items())
)

#: a block projection in the original names: what tells the naming apart
_MODULE = rf"(?:{'|'.join(_BLOCKS)})\.(?:[A-Za-z_]\w*\.)?\d+\.(?:{'|'.join(_LEAVES)})"

FORMAT = KeyFormat(
    name="flux3",
    rules=(*lora_rules(), *lycoris_rules(r"(?P<module>.+)")),  # LyCORIS as in ComfyUI naming (merged mode)
    prefixes=ORIGINAL_PREFIXES,
    refuse=REFUSED_MERGEABLE,
    marker=ORIGINAL_HEAD + _MODULE + r"\.",
    aliases=_ALIASES,
    example="diffusion_model.single_blocks.0.q_proj.lora_A.weight",
)

KOHYA = kohya.of_original(
    FORMAT, "flux3-kohya", module=_MODULE, example="lora_unet_single_blocks_0_q_proj.lora_down.weight"
)
