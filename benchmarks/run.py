"""Runs the benchmark suites and writes ``benchmarks/results/latest.json``.

    python -m benchmarks.run --suite all            # GPU: TinyLlama-1.1B shape, bf16
    python -m benchmarks.run --suite swap --small   # CPU: a 2-layer shape

Suites: ``swap`` (file / host cache / slot activation / memory), ``forward`` (compiled latency
and recompiles, default and reduce-overhead), ``fullgraph`` (recompiles with fullgraph=True),
``all``; ``rows``, ``stack``, ``mixed`` (one adapter per batch row) and ``diffusion`` (an SDXL-shaped UNet or, ``--model flux``, a Flux.1 transformer; ``--tiny`` on a CPU) run on their
own. Each run's full JSON goes to ``results/runs/``; ``latest.json`` merges the newest figure of
every field, in the schema the README table reads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import diffusion, forward, mixed, rows, stack, swap
from benchmarks.common import COMPILE_CONFIGS, RESULTS, ROW_CONFIGS, commit, device_name, merge_results, split_fields
from benchmarks.workload import RANKS, build
from lorahot.kernels import pdl, routed_linear, stacked_routed


def summary(raw: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``latest.json`` that come from this run."""
    out: dict[str, Any] = {k: raw[k] for k in ("device", "torch", "peft", "date", "command", "workload") if k in raw}
    for key in (
        "swap_from_file_ms",
        "swap_from_host_ms",
        "activate_slot_ms",
        "memory",
        "stack_reweight_ms",
        "stack_forward_ms",
        "stack_rel_err",
        "mixed_batch_ms",
        "mixed_batch_single_ms",
        "mixed_batch_pipelined_ms",
        "mixed_batch_rel_err_vs_peft",
        "mixed_batch_recompiles",
        "mixed_batch_shapes",
    ):
        if key in raw:
            out[key] = raw[key]
    fwd = raw.get("forward", {})
    if fwd:
        out["recompiles"] = {m: fwd[m]["lorahot"]["recompiles"] for m in fwd if "lorahot" in fwd[m]}
    if "reduce-overhead" in fwd:
        ro = fwd["reduce-overhead"]
        for phase in ("decode", "prefill"):
            out[f"{phase}_ms"] = {
                k: ro[k][phase]
                for k in ("base", "lorahot", "peft", "peft_bf16", "lorahot_merged", "lorahot_unfused")
                if k in ro
            }
        out["decode_host_ms"] = {k: v["decode_host_ms"] for k, v in ro.items() if "decode_host_ms" in v}
        if "lorahot_merged" in ro:
            out["merged_swap_ms"] = ro["lorahot_merged"]["swap_ms"]
    if "default" in fwd:
        d = fwd["default"]
        out["default_mode_ms"] = {
            phase: {
                k: d[k][phase]
                for k in ("base", "lorahot", "lorahot_unfused", "lorahot_merged", "peft", "peft_bf16")
                if k in d and phase in d[k]
            }
            for phase in ("decode", "prefill")
        }
        paired = {
            phase: {k: v[f"{phase}_paired"] for k, v in d.items() if f"{phase}_paired" in v}
            for phase in ("decode", "prefill")
        }
        if any(paired.values()):  # the configurations taken in turn call by call
            out["default_mode_paired_ms"] = paired
    if "forward_rows_ms" in raw:  # the configurations, the others beside them
        split = {row: split_fields(ms, ROW_CONFIGS) for row, ms in raw["forward_rows_ms"].items()}
        out["forward_rows_ms"] = {row: named for row, (named, _) in split.items()}
        if any(other for _, other in split.values()):
            out["forward_rows_other_ms"] = {row: other for row, (_, other) in split.items()}
    if "forward_rows_rel_err" in raw:
        out["forward_rows_rel_err"] = raw["forward_rows_rel_err"]
    if "forward_rows_default_ms" in raw:  # the rows suite in default mode (--modes default)
        out["default_mode_rows_ms"] = raw["forward_rows_default_ms"]
        out["default_mode_rows_rel_err"] = raw.get("forward_rows_default_rel_err", {})
    if "forward_rows_prepare_s" in raw:  # compile and capture of every row shape, per configuration
        named, _ = split_fields(raw["forward_rows_prepare_s"], COMPILE_CONFIGS)
        out["compile_s"] = {"llm": named}
        out["compile_s_all"] = {"llm": dict(raw["forward_rows_prepare_s"])}
    errs = list(raw.get("rel_err", {}).values())
    for m in fwd.values():
        for _k, v in m.items():
            e = v.get("rel_err")
            errs += list(e.values()) if isinstance(e, dict) else ([e] if e is not None else [])
    if errs:
        out["max_rel_err"] = max(errs)
    return out


