"""Probe: what a compiled LoRA layer costs in default mode, host and GPU, per formulation.

The SDXL-shaped UNet's default-mode step measured 2.95x the base's (diffusers' hotswap 2.46x):
on that host every extra call in the compiled wrapper costs tens of microseconds, and the UNet
has 700 LoRA layers. This probe compiles ``SETS`` layers of one shape into one function
(inductor, default mode, static shapes), each followed by a GELU (the elementwise consumer most
LoRA outputs meet: an activation, a residual add; ``PROBE_CONSUMER=rope`` puts a rotary-style
``cat`` there instead, as attention's q and k meet; ``sdpa`` attention itself, as the UNet's
q, k and v meet), and measures per layer:

- ``wall``: calls issued back to back, synced at the end: what a default-mode step pays, the
  larger of host and GPU time;
- ``host``: one call issued while the GPU is busy with a sleep kernel, so nothing waits for it;
- ``gpu``: one replay of the compiled function captured in a CUDA graph (no host cost).

Formulations (``s`` folded into A, as the runtime keeps it):

- ``base``: ``gelu(x @ W.T)``;
- ``op``: ``gelu(wide_linear(x, [W; s*A], Bt))`` behind an opaque operator (one GEMM for base
  and shrink, the expand accumulated in place), as lorahot ran it until commit d41e5ae;
- ``traced``: the same formula as library calls: ``yh = x @ [W; s*A].T``, then
  ``gelu(yh[:, :n] + yh[:, n:] @ Bt)``: the add fuses into the consumer;
- ``traced_c``: ``traced`` with the rank-wide ``h`` made contiguous before the expand;
- ``expand_op``: the GEMM traced, the in-place expand alone behind an opaque mutating operator
  (one kernel, no copy, one Python call per layer);
- ``lib``: ``gelu(x @ W.T + (x @ (s*A).T) @ Bt)``, three GEMMs (what PEFT's layers compile to);
- ``kcat``: ``h = x @ (s*A).T``, then one GEMM over K + R: ``[x | h] @ [W | B].T``: the
  expand summed in the base GEMM's own accumulator (no output pass of its own), at the cost of
  the shrink, the concatenation and R / K more arithmetic;
- ``kcat_shared`` and ``kcat3`` (see :data:`GROUPED`): layers in groups of three sharing one
  input, each with its own shrink or with one shrink over the three A stacked.

Every formulation is checked against float64 first.

    PYTHONPATH=. python3 -m benchmarks.experiments.compiled_layer_probe
"""

from __future__ import annotations

import json
import os
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from benchmarks.experiments.forward_probe import graph_us, log

dev, dt, R = torch.device("cuda"), torch.bfloat16, 64
OUT = os.environ.get("OUT", "/tmp")
SETS = int(os.environ.get("PROBE_SETS", "12"))
#: name -> (rows, in, out)
SHAPES = {
    "unet 640 attn": (8192, 640, 640),
    "unet 640 ff in": (8192, 640, 5120),
    "unet 1280 attn": (2048, 1280, 1280),
    "unet 1280 ff in": (2048, 1280, 10240),
    "unet 1280 xattn kv": (154, 2048, 1280),
    "llm qo 256": (256, 2048, 2048),
    "llm qo 1024": (1024, 2048, 2048),
    "llm gate/up 1024": (1024, 2048, 5632),
    "llm down 1024": (1024, 5632, 2048),
}
FORMULAS = os.environ.get("PROBE_FORMULAS", "base,op,traced,traced_c,expand_op,lib").split(",")
#: what consumes each layer's output: ``gelu`` (elementwise: the traced add folds into it) or
#: ``rope`` (a rotary-style ``cat``, not elementwise: the compiler rewrites the traced
#: ``y + h @ Bt`` into an ``addmm``, which copies ``y`` first), or ``sdpa`` (attention over
#: 64-row sequences, q = k = v = the output: the UNet's q, k and v)
CONSUMER = os.environ.get("PROBE_CONSUMER", "gelu")
#: what produces each layer's input: ``none`` (the graph's input) or ``silu`` (see ``_produce``)
PRODUCER = os.environ.get("PROBE_PRODUCER", "none")
if os.environ.get("PROBE_SHAPES"):  # a comma-separated subset of SHAPES' names
    SHAPES = {k: SHAPES[k] for k in os.environ["PROBE_SHAPES"].split(",")}


