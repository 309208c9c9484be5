"""The routed fused linear in one kernel, each program computing its rows' shrinks (Triton; CUDA only).

``y[m] = x[m] @ W.T + bias + (s_k * (x[m] @ A_k.T)) @ Bt_k`` with ``k`` the row's slot (``-1``:
the base product alone), as :func:`lorahot.kernels.triton_lora_linear.launch` computes it with
``routing``, but without the segmented shrink before it: that step costs two launches (a zero
fill and the shrink), 5.3-6.2 us per layer at 64 decode rows on an H200, about 0.85 ms of the
1.24 ms between the routed and the single-adapter decode (``benchmarks/README.md``, tenth
session).

Each program (a tile of rows, a tile of outputs, a chunk of K) runs the base product over its
chunk; then, for each slot its rows use, that slot's shrink over the same chunk with the other
rows' ``x`` masked to zero, and that slot's expand of the partial shrink into the partial
output (the shrink is linear in K, as in the single-adapter kernel's split K). The chunks'
partial outputs are added by :func:`lorahot.kernels.triton_lora_linear.sum_splits`: one
launch, or two with split K, as for one adapter.

What it costs: every program reads the A chunk of every slot its rows use, so the slots' A are
read once per output tile. With the single-adapter kernel's 32-64-wide tiles that lost 2-4x with
8 adapters over 64 rows (``benchmarks/experiments/routed_inline_probe.py``, ninth session);
:func:`config` gives 256-wide tiles, so each program's shrinks serve 256 outputs.

**Off by default, not yet measured** (:data:`lorahot.kernels.routed_linear.INLINE`): the probe's
``w256`` columns and the mixed suite's ``--routed-inline`` measure it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lorahot.kernels.triton_lora_linear import Config, split_k, sum_splits
from lorahot.kernels.triton_routed_lora import rank_pad

__all__ = ["launch", "config"]


@triton.jit
def _routed_inline_kernel(
    X, W, BIAS, A, BT, S, Y, WS, ROUTE,
    M, N, K, R, K_CHUNK, SLOTS, T,
    stride_xm, stride_wn, stride_as, stride_am, stride_bs, stride_bm, stride_ss, stride_ym,
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R_PAD)
    m_ok = rm < M
    n_ok = rn < N
    r_ok = rr < R
    k0 = pid_s * K_CHUNK
    k_end = tl.minimum(K, k0 + K_CHUNK)
    steps = tl.cdiv(k_end - k0, BLOCK_K)
    x_rows = X + rm[:, None].to(tl.int64) * stride_xm
    w_rows = W + rn[None, :].to(tl.int64) * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, steps):  # the base product over this program's chunk of K
        kk = k0 + k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = kk < k_end
        x = tl.load(x_rows + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_rows + kk[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc)
    slot_of = tl.load(ROUTE + rm // T, mask=m_ok, other=-1)
    for slot in range(0, SLOTS):  # each slot the tile's rows use: its shrink over the chunk, then its expand
        hit = slot_of == slot
        if tl.max(hit.to(tl.int32), axis=0) > 0:
            hacc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
            a_rows = A + tl.cast(slot, tl.int64) * stride_as + rr[None, :] * stride_am
            for k in range(0, steps):
                kk = k0 + k * BLOCK_K + tl.arange(0, BLOCK_K)
                k_ok = kk < k_end
                x = tl.load(x_rows + kk[None, :], mask=hit[:, None] & k_ok[None, :], other=0.0)
                a = tl.load(a_rows + kk[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
                hacc = tl.dot(x, a, hacc)
            s = tl.load(S + slot * stride_ss + rr, mask=r_ok, other=0.0).to(tl.float32)
            h = (hacc * s[None, :]).to(BT.dtype.element_ty)
            bt_rows = BT + tl.cast(slot, tl.int64) * stride_bs + rr[:, None] * stride_bm
            bt = tl.load(bt_rows + rn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(h, bt, acc)
    if HAS_BIAS:  # noqa: SIM102 - a compile-time branch around a run-time one
        if pid_s == 0:
            acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if SPLIT == 1:
        tl.store(Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :], acc.to(Y.dtype.element_ty), mask=mask)
    else:  # this chunk's partial sum, in float32; _split_k_sum adds them up
        tl.store(WS + (pid_s * M + rm[:, None]).to(tl.int64) * N + rn[None, :], acc, mask=mask)


def config(m: int, n: int, k: int, block_n: int = 256) -> Config:
    """``block_n``-wide output tiles; K split until about 128-256 programs run (a power of two,
    at least 128 of K per chunk, at most 16 chunks)."""
    bm = 16 if m <= 16 else 64
    tiles = -(-m // bm) * -(-n // block_n)
    split = max(1, min(16, 256 // tiles, k // 128))
    split = 1 << (split.bit_length() - 1)
    return (bm, block_n, 64, 8 if block_n >= 256 else 4, 3, split)


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    bt: torch.Tensor,
    s: torch.Tensor,
    route: torch.Tensor,
    out: torch.Tensor,
    tiles: Config | None = None,
) -> None:
    """The kernel on 2-D ``x [M, K]`` (rows contiguous) into ``out [M, N]``: ``weight [N, K]``,
    every slot's ``a [slots, R, K]``, ``bt [slots, R, N]`` (rows contiguous) and ``s [slots,
    R]``; ``route [L]`` int64 gives each of ``L`` equal consecutive groups of rows its slot
    (``-1`` for none). ``tiles`` defaults to :func:`config`."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    bm, bn, bk, warps, stages, split = tiles or config(m, n, k)
    chunk, split, ws = split_k(k, bk, split, out)
    _routed_inline_kernel[(triton.cdiv(m, bm), triton.cdiv(n, bn), split)](
        x, weight, bias if bias is not None else weight, a, bt, s, out, ws, route,
        m, n, k, a.shape[1], chunk, a.shape[0], m // route.shape[0],
        x.stride(0), weight.stride(0), a.stride(0), a.stride(1), bt.stride(0), bt.stride(1), s.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, R_PAD=rank_pad(a.shape[1]), SPLIT=split,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    sum_splits(ws, out)
