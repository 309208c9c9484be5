"""Whether the graph being compiled launches its kernels from the host on every call.

The fused LoRA kernel (:mod:`lorahot.kernels.lora_linear`) is an opaque operator whose Python body
picks the tiles and launches Triton kernels. Under CUDA graphs (``torch.compile(mode=
"reduce-overhead")``, ``"max-autotune"``) that body runs once, at capture, and every later call
replays the launches: there the kernel's one or two launches beat the wide layer's GEMMs. In
``torch.compile``'s default mode nothing is replayed: every call runs the compiled wrapper on
the host, and each fused layer runs the operator's body again, which costs far more host time
than the launches the compiler itself writes. Measured on an H200 host
(``benchmarks/experiments/launch_host_probe.py``, ``runs/20261201T223722-launch-host-probe.log``;
one decode row, TinyLlama shapes): the operator 126-186 us per call against 23.5-30.7 for the
base layer's ``F.linear``, two blocks of the model 206 us of host time per LoRA layer over the
base model in default mode. Over 154 layers the forward suite's default-mode decode read 33.9 ms
against the base model's 5.9 (``runs/20261201T223025-forward.json``).

So where the graph being compiled is not replayed, the layers take the formulas the compiler
writes itself (the wide layer's shrink and one GEMM, or the library formula), whose launches
cost the host what the base model's own do. :func:`launched_per_call` tells the two apart at
trace time: the backend ``torch.compile`` was given, if it is inductor, states whether it
captures CUDA graphs (its ``triton.cudagraphs`` option, which the modes set, else inductor's
global setting). The answer is a constant of the graph, not a guard: a model compiled in each
mode traces each on its own. Under any other backend, and eagerly, the answer is False and
nothing changes. That includes inductor reached other than through ``torch.compile``'s own
wrapper (``torch._dynamo.optimize("inductor")``, a backend that calls ``compile_fx`` itself):
those state no options, so the layers keep the fused operator there, as before.

Per-row routed layers (:mod:`lorahot.layers.routing`) keep their routed operators in every mode:
the same host cost applies to them in default mode, not yet measured end to end; their kernels'
launches are direct (:mod:`lorahot.kernels.direct_launch`), which cut the fused operator's host
time from 96-136 to 75-100 us per call. That was not enough to bring the fused operator back
into default mode: with it in every layer, a compiled model's decode read 33.8 ms against the
wide GEMMs' 17.6 and the base model's 7.0 (``runs/20261202T004403-forward.json``, one run).
Three other default-mode forms were measured on 2026-12-02 and not kept (``benchmarks/README.md``,
"Twenty-first session"): the LoRA of decode rows as reductions the compiler generates (more
launches: 577 per decode call against the wide GEMMs' 489 and the base model's 335), and the
fused kernel with K unsplit, one launch per layer, either behind a lean operator or as a
``triton_op`` the compiler launches itself: both fewer launches than the base model, neither
less host time than the wide GEMMs in two compiled blocks. On these hosts each launch costs
about 21 us whatever it launches, and the wide form's one extra launch per LoRA layer is what
its 1.5-1.6x is made of. Since 2026-12-02 the layers that share an input (q/k/v, gate/up) run
as one GEMM and one batched expand in aten (:mod:`lorahot.kernels.wide_groups`, "Default
mode"): two launches per group, 423 launches per decode call against 489, 1.19x the base
model's decode there; with a rotated group's sums in one buffer and down as two GEMMs, 379
launches, 1.17x (decode) and 1.21x (prefill, 128 rows) in a run on a slower host.
"""

from __future__ import annotations

import sys
from typing import Any

import torch

__all__ = ["autotunes_gemms", "freezes", "freezing_on", "launched_per_call", "lowering_per_call"]


@torch._dynamo.assume_constant_result
def launched_per_call() -> bool:
    """Whether the graph being traced runs on inductor without CUDA graphs (default mode,
    ``max-autotune-no-cudagraphs``): each call then launches every kernel from the host. False
    eagerly, under other backends, and where the backend cannot be read."""
    config = _inductor_options()  # not ``is_compiling()``: the compiler runs this function as plain Python
    if config is None:
        return False
    from torch._inductor import config as inductor_config

    return not bool(config.get("triton.cudagraphs", inductor_config.triton.cudagraphs))


