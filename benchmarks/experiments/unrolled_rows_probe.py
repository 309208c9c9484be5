"""Probe: how many kernels the unrolled expands' readers take at each row count.

At decode (1 and 16 rows, the GPU tests) gate's and up's expands, reduced over the rank, run
inside the SiLU product's one Triton kernel, and q/k/v's sums are one kernel before RoPE. So a
decode call of the forward suite's model launches what the base model's does (335). At its
128-row prefill the expands are GEMMs (``unrolled_expand.ROWS`` is 16), and the call launches
46 kernels more than the base's, on a host that bounds the call: 1.23x, with 1.8% more GPU time
(sixty-third session, ``runs/20261207T0910-grouped-probe-prefill-rows128-989151b.log``). With
``LORAHOT_UNROLLED_ROWS=128`` the forward suite's prefill did not move (1.216x), which would
follow if Triton fused neither reader at 128 rows. It does (H100, 1675858,
``runs/20261207T1236-unrolled-rows-probe-1675858.log``): the SiLU product with both reduced
expands is one kernel at 128 rows as at 1, and the sums and RoPE two at both.

For each row count (``PROBE_ROWS``, default ``1,16,128,512``) and each form (reduced over the
rank, elementwise), in bf16 at TinyLlama's widths and rank 64, this compiles:

- ``silu``: gate's and up's outputs with their unrolled expands, read by the SiLU product,
  against ``silu_gemm`` (each expand a GEMM, as above 16 rows) and ``silu_base`` (no LoRA);
- ``sums``: q/k/v's one buffer written by ``unrolled_sums``, q read rotated as RoPE reads it;
- ``lone``: o's output with its unrolled expand, added to the residual and read by RMSNorm (a
  reduction over the row, one program per row), against ``lone_gemm`` (the expand a GEMM, as
  o's and down's are by default) and ``lone_base`` (no LoRA);

each with ``B_s.T`` laid out as the layers hold it (``wide``: a transposed view of the wide
buffer's B columns, whose elements along an output row lie ``in + R`` apart) and contiguous
(``dense``), and prints the GEMMs and generated kernels the wrapper launches, the relative
error against float64 and the GPU time per call (:func:`per_call_us`: calls captured in a CUDA
graph and replayed; until 1675858 the time of 200 calls issued from the host, which measured
the host's 40-70 us per call and not the kernels, ``runs/20261207T1236-unrolled-rows-probe-1675858.log``).
The question for ``lone``: whether an elementwise expand inside RMSNorm's one program per row
(which made decode GPU-bound on an H100, fifty-seventh session) is slow for its arithmetic or
for reading ``B_s.T`` across its strided layout.

``PROBE_CASES`` picks the cases (default all seven).

    PYTHONPATH=. [PROBE_ROWS=1,128 PROBE_CASES=lone,lone_base] python3 -m benchmarks.experiments.unrolled_rows_probe
"""

from __future__ import annotations

import os
import re
import statistics
from collections.abc import Callable

import torch

from lorahot.kernels import unrolled_expand

RANK = 64
GATE = 5632
QKV = [2048, 256, 256]
HIDDEN = 2048
EPS = 1e-5


def launches(code: list[str]) -> tuple[int, int]:
    """The GEMMs and the generated kernels one call of the compiled wrapper launches."""
    body = "\n".join(c.split("def call(", 1)[1] for c in code if "def call(" in c)
    gemms = len(re.findall(r"extern_kernels\.\w+\(", body))
    kernels = len(re.findall(r"\bcpp_fused_\w+\(|\btriton_\w+\.run\(", body))
    return gemms, kernels


