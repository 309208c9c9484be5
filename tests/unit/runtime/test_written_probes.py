"""Merged mode's probes of every layer at once: the same verdicts as the layer by layer check,
on the CPU and as CUDA graph replays."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lorahot
from lorahot.runtime import merge
from lorahot.runtime.written_probes import PROBE_ELEMENTS, WrittenProbes, positions, sampled, signature
from tests.helpers import make_adapter

NAMES = ["0", "1", "2", "3"]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


class _Model(nn.Module):
    """Four layers of the kinds and dtypes a layout mixes: bf16 with a bias, bf16 without one
    whose rows are an odd number of elements (read as 16-bit integers, not 32-bit words), a
    float64 conv (8-byte elements, read as two words), a float32 linear. The checks need no
    forward."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.Linear(24, 40, dtype=torch.bfloat16),
                nn.Linear(39, 24, bias=False, dtype=torch.bfloat16),
                nn.Conv2d(3, 5, 3, padding=1, dtype=torch.float64),
                nn.Linear(24, 8),
            ]
        )


def _runtime(device: str, inference: bool = False) -> tuple[nn.Module, lorahot.LoraRuntime]:
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    torch.manual_seed(0)
    if inference:
        with torch.inference_mode():
            model = _Model().to(device)
    else:
        model = _Model().to(device)
    runtime = lorahot.inject(model, [f"layers.{n}" for n in NAMES], max_rank=4, merged=True)
    return model, runtime


def _adapter(model: nn.Module, seed: int) -> dict[str, torch.Tensor]:
    return make_adapter(model, {f"layers.{n}": 2 for n in NAMES}, seed=seed)[0]


def _layers(runtime: lorahot.LoraRuntime) -> list:
    return list(runtime.layers.values())


def _verdicts(runtime: lorahot.LoraRuntime) -> tuple[list[bool], list[bool]]:
    """The layout's verdicts and the layer by layer ones, on the same state."""
    merger = runtime._merger
    assert merger is not None and merger._probes is not None
    batched = merger._probes.changed()
    assert batched is not None  # the probes are the layout's own
    return batched, merge.replaced(_layers(runtime))


def _unsampled(weight: torch.Tensor) -> int:
    sampled = set(positions(weight.numel(), torch.device("cpu")).tolist())
    return next(i for i in range(weight.numel()) if i not in sampled)


def _bump(t: torch.Tensor, flat: int) -> None:
    """Adds 1 to element ``flat`` of ``t`` in place (moves its version counter)."""
    t.view(-1)[flat] += 1.0


