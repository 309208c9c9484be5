"""Probe: a Triton GEMM fed by the tensor memory accelerator, with each row tile's slot expand in its accumulator.

The routed prefill reads 1.37-1.39x the base model's GPU time (seventeenth session). Its layers
run cuBLAS's GEMM, then the segmented shrink and an expand that reads the base output back and
writes it again. The fused routed kernel, which puts the expands into the base product's
accumulator, ran its base product at 1.2-1.3x cuBLAS's GEMM at 2048 rows
(``prefill_probe.py``, fifteenth session): it loads its tiles through pointers. The question
here: does a kernel that loads ``x`` and ``W`` through tensor descriptors (the H100's TMA
engine), persistent or one tile per program, come close enough to cuBLAS that the expand's
output pass can be dropped?

Per TinyLlama projection shape, ``PROBE_M`` rows (2048), ``PROBE_T`` rows per routing entry
(256), 8 slots, rank 64, bf16, in a CUDA graph over 22 weight sets (weights stream from HBM),
us per call:

- ``base``: cuBLAS's GEMM alone;
- ``pair d8``: the base GEMM, then the segmented shrink and expand (the routed layer now);
- ``shrink``: the segmented shrink alone (d8);
- ``wide``: the single-adapter eager formula (``[W; s*A]`` in one GEMM, then the expand in
  place), what one adapter costs now;
- per configuration (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, persistent): ``tma`` the base
  product alone, ``tma+e d8`` with each row tile's slot expand (``h`` from the shrink, given)
  added in its accumulator, and ``tma+e d1`` with every row on one slot (the single-adapter
  case). ``tma+e`` plus ``shrink`` is what a routed layer (or, d1, a single-adapter one) would
  cost. Each output is checked against cuBLAS (and the pair) first.

What to keep: if ``tma+e d8`` plus ``shrink`` beats ``pair d8`` by several us on every shape,
the routed layer takes it above the fused path's rows; if ``tma+e d1`` plus ``shrink`` beats
``wide``, the single-adapter eager layer too. ``PROBE_M=8192`` times the long prefill.

The kernel is the library's (:mod:`lorahot.kernels.triton_tma_linear`, used where
``LORAHOT_ROUTED_TMA=1``; its correctness is tested in Triton's interpreter and compiled for sm90
by ``make test-interpret``); ``tma`` runs it with every row routed to no slot.

    PYTHONPATH=. python3 -m benchmarks.experiments.tma_probe
"""

from __future__ import annotations

import os

import torch

M, T_ROWS = int(os.environ.get("PROBE_M", "2048")), int(os.environ.get("PROBE_T", "256"))
SLOTS, R = 8, 64
#: (BLOCK_M, BLOCK_N, BLOCK_K, stages, warps, persistent)
CONFIGS = [
    (128, 128, 64, 3, 4, False),
    (128, 128, 64, 4, 8, False),
    (128, 256, 64, 3, 8, False),
    (128, 128, 64, 3, 4, True),
    (128, 128, 64, 4, 8, True),
    (128, 256, 64, 3, 8, True),
    (64, 128, 64, 4, 4, True),
]


def _reference_h(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, route: torch.Tensor, t: int) -> torch.Tensor:
    """Each row's scaled shrink in float32 (rows of no slot zero)."""
    tokens = route[:, None].expand(-1, t).reshape(-1)
    ak = a[tokens.clamp(min=0)].float()  # [rows, R, K]
    h = torch.einsum("mk,mrk->mr", x.float(), ak) * s[tokens.clamp(min=0)]
    return torch.where((tokens >= 0)[:, None], h, 0.0)


