"""Probe: which formula makes a rank-64 LoRA linear cheapest above 128 rows.

Run on the GPU machine from the repo root:
``PYTHONPATH=. python3 -m benchmarks.experiments.large_probe`` (``PROBE_M=64,256`` sets the rows).

For each TinyLlama projection shape and row count, one call's cost inside a CUDA graph (22
weight sets per shape, so weights stream from HBM as in the model), for these formulas:

- ``base``: ``F.linear(x, W)``, the floor;
- ``lib``: what the compiler makes of the layer's library formula today: base, shrink, expand,
  and one elementwise ``y + s * d``;
- ``addmm_s``: base, shrink, ``h *= s`` on the rank-wide intermediate, expand accumulated into
  the base output by cuBLAS (``beta = 1``);
- ``addmm_pre``: the same with ``s`` folded into A beforehand: base, shrink, accumulate;
- ``cat_pre``: A stored under W (``[W; s*A]``, one ``[out + r, in]`` buffer): base and shrink
  in one GEMM that reads x once, then the accumulate into the strided base output;
- ``fused``: the fused Triton kernel with its own tiles (up to 1024 rows);
- ``fused_<BM>x<BN>w<warps>``: the same kernel with other tiles, one formula per entry of
  ``PROBE_FUSED_CONFIGS`` (``BM,BN,BK,warps,stages`` entries joined by ``;``, K split as
  :func:`lorahot.kernels.triton_lora_linear.split_for`, as ``config_for`` does), for instance
  ``128,64,64,8,3`` to read each weight once at 65-128 rows. A configuration that fails to
  compile or to match float64 is reported and left out.

Every formula is checked against float64 first. The table predicts the whole-model cost from
the per-layer extras (44 q/o, 44 k/v, 44 gate/up, 22 down calls per forward) over the base
model's measured forward time at each row count (``BASE_MS``, from the rows suite).
"""

from __future__ import annotations

import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from benchmarks.experiments.forward_probe import graph_us, log
from lorahot.kernels import triton_lora_linear as K

dev, dt, R = torch.device("cuda"), torch.bfloat16, 64
OUT = os.environ.get("OUT", "/tmp")
SHAPES = {"qo": (2048, 2048), "kv": (2048, 256), "gate/up": (2048, 5632), "down": (5632, 2048)}
PER_STEP = {"qo": 44, "kv": 44, "gate/up": 44, "down": 22}
#: base model forward, ms, reduce-overhead, H200 (runs/20261130T082538-rows.json)
BASE_MS = {1: 2.13, 8: 2.16, 64: 2.72, 256: 4.78, 1024: 14.14, 2048: 11.57, 8192: 81.71}
N_SETS = 22
#: extra tile configurations of the fused kernel: ``(BM, BN, BK, warps, stages)``
FUSED_CONFIGS = [
    tuple(int(v) for v in c.split(",")) for c in os.environ.get("PROBE_FUSED_CONFIGS", "").split(";") if c.strip()
]


def host_us(fn, calls: int) -> float:
    ts = []
    for _ in range(20):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e6 / calls)
    torch.cuda.synchronize()
    return statistics.median(ts)


def formulas(x, w, wa, a, ap, b, s, sb, n):
    """name -> callable computing one layer's output for one weight set."""

    def base():
        return F.linear(x, w)

    def lib():
        y = F.linear(x, w)
        d = (x @ a.T) @ b
        return torch.addcmul(y, d, sb)

    def addmm_s():
        y = F.linear(x, w)
        h = x @ a.T
        h.mul_(sb)
        return y.addmm_(h, b)

    def addmm_pre():
        y = F.linear(x, w)
        return y.addmm_(x @ ap.T, b)

    def cat_pre():
        yc = F.linear(x, wa)
        y = yc[:, :n]
        return y.addmm_(yc[:, n:], b)

    rows = s.expand(a.shape[0]).contiguous()  # the kernel takes one scale per row of A

    def fused():
        return K.lora_linear(x, w, None, a, b, rows)

    out = {"base": base, "lib": lib, "addmm_s": addmm_s, "addmm_pre": addmm_pre, "cat_pre": cat_pre}
    if x.shape[0] <= 1024:
        out["fused"] = fused
        for bm, bn, bk, warps, stages in FUSED_CONFIGS:
            config = (bm, bn, bk, warps, stages, K.split_for(x.shape[0], n, x.shape[1], bm, bn))

            def tiled(config=config):
                y = torch.empty(x.shape[0], n, device=x.device, dtype=x.dtype)
                K.launch(x, w, None, a, b, rows, y, config)
                return y

            out[f"fused_{bm}x{bn}w{warps}"] = tiled
    return out


