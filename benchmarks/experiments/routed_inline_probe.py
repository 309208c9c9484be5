"""Probe: the routed decode layer as one kernel, each program computing its rows' shrinks itself.

The mixed suite's decode (64 rows, one slot per row, 8 slots, rank 64) runs 1.70-1.75x the base
model whether the rows use 1 or 8 adapters, where the single-adapter path runs 1.28x
(``runs/20261130T214206-mixed.json``). ``routed_probe`` puts the library's routed layer at
15.4 / 11.3 / 19.8 / 20.1 us per q-o / k-v / gate-up / down call, against a base GEMM of
6.5 / 5.4 / 9.6 / 11.5. The cost does not follow the adapters' bytes: it is the layer's
launches. The segmented shrink writes every row's shrink into a zeroed float32 workspace (a
fill, then atomics), then the fused kernel adds each slot's expand, then a small kernel sums
the split-K partials: four launches, where the single-adapter fused kernel runs one or two.

This probe times a kernel that needs no workspace (since the eleventh session the library's
lorahot.kernels.triton_routed_inline, off by default). Each program (a tile of rows, a tile of
outputs, a chunk of K) runs the base product over its chunk. Then, for each slot its rows use,
it runs that slot's shrink over the same chunk with the other rows' ``x`` masked to zero, and
that slot's expand of the partial shrink into the partial output (the shrink is linear in K, as
in the single-adapter kernel's split K). One launch, or two with split K, as for one adapter.

- **What it costs:** for each slot present in a tile, one more pass over that tile's ``x``
  chunk and the slot's A chunk. With one adapter that is the single-adapter kernel's work. With
  8 adapters over 64 rows, every tile holds all 8: 8 dots of the tile's 64 rows, where 8 rows
  each would do.
- **The prediction:** with 1 adapter, near the single-adapter kernel (9.3 / 5.3 / 13-18 /
  13.8 us at 64 rows). With 8, between that and the library's, bound by L2 reads of the A
  chunks.

**Wide tiles (eleventh session, not yet run).** The ninth session's run (``inline`` columns:
12.1 / 7.9 / 26.2 / 18.8 us with 1 adapter, 33.7 / 27.4 / 90.0 / 60.7 with 8, against the
library's 15.0 / 11.0 / 19.6 / 20.2 and 15.3 / 12.4 / 21.2 / 21.4) lost where every program
streams many slots' A chunks: each of the 32-64-wide output tiles recomputes the shrinks of
its rows. With ``bn``-wide tiles (``routed_inline.config``, the ``wNNN`` columns) each program's shrinks
serve ``bn`` outputs, so the A chunks are read ``bn / 64`` times less often. Predicted at
256: with 1 adapter, near the single-adapter kernel (``routed_probe``'s ``one``: 9.1 / 5.5 /
13.6 / 13.4); with 8, q-o and k-v near 12-14 us and gate-up and down within 2 us of the
library's (their A chunks, 8 x 64 rows, still outweigh the 256 rows of W a program reads).
If that holds, the routed decode would drop the shrink's launch and its zero fill wherever
the rows use few adapters: about 0.85 ms of the 1.24 ms between the routed and the
single-adapter decode.

Columns (us per call in a CUDA graph over 22 weight sets, 64 rows): ``base`` the base GEMM;
``lib d1`` / ``lib d8`` the library's routed layer (``lorahot::routed_lora_linear``'s kernels)
over 1 and 8 distinct slots; ``inline d1`` / ``inline d8`` this kernel, tiled as the library
tiles one adapter; ``w128`` / ``w256`` this kernel with wider tiles. Each output is checked
against the float64 per-row reference first, every tiling.

    PYTHONPATH=. python3 -m benchmarks.experiments.routed_inline_probe
    PROBE_CPU=1 TRITON_INTERPRET=1 PYTHONPATH=.interp:. python3 -m benchmarks.experiments.routed_inline_probe

``PROBE_CPU=1`` (with Triton's interpreter) runs small shapes on the CPU, checked and not timed.
"""

from __future__ import annotations

import os

import torch
import triton

from benchmarks.experiments.routed_probe import SETS, SHAPES, SLOTS, R, weight_sets
from lorahot.kernels import routed_lora
from lorahot.kernels import triton_lora_linear as F
from lorahot.kernels import triton_routed_inline as routed_inline

CPU = os.environ.get("PROBE_CPU") == "1"
M = int(os.environ.get("PROBE_M", "64"))
#: output tile widths of the ``wide`` columns (the library's tiles are 32-64 wide at decode)
WIDE = (128, 256)


