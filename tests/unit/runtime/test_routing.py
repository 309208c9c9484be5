"""``runtime.activate`` with one slot per row (lorahot.runtime.routing): refusals that change
nothing, the routing tensors written in place, and the property that any routing of any batch
equals the per-row float64 reference."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from types import FrameType

import numpy as np
import pytest
import torch
import torch._dynamo.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import lorahot
from lorahot.kernels.routed_lora import segments
from lorahot.layers import routing as layer_routing
from lorahot.layers.tensor_handles import ROUTES, SEGMENTS, TOKENS
from lorahot.runtime.routing import expert_layers
from tests.helpers import dense_delta, make_adapter, model_reference, tiny_lm, token_ids

TARGETS = ["q_proj", "v_proj", "up_proj", "embed_tokens"]


def _runtime(
    slots: int = 3, merged: bool = False, filled: int = 2
) -> tuple[torch.nn.Module, lorahot.LoraRuntime, list]:
    model = tiny_lm(dtype=torch.float64)
    runtime = lorahot.inject(model, TARGETS, max_rank=4, slots=slots, merged=merged)
    names = list(runtime.layers)
    held = []
    for k in range(filled):
        ranks = {n: 1 + (k + i) % 4 for i, n in enumerate(names) if (k + i) % 3}
        tensors, ab = make_adapter(model, ranks, seed=k, dtype=torch.float64)
        runtime.load(tensors, slot=k, scale=0.5 * (k + 1))
        held.append({n: (a, b, 0.5 * (k + 1)) for n, (a, b) in ab.items()})
    return model, runtime, held


def _snapshot(runtime: lorahot.LoraRuntime, model: torch.nn.Module) -> tuple:
    keys = [a.handle.key for a in runtime.buffers.arenas]
    routes = [None if d[k] is None else d[k].clone() for k in keys for d in (ROUTES, SEGMENTS)]
    arenas = [t.clone() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S, a.E)]
    weights = [p.detach().clone() for p in model.parameters()]
    return (runtime.routing, runtime.active_slot, [TOKENS[k] for k in keys]), None, routes, arenas, weights


def _same(a: tuple, b: tuple) -> bool:
    if a[:2] != b[:2]:
        return False
    pairs = list(zip(a[3] + a[4], b[3] + b[4])) + [(x, y) for x, y in zip(a[2], b[2]) if x is not None]
    return all(torch.equal(x, y) for x, y in pairs) and [x is None for x in a[2]] == [y is None for y in b[2]]


def _quantized(values: list[float]) -> torch.Tensor:
    with warnings.catch_warnings():  # torch warns that its quantized tensors are deprecated
        warnings.simplefilter("ignore")
        return torch.quantize_per_tensor(torch.tensor(values), 1.0, 0, torch.quint8)


REFUSALS = [
    ([0, 3], {}, r"routing entries out of range \(slots 0\.\.2, or -1 for the base model only\):\n  - row 1: 3"),
    ([-2], {}, "row 0: -2"),
    ([0, 2], {}, "the routing sends rows to empty slot 2; load an adapter there first"),
    ([], {}, "the routing is empty"),
    ([0, 1.0], {}, r"routing entry 1 is 1\.0 \(float\)"),
    ([True], {}, r"routing entry 0 is True \(bool\)"),
    (torch.tensor([[0, 1]]), {}, r"1-D with an integer dtype .* got torch.int64 of shape \(1, 2\)"),
    (torch.tensor([0.0, 1.0]), {}, "got torch.float32"),
    (
        torch.tensor(1),
        {},
        r"of shape \(\); .* \(a 0-D one holds one slot: activate\(int\(slot\)\) runs the whole batch",
    ),
    (
        torch.tensor(1, dtype=torch.uint8),
        {},
        r"got torch.uint8 of shape \(\); .* activate\(\[int\(slot\)\]\) a batch of one",
    ),
    (
        torch.tensor(1.0),
        {},
        r"got torch.float32 of shape \(\); pass e.g. torch.tensor\(\[0, 2, -1\]\) or a list of ints\.$",
    ),
    ("01", {}, "slot=.01. is a str; a slot is an int"),
    (None, {}, "slot=None is a NoneType; a slot is an int"),
    (np.array([0.0, 1.0]), {}, "routing array must be 1-D with an integer dtype"),
    (np.array(0), {}, r"routing array must be 1-D .* of shape \(\); .* activate\(int\(slot\)\) runs the whole batch"),
    (np.array(0.0), {}, r"got float64 of shape \(\); pass e.g. np.array\(\[0, 2, -1\]\) or a list of ints\.$"),
    (np.array([0, 2**64 - 1], dtype=np.uint64), {}, "routing entry 1 is 18446744073709551615, out of range"),
    (torch.tensor([0, 2**63], dtype=torch.uint64), {}, "routing entry 1 is 9223372036854775808, out of range"),
    ([0, 1], {"lengths": np.array([2.0, 3.0])}, r"lengths=array\(\[2\., 3\.\]\) must hold one token count"),
    (torch.empty(2, dtype=torch.int64, device="meta"), {}, "on the meta device"),
    ([2**70], {}, r"routing entry 0 is 1180591620717411303424, out of range"),
    # after plain ints, which are read in one conversion: each entry still named as it is
    ([0, 1, 2**63], {}, r"routing entry 2 is 9223372036854775808, out of range"),
    ([0, True], {}, r"routing entry 1 is True \(bool\)"),
    ([0, 1.5], {}, r"routing entry 1 is 1\.5 \(float\)"),
    ([0, "1"], {}, r"routing entry 1 is '1' \(str\)"),
    ([0, None], {}, r"routing entry 1 is None \(NoneType\)"),
    ([0, [1]], {}, r"routing entry 1 is \[1\] \(list\)"),
    ([0, -2, 1], {}, r"\n  - row 1: -2$"),
    ([0, 1], {"lengths": [1, True]}, "one token count"),
    ([0, 1], {"lengths": [2**40, 1]}, r"at most 16777216 in all"),
    (np.int64(1), {"lengths": [3]}, r"applies to a per-row routing"),
    ([0, 1], {"lengths": [3]}, "one token count"),
    ([0, 1], {"lengths": [3, -1]}, "one token count"),
    ([0, 1], {"lengths": [0, 0]}, "at least one token"),
    (1, {"lengths": [3]}, r"applies to a per-row routing .* not to activate\(1\)"),
    (5, {}, r"slot=5 is out of range"),
    (torch.tensor([0, 1]).to_sparse(), {}, "must be a plain dense tensor, got a sparse_coo one"),
    (_quantized([0.0, 1.0]), {}, "got a quantized one"),
    (bytearray([0, 1]), {}, "got bytearray"),
    (memoryview(bytes([0, 1])), {}, "got memoryview"),
    ([0, 1], {"lengths": torch.tensor([2, 3]).to_sparse()}, "one token count"),
    ([0, 1], {"lengths": bytearray([2, 3])}, "one token count"),
    ([0, 1], {"lengths": torch.tensor([True, True])}, "one token count"),
    ([0, 1], {"lengths": np.array([1, 2**64 - 1], dtype=np.uint64)}, r"lengths=.* must hold one token count"),
    ([0, 1], {"lengths": torch.tensor([1, 2**63], dtype=torch.uint64)}, r"lengths=.* must hold one token count"),
    ([0, 1], {"lengths": [1, 2**64]}, r"lengths=.* must hold one token count"),
    # counts whose int64 sum wraps round to a small total (2**64 + 1): each count is bounded first
    ([0, 1, 0], {"lengths": [2**63 - 1, 2**63 - 1, 3]}, r"at most 16777216 in all"),
    ([0, 1, 0], {"lengths": torch.tensor([2**63 - 1, 2**63 - 1, 3])}, r"at most 16777216 in all"),
    (
        [3] * 25,
        {},
        r"row 19: 3\n  \.\.\. and 5 more",
    ),  # bits dtypes are integers to no check but hold raw bits no operator reads as numbers
    (torch.tensor([0, 1], dtype=torch.uint8).view(torch.bits8), {}, "got torch.bits8"),
    (torch.tensor([0, 1], dtype=torch.int16).view(torch.bits16), {}, "got torch.bits16"),
    ([0, 1], {"lengths": torch.tensor([2, 3], dtype=torch.uint8).view(torch.bits8)}, "one token count"),
    ([0, 1], {"lengths": torch.tensor([2, 3], dtype=torch.int16).view(torch.bits16)}, "one token count"),
]


@pytest.mark.parametrize(("slots", "kwargs", "match"), REFUSALS)
def test_bad_routings_raise_typed_errors_and_change_nothing(slots: object, kwargs: dict, match: str) -> None:
    model, runtime, _ = _runtime()
    runtime.activate([1, -1])
    before = _snapshot(runtime, model)
    with pytest.raises(lorahot.UsageError, match=match):
        runtime.activate(slots, **kwargs)
    assert _same(before, _snapshot(runtime, model))


def test_merged_mode_refuses_a_routing_saying_why_and_what_to_do() -> None:
    model, runtime, _ = _runtime(merged=True)
    before = _snapshot(runtime, model)
    with pytest.raises(lorahot.UsageError, match="merged=True: the active adapter is folded into the base weights"):
        runtime.activate([0, 1])
    assert _same(before, _snapshot(runtime, model))


def test_a_routing_of_the_same_length_is_written_in_place() -> None:
    _, runtime, _ = _runtime()
    key = runtime.buffers.arenas[0].handle.key
    runtime.activate([0, 1, -1])
    first = ROUTES[key]
    runtime.activate(torch.tensor([1, 1, 0]))
    assert ROUTES[key] is first and first.tolist() == [1, 1, 0]
    runtime.activate([0, -1])  # another length: its own tensor
    assert ROUTES[key] is not first and ROUTES[key].shape == (2,)
    runtime.activate([0, -1, 0])
    assert ROUTES[key] is first
    runtime.activate(0)
    assert ROUTES[key] is None and runtime.routing is None


def test_routing_is_grouped_by_slot_once_and_written_in_place() -> None:
    """The segmented kernels read the routing's segments from the runtime, computed at activate,
    rather than sorting it again in every layer."""
    _, runtime, _ = _runtime()
    key = runtime.buffers.arenas[0].handle.key
    runtime.activate([1, -1, 0, 1])
    first = SEGMENTS[key]
    assert first.tolist() == segments(torch.tensor([1, -1, 0, 1]), 3).tolist()
    runtime.activate([0, 0, -1, 1])
    assert SEGMENTS[key] is first and first.tolist() == segments(torch.tensor([0, 0, -1, 1]), 3).tolist()
    runtime.activate(1)
    assert SEGMENTS[key] is None


def test_loads_scales_and_unloads_reach_routed_rows_at_once() -> None:
    model, runtime, _ = _runtime()
    ids = token_ids((2, 5), 32, seed=4)
    runtime.activate([1, 0])
    runtime.set_scale(0.0, slot=1)
    runtime.unload(0)
    with torch.no_grad():
        out = model(ids)
    base = model_reference(tiny_lm(dtype=torch.float64), ids, {})
    torch.testing.assert_close(out, base, rtol=1e-12, atol=1e-12)


_ROUTING = st.integers(1, 5).flatmap(lambda n: st.lists(st.integers(-1, 2), min_size=n, max_size=n))


@pytest.mark.parametrize("form", ["chosen", "gathered", "every-slot"])
@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(route=_ROUTING, length=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_any_routing_of_any_batch_equals_the_per_row_reference(
    route: list[int], length: int, seed: int, form: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each row against its own float64 reference, for the library formula's choice between
    its two forms (``lorahot.layers.routing.gathers``) and for each form forced."""
    if form != "chosen":
        monkeypatch.setattr(layer_routing, "gathers", lambda *args: form == "gathered")
    model, runtime, held = _runtime(filled=3)
    ids = token_ids((len(route), length), 32, seed=seed)
    runtime.activate(route)
    with torch.no_grad():
        out = model(ids)
    reference = tiny_lm(dtype=torch.float64)
    for i, slot in enumerate(route):
        want = model_reference(reference, ids[i : i + 1], held[slot] if slot >= 0 else {})
        torch.testing.assert_close(out[i : i + 1], want, rtol=1e-10, atol=1e-10)


