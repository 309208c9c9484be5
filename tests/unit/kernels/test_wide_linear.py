"""The wide linear (``lorahot.kernels.wide_linear``) over ``[[W, B_s], [A, 0]]`` (B's columns
times their rank rows' scales): traced, the shrink then one GEMM over ``[x | h]``; eagerly, one
GEMM over ``[W; A]`` then the expand in place. Both against a float64 reference, with a
different scale on every rank row (a stack's rows: each part's own, zero on padding rows). It is
plain torch, so it runs on the CPU too; on CUDA its output is poisoned with NaN first.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo.testing
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lorahot.kernels import wide_linear as wide_kernel


def _operands(m: int, k: int, n: int, r: int, dtype: torch.dtype, device: str, seed: int) -> tuple[torch.Tensor, ...]:
    """``x, w, a, bt, s`` and the wide buffer ``[[w, (s[:, None] * bt).T], [a, 0]]`` as the
    runtime writes it (the product in float32, then rounded to the weights' dtype)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(m, k, device=device, dtype=dtype, generator=g)
    w = torch.randn(n, k, device=device, dtype=dtype, generator=g) / k**0.5
    a = torch.randn(r, k, device=device, dtype=dtype, generator=g) / k**0.5
    bt = torch.randn(r, n, device=device, dtype=dtype, generator=g) / r**0.5
    s = torch.empty(r, device=device, dtype=torch.promote_types(dtype, torch.float32)).uniform_(-2, 2, generator=g)
    s[::3] = 0.0
    wide = torch.zeros(n + r, k + r, device=device, dtype=dtype)
    wide[:n, :k], wide[:n, k:], wide[n:, :k] = w, (bt * s[:, None]).to(dtype).T, a
    return x, w, a, bt, s, wide


def _reference(x: torch.Tensor, w: torch.Tensor, a: torch.Tensor, bt: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    d = torch.Tensor.double
    return d(x) @ d(w).T + ((d(x) @ d(a).T) * d(s)) @ d(bt)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(0, 40),
    k=st.integers(1, 48),
    n=st.integers(1, 40),
    r=st.integers(1, 16),
    double=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(m=5, k=0, n=7, r=3, double=False, seed=0)  # no inputs (a shard's in may be 0): the bias alone
def test_matches_float64_reference_with_per_row_scales(m: int, k: int, n: int, r: int, double: bool, seed: int) -> None:
    dtype = torch.float64 if double else torch.float32
    x, w, a, bt, s, wide = _operands(m, k, n, r, dtype, "cpu", seed)
    bias = torch.randn(n, dtype=dtype)
    for b in (None, bias):
        y = wide_kernel.wide_linear(x, wide, b)  # eager: [W; A] then the expand in place
        assert y.shape == (m, n) and y.dtype == dtype
        if m:
            want = _reference(x, w, a, bt, s) + (0 if b is None else b.double())
            torch.testing.assert_close(y.double(), want, rtol=1e-4 if not double else 1e-10, atol=1e-4)
            traced = wide_kernel.wide_linear(x.requires_grad_(), wide, b)  # autograd records: [x | h] @ [W | B_s].T
            x.requires_grad_(False)
            torch.testing.assert_close(traced.double(), want, rtol=1e-4 if not double else 1e-10, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("m", "k", "n", "r"), [(1, 256, 512, 64), (300, 512, 256, 24), (1024, 2048, 2048, 64)])
def test_gpu_matches_float64_reference_output_poisoned(m: int, k: int, n: int, r: int, dtype: torch.dtype) -> None:
    x, w, a, bt, s, wide = _operands(m, k, n, r, dtype, "cuda", seed=m + r)
    torch.full((m * (n + k + r) + 1,), float("nan"), device="cuda", dtype=dtype)  # freed: the output reuses it
    ref = _reference(x, w, a, bt, s)
    y = wide_kernel.wide_linear(x, wide)  # eager: [W; A], the expand in place
    assert y.shape == (m, n) and torch.isfinite(y).all()
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2
    with torch.enable_grad():  # autograd records: the shrink, then one GEMM over [x | h]
        y = wide_kernel.wide_linear(x.clone().requires_grad_(), wide).detach()
    assert y.shape == (m, n) and y.is_contiguous() and torch.isfinite(y).all()
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 16, 100, 300])
def test_gpu_dynamic_op_runs_the_fused_kernel_into_the_wide_layout(m: int, dtype: torch.dtype) -> None:
    """On CUDA the dynamic operator runs the real fused kernel (split K included, over the
    weight's strided rows in the wide buffer) up to its row limits and the wide GEMMs above;
    output poisoned first."""
    x, w, a, bt, s, wide = _operands(m, 2048, 256, 64, dtype, "cuda", seed=m)
    torch.full((m * 256 * 4 + 1,), float("nan"), device="cuda", dtype=dtype)  # freed: the output reuses it
    y = wide_kernel.wide_linear_dynamic(x, wide, a, bt, s.float(), fused=True)
    assert y.shape == (m, 256) and torch.isfinite(y).all()
    assert m == 1 or y.stride(0) == 256 + 64  # (a dimension of size 1 reports the stride of a contiguous one)
    ref = _reference(x, w, a, bt, s)
    assert float((y.double() - ref).norm() / ref.norm()) < 1e-2


