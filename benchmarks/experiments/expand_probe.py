"""Probe: the routed prefill's segmented expand, launched early after the shrink.

At 2048 rows over 8 adapters the segmented pair costs 19.3 / 13.3 / 35.1 / 25.2 us per q-o /
k-v / gate-up / down layer over the base GEMM (thirty-second session), of which the shrink is
7.8 / 7.8 / 7.8 / 11.8: the expand takes about 2.2x a plain copy of the output (5.3 / 1.6 /
11.9 / 5.4 us). Its time follows its chain of dependent loads, not its bytes: each program
reads the routing's segments, then the entry, then ``H`` and its first ``y``, and every
iteration waited on its ``Bt`` tile. The library's expand now issues its first ``y`` before
``H`` and, launched early (programmatic dependent launch) after the shrink, does that while the
shrink runs.

Forms, each a whole routed layer (the base GEMM, then the pair) in a CUDA graph over 22 weight
sets, us per layer over the base GEMM alone:

- ``before``: the expand as it was (``y`` ahead only), launched in stream order;
- ``library``: the library's expand, launched in stream order;
- ``library+early``: the library's, the shrink and the expand launched early (the default
  where programmatic dependent launch is on);
- ``copy``: ``out.copy_(y)`` after the GEMM, the output's own pass.

The first run (``runs/20261204T115909-expand-probe.log``, at 4b8271b) had the library's
expand also load each tile's ``Bt`` one iteration ahead: predicted 1-2 us under ``before`` per
layer, it cost 0-7 us more (19.6 / 13.3 / 38.1 / 29.5 us over the GEMM before, 21.5 / 13.1 /
45.1 / 30.8 with it), and launching early took 0.3-2.1 us off that. Predicted for this form:
``library`` as ``before``, ``library+early`` 0.3-2 us under it per layer (0.1-0.2 ms per
prefill step of the mixed suite). Every form is checked against float64 first, output poisoned with
NaN, at the timed routing and at a ragged one with rows of no slot.

    PYTHONPATH=. python3 -m benchmarks.experiments.expand_probe
"""

from __future__ import annotations

import json
import os

import torch
import triton
import triton.language as tl

from benchmarks.experiments.forward_probe import graph_us
from lorahot.kernels import routed_lora
from lorahot.kernels import triton_routed_lora as T
from lorahot.kernels.direct_launch import Launcher, cdiv
from lorahot.kernels.triton_routed_lora import _segment_rows, _tile_shrink

SHAPES = {"q/o": (2048, 2048), "k/v": (2048, 256), "gate/up": (2048, 5632), "down": (5632, 2048)}
SETS, SLOTS, R = 22, 8, 64


