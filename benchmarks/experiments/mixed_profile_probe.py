"""Probe: where a routed decode step of the whole model spends its time, against the base model
and the single-adapter path.

The mixed suite's decode (64 sequences of one token, TinyLlama shape, 154 rank-64 layers,
slots=8, reduce-overhead) measured 3.70 ms routed over one adapter against 2.37 for the base
(``runs/20261201T103720-mixed.json``), while ``pdl_probe`` puts the kernels' own cost over the
base GEMMs at about 0.73 ms per step. This probe splits each configuration's step into: synced
latency (as the suite times it), host time (until the call returns), pipelined time per call
(100 calls, one sync: the GPU's time when the host keeps ahead), and from the profiler the
kernels per call, their summed time, and the top kernels.

With ``PROBE_PYPROFILE=1`` it also runs 50 synced calls of each configuration under cProfile and
prints the functions with the most own time per call: what the host does before and after the
replay (dynamo's guards, the CUDA-graph tree's checks of its inputs, the replay's launch), which
``graph_launch_probe`` showed is not the driver's launch of the replay (a few us whatever the
graph's nodes).

``LORAHOT_STACK_ROUTED=1`` compiles the routed graphs with the stacked routed shrink
(:mod:`lorahot.kernels.stacked_routed`); ``PROBE_TOP`` sets how many kernels each profile lists.

Configurations: ``base``; ``single`` (``activate(0)``); ``d1`` and ``d8`` (64 rows routed over 1
and 8 distinct slots), one compiled lorahot model, static shapes.

    PYTHONPATH=. python3 -m benchmarks.experiments.mixed_profile_probe
"""

from __future__ import annotations

import collections
import os
from collections.abc import Callable

import torch

import lorahot
from benchmarks.experiments.llama import TARGETS, llama
from benchmarks.experiments.profile_probe import measure
from lorahot.kernels import pdl, stacked_routed

dev, dt, R, SLOTS, ROWS = torch.device(os.environ.get("PROBE_DEVICE", "cuda")), torch.bfloat16, 64, 8, 64
BLOCKS = int(os.environ.get("PROBE_BLOCKS", "22"))  # PROBE_DEVICE=cpu PROBE_BLOCKS=2: a smoke test


def sync() -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def profile(call: Callable[[], object], n: int = 20) -> tuple[float, float, list[tuple[str, float, float]]]:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CUDA if dev.type == "cuda" else ProfilerActivity.CPU]) as p:
        for _ in range(n):
            call()
            sync()
    kernels: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for e in p.events():
        if e.device_type == torch.autograd.DeviceType.CUDA or dev.type == "cpu":
            kernels[e.name[:70]] += e.device_time / n
            counts[e.name[:70]] += 1 / n
    top = [(k, v, counts[k]) for k, v in kernels.most_common(int(os.environ.get("PROBE_TOP", "10")))]
    return sum(counts.values()), sum(kernels.values()), top


def host_profile(call: Callable[[], object], n: int = 50, top: int = 14) -> list[str]:
    """The functions with the most own time over ``n`` synced calls, us per call."""
    import cProfile
    import pstats

    prof = cProfile.Profile()
    for _ in range(n):
        sync()
        prof.enable()
        call()
        prof.disable()
    sync()
    stats = pstats.Stats(prof)
    rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:top]  # type: ignore[attr-defined]
    total = sum(v[2] for v in stats.stats.values()) * 1e6 / n  # type: ignore[attr-defined]
    out = [f"  {total:8.1f} us own time per call in all"]
    for (file, line, func), (_, calls, tottime, cumtime, _) in rows:
        where = f"{os.path.basename(file)}:{line}:{func}"[-70:]
        out.append(f"  {tottime * 1e6 / n:8.1f} us own {cumtime * 1e6 / n:8.1f} cum  x{calls / n:5.1f}  {where}")
    return out


def main() -> None:
    torch._dynamo.config.cache_size_limit = 64
    print(f"pdl: {pdl.active(dev)}, stacked routed shrink: {stacked_routed.ENABLED}", flush=True)
    fresh, adapter = llama(BLOCKS, dev, dt, R)
    ids = torch.randint(0, 32000, (ROWS, 1), device=dev)

    def compiled(model: torch.nn.Module) -> Callable[[], object]:
        c = torch.compile(model, mode="reduce-overhead" if dev.type == "cuda" else None, dynamic=False)

        def call() -> object:
            with torch.inference_mode():
                return c(input_ids=ids).logits

        return call

    base = compiled(fresh())
    base(), base()
    model = fresh()
    runtime = lorahot.inject(model, TARGETS, max_rank=R, slots=SLOTS)
    for slot in range(SLOTS):
        runtime.load(adapter, slot=slot)
    call = compiled(model)
    runtime.activate(0)
    call(), call()
    runtime.activate([i % SLOTS for i in range(ROWS)])
    call(), call()
    sync()
    print("compiled", flush=True)

    configs: dict[str, Callable[[], None]] = {
        "base": lambda: None,
        "single": lambda: runtime.activate(0),
        "d1": lambda: runtime.activate([0] * ROWS),
        "d8": lambda: runtime.activate([i % SLOTS for i in range(ROWS)]),
    }
    results = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for name, setup in configs.items():
            setup()
            fn = base if name == "base" else call
            fn(), fn()
            results[name] = (measure({name: fn})[name], profile(fn))
            if os.environ.get("PROBE_PYPROFILE") == "1":
                print(f"--- {name}: host, cProfile", flush=True)
                print("\n".join(host_profile(fn)), flush=True)
    for name, (_, (count, us, top)) in results.items():
        print(f"--- {name}: {count:.1f} kernels, {us:.1f} us of kernels per call")
        for k, v, c in top:
            print(f"  {v:8.1f} us  x{c:6.1f}  {k}")
    print(f"{'config':8s} {'latency':>8s} {'host':>8s} {'pipelined':>9s} {'kernels':>8s} {'kernel ms':>9s}")
    for name, (t, (count, us, _)) in results.items():
        print(f"{name:8s} {t['latency']:8.3f} {t['host']:8.3f} {t['pipelined']:9.3f} {count:8.1f} {us / 1e3:9.3f}")


if __name__ == "__main__":
    main()
