"""Fingerprints of a write (lorahot.runtime.fingerprint): what the ranks of a tensor-parallel
model compare before writing. Equal for equal writes, different wherever a write would differ
in what it samples; the multi-rank refusals are in tests/system/test_tensor_parallel.py."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import torch
from hypothesis import given
from hypothesis import strategies as st

from lorahot.adapter import LoraModule
from lorahot.layers.base import Shard
from lorahot.runtime import fingerprint
from lorahot.runtime.plan import LoadPlan

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


def test_plans_sample_the_factors_every_rank_holds_whole() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, generator=g), torch.randn(8, 4, generator=g)
    base = fingerprint.plans([_plan(a, b)], {"q": _layer(None)})
    assert base == fingerprint.plans([_plan(a.clone(), b.clone())], {"q": _layer(None)})  # equal values, other tensors

    a_changed, b_changed = a.clone(), b.clone()
    a_changed[0, 0] += 1.0  # the first element: a sampled position
    b_changed[-1, -1] += 1.0  # the last element: a sampled position
    for dim, a_seen, b_seen in ((None, True, True), ("out", True, False), ("in", False, True)):
        layers = {"q": _layer(dim)}
        ref = fingerprint.plans([_plan(a, b)], layers)
        got_a = fingerprint.plans([_plan(a_changed, b)], layers)
        got_b = fingerprint.plans([_plan(a, b_changed)], layers)
        assert (got_a["values"] != ref["values"]) == a_seen, dim  # a column-parallel layer's A is whole
        assert (got_b["values"] != ref["values"]) == b_seen, dim  # a row-parallel layer's B is whole
        assert got_a["modules"] == got_b["modules"] == ref["modules"]


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


def test_a_plan_is_sampled_once_while_it_lives() -> None:
    """A prepared adapter's plan is fingerprinted at each load from the host cache: the second
    time from memory (its tensors do not change), and the memory goes with the plan."""
    import gc

    a, b = torch.randn(4, 8), torch.randn(8, 4)
    plan, layers = _plan(a, b), {"q": _layer(None)}
    first = fingerprint.plans([plan], layers)
    a.zero_()  # not read again: the plan's tensors are taken not to change
    assert fingerprint.plans([plan], layers) == first
    assert fingerprint.plans([_plan(a, b)], layers)["values"] != first["values"]  # a new plan is sampled
    key = (id(plan), id(layers))
    assert key in fingerprint._MEMO
    del plan
    gc.collect()
    assert key not in fingerprint._MEMO


def test_values_already_moved_to_the_arena_are_not_read() -> None:
    """Meta tensors (a plan whose values the arena holds, plan.forget_values) give no samples
    and no error."""
    meta = _plan(torch.empty(4, 8, device="meta"), torch.empty(8, 4, device="meta"))
    got = fingerprint.plans([meta], {"q": _layer(None)})
    assert got["values"] == b"" and got["modules"]


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
