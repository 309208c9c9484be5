"""The extras a compiled DoRA forward's backward reads: a copy of its own, made in the forward.

A layer's extras (the DoRA factor ``f``, ``g``, the LoRA bias) are views into the arena. The
backward of ``f * z + g`` reads ``f``, so a graph that autograd records saves it, and an eager
forward of a layer whose base was written in place computes the factors again into the arena
(:meth:`lorahot.layers.LoRALayer._check_dora_base`), without moving the arena's version counter.
An eager forward computes with its own copy of the extras (:meth:`LoRALayer._dora_views`); a
compiled one cannot just ``clone`` them: AOTAutograd's partitioner recomputes a clone (it is in
its list of cheap ops) in the backward from the arena, which it saves instead, so a backward
still pending across such a recompute read the new factor (3.3 off PEFT's gradient on a tiny
float64 model, with every backend but ``"eager"``).

So under ``torch.compile``, where autograd records the layer's output, :func:`saved_extras`
copies the extras with the operator ``lorahot::saved_copy``, and the backward reads the copy the
forward made. The partitioner's default settings recompute only the aten operations of a list
(``ban_recompute_not_in_allowlist``); ``torch._functorch.config.aggressive_recomputation`` (or
that list turned off) lets it recompute any operator, this one too (2.96 off PEFT's gradient), so
the copy is also marked must-save, the way torch's own selective activation checkpointing marks
an operator: the call runs under :func:`torch.utils.checkpoint.checkpoint` with a policy that
answers ``CheckpointPolicy.MUST_SAVE`` (:func:`_must_save`). Dynamo records it as one
``tag_activation_checkpoint`` region holding the copy, AOTAutograd inlines it and leaves the tag
on the copy's node (``node.meta["recompute"]``), and the min-cut partitioner never recomputes a
node so tagged, under any of its options or a memory budget above 0 (at 0 it saves the graph's
inputs alone, every base weight among them, so a base write before the backward is torch's error
that a saved tensor was modified). The region adds nothing else to the compiled graphs (the same
forward and backward operations, no tag that asks for a recompute elsewhere); torch logs once
per process that a ``context_fn`` was passed under ``torch.compile`` and that the region must
hold no in-place op, which the copy does not. A graph without
gradients (``torch.no_grad``, inference, nothing requiring a gradient) and a layer without extras
trace nothing here: their graphs are as before. The copy has the shape of the extras (no
data-dependent size, no host sync), so a CUDA graph captures it.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from lorahot.kernels.op_registry import define, refuse_grad
from lorahot.layers.recording import _exporting

__all__ = ["saved_extras"]


def _fake(e: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(e)


@define("saved_copy(Tensor e) -> Tensor", _fake)
def _saved_copy(e: torch.Tensor) -> torch.Tensor:
    refuse_grad("saved_copy", e)
    return e.clone()


def _must_save(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
    """Selective checkpointing's policy for the copy's region: save every operator of it."""
    return CheckpointPolicy.MUST_SAVE


_SAVED = partial(create_selective_checkpoint_contexts, _must_save)


def saved_extras(e: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """The extras ``e`` the forward applies to ``z``: ``e`` itself eagerly and where autograd
    does not record ``z``; under ``torch.compile`` where it does, a copy the compiler's backward
    reads in place of the arena, marked must-save (see the module docstring). ``torch.export`` (which partitions
    nothing) records ``e`` itself.

    Args:
        e: a layer's extras, ``[4, out, *ones]`` (``[slots, 4, out, *ones]`` routed).
        z: the tensor the factor multiplies (the base output plus the update).

    Returns:
        ``e``, or a copy of it of the same shape.
    """
    if torch.compiler.is_compiling() and torch.is_grad_enabled() and z.requires_grad and not _exporting():
        out: torch.Tensor = checkpoint(torch.ops.lorahot.saved_copy, e, use_reentrant=False, context_fn=_SAVED)
        return out
    return e
