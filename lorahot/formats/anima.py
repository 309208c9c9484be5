"""Anima naming: adapters trained on the original module names of Anima's Cosmos-Predict2 transformer
(``diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight``, or ``.lora_down``/``.lora_up``, with
``.alpha``), for a diffusers-named ``CosmosTransformer3DModel``.

Every module is an alias, as diffusers' Anima conversion renames it: in a block
``self_attn.q_proj`` -> ``attn1.to_q`` (``output_proj`` -> ``to_out.0``), ``cross_attn`` ->
``attn2``, ``mlp.layer1``/``layer2`` -> ``ff.net.0.proj``/``ff.net.2``, the three adaLN
modulations ``adaln_modulation_{self_attn,cross_attn,mlp}.{1,2}`` -> ``norm{1,2,3}.linear_{1,2}``;
outside them ``x_embedder.proj.1`` -> ``patch_embed.proj``, ``t_embedder.1`` ->
``time_embed.t_embedder``, ``final_layer.linear`` -> ``proj_out`` and
``final_layer.adaln_modulation.{1,2}`` -> ``norm_out.linear_{1,2}``. Nothing is fused. A ``.alpha``
is read as ``alpha / rank``, as ComfyUI reads it.

Keys under ``diffusion_model.llm_adapter.`` adapt Anima's text conditioner, another component in
diffusers, whose modules this naming does not place. Its modules share the transformer's names
(``llm_adapter.blocks.0.self_attn.q_proj``), so a name lookup that drops the unknown leading
segment would land them on the transformer's layers: they are refused by name, with the keys named,
or with ``strict=False`` skipped.
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

_ATTN = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "output_proj": "to_out.0"}

#: block module (after ``blocks.N.``) -> diffusers' (after ``transformer_blocks.N.``)
_BLOCK = {
    **{f"self_attn.{o}": f"attn1.{c}" for o, c in _ATTN.items()},
    **{f"cross_attn.{o}": f"attn2.{c}" for o, c in _ATTN.items()},
    "mlp.layer1": "ff.net.0.proj",
    "mlp.layer2": "ff.net.2",
    **{
        f"adaln_modulation_{part}.{i}": f"norm{n}.linear_{i}"
        for n, part in enumerate(("self_attn", "cross_attn", "mlp"), 1)
        for i in (1, 2)
    },
}
#: modules outside the blocks
_OUTSIDE = {
    "x_embedder.proj.1": "patch_embed.proj",
    "t_embedder.1.linear_1": "time_embed.t_embedder.linear_1",
    "t_embedder.1.linear_2": "time_embed.t_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaln_modulation.1": "norm_out.linear_1",
    "final_layer.adaln_modulation.2": "norm_out.linear_2",
}


_ALIASES: tuple[tuple[str, str], ...] = (
    *((rf"{_START}blocks\.(\d+)\.{re.escape(k)}$", rf"transformer_blocks.\1.{v}") for k, v in _BLOCK.items()),
    *((rf"{_START}{re.escape(k)}$", v) for k, v in _OUTSIDE.items()),
)

FORMAT = KeyFormat(
    name="anima",
    rules=(*lora_rules(), *lycoris_rules(r"(?P<module>.+)")),  # LyCORIS as in ComfyUI naming (merged mode)
    prefixes=DIFFUSION_MODEL,
    require_prefix=True,
    refuse=(
        (
            DIFFUSION_MODEL_HEAD + r"llm_adapter\.",
            "Anima's text conditioner (llm_adapter), another component, which this naming does not place (its "
            "module names are the transformer's); load with strict=False to skip its keys",
        ),
        *REFUSED_MERGEABLE,
    ),
    marker=(
        DIFFUSION_MODEL_HEAD + r"blocks\.\d+\.(?:(?:self_attn|cross_attn)\.(?:q_proj|k_proj|v_proj|output_proj)"
        r"|mlp\.layer[12]|adaln_modulation_(?:self_attn|cross_attn|mlp)\.[12])\."
    ),
    aliases=_ALIASES,
    example="diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight",
)
