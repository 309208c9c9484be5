"""One validation path for ``load`` and ``preload``, and every scale checked against its buffer.

``alpha / r`` from the file and the user's multiplier on top must fit the scale buffers'
dtype; the weights' values must fit the arena's dtype. ``load`` and ``preload`` accept and
refuse exactly the same adapters (checked by :func:`lorahot.runtime.plan.validate`).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing._internal.two_tensor import TwoTensor

import lorahot
from lorahot.adapter import LoraModule, WeightModule
from lorahot.layers.base import LayerSpec, Shard
from lorahot.runtime.plan import check_extras, check_weight_module
from tests.helpers import make_adapter, save_peft, tiny_lm
from tests.reliability_helpers import Q0, V1, assert_unchanged, build_rig, snapshot, valid_tensors


def _both(rig, source, **kwargs) -> list:
    """The calls that must agree: load into either slot, and preload."""
    return [
        lambda: rig.runtime.load(source, slot=0, **kwargs),
        lambda: rig.runtime.load(source, slot=1, **kwargs),
        lambda: rig.runtime.preload(source, **kwargs),
    ]


# -- scales ------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [1e300, -1e300])
def test_alpha_overflowing_the_scale_buffer_is_a_read_error(tmp_path: Path, alpha: float) -> None:
    rig = build_rig(tmp_path / "rig")
    source = save_peft(tmp_path / "ad", valid_tensors(rig.model, 4), r=4, lora_alpha=abs(alpha))
    before = snapshot(rig)
    for call in _both(rig, source):
        with pytest.raises(
            lorahot.AdapterReadError,
            match=r"layers\.0\.self_attn\.q_proj \(.*\): alpha 1e\+300 over rank 4 gives scale 2\.5e\+299, beyond "
            r"the range of the torch\.float32 scale buffer \(max 3\.403e\+38\); the alpha is corrupt",
        ):
            call()
        assert_unchanged(rig, before)


def test_alpha_below_the_scale_buffers_normal_range_is_a_read_error(tmp_path: Path) -> None:
    """A scale ``alpha / r`` under float32's smallest normal number (1.2e-38) would be kept
    with fewer significant bits (1e-44 is 7 steps of 1.4e-45: 2% off, which the forward and
    merged mode's GEMM both multiply by); where factors of 1e22 make the update visible,
    that was a silent error of 2% of the LoRA's output (the next test)."""
    rig = build_rig(tmp_path / "rig")
    source = save_peft(tmp_path / "ad", valid_tensors(rig.model, 4), r=4, lora_alpha=4e-40)
    before = snapshot(rig)
    for call in _both(rig, source):
        with pytest.raises(
            lorahot.AdapterReadError,
            match=r"layers\.0\.self_attn\.q_proj \(.*\): alpha 4e-40 over rank 4 gives scale 1e-40, below the "
            r"smallest normal number of the torch\.float32 scale buffer \(1\.175e-38\), where it would lose its "
            r"precision; the alpha is corrupt",
        ):
            call()
        assert_unchanged(rig, before)


@pytest.mark.parametrize("merged", [False, True], ids=["unmerged", "merged"])
def test_a_scale_below_the_scale_buffers_normal_range_is_refused_and_the_smallest_normal_one_computes(
    merged: bool,
) -> None:
    """Factors of 1e22 at ``alpha / r`` 1e-30 make an update of order 10 in float32 at a user
    scale of 3e-14: one that takes ``alpha / r`` below float32's smallest normal number is
    refused (at 3e-14 it computed the update 2% off, unmerged and merged: max abs diff 0.67
    from the float64 reference on outputs of 35), nothing changed; one just above it
    computes to float32's rounding."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 4))
    w, b = model[0].weight.detach().double().clone(), model[0].bias.detach().double().clone()
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 8, generator=g, dtype=torch.float64) * 1e22
    bb = torch.randn(4, 2, generator=g, dtype=torch.float64) * 1e22
    x = torch.randn(3, 8, generator=g)
    runtime = lorahot.inject(model, ["0"], max_rank=2, merged=merged)
    tensors = {"0.lora_A.weight": a.float(), "0.lora_B.weight": bb.float()}
    runtime.load(tensors, config={"r": 2, "lora_alpha": 2e-30})  # alpha / r = 1e-30

    def reference(scale: float) -> torch.Tensor:
        delta = 1e-30 * scale * (bb.float().double() @ a.float().double())
        return x.double() @ (w + delta).T + b

    with torch.no_grad():
        kept = model(x)
    for scale in (3e-14, -1e-9):
        with pytest.raises(lorahot.UsageError, match=r"below the smallest normal number of the torch\.float32 scale"):
            runtime.set_scale(scale)
        with pytest.raises(lorahot.UsageError, match=r"where it would lose its precision"):
            runtime.load(tensors, config={"r": 2, "lora_alpha": 2e-30}, scale=scale)
        with torch.no_grad():
            assert torch.equal(model(x), kept)
    for scale in (2e-8, 0.0):  # 2e-38: float32's smallest normal is 1.18e-38
        runtime.set_scale(scale)
        want = reference(scale)
        with torch.no_grad():
            got = model(x).double()
        assert (got - want).abs().max() <= 1e-5 * want.abs().max(), (scale, (got - want).abs().max())


def test_alpha_that_fits_float64_scales_loads_into_float64_buffers() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4).double())
    runtime = lorahot.inject(model, ["0"], max_rank=2)
    runtime.load(make_adapter(model, {"0": 2}, seed=1, dtype=torch.float64)[0], config={"lora_alpha": 1e300})
    assert set(runtime.layers["0"].lora_scale.tolist()) == {5e299}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            lambda rt, t: rt.set_scale(1e39),
            r"scale=1e\+39 times the adapter's largest alpha/r \(2\) is 2e\+39, beyond the range of the torch\.float32 "
            r"scale buffers \(max 3\.403e\+38\)\. Pass a scale of at most 1\.701e\+38 in magnitude\.",
        ),
        (lambda rt, t: rt.set_scale(-2e38), r"scale=-2e\+38 times the adapter's largest alpha/r \(2\) is -4e\+38"),
        (lambda rt, t: rt.load(t, scale=1e39), r"scale=1e\+39 times the adapter's largest alpha/r \(1\) is 1e\+39"),
        (lambda rt, t: rt.load(rt.preload(t), slot=1, scale=-1e39), r"scale=-1e\+39 times .* is -1e\+39"),
        (lambda rt, t: rt.set_scale(10**400), r"scale=1000000000.* is too large for a float; pass a finite number"),
        (lambda rt, t: rt.load(t, scale=10**400), r"scale=1000000000.* is too large for a float"),
        (lambda rt, t: rt.set_scale(float("inf")), r"scale=inf must be finite"),
        (lambda rt, t: rt.set_scale("2.0"), r"scale='2\.0' is not a number: pass a finite real number"),
        (lambda rt, t: rt.set_scale(True), r"scale=True is not a number"),
        (
            lambda rt, t: rt.set_scale(torch.tensor(2.0)),
            r"^scale=tensor\(2\.\) is a 0-d Tensor, not a number: pass a Python float \(scale=float\(value\)\)\.$",
        ),
    ],
    ids=[
        "set_1e39",
        "set_negative",
        "load",
        "load_prepared",
        "set_10e400",
        "load_10e400",
        "inf",
        "str",
        "bool",
        "tensor",
    ],
)
def test_user_scale_out_of_range_is_a_usage_error(tmp_path: Path, call, message: str) -> None:
    rig = build_rig(tmp_path / "rig")
    tensors = valid_tensors(rig.model, 4)  # no config: alpha = rank, scale 1; the rig's slot 0 has alpha/r = 2
    before = snapshot(rig)
    with pytest.raises(lorahot.UsageError, match=message):
        call(rig.runtime, tensors)
    after = snapshot(rig)
    before.cache_keys = after.cache_keys  # load_prepared preloads first: only the cache may differ
    assert_unchanged(rig, before)
    assert bool(torch.isfinite(rig.output()).all())


# -- one validation path -------------------------------------------------------------------------


def _fp16_rig(tmp_path: Path):
    rig = build_rig(tmp_path / "rig")
    rig.model.half()
    model = lorahot.eject(rig.model)
    rig.runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=8, slots=2)
    return rig


@pytest.mark.parametrize("value", [65519.0, 70000.0, float("inf")], ids=["rounds_to_max", "overflows", "inf"])
def test_load_and_preload_refuse_the_same_fp16_overflow(tmp_path: Path, value: float) -> None:
    """65519 rounds to fp16's max, 65504, when converted; it is beyond the range all the same,
    and both paths say so (before, preload's host pack let it through and load refused it)."""
    rig = _fp16_rig(tmp_path)
    tensors = valid_tensors(rig.model, 4)
    tensors[f"base_model.model.{V1}.lora_B.weight"][0, 0] = value
    before = snapshot(rig)
    lines = (
        rf"NaN or Inf in LoRA weights of:\n  - {V1}"
        if value == float("inf")
        else rf"LoRA weights or updates out of the LoRA buffers' range:\n  - {V1}: "
        r"largest \|value\| 65519 > float16 max 65504\nInject with dtype=torch\.float32"
        if value < 65520
        else r"out of the LoRA buffers' range:\n  - .*v_proj: largest \|value\| 70000 > float16 max 65504\n"
        r"Inject with dtype=torch\.float32"
    )
    for call in _both(rig, tensors):
        with pytest.raises(lorahot.AdapterReadError, match=lines):
            call()
        assert_unchanged(rig, before)


@pytest.mark.parametrize(("value", "refused"), [(300.0, True), (100.0, False)], ids=["product-overflows", "fits"])
def test_factors_in_range_whose_update_is_not_are_refused_by_load_and_preload(
    tmp_path: Path, value: float, refused: bool
) -> None:
    """float16 buffers: A and B each in range (300 < 65504), but ``B @ A`` reaches 4 * 300^2 =
    360000, so every forward computed inf; accepted, silently. It is refused, naming the layer
    and the value, nothing changed; at 100 (``B @ A`` 40000) the adapter loads and the output is
    finite."""
    rig = _fp16_rig(tmp_path)
    tensors = valid_tensors(rig.model, 4)
    tensors[f"base_model.model.{V1}.lora_A.weight"].fill_(value)
    tensors[f"base_model.model.{V1}.lora_B.weight"].fill_(value)
    before = snapshot(rig)
    for call in _both(rig, tensors):
        if not refused:
            call()
            assert bool(torch.isfinite(rig.output()).all())
            continue
        with pytest.raises(
            lorahot.AdapterReadError,
            match=rf"out of the LoRA buffers' range:\n  - {re.escape(V1)}: its update scale \* B @ A "
            r"reaches \|value\| 360000 > float16 max 65504 \(each factor is in range\)\n"
            r"Inject with dtype=torch\.float32 \(LoRA buffers of float32's range",
        ):
            call()
        assert_unchanged(rig, before)
    if refused:  # the fix the message names: the adapter is not corrupt, float32 buffers hold it
        wide = lorahot.inject(lorahot.eject(rig.model), ["q_proj", "v_proj"], max_rank=8, dtype=torch.float32)
        assert wide.load(tensors).ranks[V1] == 4


@pytest.mark.parametrize(("value", "refused"), [(200.0, True), (150.0, False)], ids=["product-overflows", "fits"])
def test_a_grouped_convs_update_is_checked_group_by_group(value: float, refused: bool) -> None:
    """float16 conv with groups 2, rank 4: each output group takes 2 of A's rows, so ``B @ A``
    reaches 2 * 200^2 = 80000 per group. The read computed no product for a grouped conv (0) and
    accepted it; it is refused, nothing changed, by load and preload. At 150 (45000, over the
    rank-wide bound 90000) it loads and the output is finite."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, groups=2).half())
    runtime = lorahot.inject(model, ["0"], max_rank=4, slots=2)
    adapter = {
        "base_model.model.0.lora_A.weight": torch.full((4, 4, 3, 3), value, dtype=torch.float16),
        "base_model.model.0.lora_B.weight": torch.full((8, 2, 1, 1), value, dtype=torch.float16),
    }
    x = torch.full((1, 4, 5, 5), 1e-4, dtype=torch.float16)  # small: no intermediate overflows
    with torch.no_grad():
        y0 = model(x)
    before = snapshot_of(runtime)
    calls = (lambda: runtime.load(adapter), lambda: runtime.load(adapter, slot=1), lambda: runtime.preload(adapter))
    for call in calls:
        if not refused:
            call()
            with torch.no_grad():
                assert bool(torch.isfinite(model(x)).all())
            continue
        with pytest.raises(
            lorahot.AdapterReadError,
            match=r"out of the LoRA buffers' range:\n  - 0: its update scale \* B @ A reaches \|value\| "
            r"80000 > float16 max 65504 \(each factor is in range\)\nInject with dtype=torch\.float32",
        ):
            call()
        assert snapshot_of(runtime) == before
        assert runtime.info(0) is None and not runtime.cache.keys()
        with torch.no_grad():
            assert torch.equal(model(x), y0)


def test_tensors_that_require_grad_load_and_preload_alike(tmp_path: Path) -> None:
    rig = build_rig(tmp_path / "rig")
    tensors = {k: v.clone().requires_grad_(True) for k, v in valid_tensors(rig.model, 4).items()}
    rig.runtime.load(tensors, slot=1)
    loaded = rig.runtime.buffers.arenas[0].A[1].clone(), rig.runtime.buffers.arenas[0].B[1].clone()
    rig.runtime.unload(1)
    rig.runtime.load(rig.runtime.preload(tensors), slot=1)
    assert torch.equal(rig.runtime.buffers.arenas[0].A[1], loaded[0])
    assert torch.equal(rig.runtime.buffers.arenas[0].B[1], loaded[1])
    assert not any(t.requires_grad for a in rig.runtime.buffers.arenas for t in (a.A, a.B, a.S))


def test_preloaded_adapter_loads_bitwise_like_a_direct_load(tmp_path: Path) -> None:
    rig = build_rig(tmp_path / "rig")
    tensors = valid_tensors(rig.model, 3, names=(Q0, V1))
    rig.runtime.load(tensors, slot=1, scale=0.5)
    direct = [t.clone() for a in rig.runtime.buffers.arenas for t in (a.A, a.B, a.S)]
    rig.runtime.unload(1)
    rig.runtime.load(rig.runtime.preload(tensors), slot=1, scale=0.5)
    assert all(
        torch.equal(t, u) for t, u in zip((t for a in rig.runtime.buffers.arenas for t in (a.A, a.B, a.S)), direct)
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_largest_values_on_the_cpu_are_the_infinity_norms(dtype: torch.dtype) -> None:
    """The CPU's max|x| (one aminmax per tensor) equals the infinity norm the other devices
    take, NaN, Inf, a negative extreme, a transposed view and an empty tensor included."""
    from lorahot.runtime.plan import _max_abs

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(4, 6, generator=gen).to(dtype) for _ in range(6)]
    tensors[1][2, 3] = float("nan")
    tensors[2][0, 0] = float("inf")
    tensors[3][1, 1] = float("-inf")
    tensors[4][3, 5] = -1000.0
    tensors[5] = tensors[5].t()
    tensors.append(torch.empty(0, 3, dtype=dtype))
    got = _max_abs(tensors)
    expected = [float(torch.linalg.vector_norm(t.double(), float("inf"))) if t.numel() else 0.0 for t in tensors]
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=0, atol=0, equal_nan=True)


# -- a file loaded again is planned from its skeleton ------------------------------------------


def _plan_fields(plan) -> tuple:
    """Everything a plan holds, modules by their key and tensors' values."""

    def module(m) -> tuple:
        return m.key, m.A.tolist(), m.B.tolist(), m.alpha, m.use_rslora, m.source_keys

    return (
        [(n, module(m)) for n, m in plan.targets.items()],
        [[(i, m.key) for i, m in e] for e in plan.entries],
        [s.tolist() for s in plan.scales],
        plan.largest,
        plan.source,
        plan.ranks,
        plan.nbytes,
        plan.delta_bound,
        [s.tolist() for s in plan.scaled_b],
        plan.skipped,
        plan.weights,
        plan.dora,
    )


@pytest.mark.parametrize("strict", [True, False])
def test_a_file_loaded_again_is_planned_from_its_skeleton_as_in_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, strict: bool
) -> None:
    """The second load and preload of a file take the plan of its recipe's skeleton (plan_load
    does not run), and every plan equals plan_load's, skipped keys (strict=False) included. (A
    load's plan is compared as it was written: the runtime then forgets its values.)"""
    import lorahot.runtime.lora_runtime as runtime_module
    import lorahot.runtime.plan as plan_module

    rig = build_rig(tmp_path / "rig")
    names = (Q0, V1) if strict else (Q0, V1, "layers.1.self_attn.k_proj")  # k_proj is not injected
    tensors = valid_tensors(rig.model, 4, names=names)
    source = save_peft(tmp_path / "ad", tensors, r=4, lora_alpha=2.0)
    planned: list[object] = []
    written: list[tuple[object, tuple]] = []
    full, forget = plan_module.plan_load, runtime_module.forget_values
    monkeypatch.setattr(plan_module, "plan_load", lambda *args: planned.append(full(*args)) or planned[-1])

    def forget_values(plan: plan_module.LoadPlan) -> None:
        written.append((plan, _plan_fields(plan)))
        forget(plan)

    monkeypatch.setattr(runtime_module, "forget_values", forget_values)
    rig.runtime.load(source, strict=strict)
    rig.runtime.load(source, slot=1, strict=strict)
    prepared = rig.runtime.preload(source, strict=strict).plan
    assert len(planned) == 1 and len(written) == 2  # plan_load: the first load's
    assert written[0][0] is planned[0] and written[1][0] is not planned[0]
    for fields in [written[1][1], _plan_fields(prepared)]:
        assert fields == written[0][1]
    assert rig.runtime._stacks[1].parts[0].skipped == (() if strict else tuple(k for k in tensors if "k_proj" in k))


def test_values_are_checked_on_every_load_of_a_planned_file(tmp_path: Path) -> None:
    """New values under the same header (a NaN, a value beyond float16) are refused though the
    plan comes from the skeleton; nothing changes."""
    rig = _fp16_rig(tmp_path)
    tensors = valid_tensors(rig.model, 4)
    source = save_peft(tmp_path / "ad", tensors, r=4, lora_alpha=8.0)
    rig.runtime.load(source, slot=1)
    before = snapshot(rig)
    for value, message in ((float("nan"), "NaN or Inf in LoRA weights of"), (70000.0, "buffers. range")):
        bad = {k: v.clone() for k, v in tensors.items()}
        bad[f"base_model.model.{V1}.lora_B.weight"][0, 0] = value
        save_peft(tmp_path / "ad", bad, r=4, lora_alpha=8.0)
        for call in _both(rig, source):
            with pytest.raises(lorahot.AdapterReadError, match=message):
                call()
            assert_unchanged(rig, before)


def test_an_adapter_changed_after_it_was_read_is_planned_in_full(tmp_path: Path) -> None:
    """An Adapter passed to load is planned as it is now, even if it was read from a file whose
    recipe has a skeleton: a module taken out of it leaves its layer empty."""
    rig = build_rig(tmp_path / "rig")
    source = save_peft(tmp_path / "ad", valid_tensors(rig.model, 4), r=4, lora_alpha=2.0)
    rig.runtime.load(source, slot=1)
    adapter = lorahot.read_adapter(source)
    del adapter.modules[next(k for k in adapter.modules if "v_proj" in k)]
    info = rig.runtime.load(adapter, slot=1)
    assert set(info.ranks) == {Q0}
    arena, index = rig.runtime.buffers.where[V1]
    a_rows, b_rows = rig.runtime.buffers.arenas[arena].rows(index, 1)
    assert not a_rows.any() and not b_rows.any()


@pytest.mark.parametrize("merged", [True, False])
@pytest.mark.parametrize(
    "factors",
    [
        {"lora_unet_0.diff": torch.tensor(0.5)},
        {"lora_unet_0.lokr_w1": torch.tensor(0.5), "lora_unet_0.lokr_w2": torch.tensor(0.5)},
    ],
    ids=["diff", "lokr"],
)
def test_zero_dimensional_weight_factors_are_a_mismatch_naming_their_shape(factors: dict, merged: bool) -> None:
    model = torch.nn.Sequential(torch.nn.Linear(16, 24))
    runtime = lorahot.inject(model, ["0"], max_rank=8, merged=merged)
    x = torch.randn(2, 16)
    before = model(x)
    for call in (runtime.load, runtime.preload):
        with pytest.raises(lorahot.AdapterMismatchError, match=r"make a weight of shape \(\), expected \(24, 16\)"):
            call(factors)
    assert torch.equal(model(x), before)


def test_factors_below_the_buffers_smallest_normal_are_refused_unless_kept_in_float32() -> None:
    """float16 keeps a few bits of a value under 6.1e-5 and none under 6e-8: an A of 1e-8
    (with a B large enough to matter) would lose its update there, where PEFT computes it in
    float32."""
    model = tiny_lm(dtype=torch.float16)
    names = ["layers.0.self_attn.q_proj"]
    tensors = make_adapter(model, dict.fromkeys(names, 2), seed=1, dtype=torch.float32)[0]
    tiny = {k: v * (1e-8 if ".lora_A." in k else 1e6) for k, v in tensors.items()}
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4)
    before = snapshot_of(runtime)
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"below the smallest normal float16 \(6\.1e-05\).*\n  - "
        r"layers\.0\.self_attn\.q_proj: largest \|value\| \d\.\d+e-0\d\nInject with dtype=torch\.float32",
    ):
        runtime.load(tiny)
    assert snapshot_of(runtime) == before
    runtime.load(tensors)  # ordinary values load
    kept = lorahot.inject(tiny_lm(dtype=torch.float16), ["q_proj"], max_rank=4, dtype=torch.float32)
    kept.load(tiny)


