"""Fingerprints of a write (lorahot.runtime.fingerprint): what the ranks of a tensor-parallel
model compare before writing. Equal for equal writes, different wherever a write would differ
in a tensor every rank holds whole; the multi-rank refusals are in
tests/system/test_tensor_parallel.py."""

from __future__ import annotations

import json
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lorahot.adapter import LoraModule
from lorahot.layers.base import Shard
from lorahot.runtime import fingerprint
from lorahot.runtime.plan import LoadPlan
from lorahot.runtime.sharding import CutFactor

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=False), st.text(max_size=6)
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.tuples(inner, inner), max_leaves=8)


@given(values, values)
def test_arguments_are_equal_exactly_when_the_values_are(x: Any, y: Any) -> None:
    def canonical(v: Any) -> Any:  # lists and tuples encode alike; a bool is not an int; a float by its bits
        if isinstance(v, (list, tuple)):
            return ("seq", tuple(canonical(i) for i in v))
        if isinstance(v, float):
            return ("float", v.hex())
        return (type(v).__name__, v)

    assert (fingerprint.arguments(x) == fingerprint.arguments(y)) == (canonical(x) == canonical(y))


def test_arguments_tell_numbers_of_other_types_and_bits_apart() -> None:
    encodings = {fingerprint.arguments(v) for v in (1, 1.0, True, "1", 0.0, -0.0, [1], (1, None))}
    assert len(encodings) == 8
    assert fingerprint.arguments(0, (1.5,), False) == fingerprint.arguments(0, [1.5], False)


def _plan(a: torch.Tensor, b: torch.Tensor, alpha: float = 8.0, name: str = "q") -> LoadPlan:
    module = LoraModule(key=name, A=a, B=b, alpha=alpha)
    scales = [torch.tensor([alpha / a.shape[0]], dtype=torch.float64)]
    return LoadPlan({name: module}, [[(0, module)]], scales, [alpha / a.shape[0]], "x", {name: a.shape[0]}, 0)


def _layer(dim: str | None) -> Any:
    shard = None if dim is None else Shard(dim=dim, rank=0, ranks=2, start=0, stop=4, size=8)  # type: ignore[arg-type]
    return SimpleNamespace(spec=SimpleNamespace(shard=shard))


def test_plans_sum_the_whole_factors_every_rank_holds_whole() -> None:
    """Any one element changed, anywhere, or two swapped (their sum kept) changes the values of
    a tensor every rank holds whole (each of A and B on an unsharded layer, A on a
    column-parallel one, B on a row-parallel one) and nothing of a sharded one."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    base = fingerprint.plans([_plan(a, b)], {"q": _layer(None)})
    assert base == fingerprint.plans([_plan(a.clone(), b.clone())], {"q": _layer(None)})  # equal values, other tensors

    def edits(t: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for k in range(t.numel()):  # every position
            changed = t.clone()
            changed.view(-1)[k] += 3.0
            out.append(changed)
        swapped = t.clone()
        swapped.view(-1)[[1, 6]] = t.view(-1)[[6, 1]]
        return [*out, swapped]

    for dim, a_seen, b_seen in ((None, True, True), ("out", True, False), ("in", False, True)):
        layers = {"q": _layer(dim)}
        ref = fingerprint.plans([_plan(a, b)], layers)
        for changed in edits(a):
            got = fingerprint.plans([_plan(changed, b)], layers)
            assert (got["values"] != ref["values"]) == a_seen, dim  # a column-parallel layer's A is whole
            assert got["modules"] == ref["modules"]
        for changed in edits(b):
            got = fingerprint.plans([_plan(a, changed)], layers)
            assert (got["values"] != ref["values"]) == b_seen, dim  # a row-parallel layer's B is whole


@pytest.mark.parametrize("dim, factor", [("out", "B"), ("in", "A")])
def test_plans_compare_the_whole_of_the_factor_each_rank_holds_a_slice_of(dim: str, factor: str) -> None:
    """A sharded layer's plan keeps the sums of the factor its ranks each hold a slice of, as
    read whole (:attr:`LoadPlan.cut`): the values move with them, the modules carry its whole
    shape (not the rank's slice), and a refusal can name it."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    whole = b if factor == "B" else a
    edited = whole.clone()
    edited[0, 0] += 1.0  # in rank 0's slice of either factor (this plan's rank keeps 0:4 of 8)

    def plan(sums_of: torch.Tensor) -> LoadPlan:
        kept = sums_of[:4] if factor == "B" else sums_of[:, :4]  # the part this rank writes
        p = _plan(a, kept) if factor == "B" else _plan(kept, b)
        p.cut = {"q": CutFactor(factor, whole.dtype, tuple(whole.shape), fingerprint.checksums([sums_of])[0])}
        return p

    layers = {"q": _layer(dim)}
    ref, got = fingerprint.plans([plan(whole)], layers), fingerprint.plans([plan(edited)], layers)
    assert got["values"] != ref["values"] and got["modules"] == ref["modules"]
    assert repr((factor, str(whole.dtype), tuple(whole.shape))).encode() in ref["modules"]
    assert [label[2] for label in json.loads(ref["tensors"])] == ["A" if factor == "B" else "B", factor]
    assert ref == fingerprint.plans([plan(whole.clone())], layers)


@given(
    st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.uint8]),
    st.integers(1, 40),
    st.integers(0, 2**32 - 1),
)
def test_checksums_are_the_exact_sums_of_the_words(dtype: torch.dtype, numel: int, seed: int) -> None:
    """sum(w), sum(w * (i % 2**16 + 1)) and sum(w * (i // 2**16 % 2**16 + 1)) over the int16
    words (int8 for an odd number of bytes), in Python integers; a batch of tensors of several
    sizes, one padded to whole blocks, sums each alone."""
    g = torch.Generator().manual_seed(seed)
    tensors = [(torch.randn(n, generator=g) * 1e3).to(dtype) for n in (numel, numel, 16, 17)]
    got = fingerprint.checksums(tensors)
    for t, row in zip(tensors, got.tolist()):
        assert row == _reference_sums(t)