_LIB = torch.library.Library("lorahot_probe", "FRAGMENT")
_LIB.define("wide_linear(Tensor x, Tensor wide, Tensor bt) -> Tensor")


def _opaque_wide(x: torch.Tensor, wide: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """The wide layer as lorahot ran it until commit d41e5ae: an opaque operator whose body is
    the GEMM over ``[W; s*A]`` and the in-place accumulate of the expand."""
    n, r = bt.shape[1], bt.shape[0]
    yh = F.linear(x, wide)
    return yh.narrow(1, 0, n).addmm_(yh.narrow(1, n, r), bt)


def _opaque_wide_fake(x: torch.Tensor, wide: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], wide.shape[0]))[:, : bt.shape[1]]


_LIB.define("expand_(Tensor(a!) yh, Tensor bt) -> ()")


def _expand_in_place(yh: torch.Tensor, bt: torch.Tensor) -> None:
    """``yh[:, :n] += yh[:, n:] @ bt`` in place: the expand alone behind an opaque operator."""
    n, r = bt.shape[1], bt.shape[0]
    yh.narrow(1, 0, n).addmm_(yh.narrow(1, n, r), bt)


_LIB.impl("expand_", _expand_in_place, "CompositeExplicitAutograd")
_LIB.impl("expand_", torch.library.fallthrough_kernel, "Autograd")
torch.library.register_fake("lorahot_probe::expand_", lambda yh, bt: None, lib=_LIB)
_LIB.impl("wide_linear", _opaque_wide, "CompositeExplicitAutograd")
_LIB.impl("wide_linear", torch.library.fallthrough_kernel, "Autograd")
torch.library.register_fake("lorahot_probe::wide_linear", _opaque_wide_fake, lib=_LIB)


