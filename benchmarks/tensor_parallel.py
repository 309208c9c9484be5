"""Tensor-parallel suite: lorahot on a Llama sharded over the ranks with ``parallelize_module``
(q/k/v/gate/up ColwiseParallel, o/down RowwiseParallel), against the same sharded base model.

Every rank builds the workload model (same seed), parallelizes it, injects lorahot
(``max_rank=64``, two slots), compiles it, and loads the rank-64 PEFT adapter. Measured in one
run, on every rank at once (rank 0 reports):

- ``decode_ms`` / ``prefill_ms``: the compiled base model and the compiled model with the
  adapter ([1, 1] and [1, 128] tokens), and their ratios;
- ``swap_from_file_ms``: ``runtime.load(file)`` alternating two files (each rank reads its
  slices; one all-reduce agrees before the write), then a forward;
- ``swap_from_host_ms``: ``runtime.load(key)`` of two preloaded adapters;
- ``recompiles``: every swap and forward after the first compile runs under
  ``error_on_recompile``; 0 when none recompiled;
- ``rel_err_vs_unsharded``: the sharded prefill logits with the adapter against the unsharded
  model's with the same adapter (lorahot on one device, eager).

Two GPUs with NCCL (NVLink multicast left off, as the machine's notes ask):

    torchrun --nproc-per-node 2 -m benchmarks.tensor_parallel [--mode reduce-overhead]

The plumbing on a CPU (gloo, the 2-layer shape, a compile backend that needs no C++ compiler):

    torchrun --nproc-per-node 2 -m benchmarks.tensor_parallel --small --backend gloo --compile aot_eager
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

import lorahot
from benchmarks.common import RESULTS, device_name, median_ms, rel_err
from benchmarks.workload import MAX_RANK, TARGETS, build


def tp_plan(model: torch.nn.Module) -> dict[str, Any]:
    """transformers' Llama layers, sharded as vLLM and torchtitan shard them."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan: dict[str, Any] = {}
    for i in range(len(model.model.layers)):  # type: ignore[union-attr, arg-type]
        p = f"model.layers.{i}."
        for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"):
            plan[p + name] = ColwiseParallel()
        plan[p + "self_attn.o_proj"] = RowwiseParallel()
        plan[p + "mlp.down_proj"] = RowwiseParallel()
    return plan


def _sharded_llama(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    from torch.distributed.tensor.parallel import parallelize_module

    parallelize_module(model, mesh, tp_plan(model))
    for layer in model.model.layers:  # type: ignore[union-attr]
        attn = layer.self_attn
        for attr in ("num_heads", "num_key_value_heads"):  # older transformers read these in forward
            if hasattr(attn, attr):
                setattr(attn, attr, getattr(attn, attr) // mesh.size())
    return model


def _progress(rank: int, start: float, out: dict[str, Any]) -> Callable[[str], None]:
    """A logger for rank 0: each phase with the seconds since the start and the figures measured
    so far (a call cut off by its time limit still returns them in its log)."""

    def log(phase: str) -> None:
        if rank == 0:
            print(f"[tensor_parallel] {time.perf_counter() - start:7.1f} s  {phase}  {json.dumps(out)}", flush=True)

    return log


def run(small: bool, backend: str, compile_backend: str, compile_mode: str = "default") -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh

    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict[str, Any] = {"ranks": world, "backend": backend, "compile": compile_backend, "mode": compile_mode}
    log = _progress(rank, time.perf_counter(), out)
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    work = build(small, device, Path(tempfile.mkdtemp(prefix=f"lorahot-tp{rank}-")))
    files = [work.adapters[64], work.adapters[16]]
    mode: dict[str, Any] = {"backend": compile_backend, "dynamic": False}  # one static graph per shape, built at once
    if compile_mode != "default":
        mode["mode"] = compile_mode  # reduce-overhead: CUDA graphs, the collectives captured in them

    log("workload built")
    base = _sharded_llama(work.fresh_base(), mesh)
    compiled_base = torch.compile(base, **mode)
    with torch.no_grad():
        out["base_decode_ms"] = median_ms(lambda: compiled_base(work.decode), device)
        log("base decode compiled and timed")
        out["base_prefill_ms"] = median_ms(lambda: compiled_base(work.prefill), device)
        log("base prefill compiled and timed")
    del compiled_base, base
    torch._dynamo.reset()

    model = _sharded_llama(work.fresh_base(), mesh)
    runtime = lorahot.inject(model, TARGETS, max_rank=MAX_RANK, slots=2)
    compiled = torch.compile(model, **mode)
    runtime.load(files[0])
    no_recompile = torch._dynamo.config.patch(error_on_recompile=True)
    with torch.no_grad():
        compiled(work.decode)  # each shape compiled once, then timed under error_on_recompile
        with no_recompile:
            out["lorahot_decode_ms"] = median_ms(lambda: compiled(work.decode), device)
        log("lorahot decode compiled and timed")
        compiled(work.prefill)
        with no_recompile:
            out["lorahot_prefill_ms"] = median_ms(lambda: compiled(work.prefill), device)
            log("lorahot prefill compiled and timed")
            turn = iter(range(1 << 30))
            out["swap_from_file_ms"] = median_ms(lambda: runtime.load(files[next(turn) % 2]), device, repeat=10)
            runtime.preload(files[0], key="a")
            runtime.preload(files[1], key="b")
            out["swap_from_host_ms"] = median_ms(lambda: runtime.load("ab"[next(turn) % 2]), device, repeat=20)
            compiled(work.decode), compiled(work.prefill)
    out["recompiles"] = 0  # error_on_recompile raised otherwise
    log("timed, swapped, no recompile")
    runtime.load(files[0])
    whole = work.fresh_base()
    lorahot.inject(whole, TARGETS, max_rank=MAX_RANK).load(files[0])
    with torch.no_grad():
        out["rel_err_vs_unsharded"] = rel_err(compiled(work.prefill).logits, whole(work.prefill).logits)
    for phase in ("decode", "prefill"):
        out[f"{phase}_ratio"] = out[f"lorahot_{phase}_ms"] / out[f"base_{phase}_ms"]
    out["lora_bytes_per_rank"] = runtime.nbytes
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="the 2-layer shape (CPU)")
    parser.add_argument("--backend", default="nccl", choices=("nccl", "gloo"))
    parser.add_argument("--compile", default="inductor", help="torch.compile backend")
    parser.add_argument("--mode", default="default", help="torch.compile mode (default, reduce-overhead)")
    args = parser.parse_args()
    dist.init_process_group(args.backend)
    try:
        result = run(args.small, args.backend, args.compile, args.mode)
        if dist.get_rank() == 0:
            result |= {
                "device": device_name(torch.device("cuda")) if args.backend == "nccl" else "cpu",
                "torch": torch.__version__,
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            }
            print(json.dumps(result, indent=1))
            folder = Path(os.environ.get("OUT") or RESULTS / "runs")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"tensor_parallel-{result['date'][:19].replace(':', '')}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
