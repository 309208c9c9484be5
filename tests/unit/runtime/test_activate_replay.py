"""activate(slot) as a CUDA graph replay (lorahot.runtime.activate_replay): after every
activation, among loads, unloads and re-weightings, the arenas, the wide rows and the host's
record of them are bitwise those of the ordinary path; a compiled model does not recompile; a
capture that fails falls back to the ordinary path with a warning, from the state it expects."""

from __future__ import annotations

import pytest
import torch

import lorahot
from tests.unit.runtime.test_graph_replays import refuse_captures
from tests.unit.runtime.test_load_replay import _adapter, _model, _pair, _same, lockstep


def test_the_cpu_takes_the_ordinary_path() -> None:
    runtime = lorahot.inject(_model("cpu"), ["0", "2"], max_rank=64, slots=2)
    runtime.load(_adapter(8, 1, 16.0), slot=1)
    for slot in (1, 0, 1):
        runtime.activate(slot)
    assert runtime._activate_replay.device is None and runtime._activate_replay.replays == 0
    assert runtime.layers["0"].lora_scale[:8].unique().tolist() == [2.0]


@pytest.mark.usefixtures("replaying_cuda")
def test_replays_simulated_on_the_cpu_leave_what_the_ordinary_path_leaves() -> None:
    """The replay code paths on a CPU box, with a stand-in CUDA graph that repeats the device
    side of the captured steps (``test_graph_replays.replaying_cuda``): the copies into the live
    region (CPU layers are not widened), the keys, the record after each replay."""
    torch.manual_seed(0)
    models = [_model("cpu"), _model("cpu")]
    runtimes = [lorahot.inject(m, ["0", "2"], max_rank=64, slots=3, extras=True) for m in models]
    runtimes[0]._activate_replay.device = torch.device("cpu")  # as on one CUDA device
    x = torch.randn(8, 256)
    for slot, adapter in enumerate((_adapter(8, 1, 16.0), _adapter(64, 2, 32.0), _adapter(16, 3, 8.0, bias=True))):
        for r in runtimes:
            r.load(adapter, slot=slot)
    for step in ("1", "0", "1", "2", "0", "2", "u1", "1", "0", "1", "l1", "2", "1", "2", "1"):
        for r in runtimes:
            if step == "u1":
                r.unload(1)
            elif step == "l1":
                r.load(_adapter(32, 4, 64.0), slot=1)
            else:
                r.activate(int(step))
        _same_on_cpu(*runtimes)
        with torch.no_grad():
            assert torch.equal(models[0](x), models[1](x)), step
    assert runtimes[0]._activate_replay.replays >= 5 and runtimes[1]._activate_replay.replays == 0


def _same_on_cpu(mine: lorahot.LoraRuntime, ref: lorahot.LoraRuntime) -> None:
    for a, b in zip(mine.buffers.arenas, ref.buffers.arenas, strict=True):
        for t, u in zip((a.A, a.B, a.S, a.E), (b.A, b.B, b.S, b.E)):
            assert torch.equal(t, u)
        assert (a.a_extent, a.b_extent, a.e_dirty) == (b.a_extent, b.b_extent, b.e_dirty)


@pytest.mark.gpu
def test_gpu_replays_leave_what_the_ordinary_path_leaves() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    models, runtimes = _pair(3)
    runtimes[1]._activate_replay.device = None  # the reference: the ordinary path only
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)

    both = lockstep(models, runtimes, x, _same)

    both(lambda r: r.load(_adapter(8, 1, 16.0), slot=0))
    both(lambda r: r.load(_adapter(64, 2, 32.0), slot=1))
    both(lambda r: r.load(_adapter(16, 3, 8.0, bias=True), slot=2))
    for slot in (1, 0, 1, 2, 0, 2, 1, 0, 1, 2):  # each key twice or more: capture, then replays
        both(lambda r, slot=slot: r.activate(slot))
    both(lambda r: r.unload(1))
    for slot in (1, 0, 1, 0):  # an empty slot zeroes the wide rows
        both(lambda r, slot=slot: r.activate(slot))
    both(lambda r: r.set_scale(3.0, slot=2))
    both(lambda r: r.load(_adapter(32, 4, 64.0), slot=1))
    for slot in (2, 1, 2, 1, 0):
        both(lambda r, slot=slot: r.activate(slot))
    assert runtimes[0]._activate_replay.replays >= 6
    assert runtimes[1]._activate_replay.replays == 0


@pytest.mark.gpu
def test_gpu_activating_on_a_compiled_model_replays_without_recompiling() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    models, runtimes = _pair(3)
    runtimes[1]._activate_replay.device = None
    for r in runtimes:
        for slot, rank in enumerate((8, 16, 64)):
            r.load(_adapter(rank, rank, 2.0 * rank), slot=slot)
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(models[0], mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):
            compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for slot in (1, 0, 2, 1, 0, 2, 1, 2, 0):
                for r in runtimes:
                    r.activate(slot)
                got, want = compiled(x).double(), models[1](x).double()
                assert float((got - want).norm() / want.norm()) < 1e-2, slot
    assert runtimes[0]._activate_replay.replays >= 4


@pytest.mark.gpu
def test_gpu_a_failed_capture_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _, runtimes = _pair(2)
    runtimes[1]._activate_replay.device = None
    for r in runtimes:
        r.load(_adapter(64, 1, 16.0), slot=0)
        r.load(_adapter(8, 2, 16.0), slot=1)
        r.activate(1)  # the key's first use: the ordinary path
        r.activate(0)
    refuse_captures(monkeypatch, type(runtimes[0]._wide._scalers[0]))
    with pytest.warns(RuntimeWarning, match="could not capture"):
        runtimes[0].activate(1)  # the second use captures, fails, and takes the ordinary path
    runtimes[1].activate(1)
    assert runtimes[0]._activate_replay.device is None and not runtimes[0]._activate_replay._graphs
    _same(*runtimes)  # the wide refresh covered the rank-64 rows: the record was put back
    for r in runtimes:
        r.activate(0)
    _same(*runtimes)


@pytest.mark.gpu
def test_gpu_one_slot_activates_with_nothing_to_capture_until_it_has_rows() -> None:
    """With one slot there is no live copy: an empty slot whose wide rows are zero has nothing
    to do on the device, so nothing is captured (an empty graph would warn); once the slot holds
    an adapter, its refresh is captured and replayed, as the ordinary path computes."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    models, runtimes = _pair(1)
    runtimes[1]._activate_replay.device = None
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(3):
            for r in runtimes:
                r.activate(0)
        assert runtimes[0]._activate_replay.replays == 0 and not runtimes[0]._activate_replay._graphs
        for r in runtimes:
            r.load(_adapter(16, 5, 8.0))
        for _ in range(3):
            for r in runtimes:
                r.activate(0)
            _same(*runtimes)
        for r in runtimes:
            r.unload()
        for _ in range(3):
            for r in runtimes:
                r.activate(0)  # the wide rows zeroed once (the ordinary path's refresh), then nothing to do
            _same(*runtimes)
    assert runtimes[0]._activate_replay.replays >= 1
    x = torch.randn(8, 256, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(models[0](x), models[1](x))
