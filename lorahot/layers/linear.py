"""``LoRALinear``: LoRA on anything that maps ``(..., in)`` to ``(..., out)``."""

from __future__ import annotations

import torch
from torch import nn

from lorahot import fused as fused_kernel
from lorahot.layers.base import LayerSpec, LoRALayer
from lorahot.registry import Handle

__all__ = ["LoRALinear", "linear_features"]


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in, out)`` for a linear-like module, or None if it is not one.

    Recognizes ``nn.Linear``; transformers-style ``Conv1D`` (weight ``[in, out]``, attribute
    ``nf``); and any other module that declares integer ``in_features`` and ``out_features``
    (quantized and custom linears).
    """
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.ndim == 2:
        return int(weight.shape[0]), int(weight.shape[1])
    fin, fout = getattr(module, "in_features", None), getattr(module, "out_features", None)
    if isinstance(fin, int) and isinstance(fout, int) and not isinstance(module, nn.modules.conv._ConvNd):
        return fin, fout
    return None


class LoRALinear(LoRALayer):
    """``base(x) + scale * (x @ A.T) @ B.T`` on a linear-like ``base_layer``.

    Buffers (views into the arena): ``lora_A [R, in]``, ``lora_B [R, out]`` (B stored
    transposed, so a rank prefix is contiguous), ``lora_scale`` a 0-d tensor (float32; float64 for float64 layers).
    """

    kind = "linear"

    def __init__(self, base_layer: nn.Module) -> None:
        features = linear_features(base_layer)
        if features is None:
            raise TypeError(f"{type(base_layer).__name__} is not a linear-like module")
        fin, fout = features
        super().__init__(base_layer, LayerSpec("linear", fin, fout, (fin,)))

    @staticmethod
    def live_views(a_rows: torch.Tensor, b_rows: torch.Tensor, spec: LayerSpec) -> tuple[torch.Tensor, torch.Tensor]:
        """Arena rows ``[R, in]``, ``[R, out]`` are used as they are."""
        return a_rows, b_rows

    def bind(self, lora_A: torch.Tensor, lora_B: torch.Tensor, lora_scale: torch.Tensor, *, handle: Handle | None = None, fused: bool = True) -> None:
        """Attaches the live views; ``fused`` turns on :mod:`lorahot.fused` where it applies
        (CUDA, fp16/bf16, ``nn.Linear`` base)."""
        super().bind(lora_A, lora_B, lora_scale, handle=handle)
        self.fused = fused and fused_kernel.supports(self.base_layer, lora_A)

    def can_fuse(self, x: torch.Tensor, a: torch.Tensor) -> bool:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        return fused_kernel.worth_it(rows) and x.dtype == a.dtype and not _needs_grad(x, self._base)

    def fused_forward(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        base = self._base
        return fused_kernel.lora_linear(x, base.weight, base.bias, a, b, scale)

    def lora_delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        h = torch.matmul(x.to(a.dtype), a.t())  # (..., R)
        return torch.matmul(h, b)  # (..., out)


def _needs_grad(x: torch.Tensor, base: nn.Module) -> bool:
    """Whether autograd must see this call (the fused kernel has no backward)."""
    return torch.is_grad_enabled() and (x.requires_grad or base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad))
