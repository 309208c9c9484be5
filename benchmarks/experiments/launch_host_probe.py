"""Probe: where a LoRA layer's host time goes in default mode (no CUDA graphs), on the GPU host.

In default mode every call of a compiled model runs its wrapper on the host, and each fused
LoRA layer calls the opaque operator ``lorahot::lora_linear``, whose Python body picks the tiles
and launches the Triton kernel (two launches where K is split). The forward suite's default-mode
decode on an H200 read 33.9 ms for lorahot against 5.9 for the base model, the host's time per
call 35.5 against 5.5 ms (``runs/20261201T223025-forward.json``): about 190 us per LoRA layer.

Part 1, per call, host microseconds (calls issued back to back, the GPU idle-bound), one decode
row, per TinyLlama shape (q/o: one launch; k/v: K split, two launches):

- ``linear``: ``F.linear``, the base layer's own cost;
- ``op``: ``torch.ops.lorahot.lora_linear`` as the compiled wrapper calls it;
- ``op (jit)``: the same with every launch bound by ``kernel[grid]`` (no direct launches,
  :mod:`lorahot.kernels.direct_launch`), as before 2026-12-02;
- ``launch``: :func:`lorahot.kernels.triton_lora_linear.launch`, the op's body without the dispatcher;
- ``jit``: the Triton kernel's ``kernel[grid](...)`` alone (one launch, no split-K sum);
- ``runner``: the compiled kernel's own runner (``CompiledKernel[grid](*args)``), no argument binding;
- the pieces of the body: ``pdl.active``, ``launching_on``, ``config_for``, a ``torch.empty``.

Part 2: two TinyLlama-shaped blocks (14 LoRA layers) compiled in default mode, base and lorahot
with a rank-64 adapter, host time per decode call and launches: lorahot with its fused
operator (direct launches) and with the wide GEMMs default mode takes without them, the base
model measured first and last;
before it, what :func:`lorahot.kernels.compile_mode.launched_per_call` answers per mode.

Part 3 (:func:`floors`): the least an opaque operator can cost the host (an empty body; the
kernel's binary launched directly, split and unsplit). ``PROBE_PART`` picks the parts
(default ``123``).

    PYTHONPATH=. python3 -m benchmarks.experiments.launch_host_probe
"""

from __future__ import annotations

import cProfile
import io
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import lorahot
from lorahot.kernels import pdl
from lorahot.kernels import triton_lora_linear as K
from lorahot.kernels.device_guard import launching_on

SHAPES = {"q/o": (2048, 2048), "k/v": (2048, 256), "gate/up": (2048, 5632), "down": (5632, 2048)}


def per_call_us(fn: Callable[[], object], n: int = 200, rounds: int = 7) -> float:
    for _ in range(20):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        ts.append((time.perf_counter() - t) / n * 1e6)
        torch.cuda.synchronize()
    return statistics.median(ts)


def decode_layer(k: int, n: int) -> tuple[torch.Tensor, ...]:
    """``(x, w, a, bt, s)``: one bf16 decode row, a ``[n, k]`` weight and a rank-64 adapter on CUDA."""
    dev, dt = torch.device("cuda"), torch.bfloat16
    x = torch.randn(1, k, device=dev, dtype=dt)
    w = torch.randn(n, k, device=dev, dtype=dt) / k**0.5
    a = torch.randn(64, k, device=dev, dtype=dt) / k**0.5
    bt = torch.randn(64, n, device=dev, dtype=dt) / 8
    return x, w, a, bt, torch.full((64,), 0.5, device=dev)


