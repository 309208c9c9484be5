"""The arena layout: fixed addresses, zero rows past each region's extent, aligned group slices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import lorahot
from lorahot.runtime.buffers import Arena, layer_kinds, strided_runs
from tests.helpers import PREFIX, make_adapter, save_peft, tiny_lm


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(5, 7)
        self.conv = nn.Conv2d(4, 6, 3, groups=2)
        self.emb = nn.Embedding(9, 3)
        self.other = nn.Linear(7, 3).double()  # a second arena (float64)


def _inject(slots: int, max_rank: int = 8) -> tuple[Net, lorahot.LoraRuntime]:
    torch.manual_seed(0)
    net = Net()
    return net, lorahot.inject(net, ["lin", "conv", "emb", "other"], max_rank=max_rank, slots=slots)


def _pointers(runtime: lorahot.LoraRuntime) -> list[int]:
    arenas = [t.data_ptr() for a in runtime.buffers.arenas for t in (a.A, a.B, a.S)]
    layers = [t.data_ptr() for l in runtime.layers.values() for t in (l.lora_A, l.lora_B, l.lora_scale)]
    return arenas + layers


def _assert_zero_past_extent(runtime: lorahot.LoraRuntime) -> None:
    for arena in runtime.buffers.arenas:
        for region in range(arena.regions):
            for layer in range(len(arena.specs)):
                a_rows, b_rows = arena.rows(layer, region)
                assert not a_rows[arena.a_extent[region] :].any()
                assert not b_rows[arena.b_extent[region] :].any()


OPS = st.lists(
    st.one_of(
        st.tuples(
            st.just("load"),
            st.integers(0, 2),
            st.dictionaries(st.sampled_from(["lin", "conv", "emb", "other"]), st.integers(1, 4), min_size=1),
        ),
        st.tuples(st.just("activate"), st.integers(0, 2)),
        st.tuples(st.just("unload"), st.one_of(st.none(), st.integers(0, 2))),
        st.tuples(st.just("scale"), st.sampled_from([0.0, 0.5, 3.0])),
    ),
    max_size=8,
)


@given(ops=OPS)
def test_addresses_fixed_and_rows_past_extent_zero(ops: list) -> None:
    net, runtime = _inject(slots=3)
    pointers = _pointers(runtime)
    for seed, (op, *args) in enumerate(ops):
        if op == "load":
            slot, ranks = args
            ranks = {n: 2 * r if n == "conv" else r for n, r in ranks.items()}  # conv groups=2
            runtime.load(make_adapter(net, ranks, seed=seed)[0], slot=slot)
        elif op == "activate":
            runtime.activate(args[0])
        elif op == "unload":
            runtime.unload(args[0])
        elif runtime.info() is not None:
            runtime.set_scale(args[0])
        assert _pointers(runtime) == pointers
        _assert_zero_past_extent(runtime)
    live = runtime.buffers.live
    for arena in runtime.buffers.arenas:  # the live region is an exact copy of the active slot
        for t in (arena.A, arena.B, arena.S):
            assert torch.equal(t[live], t[runtime.active_slot])


def test_layer_buffers_are_views_into_the_live_region() -> None:
    _net, runtime = _inject(slots=2)
    manager = runtime.buffers
    assert manager.regions == 3 and manager.live == 2
    for name, layer in runtime.layers.items():
        arena = manager.arenas[manager.where[name][0]]
        assert layer.lora_A.untyped_storage().data_ptr() == arena.A.untyped_storage().data_ptr()
        assert layer.lora_B.untyped_storage().data_ptr() == arena.B.untyped_storage().data_ptr()
        a_rows, _ = arena.rows(manager.where[name][1], manager.live)
        assert layer.lora_A.data_ptr() == a_rows.data_ptr()
        assert layer.lora_A.shape[0] == 8
    assert runtime.layers["conv"].lora_A.shape == (8, 4, 3, 3)
    assert runtime.layers["conv"].lora_B.shape == (6, 4, 1, 1)


def test_blocks_are_contiguous_aligned_and_disjoint() -> None:
    _, runtime = _inject(slots=1)
    for arena in runtime.buffers.arenas:
        for offsets, dims, total in (
            (arena.a_off, [s.in_dim for s in arena.specs], arena.A.shape[1]),
            (arena.b_off, [s.out_dim for s in arena.specs], arena.B.shape[1]),
        ):
            assert all(o % 64 == 0 for o in offsets)
            ends = [o + arena.rank * d for o, d in zip(offsets, dims)]
            assert all(e <= o for e, o in zip(ends, offsets[1:]))
            assert ends[-1] <= total
        for layer in range(len(arena.specs)):
            assert all(t.is_contiguous() for t in arena.rows(layer, 0))
    for layer in runtime.layers.values():  # the forward multiplies plain row-major operands
        assert layer.lora_A.is_contiguous() and (layer.lora_B.is_contiguous() or layer.spec.kind == "conv")
    assert [a.dtype for a in runtime.buffers.arenas] == [torch.float32, torch.float64]


def test_grouped_conv_rank_slices_are_aligned() -> None:
    net, runtime = _inject(slots=1, max_rank=8)
    tensors, ab = make_adapter(net, {"conv": 4}, seed=1)
    runtime.load(tensors)
    a, b = ab["conv"]  # [4, 4, 3, 3], [6, 2, 1, 1]
    layer = runtime.layers["conv"]
    # group j of the rank lives at rows [j * 8/2, j * 8/2 + 4/2)
    assert torch.equal(layer.lora_A[0:2], a[0:2]) and torch.equal(layer.lora_A[4:6], a[2:4])
    assert not layer.lora_A[2:4].any() and not layer.lora_A[6:8].any()
    assert torch.equal(layer.lora_B[:, :2], b) and not layer.lora_B[:, 2:].any()
    arena = runtime.buffers.arenas[0]
    assert arena.a_extent == [Arena.a_rows_for(arena.specs[1], 4, 8)] == [6]
    assert arena.b_extent == [2]


def test_extent_shrinks_and_stale_rows_are_zeroed() -> None:
    net, runtime = _inject(slots=1)
    runtime.load(make_adapter(net, {"lin": 8, "emb": 8}, seed=2)[0])
    arena = runtime.buffers.arenas[0]
    assert arena.a_extent == [8] and arena.b_extent == [8]
    runtime.load(make_adapter(net, {"lin": 3}, seed=3)[0])
    assert arena.a_extent == [3] and arena.b_extent == [3]
    assert not runtime.layers["emb"].lora_A.any() and not runtime.layers["lin"].lora_A[3:].any()
    runtime.unload()
    assert arena.a_extent == [0] and not arena.A.any() and not arena.B.any() and not arena.S.any()


def test_nbytes_counts_every_region() -> None:
    _, one = _inject(slots=1)
    _, three = _inject(slots=3)
    assert three.nbytes == 4 * one.nbytes
    assert one.nbytes == sum(t.nbytes for a in one.buffers.arenas for t in (a.A, a.B, a.S, a.E))


class Linears(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 7)
        self.b = nn.Linear(7, 4)


LOADS = st.lists(
    st.tuples(
        st.dictionaries(st.sampled_from(["a", "b"]), st.integers(1, 4), min_size=1), st.booleans(), st.integers(0, 99)
    ),
    min_size=1,
    max_size=6,
)


@given(loads=LOADS)
def test_skipping_the_zero_fill_leaves_exactly_a_fresh_load(loads: list) -> None:
    """A load that rewrites every nonzero row skips the zero fill; after any sequence the
    buffers equal, bitwise, a fresh runtime's after the last load alone."""
    torch.manual_seed(0)
    net = Linears()
    runtime = lorahot.inject(net, ["a", "b"], max_rank=4)
    for ranks, preloaded, seed in loads:
        tensors = make_adapter(net, ranks, seed=seed)[0]
        runtime.load(runtime.preload(tensors) if preloaded else tensors)
    torch.manual_seed(0)
    fresh_net = Linears()
    fresh = lorahot.inject(fresh_net, ["a", "b"], max_rank=4)
    fresh.load(make_adapter(fresh_net, loads[-1][0], seed=loads[-1][2])[0])
    got, want = runtime.buffers.arenas[0], fresh.buffers.arenas[0]
    assert torch.equal(got.A, want.A) and torch.equal(got.B, want.B) and torch.equal(got.S, want.S)
    assert (got.a_extent, got.b_extent) == (want.a_extent, want.b_extent)


