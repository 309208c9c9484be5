"""Which injected layers belong to a multimodal model's vision or audio tower.

A vision tower (and the projector after it) runs on the batch's images, or on their patches
concatenated, not on its rows, and an audio tower on the batch's audio clips: two images (or
clips) of one row and none of another make a batch of 2 under a routing of 2, and a layer's
input shape cannot tell. So the runtime refuses a per-row
routing that sends rows to an adapter with weights on a tower
(:func:`lorahot.runtime.routing.check_towers`), and under a per-row routing a tower's layers
compute their base output, whatever number of images or clips they are given.

A tower is a module under one of :data:`TOWERS` (the names transformers' multimodal models and
diffusers' pipelines give it) whose parent holds other modules with parameters (the language
model beside it). A vision model alone (``CLIPVisionModel``, whose rows are its images) is not
one: there every layer is under the same name, and nothing else is beside it.
"""

from __future__ import annotations

from collections.abc import Iterable

from torch import nn

__all__ = ["TOWERS", "find_towers", "tower_paths"]

#: the module names of vision and audio towers and of the projectors that carry their output
#: into a language model: LLaVA, LLaVA-NeXT, PaliGemma, Gemma 3, InternVL and Llama 4
#: (``vision_tower``, ``vision_model``, ``multi_modal_projector``), Qwen2-VL and Qwen2.5-VL
#: (``visual``), Idefics 3 and SmolVLM (``vision_model``, ``connector``), Mllama
#: (``vision_model``), a diffusers pipeline's IP-Adapter ``image_encoder``; the audio towers of
#: Qwen2-Audio, Qwen2.5-Omni, Qwen3-Omni, Voxtral, Audio Flamingo 3 and Gemma 3n / 4
#: (``audio_tower``, which runs on the batch's audio clips), Gemma 3n's and 4's multimodal
#: embedders (``embed_audio``, ``embed_vision``: the towers' outputs, per clip or image) and
#: Video-LLaVA's towers (``image_tower``, ``video_tower``)
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
    }
)


def find_towers(model: nn.Module, names: Iterable[str]) -> frozenset[str]:
    """The layers among ``names`` (dotted module paths in ``model``) that belong to a vision
    tower beside other modules (see the module docstring)."""
    towers = tower_paths(model)
    return frozenset(n for n in names if any(n.startswith(t + ".") for t in towers))


def tower_paths(model: nn.Module) -> list[str]:
    """The paths of the towers in ``model``: modules named in :data:`TOWERS` whose parent holds
    another child with parameters outside :data:`TOWERS`, outermost first (one inside another
    is left out)."""
    found: list[str] = []
    for path, parent in model.named_modules():
        if any(path == t or path.startswith(t + ".") for t in found):
            continue
        children = dict(parent.named_children())
        beside = [c for n, c in children.items() if n not in TOWERS and next(c.parameters(), None) is not None]
        if beside:
            found.extend(f"{path}.{n}" if path else n for n in children if n in TOWERS)
    return found
