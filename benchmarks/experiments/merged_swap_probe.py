"""Probe: where a merged-mode swap's time goes on the SDXL UNet (uncompiled; no compile to wait for).

The diffusion suite's merged swap from file read 94.7 ms on 2026-12-01 and 290 ms on 2026-12-03
(``runs/20261203T230334-diffusion.json``). Since then merged mode gained checks of the base
weights: each rewrite records per layer a probe and the weight's row and column sums
(``lorahot.runtime.merge.record``), and each call compares them (``Merger.check_base``). This
probe times, on the GPU, a whole merged swap (from file and from the host cache), then each part
alone: the record of all weights, the check, the rewrite (``Merger.apply``), the signature of
the weights each of the first two computes, and the device steps of the record and the check
alone (a CUDA graph replay once captured); the profiler counts each part's kernels and sums
their time.

    PYTHONPATH=. python3 -m benchmarks.experiments.merged_swap_probe
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable

import torch

import lorahot
from benchmarks import diffusion
from lorahot.runtime import written_probes


def _ms(fn: Callable[[], object], n: int = 5) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def _kernels(fn: Callable[[], object]) -> tuple[int, float]:
    """Kernels ``fn`` runs on the device, and their summed time in ms (the profiler's)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.count for e in events), sum(e.self_device_time_total for e in events) / 1e3


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
    rows: dict[str, Callable[[], object]] = {
        "swap from file": lambda: runtime.load(files[next(flip)]),
    }
    for a in ("A", "B"):
        runtime.preload(files[a], key=a)
    rows["swap from host cache"] = lambda: runtime.load(next(flip))
    rows["record_all (probes, row/column sums)"] = merger.record_all
    rows["check_base (read back, compare)"] = merger.check_base
    rows["remerge (apply + fold + record)"] = lambda: runtime._remerge(runtime.active_slot)
    layers = list(merger._layers.values())
    rows["signature of the weights (host)"] = lambda: written_probes.signature(layers)
    probes = merger._probes
    if probes is not None:  # the layout's device steps alone (a graph replay once captured)
        for d in probes._devices:
            summer = d.word_sums
            print(
                f"one-launch sums on {d.then.device}: {len(d.summed)} of {len(d.layers)} layers"
                + ("" if summer is None else f", {summer.programs} items, aligned {summer.aligned}"),
                flush=True,
            )
            rows["record's device steps"] = functools.partial(
                probes._run, "record", d, functools.partial(d.write, d.then, d.then_probes)
            )
            rows["check's device steps, sums"] = functools.partial(
                probes._run, "check", d, functools.partial(d.compare, True)
            )
            rows["check's device steps, no sums"] = functools.partial(
                probes._run, "check samples", d, functools.partial(d.compare, False)
            )
    print(f"{'part':40s} {'ms':>9s} {'kernels':>8s} {'GPU ms':>8s}", flush=True)
    for name, fn in rows.items():
        try:
            fn()
            ms = _ms(fn)
            kernels, gpu = _kernels(fn)
        except Exception as exc:  # a part whose signature moved: say so, time the rest
            print(f"{name:40s} failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        print(f"{name:40s} {ms:9.2f} {kernels:8d} {gpu:8.2f}", flush=True)
    if probes is not None:
        print(f"graph replays of the probes: {probes._replays.replays}", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            rows["record's device steps"]()
            torch.cuda.synchronize()
        events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
        print("record's device steps, the kernels that take most time:", flush=True)
        for e in sorted(events, key=lambda e: -e.self_device_time_total)[:6]:
            print(f"  {e.count:6d} x {e.self_device_time_total / max(e.count, 1):8.2f} us  {e.key[:90]}", flush=True)
    merger_replays = merger._replays.replays
    print(f"graph replays of the rewrite: {merger_replays}", flush=True)


if __name__ == "__main__":
    main()
