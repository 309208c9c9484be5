"""Probe: the routed prefill as one GEMM with the slots' expands in its epilogue, by tile size.

The mixed suite's routed prefill (8 sequences of 256 tokens, 8 adapters) reads 1.35x the base
model's GPU time back to back (``runs/20261201T122219-mixed.json``), where the single-adapter
path reads 1.13x. At 2048 rows a routed layer runs cuBLAS's base GEMM, then the segmented pair
(:mod:`lorahot.kernels.triton_routed_lora`): the shrink, and an expand that reads the base
output back and writes it again, a whole output pass (about 15 us of bytes on gate/up).

The fused routed kernel (:mod:`lorahot.kernels.triton_lora_linear`, ``ROUTED``) puts the
expands in the base product's epilogue, so no output pass; it serves decode sizes with 64-row
tiles. Whether it can serve prefill turns on how close its base product comes to cuBLAS's with
large tiles. Per TinyLlama projection shape, ``PROBE_M`` rows (2048) routed ``PROBE_T`` rows per
entry (256), in a CUDA graph over 22 weight sets, us per call:

- ``base``: cuBLAS's GEMM alone; ``wide``: the single-adapter eager formula (``[W; s*A]`` in one
  GEMM, then the expand in place), what one adapter costs;
- ``pair d1`` / ``pair d8``: the base GEMM, then the segmented pair, routes over 1 and 8 slots
  (what the layer runs now);
- ``shrink``: the fused path's first part alone (the zero fill and the segmented shrink, d8);
- ``acc d1`` / ``acc d8``: the accumulated form (``routed_linear._accumulated``: the pair
  writing each row's update alone, then cuBLAS's GEMM accumulating onto it with ``beta = 1``),
  checked against the pair's output first;
- ``bmm d1`` / ``bmm d8``: the base GEMM, then :func:`routed_batched` (each
  routing entry's slot's A and B gathered, two batched cuBLAS GEMMs), checked likewise. Measured
  on an H200 (``runs/20261202T224612-prefill-probe-bmm.log``): 76.7 / 49.3 / 139.4 / 125.1 us
  per q-o / k-v / gate-up / down call at d8 against the pair's 43.7 / 19.7 / 99.9 / 88.3, so
  not built into the library;
- with ``PROBE_SWEEP=1``, for each (BLOCK_M, BLOCK_N, warps, stages) of :data:`CONFIGS`: the
  fused path (the shrink, then the fused kernel, its K split by ``config_for``'s rule), d1 and
  d8; each checked against the pair's output first. Measured in the fifteenth session
  (``runs/20261201T140231-prefill-probe.log``): no configuration beat the pair, the Triton base
  product running 1.2-1.3x cuBLAS's GEMM.

    PYTHONPATH=. python3 -m benchmarks.experiments.prefill_probe
"""

from __future__ import annotations

import os

import torch

from benchmarks.experiments.forward_probe import graph_us
from benchmarks.experiments.routed_probe import SETS, SHAPES, SLOTS, weight_sets
from lorahot.kernels import routed_linear, routed_lora
from lorahot.kernels import triton_lora_linear as F
from lorahot.kernels import triton_routed_lora as T

M, T_ROWS = int(os.environ.get("PROBE_M", "2048")), int(os.environ.get("PROBE_T", "256"))
#: (BLOCK_M, BLOCK_N, warps, stages); BLOCK_K 64
CONFIGS = [
    (64, 64, 4, 3),  # config_for's above 16 rows
    (64, 128, 4, 4),
    (128, 64, 4, 4),
    (128, 128, 4, 3),
    (128, 128, 8, 3),
    (128, 128, 8, 4),
    (128, 256, 8, 3),
    (64, 256, 8, 3),
]


