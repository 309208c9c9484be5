"""A GEMM fed by the tensor memory accelerator, with each row tile's slot expand in its accumulator
(imported only where Triton and CUDA exist; used where :data:`lorahot.kernels.routed_linear.TMA` is on).

``launch`` computes, row by row, ``out = x @ weight.T + bias + h @ Bt_k`` with ``k`` the row's
slot (``-1``: the base product alone), for ``h`` the rows' scaled shrinks
(:func:`lorahot.kernels.triton_routed_lora.shrink`, float32, rounded to the weights' dtype before
the dot as the other kernels do) and ``bt [slots, R, out]``. The base product's tiles of ``x``
and ``W`` are loaded through tensor descriptors (the H100's TMA engine, sm90 and newer); each
program then adds, for every slot its row tile uses, that slot's expand of the tile's rows (one
dot of ``R`` more steps of K, usually one slot per tile: a routing entry's rows are contiguous),
so the output is written once and never read back. Persistent programs loop over the output
tiles in groups of rows (``W`` read from L2 by neighbouring tiles).

Whether this beats cuBLAS's GEMM followed by the segmented expand turns on how close its base
product comes to cuBLAS's: ``benchmarks/experiments/tma_probe.py`` measures it (not yet run on a
GPU when this was written). A pointer-loading form ran 1.2-1.3x cuBLAS at 2048 rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from lorahot.kernels.routed_lora import rank_pad

__all__ = ["Config", "config_for", "launch", "supports"]

#: (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, persistent)
Config = tuple[int, int, int, int, int, bool]


@triton.jit
def _tile_of(t, num_m, num_n, GROUP_M: tl.constexpr):
    """Output tile ``t``'s (row tile, column tile), in groups of ``GROUP_M`` row tiles."""
    per_group = GROUP_M * num_n
    first_m = (t // per_group) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (t % per_group) % size, (t % per_group) // size


@triton.jit
def _expand_into(acc, H, BT, ROUTE, off_m, off_n, M, N, R, T, stride_h, stride_bs, stride_br,
                 R_PAD: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SLOTS: tl.constexpr):  # fmt: skip
    """``acc`` plus, for each slot the tile's rows use, those rows' ``h`` times the slot's ``Bt``."""
    rm = off_m + tl.arange(0, BM)
    slot = tl.load(ROUTE + rm // T, mask=rm < M, other=-1)
    lo = tl.min(tl.where(slot >= 0, slot, SLOTS), axis=0)
    hi = tl.max(slot, axis=0)
    rr = tl.arange(0, R_PAD)
    rn = off_n + tl.arange(0, BN)
    r_ok = rr < R
    h = tl.load(H + rm[:, None].to(tl.int64) * stride_h + rr[None, :], mask=(slot >= 0)[:, None] & r_ok[None, :])
    h = tl.where((slot >= 0)[:, None] & r_ok[None, :], h, 0.0)  # rows of no slot are unset in H
    for k in range(lo, hi + 1):
        hs = tl.where((slot == k)[:, None], h, 0.0).to(BT.dtype.element_ty)
        bt_ptr = BT + k * stride_bs + rr[:, None] * stride_br + rn[None, :]
        bt = tl.load(bt_ptr, mask=r_ok[:, None] & (rn < N)[None, :], other=0.0)
        acc = tl.dot(hs, bt, acc)
    return acc


@triton.jit
def _tma_linear(x_desc, w_desc, y_desc, BIAS, H, BT, ROUTE, M, N, K, R, T, stride_h, stride_bs, stride_br,
                HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr, SLOTS: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr,
                PERSISTENT: tl.constexpr):  # fmt: skip
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    # one tile per program where not persistent (a program per tile); a loop over tiles,
    # flattened with the K loop so that loads run ahead across tiles, where persistent
    for t in tl.range(tl.program_id(0), num_m * num_n, PROGRAMS, flatten=PERSISTENT):
        pid_m, pid_n = _tile_of(t, num_m, num_n, GROUP_M)
        off_m, off_n = pid_m * BM, pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in range(k_tiles):
            acc = tl.dot(x_desc.load([off_m, kk * BK]), w_desc.load([off_n, kk * BK]).T, acc)
        acc = _expand_into(
            acc, H, BT, ROUTE, off_m, off_n, M, N, R, T, stride_h, stride_bs, stride_br, R_PAD, BM, BN, SLOTS
        )
        if HAS_BIAS:
            rn = off_n + tl.arange(0, BN)
            acc += tl.load(BIAS + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
        y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


def _aligned(t: torch.Tensor) -> bool:
    """What a tensor descriptor needs: rows contiguous, the other stride and the start 16-byte aligned."""
    size = t.element_size()
    return t.stride(-1) == 1 and (t.stride(0) * size) % 16 == 0 and t.data_ptr() % 16 == 0


def supports(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether :func:`launch` runs on these: CUDA sm90 or newer (Triton's interpreter too, on the
    CPU), one fp16/bf16 dtype, descriptor-aligned rows."""
    if x.dtype not in (torch.float16, torch.bfloat16) or weight.dtype != x.dtype or out.dtype != x.dtype:
        return False
    if x.is_cuda and torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return all(_aligned(t) for t in (x, weight, out))


def config_for(m: int, n: int) -> Config:
    """The tiles for ``m`` rows into ``n`` outputs. A starting point for the prefill sizes this
    path serves (the probe's sweep decides)."""
    return (128, 128 if n > 512 else 64, 64, 4, 8, True)


def launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    h: torch.Tensor,
    bt: torch.Tensor,
    route: torch.Tensor,
    t: int,
    out: torch.Tensor,
    config: Config,
) -> torch.Tensor:
    """``out [M, N] = x [M, K] @ weight [N, K].T + bias + h @ Bt_k`` row by row (see the module
    docstring); ``h [M, >= R]`` float32, ``bt [slots, R, N]``, ``route [L]`` each group of ``t``
    rows' slot."""
    bm, bn, bk, stages, warps, persistent = config
    m, k = x.shape
    n = weight.shape[0]
    slots, r = bt.shape[0], bt.shape[1]
    x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(weight, [bn, bk])
    y_desc = TensorDescriptor.from_tensor(out, [bm, bn])
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    programs = tiles
    if persistent and x.is_cuda:
        programs = min(tiles, torch.cuda.get_device_properties(x.device).multi_processor_count)
    _tma_linear[(programs,)](
        x_desc, w_desc, y_desc, out if bias is None else bias, h, bt, route, m, n, k, r, t,
        h.stride(0), bt.stride(0), bt.stride(1),
        HAS_BIAS=bias is not None, R_PAD=rank_pad(r), SLOTS=slots, BM=bm, BN=bn, BK=bk, GROUP_M=8,
        PROGRAMS=programs, PERSISTENT=persistent, num_stages=stages, num_warps=warps,
    )  # fmt: skip
    return out
