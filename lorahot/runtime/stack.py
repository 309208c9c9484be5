"""Several adapters in one slot, active together: their rows side by side along the rank.

``runtime.load([a, b], scale=[w_a, w_b])`` puts a *stack* in one slot. Each part is read and
checked exactly as ``load`` checks one adapter (:func:`lorahot.runtime.plan.validate`); then,
in every layer, the parts' A and B rows follow one another along the rank: part 0 in rows
``[0, r_0)``, part 1 in ``[r_0, r_0 + r_1)``, ... (for a grouped conv, within each group's
slice: ``[o_p / g, (o_p + r_p) / g)`` of every group). Each row gets its part's ``alpha / r``
for that module (PEFT patterns, rsLoRA, kohya per-module alphas) times the part's weight, so
the layer's ``B diag(s) A`` (see :mod:`lorahot.layers.base`) is
``sum_p w_p * alpha_p / r_p * B_p A_p``: the parts' updates summed, in the same buffers and
the same compiled graph as one adapter. One adapter is a stack of one part.

Re-weighting (``set_scale([...])``) computes the per-row scales on the host,
``s = sum_p w_p * rows_p`` over :attr:`Stack.rows` ``[parts, n_layers, R]`` (as one gather and
one multiply, :attr:`Stack.owners`; no per-layer Python), and writes them with one copy per
arena: no A or B is copied. On CUDA the copy and what follows from it run as one CUDA graph
replay (:mod:`lorahot.runtime.scale_replay`).

What a stack refuses, before anything is written (:func:`check_parts`): a layer whose parts'
ranks add up past ``max_rank``; DoRA on a layer another part also touches (PEFT computes one
DoRA factor per adapter, over that adapter's update alone). A layer's one LoRA-bias row is
scaled by its first row's scale, so a part that has a bias there is laid first; where several
parts carry a LoRA bias on one layer (:attr:`Stack.shared_biases`) they add up,
``sum_p w_p * alpha_p / r_p * c_p``, as PEFT adds the outputs of several active adapters and
ComfyUI adds every patch's bias: unmerged, that sum is the layer's ``g`` row, computed again at
every change of the weights (:mod:`lorahot.runtime.bias_sums`); merged, it is folded into the
layer's bias, ``b0 + sum``. In merged mode LyCORIS kinds and diffs stack too: their weighted
``ΔW`` are added to the merged weight.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from lorahot.adapter import LoraModule, WeightModule
from lorahot.errors import AdapterMismatchError, format_problems, lines
from lorahot.layers.base import EXTRA_BIAS
from lorahot.runtime.bias_sums import BiasSums
from lorahot.runtime.buffers import Arena, BufferManager, Entry, Extra
from lorahot.runtime.layer_weights import LayerWeights, Weight, per_layer, table, weight_in
from lorahot.runtime.plan import Checked, LoadPlan, Staged

__all__ = ["Stack", "Placement", "Run", "build", "check_parts", "part_named", "shared_problems", "SHARED_FIX"]

#: ``(layer index, first row, rows, part)``: a part's contiguous rows in one layer (or group slice)
Run = tuple[int, int, int, int]


@dataclass(frozen=True)
class Stack:
    """What one slot holds: one adapter, or several stacked (see the module docstring).

    Attributes:
        parts: each part's checked plan, in the order given.
        rows: per arena, float64 ``[parts, n_layers, R]``: part ``p``'s ``alpha / r`` on the
            rows it occupies in each layer (in the arena's layout), 0 elsewhere. For one
            adapter, its per-layer scales on every row of the layer (a broadcast view; rows
            past the rank hold zeros in A and B).
        ranks: injected layer name -> the sum of its parts' ranks there.
        dora: per arena, the indices of the layers that load DoRA (each holds one part).
        runs: per arena, ``(layer index, first row, rows, part)`` of every part's contiguous
            rows (one per layer, one per group slice of a grouped conv); empty for one adapter.
        bias_sums: unmerged, the LoRA biases of the layers where several parts carry one,
            summed at the weights into each such layer's ``g`` row
            (:mod:`lorahot.runtime.bias_sums`); None where there are none, and in merged mode.
    """

    parts: tuple[LoadPlan, ...]
    rows: list[torch.Tensor]
    ranks: dict[str, int]
    dora: list[list[int]] = field(default_factory=list)
    runs: list[list[Run]] = field(default_factory=list)
    bias_sums: BiasSums | None = None

    @classmethod
    def of(cls, plan: LoadPlan, max_rank: int) -> Stack:
        """One adapter: its per-layer scales on every row (views, nothing copied)."""
        rows = [s.view(1, -1, 1).expand(1, s.shape[0], max_rank) for s in plan.scales]
        return cls((plan,), rows, plan.ranks, plan.dora)

    @property
    def single(self) -> bool:
        """One part: every row of a layer has one scale (the layer's ``alpha / r``)."""
        return len(self.parts) == 1

    def named(self, part: int) -> str:
        """How a refusal names part ``part``: its source alone for one adapter, else
        :func:`part_named`."""
        source = self.parts[part].source
        return source if self.single else part_named(part, source)

    def scales(self, weights: Sequence[Weight]) -> list[torch.Tensor]:
        """Per arena, float64 ``[n_layers, R]`` on the host: each row's scale for the parts'
        ``weights`` (one per part), ``own * w[part]`` over :attr:`owners`. Exact: a row belongs
        to at most one part, so this equals ``sum_p w_p * rows_p`` bit for bit.

        Computed with NumPy, one thread: torch splits an elementwise op over more than 32768
        elements (four parts of 154 layers at rank 64) across its CPU threads, and on a GPU
        host with busy cores that made each ``set_scale`` cost 16 ms instead of 0.04."""
        if not per_layer(weights):
            w = np.asarray(weights, dtype=np.float64)
            return [torch.from_numpy(own * w[part]) for own, part in self.owners]
        out = []  # a weight per layer (lorahot.runtime.layer_weights): each row its part's weight on its layer
        for a, (own, part) in enumerate(self.owners):
            n = own.shape[0]
            by_layer = table(weights, a, n)  # [parts, n_layers]
            out.append(torch.from_numpy(own * by_layer[part, np.arange(n)[:, None]]))
        return out

    @functools.cached_property
    def owners(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """Per arena, ``(own, part)`` of every row, ``[n_layers, R]`` each: its part's
        ``alpha / r`` (0 where no part has the row) and that part's index. Built once per
        stack: a re-weighting then costs one gather and one multiply, whatever the parts."""
        out = []
        for rows in self.rows:
            r = rows.numpy()
            out.append((r.sum(axis=0), np.argmax(r != 0, axis=0)))
        return out

    @functools.cached_property
    def terms(self) -> dict[str, list[tuple[int, LoraModule | WeightModule]]]:
        """Injected layer name -> ``(part, module)`` of every part that loads into it (LoRA
        modules and, merged mode only, LyCORIS/diff modules), in part order."""
        out: dict[str, list[tuple[int, LoraModule | WeightModule]]] = {}
        for p, plan in enumerate(self.parts):
            for name, m in _modules(plan):
                out.setdefault(name, []).append((p, m))
        return out

    @functools.cached_property
    def shared_biases(self) -> dict[str, list[tuple[int, LoraModule]]]:
        """Injected layer name -> ``(part, module)`` of every part's LoRA module with a LoRA bias
        there, for the layers where several parts carry one: their sum is folded into the bias
        (merged mode, :meth:`weight_terms`) or written into the layer's ``g`` row (unmerged,
        :attr:`bias_sums`), each at its part's ``w * alpha / r``."""
        out: dict[str, list[tuple[int, LoraModule]]] = {}
        for name, items in self.terms.items():
            biased = [(p, m) for p, m in _lora(items) if m.bias is not None]
            if len(biased) > 1:
                out[name] = biased
        return out

    @functools.cached_property
    def decomposed(self) -> frozenset[str]:
        """Injected layer names whose DoRA magnitude is a LyCORIS or kohya ``dora_scale``, whose
        factor adds LyCORIS' ``eps`` to the norm (:meth:`LoraModule.norm_eps`)."""
        return frozenset(
            name
            for name, items in self.terms.items()
            for _, m in items
            if isinstance(m, LoraModule) and m.norm_eps(torch.float32) != 0.0
        )

    def weight_terms(
        self, weights: Sequence[Weight], where: dict[str, tuple[int, int]] | None = None
    ) -> dict[str, list[tuple[WeightModule, float]]]:
        """Injected layer name -> each LyCORIS/diff module folded into it (merged mode) and its
        scale: the module's own times its part's weight. On a layer where several parts carry
        a LoRA bias (:attr:`shared_biases`), each of those biases is a bias diff (``diff_b``
        alone) at its part's ``w * alpha / r``: the slot's extras hold none of them. A weight per
        layer is read at each layer's ``(arena, index)`` in ``where``."""

        def at(p: int, name: str) -> float:
            w = weights[p]
            return w if not isinstance(w, LayerWeights) else weight_in(w, *where[name])  # type: ignore[index]

        out: dict[str, list[tuple[WeightModule, float]]] = {}
        for p, plan in enumerate(self.parts):
            for name, w in plan.weights.items():
                out.setdefault(name, []).append((w, at(p, name) * w.scale))
        for name, biased in self.shared_biases.items():
            out.setdefault(name, []).extend((_bias_diff(m), at(p, name) * m.scale) for p, m in biased)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of adapter weights copied in, all parts together (before padding)."""
        return sum(plan.nbytes for plan in self.parts)


@dataclass
class Placement:
    """Where a stack's rows go: per arena, the staged ``(layer, A, B)`` triples of every
    part, each entry's first row in its layer (``offsets``, None for one adapter: all 0),
    and the extras rows (DoRA magnitudes, LoRA biases)."""

    entries: Staged
    offsets: list[list[int]] | None
    extras: list[list[Extra]]


def build(parts: list[Checked], buffers: BufferManager, merged: bool = False) -> tuple[Stack, Placement]:
    """The stack of ``parts`` (each checked as one adapter) and where its rows go. Several
    parts' LoRA biases on one layer add up, their rows left out of the extras: ``merged``, for
    a merged runtime, :meth:`Stack.weight_terms` folds them; else :attr:`Stack.bias_sums`
    writes their sum.

    Raises:
        AdapterMismatchError: the parts do not fit together (see :func:`check_parts`).
            Nothing has been written.
    """
    plans = [c.plan for c in parts]
    if len(parts) == 1:
        extras = parts[0].extras or [[] for _ in buffers.arenas]
        return Stack.of(plans[0], buffers.max_rank), Placement(parts[0].entries, None, extras)
    check_parts(plans, buffers)
    laid = [_lay_out(parts, a, arena, buffers.max_rank) for a, arena in enumerate(buffers.arenas)]
    arenas = range(len(buffers.arenas))
    ranks: dict[str, int] = {}
    for plan in plans:
        for name, r in plan.ranks.items():
            ranks[name] = ranks.get(name, 0) + r
    dora = [sorted({i for plan in plans if plan.dora for i in plan.dora[a]}) for a in arenas]
    stack = Stack(tuple(plans), [t for _, _, t, _ in laid], ranks, dora, [r for _, _, _, r in laid])
    # (arena, layer) of several parts' LoRA biases: merged, weight_terms folds them; unmerged, BiasSums adds them
    rows, biases = _split_biases(parts, {buffers.where[name] for name in stack.shared_biases}, len(arenas))
    if not merged:
        stack = dataclasses.replace(stack, bias_sums=BiasSums.of(buffers, len(parts), biases))
    return stack, Placement([e for e, _, _, _ in laid], [o for _, o, _, _ in laid], rows)


def _split_biases(
    parts: list[Checked], shared: set[tuple[int, int]], arenas: int
) -> tuple[list[list[Extra]], dict[tuple[int, int], list[tuple[int, float, torch.Tensor]]]]:
    """The parts' extras rows per arena but the LoRA biases on the ``shared`` ``(arena, layer)``,
    and those: ``(arena, layer)`` -> ``(part, alpha / r, lora_bias)`` of each."""
    extras: list[list[Extra]] = [[] for _ in range(arenas)]
    biases: dict[tuple[int, int], list[tuple[int, float, torch.Tensor]]] = {}
    for p, c in enumerate(parts):
        for a, rows in enumerate(c.extras):
            for i, row, t in rows:
                if row == EXTRA_BIAS and (a, i) in shared:
                    biases.setdefault((a, i), []).append((p, float(c.plan.scales[a][i]), t))
                else:
                    extras[a].append((i, row, t))
    return extras, biases


def _lay_out(
    parts: list[Checked], a: int, arena: Arena, max_rank: int
) -> tuple[list[Entry], list[int], torch.Tensor, list[Run]]:
    """Arena ``a``'s staged entries of every part, each one's first row in its layer, the
    parts' scale table ``[parts, n_layers, R]`` and their runs of rows: in each layer the parts
    follow one another in part order, except that a part with a LoRA bias comes first (row 0's
    scale scales the bias)."""
    on_layer: dict[int, list[tuple[int, Entry, LoraModule]]] = {}
    for p, checked in enumerate(parts):
        for (i, m), entry in zip(checked.plan.entries[a], checked.entries[a]):
            on_layer.setdefault(i, []).append((p, entry, m))
    table = torch.zeros(len(parts), len(arena.specs), max_rank, dtype=torch.float64)
    entries, offsets, runs = [], [], []
    for i, items in on_layer.items():
        items.sort(key=lambda item: item[2].bias is None)  # stable: part order otherwise
        groups = arena.specs[i].groups
        cap, offset = max_rank // groups, 0
        for p, entry, m in items:
            start, n = offset // groups, m.rank // groups
            table[p, i].view(groups, cap)[:, start : start + n] = parts[p].plan.scales[a][i]  # each group's slice
            runs += [(i, j * cap + start, n, p) for j in range(groups)]
            entries.append(entry)
            offsets.append(offset)
            offset += m.rank
    return entries, offsets, table, runs


#: how many parts a refusal names per layer (a stack of thousands would make a message of megabytes)
PARTS_SHOWN = 8


def _summed(items: list[tuple[int, LoraModule | WeightModule]], sources: list[str]) -> str:
    """``r1 (part 0: ...) + r2 (part 1: ...) ...``, the first :data:`PARTS_SHOWN` parts named."""
    lora = list(_lora(items))
    terms = [f"{m.rank} ({sources[p]})" for p, m in lora[:PARTS_SHOWN]]
    rest = lora[PARTS_SHOWN:]
    if rest:
        terms.append(f"{sum(m.rank for _, m in rest)} (parts {rest[0][0]}-{rest[-1][0]}, {len(rest)} more)")
    return " + ".join(terms)


def _listed(parts: list[int]) -> str:
    """Part numbers for a message, the first :data:`PARTS_SHOWN` of them."""
    more = f", ... ({len(parts)} parts)" if len(parts) > PARTS_SHOWN else ""
    return ", ".join(map(str, parts[:PARTS_SHOWN])) + more


def check_parts(plans: list[LoadPlan], buffers: BufferManager) -> None:
    """Whether checked adapters can share one slot: every layer's ranks add up to at most
    ``max_rank``; a DoRA module (or one built from the base weight: OFT, BOFT, (IA)^3, GLoRA)
    is alone on its layer.

    Raises:
        AdapterMismatchError: naming every layer that does not fit, each part there (its
            rank, its source) and the fix.
    """
    sources = [part_named(p, plan.source) for p, plan in enumerate(plans)]
    by_layer: dict[str, list[tuple[int, LoraModule | WeightModule]]] = {}
    for p, plan in enumerate(plans):
        for name, m in _modules(plan):
            by_layer.setdefault(name, []).append((p, m))
    over = {name: total for name, items in by_layer.items() if (total := _rows(items)) > buffers.max_rank}
    ranks = [
        f"{name}: ranks {_summed(by_layer[name], sources)} = {total} > max_rank {buffers.max_rank}"
        for name, total in over.items()
    ]
    shared = shared_problems(by_layer, sources)
    if not ranks and not shared:
        return
    fixes = []
    if ranks:
        fixes.append(
            f"Inject with max_rank >= {max(over.values())}: a stack needs the sum of its parts' ranks in each layer "
            "(lorahot.plan_targets(sources, model, stacked=True) plans it), or stack fewer adapters."
        )
    if shared:
        fixes.append(SHARED_FIX)
    raise AdapterMismatchError(
        lines(
            format_problems(f"a stack of {len(plans)} adapters does not fit together in one slot:", ranks + shared),
            *fixes,
        )
    )


def part_named(part: int, source: str) -> str:
    """How every refusal names a part of a stack: ``part 1 of the stack (<mapping>)``, its index
    and its source (several parts read from mappings share the source ``<mapping>``)."""
    return f"part {part} of the stack ({source})"


#: the fix for what :func:`shared_problems` finds
SHARED_FIX = (
    "Load an adapter with DoRA (or dora_scale), an OFT/BOFT, (IA)^3 or GLoRA alone, or stack it with adapters "
    "that leave its layers."
)


def shared_problems(by_layer: dict[str, list[tuple[int, LoraModule | WeightModule]]], sources: list[str]) -> list[str]:
    """For every layer that several parts load into (``by_layer``: layer -> ``(part, module)``
    pairs; ``sources``: how each part is named), what cannot share it: a DoRA module, a LyCORIS
    module with weight decomposition, a module built from the base weight (OFT, BOFT, (IA)^3,
    GLoRA). Several LoRA biases can: they add up (merged mode folds them into the layer's bias,
    :meth:`Stack.weight_terms`; unmerged, :mod:`lorahot.runtime.bias_sums`)."""
    return [p for name, items in by_layer.items() if len(items) > 1 for p in _shared(name, items, sources)]


def _lora(items: list[tuple[int, LoraModule | WeightModule]]) -> list[tuple[int, LoraModule]]:
    return [(p, m) for p, m in items if isinstance(m, LoraModule)]


def _rows(items: list[tuple[int, LoraModule | WeightModule]]) -> int:
    """The rows of the rank the parts' LoRA modules take in one layer."""
    return sum(m.rank for _, m in _lora(items))


def _shared(name: str, items: list[tuple[int, LoraModule | WeightModule]], sources: list[str]) -> list[str]:
    """What cannot share layer ``name`` with other parts: DoRA (PEFT computes one factor per
    adapter, over its own update), a LyCORIS module's weight decomposition (``dora_scale``,
    over the weight that module makes), a module built from the base weight."""
    others = _listed([p for p, _ in items])
    problems = [
        f"{name} ({', '.join(m.source_keys or (m.key,))}): {sources[p]} has DoRA (a magnitude vector) on a layer "
        f"parts {others} all load into; PEFT computes one DoRA factor per adapter, over that adapter's update alone"
        for p, m in _lora(items)
        if m.magnitude is not None
    ]
    problems += [
        f"{name} ({', '.join(m.source_keys or (m.key,))}): {sources[p]} has {m.named} module with weight "
        f"decomposition (dora_scale) on a layer parts {others} all load into; LyCORIS normalizes the weight that "
        "module alone makes"
        for p, m in items
        if isinstance(m, WeightModule) and m.decomposes
    ]
    problems += [
        f"{name} ({', '.join(m.source_keys or (m.key,))}): {sources[p]} has {m.named} module on a layer parts "
        f"{others} all load into; its update is built from the weight it is applied to (a rotation of it, a "
        "scaling, or a product with it), so stacked with another update its result depends on their order "
        "(LyCORIS and ComfyUI apply them one after the other, each to what the last made), which a stack does "
        "not state"
        for p, m in items
        if isinstance(m, WeightModule) and m.reads_base
    ]
    return problems


def _bias_diff(m: LoraModule) -> WeightModule:
    """``m``'s LoRA bias as a bias diff (``diff_b`` alone, no ``ΔW``), for merged mode to add
    at ``m``'s ``alpha / r`` times its part's weight."""
    assert m.bias is not None  # shared_biases holds biased modules only
    return WeightModule(m.key, "diff", {"diff_b": m.bias.reshape(-1)}, source_keys=m.source_keys)


def _modules(plan: LoadPlan) -> list[tuple[str, LoraModule | WeightModule]]:
    """``(layer, module)`` of every module ``plan`` loads: LoRA, then LyCORIS/diff (merged mode)."""
    out: list[tuple[str, LoraModule | WeightModule]] = [*plan.targets.items()]
    out += plan.weights.items()
    return out
