"""Probe: what a float16 LoRA layer costs, widened with shifted rank rows and in the forms before it.

From 4859508 a float16 layer was not widened and, above the fused kernel's rows, computed the
library formula with float32 copies of A and B and ``x`` cast to float32 for the shrink
(``library_operands``), so that ``s * (x @ A.T)`` past float16's 65504 stays finite as PEFT's
float32 adapter weights keep it: on an H200 that cost 2.6-4x the base GEMMs' time on these
shapes against 1.4-1.6x for bfloat16 (``runs/20261205T140424-float16-probe.json``), and a
float16 SDXL-shaped UNet's lorahot compile did not finish in 351 s (bfloat16's takes about 160
s). Now a float16 layer is widened, each rank row of its wide copy shifted by a power of two
(``lorahot.kernels.row_scale.row_shifts``: A's row divided, B's column multiplied) so that the
shrink the wide GEMM writes in float16 stays in range for every input.

The model: SDXL UNet transformer blocks' linears side by side (one block at 640 wide, two at
1280; per block ``to_q``/``to_k``/``to_v`` on one input, ``to_out.0``, ``ff`` in ``d -> 8d`` and
out ``4d -> d``, each on an input of its own, named as diffusers names them so that lorahot
groups q/k/v as it does in the UNet): 18 ``nn.Linear`` layers, rank 64, with an adapter loaded.
Forms, each timed eagerly and under ``torch.compile`` (default mode, rows symbolic: one compile
per configuration times every row count), per layer over the base model of its dtype:

- ``a bf16 lorahot``: bfloat16 as lorahot runs it (widened);
- ``b fp16 lorahot``: float16 as lorahot runs it now (widened, rank rows shifted);
- ``b fp16 unwidened``: float16 unwidened (``wide.UNWIDENED_DTYPES``), the float32 library formula
  it took before;
- ``b fp16 unwidened tf32``: the same with ``torch.backends.cuda.matmul.allow_tf32`` on (eager only);
- ``e fp16 lorahot f32 buffers``: lorahot with ``inject(..., dtype=torch.float32)`` (float32
  LoRA buffers, as PEFT keeps a float16 model's adapter weights): no per-call copies of A and B;
- ``c fp16 bmm32``: the shrink ``torch.bmm(x[None], A.T[None], out_dtype=float32)`` (float16
  tensor cores, float32 out), scaled and expanded in float32 as lorahot's formula does;
- ``c fp16 mm32 addmm``: the shrink ``torch.mm(x, A.T, out_dtype=float32)`` and the expand
  accumulated in float32 onto the base output, ``addmm(y.float(), s * h, B.float().T)``;
- ``c fp16 rowscale``: the ``bmm32`` shrink, each row divided by its largest ``|h|`` and rounded
  to float16, the expand ``bmm(h16, B.T, out_dtype=float32)`` (tensor cores throughout), times
  the row's largest ``|h|`` and ``s``;
- ``d fp16 widened unshifted``: the wide path without the shift (``wide.SHIFTED_DTYPES`` empty
  at inject): the cost reference; it writes ``x @ A.T`` in float16 as it is, so its range check
  is expected to fail.

Every form is checked first (eager, and compiled at its first call): the output against a
float64 reference within 4 eps of its dtype (relative to the largest output) for a normal
adapter, and finite and within the same bound where ``|x @ A.T|`` reaches about 1e5 with a small
B (``alpha / r = 1/8``). Timing: each call captured in a CUDA graph, the median of its replays
(CUDA events; back-to-back calls where capture fails, marked ``events``); compiled, also the
kernels inductor generated (the float16 library formula converts ``x``, A and B per layer).
Compile caches are fresh (a temporary directory) unless ``TORCHINDUCTOR_CACHE_DIR`` is set.
Compiled configurations are skipped once ``--deadline-s`` (default 225 s from start) would be
passed. With rows symbolic a bfloat16 wide layer takes lorahot's per-call op
(``dynamic_forward``), where the UNet's static shapes trace the wide formula: ``--static``
compiles each row count on its own instead (a compile per row count, each one's seconds kept).

    PYTHONPATH=. python3 -m benchmarks.experiments.float16_probe [--static] [--eager-only]
    PYTHONPATH=. python3 -m benchmarks.experiments.float16_probe --cpu --small [--compile]

``--cpu --small``: tiny shapes on the CPU, wall clock, no compiled forms unless ``--compile``;
lorahot's wide path is allowed on the CPU there (as the tests do), and the ``out_dtype`` GEMMs,
which have no CPU kernel, are emulated with float32 GEMMs (marked in the output).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-"))
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton-"))

import torch
from torch import nn
from torch._inductor import metrics

import lorahot
from lorahot.runtime import wide

START = time.perf_counter()
R = 64
F32 = torch.float32
#: the out_dtype GEMMs run as float32 GEMMs (the CPU has no kernel for them); set by --cpu
EMULATE = False
Tensors = dict[str, torch.Tensor]


class Block(nn.Module):
    """The linears of one SDXL transformer block at width ``d``, diffusers' names."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.attn = nn.Module()
        self.attn.to_q, self.attn.to_k, self.attn.to_v = (nn.Linear(d, d) for _ in range(3))
        self.attn.to_out = nn.Sequential(nn.Linear(d, d))
        self.ff_in = nn.Sequential(nn.Linear(d, 8 * d))  # GEGLU's projection
        self.ff_out = nn.Sequential(nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, o: torch.Tensor, f: torch.Tensor, g: torch.Tensor) -> list[torch.Tensor]:
        a = self.attn
        return [a.to_q(x), a.to_k(x), a.to_v(x), a.to_out[0](o), self.ff_in[0](f), self.ff_out[0](g)]


