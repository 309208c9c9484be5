"""Probe: what a merged ``set_scale`` and ``activate`` cost on the host, at 800 layers on the CPU.

Merged mode rewrites the targeted base weights after each ``set_scale`` and ``activate``
(:meth:`lorahot.runtime.merge.Merger.apply`), then records what it wrote and, before the next
call, checks it. This probe times whole calls, medians of several rounds, on 800
``Linear(16, 16)`` layers in float32, where:

- ``set_scale, one adapter on 100 of 800``: one adapter touching 100 layers re-weighted;
- ``set_scale, stack part on 80 of 800``: a stack of an adapter on every layer and one on 80,
  the second part re-weighted;
- ``activate, 100 and 100 of 800``: two slots, adapters on disjoint sets of 100 layers, switched;
- ``set_scale, one adapter on 800 of 800``: every layer's delta changes (no layer to skip);

and, for each, ``Merger.apply`` alone and the check before each call (``check_base``), in CPU
time of the calling thread (torch on one thread).

    PYTHONPATH=. python3 -m benchmarks.experiments.merged_rewrite_probe
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import lorahot

LAYERS = 800
WIDTH = 16
RANK = 4


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(WIDTH, WIDTH) for _ in range(LAYERS)])


def _adapter(layers: range, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in layers:
        out[f"{i}.lora_A.weight"] = torch.randn(RANK, WIDTH, generator=gen) * 0.1
        out[f"{i}.lora_B.weight"] = torch.randn(WIDTH, RANK, generator=gen) * 0.1
    return out


def _ms(step: Callable[[int], object], n: int = 20, rounds: int = 7) -> float:
    """Median over ``rounds`` of the mean time of ``n`` calls, in ms of this thread's CPU time (on
    a shared box, wall time counts the other processes' turns; torch runs on this thread alone)."""
    times = []
    for _ in range(rounds):
        t = time.thread_time()
        for i in range(n):
            step(i)
        times.append((time.thread_time() - t) / n * 1e3)
    return statistics.median(times)


def _case(
    name: str, runtime: lorahot.LoraRuntime, call: Callable[[int], object], apply: Callable[[int], object]
) -> None:
    merger = runtime._merger
    assert merger is not None
    whole = _ms(call)
    alone = _ms(apply)
    check = _ms(lambda i: merger.check_base())
    print(f"{name}: call {whole:.2f} ms, Merger.apply {alone:.2f} ms, check_base {check:.2f} ms", flush=True)


def main() -> None:
    torch.set_num_threads(1)
    every = range(LAYERS)
    targets = [str(i) for i in every]

    runtime = lorahot.inject(_model(), targets, max_rank=2 * RANK, merged=True)
    runtime.load(_adapter(range(100), 1))
    stack = runtime._stacks[0]
    assert stack is not None and runtime._merger is not None
    merger = runtime._merger

    def reapply(i: int, weights: tuple[float, ...] = (1.0,)) -> None:
        s = stack.scales(weights)
        merger.apply(s, stack.single, stack.weight_terms(weights))

    _case(
        "set_scale, one adapter on 100 of 800",
        runtime,
        lambda i: runtime.set_scale(0.5 + 0.25 * (i % 2)),
        lambda i: reapply(i, (0.5 + 0.25 * (i % 2),)),
    )

    runtime.load([_adapter(every, 2), _adapter(range(80), 3)], scale=[1.0, 0.5])
    stack = runtime._stacks[0]
    assert stack is not None
    _case(
        "set_scale, stack part on 80 of 800",
        runtime,
        lambda i: runtime.set_scale([1.0, 0.5 + 0.25 * (i % 2)]),
        lambda i: reapply(i, (1.0, 0.5 + 0.25 * (i % 2))),
    )

    runtime.load(_adapter(every, 4))
    stack = runtime._stacks[0]
    assert stack is not None
    _case(
        "set_scale, one adapter on 800 of 800",
        runtime,
        lambda i: runtime.set_scale(0.5 + 0.25 * (i % 2)),
        lambda i: reapply(i, (0.5 + 0.25 * (i % 2),)),
    )

    two = lorahot.inject(_model(), targets, max_rank=RANK, merged=True, slots=2)
    two.load(_adapter(range(100), 5), slot=0)
    two.load(_adapter(range(100, 200), 6), slot=1)
    _case("activate, 100 and 100 of 800", two, lambda i: two.activate(i % 2), lambda i: two.activate(i % 2))


if __name__ == "__main__":
    main()