EDITS: dict[str, tuple[Callable[[nn.Module], None], list[bool]]] = {
    "none": (lambda m: None, [False, False, False, False]),
    "an unsampled element": (
        lambda m: _bump(m.layers[1].weight, _unsampled(m.layers[1].weight)),
        [False, True, False, False],
    ),
    "a conv's unsampled element": (
        lambda m: _bump(m.layers[2].weight, _unsampled(m.layers[2].weight)),
        [False, False, True, False],
    ),
    "the same value written back": (
        lambda m: m.layers[0].weight.view(-1)[5].copy_(m.layers[0].weight.view(-1)[5].clone()),
        [False] * 4,
    ),
    "a bias": (lambda m: _bump(m.layers[3].bias, 2), [False, False, False, True]),
    "through .data, unsampled": (lambda m: _bump(m.layers[0].weight.data, _unsampled(m.layers[0].weight)), [False] * 4),
    "through .data, sampled": (lambda m: _bump(m.layers[0].weight.data, 0), [True, False, False, False]),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("edit", list(EDITS))
def test_the_layout_finds_what_the_layer_by_layer_check_finds(device: str, edit: str) -> None:
    """After swaps (on CUDA: the record and the check replayed as graphs), an edit is found in
    the layer it touched, by both paths alike, and only there; a value written back, or an
    edit through ``.data`` that no sample covers, is found by neither (the documented limit)."""
    model, runtime = _runtime(device)
    for seed in (1, 2, 3, 1):  # the second call captures, later ones replay
        runtime.load(_adapter(model, seed))
    apply, want = EDITS[edit]
    with torch.no_grad():
        apply(model)
    batched, layered = _verdicts(runtime)
    assert batched == layered == want
    if device == "cuda":
        assert runtime._merger._probes._replays.replays >= 2  # type: ignore[union-attr]


@pytest.mark.parametrize("device", DEVICES)
def test_an_inference_weight_edited_anywhere_is_found(device: str) -> None:
    """Inference tensors have no version counter: the sums are compared at every check."""
    model, runtime = _runtime(device, inference=True)
    for seed in (1, 2, 3):
        runtime.load(_adapter(model, seed))
    assert _verdicts(runtime)[0] == [False] * 4
    with torch.inference_mode():
        _bump(model.layers[1].weight, _unsampled(model.layers[1].weight))
    batched, layered = _verdicts(runtime)
    assert batched == layered == [False, True, False, False]
    with pytest.raises(lorahot.UsageError, match=r"changed since lorahot last wrote them .*:\n  - layers.1\n"):
        runtime.load(_adapter(model, 4))


@given(layer=st.integers(0, 3), where=st.floats(0, 1), through_data=st.booleans())
def test_any_one_element_edit_is_found_in_its_layer_alone(layer: int, where: float, through_data: bool) -> None:
    """Any element of any layer, changed in place, is found in that layer and no other, as the
    layer by layer check finds it; through ``.data`` (no version counter moves), both find it
    exactly where the element is one of the samples."""
    model, runtime = _runtime("cpu")
    runtime.load(_adapter(model, 1))
    weight = model.layers[layer].weight
    flat = min(int(where * weight.numel()), weight.numel() - 1)
    with torch.no_grad():
        _bump(weight.data if through_data else weight, flat)
    is_sampled = flat in set(positions(weight.numel(), torch.device("cpu")).tolist())
    found = is_sampled or not through_data
    batched, layered = _verdicts(runtime)
    assert batched == layered == [found and k == layer for k in range(4)]


def test_a_weight_in_new_memory_is_checked_layer_by_layer_then_laid_out_anew() -> None:
    """A weight given new memory with the same values (``weight.data = copy``) leaves the layout
    behind: the next check goes layer by layer (and finds no change), the next record builds a
    new layout, and an edit after it is found there."""
    model, runtime = _runtime("cpu")
    runtime.load(_adapter(model, 1))
    merger = runtime._merger
    assert merger is not None
    old = merger._probes
    model.layers[3].weight.data = model.layers[3].weight.data.clone()
    assert old is not None and old.built_for != signature(_layers(runtime))
    runtime.load(_adapter(model, 2))  # checked layer by layer, then recorded in a new layout
    assert isinstance(merger._probes, WrittenProbes) and merger._probes is not old
    with torch.no_grad():
        _bump(model.layers[3].weight, _unsampled(model.layers[3].weight))
    assert _verdicts(runtime) == ([False, False, False, True],) * 2


@pytest.mark.gpu
def test_gpu_merged_swaps_replayed_equal_a_float64_reference() -> None:
    """On CUDA, through swaps whose record and check are graph replays, every merged weight is
    ``W0 + s B A`` as computed in float64 (rounded once), and an edit after them is refused with
    every byte left as it was."""
    model, runtime = _runtime("cuda")
    base = {n: model.layers[int(n)].weight.detach().double().clone() for n in NAMES}
    for seed in (1, 2, 1, 2, 3):
        tensors, ab = make_adapter(model, {f"layers.{n}": 2 for n in NAMES}, seed=seed)
        runtime.load(tensors)
        for n in NAMES:
            a, b = ab[f"layers.{n}"]
            layer = model.layers[int(n)]
            want = base[n] + (b.double().flatten(1) @ a.double().flatten(1)).reshape(base[n].shape).to(base[n].device)
            torch.testing.assert_close(layer.weight.double(), want.to(layer.weight.dtype).double(), rtol=0, atol=0.02)
    assert runtime._merger._probes._replays.replays >= 4  # type: ignore[union-attr]
    with torch.no_grad():
        _bump(model.layers[0].weight, _unsampled(model.layers[0].weight))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(lorahot.UsageError, match=r"changed since lorahot last wrote them .*:\n  - layers.0\n"):
        runtime.load(_adapter(model, 4))
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.gpu
def test_gpu_rewrites_replayed_equal_the_layer_by_layer_rewrites_bitwise() -> None:
    """Merged mode's rewrite of one adapter as a CUDA graph replay (:meth:`Merger._replayed`)
    leaves every weight and bias bitwise as the layer by layer rewrite leaves them, through
    loads of two ranks (each its own graph), scales, an unload and loads after it; the
    reference runtime has replays off (negative control: it replays nothing)."""
    pairs = [_runtime("cuda") for _ in range(2)]
    (mine, mine_rt), (ref, ref_rt) = pairs
    assert mine_rt._merger is not None and ref_rt._merger is not None
    ref_rt._merger._replays.device = None

    def both(step: Callable[[nn.Module, lorahot.LoraRuntime], None]) -> None:
        for model, runtime in pairs:
            step(model, runtime)
        for (k, a), b in zip(mine.state_dict().items(), ref.state_dict().values(), strict=True):
            assert torch.equal(a, b), k

    def load(seed: int, rank: int) -> Callable[[nn.Module, lorahot.LoraRuntime], None]:
        return lambda m, r: r.load(make_adapter(m, {f"layers.{n}": rank for n in NAMES}, seed=seed)[0])

    for seed, rank in [(1, 2), (2, 3), (3, 2), (4, 3), (5, 2), (6, 3)]:
        both(load(seed, rank))
    for scale in (0.5, 2.0, 0.5, 2.0, 0.0, 0.0):
        both(lambda m, r, scale=scale: r.set_scale(scale))
    both(lambda m, r: r.unload())
    both(lambda m, r: r.unload())
    both(load(7, 3))
    both(load(8, 3))
    assert mine_rt._merger._replays.replays >= 6
    assert ref_rt._merger._replays.replays == 0


class _Wide(nn.Module):
    """Four layers whose words the one-launch sums take or leave: bf16 of 600 rows by 650 words
    (two items of rows by three of columns), bf16 rows of an odd length (16-bit words: the
    library's sums), a float32 conv of 36-word rows, a float64 layer of one row (two words an
    element)."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            [
                nn.Linear(1300, 600, dtype=torch.bfloat16),
                nn.Linear(39, 24, bias=False, dtype=torch.bfloat16),
                nn.Conv2d(4, 40, 3, dtype=torch.float32),
                nn.Linear(24, 1, dtype=torch.float64),
            ]
        )


def check_one_launch_sums(device: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The layout of :class:`_Wide`'s layers sums the three of int32 words with one launch and
    the bf16 one of odd rows with the library's sums; what it writes (twice in a row: the sums
    are zeroed before they are added) equals bit for bit what a layout without the launch
    writes; an edit of one unsampled element of any layer is found in that layer alone, by it
    and by the layer by layer check, and no longer once the element is put back."""
    from lorahot.kernels import word_sums

    torch.manual_seed(0)
    model = _Wide().to(device)
    runtime = lorahot.inject(model, [f"layers.{n}" for n in NAMES], max_rank=4, merged=True)
    for seed in (1, 2, 3):  # the second call captures, the third replays (on one CUDA device)
        runtime.load(_adapter(model, seed))
    merger = runtime._merger
    assert merger is not None and merger._probes is not None
    (d,) = merger._probes._devices
    assert d.word_sums is not None and d.summed == {0, 2, 3}
    layers = _layers(runtime)
    with monkeypatch.context() as patched:
        patched.setattr(word_sums, "available", lambda device: False)
        reference = WrittenProbes(layers, merger._buffers, signature(layers))
    (r,) = reference._devices
    assert r.word_sums is None and not r.summed
    for _ in range(2):
        d.write(d.now, d.now_probes)
        r.write(r.now, r.now_probes)
        assert torch.equal(d.now, r.now)
    assert torch.equal(d.then, r.now)  # the record
    for k, layer in enumerate(model.layers):
        flat = _unsampled(layer.weight)
        old = layer.weight.detach().view(-1)[flat].clone()
        with torch.no_grad():
            _bump(layer.weight, flat)
        assert _verdicts(runtime) == ([j == k for j in range(4)],) * 2
        with torch.no_grad():
            layer.weight.view(-1)[flat] = old
        assert _verdicts(runtime) == ([False] * 4,) * 2


@pytest.mark.gpu
def test_gpu_one_launch_sums_equal_the_library_sums_bitwise(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    check_one_launch_sums("cuda", monkeypatch)


@given(numel=st.integers(0, 5000))
def test_the_sampled_view_holds_the_elements_at_the_positions(numel: int) -> None:
    """The strided view the layout copies and the positions the layer by layer check gathers
    name the same elements: at most :data:`PROBE_ELEMENTS`, distinct, the first among them."""
    flat = torch.arange(numel)
    at = positions(numel, torch.device("cpu"))
    assert torch.equal(sampled(flat), flat[at])
    assert len(at) == min(PROBE_ELEMENTS, numel) == len(set(at.tolist()))
    assert numel == 0 or int(at[0]) == 0


@pytest.mark.parametrize("where", ["inject in inference mode", "all in inference mode", "laid out anew in it"])
def test_probes_laid_out_in_inference_mode_serve_calls_outside_it(where: str) -> None:
    """The layout's buffers are written in place at every call: laid out under
    ``torch.inference_mode()`` (an inject there, a model built and injected there, or a layout
    rebuilt by a call made there), they still take calls made outside it, and an edit is still
    found. Before, every later call outside inference mode raised torch's error on an in-place
    write to an inference tensor, for good."""
    torch.manual_seed(0)
    names = ["0", "1"]
    if where == "all in inference mode":
        with torch.inference_mode():
            model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))
            runtime = lorahot.inject(model, names, max_rank=4, merged=True)
            runtime.load(make_adapter(model, dict.fromkeys(names, 2), seed=1)[0])
    elif where == "inject in inference mode":
        model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))
        with torch.inference_mode():
            runtime = lorahot.inject(model, names, max_rank=4, merged=True)
    else:  # channels_last gives the conv weights new memory: the next call lays the probes out anew
        model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1))
        runtime = lorahot.inject(model, names, max_rank=4, merged=True)
        runtime.load(make_adapter(model, dict.fromkeys(names, 2), seed=1)[0])
        model.to(memory_format=torch.channels_last)
        with torch.inference_mode():
            runtime.load(make_adapter(model, dict.fromkeys(names, 2), seed=2)[0])
    for seed in (3, 4):
        runtime.load(make_adapter(model, dict.fromkeys(names, 2), seed=seed)[0])
    runtime.set_scale(0.5)
    with torch.inference_mode() if where == "all in inference mode" else torch.no_grad():
        _bump(model[1].weight, _unsampled(model[1].weight))
    with pytest.raises(lorahot.UsageError, match=r"changed since lorahot last wrote them .*:\n  - 1\n"):
        runtime.unload()


