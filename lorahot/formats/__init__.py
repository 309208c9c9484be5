"""Adapter namings lorahot reads, one declarative :class:`KeyFormat` per naming.

Detection tries :data:`FORMATS` in order and takes the first whose table accounts for every
key; more specific namings (required prefixes, distinct roles) come before PEFT's. The verdict
is memoized by a digest of the key list (a file loaded again skips the scans), never by the
keys themselves.
"""

from __future__ import annotations

from lorahot.formats import (
    anima,
    comfyui,
    diffusers,
    flux,
    flux3,
    hunyuan,
    hunyuan_dit,
    kohya,
    krea2,
    ltx2,
    lumina2,
    minimax_h3,
    peft,
    sd3,
    wan,
)
from lorahot.formats.table import KeyFormat, Reorder, Rule, Split, group_keys
from lorahot.memo import BoundedMemo, digest

__all__ = ["FORMATS", "KeyFormat", "Reorder", "Rule", "Split", "detect", "format_named", "group_keys"]

#: Every known naming, in detection order.
FORMATS: tuple[KeyFormat, ...] = (
    krea2.KOHYA,  # the kohya spellings built from a naming of original names: markers of their own names
    ltx2.KOHYA,
    flux3.KOHYA,  # before flux-kohya, whose marker (lora_unet_single_blocks_N_) it shares
    hunyuan.MUSUBI,  # before flux-kohya: the same prefix and block names, spelled apart (img_mlp_fc1)
    flux.KOHYA,  # before kohya: original Flux block names, which only its renames and splits place
    flux.KOHYA_OUTSIDE,  # before kohya: a flux-kohya file without a block key (its rules read no other module)
    hunyuan_dit.KOHYA,  # before minimax-h3-musubi, whose marker (blocks_N_mlp_fc1) its keys match, and kohya
    minimax_h3.MUSUBI,  # before kohya: original MiniMax-H3 block names (blocks_N_attn_qkv_proj)
    anima.KOHYA,  # before wan-musubi, whose marker (blocks_N_self_attn_) its keys match, and kohya
    wan.MUSUBI,  # before kohya: original Wan block names
    sd3.KOHYA,  # before kohya: original SD3 block names (joint_blocks), which only its renames and splits place
    sd3.KOHYA_OUTSIDE,  # before kohya, after flux.KOHYA_OUTSIDE (a file of the final layer alone is either's)
    lumina2.KOHYA,  # before kohya: original Lumina2 / Z-Image attention names (attention_qkv, attention_out)
    lumina2.KOHYA_OUTSIDE,  # before kohya, after sd3.KOHYA_OUTSIDE (a file of t_embedder/final_layer alone is SD3's)
    kohya.FORMAT,
    flux.XLABS,  # before diffusers-old, whose processor keys look alike
    flux.FAL,  # before PEFT, whose keys look alike
    hunyuan_dit.FORMAT,  # before minimax-h3 (whose marker, blocks.N.mlp.fc1, its keys match) and PEFT
    minimax_h3.DIFFSYNTH,  # before minimax-h3, which reads .default. too, and PEFT
    minimax_h3.FORMAT,  # before PEFT (bare keys, PEFT's .default.) and Wan (blocks.N.)
    krea2.FORMAT,  # before PEFT (AI-Toolkit's base_model.model.) and Wan (blocks.N.)
    flux3.FORMAT,  # before flux-bfl and HunyuanVideo, whose marker (single_blocks.N.) it shares
    hunyuan.FORMAT,  # before flux-bfl: the same block names, spelled apart (img_attn_qkv)
    flux.BFL,
    sd3.FORMAT,  # before ComfyUI, diffusers and PEFT, whose diffusion_model., transformer. and bare keys look alike
    lumina2.FORMAT,  # before ComfyUI, whose diffusion_model. keys look alike
    anima.FORMAT,  # before Wan, whose block names it shares (blocks.N.self_attn)
    wan.FORMAT,  # before ComfyUI, whose diffusion_model. keys look alike
    ltx2.FORMAT,  # before ComfyUI, whose diffusion_model. keys look alike
    comfyui.FORMAT,
    diffusers.FORMAT,
    diffusers.OLD_FORMAT,
    peft.FORMAT,
)


#: digest of a key list -> its format (about 300 bytes an entry)
_DETECTED: BoundedMemo[bytes, KeyFormat | None] = BoundedMemo(1 << 20, lambda k, v: 64)


def detect(keys: list[str]) -> KeyFormat | None:
    """The first format in :data:`FORMATS` that accounts for every key, or None (memoized)."""
    return _DETECTED.get(digest(keys), _scan, keys)


def _scan(keys: list[str]) -> KeyFormat | None:
    return next((f for f in FORMATS if f.detect(keys)), None)


def format_named(name: str) -> KeyFormat:
    """The format called ``name``; PEFT's for names lorahot does not know (user-built adapters)."""
    return next((f for f in FORMATS if f.name == name), peft.FORMAT)
