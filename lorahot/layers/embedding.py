"""``LoRAEmbedding``: LoRA on ``nn.Embedding``, in PEFT's layout.

Files store ``lora_embedding_A [r, num_embeddings]`` and ``lora_embedding_B [dim, r]``; the
output is ``base(ids) + scale * A.T[ids] @ B.T``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lorahot.errors import UsageError
from lorahot.layers.base import LayerSpec, LoRALayer

__all__ = ["LoRAEmbedding"]


class LoRAEmbedding(LoRALayer):
    """LoRA on ``nn.Embedding``.

    Buffers (views into the arena): ``lora_A [R, num_embeddings]``, ``lora_B [R, dim]``
    (B stored transposed) and ``lora_scale`` (0-d; float32, float64 for float64 layers).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        if not isinstance(base_layer, nn.Embedding):
            raise UsageError(f"{type(base_layer).__name__} is not an nn.Embedding")
        num, dim = base_layer.num_embeddings, base_layer.embedding_dim
        super().__init__(base_layer, LayerSpec("embedding", num, dim, (num,)))

    def live_views(self, a_rows: torch.Tensor, b_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Arena rows ``[R, num]``, ``[R, dim]`` are used as they are."""
        return a_rows, b_rows

    def lora_delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = F.embedding(x, a.t())  # (..., R)
        return torch.matmul(h, b)  # (..., dim)

    def merge_refusal(self) -> str | None:
        return None

    def merge_operands(self, a: torch.Tensor, bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Embedding weight ``[num, dim]``: ``A.T @ B.T``."""
        return a.t(), bt
