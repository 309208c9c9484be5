"""``LoraRuntime``: loading from every source kind, PEFT scales, slots, and failed loads that change nothing."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import lorahot
from tests.helpers import PREFIX, make_adapter, model_reference, save_peft, tiny_convnet, tiny_lm, token_ids

TARGETS = ["q_proj", "k_proj", "v_proj", "up_proj", "embed_tokens"]
Q0, V0, K0 = "layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj", "layers.0.self_attn.k_proj"
Q1, V1, UP1 = "layers.1.self_attn.q_proj", "layers.1.self_attn.v_proj", "layers.1.mlp.up_proj"
IDS = token_ids((2, 6), 32, seed=3)


def _setup(slots: int = 1, max_rank: int = 8) -> tuple[torch.nn.Module, lorahot.LoraRuntime]:
    """A float64 model: its scales are float64 too, so outputs match the reference to 1e-10."""
    model = tiny_lm(dtype=torch.float64)
    return model, lorahot.inject(model, TARGETS, max_rank=max_rank, slots=slots)


def _expected(ab: dict, scales: dict[str, float] | float = 1.0) -> torch.Tensor:
    per = scales if isinstance(scales, dict) else dict.fromkeys(ab, scales)
    return model_reference(tiny_lm(dtype=torch.float64), IDS, {n: (a, b, per[n]) for n, (a, b) in ab.items()})


def _out(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def _close(y: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


# -- sources ----------------------------------------------------------------------------------


def test_load_peft_directory(tmp_path: Path) -> None:
    model, runtime = _setup()
    tensors, ab = make_adapter(model, {Q0: 4, V1: 4, "embed_tokens": 4}, seed=1, dtype=torch.float64)
    save_peft(tmp_path / "ad", tensors, r=4, lora_alpha=6)
    info = runtime.load(tmp_path / "ad")
    assert (info.format, info.slot, info.scale) == ("peft", 0, 1.0)
    assert info.ranks == {Q0: 4, V1: 4, "embed_tokens": 4}
    assert info.source.endswith("adapter_model.safetensors")
    assert runtime.info() == info
    _close(_out(model), _expected(ab, 1.5))


def test_load_safetensors_file_reads_config_beside_it(tmp_path: Path) -> None:
    model, runtime = _setup()
    tensors, ab = make_adapter(model, {K0: 2, UP1: 2}, seed=2, dtype=torch.float64)
    save_peft(tmp_path, tensors, r=2, lora_alpha=1)
    runtime.load(str(tmp_path / "adapter_model.safetensors"))
    _close(_out(model), _expected(ab, 0.5))


def test_load_mapping_with_config_and_scale() -> None:
    model, runtime = _setup()
    tensors, ab = make_adapter(model, {Q1: 3}, seed=3, dtype=torch.float64)
    info = runtime.load(tensors, config={"lora_alpha": 6}, scale=0.25)
    assert info.source == "<mapping>" and info.scale == 0.25
    _close(_out(model), _expected(ab, 0.5))


def test_mapping_without_config_has_scale_one() -> None:
    model, runtime = _setup()
    tensors, ab = make_adapter(model, {Q1: 3, "embed_tokens": 5}, seed=4, dtype=torch.float64)
    runtime.load(tensors)
    _close(_out(model), _expected(ab, 1.0))


def test_load_read_adapter_object() -> None:
    model, runtime = _setup()
    tensors, ab = make_adapter(model, {V0: 8}, seed=5, dtype=torch.float32)
    runtime.load(lorahot.read_adapter(tensors, config={"lora_alpha": 16}))
    _close(_out(model), _expected(ab, 2.0))


# -- PEFT scales ------------------------------------------------------------------------------

PATTERN_RANKS = {Q0: 2, Q1: 2, V0: 4, V1: 6, K0: 4, "embed_tokens": 4}
PATTERN_CONFIG = {
    "r": 4,
    "lora_alpha": 8,
    "rank_pattern": {"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 6},
    "alpha_pattern": {"v_proj": 3},
}
#: (rank, alpha) each module gets from PATTERN_CONFIG, by PEFT's rules.
PATTERN_EXPECTED = {Q0: (2, 8), Q1: (2, 8), V0: (4, 3), V1: (6, 3), K0: (4, 8), "embed_tokens": (4, 8)}


@pytest.mark.parametrize("use_rslora", [False, True])
def test_rank_and_alpha_patterns_and_rslora(tmp_path: Path, use_rslora: bool) -> None:
    model, runtime = _setup()
    tensors, ab = make_adapter(model, PATTERN_RANKS, seed=6, dtype=torch.float64)
    save_peft(tmp_path, tensors, use_rslora=use_rslora, **PATTERN_CONFIG)
    info = runtime.load(tmp_path)
    assert info.ranks == PATTERN_RANKS
    root = math.sqrt if use_rslora else float
    scales = {n: alpha / root(r) for n, (r, alpha) in PATTERN_EXPECTED.items()}
    for name, layer in runtime.layers.items():
        assert set(layer.lora_scale.tolist()) == {scales.get(name, 0.0)}, name  # every row
    _close(_out(model), _expected(ab, scales))


def test_rank_pattern_adapter_after_another_equals_fresh_load(tmp_path: Path) -> None:
    model, runtime = _setup()
    first, _ = make_adapter(model, dict.fromkeys(PATTERN_RANKS, 8) | {UP1: 8}, seed=7, dtype=torch.float64)
    save_peft(tmp_path / "first", first, r=8, lora_alpha=32)
    second, ab = make_adapter(model, PATTERN_RANKS, seed=8, dtype=torch.float64)
    save_peft(tmp_path / "second", second, **PATTERN_CONFIG)
    runtime.load(tmp_path / "first")
    runtime.load(tmp_path / "second")
    fresh_model, fresh = _setup()
    fresh.load(tmp_path / "second")
    assert torch.equal(_out(model), _out(fresh_model))
    scales = {n: alpha / r for n, (r, alpha) in PATTERN_EXPECTED.items()}
    _close(_out(model), _expected(ab, scales))


def test_adapter_on_subset_zeroes_the_other_layers() -> None:
    model, runtime = _setup()
    full, _ = make_adapter(model, dict.fromkeys(runtime.layers, 8), seed=9, dtype=torch.float64)
    runtime.load(full, config={"lora_alpha": 4})
    part, ab = make_adapter(model, {V1: 3}, seed=10, dtype=torch.float64)
    runtime.load(part)
    for name, layer in runtime.layers.items():
        if name != V1:
            assert not layer.lora_scale.any()
            assert not layer.lora_A.any() and not layer.lora_B.any(), name
    assert not runtime.layers[V1].lora_A[3:].any()
    _close(_out(model), _expected(ab, 1.0))


# -- slots, activate, unload, set_scale -------------------------------------------------------


def test_slots_activate_unload_set_scale() -> None:
    model, runtime = _setup(slots=3)
    base = _out(model)
    abs_ = []
    for slot, ranks in enumerate(({Q0: 2}, {V1: 8, "embed_tokens": 1}, {UP1: 5, K0: 3})):
        tensors, ab = make_adapter(model, ranks, seed=20 + slot, dtype=torch.float64)
        runtime.load(tensors, slot=slot)
        abs_.append(ab)
    assert runtime.active_slot == 0
    _close(_out(model), _expected(abs_[0]))
    for slot in (2, 1, 0, 2):
        runtime.activate(slot)
        assert runtime.active_slot == slot and runtime.info().slot == slot
        _close(_out(model), _expected(abs_[slot]))

    runtime.set_scale(0.5, slot=1)  # inactive: takes effect on activate
    _close(_out(model), _expected(abs_[2]))
    runtime.activate(1)
    _close(_out(model), _expected(abs_[1], 0.5))
    assert runtime.info().scale == 0.5
    runtime.set_scale(3.0)  # active: takes effect now
    _close(_out(model), _expected(abs_[1], 3.0))
    runtime.set_scale(0.0)
    assert torch.equal(_out(model), base)

    runtime.unload(1)  # the active slot: no adapter
    assert runtime.info() is None
    assert torch.equal(_out(model), base)
    runtime.activate(2)
    _close(_out(model), _expected(abs_[2]))
    runtime.unload()
    assert [runtime.info(s) for s in range(3)] == [None, None, None]
    assert torch.equal(_out(model), base)
    for arena in runtime.buffers.arenas:
        assert not arena.A.any() and not arena.B.any() and not arena.S.any()


@pytest.mark.parametrize("name", ["slots", "max_rank", "active_slot", "routing", "nbytes", "model", "cache"])
def test_the_read_only_attributes_refuse_assignment_and_loads_go_on(name: str) -> None:
    """The README's read-only attributes: assigning ``runtime.cache`` (to resize the cache, say)
    passed, and the next load, past every check, failed writing (a ``WriteError``) and emptied
    the slot; ``runtime.model`` was replaced as silently."""
    model, runtime = _setup()
    tensors, ab = make_adapter(model, {Q0: 4}, seed=32, dtype=torch.float64)
    runtime.load(tensors)
    kept = getattr(runtime, name)
    with pytest.raises(AttributeError, match=rf"property '{name}' of 'LoraRuntime' object has no setter"):
        setattr(runtime, name, 1)
    assert getattr(runtime, name) == kept
    runtime.load(tensors)
    _close(_out(model), _expected(ab))


def test_load_into_inactive_slot_does_not_change_output() -> None:
    model, runtime = _setup(slots=2)
    tensors, _ab = make_adapter(model, {Q0: 4}, seed=30, dtype=torch.float64)
    runtime.load(tensors)
    before = _out(model)
    runtime.load(make_adapter(model, {V0: 4}, seed=31)[0], slot=1)
    assert torch.equal(_out(model), before)


def test_slot_and_scale_usage_errors() -> None:
    model, runtime = _setup(slots=2)
    with pytest.raises(lorahot.UsageError, match=r"slot=2 is out of range; this runtime has slots 0\.\.1"):
        runtime.activate(2)
    with pytest.raises(lorahot.UsageError, match=r"slot=-1 is out of range"):
        runtime.unload(-1)
    # -1 means the base model in a per-row routing, not a slot: the message says how to get it
    with pytest.raises(lorahot.UsageError, match=r"slot=-1 is out of range.*activate\(\[-1\] \* rows\)"):
        runtime.activate(-1)
    with pytest.raises(lorahot.UsageError, match=r"slot 1 is empty; load an adapter into it before set_scale"):
        runtime.set_scale(2.0, slot=1)
    tensors, _ = make_adapter(model, {Q0: 4}, seed=30)
    with pytest.raises(lorahot.UsageError, match=r"scale=nan must be finite"):
        runtime.load(tensors, scale=float("nan"))
    runtime.load(tensors)
    with pytest.raises(lorahot.UsageError, match=r"scale='x' is not a number"):
        runtime.set_scale("x")  # type: ignore[arg-type]
    assert runtime.active_slot == 0 and runtime.info().scale == 1.0


def test_grouped_conv_model_through_runtime() -> None:
    model = tiny_convnet().double()
    runtime = lorahot.inject(model, ["embed", "conv", "proj"], max_rank=8)
    ids = token_ids((2, 5, 5), 16, seed=1)
    tensors, ab = make_adapter(model, {"conv": 4, "embed": 3, "proj": 8}, seed=11, dtype=torch.float64)
    runtime.load(tensors, config={"lora_alpha": 2})
    with torch.no_grad():
        y = model(ids)
    scales = {"conv": 0.5, "embed": 2 / 3, "proj": 0.25}
    expected = model_reference(tiny_convnet().double(), ids, {n: (a, b, scales[n]) for n, (a, b) in ab.items()})
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)


# -- failed loads change nothing --------------------------------------------------------------


def _snapshot(runtime: lorahot.LoraRuntime) -> list:
    m = runtime.buffers
    return [(a.A.clone(), a.B.clone(), a.S.clone(), list(a.a_extent), list(a.b_extent)) for a in m.arenas]


def _assert_unchanged(runtime: lorahot.LoraRuntime, snap: list) -> None:
    for arena, (A, B, S, ae, be) in zip(runtime.buffers.arenas, snap):
        assert torch.equal(arena.A, A) and torch.equal(arena.B, B) and torch.equal(arena.S, S)
        assert (arena.a_extent, arena.b_extent) == (ae, be)


def _keys(name: str) -> tuple[str, str]:
    return f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"


def _bad_rank(model):
    return make_adapter(model, {Q0: 2, V0: 9}, seed=40)[0], {}


def _not_injected(model):
    return make_adapter(model, {Q0: 2, "layers.0.mlp.down_proj": 2}, seed=41)[0], {}


def _bad_b_shape(model):
    tensors = make_adapter(model, {Q0: 2, V1: 3}, seed=42)[0]
    tensors[_keys(V1)[1]] = torch.randn(16, 2)
    return tensors, {}


def _bad_a_shape(model):
    tensors = make_adapter(model, {Q0: 2, UP1: 3}, seed=43)[0]
    tensors[_keys(UP1)[0]] = torch.randn(3, 15)
    return tensors, {}


def _a_without_b(model):
    tensors = make_adapter(model, {Q0: 2, K0: 2}, seed=44)[0]
    del tensors[_keys(K0)[1]]
    return tensors, {}


def _config_contradicts(model):
    return make_adapter(model, {Q0: 4, Q1: 2}, seed=45)[0], {"r": 4}


def _nan(model):
    tensors = make_adapter(model, {Q0: 2, V0: 2}, seed=46)[0]
    tensors[_keys(V0)[1]][3, 1] = float("nan")
    return tensors, {}


FAILURES = {
    "rank_over_max": (
        _bad_rank,
        lorahot.AdapterMismatchError,
        rf"{V0} \({_keys(V0)[0]}, {_keys(V0)[1]}\): rank 9 > max_rank 8; inject with max_rank >= 9",
    ),
    "not_injected": (
        _not_injected,
        lorahot.AdapterMismatchError,
        r"do not map onto the injected layers:\n  - layers\.0\.mlp\.down_proj: matches no injected layer \(closest: .*\)"  # noqa: E501
        r"[\s\S]*Inject those modules \(targets=\.\.\.\)",
    ),
    "b_shape": (
        _bad_b_shape,
        lorahot.AdapterMismatchError,
        rf"{V1} \(.*\): B has shape \(16, 2\), expected \(16, 3\) for rank 3 \(A \(3, 16\)\)",
    ),
    "a_shape": (
        _bad_a_shape,
        lorahot.AdapterMismatchError,
        rf"{UP1} \(.*\): A has shape \(3, 15\), expected \(r, 16\) with r >= 1 for this linear layer",
    ),
    "a_without_b": (_a_without_b, lorahot.AdapterMismatchError, rf"{K0}: has lora_A \({_keys(K0)[0]}\) but no lora_B"),
    "config_r": (
        _config_contradicts,
        lorahot.AdapterMismatchError,
        rf"{Q1}: config= says r=4, but {_keys(Q1)[0]} has shape \(2, 16\) \(rank 2\)",
    ),
    "nan": (_nan, lorahot.AdapterReadError, rf"NaN or Inf in LoRA weights of:\n  - {V0}"),
}


@pytest.mark.parametrize("failure", list(FAILURES))
@pytest.mark.parametrize("slot", [0, 1])
def test_failed_load_raises_and_changes_nothing(failure: str, slot: int) -> None:
    make, error, message = FAILURES[failure]
    model, runtime = _setup(slots=2)
    runtime.load(make_adapter(model, {Q0: 8, V1: 4, "embed_tokens": 2}, seed=50)[0])
    runtime.load(make_adapter(model, {UP1: 6, K0: 1}, seed=51)[0], slot=1, scale=2.0)
    infos = [runtime.info(s) for s in range(2)]
    snap, before = _snapshot(runtime), _out(model)
    tensors, config = make(model)
    with pytest.raises(error, match=message):
        runtime.load(tensors, slot=slot, config=config)
    _assert_unchanged(runtime, snap)
    assert torch.equal(_out(model), before)
    assert [runtime.info(s) for s in range(2)] == infos
    runtime.activate(1)
    runtime.set_scale(1.0)
    assert set(runtime.layers[UP1].lora_scale.tolist()) == {1.0}


def test_failed_load_from_directory_names_the_file(tmp_path: Path) -> None:
    model, runtime = _setup()
    tensors = make_adapter(model, {Q0: 2}, seed=60)[0]
    tensors[_keys(Q0)[1]] = torch.randn(16, 3)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    snap = _snapshot(runtime)
    with pytest.raises(
        lorahot.AdapterMismatchError, match=r"adapter_model\.safetensors: adapter does not fit the injected model"
    ):
        runtime.load(tmp_path)
    _assert_unchanged(runtime, snap)


def test_load_pauses_the_garbage_collector_and_restores_its_state() -> None:
    import gc

    model, runtime = _setup()
    tensors = make_adapter(model, {Q0: 2})[0]
    seen = []
    original = runtime.buffers.write_staged

    def spy(*args, **kwargs):
        seen.append(gc.isenabled())
        return original(*args, **kwargs)

    runtime.buffers.write_staged = spy  # type: ignore[method-assign]
    assert gc.isenabled()
    runtime.load(tensors)
    assert seen == [False] and gc.isenabled()
    with pytest.raises(lorahot.LoraError):
        runtime.load(
            {
                "base_model.model.nowhere.lora_A.weight": torch.ones(1, 1),
                "base_model.model.nowhere.lora_B.weight": torch.ones(1, 1),
            }
        )
    assert gc.isenabled()
    gc.disable()
    try:
        runtime.load(tensors)
        assert not gc.isenabled()  # a caller's choice is kept
    finally:
        gc.enable()


@pytest.mark.parametrize("how", ["copy", "deepcopy", "pickle", "torch.save"])
def test_a_runtime_is_not_copied_and_a_copied_model_keeps_its_adapter(how: str) -> None:
    """A copy of a runtime would write the same buffers with its own idea of the active slot
    (an independent audit: after the copy's activate(1), the original's set_scale scaled slot
    1's adapter): refused with a UsageError, nothing changed; the model itself copies, with its
    adapter, and the original runtime keeps working."""
    import copy
    import io
    import pickle

    model, runtime = _setup(slots=2)
    tensors, ab = make_adapter(model, {Q0: 4}, seed=1, dtype=torch.float64)
    runtime.load(tensors)
    before = _out(model).clone()
    copier = {
        "copy": copy.copy,
        "deepcopy": copy.deepcopy,
        "pickle": pickle.dumps,
        "torch.save": lambda r: torch.save(r, io.BytesIO()),
    }[how]
    with pytest.raises(lorahot.UsageError, match="cannot be copied or pickled"):
        copier(runtime)
    twin = copy.deepcopy(model)
    assert torch.equal(_out(twin), before) and torch.equal(_out(model), before)
    runtime.set_scale(0.5)
    _close(_out(model), _expected(ab, 0.5))
    assert torch.equal(_out(twin), before)  # the copy's buffers are its own


def test_a_move_after_inject_converts_the_shared_arena_once_not_per_layer() -> None:
    """``model.half()`` after inject: every layer registers the runtime's arena tensors, and
    ``nn.Module`` converts buffers module by module, so each layer used to get a converted copy
    of the whole arena (an independent audit: 48 layers, 54 MB after the move for a 3 MB
    model). Now one copy per arena tensor, shared; the model keeps computing and the runtime
    still refuses to serve the moved model."""
    model, runtime = _setup(slots=2)
    tensors, ab = make_adapter(model, {Q0: 4}, seed=1, dtype=torch.float64)
    runtime.load(tensors)
    layers = list(runtime.layers.values())
    assert len(layers) > 2
    model.float()
    for name in ("_lora_arena_A", "_lora_arena_B", "_lora_arena_S"):
        buffers = {layer._buffers[name].untyped_storage().data_ptr() for layer in layers}
        assert len(buffers) == 1, name
        assert layers[0]._buffers[name].dtype == torch.float32
    torch.testing.assert_close(_out(model), _expected(ab).float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(lorahot.UsageError, match="LoRA buffers were replaced"):
        runtime.load(tensors)


def test_a_forward_after_a_move_to_another_device_is_a_usage_error() -> None:
    """The LoRA buffers stay where inject put them when the model is moved: a forward on the
    new device raises a UsageError saying so, where torch raised a device mismatch from inside
    the layer (found by an independent audit); a move to another dtype keeps computing."""
    model, runtime = _setup()
    tensors, ab = make_adapter(model, {Q0: 4}, seed=1, dtype=torch.float64)
    runtime.load(tensors)
    moved = model.to("meta")
    with pytest.raises(lorahot.UsageError, match=r"input is on meta and its LoRA buffers on cpu.*Move the model first"):
        moved(IDS.to("meta"))
    model2, runtime2 = _setup()
    runtime2.load(tensors)
    torch.testing.assert_close(_out(model2.float()), _expected(ab).float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("when", ["before inject", "after inject"])
def test_runtime_calls_do_not_step_a_spectral_norm_of_a_base_layer(when: str) -> None:
    """A spectral_norm parametrization steps its power iteration at each read of the weight in
    training mode. Every runtime call checks whether the first layer's base was parallelized
    since inject, and read its weight to do so: each load, set_scale, activate, unload and
    eject stepped the iteration (6 steps over the calls below), changing what the model
    computes, silently. The tensors it is computed from are checked instead: the power
    iteration's vectors bitwise as before, and the model's output with them."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.ReLU(), torch.nn.Linear(6, 4)).double()
    if when == "before inject":
        torch.nn.utils.parametrizations.spectral_norm(model[0])
    runtime = lorahot.inject(model, "0|2", max_rank=4, slots=2)
    adapter, _ = make_adapter(model, {"0": 2, "2": 2}, seed=1, dtype=torch.float64)
    if when == "after inject":
        torch.nn.utils.parametrizations.spectral_norm(model[0].base_layer)
    model.train()
    norm = model[0].base_layer.parametrizations.weight[0]
    vectors = (norm._u.clone(), norm._v.clone())
    runtime.load(adapter)
    runtime.load(adapter, slot=1)
    runtime.set_scale(0.5)
    runtime.activate(1)
    runtime.activate([0, 1])
    runtime.unload(0)
    runtime.eject()
    assert torch.equal(norm._u, vectors[0]) and torch.equal(norm._v, vectors[1])
