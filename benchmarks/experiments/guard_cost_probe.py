"""What a compiled call's guards cost the host, per configuration: the base model and lorahot.

In ``torch.compile``'s default mode a decode call is bound by the host (``compile_mode``), and
before the compiled graph runs, dynamo checks the guards of the frame it enters: every module,
attribute and tensor the trace read. A LoRA layer reads more than the linear it wraps (its plan,
its base module, its wide buffer), so each of its guards is paid on every call.

The probe compiles the forward suite's model per configuration (default mode, fullgraph; a
prefill then a decode call, as the forward suite compiles), keeps each graph's guard tree and the
frame's locals as dynamo built them (``torch._dynamo.guards.guard_manager_testing_hook_fn``), and
prints per graph the leaf guards in the tree and the median time of ``check`` over interleaved
rounds of calls, hot (no cache flush), with nothing else in the timing. Configurations:
``base``; ``lorahot``; ``lorahot_nohook``, the same without the pre-hook that refuses PEFT's
``adapter_names=`` (its frame's guards are printed apart: it is a frame of its own). On a CPU
the model's linears are widened as on CUDA (the tests' ``as_on_cuda``), so the layers read what
they read on a GPU.

Measured on the CPU box (2026-12-06, fifty-eighth session; the 2-block model at small widths,
14 LoRA layers, torch 2.13.0 CPU, one process): the decode graph's guards took 70-73 us per
call for the base model and 96-106 us for lorahot (the same without the hook), about 2 us more
per LoRA layer; the hook's own frame 1.2 us. After a7c3219 (a group member's own buffer and
``_views``'s defaults no longer guarded): 97-98 us where the same process read 104-106 before
and 73 for the base. Across processes the figures moved by 20-30%.

    PYTHONPATH=. python3 -m benchmarks.experiments.guard_cost_probe [base lorahot lorahot_nohook]
"""

from __future__ import annotations

import statistics
import sys
import time
from typing import Any

import torch
import torch._dynamo.guards as dynamo_guards

import lorahot
from benchmarks.workload import MAX_RANK, TARGETS, adapter_file, build
from lorahot.layers import linear as linear_layer
from lorahot.runtime import peft_arguments, wide


def _leaves(manager: Any) -> int:
    """The leaf guards under ``manager``, recursively."""
    return len(manager.get_leaf_guards()) + sum(_leaves(child) for child in manager.get_child_managers())


def _check_us(root: Any, scope: dict[str, Any], n: int = 1000) -> float:
    """The mean time of ``n`` hot ``check`` calls, in us."""
    t = time.perf_counter()
    for _ in range(n):
        root.check(scope)
    return (time.perf_counter() - t) / n * 1e6


def main() -> None:
    names = sys.argv[1:] or ["base", "lorahot", "lorahot_nohook"]
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":  # widen the CPU layers as CUDA's are, so the layers read what they read there
        wide.DEVICE_TYPES = {"cpu", "cuda"}  # type: ignore[assignment]
        linear_layer.LoRALinear.fusable = lambda self, a: True  # type: ignore[method-assign]
        linear_layer.LoRALinear.can_fuse = lambda self, x, a: False  # type: ignore[method-assign]
    w = build(small=dev.type == "cpu", device=dev)
    seen: list[tuple[Any, dict[str, Any]]] = []
    dynamo_guards.guard_manager_testing_hook_fn = lambda manager, scope, builder: seen.append((manager.root, scope))
    graphs: dict[str, Any] = {}
    keep: list[Any] = []
    torch._dynamo.config.recompile_limit = 64  # the configurations share code objects; none reset the others'
    for name in names:
        seen.clear()
        model = w.fresh_base()
        keep.append(model)
        if name != "base":
            runtime = lorahot.inject(model, TARGETS, max_rank=MAX_RANK)
            runtime.load(adapter_file(w.adapters[MAX_RANK]))
            keep.append(runtime)
            if name == "lorahot_nohook":
                for module in model.modules():
                    peft_arguments.uninstall(module)
        compiled = torch.compile(model, fullgraph=True)
        with torch.inference_mode():
            compiled(input_ids=w.prefill)
            compiled(input_ids=w.decode)
        keep.append(compiled)
        for i, (root, scope) in enumerate(seen):
            with torch.inference_mode():
                passes = root.check(scope)
            if passes:  # a graph whose guards pass (not one a later compile replaced)
                graphs[f"{name} graph {i}"] = (root, scope)
    times: dict[str, list[float]] = {key: [] for key in graphs}
    with torch.inference_mode():
        for _ in range(25):  # interleaved rounds: the host's speed drifts
            for key, (root, scope) in graphs.items():
                times[key].append(_check_us(root, scope))
    for key, (root, _) in graphs.items():
        print(
            f"{key:24s}: {_leaves(root):4d} leaf guards (dictionary keys and values not counted), "
            f"check {statistics.median(times[key]):7.2f} us (median of 25 rounds of 1000)",
            flush=True,
        )


if __name__ == "__main__":
    main()
