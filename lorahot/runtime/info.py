"""What a slot holds, as the runtime reports it: :class:`AdapterInfo` (one adapter or a stack)
and, for each adapter in it, :class:`PartInfo`."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace

__all__ = ["AdapterInfo", "PartInfo", "detached"]


@dataclass(frozen=True)
class PartInfo:
    """One adapter of what a slot holds (the only one, or one part of a stack).

    Attributes:
        source: where the adapter came from.
        format: its detected naming.
        scale: the user's weight on top of each of its modules' ``alpha / r``: a float, or the
            dict given (component -> weight, or a UNet's blocks; numbers as floats, tuples as lists).
        ranks: injected layer name -> its rank there, for the layers it touches.
        nbytes: bytes of its weights copied in (before padding).
        skipped: tensor keys of it left out by a ``strict=False`` load.
        components: for a runtime over several models, component -> how many of its layers
            this adapter loads into; empty for a single model.
    """

    source: str
    format: str
    scale: float | dict[str, object]
    ranks: dict[str, int]
    nbytes: int
    skipped: tuple[str, ...] = ()
    components: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterInfo:
    """What a slot holds after :meth:`LoraRuntime.load`: one adapter, or a stack of several.

    Attributes:
        source: where the adapter came from; for a stack, the parts' sources joined by
            ``" + "``.
        format: its detected naming; for a stack, the parts' namings, each once, joined by
            ``"+"``.
        slot: the slot it was loaded into.
        scale: the user multiplier on top of each module's ``alpha / r`` (a float, or the dict
            given); for a stack (a list given to ``load``), the tuple of the parts' weights.
        ranks: injected layer name -> rank, for the layers the adapter touches; for a stack,
            the sum of the parts' ranks there. A LyCORIS or diff part (merged mode) counts its
            own rank though it takes no rows of the buffers (its update is folded into the
            weight), so this is the adapters' rank, not the rows in use.
        nbytes: bytes of adapter weights copied in (before padding), all parts together.
        skipped: tensor keys left out by a ``strict=False`` load (keys of no known naming,
            refused features, modules that map onto no injected layer); empty otherwise.
        components: for a runtime over several models, component -> how many of its layers
            the adapter (or the stack) loads into (0 for a component it does not touch, which
            then computes its base output); empty for a single model.
        parts: each adapter the slot holds, in the order given, with its own source, format,
            weight and ranks (one part for a single adapter).
    """

    source: str
    format: str
    slot: int
    scale: float | dict[str, object] | tuple[float | dict[str, object], ...]
    ranks: dict[str, int]
    nbytes: int
    skipped: tuple[str, ...] = ()
    components: dict[str, int] = field(default_factory=dict)
    parts: tuple[PartInfo, ...] = ()


def detached(info: AdapterInfo) -> AdapterInfo:
    """A copy of ``info`` that shares no dict with it (``ranks``, ``components``, a dict weight;
    each part's too), handed to the caller by ``load`` and ``info()``: editing it leaves the
    runtime's record, and the plans its checks read, as they were."""
    parts = tuple(
        replace(p, scale=_own(p.scale), ranks=dict(p.ranks), components=dict(p.components)) for p in info.parts
    )
    scale = tuple(_own(w) for w in info.scale) if isinstance(info.scale, tuple) else _own(info.scale)
    return replace(info, scale=scale, ranks=dict(info.ranks), components=dict(info.components), parts=parts)


def _own(weight: float | dict[str, object]) -> float | dict[str, object]:
    """A weight as ``info()`` reports it, a dict copied whole (a UNet's block dicts nest)."""
    return copy.deepcopy(weight) if isinstance(weight, dict) else weight