def test_numpy_routings_and_slots_are_taken_as_their_ints() -> None:
    _, runtime, _ = _runtime()
    runtime.activate(np.array([1, -1, 0], dtype=np.int32))
    assert runtime.routing == (1, -1, 0)
    runtime.activate([0, np.int64(1), -1])  # a list of ints of several types: each read as its int
    assert runtime.routing == (0, 1, -1)
    runtime.activate(np.int64(1))
    assert runtime.routing is None and runtime.active_slot == 1


def test_the_tensors_of_the_most_recent_lengths_are_kept_and_older_ones_dropped() -> None:
    """Packed input makes each new token total a new routing length: the runtime keeps tensors
    for the KEPT_LENGTHS lengths set last (a routing of one of them is written in place), and
    a length dropped gets new tensors, with the right values, when it comes back."""
    from lorahot.runtime.routing import KEPT_LENGTHS

    _, runtime, _ = _runtime()
    key = runtime.buffers.arenas[0].handle.key
    runtime.activate([0, 1], lengths=[1, 1])
    first = ROUTES[key]
    for total in range(3, 3 + KEPT_LENGTHS - 1):  # the first length stays among the most recent
        runtime.activate([0, 1], lengths=[1, total - 1])
    runtime.activate([1, 0], lengths=[1, 1])
    assert ROUTES[key] is first and first.tolist() == [1, 0]
    for total in range(100, 100 + KEPT_LENGTHS):  # now it is dropped
        runtime.activate([0, -1], lengths=[total - 1, 1])
        assert ROUTES[key].tolist() == [0] * (total - 1) + [-1]
    runtime.activate([-1, 1], lengths=[1, 1])
    assert ROUTES[key] is not first and ROUTES[key].tolist() == [-1, 1]
    assert runtime.routing == (-1, 1)


