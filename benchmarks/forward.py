"""Forward suite: compiled latency with an active rank-64 adapter vs the base model, and
recompiles over 30 mixed-rank swaps, for lorahot and PEFT in the same process.

Modes: ``default`` (``torch.compile(model)``) and ``reduce-overhead`` (CUDA graphs). PEFT is
measured with its default float32 adapter and with the same adapter in bf16. On a GPU,
lorahot runs with and without its fused kernel. All configurations of a mode are compiled
first and then timed in interleaved rounds, so clock drift hits them alike.
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import lorahot
from benchmarks.common import host_ms, kernel_profile, median_ms, paired_ms, pipelined_ms, rel_err
from benchmarks.workload import MAX_RANK, RANKS, TARGETS, Workload
from lorahot.kernels import extern_inputs, stacked_shrinks, wide_groups


def _compiled(
    model: torch.nn.Module, mode: str, fullgraph: bool = False, dynamic: bool | None = None
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``dynamic=False``: one graph per input shape (static row counts), else the compiler's default
    (a second input shape makes the row count symbolic)."""
    compiled = torch.compile(model, mode=None if mode == "default" else mode, fullgraph=fullgraph, dynamic=dynamic)

    def call(ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return compiled(input_ids=ids).logits

    return call


#: Every configuration of :func:`run` compiles with ``dynamic=False``: its prefill (128 rows) and
#: decode (1 row) graphs each with static row counts. Under the compiler's default a model's
#: configurations are not compiled alike: they share one code object (the model's ``forward``),
#: and dynamo keeps automatic dynamic shapes per code object, so once the base model (compiled
#: first) has seen two sequence lengths, every later configuration's first prefill is compiled
#: with a symbolic row count (shown on the CPU box, sixty-fifth session: ``create_symbol s27 =
#: 128`` for the second model's ``input_ids.size()[1]``). Until then lorahot's prefill (and its
#: compile) was measured on a symbolic graph against the base model's static one: 388 launches
#: per call at 128 rows against the base model's 342 (H100, ``runs/20261207T150812-forward.json``),
#: where a process of lorahot alone compiled it with static rows and launched 342.
STATIC = True


def _warms(warm: bool | None, dynamic: bool | None) -> bool:
    """Whether a configuration compiles its prefill and decode graphs before anything else:
    ``warm``, by default unless its rows are static (the rows suite compiles its own shapes)."""
    return warm if warm is not None else dynamic is not False


ROUNDS = 3  # every configuration is timed once per round, rounds interleaved (drift control)


def _time(call: Callable[[torch.Tensor], torch.Tensor], w: Workload, repeat: int) -> dict[str, float]:
    """Synced latency per phase, and the host time of one call (what the CPU spends launching it)."""
    out = {
        name: median_ms(lambda: call(ids), w.device, repeat=repeat, warmup=5)
        for name, ids in (("decode", w.decode), ("prefill", w.prefill))
    }
    out["decode_host_ms"] = host_ms(lambda: call(w.decode), w.device, calls=20)
    return out


#: dynamo's and inductor's timed phases whose seconds each configuration's ``compile_phases_s``
#: gives (what its preparation added to the process's totals): the trace, AOTAutograd's metadata,
#: inductor's joint-graph passes (where lorahot lowers default mode), the fake propagation and
#: post-grad passes after them, the lowering to inductor's IR, code generation, and the wait
#: for the compile workers. Where the compile time goes without a probe call of its own.
PHASES = (
    "bytecode_tracing",
    "aot_collect_metadata",
    "_recursive_joint_graph_passes",
    "additional_fake_tensor_prop",
    "_recursive_post_grad_passes",
    "GraphLowering.run",
    "GraphLowering.codegen",
    "async_compile.wait",
)


def _phase_seconds() -> dict[str, float]:
    """The seconds dynamo's timers have summed in this process so far, per phase."""
    from torch._dynamo.utils import compilation_time_metrics

    return {name: sum(times) for name, times in compilation_time_metrics.items()}


def _unique_graphs() -> int:
    return int(torch._dynamo.utils.counters["stats"]["unique_graphs"])


Prepared = tuple[Callable[[torch.Tensor], torch.Tensor], dict[str, Any], Any]


def lorahot_mode(
    w: Workload,
    mode: str,
    refs: dict[int, torch.Tensor],
    fullgraph: bool = False,
    merged: bool = False,
    fused: bool = True,
    swaps: int = 30,
    extras: bool = False,
    dynamic: bool | None = None,
    stacked: bool = True,
    extern: bool = True,
    grouped: bool = True,
    joined: bool = False,
    warm: bool | None = None,
) -> Prepared:
    """Compiles a lorahot model (its prefill and decode graphs first, before any adapter is
    loaded, where ``warm``; by default unless ``dynamic=False``), swaps ``swaps`` times among ranks (checking each against the
    eager reference and counting recompiles), then leaves the rank-64 adapter active.
    ``extras=True`` injects with the DoRA / LoRA-bias pass (what that pass costs plain LoRA);
    ``stacked=False`` compiles without the stacked-shrink pass (what it saves; the pass is
    process-wide, so a configuration of its own process); ``extern=False`` without the rewrite of
    :mod:`lorahot.kernels.extern_inputs` (on by default; process-wide too); ``grouped=False``
    without the joining of :mod:`lorahot.kernels.wide_groups` (on by default; process-wide);
    ``joined=True`` with q's expand joined at a symbolic row count too
    (:data:`lorahot.kernels.wide_groups.JOIN_SYMBOLIC`, off by default; process-wide)."""
    model = w.fresh_base()
    runtime = lorahot.inject(model, TARGETS, max_rank=MAX_RANK, merged=merged, fused=fused, extras=extras)
    if not stacked:
        stacked_shrinks.uninstall()
    extern_inputs.ENABLED = extern
    wide_groups.ENABLED = grouped
    wide_groups.JOIN_SYMBOLIC = joined
    call = _compiled(model, mode, fullgraph, dynamic)
    if _warms(warm, dynamic):
        call(w.prefill), call(w.decode)  # compile before any adapter is loaded
    graphs = _unique_graphs()
    rng = random.Random(0)
    errs: dict[str, float] = {}
    for _ in range(swaps):
        rank = rng.choice(list(RANKS))
        runtime.load(w.adapters[rank])
        err = rel_err(call(w.prefill), refs[rank])  # before the next replay reuses the output
        call(w.decode)
        errs[str(rank)] = max(errs.get(str(rank), 0.0), err)
    info: dict[str, Any] = {"recompiles": _unique_graphs() - graphs, "rel_err": errs}
    runtime.load(w.adapters[64])
    if merged:
        info["swap_ms"] = median_ms(lambda: runtime.load(w.adapters[64]), w.device, repeat=20)
    return call, info, (model, runtime)


def peft_mode(
    w: Workload, mode: str, refs: dict[int, torch.Tensor], bf16: bool, dynamic: bool | None = None
) -> Prepared:
    from peft import PeftModel

    model = PeftModel.from_pretrained(w.fresh_base(), str(w.adapters[64]), autocast_adapter_dtype=not bf16).eval()
    if bf16:
        model = model.to(w.dtype)
    call = _compiled(model, mode, dynamic=dynamic)
    return call, {"rel_err": rel_err(call(w.prefill), refs[64])}, model


def base_mode(w: Workload, mode: str, dynamic: bool | None = None, warm: bool | None = None) -> Prepared:
    model = w.fresh_base()
    call = _compiled(model, mode, dynamic=dynamic)
    if _warms(warm, dynamic):
        call(w.prefill), call(w.decode)
    return call, {}, model


def run(
    w: Workload,
    refs: dict[int, torch.Tensor],
    repeat: int,
    modes: list[str],
    with_peft: bool = True,
    save: Callable[[dict[str, Any]], None] = lambda r: None,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """Per mode: compiles every configuration, then times them in :data:`ROUNDS` interleaved
    rounds and keeps each figure's median over rounds; ``save`` gets the results as they come."""
    torch._dynamo.config.cache_size_limit = 64  # several models share the compiled code objects
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    out: dict[str, Any] = {"forward": {}}
    for mode in modes:
        torch._dynamo.reset()
        dyn = False if STATIC else None
        configs: dict[str, Callable[[], Prepared]] = {
            "base": lambda: base_mode(w, mode, dynamic=dyn, warm=True),
            "lorahot": lambda: lorahot_mode(w, mode, refs, dynamic=dyn, warm=True),
        }
        if w.device.type == "cuda":
            configs["lorahot_unfused"] = lambda: lorahot_mode(w, mode, refs, fused=False, dynamic=dyn, warm=True)
        if mode == "reduce-overhead" or w.device.type == "cpu":
            configs["lorahot_merged"] = lambda: lorahot_mode(w, mode, refs, merged=True, dynamic=dyn, warm=True)
        if with_peft:
            configs["peft"] = lambda: peft_mode(w, mode, refs, bf16=False, dynamic=dyn)
            configs["peft_bf16"] = lambda: peft_mode(w, mode, refs, bf16=True, dynamic=dyn)
        configs = {k: v for k, v in configs.items() if not only or k in only}
        results = out["forward"].setdefault(mode, {})
        prepared = {}

        def time_round(names: list[str], label: str) -> None:
            for name in names:
                for key, value in _time(prepared[name][0], w, repeat).items():
                    results[name].setdefault("rounds", {}).setdefault(key, []).append(value)
                results[name].update({key: statistics.median(v) for key, v in results[name]["rounds"].items()})
            print(
                f"[forward {mode} {label}] "
                + "  ".join(
                    f"{n} {results[n]['rounds']['decode'][-1]:.3f}/{results[n]['rounds']['prefill'][-1]:.3f}"
                    for n in names
                ),
                flush=True,
            )
            save(out)

        for name, prepare in configs.items():  # round 1 right after each compile: a cut-off run keeps it
            t, before = time.perf_counter(), _phase_seconds()
            call, info, keep = prepare()
            prepared[name] = (call, keep)
            results[name] = {**info, "prepare_s": round(time.perf_counter() - t, 1)}
            print(f"[forward {mode} {name} ready] {results[name]}", flush=True)
            after = _phase_seconds()
            phases = {k: round(after[k] - before.get(k, 0.0), 2) for k in PHASES if k in after}
            results[name]["compile_phases_s"] = phases
            print(f"[forward {mode} {name} compile phases, s] {phases}", flush=True)
            time_round([name], f"{name} round 1")
        for rnd in range(2, ROUNDS + 1):  # then interleaved rounds over every configuration
            time_round(list(prepared), f"round {rnd}")
        if len(prepared) > 1:
            _time_paired(prepared, results, w, repeat, mode)
            save(out)
        if w.device.type == "cuda":
            _profile(prepared, results, w, mode)
            save(out)
        del prepared
    return out


def _profile(
    prepared: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Any]],
    results: dict[str, Any],
    w: Workload,
    mode: str,
) -> None:
    """``<phase>_profile``: what one call of each phase costs the host (``host_ms``, until the
    call returns), the GPU (``gpu_us_per_call``, its kernels summed, and ``kernels_per_call``),
    and both (``pipelined_ms``, calls back to back): where a synced call's time goes, so a ratio
    over the base model says whether the host or the GPU bounds it."""
    for name, (call, _keep) in prepared.items():
        for phase, ids in (("decode", w.decode), ("prefill", w.prefill)):
            found = kernel_profile(lambda c=call, i=ids: c(i))
            found["pipelined_ms"] = pipelined_ms(lambda c=call, i=ids: c(i), w.device)
            found["host_ms"] = host_ms(lambda c=call, i=ids: c(i), w.device)
            results[name][f"{phase}_profile"] = found
            print(
                f"[forward {mode} {name} {phase} profile] host {found['host_ms']:.3f} ms, back to back"
                f" {found['pipelined_ms']:.3f} ms, {found['kernels_per_call']:.0f} kernels,"
                f" {found['gpu_us_per_call'] / 1e3:.3f} ms GPU; top {found['top_us']}",
                flush=True,
            )


