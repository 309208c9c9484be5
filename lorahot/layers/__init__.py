"""LoRA layer types, the table that picks one for a base module, and the state a runtime shares with them."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lorahot.layers.base import LayerSpec, LoRALayer, Shard
from lorahot.layers.conv import LoRAConv
from lorahot.layers.embedding import LoRAEmbedding
from lorahot.layers.linear import LoRALinear, linear_features
from lorahot.layers.norm import LoRANorm, is_norm
from lorahot.layers.sharded import ShardedLoRALinear, is_sharded
from lorahot.layers.state import RuntimeState
from lorahot.layers.styled import StyledLoRAEmbedding, StyledLoRALinear, is_styled, is_styled_embedding

__all__ = [
    "LayerSpec",
    "LoRALayer",
    "LoRALinear",
    "LoRAConv",
    "LoRAEmbedding",
    "LoRANorm",
    "ShardedLoRALinear",
    "StyledLoRALinear",
    "StyledLoRAEmbedding",
    "Shard",
    "RuntimeState",
    "layer_class_for",
    "SUPPORTED",
]

#: What lorahot wraps, in the order it is tried: (description, predicate, layer class).
SUPPORTED: tuple[tuple[str, Callable[[nn.Module], bool], Callable[[nn.Module], LoRALayer]], ...] = (
    (
        "tensor-parallel Embedding sharded by transformers' tp_plan (embedding_rowwise / embedding_colwise)",
        is_styled_embedding,
        StyledLoRAEmbedding,
    ),
    (
        "tensor-parallel Linear sharded by transformers' tp_plan (colwise / rowwise styles)",
        is_styled,
        StyledLoRALinear,
    ),
    ("tensor-parallel Linear (DTensor weight, ColwiseParallel / RowwiseParallel)", is_sharded, ShardedLoRALinear),
    ("Conv1d/2d/3d", lambda m: isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)), LoRAConv),
    ("Embedding", lambda m: isinstance(m, nn.Embedding), LoRAEmbedding),
    ("LayerNorm/GroupNorm/RMSNorm (merged mode: their weight and bias deltas)", is_norm, LoRANorm),
    ("Linear-like (Linear, Conv1D, in_features/out_features)", lambda m: linear_features(m) is not None, LoRALinear),
)


def layer_class_for(module: nn.Module) -> Callable[[nn.Module], LoRALayer] | None:
    """The LoRA layer class that wraps ``module``, or None if lorahot cannot wrap it."""
    return next((cls for _, accepts, cls in SUPPORTED if accepts(module)), None)