def routed_batched(
    x: torch.Tensor,
    y: torch.Tensor,
    a: torch.Tensor,
    bt: torch.Tensor,
    s: torch.Tensor,
    route: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The routed update as batched library GEMMs, for 2-D ``x [M, in]`` and ``y [M, out]`` whose
    ``M`` rows are ``L = len(route)`` runs of ``T`` rows (one sequence each): each run's slot's
    A and B gathered (``[L, R, in]``, ``[L, R, out]``), its shrinks ``[L, T, R]`` in one batched
    GEMM, scaled in float32 (zero for ``-1`` runs), and ``y`` plus the expands in a second
    (``beta = 1``), into ``out`` where given. Every weight a run reads is read once, whatever
    its slot's other runs."""
    length, rows = route.shape[0], x.shape[0]
    t = rows // length
    index = route.clamp_min(0)
    h = torch.bmm(x.view(length, t, x.shape[1]), a.index_select(0, index).transpose(1, 2))
    scale = s.index_select(0, index) * (route >= 0)[:, None].to(s.dtype)
    h = (h * scale[:, None, :]).to(bt.dtype)  # not in place: the scale in float32, one rounding
    n = y.shape[1]
    target = None if out is None else out.view(length, t, n)
    got = torch.baddbmm(y.view(length, t, n), h, bt.index_select(0, index), out=target)
    return got.view(rows, n)


def config(m: int, n: int, k: int, bm: int, bn: int, warps: int, stages: int) -> F.Config:
    """``config_for``'s split-K rule with these tiles."""
    tiles = -(-m // bm) * -(-n // bn)
    split = 1
    if tiles <= 192:
        split = min(8, 384 // tiles, max(1, k // 128))
        split = 1 << (split.bit_length() - 1)
    return (bm, bn, 64, warps, stages, split)


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(f"{M} rows, {T_ROWS} per routing entry, {SLOTS} slots, rank 64, us per call")
    sweep = CONFIGS if os.environ.get("PROBE_SWEEP") == "1" else []
    head = ["base", "wide", "pair d1", "pair d8", "shrink", "acc d1", "acc d8", "bmm d1", "bmm d8"]
    head += [f"{c[0]}x{c[1]}w{c[2]}s{c[3]} d{d}" for c in sweep for d in (1, 8)]
    print(f"{'shape':8s} " + " ".join(f"{h:>18s}" for h in head))
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

        wide = [torch.cat([wi, (ai[0] * 0.5).to(dt)]) for wi, ai in zip(w, a)]

        def wide_single() -> None:
            for wa, bi in zip(wide, bt):
                yh = torch.nn.functional.linear(x, wa)
                yh[:, :n].addmm_(yh[:, n:], bi[0])

        def pair(d: int) -> None:
            for wi, yi, ai, bi in zip(w, ys, a, bt):
                torch.mm(x, wi.T, out=yi)
                T.launch(x, yi, ai, bi, s, routes[d], out, gather=False, segs=grouped[d])

        def shrink_only() -> None:
            for ai in a:
                T.shrink(x, ai, s, grouped[8], T_ROWS)

        def fused(d: int, cfg: F.Config) -> None:
            for wi, ai, bi in zip(w, a, bt):
                F.launch(x, wi, None, ai, bi, s, out, cfg, routing=(grouped[d], routes[d], T_ROWS, None))

        def accumulated(d: int) -> None:
            for wi, ai, bi in zip(w, a, bt):
                routed_linear._accumulated(x, wi, None, ai, bi, s, routes[d], grouped[d])

        row = [graph_us(f, SETS) for f in (base, wide_single)]
        row += [graph_us(lambda d=d: pair(d), SETS) for d in (1, 8)]
        row += [graph_us(shrink_only, SETS)]
        for d in (1, 8):  # the first weight set against the pair's output
            out.fill_(float("nan"))
            T.launch(x, x @ w[0].T, a[0], bt[0], s, routes[d], out, gather=False, segs=grouped[d])
            got = routed_linear._accumulated(x, w[0], None, a[0], bt[0], s, routes[d], grouped[d])
            ok = torch.allclose(got, out, rtol=3e-2, atol=3e-2)
            if not ok:
                print(f"  {name} accumulated d{d}: differs from the pair by {(got - out).abs().max().item():.3g}")
            row.append(graph_us(lambda d=d: accumulated(d), SETS) if ok else float("nan"))

        def batched(d: int) -> None:
            for wi, yi, ai, bi in zip(w, ys, a, bt):
                torch.mm(x, wi.T, out=yi)
                routed_batched(x, yi, ai, bi, s, routes[d], out)

        for d in (1, 8):  # the first weight set against the pair's output
            y0 = x @ w[0].T
            out.fill_(float("nan"))
            T.launch(x, y0, a[0], bt[0], s, routes[d], out, gather=False, segs=grouped[d])
            got = routed_batched(x, y0, a[0], bt[0], s, routes[d])
            ok = torch.allclose(got, out, rtol=3e-2, atol=3e-2)
            if not ok:
                print(f"  {name} batched d{d}: differs from the pair by {(got - out).abs().max().item():.3g}")
            row.append(graph_us(lambda d=d: batched(d), SETS) if ok else float("nan"))
        for c in sweep:
            cfg = config(M, n, k, *c)
            for d in (1, 8):  # the first weight set against the pair's output
                out.fill_(float("nan"))
                T.launch(x, x @ w[0].T, a[0], bt[0], s, routes[d], out, gather=False, segs=grouped[d])
                want = out.clone()
                out.fill_(float("nan"))
                F.launch(x, w[0], None, a[0], bt[0], s, out, cfg, routing=(grouped[d], routes[d], T_ROWS, None))
                ok = torch.allclose(out, want, rtol=3e-2, atol=3e-2)
                if not ok:
                    print(f"  {name} {c} d{d}: differs from the pair by {(out - want).abs().max().item():.3g}")
                row.append(graph_us(lambda d=d, cfg=cfg: fused(d, cfg), SETS) if ok else float("nan"))
        print(f"{name:8s} " + " ".join(f"{v:18.1f}" for v in row), flush=True)


if __name__ == "__main__":
    main()
