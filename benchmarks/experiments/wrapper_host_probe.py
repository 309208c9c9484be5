"""Probe: the host cost of a compiled wide LoRA layer in default mode, on a CPU box.

A stack of ``PROBE_LAYERS`` (200) biased ``nn.Linear(64, 64)`` layers, the base model against
the same with lorahot injected (wide layers, as on CUDA), 16 rows: the compute is negligible,
so a call's wall time is the compiled wrapper's host time (inductor, default mode, static
shapes). Prints the wrapper's first layers (what it calls per layer) and the median call time
of each model in three alternating rounds, with lorahot's extra per layer.

    PYTHONPATH=. python -m benchmarks.experiments.wrapper_host_probe
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn
from torch._inductor.utils import run_and_get_code

import lorahot
from lorahot.runtime import wide
from tests.helpers import make_adapter

LAYERS = int(os.environ.get("PROBE_LAYERS", "200"))


def median_us(fn: Callable[[torch.Tensor], object], x: torch.Tensor) -> float:
    with torch.no_grad():
        for _ in range(20):
            fn(x)
        times = []
        for _ in range(200):
            t = time.perf_counter()
            fn(x)
            times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e6


def main() -> None:
    wide.DEVICE_TYPES = {"cpu"}
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(64, 64) for _ in range(LAYERS)])
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, [str(i) for i in range(LAYERS)], max_rank=8)
    runtime.load(make_adapter(model, {str(i): 4 for i in range(LAYERS)}, seed=0)[0])
    x = torch.randn(16, 64)
    compiled_base, compiled = torch.compile(base), torch.compile(model)
    with torch.no_grad():
        _, code = run_and_get_code(compiled, x)
    call = code[0][code[0].index("def call(") :]
    lines = [ln for ln in call.splitlines()[3:] if ln.strip() and not ln.strip().startswith(("#", "del ", "assert_"))]
    print("lorahot's wrapper, first two layers:\n" + "\n".join(lines[:10]), flush=True)
    for _ in range(3):
        b, lo = median_us(compiled_base, x), median_us(compiled, x)
        print(f"base {b:.0f} us  lorahot {lo:.0f} us  (+{(lo - b) / LAYERS:.2f} us per layer)", flush=True)


if __name__ == "__main__":
    main()
