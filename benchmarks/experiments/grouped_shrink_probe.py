"""Probe (run; not built): the routed prefill's shrink as one grouped cuBLAS GEMM (``torch._grouped_mm``).

The routed prefill (8 sequences of 256 tokens over 8 adapters) runs cuBLAS's base GEMM, then
the segmented pair of :mod:`lorahot.kernels.triton_routed_lora`. Its shrink alone measured
13.7-17.9 us per layer on an H200 (eighteenth session), where reading ``x`` once takes 2.7-7.7
us: the shrink is the part of the pair furthest from its bytes. PyTorch's grouped GEMM takes a
2-D ``x`` whose rows are cut into groups by ``offs`` and a 3-D stack of weights, one per group:
exactly a shrink over rows grouped by slot. Per TinyLlama input width (2048 for q/k/v/o and
gate/up, 5632 for down), ``PROBE_M`` rows (2048) in entries of ``PROBE_T`` (256), 8 slots of
rank 64, bf16, in a CUDA graph over 22 weight sets, us per call:

- ``seg partials``: the segmented shrink as the pair runs it (K's shares in their own buffers);
- ``seg atomic``: the segmented shrink into a zeroed buffer (a zero fill, then atomic shares);
- ``grouped``: ``torch._grouped_mm(x, A.transpose(1, 2), offs)`` with the rows already in slot
  order (one entry per slot here), bf16 out, unscaled;
- ``grouped+gather``: each routing entry its own group, its slot's A gathered first
  (``index_select``, one launch more): the form for any routing without moving ``x``'s rows;
- ``dense 8R``: one GEMM of ``x`` against every slot's A (``[M, 8 R]``: eight times the
  arithmetic, each row then reading its own slot's columns);
- ``x bytes``: reading ``x`` once at 3.0 TB/s (computed, not timed).

Each form is checked against a float32 reference on the first weight set first.

Measured on an H200 (torch 2.11, ``runs/20261203T105304-grouped-shrink-probe.log``), us per
call, seg partials / seg atomic / grouped / grouped+gather / dense 8R (x bytes): in 2048
7.8 / 13.7 / 14.6 / 21.8 / 9.1 (2.8); in 5632 11.8 / 17.0 / 24.8 / 38.1 / 20.8 (7.7). The
grouped GEMM loses to the segmented shrink the pair runs (its K in shares, no atomics) by 1.9-2.1x,
so it is not built. The 13.7-17.9 us read earlier as the routed prefill's shrink was the atomic
form (the fused path's); the pair's is 7.8-11.8 us, 1.5-2.8x its bytes.

    PYTHONPATH=. python3 -m benchmarks.experiments.grouped_shrink_probe
"""

from __future__ import annotations

import os

import torch

from benchmarks.experiments.forward_probe import graph_us
from lorahot.kernels import routed_lora
from lorahot.kernels import triton_routed_lora as T

M, T_ROWS = int(os.environ.get("PROBE_M", "2048")), int(os.environ.get("PROBE_T", "256"))
SETS, SLOTS, R = 22, 8, 64
WIDTHS = {"q/k/v/o, gate/up (in 2048)": 2048, "down (in 5632)": 5632}


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    entries = M // T_ROWS
    route = torch.tensor([i % SLOTS for i in range(entries)], device=dev)
    segs = routed_lora.segments(route, SLOTS)
    ends = torch.arange(1, entries + 1, device=dev, dtype=torch.int32) * T_ROWS
    print(f"{M} rows, {T_ROWS} per routing entry, {SLOTS} slots, rank {R}, us per call")
    head = ["seg partials", "seg atomic", "grouped", "grouped+gather", "dense 8R", "x bytes"]
    print(f"{'input width':28s} " + " ".join(f"{h:>15s}" for h in head))
    for name, k in WIDTHS.items():
        x = torch.randn(M, k, device=dev, dtype=dt)
        a = [torch.randn(SLOTS, R, k, device=dev, dtype=dt) / k**0.5 for _ in range(SETS)]
        s = torch.full((SLOTS, R), 0.5, device=dev)
        want = torch.cat(
            [x[i * T_ROWS : (i + 1) * T_ROWS].float() @ a[0][int(route[i])].float().T for i in range(entries)]
        )
        checks = {
            "seg partials": T.shrink(x, a[0], s, segs, T_ROWS, partials=True).sum(0)[:, :R] / 0.5,
            "seg atomic": T.shrink(x, a[0], s, segs, T_ROWS)[0, :, :R] / 0.5,
            "grouped": torch._grouped_mm(x, a[0].transpose(1, 2), offs=ends).float(),
            "grouped+gather": torch._grouped_mm(x, a[0].index_select(0, route).transpose(1, 2), offs=ends).float(),
        }
        for form, got in checks.items():
            err = ((got - want).abs().max() / want.abs().max()).item()
            if err > 2e-2:
                print(f"  {name} {form}: relative error {err:.3g} against float32")

        def seg_partials() -> None:
            for ai in a:
                T.shrink(x, ai, s, segs, T_ROWS, partials=True)

        def seg_atomic() -> None:
            for ai in a:
                T.shrink(x, ai, s, segs, T_ROWS)

        def grouped() -> None:
            for ai in a:
                torch._grouped_mm(x, ai.transpose(1, 2), offs=ends)

        def grouped_gather() -> None:
            for ai in a:
                torch._grouped_mm(x, ai.index_select(0, route).transpose(1, 2), offs=ends)

        stacked = [ai.view(SLOTS * R, k) for ai in a]

        def dense() -> None:
            for ai in stacked:
                torch.mm(x, ai.T)

        row = [graph_us(f, SETS) for f in (seg_partials, seg_atomic, grouped, grouped_gather, dense)]
        row.append(x.numel() * x.element_size() / 3.0e12 * 1e6)
        print(f"{name:28s} " + " ".join(f"{v:15.1f}" for v in row), flush=True)


if __name__ == "__main__":
    main()
