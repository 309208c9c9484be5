"""Probe: what programmatic dependent launch (``lorahot.kernels.pdl``) saves per fused layer.

At the mixed suite's decode shape (64 rows, slots=8, rank 64, each TinyLlama projection shape,
each call in a CUDA graph over 22 weight sets so weights stream from HBM as in the model), in us
per call, with the early launches off and on in the same process:

- ``base``: the base GEMM alone (cuBLAS);
- ``one``: the single-adapter fused kernel and its split-K sum;
- ``fus d1`` / ``fus d8``: the routed fused path (zero fill, segmented shrink, fused kernel,
  split-K sum) with routes over 1 and 8 distinct slots;
- ``ws d1`` / ``ws d8`` (early launches on): the same with the runtime's zeroed workspace
  (no zero fill; the split-K sum zeroes it again): one kernel fewer per layer;
- ``pair d1`` / ``pair d8`` (on): the base GEMM, then the segmented shrink and expand
  (``routed_lora``), what the routed layers run where the fused kernel does not pay
  (``lora_linear.worth_it``: at 64 rows, gate/up).

Prediction (twelfth session's figures, ``fus`` 15.1 / 11.1 / 19.6 / 20.1 us with one adapter
against ``one`` 9.1 / 5.5 / 13.6 / 13.4): the fused kernel's base product runs beside the
shrink, and three launch gaps close, so ``fus`` falls by about the shrink's 4-5 us plus 1 us a
gap; ``one`` by about 1 us. Each configuration's output is checked against the other's.

(Measured in the thirteenth session, ``runs/20261201T103642-pdl-probe.log`` and
``runs/20261201T105848-pdl-probe.log``: ``fus`` fell by 3.4-4.3 us, ``one`` by 0.7-1.3; the
workspace took 0.6-0.9 us more off ``fus``, and the fused path beat the pair by 3-8 us on
gate/up and down with early launches on. In the fourteenth session early launches went on by
default (``lorahot.kernels.pdl``) and routed gate/up layers onto the fused path.) The ``lead`` columns (the shrink in leading programs of the fused
launch) went with that path, measured and removed (``benchmarks/README.md``, "Fourteenth session").

    PYTHONPATH=. python3 -m benchmarks.experiments.pdl_probe
"""

from __future__ import annotations

import torch

from benchmarks.experiments.forward_probe import graph_us
from benchmarks.experiments.routed_probe import SETS, SHAPES, SLOTS, weight_sets
from lorahot.kernels import pdl, routed_linear, routed_lora
from lorahot.kernels import triton_lora_linear as F
from lorahot.kernels import triton_routed_lora as T

M = 64


def main() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    print(f"pdl supported on this device: {pdl._supported(torch.cuda.current_device())}")
    cols = ["base"] + [f"{c} {p}" for c in ("one", "fus d1", "fus d8") for p in ("off", "on")]
    cols += ["ws d1", "ws d8", "pair d1", "pair d8"]
    print(f"{'shape':8s} " + " ".join(f"{c:>10s}" for c in cols))
    for name, (k, n) in SHAPES.items():
        w, a, bt, s, x = weight_sets(k, n, M, dev, dt)
        out = torch.empty(M, n, device=dev, dtype=dt)
        routes = {d: torch.tensor([i % d for i in range(M)], device=dev) for d in (1, 8)}
        grouped = {d: routed_lora.segments(r, SLOTS) for d, r in routes.items()}
        config = F.config_for(M, n, k)

        def base() -> None:
            for wi in w:
                torch.mm(x, wi.T, out=out)

        def single() -> None:
            for wi, ai, bi in zip(w, a, bt):
                F.launch(x, wi, None, ai[0], bi[0], s[0], out, config)

        workspace = routed_linear.workspace(64, dev)
        y = [x @ wi.T for wi in w]

        def fused(d: int, kept: torch.Tensor | None = None) -> None:
            for wi, ai, bi in zip(w, a, bt):
                F.launch(x, wi, None, ai, bi, s, out, config, routing=(grouped[d], routes[d], 1, kept))

        def pair(d: int) -> None:
            for wi, yi, ai, bi in zip(w, y, a, bt):
                torch.mm(x, wi.T, out=yi)
                T.launch(x, yi, ai, bi, s, routes[d], out, gather=False, segs=grouped[d])

        def results() -> list[torch.Tensor]:
            got = []
            for f in (
                single,
                lambda: fused(1),
                lambda: fused(8),
                lambda: fused(1, workspace),
                lambda: fused(8, workspace),
            ):
                out.fill_(float("nan"))
                f()
                got.append(out.clone())
            return got

        row = [graph_us(base, SETS)]
        timed: dict[bool, list[float]] = {}
        checks = {}
        for on in (False, True):
            pdl.ENABLED = on
            checks[on] = results()
            timed[on] = [graph_us(single, SETS), graph_us(lambda: fused(1), SETS), graph_us(lambda: fused(8), SETS)]
        pdl.ENABLED = True  # the ws and pair columns: early launches on (as by default)
        for off_out, on_out in zip(checks[False], checks[True]):
            torch.testing.assert_close(on_out, off_out, rtol=2e-2, atol=2e-2)
        for got, want in zip(checks[True][3:], checks[True][1:3]):  # the workspace: the same layer
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
        assert not workspace.any()
        for i in range(3):
            row += [timed[False][i], timed[True][i]]
        row += [graph_us(lambda d=d: fused(d, workspace), SETS) for d in (1, 8)]
        row += [graph_us(lambda d=d: pair(d), SETS) for d in (1, 8)]
        assert not workspace.any()
        print(f"{name:8s} " + " ".join(f"{v:10.1f}" for v in row), flush=True)


if __name__ == "__main__":
    main()
