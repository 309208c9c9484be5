"""Probe: where ``runtime.set_scale([...])`` on a stacked slot spends its time on a GPU.

The stack suite measured 16 ms per re-weighting on an H200 (154 layers, four rank-16 parts),
where one copy of the per-row scales takes 0.012 ms and the same call takes 0.04 ms on a CPU.
Only the CUDA side differs, so this probe times the call and its pieces (the checks, the
scales upload, the wide rows' refresh), and lists the host functions (cProfile) and the CUDA
runtime calls and kernels (torch.profiler) of 20 calls.

    PYTHONPATH=. python3 -m benchmarks.experiments.reweight_probe      (PROBE_DEVICE=cpu: the 2-layer shape)
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import tempfile
from pathlib import Path

import torch

import lorahot
from benchmarks.common import median_ms, sync
from benchmarks.workload import MAX_RANK, TARGETS, build

WEIGHTS = ([0.8, 0.5, 0.3, 1.0], [0.2, 0.9, 0.6, 0.4])


def main() -> None:
    dev = torch.device(os.environ.get("PROBE_DEVICE", "cuda"))
    w = build(dev.type == "cpu", dev, Path(tempfile.mkdtemp(prefix="lorahot-reweight-")))
    model = w.fresh_base()
    runtime = lorahot.inject(model, TARGETS, max_rank=MAX_RANK, slots=2)
    runtime.load([w.adapters[16]] * 4, scale=WEIGHTS[0], slot=0)
    runtime.load(w.adapters[64], slot=1)
    print("active slot", runtime.active_slot, "wide layers", sum(1 for layer in runtime.layers.values() if layer.wide))
    turn = iter(range(1 << 30))

    def reweight(slot: int = 0) -> None:
        runtime.set_scale(list(WEIGHTS[next(turn) % 2]), slot=slot)

    stack = runtime._stacks[0]
    assert stack is not None
    scales = stack.scales(WEIGHTS[0])
    pieces = {
        "set_scale (slot 0)": lambda: reweight(0),
        "checks": lambda: runtime._check_set_scale(list(WEIGHTS[next(turn) % 2]), 0),
        "stack.scales": lambda: stack.scales(WEIGHTS[next(turn) % 2]),
        "buffers.set_scales": lambda: runtime.buffers.set_scales(0, scales, live=runtime.active_slot == 0),
        "wide.apply": lambda: runtime._wide.apply(stack, WEIGHTS[0]),
    }
    for name, fn in pieces.items():
        print(f"{name:22s} {median_ms(fn, dev, repeat=50):9.3f} ms", flush=True)
    runtime.activate(0)
    print(f"{'activate(0)':22s} {median_ms(lambda: runtime.activate(0), dev, repeat=50):9.3f} ms")
    print(f"{'set_scale (live)':22s} {median_ms(lambda: reweight(0), dev, repeat=50):9.3f} ms", flush=True)

    prof = cProfile.Profile()
    prof.enable()
    for _ in range(20):
        reweight(0)
    sync(dev)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(18)
    print(text.getvalue()[-4000:])

    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as p:
        for _ in range(20):
            reweight(0)
        sync(dev)
    print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60))


if __name__ == "__main__":
    main()
