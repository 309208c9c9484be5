"""Probe: the host-side cost of a swap from the host cache (``runtime.load(prepared)``).

A 22-block Llama (154 LoRA layers, q/k/v/o/gate/up/down) with max_rank 64; adapters of ranks
8/16/64 preloaded, then each loaded again and again as ``benchmarks/swap.py`` does. Per rank:
the ops one swap issues (profiler, top-level aten ops: on a GPU each non-view op is about one
launch; ``_foreach_copy_`` is a few; on a GPU the device's own kernels and copies too), the
median host time of one swap (until ``load`` returns) and its synced time, one torch thread;
on a GPU also one pinned copy of the pack's bytes (the floor). ``narrow`` widths (default) make the copies negligible, so the time is the fixed
overhead; ``PROBE_SHAPE=tinyllama`` uses the real widths (then CPU memcpy dominates).
``PROBE_ROWS=1`` makes CPU packs land by rows as GPU ones do (``Arena.by_rows``).

    PYTHONPATH=. python -m benchmarks.experiments.hostswap_probe        (PROBE_DEVICE=cuda on a GPU)
"""

from __future__ import annotations

import collections
import os
import statistics
import time

import torch

import lorahot

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "narrow": {"hidden_size": 64, "intermediate_size": 176, "num_attention_heads": 4, "num_key_value_heads": 2},
    "tinyllama": {"hidden_size": 2048, "intermediate_size": 5632, "num_attention_heads": 32, "num_key_value_heads": 4},
}
VIEWS = {
    "aten::view",
    "aten::split",
    "aten::split_with_sizes",
    "aten::as_strided",
    "aten::slice",
    "aten::select",
    "aten::unbind",
    "aten::reshape",
    "aten::t",
    "aten::transpose",
    "aten::detach",
    "aten::alias",
    "aten::narrow",
    "aten::lift_fresh",
    "aten::empty",
    "aten::empty_strided",
    "aten::is_pinned",
    "aten::_has_compatible_shallow_copy_type",
    "aten::result_type",
}


def model(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], num_hidden_layers=22, vocab_size=256, use_cache=False)
    torch.manual_seed(0)
    with torch.device(device):
        return LlamaForCausalLM(cfg).to(dtype).eval()


def adapter(m: torch.nn.Module, rank: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, mod in m.named_modules():
        if name.split(".")[-1] in TARGETS:
            out[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, mod.in_features) * 0.02
            out[f"base_model.model.{name}.lora_B.weight"] = torch.randn(mod.out_features, rank) * 0.02
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    torch.set_num_threads(1)
    shape = os.environ.get("PROBE_SHAPE", "narrow")
    device = torch.device(os.environ.get("PROBE_DEVICE", "cpu"))
    dtype = torch.bfloat16
    reps = int(os.environ.get("PROBE_REPS", "300"))
    m = model(shape, device, dtype)
    runtime = lorahot.inject(m, TARGETS, max_rank=64)
    if "PROBE_ROWS" in os.environ:  # 1: packs land by rows as on a GPU; 0: by pieces (the CPU's default)
        for arena in getattr(runtime.buffers, "arenas", []):
            arena.by_rows = os.environ["PROBE_ROWS"] == "1"
    print(f"{shape} on {device}: {len(runtime.layers)} layers, {runtime.nbytes / 1e6:.1f} MB of buffers")
    prepared = {r: runtime.preload(adapter(m, r), config={"r": r, "lora_alpha": 16}) for r in (8, 16, 64)}
    for rank in (8, 16, 64):
        p = prepared[rank]
        for _ in range(5):
            runtime.load(p)
        sync(device)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        with torch.profiler.profile(activities=activities) as prof:
            runtime.load(p)
            sync(device)
        ops: collections.Counter[str] = collections.Counter()
        launches: collections.Counter[str] = collections.Counter()
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA:
                launches[e.name[:60]] += 1  # kernels and memcpy/memset on the device
            elif e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::")):
                ops[e.name] += 1  # top-level aten ops only (their children are the op's own work)
        work = {k: v for k, v in ops.items() if k not in VIEWS}
        host, wall = [], []
        for _ in range(reps):
            sync(device)
            t0 = time.perf_counter()
            runtime.load(p)
            t1 = time.perf_counter()
            sync(device)
            host.append((t1 - t0) * 1e6)
            wall.append((time.perf_counter() - t0) * 1e6)
        floor = ""
        if device.type == "cuda":
            dst = torch.empty_like(p.packs[0].data, device=device)
            ts = []
            for _ in range(reps):
                sync(device)
                t0 = time.perf_counter()
                dst.copy_(p.packs[0].data, non_blocking=True)
                sync(device)
                ts.append((time.perf_counter() - t0) * 1e6)
            floor = f"; one H2D copy of the pack {statistics.median(ts):.0f} us; device ops {dict(launches)}"
        print(
            f"r{rank}: {p.nbytes / 1e6:.2f} MB packed; host {statistics.median(host):.0f} us/swap, synced "
            f"{statistics.median(wall):.0f} us (medians of {reps}){floor}; aten ops: {sum(work.values())} non-view "
            f"{dict(sorted(work.items()))}, {sum(ops.values()) - sum(work.values())} view/alloc "
            f"{dict(sorted((k, v) for k, v in ops.items() if k in VIEWS))}"
        )


if __name__ == "__main__":
    main()