class Blocks(nn.Module):
    """Blocks side by side, four inputs each (``[rows, d]`` three times, ``[rows, 4d]``)."""

    def __init__(self, widths: tuple[int, ...]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for d in widths)

    def forward(self, *xs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outs: list[torch.Tensor] = []
        for i, block in enumerate(self.blocks):
            outs += block(*xs[4 * i : 4 * i + 4])
        return tuple(outs)


def _out32(op: str, p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``p @ q`` of float16 operands into float32 (``torch.mm``/``torch.bmm``'s ``out_dtype``)."""
    if EMULATE:
        return p.float() @ q.float()
    if op == "bmm":
        return torch.bmm(p[None], q[None], out_dtype=F32)[0]
    return torch.mm(p, q, out_dtype=F32)


class Candidate(nn.Module):
    """A float16 ``nn.Linear`` plus a LoRA computed by one of the candidate forms (``kind``)."""

    def __init__(self, base: nn.Linear, kind: str) -> None:
        super().__init__()
        self.base, self.kind = base, kind
        w = base.weight
        self.register_buffer("a", torch.zeros(R, w.shape[1], device=w.device, dtype=w.dtype))
        self.register_buffer("b", torch.zeros(w.shape[0], R, device=w.device, dtype=w.dtype))
        self.register_buffer("s", torch.ones(1, device=w.device, dtype=F32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.kind == "mm32 addmm":
            h = _out32("mm", x, self.a.t())  # [rows, R] float32
            return torch.addmm(y.float(), h * self.s, self.b.float().t()).to(y.dtype)
        h = _out32("bmm", x, self.a.t())
        if self.kind == "bmm32":
            return y + ((h * self.s) @ self.b.float().t()).to(y.dtype)
        top = h.abs().amax(-1, keepdim=True).clamp_min(1e-30)  # [rows, 1]: each row's largest |h|
        d = _out32("bmm", (h / top).to(x.dtype), self.b.t())  # [rows, out] float32
        return y + (d * (top * self.s)).to(y.dtype)


@dataclass
class Form:
    name: str
    dtype: torch.dtype
    kind: str  # "base", "lorahot", "lorahot f32" (inject(dtype=torch.float32)), "widened" or a Candidate kind
    eager_only: bool = False
    range_fails: bool = False  # the range check is expected to fail
    tf32: bool = False


FORMS = [
    Form("base bf16", torch.bfloat16, "base"),
    Form("base fp16", torch.float16, "base"),
    Form("a bf16 lorahot", torch.bfloat16, "lorahot"),
    Form("b fp16 lorahot", torch.float16, "lorahot"),
    Form("b fp16 unwidened", torch.float16, "unwidened"),
    Form("b fp16 unwidened tf32", torch.float16, "unwidened", eager_only=True, tf32=True),
    Form("e fp16 lorahot f32 buffers", torch.float16, "lorahot f32"),
    Form("c fp16 bmm32", torch.float16, "bmm32"),
    Form("c fp16 mm32 addmm", torch.float16, "mm32 addmm"),
    Form("c fp16 rowscale", torch.float16, "rowscale"),
    Form("d fp16 widened unshifted", torch.float16, "unshifted", range_fails=True),
]
#: compiled configurations in this order, so that a deadline cuts the least needed
COMPILE_ORDER = ["base fp16", "b fp16 lorahot", "base bf16", "a bf16 lorahot", "b fp16 unwidened"]
COMPILE_ORDER += ["d fp16 widened unshifted", "e fp16 lorahot f32 buffers", "c fp16 bmm32", "c fp16 rowscale"]
COMPILE_ORDER += ["c fp16 mm32 addmm"]


def _linears(model: nn.Module) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if type(m) is nn.Linear}


def _adapter(model: nn.Module, gen: torch.Generator, big: bool, dtype: torch.dtype) -> Tensors:
    """PEFT-named A and B (values of ``dtype``, on the CPU) for every linear. ``big``: ``|x @ A.T|``
    of about 1e5 on inputs of standard deviation 8, B of 1.6e-4 (with ``alpha / r = 1/8``)."""
    out: Tensors = {}
    for name, m in _linears(model).items():
        sa = 2.5e4 / (8 * m.in_features**0.5) if big else m.in_features**-0.5
        out[f"base_model.model.{name}.lora_A.weight"] = (torch.randn(R, m.in_features, generator=gen) * sa).to(dtype)
        sb = 1.6e-4 if big else 0.5 * R**-0.5
        out[f"base_model.model.{name}.lora_B.weight"] = (torch.randn(m.out_features, R, generator=gen) * sb).to(dtype)
    return out


def _build(form: Form, proto: nn.Module) -> tuple[nn.Module, Callable[[Tensors, float], None]]:
    """A copy of ``proto`` in ``form``'s shape, and how to load an adapter (tensors, ``alpha / r``) into it."""
    model = copy.deepcopy(proto)
    if form.kind == "base":
        return model, lambda tensors, s: None
    if form.kind in ("lorahot", "lorahot f32", "unwidened", "unshifted"):
        saved = wide.UNWIDENED_DTYPES, wide.SHIFTED_DTYPES
        if form.kind == "unwidened":
            wide.UNWIDENED_DTYPES = frozenset({torch.float16})
        if form.kind == "unshifted":  # read at inject; the traced shrink reads the wide copy's A either way
            wide.SHIFTED_DTYPES = frozenset()
        try:
            buffers = torch.float32 if form.kind == "lorahot f32" else None  # PEFT's float32 adapter weights
            runtime = lorahot.inject(model, lambda name, m: isinstance(m, nn.Linear), max_rank=R, dtype=buffers)
        finally:
            wide.UNWIDENED_DTYPES, wide.SHIFTED_DTYPES = saved
        wants_wide = form.kind in ("lorahot", "unshifted")
        widened = sum(layer.wide for layer in runtime.layers.values())
        if widened != (len(runtime.layers) if wants_wide else 0):
            print(f"  note: {form.name}: {widened} of {len(runtime.layers)} layers widened", flush=True)

        def load(tensors: Tensors, s: float) -> None:
            runtime.load(tensors, config={"r": R, "lora_alpha": R}, scale=s)

        model._runtime = runtime  # type: ignore[assignment]  # kept alive with the model
        return model, load
    layers: dict[str, Candidate] = {}
    for name, lin in _linears(model).items():
        parent, _, leaf = name.rpartition(".")
        layers[name] = Candidate(lin, form.kind)
        setattr(model.get_submodule(parent), leaf, layers[name])

    def load_candidates(tensors: Tensors, s: float) -> None:
        for name, layer in layers.items():
            layer.a.copy_(tensors[f"base_model.model.{name}.lora_A.weight"])
            layer.b.copy_(tensors[f"base_model.model.{name}.lora_B.weight"])
            layer.s.fill_(s)

    return model, load_candidates


def _inputs(widths: tuple[int, ...], rows: int, dev: torch.device, dtype: torch.dtype, std: float) -> list:
    g = torch.Generator(device=dev).manual_seed(rows)
    return [
        torch.randn(rows, w * (4 if i == 3 else 1), device=dev, dtype=dtype, generator=g) * std
        for w in widths
        for i in range(4)
    ]


def _check(
    outs: tuple[torch.Tensor, ...], proto: nn.Module, xs: list, tensors: Tensors, s: float, big: bool
) -> tuple[bool, str]:
    """Every output against its float64 reference (the base weights and the adapter's values as
    stored): finite and within 4 eps of the dtype times the largest output."""
    worst, bad, top_h = 0.0, 0, 0.0
    names = list(_linears(proto))
    inputs = [xs[4 * b + i] for b in range(len(names) // 6) for i in (0, 0, 0, 1, 2, 3)]
    for name, got, x in zip(names, outs, inputs):
        lin = proto.get_submodule(name)
        dev = x.device
        a = tensors[f"base_model.model.{name}.lora_A.weight"].to(dev).double()
        b = tensors[f"base_model.model.{name}.lora_B.weight"].to(dev).double()
        x64 = x.double()
        h = x64 @ a.T
        top_h = max(top_h, h.abs().max().item())
        want = x64 @ lin.weight.double().T + lin.bias.double() + s * h @ b.T
        finite = torch.isfinite(got)
        bad += int((~finite).sum().item())
        err = torch.where(finite, got.double() - want, 0.0).abs().max() / want.abs().max()
        worst = max(worst, err.item())
    eps = torch.finfo(outs[0].dtype).eps
    ok = bad == 0 and worst <= 4 * eps
    note = f"{bad} non-finite, " if bad else ""
    note += (
        f"max err {worst / eps:.2f} eps of max |out|"
        + (" (finite outputs)" if bad else "")
        + (f", max |x A^T| {top_h:.3g}" if big else "")
    )
    return ok, note


def _time_us(call: Callable[[], object], cuda: bool) -> tuple[float, str]:
    """The median time of one ``call`` in microseconds, and how it was timed."""
    if not cuda:
        call()
        ts = []
        for _ in range(5):  # the least of five: a shared CPU box's other work only adds
            t = time.perf_counter()
            call()
            ts.append(time.perf_counter() - t)
        return min(ts) * 1e6, "wall"
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            call()
        run, how, per = graph.replay, "graph", 1
    except Exception as exc:  # a host sync or an uncapturable op: back-to-back calls instead
        torch.cuda.synchronize()
        print(f"  capture failed ({type(exc).__name__}: {str(exc)[:100]}): timing back-to-back calls", flush=True)
        graph, how, per = None, "events", 10

        def run() -> None:
            for _ in range(per):
                call()

    for _ in range(3):
        run()
    ts = []
    for _ in range(20):
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record(); run(); e1.record(); torch.cuda.synchronize()  # fmt: skip
        ts.append(e0.elapsed_time(e1) * 1e3 / per)
    del graph
    return statistics.median(ts), how


def _supported(dev: torch.device) -> str | None:
    """Why the ``out_dtype`` GEMMs cannot run here, or None."""
    p = torch.randn(8, 16, device=dev, dtype=torch.float16)
    try:
        for op in ("mm", "bmm"):
            _out32(op, p, p.t())
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    return None


def main() -> None:
    global EMULATE
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU (wall clock)")
    parser.add_argument("--small", action="store_true", help="tiny shapes")
    parser.add_argument("--compile", action="store_true", help="on the CPU: compile too (on CUDA always)")
    parser.add_argument("--eager-only", action="store_true", help="no compiled configurations")
    parser.add_argument("--static", action="store_true", help="compile each row count on its own")
    parser.add_argument("--deadline-s", type=float, default=225.0, help="skip compiles that would pass this")
    args = parser.parse_args()
    cuda = not args.cpu
    dev = torch.device("cuda" if cuda else "cpu")
    widths, rows_list = ((16, 32), (64, 256)) if args.small else ((640, 1280, 1280), (1024, 4096, 8192))
    compiling = not args.eager_only and (cuda or args.compile)
    if not cuda:
        wide.DEVICE_TYPES = {"cpu", "cuda"}  # the wide path on the CPU too, as the tests widen it
    unsupported = _supported(dev)
    if unsupported and not cuda:
        EMULATE, unsupported = True, None
    torch._dynamo.config.recompile_limit = 64  # every configuration compiles the same forward
    print(
        "torch", torch.__version__, torch.cuda.get_device_name() if cuda else "cpu",
        "| float32 matmul precision", torch.get_float32_matmul_precision(),
        "| fp16 reduced-precision reduction", torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction,
        "| out_dtype GEMMs", "emulated (CPU)" if EMULATE else unsupported or "supported", flush=True,
    )  # fmt: skip
    protos, adapters = {}, {}
    for dtype in (torch.bfloat16, torch.float16):
        torch.manual_seed(0)
        with torch.device(dev):
            protos[dtype] = Blocks(widths).to(dtype).eval().requires_grad_(False)
        gen = torch.Generator().manual_seed(1)
        adapters[dtype] = (_adapter(protos[dtype], gen, False, dtype), _adapter(protos[dtype], gen, True, dtype))
    n_layers = len(_linears(protos[torch.float16]))
    print(f"{n_layers} linear layers, rank {R}, widths {widths}, rows {rows_list}", flush=True)
    results: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}
    results |= {"layers": n_layers, "rank": R, "widths": widths, "rows": rows_list, "forms": {}}
    stamp = time.strftime("%Y%m%dT%H%M%S")

    def save() -> None:
        if os.environ.get("OUT"):
            with open(os.path.join(os.environ["OUT"], f"{stamp}-float16-probe.json"), "w") as f:
                json.dump(results, f, indent=1)

    def run_form(form: Form, compiled: bool) -> None:
        mode = "compiled" if compiled else "eager"
        entry: dict = {"checks": {}, "us": {}, "how": {}}
        results["forms"].setdefault(form.name, {})[mode] = entry
        if form.kind in ("bmm32", "mm32 addmm", "rowscale") and unsupported:
            entry["skipped"] = f"unsupported: {unsupported}"
            print(f"{form.name} [{mode}]: unsupported ({unsupported})", flush=True)
            return
        proto, (normal, big) = protos[form.dtype], adapters[form.dtype]
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = form.tf32 or tf32
        try:
            model, load = _build(form, proto)
            load(normal, 1.0)
            call = model
            if compiled:
                torch._dynamo.reset()
                metrics.reset()
                call = torch.compile(model, dynamic=False if args.static else None)
            t0 = time.perf_counter()
            checks = [("normal", normal, 1.0, 1.0)] + ([] if form.kind == "base" else [("range", big, 0.125, 8.0)])
            for what, tensors, s, std in checks:
                load(tensors, s)
                xs = _inputs(widths, rows_list[0], dev, form.dtype, std)
                if compiled and not args.static:
                    for x in xs:
                        torch._dynamo.maybe_mark_dynamic(x, 0)
                outs = call(*xs)
                if what == "normal" and compiled:
                    if cuda:
                        torch.cuda.synchronize()
                    entry["compile_s"] = time.perf_counter() - t0
                    entry["kernels"] = metrics.generated_kernel_count  # inductor's, this compile
                ok, note = _check(outs, proto, xs, tensors, s if form.kind != "base" else 0.0, what == "range")
                expected = what == "range" and form.range_fails
                verdict = "PASS" if ok else "FAIL (expected)" if expected else "FAIL"
                entry["checks"][what] = {"pass": ok, "note": note}
                print(f"check {form.name} [{mode}] {what}: {verdict} ({note})", flush=True)
                del outs
            load(normal, 1.0)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            for rows in rows_list:
                xs = _inputs(widths, rows, dev, form.dtype, 1.0)
                if compiled and args.static and rows != rows_list[0]:  # its own compile, timed apart
                    t0 = time.perf_counter()
                    call(*xs)
                    if cuda:
                        torch.cuda.synchronize()
                    entry.setdefault("compile_s_rows", {})[rows] = time.perf_counter() - t0
                us, how = _time_us(lambda: call(*xs), cuda)
                entry["us"][rows], entry["how"][rows] = us, how
                del xs
            if compiled and not args.static and torch._dynamo.utils.counters["stats"]["unique_graphs"] != graphs:
                entry["recompiled"] = True
                print(f"  note: {form.name} recompiled for another row count", flush=True)
        except Exception as exc:  # a form that does not build, compile or capture: say so, go on
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            print(f"{form.name} [{mode}]: {entry['error']}", flush=True)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
        timed = ", ".join(f"{r}: {u:.0f} us" for r, u in entry["us"].items())
        extra = f", compile {entry['compile_s']:.1f} s, {entry['kernels']} kernels" if "compile_s" in entry else ""
        print(f"{form.name} [{mode}]: {timed}{extra}", flush=True)
        save()

    with torch.inference_mode():
        for form in FORMS:
            run_form(form, False)
        if compiling:
            longest = 20.0
            for name in COMPILE_ORDER:
                form = next(f for f in FORMS if f.name == name)
                left = args.deadline_s - (time.perf_counter() - START)
                if left < 1.3 * longest:
                    results["forms"][name]["compiled"] = {"skipped": f"deadline ({left:.0f} s left)"}
                    print(f"{name} [compiled]: skipped, {left:.0f} s left before the deadline", flush=True)
                    continue
                run_form(form, True)
                longest = max(longest, results["forms"][name]["compiled"].get("compile_s", 0.0))
    _table(results, rows_list, n_layers)
    save()
    print(f"total {time.perf_counter() - START:.0f} s", flush=True)


def _table(results: dict, rows_list: tuple[int, ...], n_layers: int) -> None:
    """One line per form and mode: us per layer over its dtype's base, ratio to the base, compile s, checks."""
    print(f"\n{'form':22s} {'mode':8s} " + " ".join(f"{r:>15d}" for r in rows_list) + "  compile s  checks")
    print(f"{'':31s}" + " ".join(f"{'us/layer ratio':>15s}" for _ in rows_list))
    for name, modes in results["forms"].items():
        base = "base bf16" if "bf16" in name else "base fp16"
        for mode, entry in modes.items():
            cells = []
            for rows in rows_list:
                us = entry.get("us", {}).get(rows)
                ref = results["forms"][base].get(mode, {}).get("us", {}).get(rows)
                if us is None or ref is None:
                    cells.append(f"{'-':>15s}")
                elif name == base:
                    cells.append(f"{us / n_layers:8.1f} base ")
                else:
                    cells.append(f"{(us - ref) / n_layers:8.1f} {us / ref:5.2f}x")
            compile_s = f"{entry['compile_s']:9.1f}" if "compile_s" in entry else f"{'-':>9s}"
            checks = " ".join(f"{k}:{'PASS' if v['pass'] else 'FAIL'}" for k, v in entry.get("checks", {}).items())
            why = entry.get("skipped") or entry.get("error") or ""
            print(f"{name:22s} {mode:8s} " + " ".join(cells) + f"  {compile_s}  {checks} {why[:60]}")


if __name__ == "__main__":
    main()
