"""Refusing a forward (lorahot.layers.refusal): eagerly a plain UsageError; under torch.compile
a UsageError from the compiled graph on every call, while the graphs compiled for inputs that
fit keep serving them with no recompile."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo
from torch import nn

import lorahot
from lorahot.layers.refusal import refuse
from tests.helpers import make_adapter


def test_eagerly_it_raises_at_once_naming_the_shapes_without_computing_the_stand_in() -> None:
    def never() -> torch.Tensor:
        raise AssertionError("the stand-in is for tracing only")

    with pytest.raises(lorahot.UsageError, match=r"^no: \(2, 3\) \{literal\}$"):
        refuse("no: {0} {{literal}}", never, torch.empty(2, 3))


def _routed() -> tuple[nn.Module, lorahot.LoraRuntime]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)).eval()
    runtime = lorahot.inject(model, ["0", "2"], max_rank=2, slots=2)
    runtime.load(make_adapter(model, {"0": 2, "2": 1}, seed=1)[0], slot=0)
    return model, runtime


@pytest.mark.parametrize("backend", ["eager", "aot_eager", "inductor"])
def test_a_compiled_model_refuses_a_misfit_every_time_and_keeps_its_graphs(backend: str) -> None:
    """A batch that does not fit the routing raises UsageError from the compiled model, twice
    in a row, naming the layer; the routing that fits then runs again under
    ``error_on_recompile`` with the same output. Negative control: a change that does need a
    graph (whole-batch mode, first time) is caught as a recompile."""
    dynamo.reset()
    model, runtime = _routed()
    compiled = torch.compile(model, backend=backend)
    x = torch.randn(4, 8)
    with torch.no_grad():
        runtime.activate([0, -1, 0, 0])
        want = compiled(x).clone()
        runtime.activate([0, -1, 0])  # not one slot for every row, which would run as the whole batch
        for _ in range(2):
            with pytest.raises(
                lorahot.UsageError, match=r"^0 \(LoRALinear over Linear \(8 -> 8\)\): its input \(4, 8\)"
            ):
                compiled(x)
        with dynamo.config.patch(error_on_recompile=True):
            runtime.activate([0, -1, 0, 0])
            assert torch.equal(compiled(x), want)
            runtime.activate([-1, 0, 0, -1])
            compiled(x)  # a new routing of the same length: the same graph
            runtime.activate(0)
            with pytest.raises(Exception, match=r"[Rr]ecompil"):
                compiled(x)
    dynamo.reset()


class _Unused(nn.Module):
    """A model that feeds one layer a sequence-first view and uses only its output's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, int]:
        return self.a(x), self.b(x.transpose(0, 1)).shape[0]


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_refusal_whose_result_nothing_uses_still_raises_when_compiled(backend: str) -> None:
    """The refusing op is side-effecting: the compiler keeps it though the layer's output is
    dead (only its shape read)."""
    dynamo.reset()
    torch.manual_seed(0)
    model = _Unused().eval()
    runtime = lorahot.inject(model, ["a", "b"], max_rank=2, slots=2)
    runtime.load(make_adapter(model, {"a": 2, "b": 2}, seed=1)[0], slot=0)
    runtime.activate([0, -1, 0, 0])
    x = torch.randn(4, 3, 8)
    with torch.no_grad():
        for run in (model, torch.compile(model, backend=backend)):
            with pytest.raises(lorahot.UsageError, match=r"^b \(LoRALinear.*its input \(3, 4, 8\)"):
                run(x)
    dynamo.reset()


@pytest.mark.gpu
def test_gpu_reduce_overhead_refuses_a_misfit_and_replays_its_graph_after() -> None:
    """Under CUDA graphs (the refusing graph is not captured: its op is tagged
    ``cudagraph_unsafe``): the misfit raises twice, then the captured graph of the routing
    that fits replays with no recompile and the same output."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64)).eval().cuda().half()
    rt = lorahot.inject(model, ["0", "2"], max_rank=4, slots=2)
    rt.load(make_adapter(model, {"0": 4, "2": 2}, seed=1, dtype=torch.float16)[0], slot=0)
    compiled = torch.compile(model, mode="reduce-overhead")
    x = torch.randn(4, 64, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        rt.activate([0, -1, 0, 0])
        for _ in range(3):  # warm-up and capture
            want = compiled(x).clone()
        rt.activate([0, -1, 0])
        for _ in range(2):
            with pytest.raises(lorahot.UsageError, match=r"^0 \(LoRALinear"):
                compiled(x)
        with dynamo.config.patch(error_on_recompile=True):
            rt.activate([0, -1, 0, 0])
            torch.testing.assert_close(compiled(x), want, rtol=1e-3, atol=1e-3)  # the shrink adds in any order
    dynamo.reset()


def test_under_dynamic_shapes_the_message_names_the_shapes_of_each_call_and_the_graphs_stay() -> None:
    """With the batch size symbolic, each refusal names its own call's shapes (filled in when
    the graph raises), and a batch that fits afterwards runs with no recompile."""
    dynamo.reset()
    model, runtime = _routed()
    compiled = torch.compile(model, backend="aot_eager", dynamic=True)
    with torch.no_grad():
        for rows in (4, 6):
            runtime.activate([0, -1] * (rows // 2))
            compiled(torch.randn(rows, 3, 8))
        for rows, length in ((4, 3), (6, 5), (10, 7)):
            runtime.activate([-1] + [0] * (length - 1))
            with pytest.raises(
                lorahot.UsageError, match=rf"its input \({rows}, 3, 8\) does not fit a routing of {length} "
            ):
                compiled(torch.randn(rows, 3, 8))
        with dynamo.config.patch(error_on_recompile=True):
            runtime.activate([0, -1, 0, 0, 0])
            compiled(torch.randn(5, 3, 8))
    dynamo.reset()