def table(latest: dict[str, Any]) -> str:
    """A short text table of the headline ratios."""
    rows = []
    for r, v in sorted(latest.get("swap_from_file_ms", {}).items(), key=lambda kv: int(kv[0])):
        rows.append(
            f"swap from file r{r:<3} lorahot {v['lorahot']:8.2f} ms  peft {v['peft']:8.2f}  floor {v['floor']:8.2f}  x floor {v['lorahot'] / v['floor']:.2f}  peft/lorahot {v['peft'] / v['lorahot']:.1f}"
        )
    for r, v in sorted(latest.get("swap_from_host_ms", {}).items(), key=lambda kv: int(kv[0])):
        fl = v.get("floor") or float("nan")
        rows.append(
            f"swap from host r{r:<3} lorahot {v['lorahot']:8.2f} ms  floor {fl:8.3f}  x floor {v['lorahot'] / fl:.2f}"
        )
    if "activate_slot_ms" in latest:
        v = latest["activate_slot_ms"]
        rows.append(f"activate slot       lorahot {v['lorahot']:8.3f} ms  floor {v['floor']:8.3f}")
    for phase in ("decode", "prefill"):
        v = latest.get(f"{phase}_ms")
        if v:
            rows.append(
                f"{phase:<7} (RO)        "
                + "  ".join(f"{k} {x:.2f}" for k, x in v.items())
                + f"  lorahot/base {v['lorahot'] / v['base']:.2f}"
            )
    if "recompiles" in latest:
        rows.append(f"recompiles          {latest['recompiles']}")
    if "max_rel_err" in latest:
        rows.append(f"max rel err         {latest['max_rel_err']:.3g}")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--suite",
        choices=["swap", "forward", "fullgraph", "rows", "stack", "mixed", "diffusion", "all"],
        default="all",
    )
    parser.add_argument("--small", action="store_true", help="2-layer model (CPU friendly)")
    parser.add_argument("--tiny", action="store_true", help="diffusion suite: a tiny model (the default on a CPU)")
    parser.add_argument(
        "--model",
        default="sdxl",
        choices=sorted(diffusion.FAMILIES),
        help="diffusion suite: an SDXL-shaped UNet (default) or a Flux.1-dev-shaped transformer",
    )
    parser.add_argument(
        "--regional",
        action="store_true",
        help="diffusion suite: compile each BasicTransformerBlock, not the whole UNet",
    )
    parser.add_argument(
        "--backend",
        default=None,
        help="diffusion suite: torch.compile backend (default inductor; eager on a CPU, where inductor takes minutes)",
    )
    parser.add_argument(
        "--deadline-s",
        type=float,
        default=None,
        help="diffusion and parallel rows suites: seconds after the start by which the run must be done; a compile "
        "that would leave no time for the timing rounds is abandoned, its configuration reported as not compiled in time",
    )
    parser.add_argument(
        "--dtype",
        choices=["bfloat16", "float16"],
        default=None,
        help="diffusion suite: the model's dtype (bfloat16 on CUDA by default, float32 on a CPU); a float16 run's "
        "figures go to its run file only, not to latest.json, whose diffusion figures are bfloat16",
    )
    parser.add_argument("--repeat", type=int, default=20, help="timed runs per figure (median)")
    parser.add_argument(
        "--modes",
        default=None,
        help="compile modes (default: reduce-overhead,default; the diffusion suite: default; the rows suite: one "
        "mode, reduce-overhead on CUDA, its figures under forward_rows_default_* in default mode)",
    )
    parser.add_argument("--no-peft", action="store_true", help="skip PEFT in the forward suite")
    parser.add_argument(
        "--configs",
        default="",
        help="forward suite: only these configurations (comma-separated, e.g. base,lorahot,peft)",
    )
    parser.add_argument("--rows", default="", help="rows suite: only these row labels (e.g. 1,256,prefill2048)")
    parser.add_argument(
        "--static",
        action="store_true",
        help="rows suite: compile one graph per row shape (dynamic=False), not one with a symbolic row count",
    )
    parser.add_argument(
        "--parallel",
        action="store_true",
        help="rows and diffusion suites: prepare each configuration in its own process, all at once",
    )
    parser.add_argument(
        "--no-pdl",
        action="store_true",
        help="lorahot's kernels not launched early (lorahot.kernels.pdl, on by default; LORAHOT_PDL=0 for "
        "worker processes); the mixed suite's figures under mixed_batch_nopdl_* in the run file only",
    )
    parser.add_argument(
        "--routed-accumulate",
        action="store_true",
        help="routed layers above the fused path's rows write the slots' updates first and let the base GEMM "
        "accumulate onto them (lorahot.kernels.routed_linear.ACCUMULATE, off by default); the mixed suite's "
        "figures under mixed_batch_accumulate_* in the run file only",
    )
    parser.add_argument(
        "--stack-routed",
        action="store_true",
        help="one routed shrink for the routed layers that share an input (lorahot.kernels.stacked_routed, off by "
        "default); the mixed suite's figures under mixed_batch_stacked_* in the run file only",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "latest.json")
    args = parser.parse_args(argv)
    if args.no_pdl:
        os.environ["LORAHOT_PDL"] = "0"
        pdl.ENABLED = False
    if args.routed_accumulate:
        os.environ["LORAHOT_ROUTED_ACCUMULATE"] = "1"
        routed_linear.ACCUMULATE = True
    if args.stack_routed:
        os.environ["LORAHOT_STACK_ROUTED"] = "1"
        stacked_routed.ENABLED = True
    start = time.perf_counter()

    import peft

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    wanted = args.modes or ("default" if args.suite == "diffusion" else "reduce-overhead,default")
    modes = [m for m in wanted.split(",") if m and (device.type == "cuda" or m == "default")]
    # the rows suite: one mode, its own (reduce-overhead on CUDA) unless --modes names another
    rows_mode = args.modes if args.suite == "rows" and args.modes else None
    if rows_mode is not None and rows_mode not in ("default", "reduce-overhead", "max-autotune"):
        parser.error(f"the rows suite takes one compile mode, got --modes {rows_mode}")
    if args.dtype is not None and args.suite != "diffusion":
        parser.error("--dtype applies to the diffusion suite only")
    if args.suite == "diffusion":
        return _diffusion(args, argv, device, modes, start)
    parallel_rows = args.suite == "rows" and args.parallel  # the workers build their own
    w = None if parallel_rows else build(args.small, device)
    refs = {} if w is None else {r: swap.eager_reference(w, r) for r in RANKS}
    raw: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": commit(),
        "peft": peft.__version__,
        "pdl": pdl.ENABLED,
        "routed_accumulate": routed_linear.ACCUMULATE,
        "stack_routed": stacked_routed.ENABLED,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "workload": "small 2-layer Llama" if args.small else "TinyLlama-1.1B shape, 154 LoRA layers",
    }
    runs = args.out.parent / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    run_file = runs / f"{stamp}-{args.suite}{'-small' if args.small else ''}.json"

    def save_partial(partial: dict[str, Any]) -> None:
        merged = json.loads(json.dumps(raw))
        merge_dict(merged, partial)
        run_file.write_text(json.dumps(merged, indent=1))
        merge_results(args.out, summary(merged))

    steps = {
        "swap": lambda: swap.run(w, refs, args.repeat),
        "forward": lambda: forward.run(
            w,
            refs,
            args.repeat,
            modes,
            with_peft=not args.no_peft,
            save=save_partial,
            only=[c for c in args.configs.split(",") if c],
        ),
        "fullgraph": lambda: forward.run_fullgraph(w, refs, args.repeat),
        "stack": lambda: stack.run(w, args.repeat),
        "mixed": lambda: mixed.run(
            w,
            args.repeat,
            small=args.small,
            variant="_".join(
                v
                for v, on in (
                    ("nopdl", args.no_pdl),
                    ("accumulate", args.routed_accumulate),
                    ("stacked", args.stack_routed),
                )
                if on
            )
            or None,
        ),
        "rows": lambda: (
            rows.run_parallel(
                args.small,
                args.repeat,
                only=[c for c in args.configs.split(",") if c],
                rows=[r for r in args.rows.split(",") if r],
                save=save_partial,
                deadline=None if args.deadline_s is None else start + args.deadline_s,
                static=args.static,
                mode=rows_mode,
            )
            if args.parallel
            else rows.run(
                w,
                refs,
                args.repeat,
                only=[c for c in args.configs.split(",") if c],
                rows=[r for r in args.rows.split(",") if r],
                save=save_partial,
                static=args.static,
                mode=rows_mode,
            )
        ),
    }
    for name, step in steps.items():
        if args.suite != name and (args.suite != "all" or name in ("rows", "stack", "mixed")):  # their own calls
            continue
        merge_dict(raw, step())
        run_file.write_text(json.dumps(raw, indent=1))  # saved after every suite
        latest = merge_results(args.out, summary(raw))
        print(f"[{name} done]", flush=True)
    print(json.dumps(raw, indent=1))
    print(table(latest))
    return 0