def test_a_packed_routing_of_millions_of_tokens_is_checked_on_tensors() -> None:
    """2**22 one-token rows: every entry was checked in Python (an ABC isinstance each), 8M rows
    took 6-25 s and a refusal 5-15 s; the checks now run on tensors."""
    import time

    _, runtime, _ = _runtime()
    rows = 1 << 22
    slots, lengths = torch.zeros(rows, dtype=torch.int64), torch.ones(rows, dtype=torch.int64)
    start = time.perf_counter()
    runtime.activate(slots, lengths=lengths)
    lengths[-1] = -1
    with pytest.raises(lorahot.UsageError, match="one token count"):
        runtime.activate(slots, lengths=lengths)
    assert time.perf_counter() - start < 10
    runtime.activate([0, 1], lengths=np.array([2, 3], dtype=np.int32))
    assert runtime.info(0) is not None


def _lorahot_lines(call: Callable[[], object]) -> int:
    """How many lines of lorahot's own code run during ``call()`` (every frame traced)."""
    package = str(Path(lorahot.__file__).parent)
    count = 0

    def trace(frame: FrameType, event: str, arg: object) -> Callable | None:
        nonlocal count
        if not frame.f_code.co_filename.startswith(package):
            return None
        count += event == "line"
        return trace

    sys.settrace(trace)
    try:
        call()
    finally:
        sys.settrace(None)
    return count