def _reference_sums(t: torch.Tensor) -> list[int]:
    flat = t.reshape(-1)
    w = (flat.view(torch.int8) if flat.numel() * flat.element_size() % 2 else flat.view(torch.int16)).tolist()
    return [
        sum(w),
        sum(x * (i % 2**16 + 1) for i, x in enumerate(w)),
        sum(x * (i // 2**16 % 2**16 + 1) for i, x in enumerate(w)),
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.uint8])
def test_checksums_on_cuda_are_the_host_ones_bitwise(dtype: torch.dtype) -> None:
    """The ranks of a model may hold their copies on different devices (a preload on the host, a
    file read onto the GPU): the sums are integer operations, the same bits on every device. A
    batch mixing word counts, an odd byte count (int8 words), a tensor of several blocks whose
    weights pass 2**16, and a meta tensor (zeros)."""
    g = torch.Generator().manual_seed(3)
    host = [(torch.randn(n, generator=g) * 1e3).to(dtype) for n in (1, 17, 4096, 2**17 + 5, 3 * 2**16)]
    host.append(torch.empty(8, dtype=dtype, device="meta"))
    cuda = [t if t.is_meta else t.cuda() for t in host]
    want = fingerprint.checksums(host)
    got = fingerprint.checksums(cuda)
    assert got.device.type == "cpu" and torch.equal(got, want)
    assert want[:2].tolist() == [_reference_sums(t) for t in host[:2]] and want[-1].eq(0).all()


def test_a_swap_whose_distance_is_a_multiple_of_2_16_words_moves_the_third_sum() -> None:
    """Two words 2**16 positions apart have the same weight in the second sum: the third, by
    the position's high 16 bits, tells them apart. A tensor of 2**17 + 3 words (padded)."""
    t = torch.arange(2**17 + 3, dtype=torch.int16)
    t[5], t[5 + 2**16] = 100, -7
    swapped = t.clone()
    swapped[[5, 5 + 2**16]] = t[[5 + 2**16, 5]]
    got = fingerprint.checksums([t, swapped])
    assert got[0].tolist() == _reference_sums(t) and got[1].tolist() == _reference_sums(swapped)
    assert got[0, 0] == got[1, 0] and got[0, 1] == got[1, 1] and got[0, 2] != got[1, 2]


def test_plans_tell_alphas_ranks_targets_and_parts_apart() -> None:
    a, b = torch.ones(4, 8), torch.ones(8, 4)
    layers = {"q": _layer(None), "k": _layer(None)}
    ref = fingerprint.plans([_plan(a, b)], layers)["modules"]
    others = [
        [_plan(a, b, alpha=16.0)],
        [_plan(a[:2], b[:, :2])],
        [_plan(a, b, name="k")],
        [_plan(a, b), _plan(a, b)],
        [replace(_plan(a, b), skipped=("x.lora_A.weight",))],
        [_plan(a.double(), b.double())],
    ]
    got = [fingerprint.plans(parts, layers)["modules"] for parts in others]
    assert ref not in got and len(set(got)) == len(got)


def test_digests_are_signed_64_bit_and_differ_for_different_data() -> None:
    d = [fingerprint.digest(bytes([i])) for i in range(256)]
    assert all(-(2**63) <= x < 2**63 for x in d) and len(set(d)) == 256


def test_a_plan_is_summed_once_while_it_lives() -> None:
    """A prepared adapter's plan is fingerprinted at each load from the host cache: the second
    time from memory (its tensors do not change), and the memory goes with the plan."""
    import gc

    a, b = torch.randn(4, 8), torch.randn(8, 4)
    plan, layers = _plan(a, b), {"q": _layer(None)}
    first = fingerprint.plans([plan], layers)
    a.zero_()  # not read again: the plan's tensors are taken not to change
    assert fingerprint.plans([plan], layers) == first
    assert fingerprint.plans([_plan(a, b)], layers)["values"] != first["values"]  # a new plan is summed
    key = (id(plan), id(layers))
    assert key in fingerprint._MEMO
    del plan
    gc.collect()
    assert key not in fingerprint._MEMO


def test_values_already_moved_to_the_arena_are_not_read() -> None:
    """Meta tensors (a plan whose values the arena holds, plan.forget_values) sum to zeros,
    without an error."""
    meta = _plan(torch.empty(4, 8, device="meta"), torch.empty(8, 4, device="meta"))
    got = fingerprint.plans([meta], {"q": _layer(None)})
    assert got["values"] == bytes(2 * 8 * fingerprint.SUMS) and got["modules"]


def test_a_routing_tensor_is_encoded_by_its_values_whatever_its_integer_dtype() -> None:
    """``activate``'s per-row routing reaches the ranks' agreement as a host integer tensor,
    encoded from its int64 bytes (a million tokens would take seconds one int at a time):
    equal routings encode equally in any integer dtype, different ones differently, and a
    tensor never encodes as the list of its values."""
    route = torch.tensor([0, 1, -1, 1])
    assert fingerprint.arguments("rows", route) == fingerprint.arguments("rows", route.to(torch.int32))
    assert fingerprint.arguments("rows", route) != fingerprint.arguments("rows", route.flip(0))
    assert fingerprint.arguments("rows", route) != fingerprint.arguments("rows", route[:3])
    assert fingerprint.arguments("rows", route) != fingerprint.arguments("rows", route.tolist())
