"""PEFT naming: ``base_model.model.<module>.lora_A.weight`` and ``.lora_B.weight``.

Also the in-memory naming with the adapter name (``lora_A.default.weight``) and embeddings
(``lora_embedding_A`` ``[r, num]`` / ``lora_embedding_B`` ``[dim, r]``). Ranks and alphas
come from ``adapter_config.json``. For LoRA on ``embed_tokens``/``lm_head`` PEFT also saves the
base layer's weight (``<module>.base_layer.weight``, ``save_embedding_layers="auto"``); it is
read as the module's ``base_weight``. DoRA's ``<module>.lora_magnitude_vector`` and the bias of
``lora_B`` (``lora_B.bias``, ``lora_bias=True``) are read as the module's ``magnitude`` and ``bias``.

Model names without any prefix are read here too, as some trainers write them for diffusion
transformers (Qwen-Image): ``lora_down``/``lora_up`` for A and B, and ``<module>.alpha`` network
alphas, which diffusers' converters fold into A and B as ``alpha / r`` (an alpha a config also
states must agree with it).

LoHa and LoKr factors in the model's names (``transformer_blocks.0.attn.to_q.lokr_w1``, with
``.alpha``: SimpleTuner's LoKr files, which diffusers' Flux.2 and Z-Image loaders read) load in
merged mode, ``alpha / r`` as LyCORIS applies it; PEFT's own LoKr and LoHa adapters, whose
adapter_config.json names another ``peft_type``, are refused.

Attention projections spelled ``q_proj``/``k_proj``/``v_proj``/``o_proj`` are aliases of diffusers'
``to_q``/``to_k``/``to_v``/``to_out.0`` only in a file that is ACE-Step's (:data:`ACE_STEP`: some key is a
``q_proj`` or ``k_proj`` of its decoder, ``layers.N.self_attn`` or ``cross_attn``), taken only where the
file's name is no injected layer and the alias is one exactly (never after dropping a wrapper segment of the
key, which would bring a text encoder's ``encoder.layers.0.self_attn.q_proj`` onto a transformer's
``layers.0.self_attn.to_q``): ACE-Step's PEFT adapters name the original DiT's projections, which diffusers
renames in its ACE-Step loader alone; PEFT's injection and diffusers' other loaders place another model's
``transformer_blocks.0.attn.q_proj`` nowhere. The original names of Flux.1, Flux.2 and Chroma
(:data:`lorahot.formats.flux.ALIASES`, one layer each) are aliases in the same way, as in diffusers naming,
only in a file that is Flux's (:data:`lorahot.formats.flux.FILE_ALIASES`: some module key is a name only
Flux's original model has, ``time_in.in_layer``, a block module), as diffusers renames them in its Flux
loaders alone: another model's lone ``img_in`` (Qwen-Image's own name), ``txt_in`` or ``final_layer.linear``
is no ``x_embedder``, ``context_embedder`` or ``proj_out``; and the final layer's ``adaLN_modulation.1`` lands
on ``norm_out.linear`` with its halves swapped (:data:`lorahot.formats.flux.FINAL_ADALN`): a file in those
names without a prefix and with no block module is read in this naming. So are SD3's and Lumina2's modules
outside the blocks, each set only in a file that is that model's (:data:`lorahot.formats.sd3.FILE_ALIASES`: a
``y_embedder.mlp.N`` key; :data:`lorahot.formats.lumina2.FILE_ALIASES`: ``cap_embedder.N``, a block module),
as no diffusers loader renames them in another model's file: another model's ``t_embedder.mlp.0`` (DiT's,
PixArt's) or ``final_layer.*`` (Cosmos's) is no ``time_text_embed`` / ``time_caption_embed`` or ``norm_out``
layer; and Lumina2's, Z-Image's and Ideogram 4's original block modules
(:data:`lorahot.formats.lumina2.BLOCK_ALIASES`, :data:`lorahot.formats.lumina2.SPLITS`:
``layers.0.attention.qkv`` cut by the rows of the layers each model has, ``attention.out`` / ``attention.o``
onto its output projection), which the ``lumina2`` naming takes under a prefix only and diffusers' Ideogram 4
and Z-Image loaders read without one; and Krea 2's (:data:`lorahot.formats.krea2.MODULE_ALIASES`), as
AI-Toolkit writes them under ``base_model.model.`` and diffusers' Krea 2 loader reads them, only in a file
that is Krea 2's (:data:`lorahot.formats.krea2.FILE_ALIASES`: some module key is a name only Krea 2 has), as
diffusers converts them in its Krea 2 loader alone: a lone ``first`` of another model is no Krea 2 ``img_in``.
"""

