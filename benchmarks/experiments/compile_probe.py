"""Probe: where a compiled model's preparation time goes, shape by shape, as the rows suite compiles it.

The rows suite prepares each configuration by compiling (reduce-overhead) the prefill (1, 128)
and decode (1, 1) shapes, then every row count of :data:`benchmarks.rows.ROWS`. It measured
lorahot's preparation at 2.35x the base model's (302 against 129 s, eight processes compiling at
once). This probe runs one configuration (``base`` or ``lorahot``, its argument) in its own
process, with empty compile caches of its own, and prints per shape: the first call's seconds (trace, compile, CUDA graph
recording), the graphs dynamo has compiled so far, and for lorahot the seconds its first launch
of each fused-kernel configuration took (Triton compiling it). At the end, dynamo's own phase
totals.

    PYTHONPATH=. python3 -m benchmarks.experiments.compile_probe lorahot
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

# empty compile caches of its own: nothing compiled before in this machine's caches is reused
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-"))

import torch

import lorahot
from benchmarks.rows import ROWS, _ids
from benchmarks.workload import MAX_RANK, TARGETS, build
from lorahot.kernels import triton_lora_linear as K

OUT = os.environ.get("OUT", "/tmp")


def main() -> None:
    config = sys.argv[1] if len(sys.argv) > 1 else "lorahot"
    dev = torch.device("cuda")
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    t0 = time.perf_counter()
    w = build(False, dev, Path(tempfile.mkdtemp(prefix="lorahot-compile-")))
    model = w.fresh_base()
    if config == "lorahot":
        runtime = lorahot.inject(model, TARGETS, max_rank=MAX_RANK)
        runtime.load(w.adapters[64])
    print(f"[{config}] built in {time.perf_counter() - t0:.1f} s", flush=True)

    jit: dict[str, float] = {}
    launch = K.launch

    def timed_launch(x, weight, bias, a, bt, scale, out, cfg, routing=None):
        key = f"{cfg} m1={x.shape[0] == 1}"
        if key in jit:
            return launch(x, weight, bias, a, bt, scale, out, cfg, routing)
        torch.cuda.synchronize()
        t = time.perf_counter()
        launch(x, weight, bias, a, bt, scale, out, cfg, routing)
        torch.cuda.synchronize()
        jit[key] = time.perf_counter() - t
        return None

    K.launch = timed_launch
    compiled = torch.compile(model, mode="reduce-overhead")

    def call(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return compiled(input_ids=ids).logits

    shapes = {"prefill128": w.prefill, "decode1": w.decode, **{label: _ids(w, ROWS[label]) for label in ROWS}}
    rows = {}
    total = 0.0
    for label, ids in shapes.items():
        before = sum(jit.values())
        t = time.perf_counter()
        call(ids)
        call(ids)  # reduce-overhead records its CUDA graph on a later call
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        total += dt
        graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        rows[label] = {"s": round(dt, 2), "graphs": graphs, "fused_jit_s": round(sum(jit.values()) - before, 2)}
        print(
            f"[{config}] {label:12s} {dt:7.2f} s  graphs {graphs}  fused-kernel JIT {rows[label]['fused_jit_s']:.2f} s",
            flush=True,
        )
    print(
        f"[{config}] all shapes {total:.1f} s; fused-kernel JIT {sum(jit.values()):.1f} s in {len(jit)} configurations"
    )
    try:
        print(torch._dynamo.utils.compile_times(repr="str", aggregate=True)[:3000])
    except Exception as exc:  # the phase report's signature moves between releases
        print("compile_times:", exc)
    with open(os.path.join(OUT, f"compile-probe-{config}.json"), "w") as f:
        json.dump({"config": config, "total_s": total, "shapes": rows, "fused_jit": jit}, f, indent=1)


if __name__ == "__main__":
    main()
