"""Stack suite: re-weighting a stacked slot, and a slot stacked to rank 64 against one rank-64
adapter, on the benchmark workload (TinyLlama-shaped, 154 LoRA layers).

- ``stack_reweight_ms``: ``runtime.set_scale([w0, w1, w2, w3])`` on a slot holding four
  rank-16 adapters, device synced, median of many calls; beside it ``set_scale(w)`` (one
  weight for the whole slot) and the floor, one host-to-device copy of the per-row scales.
- ``stack_forward_ms``: the compiled model (reduce-overhead on CUDA) with the stacked slot
  (16 + 16 + 16 + 16 = 64 rows) and with the single rank-64 adapter, at 1 and 256 decode rows,
  timed in interleaved rounds; both fill the same 64 rank rows, so the target is equal.
  Re-weighting the compiled model runs under ``error_on_recompile``.

    python -m benchmarks.run --suite stack [--small]
"""

from __future__ import annotations

import itertools
import statistics
from typing import Any

import torch

import lorahot
from benchmarks.common import median_ms, rel_err, sync
from benchmarks.workload import MAX_RANK, TARGETS, Workload

ROWS = {"1": (1, 1), "256": (256, 1)}
WEIGHTS = ([0.8, 0.5, 0.3, 1.0], [0.2, 0.9, 0.6, 0.4])
ROUNDS = 3


def run(w: Workload, repeat: int) -> dict[str, Any]:
    mode = "reduce-overhead" if w.device.type == "cuda" else None
    model = w.fresh_base()
    runtime = lorahot.inject(model, TARGETS, max_rank=MAX_RANK, slots=2)
    stack = [w.adapters[16]] * 4  # four parts of rank 16 fill the 64 rows
    runtime.load(stack, scale=WEIGHTS[0], slot=0)
    runtime.load(w.adapters[64], slot=1)
    out: dict[str, Any] = {"stack_reweight_ms": _reweight(w, runtime, repeat)}
    compiled = torch.compile(model, mode=mode)
    ids = {label: torch.randint(0, 1000, shape, device=w.device) for label, shape in ROWS.items()}

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return compiled(input_ids=x).logits

    for slot in (0, 1):
        runtime.activate(slot)
        for x in ids.values():
            call(x), call(x)
    runtime.activate(0)
    eager = _eager_logits(model, runtime, ids["1"])
    with torch._dynamo.config.patch(error_on_recompile=True):
        for weights in (*WEIGHTS, WEIGHTS[0]):
            runtime.set_scale(list(weights), slot=0)
            call(ids["1"])
        errs = {"stacked_vs_eager": rel_err(call(ids["1"]).float(), eager.float())}
        rounds: dict[tuple[str, str], list[float]] = {}
        for _ in range(ROUNDS):
            for slot, name in ((0, "stacked_r16x4"), (1, "single_r64")):
                runtime.activate(slot)
                for label, x in ids.items():
                    rounds.setdefault((label, name), []).append(median_ms(lambda x=x: call(x), w.device, repeat=repeat))
    forward: dict[str, dict[str, float]] = {}
    for (label, name), times in rounds.items():
        forward.setdefault(label, {})[name] = statistics.median(times)
    for v in forward.values():
        v["ratio"] = v["stacked_r16x4"] / v["single_r64"]
    out["stack_forward_ms"] = forward
    out["stack_rel_err"] = errs
    out["stack_recompiles"] = 0  # error_on_recompile above would have raised
    print(f"[stack] reweight {out['stack_reweight_ms']}  forward {forward}", flush=True)
    return out


def _reweight(w: Workload, runtime: lorahot.LoraRuntime, repeat: int) -> dict[str, float]:
    """set_scale on the active stacked slot: per-part weights, one weight, and the floor (the
    same number of per-row scales copied host to device)."""
    alternating = itertools.cycle(WEIGHTS)  # every call writes new values

    def weights() -> list[float]:
        return next(alternating)

    rows = sum(a.S[0].numel() for a in runtime.buffers.arenas)  # one region's per-row scales
    host = torch.ones(rows, dtype=torch.float32).pin_memory() if w.device.type == "cuda" else torch.ones(rows)
    dev = torch.empty(rows, dtype=torch.float32, device=w.device)
    n = max(repeat, 50)
    out = {
        "per_part": median_ms(lambda: runtime.set_scale(list(weights()), slot=0), w.device, repeat=n),
        "one_weight": median_ms(lambda: runtime.set_scale(weights()[0], slot=0), w.device, repeat=n),
        "floor": median_ms(lambda: dev.copy_(host, non_blocking=True), w.device, repeat=n),
    }
    runtime.set_scale(WEIGHTS[0], slot=0)
    sync(w.device)
    return out


def _eager_logits(model: torch.nn.Module, runtime: lorahot.LoraRuntime, x: torch.Tensor) -> torch.Tensor:
    runtime.set_scale(WEIGHTS[0], slot=0)
    with torch.inference_mode():
        return model(input_ids=x).logits.clone()
