"""Probe: where a compiled LoRA forward spends its time, and what the fused kernel saves.

Run on the GPU machine from the repo root (parts: check, sweep, model; ``PROBE_M=1,128`` sets
the sweep's row counts): ``PYTHONPATH=. python3 -m benchmarks.experiments.forward_probe [PART...]``.

1. The fused kernel against a float64 reference (fresh random inputs, odd shapes, bias, the
   op's own tiles and explicit split-K ones, outputs poisoned with NaN first).
2. Per projection shape, one call's cost inside a CUDA graph (22 weight sets per shape, so
   weights stream from HBM as in a real model): cuBLAS base; cuBLAS LoRA (3 kernels);
   the fused kernel under every tile and split-K configuration of the sweep.
3. An 8-block Llama (``llama.py``) compiled with reduce-overhead: base; lorahot unfused;
   lorahot fused; merged; base again (a control for drift): decode and prefill medians, host
   time, and kernels per decode step from the profiler.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from lorahot.kernels import triton_lora_linear as K

dev, dt, R = torch.device("cuda"), torch.bfloat16, 64
OUT = os.environ.get("OUT", "/tmp")
results: dict = {}


def save() -> None:
    with open(os.path.join(OUT, "forward_probe.json"), "w") as f:
        json.dump(results, f, indent=1)


def log(*a) -> None:
    print(*a, flush=True)


# -- 1. correctness ---------------------------------------------------------------------------
def check() -> None:
    g = torch.Generator(device=dev).manual_seed(1)
    worst = 0.0
    for dtype in (torch.bfloat16, torch.float16):
        for m, k, n, r, bias in [
            (1, 2048, 2048, 64, False),
            (3, 72, 100, 8, True),
            (128, 2048, 256, 64, False),
            (200, 5632, 2048, 48, True),
            (17, 64, 5632, 16, False),
            (64, 136, 40, 64, True),
            (0, 64, 32, 16, False),
        ]:
            x = torch.randn(m, k, device=dev, dtype=dtype, generator=g)
            w = torch.randn(n, k, device=dev, dtype=dtype, generator=g) / k**0.5
            a = torch.randn(r, k, device=dev, dtype=dtype, generator=g) / k**0.5
            bt = torch.randn(r, n, device=dev, dtype=dtype, generator=g) / r**0.5
            b = torch.randn(n, device=dev, dtype=dtype, generator=g) if bias else None
            s = torch.full((r,), 0.7, device=dev)  # one scale per row of A
            d = lambda t: t.double()
            ref = d(x) @ d(w).T + 0.7 * (d(x) @ d(a).T) @ d(bt) + (d(b) if bias else 0)
            for split in (0, 1, 3, 8):  # 0: the op's own configuration
                if split and m == 0:
                    continue
                if split:
                    y = torch.full(
                        (m, n), float("nan"), device=dev, dtype=dtype
                    )  # poison: every element must be written
                    K.launch(x, w, b, a, bt, s, y, (16, 32, 64, 4, 4, split))
                else:
                    y = K.lora_linear(x, w, b, a, bt, s)
                err = 0.0 if m == 0 else float((d(y) - ref).norm() / ref.norm())
                assert torch.isfinite(y).all() and y.shape == (m, n), (m, k, n, r, split)
                worst = max(worst, err)
                log(f"check {str(dtype)[6:]} m={m} k={k} n={n} r={r} bias={bias} split={split}: rel err {err:.2e}")
    results["kernel_max_rel_err"] = worst
    assert worst < 1e-2, worst


# -- 2. per-shape cost in a CUDA graph ---------------------------------------------------------
SHAPES = {"qo": (2048, 2048), "kv": (2048, 256), "gate/up": (2048, 5632), "down": (5632, 2048)}
PER_STEP = {"qo": 44, "kv": 44, "gate/up": 44, "down": 22}  # calls per decode step, 22 blocks
DECODE_CFGS = [
    (16, bn, bk, 4, 4 if bk <= 128 else 3, sp)
    for bn in (32, 64, 128)
    for bk in (64, 128, 256)
    for sp in (1, 2, 4, 8, 16)
]
MID_CFGS = [
    (bm, bn, bk, 4, 4 if bm == 16 else 3, sp)
    for bm in (16, 32, 64)
    for bn in (32, 64, 128)
    for bk in (64, 128)
    for sp in (1, 2, 4, 8)
]
PREFILL_CFGS = [
    (bm, bn, bk, 4 if bm * bn <= 4096 else 8, 3, sp)
    for bm in (64, 128)
    for bn in (32, 64, 128)
    for bk in (64, 128)
    for sp in (1, 2, 4, 8)
    if not (bm == 128 and bn == 128 and bk == 128)
]


def graph_us(fn, calls: int) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    ts = []
    for _ in range(40):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); g.replay(); e1.record(); torch.cuda.synchronize()  # fmt: skip
        ts.append(e0.elapsed_time(e1))
    return statistics.median(ts) * 1e3 / calls


def sweep() -> None:
    n_sets = 22
    table = {}
    for m in [int(v) for v in os.environ.get("PROBE_M", "1,128").split(",")]:
        for name, (k, n) in SHAPES.items():
            ws = [torch.randn(n, k, device=dev, dtype=dt) / k**0.5 for _ in range(n_sets)]
            As = [torch.randn(R, k, device=dev, dtype=dt) / k**0.5 for _ in range(n_sets)]
            Bs = [torch.randn(R, n, device=dev, dtype=dt) / R**0.5 for _ in range(n_sets)]
            x = torch.randn(m, k, device=dev, dtype=dt)
            s = torch.full((R,), 0.5, device=dev)  # one scale per row of A
            outs = [torch.empty(m, n, device=dev, dtype=dt) for _ in range(n_sets)]
            row = {}

            def base():
                for i in range(n_sets):
                    outs[i] = F.linear(x, ws[i])

            def cublas_lora():
                for i in range(n_sets):
                    y = F.linear(x, ws[i])
                    outs[i] = y.addmm_(x @ As[i].T, Bs[i])

            wides = [torch.cat([ws[i], As[i] * 0.5]) for i in range(n_sets)]

            def wide():  # the wide layer's eager formula: [y | h] in one GEMM, then y += h @ Bt
                for i in range(n_sets):
                    yh = F.linear(x, wides[i])
                    outs[i] = yh.narrow(1, 0, n).addmm_(yh.narrow(1, n, R), Bs[i])

            row["cublas_base"] = graph_us(base, n_sets)
            row["cublas_lora"] = graph_us(cublas_lora, n_sets)
            row["wide"] = graph_us(wide, n_sets)
            for cfg in DECODE_CFGS if m <= 16 else MID_CFGS if m <= 64 else PREFILL_CFGS:

                def fused(cfg=cfg):
                    for i in range(n_sets):
                        K.launch(x, ws[i], None, As[i], Bs[i], s, outs[i], cfg)

                try:
                    row[str(cfg)] = graph_us(fused, n_sets)
                except Exception as exc:  # a config the compiler rejects (shared memory)
                    row[str(cfg)] = None
                    log(f"  {cfg}: {type(exc).__name__}")
            best = min((v, c) for c, v in row.items() if c.startswith("(") and v is not None)
            table[f"m{m} {name}"] = row
            log(
                f"m={m:3d} {name:8s} base {row['cublas_base']:6.2f} us  cublas lora {row['cublas_lora']:6.2f}  wide {row['wide']:6.2f}  fused default {row[str(K.config_for(m, n, k))] if str(K.config_for(m, n, k)) in row else float('nan'):6.2f}  best {best[0]:6.2f} {best[1]}"
            )
            results["sweep"] = table
            save()
            del ws, As, Bs, outs, wides


# -- 3. the model ------------------------------------------------------------------------------
def model_level() -> None:
    import lorahot
    from benchmarks.experiments.llama import TARGETS as targets
    from benchmarks.experiments.llama import llama

    fresh, adapter = llama(8, dev, dt, R)
    ids = {
        "decode": torch.randint(0, 32000, (1, 1), device=dev),
        "prefill": torch.randint(0, 32000, (1, 128), device=dev),
    }

    with torch.inference_mode():
        ref_model = fresh().float()
        rt = lorahot.inject(ref_model, targets, max_rank=R, fused=False)
        rt.load(adapter)
        ref = {k: ref_model(input_ids=v).logits for k, v in ids.items()}
        del ref_model, rt

    def make(kind):
        m = fresh()
        if kind.startswith("lorahot") or kind == "merged":
            rt = lorahot.inject(m, targets, max_rank=R, fused=kind == "lorahot_fused", merged=kind == "merged")
            rt.load(adapter)
            m._rt = rt
        return m

    def time_ms(call, x):
        for _ in range(5):
            call(x)
        torch.cuda.synchronize()
        ts = []
        for _ in range(30):
            t = time.perf_counter(); call(x); torch.cuda.synchronize(); ts.append((time.perf_counter() - t) * 1e3)  # fmt: skip
        return statistics.median(ts)

    def kernels_per_step(call, x):
        from torch.profiler import ProfilerActivity, profile

        call(x); torch.cuda.synchronize()  # fmt: skip
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(3):
                call(x)
            torch.cuda.synchronize()
        evs = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
        total = sum(e.count for e in evs) / 3
        top = sorted(evs, key=lambda e: -e.device_time_total)[:6]
        return total, [
            (e.key[:60], e.count // 3, round(e.device_time_total / 3 / max(1, e.count // 3), 1)) for e in top
        ]

    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64

    kinds = ["base", "lorahot_unfused", "lorahot_fused", "merged", "base_again"]
    calls, keep, model_rows = {}, [], {}
    for kind in kinds:
        m = make(kind)
        compiled = torch.compile(m, mode="reduce-overhead")

        def call(x, compiled=compiled):
            with torch.inference_mode():
                return compiled(input_ids=x).logits

        t0 = time.perf_counter()
        row = {}
        for shape, x in ids.items():
            for _ in range(3):
                out = call(x).float()
            if kind != "base":
                row[f"{shape}_rel_err"] = float((out - ref[shape]).norm() / ref[shape].norm())
        row["compile_s"] = round(time.perf_counter() - t0, 1)
        calls[kind] = call
        keep.append(m)
        model_rows[kind] = row
        log(f"[compiled {kind}] {row}")

    def cpu_us(call, x):
        ts = []
        for _ in range(20):
            torch.cuda.synchronize(); t = time.perf_counter(); call(x); ts.append((time.perf_counter() - t) * 1e6); torch.cuda.synchronize()  # fmt: skip
        return statistics.median(ts)

    def back_to_back_ms(call, x):
        torch.cuda.synchronize(); t = time.perf_counter()  # fmt: skip
        for _ in range(30):
            call(x)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) * 1e3 / 30

    for rnd in range(3):
        for kind in kinds:
            row = model_rows[kind]
            for shape, x in ids.items():
                row.setdefault(shape, []).append(round(time_ms(calls[kind], x), 3))
                row.setdefault(f"{shape}_cpu_us", []).append(round(cpu_us(calls[kind], x), 1))
                row.setdefault(f"{shape}_b2b", []).append(round(back_to_back_ms(calls[kind], x), 3))
        log(
            f"round {rnd}: "
            + "  ".join(f"{k} {model_rows[k]['decode'][-1]:.3f}/{model_rows[k]['prefill'][-1]:.3f}" for k in kinds)
        )
        results["model"] = model_rows
        save()
    for kind in kinds:
        r = model_rows[kind]
        log(
            f"{kind:20s} decode {statistics.median(r['decode']):.3f} (cpu {statistics.median(r['decode_cpu_us']):.0f} us, b2b {statistics.median(r['decode_b2b']):.3f})  prefill {statistics.median(r['prefill']):.3f} (cpu {statistics.median(r['prefill_cpu_us']):.0f} us, b2b {statistics.median(r['prefill_b2b']):.3f})"
        )


if __name__ == "__main__":
    log("torch", torch.__version__, torch.cuda.get_device_name(), "triton", __import__("triton").__version__)
    parts = sys.argv[1:] or ["check", "sweep", "model"]
    if "check" in parts:
        check()
    if "sweep" in parts:
        sweep()
    if "model" in parts:
        model_level()
    log(json.dumps({k: v for k, v in results.items() if k != "sweep"}, indent=1)[:3000])
