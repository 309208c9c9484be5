"""Probe: the routed prefill's segmented pair as one kernel, each program shrinking its own tile.

At 2048 rows over 8 adapters a routed layer runs cuBLAS's base GEMM, then the segmented pair
(:mod:`lorahot.kernels.triton_routed_lora`): a shrink that writes K's shares as float32 partials,
and an expand that adds them per tile and writes ``y + h @ Bt_slot``. Measured on an H200
(``runs/20261202T224612-prefill-probe-bmm.log``) the pair costs 19.5 / 13.4 / 36.8 / 28.5 us per
q-o / k-v / gate-up / down call over the base GEMM, where the output pass (read ``y``, write the
output) is about 3.4 / 0.4 / 9.6 / 3.4 us of HBM bytes and the shrink's reads of ``x`` 1.7 / 1.7
/ 1.7 / 4.8 (4.8 TB/s).

Rows of one segment share one slot, so a tile of rows needs one slot's A and B only. Here one
kernel (:func:`_pair`) runs one program per (tile of rows, share of N's tiles): it computes its
tile's shrink over all of K (``x`` tile and the slot's A, mostly from L2 after the first share),
rounds it as the pair does, then loops over its share of the output tiles with ``y``. No float32
workspace, no second launch, no partials to add; the shrink's work is repeated once per share
of N (``G`` shares), which costs L2 reads, not HBM ones. Predicted: the pair's cost over the
base GEMM near the output pass plus one shrink's reads, about 6-10 us on q-o and 12-18 on
gate-up; on down (K = 5632) the repeated shrink over a deep K may lose.

Per TinyLlama projection shape, ``PROBE_M`` rows (2048) routed ``PROBE_T`` rows per entry (256),
in a CUDA graph over 22 weight sets, us per call:

- ``base``: cuBLAS's GEMM alone; ``copy``: ``out.copy_(y)``, the output pass's bytes;
- ``pair d1`` / ``pair d8``: the base GEMM, then the library's segmented pair (what the layer runs);
- ``one BMxBKxBN gG wW d8``: the base GEMM, then :func:`_pair` with those tiles, ``G`` shares of
  N per row tile and ``W`` warps, each checked against a float64 reference first (NaN where it
  differs).

    PYTHONPATH=. python3 -m benchmarks.experiments.segment_pair_probe
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from benchmarks.experiments.forward_probe import graph_us
from benchmarks.experiments.routed_probe import SETS, SHAPES, SLOTS, weight_sets
from lorahot.kernels import routed_lora
from lorahot.kernels import triton_routed_lora as T
from lorahot.kernels.triton_routed_lora import _segment_rows

M, T_ROWS = int(os.environ.get("PROBE_M", "2048")), int(os.environ.get("PROBE_T", "256"))
#: (BLOCK_M, BLOCK_K, BLOCK_N, shares of N per row tile, warps, stages)
CONFIGS = [
    (64, 64, 128, 2, 4, 3),
    (64, 64, 128, 4, 4, 3),
    (64, 128, 128, 4, 4, 3),
    (64, 64, 128, 8, 4, 3),
    (32, 64, 128, 2, 4, 3),
    (32, 64, 128, 4, 4, 3),
    (128, 64, 128, 4, 8, 3),
    (128, 64, 128, 8, 8, 3),
]


@triton.jit
def _pair(
    X, A, S, BT, Y, SEG, OUT,
    K, N, R, SLOTS, T,
    stride_xm, stride_as, stride_ar, stride_ss, stride_bs, stride_br, stride_ym, stride_om,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
    SLOTS_PAD: tl.constexpr,
):  # fmt: skip
    slot, rows, m_ok, past = _segment_rows(SEG, tl.program_id(0), SLOTS, T, BLOCK_M, SLOTS_PAD)
    if past:
        return
    n_tiles = tl.cdiv(N, BLOCK_N)
    step = tl.num_programs(1)
    if slot < SLOTS:
        rr = tl.arange(0, R_PAD)
        r_ok = rr < R
        h = tl.zeros((BLOCK_M, R_PAD), dtype=tl.float32)
        a_base = A + slot.to(tl.int64) * stride_as
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            kk = k * BLOCK_K + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            x = tl.load(X + rows[:, None] * stride_xm + kk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            a = tl.load(a_base + rr[None, :] * stride_ar + kk[:, None], mask=k_ok[:, None] & r_ok[None, :], other=0.0)
            h = tl.dot(x, a, h)
        s = tl.load(S + slot * stride_ss + rr, mask=r_ok, other=0.0).to(tl.float32)
        hb = (h * s[None, :]).to(BT.dtype.element_ty)
        bt_base = BT + slot.to(tl.int64) * stride_bs
        for nt in range(tl.program_id(1), n_tiles, step):
            rn = nt * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rn < N
            mask = m_ok[:, None] & n_ok[None, :]
            y = tl.load(Y + rows[:, None] * stride_ym + rn[None, :], mask=mask, other=0.0)
            bt = tl.load(bt_base + rr[:, None] * stride_br + rn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.dot(hb, bt, y.to(tl.float32))
            tl.store(OUT + rows[:, None] * stride_om + rn[None, :], acc.to(OUT.dtype.element_ty), mask=mask)
    else:  # the rows of no slot: out = y
        for nt in range(tl.program_id(1), n_tiles, step):
            rn = nt * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = m_ok[:, None] & (rn < N)[None, :]
            y = tl.load(Y + rows[:, None] * stride_ym + rn[None, :], mask=mask, other=0.0)
            tl.store(OUT + rows[:, None] * stride_om + rn[None, :], y, mask=mask)


def pair(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    s: torch.Tensor,
    segs: torch.Tensor,
    t: int,
    out: torch.Tensor,
    cfg: tuple[int, int, int, int, int, int],
) -> None:
    """``out = y + (s * (x @ A_slot.T)) @ Bt_slot`` per row, by :func:`_pair` with ``cfg``."""
    bm, bk, bn, g, warps, stages = cfg
    m, k = x.shape
    n = out.shape[1]
    slots, r = a.shape[0], a.shape[1]
    grid = (T._tiles(m, bm, slots), min(g, triton.cdiv(n, bn)), 1)
    _pair[grid](
        x, a, s, bt, y, segs, out,
        k, n, r, slots, t,
        x.stride(0), a.stride(0), a.stride(1), s.stride(0), bt.stride(0), bt.stride(1), y.stride(0), out.stride(0),
        R_PAD=T.rank_pad(r), BLOCK_M=bm, BLOCK_K=bk, BLOCK_N=bn, SLOTS_PAD=T._slots_pad(slots),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


def reference(
    x: torch.Tensor, y: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, s: torch.Tensor, route: torch.Tensor
) -> torch.Tensor:
    """Float64, row by row of the routing's entries."""
    t = x.shape[0] // route.shape[0]
    out = y.double().clone()
    for e, slot in enumerate(route.tolist()):
        if slot < 0:
            continue
        rows = slice(e * t, (e + 1) * t)
        h = (x[rows].double() @ a[slot].double().T) * s[slot].double()
        out[rows] += h @ bt[slot].double()
    return out


