"""lorahot's Triton kernels compiled for an H100/H200 (sm90) on a CPU box, without running them
(``make test-interpret`` runs this after the interpreter tests).

Triton's interpreter runs a kernel's code with NumPy, so it does not catch what only the
compiler rejects (a loop variable shadowing a value, a type the lowering refuses): a device call
once went to a kernel that did not compile. Here each kernel's launch function runs as usual on
CPU tensors, but every launch is compiled ahead of time for sm90 instead (Triton's own
``triton.compile``, ptxas included), with the argument types, the 16-byte alignments and the
compile-time constants the launch would have given the JIT. Each compile must succeed and put
the products on the matrix units (``wgmma``) or, for the elementwise kernels, produce PTX at all.
Skipped unless ``LORAHOT_SM90_COMPILE=1`` and a Triton with its NVIDIA backend imports.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pytest
import torch

pytestmark = [
    pytest.mark.sm90,
    pytest.mark.skipif(os.environ.get("LORAHOT_SM90_COMPILE") != "1", reason="run by make test-interpret"),
]

triton = pytest.importorskip("triton")

_TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.bool: "i1",
}


class _Compiler:
    """Stands in for ``JITFunction.run``: compiles each launch for sm90, runs nothing."""

    def __init__(self) -> None:
        self.compiled: list[tuple[str, Any]] = []

    def __call__(self, fn: Any, *args: Any, grid: Any, warmup: bool = False, **kwargs: Any) -> None:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        names = [p.name for p in fn.params]
        bound = dict(zip(names, args))
        bound.update({k: v for k, v in kwargs.items() if k in names})
        options = {k: v for k, v in kwargs.items() if k not in names}
        signature: dict[str, str] = {}
        constants: dict[tuple[int, ...], Any] = {}
        attrs: dict[tuple[int, ...], list[list[Any]]] = {}
        for i, p in enumerate(fn.params):
            value = bound.get(p.name, p.default if hasattr(p, "default") else None)
            if p.is_constexpr or value is None:
                signature[p.name] = "constexpr"
                constants[(i,)] = value
            elif isinstance(value, torch.Tensor):
                signature[p.name] = "*" + _TYPES[value.dtype]
                if value.data_ptr() % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(value, bool):
                signature[p.name] = "i1"
            elif isinstance(value, int):
                signature[p.name] = "i64" if not -(2**31) <= value < 2**31 else "i32"
                if value % 16 == 0 and value != 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
            elif isinstance(value, float):
                signature[p.name] = "fp32"
            else:
                raise TypeError(f"{fn.__name__}: argument {p.name} of type {type(value).__name__}")
        source = ASTSource(fn=fn, signature=signature, constexprs=constants, attrs=attrs)
        kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)
        self.compiled.append((fn.__name__, kernel))


@pytest.fixture
def compiler(monkeypatch: pytest.MonkeyPatch) -> _Compiler:
    from triton.runtime.jit import JITFunction

    compile_ = _Compiler()
    monkeypatch.setattr(JITFunction, "run", lambda self, *a, **k: compile_(self, *a, **k))
    return compile_


def _ptx(kernel: Any) -> str:
    return str(kernel.asm["ptx"])


@pytest.mark.parametrize("rows", [1, 64, 300])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_lora_linear_compiles_onto_the_matrix_units(compiler: _Compiler, rows: int, bias: bool) -> None:
    kernel = pytest.importorskip("lorahot.kernels.triton_lora_linear")
    k, n, r = 2048, 2048, 64
    x = torch.zeros(rows, k, dtype=torch.bfloat16)
    w, a, bt = torch.zeros(n, k, dtype=torch.bfloat16), torch.zeros(r, k, dtype=torch.bfloat16), torch.zeros(r, n)
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    b = torch.zeros(n, dtype=torch.bfloat16) if bias else None
    kernel.launch(x, w, b, a, bt.bfloat16(), torch.ones(r), out, kernel.config_for(rows, n, k))
    names = [name for name, _ in compiler.compiled]
    assert names[0] == "_lora_linear_kernel" and set(names) <= {"_lora_linear_kernel", "_split_k_sum"}
    assert "wgmma" in _ptx(compiler.compiled[0][1]) or "mma" in _ptx(compiler.compiled[0][1])


def test_routed_fused_linear_compiles(compiler: _Compiler) -> None:
    kernel = pytest.importorskip("lorahot.kernels.triton_lora_linear")
    from lorahot.kernels import routed_lora as routed

    rows, k, n, r, slots = 64, 2048, 256, 64, 4
    x = torch.zeros(rows, k, dtype=torch.bfloat16)
    w = torch.zeros(n, k, dtype=torch.bfloat16)
    a, bt = torch.zeros(slots, r, k, dtype=torch.bfloat16), torch.zeros(slots, r, n, dtype=torch.bfloat16)
    route = torch.arange(rows) % slots
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    config = kernel.config_for(rows, n, k)
    kernel.launch(
        x, w, None, a, bt, torch.ones(slots, r), out, config, routing=(routed.segments(route, slots), route, 1, None)
    )
    names = {name for name, _ in compiler.compiled}
    assert "_lora_linear_kernel" in names and len(compiler.compiled) >= 2  # the segmented shrink before it


@pytest.mark.parametrize("gather", [True, False], ids=["gather", "segmented"])
def test_routed_kernels_compile(compiler: _Compiler, gather: bool) -> None:
    kernels = pytest.importorskip("lorahot.kernels.triton_routed_lora")
    from lorahot.kernels import routed_lora as routed

    rows, k, n, r, slots = 40, 256, 512, 64, 4
    x, y = torch.zeros(rows, k, dtype=torch.float16), torch.zeros(rows, n, dtype=torch.float16)
    a, bt = torch.zeros(slots, r, k, dtype=torch.float16), torch.zeros(slots, r, n, dtype=torch.float16)
    route = torch.arange(rows) % slots
    out = torch.empty_like(y)
    kernels.launch(x, y, a, bt, torch.ones(slots, r), route, out, gather=gather, segs=routed.segments(route, slots))
    assert len(compiler.compiled) >= 2 and all(_ptx(kernel) for _, kernel in compiler.compiled)


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "bias"])
def test_segmented_expand_without_a_base_output_compiles(compiler: _Compiler, bias: bool) -> None:
    """The segmented pair writing the updates alone (``routed_linear._accumulated``'s), at the
    mixed suite's prefill size."""
    kernels = pytest.importorskip("lorahot.kernels.triton_routed_lora")
    from lorahot.kernels import routed_lora as routed

    rows, k, n, r, slots = 2048, 2048, 2048, 64, 8
    x, out = torch.zeros(rows, k, dtype=torch.bfloat16), torch.empty(rows, n, dtype=torch.bfloat16)
    a, bt = torch.zeros(slots, r, k, dtype=torch.bfloat16), torch.zeros(slots, r, n, dtype=torch.bfloat16)
    route = torch.arange(8) % slots
    b = torch.zeros(n, dtype=torch.bfloat16) if bias else None
    segs = routed.segments(route, slots)
    kernels.launch(x, None, a, bt, torch.ones(slots, r), route, out, gather=False, segs=segs, bias=b)
    expand = [kernel for name, kernel in compiler.compiled if name == "_segment_expand"]
    assert expand and "mma" in _ptx(expand[0])  # 32-row tiles: mma.sync, as the pair with y


@pytest.mark.parametrize("k", [2048, 5632])
def test_segmented_pair_launched_early_compiles_with_its_waits(compiler: _Compiler, k: int) -> None:
    """The routed prefill's pair with early launches (``launch(..., early=True)``): the shrink
    and the expand are both compiled for an early launch, each holds its wait, and the expand
    still puts its products on the matrix units; above ``_EARLY_MAX_K`` (a long shrink, which
    the waiting expand would slow) both launch in stream order."""
    kernels = pytest.importorskip("lorahot.kernels.triton_routed_lora")
    from lorahot.kernels import routed_lora as routed

    rows, n, r, slots = 2048, 2048, 64, 8
    x, y = torch.zeros(rows, k, dtype=torch.bfloat16), torch.zeros(rows, n, dtype=torch.bfloat16)
    a, bt = torch.zeros(slots, r, k, dtype=torch.bfloat16), torch.zeros(slots, r, n, dtype=torch.bfloat16)
    route = torch.arange(8) % slots
    out = torch.empty_like(y)
    kernels.launch(
        x, y, a, bt, torch.ones(slots, r), route, out, gather=False, segs=routed.segments(route, slots), early=True
    )
    assert [name for name, _ in compiler.compiled] == ["_segment_shrink", "_segment_expand"]
    early = k <= kernels._EARLY_MAX_K
    for name, compiled in compiler.compiled:
        assert compiled.metadata.launch_pdl == early, name
        assert ("griddepcontrol.wait" in _ptx(compiled)) == early, name
    assert "mma" in _ptx(dict(compiler.compiled)["_segment_expand"])


def test_row_scale_and_stack_scales_compile(compiler: _Compiler) -> None:
    kernel = pytest.importorskip("lorahot.kernels.triton_row_scale")
    src = [torch.zeros(16, w, dtype=torch.bfloat16) for w in (64, 2500)]
    dst = [torch.empty_like(t) for t in src]
    tables = [torch.tensor([t.data_ptr() for t in ts], dtype=torch.int64) for ts in (dst, src)]
    kernel.launch(
        tables[0],
        tables[1],
        torch.ones(2, 16),
        torch.tensor([0, 1]),
        torch.tensor([64, 2500], dtype=torch.int32),
        torch.tensor([64, 2500]),
        5,
        torch.bfloat16,
    )
    ld = torch.tensor([40, 40])  # transposed destinations: columns of [cols, 40] buffers
    kernel.launch(tables[0], tables[1], torch.ones(2, 16), torch.tensor([0, 1]),
                  torch.tensor([64, 2500], dtype=torch.int32), ld, 5, torch.bfloat16, 2500)  # fmt: skip
    own, part = torch.ones(4, 16, dtype=torch.float64), torch.zeros(4, 16, dtype=torch.int64)
    kernel.stack_scales(own, part, torch.ones(2, dtype=torch.float64), torch.empty(4, 16), torch.empty(4, 16))
    assert [name for name, _ in compiler.compiled] == ["_row_scale_kernel", "_col_scale_kernel", "_stack_scales_kernel"]


@pytest.mark.parametrize("routed", [None, "zero-fill", "workspace"], ids=["single", "routed", "routed-workspace"])
def test_early_launches_compile_with_their_waits(
    compiler: _Compiler, monkeypatch: pytest.MonkeyPatch, routed: str | None
) -> None:
    """With programmatic dependent launch on (:mod:`lorahot.kernels.pdl`), every kernel of the
    fused path at the decode shape (64 rows, K split) is compiled for an early launch and
    holds the wait that keeps it after the kernel before it; the routed fused kernel still puts
    its products on the matrix units."""
    kernel = pytest.importorskip("lorahot.kernels.triton_lora_linear")
    from lorahot.kernels import pdl
    from lorahot.kernels import routed_lora as routed_ops

    monkeypatch.setattr(pdl, "active", lambda device: True)
    rows, k, n, r, slots = 64, 2048, 2048, 64, 8
    x, w = torch.zeros(rows, k, dtype=torch.bfloat16), torch.zeros(n, k, dtype=torch.bfloat16)
    out = torch.empty(rows, n, dtype=torch.bfloat16)
    config = kernel.config_for(rows, n, k)
    assert config[-1] > 1  # split K: the sum kernel follows
    if routed:
        a, bt = torch.zeros(slots, r, k, dtype=torch.bfloat16), torch.zeros(slots, r, n, dtype=torch.bfloat16)
        route = torch.arange(rows) % slots
        from lorahot.kernels.routed_linear import workspace

        kept = workspace(r, torch.device("cpu")) if routed == "workspace" else None
        routing = (routed_ops.segments(route, slots), route, 1, kept)
        kernel.launch(x, w, None, a, bt, torch.ones(slots, r), out, config, routing=routing)
        expected = ["_segment_shrink", "_lora_linear_kernel", "_split_k_sum"]
        if kept is None:  # a fresh workspace, zeroed by a kernel of its own
            expected.insert(0, "_zero_kernel")
    else:
        a, bt = torch.zeros(r, k, dtype=torch.bfloat16), torch.zeros(r, n, dtype=torch.bfloat16)
        kernel.launch(x, w, None, a, bt, torch.ones(r), out, config)
        expected = ["_lora_linear_kernel", "_split_k_sum"]
    assert [name for name, _ in compiler.compiled] == expected
    for name, compiled in compiler.compiled:
        assert compiled.metadata.launch_pdl, name
        assert "griddepcontrol.wait" in _ptx(compiled), name
    fused = dict(compiler.compiled)["_lora_linear_kernel"]
    assert "griddepcontrol.launch_dependents" in _ptx(fused) and "wgmma" in _ptx(fused)


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
def test_word_sums_compile_with_int32_atomics(compiler: _Compiler, aligned: bool) -> None:
    """The one-launch row and column sums: int32 atomic adds into the sums, and 128-bit loads
    of the words where every view allows them (else 32-bit ones)."""
    kernel = pytest.importorskip("lorahot.kernels.triton_word_sums")
    kernel.launch(torch.zeros(4, 6, dtype=torch.int64), torch.zeros(64, dtype=torch.int32), aligned)
    ((name, compiled),) = compiler.compiled
    ptx = _ptx(compiled)
    assert name == "_word_sums_kernel" and len(re.findall(r"(?:atom|red)\.global\.\S*add\.[us]32", ptx)) == 2
    assert ("ld.global.v4.b32" in ptx) == aligned


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_float16_expands_compile_as_float32_dots_and_bfloat16_ones_as_before(
    compiler: _Compiler, dtype: torch.dtype
) -> None:
    """float16 weights (``H32``): the fused kernel's expand, its routed slot expands and the
    segmented expand keep the scaled shrink in float32, a TF32 dot on the matrix units; bfloat16
    keeps its 16-bit dots, no TF32 anywhere (its code is unchanged: the PTX of every launch here
    matched that before ``H32`` bar source line numbers, checked when it was added)."""
    fused = pytest.importorskip("lorahot.kernels.triton_lora_linear")
    kernels = pytest.importorskip("lorahot.kernels.triton_routed_lora")
    from lorahot.kernels import routed_lora as routed

    k, n, r, slots = 2048, 256, 64, 4
    route = torch.arange(64) % slots
    segs = routed.segments(route, slots)
    for rows in (1, 64, 300):  # K split, one tile of rows, several
        x, w = torch.zeros(rows, k, dtype=dtype), torch.zeros(n, k, dtype=dtype)
        a, bt = torch.zeros(r, k, dtype=dtype), torch.zeros(r, n, dtype=dtype)
        fused.launch(x, w, None, a, bt, torch.ones(r), torch.empty(rows, n, dtype=dtype), fused.config_for(rows, n, k))
    x, w = torch.zeros(64, k, dtype=dtype), torch.zeros(n, k, dtype=dtype)
    a, bt = torch.zeros(slots, r, k, dtype=dtype), torch.zeros(slots, r, n, dtype=dtype)
    out, s = torch.empty(64, n, dtype=dtype), torch.ones(slots, r)
    fused.launch(x, w, None, a, bt, s, out, fused.config_for(64, n, k), routing=(segs, route, 1, None))
    kernels.launch(x, out, a, bt, s, route, torch.empty_like(out), gather=False, segs=segs)
    expands = [
        (name, kernel) for name, kernel in compiler.compiled if name in ("_lora_linear_kernel", "_segment_expand")
    ]
    assert len(expands) == 5
    for name, kernel in expands:
        ptx = _ptx(kernel)
        assert "mma" in ptx, name
        assert ("tf32" in ptx) == (dtype == torch.float16), name