def test_a_bias_of_one_row_is_probed_flat() -> None:
    """A Linear whose bias is ``[1, out]`` (``F.linear`` broadcasts it) injects and swaps in
    merged mode, and an edit of that bias is found; before, inject failed copying it into the
    layout's flat bias."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 4))
    model[0].bias = nn.Parameter(torch.randn(1, 4))
    runtime = lorahot.inject(model, ["0", "1"], max_rank=2, merged=True)
    runtime.load(make_adapter(model, {"0": 2, "1": 2}, seed=1)[0])
    runtime.load(make_adapter(model, {"0": 2, "1": 2}, seed=2)[0])
    with torch.no_grad():
        model[0].base_layer.bias[0, 3] += 1.0
    assert _verdicts(runtime) == ([True, False],) * 2
    with pytest.raises(lorahot.UsageError, match=r"changed since lorahot last wrote them .*:\n  - 0\n"):
        runtime.set_scale(0.5)


@pytest.mark.parametrize("call", ["activate", "set_scale", "unload"])
def test_a_record_failing_again_while_rolling_back_leaves_the_runtime_usable(
    call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call whose record fails (a device fault in the sums), and whose rollback's record
    fails too: the weights hold lorahot's own writes, so once the fault is gone the next load
    goes through (before, every later call was refused as if the user had edited the weights,
    the advised unload included), and an edit after it is still found."""
    from lorahot.runtime import written_probes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 8, bias=False))
    names = ["0", "1", "2"]
    runtime = lorahot.inject(model, names, max_rank=4, merged=True, slots=2)
    runtime.load(make_adapter(model, dict.fromkeys(names, 2), seed=1)[0], slot=0)
    runtime.load(make_adapter(model, dict.fromkeys(names, 2), seed=2)[0], slot=1)
    real = written_probes.sums
    count = [0]

    def faulting(*args: object, **kwargs: object) -> torch.Tensor:
        count[0] += 1
        if 3 < count[0] <= 6:  # the call's record, then its rollback's record
            raise RuntimeError("device fault")
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(written_probes, "sums", faulting)
    with pytest.raises(lorahot.LoraError):
        {
            "activate": lambda: runtime.activate(1),
            "set_scale": lambda: runtime.set_scale(0.5),
            "unload": lambda: runtime.unload(0),
        }[call]()
    monkeypatch.setattr(written_probes, "sums", real)
    runtime.load(make_adapter(model, dict.fromkeys(names, 2), seed=4)[0])
    with torch.no_grad():
        _bump(model[2].weight, _unsampled(model[2].weight))
    with pytest.raises(lorahot.UsageError, match=r"changed since lorahot last wrote them .*:\n  - 2\n"):
        runtime.unload()


