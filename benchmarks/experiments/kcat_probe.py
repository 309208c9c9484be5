"""Probe: the routed prefill's expands inside the base GEMM, by concatenation along K.

At 2048 rows over 8 adapters a routed layer runs cuBLAS's base GEMM, then the segmented pair:
the shrink, and an expand that reads the base output back and writes it again. The
single-adapter wide layer (:mod:`lorahot.kernels.wide_linear`) avoids that output pass when
compiled: ``y = [x | h] @ [W, B_s].T``, the expand inside one GEMM over ``K = in + R``. The
routed form of it: every slot's B beside W, ``Wcat = [W, B_0 .. B_{S-1}]`` (``[out, in + S*R]``),
and each row's scaled shrink placed in its own slot's columns of ``H [rows, S*R]`` (zeros in the
others), so ``y = [x | H] @ Wcat.T``: one cuBLAS GEMM, the expands in it, at the cost of ``S*R /
in`` more arithmetic (25% at ``in`` 2048, 9% at 5632) instead of an output pass.

Per TinyLlama projection shape, 2048 rows routed 256 rows per entry over 8 slots, in a CUDA
graph over 22 weight sets, us per call:

- ``base``: cuBLAS's GEMM alone; ``pair``: the base GEMM, then the segmented pair (now);
- ``gemm K+SR``: the concatenated GEMM alone, its input already built;
- ``shrink``: the routed shrink operator alone (compact, each row its own slot's columns);
- compiled (inductor, default mode), the input ``x`` from a SiLU as in the model: ``c base``
  (SiLU and the base linear), ``c pair`` (SiLU and the routed operator, what the model runs
  now), ``c kcat`` (SiLU, the routed shrink, ``H`` and the concatenation in one elementwise
  kernel, the GEMM), each checked against the pair's output.

    PYTHONPATH=. python3 -m benchmarks.experiments.kcat_probe
"""

from __future__ import annotations

import torch

from benchmarks.experiments.forward_probe import graph_us
from benchmarks.experiments.routed_probe import SETS, SHAPES, SLOTS, weight_sets
from lorahot.kernels import routed_linear, routed_lora
from lorahot.kernels import triton_routed_lora as T

M, T_ROWS, R = 2048, 256, 64


def kcat(inp, wcat, a, s, route, segs, tokens):
    x = torch.nn.functional.silu(inp)
    h = routed_linear.routed_shrink(x, a, s, route, segs)[:, :R]
    cols = torch.arange(SLOTS * R, device=x.device) // R
    hw = torch.where(tokens[:, None] == cols[None, :], h.repeat(1, SLOTS), 0.0).to(x.dtype)
    return torch.nn.functional.linear(torch.cat([x, hw], dim=1), wcat)


def pair(inp, w, a, bt, s, route, segs):
    x = torch.nn.functional.silu(inp)
    return routed_linear.routed_lora_linear(x, w, None, a, bt, s, route, segs, sized=True)


def base(inp, w):
    return torch.nn.functional.linear(torch.nn.functional.silu(inp), w)


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(f"{M} rows, {T_ROWS} per routing entry, {SLOTS} slots, rank {R}, us per call", flush=True)
    head = ["base", "pair", "gemm K+SR", "shrink", "c base", "c pair", "c kcat"]
    print(f"{'shape':8s} " + " ".join(f"{h:>10s}" for h in head), flush=True)
    for name, (k, n) in SHAPES.items():
        torch._dynamo.reset()
        w, a, bt, s, x = weight_sets(k, n, M, dev, dt)
        wcat = [torch.cat([wi, bi.reshape(SLOTS * R, n).t()], dim=1).contiguous() for wi, bi in zip(w, bt)]
        route = torch.arange(M // T_ROWS, device=dev) % SLOTS
        segs = routed_lora.segments(route, SLOTS)
        tokens = routed_lora.token_route(route, M)
        out = torch.empty(M, n, device=dev, dtype=dt)
        ys = [torch.empty(M, n, device=dev, dtype=dt) for _ in range(SETS)]
        xh = torch.randn(M, k + SLOTS * R, device=dev, dtype=dt)

        def eager_base() -> None:
            for wi in w:
                torch.mm(x, wi.T, out=out)

        def eager_pair() -> None:
            for wi, yi, ai, bi in zip(w, ys, a, bt):
                torch.mm(x, wi.T, out=yi)
                T.launch(x, yi, ai, bi, s, route, out, gather=False, segs=segs)

        def gemm() -> None:
            for wc in wcat:
                torch.mm(xh, wc.T, out=out)

        def shrink() -> None:
            for ai in a:
                routed_linear.routed_shrink(x, ai, s, route, segs)

        cb, cp, ck = (torch.compile(f, dynamic=False) for f in (base, pair, kcat))
        want = cp(x, w[0], a[0], bt[0], s, route, segs)
        got = ck(x, wcat[0], a[0], s, route, segs, tokens)
        err = (got.float() - want.float()).abs().max().item()
        scale = want.float().abs().max().item()
        row = [graph_us(f, SETS) for f in (eager_base, eager_pair, gemm, shrink)]
        row.append(graph_us(lambda: [cb(x, wi) for wi in w], SETS))
        row.append(graph_us(lambda: [cp(x, wi, ai, bi, s, route, segs) for wi, ai, bi in zip(w, a, bt)], SETS))
        row.append(graph_us(lambda: [ck(x, wc, ai, s, route, segs, tokens) for wc, ai in zip(wcat, a)], SETS))
        print(
            f"{name:8s} " + " ".join(f"{v:10.1f}" for v in row) + f"   kcat-pair {err:.3g} of {scale:.3g}", flush=True
        )


if __name__ == "__main__":
    main()
