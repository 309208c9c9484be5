"""Probe: a reduce-overhead decode step of the full 22-block model, base vs lorahot, split into
host time and GPU kernel time, from the profiler.
PROBE_DEVICE=cpu PROBE_BLOCKS=2 runs it on the CPU as a smoke test.

Configurations: base; lorahot (fused kernel); lorahot unfused; merged. Per configuration:
synced latency, host time of one call, pipelined time per call (100 calls, one sync: the GPU
time when the host keeps ahead), then a profile of 20 synced calls: kernels per call and
kernel microseconds per call (top kernels by name), and the host's top events by self time.

    PYTHONPATH=. python3 -m benchmarks.experiments.profile_probe [MODE]   (MODE: reduce-overhead | default)
"""

from __future__ import annotations

import collections
import json
import os
import statistics
import sys
import time

import torch

import lorahot
from benchmarks.experiments.llama import TARGETS, llama

dev, dt, R = torch.device(os.environ.get("PROBE_DEVICE", "cuda")), torch.bfloat16, 64
BLOCKS = int(os.environ.get("PROBE_BLOCKS", "22"))


def sync() -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


OUT = os.environ.get("OUT", "/tmp")


def log(*a: object) -> None:
    print(*a, flush=True)


def build(mode: str) -> dict:
    torch._dynamo.config.cache_size_limit = 64
    fresh, adapter = llama(BLOCKS, dev, dt, R)
    ids = torch.randint(0, 32000, (1, 1), device=dev)
    calls = {}
    for kind in ("base", "lorahot", "unfused", "merged"):
        m = fresh()
        if kind != "base":
            rt = lorahot.inject(m, TARGETS, max_rank=R, merged=kind == "merged", fused=kind != "unfused")
            rt.load(adapter)
            m._probe_runtime = rt
        c = torch.compile(m, mode=None if mode == "default" else mode)

        def call(c=c, m=m):
            with torch.inference_mode():
                return c(input_ids=ids).logits

        t = time.perf_counter()
        for _ in range(4):
            call()
        sync()
        log(f"{kind} compiled in {time.perf_counter() - t:.1f}s")
        calls[kind] = call
    return calls


def measure(calls: dict) -> dict:
    rows = {k: {"latency": [], "host": [], "pipelined": []} for k in calls}
    for _ in range(3):
        for kind, call in calls.items():
            for _ in range(30):
                sync()
                t = time.perf_counter()
                call()
                h = time.perf_counter()
                sync()
                rows[kind]["host"].append((h - t) * 1e3)
                rows[kind]["latency"].append((time.perf_counter() - t) * 1e3)
            sync()
            t = time.perf_counter()
            for _ in range(100):
                call()
            sync()
            rows[kind]["pipelined"].append((time.perf_counter() - t) * 10)
    return {k: {f: statistics.median(v) for f, v in r.items()} for k, r in rows.items()}


def profile(call, n: int = 20) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        for _ in range(n):
            call()
            sync()
    kernels: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    cpu: collections.Counter = collections.Counter()
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.name[:60]] += e.device_time / n
            counts[e.name[:60]] += 1 / n
        else:
            cpu[e.name[:60]] += e.self_cpu_time_total / n
    return {
        "kernels_per_call": round(sum(counts.values()), 1),
        "kernel_us_per_call": round(sum(kernels.values()), 1),
        "top_kernels": [(k, round(v, 1), round(counts[k], 1)) for k, v in kernels.most_common(8)],
        "top_host": [(k, round(v, 1)) for k, v in cpu.most_common(10)],
    }


def main() -> None:
    mode = sys.argv[1] if len(sys.argv) > 1 else "reduce-overhead"
    calls = build(mode)
    res = {
        "mode": mode,
        "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "timing": measure(calls),
        "profile": {},
    }
    for kind, call in calls.items():
        res["profile"][kind] = profile(call)
    with open(os.path.join(OUT, f"profile_probe-{mode}.json"), "w") as f:
        json.dump(res, f, indent=1)
    for kind, p in res["profile"].items():
        log(f"--- {kind}: {p['kernels_per_call']} kernels, {p['kernel_us_per_call']} us of kernels per call")
        for k, v, c in p["top_kernels"]:
            log(f"  gpu {v:8.1f} us  x{c:5.1f}  {k}")
        for k, v in p["top_host"]:
            log(f"  cpu {v:8.1f} us  {k}")
    log(f"{'config':10s} {'latency':>8s} {'host':>8s} {'pipelined':>9s}  ({mode}, ms per decode call)")
    for kind, t in res["timing"].items():
        log(f"{kind:10s} {t['latency']:8.3f} {t['host']:8.3f} {t['pipelined']:9.3f}")


if __name__ == "__main__":
    main()
