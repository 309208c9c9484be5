"""``launched_per_call``: a compile without CUDA graphs is told apart at trace time, and there the
fused layers take the compiler's own formulas (checked on the CPU with the fused kernel replaced
by a counting stand-in operator)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

import lorahot
from lorahot.kernels import compile_mode
from lorahot.kernels import lora_linear as fused_kernel
from lorahot.kernels import routed_lora as routed_kernel
from lorahot.runtime import wide
from tests.helpers import make_adapter, model_reference, save_peft


def _signed(x: torch.Tensor) -> torch.Tensor:
    return x + 1 if compile_mode.launched_per_call() else x - 1


@pytest.mark.parametrize(
    ("options", "per_call"),
    [
        ({}, True),  # default mode
        ({"mode": "max-autotune-no-cudagraphs"}, True),
        ({"mode": "reduce-overhead"}, False),
        ({"options": {"triton.cudagraphs": True}}, False),
        ({"backend": "aot_eager"}, False),  # not inductor: the backend's graphs are unknown
    ],
)
def test_it_reads_the_backend_s_cuda_graphs_at_trace_time(options: dict[str, object], per_call: bool) -> None:
    torch._dynamo.reset()
    compiled = torch.compile(_signed, **options)  # type: ignore[arg-type]
    x = torch.zeros(3)
    assert torch.equal(compiled(x), x + (1 if per_call else -1))
    with torch._dynamo.config.patch(error_on_recompile=True):  # a constant of the graph, not a guard
        assert torch.equal(compiled(x), x + (1 if per_call else -1))
    assert not compile_mode.launched_per_call()  # eagerly


def _tuned(x: torch.Tensor) -> torch.Tensor:
    return x + 1 if compile_mode.autotunes_gemms() else x - 1


@pytest.mark.parametrize(
    ("options", "tuned"),
    [
        ({}, False),  # default mode
        ({"mode": "max-autotune-no-cudagraphs"}, True),
        ({"mode": "max-autotune"}, True),
        ({"options": {"max_autotune_gemm": True}}, True),
        ({"mode": "reduce-overhead"}, False),
        ({"backend": "aot_eager"}, False),  # not inductor
    ],
)
def test_it_reads_max_autotune_s_gemm_templates_at_trace_time(options: dict[str, object], tuned: bool) -> None:
    """Where inductor autotunes its GEMMs (the layers' per-row formulas then take no batched
    products on the CPU: :func:`lorahot.layers.routing.batched_products`), a constant of the graph."""
    torch._dynamo.reset()
    compiled = torch.compile(_tuned, **options)  # type: ignore[arg-type]
    x = torch.zeros(3)
    assert torch.equal(compiled(x), x + (1 if tuned else -1))
    with torch._dynamo.config.patch(error_on_recompile=True):
        assert torch.equal(compiled(x), x + (1 if tuned else -1))
    assert not compile_mode.autotunes_gemms()  # eagerly


def test_where_the_backend_s_options_cannot_be_read_inductor_s_global_setting_answers() -> None:
    """``torch._dynamo.optimize("inductor")`` states no options: with inductor's global
    ``max_autotune`` set it autotunes all the same, and the answer is True there."""
    torch._dynamo.reset()
    x = torch.zeros(3)
    with torch._inductor.config.patch(max_autotune=True):
        assert torch.equal(torch._dynamo.optimize("inductor")(_tuned)(x), x + 1)
        assert not compile_mode.autotunes_gemms()  # eagerly
    torch._dynamo.reset()
    assert torch.equal(torch._dynamo.optimize("inductor")(_tuned)(x), x - 1)
    torch._dynamo.reset()


_CALLS = {"n": 0}


@torch.library.custom_op("lorahot_test::fused_standin", mutates_args=())
def _fused_standin(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor, bt: torch.Tensor, s: torch.Tensor
) -> torch.Tensor:
    _CALLS["n"] += 1
    return nn.functional.linear(x, weight, bias) + ((x @ a.T) * s) @ bt


@_fused_standin.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, *_: object) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


@pytest.fixture
def fused_on_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The layers' fused path on the CPU: the kernel's support checks pass and its operator is
    a stand-in that counts its calls."""
    monkeypatch.setattr(fused_kernel, "supports", lambda *args: True)
    monkeypatch.setattr(routed_kernel, "available", lambda: True)
    monkeypatch.setattr(fused_kernel, "lora_linear", lambda *args: torch.ops.lorahot_test.fused_standin(*args))
    _CALLS["n"] = 0
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("widened", [False, True])
@pytest.mark.parametrize(("mode", "standin_calls"), [(None, False), ("reduce-overhead", True)])
def test_compiled_without_cuda_graphs_the_layers_leave_the_fused_operator(
    fused_on_cpu: None,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    mode: str | None,
    standin_calls: bool,
    widened: bool,
) -> None:
    """Default mode: the library formula, or the wide layer's GEMMs (layers widened on the CPU
    as on CUDA); under CUDA graphs (``reduce-overhead``, which the CPU runs without them) and
    eagerly, the fused operator."""
    if widened:
        monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8)).eval()
    tensors, ab = make_adapter(model, {"0": 8, "2": 8})
    save_peft(tmp_path / "a", tensors, r=8, lora_alpha=16)
    want = model_reference(model, torch.randn(2, 16, generator=torch.Generator().manual_seed(1)), {
        name: (a, b, 2.0) for name, (a, b) in ab.items()
    })  # fmt: skip
    runtime = lorahot.inject(model, ["0", "2"], max_rank=8)
    runtime.load(str(tmp_path / "a"))
    assert all(layer.fused and layer.wide == widened for layer in runtime.layers.values())
    x = torch.randn(2, 16, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    compiled = torch.compile(model, mode=mode)
    with torch.no_grad():
        compiled(x)
        _CALLS["n"] = 0
        with torch._dynamo.config.patch(error_on_recompile=True):
            got = compiled(x)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert (_CALLS["n"] > 0) == standin_calls  # per call: the stand-in ran in the compiled graph, or not
    with torch.no_grad():  # eagerly the fused path stays
        _CALLS["n"] = 0
        torch.testing.assert_close(model(x).double(), want, rtol=1e-5, atol=1e-5)
    assert _CALLS["n"] == 2


def test_default_mode_compiles_one_graph_for_every_row_count_where_the_kernel_would_choose(
    fused_on_cpu: None, tmp_path: Path
) -> None:
    """Dynamic shapes, layers fused but not widened: in default mode the fused kernel's row
    limits are never asked, so the compiler does not guard on them and one graph serves row
    counts on both sides of them, as for the base model; under CUDA graphs the kernel's choice
    by rows still splits them (the negative control)."""
    from torch._dynamo.utils import counters

    def graphs(model: nn.Module, mode: str | None) -> int:
        torch._dynamo.reset()
        counters.clear()
        compiled = torch.compile(model, mode=mode, dynamic=True)
        with torch.no_grad():
            for rows in (2, 3, 8, 17, 40, 130, 300, 5):
                compiled(torch.randn(rows, 16))
        return int(counters["stats"]["unique_graphs"])

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8)).eval()
    model = nn.Sequential(nn.Linear(16, 24), nn.Tanh(), nn.Linear(24, 8)).eval()
    model.load_state_dict(base.state_dict())
    tensors, _ = make_adapter(model, {"0": 8, "2": 8})
    save_peft(tmp_path / "a", tensors, r=8, lora_alpha=16)
    runtime = lorahot.inject(model, ["0", "2"], max_rank=8)
    runtime.load(str(tmp_path / "a"))
    assert all(layer.fused and not layer.wide for layer in runtime.layers.values())
    assert graphs(model, None) == graphs(base, None)
    assert graphs(model, "reduce-overhead") > graphs(base, "reduce-overhead")
