"""LTX-2 naming: adapters trained on the original LTX-2 module names
(``diffusion_model.transformer_blocks.0.attn1.to_q.lora_A.weight``, or ``.lora_down``/``.lora_up``,
with ``.alpha``; also under ``transformer.`` or ``net.``, or with no prefix, as OneTrainer saves them),
for a diffusers-named ``LTX2VideoTransformer3DModel``. ``ltx2-kohya`` is the kohya spelling of the
same names (``lora_unet_patchify_proj.lora_down.weight``, OneTrainer's kohya output). Outside
``diffusion_model.`` a file is told apart by the original names no diffusers model has: PixArt's
diffusers names include ``adaln_single``.

The blocks keep their names in diffusers (``attn1``, ``audio_attn2``, ``audio_to_video_attn``,
``ff.net.0.proj``), so a file that adapts only them loads as ComfyUI naming. What this naming adds
are the modules outside the blocks that diffusers renamed: ``patchify_proj`` -> ``proj_in``,
``adaln_single`` -> ``time_embed``, the audio-video cross-attention modulations
(``av_ca_video_scale_shift_adaln_single`` -> ``av_cross_attn_video_scale_shift``, ...) and
LTX-2.3's prompt modulations (``prompt_adaln_single`` -> ``prompt_adaln``), each an alias taken only
where the model has its target. A ``.alpha`` is read as ``alpha / rank``, as ComfyUI reads it.

The attentions' query and key norms (``attn1.q_norm`` -> ``attn1.norm_q``, ``audio_to_video_attn.k_norm``
-> ``audio_to_video_attn.norm_k``, ...), RMSNorms with a weight over all heads in both, are aliased as
diffusers' conversion renames them, so a ``.diff`` (ComfyUI's LoRA extraction) folds into diffusers'
norm in merged mode, the norm among the targets; a file of blocks with such a delta is this naming
under ``diffusion_model.``. The blocks' other norms compute without a weight in both models.

Keys under ``text_embedding_projection.`` adapt the text connectors' input projection, another
component in diffusers (``LTX2TextConnectors``, a pipeline's ``connectors``): the prefix routes them
to that component (:mod:`lorahot.resolve.components`), where ``aggregate_embed`` is ``text_proj_in``
(LTX-2.3's ``video_aggregate_embed`` is ``video_text_proj_in``), as diffusers' conversion renames
them. The checkpoint's text connectors' transformers, ``diffusion_model.video_embeddings_connector.
transformer_1d_blocks.N`` (``audio_`` too; any prefix of the original names), go there too, as
``video_connector.transformer_blocks.N``: diffusers' checkpoint conversion moves them to the
connectors (its LoRA conversion sends them under ``transformer.``, where no module has their name,
and its loader drops them; ComfyUI adapts them in the transformer it holds them in). A runtime
without that component refuses them naming it, or skips them with ``strict=False``.
"""

from __future__ import annotations

import re

from lorahot.formats import kohya
from lorahot.formats.table import (
    DIFFUSION_MODEL_HEAD,
    ORIGINAL_HEAD,
    ORIGINAL_PREFIXES,
    REFUSED_MERGEABLE,
    KeyFormat,
    lora_rules,
    lycoris_rules,
)
from lorahot.formats.table import DOTTED_START as _START

__all__ = ["FORMAT", "KOHYA"]

#: original module (its leading part) -> diffusers'
_OUTSIDE = {
    "patchify_proj": "proj_in",
    "audio_patchify_proj": "audio_proj_in",
    "adaln_single": "time_embed",
    "audio_adaln_single": "audio_time_embed",
    "prompt_adaln_single": "prompt_adaln",
    "audio_prompt_adaln_single": "audio_prompt_adaln",
    "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
    "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
    "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
    "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
}


#: the attentions of a block, whose query/key RMSNorms (a weight over all heads, the same in both)
#: diffusers' conversion renames ``q_norm`` -> ``norm_q``, ``k_norm`` -> ``norm_k``
_ATTENTIONS = r"(?:audio_)?attn[12]|audio_to_video_attn|video_to_audio_attn"

_ALIASES: tuple[tuple[str, str], ...] = (
    *((rf"{_START}{re.escape(k)}(\..+)?$", rf"{v}\1") for k, v in _OUTSIDE.items()),
    (rf"{_START}(transformer_blocks\.\d+\.(?:{_ATTENTIONS}))\.([qk])_norm$", r"\1.norm_\2"),
    # the text connectors' input projections (under text_embedding_projection., stripped)
    (r"^((?:video_|audio_)?)aggregate_embed$", r"\1text_proj_in"),
    # the connectors' transformers (routed to the connectors), as diffusers' checkpoint conversion renames them
    (
        rf"{_START}(video|audio)_embeddings_connector\.transformer_1d_blocks\.(\d+\..+)$",
        r"\1_connector.transformer_blocks.\2",
    ),
)

#: the original modules no diffusers model has (PixArt's own ``adaln_single`` tells an LTX-2 file
#: apart under ``diffusion_model.`` only), the text connectors' transformers among them
_MODULE = (
    rf"(?:{'|'.join(map(re.escape, (k for k in _OUTSIDE if k != 'adaln_single')))}"
    r"|(?:video|audio)_embeddings_connector)"
)

#: the prefix of the text connectors' keys (diffusers' ``connectors`` component)
_CONNECTORS = r"text_embedding_projection\."

#: a block attention's query/key norm: its name tells a file of blocks apart (diffusers' is norm_q)
_QK_NORM = rf"transformer_blocks\.\d+\.(?:{_ATTENTIONS})\.[qk]_norm"

#: the modules of the blocks, named as in diffusers (which its marker leaves to ComfyUI's naming),
#: either spelling: the layers LTX-2's blocks have (its attentions' projections and norms, its
#: feed-forwards' ``net.0.proj``/``net.2``, its norms), whole names, not any model's
#: ``transformer_blocks.N`` (Flux's ``attn.to_q``, ``ff_context``, ``norm1_context``, Qwen-Image's ``img_mlp``)
_BLOCKS = (
    rf"^transformer_blocks[._]\d+[._](?:(?:{_ATTENTIONS})[._](?:to_[qkv]|to_out[._]0|norm_[qk]|[qk]_norm|to_gate_logits)"
    r"|(?:audio_)?ff[._]net[._](?:0[._]proj|2)|(?:audio_)?norm[123]|(?:audio_to_video|video_to_audio)_norm)$"
)

FORMAT = KeyFormat(
    name="ltx2",
    rules=(*lora_rules(), *lycoris_rules(r"(?P<module>.+)")),  # LyCORIS as in ComfyUI naming (merged mode)
    prefixes=(*ORIGINAL_PREFIXES, "text_embedding_projection."),
    refuse=REFUSED_MERGEABLE,
    marker=rf"{DIFFUSION_MODEL_HEAD}(?:adaln_single|{_QK_NORM})\.|{ORIGINAL_HEAD}{_MODULE}\.|^{_CONNECTORS}",
    aliases=_ALIASES,
    example="diffusion_model.adaln_single.linear.lora_A.weight",
    shared=_BLOCKS,
)

KOHYA = kohya.of_original(
    FORMAT, "ltx2-kohya", module=rf"(?:{_MODULE}|{_QK_NORM})", example="lora_unet_patchify_proj.lora_down.weight"
)