def main() -> None:
    import triton

    from benchmarks.experiments.forward_probe import graph_us
    from benchmarks.experiments.routed_probe import SETS, SHAPES, weight_sets
    from lorahot.kernels import routed_lora
    from lorahot.kernels import triton_routed_lora as TR
    from lorahot.kernels import triton_tma_linear as TMA

    dev, dt = torch.device("cuda"), torch.bfloat16
    print(f"{M} rows, {T_ROWS} per routing entry, {SLOTS} slots, rank {R}, us per call")
    print(f"torch {torch.__version__}, triton {triton.__version__}, {torch.cuda.get_device_name()}")
    print(f"{'shape':8s} " + " ".join(f"{h:>10s}" for h in ("base", "pair d8", "shrink", "wide")))
    for name, (k, n) in SHAPES.items():
        w, a, bt, s, x = weight_sets(k, n, M, dev, dt)
        out = torch.empty(M, n, device=dev, dtype=dt)
        ys = [torch.empty(M, n, device=dev, dtype=dt) for _ in range(SETS)]
        route = torch.tensor([i % 8 for i in range(M // T_ROWS)], device=dev)
        none = torch.full_like(route, -1)  # the base product alone
        one = torch.zeros_like(route)  # d1: every row on slot 0
        segs = routed_lora.segments(route, SLOTS)
        hs = {id(r): _reference_h(x, a[0], s, r, T_ROWS).contiguous() for r in (route, none, one)}
        pair_out = torch.empty(M, n, device=dev, dtype=dt)
        TR.launch(x, x @ w[0].T, a[0], bt[0], s, route, pair_out, gather=False, segs=segs)
        base_out = x @ w[0].T

        def base() -> None:
            for wi in w:
                torch.mm(x, wi.T, out=out)

        def pair() -> None:
            for wi, yi, ai, bi in zip(w, ys, a, bt):
                torch.mm(x, wi.T, out=yi)
                TR.launch(x, yi, ai, bi, s, route, out, gather=False, segs=segs)

        def shrink() -> None:
            for ai in a:
                TR.shrink(x, ai, s, segs, T_ROWS)

        wide = [torch.cat([wi, (ai[0] * 0.5).to(dt)]) for wi, ai in zip(w, a)]

        def wide_single() -> None:
            for wa, bi in zip(wide, bt):
                yh = torch.nn.functional.linear(x, wa)
                yh[:, :n].addmm_(yh[:, n:], bi[0])

        row = {f.__name__: graph_us(f, SETS) for f in (base, pair, shrink, wide_single)}
        print(f"{name:8s} " + " ".join(f"{v:10.1f}" for v in row.values()), flush=True)
        for cfg in CONFIGS:
            label = f"{'P' if cfg[5] else ''}{cfg[0]}x{cfg[1]}x{cfg[2]}s{cfg[3]}w{cfg[4]}"

            def run(r: torch.Tensor, wi: torch.Tensor, bi: torch.Tensor, into: torch.Tensor, cfg: tuple = cfg) -> None:
                TMA.launch(x, wi, None, hs[id(r)], bi, r, T_ROWS, into, cfg)

            try:
                errors = []
                for r, want in ((none, base_out), (route, pair_out)):
                    got = torch.full_like(out, float("nan"))
                    run(r, w[0], bt[0], got)
                    errors.append((got.float() - want.float()).abs().max().item())
                ok = errors[0] < 3e-2 and errors[1] < 6e-2
                times = [
                    graph_us(lambda r=r: [run(r, wi, bi, out) for wi, bi in zip(w, bt)], SETS) if ok else float("nan")
                    for r in (none, route, one)
                ]
                t0, t1, t2 = times
                print(
                    f"  {name:8s} {label:22s} tma {t0:7.1f} ({t0 / row['base']:.2f}x base)  tma+e d8 {t1:7.1f}, "
                    f"+shrink {t1 + row['shrink']:7.1f} (pair {row['pair']:.1f})  tma+e d1 {t2:7.1f}, "
                    f"+shrink {t2 + row['shrink']:7.1f} (wide {row['wide_single']:.1f})  errors {errors[0]:.2g} "
                    f"{errors[1]:.2g}",
                    flush=True,
                )
            except Exception as exc:  # a configuration that does not compile is reported, not fatal
                print(f"  {name:8s} {label:22s} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)


if __name__ == "__main__":
    main()
