"""Probe: where the whole model's default-mode decode time goes, base against lorahot.

The forward suite's default mode (``torch.compile(model)``, no CUDA graphs) read lorahot's decode
at 1.60x and 2.53x the base model's on two days (``runs/20261201T225544-forward.json``,
``runs/20261202T004403-forward.json``), about 32-68 us per LoRA layer, where two blocks compiled
alone read 4.3 us per layer (``runs/20261201T225424-launch-host-probe.log``). This probe builds
the suite's own configurations (the TinyLlama-shaped workload, 154 rank-64 layers, compiled
with ``fullgraph=True`` after a prefill call, as the suite does) and, per configuration:

- synced latency and host time per decode call, in interleaved rounds (drift control);
- launches per decode call, by the profiler;
- a cProfile of 50 decode calls, the top functions by own time, and the count of the wrapper's
  calls that matter per call (``mm``/``addmm``, ``reinterpret_tensor``, allocations, Triton runs);
- Python's garbage collections during the timed calls.

Configurations (``PROBE_CONFIGS``, default ``base,lorahot``): ``base`` and ``lorahot`` (as the
suite), ``lorahot_nohook`` (the same without the pre-hook that refuses PEFT's ``adapter_names=``);
a name with ``_reuse`` (``base_reuse``, ``lorahot_reuse``) is that configuration compiled
with inductor taking every buffer reuse it finds (:func:`always_reuse`), one with ``_unrolled``
or ``_accumulate`` with that switch of the library on (:func:`switches`). ``PROBE_PROFILE=0``
skips the cProfile part.
With ``PROBE_SKIP_GUARDS=1`` each configuration is also timed under
``torch.compiler.set_stance(skip_guard_eval_unsafe=True)`` (the row ``NAME, guards skipped``):
dynamo then checks only the guards that tell the frame's cached graphs apart, so the difference
is what the guards cost the host in place, with the model's own work between two checks (not
the hot loop of ``guard_cost_probe``). A configuration whose frames refuse the stance (a frame
it would recompile) prints so and has no such row. The cProfile columns: calls per decode call
and their own time (tottime, under the profiler), not what they call.

Measured on an H200 host (torch 2.11, one decode row, 154 rank-64 layers):

- ``runs/20261202T032445-default-mode-probe.log`` (13fd8a9): base 6.9 ms per decode call, 335
  launches; lorahot 11.1 ms, 489 launches (one more per LoRA layer); lorahot with its forward
  pre-hook removed 9.3 ms (its rounds spread 8.7-13.1 ms: not resolved). Per call the wrapper
  ran 244 GEMMs, 314 Triton kernels and 232 allocations against the base model's 156, 226 and 55.
- ``runs/20261202T033442-default-mode-probe.log`` (2f2201e, reverted): the decode layers wrote
  their LoRA as two reductions the compiler generates (no GEMM added): 577 launches and 21.9 ms
  against the wide GEMMs' 489 and 15.3 and the base model's 335 and 7.1. Under cProfile a
  compiled Triton kernel's launch (``run`` with what it calls) cost the host about what a
  ``torch.mm`` did (43 against 31 us, both inflated by the profiler): in default mode on this
  host what a layer costs is how many launches it adds, whatever they launch.

    PYTHONPATH=. [PROBE_CONFIGS=base,lorahot,lorahot_nohook PROBE_SKIP_GUARDS=1] python3 -m benchmarks.experiments.default_mode_probe
"""

from __future__ import annotations

import contextlib
import cProfile
import gc
import io
import os
import pstats
import statistics
import time
from collections.abc import Callable, Iterator

import torch

import lorahot
from benchmarks.workload import MAX_RANK, TARGETS, build
from lorahot.kernels import unrolled_expand, wide_groups
from lorahot.runtime import peft_arguments

Call = Callable[[], object]


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


CONFIGS = tuple(os.environ.get("PROBE_CONFIGS", "base,lorahot").split(","))
SKIP_GUARDS = os.environ.get("PROBE_SKIP_GUARDS") == "1"
ROUNDS = int(os.environ.get("PROBE_ROUNDS", "5"))


