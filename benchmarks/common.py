"""Timing, environment and result-file helpers shared by the benchmark suites."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_ms(fn: Callable[[], Any], device: torch.device, *, repeat: int = 20, warmup: int = 3) -> float:
    """Median wall time of ``fn`` in ms over ``repeat`` runs after ``warmup``, device synced."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def h2d_gbps(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Measured pinned host -> device bandwidth (GB/s); 0 on CPU."""
    if device.type != "cuda":
        return 0.0
    host = torch.empty(nbytes, dtype=torch.uint8).pin_memory()
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    ms = median_ms(lambda: dev.copy_(host, non_blocking=True), device, repeat=10)
    return nbytes / ms / 1e6


def d2d_ms(nbytes: int, device: torch.device) -> float:
    """Median time of one device-to-device copy of ``nbytes``."""
    a = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    return median_ms(lambda: b.copy_(a), device, repeat=50)


def merge_results(path: Path, new: dict[str, Any]) -> dict[str, Any]:
    """Merges ``new`` into the JSON at ``path`` (nested dicts merged key by key)."""
    old = json.loads(path.read_text()) if path.exists() else {}

    def merge(a: dict, b: dict) -> dict:
        for k, v in b.items():
            a[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) else v
        return a

    merged = merge(old, new)
    path.write_text(json.dumps(merged, indent=1, sort_keys=True))
    return merged


def kernel_profile(fn: Callable[[], Any], calls: int = 5) -> dict[str, Any]:
    """What one call of ``fn`` runs on a CUDA device: kernels launched, their summed GPU time
    (µs) and the five kernels taking the most time (µs per call). Wall time well above the
    summed kernel time is host or launch overhead; more kernels or kernel time is the graph."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    per: dict[str, float] = {}
    for e in kernels:
        per[e.name] = per.get(e.name, 0.0) + e.device_time / calls
    top = sorted(per.items(), key=lambda kv: -kv[1])[:5]
    return {
        "kernels_per_call": len(kernels) / calls,
        "gpu_us_per_call": round(sum(per.values()), 1),
        "top_us": {name[:100]: round(us, 1) for name, us in top},
    }
