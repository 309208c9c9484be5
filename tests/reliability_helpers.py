"""Builders for the reliability tests: a tiny two-slot runtime, byte-level safetensors surgery,
and a snapshot of every adapter byte and the model output to prove a failed load changed nothing.
"""

from __future__ import annotations

import json
import math
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch

import lorahot
from tests.helpers import make_adapter, save_peft, tiny_lm, token_ids

#: Injected layers of the tiny model; ``k_proj``, ``o_proj``, ``up_proj`` stay plain.
TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]
MAX_RANK = 8
VOCAB = 32
Q0, V1, DOWN0, EMB = "layers.0.self_attn.q_proj", "layers.1.self_attn.v_proj", "layers.0.mlp.down_proj", "embed_tokens"


@dataclass
class Rig:
    """A tiny model with lorahot injected (2 slots), a valid adapter in each slot, an input."""

    model: torch.nn.Module
    runtime: lorahot.LoraRuntime
    x: torch.Tensor  # (2, 5) token ids

    def output(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model(self.x)


def build_rig(tmp: Path, *, slots: int = 2, max_rank: int = MAX_RANK, seed: int = 0) -> Rig:
    """The runtime every reliability case starts from: slot 0 (active) rank 4, slot 1 rank 8."""
    model = tiny_lm(seed=seed, vocab=VOCAB)
    runtime = lorahot.inject(model, TARGETS, max_rank=max_rank, slots=slots, extras=True)
    rig = Rig(model, runtime, token_ids((2, 5), VOCAB, seed=seed))
    for slot in range(slots):
        rank = (4, 8)[slot % 2]
        path = write_valid(tmp / f"valid{slot}", model, {Q0: rank, V1: rank, DOWN0: rank, EMB: rank}, seed=100 + slot)
        runtime.load(path, slot=slot)
    runtime.activate(0)
    return rig


def write_valid(
    directory: Path, model: torch.nn.Module, ranks: dict[str, int], *, seed: int = 0, alpha: float | None = None
) -> Path:
    """A valid PEFT adapter directory (uniform rank when ``ranks`` agree, so ``r`` is set)."""
    tensors, _ = make_adapter(model, ranks, seed=seed)
    r = next(iter(set(ranks.values()))) if len(set(ranks.values())) == 1 else None
    return save_peft(directory, tensors, r=r, lora_alpha=alpha if alpha is not None else (2.0 * r if r else None))


def valid_tensors(
    model: torch.nn.Module, rank: int = 4, seed: int = 7, names: tuple[str, ...] = (Q0, V1)
) -> dict[str, torch.Tensor]:
    """PEFT-named tensors for ``names`` at ``rank``."""
    tensors, _ = make_adapter(model, dict.fromkeys(names, rank), seed=seed)
    return tensors


# -- time bounds -----------------------------------------------------------------------------

T = TypeVar("T")

#: seconds any single load may take in these tests; a hang (a FIFO, a backtracking regex) fails
HANG_S = 15.0


def within(seconds: float, fn: Callable[[], T]) -> T:
    """``fn()`` run on a daemon thread; fails the test if it has not finished after ``seconds``
    (a hang must fail, not stall the suite). Its exception, if any, is re-raised here."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name="lorahot-test-bounded")
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        pytest.fail(f"still running after {seconds} s: a hostile input made lorahot hang")
    if "error" in box:
        raise box["error"]
    return box["value"]


# -- snapshots -------------------------------------------------------------------------------


@dataclass
class Snapshot:
    """Every adapter byte of a runtime (A, B, S of every arena, all regions) and the output."""

    buffers: list[torch.Tensor]
    extents: list[tuple[list[int], list[int]]]
    infos: list[Any]
    active: int
    cache_keys: list[str]
    output: torch.Tensor


def snapshot(rig: Rig) -> Snapshot:
    manager = rig.runtime.buffers
    buffers = [t.detach().clone() for a in manager.arenas for t in (a.A, a.B, a.S, a.E)]
    extents = [(list(a.a_extent), list(a.b_extent)) for a in manager.arenas]
    infos = [rig.runtime.info(s) for s in range(rig.runtime.slots)]
    return Snapshot(buffers, extents, infos, rig.runtime.active_slot, rig.runtime.cache.keys(), rig.output())


def assert_unchanged(rig: Rig, before: Snapshot) -> None:
    """Bitwise: every arena buffer, the bookkeeping and the model output are as in ``before``."""
    after = snapshot(rig)
    assert len(after.buffers) == len(before.buffers)
    for i, (a, b) in enumerate(zip(after.buffers, before.buffers)):
        assert torch.equal(a, b), f"arena buffer {i} changed by a failed load"
    assert after.extents == before.extents
    assert after.infos == before.infos
    assert after.active == before.active
    assert after.cache_keys == before.cache_keys
    assert torch.equal(after.output, before.output), "model output changed by a failed load"


# -- safetensors surgery ---------------------------------------------------------------------


def split(blob: bytes) -> tuple[dict[str, Any], bytes]:
    """``(header dict, data bytes)`` of a well-formed safetensors blob."""
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + n]), blob[8 + n :]


def assemble(
    header: dict[str, Any] | list[Any] | str | bytes, data: bytes = b"", *, declared_len: int | None = None
) -> bytes:
    """A safetensors blob from a header (dict/list as JSON, or raw text/bytes) and data."""
    if isinstance(header, (dict, list)):
        header = json.dumps(header, separators=(",", ":"))
    raw = header.encode() if isinstance(header, str) else header
    n = len(raw) if declared_len is None else declared_len
    return struct.pack("<Q", n) + raw + data


def entry(dtype: str, shape: list[int], begin: int, itemsize: int = 4) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, begin + math.prod(shape) * itemsize]}


# -- reporting -------------------------------------------------------------------------------


def report(config: pytest.Config, name: str, data: dict[str, Any]) -> Path:
    """Prints ``data`` (visible with ``pytest -s``) and writes it as JSON under the pytest
    cache: ``.pytest_cache/d/lorahot-reliability/<name>.json``."""
    cache = getattr(config, "cache", None)  # absent under -p no:cacheprovider
    directory = (
        Path(cache.mkdir("lorahot-reliability"))
        if cache is not None
        else Path(config.rootpath) / ".pytest_cache" / "d" / "lorahot-reliability"
    )
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{name}.json"
    out.write_text(json.dumps(data, indent=2, sort_keys=True))
    print(f"\n[lorahot reliability] {name}: {json.dumps(data, sort_keys=True)}")
    return out