@pytest.mark.parametrize(
    "routing",
    [
        lambda n: ([0, 1, -1, 1] * n, None),
        lambda n: ([0, 1, -1, 1] * n, {"lengths": [1, 2, 0, 3] * n}),
        lambda n: (np.array([0, 1, -1, 1] * n, dtype=np.int32), None),
        lambda n: (np.array([0, 1, 0, 1] * n, dtype=np.uint64), None),
    ],
    ids=["list", "list-lengths", "int32-array", "uint64-array"],
)
def test_a_routing_list_is_checked_without_a_python_step_per_entry(routing: Callable) -> None:
    """A routing of 2**25 entries given as a list took 15-25 s in activate, each entry checked by
    a line of Python (an isinstance, a range compare, a sort for the slots it names); now the
    entries are read in one conversion and checked on the tensor, so the lines of lorahot that
    run do not grow with the routing's length (4 rows and 1028, each set once before so that
    both find their routing tensors allocated)."""
    _, runtime, _ = _runtime()
    lines = []
    for n in (1, 257):
        slots, kwargs = routing(n)
        kwargs = kwargs or {}
        runtime.activate(slots, **kwargs)
        lines.append(_lorahot_lines(partial(runtime.activate, slots, **kwargs)))
    assert lines[0] == lines[1], lines


