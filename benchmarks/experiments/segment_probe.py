"""Probe: the segmented routed kernels piece by piece, per tile configuration, against the bytes.

At the mixed suite's prefill (8 sequences of 256 tokens, 8 adapters) the routed pair (segmented
shrink, then segmented expand) measured 40-75 us per layer on top of the base GEMM
(``routed_probe``, ``seg d8``), where the single-adapter wide formula adds 8-20. The pair's
ideal is close to its bytes: the shrink reads ``x`` once (``2 M K``), the expand reads ``y``
and writes the output (``4 M N``), a few us at 2048 rows. This probe times each launch alone,
in a CUDA graph over 22 weight sets (weights streaming from HBM, as in the model), per
TinyLlama projection shape, for the configurations below, and prints the bytes' time at
4.0 TB/s beside them; every configuration's output is checked against the current launch's
first. ``PROBE_M`` / ``PROBE_T``: rows and rows per routing entry (default ``2048,64`` and
``256,1``).

It also times ``torch._grouped_mm`` (CUTLASS grouped GEMMs, sm90) for the same shrink and
expand on rows already grouped by slot, where this torch has it: whether a library grouped GEMM
would serve the prefill better than Triton tiles.

    PYTHONPATH=. python3 -m benchmarks.experiments.segment_probe
"""

from __future__ import annotations

import itertools
import json
import os

import torch

from benchmarks.experiments.forward_probe import graph_us
from lorahot.kernels import routed_lora
from lorahot.kernels import triton_routed_lora as T

SHAPES = {"q/o": (2048, 2048), "k/v": (2048, 256), "gate/up": (2048, 5632), "down": (5632, 2048)}
SETS, SLOTS, R = 22, 8, 64
BW = 4.0e12  # bytes/s, a round H200 figure for the bytes' column
#: shrink (BLOCK_M, BLOCK_K, SPLITS or 0 for the current rule, num_warps, num_stages)
SHRINK = [(64, 64, 0, 4, 3), (64, 64, 1, 4, 3), (64, 64, 2, 4, 3), (64, 128, 1, 4, 3), (128, 64, 1, 8, 3),
          (128, 128, 1, 8, 3), (64, 64, 4, 4, 3), (128, 64, 2, 8, 4)]  # fmt: skip
#: expand (BLOCK_M, BLOCK_N, num_warps, num_stages)
EXPAND = [(64, 128, 4, 3), (64, 64, 4, 3), (128, 128, 8, 3), (64, 256, 8, 3), (128, 256, 8, 3), (128, 64, 4, 3),
          (16, 128, 4, 3), (32, 128, 4, 3)]  # fmt: skip


