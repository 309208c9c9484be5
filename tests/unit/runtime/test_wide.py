"""The wide layers: base weight and ``scale * B`` in one buffer, kept equal to the live adapter.

Widening is a CUDA path; these tests widen CPU layers too (``DEVICE_TYPES``), float16 ones
included (their rank rows shifted, ``lorahot.kernels.wide_linear.SHIFTED_DTYPES``), to check the
mechanism against dense float64 references after every kind of runtime operation.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lorahot
from lorahot.runtime import wide

IN, HID, OUT, R = 12, 20, 7, 8


@pytest.fixture(autouse=True)
def widen_on_cpu(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(wide, "DEVICE_TYPES", {"cpu", "cuda"})
    yield


def _model(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(IN, HID), nn.GELU(), nn.Linear(HID, OUT, bias=False)).to(dtype)


def _adapter(rank: int, seed: int, alpha: float) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, (fin, fout) in {"0": (IN, HID), "2": (HID, OUT)}.items():
        out[f"{name}.lora_A.weight"] = torch.randn(rank, fin, generator=g, dtype=torch.float64)
        out[f"{name}.lora_B.weight"] = torch.randn(fout, rank, generator=g, dtype=torch.float64)
    out["alpha"] = alpha  # type: ignore[assignment]
    return out


def _load(runtime: lorahot.LoraRuntime, adapter: dict, **kwargs: object) -> lorahot.AdapterInfo:
    tensors = {k: v for k, v in adapter.items() if k != "alpha"}
    rank = tensors["0.lora_A.weight"].shape[0]
    return runtime.load(tensors, config={"r": rank, "lora_alpha": adapter["alpha"]}, **kwargs)


def _reference(weights: dict[str, torch.Tensor], adapter: dict | None, scale: float, x: torch.Tensor) -> torch.Tensor:
    """Dense float64: ``W + scale * alpha / r * B @ A`` per layer, then the model."""

    def w(name: str) -> torch.Tensor:
        base = weights[f"{name}.weight"].double()
        if adapter is None:
            return base
        a, b = adapter[f"{name}.lora_A.weight"], adapter[f"{name}.lora_B.weight"]
        return base + scale * float(adapter["alpha"]) / a.shape[0] * (b @ a)

    h = torch.nn.functional.gelu(x @ w("0").T + weights["0.bias"].double())
    return h @ w("2").T


def test_inject_widens_in_place_and_eject_gives_the_weight_its_storage_back() -> None:
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    param = model[0].weight
    runtime = lorahot.inject(model, ["0", "2"], max_rank=R)
    layer = model[0]
    assert layer.wide and model[2].wide
    assert layer.weight is param  # the same parameter object, now a view into the wide buffer
    wide_buffer = layer._buffers["_lora_wide"]
    assert param.data_ptr() == wide_buffer.data_ptr() and wide_buffer.shape == (HID + R, IN + R)
    assert param.stride() == (IN + R, 1)  # the weight's rows, B's scaled columns beside them, A beneath
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    _load(runtime, _adapter(4, 1, 8.0))
    runtime.eject()
    assert model[0].weight is param
    assert param.untyped_storage().nbytes() == param.numel() * param.element_size()  # its own storage again
    assert param.is_contiguous()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_a_widened_weight_is_saved_as_the_view_it_is(tmp_path: Path) -> None:
    """The state-dict entry of a widened weight is the parameter's own strided view (it aliases
    the model, as a state dict does), ``torch.save`` round-trips its values, and safetensors'
    ``save_file`` refuses it with its own error until made contiguous (the README says so)."""
    from safetensors.torch import load_file, save_file

    model = _model()
    runtime = lorahot.inject(model, ["0", "2"], max_rank=R)
    _load(runtime, _adapter(4, 1, 4.0))
    state = model.state_dict()
    weight = state["0.weight"]
    assert weight.data_ptr() == model[0].weight.data_ptr() and weight.stride() == (IN + R, 1)
    torch.save(state, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=True)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    with pytest.raises(ValueError, match="non contiguous"):
        save_file(state, str(tmp_path / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    assert all(torch.equal(t, state[k]) for k, t in load_file(str(tmp_path / "model.safetensors")).items())


OPS = st.one_of(
    st.tuples(st.just("load"), st.integers(0, 1), st.integers(1, R), st.floats(-2, 2)),
    st.tuples(st.just("activate"), st.integers(0, 1)),
    st.tuples(st.just("scale"), st.integers(0, 1), st.floats(-3, 3)),
    st.tuples(st.just("unload"), st.integers(0, 1)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(OPS, min_size=1, max_size=8), seed=st.integers(0, 10_000))
def test_every_operation_leaves_the_output_of_the_live_slot(ops: list[tuple], seed: int) -> None:
    model = _model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    runtime = lorahot.inject(model, ["0", "2"], max_rank=R, slots=2)
    held: list[tuple[dict, float] | None] = [None, None]  # adapter, user scale
    active = 0
    x = torch.randn(5, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    for k, op in enumerate(ops):
        if op[0] == "load":
            _, slot, rank, scale = op
            adapter = _adapter(rank, seed + k, alpha=2.0 * rank)
            _load(runtime, adapter, slot=slot, scale=scale)
            held[slot] = (adapter, scale)
        elif op[0] == "activate":
            runtime.activate(op[1])
            active = op[1]
        elif op[0] == "scale":
            if held[op[1]] is None:
                continue
            runtime.set_scale(op[2], slot=op[1])
            held[op[1]] = (held[op[1]][0], op[2])  # type: ignore[index]
        else:
            runtime.unload(op[1])
            held[op[1]] = None
        live = held[active]
        with torch.no_grad():
            got = model(x)
        want = _reference(weights, None if live is None else live[0], 0.0 if live is None else live[1], x)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-10), (k, op)


def test_a_rank_8_swap_after_a_rank_2_one_clears_the_stale_rows() -> None:
    model = _model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    runtime = lorahot.inject(model, ["0", "2"], max_rank=R)
    x = torch.randn(3, IN, dtype=torch.float64)
    for rank in (8, 2, 5, 1):
        adapter = _adapter(rank, rank, alpha=float(rank))
        _load(runtime, adapter)
        with torch.no_grad():
            assert torch.allclose(model(x), _reference(weights, adapter, 1.0, x), rtol=1e-10, atol=1e-10)
        layer = model[0]
        assert torch.count_nonzero(layer.wide_rows()[rank:]) == 0
        assert torch.equal(layer.wide_a_rows(), layer.lora_A)  # A beneath the weight: the live A, zero past the rank
        assert torch.count_nonzero(layer.wide_a_rows()[rank:]) == 0


def test_a_failed_load_leaves_every_wide_buffer_bitwise_unchanged() -> None:
    model = _model()
    runtime = lorahot.inject(model, ["0", "2"], max_rank=R)
    _load(runtime, _adapter(4, 1, 4.0))
    before = [t.clone() for m in (model[0], model[2]) for t in m._buffers.values() if t is not None]
    bad = _adapter(8, 2, 8.0)
    bad["2.lora_B.weight"][3, 1] = math.nan
    with pytest.raises(lorahot.AdapterReadError):
        _load(runtime, bad)
    after = [t for m in (model[0], model[2]) for t in m._buffers.values() if t is not None]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))


def test_a_scale_that_would_overflow_the_scaled_rows_is_refused_before_anything_changes() -> None:
    model = _model(torch.float16)
    runtime = lorahot.inject(model, ["0", "2"], max_rank=R)
    adapter = {k: v.half() if isinstance(v, torch.Tensor) else v for k, v in _adapter(4, 1, 4.0).items()}
    adapter["0.lora_B.weight"][0, 0] = 1000.0
    _load(runtime, adapter)
    rows = model[0].wide_rows().clone()
    with pytest.raises(lorahot.UsageError, match=r"0: scale=100 .*float16"):
        runtime.set_scale(100.0)
    assert torch.equal(model[0].wide_rows(), rows) and runtime.info().scale == 1.0
    with pytest.raises(lorahot.UsageError, match="scale of at most"):
        _load(runtime, adapter, scale=-80.0)
    assert torch.equal(model[0].wide_rows(), rows)


def test_set_scale_refuses_exactly_what_the_full_range_checks_refuse() -> None:
    """The memoized range check of set_scale (one product per part and limit) against the full
    checks it stands in for, at weights on both sides of every part's limit: the same verdict,
    and a refused weight changes nothing."""
    model = _model(torch.float16)
    runtime = lorahot.inject(model, ["0", "2"], max_rank=R)
    parts = []
    for rank, seed, alpha, big in ((4, 1, 4.0, 1000.0), (3, 2, 12.0, 300.0)):
        adapter = {k: v.half() if isinstance(v, torch.Tensor) else v for k, v in _adapter(rank, seed, alpha).items()}
        adapter["0.lora_B.weight"][0, 0] = big
        tensors = {k: v for k, v in adapter.items() if k != "alpha"}
        parts.append(lorahot.read_adapter(tensors, config={"r": rank, "lora_alpha": alpha}))
    runtime.load(parts, scale=[1.0, 1.0])
    stack = runtime._stacks[0]
    assert stack is not None
    runtime._within_range(stack, (1.0, 1.0))
    limits = [min(top / largest for largest, top in mine.tops) for mine in runtime._ranges[1]]  # type: ignore[index]
    # the scale and wide checks alone (test_updates.py checks the summed update's range)
    with pytest.MonkeyPatch.context() as updates:
        updates.setattr(runtime._updates, "fits", lambda *a: True)
        updates.setattr(runtime._updates, "check", lambda *a: None)
        for p in range(2):
            for f in (0.999, 1.0, 1.001, -1.0, -1.001):
                weights = [0.5, 0.5]
                weights[p] = limits[p] * f
                fast = runtime._within_range(stack, tuple(weights))
                try:
                    with pytest.MonkeyPatch.context() as m:  # the full checks alone
                        m.setattr(runtime, "_within_range", lambda *a: False)
                        runtime._check_scales(stack, tuple(weights))
                    full = True
                except lorahot.UsageError:
                    full = False
                assert fast == full, (p, f)
                rows = model[0].wide_rows().clone()
                if not full:
                    with pytest.raises(lorahot.UsageError, match="scale of at most"):
                        runtime.set_scale(weights)
                    assert torch.equal(model[0].wide_rows(), rows)
                else:
                    runtime.set_scale(weights)


def test_weights_that_share_memory_or_subclasses_are_not_widened() -> None:
    class Shifted(nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) + 1.0

    shared = nn.Linear(IN, IN).double()
    model = nn.Sequential(shared, nn.Linear(IN, IN).double(), Shifted(IN, IN).double())
    model[1].weight = shared.weight  # tied: the first layer widens, the tied one stays as it is
    runtime = lorahot.inject(model, ["0", "1", "2"], max_rank=R)
    assert [model[i].wide for i in range(3)] == [True, False, False]
    assert model[1].weight is model[0].weight
    x = torch.randn(2, IN, dtype=torch.float64)
    w, b0, b1 = shared.weight.detach().clone(), model[0].bias.detach(), model[1].bias.detach()
    with torch.no_grad():
        want = model[2].base_layer((x @ w.T + b0) @ w.T + b1)
        assert torch.allclose(model(x), want, rtol=1e-12, atol=1e-12)
    runtime.eject()
    assert model[1].weight is model[0].weight


def test_a_replaced_weight_is_caught_before_the_next_operation() -> None:
    """A new parameter for a wide layer's weight is refused where it is assigned
    (``tests/unit/layers/test_replaced_weight.py``); new storage under the same parameter
    (``.data``) is caught by the runtime's next operation."""
    model = _model()
    runtime = lorahot.inject(model, ["0", "2"], max_rank=R)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorahot.UsageError, match="replaced after inject"):
        model.load_state_dict(state, assign=True)
    with torch.no_grad():
        model[2].base_layer.weight.data = model[2].base_layer.weight.detach().clone()
    with pytest.raises(lorahot.UsageError, match="replaced"):
        _load(runtime, _adapter(2, 1, 2.0))


