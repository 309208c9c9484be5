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

    PYTHONPATH=. python3 -m benchmarks.experiments.tma_probe
    PROBE_CPU=1 TRITON_INTERPRET=1 ... (small shapes in Triton's interpreter: the outputs only)
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

CPU = os.environ.get("PROBE_CPU") == "1"
M, T_ROWS = (
    int(os.environ.get("PROBE_M", "64" if CPU else "2048")),
    int(os.environ.get("PROBE_T", "16" if CPU else "256")),
)
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
if CPU:
    CONFIGS = [(32, 32, 32, 2, 4, False), (32, 32, 32, 2, 4, True)]


@triton.jit
def _tile_of(t, num_m, num_n, GROUP_M: tl.constexpr):
    """Output tile ``t``'s (row tile, column tile), in groups of ``GROUP_M`` row tiles (L2 reuse of ``W``)."""
    per_group = GROUP_M * num_n
    first_m = (t // per_group) * GROUP_M
    size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (t % per_group) % size, (t % per_group) // size


@triton.jit
def _expand_into(acc, H, BT, ROUTE, off_m, off_n, M, N, T, stride_h, stride_bs, stride_br,
                 R: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, SLOTS: tl.constexpr):  # fmt: skip
    """``acc`` plus, for each slot its rows use, those rows' ``h`` times the slot's ``Bt`` columns."""
    rm = off_m + tl.arange(0, BM)
    slot = tl.load(ROUTE + rm // T, mask=rm < M, other=-1)
    lo = tl.min(tl.where(slot >= 0, slot, SLOTS), axis=0)
    hi = tl.max(slot, axis=0)
    rr = tl.arange(0, R)
    rn = off_n + tl.arange(0, BN)
    h = tl.load(H + rm[:, None].to(tl.int64) * stride_h + rr[None, :], mask=(slot >= 0)[:, None], other=0.0)
    for k in range(lo, hi + 1):
        hs = tl.where((slot == k)[:, None], h, 0.0).to(BT.dtype.element_ty)
        bt = tl.load(BT + k * stride_bs + rr[:, None] * stride_br + rn[None, :], mask=(rn < N)[None, :], other=0.0)
        acc = tl.dot(hs, bt, acc)
    return acc


@triton.jit
def _tma_gemm(x_desc, w_desc, y_desc, H, BT, ROUTE, M, N, K, T, stride_h, stride_bs, stride_br,
              LORA: tl.constexpr, R: tl.constexpr, SLOTS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              BK: tl.constexpr, GROUP_M: tl.constexpr, PROGRAMS: tl.constexpr, PERSISTENT: tl.constexpr):  # fmt: skip
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    # one tile per program where not persistent (the grid has a program per tile); a loop over
    # tiles, flattened with the K loop so loads run ahead across tiles, where persistent
    for t in tl.range(tl.program_id(0), num_m * num_n, PROGRAMS, flatten=PERSISTENT):
        pid_m, pid_n = _tile_of(t, num_m, num_n, GROUP_M)
        off_m, off_n = pid_m * BM, pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for kk in range(k_tiles):
            acc = tl.dot(x_desc.load([off_m, kk * BK]), w_desc.load([off_n, kk * BK]).T, acc)
        if LORA:
            acc = _expand_into(
                acc, H, BT, ROUTE, off_m, off_n, M, N, T, stride_h, stride_bs, stride_br, R, BM, BN, SLOTS
            )
        y_desc.store([off_m, off_n], acc.to(y_desc.dtype))


def programs(device: torch.device) -> int:
    return 4 if CPU else torch.cuda.get_device_properties(device).multi_processor_count


def tma_linear(x, w, out, cfg, h=None, bt=None, route=None, t=1):
    """``out = x @ w.T`` (plus each row tile's slot expand where ``h`` is given), by ``cfg``."""
    bm, bn, bk, stages, warps, persistent = cfg
    m, k = x.shape
    n = w.shape[0]
    xd = TensorDescriptor.from_tensor(x, [bm, bk])
    wd = TensorDescriptor.from_tensor(w, [bn, bk])
    yd = TensorDescriptor.from_tensor(out, [bm, bn])
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    progs = min(tiles, programs(x.device)) if persistent else tiles
    lora = h is not None
    dummy = out
    _tma_gemm[(progs,)](
        xd, wd, yd, h if lora else dummy, bt if lora else dummy, route if lora else dummy,
        m, n, k, t, h.stride(0) if lora else 0, bt.stride(0) if lora else 0, bt.stride(1) if lora else 0,
        LORA=lora, R=R, SLOTS=SLOTS, BM=bm, BN=bn, BK=bk, GROUP_M=8, PROGRAMS=progs, PERSISTENT=persistent,
        num_stages=stages, num_warps=warps,
    )  # fmt: skip
    return out


def _reference_h(x, a, s, route, t):
    """Each row's scaled shrink in float32 (rows of no slot zero)."""
    tokens = route[:, None].expand(-1, t).reshape(-1)
    ak = a[tokens.clamp(min=0)].float()  # [rows, R, K]
    h = torch.einsum("mk,mrk->mr", x.float(), ak) * s[tokens.clamp(min=0)]
    return torch.where((tokens >= 0)[:, None], h, 0.0)


def check_cpu() -> None:
    dt = torch.float16
    torch.manual_seed(0)
    for k, n in [(64, 96), (96, 64)]:
        x = torch.randn(M, k, dtype=dt)
        w = torch.randn(n, k, dtype=dt) / k**0.5
        a = torch.randn(SLOTS, R, k, dtype=dt) / k**0.5
        bt = torch.randn(SLOTS, R, n, dtype=dt) / R**0.5
        s = torch.full((SLOTS, R), 0.5)
        for route in ([1, 1, 3, -1], [0, 2, 2, 7]):
            route_t = torch.tensor(route)
            t = M // len(route)
            h = _reference_h(x, a, s, route_t, t)
            tokens = route_t[:, None].expand(-1, t).reshape(-1)
            want = x.double() @ w.double().T
            upd = torch.einsum("mr,mrn->mn", h.half().double(), bt[tokens.clamp(min=0)].double())
            want += torch.where((tokens >= 0)[:, None], upd, 0.0)
            for cfg in CONFIGS:
                out = torch.full((M, n), float("nan"), dtype=dt)
                tma_linear(x, w, out, cfg, h, bt, route_t, t)
                err = (out.double() - want).abs().max().item()
                print(f"k={k} n={n} route={route} cfg={cfg}: max error {err:.3g}")
                assert err < 2e-2, err
                base = tma_linear(x, w, torch.full((M, n), float("nan"), dtype=dt), cfg)
                assert (base.double() - x.double() @ w.double().T).abs().max().item() < 2e-2
    print("interpreter: ok")


def main() -> None:
    from benchmarks.experiments.forward_probe import graph_us
    from benchmarks.experiments.routed_probe import SETS, SHAPES, weight_sets
    from lorahot.kernels import routed_lora
    from lorahot.kernels import triton_routed_lora as TR

    dev, dt = torch.device("cuda"), torch.bfloat16
    triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device=dev))
    print(
        f"{M} rows, {T_ROWS} per routing entry, {SLOTS} slots, rank {R}, us per call; torch {torch.__version__}, triton {triton.__version__}"
    )
    print(f"{'shape':8s} " + " ".join(f"{h:>10s}" for h in ("base", "pair d8", "shrink", "wide")))
    for name, (k, n) in SHAPES.items():
        w, a, bt, s, x = weight_sets(k, n, M, dev, dt)
        out = torch.empty(M, n, device=dev, dtype=dt)
        ys = [torch.empty(M, n, device=dev, dtype=dt) for _ in range(SETS)]
        route = torch.tensor([i % 8 for i in range(M // T_ROWS)], device=dev)
        one = torch.zeros_like(route)  # d1: every row on slot 0
        segs = routed_lora.segments(route, SLOTS)
        h = _reference_h(x, a[0], s, route, T_ROWS).contiguous()
        h1 = _reference_h(x, a[0], s, one, T_ROWS).contiguous()
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
            try:
                got = tma_linear(x, w[0], torch.full_like(out, float("nan")), cfg)
                e0 = (got.float() - base_out.float()).abs().max().item()
                got = tma_linear(x, w[0], torch.full_like(out, float("nan")), cfg, h, bt[0], route, T_ROWS)
                e1 = (got.float() - pair_out.float()).abs().max().item()
                ok0, ok1 = e0 < 3e-2, e1 < 6e-2
                t0 = graph_us(lambda: [tma_linear(x, wi, out, cfg) for wi in w], SETS) if ok0 else float("nan")
                nan = float("nan")
                t1, t2 = (
                    graph_us(
                        lambda r=r, hh=hh: [tma_linear(x, wi, out, cfg, hh, bi, r, T_ROWS) for wi, bi in zip(w, bt)],
                        SETS,
                    )
                    if ok1
                    else nan
                    for r, hh in ((route, h), (one, h1))
                )
                print(
                    f"  {name:8s} {label:22s} tma {t0:7.1f} ({t0 / row['base']:.2f}x base)  tma+e d8 {t1:7.1f}, "
                    f"+shrink {t1 + row['shrink']:7.1f} (pair {row['pair']:.1f})  tma+e d1 {t2:7.1f}, "
                    f"+shrink {t2 + row['shrink']:7.1f} (wide {row['wide_single']:.1f})  errors {e0:.2g} {e1:.2g}",
                    flush=True,
                )
            except Exception as exc:  # a configuration that does not compile is reported, not fatal
                print(f"  {name:8s} {label:22s} failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)


if __name__ == "__main__":
    if CPU:
        check_cpu()
    else:
        main()
