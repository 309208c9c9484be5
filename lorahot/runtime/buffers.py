"""The rank-padded buffer manager: every adapter buffer of every slot, allocated once.

Layers are grouped by (device, dtype); each group gets one :class:`Arena` holding three
tensors, region-major (a region is a slot, plus one live region when there are several slots):

- ``A [regions, a_total]``: layer ``l`` owns the contiguous block
  ``[a_off[l], a_off[l] + R * in_dim[l])``, viewed ``[R, in_dim]``; its live ``lora_A`` is that
  view in the live region.
- ``B [regions, b_total]``: B transposed, ``[R, out_dim]`` blocks laid out the same way.
- ``S [regions, n_layers, R]`` (float32, or float64 for float64 layers): each layer's
  per-row scales: row ``k`` of A is scaled by ``S[.., l, k]`` before the expand, so the layer
  computes ``B diag(s) A``. One adapter gives every row of a layer its ``alpha / r`` times the
  user's scale; several adapters stacked in one slot (:mod:`lorahot.runtime.stack`) each give
  their own rows their own.
- ``E [regions, e_total]`` (the scales' dtype): each layer's *extras*, a ``[4, out_dim]`` block:
  the DoRA factor (1 without DoRA), the LoRA bias (0 without), ``g = (1 - f) * base bias`` and
  the DoRA magnitude (see :mod:`lorahot.layers.base`). A load writes the magnitudes and biases
  the adapter has; the factors are computed on the device from them (:mod:`lorahot.runtime.dora`).
  Where several parts of a stack carry a LoRA bias on one layer (no DoRA there), ``g`` holds their
  sum at the parts' weights and the bias row 0 (:mod:`lorahot.runtime.bias_sums`).

Every layer's A and B are contiguous, so the forward's matrix products run on plain
row-major operands. A rank-``r`` adapter fills the first ``r`` rows of each block (for grouped
convs, the first ``r / g`` rows of each of the ``g`` group slices); the rest stays zero. The
parts of a stack follow one another: part ``p`` fills rows ``[o_p, o_p + r_p)`` (for grouped
convs, ``[o_p / g, (o_p + r_p) / g)`` of each group slice).
Loads zero the region (skipped when the adapter rewrites every row that can be nonzero) and
copy every layer in one batched call. A preloaded adapter (:class:`Pack`) travels to the
device as one compact buffer holding its weights, its scales and, where the pieces share a
long enough row length, a row index: then (on CUDA) it lands by one ``index_copy_`` per
tensor, and a swap from the host cache is four device operations (copy, two row copies,
scales) with no per-layer work on the host and nothing that waits for the device. Shapes and
addresses never change after construction.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from lorahot.layers.base import EXTRA_DEFAULTS, EXTRA_ROWS, LayerSpec
from lorahot.layers.tensor_handles import TensorHandle
from lorahot.runtime.staging import Staging

__all__ = ["Arena", "Pack", "Rows", "BufferManager", "Entry", "Extra"]

_ALIGN = 64  # elements; every block starts 128-byte aligned (bf16) for fast matmuls

Entry = tuple[int, torch.Tensor, torch.Tensor]  # (layer index, A [r, ...], B [out, r/g, ...])
Extra = tuple[int, int, torch.Tensor]  # (layer index, row of its extras, values [out])


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


_PACK_ALIGN = 64  # bytes; every section of a Pack's data starts 64-byte aligned

#: A row of a :class:`Rows` section holds at least this many bytes, so its 8-byte index adds
#: at most 1/8 to the bytes copied; shorter rows take the batched copy of the pieces instead.
_MIN_ROW_BYTES = 64
_WIDE = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _row_plan(pieces: list[tuple[int, int]], start: int, itemsize: int) -> tuple[int, torch.dtype] | None:
    """``(unit, wide)`` for copying ``(offset, length)`` pieces (elements; the section starts
    at byte ``start`` of the pack) by rows: the longest row every offset and length is a
    multiple of, and the widest integer type dividing a row and the section's start (bytes).
    None when such a row is shorter than :data:`_MIN_ROW_BYTES`."""
    unit = math.gcd(*(v for piece in pieces for v in piece))
    if unit * itemsize < _MIN_ROW_BYTES:
        return None
    return unit, _WIDE[math.gcd(unit * itemsize, start, 8)]


def _row_index(pieces: list[tuple[int, int]], unit: int) -> torch.Tensor:
    """int64 ``[rows]``: for each row of ``unit`` elements of the packed pieces, in order, the
    row of the region it belongs in."""
    starts = torch.tensor([offset // unit for offset, _ in pieces], dtype=torch.int64)
    counts = torch.tensor([length // unit for _, length in pieces], dtype=torch.int64)
    firsts = torch.cumsum(counts, 0) - counts
    return torch.repeat_interleave(starts - firsts, counts) + torch.arange(int(counts.sum()))


def layer_kinds(names: list[str]) -> list[int]:
    """Per layer name, an id shared by the names that differ only in their numbers: the same
    module of different blocks (``layers.3.self_attn.q_proj`` and ``layers.4.self_attn.q_proj``),
    whose blocks a file and an arena both space evenly."""
    ids: dict[str, int] = {}
    return [ids.setdefault(_NUMBER.sub("#", name), len(ids)) for name in names]


_NUMBER = re.compile(r"\d+")


#: A load's blocks of one buffer and shape: an A and a B of that buffer (to view it through),
#: and per block the ``(source, destination)`` offsets of its A and of its B.
_Blocks = tuple[torch.Tensor, torch.Tensor, list[tuple[int, int]], list[tuple[int, int]]]

#: A run of evenly spaced blocks: ``(count, source start, source step, destination start,
#: destination step)``, in elements of each side's storage.
Run = tuple[int, int, int, int, int]


def strided_runs(pairs: list[tuple[int, int]]) -> list[Run]:
    """Groups ``(source offset, destination offset)`` pairs of same-shaped blocks into runs
    whose offsets step evenly on both sides, so each run is one strided view per side.

    Every pair lands in exactly one run (sorted by source offset; a run of one has steps 0).
    A run's destination step is positive: the destination blocks (distinct, never overlapping:
    the caller's promise) come out in increasing order. Its source step may be 0 (one source
    block copied to several places, as a split does).
    """
    pairs = sorted(pairs)
    runs: list[Run] = []
    k = 0
    while k < len(pairs):
        src, dst = pairs[k]
        n, src_step, dst_step = 1, 0, 0
        if k + 1 < len(pairs) and pairs[k + 1][1] > dst:
            src_step, dst_step = pairs[k + 1][0] - src, pairs[k + 1][1] - dst
            n = 2
            while k + n < len(pairs) and pairs[k + n] == (src + n * src_step, dst + n * dst_step):
                n += 1
        runs.append((n, src, src_step, dst, dst_step))
        k += n
    return runs


@dataclass(frozen=True)
class Rows:
    """One section of a :class:`Pack` (every layer's A, or every layer's B^T) copied into its
    arena tensor as whole rows of ``unit`` elements by one ``index_copy_``.

    Every piece of the section starts and ends on a multiple of ``unit``, in the pack and in
    the region, so the section viewed ``[n, unit]`` lands by row: source row ``k`` goes to
    row ``index[k]`` of the region viewed ``[-1, unit]``. Both sides are reinterpreted as
    ``wide`` (the widest integer type that divides a row's bytes), so the copy moves bits.

    Attributes:
        data: ``(start, stop)`` bytes of the section in :attr:`Pack.data`.
        index: ``(start, stop)`` bytes of its int64 row index in :attr:`Pack.data`.
        unit: elements per row.
        wide: the integer dtype both sides are copied as.
    """

    data: tuple[int, int]
    index: tuple[int, int]
    unit: int
    wide: torch.dtype


@dataclass
class Pack:
    """One adapter's content for one arena, compact, in host memory, ready for one copy.

    Attributes:
        data: flat bytes ``[n]`` (pinned for a GPU arena): the weights in the buffers' dtype
            (every layer's A pieces, group by group, then every layer's B^T pieces); then,
            each 64-byte aligned, the row index of each section when the pack is copied by
            rows, and the per-layer scales. One host-to-device copy moves all of it. Never
            written after :meth:`Arena.pack` returns (a copy may still be reading it).
        sizes: the length of each piece of the weights, in elements, in packing order (the
            order of :meth:`Arena._pieces`).
        ranks: ``(layer, rank)`` of every layer the adapter touches, in packing order.
        scales: ``[n_layers]`` float64 per-layer scale (before the user's multiplier), 0 where
            the adapter does not touch a layer: a view of the end of :attr:`data`. A write gives
            it to every row of the layer (rows past the rank scale zeros).
        a_rows, b_rows: the most rows of A / B^T any layer uses.
        weights: ``(start, stop)`` bytes of the A and B^T sections in :attr:`data`.
        scale_bytes: ``(start, stop)`` bytes of the scales in :attr:`data`.
        rows: the A and B^T sections as :class:`Rows` (one ``index_copy_`` each), or None
            when a row would be too short for its index to pay or the arena is not on CUDA
            (:attr:`Arena.by_rows`): then one ``_foreach_copy_`` over the pieces.
        cover: the largest extent the pack overwrites wholly (its least rank, when it writes
            every layer and none is grouped; -1 when it cannot cover a region): a write into a
            region whose extents are at most this skips the zero fill.
        pinned: whether :attr:`data` is pinned (copied without blocking the host).
    """

    data: torch.Tensor
    sizes: list[int]
    ranks: list[tuple[int, int]]
    scales: torch.Tensor
    a_rows: int
    b_rows: int
    weights: tuple[int, int]
    scale_bytes: tuple[int, int]
    rows: tuple[Rows, Rows] | None
    cover: int
    pinned: bool
    #: per region, the destination views of the pieces (filled on first write; ``rows`` None)
    dsts: dict[int, list[torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)
    #: the pieces of :attr:`data` when it is written from where it is (a CPU arena)
    srcs: list[torch.Tensor] | None = field(default=None, repr=False, compare=False)
    #: ``(layer, row)`` of each extras row the pack writes (DoRA magnitudes, LoRA biases), in order
    extra_rows: list[tuple[int, int]] = field(default_factory=list)
    #: ``(start, stop)`` bytes of those rows in :attr:`data` (the arena's scale dtype)
    extra_bytes: tuple[int, int] = (0, 0)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes


class Arena:
    """All LoRA storage for the layers of one device and dtype. See the module docstring."""

    def __init__(
        self,
        specs: list[LayerSpec],
        max_rank: int,
        regions: int,
        device: torch.device,
        dtype: torch.dtype,
        kinds: list[int] | None = None,
    ) -> None:
        self.specs = specs
        #: per layer, an id shared by the layers of one kind (the same module of different
        #: blocks, :func:`layer_kinds`): the copies of a load are batched within a kind
        self.kinds = kinds if kinds is not None else [0] * len(specs)
        self.rank = max_rank
        self.regions = regions
        self.device = device
        self.dtype = dtype
        self.a_off, a_total = self._offsets([max_rank * s.in_dim for s in specs])
        self.b_off, b_total = self._offsets([max_rank * s.out_dim for s in specs])
        self.e_off, e_total = self._offsets([EXTRA_ROWS * s.out_dim for s in specs])
        #: per layer, what a load's copies need: A's and B's offsets, in and out, kind, grouped
        self._layout = [
            (self.a_off[i], self.b_off[i], s.in_dim, s.out_dim, self.kinds[i], s.groups != 1)
            for i, s in enumerate(specs)
        ]
        sdtype = self.scale_dtype(dtype)
        with torch.inference_mode(False), torch.no_grad():
            self.A = torch.zeros(regions, a_total, device=device, dtype=dtype)
            self.B = torch.zeros(regions, b_total, device=device, dtype=dtype)
            self.S = torch.zeros(regions, len(specs), max_rank, device=device, dtype=sdtype)
            self.E = torch.zeros(regions, e_total, device=device, dtype=sdtype)
        self.handle = TensorHandle((self.A, self.B, self.S, self.E))  # how compiled graphs reach the buffers
        self.e_dirty = [False] * regions  # whether a region's extras differ from e_default
        self.a_extent = [0] * regions  # most rows of A any layer uses; rows past it are zero
        self.b_extent = [0] * regions
        #: per region, the writes of its A, B or extras begun (a load, a copy from another region, a
        #: clear), counted before the device work: while the count stays, they hold what they held
        #: (merged mode rewrites only the layers whose inputs changed: lorahot.runtime.merge)
        self.generation = [0] * regions
        self._views: dict[tuple[int, int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._flat: dict[tuple[int, int, int], list[torch.Tensor]] = {}
        self._grids: dict[tuple[int, int, int, torch.dtype], torch.Tensor] = {}
        #: whether packs made from now on land by rows (:class:`Rows`) where they can: on CUDA,
        #: where each copy is a launch that costs host time; on the CPU the copy of the pieces
        #: is the faster one (memcpy; the CPU's ``index_copy_`` is about 3x slower), and other
        #: devices keep the batched copy of the pieces they were tested with.
        self.by_rows = device.type == "cuda"
        #: on CUDA, the pinned host copy the per-row scales travel through (see :meth:`_upload_scales`)
        self._s_stage: Staging | None = None
        with torch.inference_mode(False):
            self._region = [(self.A[r], self.B[r], self.S[r]) for r in range(regions)]  # flat views per region
            self._e_region = [self.E[r] for r in range(regions)]
            #: per region, the rows of the extras that are not 0 without an adapter, and their values
            self._e_ones = [
                [self.extras(i, r)[row] for i in range(len(specs)) for row, v in enumerate(EXTRA_DEFAULTS) if v]
                for r in range(regions)
            ]
        self._default_values = [v for _ in specs for v in EXTRA_DEFAULTS if v]
        for r in range(regions):
            self._reset_extras(r)

    @staticmethod
    def scale_dtype(dtype: torch.dtype) -> torch.dtype:
        """The dtype of the scales for buffers of ``dtype``: float32, float64 for float64 layers
        (finer than the weights they scale)."""
        return torch.promote_types(dtype, torch.float32)

    @classmethod
    def nbytes_for(cls, specs: list[LayerSpec], max_rank: int, regions: int, dtype: torch.dtype) -> int:
        """Bytes an arena of these layers would allocate, computed before allocating."""
        a_total = cls._offsets([max_rank * s.in_dim for s in specs])[1]
        b_total = cls._offsets([max_rank * s.out_dim for s in specs])[1]
        e_total = cls._offsets([EXTRA_ROWS * s.out_dim for s in specs])[1]
        scales = (len(specs) * max_rank + e_total) * cls.scale_dtype(dtype).itemsize
        return regions * ((a_total + b_total) * dtype.itemsize + scales)

    @staticmethod
    def _offsets(sizes: list[int]) -> tuple[list[int], int]:
        offsets, pos = [], 0
        for n in sizes:
            offsets.append(pos)
            pos = _round_up(pos + n, _ALIGN)
        return offsets, pos

    @property
    def nbytes(self) -> int:
        """Bytes this arena allocated (every region)."""
        return self.A.nbytes + self.B.nbytes + self.S.nbytes + self.E.nbytes

    def rows(self, layer: int, region: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous views ``[R, in_dim]`` and ``[R, out_dim]`` of one layer's A and B^T."""
        spec, R = self.specs[layer], self.rank
        a = self.A[region, self.a_off[layer] : self.a_off[layer] + R * spec.in_dim].view(R, spec.in_dim)
        b = self.B[region, self.b_off[layer] : self.b_off[layer] + R * spec.out_dim].view(R, spec.out_dim)
        return a, b

    def scale(self, layer: int, region: int) -> torch.Tensor:
        """``[R]`` view of one layer's per-row scales in ``region``."""
        return self.S[region, layer]

    def extras(self, layer: int, region: int) -> torch.Tensor:
        """``[4, out_dim]`` view of one layer's extras in ``region`` (see the module docstring)."""
        n = self.specs[layer].out_dim
        return self.E[region, self.e_off[layer] : self.e_off[layer] + EXTRA_ROWS * n].view(EXTRA_ROWS, n)

    def _reset_extras(self, region: int) -> None:
        """Sets ``region``'s extras to their values without an adapter (factor 1, the rest 0)."""
        with torch.no_grad():
            self._e_region[region].zero_()
            torch._foreach_add_(self._e_ones[region], self._default_values)

    def _write_extras(self, region: int, rows: list[tuple[int, int]], srcs: list[torch.Tensor]) -> None:
        """Resets ``region``'s extras to no adapter (where they differ), then writes the
        ``(layer, row)`` rows from ``srcs``; the DoRA factors are computed afterwards."""
        if self.e_dirty[region] or rows:
            # marked before the device work: a reset or copy interrupted midway leaves extras to reset
            self.e_dirty[region] = True
            self._reset_extras(region)
        if rows:
            torch._foreach_copy_([self.extras(i, region)[row] for i, row in rows], srcs)
        self.e_dirty[region] = bool(rows)

    @staticmethod
    def a_rows_for(spec: LayerSpec, rank: int, max_rank: int) -> int:
        """Rows of A a rank-``rank`` adapter occupies in a layer of ``spec``."""
        g = spec.groups
        return rank if g == 1 or rank == 0 else (g - 1) * (max_rank // g) + rank // g

    def extents(self, ranks: dict[int, int]) -> tuple[int, int]:
        """Most rows of A and of B^T that layers ``{index: rank}`` use."""
        a = max((self.a_rows_for(self.specs[i], r, self.rank) for i, r in ranks.items()), default=0)
        b = max((r // self.specs[i].groups for i, r in ranks.items()), default=0)
        return a, b

    def views(self, layer: int, region: int, rank: int, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a rank-``rank`` adapter of ``layer`` goes in ``region``, after the first
        ``offset`` rows of the rank (a later part of a stack), memoized.

        Returns ``[groups, r/groups, in_dim]`` (group ``j`` starting at row ``j * R/groups``,
        so every group's slice stays aligned when the rank is padded) and
        ``[r/groups, out_dim]``.
        """
        key = (layer, region, rank, offset)
        found = self._views.get(key)
        if found is None:
            spec = self.specs[layer]
            start, stop, cap = offset // spec.groups, (offset + rank) // spec.groups, self.rank // spec.groups
            a_rows, b_rows = self.rows(layer, region)
            a = a_rows.view(spec.groups, cap, spec.in_dim)[:, start:stop]
            found = self._views[key] = (a, b_rows[start:stop])
        return found

    def sources(self, layer: int, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """File-layout ``A [r, *a_row]``, ``B [out, r/g, *1]`` as the shapes :meth:`views` takes."""
        spec = self.specs[layer]
        per = A.shape[0] // spec.groups
        return A.reshape(spec.groups, per, spec.in_dim), B.reshape(spec.out_dim, per).t()

    def flat_views(self, layer: int, region: int, rank: int) -> list[torch.Tensor]:
        """:meth:`views` as flat contiguous pieces (one per group of A, then B), memoized."""
        key = (layer, region, rank)
        found = self._flat.get(key)
        if found is None:
            a, b = self.views(layer, region, rank)
            found = self._flat[key] = [*(g.reshape(-1) for g in a.unbind(0)), b.reshape(-1)]
        return found

    def pack(self, entries: list[Entry], scales: torch.Tensor, *, pin: bool, extras: list[Extra] | None = None) -> Pack:
        """Packs ``(layer, A, B)`` triples and their per-layer ``scales`` (float64 ``[n_layers]``)
        into one host buffer (pinned if ``pin``), laid out as :class:`Pack` describes, with the
        ``(layer, row, values)`` extras rows after the scales."""
        ranks = {i: a.shape[0] for i, a, _ in entries}
        extras = extras or []
        a_pieces, b_pieces = self._pieces(ranks)
        size = self.dtype.itemsize
        a_end = sum(n for _, n in a_pieces) * size
        weights = (0, a_end + sum(n for _, n in b_pieces) * size)
        sections = [(a_pieces, (0, a_end)), (b_pieces, (a_end, weights[1]))]
        plans = [p for pieces, (start, _) in sections if (p := _row_plan(pieces, start, size)) is not None]
        pos = _round_up(weights[1], _PACK_ALIGN)
        rows: tuple[Rows, Rows] | None = None
        indices: list[torch.Tensor] = []
        if self.by_rows and ranks and len(plans) == 2:  # else the batched copy of the pieces
            found = []
            for (pieces, span), (unit, wide) in zip(sections, plans):
                indices.append(_row_index(pieces, unit))
                found.append(Rows(span, (pos, pos + indices[-1].nbytes), unit, wide))
                pos = _round_up(pos + indices[-1].nbytes, _PACK_ALIGN)
            rows = (found[0], found[1])
        scale_bytes = (pos, pos + len(self.specs) * 8)
        start = _round_up(scale_bytes[1], _PACK_ALIGN)
        extra_bytes = (start, start + sum(t.numel() for _, _, t in extras) * self.E.element_size())
        data = torch.empty(extra_bytes[1], dtype=torch.uint8, pin_memory=pin)
        pieces = iter(data[: weights[1]].view(self.dtype).split([n for _, n in a_pieces + b_pieces]))
        for i, a, b in entries:  # every layer's A groups first
            for group in self.sources(i, a, b)[0].unbind(0):
                next(pieces).view_as(group).copy_(group)
        for i, a, b in entries:  # then every layer's B^T
            src_b = self.sources(i, a, b)[1]
            next(pieces).view_as(src_b).copy_(src_b)
        for section, index in zip(rows or (), indices):
            data[section.index[0] : section.index[1]].view(torch.int64).copy_(index)
        packed_scales = data[scale_bytes[0] : scale_bytes[1]].view(torch.float64)
        packed_scales.copy_(scales)
        if extras:
            flat = data[extra_bytes[0] : extra_bytes[1]].view(self.E.dtype)
            for piece, (_, _, t) in zip(flat.split([t.numel() for _, _, t in extras]), extras):
                piece.copy_(t.reshape(-1))
        a_rows, b_rows = self.extents(ranks)
        return Pack(
            data,
            [n for _, n in a_pieces + b_pieces],
            list(ranks.items()),
            packed_scales,
            a_rows,
            b_rows,
            weights=weights,
            scale_bytes=scale_bytes,
            rows=rows,
            cover=self._cover(list(ranks.items())),
            pinned=pin,
            extra_rows=[(i, row) for i, row, _ in extras],
            extra_bytes=extra_bytes,
        )

    def _pieces(self, ranks: dict[int, int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """``(offset, length)`` in a region (elements) of every piece of A (group by group) and
        of B^T that layers ``{index: rank}`` write, in the order :meth:`pack` lays them out:
        the pieces of :meth:`flat_views`, every layer's A ones first."""
        a_pieces, b_pieces = [], []
        for i, r in ranks.items():
            spec = self.specs[i]
            per, cap = r // spec.groups, self.rank // spec.groups
            a_pieces += [(self.a_off[i] + j * cap * spec.in_dim, per * spec.in_dim) for j in range(spec.groups)]
            b_pieces.append((self.b_off[i], per * spec.out_dim))
        return a_pieces, b_pieces

    def stage(self, pack: Pack, upload: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        """``pack.data`` on this arena's device: one copy (none on the CPU), which does not
        block the host when the pack is pinned; into ``upload``'s buffer where given (a pinned
        pack only: see :meth:`lorahot.io.read_buffers.ReadBuffers.upload`), else into a new
        one. Safe: a pack's data is never written, and torch's pinned-memory allocator keeps a
        block that a copy still reads until the copy is done, even if the pack is dropped
        meanwhile."""
        if upload is not None and pack.pinned:
            return upload(pack.data)
        return pack.data.to(self.device, non_blocking=pack.pinned)

    def write(self, region: int, pack: Pack, staged: torch.Tensor, multiplier: float) -> None:
        """Copies ``pack`` (``staged``: its data on this device, from :meth:`stage`) into
        ``region`` in place: a zero fill unless the pack covers the region, one ``index_copy_``
        per section (or one batched copy of the pieces), one write of the scales (each layer's
        times ``multiplier``, on every row of the layer).

        The caller has validated everything before: nothing here can fail on bad input.
        """
        a, b, s = self._region[region]
        with torch.no_grad():
            zero = self.needs_zero(region, pack)
            self._widen(region, pack.a_rows, pack.b_rows, bool(pack.extra_rows))
            if zero:
                a.zero_()
                b.zero_()
            if pack.rows is not None:
                for which, rows in enumerate(pack.rows):
                    dst = self._grid(which, region, rows)
                    index = staged[rows.index[0] : rows.index[1]].view(torch.int64)
                    src = staged[rows.data[0] : rows.data[1]].view(rows.wide).view(-1, dst.shape[1])
                    dst.index_copy_(0, index, src)
            elif pack.sizes:
                dsts = pack.dsts.get(region)
                if dsts is None:
                    dsts = pack.dsts[region] = self._pack_dsts(region, pack.ranks)
                srcs = pack.srcs if staged is pack.data else None  # on the CPU: no copy, the same pieces
                if srcs is None:
                    srcs = list(staged[pack.weights[0] : pack.weights[1]].view(self.dtype).split(pack.sizes))
                    if staged is pack.data:
                        pack.srcs = srcs
                torch._foreach_copy_(dsts, srcs)
            per_layer = staged[pack.scale_bytes[0] : pack.scale_bytes[1]].view(torch.float64)  # [n_layers]
            torch.mul(per_layer[:, None].expand(s.shape), multiplier, out=s)  # [n_layers, R]
            sizes = [self.specs[i].out_dim for i, _ in pack.extra_rows]
            srcs = (
                list(staged[pack.extra_bytes[0] : pack.extra_bytes[1]].view(self.E.dtype).split(sizes)) if sizes else []
            )
            self._write_extras(region, pack.extra_rows, srcs)
        self.wrote(region, pack)

    def needs_zero(self, region: int, pack: Pack) -> bool:
        """Whether :meth:`write` of ``pack`` into ``region`` zeroes it first: rows of the
        region's last adapter lie beyond what the pack overwrites."""
        return max(self.a_extent[region], self.b_extent[region]) > pack.cover

    def _widen(self, region: int, a_rows: int, b_rows: int, dirty: bool) -> None:
        """The host's record of ``region`` widened, before device work on it, to cover what the
        work may leave there: work interrupted midway (KeyboardInterrupt) or failing then holds
        no rows, and no extras, that the record leaves out, so the zero fill of a later write
        and the reset of :meth:`clear` reach them. The exact record follows the work."""
        self.generation[region] += 1
        self.a_extent[region] = max(self.a_extent[region], a_rows)
        self.b_extent[region] = max(self.b_extent[region], b_rows)
        self.e_dirty[region] = self.e_dirty[region] or dirty

    def wrote(self, region: int, pack: Pack) -> None:
        """The host's record of ``region`` after :meth:`write` of ``pack`` (its extents, and
        whether its extras differ from the defaults), without the device work."""
        self.generation[region] += 1
        self.a_extent[region], self.b_extent[region] = pack.a_rows, pack.b_rows
        self.e_dirty[region] = bool(pack.extra_rows)

    def _grid(self, which: int, region: int, rows: Rows) -> torch.Tensor:
        """``region`` of A (``which`` 0) or B (1) viewed as rows of ``rows.unit`` elements,
        reinterpreted as ``rows.wide`` (memoized)."""
        key = (which, region, rows.unit, rows.wide)
        found = self._grids.get(key)
        if found is None:
            flat = self._region[region][which]
            n = flat.shape[0] // rows.unit * rows.unit
            width = rows.unit * self.dtype.itemsize // rows.wide.itemsize
            with torch.inference_mode(False):  # made in inference mode, a dtype view could not be written outside
                found = self._grids[key] = flat[:n].view(rows.wide).view(-1, width)
        return found

    def _pack_dsts(self, region: int, ranks: list[tuple[int, int]]) -> list[torch.Tensor]:
        """The destination views of a pack's pieces in ``region``, in packing order."""
        views = [self.flat_views(i, region, r) for i, r in ranks]
        return [piece for v in views for piece in v[:-1]] + [v[-1] for v in views]

    def write_staged(
        self,
        region: int,
        entries: list[Entry],
        scales: torch.Tensor,
        extras: list[Extra] | None = None,
        offsets: list[int] | None = None,
    ) -> None:
        """Writes ``(layer, A, B)`` triples and ``(layer, row, values)`` extras (already on this
        device) straight into ``region``, with the per-row ``scales`` (float64 host tensor
        ``[n_layers, R]``, the user's scales included). ``offsets`` (one per entry; default 0)
        place the parts of a stack after one another in a layer's rows."""
        dsts, srcs, used = self._copies(region, entries, offsets)
        a_rows, b_rows = self.extents(used)
        self._write(region, dsts, srcs, scales, list(used.items()), a_rows, b_rows)
        with torch.no_grad():
            extras = extras or []
            self._write_extras(region, [(i, row) for i, row, _ in extras], [t.reshape(-1) for _, _, t in extras])

    def _copies(
        self, region: int, entries: list[Entry], offsets: list[int] | None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], dict[int, int]]:
        """The ``(destinations, sources)`` that write ``entries`` into ``region`` (row
        ``offsets`` as :meth:`write_staged` takes them), and the rows each layer uses.

        A file's tensors are views of the one buffer it was read into, laid out module after
        module, block after block, as the arena lays out its layers: the A (or B) of one kind
        of layer in consecutive blocks sits at evenly spaced offsets on both sides. Such
        blocks are copied as one strided view per side (:func:`strided_runs`): for a
        154-layer model about 70 copies instead of 308 A and B pairs, each of which is a launch
        on CUDA, and on the CPU a narrow B is transposed far faster many at once. Tensors that
        are not contiguous views of a buffer (clones, a fused module), and grouped convs, are
        copied one by one.
        """
        dsts: list[torch.Tensor] = []
        srcs: list[torch.Tensor] = []
        used: dict[int, int] = {}  # layer -> rows of the rank it uses
        #: (buffer, A's and B's dtypes, kind, rank, in, out) -> an A and a B of that buffer and
        #: dtypes, and per block the offsets of its A and B in the buffer and in the region
        runs: dict[tuple[int, torch.dtype, torch.dtype, int, int, int, int], _Blocks] = {}
        a_region, b_region = region * self.A.shape[1], region * self.B.shape[1]
        for k, (i, a, b) in enumerate(entries):
            offset, rank = offsets[k] if offsets else 0, a.shape[0]
            if used.get(i, 0) < offset + rank:
                used[i] = offset + rank
            a_off, b_off, in_dim, out_dim, kind, grouped = self._layout[i]
            base = a._base
            if grouped or base is None or b._base is not base or not (a.is_contiguous() and b.is_contiguous()):
                dsts += self.views(i, region, rank, offset)
                srcs += self.sources(i, a, b)
                continue
            blocks = runs.get(key := (id(base), a.dtype, b.dtype, kind, rank, in_dim, out_dim))
            if blocks is None:
                blocks = runs[key] = (a, b, [], [])
            blocks[2].append((int(a.storage_offset()), a_region + a_off + offset * in_dim))
            blocks[3].append((int(b.storage_offset()), b_region + b_off + offset * out_dim))
        for (_, _, _, _, rank, in_dim, out_dim), (a, b, a_pairs, b_pairs) in runs.items():
            for n, src, src_step, dst, dst_step in strided_runs(a_pairs):  # A [r, in] -> rows [r, in]
                srcs.append(a.as_strided((n, rank * in_dim), (src_step, 1), src))
                dsts.append(self.A.as_strided((n, rank * in_dim), (dst_step, 1), dst))
            for n, src, src_step, dst, dst_step in strided_runs(b_pairs):  # B [out, r] -> B^T rows [r, out]
                srcs.append(b.as_strided((n, rank, out_dim), (src_step, 1, rank), src))
                dsts.append(self.B.as_strided((n, rank, out_dim), (dst_step, out_dim, 1), dst))
        return dsts, srcs, used

    def _cover(self, ranks: list[tuple[int, int]]) -> int:
        """The largest extent a write of ``(layer, rank)`` pairs overwrites wholly: its least
        rank when it writes every layer (each once) and none is grouped, else -1."""
        if len(ranks) != len(self.specs) or any(self.specs[i].groups != 1 for i, _ in ranks):
            return -1
        return min(r for _, r in ranks)

    def _covers(self, region: int, ranks: list[tuple[int, int]]) -> bool:
        """Whether writing ``(layer, rank)`` pairs overwrites every row ``region`` may hold
        nonzero: every layer written (each once), none grouped, each at a rank at least the
        region's current extent. Then the zero fill can be skipped."""
        return max(self.a_extent[region], self.b_extent[region]) <= self._cover(ranks)

    def _write(
        self,
        region: int,
        dsts: list[torch.Tensor],
        srcs: list[torch.Tensor],
        scales: torch.Tensor,
        ranks: list[tuple[int, int]],
        a_rows: int,
        b_rows: int,
    ) -> None:
        """Zeroes ``region`` (unless the write covers it), copies every layer in one batched
        call, sets the scales.

        The caller has validated everything before: nothing here can fail on bad input.
        """
        with torch.no_grad():
            zero = not self._covers(region, ranks)
            self._widen(region, a_rows, b_rows, False)
            if zero:
                self.A[region].zero_()
                self.B[region].zero_()
            if dsts:
                torch._foreach_copy_(dsts, srcs)
            self._upload_scales(region, scales)
        self.a_extent[region], self.b_extent[region] = a_rows, b_rows

    def set_scales(self, region: int, scales: torch.Tensor) -> None:
        """Overwrites the per-row scales of ``region`` (float64 host tensor ``[n_layers, R]``)."""
        with torch.no_grad():
            self._upload_scales(region, scales)

    def _upload_scales(self, region: int, scales: torch.Tensor) -> None:
        """``S[region] = scales`` from the host; on CUDA through a pinned staging copy in the
        scales' dtype, queued without waiting for the device (:class:`Staging`)."""
        if not self.S.is_cuda:
            self.S[region].copy_(scales)
            return
        if self._s_stage is None:
            self._s_stage = Staging(self.S[region].numel(), self.S.dtype, self.S.device)
        stage = self._s_stage.acquire().view(self.S.shape[1:])
        # float64 -> the scales' dtype, rounded to nearest as torch rounds; in NumPy, one thread
        # (see Stack.scales: torch would split a copy of a large model's scales across threads)
        np.copyto(stage.numpy(), scales.detach().cpu().numpy(), casting="same_kind")
        self._s_stage.send([(self.S[region], stage)])

    def copy_region(self, src: int, dst: int) -> None:
        """Makes ``dst`` an exact copy of ``src``: one device copy per buffer."""
        self._widen(dst, self.a_extent[src], self.b_extent[src], self.e_dirty[src])
        with torch.no_grad():
            for t in (self.A, self.B, self.S, self.E):
                t[dst].copy_(t[src])
        self.copied(src, dst)

    def copied(self, src: int, dst: int) -> None:
        """The host's record of ``dst`` after :meth:`copy_region` from ``src``, without the device work."""
        self.generation[dst] += 1
        self.a_extent[dst], self.b_extent[dst] = self.a_extent[src], self.b_extent[src]
        self.e_dirty[dst] = self.e_dirty[src]

    def clear(self, region: int) -> None:
        """Zeroes ``region``."""
        self.generation[region] += 1
        with torch.no_grad():
            for t in (self.A, self.B, self.S):
                t[region].zero_()
            self._write_extras(region, [], [])
        self.a_extent[region] = self.b_extent[region] = 0


class BufferManager:
    """Owns the arenas of one runtime and knows where each layer lives in them.

    Region ``i`` is slot ``i``. With one slot, that region is also what the layers read; with
    several, one extra *live* region is what they read, and activating a slot copies it there.
    """

    def __init__(
        self, specs: dict[str, tuple[LayerSpec, torch.device, torch.dtype]], max_rank: int, slots: int
    ) -> None:
        self.max_rank = max_rank
        self.slots = slots
        self.regions = self.regions_for(slots)
        self.live = self.regions - 1
        self.arenas: list[Arena] = []
        self.where: dict[str, tuple[int, int]] = {}
        #: whether a write (:meth:`write` past its staging, :meth:`write_staged`, :meth:`set_scales`)
        #: has begun since the runtime last reset it: a failure before then changed nothing
        self.touched = False
        for (device, dtype), names in self.groups(specs).items():
            self.where.update({n: (len(self.arenas), i) for i, n in enumerate(names)})
            self.arenas.append(
                Arena([specs[n][0] for n in names], max_rank, self.regions, device, dtype, layer_kinds(names))
            )

    @staticmethod
    def regions_for(slots: int) -> int:
        """One region per slot, plus the live region when there are several."""
        return slots + 1 if slots > 1 else 1

    @staticmethod
    def groups(
        specs: dict[str, tuple[LayerSpec, torch.device, torch.dtype]],
    ) -> dict[tuple[torch.device, torch.dtype], list[str]]:
        """Layer names by (device, dtype): one arena each, in first-seen order."""
        groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
        for name, (_, device, dtype) in specs.items():
            groups.setdefault((device, dtype), []).append(name)
        return groups

    @classmethod
    def nbytes_needed(
        cls, specs: dict[str, tuple[LayerSpec, torch.device, torch.dtype]], max_rank: int, slots: int
    ) -> dict[torch.device, int]:
        """Bytes a manager for these layers would allocate on each device (nothing is allocated)."""
        needed: dict[torch.device, int] = {}
        for (device, dtype), names in cls.groups(specs).items():
            n = Arena.nbytes_for([specs[name][0] for name in names], max_rank, cls.regions_for(slots), dtype)
            needed[device] = needed.get(device, 0) + n
        return needed

    @property
    def nbytes(self) -> int:
        """Bytes of adapter storage allocated, all arenas and regions together."""
        return sum(a.nbytes for a in self.arenas)

    def live_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, TensorHandle]:
        """The live ``A`` rows, ``B^T`` rows, scale and extras views of layer ``name``, and the
        handle of its arena."""
        arena, idx = self.where[name]
        at = self.arenas[arena]
        a, b = at.rows(idx, self.live)
        return a, b, at.scale(idx, self.live), at.extras(idx, self.live), at.handle

    def mirrors(self, slot: int, live: bool) -> bool:
        """Whether a change to ``slot`` must also reach the live region: the slot is active,
        and the live region is a separate copy (several slots)."""
        return live and slot != self.live

    def write(
        self,
        slot: int,
        packs: list[Pack],
        multiplier: float,
        *,
        live: bool,
        upload: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
        staged: list[torch.Tensor] | None = None,
    ) -> None:
        """Copies one pack per arena into ``slot``, and into the live region if ``live``.
        ``upload(k, data)``, where given, puts arena ``k``'s pinned pack on the device in a
        buffer the caller keeps (:meth:`Arena.stage`); ``staged``, where given, is what
        :meth:`stage` returned for these packs.

        Every pack is staged on its device first, so a failed allocation changes nothing."""
        if staged is None:
            staged = self.stage(packs, upload)
        self.touched = True
        for arena, pack, data in zip(self.arenas, packs, staged):
            arena.write(slot, pack, data, multiplier)
            if self.mirrors(slot, live):
                arena.copy_region(slot, self.live)

    def stage(
        self, packs: list[Pack], upload: Callable[[int, torch.Tensor], torch.Tensor] | None = None
    ) -> list[torch.Tensor]:
        """Each arena's pack on its device (:meth:`Arena.stage`; ``upload`` as for :meth:`write`)."""
        return [
            arena.stage(pack, None if upload is None else functools.partial(upload, k))
            for k, (arena, pack) in enumerate(zip(self.arenas, packs))
        ]

    def activated(self, slot: int) -> None:
        """The host's record of the live region after :meth:`activate` of ``slot``, without the
        device work (which a replayed CUDA graph did: :mod:`lorahot.runtime.activate_replay`)."""
        if self.mirrors(slot, True):
            for arena in self.arenas:
                arena.copied(slot, self.live)

    def wrote(self, slot: int, packs: list[Pack], live: bool) -> None:
        """The host's record of the arenas after :meth:`write` of ``packs``, without the device
        work (which a replayed CUDA graph did: :mod:`lorahot.runtime.load_replay`)."""
        for arena, pack in zip(self.arenas, packs):
            arena.wrote(slot, pack)
            if self.mirrors(slot, live):
                arena.copied(slot, self.live)

    def write_staged(
        self,
        slot: int,
        staged: list[list[Entry]],
        scales: list[torch.Tensor],
        *,
        live: bool,
        extras: list[list[Extra]] | None = None,
        offsets: list[list[int]] | None = None,
    ) -> None:
        """Writes staged ``(layer, A, B)`` triples and extras rows, one list per arena, into
        ``slot``, with per-row ``scales`` (one float64 host tensor ``[n_layers, R]`` per arena)
        and, for a stack, each entry's row ``offsets``."""
        self.touched = True
        for k, (arena, entries, s) in enumerate(zip(self.arenas, staged, scales)):
            arena.write_staged(slot, entries, s, extras[k] if extras else [], offsets[k] if offsets else None)
            if self.mirrors(slot, live):
                arena.copy_region(slot, self.live)

    def set_scales(self, slot: int, scales: list[torch.Tensor], *, live: bool) -> None:
        """Overwrites the per-row scales of ``slot`` (one float64 host tensor ``[n_layers, R]``
        per arena): one upload per arena, and a device copy into the live region when the slot
        is live."""
        self.touched = True
        for arena, s in zip(self.arenas, scales):
            arena.set_scales(slot, s)
            if self.mirrors(slot, live):
                with torch.no_grad():
                    arena.S[self.live].copy_(arena.S[slot])  # on the device, behind the upload

    def activate(self, slot: int) -> None:
        """Makes the live region a copy of ``slot``."""
        if self.mirrors(slot, True):
            for arena in self.arenas:
                arena.copy_region(slot, self.live)

    def clear(self, slot: int, *, live: bool) -> None:
        """Zeroes ``slot``, and the live region if ``live``."""
        for arena in self.arenas:
            arena.clear(slot)
            if self.mirrors(slot, live):
                arena.clear(self.live)
