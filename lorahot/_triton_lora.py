"""The Triton kernel behind :mod:`lorahot.fused` (imported only where Triton and CUDA exist).

One program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``y = x @ W.T + bias + s * (x @ A.T) @ Bt``:
its K loop accumulates the base product and the whole ``[BLOCK_M, R]`` shrink ``x @ A.T`` from
the same loads of ``x``; the expand ``h @ Bt[:, tile]`` and the scale run in the epilogue; the
output is rounded once. Each program recomputes the shrink for its rows, which costs
``R / BLOCK_N`` times the tile's weight reads again (from L2, A being small) and saves the
separate shrink and expand launches that dominate a small-batch LoRA forward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import triton_op, wrap_triton

__all__ = ["lora_linear", "launch", "config_for"]


@triton.jit
def _lora_linear_kernel(
    X, W, A, BT, BIAS, S, Y,
    M, N, K, R,
    stride_xm, stride_wn, stride_am, stride_bm, stride_ym,
    HAS_BIAS: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rr = tl.arange(0, R_PAD)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    r_ok = rr < R
    x_ptr = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    w_ptr = W + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
    a_ptr = A + rr[None, :] * stride_am + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    hacc = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = rk < K - k * BLOCK_K
        x = tl.load(x_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a = tl.load(a_ptr, mask=k_ok[:, None] & r_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc)
        hacc = tl.dot(x, a, hacc)
        x_ptr += BLOCK_K
        w_ptr += BLOCK_K
        a_ptr += BLOCK_K
    h = hacc.to(BT.dtype.element_ty)
    bt = tl.load(BT + rr[:, None] * stride_bm + rn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
    acc += tl.dot(h, bt) * tl.load(S).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y_ptr = Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), by batch size.
Config = tuple[int, int, int, int, int]


def config_for(m: int, n: int) -> Config:
    """The tile configuration for ``m`` rows and ``n`` outputs."""
    # measured best per Llama projection shape on an H100 (benchmarks/experiments/forward_probe.py)
    if m <= 16:
        return (16, 64, 128, 4, 4) if n >= 4096 else (16, 32, 256, 4, 3)
    if n >= 4096:
        return (128, 64, 64, 8, 4)
    return (32, 32, 128, 4, 4) if n <= 512 else (64, 32, 128, 4, 3)


def launch(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, bt: torch.Tensor, scale: torch.Tensor, out: torch.Tensor, config: Config) -> None:
    """Runs the kernel on 2-D ``x [M, K]`` into ``out [M, N]`` (rows contiguous)."""
    m, k = x.shape
    n = weight.shape[0]
    r = a.shape[0]
    bm, bn, bk, warps, stages = config
    grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
    wrap_triton(_lora_linear_kernel)[grid](
        x, weight, a, bt, bias if bias is not None else weight, scale, out,
        m, n, k, r,
        x.stride(0), weight.stride(0), a.stride(0), bt.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, R_PAD=max(16, triton.next_power_of_2(r)),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )  # fmt: skip


@triton_op("lorahot::lora_linear", mutates_args=())
def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, bt: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ weight.T + bias + scale * (x @ a.T) @ bt`` in one kernel; ``x [..., K]``."""
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n = weight.shape[0]
    out = torch.empty((x2.shape[0], n), device=x.device, dtype=x.dtype)
    if x2.shape[0] == 0:
        return out.view(*x.shape[:-1], n)
    launch(x2, weight, bias, a, bt, scale, out, config_for(x2.shape[0], n))
    return out.view(*x.shape[:-1], n)
