"""What a slot holds, as the runtime reports it: :class:`AdapterInfo` (one adapter or a stack)
and, for each adapter in it, :class:`PartInfo`."""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["AdapterInfo", "PartInfo"]


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
