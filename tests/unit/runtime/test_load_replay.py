"""A load from the host cache as a CUDA graph replay (lorahot.runtime.load_replay): after every
load, swap, activation and re-weighting, the arenas, the wide rows and the host's record of them
are bitwise those of the ordinary path; a compiled model does not recompile; a capture that
fails falls back to the ordinary path with a warning, from the state it expects."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

import lorahot
from tests.unit.runtime.test_graph_replays import refuse_captures

DIMS = (256, 512, 256)


def _model(device: str) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(DIMS[0], DIMS[1]), nn.GELU(), nn.Linear(DIMS[1], DIMS[2], bias=False))
    return model.to(device, torch.bfloat16 if device == "cuda" else torch.float32)


def _adapter(rank: int, seed: int, alpha: float, *, bias: bool = False) -> lorahot.Adapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for n, (fin, fout) in {"0": DIMS[:2], "2": DIMS[1:]}.items():
        tensors[f"{n}.lora_A.weight"] = torch.randn(rank, fin, generator=g) / fin**0.5
        tensors[f"{n}.lora_B.weight"] = torch.randn(fout, rank, generator=g) / rank**0.5
    if bias:
        tensors["0.lora_B.bias"] = torch.randn(DIMS[1], generator=g) / 10
    return lorahot.read_adapter(tensors, config={"r": rank, "lora_alpha": alpha, "lora_bias": bias})


def test_the_cpu_takes_the_ordinary_path() -> None:
    runtime = lorahot.inject(_model("cpu"), ["0", "2"], max_rank=64)
    prepared = runtime.preload(_adapter(8, 1, 16.0))
    for _ in range(3):
        runtime.load(prepared)
    assert runtime._load_replay.device is None and runtime._load_replay.replays == 0
    assert runtime.layers["0"].lora_scale[:8].unique().tolist() == [2.0]


class _HostUploads:
    """Stands in for a CUDA runtime's read buffers on a CPU box: each arena's pack is "uploaded"
    into a buffer of its own that is kept, as the read buffers keep their device memory, so a
    load of the same packs lands at the same address (a :class:`LoadReplay` key)."""

    def __init__(self) -> None:
        import threading

        self.device = torch.device("cuda")  # what the runtime asks of read buffers that upload
        self.lock = threading.Lock()
        self._held: dict[int, torch.Tensor] = {}

    def upload(self, part: int, host: torch.Tensor) -> torch.Tensor:
        held = self._held.get(part)
        if held is None or held.numel() < host.numel():
            held = self._held[part] = torch.empty(max(host.numel(), 1 << 20), dtype=torch.uint8)
        out = held[: host.numel()]
        out.copy_(host)
        return out

    def used(self) -> None:
        pass

    def lend(self, part: int) -> object:
        import contextlib

        return contextlib.nullcontext()


@pytest.mark.usefixtures("replaying_cuda")
@pytest.mark.parametrize("slots", [1, 3])
def test_replays_simulated_on_the_cpu_leave_what_the_ordinary_path_leaves(slots: int) -> None:
    """The load replay's code paths on a CPU box, with a stand-in CUDA graph that repeats the
    device side of the captured steps and stand-in read buffers (CPU layers are not widened):
    bitwise the ordinary path after every load from the host cache, across ranks (zero fills),
    multipliers, LoRA biases (extras), slots and activations."""
    torch.manual_seed(0)
    models = [_model("cpu"), _model("cpu")]
    runtimes = [lorahot.inject(m, ["0", "2"], max_rank=64, slots=slots, extras=True) for m in models]
    for r in runtimes:
        r._read_buffers = _HostUploads()  # type: ignore[assignment]
    runtimes[0]._load_replay.device = torch.device("cpu")  # as on one CUDA device
    adapters = {"r8": _adapter(8, 1, 16.0), "r64": _adapter(64, 3, 64.0), "bias": _adapter(8, 4, 8.0, bias=True)}
    prepared = [{k: r.preload(a) for k, a in adapters.items()} for r in runtimes]
    x = torch.randn(8, DIMS[0])
    steps = [("r8", 0, 1.0)] * 3 + [("r64", 0, 1.0), ("r8", 0, 1.0)] * 4  # replays that change the record
    steps += [("bias", 0, 1.0), ("r8", 0, 1.0)] * 3 + [("r8", 0, 0.5), ("r8", 0, 0.5), ("r8", 0, -2.0)]
    if slots > 1:
        steps += [("r64", 1, 1.0), ("r8", 1, 1.0), ("r64", 1, 1.0), ("activate", 1, 0.0), ("r8", 1, 1.0)]
        steps += [("r64", 1, 1.0), ("r8", 1, 1.0), ("bias", 2, 1.0), ("bias", 2, 1.0), ("activate", 2, 0.0)]
        steps += [("r8", 2, 1.0), ("bias", 2, 1.0), ("r8", 2, 1.0)]
    for name, slot, scale in steps:
        for r, p in zip(runtimes, prepared):
            if name == "activate":
                r.activate(slot)
            else:
                r.load(p[name], slot=slot, scale=scale)
        for a, b in zip(runtimes[0].buffers.arenas, runtimes[1].buffers.arenas, strict=True):
            for t, u in zip((a.A, a.B, a.S, a.E), (b.A, b.B, b.S, b.E)):
                assert torch.equal(t, u), (name, slot, scale)
            assert (a.a_extent, a.b_extent, a.e_dirty) == (b.a_extent, b.b_extent, b.e_dirty)
        with torch.no_grad():
            assert torch.equal(models[0](x), models[1](x))
    assert runtimes[0]._load_replay.replays >= 8 and runtimes[1]._load_replay.replays == 0


def _state(runtime: lorahot.LoraRuntime) -> list[object]:
    """Every arena's buffers and record, every wide layer's rows, the wide rows' record."""
    torch.cuda.synchronize()
    out: list[object] = []
    for arena in runtime.buffers.arenas:
        out += [t.clone() for t in (arena.A, arena.B, arena.S, arena.E)]
        out += [list(arena.a_extent), list(arena.b_extent), list(arena.e_dirty)]
    for layer in runtime.layers.values():
        if layer.wide:
            out += [layer.wide_rows().clone(), layer.wide_a_rows().clone()]
    out.append(list(runtime._wide.extent))
    return out


