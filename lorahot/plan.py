"""Planning a load: map an adapter onto the injected layers, check everything, pack it.

Nothing here touches the model. :func:`plan_load` either raises a
:class:`~lorahot.errors.AdapterMismatchError` / :class:`~lorahot.errors.AdapterReadError`
listing every problem, or returns host-side packs that the buffer manager copies in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorahot.adapter import Adapter, LoraModule
from lorahot.arena import BufferManager, Pack
from lorahot.errors import AdapterMismatchError, AdapterReadError, format_problems
from lorahot.layers.base import LayerSpec
from lorahot.resolve import resolve_keys

__all__ = ["LoadPlan", "resolve_keys", "plan_load"]


@dataclass
class LoadPlan:
    """Everything a load writes, computed before anything is written.

    Attributes:
        packs: one per arena, in the buffer manager's order.
        targets: injected layer name -> the adapter module loaded into it.
    """

    packs: list[Pack]
    targets: dict[str, LoraModule]


def check_module(name: str, module: LoraModule, spec: LayerSpec, max_rank: int) -> list[str]:
    """Every problem with loading ``module`` into the layer ``name``; empty when it fits."""
    a, b, where = module.A, module.B, _where(name, module)
    rank = int(a.shape[0]) if a.ndim else 0
    if a.ndim != 1 + len(spec.a_row_shape) or rank == 0 or tuple(a.shape) != spec.a_shape(rank):
        expected = "(r, " + ", ".join(map(str, spec.a_row_shape)) + ")"
        return [f"{where}: A has shape {tuple(a.shape)}, expected {expected} with r >= 1 for this {spec.kind} layer"]
    if rank > max_rank:
        return [f"{where}: rank {rank} > max_rank {max_rank}; inject with max_rank >= {rank}"]
    if rank % spec.groups:
        return [f"{where}: rank {rank} is not a multiple of the conv's groups={spec.groups}"]
    if tuple(b.shape) != spec.b_shape(rank):
        return [f"{where}: B has shape {tuple(b.shape)}, expected {spec.b_shape(rank)} for rank {rank} (A {tuple(a.shape)})"]
    return []


def check_values(name: str, module: LoraModule) -> list[str]:
    """Problems with ``module``'s content that no model could accept: dtype and alpha."""
    where = _where(name, module)
    for t, which in ((module.A, "A"), (module.B, "B")):
        if not t.is_floating_point():
            return [f"{where}: {which} has dtype {t.dtype}; LoRA weights must be floating point"]
    if not (math.isfinite(module.alpha) and module.alpha > 0):
        return [f"{where}: alpha is {module.alpha}; it must be finite and > 0"]
    return []


def _where(name: str, module: LoraModule) -> str:
    return f"{name} ({', '.join(module.source_keys or (module.key,))})"


def plan_load(adapter: Adapter, manager: BufferManager, specs: dict[str, LayerSpec]) -> LoadPlan:
    """Resolves, checks and packs ``adapter`` for the layers ``specs`` managed by ``manager``.

    Layers the adapter does not touch get zeros and scale 0.

    Raises:
        AdapterMismatchError: keys that map onto no injected layer (or onto one twice), or
            shapes and ranks the layers cannot take.
        AdapterReadError: values no model could take: non-float dtypes, alpha <= 0 or not
            finite, NaN or Inf.
    """
    targets = resolve_keys(adapter, list(specs))
    problems = [p for name, m in targets.items() for p in check_module(name, m, specs[name], manager.max_rank)]
    if problems:
        raise AdapterMismatchError(
            format_problems(f"{adapter.source}: adapter does not fit the injected model:", problems)
            + "\nLoad an adapter trained for this model and these target modules, or inject with a larger max_rank."
        )
    unreadable = [p for name, m in targets.items() for p in check_values(name, m)]
    if unreadable:
        raise AdapterReadError(format_problems(f"{adapter.source}: values that cannot be LoRA weights:", unreadable) + "\nRe-save the adapter in float16/bfloat16/float32 with a positive alpha.")
    packs = [_pack(arena_idx, manager, targets) for arena_idx in range(len(manager.arenas))]
    _check_finite(packs, targets, adapter.source)
    return LoadPlan(packs, targets)


def _pack(arena_idx: int, manager: BufferManager, targets: dict[str, LoraModule]) -> Pack:
    arena = manager.arenas[arena_idx]
    mine = [(manager.where[n][1], m) for n, m in targets.items() if manager.where[n][0] == arena_idx]
    a_rows = max((arena.a_rows_for(arena.specs[i], m.rank, arena.rank) for i, m in mine), default=0)
    b_rows = max((m.rank // arena.specs[i].groups for i, m in mine), default=0)
    pack = arena.empty_pack(a_rows, b_rows, pin=arena.device.type == "cuda")
    for i, m in mine:
        arena.place(pack, i, m.A.to(arena.dtype), m.B.to(arena.dtype))
        pack.scales[i] = m.scale
    return pack


def _check_finite(packs: list[Pack], targets: dict[str, LoraModule], source: str) -> None:
    if all(bool(torch.isfinite(p.a).all()) and bool(torch.isfinite(p.b).all()) for p in packs):
        return
    bad = [n for n, m in targets.items() if not (torch.isfinite(m.A).all() and torch.isfinite(m.B).all())]
    bad = bad or ["(values overflow the model's dtype)"]
    raise AdapterReadError(format_problems(f"{source}: NaN or Inf in LoRA weights of:", bad) + "\nThe adapter is corrupt; re-train or re-download it.")
