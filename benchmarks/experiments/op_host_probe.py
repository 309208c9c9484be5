"""Probe: what a LoRA layer costs the host per call in a compiled model in default mode.

In default mode (no CUDA graphs) every call of a compiled model runs its wrapper code on the
host: one call into each opaque operator per LoRA layer, besides the launches. This probe
measures that host cost on the CPU, where the arithmetic of 100 layers of width 16 at one row
is negligible: the median time of one call of the compiled model, divided by the layers, for

- ``base``: the model without LoRA;
- ``library``: LoRA with ``fused=False`` (two small products and an add, compiled);
- ``wide``: the wide layers (widened on the CPU for the probe), one ``lorahot::wide_linear``
  call per layer.

On the CPU box (2 cores, torch 2.13.0+cpu, one thread), 2026-11-30: base 1.7 us per layer,
library 3.0, wide 16.6 with the op registered through ``torch.library.custom_op``, 12.4
through :mod:`lorahot.kernels.op_registry`, 11.0-11.2 with its body's slices as ``narrow``.

    PYTHONPATH=. python3 -m benchmarks.experiments.op_host_probe
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import lorahot
from lorahot.runtime import wide

LAYERS, WIDTH, RANK = 100, 16, 8


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)]).eval()


def _adapter() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    out = {}
    for i in range(LAYERS):
        out[f"{i}.lora_A.weight"] = torch.randn(RANK, WIDTH, generator=g) * 0.1
        out[f"{i}.lora_B.weight"] = torch.randn(WIDTH, RANK, generator=g) * 0.1
    return out


def _us_per_call(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, n: int = 300) -> float:
    with torch.no_grad():
        for _ in range(20):
            f(x)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            f(x)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main() -> None:
    torch.set_num_threads(1)
    wide.DEVICE_TYPES = {"cpu", "cuda"}  # widen the CPU layers, as the tests do
    x = torch.randn(1, WIDTH)
    results = {"base": _us_per_call(torch.compile(_model()), x)}
    torch._dynamo.reset()
    for name, kwargs in (("library", {"fused": False}), ("wide", {})):
        model = _model()
        runtime = lorahot.inject(model, [str(i) for i in range(LAYERS)], max_rank=RANK, **kwargs)
        runtime.load(_adapter())
        assert model[0].wide == (name == "wide")
        results[name] = _us_per_call(torch.compile(model), x)
        torch._dynamo.reset()
    for name, us in results.items():
        print(f"{name:8s} {us:8.1f} us per call  {us / LAYERS:6.2f} us per layer", flush=True)


if __name__ == "__main__":
    main()