def test_compiled_it_is_library_calls_equal_to_the_eager_form() -> None:
    """Compiled (fullgraph), the formula is traced, not an opaque call: two products and a
    concatenation the compiler can have the input's producer write into. It equals the eager
    form to float32 rounding, for 2-D and 3-D inputs, with and without a bias."""
    x, *_, wide = _operands(6, 24, 16, 8, torch.float32, "cpu", seed=3)
    bias = torch.randn(16)
    graphs: list[torch.fx.GraphModule] = []

    def record(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]) -> torch.fx.GraphModule:
        graphs.append(gm)
        return gm

    compiled = torch.compile(lambda *t: wide_kernel.wide_linear(*t), backend=record, fullgraph=True)
    for xi in (x, x.reshape(2, 3, 24)):
        for b in (None, bias):
            want = wide_kernel.wide_linear(xi, wide, b)
            got = compiled(xi, wide, b)
            assert got.shape == want.shape == (*xi.shape[:-1], 16)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    calls = [node.target for gm in graphs for node in gm.graph.nodes if node.op == "call_function"]
    assert not any(isinstance(t, torch._ops.OpOverloadPacket | torch._ops.OpOverload) for t in calls)
    products = [t for t in calls if getattr(t, "__name__", "") in ("linear", "matmul")]
    assert len(products) == 2 * len(graphs)


def _aten_graph(fn: object, *args: torch.Tensor) -> tuple[list[str], list[torch.fx.GraphModule]]:
    """``fn`` compiled (fullgraph, AOTAutograd's inference graph recorded): the aten graph's
    nodes as ``target(constant args)``, and dynamo's graphs."""
    from torch._dynamo.backends.common import aot_autograd

    dynamo: list[torch.fx.GraphModule] = []
    aten: list[str] = []

    def forward(gm: torch.fx.GraphModule, _inputs: list[torch.Tensor]) -> torch.fx.GraphModule:
        aten.extend(f"{n.target}{[a for a in n.args if not isinstance(a, torch.fx.Node)]}" for n in gm.graph.nodes)
        return gm

    inner = aot_autograd(fw_compiler=forward)

    def backend(gm: torch.fx.GraphModule, inputs: list[torch.Tensor]) -> object:
        dynamo.append(gm)
        return inner(gm, inputs)

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=backend, fullgraph=True)(*args)
    return aten, dynamo


@pytest.mark.parametrize("lead", [(6,), (2, 3)], ids=["2-D", "3-D"])
def test_the_traced_operator_is_one_node_for_the_compiler_and_the_formula_after_it(lead: tuple[int, ...]) -> None:
    """``wide_traced`` (the form a compiled wide layer calls): dynamo records one node for it,
    where the formula inline (the negative control) is four to six operations; AOTAutograd's aten
    graph is the inline formula's, node for node, so the compiler passes that match it see the
    same graph. Its output is the formula's, bitwise, and it is differentiable (float64
    gradients against finite differences)."""
    x, _, a, *_, wide = _operands(6, 24, 16, 8, torch.float32, "cpu", seed=3)
    x, bias = x.reshape(*lead, 24), torch.randn(16)
    op_aten, op_dynamo = _aten_graph(wide_kernel.wide_traced, x, wide, bias, a)
    inline_aten, inline_dynamo = _aten_graph(wide_kernel.traced, x, wide, bias, a)
    calls = [n.target for n in op_dynamo[0].graph.nodes if n.op == "call_function"]
    assert calls == [torch.ops.lorahot.wide_traced]
    assert len([n for n in inline_dynamo[0].graph.nodes if n.op == "call_function"]) >= 4
    assert op_aten == inline_aten
    assert torch.equal(wide_kernel.wide_traced(x, wide, bias, a), wide_kernel.traced(x, wide, bias, a))
    args = tuple(t.double().requires_grad_() for t in (x, wide, bias, a))
    assert torch.autograd.gradcheck(wide_kernel.wide_traced, args)


