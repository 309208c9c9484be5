"""An adapter's part for one rank of a tensor-parallel model.

Adapter files hold every layer whole: ``A [r, in]``, ``B [out, r]``. A tensor-parallel layer
(:mod:`lorahot.layers.sharded`) keeps only its rank's part in its buffers: B's rows of its output
channels (column-parallel, :attr:`~lorahot.layers.base.Shard.dim` ``"out"``) or A's columns of its
input features (row-parallel, ``"in"``); the other factor is whole on every rank.

Every rank reads the adapter whole (from a file as from memory), so that the ranks can compare
all of it before any writes (:mod:`lorahot.runtime.fingerprint`): files that differ only in the
slices each rank keeps would otherwise load, and the ranks would compute with two adapters. Then:

- :func:`localize`, run by the load planner on every module bound for a sharded layer, checks
  the module's *full* shapes against the whole layer (so a file made for another model is
  refused the same on every rank) and then cuts this rank's part out of it, which every
  later step (value checks, stacking, the host cache, the copy into the buffers) treats like
  any other module;
- :func:`cut_factors` sums, before the cut, the whole of each factor the ranks hold slices of
  (:class:`CutFactor`), which the plan keeps for the ranks' comparison.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch

from lorahot.adapter import LoraModule
from lorahot.layers.base import LayerSpec, Shard
from lorahot.runtime.fingerprint import checksums

__all__ = ["localize", "cut_factors", "CutFactor", "describe_shard"]


@dataclass(frozen=True)
class CutFactor:
    """The factor of a module that the ranks of its tensor-parallel layer each hold a slice of
    (B of a column-parallel layer, A of a row-parallel one), as every rank read it whole.

    Attributes:
        factor: ``"A"`` or ``"B"``.
        dtype: its dtype.
        shape: its whole shape (``[r, in]`` or ``[out, r]``).
        sums: int64 ``[SUMS]`` on the host: :func:`lorahot.runtime.fingerprint.checksums` of
            its whole content, every rank's slice included.
    """

    factor: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    sums: torch.Tensor


def describe_shard(shard: Shard) -> str:
    """``"row-parallel, rank 1 of 2 holds inputs 32:64 of 64"``, for messages."""
    kind, what = ("row-parallel", "inputs") if shard.dim == "in" else ("column-parallel", "outputs")
    return f"{kind}, rank {shard.rank} of {shard.ranks} holds {what} {shard.start}:{shard.stop} of {shard.size}"


def localize(name: str, module: LoraModule, spec: LayerSpec) -> tuple[LoraModule, list[str]]:
    """``module``'s part for this rank of the sharded layer ``name``, or ``module`` and the
    problems with its shapes.

    A and B must fit the whole layer (``A [r, in]``, ``B [out, r]`` with the full ``in`` and
    ``out``); then the sharded factor is cut to this rank's slice (a contiguous copy), and so is
    a saved copy of the base weight (compared with this rank's shard of the model's). The rank
    is never cut: each rank keeps every row of A and every column of B it holds. A layer whose
    LoRA is whole over a sharded weight (:attr:`~lorahot.layers.base.LayerSpec.weight_shard`)
    keeps A and B whole and cuts only that copy.
    """
    shard = spec.shard
    if shard is None:
        return _weight_cut(module, spec.weight_shard), []
    a, b = module.A, module.B
    fin, fout = spec.full_dims()
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != fin or b.shape[0] != fout:
        where = f"{name} ({', '.join(module.source_keys or (module.key,))})"
        return module, [
            f"{where}: A has shape {tuple(a.shape)} and B {tuple(b.shape)}, expected (r, {fin}) and ({fout}, r) for "
            f"this tensor-parallel linear ({describe_shard(shard)})"
        ]
    span = slice(shard.start, shard.stop)
    base = module.base_weight
    if shard.dim == "in":
        a = a[:, span].contiguous()
        base = base[:, span] if base is not None and base.ndim == 2 else base
    else:
        b = b[span].contiguous()
        base = base[span] if base is not None and base.ndim == 2 else base
    return replace(module, A=a, B=b, base_weight=base), []


def _weight_cut(module: LoraModule, shard: Shard | None) -> LoraModule:
    """``module`` with its saved copy of the base weight cut to ``shard`` (the slice of the
    weight this rank holds, where the layer's LoRA is whole); ``module`` itself where there is
    no cut or no 2-D copy to make."""
    base = module.base_weight
    if shard is None or base is None or base.ndim != 2:
        return module
    span = slice(shard.start, shard.stop)
    return replace(module, base_weight=base[:, span] if shard.dim == "in" else base[span])


def cut_factors(modules: Mapping[str, LoraModule], specs: Mapping[str, LayerSpec]) -> dict[str, CutFactor]:
    """The factor :func:`localize` cuts of each of ``modules`` (layer name -> the module read
    whole, bound for a sharded layer of ``specs``), summed whole: one batched pass where the
    tensors are (the load's device, the host for a preload). A meta tensor sums to zeros."""
    cut = {name: "A" if specs[name].shard.dim == "in" else "B" for name in modules}  # type: ignore[union-attr]
    tensors = [getattr(modules[name], what) for name, what in cut.items()]
    sums = checksums(tensors)
    return {
        name: CutFactor(what, t.dtype, tuple(t.shape), sums[k])
        for k, ((name, what), t) in enumerate(zip(cut.items(), tensors))
    }
