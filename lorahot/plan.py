"""Planning a load: map an adapter onto the injected layers, check everything, pack it.

Nothing here touches the model. :func:`plan_load` either raises a
:class:`~lorahot.errors.AdapterMismatchError` / :class:`~lorahot.errors.AdapterReadError`
listing every problem, or returns host-side packs that the buffer manager copies in.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass

import torch

from lorahot.adapter import Adapter, LoraModule
from lorahot.arena import BufferManager, Pack
from lorahot.errors import AdapterMismatchError, AdapterReadError, format_problems
from lorahot.layers.base import LayerSpec

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


def resolve_keys(adapter: Adapter, names: list[str]) -> dict[str, LoraModule]:
    """Maps each adapter module key to one injected layer name.

    A key matches a layer whose name equals it, or failing that the one layer whose name ends
    with ``"." + key`` or that the key ends with (``"." + name``).

    Raises:
        AdapterMismatchError: keys matching no layer (with the closest names), keys matching
            several layers, or two keys landing on one layer.
    """
    exact = set(names)
    out: dict[str, LoraModule] = {}
    origin: dict[str, str] = {}
    problems: list[str] = []
    for key, module in adapter.modules.items():
        hits = [key] if key in exact else [n for n in names if n.endswith("." + key) or key.endswith("." + n)]
        if not hits:
            close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
            hint = f" (closest: {', '.join(close)})" if close else ""
            problems.append(f"{key}: matches no injected layer{hint}")
        elif len(hits) > 1:
            problems.append(f"{key}: ambiguous, matches {', '.join(hits[:5])}")
        elif hits[0] in out:
            problems.append(f"{key}: lands on {hits[0]}, which {origin[hits[0]]} already fills")
        else:
            out[hits[0]] = module
            origin[hits[0]] = key
    if problems:
        raise AdapterMismatchError(
            format_problems(f"{adapter.source}: adapter modules that do not map onto the injected layers:", problems)
            + "\nInject those modules (targets=...), or load an adapter made for this model."
        )
    return out


def check_module(name: str, module: LoraModule, spec: LayerSpec, max_rank: int) -> list[str]:
    """Every problem with loading ``module`` into the layer ``name``; empty when it fits."""
    a, b, keys = module.A, module.B, module.source_keys or (module.key,)
    where = f"{name} ({', '.join(keys)})"
    for t, which in ((a, "A"), (b, "B")):
        if not t.is_floating_point():
            return [f"{where}: {which} has dtype {t.dtype}; LoRA weights must be floating point"]
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
    if not (math.isfinite(module.alpha) and module.alpha > 0):
        return [f"{where}: alpha is {module.alpha}; it must be finite and > 0"]
    return []


def plan_load(adapter: Adapter, manager: BufferManager, specs: dict[str, LayerSpec]) -> LoadPlan:
    """Resolves, checks and packs ``adapter`` for the layers ``specs`` managed by ``manager``.

    Layers the adapter does not touch get zeros and scale 0.
    """
    targets = resolve_keys(adapter, list(specs))
    problems = [p for name, m in targets.items() for p in check_module(name, m, specs[name], manager.max_rank)]
    if problems:
        raise AdapterMismatchError(format_problems(f"{adapter.source}: adapter does not fit the injected model:", problems))
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