@pytest.mark.parametrize("kind", ["subnormal factors", "update overflow"])
def test_in_merged_mode_a_refusal_for_the_buffers_dtype_names_a_fix_merged_mode_takes(kind: str) -> None:
    """Merged mode keeps the adapter in the weights' dtype and refuses ``dtype=``: a float16
    model's refusal of factors float16 cannot hold said "Inject with dtype=torch.float32", which
    merged mode then refused ("drop dtype=torch.float32"). It names the fixes that work there,
    and both load the adapter."""
    model = tiny_lm(dtype=torch.float16)
    tensors = make_adapter(model, {"layers.0.self_attn.q_proj": 2}, seed=1, dtype=torch.float32)[0]
    if kind == "subnormal factors":
        tensors = {k: v * (1e-8 if ".lora_A." in k else 1e6) for k, v in tensors.items()}
    else:  # each factor in range, B @ A (2 * 300^2 at most) not
        tensors = {k: torch.full_like(v, 300.0) for k, v in tensors.items()}
    runtime = lorahot.inject(model, ["q_proj"], max_rank=4, merged=True)
    before = snapshot_of(runtime)
    with pytest.raises(
        lorahot.LoraError,
        match=r"\nInject without merged=True and with dtype=torch\.float32, or convert the model to float32 before "
        r"inject \(merged mode keeps the adapter in the weights' dtype\)",
    ):
        runtime.load(tensors)
    assert snapshot_of(runtime) == before
    unmerged = lorahot.inject(tiny_lm(dtype=torch.float16), ["q_proj"], max_rank=4, dtype=torch.float32)
    unmerged.load(tensors)
    converted = lorahot.inject(tiny_lm(dtype=torch.float16).float(), ["q_proj"], max_rank=4, merged=True)
    converted.load(tensors)


