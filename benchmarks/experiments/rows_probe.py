"""Probe: why a compiled lorahot Llama costs more at batched decode than at prefill.

Run on the GPU machine: ``TORCH_LOGS=perf_hints PYTHONPATH=. python3 -m benchmarks.experiments.rows_probe``.
A 4-block TinyLlama-shaped model (real widths), rank-64 adapter on the 7 projections, compiled
with reduce-overhead; base and lorahot at 64 and 1024 decode rows and a 2048-token prefill:
medians, then the profiler's top kernels per call at 1024 rows, and which layers run wide.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorahot

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {"64": (64, 1), "1024": (1024, 1), "prefill2048": (1, 2048)}


def model() -> torch.nn.Module:
    cfg = LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        use_cache=False,
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        return LlamaForCausalLM(cfg).to(torch.bfloat16).eval()


def adapter(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    g = torch.Generator().manual_seed(0)
    for name, mod in m.named_modules():
        if name.split(".")[-1] in TARGETS:
            out[f"{name}.lora_A.weight"] = torch.randn(64, mod.in_features, generator=g) * 0.02
            out[f"{name}.lora_B.weight"] = torch.randn(mod.out_features, 64, generator=g) * 0.02
    return out


def timed(call, x) -> float:
    for _ in range(5):
        call(x)
    torch.cuda.synchronize()
    ts = []
    for _ in range(20):
        t = time.perf_counter()
        call(x)
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def top_kernels(call, x) -> None:
    from torch.profiler import ProfilerActivity, profile

    call(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        call(x)
        torch.cuda.synchronize()
    evs = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.device_time_total for e in evs)
    print(f"  kernels: {sum(e.count for e in evs)}, device time {total / 1e3:.2f} ms")
    for e in sorted(evs, key=lambda e: -e.device_time_total)[:14]:
        print(f"  {e.device_time_total / 1e3:7.3f} ms  x{e.count:4d}  {e.key[:100]}")


def main() -> None:
    print(torch.__version__, torch.cuda.get_device_name())
    ids = {k: torch.randint(0, 32000, s, device="cuda") for k, s in SHAPES.items()}
    for kind in ("base", "lorahot"):
        m = model()
        if kind == "lorahot":
            rt = lorahot.inject(m, TARGETS, max_rank=64)
            rt.load(adapter(m))
            wide = sum(layer.wide for layer in rt.layers.values())
            print(f"lorahot: {wide}/{len(rt.layers)} layers wide")
        compiled = torch.compile(m, mode="reduce-overhead")

        def call(x, compiled=compiled):
            with torch.inference_mode():
                return compiled(input_ids=x).logits

        t0 = time.perf_counter()
        for x in ids.values():
            call(x)
            call(x)
        print(f"{kind}: compiled in {time.perf_counter() - t0:.1f} s")
        for label, x in ids.items():
            print(f"{kind} {label}: {timed(call, x):.3f} ms")
        print(f"{kind} 1024 profile:")
        top_kernels(call, ids["1024"])
        del m, compiled


if __name__ == "__main__":
    main()
