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

Part 2: two TinyLlama-shaped blocks (14 LoRA layers) compiled in default mode, the base model
and a copy of it with lorahot and a rank-64 adapter, host time per decode call in five
interleaved rounds, and launches: lorahot with its fused operator (direct launches), with the
wide GEMMs default mode takes, and with the lean operator of part 4; before it, what
:func:`lorahot.kernels.compile_mode.launched_per_call` answers per mode. (Until 2026-12-02 the
"base" measured last was the injected model itself, so it read as the wide one:
``runs/20261202T034419-launch-host-probe.log``.)

Part 4 (:func:`lean`): a lean operator, ``lorahot::probe_lean``, the floor of the fused kernel as
one opaque call: K never split (one launch, no workspace), the compiled binary's runner and its
integer arguments kept per layer and row count (keyed by the weight's address, the row count,
the input's row stride and the 16-byte alignment of input and output), its body an output
allocation, a key and the runner. Per shape: ``F.linear``, the lean operator, its body without
the dispatcher, and ``lorahot::lora_linear`` as it is. In part 2 the same operator then runs in
every LoRA layer of the two compiled blocks (``lean``): if it costs the host about what the
base layer's GEMM does, a default-mode layer would add no launch and little host time. Part 2
also runs ``visible``: the same kernel as a ``torch.library.triton_op``
(``lorahot::probe_visible``), launched by the compiled wrapper itself. Measured on an H200
(``runs/20261202T034419-``, ``034804-`` and ``035134-launch-host-probe.log``): the lean
operator 24-36 us per call against ``F.linear``'s 15-26; in the two blocks, us per LoRA layer
over the base model, wide GEMMs +10.1 and +26.1 (two runs), lean +21.2 and +40.2, visible
+20.3 (compiling 8.7 s against the wide form's 4.7): neither beats the wide GEMMs
(``benchmarks/README.md``, "Twenty-first session").

Part 3 (:func:`floors`): the least an opaque operator can cost the host (an empty body; the
kernel's binary launched directly, split and unsplit). ``PROBE_PART`` picks the parts
(default ``1234``).

    PYTHONPATH=. python3 -m benchmarks.experiments.launch_host_probe
"""

from __future__ import annotations

import copy
import cProfile
import functools
import io
import os
import pstats
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
            "H32": K.keeps_float32(bt),
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
                False, 64, split, bm, bn, bk, False, early, K.keeps_float32(bt),
            )  # fmt: skip
            names = ("HAS_BIAS", "R_PAD", "SPLIT", "BLOCK_M", "BLOCK_N", "BLOCK_K", "ROUTED", "PDL", "H32")
            compiled = K._lora_linear_kernel[grid](
                *args[:-9], **dict(zip(names, args[-9:])), num_warps=warps, num_stages=stages, launch_pdl=early
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
    from lorahot.kernels import lora_linear as fused_kernel

    fused_op = fused_kernel.lora_linear
    register_lean()
    lmodel = copy.deepcopy(base)
    runtime = lorahot.inject(lmodel, TARGETS, max_rank=64)
    runtime.load(str(tmp / "a"))

    def never() -> bool:
        return False

    # per configuration: the model, what the layers are told about the graph ("fused" and
    # "lean": replayed, so they take the fused path) and the fused path's operator. Both are
    # module globals the compiler guards on, so each configuration's graph is its own cache
    # entry, selected by setting them before each call (checked by the launch counts).
    configs = {
        "base": (base, per_call, fused_op),
        "wide": (lmodel, per_call, fused_op),
        "lean": (lmodel, never, lean_op),
        "visible": (lmodel, never, visible_op),
    }
    if os.environ.get("PROBE_FUSED"):
        configs["fused"] = (lmodel, never, fused_op)
    torch._dynamo.reset()
    calls: dict[str, Callable[[], torch.Tensor]] = {}
    for name, (model, told, op) in configs.items():
        compiled = torch.compile(model)
        start = time.perf_counter()

        def call(compiled: Callable[..., Any] = compiled, told: Any = told, op: Any = op) -> torch.Tensor:
            compile_mode.launched_per_call = told  # type: ignore[assignment]
            fused_kernel.lora_linear = op  # type: ignore[assignment]
            with torch.inference_mode():
                out: torch.Tensor = compiled(input_ids=ids).logits
                return out

        try:
            call()
        except Exception as e:  # a configuration that does not compile: reported, the others run
            print(f"{name}: failed: {type(e).__name__}: {str(e)[:400]}", flush=True)
            continue
        print(f"{name}: compiled (first call) in {time.perf_counter() - start:.1f} s", flush=True)
        for _ in range(2):
            call()
        calls[name] = call
    outs = {name: call().float() for name, call in calls.items()}
    for name in [n for n in ("fused", "lean", "visible") if n in outs]:
        err = ((outs[name] - outs["wide"]).norm() / outs["wide"].norm()).item()
        print(f"{name} against wide: relative difference of the logits {err:.3g}", flush=True)
    host: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(5):  # interleaved rounds: the host drifts
        for name, call in calls.items():
            times = []
            for _ in range(40):
                torch.cuda.synchronize()
                t = time.perf_counter()
                call()
                times.append((time.perf_counter() - t) * 1e3)
            torch.cuda.synchronize()
            host[name].append(statistics.median(times))
    base_ms = statistics.median(host["base"])
    for name, call in calls.items():
        ms = statistics.median(host[name])
        print(
            f"2 blocks, default mode, {name}: host {ms:.3f} ms per decode call (rounds "
            f"{' '.join(f'{v:.3f}' for v in host[name])}), {(ms - base_ms) * 1e3 / 14:.1f} us per LoRA layer over "
            f"the base; launches {launches(call)}",
            flush=True,
        )
    compile_mode.launched_per_call = per_call  # type: ignore[assignment]
    fused_kernel.lora_linear = fused_op  # type: ignore[assignment]


#: per (weight address, rows, input row stride, input and output alignment): the binary's
#: runner, its arguments after the tensors, and the device index
_LEAN: dict[tuple[int, ...], tuple[Callable[..., object], tuple[object, ...], int]] = {}


def _lean_fake(x: torch.Tensor, weight: torch.Tensor, *_: object) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


def _lean_body(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    bt: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """The fused kernel, K unsplit, in one launch of its kept runner (see part 4)."""
    k, n = x.shape[-1], weight.shape[0]
    out = torch.empty((*x.shape[:-1], n), device=x.device, dtype=x.dtype)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    key = (weight.data_ptr(), m, x2.stride(0), x2.data_ptr() & 15, out.data_ptr() & 15)
    b = weight if bias is None else bias
    plan = _LEAN.get(key)
    if plan is None:
        from lorahot.kernels.triton_routed_lora import rank_pad

        bm, bn, _, warps, stages, _ = K.config_for(m, n, k)
        bk = 128 if m <= 16 else 64
        r = a.shape[-2]
        grid = (triton_cdiv(m, bm), triton_cdiv(n, bn), 1)
        rest = (
            m, n, k, r, triton_cdiv(k, bk) * bk, 0, 1,
            x2.stride(0), weight.stride(0), a.stride(-2), bt.stride(-2), n, bt.stride(0), x2.stride(0),
            bias is not None, rank_pad(r), 1, bm, bn, bk, False, False, K.keeps_float32(bt),
        )  # fmt: skip
        compiled = K._lora_linear_kernel[grid](
            x2, weight, a, bt, b, scale, out, out, x2, x2, *rest, num_warps=warps, num_stages=stages
        )
        _LEAN[key] = (compiled[grid], rest, x.device.index or 0)
        return out
    runner, rest, device = plan
    runner(x2, weight, a, bt, b, scale, out, out, x2, x2, *rest, stream=torch._C._cuda_getCurrentRawStream(device))
    return out


def lean_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    bt: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """``lorahot::probe_lean`` (:func:`register_lean` first), as ``lora_linear``'s signature."""
    out: torch.Tensor = torch.ops.lorahot.probe_lean(x, weight, bias, a, bt, scale)
    return out


def visible_op(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    bt: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    """``lorahot::probe_visible``: the fused kernel, K unsplit, as a ``triton_op`` the compiler
    sees into and launches from its own wrapper (:func:`register_lean` first)."""
    out: torch.Tensor = torch.ops.lorahot.probe_visible(x, weight, bias, a, bt, scale)
    return out


def _visible(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    a: torch.Tensor,
    bt: torch.Tensor,
    scale: torch.Tensor,
) -> torch.Tensor:
    from torch.library import wrap_triton

    from lorahot.kernels.triton_routed_lora import rank_pad

    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty((m, n), device=x.device, dtype=x.dtype)
    bm, bn, _, warps, stages, _ = K.config_for(m, n, k)
    bk = 128 if m <= 16 else 64
    r = a.shape[-2]
    grid = (triton_cdiv(m, bm), triton_cdiv(n, bn), 1)
    b = weight if bias is None else bias
    wrap_triton(K._lora_linear_kernel)[grid](
        x2, weight, a, bt, b, scale, out, out, x2, x2,
        m, n, k, r, triton_cdiv(k, bk) * bk, 0, 1,
        x2.stride(0), weight.stride(0), a.stride(-2), bt.stride(-2), n, bt.stride(0), x2.stride(0),
        HAS_BIAS=bias is not None, R_PAD=rank_pad(r), SPLIT=1, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
        ROUTED=False, PDL=False, num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out.view(*x.shape[:-1], n)


@functools.cache
def register_lean() -> None:
    """Registers ``lorahot::probe_lean`` (outside any trace)."""
    from lorahot.kernels.op_registry import define

    schema = "probe_lean(Tensor x, Tensor weight, Tensor? bias, Tensor a, Tensor bt, Tensor scale) -> Tensor"
    define(schema, _lean_fake)(_lean_body)
    torch.library.triton_op("lorahot::probe_visible", _visible, mutates_args=())


def lean() -> None:
    """Part 4: the lean operator's host cost per call against ``F.linear`` and the operator."""
    register_lean()
    print("host us per call, 1 row: the lean operator (one launch, K unsplit)")
    head = ["linear", "lean op", "lean body", "op"]
    print(f"{'shape':8s} " + " ".join(f"{h:>9s}" for h in head), flush=True)
    for name, (k, n) in SHAPES.items():
        x, w, a, bt, s = decode_layer(k, n)
        want = torch.ops.lorahot.lora_linear(x, w, None, a, bt, s)
        got = lean_op(x, w, None, a, bt, s)  # records the plan
        got = lean_op(x, w, None, a, bt, s)  # through the runner
        torch.cuda.synchronize()
        err = (got.float() - want.float()).abs().max().item()
        row = [
            per_call_us(lambda: torch.nn.functional.linear(x, w)),
            per_call_us(lambda: torch.ops.lorahot.probe_lean.default(x, w, None, a, bt, s)),
            per_call_us(lambda: _lean_body(x, w, None, a, bt, s)),
            per_call_us(lambda: torch.ops.lorahot.lora_linear.default(x, w, None, a, bt, s)),
        ]
        print(f"{name:8s} " + " ".join(f"{v:9.1f}" for v in row) + f"   lean-op {err:.3g}", flush=True)


def launches(call: Callable[[], object]) -> dict[str, int]:
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
    parts = os.environ.get("PROBE_PART", "1234")
    if "1" in parts:
        part1()
    if "4" in parts:
        lean()
    if "3" in parts:
        floors()
    if "2" in parts:
        detection()
        part2()
