"""A swap from the host cache (``load(prepared)``): the pack travels as one buffer and lands by
one ``index_copy_`` per section (rows of a common length) or one batched copy of its pieces
(when rows would be too short); the scales are written on the device. Either way the buffers
end bitwise as a load of the same tensors leaves them, the pack is never written, and a
failed swap changes nothing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import lorahot
from lorahot.runtime import buffers
from tests.helpers import make_adapter


class Wide(nn.Module):
    """Widths that are multiples of 64: packs land by rows (two arenas: float32, float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(64, 64)
        self.up = nn.Linear(64, 192)
        self.down = nn.Linear(192, 64)
        self.head = nn.Linear(64, 128).double()


class Odd(nn.Module):
    """Odd widths: rows would be a few bytes, so packs land by the batched copy of pieces."""

    def __init__(self) -> None:
        super().__init__()
        self.q = nn.Linear(5, 7)
        self.up = nn.Linear(7, 3)
        self.head = nn.Linear(3, 5).double()


NETS = {"wide": Wide, "odd": Odd}
NAMES = ["q", "up", "head"]


def _pair(kind: str, slots: int = 1, max_rank: int = 64, by_rows: bool = True) -> tuple[nn.Module, lorahot.LoraRuntime]:
    """A net and its runtime; ``by_rows`` as on a GPU (the CPU's default copies the pieces)."""
    torch.manual_seed(0)
    net = NETS[kind]()
    runtime = lorahot.inject(net, [*NAMES, "down"] if kind == "wide" else NAMES, max_rank=max_rank, slots=slots)
    for arena in runtime.buffers.arenas:
        assert not arena.by_rows  # the CPU's default
        arena.by_rows = by_rows
    return net, runtime


def _state(runtime: lorahot.LoraRuntime) -> list:
    return [(a.A.clone(), a.B.clone(), a.S.clone(), list(a.a_extent), list(a.b_extent)) for a in runtime.buffers.arenas]


def _assert_same(got: list, want: list) -> None:
    for (A, B, S, ae, be), (A2, B2, S2, ae2, be2) in zip(got, want):
        assert torch.equal(A, A2) and torch.equal(B, B2) and torch.equal(S, S2)
        assert (ae, be) == (ae2, be2)


RANKS = st.sampled_from([1, 3, 8, 16, 64])
STEPS = st.lists(
    st.tuples(
        st.dictionaries(st.sampled_from(NAMES), RANKS, min_size=1),  # a subset, or every layer
        st.booleans(),  # every layer at one rank (the zero fill may be skipped)
        st.sampled_from([1.0, 0.5, -3.0]),
        st.integers(0, 1),  # slot
        st.booleans(),  # activate the slot after
    ),
    min_size=1,
    max_size=6,
)


@pytest.mark.parametrize(("kind", "by_rows"), [("wide", True), ("wide", False), ("odd", True)])
@given(steps=STEPS)
def test_host_swap_writes_what_a_load_of_the_tensors_writes(kind: str, by_rows: bool, steps: list) -> None:
    """Two runtimes, one fed from the host cache, one from the tensors (the staged path): after
    every step (rank changes 64 -> 8 that leave stale rows, subsets, scales, slots) their
    buffers are bitwise equal."""
    net, host = _pair(kind, slots=2, by_rows=by_rows)
    _, direct = _pair(kind, slots=2, by_rows=False)
    layers = list(host.layers)
    for seed, (ranks, full, scale, slot, activate) in enumerate(steps):
        if full:
            ranks = dict.fromkeys(layers, next(iter(ranks.values())))
        tensors = make_adapter(net, ranks, seed=seed)[0]
        prepared = host.preload(tensors)
        if kind == "wide":  # odd: by rows only where the pieces happen to share a long row
            assert all((p.rows is not None) == by_rows for p in prepared.packs if p.sizes)
        host.load(prepared, slot=slot, scale=scale)
        direct.load(tensors, slot=slot, scale=scale)
        if activate:
            host.activate(slot)
            direct.activate(slot)
        _assert_same(_state(host), _state(direct))


def test_rank_64_then_8_zeroes_the_stale_rows_and_8_again_skips_the_fill(monkeypatch: pytest.MonkeyPatch) -> None:
    net, runtime = _pair("wide")
    everything = list(runtime.layers)
    r64 = runtime.preload(make_adapter(net, dict.fromkeys(everything, 64), seed=1)[0])
    r8 = runtime.preload(make_adapter(net, dict.fromkeys(everything, 8), seed=2)[0])
    zeroed: list[int] = []
    real = torch.Tensor.zero_
    monkeypatch.setattr(torch.Tensor, "zero_", lambda t: zeroed.append(1) or real(t))
    runtime.load(r64)
    runtime.load(r8)
    for layer in runtime.layers.values():
        assert layer.lora_A[8:].count_nonzero() == 0 and layer.lora_B[8:].count_nonzero() == 0
    fills = len(zeroed)
    runtime.load(r8)  # covers every row the region holds: no fill
    assert len(zeroed) == fills
    _, fresh = _pair("wide")
    fresh.load(make_adapter(net, dict.fromkeys(everything, 8), seed=2)[0])
    _assert_same(_state(runtime), _state(fresh))


def test_pack_layout_rows_and_index() -> None:
    net, runtime = _pair("wide")
    prepared = runtime.preload(make_adapter(net, {"q": 8, "up": 8, "down": 3, "head": 8}, seed=3)[0])
    arena = runtime.buffers.arenas[0]  # float32: q, up, down
    pack = prepared.packs[0]
    assert pack.rows is not None
    a_rows, b_rows = pack.rows
    # A pieces: 8*64, 8*64, 3*192 elements at offsets that are multiples of 64*64: rows of 64
    assert (a_rows.unit, a_rows.wide) == (64, torch.int64)
    assert (b_rows.unit, b_rows.wide) == (64, torch.int64)
    index = pack.data[a_rows.index[0] : a_rows.index[1]].view(torch.int64)
    want = [arena.a_off[i] // 64 + k for i, n in ((0, 8), (1, 8), (2, 9)) for k in range(n)]
    assert index.tolist() == want
    assert all(start % 64 == 0 for start in (a_rows.index[0], b_rows.index[0], pack.scale_bytes[0]))
    assert pack.cover == 3  # every layer of the arena, least rank 3
    assert prepared.packs[1].cover == 8 and runtime.buffers.arenas[1].specs[0].in_dim == 64
    cpu_net, cpu = _pair("wide", by_rows=False)  # the CPU's default: the pieces, by memcpy
    assert all(p.rows is None for p in cpu.preload(make_adapter(cpu_net, {"q": 8, "head": 8}, seed=3)[0]).packs)
    odd_net, odd = _pair("odd", max_rank=4)
    packs = odd.preload(make_adapter(odd_net, {"q": 2, "up": 4}, seed=4)[0]).packs
    assert packs[0].rows is None and packs[0].cover == 2
    assert packs[1].sizes == [] and packs[1].cover == -1  # head untouched


@pytest.mark.parametrize(("kind", "by_rows"), [("wide", True), ("wide", False), ("odd", True)])
def test_loads_never_write_the_pack(kind: str, by_rows: bool) -> None:
    net, runtime = _pair(kind, slots=2, by_rows=by_rows)
    prepared = runtime.preload(make_adapter(net, {"q": 8, "head": 3}, seed=5)[0])
    before = [p.data.clone() for p in prepared.packs]
    for slot, scale in ((0, 1.0), (1, -2.5), (0, 0.0), (1, 7.0)):
        runtime.load(prepared, slot=slot, scale=scale)
        runtime.activate(slot)
    assert all(torch.equal(p.data, b) for p, b in zip(prepared.packs, before))


def test_a_failed_host_swap_changes_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    net, runtime = _pair("wide", slots=2)
    runtime.load(make_adapter(net, {"q": 64, "down": 8, "head": 16}, seed=6)[0])
    prepared = runtime.preload(make_adapter(net, dict.fromkeys(runtime.layers, 8), seed=7)[0])
    before, info = _state(runtime), runtime.info()
    with pytest.raises(lorahot.UsageError, match="scale="):
        runtime.load(prepared, scale=1e300)  # beyond the float32 scale buffers
    _assert_same(_state(runtime), before)
    calls: list[int] = []
    real = buffers.Arena.stage

    def stage(self: buffers.Arena, pack: buffers.Pack, upload: Callable | None = None) -> torch.Tensor:
        calls.append(1)
        if len(calls) == 2:  # the second arena's staging fails (out of device memory)
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(self, pack, upload)

    monkeypatch.setattr(buffers.Arena, "stage", stage)
    with pytest.raises(lorahot.LoraError, match="out of memory"):
        runtime.load(prepared)
    _assert_same(_state(runtime), before)
    assert runtime.info() == info
    monkeypatch.setattr(buffers.Arena, "stage", real)
    runtime.load(prepared)  # and the runtime still serves
    _, fresh = _pair("wide", slots=2)
    fresh.load(make_adapter(net, dict.fromkeys(runtime.layers, 8), seed=7)[0])
    _assert_same(_state(runtime), _state(fresh))


@pytest.mark.parametrize(("kind", "by_rows"), [("wide", True), ("wide", False), ("odd", True)])
def test_host_swap_inside_and_outside_inference_mode(kind: str, by_rows: bool) -> None:
    net, runtime = _pair(kind, by_rows=by_rows)
    prepared = runtime.preload(make_adapter(net, {"q": 8, "up": 8}, seed=8)[0])
    with torch.inference_mode():
        runtime.load(prepared)  # memoizes the row views here
    runtime.load(prepared, scale=2.0)
    with torch.inference_mode():
        runtime.load(prepared, scale=0.5)
    _, fresh = _pair(kind)
    fresh.load(make_adapter(net, {"q": 8, "up": 8}, seed=8)[0], scale=0.5)
    _assert_same(_state(runtime), _state(fresh))


@pytest.mark.gpu
def test_host_swap_on_cuda_from_pinned_memory() -> None:
    """On a GPU the pack is pinned and copied without blocking; loads on the default and on a
    side stream end bitwise as loads of the tensors."""
    torch.manual_seed(0)
    net = Wide().cuda().to(torch.bfloat16)
    runtime = lorahot.inject(net, [*NAMES, "down"], max_rank=64)
    torch.manual_seed(0)
    ref_net = Wide().cuda().to(torch.bfloat16)
    ref = lorahot.inject(ref_net, [*NAMES, "down"], max_rank=64)
    side = torch.cuda.Stream()
    for seed, rank in enumerate([64, 8, 16, 8, 64, 1]):
        tensors = make_adapter(net, dict.fromkeys(runtime.layers, rank), seed=seed)[0]
        prepared = runtime.preload(tensors)
        assert all(p.pinned and p.data.is_pinned() and p.rows is not None for p in prepared.packs)
        if seed % 2:
            with torch.cuda.stream(side):
                runtime.load(prepared, scale=0.5)
            torch.cuda.current_stream().wait_stream(side)
        else:
            runtime.load(prepared, scale=0.5)
        runtime.cache.clear()
        del prepared  # the last reference: the copy may still be reading the pinned block
        ref.load(tensors, scale=0.5)
        torch.cuda.synchronize()
        _assert_same(_state(runtime), _state(ref))