def test_fused_false_and_merged_mode_do_not_widen() -> None:
    for kwargs in ({"fused": False}, {"merged": True}):
        model = _model()
        lorahot.inject(model, ["0", "2"], max_rank=R, **kwargs)
        assert not model[0].wide and not model[2].wide


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [8, 300])  # the fused kernel's size, then the wide GEMM's
def test_gpu_wide_layers_under_cuda_graphs_follow_every_swap(rows: int) -> None:
    torch.manual_seed(0)
    dims = (256, 512, 256)
    model = nn.Sequential(nn.Linear(dims[0], dims[1]), nn.GELU(), nn.Linear(dims[1], dims[2], bias=False))
    model = model.to("cuda", torch.bfloat16)
    weights = {k: v.double() for k, v in model.state_dict().items()}
    runtime = lorahot.inject(model, ["0", "2"], max_rank=64, slots=2)
    assert model[0].wide and model[2].wide
    x = torch.randn(rows, dims[0], device="cuda", dtype=torch.bfloat16)

    def adapter(rank: int, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
        g = torch.Generator().manual_seed(seed)
        ab = {
            n: (torch.randn(rank, fin, generator=g) / fin**0.5, torch.randn(fout, rank, generator=g) / rank**0.5)
            for n, (fin, fout) in {"0": dims[:2], "2": dims[1:]}.items()
        }
        tensors = {f"{n}.lora_{k}.weight": t for n, (a, b) in ab.items() for k, t in (("A", a), ("B", b))}
        return tensors, ab

    def expected(ab: dict, scale: float) -> torch.Tensor:
        def w(n: str) -> torch.Tensor:
            a, b = ab.get(n, (torch.zeros(1, 1), torch.zeros(1, 1)))
            delta = (b.double() @ a.double()).cuda() if n in ab else 0.0
            return weights[f"{n}.weight"] + scale * delta

        h = torch.nn.functional.gelu(x.double() @ w("0").T + weights["0.bias"])
        return h @ w("2").T

    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):
            compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            (t8, ab8), (t64, ab64) = adapter(8, 1), adapter(64, 2)
            runtime.load(t8, config={"r": 8, "lora_alpha": 16}, slot=0)
            runtime.load(t64, config={"r": 64, "lora_alpha": 64}, slot=1)
            for slot, ab, scale in ((0, ab8, 2.0), (1, ab64, 1.0), (0, ab8, 2.0)):
                runtime.activate(slot)
                want = expected(ab, scale)
                got = compiled(x).double()
                assert float((got - want).norm() / want.norm()) < 1e-2, (rows, slot)
            runtime.set_scale(-0.5)
            want = expected(ab8, -1.0)
            assert float((compiled(x).double() - want).norm() / want.norm()) < 1e-2
            runtime.unload(0)
            want = expected({}, 0.0)
            assert float((compiled(x).double() - want).norm() / want.norm()) < 1e-2


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [8, 300])  # the fused kernel's size, then the wide GEMM's
def test_gpu_wide_layers_holding_a_stack_follow_every_reweighting(rows: int) -> None:
    """Two adapters in one slot on bf16 CUDA layers: the wide columns hold each rank row of B
    times its own scale (checked against float64), and the compiled model (CUDA graphs) follows
    every re-weighting without recompiling."""
    torch.manual_seed(0)
    dims = (256, 512, 256)
    model = nn.Sequential(nn.Linear(dims[0], dims[1]), nn.GELU(), nn.Linear(dims[1], dims[2], bias=False))
    model = model.to("cuda", torch.bfloat16)
    weights = {k: v.double() for k, v in model.state_dict().items()}
    runtime = lorahot.inject(model, ["0", "2"], max_rank=64)
    g = torch.Generator().manual_seed(1)
    parts = []
    for rank, alpha in ((24, 48.0), (40, 10.0)):
        ab = {
            n: (torch.randn(rank, fin, generator=g) / fin**0.5, torch.randn(fout, rank, generator=g) / rank**0.5)
            for n, (fin, fout) in {"0": dims[:2], "2": dims[1:]}.items()
        }
        tensors = {f"{n}.lora_{k}.weight": t for n, (a, b) in ab.items() for k, t in (("A", a), ("B", b))}
        parts.append((lorahot.read_adapter(tensors, config={"lora_alpha": alpha}), ab, alpha / rank))
    runtime.load([p for p, _, _ in parts], scale=[1.0, 1.0])
    x = torch.randn(rows, dims[0], device="cuda", dtype=torch.bfloat16)

    def expected(ws: list[float]) -> torch.Tensor:
        def w(n: str) -> torch.Tensor:
            delta = sum(wt * s * (ab[n][1].double() @ ab[n][0].double()) for (_, ab, s), wt in zip(parts, ws))
            return weights[f"{n}.weight"] + delta.cuda()

        h = torch.nn.functional.gelu(x.double() @ w("0").T + weights["0.bias"])
        return h @ w("2").T

    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):
            compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for ws in ([1.0, 1.0], [0.5, -2.0], [0.0, 1.5]):
                runtime.set_scale(ws)
                layer = runtime.layers["0"]
                scaled = layer.lora_B.double() * layer.lora_scale.double()[:, None]
                torch.testing.assert_close(layer.wide_rows().double(), scaled, rtol=1e-2, atol=1e-3)
                assert layer.lora_scale[:24].unique().tolist() == [ws[0] * 2.0]
                got = compiled(x).double()
                assert torch.isfinite(got).all()
                want = expected(ws)
                assert float((got - want).norm() / want.norm()) < 1e-2, (rows, ws)