@pytest.mark.parametrize("as_view", [False, True], ids=["the operator", "negative-control: a view of its output"])
def test_a_write_through_as_strided_into_the_output_compiles_as_on_a_plain_linear(as_view: bool) -> None:
    """On 2-D rows the traced operator returns the GEMM's output itself, as ``F.linear`` does,
    not a view of it: a model that writes into a layer's output through ``as_strided`` (a view
    chain of one, which the compiler accepts) compiles and equals the eager form, bitwise. The
    negative control takes a view of the output first, as the formula used to return: the
    compiler refuses the write (a mutation through ``as_strided`` on a view)."""
    x, _, a, *_, wide = _operands(6, 24, 16, 8, torch.float32, "cpu", seed=4)
    bias = torch.randn(16)

    def fn(x: torch.Tensor, wide: torch.Tensor, bias: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        y = wide_kernel.wide_traced(x, wide, bias, a)
        y = y.view(y.shape) if as_view else y
        torch.as_strided(y, (y.shape[0], 5), (y.stride(0), 1)).mul_(2.0)
        return y * 1.0

    want = fn(x, wide, bias, a)
    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    if as_view:
        with pytest.raises(Exception, match="as_strided"):
            compiled(x, wide, bias, a)
        return
    assert torch.equal(compiled(x, wide, bias, a), want)


def test_gradients_flow_eager_and_compiled() -> None:
    """Plain torch, so differentiable: float64 gradients match finite differences, eagerly and
    compiled."""
    x, *_, wide = _operands(3, 5, 4, 2, torch.float64, "cpu", seed=5)
    args = tuple(t.clone().requires_grad_() for t in (x, wide))
    assert torch.autograd.gradcheck(wide_kernel.wide_linear, args)
    compiled = torch.compile(wide_kernel.wide_linear, backend="aot_eager", fullgraph=True)
    assert torch.autograd.gradcheck(compiled, args)


@settings(max_examples=25, deadline=None)
@given(
    m=st.integers(0, 300),
    k=st.integers(1, 24),
    n=st.integers(1, 40),
    r=st.integers(1, 8),
    fused=st.booleans(),
    seed=st.integers(0, 2**16),
)
@example(m=5, k=0, n=7, r=3, fused=False, seed=0)
@example(m=5, k=0, n=7, r=3, fused=True, seed=0)
def test_dynamic_op_matches_float64_reference_on_either_path(
    m: int, k: int, n: int, r: int, fused: bool, seed: int
) -> None:
    """``lorahot::wide_linear_dynamic`` picks the fused kernel (here its CPU stand-in) or the
    wide GEMMs by the rows of each call; either way the result is the layer's formula, laid out
    as its fake says (row stride ``n + r``), so a compiled consumer reads it right."""
    x, w, a, bt, s, wide = _operands(m, k, n, r, torch.float64, "cpu", seed)
    y = wide_kernel.wide_linear_dynamic(x.reshape(1, m, k), wide, a, bt, s, fused=fused)
    assert y.shape == (1, m, n)
    if m > 1:  # a dimension of size 1 reports the stride of a contiguous one
        assert y.stride() == (m * (n + r), n + r, 1)
    if m:
        torch.testing.assert_close(y[0], _reference(x, w, a, bt, s), rtol=1e-10, atol=1e-10)


def test_dynamic_op_fake_agrees_with_the_real_output_and_refuses_gradients() -> None:
    """The fake gives the real output's shape and strides (a view of ``[rows, out + R]``) for
    inputs of one to four dimensions."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    for k in (12, 0):  # 0: no inputs
        x, *_, a, bt, s, wide = _operands(20, k, 10, 4, torch.float32, "cpu", seed=7)
        for shape in ((4, 5, k), (20, k), (2, 2, 5, k), (k,)):
            xs = x.reshape(*shape) if len(shape) > 1 else x[0]
            for fused in (False, True):
                torch.library.opcheck(
                    torch.ops.lorahot.wide_linear_dynamic.default,
                    (xs, wide, a, bt, s, fused),
                    test_utils=("test_schema", "test_faketensor"),
                )
            real = torch.ops.lorahot.wide_linear_dynamic(xs, wide, a, bt, s, False)
            with FakeTensorMode(allow_non_fake_inputs=True) as fake:
                fakes = [fake.from_tensor(t) for t in (xs, wide, a, bt, s)]
                made = torch.ops.lorahot.wide_linear_dynamic(*fakes, False)
            assert (made.shape, made.stride()) == (real.shape, real.stride())
    with pytest.raises(RuntimeError, match="no backward"):
        wide_kernel.wide_linear_dynamic(x.requires_grad_(), wide, a, bt, s, fused=False)


def test_compiled_with_symbolic_rows_the_op_takes_the_fused_path_only_where_it_pays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Compiled with dynamic shapes, one graph holds the op, and each call's rows choose the
    path at run time: the fused kernel up to its limit (16 rows into a wide output here), the
    wide GEMMs above."""
    from lorahot.kernels import lora_linear as fused_kernel

    paths: list[int] = []
    real = fused_kernel.lora_linear_into
    monkeypatch.setattr(fused_kernel, "lora_linear_into", lambda x2, *t: paths.append(x2.shape[0]) or real(x2, *t))
    *_, a, bt, s, wide = _operands(1, 12, 4096, 4, torch.float32, "cpu", seed=8)
    counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
    compiled = torch.compile(
        lambda x: wide_kernel.wide_linear_dynamic(x, wide, a, bt, s, fused=True), backend=counter, dynamic=True
    )
    for rows in (3, 16, 17, 200):
        x = torch.randn(rows, 12)
        want = wide_kernel.wide_linear_dynamic(x, wide, a, bt, s, fused=False)
        torch.testing.assert_close(compiled(x), want, rtol=1e-4, atol=1e-4)
    assert counter.frame_count == 1
    assert paths == [3, 16]  # the compiled calls of up to 16 rows (the eager reference is the wide path)
