"""One runtime over a model on two devices (the CPU and a GPU, or two GPUs), and over a model
on a GPU that is not the current one: loads (from files and the host cache), whole-batch and
per-row activation, ``set_scale``, unload, merged mode, eject, eagerly and compiled, each
against the float64 dense reference. A model split across devices, as a ``device_map``
placement leaves it, holds one arena per device; a model on ``cuda:1`` while ``cuda:0`` is
current launches and replays its graphs there."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing
from torch import nn

import lorahot
from tests.helpers import make_adapter, model_reference, save_peft

pytestmark = pytest.mark.gpu

_TWO = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
#: where the embedding and first part go, and where the second part and head go: the CPU and a
#: GPU (as an offloading placement leaves a model), two GPUs, the GPU that is not current
_PLACES = [
    pytest.param(("cpu", "cuda:0"), id="cpu-gpu"),
    pytest.param(("cuda:0", "cuda:1"), id="split", marks=_TWO),
    pytest.param(("cuda:1", "cuda:1"), id="second", marks=_TWO),
]

_DTYPE = torch.bfloat16
_TARGETS = ["embed", "q", "k", "o", "head"]


class _Part(nn.Module):
    """Two linears reading one input, a third over their sum, a residual; computes wherever its
    ``marker`` buffer lives (as a ``device_map`` placement moves activations)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("marker", torch.zeros(()))
        self.q, self.k, self.o = (nn.Linear(width, width) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.marker.device)
        return x + self.o(self.q(x) + self.k(x))


class _Split(nn.Module):
    def __init__(self, vocab: int = 64, width: int = 256) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.first, self.second = _Part(width), _Part(width)
        self.head = nn.Linear(width, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.second(self.first(self.embed(ids))))


def _models(places: tuple[str, str]) -> tuple[nn.Module, nn.Module]:
    """The reference (CPU, the low-precision weights) and a copy placed on ``places``: the
    embedding and first part on one, the second part and head on the other."""
    torch.manual_seed(0)
    reference = _Split().to(_DTYPE)
    model = copy.deepcopy(reference)
    model.embed.to(places[0])
    model.first.to(places[0])
    model.second.to(places[1])
    model.head.to(places[1])
    return reference, model.eval()


def _adapters(reference: nn.Module, tmp_path: Path) -> list[tuple[Path, dict]]:
    """Three PEFT adapter directories of different ranks and targets, with what each adds."""
    names = [n for n, m in reference.named_modules() if n.split(".")[-1] in _TARGETS]
    out = []
    for k, rank in enumerate((16, 4, 9)):
        chosen = {n: rank for i, n in enumerate(names) if (i + k) % 3}
        tensors, ab = make_adapter(reference, chosen, seed=k)
        path = save_peft(tmp_path / f"a{k}", tensors, r=rank, lora_alpha=rank)  # scale 1
        out.append((path, {n: (a, b, 1.0) for n, (a, b) in ab.items()}))
    return out


def _expected(reference: nn.Module, ids: torch.Tensor, route: list[int], held: list[dict]) -> torch.Tensor:
    return torch.cat(
        [model_reference(reference, ids[i : i + 1], held[s] if s >= 0 else {}) for i, s in enumerate(route)]
    )


def _check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    got = got.double().cpu()
    assert torch.isfinite(got).all(), what
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert err <= 3e-2 * scale, f"{what}: max abs diff {err:.4g} against {scale:.4g}"


def _ids(batch: int, tokens: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 64, (batch, tokens), generator=torch.Generator().manual_seed(seed))


def _scaled(held: dict, scale: float) -> dict:
    return {n: (a, b, s * scale) for n, (a, b, s) in held.items()}


