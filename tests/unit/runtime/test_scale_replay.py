"""set_scale's device steps as a CUDA graph replay (lorahot.runtime.scale_replay): after every
re-weighting, swap and activation, the scale buffers and the wide rows are bitwise those of the
ordinary path; a capture that fails falls back to it with a warning."""

from __future__ import annotations

import pytest
import torch

import lorahot
from tests.unit.runtime.test_graph_replays import refuse_captures
from tests.unit.runtime.test_load_replay import DIMS, _adapter, _model, lockstep


def test_the_cpu_takes_the_ordinary_path() -> None:
    runtime = lorahot.inject(_model("cpu"), ["0", "2"], max_rank=64)
    runtime.load([_adapter(8, 1, 16.0), _adapter(16, 2, 4.0)], scale=[1.0, 1.0])
    assert runtime._replay.device is None
    runtime.set_scale([0.5, 2.0])
    assert runtime.layers["0"].lora_scale[:8].unique().tolist() == [0.5 * 2.0]
    assert runtime.layers["0"].lora_scale[8:24].unique().tolist() == [2.0 * 0.25]


def _state(runtime: lorahot.LoraRuntime) -> list[torch.Tensor]:
    """Every scale region and every wide layer's rows."""
    out = [arena.S.clone() for arena in runtime.buffers.arenas]
    out += [layer.wide_rows().clone() for layer in runtime.layers.values() if layer.wide]
    return out


def _same(mine: lorahot.LoraRuntime, ref: lorahot.LoraRuntime) -> None:
    torch.cuda.synchronize()
    for a, b in zip(_state(mine), _state(ref), strict=True):
        assert torch.equal(a, b)


@pytest.mark.gpu
def test_gpu_replays_leave_what_the_ordinary_path_leaves() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    models = [_model("cuda"), _model("cuda")]
    runtimes = [lorahot.inject(m, ["0", "2"], max_rank=64, slots=2) for m in models]
    runtimes[1]._replay.device = None  # the reference: the ordinary path only
    assert models[0][0].wide and runtimes[0]._replay.device is not None
    stack = [_adapter(24, 1, 48.0), _adapter(40, 2, 10.0)]
    x = torch.randn(8, DIMS[0], device="cuda", dtype=torch.bfloat16)

    both = lockstep(models, runtimes, x, _same)

    both(lambda r: r.load(stack, scale=[1.0, 1.0], slot=0))
    both(lambda r: r.load(_adapter(8, 3, 16.0), slot=1))
    for ws in ([0.5, -2.0], [0.0, 1.5], [3.0, 0.25], [1.0, 1.0], [-1.0, 0.5]):  # live: upload, copy, refresh
        both(lambda r, ws=ws: r.set_scale(list(ws), slot=0))
    for w in (0.5, 2.0, -1.0):  # a slot not live: the upload alone
        both(lambda r, w=w: r.set_scale(w, slot=1))
    both(lambda r: r.activate(1))
    for w in (0.25, 4.0, 1.0):
        both(lambda r, w=w: r.set_scale(w))
    both(lambda r: r.load(_adapter(64, 4, 8.0), slot=1))  # more rows for the wide refresh: a new key
    for w in (0.5, 2.0, 1.5):
        both(lambda r, w=w: r.set_scale(w))
    assert len(runtimes[0]._replay._graphs) >= 4  # the replays ran: one graph per key seen twice
    assert not runtimes[1]._replay._graphs


