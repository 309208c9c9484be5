"""Probe: what one routed LoRA layer costs on the GPU at the mixed suite's decode shape.

The mixed suite measured the routed decode of 64 rows at 4.2x the base model (10.0 ms against
2.4; the single-adapter path 3.1 ms) under CUDA graphs, so the cost is GPU time: about 49 us per
layer. This probe splits it, per TinyLlama projection shape, at 64 rows, slots=8, rank 64, in a
CUDA graph over 22 weight sets (weights stream from HBM as in the model), in us per call:

- ``base``: the base GEMM alone; ``lora``: base plus the library shrink/expand of one adapter;
- ``segments``: the slot sort (argsort, counts, starts) the segmented kernels once ran in every
  layer, now once per routing;
- ``segmented`` / ``gather``: ``launch`` with routes over 1 and 8 distinct slots (on top of
  the base GEMM);
- ``fused``: ``lorahot::routed_lora_linear``'s kernels (the segmented shrink, then the fused
  kernel with the base product and each slot's expand), routes over 1 and 8 slots, segments
  given as the runtime gives them.

- ``wide``: the single-adapter wide formula (one GEMM over ``[W; s*A]``, the expand
  accumulated in place), for reference;
- ``shr d1`` / ``shr d8``: the first part of ``fused`` alone (the zero fill and the segmented
  shrink), so ``fused - shr`` is the fused kernel with its split-K sum; ``one``: the
  single-adapter fused kernel (slot 0) with its split-K sum, what ``fused d1`` is held to;
- ``uns d1`` / ``uns d8``: ``fused`` with the shrink's K not split (one program per tile of
  rows over all of K): no zero fill and no atomics, one launch fewer, far fewer programs;
  slower (eleventh session, as a branch's ``p1`` columns: 23.9 / 15.8 / 28.1 / 51.4 us with 1
  adapter against ``fused``'s 15.1 / 11.1 / 19.6 / 20.1 the session before);
(A branch tried in the eleventh session, measured and reverted: the shrink writing at most
4 shares of K without atomics, added by the fused kernel, so no zero fill. The shrink fell
from 5.4 to 4.1-4.3 us (q/o), but every output tile's program then read 4 float32 tiles of
the shares where it had read one, and ``fus d1`` rose to 16.2-16.8 / 10.9-11.7 / 22.9-24.9 /
25.9-26.8 us; with 2, 8 or 16 shares it was slower still. ``runs/20261201T044700-routed-probe-m64-shares.log``,
``runs/20261201T050900-routed-probe-m64-shares-once.log``; the mixed suite's decode went from 1.75-1.80x to
1.80-1.84x, ``runs/20261201T045150-mixed.json``.)
(A ``stk8`` column, the routed prefill plan emulated with the old segmented expand, measured
65.9 / 22.4 / 153.6 / 116.6 us at 2048 rows: ``runs/20261130T194808-routed-probe-m2048.log``.)

``PROBE_M`` sets the rows (default 64) and ``PROBE_T`` the rows per routing entry (default 1:
one slot per row; ``PROBE_M=2048 PROBE_T=256`` is the mixed suite's prefill, 8 sequences of
256 tokens). Above 64 rows the gather columns are skipped.

    PYTHONPATH=. python3 -m benchmarks.experiments.routed_probe
"""

from __future__ import annotations

import os

import torch

from benchmarks.experiments.forward_probe import graph_us
from lorahot.kernels import routed_lora
from lorahot.kernels import triton_lora_linear as F
from lorahot.kernels import triton_routed_lora as T

SHAPES = {"q/o": (2048, 2048), "k/v": (2048, 256), "gate/up": (2048, 5632), "down": (5632, 2048)}
SETS, SLOTS, R = 22, 8, 64
M, T_ROWS = int(os.environ.get("PROBE_M", "64")), int(os.environ.get("PROBE_T", "1"))