def test_inject_under_inference_mode_then_swaps_outside_it() -> None:
    model = _model()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.inference_mode():
        runtime = lorahot.inject(model, ["0", "2"], max_rank=R)
    adapter = _adapter(3, 5, 6.0)
    _load(runtime, adapter)
    x = torch.randn(4, IN, dtype=torch.float64)
    with torch.inference_mode():
        assert torch.allclose(model(x), _reference(weights, adapter, 1.0, x), rtol=1e-10, atol=1e-10)
    runtime.eject()


class _OneMemory(nn.Module):
    """Two Linears whose weights are two parameters over one tensor's memory (tied through
    ``.data``, not as one parameter), or one Linear with a buffer that views its weight."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first, self.second = nn.Linear(IN, HID).double(), nn.Linear(IN, HID).double()
        if kind == "two parameters":
            self.second.weight = nn.Parameter(self.first.weight.data)
        else:
            self.register_buffer("transposed", self.first.weight.data.t(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.first(x) + self.second(x)


@pytest.mark.parametrize("kind", ["two parameters", "a buffer viewing it"])
def test_a_weight_whose_memory_another_tensor_holds_is_not_widened(kind: str) -> None:
    """Widening moves the weight into the wide buffer; another parameter or buffer over the
    same memory kept the old one: an edit or a checkpoint load through it no longer reached the
    layer, eject did not tie them again, and the model computed otherwise than the base would
    after that edit (silently). Such a weight keeps its memory; the layer takes the library
    formula, against the float64 reference."""
    model = _OneMemory(kind)
    holder = model.second.weight if kind == "two parameters" else model.transposed
    runtime = lorahot.inject(model, ["first"], max_rank=R)
    assert not model.first.wide
    assert holder.data_ptr() == model.first.weight.data_ptr()
    tensors = {k.replace("0.", "first.", 1): v for k, v in _adapter(4, 1, 8.0).items() if k.startswith("0.")}
    runtime.load(tensors, config={"r": 4, "lora_alpha": 8.0})
    with torch.no_grad():
        w = 2.0 * model.first.weight
        holder.mul_(2.0)  # an edit through the other tensor reaches the layer's weight
        assert torch.equal(model.first.weight, w)
        x = torch.randn(3, IN, dtype=torch.float64)
        a, b = tensors["first.lora_A.weight"], tensors["first.lora_B.weight"]
        want = x @ (w + 2.0 * b @ a).T + model.first.bias + model.second(x)
        torch.testing.assert_close(model(x), want)
    runtime.eject()
    assert holder.data_ptr() == model.first.weight.data_ptr()


def test_a_float16_shift_bound_from_max_a_alone_is_tightened_from_the_rows() -> None:
    """The wide range check multiplies ``scale * max|B|`` by a bound on the float16 rows' shift
    (``LoadPlan.a_shift``). From ``max|A|`` alone (twice the row length times it) one large value
    in a row of small ones would bound the shift at 16384 and refuse this adapter's ``B`` of
    100; from the rows themselves the shift is 32, so the load goes through and the output is the
    float64 reference's. A scale past what the exact shift allows is still refused, nothing changed."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 16, bias=False)).to(torch.float16)
    weight = model[0].weight.detach().double().clone()
    a = torch.full((4, 512), 1e-3, dtype=torch.float64)
    a[:, 0] = 10.0
    b = torch.randn(16, 4, dtype=torch.float64)
    b[0, 0] = 100.0
    runtime = lorahot.inject(model, ["0"], max_rank=R)
    tensors = {"0.lora_A.weight": a.half(), "0.lora_B.weight": b.half()}
    runtime.load(tensors, config={"r": 4, "lora_alpha": 4})
    plan = runtime._stacks[0].parts[0]  # type: ignore[union-attr]
    assert float(plan.a_shift[0][0]) == 32.0  # 2 * (10 + 511e-3), rounded up, with the margin
    x = torch.randn(8, 512, dtype=torch.float64)
    with torch.no_grad():
        got = model(x.half()).double()
    want = x @ (weight + b.half().double() @ a.half().double()).t()
    assert torch.allclose(got, want, rtol=4e-3, atol=4e-3 * float(want.abs().max()))
    rows = model[0].wide_rows().clone()
    with pytest.raises(lorahot.UsageError, match=r"dtype=torch\.float32"):
        runtime.set_scale(30.0)  # 100 * 30 * 32 > 65504
    assert torch.equal(model[0].wide_rows(), rows)


def test_nbytes_counts_float16s_copy_of_the_shifted_rows() -> None:
    """A float16 runtime's ``nbytes`` holds the contiguous copy of the shifted A rows the
    compiled shrink reads (one region of the arena's A), beside the wide buffers' blocks."""
    sizes = {}
    for dtype in (torch.bfloat16, torch.float16):
        runtime = lorahot.inject(_model(dtype), ["0", "2"], max_rank=R)
        sizes[dtype] = runtime.nbytes - runtime.buffers.nbytes
    region = runtime.buffers.arenas[0].A.shape[1] * 2
    assert sizes[torch.float16] == sizes[torch.bfloat16] + region