def _same(mine: lorahot.LoraRuntime, ref: lorahot.LoraRuntime) -> None:
    for a, b in zip(_state(mine), _state(ref), strict=True):
        if isinstance(a, torch.Tensor):
            assert isinstance(b, torch.Tensor) and torch.equal(a, b)
        else:
            assert a == b


def lockstep(
    models: list[nn.Module], runtimes: list[lorahot.LoraRuntime], x: torch.Tensor, same: Callable[..., None]
) -> Callable[[Callable[[lorahot.LoraRuntime], None]], None]:
    """``step(runtime)`` on both runtimes, then their state compared (``same``) and the models'
    outputs on ``x`` bitwise."""

    def both(step: Callable[[lorahot.LoraRuntime], None]) -> None:
        for r in runtimes:
            step(r)
        same(*runtimes)
        with torch.no_grad():
            assert torch.equal(models[0](x), models[1](x))

    return both


def _pair(slots: int) -> tuple[list[nn.Module], list[lorahot.LoraRuntime]]:
    """Two runtimes on equal models: the first replays, the second takes the ordinary path only
    (loads, activations and re-weightings alike)."""
    models = [_model("cuda"), _model("cuda")]
    runtimes = [lorahot.inject(m, ["0", "2"], max_rank=64, slots=slots, extras=True) for m in models]
    for replays in (runtimes[1]._load_replay, runtimes[1]._activate_replay, runtimes[1]._replay):
        replays.device = None
    assert models[0][0].wide and runtimes[0]._load_replay.device is not None
    return models, runtimes