def operands(m: int, k: int, n: int) -> tuple[list, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(sets, x, s, sb)``: :data:`N_SETS` random ``(W [n, k], A [R, k], Bt [R, n])`` weight
    sets, an input of ``m`` rows, the scale 0.5 (float32) and the same in the weights' dtype."""
    sets = []
    for _ in range(N_SETS):
        w = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
        a = torch.randn(R, k, device=dev, dtype=dt) / k**0.5
        b = torch.randn(R, n, device=dev, dtype=dt) / R**0.5
        sets.append((w, a, b))
    x = torch.randn(m, k, device=dev, dtype=dt)
    s = torch.tensor(0.5, device=dev)
    return sets, x, s, s.to(dt)


def main() -> None:
    log("torch", torch.__version__, torch.cuda.get_device_name(), "triton", __import__("triton").__version__)
    ms = [int(v) for v in os.environ.get("PROBE_M", "1,64,256,1024,2048,8192").split(",")]
    table: dict = {}
    worst = 0.0
    for m in ms:
        for name, (k, n) in SHAPES.items():
            sets, x, s, sb = operands(m, k, n)
            fns: dict[str, list] = {}
            for w, a, b in sets:
                ap = (a * sb).to(dt)
                wa = torch.cat([w, ap])
                for f, fn in formulas(x, w, wa, a, ap, b, s, sb, n).items():
                    fns.setdefault(f, []).append(fn)
            # correctness on the first set
            w, a, b = sets[0]
            ref = x.double() @ w.double().T + 0.5 * (x.double() @ a.double().T) @ b.double()
            base_ref = x.double() @ w.double().T
            for f, calls in list(fns.items()):
                try:
                    y = calls[0]().double()
                except Exception as e:  # an extra tile configuration that does not compile or launch
                    if not f.startswith("fused_"):
                        raise
                    log(f"m={m:5d} {name:8s} {f} left out: {type(e).__name__}: {str(e)[:160]}")
                    del fns[f]
                    continue
                err = float((y - (base_ref if f == "base" else ref)).norm() / ref.norm())
                if f.startswith("fused_") and not err < 2e-2:
                    log(f"m={m:5d} {name:8s} {f} left out: relative error {err:.2e} against float64")
                    del fns[f]
                    continue
                worst = max(worst, err if f != "base" else 0.0)
                assert err < 2e-2, (m, name, f, err)
            row = {}
            for f, calls in fns.items():

                def run_all(calls=calls):
                    for c in calls:
                        c()

                row[f] = round(graph_us(run_all, N_SETS), 2)
                if m == 256:
                    row[f + "_host"] = round(host_us(run_all, N_SETS), 1)
            table[f"{m} {name}"] = row
            log(f"m={m:5d} {name:8s} " + "  ".join(f"{f} {v:7.2f}" for f, v in row.items()))
            del sets, fns
            torch.cuda.empty_cache()
    log(f"max rel err of any LoRA formula vs float64: {worst:.2e}")
    # whole-model prediction
    log("\npredicted forward cost over base (reduce-overhead), from the per-layer extras:")
    summary = {}
    for m in ms:
        variants = [f for f in table[f"{m} qo"] if not f.endswith("_host") and f != "base"]
        line = {}
        for f in variants:
            extra_us = sum(PER_STEP[nm] * (table[f"{m} {nm}"][f] - table[f"{m} {nm}"]["base"]) for nm in SHAPES)
            base_ms = BASE_MS.get(m)
            line[f] = round(1 + extra_us / 1e3 / base_ms, 3) if base_ms else round(extra_us / 1e3, 3)
        summary[m] = line
        log(f"m={m:5d} " + "  ".join(f"{f} {v:.3f}" for f, v in line.items()))
    with open(os.path.join(OUT, "large_probe.json"), "w") as fh:
        json.dump({"table": table, "predicted_ratio": summary, "max_rel_err": worst}, fh, indent=1)


if __name__ == "__main__":
    main()
