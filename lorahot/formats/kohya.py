"""kohya / sd-scripts naming: ``lora_unet_<module with _ for .>.lora_down.weight`` (and LyCORIS factors).

``lora_down`` is A, ``lora_up`` is B (also with PEFT's adapter name, ``lora_down.default.weight``,
and in ComfyUI's dotted roles, ``lora.down.weight`` / ``lora.up.weight``, which ComfyUI reads for
any module key and diffusers' Z-Image loader for these names, as Z-Image "Anime-Z" files write them;
for LoCon the conv kernel is in ``lora_down`` and ``lora_up`` is 1x1), and ``<name>.alpha`` is the
module's alpha; without it alpha equals the rank. Module names are the model's names with every
``.`` turned into ``_``; the resolver finds them by building the underscore form of each injected
layer's name.

LyCORIS's own network wrapper (``lycoris.create_lycoris`` on any model) saves the same
spelling under the prefix ``lycoris_`` (``lycoris_0.lora_down.weight``, ``lycoris_blocks_0_attn_q.hada_w1_a``),
and sd-scripts' own OFT network (``networks/oft.py``) under ``oft_unet_``
(``oft_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.oft_blocks``, ``.alpha``).

sd-scripts' Stable Cascade trainer names Stage C's modules ``lora_prior_unet_`` + their names in
its Stage C (ComfyUI's, whose ``model_lora_keys_unet`` maps that prefix), and the CLIP text
encoder's ``lora_prior_te_``. Those are diffusers' ``StableCascadeUNet`` names but for the
attention, which diffusers' checkpoint conversion renames: ``attention.attn.to_q`` (``to_k``,
``to_v``) -> ``attention.to_q``, ``attention.attn.out_proj`` -> ``attention.to_out.0``
(:data:`CASCADE_ALIASES`, taken where the model has no layer of the file's name).
"""

from __future__ import annotations

import dataclasses

from lorahot.formats.table import (
    DEFAULT_ADAPTER,
    REFUSED_IA3,
    REFUSED_MERGEABLE,
    KeyFormat,
    Reorder,
    Rule,
    Split,
    lycoris_rules,
    underscored,
)

__all__ = [
    "FORMAT",
    "COMPONENTS",
    "CASCADE",
    "CASCADE_ALIASES",
    "RULES",
    "KOHYA_OFT",
    "spelling",
    "of_original",
    "outside",
]

#: kohya's component prefixes (``lora_te_`` is SD1's single text encoder).
COMPONENTS = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te3_", "lora_te_", "lora_transformer_")

#: a kohya module key: its component prefix and the module's underscore name
MODULE = r"(?P<module>lora_[a-z0-9]+_[^.]+)"
#: kohya's A and B roles: its own (with PEFT's adapter name), or ComfyUI's dotted ones
_DOWN = rf"(?:lora_down{DEFAULT_ADAPTER}|lora\.down)"
_UP = rf"(?:lora_up{DEFAULT_ADAPTER}|lora\.up)"
#: kohya's A, B and alpha (also the rules of the kohya spellings of other models' names)
RULES = (
    Rule(rf"{MODULE}\.{_DOWN}\.weight", "A"),
    Rule(rf"{MODULE}\.{_UP}\.weight", "B"),
    Rule(rf"{MODULE}\.alpha", "alpha"),
)

#: kohya's module key, or LyCORIS's wrapper's (``lycoris_<module with _ for .>``), or sd-scripts'
#: OFT network's (``oft_unet_<module with _ for .>``)
_MODULE = r"(?P<module>(?:lora_[a-z0-9]+|lycoris|oft_unet)_[^.]+)"
#: the prefix of sd-scripts' OFT network (its U-Net modules only)
KOHYA_OFT = "oft_unet_"
#: sd-scripts' Stable Cascade prefixes: Stage C (a pipeline's ``prior``) and its CLIP text encoder
CASCADE = ("lora_prior_unet_", "lora_prior_te_")
#: Stage C's attention as sd-scripts and ComfyUI name it -> as diffusers' conversion renames it
CASCADE_ALIASES = (
    (r"(_attention)_attn_(to_[qkv])$", r"\1_\2"),
    (r"(_attention)_attn_out_proj$", r"\1_to_out_0"),
)