def weight_sets(
    k: int, n: int, m: int, dev: torch.device, dt: torch.dtype
) -> tuple[list, list, list, torch.Tensor, torch.Tensor]:
    """``(w, a, bt, s, x)``: :data:`SETS` random base weights ``[n, k]`` and every slot's A and
    Bt, the scales 0.5, and an input of ``m`` rows (weights stream from HBM as in the model)."""
    w = [torch.randn(n, k, device=dev, dtype=dt) / k**0.5 for _ in range(SETS)]
    a = [torch.randn(SLOTS, R, k, device=dev, dtype=dt) / k**0.5 for _ in range(SETS)]
    bt = [torch.randn(SLOTS, R, n, device=dev, dtype=dt) / R**0.5 for _ in range(SETS)]
    return w, a, bt, torch.full((SLOTS, R), 0.5, device=dev), torch.randn(m, k, device=dev, dtype=dt)


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(
        f"{'shape':8s} {'base':>7s} {'lora':>7s} {'segments':>9s} {'seg d1':>7s} {'seg d8':>7s} {'gat d1':>7s} {'gat d8':>7s}"
        f" {'fus d1':>7s} {'fus d8':>7s} {'wide':>7s} {'shr d1':>7s} {'shr d8':>7s} {'one':>7s} {'uns d1':>7s} {'uns d8':>7s}"
    )
    for name, (k, n) in SHAPES.items():
        w, a, bt, s, x = weight_sets(k, n, M, dev, dt)
        y = [x @ wi.T for wi in w]
        out = torch.empty(M, n, device=dev, dtype=dt)
        entries = M // T_ROWS
        routes = {d: torch.tensor([i % d for i in range(entries)], device=dev) for d in (1, 8)}
        grouped = {d: routed_lora.segments(r, SLOTS) for d, r in routes.items()}  # as activate publishes it

        def base() -> None:
            for wi in w:
                torch.mm(x, wi.T, out=out)

        def lora() -> None:
            for wi, ai, bi in zip(w, a, bt):
                torch.mm(x, wi.T, out=out)
                out.addmm_(((x @ ai[0].T) * s[0]).to(dt), bi[0])

        def segs() -> None:
            for _ in range(SETS):
                T.segments(routes[8], SLOTS)

        def routed(d: int, gather: bool) -> None:
            for yi, ai, bi in zip(y, a, bt):
                T.launch(x, yi, ai, bi, s, routes[d], out, gather=gather, segs=grouped[d])

        config = F.config_for(M, n, k)

        def fused(d: int) -> None:
            for wi, ai, bi in zip(w, a, bt):
                F.launch(x, wi, None, ai, bi, s, out, config, routing=(grouped[d], routes[d], T_ROWS, None))

        wide = [torch.cat([wi, (ai[0] * 0.5).to(dt)]) for wi, ai in zip(w, a)]

        def wide_single() -> None:
            for wa, bi in zip(wide, bt):
                yh = torch.nn.functional.linear(x, wa)
                yh[:, :n].addmm_(yh[:, n:], bi[0])

        def shrink_only(d: int) -> None:  # the fused path's first part: zero fill and segmented shrink
            for ai in a:
                T.shrink(x, ai, s, grouped[d], T_ROWS)

        def single() -> None:  # the single-adapter fused kernel (slot 0), split-K sum included
            for wi, ai, bi in zip(w, a, bt):
                F.launch(x, wi, None, ai[0], bi[0], s[0], out, config)

        def unsplit(d: int) -> None:  # ``fused`` with the shrink's K unsplit: no zero fill, no atomics
            saved = T._SHRINK_PROGRAMS
            T._SHRINK_PROGRAMS = 1
            try:
                fused(d)
            finally:
                T._SHRINK_PROGRAMS = saved

        for d in (1, 8):  # the unsplit shrink computes the same layer
            out.fill_(float("nan"))
            fused(d)
            split_out = out.clone()
            out.fill_(float("nan"))
            unsplit(d)
            torch.testing.assert_close(out, split_out, rtol=2e-2, atol=2e-2)

        nan = float("nan")
        row = [graph_us(f, SETS) for f in (base, lora, segs)]
        row += [graph_us(lambda d=d: routed(d, False), SETS) for d in (1, 8)]
        row += [graph_us(lambda d=d: routed(d, True), SETS) if M <= 64 else nan for d in (1, 8)]
        row += [graph_us(lambda d=d: fused(d), SETS) for d in (1, 8)]
        row += [graph_us(wide_single, SETS)]
        row += [graph_us(lambda d=d: shrink_only(d), SETS) for d in (1, 8)]
        row += [graph_us(single, SETS)]
        row += [graph_us(lambda d=d: unsplit(d), SETS) for d in (1, 8)]
        print(f"{name:8s} " + " ".join(f"{v:8.1f}" for v in row), flush=True)


if __name__ == "__main__":
    main()
