"""Probe: the compiled wide layers' shrink ``h = x @ A.T`` at the UNet's and a prefill's sizes.

Every kernel of one default-mode step of the SDXL-shaped UNet, lorahot's against the base's
(tenth session, ``runs/20261201T035224-diffusion.json``), puts the 490 shrinks (after the
stacked-shrink pass) at 2.64 ms of the step's 4.76 ms of GPU time over the base. Their inputs
are 3.8 GB per step, 1.4 ms at the 2.70 TB/s a copy reaches (1 GB, eleventh session): cuBLAS
runs these GEMMs, 64 to 192 outputs wide, at about half that rate. This probe times, per shape, in us per call (CUDA
graph over ``SETS`` weight sets, the input shared as in a model):

- ``cublas``: ``x @ A.T`` with ``A [N, K]`` row-major, the arena's view, as the compiled layer
  calls it; ``cublas_t``: the same with ``A.T`` stored contiguous (a layout lorahot could keep);
- ``triton``: one program per tile of rows over all of K, ``A`` read from L2 by every program
  (best of the tile configurations);
- ``floor``: the bytes (``x`` read, ``A`` read once, ``h`` written) at ``PROBE_BANDWIDTH``
  (bytes/s) if given, else at the copy's rate measured in the same call (below: 2.70 TB/s in
  the eleventh session);
- ``copy``: a device-to-device copy of 1 GB, its bytes read and written over its time: the
  bandwidth this machine reaches, printed once.

The prediction: ``triton`` near the floor where the row tiles fill the GPU (8192 rows), and no
better than cuBLAS where they do not (154 rows of the text states). If it wins by about 1 us
per call at 2048-8192 rows, a shrink kernel in the stacked-shrink pass would save about 1 ms
per UNet step under CUDA graphs; in default mode only as a kernel the compiler launches itself
(a custom operator costs the host more than that). Each output is checked against float64
first, poisoned with NaN before.

    PYTHONPATH=. python3 -m benchmarks.experiments.shrink_probe
    PROBE_CPU=1 TRITON_INTERPRET=1 PYTHONPATH=.interp:. python3 -m benchmarks.experiments.shrink_probe
"""

from __future__ import annotations

import json
import os
import time

import torch
import triton
import triton.language as tl

CPU = os.environ.get("PROBE_CPU") == "1"
SETS = int(os.environ.get("PROBE_SETS", "12"))
OUT = os.environ.get("OUT", "/tmp")
BANDWIDTH = float(os.environ.get("PROBE_BANDWIDTH", "0"))  # bytes/s; 0: the copy's, measured here
#: name -> (rows, in, outputs): the UNet's shrinks (rank 64; 192 for a stacked q/k/v, 128 for
#: cross-attention's stacked k/v over the text states) and the LLM's at a 2048-token prefill
SHAPES = {
    "unet 640 qkv": (8192, 640, 192),
    "unet 640 one": (8192, 640, 64),
    "unet 640 ff out": (8192, 2560, 64),
    "unet 1280 qkv": (2048, 1280, 192),
    "unet 1280 one": (2048, 1280, 64),
    "unet 1280 ff out": (2048, 5120, 64),
    "unet text kv": (154, 2048, 128),
    "llm 2048 qkv": (2048, 2048, 192),
    "llm 2048 one": (2048, 2048, 64),
    "llm 2048 down": (2048, 5632, 64),
}
#: (BLOCK_M, BLOCK_K, num_warps, num_stages)
CONFIGS = [(16, 128, 4, 3), (32, 128, 4, 3), (64, 64, 4, 4), (64, 128, 4, 3), (128, 64, 8, 3)]
if CPU:
    SHAPES = {"small": (100, 96, 64), "small wide": (40, 200, 192)}
    CONFIGS = [(16, 32, 4, 2), (32, 64, 4, 2)]


