"""lorahot::unrolled_expand: a few rows' expand as an elementwise node inductor fuses into its reader."""

from __future__ import annotations

import re
from typing import Any

import pytest
import torch

from lorahot.kernels import unrolled_expand


def _reader(y: torch.Tensor, e: torch.Tensor, res: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What reads a LoRA layer's output in a Llama block: the residual add, then RMSNorm."""
    z = y + e + res
    return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * w


def _with_unrolled(
    y: torch.Tensor, h: torch.Tensor, bt: torch.Tensor, res: torch.Tensor, w: torch.Tensor
) -> torch.Tensor:
    return _reader(y, unrolled_expand.unrolled_expand(h, bt), res, w)


def _with_gemm(y: torch.Tensor, h: torch.Tensor, bt: torch.Tensor, res: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _reader(y, h @ bt, res, w)


def _without(y: torch.Tensor, res: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return _reader(y, torch.zeros_like(y), res, w)


def _compiled(
    fn: Any, y: torch.Tensor, h: torch.Tensor, bt: torch.Tensor, res: torch.Tensor, w: torch.Tensor
) -> tuple[torch.Tensor, list[str], list[str]]:
    """``fn``'s output and generated code, compiled by inductor, and the code of the reader
    without an expand."""
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    unrolled_expand.register()
    torch._dynamo.reset()
    with config.patch(fx_graph_cache=False):  # no lorahot pass, whose id has REDUCED, runs here
        got, code = run_and_get_code(torch.compile(fn, fullgraph=True), y, h, bt, res, w)
        _, plain = run_and_get_code(torch.compile(_without, fullgraph=True), y, res, w)
    return got, code, plain


def _launches(code: list[str]) -> tuple[int, int]:
    """The GEMMs and the generated kernels the compiled wrapper launches per call."""
    body = "\n".join(c.split("def call(", 1)[1] for c in code if "def call(" in c)
    gemms = len(re.findall(r"extern_kernels\.\w+\(", body))
    kernels = len(re.findall(r"\bcpp_fused_\w+\(|\btriton_\w+\.run\(", body))
    return gemms, kernels


def _inputs(rows: int, rank: int, n: int, dtype: torch.dtype) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(rows * 1000 + rank)
    return [
        torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)
        for shape in ((rows, n), (rows, rank), (rank, n), (rows, n), (n,))
    ]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_the_op_is_the_product_summed_in_float32_and_rounded_once(dtype: torch.dtype) -> None:
    """Eagerly the op is ``h @ bt`` in float32 (float64 for float64 inputs), rounded once to the
    inputs' dtype: bitwise that product, and within that rounding of the float64 one."""
    _, h, bt, _, _ = _inputs(7, 16, 24, dtype)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    got = unrolled_expand.unrolled_expand(h, bt)
    assert got.dtype == dtype and got.shape == (7, 24)
    assert torch.equal(got, (h.to(wide) @ bt.to(wide)).to(dtype))
    exact = h.double() @ bt.double()
    tol = {torch.float64: 1e-12, torch.float32: 1e-5}.get(dtype, 1e-2)
    torch.testing.assert_close(got.double(), exact, rtol=tol, atol=tol)


def test_fits_takes_a_few_static_rows_and_a_small_rank_and_a_symbolic_row_count_never(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Unrolled: static rows up to :data:`~lorahot.kernels.unrolled_expand.ROWS` and ranks up to
    :data:`~lorahot.kernels.unrolled_expand.RANK`, where switched on. A symbolic row count is
    not, and asking adds no guard on it (one graph keeps serving every row count). Off (the
    default), nothing is."""
    from torch._dynamo.source import ConstantSource
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    monkeypatch.setattr(unrolled_expand, "ENABLED", True)
    rows, rank = unrolled_expand.ROWS, unrolled_expand.RANK
    assert unrolled_expand.fits(1, rank) and unrolled_expand.fits(rows, 1)
    assert not unrolled_expand.fits(rows + 1, 8)
    assert not unrolled_expand.fits(1, rank + 1)
    assert not unrolled_expand.fits(1, 0)
    env = ShapeEnv()
    symbolic = env.create_symintnode(env.create_symbol(4, ConstantSource("rows")), hint=4)
    assert not unrolled_expand.fits(symbolic, 8)
    assert not env.guards
    monkeypatch.setattr(unrolled_expand, "ENABLED", False)
    assert not unrolled_expand.fits(1, 8)


@pytest.mark.parametrize("unrolled", [True, False], ids=["unrolled", "negative-control"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_inductor_computes_the_expand_inside_the_kernel_that_reads_it(unrolled: bool, dtype: torch.dtype) -> None:
    """Compiled by inductor, ``y + unrolled_expand(h, bt)`` read by a residual add and RMSNorm
    is one kernel with no GEMM, as many kernels as the reader without the expand, and its
    output equals the float64 reference (float64: 1e-10; bfloat16: within the output's
    rounding). Negative control: the expand as ``h @ bt`` is a GEMM of its own."""
    y, h, bt, res, w = _inputs(5, 8, 32, dtype)
    got, code, plain = _compiled(_with_unrolled if unrolled else _with_gemm, y, h, bt, res, w)
    want = _reader(*(t.double() for t in (y, h @ bt if dtype == torch.float64 else (h.float() @ bt.float()), res, w)))
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    gemms, kernels = _launches(code)
    if unrolled:
        assert gemms == 0
        assert "lorahot" not in "\n".join(code)  # no call of the op's eager body: lowered
        assert kernels == _launches(plain)[1] == 1
    else:
        assert gemms == 1


def _silu_reader(
    yg: torch.Tensor, hg: torch.Tensor, yu: torch.Tensor, hu: torch.Tensor, bt: torch.Tensor
) -> torch.Tensor:
    """What reads gate's and up's outputs in a Llama MLP: the SiLU product."""
    g = yg + unrolled_expand.unrolled_expand(hg, bt)
    return torch.nn.functional.silu(g) * (yu + unrolled_expand.unrolled_expand(hu, bt))


def _silu_inputs(rows: int, rank: int, n: int, dtype: torch.dtype, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = ((rows, n), (rows, rank), (rows, n), (rows, rank), (rank, n))
    return [torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]


def _silu_reference(
    yg: torch.Tensor, hg: torch.Tensor, yu: torch.Tensor, hu: torch.Tensor, bt: torch.Tensor
) -> torch.Tensor:
    d = [t.double() for t in (yg, hg, yu, hu, bt)]
    return torch.nn.functional.silu(d[0] + d[1] @ d[4]) * (d[2] + d[3] @ d[4])


@pytest.mark.parametrize("reduced", [True, False], ids=["reduced", "elementwise"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_the_expand_lowered_as_a_reduction_over_the_rank_equals_the_elementwise_form(
    reduced: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With :data:`~lorahot.kernels.unrolled_expand.REDUCED` the op is lowered as a reduction
    over the rank: read by the SiLU product of gate and up, compiled, it equals the float64
    reference (float64: 1e-10; bfloat16: within the outputs' rounding), with no GEMM and no
    call of the op's eager body, and in as many kernels as the elementwise form (one)."""
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    unrolled_expand.register()
    monkeypatch.setattr(unrolled_expand, "REDUCED", reduced)
    args = _silu_inputs(3, 16, 24, dtype, seed=21)
    torch._dynamo.reset()
    with config.patch(fx_graph_cache=False):  # no lorahot pass, whose id has the switch, runs here
        got, code = run_and_get_code(torch.compile(_silu_reader, fullgraph=True), *args)
    tol = 1e-10 if dtype == torch.float64 else 3e-2
    torch.testing.assert_close(got.double(), _silu_reference(*args), rtol=tol, atol=tol)
    text = "\n".join(code)
    assert "lorahot" not in text
    assert _launches(code) == (0, 1)
    assert ("tmp_acc" in text) == reduced  # the C++ backend's reduction accumulator


@pytest.mark.gpu
@pytest.mark.parametrize("reduced", [True, False], ids=["reduced", "elementwise"])
@pytest.mark.parametrize("rows", [1, 16, 128])
def test_gpu_gate_and_up_expands_reduced_over_the_rank_run_inside_the_silu_kernel(
    rows: int, reduced: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA in bf16 (rank 64, 5632 outputs: TinyLlama's gate and up): the SiLU product with
    both expands unrolled is one Triton kernel and no GEMM, whether the expands are lowered
    as reductions over the rank (their product the reduction's epilogue) or as elementwise
    sums, within bf16's rounding of the float64 reference."""
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    unrolled_expand.register()
    monkeypatch.setattr(unrolled_expand, "REDUCED", reduced)
    args = [t.cuda() for t in _silu_inputs(rows, 64, 5632, torch.bfloat16, seed=rows)]
    torch._dynamo.reset()
    with config.patch(fx_graph_cache=False):  # no lorahot pass, whose id has the switch, runs here
        got, code = run_and_get_code(torch.compile(_silu_reader, fullgraph=True), *args)
    want = _silu_reference(*args)
    assert float((got.double() - want).norm() / want.norm()) < 1e-2
    assert _launches(code) == (0, 1)


def test_the_op_refuses_a_gradient() -> None:
    """No backward: a call that would need one raises, naming the op."""
    _, h, bt, _, _ = _inputs(3, 4, 8, torch.float32)
    with pytest.raises(RuntimeError, match="lorahot::unrolled_expand has no backward"):
        unrolled_expand.unrolled_expand(h.requires_grad_(), bt)


@pytest.mark.gpu
@pytest.mark.parametrize("reduced", [True, False], ids=["reduced", "elementwise"])
@pytest.mark.parametrize("rows", [1, 64, 128])
def test_gpu_the_expand_runs_inside_the_triton_kernel_that_reads_it(
    rows: int, reduced: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On CUDA in bf16 (rank 64, 2048 outputs: a TinyLlama o projection) the reader is a
    reduction over the row, as RMSNorm is. The elementwise expand runs inside it: one Triton
    kernel and no GEMM, as many launches as the reader alone. The expand lowered as a reduction
    over the rank (:data:`~lorahot.kernels.unrolled_expand.REDUCED`, the default) is a kernel of
    its own before the reader: Triton fuses two reductions only where their sizes match (hence
    :data:`~lorahot.kernels.unrolled_expand.LONE` off). Either way the output is within bf16's
    rounding of the float32 reference."""
    monkeypatch.setattr(unrolled_expand, "REDUCED", reduced)
    y, h, bt, res, w = (t.cuda() for t in _inputs(rows, 64, 2048, torch.bfloat16))
    got, code, plain = _compiled(_with_unrolled, y, h, bt, res, w)
    want = _reader(y.float(), h.float() @ bt.float(), res.float(), w.float())
    assert float((got.float() - want).norm() / want.norm()) < 1e-2
    assert _launches(plain) == (0, 1)
    assert _launches(code) == (0, 2 if reduced else 1)


@pytest.mark.parametrize("reduced", [True, False], ids=["reduced", "elementwise"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_group_s_sums_are_one_buffer_each_member_s_columns_its_expand_added(
    dtype: torch.dtype, reduced: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``unrolled_sums`` over a group's GEMM output ``[y_1 | h_1 | y_2 | h_2 | y_3 | h_3]`` (widths
    12, 4, 4, rank 9): each member's ``y`` columns plus its expand, the shrink columns as they
    were; eagerly and compiled by inductor, where it is one kernel and no GEMM (read at two
    places, as RoPE reads q; the compiler's C++ backend may fuse the sums into the reader),
    whether lowered as elementwise sums or, with
    :data:`~lorahot.kernels.unrolled_expand.REDUCED`, as one reduction over the rank.
    Float64: 1e-10 of the reference; bfloat16: bitwise the float32 sum
    rounded once, eagerly."""
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    unrolled_expand.register()
    monkeypatch.setattr(unrolled_expand, "REDUCED", reduced)
    outs, rank = [12, 4, 4], 9  # not below inductor's threshold for unrolling a reduction (8)
    starts = [0, 21, 34]
    total = 47
    gen = torch.Generator().manual_seed(5)
    yh = torch.randn(6, total, generator=gen, dtype=torch.float64).to(dtype)
    bt = torch.randn(rank, total, generator=gen, dtype=torch.float64).to(dtype)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    want = yh.to(wide, copy=True)
    for at, n in zip(starts, outs, strict=True):
        want[:, at : at + n] += yh[:, at + n : at + n + rank].to(wide) @ bt[:, at : at + n].to(wide)
    eager = unrolled_expand.unrolled_sums(yh, bt, starts, outs)
    assert torch.equal(eager, want.to(dtype)) if dtype != torch.float64 else torch.allclose(eager, want, rtol=1e-12)

    def rotated(yh: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
        q = unrolled_expand.unrolled_sums(yh, bt, starts, outs)[:, :12]
        return q * 2 + torch.cat([-q[:, 6:], q[:, :6]], -1)

    torch._dynamo.reset()
    with config.patch(fx_graph_cache=False):  # no lorahot pass, whose id has the switch, runs here
        got, code = run_and_get_code(torch.compile(rotated, fullgraph=True), yh, bt)
    q = want[:, :12]
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(got.to(wide), q * 2 + torch.cat([-q[:, 6:], q[:, :6]], -1), rtol=tol, atol=tol)
    gemms, kernels = _launches(code)
    text = "\n".join(code)
    assert gemms == 0 and "lorahot" not in text
    assert kernels in (1, 2)  # the sums, then their reader (on the CPU, C++ may fuse the two)
    assert ("tmp_acc" in text) == reduced  # the C++ backend's reduction accumulator


@pytest.mark.gpu
@pytest.mark.parametrize("reduced", [True, False], ids=["reduced", "elementwise"])
@pytest.mark.parametrize("rows", [1, 16, 128])
def test_gpu_q_k_v_sums_are_one_kernel_and_no_gemm(rows: int, reduced: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA in bf16 (rank 64; q 2048, k 256 and v 256 wide: TinyLlama's attention): the
    group's one buffer written by ``unrolled_sums``, lowered either way, is one Triton kernel and
    no GEMM, and q rotated as RoPE reads it one more; within bf16's rounding of the float64
    reference."""
    from torch._inductor import config
    from torch._inductor.utils import run_and_get_code

    unrolled_expand.register()
    monkeypatch.setattr(unrolled_expand, "REDUCED", reduced)
    outs, rank = [2048, 256, 256], 64
    starts = [0, 2048 + rank, 2048 + 256 + 2 * rank]
    total = sum(outs) + 3 * rank
    gen = torch.Generator().manual_seed(rows)
    yh = torch.randn(rows, total, generator=gen, dtype=torch.float64).bfloat16().double()
    bt = (torch.randn(rank, total, generator=gen, dtype=torch.float64) / 8).bfloat16().double()
    want = yh.clone()
    for at, n in zip(starts, outs, strict=True):
        want[:, at : at + n] += yh[:, at + n : at + n + rank] @ bt[:, at : at + n]
    q = want[:, :2048]
    want = q * 2 + torch.cat([-q[:, 1024:], q[:, :1024]], -1)

    def rotated(yh: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
        q = unrolled_expand.unrolled_sums(yh, bt, starts, outs)[:, :2048]
        return q * 2 + torch.cat([-q[:, 1024:], q[:, :1024]], -1)

    torch._dynamo.reset()
    with config.patch(fx_graph_cache=False):  # no lorahot pass, whose id has the switch, runs here
        got, code = run_and_get_code(torch.compile(rotated, fullgraph=True), yh.bfloat16().cuda(), bt.bfloat16().cuda())
    assert float((got.double().cpu() - want).norm() / want.norm()) < 1e-2
    assert _launches(code) == (0, 2)


def _with_output(yh: torch.Tensor, bt: torch.Tensor, res: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    n = bt.shape[1]
    return _reader(unrolled_expand.unrolled_output(yh, bt), torch.zeros_like(yh[:, :n]), res, w)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_lone_layer_s_output_is_one_buffer_written_by_a_kernel_of_its_own(dtype: torch.dtype) -> None:
    """``unrolled_output`` over a lone layer's GEMM output ``[y | h]`` (8 outputs, rank 3):
    ``y + h @ bt``, eagerly and compiled by inductor, where it is no GEMM (a reduction over the
    rank; read by the residual add and RMSNorm alone, as here, the C++ backend nests it inside
    the reader's kernel, where Triton gives it a kernel of its own, the GPU test below).
    Float64: 1e-10 of the reference; bfloat16 eagerly: bitwise the float32 sum rounded once."""
    from torch._inductor.utils import run_and_get_code

    unrolled_expand.register()
    gen = torch.Generator().manual_seed(7)
    yh, bt, res = (torch.randn(*s, generator=gen, dtype=torch.float64).to(dtype) for s in ((5, 11), (3, 8), (5, 8)))
    w = torch.ones(8, dtype=dtype)
    wide = torch.float64 if dtype == torch.float64 else torch.float32
    want = (yh[:, :8].to(wide) + yh[:, 8:].to(wide) @ bt.to(wide)).to(dtype)
    if dtype == torch.float64:
        torch.testing.assert_close(unrolled_expand.unrolled_output(yh, bt), want, rtol=1e-10, atol=1e-10)
    else:
        assert torch.equal(unrolled_expand.unrolled_output(yh, bt), want)
    torch._dynamo.reset()
    got, code = run_and_get_code(torch.compile(_with_output, fullgraph=True), yh, bt, res, w)
    tol = 1e-10 if dtype == torch.float64 else 2e-2
    torch.testing.assert_close(got, _reader(want, torch.zeros_like(want), res, w), rtol=tol, atol=tol)
    assert _launches(code) == (0, 1)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16])
def test_gpu_a_lone_layer_s_output_is_a_reduction_kernel_of_its_own_not_inside_rmsnorm(rows: int) -> None:
    """On CUDA in bf16 (rank 64, 2048 outputs: a TinyLlama o projection read by the residual
    add and RMSNorm): ``unrolled_output`` is a Triton reduction over the rank with programs
    across the outputs, launched before the reader's kernel (two Triton kernels, no GEMM), not
    a prologue of RMSNorm's one program per row; within bf16's rounding of the float32
    reference."""
    from torch._inductor.utils import run_and_get_code

    unrolled_expand.register()
    gen = torch.Generator().manual_seed(11)
    yh, bt, res = (
        torch.randn(*s, generator=gen, dtype=torch.float64).to(torch.bfloat16).cuda()
        for s in ((rows, 2048 + 64), (64, 2048), (rows, 2048))
    )
    w = torch.ones(2048, dtype=torch.bfloat16, device="cuda")
    torch._dynamo.reset()
    got, code = run_and_get_code(torch.compile(_with_output, fullgraph=True), yh, bt, res, w)
    f = [t.float() for t in (yh, bt, res, w)]
    want = _reader(f[0][:, :2048] + f[0][:, 2048:] @ f[1], torch.zeros_like(f[2]), f[2], f[3])
    assert float((got.float() - want).norm() / want.norm()) < 1e-2
    assert _launches(code) == (0, 2)
