"""A slot's update stays within the LoRA buffers' dtype at the user's weights
(``lorahot.runtime.updates``).

The read refuses an adapter whose update ``alpha / r * B @ A`` leaves the dtype at its own scale;
these are the calls after it that could still push an accepted adapter out: a ``set_scale`` (of
the active slot or another), a ``load``'s ``scale`` (read or preloaded), and a stack whose parts
each fit but whose summed update does not, loaded or re-weighted. Each was accepted and every
forward computed inf; each is now a ``UsageError`` naming the layer, the value reached, the
dtype's largest value and the fix, with every buffer, the bookkeeping and the output bitwise as
before. Each has a control at weights that fit, whose output stays finite.

The update's entries are what a layer adds on a one-hot input (an embedding's every lookup):
past the dtype's range, such a forward computes inf, whatever the rest of the model does.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

import lorahot
from lorahot.runtime import updates
from tests.reliability_helpers import V1, Rig, assert_unchanged, build_rig, snapshot, valid_tensors

#: ``V1``'s update at weight 1: A and B at 100, rank 4, alpha = rank (scale 1): 4 * 100**2
UPDATE = 40000.0
SINGLE = (
    r"^scale={w}: the slot's update would leave the LoRA buffers' dtype in:\n  - layers\.1\.self_attn\.v_proj: its "
    r"update scale \* B @ A reaches \|value\| {v} > float16 max 65504\nPass a scale of at most {most} in magnitude, "
    r"or inject with dtype=torch\.float32 \(LoRA buffers of float32's range\)\.$"
)
STACKED = (
    r"^scale=\[{w}\]: the stack of 2 adapters' summed update would leave the LoRA buffers' dtype in:\n  - "
    r"layers\.1\.self_attn\.v_proj: the summed update of parts 0, 1 reaches \|value\| {v} > float16 max 65504\n"
    r"Pass smaller weights \(the ones given times at most {most} fit\), or stack fewer adapters, or inject with "
    r"dtype=torch\.float32 \(LoRA buffers of float32's range\)\.$"
)


def _fp16_rig(tmp_path: Path) -> Rig:
    """The reliability rig on a float16 model (float16 LoRA buffers), an adapter of :func:`_large`
    in each slot (slot 0 active), each of whose updates fits."""
    rig = build_rig(tmp_path / "rig")
    rig.model.half()
    rig.runtime = lorahot.inject(lorahot.eject(rig.model), ["q_proj", "v_proj"], max_rank=8, slots=2)
    rig.runtime.load(_large(rig), slot=1)
    rig.runtime.load(_large(rig), slot=0)
    return rig


def _large(rig: Rig, sign: float = 1.0) -> dict[str, torch.Tensor]:
    """A rank-4 adapter whose ``V1`` factors are 100 (``sign * 100`` for B): ``B @ A`` entries
    of ``sign * 40000``, which fit float16 (65504) alone."""
    tensors = valid_tensors(rig.model, 4)
    tensors[f"base_model.model.{V1}.lora_A.weight"].fill_(100.0)
    tensors[f"base_model.model.{V1}.lora_B.weight"].fill_(sign * 100.0)
    return tensors


def _refused(rig: Rig, call: Callable[[], object], match: str) -> None:
    before = snapshot(rig)
    with pytest.raises(lorahot.UsageError, match=match):
        call()
    assert_unchanged(rig, before)


def _finite(rig: Rig) -> None:
    """The model's output, and ``V1``'s on one-hot inputs (each row one column of its update
    added to the base weight's), are finite."""
    assert bool(torch.isfinite(rig.output()).all())
    with torch.no_grad():
        assert bool(torch.isfinite(rig.runtime.layers[V1](torch.eye(16, dtype=torch.float16))).all())


@pytest.mark.parametrize(("scale", "refused"), [(3.0, True), (-2.0, True), (1.5, False)], ids=["3", "-2", "fits"])
@pytest.mark.parametrize("slot", [0, 1], ids=["active", "other"])
def test_a_set_scale_that_pushes_the_update_out_of_range_is_refused(
    tmp_path: Path, scale: float, refused: bool, slot: int
) -> None:
    """``B @ A`` of 40000 loads; ``set_scale(3)`` made it 120000, accepted."""
    rig = _fp16_rig(tmp_path)
    if not refused:
        rig.runtime.set_scale(scale, slot=slot)
        rig.runtime.activate(slot)
        _finite(rig)
        return
    match = SINGLE.format(w=f"{scale:g}", v=f"{abs(scale) * UPDATE:.6g}", most="1\\.637")
    _refused(rig, lambda: rig.runtime.set_scale(scale, slot=slot), match)


@pytest.mark.parametrize(("scale", "refused"), [(3.0, True), (1.5, False)], ids=["3", "fits"])
def test_a_load_whose_scale_pushes_the_update_out_of_range_is_refused(
    tmp_path: Path, scale: float, refused: bool
) -> None:
    """The same through a load's ``scale``, read or preloaded, into either slot."""
    rig = _fp16_rig(tmp_path)
    prepared = rig.runtime.preload(_large(rig))
    calls = [
        lambda: rig.runtime.load(_large(rig), slot=0, scale=scale),
        lambda: rig.runtime.load(_large(rig), slot=1, scale=scale),
        lambda: rig.runtime.load(prepared, slot=1, scale=scale),
        lambda: rig.runtime.load([prepared], scale=[scale]),
    ]
    match = SINGLE.format(w="3", v="120000", most="1\\.637")
    for call in calls:
        if not refused:
            call()
            _finite(rig)
        else:
            _refused(rig, call, match)


@pytest.mark.parametrize(("weights", "refused"), [((1.0, 1.0), True), ((0.5, 1.0), False)], ids=["1-1", "fits"])
def test_a_stack_whose_summed_update_leaves_the_range_is_refused(
    tmp_path: Path, weights: tuple[float, float], refused: bool
) -> None:
    """Each part's update (40000) fits; the stack's sum at weights 1 and 1 (80000) does not:
    refused, loaded read or preloaded, into either slot; at 0.5 and 1 (60000) it loads."""
    rig = _fp16_rig(tmp_path)
    prepared = rig.runtime.preload(_large(rig))
    calls = [
        lambda: rig.runtime.load([_large(rig), _large(rig)], slot=0, scale=list(weights)),
        lambda: rig.runtime.load([prepared, _large(rig)], slot=1, scale=list(weights)),
        lambda: rig.runtime.load([prepared, prepared], slot=0, scale=list(weights)),
    ]
    for call in calls:
        if refused:
            _refused(rig, call, STACKED.format(w="1, 1", v="80000", most="0\\.8187"))
        else:
            call()
            rig.runtime.activate(0)
            _finite(rig)
    if refused:  # one number for both parts: the same sum
        _refused(rig, lambda: rig.runtime.load([prepared, prepared]), r"^scale=\[1, 1\]: the stack of 2 adapters'")


@pytest.mark.parametrize(("weights", "refused"), [((1.0, 1.0), True), ((0.5, 1.0), False)], ids=["1-1", "fits"])
@pytest.mark.parametrize("slot", [0, 1], ids=["active", "other"])
def test_reweighting_a_stack_past_the_range_is_refused(
    tmp_path: Path, weights: tuple[float, float], refused: bool, slot: int
) -> None:
    """A stack loaded at 0.5 and 0.5 (40000) and re-weighted to 1 and 1 (80000, computed from
    the slot's rows): refused, on the active slot or another; 0.5 and 1 (60000) fits."""
    rig = _fp16_rig(tmp_path)
    rig.runtime.load([_large(rig), _large(rig)], slot=slot, scale=[0.5, 0.5])
    rig.runtime.activate(0)
    _finite(rig)
    if not refused:
        rig.runtime.set_scale(list(weights), slot=slot)
        rig.runtime.activate(slot)
        _finite(rig)
        return
    call = lambda: rig.runtime.set_scale(list(weights), slot=slot)  # noqa: E731
    _refused(rig, call, STACKED.format(w="1, 1", v="80000", most="0\\.8187"))
    _refused(rig, lambda: rig.runtime.set_scale(2.0, slot=slot), STACKED.format(w="2, 2", v="160000", most="0\\.4093"))


def test_parts_whose_updates_cancel_stack_at_any_weight_the_sum_fits(tmp_path: Path) -> None:
    """The bound (the parts' bounds summed, 80000 at weights 1 and 1) says "maybe"; the
    computed sum decides: a part and its negation sum to 0, so the stack loads, re-weights and
    computes finite outputs."""
    rig = _fp16_rig(tmp_path)
    rig.runtime.load([_large(rig), _large(rig, sign=-1.0)])
    _finite(rig)
    rig.runtime.set_scale([1.5, 1.5])
    _finite(rig)


def _grouped() -> tuple[nn.Module, lorahot.LoraRuntime, dict[str, torch.Tensor]]:
    """A float16 conv with groups 2 and a rank-4 adapter of 30s: each output group takes 2 of A's
    rows, so the update's entries are 2 * 30 * 30 = 1800 (the rank-wide bound says 3600)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, groups=2).half())
    runtime = lorahot.inject(model, ["0"], max_rank=4, slots=2)
    adapter = {
        "base_model.model.0.lora_A.weight": torch.full((4, 4, 3, 3), 30.0, dtype=torch.float16),
        "base_model.model.0.lora_B.weight": torch.full((8, 2, 1, 1), 30.0, dtype=torch.float16),
    }
    runtime.load(adapter)
    return model, runtime, adapter


def _state(model: nn.Module, runtime: lorahot.LoraRuntime) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(torch.full((1, 4, 5, 5), 1e-3, dtype=torch.float16))  # a small input: no intermediate overflows
    return [t.clone() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)] + [out]


@pytest.mark.parametrize(("scale", "refused"), [(40.0, True), (30.0, False)], ids=["40", "fits"])
def test_a_grouped_conv_is_checked_group_by_group(scale: float, refused: bool) -> None:
    """At 40 each group's update reaches 72000 > 65504 (from the slot's rows for set_scale, from
    the factors for a load); at 30 it is 54000 and the output stays finite, where the rank-wide
    bound (108000) would have refused it."""
    model, runtime, adapter = _grouped()
    for call in (lambda: runtime.set_scale(scale), lambda: runtime.load(adapter, slot=1, scale=scale)):
        before = _state(model, runtime)
        if not refused:
            call()
            assert bool(torch.isfinite(_state(model, runtime)[-1]).all())
            continue
        with pytest.raises(
            lorahot.UsageError,
            match=r"^scale=40: the slot's update would leave the LoRA buffers' dtype in:\n  - 0: its update scale \* "
            r"B @ A reaches \|value\| 72000 > float16 max 65504\nPass a scale of at most 36\.39 in magnitude",
        ):
            call()
        assert all(torch.equal(a, b) for a, b in zip(_state(model, runtime), before))


def test_weights_whose_bound_fits_compute_no_product(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bound first: where the parts' bounds summed stay within the dtype (60000 and 50000 here),
    no update is computed, for a set_scale or a stack's load."""
    rig = _fp16_rig(tmp_path)

    def computed(*args: object) -> torch.Tensor:
        raise AssertionError("an update was computed where the bound fits")

    monkeypatch.setattr(updates, "lora_update_max", computed)
    rig.runtime.set_scale(1.5)
    rig.runtime.load([_large(rig), _large(rig)], slot=1, scale=[0.5, 0.75])
    rig.runtime.set_scale([0.75, 0.5], slot=1)
    with pytest.raises(lorahot.UnexpectedError, match="an update was computed"):  # past it: computed
        rig.runtime.set_scale([1.0, 1.0], slot=1)