@pytest.mark.gpu
def test_gpu_reweighting_a_compiled_model_replays_without_recompiling() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    model, reference = _model("cuda"), _model("cuda")
    runtime = lorahot.inject(model, ["0", "2"], max_rank=64)
    ordinary = lorahot.inject(reference, ["0", "2"], max_rank=64)
    ordinary._replay.device = None
    parts = [_adapter(24, 1, 48.0), _adapter(40, 2, 10.0)]
    for r in (runtime, ordinary):
        r.load(parts, scale=[1.0, 1.0])
    x = torch.randn(8, DIMS[0], device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(model, mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):
            compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for ws in ([0.5, -2.0], [0.0, 1.5], [3.0, 0.25], [0.5, -2.0]):
                runtime.set_scale(ws)
                ordinary.set_scale(ws)
                got, want = compiled(x).double(), reference(x).double()
                assert float((got - want).norm() / want.norm()) < 1e-2, ws
    assert runtime._replay._graphs


@pytest.mark.gpu
def test_gpu_a_failed_capture_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    runtime = lorahot.inject(_model("cuda"), ["0", "2"], max_rank=64)
    ordinary = lorahot.inject(_model("cuda"), ["0", "2"], max_rank=64)
    ordinary._replay.device = None
    for r in (runtime, ordinary):
        r.load([_adapter(24, 1, 48.0), _adapter(40, 2, 10.0)], scale=[1.0, 1.0])
        r.set_scale([0.5, 1.0])  # the key's first call: the ordinary path
    refuse_captures(monkeypatch, type(runtime._wide._scalers[0]))
    with pytest.warns(RuntimeWarning, match="could not capture"):
        runtime.set_scale([2.0, -1.0])  # the second call captures, fails, and takes the ordinary path
    ordinary.set_scale([2.0, -1.0])
    assert runtime._replay.device is None and not runtime._replay._graphs
    _same(runtime, ordinary)
    runtime.set_scale([0.25, 3.0])
    ordinary.set_scale([0.25, 3.0])
    _same(runtime, ordinary)


def _component_adapter(rank: int, seed: int, alpha: float) -> lorahot.Adapter:
    """:func:`_adapter`'s modules on both components ``lm`` and ``lm2`` (diffusers-style prefixes)."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for c in ("lm", "lm2"):
        for n, (fin, fout) in {"0": DIMS[:2], "2": DIMS[1:]}.items():
            tensors[f"{c}.{n}.lora_A.weight"] = torch.randn(rank, fin, generator=g) / fin**0.5
            tensors[f"{c}.{n}.lora_B.weight"] = torch.randn(fout, rank, generator=g) / rank**0.5
    return lorahot.read_adapter(tensors, config={"r": rank, "lora_alpha": alpha})


@pytest.mark.gpu
def test_gpu_dict_weights_between_replays_leave_what_the_ordinary_path_leaves() -> None:
    """A weight per component takes the ordinary path past set_scale's replay (and past the
    host cache's load replay): numbers before and after it still replay, and after every step,
    dicts and numbers in turn, loads from the host cache with a dict, activations, the scale
    buffers, the wide rows and both components' outputs are bitwise those of a runtime that never
    replays."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    models = [{c: _model("cuda") for c in ("lm", "lm2")} for _ in range(2)]
    runtimes = [lorahot.inject(m, ["0", "2"], max_rank=64, slots=2) for m in models]
    for replays in (runtimes[1]._load_replay, runtimes[1]._activate_replay, runtimes[1]._replay):
        replays.device = None
    assert runtimes[0]._replay.device is not None
    x = torch.randn(8, DIMS[0], device="cuda", dtype=torch.bfloat16)

    def both(step) -> None:
        for i, r in enumerate(runtimes):
            step(i, r)
        _same(*runtimes)
        with torch.no_grad():
            for c in ("lm", "lm2"):
                assert torch.equal(models[0][c](x), models[1][c](x)), c

    stack = [_component_adapter(24, 1, 48.0), _component_adapter(40, 2, 10.0)]
    both(lambda i, r: r.load(stack, scale=[{"lm": 0.5}, 1.0], slot=0))
    weights = ([0.5, -2.0], [0.5, -2.0], [{"lm2": 0.0}, 1.5], [3.0, 0.25], [{"lm": -1.0, "lm2": 2.0}, {"lm": 0.5}])
    for ws in (*weights, [1.0, 1.0], [-1.0, 0.5], [-1.0, 0.5]):
        both(lambda i, r, ws=ws: r.set_scale(list(ws), slot=0))
    prepared = [r.preload(_component_adapter(8, 3, 16.0)) for r in runtimes]
    both(lambda i, r: r.load(prepared[i], slot=1, scale={"lm": 0.25}))
    both(lambda i, r: r.activate(1))
    for w in (2.0, {"lm2": -0.5}, 2.0, 0.75):
        both(lambda i, r, w=w: r.set_scale(w))
    for w in (1.0, 1.0, {"lm": 3.0}, 0.5):  # the host cache's load, replayed for numbers seen twice
        both(lambda i, r, w=w: r.load(prepared[i], slot=1, scale=w))
    assert len(runtimes[0]._replay._graphs) >= 1 and not runtimes[1]._replay._graphs
