"""``StyledLoRALinear`` and ``StyledLoRAEmbedding``: LoRA on a linear or an embedding that
transformers' own tensor parallelism sharded.

``from_pretrained(..., tp_plan="auto")`` (or ``distributed_config=DistributedConfig(...)``)
shards a model by its config's ``base_model_tp_plan``: each entry names a style, and the style
makes the weight a DTensor on the tensor-parallel mesh and sets a ``forward`` on the module
instance that redistributes the input, calls ``nn.Linear.forward`` and redistributes the output
(no hooks: the redistribution is inside the call). Every registered style hands plain local
tensors in and out (``use_local_output``), with autograd on or off: off, the local weight
computes on the local input; on, the same through DTensors, made local again at the end.
lorahot calls that forward as it is, for the base output, and adds the LoRA delta to what it
returns:

- ``colwise`` (``ColwiseParallel``, weight ``Shard(0)``): the input is replicated, the output
  this rank's slice of the output features. A whole, B's rows of this rank:
  ``B_local(s * A(x))`` is this rank's slice of the delta, no collective;
- ``rowwise`` (``RowwiseParallel``, weight ``Shard(1)``): the input is this rank's slice of
  the input features and the output comes back whole, all-reduced (plus the bias) inside the
  call. A's columns of this rank, B whole: the shrink ``h = x_local @ A_local^T`` ``[tokens, R]``
  is a partial sum, summed across the ranks by one all-reduce (a functional collective, which
  ``torch.compile`` traces into the graph), then expanded whole: ``B(s * h)``. That is one small
  collective per row-parallel layer more; joining the base's all-reduce instead would mean
  computing the base without the style's forward, i.e. redoing what transformers does inside it
  (which parameters are local, where the bias goes), which lorahot does not depend on;
- ``colwise_gather_output`` / ``colwise_rep`` (``ColwiseParallel`` with a replicated output,
  as on Llama's ``lm_head``) and ``rowwise_split_input`` / ``rowwise_rep`` (``RowwiseParallel``
  with a replicated input): input and output are whole on every rank, so the layer takes a
  whole LoRA, computed the same on every rank, no collective;
- ``embedding_rowwise`` (``EmbeddingParallel(shard_dim=0)``, which transformers puts on every
  model's ``embed_tokens`` once it has a tp_plan: weight ``Shard(0)``, the vocabulary split by
  rank; the ids are replicated, a rank's lookup of an id outside its rows is zero, and the
  partial outputs are all-reduced inside the call) and ``embedding_colwise`` (``shard_dim=1``,
  the slices of every vector gathered inside the call): the output is whole on every rank, so
  the layer takes a whole LoRA, ``A [R, vocab]`` and ``B``, computed the same on every rank, no
  collective (:class:`StyledLoRAEmbedding`). Cutting A's vocabulary like the weight would save
  ``R x vocab / n`` elements per rank (a few MB next to the table's shard) at the cost of an
  all-reduce of the ``[tokens, R]`` lookup on every call.

Recognized from the forward transformers sets (its ``TensorParallelLayer`` style, the module it
was installed on, and ``nn.Linear.forward`` inside it), never from the model's plan, which may
not be what ran. Any other style (``unit_colwise`` and ``packed_colwise``, whose heads or
packed halves are laid out otherwise; MoE experts, sequence-parallel layouts; a quantized
layer's local path; an embedding class with a forward of its own, such as Gemma's scaled one),
a forward set over transformers', and any other engine's forward
is refused at inject with :class:`~lorahot.errors.UsageError` naming the style and the fix
(``parallelize_module``, which :class:`~lorahot.layers.sharded.ShardedLoRALinear` follows).
Loads, stacks, per-row routing and the agreement across ranks are those of
:class:`~lorahot.layers.sharded.ShardedLoRALinear`; the fused kernels are not used here (they
compute the base from the weight, without the style's forward).
"""

from __future__ import annotations

import math
import sys
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from lorahot.errors import UsageError
from lorahot.layers import routing
from lorahot.layers.embedding import LoRAEmbedding
from lorahot.layers.linear import LoRALinear
from lorahot.layers.refusal import literal, refuse
from lorahot.layers.sharded import (
    ShardedLoRALinear,
    _is_dtensor,
    is_sharded,
    mesh_of,
    own_forward_refusal,
    placed_shard,
    shard_of,
)