def snapshot_of(runtime: lorahot.LoraRuntime) -> list[bytes]:
    return [t.cpu().numpy().tobytes() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S)]


def _held_apart(kind: str) -> nn.Module:
    torch.manual_seed(0)
    linear = nn.Linear(8, 6)
    if kind == "packed":  # torch's dynamically quantized Linear: weight() unpacks its packed weight
        packed = torch.ao.nn.quantized.dynamic.Linear(8, 6)
        packed.set_weight_bias(torch.quantize_per_tensor(linear.weight.detach(), 0.02, 0, torch.qint8), linear.bias)
        return nn.Sequential(packed)
    linear.weight = nn.Parameter(TwoTensor(linear.weight.detach(), linear.weight.detach()), requires_grad=False)
    return nn.Sequential(linear)


@pytest.mark.parametrize("kind", ["packed", "tensor subclass"])
def test_an_adapters_copy_of_a_weight_the_model_holds_quantized_cannot_be_compared(kind: str) -> None:
    """An adapter carrying a copy of the base weight (PEFT's base_layer.weight) is compared
    with the model's; a quantized weight cannot be: a packed one stopped the load with a
    UsageError about reading the layer's weight, naming no adapter key, a tensor subclass
    (torchao's) with an UnexpectedError from torch.equal. Both are now the adapter's mismatch,
    named with its keys and the fix."""
    model = _held_apart(kind)
    runtime = lorahot.inject(model, ["0"], max_rank=4, dtype=torch.float32)
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "0.lora_A.weight": torch.randn(2, 8, generator=gen),
        "0.lora_B.weight": torch.randn(6, 2, generator=gen),
        "0.base_layer.weight": torch.randn(6, 8, generator=gen),
    }
    with pytest.raises(
        lorahot.AdapterMismatchError,
        match=r"- 0 \(.*\): carries a copy of the base weight .* the two cannot be compared",
    ):
        runtime.load(tensors)
    assert runtime.info(0) is None


