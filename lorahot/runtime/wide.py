"""Keeps the wide layers' A rows and scaled B columns equal to the live adapter.

A widened layer (:mod:`lorahot.layers.linear`) keeps its weight in ``[[W, B_s], [A, 0]]``
(:mod:`lorahot.kernels.wide_linear`), ``B_s[:, r] = s_r * B[:, r]``. Those blocks are second
copies of the live region's A and B (``Bt [R, out]``, rank rows), B's each rank row times its
scale, so whatever changes the live region or its scales (load, activate, set_scale, unload)
ends with :meth:`WideWeights.apply`: per arena, one batched copy of the live A rows, and one
of the live B rows into the wide buffers' columns with a multiply by the scales, all over only
the rank rows any adapter has used since the last refresh (a rank-8 swap after a rank-8 swap
touches 8 rows and 8 columns per layer, not ``max_rank``). ``set_scale`` rewrites the B
columns alone. In float16 (:data:`~lorahot.kernels.wide_linear.SHIFTED_DTYPES`) the A copy
also divides each row by a power of two, :func:`~lorahot.kernels.row_scale.row_shifts` of the
row, which it keeps per layer and row on the device, and the B copy multiplies the column by
it, so that the shrink the wide GEMM writes in float16 stays in range for every input.
Below, a layer's "wide rows" are its B columns seen as ``[R, out]``
(:meth:`~lorahot.layers.LoRALayer.wide_rows`: a transposed view).

With one adapter live every row of a layer has the layer's scale; with a stack live
(:mod:`lorahot.runtime.stack`) each part's rows of a (linear, ungrouped) layer are one run
with the part's scale. Either way the live region holds those per-row scales (:mod:`lorahot.runtime.buffers`),
and the refresh reads them there: on CUDA with Triton, one kernel launch
(:mod:`lorahot.kernels.row_scale`) does the copy and the multiply for every layer at once, and
one more copies the A rows, with no per-layer host work; elsewhere a copy and a multiply per
layer, computed as the kernel computes them. Shapes and
addresses of the wide buffers never change; a compiled graph or a captured CUDA graph reads them
in place.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from lorahot.errors import UsageError
from lorahot.kernels import row_scale
from lorahot.kernels.row_scale import RowScaler, row_shifts
from lorahot.kernels.wide_linear import SHIFTED_DTYPES
from lorahot.layers import LoRALayer
from lorahot.layers.tensor_handles import TensorHandle
from lorahot.runtime.aliases import plain
from lorahot.runtime.buffers import BufferManager
from lorahot.runtime.layer_weights import LayerWeights, Weight, peak
from lorahot.runtime.plan import LoadPlan, dtype_max
from lorahot.runtime.stack import Stack

__all__ = ["WideWeights", "widen_layers", "DEVICE_TYPES", "UNWIDENED_DTYPES"]

#: Devices whose layers are widened. On CUDA the wide GEMM adds the expand in the base
#: product's accumulator, saving the expand's pass over the output; on the CPU it saves little,
#: and the plain formula keeps the outputs right after inject bitwise those of the base model
#: (a GEMM over a longer K may sum in another order). The tests widen CPU layers too, to exercise the mechanism.
DEVICE_TYPES = {"cuda"}

#: Dtypes whose layers are not widened: none. A float16 layer is widened with its rank rows
#: shifted (:data:`lorahot.kernels.wide_linear.SHIFTED_DTYPES`): the wide GEMM writes the shrink
#: in float16, whose range (65504) ``x @ A.T`` may leave where the output is well inside it, so
#: the wide copy holds each A row divided by a power of two that keeps it inside for every
#: float16 input, and the B column times it (:meth:`WideWeights.apply`). Unwidened, float16
#: layers took the library formula in float32 (:func:`lorahot.layers.base.library_operands`),
#: 2.6-4x the base GEMM's time on SDXL's shapes against 1.4-1.6x widened (H200,
#: ``benchmarks/experiments/float16_probe.py``). The benchmarks set this to compare.
UNWIDENED_DTYPES: frozenset[torch.dtype] = frozenset()


def widen_layers(layers: dict[str, LoRALayer], buffers: BufferManager, model: nn.Module | None = None) -> None:
    """Widens every layer that can be: on a device of :data:`DEVICE_TYPES`, its weight of the
    arena's dtype (see :meth:`LoRALayer.widenable`) and not of :data:`UNWIDENED_DTYPES`, whose
    memory no other tensor of ``model`` holds (:func:`_shared`). The others keep the library formula.
    Neighbours that may read one input (see :func:`_groups`) get their wide buffers back to
    back in one allocation, for :mod:`lorahot.kernels.wide_groups`."""
    r = buffers.max_rank
    for group in _groups(layers, buffers, _shared(model) if model is not None else frozenset()):
        if len(group) == 1:
            group[0].widen(r)
            continue
        weight, cols = group[0].base_weight, group[0].spec.in_dim + r
        outs = tuple(m.spec.out_dim for m in group)
        with torch.inference_mode(False):  # written outside inference mode later (see LoRALinear.widen)
            alloc = torch.zeros((sum(outs) + r * len(group), cols), device=weight.device, dtype=weight.dtype)
        handle = TensorHandle((alloc,))
        row = 0
        for member, out in zip(group, outs, strict=True):
            geometry = ((out + r, cols), (cols, 1), row * cols)
            member.widen(r, alloc.narrow(0, row, out + r), (handle, geometry, outs))
            row += out + r


def _shared(model: nn.Module) -> frozenset[tuple[torch.device, int]]:
    """The storages that more than one tensor object of ``model`` holds (its parameters and
    buffers): a weight in one of them shares its memory with another parameter or buffer (two
    parameters made over one tensor's ``.data``, a buffer that is a view of the weight). Widening
    moves the weight into a new buffer, and that other tensor would keep the old memory: an edit
    or a checkpoint load through it would no longer reach the weight, after eject too."""
    holders: dict[tuple[torch.device, int], set[int]] = {}
    for t in (*model.parameters(), *model.buffers()):
        if plain(t) and t.numel():
            holders.setdefault((t.device, t.untyped_storage().data_ptr()), set()).add(id(t))
    return frozenset(key for key, ids in holders.items() if len(ids) > 1)


def _shifted(shift: torch.Tensor | None) -> str:
    """How a refusal's value counts a shifted arena's row shifts, or nothing."""
    return "" if shift is None else " (times the power of two float16's wide copy shifts its rows by)"


def _groups(
    layers: dict[str, LoRALayer], buffers: BufferManager, shared: frozenset[tuple[torch.device, int]] = frozenset()
) -> list[list[LoRALayer]]:
    """The layers to widen, in runs of neighbours (in the order they were injected) under one
    parent module with one input width, on one arena: attention's q, k and v, an MLP's gate
    and up, and o or down alone. Whether a run's members read one input is the compiler pass's
    to see; where they do not (a cross-attention's q) the allocation changes nothing. A weight
    tied to an earlier layer's (one storage) is not widened: widening it too would move the
    weight out of the first layer's buffer; nor a weight whose memory another tensor of the
    model holds (``shared``, :func:`_shared`)."""
    out: list[list[LoRALayer]] = []
    last: tuple[object, ...] | None = None
    taken: set[int] = set()  # the weights' storages: a weight tied to an earlier layer's stays where it is
    for name, layer in layers.items():
        where = buffers.where[name][0]
        arena = buffers.arenas[where]
        if (
            arena.device.type not in DEVICE_TYPES
            or arena.dtype in UNWIDENED_DTYPES
            or not layer.widenable(buffers.max_rank, arena.dtype)
        ):
            last = None
            continue
        storage = layer.base_weight.untyped_storage().data_ptr()
        if storage in taken or (layer.base_weight.device, storage) in shared:
            last = None
            continue
        taken.add(storage)
        key = (where, name.rpartition(".")[0], layer.spec.in_dim)
        if key == last:
            out[-1].append(layer)
        else:
            out.append([layer])
        last = key
    return out


class WideWeights:
    """The wide layers of one runtime, grouped by arena, and their refresh."""

    def __init__(self, layers: dict[str, LoRALayer], buffers: BufferManager) -> None:
        self.buffers = buffers
        #: per arena: (layer indices, wide B rows, live B rows), in the same order
        self.groups: list[tuple[list[int], list[torch.Tensor], list[torch.Tensor]]] = [
            ([], [], []) for _ in buffers.arenas
        ]
        #: per arena: (wide A rows, live A rows), in the order of :attr:`groups`
        self.a_groups: list[tuple[list[torch.Tensor], list[torch.Tensor]]] = [([], []) for _ in buffers.arenas]
        mine: list[list[LoRALayer]] = [[] for _ in buffers.arenas]  # the layers, in the order of groups
        for name, layer in layers.items():
            if not layer.wide:
                continue
            arena, index = buffers.where[name]
            mine[arena].append(layer)
            live_a, live_b = buffers.arenas[arena].rows(index, buffers.live)
            indices, wide, live = self.groups[arena]
            indices.append(index)
            wide.append(layer.wide_rows())
            live.append(live_b)
            self.a_groups[arena][0].append(layer.wide_a_rows())
            self.a_groups[arena][1].append(live_a)
        # the layer indices as index tensors, built once: every load, swap and set_scale reads them
        self._index = [torch.tensor(indices, dtype=torch.long) for indices, _, _ in self.groups]
        self.extent = [0] * len(buffers.arenas)  # rows of the wide buffers that may be nonzero
        self._views: dict[tuple[int, int, str], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        #: id(plan) -> (a weak reference to it, its largest scaled B rows per arena), see
        #: :meth:`_worst` (weak: a plan holds its adapter's tensors)
        self._worst_of: dict[int, tuple[weakref.ref[LoadPlan], list[tuple[int, list[int], int, float]]]] = {}
        #: per arena of a dtype of :data:`SHIFTED_DTYPES`: each wide layer's power of two per rank
        #: row (float32 ``[layers, R]`` on the device, in the order of :attr:`groups`), which the
        #: A copy divides the live A row by and the B copy multiplies the column by
        #: (:func:`~lorahot.kernels.row_scale.row_shifts`); None elsewhere
        self._shift: list[torch.Tensor | None] = [
            torch.ones(len(wide), buffers.max_rank, device=wide[0].device)
            if indices and buffers.arenas[a].dtype in SHIFTED_DTYPES
            else None
            for a, (indices, wide, _) in enumerate(self.groups)
        ]
        #: per arena, on CUDA: one launch that rewrites every wide layer's rows from the live
        #: per-row scales on the device (None: the library-call path below)
        self._scalers: list[RowScaler | None] = [
            RowScaler(wide, live, indices, self._shift[a])
            if indices and row_scale.available(wide[0].device, wide[0].dtype)
            else None
            for a, (indices, wide, live) in enumerate(self.groups)
        ]
        #: per shifted arena: the contiguous copy of its wide layers' shifted A rows, laid out as
        #: the arena's live A (one region), and each layer's ``[R, in]`` view of it, in the order
        #: of :attr:`groups`; None elsewhere (:meth:`_shifted_copy`)
        self._copies: list[tuple[torch.Tensor, list[torch.Tensor]] | None] = [
            self._shifted_copy(a, mine[a]) if shift is not None else None for a, shift in enumerate(self._shift)
        ]
        #: per arena, on CUDA: the launches that copy every wide layer's A rows (the same kernel,
        #: every scale one), each with its scales: one, or in a shifted arena two (the live rows
        #: divided by their shifts into the contiguous copy, then that copy into the wide
        #: buffers); None: library calls
        self._copiers: list[list[tuple[RowScaler, torch.Tensor]] | None] = [
            self._a_copiers(a) if scaler is not None else None for a, scaler in enumerate(self._scalers)
        ]

    def _shifted_copy(self, arena: int, layers: list[LoRALayer]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The contiguous copy of arena ``arena``'s shifted A rows and each of its wide
        ``layers``' view of it, each layer told where its rows are (:meth:`LoRALayer.shift_rows`):
        the compiled shrink reads them as a bfloat16 layer's reads the arena, so that neighbours
        over one input share one shrink (:mod:`lorahot.kernels.stacked_shrinks`) and a layer
        after attention takes one GEMM over ``[W; A]`` (:mod:`lorahot.kernels.extern_inputs`)."""
        A = self.buffers.arenas[arena].A
        with torch.inference_mode(False):  # written outside inference mode later (see widen_layers)
            copy = torch.zeros(A.shape[1], device=A.device, dtype=A.dtype)
        handle = TensorHandle((copy,))
        base = A[self.buffers.live].storage_offset()
        views = []
        for layer, live in zip(layers, self.a_groups[arena][1], strict=True):
            geometry = (tuple(live.shape), live.stride(), live.storage_offset() - base)
            views.append(copy.as_strided(*geometry))
            layer.shift_rows(views[-1], handle, geometry)
        return copy, views

    def _a_copiers(self, arena: int) -> list[tuple[RowScaler, torch.Tensor]]:
        """The launches of :attr:`_copiers` for arena ``arena`` (CUDA with Triton)."""
        wide_a, live_a = self.a_groups[arena]
        positions = list(range(len(wide_a)))
        ones = torch.ones(len(wide_a), self.buffers.max_rank, device=wide_a[0].device)
        copies = self._copies[arena]
        if copies is None:
            return [(RowScaler(wide_a, live_a, positions), ones)]
        return [
            (RowScaler(copies[1], live_a, positions, self._shift[arena]), ones),  # found, divided by
            (RowScaler(wide_a, copies[1], positions), ones),
        ]

    @property
    def nbytes(self) -> int:
        """Bytes the wide buffers added to the model (their B columns and A rows; the weights moved
        in), and float16's contiguous copies of the shifted A rows."""
        added = sum(w.nbytes for _, wide, _ in self.groups for w in wide)
        added += sum(w.nbytes for wide_a, _ in self.a_groups for w in wide_a)
        return added + sum(held[0].nbytes for held in self._copies if held is not None)

    @property
    def empty(self) -> bool:
        return not any(indices for indices, _, _ in self.groups)

    def check(self, plan: LoadPlan, multiplier: Weight, names: list[list[str]], part: str | None = None) -> None:
        """Refuses a ``multiplier`` under which some wide layer's ``scale * B`` would leave its
        dtype's range (float16 tops out at 65504, and its wide copy holds ``scale * B`` times
        each row's shift; the plain formula scales after the products).
        Each part of a stack is checked with its own weight: its rank rows hold only its own B;
        ``part`` names it (:meth:`~lorahot.runtime.stack.Stack.named`), else the plan's source.

        Raises:
            UsageError: naming the layer, the largest value and the largest multiplier allowed.
        """
        for a, indices, worst, largest in self._worst(plan, multiplier):
            top = dtype_max(self.buffers.arenas[a].dtype)
            if largest > top:
                layer = names[a][indices[worst]] if a < len(names) else f"layer {indices[worst]}"
                raise UsageError(
                    f"{part or plan.source}, {layer}: scale={multiplier:g} times alpha/r times max|B| is "
                    f"{largest:.4g}{_shifted(self._shift[a])}, beyond the "
                    f"{self.buffers.arenas[a].dtype} range (max {top:.4g}) of the layer's scaled B columns. Pass a "
                    f"scale of at most {top / largest * peak(multiplier):.4g} in magnitude{_there(multiplier)}, "
                    "inject with dtype=torch.float32 (LoRA "
                    "buffers of float32's range), or with fused=False (the plain formula scales after the products)."
                )

    def limits(self, plan: LoadPlan) -> list[tuple[float, float]]:
        """Per arena with wide layers, ``(largest, top)``: :meth:`check` refuses a multiplier
        ``m`` where ``largest * abs(m) > top``."""
        return [(largest, dtype_max(self.buffers.arenas[a].dtype)) for a, _, _, largest in self._worst_at_1(plan)]

    def _worst(self, plan: LoadPlan, multiplier: Weight) -> list[tuple[int, list[int], int, float]]:
        """:meth:`_worst_at_1` at ``multiplier``: the largest value times ``|multiplier|``, or,
        with a weight per layer, each layer's value times its weight's."""
        if not isinstance(multiplier, LayerWeights):
            return [(a, ix, worst, largest * abs(multiplier)) for a, ix, worst, largest in self._worst_at_1(plan)]
        out = []
        for a, indices, values in self._values(plan):
            weighted = values.numpy() * np.abs(multiplier.vectors[a][indices])
            worst = int(weighted.argmax())
            out.append((a, indices, worst, float(weighted[worst])))
        return out

    def _values(self, plan: LoadPlan) -> list[tuple[int, list[int], torch.Tensor]]:
        """Per arena with wide layers: the arena, its wide layers' indices and each one's
        ``max|B| * |alpha / r|`` of ``plan`` (times the bound on its rows' shifts,
        :attr:`LoadPlan.a_shift`, in a shifted arena)."""
        out = []
        for a, (indices, _, _) in enumerate(self.groups):
            if indices and len(plan.scaled_b) > a:
                values = plan.scaled_b[a][self._index[a]]
                if self._shift[a] is not None and len(plan.a_shift) > a:
                    values = values * plan.a_shift[a][self._index[a]]
                out.append((a, indices, values))
        return out

    def _worst_at_1(self, plan: LoadPlan) -> list[tuple[int, list[int], int, float]]:
        """Per arena with wide layers: the arena, its wide layers' indices, the position among them of the
        largest ``max|B| * |alpha / r|`` of ``plan`` (times the bound on its rows' shifts,
        :attr:`LoadPlan.a_shift`, in a shifted arena), and that value. Memoized per plan (each
        ``set_scale`` checks the same plans again; a host tensor op each took several
        microseconds)."""
        found = self._worst_of.get(id(plan))
        if found is not None and found[0]() is plan:
            return found[1]
        out = []
        for a, indices, values in self._values(plan):
            worst = int(values.argmax())
            out.append((a, indices, worst, float(values[worst])))
        if len(self._worst_of) >= 64:  # plans of adapters long gone
            self._worst_of = {k: v for k, v in self._worst_of.items() if v[0]() is not None}
        self._worst_of[id(plan)] = (weakref.ref(plan), out)
        return out

    def apply(self, stack: Stack | None) -> None:
        """Sets every wide layer's B columns to the live B times its per-row scales (the live
        region's, which hold ``stack``'s at its parts' weights), and its A rows to the live A;
        zero for None (no adapter live)."""
        with torch.no_grad():
            for a in range(len(self.groups)):
                rows = self._span(a)
                if rows == 0:
                    continue
                self._copy_a(a, rows, stack is None)
                scaler = self._scalers[a]
                if stack is not None and scaler is not None:  # the live scales are on the device already
                    scaler(self.buffers.arenas[a].S[self.buffers.live], rows)
                    self.extent[a] = self.buffers.arenas[a].a_extent[self.buffers.live]
                    continue
                wide, live = self._rows(a, rows)
                if stack is None:
                    torch._foreach_zero_(wide)
                else:
                    self._scale_rows(a, rows, wide, live)
                self.extent[a] = self.buffers.arenas[a].a_extent[self.buffers.live] if stack is not None else 0

    def _scale_rows(self, arena: int, rows: int, wide: list[torch.Tensor], live: list[torch.Tensor]) -> None:
        """Where no kernel runs: each wide layer's first ``rows`` B rows from the live ones times
        the live per-row scales (which the kernel reads too), float16's times the rows' shifts,
        the product in the scales' dtype and rounded once, as the kernel computes it. (Python
        numbers to ``_foreach_mul_`` on float16 tensors are rounded to float16 first: ``2.6816 *
        0.7`` gave 1.8779 where the product rounds to 1.8770.)"""
        scales = self.buffers.arenas[arena].S[self.buffers.live]
        shift = self._shift[arena]
        for k, (w, t, i) in enumerate(zip(wide, live, self.groups[arena][0], strict=True)):
            s = scales[i, :rows] if shift is None else scales[i, :rows] * shift[k, :rows]
            w.copy_(t.to(s.dtype) * s[:, None])

    def _copy_a(self, arena: int, rows: int, zero: bool) -> None:
        """The first ``rows`` A rows of arena ``arena``'s wide layers: the live A's, or zero."""
        copiers = self._copiers[arena]
        if copiers is not None and not zero:
            for copier, scales in copiers:
                copier(scales, rows)
            return
        wide_a, live_a = self._rows(arena, rows, "a")
        shift = self._shift[arena]
        if shift is None:
            if zero:
                torch._foreach_zero_(wide_a)
            else:
                torch._foreach_copy_(wide_a, live_a)
            return
        copies = self._rows(arena, rows, "copy")[0]
        if zero:
            torch._foreach_zero_(copies)
        else:  # as the kernels: each row divided by its power of two into the copy, rounded once
            for k, (c, t) in enumerate(zip(copies, live_a, strict=True)):
                shift[k, :rows] = row_shifts(t)
                c.copy_(t.float() / shift[k, :rows, None])
        torch._foreach_copy_(wide_a, copies)

    def device_calls(self) -> list[tuple[RowScaler, torch.Tensor, int]] | None:
        """The device work :meth:`apply` does for a live adapter's new scales (``set_scale``:
        the A rows do not change), where every arena's refresh is one :class:`RowScaler` launch
        reading the live scales (CUDA with Triton): per arena with rows to rewrite, ``(scaler,
        the live S, rows)``. None where an arena takes the library-call path. After running the
        calls, :meth:`settle` records what they rewrote."""
        out = []
        for a in range(len(self.groups)):
            rows = self._span(a)
            if rows == 0:
                continue
            scaler = self._scalers[a]
            if scaler is None:
                return None
            out.append((scaler, self.buffers.arenas[a].S[self.buffers.live], rows))
        return out

    def replayable(self) -> bool:
        """Whether :meth:`apply` for a live adapter is device launches alone, with no value the
        host computes: every arena with wide layers has its :class:`RowScaler` and its copier
        (CUDA with Triton). A captured CUDA graph can then replay it
        (:mod:`lorahot.runtime.load_replay`)."""
        return all(
            self._scalers[a] is not None and self._copiers[a] is not None
            for a, (indices, _, _) in enumerate(self.groups)
            if indices
        )

    def spans(self, a_rows: Sequence[int]) -> tuple[int, ...]:
        """The rows :meth:`apply` rewrites per arena once the live region's A extents are
        ``a_rows`` (one per arena); 0 where an arena has no wide layer."""
        return tuple(max(self.extent[a], a_rows[a]) if self.groups[a][0] else 0 for a in range(len(self.groups)))

    def settle(self, empty: bool = False) -> None:
        """After :meth:`device_calls` ran (or a replay of :meth:`apply`): the wide rows now hold
        the live adapter's, or (``empty``) zeros, as :meth:`apply` with no adapter leaves them."""
        for a, (indices, _, _) in enumerate(self.groups):
            if indices:
                self.extent[a] = 0 if empty else self.buffers.arenas[a].a_extent[self.buffers.live]

    def _span(self, arena: int) -> int:
        """Rows of arena ``arena``'s wide layers a refresh rewrites: those that may be nonzero
        now or in the live adapter; 0 where the arena has no wide layer."""
        if not self.groups[arena][0]:
            return 0
        return max(self.extent[arena], self.buffers.arenas[arena].a_extent[self.buffers.live])

    def _rows(self, arena: int, rows: int, kind: str = "b") -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The first ``rows`` rank rows of arena ``arena``'s wide and live B blocks (``kind``
        "b"), A blocks ("a"), or its shifted A rows' contiguous copies and the live A blocks
        ("copy", a shifted arena's) (memoized)."""
        key = (arena, rows, kind)
        found = self._views.get(key)
        if found is None:
            if kind == "a":
                wide, live = self.a_groups[arena]
            elif kind == "b":
                wide, live = self.groups[arena][1:]
            else:
                held = self._copies[arena]
                assert held is not None  # a shifted arena's (lorahot's own: a bug, not bad input)
                wide, live = held[1], self.a_groups[arena][1]
            found = self._views[key] = ([w[:rows] for w in wide], [t[:rows] for t in live])
        return found


def _there(multiplier: Weight) -> str:
    """Where a refusal's largest weight applies: to one layer, with a weight per layer."""
    return " on that layer" if isinstance(multiplier, LayerWeights) else ""
