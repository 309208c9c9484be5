"""Probe: where merged mode's extra wall time per compiled UNet step goes, outside the graph.

Under reduce-overhead the diffusion suite's merged UNet read 1.06-1.11x the base's step time
in every round (``runs/20261204T092030-diffusion.json``) with the base's 1,738 kernels, its GPU
time and a compiled call's profiler span within 0.3% of the base's: the difference lies
outside the compiled call. This probe splits a step's host side, in one process, for the base
model, lorahot merged and lorahot unmerged (the SDXL UNet, bf16, adapter ``A`` loaded):

- ``dynamo``: each compiled with a backend that returns its first output without running
  anything (dynamo's frame evaluation, guards and the call path alone), called as the suite's
  stepper calls it (``torch.inference_mode()``), in interleaved rounds; with the garbage
  collector on and then off. The models share one code object, each with a cache entry of
  its own, so a second base model compiled last shows what the order costs;
- ``reduce-overhead`` (``PROBE_PART=dr``): base and merged compiled as the suite compiles them,
  synced step time and host time per call (not synced), interleaved rounds.

    PYTHONPATH=. python3 -m benchmarks.experiments.merged_host_probe
    PROBE_TINY=1 PYTHONPATH=. python3 -m benchmarks.experiments.merged_host_probe   # the CPU smoke test
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import lorahot
from benchmarks import diffusion


def _constant(gm: torch.fx.GraphModule, example: list[Any]) -> Callable[..., Any]:
    out = gm(*example)
    return lambda *args: out


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _per_call_ms(step: Callable[[], Any], n: int, sync: bool) -> float:
    _sync()
    t = time.perf_counter()
    for _ in range(n):
        step()
        if sync:
            _sync()
    host = time.perf_counter() - t
    _sync()
    return host / n * 1e3


def _rounds(steps: dict[str, Callable[[], Any]], n: int, rounds: int, sync: bool) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            times[name].append(_per_call_ms(step, n, sync))
    return {name: statistics.median(t) for name, t in times.items()}


def _stepper(model: Callable[..., Any], inputs: dict[str, Any]) -> Callable[[], Any]:
    def step() -> Any:
        with torch.inference_mode():
            return model(**inputs)

    return step


def _models(w: diffusion.DiffusionWorkload, kinds: list[str]) -> dict[str, torch.nn.Module]:
    fam = diffusion.FAMILIES[w.family]
    models = {}
    for kind in kinds:
        model = w.fresh_model()
        if kind != "base":
            runtime = lorahot.inject(model, fam.targets, max_rank=diffusion.MAX_RANK, merged=kind == "merged")
            runtime.load(str(w.file("A")))
            model._probe_runtime = runtime  # type: ignore[assignment]  # kept alive with the model
        models[kind] = model
    return models


def main() -> None:
    part = os.environ.get("PROBE_PART", "d")
    tiny = os.environ.get("PROBE_TINY") == "1"  # a smoke test on the CPU
    w = diffusion.build(tiny=tiny, device=torch.device("cpu" if tiny else "cuda"))
    if "d" in part:
        models = _models(w, os.environ.get("PROBE_KINDS", "base,merged,unmerged").split(","))
        models["base, compiled last"] = _models(w, ["base"])["base"]
        torch._dynamo.reset()
        steps = {}
        for kind, model in models.items():  # one code object, one cache entry per model: the order is shown
            t = time.perf_counter()
            steps[kind] = _stepper(torch.compile(model, backend=_constant), w.inputs)
            steps[kind]()
            print(f"[dynamo] {kind}: traced in {time.perf_counter() - t:.1f} s", flush=True)
        for label, collect in (("gc on", True), ("gc off", False)):
            (gc.enable if collect else gc.disable)()
            ms = _rounds(steps, n=30, rounds=7, sync=True)
            print(f"[dynamo, {label}] ms per call: " + "  ".join(f"{k} {v:.3f}" for k, v in ms.items()), flush=True)
        gc.enable()
        print(f"[objects] gc tracks {len(gc.get_objects())} objects", flush=True)
        del steps, models
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if "r" in part:
        models = _models(w, ["base", "merged"])
        steps = {}
        for kind, model in models.items():
            t = time.perf_counter()
            steps[kind] = _stepper(torch.compile(model, mode="reduce-overhead"), w.inputs)
            for _ in range(3):
                steps[kind]()
            _sync()
            print(f"[reduce-overhead] {kind}: compiled in {time.perf_counter() - t:.1f} s", flush=True)
        for sync in (True, False):
            ms = _rounds(steps, n=20, rounds=5, sync=sync)
            label = "synced step" if sync else "host per call, not synced"
            print(f"[reduce-overhead, {label}] ms: " + "  ".join(f"{k} {v:.3f}" for k, v in ms.items()), flush=True)


if __name__ == "__main__":
    main()
