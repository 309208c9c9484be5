"""``LoRAConv``: LoRA on Conv1d, Conv2d and Conv3d, in the layout PEFT and kohya save.

A is a convolution with the base kernel, stride, padding and dilation (groups 1), weight
``[r, in, *kernel]``; B is a 1x1 convolution with the base's groups, weight
``[out, r / groups, 1, ...]``; the per-row scales multiply A's output channels before B.
The sum equals the base convolution plus ``dW`` where ``dW[o] = B[o] @ diag(s) A[slice of o's
group]``, which is how a merged weight would compute it (the base's padding mode applies to
both). A reads the base's geometry at each call, as the base's own forward does: through the
base's ``_conv_forward`` where the base has groups 1 (so a ``_conv_forward`` of its class's or
its own, a seamless-tiling pipeline's circular padding, convolves A as it convolves ``W``; one
that is not linear in its weight is refused at inject), else from its ``padding_mode``,
``padding``, ``stride`` and ``dilation`` then.

Padding the rank from ``r`` to ``R`` keeps each group's slice aligned: group ``j`` of the rank
occupies rows ``[j * R/g, j * R/g + r/g)`` of A, and B keeps ``[out, R/g]``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lorahot.errors import UsageError
from lorahot.layers import routing
from lorahot.layers.base import EXTRA_ROWS, LayerSpec, LoRALayer, overrides_forward
from lorahot.layers.probes import forward_mismatch, mismatch
from lorahot.layers.refusal import literal, refuse

__all__ = ["LoRAConv"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_OWN_CONV_FORWARD = "its _conv_forward is not the torch class's (its class overrides it, or one was set on the module)"
_OWN_CONV_FIX = "Exclude the module from targets, or set the _conv_forward before inject on a conv with groups=1."
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
        if isinstance(base_layer.weight, nn.parameter.UninitializedParameter):
            raise UsageError(
                f"{type(base_layer).__name__} has not been materialized yet (its weight's shape is unknown until its "
                "first call); run one forward of the model before inject."
            )
        # the sizes the convolution computes with: its weight's [out, in / groups, *kernel] and its
        # groups (in_channels, out_channels and kernel_size may be stale: a weight sliced by hand)
        cout, cin_per_group, *kernel_dims = base_layer.weight.shape
        kernel = tuple(int(k) for k in kernel_dims)
        nd = len(kernel)
        cin, cout = int(cin_per_group) * base_layer.groups, int(cout)
        spec = LayerSpec("conv", cin * math.prod(kernel), cout, (cin, *kernel), (1,) * nd, base_layer.groups)
        super().__init__(base_layer, spec)
        self._conv = _CONV[nd]
        self._groups = base_layer.groups
        self._nd = nd
        # a class's own _conv_forward (the class of a module does not change; one set on the
        # module may come at any time, see _own_conv_forward)
        torch_conv: Any = _TORCH_CONV[nd]
        self._class_conv = type(base_layer)._conv_forward is not torch_conv._conv_forward
        refusal = self._forward_refusal()
        if refusal is not None:
            raise UsageError(
                f"{refusal}. lorahot adds its LoRA to a convolution's output as the torch convolution computes it "
                "(PEFT builds its LoRA factors from the subclass itself, a third result): exclude this module from "
                "targets, or give it the torch class's forward."
            )
        refusal = self._conv_forward_refusal()
        if refusal is not None:
            raise UsageError(
                f"{refusal}. lorahot convolves the input with A the way the base convolves it with its weight, through "
                "its _conv_forward where groups=1: exclude this module from targets, or remove that _conv_forward."
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
        hooked = super().dora_refusal()
        if hooked is not None:
            return hooked
        if self.spec.groups > 1:
            return (
                f"DoRA on a conv with groups={self.spec.groups} is not supported (PEFT's weight norm assumes groups=1)"
            )
        return None

    def _shrink(self, x: torch.Tensor, a: torch.Tensor, groups: int) -> torch.Tensor:
        """``x`` (cast to ``a``'s dtype) convolved with ``a`` (``groups``) as the base convolves
        it with its weight, read from the base module at each call as its own ``forward`` reads
        it: where the base has groups 1 too, through the base's ``_conv_forward`` (the torch
        class's, or one a pipeline set on the module: seamless tiling pads circularly there);
        else with its padding mode, padding, stride and dilation. A change after inject
        (``padding_mode = "circular"`` on every conv) changes the LoRA's with the base's; under
        ``torch.compile`` these are what the base's forward is already guarded on."""
        base = self._base
        x = x.to(a.dtype)
        if groups == 1 and self._groups == 1:
            return base._conv_forward(x, a, None)  # type: ignore[no-any-return]
        padding = base.padding
        if base.padding_mode != "zeros":
            x = F.pad(x, base._reversed_padding_repeated_twice, mode=base.padding_mode)
            padding = 0
        h: torch.Tensor = self._conv(x, a, None, base.stride, padding, base.dilation, groups)
        if self._own_conv_forward():  # set on the module after inject: it cannot take A's groups
            message = f"{self._describe()}: {_OWN_CONV_FORWARD}; it was set after inject. {_OWN_CONV_FIX}"
            return refuse(literal(message), lambda: h)
        return h

    def _own_conv_forward(self) -> bool:
        """Whether the base's ``_conv_forward`` is not its torch class's: its class overrides it, or
        one was set on the module (a seamless-tiling pipeline's circular padding)."""
        return self._class_conv or "_conv_forward" in self._base.__dict__

    def lora_delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        h = self._shrink(x, a, 1)  # ([N,] R, *spatial)
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
        if not routing.constant(length) or (self._groups == 1 and self._own_conv_forward()):
            # (a _conv_forward of the base's own takes A with groups 1: every slot's over the batch)
            return self._symbolic_delta(x, a, b, scales, index)
        a_rows = a[index]  # (L, R, in, *k)
        rank = a_rows.shape[1]
        folded = x.reshape(1, -1, *x.shape[2:])  # (1, L * in, *spatial)
        h = self._shrink(folded, a_rows.flatten(0, 1), length)
        h = h.view(length, rank, *h.shape[2:]) * scales.view(length, rank, *(1,) * self._nd)  # (L, R, *spatial)
        b_rows = b[index]  # (L, out, R / g, 1, ...)
        out = self._conv(
            h.reshape(1, -1, *h.shape[2:]).to(a.dtype), b_rows.flatten(0, 1), None, 1, 0, 1, length * self._groups
        )
        return out.view(length, -1, *out.shape[2:])

    def _symbolic_delta(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`routed_delta` without the batch in a group count: the
        shrinks of all ``S`` slots over every image (``S`` times the shrink's work), each image's
        own slot's ``R`` channels taken, then ``[out/g, R/g] @ [R/g, pixels]`` per image and
        group."""
        length, (slots, rank), groups = index.shape[0], a.shape[:2], self._groups
        h = self._shrink(x, a.flatten(0, 1), 1)  # (L, S*R, *sp)
        spatial = h.shape[2:]
        if not routing.batched_products(x):
            return self._every_slot_expand(h.view(length, slots, rank, *spatial), b, scales, index)
        h = h.view(length, slots, rank, *spatial)[torch.arange(length, device=index.device), index]  # (L, R, *sp)
        h = (h * scales.view(length, rank, *(1,) * self._nd)).to(a.dtype)
        b_rows = b[index].reshape(length, groups, -1, rank // groups)  # (L, g, out/g, R/g)
        out = torch.einsum("lgor,lgrp->lgop", b_rows, h.reshape(length, groups, rank // groups, -1))
        return out.reshape(length, -1, *spatial)

    def _every_slot_expand(
        self, h: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`_symbolic_delta`'s expand without batched products (where they miscompute:
        :func:`lorahot.layers.routing.batched_products`): each image keeps its own slot's
        channels of every slot's shrink ``h [L, S, R, *sp]`` (selected, not multiplied: another
        slot's overflow stays out), scaled by ``scales [L, R]``, and one convolution with every
        slot's B, ``b [S, out, R/g, *ones]``, in ``g`` groups: group ``j``'s input is every slot's
        ``R/g`` rank channels of that group, its weight every slot's ``[out/g, R/g]`` side by side."""
        length, slots, rank = h.shape[:3]
        groups, ones = self._groups, (1,) * self._nd
        own = (index[:, None] == torch.arange(slots, device=index.device)).view(length, slots, 1, *ones)
        h = torch.where(own, h * scales.view(length, 1, rank, *ones), 0).to(b.dtype)  # (L, S, R, *sp)
        h = h.unflatten(2, (groups, rank // groups)).transpose(1, 2).flatten(1, 3)  # (L, g * S * R/g, *sp)
        w = b.transpose(0, 1).flatten(1, 2)  # (out, S * R/g, *ones)
        return self._conv(h, w, None, 1, 0, 1, groups)

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
        """A subclass that overrides ``forward`` must still compute its torch class's convolution
        (checked on a probe input). A grouped conv merges the kinds whose ``ΔW`` has its weight's
        ``[out, in / groups, *kernel]`` layout; a LoRA is refused at load there (see
        :meth:`merged_lora_refusal`)."""
        return self._forward_refusal(merged=True)

    def merged_lora_refusal(self) -> str | None:
        """Why merged mode cannot fold a LoRA (``B @ A``) into this conv, or None: a grouped
        conv's ``ΔW`` from a LoRA reads every input channel (A is ungrouped), which its weight
        ``[out, in / groups, *kernel]`` cannot hold."""
        if self.spec.groups == 1:
            return None
        return (
            f"a conv with groups={self.spec.groups} cannot hold a LoRA merged: a LoRA's A mixes the input channels of "
            f"every group, which its grouped weight {self.spec.weight_shape()} cannot hold (in merged mode it takes "
            "LyCORIS and diff modules, whose update has the weight's own layout)"
        )

    def _forward_refusal(self, merged: bool = False) -> str | None:
        """Why the base module's ``forward`` is not its torch class's convolution (a subclass that
        overrides it, checked on a probe input), or None. ``merged``: also after a probe change
        written into its weight and bias in place, as merged mode writes them
        (:func:`~lorahot.layers.probes.forward_mismatch`)."""
        base = self._base
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
        pad = max(base._reversed_padding_repeated_twice, default=0)
        size = [(k - 1) * d + 1 + 2 * pad + s for k, d, s in zip(kernel, base.dilation, base.stride)]
        probe = torch.randn(1, cin, *size, generator=torch.Generator().manual_seed(0))
        written = [t for t in (weight, self.base_bias) if t is not None] if merged else []
        expected = lambda x: torch_cls.forward(base, x)  # noqa: E731
        mismatch = forward_mismatch(base, probe.to(weight.device, weight.dtype), expected, written)
        if mismatch is not None:
            return f"{type(base).__name__} overrides forward and does not compute its convolution ({mismatch})"
        return None

    def _conv_forward_refusal(self) -> str | None:
        """Why the base's own ``_conv_forward`` (see :meth:`_own_conv_forward`) cannot convolve A,
        or None: a base with groups > 1 (A has groups 1), or one that is not linear in its weight
        (checked on a probe input and two probe weights), so that ``base + B(A(x))`` would not be
        the base convolution with the weight ``W + dW``."""
        if not self._own_conv_forward():
            return None
        base, kind = self._base, type(self._base).__name__
        if self._groups > 1:
            return f"{kind} with groups={self._groups}: {_OWN_CONV_FORWARD}"
        weight = self.base_weight
        if not weight.is_floating_point() or weight.is_meta:
            return f"{kind}: {_OWN_CONV_FORWARD}, which cannot be checked without floating-point weights with data"
        cin, *kernel = self.spec.a_row_shape
        gen = torch.Generator().manual_seed(0)
        size = [(k - 1) * d + 1 + s for k, d, s in zip(kernel, base.dilation, base.stride)]
        probe, w1, w2 = (
            torch.randn(shape, generator=gen) for shape in ((1, cin, *size), (2, cin, *kernel), (2, cin, *kernel))
        )
        probe, w1, w2 = (t.to(weight.device, weight.dtype) for t in (probe, w1, w2))
        try:
            with torch.no_grad():
                got, want = base._conv_forward(probe, w1 + w2, None), base._conv_forward(probe, w1, None)
                want = want + base._conv_forward(probe, w2, None)
        except Exception as exc:  # the module's own code: anything can happen
            return f"{kind}: {_OWN_CONV_FORWARD}, and calling it with a probe weight raised {type(exc).__name__}: {exc}"
        off = mismatch(got, want)
        if off is not None:
            return f"{kind}: {_OWN_CONV_FORWARD}, and it is not linear in its weight (off by up to {off[0]:.3g})"
        return None

    def merge_operands(self, a: torch.Tensor, bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv weight ``[out, in * prod(kernel)]``: ``B @ A``."""
        return bt.t(), a
