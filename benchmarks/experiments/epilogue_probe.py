"""Probe: the expand in a GEMM's epilogue, against the wide GEMM, above the fused kernel's sizes.

Above a few hundred rows a wide layer runs two cuBLAS GEMMs: ``[y | h] = x @ [W; s*A].T``, then
``y += h @ Bt``. The second reads and writes the whole output once more: ``4 * M * N`` bytes
against the base GEMM's ``2 * M * N * K`` FLOPs, about ``400 / K`` of the base GEMM's time on an
H200 (~20% at K = 2048; the rows suite's GPU-time ratios are 1.08-1.15x from 1024 rows on).
Adding ``h @ Bt`` to the accumulator before the output is stored costs ``R / K`` more MMA work
(3% at R = 64, K = 2048) and no extra pass, but needs ``h`` first: a small shrink GEMM
``h = x @ (s*A).T`` (``M x R``, reading ``x`` once more, usually from L2), then a GEMM that
cuBLAS cannot extend, so a Triton one.

Prediction: the two-kernel form (cuBLAS shrink, Triton GEMM with the expand epilogue) beats
the wide GEMM where the Triton GEMM alone is within about 10% of cuBLAS's base GEMM; whether
it is, at these shapes, is the question. The probe measures per TinyLlama projection shape and
row count, each call in a CUDA graph over 22 weight sets (weights streaming from HBM, as in the
model): cuBLAS base; the wide form; the Triton GEMM alone (best of :data:`CONFIGS`); the
shrink plus the Triton GEMM with the epilogue (best config). Every Triton form is checked
against float64 first, its output poisoned.

    PYTHONPATH=. python3 -m benchmarks.experiments.epilogue_probe          (PROBE_M=256,1024,2048,8192)
    TRITON_INTERPRET=1 PYTHONPATH=.interp:. python3 -m benchmarks.experiments.epilogue_probe check
        (the correctness check only, on the CPU in Triton's interpreter)
"""

from __future__ import annotations