@pytest.mark.gpu
@pytest.mark.parametrize("slots", [1, 3])
def test_gpu_replays_leave_what_the_ordinary_path_leaves(slots: int) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    models, runtimes = _pair(slots)
    adapters = {
        "r8": _adapter(8, 1, 16.0),
        "r16": _adapter(16, 2, 4.0),
        "r64": _adapter(64, 3, 64.0),
        "bias": _adapter(8, 4, 8.0, bias=True),
    }
    prepared = [{k: r.preload(a) for k, a in adapters.items()} for r in runtimes]
    x = torch.randn(8, DIMS[0], device="cuda", dtype=torch.bfloat16)

    def both(step: Callable[[lorahot.LoraRuntime, dict[str, object]], None]) -> None:
        for r, p in zip(runtimes, prepared):
            step(r, p)
        _same(*runtimes)
        with torch.no_grad():
            assert torch.equal(models[0](x), models[1](x))

    # each key twice or more: the first takes the ordinary path, the second captures, the rest replay
    for name in ("r8", "r8", "r8", "r16", "r8", "r16", "r8", "r64", "r8", "r64", "r8", "bias", "r8", "bias", "r16"):
        both(lambda r, p, name=name: r.load(p[name]))
    for scale in (0.5, 0.5, -2.0, 0.5, -2.0):  # the multiplier is part of the key
        both(lambda r, p, scale=scale: r.load(p["r16"], scale=scale))
    both(lambda r, p: r.set_scale(3.0))
    both(lambda r, p: r.load(p["r16"], scale=0.5))
    if slots > 1:
        for slot, name in ((1, "r8"), (1, "r64"), (1, "r8"), (2, "bias"), (1, "r64"), (2, "bias"), (1, "r8")):
            both(lambda r, p, slot=slot, name=name: r.load(p[name], slot=slot))  # slots not live
        both(lambda r, p: r.activate(1))
        for name in ("r16", "r8", "r16", "r8"):
            both(lambda r, p, name=name: r.load(p[name], slot=1))  # live, mirrored into the live region
        both(lambda r, p: r.activate(2))
        both(lambda r, p: r.unload(1))
        for name in ("bias", "r64", "bias", "r64"):
            both(lambda r, p, name=name: r.load(p[name], slot=1))
    assert runtimes[0]._load_replay.replays >= 6
    assert runtimes[1]._load_replay.replays == 0


@pytest.mark.gpu
def test_gpu_swapping_a_compiled_model_replays_without_recompiling() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    models, runtimes = _pair(1)
    prepared = [[r.preload(_adapter(rank, rank, 2.0 * rank)) for rank in (8, 16, 8)] for r in runtimes]
    runtimes[0].load(prepared[0][0])
    x = torch.randn(8, DIMS[0], device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(models[0], mode="reduce-overhead")
    with torch.no_grad():
        for _ in range(3):
            compiled(x)
        with torch._dynamo.config.patch(error_on_recompile=True):
            for i in (1, 0, 1, 0, 2, 1, 2, 0, 1):
                for r, p in zip(runtimes, prepared):
                    r.load(p[i])
                got, want = compiled(x).double(), models[1](x).double()
                assert float((got - want).norm() / want.norm()) < 1e-2, i
    assert runtimes[0]._load_replay.replays >= 4


@pytest.mark.gpu
def test_gpu_a_failed_capture_falls_back_with_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _, runtimes = _pair(1)
    prepared = [[r.preload(_adapter(rank, rank, 16.0)) for rank in (64, 8)] for r in runtimes]
    for r, p in zip(runtimes, prepared):
        r.load(p[0])
        r.load(p[1])  # the key's first load: the ordinary path
        r.load(p[0])
    refuse_captures(monkeypatch, type(runtimes[0]._wide._scalers[0]))
    with pytest.warns(RuntimeWarning, match="could not capture"):
        runtimes[0].load(prepared[0][1])  # the second load of the key captures, fails, takes the ordinary path
    runtimes[1].load(prepared[1][1])
    assert runtimes[0]._load_replay.device is None and not runtimes[0]._load_replay._graphs
    _same(*runtimes)  # the zero fill the r64 -> r8 load needed ran: the record was put back
    for r, p in zip(runtimes, prepared):
        r.load(p[0])
    _same(*runtimes)