def _diffusion(
    args: argparse.Namespace, argv: list[str] | None, device: torch.device, modes: list[str], start: float
) -> int:
    """The diffusion suite: its own workload (a UNet), saved after every configuration."""
    import diffusers
    import peft

    tiny = args.tiny or device.type == "cpu"
    dtype = getattr(torch, args.dtype) if args.dtype else None
    w = diffusion.build(tiny, device, dtype=dtype, family=args.model)
    raw: dict[str, Any] = {
        "device": device_name(device),
        "torch": torch.__version__,
        "commit": commit(),
        "peft": peft.__version__,
        "diffusers": diffusers.__version__,
        "pdl": pdl.ENABLED,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": "python -m benchmarks.run " + " ".join(argv if argv is not None else sys.argv[1:]),
        "workload": w.name,
        "dtype": str(w.dtype),
        "parallel": bool(args.parallel),
    }
    runs = args.out.parent / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%S")
    kind = ("" if args.model == "sdxl" else f"-{args.model}") + (f"-{args.dtype}" if args.dtype == "float16" else "")
    run_file = runs / f"{stamp}-diffusion{kind}{'-tiny' if tiny else ''}.json"
    out = args.out if not tiny or args.out != RESULTS / "latest.json" else RESULTS / "latest-tiny.json"
    latest: dict[str, Any] = {}

    def save(partial: dict[str, Any]) -> None:
        nonlocal latest
        merged = json.loads(json.dumps(raw))
        merge_dict(merged, partial)
        run_file.write_text(json.dumps(merged, indent=1))
        fields = diffusion.summary(
            merged, run_file.name
        )  # the top-level device / workload fields describe the LLM figures
        run_key = "diffusion_run" if args.model == "sdxl" else f"diffusion_{args.model}_run"
        fields[run_key] = {**fields.get(run_key, {}), **{k: merged[k] for k in raw}}
        # float16 figures stay in the run file: latest.json's diffusion figures are bfloat16's
        latest = fields if args.dtype == "float16" else merge_results(out, fields)

    result = (diffusion.run_parallel if args.parallel else diffusion.run)(
        w,
        args.repeat,
        modes,
        only=[c for c in args.configs.split(",") if c],
        regional=args.regional,
        backend=args.backend or ("inductor" if device.type == "cuda" else "eager"),
        deadline=None if args.deadline_s is None else start + args.deadline_s,
        save=save,
    )
    save(result)
    print(f"[diffusion done in {time.perf_counter() - start:.0f} s] {run_file}")
    print(json.dumps({k: v for k, v in latest.items() if k.startswith(("diffusion", "compile_s"))}, indent=1))
    return 0


def merge_dict(a: dict[str, Any], b: dict[str, Any]) -> None:
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(a.get(k), dict):
            merge_dict(a[k], v)
        else:
            a[k] = v


if __name__ == "__main__":
    raise SystemExit(main())
