"""Planning a load: map an adapter onto the injected layers, check everything, stage it.

Nothing here touches the model. :func:`plan_load` checks keys, shapes, ranks and alphas and
either raises listing every problem or returns a :class:`LoadPlan`. :func:`stage` then moves
the tensors to the arenas' devices and checks their values (NaN/Inf) there, and
:func:`pack_host` packs them into one compact host buffer per arena for the cache. Only after
all of that does the buffer manager write.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lorahot.adapter import Adapter, LoraModule
from lorahot.errors import AdapterMismatchError, AdapterReadError, format_problems
from lorahot.layers.base import LayerSpec
from lorahot.resolve.keys import resolve_keys
from lorahot.runtime.buffers import BufferManager, Entry, Pack

__all__ = ["LoadPlan", "Staged", "plan_load", "check_module", "check_values", "stage", "pack_host"]


@dataclass
class LoadPlan:
    """Everything a load writes, computed before anything is written.

    Attributes:
        targets: injected layer name -> the adapter module loaded into it.
        entries: per arena (the buffer manager's order), ``(layer index, module)`` pairs.
        scales: per arena, float64 ``[n_layers]``: each layer's ``alpha / r`` (0 if untouched).
        source: where the adapter came from, for messages.
        ranks: injected layer name -> the rank loaded into it.
        nbytes: bytes of adapter weights (before padding).
    """

    targets: dict[str, LoraModule]
    entries: list[list[tuple[int, LoraModule]]]
    scales: list[torch.Tensor]
    source: str
    ranks: dict[str, int]
    nbytes: int


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
        return [
            f"{where}: B has shape {tuple(b.shape)}, expected {spec.b_shape(rank)} for rank {rank} (A {tuple(a.shape)})"
        ]
    return []


#: dtypes lorahot copies from; float8 and integer weights are refused (torch lacks kernels
#: lorahot's checks need for float8 on the CPU, and no LoRA trainer writes them).
_WEIGHT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_values(name: str, module: LoraModule) -> list[str]:
    """Problems with ``module``'s content that no model could accept: dtype, storage, alpha."""
    where = _where(name, module)
    for t, which in ((module.A, "A"), (module.B, "B")):
        if t.dtype not in _WEIGHT_DTYPES:
            return [f"{where}: {which} has dtype {t.dtype}; LoRA weights must be float16, bfloat16, float32 or float64"]
        if t.layout != torch.strided or t.device.type == "meta":
            return [
                f"{where}: {which} is a {t.layout} tensor on {t.device}; LoRA weights must be dense tensors with data"
            ]
    if not (math.isfinite(module.alpha) and module.alpha > 0):
        return [f"{where}: alpha is {module.alpha}; it must be finite and > 0"]
    return []


def _where(name: str, module: LoraModule) -> str:
    return f"{name} ({', '.join(module.source_keys or (module.key,))})"


def plan_load(adapter: Adapter, buffers: BufferManager, specs: dict[str, LayerSpec]) -> LoadPlan:
    """Resolves and checks ``adapter`` for the layers ``specs`` whose storage ``buffers`` holds.

    Layers the adapter does not touch get zeros and scale 0.

    Raises:
        AdapterMismatchError: keys that map onto no injected layer (or onto one twice), or
            shapes and ranks the layers cannot take.
        AdapterReadError: values no model could take: non-float dtypes, alpha <= 0 or not
            finite, NaN or Inf.
    """
    targets = resolve_keys(adapter, list(specs))
    problems = [p for name, m in targets.items() for p in check_module(name, m, specs[name], buffers.max_rank)]
    if problems:
        raise AdapterMismatchError(
            format_problems(f"{adapter.source}: adapter does not fit the injected model:", problems)
            + "\nLoad an adapter trained for this model and these target modules, or inject with a larger max_rank."
        )
    unreadable = [p for name, m in targets.items() for p in check_values(name, m)]
    if unreadable:
        raise AdapterReadError(
            format_problems(f"{adapter.source}: values that cannot be LoRA weights:", unreadable)
            + "\nRe-save the adapter in float16/bfloat16/float32 with a positive alpha."
        )
    entries: list[list[tuple[int, LoraModule]]] = [[] for _ in buffers.arenas]
    scales = [torch.zeros(len(a.specs), dtype=torch.float64) for a in buffers.arenas]
    for name, m in targets.items():
        arena, index = buffers.where[name]
        entries[arena].append((index, m))
        scales[arena][index] = m.scale
    ranks = {n: m.rank for n, m in targets.items()}
    return LoadPlan(targets, entries, scales, adapter.source, ranks, adapter.nbytes)


#: per arena, ``(layer index, A, B)`` triples already on the arena's device
Staged = list[list[Entry]]


def stage(plan: LoadPlan, buffers: BufferManager) -> Staged:
    """Moves every A and B to its arena's device and checks the values there.

    Returns per arena ``(layer index, A, B)`` triples ready for ``BufferManager.write_staged``.

    Raises:
        AdapterReadError: NaN or Inf in any weight (nothing has been written).
    """
    staged = [
        [(i, m.A.to(arena.device), m.B.to(arena.device)) for i, m in entries]
        for arena, entries in zip(buffers.arenas, plan.entries)
    ]
    for arena, entries in zip(buffers.arenas, staged):
        tensors = [t for _, a, b in entries for t in (a, b)]
        if tensors and not _fits(torch.stack(torch._foreach_norm(tensors, float("inf"))), arena.dtype):
            _raise_not_finite(plan)
    return staged


def _fits(max_abs: torch.Tensor, dtype: torch.dtype) -> bool:
    """True when every value is finite and representable in ``dtype`` (NaN compares False)."""
    return bool((max_abs.double() <= torch.finfo(dtype).max).all())


def pack_host(plan: LoadPlan, buffers: BufferManager) -> list[Pack]:
    """Packs the plan into one host buffer per arena (pinned for GPU arenas), checks the values.

    Raises:
        AdapterReadError: NaN or Inf in any weight, or values that overflow the arena dtype.
    """
    packs = []
    for arena, entries, scales in zip(buffers.arenas, plan.entries, plan.scales):
        pack = arena.pack([(i, m.A, m.B) for i, m in entries], pin=arena.device.type == "cuda")
        pack.scales.copy_(scales)
        packs.append(pack)
    if not all(bool(torch.isfinite(p.data).all()) for p in packs):
        _raise_not_finite(plan)  # in the arena dtype: overflow shows as Inf too
    return packs


def _raise_not_finite(plan: LoadPlan) -> None:
    bad = [
        n for n, m in plan.targets.items() if not (bool(torch.isfinite(m.A).all()) and bool(torch.isfinite(m.B).all()))
    ]
    bad = bad or ["(values too large for the model's dtype)"]
    raise AdapterReadError(
        format_problems(f"{plan.source}: NaN or Inf in LoRA weights of:", bad)
        + "\nThe adapter is corrupt; re-train or re-download it."
    )