__all__ = ["StyledLoRALinear", "StyledLoRAEmbedding", "is_styled", "is_styled_embedding", "style_of"]

_FUNCOL = "torch.distributed._functional_collectives"
#: What lorahot computes, by the style's class and its (input, output) layouts.
_LAYOUTS = {
    ("ColwiseParallel", "Replicate", "Shard(-1)"): "out",
    ("ColwiseParallel", "Replicate", "Replicate"): "whole",
    ("RowwiseParallel", "Shard(-1)", "Replicate"): "in",
    ("RowwiseParallel", "Replicate", "Replicate"): "whole",
}


def is_styled(module: nn.Module) -> bool:
    """Whether ``module`` is tensor-parallel (a DTensor weight) with a ``forward`` of the
    instance's own: transformers' styles, or another engine :class:`StyledLoRALinear` refuses."""
    return is_sharded(module) and "forward" in module.__dict__


def is_styled_embedding(module: nn.Module) -> bool:
    """Whether ``module`` is an ``nn.Embedding`` :func:`is_styled` (:class:`StyledLoRAEmbedding`)."""
    return isinstance(module, nn.Embedding) and is_styled(module)


def style_of(module: nn.Module) -> tuple[Any, Any] | None:
    """``(style, inner forward)`` where ``module``'s ``forward`` is the one a transformers
    ``TensorParallelLayer`` style installed on it, else None."""
    forward = module.__dict__.get("forward")
    closure, code = getattr(forward, "__closure__", None), getattr(forward, "__code__", None)
    if not closure or code is None:
        return None
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in closure)))
    style = cells.get("self")
    ours = any(
        c.__name__ == "TensorParallelLayer" and c.__module__.startswith("transformers.") for c in type(style).__mro__
    )
    if not ours or cells.get("module") is not module:
        return None
    return style, cells.get("original_forward")


def _placement(p: Any) -> str:
    """``"Replicate"``, ``"Shard(-1)"``, ... as the layouts table names them (a tuple of
    placements, as some styles keep, by its items)."""
    if isinstance(p, (tuple, list)):
        return f"({', '.join(map(_placement, p))})"
    kind = type(p).__name__
    return f"{kind}({p.dim})" if kind == "Shard" else kind


def _layout(module: nn.Module, style: Any, inner: Any) -> tuple[str | None, str]:
    """What lorahot computes for ``module`` under ``style`` (``"out"``, ``"in"`` or
    ``"whole"``), or None and why not; with the style as messages name it."""
    layouts = (getattr(style, "input_layouts", None), getattr(style, "output_layouts", None))
    name = type(style).__name__
    shown = f"transformers' {name}" + (
        f" (input {_placement(layouts[0])}, output {_placement(layouts[1])})" if None not in layouts else ""
    )
    layout = _LAYOUTS.get((name, _placement(layouts[0]), _placement(layouts[1]))) if None not in layouts else None
    if layout is None:
        return None, f"{shown} is not a style lorahot computes LoRA for"
    if type(module) is not nn.Linear:
        return None, f"{shown} shards a {type(module).__name__} here; lorahot computes it on an nn.Linear only"
    if getattr(inner, "__func__", None) is not nn.Linear.forward or getattr(inner, "__self__", None) is not module:
        return None, f"{shown} wraps a forward other than nn.Linear's here (a kernel's or a quantized one)"
    if getattr(module, "_hf_quantized_needs_local_tp", False) or getattr(style, "use_local_output", None) is not True:
        return None, f"{shown} runs a quantized local path or hands out DTensors here"
    return layout, shown


def _refusal(module: nn.Module, why: str) -> str:
    return (
        f"cannot add LoRA to this tensor-parallel {type(module).__name__}: {why}. lorahot computes LoRA on an "
        "nn.Linear that transformers' tp_plan sharded with colwise, rowwise, colwise_gather_output / colwise_rep or "
        "rowwise_split_input / rowwise_rep, and on an nn.Embedding sharded with embedding_rowwise / "
        "embedding_colwise; not unit_colwise / packed_colwise (their heads or packed halves are laid out otherwise), "
        "MoE experts, sequence-parallel layouts or an embedding class with a forward of its own. Exclude this module "
        "from targets, or load the model unsharded and parallelize it with "
        "torch.distributed.tensor.parallel.parallelize_module (ColwiseParallel / RowwiseParallel), which lorahot "
        "follows, then inject."
    )


