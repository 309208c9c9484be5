"""Probe: the fixed host cost of ``runtime.load(path)`` of a small adapter file.

The full-size workload of ``benchmarks/swap.py`` on the CPU: a TinyLlama-shaped model (22 blocks,
LoRA on q/k/v/o/gate/up/down = 154 layers, max_rank 64) and PEFT-saved adapters of ranks 8/16/64
(float32, as PEFT saves them). Per rank: the median of ``runtime.load(path)`` against its floor,
safetensors' ``load_file(f)`` (on the CPU it maps the file rather than copying it, so the floor
hardly grows with the file: what matters is the time beyond it, lorahot's own host work), then
cProfile over ``PROBE_PROFILE`` loads of rank 8, top functions by tottime and by cumtime.

    PYTHONPATH=. python -m benchmarks.experiments.swap_host_probe

Environment: ``PROBE_DTYPE`` the model's dtype (``bfloat16``, the default, as on a GPU; or
``float32``), ``PROBE_WORKDIR`` a folder for the adapters (kept; when it already holds them the
model is built from the config with random weights instead of by the workload, which is faster:
the timing does not depend on the base weights), ``PROBE_REPS`` loads per median (20),
``PROBE_PROFILE`` loads under cProfile (20; 0 skips), ``PROBE_TOP`` rows per listing (25),
``PROBE_RANKS`` the ranks timed (``16,64,8``), ``PROBE_THREADS`` torch's threads (default: torch's
own; 1 keeps the figures steady while another process holds a core of the 2-core box).
"""

from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lorahot
from benchmarks.workload import MAX_RANK, RANKS, TARGETS, adapter_file, build, llama_config


def model_and_adapters(dtype: torch.dtype, workdir: Path) -> tuple[torch.nn.Module, dict[int, Path]]:
    """The model (``dtype``, CPU) and the adapter folders by rank; adapters built once per workdir."""
    from transformers import LlamaForCausalLM

    adapters = {rank: workdir / f"r{rank}" for rank in RANKS}
    if all(Path(adapter_file(p)).exists() for p in adapters.values()):
        torch.manual_seed(0)
        return LlamaForCausalLM(llama_config(small=False)).to(dtype).eval(), adapters
    w = build(small=False, device=torch.device("cpu"), workdir=workdir)
    return w.fresh_base(dtype), w.adapters


def median_ms(fn: Callable[[], object], repeat: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def main() -> None:
    from safetensors.torch import load_file

    dtype = getattr(torch, os.environ.get("PROBE_DTYPE", "bfloat16"))
    workdir = Path(os.environ.get("PROBE_WORKDIR", "/tmp/lorahot-swap-host"))
    reps = int(os.environ.get("PROBE_REPS", "20"))
    profiled = int(os.environ.get("PROBE_PROFILE", "20"))
    top = int(os.environ.get("PROBE_TOP", "25"))
    ranks = [int(r) for r in os.environ.get("PROBE_RANKS", "16,64,8").split(",")]
    if "PROBE_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["PROBE_THREADS"]))
    t0 = time.perf_counter()
    model, adapters = model_and_adapters(dtype, workdir)
    runtime = lorahot.inject(model, TARGETS, max_rank=MAX_RANK)
    print(
        f"built in {time.perf_counter() - t0:.0f} s: {len(runtime.layers)} layers, {dtype}, "
        f"torch threads {torch.get_num_threads()}"
    )
    for rank in ranks:  # by default benchmarks/swap.py's order
        path, f = adapters[rank], adapter_file(adapters[rank])
        floor = median_ms(lambda: load_file(f), reps)
        ours = median_ms(lambda: runtime.load(path), reps)
        size = os.path.getsize(f) / 1e6
        print(
            f"r{rank} ({size:.1f} MB): load {ours:.2f} ms, floor {floor:.2f} ms, "
            f"beyond the floor {ours - floor:.2f} ms ({ours / floor:.2f}x)"
        )
    if profiled:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(profiled):
            runtime.load(adapters[8])
        prof.disable()
        stats = pstats.Stats(prof)
        print(f"\ncProfile, {profiled} loads of r8 (times are totals over them)")
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)


if __name__ == "__main__":
    main()
