"""diffusers namings: the current one (PEFT roles under a pipeline component prefix) and the
older ones (``.lora.down``/``.lora.up``, ``to_q_lora.down``, ``lora_linear_layer.down``).

Both may carry network alphas as ``<module>.alpha`` scalars, and the current one a
``lora_adapter_metadata`` entry in the safetensors header (PEFT config fields per component,
``"unet.r"``, ``"unet.lora_alpha"``, ...).

A module key in a model's original names (Flux.1's, Flux.2's and Chroma's, one layer each:
:data:`lorahot.formats.flux.ALIASES`) lands on the diffusers layer of that module where the file's
name is no layer of the model and the diffusers name is one, exactly, in a file that is Flux's (as in
PEFT naming, :data:`lorahot.formats.flux.FILE_ALIASES`: diffusers' own loaders rename no original
name under ``transformer.``, so another model's lone ``transformer.img_in``, Qwen-Image's own name,
is no ``x_embedder``): OneTrainer
writes Chroma's approximator as ``transformer.distilled_guidance_layer.layers.0.in_layer`` beside
diffusers' names for everything else, where diffusers' ``ChromaTransformer2DModel`` has
``linear_1`` (``out_layer``: ``linear_2``). The final layer's ``final_layer.adaLN_modulation.1``
lands on ``norm_out.linear`` with its ``(shift, scale)`` halves swapped
(:data:`lorahot.formats.flux.FINAL_ADALN`) in such a file, as in the ``flux-bfl`` naming: a file in
Flux's original names under ``transformer.`` with no block module is read in this naming, as is one
of SD3's modules outside the blocks (:data:`lorahot.formats.sd3.OUTSIDE_ALIASES`: ``x_embedder.proj``
on ``pos_embed.proj``, ``t_embedder.mlp.0`` on ``time_text_embed.timestep_embedder.linear_1``, ...)
or of Lumina2's (:data:`lorahot.formats.lumina2.OUTSIDE_ALIASES`: ``t_embedder.mlp.0`` on
``time_caption_embed.timestep_embedder.linear_1``, ``final_layer.linear`` on ``norm_out.linear_2``),
each set only in a file that is that model's (:data:`lorahot.formats.sd3.FILE_ALIASES`: a
``y_embedder.mlp.N`` key; :data:`lorahot.formats.lumina2.FILE_ALIASES`: ``cap_embedder.N``, a block
module). No diffusers loader renames any of them in another model's file (it loads such a key
nowhere), so another model's ``t_embedder.mlp.0`` (DiT's, PixArt's) or ``final_layer.*`` (Cosmos's,
HiDream's) is refused as matching no layer rather than placed on a layer of these names.

The old naming's attention-processor keys (``attn1.processor.to_q_lora``) land on ``to_q`` /
``to_out.0``, as diffusers' UNet loader reads them, and under a text-encoder component
(``text_encoder.text_model.encoder.layers.0.self_attn.to_q_lora``) on CLIP's ``q_proj`` / ``out_proj``,
as its text-encoder loader does; no other key of this naming is renamed onto CLIP's names (a text
encoder's ``self_attn.to_q.lora.down``, which diffusers leaves unloaded, is refused).

The old naming, which reads ComfyUI's dotted ``lora.down`` / ``lora.up`` roles on keys without
ComfyUI's prefixes, places Lumina2's, Z-Image's and Ideogram 4's original block modules as PEFT
naming does (``layers.0.attention.qkv`` cut, ``attention.out`` aliased), as diffusers' Z-Image
loader reads such a file.
"""

from __future__ import annotations

from lorahot.formats import flux, lumina2, sd3
from lorahot.formats.table import (
    DEFAULT_ADAPTER,
    EXTRA_RULES,
    HADAMARD_KRONECKER,
    REFUSED,
    REFUSED_BUT_EXTRAS_AND_FACTORS,
    KeyFormat,
    Rule,
)

__all__ = ["FORMAT", "OLD_FORMAT", "COMPONENTS", "METADATA_KEY"]

#: Pipeline components diffusers puts in front of module paths.
COMPONENTS = ("unet.", "transformer.", "text_encoder.", "text_encoder_2.", "text_encoder_3.", "prior.", "controlnet.")
#: The safetensors header entry holding PEFT config fields per component.
METADATA_KEY = "lora_adapter_metadata"

