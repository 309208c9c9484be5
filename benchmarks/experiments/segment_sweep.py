"""Probe: tile configurations of the segmented routed kernels at the mixed suite's prefill.

After the grid rework (``segment_probe``, ``runs/20261130T200400-segment-probe.json``) the pair
still runs above its bytes at 2048 rows over 8 adapters: the shrink 7-15 us for 2-6 us of
bytes, the gate/up expand about 36 us for 11.5. This sweep times, per TinyLlama projection
shape, in a CUDA graph over 22 weight sets (us per call):

- the pair (``launch``: the shrink at its default, then the expand), for each expand kernel of
  :data:`FORMS` (the library's, and the same without its ``y`` prefetch), each (BLOCK_M, BLOCK_N, warps, stages)
  of :data:`EXPAND` and each ``_EXPAND_PROGRAMS`` of :data:`PROGRAMS`;
- the shrink writing partials alone, for each (BLOCK_M, BLOCK_K, warps, stages) of
  :data:`SHRINK` and each ``_PARTIAL_PROGRAMS`` of :data:`PARTIALS`;

each configuration's output checked against the default configuration's first (a mismatch
prints and records NaN). It prints the best of each against the default (``PROBE_CPU=1`` with ``TRITON_INTERPRET=1``: a smoke
run of the probe on the CPU, small shapes, untimed).
``PROBE_M`` / ``PROBE_T`` / ``PROBE_D``: rows, rows per routing entry, distinct adapters
(default 2048 / 256 / 8).

    PYTHONPATH=. python3 -m benchmarks.experiments.segment_sweep
"""

from __future__ import annotations

import itertools
import json
import os

import torch
import triton
import triton.language as tl

from benchmarks.experiments.forward_probe import graph_us
from benchmarks.experiments.segment_probe import operands
from lorahot.kernels import triton_routed_lora as T
from lorahot.kernels.direct_launch import Launcher

SHAPES = {"q/o": (2048, 2048), "k/v": (2048, 256), "gate/up": (2048, 5632), "down": (5632, 2048)}
SETS = 22
EXPAND = [(bm, bn, 8 if bm * bn >= 16384 else 4, 3) for bm, bn in itertools.product((32, 64, 128), (64, 128, 256))]
PROGRAMS = (132, 264)
SHRINK = [(bm, bk, 8 if bm >= 128 else 4, 3) for bm, bk in itertools.product((32, 64, 128), (64, 128))]
PARTIALS = (64, 128, 256)
#: PROBE_CPU=1 with TRITON_INTERPRET=1: a smoke run of the probe itself on small shapes, untimed
CPU = os.environ.get("PROBE_CPU") == "1"
if CPU:
    SHAPES, SETS = {"q/o": (128, 96), "down": (256, 64)}, 2


def _timed(fn) -> float:
    if CPU:
        fn()
        return 0.0
    try:
        return graph_us(fn, SETS)
    except Exception as e:  # a probe: say why and go on
        print("failed:", type(e).__name__, str(e)[:160], flush=True)
        torch.cuda.synchronize()
        return float("nan")


@triton.jit
def _expand_hoisted(
    Y, H, BT, SEG, OUT,
    M, N, R, SLOTS, T_,
    stride_ym, stride_hm, stride_bs, stride_br, stride_om,
    R_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SLOTS_PAD: tl.constexpr,
    PARTIALS: tl.constexpr,
):  # fmt: skip
    """``_segment_expand`` with the slot test outside the loop over N: compiled for sm90, the
    kernel's loop holds the dot under an ``if`` and is neither pipelined (no ``cp.async``) nor
    on ``wgmma`` (mma v2, two layout conversions per tile); with one loop per branch the
    pipeliner can take the loads. The question for the device: does that close the pair's gap
    to its bytes?"""
    slot, rows, m_ok, past = T._segment_rows(SEG, tl.program_id(0), SLOTS, T_, BLOCK_M, SLOTS_PAD)
    if past:
        return
    n_tiles = tl.cdiv(N, BLOCK_N)
    if slot < SLOTS:
        rr = tl.arange(0, R_PAD)
        r_ok = rr < R
        hb = T._tile_shrink(H, rows, m_ok, M, R, stride_hm, R_PAD, BLOCK_M, PARTIALS).to(BT.dtype.element_ty)
        bt_base = BT + slot.to(tl.int64) * stride_bs
        for nt in range(tl.program_id(1), n_tiles, tl.num_programs(1)):
            rn = nt * BLOCK_N + tl.arange(0, BLOCK_N)
            n_ok = rn < N
            mask = m_ok[:, None] & n_ok[None, :]
            bt = tl.load(bt_base + rr[:, None] * stride_br + rn[None, :], mask=r_ok[:, None] & n_ok[None, :], other=0.0)
            acc = tl.load(Y + rows[:, None] * stride_ym + rn[None, :], mask=mask, other=0.0).to(tl.float32)
            acc = tl.dot(hb, bt, acc)
            tl.store(OUT + rows[:, None] * stride_om + rn[None, :], acc.to(OUT.dtype.element_ty), mask=mask)
    else:
        for nt in range(tl.program_id(1), n_tiles, tl.num_programs(1)):
            rn = nt * BLOCK_N + tl.arange(0, BLOCK_N)
            mask = m_ok[:, None] & (rn < N)[None, :]
            v = tl.load(Y + rows[:, None] * stride_ym + rn[None, :], mask=mask, other=0.0)
            tl.store(OUT + rows[:, None] * stride_om + rn[None, :], v, mask=mask)


