"""The rank-padded buffer manager: every adapter buffer of every slot, allocated once.

Layers are grouped by (device, dtype); each group gets one :class:`Arena` holding three
tensors, region-major (a region is a slot, plus one live region when there are several slots):

- ``A [regions, R, a_width]``: row ``k`` of every layer's A, side by side. Layer ``l`` owns
  columns ``[a_off[l], a_off[l] + in_dim[l])``; its live ``lora_A`` is the view
  ``A[live, :, a_off:a_off + in_dim]``.
- ``B [regions, R, b_width]``: B transposed, laid out the same way.
- ``S [regions, n_layers]`` (float32, or float64 for float64 layers): each layer's scale.

Because a rank-``r`` adapter uses only rows ``< r`` of A and B, the whole adapter occupies a
contiguous prefix of each region: a swap is a handful of large copies, and zeroing what the
previous adapter left is one contiguous fill. Rows at or past a region's recorded extent are
always zero. Shapes and addresses never change after construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorahot.layers.base import LayerSpec

__all__ = ["Arena", "Pack", "BufferManager"]

_ALIGN = 16  # elements; keeps every layer's columns 16-element aligned for fast matmuls


def _round_up(n: int, k: int) -> int:
    return (n + k - 1) // k * k


@dataclass
class Pack:
    """One adapter's content for one arena, in the arena's row layout, ready to copy.

    Attributes:
        a: ``[a_rows, a_width]`` rows of A (``a_rows <= R``).
        b: ``[b_rows, b_width]`` rows of B transposed.
        scales: ``[n_layers]`` float64 per-layer scale (before the user's multiplier), 0 where
            the adapter does not touch a layer.
    """

    a: torch.Tensor
    b: torch.Tensor
    scales: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.a.nbytes + self.b.nbytes + self.scales.nbytes


class Arena:
    """All LoRA storage for the layers of one device and dtype. See the module docstring."""

    def __init__(self, specs: list[LayerSpec], max_rank: int, regions: int, device: torch.device, dtype: torch.dtype) -> None:
        self.specs = specs
        self.rank = max_rank
        self.regions = regions
        self.device = device
        self.dtype = dtype
        self.a_off = self._offsets([s.in_dim for s in specs])
        self.b_off = self._offsets([s.out_dim for s in specs])
        a_width = _round_up(self.a_off[-1] + specs[-1].in_dim, _ALIGN)
        b_width = _round_up(self.b_off[-1] + specs[-1].out_dim, _ALIGN)
        with torch.inference_mode(False), torch.no_grad():
            self.A = torch.zeros(regions, max_rank, a_width, device=device, dtype=dtype)
            self.B = torch.zeros(regions, max_rank, b_width, device=device, dtype=dtype)
            # float32 scales (float64 for float64 layers): finer than the weights they scale
            self.S = torch.zeros(regions, len(specs), device=device, dtype=torch.promote_types(dtype, torch.float32))
        self.a_extent = [0] * regions  # rows of A in use; rows past it are zero
        self.b_extent = [0] * regions
        self._region_views: dict[tuple[int, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    @staticmethod
    def _offsets(widths: list[int]) -> list[int]:
        offsets, pos = [], 0
        for w in widths:
            offsets.append(pos)
            pos = _round_up(pos + w, _ALIGN)
        return offsets

    @property
    def nbytes(self) -> int:
        """Bytes this arena allocated (every region)."""
        return self.A.nbytes + self.B.nbytes + self.S.nbytes

    def rows(self, layer: int, region: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views ``[R, in_dim]`` and ``[R, out_dim]`` of one layer's A and B^T in ``region``."""
        spec = self.specs[layer]
        a = self.A[region, :, self.a_off[layer] : self.a_off[layer] + spec.in_dim]
        b = self.B[region, :, self.b_off[layer] : self.b_off[layer] + spec.out_dim]
        return a, b

    def scale(self, layer: int, region: int) -> torch.Tensor:
        """0-d view of one layer's scale in ``region``."""
        return self.S[region, layer]

    def empty_pack(self, a_rows: int, b_rows: int, *, pin: bool = False) -> Pack:
        """A zeroed host pack with room for ``a_rows`` / ``b_rows`` rows."""
        a = torch.zeros(a_rows, self.A.shape[2], dtype=self.dtype, pin_memory=pin)
        b = torch.zeros(b_rows, self.B.shape[2], dtype=self.dtype, pin_memory=pin)
        return Pack(a, b, torch.zeros(len(self.specs), dtype=torch.float64))

    @staticmethod
    def a_rows_for(spec: LayerSpec, rank: int, max_rank: int) -> int:
        """Rows of A a rank-``rank`` adapter occupies in a layer of ``spec``."""
        g = spec.groups
        return rank if g == 1 or rank == 0 else (g - 1) * (max_rank // g) + rank // g

    def extents(self, ranks: dict[int, int]) -> tuple[int, int]:
        """Rows of A and of B^T that layers ``{index: rank}`` occupy together."""
        a = max((self.a_rows_for(self.specs[i], r, self.rank) for i, r in ranks.items()), default=0)
        b = max((r // self.specs[i].groups for i, r in ranks.items()), default=0)
        return a, b

    def views(self, rows_a: torch.Tensor, rows_b: torch.Tensor, layer: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Where a rank-``rank`` adapter of ``layer`` goes inside row buffers of this layout.

        ``rows_a`` / ``rows_b`` are a region (``A[region]``, ``B[region]``) or a pack. Returns
        ``[groups, r/groups, in_dim]`` (group ``j`` starting at row ``j * R/groups``, so every
        group's slice stays aligned when the rank is padded) and ``[r/groups, out_dim]``.
        """
        spec = self.specs[layer]
        per, cap, width = rank // spec.groups, self.rank // spec.groups, rows_a.stride(0)
        a = rows_a.as_strided((spec.groups, per, spec.in_dim), (cap * width, width, 1), rows_a.storage_offset() + self.a_off[layer])
        b = rows_b[:per, self.b_off[layer] : self.b_off[layer] + spec.out_dim]
        return a, b

    def _region_view(self, region: int, layer: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`views` of ``region``, memoized (the buffers never move)."""
        key = (region, layer, rank)
        found = self._region_views.get(key)
        if found is None:
            found = self._region_views[key] = self.views(self.A[region], self.B[region], layer, rank)
        return found

    def sources(self, layer: int, A: torch.Tensor, B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """File-layout ``A [r, *a_row]``, ``B [out, r/g, *1]`` as the shapes :meth:`views` takes."""
        spec = self.specs[layer]
        per = A.shape[0] // spec.groups
        return A.reshape(spec.groups, per, spec.in_dim), B.reshape(spec.out_dim, per).t()

    def pack(self, entries: list[tuple[int, torch.Tensor, torch.Tensor]], *, pin: bool) -> Pack:
        """Packs ``(layer, A, B)`` triples into host rows, ready for one copy per buffer."""
        a_rows, b_rows = self.extents({i: a.shape[0] for i, a, _ in entries})
        pack = self.empty_pack(a_rows, b_rows, pin=pin)
        for i, a, b in entries:
            dst_a, dst_b = self.views(pack.a, pack.b, i, a.shape[0])
            src_a, src_b = self.sources(i, a, b)
            dst_a.copy_(src_a)
            dst_b.copy_(src_b)
        return pack

    def write(self, region: int, pack: Pack, multiplier: float) -> None:
        """Copies ``pack`` into ``region`` in place and zeroes what the old content left."""
        with torch.no_grad():
            self._write_rows(self.A[region], pack.a, self.a_extent[region])
            self._write_rows(self.B[region], pack.b, self.b_extent[region])
            self.S[region].copy_(pack.scales * multiplier)
        self.a_extent[region] = pack.a.shape[0]
        self.b_extent[region] = pack.b.shape[0]

    def write_staged(self, region: int, entries: list[tuple[int, torch.Tensor, torch.Tensor]], scales: torch.Tensor, multiplier: float) -> None:
        """Writes ``(layer, A, B)`` triples (already on this device) straight into ``region``.

        Zeroes the rows either the old or the new content uses, then copies every layer in
        one batched call; the caller has validated everything before.
        """
        a_rows, b_rows = self.extents({i: a.shape[0] for i, a, _ in entries})
        dsts, srcs = [], []
        for i, a, b in entries:
            dst_a, dst_b = self._region_view(region, i, a.shape[0])
            src_a, src_b = self.sources(i, a, b)
            dsts += [dst_a, dst_b]
            srcs += [src_a, src_b]
        with torch.no_grad():
            for t, n in ((self.A, max(a_rows, self.a_extent[region])), (self.B, max(b_rows, self.b_extent[region]))):
                if n:
                    t[region, :n].zero_()
            if dsts:
                torch._foreach_copy_(dsts, srcs)
            self.S[region].copy_(scales * multiplier)
        self.a_extent[region], self.b_extent[region] = a_rows, b_rows

    @staticmethod
    def _write_rows(dst: torch.Tensor, rows: torch.Tensor, old_extent: int) -> None:
        n = rows.shape[0]
        if n:
            dst[:n].copy_(rows, non_blocking=rows.is_pinned())
        if old_extent > n:
            dst[n:old_extent].zero_()

    def set_scales(self, region: int, scales: torch.Tensor) -> None:
        """Overwrites the per-layer scales of ``region`` (float64 host tensor ``[n_layers]``)."""
        with torch.no_grad():
            self.S[region].copy_(scales)

    def copy_region(self, src: int, dst: int) -> None:
        """Makes ``dst`` an exact copy of ``src`` (only the rows either one uses move)."""
        with torch.no_grad():
            for t, ext in ((self.A, self.a_extent), (self.B, self.b_extent)):
                n = max(ext[src], ext[dst])
                if n:
                    t[dst, :n].copy_(t[src, :n])
                ext[dst] = ext[src]
            self.S[dst].copy_(self.S[src])

    def clear(self, region: int) -> None:
        """Zeroes ``region``."""
        with torch.no_grad():
            for t, ext in ((self.A, self.a_extent), (self.B, self.b_extent)):
                if ext[region]:
                    t[region, : ext[region]].zero_()
                ext[region] = 0
            self.S[region].zero_()


class BufferManager:
    """Owns the arenas of one runtime and knows where each layer lives in them.

    Region ``i`` is slot ``i``. With one slot, that region is also what the layers read; with
    several, one extra *live* region is what they read, and activating a slot copies it there.
    """

    def __init__(self, specs: dict[str, tuple[LayerSpec, torch.device, torch.dtype]], max_rank: int, slots: int) -> None:
        self.max_rank = max_rank
        self.slots = slots
        self.regions = slots + 1 if slots > 1 else 1
        self.live = self.regions - 1
        groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
        for name, (_, device, dtype) in specs.items():
            groups.setdefault((device, dtype), []).append(name)
        self.arenas: list[Arena] = []
        self.where: dict[str, tuple[int, int]] = {}
        for (device, dtype), names in groups.items():
            self.where.update({n: (len(self.arenas), i) for i, n in enumerate(names)})
            self.arenas.append(Arena([specs[n][0] for n in names], max_rank, self.regions, device, dtype))

    @property
    def nbytes(self) -> int:
        """Bytes of adapter storage allocated, all arenas and regions together."""
        return sum(a.nbytes for a in self.arenas)

    def live_rows(self, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The live ``A`` rows, ``B^T`` rows and scale views of layer ``name``."""
        arena, idx = self.where[name]
        a, b = self.arenas[arena].rows(idx, self.live)
        return a, b, self.arenas[arena].scale(idx, self.live)

    def write(self, slot: int, packs: list[Pack], multiplier: float, *, live: bool) -> None:
        """Copies one pack per arena into ``slot``, and into the live region if ``live``."""
        for arena, pack in zip(self.arenas, packs):
            arena.write(slot, pack, multiplier)
            if live and slot != self.live:
                arena.copy_region(slot, self.live)

    def write_staged(self, slot: int, staged: list[list[tuple[int, torch.Tensor, torch.Tensor]]], scales: list[torch.Tensor], multiplier: float, *, live: bool) -> None:
        """Writes staged ``(layer, A, B)`` triples, one list per arena, into ``slot``."""
        for arena, entries, s in zip(self.arenas, staged, scales):
            arena.write_staged(slot, entries, s, multiplier)
            if live and slot != self.live:
                arena.copy_region(slot, self.live)

    def set_scales(self, slot: int, scales: list[torch.Tensor], *, live: bool) -> None:
        for arena, s in zip(self.arenas, scales):
            arena.set_scales(slot, s)
            if live and slot != self.live:
                arena.set_scales(self.live, s)

    def activate(self, slot: int) -> None:
        if slot != self.live:
            for arena in self.arenas:
                arena.copy_region(slot, self.live)

    def clear(self, slot: int, *, live: bool) -> None:
        for arena in self.arenas:
            arena.clear(slot)
            if live and slot != self.live:
                arena.clear(self.live)
