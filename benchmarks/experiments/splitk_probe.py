"""Probe (tried and reverted): split K summed inside the fused kernel against a second launch.

Commit da555a2 made the tile's last split-K program add the partials (an atomic count on a
per-launch region of a zeroed counter ring), one launch per layer instead of two; reverted in
the next commit after this probe. It needs that commit's kernel
(``git show da555a2:lorahot/kernels/triton_lora_linear.py``). Each shape: 22 weight sets in a
CUDA graph, us per call, the in-kernel sum against the ``_split_k_sum`` launch.

H200, torch 2.11.0+cu130, Triton 3.6.0, 2026-11-30 (``runs/20261130T164500-splitk-probe.log``):
the one-launch form was never faster and up to 30% slower at 64 rows (q/o 12.35 against 9.47
us, down 17.28 against 14.13): the last program's serial read of the partials outlasts the
small second kernel, whose launch inside a CUDA graph costs little.

    PYTHONPATH=. python3 benchmarks/experiments/splitk_probe.py
"""

from __future__ import annotations

import torch

from benchmarks.experiments.forward_probe import graph_us
from lorahot.kernels import triton_lora_linear as K

DT, R = torch.bfloat16, 64
SHAPES = {"qo": (2048, 2048), "kv": (2048, 256), "gateup": (2048, 5632), "down": (5632, 2048)}


def main() -> None:
    in_kernel = K._counters  # type: ignore[attr-defined]  # only at da555a2
    for m in (1, 64):
        for name, (k, n) in SHAPES.items():
            sets = [
                (
                    torch.randn(n, k, device="cuda", dtype=DT) / k**0.5,
                    torch.randn(R, k, device="cuda", dtype=DT) / k**0.5,
                    torch.randn(R, n, device="cuda", dtype=DT),
                )
                for _ in range(22)
            ]
            x = torch.randn(m, k, device="cuda", dtype=DT)
            scale = torch.rand(R, device="cuda")
            outs = [torch.empty(m, n, device="cuda", dtype=DT) for _ in sets]
            config = K.config_for(m, n, k)

            def calls(sets=sets, x=x, scale=scale, outs=outs, config=config) -> None:
                for (w, a, b), o in zip(sets, outs):
                    K.launch(x, w, None, a, b, scale, o, config)

            K._counters = in_kernel  # type: ignore[attr-defined]
            calls()  # the ring exists before the capture
            one = graph_us(calls, 22)
            K._counters = lambda *_: None  # type: ignore[attr-defined]
            two = graph_us(calls, 22)
            K._counters = in_kernel  # type: ignore[attr-defined]
            print(f"m={m:3d} {name:7s} split={config[-1]:2d} one-launch {one:6.2f} us  two-launch {two:6.2f} us")


if __name__ == "__main__":
    main()
