"""Krea 2 naming: adapters trained on the original Krea 2 module names
(``diffusion_model.blocks.0.attn.wq.lora_A.weight``, as the reference trainer and ComfyUI write
them; also under ``transformer.`` or ``net.``, or with no prefix, as OneTrainer saves them), for a
diffusers-named ``Krea2Transformer2DModel``. ``krea2-kohya`` is the kohya spelling of the same names
(``lora_unet_blocks_0_attn_wq.lora_down.weight``: musubi-tuner's, OneTrainer's kohya output).

AI-Toolkit's spelling under PEFT's ``base_model.model.`` is not this naming's: such keys are
PEFT naming (a PEFT adapter of a model whose own modules are ``blocks.N.attn.wq`` loads as PEFT
with its ``adapter_config.json``), which takes this naming's module aliases
(:data:`MODULE_ALIASES`) exactly, where the file's name is no layer of the model, so on a
diffusers-named model they land as diffusers' Krea 2 loader lands them; only in a file that is
Krea 2's (:data:`FILE_ALIASES`: a module key that only Krea 2 has, a block module or ``tmlp`` /
``tproj`` / ``txtmlp`` / ``txtfusion``), as diffusers converts them in its Krea 2 loader alone:
``first`` and ``last.linear`` are any model's names, and another model's ``first`` is no
``img_in``.

Every module is an alias, as diffusers' Krea 2 conversion renames it: in a block (``blocks.N``,
diffusers' ``transformer_blocks.N``, and the text fusion's ``txtfusion.layerwise_blocks.N`` /
``refiner_blocks.N``) ``attn.wq`` / ``wk`` / ``wv`` / ``wo`` / ``gate`` -> ``attn.to_q`` / ``to_k`` /
``to_v`` / ``to_out.0`` / ``to_gate`` and ``mlp.gate`` / ``up`` / ``down`` -> ``ff.gate`` / ``up`` /
``down``; outside them AI-Toolkit's short names of the standalone modules (``first`` -> ``img_in``,
``last.linear`` -> ``final_layer.linear``, ``tmlp.0`` / ``tmlp.2`` -> ``time_embed.linear_1`` /
``linear_2``, ``tproj.1`` -> ``time_mod_proj``, ``txtmlp.1`` / ``txtmlp.3`` -> ``txt_in.linear_1`` /
``linear_2``, ``txtfusion.projector`` -> ``text_fusion.projector``). Nothing is fused. A ``.alpha``
is read as ``alpha / rank`` (diffusers' conversion refuses a file that has one).

So are the norms (``prenorm`` / ``postnorm`` -> ``norm1`` / ``norm2``, ``attn.qknorm.qnorm`` / ``knorm``
-> ``attn.norm_q`` / ``norm_k``, ``txtmlp.0`` -> ``txt_in.norm``, ``last.norm`` -> ``final_layer.norm``;
with their parameter's name, ``.scale``, too): zero-centered RMSNorms (``1 + scale``) with a weight of
the same shape in both, so a ``.diff`` folds into diffusers' norm in merged mode, the norm among the
targets. Every norm of Krea 2 has a weight.
"""

from __future__ import annotations

import re

from lorahot.formats import kohya
from lorahot.formats.table import DOTTED_START as _START
from lorahot.formats.table import (
    ORIGINAL_HEAD,
    ORIGINAL_PREFIXES,
    REFUSED_MERGEABLE,
    FileAliases,
    KeyFormat,
    lora_rules,
    lycoris_rules,
)

__all__ = ["FORMAT", "KOHYA", "MODULE_ALIASES", "FILE_ALIASES"]

_ATTN = {"wq": "to_q", "wk": "to_k", "wv": "to_v", "wo": "to_out.0", "gate": "to_gate"}
_MLP = ("gate", "up", "down")