def check(cfg: tuple[int, int, int, int, int, int], dev: torch.device, dt: torch.dtype) -> float:
    """Largest error relative to the reference's scale over a routing with -1 entries and
    repeated slots, on a small shape whose sizes are not multiples of the tiles; the output
    poisoned with NaN first."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    m, k, n, r, slots, t = 24 * 7, 300, 260, 40, 5, 24
    x = torch.randn(m, k, generator=gen).to(dev, dt)
    y = torch.randn(m, n, generator=gen).to(dev, dt)
    a = (torch.randn(slots, r, k, generator=gen) / k**0.5).to(dev, dt)
    bt = (torch.randn(slots, r, n, generator=gen) / r**0.5).to(dev, dt)
    s = torch.rand(slots, r, generator=gen).to(dev)
    route = torch.tensor([3, -1, 0, 3, 4, -1, 1], device=dev)
    out = torch.full((m, n), float("nan"), device=dev, dtype=dt)
    pair(x, y, a, bt, s, routed_lora.segments(route, slots), t, out, cfg)
    want = reference(x, y, a, bt, s, route)
    return float(((out.double() - want).abs().max() / want.abs().max()).item())


def main() -> None:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float16  # the interpreter: float16
    print(f"{M} rows, {T_ROWS} per routing entry, {SLOTS} slots, rank 64, us per call")
    configs = [c for c in CONFIGS if check(c, dev, dt) < 2e-2]
    for c in CONFIGS:
        if c not in configs:
            print(f"  config {c} differs from the float64 reference: left out")
    if dev.type != "cuda":
        print(f"checked {len(configs)} of {len(CONFIGS)} configurations (no timing off CUDA)")
        return
    head = ["base", "copy", "pair d1", "pair d8"]
    head += [f"one {c[0]}x{c[1]}x{c[2]} g{c[3]} w{c[4]} d{d}" for c in configs for d in (1, 8)]
    print(f"{'shape':8s} " + " ".join(f"{h:>12s}" for h in head[:4]))
    for name, (k, n) in SHAPES.items():
        w, a, bt, s, x = weight_sets(k, n, M, dev, dt)
        out = torch.empty(M, n, device=dev, dtype=dt)
        ys = [torch.empty(M, n, device=dev, dtype=dt) for _ in range(SETS)]
        entries = M // T_ROWS
        routes = {d: torch.tensor([i % d for i in range(entries)], device=dev) for d in (1, 8)}
        grouped = {d: routed_lora.segments(r, SLOTS) for d, r in routes.items()}

        def base() -> None:
            for wi in w:
                torch.mm(x, wi.T, out=out)

        def copy() -> None:
            for yi in ys:
                out.copy_(yi)

        def library(d: int) -> None:
            for wi, yi, ai, bi in zip(w, ys, a, bt):
                torch.mm(x, wi.T, out=yi)
                T.launch(x, yi, ai, bi, s, routes[d], out, gather=False, segs=grouped[d])

        def one(d: int, cfg: tuple[int, int, int, int, int, int]) -> None:
            for wi, yi, ai, bi in zip(w, ys, a, bt):
                torch.mm(x, wi.T, out=yi)
                pair(x, yi, ai, bi, s, grouped[d], T_ROWS, out, cfg)

        row = [graph_us(base, SETS), graph_us(copy, SETS)]
        row += [graph_us(lambda d=d: library(d), SETS) for d in (1, 8)]
        print(f"{name:8s} " + " ".join(f"{v:12.1f}" for v in row))
        for cfg in configs:
            for d in (1, 8):  # against the library pair on the first weight set
                want = torch.empty_like(out)
                T.launch(x, x @ w[0].T, a[0], bt[0], s, routes[d], want, gather=False, segs=grouped[d])
                out.fill_(float("nan"))
                pair(x, x @ w[0].T, a[0], bt[0], s, grouped[d], T_ROWS, out, cfg)
                ok = torch.allclose(out, want, rtol=3e-2, atol=3e-2)
                us = graph_us(lambda d=d, cfg=cfg: one(d, cfg), SETS) if ok else float("nan")
                label = f"one {cfg[0]}x{cfg[1]}x{cfg[2]} g{cfg[3]} w{cfg[4]} d{d}"
                print(
                    f"  {name:8s} {label:>32s} {us:8.1f}  (over base {us - row[0]:6.1f}, pair {row[2 + (d == 8)] - row[0]:6.1f})"
                )
        del w, a, bt, x, ys
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