@triton.jit
def _shrink_kernel(
    X, A, H, M, N, K, stride_xm, stride_an, stride_hm,
    N_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """``H[rows] = X[rows] @ A.T`` for one tile of rows, over all of K, every output at once."""
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.arange(0, N_PAD)
    rk = tl.arange(0, BLOCK_K)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros((BLOCK_M, N_PAD), dtype=tl.float32)
    xp = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    ap = A + rn[None, :] * stride_an + rk[:, None]
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_ok = rk < K - k * BLOCK_K
        x = tl.load(xp, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        a = tl.load(ap, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(x, a, acc)
        xp += BLOCK_K
        ap += BLOCK_K
    h = H + rm[:, None].to(tl.int64) * stride_hm + rn[None, :]
    tl.store(h, acc.to(H.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def shrink(x: torch.Tensor, a: torch.Tensor, h: torch.Tensor, cfg: tuple[int, int, int, int]) -> None:
    """``h = x @ a.T`` by the kernel (``a [N, K]`` rows contiguous)."""
    bm, bk, warps, stages = cfg
    m, k = x.shape
    n = a.shape[0]
    _shrink_kernel[(triton.cdiv(m, bm),)](
        x, a, h, m, n, k, x.stride(0), a.stride(0), h.stride(0),
        N_PAD=max(16, triton.next_power_of_2(n)), BLOCK_M=bm, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )  # fmt: skip


def main() -> None:
    from benchmarks.experiments.forward_probe import graph_us

    dev = torch.device("cpu" if CPU else "cuda")
    dt = torch.float32 if CPU else torch.bfloat16
    print("torch", torch.__version__, "triton", triton.__version__, "" if CPU else torch.cuda.get_device_name())
    table: dict = {}
    if not CPU:  # the bandwidth this machine reaches: 1 GB copied, read and written
        src = torch.empty(2**29, device=dev, dtype=dt).normal_()
        dst = torch.empty_like(src)
        copy_us = graph_us(lambda: dst.copy_(src), 1)
        table["copy_bytes_per_s"] = 2 * src.numel() * src.element_size() / (copy_us * 1e-6)
        print(f"copy: {table['copy_bytes_per_s'] / 1e12:.2f} TB/s (read + written)", flush=True)
        del src, dst
    for shape, (m, k, n) in SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        sets = 1 if CPU else SETS
        x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
        a = [torch.randn(n, k, device=dev, dtype=dt, generator=g) / k**0.5 for _ in range(sets)]
        at = [ai.T.contiguous() for ai in a]
        hs = [torch.empty(m, n, device=dev, dtype=dt) for _ in range(sets)]
        ref = x.double() @ a[0].double().T

        def err(h: torch.Tensor) -> float:
            return float((h.double() - ref).norm() / ref.norm())

        best: tuple[float, tuple] | None = None
        for cfg in CONFIGS:
            hs[0].fill_(float("nan"))
            try:
                shrink(x, a[0], hs[0], cfg)
            except triton.runtime.errors.OutOfResources:  # too large a tile for this width (shared memory)
                continue
            e = err(hs[0])
            assert e < (1e-5 if CPU else 1e-2), (shape, cfg, e)
            if CPU:
                continue
            us = graph_us(lambda cfg=cfg: [shrink(x, a[i], hs[i], cfg) for i in range(sets)], sets)
            if best is None or us < best[0]:
                best = (us, cfg)
        if CPU or best is None:
            print(f"{shape}: checked {len(CONFIGS)} configurations", flush=True)
            continue
        row = {
            "cublas": graph_us(lambda: [torch.mm(x, a[i].T, out=hs[i]) for i in range(sets)], sets),
            "cublas_t": graph_us(lambda: [torch.mm(x, at[i], out=hs[i]) for i in range(sets)], sets),
            "triton": best[0],
            "triton_config": list(best[1]),
            "floor": (m * k + n * k + m * n) * x.element_size() / (BANDWIDTH or table["copy_bytes_per_s"]) * 1e6,
            "err_cublas": err(torch.mm(x, a[0].T)),
        }
        table[shape] = row
        print(
            f"{shape:18s} cublas {row['cublas']:6.2f}  cublas_t {row['cublas_t']:6.2f}  triton {row['triton']:6.2f}"
            f" {best[1]}  floor {row['floor']:6.2f} us",
            flush=True,
        )
    if not CPU:
        path = os.path.join(OUT, f"{time.strftime('%Y%m%dT%H%M%S')}-shrink-probe.json")
        with open(path, "w") as f:
            json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "table": table}, f, indent=1)
        print("wrote", path, flush=True)


if __name__ == "__main__":
    main()
