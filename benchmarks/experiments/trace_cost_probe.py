"""Probe: what LoRA layers cost the compiler, on a CPU box.

A stack of ``PROBE_LAYERS`` (200) ``nn.Linear(64, 64)`` layers, the base model against the same
model with lorahot injected (wide layers, as on CUDA; ``PROBE_FUSED=1`` also marks them fused,
the fused operator's library formula standing in for the kernel, as the CPU tests do), one
input of ``PROBE_ROWS`` rows (16; 300 with ``PROBE_FUSED=1``, above the fused kernel's limits:
the checks a fused layer traces, then the wide path; below them the stand-in formula would be
traced and compiled, where on CUDA the fused path is one opaque operator), static shapes. For each backend (``eager``: dynamo alone;
``aot_eager``: with AOTAutograd; ``inductor``), the first compiled call's seconds, the best of
``PROBE_REPEAT`` (2) runs, compile caches off. Noisy on a 2-core box: compare in alternating
runs.

    PYTHONPATH=. python -m benchmarks.experiments.trace_cost_probe
"""

from __future__ import annotations

import copy
import os
import time

os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch
from torch import nn

import lorahot
from lorahot.kernels import lora_linear as fused_kernel
from lorahot.kernels import routed_lora
from lorahot.runtime import wide
from tests.helpers import make_adapter

LAYERS = int(os.environ.get("PROBE_LAYERS", "200"))
FUSED = os.environ.get("PROBE_FUSED") == "1"
ROWS = int(os.environ.get("PROBE_ROWS", "300" if FUSED else "16"))
REPEAT = int(os.environ.get("PROBE_REPEAT", "2"))


def first_call_s(model: nn.Module, x: torch.Tensor, backend: str) -> float:
    best = float("inf")
    for _ in range(REPEAT):
        torch._dynamo.reset()
        compiled = torch.compile(model, backend=backend, dynamic=False)
        t = time.perf_counter()
        with torch.no_grad():
            compiled(x)
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    wide.DEVICE_TYPES = {"cpu"}
    if FUSED:
        fused_kernel.supports = lambda base, a: True  # type: ignore[assignment]
        routed_lora.available = lambda: True  # type: ignore[assignment]

        def formula(x, w, bias, a, bt, s):  # type: ignore[no-untyped-def]
            return torch.nn.functional.linear(x, w, bias) + ((x @ a.t()) * s).to(x.dtype) @ bt

        fused_kernel.lora_linear = formula  # type: ignore[assignment]
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(64, 64) for _ in range(LAYERS)])
    model = copy.deepcopy(base)
    runtime = lorahot.inject(model, [str(i) for i in range(LAYERS)], max_rank=8)
    runtime.load(make_adapter(model, {str(i): 4 for i in range(LAYERS)}, seed=0)[0])
    layer = runtime.layers["0"]
    print(f"{LAYERS} layers, {ROWS} rows, wide {layer.wide}, fused {bool(layer._plan[1])}", flush=True)
    x = torch.randn(ROWS, 64)
    for backend in ("eager", "aot_eager", "inductor"):
        b, lo = first_call_s(base, x, backend), first_call_s(model, x, backend)
        print(
            f"{backend:10s} base {b:6.2f} s  lorahot {lo:6.2f} s  (+{(lo - b) / LAYERS * 1e3:.1f} ms per layer)",
            flush=True,
        )


if __name__ == "__main__":
    main()