@pytest.mark.parametrize(
    ("shard", "local_out"),
    [(Shard("out", 4, 8, 10, 1, 3), 4), (Shard("out", 8, 10, 10, 2, 3), 2), (Shard("in", 0, 4, 12, 0, 3), 10)],
)
def test_extras_of_a_sharded_layer_are_checked_against_the_whole_layer(shard: Shard, local_out: int) -> None:
    """A DoRA magnitude or LoRA bias for a tensor-parallel layer holds one value per output channel
    of the whole layer, as the adapter file does: one of that shape draws only the layer's
    refusal, the same on every rank (a column-parallel rank named its own slice, "has shape
    (10,), expected 4 values" on rank 1 of 3 and "expected 2" on rank 2, for a magnitude that fits);
    one of another shape is named against the whole layer's 10 channels."""
    fin = 12 if shard.dim == "out" else shard.stop - shard.start
    spec = LayerSpec("linear", fin, local_out, (fin,), shard=shard)
    a, b = torch.zeros(2, 12), torch.zeros(10, 2)
    refusal = "DoRA does not run on a tensor-parallel layer"
    whole = LoraModule("layer", a, b, 1.0, magnitude=torch.ones(10))
    assert check_extras("layer", whole, spec, refusal) == [f"layer (layer): {refusal}"]
    other = LoraModule("layer", a, b, 1.0, magnitude=torch.ones(4))
    assert check_extras("layer", other, spec, refusal) == [
        "layer (layer): DoRA magnitude vector has shape (4,), expected 10 values (one per output channel) along one "
        "dimension",
        f"layer (layer): {refusal}",
    ]


def test_a_weight_kind_on_a_sharded_layer_is_refused_for_its_sharding_not_its_shape() -> None:
    """A LoHa of the whole layer's shape for a column-parallel layer (10 outputs, rank 0 of 2
    holding 5): refused because merged mode, where such weights fold in, does not rewrite
    tensor-parallel weights, the same on every rank (it was "make a weight of shape (10, 12),
    expected (5, 12)", the rank's shard, advising an adapter trained for this model)."""
    spec = LayerSpec("linear", 12, 5, (12,), shard=Shard("out", 0, 5, 10, 0, 2))
    factors = {"hada_w1_a": torch.ones(10, 2), "hada_w1_b": torch.ones(2, 12)}
    factors |= {"hada_w2_a": torch.ones(10, 2), "hada_w2_b": torch.ones(2, 12)}
    problems = check_weight_module("0", WeightModule("0", "loha", factors), spec)
    assert problems == [
        "0 (0): loha weights fold into the layer's weight (merged mode), which lorahot does not rewrite on a "
        "tensor-parallel (DTensor) layer; convert the adapter to plain LoRA, or load it on an unsharded model"
    ]
