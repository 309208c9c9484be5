"""Anima naming: adapters trained on the original module names of Anima's Cosmos-Predict2 transformer
(``diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight``, or ``.lora_down``/``.lora_up``, with
``.alpha``; also under ``transformer.`` or ``net.``, the Cosmos checkpoint's root, which OneTrainer's
files keep, or with no prefix), for a diffusers-named ``CosmosTransformer3DModel``.

Every module is an alias, as diffusers' Anima conversion renames it: in a block
``self_attn.q_proj`` -> ``attn1.to_q`` (``output_proj`` -> ``to_out.0``), ``cross_attn`` ->
``attn2``, ``mlp.layer1``/``layer2`` -> ``ff.net.0.proj``/``ff.net.2``, the three adaLN
modulations ``adaln_modulation_{self_attn,cross_attn,mlp}.{1,2}`` -> ``norm{1,2,3}.linear_{1,2}``;
outside them ``x_embedder.proj.1`` -> ``patch_embed.proj``, ``t_embedder.1`` ->
``time_embed.t_embedder``, ``final_layer.linear`` -> ``proj_out`` and
``final_layer.adaln_modulation.{1,2}`` -> ``norm_out.linear_{1,2}``. Nothing is fused. A ``.alpha``
is read as ``alpha / rank``, as ComfyUI reads it.

The norms with a weight are aliased too (``self_attn.q_norm`` -> ``attn1.norm_q``, ``cross_attn.k_norm``
-> ``attn2.norm_k``, ``t_embedding_norm`` -> ``time_embed.norm``): RMSNorms with a weight of the same
shape in both, so a ``.diff`` (ComfyUI's LoRA extraction) folds into diffusers' norm in merged mode,
the norm among the targets. Refused by name (``strict=False`` skips them): deltas of the weightless
norms, a block's ``layer_norm_self_attn`` / ``layer_norm_cross_attn`` / ``layer_norm_mlp`` and
``final_layer.layer_norm``.

Keys under ``diffusion_model.llm_adapter.`` (any prefix of the original names) adapt Anima's text
conditioner, another component in diffusers (``AnimaTextConditioner``, an Anima pipeline's
``text_conditioner``): the prefix routes them to that component, whose module paths follow it
unrenamed, as diffusers' Anima loader sends them (:data:`lorahot.resolve.keys.ROOT_PREFIXES`).
Its modules share the transformer's original names (``llm_adapter.blocks.0.self_attn.q_proj``),
so they never match the transformer's layers: a runtime without that component refuses them
naming it, or skips them with ``strict=False``.

``anima-kohya`` is sd-scripts' spelling of the same names (``networks/lora_anima.py``, and
OneTrainer's kohya output): ``lora_unet_blocks_0_self_attn_q_proj.lora_down.weight`` with
``.alpha`` (OneTrainer's own under ``lora_transformer_``), its Qwen3 text encoder's modules under
``lora_te_``; placed as this naming places them (sd-scripts' own conversion for ComfyUI writes the
same names under ``diffusion_model.``), ``lora_unet_llm_adapter_`` routed as ``llm_adapter.`` is.
"""

from __future__ import annotations

import re

from lorahot.formats import kohya
from lorahot.formats.table import DOTTED_START as _START
from lorahot.formats.table import (
    NAME_START,
    ORIGINAL_HEAD,
    ORIGINAL_PREFIXES,
    REFUSED_MERGEABLE,
    KeyFormat,
    lora_rules,
    lycoris_rules,
)

__all__ = ["FORMAT", "KOHYA"]

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
    # the attentions' query/key RMSNorms ([head_dim] weights in both)
    **{f"{o}.{n}_norm": f"{c}.norm_{n}" for o, c in (("self_attn", "attn1"), ("cross_attn", "attn2")) for n in "qk"},
}
#: modules outside the blocks
_OUTSIDE = {
    "x_embedder.proj.1": "patch_embed.proj",
    "t_embedder.1.linear_1": "time_embed.t_embedder.linear_1",
    "t_embedder.1.linear_2": "time_embed.t_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaln_modulation.1": "norm_out.linear_1",
    "final_layer.adaln_modulation.2": "norm_out.linear_2",
    "t_embedding_norm": "time_embed.norm",
}

