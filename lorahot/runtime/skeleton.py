"""The structure of a load plan, kept per recipe: a file loaded again is planned without
resolving its keys or checking its shapes again.

:func:`~lorahot.runtime.plan.plan_load` resolves an adapter's module keys to the injected
layers and checks shapes, ranks, dtypes, alphas and the scales ``alpha / r``. For an adapter
that :func:`lorahot.read_adapter` assembled from a recipe (the structure of a file: the same
header and config give the same recipe), all of that follows from the recipe, ``strict``, the
component that takes its denoiser modules (``load(..., denoiser=)``) and the runtime alone.
:class:`Skeleton` keeps what the plan found (which module lands in which layer, the per-layer
scales, ranks and bytes) and :meth:`Skeleton.plan` builds the same plan around a new adapter of
the same recipe. The values are checked on every load (NaN, Inf,
ranges: :func:`~lorahot.runtime.plan.validate`). A plan that depends on more than the
structure gets no skeleton: a base-weight copy (compared with the model's weight), a DoRA
magnitude or LoRA bias (refused or not by the layer's state), LyCORIS kinds, and modules the
plan replaced (tensor-parallel shards, detached copies).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from lorahot.adapter import Adapter
from lorahot.runtime.plan import LoadPlan

__all__ = ["Skeleton", "Skeletons", "Routing"]


@dataclass(frozen=True)
class Skeleton:
    """A plan's structure, by the position of each module in the adapter.

    Attributes:
        targets: ``(layer name, module position)`` in the plan's order.
        places: per arena, ``(layer index, module position)`` in the plan's order.
        per_layer: per arena, each layer's ``alpha / r`` (0 where untouched).
        largest: per arena, the largest ``|alpha / r|``.
        ranks: ``(layer name, rank)`` in the plan's order.
        nbytes: bytes of the adapter's weights.
        skipped: the tensor keys the plan skipped (``strict=False``).
    """

    targets: tuple[tuple[str, int], ...]
    places: tuple[tuple[tuple[int, int], ...], ...]
    per_layer: tuple[tuple[float, ...], ...]
    largest: tuple[float, ...]
    ranks: tuple[tuple[str, int], ...]
    nbytes: int
    skipped: tuple[str, ...]

    @staticmethod
    def of(plan: LoadPlan, adapter: Adapter) -> Skeleton | None:
        """The skeleton of ``plan``, made for ``adapter``; None where the plan depends on more
        than the adapter's structure (see the module docstring)."""
        modules = adapter.modules.values()
        if plan.weights or any(
            m.base_weight is not None or m.magnitude is not None or m.bias is not None for m in modules
        ):
            return None
        position = {id(m): j for j, m in enumerate(modules)}
        if not all(id(m) in position for m in plan.targets.values()):
            return None  # a module the plan made anew
        return Skeleton(
            tuple((name, position[id(m)]) for name, m in plan.targets.items()),
            tuple(tuple((i, position[id(m)]) for i, m in entries) for entries in plan.entries),
            tuple(tuple(s.tolist()) for s in plan.scales),
            tuple(plan.largest),
            tuple(plan.ranks.items()),
            plan.nbytes,
            plan.skipped,
        )

    def plan(self, adapter: Adapter) -> LoadPlan:
        """The plan :func:`~lorahot.runtime.plan.plan_load` makes for ``adapter``, an adapter of
        the recipe this skeleton was made for (its modules, in the same order, hold its tensors)."""
        modules = list(adapter.modules.values())
        return LoadPlan(
            {name: modules[j] for name, j in self.targets},
            [[(i, modules[j]) for i, j in places] for places in self.places],
            [torch.tensor(values, dtype=torch.float64) for values in self.per_layer],
            list(self.largest),
            adapter.source,
            dict(self.ranks),
            self.nbytes,
            skipped=self.skipped,
            dora=[[] for _ in self.places],
        )


#: what a plan of a recipe depends on besides the recipe: ``strict``, and the component that
#: takes the denoiser's modules (None: the runtime's own)
Routing = tuple[bool, str | None]


class Skeletons:
    """One runtime's skeletons by recipe and :data:`Routing`, the last :attr:`KEPT` (least recently
    used dropped first), and the recipes found to have none. Thread-safe: preloads may run on
    any thread.

    An entry holds its recipe, so a recipe's ``id`` cannot be reused while the entry exists;
    a lookup also checks that the recipe is the very one.
    """

    KEPT = 32

    def __init__(self) -> None:
        self._entries: OrderedDict[tuple[int, Routing], tuple[object, Skeleton | None]] = OrderedDict()
        self._lock = threading.Lock()

    def lookup(self, recipe: object, routing: Routing) -> tuple[bool, Skeleton | None]:
        """Whether ``recipe`` was planned before (with this ``routing``), and its skeleton."""
        with self._lock:
            found = self._entries.get((id(recipe), routing))
            if found is None or found[0] is not recipe:
                return False, None
            self._entries.move_to_end((id(recipe), routing))
            return True, found[1]

    def put(self, recipe: object, routing: Routing, skeleton: Skeleton | None) -> None:
        """Keeps the skeleton of ``recipe`` planned with ``routing`` (None: its plans have none)."""
        with self._lock:
            self._entries[(id(recipe), routing)] = (recipe, skeleton)
            self._entries.move_to_end((id(recipe), routing))
            while len(self._entries) > self.KEPT:
                self._entries.popitem(last=False)
