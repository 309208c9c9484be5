"""The routed fused linear with its shrink in leading programs of the same launch (Triton; CUDA only).

``y[m] = x[m] @ W.T + bias + (s_k * (x[m] @ A_k.T)) @ Bt_k`` with ``k`` the row's slot (``-1``:
the base product alone), as :func:`lorahot.kernels.triton_lora_linear.launch` computes it with
``routing``, in one launch plus the split-K sum, where that path takes the segmented shrink's
launch too.

Why: a synced decode step is the host's launch of the replayed CUDA graph plus the GPU's time,
and the host's part grows about 1.8 us per kernel (``benchmarks/README.md``, thirteenth session):
the routed decode's three kernels per layer against the base model's one cost 0.5 ms of host
time over 154 layers. This layer runs two, as the single-adapter path does.

How: a 1-D grid whose first programs are the segmented shrink's (:func:`_segment_rows`: a tile
of rows of one slot, a chunk of K), the rest the fused kernel's (a tile of rows, a tile of
outputs, a chunk of K). Each shrink program writes its tile's scaled partial shrink over its
chunk with plain stores into the workspace and counts itself done for that chunk (a release);
each fused program runs its base product over its chunk, then waits until every shrink program
of its chunk has counted (an acquire), and expands that chunk's partial shrink for each slot its
rows use into its partial output (the shrink is linear in K, as in the single-adapter kernel's
split K). The split-K sum adds the chunks and zeroes the counters again.

No program waits on one launched after it: the shrink programs come first in the grid, never
wait, and a GPU starts a grid's programs in order, so a waiting program's producers have all
started (the order CUB's decoupled look-back also relies on). No atomics touch the sums: the
same bits on every run.

**Off by default, not yet measured** (:data:`lorahot.kernels.routed_linear.LEADING`); checked in
Triton's interpreter and compiled for sm90.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorahot.kernels.routed_linear import LEADING_SPLITS, WORKSPACE_ROWS
from lorahot.kernels.triton_lora_linear import Config, slot_expands, split_k, sum_splits
from lorahot.kernels.triton_routed_lora import _block_m, _segment_rows, _slots_pad, _tiles, rank_pad

__all__ = ["launch", "fits"]


@triton.jit
def _routed_leading_kernel(
    X, W, BIAS, A, BT, S, WS, SEG, ROUTE, H, COUNT,
    M, N, K, R, K_CHUNK, SLOTS, T, TILES, PRODUCERS, GRID_M, GRID_N,
    stride_xm, stride_wn, stride_as, stride_am, stride_bs, stride_bm, stride_ss, stride_hs,
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, SHRINK_M: tl.constexpr, SLOTS_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    if pid < PRODUCERS:
        _shrink_program(
            X, A, S, SEG, H, COUNT, pid % TILES, pid // TILES,
            K, R, K_CHUNK, SLOTS, T, stride_xm, stride_as, stride_am, stride_ss, stride_hs,
            R_PAD, SHRINK_M, SLOTS_PAD, BLOCK_K,
        )  # fmt: skip
    else:
        q = pid - PRODUCERS
        _fused_program(
            X, W, BIAS, BT, WS, ROUTE, H, COUNT, q % GRID_M, (q // GRID_M) % GRID_N, q // (GRID_M * GRID_N),
            M, N, K, R, K_CHUNK, SLOTS, T, TILES, stride_xm, stride_wn, stride_bs, stride_bm, stride_hs,
            HAS_BIAS, R_PAD, BLOCK_M, BLOCK_N, BLOCK_K,
        )  # fmt: skip


@triton.jit
def _shrink_program(
    X, A, S, SEG, H, COUNT, tile, chunk,
    K, R, K_CHUNK, SLOTS, T, stride_xm, stride_as, stride_am, stride_ss, stride_hs,
    R_PAD: tl.constexpr, SHRINK_M: tl.constexpr, SLOTS_PAD: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """A tile of one slot's rows (``_segment_rows``), a chunk of K: its scaled partial shrink
    stored into the chunk's block of ``H``, then counted in ``COUNT[chunk]`` (a release)."""
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    slot, rows, m_ok, past = _segment_rows(SEG, tile, SLOTS, T, SHRINK_M, SLOTS_PAD)
    if not past and slot < SLOTS:  # rows of a slot (not padding, not the rows of no slot)
        k0 = chunk * K_CHUNK
        k_end = tl.minimum(K, k0 + K_CHUNK)
        part = tl.zeros((SHRINK_M, R_PAD), dtype=tl.float32)
        for k in range(0, tl.cdiv(k_end - k0, BLOCK_K)):
            kk = k0 + k * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = kk < k_end
            x = tl.load(X + rows[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            a_ptr = A + slot * stride_as + rr[None, :] * stride_am + kk[:, None]
            a = tl.load(a_ptr, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            part = tl.dot(x, a, part)
        s = tl.load(S + slot * stride_ss + rr, mask=r_ok, other=0.0).to(tl.float32)
        tl.store(H + chunk * stride_hs + rows[:, None] * R_PAD + rr[None, :], part * s[None, :], mask=m_ok[:, None])
    tl.debug_barrier()  # every thread's stores before the count
    tl.atomic_add(COUNT + chunk, 1.0, sem="release")


@triton.jit
def _fused_program(
    X, W, BIAS, BT, WS, ROUTE, H, COUNT, pid_m, pid_n, pid_s,
    M, N, K, R, K_CHUNK, SLOTS, T, TILES, stride_xm, stride_wn, stride_bs, stride_bm, stride_hs,
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """A tile of rows and outputs, a chunk of K: the base product over the chunk, then, once
    every shrink program of the chunk has counted (an acquire), each slot's expand of the
    chunk's partial shrink for the rows on it; the float32 partial output into ``WS``."""
    rr = tl.arange(0, R_PAD)
    r_ok = rr < R
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    k0 = pid_s * K_CHUNK
    k_end = tl.minimum(K, k0 + K_CHUNK)
    rk = k0 + tl.arange(0, BLOCK_K)
    x_ptr = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    w_ptr = W + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(k_end - k0, BLOCK_K)):
        k_ok = rk < k_end - k * BLOCK_K
        x = tl.load(x_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc)
        x_ptr += BLOCK_K
        w_ptr += BLOCK_K
    done = tl.atomic_add(COUNT + pid_s, 0.0, sem="acquire")
    while done < TILES:  # this chunk's shrink programs, all started before this one
        done = tl.atomic_add(COUNT + pid_s, 0.0, sem="acquire")
    tl.debug_barrier()
    slot_of = tl.load(ROUTE + rm // T, mask=m_ok, other=-1)
    h_ptr = H + pid_s * stride_hs + rm[:, None].to(tl.int64) * R_PAD + rr[None, :]
    h = tl.load(h_ptr, mask=m_ok[:, None] & r_ok[None, :], other=0.0, cache_modifier=".cg")
    # each slot this tile's rows use: its expand of the chunk's partial shrink
    acc = slot_expands(acc, h, slot_of, BT, rr, rn, r_ok, n_ok, SLOTS, 0, 1, stride_bs, stride_bm)
    if HAS_BIAS:  # noqa: SIM102 - a compile-time branch around a run-time one
        if pid_s == 0:
            acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    ws_ptr = WS + (pid_s * M + rm[:, None]).to(tl.int64) * N + rn[None, :]
    tl.store(ws_ptr, acc, mask=m_ok[:, None] & n_ok[None, :])


def fits(workspace: torch.Tensor | None, m: int, r: int) -> bool:
    """Whether ``workspace`` (:func:`lorahot.kernels.routed_linear.workspace`) holds this mode's
    partial shrinks for ``m`` rows at rank ``r`` and its counters."""
    if workspace is None or workspace.dim() != 2 or workspace.shape[1] != rank_pad(r):
        return False
    return workspace.shape[0] == WORKSPACE_ROWS * (1 + LEADING_SPLITS) + 1 and m <= WORKSPACE_ROWS


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    bt: torch.Tensor,
    s: torch.Tensor,
    route: torch.Tensor,
    segs: torch.Tensor,
    out: torch.Tensor,
    workspace: torch.Tensor,
    config: Config,
) -> bool:
    """The kernel on 2-D ``x [M, K]`` (rows contiguous) into ``out [M, N]``, then the split-K
    sum, which zeroes the counters. ``a [slots, R, K]``, ``bt [slots, R, N]``, ``s [slots, R]``;
    ``route [L]`` int64 (each of ``L`` equal groups of rows, ``-1`` for none) and ``segs`` its
    grouping by slot; ``workspace`` zeroed, :func:`fits`, not used by another call at the same
    time. Returns False, running nothing, where ``config`` does not split K (no sum kernel to
    zero the counters): the caller then takes the two-kernel path."""
    m, k = x.shape
    n = weight.shape[0]
    slots, r = a.shape[0], a.shape[1]
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    bm, bn, bk, warps, stages, split = config
    chunk, split, ws = split_k(k, bk, split, out)
    if split == 1 or split > LEADING_SPLITS:
        return False
    r_pad = rank_pad(r)
    block = WORKSPACE_ROWS * r_pad  # elements per chunk's partial shrinks
    h = workspace[WORKSPACE_ROWS : WORKSPACE_ROWS * (1 + LEADING_SPLITS)].reshape(-1)  # no zero needed
    count = workspace[-1, :split]  # zero between calls
    shrink_m = _block_m(m)
    tiles = _tiles(m, shrink_m, slots)
    grid_m, grid_n = triton.cdiv(m, bm), triton.cdiv(n, bn)
    try:
        _routed_leading_kernel[(tiles * split + grid_m * grid_n * split,)](
            x, weight, bias if bias is not None else weight, a, bt, s, ws, segs, route, h, count,
            m, n, k, r, chunk, slots, m // route.shape[0], tiles, tiles * split, grid_m, grid_n,
            x.stride(0), weight.stride(0), a.stride(0), a.stride(1), bt.stride(0), bt.stride(1), s.stride(0), block,
            HAS_BIAS=bias is not None, R_PAD=r_pad, SHRINK_M=shrink_m, SLOTS_PAD=_slots_pad(slots),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
        )  # fmt: skip
        sum_splits(ws, out, zero=count)
    except BaseException:  # the counters must be zero for the next call
        count.zero_()
        raise
    return True
