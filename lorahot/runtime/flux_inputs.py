"""A Flux.1 LoRA on a Flux.1 model whose image embedder takes conditioning channels.

Flux.1 Fill and the Depth/Canny (control) models are Flux.1-dev with a wider ``x_embedder``:
its input is the image latents (64 features, as in Flux.1-dev) followed by the conditioning
latents (the masked image and mask: 384 in all; the control image: 128). A LoRA trained on
Flux.1-dev has ``x_embedder``'s A ``[r, 64]``. diffusers' Flux.1 loader
(``FluxLoraLoaderMixin``, used by the Flux.1 and Chroma pipelines) zero-pads such an A to the
layer's input width, so the latents' columns get the LoRA's update and the conditioning
columns none; :func:`pad_embedder_input` does the same, for that one layer of a model built as
diffusers builds a Flux.1 or Chroma transformer, and nowhere else: a narrower A on any other
layer (or on any other model) is an adapter of another model, and is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

from lorahot.adapter import LoraModule
from lorahot.layers.base import LayerSpec

__all__ = ["EMBEDDER", "pad_embedder_input"]

#: the layer whose input the Fill and control models widen
EMBEDDER = "x_embedder"
#: the modules beside it in a Flux.1 (or Chroma) transformer as diffusers names it (Flux.2 has
#: ``time_guidance_embed``, and diffusers' Flux.2 loader pads nothing)
_SIBLINGS = ("context_embedder", "time_text_embed", "transformer_blocks", "single_transformer_blocks")


def pad_embedder_input(name: str, module: LoraModule, spec: LayerSpec, has: Callable[[str], bool]) -> LoraModule:
    """``module`` with its A ``[r, n]`` zero-padded to ``[r, in]`` when ``name`` is a Flux.1
    transformer's ``x_embedder`` of ``in`` > ``n`` input features (``has``: whether the model has
    a module of that path, asked for its siblings); otherwise ``module`` itself (its shapes are
    checked later).
    The padded A is a new tensor; the layer's buffers are written as for any A of full width."""
    head, _, leaf = name.rpartition(".")
    a = module.A
    if leaf != EMBEDDER or spec.kind != "linear" or spec.shard is not None or a.ndim != 2:
        return module
    if not 0 < a.shape[1] < spec.in_dim:
        return module
    prefix = f"{head}." if head else ""
    if not all(has(prefix + s) for s in _SIBLINGS):
        return module
    padded = a.new_zeros(a.shape[0], spec.in_dim)  # [r, in]: the latents' columns first
    padded[:, : a.shape[1]] = a.detach()
    return replace(module, A=padded)
