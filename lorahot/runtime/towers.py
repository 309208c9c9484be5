"""Which injected layers belong to a multimodal model's vision or audio tower.

A vision tower (and the projector after it) runs on the batch's images, or on their patches
concatenated, not on its rows, and an audio tower on the batch's audio clips: two images (or
clips) of one row and none of another make a batch of 2 under a routing of 2, and a layer's
input shape cannot tell. So the runtime refuses a per-row
routing that sends rows to an adapter with weights on a tower
(:func:`lorahot.runtime.routing.check_towers`), and under a per-row routing a tower's layers
compute their base output, whatever number of images or clips they are given.

A tower is a module (below the model itself) that

- is named in :data:`TOWERS` (the names transformers' multimodal models and diffusers'
  pipelines give their towers and the projectors after them), or
- declares that it takes images, video or audio and no text: a ``main_input_name`` in
  :data:`MEDIA_INPUTS`, or ``input_modalities`` made only of :data:`MEDIA_MODALITIES` (the
  attributes transformers' models carry), or
- is named in :data:`CARRIERS` (a projector, aligner, merger or resampler) beside a tower:
  what carries that tower's output into the language model;

provided the model has parameters outside its towers (the language model beside them). A
vision or audio model alone (``CLIPVisionModel``, ``WhisperForConditionalGeneration``, a
BLIP-2 captioner, whose ``main_input_name`` or ``input_modalities`` says so) has no tower: its
rows are its images or clips. Neither has a model whose every parameter is in one.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

from lorahot.runtime.module_paths import above, within

__all__ = ["TOWERS", "CARRIERS", "MEDIA_INPUTS", "MEDIA_MODALITIES", "find_towers", "tower_paths"]

#: the module names of vision and audio towers and of the projectors that carry their output
#: into a language model: LLaVA, LLaVA-NeXT, PaliGemma, Gemma 3, InternVL and Llama 4
#: (``vision_tower``, ``vision_model``, ``multi_modal_projector``), Qwen2-VL and Qwen2.5-VL
#: (``visual``), Idefics 3 and SmolVLM (``vision_model``, ``connector``), Mllama
#: (``vision_model``), a diffusers pipeline's IP-Adapter ``image_encoder``; the audio towers of
#: Qwen2-Audio, Qwen2.5-Omni, Qwen3-Omni, Voxtral, Audio Flamingo 3 and Gemma 3n / 4
#: (``audio_tower``, which runs on the batch's audio clips), Gemma 3n's and 4's multimodal
#: embedders (``embed_audio``, ``embed_vision``: the towers' outputs, per clip or image),
#: Video-LLaVA's towers (``image_tower``, ``video_tower``), Phi-4-multimodal's image and audio
#: embedders (``image_embed``, ``audio_embed``: each a tower with its projection), Fuyu's patch
#: embedding (``vision_embed_tokens``), DeepSeek-VL-Hybrid's high-resolution tower
#: (``high_res_vision_model``) and Janus's and Chameleon's image tokenizer (``vqmodel``)
TOWERS = frozenset(
    {
        "vision_tower",
        "vision_model",
        "visual",
        "vision_encoder",
        "image_encoder",
        "multi_modal_projector",
        "connector",
        "audio_tower",
        "embed_audio",
        "embed_vision",
        "image_tower",
        "video_tower",
        "image_embed",
        "audio_embed",
        "vision_embed_tokens",
        "high_res_vision_model",
        "vqmodel",
    }
)

#: the module names of what carries a tower's output into a language model, a tower only
#: beside one (a text model's own ``projector`` is not): DeepSeek-VL's and Janus's ``aligner``,
#: MiniCPM-V's ``merger``, Granite Speech's, PaddleOCR-VL's, VideoLLaMA 3's and Cosmos's
#: ``projector``, Kimi's ``mm_projector``, Kosmos-2.5's ``image_to_text_projection``, ERNIE-VL's
#: ``resampler_model``, LLaVA-NeXT-Video's ``vision_resampler``, LightOnOCR's and Muse's
#: ``vision_projection`` and ``vision_adapter``, GIT's and CLIP's ``visual_projection``,
#: DeepSeek-VL-Hybrid's ``high_res_vision_neck`` and ``high_res_vision_proj``, Ovis 2's
#: ``visual_embeddings_table``
CARRIERS = frozenset(
    {
        "aligner",
        "merger",
        "projector",
        "mm_projector",
        "image_to_text_projection",
        "resampler",
        "resampler_model",
        "vision_resampler",
        "vision_projection",
        "visual_projection",
        "vision_adapter",
        "high_res_vision_neck",
        "high_res_vision_proj",
        "visual_embeddings_table",
    }
)

#: the ``main_input_name`` of a model that runs on images, video or audio (transformers' vision
#: models, audio encoders, Pix2Struct's patches, Gemma 3n's audio encoder)
MEDIA_INPUTS = frozenset(
    {"pixel_values", "pixel_values_videos", "input_features", "input_values", "flattened_patches", "audio_mel"}
)

#: the ``input_modalities`` of a model that takes no text
MEDIA_MODALITIES = frozenset({"image", "video", "audio"})


def find_towers(model: nn.Module, names: Iterable[str]) -> frozenset[str]:
    """The layers among ``names`` (dotted module paths in ``model``) that belong to a vision
    or audio tower beside other modules (see the module docstring): inside one, or one itself
    (Fuyu's ``vision_embed_tokens``, a ``projector`` that is a single Linear)."""
    towers = set(tower_paths(model))
    return frozenset(n for n in names if within(n, towers))


def tower_paths(model: nn.Module) -> list[str]:
    """The paths of the towers in ``model`` (see the module docstring), outermost first (one
    inside another is left out), in the model's module order."""
    if _media(model):  # a vision or audio model itself: its rows are its images or clips
        return []
    modules = dict(model.named_modules())
    found = [p for p, m in modules.items() if p and (p.rpartition(".")[2] in TOWERS or _media(m))]
    for parent in dict.fromkeys(path.rpartition(".")[0] for path in found):  # what carries a tower's output, beside it
        found += [f"{parent}.{n}" if parent else n for n, _ in modules[parent].named_children() if n in CARRIERS]
    chosen = set(found)  # a path per level looked up, not each compared with each (a tower per block)
    outermost = [p for p in modules if p in chosen and not any(a in chosen for a in above(p))]
    if all(within(name, chosen) for name, _ in model.named_parameters()):
        return []  # nothing beside the towers: their images or clips are the rows
    return outermost


def _media(module: nn.Module) -> bool:
    """Whether ``module`` says it takes images, video or audio and no text: its
    ``main_input_name`` or its ``input_modalities`` (attributes transformers' models carry)."""
    if getattr(module, "main_input_name", None) in MEDIA_INPUTS:
        return True
    modalities = getattr(module, "input_modalities", None)
    if isinstance(modalities, str):
        modalities = (modalities,)
    if not isinstance(modalities, (tuple, list, frozenset, set)) or not modalities:
        return False
    return all(isinstance(m, str) and m in MEDIA_MODALITIES for m in modalities)
