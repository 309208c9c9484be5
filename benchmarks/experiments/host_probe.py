"""Probe: where the host time of a compiled reduce-overhead call goes, base vs lorahot.

8-block TinyLlama-width model, bf16, rank-64 adapter. Configurations: base; lorahot; merged.
(A variant compiled with ``skip_guard_on_all_nn_modules_unsafe`` cannot share the process: its
cache entry then matches the other models too and runs the wrong graph on them.) Prints
synced latency and host time per decode call (interleaved rounds), and a cProfile of 200
lorahot decode calls.

    PYTHONPATH=. python3 -m benchmarks.experiments.host_probe
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time

import torch

import lorahot

dev, dt, R = torch.device("cuda"), torch.bfloat16, 64
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch._dynamo.config.cache_size_limit = 64
    cfg = LlamaConfig(hidden_size=2048, intermediate_size=5632, num_hidden_layers=8, num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, use_cache=False)
    torch.manual_seed(0)
    with torch.device(dev):
        proto = LlamaForCausalLM(cfg).to(dt).eval()
    state = proto.state_dict()
    adapter = {}
    for name, mod in proto.named_modules():
        if name.split(".")[-1] in TARGETS:
            adapter[f"base_model.model.{name}.lora_A.weight"] = torch.randn(R, mod.in_features) * 0.02
            adapter[f"base_model.model.{name}.lora_B.weight"] = torch.randn(mod.out_features, R) * 0.02
    ids = torch.randint(0, 32000, (1, 1), device=dev)
    calls, keep = {}, []
    for kind in ("base", "lorahot", "merged"):
        with torch.device(dev):
            m = LlamaForCausalLM(cfg).to(dt).eval()
        m.load_state_dict(state)
        if kind != "base":
            rt = lorahot.inject(m, TARGETS, max_rank=R, merged=kind == "merged")
            rt.load(adapter)
            keep.append(rt)
        if kind.endswith("skipguards"):  # reduce-overhead is triton.cudagraphs; mode and options do not mix
            c = torch.compile(m, options={"triton.cudagraphs": True, "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        else:
            c = torch.compile(m, mode="reduce-overhead")

        def call(c=c):
            with torch.inference_mode():
                return c(input_ids=ids)

        t = time.perf_counter()
        for _ in range(4):
            call()
        torch.cuda.synchronize()
        print(f"{kind} compiled in {time.perf_counter() - t:.1f}s", flush=True)
        calls[kind] = call
        keep.append(m)
    rows: dict[str, dict[str, list[float]]] = {k: {"latency": [], "host": []} for k in calls}
    for _ in range(3):
        for kind, call in calls.items():
            for _ in range(30):
                torch.cuda.synchronize()
                t = time.perf_counter()
                call()
                h = time.perf_counter()
                torch.cuda.synchronize()
                e = time.perf_counter()
                rows[kind]["host"].append((h - t) * 1e3)
                rows[kind]["latency"].append((e - t) * 1e3)
    for kind, r in rows.items():
        print(f"{kind:20s} latency {statistics.median(r['latency']):.3f} ms  host {statistics.median(r['host']):.3f} ms", flush=True)
    for kind in ("base", "lorahot"):
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(200):
            calls[kind]()
            torch.cuda.synchronize()
        pr.disable()
        s = io.StringIO()
        pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(14)
        print(f"--- cProfile {kind}, 200 calls")
        print("\n".join(line[:150] for line in s.getvalue().splitlines()[-18:]), flush=True)


if __name__ == "__main__":
    main()