class StyledLoRALinear(ShardedLoRALinear):
    """LoRA on an ``nn.Linear`` that transformers' tensor parallelism sharded; see the module
    docstring. Buffers as :class:`~lorahot.layers.sharded.ShardedLoRALinear`'s (this rank's
    part), or of the whole layer where its input and output are replicated (``spec.shard``
    None). The forward is :class:`~lorahot.layers.base.LoRALayer`'s: the base output (the
    style's forward) plus the delta; a ``rowwise`` layer sums its shrink across the ranks.
    """

    forward = LoRALinear.forward

    def __init__(self, base_layer: nn.Module) -> None:
        found = style_of(base_layer)
        if found is None:
            raise UsageError(own_forward_refusal(base_layer))
        layout, why = _layout(base_layer, *found)
        if layout is None:
            raise UsageError(_refusal(base_layer, why))
        shard = shard_of(base_layer)
        if layout != "whole" and shard.dim != layout:
            raise UsageError(_refusal(base_layer, f"{why} holds a weight sharded on its {shard.dim}puts"))
        self._bind(base_layer, None if layout == "whole" else shard)
        if layout == "whole":  # a copy of the base weight an adapter carries is compared with this rank's slice
            self.spec = replace(self.spec, weight_shard=shard)
        group = None
        if layout == "in" and shard.ranks > 1:
            __import__(_FUNCOL)  # the traceable all-reduce, read from sys.modules by the forward
            group = self.mesh.get_group().group_name
        object.__setattr__(self, "_summed_over", group)

    def attach(self) -> None:
        """Binds as an unsharded layer does: the style's redistribution is inside the base's
        forward, and any hooks on the base module stay there."""
        LoRALinear.attach(self)

    def detach(self) -> None:
        LoRALinear.detach(self)

    def fusable(self, lora_A: torch.Tensor) -> bool:
        return False

    def lora_delta(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if _is_dtensor(x) or x.dim() == 0 or x.shape[-1] != a.shape[-1]:
            return self._refuse_styled_input(x)
        h = self._summed(torch.matmul(x.to(a.dtype), a.t()))  # (..., R)
        return torch.matmul((h * scale).to(h.dtype), b)  # (..., out)

    def routed_delta(
        self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, index: torch.Tensor
    ) -> torch.Tensor:
        """:meth:`LoRALinear.routed_delta`, the shrink of each row's own slot summed across the
        ranks (``[L, T, R]``) before its expand where the layer is ``rowwise``."""
        if self._summed_over is None or _is_dtensor(x):
            if _is_dtensor(x):
                return self._refuse_styled_input(x)
            return super().routed_delta(x, a, b, scales, index)
        if x.dim() == 0 or x.shape[-1] != a.shape[-1]:
            return self._refuse_styled_input(x)
        length = index.shape[0]
        x3 = x.reshape(length, math.prod(x.shape[:-1]) // length, x.shape[-1]).to(a.dtype)  # (L, T, in)
        slots, rank = b.shape[0], b.shape[1]
        if routing.gathers(length, x3.shape[1], slots) and routing.batched_products(x):
            h = self._summed(torch.bmm(x3, a[index].transpose(1, 2)))  # (L, T, R)
            h = (h * scales[:, None, :]).to(h.dtype)
            return torch.bmm(h, b[index]).reshape(*x.shape[:-1], b.shape[-1])  # (..., out)
        k = x.shape[-1]
        every = torch.matmul(x3, a.expand(slots, rank, k).reshape(slots * rank, k).t()).unflatten(-1, (slots, rank))
        own = (index[:, None] == torch.arange(slots, device=index.device))[:, None, :, None]  # (L, 1, S, 1)
        h = self._summed(torch.where(own, every, 0).sum(-2))  # (L, T, R): each row's own slot, selected
        h = h.unsqueeze(-2).expand(*h.shape[:-1], slots, rank)  # (L, T, S, R); the expand keeps the own slot
        return routing.every_slot_expand(h, b, scales, index).reshape(*x.shape[:-1], b.shape[-1])  # (..., out)

    def _summed(self, h: torch.Tensor) -> torch.Tensor:
        """``h`` summed across the ranks where the layer is ``rowwise`` (each rank's shrink is a
        partial sum over its input features); ``h`` itself otherwise."""
        group = self._summed_over
        if group is None:
            return h
        summed: torch.Tensor = sys.modules[_FUNCOL].all_reduce(h, "sum", group)
        return summed

    def _refuse_styled_input(self, x: torch.Tensor) -> torch.Tensor:
        """Refuses an input that is a DTensor (transformers' styles hand plain local tensors from
        layer to layer) or whose last dimension is not this rank's input features."""
        if not _is_dtensor(x):
            return self._refuse_input(x)
        message = literal(
            f"{self._describe()}: its input is a DTensor; transformers' tensor-parallel styles hand plain local "
            "tensors from layer to layer (use_local_output), which is what lorahot computes this layer's LoRA on. "
            "Call it with the local tensor (x.to_local()), or parallelize with parallelize_module."
        )
        return refuse(message, lambda: x.new_zeros(()))


def _embedding_layout(module: nn.Module, style: Any, inner: Any) -> str | None:
    """Why lorahot cannot compute a whole LoRA on the embedding ``module`` under ``style``, or None."""
    name = type(style).__name__
    if name != "EmbeddingParallel":
        return f"transformers' {name} is not a style lorahot computes LoRA for on an embedding"
    shown = f"transformers' {name} (shard_dim={getattr(style, 'shard_dim', None)})"
    if type(module).forward is not nn.Embedding.forward:
        return f"{shown} shards a {type(module).__name__}, whose class has a forward of its own"
    if getattr(inner, "__func__", None) is not nn.Embedding.forward or getattr(inner, "__self__", None) is not module:
        return f"{shown} wraps a forward other than nn.Embedding's here (a kernel's or a quantized one)"
    if getattr(module, "_hf_quantized_needs_local_tp", False) or getattr(style, "use_local_output", None) is not True:
        return f"{shown} runs a quantized local path or hands out DTensors here"
    return None


class StyledLoRAEmbedding(LoRAEmbedding):
    """LoRA on an ``nn.Embedding`` that transformers' ``embedding_rowwise`` (or
    ``embedding_colwise``) sharded; see the module docstring. Its output is whole on every rank,
    so the LoRA is whole too: buffers ``lora_A [R, vocab]``, ``lora_B [R, dim]`` as
    :class:`~lorahot.layers.embedding.LoRAEmbedding`'s, the same on every rank; a copy of the
    base table an adapter carries (PEFT saves ``embed_tokens``' own) is cut to this rank's slice
    before it is compared (``spec.weight_shard``). The base output is the style's forward.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        found = style_of(base_layer)
        if found is None:
            raise UsageError(own_forward_refusal(base_layer))
        why = _embedding_layout(base_layer, *found)
        if why is not None:
            raise UsageError(_refusal(base_layer, why))
        shard = placed_shard(base_layer)
        super().__init__(base_layer)  # the DTensor's global shape: the whole [vocab, dim]
        self.spec = replace(self.spec, weight_shard=shard)
        object.__setattr__(self, "_mesh", mesh_of(base_layer))

    @property
    def mesh(self) -> Any:
        """The 1-D device mesh the base weight lives on (the ranks' loads agree over it)."""
        return self._mesh

    def merge_refusal(self) -> str | None:
        return "merged mode does not rewrite tensor-parallel (DTensor) weights; inject without merged=True"

    def dora_refusal(self) -> str | None:
        return (
            "DoRA does not run on a tensor-parallel embedding (its factor needs the norm of each embedding dimension "
            "over the whole table); load it on an unsharded model"
        )

    def lora_bias_refusal(self) -> str | None:
        return "a LoRA bias (lora_bias) does not run on a tensor-parallel layer; load it on an unsharded model"