FORMAT = KeyFormat(
    name="kohya",
    rules=(
        Rule(rf"{_MODULE}\.{_DOWN}\.weight", "A"),
        Rule(rf"{_MODULE}\.{_UP}\.weight", "B"),
        Rule(rf"{_MODULE}\.alpha", "alpha"),
        *lycoris_rules(_MODULE),
        # LyCORIS' (IA)^3: a kohya module key names no model weight, so its .weight is the factor
        Rule(rf"{_MODULE}\.weight", "weight"),
        Rule(rf"{_MODULE}\.on_input", "on_input"),
    ),
    prefixes=(*COMPONENTS, *CASCADE, "lycoris_", KOHYA_OFT),
    require_prefix=True,
    separator="_",
    refuse=tuple(r for r in REFUSED_MERGEABLE if r is not REFUSED_IA3),
    aliases=CASCADE_ALIASES,
    roles=("lora_down", "lora_up"),
    example="lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight",
)


def spelling(
    name: str,
    *,
    marker: str,
    example: str,
    renames: tuple[tuple[str, str], ...] = (),
    aliases: tuple[tuple[str, str], ...] = (),
    refuse: tuple[tuple[str, str], ...] = (),
    splits: tuple[Split | Reorder, ...] = (),
    lycoris: bool = False,
    shared: str = "",
) -> KeyFormat:
    """The kohya spelling of another model's original module names (Flux's, HunyuanVideo's in
    musubi-tuner, SD3's, Wan's): kohya's A / B / alpha keys, component prefixes and ``_`` for
    ``.``; ``renames`` turn a key's underscores back into the original dotted names (keeping
    ``lora_unet_`` for ``prefix=`` and the resolver), ``marker`` tells the naming from plain
    kohya and from the others; ``lycoris`` reads LyCORIS factors too (merged mode), as plain kohya
    does (``refuse`` then leaves them out); ``shared`` as :attr:`KeyFormat.shared`."""
    return KeyFormat(
        name=name,
        rules=(*RULES, *lycoris_rules(MODULE)) if lycoris else RULES,
        prefixes=COMPONENTS,
        separator="_",
        renames=renames,
        refuse=refuse,
        marker=marker,
        aliases=aliases,
        splits=splits,
        roles=("lora_down", "lora_up"),
        example=example,
        shared=shared,
    )


def of_original(dotted: KeyFormat, name: str, *, module: str, example: str) -> KeyFormat:
    """The kohya spelling of ``dotted``, a naming of a model's original module names whose aliases
    place every module (nothing fused): ``lora_unet_`` (sd-scripts, musubi-tuner, OneTrainer) or
    ``lora_transformer_`` (OneTrainer's older models) + the original name with ``_`` for ``.``,
    kohya's A / B / ``.alpha``, LyCORIS factors in merged mode. ``module`` is the regex of the
    original modules that tell the naming apart (its marker's, dotted, without a prefix); the
    aliases are ``dotted``'s read over the underscore names (:func:`underscored`), their targets
    matched exactly or by their underscore form. A naming with fused modules needs its names
    turned back into dotted ones first (``renames`` of :func:`spelling`)."""
    if dotted.splits:
        raise ValueError(f"{dotted.name} has fused modules; spell its kohya naming with renames (spelling())")
    return spelling(
        name,
        marker=rf"^lora_(?:unet|transformer)_{underscored(module)}\.",
        example=example,
        aliases=tuple((underscored(p), r) for p, r in dotted.aliases),
        refuse=REFUSED_MERGEABLE,
        lycoris=True,
        shared=dotted.shared,
    )


def outside(spelled: KeyFormat, modules: str, *, example: str, marker: str | None = None) -> KeyFormat:
    """``spelled`` (a naming of :func:`spelling`) for a file with no key its marker knows, whose
    diffusion-model modules all lie outside the blocks: ``modules`` is the regex of those module
    keys (``lora_unet_final_layer_linear``), which the marker asks for one of (of ``marker``, a
    regex of some of them, where given). Its rules read only
    those and text-encoder modules, so a kohya file of any other module is never detected as it;
    it has ``spelled``'s name, renames, aliases and splits, so its keys resolve as ``spelled``'s
    (:func:`lorahot.formats.format_named`)."""
    module = rf"(?P<module>{modules}|lora_te[123]?_[^.]+)"
    return dataclasses.replace(
        spelled,
        rules=(
            Rule(rf"{module}\.{_DOWN}\.weight", "A"),
            Rule(rf"{module}\.{_UP}\.weight", "B"),
            Rule(rf"{module}\.alpha", "alpha"),
            *lycoris_rules(module),
        ),
        marker=rf"^(?:{modules if marker is None else marker})\.",
        example=example,
        outside=True,
    )