def part1() -> None:
    dev, dt = torch.device("cuda"), torch.bfloat16
    head = ["linear", "op", "op (jit)", "launch", "jit", "runner", "pdl", "on", "config", "empty"]
    print("host us per call, 1 row")
    print(f"{'shape':8s} " + " ".join(f"{h:>8s}" for h in head), flush=True)
    for name, (k, n) in SHAPES.items():
        x, w, a, bt, s = decode_layer(k, n)
        out = torch.empty(1, n, device=dev, dtype=dt)
        cfg = K.config_for(1, n, k)
        early = pdl.active(dev)
        bm, bn, bk, warps, stages, split = cfg
        chunk, split, ws = K.split_k(k, bk, split, out)
        grid = (triton_cdiv(1, bm), triton_cdiv(n, bn), split)
        args = (
            x, w, a, bt, w, s, out, ws, x, x, 1, n, k, 64, chunk, 0, 1,
            x.stride(0), w.stride(0), a.stride(-2), bt.stride(-2), out.stride(0), bt.stride(0), x.stride(0),
        )  # fmt: skip
        consts = {
            "HAS_BIAS": False,
            "R_PAD": 64,
            "SPLIT": split,
            "BLOCK_M": bm,
            "BLOCK_N": bn,
            "BLOCK_K": bk,
            "ROUTED": False,
            "PDL": early,
        }

        def jit() -> object:
            return K._lora_linear_kernel[grid](*args, **consts, num_warps=warps, num_stages=stages, launch_pdl=early)

        compiled = jit()
        want = torch.ops.lorahot.lora_linear(x, w, None, a, bt, s)
        runner_ok = True
        try:
            run = compiled[grid]
            run(*args, *consts.values())
        except Exception as e:
            print(f"  runner failed: {type(e).__name__}: {e}")
            runner_ok = False
        row = [
            per_call_us(lambda: torch.nn.functional.linear(x, w)),
            per_call_us(lambda: torch.ops.lorahot.lora_linear.default(x, w, None, a, bt, s)),
            jit_bound(lambda: torch.ops.lorahot.lora_linear.default(x, w, None, a, bt, s)),
            per_call_us(lambda: K.launch(x, w, None, a, bt, s, out, cfg)),
            per_call_us(jit),
            per_call_us(lambda: run(*args, *consts.values())) if runner_ok else float("nan"),
            per_call_us(lambda: pdl.active(dev), n=2000),
            per_call_us(lambda: launching_on(dev).__enter__(), n=2000),
            per_call_us(lambda: K.config_for(1, n, k), n=2000),
            per_call_us(lambda: torch.empty((2, 1, n), device=dev, dtype=torch.float32), n=2000),
        ]
        K.launch(x, w, None, a, bt, s, out, cfg)
        torch.cuda.synchronize()
        err = (out.float() - want.float()).abs().max().item()
        print(f"{name:8s} " + " ".join(f"{v:8.1f}" for v in row) + f"   launch-op {err:.3g}", flush=True)
        if name == "k/v":  # where the operator's host time goes, by function
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(2000):
                torch.ops.lorahot.lora_linear.default(x, w, None, a, bt, s)
            prof.disable()
            torch.cuda.synchronize()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(18)
            print("\n".join(line for line in buf.getvalue().splitlines() if line.strip())[:3500], flush=True)


def jit_bound(fn: Callable[[], object]) -> float:
    """:func:`per_call_us` of ``fn`` with every launch bound by ``kernel[grid]`` (no direct launches)."""
    from lorahot.kernels import direct_launch

    keep = direct_launch.available
    direct_launch.available = lambda: False  # type: ignore[assignment]
    try:
        return per_call_us(fn)
    finally:
        direct_launch.available = keep  # type: ignore[assignment]