import json
import os
import sys

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
dev = torch.device("cpu" if INTERPRET else "cuda")
dt = torch.float16 if INTERPRET else torch.bfloat16
R = 64
OUT = os.environ.get("OUT", "/tmp")
SHAPES = {"qo": (2048, 2048), "kv": (2048, 256), "gate/up": (2048, 5632), "down": (5632, 2048)}
#: (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
CONFIGS = [
    (128, 256, 64, 8, 8, 3),
    (128, 128, 64, 8, 4, 4),
    (128, 128, 64, 8, 8, 4),
    (64, 256, 64, 8, 4, 4),
    (128, 64, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
    (256, 128, 64, 8, 8, 3),
]


@triton.jit
def _gemm_expand(
    X, W, H, BT, Y, M, N, K, R,
    sxm, swn, shm, sbr, sym,
    EXPAND: tl.constexpr, R_PAD: tl.constexpr, EVEN_K: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``Y = X @ W.T (+ H @ BT)`` tile by tile, output tiles grouped along M for L2 reuse."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BM)
    tiles_n = tl.cdiv(N, BN)
    in_group = GROUP_M * tiles_n
    first_m = (pid // in_group) * GROUP_M
    size_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    m_ok = rm < M
    n_ok = rn < N
    x_ptr = X + rm[:, None].to(tl.int64) * sxm + rk[None, :]
    w_ptr = W + rn[None, :].to(tl.int64) * swn + rk[:, None]
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BK)):
        if EVEN_K:
            x = tl.load(x_ptr, mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptr, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = rk < K - k * BK
            x = tl.load(x_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc)
        x_ptr += BK
        w_ptr += BK
    if EXPAND:  # the expand on the accumulator: one more MMA step of depth R
        rr = tl.arange(0, R_PAD)
        r_ok = rr < R
        h = tl.load(H + rm[:, None].to(tl.int64) * shm + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0)
        bt = tl.load(BT + rr[:, None] * sbr + rn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(h, bt, acc)
    y_ptr = Y + rm[:, None].to(tl.int64) * sym + rn[None, :]
    tl.store(y_ptr, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def gemm(
    x: torch.Tensor,
    w: torch.Tensor,
    out: torch.Tensor,
    cfg: tuple,
    h: torch.Tensor | None = None,
    bt: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out = x @ w.T (+ h @ bt)``; ``x [M, K]``, ``w [N, K]``, ``h [M, R]``, ``bt [R, N]``."""
    m, k = x.shape
    n = w.shape[0]
    bm, bn, bk, group, warps, stages = cfg
    r = 0 if h is None else h.shape[1]
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _gemm_expand[grid](
        x, w, x if h is None else h, w if bt is None else bt, out, m, n, k, r,
        x.stride(0), w.stride(0), 0 if h is None else h.stride(0), 0 if bt is None else bt.stride(0), out.stride(0),
        EXPAND=h is not None, R_PAD=max(16, triton.next_power_of_2(max(r, 1))), EVEN_K=k % bk == 0,
        BM=bm, BN=bn, BK=bk, GROUP_M=group, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


def check() -> float:
    """Both forms against float64 on ragged shapes, the output poisoned first; the worst error."""
    g = torch.Generator(device=dev).manual_seed(0)
    worst = 0.0
    shapes = [(37, 96, 80, 8), (64, 128, 130, 16)] if INTERPRET else [(300, 2048, 2048, 64), (1000, 5632, 2048, 64)]
    configs = [(32, 32, 32, 4, 4, 2)] if INTERPRET else CONFIGS[:2]
    for m, k, n, r in shapes:
        x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
        w = torch.randn(n, k, device=dev, dtype=dt, generator=g) / k**0.5
        h = torch.randn(m, r, device=dev, dtype=dt, generator=g)
        bt = torch.randn(r, n, device=dev, dtype=dt, generator=g) / r**0.5
        d = torch.Tensor.double
        for cfg in configs:
            for expand in (False, True):
                out = torch.full((m, n), float("nan"), device=dev, dtype=dt)
                gemm(x, w, out, cfg, *((h, bt) if expand else ()))
                ref = d(x) @ d(w).T + (d(h) @ d(bt) if expand else 0)
                assert torch.isfinite(out).all(), (m, k, n, cfg, expand)
                err = float((d(out) - ref).norm() / ref.norm())
                worst = max(worst, err)
                print(f"check m={m} k={k} n={n} r={r} {cfg} expand={expand}: rel err {err:.2e}", flush=True)
    assert worst < 1e-2, worst
    return worst


def main() -> None:
    from benchmarks.experiments.forward_probe import graph_us

    results: dict = {"max_rel_err": check()}
    n_sets = 22
    for m in [int(v) for v in os.environ.get("PROBE_M", "256,1024,2048,8192").split(",")]:
        for name, (k, n) in SHAPES.items():
            ws = [torch.randn(n, k, device=dev, dtype=dt) / k**0.5 for _ in range(n_sets)]
            sa = [torch.randn(R, k, device=dev, dtype=dt) / k**0.5 for _ in range(n_sets)]
            bts = [torch.randn(R, n, device=dev, dtype=dt) / R**0.5 for _ in range(n_sets)]
            wides = [torch.cat([ws[i], sa[i]]) for i in range(n_sets)]
            x = torch.randn(m, k, device=dev, dtype=dt)
            outs = [torch.empty(m, n, device=dev, dtype=dt) for _ in range(n_sets)]
            row: dict = {}

            def base() -> None:
                for i in range(n_sets):
                    outs[i] = F.linear(x, ws[i])

            def wide() -> None:
                for i in range(n_sets):
                    yh = F.linear(x, wides[i])
                    outs[i] = yh.narrow(1, 0, n).addmm_(yh.narrow(1, n, R), bts[i])

            row["base"] = graph_us(base, n_sets)
            row["wide"] = graph_us(wide, n_sets)
            for expand in (False, True):
                best = None
                for cfg in CONFIGS:

                    def tri(cfg: tuple = cfg, expand: bool = expand) -> None:
                        for i in range(n_sets):
                            h = F.linear(x, sa[i]) if expand else None
                            gemm(x, ws[i], outs[i], cfg, h, bts[i] if expand else None)

                    try:
                        us = graph_us(tri, n_sets)
                    except Exception as exc:  # a config the compiler rejects (shared memory)
                        print(f"  {cfg}: {type(exc).__name__}", flush=True)
                        continue
                    row[f"{'tri_lora' if expand else 'tri_base'} {cfg}"] = us
                    if best is None or us < best[0]:
                        best = (us, cfg)
                if best is not None:
                    row["tri_lora" if expand else "tri_base"] = best[0]
                    row[("tri_lora" if expand else "tri_base") + "_cfg"] = str(best[1])
            b = row["base"]
            print(
                f"m={m:5d} {name:8s} base {b:7.2f} us  wide {row['wide']:7.2f} ({row['wide'] / b:.2f}x)  "
                f"triton base {row.get('tri_base', float('nan')):7.2f} ({row.get('tri_base', float('nan')) / b:.2f}x)  "
                f"shrink + triton expand-epilogue {row.get('tri_lora', float('nan')):7.2f} "
                f"({row.get('tri_lora', float('nan')) / b:.2f}x)",
                flush=True,
            )
            results[f"{m} {name}"] = row
            with open(os.path.join(OUT, "epilogue_probe.json"), "w") as f:
                json.dump(results, f, indent=1)
            del ws, sa, bts, wides, outs


if __name__ == "__main__":
    if sys.argv[1:] == ["check"]:
        print("max rel err", check())
    else:
        print("torch", torch.__version__, torch.cuda.get_device_name(), "triton", triton.__version__, flush=True)
        main()