# -- the LoRA bias: the update's other term ----------------------------------------------------------

#: ``V1``'s LoRA bias in :func:`_biased`: its update ``scale * lora_bias`` at weight 1 (alpha = rank)
BIAS = 40000.0
BIAS_SINGLE = (
    r"^scale={w}: the slot's update would leave the LoRA buffers' dtype in:\n  - layers\.1\.self_attn\.v_proj: its "
    r"LoRA bias scale \* lora_bias reaches \|value\| {v} > float16 max 65504\nPass a scale of at most {most} in "
    r"magnitude, or inject with dtype=torch\.float32 \(LoRA buffers of float32's range\)\.$"
)
BIAS_STACKED = (
    r"^scale=\[{w}\]: the stack of 2 adapters' summed update would leave the LoRA buffers' dtype in:\n  - "
    r"layers\.1\.self_attn\.v_proj: the LoRA bias of part 0 reaches \|value\| {v} > float16 max 65504\n"
    r"Pass smaller weights \(the ones given times at most {most} fit\), or stack fewer adapters, or inject with "
    r"dtype=torch\.float32 \(LoRA buffers of float32's range\)\.$"
)


def _fp16_extras_rig(tmp_path: Path, device: str = "cpu") -> Rig:
    """:func:`_fp16_rig` injected with ``extras=True`` on ``device``, :func:`_biased` in each slot."""
    rig = build_rig(tmp_path / "rig")
    rig.model.half()
    model = lorahot.eject(rig.model).to(device)
    rig.x = rig.x.to(device)
    rig.runtime = lorahot.inject(model, ["q_proj", "v_proj"], max_rank=8, slots=2, extras=True)
    rig.runtime.load(_biased(rig), slot=1)
    rig.runtime.load(_biased(rig), slot=0)
    return rig


