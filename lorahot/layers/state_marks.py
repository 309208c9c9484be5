"""Activation checkpointing's recompute, checked against the runtime calls since its forward.

``torch.utils.checkpoint`` (``use_reentrant=False``, what transformers' and diffusers'
gradient checkpointing use by default) keeps no activations of a checkpointed forward: the
backward runs that forward again. A LoRA layer then computes with the slot, routing, scales
and weights in force at the backward, so a ``load``, ``activate``, ``set_scale`` or ``unload``
between the forward and its backward would give the backward the new state's gradients, with
no error (a routing change of the same batch size: gradients off by up to 293 on a tiny model).

Where a forward runs under saved-tensor hooks (what checkpointing installs) with autograd
recording it, each layer adds to its output a zero from :class:`_Mark`, which saves a
one-element tensor holding the count of runtime calls made so far on the layer's arena
(:data:`CALLS`) and keeps the same count on its context. A recompute saves the count of its
own time in its place: where a call came in between, the two differ and the backward raises a
:class:`~lorahot.errors.UsageError` naming the layer. Without checkpointing the saved count is
the forward's own, and nothing is refused (a backward after a call is then the forward's, or
torch's own in-place error: ``tests/system/test_autograd.py``). A reentrant checkpoint runs its
forward without autograd and is not seen. Compiled forwards are not marked.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from lorahot.errors import UsageError

__all__ = ["CALLS", "count_calls", "marked"]

#: arena handle key -> runtime calls (load, activate, set_scale, unload) made on that arena so
#: far, interrupted or failed ones included (a failed call may have emptied a slot)
CALLS: dict[int, int] = {}

_top_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)


def count_calls(keys: Iterable[int]) -> None:
    """Counts one more runtime call on each arena of ``keys``."""
    for key in keys:
        CALLS[key] = CALLS.get(key, 0) + 1


def marked(y: torch.Tensor, key: int, layer: Any) -> torch.Tensor:
    """``y``, plus a zero that :class:`_Mark` records, where autograd records this forward under
    saved-tensor hooks (activation checkpointing), eagerly; else ``y`` itself. (An identity
    :class:`torch.autograd.Function` on ``y`` would return a view of it, which a model's in-place
    op on the layer's output, ``ReLU(inplace=True)``, may not modify.) ``layer`` names itself
    in a refusal (``_describe()``, called only where the output is marked)."""
    if not (torch.is_grad_enabled() and y.requires_grad) or torch.compiler.is_compiling():
        return y
    if _top_hooks is not None and _top_hooks(False) is None:  # no saved-tensor hooks: no recompute
        return y
    zero = torch.zeros((), dtype=y.dtype, device=y.device, requires_grad=True)
    mark: torch.Tensor = _Mark.apply(zero, torch.tensor(CALLS.get(key, 0)), layer._describe())
    return y + mark


class _Mark(torch.autograd.Function):
    """A copy of the zero ``zero`` that saves the call count ``count`` and refuses a backward
    whose saved count (a recompute's) is not its forward's."""

    @staticmethod
    def forward(zero: torch.Tensor, count: torch.Tensor, where: str) -> torch.Tensor:
        return zero.clone()

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        _, count, where = inputs
        ctx.save_for_backward(count)
        ctx.count, ctx.where = int(count), where

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (count,) = ctx.saved_tensors
        if int(count) != ctx.count:
            raise UsageError(
                f"{ctx.where}: this backward recomputes a checkpointed forward (torch.utils.checkpoint, gradient "
                f"checkpointing), and {int(count) - ctx.count} runtime call(s) (load, activate, set_scale, unload) "
                "came between that forward and its backward: the recompute would compute with the new slot, routing "
                "or scales, and give their gradients, not the forward's. Run each backward before the next runtime "
                "call (one micro-batch at a time), or turn gradient checkpointing off."
            )
        return grad, None, None