def test_zero_fill_is_skipped_only_when_the_write_covers_the_region() -> None:
    torch.manual_seed(0)
    net = Linears()
    runtime = lorahot.inject(net, ["a", "b"], max_rank=4)
    arena = runtime.buffers.arenas[0]
    assert arena._covers(0, [(0, 2), (1, 2)])  # empty region: any full write covers it
    runtime.load(make_adapter(net, {"a": 3, "b": 3})[0])
    assert arena._covers(0, [(0, 3), (1, 4)])
    assert not arena._covers(0, [(0, 2), (1, 4)])  # rank 2 leaves row 2 of layer a stale
    assert not arena._covers(0, [(0, 4)])  # layer b untouched
    _, grouped = _inject(slots=1)
    conv = grouped.buffers.arenas[0]
    assert not conv._covers(0, [(i, 8) for i in range(len(conv.specs))])  # group slices leave gaps


# -- a file's tensors copied in strided runs ----------------------------------------------------


@given(
    blocks=st.lists(st.integers(0, 40), min_size=1, max_size=30, unique=True),
    sources=st.lists(st.integers(0, 12), min_size=30, max_size=30),
)
def test_strided_runs_cover_every_pair_once_with_increasing_destinations(blocks: list, sources: list) -> None:
    pairs = [(5 * s, 7 * d) for s, d in zip(sources, blocks)]  # distinct destinations, sources may repeat
    runs = strided_runs(pairs)
    members = [(src + k * src_step, dst + k * dst_step) for n, src, src_step, dst, dst_step in runs for k in range(n)]
    assert sorted(members) == sorted(pairs)
    assert all(n == 1 or (dst_step > 0 and src_step >= 0) for n, _, src_step, _, dst_step in runs)


