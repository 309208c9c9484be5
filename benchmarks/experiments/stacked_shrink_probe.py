"""Probe: would one routed shrink for the layers that share an input pay?

A routed layer's first kernel is the segmented shrink (:func:`lorahot.kernels.triton_routed_lora.shrink`):
each row's ``s_k * (x @ A_k.T)`` with its own slot ``k``. q, k and v read the same input, and so
do gate and up; the arena keeps neighbouring layers' A rows contiguous (the single-adapter
path's stacked shrinks rely on it), so their A's are one ``[slots, n * R, in]`` view and their
scales one ``[slots, n * R]``. One shrink over the stack would read ``x`` once and launch once,
where the layers now launch ``n`` shrinks: 3 + 2 kernel nodes per block become 2. In a replayed
graph each node of a chain costs the device about 0.9 us (0.6 with early launches) besides its
work, and the driver's launch of the replay does not grow with the nodes
(``graph_launch_probe``, ``runs/20261201T154143-graph-launch-probe.log``); at prefill each shrink
is 7.6-11.7 us against 2.7 us of bytes for ``x``.

Per group (q/k/v: 3 layers, gate/up: 2; ``in`` 2048, rank 64, ``slots`` 8), ``PROBE_CASES`` rows
and rows per routing entry (``64:1,2048:256``), over 8 distinct adapters, in a CUDA graph over 22
weight sets, us per group:

- ``ws sep``: what the layers run now at decode: one atomic shrink per layer into the runtime's
  persistent zeroed workspace (no fill of its own; the fused kernel's split-K sum zeroes it);
- ``fill stk``: one atomic shrink over the stack into a fresh workspace, with its zero fill
  (two kernels per group: the form that needs no state between kernels);
- ``ws stk``: one atomic shrink over the stack into a persistent workspace (no fill: each
  layer's kernels would then zero their own columns);
- ``part sep`` / ``part stk``: the segmented pair's shrink (each share of K written apart, no
  fill), one per layer against one over the stack.

The first session's run of this probe (``runs/20261201T154128-stacked-shrink-probe.log``) timed
the separate atomic shrinks with a zero fill each, which the layers do not run. A cell whose
kernel does not fit the GPU's shared memory (the stacked rank padded to 256 with the prefill's
tiles) reads ``oor``. The stacked results are checked against the separate ones first. Not built
into the layers; this says whether to.

    PYTHONPATH=. python3 -m benchmarks.experiments.stacked_shrink_probe
"""

from __future__ import annotations

import contextlib
import os

import torch
from triton.runtime.errors import OutOfResources

from benchmarks.experiments.forward_probe import graph_us
from lorahot.kernels import routed_lora
from lorahot.kernels import triton_routed_lora as T

GROUPS = {"q/k/v": 3, "gate/up": 2}
SETS, SLOTS, R, K = 22, 8, 64, 2048
CASES = [(int(m), int(t)) for m, t in (c.split(":") for c in os.environ.get("PROBE_CASES", "64:1,2048:256").split(","))]


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(f"in {K}, rank {R}, {SLOTS} slots, 8 distinct adapters, us per group")
    heads = ("ws sep", "fill stk", "ws stk", "part sep", "part stk")
    print(f"{'rows':>6s} {'group':8s} " + " ".join(f"{h:>9s}" for h in heads))
    for m, t in CASES:
        x = torch.randn(m, K, device=dev, dtype=dt)
        route = torch.tensor([i % 8 for i in range(m // t)], device=dev)
        segs = routed_lora.segments(route, SLOTS)
        for name, n in GROUPS.items():
            stacks = [torch.randn(SLOTS, n * R, K, device=dev, dtype=dt) / K**0.5 for _ in range(SETS)]
            scales = torch.rand(SLOTS, n * R, device=dev) + 0.5
            layers = [[a[:, j * R : (j + 1) * R] for j in range(n)] for a in stacks]  # each layer's view
            parts = [scales[:, j * R : (j + 1) * R] for j in range(n)]
            ws = torch.zeros(m * T.rank_pad(n * R), device=dev)  # big enough for the stack, so for a layer

            def check(partials: bool) -> None:
                want = [T.shrink(x, layers[0][j], parts[j], segs, t, partials=partials).sum(0) for j in range(n)]
                got = T.shrink(x, stacks[0], scales, segs, t, partials=partials).sum(0)
                for j in range(n):
                    torch.testing.assert_close(got[:, j * R : (j + 1) * R], want[j][:, :R], rtol=1e-3, atol=1e-3)

            def ws_sep() -> None:
                for views in layers:
                    for j, view in enumerate(views):
                        T.shrink(x, view, parts[j], segs, t, workspace=ws)

            def fill_stk() -> None:
                for a in stacks:
                    T.shrink(x, a, scales, segs, t)

            def ws_stk() -> None:
                for a in stacks:
                    T.shrink(x, a, scales, segs, t, workspace=ws)

            def part_sep() -> None:
                for views in layers:
                    for j, view in enumerate(views):
                        T.shrink(x, view, parts[j], segs, t, partials=True)

            def part_stk() -> None:
                for a in stacks:
                    T.shrink(x, a, scales, segs, t, partials=True)

            cells = []
            for partials, fns in ((False, (ws_sep, fill_stk, ws_stk)), (True, (part_sep, part_stk))):
                with contextlib.suppress(OutOfResources):  # the stacked kernel: its cell says so below
                    check(partials)
                for fn in fns:
                    try:
                        cells.append(f"{graph_us(fn, SETS):9.1f}")
                    except OutOfResources:
                        cells.append(f"{'oor':>9s}")
                    ws.zero_()
            print(f"{m:6d} {name:8s} " + " ".join(cells), flush=True)


if __name__ == "__main__":
    main()
