"""Mixed suite: one batch, a different adapter for each row, against the base model, the
single-adapter path and PEFT's ``adapter_names=`` in one run.

Workload: the TinyLlama-shaped model (bf16 on a GPU), eight rank-64 adapters (the workload's
PEFT-saved one and seven of the same shapes with other random weights), ``slots=8``, compiled
with reduce-overhead (CUDA graphs) on a GPU, the default mode on a CPU.

- ``decode64``: 64 sequences of one token spread over 1, 2, 4 and 8 distinct adapters (row ``i``
  on adapter ``i % d``);
- ``prefill8x256``: 8 sequences of 256 tokens, each with its own adapter.

Each configuration is compiled once per shape, with static shapes: lorahot's routings of one shape are written in
place and timed on the same graph under ``error_on_recompile`` (its whole-batch graphs, the
single-adapter path, are compiled first, so the first routing is the one mode switch). PEFT
runs its ``adapter_names=`` forward eagerly with the adapters cast to bf16 (its per-adapter
Python loop is what the comparison is about). Figures are medians over interleaved rounds.
The run file also has ``mixed_batch_paired_ms``: the base, the single-adapter path and each
routing taken in turn call by call (:func:`benchmarks.common.paired_ms`), so that the host's
drift within the process falls on all of them alike, and ``mixed_batch_pipelined_ms``: the same
calls back to back, the GPU's time.

    python -m benchmarks.run --suite mixed [--small]
"""

from __future__ import annotations

import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

import lorahot
from benchmarks.common import median_ms, paired_ms, pipelined_ms, rel_err
from benchmarks.workload import MAX_RANK, TARGETS, Workload, adapter_file

SLOTS = 8
DISTINCT = (1, 2, 4, 8)
ROUNDS = 3


def _shapes(small: bool) -> dict[str, tuple[int, int]]:
    return {"decode64": (64, 1), "prefill8x256": (8, 64 if small else 256)}


def adapters(w: Workload, count: int = SLOTS) -> list[Path]:
    """The workload's rank-64 adapter and ``count - 1`` more with its shapes, config and spread."""
    first = w.adapters[64]
    tensors = load_file(adapter_file(first))
    root = Path(tempfile.mkdtemp(prefix="lorahot-mixed-"))
    paths = [first]
    for k in range(1, count):
        g = torch.Generator().manual_seed(1000 + k)
        out = {name: torch.randn(t.shape, generator=g, dtype=t.dtype) * t.float().std() for name, t in tensors.items()}
        path = root / f"r64-{k}"
        path.mkdir()
        save_file(out, str(adapter_file(path)))
        shutil.copy(first / "adapter_config.json", path / "adapter_config.json")
        paths.append(path)
    return paths


def _ids(w: Workload, shape: tuple[int, int], seed: int) -> torch.Tensor:
    vocab = int(getattr(w.config, "vocab_size", 1000))
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed)).to(w.device)


def _route(rows: int, distinct: int) -> list[int]:
    return [i % distinct for i in range(rows)]