def _biased(rig: Rig, value: float = BIAS) -> lorahot.Adapter:
    """A rank-4 adapter of small factors whose ``V1`` carries a LoRA bias of ``value`` (float32
    tensors): at weight 1 its update ``lora_bias`` fits float16 (65504) for 40000."""
    tensors = valid_tensors(rig.model, 4)
    tensors[f"base_model.model.{V1}.lora_B.bias"] = torch.full((16,), value)
    return lorahot.read_adapter(tensors, config={"r": 4, "lora_alpha": 4, "lora_bias": True})


def test_a_lora_bias_past_the_range_at_the_users_weights_is_refused(tmp_path: Path) -> None:
    """The update of a layer with a LoRA bias is ``scale * (B @ A x + lora_bias)``; only the
    first term was checked. A bias of 40000 loaded; ``set_scale(2)``, ``load(..., scale=2)``
    (read or preloaded) and a stack at weights 2 and 1, loaded or re-weighted, made it 80000 and
    every forward of the layer computed inf. Each is now refused naming the layer, nothing
    changed; 1.5 (60000) still loads, and the layer's outputs stay finite."""
    rig = _fp16_extras_rig(tmp_path)
    prepared = rig.runtime.preload(_biased(rig))
    plain = valid_tensors(rig.model, 2, seed=9)
    single = BIAS_SINGLE.format(w="2", v="80000", most="1\\.637")
    stacked = BIAS_STACKED.format(w="2, 1", v="80000", most="0\\.8187")
    for slot in (0, 1):
        _refused(rig, lambda: rig.runtime.set_scale(2.0, slot=slot), single)  # noqa: B023 - called at once
        _refused(rig, lambda: rig.runtime.load(_biased(rig), slot=slot, scale=2.0), single)  # noqa: B023
        _refused(rig, lambda: rig.runtime.load(prepared, slot=slot, scale=2.0), single)  # noqa: B023
        _refused(rig, lambda: rig.runtime.load([prepared, plain], slot=slot, scale=[2.0, 1.0]), stacked)  # noqa: B023
    rig.runtime.load([prepared, plain], slot=1, scale=[1.0, 1.0])
    _refused(rig, lambda: rig.runtime.set_scale([2.0, 1.0], slot=1), stacked)
    rig.runtime.set_scale([1.5, 1.0], slot=1)  # 60000: fits
    rig.runtime.set_scale(1.5)
    for slot in (0, 1):  # the layer's output (the model's own, past a bias of 60000, is not float16's)
        rig.runtime.activate(slot)
        with torch.no_grad():
            y = rig.runtime.layers[V1](torch.eye(16, dtype=torch.float16))
        assert bool(torch.isfinite(y).all()) and float(y.abs().max()) > 59000