@contextlib.contextmanager
def always_reuse() -> Iterator[None]:
    """Inductor's wrapper with every buffer reuse its planning finds taken: while this is on,
    ``AllocateLine.should_reuse_buffer`` answers yes where it refuses a reuse that would raise
    the graph's estimated peak memory (at decode the peak is a few tens of KB, which lorahot's
    temporaries reach: each later block then allocates its own), and the FX graph cache is off
    so that the wrapper is generated anew."""
    with reuse_decided(lambda decide, line, free_line, size: True):
        yield


@contextlib.contextmanager
def reuse_decided(decide: Callable[..., bool]) -> Iterator[None]:
    """Inductor's buffer reuse decided by ``decide(inductor's own decision, allocate line, free
    line, bytes)`` in place of ``AllocateLine.should_reuse_buffer``, with the FX graph cache off
    so that every wrapper is planned anew while this is on."""
    from torch._inductor import config
    from torch._inductor.codegen import wrapper

    saved = wrapper.AllocateLine.should_reuse_buffer
    wrapper.AllocateLine.should_reuse_buffer = lambda self, free_line, size: decide(saved, self, free_line, size)  # type: ignore[method-assign]
    try:
        with config.patch(fx_graph_cache=False):
            yield
    finally:
        wrapper.AllocateLine.should_reuse_buffer = saved  # type: ignore[method-assign]


@contextlib.contextmanager
def switches(name: str) -> Iterator[None]:
    """The library's switches a configuration's name asks for, while it compiles: ``_unrolled``
    (:data:`lorahot.kernels.unrolled_expand.ENABLED`: gate's and up's expands unrolled, with
    o's and down's where ``LORAHOT_UNROLLED_LONE=1``; on by default), ``_gemm`` (that switch
    off: every expand a GEMM), ``_sums`` (:data:`lorahot.kernels.unrolled_expand.SUMS`: q/k/v's
    one buffer written by the unrolled sums), ``_lonesums``
    (:data:`lorahot.kernels.unrolled_expand.LONE_SUMS`: o's and down's outputs each written by
    a kernel of their own), ``_reduced`` (:data:`lorahot.kernels.unrolled_expand.REDUCED`: the
    unrolled expands lowered as reductions over the rank), ``_accumulate``
    (:data:`lorahot.kernels.wide_groups.ACCUMULATE`), ``_reuse`` (:func:`always_reuse`); the
    others as the library sets them."""
    u = unrolled_expand
    saved = u.ENABLED, u.SUMS, u.LONE_SUMS, u.REDUCED, wide_groups.ACCUMULATE
    u.ENABLED = "_gemm" not in name and (u.ENABLED or "_unrolled" in name)
    u.SUMS = u.SUMS or "_sums" in name
    u.LONE_SUMS = u.LONE_SUMS or "_lonesums" in name
    u.REDUCED = u.REDUCED or "_reduced" in name
    wide_groups.ACCUMULATE = wide_groups.ACCUMULATE or "_accumulate" in name
    try:
        with always_reuse() if "_reuse" in name else contextlib.nullcontext():
            yield
    finally:
        u.ENABLED, u.SUMS, u.LONE_SUMS, u.REDUCED, wide_groups.ACCUMULATE = saved


