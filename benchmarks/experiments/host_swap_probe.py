"""Probe: where a swap from the host cache spends its time, load by load, on the GPU.

The swap suite's r8 swap from the host cache (``runtime.load(prepared)``) reads 0.39-0.41 ms in
most runs and 0.58-0.62 ms in about one run of three, against a floor of 0.23 ms (one pinned
copy of the same bytes); each run is its own process and its figure a median of 20 loads
(``benchmarks/README.md``, "Fourteenth session"). A median that moves by 0.2 ms between
processes is a shift of every load, not a few slow ones, so this probe times each load's parts
separately and prints their spread:

- ``host``: from the call until ``load`` returns (the checks, the upload and the writes issued);
- ``device``: from the return until the device is done (what the host did not overlap);
- ``total``: the two together, what the swap suite's median takes per load;
- ``gpu``: CUDA events around the call, the device's span from the first operation it queued;
- the floor, timed the same way: one pinned copy of the pack's bytes.

The swap suite's workload (TinyLlama shape, 154 layers, ``max_rank`` 64), its adapters of ranks
16, 64 and 8 loaded once from file first, as the suite does. ``PROBE_LOADS`` loads per rank (200)
and ``PROBE_RANKS`` (``8``). ``PROBE_PROFILE=1`` then profiles the loads on the host: cProfile's
functions by their own time, and the profiler's operators by their own host time. Run it in a
few processes to compare them:

    PYTHONPATH=. python3 -m benchmarks.experiments.host_swap_probe
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable

import torch

import lorahot
from benchmarks.common import pinned_core
from benchmarks.workload import MAX_RANK, TARGETS, build


def spread(values: list[float]) -> str:
    """p10 / median / p90 / max of ``values`` (ms)."""
    ordered = sorted(values)
    pick = [ordered[int(q * (len(ordered) - 1))] for q in (0.1, 0.5, 0.9)]
    return " / ".join(f"{v:.3f}" for v in (*pick, ordered[-1]))


def timed(fn: Callable[[], object], loads: int, device: torch.device) -> dict[str, list[float]]:
    """Per call of ``fn``: host, device, total and GPU-event times in ms (after 5 warm-up calls)."""
    cuda = device.type == "cuda"
    for _ in range(5):
        fn()
    if cuda:
        torch.cuda.synchronize(device)
    parts: dict[str, list[float]] = {"host": [], "device": [], "total": [], "gpu": []}
    for _ in range(loads):
        start = torch.cuda.Event(enable_timing=True) if cuda else None
        end = torch.cuda.Event(enable_timing=True) if cuda else None
        t0 = time.perf_counter()
        if start is not None:
            start.record()
        fn()
        if end is not None:
            end.record()
        t1 = time.perf_counter()
        if cuda:
            torch.cuda.synchronize(device)
        t2 = time.perf_counter()
        parts["host"].append((t1 - t0) * 1e3)
        parts["device"].append((t2 - t1) * 1e3)
        parts["total"].append((t2 - t0) * 1e3)
        if start is not None and end is not None:
            parts["gpu"].append(start.elapsed_time(end))
    return parts


def main() -> None:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    core = pinned_core()  # LORAHOT_BENCH_CORE: is the host's spread between processes the scheduler's?
    loads = int(os.environ.get("PROBE_LOADS", "200"))
    ranks = [int(r) for r in os.environ.get("PROBE_RANKS", "8").split(",")]
    w = build(small=device.type != "cuda", device=device)
    runtime = lorahot.inject(w.fresh_base(), TARGETS, max_rank=MAX_RANK)
    for rank in (16, 64, 8):  # as the swap suite: each from file once
        runtime.load(w.adapters[rank])
    print(
        f"{device}, torch {torch.__version__}, {len(runtime.layers)} layers, {loads} loads per figure"
        + ("" if core is None else f", pinned to core {core}")
    )
    print("ms: p10 / median / p90 / max")
    for rank in ranks:
        prepared = runtime.preload(w.adapters[rank])
        data = prepared.packs[0].data
        dst = torch.empty(data.numel(), dtype=torch.uint8, device=device)
        floor = timed(lambda: dst.copy_(data, non_blocking=True), loads, device)
        ours = timed(lambda: runtime.load(prepared), loads, device)
        replays = getattr(getattr(runtime, "_load_replay", None), "replays", None)
        print(f"r{rank}: {data.numel() / 1e6:.1f} MB pinned={data.is_pinned()}, graph replays {replays}")
        for part in ("host", "device", "total", "gpu"):
            if ours[part]:
                print(f"  {part:7s} load {spread(ours[part]):>36s}   floor {spread(floor[part]):>36s}")
        print(f"  median total over floor: {statistics.median(ours['total']) / statistics.median(floor['total']):.2f}x")
        if os.environ.get("PROBE_PROFILE"):
            profile(lambda: runtime.load(prepared), loads, device)


def profile(fn: Callable[[], object], loads: int, device: torch.device) -> None:
    """Prints where ``loads`` calls of ``fn`` spend host time: cProfile's top functions by their
    own time, then the profiler's operators by their own host time (per call, us)."""
    import cProfile
    import pstats

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(loads):
        fn()
    prof.disable()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    with torch_profile(activities=[ProfilerActivity.CPU]) as trace:
        for _ in range(loads):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    for event in sorted(trace.key_averages(), key=lambda e: -e.self_cpu_time_total)[:15]:
        print(
            f"  {event.key[:48]:48s} {event.count / loads:5.1f} calls {event.self_cpu_time_total / loads:8.1f} us self"
        )


if __name__ == "__main__":
    main()