class _Positions(torch.nn.Module):
    """GPT-2's embeddings: token ids ``[B, T]`` and position ids ``[1, T]`` that every row shares."""

    def __init__(self) -> None:
        super().__init__()
        self.wte = torch.nn.Embedding(32, 8, dtype=torch.float64)
        self.wpe = torch.nn.Embedding(16, 8, dtype=torch.float64)
        self.head = torch.nn.Linear(8, 8, dtype=torch.float64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(ids.shape[1])[None]
        return self.head(self.wte(ids) + self.wpe(positions))


@pytest.mark.parametrize("tokens", [3, 4])
def test_an_input_every_row_shares_is_refused_even_where_its_tokens_match_the_batch(tokens: int) -> None:
    """Position ids ``[1, T]`` under a routing of ``B`` rows cannot take a slot per row; with
    ``T == B`` their shape once read as one entry per token and each position took the slot of
    the row of its index: silent wrong numbers. A batch of one row (the negative control) runs
    and matches its float64 reference."""
    torch.manual_seed(0)
    model = _Positions()
    reference = _Positions()
    reference.load_state_dict(model.state_dict())
    runtime = lorahot.inject(model, ["wte", "wpe", "head"], max_rank=2, slots=2)
    tensors, ab = make_adapter(model, {"wte": 2, "wpe": 2, "head": 1}, dtype=torch.float64)
    runtime.load(tensors, slot=0)
    runtime.activate([0, -1, 0])
    with torch.no_grad(), pytest.raises(lorahot.UsageError, match=r"^wpe \(LoRAEmbedding.*position ids \[1, T\]"):
        model(token_ids((3, tokens), 32, seed=1))
    runtime.activate([0])
    ids = token_ids((1, tokens), 32, seed=2)
    with torch.no_grad():
        out = model(ids)
    want = model_reference(reference, ids, {n: (a, b, 1.0) for n, (a, b) in ab.items()})
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_one_entry_per_token_is_read_so_only_with_lengths() -> None:
    """Packed input ``[1, N]`` routed per token: a routing of ``N`` entries without
    ``lengths`` is one per row, so it is refused (it cannot be told from ``N`` rows whose
    input every row shares); with ``lengths`` it runs, and over a batch ``[B, T]`` routed per
    token it equals the same batch routed per row."""
    model, runtime, held = _runtime()
    packed = token_ids((1, 5), 32, seed=3)
    runtime.activate([0, 0, 1, 1, 1])
    with torch.no_grad(), pytest.raises(lorahot.UsageError, match=r"packed input is routed per token with activate"):
        model(packed)
    runtime.activate([0, 1], lengths=[2, 3])
    with torch.no_grad():
        out = model(packed)
    torch.testing.assert_close(out, _per_token_reference(packed, torch.tensor([0, 0, 1, 1, 1]), held))
    batch = token_ids((2, 4), 32, seed=4)
    runtime.activate([1, 0])
    with torch.no_grad():
        per_row = model(batch)
    runtime.activate([1, 0], lengths=[4, 4])
    with torch.no_grad():
        per_token = model(batch)
    torch.testing.assert_close(per_token, per_row, rtol=1e-12, atol=1e-12)


def _per_token_reference(ids: torch.Tensor, slots: torch.Tensor, held: list) -> torch.Tensor:
    """The float64 reference of ``tiny_lm`` where token ``i`` (of the flattened ids) takes slot
    ``slots[i]``'s update in every layer (attention mixes the tokens, so no token runs alone)."""
    reference = tiny_lm(dtype=torch.float64)

    def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor, name: str) -> torch.Tensor:
        for slot, loras in enumerate(held):
            if name in loras:
                a, b, scale = loras[name]
                own = (slots == slot).reshape(out.shape[:-1])[..., None]
                out = out + own * scale * dense_delta(module, args[0], a, b)
        return out

    for name in {n for loras in held for n in loras}:
        reference.get_submodule(name).register_forward_hook(lambda m, a, o, name=name: hook(m, a, o, name))
    with torch.no_grad():
        return reference(ids)