#: deltas of the norms without a weight, in either spelling
_WEIGHTLESS = (
    r"(?:^|[._])(?:blocks[._]\d+[._]layer_norm_(?:self_attn|cross_attn|mlp)|final_layer[._]layer_norm)"
    r"\.(?:diff|diff_b)$",
    "a delta of a normalization layer that has no weight or bias in Anima (a block's layer_norm_self_attn, "
    "layer_norm_cross_attn and layer_norm_mlp, the final layer's layer_norm: elementwise_affine=False, as "
    "diffusers' norm1.norm, ..., norm_out.norm), so there is nothing to add it to; load with strict=False to "
    "skip it",
)


def _aliases(start: str) -> tuple[tuple[str, str], ...]:
    """The diffusers name of each original module, found after ``start`` (where a name may begin)."""
    return (
        *((rf"{start}blocks\.(\d+)\.{re.escape(k)}$", rf"transformer_blocks.\1.{v}") for k, v in _BLOCK.items()),
        *((rf"{start}{re.escape(k)}$", v) for k, v in _OUTSIDE.items()),
    )


_ALIASES = _aliases(_START)

FORMAT = KeyFormat(
    name="anima",
    rules=(*lora_rules(), *lycoris_rules(r"(?P<module>.+)")),  # LyCORIS as in ComfyUI naming (merged mode)
    prefixes=ORIGINAL_PREFIXES,
    refuse=(_WEIGHTLESS, *REFUSED_MERGEABLE),
    marker=(
        ORIGINAL_HEAD + r"blocks\.\d+\.(?:(?:self_attn|cross_attn)\.(?:q_proj|k_proj|v_proj|output_proj)"
        r"|mlp\.layer[12]|adaln_modulation_(?:self_attn|cross_attn|mlp)\.[12])\."
    ),
    aliases=_ALIASES,
    example="diffusion_model.blocks.0.self_attn.q_proj.lora_A.weight",
)

#: sd-scripts' underscore names -> the dotted original ones (the component prefix, ``lora_unet_``
#: or OneTrainer's ``lora_transformer_``, kept for ``prefix=`` and the resolver)
_KOHYA_TO_DOTTED: tuple[tuple[str, str], ...] = (
    (
        r"^(lora_(?:unet|transformer)_)blocks_(\d+)_(self_attn|cross_attn)_(q_proj|k_proj|v_proj|output_proj)$",
        r"\1blocks.\2.\3.\4",
    ),
    (r"^(lora_(?:unet|transformer)_)blocks_(\d+)_mlp_(layer[12])$", r"\1blocks.\2.mlp.\3"),
    (r"^(lora_(?:unet|transformer)_)blocks_(\d+)_(self_attn|cross_attn)_([qk]_norm)$", r"\1blocks.\2.\3.\4"),
    (
        r"^(lora_(?:unet|transformer)_)blocks_(\d+)_(adaln_modulation_(?:self_attn|cross_attn|mlp))_([12])$",
        r"\1blocks.\2.\3.\4",
    ),
    (r"^(lora_(?:unet|transformer)_)x_embedder_proj_1$", r"\1x_embedder.proj.1"),
    (r"^(lora_(?:unet|transformer)_)t_embedder_1_(linear_[12])$", r"\1t_embedder.1.\2"),
    (r"^(lora_(?:unet|transformer)_)final_layer_linear$", r"\1final_layer.linear"),
    (r"^(lora_(?:unet|transformer)_)final_layer_adaln_modulation_([12])$", r"\1final_layer.adaln_modulation.\2"),
)

KOHYA = kohya.spelling(
    "anima-kohya",
    renames=_KOHYA_TO_DOTTED,
    aliases=_aliases(NAME_START),
    refuse=(_WEIGHTLESS, *REFUSED_MERGEABLE),
    marker=(
        r"^lora_(?:unet|transformer)_blocks_\d+_(?:(?:self_attn|cross_attn)_(?:q_proj|k_proj|v_proj|output_proj)"
        r"|mlp_layer[12]|adaln_modulation_(?:self_attn|cross_attn|mlp)_[12])\."
    ),
    lycoris=True,
    example="lora_unet_blocks_0_self_attn_q_proj.lora_down.weight",
)