def _consume(y: torch.Tensor) -> torch.Tensor:
    if CONSUMER == "gelu":
        return F.gelu(y)
    if CONSUMER == "sdpa":  # attention over 64-row sequences, 64-wide heads, q = k = v = y
        q = y.view(-1, 64, y.shape[-1] // 64, 64).transpose(1, 2)
        return F.scaled_dot_product_attention(q, q, q).transpose(1, 2).reshape(y.shape)
    half = y.shape[-1] // 2
    return y * 0.5 + torch.cat((-y[:, half:], y[:, :half]), dim=-1) * 0.25


#: forms over groups of three layers that share one input (attention's q, k and v): ``kcat_shared``
#: is ``kcat`` with the input produced once per group, ``kcat3`` that with one shrink over the
#: three layers' A stacked (``[A_q; A_k; A_v]``, reading ``x`` once), each layer's ``[x | h]``
#: taking its slice of the stacked ``h``
GROUPED = ("kcat_shared", "kcat3")


def _grouped(
    name: str, ws: list[torch.Tensor], aps: list[torch.Tensor], a3: list[torch.Tensor], wks: list[torch.Tensor]
) -> Callable[[torch.Tensor], list[torch.Tensor]]:
    r = aps[0].shape[0]

    def model(x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for g in range(0, len(ws), 3):
            xp = _produce(x)
            h3 = F.linear(xp, a3[g // 3]) if name == "kcat3" else None
            for j in range(min(3, len(ws) - g)):
                h = h3[:, j * r : (j + 1) * r] if h3 is not None else F.linear(xp, aps[g + j])
                outs.append(_consume(F.linear(torch.cat([xp, h], dim=-1), wks[g + j])))
        return outs

    return model


def _produce(x: torch.Tensor) -> torch.Tensor:
    """Each layer's input: ``x`` itself, or (``PROBE_PRODUCER=silu``) an elementwise op's output
    computed in the graph, as a norm's output is in a model (the compiler can then write it
    straight into a concatenation's buffer)."""
    return F.silu(x) if PRODUCER == "silu" else x


def _layer(name: str, n: int) -> Callable[..., torch.Tensor]:
    def kcat(x, w, wa, ap, b, wk):
        x = _produce(x)
        return _consume(F.linear(torch.cat([x, F.linear(x, ap)], dim=-1), wk))

    def base(x, w, wa, ap, b):
        return _consume(F.linear(x, w))

    def op(x, w, wa, ap, b):
        return _consume(torch.ops.lorahot_probe.wide_linear(x, wa, b))

    def traced(x, w, wa, ap, b):
        yh = F.linear(x, wa)
        return _consume(yh[:, :n] + yh[:, n:] @ b)

    def traced_c(x, w, wa, ap, b):
        yh = F.linear(x, wa)
        return _consume(yh[:, :n] + yh[:, n:].contiguous() @ b)

    def expand_op(x, w, wa, ap, b):
        yh = F.linear(x, wa)
        torch.ops.lorahot_probe.expand_(yh, b)
        return _consume(yh[:, :n])

    def lib(x, w, wa, ap, b):
        return _consume(F.linear(x, w) + F.linear(x, ap) @ b)

    forms = {"base": base, "op": op, "traced": traced, "traced_c": traced_c, "expand_op": expand_op, "lib": lib}
    if name == "kcat":
        return kcat

    def layer(x, w, wa, ap, b, wk):
        return forms[name](_produce(x), w, wa, ap, b)

    return layer


def _host_us(fn: Callable[[], object]) -> float:
    ts = []
    for _ in range(15):
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)  # keeps the GPU busy, so the call below never waits
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(ts)


def _wall_us(fn: Callable[[], object], calls: int = 10) -> float:
    ts = []
    for _ in range(7):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e6 / calls)
    return statistics.median(ts)


def main() -> None:
    log("torch", torch.__version__, torch.cuda.get_device_name(), "triton", __import__("triton").__version__)
    torch._dynamo.config.cache_size_limit = 64
    table: dict = {}
    for shape, (m, k, n) in SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(0)
        ws = [torch.randn(n, k, device=dev, dtype=dt, generator=g) / k**0.5 for _ in range(SETS)]
        aps = [(0.5 * torch.randn(R, k, device=dev, dtype=dt, generator=g) / k**0.5) for _ in range(SETS)]
        bs = [torch.randn(R, n, device=dev, dtype=dt, generator=g) / R**0.5 for _ in range(SETS)]
        was = [torch.cat([w, ap]) for w, ap in zip(ws, aps)]
        wks = [torch.cat([w, b.T], dim=1) for w, b in zip(ws, bs)]  # [W | B]: K grows by R
        x = torch.randn(m, k, device=dev, dtype=dt, generator=g)
        xd = _produce(x.double())
        ref = xd @ ws[0].double().T + (xd @ aps[0].double().T) @ bs[0].double()
        ref = _consume(ref)
        row: dict = {}
        a3 = [torch.cat(aps[i : i + 3]) for i in range(0, SETS, 3)]  # three projections' A, stacked
        for name in FORMULAS:
            layer = _layer(name, n)

            def model(x, layer=layer):
                return [layer(x, ws[i], was[i], aps[i], bs[i], wks[i]) for i in range(SETS)]

            if name in GROUPED:
                model = _grouped(name, ws, aps, a3, wks)

            torch._dynamo.reset()
            compiled = torch.compile(model, dynamic=False)
            t = time.perf_counter()
            with torch.no_grad():
                outs = compiled(x)
                torch.cuda.synchronize()
                compile_s = time.perf_counter() - t
                err = float((outs[0].double() - ref).norm() / ref.norm())
                assert name == "base" or err < 2e-2, (shape, name, err)

                def call(compiled=compiled):
                    return compiled(x)

                wall = _wall_us(call) / SETS
                host = _host_us(call) / SETS
                try:
                    gpu = graph_us(call, SETS)
                except Exception as e:  # a probe reports what did not capture
                    log(shape, name, "capture failed:", type(e).__name__, str(e)[:120])
                    gpu = None
            row[name] = {"wall": round(wall, 2), "host": round(host, 2), "gpu": gpu and round(gpu, 2),
                         "err": round(err, 5), "compile_s": round(compile_s, 1)}  # fmt: skip
            log(f"{shape:20s} {name:9s} wall {wall:8.2f}  host {host:7.2f}  gpu {gpu or float('nan'):8.2f} us"
                f"  err {err:.1e}  compile {compile_s:.1f} s")  # fmt: skip
        table[shape] = row
    path = os.path.join(OUT, f"{time.strftime('%Y%m%dT%H%M%S')}-compiled-layer-probe.json")
    with open(path, "w") as f:
        json.dump({"torch": torch.__version__, "device": torch.cuda.get_device_name(), "sets": SETS, "consumer": CONSUMER,
                   "table": table}, f, indent=1)  # fmt: skip
    log("wrote", path)


if __name__ == "__main__":
    main()
