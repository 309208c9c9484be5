"""The Triton kernels behind :mod:`lorahot.kernels.routed_lora` (imported only where Triton and CUDA exist).

Both pairs compute ``out[m] = y[m] + (s_k * (x[m] @ A_k.T)) @ Bt_k`` with ``k = tokens[m]`` the
row's slot (``-1``: ``out[m] = y[m]``), through a float32 workspace ``H [M, R_PAD]`` holding the
scaled shrink of every row:

- gather (BGMV): :func:`_gather_shrink` runs one program per (row, 16 rank rows), summing
  ``A_k[r] * x[m]`` over K; :func:`_gather_expand` one per (row, output tile). Each row reads its
  own slot's weights: right for a handful of rows, wasteful when many rows share a slot.
- segmented (SGMV): the rows grouped by slot (``segs``: each slot's start and count and the
  routing's entries in slot order, :func:`~lorahot.kernels.routed_lora.segments`, computed once
  per routing by the runtime rather than in every layer: that sort cost 23 us per layer on an
  H200). :func:`_segment_shrink` runs one program per (tile of up to ``BLOCK_M`` rows of one
  slot, slot, share of K) and :func:`_segment_expand` one per (such a tile, output tile, slot),
  each a tensor-core dot of the tile's gathered rows with the slot's A or B: a slot's weights are
  read once per tile. With K split (up to 256 programs per slot, :func:`_splits`), the shrink's
  programs add their partial sums to a zeroed workspace, in no fixed order: the last bits of
  the float32 sum can differ between runs. The grids are sized for the worst case (every row in
  one slot); programs past their slot's rows return at once. The expand's programs of the
  no-slot segment copy ``y``.

The shrink is rounded to the weights' dtype before the expand in the segmented kernels (a dot
of two fp16/bf16 tiles, as the fused kernel does) and kept in float32 in the gather kernels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorahot.kernels.routed_lora import segments, token_route

__all__ = ["launch", "shrink", "rank_pad"]


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
def _segment_rows(SEG, slot, pid_m, SLOTS, T, BLOCK_M: tl.constexpr):
    """The rows of tile ``pid_m`` of ``slot``'s segment, from the routing's segments (see
    :func:`lorahot.kernels.routed_lora.segments`): entry ``e`` of the routing covers rows
    ``e * T .. e * T + T - 1``. Returns ``(rows int64, in range, the segment is past)``."""
    count = tl.load(SEG + SLOTS + 1 + slot) * T
    offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs < count
    j = tl.load(SEG + slot) * T + offs  # position among the rows sorted by slot
    entry = tl.load(SEG + 2 * (SLOTS + 1) + j // T, mask=m_ok, other=0)
    return (entry * T + j % T).to(tl.int64), m_ok, pid_m * BLOCK_M >= count


@triton.jit
def _segment_shrink(
    X, A, S, SEG, H,
    K, R, SLOTS, T,
    stride_xm, stride_as, stride_ar, stride_ss, stride_hm,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SPLITS: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    slot = tl.program_id(1)
    rows, m_ok, past = _segment_rows(SEG, slot, pid_m, SLOTS, T, BLOCK_M)
    if past:
        return
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    acc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    split = tl.program_id(2)  # this program's share of K: every SPLITS-th block of BLOCK_K
    for k in range(0, tl.cdiv(K, BLOCK_K * SPLITS)):
        kk = (k * SPLITS + split) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = kk < K
        x = tl.load(X + rows[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(
            A + slot * stride_as + rr[None, :] * stride_ar + kk[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0.0
        )
        acc = tl.dot(x, a, acc)
    s = tl.load(S + slot * stride_ss + rr, mask=r_ok, other=0.0).to(tl.float32)
    where = H + rows[:, None] * stride_hm + rr[None, :]
    if SPLITS > 1:  # K split over programs: each adds its partial sum to the zeroed workspace
        tl.atomic_add(where, acc * s[None, :], mask=m_ok[:, None])
    else:
        tl.store(where, acc * s[None, :], mask=m_ok[:, None])


@triton.jit
def _segment_expand(
    Y, H, BT, SEG, OUT,
    N, R, SLOTS, T,
    stride_ym, stride_hm, stride_bs, stride_br, stride_om,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    slot = tl.program_id(2)
    rows, m_ok, past = _segment_rows(SEG, slot, pid_m, SLOTS, T, BLOCK_M)
    if past:
        return
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    mask = m_ok[:, None] & n_ok[None, :]
    acc = tl.load(Y + rows[:, None] * stride_ym + rn[None, :], mask=mask, other=0.0).to(tl.float32)
    if slot < SLOTS:
        rr = tl.arange(0, R_PAD)
        r_ok = rr < R
        h = tl.load(H + rows[:, None] * stride_hm + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        bt = tl.load(
            BT + slot * stride_bs + rr[:, None] * stride_br + rn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0
        )
        acc = tl.dot(h.to(BT.dtype.element_ty), bt, acc)
    tl.store(OUT + rows[:, None] * stride_om + rn[None, :], acc.to(OUT.dtype.element_ty), mask=mask)


def launch(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    s: torch.Tensor,
    route: torch.Tensor,
    out: torch.Tensor,
    *,
    gather: bool,
    segs: torch.Tensor | None = None,
) -> None:
    """Runs the gather or the segmented kernels on 2-D ``x [M, K]``, ``y [M, N]`` (rows
    contiguous) into ``out [M, N]``; ``a [slots, R, K]`` and ``bt [slots, R, N]`` with contiguous
    rows, ``s [slots, R]``; ``route [L]`` int64 gives each of ``L`` equal consecutive groups of
    rows its slot. ``segs`` is ``route`` grouped by slot (:func:`~lorahot.kernels.routed_lora.segments`),
    computed once per routing by the runtime; without it the segmented path computes it here."""
    m, k = x.shape
    n = y.shape[1]
    slots, r = a.shape[0], a.shape[1]
    t = m // route.shape[0]  # rows per routing entry
    r_pad = rank_pad(r)
    if gather:
        tokens = token_route(route, m)
        h = torch.empty((m, r_pad), device=x.device, dtype=torch.float32)
        _gather_shrink[(m, triton.cdiv(r, 16))](
            x, a, s, tokens, h, k, r,
            x.stride(0), a.stride(0), a.stride(1), s.stride(0), h.stride(0),
            BLOCK_R=16, BLOCK_K=128, num_warps=4,
        )  # fmt: skip
        block_n = 128
        _gather_expand[(m, triton.cdiv(n, block_n))](
            y, h, bt, tokens, out, n, r,
            y.stride(0), h.stride(0), bt.stride(0), bt.stride(1), out.stride(0),
            R_PAD=r_pad, BLOCK_N=block_n, num_warps=4,
        )  # fmt: skip
        return
    if segs is None:
        segs = segments(route, slots)
    h = shrink(x, a, s, segs, t)
    block_m = _block_m(m)
    tiles = triton.cdiv(m, block_m)
    block_n = 64 if n <= 1024 else 128
    _segment_expand[(tiles, triton.cdiv(n, block_n), slots + 1)](
        y, h, bt, segs, out, n, r, slots, t,
        y.stride(0), h.stride(0), bt.stride(0), bt.stride(1), out.stride(0),
        R_PAD=r_pad, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
    )  # fmt: skip


def shrink(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, segs: torch.Tensor, t: int) -> torch.Tensor:
    """Each row's scaled shrink with its own slot's A, ``H[m] = s_k * (x[m] @ A_k.T)``, float32
    ``[M, R_PAD]`` (the segmented shrink; rows of no slot are left unset). ``segs`` is the
    routing grouped by slot, ``t`` the rows per routing entry."""
    m, k = x.shape
    slots, r = a.shape[0], a.shape[1]
    r_pad = rank_pad(r)
    block_m, block_k = _block_m(m), 64
    tiles = triton.cdiv(m, block_m)
    splits = _splits(k, tiles, block_k)
    h = (torch.zeros if splits > 1 else torch.empty)((m, r_pad), device=x.device, dtype=torch.float32)
    _segment_shrink[(tiles, slots, splits)](
        x, a, s, segs, h, k, r, slots, t,
        x.stride(0), a.stride(0), a.stride(1), s.stride(0), h.stride(0),
        R_PAD=r_pad, BLOCK_M=block_m, BLOCK_K=block_k, SPLITS=splits, num_warps=4,
    )  # fmt: skip
    return h


def rank_pad(r: int) -> int:
    """The rank as the kernels hold it: a power of two, at least 16 (a tensor-core dot's
    smallest side); the shrink workspace ``H`` has this many columns."""
    return max(16, int(triton.next_power_of_2(r)))


def _block_m(m: int) -> int:
    """Rows per tile of the segmented kernels: 16 up to 256 rows, 64 above."""
    return 16 if m <= 256 else 64


def _splits(k: int, tiles: int, block_k: int) -> int:
    """Programs per tile of the segmented shrink, a power of two: K is split until the grid's
    tiles (sized for every row in one slot) give about :data:`_SHRINK_PROGRAMS` programs, each
    with at least two ``block_k`` steps. At 64 decode rows, 4 tiles of 16 rows each looped over
    all of K alone, on 4 of an H200's 132 SMs. With the rows spread over several slots, each
    slot fills only some of its tiles and the rest return at once, so the budget is generous."""
    splits = 1
    while splits * 2 * tiles <= _SHRINK_PROGRAMS and splits * 2 * 2 * block_k <= k:
        splits *= 2
    return splits


#: programs of the segmented shrink's grid per slot (see :func:`_splits`)
_SHRINK_PROGRAMS = 256
