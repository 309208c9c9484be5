"""Probe: where the UNet's compile time goes, base against lorahot, each alone with cold caches.

The diffusion suite measured lorahot's whole-model compile of the SDXL-shaped UNet at 1.49x the
base model's alone (eleventh session) and at 1.53-1.61x with three or four processes compiling
at once (the target is 1.5x). This probe compiles one configuration (``base`` or ``lorahot``,
its argument; ``--tiny`` for the 3-level UNet) in its own process, with empty inductor and
Triton caches of its own, in default mode (``torch.compile(unet)``), and prints:

- the first call's seconds (trace, compile, run) and the second call's;
- inductor's counts: kernels generated, IR nodes before fusion;
- dynamo's phase totals (``compile_times``), so the two processes' phases can be set side by side.

No adapter is loaded: the compiled graph does not depend on the arena's contents (its shapes are
fixed at ``max_rank``), and the build skips the suite's float32 references. Run each
configuration in a fresh process, one after the other::

    for c in base lorahot; do PYTHONPATH=. python3 -m benchmarks.experiments.unet_compile_probe $c; done
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

# empty compile caches of its own: nothing compiled before on this machine is reused
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-"))

import torch

import lorahot
from benchmarks.diffusion import FAMILIES, MAX_RANK


def main() -> None:
    config = sys.argv[1] if len(sys.argv) > 1 else "lorahot"
    tiny = "--tiny" in sys.argv
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    fam = FAMILIES["sdxl"]
    cfg = fam.tiny if tiny else fam.config
    t0 = time.perf_counter()
    torch.manual_seed(0)
    with torch.device(dev):
        model = fam.model_type()(**cfg).to(dtype).eval().requires_grad_(False)
    inputs = fam.inputs(cfg, tiny, dev, dtype)
    layers = 0
    if config == "lorahot":
        runtime = lorahot.inject(model, fam.targets, max_rank=MAX_RANK)
        layers = len(runtime.layers)
    elif config != "base":
        raise SystemExit(f"unknown configuration {config!r}: base or lorahot")
    print(f"[{config}] built in {time.perf_counter() - t0:.1f} s, {layers} LoRA layers", flush=True)

    compiled = torch.compile(model)
    times = []
    for _ in range(2):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            compiled(**inputs)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    from torch._inductor import metrics

    graphs = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    print(
        f"[{config}] first call {times[0]:.1f} s, second {times[1] * 1e3:.1f} ms, graphs {graphs}, "
        f"kernels generated {metrics.generated_kernel_count}, IR nodes before fusion {metrics.ir_nodes_pre_fusion}",
        flush=True,
    )
    try:
        report = torch._dynamo.utils.compile_times(repr="str", aggregate=True)
    except Exception as exc:  # the report's signature moves between releases
        report = f"compile_times: {exc}"
    for line in str(report).splitlines():
        print(f"[{config}] {line}")


if __name__ == "__main__":
    main()