def floors() -> None:
    """What an opaque operator costs the host at the least, against ``F.linear``: the dispatcher
    into a Python body that does nothing (returns a tensor made beforehand), and the fused
    kernel's compiled binary launched through its own ``run`` with every argument prepared
    (no binding, no runner closure), unsplit (one launch) and split as ``config_for`` has it.
    A lean operator (cached binaries, one launch) would cost about the first plus the second."""
    from lorahot.kernels.op_registry import define

    dev, dt = torch.device("cuda"), torch.bfloat16
    keep: dict[str, torch.Tensor] = {}

    @define("probe_empty(Tensor x, Tensor w) -> Tensor", lambda x, w: x.new_empty((x.shape[0], w.shape[0])))
    def _empty(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return keep["out"]

    print("host us per call, 1 row: floors of an opaque operator")
    head = ["linear", "empty op", "run split", "run unsplit"]
    print(f"{'shape':8s} " + " ".join(f"{h:>11s}" for h in head), flush=True)
    for name, (k, n) in SHAPES.items():
        x, w, a, bt, s = decode_layer(k, n)
        keep["out"] = torch.empty(1, n, device=dev, dtype=dt)
        early = pdl.active(dev)
        row = [
            per_call_us(lambda: torch.nn.functional.linear(x, w)),
            per_call_us(lambda: torch.ops.lorahot.probe_empty.default(x, w)),
        ]
        want = torch.ops.lorahot.lora_linear(x, w, None, a, bt, s)
        for split_wanted in (None, 1):
            bm, bn, bk, warps, stages, split = K.config_for(1, n, k)
            split = split if split_wanted is None else 1
            out = torch.empty(1, n, device=dev, dtype=dt)
            chunk, split, ws = K.split_k(k, bk, split, out)
            grid = (triton_cdiv(1, bm), triton_cdiv(n, bn), split)
            args = (
                x, w, a, bt, w, s, out, ws, x, x, 1, n, k, 64, chunk, 0, 1,
                x.stride(0), w.stride(0), a.stride(-2), bt.stride(-2), out.stride(0), bt.stride(0), x.stride(0),
                False, 64, split, bm, bn, bk, False, early,
            )  # fmt: skip
            names = ("HAS_BIAS", "R_PAD", "SPLIT", "BLOCK_M", "BLOCK_N", "BLOCK_K", "ROUTED", "PDL")
            compiled = K._lora_linear_kernel[grid](
                *args[:-8], **dict(zip(names, args[-8:])), num_warps=warps, num_stages=stages, launch_pdl=early
            )
            stream = torch.cuda.current_stream().cuda_stream

            def direct() -> None:
                compiled.run(
                    grid[0], grid[1], grid[2], stream, compiled.function, compiled.packed_metadata, None, None, None,
                    *args,
                )  # fmt: skip

            try:
                direct()
                if split > 1:
                    K.sum_splits(ws, out)
                torch.cuda.synchronize()
                err = (out.float() - want.float()).abs().max().item()
                row.append(per_call_us(direct))
                print(f"  {name} split {split}: direct launch against the operator {err:.3g}")
            except Exception as e:
                print(f"  {name} split {split}: direct launch failed: {type(e).__name__}: {e}")
                row.append(float("nan"))
        print(f"{name:8s} " + " ".join(f"{v:11.1f}" for v in row), flush=True)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def part2() -> None:
    import transformers
    from peft import LoraConfig, get_peft_model

    from benchmarks.workload import TARGETS

    dev, dt = torch.device("cuda"), torch.bfloat16
    cfg = transformers.LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(dev):
        base = transformers.LlamaForCausalLM(cfg).to(dt).eval()
    tmp = Path(tempfile.mkdtemp())
    peft_model = get_peft_model(
        transformers.LlamaForCausalLM(cfg).eval(),
        LoraConfig(r=64, lora_alpha=128, target_modules=TARGETS, init_lora_weights=False),
    )
    peft_model.save_pretrained(tmp / "a")
    ids = torch.tensor([[5]], device=dev)
    from lorahot.kernels import compile_mode, direct_launch

    per_call = compile_mode.launched_per_call
    print(f"direct launches available: {direct_launch.available()}", flush=True)
    runtime = None
    rows = []
    # lorahot with the fused operator (the layers told the graph is replayed, so they keep it;
    # its launches direct), then with the wide GEMMs default mode takes; base first and last,
    # to see the host's drift
    for name in ("base", "fused", "wide", "fused", "base"):
        model = base
        if name != "base" and runtime is None:
            runtime = lorahot.inject(base, TARGETS, max_rank=64)
            runtime.load(str(tmp / "a"))
        compile_mode.launched_per_call = per_call if name != "fused" else (lambda: False)  # type: ignore[assignment]
        torch._dynamo.reset()
        compiled = torch.compile(model)

        def call() -> None:
            with torch.inference_mode():
                compiled(input_ids=ids)

        for _ in range(3):
            call()
        host = []
        for _ in range(40):
            torch.cuda.synchronize()
            t = time.perf_counter()
            call()
            host.append((time.perf_counter() - t) * 1e3)
        torch.cuda.synchronize()
        rows.append((name, statistics.median(host)))
        print(f"{name}: host {rows[-1][1]:.3f} ms per decode call; launches {launches(call)}", flush=True)
    compile_mode.launched_per_call = per_call  # type: ignore[assignment]
    base_ms = (rows[0][1] + rows[-1][1]) / 2
    for name, ms in rows[1:-1]:
        print(
            f"2 blocks, default mode, {name}: {(ms - base_ms) * 1e3 / 14:.1f} us per LoRA layer over the base",
            flush=True,
        )


def launches(call: Callable[[], None]) -> dict[str, int]:
    """The host's launch calls in one ``call()``, by runtime function (the profiler's count)."""
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        call()
        torch.cuda.synchronize()
    return {e.key: e.count for e in prof.key_averages() if "Launch" in e.key or "Memset" in e.key}


def detection() -> None:
    """What :func:`lorahot.kernels.compile_mode.launched_per_call` answers at trace time per mode."""
    from lorahot.kernels import compile_mode

    def signed(x: torch.Tensor) -> torch.Tensor:
        return x + 1 if compile_mode.launched_per_call() else x - 1

    for mode in (None, "reduce-overhead"):
        torch._dynamo.reset()
        got = torch.compile(signed, mode=mode)(torch.zeros(2, device="cuda"))
        print(f"launched_per_call under mode={mode}: {bool(got[0] > 0)}", flush=True)


if __name__ == "__main__":
    parts = os.environ.get("PROBE_PART", "123")
    if "1" in parts:
        part1()
    if "3" in parts:
        floors()
    if "2" in parts:
        detection()
        part2()
