"""``ShardedLoRALinear``: LoRA on a linear that ``torch.distributed.tensor.parallel`` sharded.

``parallelize_module`` turns a linear's weight into a DTensor on a 1-D device mesh and puts two
hooks on the module: one makes the input a DTensor of the layout the style wants, the other
redistributes the output (and, with ``use_local_output``, hands back a plain tensor):

- ``ColwiseParallel``: weight ``Shard(0)``, input replicated, output sharded on its last
  dimension (``Shard(-1)``);
- ``RowwiseParallel``: weight ``Shard(1)``, input sharded on its last dimension, output
  ``Partial`` (each rank holds a partial sum) until the output hook reduces it (all-reduce
  to ``Replicate``, or reduce-scatter to ``Shard(1)`` under sequence parallelism).

The LoRA layer sits *inside* those hooks: at inject the module's forward hooks move to the
wrapper (and move back at eject), so the wrapper receives the DTensor the pre-hook made and
returns a DTensor with the base output's placement, which the output hook then
redistributes. Each rank holds only its part of the adapter, in buffers of its local shape:

- column-parallel (``Shard(0)``, :attr:`Shard.dim` ``"out"``): A whole (replicated), B's rows
  of this rank's output channels. ``x`` is replicated, so ``B_local(s * A(x))`` is exactly this
  rank's slice of the delta: no communication at all;
- row-parallel (``Shard(1)``, ``"in"``): A's columns of this rank's input features, B whole.
  ``h = x_local @ A_local^T`` is a partial sum of the shrink, and since the expand is linear,
  ``B(s * h_partial)`` is this rank's partial sum of the delta: it is added to the base's
  partial output *before* the output hook's reduction, which then sums base and LoRA in the
  one collective it runs anyway. No extra collective; exact up to summation order. (A
  row-parallel output that comes back already reduced is refused here; a layer transformers'
  own tensor parallelism sharded, whose forward reduces inside the call, all-reduces the
  rank-sized ``h`` instead: :mod:`lorahot.layers.styled`.)

The arithmetic runs on the local tensors (``to_local``), with the same views and formulas as
:class:`~lorahot.layers.linear.LoRALinear`, per-row routing included. On CUDA in fp16/bf16 the
fused kernels run on this rank's shards where they pay for the rows (decode and short
prefill): base and LoRA of the local weight, A and B in one kernel per layer (or the routed
pair), the result wrapped as the output DTensor the base would have made (``Shard(-1)``, or
``Partial`` for the output hook to reduce); a row-parallel layer with a bias keeps the library
formula, its bias being added once after the reduction. Not supported on a sharded layer: the
wide path (it moves the weight into a buffer of its own), merged mode, DoRA and LoRA biases
(their per-channel terms would need the whole weight's norms, or would be summed once per
rank); each is refused with the reason. A sharded linear with a ``forward`` of the instance's
own redistributes inside that call, out of the hooks' reach: transformers' tensor-parallel
styles set one, and :class:`~lorahot.layers.styled.StyledLoRALinear` (a subclass) computes
their common ones; any other such forward is refused (:func:`own_forward_refusal`).

lorahot never imports ``torch.distributed.tensor`` itself: a DTensor can only exist once the
user's code has imported it.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from lorahot.errors import UsageError
from lorahot.kernels import lora_linear as fused_kernel
from lorahot.kernels import routed_lora as routed_kernel
from lorahot.layers.base import LayerSpec, Shard, library_operands
from lorahot.layers.base_guards import is_dtensor as _is_dtensor
from lorahot.layers.linear import LoRALinear
from lorahot.layers.refusal import literal, refuse
from lorahot.layers.tensor_handles import ROUTES

__all__ = ["ShardedLoRALinear", "is_sharded", "shard_of", "placed_shard", "mesh_of", "own_forward_refusal"]

#: The forward hooks of a module, as ``nn.Module`` keeps them (dicts swapped whole, so the
#: handles ``register_forward_hook`` returned keep working on whichever module holds them).
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def is_sharded(module: nn.Module) -> bool:
    """Whether ``module``'s weight is a DTensor (a module ``parallelize_module`` distributed). A
    parametrized weight is not read (each read runs the parametrization, and a ``spectral_norm``
    steps its power iteration in training mode; every runtime call asks): the tensors it is
    computed from are."""
    if parametrize.is_parametrized(module, "weight"):
        stored: nn.Module = module.parametrizations["weight"]  # type: ignore[index,assignment]
        return any(_is_dtensor(t) for t in (*stored._parameters.values(), *stored._buffers.values()))
    return _is_dtensor(getattr(module, "weight", None))


def mesh_of(module: nn.Module) -> Any:
    """The device mesh of ``module``'s DTensor weight."""
    weight: Any = module.weight
    return weight.device_mesh


