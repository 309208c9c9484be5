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
``PROBE_SHAPE=narrow`` keeps the 154 layers but makes them narrow (hidden 64, intermediate 176;
adapters written with PEFT's key names), so the bytes are negligible and what is timed is the
fixed cost alone. ``PROBE_STAGES=1`` then times the stages of ``PROBE_REPS`` r8 loads (wall time
per load inside each of a few functions of the load path; nested stages count in their callers).
"""

from __future__ import annotations

import collections
import cProfile
import functools
import importlib
import json
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


#: the 154-layer shape with narrow widths (the fixed cost of a load, its bytes negligible)
NARROW = {"hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4, "num_key_value_heads": 2}


def narrow_model_and_adapters(dtype: torch.dtype, workdir: Path) -> tuple[torch.nn.Module, dict[int, Path]]:
    """A 22-block Llama of :data:`NARROW` widths and PEFT-named adapters of each rank for it."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**NARROW, num_hidden_layers=22, vocab_size=256, use_cache=False)
    model = LlamaForCausalLM(config).to(dtype).eval()
    adapters = {}
    for rank, alpha in RANKS.items():
        tensors = {}
        for name, module in model.named_modules():
            if name.split(".")[-1] in TARGETS:
                tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, module.in_features) * 0.02
                tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(module.out_features, rank) * 0.02
        adapters[rank] = workdir / "narrow" / f"r{rank}"
        adapters[rank].mkdir(parents=True, exist_ok=True)
        save_file(dict(sorted(tensors.items())), adapter_file(adapters[rank]))
        config_text = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": TARGETS}
        (adapters[rank] / "adapter_config.json").write_text(json.dumps(config_text))
    return model, adapters


#: (module, function) pairs timed by ``PROBE_STAGES``, patched where the load path calls them
STAGES = [
    ("lorahot.runtime.lora_runtime", "read_adapter"),
    ("lorahot.io.sources", "read_safetensors"),
    ("lorahot.io.sources", "read_tensors"),
    ("lorahot.io.loader", "_normalize"),
    ("lorahot.runtime.lora_runtime", "validate"),
    ("lorahot.runtime.plan", "plan_load"),
    ("lorahot.runtime.plan", "stage_entries"),
    ("lorahot.runtime.plan", "_check_range"),
    ("lorahot.runtime.plan", "_max_abs"),
    ("lorahot.runtime.lora_runtime", "source_key"),
]
#: methods timed by ``PROBE_STAGES``
METHODS = [
    ("lorahot.runtime.buffers", "BufferManager", "write_staged"),
    ("lorahot.runtime.buffers", "Arena", "_copies"),
    ("lorahot.runtime.lora_runtime", "LoraRuntime", "_check_usable"),
]


def time_stages(load: Callable[[], object], repeat: int) -> None:
    """Prints the wall time per load spent inside each of :data:`STAGES` and :data:`METHODS`."""
    spent: collections.Counter[str] = collections.Counter()

    def timed(fn: Callable[..., object], label: str) -> Callable[..., object]:
        @functools.wraps(fn)
        def wrapper(*args: object, **kwargs: object) -> object:
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[label] += time.perf_counter() - t

        return wrapper

    patched = []
    for module_name, name in STAGES:
        module = importlib.import_module(module_name)
        patched.append((module, name, getattr(module, name)))
        setattr(module, name, timed(getattr(module, name), name))
    for module_name, owner_name, name in METHODS:
        owner = getattr(importlib.import_module(module_name), owner_name)
        patched.append((owner, name, getattr(owner, name)))
        setattr(owner, name, timed(getattr(owner, name), f"{owner_name}.{name}"))
    try:
        for _ in range(3):  # warm-up
            load()
        spent.clear()
        t = time.perf_counter()
        for _ in range(repeat):
            load()
        total = time.perf_counter() - t
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)
    print(f"\nstages of r8 loads, ms per load (the whole load {total / repeat * 1e3:.3f} ms):")
    for label, seconds in spent.most_common():
        print(f"  {label:32s} {seconds / repeat * 1e3:8.3f}")


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
    narrow = os.environ.get("PROBE_SHAPE") == "narrow"
    model, adapters = (narrow_model_and_adapters if narrow else model_and_adapters)(dtype, workdir)
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
            f"r{rank} ({size:.2f} MB): load {ours:.3f} ms, floor {floor:.3f} ms, "
            f"beyond the floor {ours - floor:.3f} ms ({ours / floor:.2f}x)"
        )
    if os.environ.get("PROBE_STAGES") == "1":
        time_stages(lambda: runtime.load(adapters[8]), reps)
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
