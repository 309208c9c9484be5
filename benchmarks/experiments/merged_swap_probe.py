"""Probe: where a merged-mode swap's time goes on the SDXL UNet (uncompiled; no compile to wait for).

The diffusion suite's merged swap from file read 94.7 ms on 2026-12-01 and 290 ms on 2026-12-03
(``runs/20261203T230334-diffusion.json``). Since then merged mode gained checks of the base
weights: each rewrite records per layer a probe and the weight's row and column sums
(``lorahot.runtime.merge.record``), and each call compares them (``Merger.check_base``). This
probe times, on the GPU, a whole merged swap (from file and from the host cache), then each part
alone: the record of all weights, the check, the rewrite (``Merger.apply``), and counts the
kernels of each with the profiler.

    PYTHONPATH=. python3 -m benchmarks.experiments.merged_swap_probe
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch

import lorahot
from benchmarks import diffusion


def _ms(fn: Callable[[], object], n: int = 5) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _kernels(fn: Callable[[], object]) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(e.count for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA)


def main() -> None:
    device = torch.device("cuda")
    w = diffusion.build(tiny=False, device=device)
    model = w.fresh_model()
    fam = diffusion.FAMILIES[w.family]
    runtime = lorahot.inject(model, fam.targets, max_rank=diffusion.MAX_RANK, merged=True)
    merger = runtime._merger
    assert merger is not None
    files = {a: str(w.file(a)) for a in ("A", "B")}
    runtime.load(files["A"])
    flip = iter(["B", "A"] * 50)
    rows = {
        "swap from file": lambda: runtime.load(files[next(flip)]),
    }
    for a in ("A", "B"):
        runtime.preload(files[a], key=a)
    rows["swap from host cache"] = lambda: runtime.load(next(flip))
    rows["record_all (probes, row/column sums)"] = merger.record_all
    rows["check_base (read back, compare)"] = merger.check_base
    rows["remerge (apply + fold, no record)"] = lambda: runtime._remerge(runtime.active_slot)
    print(f"{'part':40s} {'ms':>9s} {'kernels':>8s}", flush=True)
    for name, fn in rows.items():
        try:
            fn()
            ms = _ms(fn)
            kernels = _kernels(fn)
        except Exception as exc:  # a part whose signature moved: say so, time the rest
            print(f"{name:40s} failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        print(f"{name:40s} {ms:9.2f} {kernels:8d}", flush=True)


if __name__ == "__main__":
    main()
