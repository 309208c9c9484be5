"""Probe: would one routed shrink for the layers that share an input pay?

A routed layer's first kernel is the segmented shrink (:func:`lorahot.kernels.triton_routed_lora.shrink`):
each row's ``s_k * (x @ A_k.T)`` with its own slot ``k``. q, k and v read the same input, and so
do gate and up; the arena keeps neighbouring layers' A rows contiguous (the single-adapter
path's stacked shrinks rely on it), so their A's are one ``[slots, n * R, in]`` view and their
scales one ``[slots, n * R]``. One shrink over the stack would read ``x`` once and launch once,
where the layers now launch ``n`` shrinks: 3 + 2 kernel nodes per block become 2. At decode
each kernel node costs about 1.8 us of host time in a replayed graph (thirteenth session); at
prefill each shrink is 7.6-11.7 us against 2.7 us of bytes for ``x``.

Per group (q/k/v: 3 layers, gate/up: 2; ``in`` 2048, rank 64, ``slots`` 8), ``PROBE_M`` rows
(64 and 2048 by default) routed one slot per ``PROBE_T`` rows (1 and 256), over 8 distinct
adapters, in a CUDA graph over 22 weight sets, us per group:

- ``atomic sep`` / ``atomic stk``: the fused path's shrink (K split over programs that add into a
  zeroed float32 workspace), one per layer against one over the stack;
- ``partial sep`` / ``partial stk``: the segmented pair's (each share of K written apart).

The stacked results are checked against the separate ones first. Not built into the layers
(that needs the layers of a group to share one shrink under the compiler); this says whether to.

    PYTHONPATH=. python3 -m benchmarks.experiments.stacked_shrink_probe
"""

from __future__ import annotations

import os

import torch

from benchmarks.experiments.forward_probe import graph_us
from lorahot.kernels import routed_lora
from lorahot.kernels import triton_routed_lora as T

GROUPS = {"q/k/v": 3, "gate/up": 2}
SETS, SLOTS, R, K = 22, 8, 64, 2048
CASES = [(int(m), int(t)) for m, t in (c.split(":") for c in os.environ.get("PROBE_CASES", "64:1,2048:256").split(","))]


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(f"in {K}, rank {R}, {SLOTS} slots, 8 distinct adapters, us per group")
    print(
        f"{'rows':>6s} {'group':8s} {'atomic sep':>11s} {'atomic stk':>11s} {'partial sep':>12s} {'partial stk':>12s}"
    )
    for m, t in CASES:
        x = torch.randn(m, K, device=dev, dtype=dt)
        route = torch.tensor([i % 8 for i in range(m // t)], device=dev)
        segs = routed_lora.segments(route, SLOTS)
        for name, n in GROUPS.items():
            stacks = [torch.randn(SLOTS, n * R, K, device=dev, dtype=dt) / K**0.5 for _ in range(SETS)]
            scales = torch.rand(SLOTS, n * R, device=dev) + 0.5
            layers = [[a[:, j * R : (j + 1) * R] for j in range(n)] for a in stacks]  # each layer's view
            parts = [scales[:, j * R : (j + 1) * R] for j in range(n)]
            row = []
            for partials in (False, True):
                want = [T.shrink(x, layers[0][j], parts[j], segs, t, partials=partials).sum(0) for j in range(n)]
                got = T.shrink(x, stacks[0], scales, segs, t, partials=partials).sum(0)
                for j in range(n):
                    torch.testing.assert_close(got[:, j * R : (j + 1) * R], want[j][:, :R], rtol=1e-3, atol=1e-3)

                def separate(partials: bool = partials) -> None:
                    for views in layers:
                        for j, view in enumerate(views):
                            T.shrink(x, view, parts[j], segs, t, partials=partials)

                def stacked(partials: bool = partials) -> None:
                    for a in stacks:
                        T.shrink(x, a, scales, segs, t, partials=partials)

                row += [graph_us(separate, SETS), graph_us(stacked, SETS)]
            print(f"{m:6d} {name:8s} " + " ".join(f"{v:11.1f}" for v in row), flush=True)


if __name__ == "__main__":
    main()