def _reference(
    x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, s: torch.Tensor, route: torch.Tensor
) -> torch.Tensor:
    d = torch.Tensor.double
    y = d(x) @ d(w).T
    return routed_lora.reference(d(x), y, d(a), d(bt), d(s), routed_lora.token_route(route, x.shape[0]))


def _check(dev: torch.device, dt: torch.dtype, shapes: dict[str, tuple[int, int]], m: int) -> None:
    """Every shape, routes over 1 and several slots and with rows of no slot, against float64."""
    g = torch.Generator(device=dev).manual_seed(0)
    for name, (k, n) in shapes.items():
        w = (torch.randn(n, k, device=dev, generator=g) / k**0.5).to(dt)
        a = (torch.randn(SLOTS, R, k, device=dev, generator=g) / k**0.5).to(dt)
        bt = (torch.randn(SLOTS, R, n, device=dev, generator=g) / R**0.5).to(dt)
        s = torch.rand(SLOTS, R, device=dev, generator=g) + 0.5
        x = torch.randn(m, k, device=dev, generator=g).to(dt)
        for route in (torch.zeros(m, dtype=torch.long), torch.arange(m) % SLOTS, torch.arange(m) % (SLOTS + 1) - 1):
            route = route.to(dev)
            want = _reference(x, w, a, bt, s, route)
            for config in (F.config_for(m, n, k), *(routed_inline.config(m, n, k, bn) for bn in WIDE)):
                out = torch.full((m, n), float("nan"), device=dev, dtype=dt)
                routed_inline.launch(x, w, None, a, bt, s, route, out, config)
                err = float((out.double() - want).norm() / want.norm())
                assert err < 1e-2, (name, config, route.tolist()[:8], err)
        print(f"{name}: matches the float64 reference (3 routings, {1 + len(WIDE)} tilings)", flush=True)


def main() -> None:
    if CPU:
        _check(torch.device("cpu"), torch.float16, {"small": (300, 130), "split": (2048, 64)}, 40)
        return
    from benchmarks.experiments.forward_probe import graph_us

    dev, dt = torch.device("cuda"), torch.bfloat16
    print(torch.__version__, torch.cuda.get_device_name(), "triton", triton.__version__, f"m={M}", flush=True)
    _check(dev, dt, SHAPES, M)
    print(
        f"{'shape':8s} {'base':>8s} {'lib d1':>8s} {'lib d8':>8s} {'inline d1':>10s} {'inline d8':>10s}"
        + "".join(f" {f'w{bn} d{d}':>9s}" for bn in WIDE for d in (1, 8))
    )
    for name, (k, n) in SHAPES.items():
        w, a, bt, s, x = weight_sets(k, n, M, dev, dt)
        out = torch.empty(M, n, device=dev, dtype=dt)
        routes = {d: torch.tensor([i % d for i in range(M)], device=dev) for d in (1, 8)}
        grouped = {d: routed_lora.segments(r, SLOTS) for d, r in routes.items()}
        config = F.config_for(M, n, k)

        def base() -> None:
            for wi in w:
                torch.mm(x, wi.T, out=out)

        def library(d: int) -> None:
            for wi, ai, bi in zip(w, a, bt):
                F.launch(x, wi, None, ai, bi, s, out, config, routing=(grouped[d], routes[d], 1, None))

        def inline(d: int) -> None:
            for wi, ai, bi in zip(w, a, bt):
                routed_inline.launch(x, wi, None, ai, bi, s, routes[d], out, config)

        row = [graph_us(base, SETS)]
        row += [graph_us(lambda d=d: library(d), SETS) for d in (1, 8)]
        row += [graph_us(lambda d=d: inline(d), SETS) for d in (1, 8)]

        def wide(d: int, bn: int) -> None:
            cfg = routed_inline.config(M, n, k, bn)
            for wi, ai, bi in zip(w, a, bt):
                routed_inline.launch(x, wi, None, ai, bi, s, routes[d], out, cfg)

        row += [graph_us(lambda d=d, bn=bn: wide(d, bn), SETS) for bn in WIDE for d in (1, 8)]
        print(
            f"{name:8s} {row[0]:8.1f} {row[1]:8.1f} {row[2]:8.1f} {row[3]:10.1f} {row[4]:10.1f}"
            + "".join(f" {v:9.1f}" for v in row[5:]),
            flush=True,
        )


if __name__ == "__main__":
    main()