#: the expand kernels the sweep compares: the library's (the hoisted form with each tile's ``y``
#: loaded one iteration ahead: the ``prefetch`` variant of ``runs/20261130T211252-segment-sweep.json``,
#: which beat ``hoisted`` and the earlier ``loop-if``, the slot test inside the loop), and the
#: hoisted form without the prefetch
FORMS = {"library": T._segment_expand, "hoisted": _expand_hoisted}


def main() -> None:
    dev, dt = (torch.device("cpu"), torch.float16) if CPU else (torch.device("cuda"), torch.bfloat16)
    m, t, d = (int(os.environ.get(k, v)) for k, v in (("PROBE_M", "2048"), ("PROBE_T", "256"), ("PROBE_D", "8")))
    print(torch.__version__, "cpu" if CPU else torch.cuda.get_device_name(), f"m={m} t={t} d={d}", flush=True)
    default_expand, default_shrink = T._expand_config, T._shrink_config
    default_programs, default_partials = T._EXPAND_PROGRAMS, T._PARTIAL_PROGRAMS
    library = T._SEGMENT_EXPAND
    table: dict[str, dict[str, float]] = {}
    for name, (k, n) in SHAPES.items():
        a, bt, s, x, y, out, route, segs = operands(m, k, n, t, d, dev, dt, SETS)
        T._expand_config, T._shrink_config = default_expand, default_shrink
        T.launch(x, y, a[0], bt[0], s, route, out, gather=False, segs=segs)
        want = out.clone()
        h_want = T.shrink(x, a[0], s, segs, t, partials=True).sum(0)
        row: dict[str, float] = {}
        for form, cfg, programs in itertools.product(FORMS, EXPAND, PROGRAMS):
            T._SEGMENT_EXPAND = Launcher(FORMS[form])  # the launches go through the module's launcher
            T._expand_config, T._EXPAND_PROGRAMS = (lambda m_, n_, c=cfg: c), programs
            out.fill_(float("nan"))
            try:
                T.launch(x, y, a[0], bt[0], s, route, out, gather=False, segs=segs)
                ok = float((out.float() - want.float()).norm() / want.float().norm()) < 1e-3
            except Exception as e:  # a probe: say why and go on
                print("failed:", cfg, type(e).__name__, str(e)[:160], flush=True)
                ok = False

            def pair() -> None:
                for ai, bi in zip(a, bt):
                    T.launch(x, y, ai, bi, s, route, out, gather=False, segs=segs)

            row[f"pair {form} {cfg} e{programs}"] = _timed(pair) if ok else float("nan")
        T._SEGMENT_EXPAND = library
        T._expand_config, T._EXPAND_PROGRAMS = default_expand, default_programs
        for cfg, partials in itertools.product(SHRINK, PARTIALS):
            T._shrink_config, T._PARTIAL_PROGRAMS = (lambda m_, c=cfg: c), partials
            try:
                got = T.shrink(x, a[0], s, segs, t, partials=True).sum(0)
                err = float((got - h_want).norm() / h_want.norm())
            except Exception as e:  # a probe: say why and go on
                print("failed:", cfg, type(e).__name__, str(e)[:160], flush=True)
                err = float("inf")

            def shrink() -> None:
                for ai in a:
                    T.shrink(x, ai, s, segs, t, partials=True)

            row[f"shrink {cfg} p{partials}"] = _timed(shrink) if err < 1e-4 else float("nan")
        T._shrink_config, T._PARTIAL_PROGRAMS = default_shrink, default_partials
        table[name] = row
        ex = {k2: v for k2, v in row.items() if k2.startswith("pair") and v == v}
        sh = {k2: v for k2, v in row.items() if k2.startswith("shrink") and v == v}
        d_ex = row.get(f"pair library {default_expand(m, n)} e{default_programs}", float("nan"))
        d_sh = row.get(f"shrink {default_shrink(m)} p{default_partials}", float("nan"))
        best_ex, best_sh = min(ex, key=ex.get), min(sh, key=sh.get)
        print(f"{name}: pair (by expand tiles) default {d_ex:.1f} best {best_ex} {ex[best_ex]:.1f}", flush=True)
        print(f"{name}: shrink default {d_sh:.1f} best {best_sh} {sh[best_sh]:.1f}", flush=True)
        for k2 in sorted(ex, key=ex.get)[:5] + sorted(sh, key=sh.get)[:5]:
            print(f"   {name} {k2} {row[k2]:.1f}", flush=True)
    path = os.path.join(os.environ.get("OUT", "/tmp"), "segment_sweep.json")
    with open(path, "w") as f:
        json.dump(table, f, indent=1)


if __name__ == "__main__":
    main()