@torch._dynamo.assume_constant_result
def autotunes_gemms() -> bool:
    """Whether the graph being traced runs on inductor with max-autotune's GEMM templates (mode
    ``"max-autotune"`` or ``"max-autotune-no-cudagraphs"``, the options ``max_autotune`` or
    ``max_autotune_gemm``, or inductor's global setting). On the CPU inductor then writes its
    own C++ ``bmm`` for batched products, and in torch 2.13 that template computes a symbolic
    batch as the size it was traced with: once a second batch size makes the batch symbolic,
    a ``bmm`` over any other batch size fails (an assertion on its input, a wrong size, an
    index out of bounds) or computes other rows' numbers (inf, NaN, 1.6e27 off the float64
    reference in six lines of plain torch), with or without lorahot: a tiny model's own
    attention fails there too. Its ``mm`` is not affected, so the layers' per-row formulas take products of 2-D
    operands there (:func:`lorahot.layers.routing.batched_products`). A constant of the graph,
    as :func:`launched_per_call`; False eagerly. Where the backend's options cannot be read
    (another backend, or inductor reached other than through ``torch.compile``'s wrapper, as
    ``torch._dynamo.optimize("inductor")``), inductor's global setting answers: a wrong answer
    there costs the other backend time, not a wrong number."""
    from torch._inductor import config as inductor_config

    config = _inductor_options()
    if config is None:
        compiling = torch.compiler.is_compiling()  # (a constant-result function runs as plain Python)
        return compiling and bool(inductor_config.max_autotune or inductor_config.max_autotune_gemm)
    tuned = config.get("max_autotune", inductor_config.max_autotune)
    return bool(tuned or config.get("max_autotune_gemm", inductor_config.max_autotune_gemm))


@torch._dynamo.assume_constant_result
def freezes() -> bool:
    """Whether the graph being traced runs on inductor with ``freezing`` (its option, or
    inductor's global ``torch._inductor.config.freezing``) and no gradient: inductor then takes
    every parameter, buffer and tensor the graph reads from a module or a global (the arena
    tensors, merged mode's base weights) as a constant and folds it into the compiled code, so a
    later write in place (a load, ``activate``, ``set_scale``, ``unload``) never reaches the
    graph. A constant of the graph, as :func:`launched_per_call`; False eagerly. Where the
    backend's options cannot be read, inductor's global setting answers, as in
    :func:`autotunes_gemms`."""
    config = _inductor_options()
    if config is None:
        return torch.compiler.is_compiling() and freezing_on() and not torch.is_grad_enabled()
    from torch._inductor import config as inductor_config

    return bool(config.get("freezing", inductor_config.freezing)) and not torch.is_grad_enabled()


def freezing_on() -> bool:
    """Whether inductor's global ``freezing`` is on (False where inductor was never imported:
    nothing was compiled with it, and reading it must not import it)."""
    config = sys.modules.get("torch._inductor.config")
    return bool(getattr(config, "freezing", False))


def _inductor_options() -> dict[str, Any] | None:
    """The options of the inductor backend the current trace compiles for (``torch.compile``'s
    mode and ``options=``), or None for another backend or outside a trace."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        tx = InstructionTranslator.current_tx()  # None, or unset, outside a trace
        backend = getattr(getattr(tx, "output", None), "compiler_fn", None)
        get = getattr(backend, "get_compiler_config", None)
        config = get() if callable(get) else None
    except Exception:  # an internal of the compiler that moved: keep the kernels
        return None
    return config if isinstance(config, dict) else None


def lowering_per_call() -> bool:
    """:func:`launched_per_call` as inductor's passes ask it, after the trace: the options the
    graph compiles under (the mode's, patched into inductor's config for the compile, inside
    which the post-grad passes run) capture no CUDA graphs."""
    from torch._inductor import config as inductor_config

    return not bool(inductor_config.triton.cudagraphs)