def compiled(name: str, model: torch.nn.Module, ids: dict[str, torch.Tensor]) -> Call:
    # static rows: the forms share the model's code object, whose automatic dynamic shapes would
    # compile every form after the first with a symbolic prefill (benchmarks/forward.py, STATIC)
    c = torch.compile(model, fullgraph=True, dynamic=False)

    def call(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            out: torch.Tensor = c(input_ids=x).logits
            return out

    with switches(name):
        call(ids["prefill"])
        got = call(ids["decode"]).float()
    if not name.startswith("base"):
        with torch.inference_mode():
            want = model(input_ids=ids["decode"]).logits.float()
        err = ((got - want).norm() / want.norm()).item()
        print(f"{name}: compiled decode against eager, relative error {err:.3g}", flush=True)
    return lambda: call(ids["decode"])


def guards_skipped(call: Call) -> Call:
    """``call`` under the stance that skips dynamo's guards but those telling cached graphs apart."""

    def skipped() -> object:
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return call()

    return skipped


def host_and_synced(call: Call, n: int = 30) -> tuple[float, float]:
    host, synced = [], []
    for _ in range(n):
        sync()
        t = time.perf_counter()
        call()
        host.append(time.perf_counter() - t)
        sync()
        synced.append(time.perf_counter() - t)
    return statistics.median(host) * 1e3, statistics.median(synced) * 1e3


def launches(call: Call) -> int:
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        call()
        sync()
    return sum(e.count for e in prof.key_averages() if "Launch" in e.key)


def profile(name: str, call: Call, n: int = 50) -> None:
    prof = cProfile.Profile()
    sync()
    prof.enable()
    for _ in range(n):
        call()
    prof.disable()
    sync()
    stats = pstats.Stats(prof)
    per: dict[str, float] = {}
    total = 0.0
    for (file, _line, fn), (_cc, nc, tt, _ct, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        total += tt
        fn = fn.strip("<>").split()[-1]  # "<built-in method torch.mm>" -> "torch.mm"
        for key in ("mm", "addmm", "_reinterpret_tensor", "_empty_strided_cuda", "assert_size_stride", "run", "inner"):
            if (fn == key and (key != "run" or "triton" in file)) or fn.endswith(f".{key}"):
                per[f"{key} calls"] = per.get(f"{key} calls", 0) + nc / n
                per[f"{key} us"] = per.get(f"{key} us", 0) + tt / n * 1e6
    print(f"--- {name}: cProfile, {total / n * 1e3:.2f} ms per call under the profiler", flush=True)
    print("    " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(per.items())), flush=True)
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()][-15:]
    print("\n".join("    " + ln[:160] for ln in lines), flush=True)


def main() -> None:
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    w = build(small=dev.type == "cpu", device=dev)  # small on the CPU: a check of the script
    ids = {"prefill": w.prefill, "decode": w.decode}
    calls: dict[str, Call] = {}
    keep = []
    for name in CONFIGS:
        t = time.perf_counter()
        model = w.fresh_base()
        if not name.startswith("base"):
            runtime = lorahot.inject(model, TARGETS, max_rank=MAX_RANK)
            runtime.load(w.adapters[64])
            keep.append(runtime)
            if name.startswith("lorahot_nohook"):
                for module in model.modules():
                    peft_arguments.uninstall(module)
        keep.append(model)
        calls[name] = compiled(name, model, ids)
        print(f"{name}: compiled in {time.perf_counter() - t:.1f} s", flush=True)
        if SKIP_GUARDS:
            skipped = guards_skipped(calls[name])
            try:
                skipped()
                calls[f"{name}, guards skipped"] = skipped
            except RuntimeError as err:
                print(f"{name}: refuses skip_guard_eval_unsafe ({str(err).splitlines()[0][:120]})", flush=True)
    for call in calls.values():
        for _ in range(10):
            call()
    rows: dict[str, list[tuple[float, float]]] = {k: [] for k in calls}
    collections = dict.fromkeys(calls, 0)
    for _ in range(ROUNDS):
        for name, call in calls.items():
            before = sum(s["collections"] for s in gc.get_stats())
            rows[name].append(host_and_synced(call))
            collections[name] += sum(s["collections"] for s in gc.get_stats()) - before
    print(f"decode, default mode: host ms / synced ms per call, {ROUNDS} interleaved rounds (median of 30)")
    base_host = statistics.median(h for h, _ in rows["base"])
    base_sync = statistics.median(s for _, s in rows["base"])
    for name, r in rows.items():
        h = statistics.median(x for x, _ in r)
        s = statistics.median(y for _, y in r)
        print(
            f"{name:32s} host {h:7.3f} synced {s:7.3f} ({s / base_sync:.2f}x; host +{(h - base_host) * 1e3 / 154:.1f} "
            f"us per LoRA layer) rounds {' '.join(f'{y:.2f}' for _, y in r)} launches {launches(calls[name])} "
            f"gc collections {collections[name]}",
            flush=True,
        )
    for name, call in calls.items():
        if "skipped" not in name and os.environ.get("PROBE_PROFILE", "1") == "1":
            profile(name, call)


if __name__ == "__main__":
    main()
