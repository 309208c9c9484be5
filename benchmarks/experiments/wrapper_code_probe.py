"""What the compiled wrapper of one default-mode decode call does, per block: base against lorahot.

In ``torch.compile``'s default mode the host runs inductor's wrapper (its ``call``) on every call:
one line per kernel launch, extern GEMM, allocation and view. Under cProfile on an H100 host
(``runs/20261206T2139-default-mode-probe-guards.log``, 22 blocks, one decode row) lorahot's
wrapper made 206 allocations per call against the base model's 55, and 44 batched GEMMs the base
model has not, while the guards of the two differed by less than 0.1 ms. This probe compiles the
forward suite's model cut to ``PROBE_BLOCKS`` blocks (default 1) at the full width, the base model
and lorahot (``PROBE_FORMS``, default ``base,lorahot``; the suffixes ``_reuse``, ``_gemm``, ``_sums`` and
the others of ``default_mode_probe.switches`` as there) in default mode after a prefill call, as
the suite compiles, and for the decode call's graph prints the wrapper's counts (allocations,
extern GEMMs by kind, Triton launches, views) and its ``call`` function, which it also writes to
``$OUT/wrapper-FORM.py`` with the kernels' source. With ``PROBE_REFUSALS=1`` it also lists each buffer
reuse inductor's planning refused in that graph (the bytes, the estimated peak between the
buffer's free and the allocation, the graph's estimated peak).

    PYTHONPATH=. [PROBE_BLOCKS=1] python3 -m benchmarks.experiments.wrapper_code_probe
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch._inductor.utils import run_and_get_code

import lorahot
from benchmarks import workload
from benchmarks.experiments.default_mode_probe import reuse_decided, switches
from benchmarks.workload import MAX_RANK, TARGETS, adapter_file
from lorahot.layers import linear as linear_layer
from lorahot.runtime import wide

COUNTED = {
    "allocations": r"empty_strided_\w+\(",
    "mm": r"extern_kernels\.mm\(",
    "addmm": r"extern_kernels\.addmm\(",
    "bmm": r"extern_kernels\.bmm\(",
    "baddbmm": r"extern_kernels\.baddbmm\(",
    "Triton launches": r"\.run\(",
    "reinterpret_tensor": r"reinterpret_tensor\(",
    "other extern calls": r"^\s+\w+ = (?:torch\.ops\.|aten\.)",
}


def _config(small: bool) -> object:
    config = _full(small)
    config.num_hidden_layers = int(os.environ.get("PROBE_BLOCKS", "1"))  # type: ignore[attr-defined]
    return config


_full = workload.llama_config
REFUSALS = os.environ.get("PROBE_REFUSALS") == "1"


def _call_body(code: str) -> str:
    """The wrapper's ``call`` function, from its ``def call(`` to the next top-level line."""
    start = code.find("def call(")
    if start < 0:
        return ""
    end = re.search(r"\n\S", code[start + 1 :])
    return code[start : start + 1 + end.start()] if end else code[start:]


def refusals(log: list[str]) -> contextlib.AbstractContextManager[None]:
    """Record each buffer reuse inductor's planning refuses (``AllocateLine.should_reuse_buffer``
    answering no): the buffer, its bytes, the estimated peak between the free and the allocation,
    and the graph's estimated peak. The FX graph cache is off, so the wrapper is planned anew."""

    def logged(saved: Callable[..., bool], line: Any, free_line: Any, size: int) -> bool:
        taken = saved(line, free_line, size)
        if not taken:
            peak = line.wrapper.estimate_peak
            log.append(
                f"refused {line.node.get_name()} <- {free_line.node.get_name()}: {size} B, nodes "
                f"{free_line.scheduler_node_index}..{line.scheduler_node_index}, peak between "
                f"{peak.peak_between(free_line, line)} B, graph peak {peak.overall_peak_memory} B"
            )
        return taken

    return reuse_decided(logged)


def _print_refusals(form: str, graph: str, log: list[str]) -> None:
    if log:
        print(f"=== {form}: {graph} graph, {len(log)} reuses refused", flush=True)
        print("\n".join(log), flush=True)


def main() -> None:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cpu":  # widen the CPU layers as CUDA's are, so the layers take the paths they take there
        wide.DEVICE_TYPES = {"cpu", "cuda"}  # type: ignore[assignment]
        linear_layer.LoRALinear.fusable = lambda self, a: True  # type: ignore[method-assign]
        linear_layer.LoRALinear.can_fuse = lambda self, x, a: False  # type: ignore[method-assign]
    workload.llama_config = _config  # type: ignore[assignment]
    w = workload.build(small=dev.type == "cpu" and os.environ.get("PROBE_FULL") != "1", device=dev)
    out = Path(os.environ.get("OUT", "/tmp/lorahot-out"))
    out.mkdir(parents=True, exist_ok=True)
    keep = []
    for form in os.environ.get("PROBE_FORMS", "base,lorahot").split(","):
        model = w.fresh_base()
        if not form.startswith("base"):
            runtime = lorahot.inject(model, TARGETS, max_rank=MAX_RANK)
            runtime.load(adapter_file(w.adapters[MAX_RANK]))
            keep.append(runtime)
        keep.append(model)
        compiled = torch.compile(model, fullgraph=True, dynamic=False)  # static rows, as forward.STATIC says why
        log: list[str] = []
        planning = refusals(log) if REFUSALS and "_reuse" not in form else contextlib.nullcontext()
        with torch.inference_mode(), switches(form), planning:
            compiled(input_ids=w.prefill)
            _print_refusals(form, "prefill", log)
            log.clear()
            _, codes = run_and_get_code(lambda: compiled(input_ids=w.decode))
        code = "\n\n# ---- next module\n\n".join(codes)
        (out / f"wrapper-{form}.py").write_text(code)
        body = _call_body(codes[-1] if codes else "")
        counts = ", ".join(f"{k} {len(re.findall(p, body, re.M))}" for k, p in COUNTED.items())
        print(f"=== {form}: decode wrapper, {w.config.num_hidden_layers} block(s): {counts}", flush=True)  # type: ignore[attr-defined]
        _print_refusals(form, "decode", log)
        print(body, flush=True)


if __name__ == "__main__":
    main()
