"""The rank-padded buffer manager: every adapter buffer of every slot, allocated once.

Layers are grouped by (device, dtype); each group gets one :class:`Arena` holding three
tensors, region-major (a region is a slot, plus one live region when there are several slots):

- ``A [regions, a_total]``: layer ``l`` owns the contiguous block
  ``[a_off[l], a_off[l] + R * in_dim[l])``, viewed ``[R, in_dim]``; its live ``lora_A`` is that
  view in the live region.
- ``B [regions, b_total]``: B transposed, ``[R, out_dim]`` blocks laid out the same way.
- ``S [regions, n_layers]`` (float32, or float64 for float64 layers): each layer's scale.

Every layer's A and B are contiguous, so the forward's matrix products run on plain
row-major operands. A rank-``r`` adapter fills the first ``r`` rows of each block (for grouped
convs, the first ``r / g`` rows of each of the ``g`` group slices); the rest stays zero.
Loads zero the region (skipped when the adapter rewrites every row that can be nonzero) and
copy every layer in one batched call; a preloaded adapter travels
to the device as one compact buffer first. Shapes and addresses never change after
construction.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from lorahot.layers.base import LayerSpec
from lorahot.layers.tensor_handles import TensorHandle

__all__ = ["Arena", "Pack", "BufferManager"]

_ALIGN = 64  # elements; every block starts 128-byte aligned (bf16) for fast matmuls

Entry = tuple[int, torch.Tensor, torch.Tensor]  # (layer index, A [r, ...], B [out, r/g, ...])


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


@dataclass
class Pack:
    """One adapter's content for one arena, compact, in host memory, ready for one copy.

    Attributes:
        data: flat ``[n]``: per layer, its A rows (group by group) then its B^T rows.
        sizes: the length of each piece of ``data``, in the order of the layers'
            :meth:`Arena.flat_views`.
        ranks: ``(layer, rank)`` of every layer the adapter touches, in packing order.
        scales: ``[n_layers]`` float64 per-layer scale (before the user's multiplier), 0 where
            the adapter does not touch a layer.
        a_rows, b_rows: the most rows of A / B^T any layer uses.
    """

    data: torch.Tensor
    sizes: list[int]
    ranks: list[tuple[int, int]]
    scales: torch.Tensor
    a_rows: int
    b_rows: int
    #: per region, the destination views of :attr:`data`'s pieces (filled on first write)
    dsts: dict[int, list[torch.Tensor]] = field(default_factory=dict, repr=False, compare=False)

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.scales.nbytes


class Arena:
    """All LoRA storage for the layers of one device and dtype. See the module docstring."""

    def __init__(
        self, specs: list[LayerSpec], max_rank: int, regions: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.specs = specs
        self.rank = max_rank
        self.regions = regions
        self.device = device
        self.dtype = dtype
        self.a_off, a_total = self._offsets([max_rank * s.in_dim for s in specs])
        self.b_off, b_total = self._offsets([max_rank * s.out_dim for s in specs])
        with torch.inference_mode(False), torch.no_grad():
            self.A = torch.zeros(regions, a_total, device=device, dtype=dtype)
            self.B = torch.zeros(regions, b_total, device=device, dtype=dtype)
            self.S = torch.zeros(regions, len(specs), device=device, dtype=self.scale_dtype(dtype))
        self.handle = TensorHandle((self.A, self.B, self.S))  # how compiled graphs reach the buffers
        self.a_extent = [0] * regions  # most rows of A any layer uses; rows past it are zero
        self.b_extent = [0] * regions
        self._views: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self._flat: dict[tuple[int, int, int], list[torch.Tensor]] = {}

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
        scales = len(specs) * cls.scale_dtype(dtype).itemsize
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
        return self.A.nbytes + self.B.nbytes + self.S.nbytes

    def rows(self, layer: int, region: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Contiguous views ``[R, in_dim]`` and ``[R, out_dim]`` of one layer's A and B^T."""
        spec, R = self.specs[layer], self.rank
        a = self.A[region, self.a_off[layer] : self.a_off[layer] + R * spec.in_dim].view(R, spec.in_dim)
        b = self.B[region, self.b_off[layer] : self.b_off[layer] + R * spec.out_dim].view(R, spec.out_dim)
        return a, b

    def scale(self, layer: int, region: int) -> torch.Tensor:
        """0-d view of one layer's scale in ``region``."""
        return self.S[region, layer]

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

    def views(self, layer: int, region: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a rank-``rank`` adapter of ``layer`` goes in ``region`` (memoized).

        Returns ``[groups, r/groups, in_dim]`` (group ``j`` starting at row ``j * R/groups``,
        so every group's slice stays aligned when the rank is padded) and
        ``[r/groups, out_dim]``.
        """
        key = (layer, region, rank)
        found = self._views.get(key)
        if found is None:
            spec = self.specs[layer]
            per, cap = rank // spec.groups, self.rank // spec.groups
            a_rows, b_rows = self.rows(layer, region)
            a = a_rows.view(spec.groups, cap, spec.in_dim)[:, :per]
            found = self._views[key] = (a, b_rows[:per])
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

    def pack(self, entries: list[Entry], *, pin: bool) -> Pack:
        """Packs ``(layer, A, B)`` triples compactly into one host buffer (pinned if ``pin``),
        in the order and sizes of their :meth:`flat_views`."""
        sizes, ranks = [], {}
        for i, a, _ in entries:
            spec, r = self.specs[i], a.shape[0]
            ranks[i] = r
            sizes += [r // spec.groups * spec.in_dim] * spec.groups + [r // spec.groups * spec.out_dim]
        data = torch.empty(sum(sizes), dtype=self.dtype, pin_memory=pin)
        pieces = iter(data.split(sizes))
        for i, a, b in entries:
            src_a, src_b = self.sources(i, a, b)
            for group in src_a.unbind(0):
                next(pieces).view_as(group).copy_(group)
            next(pieces).view_as(src_b).copy_(src_b)
        a_rows, b_rows = self.extents(ranks)
        return Pack(data, sizes, list(ranks.items()), torch.zeros(len(self.specs), dtype=torch.float64), a_rows, b_rows)

    def write(self, region: int, pack: Pack, multiplier: float) -> None:
        """Copies ``pack`` into ``region`` in place: one transfer, one zero fill, one batched copy."""
        data = pack.data.to(self.device, non_blocking=pack.data.is_pinned())
        dsts = pack.dsts.get(region)
        if dsts is None:
            dsts = pack.dsts[region] = [piece for i, r in pack.ranks for piece in self.flat_views(i, region, r)]
        self._write(
            region, dsts, list(data.split(pack.sizes)), pack.scales * multiplier, pack.ranks, pack.a_rows, pack.b_rows
        )

    def write_staged(self, region: int, entries: list[Entry], scales: torch.Tensor, multiplier: float) -> None:
        """Writes ``(layer, A, B)`` triples (already on this device) straight into ``region``."""
        dsts: list[torch.Tensor] = []
        srcs: list[torch.Tensor] = []
        for i, a, b in entries:
            dsts += self.views(i, region, a.shape[0])
            srcs += self.sources(i, a, b)
        ranks = [(i, a.shape[0]) for i, a, _ in entries]
        a_rows, b_rows = self.extents(dict(ranks))
        self._write(region, dsts, srcs, scales * multiplier, ranks, a_rows, b_rows)

    def _covers(self, region: int, ranks: list[tuple[int, int]]) -> bool:
        """Whether writing ``(layer, rank)`` pairs overwrites every row ``region`` may hold
        nonzero: every layer written (each once), none grouped, each at a rank at least the
        region's current extent. Then the zero fill can be skipped."""
        held = max(self.a_extent[region], self.b_extent[region])
        return len(ranks) == len(self.specs) and all(self.specs[i].groups == 1 and r >= held for i, r in ranks)

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
            if not self._covers(region, ranks):
                self.A[region].zero_()
                self.B[region].zero_()
            if dsts:
                torch._foreach_copy_(dsts, srcs)
            self.S[region].copy_(scales)
        self.a_extent[region], self.b_extent[region] = a_rows, b_rows

    def set_scales(self, region: int, scales: torch.Tensor) -> None:
        """Overwrites the per-layer scales of ``region`` (float64 host tensor ``[n_layers]``)."""
        with torch.no_grad():
            self.S[region].copy_(scales)

    def copy_region(self, src: int, dst: int) -> None:
        """Makes ``dst`` an exact copy of ``src``: one device copy per buffer."""
        with torch.no_grad():
            for t in (self.A, self.B, self.S):
                t[dst].copy_(t[src])
        self.a_extent[dst], self.b_extent[dst] = self.a_extent[src], self.b_extent[src]

    def clear(self, region: int) -> None:
        """Zeroes ``region``."""
        with torch.no_grad():
            for t in (self.A, self.B, self.S):
                t[region].zero_()
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
        for (device, dtype), names in self.groups(specs).items():
            self.where.update({n: (len(self.arenas), i) for i, n in enumerate(names)})
            self.arenas.append(Arena([specs[n][0] for n in names], max_rank, self.regions, device, dtype))

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

    def live_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, TensorHandle]:
        """The live ``A`` rows, ``B^T`` rows and scale views of layer ``name``, and the handle
        of its arena."""
        arena, idx = self.where[name]
        a, b = self.arenas[arena].rows(idx, self.live)
        return a, b, self.arenas[arena].scale(idx, self.live), self.arenas[arena].handle

    def _mirrored(self, slot: int, live: bool) -> bool:
        """Whether a change to ``slot`` must also reach the live region: the slot is active,
        and the live region is a separate copy (several slots)."""
        return live and slot != self.live

    def write(self, slot: int, packs: list[Pack], multiplier: float, *, live: bool) -> None:
        """Copies one pack per arena into ``slot``, and into the live region if ``live``."""
        for arena, pack in zip(self.arenas, packs):
            arena.write(slot, pack, multiplier)
            if self._mirrored(slot, live):
                arena.copy_region(slot, self.live)

    def write_staged(
        self, slot: int, staged: list[list[Entry]], scales: list[torch.Tensor], multiplier: float, *, live: bool
    ) -> None:
        """Writes staged ``(layer, A, B)`` triples, one list per arena, into ``slot``."""
        for arena, entries, s in zip(self.arenas, staged, scales):
            arena.write_staged(slot, entries, s, multiplier)
            if self._mirrored(slot, live):
                arena.copy_region(slot, self.live)

    def set_scales(self, slot: int, scales: list[torch.Tensor], *, live: bool) -> None:
        """Overwrites the per-layer scales of ``slot`` (one float64 host tensor per arena)."""
        for arena, s in zip(self.arenas, scales):
            arena.set_scales(slot, s)
            if self._mirrored(slot, live):
                arena.set_scales(self.live, s)

    def activate(self, slot: int) -> None:
        """Makes the live region a copy of ``slot``."""
        if self._mirrored(slot, True):
            for arena in self.arenas:
                arena.copy_region(slot, self.live)

    def clear(self, slot: int, *, live: bool) -> None:
        """Zeroes ``slot``, and the live region if ``live``."""
        for arena in self.arenas:
            arena.clear(slot)
            if self._mirrored(slot, live):
                arena.clear(self.live)