#: the CPU, and CUDA (``gpu``: skipped without a CUDA device)
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


def _everything(rig: Rig) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the model (base weights, LoRA arenas, wide copies)."""
    named = [*rig.model.named_parameters(), *rig.model.named_buffers()]
    return {name: t.detach().clone() for name, t in named}


@pytest.mark.parametrize("device", DEVICES)
def test_a_stack_re_weighted_past_the_range_by_its_lora_bias_is_refused_before_any_replay(
    tmp_path: Path, device: str
) -> None:
    """``set_scale([2.0, 1.0])`` on a float16 runtime whose slot holds a stack, its first part
    with a LoRA bias of 40000 (80000 at weight 2), slot live or not. On CUDA ``set_scale``
    writes by a CUDA graph replay from a key's second call on: the stack was re-weighted twice
    with that key before (the second replayed), so the refused call would have replayed a
    captured graph. It is refused naming the layer with no replay run, every parameter and
    buffer, the bookkeeping and the output bitwise as before (the weights before it small
    enough that the tiny model's own float16 output stays finite: NaN equals nothing); the
    re-weightings after it replay, and at 1.5 (60000) ``V1``'s outputs on one-hot inputs are
    at the float64 reference.

    Tolerance: every entry of those outputs is about 60000, where float16's spacing is 32; the
    float16 result is rounded at most twice from sums of at most 16 + 6 products (the LoRA term
    and the base output's sum): rtol 2^-10 is two of float16's unit roundoffs (2^-11)."""
    rig = _fp16_extras_rig(tmp_path, device)
    biased, plain = _biased(rig), valid_tensors(rig.model, 2, seed=9)
    rig.runtime.load([rig.runtime.preload(biased), plain], slot=1, scale=[1.0, 1.0])
    replays = rig.runtime._replay
    for active in (0, 1):
        rig.runtime.activate(active)
        for weights in ([0.1, 1.0], [0.25, 1.0]):  # on CUDA: the key's first use, then its capture and replay
            rig.runtime.set_scale(weights, slot=1)
        count, before, tensors = replays.replays, snapshot(rig), _everything(rig)
        with pytest.raises(lorahot.UsageError, match=BIAS_STACKED.format(w="2, 1", v="80000", most="0\\.8187")):
            rig.runtime.set_scale([2.0, 1.0], slot=1)
        assert replays.replays == count
        assert_unchanged(rig, before)
        after = _everything(rig)
        assert all(torch.equal(after[name], t) for name, t in tensors.items()) and after.keys() == tensors.keys()
        rig.runtime.set_scale([0.25, 1.0], slot=1)
        assert replays.replays == count + (device == "cuda")
    rig.runtime.set_scale([1.5, 1.0], slot=1)  # 60000: fits
    layer, x = rig.runtime.layers[V1], torch.eye(16, dtype=torch.float16, device=device)
    with torch.no_grad():
        got = layer(x).double().cpu()  # slot 1 live: its stack at weights 1.5 and 1
    (a, b), (a2, b2) = (
        {k: t[f"base_model.model.{V1}.lora_{k}.weight"].double() for k in "AB"}.values()
        for t in (valid_tensors(rig.model, 4), plain)
    )
    want = layer.base_layer.weight.double().cpu().T + 1.5 * (a.T @ b.T + BIAS) + a2.T @ b2.T
    torch.testing.assert_close(got, want, rtol=2**-10, atol=0.0)


@pytest.mark.parametrize("device", DEVICES)
def test_lora_biases_of_a_stack_that_overflow_only_summed_on_one_layer_are_refused(tmp_path: Path, device: str) -> None:
    """Two parts each with a LoRA bias of 40000 on ``V1`` (an unmerged layer holds their sum at the
    weights): each fits alone, their sum at [1, 1] (80000) does not, and every forward of the layer
    would compute inf. The load and ``set_scale`` (live or not, after re-weightings that on CUDA
    capture and replay) are refused naming the layer and both parts, nothing changed; at [1, -1]
    they cancel, which the bound ``sum |w| * bias`` alone would refuse: the sum is computed. At
    [0.75, 0.5] (50000) ``V1``'s outputs on one-hot inputs are the float64 reference's (tolerance
    as in the test above)."""
    rig = _fp16_extras_rig(tmp_path, device)
    parts = [_biased(rig), _biased(rig)]
    summed = (
        r"^scale=\[1, 1\]: the stack of 2 adapters' summed update would leave the LoRA buffers' dtype in:\n  - "
        r"layers\.1\.self_attn\.v_proj: the summed LoRA biases of parts 0, 1 reaches \|value\| 80000 > float16 max "
        r"65504\nPass smaller weights \(the ones given times at most 0\.8187 fit\), or stack fewer adapters, or "
        r"inject with dtype=torch\.float32 \(LoRA buffers of float32's range\)\.$"
    )
    for slot in (0, 1):
        _refused(rig, lambda: rig.runtime.load(parts, slot=slot), summed)  # noqa: B023 - called at once
    rig.runtime.load(parts, slot=1, scale=[0.25, 0.5])
    for active in (0, 1):
        rig.runtime.activate(active)
        for weights in ([0.1, 0.5], [0.25, 0.5], [0.1, 0.5]):  # on CUDA: a key's first use, capture, replay
            rig.runtime.set_scale(weights, slot=1)
        _refused(rig, lambda: rig.runtime.set_scale([1.0, 1.0], slot=1), summed)
    rig.runtime.set_scale([1.0, -1.0], slot=1)
    rig.runtime.set_scale([0.75, 0.5], slot=1)
    layer, x = rig.runtime.layers[V1], torch.eye(16, dtype=torch.float16, device=device)
    with torch.no_grad():
        got = layer(x).double().cpu()  # slot 1 live
    a, b = ({k: valid_tensors(rig.model, 4)[f"base_model.model.{V1}.lora_{k}.weight"].double() for k in "AB"}).values()
    want = layer.base_layer.weight.double().cpu().T + 1.25 * (a.T @ b.T + BIAS)
    torch.testing.assert_close(got, want, rtol=2**-10, atol=0.0)


def test_a_lora_bias_past_the_range_at_its_own_scale_is_refused_at_the_read(tmp_path: Path) -> None:
    """A bias of 70000 (a float32 file) at ``alpha / r = 1`` leaves float16 at any weight that
    is not smaller: refused as a read, as an update ``alpha / r * B @ A`` past the range is, with
    the dtype that holds it; float32 LoRA buffers load it."""
    rig = _fp16_extras_rig(tmp_path)
    before = snapshot(rig)
    with pytest.raises(
        lorahot.AdapterReadError,
        match=r"LoRA weights or updates out of the LoRA buffers' range:\n  - layers\.1\.self_attn\.v_proj: its LoRA "
        r"bias alpha / r \* lora_bias reaches \|value\| 70000 > float16 max 65504\nInject with dtype=torch\.float32",
    ):
        rig.runtime.load(_biased(rig, 70000.0))
    assert_unchanged(rig, before)
    wide = lorahot.inject(lorahot.eject(rig.model), ["q_proj", "v_proj"], max_rank=8, extras=True, dtype=torch.float32)
    wide.load(_biased(rig, 70000.0))


@pytest.mark.parametrize(
    ("weight", "factor", "bias", "refused"),
    [(1e308, 0.1, 0.1, False), (1e308, 1.0, 0.1, True), (-1.7e308, 0.1, 1.0, True)],
    ids=["fits", "update-out", "bias-out"],
)
def test_weights_near_float64_s_largest_are_checked_without_a_numpy_overflow_warning(
    weight: float, factor: float, bias: float, refused: bool
) -> None:
    """The bound ``sum_p |w_p| * bound_p`` of a stack at weights near float64's largest value
    passes it (inf): the layer is then checked exactly, accepted where its update fits and
    refused where it does not, and NumPy's overflow in the bound is no warning of the user's
    (``RuntimeWarning: overflow encountered in matmul`` escaped from set_scale)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4)).double()
    runtime = lorahot.inject(model, ["0"], max_rank=4, extras=True)
    part = {
        "base_model.model.0.lora_A.weight": torch.full((2, 4), factor, dtype=torch.float64),
        "base_model.model.0.lora_B.weight": torch.full((4, 2), factor, dtype=torch.float64),
        "base_model.model.0.lora_B.bias": torch.full((4,), bias, dtype=torch.float64),
    }
    runtime.load([part, part], scale=[1.0, 1.0])
    arena = runtime.buffers.arenas[0]
    before = [t.clone() for t in (arena.A, arena.B, arena.S, arena.E)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        if refused:
            with pytest.raises(lorahot.UsageError, match="would leave the LoRA buffers' dtype"):
                runtime.set_scale([weight, weight])
            assert all(torch.equal(t, u) for t, u in zip((arena.A, arena.B, arena.S, arena.E), before, strict=True))
            assert runtime.info().scale == (1.0, 1.0)
        else:
            runtime.set_scale([weight, weight])
            assert runtime.info().scale == (weight, weight)
