"""Probe: the segmented pair at prefill by how far the shrink splits K.

At 2048 rows over 8 adapters the segmented shrink that writes partials (the pair's first
kernel, :func:`lorahot.kernels.triton_routed_lora.shrink`) ran 7.6-11.7 us per layer against
2.7-7.7 us for its bytes (fourteenth session). :func:`~lorahot.kernels.triton_routed_lora._splits`
splits K until the row tiles give about ``_PARTIAL_PROGRAMS`` (128) programs: with 64-row tiles
that is 41 tiles and 2 shares, 82 programs on an H200's 132 SMs. More shares fill the SMs and
each adds one ``[64, R_PAD]`` float32 partial per tile for the expand to read. Per TinyLlama
projection shape, ``PROBE_M`` rows (2048), ``PROBE_T`` per routing entry (256), 8 adapters, in a
CUDA graph over 22 weight sets, us per call, for each value of ``_PARTIAL_PROGRAMS``: the shrink
alone and the pair (base GEMM, shrink, expand), each checked against the pair at 128 first.

Measured on an H200 (``runs/20261202T231802-segment-splits-probe.log``): 128 is the best or
within 0.7 us of it on every shape (shrink 7.7 / 7.5 / 7.5 / 12.1 us, pair 43.6 / 19.6 / 97.9 /
87.2 for q-o / k-v / gate-up / down); more shares cost the shrink 0.7-3.6 us and the pair up to
9 us (down at 1024). The shrink's distance from its bytes is not a matter of filling the SMs.

    PYTHONPATH=. python3 -m benchmarks.experiments.segment_splits_probe
"""

from __future__ import annotations

import os

import torch

from benchmarks.experiments.forward_probe import graph_us
from benchmarks.experiments.routed_probe import SETS, SHAPES, SLOTS, weight_sets
from lorahot.kernels import routed_lora
from lorahot.kernels import triton_routed_lora as T

M, T_ROWS = int(os.environ.get("PROBE_M", "2048")), int(os.environ.get("PROBE_T", "256"))
PROGRAMS = [int(v) for v in os.environ.get("PROBE_PROGRAMS", "128,256,512,1024").split(",")]


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    default = T._PARTIAL_PROGRAMS
    print(f"{M} rows, {T_ROWS} per routing entry, {SLOTS} slots, rank 64, us per call; shrink / pair")
    print(f"{'shape':8s} " + " ".join(f"{p:>15d}" for p in PROGRAMS))
    for name, (k, n) in SHAPES.items():
        w, a, bt, s, x = weight_sets(k, n, M, dev, dt)
        out = torch.empty(M, n, device=dev, dtype=dt)
        ys = [torch.empty(M, n, device=dev, dtype=dt) for _ in range(SETS)]
        route = torch.tensor([i % SLOTS for i in range(M // T_ROWS)], device=dev)
        segs = routed_lora.segments(route, SLOTS)
        T._PARTIAL_PROGRAMS = default
        y0 = x @ w[0].T
        T.launch(x, y0, a[0], bt[0], s, route, out, gather=False, segs=segs)
        want = out.clone()
        row = []
        for programs in PROGRAMS:
            T._PARTIAL_PROGRAMS = programs
            out.fill_(float("nan"))
            T.launch(x, y0, a[0], bt[0], s, route, out, gather=False, segs=segs)
            if not torch.allclose(out, want, rtol=2e-2, atol=2e-2):
                print(f"  {name} at {programs}: differs by {(out - want).abs().max().item():.3g}")
                row.append("-")
                continue

            def shrink_only() -> None:
                for ai in a:
                    T.shrink(x, ai, s, segs, T_ROWS, partials=True)

            def pair() -> None:
                for wi, yi, ai, bi in zip(w, ys, a, bt):
                    torch.mm(x, wi.T, out=yi)
                    T.launch(x, yi, ai, bi, s, route, out, gather=False, segs=segs)

            row.append(f"{graph_us(shrink_only, SETS):6.1f} /{graph_us(pair, SETS):6.1f}")
        print(f"{name:8s} " + " ".join(f"{v:>15s}" for v in row), flush=True)
    T._PARTIAL_PROGRAMS = default


if __name__ == "__main__":
    main()
