"""ComfyUI namings: ``diffusion_model.<module>`` with ``.lora_A``/``.lora_B``,
``.lora.down``/``.lora.up`` or ``.lora_down``/``.lora_up`` (and ``.alpha``). SD/SDXL files use the
original LDM block names (``input_blocks.4.1...``), which the resolver maps to diffusers block names.
Text-encoder modules are ``text_encoders.clip_l.transformer.<the encoder's module names>`` (also
``clip_g``, ``t5xxl``), which go to a pipeline runtime's ``text_encoder``, ``text_encoder_2`` and
``text_encoder_3``.

Flux.1's, Flux.2's and Chroma's original module names are placed as in the ``flux-bfl`` naming
(:data:`lorahot.formats.flux.ALIASES`, :data:`lorahot.formats.flux.SPLITS`): a file of which no
key is in a block (``final_layer.linear``, ``img_in``, ``time_in.in_layer``, ...; which SD3,
HunyuanVideo and Hunyuan-DiT name alike) has no ``double_blocks.N.`` key to tell it apart, so it
is read in this naming, and its modules land on the diffusers layers of those names (the final
layer's ``adaLN_modulation.1`` on ``norm_out.linear``, its ``(shift, scale)`` halves swapped),
where the file's name is no layer of the model and the diffusers name is one, exactly; the
same swap and layers as diffusers' conversions of those models. SD3's modules outside the blocks
(``x_embedder.proj``, ``t_embedder.mlp.0``, ``y_embedder.mlp.2``, ...:
:data:`lorahot.formats.sd3.OUTSIDE_ALIASES`, ``pos_embed.proj``, ``time_text_embed.*``) and Lumina2's
(:data:`lorahot.formats.lumina2.OUTSIDE_ALIASES`) are placed so too. Each model's set is taken only in
a file that is that model's, one of its keys a name only that model has (``time_in.in_layer``,
``y_embedder.mlp.0``, ``cap_embedder.1``: :data:`lorahot.formats.flux.FILE_ALIASES`,
:data:`lorahot.formats.sd3.FILE_ALIASES`, :data:`lorahot.formats.lumina2.FILE_ALIASES`), as a model's
original names mean its own layers: Qwen-Image's ``img_in`` is no Lumina2 ``x_embedder``, SD3's
``t_embedder.mlp.0`` no Flux timestep embedder (on which diffusers' loaders refuse or ignore them).
"""

from __future__ import annotations

from lorahot.formats import flux, krea2, lumina2, sd3
from lorahot.formats.table import (
    COMFYUI_TEXT_ENCODERS,
    DEFAULT_ADAPTER,
    DIFFUSION_MODEL,
    REFUSED_MERGEABLE,
    KeyFormat,
    Rule,
    lycoris_rules,
)

__all__ = ["FORMAT"]

FORMAT = KeyFormat(
    name="comfyui",
    rules=(
        Rule(r"(?P<module>.+)\.lora_A(?:\.[^.]+)?\.weight", "A"),
        Rule(r"(?P<module>.+)\.lora_B(?:\.[^.]+)?\.weight", "B"),
        Rule(r"(?P<module>.+)\.lora\.down\.weight", "A"),
        Rule(r"(?P<module>.+)\.lora\.up\.weight", "B"),
        Rule(rf"(?P<module>.+)\.lora_down{DEFAULT_ADAPTER}\.weight", "A"),  # kohya's roles under ComfyUI's prefix
        Rule(rf"(?P<module>.+)\.lora_up{DEFAULT_ADAPTER}\.weight", "B"),
        Rule(r"(?P<module>.+)\.alpha", "alpha"),
        *lycoris_rules(r"(?P<module>.+)"),
    ),
    prefixes=(*DIFFUSION_MODEL, *COMFYUI_TEXT_ENCODERS),
    require_prefix=True,
    refuse=REFUSED_MERGEABLE,
    # each model's original names outside the blocks only in a file that is that model's
    # (or on the model whose loader converts them in a file of them alone: Flux.2's, Krea 2's)
    file_aliases=(flux.FILE_ALIASES, flux.ON_FLUX2, sd3.FILE_ALIASES, lumina2.FILE_ALIASES, krea2.FILE_ALIASES),
    aliases_exact=True,  # only a layer of exactly the diffusers name: no SD/SDXL key changes meaning
    splits=flux.BLOCK_SPLITS,  # the final adaLN's swap with Flux's and SD3's aliases, in a file of theirs
    example="diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.lora_A.weight",
)
