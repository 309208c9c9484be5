"""An adapter's part for one rank of a tensor-parallel model.

Adapter files hold every layer whole: ``A [r, in]``, ``B [out, r]``. A tensor-parallel layer
(:mod:`lorahot.layers.sharded`) keeps only its rank's part in its buffers: B's rows of its output
channels (column-parallel, :attr:`~lorahot.layers.base.Shard.dim` ``"out"``) or A's columns of its
input features (row-parallel, ``"in"``); the other factor is whole on every rank.

- :func:`file_slices` tells the reader (:func:`lorahot.io.loader.read_adapter_sliced`) which
  slice of which tensor of a file this rank needs, so it reads only that part of the
  sharded factor from disk;
- :func:`localize`, run by the load planner on every module bound for a sharded layer, checks
  the module's *full* shapes against the whole layer (so a file made for another model is
  refused the same on every rank) and then cuts this rank's part out of it, which every
  later step (value checks, stacking, the host cache, the copy into the buffers) treats like
  any other module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from lorahot.adapter import Adapter, LoraModule
from lorahot.io.tensorfile import Slices, TensorSlice
from lorahot.layers.base import LayerSpec, Shard
from lorahot.resolve.components import resolve_components
from lorahot.resolve.keys import resolve_all

__all__ = ["localize", "file_slices", "describe_shard"]


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


def file_slices(
    adapter: Adapter,
    keys: Mapping[int, str],
    specs: Mapping[str, LayerSpec],
    components: tuple[str, ...] = (),
    others: tuple[str, ...] = (),
    denoiser: str | None = None,
) -> Slices:
    """Which slice of which tensor of a file this rank reads: for every module of ``adapter``
    (read from the file's header: meta tensors, ``keys`` giving each one's key by ``id``) bound
    for a sharded layer of ``specs``, its sharded factor's slice, when that factor is a file
    tensor as it is (not one a naming built from several: those are read whole and cut by
    :func:`localize`) and has the layer's full size (``denoiser``: as the load routes it).
    Modules that map onto no layer, or ambiguously, are left to the planner, which reports them."""
    names = list(specs)
    try:
        if components:
            targets, _ = resolve_components(adapter, names, components, [], others, denoiser=denoiser)
        else:
            targets, _ = resolve_all(adapter, names, [], others)
    except Exception:  # the planner reports it, with the values read
        return {}
    slices: dict[str, TensorSlice] = {}
    for name, module in targets.items():
        shard = specs[name].shard
        if shard is None:
            continue
        dim, tensor = (1, module.A) if shard.dim == "in" else (0, module.B)
        key = keys.get(id(tensor))
        if key is not None and tensor.ndim == 2 and tensor.shape[dim] == shard.size:
            slices[key] = TensorSlice(dim, shard.start, shard.stop)
    return slices
