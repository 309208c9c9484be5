"""Probe: the wide layer's K-extended GEMM without its concatenation buffer.

Compiled, a wide LoRA layer computes ``y = [x | h] @ [W | B_s].T``: the expand summed in the
base GEMM's own accumulator. cuBLAS needs ``[x | h]`` as one matrix, so the compiler has the
producer of ``x`` write it once more into each layer's concatenation buffer, and the shrink (or
the stacked shrink's column slice, copied) into its right columns. On a diffusers UNet a group
of q, k and v over one input therefore writes ``x`` four times where the base model writes it
once (three buffers and the shrink's input; inductor's generated code, CPU, this session). At
SDXL's 640-channel level (8192 rows) each write is 10.5 MB, about 3 us at the H200's bandwidth:
about 3 us of the 5.5 us per layer that the probe ``compiled_layer_probe`` measured over the
base for q, k and v with one stacked shrink (48.7 against 43.2).

A GEMM that reads ``x`` and ``h`` through two pointers needs no buffer: the K loop over ``x``
and ``W``, then one more step over ``h [M, R]`` (any row stride: a slice of the stacked
shrink) and ``B_s [N, R]``. cuBLAS has no such operand; it would be a Triton kernel, so the
question is whether a Triton GEMM keeps cuBLAS's speed on these shapes. Columns (us per call,
CUDA graph over ``SETS`` weight sets, best of the tile configurations for the Triton ones):

- ``cublas``: the base GEMM ``x @ W.T``;
- ``kcat``: cuBLAS over a ready ``[x | h]`` and ``[W | B_s]`` (what the compiled layer runs,
  without the buffer's writes); ``cat``: building ``[x | h]`` from ``x`` and ``h`` (a read and
  a write of ``x``: an upper bound of the producer's extra write);
- ``inplace``: ``y = x @ W.T``, then ``y += h @ B_s.T`` by cuBLAS (``beta = 1``);
- ``triton``: the Triton kernel without the LoRA step (its base GEMM against cuBLAS's);
- ``dual``: the Triton kernel with it: the whole layer, no buffer.

- ``tma`` / ``dual_tma``: the same two kernels with their operands read through tensor
  descriptors (the Tensor Memory Accelerator of Hopper: one bulk copy per tile, no address
  arithmetic in the loop), one output tile per program;
- ``tma_p`` / ``dual_tma_p``: the same, persistent (one program per SM, looping over the tiles);
- ``dual_tma_early``: ``dual_tma`` with the LoRA step's loads issued before the K loop (the
  first TMA run, 2026-12-05, found that step costing 2-17 us where its arithmetic is 1-3).

The first run (2026-12-01) had only the pointer kernels, and ``triton`` ran 1.26-1.82x
``cublas``. The descriptor forms are what Triton's own matmul tutorial brings close to cuBLAS
on Hopper; whether they do on these shapes is the precondition for a GEMM over ``[x | h]``
without the buffer.

The prediction: ``dual`` about ``kcat`` (the same arithmetic) and under ``kcat + cat`` by the
write of ``x``, if ``triton`` is within a few percent of ``cublas``. Each output is checked
against float64 first, the output poisoned with NaN before each check.

    PYTHONPATH=. python3 -m benchmarks.experiments.dual_gemm_probe
    PROBE_CPU=1 TRITON_INTERPRET=1 PYTHONPATH=.interp:. python3 -m benchmarks.experiments.dual_gemm_probe
"""

from __future__ import annotations

import json
import os
import time

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

CPU = os.environ.get("PROBE_CPU") == "1"
R = 64
SETS = int(os.environ.get("PROBE_SETS", "12"))
OUT = os.environ.get("OUT", "/tmp")
#: name -> (rows, in, out)
SHAPES = {
    "unet 640 attn": (8192, 640, 640),
    "unet 640 ff in": (8192, 640, 5120),
    "unet 640 ff out": (8192, 2560, 640),
    "unet 1280 attn": (2048, 1280, 1280),
    "unet 1280 ff in": (2048, 1280, 10240),
    "llm qo 2048": (2048, 2048, 2048),
    "llm gate/up 2048": (2048, 2048, 5632),
    "llm down 2048": (2048, 5632, 2048),
}
#: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
CONFIGS = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 4),
    (128, 256, 64, 8, 3),
    (256, 128, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
]
if CPU:
    # the interpreter wants descriptor strides of whole multiples of 16 elements; 70 x 48 x 48 leaves partial
    # tiles in M, K and N (the descriptors' zero fill and dropped writes)
    SHAPES = {"small": (96, 96, 80), "small ragged": (70, 50, 40), "small ragged, aligned": (70, 48, 48)}
    CONFIGS = [(32, 32, 32, 4, 2), (16, 64, 16, 4, 2)]


