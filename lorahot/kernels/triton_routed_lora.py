"""The Triton kernels behind :mod:`lorahot.kernels.routed_lora` (imported only where Triton and CUDA exist).

Both pairs compute ``out[m] = y[m] + (s_k * (x[m] @ A_k.T)) @ Bt_k`` with ``k = tokens[m]`` the
row's slot (``-1``: ``out[m] = y[m]``), through a float32 workspace ``H`` holding the scaled
shrink of every row:

- gather (BGMV): :func:`_gather_shrink` runs one program per (row, 16 rank rows), summing
  ``A_k[r] * x[m]`` over K; :func:`_gather_expand` one per (row, output tile). Each row reads its
  own slot's weights: right for a handful of rows, wasteful when many rows share a slot.
- segmented (SGMV): the rows grouped by slot (``segs``: each slot's start and count and the
  routing's entries in slot order, :func:`~lorahot.kernels.routed_lora.segments`, computed once
  per routing by the runtime rather than in every layer: that sort cost 23 us per layer on an
  H200). Each segment is cut into tiles of up to ``BLOCK_M`` rows, numbered segment after
  segment (:func:`_segment_rows`), so the grids hold ``cdiv(M, BLOCK_M) + slots + 1`` tiles
  for any routing. :func:`_segment_shrink` runs one program per (tile, share of K) and
  :func:`_segment_expand` one per (tile, share of N's tiles), looping over its share: each a
  tensor-core dot of the tile's gathered rows with the slot's A or B, a slot's weights read
  once per tile. The expand's programs of the no-slot segment copy ``y``.

  An earlier grid held one program per (tile, output tile, slot), sized for every row in one
  slot: at 2048 rows on an H200 the expand then cost 15-50 us per layer where its bytes take 1-12,
  about 2 ns per program, most of which returned at once
  (``benchmarks/experiments/segment_probe.py``).

  K is split over the shrink's programs (:func:`_splits`). For the segmented expand each share
  writes its own partial, which the expand adds in a fixed order; for the fused routed kernel
  (:mod:`lorahot.kernels.triton_lora_linear`) the shares are added atomically into one zeroed
  workspace, in no fixed order: the last bits of that float32 sum can differ between runs.

The shrink is rounded to the weights' dtype before the expand in the segmented kernels for
bfloat16 (a dot of two bf16 tiles, as the fused kernel does) and kept in float32 for float16
(:func:`keeps_float32`: a float32 dot, B widened), and in the gather kernels for both.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorahot.kernels.direct_launch import Launcher, cdiv, next_power_of_2
from lorahot.kernels.routed_lora import rank_pad, segments, token_route

try:  # programmatic dependent launch (lorahot.kernels.pdl): sm90 intrinsics of newer Tritons
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - an older Triton: pdl.active() is then False
    gdc_launch_dependents = gdc_wait = None

__all__ = ["launch", "shrink", "rank_pad", "keeps_float32", "gdc_launch_dependents", "gdc_wait"]


@triton.jit
def _zero_kernel(H, NUMEL, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """``H[:NUMEL] = 0``. Launched early (``PDL``): it waits for the kernels before it (its
    memory may be what they read last), then lets the shrink launch."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(H + offs, tl.zeros((BLOCK,), dtype=H.dtype.element_ty), mask=offs < NUMEL)