def shard_of(module: nn.Module) -> Shard:
    """The slice of ``module``'s weight (a DTensor) this rank holds.

    Raises:
        UsageError: the module is not an ``nn.Linear``; the mesh is not 1-D; the weight is not
            ``Shard(0)`` (column-parallel) or ``Shard(1)`` (row-parallel); the local shard is not
            the ``torch.chunk`` slice DTensor makes.
    """
    weight: Any = module.weight
    if not isinstance(module, nn.Linear):
        raise UsageError(
            f"cannot add LoRA to a tensor-parallel {type(module).__name__} (weight placements {weight.placements}); "
            "lorahot shards LoRA with nn.Linear layers only (ColwiseParallel / RowwiseParallel). Exclude it from "
            "targets."
        )
    return placed_shard(module)


def placed_shard(module: nn.Module) -> Shard:
    """The slice of ``module``'s 2-D DTensor weight this rank holds, whatever the module:
    :attr:`Shard.dim` ``"out"`` for ``Shard(0)`` (rows of the weight), ``"in"`` for ``Shard(1)``.

    Raises:
        UsageError: the mesh is not 1-D; the weight is not ``Shard(0)`` or ``Shard(1)``; the
            local shard is not the ``torch.chunk`` slice DTensor makes.
    """
    weight: Any = module.weight
    kind = type(module).__name__
    mesh = weight.device_mesh
    placements = tuple(weight.placements)
    dims = {0: "out", 1: "in"}
    placement = placements[0] if len(placements) == 1 else None
    dim = getattr(placement, "dim", None) if type(placement).__name__ == "Shard" else None
    if mesh.ndim != 1 or dim not in dims:
        raise UsageError(
            f"{kind} weight is a DTensor on a {mesh.ndim}-D mesh with placements {placements}; lorahot supports "
            "tensor-parallel linears on a 1-D mesh, sharded Shard(0) (ColwiseParallel) or Shard(1) (RowwiseParallel). "
            "Exclude this module from targets."
        )
    size, ranks, rank = int(weight.shape[dim]), mesh.size(), mesh.get_local_rank()
    chunk = -(-size // ranks)  # torch.chunk: ceil(size / ranks) per rank, the last ones shorter or empty
    start, stop = min(rank * chunk, size), min((rank + 1) * chunk, size)
    local = int(weight.to_local().shape[dim])
    if local != stop - start:
        raise UsageError(
            f"{kind} weight is sharded unevenly in a way lorahot does not follow: rank {rank} of {ranks} holds {local} "
            f"of {size} along dim {dim}, expected {stop - start}. Shard with parallelize_module's default layouts."
        )
    return Shard(dims[dim], start, stop, size, rank, ranks)


def own_forward_refusal(module: nn.Module) -> str:
    """Why a tensor-parallel ``module`` with a ``forward`` of the instance's own that is none of
    the transformers styles :mod:`lorahot.layers.styled` computes cannot take LoRA."""
    return (
        f"cannot add LoRA to this tensor-parallel {type(module).__name__}: its forward is the instance's own and "
        "not one of transformers' tensor-parallel styles lorahot recognizes (another engine, or a forward set over "
        "transformers'), which may redistribute the input and output inside the call, where lorahot cannot place the "
        "LoRA delta: a row-parallel layer's output would come back already reduced, and each rank's partial delta "
        "would be added after the reduction, a wrong sum. lorahot follows parallelize_module's hooks: load the model "
        "unsharded and parallelize it with torch.distributed.tensor.parallel.parallelize_module (ColwiseParallel / "
        "RowwiseParallel), then inject; or exclude this module from targets."
    )


def _local(t: Any) -> torch.Tensor:
    return t.to_local() if _is_dtensor(t) else t  # type: ignore[no-any-return]


class ShardedLoRALinear(LoRALinear):
    """LoRA on a tensor-parallel ``nn.Linear``; see the module docstring.

    Buffers (views into the arena, this rank's part only): ``lora_A [R, in_local]``,
    ``lora_B [R, out_local]`` (B transposed), ``lora_scale [R]``; ``in_local`` is the whole
    ``in`` for a column-parallel layer, ``out_local`` the whole ``out`` for a row-parallel one.
    """

    def __init__(self, base_layer: nn.Module) -> None:
        if "forward" in base_layer.__dict__:
            raise UsageError(own_forward_refusal(base_layer))
        self._bind(base_layer, shard_of(base_layer))

    def _bind(self, base_layer: nn.Module, shard: Shard | None) -> None:
        """Wraps ``base_layer``; buffers of this rank's part of the layer where ``shard`` is given,
        of the whole layer where it is None (a layer whose input and output are replicated)."""
        LoRALinear.__init__(self, base_layer)
        if shard is not None:
            local = _local(base_layer.weight)
            out, fin = int(local.shape[0]), int(local.shape[1])
            self.spec = LayerSpec("linear", fin, out, (fin,), shard=shard)
        object.__setattr__(self, "_mesh", mesh_of(base_layer))
        object.__setattr__(self, "_hooks_taken", False)

    @property
    def mesh(self) -> Any:
        """The 1-D device mesh the base weight lives on."""
        return self._mesh

    def attach(self) -> None:
        """Takes over the base module's forward hooks (``parallelize_module``'s input and
        output redistribution), so that they run around base *and* LoRA."""
        super().attach()
        if not self._hooks_taken:
            self._swap_hooks()

    def detach(self) -> None:
        """Gives the forward hooks back to the base module (once, however often it is called)."""
        super().detach()
        if self._hooks_taken:
            self._swap_hooks()

    def _swap_hooks(self) -> None:
        object.__setattr__(self, "_hooks_taken", not self._hooks_taken)
        for name in _HOOK_DICTS:
            mine, theirs = getattr(self, name), getattr(self.base_layer, name)
            object.__setattr__(self, name, theirs)
            object.__setattr__(self.base_layer, name, mine)

    def fusable(self, lora_A: torch.Tensor) -> bool:
        """The fused kernels run on this rank's shards (:meth:`kernel_weights`) where they run
        on plain tensors; a row-parallel layer with a bias keeps the library formula (its bias
        is added once, after the reduction, not on every rank)."""
        base = self.base_layer
        bias = getattr(base, "bias", None)
        rows_split = self.spec.shard is not None and self.spec.shard.dim == "in"
        if type(base) is not nn.Linear or (rows_split and bias is not None):
            return False
        weight, local_bias = self.kernel_weights()
        return fused_kernel.supports_tensors(weight, local_bias, lora_A) and routed_kernel.available()

    def kernel_weights(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's shard of the weight (and of a column-parallel layer's bias)."""
        base = self._base
        bias = base.bias
        return _local(base.weight), None if bias is None else _local(bias)

    def widenable(self, max_rank: int, dtype: torch.dtype) -> bool:
        return False

    def merge_refusal(self) -> str | None:
        return "merged mode does not rewrite tensor-parallel (DTensor) weights; inject without merged=True"

    def dora_refusal(self) -> str | None:
        return (
            "DoRA does not run on a tensor-parallel layer (its factor needs the norm of each output channel of the "
            "whole weight); load it on an unsharded model"
        )

    def lora_bias_refusal(self) -> str | None:
        return "a LoRA bias (lora_bias) does not run on a tensor-parallel layer; load it on an unsharded model"

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        # ``x`` is the DTensor the input hook made; the base computes its output DTensor
        # (column-parallel: Shard(-1); row-parallel: Partial); the LoRA part joins it locally.
        if args:
            x, args = args[0], args[1:]
        else:  # by keyword, as the base module takes it (LoRALayer.forward)
            if self._plan[9] not in kwargs:
                self.refuse_keyword_call(kwargs)
            x = kwargs.pop(self._plan[9])
        x_local = _local(x)
        if _is_dtensor(x) and not self._input_fits(x):  # a local slice the LoRA part cannot take as it is
            misplaced = literal(self._misplaced(x))
            return self._as_output(x, refuse(misplaced, lambda: _local(self._base(x, *args, **kwargs))))
        route = ROUTES[self._plan[4]]
        if route is not None and self._plan[8]:  # an MoE expert or a vision tower: no routed slot has weights here
            base_out: torch.Tensor = self._base(x, *args, **kwargs)
            return base_out
        if route is not None:  # one slot per row, from the slot views
            refused = self._misfit(x_local, route, lambda: _local(self._base(x, *args, **kwargs)))
            if refused is not None:  # the local base output as what the graph carries on with
                return self._as_output(x, refused)
            a, b, s, _ = self._slot_views()
        else:
            a, b, s, _ = self._views(False)
        if self._plan[1] and not args and not kwargs:  # the fused kernels, on this rank's shards
            z = self._fused_local(x_local, a, b, s, route)
            if z is not None:
                return self._as_output(x, z)
        y = self._base(x, *args, **kwargs)
        y_local = _local(y)
        if self._reduced(y):
            reduced = (
                f"{self._describe()}: the row-parallel base output is already reduced ({y.placements}); lorahot adds "
                "each rank's partial LoRA delta before the output hook's reduction and needs it Partial. Parallelize "
                "with RowwiseParallel."
            )
            return self._as_output(x, refuse(literal(reduced), lambda: y_local))
        if route is not None:
            z = self.routed_sum(x_local, y_local, a, b, s, route)
        else:
            z = y_local + self.lora_delta(x_local, *library_operands(a, b), s).to(y_local.dtype)
        if not _is_dtensor(y):
            return z
        out: torch.Tensor = type(y).from_local(
            z, y.device_mesh, y.placements, run_check=False, shape=y.shape, stride=y.stride()
        )
        return out

    def _fused_local(
        self, x_local: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: torch.Tensor, route: torch.Tensor | None
    ) -> torch.Tensor | None:
        """Base and LoRA of this rank's shards in the fused kernels (routed per row where
        ``route`` is given, over the slot views), where they pay for this many rows; else None."""
        if route is not None:
            return self.routed_fused(x_local, a, b, s, route)
        return self.fused_forward(x_local, a, b, s) if self.can_fuse(x_local, a) else None

    def _as_output(self, x: Any, z: torch.Tensor) -> torch.Tensor:
        """The local result ``z`` as the output DTensor the base would have made: sharded on its
        last dimension (column-parallel) or a partial sum that the output hook reduces
        (row-parallel), with the base output's global shape and contiguous strides."""
        if not _is_dtensor(x):
            return z
        placements: Any = sys.modules["torch.distributed.tensor"]
        shard = self.spec.shard
        columns = shard is not None and shard.dim == "out"
        placement = placements.Shard(z.dim() - 1) if columns else placements.Partial()
        shape = (*z.shape[:-1], shard.size if columns and shard is not None else z.shape[-1])
        stride, step = [], 1
        for size in reversed(shape):
            stride.append(step)
            step *= size
        out: torch.Tensor = type(x).from_local(
            z, x.device_mesh, (placement,), run_check=False, shape=torch.Size(shape), stride=tuple(reversed(stride))
        )
        return out

    def _input_fits(self, x: Any) -> bool:
        """Whether the DTensor input ``x`` is laid out as the LoRA part reads its local tensor:
        replicated for a column-parallel layer (A is whole), sharded on its last dimension for a
        row-parallel one (A holds this rank's input columns), as ``ColwiseParallel`` /
        ``RowwiseParallel``'s input hooks make it."""
        shard, placements = self.spec.shard, tuple(x.placements)
        if shard is None or shard.dim == "out":
            return all(p.is_replicate() for p in placements)
        return len(placements) == 1 and placements[0].is_shard() and placements[0].dim in (-1, x.ndim - 1)

    def _misplaced(self, x: Any) -> str:
        """Why this layer refuses the DTensor input ``x`` (:meth:`_input_fits`)."""
        rows = self.spec.shard is not None and self.spec.shard.dim == "in"
        kind, style, needs = (
            ("row", "RowwiseParallel", "Shard(-1)") if rows else ("column", "ColwiseParallel", "Replicate()")
        )
        return (
            f"{self._describe()}: its input is a DTensor placed {tuple(x.placements)}, but this {kind}-parallel "
            f"layer's LoRA reads the local input and needs it {needs}; computed on this rank's slice as it is, the "
            f"delta would be wrong. parallelize_module's {style} redistributes an input from the layout its "
            "input_layouts declares, not from the one a DTensor input has: declare that one "
            f"({style}(input_layouts=...), such as Shard(1) after a SequenceParallel norm), or redistribute the "
            f"input to {needs} before the call."
        )

    def _reduced(self, y: Any) -> bool:
        """Whether a row-parallel layer's base output is already reduced (not ``Partial``):
        then a partial delta could not ride in the output hook's reduction."""
        shard = self.spec.shard
        if shard is None or shard.dim != "in" or not _is_dtensor(y):
            return False
        return not any(p.is_partial() for p in y.placements)