def _timed(fn) -> float:
    try:
        return graph_us(fn, SETS)
    except Exception as e:  # a probe: say why and go on
        print("failed:", type(e).__name__, str(e)[:200])
        torch.cuda.synchronize()
        return float("nan")


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    ms = [int(v) for v in os.environ.get("PROBE_M", "2048,64").split(",")]
    ts = [int(v) for v in os.environ.get("PROBE_T", "256,1").split(",")]
    print(torch.__version__, torch.cuda.get_device_name(), "grouped_mm:", hasattr(torch, "_grouped_mm"))
    table: dict[str, dict[str, float]] = {}
    for (m, t), d, (name, (k, n)) in itertools.product(zip(ms, ts), (1, 8), SHAPES.items()):
        a = [torch.randn(SLOTS, R, k, device=dev, dtype=dt) / k**0.5 for _ in range(SETS)]
        bt = [torch.randn(SLOTS, R, n, device=dev, dtype=dt) / R**0.5 for _ in range(SETS)]
        w = [torch.randn(n, k, device=dev, dtype=dt) / k**0.5 for _ in range(SETS)]
        s = torch.full((SLOTS, R), 0.5, device=dev)
        x = torch.randn(m, k, device=dev, dtype=dt)
        y = torch.randn(m, n, device=dev, dtype=dt)
        out = torch.empty(m, n, device=dev, dtype=dt)
        route = torch.tensor([i % d for i in range(m // t)], device=dev)
        segs = routed_lora.segments(route, SLOTS)
        r_pad = T.rank_pad(R)
        row: dict[str, float] = {}

        def base() -> None:
            for wi in w:
                torch.mm(x, wi.T, out=out)

        row["base"] = graph_us(base, SETS)
        row["bytes shrink"] = 2 * m * k / BW * 1e6
        row["bytes expand"] = 4 * m * n / BW * 1e6
        T.launch(x, y, a[0], bt[0], s, route, out, gather=False, segs=segs)
        want = out.clone()

        def current() -> None:
            for ai, bi in zip(a, bt):
                T.launch(x, y, ai, bi, s, route, out, gather=False, segs=segs)

        row["current pair"] = graph_us(current, SETS)
        hs = {}
        for bm, bk, splits, warps, stages in SHRINK:
            sp = T._splits(k, -(-m // bm), bk) if splits == 0 else splits
            tiles = -(-m // bm)
            h = torch.zeros((m, r_pad), device=dev, dtype=torch.float32)

            def shr(bm=bm, bk=bk, sp=sp, warps=warps, stages=stages, h=h, tiles=tiles) -> None:
                for ai in a:
                    if sp > 1:
                        h.zero_()
                    T._segment_shrink[(tiles, SLOTS, sp)](
                        x, ai, s, segs, h, k, R, SLOTS, t,
                        x.stride(0), ai.stride(0), ai.stride(1), s.stride(0), h.stride(0),
                        R_PAD=r_pad, BLOCK_M=bm, BLOCK_K=bk, SPLITS=sp, num_warps=warps, num_stages=stages,
                    )  # fmt: skip

            row[f"shrink {bm}x{bk} s{sp} w{warps} st{stages}"] = _timed(shr)
            hs[(bm, bk, sp, warps, stages)] = h
        h = hs[(64, 64, 1, 4, 3)]  # no split: written, not accumulated
        ref_h = torch.stack(
            [(x[i].float() @ a[-1][route[i // t]].float().T) * 0.5 for i in range(0, m, max(1, m // 16))]
        )
        got_h = h[:: max(1, m // 16), :R]
        row["shrink rel err"] = float((got_h - ref_h).norm() / ref_h.norm())
        for bm, bn, warps, stages in EXPAND:
            tiles = -(-m // bm)

            def exp(bm=bm, bn=bn, warps=warps, stages=stages, tiles=tiles) -> None:
                for bi in bt:
                    T._segment_expand[(tiles, -(-n // bn), SLOTS + 1)](
                        y, h, bi, segs, out, n, R, SLOTS, t,
                        y.stride(0), h.stride(0), bi.stride(0), bi.stride(1), out.stride(0),
                        R_PAD=r_pad, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
                    )  # fmt: skip

            us = _timed(exp)
            if us != us:  # this configuration failed to compile or run
                row[f"expand {bm}x{bn} w{warps} st{stages}"] = us
                continue
            out.fill_(float("nan"))
            T._segment_shrink[(-(-m // 64), SLOTS, 1)](
                x, a[0], s, segs, h, k, R, SLOTS, t,
                x.stride(0), a[0].stride(0), a[0].stride(1), s.stride(0), h.stride(0),
                R_PAD=r_pad, BLOCK_M=64, BLOCK_K=64, SPLITS=1, num_warps=4,
            )  # fmt: skip
            T._segment_expand[(tiles, -(-n // bn), SLOTS + 1)](
                y, h, bt[0], segs, out, n, R, SLOTS, t,
                y.stride(0), h.stride(0), bt[0].stride(0), bt[0].stride(1), out.stride(0),
                R_PAD=r_pad, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
            )  # fmt: skip
            err = float((out.float() - want.float()).norm() / want.float().norm())
            row[f"expand {bm}x{bn} w{warps} st{stages}"] = us if err < 1e-2 else float("nan")
        if hasattr(torch, "_grouped_mm") and m >= 64:
            offs = torch.cumsum(torch.bincount(route.repeat_interleave(t), minlength=SLOTS), 0).to(torch.int32)
            at = [ai.transpose(1, 2) for ai in a]  # [G, K, R] views
            try:
                torch._grouped_mm(x, at[0], offs=offs)

                def gshr() -> None:
                    for ai in at:
                        torch._grouped_mm(x, ai, offs=offs)

                def gexp() -> None:
                    hb = torch.empty(m, R, device=dev, dtype=dt)
                    for bi in bt:
                        torch.add(y, torch._grouped_mm(hb, bi, offs=offs), out=out)

                row["grouped_mm shrink"] = graph_us(gshr, SETS)
                row["grouped_mm expand+add"] = graph_us(gexp, SETS)
            except Exception as e:  # a probe: say why and go on
                print("grouped_mm:", type(e).__name__, str(e)[:200])
        key = f"m{m} t{t} d{d} {name}"
        table[key] = row
        print(
            key, " ".join(f"{k2}={v:.1f}" if "err" not in k2 else f"{k2}={v:.1e}" for k2, v in row.items()), flush=True
        )
    path = os.path.join(os.environ.get("OUT", "/tmp"), "segment_probe.json")
    with open(path, "w") as f:
        json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