class _MoE(torch.nn.Module):
    """A Switch-style mixture-of-experts block: a router picks one expert per token, each expert
    runs on the tokens it was given (gathered), a shared expert on every token."""

    def __init__(self, experts: int = 2) -> None:
        super().__init__()
        self.router = torch.nn.Linear(8, experts, dtype=torch.float64)
        self.experts = torch.nn.ModuleList(torch.nn.Linear(8, 8, dtype=torch.float64) for _ in range(experts))
        self.shared_experts = torch.nn.Linear(8, 8, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        choice = self.router(flat).argmax(-1)
        out = self.shared_experts(flat)
        for e, expert in enumerate(self.experts):
            picked = (choice == e).nonzero().flatten()
            out = out.index_add(0, picked, expert(flat[picked]))
        return out.reshape(x.shape)


def test_expert_layers_are_an_experts_component_not_shared_experts() -> None:
    names = [
        "model.layers.0.block_sparse_moe.experts.3.w1",
        "encoder.block.1.layer.1.mlp.experts.expert_0.wi",
        "model.layers.0.mlp.shared_experts.gate_proj",
        "model.layers.0.mlp.shared_expert.up_proj",
        "experts_router",
        "unet:experts.0",
    ]
    assert expert_layers(names) == [names[0], names[1], names[5]]


def test_a_routing_to_an_adapter_on_moe_experts_is_refused_and_the_rest_routes() -> None:
    """An expert sees the tokens its router gathered, in its order: a per-row routing cannot
    follow them (a subset of exactly ``L`` tokens, or every token, fits the routing's length
    by shape). A routing that sends rows to an adapter with weights on the experts is refused,
    and so is a load of one into a routed slot, changing nothing; routings to an adapter on
    the router and the shared expert only (flattened tokens, in order) run and match each row
    run alone."""
    torch.manual_seed(0)
    model = _MoE()
    runtime = lorahot.inject(model, ["router", "experts.0", "experts.1", "shared_experts"], max_rank=2, slots=3)
    on_experts, _ = make_adapter(model, {"experts.0": 2, "shared_experts": 1}, seed=1, dtype=torch.float64)
    elsewhere, _ = make_adapter(model, {"router": 2, "shared_experts": 2}, seed=2, dtype=torch.float64)
    runtime.load(on_experts, slot=0)
    runtime.load(elsewhere, slot=1)
    runtime.activate([1, -1])
    before = _snapshot(runtime, model)
    with pytest.raises(lorahot.UsageError, match=r"slot 0, whose adapter has weights on the experts .*'experts.0'"):
        runtime.activate([1, 0])
    with pytest.raises(lorahot.UsageError, match=r"slot 0, .*activate\(0\)"):
        runtime.activate([0, -1], lengths=[3, 2])
    assert _same(before, _snapshot(runtime, model))
    with pytest.raises(lorahot.UsageError, match=r"slot 1, whose adapter has weights on the experts"):
        runtime.load(on_experts, slot=1)
    assert _same(before, _snapshot(runtime, model))
    runtime.load(on_experts, slot=2)  # a slot the routing does not use
    x = torch.randn(4, 5, 8, dtype=torch.float64)
    route = [1, -1, -1, 1]
    runtime.activate(route)
    with torch.no_grad():
        out = model(x)
        runtime.activate([0, 0, 0, 0])  # every row on the expert adapter: the whole batch on it
        every = model(x)
        assert runtime.routing == (0, 0, 0, 0) and runtime.active_slot == 0
        runtime.unload(2)
        for i, slot in enumerate(route):
            runtime.activate(slot if slot >= 0 else 2)
            torch.testing.assert_close(out[i : i + 1], model(x[i : i + 1]), rtol=1e-12, atol=1e-12)
        runtime.activate(0)
        torch.testing.assert_close(every, model(x), rtol=0, atol=0)
        runtime.load(on_experts, slot=2)
        runtime.activate([1, -1])  # an expert's gathered tokens, of any count, compute its base output
        for seed in range(8):
            x = torch.randn(2, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
            runtime.activate([1, -1])
            out = model(x)
            for i, slot in enumerate((1, -1)):
                runtime.activate(slot if slot >= 0 else 0)
                if slot < 0:
                    runtime.unload(0)
                torch.testing.assert_close(out[i : i + 1], model(x[i : i + 1]), rtol=1e-12, atol=1e-12)


def test_editing_what_info_or_load_returned_changes_neither_the_record_nor_the_routing_checks() -> None:
    """``AdapterInfo.ranks`` (and each ``PartInfo``'s) was the runtime's own plan: a caller who
    edited the dict ``load`` or ``info()`` returned changed what ``info()`` reported and what the
    routing checks read, and with it cleared a routing that sends rows to an adapter on the
    experts ran, each expert computing its base output for them (3.58 off the row run alone, on a random input)."""
    torch.manual_seed(0)
    model = _MoE()
    runtime = lorahot.inject(model, ["router", "experts.0", "experts.1", "shared_experts"], max_rank=2, slots=2)
    on_experts, _ = make_adapter(model, {"experts.0": 2, "shared_experts": 1}, seed=1, dtype=torch.float64)
    elsewhere, _ = make_adapter(model, {"router": 2}, seed=2, dtype=torch.float64)
    loaded = runtime.load(on_experts, slot=0)
    runtime.load([elsewhere], slot=1)
    want = {0: runtime.info(0), 1: runtime.info(1)}
    assert loaded == want[0] and want[0].ranks == {"experts.0": 2, "shared_experts": 1}
    for edited in (loaded, runtime.info(0), runtime.info(1)):
        for ranks in (edited.ranks, *(p.ranks for p in edited.parts)):
            ranks.clear()
        edited.components["x"] = 1
    assert runtime.info(0) == want[0] and runtime.info(1) == want[1]
    assert runtime.info(0).ranks == {"experts.0": 2, "shared_experts": 1}
    before = _snapshot(runtime, model)
    with pytest.raises(lorahot.UsageError, match=r"slot 0, whose adapter has weights on the experts .*'experts.0'"):
        runtime.activate([1, 0])
    assert _same(before, _snapshot(runtime, model))


def test_a_routing_of_one_slot_for_every_row_runs_as_the_whole_batch_on_it() -> None:
    """Every row on slot k computes what ``activate(k)`` does for any batch (no row can take
    another's slot), so the runtime runs it so: nothing is published to the layers, the live
    region holds k (copied only when another slot was live), ``routing`` still reports the
    routing and ``active_slot`` is k. Bitwise the whole-batch output, also over a batch of
    another size or layout (which a per-row routing would refuse); a load into k reaches it at
    once; a routing with a -1 among its entries is per row again."""
    model, runtime, held = _runtime()
    keys = [a.handle.key for a in runtime.buffers.arenas]
    ids = token_ids((3, 4), 32, seed=6)
    with torch.no_grad():
        runtime.activate(1)
        whole = model(ids)
        runtime.activate([0, -1, 1])
        runtime.activate(torch.tensor([1, 1, 1]))
        assert runtime.routing == (1, 1, 1) and runtime.active_slot == 1
        assert all(ROUTES[k] is None and not TOKENS[k] for k in keys)
        assert torch.equal(model(ids), whole)
        assert torch.equal(model(ids[:2]), whole[:2])  # a batch of 2 under a routing of 3 entries
        runtime.activate([1, 1], lengths=[5, 7])  # packed, every token on slot 1
        packed = ids.reshape(1, -1)
        got = model(packed)
        runtime.activate(1)
        assert torch.equal(got, model(packed))
        runtime.activate([0, 0, 0])  # another slot: copied into the live region
        torch.testing.assert_close(model(ids[:1]), model_reference(tiny_lm(dtype=torch.float64), ids[:1], held[0]))
        tensors, ab = make_adapter(model, dict.fromkeys(runtime.layers, 2), seed=9, dtype=torch.float64)
        runtime.load(tensors, slot=0)
        want = model_reference(tiny_lm(dtype=torch.float64), ids, {n: (a, b, 1.0) for n, (a, b) in ab.items()})
        torch.testing.assert_close(model(ids), want, rtol=1e-10, atol=1e-10)
        runtime.activate([0, 0, -1])
        assert all(ROUTES[k] is not None for k in keys) and runtime.routing == (0, 0, -1)


def test_merged_mode_takes_a_routing_of_one_slot_for_every_row_as_the_whole_batch() -> None:
    """Merged mode cannot route, but one slot for every row is the whole batch on it: taken as
    ``activate(k)`` (the same merged weights), while a mixed routing is refused, changing nothing."""
    model, runtime, _ = _runtime(merged=True)
    ids = token_ids((2, 3), 32, seed=7)
    with torch.no_grad():
        runtime.activate(1)
        whole = model(ids)
        runtime.activate(0)
        runtime.activate([1, 1])
        assert runtime.active_slot == 1 and runtime.routing == (1, 1)
        assert torch.equal(model(ids), whole)
        with pytest.raises(lorahot.UsageError, match="merged=True"):
            runtime.activate([1, 0])
        assert runtime.active_slot == 1 and runtime.routing == (1, 1)
        assert torch.equal(model(ids), whole)


def test_merged_mode_takes_a_routing_of_minus_one_for_every_row_as_the_base_weights_for_the_whole_batch() -> None:
    """Every row at -1 is no adapter for the whole batch: merged mode runs it on the base
    weights (bitwise the base model's output), ``active_slot`` stays, ``routing`` reports the
    -1s, a load or ``set_scale`` of the active slot meanwhile changes no weight, and the next
    ``activate`` merges again. A compiled model does not recompile across any of it. Before,
    the routing was refused as a mixed batch."""
    model, runtime, _ = _runtime(merged=True)
    ids = token_ids((2, 3), 32, seed=7)
    base = tiny_lm(dtype=torch.float64)
    counter = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True, dynamic=False)
    with torch.no_grad():
        want = base(ids)
        runtime.activate(1)
        whole = compiled(ids)
        assert not torch.allclose(whole, want)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for route, kwargs in (([-1, -1], {}), (torch.tensor([-1, -1]), {}), ([-1, -1], {"lengths": [1, 1]})):
                runtime.activate(route, **kwargs)
                assert runtime.active_slot == 1 and runtime.routing == (-1, -1)
                assert runtime.info() is not None and runtime.info().slot == 1
                assert torch.equal(compiled(ids), want)
            before = _snapshot(runtime, model)
            with pytest.raises(lorahot.UsageError, match=r"merged=True.*activate\(\[-1\] \* rows\)"):
                runtime.activate([-1, 1])
            assert _same(before, _snapshot(runtime, model))
            tensors, ab = make_adapter(model, dict.fromkeys(runtime.layers, 2), seed=9, dtype=torch.float64)
            runtime.load(tensors, slot=1)  # the active slot: no weight changes under the routing
            runtime.set_scale(2.0)
            assert torch.equal(compiled(ids), want)
            runtime.activate([1, 1])
            loaded = model_reference(tiny_lm(dtype=torch.float64), ids, {n: (a, b, 2.0) for n, (a, b) in ab.items()})
            torch.testing.assert_close(compiled(ids), loaded, rtol=1e-10, atol=1e-10)
            runtime.activate([-1, -1])
            assert torch.equal(compiled(ids), want)
            runtime.activate(1)  # the whole batch on slot 1 again
            torch.testing.assert_close(compiled(ids), loaded, rtol=1e-10, atol=1e-10)
            assert runtime.routing is None
    assert counter.frame_count == 1


def test_a_traced_model_follows_swaps_and_refuses_a_per_row_routing() -> None:
    """``torch.jit.trace`` recorded the layers' live views as constants, pooled by value: slot
    0 (active when traced) holds nothing for two layers, whose zero A and B became one tensor,
    so after ``activate(1)`` the traced model was off by 7.43 from the float64 reference. It now
    reads the arena buffers, and follows ``activate(k)``, ``set_scale`` and a load into the live
    slot. It records the one-slot path, so under a per-row routing it computed the live slot
    for every row (max abs diff 1.95 on a float32 tiny LM): a per-row routing is refused once
    the model was traced, changing nothing, while one slot for every row (the whole batch)
    passes. A trace under a per-row routing, which failed with an AssertionError from inside
    the routed path, is a UsageError and leaves routing possible."""
    base = tiny_lm(dtype=torch.float64)  # the model _runtime injects, as it was
    model, runtime, held = _runtime()
    ids = token_ids((2, 5), 32, seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings of the model's own shape reads
        traced = torch.jit.trace(model, ids)
    runtime.activate(1)
    torch.testing.assert_close(traced(ids), model_reference(base, ids, held[1]), rtol=0, atol=1e-12)
    runtime.set_scale(0.5)
    one = {n: (a, b, s * 0.5) for n, (a, b, s) in held[1].items()}
    torch.testing.assert_close(traced(ids), model_reference(base, ids, one), rtol=0, atol=1e-12)
    tensors, ab = make_adapter(base, {"layers.1.mlp.up_proj": 3}, seed=9, dtype=torch.float64)
    runtime.load(tensors, slot=1, scale=2.0)
    two = {n: (a, b, 2.0) for n, (a, b) in ab.items()}
    torch.testing.assert_close(traced(ids), model_reference(base, ids, two), rtol=0, atol=1e-12)
    before = _snapshot(runtime, model)
    with pytest.raises(lorahot.UsageError, match=r"^torch\.jit\.trace recorded this model with one slot .* per-row"):
        runtime.activate([0, 1])
    assert _same(before, _snapshot(runtime, model))
    runtime.activate([1, 1])  # every row on one slot: the whole batch, as traced
    torch.testing.assert_close(traced(ids), model_reference(base, ids, two), rtol=0, atol=1e-12)

    model, runtime, held = _runtime()
    runtime.activate([1, 0])
    with pytest.raises(lorahot.UsageError, match=r"torch\.jit\.trace of the model under a per-row routing"):
        torch.jit.trace(model, ids)
    runtime.activate([0, 1])  # nothing was traced
    want = torch.cat([model_reference(base, ids[i : i + 1], held[s]) for i, s in enumerate([0, 1])])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, rtol=0, atol=1e-12)


@pytest.mark.parametrize("strict", [False, True], ids=["non-strict", "strict"])
def test_an_exported_model_refuses_a_per_row_routing_and_a_routed_model_refuses_the_export(strict: bool) -> None:
    """``torch.export`` records the one-slot path too: its module follows ``activate(k)`` and
    ``set_scale`` (float64 reference), but under a per-row routing set afterwards it computed
    the live slot for every row (max abs diff 0.86 on a float32 tiny LM against the per-row
    reference), silently. A per-row routing is now refused once the model was exported,
    changing nothing; an export under a per-row routing is refused and leaves routing possible.
    ``strict=True`` traces through dynamo, which kept the forward's mark out of the program:
    a per-row routing after it was taken (1.03 from the per-row float64 reference), and an
    export under one was too (its program then failed with a NameError)."""
    base = tiny_lm(dtype=torch.float64)
    model, runtime, held = _runtime()
    ids = token_ids((2, 5), 32, seed=3)
    exported = torch.export.export(model, (ids,), strict=strict).module()
    runtime.activate(1)
    runtime.set_scale(0.5)
    one = {n: (a, b, s * 0.5) for n, (a, b, s) in held[1].items()}
    torch.testing.assert_close(exported(ids), model_reference(base, ids, one), rtol=0, atol=1e-12)
    before = _snapshot(runtime, model)
    with pytest.raises(lorahot.UsageError, match=r"^torch\.export recorded this model with one slot .* per-row"):
        runtime.activate([0, 1])
    assert _same(before, _snapshot(runtime, model))

    model, runtime, held = _runtime()
    runtime.activate([1, 0])
    before = _snapshot(runtime, model)
    with pytest.raises(lorahot.UsageError, match=r"torch\.export of the model under a per-row routing"):
        torch.export.export(model, (ids,), strict=strict)
    assert _same(before, _snapshot(runtime, model))
    runtime.activate([0, 1])  # nothing was recorded
    want = torch.cat([model_reference(base, ids[i : i + 1], held[s]) for i, s in enumerate([0, 1])])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), want, rtol=0, atol=1e-12)