@triton.jit
def _dual_kernel(
    X, W, H, B, Y,
    M, N, K, R,
    stride_xm, stride_wn, stride_hm, stride_bn, stride_ym,
    LORA: tl.constexpr, R_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``Y = X @ W.T (+ H @ B.T)``: one output tile per program, the tiles grouped by ``GROUP_M``
    row blocks for L2 reuse; the K loop over ``X`` and ``W``, then one step over ``H`` and ``B``."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    size_m = min(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    xp = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    wp = W + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = rk < K - k * BLOCK_K
        x = tl.load(xp, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(wp, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(x, w, acc)
        xp += BLOCK_K
        wp += BLOCK_K
    if LORA:
        rr = tl.arange(0, R_PAD)
        r_ok = rr < R
        h = tl.load(
            H + rm[:, None].to(tl.int64) * stride_hm + rr[None, :], mask=m_ok[:, None] & r_ok[None, :], other=0.0
        )
        b = tl.load(
            B + rn[None, :].to(tl.int64) * stride_bn + rr[:, None], mask=r_ok[:, None] & n_ok[None, :], other=0.0
        )
        acc = tl.dot(h, b, acc)
    y = Y + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(y, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def dual(
    x: torch.Tensor, w: torch.Tensor, h: torch.Tensor | None, b: torch.Tensor | None, y: torch.Tensor, cfg: tuple
) -> None:
    """Launches the kernel: ``y = x @ w.T (+ h @ b.T)``; ``h [M, R]`` and ``b [N, R]`` with unit
    column stride (``h`` may be a column slice of a wider matrix)."""
    bm, bn, bk, warps, stages = cfg
    m, k = x.shape
    n = w.shape[0]
    lora = h is not None
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _dual_kernel[grid](
        x, w, h if lora else x, b if lora else w, y, m, n, k, R,
        x.stride(0), w.stride(0), h.stride(0) if lora else 0, b.stride(0) if lora else 0, y.stride(0),
        LORA=lora, R_PAD=max(16, triton.next_power_of_2(R)),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages,
    )  # fmt: skip


@triton.jit
def _tile_of(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """The (row block, column block) of output tile ``tile``, grouped by ``GROUP_M`` row blocks."""
    per_group = GROUP_M * tiles_n
    first_m = (tile // per_group) * GROUP_M
    size_m = min(tiles_m - first_m, GROUP_M)
    return first_m + (tile % per_group) % size_m, (tile % per_group) // size_m


@triton.jit
def _tma_kernel(
    x_desc, w_desc, h_desc, b_desc, y_desc,
    M, N, K, PROGRAMS,
    LORA: tl.constexpr, EARLY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``Y = X @ W.T (+ H @ B.T)`` through tensor descriptors (out-of-range reads are zeros, out-of-
    range writes dropped). ``PROGRAMS`` programs loop over the output tiles (persistent when it is
    the SM count; one tile each when it is the tile count)."""
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    for tile in range(tl.program_id(0), tiles_m * tiles_n, PROGRAMS):
        pid_m, pid_n = _tile_of(tile, tiles_m, tiles_n, GROUP_M)
        om = pid_m * BLOCK_M
        on = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if LORA and EARLY:  # the LoRA step's loads issued before the K loop, their latency under it
            h = h_desc.load([om, 0])
            b = b_desc.load([on, 0])
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            x = x_desc.load([om, k * BLOCK_K])
            w = w_desc.load([on, k * BLOCK_K])
            acc = tl.dot(x, w.T, acc)
        if LORA:
            if not EARLY:
                h = h_desc.load([om, 0])
                b = b_desc.load([on, 0])
            acc = tl.dot(h, b.T, acc)
        y_desc.store([om, on], acc.to(y_desc.dtype))


def dual_tma(
    x: torch.Tensor,
    w: torch.Tensor,
    h: torch.Tensor | None,
    b: torch.Tensor | None,
    y: torch.Tensor,
    cfg: tuple,
    persistent: bool,
    early: bool = False,
) -> None:
    """:func:`dual` through tensor descriptors; ``persistent``: one program per SM; ``early``: the
    LoRA step's loads issued before the K loop."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    bm, bn, bk, warps, stages = cfg
    m, k = x.shape
    n = w.shape[0]
    lora = h is not None
    r_pad = max(16, triton.next_power_of_2(R))
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    programs = min(tiles, _sms(x.device)) if persistent else tiles
    x_desc = TensorDescriptor.from_tensor(x, [bm, bk])
    w_desc = TensorDescriptor.from_tensor(w, [bn, bk])
    h_desc = TensorDescriptor.from_tensor(h, [bm, r_pad]) if lora else x_desc
    b_desc = TensorDescriptor.from_tensor(b, [bn, r_pad]) if lora else w_desc
    y_desc = TensorDescriptor.from_tensor(y, [bm, bn])
    _tma_kernel[(programs,)](
        x_desc, w_desc, h_desc, b_desc, y_desc, m, n, k, programs,
        LORA=lora, EARLY=early, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip


def _sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return int(torch.cuda.get_device_properties(device).multi_processor_count)


def _graph_us(fn, calls: int) -> float:
    from benchmarks.experiments.forward_probe import graph_us

    return float(graph_us(fn, calls))


def main() -> None:
    dev = torch.device("cpu" if CPU else "cuda")
    dt = torch.float32 if CPU else torch.bfloat16
    print(
        "torch",
        torch.__version__,
        "triton",
        triton.__version__,
        "" if CPU else torch.cuda.get_device_name(),
        flush=True,
    )
    table: dict = {}
    for shape, (m, k, n) in SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        sets = 1 if CPU else SETS
        ws = [torch.randn(n, k, device=dev, dtype=dt, generator=g) / k**0.5 for _ in range(sets)]
        bss = [torch.randn(n, R, device=dev, dtype=dt, generator=g) / R**0.5 for _ in range(sets)]
        wks = [torch.cat([w, b], dim=1) for w, b in zip(ws, bss)]  # [W | B_s]
        x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
        h3 = torch.randn(m, 3 * R, device=dev, dtype=dt, generator=g)  # a stacked shrink's output
        h = h3[:, R : 2 * R]  # the middle layer's slice: row stride 3R
        xh = torch.cat([x, h], dim=1)
        ys = [torch.empty(m, n, device=dev, dtype=dt) for _ in range(sets)]
        ref = x.double() @ ws[0].double().T + h.double() @ bss[0].double().T
        row: dict = {}

        def err(y: torch.Tensor) -> float:
            return float((y.double() - ref).norm() / ref.norm())

        best: dict[str, tuple[float, tuple]] = {}
        kernels = {
            "triton": (False, dual),
            "dual": (True, dual),
            "tma": (False, lambda *a: dual_tma(*a, persistent=False)),
            "dual_tma": (True, lambda *a: dual_tma(*a, persistent=False)),
            "tma_p": (False, lambda *a: dual_tma(*a, persistent=True)),
            "dual_tma_p": (True, lambda *a: dual_tma(*a, persistent=True)),
            "dual_tma_early": (True, lambda *a: dual_tma(*a, persistent=False, early=True)),
        }
        for cfg in CONFIGS:
            for name, (lora, run) in kernels.items():
                y = ys[0].fill_(float("nan"))
                try:
                    run(x, ws[0], h if lora else None, bss[0] if lora else None, y, cfg)
                except Exception as exc:  # a tile too large for shared memory: skip that configuration
                    print(f"  {shape} {name} {cfg}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                if lora:
                    e = err(y)
                    assert e < (1e-5 if CPU else 2e-2), (shape, cfg, e)
                else:
                    assert not torch.isnan(y).any(), (shape, cfg)
                if CPU:
                    continue
                us = _graph_us(
                    lambda lora=lora, cfg=cfg, run=run: [
                        run(x, ws[i], h if lora else None, bss[i] if lora else None, ys[i], cfg) for i in range(sets)
                    ],
                    sets,
                )
                if name not in best or us < best[name][0]:
                    best[name] = (us, cfg)
        if CPU:
            print(f"{shape}: checked {len(CONFIGS)} configurations", flush=True)
            continue
        kcat_err = err(F.linear(xh, wks[0]))
        forms = {
            "cublas": lambda: [torch.mm(x, ws[i].T, out=ys[i]) for i in range(sets)],
            "kcat": lambda: [torch.mm(xh, wks[i].T, out=ys[i]) for i in range(sets)],
            "cat": lambda: [torch.cat([x, h], dim=1, out=xh) for _ in range(sets)],
            "inplace": lambda: [torch.mm(x, ws[i].T, out=ys[i]).addmm_(h, bss[i].T) for i in range(sets)],
        }
        for name, fn in forms.items():
            row[name] = round(_graph_us(fn, sets), 2)
        for name, (us, cfg) in best.items():
            row[name] = round(us, 2)
            row[name + "_config"] = list(cfg)
        row["err"] = {"kcat": round(kcat_err, 5), "inplace": round(err(forms["inplace"]()[0]), 5)}
        for name in ("dual", "dual_tma", "dual_tma_p", "dual_tma_early"):
            if name in best:
                y = ys[0].fill_(float("nan"))
                kernels[name][1](x, ws[0], h, bss[0], y, best[name][1])
                row["err"][name] = round(err(y), 5)
        table[shape] = row
        tri = "  ".join(f"{name} {row[name]:7.2f}" for name in kernels if name in row)
        print(
            f"{shape:18s} cublas {row['cublas']:7.2f}  kcat {row['kcat']:7.2f} + cat {row['cat']:6.2f}  inplace "
            f"{row['inplace']:7.2f}  {tri}  err {row['err']}",
            flush=True,
        )
    if not CPU:
        path = os.path.join(OUT, f"{time.strftime('%Y%m%dT%H%M%S')}-dual-gemm-probe.json")
        with open(path, "w") as f:
            json.dump(
                {"torch": torch.__version__, "device": torch.cuda.get_device_name(), "sets": SETS, "table": table},
                f,
                indent=1,
            )
        print("wrote", path, flush=True)


if __name__ == "__main__":
    main()