class _Ops(TorchDispatchMode):
    """Counts the torch operations dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.count += 1
        return func(*args, **(kwargs or {}))


def _check_ops(layers: int) -> int:
    """The torch operations of one check of ``layers`` merged linears (no version counter moved)."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)])
    names = [str(k) for k in range(layers)]
    runtime = lorahot.inject(model, names, max_rank=2, merged=True)
    runtime.load(make_adapter(model, dict.fromkeys(names, 2), seed=1)[0])
    merger = runtime._merger
    assert merger is not None
    with _Ops() as ops:
        merger.check_base()
    return ops.count


def test_the_check_of_every_layer_is_a_fixed_number_of_torch_ops() -> None:
    """Each check before a merged call copied every layer's samples and bias into the layout one
    piece at a time: two copies a layer, 5 ms of host time per call at 800 layers on a CPU. They
    are now one ``torch._foreach_copy_`` of views made when the layout is: four times the layers
    take the same operations."""
    assert _check_ops(16) == _check_ops(4)


def test_a_weight_whose_flat_form_is_a_copy_is_sampled_afresh_at_each_check() -> None:
    """A conv weight moved to ``channels_last`` flattens to a copy, which the layout cannot hold
    (it would go stale): its samples are taken at each write, so an edit of a sampled element
    through ``.data`` (no version counter moves) after the record is found, in its layer alone."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Linear(4, 4))
    runtime = lorahot.inject(model, ["0", "1"], max_rank=2, merged=True)
    runtime.load(make_adapter(model, {"0": 2, "1": 2}, seed=1)[0])
    model.to(memory_format=torch.channels_last)
    runtime.load(make_adapter(model, {"0": 2, "1": 2}, seed=2)[0])  # checked layer by layer, laid out anew
    merger = runtime._merger
    assert merger is not None and merger._probes is not None
    (d,) = merger._probes._devices
    assert d.copies[id(d.now)].per_write == [0]
    assert _verdicts(runtime) == ([False, False],) * 2
    with torch.no_grad():
        model[0].weight.data[0, 0, 0, 0] += 1.0  # flat element 0: sampled
    assert _verdicts(runtime) == ([True, False],) * 2