def run(
    w: Workload,
    repeat: int,
    small: bool = False,
    variant: str | None = None,
) -> dict[str, Any]:
    """The suite; ``variant`` names a departure from the defaults the caller set up for the
    whole process before anything compiles (``nopdl``: :mod:`lorahot.kernels.pdl` off): every
    ``mixed_batch_*`` field is then named ``mixed_batch_<variant>_*``, so ``latest.json`` keeps
    the default path's figures."""
    mode = "reduce-overhead" if w.device.type == "cuda" else None
    shapes = _shapes(small)
    ids = {label: _ids(w, shape, seed) for seed, (label, shape) in enumerate(shapes.items())}
    paths = adapters(w)
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.reset()

    start = time.perf_counter()

    def log(phase: str) -> None:
        print(f"[mixed] {time.perf_counter() - start:7.1f} s  {phase}", flush=True)

    base = w.fresh_base()
    base_call = _compiled(base, mode)
    for x in ids.values():
        base_call(x), base_call(x)
    log("base compiled")

    model = w.fresh_base()
    runtime = lorahot.inject(model, TARGETS, max_rank=MAX_RANK, slots=SLOTS)
    for slot, path in enumerate(paths):
        runtime.load(path, slot=slot)
    call = _compiled(model, mode)
    runtime.activate(0)
    for x in ids.values():  # the single-adapter (whole-batch) graphs
        call(x), call(x)
    log("lorahot single-adapter graphs compiled")
    for x in ids.values():  # the routed graphs: one per shape
        runtime.activate(_route(x.shape[0], SLOTS))
        call(x), call(x)
    log("lorahot routed graphs compiled")

    peft = _peft(w, paths)
    log("PEFT loaded")
    errs = {}
    with torch._dynamo.config.patch(error_on_recompile=True):
        for label, x in ids.items():
            route = _route(x.shape[0], SLOTS)
            runtime.activate(route)
            got = call(x).float()
            errs[label] = rel_err(got, peft(x, route).float())

        rounds: dict[tuple[str, str, str], list[float]] = {}
        piped: dict[tuple[str, str, str], list[float]] = {}

        def timed(label: str, distinct: str, name: str, fn: Callable[[], Any]) -> None:
            rounds.setdefault((label, distinct, name), []).append(median_ms(fn, w.device, repeat=repeat))
            if name != "peft":  # PEFT's eager loop: its synced time is its time
                piped.setdefault((label, distinct, name), []).append(pipelined_ms(fn, w.device, calls=2 * repeat))

        paired: dict[str, list[float]] = {}
        for _ in range(ROUNDS):
            for label, x in ids.items():
                counts = DISTINCT if label == "decode64" else (SLOTS,)
                timed(label, "-", "base", lambda x=x: base_call(x))
                runtime.activate(0)
                timed(label, "-", "single", lambda x=x: call(x))
                for d in counts:
                    route = _route(x.shape[0], d)
                    runtime.activate(route)
                    timed(label, str(d), "lorahot", lambda x=x: call(x))
                    timed(label, str(d), "peft", lambda x=x, route=route: peft(x, route))
                for key, ms in paired_ms(
                    _turns(label, x, counts, base_call, call, runtime), w.device, repeat=repeat
                ).items():
                    paired.setdefault(key, []).append(ms)
        log("timed")
    # the labels are the full run's; with --small the prefill is 8 x 64 tokens: the shapes say so
    out: dict[str, Any] = {"mixed_batch_ms": {}, "mixed_batch_single_ms": {}, "mixed_batch_shapes": dict(shapes)}
    med = {key: statistics.median(v) for key, v in rounds.items()}
    for (label, distinct, name), ms in med.items():
        if name in ("lorahot", "peft"):
            entry = out["mixed_batch_ms"].setdefault(label, {}).setdefault(distinct, {})
            entry[name] = ms
            entry["base"] = med[(label, "-", "base")]
        elif name == "single":
            out["mixed_batch_single_ms"][label] = ms
    # the same calls back to back (one sync): the device's time, without the host's launch of
    # each graph replay that a synced call waits for; in the run file only
    out["mixed_batch_pipelined_ms"] = {
        f"{label}/{distinct}/{name}": statistics.median(v) for (label, distinct, name), v in piped.items()
    }
    # base, single adapter and each routing taken in turn call by call (benchmarks.common.paired_ms):
    # the same host drift for all; in the run file only, beside the blocks above
    out["mixed_batch_paired_ms"] = {key: statistics.median(v) for key, v in paired.items()}
    out["mixed_batch_rel_err_vs_peft"] = errs
    out["mixed_batch_recompiles"] = 0  # error_on_recompile above would have raised
    if variant:
        out = {key.replace("mixed_batch_", f"mixed_batch_{variant}_", 1): value for key, value in out.items()}
    print(f"[mixed] {json.dumps(out)}", flush=True)
    return out


def _turns(
    label: str,
    x: torch.Tensor,
    counts: tuple[int, ...],
    base_call: Callable[[torch.Tensor], Any],
    call: Callable[[torch.Tensor], Any],
    runtime: lorahot.LoraRuntime,
) -> dict[str, tuple[Callable[[], Any] | None, Callable[[], Any]]]:
    """``label/distinct/name -> (setup, call)`` for :func:`benchmarks.common.paired_ms`: the base, the
    single-adapter path (``activate(0)`` before each call) and each routing (``activate`` of it:
    a write of the same shape, so the same graph)."""
    turns: dict[str, tuple[Callable[[], Any] | None, Callable[[], Any]]] = {
        f"{label}/-/base": (None, lambda: base_call(x)),
        f"{label}/-/single": (lambda: runtime.activate(0), lambda: call(x)),
    }
    for d in counts:
        route = _route(x.shape[0], d)
        turns[f"{label}/{d}/lorahot"] = (lambda route=route: runtime.activate(route), lambda: call(x))
    return turns


def _compiled(model: torch.nn.Module, mode: str | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """Compiled with static shapes: each shape gets its own specialized graph at once, instead
    of a second, dynamic compile (slower to build) when the second shape arrives."""
    compiled = torch.compile(model, mode=mode, dynamic=False)

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return compiled(input_ids=x).logits

    return call


def _peft(w: Workload, paths: list[Path]) -> Callable[[torch.Tensor, list[int]], torch.Tensor]:
    """PEFT with every adapter loaded (cast to the model's dtype), run with ``adapter_names=``."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(w.fresh_base(), str(paths[0]), adapter_name="a0", autocast_adapter_dtype=False)
    for k, path in enumerate(paths[1:], start=1):
        model.load_adapter(str(path), adapter_name=f"a{k}", autocast_adapter_dtype=False)
    model = model.to(w.dtype).eval()

    def call(x: torch.Tensor, route: list[int]) -> torch.Tensor:
        names = [f"a{k}" for k in route]
        with torch.inference_mode():
            return model(input_ids=x, adapter_names=names).logits

    return call