_ALPHA = Rule(r"(?P<module>.+)\.alpha", "alpha")
#: the text-encoder components, whose old processor keys (``to_q_lora``) name CLIP's ``q_proj``
_TEXT_ENCODERS = r"text_encoder(?:_[23])?\."

FORMAT = KeyFormat(
    name="diffusers",
    rules=(
        Rule(r"(?P<module>.+)\.lora_A(?:\.[^.]+)?\.weight", "A"),
        Rule(r"(?P<module>.+)\.lora_B(?:\.[^.]+)?\.weight", "B"),
        *EXTRA_RULES,  # DoRA magnitudes and LoRA biases, as diffusers' PEFT integration saves them
        _ALPHA,
        # the same keys spelled lora_down / lora_up, which diffusers' Flux converter renames
        Rule(rf"(?P<module>.+)\.lora_down{DEFAULT_ADAPTER}\.weight", "A"),
        Rule(rf"(?P<module>.+)\.lora_up{DEFAULT_ADAPTER}\.weight", "B"),
        # LoHa and LoKr factors under a component prefix (transformer.<module>.lokr_w1, with or
        # without .alpha, as ComfyUI reads them for diffusers-named models): merged mode, LyCORIS'
        # alpha / r, as bare in PEFT naming
        HADAMARD_KRONECKER,
    ),
    prefixes=COMPONENTS,
    require_prefix=True,
    refuse=REFUSED_BUT_EXTRAS_AND_FACTORS,
    # each model's original names outside the blocks only in a file that is that model's
    file_aliases=(flux.FILE_ALIASES, sd3.FILE_ALIASES, lumina2.FILE_ALIASES),
    aliases_exact=True,  # only a layer of exactly the diffusers name, never one it ends in
    example="unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight",
)

OLD_FORMAT = KeyFormat(
    name="diffusers-old",
    rules=(
        Rule(r"(?P<module>.+)\.(?:lora|lora_linear_layer)\.down\.weight", "A"),
        Rule(r"(?P<module>.+)\.(?:lora|lora_linear_layer)\.up\.weight", "B"),
        Rule(r"(?P<module>.+_lora)\.down\.weight", "A"),  # attn processors: to_q_lora.down
        Rule(r"(?P<module>.+_lora)\.up\.weight", "B"),
        Rule(r"(?P<module>.+)\.lora_A\.weight", "A"),  # converters leave non-attention keys so
        Rule(r"(?P<module>.+)\.lora_B\.weight", "B"),
        _ALPHA,
    ),
    prefixes=COMPONENTS,
    renames=(
        (r"\.processor(?=\.)", ""),  # attn1.processor.to_q_lora -> attn1.to_q
        # a text encoder's processor keys name CLIP's projections, as diffusers' text-encoder loader reads
        # them (its UNet loader: to_q, to_out.0); no other spelling of theirs is renamed
        (rf"^({_TEXT_ENCODERS}.*)\.to_out_lora$", r"\1.out_proj"),
        (rf"^({_TEXT_ENCODERS}.*)\.to_([qkv])_lora$", r"\1.\2_proj"),
        (r"\.to_out_lora$", ".to_out.0"),
        (r"\.(to_q|to_k|to_v)_lora$", r".\1"),
    ),
    refuse=REFUSED,
    roles=("lora.down", "lora.up"),
    # .lora.down is ComfyUI's spelling too: under ComfyUI's prefixes, and on kohya's module keys (which
    # ComfyUI reads it for), it marks no key of this naming
    marker=(
        r"(^(?!(?:model\.)?diffusion_model\.|text_encoders\.|(?:lora_[a-z0-9]+|lycoris|oft_unet)_[^.]+\.lora\.)"
        r".*\.lora\.(down|up)|_lora\.(down|up)|\.lora_linear_layer\.)"
    ),
    aliases=lumina2.BLOCK_ALIASES,  # ComfyUI's dotted roles on bare Lumina2 / Z-Image / Ideogram 4 names
    aliases_claim=False,  # fallbacks that ComfyUI's files of those models take too
    splits=lumina2.SPLITS,
    example="unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora.down.weight",
)