from __future__ import annotations

from lorahot.formats import flux, krea2, lumina2, sd3
from lorahot.formats.table import (
    DEFAULT_ADAPTER,
    EXTRA_RULES,
    HADAMARD_KRONECKER,
    REFUSED_BUT_EXTRAS_AND_FACTORS,
    FileAliases,
    KeyFormat,
    Rule,
)

__all__ = ["ACE_STEP", "FORMAT", "NAME"]

NAME = "peft"
_ADAPTER = r"(?:\.[^.]+)?"  # optional adapter name: lora_A.default.weight

#: ACE-Step's original DiT names its attention projections as LLMs do (``layers.N.self_attn.q_proj``,
#: ``cross_attn.o_proj``), where diffusers' ``AceStepTransformer1DModel`` has ``to_q``/``to_k``/``to_v``/
#: ``to_out.0``. diffusers renames them in its ACE-Step loader alone, in a file with a ``q_proj`` or
#: ``k_proj`` key (a file of ``v_proj``/``o_proj`` alone it loads nowhere); no other loader, nor PEFT's
#: injection, renames a projection. Taken in a file with a key of ACE-Step's decoder projections,
#: ``layers.N.self_attn.q_proj`` / ``k_proj`` or ``cross_attn``'s: another model's lone
#: ``transformer_blocks.0.attn.q_proj`` is no ``attn.to_q``.
ACE_STEP = FileAliases(
    "ACE-Step",
    r"^layers\.\d+\.(?:self|cross)_attn\.[qk]_proj$",
    ((r"\.q_proj$", ".to_q"), (r"\.k_proj$", ".to_k"), (r"\.v_proj$", ".to_v"), (r"\.o_proj$", ".to_out.0")),
)

FORMAT = KeyFormat(
    name=NAME,
    rules=(
        Rule(rf"(?P<module>.+)\.lora_A{_ADAPTER}\.weight", "A"),
        Rule(rf"(?P<module>.+)\.lora_B{_ADAPTER}\.weight", "B"),
        Rule(rf"(?P<module>.+)\.lora_embedding_A{_ADAPTER}", "A"),
        Rule(rf"(?P<module>.+)\.lora_embedding_B{_ADAPTER}", "B"),
        Rule(r"(?P<module>.+)\.base_layer\.weight", "base"),
        *EXTRA_RULES,
        Rule(rf"(?P<module>.+)\.lora_down{DEFAULT_ADAPTER}\.weight", "A"),
        Rule(rf"(?P<module>.+)\.lora_up{DEFAULT_ADAPTER}\.weight", "B"),
        Rule(r"(?P<module>.+)\.alpha", "alpha"),
        HADAMARD_KRONECKER,  # merged mode
    ),
    prefixes=("base_model.model.",),
    renames=((r"^base_model\.model\.", ""),),  # PEFT's wrapper, never part of the model's names
    refuse=REFUSED_BUT_EXTRAS_AND_FACTORS,
    aliases=lumina2.BLOCK_ALIASES,
    file_aliases=(
        ACE_STEP,
        flux.FILE_ALIASES,
        flux.ON_FLUX2,
        sd3.FILE_ALIASES,
        lumina2.FILE_ALIASES,
        krea2.FILE_ALIASES,
    ),
    aliases_exact=True,  # q_proj is every LLM's and text encoder's: only the model's exact path
    splits=lumina2.SPLITS,
    example="base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
)
