"""The compiler pass that gives layers sharing an input one shrink GEMM
(:mod:`lorahot.kernels.stacked_shrinks`).

Compiled with inductor on the CPU: the generated code is counted (one ``mm`` for the run of
q, k and v where they had three), the outputs are held to a float64 eager reference through
swaps with ``error_on_recompile=True``, and the pass is switched off as a negative control. The
same block on CUDA (wide layers, CUDA graphs) runs with the GPU tests.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch._inductor import config as inductor_config
from torch._inductor.utils import run_and_get_code

import lorahot
from lorahot.kernels import extern_inputs, stacked_routed, stacked_shrinks, unrolled_expand, wide_groups
from lorahot.runtime import wide
from tests.helpers import make_adapter

pytestmark = pytest.mark.usefixtures("fresh_compiler")  # tests/unit/kernels/conftest.py

D, R = 32, 8
NAMES = ["q", "k", "v", "o"]


class _Attention(nn.Module):
    """q, k and v over one input (a SiLU's output, as a norm feeds them), o over another."""

    def __init__(self, gap: bool = False) -> None:
        super().__init__()
        self.q = nn.Linear(D, D)
        if gap:  # a layer between q and k in module order: their A rows are not neighbours
            self.gate = nn.Linear(D, D)
        self.k = nn.Linear(D, D)
        self.v = nn.Linear(D, D)
        self.o = nn.Linear(D, D)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.silu(x)
        y = self.q(h) * self.k(h) + self.v(h)
        if hasattr(self, "gate"):
            y = y * torch.sigmoid(self.gate(x))
        return self.o(y)


def _inject(
    model: nn.Module, names: list[str], wide_layers: bool, monkeypatch: pytest.MonkeyPatch
) -> lorahot.LoraRuntime:
    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"} if wide_layers else {"cuda"})
    _groups_off(monkeypatch)
    return lorahot.inject(model, names, max_rank=R, extras=False)


def _groups_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Compiled in default mode, the members of a wide group run as one GEMM with no shrink of
    their own (:mod:`lorahot.kernels.wide_groups`, tested there): off here, where the shrinks
    are the subject."""
    monkeypatch.setattr(wide_groups, "ENABLED", False)


def _mm_counts(model: nn.Module, x: torch.Tensor) -> tuple[int, int, torch.Tensor]:
    with torch.no_grad():
        out, code = run_and_get_code(torch.compile(model), x)
    src = "\n".join(code)
    return src.count("extern_kernels.mm("), src.count("extern_kernels.addmm("), out


@pytest.mark.parametrize(
    ("wide_layers", "dtype"),
    [(True, torch.float64), (False, torch.float64), (True, torch.float16)],
    ids=["wide", "library-formula", "wide-float16"],
)
def test_layers_sharing_an_input_share_one_shrink(
    wide_layers: bool, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    """q, k and v read one input and their A rows are neighbours in the arena: one shrink for
    the three, one for o; without the pass (the negative control) four. The output matches the
    eager model's, and after two swaps it still does, with no recompile. float16 wide layers'
    shrinks read the runtime's contiguous copy of their shifted A rows
    (``lorahot.kernels.wide_linear.SHIFTED_DTYPES``), laid out as the arena's, and are stacked
    alike (their output within float16's rounding)."""
    counts = {}
    tol = 1e-9 if dtype == torch.float64 else 1e-2
    for passes in (True, False):
        torch._dynamo.reset()
        inductor_config.post_grad_custom_pre_pass = None
        torch.manual_seed(0)
        model = _Attention().to(dtype)
        runtime = _inject(model, NAMES, wide_layers, monkeypatch)
        if dtype == torch.float16:
            assert all(model.get_submodule(n)._shift_at is not None for n in NAMES)
        if not passes:
            stacked_shrinks.uninstall()
        adapters = [make_adapter(model, dict.fromkeys(NAMES, r), seed=s)[0] for r, s in ((4, 0), (8, 1), (2, 2))]
        adapters = [{k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in ad.items()} for ad in adapters]
        runtime.load(adapters[0])
        x = torch.randn(2, 5, D, dtype=torch.float64).to(dtype)
        mm, addmm, out = _mm_counts(model, x)
        counts[passes] = mm
        with torch.no_grad():
            torch.testing.assert_close(out, _eager(model, x), rtol=tol, atol=tol)
            compiled = torch.compile(model)
            with torch._dynamo.config.patch(error_on_recompile=True):
                for adapter in adapters[1:]:
                    runtime.load(adapter)
                    torch.testing.assert_close(compiled(x), _eager(model, x), rtol=tol, atol=tol)
        assert addmm == 4  # the base GEMMs (the wide ones take the expand too)
        lorahot.eject(model)
    expands = 0 if wide_layers else 4  # the library formula's expands are mm too
    assert counts == {True: 2 + expands, False: 4 + expands}


def _eager(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(x)
    return out


def test_layers_whose_a_rows_are_not_neighbours_keep_their_own_shrinks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LoRA layer over another input between q and k in module order (and so in the arena):
    only k and v are stacked, and the output is still the eager one."""
    torch.manual_seed(0)
    model = _Attention(gap=True).double()
    names = ["q", "gate", "k", "v", "o"]
    runtime = _inject(model, names, True, monkeypatch)
    runtime.load(make_adapter(model, dict.fromkeys(names, 4))[0])
    x = torch.randn(2, 5, D, dtype=torch.float64)  # the shape of the other static tests: kernels built once
    mm, _, out = _mm_counts(model, x)
    assert mm == 4  # q, gate, k+v, o
    torch.testing.assert_close(out, _eager(model, x), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("wide_layers", [True, False], ids=["wide", "library-formula"])
def test_a_symbolic_row_count_stacks_the_same_shrinks(wide_layers: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Under dynamic shapes the row count is a symbol of the graph: the same stacking, one
    graph for both sizes, each output the eager one."""
    torch.manual_seed(0)
    model = _Attention().double()
    runtime = _inject(model, NAMES, wide_layers, monkeypatch)
    runtime.load(make_adapter(model, dict.fromkeys(NAMES, 4))[0])
    compiled = torch.compile(model, dynamic=True)
    with torch.no_grad():
        for rows in (3, 11):
            x = torch.randn(rows, D, dtype=torch.float64)
            out, code = run_and_get_code(compiled, x) if rows == 3 else (compiled(x), [])
            if code and wide_layers:  # (the library formula's expands take other forms here)
                assert "\n".join(code).count("extern_kernels.mm(") == 2
            torch.testing.assert_close(out, _eager(model, x), rtol=1e-9, atol=1e-9)


# On a diffusers UNet the pass removes three shrinks per transformer block (self-attention's q,
# k and v; cross-attention's k and v over the text states): asserted with the extern-input
# rewrite, which runs in the same compile, in
# tests/unit/kernels/test_extern_inputs.py::test_a_diffusers_unet_rewrites_the_projections_after_attention.


def test_a_model_without_lorahot_layers_compiles_to_the_same_code() -> None:
    """The pass is process-wide: a plain model whose q, k and v share an input (their weights
    graph inputs, as parameters are) keeps its three GEMMs, and its generated code is the same
    with the pass as without."""
    torch.manual_seed(0)
    model = _Attention().double()
    x = torch.randn(2, 5, D, dtype=torch.float64)  # the shape of the other static tests: kernels built once
    codes = []
    for installed in (False, True):
        torch._dynamo.reset()
        inductor_config.post_grad_custom_pre_pass = None
        if installed:
            stacked_shrinks.install()
        with torch.no_grad():
            out, code = run_and_get_code(torch.compile(model), x)
        torch.testing.assert_close(out, _eager(model, x))
        codes.append("\n".join(line for line in "\n".join(code).splitlines() if "extern_kernels" in line))
    assert codes[0] == codes[1] and codes[0].count("extern_kernels.addmm(") == 4


def test_install_is_idempotent_runs_a_pass_installed_before_it_and_uninstalls(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen = []

    class Before:
        def __call__(self, graph: torch.fx.Graph) -> None:
            seen.append(len(graph.nodes))

        def uuid(self) -> str:
            return "before"

    before = Before()
    defaults = (("ENABLED", True), ("SUMS", True), ("MEMBERS", True), ("LONE", False), ("LONE_SUMS", False))
    for switch, value in (*defaults, ("REDUCED", True), ("ROWS", 128)):
        monkeypatch.setattr(unrolled_expand, switch, value)  # their defaults, whatever the environment set
    monkeypatch.setattr(wide_groups, "ACCUMULATE", False)
    inductor_config.post_grad_custom_pre_pass = before
    monkeypatch.setattr(inductor_config, "joint_custom_post_pass", before)
    stacked_shrinks.install()
    installed = inductor_config.post_grad_custom_pre_pass
    joint = inductor_config.joint_custom_post_pass
    stacked_shrinks.install()
    assert inductor_config.post_grad_custom_pre_pass is installed
    assert isinstance(installed, stacked_shrinks.StackShrinks) and installed.before is before
    assert inductor_config.joint_custom_post_pass is joint  # the default-mode lowering, in the joint-graph passes
    assert isinstance(joint, stacked_shrinks.JointLowering) and joint.before is before
    assert joint.uuid() == installed.uuid()
    # the input rewrite (on by default), the routed shrinks' stacking (off by default), the wide
    # groups (on by default), their row limit, their one-buffer switch (on), the joined expands
    # at symbolic rows (off) and the accumulated expands (off), the unrolled expands (on, their
    # row and rank limits, the one buffer's sums on, group members unrolled, lone layers not,
    # nor summed by kernels of their own, the expands lowered as reductions),
    # the live wide layers' geometries, the pass before; the default-mode lowering in the
    # joint-graph passes (on) after the accumulated expands
    geometries = repr(extern_inputs.signatures())

    def uuid(*on: object, early: bool = True) -> tuple[object, ...]:
        return (*on[:7], early, *on[7:], geometries, "before")

    unrolled = (True, 128, 64, True, True, False, False, True)
    assert installed.uuid()[1:] == uuid(True, False, True, 512, True, False, False, *unrolled)
    monkeypatch.setattr(extern_inputs, "ENABLED", False)
    # a graph compiled without it is another graph
    assert installed.uuid()[1:] == uuid(False, False, True, 512, True, False, False, *unrolled)
    monkeypatch.setattr(unrolled_expand, "ENABLED", False)  # and so is one compiled without the unrolled expands
    assert installed.uuid()[1:] == uuid(
        False, False, True, 512, True, False, False, False, 128, 64, True, True, False, False, True
    )
    monkeypatch.setattr(unrolled_expand, "ENABLED", True)
    monkeypatch.setattr(unrolled_expand, "MEMBERS", False)  # or with only lone layers' expands unrolled
    monkeypatch.setattr(unrolled_expand, "LONE", True)
    assert installed.uuid()[1:] == uuid(
        False, False, True, 512, True, False, False, True, 128, 64, True, False, True, False, True
    )
    monkeypatch.setattr(unrolled_expand, "LONE", False)  # or with lone layers' outputs summed by kernels of their own
    monkeypatch.setattr(unrolled_expand, "LONE_SUMS", True)
    assert installed.uuid()[1:] == uuid(
        False, False, True, 512, True, False, False, True, 128, 64, True, False, False, True, True
    )
    monkeypatch.setattr(unrolled_expand, "LONE_SUMS", False)
    monkeypatch.setattr(unrolled_expand, "REDUCED", False)  # or with the expands elementwise
    monkeypatch.setattr(unrolled_expand, "SUMS", False)  # and the one buffer's sums off
    assert installed.uuid()[1:] == uuid(
        False, False, True, 512, True, False, False, True, 128, 64, False, False, False, False, False
    )
    monkeypatch.setattr(unrolled_expand, "REDUCED", True)
    monkeypatch.setattr(unrolled_expand, "SUMS", True)
    monkeypatch.setattr(unrolled_expand, "MEMBERS", True)
    monkeypatch.setattr(unrolled_expand, "LONE", False)
    monkeypatch.setattr(stacked_routed, "ENABLED", True)
    assert installed.uuid()[1:] == uuid(False, True, True, 512, True, False, False, *unrolled)
    monkeypatch.setattr(wide_groups, "ENABLED", False)
    monkeypatch.setattr(wide_groups, "ROWS", 64)
    monkeypatch.setattr(wide_groups, "ONE_BUFFER", False)
    monkeypatch.setattr(wide_groups, "JOIN_SYMBOLIC", True)
    monkeypatch.setattr(wide_groups, "ACCUMULATE", True)
    assert installed.uuid()[1:] == uuid(False, True, False, 64, False, True, True, *unrolled)
    monkeypatch.setattr(wide_groups, "EARLY", False)  # lowered in the post-grad pass: another graph
    assert installed.uuid()[1:] == uuid(False, True, False, 64, False, True, True, *unrolled, early=False)
    # an earlier pass without an id turns inductor's cache off, as it would on its own
    assert stacked_shrinks.StackShrinks(lambda graph: None).uuid() is None
    assert stacked_shrinks.StackShrinks([before, before]).uuid()[18:] == ("before", "before")
    graph = torch.fx.Graph()
    graph.output(graph.placeholder("x"))
    installed(graph)
    assert seen == [2]
    stacked_shrinks.StackShrinks([before, before])(graph)  # a list, as inductor also takes
    assert seen == [2, 2, 2]
    joint(graph)
    assert seen == [2, 2, 2, 2]
    stacked_shrinks.uninstall()
    assert inductor_config.post_grad_custom_pre_pass is before and inductor_config.joint_custom_post_pass is before
    stacked_shrinks.uninstall()  # nothing of ours left: a no-op
    assert inductor_config.post_grad_custom_pre_pass is before and inductor_config.joint_custom_post_pass is before


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_wide_layers_sharing_an_input_follow_swaps(mode: str) -> None:
    """The same block on CUDA in bf16 (wide layers; CUDA graphs in reduce-overhead) with 512
    rows (past the fused kernel's): the stacked shrink gives the eager model's output through
    swaps, no recompile."""
    torch.manual_seed(0)
    model = _Attention().cuda().to(torch.bfloat16)
    runtime = lorahot.inject(model, NAMES, max_rank=R, extras=False)
    adapters = [make_adapter(model, dict.fromkeys(NAMES, r), seed=s)[0] for r, s in ((4, 0), (8, 1))]
    runtime.load(adapters[0])
    x = torch.randn(512, D, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, mode=None if mode == "default" else mode)
    with torch.no_grad():
        compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for adapter in adapters:
                runtime.load(adapter)
                got = compiled(x).float().clone()
                want = _eager(model, x).float()
                assert float((got - want).norm() / want.norm()) < 1e-2
