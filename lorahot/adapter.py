"""The normalized adapter: what every reader produces and the runtime consumes.

Whatever the naming in the file (PEFT, diffusers, kohya, ComfyUI), a reader turns it into an
:class:`Adapter`: per module key, the A and B tensors in PEFT's layout and the scale they
carry. Keys are module paths as the source names them; the runtime resolves them against the
injected model's own names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["LoraModule", "Adapter"]


@dataclass(frozen=True)
class LoraModule:
    """One module's LoRA weights.

    Attributes:
        key: the module path as the source names it (dots, prefix not yet resolved).
        A: ``[r, in]`` (linear), ``[r, in, *kernel]`` (conv) or ``[r, num_embeddings]``.
        B: ``[out, r]``, ``[out, r / groups, 1, ...]`` or ``[dim, r]``.
        alpha: the LoRA alpha; the scale is ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA).
        use_rslora: whether the scale divides by ``sqrt(r)`` instead of ``r``.
        source_keys: the tensor keys in the source this module came from (for messages).
    """

    key: str
    A: torch.Tensor
    B: torch.Tensor
    alpha: float
    use_rslora: bool = False
    source_keys: tuple[str, ...] = ()

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def scale(self) -> float:
        """The factor on ``B @ A``: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
        if self.rank == 0:
            return 0.0
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


@dataclass
class Adapter:
    """A LoRA adapter in normalized form.

    Attributes:
        modules: module key -> :class:`LoraModule`.
        format: the detected naming (``"peft"``, ``"diffusers"``, ``"kohya"``, ...).
        source: where it came from (path, repo id, or ``"<mapping>"``), for messages.
        config: the adapter config as read (PEFT's ``adapter_config.json`` fields), if any.
    """

    modules: dict[str, LoraModule]
    format: str
    source: str
    config: dict[str, Any] = field(default_factory=dict)

    @property
    def ranks(self) -> dict[str, int]:
        return {k: m.rank for k, m in self.modules.items()}

    @property
    def nbytes(self) -> int:
        return sum(m.A.nbytes + m.B.nbytes for m in self.modules.values())
