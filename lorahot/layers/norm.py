"""``LoRANorm``: a normalization layer that merged mode folds a weight and bias delta into.

No LoRA runs on a norm: what adapters carry for one is a delta of its scale and shift (a
ComfyUI-extracted ``.diff`` / ``.diff_b``, LyCORIS' ``w_norm`` / ``b_norm`` from its
``train_norm`` option), which merged mode adds to a pristine copy of the weight and bias at each
swap, ``w = w0 + s * diff``, ``b = b0 + s * diff_b`` (:mod:`lorahot.runtime.merge`). The layer
exists so that the merger has a place for those two tensors: inject accepts it only with
``merged=True``, and its forward is the base module's own.

Accepted: torch's ``LayerNorm``, ``GroupNorm`` and ``RMSNorm``, and the common norms of other
libraries by class name (``T5LayerNorm``, ``LlamaRMSNorm``, diffusers' ``RMSNorm`` and
``FP32LayerNorm``, ...: a name ending in ``LayerNorm``, ``RMSNorm`` or ``GroupNorm``) that hold
their ``weight`` as a parameter and have no submodules (an adaptive norm computes its scale with
a linear inside: that linear is the target there).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lorahot.errors import UsageError
from lorahot.layers.base import LayerSpec, LoRALayer

__all__ = ["LoRANorm", "is_norm", "is_weightless_norm", "NORM_KINDS"]

#: The class-name endings of the normalization layers lorahot folds deltas into.
NORM_KINDS = ("LayerNorm", "RMSNorm", "GroupNorm")


def is_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer :class:`LoRANorm` wraps (see the module
    docstring); matched by type for torch's, by class name for others (lorahot never imports
    transformers or diffusers)."""
    if isinstance(module, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)):
        return True
    return type(module).__name__.endswith(NORM_KINDS) and next(module.children(), None) is None


def is_weightless_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a normalization layer without a weight (``elementwise_affine=False``,
    ``affine=False``): no delta can ever fold into it, so for matching an adapter's keys it is
    no module at all. A naming of original names may spell another norm with its path (Wan's
    cross-attention ``blocks.N.norm3`` is diffusers' ``blocks.N.norm2``, where diffusers'
    ``norm3`` is the weightless feed-forward norm), and the alias must not be shadowed by it."""
    return is_norm(module) and not isinstance(module._parameters.get("weight"), torch.Tensor)


class LoRANorm(LoRALayer):
    """A normalization layer's weight ``[*normalized_shape]`` (or ``[channels]``) and bias,
    rewritten in merged mode; the spec reads the weight as ``[out, *rest]``, ``out`` its first
    dimension (``[C]`` is ``[C, 1]`` flattened, as the merger lays weights out)."""

    def __init__(self, base_layer: nn.Module) -> None:
        weight = base_layer._parameters.get("weight")
        if not isinstance(weight, torch.Tensor) or weight.ndim < 1:
            raise UsageError(
                f"{type(base_layer).__name__} has no weight parameter (elementwise_affine=False or affine=False?), so "
                "there is no scale to fold a delta into. Exclude this module from targets."
            )
        shape = tuple(int(d) for d in weight.shape)
        super().__init__(base_layer, LayerSpec("norm", math.prod(shape[1:]), shape[0], shape[1:]))

    def live_views(self, a_rows: torch.Tensor, b_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Arena rows ``[R, in]``, ``[R, out]`` as they are (no LoRA is ever loaded here)."""
        return a_rows, b_rows

    def lora_delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Never called: the layer runs in merged mode only, whose forward is the base module's."""
        raise UsageError(f"{self._path or type(self._base).__name__}: a normalization layer runs in merged mode only.")

    def merge_refusal(self) -> str | None:
        """None: the merger rewrites the stored weight and bias (a computed one is refused first)."""
        return None

    def merge_operands(self, a: torch.Tensor, bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``B @ A`` as ``[out, in]`` (zero rows: no LoRA module is ever placed on a norm)."""
        return bt.t(), a