@pytest.mark.parametrize("places", _PLACES)
def test_gpu_a_model_on_two_devices_or_the_other_device_computes_every_adapter(
    places: tuple[str, str], tmp_path: Path
) -> None:
    reference, model = _models(places)
    base = copy.deepcopy(model)
    adapters = _adapters(reference, tmp_path)
    runtime = lorahot.inject(model, _TARGETS, max_rank=16, slots=3)
    held = []
    with torch.cuda.device(0), torch.no_grad():  # cuda:0 current, whatever the model's devices
        runtime.preload(adapters[2][0])
        for slot, (path, adds) in enumerate(adapters):
            runtime.load(path, slot=slot)  # the last one from the host cache
            held.append(adds)
        for tokens in (5, 100):  # 20 and 400 rows: the fused kernels, then the wide and segmented paths
            ids = _ids(4, tokens, seed=tokens)
            runtime.activate(1)
            _check(model(ids.to(places[0])), _expected(reference, ids, [1] * 4, held), f"slot 1, {tokens} tokens")
            for route in ([0, 1, -1, 2], torch.tensor([2, 2, 0, -1], device="cuda:0"), torch.tensor([1, -1, 0, 0])):
                runtime.activate(route)
                want = _expected(reference, ids, [int(s) for s in route], held)
                _check(model(ids.to(places[0])), want, f"route {route}, {tokens} tokens")
        runtime.set_scale(0.5, slot=2)
        held[2] = _scaled(held[2], 0.5)
        ids = _ids(4, 7, seed=1)
        runtime.activate([2, 0, 2, 1])
        _check(model(ids.to(places[0])), _expected(reference, ids, [2, 0, 2, 1], held), "after set_scale")

        compiled = torch.compile(model, mode="reduce-overhead")
        with torch._dynamo.config.patch(error_on_recompile=False):
            compiled(ids.to(places[0]))  # compiles for the per-row mode
        with torch._dynamo.config.patch(error_on_recompile=True):
            for _ in range(2):
                got = compiled(ids.to(places[0]))
            _check(got, _expected(reference, ids, [2, 0, 2, 1], held), "compiled")
            runtime.load(adapters[0][0], slot=2)  # a swap from the host cache into a routed slot
            held[2] = adapters[0][1]
            runtime.activate([2, -1, 1, 2])
            _check(compiled(ids.to(places[0])), _expected(reference, ids, [2, -1, 1, 2], held), "compiled, swapped")
            runtime.unload(1)
            held[1] = {}
            _check(compiled(ids.to(places[0])), _expected(reference, ids, [2, -1, 1, 2], held), "compiled, unloaded")
        lorahot.eject(model)
        assert torch.equal(model(ids.to(places[0])), base(ids.to(places[0]))), "eject did not restore the base model"


@pytest.mark.parametrize("places", _PLACES)
def test_gpu_merged_mode_on_two_devices_or_the_other_device(places: tuple[str, str], tmp_path: Path) -> None:
    reference, model = _models(places)
    base = copy.deepcopy(model)
    adapters = _adapters(reference, tmp_path)
    runtime = lorahot.inject(model, _TARGETS, max_rank=16, slots=2, merged=True)
    ids = _ids(3, 6, seed=2)
    with torch.cuda.device(0), torch.no_grad():
        for slot in (0, 1):
            runtime.load(adapters[slot][0], slot=slot)
        for slot in (0, 1, 0):
            runtime.activate(slot)
            _check(
                model(ids.to(places[0])),
                _expected(reference, ids, [slot] * 3, [a for _, a in adapters]),
                f"merged {slot}",
            )
        runtime.set_scale(2.0, slot=0)
        _check(
            model(ids.to(places[0])), _expected(reference, ids, [0] * 3, [_scaled(adapters[0][1], 2.0)]), "merged x2"
        )
        runtime.unload()
        assert torch.equal(model(ids.to(places[0])), base(ids.to(places[0]))), "unload did not restore the weights"
        runtime.load(adapters[1][0], slot=1)
        runtime.activate(1)
        lorahot.eject(model)
        assert torch.equal(model(ids.to(places[0])), base(ids.to(places[0]))), "eject did not restore the weights"
