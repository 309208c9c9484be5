"""Probe: what one replay of a CUDA graph costs the host, per kernel node, with and without early launches.

The thirteenth session read the host's part of a synced reduce-overhead decode call growing by
about 1.8 us per kernel node of the replayed graph (the routed decode's 622 nodes against the
base's 336), and took it as the driver's cost of launching a node. But those calls also differ
in what the compiled wrapper checks before the replay, and the routed graph's lorahot kernels
carry programmatic-dependent-launch attributes (:mod:`lorahot.kernels.pdl`), which may keep the
driver off its fast path for straight-line graphs. This probe separates the driver's part:
graphs of ``N`` tiny Triton kernels in a chain (each reads and writes one small buffer), captured
with and without early launches, and ``torch.cuda.CUDAGraph.replay`` timed alone:

- ``host``: median time until ``replay()`` returns (after a sync, so the queue is empty);
- ``latency``: median time until the device is done, synced per call;
- ``pipelined``: time per replay of 100 replays issued back to back, one sync (the device's).

``PROBE_NODES`` sets the node counts (``100,300,600``). Read ``host / N`` for the per-node cost
and the ``pdl`` rows against the plain ones for what early launches add.

Its first run (``runs/20261201T154143-graph-launch-probe.log``) found the launch a few us whatever
the nodes, while the model's real graphs took about 0.5 us per node to launch (0.10 ms for the
base decode's 336, 0.25 for the routed one's 622; ``mixed_profile_probe``). So the chains now
vary in what a real graph has and the plain chain lacks (``PROBE_KINDS``, all by default):

- ``one``: one small kernel repeated (the first run's chain);
- ``distinct``: eight different kernels in turn (a model's graph has about fifty);
- ``args``: a kernel with 16 tensor arguments (lorahot's kernels take 10-20);
- ``gemm``: a small cuBLAS GEMM every fourth node (the base model's products);
- ``alloc``: each node writing a fresh output from the graph's pool (as compiled graphs do).

    PYTHONPATH=. python3 -m benchmarks.experiments.graph_launch_probe
"""

from __future__ import annotations

import os
import statistics
import time

import torch
import triton
import triton.language as tl

from lorahot.kernels.triton_routed_lora import gdc_launch_dependents, gdc_wait


@triton.jit
def _step(X, N: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    offs = tl.arange(0, N)
    tl.store(X + offs, tl.load(X + offs) + 1.0)


@triton.jit
def _step_args(X, A0, A1, A2, A3, A4, A5, A6, A7, A8, A9, A10, A11, A12, A13, A14, N: tl.constexpr, PDL: tl.constexpr):
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
    offs = tl.arange(0, N)
    tl.store(X + offs, tl.load(X + offs) + tl.load(A7 + offs))


#: the chains' kinds (see the module docstring)
KINDS = ("one", "distinct", "args", "gemm", "alloc")


def _chain(x: torch.Tensor, nodes: int, pdl: bool, kind: str, extra: list[torch.Tensor]) -> None:
    n = x.numel()
    for i in range(nodes):
        if kind == "distinct":  # eight kernels: each constexpr N is a kernel of its own
            _step[(1,)](x, N=n >> (i % 8), PDL=pdl, num_warps=1, launch_pdl=pdl)
        elif kind == "args":
            _step_args[(1,)](x, *extra[:15], N=n, PDL=pdl, num_warps=1, launch_pdl=pdl)
        elif kind == "gemm" and i % 4 == 3:
            torch.mm(extra[15], extra[16], out=extra[17])
        elif kind == "alloc":
            y = torch.empty_like(x)
            _step[(1,)](y, N=n, PDL=pdl, num_warps=1, launch_pdl=pdl)
        else:
            _step[(1,)](x, N=n, PDL=pdl, num_warps=1, launch_pdl=pdl)


def _graph(x: torch.Tensor, nodes: int, pdl: bool, kind: str = "one") -> torch.cuda.CUDAGraph:
    extra = [torch.zeros(128, 128, device=x.device) for _ in range(15)]  # _step_args' inputs
    extra += [torch.randn(64, 64, device=x.device) for _ in range(3)]  # the GEMM's
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _chain(x, nodes, pdl, kind, extra)  # compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        _chain(x, nodes, pdl, kind, extra)
    graph.extra = extra  # type: ignore[attr-defined]  # kept alive with the graph
    return graph


def _timed(graph: torch.cuda.CUDAGraph, calls: int = 60) -> tuple[float, float, float]:
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    host, latency = [], []
    for _ in range(calls):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        t2 = time.perf_counter()
        host.append((t1 - t0) * 1e3)
        latency.append((t2 - t0) * 1e3)
    t = time.perf_counter()
    for _ in range(100):
        graph.replay()
    torch.cuda.synchronize()
    return statistics.median(host), statistics.median(latency), (time.perf_counter() - t) * 1e3 / 100


def main() -> None:
    nodes = [int(n) for n in os.environ.get("PROBE_NODES", "100,300,600").split(",")]
    kinds = os.environ.get("PROBE_KINDS", ",".join(KINDS)).split(",")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; ms per replay")
    print(f"{'kind':>9s} {'nodes':>6s} {'pdl':>5s} {'host':>8s} {'us/node':>8s} {'latency':>8s} {'pipelined':>10s}")
    for kind in kinds:
        for n in nodes:
            for pdl in (False, True):
                if pdl and gdc_wait is None:
                    continue
                x = torch.zeros(128, device="cuda")
                graph = _graph(x, n, pdl, kind)
                host, latency, pipelined = _timed(graph)
                print(
                    f"{kind:>9s} {n:6d} {pdl!s:>5s} {host:8.3f} {host / n * 1e3:8.2f} {latency:8.3f} {pipelined:10.3f}",
                    flush=True,
                )
                if kind == "one":  # the chain's order: each node added one to the same element
                    before = float(x[0])
                    graph.replay()
                    torch.cuda.synchronize()
                    assert float(x[0]) == before + n, "the chain ran out of order"


if __name__ == "__main__":
    main()