@triton.jit
def _gather_shrink(
    X, A, S, TOK, H,
    K, R,
    stride_xm, stride_as, stride_ar, stride_ss, stride_hm,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0)
    rr = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    slot = tl.load(TOK + m)
    if slot < 0:
        return
    r_ok = rr < R
    acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        kk = k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        x = tl.load(X + m.to(tl.int64) * stride_xm + kk, mask=k_ok, other=0.0).to(tl.float32)
        a = tl.load(
            A + slot * stride_as + rr[:, None] * stride_ar + kk[None, :], mask=r_ok[:, None] & k_ok[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(a * x[None, :], axis=1)
    s = tl.load(S + slot * stride_ss + rr, mask=r_ok, other=0.0).to(tl.float32)
    tl.store(H + m.to(tl.int64) * stride_hm + rr, acc * s, mask=r_ok)


@triton.jit
def _gather_expand(
    Y, H, BT, TOK, OUT,
    N, R,
    stride_ym, stride_hm, stride_bs, stride_br, stride_om,
    R_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    m = tl.program_id(0)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    slot = tl.load(TOK + m)
    acc = tl.load(Y + m.to(tl.int64) * stride_ym + rn, mask=n_ok, other=0.0).to(tl.float32)
    if slot >= 0:
        rr = tl.arange(0, R_PAD)
        r_ok = rr < R
        h = tl.load(H + m.to(tl.int64) * stride_hm + rr, mask=r_ok, other=0.0)
        bt = tl.load(
            BT + slot * stride_bs + rr[:, None] * stride_br + rn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0
        ).to(tl.float32)
        acc += tl.sum(h[:, None] * bt, axis=0)
    tl.store(OUT + m.to(tl.int64) * stride_om + rn, acc.to(OUT.dtype.element_ty), mask=n_ok)


@triton.jit
def _segment_rows(SEG, pid, SLOTS, T, BLOCK_M: tl.constexpr, SLOTS_PAD: tl.constexpr):
    """Tile ``pid`` of the rows sorted by slot, from the routing's segments (see
    :func:`lorahot.kernels.routed_lora.segments`): each of the ``SLOTS + 1`` segments (the last
    one the rows of no slot) is cut into tiles of ``BLOCK_M`` rows, and the tiles are numbered
    segment after segment, so a grid of ``cdiv(M, BLOCK_M) + SLOTS + 1`` programs covers every
    routing. Entry ``e`` of the routing covers rows ``e * T .. e * T + T - 1``. Returns
    ``(slot, rows int64, in range, the program has no tile)``."""
    seg = tl.arange(0, SLOTS_PAD)
    on = seg <= SLOTS
    counts = tl.load(SEG + SLOTS + 1 + seg, mask=on, other=0) * T
    tiles = (counts + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, axis=0)
    slot = tl.sum((ends <= pid).to(tl.int32), axis=0)  # the segment this tile falls in
    here = seg == slot
    first = tl.sum(tl.where(here, ends - tiles, 0), axis=0)  # the segment's first tile
    count = tl.sum(tl.where(here, counts, 0), axis=0)
    offs = (pid - first) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs < count
    j = tl.load(SEG + slot, mask=slot <= SLOTS, other=0) * T + offs  # position among the rows sorted by slot
    entry = tl.load(SEG + 2 * (SLOTS + 1) + j // T, mask=m_ok, other=0)
    return slot, (entry * T + j % T).to(tl.int64), m_ok, slot > SLOTS


@triton.jit
def _segment_shrink(
    X, A, S, SEG, H,
    K, R, SLOTS, T,
    stride_xm, stride_as, stride_ar, stride_ss, stride_hm, stride_hp,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
    SLOTS_PAD: tl.constexpr, ATOMIC: tl.constexpr, PDL: tl.constexpr, WAIT_FIRST: tl.constexpr,
):  # fmt: skip
    # PDL (lorahot.kernels.pdl): launched early. After the zero fill (not WAIT_FIRST) it reads
    # x and A at once and waits only to add into H; first in its op (WAIT_FIRST) it waits at
    # once, x being the kernel before's. Either way the next kernel may launch now.
    if PDL:
        if WAIT_FIRST:
            gdc_wait()
        gdc_launch_dependents()
    slot, rows, m_ok, past = _segment_rows(SEG, tl.program_id(0), SLOTS, T, BLOCK_M, SLOTS_PAD)
    if past or slot == SLOTS:  # no tile, or the rows of no slot: nothing to shrink
        if PDL and not WAIT_FIRST:  # every program waits, so this kernel ends after the fill
            gdc_wait()
        return
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    a_base = A + slot.to(tl.int64) * stride_as  # an arena's slot regions lie past 2**31 elements apart
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    split = tl.program_id(1)  # this program's share of K: every SPLITS-th block of BLOCK_K
    for k in range(0, tl.cdiv(K, BLOCK_K * SPLITS)):
        kk = (k * SPLITS + split) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        x = tl.load(X + rows[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(a_base + rr[None, :] * stride_ar + kk[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x, a, acc)
    s = tl.load(S + slot.to(tl.int64) * stride_ss + rr, mask=r_ok, other=0.0).to(tl.float32)
    if PDL and not WAIT_FIRST:  # H's zero fill
        gdc_wait()
    where = H + split * stride_hp + rows[:, None] * stride_hm + rr[None, :]
    if ATOMIC:  # K split over programs that add their partial sums to one zeroed workspace
        tl.atomic_add(where, acc * s[None, :], mask=m_ok[:, None])
    else:  # one partial per split (stride_hp apart), summed in a fixed order by the reader
        tl.store(where, acc * s[None, :], mask=m_ok[:, None])


@triton.jit
def _tile_shrink(
    H, rows, m_ok, M, R, stride_hm, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, PARTIALS: tl.constexpr
):  # fmt: skip
    """The scaled shrink of a tile's ``rows``, ``[BLOCK_M, R_PAD]`` float32: the ``PARTIALS``
    shares of K the segmented shrink wrote (``H [PARTIALS, M, R_PAD]``), added in order."""
    rr = tl.arange(0, R_PAD)
    mask = m_ok[:, None] & (rr < R)[None, :]
    h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for p in tl.static_range(PARTIALS):
        h += tl.load(H + (p * M + rows[:, None]) * stride_hm + rr[None, :], mask=mask, other=0.0)
    return h


@triton.jit
def _segment_expand(
    Y, H, BT, SEG, OUT, BIAS,
    M, N, R, SLOTS, T,
    stride_ym, stride_hm, stride_bs, stride_br, stride_om,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLOTS_PAD: tl.constexpr,
    PARTIALS: tl.constexpr, HAS_Y: tl.constexpr, HAS_BIAS: tl.constexpr, PDL: tl.constexpr, H32: tl.constexpr,
):  # fmt: skip
    """One tile of rows, a share of N's tiles: ``out = y + h @ Bt_slot`` per output tile, or
    ``out = y`` for the rows of no slot. The slot test sits outside the loops, so the loop with
    the dot is a plain one the compiler pipelines (``cp.async`` for Bt, the dot on ``wgmma``;
    with the test inside, neither), and each output tile's ``y`` is loaded one iteration ahead,
    before the dot that waits on it: at 2048 rows over 8 adapters on an H200 the pair went from
    20.6 / 12.9 / 40.2 / 27.4 us (q-o / k-v / gate-up / down) to 18.4 / 12.5 / 31.4 / 24.6
    (``benchmarks/experiments/segment_sweep.py``, ``runs/20261130T211252-segment-sweep.json``).
    Loading each tile's ``Bt`` one iteration ahead too cost 0-7 us more per layer (register
    pressure; ``benchmarks/experiments/expand_probe.py``, ``runs/20261204T115909-expand-probe.log``).

    ``PDL`` (launched early, after the segmented shrink: :mod:`lorahot.kernels.pdl`): the
    tile's rows and its first ``y`` (the base GEMM's, which ended before the shrink began) are
    loaded while the shrink still runs; the program waits before it reads ``H`` and before any
    store.

    Without ``HAS_Y`` there is no base output to read: ``out = h @ Bt_slot`` (plus the bias
    with ``HAS_BIAS``), and the bias alone (or zeros) for the rows of no slot, for a GEMM to
    accumulate onto (see :func:`launch`).

    ``H32`` (float16 weights, :func:`keeps_float32`): the scaled shrink stays float32 and each
    ``Bt`` tile is widened for a float32 (TF32) dot, as in the fused kernel's expand."""
    if PDL:
        gdc_launch_dependents()
    slot, rows, m_ok, past = _segment_rows(SEG, tl.program_id(0), SLOTS, T, BLOCK_M, SLOTS_PAD)
    if past:
        if PDL:  # every program waits, so this kernel ends after the shrink
            gdc_wait()
        return
    n_tiles = tl.cdiv(N, BLOCK_N)
    step = tl.num_programs(1)
    if slot < SLOTS:
        rr = tl.arange(0, R_PAD)
        r_ok = rr < R
        bt_base = BT + slot.to(tl.int64) * stride_bs
        if HAS_Y:
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            y_next = tl.load(
                Y + rows[:, None] * stride_ym + rn[None, :], mask=m_ok[:, None] & (rn < N)[None, :], other=0.0
            )
        if PDL:  # H is the shrink's
            gdc_wait()
        hb = _tile_shrink(H, rows, m_ok, M, R, stride_hm, R_PAD, BLOCK_M, PARTIALS)
        if not H32:  # a dot of two 16-bit tiles (float16's range would turn a large hb into inf)
            hb = hb.to(BT.dtype.element_ty)
        for nt in range(tl.program_id(1), n_tiles, step):  # this program's share of N
            rn = nt * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rn < N
            bt = tl.load(bt_base + rr[:, None] * stride_br + rn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            if H32:
                bt = bt.to(tl.float32)
            if HAS_Y:
                y_cur = y_next
                ahead = rn + step * BLOCK_N  # the next tile's y, loaded before this tile's dot
                y_next = tl.load(
                    Y + rows[:, None] * stride_ym + ahead[None, :], mask=m_ok[:, None] & (ahead < N)[None, :], other=0.0
                )
                acc = tl.dot(hb, bt, y_cur.to(tl.float32))
            else:
                acc = tl.dot(hb, bt)
                if HAS_BIAS:
                    acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
            tl.store(
                OUT + rows[:, None] * stride_om + rn[None, :],
                acc.to(OUT.dtype.element_ty),
                mask=m_ok[:, None] & n_ok[None, :],
            )
    else:  # the rows of no slot: out = y (or the bias, or zeros)
        if PDL:
            gdc_wait()
        for nt in range(tl.program_id(1), n_tiles, step):
            rn = nt * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = m_ok[:, None] & (rn < N)[None, :]
            if HAS_Y:
                v = tl.load(Y + rows[:, None] * stride_ym + rn[None, :], mask=mask, other=0.0)
            elif HAS_BIAS:
                b = tl.load(BIAS + rn, mask=rn < N, other=0.0)
                v = tl.zeros((BLOCK_M, BLOCK_N), dtype=OUT.dtype.element_ty) + b[None, :].to(OUT.dtype.element_ty)
            else:
                v = tl.zeros((BLOCK_M, BLOCK_N), dtype=OUT.dtype.element_ty)
            tl.store(OUT + rows[:, None] * stride_om + rn[None, :], v, mask=mask)


def launch(
    x: torch.Tensor,
    y: torch.Tensor | None,
    a: torch.Tensor,
    bt: torch.Tensor,
    s: torch.Tensor,
    route: torch.Tensor,
    out: torch.Tensor,
    *,
    gather: bool,
    segs: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    early: bool = False,
) -> None:
    """Runs the gather or the segmented kernels on 2-D ``x [M, K]``, ``y [M, N]`` (rows
    contiguous) into ``out [M, N]``; ``a [slots, R, K]`` and ``bt [slots, R, N]`` with contiguous
    rows, ``s [slots, R]``; ``route [L]`` int64 gives each of ``L`` equal consecutive groups of
    rows its slot. ``segs`` is ``route`` grouped by slot (:func:`~lorahot.kernels.routed_lora.segments`),
    computed once per routing by the runtime; without it the segmented path computes it here.

    Segmented only: ``y`` None writes each row's update alone, plus ``bias [N]`` (contiguous)
    where given, and the bias (or zeros) for rows of no slot: a GEMM then adds the base
    product onto ``out`` (cuBLAS's ``beta = 1``) without a pass of its own over the output.

    ``early`` (segmented, with ``y``, K at most :data:`_EARLY_MAX_K`): the shrink and the expand
    launch with programmatic dependent launch (:mod:`lorahot.kernels.pdl`); the shrink waits for
    the kernels before it, then lets the expand start, which waits only to read the shrink's
    result."""
    if bias is not None and y is not None:
        raise ValueError("the bias goes with y=None (the updates alone); a base output y already holds it")
    m, k = x.shape
    n = out.shape[1]
    slots, r = a.shape[0], a.shape[1]
    t = m // route.shape[0]  # rows per routing entry
    r_pad = rank_pad(r)
    if gather:
        if y is None:
            raise ValueError("the gather kernels add into a base output: pass y, or use the segmented kernels")
        tokens = token_route(route, m)
        h = torch.empty((m, r_pad), device=x.device, dtype=torch.float32)
        _GATHER_SHRINK(
            (m, cdiv(r, 16), 1),
            (x, a, s, tokens, h),
            # K, R, strides, BLOCK_R, BLOCK_K
            (k, r, x.stride(0), a.stride(0), a.stride(1), s.stride(0), h.stride(0), 16, 128),
            num_warps=4, num_stages=3,
        )  # fmt: skip
        block_n = 128
        _GATHER_EXPAND(
            (m, cdiv(n, block_n), 1),
            (y, h, bt, tokens, out),
            # N, R, strides, R_PAD, BLOCK_N
            (n, r, y.stride(0), h.stride(0), bt.stride(0), bt.stride(1), out.stride(0), r_pad, block_n),
            num_warps=4, num_stages=3,
        )  # fmt: skip
        return
    if segs is None:
        segs = segments(route, slots)
    early = early and y is not None and k <= _EARLY_MAX_K
    h = shrink(x, a, s, segs, t, partials=True, early=early)
    block_m, block_n, warps, stages = _expand_config(m, n)
    groups = min(cdiv(n, block_n), max(1, cdiv(_EXPAND_PROGRAMS, cdiv(m, block_m))))
    _SEGMENT_EXPAND(
        (_tiles(m, block_m, slots), groups, 1),
        (out if y is None else y, h, bt, segs, out, out if bias is None else bias),
        (
            m, n, r, slots, t,
            out.stride(0) if y is None else y.stride(0), h.stride(1), bt.stride(0), bt.stride(1), out.stride(0),
            # R_PAD, BLOCK_M, BLOCK_N, SLOTS_PAD, PARTIALS, HAS_Y, HAS_BIAS, PDL, H32
            r_pad, block_m, block_n, _slots_pad(slots), h.shape[0], y is not None, bias is not None, early,
            keeps_float32(bt),
        ),
        num_warps=warps, num_stages=stages, launch_pdl=early,
    )  # fmt: skip


def shrink(
    x: torch.Tensor,
    a: torch.Tensor,
    s: torch.Tensor,
    segs: torch.Tensor,
    t: int,
    *,
    partials: bool = False,
    early: bool = False,
    workspace: torch.Tensor | None = None,
) -> torch.Tensor:
    """Each row's scaled shrink with its own slot's A, ``H[m] = s_k * (x[m] @ A_k.T)``, float32,
    by the segmented shrink (rows of no slot are left unset). ``segs`` is the routing grouped by
    slot, ``t`` the rows per routing entry.

    Returns ``[P, M, R_PAD]``: with ``partials``, K's ``P`` shares each in its own ``[M, R_PAD]``
    (the reader adds them, in a fixed order: no zero fill, no atomics, the same bits on every
    run); without, ``P = 1`` and the shares are added atomically into one zeroed workspace
    (the order of the float32 additions varies between runs).

    ``early``: its kernels launch with programmatic dependent launch (:mod:`lorahot.kernels.pdl`),
    and so may the kernel that follows them: it must wait before it reads the result.
    ``workspace``: float32, zero, at least ``M * R_PAD`` elements: the atomic shares go there
    (no zero fill); the caller zeroes it again after reading."""
    m, k = x.shape
    slots, r = a.shape[0], a.shape[1]
    r_pad = rank_pad(r)
    block_m, block_k, warps, stages = _shrink_config(m) if partials else (_block_m(m), 64, 4, 3)
    splits = _splits(k, cdiv(m, block_m), block_k, _PARTIAL_PROGRAMS if partials else _SHRINK_PROGRAMS)
    atomic = splits > 1 and not partials
    shape = (splits if partials else 1, m, r_pad)
    filled = atomic and workspace is None  # a fresh workspace, zeroed by a kernel of its own
    if atomic and workspace is not None:
        h = workspace[: m * r_pad].view(shape)
    else:
        h = torch.empty(shape, device=x.device, dtype=torch.float32)
    if filled:
        grid = (cdiv(h.numel(), _ZERO_BLOCK), 1, 1)
        # NUMEL, BLOCK, PDL
        _ZERO(grid, (h,), (h.numel(), _ZERO_BLOCK, early), num_warps=4, num_stages=3, launch_pdl=early)
    _SEGMENT_SHRINK(
        (_tiles(m, block_m, slots), splits, 1),
        (x, a, s, segs, h),
        (
            k, r, slots, t,
            x.stride(0), a.stride(0), a.stride(1), s.stride(0), h.stride(1), h.stride(0) if partials else 0,
            # R_PAD, BLOCK_M, BLOCK_K, SPLITS, SLOTS_PAD, ATOMIC, PDL, WAIT_FIRST
            r_pad, block_m, block_k, splits, _slots_pad(slots), atomic, early, not filled,
        ),
        num_warps=warps, num_stages=stages, launch_pdl=early,
    )  # fmt: skip
    return h


def keeps_float32(bt: torch.Tensor) -> bool:
    """Whether the expands over ``bt`` keep the scaled shrink in float32 (the kernels' ``H32``):
    for float16 weights, whose range (65504) a scaled shrink ``s * (x @ A.T)`` may pass where the
    output does not (``x @ A.T`` of 1e5 with a small B, or ``s = 32`` on 3e3), as PEFT keeps it
    with its float32 adapter weights. bfloat16 has float32's range: its kernels are unchanged."""
    return bt.dtype == torch.float16


#: the kernels' launches (:mod:`lorahot.kernels.direct_launch`)
_ZERO = Launcher(_zero_kernel)
_GATHER_SHRINK = Launcher(_gather_shrink)
_GATHER_EXPAND = Launcher(_gather_expand)
_SEGMENT_SHRINK = Launcher(_segment_shrink)
_SEGMENT_EXPAND = Launcher(_segment_expand)


def _block_m(m: int) -> int:
    """Rows per tile of the segmented kernels: 16 up to 256 rows, 64 above."""
    return 16 if m <= 256 else 64


#: (BLOCK_M, BLOCK_N, num_warps, num_stages) of the segmented expand, or (BLOCK_M, BLOCK_K,
#: num_warps, num_stages) of the segmented shrink writing partials
TileConfig = tuple[int, int, int, int]


def _expand_config(m: int, n: int) -> TileConfig:
    """The segmented expand's tiles for ``m`` rows and ``n`` outputs. Above 256 rows, 32 x 128:
    the best or within 0.4 us of it on every TinyLlama shape at 2048 rows over 8 adapters on an
    H200, the pair 21.3 / 13.6 / 41.5 / 30.9 us (q-o / k-v / gate-up / down) against 23.7 / 14.1 /
    44.5 / 33.2 with 64-row tiles (``benchmarks/experiments/segment_sweep.py``,
    ``runs/20261130T203400-segment-sweep.json``; 18 configurations)."""
    if m <= 256:
        return (16, 64 if n <= 1024 else 128, 4, 3)
    return (32, 128, 4, 3)


def _shrink_config(m: int) -> TileConfig:
    """The tiles of the segmented shrink that writes partials (the segmented pair's), for ``m``
    rows. Above 256 rows, 64 x 128 steps of K: 7.9 / 7.8 / 7.6 / 11.7 us against 8.3 / 8.4 / 8.3 /
    14.4 with 64-wide steps, same sweep (18 configurations)."""
    if m <= 256:
        return (16, 64, 4, 3)
    return (64, 128, 4, 3)


def _tiles(m: int, block_m: int, slots: int) -> int:
    """Programs along the rows: every segment's tiles, the slots' and the no-slot rows', for any
    routing (each segment adds at most one partial tile; see ``_segment_rows``)."""
    return cdiv(m, block_m) + slots + 1


def _slots_pad(slots: int) -> int:
    """The segments (``slots + 1``) as a power of two, for the kernels' vector of counts."""
    return next_power_of_2(slots + 1)


def _splits(k: int, tiles: int, block_k: int, programs: int) -> int:
    """Programs per tile of the segmented shrink, a power of two: K is split until the row
    tiles give about ``programs`` programs, each with at least two ``block_k`` steps. At 64
    decode rows, 4 tiles of 16 rows each looped over all of K alone, on 4 of an H200's 132 SMs."""
    splits = 1
    while splits * 2 * tiles <= programs and splits * 2 * 2 * block_k <= k:
        splits *= 2
    return splits


#: The widest input whose segmented pair launches early (:func:`launch`). An early expand's
#: programs sit on the SMs, waiting, while the shrink runs, so they help while the shrink is
#: short and cost it once it is long. At 2048 rows over 8 adapters on an H200 (``expand_probe``,
#: ``runs/20261204T120939-expand-probe.log``; us per layer over the GEMM) early launches took
#: q-o / k-v / gate-up (K = 2048) from 19.1 / 13.2 / 34.0 to 17.1 / 11.0 / 32.5, and down
#: (K = 5632, a shrink of about 12 us) from 27.4 to 30.0.
_EARLY_MAX_K = 4096

#: elements per program of the shrink workspace's zero fill
_ZERO_BLOCK = 1024

#: programs of the segmented shrink that the fused routed kernel reads (atomic shares; see :func:`_splits`)
_SHRINK_PROGRAMS = 256
#: programs of the segmented shrink whose partials the segmented expand adds (each partial is
#: one more ``[BLOCK_M, R_PAD]`` read per expand program, so fewer)
_PARTIAL_PROGRAMS = 128
#: programs of the segmented expand, about: each loops over its share of N's tiles, so a
#: tile's rows, its shrink and its segment are looked up once (one program per output tile
#: cost about 2 ns each on an H200, most of the pair's time at 2048 rows). One per SM of an
#: H200 was best with 64-row tiles (``runs/20261130T200400-segment-probe.json``); with the
#: 32-row tiles of :func:`_expand_config`, 264 (``runs/20261130T203400-segment-sweep.json``:
#: the pair 41.5 against 50.4 us with 132 for gate-up, 30.9 against 33.8 for down)
_EXPAND_PROGRAMS = 264