def test_layer_kinds_are_names_up_to_their_numbers() -> None:
    names = ["layers.0.attn.q", "layers.0.attn.k", "layers.1.attn.q", "layers.12.attn.k", "head"]
    assert layer_kinds(names) == [0, 1, 0, 1, 2]


@pytest.mark.parametrize(("stacked", "uniform"), [(False, True), (True, True), (False, False), (True, False)])
def test_a_file_lands_in_few_copies_exactly_as_its_tensors_one_by_one(
    tmp_path: Path, stacked: bool, uniform: bool
) -> None:
    """A file read into one buffer (its tensors views of it, blocks in the file's order: layers
    0, 1, 10, 11, 2, ...) is copied in strided runs, and the region is bitwise what the same
    tensors copied one by one (clones, views of nothing) give; for a stack too (row offsets).
    Not ``uniform``: a module of another rank and one of another dtype break the even spacing."""
    model = tiny_lm(layers=12)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    names = [n for n, _ in model.named_modules() if n.split(".")[-1] in targets]
    runtime = lorahot.inject(model, targets, max_rank=8, slots=2)
    ranks = {n: 2 if n == "layers.3.mlp.up_proj" and not uniform else 3 for n in names}
    first = make_adapter(model, ranks, seed=1)[0]
    if not uniform:
        half = f"{PREFIX}layers.5.self_attn.v_proj.lora_A.weight"
        first[half] = first[half].half()
    files = [save_peft(tmp_path / "a", first), save_peft(tmp_path / "b", make_adapter(model, ranks, seed=2)[0])]
    clones = [{k: v.clone() for k, v in load_file(f / "adapter_model.safetensors").items()} for f in files]
    arena = runtime.buffers.arenas[0]
    counted: list[int] = []
    copies = arena._copies

    def counting(*args: Any) -> Any:
        found = copies(*args)
        counted.append(len(found[0]))
        return found

    arena._copies = counting  # type: ignore[method-assign]
    runtime.load(files if stacked else files[0], slot=0)
    # the files' config names no lora_alpha, so PEFT's default (8) applies to them
    runtime.load(clones if stacked else clones[0], slot=1, config={"lora_alpha": 8})
    assert torch.equal(arena.A[0], arena.A[1]) and torch.equal(arena.B[0], arena.B[1])
    assert torch.equal(arena.S[0], arena.S[1]) and bool(arena.A[0].any())
    pairs = 2 * len(names) * (2 if stacked else 1)
    assert counted[1] == pairs  # the clones one by one
    assert counted[0] <= pairs / 4 if uniform else counted[0] < pairs  # the file in runs
