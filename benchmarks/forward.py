"""Forward suite: compiled latency with an active rank-64 adapter vs the base model, and
recompiles over 30 mixed-rank swaps, for lorahot and PEFT in the same process.

Modes: ``default`` (``torch.compile(model)``) and ``reduce-overhead`` (CUDA graphs). PEFT is
measured with its default float32 adapter and with the same adapter in bf16.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import torch

import lorahot
from benchmarks.common import median_ms, rel_err
from benchmarks.workload import MAX_RANK, RANKS, TARGETS, Workload


def _compiled(model: torch.nn.Module, mode: str, fullgraph: bool = False) -> Callable[[torch.Tensor], torch.Tensor]:
    compiled = torch.compile(model, mode=None if mode == "default" else mode, fullgraph=fullgraph)

    def call(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return compiled(input_ids=ids).logits

    return call


def _latency(call: Callable[[torch.Tensor], torch.Tensor], w: Workload, repeat: int) -> dict[str, float]:
    return {name: median_ms(lambda: call(ids), w.device, repeat=repeat, warmup=5) for name, ids in (("decode", w.decode), ("prefill", w.prefill))}


def _unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


def lorahot_mode(w: Workload, mode: str, refs: dict[int, torch.Tensor], repeat: int, fullgraph: bool = False, merged: bool = False) -> dict[str, Any]:
    """Compiles a lorahot model, swaps 30 times among ranks, then times rank 64."""
    torch._dynamo.reset()
    model = w.fresh_base()
    runtime = lorahot.inject(model, TARGETS, max_rank=MAX_RANK, merged=merged)
    call = _compiled(model, mode, fullgraph)
    call(w.prefill), call(w.decode)  # compile before any adapter is loaded
    graphs = _unique_graphs()
    rng = random.Random(0)
    errs: dict[str, float] = {}
    with torch._dynamo.config.patch(error_on_recompile=False):
        for _ in range(30):
            rank = rng.choice(list(RANKS))
            runtime.load(w.adapters[rank])
            err = rel_err(call(w.prefill), refs[rank])  # before the next replay reuses the output
            call(w.decode)
            errs[str(rank)] = max(errs.get(str(rank), 0.0), err)
    recompiles = _unique_graphs() - graphs
    runtime.load(w.adapters[64])
    result = {"recompiles": recompiles, "rel_err": errs, **_latency(call, w, repeat)}
    if merged:
        result["swap_ms"] = median_ms(lambda: runtime.load(w.adapters[64]), w.device, repeat=repeat)
    del call, model, runtime
    return result


def peft_mode(w: Workload, mode: str, refs: dict[int, torch.Tensor], repeat: int, bf16: bool) -> dict[str, Any]:
    from peft import PeftModel

    torch._dynamo.reset()
    model = PeftModel.from_pretrained(w.fresh_base(), str(w.adapters[64]), autocast_adapter_dtype=not bf16).eval()
    if bf16:
        model = model.to(w.dtype)
    call = _compiled(model, mode)
    out = call(w.prefill)
    result = {"rel_err": rel_err(out, refs[64]), **_latency(call, w, repeat)}
    del call, model
    return result


def base_mode(w: Workload, mode: str, repeat: int) -> dict[str, float]:
    torch._dynamo.reset()
    model = w.fresh_base()
    call = _compiled(model, mode)
    result = _latency(call, w, repeat)
    del call, model
    return result


def run(w: Workload, refs: dict[int, torch.Tensor], repeat: int, modes: list[str], with_peft: bool = True, save: Callable[[dict[str, Any]], None] = lambda r: None) -> dict[str, Any]:
    """Every configuration in every mode; ``save`` receives the results after each one."""
    out: dict[str, Any] = {"forward": {}}
    for mode in modes:
        configs: dict[str, Callable[[], Any]] = {
            "base": lambda: base_mode(w, mode, repeat),
            "lorahot": lambda: lorahot_mode(w, mode, refs, repeat),
        }
        if mode == "reduce-overhead" or w.device.type == "cpu":
            configs["lorahot_merged"] = lambda: lorahot_mode(w, mode, refs, repeat, merged=True)
        if with_peft:
            configs["peft"] = lambda: peft_mode(w, mode, refs, repeat, bf16=False)
            configs["peft_bf16"] = lambda: peft_mode(w, mode, refs, repeat, bf16=True)
        for name, measure in configs.items():
            out["forward"].setdefault(mode, {})[name] = measure()
            print(f"[forward {mode} {name}] {out['forward'][mode][name]}", flush=True)
            save(out)
    return out


def run_fullgraph(w: Workload, refs: dict[int, torch.Tensor], repeat: int) -> dict[str, Any]:
    return {"forward": {"fullgraph": {"lorahot": lorahot_mode(w, "default", refs, repeat, fullgraph=True)}}}