def _time_paired(
    prepared: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], Any]],
    results: dict[str, Any],
    w: Workload,
    repeat: int,
    mode: str,
) -> None:
    """``<phase>_paired``: every configuration taken in turn call by call
    (:func:`benchmarks.common.paired_ms`), so that their ratios keep what each adds and lose the
    host's drift, which moves a default-mode call of the same graph by up to 2x between rounds."""
    for phase, ids in (("decode", w.decode), ("prefill", w.prefill)):
        calls = {name: (None, lambda c=call, i=ids: c(i)) for name, (call, _keep) in prepared.items()}
        for name, ms in paired_ms(calls, w.device, repeat=max(repeat, 40)).items():
            results[name][f"{phase}_paired"] = ms
    base = results.get("base", {})
    print(
        f"[forward {mode} paired] "
        + "  ".join(
            f"{n} {r['decode_paired']:.3f}/{r['prefill_paired']:.3f}"
            + (
                f" ({r['decode_paired'] / base['decode_paired']:.3f}x/{r['prefill_paired'] / base['prefill_paired']:.3f}x)"
                if base and n != "base"
                else ""
            )
            for n, r in results.items()
            if "decode_paired" in r
        ),
        flush=True,
    )


def run_fullgraph(w: Workload, refs: dict[int, torch.Tensor], repeat: int) -> dict[str, Any]:
    torch._dynamo.reset()
    call, info, _keep = lorahot_mode(w, "default", refs, fullgraph=True)
    return {"forward": {"fullgraph": {"lorahot": {**info, **_time(call, w, repeat)}}}}