#: the original block lists -> diffusers' (``\\1``: the block's index)
_BLOCKS = {
    r"blocks\.(\d+)": r"transformer_blocks.\1",
    r"txtfusion\.layerwise_blocks\.(\d+)": r"text_fusion.layerwise_blocks.\1",
    r"txtfusion\.refiner_blocks\.(\d+)": r"text_fusion.refiner_blocks.\1",
}
#: AI-Toolkit's names of the modules outside the blocks -> diffusers'
_OUTSIDE = {
    "first": "img_in",
    "last.linear": "final_layer.linear",
    "tmlp.0": "time_embed.linear_1",
    "tmlp.2": "time_embed.linear_2",
    "tproj.1": "time_mod_proj",
    "txtmlp.1": "txt_in.linear_1",
    "txtmlp.3": "txt_in.linear_2",
    "txtfusion.projector": "text_fusion.projector",
}
#: a block's norms -> diffusers' (after the block); the same outside the blocks: Krea 2's
#: zero-centered RMSNorms (``1 + scale``) with a weight of the same shape and centering in both
_BLOCK_NORMS = {
    "prenorm": "norm1",
    "postnorm": "norm2",
    "attn.qknorm.qnorm": "attn.norm_q",
    "attn.qknorm.knorm": "attn.norm_k",
}
_OUTSIDE_NORMS = {"txtmlp.0": "txt_in.norm", "last.norm": "final_layer.norm"}
#: a norm's module key, or its parameter's (``.scale``, as ComfyUI keys a ``.diff``)
_SCALE = r"(?:\.scale)?$"


#: the aliases of the LoRA-bearing modules, which PEFT naming takes too, exactly, for AI-Toolkit's
#: ``base_model.model.`` files (read by diffusers' Krea 2 loader)
MODULE_ALIASES: tuple[tuple[str, str], ...] = (
    *(
        (rf"{_START}{block}\.attn\.{o}$", rf"{target}.attn.{c}")
        for block, target in _BLOCKS.items()
        for o, c in _ATTN.items()
    ),
    *((rf"{_START}{block}\.mlp\.{o}$", rf"{target}.ff.{o}") for block, target in _BLOCKS.items() for o in _MLP),
    *((rf"{_START}{re.escape(k)}$", v) for k, v in _OUTSIDE.items()),
)

_ALIASES: tuple[tuple[str, str], ...] = (
    *MODULE_ALIASES,
    *(
        (rf"{_START}{block}\.{re.escape(o)}{_SCALE}", rf"{target}.{c}")
        for block, target in _BLOCKS.items()
        for o, c in _BLOCK_NORMS.items()
    ),
    *((rf"{_START}{re.escape(k)}{_SCALE}", v) for k, v in _OUTSIDE_NORMS.items()),
)

#: a block module in the original names: what tells the naming apart
_MODULE = (
    r"(?:txtfusion\.(?:layerwise|refiner)_blocks\.\d+\.|blocks\.\d+\.)"
    rf"(?:attn\.(?:{'|'.join(_ATTN)})|mlp\.(?:{'|'.join(_MLP)}))"
)

#: the modules outside the blocks whose names only Krea 2 has (``first`` and ``last.linear`` are any
#: model's)
_OWN_OUTSIDE = tuple(k for k in _OUTSIDE if k not in ("first", "last.linear"))

#: the layers only diffusers' Krea 2 transformer has (``Krea2Transformer2DModel``)
_OWN_LAYERS = r"(?:^|\.)(?:text_fusion\.projector|time_mod_proj)$"

#: :data:`MODULE_ALIASES` for PEFT's and ComfyUI's namings, taken only by a file one of whose module
#: keys is a name only Krea 2 has (a block module, or a standalone module but ``first`` and
#: ``last.linear``) or on a Krea 2 model (:data:`_OWN_LAYERS`): diffusers' Krea 2 loader converts a
#: ``base_model.model.`` or ``diffusion_model.`` file of ``first`` or ``last.linear`` alone onto
#: ``img_in`` / ``final_layer.linear``; no other model's loader renames them
FILE_ALIASES = FileAliases(
    "Krea 2", rf"^(?:{_MODULE}|{'|'.join(map(re.escape, _OWN_OUTSIDE))})$", MODULE_ALIASES, model_marker=_OWN_LAYERS
)

FORMAT = KeyFormat(
    name="krea2",
    rules=(*lora_rules(), *lycoris_rules(r"(?P<module>.+)")),  # LyCORIS as in ComfyUI naming (merged mode)
    prefixes=ORIGINAL_PREFIXES,
    refuse=REFUSED_MERGEABLE,
    marker=ORIGINAL_HEAD + _MODULE + r"\.",
    aliases=_ALIASES,
    example="diffusion_model.blocks.0.attn.wq.lora_A.weight",
)

KOHYA = kohya.of_original(FORMAT, "krea2-kohya", module=_MODULE, example="lora_unet_blocks_0_attn_wq.lora_down.weight")
