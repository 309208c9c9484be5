"""Probe: what a rank-64 LoRA layer costs at the SDXL UNet's shapes, on the GPU and on the host.

lorahot's default-mode UNet step measured 2.95x the base model's (diffusers' hotswap 2.46x)
where the arithmetic of rank 64 adds about a tenth. This probe separates the two suspects:

- GPU time of one call, inside a CUDA graph (22 weight sets per shape, so weights stream from
  HBM as in the model): if the wide formula is cheap here, the step's cost is host time;
- host time of one eager call (what default mode pays per layer on the CPU before the GPU can
  run it): the library calls, the wide formula, and the custom op ``lorahot::wide_linear``
  itself (its dispatch included);
- the kernels the in-place expand ``y.addmm_(h, Bt)`` runs at each shape (cuBLAS picks them;
  at 1024 rows of the LLM a traced variant once drew 8-column tiles costing 46-108 us).

Shapes: the UNet's 700 targeted linears by (rows, in, out) at 1024x1024 pixels, batch 2 (128x128
latents): 10 blocks at 640 channels (8192 rows) and 60 at 1280 (2048 rows), cross-attention
k/v on the 154 text rows. Formulas as in :mod:`benchmarks.experiments.large_probe`.

    PYTHONPATH=. python3 -m benchmarks.experiments.unet_probe
"""

from __future__ import annotations

import json
import os

import torch

from benchmarks.experiments.forward_probe import graph_us, log
from benchmarks.experiments.large_probe import N_SETS, dt, formulas, host_us, operands
from lorahot.kernels import wide_linear as W

OUT = os.environ.get("OUT", "/tmp")
#: name -> (rows, in, out, calls per step)
SHAPES = {
    "640 attn": (8192, 640, 640, 60),  # attn1 q/k/v/out, attn2 q/out: 6 per block, 10 blocks
    "640 xattn kv": (154, 2048, 640, 20),
    "640 ff in": (8192, 640, 5120, 10),
    "640 ff out": (8192, 2560, 640, 10),
    "1280 attn": (2048, 1280, 1280, 360),
    "1280 xattn kv": (154, 2048, 1280, 120),
    "1280 ff in": (2048, 1280, 10240, 60),
    "1280 ff out": (2048, 5120, 1280, 60),
}
#: the base UNet's default-mode step on an H200 (runs/20261130T115640-diffusion.log)
BASE_STEP_MS = 40.76


def _expand_kernels(x: torch.Tensor, wa: torch.Tensor, b: torch.Tensor, n: int) -> list[str]:
    """The GPU kernels of one wide call: the GEMM over [W; s*A], then the in-place expand."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        yc = torch.nn.functional.linear(x, wa)
        yc[:, :n].addmm_(yc[:, n:], b)
        torch.cuda.synchronize()
    return [e.name[:60] for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def main() -> None:
    log("torch", torch.__version__, torch.cuda.get_device_name())
    table: dict = {}
    gpu_extra = {"lib": 0.0, "cat_pre": 0.0, "wide_op": 0.0}
    host_extra = dict(gpu_extra)
    for name, (m, k, n, count) in SHAPES.items():
        sets, x, s, sb = operands(m, k, n)
        fns: dict[str, list] = {}
        for w, a, b in sets:
            ap = (a * sb).to(dt)
            wa = torch.cat([w, ap])
            chosen = {
                f: fn for f, fn in formulas(x, w, wa, a, ap, b, s, sb, n).items() if f in ("base", "lib", "cat_pre")
            }
            chosen["wide_op"] = lambda x=x, wa=wa, b=b: W.wide_linear(x, wa, b)
            for f, fn in chosen.items():
                fns.setdefault(f, []).append(fn)
        w, a, b = sets[0]
        ref = x.double() @ w.double().T + 0.5 * (x.double() @ a.double().T) @ b.double()
        for f in ("lib", "cat_pre", "wide_op"):
            err = float((fns[f][0]().double() - ref).norm() / ref.norm())
            assert err < 2e-2, (name, f, err)
        row: dict = {}
        for f, calls in fns.items():

            def run_all(calls=calls):
                for c in calls:
                    c()

            row[f] = round(graph_us(run_all, N_SETS), 2)
            row[f + "_host"] = round(host_us(run_all, N_SETS), 1)
        row["expand_kernels"] = _expand_kernels(x, torch.cat([w, (a * sb).to(dt)]), b, n)
        for f in gpu_extra:
            gpu_extra[f] += count * (row[f] - row["base"])
            host_extra[f] += count * (row[f + "_host"] - row["base_host"])
        table[name] = row
        log(f"{name:14s} " + "  ".join(f"{f} {v}" for f, v in row.items() if f != "expand_kernels"))
        log(f"{'':14s} expand kernels: {row['expand_kernels']}")
        del sets, fns
        torch.cuda.empty_cache()
    summary = {
        "gpu_extra_ms_per_step": {f: round(v / 1e3, 2) for f, v in gpu_extra.items()},
        "host_extra_ms_per_step": {f: round(v / 1e3, 2) for f, v in host_extra.items()},
        "base_step_ms": BASE_STEP_MS,
    }
    log(json.dumps(summary))
    with open(os.path.join(OUT, "unet_probe.json"), "w") as fh:
        json.dump({"table": table, "summary": summary}, fh, indent=1)


if __name__ == "__main__":
    main()