@triton.jit
def _expand_before(
    Y, H, BT, SEG, OUT, BIAS,
    M, N, R, SLOTS, T,
    stride_ym, stride_hm, stride_bs, stride_br, stride_om,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLOTS_PAD: tl.constexpr,
    PARTIALS: tl.constexpr, HAS_Y: tl.constexpr, HAS_BIAS: tl.constexpr,
):  # fmt: skip
    """One tile of rows, a share of N's tiles: ``out = y + h @ Bt_slot`` per output tile, or
    ``out = y`` for the rows of no slot. The slot test sits outside the loops, so the loop with
    the dot is a plain one the compiler pipelines (``cp.async`` for Bt, the dot on ``wgmma``;
    with the test inside, neither), and each output tile's ``y`` is loaded one iteration
    ahead, before the dot that waits on it: at 2048 rows over 8 adapters on an H200 the pair went
    from 20.6 / 12.9 / 40.2 / 27.4 us (q-o / k-v / gate-up / down) to 18.4 / 12.5 / 31.4 / 24.6
    (``benchmarks/experiments/segment_sweep.py``, ``runs/20261130T211252-segment-sweep.json``).

    Without ``HAS_Y`` there is no base output to read: ``out = h @ Bt_slot`` (plus the bias
    with ``HAS_BIAS``), and the bias alone (or zeros) for the rows of no slot, for a GEMM to
    accumulate onto (see :func:`launch`)."""
    slot, rows, m_ok, past = _segment_rows(SEG, tl.program_id(0), SLOTS, T, BLOCK_M, SLOTS_PAD)
    if past:
        return
    n_tiles = tl.cdiv(N, BLOCK_N)
    step = tl.num_programs(1)
    if slot < SLOTS:
        rr = tl.arange(0, R_PAD)
        r_ok = rr < R
        hb = _tile_shrink(H, rows, m_ok, M, R, stride_hm, R_PAD, BLOCK_M, PARTIALS).to(BT.dtype.element_ty)
        bt_base = BT + slot.to(tl.int64) * stride_bs
        if HAS_Y:
            rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
            y_next = tl.load(
                Y + rows[:, None] * stride_ym + rn[None, :], mask=m_ok[:, None] & (rn < N)[None, :], other=0.0
            )
            for nt in range(tl.program_id(1), n_tiles, step):  # this program's share of N
                rn = nt * BLOCK_N + tl.arange(0, BLOCK_N)
                n_ok = rn < N
                y_cur = y_next
                ahead = rn + step * BLOCK_N  # the next tile's y, loaded before this tile's dot
                y_next = tl.load(
                    Y + rows[:, None] * stride_ym + ahead[None, :], mask=m_ok[:, None] & (ahead < N)[None, :], other=0.0
                )
                bt = tl.load(
                    bt_base + rr[:, None] * stride_br + rn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0
                )
                acc = tl.dot(hb, bt, y_cur.to(tl.float32))
                tl.store(
                    OUT + rows[:, None] * stride_om + rn[None, :],
                    acc.to(OUT.dtype.element_ty),
                    mask=m_ok[:, None] & n_ok[None, :],
                )
        else:
            for nt in range(tl.program_id(1), n_tiles, step):
                rn = nt * BLOCK_N + tl.arange(0, BLOCK_N)
                n_ok = rn < N
                bt = tl.load(
                    bt_base + rr[:, None] * stride_br + rn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0
                )
                acc = tl.dot(hb, bt)
                if HAS_BIAS:
                    acc += tl.load(BIAS + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(
                    OUT + rows[:, None] * stride_om + rn[None, :],
                    acc.to(OUT.dtype.element_ty),
                    mask=m_ok[:, None] & n_ok[None, :],
                )
    else:  # the rows of no slot: out = y (or the bias, or zeros)
        for nt in range(tl.program_id(1), n_tiles, step):
            rn = nt * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = m_ok[:, None] & (rn < N)[None, :]
            if HAS_Y:
                v = tl.load(Y + rows[:, None] * stride_ym + rn[None, :], mask=mask, other=0.0)
            elif HAS_BIAS:
                b = tl.load(BIAS + rn, mask=rn < N, other=0.0)
                v = tl.zeros((BLOCK_M, BLOCK_N), dtype=OUT.dtype.element_ty) + b[None, :].to(OUT.dtype.element_ty)
            else:
                v = tl.zeros((BLOCK_M, BLOCK_N), dtype=OUT.dtype.element_ty)
            tl.store(OUT + rows[:, None] * stride_om + rn[None, :], v, mask=mask)


_BEFORE = Launcher(_expand_before)


def _pair(form: str, x, y, a, bt, s, route, segs, out) -> None:
    """The segmented pair of one form (see the module docstring)."""
    if form != "before":
        T.launch(x, y, a, bt, s, route, out, gather=False, segs=segs, early=form == "library+early")
        return
    m, n, t = x.shape[0], out.shape[1], x.shape[0] // route.shape[0]
    h = T.shrink(x, a, s, segs, t, partials=True)
    block_m, block_n, warps, stages = T._expand_config(m, n)
    groups = min(cdiv(n, block_n), max(1, cdiv(T._EXPAND_PROGRAMS, cdiv(m, block_m))))
    _BEFORE(
        (T._tiles(m, block_m, SLOTS), groups, 1),
        (y, h, bt, segs, out, out),
        (m, n, R, SLOTS, t, y.stride(0), h.stride(1), bt.stride(0), bt.stride(1), out.stride(0),
         T.rank_pad(R), block_m, block_n, T._slots_pad(SLOTS), h.shape[0], True, False),
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


def _want(x, y, a, bt, s, route) -> torch.Tensor:
    slot = route.repeat_interleave(x.shape[0] // route.shape[0])
    want = y.double()
    for k in range(SLOTS):
        on = slot == k
        want[on] += ((x[on].double() @ a[k].double().T) * s[k].double()) @ bt[k].double()
    return want


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    m, t = 2048, 256
    print(torch.__version__, torch.cuda.get_device_name(), f"m={m} t={t} slots={SLOTS} r={R}", flush=True)
    forms = ("before", "library", "library+early")
    table: dict[str, dict[str, float]] = {}
    for name, (k, n) in SHAPES.items():
        a = [torch.randn(SLOTS, R, k, device=dev, dtype=dt) / k**0.5 for _ in range(SETS)]
        bt = [torch.randn(SLOTS, R, n, device=dev, dtype=dt) / R**0.5 for _ in range(SETS)]
        w = [torch.randn(n, k, device=dev, dtype=dt) / k**0.5 for _ in range(SETS)]
        s = torch.rand(SLOTS, R, device=dev) + 0.25
        x = torch.randn(m, k, device=dev, dtype=dt)
        ys = [torch.empty(m, n, device=dev, dtype=dt) for _ in range(SETS)]
        out = torch.empty(m, n, device=dev, dtype=dt)
        routings = {
            "timed": torch.arange(m // t, device=dev) % SLOTS,
            "ragged": torch.tensor([0, -1, 3, 3, 7, -1, 5, 1, 2, 6, 4, 0, 0, -1, 7, 3], device=dev),
        }
        row: dict[str, float] = {}
        for form in forms:
            worst = 0.0
            for route in routings.values():
                segs = routed_lora.segments(route, SLOTS)
                torch.mm(x, w[0].T, out=ys[0])
                out.fill_(float("nan"))
                _pair(form, x, ys[0], a[0], bt[0], s, route, segs, out)
                want = _want(x, ys[0], a[0], bt[0], s, route)
                err = float((out.double() - want).norm() / want.norm())
                worst = max(worst, err if err == err else float("inf"))
            row[f"err {form}"] = worst
        route = routings["timed"]
        segs = routed_lora.segments(route, SLOTS)

        def gemm() -> None:
            for wi, yi in zip(w, ys):
                torch.mm(x, wi.T, out=yi)

        def copy() -> None:
            for wi, yi in zip(w, ys):
                torch.mm(x, wi.T, out=yi)
                out.copy_(yi)

        row["gemm"] = graph_us(gemm, SETS)
        row["copy"] = graph_us(copy, SETS) - row["gemm"]
        for form in forms:

            def layer(form: str = form) -> None:
                for wi, yi, ai, bi in zip(w, ys, a, bt):
                    torch.mm(x, wi.T, out=yi)
                    _pair(form, x, yi, ai, bi, s, route, segs, out)

            row[form] = graph_us(layer, SETS) - row["gemm"] if row[f"err {form}"] < 2e-2 else float("nan")
        table[name] = row
        print(
            f"{name:8s} gemm {row['gemm']:6.1f}  over it: copy {row['copy']:5.1f}  "
            + "  ".join(f"{f} {row[f]:5.1f} (err {row['err ' + f]:.1e})" for f in forms),
            flush=True,
        )
    with open(os.path.join(os.environ.get("OUT", "/tmp"), "expand_probe.json"), "w") as f:
        json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
