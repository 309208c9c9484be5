"""Probe: the segmented routed kernels (shrink, expand) per launch, against their bytes.

The first version of this probe (``runs/20261130T195721-segment-probe.json``) timed the old
kernels, one program per (row tile, output tile, slot) with the grid sized for every row in one
slot: at 2048 rows the expand cost 15-50 us per layer where its bytes take 1-12, in proportion to
its programs (about 2 ns each), and the shrink's K split added atomics and a zero fill. The
kernels now number only real tiles, loop each expand program over a share of N, and give each
share of K its own partial. This probe times, per TinyLlama projection shape, rows per routing
entry and distinct adapters, in a CUDA graph over 22 weight sets (weights streaming from HBM as
in the model), us per call:

- ``base``: the cuBLAS base GEMM; ``bytes``: the pair's bytes at 4.0 TB/s;
- ``pair``: ``launch`` (shrink and expand) for each ``_EXPAND_PROGRAMS`` and ``_PARTIAL_PROGRAMS``
  of :data:`KNOBS`; ``shrink``: the shrink alone at the same knobs;

and checks each knob's output against float64 first (output poisoned). ``PROBE_M`` / ``PROBE_T``:
rows and rows per routing entry (default ``2048,64`` and ``256,1``).

    PYTHONPATH=. python3 -m benchmarks.experiments.segment_probe
"""

from __future__ import annotations

import itertools
import json
import os

import torch

from benchmarks.experiments.forward_probe import graph_us
from lorahot.kernels import routed_lora
from lorahot.kernels import triton_routed_lora as T

SHAPES = {"q/o": (2048, 2048), "k/v": (2048, 256), "gate/up": (2048, 5632), "down": (5632, 2048)}
SETS, SLOTS, R = 22, 8, 64
BW = 4.0e12  # bytes/s, a round H200 figure for the bytes' column
#: (expand programs, shrink partial programs)
KNOBS = [(264, 128), (132, 128), (528, 128), (264, 32), (264, 64), (264, 256)]


def operands(m: int, k: int, n: int, t: int, d: int, dev: torch.device, dt: torch.dtype, sets: int) -> tuple:
    """A layer's routed operands over ``SLOTS`` slots of rank ``R``: ``sets`` weight sets of every
    slot's A and Bt, the scales, ``x [m, k]``, ``y`` and ``out [m, n]``, a routing of ``m // t``
    entries over ``d`` slots (entry ``i`` on slot ``i % d``) and its segments."""
    a = [torch.randn(SLOTS, R, k, device=dev, dtype=dt) / k**0.5 for _ in range(sets)]
    bt = [torch.randn(SLOTS, R, n, device=dev, dtype=dt) / R**0.5 for _ in range(sets)]
    s = torch.full((SLOTS, R), 0.5, device=dev)
    x = torch.randn(m, k, device=dev, dtype=dt)
    y = torch.randn(m, n, device=dev, dtype=dt)
    route = torch.tensor([i % d for i in range(m // t)], device=dev)
    return a, bt, s, x, y, torch.empty(m, n, device=dev, dtype=dt), route, routed_lora.segments(route, SLOTS)


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    ms = [int(v) for v in os.environ.get("PROBE_M", "2048,64").split(",")]
    ts = [int(v) for v in os.environ.get("PROBE_T", "256,1").split(",")]
    print(torch.__version__, torch.cuda.get_device_name())
    table: dict[str, dict[str, float]] = {}
    for (m, t), d, (name, (k, n)) in itertools.product(zip(ms, ts), (1, 8), SHAPES.items()):
        a, bt, s, x, y, out, route, segs = operands(m, k, n, t, d, dev, dt, SETS)
        w = [torch.randn(n, k, device=dev, dtype=dt) / k**0.5 for _ in range(SETS)]
        slot = route.repeat_interleave(t)
        want = y.double()
        for sl in range(d):
            on = slot == sl
            want[on] += ((x[on].double() @ a[0][sl].double().T) * 0.5) @ bt[0][sl].double()
        row: dict[str, float] = {}

        def base() -> None:
            for wi in w:
                torch.mm(x, wi.T, out=out)

        row["base"] = graph_us(base, SETS)
        row["bytes"] = (2 * m * k + 4 * m * n) / BW * 1e6
        for programs, partials in KNOBS:
            T._EXPAND_PROGRAMS, T._PARTIAL_PROGRAMS = programs, partials
            out.fill_(float("nan"))
            T.launch(x, y, a[0], bt[0], s, route, out, gather=False, segs=segs)
            err = float((out.double() - want).norm() / want.norm())

            def pair() -> None:
                for ai, bi in zip(a, bt):
                    T.launch(x, y, ai, bi, s, route, out, gather=False, segs=segs)

            def shrink() -> None:
                for ai in a:
                    T.shrink(x, ai, s, segs, t, partials=True)

            tag = f"e{programs} p{partials}"
            row[f"pair {tag}"] = graph_us(pair, SETS) if err < 1e-2 else float("nan")
            row[f"shrink {tag}"] = graph_us(shrink, SETS)
            row[f"err {tag}"] = err
        key = f"m{m} t{t} d{d} {name}"
        table[key] = row
        print(
            key, " ".join(f"{k2}={v:.1f}" if "err" not in k2 else f"{k2}={v:.1e}" for k2, v in row.items()), flush=True
        )
    path = os.path.join(os.environ.get("OUT", "/tmp"), "segment_probe.json")
    with open(path, "w") as f:
        json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
