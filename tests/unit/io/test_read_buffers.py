"""The buffers a runtime lends the file reader (``lorahot.io.read_buffers``): loads from file
reuse them, grown to the largest file and never shrunk, and nothing that outlives a load
aliases them. Every slot keeps computing what its own adapter says (float64 dense references)
while later loads overwrite the buffers; a stack reads each part into its own; a refused load
changes nothing; merged mode and reads outside a load do not borrow them.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from torch import nn

import lorahot
from lorahot.io import read_buffers
from lorahot.io.loader import read_adapter
from lorahot.io.read_buffers import ReadBuffers, lent
from tests.helpers import make_adapter, save_peft, stack_reference, tiny_lm, token_ids
from tests.reliability_helpers import Q0, V1, assert_unchanged, build_rig, snapshot, valid_tensors

TARGETS = ["q_proj", "v_proj", "up_proj"]
UP0 = "layers.0.mlp.up_proj"
IDS = token_ids((2, 6), 32, seed=3)


def _setup(slots: int = 3, **kwargs: bool) -> tuple[nn.Module, lorahot.LoraRuntime]:
    model = tiny_lm(dtype=torch.float64)
    return model, lorahot.inject(model, TARGETS, max_rank=8, slots=slots, **kwargs)


def _adapter(tmp_path: Path, model: nn.Module, name: str, rank: int, seed: int) -> tuple[Path, dict]:
    """A PEFT file of rank ``rank`` (alpha = 2 * rank: scale 2) on three layers, and its
    ``name -> (A, B, scale)``."""
    tensors, ab = make_adapter(model, {Q0: rank, V1: rank, UP0: rank}, seed=seed, dtype=torch.float64)
    source = save_peft(tmp_path / name, tensors, r=rank, lora_alpha=2 * rank)
    return source, {n: (a, b, 2.0) for n, (a, b) in ab.items()}


def _out(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def _check(model: nn.Module, *parts: dict) -> None:
    want = stack_reference(tiny_lm(dtype=torch.float64), IDS, list(parts))
    torch.testing.assert_close(_out(model), want, rtol=1e-10, atol=1e-10)


def _host(runtime: lorahot.LoraRuntime, part: int = 0) -> torch.Tensor:
    buffers = runtime._read_buffers
    assert buffers is not None
    host = buffers._parts[part].host
    assert host is not None
    return host


def test_loads_reuse_one_buffer_and_every_slot_keeps_its_own_adapter(tmp_path: Path) -> None:
    """Three files into three slots through one host buffer (same address, same capacity):
    after every later load, each slot still computes its own adapter, and the plans the
    runtime keeps hold no values (a read of them fails rather than seeing another file)."""
    model, runtime = _setup()
    files = [_adapter(tmp_path, model, f"a{i}", 4, seed=i) for i in range(3)]
    for slot, (source, _) in enumerate(files):
        runtime.load(source, slot=slot)
        if slot == 0:
            first = (_host(runtime).data_ptr(), _host(runtime).numel())
        assert (_host(runtime).data_ptr(), _host(runtime).numel()) == first
    for slot, (_, loras) in enumerate(files):
        runtime.activate(slot)
        _check(model, loras)
    for slot in range(3):
        plan = runtime._stacks[slot].parts[0]
        assert all(m.A.device.type == "meta" and m.B.device.type == "meta" for m in plan.targets.values())
        assert all(m.A.device.type == "meta" for entries in plan.entries for _, m in entries)
    runtime.load(files[2][0], slot=0)  # a reload over the buffer slot 0's plan came from
    runtime.activate(0)
    _check(model, files[2][1])
    runtime.activate(1)
    _check(model, files[1][1])


def test_a_larger_file_grows_the_buffer_and_a_smaller_one_reuses_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(read_buffers, "_ROUND", 64)  # these files are far below the 2 MiB granularity
    model, runtime = _setup(slots=2)
    small, small_loras = _adapter(tmp_path, model, "small", 2, seed=1)
    large, large_loras = _adapter(tmp_path, model, "large", 8, seed=2)
    runtime.load(small)
    before = _host(runtime).numel()
    runtime.load(large, slot=1)
    grown = _host(runtime)
    assert grown.numel() > before and grown.numel() % 64 == 0
    assert grown.numel() >= sum((a.numel() + b.numel()) * 8 for a, b, _ in large_loras.values())  # float64
    runtime.load(small)
    assert _host(runtime).data_ptr() == grown.data_ptr()
    _check(model, small_loras)
    runtime.activate(1)
    _check(model, large_loras)


def test_a_stack_reads_each_part_into_its_own_buffer(tmp_path: Path) -> None:
    model, runtime = _setup()
    (a, la), (b, lb) = _adapter(tmp_path, model, "a", 4, seed=1), _adapter(tmp_path, model, "b", 4, seed=2)
    runtime.load([a, b])
    assert _host(runtime, 0).data_ptr() != _host(runtime, 1).data_ptr()
    _check(model, la, lb)
    runtime.load(b, slot=1)  # part 0's buffer again, while slot 0 holds the stack
    _check(model, la, lb)


def test_a_refused_load_through_the_buffer_changes_nothing(tmp_path: Path) -> None:
    """A file with a NaN, read into the buffer a good load used before: refused, every buffer,
    the bookkeeping and the output bitwise as before; the next good load works."""
    rig = build_rig(tmp_path / "rig")
    tensors = valid_tensors(rig.model, 4)
    good = save_peft(tmp_path / "good", tensors, r=4, lora_alpha=8.0)
    rig.runtime.load(good)
    before = snapshot(rig)
    bad = {k: v.clone() for k, v in tensors.items()}
    next(iter(bad.values()))[0, 0] = float("nan")
    source = save_peft(tmp_path / "bad", bad, r=4, lora_alpha=8.0)
    with pytest.raises(lorahot.AdapterReadError, match="NaN or Inf"):
        rig.runtime.load(source)
    assert_unchanged(rig, before)
    rig.runtime.load(good, slot=1)
    assert rig.runtime.info(1) is not None


def test_merged_mode_and_reads_outside_a_load_borrow_nothing(tmp_path: Path) -> None:
    """Merged mode recomputes its weights from the plans' tensors, so it reads into fresh
    memory; read_adapter outside a load (and a read on another thread during one) too."""
    model, merged = _setup(merged=True)
    source, loras = _adapter(tmp_path, model, "a", 4, seed=1)
    merged.load(source)
    assert merged._read_buffers is None
    merged.set_scale(0.5)
    _check(model, {n: (a, b, s * 0.5) for n, (a, b, s) in loras.items()})
    first, second = read_adapter(source), read_adapter(source)
    assert first.modules[Q0].A.data_ptr() != second.modules[Q0].A.data_ptr()
    buffers = ReadBuffers(torch.device("cpu"))
    seen: list[object] = []
    with buffers.lend(0):
        inside = read_adapter(source, device=torch.device("cpu"))
        thread = threading.Thread(target=lambda: seen.append(lent(torch.device("cpu"))))
        thread.start()
        thread.join()
        assert lent(torch.device("cpu")) == (buffers, 0) and lent(torch.device("meta")) is None
    assert seen == [None] and lent(torch.device("cpu")) is None
    host = buffers._parts[0].host
    assert host is not None and inside.modules[Q0].A.untyped_storage().data_ptr() == host.untyped_storage().data_ptr()


def test_growth_rounds_up_and_keeps_a_quarter_more(monkeypatch: pytest.MonkeyPatch) -> None:
    """Capacities: the need rounded up to 2 MiB; a growth at least a quarter over the old."""
    sizes: list[int] = []

    def allocate(n: int) -> torch.Tensor:
        sizes.append(n)
        return torch.empty(n, dtype=torch.uint8)

    buf = read_buffers._grown(None, 10, allocate)
    assert sizes == [2 << 20] and read_buffers._grown(buf, 2 << 20, allocate) is buf
    read_buffers._grown(buf, (2 << 20) + 1, allocate)
    assert sizes[-1] == 4 << 20  # 2.5 MiB wanted (a quarter more), rounded up
    read_buffers._grown(buf, 9 << 20, allocate)
    assert sizes[-1] == 10 << 20


@pytest.mark.gpu
def test_gpu_warm_loads_call_the_driver_for_no_memory(tmp_path: Path) -> None:
    """On CUDA, once the buffers hold the largest file and the host-cache loads have been
    captured, loads from file or from the host cache into any slot make no ``cudaMalloc`` or
    ``cudaHostAlloc`` (the caching allocators' counts
    stay), and every slot computes its own adapter: the device buffer's next transfer waits
    for the last load's reads of it."""
    model = tiny_lm(dtype=torch.float64).cuda()
    runtime = lorahot.inject(model, TARGETS, max_rank=8, slots=2)
    files = [_adapter(tmp_path, tiny_lm(dtype=torch.float64), f"a{i}", 4 + 4 * (i % 2), seed=i) for i in range(4)]

    def calls() -> tuple[int, int]:
        stats = getattr(torch.cuda, "host_memory_stats", dict)
        return int(torch.cuda.memory_stats().get("num_device_alloc", 0)), int(stats().get("num_host_alloc", 0))

    runtime.load(files[1][0], slot=1)  # the largest first: the buffers reach their size
    runtime.load(files[0][0], slot=0)  # (and the allocators' small blocks for the checks theirs)
    cached = [runtime.preload(source) for source, _ in files[:2]]  # packs: pinned, allocated here
    runtime.load(cached[1], slot=1)

    def loads() -> None:
        for i, (source, _) in enumerate(files):
            runtime.load(cached[i % 2], slot=i % 2)
            runtime.load(source, slot=i % 2)

    loads()  # host-cache loads seen twice are captured as CUDA graphs (lorahot.runtime.load_replay)
    torch.cuda.synchronize()
    warm = calls()
    loads()
    torch.cuda.synchronize()
    assert calls() == warm
    assert runtime._load_replay.replays >= 4
    ids = IDS.cuda()
    for slot in (0, 1):
        runtime.activate(slot)
        with torch.no_grad():
            got = model(ids)
        want = stack_reference(tiny_lm(dtype=torch.float64), IDS, [files[2 + slot][1]])
        torch.testing.assert_close(got.cpu(), want, rtol=1e-10, atol=1e-10)