def silu(yg: torch.Tensor, hg: torch.Tensor, yu: torch.Tensor, hu: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    g = yg + unrolled_expand.unrolled_expand(hg, bt)
    return torch.nn.functional.silu(g) * (yu + unrolled_expand.unrolled_expand(hu, bt))


def silu_gemm(yg: torch.Tensor, hg: torch.Tensor, yu: torch.Tensor, hu: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(yg + (hg @ bt)[None][0]) * (yu + (hu @ bt)[None][0])


def silu_base(yg: torch.Tensor, hg: torch.Tensor, yu: torch.Tensor, hu: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(yg) * yu


def silu_base_reference(args: list[torch.Tensor]) -> torch.Tensor:
    yg, _, yu, _, _ = (t.double() for t in args)
    return torch.nn.functional.silu(yg) * yu


def silu_reference(args: list[torch.Tensor]) -> torch.Tensor:
    yg, hg, yu, hu, bt = (t.double() for t in args)
    return torch.nn.functional.silu(yg + hg @ bt) * (yu + hu @ bt)


def lone(r: torch.Tensor, y: torch.Tensor, h: torch.Tensor, bt: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    z = (r + (y + unrolled_expand.unrolled_expand(h, bt))).float()
    return (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + EPS)).bfloat16() * w


def lone_gemm(r: torch.Tensor, y: torch.Tensor, h: torch.Tensor, bt: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    z = (r + (y + (h @ bt)[None])[0]).float()
    return (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + EPS)).bfloat16() * w


def lone_base(r: torch.Tensor, y: torch.Tensor, h: torch.Tensor, bt: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    z = (r + y).float()
    return (z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + EPS)).bfloat16() * w


def lone_reference(args: list[torch.Tensor]) -> torch.Tensor:
    r, y, h, bt, w = (t.double() for t in args)
    z = r + y + h @ bt
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + EPS) * w


def lone_base_reference(args: list[torch.Tensor]) -> torch.Tensor:
    r, y, _, _, w = (t.double() for t in args)
    z = r + y
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + EPS) * w


def qkv_layout() -> tuple[list[int], int]:
    starts, at = [], 0
    for n in QKV:
        starts.append(at)
        at += n + RANK
    return starts, at


def sums(yh: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    starts, _ = qkv_layout()
    q = unrolled_expand.unrolled_sums(yh, bt, starts, QKV)[:, : QKV[0]]
    half = QKV[0] // 2
    return q * 2 + torch.cat([-q[:, half:], q[:, :half]], -1)


def sums_reference(args: list[torch.Tensor]) -> torch.Tensor:
    yh, bt = (t.double() for t in args)
    starts, _ = qkv_layout()
    out = yh.clone()
    for at, n in zip(starts, QKV, strict=True):
        out[:, at : at + n] += yh[:, at + n : at + n + RANK] @ bt[:, at : at + n]
    q, half = out[:, : QKV[0]], QKV[0] // 2
    return q * 2 + torch.cat([-q[:, half:], q[:, :half]], -1)


def inputs(case: str, rows: int, device: torch.device, layout: str) -> list[torch.Tensor]:
    """The case's arguments; ``B_s.T`` (the ``[RANK, n]`` one) as ``layout`` says."""
    gen = torch.Generator().manual_seed(rows)
    if case == "silu":
        shapes = [(rows, GATE), (rows, RANK), (rows, GATE), (rows, RANK), (RANK, GATE)]
    elif case == "sums":
        shapes = [(rows, qkv_layout()[1]), (RANK, qkv_layout()[1])]
    else:
        shapes = [(rows, HIDDEN), (rows, HIDDEN), (rows, RANK), (RANK, HIDDEN), (HIDDEN,)]
    made = [(torch.randn(*s, generator=gen) / (8 if s[0] == RANK else 1)).bfloat16().to(device) for s in shapes]
    if layout == "wide":  # B_s.T as a view of a [n, in + R] buffer's last R columns
        made = [_as_wide(t) if t.shape[0] == RANK and t.dim() == 2 else t for t in made]
    return made


def _as_wide(bt: torch.Tensor) -> torch.Tensor:
    n = bt.shape[1]
    buffer = torch.zeros(n, HIDDEN + RANK, dtype=bt.dtype, device=bt.device)
    buffer[:, HIDDEN:] = bt.t()
    return buffer[:, HIDDEN:].t()


def per_call_us(fn: Callable[[], object], device: torch.device, calls: int = 50) -> float:
    """GPU microseconds per call: ``calls`` calls captured in one CUDA graph, replayed (CUDA
    events over 10 replays, median of 5), so that the host's cost of calling a compiled
    function (40-70 us on the H100 hosts, more than these kernels take) is not measured. NaN
    off CUDA, or where the capture fails (printed)."""
    if device.type != "cuda":
        return float("nan")
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
    except Exception as exc:  # a probe: say so and go on
        print(f"  capture failed: {type(exc).__name__}: {exc}", flush=True)
        return float("nan")
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / (10 * calls))
    return statistics.median(times)


def main() -> None:
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    unrolled_expand.register()
    rows_list = [int(r) for r in os.environ.get("PROBE_ROWS", "1,16,128,512").split(",")]
    cases: dict[str, tuple[Callable[..., torch.Tensor], Callable[[list[torch.Tensor]], torch.Tensor]]] = {
        "silu": (silu, silu_reference),
        "silu_gemm": (silu_gemm, silu_reference),
        "silu_base": (silu_base, silu_base_reference),
        "sums": (sums, sums_reference),
        "lone": (lone, lone_reference),
        "lone_gemm": (lone_gemm, lone_reference),
        "lone_base": (lone_base, lone_base_reference),
    }
    chosen = os.environ.get("PROBE_CASES", ",".join(cases)).split(",")
    print(
        f"{'case':9s} {'layout':6s} {'form':12s} {'rows':>5s} {'GEMMs':>6s} {'kernels':>8s} {'rel err':>9s} "
        f"{'us/call':>8s}",
        flush=True,
    )
    for case in chosen:
        fn, reference = cases[case]
        unrolls = case in ("silu", "sums", "lone")
        for rows in rows_list:
            for layout in ("wide", "dense") if not case.endswith("_base") else ("dense",):
                args = inputs(case.split("_")[0], rows, device, layout)
                want = reference(args)
                for reduced in (True, False) if unrolls else (True,):
                    unrolled_expand.REDUCED = reduced
                    torch._dynamo.reset()
                    with config.patch(fx_graph_cache=False):
                        compiled = torch.compile(fn, fullgraph=True)
                        got, code = run_and_get_code(compiled, *args)
                    err = float((got.double().cpu() - want.cpu()).norm() / want.norm())
                    gemms, kernels = launches(code)
                    us = per_call_us(lambda c=compiled, a=args: c(*a), device)  # type: ignore[misc]
                    form = ("reduced" if reduced else "elementwise") if unrolls else "-"
                    print(
                        f"{case:9s} {layout:6s} {form:12s} {rows:5d} {gemms:6d} {kernels:8d} {err:9.2e} {us:8.1f}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
