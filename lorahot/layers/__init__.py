"""LoRA layer types and the table that picks one for a base module."""

from __future__ import annotations

from torch import nn

from lorahot.layers.base import LayerSpec, LoRALayer
from lorahot.layers.conv import LoRAConv
from lorahot.layers.embedding import LoRAEmbedding
from lorahot.layers.linear import LoRALinear, linear_features

__all__ = ["LayerSpec", "LoRALayer", "LoRALinear", "LoRAConv", "LoRAEmbedding", "layer_class_for", "SUPPORTED"]

#: Base module types lorahot wraps, in the order they are tried, with the layer for each.
SUPPORTED: tuple[tuple[str, type[LoRALayer]], ...] = (
    ("Conv1d / Conv2d / Conv3d", LoRAConv),
    ("Embedding", LoRAEmbedding),
    ("Linear, Conv1D, or any module with in_features/out_features", LoRALinear),
)


def layer_class_for(module: nn.Module) -> type[LoRALayer] | None:
    """The LoRA layer class that wraps ``module``, or None if lorahot cannot wrap it."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return LoRAConv
    if isinstance(module, nn.Embedding):
        return LoRAEmbedding
    if linear_features(module) is not None:
        return LoRALinear
    return None
