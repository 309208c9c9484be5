"""Rows suite: compiled forward latency against the number of input rows, base vs lorahot vs
merged vs PEFT, in one process, with each timed configuration's error against float32.

Row counts (``ROWS``): decode batches of 1, 8, 64, 256 and 1024 sequences of one token, and
single-sequence prefills of 2048 and 8192 tokens. Every configuration is compiled once
(reduce-overhead: CUDA graphs, one per shape), its error is checked at every shape against a
float32 eager PEFT reference with the rank-64 adapter, then all configurations are timed in
interleaved rounds. Ratios are only meaningful within one run, so ``base`` is always timed.

    python -m benchmarks.run --suite rows [--configs base,lorahot] [--rows 1,256,prefill2048]

On the full model each configuration takes minutes to prepare (the base 115 s on an H200 for
all seven shapes under reduce-overhead, lorahot over 200 s), so one process cannot fit the four
configurations in a 10-minute device call. ``--parallel`` prepares each configuration in its
own process, all at once (compiling is mostly single-threaded host work), then times them in
interleaved rounds, one process at a time while the others wait: the ratios stay within one
run on one idle GPU. ``LORAHOT_BENCH_CORE=N`` pins each process's timing to core ``N``, so that
their host parts run on the same core (the host's speed differs between processes by up to 2x
on the H200 machines: ``benchmarks/README.md``, fifteenth session). Each process rebuilds the same seeded workload; a weight checksum shows
they agree. Preparation times measured that way include the other processes' contention.

    python -m benchmarks.run --suite rows --parallel
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import host_ms, kernel_profile, median_ms, pinned_core, pipelined_ms, rel_err
from benchmarks.forward import Prepared, base_mode, lorahot_mode, peft_mode
from benchmarks.parallel import Workers
from benchmarks.workload import Workload, build

#: row label -> input ids shape (sequences, tokens)
ROWS: dict[str, tuple[int, int]] = {
    "1": (1, 1),
    "8": (8, 1),
    "64": (64, 1),
    "256": (256, 1),
    "1024": (1024, 1),
    "prefill2048": (1, 2048),
    "prefill8192": (1, 8192),
}
CONFIGS = (
    "base",
    "lorahot",
    "lorahot_merged",
    "peft_bf16",
    "lorahot_extras",
    "lorahot_unstacked",
    "lorahot_noextern",
    "lorahot_ungrouped",
    "lorahot_joined",
)
ROUNDS = 3


def _ids(w: Workload, shape: tuple[int, int]) -> torch.Tensor:
    g = torch.Generator().manual_seed(shape[0] * 100003 + shape[1])
    vocab = int(getattr(w.config, "vocab_size", 1000))
    return torch.randint(0, vocab, shape, generator=g).to(w.device)


def _reference(w: Workload, ids: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """float32 eager PEFT logits with the rank-64 adapter, per row label (last token only for
    prefills, so the 8192-token reference stays small)."""
    from peft import PeftModel

    model = PeftModel.from_pretrained(w.fresh_base(torch.float32), str(w.adapters[64])).eval()
    with torch.inference_mode():
        out = {label: _last(model(x).logits.float(), label) for label, x in ids.items()}
    del model
    return out


def _last(logits: torch.Tensor, label: str) -> torch.Tensor:
    return logits[:, -1] if label.startswith("prefill") else logits


def _builders(
    w: Workload, refs: dict[int, torch.Tensor], static: bool = False, mode: str | None = None
) -> dict[str, Callable[[], Prepared]]:
    """``static``: one graph per row shape (``torch.compile(dynamic=False)``), where the
    compiled layers trace the wide formula; else the row count is symbolic from the second
    shape on (one graph for every count, the layers' dynamic-shapes operator). ``mode``: the
    compile mode (by default reduce-overhead on CUDA, default elsewhere)."""
    mode = mode or ("reduce-overhead" if w.device.type == "cuda" else "default")
    dyn = False if static else None
    return {
        "base": lambda: base_mode(w, mode, dynamic=dyn),
        # swaps and recompiles: the forward suite
        "lorahot": lambda: lorahot_mode(w, mode, refs, swaps=0, dynamic=dyn),
        "lorahot_merged": lambda: lorahot_mode(w, mode, refs, merged=True, swaps=0, dynamic=dyn),
        # with the DoRA / LoRA-bias elementwise pass (inject(..., extras=True)): what it costs plain LoRA
        "lorahot_extras": lambda: lorahot_mode(w, mode, refs, swaps=0, extras=True, dynamic=dyn),
        # without the stacked-shrink pass (what it saves; the pass is process-wide: --parallel)
        "lorahot_unstacked": lambda: lorahot_mode(w, mode, refs, swaps=0, dynamic=dyn, stacked=False),
        # without the rewrite of lorahot.kernels.extern_inputs (process-wide too; it acts on static graphs only)
        "lorahot_noextern": lambda: lorahot_mode(w, mode, refs, swaps=0, dynamic=dyn, extern=False),
        # without joining the wide layers over one input (lorahot.kernels.wide_groups; process-wide too)
        "lorahot_ungrouped": lambda: lorahot_mode(w, mode, refs, swaps=0, dynamic=dyn, grouped=False),
        # q's expand joined with k's and v's at a symbolic row count (wide_groups.JOIN_SYMBOLIC; process-wide too)
        "lorahot_joined": lambda: lorahot_mode(w, mode, refs, swaps=0, dynamic=dyn, joined=True),
        "peft_bf16": lambda: peft_mode(w, mode, refs, bf16=True, dynamic=dyn),
        "peft": lambda: peft_mode(w, mode, refs, bf16=False, dynamic=dyn),
    }


def run(
    w: Workload,
    refs: dict[int, torch.Tensor],
    repeat: int,
    only: list[str] | None = None,
    rows: list[str] | None = None,
    save: Callable[[dict[str, Any]], None] = lambda r: None,
    static: bool = False,
    mode: str | None = None,
) -> dict[str, Any]:
    """``{"forward_rows_ms": {row: {config: ms}}, "forward_rows_rel_err": {...}, ...}``;
    ``static``: one graph per row shape, ``mode``: the compile mode (see :func:`_builders`;
    with ``"default"`` every key reads ``forward_rows_default_...``, :func:`keyed`)."""
    save = _keyed_save(save, mode)
    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    torch._dynamo.reset()
    labels = [r for r in ROWS if not rows or r in rows]
    ids = {label: _ids(w, ROWS[label]) for label in labels}
    reference = _reference(w, ids)
    names = [c for c in CONFIGS if not only or c in only]
    names = ["base", *[n for n in names if n != "base"]]  # base in every run: ratios within one run
    out: dict[str, Any] = {"forward_rows_ms": {}, "forward_rows_rel_err": {}, "forward_rows_prepare_s": {}}
    if static:
        out["forward_rows_static"] = True
    rounds: dict[tuple[str, str], list[float]] = {}
    prepared: dict[str, Prepared] = {}
    builders = _builders(w, refs, static, mode)
    for name in names:
        t = time.perf_counter()
        prepared[name] = builders[name]()
        call = prepared[name][0]
        for label in labels:  # first call per shape compiles / captures; check it
            err = rel_err(_last(call(ids[label]), label).float(), reference[label])
            out["forward_rows_rel_err"].setdefault(label, {})[name] = err
        out["forward_rows_prepare_s"][name] = round(time.perf_counter() - t, 1)
        print(f"[rows {name} ready in {out['forward_rows_prepare_s'][name]} s]", flush=True)
        _time_round([name], labels, prepared, ids, w, repeat, rounds, out)
        save(out)
    for _ in range(2, ROUNDS + 1):
        _time_round(names, labels, prepared, ids, w, repeat, rounds, out)
        save(out)
    return keyed(out, mode)


def _keyed_save(save: Callable[[dict[str, Any]], None], mode: str | None) -> Callable[[dict[str, Any]], None]:
    return lambda found: save(keyed(found, mode))


def keyed(found: dict[str, Any], mode: str | None) -> dict[str, Any]:
    """The suite's results under keys of their mode: ``forward_rows_...`` for the suite's own
    (reduce-overhead on CUDA), ``forward_rows_default_...`` for a run in default mode, so that
    the two never overwrite each other in a run file or in ``latest.json``."""
    if mode is None or mode == "reduce-overhead":
        return found
    tag = "forward_rows_" + mode.replace("-", "_")
    return {tag + k.removeprefix("forward_rows") if k.startswith("forward_rows") else k: v for k, v in found.items()}


def _time_round(
    names: list[str],
    labels: list[str],
    prepared: dict[str, Prepared],
    ids: dict[str, torch.Tensor],
    w: Workload,
    repeat: int,
    rounds: dict[tuple[str, str], list[float]],
    out: dict[str, Any],
) -> None:
    for name in names:
        call = prepared[name][0]
        for label in labels:
            x = ids[label]
            rounds.setdefault((label, name), []).append(median_ms(lambda: call(x), w.device, repeat=repeat, warmup=3))
            out["forward_rows_ms"].setdefault(label, {})[name] = statistics.median(rounds[(label, name)])
    line = "  ".join(
        f"{label}: " + " ".join(f"{n} {out['forward_rows_ms'][label][n]:.3f}" for n in names) for label in labels
    )
    print(f"[rows] {line}", flush=True)


def run_parallel(
    small: bool,
    repeat: int,
    only: list[str] | None = None,
    rows: list[str] | None = None,
    save: Callable[[dict[str, Any]], None] = lambda r: None,
    deadline: float | None = None,
    reserve_s: float = 120.0,
    static: bool = False,
    mode: str | None = None,
) -> dict[str, Any]:
    """:func:`run` with each configuration prepared in its own process, all at once; timing
    rounds run one process at a time (see the module docstring). Without a ``deadline`` any
    worker's failure ends the run with its traceback. With one (a ``time.perf_counter()``
    value), a configuration not prepared ``reserve_s`` seconds before it is killed and recorded
    under ``forward_rows_skipped`` (the base must be ready), and no round starts that would end
    after the deadline."""
    save = _keyed_save(save, mode)
    labels = [r for r in ROWS if not rows or r in rows]
    names = ["base", *[c for c in CONFIGS if (not only or c in only) and c != "base"]]
    out: dict[str, Any] = {
        "forward_rows_ms": {},
        "forward_rows_rel_err": {},
        "forward_rows_prepare_s": {},
        "forward_rows_parallel": True,
    }
    if static:
        out["forward_rows_static"] = True
    rounds: dict[tuple[str, str], list[float]] = {}
    specs = {name: (_worker, (small, name, labels, repeat, static, mode)) for name in names}
    with Workers("rows", specs, strict=deadline is None) as pool:
        ready = pool.wait_ready(None if deadline is None else deadline - reserve_s)
        if "base" not in ready:
            raise RuntimeError(f"the base configuration was not prepared: {pool.failed.get('base')}")
        if pool.failed:
            out["forward_rows_skipped"] = {n: f"{f.kind}: {f.message[-400:]}" for n, f in pool.failed.items()}
        names = [n for n in names if n in ready]
        checksums = {}
        for name in names:
            checksums[name] = ready[name]["checksum"]
            out["forward_rows_prepare_s"][name] = ready[name]["prepare_s"]
            for label, err in ready[name]["rel_err"].items():
                out["forward_rows_rel_err"].setdefault(label, {})[name] = err
            print(
                f"[rows {name} ready in {ready[name]['prepare_s']} s] {ready[name].get('triton_kernels') or ''}",
                flush=True,
            )
            if ready[name].get("triton_kernels"):
                out.setdefault("forward_rows_triton_kernels", {})[name] = ready[name]["triton_kernels"]
        if len(set(checksums.values())) != 1:
            raise RuntimeError(f"the workers built different models: {checksums}")

        def timed(name: str, times: dict[str, float]) -> None:
            for label, ms in times.items():
                rounds.setdefault((label, name), []).append(ms)
                out["forward_rows_ms"].setdefault(label, {})[name] = statistics.median(rounds[(label, name)])

        def round_done(i: int) -> None:
            line = "  ".join(
                f"{label}: " + " ".join(f"{n} {out['forward_rows_ms'][label][n]:.3f}" for n in names)
                for label in labels
            )
            print(f"[rows] {line}", flush=True)
            save(out)

        pool.rounds(names, ROUNDS, on_answer=timed, on_round=round_done, deadline=deadline)
        if torch.cuda.is_available():  # what each configuration launches, from the same compiled models
            for name in pool.live(names):
                profile = pool.request(name, "profile", deadline)
                if profile is not None:
                    out.setdefault("forward_rows_profile", {})[name] = profile
                    line = "  ".join(
                        f"{label}: {p['kernels_per_call']:.0f} kernels {p['gpu_us_per_call'] / 1e3:.3f} ms"
                        f" back to back {p['pipelined_ms']:.3f} ms host {p['host_ms']:.3f} ms"
                        for label, p in profile.items()
                    )
                    print(f"[rows profile {name}] {line}", flush=True)
            save(out)
    return keyed(out, mode)


def _worker(
    small: bool,
    name: str,
    labels: list[str],
    repeat: int,
    static: bool,
    mode: str | None,
    note: Callable[..., None],
) -> tuple[dict[str, Any], dict[str, Callable[[], Any]]]:
    """One configuration (a :class:`benchmarks.parallel.Workers` worker): build, reference,
    prepare and check; then times every row shape on request."""
    from benchmarks.swap import eager_reference

    torch._dynamo.config.cache_size_limit = 64
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    w = build(small, device)
    checksum = round(sum(float(v.float().sum()) for v in list(w.base_state.values())[:8]), 3)
    ids = {label: _ids(w, ROWS[label]) for label in labels}
    reference = _reference(w, ids)
    refs = {64: eager_reference(w, 64)}
    t = time.perf_counter()
    call = _builders(w, refs, static, mode)[name]()[0]
    errs = {label: rel_err(_last(call(ids[label]), label).float(), reference[label]) for label in labels}
    prepare_s = round(time.perf_counter() - t, 1)

    def timing() -> dict[str, float]:
        pinned_core()  # LORAHOT_BENCH_CORE: every process times on the same core
        return {label: median_ms(lambda x=ids[label]: call(x), w.device, repeat=repeat, warmup=3) for label in labels}

    def profile() -> dict[str, Any]:
        """Per shape, the kernel profile, the time per call of calls issued back to back (the
        GPU's time: with early launches the summed kernel times overstate it), and the host's
        part of a synced call (which differs between processes)."""
        found = {}
        for label in labels:
            found[label] = kernel_profile(lambda x=ids[label]: call(x))
            found[label]["pipelined_ms"] = pipelined_ms(lambda x=ids[label]: call(x), w.device)
            found[label]["host_ms"] = host_ms(lambda x=ids[label]: call(x), w.device)
        return found

    ready = {"checksum": checksum, "prepare_s": prepare_s, "rel_err": errs, "triton_kernels": _triton_kernels()}
    return ready, {"time": timing, "profile": profile}


def _triton_kernels() -> dict[str, int]:
    """How many binaries of each of lorahot's own Triton kernels this process compiled (each a
    JIT compile, cold with caches off: a part of the preparation time the compiler does not own)."""
    import sys

    out = {}
    for module in ("triton_lora_linear", "triton_row_scale", "triton_routed_lora"):
        mod = sys.modules.get(f"lorahot.kernels.{module}")
        for name, fn in vars(mod).items() if mod is not None else ():
            caches = getattr(fn, "device_caches", None)  # a Triton JITFunction (Triton 3.x)
            if caches is not None:
                out[f"{module}.{name}"] = sum(len(entry[0]) for entry in caches.values())
    return out
