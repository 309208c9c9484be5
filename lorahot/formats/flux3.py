"""Flux.3 naming: adapters trained on the original Flux.3 module names
(``diffusion_model.single_blocks.0.q_proj.lora_A.weight``, or ``.lora_down``/``.lora_up``, with
``.alpha``), for a diffusers-named ``Flux3Transformer2DModel``.

The blocks' projections are aliases, as diffusers' Flux.3 conversion renames them: ``q_proj`` /
``k_proj`` / ``v_proj`` -> ``attn.to_q`` / ``to_k`` / ``to_v``, ``attn_out`` -> ``attn.to_out.0``,
``mlp_in`` / ``mlp_out`` -> ``ff.linear_in`` / ``ff.linear_out``, in ``content_mode_blocks``
(diffusers' ``mode_blocks``), ``txt_mode_blocks`` and ``single_blocks``
(``single_transformer_blocks``). The modules outside the blocks keep their names. Nothing is
fused. A ``.alpha`` is read as ``alpha / rank``, as ComfyUI reads it. Detected before Flux.1's
BFL naming, whose marker (``single_blocks.N.``) these files share.
"""

from __future__ import annotations

import re

from lorahot.formats.table import (
    DIFFUSION_MODEL,
    DIFFUSION_MODEL_HEAD,
    REFUSED_MERGEABLE,
    KeyFormat,
    lora_rules,
    lycoris_rules,
)
from lorahot.formats.table import DOTTED_START as _START

__all__ = ["FORMAT"]

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

_ALIASES: tuple[tuple[str, str], ...] = tuple(
    (rf"{_START}{re.escape(block)}\.((?:[A-Za-z_]\w*\.)?\d+)\.{re.escape(leaf)}$", rf"{target}.\1.{to}")
    for block, target in _BLOCKS.items()
    for leaf, to in _LEAVES.items()
)

FORMAT = KeyFormat(
    name="flux3",
    rules=(*lora_rules(), *lycoris_rules(r"(?P<module>.+)")),  # LyCORIS as in ComfyUI naming (merged mode)
    prefixes=DIFFUSION_MODEL,
    require_prefix=True,
    refuse=REFUSED_MERGEABLE,
    marker=(
        DIFFUSION_MODEL_HEAD + rf"(?:{'|'.join(_BLOCKS)})\.(?:[A-Za-z_]\w*\.)?\d+\."
        rf"(?:{'|'.join(_LEAVES)})\."
    ),
    aliases=_ALIASES,
    example="diffusion_model.single_blocks.0.q_proj.lora_A.weight",
)
