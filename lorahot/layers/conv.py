"""``LoRAConv``: LoRA on Conv1d, Conv2d and Conv3d, in the layout PEFT and kohya save.

A is a convolution with the base kernel, stride, padding and dilation (groups 1), weight
``[r, in, *kernel]``; B is a 1x1 convolution with the base's groups, weight
``[out, r / groups, 1, ...]``; the per-row scales multiply A's output channels before B.
The sum equals the base convolution plus ``dW`` where ``dW[o] = B[o] @ diag(s) A[slice of o's
group]``, which is how a merged weight would compute it (the base's padding mode applies to
both).

Padding the rank from ``r`` to ``R`` keeps each group's slice aligned: group ``j`` of the rank
occupies rows ``[j * R/g, j * R/g + r/g)`` of A, and B keeps ``[out, R/g]``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lorahot.errors import UsageError
from lorahot.layers import routing
from lorahot.layers.base import EXTRA_ROWS, LayerSpec, LoRALayer, forward_mismatch, overrides_forward

__all__ = ["LoRAConv"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_TORCH_CONV: dict[int, type[nn.Module]] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


class LoRAConv(LoRALayer):
    """LoRA on ``nn.Conv1d`` / ``nn.Conv2d`` / ``nn.Conv3d``.

    Buffers (views into the arena): ``lora_A [R, in, *kernel]``,
    ``lora_B [out, R / groups, 1, ...]`` and ``lora_scale`` (``[R]``, one per row of A; float32,
    float64 for float64 layers).
    """

    def __init__(self, base_layer: nn.Module) -> None:
        if not isinstance(base_layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            raise UsageError(f"{type(base_layer).__name__} is not a Conv1d/2d/3d")
        kernel = tuple(base_layer.kernel_size)
        nd = len(kernel)
        cin, cout = base_layer.in_channels, base_layer.out_channels
        spec = LayerSpec("conv", cin * math.prod(kernel), cout, (cin, *kernel), (1,) * nd, base_layer.groups)
        super().__init__(base_layer, spec)
        self._conv = _CONV[nd]
        self._stride = tuple(base_layer.stride)
        self._dilation = tuple(base_layer.dilation)
        self._groups = base_layer.groups
        zeros = base_layer.padding_mode == "zeros"
        self._padding = base_layer.padding if zeros else 0
        self._pad_mode = None if zeros else base_layer.padding_mode
        self._pad = tuple(base_layer._reversed_padding_repeated_twice)
        self._nd = nd
        refusal = self._forward_refusal()
        if refusal is not None:
            raise UsageError(
                f"{refusal}. lorahot adds its LoRA to a convolution's output as the torch convolution computes it "
                "(PEFT builds its LoRA factors from the subclass itself, a third result): exclude this module from "
                "targets, or give it the torch class's forward."
            )

    def live_views(self, a_rows: torch.Tensor, b_rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Arena rows ``[R, in*k]``, ``[R, out]`` -> ``[R, in, *k]``, ``[out, R/g, 1, ...]``."""
        spec = self.spec
        rank = a_rows.shape[0]
        a = a_rows.view(rank, *spec.a_row_shape)
        b = b_rows[: rank // spec.groups].t()  # [out, R/g]
        return a, b[(...,) + (None,) * len(spec.b_trailing)]

    def live_extras(self, rows: torch.Tensor) -> torch.Tensor:
        """``[4, out, 1, ...]``: channels are the output's dimension -1 - nd."""
        return rows.view(EXTRA_ROWS, self.spec.out_dim, *(1,) * self._nd)

    def dora_refusal(self) -> str | None:
        if self.spec.groups > 1:
            return (
                f"DoRA on a conv with groups={self.spec.groups} is not supported (PEFT's weight norm assumes groups=1)"
            )
        return None

    def lora_delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = x.to(a.dtype)
        if self._pad_mode is not None:
            x = F.pad(x, self._pad, mode=self._pad_mode)
        h = self._conv(x, a, None, self._stride, self._padding, self._dilation, 1)  # ([N,] R, *spatial)
        h = (h * scale.view(-1, *(1,) * self._nd)).to(h.dtype)
        return self._conv(h, b, None, 1, 0, 1, self._groups)

    def routed_delta(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """Each image of the batch convolved with its own slot's A and B: the batch folded into
        the channels, and the convolutions grouped by image (groups ``L`` for A, ``L * groups``
        for B), so one call serves every slot.

        Under dynamic shapes ``L`` is a symbol, and a group count cannot be one: the compiler's
        convolution fixes it, which would compile a graph per batch size. There
        (:meth:`_symbolic_delta`) every slot's A runs over the whole batch in one ungrouped
        convolution, each image keeps its own slot's channels, and the expand is a batched
        product."""
        length = index.shape[0]
        x = x.to(a.dtype)
        if self._pad_mode is not None:
            x = F.pad(x, self._pad, mode=self._pad_mode)
        if not routing.constant(length):
            return self._symbolic_delta(x, a, b, scales, index)
        a_rows = a[index]  # (L, R, in, *k)
        rank = a_rows.shape[1]
        folded = x.reshape(1, -1, *x.shape[2:])  # (1, L * in, *spatial)
        h = self._conv(folded, a_rows.flatten(0, 1), None, self._stride, self._padding, self._dilation, length)
        h = h.view(length, rank, *h.shape[2:]) * scales.view(length, rank, *(1,) * self._nd)  # (L, R, *spatial)
        b_rows = b[index]  # (L, out, R / g, 1, ...)
        out = self._conv(
            h.reshape(1, -1, *h.shape[2:]).to(a.dtype), b_rows.flatten(0, 1), None, 1, 0, 1, length * self._groups
        )
        return out.view(length, -1, *out.shape[2:])

    def _symbolic_delta(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`routed_delta` without the batch in a group count (``x`` padded and cast): the
        shrinks of all ``S`` slots over every image (``S`` times the shrink's work), each image's
        own slot's ``R`` channels taken, then ``[out/g, R/g] @ [R/g, pixels]`` per image and
        group."""
        length, (slots, rank), groups = index.shape[0], a.shape[:2], self._groups
        h = self._conv(x, a.flatten(0, 1), None, self._stride, self._padding, self._dilation, 1)  # (L, S*R, *sp)
        spatial = h.shape[2:]
        h = h.view(length, slots, rank, *spatial)[torch.arange(length, device=index.device), index]  # (L, R, *sp)
        h = (h * scales.view(length, rank, *(1,) * self._nd)).to(a.dtype)
        b_rows = b[index].reshape(length, groups, -1, rank // groups)  # (L, g, out/g, R/g)
        out = torch.einsum("lgor,lgrp->lgop", b_rows, h.reshape(length, groups, rank // groups, -1))
        return out.reshape(length, -1, *spatial)

    def row_dims(self, x: torch.Tensor) -> int:
        """Channels and spatial dimensions; the batch dimension is the row."""
        return 1 + self._nd

    def row_view(self, t: torch.Tensor, length: int) -> torch.Tensor:
        """The output ``[L, out, *spatial]`` already has its rows first."""
        return t

    def row_shape(self, length: int) -> tuple[int, ...]:
        return (length, self.spec.out_dim, *(1,) * self._nd)

    def row_mask(self, on: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The batch dimension is the row: ``on`` as ``[L, 1, ...]``."""
        return on.view(on.shape[0], *(1,) * (y.dim() - 1))

    def merge_refusal(self) -> str | None:
        """Grouped convs cannot be merged; a subclass that overrides ``forward`` must still
        compute its torch class's convolution (checked on a probe input)."""
        if self.spec.groups > 1:
            return f"a conv with groups={self.spec.groups} cannot be merged (its LoRA mixes all input channels)"
        return self._forward_refusal()

    def _forward_refusal(self) -> str | None:
        """Why the base module's ``forward`` is not its torch class's convolution (a subclass that
        overrides it, checked on a probe input), or None."""
        base = self.base_layer
        torch_cls = _TORCH_CONV[self._nd]
        if not overrides_forward(base, torch_cls):
            return None
        weight = self.base_weight
        if not weight.is_floating_point() or weight.is_meta:
            return (
                f"{type(base).__name__} overrides forward, which cannot be checked without floating-point weights "
                f"with data (got {weight.dtype} on {weight.device})"
            )
        cin, *kernel = self.spec.a_row_shape
        pad = max(self._pad, default=0)
        size = [(k - 1) * d + 1 + 2 * pad + s for k, d, s in zip(kernel, self._dilation, self._stride)]
        probe = torch.randn(1, cin, *size, generator=torch.Generator().manual_seed(0))
        mismatch = forward_mismatch(base, probe.to(weight.device, weight.dtype), lambda x: torch_cls.forward(base, x))
        if mismatch is not None:
            return f"{type(base).__name__} overrides forward and does not compute its convolution ({mismatch})"
        return None

    def merge_operands(self, a: torch.Tensor, bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv weight ``[out, in * prod(kernel)]``: ``B @ A``."""
        return bt.t(), a
