"""Timing, environment and result-file helpers shared by the benchmark suites."""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).parent / "results"
#: The configurations the performance issue names in ``latest.json``'s ``forward_rows_ms`` rows
#: and ``compile_s`` entries: those dicts hold exactly these keys (suites outside the project
#: read them as written); every other configuration a run times goes to a sibling field.
ROW_CONFIGS = ("base", "lorahot", "lorahot_merged", "peft_bf16")
COMPILE_CONFIGS = ("base", "lorahot")


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


def paired_ms(
    calls: dict[str, tuple[Callable[[], Any] | None, Callable[[], Any]]],
    device: torch.device,
    *,
    repeat: int = 20,
    warmup: int = 2,
) -> dict[str, float]:
    """Median wall time in ms of each ``calls[key] = (setup, fn)``, the configurations taken in
    turn call by call (``setup`` untimed before each call, then ``fn`` timed between two device
    syncs), the order rotated each repeat.

    A synced call at decode sizes is mostly the host's part, which drifts by tenths of a
    millisecond within one process (round medians of the same graph 1.71-2.08 ms,
    ``results/runs/20261201T155131-rows.json``). Configurations timed one block after another
    each catch a different stretch of that drift; taken in turn, every configuration sees the
    same stretches, so their ratio keeps the host work each adds and loses the drift. Each
    configuration is called ``warmup`` times in turn first."""
    keys = list(calls)
    times: dict[str, list[float]] = {k: [] for k in keys}
    for i in range(warmup + repeat):
        for k in keys[i % len(keys) :] + keys[: i % len(keys)]:
            setup, fn = calls[k]
            if setup is not None:
                setup()
            sync(device)
            t = time.perf_counter()
            fn()
            sync(device)
            if i >= warmup:
                times[k].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def pipelined_ms(fn: Callable[[], Any], device: torch.device, *, calls: int = 50) -> float:
    """Time per call of ``calls`` calls issued back to back, one sync at the end: the device's
    time when the host keeps ahead of it (with CUDA graphs, without the host's launch of each
    replay, which a synced call waits for: see ``experiments/mixed_profile_probe.py``)."""
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    sync(device)
    return (time.perf_counter() - t) * 1e3 / calls


def host_ms(fn: Callable[[], Any], device: torch.device, *, calls: int = 30) -> float:
    """Median time until a call of ``fn`` returns, each after a sync: the host's part of a
    synced call (with CUDA graphs, its checks and the replay's launch), which differs between
    processes on the same machine by up to 2x (``experiments/host_swap_probe.py``)."""
    fn()
    times = []
    for _ in range(calls):
        sync(device)
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    sync(device)
    return statistics.median(times)


def pinned_core() -> int | None:
    """Pins the calling thread to the core ``LORAHOT_BENCH_CORE`` names, where set (so that
    processes timed one after another run their host part on the same core); returns it."""
    core = os.environ.get("LORAHOT_BENCH_CORE")
    if core is None or not hasattr(os, "sched_setaffinity"):
        return None
    os.sched_setaffinity(0, {int(core)})
    return int(core)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def commit() -> str | None:
    """The code a run measured: ``LORAHOT_COMMIT`` (``device_run.sh`` sets it from the archive a
    device call unpacks, which has no ``.git``), else ``git rev-parse --short HEAD``, else None."""
    named = os.environ.get("LORAHOT_COMMIT")
    if named:
        return named
    import subprocess

    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


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


def split_fields(figures: dict[str, Any], keys: tuple[str, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``figures`` as two dicts: the entries under ``keys`` (in that order), and the rest."""
    return {k: figures[k] for k in keys if k in figures}, {k: v for k, v in figures.items() if k not in keys}


def merge_results(path: Path, new: dict[str, Any]) -> dict[str, Any]:
    """Merges ``new`` into the JSON at ``path`` (nested dicts merged key by key), except that a
    run's own record (a key ending in ``_run``: its command, commit, device, date) replaces the one
    before whole, so no field of an older run survives under a newer run's name."""
    old = json.loads(path.read_text()) if path.exists() else {}

    def merge(a: dict, b: dict) -> dict:
        for k, v in b.items():
            whole = k.endswith("_run")
            a[k] = merge(a[k], v) if isinstance(v, dict) and isinstance(a.get(k), dict) and not whole else v
        return a

    merged = merge(old, new)
    path.write_text(json.dumps(merged, indent=1, sort_keys=True))
    return merged


def _is_range(event: Any) -> bool:
    """Whether a profiler event on the device is an annotated range rather than a kernel."""
    return bool(getattr(event, "is_user_annotation", False)) or event.name.startswith("## ")


def kernel_profile(fn: Callable[[], Any], calls: int = 5) -> dict[str, Any]:
    """What one call of ``fn`` runs on a CUDA device: kernels launched, their summed GPU time
    (µs), the kernels taking the most time (µs and launches per call; twelve, or ``PROFILE_TOP``
    from the environment), and which host
    ops issued copies (``aten::copy_`` under its parent op, with shapes: a copy nobody asked
    for is a layout the graph did not plan). Wall time well above the summed kernel time is
    host or launch overhead; more kernels or kernel time is the graph. Device-side ranges (a
    compiled graph's ``## Call CompiledFxGraph`` range spans its kernels and the gaps between
    them) are not kernels: their time per call is ``annotated_span_us_per_call``. With early
    launches (:mod:`lorahot.kernels.pdl`) a kernel waiting for the one before it counts as
    running, so the summed kernel time overstates the GPU time; time calls back to back
    (:func:`pipelined_ms`) instead."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    events = prof.events()
    on_device = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    # a compiled graph's "## Call CompiledFxGraph ... ##" range also shows on the device, spanning
    # its kernels and the gaps between them: kept apart, not summed with the kernels
    ranges = [e for e in on_device if _is_range(e)]
    kernels = [e for e in on_device if not _is_range(e)]
    per: dict[str, list[float]] = {}
    for e in kernels:
        slot = per.setdefault(e.name, [0.0, 0.0])
        slot[0] += e.device_time / calls
        slot[1] += 1 / calls
    top = sorted(per.items(), key=lambda kv: -kv[1][0])[: int(os.environ.get("PROFILE_TOP", "12"))]
    copies: dict[str, float] = {}
    for e in events:
        if e.device_type == torch.autograd.DeviceType.CPU and e.name == "aten::copy_":
            chain, up = [], e.cpu_parent
            while up is not None and len(chain) < 4:  # through clone / contiguous / to, up to who asked
                chain.append(up.name)
                up = up.cpu_parent
            key = f"{'<'.join(chain) or '-'} {e.input_shapes}"[:200]
            copies[key] = copies.get(key, 0.0) + 1 / calls
    return {
        "kernels_per_call": len(kernels) / calls,
        "gpu_us_per_call": round(sum(v[0] for v in per.values()), 1),
        "annotated_span_us_per_call": round(sum(e.device_time for e in ranges) / calls, 1),
        "top_us": {name[:100]: round(v[0], 1) for name, v in top[:5]},
        "top": [[name[:100], round(v[0], 1), round(v[1], 1)] for name, v in top],
        "copies_per_call": dict(sorted(copies.items(), key=lambda kv: -kv[1])[:10]),
    }
